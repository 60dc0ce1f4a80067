//! The in-process correlation store: a moka cache holds every open instance and every
//! end waiting for its start, and moka's eviction listener records what moka removes on
//! its own (time-outs and capacity evictions).
//!
//! Shape, chosen by measurement (BENCHMARKS.md): one `moka::sync::Cache` for all flows,
//! bounded by `max_in_flight` with LRU eviction (TinyLFU would refuse new entries when
//! full). Its `time_to_live` is the longest flow timeout, which moka applies exactly
//! (entries leave in write order); an entry whose deadline comes sooner (a flow with a
//! shorter timeout, an entry put back after a duplicate) also gets a per-entry expiry,
//! which moka's timer wheel applies up to ~1 s late.
//!
//! Exactly once: every event of one instance is applied under the lock of its shard
//! (the shard also holds that instance's retry fingerprints), so the read-modify-write
//! of one key never interleaves with another event of the same key. What remains is
//! moka's own removals, which can race with ours:
//! - `remove` may hand back an entry that expired by its time-to-live; moka then also
//!   calls the listener (in this thread, before `remove` returns) with `Expired`. The
//!   listener counts it, and tells this thread so through [`EXPIRED_IN_REMOVE`].
//! - `remove` may hand back an entry past its per-entry deadline with cause `Explicit`:
//!   the listener records nothing, so the caller counts it (it checks the deadline).
//! - `insert` over an entry that `get` no longer returns (past its per-entry deadline)
//!   reports the old one as `Replaced`: the listener counts it as timed out. The store
//!   never replaces a live entry.
//! - housekeeping removes an entry before calling the listener, so a concurrent `remove`
//!   of the same key finds nothing: one of the two owns the entry.

mod saved;
#[cfg(test)]
mod step_tests;
mod step_words;
mod steps;

use std::borrow::Cow;
use std::cell::Cell;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex, MutexGuard, OnceLock};
use std::time::{Duration, Instant};

use foldhash::fast::{FixedState, RandomState};
use moka::notification::RemovalCause;
use moka::policy::{EvictionPolicy, Expiry};
use moka::sync::Cache;

use super::open_ages::{OpenAges, OverdueSettings};
use super::{
    CorrelationStore, EndRecord, FlowSink, Report, RestoreRules, RestoreSummary, StoreSettings,
};
use crate::flows::dedup::{RecentEvents, Seen};
use crate::flows::event::{DimValues, EventKind, FlowEvent};
use crate::flows::state::{unix_nanos_now, SavedEntry, SavedShard, StoreSnapshot};
use crate::logging::RateLimited;
use step_words::{Numbering, Words};
use steps::{ClosedMarks, Pending, Stepped, WaitingStep};

/// An instance's identity, (flow, correlation id), as a 128-bit digest: a moka key
/// with no allocation and no string compare (collisions: ~2⁻⁸⁸ at a million entries).
type Key = u128;

/// A moka value: small and cheap to clone (moka clones it on `get` and for the
/// listener).
#[derive(Clone, Debug)]
struct Slot {
    flow: Arc<str>,
    /// Store clock (nanoseconds since [`Clock::epoch`]) at which the entry times out.
    deadline: u64,
    state: SlotState,
}

#[derive(Clone, Debug)]
enum SlotState {
    Open {
        /// Earliest start timestamp seen (duplicates can only lower it).
        start_nanos: u64,
        dims: DimValues,
    },
    /// Open with steps reached, or an end and/or steps waiting for the start (see
    /// [`steps`]). At most 16 bytes beside the niche of `dims`: `Open` entries are
    /// exactly as small as without steps.
    More(More),
}

#[derive(Clone, Debug)]
enum More {
    /// Open with steps, by number ([`step_words`]): one allocation.
    Steps(Words),
    Shared(Arc<Shared>),
}

#[derive(Debug)]
enum Shared {
    /// Open with steps by name, when they cannot be numbered.
    Stepped(Stepped),
    Waiting(Pending),
}

/// A slot's state, borrowed, with the shared cases unwrapped (steps held by number
/// read back by name).
enum View<'a> {
    Open {
        start_nanos: u64,
        dims: &'a DimValues,
    },
    Stepped(Cow<'a, Stepped>),
    Waiting(&'a Pending),
}

impl SlotState {
    /// An open instance with steps: by number where it can be.
    fn stepped(numbering: &Numbering, flow: &Arc<str>, open: Stepped) -> Self {
        SlotState::More(match numbering.encode(flow, &open) {
            Some(words) => More::Steps(words),
            None => More::Shared(Arc::new(Shared::Stepped(open))),
        })
    }

    fn waiting(pending: Pending) -> Self {
        SlotState::More(More::Shared(Arc::new(Shared::Waiting(pending))))
    }

    /// The start time of an open instance (with or without steps).
    fn open_start(&self) -> Option<u64> {
        match self {
            SlotState::Open { start_nanos, .. } => Some(*start_nanos),
            SlotState::More(More::Steps(words)) => Some(words.start_nanos()),
            SlotState::More(More::Shared(shared)) => match &**shared {
                Shared::Stepped(open) => Some(open.start_nanos),
                Shared::Waiting(_) => None,
            },
        }
    }

    fn is_waiting(&self) -> bool {
        matches!(self, SlotState::More(More::Shared(shared)) if matches!(**shared, Shared::Waiting(_)))
    }

    /// `flow`: the entry's flow (step numbers are per flow).
    fn view<'a>(&'a self, numbering: &Numbering, flow: &str) -> View<'a> {
        match self {
            SlotState::Open { start_nanos, dims } => View::Open {
                start_nanos: *start_nanos,
                dims,
            },
            SlotState::More(More::Steps(words)) => {
                View::Stepped(Cow::Owned(numbering.decode(flow, words)))
            }
            SlotState::More(More::Shared(shared)) => match &**shared {
                Shared::Stepped(open) => View::Stepped(Cow::Borrowed(open)),
                Shared::Waiting(pending) => View::Waiting(pending),
            },
        }
    }
}

/// Why an entry left without its counterpart.
#[derive(Clone, Copy, PartialEq, Eq)]
enum Gone {
    TimedOut,
    Evicted,
}

/// Nanoseconds since the store was made, from a monotonic clock (as moka's own).
#[derive(Clone, Copy)]
struct Clock {
    epoch: Instant,
}

impl Clock {
    fn at(&self, t: Instant) -> u64 {
        u64::try_from(t.saturating_duration_since(self.epoch).as_nanos()).unwrap_or(u64::MAX)
    }

    fn now(&self) -> u64 {
        self.at(Instant::now())
    }
}

thread_local! {
    /// The key this thread is removing, and whether the listener (called by moka
    /// inside that `remove`) counted it as expired.
    static EXPIRED_IN_REMOVE: Cell<Option<(Key, bool)>> = const { Cell::new(None) };
}

/// Entries whose remaining time is within this of the cache's time-to-live are left to
/// the time-to-live (exact) instead of the per-entry timer wheel (coarse).
const TTL_SLACK: Duration = Duration::from_millis(50);
/// moka refuses a time-to-live of a thousand years or more.
const LONGEST_TTL: Duration = Duration::from_secs(100 * 365 * 24 * 3600);
/// Capacity evictions are logged at most this often.
const EVICTION_WARN_EVERY: Duration = Duration::from_secs(10);
const SHARDS: usize = 64;

/// The keys of the final snapshot, once it is taken: from then on, an entry moka
/// removes is counted only if it is not in the file (the next run counts those).
#[derive(Default)]
struct FinalSnapshot {
    taken: AtomicBool,
    /// Sorted.
    keys: Mutex<Vec<Key>>,
    /// Entries of the file that moka removed since (not counted here).
    left_to_next_run: AtomicU64,
}

impl FinalSnapshot {
    /// Called by the listener for an entry moka removed: whether it is in the file, so
    /// the next run counts it (and it is tallied as such here).
    fn leave_to_next_run(&self, key: Key) -> bool {
        if !self.taken.load(Ordering::Acquire) {
            return false;
        }
        let keys = self.keys.lock().unwrap_or_else(|p| p.into_inner());
        let held = keys.binary_search(&key).is_ok();
        if held {
            self.left_to_next_run.fetch_add(1, Ordering::AcqRel);
        }
        held
    }
}

/// How long the final snapshot waits for moka to remove entries already past their
/// per-entry deadline (its timer wheel's buckets are ~1.07 s).
const FINAL_SETTLE_LIMIT: Duration = Duration::from_millis(1500);

/// Per-entry expiry: only for entries due before the time-to-live would remove them.
struct Deadlines {
    clock: Clock,
    ttl: Duration,
}

impl Expiry<Key, Slot> for Deadlines {
    fn expire_after_create(&self, _: &Key, slot: &Slot, created_at: Instant) -> Option<Duration> {
        let remaining =
            Duration::from_nanos(slot.deadline.saturating_sub(self.clock.at(created_at)));
        (remaining + TTL_SLACK < self.ttl).then_some(remaining)
    }
}

pub struct MemoryStore {
    cache: Cache<Key, Slot, RandomState>,
    /// Retry fingerprints per shard; the lock also serialises each key's events.
    shards: Box<[Mutex<RecentEvents>]>,
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
}

impl MemoryStore {
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
        let shards = (0..SHARDS)
            .map(|_| Mutex::new(RecentEvents::new(window_nanos, per_shard, 0)))
            .collect();
        let seed =
            std::hash::BuildHasher::hash_one(&std::collections::hash_map::RandomState::new(), 0u8);
        Self {
            cache,
            shards,
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

    /// Reads back a snapshot (written at shutdown or at a checkpoint) into this new,
    /// empty store: the entries with their original deadlines (capped by the flow's
    /// timeout now), the retry fingerprints, and the key seed. What the new
    /// configuration no longer tracks, and what timed out while the service was down,
    /// is counted at once (docs/behaviour.md §3 "restarts").
    pub fn restore(&mut self, snapshot: StoreSnapshot, rules: &RestoreRules) -> RestoreSummary {
        let now_store = self.clock.now();
        let now_wall = unix_nanos_now();
        self.key_seed = snapshot.key_seed;
        self.key_hashers = key_hashers(snapshot.key_seed);
        let strings = &snapshot.strings;
        // Values are matched to today's dimensions by label: a removed dimension's values
        // go, an added one takes its default, a reordered list keeps each value's label.
        let remap =
            |saved_labels: &[String], now: &[(String, Arc<str>)]| -> Vec<Result<usize, Arc<str>>> {
                now.iter()
                    .map(|(label, default)| {
                        saved_labels
                            .iter()
                            .position(|l| l == label)
                            .ok_or_else(|| default.clone())
                    })
                    .collect()
            };
        let start_map = remap(&snapshot.start_dim_labels, &rules.start_dims);
        let end_map = remap(&snapshot.end_dim_labels, &rules.end_dims);
        let dims = |map: &[Result<usize, Arc<str>>],
                    saved: &[u32],
                    defaults: &[(String, Arc<str>)]|
         -> DimValues {
            map.iter()
                .zip(defaults)
                .map(|(at, (_, default))| match at {
                    Ok(i) => saved
                        .get(*i)
                        .and_then(|s| strings.get(*s as usize))
                        .cloned()
                        .unwrap_or_else(|| default.clone()),
                    Err(default) => default.clone(),
                })
                .collect()
        };
        let mut summary = RestoreSummary::default();
        let sink = &*self.sink;
        for SavedEntry {
            key,
            flow,
            deadline_unix_nanos,
            state,
        } in snapshot.entries
        {
            let Some(flow) = strings.get(flow as usize).cloned() else {
                continue;
            };
            let known = rules
                .known_flows
                .as_ref()
                .is_none_or(|k| k.contains(&*flow));
            let remaining = deadline_unix_nanos.saturating_sub(now_wall);
            // A changed timeout applies from the restart on: never later than the
            // original deadline, never later than now + the flow's timeout today.
            let deadline = now_store.saturating_add(remaining.min(self.timeout_nanos(&flow)));
            let key = u128::from_be_bytes(key);
            let state = saved::slot_state(
                state,
                strings,
                (&self.numbering, &flow),
                &|saved| dims(&start_map, saved, &rules.start_dims),
                &|saved| dims(&end_map, saved, &rules.end_dims),
            );
            let slot = Slot {
                flow,
                deadline,
                state,
            };
            let view = slot.state.view(&self.numbering, &slot.flow);
            let open_dims = match &view {
                View::Open { dims, .. } => Some(*dims),
                View::Stepped(open) => Some(&open.dims),
                View::Waiting(_) => None,
            };
            match open_dims {
                Some(start_dims) if !known => {
                    summary.discarded += 1;
                    sink.report(Report::Discarded {
                        flow: &slot.flow,
                        start_dims,
                    });
                    continue;
                }
                Some(start_dims) => sink.report(Report::Restored {
                    flow: &slot.flow,
                    start_dims,
                }),
                None if !known => {
                    summary.discarded += 1;
                    report_gone(sink, &self.numbering, &slot, Gone::TimedOut);
                    continue;
                }
                None => {}
            }
            if remaining == 0 {
                if open_dims.is_some() {
                    summary.expired += 1;
                } else {
                    summary.expired_ends += 1;
                }
                report_gone(sink, &self.numbering, &slot, Gone::TimedOut);
                continue;
            }
            let open = open_dims.is_some();
            drop(view);
            if open {
                summary.open += 1;
            } else {
                summary.waiting += 1;
            }
            self.put(key, slot);
        }
        // Fingerprints live in the shard of their key: only a file with the same
        // sharding can be used.
        if snapshot.shards.len() == SHARDS {
            for (shard, saved) in self.shards.iter().zip(snapshot.shards) {
                let age = now_wall.saturating_sub(saved.rotated_at_unix_nanos);
                let mut recent = shard.lock().unwrap_or_else(|p| p.into_inner());
                recent.import(
                    &saved.fingerprints,
                    u64::from(saved.current_tag),
                    now_store.saturating_sub(age),
                );
            }
        } else if !snapshot.shards.is_empty() {
            tracing::warn!(
                "state file: retry fingerprints of another layout ({} shards) not restored",
                snapshot.shards.len()
            );
        }
        summary
    }

    /// A copy of every live entry and of the fingerprints. moka's iterator walks the
    /// cache's segments without a global lock, and each fingerprint shard is held only
    /// while it is copied, so ingest goes on meanwhile.
    pub fn snapshot_now(&self) -> StoreSnapshot {
        let now_store = self.clock.now();
        let now_wall = unix_nanos_now();
        let to_wall = |t: u64| {
            if t >= now_store {
                now_wall.saturating_add(t - now_store)
            } else {
                now_wall.saturating_sub(now_store - t)
            }
        };
        let mut strings: Vec<Arc<str>> = Vec::new();
        let mut index: std::collections::HashMap<Arc<str>, u32, RandomState> =
            std::collections::HashMap::default();
        let mut intern = |s: &Arc<str>| -> u32 {
            *index.entry(s.clone()).or_insert_with(|| {
                strings.push(s.clone());
                (strings.len() - 1) as u32
            })
        };
        let mut entries =
            Vec::with_capacity(usize::try_from(self.cache.entry_count()).unwrap_or(0));
        for (key, slot) in self.cache.iter() {
            let state = saved::saved_state(&slot.state, &self.numbering, &slot.flow, &mut intern);
            entries.push(SavedEntry {
                key: key.to_be_bytes(),
                flow: intern(&slot.flow),
                deadline_unix_nanos: to_wall(slot.deadline),
                state,
            });
        }
        let shards = self
            .shards
            .iter()
            .map(|shard| {
                let (fingerprints, tag, rotated_at) =
                    shard.lock().unwrap_or_else(|p| p.into_inner()).export();
                SavedShard {
                    current_tag: tag as u8,
                    rotated_at_unix_nanos: to_wall(rotated_at),
                    fingerprints,
                }
            })
            .collect();
        StoreSnapshot {
            saved_at_unix_nanos: now_wall,
            key_seed: self.key_seed,
            start_dim_labels: Vec::new(),
            end_dim_labels: Vec::new(),
            strings,
            entries,
            shards,
        }
    }

    fn key(&self, flow: &str, correlation_id: &str) -> Key {
        use std::hash::BuildHasher;
        let [a, b] = &self.key_hashers;
        (u128::from(a.hash_one((flow, correlation_id))) << 64)
            | u128::from(b.hash_one((flow, correlation_id)))
    }

    fn shard(&self, key: Key) -> MutexGuard<'_, RecentEvents> {
        // A panic while holding a shard (a sink bug) leaves the fingerprints valid.
        self.shards[(key >> 64) as usize % SHARDS]
            .lock()
            .unwrap_or_else(|poisoned| poisoned.into_inner())
    }

    /// Applies one flow event (docs/behaviour.md §3).
    pub fn apply(&self, event: FlowEvent) {
        self.apply_at(event, self.clock.now());
    }

    /// Applies one flow event received at `now` (the store's clock).
    fn apply_at(&self, event: FlowEvent, now: u64) {
        use std::hash::BuildHasher;
        let key = self.key(&event.flow, &event.correlation_id);
        let is_start = event.kind == EventKind::Start;
        let fingerprint = match &event.step {
            // The step's name is part of a step event's identity.
            Some(step) => self.key_hashers[0].hash_one((key, &**step, event.timestamp_nanos)),
            None => self.key_hashers[0].hash_one((key, is_start, event.timestamp_nanos)),
        };
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
                self.open(key, flow, timestamp_nanos, dims, now)
            }
            EventKind::Start => match self.cache.get(&key).map(|slot| slot.state) {
                None => self.open(key, flow, timestamp_nanos, dims, now),
                Some(state) => match state.view(&self.numbering, &flow) {
                    View::Open { start_nanos, .. } => {
                        self.earlier_start(key, flow, start_nanos, timestamp_nanos, dims, now)
                    }
                    View::Stepped(open) => {
                        self.earlier_start(key, flow, open.start_nanos, timestamp_nanos, dims, now)
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
        let Some(Slot {
            flow,
            deadline,
            state,
        }) = self.take(key, now)
        else {
            let deadline = now.saturating_add(self.timeout_nanos(&flow));
            return self.put(
                key,
                Slot {
                    flow,
                    deadline,
                    state: SlotState::waiting(Pending::end(end)),
                },
            );
        };
        match state.view(&self.numbering, &flow) {
            View::Open { start_nanos, dims } => {
                steps::complete(sink, &flow, dims, start_nanos, &[], &end);
                self.closed.mark(&flow, key, now);
            }
            View::Stepped(open) => {
                steps::complete(sink, &flow, &open.dims, open.start_nanos, &open.steps, &end);
                self.closed.mark(&flow, key, now);
            }
            View::Waiting(pending) => {
                let state = if pending.end.is_some() {
                    // A second end while the first waits: the first stays.
                    sink.report(Report::Duplicate {
                        kind: EventKind::End(end.outcome),
                    });
                    state.clone()
                } else {
                    SlotState::waiting(Pending {
                        end: Some(end),
                        steps: pending.steps.clone(),
                    })
                };
                self.put(
                    key,
                    Slot {
                        flow,
                        deadline,
                        state,
                    },
                );
            }
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
        let deadline = now.saturating_add(self.timeout_nanos(&flow));
        self.put(
            key,
            Slot {
                flow,
                deadline,
                state: SlotState::Open { start_nanos, dims },
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

    /// Removes the key's entry if it is still live. An entry that is already past its
    /// deadline is counted as timed out (by the listener, or here) and not returned.
    fn take(&self, key: Key, now: u64) -> Option<Slot> {
        EXPIRED_IN_REMOVE.with(|cell| cell.set(Some((key, false))));
        let removed = self.cache.remove(&key);
        let counted = EXPIRED_IN_REMOVE.with(|cell| cell.take()) == Some((key, true));
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

/// An open instance left the store: its start time no longer counts as open.
fn forget_age(ages: &OnceLock<OpenAges>, slot: &Slot) {
    if let (Some(ages), Some(start_nanos)) = (ages.get(), slot.state.open_start()) {
        ages.closed(&slot.flow, start_nanos);
    }
}

/// The cache every store uses: bounded, LRU, the longest timeout as time-to-live, a
/// per-entry expiry for earlier deadlines, and the listener that counts what moka
/// removes on its own.
fn build_cache(
    settings: &StoreSettings,
    clock: Clock,
    sink: Arc<dyn FlowSink>,
    final_snapshot: Arc<FinalSnapshot>,
    closed: Arc<ClosedMarks>,
    numbering: Arc<Numbering>,
    ages: Arc<OnceLock<OpenAges>>,
) -> Cache<Key, Slot, RandomState> {
    let ttl = settings
        .longest_timeout
        .clamp(Duration::from_millis(1), LONGEST_TTL);
    let eviction_warning = RateLimited::new(EVICTION_WARN_EVERY);
    let on_removal = move |key: Arc<Key>, slot: Slot, cause: RemovalCause| match cause {
        // The store's own removal: the caller settles it.
        RemovalCause::Explicit => {}
        // Written to the state file at shutdown: the next run counts it.
        _ if final_snapshot.leave_to_next_run(*key) => {}
        RemovalCause::Expired => {
            EXPIRED_IN_REMOVE.with(|cell| {
                if let Some((watched, _)) = cell.get() {
                    if watched == *key {
                        cell.set(Some((watched, true)));
                    }
                }
            });
            steps::gone(
                &*sink,
                &closed,
                &numbering,
                *key,
                &slot,
                Gone::TimedOut,
                clock.now(),
            );
        }
        // Only an entry past its per-entry deadline is ever replaced (see above).
        RemovalCause::Replaced => steps::gone(
            &*sink,
            &closed,
            &numbering,
            *key,
            &slot,
            Gone::TimedOut,
            clock.now(),
        ),
        RemovalCause::Size => {
            eviction_warning.warn(format_args!(
                "correlation store full (limits.max_in_flight): evicting the oldest entries \
                 (flow {}); raise the limit or shorten flow timeouts",
                slot.flow
            ));
            steps::gone(
                &*sink,
                &closed,
                &numbering,
                *key,
                &slot,
                Gone::Evicted,
                clock.now(),
            );
        }
    };
    let listener = move |key: Arc<Key>, slot: Slot, cause: RemovalCause| {
        // Whatever but the store's own removal took it, the instance is no longer open.
        if cause != RemovalCause::Explicit {
            forget_age(&ages, &slot);
        }
        on_removal(key, slot, cause)
    };
    Cache::builder()
        .max_capacity(settings.capacity)
        .eviction_policy(EvictionPolicy::lru())
        .time_to_live(ttl)
        .expire_after(Deadlines { clock, ttl })
        .eviction_listener(listener)
        .build_with_hasher(RandomState::default())
}

/// The store's moka cache alone, built exactly as the store builds it (capacity,
/// policy, expiry, listener, key and value types): the benchmark's baseline, one insert
/// per start and one remove per end.
#[doc(hidden)]
pub struct CacheBaseline {
    cache: Cache<Key, Slot, RandomState>,
    clock: Clock,
    flow: Arc<str>,
    dims: DimValues,
    timeout_nanos: u64,
}

impl CacheBaseline {
    pub fn new(settings: StoreSettings, sink: Arc<dyn FlowSink>) -> Self {
        let clock = Clock {
            epoch: Instant::now(),
        };
        let timeout_nanos =
            u64::try_from((settings.timeout_for)("baseline").as_nanos()).unwrap_or(u64::MAX);
        Self {
            cache: build_cache(
                &settings,
                clock,
                sink,
                Arc::default(),
                Arc::new(ClosedMarks::new(&[], 0, 1)),
                Arc::default(),
                Arc::default(),
            ),
            clock,
            flow: Arc::from("baseline"),
            dims: Arc::from([]),
            timeout_nanos,
        }
    }

    pub fn start(&self, key: u128, start_nanos: u64) {
        let slot = Slot {
            flow: self.flow.clone(),
            deadline: self.clock.now().saturating_add(self.timeout_nanos),
            state: SlotState::Open {
                start_nanos,
                dims: self.dims.clone(),
            },
        };
        self.cache.insert(key, slot);
    }

    pub fn end(&self, key: u128) -> bool {
        self.cache.remove(&key).is_some()
    }

    pub fn run_pending_tasks(&self) {
        self.cache.run_pending_tasks();
    }
}

impl CorrelationStore for MemoryStore {
    fn apply_batch(
        &self,
        events: &mut dyn Iterator<Item = FlowEvent>,
    ) -> Result<(), super::StoreError> {
        // One clock reading per export: its events arrived together.
        let now = self.clock.now();
        for event in events {
            self.apply_at(event, now);
        }
        Ok(())
    }

    fn run_pending_tasks(&self) {
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
        self.cache.run_pending_tasks();
        let snapshot = self.snapshot_now();
        let mut keys: Vec<Key> = snapshot
            .entries
            .iter()
            .map(|e| u128::from_be_bytes(e.key))
            .collect();
        keys.sort_unstable();
        let in_file = keys.len() as u64;
        *self
            .final_snapshot
            .keys
            .lock()
            .unwrap_or_else(|p| p.into_inner()) = keys;
        self.final_snapshot.taken.store(true, Ordering::Release);
        let give_up = Instant::now() + FINAL_SETTLE_LIMIT;
        loop {
            self.cache.run_pending_tasks();
            let left = in_file
                .saturating_sub(self.final_snapshot.left_to_next_run.load(Ordering::Acquire));
            let overdue = self.cache.entry_count().saturating_sub(left);
            if overdue == 0 {
                break;
            }
            if Instant::now() >= give_up {
                tracing::warn!(
                    overdue,
                    "shutdown: entries past their deadline still not removed; they are counted in neither run"
                );
                break;
            }
            std::thread::sleep(Duration::from_millis(20));
        }
        Some(snapshot)
    }
}

/// Two independently seeded hashers from one seed: the 128-bit key.
fn key_hashers(seed: u64) -> [FixedState; 2] {
    [
        FixedState::with_seed(seed),
        FixedState::with_seed(seed.rotate_left(32) ^ 0x9e37_79b9_7f4a_7c15),
    ]
}

/// An entry that left without its counterpart: an open instance timed out or was
/// dropped, a waiting end never met its start.
fn report_gone(sink: &dyn FlowSink, numbering: &Numbering, slot: &Slot, why: Gone) {
    let flow = &slot.flow;
    match (slot.state.view(numbering, flow), why) {
        (View::Open { dims, .. }, Gone::Evicted) => sink.report(Report::Dropped {
            flow,
            start_dims: dims,
        }),
        (View::Open { dims, .. }, Gone::TimedOut) => sink.report(Report::TimedOut {
            flow,
            start_dims: dims,
            transits: &[],
            last_step: None,
        }),
        (View::Stepped(open), Gone::Evicted) => sink.report(Report::Dropped {
            flow,
            start_dims: &open.dims,
        }),
        (View::Stepped(open), Gone::TimedOut) => steps::timed_out(sink, flow, &open),
        (View::Waiting(pending), _) => {
            if pending.end.is_some() {
                sink.report(Report::Unmatched {
                    flow,
                    evicted: why == Gone::Evicted,
                });
            }
            steps::steps_unmatched(sink, flow, pending);
        }
    }
}

/// Runs a store's housekeeping on a dedicated thread until dropped: moka has no thread
/// of its own, and a burst of expirations must not stall a tokio worker.
pub struct Maintenance {
    stop: Arc<std::sync::atomic::AtomicBool>,
    handle: Option<std::thread::JoinHandle<()>>,
}

impl Maintenance {
    pub fn start(store: Arc<dyn CorrelationStore>, every: Duration) -> Self {
        use std::sync::atomic::Ordering;
        let stop = Arc::new(std::sync::atomic::AtomicBool::new(false));
        let thread_stop = stop.clone();
        let handle = std::thread::Builder::new()
            .name("store-maintenance".into())
            .spawn(move || {
                while !thread_stop.load(Ordering::Acquire) {
                    store.run_pending_tasks();
                    std::thread::park_timeout(every);
                }
            })
            .expect("spawn maintenance thread");
        Self {
            stop,
            handle: Some(handle),
        }
    }
}

impl Drop for Maintenance {
    fn drop(&mut self) {
        self.stop.store(true, std::sync::atomic::Ordering::Release);
        if let Some(h) = self.handle.take() {
            h.thread().unpark();
            let _ = h.join();
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::flows::event::{Outcome, Source};
    use std::collections::BTreeMap;

    /// Counts what the store reports, per flow.
    #[derive(Default)]
    struct Recorder {
        counts: Mutex<BTreeMap<(String, String), i64>>,
        durations: Mutex<Vec<f64>>,
    }

    impl Recorder {
        fn get(&self, flow: &str, what: &str) -> i64 {
            *self
                .counts
                .lock()
                .unwrap()
                .get(&(flow.to_string(), what.to_string()))
                .unwrap_or(&0)
        }
        fn add(&self, flow: &str, what: &str) {
            *self
                .counts
                .lock()
                .unwrap()
                .entry((flow.to_string(), what.to_string()))
                .or_default() += 1;
        }
        /// started = Σ completed + incomplete + dropped + in_progress, with
        /// in_progress = opened − closed.
        fn in_progress(&self, flow: &str) -> i64 {
            self.get(flow, "started")
                - self.get(flow, "success")
                - self.get(flow, "failure")
                - self.get(flow, "cancelled")
                - self.get(flow, "incomplete")
                - self.get(flow, "dropped")
        }
    }

    impl FlowSink for Recorder {
        fn report(&self, report: Report<'_>) {
            match report {
                Report::Opened { flow, .. } => self.add(flow, "started"),
                // The invariant counts restored with started.
                Report::Restored { flow, .. } => {
                    self.add(flow, "started");
                    self.add(flow, "restored")
                }
                Report::Discarded { flow, .. } => {
                    self.add(flow, "started");
                    self.add(flow, "dropped");
                    self.add(flow, "discarded")
                }
                Report::Completed {
                    flow,
                    end,
                    duration_secs,
                    ..
                } => {
                    self.add(flow, end.outcome.as_str());
                    if end.outcome == Outcome::Success {
                        self.durations.lock().unwrap().push(duration_secs);
                    }
                }
                Report::TimedOut { flow, .. } => self.add(flow, "incomplete"),
                Report::Dropped { flow, .. } => self.add(flow, "dropped"),
                Report::Unmatched { flow, .. } => self.add(flow, "unmatched"),
                Report::Duplicate { kind } => self.add("*", &format!("dup_{}", kind.label())),
                Report::StepReached { flow, step, .. } => self.add(flow, &format!("step_{step}")),
                Report::StepUnmatched { flow, reason } => {
                    self.add(flow, &format!("step_unmatched_{}", reason.label()))
                }
                Report::Overdue { .. } => {}
            }
        }
    }

    fn table_with(
        timeout: Duration,
        capacity: u64,
        dedup: Duration,
    ) -> (Arc<MemoryStore>, Arc<Recorder>) {
        let rec = Arc::new(Recorder::default());
        let table = MemoryStore::new(
            StoreSettings {
                capacity,
                dedup_window: dedup,
                timeout_for: Arc::new(move |_| timeout),
                longest_timeout: timeout,
                step_flows: Vec::new(),
            },
            rec.clone(),
        );
        (Arc::new(table), rec)
    }

    /// Flow "short" times out after `short`, every other flow after ten minutes.
    fn table_with_short_flow(capacity: u64, short: Duration) -> (Arc<MemoryStore>, Arc<Recorder>) {
        let rec = Arc::new(Recorder::default());
        let table = MemoryStore::new(
            StoreSettings {
                capacity,
                dedup_window: Duration::from_secs(300),
                longest_timeout: Duration::from_secs(600),
                step_flows: Vec::new(),
                timeout_for: Arc::new(move |flow| {
                    if flow == "short" {
                        short
                    } else {
                        Duration::from_secs(600)
                    }
                }),
            },
            rec.clone(),
        );
        (Arc::new(table), rec)
    }

    fn table(timeout: Duration) -> (Arc<MemoryStore>, Arc<Recorder>) {
        table_with(timeout, 1000, Duration::from_secs(300))
    }

    fn ev(flow: &str, id: &str, kind: EventKind, ts: u64) -> FlowEvent {
        FlowEvent {
            flow: Arc::from(flow),
            correlation_id: id.into(),
            kind,
            timestamp_nanos: ts,
            dims: Arc::from(Vec::new()),
            trace: None,
            source: Source::SpanEvent,
            step: None,
        }
    }

    const START: EventKind = EventKind::Start;
    const OK: EventKind = EventKind::End(Outcome::Success);
    const FAIL: EventKind = EventKind::End(Outcome::Failure);
    const CANCEL: EventKind = EventKind::End(Outcome::Cancelled);
    const SEC: u64 = 1_000_000_000;

    /// Waits (bounded) for a timeout to be reported, driving housekeeping as the service
    /// does.
    fn settle_expiries(t: &MemoryStore, rec: &Recorder, until: impl Fn(&Recorder) -> bool) {
        let give_up = Instant::now() + Duration::from_secs(5);
        while !until(rec) && Instant::now() < give_up {
            t.run_pending_tasks();
            std::thread::sleep(Duration::from_millis(20));
        }
    }

    fn rules() -> RestoreRules {
        RestoreRules::default()
    }

    /// A fresh store of the same shape, with the snapshot read back (through the file
    /// format, as at a restart).
    fn restarted(
        snap: StoreSnapshot,
        timeout: Duration,
        rules: &RestoreRules,
    ) -> (Arc<MemoryStore>, Arc<Recorder>, RestoreSummary) {
        let mut bytes = Vec::new();
        crate::flows::state::encode(&snap, &mut bytes).unwrap();
        let snap = crate::flows::state::decode(&bytes).unwrap();
        let rec = Arc::new(Recorder::default());
        let mut t = MemoryStore::new(
            StoreSettings {
                capacity: 1000,
                dedup_window: Duration::from_secs(300),
                timeout_for: Arc::new(move |_| timeout),
                longest_timeout: timeout,
                step_flows: Vec::new(),
            },
            rec.clone(),
        );
        let summary = t.restore(snap, rules);
        (Arc::new(t), rec, summary)
    }

    #[test]
    fn a_restored_store_carries_on_as_if_nothing_happened() {
        let (t, _rec) = table(Duration::from_secs(60));
        t.apply(ev("o", "1", START, 10 * SEC));
        t.apply(ev("o", "2", START, 20 * SEC));
        t.apply(ev("o", "w", OK, 30 * SEC));
        let done = [ev("o", "3", START, 5 * SEC), ev("o", "3", OK, 6 * SEC)];
        for e in done.clone() {
            t.apply(e);
        }
        let snap = t.snapshot_now();
        assert_eq!(snap.entries.len(), 3);
        let (t2, rec, summary) = restarted(snap, Duration::from_secs(60), &rules());
        assert_eq!((summary.open, summary.waiting, summary.expired), (2, 1, 0));
        assert_eq!(rec.get("o", "restored"), 2);
        assert_eq!(rec.in_progress("o"), 2);
        // Retries of events handled before the restart are duplicates.
        t2.apply(ev("o", "1", START, 10 * SEC));
        for e in done {
            t2.apply(e);
        }
        assert_eq!(rec.get("*", "dup_start"), 2);
        assert_eq!(rec.get("*", "dup_end"), 1);
        t2.apply(ev("o", "1", OK, 12 * SEC));
        t2.apply(ev("o", "2", FAIL, 21 * SEC));
        t2.apply(ev("o", "w", START, 27 * SEC));
        assert_eq!(rec.get("o", "success"), 2);
        assert_eq!(rec.get("o", "failure"), 1);
        assert_eq!(*rec.durations.lock().unwrap(), vec![2.0, 3.0]);
        assert_eq!(rec.get("o", "unmatched"), 0);
        assert_eq!(rec.in_progress("o"), 0);
    }

    #[test]
    fn the_final_snapshot_counts_what_is_overdue_and_leaves_the_rest_to_the_next_run() {
        // Per-entry deadlines (a flow shorter than another) are removed by moka's timer
        // wheel up to ~1 s late, and its iterator skips them meanwhile: without the
        // settling, these would be in neither the file nor the counts.
        let (t, rec) = table_with_short_flow(10_000, Duration::from_millis(100));
        for i in 0..200 {
            t.apply(ev("short", &i.to_string(), START, SEC));
            t.apply(ev("long", &i.to_string(), START, SEC));
        }
        t.apply(ev("short", "waiting", OK, SEC));
        std::thread::sleep(Duration::from_millis(250));
        let snap = t.final_snapshot().expect("a snapshot");
        assert_eq!(rec.get("short", "incomplete"), 200);
        assert_eq!(rec.get("short", "unmatched"), 1);
        assert_eq!(snap.entries.len(), 200, "only the long flow's instances");
        assert_eq!(rec.get("long", "incomplete"), 0);
        // Entries of the file that expire now are the next run's: not counted here.
        let (t2, rec2) = table_with_short_flow(10_000, Duration::from_millis(100));
        for i in 0..50 {
            t2.apply(ev("short", &i.to_string(), START, SEC));
        }
        let snap2 = t2.final_snapshot().expect("a snapshot");
        assert_eq!(snap2.entries.len(), 50);
        // Long enough for the timer wheel to pass their deadlines.
        let until = Instant::now() + Duration::from_millis(1300);
        while Instant::now() < until {
            t2.run_pending_tasks();
            std::thread::sleep(Duration::from_millis(20));
        }
        assert_eq!(t2.entries(), 0, "the timer wheel removed them");
        assert_eq!(rec2.get("short", "incomplete"), 0, "counted twice");
    }

    #[test]
    fn deadlines_that_passed_while_down_are_counted_at_once() {
        let (t, _rec) = table(Duration::from_secs(60));
        t.apply(ev("o", "1", START, SEC));
        t.apply(ev("o", "w", OK, SEC));
        t.apply(ev("o", "live", START, SEC));
        let mut snap = t.snapshot_now();
        for e in &mut snap.entries {
            if e.key != t.key("o", "live").to_be_bytes() {
                e.deadline_unix_nanos = snap.saved_at_unix_nanos - SEC;
            }
        }
        let (t2, rec, summary) = restarted(snap, Duration::from_secs(60), &rules());
        assert_eq!(
            (summary.open, summary.expired, summary.expired_ends),
            (1, 1, 1)
        );
        assert_eq!(rec.get("o", "incomplete"), 1);
        assert_eq!(rec.get("o", "unmatched"), 1);
        assert_eq!(rec.in_progress("o"), 1);
        t2.run_pending_tasks();
        assert_eq!(t2.entries(), 1);
    }

    #[test]
    fn a_shorter_timeout_applies_from_the_restart_on() {
        let (t, _rec) = table(Duration::from_secs(600));
        t.apply(ev("o", "1", START, SEC));
        let (t2, rec, _) = restarted(t.snapshot_now(), Duration::from_millis(100), &rules());
        settle_expiries(&t2, &rec, |r| r.get("o", "incomplete") > 0);
        assert_eq!(rec.get("o", "incomplete"), 1);
        assert_eq!(rec.in_progress("o"), 0);
    }

    #[test]
    fn changed_config_drops_untracked_flows_and_matches_dims_by_label() {
        let (t, _rec) = table(Duration::from_secs(60));
        let mut e = ev("kept", "1", START, SEC);
        e.dims = Arc::from(vec![Arc::from("web"), Arc::from("eu")]);
        t.apply(e);
        t.apply(ev("gone", "1", START, SEC));
        t.apply(ev("gone", "w", OK, SEC));
        let mut snap = t.snapshot_now();
        snap.start_dim_labels = vec!["service".into(), "region".into()];
        let rules = RestoreRules {
            known_flows: Some(Arc::new(["kept".to_string()].into_iter().collect())),
            // "region" removed, "tier" added, order changed.
            start_dims: vec![
                ("tier".into(), Arc::from("none")),
                ("service".into(), Arc::from("unknown")),
            ],
            end_dims: vec![],
        };
        let (t2, rec, summary) = restarted(snap, Duration::from_secs(60), &rules);
        assert_eq!((summary.open, summary.discarded), (1, 2));
        assert_eq!(rec.get("gone", "discarded"), 1);
        assert_eq!(rec.get("gone", "unmatched"), 1);
        assert_eq!(rec.in_progress("gone"), 0);
        let slot = t2.cache.get(&t2.key("kept", "1")).unwrap();
        match slot.state {
            SlotState::Open { dims, .. } => {
                assert_eq!(
                    dims.iter().map(|d| &**d).collect::<Vec<_>>(),
                    ["none", "web"]
                )
            }
            _ => panic!("not restored as open"),
        }
    }

    #[test]
    fn start_then_end_completes_with_duration() {
        let (t, rec) = table(Duration::from_secs(60));
        t.apply(ev("order", "1", START, 10 * SEC));
        assert_eq!(rec.in_progress("order"), 1);
        t.apply(ev("order", "1", OK, 12 * SEC + SEC / 2));
        assert_eq!(rec.get("order", "started"), 1);
        assert_eq!(rec.get("order", "success"), 1);
        assert_eq!(rec.in_progress("order"), 0);
        assert_eq!(*rec.durations.lock().unwrap(), vec![2.5]);
        t.run_pending_tasks();
        assert_eq!(t.entries(), 0);
    }

    #[test]
    fn failure_and_cancelled_outcomes() {
        let (t, rec) = table(Duration::from_secs(60));
        t.apply(ev("o", "f", START, SEC));
        t.apply(ev("o", "f", FAIL, 2 * SEC));
        t.apply(ev("o", "c", START, SEC));
        t.apply(ev("o", "c", CANCEL, 2 * SEC));
        assert_eq!(rec.get("o", "failure"), 1);
        assert_eq!(rec.get("o", "cancelled"), 1);
        assert_eq!(rec.in_progress("o"), 0);
    }

    #[test]
    fn end_before_start_pairs_when_the_start_arrives() {
        let (t, rec) = table(Duration::from_secs(60));
        t.apply(ev("order", "1", OK, 15 * SEC));
        assert_eq!(rec.get("order", "started"), 0);
        assert_eq!(rec.get("order", "success"), 0);
        t.apply(ev("order", "1", START, 10 * SEC));
        assert_eq!(rec.get("order", "started"), 1);
        assert_eq!(rec.get("order", "success"), 1);
        assert_eq!(*rec.durations.lock().unwrap(), vec![5.0]);
        assert_eq!(rec.in_progress("order"), 0);
        assert_eq!(rec.get("order", "unmatched"), 0);
    }

    #[test]
    fn end_whose_start_never_comes_is_unmatched_only() {
        let (t, rec) = table(Duration::from_millis(200));
        t.apply(ev("order", "1", OK, SEC));
        settle_expiries(&t, &rec, |r| r.get("order", "unmatched") > 0);
        assert_eq!(rec.get("order", "unmatched"), 1);
        assert_eq!(rec.get("order", "started"), 0);
        assert_eq!(rec.get("order", "success"), 0);
        assert_eq!(rec.get("order", "incomplete"), 0);
    }

    #[test]
    fn timeout_counts_incomplete_once_and_a_late_end_is_unmatched() {
        let (t, rec) = table(Duration::from_millis(200));
        t.apply(ev("order", "1", START, SEC));
        let deadline = Instant::now() + Duration::from_millis(200);
        settle_expiries(&t, &rec, |r| r.get("order", "incomplete") > 0);
        assert_eq!(rec.get("order", "incomplete"), 1);
        // Counted within 2 s of the deadline (docs/behaviour.md §3).
        assert!(Instant::now() < deadline + Duration::from_secs(2));
        assert_eq!(rec.in_progress("order"), 0);
        t.apply(ev("order", "1", OK, 2 * SEC));
        settle_expiries(&t, &rec, |r| r.get("order", "unmatched") > 0);
        assert_eq!(rec.get("order", "incomplete"), 1);
        assert_eq!(rec.get("order", "success"), 0);
        assert_eq!(rec.get("order", "unmatched"), 1);
        assert_eq!(rec.get("order", "started"), 1);
    }

    #[test]
    fn duplicate_start_keeps_the_earliest_timestamp() {
        let (t, rec) = table(Duration::from_secs(60));
        t.apply(ev("o", "1", START, 10 * SEC));
        t.apply(ev("o", "1", START, 8 * SEC));
        t.apply(ev("o", "1", START, 12 * SEC));
        assert_eq!(rec.get("o", "started"), 1);
        assert_eq!(rec.get("*", "dup_start"), 2);
        t.apply(ev("o", "1", OK, 11 * SEC));
        assert_eq!(*rec.durations.lock().unwrap(), vec![3.0]);
        assert_eq!(rec.in_progress("o"), 0);
    }

    #[test]
    fn second_end_while_waiting_is_a_duplicate() {
        let (t, rec) = table(Duration::from_secs(60));
        t.apply(ev("o", "1", OK, 10 * SEC));
        t.apply(ev("o", "1", FAIL, 11 * SEC));
        assert_eq!(rec.get("*", "dup_end"), 1);
        t.apply(ev("o", "1", START, 9 * SEC));
        assert_eq!(rec.get("o", "success"), 1);
        assert_eq!(rec.get("o", "failure"), 0);
    }

    #[test]
    fn same_id_in_two_flows_is_two_instances() {
        let (t, rec) = table(Duration::from_secs(60));
        t.apply(ev("a", "shared", START, SEC));
        t.apply(ev("b", "shared", START, SEC));
        assert_eq!(rec.get("a", "started"), 1);
        assert_eq!(rec.get("b", "started"), 1);
        t.apply(ev("b", "shared", FAIL, 2 * SEC));
        assert_eq!(rec.get("b", "failure"), 1);
        assert_eq!(rec.in_progress("a"), 1);
        assert_eq!(rec.in_progress("b"), 0);
    }

    #[test]
    fn negative_duration_is_reported_as_such() {
        let (t, rec) = table(Duration::from_secs(60));
        t.apply(ev("o", "1", START, 10 * SEC));
        t.apply(ev("o", "1", OK, 9 * SEC));
        assert_eq!(rec.get("o", "success"), 1);
        assert_eq!(*rec.durations.lock().unwrap(), vec![-1.0]);
    }

    #[test]
    fn per_flow_timeouts_fire_independently() {
        let (t, rec) = table_with_short_flow(1000, Duration::from_millis(100));
        // The long-timeout entry arrives first and sits at the front of its own queue;
        // it must not hold back the short one behind it.
        t.apply(ev("long", "1", START, SEC));
        t.apply(ev("short", "1", START, SEC));
        settle_expiries(&t, &rec, |r| r.get("short", "incomplete") > 0);
        assert_eq!(rec.get("short", "incomplete"), 1);
        assert_eq!(rec.get("long", "incomplete"), 0);
        t.run_pending_tasks();
        assert_eq!(t.entries(), 1);
    }

    #[test]
    fn retried_events_are_duplicates_even_after_the_instance_closed() {
        let (t, rec) = table(Duration::from_secs(60));
        let batch = [ev("o", "1", START, 10 * SEC), ev("o", "1", OK, 11 * SEC)];
        for e in batch.clone() {
            t.apply(e);
        }
        for e in batch {
            t.apply(e);
        }
        assert_eq!(rec.get("o", "started"), 1);
        assert_eq!(rec.get("o", "success"), 1);
        assert_eq!(rec.get("*", "dup_start"), 1);
        assert_eq!(rec.get("*", "dup_end"), 1);
        // A new instance reusing the id (new timestamps) counts.
        t.apply(ev("o", "1", START, 20 * SEC));
        t.apply(ev("o", "1", OK, 21 * SEC));
        assert_eq!(rec.get("o", "started"), 2);
        assert_eq!(rec.get("o", "success"), 2);
    }

    #[test]
    fn concurrent_load_on_a_small_table_keeps_the_invariant() {
        // Starts race far ahead of ends through a table a third of the size needed:
        // many instances are dropped, but every one is accounted for exactly once.
        const N: usize = 3000;
        let (t, rec) = table_with(Duration::from_secs(60), 1000, Duration::from_secs(300));
        let threads: Vec<_> = (0..2)
            .map(|n| {
                let t = t.clone();
                std::thread::spawn(move || {
                    for i in 0..N {
                        let kind = if n == 0 { START } else { OK };
                        t.apply(ev("c", &i.to_string(), kind, (10 + n) * SEC));
                    }
                })
            })
            .collect();
        for th in threads {
            th.join().unwrap();
        }
        t.run_pending_tasks();
        assert_eq!(rec.get("c", "started"), N as i64);
        assert_eq!(
            rec.get("c", "success") + rec.get("c", "dropped") + rec.in_progress("c"),
            N as i64
        );
        assert!(rec.in_progress("c") <= 1000);
        // Ends either completed an instance, were unmatched, or still wait.
        assert!(rec.get("c", "success") + rec.get("c", "unmatched") <= N as i64);
    }

    #[test]
    fn concurrent_starts_and_ends_count_each_instance_once() {
        // Threads 0 and 2 send every start, 1 and 3 every end, racing each other:
        // each instance must complete exactly once, whatever the interleaving.
        const N: usize = 3000;
        let (t, rec) = table_with(Duration::from_secs(60), 100_000, Duration::from_secs(300));
        let threads: Vec<_> = (0..4)
            .map(|n| {
                let t = t.clone();
                std::thread::spawn(move || {
                    for i in 0..N {
                        let id = i.to_string();
                        let kind = if n % 2 == 0 { START } else { OK };
                        let ts = if n % 2 == 0 { 10 * SEC } else { 11 * SEC };
                        t.apply(ev("c", &id, kind, ts));
                    }
                })
            })
            .collect();
        for th in threads {
            th.join().unwrap();
        }
        assert_eq!(rec.get("c", "started"), N as i64);
        assert_eq!(rec.get("c", "success"), N as i64);
        assert_eq!(rec.in_progress("c"), 0);
        assert_eq!(rec.get("*", "dup_start"), N as i64);
        assert_eq!(rec.get("*", "dup_end"), N as i64);
        assert!(rec.durations.lock().unwrap().iter().all(|d| *d == 1.0));
    }

    #[test]
    fn a_full_store_evicts_the_least_recent_entries() {
        let (t, rec) = table_with(Duration::from_secs(60), 100, Duration::from_secs(300));
        for i in 0..100 {
            t.apply(ev("o", &format!("old-{i}"), START, SEC));
        }
        t.run_pending_tasks();
        for i in 0..50 {
            t.apply(ev("o", &format!("new-{i}"), START, SEC));
        }
        t.run_pending_tasks();
        assert_eq!(t.entries(), 100);
        assert_eq!(rec.get("o", "dropped"), 50);
        for i in 0..50 {
            t.apply(ev("o", &format!("new-{i}"), OK, 2 * SEC));
        }
        assert_eq!(rec.get("o", "success"), 50);
        // The oldest went first: old-49 is gone (its end waits), old-50 is there.
        t.apply(ev("o", "old-49", OK, 2 * SEC));
        t.apply(ev("o", "old-50", OK, 2 * SEC));
        assert_eq!(
            rec.get("o", "success"),
            51,
            "old-49 was evicted, old-50 was not"
        );
        assert_eq!(rec.get("o", "started"), 150);
        assert_eq!(
            rec.get("o", "success") + rec.get("o", "dropped") + rec.in_progress("o"),
            150
        );
    }

    #[test]
    fn a_waiting_end_evicted_for_room_is_unmatched() {
        let (t, rec) = table_with(Duration::from_secs(60), 10, Duration::from_secs(300));
        t.apply(ev("late", "w", OK, SEC));
        t.run_pending_tasks();
        for i in 0..10 {
            t.apply(ev("o", &i.to_string(), START, SEC));
        }
        t.run_pending_tasks();
        assert_eq!(rec.get("late", "unmatched"), 1);
        assert_eq!(rec.get("o", "dropped"), 0);
        assert_eq!(t.entries(), 10);
    }

    #[test]
    fn an_overdue_entry_is_timed_out_not_dropped_when_room_is_needed() {
        let (t, rec) = table_with(Duration::from_millis(50), 2, Duration::from_secs(300));
        t.apply(ev("o", "1", START, SEC));
        t.apply(ev("o", "2", START, SEC));
        std::thread::sleep(Duration::from_millis(80));
        t.apply(ev("o", "3", START, SEC));
        t.run_pending_tasks();
        assert_eq!(rec.get("o", "incomplete"), 2);
        assert_eq!(rec.get("o", "dropped"), 0);
        assert_eq!(rec.in_progress("o"), 1);
    }

    #[test]
    fn a_late_end_racing_an_unevicted_expiry_counts_once() {
        // No housekeeping runs between the deadline and the end: moka still holds the
        // expired entry. "long" (a store whose time-to-live is the timeout) expires by
        // time-to-live: `remove` returns it and the listener reports `Expired`. "short"
        // expires by its per-entry deadline (the timer wheel): `remove` returns it with
        // cause `Explicit`. Either way the end must not complete it, and housekeeping
        // must not count it a second time later.
        for flow in ["long", "short"] {
            let (t, rec) = if flow == "short" {
                table_with_short_flow(1000, Duration::from_millis(100))
            } else {
                table(Duration::from_millis(100))
            };
            t.apply(ev(flow, "1", START, SEC));
            std::thread::sleep(Duration::from_millis(150));
            t.apply(ev(flow, "1", OK, 2 * SEC));
            assert_eq!(rec.get(flow, "incomplete"), 1, "{flow}");
            assert_eq!(rec.get(flow, "success"), 0, "{flow}");
            settle_expiries(&t, &rec, |r| r.get(flow, "unmatched") > 0);
            for _ in 0..10 {
                t.run_pending_tasks();
                std::thread::sleep(Duration::from_millis(20));
            }
            assert_eq!(rec.get(flow, "incomplete"), 1, "{flow}");
            assert_eq!(rec.get(flow, "success"), 0, "{flow}");
            assert_eq!(rec.get(flow, "unmatched"), 1, "{flow}");
            assert_eq!(rec.in_progress(flow), 0, "{flow}");
        }
    }

    #[test]
    fn a_start_over_an_unevicted_expired_entry_counts_both_once() {
        for flow in ["short", "long"] {
            // "short": per-entry expiry (insert reports the old entry as Replaced);
            // "long" with a store whose TTL is short: time-to-live (reported Expired).
            let (t, rec) = if flow == "short" {
                table_with_short_flow(1000, Duration::from_millis(100))
            } else {
                table_with(Duration::from_millis(100), 1000, Duration::from_secs(300))
            };
            t.apply(ev(flow, "1", START, SEC));
            std::thread::sleep(Duration::from_millis(150));
            t.apply(ev(flow, "1", START, 5 * SEC));
            assert_eq!(rec.get(flow, "incomplete"), 1, "{flow}");
            assert_eq!(rec.get(flow, "started"), 2, "{flow}");
            t.apply(ev(flow, "1", OK, 6 * SEC));
            assert_eq!(rec.get(flow, "success"), 1, "{flow}");
            assert_eq!(*rec.durations.lock().unwrap(), vec![1.0], "{flow}");
            for _ in 0..5 {
                t.run_pending_tasks();
                std::thread::sleep(Duration::from_millis(20));
            }
            assert_eq!(rec.get(flow, "incomplete"), 1, "{flow}");
            assert_eq!(rec.in_progress(flow), 0, "{flow}");
        }
    }

    #[test]
    fn threads_hammering_one_key_keep_the_invariant() {
        // Four threads send starts and ends of one id with timestamps that make every
        // pair a new instance: each instance is opened and closed exactly once.
        const N: u64 = 2000;
        let (t, rec) = table_with(Duration::from_secs(60), 1000, Duration::from_secs(300));
        let threads: Vec<_> = (0..4u64)
            .map(|n| {
                let t = t.clone();
                std::thread::spawn(move || {
                    for i in 0..N {
                        let kind = if n % 2 == 0 { START } else { OK };
                        t.apply(ev("one", "same-id", kind, (i * 4 + n) * SEC));
                    }
                })
            })
            .collect();
        for th in threads {
            th.join().unwrap();
        }
        t.run_pending_tasks();
        let waiting = t.entries() as i64 - rec.in_progress("one");
        assert!((0..=1).contains(&rec.in_progress("one")));
        assert_eq!(
            rec.get("one", "started"),
            rec.get("one", "success") + rec.in_progress("one")
        );
        // Every end completed an instance, was a duplicate of a waiting end, or waits.
        assert_eq!(
            rec.get("one", "success") + rec.get("*", "dup_end") + waiting,
            2 * N as i64
        );
    }

    #[test]
    fn capacity_evictions_racing_ends_count_each_instance_once() {
        // One thread opens instances, one ends them, one runs housekeeping (which evicts
        // from a store a tenth of the size needed) all at once.
        const N: usize = 20_000;
        let (t, rec) = table_with(Duration::from_secs(60), 2000, Duration::from_secs(300));
        let stop = Arc::new(std::sync::atomic::AtomicBool::new(false));
        let keeper = {
            let (t, stop) = (t.clone(), stop.clone());
            std::thread::spawn(move || {
                while !stop.load(std::sync::atomic::Ordering::Relaxed) {
                    t.run_pending_tasks();
                }
            })
        };
        let threads: Vec<_> = (0..2)
            .map(|n| {
                let t = t.clone();
                std::thread::spawn(move || {
                    for i in 0..N {
                        let kind = if n == 0 { START } else { OK };
                        t.apply(ev("c", &i.to_string(), kind, (10 + n as u64) * SEC));
                    }
                })
            })
            .collect();
        for th in threads {
            th.join().unwrap();
        }
        stop.store(true, std::sync::atomic::Ordering::Relaxed);
        keeper.join().unwrap();
        t.run_pending_tasks();
        let started = rec.get("c", "started");
        assert_eq!(started, N as i64);
        assert_eq!(
            rec.get("c", "success") + rec.get("c", "dropped") + rec.in_progress("c"),
            started
        );
        let waiting = t.entries() as i64 - rec.in_progress("c");
        assert_eq!(
            rec.get("c", "success") + rec.get("c", "unmatched") + waiting,
            N as i64,
            "every end completed, was unmatched, or still waits"
        );
        assert!(t.entries() <= 2000);
    }

    #[test]
    fn a_burst_of_a_million_expiries_is_all_counted_once() {
        const N: usize = 1_000_000;
        let (t, rec) = table_with(Duration::from_millis(200), 2_000_000, Duration::ZERO);
        let maintenance = Maintenance::start(t.clone(), Duration::from_millis(20));
        for i in 0..N {
            t.apply(ev("b", &i.to_string(), START, SEC));
        }
        let give_up = Instant::now() + Duration::from_secs(120);
        while rec.get("b", "incomplete") < N as i64 && Instant::now() < give_up {
            std::thread::sleep(Duration::from_millis(50));
        }
        drop(maintenance);
        t.run_pending_tasks();
        assert_eq!(rec.get("b", "incomplete"), N as i64);
        assert_eq!(rec.get("b", "started"), N as i64);
        assert_eq!(t.entries(), 0);
    }
}
