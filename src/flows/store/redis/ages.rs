//! Overdue instances on the shared store (docs/behaviour.md §10): per shard and flow, a
//! hash of open instances by start second (`<shard prefix>ages:<flow>`, field = Unix
//! second, value = count). The apply and sweep scripts do not write it: each call that
//! opens or closes instances appends its changes, summed per (flow, second), to the
//! shard's log (`<shard prefix>agelog`, one APPEND per call), folded into the hashes
//! before the counts are read (and whenever it grows past 64 KiB): see `ages_log.lua`.
//! Only flows with a threshold are counted: their events carry the flow's name to the
//! script (so that it parses no key), the others nothing more than before. About every
//! two seconds each replica asks every shard for its counts of the flows it knows with a
//! threshold: the values are global (the same on every replica), so Prometheus
//! aggregates them with `max by (flow)`, not `sum`.

use std::collections::HashMap;
use std::sync::{Arc, Mutex, PoisonError, RwLock};
use std::time::{Duration, Instant};

use redis::{Cmd, FromRedisValue, Script};

use super::pool::Target;
use super::RedisStore;
use crate::flows::store::{OverdueSettings, Report};

/// How often the counts are read (docs/behaviour.md §10: at most 5 s old).
const REFRESH_EVERY: Duration = Duration::from_secs(2);

/// Per flow, the overdue count and the oldest start second, after folding the shard's
/// log of changes; last, the server's time.
const AGES: &str = concat!(include_str!("ages_log.lua"), include_str!("ages.lua"));

pub(super) struct RedisAges {
    settings: OverdueSettings,
    script: Script,
    /// Flows seen by this replica (or named in the config), with their threshold in
    /// seconds (`None`: not tracked); at most `settings.max_flows` (reported), beyond
    /// which a flow's threshold is looked up on each event (still counted: another
    /// replica may have counted its opens).
    flows: RwLock<HashMap<Arc<str>, Option<f64>>>,
    last_report: Mutex<Option<Instant>>,
}

impl RedisAges {
    pub(super) fn new(settings: OverdueSettings) -> Self {
        let this = Self {
            script: Script::new(AGES),
            flows: RwLock::new(HashMap::new()),
            last_report: Mutex::new(None),
            settings,
        };
        for flow in this.settings.named.clone() {
            this.counted(&Arc::from(flow));
        }
        this
    }

    /// Whether the open instances of `flow` are counted (it has a threshold); the flow
    /// is remembered for the reports.
    pub(super) fn counted(&self, flow: &Arc<str>) -> bool {
        if let Some(known) = self
            .flows
            .read()
            .unwrap_or_else(PoisonError::into_inner)
            .get(flow)
        {
            return known.is_some();
        }
        let threshold = (self.settings.threshold_for)(flow).map(|t| t.as_secs_f64());
        let mut flows = self.flows.write().unwrap_or_else(PoisonError::into_inner);
        if flows.len() < self.settings.max_flows {
            flows.insert(flow.clone(), threshold);
        }
        threshold.is_some()
    }

    /// Reads every shard's counts and reports them, at most every [`REFRESH_EVERY`].
    /// Called from the store's maintenance.
    pub(super) fn report_if_due(&self, store: &RedisStore) {
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

    /// (overdue, oldest open age in seconds) per tracked flow, over every shard; `None`
    /// when a shard did not answer (nothing is reported then, rather than a part).
    fn read(&self, store: &RedisStore, tracked: &[(Arc<str>, f64)]) -> Option<Vec<(u64, f64)>> {
        let per_call = match store.pool.target {
            Target::Cluster(_) => 1,
            Target::One(_) => store.shards.len(),
        };
        let mut overdue = vec![0u64; tracked.len()];
        let mut oldest = vec![i64::MAX; tracked.len()];
        let mut now = 0.0f64;
        let shard_ids: Vec<usize> = (0..store.shards.len()).collect();
        for group in shard_ids.chunks(per_call) {
            let cmds: Vec<Cmd> = group
                .iter()
                .map(|&n| {
                    let mut cmd = redis::cmd("EVALSHA");
                    cmd.arg(self.script.get_hash())
                        .arg(1)
                        .arg(&store.shards[n].deadlines[..]);
                    for (flow, threshold) in tracked {
                        cmd.arg(flow.as_bytes()).arg(threshold.to_string());
                    }
                    cmd
                })
                .collect();
            // Counted with the sweeper's calls: the same maintenance, reads only.
            let results = store.eval_all("sweep", &self.script, &cmds).ok()?;
            for result in results {
                let out: Vec<String> = result
                    .and_then(|v| Vec::<String>::from_redis_value(v).map_err(Into::into))
                    .ok()?;
                let (server_now, pairs) = out.split_last()?;
                now = now.max(server_now.parse().ok()?);
                for (i, pair) in pairs.chunks(2).enumerate().take(tracked.len()) {
                    let [count, second] = pair else { return None };
                    overdue[i] += count.parse::<u64>().ok()?;
                    let second: i64 = second.parse().ok()?;
                    if second >= 0 {
                        oldest[i] = oldest[i].min(second);
                    }
                }
            }
        }
        Some(
            overdue
                .into_iter()
                .zip(oldest)
                .map(|(count, second)| {
                    let age = if second == i64::MAX {
                        0.0
                    } else {
                        (now - second as f64).max(0.0)
                    };
                    (count, age)
                })
                .collect(),
        )
    }
}
