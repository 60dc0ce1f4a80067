//! Flow steps in the shared store (docs/behaviour.md §9): what a step event sends to the
//! apply script, and what replicas make of the steps the scripts hand back when an
//! instance opens, closes or times out.
//!
//! An instance's steps live in a Redis hash beside its key, in the same hash slot
//! (`…{h}k<flow>\0<id>`): field the step's name, value its event timestamp as 20 digits
//! (compared as strings, the earliest kept) followed by its trace and span ids when it
//! had them. The hash exists only for instances that reached a step, and the scripts read
//! it only when an instance leaves: a flow without steps costs no key and no round trip.

use std::collections::HashSet;
use std::sync::{Arc, Mutex, PoisonError};

use super::super::{duration_secs, FlowSink, Report, StepTransit, StepUnmatchedReason};
use super::codec::parse_netstrings;
use crate::flows::event::{DimValues, FlowEvent, TraceRef};

/// Flows whose use of steps this replica has announced to every shard, so that their
/// closed instances leave a closed mark on every shard, not only where a step of theirs
/// came before: flows with declared steps with the first batch, others with their first
/// step event. Bounded: beyond [`KnownStepFlows::MAX`] flows, each step marks its own
/// shard only.
pub(super) struct KnownStepFlows {
    known: Mutex<HashSet<Arc<str>>>,
    /// Declared flows not yet announced (emptied once they are).
    declared: Mutex<Vec<Arc<str>>>,
}

impl KnownStepFlows {
    const MAX: usize = 10_000;

    pub fn new(declared: Vec<Arc<str>>) -> Self {
        Self {
            known: Mutex::default(),
            declared: Mutex::new(declared),
        }
    }

    /// The flows of step events in `events` not yet announced (usually none), and the
    /// declared ones until they are.
    pub fn unknown(&self, events: &[FlowEvent]) -> Vec<Arc<str>> {
        let mut new: Vec<Arc<str>> = self
            .declared
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .clone();
        let known = self.known.lock().unwrap_or_else(PoisonError::into_inner);
        if known.len() >= Self::MAX {
            return new;
        }
        for e in events.iter().filter(|e| e.step.is_some()) {
            if !known.contains(&e.flow) && !new.contains(&e.flow) {
                new.push(e.flow.clone());
            }
        }
        new
    }

    pub fn learned(&self, flows: Vec<Arc<str>>) {
        self.declared
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .retain(|d| !flows.contains(d));
        let mut known = self.known.lock().unwrap_or_else(PoisonError::into_inner);
        for flow in flows {
            if known.len() < Self::MAX {
                known.insert(flow);
            }
        }
    }
}

/// A step as the store kept it.
#[derive(Debug, Clone, PartialEq)]
pub(super) struct StoredStep {
    pub name: Arc<str>,
    pub timestamp_nanos: u64,
    pub trace: Option<TraceRef>,
}

/// The script's argument for a step event: `<step>\0<stored value>`.
pub(super) fn step_argument(event: &FlowEvent) -> Vec<u8> {
    let name = event.step.as_deref().unwrap_or_default();
    let mut out = Vec::with_capacity(name.len() + 45);
    out.extend_from_slice(name.as_bytes());
    out.push(0);
    out.extend_from_slice(format!("{:020}", event.timestamp_nanos).as_bytes());
    if let Some(trace) = event.trace {
        out.extend_from_slice(&trace.trace_id);
        out.extend_from_slice(&trace.span_id);
    }
    out
}

/// Reads the steps a script returned (netstrings: name, value, name, value, …). An
/// entry that cannot be read is left out (logged): it cannot be attributed.
pub(super) fn parse_steps(blob: &[u8]) -> Vec<StoredStep> {
    if blob.is_empty() {
        return Vec::new();
    }
    let Some(fields) = parse_netstrings(blob) else {
        tracing::warn!("correlation store (redis): the steps of an instance could not be read");
        return Vec::new();
    };
    let mut steps = Vec::with_capacity(fields.len() / 2);
    for pair in fields.chunks_exact(2) {
        let value = &pair[1];
        let timestamp = value
            .get(..20)
            .and_then(|d| std::str::from_utf8(d).ok())
            .and_then(|d| d.parse::<u64>().ok());
        let trace = match value.len() {
            44 => TraceRef::from_ids(&value[20..36], &value[36..]),
            _ => None,
        };
        match (std::str::from_utf8(&pair[0]), timestamp) {
            (Ok(name), Some(timestamp_nanos)) => steps.push(StoredStep {
                name: Arc::from(name),
                timestamp_nanos,
                trace,
            }),
            _ => tracing::warn!("correlation store (redis): a step could not be read"),
        }
    }
    // By event timestamp (then name, so that replicas agree on ties).
    steps.sort_by(|a, b| (a.timestamp_nanos, &a.name).cmp(&(b.timestamp_nanos, &b.name)));
    steps
}

/// Each step's time since the one before it (the first's since the start), in the
/// order reached, and the last step reached.
pub(super) fn transits(start_nanos: u64, steps: &[StoredStep]) -> Vec<StepTransit> {
    StepTransit::in_order(
        start_nanos,
        steps.iter().map(|s| (&s.name, s.timestamp_nanos)),
    )
}

/// Steps that waited for the start, now known: each reached once.
pub(super) fn report_reached(
    sink: &dyn FlowSink,
    flow: &Arc<str>,
    start_dims: &DimValues,
    start_nanos: u64,
    steps: &[StoredStep],
) {
    for s in steps {
        sink.report(Report::StepReached {
            flow,
            start_dims,
            step: &s.name,
            since_start_secs: duration_secs(start_nanos, s.timestamp_nanos),
            trace: s.trace,
        });
    }
}

/// Steps of an instance that never started (it timed out, or was evicted, waiting).
pub(super) fn report_no_start(sink: &dyn FlowSink, flow: &Arc<str>, steps: &[StoredStep]) {
    for _ in steps {
        sink.report(Report::StepUnmatched {
            flow,
            reason: StepUnmatchedReason::NoStart,
        });
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::flows::event::{EventKind, Source};

    fn netstrings(parts: &[&[u8]]) -> Vec<u8> {
        let mut out = Vec::new();
        for p in parts {
            out.extend_from_slice(format!("{}:", p.len()).as_bytes());
            out.extend_from_slice(p);
        }
        out
    }

    #[test]
    fn steps_read_back_in_timestamp_order_with_their_traces() {
        let trace = TraceRef {
            trace_id: [3; 16],
            span_id: [4; 8],
        };
        let event = FlowEvent {
            flow: Arc::from("order"),
            correlation_id: "o-1".into(),
            kind: EventKind::Step,
            timestamp_nanos: 2_500_000_000,
            dims: Arc::from([]),
            trace: Some(trace),
            source: Source::SpanEvent,
            step: Some(Arc::from("packed")),
        };
        let arg = step_argument(&event);
        let (name, value) = arg.split_at(arg.iter().position(|&b| b == 0).unwrap());
        let value = &value[1..];
        let blob = netstrings(&[
            name,
            value,
            b"placed",
            b"00000000001000000000",
            b"x",
            b"bad",
        ]);
        let steps = parse_steps(&blob);
        assert_eq!(steps.len(), 2, "the unreadable one is left out");
        assert_eq!(&*steps[0].name, "placed");
        assert_eq!(steps[0].trace, None);
        assert_eq!(&*steps[1].name, "packed");
        assert_eq!(steps[1].trace, Some(trace));
        let t = transits(500_000_000, &steps);
        assert_eq!(t[0].transit_secs, 0.5);
        assert_eq!(t[1].transit_secs, 1.5);
        assert!(parse_steps(b"").is_empty());
        assert!(parse_steps(b"9:x").is_empty());
    }
}
