//! Flow events from decoded OTLP requests (OTLP/JSON traces; logs in either media type):
//! each span event or log record becomes an [`EventContext`] for the rules of
//! [`super::extract`], as the selective scan ([`super::scan`]) does for protobuf traces.

use opentelemetry_proto::tonic::collector::logs::v1::ExportLogsServiceRequest;
use opentelemetry_proto::tonic::collector::trace::v1::ExportTraceServiceRequest;
use opentelemetry_proto::tonic::common::v1::{any_value, KeyValue};
use opentelemetry_proto::tonic::logs::v1::LogRecord;
use opentelemetry_proto::tonic::resource::v1::Resource;
use opentelemetry_proto::tonic::trace::v1::status::StatusCode;
use opentelemetry_proto::tonic::trace::v1::Span;

use super::attributes::{AttributeLayers, NO_ATTRIBUTES};
use super::event::{FlowEvent, Source, TraceRef};
use super::extract::{EventContext, Extractor, Origin, TraceEvents};
use super::network::NetworkFlows;
use crate::model::Rejection;

/// OpenTelemetry severity numbers 17–24 are ERROR and FATAL.
const SEVERITY_ERROR: i32 = 17;

/// What a walk of one logs export found.
#[derive(Debug, Default)]
pub struct LogEvents<'a> {
    /// Log records read.
    pub records: u64,
    /// Flow events and refusals, in the order of the request.
    pub events: Vec<Result<FlowEvent<'a>, Rejection>>,
}

/// Every span event of a decoded trace export that is a flow event (and with `network`,
/// every Flow Span), in order. `received_nanos`: when the request arrived.
pub fn trace_events<'r>(
    request: &'r ExportTraceServiceRequest,
    extractor: &Extractor,
    network: Option<&NetworkFlows>,
    received_nanos: u64,
) -> TraceEvents<'r> {
    let spans = items(
        &request.resource_spans,
        |r| (r.resource.as_ref(), &r.scope_spans),
        |s| &s.spans,
    );
    let mut found = TraceEvents::default();
    for (resource, span) in spans {
        found.spans += 1;
        if let Some(record) = network.and_then(|n| n.decoded_span(span, resource)) {
            found.network.push(record);
        }
        span_events(span, resource, extractor, received_nanos, &mut found.events);
    }
    found
}

fn span_events<'r>(
    span: &'r Span,
    resource: &'r [KeyValue],
    extractor: &Extractor,
    received_nanos: u64,
    found: &mut Vec<Result<FlowEvent<'r>, Rejection>>,
) {
    let mut flow_events = span
        .events
        .iter()
        .filter(|e| extractor.may_be_flow_event(&e.name))
        .peekable();
    if flow_events.peek().is_none() {
        return;
    }
    let origin = Origin {
        is_error: span
            .status
            .as_ref()
            .is_some_and(|s| s.code == StatusCode::Error as i32),
        trace: TraceRef::from_ids(&span.trace_id, &span.span_id),
        source: Source::SpanEvent,
    };
    for event in flow_events {
        let event = EventContext {
            name: &event.name,
            layers: AttributeLayers {
                event: &event.attributes[..],
                parent: &span.attributes[..],
                resource,
            },
            // An event without a time takes its span's end time (docs/behaviour.md §3):
            // a retried export then carries the same time.
            time_nanos: event.time_unix_nano,
            fallback_nanos: span.end_time_unix_nano,
            origin,
        };
        extractor.extract_into(&event, received_nanos, found);
    }
}

/// Log records whose `event_name` (or `event.name` attribute) is a flow event name.
pub fn log_events<'r>(
    request: &'r ExportLogsServiceRequest,
    extractor: &Extractor,
    received_nanos: u64,
) -> LogEvents<'r> {
    let records = items(
        &request.resource_logs,
        |r| (r.resource.as_ref(), &r.scope_logs),
        |s| &s.log_records,
    );
    let mut found = LogEvents::default();
    for (resource, record) in records {
        found.records += 1;
        log_event(
            record,
            resource,
            extractor,
            received_nanos,
            &mut found.events,
        );
    }
    found
}

fn log_event<'r>(
    record: &'r LogRecord,
    resource: &'r [KeyValue],
    extractor: &Extractor,
    received_nanos: u64,
    found: &mut Vec<Result<FlowEvent<'r>, Rejection>>,
) {
    let Some(name) = event_name(record).filter(|n| extractor.may_be_flow_event(n)) else {
        return;
    };
    let event = EventContext {
        name,
        layers: AttributeLayers {
            event: &record.attributes[..],
            parent: NO_ATTRIBUTES,
            resource,
        },
        time_nanos: record.time_unix_nano,
        fallback_nanos: record.observed_time_unix_nano,
        origin: Origin {
            is_error: record.severity_number >= SEVERITY_ERROR,
            trace: TraceRef::from_ids(&record.trace_id, &record.span_id),
            source: Source::Log,
        },
    };
    extractor.extract_into(&event, received_nanos, found);
}

/// A log record's event name: `event_name`, else a string `event.name` attribute.
fn event_name(record: &LogRecord) -> Option<&str> {
    if !record.event_name.is_empty() {
        return Some(&record.event_name);
    }
    let kv = record.attributes.iter().find(|kv| kv.key == "event.name")?;
    match kv.value.as_ref()?.value.as_ref()? {
        any_value::Value::StringValue(s) => Some(s),
        _ => None,
    }
}

/// Every item (span, log record) of an export, in order, with its resource's attributes.
fn items<'r, G, S: 'r, T: 'r>(
    groups: &'r [G],
    resource_and_scopes: fn(&G) -> (Option<&Resource>, &Vec<S>),
    in_scope: fn(&S) -> &Vec<T>,
) -> impl Iterator<Item = (&'r [KeyValue], &'r T)> {
    groups.iter().flat_map(move |group| {
        let (resource, scopes) = resource_and_scopes(group);
        let attributes = resource.map_or(NO_ATTRIBUTES, |r| &r.attributes[..]);
        scopes
            .iter()
            .flat_map(in_scope)
            .map(move |item| (attributes, item))
    })
}
