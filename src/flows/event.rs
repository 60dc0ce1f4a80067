//! What a flow event is: the vocabulary every later stage shares. How one is recognised
//! is [`super::extract`]'s business.

use std::borrow::Cow;
use std::sync::Arc;

/// Values of the configured dimensions of one side (start or end), in config order.
pub type DimValues = Arc<[Arc<str>]>;

/// How an instance ended (`outcome` label).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Outcome {
    /// It did what it was for.
    Success,
    /// It failed (also an end without an outcome on an error span).
    Failure,
    /// It was called off.
    Cancelled,
}

impl Outcome {
    /// The `outcome` label value.
    pub fn as_str(self) -> &'static str {
        match self {
            Outcome::Success => "success",
            Outcome::Failure => "failure",
            Outcome::Cancelled => "cancelled",
        }
    }

    /// Case-insensitive, with the aliases of docs/behaviour.md §2.
    pub fn parse(raw: &str) -> Option<Outcome> {
        const TABLE: [(&str, Outcome); 7] = [
            ("success", Outcome::Success),
            ("ok", Outcome::Success),
            ("failure", Outcome::Failure),
            ("failed", Outcome::Failure),
            ("error", Outcome::Failure),
            ("cancelled", Outcome::Cancelled),
            ("canceled", Outcome::Cancelled),
        ];
        // Nothing to trim when both ends are ASCII and not white space (every other
        // white space character starts with a byte of 0x80 or more).
        let plain = |b: Option<&u8>| b.is_some_and(|&b| b < 0x80 && !b.is_ascii_whitespace());
        let raw = if plain(raw.as_bytes().first()) && plain(raw.as_bytes().last()) {
            raw
        } else {
            raw.trim()
        };
        TABLE
            .iter()
            .find(|(name, _)| name.eq_ignore_ascii_case(raw))
            .map(|(_, o)| *o)
    }
}

/// What an event does to its instance. Copy and two bytes: the step's name travels on
/// the event ([`FlowEvent::step`]), so pairs-only flows carry nothing for steps.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum EventKind {
    /// An instance opened.
    Start,
    /// An instance ended, with its outcome.
    End(Outcome),
    /// A step reached (docs/behaviour.md §9); [`FlowEvent::step`] names it.
    Step,
}

impl EventKind {
    /// The `kind` label value.
    pub fn label(self) -> &'static str {
        match self {
            EventKind::Start => "start",
            EventKind::End(_) => "end",
            EventKind::Step => "step",
        }
    }

    /// 0 start, 1 end, 2 step: for per-kind counters.
    pub fn index(self) -> usize {
        match self {
            EventKind::Start => 0,
            EventKind::End(_) => 1,
            EventKind::Step => 2,
        }
    }

    /// Every `kind` label value, in [`EventKind::index`] order.
    pub const LABELS: [&'static str; 3] = ["start", "end", "step"];
}

/// Where a flow event was found.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Source {
    /// An event of a span.
    SpanEvent = 0,
    /// A log record.
    Log = 1,
}

impl Source {
    /// The `source` label value.
    pub fn label(self) -> &'static str {
        match self {
            Source::SpanEvent => "span_event",
            Source::Log => "log",
        }
    }
}

/// The trace and span an event was emitted in, for exemplars.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct TraceRef {
    /// The trace id, 16 bytes, not all zero.
    pub trace_id: [u8; 16],
    /// The span id, 8 bytes, not all zero.
    pub span_id: [u8; 8],
}

impl TraceRef {
    /// Only well-formed, non-zero ids make an exemplar.
    pub fn from_ids(trace_id: &[u8], span_id: &[u8]) -> Option<TraceRef> {
        let trace_id: [u8; 16] = trace_id.try_into().ok()?;
        let span_id: [u8; 8] = span_id.try_into().ok()?;
        if trace_id == [0; 16] || span_id == [0; 8] {
            return None;
        }
        Some(TraceRef { trace_id, span_id })
    }
}

/// One recognised flow event, ready for the correlation store. Its correlation id is
/// borrowed from the request where it can be (the in-memory store only hashes it);
/// [`FlowEvent::into_owned`] copies it for a store that keeps events past the call.
#[derive(Debug, Clone)]
pub struct FlowEvent<'a> {
    /// The flow's name (from the event name).
    pub flow: Arc<str>,
    /// The correlation id pairing the instance's events.
    pub correlation_id: Cow<'a, str>,
    /// Start, end (with its outcome) or step.
    pub kind: EventKind,
    /// Unix nanoseconds: the event's own time, else its span's end time (a log
    /// record's observed time), else the time it was received.
    pub timestamp_nanos: u64,
    /// Values of the dimensions read from this side (start dims on a start, end dims on
    /// an end).
    pub dims: DimValues,
    /// The span (or log record) it came from, for exemplars.
    pub trace: Option<TraceRef>,
    /// A span event or a log record.
    pub source: Source,
    /// The step's name (shared by every event of that step of the flow), exactly when
    /// `kind` is [`EventKind::Step`].
    pub step: Option<Arc<str>>,
}

impl FlowEvent<'_> {
    /// The same event, owning its correlation id.
    pub fn into_owned(self) -> FlowEvent<'static> {
        FlowEvent {
            correlation_id: Cow::Owned(self.correlation_id.into_owned()),
            flow: self.flow,
            kind: self.kind,
            timestamp_nanos: self.timestamp_nanos,
            dims: self.dims,
            trace: self.trace,
            source: self.source,
            step: self.step,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn outcomes_are_trimmed() {
        assert_eq!(Outcome::parse(" Success\t"), Some(Outcome::Success));
        assert_eq!(Outcome::parse("\u{2003}ok\u{a0}"), Some(Outcome::Success));
        assert_eq!(Outcome::parse("failed\n"), Some(Outcome::Failure));
        assert_eq!(Outcome::parse(""), None);
        assert_eq!(Outcome::parse("  "), None);
        assert_eq!(Outcome::parse("okay"), None);
    }

    #[test]
    fn trace_refs_need_well_formed_ids() {
        assert!(TraceRef::from_ids(&[1; 16], &[2; 8]).is_some());
        assert!(TraceRef::from_ids(&[1; 15], &[2; 8]).is_none());
        assert!(TraceRef::from_ids(&[0; 16], &[2; 8]).is_none());
        assert!(TraceRef::from_ids(&[1; 16], &[]).is_none());
    }
}
