//! How old the open instances of each flow are (docs/behaviour.md §10 "overdue"),
//! without a walk over the instances: per flow, a count of open instances by the second
//! their start timestamp falls in, kept as they open and close.
//!
//! Each flow with an overdue threshold has a small hash map from start second to the
//! number of open instances that started in it, under the flow's own lock: opening or
//! closing an instance changes one counter (a second whose count reaches 0 goes). About
//! once a second the store asks for the counts: the overdue instances are those of every
//! second older than the threshold, the oldest open one is in the earliest second. Both
//! are exact to the second. The map holds at most one entry per distinct start second of
//! the flow's open instances (a flow's timeout in seconds, in steady state), so it is
//! bounded by the store's own capacity, and a refresh costs that many entries per flow
//! whatever the number of open instances.

use std::collections::HashMap;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, PoisonError, RwLock};
use std::time::Duration;

use foldhash::fast::RandomState;

use super::{FlowSink, Report};

/// How often the counts go to the sink (docs/behaviour.md §10: at most 5 s old).
pub const REFRESH_EVERY: Duration = Duration::from_secs(1);
const NANOS: u64 = 1_000_000_000;

/// A flow's overdue threshold, if it has one.
pub type ThresholdFor = Arc<dyn Fn(&str) -> Option<Duration> + Send + Sync>;

/// Which flows have an overdue threshold, and how long their instances can stay open.
#[derive(Clone)]
pub struct OverdueSettings {
    /// `overdue_after`, else the objective's `within`; `None`: not tracked.
    pub threshold_for: ThresholdFor,
    /// Flows named in the config with a threshold: reported (at 0) from the start.
    pub named: Vec<String>,
    /// Flows tracked at most (`limits.max_series_per_metric`).
    pub max_flows: usize,
}

/// Open-instance ages of every flow with an overdue threshold.
pub struct OpenAges {
    settings: OverdueSettings,
    /// `None`: a flow seen without a threshold (remembered, so it is looked up once).
    flows: RwLock<HashMap<Arc<str>, Option<Arc<FlowAges>>, RandomState>>,
    /// Unix seconds of the last report.
    last_report: AtomicU64,
}

struct FlowAges {
    threshold_nanos: u64,
    seconds: Mutex<Seconds>,
}

impl OpenAges {
    /// Tracks the flows with a threshold in `settings`.
    pub fn new(settings: OverdueSettings) -> Self {
        let this = Self {
            settings,
            flows: RwLock::new(HashMap::default()),
            last_report: AtomicU64::new(0),
        };
        for flow in this.settings.named.clone() {
            this.flow(&Arc::from(flow));
        }
        this
    }

    /// An instance of `flow` opened with this start timestamp. Called before the
    /// instance is stored, so that its close can never come first.
    pub fn opened(&self, flow: &Arc<str>, start_nanos: u64) {
        {
            // The common case: a flow seen before, under the read lock (no clone).
            let flows = self.flows.read().unwrap_or_else(PoisonError::into_inner);
            if let Some(known) = flows.get(&**flow) {
                if let Some(ages) = known {
                    lock(&ages.seconds).add(start_nanos / NANOS);
                }
                return;
            }
        }
        if let Some(ages) = self.flow(flow) {
            lock(&ages.seconds).add(start_nanos / NANOS);
        }
    }

    /// An instance opened with [`OpenAges::opened`] left the store (end, time-out,
    /// eviction).
    pub fn closed(&self, flow: &str, start_nanos: u64) {
        let flows = self.flows.read().unwrap_or_else(PoisonError::into_inner);
        if let Some(Some(ages)) = flows.get(flow) {
            lock(&ages.seconds).remove(start_nanos / NANOS);
        }
    }

    /// (overdue, age of the oldest in seconds) of `flow` at `now_nanos` (Unix); `None`
    /// when the flow is not tracked.
    pub fn counts(&self, flow: &str, now_nanos: u64) -> Option<(u64, f64)> {
        let flows = self.flows.read().unwrap_or_else(PoisonError::into_inner);
        let ages = flows.get(flow)?.as_ref()?;
        let seconds = lock(&ages.seconds);
        Some(seconds.counts(now_nanos, ages.threshold_nanos))
    }

    /// Reports every tracked flow's counts to `sink`, at most once per
    /// [`REFRESH_EVERY`]. Called from the store's maintenance.
    pub fn report_if_due(&self, sink: &dyn FlowSink, now_nanos: u64) {
        let now_secs = now_nanos / NANOS;
        let last = self.last_report.load(Ordering::Relaxed);
        if now_secs.saturating_sub(last) < REFRESH_EVERY.as_secs() {
            return;
        }
        self.last_report.store(now_secs, Ordering::Relaxed);
        let tracked: Vec<(Arc<str>, Arc<FlowAges>)> = self
            .flows
            .read()
            .unwrap_or_else(PoisonError::into_inner)
            .iter()
            .filter_map(|(flow, ages)| Some((flow.clone(), ages.clone()?)))
            .collect();
        for (flow, ages) in tracked {
            // The flow's lock is held for the count only, never while reporting.
            let (overdue, oldest_open_secs) =
                lock(&ages.seconds).counts(now_nanos, ages.threshold_nanos);
            sink.report(Report::Overdue {
                flow: &flow,
                overdue,
                oldest_open_secs,
            });
        }
    }

    /// The flow's ages, made on first sight when it has a threshold.
    fn flow(&self, flow: &Arc<str>) -> Option<Arc<FlowAges>> {
        if let Some(known) = self
            .flows
            .read()
            .unwrap_or_else(PoisonError::into_inner)
            .get(&**flow)
        {
            return known.clone();
        }
        let mut flows = self.flows.write().unwrap_or_else(PoisonError::into_inner);
        if let Some(known) = flows.get(&**flow) {
            return known.clone();
        }
        if flows.len() >= self.settings.max_flows {
            return None;
        }
        let ages = (self.settings.threshold_for)(flow).map(|threshold| {
            Arc::new(FlowAges {
                threshold_nanos: u64::try_from(threshold.as_nanos()).unwrap_or(u64::MAX),
                seconds: Mutex::new(Seconds::default()),
            })
        });
        flows.insert(flow.clone(), ages.clone());
        ages
    }
}

fn lock<T>(m: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    m.lock().unwrap_or_else(PoisonError::into_inner)
}

/// Open instances by start second.
#[derive(Default)]
struct Seconds {
    counts: HashMap<u64, u64, RandomState>,
}

impl Seconds {
    fn add(&mut self, second: u64) {
        *self.counts.entry(second).or_insert(0) += 1;
    }

    fn remove(&mut self, second: u64) {
        if let Some(count) = self.counts.get_mut(&second) {
            *count -= 1;
            if *count == 0 {
                self.counts.remove(&second);
                // After a burst, give the room back.
                if self.counts.capacity() > 1024 && self.counts.len() < self.counts.capacity() / 8 {
                    self.counts.shrink_to(self.counts.len() * 2);
                }
            }
        }
    }

    /// Instances whose start second lies wholly more than `threshold` before `now`,
    /// and the age of the earliest non-empty second (0 when none is open).
    fn counts(&self, now_nanos: u64, threshold_nanos: u64) -> (u64, f64) {
        // Second `s` is overdue when even its last instant, s + 1, is past the threshold.
        let overdue_before = now_nanos.saturating_sub(threshold_nanos) / NANOS;
        let mut overdue = 0;
        let mut oldest = u64::MAX;
        for (&second, &count) in &self.counts {
            oldest = oldest.min(second);
            if second < overdue_before {
                overdue += count;
            }
        }
        let age = if oldest == u64::MAX {
            0.0
        } else {
            now_nanos.saturating_sub(oldest.saturating_mul(NANOS)) as f64 / 1e9
        };
        (overdue, age)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn ages(threshold: u64) -> OpenAges {
        OpenAges::new(OverdueSettings {
            threshold_for: Arc::new(move |flow| {
                (flow != "untracked").then_some(Duration::from_secs(threshold))
            }),
            named: vec!["named".into()],
            max_flows: 3,
        })
    }

    const NOW: u64 = 1_700_000_000 * NANOS;

    #[test]
    fn counts_what_is_older_than_the_threshold_and_forgets_what_closed() {
        let a = ages(10);
        let f: Arc<str> = Arc::from("f");
        for age in [0, 5, 9, 11, 20, 20, 299] {
            a.opened(&f, NOW - age * NANOS);
        }
        assert_eq!(a.counts("f", NOW), Some((4, 299.0)));
        a.closed("f", NOW - 299 * NANOS);
        a.closed("f", NOW - 20 * NANOS);
        assert_eq!(a.counts("f", NOW), Some((2, 20.0)));
        // Ten seconds on, the ones at 5 and 9 s are overdue too.
        assert_eq!(a.counts("f", NOW + 10 * NANOS), Some((4, 30.0)));
    }

    #[test]
    fn far_off_and_repeated_seconds_are_counted() {
        let a = ages(10);
        let f: Arc<str> = Arc::from("f");
        // Far in the past (a late export), and twice the same second.
        for age in [0, 128, 128 * 1000, 128] {
            a.opened(&f, NOW - age * NANOS);
        }
        assert_eq!(a.counts("f", NOW), Some((3, 128_000.0)));
        a.closed("f", NOW);
        a.closed("f", NOW - 128 * 1000 * NANOS);
        assert_eq!(a.counts("f", NOW), Some((2, 128.0)));
        a.closed("f", NOW - 128 * NANOS);
        a.closed("f", NOW - 128 * NANOS);
        assert_eq!(a.counts("f", NOW), Some((0, 0.0)));
        // A close of what was never opened changes nothing.
        a.closed("f", NOW);
        assert_eq!(a.counts("f", NOW), Some((0, 0.0)));
    }

    #[test]
    fn only_flows_with_a_threshold_are_tracked_and_at_most_max_flows() {
        let a = ages(10);
        assert_eq!(a.counts("named", NOW), Some((0, 0.0)));
        a.opened(&Arc::from("untracked"), NOW);
        assert_eq!(a.counts("untracked", NOW), None);
        a.opened(&Arc::from("b"), NOW);
        a.opened(&Arc::from("c"), NOW);
        assert_eq!(a.counts("b", NOW), Some((0, 0.0)));
        assert_eq!(a.counts("c", NOW), None, "three flows at most");
    }
}
