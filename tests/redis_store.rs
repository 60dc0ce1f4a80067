//! The rules of docs/behaviour.md §3 against the Redis store and a real redis-server, with two or
//! three stores on one server standing for replicas: what one opens another closes,
//! each time-out is counted once, retries are recognised everywhere.

mod common;

use std::ops::Deref;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use common::redis::RedisServer;
use common::store::{ev, redis_settings, run_pending_tasks, store_settings, Counts, END};
use flowmetrics::flows::event::{EventKind, FlowEvent, Outcome};
use flowmetrics::flows::store::{
    RedisSettings, RedisStore, Report, StoreError, StoreProbe, StoreSettings,
};
use flowmetrics::flows::{CorrelationStore, FlowSink};

/// Counts what the stores report, per flow (as the memory store's tests do), and the
/// durations of the instances completed.
#[derive(Default)]
struct Recorder {
    counts: Counts,
    durations: Mutex<Vec<f64>>,
}

impl Deref for Recorder {
    type Target = Counts;

    fn deref(&self) -> &Counts {
        &self.counts
    }
}

impl FlowSink for Recorder {
    fn report(&self, report: Report<'_>) {
        self.counts.count(&report);
        if let Report::Completed { duration_secs, .. } = report {
            self.durations.lock().unwrap().push(duration_secs);
        }
    }
}

#[derive(Default)]
struct Probe {
    calls: AtomicU64,
    errors: AtomicU64,
}

impl StoreProbe for Probe {
    fn store_call(&self, _op: &'static str, _seconds: f64, ok: bool) {
        self.calls.fetch_add(1, Ordering::Relaxed);
        if !ok {
            self.errors.fetch_add(1, Ordering::Relaxed);
        }
    }
}

struct Replica {
    store: RedisStore,
    probe: Arc<Probe>,
}

/// `n` stores on one server, reporting to one recorder (the sum over replicas).
fn replicas(
    server: &RedisServer,
    n: usize,
    capacity: u64,
    timeout: Duration,
    rec: &Arc<Recorder>,
) -> Vec<Replica> {
    sharded(server, n, capacity, timeout, rec, 1)
}

/// The same with the keys in `shards` shards (`correlation.redis.shards`).
fn sharded(
    server: &RedisServer,
    n: usize,
    capacity: u64,
    timeout: Duration,
    rec: &Arc<Recorder>,
    shards: u32,
) -> Vec<Replica> {
    (0..n)
        .map(|_| {
            let probe = Arc::new(Probe::default());
            let store = RedisStore::new(
                StoreSettings {
                    capacity,
                    dedup_window: Duration::from_secs(300),
                    timeout_for: Arc::new(move |flow| {
                        if flow == "short" {
                            timeout / 2
                        } else {
                            timeout
                        }
                    }),
                    longest_timeout: timeout,
                    step_flows: Vec::new(),
                },
                redis_settings(server, shards, "t:", 4),
                rec.clone(),
                probe.clone(),
            )
            .expect("store");
            Replica { store, probe }
        })
        .collect()
}

fn apply(r: &Replica, events: Vec<FlowEvent>) {
    common::store::apply(&r.store, events);
}

/// Sweeps on every replica until `until` holds (bounded).
fn sweep_until(rs: &[Replica], rec: &Recorder, until: impl Fn(&Recorder) -> bool) {
    common::store::sweep_until(rs.iter().map(|r| &r.store), || until(rec));
}

#[test]
fn opened_on_one_replica_closed_on_another_with_the_duration() {
    let server = redis_server!();
    let rec = Arc::new(Recorder::default());
    let rs = replicas(&server, 2, 1000, Duration::from_secs(60), &rec);
    apply(&rs[0], vec![ev("f", "1", EventKind::Start, 1_000_000_000)]);
    apply(&rs[1], vec![ev("f", "1", END, 3_500_000_000)]);
    rec.assert_counts("f", &[("started", 1), ("success", 1)]);
    assert_eq!(*rec.durations.lock().unwrap(), vec![2.5]);
    let failure = EventKind::End(Outcome::Failure);
    apply(&rs[1], vec![ev("f", "2", EventKind::Start, 1)]);
    apply(&rs[0], vec![ev("f", "2", failure, 2)]);
    assert_eq!(rec.get("f", "failure"), 1);
    assert_eq!(rec.in_progress("f"), 0);
    rs[0].store.run_pending_tasks();
    assert_eq!(rs[0].store.entries(), 0);
}

#[test]
fn an_end_first_waits_for_its_start_on_another_replica() {
    let server = redis_server!();
    let rec = Arc::new(Recorder::default());
    let rs = replicas(&server, 2, 1000, Duration::from_secs(60), &rec);
    apply(&rs[0], vec![ev("f", "1", END, 5_000_000_000)]);
    assert_eq!(rec.get("f", "started"), 0);
    rs[0].store.run_pending_tasks();
    assert_eq!(rs[0].store.entries(), 1);
    apply(&rs[1], vec![ev("f", "1", EventKind::Start, 4_000_000_000)]);
    rec.assert_counts("f", &[("started", 1), ("success", 1), ("unmatched", 0)]);
    assert_eq!(*rec.durations.lock().unwrap(), vec![1.0]);
}

#[test]
fn an_end_whose_start_never_comes_is_unmatched_once() {
    let server = redis_server!();
    let rec = Arc::new(Recorder::default());
    let rs = replicas(&server, 3, 1000, Duration::from_millis(200), &rec);
    apply(&rs[0], vec![ev("f", "1", END, 5)]);
    sweep_until(&rs, &rec, |r| r.get("f", "unmatched") > 0);
    std::thread::sleep(Duration::from_millis(100));
    run_pending_tasks(rs.iter().map(|r| &r.store));
    rec.assert_counts("f", &[("unmatched", 1), ("started", 0), ("incomplete", 0)]);
}

#[test]
fn a_timeout_is_counted_once_and_a_late_end_waits_anew() {
    let server = redis_server!();
    let rec = Arc::new(Recorder::default());
    let rs = replicas(&server, 3, 1000, Duration::from_millis(200), &rec);
    let starts = (0..50)
        .map(|i| ev("f", &i.to_string(), EventKind::Start, 1))
        .collect();
    apply(&rs[0], starts);
    // Every replica sweeps at once: each time-out is popped by exactly one.
    let give_up = Instant::now() + Duration::from_secs(10);
    while rec.get("f", "incomplete") < 50 && Instant::now() < give_up {
        std::thread::scope(|s| {
            for r in &rs {
                s.spawn(|| r.store.run_pending_tasks());
            }
        });
    }
    assert_eq!(rec.get("f", "incomplete"), 50);
    // A late end finds nothing: it waits, and is unmatched when its own time is up.
    apply(&rs[1], vec![ev("f", "0", END, 2)]);
    assert_eq!(rec.get("f", "success"), 0);
    sweep_until(&rs, &rec, |r| r.get("f", "unmatched") > 0);
    rec.assert_counts("f", &[("unmatched", 1), ("incomplete", 50)]);
    assert_eq!(rec.in_progress("f"), 0);
}

#[test]
fn an_overdue_instance_met_before_the_sweep_is_timed_out_once() {
    let server = redis_server!();
    let rec = Arc::new(Recorder::default());
    let rs = replicas(&server, 2, 1000, Duration::from_millis(100), &rec);
    apply(&rs[0], vec![ev("f", "1", EventKind::Start, 1)]);
    std::thread::sleep(Duration::from_millis(200));
    // No sweep yet: the end finds the instance past its deadline.
    apply(&rs[1], vec![ev("f", "1", END, 2)]);
    rec.assert_counts("f", &[("incomplete", 1), ("success", 0)]);
    run_pending_tasks(rs.iter().map(|r| &r.store));
    assert_eq!(rec.get("f", "incomplete"), 1);
    sweep_until(&rs, &rec, |r| r.get("f", "unmatched") > 0);
    assert_eq!(rec.get("f", "unmatched"), 1);
}

#[test]
fn a_duplicate_start_keeps_the_earliest_timestamp() {
    let server = redis_server!();
    let rec = Arc::new(Recorder::default());
    let rs = replicas(&server, 2, 1000, Duration::from_secs(60), &rec);
    apply(&rs[0], vec![ev("f", "1", EventKind::Start, 3_000_000_000)]);
    apply(&rs[1], vec![ev("f", "1", EventKind::Start, 1_000_000_000)]);
    apply(&rs[0], vec![ev("f", "1", EventKind::Start, 2_000_000_000)]);
    assert_eq!(rec.get("*", "dup_start"), 2);
    apply(&rs[1], vec![ev("f", "1", END, 4_000_000_000)]);
    assert_eq!(rec.get("f", "started"), 1);
    assert_eq!(*rec.durations.lock().unwrap(), vec![3.0]);
}

#[test]
fn a_second_end_while_the_first_waits_is_a_duplicate() {
    let server = redis_server!();
    let rec = Arc::new(Recorder::default());
    let rs = replicas(&server, 2, 1000, Duration::from_secs(60), &rec);
    apply(&rs[0], vec![ev("f", "1", END, 10)]);
    apply(
        &rs[1],
        vec![ev("f", "1", EventKind::End(Outcome::Failure), 11)],
    );
    assert_eq!(rec.get("*", "dup_end"), 1);
    apply(&rs[1], vec![ev("f", "1", EventKind::Start, 5)]);
    rec.assert_counts("f", &[("success", 1), ("failure", 0)]);
}

#[test]
fn the_same_id_in_two_flows_is_two_instances() {
    let server = redis_server!();
    let rec = Arc::new(Recorder::default());
    let rs = replicas(&server, 1, 1000, Duration::from_secs(60), &rec);
    apply(
        &rs[0],
        vec![
            ev("a", "1", EventKind::Start, 1),
            ev("b", "1", EventKind::Start, 1),
            ev("a", "1", END, 2),
        ],
    );
    assert_eq!(rec.get("a", "success"), 1);
    assert_eq!(rec.in_progress("b"), 1);
}

#[test]
fn per_flow_timeouts_fire_independently() {
    let server = redis_server!();
    let rec = Arc::new(Recorder::default());
    let rs = replicas(&server, 1, 1000, Duration::from_millis(600), &rec);
    apply(
        &rs[0],
        vec![
            ev("short", "1", EventKind::Start, 1),
            ev("long", "1", EventKind::Start, 1),
        ],
    );
    sweep_until(&rs, &rec, |r| r.get("short", "incomplete") > 0);
    assert_eq!(rec.get("short", "incomplete"), 1);
    assert_eq!(rec.get("long", "incomplete"), 0);
    sweep_until(&rs, &rec, |r| r.get("long", "incomplete") > 0);
    assert_eq!(rec.get("long", "incomplete"), 1);
}

#[test]
fn a_retried_batch_is_recognised_by_every_replica_also_after_the_instance_closed() {
    let server = redis_server!();
    let rec = Arc::new(Recorder::default());
    let rs = replicas(&server, 3, 1000, Duration::from_secs(60), &rec);
    let batch = || {
        vec![
            ev("f", "1", EventKind::Start, 1),
            ev("f", "1", END, 2),
            ev("f", "2", END, 3),
        ]
    };
    apply(&rs[0], batch());
    apply(&rs[1], batch());
    apply(&rs[2], batch());
    rec.assert_counts("f", &[("started", 1), ("success", 1)]);
    rec.assert_counts("*", &[("dup_start", 2), ("dup_end", 4)]);
    // A new start timestamp after the close is a new instance.
    apply(&rs[1], vec![ev("f", "1", EventKind::Start, 7)]);
    assert_eq!(rec.get("f", "started"), 2);
}

#[test]
fn a_full_store_evicts_the_entries_due_soonest() {
    let server = redis_server!();
    let rec = Arc::new(Recorder::default());
    let rs = replicas(&server, 2, 3, Duration::from_secs(60), &rec);
    // Deadlines are in ms: entries a few ms apart have an order.
    let gap = || std::thread::sleep(Duration::from_millis(5));
    apply(&rs[0], vec![ev("f", "1", EventKind::Start, 1)]);
    gap();
    apply(&rs[0], vec![ev("f", "w", END, 1)]);
    gap();
    apply(&rs[1], vec![ev("f", "2", EventKind::Start, 1)]);
    gap();
    apply(&rs[1], vec![ev("f", "3", EventKind::Start, 1)]);
    assert_eq!(rec.get("f", "dropped"), 1);
    gap();
    apply(&rs[0], vec![ev("f", "4", EventKind::Start, 1)]);
    assert_eq!(rec.get("f", "unmatched_evicted"), 1);
    rs[0].store.run_pending_tasks();
    assert_eq!(rs[0].store.entries(), 3);
    // The first one left: its end now waits instead of completing.
    apply(&rs[1], vec![ev("f", "1", END, 2)]);
    assert_eq!(rec.get("f", "success"), 0);
    assert_eq!(rec.in_progress("f"), 3 - 1);
}

#[test]
fn an_unreachable_store_refuses_and_a_restarted_one_is_used_again() {
    let mut server = redis_server!();
    let rec = Arc::new(Recorder::default());
    let rs = replicas(&server, 1, 1000, Duration::from_secs(60), &rec);
    apply(&rs[0], vec![ev("f", "1", EventKind::Start, 1)]);
    assert!(rs[0].store.available());
    server.stop();
    let refused = rs[0]
        .store
        .apply_batch(&mut vec![ev("f", "2", EventKind::Start, 1)].into_iter());
    assert!(
        matches!(refused, Err(StoreError::Unreachable(_))),
        "{refused:?}"
    );
    assert!(!rs[0].store.available());
    assert!(rs[0].probe.errors.load(Ordering::Relaxed) >= 1);
    server.restart();
    // The pooled connection died with the server: the store reconnects by itself.
    let give_up = Instant::now() + Duration::from_secs(10);
    loop {
        let events = vec![ev("f", "2", EventKind::Start, 1)];
        if rs[0].store.apply_batch(&mut events.into_iter()).is_ok() {
            break;
        }
        assert!(Instant::now() < give_up, "never reconnected");
        std::thread::sleep(Duration::from_millis(50));
    }
    assert!(rs[0].store.available());
    assert_eq!(rec.get("f", "started"), 2);
    assert!(rs[0].probe.calls.load(Ordering::Relaxed) >= 3);
}

#[test]
fn replicas_hammering_the_same_keys_count_each_instance_once() {
    hammer(1);
}

#[test]
fn replicas_hammering_the_same_keys_count_each_instance_once_over_shards() {
    hammer(8);
}

#[test]
fn a_sharded_store_counts_entries_over_every_shard() {
    let server = redis_server!();
    let rec = Arc::new(Recorder::default());
    let rs = sharded(&server, 2, 1000, Duration::from_secs(60), &rec, 16);
    let starts = (0..100).map(|i| ev("f", &i.to_string(), EventKind::Start, 1));
    apply(&rs[0], starts.collect());
    let ends = (0..100).map(|i| ev("f", &i.to_string(), END, 2));
    apply(&rs[1], ends.take(40).collect());
    rs[0].store.run_pending_tasks();
    assert_eq!(rs[0].store.entries(), 60);
    assert_eq!(rec.get("f", "success"), 40);
    // Each shard has a deadline set of its own, tagged for one hash slot.
    let mut con = server.connection().unwrap();
    let sets: Vec<String> = redis::cmd("KEYS")
        .arg("t:{*}deadlines")
        .query(&mut con)
        .unwrap();
    assert_eq!(sets.len(), 16, "{sets:?}");
    // Scripts gone (a restart): every call of the pipeline is refused with NOSCRIPT,
    // the script is loaded, and each call sent again once.
    redis::cmd("SCRIPT")
        .arg("FLUSH")
        .query::<()>(&mut con)
        .unwrap();
    let ends = (0..100).map(|i| ev("f", &i.to_string(), END, 2));
    apply(&rs[1], ends.skip(40).collect());
    assert_eq!(rec.get("f", "success"), 100);
    assert_eq!(rs[1].probe.errors.load(Ordering::Relaxed), 0);
}

fn hammer(shards: u32) {
    let server = redis_server!();
    let rec = Arc::new(Recorder::default());
    let rs = sharded(
        &server,
        3,
        100_000,
        Duration::from_millis(400),
        &rec,
        shards,
    );
    // Each id: a start and an end, each sent twice (a retry), to random replicas in
    // random order; a third of the ids never get an end (they time out).
    let ids = 3000u64;
    let mut events: Vec<(usize, FlowEvent)> = Vec::new();
    let mut seed = 0x2545_f491_4f6c_dd1du64;
    let mut next = move || {
        seed ^= seed << 13;
        seed ^= seed >> 7;
        seed ^= seed << 17;
        seed
    };
    for id in 0..ids {
        let start = ev("f", &id.to_string(), EventKind::Start, 1_000 + id);
        for _ in 0..2 {
            events.push(((next() % 3) as usize, start.clone()));
            if id % 3 != 0 {
                let end = ev("f", &id.to_string(), END, 2_000 + id);
                events.push(((next() % 3) as usize, end));
            }
        }
    }
    for i in (1..events.len()).rev() {
        events.swap(i, (next() % (i as u64 + 1)) as usize);
    }
    std::thread::scope(|s| {
        for (replica, r) in rs.iter().enumerate() {
            let mine: Vec<FlowEvent> = events
                .iter()
                .filter(|(to, _)| *to == replica)
                .map(|(_, e)| e.clone())
                .collect();
            s.spawn(move || {
                for batch in mine.chunks(50) {
                    apply(r, batch.to_vec());
                    r.store.run_pending_tasks();
                }
            });
        }
    });
    sweep_until(&rs, &rec, |r| r.in_progress("f") == 0);
    std::thread::sleep(Duration::from_millis(500));
    run_pending_tasks(rs.iter().map(|r| &r.store));
    let completed = ids - ids.div_ceil(3);
    assert_eq!(rec.get("f", "started") as u64, ids);
    // An end that came first and waited out its timeout before its start arrived would
    // be unmatched; with 400 ms and this load that does not happen, so all pair up.
    assert_eq!(
        (rec.get("f", "success") + rec.get("f", "unmatched")) as u64,
        completed
    );
    assert_eq!(
        rec.get("f", "incomplete") as u64 + rec.get("f", "success") as u64,
        ids
    );
    assert_eq!(rec.in_progress("f"), 0);
    assert_eq!(rec.get("*", "dup_start") as u64, ids);
    assert_eq!(rec.get("*", "dup_end") as u64, completed);
}

#[test]
fn a_batch_whose_reply_was_lost_is_reported_once_and_its_retry_is_a_duplicate() {
    lost_reply(1);
}

#[test]
fn a_batch_whose_replies_were_lost_over_shards_is_reported_once() {
    // With 2 shards the batch's two instances are one call each, in one pipeline.
    lost_reply(2);
}

fn lost_reply(shards: u32) {
    let server = redis_server!();
    let rec = Arc::new(Recorder::default());
    let mut rs = sharded(&server, 2, 1000, Duration::from_secs(60), &rec, shards);
    // A store that gives up on a reply after 100 ms.
    rs[0].store = RedisStore::new(
        store_settings(1000, Duration::from_secs(60), &[]),
        RedisSettings {
            command_timeout: Duration::from_millis(100),
            ..redis_settings(&server, shards, "t:", 4)
        },
        rec.clone(),
        rs[0].probe.clone(),
    )
    .unwrap();
    apply(&rs[1], vec![ev("f", "1", EventKind::Start, 1_000_000_000)]);
    // Its connection is open before (opening one waits for the server's answers).
    apply(&rs[0], vec![ev("warm", "1", EventKind::Start, 1)]);
    // The server is busy for 500 ms: the batch is read and run after the client
    // stopped waiting for it, and its reply goes nowhere.
    let mut busy_con = server.connection().unwrap();
    let busy = std::thread::spawn(move || {
        redis::cmd("EVAL")
            .arg(
                "local t = redis.call('TIME') local s = t[1] * 1e6 + t[2] \
                 repeat local u = redis.call('TIME') until u[1] * 1e6 + u[2] - s > 500000",
            )
            .arg(0)
            .query::<()>(&mut busy_con)
    });
    std::thread::sleep(Duration::from_millis(50));
    let batch = || {
        vec![
            ev("f", "1", END, 3_000_000_000),
            ev("f", "2", EventKind::Start, 1),
        ]
    };
    let refused = rs[0].store.apply_batch(&mut batch().into_iter());
    assert!(
        matches!(refused, Err(StoreError::Timeout(_))),
        "{refused:?}"
    );
    assert_eq!(rec.get("f", "success"), 0);
    busy.join().unwrap().unwrap();
    // The replica that lost the reply reads the outcomes back and reports them, once.
    let give_up = Instant::now() + Duration::from_secs(10);
    while rec.get("f", "success") == 0 && Instant::now() < give_up {
        rs[0].store.run_pending_tasks();
        std::thread::sleep(Duration::from_millis(20));
    }
    for _ in 0..5 {
        rs[0].store.run_pending_tasks();
    }
    // The exporter's retry, to the other replica: the events were applied, so it finds
    // duplicates only.
    apply(&rs[1], batch());
    rec.assert_counts("*", &[("dup_end", 1), ("dup_start", 1)]);
    assert_eq!(rec.get("f", "success"), 1);
    assert_eq!(*rec.durations.lock().unwrap(), vec![2.0]);
    assert_eq!(rec.get("f", "started"), 2);
    assert_eq!(rec.in_progress("f"), 1);
}
