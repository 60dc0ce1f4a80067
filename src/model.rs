//! The small shared vocabulary every stage may use: flow-name rules, label names that
//! flowmetrics reserves for itself, the transports and signals of OTLP, and why a flow
//! event can be refused. A leaf: it imports nothing else of the crate.

use std::fmt;

/// The label that marks a family's overflow series (the OpenTelemetry SDK convention).
pub const OVERFLOW_LABEL: &str = "otel_metric_overflow";

/// Label names of flowmetrics' own families: a configured dimension may not take them.
pub const RESERVED_LABELS: [&str; 7] = [
    "flow",
    "outcome",
    "error_reason",
    "le",
    OVERFLOW_LABEL,
    "step",
    "last_step",
];

/// Which OTLP transport a request came in on.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Transport {
    /// OTLP/HTTP (protobuf or JSON).
    Http,
    /// OTLP/gRPC.
    Grpc,
}

impl Transport {
    /// The `transport` label value.
    pub fn label(self) -> &'static str {
        match self {
            Transport::Http => "http",
            Transport::Grpc => "grpc",
        }
    }
}

/// The OTLP signal of a request.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Signal {
    /// Spans, whose events may be flow events.
    Traces,
    /// Log records, which may be flow events.
    Logs,
    /// Metric data points.
    Metrics,
}

impl Signal {
    /// The `signal` label value.
    pub fn label(self) -> &'static str {
        match self {
            Signal::Traces => "traces",
            Signal::Logs => "logs",
            Signal::Metrics => "metrics",
        }
    }
}

/// The ids of a span (or log record), and the length each must have when it is set:
/// checked by every decoder, since neither prost nor serde checks them.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum IdField {
    /// A span's (or log record's) trace id: 16 bytes.
    TraceId,
    /// A span's (or log record's) span id: 8 bytes.
    SpanId,
    /// A span's parent span id: 8 bytes.
    ParentSpanId,
}

impl IdField {
    /// The field's name in OTLP/JSON.
    pub fn name(self) -> &'static str {
        match self {
            IdField::TraceId => "traceId",
            IdField::SpanId => "spanId",
            IdField::ParentSpanId => "parentSpanId",
        }
    }

    /// Bytes it must have (or none, when unset).
    pub fn bytes(self) -> usize {
        match self {
            IdField::TraceId => 16,
            IdField::SpanId | IdField::ParentSpanId => 8,
        }
    }

    /// Empty (unset) or of the right length.
    pub fn fits(self, id: &[u8]) -> bool {
        id.is_empty() || id.len() == self.bytes()
    }
}

/// Why a flow event was refused. The label values are public (`reason`).
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Rejection {
    /// The flow name breaks the flow-name rules.
    InvalidFlowName,
    /// None of `events.correlation_keys` gives a correlation id.
    MissingCorrelationId,
    /// The correlation id is longer than `events.max_correlation_id_bytes`.
    CorrelationIdTooLong,
    /// An end whose outcome is not one of the known values (the value, cut to 64 bytes).
    InvalidOutcome(String),
    /// A flow not named in `flows.per_flow` while `flows.allow_unknown` is false.
    UnknownFlow,
    /// A step name that breaks the flow-name rules or is longer than 64 characters.
    InvalidStep,
    /// A step event without the step attribute (`events.step_key`).
    MissingStep,
    /// A step name the flow's declared list (`flows.per_flow.<flow>.steps`) lacks.
    UnknownStep,
    /// A new step name of an undeclared flow that already has
    /// `limits.max_steps_per_flow` distinct names.
    TooManySteps,
}

impl Rejection {
    /// Every `reason` label value.
    pub const REASONS: [&'static str; 9] = [
        "invalid_flow_name",
        "missing_correlation_id",
        "correlation_id_too_long",
        "invalid_outcome",
        "unknown_flow",
        "invalid_step",
        "missing_step",
        "unknown_step",
        "too_many_steps",
    ];

    /// The `reason` label value.
    pub fn reason(&self) -> &'static str {
        match self {
            Rejection::InvalidFlowName => "invalid_flow_name",
            Rejection::MissingCorrelationId => "missing_correlation_id",
            Rejection::CorrelationIdTooLong => "correlation_id_too_long",
            Rejection::InvalidOutcome(_) => "invalid_outcome",
            Rejection::UnknownFlow => "unknown_flow",
            Rejection::InvalidStep => "invalid_step",
            Rejection::MissingStep => "missing_step",
            Rejection::UnknownStep => "unknown_step",
            Rejection::TooManySteps => "too_many_steps",
        }
    }
}

impl fmt::Display for Rejection {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Rejection::InvalidFlowName => f.write_str("invalid flow name"),
            Rejection::MissingCorrelationId => f.write_str("missing correlation id"),
            Rejection::CorrelationIdTooLong => f.write_str("correlation id too long"),
            Rejection::InvalidOutcome(v) => write!(f, "invalid outcome {v:?}"),
            Rejection::UnknownFlow => f.write_str("unknown flow"),
            Rejection::InvalidStep => f.write_str("invalid step name"),
            Rejection::MissingStep => f.write_str("missing step name"),
            Rejection::UnknownStep => f.write_str("step not declared for its flow"),
            Rejection::TooManySteps => f.write_str("too many distinct steps for its flow"),
        }
    }
}

/// 1–128 characters of `[A-Za-z0-9_.:-]`.
pub fn is_valid_flow_name(name: &str) -> bool {
    (1..=128).contains(&name.len())
        && name
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'_' | b'.' | b':' | b'-'))
}

/// Step names: the flow-name characters, 1–64 of them (docs/behaviour.md §9).
pub const MAX_STEP_NAME_CHARS: usize = 64;

/// Whether `name` is a valid step name: the flow-name characters, 1–64 of them.
pub fn is_valid_step_name(name: &str) -> bool {
    name.len() <= MAX_STEP_NAME_CHARS && is_valid_flow_name(name)
}

/// Flow events refused in one request, grouped by reason for a short message.
#[derive(Debug, Default)]
pub struct RejectionSummary {
    total: usize,
    /// (count, first rejection) per reason, in order of first appearance.
    by_reason: Vec<(usize, Rejection)>,
}

impl RejectionSummary {
    /// Counts one more refused event.
    pub fn add(&mut self, rejection: Rejection) {
        self.total += 1;
        match self
            .by_reason
            .iter_mut()
            .find(|(_, r)| r.reason() == rejection.reason())
        {
            Some((n, _)) => *n += 1,
            None => self.by_reason.push((1, rejection)),
        }
    }

    /// No event was refused.
    pub fn is_empty(&self) -> bool {
        self.total == 0
    }

    /// How many events were refused.
    pub fn total(&self) -> usize {
        self.total
    }

    /// e.g. `2 flow events rejected: 1 missing correlation id, 1 invalid outcome "done"`
    pub fn message(&self) -> String {
        let parts: Vec<String> = self
            .by_reason
            .iter()
            .map(|(n, first)| format!("{n} {first}"))
            .collect();
        let noun = if self.total == 1 { "event" } else { "events" };
        format!("{} flow {noun} rejected: {}", self.total, parts.join(", "))
    }
}

/// Turns a configured label into a valid Prometheus label name: `[a-zA-Z_][a-zA-Z0-9_]*`.
pub fn sanitize_label_name(raw: &str) -> String {
    let mut out: String = raw
        .chars()
        .map(|c| if c.is_ascii_alphanumeric() { c } else { '_' })
        .collect();
    if out.starts_with(|c: char| c.is_ascii_digit()) {
        out.insert(0, '_');
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn message_groups_by_reason() {
        let mut s = RejectionSummary::default();
        s.add(Rejection::MissingCorrelationId);
        s.add(Rejection::InvalidOutcome("done".into()));
        assert_eq!(
            s.message(),
            "2 flow events rejected: 1 missing correlation id, 1 invalid outcome \"done\""
        );
        s.add(Rejection::MissingCorrelationId);
        assert_eq!(
            s.message(),
            "3 flow events rejected: 2 missing correlation id, 1 invalid outcome \"done\""
        );
    }

    #[test]
    fn label_names_are_sanitised() {
        assert_eq!(sanitize_label_name("service.name"), "service_name");
        assert_eq!(sanitize_label_name("1abc"), "_1abc");
    }
}
