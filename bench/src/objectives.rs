//! `--only objectives`: what counting overdue instances (docs/behaviour.md §10) costs the
//! in-process store at many open instances. Two stores, one after the other in the same
//! run, each filled with N open instances of 10 flows (start timestamps spread over the
//! last 20 minutes): one without overdue thresholds (no ages kept), one where every flow
//! has one. For each: fill rate and RSS growth per instance, then the flow path at N
//! open (exports of 50 starts + 50 ends of new instances, alternating between the two
//! stores in 1-second rounds so that both see the same machine), and the CPU of one
//! refresh (counting every flow's overdue instances and oldest age), next to one walk
//! over the moka cache (a snapshot) for comparison.

use std::sync::Arc;
use std::time::{Duration, Instant};

use flowmetrics::flows::event::{DimValues, EventKind, FlowEvent, Outcome, Source};
use flowmetrics::flows::store::OverdueSettings;
use flowmetrics::flows::{FlowSink, MemoryStore, Report, StoreSettings};

use crate::server::rss_bytes;

struct Null;

impl FlowSink for Null {
    fn report(&self, _: Report<'_>) {}
}

const FLOWS: usize = 10;
const SPREAD_SECS: u64 = 1200;
const TIMEOUT: Duration = Duration::from_secs(1800);

fn store(capacity: u64, with_ages: bool) -> MemoryStore {
    let s = MemoryStore::new(
        StoreSettings {
            capacity,
            dedup_window: Duration::from_secs(300),
            timeout_for: Arc::new(|_| TIMEOUT),
            longest_timeout: TIMEOUT,
            step_flows: Vec::new(),
        },
        Arc::new(Null),
    );
    if !with_ages {
        return s;
    }
    s.track_open_ages(OverdueSettings {
        threshold_for: Arc::new(|_| Some(Duration::from_secs(600))),
        named: Vec::new(),
        max_flows: 10_000,
    })
}

struct Events {
    flows: Vec<Arc<str>>,
    dims: DimValues,
    now: u64,
}

impl Events {
    fn new() -> Self {
        let now = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .unwrap()
            .as_nanos() as u64;
        Self {
            flows: (0..FLOWS).map(|i| Arc::from(format!("flow_{i}"))).collect(),
            dims: Arc::from(vec![Arc::from("service-1")]),
            now,
        }
    }

    /// Instance `i`: its start `age` seconds before the run began.
    fn event(&self, i: u64, kind: EventKind, age: u64) -> FlowEvent<'static> {
        FlowEvent {
            flow: self.flows[i as usize % FLOWS].clone(),
            correlation_id: format!("order-{i:012}").into(),
            kind,
            timestamp_nanos: self.now - age * 1_000_000_000 + i % 1000,
            dims: self.dims.clone(),
            trace: None,
            source: Source::SpanEvent,
            step: None,
        }
    }
}

struct Filled {
    store: MemoryStore,
    fill_events_per_sec: f64,
    rss_per_instance: f64,
    next: u64,
}

fn fill(n: u64, with_ages: bool, events: &Events, first_id: u64) -> Filled {
    let before = rss_bytes(std::process::id());
    let store = store(n * 2, with_ages);
    let t = Instant::now();
    for i in first_id..first_id + n {
        // Every flow's instances over every second of the spread.
        store.apply(events.event(i, EventKind::Start, (i / FLOWS as u64) % SPREAD_SECS));
    }
    let secs = t.elapsed().as_secs_f64();
    let after = rss_bytes(std::process::id());
    Filled {
        store,
        fill_events_per_sec: n as f64 / secs,
        rss_per_instance: after.saturating_sub(before) as f64 / n as f64,
        next: first_id + n,
    }
}

/// Events applied in `for_time`: exports of 50 starts and 50 ends of new instances.
fn churn(f: &mut Filled, events: &Events, for_time: Duration) -> (u64, f64) {
    let until = Instant::now() + for_time;
    let began = Instant::now();
    let mut applied = 0;
    while Instant::now() < until {
        for i in f.next..f.next + 50 {
            f.store.apply(events.event(i, EventKind::Start, 0));
        }
        for i in f.next..f.next + 50 {
            f.store
                .apply(events.event(i, EventKind::End(Outcome::Success), 0));
        }
        f.next += 50;
        applied += 100;
    }
    (applied, began.elapsed().as_secs_f64())
}

/// Prints one line per measurement; returns them as JSON rows too.
pub fn run(quick: bool) -> Vec<serde_json::Value> {
    let n: u64 = if quick { 100_000 } else { 1_000_000 };
    let rounds = if quick { 2 } else { 6 };
    let events = Events::new();
    let mut plain = fill(n, false, &events, 0);
    let mut aged = fill(n, true, &events, 10 * n);
    let mut totals = [(0u64, 0f64); 2];
    for round in 0..rounds {
        // Alternate which store goes first, so neither always follows the other.
        let mut order = [(0, &mut plain), (1, &mut aged)];
        if round % 2 == 1 {
            order.reverse();
        }
        for (k, f) in order {
            let (applied, secs) = churn(f, &events, Duration::from_secs(1));
            totals[k].0 += applied;
            totals[k].1 += secs;
        }
    }
    let rate = |k: usize| totals[k].0 as f64 / totals[k].1;
    // One refresh: every flow's counts (what the maintenance reports once a second).
    let reps = 200;
    let t = Instant::now();
    let mut overdue = 0;
    for _ in 0..reps {
        overdue = (0..FLOWS)
            .map(|i| {
                aged.store
                    .open_ages(&format!("flow_{i}"))
                    .map_or(0, |(c, _)| c)
            })
            .sum::<u64>();
    }
    let refresh_us = t.elapsed().as_secs_f64() * 1e6 / f64::from(reps);
    let t = Instant::now();
    let walked = aged.store.snapshot_now().entries.len();
    let walk_ms = t.elapsed().as_secs_f64() * 1e3;
    println!(
        "objectives at {n} open ({FLOWS} flows x {SPREAD_SECS} start seconds): fill {:.0} / {:.0} events/s, RSS {:.1} / {:.1} B per \
         open instance (without / with overdue thresholds); flow path at {n} open {:.0} / {:.0} \
         events/s ({:+.1}%); one refresh {refresh_us:.0} us CPU ({overdue} overdue counted), one walk \
         over the moka cache {walk_ms:.0} ms ({walked} entries)",
        plain.fill_events_per_sec,
        aged.fill_events_per_sec,
        plain.rss_per_instance,
        aged.rss_per_instance,
        rate(0),
        rate(1),
        (rate(1) / rate(0) - 1.0) * 100.0,
    );
    vec![serde_json::json!({
        "id": format!("objectives_{n}"), "open": n, "flows": FLOWS,
        "fill_events_per_sec_without": plain.fill_events_per_sec,
        "fill_events_per_sec_with": aged.fill_events_per_sec,
        "rss_bytes_per_instance_without": plain.rss_per_instance,
        "rss_bytes_per_instance_with": aged.rss_per_instance,
        "events_per_sec_without": rate(0), "events_per_sec_with": rate(1),
        "refresh_us": refresh_us, "overdue": overdue, "moka_walk_ms": walk_ms,
    })]
}
