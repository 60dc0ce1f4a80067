//! The process around the service, through the real binary on loopback: what its state
//! file may be, signals, a stderr nobody reads, and a low open-file limit.

mod common;

use std::collections::BTreeMap;
use std::net::TcpStream;
use std::os::unix::process::CommandExt as _;
use std::path::Path;
use std::time::{Duration, Instant};

use common::process::Service;
use common::process::{command, entries_in, get, http, json_export, json_flow_event};
use common::sum_series;
use flowmetrics::flows::state;

const SEC: u64 = 1_000_000_000;
const T0: u64 = 1_700_000_000 * SEC;

fn temp_dir(name: &str) -> std::path::PathBuf {
    common::process::temp_dir("process", name)
}

impl Service {
    fn send(&self, events: &[(&str, String, u64)]) {
        self.post_traces(&export(events));
    }
}

fn sum(samples: &BTreeMap<String, f64>, name: &str) -> f64 {
    sum_series(samples, name, &[])
}

/// An OTLP/JSON trace export with one `checkout` flow event per (kind, id, timestamp).
fn export(events: &[(&str, String, u64)]) -> String {
    let events = events
        .iter()
        .map(|(kind, id, ts)| json_flow_event("checkout", kind, id, *ts))
        .collect();
    json_export(None, T0, events)
}

fn events(kind: &'static str, ids: std::ops::Range<u64>) -> Vec<(&'static str, String, u64)> {
    ids.map(|i| (kind, format!("id-{i}"), T0 + i * SEC))
        .collect()
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
    json_export(None, T0, events)
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
