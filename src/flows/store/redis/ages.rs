//! Overdue instances on the shared store (docs/behaviour.md §10): per flow with a
//! threshold, a hash of its open instances by start second (`<first shard's
//! prefix>ages:<flow>`, field = Unix second, value = count), all in the first shard's hash
//! slot, so that one call reads every count.
//!
//! The apply and sweep scripts do not keep them (doing so cost Redis a fifth more time
//! per event: BENCHMARKS.md). Their answers already say which instance opened (the
//! event's start) and which closed, timed out or was evicted (its stored value, with its
//! start): each replica sums those changes per (flow, second) in memory, where an instance
//! opened and closed between two writes costs nothing, and writes them in one call at
//! most every [`WRITE_EVERY`], before it reads the counts, and at shutdown.
//!
//! The counts are global (the same on every replica), so Prometheus aggregates them with
//! `max by (flow)`, not `sum`. A change that is never written (a replica killed between
//! two writes, a sweep whose reply was lost) leaves a count off. No instance stays open
//! longer than its flow's timeout after its start arrived, so unless a start arrives a
//! timeout (plus an hour, [`SETTLE_SLACK`]) after its own timestamp, a start second older
//! than twice the timeout plus an hour holds no open instance: the read deletes what is
//! left there.

use std::collections::HashMap;
use std::sync::{Arc, Mutex, PoisonError, RwLock};
use std::time::{Duration, Instant};

use redis::{FromRedisValue, Script};

use super::RedisStore;
use crate::flows::store::{OverdueSettings, Report};
use crate::logging::RateLimited;

/// How often the counts are read (docs/behaviour.md §10: at most 5 s old).
const REFRESH_EVERY: Duration = Duration::from_secs(2);
/// Changes wait at most this long to be written (what another replica reads lags by it).
const WRITE_EVERY: Duration = Duration::from_millis(250);
/// (flow, second) changes held while the store cannot be written; beyond, new ones are
/// dropped (logged): the counts are then off until those seconds are settled.
const MAX_UNWRITTEN: usize = 100_000;
/// Changes per write call: bounds how long one call holds the server.
const WRITE_CHUNK: usize = 1000;
/// Added to twice the flow's timeout before a start second's count is stale: room for
/// clients whose clocks are behind, starts that arrive late, and late sweeps.
const SETTLE_SLACK: Duration = Duration::from_secs(3600);

const READ: &str = include_str!("ages.lua");
const WRITE: &str = include_str!("ages_write.lua");

pub(super) struct RedisAges {
    settings: OverdueSettings,
    read: Script,
    write: Script,
    /// Flows seen by this replica (or named in the config), with their threshold in
    /// seconds (`None`: not tracked); at most `settings.max_flows` (reported), beyond
    /// which a flow's threshold is looked up on each change.
    flows: RwLock<HashMap<Arc<str>, Option<f64>>>,
    last_report: Mutex<Option<Instant>>,
    unwritten: Mutex<Unwritten>,
    dropped: RateLimited,
}

/// Opens minus closes per (flow, start second), not written yet.
#[derive(Default)]
struct Unwritten {
    changes: HashMap<(Arc<str>, i64), i64>,
    /// When the oldest of them was made.
    since: Option<Instant>,
}

impl RedisAges {
    pub(super) fn new(settings: OverdueSettings) -> Self {
        let this = Self {
            read: Script::new(READ),
            write: Script::new(WRITE),
            flows: RwLock::new(HashMap::new()),
            last_report: Mutex::new(None),
            unwritten: Mutex::default(),
            dropped: RateLimited::new(Duration::from_secs(10)),
            settings,
        };
        for flow in this.settings.named.clone() {
            this.counted(&flow);
        }
        this
    }

    /// The flow, when its open instances are counted (it has a threshold); the flow is
    /// remembered for the reports.
    fn counted(&self, flow: &str) -> Option<Arc<str>> {
        if let Some((name, known)) = self
            .flows
            .read()
            .unwrap_or_else(PoisonError::into_inner)
            .get_key_value(flow)
        {
            return known.map(|_| name.clone());
        }
        let threshold = (self.settings.threshold_for)(flow).map(|t| t.as_secs_f64());
        let name: Arc<str> = Arc::from(flow);
        let mut flows = self.flows.write().unwrap_or_else(PoisonError::into_inner);
        if flows.len() < self.settings.max_flows {
            flows.insert(name.clone(), threshold);
        }
        threshold.map(|_| name)
    }

    /// An instance of `flow` opened with this start.
    pub(super) fn opened(&self, flow: &str, start_nanos: u64) {
        self.change(flow, start_nanos, 1);
    }

    /// An open instance of `flow` with this start left the store (closed, timed out,
    /// evicted).
    pub(super) fn closed(&self, flow: &str, start_nanos: u64) {
        self.change(flow, start_nanos, -1);
    }

    fn change(&self, flow: &str, start_nanos: u64, by: i64) {
        let Some(flow) = self.counted(flow) else {
            return;
        };
        let second = i64::try_from(start_nanos / 1_000_000_000).unwrap_or(i64::MAX);
        let mut unwritten = self
            .unwritten
            .lock()
            .unwrap_or_else(PoisonError::into_inner);
        let full = unwritten.changes.len() >= MAX_UNWRITTEN;
        match unwritten.changes.get_mut(&(flow.clone(), second)) {
            Some(sum) => *sum += by,
            None if full => {
                return self.dropped.warn(format_args!(
                    "correlation store (redis): {MAX_UNWRITTEN} changes to the overdue counts \
                     not written; newer ones are dropped until the store takes them"
                ));
            }
            None => {
                unwritten.changes.insert((flow, second), by);
            }
        }
        unwritten.since.get_or_insert_with(Instant::now);
    }

    /// From the store's maintenance: writes the changes when they are due, and reads
    /// and reports the counts about every [`REFRESH_EVERY`].
    pub(super) fn maintain(&self, store: &RedisStore) {
        let due = self
            .unwritten
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .since
            .is_some_and(|t| t.elapsed() >= WRITE_EVERY);
        if due {
            self.write_changes(store);
        }
        self.report_if_due(store);
    }

    /// Writes every change not written yet; what the store refuses is kept for the next
    /// time.
    pub(super) fn write_changes(&self, store: &RedisStore) {
        let changes: Vec<((Arc<str>, i64), i64)> = {
            let mut unwritten = self
                .unwritten
                .lock()
                .unwrap_or_else(PoisonError::into_inner);
            unwritten.since = None;
            unwritten
                .changes
                .drain()
                .filter(|(_, by)| *by != 0)
                .collect()
        };
        let first = &store.shards[0].deadlines[..];
        for (n, chunk) in changes.chunks(WRITE_CHUNK).enumerate() {
            let mut cmd = redis::cmd("EVALSHA");
            cmd.arg(self.write.get_hash()).arg(1).arg(first);
            for ((flow, second), by) in chunk {
                cmd.arg(flow.as_bytes()).arg(*second).arg(*by);
            }
            // Counted with the sweeper's calls: the same maintenance.
            let written = store
                .eval_all("sweep", &self.write, std::slice::from_ref(&cmd))
                .is_ok_and(|results| results.iter().all(Result::is_ok));
            if !written {
                self.keep(&changes[n * WRITE_CHUNK..]);
                return;
            }
        }
    }

    /// Puts back changes that could not be written.
    fn keep(&self, changes: &[((Arc<str>, i64), i64)]) {
        let mut unwritten = self
            .unwritten
            .lock()
            .unwrap_or_else(PoisonError::into_inner);
        for ((flow, second), by) in changes {
            if unwritten.changes.len() >= MAX_UNWRITTEN {
                break;
            }
            *unwritten
                .changes
                .entry((flow.clone(), *second))
                .or_default() += by;
        }
        unwritten.since.get_or_insert_with(Instant::now);
    }

    /// Writes this replica's changes, then reads the counts and reports them, at most
    /// every [`REFRESH_EVERY`].
    fn report_if_due(&self, store: &RedisStore) {
        {
            let mut last = self
                .last_report
                .lock()
                .unwrap_or_else(PoisonError::into_inner);
            if last.is_some_and(|t| t.elapsed() < REFRESH_EVERY) {
                return;
            }
            *last = Some(Instant::now());
        }
        let mut tracked: Vec<(Arc<str>, f64)> = self
            .flows
            .read()
            .unwrap_or_else(PoisonError::into_inner)
            .iter()
            .filter_map(|(flow, t)| Some((flow.clone(), (*t)?)))
            .collect();
        if tracked.is_empty() {
            return;
        }
        tracked.sort_by(|a, b| a.0.cmp(&b.0));
        self.write_changes(store);
        let Some(counts) = self.read(store, &tracked) else {
            return;
        };
        for ((flow, _), (overdue, oldest_open_secs)) in tracked.iter().zip(counts) {
            store.sink.report(Report::Overdue {
                flow,
                overdue,
                oldest_open_secs,
            });
        }
    }

    /// (overdue, oldest open age in seconds) per tracked flow; `None` when the store did
    /// not answer (nothing is reported then).
    fn read(&self, store: &RedisStore, tracked: &[(Arc<str>, f64)]) -> Option<Vec<(u64, f64)>> {
        let mut cmd = redis::cmd("EVALSHA");
        cmd.arg(self.read.get_hash())
            .arg(1)
            .arg(&store.shards[0].deadlines[..]);
        for (flow, threshold) in tracked {
            let settled_after = (store.timeout_for)(flow)
                .saturating_mul(2)
                .saturating_add(SETTLE_SLACK)
                .as_secs();
            cmd.arg(flow.as_bytes())
                .arg(threshold.to_string())
                .arg(settled_after);
        }
        let results = store
            .eval_all("sweep", &self.read, std::slice::from_ref(&cmd))
            .ok()?;
        let out: Vec<String> = results
            .into_iter()
            .next()?
            .and_then(|v| Vec::<String>::from_redis_value(v).map_err(Into::into))
            .ok()?;
        let (now, pairs) = out.split_last()?;
        let now: f64 = now.parse().ok()?;
        pairs
            .chunks(2)
            .take(tracked.len())
            .map(|pair| {
                let [count, second] = pair else { return None };
                let second: i64 = second.parse().ok()?;
                let age = if second < 0 {
                    0.0
                } else {
                    (now - second as f64).max(0.0)
                };
                Some((count.parse::<u64>().ok()?, age))
            })
            .collect()
    }
}
