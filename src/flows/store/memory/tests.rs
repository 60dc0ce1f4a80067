//! The moka store's rules: pairing, time-outs, evictions, retries, races with moka's
//! own removals, and restarts.

use super::*;
use crate::flows::event::{Outcome, Source};
use crate::flows::store::{RestoreRules, RestoreSummary};
use std::collections::BTreeMap;

/// Counts what the store reports, per flow.
#[derive(Default)]
struct Recorder {
    counts: Mutex<BTreeMap<(String, String), i64>>,
    durations: Mutex<Vec<f64>>,
}

impl Recorder {
    fn get(&self, flow: &str, what: &str) -> i64 {
        *self
            .counts
            .lock()
            .unwrap()
            .get(&(flow.to_string(), what.to_string()))
            .unwrap_or(&0)
    }
    fn add(&self, flow: &str, what: &str) {
        *self
            .counts
            .lock()
            .unwrap()
            .entry((flow.to_string(), what.to_string()))
            .or_default() += 1;
    }
    /// started = Σ completed + incomplete + dropped + in_progress, with
    /// in_progress = opened − closed.
    /// Asserts counts of `flow`, written `what=n` separated by spaces.
    fn expect(&self, flow: &str, counts: &str) {
        for pair in counts.split(' ') {
            let (what, n) = pair.split_once('=').expect("what=n");
            let n: i64 = n.parse().expect("a count");
            let got = match what {
                "in_progress" => self.in_progress(flow),
                what => self.get(flow, what),
            };
            assert_eq!(got, n, "{flow}: {what}");
        }
    }

    fn counts<const N: usize>(&self, flow: &str, what: [&str; N]) -> [i64; N] {
        what.map(|w| self.get(flow, w))
    }

    fn in_progress(&self, flow: &str) -> i64 {
        self.get(flow, "started")
            - self.get(flow, "success")
            - self.get(flow, "failure")
            - self.get(flow, "cancelled")
            - self.get(flow, "incomplete")
            - self.get(flow, "dropped")
    }
}

impl FlowSink for Recorder {
    fn report(&self, report: Report<'_>) {
        match report {
            Report::Opened { flow, .. } => self.add(flow, "started"),
            // The invariant counts restored with started.
            Report::Restored { flow, .. } => {
                self.add(flow, "started");
                self.add(flow, "restored");
            }
            Report::Discarded { flow, .. } => {
                self.add(flow, "started");
                self.add(flow, "dropped");
                self.add(flow, "discarded");
            }
            Report::Completed {
                flow,
                end,
                duration_secs,
                ..
            } => {
                self.add(flow, end.outcome.as_str());
                if end.outcome == Outcome::Success {
                    self.durations.lock().unwrap().push(duration_secs);
                }
            }
            Report::TimedOut { flow, .. } => self.add(flow, "incomplete"),
            Report::Dropped { flow, .. } => self.add(flow, "dropped"),
            Report::Unmatched { flow, .. } => self.add(flow, "unmatched"),
            Report::Duplicate { kind } => self.add("*", &format!("dup_{}", kind.label())),
            Report::StepReached { flow, step, .. } => self.add(flow, &format!("step_{step}")),
            Report::StepUnmatched { flow, reason } => {
                self.add(flow, &format!("step_unmatched_{}", reason.label()));
            }
            Report::Overdue { .. } => {}
        }
    }
}

fn table_with(
    timeout: Duration,
    capacity: u64,
    dedup: Duration,
) -> (Arc<MemoryStore>, Arc<Recorder>) {
    let rec = Arc::new(Recorder::default());
    let table = MemoryStore::new(
        StoreSettings {
            capacity,
            dedup_window: dedup,
            timeout_for: Arc::new(move |_| timeout),
            longest_timeout: timeout,
            step_flows: Vec::new(),
        },
        rec.clone(),
    );
    (Arc::new(table), rec)
}

/// Flow "short" times out after `short`, every other flow after ten minutes.
fn table_with_short_flow(capacity: u64, short: Duration) -> (Arc<MemoryStore>, Arc<Recorder>) {
    let rec = Arc::new(Recorder::default());
    let table = MemoryStore::new(
        StoreSettings {
            capacity,
            dedup_window: Duration::from_secs(300),
            longest_timeout: Duration::from_secs(600),
            step_flows: Vec::new(),
            timeout_for: Arc::new(move |flow| {
                if flow == "short" {
                    short
                } else {
                    Duration::from_secs(600)
                }
            }),
        },
        rec.clone(),
    );
    (Arc::new(table), rec)
}

/// Applies `event(thread, i)` for i in 0..n from each of `threads` threads at once;
/// returns when all are done.
fn on_threads(
    t: &Arc<MemoryStore>,
    threads: u64,
    n: u64,
    event: fn(u64, u64) -> FlowEvent<'static>,
) {
    let handles: Vec<_> = (0..threads)
        .map(|thread| {
            let t = t.clone();
            std::thread::spawn(move || {
                for i in 0..n {
                    t.apply(event(thread, i));
                }
            })
        })
        .collect();
    for h in handles {
        h.join().unwrap();
    }
}

/// Waits until instances of `table_with_short_flow(_, 100 ms)` made just before are
/// due and their batches have expired (the deadline plus at most one 50 ms window),
/// with room to spare.
fn past_the_short_batches() {
    std::thread::sleep(Duration::from_millis(250));
}

/// Runs the housekeeping `rounds` times, 20 ms apart.
fn keep_house(t: &MemoryStore, rounds: u32) {
    for _ in 0..rounds {
        t.run_pending_tasks();
        std::thread::sleep(Duration::from_millis(20));
    }
}

fn table(timeout: Duration) -> (Arc<MemoryStore>, Arc<Recorder>) {
    table_with(timeout, 1000, Duration::from_secs(300))
}

/// A store holding instance "1" of `flow` 50 ms past its deadline, with no
/// housekeeping run since, when an event of `kind` at `secs` comes: "short" expires by
/// its per-entry deadline (the timer wheel), any other flow by the store's time-to-live.
fn past_its_deadline_then(
    flow: &str,
    kind: EventKind,
    secs: u64,
) -> (Arc<MemoryStore>, Arc<Recorder>) {
    let (t, rec) = if flow == "short" {
        table_with_short_flow(1000, Duration::from_millis(100))
    } else {
        table(Duration::from_millis(100))
    };
    t.apply(ev(flow, "1", START, SEC));
    std::thread::sleep(Duration::from_millis(150));
    t.apply(ev(flow, "1", kind, secs * SEC));
    (t, rec)
}

fn ev(flow: &str, id: &str, kind: EventKind, ts: u64) -> FlowEvent<'static> {
    FlowEvent {
        flow: Arc::from(flow),
        correlation_id: id.to_owned().into(),
        kind,
        timestamp_nanos: ts,
        dims: Arc::from(Vec::new()),
        trace: None,
        source: Source::SpanEvent,
        step: None,
    }
}

const START: EventKind = EventKind::Start;
const OK: EventKind = EventKind::End(Outcome::Success);
const FAIL: EventKind = EventKind::End(Outcome::Failure);
const CANCEL: EventKind = EventKind::End(Outcome::Cancelled);
const SEC: u64 = 1_000_000_000;

/// Waits (bounded) for a timeout to be reported, driving housekeeping as the service
/// does.
fn settle_expiries(t: &MemoryStore, rec: &Recorder, until: impl Fn(&Recorder) -> bool) {
    let give_up = Instant::now() + Duration::from_secs(5);
    while !until(rec) && Instant::now() < give_up {
        t.run_pending_tasks();
        std::thread::sleep(Duration::from_millis(20));
    }
}

fn rules() -> RestoreRules {
    RestoreRules::default()
}

/// A fresh store of the same shape, with the snapshot read back (through the file
/// format, as at a restart).
fn restarted(
    snap: StoreSnapshot,
    timeout: Duration,
    rules: &RestoreRules,
) -> (Arc<MemoryStore>, Arc<Recorder>, RestoreSummary) {
    let mut bytes = Vec::new();
    crate::flows::state::encode(&snap, &mut bytes).unwrap();
    let snap = crate::flows::state::decode(&bytes).unwrap();
    let rec = Arc::new(Recorder::default());
    let mut t = MemoryStore::new(
        StoreSettings {
            capacity: 1000,
            dedup_window: Duration::from_secs(300),
            timeout_for: Arc::new(move |_| timeout),
            longest_timeout: timeout,
            step_flows: Vec::new(),
        },
        rec.clone(),
    );
    let summary = t.restore(snap, rules);
    (Arc::new(t), rec, summary)
}

#[test]
fn a_restored_store_carries_on_as_if_nothing_happened() {
    let (t, _rec) = table(Duration::from_secs(60));
    t.apply(ev("o", "1", START, 10 * SEC));
    t.apply(ev("o", "2", START, 20 * SEC));
    t.apply(ev("o", "w", OK, 30 * SEC));
    let done = [ev("o", "3", START, 5 * SEC), ev("o", "3", OK, 6 * SEC)];
    for e in done.clone() {
        t.apply(e);
    }
    let snap = t.snapshot_now();
    assert_eq!(snap.entries.len(), 3);
    let (t2, rec, summary) = restarted(snap, Duration::from_secs(60), &rules());
    assert_eq!((summary.open, summary.waiting, summary.expired), (2, 1, 0));
    assert_eq!(rec.get("o", "restored"), 2);
    assert_eq!(rec.in_progress("o"), 2);
    // Retries of events handled before the restart are duplicates.
    t2.apply(ev("o", "1", START, 10 * SEC));
    for e in done {
        t2.apply(e);
    }
    assert_eq!(rec.counts("*", ["dup_start", "dup_end"]), [2, 1]);
    t2.apply(ev("o", "1", OK, 12 * SEC));
    t2.apply(ev("o", "2", FAIL, 21 * SEC));
    t2.apply(ev("o", "w", START, 27 * SEC));
    assert_eq!(rec.counts("o", ["success", "failure"]), [2, 1]);
    assert_eq!(*rec.durations.lock().unwrap(), vec![2.0, 3.0]);
    assert_eq!(rec.get("o", "unmatched"), 0);
    assert_eq!(rec.in_progress("o"), 0);
}

#[test]
fn the_final_snapshot_counts_what_is_overdue_and_leaves_the_rest_to_the_next_run() {
    // Per-entry deadlines (a flow shorter than another) are removed by moka's timer
    // wheel up to ~1 s late, and its iterator skips them meanwhile: without the
    // settling, these would be in neither the file nor the counts.
    let (t, rec) = table_with_short_flow(10_000, Duration::from_millis(100));
    for i in 0..200 {
        t.apply(ev("short", &i.to_string(), START, SEC));
        t.apply(ev("long", &i.to_string(), START, SEC));
    }
    t.apply(ev("short", "waiting", OK, SEC));
    std::thread::sleep(Duration::from_millis(250));
    let snap = t.final_snapshot().expect("a snapshot");
    assert_eq!(rec.counts("short", ["incomplete", "unmatched"]), [200, 1]);
    assert_eq!(snap.entries.len(), 200, "only the long flow's instances");
    assert_eq!(rec.get("long", "incomplete"), 0);
    // Entries of the file that expire now are the next run's: not counted here.
    let (t2, rec2) = table_with_short_flow(10_000, Duration::from_millis(100));
    for i in 0..50 {
        t2.apply(ev("short", &i.to_string(), START, SEC));
    }
    let snap2 = t2.final_snapshot().expect("a snapshot");
    assert_eq!(snap2.entries.len(), 50);
    // Long enough for the timer wheel to pass their deadlines.
    let until = Instant::now() + Duration::from_millis(1300);
    while Instant::now() < until {
        t2.run_pending_tasks();
        std::thread::sleep(Duration::from_millis(20));
    }
    assert_eq!(t2.entries(), 0, "the timer wheel removed them");
    assert_eq!(rec2.get("short", "incomplete"), 0, "counted twice");
}

#[test]
fn deadlines_that_passed_while_down_are_counted_at_once() {
    let (t, _rec) = table(Duration::from_secs(60));
    t.apply(ev("o", "1", START, SEC));
    t.apply(ev("o", "w", OK, SEC));
    t.apply(ev("o", "live", START, SEC));
    let mut snap = t.snapshot_now();
    for e in &mut snap.entries {
        if e.key != t.key("o", "live").to_be_bytes() {
            e.deadline_unix_nanos = snap.saved_at_unix_nanos - SEC;
        }
    }
    let (t2, rec, summary) = restarted(snap, Duration::from_secs(60), &rules());
    assert_eq!(
        (summary.open, summary.expired, summary.expired_ends),
        (1, 1, 1)
    );
    assert_eq!(rec.counts("o", ["incomplete", "unmatched"]), [1, 1]);
    assert_eq!(rec.in_progress("o"), 1);
    t2.run_pending_tasks();
    assert_eq!(t2.entries(), 1);
}

#[test]
fn a_shorter_timeout_applies_from_the_restart_on() {
    let (t, _rec) = table(Duration::from_secs(600));
    t.apply(ev("o", "1", START, SEC));
    let (t2, rec, _) = restarted(t.snapshot_now(), Duration::from_millis(100), &rules());
    settle_expiries(&t2, &rec, |r| r.get("o", "incomplete") > 0);
    assert_eq!(rec.get("o", "incomplete"), 1);
    assert_eq!(rec.in_progress("o"), 0);
}

#[test]
fn changed_config_drops_untracked_flows_and_matches_dims_by_label() {
    let (t, _rec) = table(Duration::from_secs(60));
    let mut e = ev("kept", "1", START, SEC);
    e.dims = Arc::from(vec![Arc::from("web"), Arc::from("eu")]);
    t.apply(e);
    t.apply(ev("gone", "1", START, SEC));
    t.apply(ev("gone", "w", OK, SEC));
    let mut snap = t.snapshot_now();
    snap.start_dim_labels = vec!["service".into(), "region".into()];
    let rules = RestoreRules {
        known_flows: Some(Arc::new(["kept".to_string()].into_iter().collect())),
        // "region" removed, "tier" added, order changed.
        start_dims: vec![
            ("tier".into(), Arc::from("none")),
            ("service".into(), Arc::from("unknown")),
        ],
        end_dims: vec![],
    };
    let (t2, rec, summary) = restarted(snap, Duration::from_secs(60), &rules);
    assert_eq!((summary.open, summary.discarded), (1, 2));
    assert_eq!(rec.counts("gone", ["discarded", "unmatched"]), [1, 1]);
    assert_eq!(rec.in_progress("gone"), 0);
    let slot = t2.cache.get(&t2.key("kept", "1")).unwrap();
    match slot.state {
        SlotState::Open { dims, .. } => {
            assert_eq!(
                dims.iter().map(|d| &**d).collect::<Vec<_>>(),
                ["none", "web"]
            );
        }
        _ => panic!("not restored as open"),
    }
}

#[test]
fn start_then_end_completes_with_duration() {
    let (t, rec) = table(Duration::from_secs(60));
    t.apply(ev("order", "1", START, 10 * SEC));
    assert_eq!(rec.in_progress("order"), 1);
    t.apply(ev("order", "1", OK, 12 * SEC + SEC / 2));
    assert_eq!(rec.counts("order", ["started", "success"]), [1, 1]);
    assert_eq!(rec.in_progress("order"), 0);
    assert_eq!(*rec.durations.lock().unwrap(), vec![2.5]);
    t.run_pending_tasks();
    assert_eq!(t.entries(), 0);
}

#[test]
fn failure_and_cancelled_outcomes() {
    let (t, rec) = table(Duration::from_secs(60));
    t.apply(ev("o", "f", START, SEC));
    t.apply(ev("o", "f", FAIL, 2 * SEC));
    t.apply(ev("o", "c", START, SEC));
    t.apply(ev("o", "c", CANCEL, 2 * SEC));
    assert_eq!(rec.counts("o", ["failure", "cancelled"]), [1, 1]);
    assert_eq!(rec.in_progress("o"), 0);
}

#[test]
fn end_before_start_pairs_when_the_start_arrives() {
    let (t, rec) = table(Duration::from_secs(60));
    t.apply(ev("order", "1", OK, 15 * SEC));
    assert_eq!(rec.counts("order", ["started", "success"]), [0, 0]);
    t.apply(ev("order", "1", START, 10 * SEC));
    assert_eq!(rec.counts("order", ["started", "success"]), [1, 1]);
    assert_eq!(*rec.durations.lock().unwrap(), vec![5.0]);
    assert_eq!(rec.in_progress("order"), 0);
    assert_eq!(rec.get("order", "unmatched"), 0);
}

#[test]
fn end_whose_start_never_comes_is_unmatched_only() {
    let (t, rec) = table(Duration::from_millis(200));
    t.apply(ev("order", "1", OK, SEC));
    settle_expiries(&t, &rec, |r| r.get("order", "unmatched") > 0);
    assert_eq!(
        rec.counts("order", ["unmatched", "started", "success", "incomplete"]),
        [1, 0, 0, 0]
    );
}

#[test]
fn timeout_counts_incomplete_once_and_a_late_end_is_unmatched() {
    let (t, rec) = table(Duration::from_millis(200));
    t.apply(ev("order", "1", START, SEC));
    let deadline = Instant::now() + Duration::from_millis(200);
    settle_expiries(&t, &rec, |r| r.get("order", "incomplete") > 0);
    assert_eq!(rec.get("order", "incomplete"), 1);
    // Counted within 2 s of the deadline (docs/behaviour.md §3).
    assert!(Instant::now() < deadline + Duration::from_secs(2));
    assert_eq!(rec.in_progress("order"), 0);
    t.apply(ev("order", "1", OK, 2 * SEC));
    settle_expiries(&t, &rec, |r| r.get("order", "unmatched") > 0);
    assert_eq!(
        rec.counts("order", ["incomplete", "success", "unmatched", "started"]),
        [1, 0, 1, 1]
    );
}

#[test]
fn duplicate_start_keeps_the_earliest_timestamp() {
    let (t, rec) = table(Duration::from_secs(60));
    t.apply(ev("o", "1", START, 10 * SEC));
    t.apply(ev("o", "1", START, 8 * SEC));
    t.apply(ev("o", "1", START, 12 * SEC));
    assert_eq!(rec.get("o", "started"), 1);
    assert_eq!(rec.get("*", "dup_start"), 2);
    t.apply(ev("o", "1", OK, 11 * SEC));
    assert_eq!(*rec.durations.lock().unwrap(), vec![3.0]);
    assert_eq!(rec.in_progress("o"), 0);
}

#[test]
fn second_end_while_waiting_is_a_duplicate() {
    let (t, rec) = table(Duration::from_secs(60));
    t.apply(ev("o", "1", OK, 10 * SEC));
    t.apply(ev("o", "1", FAIL, 11 * SEC));
    assert_eq!(rec.get("*", "dup_end"), 1);
    t.apply(ev("o", "1", START, 9 * SEC));
    assert_eq!(rec.counts("o", ["success", "failure"]), [1, 0]);
}

#[test]
fn same_id_in_two_flows_is_two_instances() {
    let (t, rec) = table(Duration::from_secs(60));
    t.apply(ev("a", "shared", START, SEC));
    t.apply(ev("b", "shared", START, SEC));
    assert_eq!(rec.get("a", "started"), 1);
    assert_eq!(rec.get("b", "started"), 1);
    t.apply(ev("b", "shared", FAIL, 2 * SEC));
    assert_eq!(rec.get("b", "failure"), 1);
    assert_eq!(rec.in_progress("a"), 1);
    assert_eq!(rec.in_progress("b"), 0);
}

#[test]
fn negative_duration_is_reported_as_such() {
    let (t, rec) = table(Duration::from_secs(60));
    t.apply(ev("o", "1", START, 10 * SEC));
    t.apply(ev("o", "1", OK, 9 * SEC));
    assert_eq!(rec.get("o", "success"), 1);
    assert_eq!(*rec.durations.lock().unwrap(), vec![-1.0]);
}

#[test]
fn per_flow_timeouts_fire_independently() {
    let (t, rec) = table_with_short_flow(1000, Duration::from_millis(100));
    // The long-timeout entry arrives first and sits at the front of its own queue;
    // it must not hold back the short one behind it.
    t.apply(ev("long", "1", START, SEC));
    t.apply(ev("short", "1", START, SEC));
    settle_expiries(&t, &rec, |r| r.get("short", "incomplete") > 0);
    assert_eq!(rec.get("short", "incomplete"), 1);
    assert_eq!(rec.get("long", "incomplete"), 0);
    t.run_pending_tasks();
    assert_eq!(t.entries(), 1);
}

#[test]
fn retried_events_are_duplicates_even_after_the_instance_closed() {
    let (t, rec) = table(Duration::from_secs(60));
    let batch = [ev("o", "1", START, 10 * SEC), ev("o", "1", OK, 11 * SEC)];
    for e in batch.clone() {
        t.apply(e);
    }
    for e in batch {
        t.apply(e);
    }
    assert_eq!(rec.counts("o", ["started", "success"]), [1, 1]);
    assert_eq!(rec.counts("*", ["dup_start", "dup_end"]), [1, 1]);
    // A new instance reusing the id (new timestamps) counts.
    t.apply(ev("o", "1", START, 20 * SEC));
    t.apply(ev("o", "1", OK, 21 * SEC));
    assert_eq!(rec.counts("o", ["started", "success"]), [2, 2]);
}

#[test]
fn concurrent_load_on_a_small_table_keeps_the_invariant() {
    // Starts race far ahead of ends through a table a third of the size needed:
    // many instances are dropped, but every one is accounted for exactly once.
    const N: usize = 3000;
    let (t, rec) = table_with(Duration::from_secs(60), 1000, Duration::from_secs(300));
    on_threads(&t, 2, N as u64, |n, i| {
        let kind = if n == 0 { START } else { OK };
        ev("c", &i.to_string(), kind, (10 + n) * SEC)
    });
    t.run_pending_tasks();
    assert_eq!(rec.get("c", "started"), N as i64);
    assert_eq!(
        rec.get("c", "success") + rec.get("c", "dropped") + rec.in_progress("c"),
        N as i64
    );
    assert!(rec.in_progress("c") <= 1000);
    // Ends either completed an instance, were unmatched, or still wait.
    assert!(rec.get("c", "success") + rec.get("c", "unmatched") <= N as i64);
}

#[test]
fn concurrent_starts_and_ends_count_each_instance_once() {
    // Threads 0 and 2 send every start, 1 and 3 every end, racing each other:
    // each instance must complete exactly once, whatever the interleaving.
    const N: usize = 3000;
    let (t, rec) = table_with(Duration::from_secs(60), 100_000, Duration::from_secs(300));
    on_threads(&t, 4, N as u64, |n, i| {
        let kind = if n % 2 == 0 { START } else { OK };
        let ts = if n % 2 == 0 { 10 * SEC } else { 11 * SEC };
        ev("c", &i.to_string(), kind, ts)
    });
    assert_eq!(rec.get("c", "started"), N as i64);
    assert_eq!(rec.get("c", "success"), N as i64);
    assert_eq!(rec.in_progress("c"), 0);
    assert_eq!(rec.get("*", "dup_start"), N as i64);
    assert_eq!(rec.get("*", "dup_end"), N as i64);
    assert!(rec.durations.lock().unwrap().iter().all(|d| *d == 1.0));
}

#[test]
fn a_full_store_evicts_the_least_recent_entries() {
    let (t, rec) = table_with(Duration::from_secs(60), 100, Duration::from_secs(300));
    for i in 0..100 {
        t.apply(ev("o", &format!("old-{i}"), START, SEC));
    }
    t.run_pending_tasks();
    for i in 0..50 {
        t.apply(ev("o", &format!("new-{i}"), START, SEC));
    }
    t.run_pending_tasks();
    assert_eq!(t.entries(), 100);
    assert_eq!(rec.get("o", "dropped"), 50);
    for i in 0..50 {
        t.apply(ev("o", &format!("new-{i}"), OK, 2 * SEC));
    }
    assert_eq!(rec.get("o", "success"), 50);
    // The oldest went first: old-49 is gone (its end waits), old-50 is there.
    t.apply(ev("o", "old-49", OK, 2 * SEC));
    t.apply(ev("o", "old-50", OK, 2 * SEC));
    assert_eq!(
        rec.get("o", "success"),
        51,
        "old-49 was evicted, old-50 was not"
    );
    assert_eq!(rec.get("o", "started"), 150);
    assert_eq!(
        rec.get("o", "success") + rec.get("o", "dropped") + rec.in_progress("o"),
        150
    );
}

#[test]
fn a_waiting_end_evicted_for_room_is_unmatched() {
    let (t, rec) = table_with(Duration::from_secs(60), 10, Duration::from_secs(300));
    t.apply(ev("late", "w", OK, SEC));
    t.run_pending_tasks();
    for i in 0..10 {
        t.apply(ev("o", &i.to_string(), START, SEC));
    }
    t.run_pending_tasks();
    assert_eq!(rec.get("late", "unmatched"), 1);
    assert_eq!(rec.get("o", "dropped"), 0);
    assert_eq!(t.entries(), 10);
}

#[test]
fn an_overdue_entry_is_timed_out_not_dropped_when_room_is_needed() {
    let (t, rec) = table_with(Duration::from_millis(50), 2, Duration::from_secs(300));
    t.apply(ev("o", "1", START, SEC));
    t.apply(ev("o", "2", START, SEC));
    std::thread::sleep(Duration::from_millis(80));
    t.apply(ev("o", "3", START, SEC));
    t.run_pending_tasks();
    assert_eq!(rec.counts("o", ["incomplete", "dropped"]), [2, 0]);
    assert_eq!(rec.in_progress("o"), 1);
}

#[test]
fn a_late_end_racing_an_unevicted_expiry_counts_once() {
    // No housekeeping runs between the deadline and the end: moka still holds the
    // expired entry. "long" (a store whose time-to-live is the timeout) expires by
    // time-to-live: `remove` returns it and the listener reports `Expired`. "short"
    // expires by its per-entry deadline (the timer wheel): `remove` returns it with
    // cause `Explicit`. Either way the end must not complete it, and housekeeping
    // must not count it a second time later.
    for flow in ["long", "short"] {
        let (t, rec) = past_its_deadline_then(flow, OK, 2);
        rec.expect(flow, "incomplete=1 success=0");
        settle_expiries(&t, &rec, |r| r.get(flow, "unmatched") > 0);
        keep_house(&t, 10);
        rec.expect(flow, "incomplete=1 success=0 unmatched=1 in_progress=0");
    }
}

#[test]
fn a_start_over_an_unevicted_expired_entry_counts_both_once() {
    for flow in ["short", "long"] {
        // "short": per-entry expiry (insert reports the old entry as Replaced);
        // "long" with a store whose TTL is short: time-to-live (reported Expired).
        let (t, rec) = past_its_deadline_then(flow, START, 5);
        rec.expect(flow, "incomplete=1 started=2");
        t.apply(ev(flow, "1", OK, 6 * SEC));
        rec.expect(flow, "success=1");
        assert_eq!(*rec.durations.lock().unwrap(), vec![1.0], "{flow}");
        keep_house(&t, 5);
        rec.expect(flow, "incomplete=1 in_progress=0");
    }
}

#[test]
fn threads_hammering_one_key_keep_the_invariant() {
    // Four threads send starts and ends of one id with timestamps that make every
    // pair a new instance: each instance is opened and closed exactly once.
    const N: u64 = 2000;
    let (t, rec) = table_with(Duration::from_secs(60), 1000, Duration::from_secs(300));
    on_threads(&t, 4, N, |n, i| {
        let kind = if n % 2 == 0 { START } else { OK };
        ev("one", "same-id", kind, (i * 4 + n) * SEC)
    });
    t.run_pending_tasks();
    let waiting = t.entries() as i64 - rec.in_progress("one");
    assert!((0..=1).contains(&rec.in_progress("one")));
    assert_eq!(
        rec.get("one", "started"),
        rec.get("one", "success") + rec.in_progress("one")
    );
    // Every end completed an instance, was a duplicate of a waiting end, or waits.
    assert_eq!(
        rec.get("one", "success") + rec.get("*", "dup_end") + waiting,
        2 * N as i64
    );
}

#[test]
fn capacity_evictions_racing_ends_count_each_instance_once() {
    // One thread opens instances, one ends them, one runs housekeeping (which evicts
    // from a store a tenth of the size needed) all at once.
    const N: usize = 20_000;
    let (t, rec) = table_with(Duration::from_secs(60), 2000, Duration::from_secs(300));
    let stop = Arc::new(std::sync::atomic::AtomicBool::new(false));
    let keeper = {
        let (t, stop) = (t.clone(), stop.clone());
        std::thread::spawn(move || {
            while !stop.load(std::sync::atomic::Ordering::Relaxed) {
                t.run_pending_tasks();
            }
        })
    };
    on_threads(&t, 2, N as u64, |n, i| {
        let kind = if n == 0 { START } else { OK };
        ev("c", &i.to_string(), kind, (10 + n) * SEC)
    });
    stop.store(true, std::sync::atomic::Ordering::Relaxed);
    keeper.join().unwrap();
    t.run_pending_tasks();
    let started = rec.get("c", "started");
    assert_eq!(started, N as i64);
    assert_eq!(
        rec.get("c", "success") + rec.get("c", "dropped") + rec.in_progress("c"),
        started
    );
    let waiting = t.entries() as i64 - rec.in_progress("c");
    assert_eq!(
        rec.get("c", "success") + rec.get("c", "unmatched") + waiting,
        N as i64,
        "every end completed, was unmatched, or still waits"
    );
    assert!(t.entries() <= 2000);
}

#[test]
fn a_burst_of_a_million_expiries_is_all_counted_once() {
    const N: usize = 1_000_000;
    let (t, rec) = table_with(Duration::from_millis(200), 2_000_000, Duration::ZERO);
    let maintenance = Maintenance::start(t.clone(), Duration::from_millis(20));
    for i in 0..N {
        t.apply(ev("b", &i.to_string(), START, SEC));
    }
    let give_up = Instant::now() + Duration::from_secs(120);
    while rec.get("b", "incomplete") < N as i64 && Instant::now() < give_up {
        std::thread::sleep(Duration::from_millis(50));
    }
    drop(maintenance);
    t.run_pending_tasks();
    assert_eq!(rec.get("b", "incomplete"), N as i64);
    assert_eq!(rec.get("b", "started"), N as i64);
    assert_eq!(t.entries(), 0);
}

#[test]
fn instances_the_time_to_live_cannot_time_are_batched_and_only_open_ones_time_out() {
    let (t, rec) = table_with_short_flow(1000, Duration::from_millis(100));
    t.apply(ev("long", "1", START, SEC));
    assert_eq!(t.exact.waiting(), 0, "the time-to-live times it");
    t.apply(ev("short", "1", START, SEC));
    t.apply(ev("short", "2", START, SEC));
    t.apply(ev("short", "w", OK, SEC));
    assert_eq!(t.exact.waiting(), 3, "two open, one waiting end");
    // Closed before the batch expires: their keys find nothing then.
    t.apply(ev("short", "1", OK, 2 * SEC));
    t.apply(ev("short", "w", START, 0));
    past_the_short_batches();
    t.run_pending_tasks();
    rec.expect(
        "short",
        "started=3 success=2 incomplete=1 unmatched=0 in_progress=0",
    );
    assert_eq!(t.exact.waiting(), 0);
    keep_house(&t, 60);
    rec.expect("short", "incomplete=1");
    rec.expect("long", "incomplete=0 in_progress=1");
}

#[test]
fn an_instance_evicted_for_room_is_not_timed_out_by_its_batch() {
    let (t, rec) = table_with_short_flow(2, Duration::from_millis(100));
    t.apply(ev("short", "1", START, SEC));
    for i in 0..3 {
        t.apply(ev("long", &i.to_string(), START, SEC));
        t.run_pending_tasks();
    }
    rec.expect("short", "dropped=1");
    past_the_short_batches();
    keep_house(&t, 3);
    rec.expect("short", "dropped=1 incomplete=0 in_progress=0");
}

#[test]
fn a_shorter_timeout_is_counted_at_its_deadline_not_a_timer_wheel_tick_later() {
    // moka's timer wheel counts ticks of 1.07 s from the cache's creation: a deadline
    // 100 ms after it would be removed by the wheel only after the first tick.
    let (t, rec) = table_with_short_flow(1000, Duration::from_millis(100));
    t.apply(ev("short", "1", START, SEC));
    t.apply(ev("short", "w", OK, SEC));
    past_the_short_batches();
    t.run_pending_tasks();
    rec.expect("short", "incomplete=1 unmatched=1 in_progress=0");
    assert_eq!(t.entries(), 0);
    // The same id again is a new instance, with a timer of its own; nothing is
    // counted twice when the wheel passes.
    t.apply(ev("short", "1", START, 3 * SEC));
    past_the_short_batches();
    keep_house(&t, 60);
    rec.expect("short", "started=2 incomplete=2 unmatched=1 in_progress=0");
}

#[test]
fn batches_hold_at_most_twice_the_capacity_in_keys() {
    let (t, rec) = table_with_short_flow(3, Duration::from_millis(100));
    for i in 0..7 {
        t.apply(ev("short", &i.to_string(), START, SEC));
        t.apply(ev("short", &i.to_string(), OK, 2 * SEC));
    }
    assert_eq!(
        t.exact.waiting(),
        6,
        "closed instances' keys stay, up to the bound"
    );
    past_the_short_batches();
    t.run_pending_tasks();
    assert_eq!(t.exact.waiting(), 0);
    t.apply(ev("short", "again", START, SEC));
    assert_eq!(t.exact.waiting(), 1, "room again once batches expired");
    rec.expect("short", "success=7 incomplete=0 in_progress=1");
}

#[test]
fn ends_racing_batch_time_outs_count_each_instance_once() {
    // 20,000 instances of a flow with a shorter timeout, ended while their batches
    // expire (housekeeping running flat out on another thread): each instance is
    // completed or timed out, never both, and each end completes one or waits.
    const N: u64 = 20_000;
    let timeout = Duration::from_secs(1);
    let (t, rec) = table_with_short_flow(100_000, timeout);
    let mut opened = Vec::with_capacity(N as usize);
    for i in 0..N {
        opened.push(Instant::now());
        t.apply(ev("short", &i.to_string(), START, SEC));
    }
    let stop = Arc::new(std::sync::atomic::AtomicBool::new(false));
    let keeper = {
        let (t, stop) = (t.clone(), stop.clone());
        std::thread::spawn(move || {
            while !stop.load(std::sync::atomic::Ordering::Relaxed) {
                t.run_pending_tasks();
            }
        })
    };
    // Each end comes about when its instance is due: some just before, most after.
    for i in 0..N {
        let due = opened[i as usize] + timeout - Duration::from_millis(3);
        if let Some(wait) = due.checked_duration_since(Instant::now()) {
            std::thread::sleep(wait);
        }
        t.apply(ev("short", &i.to_string(), OK, 2 * SEC));
    }
    std::thread::sleep(Duration::from_millis(200));
    stop.store(true, std::sync::atomic::Ordering::Relaxed);
    keeper.join().unwrap();
    keep_house(&t, 60);
    let [success, incomplete, unmatched] =
        rec.counts("short", ["success", "incomplete", "unmatched"]);
    assert_eq!(success + incomplete, N as i64, "each instance closed once");
    assert_eq!(
        success + unmatched,
        N as i64,
        "each end completed one or waited"
    );
    rec.expect("short", "in_progress=0");
    assert_eq!(t.entries(), 0);
}
