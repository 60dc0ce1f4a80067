//! Flow steps (docs/behaviour.md §9) against the Redis store and a real redis-server,
//! with several stores on one server standing for replicas: a step on one replica, the
//! start on another, the end on a third; each (instance, step) once; transit and
//! stalled computed by whichever replica closes or times the instance out; unmatched
//! steps counted once; and a flow without steps keeps no key more.

mod common;

use std::ops::Deref;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use common::redis::RedisServer;
use common::store::{apply, ev, redis_settings, run_pending_tasks, store_settings};
use common::store::{Counts, NoProbe, END, SEC};
use flowmetrics::flows::event::{EventKind, FlowEvent, Outcome, TraceRef};
use flowmetrics::flows::store::{RedisStore, Report, StepTransit};
use flowmetrics::flows::{CorrelationStore, FlowSink};

/// What the stores report: counts per (flow, what), and every step observation.
#[derive(Default)]
struct Recorder {
    counts: Counts,
    /// (step, seconds since the start, trace) of each StepReached.
    reached: Mutex<Vec<(String, f64, Option<TraceRef>)>>,
    /// (step, transit seconds) of each closing instance, in the order given.
    transits: Mutex<Vec<(String, f64)>>,
}

impl Deref for Recorder {
    type Target = Counts;

    fn deref(&self) -> &Counts {
        &self.counts
    }
}

impl Recorder {
    fn reached(&self) -> Vec<(String, f64)> {
        let mut r: Vec<_> = self
            .reached
            .lock()
            .unwrap()
            .iter()
            .map(|(s, d, _)| (s.clone(), *d))
            .collect();
        r.sort_by(|a, b| a.partial_cmp(b).unwrap());
        r
    }

    fn transits(&self) -> Vec<(String, f64)> {
        self.transits.lock().unwrap().clone()
    }

    fn add_transits(&self, transits: &[StepTransit]) {
        let mut t = self.transits.lock().unwrap();
        t.extend(
            transits
                .iter()
                .map(|s| (s.step.to_string(), s.transit_secs)),
        );
    }
}

impl FlowSink for Recorder {
    fn report(&self, report: Report<'_>) {
        self.counts.count(&report);
        match report {
            Report::Completed { transits, .. } | Report::TimedOut { transits, .. } => {
                self.add_transits(transits);
            }
            Report::StepReached {
                step,
                since_start_secs,
                trace,
                ..
            } => self
                .reached
                .lock()
                .unwrap()
                .push((step.to_string(), since_start_secs, trace)),
            _ => {}
        }
    }
}

/// `n` stores on one server (in `shards` shards), reporting to one recorder.
fn replicas(
    server: &RedisServer,
    n: usize,
    capacity: u64,
    timeout: Duration,
    shards: u32,
    rec: &Arc<Recorder>,
) -> Vec<RedisStore> {
    declaring(server, n, capacity, timeout, shards, rec, &[])
}

/// The same, with flows that declare steps (`flows.per_flow.*.steps`).
fn declaring(
    server: &RedisServer,
    n: usize,
    capacity: u64,
    timeout: Duration,
    shards: u32,
    rec: &Arc<Recorder>,
    step_flows: &[&str],
) -> Vec<RedisStore> {
    (0..n)
        .map(|_| {
            RedisStore::new(
                store_settings(capacity, timeout, step_flows),
                redis_settings(server, shards, "t:", 4),
                rec.clone(),
                Arc::new(NoProbe),
            )
            .expect("store")
        })
        .collect()
}

fn step(flow: &str, id: &str, name: &str, ts: u64) -> FlowEvent<'static> {
    FlowEvent {
        trace: TraceRef::from_ids(&[7; 16], &ts.to_be_bytes()),
        ..common::store::step(flow, id, name, ts)
    }
}

/// Sweeps on every replica until `until` holds (bounded), then once more.
fn sweep_until(rs: &[RedisStore], rec: &Recorder, until: impl Fn(&Recorder) -> bool) {
    common::store::sweep_until(rs.iter(), || until(rec));
    run_pending_tasks(rs);
}

/// Every key on the server.
fn keys(server: &RedisServer) -> Vec<String> {
    let mut con = server.connection().expect("connection");
    let mut keys: Vec<String> = redis::cmd("KEYS").arg("*").query(&mut con).expect("KEYS");
    keys.sort();
    keys
}

/// A step to one replica, the start to another, the end to a third, in every order of
/// arrival: the step counts once, with its time since the start, and its transit is
/// observed when the instance closes.
fn step_start_end_over_three_replicas(shards: u32) {
    let server = redis_server!();
    let rec = Arc::new(Recorder::default());
    let rs = replicas(&server, 3, 1000, Duration::from_secs(60), shards, &rec);
    let orders: [[usize; 3]; 6] = [
        [0, 1, 2],
        [0, 2, 1],
        [1, 0, 2],
        [1, 2, 0],
        [2, 0, 1],
        [2, 1, 0],
    ];
    for (n, order) in orders.iter().enumerate() {
        let id = n.to_string();
        let events = [
            step("f", &id, "paid", 3 * SEC),
            ev("f", &id, EventKind::Start, SEC),
            ev("f", &id, END, 4 * SEC),
        ];
        for &which in order {
            // Each event to its own replica: step → 0, start → 1, end → 2.
            apply(&rs[which], vec![events[which].clone()]);
        }
    }
    rec.assert_counts("f", &[("started", 6), ("success", 6)]);
    // A step that came after both the start and the end found its instance closed.
    let late = orders.iter().filter(|o| o[2] == 0).count() as i64;
    rec.assert_counts(
        "f",
        &[
            ("step_paid", 6 - late),
            ("step_unmatched_after_close", late),
        ],
    );
    assert!(rec.reached().iter().all(|(s, d)| s == "paid" && *d == 2.0));
    assert!(rec.transits().iter().all(|(s, d)| s == "paid" && *d == 2.0));
    assert_eq!(rec.transits().len() as i64, 6 - late);
    run_pending_tasks(&rs);
    assert_eq!(rs[0].entries(), 0);
    // What is left: fingerprints, closed marks, the set of flows with steps.
    assert!(
        keys(&server)
            .iter()
            .all(|k| !k.contains("}i") && !k.contains("}k")),
        "{:?}",
        keys(&server)
    );
}

#[test]
fn a_step_start_and_end_on_three_replicas_count_once_in_any_order() {
    step_start_end_over_three_replicas(1);
}

#[test]
fn a_step_start_and_end_on_three_replicas_count_once_over_shards() {
    step_start_end_over_three_replicas(4);
}

#[test]
fn each_step_counts_once_and_the_earliest_timestamp_wins() {
    let server = redis_server!();
    let rec = Arc::new(Recorder::default());
    let rs = replicas(&server, 2, 1000, Duration::from_secs(60), 1, &rec);
    apply(&rs[0], vec![ev("f", "1", EventKind::Start, SEC)]);
    apply(&rs[1], vec![step("f", "1", "a", 4 * SEC)]);
    // The same step again, earlier: a duplicate, but its timestamp is kept.
    apply(&rs[0], vec![step("f", "1", "a", 2 * SEC)]);
    // A retried export of the first: a duplicate on every replica.
    apply(&rs[0], vec![step("f", "1", "a", 4 * SEC)]);
    apply(&rs[1], vec![step("f", "1", "a", 4 * SEC)]);
    apply(&rs[1], vec![step("f", "1", "b", 5 * SEC)]);
    rec.assert_counts("f", &[("step_a", 1), ("step_b", 1)]);
    assert_eq!(rec.get("*", "dup_step"), 3);
    apply(&rs[0], vec![ev("f", "1", END, 9 * SEC)]);
    // Transits by event timestamp: a at 2 s (the earliest), b 3 s after it.
    assert_eq!(
        rec.transits(),
        vec![("a".to_string(), 1.0), ("b".to_string(), 3.0)]
    );
}

#[test]
fn steps_before_their_start_wait_and_are_reached_when_it_comes() {
    let server = redis_server!();
    let rec = Arc::new(Recorder::default());
    let rs = replicas(&server, 3, 1000, Duration::from_secs(60), 1, &rec);
    apply(&rs[0], vec![step("f", "1", "b", 7 * SEC)]);
    apply(&rs[1], vec![step("f", "1", "a", 3 * SEC)]);
    assert_eq!(rec.get("f", "step_a") + rec.get("f", "step_b"), 0);
    rs[0].run_pending_tasks();
    assert_eq!(rs[0].entries(), 1, "the waiting steps are one entry");
    apply(&rs[2], vec![ev("f", "1", EventKind::Start, SEC)]);
    assert_eq!(rec.get("f", "started"), 1);
    assert_eq!(
        rec.reached(),
        vec![("a".to_string(), 2.0), ("b".to_string(), 6.0)]
    );
    // The traces of the step events came back for the exemplars.
    let traces: Vec<_> = rec.reached.lock().unwrap().iter().map(|r| r.2).collect();
    assert!(traces.iter().all(Option::is_some));
    // Steps, then an end, all before the start: one waiting entry, closed by the start.
    apply(&rs[0], vec![step("f", "2", "a", 2 * SEC)]);
    apply(
        &rs[1],
        vec![ev("f", "2", EventKind::End(Outcome::Failure), 5 * SEC)],
    );
    rs[1].run_pending_tasks();
    assert_eq!(rs[1].entries(), 2);
    apply(&rs[2], vec![ev("f", "2", EventKind::Start, SEC)]);
    rec.assert_counts("f", &[("failure", 1), ("step_a", 2)]);
    assert_eq!(rec.transits(), vec![("a".to_string(), 1.0)]);
}

#[test]
fn a_timed_out_instance_stalls_at_its_latest_step_by_event_time() {
    let server = redis_server!();
    let rec = Arc::new(Recorder::default());
    let rs = replicas(&server, 3, 1000, Duration::from_millis(300), 1, &rec);
    // Arrival order b, a; event time a after b: the last step reached is a.
    apply(&rs[0], vec![ev("f", "1", EventKind::Start, SEC)]);
    apply(&rs[1], vec![step("f", "1", "b", 2 * SEC)]);
    apply(&rs[2], vec![step("f", "1", "a", 5 * SEC)]);
    apply(&rs[0], vec![ev("f", "2", EventKind::Start, SEC)]);
    // Steps whose start never comes, alone and with a waiting end.
    apply(
        &rs[1],
        vec![step("f", "3", "a", SEC), step("f", "3", "b", SEC)],
    );
    apply(
        &rs[2],
        vec![step("f", "4", "a", SEC), ev("f", "4", END, SEC)],
    );
    sweep_until(&rs, &rec, |r| {
        r.get("f", "incomplete") >= 2 && r.get("f", "step_unmatched_no_start") >= 3
    });
    rec.assert_counts(
        "f",
        &[
            ("incomplete", 2),
            ("stalled_a", 1),
            ("stalled_start", 1),
            ("stalled_b", 0),
        ],
    );
    assert_eq!(
        rec.transits(),
        vec![("b".to_string(), 1.0), ("a".to_string(), 3.0)]
    );
    rec.assert_counts(
        "f",
        &[
            ("step_unmatched_no_start", 3),
            ("unmatched", 1),
            ("started", 2),
        ],
    );
    // Late steps of a timed-out instance count as after_close, once.
    apply(&rs[1], vec![step("f", "1", "c", 6 * SEC)]);
    apply(&rs[2], vec![step("f", "2", "a", 6 * SEC)]);
    rec.assert_counts("f", &[("step_unmatched_after_close", 2), ("step_c", 0)]);
    run_pending_tasks(&rs);
    assert_eq!(rs[0].entries(), 0);
}

#[test]
fn an_instance_met_past_its_deadline_by_a_step_times_out_with_its_steps() {
    let server = redis_server!();
    let rec = Arc::new(Recorder::default());
    let rs = replicas(&server, 2, 1000, Duration::from_millis(100), 1, &rec);
    apply(
        &rs[0],
        vec![
            ev("f", "1", EventKind::Start, SEC),
            step("f", "1", "a", 2 * SEC),
        ],
    );
    std::thread::sleep(Duration::from_millis(200));
    // No sweep yet: the step finds the instance past its deadline.
    apply(&rs[1], vec![step("f", "1", "b", 3 * SEC)]);
    rec.assert_counts(
        "f",
        &[
            ("incomplete", 1),
            ("stalled_a", 1),
            ("step_unmatched_after_close", 1),
        ],
    );
    run_pending_tasks(&rs);
    assert_eq!(rec.get("f", "incomplete"), 1);
    assert_eq!(rs[0].entries(), 0);
}

#[test]
fn a_new_start_after_the_close_is_a_new_instance_with_its_own_steps() {
    let server = redis_server!();
    let rec = Arc::new(Recorder::default());
    let rs = replicas(&server, 2, 1000, Duration::from_secs(60), 1, &rec);
    apply(
        &rs[0],
        vec![
            ev("f", "1", EventKind::Start, SEC),
            step("f", "1", "a", 2 * SEC),
        ],
    );
    apply(&rs[1], vec![ev("f", "1", END, 3 * SEC)]);
    apply(&rs[1], vec![step("f", "1", "b", 4 * SEC)]);
    assert_eq!(rec.get("f", "step_unmatched_after_close"), 1);
    apply(&rs[0], vec![ev("f", "1", EventKind::Start, 10 * SEC)]);
    apply(&rs[1], vec![step("f", "1", "b", 12 * SEC)]);
    rec.assert_counts(
        "f",
        &[
            ("started", 2),
            ("step_b", 1),
            ("step_unmatched_after_close", 1),
        ],
    );
}

#[test]
fn evicted_waiting_steps_are_unmatched_once() {
    let server = redis_server!();
    let rec = Arc::new(Recorder::default());
    let rs = replicas(&server, 2, 2, Duration::from_secs(60), 1, &rec);
    let gap = || std::thread::sleep(Duration::from_millis(5));
    apply(
        &rs[0],
        vec![step("f", "w", "a", SEC), step("f", "w", "b", SEC)],
    );
    gap();
    apply(&rs[1], vec![ev("f", "1", EventKind::Start, SEC)]);
    gap();
    apply(&rs[0], vec![ev("f", "2", EventKind::Start, SEC)]);
    rec.assert_counts("f", &[("step_unmatched_no_start", 2), ("dropped", 0)]);
    // Its start comes too late: a new instance, the evicted steps are not counted again.
    apply(&rs[1], vec![ev("f", "w", EventKind::Start, SEC)]);
    rec.assert_counts("f", &[("step_a", 0), ("dropped", 1)]);
}

#[test]
fn a_flow_without_steps_keeps_no_key_for_them() {
    let server = redis_server!();
    let rec = Arc::new(Recorder::default());
    let rs = replicas(&server, 2, 1000, Duration::from_millis(200), 1, &rec);
    let starts = (0..20)
        .map(|i| ev("plain", &i.to_string(), EventKind::Start, SEC))
        .collect();
    apply(&rs[0], starts);
    let ends = (0..10)
        .map(|i| ev("plain", &i.to_string(), END, 2 * SEC))
        .collect();
    apply(&rs[1], ends);
    sweep_until(&rs, &rec, |r| r.get("plain", "incomplete") >= 10);
    rec.assert_counts("plain", &[("incomplete", 10), ("stalled_start", 10)]);
    assert!(rec.transits().is_empty());
    // Only the retry fingerprints stay (30 events), beside the replies each replica
    // has yet to acknowledge: no steps, closed marks or step flows.
    let left: Vec<String> = keys(&server)
        .into_iter()
        .filter(|k| !k.starts_with("t:{r}"))
        .collect();
    assert_eq!(left.len(), 30, "{left:?}");
    assert!(
        left.iter().all(|k| k.contains("}s") || k.contains("}e")),
        "{left:?}"
    );
}

#[test]
fn a_declared_flow_marks_its_closed_instances_before_any_step_came() {
    let server = redis_server!();
    let rec = Arc::new(Recorder::default());
    let rs = declaring(
        &server,
        2,
        1000,
        Duration::from_secs(60),
        4,
        &rec,
        &["order"],
    );
    // No step of either flow yet, on any shard: only the declared one leaves marks.
    apply(&rs[0], vec![ev("order", "1", EventKind::Start, SEC)]);
    apply(&rs[1], vec![ev("order", "1", END, 2 * SEC)]);
    apply(&rs[0], vec![ev("other", "1", EventKind::Start, SEC)]);
    apply(&rs[1], vec![ev("other", "1", END, 2 * SEC)]);
    apply(&rs[1], vec![step("order", "1", "paid", 3 * SEC)]);
    apply(&rs[0], vec![step("other", "1", "paid", 3 * SEC)]);
    assert_eq!(rec.get("order", "step_unmatched_after_close"), 1);
    // Undeclared and closed before its flow's first step: it waits for a start.
    rec.assert_counts(
        "other",
        &[("step_unmatched_after_close", 0), ("step_paid", 0)],
    );
    rs[0].run_pending_tasks();
    assert_eq!(rs[0].entries(), 1);
}

/// Numbers for BENCHMARKS.md ("Flow steps in Redis") (not a test of size: it asserts nothing about it).
/// `cargo test --release --test redis_steps -- --ignored --nocapture`
#[test]
#[ignore]
fn measure_memory_per_open_instance_with_and_without_steps() {
    let server = redis_server!();
    let rec = Arc::new(Recorder::default());
    let rs = replicas(&server, 1, 1_000_000, Duration::from_secs(600), 1, &rec);
    let n = 20_000u64;
    for (flow, steps) in [("plain", 0usize), ("stepped", 3)] {
        let before = server.used_memory();
        for chunk in 0..n / 500 {
            let mut events = Vec::new();
            for i in chunk * 500..(chunk + 1) * 500 {
                let id = format!("order-{i:08}");
                events.push(ev(flow, &id, EventKind::Start, SEC + i));
                for (j, name) in ["placed", "paid", "packed"].iter().enumerate().take(steps) {
                    events.push(step(flow, &id, name, 2 * SEC + i + j as u64));
                }
            }
            apply(&rs[0], events);
        }
        let after = server.used_memory();
        println!(
            "{flow}: {} bytes per open instance with {steps} steps (instance, deadline, \
             fingerprints, steps; 14-byte ids, no dims)",
            (after - before) / n
        );
    }
}
