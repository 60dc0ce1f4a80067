//! Flow steps across three flowmetrics replicas on one real redis-server
//! (`correlation.store: redis`), over OTLP/HTTP: each instance's start goes to one
//! replica, its end to the next, its steps to the third, the three fed at once. In a
//! first round half the instances send their start and steps (steps before or after
//! the start, as the replicas race), the other half their end and steps (both before the
//! start); the second round sends the rest. Steps sent after their instance was answered
//! closed are after_close; steps of instances that never start are no_start. Every step
//! family, summed over the replicas, must be exact.

mod common;

use std::collections::BTreeMap;
use std::time::{Duration, Instant};

use common::attr as s;
use common::redis::{RedisCluster, RedisServer};
use common::replicas::{now_nanos, post_once, three_replicas, total, trace_urls, Rng};
use common::replicas::{FLOW, TIMEOUT};
use common::{otlp, settled_scrapes};
use hyper::StatusCode;
use prost::Message;

const IDS: u64 = 300;
const STEPS: [&str; 3] = ["cart", "paid", "packed"];

/// One instance: whether it starts, its end's outcome, and its steps.
struct Plan {
    starts: bool,
    outcome: Option<&'static str>,
    /// Steps sent with the start and end (the first `steps` of [`STEPS`]).
    steps: usize,
    /// One more step, sent once the instance was answered closed.
    late_step: bool,
    /// Step j is at start + (j + 1) * unit: a multiple of 1/8 s (exact sums).
    unit: f64,
}

fn plan(id: u64) -> Plan {
    let (starts, outcome) = match id % 10 {
        0 => (true, None),
        1 => (true, Some("failure")),
        2 => (true, Some("cancelled")),
        3 => (false, Some("success")),
        _ => (true, Some("success")),
    };
    let steps = if starts { (id % 4) as usize } else { 1 };
    Plan {
        starts,
        outcome,
        steps,
        late_step: starts && outcome.is_some() && steps < STEPS.len() && id % 6 == 5,
        unit: (id % 7 + 1) as f64 * 0.125,
    }
}

/// A flow event: (name, id, attributes beyond the correlation id, timestamp).
type Event = (String, u64, Vec<(&'static str, &'static str)>, u64);

fn body(events: &[Event]) -> Vec<u8> {
    let spans = events
        .iter()
        .map(|(name, id, extra, ts)| {
            let mut attributes = vec![s("correlation-id", &format!("o-{id}"))];
            attributes.extend(extra.iter().map(|(k, v)| s(k, v)));
            let event = otlp::event(name.clone(), *ts, attributes);
            otlp::span(&[0xab; 16], &(id + 1).to_be_bytes(), vec![event])
        })
        .collect();
    otlp::traces(None, spans).encode_to_vec()
}

fn step_ts(start: u64, p: &Plan, j: usize) -> u64 {
    start + ((j + 1) as f64 * p.unit * 1e9) as u64
}

/// Batches (shuffled, 10 events each) by round and replica; then the late steps.
type Rounds = [[Vec<Vec<u8>>; 3]; 2];

fn traffic(seed: u64) -> (Rounds, Vec<Vec<u8>>) {
    let base = now_nanos();
    let mut rounds: [[Vec<Event>; 3]; 2] = Default::default();
    let mut late = Vec::new();
    for id in 0..IDS {
        let p = plan(id);
        let start = base + id * 1_000_000;
        let r = (id % 3) as usize;
        // Steps always in the first round; the start too, or the end instead.
        let end_first = (id / 3) % 2 == 1;
        let (start_round, end_round) = if end_first { (1, 0) } else { (0, 1) };
        if p.starts {
            rounds[start_round][r].push((format!("flow.{FLOW}.start"), id, vec![], start));
        }
        if let Some(outcome) = p.outcome {
            let end = start + 2_000_000_000;
            rounds[end_round][(r + 1) % 3].push((
                format!("flow.{FLOW}.end"),
                id,
                vec![("outcome", outcome)],
                end,
            ));
        }
        for (j, name) in STEPS.iter().enumerate().take(p.steps) {
            let e = (
                format!("flow.{FLOW}.step"),
                id,
                vec![("step", *name)],
                step_ts(start, &p, j),
            );
            rounds[0][(r + 2) % 3].push(e);
        }
        if p.late_step {
            let ts = step_ts(start, &p, p.steps);
            late.push((
                format!("flow.{FLOW}.step"),
                id,
                vec![("step", STEPS[p.steps])],
                ts,
            ));
        }
    }
    let mut rng = Rng(seed);
    let rounds = rounds.map(|replicas| {
        replicas.map(|mut events| {
            rng.shuffle(&mut events);
            events.chunks(10).map(body).collect()
        })
    });
    (rounds, late.chunks(10).map(body).collect())
}

/// Per step: reached, Σ time to step, Σ transit; stalled by last step; unmatched.
struct Expected {
    reached: BTreeMap<&'static str, (f64, f64, f64)>,
    stalled: BTreeMap<&'static str, f64>,
    after_close: f64,
    no_start: f64,
}

fn expected() -> Expected {
    let mut e = Expected {
        reached: STEPS.iter().map(|s| (*s, (0.0, 0.0, 0.0))).collect(),
        stalled: ["start"]
            .iter()
            .chain(STEPS.iter())
            .map(|s| (*s, 0.0))
            .collect(),
        after_close: 0.0,
        no_start: 0.0,
    };
    for id in 0..IDS {
        let p = plan(id);
        if !p.starts {
            e.no_start += p.steps as f64;
            continue;
        }
        for (j, name) in STEPS.iter().enumerate().take(p.steps) {
            let r = e.reached.get_mut(name).unwrap();
            r.0 += 1.0;
            r.1 += (j + 1) as f64 * p.unit;
            r.2 += p.unit;
        }
        if p.outcome.is_none() {
            let last = if p.steps == 0 {
                "start"
            } else {
                STEPS[p.steps - 1]
            };
            *e.stalled.get_mut(last).unwrap() += 1.0;
        }
        e.after_close += f64::from(u8::from(p.late_step));
    }
    e
}

async fn send_all(url: String, batches: Vec<Vec<u8>>) {
    for body in batches {
        let give_up = Instant::now() + Duration::from_secs(20);
        while post_once(&url, body.clone()).await != Some(StatusCode::OK) {
            assert!(Instant::now() < give_up, "export never accepted by {url}");
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn steps_over_three_replicas_sum_exactly_for_every_step_family() {
    let Some(redis) = RedisServer::start() else {
        return;
    };
    run(|c| c.correlation.redis.url = redis.url()).await;
}

/// The same on a Redis Cluster of three primaries (16 shards, one hash slot each).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn steps_over_three_replicas_on_a_redis_cluster_sum_exactly() {
    let Some(cluster) = RedisCluster::start(3) else {
        return;
    };
    let nodes = cluster.urls();
    run(|c| c.correlation.redis.cluster = nodes.clone()).await;
}

async fn run(store: impl Fn(&mut flowmetrics::config::Config)) {
    let apps = three_replicas(store).await;
    let urls = trace_urls(&apps);
    let (rounds, late) = traffic(0x5eed_57e9);
    for round in rounds {
        let senders: Vec<_> = round
            .into_iter()
            .zip(urls.clone())
            .map(|(b, url)| tokio::spawn(send_all(url, b)))
            .collect();
        for s in senders {
            s.await.expect("sender");
        }
    }
    // Every instance that had both its start and end is closed now.
    send_all(urls[1].clone(), late).await;

    let want = expected();
    let incomplete: f64 = want.stalled.values().sum();
    let within = TIMEOUT + Duration::from_secs(20);
    let settle = Duration::from_millis(300);
    let scrapes = settled_scrapes(&apps, &[], within, settle, |scrapes| {
        total(scrapes, "flowmetrics_flow_errors_total", "incomplete") >= incomplete
            && total(
                scrapes,
                "flowmetrics_flow_steps_unmatched_total",
                "no_start",
            ) >= want.no_start
    })
    .await;
    let get = |family: &str, also: &str| total(&scrapes, family, also);
    for (step, (reached, to_step, transit)) in &want.reached {
        let l = format!("step=\"{step}\"");
        for (family, want) in [
            ("flowmetrics_flow_steps_total", reached),
            ("flowmetrics_flow_step_duration_seconds_count", reached),
            ("flowmetrics_flow_step_duration_seconds_sum", to_step),
            ("flowmetrics_flow_step_transit_seconds_count", reached),
            ("flowmetrics_flow_step_transit_seconds_sum", transit),
        ] {
            assert_eq!(get(family, &l), *want, "{family} {step}");
        }
    }
    for (last, n) in &want.stalled {
        let l = format!("last_step=\"{last}\"");
        assert_eq!(
            get("flowmetrics_flow_stalled_total", &l),
            *n,
            "stalled at {last}"
        );
    }
    assert_eq!(get("flowmetrics_flow_stalled_total", ""), incomplete);
    assert_eq!(
        get("flowmetrics_flow_errors_total", "incomplete"),
        incomplete
    );
    assert_eq!(
        get("flowmetrics_flow_steps_unmatched_total", "after_close"),
        want.after_close
    );
    assert_eq!(
        get("flowmetrics_flow_steps_unmatched_total", "no_start"),
        want.no_start
    );
    assert_eq!(get("flowmetrics_flows_in_progress", ""), 0.0);
    assert!(want.after_close > 0.0 && want.no_start > 0.0);
    for app in apps {
        app.shutdown().await;
    }
}
