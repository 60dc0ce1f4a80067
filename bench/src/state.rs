//! `--only state`: the state file (docs/behaviour.md §3 "restarts"). Time to snapshot and write it,
//! to read and restore it, its size per open instance, and what a checkpoint costs the
//! ingest that goes on meanwhile, at a store holding many open instances.

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use flowmetrics::flows::event::{DimValues, EventKind, FlowEvent, Outcome, Source};
use flowmetrics::flows::state;
use flowmetrics::flows::{FlowSink, MemoryStore, Report, RestoreRules, StoreSettings};

use crate::load::percentile;

struct Null;

impl FlowSink for Null {
    fn report(&self, _: Report<'_>) {}
}

fn store(capacity: u64) -> MemoryStore {
    MemoryStore::new(
        StoreSettings {
            capacity,
            dedup_window: Duration::from_secs(300),
            timeout_for: Arc::new(|_| Duration::from_secs(1800)),
            longest_timeout: Duration::from_secs(1800),
            step_flows: Vec::new(),
        },
        Arc::new(Null),
    )
}

fn event(i: u64, kind: EventKind, dims: &[DimValues], flows: &[Arc<str>]) -> FlowEvent<'static> {
    FlowEvent {
        flow: flows[(i % 10) as usize].clone(),
        correlation_id: format!("order-{i:012}").into(),
        kind,
        timestamp_nanos: 1_750_000_000_000_000_000 + i * 1000,
        dims: dims[(i % 10) as usize].clone(),
        trace: None,
        source: Source::SpanEvent,
        step: None,
    }
}

fn ms(d: Duration) -> f64 {
    d.as_secs_f64() * 1e3
}

/// Prints one line per measurement; returns them as JSON rows too.
pub fn run(quick: bool) -> Vec<serde_json::Value> {
    let sizes: &[u64] = if quick {
        &[10_000, 100_000]
    } else {
        &[100_000, 1_000_000]
    };
    let flows: Vec<Arc<str>> = (0..10).map(|i| Arc::from(format!("flow_{i}"))).collect();
    let dims: Vec<DimValues> = (0..10)
        .map(|i| Arc::from(vec![Arc::from(format!("service-{i}"))]))
        .collect();
    let dir = std::env::temp_dir().join(format!("fm-bench-state-{}", std::process::id()));
    let path = dir.join("state");
    let labels = (vec!["service".to_string()], vec![]);
    let mut rows = Vec::new();
    for &n in sizes {
        let s = Arc::new(store(n * 2));
        for i in 0..n {
            s.apply(event(i, EventKind::Start, &dims, &flows));
        }
        let t = Instant::now();
        let snap = s.snapshot_now();
        let snapshot_ms = ms(t.elapsed());
        let t = Instant::now();
        let bytes = state::write(&path, &snap).expect("write state");
        let write_ms = ms(t.elapsed());
        drop(snap);
        let t = Instant::now();
        let read = state::read(&path, u64::MAX).expect("read").expect("file");
        let read_ms = ms(t.elapsed());
        let mut fresh = store(n * 2);
        let t = Instant::now();
        let summary = fresh.restore(read, &RestoreRules::default());
        let restore_ms = ms(t.elapsed());
        assert_eq!(summary.open, n);
        drop(fresh);
        let per = bytes as f64 / n as f64;
        println!(
            "state {n} open: snapshot {snapshot_ms:.0} ms + write {write_ms:.0} ms, read {read_ms:.0} ms \
             + restore {restore_ms:.0} ms, {bytes} bytes ({per:.1} B/instance, incl. fingerprints)"
        );
        rows.push(serde_json::json!({
            "id": format!("state_{n}"), "open": n, "snapshot_ms": snapshot_ms,
            "write_ms": write_ms, "read_ms": read_ms, "restore_ms": restore_ms,
            "bytes": bytes, "bytes_per_instance": per,
        }));
        if n == *sizes.last().unwrap() {
            rows.push(stall(&s, n, &path, &labels, &dims, &flows));
        }
    }
    let _ = std::fs::remove_dir_all(dir);
    rows
}

/// One thread applies exports of 100 events (50 starts, 50 ends of new instances) as
/// fast as it can; latency per export without a checkpoint, then while checkpoints run
/// back to back on another thread.
fn stall(
    s: &Arc<MemoryStore>,
    n: u64,
    path: &std::path::Path,
    labels: &(Vec<String>, Vec<String>),
    dims: &[DimValues],
    flows: &[Arc<str>],
) -> serde_json::Value {
    let mut next = n;
    let mut measure = |until: &dyn Fn() -> bool| {
        let mut lat = Vec::new();
        let began = Instant::now();
        while !until() {
            let t = Instant::now();
            for i in next..next + 50 {
                s.apply(event(i, EventKind::Start, dims, flows));
            }
            for i in next..next + 50 {
                s.apply(event(i, EventKind::End(Outcome::Success), dims, flows));
            }
            next += 50;
            lat.push(t.elapsed().as_secs_f64() * 1e6);
        }
        let secs = began.elapsed().as_secs_f64();
        lat.sort_by(f64::total_cmp);
        let rate = lat.len() as f64 * 100.0 / secs;
        (rate, lat)
    };
    let quiet_until = Instant::now() + Duration::from_secs(3);
    let (quiet_rate, quiet) = measure(&|| Instant::now() >= quiet_until);
    let done = Arc::new(AtomicBool::new(false));
    let writer = {
        let (s, path, labels, done) = (s.clone(), path.to_path_buf(), labels.clone(), done.clone());
        std::thread::spawn(move || {
            let mut took = Vec::new();
            for _ in 0..3 {
                let saved = state::save(&*s, &path, &labels)
                    .expect("save")
                    .expect("saved");
                took.push(ms(saved.took));
            }
            done.store(true, Ordering::Release);
            took
        })
    };
    let (busy_rate, busy) = measure(&|| done.load(Ordering::Acquire));
    let took = writer.join().unwrap();
    let p = |v: &[f64], q| percentile(v, q);
    println!(
        "checkpoint stall at {n} open: ingest {quiet_rate:.0} events/s quiet, {busy_rate:.0} during \
         checkpoints ({took:.0?} ms each); export of 100 events p50 {:.0}/{:.0} us, p99 {:.0}/{:.0} us, \
         p99.9 {:.0}/{:.0} us, max {:.0}/{:.0} us (quiet/during)",
        p(&quiet, 0.5),
        p(&busy, 0.5),
        p(&quiet, 0.99),
        p(&busy, 0.99),
        p(&quiet, 0.999),
        p(&busy, 0.999),
        quiet.last().copied().unwrap_or(0.0),
        busy.last().copied().unwrap_or(0.0),
    );
    serde_json::json!({
        "id": "state_checkpoint_stall", "open": n, "checkpoint_ms": took,
        "events_per_sec_quiet": quiet_rate, "events_per_sec_during": busy_rate,
        "export_us_p99_quiet": p(&quiet, 0.99), "export_us_p99_during": p(&busy, 0.99),
        "export_us_max_quiet": quiet.last(), "export_us_max_during": busy.last(),
    })
}
