//! OTLP trace requests as the tests build them: span events in spans, spans under one
//! resource and one scope.

use std::time::{SystemTime, UNIX_EPOCH};

use opentelemetry_proto::tonic::collector::trace::v1::ExportTraceServiceRequest;
use opentelemetry_proto::tonic::common::v1::KeyValue;
use opentelemetry_proto::tonic::resource::v1::Resource;
use opentelemetry_proto::tonic::trace::v1::{span, ResourceSpans, ScopeSpans, Span};

use super::attr;

pub const SEC: u64 = 1_000_000_000;

/// Nanoseconds since the Unix epoch, now.
pub fn now_nanos() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .unwrap()
        .as_nanos() as u64
}

/// A span event named `name` at `ts` (ns).
pub fn event(name: impl Into<String>, ts: u64, attributes: Vec<KeyValue>) -> span::Event {
    span::Event {
        name: name.into(),
        time_unix_nano: ts,
        attributes,
        ..Default::default()
    }
}

/// A flow event with its correlation id and, when given, its `outcome` attribute.
pub fn flow_event(
    name: impl Into<String>,
    id: &str,
    outcome: Option<&str>,
    ts: u64,
) -> span::Event {
    let mut attributes = vec![attr("correlation-id", id)];
    attributes.extend(outcome.map(|o| attr("outcome", o)));
    event(name, ts, attributes)
}

/// A span named `work` with these ids, carrying `events`.
pub fn span(trace_id: &[u8], span_id: &[u8], events: Vec<span::Event>) -> Span {
    Span {
        trace_id: trace_id.to_vec(),
        span_id: span_id.to_vec(),
        name: "work".into(),
        events,
        ..Default::default()
    }
}

/// One span per event, span ids 1, 2, … in one trace: (event name, correlation id,
/// outcome, timestamp ns).
pub fn flow_spans(events: &[(&str, &str, Option<&str>, u64)]) -> Vec<Span> {
    events
        .iter()
        .enumerate()
        .map(|(i, (name, id, outcome, ts))| {
            let span_id = (i as u64 + 1).to_be_bytes();
            span(
                &[0xab; 16],
                &span_id,
                vec![flow_event(*name, id, *outcome, *ts)],
            )
        })
        .collect()
}

/// `spans` in one scope under one resource with `resource` attributes (`None`: no
/// resource at all).
pub fn traces(resource: Option<Vec<KeyValue>>, spans: Vec<Span>) -> ExportTraceServiceRequest {
    ExportTraceServiceRequest {
        resource_spans: vec![ResourceSpans {
            resource: resource.map(|attributes| Resource {
                attributes,
                ..Default::default()
            }),
            scope_spans: vec![ScopeSpans {
                spans,
                ..Default::default()
            }],
            ..Default::default()
        }],
    }
}

/// `b` gzip-compressed (`content-encoding: gzip`).
pub fn gzip(b: &[u8]) -> Vec<u8> {
    use std::io::Write;
    let mut e = flate2::write::GzEncoder::new(Vec::new(), flate2::Compression::default());
    e.write_all(b).unwrap();
    e.finish().unwrap()
}

/// `b` zlib-compressed (`content-encoding: deflate`).
pub fn deflate(b: &[u8]) -> Vec<u8> {
    use std::io::Write;
    let mut e = flate2::write::ZlibEncoder::new(Vec::new(), flate2::Compression::default());
    e.write_all(b).unwrap();
    e.finish().unwrap()
}
