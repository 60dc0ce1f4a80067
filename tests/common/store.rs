//! Redis stores driven directly, several on one server standing for replicas: their
//! settings, flow events, and what they report, counted.

use std::collections::BTreeMap;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use flowmetrics::flows::event::{EventKind, FlowEvent, Outcome, Source};
use flowmetrics::flows::store::{RedisSettings, RedisStore, Report, StoreProbe, StoreSettings};
use flowmetrics::flows::CorrelationStore;

use super::redis::RedisServer;

pub const SEC: u64 = 1_000_000_000;
pub const END: EventKind = EventKind::End(Outcome::Success);

/// A probe that records nothing.
pub struct NoProbe;

impl StoreProbe for NoProbe {
    fn store_call(&self, _op: &'static str, _seconds: f64, _ok: bool) {}
}

/// What the stores report, counted per (flow, what): `started`, each outcome,
/// `incomplete` and `stalled_{last step}`, `dropped`, `unmatched` (and
/// `unmatched_evicted`), `restored`, `discarded`, `step_{step}`,
/// `step_unmatched_{reason}`; duplicates under flow `*` as `dup_{kind}`.
#[derive(Default)]
pub struct Counts(Mutex<BTreeMap<(String, String), i64>>);

impl Counts {
    pub fn get(&self, flow: &str, what: &str) -> i64 {
        let counts = self.0.lock().unwrap();
        *counts
            .get(&(flow.to_string(), what.to_string()))
            .unwrap_or(&0)
    }

    pub fn add(&self, flow: &str, what: &str) {
        let mut counts = self.0.lock().unwrap();
        *counts
            .entry((flow.to_string(), what.to_string()))
            .or_default() += 1;
    }

    /// Asserts each (what, count) of `flow`.
    #[track_caller]
    pub fn assert_counts(&self, flow: &str, want: &[(&str, i64)]) {
        for (what, n) in want {
            assert_eq!(self.get(flow, what), *n, "{flow}: {what}");
        }
    }

    /// Open instances of `flow`: started less every way of closing.
    pub fn in_progress(&self, flow: &str) -> i64 {
        let closed = ["success", "failure", "cancelled", "incomplete", "dropped"];
        self.get(flow, "started") - closed.iter().map(|w| self.get(flow, w)).sum::<i64>()
    }

    pub fn count(&self, report: &Report<'_>) {
        match report {
            Report::Opened { flow, .. } => self.add(flow, "started"),
            Report::Completed { flow, end, .. } => self.add(flow, end.outcome.as_str()),
            Report::TimedOut {
                flow, last_step, ..
            } => {
                self.add(flow, "incomplete");
                let last = last_step.map_or("start".to_string(), ToString::to_string);
                self.add(flow, &format!("stalled_{last}"));
            }
            Report::Dropped { flow, .. } => self.add(flow, "dropped"),
            Report::Unmatched { flow, evicted } => {
                self.add(flow, "unmatched");
                if *evicted {
                    self.add(flow, "unmatched_evicted");
                }
            }
            Report::Duplicate { kind } => self.add("*", &format!("dup_{}", kind.label())),
            // A shared store keeps its instances itself: nothing is restored from a file.
            Report::Restored { flow, .. } => self.add(flow, "restored"),
            Report::Discarded { flow, .. } => self.add(flow, "discarded"),
            Report::StepReached { flow, step, .. } => self.add(flow, &format!("step_{step}")),
            Report::StepUnmatched { flow, reason } => {
                self.add(flow, &format!("step_unmatched_{}", reason.label()));
            }
            Report::Overdue { .. } => {}
        }
    }
}

/// A flow event of a span event, without dimensions or trace.
pub fn ev(flow: &str, id: &str, kind: EventKind, ts: u64) -> FlowEvent<'static> {
    FlowEvent {
        flow: Arc::from(flow),
        correlation_id: id.to_owned().into(),
        kind,
        timestamp_nanos: ts,
        dims: Arc::from([]),
        trace: None,
        source: Source::SpanEvent,
        step: None,
    }
}

/// A step event named `name`.
pub fn step(flow: &str, id: &str, name: &str, ts: u64) -> FlowEvent<'static> {
    FlowEvent {
        step: Some(Arc::from(name)),
        ..ev(flow, id, EventKind::Step, ts)
    }
}

pub fn apply(store: &RedisStore, events: Vec<FlowEvent>) {
    store
        .apply_batch(&mut events.into_iter())
        .expect("store reachable");
}

/// Every flow times out after `timeout`; flows named in `step_flows` declare steps.
pub fn store_settings(capacity: u64, timeout: Duration, step_flows: &[&str]) -> StoreSettings {
    StoreSettings {
        capacity,
        dedup_window: Duration::from_secs(300),
        timeout_for: Arc::new(move |_| timeout),
        longest_timeout: timeout,
        step_flows: step_flows.iter().map(|f| Arc::from(*f)).collect(),
    }
}

/// `server` with its keys under `key_prefix` in `shards` shards.
pub fn redis_settings(
    server: &RedisServer,
    shards: u32,
    key_prefix: &str,
    pool_size: usize,
) -> RedisSettings {
    RedisSettings {
        url: server.url(),
        cluster: Vec::new(),
        shards,
        ca_file: None,
        key_prefix: key_prefix.into(),
        connect_timeout: Duration::from_millis(500),
        command_timeout: Duration::from_secs(2),
        pool_size,
    }
}

/// Runs every store's housekeeping once.
pub fn run_pending_tasks<'a>(stores: impl IntoIterator<Item = &'a RedisStore>) {
    for s in stores {
        s.run_pending_tasks();
    }
}

/// Runs every store's housekeeping until `until` holds (bounded: 10 s).
pub fn sweep_until<'a>(
    stores: impl Iterator<Item = &'a RedisStore> + Clone,
    until: impl Fn() -> bool,
) {
    let give_up = Instant::now() + Duration::from_secs(10);
    while !until() && Instant::now() < give_up {
        run_pending_tasks(stores.clone());
        std::thread::sleep(Duration::from_millis(10));
    }
}

/// The server of a test that needs one; returns from the test (skipped) when
/// redis-server is not installed.
#[macro_export]
macro_rules! redis_server {
    () => {
        match $crate::common::redis::RedisServer::start() {
            Some(s) => s,
            None => return,
        }
    };
}
