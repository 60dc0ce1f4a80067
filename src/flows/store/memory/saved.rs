//! A moka entry's state to and from its form in the state file.

use std::sync::Arc;

use super::step_words::Numbering;
use super::steps::{Pending, StepAt, Stepped, WaitingStep};
use super::{SlotState, View};
use crate::flows::event::{DimValues, Outcome, TraceRef};
use crate::flows::state::{SavedEnd, SavedState, SavedStep};
use crate::flows::store::EndRecord;

type Trace = Option<([u8; 16], [u8; 8])>;

fn outcome_code(outcome: Outcome) -> u8 {
    match outcome {
        Outcome::Success => 0,
        Outcome::Failure => 1,
        Outcome::Cancelled => 2,
    }
}

fn outcome_of(code: u8) -> Outcome {
    match code {
        0 => Outcome::Success,
        1 => Outcome::Failure,
        _ => Outcome::Cancelled,
    }
}

fn trace_code(trace: Option<TraceRef>) -> Trace {
    trace.map(|t| (t.trace_id, t.span_id))
}

fn trace_of(saved: Trace) -> Option<TraceRef> {
    saved.map(|(trace_id, span_id)| TraceRef { trace_id, span_id })
}

/// An entry as the file keeps it; strings go through `intern` (their index).
pub(super) fn saved_state(
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
                    .map(|s| SavedStep {
                        step: intern(&s.step),
                        timestamp_nanos: s.timestamp_nanos,
                        trace: None,
                    })
                    .collect(),
            }
        }
        View::Waiting(pending) => {
            let end = pending.end.as_ref().map(|end| SavedEnd {
                outcome: outcome_code(end.outcome),
                timestamp_nanos: end.timestamp_nanos,
                dims: dims(&end.dims),
                trace: trace_code(end.trace),
            });
            match end {
                // A waiting end alone: as version 1 wrote it.
                Some(end) if pending.steps.is_empty() => SavedState::Waiting {
                    outcome: end.outcome,
                    timestamp_nanos: end.timestamp_nanos,
                    dims: end.dims,
                    trace: end.trace,
                },
                end => SavedState::Pending {
                    end,
                    steps: pending
                        .steps
                        .iter()
                        .map(|s| SavedStep {
                            step: intern(&s.step),
                            timestamp_nanos: s.timestamp_nanos,
                            trace: trace_code(s.trace),
                        })
                        .collect(),
                },
            }
        }
    }
}

/// An entry read back; `start_dims`/`end_dims` match saved values to today's labels.
/// Indexes were checked by `StoreSnapshot::validate`.
pub(super) fn slot_state(
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
    let end = |outcome, timestamp_nanos, dims: &[u32], trace| EndRecord {
        outcome: outcome_of(outcome),
        timestamp_nanos,
        dims: end_dims(dims),
        trace: trace_of(trace),
    };
    match saved {
        SavedState::Open { start_nanos, dims } => SlotState::Open {
            start_nanos,
            dims: start_dims(&dims),
        },
        SavedState::Waiting {
            outcome,
            timestamp_nanos,
            dims,
            trace,
        } => SlotState::waiting(Pending::end(end(outcome, timestamp_nanos, &dims, trace))),
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
            end: saved_end.map(|e| end(e.outcome, e.timestamp_nanos, &e.dims, e.trace)),
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
