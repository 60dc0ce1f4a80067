//! The real `flowmetrics` binary as a child process, pinned to one core, killed when the
//! guard drops (also on panic, and by the kernel if the harness dies first).

use std::fs;
use std::io::Read;
use std::net::{SocketAddr, TcpListener};
use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use bytes::Bytes;
use http_body_util::{BodyExt, Full};
use hyper::Request;
use hyper_util::rt::TokioIo;

/// Core the server is pinned to; the load generator takes the other one.
pub const SERVER_CPU: usize = 0;
pub const LOAD_CPU: usize = 1;

pub struct Server {
    child: Child,
    pub pid: u32,
    pub http: SocketAddr,
    pub grpc: SocketAddr,
    pub metrics: SocketAddr,
    config_path: PathBuf,
    log_path: PathBuf,
}

fn free_port() -> std::io::Result<SocketAddr> {
    TcpListener::bind("127.0.0.1:0")?.local_addr()
}

/// Pins the calling thread (or, before exec, the process) to one CPU.
pub fn pin_to_cpu(cpu: usize) -> bool {
    let cpus = std::thread::available_parallelism().map_or(1, |n| n.get());
    if cpu >= cpus.max(1) && cpu != 0 {
        return false;
    }
    // SAFETY: plain syscalls on a zeroed cpu_set_t owned by this frame.
    unsafe {
        let mut set: libc::cpu_set_t = std::mem::zeroed();
        libc::CPU_SET(cpu, &mut set);
        libc::sched_setaffinity(0, std::mem::size_of::<libc::cpu_set_t>(), &set) == 0
    }
}

static NEXT_ID: std::sync::atomic::AtomicU32 = std::sync::atomic::AtomicU32::new(0);

impl Server {
    /// Starts `binary` with the YAML `config` (listen addresses come from the
    /// environment) and waits until `/readyz` answers.
    pub fn start(binary: &Path, config: &str) -> Result<Server, String> {
        Self::start_with(binary, &[], config)
    }

    /// [`Server::start`], with `args` before `--config`.
    pub fn start_with(binary: &Path, args: &[&str], config: &str) -> Result<Server, String> {
        let (http, grpc, metrics) = (
            free_port().map_err(|e| e.to_string())?,
            free_port().map_err(|e| e.to_string())?,
            free_port().map_err(|e| e.to_string())?,
        );
        let n = NEXT_ID.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        let stem =
            std::env::temp_dir().join(format!("flowmetrics-bench-{}-{n}", std::process::id()));
        let config_path = stem.with_extension("yaml");
        let log_path = stem.with_extension("log");
        fs::write(&config_path, config).map_err(|e| format!("{}: {e}", config_path.display()))?;
        let log = fs::File::create(&log_path).map_err(|e| e.to_string())?;
        let mut command = Command::new(binary);
        command
            .args(args)
            .arg("--config")
            .arg(&config_path)
            .env("FLOWMETRICS_LISTEN__OTLP_HTTP", http.to_string())
            .env("FLOWMETRICS_LISTEN__OTLP_GRPC", grpc.to_string())
            .env("FLOWMETRICS_LISTEN__METRICS", metrics.to_string())
            .env_remove("RUST_LOG")
            .env_remove("FLOWMETRICS_CONFIG")
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(log);
        // SAFETY: only async-signal-safe syscalls between fork and exec.
        unsafe {
            command.pre_exec(|| {
                // Same as `taskset -c 0`: the whole server (every thread) on one core.
                let mut set: libc::cpu_set_t = std::mem::zeroed();
                libc::CPU_SET(SERVER_CPU, &mut set);
                libc::sched_setaffinity(0, std::mem::size_of::<libc::cpu_set_t>(), &set);
                // Dies with the harness even if the harness is killed.
                libc::prctl(libc::PR_SET_PDEATHSIG, libc::SIGKILL);
                Ok(())
            });
        }
        let child = command
            .spawn()
            .map_err(|e| format!("cannot start {}: {e}", binary.display()))?;
        let server = Server {
            pid: child.id(),
            child,
            http,
            grpc,
            metrics,
            config_path,
            log_path,
        };
        let deadline = Instant::now() + Duration::from_secs(15);
        loop {
            if let Ok((200, _)) = http_get(server.metrics, "/readyz") {
                return Ok(server);
            }
            if Instant::now() > deadline {
                return Err(format!(
                    "server not ready after 15 s; log:\n{}",
                    server.log()
                ));
            }
            std::thread::sleep(Duration::from_millis(20));
        }
    }

    pub fn log(&self) -> String {
        let mut s = String::new();
        if let Ok(mut f) = fs::File::open(&self.log_path) {
            let _ = f.read_to_string(&mut s);
        }
        s
    }

    pub fn rss_bytes(&self) -> u64 {
        rss_bytes(self.pid)
    }

    pub fn scrape(&self) -> String {
        http_get(self.metrics, "/metrics")
            .map(|(_, body)| body)
            .unwrap_or_default()
    }
}

impl Drop for Server {
    fn drop(&mut self) {
        // SIGTERM first (the service drains and exits 0; profilers get to write their
        // output), SIGKILL if it is still there after 5 s.
        // SAFETY: kill(2) on our own child's pid.
        unsafe {
            libc::kill(self.pid as libc::pid_t, libc::SIGTERM);
        }
        let deadline = Instant::now() + Duration::from_secs(5);
        while Instant::now() < deadline {
            if let Ok(Some(_)) = self.child.try_wait() {
                break;
            }
            std::thread::sleep(Duration::from_millis(20));
        }
        let _ = self.child.kill();
        let _ = self.child.wait();
        let _ = fs::remove_file(&self.config_path);
        let _ = fs::remove_file(&self.log_path);
    }
}

/// VmRSS of a process, in bytes.
pub fn rss_bytes(pid: u32) -> u64 {
    fs::read_to_string(format!("/proc/{pid}/status"))
        .ok()
        .and_then(|s| {
            s.lines()
                .find(|l| l.starts_with("VmRSS:"))
                .and_then(|l| l.split_whitespace().nth(1))
                .and_then(|kb| kb.parse::<u64>().ok())
        })
        .map_or(0, |kb| kb * 1024)
}

/// User + system CPU time of a process, in seconds.
pub fn cpu_secs(pid: u32) -> f64 {
    let Ok(stat) = fs::read_to_string(format!("/proc/{pid}/stat")) else {
        return 0.0;
    };
    let Some(rest) = stat.rsplit_once(')').map(|(_, r)| r) else {
        return 0.0;
    };
    // After the command name: state is field 3; utime and stime are fields 14 and 15.
    let fields: Vec<&str> = rest.split_whitespace().collect();
    let ticks: u64 = fields
        .get(11..13)
        .map(|f| f.iter().filter_map(|v| v.parse::<u64>().ok()).sum())
        .unwrap_or(0);
    // SAFETY: sysconf has no preconditions.
    let hz = unsafe { libc::sysconf(libc::_SC_CLK_TCK) }.max(1) as f64;
    ticks as f64 / hz
}

/// CPU time of the calling thread, in seconds.
pub fn thread_cpu_secs() -> f64 {
    // SAFETY: getrusage writes into the zeroed struct we own.
    unsafe {
        let mut usage: libc::rusage = std::mem::zeroed();
        if libc::getrusage(libc::RUSAGE_THREAD, &mut usage) != 0 {
            return 0.0;
        }
        let t = |tv: libc::timeval| tv.tv_sec as f64 + tv.tv_usec as f64 / 1e6;
        t(usage.ru_utime) + t(usage.ru_stime)
    }
}

/// A blocking GET on a fresh connection, from a small runtime of its own.
pub fn http_get(addr: SocketAddr, path: &str) -> Result<(u16, String), String> {
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .map_err(|e| e.to_string())?;
    rt.block_on(async {
        tokio::time::timeout(Duration::from_secs(10), get_async(addr, path))
            .await
            .map_err(|_| "timed out".to_string())?
    })
}

pub async fn get_async(addr: SocketAddr, path: &str) -> Result<(u16, String), String> {
    let stream = tokio::net::TcpStream::connect(addr)
        .await
        .map_err(|e| e.to_string())?;
    let (mut sender, conn) = hyper::client::conn::http1::handshake(TokioIo::new(stream))
        .await
        .map_err(|e| e.to_string())?;
    tokio::spawn(conn);
    let req = Request::get(path)
        .header("host", addr.to_string())
        .body(Full::new(Bytes::new()))
        .map_err(|e| e.to_string())?;
    let resp = sender.send_request(req).await.map_err(|e| e.to_string())?;
    let status = resp.status().as_u16();
    let body = resp
        .into_body()
        .collect()
        .await
        .map_err(|e| e.to_string())?
        .to_bytes();
    Ok((status, String::from_utf8_lossy(&body).into_owned()))
}

/// Sum of every sample of `name` in an OpenMetrics/Prometheus text body.
pub fn metric_sum(body: &str, name: &str) -> f64 {
    metric_sum_where(body, name, "")
}

/// Sum of the samples of `name` whose label set contains `label_filter`.
pub fn metric_sum_where(body: &str, name: &str, label_filter: &str) -> f64 {
    body.lines()
        .filter_map(|line| {
            let rest = line.strip_prefix(name)?;
            let value_part = if let Some(labels) = rest.strip_prefix('{') {
                let (labels, after) = labels.split_once('}')?;
                if !labels.contains(label_filter) {
                    return None;
                }
                after
            } else if rest.starts_with(' ') && label_filter.is_empty() {
                rest
            } else {
                return None;
            };
            value_part.split_whitespace().next()?.parse::<f64>().ok()
        })
        .sum()
}
