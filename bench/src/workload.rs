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
    /// Every span is a Flow Span (a network flow record), no flow events.
    NetworkAll,
    /// One span in ten is a Flow Span, the rest plain spans.
    NetworkSparse,
    /// Every span carries one flow event; each instance has a start, four steps
    /// (`LAG / 2` batches later) and an end (`LAG` batches later).
    Steps,
    /// Every span carries an event: each new instance's start and its four steps, in
    /// the same batch; nothing closes them (memory runs).
    StartsWithSteps,
}

/// The steps of the steps workloads, in order.
pub const STEP_NAMES: [&str; 4] = ["placed", "paid", "packed", "shipped"];
/// Events per instance: start, four steps, end.
const STEPS_EVENTS: usize = 6;

impl Shape {
    pub fn label(self) -> &'static str {
        match self {
            Shape::Flow => "flow (1 event/span)",
            Shape::Sparse => "sparse (10% spans with event)",
            Shape::Rare => "rare (1% spans with event)",
            Shape::StartsOnly => "starts only",
            Shape::NetworkAll => "Flow Spans (every span)",
            Shape::NetworkSparse => "Flow Spans (10% of spans)",
            Shape::Steps => "steps (1 event/span; start, 4 steps, end)",
            Shape::StartsWithSteps => "starts with 4 steps",
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
    /// Offsets of Flow Span span ids, rewritten per batch so that batches are new
    /// records, not retries.
    span_id_slots: Vec<usize>,
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

/// Step `k` of an instance, `k + 1` × 300 ms after its start.
pub fn step_event(flow: &str, k: usize, id: &str, n: usize) -> Event {
    Event {
        time_unix_nano: BASE_TIME + (k as u64 + 1) * 300_000_000 + n as u64,
        name: format!("flow.{flow}.step"),
        attributes: vec![kv("correlation-id", s(id)), kv("step", s(STEP_NAMES[k]))],
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
                Shape::Flow | Shape::StartsOnly | Shape::StartsWithSteps => true,
                // Whole instances only.
                Shape::Steps => n < SPANS_PER_BATCH / STEPS_EVENTS * STEPS_EVENTS,
                Shape::Sparse => n.is_multiple_of(10),
                Shape::Rare => n.is_multiple_of(100),
                Shape::NetworkAll | Shape::NetworkSparse => false,
            };
            let network = match shape {
                Shape::NetworkAll => true,
                Shape::NetworkSparse => n.is_multiple_of(10),
                _ => false,
            };
            if network {
                spans.push(flow_span(n));
                continue;
            }
            let event = carries.then(|| {
                let (role, pair) = slot_role(shape, slot);
                slot += 1;
                let flow = FLOWS[pair as usize % FLOWS.len()];
                match role {
                    Role::Step(k) => step_event(flow, k, &placeholder(), n),
                    role => flow_event(flow, role == Role::Start, &placeholder(), n),
                }
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
        let span_id_slots: Vec<usize> = bytes
            .windows(SPAN_ID_MARK.len())
            .enumerate()
            .filter(|(_, w)| *w == SPAN_ID_MARK)
            .map(|(at, _)| at)
            .collect();
        let network_spans = spans_in(&message)
            .filter(|s| s.span_id.starts_with(SPAN_ID_MARK))
            .count();
        assert_eq!(
            span_id_slots.len(),
            network_spans,
            "one marker per Flow Span"
        );
        let starts = match shape {
            Shape::StartsOnly => slot as u64,
            Shape::Steps => (slot / STEPS_EVENTS) as u64,
            Shape::StartsWithSteps => (slot / 5) as u64,
            _ => slot as u64 / 2,
        };
        Template {
            shape,
            bytes,
            message,
            slots,
            span_id_slots,
            spans: SPANS_PER_BATCH as u64,
            events: slot as u64,
            starts,
        }
    }

    /// New instances per batch.
    pub fn instances(&self) -> u64 {
        self.starts
    }

    fn id(&self, batch: u64, slot: usize) -> u64 {
        let (role, pair) = slot_role(self.shape, slot);
        // Steps of the steps workload go to instances opened LAG / 2 batches earlier.
        let lag = match (role, self.shape) {
            (Role::Start, _) | (Role::Step(_), Shape::StartsWithSteps) => 0,
            (Role::Step(_), _) => LAG / 2,
            (Role::End, _) => LAG,
        };
        if batch >= lag {
            (batch - lag) * self.starts + pair
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
        for (slot, &at) in self.span_id_slots.iter().enumerate() {
            out[at..at + 8].copy_from_slice(&flow_span_id(batch, slot));
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

/// Flow Spans carry this in their span id until a batch is patched.
const SPAN_ID_MARK: &[u8] = b"NETSPAN#";

fn spans_in(m: &ExportTraceServiceRequest) -> impl Iterator<Item = &Span> {
    m.resource_spans
        .iter()
        .flat_map(|r| &r.scope_spans)
        .flat_map(|s| &s.spans)
}

/// Span id of Flow Span `slot` in batch `batch`: distinct for every record.
fn flow_span_id(batch: u64, slot: usize) -> [u8; 8] {
    ((batch << 20 | slot as u64) | 1 << 63).to_be_bytes()
}

/// A Flow Span as an eBPF agent exports it: one record of a TCP conversation between two
/// pods, with the convention's attributes (and the addresses and ports the default
/// dimensions do not read).
pub fn flow_span(n: usize) -> Span {
    let mut span = span(n, None);
    span.span_id = SPAN_ID_MARK.to_vec();
    span.parent_span_id.clear();
    span.name = "flow".into();
    span.kind = SpanKind::Internal as i32;
    span.status = None;
    let (src, dst) = [
        ("frontend", "catalog"),
        ("frontend", "cart"),
        ("checkout", "payments"),
        ("cart", "redis"),
    ][n % 4];
    span.attributes = vec![
        kv("flow.community_id", s("1:LQU9qZlK+B+2dM2I2n1kI/M5a/g=")),
        kv("flow.direction", s("initiator")),
        kv("flow.bytes.delta", i(1024 + n as i64)),
        kv("flow.reverse.bytes.delta", i(32768)),
        kv("flow.packets.delta", i(4)),
        kv("flow.reverse.packets.delta", i(24)),
        kv("network.transport", s("tcp")),
        kv("network.type", s("ipv4")),
        kv("source.address", s("10.1.1.5")),
        kv("source.port", i(54211)),
        kv("source.k8s.namespace.name", s("shop")),
        kv("source.k8s.deployment.name", s(src)),
        kv("source.k8s.pod.name", s("frontend-7d9f8b6c5d-abcde")),
        kv("destination.address", s("10.1.2.10")),
        kv("destination.port", i(8080)),
        kv("destination.k8s.namespace.name", s("shop")),
        kv("destination.k8s.deployment.name", s(dst)),
        kv("destination.k8s.pod.name", s("catalog-5c6d7e8f9a-xyz12")),
    ];
    span
}

/// What a flow event does to its instance.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Role {
    Start,
    Step(usize),
    End,
}

/// (role, instance index within the batch) of the flow event in `slot`.
fn slot_role(shape: Shape, slot: usize) -> (Role, u64) {
    match shape {
        Shape::StartsOnly => (Role::Start, slot as u64),
        Shape::Steps => {
            let role = match slot % STEPS_EVENTS {
                0 => Role::Start,
                5 => Role::End,
                k => Role::Step(k - 1),
            };
            (role, (slot / STEPS_EVENTS) as u64)
        }
        Shape::StartsWithSteps => {
            let role = match slot % 5 {
                0 => Role::Start,
                k => Role::Step(k - 1),
            };
            (role, (slot / 5) as u64)
        }
        _ if slot.is_multiple_of(2) => (Role::Start, slot as u64 / 2),
        _ => (Role::End, slot as u64 / 2),
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

    #[test]
    fn steps_go_to_open_instances() {
        let t = Template::new(Shape::Steps);
        assert_eq!((t.instances(), t.events), (166, 996));
        let m = t.batch_message(LAG);
        let spans = &m.resource_spans[0].scope_spans[0].spans;
        let event = |n: usize| &spans[n].events[0];
        let id = |n: usize| format!("{:?}", event(n).attributes[0].value);
        assert_eq!(event(0).name, "flow.checkout.start");
        assert_eq!(event(1).name, "flow.checkout.step");
        assert_eq!(event(5).name, "flow.checkout.end");
        assert_eq!(id(0), format!("{:?}", s(&id_text(LAG * 166))));
        assert_eq!(id(1), format!("{:?}", s(&id_text(LAG / 2 * 166))));
        assert_eq!(id(5), format!("{:?}", s(&id_text(0))));
        let w = Template::new(Shape::StartsWithSteps);
        assert_eq!((w.instances(), w.events), (200, 1000));
        let m = w.batch_message(3);
        let spans = &m.resource_spans[0].scope_spans[0].spans;
        assert_eq!(
            spans[0].events[0].attributes[0].value,
            spans[4].events[0].attributes[0].value
        );
    }

    #[test]
    fn flow_span_batches_are_new_records() {
        let t = Template::new(Shape::NetworkSparse);
        assert_eq!(t.span_id_slots.len(), SPANS_PER_BATCH / 10);
        let a = ExportTraceServiceRequest::decode(&t.batch(3)[..]).unwrap();
        let b = ExportTraceServiceRequest::decode(&t.batch(4)[..]).unwrap();
        let ids = |m: &ExportTraceServiceRequest| -> Vec<Vec<u8>> {
            spans_in(m)
                .filter(|s| s.name == "flow")
                .map(|s| s.span_id.clone())
                .collect()
        };
        let (a, b) = (ids(&a), ids(&b));
        assert_eq!(a.len(), 100);
        assert!(a.iter().all(|id| !b.contains(id)));
        assert_eq!(
            Template::new(Shape::NetworkAll).span_id_slots.len(),
            SPANS_PER_BATCH
        );
    }
}
