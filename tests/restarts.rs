//! Restarts (docs/behaviour.md §3 "restarts", §7): the real binary over loopback, stopped with
//! SIGTERM or `kill -9` and started again on the same state file.

mod common;

use std::collections::BTreeMap;
use std::net::TcpStream;
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use common::assert_sums;
use common::process::Service;
use common::process::{command, entries_in, get, json_export, json_flow_event};
use common::sum_series as sum;

const SEC: u64 = 1_000_000_000;
/// Event timestamps: a fixed past instant, so durations are exact.
const T0: u64 = 1_700_000_000 * SEC;

/// A temporary directory of its own per test.
fn temp_dir(name: &str) -> PathBuf {
    common::process::temp_dir("restarts", name)
}

impl Service {
    /// The binary on the state file at `state`, ready.
    fn on(state: &Path, env: &[(&str, &str)]) -> Service {
        let s = Service::start_with(command(Some(state), env), Duration::from_secs(60), true);
        s.wait_ready();
        s
    }

    /// SIGTERM: it exits 0; its log.
    fn stopped(mut self) -> Vec<String> {
        let code = self.stop();
        let log = self.log();
        assert_eq!(code, Some(0), "{log:#?}");
        log
    }

    fn kill9(mut self) {
        self.signal(libc::SIGKILL);
        let _ = self.child.wait();
    }

    fn send(&self, events: &[(&str, &str, String, u64)]) {
        for chunk in events.chunks(2000) {
            self.post_traces(&export(chunk));
        }
    }
}

/// An OTLP/JSON trace export with one flow event per (flow, kind, id, timestamp).
fn export(events: &[(&str, &str, String, u64)]) -> String {
    let events = events
        .iter()
        .map(|(flow, kind, id, ts)| json_flow_event(flow, kind, id, *ts))
        .collect();
    json_export(Some("web"), T0, events)
}

fn starts(ids: std::ops::Range<u64>) -> Vec<(&'static str, &'static str, String, u64)> {
    ids.map(|i| ("checkout", "start", format!("id-{i}"), T0 + i * 1_000_000))
        .collect()
}

/// Instance i lasts 1 + i % 7 seconds.
fn ends(ids: std::ops::Range<u64>) -> Vec<(&'static str, &'static str, String, u64)> {
    ids.map(|i| {
        (
            "checkout",
            "end",
            format!("id-{i}"),
            T0 + i * 1_000_000 + (1 + i % 7) * SEC,
        )
    })
    .collect()
}

/// started + restored = Σ completed + incomplete + dropped + in_progress (docs/behaviour.md §3).
fn assert_invariant(s: &BTreeMap<String, f64>) {
    let f = "flow=\"checkout\"";
    let left = sum(s, "flowmetrics_flows_started_total", &[f])
        + sum(s, "flowmetrics_flows_restored_total", &[f]);
    let right = sum(s, "flowmetrics_flows_completed_total", &[f])
        + sum(
            s,
            "flowmetrics_flow_errors_total",
            &[f, "error_reason=\"incomplete\""],
        )
        + sum(s, "flowmetrics_flows_dropped_total", &[f])
        + sum(s, "flowmetrics_flows_in_progress", &[f]);
    assert_eq!(left, right, "invariant broken");
}

const F: &str = "flow=\"checkout\"";

#[test]
fn sigterm_and_restart_keep_ten_thousand_open_flows() {
    const N: u64 = 10_000;
    let dir = temp_dir("sigterm");
    let path = dir.join("state");
    let a = Service::on(&path, &[]);
    a.send(&starts(0..N));
    let before = a.samples();
    assert_eq!(
        sum(&before, "flowmetrics_flows_in_progress", &[F]),
        N as f64
    );
    let log = a.stopped();
    assert!(log.iter().any(|l| l.contains("state written")), "{log:#?}");
    assert_eq!(entries_in(&path), Some(N as usize));

    let b = Service::on(&path, &[]);
    let s = b.samples();
    assert_sums(
        &s,
        &[
            ("flowmetrics_flows_restored_total", &[F], N as f64),
            ("flowmetrics_flows_started_total", &[F], 0.0),
            ("flowmetrics_flows_in_progress", &[F], N as f64),
        ],
    );
    assert_invariant(&s);
    b.send(&ends(0..N));
    let s = b.samples();
    assert_sums(
        &s,
        &[
            (
                "flowmetrics_flows_completed_total",
                &[F, "outcome=\"success\""],
                N as f64,
            ),
            ("flowmetrics_flow_unmatched_ends_total", &[F], 0.0),
            ("flowmetrics_flows_in_progress", &[F], 0.0),
        ],
    );
    // Exact durations: from the two event timestamps, across the restart.
    let count = sum(&s, "flowmetrics_flow_duration_seconds_count", &[F]);
    let total = sum(&s, "flowmetrics_flow_duration_seconds_sum", &[F]);
    let expected: u64 = (0..N).map(|i| 1 + i % 7).sum();
    assert_eq!(count, N as f64);
    assert!(
        (total - expected as f64).abs() < 1e-6,
        "{total} != {expected}"
    );
    let up_to_5s = (0..N).filter(|i| i % 7 < 5).count() as f64; // 1 + i % 7 <= 5 s
    assert_eq!(
        sum(
            &s,
            "flowmetrics_flow_duration_seconds_bucket",
            &[F, "le=\"5.0\""]
        ),
        up_to_5s
    );
    assert_invariant(&s);
    b.stopped();
    let _ = std::fs::remove_dir_all(dir);
}

#[test]
fn a_start_retried_across_the_restart_counts_once() {
    let dir = temp_dir("retry");
    let path = dir.join("state");
    let a = Service::on(&path, &[]);
    a.send(&starts(0..100));
    // Completed before the restart: its retry must not open a new instance either.
    a.send(&ends(0..10));
    a.stopped();
    let b = Service::on(&path, &[]);
    b.send(&starts(0..100));
    b.send(&ends(0..10));
    let s = b.samples();
    assert_sums(
        &s,
        &[
            (
                "flowmetrics_flow_events_duplicate_total",
                &["kind=\"start\""],
                100.0,
            ),
            (
                "flowmetrics_flow_events_duplicate_total",
                &["kind=\"end\""],
                10.0,
            ),
            ("flowmetrics_flows_started_total", &[F], 0.0),
            ("flowmetrics_flows_restored_total", &[F], 90.0),
            ("flowmetrics_flows_in_progress", &[F], 90.0),
        ],
    );
    assert_invariant(&s);
    b.stopped();
    let _ = std::fs::remove_dir_all(dir);
}

#[test]
fn kill_9_loses_only_what_came_after_the_last_checkpoint() {
    const N: u64 = 10_000;
    const LATE: u64 = 500;
    let dir = temp_dir("kill9");
    let path = dir.join("state");
    let env = [("FLOWMETRICS_STATE__CHECKPOINT_INTERVAL", "2s")];
    let a = Service::on(&path, &env);
    a.send(&starts(0..N));
    // Wait for a checkpoint that holds all N (the file is replaced atomically).
    let give_up = Instant::now() + Duration::from_secs(20);
    while entries_in(&path) != Some(N as usize) {
        assert!(Instant::now() < give_up, "no checkpoint with {N} entries");
        std::thread::sleep(Duration::from_millis(10));
    }
    // Opened after that checkpoint, well before the next one (2 s later): lost.
    a.send(&starts(N..N + LATE));
    a.kill9();

    let b = Service::on(&path, &env);
    let s = b.samples();
    assert_eq!(sum(&s, "flowmetrics_flows_restored_total", &[F]), N as f64);
    b.send(&ends(0..N + LATE));
    let s = b.samples();
    assert_sums(
        &s,
        &[
            (
                "flowmetrics_flows_completed_total",
                &[F, "outcome=\"success\""],
                N as f64,
            ),
            ("flowmetrics_flows_in_progress", &[F], 0.0),
        ],
    );
    // The lost instances' ends wait for starts that this run never saw (moka's entry
    // count settles with its housekeeping).
    let give_up = Instant::now() + Duration::from_secs(5);
    while sum(&b.samples(), "flowmetrics_in_flight_entries", &[]) != LATE as f64 {
        assert!(
            Instant::now() < give_up,
            "{:?}",
            b.samples().get("flowmetrics_in_flight_entries")
        );
        std::thread::sleep(Duration::from_millis(20));
    }
    assert_invariant(&s);
    b.stopped();
    let _ = std::fs::remove_dir_all(dir);
}

#[test]
fn corrupt_truncated_and_foreign_state_files_are_set_aside() {
    let dir = temp_dir("corrupt");
    let path = dir.join("state");
    // A real state file to damage: one open instance.
    let a = Service::on(&path, &[]);
    a.send(&starts(0..1));
    a.stopped();
    let good = std::fs::read(&path).unwrap();
    let mut corrupt = good.clone();
    let mid = corrupt.len() / 2;
    corrupt[mid] ^= 0xff;
    let cases = [
        ("corrupt", corrupt),
        ("truncated", good[..good.len() - 7].to_vec()),
        ("foreign", b"checkpoint: yes\n".to_vec()),
    ];
    for (what, bytes) in cases {
        for old in std::fs::read_dir(&dir).unwrap() {
            std::fs::remove_file(old.unwrap().path()).unwrap();
        }
        std::fs::write(&path, &bytes).unwrap();
        let b = Service::on(&path, &[]);
        let s = b.samples();
        assert_eq!(
            sum(&s, "flowmetrics_flows_restored_total", &[]),
            0.0,
            "{what}"
        );
        let log = b.log.lock().unwrap().clone();
        assert!(
            log.iter()
                .any(|l| l.starts_with("WARN") && l.contains(path.to_str().unwrap())),
            "{what}: no WARN naming the file: {log:#?}"
        );
        let names: Vec<String> = std::fs::read_dir(&dir)
            .unwrap()
            .map(|e| e.unwrap().file_name().into_string().unwrap())
            .collect();
        let aside: Vec<_> = names
            .iter()
            .filter(|n| n.starts_with("state.corrupt-"))
            .collect();
        assert_eq!(aside.len(), 1, "{what}: {names:?}");
        assert_eq!(std::fs::read(dir.join(aside[0])).unwrap(), bytes, "{what}");
        // It runs, and writes a good file at the next stop.
        b.send(&starts(0..3));
        b.stopped();
        assert_eq!(entries_in(&path), Some(3), "{what}");
    }
    let _ = std::fs::remove_dir_all(dir);
}

#[test]
fn deadlines_that_passed_while_down_are_incomplete_at_start() {
    let dir = temp_dir("expired");
    let path = dir.join("state");
    let env = [("FLOWMETRICS_FLOWS__DEFAULT__TIMEOUT", "3s")];
    let a = Service::on(&path, &env);
    let sent = Instant::now();
    a.send(&starts(0..100));
    a.stopped();
    assert_eq!(entries_in(&path), Some(100), "stopped before the deadline");
    std::thread::sleep(
        (sent + Duration::from_millis(3500)).saturating_duration_since(Instant::now()),
    );
    let b = Service::on(&path, &env);
    let s = b.samples();
    assert_sums(
        &s,
        &[
            ("flowmetrics_flows_restored_total", &[F], 100.0),
            (
                "flowmetrics_flow_errors_total",
                &[F, "error_reason=\"incomplete\""],
                100.0,
            ),
            ("flowmetrics_flows_in_progress", &[F], 0.0),
        ],
    );
    assert_invariant(&s);
    b.stopped();
    let _ = std::fs::remove_dir_all(dir);
}

#[test]
fn a_scrape_during_final_scrape_wait_sees_the_last_counts() {
    let dir = temp_dir("final");
    let path = dir.join("state");
    let mut svc = Service::on(&path, &[("FLOWMETRICS_SHUTDOWN__FINAL_SCRAPE_WAIT", "3s")]);
    svc.send(&starts(0..100));
    let before = svc.samples();
    // Answered 200 after the last regular scrape.
    svc.send(&ends(0..100));
    let ok = "outcome=\"success\"";
    assert_eq!(
        sum(&before, "flowmetrics_flows_completed_total", &[F, ok]),
        0.0
    );
    svc.signal(libc::SIGTERM);
    let give_up = Instant::now() + Duration::from_secs(2);
    while get(svc.metrics, "/readyz").0 != 503 {
        assert!(Instant::now() < give_up, "/readyz still 200 after SIGTERM");
        std::thread::sleep(Duration::from_millis(10));
    }
    let stopped_at = Instant::now();
    let after = svc.samples();
    assert_eq!(
        sum(&after, "flowmetrics_flows_completed_total", &[F, ok]),
        100.0
    );
    assert_invariant(&after);
    // The OTLP listener is closed by then; /metrics is not.
    let give_up = Instant::now() + Duration::from_secs(2);
    while TcpStream::connect(svc.otlp).is_ok() {
        assert!(Instant::now() < give_up, "OTLP still accepting");
        std::thread::sleep(Duration::from_millis(10));
    }
    assert_eq!(get(svc.metrics, "/metrics").0, 200);
    let status = svc.child.wait().unwrap();
    assert_eq!(status.code(), Some(0));
    assert!(
        stopped_at.elapsed() >= Duration::from_secs(2),
        "exited before the wait"
    );
    let _ = std::fs::remove_dir_all(dir);
}

#[test]
fn a_changed_config_drops_untracked_flows_and_keeps_dims_by_label() {
    let dir = temp_dir("config");
    let path = dir.join("state");
    let (a_cfg, b_cfg) = (dir.join("a.yaml"), dir.join("b.yaml"));
    std::fs::write(
        &a_cfg,
        "dimensions:\n  - { label: service, attribute: service.name, default: unknown }\n",
    )
    .unwrap();
    std::fs::write(
        &b_cfg,
        "flows:\n  allow_unknown: false\n  per_flow:\n    checkout: { timeout: 10m }\n\
         dimensions:\n  - { label: tier, attribute: tier, default: none }\n\
         \x20 - { label: service, attribute: service.name, default: unknown }\n",
    )
    .unwrap();
    let a = Service::on(&path, &[("FLOWMETRICS_CONFIG", a_cfg.to_str().unwrap())]);
    a.send(&starts(0..10));
    let legacy: Vec<_> = (0..5)
        .map(|i| ("legacy", "start", format!("l-{i}"), T0))
        .collect();
    a.send(&legacy);
    a.stopped();
    let b = Service::on(&path, &[("FLOWMETRICS_CONFIG", b_cfg.to_str().unwrap())]);
    let s = b.samples();
    assert_eq!(
        sum(
            &s,
            "flowmetrics_flows_restored_total",
            &[F, "tier=\"none\"", "service=\"web\""]
        ),
        10.0,
        "{s:#?}"
    );
    let legacy = "flow=\"legacy\"";
    assert_sums(
        &s,
        &[
            ("flowmetrics_flows_restored_total", &[legacy], 5.0),
            (
                "flowmetrics_flows_dropped_total",
                &[legacy, "reason=\"config_changed\""],
                5.0,
            ),
            ("flowmetrics_flows_in_progress", &[legacy], 0.0),
            ("flowmetrics_flows_in_progress", &[F], 10.0),
        ],
    );
    assert_invariant(&s);
    b.send(&ends(0..10));
    let s = b.samples();
    assert_eq!(
        sum(
            &s,
            "flowmetrics_flows_completed_total",
            &[F, "outcome=\"success\"", "service=\"web\""]
        ),
        10.0
    );
    b.stopped();
    let _ = std::fs::remove_dir_all(dir);
}

#[test]
fn instances_overdue_at_shutdown_are_counted_by_exactly_one_run() {
    // A flow with a shorter timeout than the default: moka removes its instances by
    // the per-entry timer wheel, up to ~1 s after their deadline, and skips them when
    // it lists entries meanwhile. SIGTERM in that gap must neither lose them nor count
    // them twice.
    let dir = temp_dir("overdue");
    let path = dir.join("state");
    let env = [
        ("FLOWMETRICS_FLOWS__DEFAULT__TIMEOUT", "60s"),
        ("FLOWMETRICS_FLOWS__PER_FLOW__CHECKOUT__TIMEOUT", "1s"),
        ("FLOWMETRICS_SHUTDOWN__FINAL_SCRAPE_WAIT", "3s"),
    ];
    let mut a = Service::on(&path, &env);
    a.send(&starts(0..100));
    std::thread::sleep(Duration::from_millis(1200));
    a.signal(libc::SIGTERM);
    // The final scrape (after the state is written) has this run's last counts.
    let give_up = Instant::now() + Duration::from_secs(3);
    while TcpStream::connect(a.otlp).is_ok() {
        assert!(Instant::now() < give_up, "OTLP still accepting");
        std::thread::sleep(Duration::from_millis(10));
    }
    let give_up = Instant::now() + Duration::from_secs(3);
    while entries_in(&path).is_none() {
        assert!(Instant::now() < give_up, "no state file");
        std::thread::sleep(Duration::from_millis(10));
    }
    // The file is renamed into place only when written in full; the counts of what was
    // due are settled before it is written.
    let last = a.samples();
    assert_eq!(a.child.wait().unwrap().code(), Some(0));
    let incomplete = |s: &BTreeMap<String, f64>| {
        sum(
            s,
            "flowmetrics_flow_errors_total",
            &[F, "error_reason=\"incomplete\""],
        )
    };
    let in_file = entries_in(&path).expect("a state file") as f64;
    assert_eq!(incomplete(&last) + in_file, 100.0, "counted now or saved");
    let b = Service::on(&path, &env);
    let s = b.samples();
    assert_eq!(sum(&s, "flowmetrics_flows_restored_total", &[F]), in_file);
    assert_eq!(
        incomplete(&last) + incomplete(&s),
        100.0,
        "each instance counted once over both runs"
    );
    assert_invariant(&s);
    b.stopped();
    let _ = std::fs::remove_dir_all(dir);
}
