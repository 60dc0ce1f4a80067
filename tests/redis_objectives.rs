//! Overdue instances (docs/behaviour.md §10) on the Redis store and a real redis-server:
//! two stores on one server stand for replicas, the keys spread over four shards. What
//! one replica opens, another counts; closes, time-outs and an earlier duplicate start
//! change the count exactly; both replicas report the same, global values. Steps and ends
//! waiting for their start are not counted; evicted instances leave the count.

mod common;

use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use common::otlp::now_nanos;
use common::redis::RedisServer;
use common::store::{apply, ev, redis_settings, step, NoProbe, SEC};
use flowmetrics::flows::event::{EventKind, FlowEvent, Outcome};
use flowmetrics::flows::store::{OverdueSettings, RedisStore, Report, StoreSettings};
use flowmetrics::flows::{CorrelationStore, FlowSink};

/// The latest overdue report per flow, and the time-outs.
#[derive(Default)]
struct Latest {
    overdue: Mutex<HashMap<String, (u64, f64)>>,
    timed_out: Mutex<u64>,
}

impl FlowSink for Latest {
    fn report(&self, report: Report<'_>) {
        match report {
            Report::Overdue {
                flow,
                overdue,
                oldest_open_secs,
            } => {
                self.overdue
                    .lock()
                    .unwrap()
                    .insert(flow.to_string(), (overdue, oldest_open_secs));
            }
            Report::TimedOut { .. } => *self.timed_out.lock().unwrap() += 1,
            _ => {}
        }
    }
}

/// A replica on `server` with a sink of its own.
fn replica(server: &RedisServer) -> (RedisStore, Arc<Latest>) {
    let sink = Arc::new(Latest::default());
    (replica_with(server, &sink, 10_000, true), sink)
}

fn replica_with(
    server: &RedisServer,
    sink: &Arc<Latest>,
    capacity: u64,
    track: bool,
) -> RedisStore {
    // Flow "t" times out after 3 s (longer than one report's wait); "g" has no threshold.
    let timeout_for = Arc::new(|flow: &str| {
        if flow == "t" {
            Duration::from_secs(3)
        } else {
            Duration::from_secs(600)
        }
    });
    let store = RedisStore::new(
        StoreSettings {
            capacity,
            dedup_window: Duration::from_secs(300),
            timeout_for,
            longest_timeout: Duration::from_secs(600),
            step_flows: Vec::new(),
        },
        redis_settings(server, 4, "o:", 2),
        sink.clone(),
        Arc::new(NoProbe),
    )
    .expect("store");
    if !track {
        return store;
    }
    store.track_open_ages(OverdueSettings {
        threshold_for: Arc::new(|flow| (flow != "g").then_some(Duration::from_secs(10))),
        named: vec!["f".into()],
        max_flows: 100,
    })
}

/// Whether `oldest` is the age now of an instance that started `age` seconds before
/// `then`, to the second the store counts in (reports are fresh: taken just now).
fn is_age(oldest: f64, then: u64, age: u64) -> bool {
    let expected = (now_nanos() - (then - age * SEC)) as f64 / 1e9;
    (expected - 0.5..=expected + 1.5).contains(&oldest)
}

/// Runs the maintenance of the replica and of the `others` (as their own threads would:
/// each writes the changes it saw) until a new report of the replica for `flow` has
/// `overdue` (bounded: reports come every 2 s).
fn report_until(
    store: &RedisStore,
    others: &[&RedisStore],
    sink: &Latest,
    flow: &str,
    overdue: u64,
) -> (u64, f64) {
    sink.overdue.lock().unwrap().remove(flow);
    let give_up = Instant::now() + Duration::from_secs(8);
    loop {
        for other in others {
            other.run_pending_tasks();
        }
        store.run_pending_tasks();
        let got = sink.overdue.lock().unwrap().get(flow).copied();
        if got.is_some_and(|(n, _)| n == overdue) || Instant::now() > give_up {
            return got.unwrap_or_default();
        }
        std::thread::sleep(Duration::from_millis(50));
    }
}

#[test]
fn overdue_counts_are_exact_and_global_across_replicas() {
    let server = redis_server!();
    let ((a, a_sink), (b, b_sink)) = (replica(&server), replica(&server));
    // A named flow is reported (at 0) before its first event.
    assert_eq!(report_until(&b, &[&a], &b_sink, "f", 0), (0, 0.0));

    let now = now_nanos();
    let start = |flow: &str, id: &str, age: u64| ev(flow, id, EventKind::Start, now - age * SEC);
    apply(
        &a,
        vec![
            start("f", "1", 120),
            start("f", "2", 120),
            start("f", "3", 60),
            start("f", "4", 5),
            start("f", "5", 1),
            start("g", "1", 100),
        ],
    );
    // Counted on the other replica: 120, 120 and 60 s are past 10 s; 5 and 1 s are not.
    let (overdue, oldest) = report_until(&b, &[&a], &b_sink, "f", 3);
    assert_eq!(overdue, 3);
    assert!(is_age(oldest, now, 120), "oldest {oldest}");
    assert!(!b_sink.overdue.lock().unwrap().contains_key("g"));

    // Closed on replica b: the count drops on replica a too.
    let success = EventKind::End(Outcome::Success);
    apply(
        &b,
        vec![ev("f", "1", success, now), ev("f", "4", success, now)],
    );
    let (overdue, oldest) = report_until(&a, &[&b], &a_sink, "f", 2);
    assert_eq!(overdue, 2, "one at 120 s and one at 60 s");
    assert!(is_age(oldest, now, 120), "oldest {oldest}");

    // An earlier duplicate start moves its instance back: the 1 s one becomes 200 s old.
    apply(&a, vec![start("f", "5", 200)]);
    let (overdue, oldest) = report_until(&b, &[&a], &b_sink, "f", 3);
    assert_eq!(overdue, 3);
    assert!(is_age(oldest, now, 200), "oldest {oldest}");

    // Time-outs leave the count: flow "t" times out after 3 s.
    let opened = Instant::now();
    apply(&a, vec![start("t", "1", 50), start("t", "2", 50)]);
    assert_eq!(report_until(&a, &[&b], &a_sink, "t", 2).0, 2);
    std::thread::sleep(Duration::from_millis(3100).saturating_sub(opened.elapsed()));
    let (overdue, oldest) = report_until(&b, &[&a], &b_sink, "t", 0);
    assert_eq!((overdue, oldest), (0, 0.0));
    assert_eq!(
        *a_sink.timed_out.lock().unwrap() + *b_sink.timed_out.lock().unwrap(),
        2
    );

    // Everything closed (one more opened and closed in the same call): the per-second
    // hashes are gone, nothing is left behind.
    apply(
        &b,
        vec![
            start("f", "9", 300),
            ev("f", "9", success, now),
            ev("f", "2", success, now),
            ev("f", "3", success, now),
            ev("f", "5", success, now),
            ev("g", "1", success, now),
        ],
    );
    assert_eq!(report_until(&a, &[&b], &a_sink, "f", 0), (0, 0.0));
    let mut con = server.connection().unwrap();
    let keys: Vec<String> = redis::cmd("KEYS").arg("o:*ages:*").query(&mut con).unwrap();
    assert!(keys.is_empty(), "{keys:?}");
}

/// The cost of counting overdue instances on Redis (BENCHMARKS.md): the same store
/// without and with thresholds, each filled with `FM_OPEN` (default 1,000,000) open
/// instances of 10 flows (start seconds over 20 minutes); fill rate, Redis memory per
/// open instance, the flow path at that many open (exports of 50 starts + 50 ends of
/// new instances, `FM_CHURN_SECS` seconds, default 5) with Redis' own time in the apply
/// script and its CPU per event there, and one refresh (every shard's counts of every
/// flow). `cargo test --release --test redis_objectives measure -- --ignored --nocapture`
/// (`FM_ROUNDS=4`: four rounds, alternating which of the two goes first).
#[test]
#[ignore]
fn measure_overdue_cost_on_redis() {
    let server = redis_server!();
    let n: u64 = std::env::var("FM_OPEN")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(1_000_000);
    let churn_secs: u64 = std::env::var("FM_CHURN_SECS")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(5);
    let flows: Vec<String> = (0..10).map(|i| format!("f{i}")).collect();
    let batch = |from: u64, to: u64, kind: EventKind, age: &dyn Fn(u64) -> u64| -> Vec<FlowEvent> {
        let now = now_nanos();
        (from..to)
            .map(|i| {
                ev(
                    &flows[(i % 10) as usize],
                    &format!("order-{i:012}"),
                    kind,
                    now - age(i) * SEC,
                )
            })
            .collect()
    };
    // Rounds alternate which goes first (`FM_ROUNDS`, default 1): what a flush leaves to
    // Redis (freeing, rehashing) then falls on either.
    let rounds: usize = std::env::var("FM_ROUNDS")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(1);
    let order = (0..rounds).flat_map(|r| {
        if r % 2 == 0 {
            [false, true]
        } else {
            [true, false]
        }
    });
    for track in order {
        server.flush();
        let base = server.used_memory();
        let sink = Arc::new(Latest::default());
        let store = replica_with(&server, &sink, n * 2, track);
        let t = Instant::now();
        for from in (0..n).step_by(1000) {
            apply(
                &store,
                batch(from, (from + 1000).min(n), EventKind::Start, &|i| i % 1200),
            );
        }
        let fill = n as f64 / t.elapsed().as_secs_f64();
        let per_instance = (server.used_memory() - base) as f64 / n as f64;
        // Redis' own time in the scripts and its CPU, over the flow path only: less
        // disturbed than the rate by other work on a shared machine.
        let mut con = server.connection().unwrap();
        let _: () = redis::cmd("CONFIG")
            .arg("RESETSTAT")
            .query(&mut con)
            .unwrap();
        let cpu_before = redis_cpu_secs(&server);
        let t = Instant::now();
        let mut next = n;
        while t.elapsed() < Duration::from_secs(churn_secs) {
            apply(&store, batch(next, next + 50, EventKind::Start, &|_| 0));
            apply(
                &store,
                batch(next, next + 50, EventKind::End(Outcome::Success), &|_| 0),
            );
            next += 50;
        }
        let churn = (next - n) as f64 * 2.0 / t.elapsed().as_secs_f64();
        let churn_events = (next - n) as f64 * 2.0;
        let cpu_us = (redis_cpu_secs(&server) - cpu_before) * 1e6 / churn_events;
        let stats: String = redis::cmd("INFO")
            .arg("commandstats")
            .query(&mut con)
            .unwrap();
        let script_us = stats
            .lines()
            .find_map(|l| l.strip_prefix("cmdstat_evalsha:"))
            .and_then(|l| l.split(',').find_map(|f| f.strip_prefix("usec=")))
            .and_then(|v| v.parse::<f64>().ok())
            .unwrap_or(0.0)
            / churn_events;
        // A maintenance run with the refresh due, then one right after (sweep only).
        let mut refresh_ms = Vec::new();
        for _ in 0..3 {
            std::thread::sleep(Duration::from_millis(2100));
            let t = Instant::now();
            store.run_pending_tasks();
            let with = t.elapsed();
            let t = Instant::now();
            store.run_pending_tasks();
            refresh_ms.push(with.saturating_sub(t.elapsed()).as_secs_f64() * 1e3);
        }
        let overdue: u64 = sink.overdue.lock().unwrap().values().map(|(c, _)| c).sum();
        println!(
            "redis, {n} open, overdue thresholds {}: fill {fill:.0} events/s, {per_instance:.1} B \
             per open instance in Redis, flow path {churn:.0} events/s ({script_us:.2} µs in the \
             script, {cpu_us:.2} µs Redis CPU per event), refresh {refresh_ms:.1?} ms \
             ({overdue} overdue reported)",
            if track { "on " } else { "off" }
        );
    }
}

/// The server's CPU time so far (user + system), from `/proc`.
fn redis_cpu_secs(server: &RedisServer) -> f64 {
    let stat = std::fs::read_to_string(format!("/proc/{}/stat", server.pid().unwrap())).unwrap();
    // Fields after the command's closing parenthesis: utime and stime are the 12th and 13th.
    let fields: Vec<&str> = stat
        .rsplit_once(')')
        .unwrap()
        .1
        .split_whitespace()
        .collect();
    let ticks: f64 = fields[11].parse::<f64>().unwrap() + fields[12].parse::<f64>().unwrap();
    ticks / 100.0
}

/// Open instances in the shard's deadlines set (`o:{n}deadlines`), over the four shards.
fn held(server: &RedisServer) -> u64 {
    let mut con = server.connection().unwrap();
    (0..4)
        .map(|n| {
            redis::cmd("ZCARD")
                .arg(format!("o:{{{n}}}deadlines"))
                .query::<u64>(&mut con)
                .unwrap()
        })
        .sum()
}

fn ages_keys(server: &RedisServer) -> Vec<String> {
    let mut con = server.connection().unwrap();
    redis::cmd("KEYS").arg("o:*ages:*").query(&mut con).unwrap()
}

#[test]
fn steps_and_ends_before_their_start_count_only_open_instances() {
    let server = redis_server!();
    let ((a, a_sink), (b, b_sink)) = (replica(&server), replica(&server));
    let now = now_nanos();
    let ago = |age: u64| now - age * SEC;
    let success = EventKind::End(Outcome::Success);
    // Steps waiting for their start, and an end waiting for its start: nothing is open.
    apply(
        &a,
        vec![
            step("f", "s1", "paid", ago(110)),
            ev("f", "e1", success, ago(90)),
        ],
    );
    assert_eq!(report_until(&b, &[&a], &b_sink, "f", 0).0, 0);
    // The start opens the instance with its steps: counted; the end's start pairs at
    // once: never open, never counted.
    apply(
        &b,
        vec![
            ev("f", "s1", EventKind::Start, ago(120)),
            ev("f", "e1", EventKind::Start, ago(100)),
        ],
    );
    let (overdue, oldest) = report_until(&a, &[&b], &a_sink, "f", 1);
    assert_eq!(overdue, 1);
    assert!(is_age(oldest, now, 120), "oldest {oldest}");
    // A step of an open instance changes nothing; its end closes it; a step after the
    // close (a closed mark) changes nothing either.
    apply(&a, vec![step("f", "s1", "packed", ago(115))]);
    assert_eq!(report_until(&b, &[&a], &b_sink, "f", 1).0, 1);
    apply(
        &b,
        vec![
            ev("f", "s1", success, ago(1)),
            step("f", "s1", "late", ago(0)),
        ],
    );
    assert_eq!(report_until(&a, &[&b], &a_sink, "f", 0), (0, 0.0));
    assert!(ages_keys(&server).is_empty(), "{:?}", ages_keys(&server));
}

#[test]
fn evicted_instances_leave_the_count() {
    let server = redis_server!();
    let sink = Arc::new(Latest::default());
    // 8 entries: 2 per shard.
    let store = replica_with(&server, &sink, 8, true);
    let now = now_nanos();
    let starts: Vec<FlowEvent> = (0..40)
        .map(|i| {
            let flow = if i % 4 == 0 { "g" } else { "f" };
            ev(flow, &format!("{i}"), EventKind::Start, now - 60 * SEC)
        })
        .collect();
    apply(&store, starts);
    let kept = held(&server);
    assert!(kept <= 8, "{kept} held");
    // Each open "f" instance still held is counted; the evicted ones are not.
    let mut con = server.connection().unwrap();
    let held_f: u64 = (0..40)
        .filter(|i| i % 4 != 0)
        .map(|i| {
            let keys: Vec<String> = redis::cmd("KEYS")
                .arg(format!("o:*if\0{i}"))
                .query(&mut con)
                .unwrap();
            keys.len() as u64
        })
        .sum();
    let (overdue, _) = report_until(&store, &[], &sink, "f", held_f);
    assert_eq!(overdue, held_f);
    // Untracked flow "g": no hash, evicted or not.
    assert!(ages_keys(&server).iter().all(|k| !k.ends_with("ages:g")));
    // Closing what is left empties every hash.
    let success = EventKind::End(Outcome::Success);
    apply(
        &store,
        (0..40)
            .map(|i| {
                let flow = if i % 4 == 0 { "g" } else { "f" };
                ev(flow, &format!("{i}"), success, now)
            })
            .collect(),
    );
    assert_eq!(report_until(&store, &[], &sink, "f", 0), (0, 0.0));
    assert!(ages_keys(&server).is_empty(), "{:?}", ages_keys(&server));
}

/// Two replicas write their changes in either order: a close written before the open
/// another replica saw leaves nothing behind; a count left at a start second no open
/// instance can have (a replica stopped before writing it) is deleted when read.
#[test]
fn counts_written_out_of_order_or_left_behind_settle() {
    let server = redis_server!();
    let ((a, a_sink), (b, b_sink)) = (replica(&server), replica(&server));
    let now = now_nanos();
    apply(&a, vec![ev("f", "1", EventKind::Start, now - 30 * SEC)]);
    apply(
        &b,
        vec![ev("f", "1", EventKind::End(Outcome::Success), now)],
    );
    // The close first: the count is -1 for a moment, reported as none open.
    b.shutdown();
    assert_eq!(ages_keys(&server).len(), 1);
    assert_eq!(report_until(&b, &[], &b_sink, "f", 0), (0, 0.0));
    a.shutdown();
    assert!(ages_keys(&server).is_empty(), "{:?}", ages_keys(&server));

    // Left behind: 3 at a second 2 × 600 s + 1 h + 100 s ago (flow "f" times out after
    // 600 s), beside one instance open now.
    let stale = now / SEC - 4900;
    let mut con = server.connection().unwrap();
    let _: () = redis::cmd("HSET")
        .arg("o:{0}ages:f")
        .arg(stale)
        .arg(3)
        .query(&mut con)
        .unwrap();
    apply(&a, vec![ev("f", "2", EventKind::Start, now - 20 * SEC)]);
    let (overdue, oldest) = report_until(&a, &[], &a_sink, "f", 1);
    assert_eq!(overdue, 1);
    assert!(is_age(oldest, now, 20), "oldest {oldest}");
    let fields: Vec<String> = redis::cmd("HKEYS")
        .arg("o:{0}ages:f")
        .query(&mut con)
        .unwrap();
    assert_eq!(fields, vec![((now - 20 * SEC) / SEC).to_string()]);
}
