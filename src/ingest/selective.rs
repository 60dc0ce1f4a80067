//! Selective decoding of protobuf trace exports: finds flow events without decoding the
//! rest. A span without a flow event costs a walk over its bytes, nothing more; for the
//! few with one, attributes are read in place (borrowed) from the event, span and
//! resource bytes.
//!
//! Accepts what a full decode accepts, and checks the same things flowmetrics relies on
//! (well-formed framing, UTF-8 event names, trace/span id lengths). Fields it never
//! reads are only skipped, so bytes a full decode would refuse there (say, invalid
//! UTF-8 in an unrelated attribute) pass.

use super::wire::{utf8, Fields, Value, WireError};
use crate::flows::event::{AttrValue, AttributeLayers, Attributes};
use crate::flows::{Extractor, FlowEvent, Rejection, Source, TraceRef};

// Field numbers from opentelemetry/proto/{collector/trace,trace,resource,common}/v1.
const REQUEST_RESOURCE_SPANS: u32 = 1;
const RESOURCE_SPANS_RESOURCE: u32 = 1;
const RESOURCE_SPANS_SCOPE_SPANS: u32 = 2;
const RESOURCE_ATTRIBUTES: u32 = 1;
const SCOPE_SPANS_SPANS: u32 = 2;
const SPAN_TRACE_ID: u32 = 1;
const SPAN_SPAN_ID: u32 = 2;
const SPAN_PARENT_SPAN_ID: u32 = 4;
const SPAN_ATTRIBUTES: u32 = 9;
const SPAN_EVENTS: u32 = 11;
const SPAN_STATUS: u32 = 15;
const STATUS_CODE: u32 = 3;
const STATUS_CODE_ERROR: u64 = 2;
const EVENT_TIME: u32 = 1;
const EVENT_NAME: u32 = 2;
const EVENT_ATTRIBUTES: u32 = 3;
const KEY_VALUE_KEY: u32 = 1;
const KEY_VALUE_VALUE: u32 = 2;
const ANY_STRING: u32 = 1;
const ANY_BOOL: u32 = 2;
const ANY_INT: u32 = 3;
const ANY_DOUBLE: u32 = 4;

/// Extraction results of one export, and how many spans it held.
pub struct TraceScan {
    pub spans: u64,
    pub events: Vec<Result<FlowEvent, Rejection>>,
}

/// Walks an `ExportTraceServiceRequest` and extracts its flow events. Nothing is applied
/// here: a malformed request is refused whole, before any event reaches the table.
pub fn scan_traces(
    body: &[u8],
    extractor: &Extractor,
    received_nanos: u64,
) -> Result<TraceScan, String> {
    let mut scan = TraceScan {
        spans: 0,
        events: Vec::new(),
    };
    walk_request(body, extractor, received_nanos, &mut scan)
        .map_err(|e| format!("protobuf body: {e}"))?;
    Ok(scan)
}

fn walk_request(
    body: &[u8],
    x: &Extractor,
    received: u64,
    scan: &mut TraceScan,
) -> Result<(), WireError> {
    for field in Fields::new(body) {
        if let (REQUEST_RESOURCE_SPANS, Value::Bytes(resource_spans)) = field? {
            walk_resource_spans(resource_spans, x, received, scan)?;
        }
    }
    Ok(())
}

fn walk_resource_spans(
    msg: &[u8],
    x: &Extractor,
    received: u64,
    scan: &mut TraceScan,
) -> Result<(), WireError> {
    // The resource may come after its spans on the wire: find it first.
    let mut resource: &[u8] = &[];
    for field in Fields::new(msg) {
        if let (RESOURCE_SPANS_RESOURCE, Value::Bytes(r)) = field? {
            resource = r;
        }
    }
    let resource = RawAttributes::new(resource, RESOURCE_ATTRIBUTES);
    for field in Fields::new(msg) {
        if let (RESOURCE_SPANS_SCOPE_SPANS, Value::Bytes(scope_spans)) = field? {
            for field in Fields::new(scope_spans) {
                if let (SCOPE_SPANS_SPANS, Value::Bytes(span)) = field? {
                    scan.spans += 1;
                    walk_span(span, resource, x, received, scan)?;
                }
            }
        }
    }
    Ok(())
}

fn check_id(bytes: &[u8], len: usize, what: &'static str) -> Result<(), WireError> {
    if bytes.is_empty() || bytes.len() == len {
        Ok(())
    } else {
        Err(WireError(what))
    }
}

fn walk_span(
    span: &[u8],
    resource: RawAttributes<'_>,
    x: &Extractor,
    received: u64,
    scan: &mut TraceScan,
) -> Result<(), WireError> {
    let mut trace_id: &[u8] = &[];
    let mut span_id: &[u8] = &[];
    let mut is_error = false;
    // (name, time, event bytes) of events that look like flow events. Most spans have
    // none, and then nothing is allocated.
    let mut candidates: Vec<(&str, u64, &[u8])> = Vec::new();
    for field in Fields::new(span) {
        match field? {
            (SPAN_TRACE_ID, Value::Bytes(b)) => {
                check_id(b, 16, "traceId must be 16 bytes")?;
                trace_id = b;
            }
            (SPAN_SPAN_ID, Value::Bytes(b)) => {
                check_id(b, 8, "spanId must be 8 bytes")?;
                span_id = b;
            }
            (SPAN_PARENT_SPAN_ID, Value::Bytes(b)) => {
                check_id(b, 8, "parentSpanId must be 8 bytes")?
            }
            (SPAN_EVENTS, Value::Bytes(event)) => {
                let mut name = "";
                let mut time = 0;
                for field in Fields::new(event) {
                    match field? {
                        (EVENT_NAME, Value::Bytes(b)) => name = utf8(b)?,
                        (EVENT_TIME, Value::Fixed64(t)) => time = t,
                        _ => {}
                    }
                }
                if x.may_be_flow_event(name) {
                    candidates.push((name, time, event));
                }
            }
            (SPAN_STATUS, Value::Bytes(status)) => {
                for field in Fields::new(status) {
                    if let (STATUS_CODE, Value::Varint(code)) = field? {
                        is_error = code == STATUS_CODE_ERROR;
                    }
                }
            }
            _ => {}
        }
    }
    if candidates.is_empty() {
        return Ok(());
    }
    let trace = TraceRef::from_ids(trace_id, span_id);
    let parent = RawAttributes::new(span, SPAN_ATTRIBUTES);
    for (name, time, event) in candidates {
        let layers = AttributeLayers {
            event: RawAttributes::new(event, EVENT_ATTRIBUTES),
            parent,
            resource,
        };
        match x.extract(
            name,
            layers,
            time,
            received,
            is_error,
            trace,
            Source::SpanEvent,
        ) {
            Ok(Some(e)) => scan.events.push(Ok(e)),
            Ok(None) => {}
            Err(r) => scan.events.push(Err(r)),
        }
    }
    Ok(())
}

/// The repeated `KeyValue` field `field` of a message, read in place.
#[derive(Clone, Copy)]
pub struct RawAttributes<'a> {
    msg: &'a [u8],
    field: u32,
}

impl<'a> RawAttributes<'a> {
    fn new(msg: &'a [u8], field: u32) -> Self {
        Self { msg, field }
    }
}

impl Attributes for RawAttributes<'_> {
    fn find(&self, key: &str) -> Option<AttrValue<'_>> {
        // The message was walked once already, so errors here cannot happen; stop quietly
        // if they do.
        for field in Fields::new(self.msg) {
            let Ok((number, Value::Bytes(kv))) = field else {
                if field.is_err() {
                    return None;
                }
                continue;
            };
            if number != self.field {
                continue;
            }
            let mut k: &[u8] = &[];
            let mut v: &[u8] = &[];
            for field in Fields::new(kv) {
                match field {
                    Ok((KEY_VALUE_KEY, Value::Bytes(b))) => k = b,
                    Ok((KEY_VALUE_VALUE, Value::Bytes(b))) => v = b,
                    Ok(_) => {}
                    Err(_) => return None,
                }
            }
            if k == key.as_bytes() {
                return Some(any_value(v));
            }
        }
        None
    }
}

fn any_value(msg: &[u8]) -> AttrValue<'_> {
    let mut value = AttrValue::Other;
    for field in Fields::new(msg) {
        value = match field {
            Ok((ANY_STRING, Value::Bytes(b))) => {
                utf8(b).map(AttrValue::Str).unwrap_or(AttrValue::Other)
            }
            Ok((ANY_BOOL, Value::Varint(b))) => AttrValue::Bool(b != 0),
            Ok((ANY_INT, Value::Varint(i))) => AttrValue::Int(i as i64),
            Ok((ANY_DOUBLE, Value::Fixed64(d))) => AttrValue::Double(f64::from_bits(d)),
            Ok(_) => AttrValue::Other,
            Err(_) => return AttrValue::Other,
        };
    }
    value
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::config::Config;
    use crate::flows::event::NO_ATTRIBUTES;
    use opentelemetry_proto::tonic::collector::trace::v1::ExportTraceServiceRequest;
    use opentelemetry_proto::tonic::common::v1::{any_value, AnyValue, KeyValue};
    use opentelemetry_proto::tonic::resource::v1::Resource;
    use opentelemetry_proto::tonic::trace::v1::{
        span, status, ResourceSpans, ScopeSpans, Span, Status,
    };
    use prost::Message;

    fn kv(key: &str, v: any_value::Value) -> KeyValue {
        KeyValue {
            key: key.into(),
            value: Some(AnyValue { value: Some(v) }),
            ..Default::default()
        }
    }

    fn str_kv(key: &str, v: &str) -> KeyValue {
        kv(key, any_value::Value::StringValue(v.into()))
    }

    /// A request exercising every lookup: ids on event, span and resource, int ids,
    /// outcomes, status-derived failure, dimensions, non-flow events, bad events.
    fn varied_request() -> ExportTraceServiceRequest {
        let span = |events: Vec<span::Event>, attrs: Vec<KeyValue>, error: bool| Span {
            trace_id: vec![9; 16],
            span_id: vec![1; 8],
            attributes: attrs,
            events,
            status: error.then(|| Status {
                code: status::StatusCode::Error as i32,
                ..Default::default()
            }),
            ..Default::default()
        };
        let event = |name: &str, attrs: Vec<KeyValue>| span::Event {
            name: name.into(),
            time_unix_nano: 5,
            attributes: attrs,
            ..Default::default()
        };
        ExportTraceServiceRequest {
            resource_spans: vec![ResourceSpans {
                resource: Some(Resource {
                    attributes: vec![
                        str_kv("service.name", "svc"),
                        str_kv("correlation.id", "from-resource"),
                    ],
                    ..Default::default()
                }),
                scope_spans: vec![ScopeSpans {
                    spans: vec![
                        span(
                            vec![event(
                                "flow.a.start",
                                vec![str_kv("correlation-id", "e1"), str_kv("tier", "gold")],
                            )],
                            vec![],
                            false,
                        ),
                        span(
                            vec![event("flow.a.end", vec![])],
                            vec![kv("correlation_id", any_value::Value::IntValue(77))],
                            true,
                        ),
                        span(
                            vec![event("flow.a.end", vec![str_kv("outcome", "canceled")])],
                            vec![],
                            false,
                        ),
                        span(
                            vec![event(
                                "flow.b.end",
                                vec![str_kv("correlation-id", "x"), str_kv("outcome", "nope")],
                            )],
                            vec![],
                            false,
                        ),
                        span(
                            vec![
                                event("exception", vec![]),
                                event("flow.bad name.start", vec![]),
                            ],
                            vec![str_kv("tier", "span-tier")],
                            false,
                        ),
                        span(vec![], vec![str_kv("http.method", "GET")], false),
                    ],
                    ..Default::default()
                }],
                ..Default::default()
            }],
        }
    }

    fn config() -> Config {
        Config {
            dimensions: serde_yaml::from_str(
                "- { label: tier, attribute: tier, default: none }\n- { label: service, attribute: service.name }\n",
            )
            .unwrap(),
            ..Default::default()
        }
    }

    /// The same events as a full prost decode through the decoded-struct path.
    fn full_decode(
        req: &ExportTraceServiceRequest,
        x: &Extractor,
    ) -> Vec<Result<FlowEvent, Rejection>> {
        let mut out = Vec::new();
        for rs in &req.resource_spans {
            let resource = rs
                .resource
                .as_ref()
                .map(|r| &r.attributes[..])
                .unwrap_or(NO_ATTRIBUTES);
            for ss in &rs.scope_spans {
                for sp in &ss.spans {
                    let is_error = sp.status.as_ref().is_some_and(|s| s.code == 2);
                    for e in &sp.events {
                        let layers = AttributeLayers {
                            event: &e.attributes[..],
                            parent: &sp.attributes[..],
                            resource,
                        };
                        match x.extract(
                            &e.name,
                            layers,
                            e.time_unix_nano,
                            1,
                            is_error,
                            TraceRef::from_ids(&sp.trace_id, &sp.span_id),
                            Source::SpanEvent,
                        ) {
                            Ok(Some(ev)) => out.push(Ok(ev)),
                            Ok(None) => {}
                            Err(r) => out.push(Err(r)),
                        }
                    }
                }
            }
        }
        out
    }

    #[test]
    fn selective_and_full_decoding_agree() {
        let x = Extractor::new(&config());
        let req = varied_request();
        let bytes = req.encode_to_vec();
        let scan = scan_traces(&bytes, &x, 1).unwrap();
        assert_eq!(scan.spans, 6);
        let full = full_decode(&req, &x);
        let show = |v: &[Result<FlowEvent, Rejection>]| format!("{v:?}");
        assert_eq!(show(&scan.events), show(&full));
        assert_eq!(scan.events.len(), 5);
        let ok: Vec<_> = scan.events.iter().filter_map(|e| e.as_ref().ok()).collect();
        assert_eq!(&*ok[0].correlation_id, "e1");
        assert_eq!(&*ok[0].dims[0], "gold");
        assert_eq!(&*ok[1].correlation_id, "77");
        assert_eq!(
            ok[1].kind,
            crate::flows::EventKind::End(crate::flows::Outcome::Failure)
        );
        assert_eq!(&*ok[2].correlation_id, "from-resource");
    }

    #[test]
    fn malformed_and_bad_ids_are_refused_whole() {
        let x = Extractor::new(&config());
        let mut req = varied_request();
        let good = req.encode_to_vec();
        for cut in [1, good.len() / 2, good.len() - 1] {
            assert!(scan_traces(&good[..cut], &x, 1).is_err(), "cut at {cut}");
        }
        req.resource_spans[0].scope_spans[0].spans[0].trace_id = vec![1; 15];
        let err = scan_traces(&req.encode_to_vec(), &x, 1).err().unwrap();
        assert!(err.contains("traceId"), "{err}");
    }
}
