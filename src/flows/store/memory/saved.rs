//! Snapshot and restore of the moka store: a copy of every live entry and of the retry
//! fingerprints for the state file, read back into a new store at start
//! (docs/behaviour.md §3 "restarts"), and the final snapshot at shutdown, after which
//! moka's removals of entries in the file are left to the next run.

use std::collections::HashMap;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex, PoisonError};
use std::time::{Duration, Instant};

use foldhash::fast::RandomState;

use super::cache::{report_gone, Gone, Key, Slot, SlotState, View};
use super::step_words::Numbering;
use super::steps::{Pending, StepAt, Stepped, WaitingStep};
use super::{key_hashers, MemoryStore, SHARDS};
use crate::flows::event::{DimValues, Outcome, TraceRef};
use crate::flows::store::snapshot::{
    unix_nanos_now, SavedEnd, SavedEntry, SavedShard, SavedState, SavedStep, StoreSnapshot,
};
use crate::flows::store::{EndRecord, Report, RestoreRules, RestoreSummary};

type Trace = Option<([u8; 16], [u8; 8])>;

/// The keys of the final snapshot, once it is taken: from then on, an entry moka
/// removes is counted only if it is not in the file (the next run counts those).
#[derive(Default)]
pub(super) struct FinalSnapshot {
    taken: AtomicBool,
    /// Sorted.
    keys: Mutex<Vec<Key>>,
    /// Entries of the file that moka removed since (not counted here).
    left_to_next_run: AtomicU64,
}

impl FinalSnapshot {
    /// Whether the final snapshot has been taken.
    pub(super) fn is_taken(&self) -> bool {
        self.taken.load(Ordering::Acquire)
    }

    /// Called by the listener for an entry moka removed: whether it is in the file, so
    /// the next run counts it (and it is tallied as such here).
    pub(super) fn leave_to_next_run(&self, key: Key) -> bool {
        if !self.is_taken() {
            return false;
        }
        let keys = self.keys.lock().unwrap_or_else(PoisonError::into_inner);
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

/// Start and end dimension values of the file matched to today's dimensions by label:
/// a removed dimension's values go, an added one takes its default, a reordered list
/// keeps each value's label.
struct DimsRemap<'a> {
    strings: &'a [Arc<str>],
    /// Per dimension today: its position in the file's list (if there), its default.
    start: Vec<(Option<usize>, Arc<str>)>,
    end: Vec<(Option<usize>, Arc<str>)>,
}

impl<'a> DimsRemap<'a> {
    fn new(strings: &'a [Arc<str>], saved: [&[String]; 2], rules: &RestoreRules) -> Self {
        let map = |saved_labels: &[String], now: &[(String, Arc<str>)]| {
            now.iter()
                .map(|(label, default)| {
                    let at = saved_labels.iter().position(|l| l == label);
                    (at, default.clone())
                })
                .collect()
        };
        Self {
            strings,
            start: map(saved[0], &rules.start_dims),
            end: map(saved[1], &rules.end_dims),
        }
    }

    fn values(&self, map: &[(Option<usize>, Arc<str>)], saved: &[u32]) -> DimValues {
        map.iter()
            .map(|(at, default)| {
                at.and_then(|i| saved.get(i))
                    .and_then(|s| self.strings.get(*s as usize))
                    .unwrap_or(default)
                    .clone()
            })
            .collect()
    }
}

impl MemoryStore {
    /// Reads back a snapshot (written at shutdown or at a checkpoint) into this new,
    /// empty store: the entries with their original deadlines (capped by the flow's
    /// timeout now), the retry fingerprints, and the key seed. What the new
    /// configuration no longer tracks, and what timed out while the service was down,
    /// is counted at once (docs/behaviour.md §3 "restarts").
    pub fn restore(&mut self, snapshot: StoreSnapshot, rules: &RestoreRules) -> RestoreSummary {
        let now_store = self.clock.now();
        let now_wall = unix_nanos_now();
        let StoreSnapshot {
            key_seed,
            start_dim_labels,
            end_dim_labels,
            strings,
            entries,
            shards,
            ..
        } = snapshot;
        self.key_seed = key_seed;
        self.key_hashers = key_hashers(key_seed);
        let remap = DimsRemap::new(&strings, [&start_dim_labels, &end_dim_labels], rules);
        let mut summary = RestoreSummary::default();
        for entry in entries {
            let Some(flow) = strings.get(entry.flow as usize).cloned() else {
                continue;
            };
            let known = rules
                .known_flows
                .as_ref()
                .is_none_or(|k| k.contains(&*flow));
            let remaining = entry.deadline_unix_nanos.saturating_sub(now_wall);
            // A changed timeout applies from the restart on: never later than the
            // original deadline, never later than now + the flow's timeout today.
            let deadline = now_store.saturating_add(remaining.min(self.timeout_nanos(&flow)));
            let state = slot_state(
                entry.state,
                &strings,
                (&self.numbering, &flow),
                &|saved| remap.values(&remap.start, saved),
                &|saved| remap.values(&remap.end, saved),
            );
            let slot = Slot {
                flow,
                deadline,
                state,
            };
            let key = u128::from_be_bytes(entry.key);
            self.restore_entry(key, slot, known, remaining == 0, &mut summary);
        }
        self.restore_fingerprints(&shards, now_wall, now_store);
        summary
    }

    /// One entry of the file: counted now, or back in the store.
    fn restore_entry(
        &self,
        key: Key,
        slot: Slot,
        known: bool,
        expired: bool,
        summary: &mut RestoreSummary,
    ) {
        let sink = &*self.sink;
        let view = slot.state.view(&self.numbering, &slot.flow);
        let open_dims = match &view {
            View::Open { dims, .. } => Some(*dims),
            View::Stepped(open) => Some(&open.dims),
            View::Waiting(_) => None,
        };
        match open_dims {
            Some(start_dims) if !known => {
                summary.discarded += 1;
                return sink.report(Report::Discarded {
                    flow: &slot.flow,
                    start_dims,
                });
            }
            Some(start_dims) => sink.report(Report::Restored {
                flow: &slot.flow,
                start_dims,
            }),
            None if !known => {
                summary.discarded += 1;
                return report_gone(sink, &self.numbering, &slot, Gone::TimedOut);
            }
            None => {}
        }
        let open = open_dims.is_some();
        drop(view);
        match (expired, open) {
            (true, true) => summary.expired += 1,
            (true, false) => summary.expired_ends += 1,
            (false, true) => summary.open += 1,
            (false, false) => summary.waiting += 1,
        }
        if expired {
            report_gone(sink, &self.numbering, &slot, Gone::TimedOut);
        } else {
            self.put(key, slot);
        }
    }

    /// Fingerprints live in the shard of their key: only a file with the same sharding
    /// can be used.
    fn restore_fingerprints(&self, saved: &[SavedShard], now_wall: u64, now_store: u64) {
        if saved.len() == SHARDS {
            for (shard, saved) in self.shards.iter().zip(saved) {
                let age = now_wall.saturating_sub(saved.rotated_at_unix_nanos);
                let mut recent = shard.lock().unwrap_or_else(PoisonError::into_inner);
                recent.import(
                    &saved.fingerprints,
                    u64::from(saved.current_tag),
                    now_store.saturating_sub(age),
                );
            }
        } else if !saved.is_empty() {
            tracing::warn!(
                "state file: retry fingerprints of another layout ({} shards) not restored",
                saved.len()
            );
        }
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
        let mut index: HashMap<Arc<str>, u32, RandomState> = HashMap::default();
        let mut intern = |s: &Arc<str>| -> u32 {
            *index.entry(s.clone()).or_insert_with(|| {
                strings.push(s.clone());
                (strings.len() - 1) as u32
            })
        };
        let mut entries =
            Vec::with_capacity(usize::try_from(self.cache.entry_count()).unwrap_or(0));
        for (key, slot) in self.cache.iter() {
            let state = saved_state(&slot.state, &self.numbering, &slot.flow, &mut intern);
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
                let (fingerprints, tag, rotated_at) = shard
                    .lock()
                    .unwrap_or_else(PoisonError::into_inner)
                    .export();
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

    /// moka's iterator skips an entry past its deadline that its housekeeping has not
    /// removed yet (up to ~1 s for a per-entry deadline): such an entry is in neither
    /// the file nor the counts. So, with the file's keys known to the listener, the
    /// housekeeping runs until every entry not in the file is gone, counted here.
    pub(super) fn final_snapshot_now(&self) -> StoreSnapshot {
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
            .unwrap_or_else(PoisonError::into_inner) = keys;
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
        snapshot
    }
}

fn trace_code(trace: Option<TraceRef>) -> Trace {
    trace.map(|t| (t.trace_id, t.span_id))
}

fn trace_of(saved: Trace) -> Option<TraceRef> {
    saved.map(|(trace_id, span_id)| TraceRef { trace_id, span_id })
}

/// An entry as the file keeps it; strings go through `intern` (their index).
fn saved_state(
    state: &SlotState,
    numbering: &Numbering,
    flow: &str,
    intern: &mut impl FnMut(&Arc<str>) -> u32,
) -> SavedState {
    let mut dims = |d: &DimValues| d.iter().map(&mut *intern).collect::<Vec<u32>>();
    match state.view(numbering, flow) {
        View::Open {
            start_nanos,
            dims: d,
        } => SavedState::Open {
            start_nanos,
            dims: dims(d),
        },
        View::Stepped(open) => {
            let d = dims(&open.dims);
            SavedState::Stepped {
                start_nanos: open.start_nanos,
                dims: d,
                steps: open
                    .steps
                    .iter()
                    .map(|s| saved_step(&s.step, s.timestamp_nanos, None, intern))
                    .collect(),
            }
        }
        View::Waiting(pending) => {
            let end = pending.end.as_ref().map(|end| SavedEnd {
                outcome: end.outcome.code(),
                timestamp_nanos: end.timestamp_nanos,
                dims: dims(&end.dims),
                trace: trace_code(end.trace),
            });
            match end {
                // A waiting end alone: as version 1 wrote it.
                Some(end) if pending.steps.is_empty() => SavedState::Waiting(end),
                end => SavedState::Pending {
                    end,
                    steps: pending
                        .steps
                        .iter()
                        .map(|s| saved_step(&s.step, s.timestamp_nanos, s.trace, intern))
                        .collect(),
                },
            }
        }
    }
}

/// An entry read back; `start_dims`/`end_dims` match saved values to today's labels.
/// Indexes were checked by `StoreSnapshot::validate`.
fn slot_state(
    saved: SavedState,
    strings: &[Arc<str>],
    (numbering, flow): (&Numbering, &Arc<str>),
    start_dims: &dyn Fn(&[u32]) -> DimValues,
    end_dims: &dyn Fn(&[u32]) -> DimValues,
) -> SlotState {
    let string = |i: u32| {
        strings
            .get(i as usize)
            .cloned()
            .unwrap_or_else(|| Arc::from(""))
    };
    let end = |saved: SavedEnd| EndRecord {
        // Checked by `StoreSnapshot::validate`.
        outcome: Outcome::from_code(saved.outcome).unwrap_or(Outcome::Cancelled),
        timestamp_nanos: saved.timestamp_nanos,
        dims: end_dims(&saved.dims),
        trace: trace_of(saved.trace),
    };
    match saved {
        SavedState::Open { start_nanos, dims } => SlotState::Open {
            start_nanos,
            dims: start_dims(&dims),
        },
        SavedState::Waiting(saved) => SlotState::waiting(Pending::end(end(saved))),
        SavedState::Stepped {
            start_nanos,
            dims,
            steps,
        } => SlotState::stepped(
            numbering,
            flow,
            Stepped {
                start_nanos,
                dims: start_dims(&dims),
                steps: steps
                    .into_iter()
                    .map(|s| StepAt {
                        step: string(s.step),
                        timestamp_nanos: s.timestamp_nanos,
                    })
                    .collect(),
            },
        ),
        SavedState::Pending {
            end: saved_end,
            steps,
        } => SlotState::waiting(Pending {
            end: saved_end.map(end),
            steps: steps
                .into_iter()
                .map(|s| WaitingStep {
                    step: string(s.step),
                    timestamp_nanos: s.timestamp_nanos,
                    trace: trace_of(s.trace),
                })
                .collect(),
        }),
    }
}

fn saved_step(
    step: &Arc<str>,
    timestamp_nanos: u64,
    trace: Option<TraceRef>,
    intern: &mut impl FnMut(&Arc<str>) -> u32,
) -> SavedStep {
    SavedStep {
        step: intern(step),
        timestamp_nanos,
        trace: trace_code(trace),
    }
}
