//! The real binary as a child process: its command line, its JSON log lines, blocking
//! HTTP/1.1 to it, and OTLP/JSON exports for it.

use std::collections::BTreeMap;
use std::io::{BufRead, BufReader, Read, Write};
use std::net::{SocketAddr, TcpStream};
use std::path::{Path, PathBuf};
use std::process::{Child, ChildStderr, Command, Stdio};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use flowmetrics::flows::state;

use super::parse_samples;

pub const BIN: &str = env!("CARGO_BIN_EXE_flowmetrics");

/// A temporary directory of its own per test: `fm-{suite}-{name}-{pid}`.
pub fn temp_dir(suite: &str, name: &str) -> PathBuf {
    let dir = std::env::temp_dir().join(format!("fm-{suite}-{name}-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    std::fs::create_dir_all(&dir).unwrap();
    dir
}

/// The binary with only the variables a test sets (JSON logs, loopback listeners, no
/// gRPC), its state file at `state` when given, stderr piped.
pub fn command(state: Option<&Path>, env: &[(&str, &str)]) -> Command {
    let mut c = Command::new(BIN);
    for (k, _) in std::env::vars() {
        if k.starts_with("FLOWMETRICS_") || k == "RUST_LOG" {
            c.env_remove(k);
        }
    }
    c.envs([
        ("FLOWMETRICS_LISTEN__METRICS", "127.0.0.1:0"),
        ("FLOWMETRICS_LISTEN__OTLP_HTTP", "127.0.0.1:0"),
        ("FLOWMETRICS_LISTEN__OTLP_GRPC", ""),
        ("FLOWMETRICS_LOG__FORMAT", "json"),
    ]);
    if let Some(path) = state {
        c.env("FLOWMETRICS_STATE__PATH", path);
    }
    c.envs(env.iter().copied());
    c.stderr(Stdio::piped());
    c
}

/// A JSON log line as `LEVEL message` (the line itself when it is not JSON).
pub fn log_message(line: &str) -> String {
    let v: serde_json::Value = serde_json::from_str(line).unwrap_or_default();
    let msg = v["fields"]["message"].as_str().unwrap_or(line);
    format!("{} {msg}", v["level"].as_str().unwrap_or("?"))
}

/// The address in a start-up line such as `metrics: http://127.0.0.1:9464/metrics`.
pub fn listener(msg: &str, prefix: &str) -> Option<SocketAddr> {
    let rest = &msg[msg.find(prefix)? + prefix.len()..];
    rest[..rest.find('/')?].parse().ok()
}

/// One HTTP/1.1 request on a connection of its own: (status, body); (0, error) when no
/// answer came within 30 s.
pub fn http(addr: SocketAddr, method: &str, path: &str, body: &str) -> (u16, String) {
    let patience = Duration::from_secs(30);
    let attempt = || -> std::io::Result<String> {
        let mut s = TcpStream::connect_timeout(&addr, patience)?;
        s.set_read_timeout(Some(patience))?;
        s.set_write_timeout(Some(patience))?;
        write!(
            s,
            "{method} {path} HTTP/1.1\r\nHost: test\r\nContent-Type: application/json\r\n\
             Content-Length: {}\r\nConnection: close\r\n\r\n{body}",
            body.len()
        )?;
        let mut out = String::new();
        s.read_to_string(&mut out)?;
        Ok(out)
    };
    match attempt() {
        Ok(out) => {
            let status = out.get(9..12).and_then(|c| c.parse().ok()).unwrap_or(0);
            let body = out.split_once("\r\n\r\n").map_or("", |(_, b)| b);
            (status, body.to_string())
        }
        Err(e) => (0, e.to_string()),
    }
}

pub fn get(addr: SocketAddr, path: &str) -> (u16, String) {
    http(addr, "GET", path, "")
}

/// An OTLP/JSON trace export of one span (at `t0`) with these span events, under a
/// resource of `service` when given.
pub fn json_export(service: Option<&str>, t0: u64, events: Vec<serde_json::Value>) -> String {
    let resource = service.map_or(serde_json::json!({}), |s| {
        serde_json::json!({"resource": {"attributes": [
            {"key": "service.name", "value": {"stringValue": s}}
        ]}})
    });
    let mut resource_spans = serde_json::json!({"scopeSpans": [{"spans": [{
        "traceId": "0af7651916cd43dd8448eb211c80319c",
        "spanId": "b7ad6b7169203331",
        "name": "work",
        "startTimeUnixNano": t0.to_string(),
        "endTimeUnixNano": t0.to_string(),
        "events": events,
    }]}]});
    if let (Some(into), Some(from)) = (resource_spans.as_object_mut(), resource.as_object()) {
        into.extend(from.clone());
    }
    serde_json::json!({"resourceSpans": [resource_spans]}).to_string()
}

/// A flow event in OTLP/JSON: `flow.{flow}.{kind}` with its correlation id.
pub fn json_flow_event(flow: &str, kind: &str, id: &str, ts: u64) -> serde_json::Value {
    serde_json::json!({
        "name": format!("flow.{flow}.{kind}"),
        "timeUnixNano": ts.to_string(),
        "attributes": [{"key": "correlation-id", "value": {"stringValue": id}}],
    })
}

/// How many instances the state file at `path` holds; `None` when there is none.
pub fn entries_in(path: &Path) -> Option<usize> {
    Some(state::read(path, 1 << 30).ok()??.entries.len())
}

/// A running binary: its addresses; its stderr read by a thread into `log`, or left to
/// the test (`stderr`).
pub struct Service {
    pub child: Child,
    pub metrics: SocketAddr,
    pub otlp: SocketAddr,
    pub log: Arc<Mutex<Vec<String>>>,
    pub stderr: Option<BufReader<ChildStderr>>,
}

impl Service {
    /// Starts it and reads stderr until both addresses are known (within `within`).
    pub fn start_with(mut c: Command, within: Duration, keep_reading: bool) -> Service {
        let mut child = c.spawn().unwrap();
        let mut stderr = BufReader::new(child.stderr.take().unwrap());
        let log = Arc::new(Mutex::new(Vec::new()));
        let (tx, rx) = std::sync::mpsc::channel();
        // Reads on a thread for the start-up lines (a blocked start must time out).
        let reader = std::thread::spawn({
            let log = log.clone();
            move || {
                let (mut metrics, mut otlp) = (None, None);
                let mut line = String::new();
                while metrics.is_none() || otlp.is_none() {
                    line.clear();
                    if stderr.read_line(&mut line).unwrap_or(0) == 0 {
                        break;
                    }
                    let msg = log_message(line.trim_end());
                    metrics = metrics.or_else(|| listener(&msg, "metrics: http://"));
                    otlp = otlp.or_else(|| listener(&msg, "OTLP/HTTP: http://"));
                    log.lock().unwrap().push(msg);
                }
                let _ = tx.send((metrics, otlp));
                stderr
            }
        });
        let Ok((Some(metrics), Some(otlp))) = rx.recv_timeout(within) else {
            let _ = child.kill();
            let _ = child.wait();
            panic!("not started within {within:?}: {:?}", log.lock().unwrap());
        };
        let stderr = reader.join().unwrap();
        let mut s = Service {
            child,
            metrics,
            otlp,
            log,
            stderr: Some(stderr),
        };
        if keep_reading {
            let stderr = s.stderr.take().unwrap();
            let log = s.log.clone();
            std::thread::spawn(move || {
                for line in stderr.lines().map_while(Result::ok) {
                    log.lock().unwrap().push(log_message(&line));
                }
            });
        }
        s
    }

    pub fn start(state: Option<&Path>, env: &[(&str, &str)]) -> Service {
        Self::start_with(command(state, env), Duration::from_secs(30), true)
    }

    pub fn signal(&self, sig: i32) {
        // SAFETY: kill(2) on our own child.
        assert_eq!(unsafe { libc::kill(self.child.id() as i32, sig) }, 0);
    }

    /// SIGTERM; the exit code (within 30 s).
    pub fn stop(&mut self) -> Option<i32> {
        self.signal(libc::SIGTERM);
        let give_up = Instant::now() + Duration::from_secs(30);
        loop {
            if let Some(status) = self.child.try_wait().unwrap() {
                // Let the reader take the last lines.
                std::thread::sleep(Duration::from_millis(100));
                return status.code();
            }
            assert!(Instant::now() < give_up, "no exit: {:?}", self.log());
            std::thread::sleep(Duration::from_millis(20));
        }
    }

    pub fn log(&self) -> Vec<String> {
        self.log.lock().unwrap().clone()
    }

    pub fn wait_for_log(&self, needle: &str) {
        let give_up = Instant::now() + Duration::from_secs(20);
        while !self.log().iter().any(|l| l.contains(needle)) {
            assert!(
                Instant::now() < give_up,
                "no line with {needle:?}: {:#?}",
                self.log()
            );
            std::thread::sleep(Duration::from_millis(20));
        }
    }

    pub fn samples(&self) -> BTreeMap<String, f64> {
        let (status, body) = get(self.metrics, "/metrics");
        assert_eq!(status, 200, "{body}");
        parse_samples(&body)
    }

    /// Posts an OTLP/JSON trace export and asserts it is taken (200).
    pub fn post_traces(&self, body: &str) {
        let (status, body) = http(self.otlp, "POST", "/v1/traces", body);
        assert_eq!(status, 200, "{body}");
    }

    /// Waits until every listener is bound (`/readyz` answers 200).
    pub fn wait_ready(&self) {
        let give_up = Instant::now() + Duration::from_secs(20);
        while get(self.metrics, "/readyz").0 != 200 {
            assert!(Instant::now() < give_up, "never ready");
            std::thread::sleep(Duration::from_millis(20));
        }
    }
}

impl Drop for Service {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}
