//! The workload: OTLP `ExportTraceServiceRequest` batches shaped like real exporters send
//! them, encoded once into a template whose correlation ids are patched in place for every
//! batch (so every batch carries new, distinct flow instances at the cost of a memcpy).

use opentelemetry_proto::tonic::collector::trace::v1::ExportTraceServiceRequest;
use opentelemetry_proto::tonic::common::v1::{any_value, AnyValue, InstrumentationScope, KeyValue};
use opentelemetry_proto::tonic::resource::v1::Resource;
use opentelemetry_proto::tonic::trace::v1::span::{Event, SpanKind};
use opentelemetry_proto::tonic::trace::v1::status::StatusCode;
use opentelemetry_proto::tonic::trace::v1::{ResourceSpans, ScopeSpans, Span, Status};
use prost::Message;

/// Spans per export request (the OpenTelemetry SDK batch processor's default is 512,
/// the Collector's batch processor 8192; 1,000 is in between).
pub const SPANS_PER_BATCH: usize = 1000;

/// Ends close the instances started this many batches earlier: the steady state holds
/// `LAG × starts per batch` open instances.
pub const LAG: u64 = 20;

/// Correlation ids are `ORD#` and 16 digits; the marker is found once in the encoded
/// template and the digits rewritten per batch.
const ID_MARK: &[u8] = b"ORD#";
const ID_DIGITS: usize = 16;
/// Ends of the first `LAG` batches refer to starts that never come: their ids live far
/// away from real ones.
const ORPHAN_BASE: u64 = 9_000_000_000_000_000;

const FLOWS: [&str; 4] = ["checkout", "payment", "shipping", "signup"];
const BASE_TIME: u64 = 1_750_000_000_000_000_000;

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Shape {
    /// Every span carries one flow event; starts and ends alternate (steady state).
    Flow,
    /// One span in ten carries a flow event, the rest none.
    Sparse,
    /// One span in a hundred carries a flow event: the usual production density.
    Rare,
    /// Every span carries a start event of a new instance (memory runs).
    StartsOnly,
}

impl Shape {
    pub fn label(self) -> &'static str {
        match self {
            Shape::Flow => "flow (1 event/span)",
            Shape::Sparse => "sparse (10% spans with event)",
            Shape::Rare => "rare (1% spans with event)",
            Shape::StartsOnly => "starts only",
        }
    }
}

pub struct Template {
    pub shape: Shape,
    pub bytes: Vec<u8>,
    /// The decoded template; tests check patched bytes against `batch_message`.
    #[cfg_attr(not(test), allow(dead_code))]
    pub message: ExportTraceServiceRequest,
    /// Offsets of the first id digit, in span order (one per flow event).
    slots: Vec<usize>,
    pub spans: u64,
    pub events: u64,
    /// Starts per batch.
    starts: u64,
}

fn s(v: &str) -> Option<AnyValue> {
    Some(AnyValue {
        value: Some(any_value::Value::StringValue(v.to_owned())),
    })
}

fn i(v: i64) -> Option<AnyValue> {
    Some(AnyValue {
        value: Some(any_value::Value::IntValue(v)),
    })
}

fn kv(key: &str, value: Option<AnyValue>) -> KeyValue {
    KeyValue {
        key: key.to_owned(),
        value,
        ..Default::default()
    }
}

fn placeholder() -> String {
    format!("ORD#{}", "0".repeat(ID_DIGITS))
}

#[cfg_attr(not(test), allow(dead_code))]
pub fn id_text(id: u64) -> String {
    format!("ORD#{id:0width$}", width = ID_DIGITS)
}

pub fn resource() -> Resource {
    Resource {
        attributes: vec![
            kv("service.name", s("checkout-service")),
            kv("service.version", s("1.42.7")),
            kv(
                "service.instance.id",
                s("6f1c2d3e-4a5b-4c6d-8e9f-0a1b2c3d4e5f"),
            ),
            kv("host.name", s("ip-10-0-12-34.eu-west-1.compute.internal")),
            kv("deployment.environment", s("production")),
            kv("telemetry.sdk.language", s("rust")),
        ],
        ..Default::default()
    }
}

pub fn scope() -> InstrumentationScope {
    InstrumentationScope {
        name: "checkout-service".into(),
        version: "1.42.7".into(),
        ..Default::default()
    }
}

/// One span as an instrumented HTTP server produces it, with an optional flow event.
pub fn span(n: usize, event: Option<Event>) -> Span {
    let mut trace_id = [0u8; 16];
    trace_id[..8].copy_from_slice(&(0x5eed_0000_0000_0001u64 + n as u64).to_be_bytes());
    trace_id[8..].copy_from_slice(&0x0123_4567_89ab_cdefu64.to_be_bytes());
    let span_id = (0x1000_0000_0000_0001u64 + n as u64).to_be_bytes();
    let parent = (0x2000_0000_0000_0001u64 + n as u64).to_be_bytes();
    let start = BASE_TIME + n as u64 * 1_000;
    Span {
        trace_id: trace_id.to_vec(),
        span_id: span_id.to_vec(),
        parent_span_id: parent.to_vec(),
        flags: 1,
        name: "POST /api/v1/orders/{id}".into(),
        kind: SpanKind::Server as i32,
        start_time_unix_nano: start,
        end_time_unix_nano: start + 12_345_678,
        attributes: vec![
            kv("http.request.method", s("POST")),
            kv("http.route", s("/api/v1/orders/{id}")),
            kv("http.response.status_code", i(200)),
            kv("server.address", s("orders.internal")),
            kv("user_agent.original", s("okhttp/4.12.0")),
            kv("http.response.body.size", i(1834)),
        ],
        events: event.into_iter().collect(),
        status: Some(Status {
            code: StatusCode::Ok as i32,
            ..Default::default()
        }),
        ..Default::default()
    }
}

pub fn flow_event(flow: &str, start: bool, id: &str, n: usize) -> Event {
    let (suffix, second, time) = if start {
        ("start", kv("step", s("received")), BASE_TIME + n as u64)
    } else {
        (
            "end",
            kv("outcome", s("success")),
            BASE_TIME + 1_500_000_000 + n as u64,
        )
    };
    Event {
        time_unix_nano: time,
        name: format!("flow.{flow}.{suffix}"),
        attributes: vec![kv("correlation-id", s(id)), second],
        ..Default::default()
    }
}

pub fn request(spans: Vec<Span>) -> ExportTraceServiceRequest {
    ExportTraceServiceRequest {
        resource_spans: vec![ResourceSpans {
            resource: Some(resource()),
            scope_spans: vec![ScopeSpans {
                scope: Some(scope()),
                spans,
                ..Default::default()
            }],
            ..Default::default()
        }],
    }
}

impl Template {
    pub fn new(shape: Shape) -> Template {
        let mut spans = Vec::with_capacity(SPANS_PER_BATCH);
        let mut slot = 0usize;
        for n in 0..SPANS_PER_BATCH {
            let carries = match shape {
                Shape::Flow | Shape::StartsOnly => true,
                Shape::Sparse => n.is_multiple_of(10),
                Shape::Rare => n.is_multiple_of(100),
            };
            let event = carries.then(|| {
                let (start, pair) = slot_role(shape, slot);
                slot += 1;
                flow_event(FLOWS[pair as usize % FLOWS.len()], start, &placeholder(), n)
            });
            spans.push(span(n, event));
        }
        let message = request(spans);
        let bytes = message.encode_to_vec();
        let slots: Vec<usize> = bytes
            .windows(ID_MARK.len())
            .enumerate()
            .filter(|(_, w)| *w == ID_MARK)
            .map(|(at, _)| at + ID_MARK.len())
            .collect();
        assert_eq!(
            slots.len(),
            slot,
            "every flow event has exactly one id marker"
        );
        let starts = match shape {
            Shape::StartsOnly => slot as u64,
            _ => slot as u64 / 2,
        };
        Template {
            shape,
            bytes,
            message,
            slots,
            spans: SPANS_PER_BATCH as u64,
            events: slot as u64,
            starts,
        }
    }

    fn id(&self, batch: u64, slot: usize) -> u64 {
        let (start, pair) = slot_role(self.shape, slot);
        if start {
            batch * self.starts + pair
        } else if batch >= LAG {
            (batch - LAG) * self.starts + pair
        } else {
            ORPHAN_BASE + batch * self.starts + pair
        }
    }

    /// The encoded batch number `batch`.
    pub fn batch(&self, batch: u64) -> Vec<u8> {
        let mut out = self.bytes.clone();
        self.patch(&mut out, batch);
        out
    }

    pub fn patch(&self, out: &mut [u8], batch: u64) {
        for (slot, &at) in self.slots.iter().enumerate() {
            write_digits(&mut out[at..at + ID_DIGITS], self.id(batch, slot));
        }
    }

    /// The same batch as a message (what the patched bytes must decode to).
    #[cfg_attr(not(test), allow(dead_code))]
    pub fn batch_message(&self, batch: u64) -> ExportTraceServiceRequest {
        let mut message = self.message.clone();
        let mut slot = 0;
        for span in &mut message.resource_spans[0].scope_spans[0].spans {
            for event in &mut span.events {
                event.attributes[0].value = s(&id_text(self.id(batch, slot)));
                slot += 1;
            }
        }
        message
    }
}

/// (is a start, pair index) of the flow event in `slot`.
fn slot_role(shape: Shape, slot: usize) -> (bool, u64) {
    match shape {
        Shape::StartsOnly => (true, slot as u64),
        _ => (slot.is_multiple_of(2), slot as u64 / 2),
    }
}

fn write_digits(out: &mut [u8], mut v: u64) {
    for d in out.iter_mut().rev() {
        *d = b'0' + (v % 10) as u8;
        v /= 10;
    }
}

/// A request opening and completing `flows` distinct flows (4 series each: started,
/// completed, in_progress, duration), to give `/metrics` a realistic size.
pub fn seed_request(flows: usize) -> Vec<u8> {
    let mut spans = Vec::with_capacity(flows * 2);
    for f in 0..flows {
        let name = format!("seed-{f:05}");
        let id = format!("seed-{f}");
        spans.push(span(2 * f, Some(flow_event(&name, true, &id, 2 * f))));
        spans.push(span(
            2 * f + 1,
            Some(flow_event(&name, false, &id, 2 * f + 1)),
        ));
    }
    request(spans).encode_to_vec()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn patched_batches_decode_with_distinct_ids() {
        let t = Template::new(Shape::Flow);
        let a = ExportTraceServiceRequest::decode(&t.batch(LAG + 1)[..]).unwrap();
        let m = t.batch_message(LAG + 1);
        assert_eq!(a, m);
        let spans = &a.resource_spans[0].scope_spans[0].spans;
        assert_eq!(spans.len(), SPANS_PER_BATCH);
        let id = |n: usize| match &spans[n].events[0].attributes[0].value {
            Some(AnyValue {
                value: Some(any_value::Value::StringValue(v)),
            }) => v.clone(),
            _ => panic!("no id"),
        };
        assert_eq!(id(0), id_text((LAG + 1) * 500));
        assert_eq!(id(1), id_text(500));
        let sparse = Template::new(Shape::Sparse);
        assert_eq!(sparse.events, 100);
        assert_eq!(Template::new(Shape::Rare).events, 10);
    }
}
