//! The in-process correlation store: a moka cache holds every open instance and every
//! end waiting for its start, and moka's eviction listener records what moka removes on
//! its own (time-outs and capacity evictions).
//!
//! Shape, chosen by measurement (BENCHMARKS.md): one `moka::sync::Cache` for all flows,
//! bounded by `max_in_flight` with LRU eviction (TinyLFU would refuse new entries when
//! full). Its `time_to_live` is the longest flow timeout, which moka applies exactly
//! (entries leave in write order); an entry whose deadline comes sooner (a flow with a
//! shorter timeout, an entry put back after a step or a duplicate) also gets a per-entry
//! expiry, which moka's timer wheel applies up to ~1 s late, so such an instance also
//! goes into a batch timed exactly when it is made (`exact_timeouts`).
//!
//! The files: `cache` (the moka cache, its entries and its listener, and why every
//! instance is counted exactly once), `exact_timeouts` (exact time-outs), `steps` and
//! `step_words` (flow steps), `saved` (snapshot and restore), `housekeeping` (the thread
//! that runs moka's pending tasks); here, how each event changes its entry.

mod cache;
mod exact_timeouts;
mod housekeeping;
mod saved;
#[cfg(test)]
mod step_tests;
mod step_words;
mod steps;
#[cfg(test)]
mod tests;

use std::cell::Cell;
use std::sync::{Arc, Mutex, MutexGuard, OnceLock, PoisonError};
use std::time::{Duration, Instant};

use foldhash::fast::{FixedState, RandomState};
use moka::sync::Cache;

use super::open_ages::{OpenAges, OverdueSettings};
use super::snapshot::{unix_nanos_now, StoreSnapshot};
use super::{CorrelationStore, EndRecord, FlowSink, Report, StoreSettings};
use crate::flows::dedup::{ProbeHint, RecentEvents, Seen};
use crate::flows::event::{DimValues, EventKind, FlowEvent};
#[cfg(feature = "test-hooks")]
pub use cache::CacheBaseline;
use cache::{
    build_cache, forget_age, timed_by_ttl, Clock, Gone, Key, More, Slot, SlotState, View,
    EXPIRED_IN_REMOVE,
};
use exact_timeouts::ExactTimeouts;
pub use housekeeping::Maintenance;
use saved::FinalSnapshot;
use step_words::Numbering;
use steps::{ClosedMarks, Pending, Stepped, WaitingStep};

/// Fingerprint shards: the lock of one serialises the events of its keys.
const SHARDS: usize = 64;

/// The correlation store in process: open instances in a moka cache, one replica.
pub struct MemoryStore {
    cache: Cache<Key, Slot, RandomState>,
    /// Retry fingerprints per shard; the lock also serialises each key's events.
    shards: Box<[Mutex<RecentEvents>]>,
    /// Where each shard's fingerprint table is, to prefetch without its lock.
    probe_hints: Box<[Arc<ProbeHint>]>,
    /// Two independently seeded hashers make the 128-bit key.
    key_hashers: [FixedState; 2],
    /// What `key_hashers` are made from: saved in the state file.
    key_seed: u64,
    clock: Clock,
    sink: Arc<dyn FlowSink>,
    timeout_for: Arc<dyn Fn(&str) -> Duration + Send + Sync>,
    capacity: u64,
    final_snapshot: Arc<FinalSnapshot>,
    /// Recent closes of instances of flows that use steps.
    closed: Arc<ClosedMarks>,
    /// Numbers of step names and start-dimension lists (instances with steps).
    numbering: Arc<Numbering>,
    /// Open-instance ages of flows with an overdue threshold (docs/behaviour.md §10);
    /// unset: no flow has one, and nothing is kept.
    ages: Arc<OnceLock<OpenAges>>,
    /// Exact time-outs of the instances the cache's time-to-live cannot time.
    exact: ExactTimeouts,
    /// The cache's time-to-live: the longest timeout.
    ttl: Duration,
}

impl MemoryStore {
    /// An empty store reporting to `sink`.
    pub fn new(settings: StoreSettings, sink: Arc<dyn FlowSink>) -> Self {
        Self::with_numbering(settings, sink, Numbering::default())
    }

    fn with_numbering(
        settings: StoreSettings,
        sink: Arc<dyn FlowSink>,
        numbering: Numbering,
    ) -> Self {
        // The epoch lies two dedup windows back (where the monotonic clock allows), so
        // that retry fingerprints restored from a state file keep their exact age.
        let now = Instant::now();
        let clock = Clock {
            epoch: now
                .checked_sub(settings.dedup_window.saturating_mul(2))
                .unwrap_or(now),
        };
        let final_snapshot = Arc::new(FinalSnapshot::default());
        // Remember every event of a full store for the window, at least.
        let per_shard = usize::try_from(settings.capacity.saturating_mul(2))
            .unwrap_or(usize::MAX)
            .max(1024 * SHARDS)
            / SHARDS;
        let closed = Arc::new(ClosedMarks::new(
            &settings.step_flows,
            u64::try_from(settings.longest_timeout.as_nanos()).unwrap_or(u64::MAX),
            per_shard,
        ));
        let ages = Arc::new(OnceLock::new());
        let numbering = Arc::new(numbering);
        let cache = build_cache(
            &settings,
            clock,
            sink.clone(),
            final_snapshot.clone(),
            closed.clone(),
            numbering.clone(),
            ages.clone(),
        );
        let window_nanos = u64::try_from(settings.dedup_window.as_nanos()).unwrap_or(u64::MAX);
        let tables: Vec<RecentEvents> = (0..SHARDS)
            .map(|_| RecentEvents::new(window_nanos, per_shard, 0))
            .collect();
        let probe_hints = tables.iter().map(RecentEvents::hint).collect();
        let shards = tables.into_iter().map(Mutex::new).collect();
        let seed =
            std::hash::BuildHasher::hash_one(&std::collections::hash_map::RandomState::new(), 0u8);
        // Which entries the time-to-live times exactly (see `put_new`).
        let ttl = cache.policy().time_to_live().unwrap_or(Duration::MAX);
        Self {
            cache,
            shards,
            probe_hints,
            key_hashers: key_hashers(seed),
            key_seed: seed,
            clock,
            sink,
            timeout_for: settings.timeout_for,
            capacity: settings.capacity,
            final_snapshot,
            closed,
            numbering,
            ages,
            exact: ExactTimeouts::new(settings.capacity),
            ttl,
        }
    }

    /// Keeps the ages of open instances of flows with an overdue threshold, and reports
    /// them about once a second from [`CorrelationStore::run_pending_tasks`]. Call
    /// before [`MemoryStore::restore`] and before any event.
    pub fn track_open_ages(self, settings: OverdueSettings) -> Self {
        let _ = self.ages.set(OpenAges::new(settings));
        self
    }

    /// (overdue, oldest open age in seconds) of `flow` now, as last reported.
    pub fn open_ages(&self, flow: &str) -> Option<(u64, f64)> {
        self.ages.get()?.counts(flow, unix_nanos_now())
    }

    fn key(&self, flow: &str, correlation_id: &str) -> Key {
        use std::hash::BuildHasher;
        let [a, b] = &self.key_hashers;
        (u128::from(a.hash_one((flow, correlation_id))) << 64)
            | u128::from(b.hash_one((flow, correlation_id)))
    }

    fn shard(&self, key: Key) -> MutexGuard<'_, RecentEvents> {
        // A panic while holding a shard (a sink bug) leaves the fingerprints valid.
        self.shards[shard_of(key)]
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
    }

    /// Applies one flow event (docs/behaviour.md §3).
    pub fn apply(&self, event: FlowEvent) {
        let identity = self.identify(&event);
        self.apply_at(event, identity, self.clock.now());
    }

    /// An event's key and retry fingerprint, with its fingerprint's line asked for:
    /// identified one event ahead, the line is in cache when the event is applied.
    fn identify(&self, event: &FlowEvent) -> Identity {
        use std::hash::BuildHasher;
        let key = self.key(&event.flow, &event.correlation_id);
        let is_start = event.kind == EventKind::Start;
        let fingerprint = match &event.step {
            // The step's name is part of a step event's identity.
            Some(step) => self.key_hashers[0].hash_one((key, &**step, event.timestamp_nanos)),
            None => self.key_hashers[0].hash_one((key, is_start, event.timestamp_nanos)),
        };
        self.probe_hints[shard_of(key)].prefetch(fingerprint);
        Identity { key, fingerprint }
    }

    /// Applies one flow event received at `now` (the store's clock).
    fn apply_at(&self, event: FlowEvent, identity: Identity, now: u64) {
        let Identity { key, fingerprint } = identity;
        let mut recent = self.shard(key);
        if recent.check_and_remember(fingerprint, now) == Seen::Again {
            self.sink.report(Report::Duplicate { kind: event.kind });
            return;
        }
        let sink = &*self.sink;
        let FlowEvent {
            flow,
            kind,
            timestamp_nanos,
            dims,
            trace,
            step,
            ..
        } = event;
        match kind {
            EventKind::Step => match step {
                Some(step) => self.apply_step(
                    key,
                    flow,
                    WaitingStep {
                        step,
                        timestamp_nanos,
                        trace,
                    },
                    now,
                ),
                // Not made by the extractor; a step without a name has nothing to count.
                None => sink.report(Report::StepUnmatched {
                    flow: &flow,
                    reason: super::StepUnmatchedReason::NoStart,
                }),
            },
            // Most starts open a new instance: `contains_key` answers that without
            // cloning a value or recording an access, as `get` would.
            EventKind::Start if !self.cache.contains_key(&key) => {
                self.open(key, flow, timestamp_nanos, dims, now);
            }
            EventKind::Start => match self.cache.get(&key).map(|slot| slot.state) {
                None => self.open(key, flow, timestamp_nanos, dims, now),
                Some(state) => match state.view(&self.numbering, &flow) {
                    View::Open { start_nanos, .. } => {
                        self.earlier_start(key, flow, start_nanos, timestamp_nanos, dims, now);
                    }
                    View::Stepped(open) => {
                        self.earlier_start(key, flow, open.start_nanos, timestamp_nanos, dims, now);
                    }
                    View::Waiting(_) => match self.take(key, now) {
                        Some(slot) => match slot.state.view(&self.numbering, &flow) {
                            View::Waiting(pending) => self.start_over_pending(
                                key,
                                flow,
                                timestamp_nanos,
                                dims,
                                pending,
                                now,
                            ),
                            _ => self.open(key, flow, timestamp_nanos, dims, now),
                        },
                        // What waited timed out just now (counted unmatched).
                        None => self.open(key, flow, timestamp_nanos, dims, now),
                    },
                },
            },
            EventKind::End(outcome) => {
                let end = EndRecord {
                    outcome,
                    timestamp_nanos,
                    dims,
                    trace,
                };
                self.apply_end(key, flow, end, now);
            }
        }
        drop(recent);
    }

    /// A second start of an open instance: a duplicate; the earliest start wins, and
    /// the entry keeps its deadline.
    fn earlier_start(
        &self,
        key: Key,
        flow: Arc<str>,
        known_nanos: u64,
        timestamp_nanos: u64,
        dims: DimValues,
        now: u64,
    ) {
        if timestamp_nanos < known_nanos {
            match self.take(key, now) {
                Some(mut slot) => {
                    let state = match &slot.state {
                        SlotState::More(More::Steps(words)) => {
                            SlotState::More(More::Steps(words.with_start(timestamp_nanos)))
                        }
                        state => match state.view(&self.numbering, &slot.flow) {
                            View::Open { dims, .. } => SlotState::Open {
                                start_nanos: timestamp_nanos,
                                dims: dims.clone(),
                            },
                            View::Stepped(open) => SlotState::stepped(
                                &self.numbering,
                                &slot.flow,
                                Stepped {
                                    start_nanos: timestamp_nanos,
                                    ..open.into_owned()
                                },
                            ),
                            View::Waiting(_) => state.clone(),
                        },
                    };
                    slot.state = state;
                    self.put(key, slot);
                }
                // It timed out just now: this start opens a new instance.
                None => return self.open(key, flow, timestamp_nanos, dims, now),
            }
        }
        self.sink.report(Report::Duplicate {
            kind: EventKind::Start,
        });
    }

    /// An end event: closes its open instance, or waits for the start.
    fn apply_end(&self, key: Key, flow: Arc<str>, end: EndRecord, now: u64) {
        let sink = &*self.sink;
        let Some(slot) = self.take(key, now) else {
            let state = SlotState::waiting(Pending::end(end));
            return self.put_new(key, flow, state, now);
        };
        let flow = &slot.flow;
        let waiting = match slot.state.view(&self.numbering, flow) {
            View::Open { start_nanos, dims } => {
                steps::complete(sink, flow, dims, start_nanos, &[], &end);
                None
            }
            View::Stepped(open) => {
                steps::complete(sink, flow, &open.dims, open.start_nanos, &open.steps, &end);
                None
            }
            View::Waiting(pending) if pending.end.is_some() => {
                // A second end while the first waits: the first stays.
                sink.report(Report::Duplicate {
                    kind: EventKind::End(end.outcome),
                });
                Some(slot.state.clone())
            }
            View::Waiting(pending) => Some(SlotState::waiting(Pending {
                end: Some(end),
                steps: pending.steps.clone(),
            })),
        };
        match waiting {
            Some(state) => self.put(key, Slot { state, ..slot }),
            None => self.closed.mark(flow, key, now),
        }
    }

    fn timeout_nanos(&self, flow: &str) -> u64 {
        u64::try_from((self.timeout_for)(flow).as_nanos()).unwrap_or(u64::MAX)
    }

    fn open(&self, key: Key, flow: Arc<str>, start_nanos: u64, dims: DimValues, now: u64) {
        self.sink.report(Report::Opened {
            flow: &flow,
            start_dims: &dims,
        });
        self.put_new(key, flow, SlotState::Open { start_nanos, dims }, now);
    }

    /// A new entry, due after the flow's timeout. Unless the cache's time-to-live will
    /// time it (its flow is on the longest timeout and the entry is never written
    /// again), it also goes into a batch of its timeout (`exact_timeouts`).
    fn put_new(&self, key: Key, flow: Arc<str>, state: SlotState, now: u64) {
        let timeout = self.timeout_nanos(&flow);
        if !timed_by_ttl(Duration::from_nanos(timeout), self.ttl) || self.closed.uses_steps(&flow) {
            self.exact.start(key, timeout, now);
        }
        let deadline = now.saturating_add(timeout);
        self.put(
            key,
            Slot {
                flow,
                deadline,
                state,
            },
        );
    }

    /// Every entry goes into the cache here: an open instance's start time is counted
    /// for the overdue figures before the insert, so its removal (by anyone) comes after.
    fn put(&self, key: Key, slot: Slot) {
        if let (Some(ages), Some(start_nanos)) = (self.ages.get(), slot.state.open_start()) {
            ages.opened(&slot.flow, start_nanos);
        }
        self.cache.insert(key, slot);
    }

    /// The batch holding `key` expired: its instance, if still open, is due, and is
    /// counted now as an event of it would count it (under its shard lock).
    fn time_out(&self, key: Key) {
        // From the last snapshot on, what is in the file is the next run's to count.
        if self.final_snapshot.is_taken() {
            return;
        }
        let _recent = self.shard(key);
        if let Some(slot) = self.take(key, self.clock.now()) {
            // Not due: a later instance under the key, in a batch of its own.
            self.put(key, slot);
        }
    }

    /// Removes the key's entry if it is still live. An entry that is already past its
    /// deadline is counted as timed out (by the listener, or here) and not returned.
    fn take(&self, key: Key, now: u64) -> Option<Slot> {
        EXPIRED_IN_REMOVE.with(|cell| cell.set(Some((key, false))));
        let removed = self.cache.remove(&key);
        let counted = EXPIRED_IN_REMOVE.with(Cell::take) == Some((key, true));
        let slot = removed?;
        if counted {
            return None;
        }
        // Removed by this thread (cause `Explicit`): the listener left its age here.
        forget_age(&self.ages, &slot);
        if slot.deadline <= now {
            let sink = &*self.sink;
            steps::gone(
                sink,
                &self.closed,
                &self.numbering,
                key,
                &slot,
                Gone::TimedOut,
                now,
            );
            return None;
        }
        Some(slot)
    }
}

impl CorrelationStore for MemoryStore {
    fn apply_batch(
        &self,
        events: &mut dyn Iterator<Item = FlowEvent>,
    ) -> Result<(), super::StoreError> {
        // One clock reading per export: its events arrived together.
        let now = self.clock.now();
        let mut next = events.next();
        let mut next_identity = next.as_ref().map(|e| self.identify(e));
        while let (Some(event), Some(identity)) = (next.take(), next_identity) {
            // The next event is identified (its fingerprint's line fetched) first.
            next = events.next();
            next_identity = next.as_ref().map(|e| self.identify(e));
            self.apply_at(event, identity, now);
        }
        Ok(())
    }

    fn run_pending_tasks(&self) {
        for key in self.exact.take_due() {
            self.time_out(key);
        }
        self.cache.run_pending_tasks();
        if let Some(ages) = self.ages.get() {
            ages.report_if_due(&*self.sink, unix_nanos_now());
        }
    }

    fn entries(&self) -> u64 {
        self.cache.entry_count()
    }

    fn capacity(&self) -> u64 {
        self.capacity
    }

    fn snapshot(&self) -> Option<StoreSnapshot> {
        Some(self.snapshot_now())
    }

    /// moka's iterator skips an entry past its deadline that its housekeeping has not
    /// removed yet (up to ~1 s for a per-entry deadline): such an entry is in neither
    /// the file nor the counts. So, with the file's keys known to the listener, the
    /// housekeeping runs until every entry not in the file is gone, counted here.
    fn final_snapshot(&self) -> Option<StoreSnapshot> {
        Some(self.final_snapshot_now())
    }
}

/// What the store derives from an event before applying it.
#[derive(Clone, Copy)]
struct Identity {
    key: Key,
    fingerprint: u64,
}

/// The shard of a key: its fingerprints and the lock that orders its events.
fn shard_of(key: Key) -> usize {
    (key >> 64) as usize % SHARDS
}

/// Two independently seeded hashers from one seed: the 128-bit key.
fn key_hashers(seed: u64) -> [FixedState; 2] {
    [
        FixedState::with_seed(seed),
        FixedState::with_seed(seed.rotate_left(32) ^ 0x9e37_79b9_7f4a_7c15),
    ]
}
