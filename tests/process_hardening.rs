//! The process around the service, through the real binary on loopback: what its state
//! file may be, signals, a stderr nobody reads, and a low open-file limit.

use std::collections::BTreeMap;
use std::io::{BufRead, BufReader, Read, Write};
use std::net::{SocketAddr, TcpStream};
use std::os::unix::process::CommandExt as _;
use std::path::{Path, PathBuf};
use std::process::{Child, ChildStderr, Command, Stdio};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use flowmetrics::flows::state;

const BIN: &str = env!("CARGO_BIN_EXE_flowmetrics");
const SEC: u64 = 1_000_000_000;
const T0: u64 = 1_700_000_000 * SEC;

/// A temporary directory of its own per test.
fn temp_dir(name: &str) -> PathBuf {
    let dir = std::env::temp_dir().join(format!("fm-process-{name}-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    std::fs::create_dir_all(&dir).unwrap();
    dir
}

/// The binary with only the variables a test sets (JSON logs, loopback listeners).
fn command(state: Option<&Path>, env: &[(&str, &str)]) -> Command {
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

/// A running binary: its addresses; its stderr read by a thread into `log`, or left to
/// the test (`stderr`).
struct Service {
    child: Child,
    metrics: SocketAddr,
    otlp: SocketAddr,
    log: Arc<Mutex<Vec<String>>>,
    stderr: Option<BufReader<ChildStderr>>,
}

fn message(line: &str) -> String {
    let v: serde_json::Value = serde_json::from_str(line).unwrap_or_default();
    let msg = v["fields"]["message"].as_str().unwrap_or(line);
    format!("{} {msg}", v["level"].as_str().unwrap_or("?"))
}

fn port(msg: &str, prefix: &str) -> Option<SocketAddr> {
    let rest = &msg[msg.find(prefix)? + prefix.len()..];
    rest[..rest.find('/')?].parse().ok()
}

impl Service {
    /// Starts it and reads stderr until both addresses are known (within `within`).
    fn start_with(mut c: Command, within: Duration, keep_reading: bool) -> Service {
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
                    let msg = message(line.trim_end());
                    metrics = metrics.or_else(|| port(&msg, "metrics: http://"));
                    otlp = otlp.or_else(|| port(&msg, "OTLP/HTTP: http://"));
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
                    log.lock().unwrap().push(message(&line));
                }
            });
        }
        s
    }

    fn start(state: Option<&Path>, env: &[(&str, &str)]) -> Service {
        Self::start_with(command(state, env), Duration::from_secs(30), true)
    }

    fn signal(&self, sig: i32) {
        // SAFETY: kill(2) on our own child.
        assert_eq!(unsafe { libc::kill(self.child.id() as i32, sig) }, 0);
    }

    /// SIGTERM; the exit code (within 30 s).
    fn stop(&mut self) -> Option<i32> {
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

    fn log(&self) -> Vec<String> {
        self.log.lock().unwrap().clone()
    }

    fn wait_for_log(&self, needle: &str) {
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

    fn samples(&self) -> BTreeMap<String, f64> {
        let (status, body) = get(self.metrics, "/metrics");
        assert_eq!(status, 200, "{body}");
        parse(&body)
    }

    fn send(&self, events: &[(&str, String, u64)]) {
        let (status, body) = http(self.otlp, "POST", "/v1/traces", &export(events));
        assert_eq!(status, 200, "{body}");
    }
}

impl Drop for Service {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// One HTTP/1.1 request on a connection of its own: (status, body); (0, error) when no
/// answer came within 10 s.
fn http(addr: SocketAddr, method: &str, path: &str, body: &str) -> (u16, String) {
    let attempt = || -> std::io::Result<String> {
        let mut s = TcpStream::connect_timeout(&addr, Duration::from_secs(10))?;
        s.set_read_timeout(Some(Duration::from_secs(10)))?;
        s.set_write_timeout(Some(Duration::from_secs(10)))?;
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

fn get(addr: SocketAddr, path: &str) -> (u16, String) {
    http(addr, "GET", path, "")
}

fn parse(text: &str) -> BTreeMap<String, f64> {
    text.lines()
        .filter(|l| !l.starts_with('#') && !l.is_empty())
        .filter_map(|l| {
            let l = l.split(" # ").next()?;
            let (series, value) = l.rsplit_once(' ')?;
            Some((series.to_string(), value.parse().ok()?))
        })
        .collect()
}

fn sum(samples: &BTreeMap<String, f64>, name: &str) -> f64 {
    samples
        .iter()
        .filter(|(s, _)| s.split('{').next() == Some(name))
        .map(|(_, v)| v)
        .sum()
}

/// An OTLP/JSON trace export with one `checkout` flow event per (kind, id, timestamp).
fn export(events: &[(&str, String, u64)]) -> String {
    let events: Vec<serde_json::Value> = events
        .iter()
        .map(|(kind, id, ts)| {
            serde_json::json!({
                "name": format!("flow.checkout.{kind}"),
                "timeUnixNano": ts.to_string(),
                "attributes": [{"key": "correlation-id", "value": {"stringValue": id}}],
            })
        })
        .collect();
    serde_json::json!({"resourceSpans": [{"scopeSpans": [{"spans": [{
        "traceId": "0af7651916cd43dd8448eb211c80319c",
        "spanId": "b7ad6b7169203331",
        "name": "work",
        "startTimeUnixNano": T0.to_string(),
        "endTimeUnixNano": T0.to_string(),
        "events": events,
    }]}]}]})
    .to_string()
}

fn events(kind: &'static str, ids: std::ops::Range<u64>) -> Vec<(&'static str, String, u64)> {
    ids.map(|i| (kind, format!("id-{i}"), T0 + i * SEC))
        .collect()
}

fn entries_in(path: &Path) -> Option<usize> {
    Some(state::read(path, 1 << 30).ok()??.entries.len())
}

/// The files beside `path` whose names start with its name and `suffix`.
fn set_aside(path: &Path, suffix: &str) -> Vec<String> {
    let prefix = format!("{}{suffix}", path.file_name().unwrap().to_str().unwrap());
    std::fs::read_dir(path.parent().unwrap())
        .unwrap()
        .filter_map(|e| e.ok()?.file_name().into_string().ok())
        .filter(|n| n.starts_with(&prefix))
        .collect()
}

fn mkfifo(path: &Path) {
    let c = std::ffi::CString::new(path.to_str().unwrap()).unwrap();
    // SAFETY: a valid C string.
    assert_eq!(unsafe { libc::mkfifo(c.as_ptr(), 0o600) }, 0);
}

/// Peak resident memory of a process (VmHWM), in bytes.
fn peak_rss(pid: u32) -> u64 {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).unwrap();
    let kb: u64 = status
        .lines()
        .find_map(|l| l.strip_prefix("VmHWM:"))
        .and_then(|v| v.split_whitespace().next()?.parse().ok())
        .unwrap();
    kb * 1024
}

#[test]
fn a_fifo_as_state_file_is_refused_at_once_and_set_aside() {
    let dir = temp_dir("fifo");
    let path = dir.join("state");
    mkfifo(&path);
    // A FIFO nobody writes to would block the open (and the start) for ever.
    let mut s = Service::start_with(command(Some(&path), &[]), Duration::from_secs(20), true);
    assert_eq!(get(s.metrics, "/healthz").0, 200);
    s.wait_for_log("not a regular file");
    assert_eq!(set_aside(&path, ".corrupt-").len(), 1, "{:?}", s.log());
    assert_eq!(s.stop(), Some(0), "{:#?}", s.log());
    let _ = std::fs::remove_dir_all(&dir);
}

#[test]
fn a_device_behind_the_state_path_is_refused_unread() {
    let dir = temp_dir("device");
    let path = dir.join("state");
    std::os::unix::fs::symlink("/dev/zero", &path).unwrap();
    let mut s = Service::start(Some(&path), &[]);
    s.wait_for_log("not a regular file");
    // Not a byte of /dev/zero held (reading it up to the size limit took a GiB).
    assert!(
        peak_rss(s.child.id()) < 256 << 20,
        "{}",
        peak_rss(s.child.id())
    );
    assert_eq!(s.stop(), Some(0), "{:#?}", s.log());
    let _ = std::fs::remove_dir_all(&dir);
}

#[test]
fn a_large_sparse_state_file_is_refused_without_being_held_in_memory() {
    let dir = temp_dir("sparse");
    let path = dir.join("state");
    // 1 GiB (within the default size limit) that claims to be a state file of format
    // version 1, which has no declared length and is still read: the right magic, and
    // a checksum that does not match its zeros.
    let len: u64 = 1 << 30;
    let file = std::fs::File::create(&path).unwrap();
    file.set_len(len).unwrap();
    let mut header = state::MAGIC.to_vec();
    header.extend_from_slice(&1u32.to_le_bytes());
    std::os::unix::fs::FileExt::write_all_at(&file, &header, 0).unwrap();
    std::os::unix::fs::FileExt::write_all_at(&file, &1u32.to_le_bytes(), len - 4).unwrap();
    drop(file);
    let mut s = Service::start(Some(&path), &[]);
    s.wait_for_log("checksum does not match");
    let peak = peak_rss(s.child.id());
    assert!(peak < 256 << 20, "peak RSS {peak} bytes: {:#?}", s.log());
    assert_eq!(set_aside(&path, ".corrupt-").len(), 1);
    assert_eq!(s.stop(), Some(0), "{:#?}", s.log());
    let _ = std::fs::remove_dir_all(&dir);
}

#[test]
fn a_failed_final_write_sets_the_stale_checkpoint_aside_and_names_the_os_error() {
    let dir = temp_dir("final");
    let path = dir.join("state");
    let env = [("FLOWMETRICS_STATE__CHECKPOINT_INTERVAL", "100ms")];
    let mut s = Service::start(Some(&path), &env);
    s.send(&events("start", 0..5));
    let give_up = Instant::now() + Duration::from_secs(20);
    while entries_in(&path) != Some(5) {
        assert!(Instant::now() < give_up, "no checkpoint with 5 entries");
        std::thread::sleep(Duration::from_millis(20));
    }
    // No file can grow past one byte any more (as on a full disk); then all five
    // complete, which no checkpoint can record.
    let one_byte = libc::rlimit {
        rlim_cur: 1,
        rlim_max: libc::RLIM_INFINITY,
    };
    // SAFETY: prlimit(2) on our own child, with a valid struct.
    let set = unsafe {
        libc::prlimit(
            s.child.id() as i32,
            libc::RLIMIT_FSIZE,
            &one_byte,
            std::ptr::null_mut(),
        )
    };
    assert_eq!(set, 0);
    s.send(&events("end", 0..5));
    assert_eq!(s.stop(), Some(0), "{:#?}", s.log());
    let log = s.log();
    assert!(
        log.iter()
            .any(|l| l.contains("cannot write the state file") && l.contains("File too large")),
        "{log:#?}"
    );
    assert!(
        !log.iter().any(|l| l.contains("serialize buffer")),
        "{log:#?}"
    );
    // The checkpoint still lists the five as open: not where the next run looks.
    assert!(!path.exists(), "{log:#?}");
    assert_eq!(set_aside(&path, ".stale-").len(), 1, "{log:#?}");

    let mut s = Service::start(Some(&path), &[]);
    let m = s.samples();
    assert_eq!(sum(&m, "flowmetrics_flows_restored_total"), 0.0, "{m:?}");
    assert_eq!(sum(&m, "flowmetrics_flows_in_progress"), 0.0, "{m:?}");
    assert_eq!(s.stop(), Some(0));
    let _ = std::fs::remove_dir_all(&dir);
}

#[test]
fn a_closed_stderr_neither_kills_the_service_nor_loses_the_state() {
    let dir = temp_dir("closed-stderr");
    let path = dir.join("state");
    let mut s = Service::start_with(command(Some(&path), &[]), Duration::from_secs(30), false);
    s.send(&events("start", 0..3));
    // Whatever read stderr is gone.
    drop(s.stderr.take());
    assert_eq!(get(s.metrics, "/healthz").0, 200);
    assert_eq!(s.stop(), Some(0));
    assert_eq!(entries_in(&path), Some(3));
    let _ = std::fs::remove_dir_all(&dir);
}

/// An export of `n` flow events without a correlation id: each is refused with a DEBUG
/// line of its own.
fn noisy_export(n: usize) -> String {
    let events: Vec<serde_json::Value> = (0..n)
        .map(|_| serde_json::json!({"name": "flow.checkout.start", "timeUnixNano": T0.to_string()}))
        .collect();
    serde_json::json!({"resourceSpans": [{"scopeSpans": [{"spans": [{
        "traceId": "0af7651916cd43dd8448eb211c80319c",
        "spanId": "b7ad6b7169203331",
        "name": "work",
        "startTimeUnixNano": T0.to_string(),
        "endTimeUnixNano": T0.to_string(),
        "events": events,
    }]}]}]})
    .to_string()
}

#[test]
fn a_stuck_stderr_reader_does_not_stall_the_service() {
    let dir = temp_dir("stuck-stderr");
    let path = dir.join("state");
    // Nobody reads stderr after the start-up lines: the pipe (64 KiB) fills within a
    // few hundred lines, then the log queue.
    let c = command(Some(&path), &[("RUST_LOG", "debug")]);
    let mut s = Service::start_with(c, Duration::from_secs(30), false);
    let noisy = noisy_export(1000);
    for i in 0..30 {
        let (status, body) = http(s.otlp, "POST", "/v1/traces", &noisy);
        assert_eq!(status, 200, "noisy export {i}: {body}");
        let (status, body) = get(s.metrics, "/healthz");
        assert_eq!(status, 200, "request {i}: {body}");
        let (status, body) = http(
            s.otlp,
            "POST",
            "/v1/traces",
            &export(&events("start", i..i + 1)),
        );
        assert_eq!(status, 200, "export {i}: {body}");
    }
    let m = s.samples();
    assert!(
        sum(&m, "flowmetrics_log_lines_dropped_total") > 10_000.0,
        "{m:?}"
    );
    assert_eq!(sum(&m, "flowmetrics_flows_started_total"), 30.0);
    assert_eq!(s.stop(), Some(0));
    assert_eq!(entries_in(&path), Some(30));
    let _ = std::fs::remove_dir_all(&dir);
}

#[test]
fn hup_usr1_and_usr2_are_logged_and_the_service_carries_on() {
    let dir = temp_dir("signals");
    let path = dir.join("state");
    let env = [("FLOWMETRICS_STATE__CHECKPOINT_INTERVAL", "1h")];
    let mut s = Service::start(Some(&path), &env);
    s.send(&events("start", 0..4));
    for (sig, name) in [
        (libc::SIGHUP, "SIGHUP"),
        (libc::SIGUSR1, "SIGUSR1"),
        (libc::SIGUSR2, "SIGUSR2"),
    ] {
        s.signal(sig);
        s.wait_for_log(name);
        assert_eq!(get(s.metrics, "/healthz").0, 200, "after {name}");
    }
    // SIGUSR1 wrote a checkpoint long before the hour was up.
    let give_up = Instant::now() + Duration::from_secs(10);
    while entries_in(&path) != Some(4) {
        assert!(Instant::now() < give_up, "SIGUSR1 wrote no checkpoint");
        std::thread::sleep(Duration::from_millis(20));
    }
    assert_eq!(s.stop(), Some(0), "{:#?}", s.log());
    let _ = std::fs::remove_dir_all(&dir);
}

#[test]
fn idle_connections_cannot_take_the_descriptors_the_state_needs() {
    let dir = temp_dir("fds");
    let path = dir.join("state");
    let mut c = command(Some(&path), &[]);
    // SAFETY: setrlimit only, between fork and exec.
    unsafe {
        c.pre_exec(|| {
            let limit = libc::rlimit {
                rlim_cur: 64,
                rlim_max: 64,
            };
            if libc::setrlimit(libc::RLIMIT_NOFILE, &limit) != 0 {
                return Err(std::io::Error::last_os_error());
            }
            Ok(())
        });
    }
    let mut s = Service::start_with(c, Duration::from_secs(30), true);
    s.send(&events("start", 0..3));
    // More idle connections to each port than the process has descriptors.
    let mut idle = Vec::new();
    for addr in [s.metrics, s.otlp] {
        for _ in 0..70 {
            idle.push(TcpStream::connect(addr).unwrap());
        }
    }
    std::thread::sleep(Duration::from_secs(3));
    // Scrapes and exports still get through (the idlest connections make room) ...
    let (status, body) = get(s.metrics, "/metrics");
    assert_eq!(status, 200, "{body}: {:#?}", s.log());
    let (status, body) = http(
        s.otlp,
        "POST",
        "/v1/traces",
        &export(&events("start", 3..4)),
    );
    assert_eq!(status, 200, "{body}");
    // ... the final write finds its descriptors ...
    assert_eq!(s.stop(), Some(0), "{:#?}", s.log());
    drop(idle);
    let log = s.log();
    assert_eq!(entries_in(&path), Some(4), "{log:#?}");
    // ... and a full accept queue is not a flood of warnings.
    let accept_failed = log.iter().filter(|l| l.contains("accept failed")).count();
    assert!(accept_failed <= 4, "{accept_failed} lines: {log:#?}");
    let _ = std::fs::remove_dir_all(&dir);
}
