//! Flow steps in the moka store (docs/behaviour.md §9).
//!
//! Cost: a pairs-only instance stays a `SlotState::Open` (no field for steps). The first
//! step turns it into one boxed run of words beside the slot's niche ([`Words`]: the
//! start, the number of its start dimensions, each step's time and number; 10 bytes a
//! step), read back by name ([`Stepped`]) only to report. Steps that come before their
//! start wait in the same entry as a waiting end does (`Pending`).
//!
//! [`Words`]: super::step_words::Words
//!
//! "Already closed": when an instance of a flow that uses steps (declared, or one step
//! event seen) closes, a fingerprint of its key is remembered for the longest flow
//! timeout in [`ClosedMarks`] (8 bytes, beside the cache, not a moka entry): a step that
//! finds no entry but a mark is `after_close`; one that finds neither waits for its start
//! and, if it never comes, is `no_start`. Flows that never see a step pay one relaxed
//! atomic load per close.

use std::collections::HashSet;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex, PoisonError, RwLock};

use super::cache::{report_gone, Gone, Key, More, Slot, SlotState, View};
use super::step_words::Numbering;
use super::{MemoryStore, SHARDS};
use crate::flows::dedup::RecentEvents;
use crate::flows::event::{DimValues, TraceRef};
use crate::flows::store::{
    duration_secs, EndRecord, FlowSink, Report, StepTransit, StepUnmatchedReason,
};

/// A step an open instance reached.
#[derive(Debug, Clone)]
pub(crate) struct StepAt {
    pub step: Arc<str>,
    pub timestamp_nanos: u64,
}

/// A step waiting for its start (its trace is kept for the exemplar).
#[derive(Debug, Clone)]
pub(crate) struct WaitingStep {
    pub step: Arc<str>,
    pub timestamp_nanos: u64,
    pub trace: Option<TraceRef>,
}

/// An open instance that has reached at least one step, by name.
#[derive(Debug, Clone)]
pub(crate) struct Stepped {
    pub start_nanos: u64,
    pub dims: DimValues,
    /// In arrival order; each step once.
    pub steps: Box<[StepAt]>,
}

/// Events waiting for their start: an end, steps, or both.
#[derive(Debug)]
pub(crate) struct Pending {
    pub end: Option<EndRecord>,
    pub steps: Box<[WaitingStep]>,
}

impl Pending {
    pub fn end(end: EndRecord) -> Self {
        Self {
            end: Some(end),
            steps: Box::new([]),
        }
    }
}

/// The flows that use steps, and the instances of theirs that closed recently.
pub(crate) struct ClosedMarks {
    /// Some flow uses steps: until then no close is remembered (nor looked up).
    pub(super) any: AtomicBool,
    flows: RwLock<HashSet<Arc<str>, foldhash::fast::RandomState>>,
    /// Per shard of the store (the same key → shard mapping); never held while moka is
    /// called, so the eviction listener may take it inside the store's own `remove`.
    marks: Box<[Mutex<RecentEvents>]>,
}

impl ClosedMarks {
    pub fn new(declared: &[Arc<str>], window_nanos: u64, per_shard: usize) -> Self {
        Self {
            any: AtomicBool::new(!declared.is_empty()),
            flows: RwLock::new(declared.iter().cloned().collect()),
            marks: (0..SHARDS)
                .map(|_| Mutex::new(RecentEvents::new(window_nanos, per_shard, 0)))
                .collect(),
        }
    }

    /// The flow has step events: its closes are remembered from now on.
    pub fn note_flow(&self, flow: &Arc<str>) {
        if self.uses_steps(flow) {
            return;
        }
        self.flows
            .write()
            .unwrap_or_else(PoisonError::into_inner)
            .insert(flow.clone());
        self.any.store(true, Ordering::Release);
    }

    /// Whether the flow uses steps (declared, or seen with a step event).
    pub(super) fn uses_steps(&self, flow: &str) -> bool {
        self.any.load(Ordering::Acquire)
            && self
                .flows
                .read()
                .unwrap_or_else(PoisonError::into_inner)
                .contains(flow)
    }

    fn shard(&self, key: Key) -> std::sync::MutexGuard<'_, RecentEvents> {
        self.marks[(key >> 64) as usize % SHARDS]
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
    }

    /// An instance closed (ended, timed out or was dropped) at `now`.
    pub fn mark(&self, flow: &str, key: Key, now: u64) {
        if self.uses_steps(flow) {
            self.shard(key).check_and_remember(mark_of(key), now);
        }
    }

    pub fn is_closed(&self, key: Key, now: u64) -> bool {
        self.any.load(Ordering::Acquire) && self.shard(key).contains(mark_of(key), now)
    }
}

fn mark_of(key: Key) -> u64 {
    (key as u64) ^ (key >> 64) as u64
}

/// Each step's time since the one before it by event timestamp (the first's since the
/// start), and the latest step.
pub(crate) fn transits(start_nanos: u64, steps: &[StepAt]) -> (Vec<StepTransit>, Option<Arc<str>>) {
    let mut order: Vec<&StepAt> = steps.iter().collect();
    order.sort_by_key(|s| s.timestamp_nanos);
    let transits = StepTransit::in_order(
        start_nanos,
        order.iter().map(|s| (&s.step, s.timestamp_nanos)),
    );
    (transits, order.last().map(|s| s.step.clone()))
}

/// Reports a step reached by an instance whose start is known.
fn reached(
    sink: &dyn FlowSink,
    flow: &Arc<str>,
    dims: &DimValues,
    start_nanos: u64,
    step: &WaitingStep,
) {
    sink.report(Report::StepReached {
        flow,
        start_dims: dims,
        step: &step.step,
        since_start_secs: duration_secs(start_nanos, step.timestamp_nanos),
        trace: step.trace,
    });
}

/// `steps` with `step` added, or the earlier timestamp kept for one already there.
/// `None`: already there (a duplicate) and nothing changes.
fn with_step(steps: &[StepAt], step: &Arc<str>, timestamp_nanos: u64) -> (Box<[StepAt]>, bool) {
    match steps.iter().position(|s| s.step == *step) {
        Some(i) => {
            let mut steps = steps.to_vec();
            steps[i].timestamp_nanos = steps[i].timestamp_nanos.min(timestamp_nanos);
            (steps.into(), false)
        }
        None => {
            let mut out = Vec::with_capacity(steps.len() + 1);
            out.extend_from_slice(steps);
            out.push(StepAt {
                step: step.clone(),
                timestamp_nanos,
            });
            (out.into(), true)
        }
    }
}

impl MemoryStore {
    /// A step event of `key` (docs/behaviour.md §9).
    pub(super) fn apply_step(&self, key: Key, flow: Arc<str>, step: WaitingStep, now: u64) {
        let sink = &*self.sink;
        self.closed.note_flow(&flow);
        let Some(slot) = self.take(key, now) else {
            if self.closed.is_closed(key, now) {
                return sink.report(Report::StepUnmatched {
                    flow: &flow,
                    reason: StepUnmatchedReason::AfterClose,
                });
            }
            let pending = Pending {
                end: None,
                steps: Box::new([step]),
            };
            return self.put_new(key, flow, SlotState::waiting(pending), now);
        };
        let state = match self.step_by_number(&slot.flow, &slot.state, &step) {
            Some(state) => state,
            None => self.step_by_name(&slot.flow, &slot.state, step),
        };
        self.put(key, Slot { state, ..slot });
    }

    /// A step of an instance held by number: no name or dimension list is looked up
    /// unless it is reached. `None`: not held so, or no number for the step.
    fn step_by_number(
        &self,
        flow: &Arc<str>,
        state: &SlotState,
        step: &WaitingStep,
    ) -> Option<SlotState> {
        let SlotState::More(More::Steps(words)) = state else {
            return None;
        };
        let number = self.numbering.step_number(flow, &step.step)?;
        let (words, new) = words.with_step(number, step.timestamp_nanos)?;
        if new {
            let dims = self.numbering.dims(&words);
            reached(&*self.sink, flow, &dims, words.start_nanos(), step);
        } else {
            self.sink.report(Report::Duplicate {
                kind: crate::flows::EventKind::Step,
            });
        }
        Some(SlotState::More(More::Steps(words)))
    }

    /// A step of any entry, by name.
    fn step_by_name(&self, flow: &Arc<str>, state: &SlotState, step: WaitingStep) -> SlotState {
        let sink = &*self.sink;
        match state.view(&self.numbering, flow) {
            View::Open { start_nanos, dims } => {
                reached(sink, flow, dims, start_nanos, &step);
                let (steps, _) = with_step(&[], &step.step, step.timestamp_nanos);
                let open = Stepped {
                    start_nanos,
                    dims: dims.clone(),
                    steps,
                };
                SlotState::stepped(&self.numbering, flow, open)
            }
            View::Stepped(open) => {
                let (steps, new) = with_step(&open.steps, &step.step, step.timestamp_nanos);
                if new {
                    reached(sink, flow, &open.dims, open.start_nanos, &step);
                } else {
                    sink.report(Report::Duplicate {
                        kind: crate::flows::EventKind::Step,
                    });
                }
                let open = Stepped {
                    steps,
                    ..open.into_owned()
                };
                SlotState::stepped(&self.numbering, flow, open)
            }
            View::Waiting(pending) => {
                let mut steps = pending.steps.to_vec();
                match steps.iter_mut().find(|s| s.step == step.step) {
                    Some(known) => {
                        if step.timestamp_nanos < known.timestamp_nanos {
                            *known = step;
                        }
                        sink.report(Report::Duplicate {
                            kind: crate::flows::EventKind::Step,
                        });
                    }
                    None => steps.push(step),
                }
                SlotState::waiting(Pending {
                    end: pending.end.clone(),
                    steps: steps.into(),
                })
            }
        }
    }

    /// A start meets what waited for it: steps are reached, and a waiting end closes
    /// the instance at once; with no end it stays open with its steps.
    pub(super) fn start_over_pending(
        &self,
        key: Key,
        flow: Arc<str>,
        start_nanos: u64,
        dims: DimValues,
        pending: &Pending,
        now: u64,
    ) {
        let sink = &*self.sink;
        sink.report(Report::Opened {
            flow: &flow,
            start_dims: &dims,
        });
        for step in pending.steps.iter() {
            reached(sink, &flow, &dims, start_nanos, step);
        }
        let steps: Box<[StepAt]> = pending
            .steps
            .iter()
            .map(|s| StepAt {
                step: s.step.clone(),
                timestamp_nanos: s.timestamp_nanos,
            })
            .collect();
        match &pending.end {
            Some(end) => {
                complete(sink, &flow, &dims, start_nanos, &steps, end);
                self.closed.mark(&flow, key, now);
            }
            None => {
                let open = Stepped {
                    start_nanos,
                    dims,
                    steps,
                };
                let state = SlotState::stepped(&self.numbering, &flow, open);
                self.put_new(key, flow, state, now);
            }
        }
    }
}

/// An instance closed by its end, with the transits of the steps it reached.
pub(super) fn complete(
    sink: &dyn FlowSink,
    flow: &Arc<str>,
    start_dims: &DimValues,
    start_nanos: u64,
    steps: &[StepAt],
    end: &EndRecord,
) {
    let (transits, _) = transits(start_nanos, steps);
    sink.report(Report::Completed {
        flow,
        start_dims,
        end,
        duration_secs: duration_secs(start_nanos, end.timestamp_nanos),
        transits: &transits,
    });
}

/// An entry that left without its counterpart, counted (and its close remembered).
pub(super) fn gone(
    sink: &dyn FlowSink,
    closed: &ClosedMarks,
    numbering: &Numbering,
    key: Key,
    slot: &Slot,
    why: Gone,
    now: u64,
) {
    if !slot.state.is_waiting() {
        closed.mark(&slot.flow, key, now);
    }
    report_gone(sink, numbering, slot, why);
}

/// Each waiting step of an entry that left: its start never came.
pub(super) fn steps_unmatched(sink: &dyn FlowSink, flow: &Arc<str>, pending: &Pending) {
    for _ in pending.steps.iter() {
        sink.report(Report::StepUnmatched {
            flow,
            reason: StepUnmatchedReason::NoStart,
        });
    }
}

/// A timed-out instance with steps.
pub(super) fn timed_out(sink: &dyn FlowSink, flow: &Arc<str>, open: &Stepped) {
    let (transits, last) = transits(open.start_nanos, &open.steps);
    sink.report(Report::TimedOut {
        flow,
        start_dims: &open.dims,
        transits: &transits,
        last_step: last.as_ref(),
    });
}
