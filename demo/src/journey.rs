//! One flow instance's journey: its start, the steps it reaches (`flow.<flow>.step`
//! events), and its end, each emitted by the service that owns it, at its share of the
//! instance's latency. Unfinished instances stop after some steps and send nothing more.

use std::fmt::Write as _;
use std::sync::Arc;
use std::time::Duration;

use opentelemetry::trace::{Span as _, SpanKind, Status, TraceContextExt as _, Tracer as _};
use opentelemetry::{Context, KeyValue};
use tokio::sync::watch;

use super::{FlowSpec, Outcome, Plan, Rng, Service, Shop, Tally, END_FIRST_HOLD, FLOWS};

/// One step of a flow: its name, the service and operation whose span carries the step
/// event, when it happens (share of the instance's latency), and whether that span is in
/// the start's trace (a child) or a trace of its own.
pub struct StepSpec {
    pub name: &'static str,
    pub service: Service,
    pub operation: &'static str,
    pub at: f64,
    pub in_start_trace: bool,
}

/// The most steps any demo flow has.
pub const MAX_STEPS: usize = 4;

pub const CHECKOUT_STEPS: [StepSpec; MAX_STEPS] = [
    StepSpec {
        name: "cart",
        service: Service::Order,
        operation: "confirm cart",
        at: 0.1,
        in_start_trace: true,
    },
    StepSpec {
        name: "payment_authorized",
        service: Service::Payment,
        operation: "charge card",
        at: 0.4,
        in_start_trace: true,
    },
    StepSpec {
        name: "packed",
        service: Service::Fulfillment,
        operation: "pack order",
        at: 0.7,
        in_start_trace: false,
    },
    StepSpec {
        name: "shipped",
        service: Service::Fulfillment,
        operation: "hand over to carrier",
        at: 0.9,
        in_start_trace: false,
    },
];

/// How many of a flow's `n` steps an instance sends, given its outcome. For checkout:
/// successes all; failures stop after `cart` (payment declined) or `packed` (out of
/// stock); cancellations after `cart` or `payment_authorized`; unfinished instances after
/// any number, from none to all.
pub fn steps_reached(rng: &mut Rng, n: usize, outcome: Option<Outcome>) -> usize {
    if n == 0 {
        return 0;
    }
    let reached = match outcome {
        Some(Outcome::Success) => n,
        Some(Outcome::Failure) => [1, 3][rng.pick(&[0.7, 0.3])],
        Some(Outcome::Cancelled) => 1 + rng.pick(&[0.5, 0.5]),
        None => rng.pick(&vec![1.0; n + 1]),
    };
    reached.min(n)
}

/// The name of where an instance that sent `k` steps stalled: `start` or its last step.
fn stalled_at(steps: &[StepSpec], k: usize) -> &'static str {
    if k == 0 {
        "start"
    } else {
        steps[k - 1].name
    }
}

/// `,"steps":{...},"stalled":{...}` for the summary file.
pub fn summary_json(steps: &[StepSpec], sent: &[u64], stalled: &[u64]) -> String {
    let object = |pairs: Vec<(&str, u64)>| {
        let body: Vec<String> = pairs.iter().map(|(k, v)| format!("\"{k}\":{v}")).collect();
        format!("{{{}}}", body.join(","))
    };
    let sent = steps.iter().zip(sent).map(|(s, n)| (s.name, *n)).collect();
    let stalled = (0..=steps.len())
        .map(|k| (stalled_at(steps, k), stalled[k]))
        .collect();
    format!(
        ",\"steps\":{},\"stalled\":{}",
        object(sent),
        object(stalled)
    )
}

/// Two lines of the final table for a flow with steps.
pub fn summary_lines(spec: &FlowSpec, sent: &[u64], stalled: &[u64]) -> String {
    let steps: Vec<String> = spec
        .steps
        .iter()
        .zip(sent)
        .map(|(s, n)| format!("{} {n}", s.name))
        .collect();
    let stalls: Vec<String> = (0..=spec.steps.len())
        .map(|k| format!("{} {}", stalled_at(spec.steps, k), stalled[k]))
        .collect();
    let mut out = String::new();
    let _ = writeln!(out, "  {} steps sent: {}", spec.name, steps.join(", "));
    let _ = writeln!(
        out,
        "  {} unfinished, by last step sent: {}",
        spec.name,
        stalls.join(", ")
    );
    out
}

/// Sleeps for `d`; false when aborted first.
async fn sleep_or_abort(d: Duration, abort: &mut watch::Receiver<bool>) -> bool {
    tokio::select! {
        _ = tokio::time::sleep(d) => true,
        _ = abort.wait_for(|a| *a) => false,
    }
}

/// Emits one step event in its service's span.
fn emit_step(shop: &Shop, flow: &str, step: &StepSpec, id: &str, start_cx: &Context) {
    let tracer = shop.tracer(step.service);
    let parent = if step.in_start_trace {
        start_cx.clone()
    } else {
        Context::new()
    };
    let mut span = tracer
        .span_builder(step.operation)
        .with_kind(SpanKind::Internal)
        .start_with_context(tracer, &parent);
    span.add_event(
        format!("flow.{flow}.step"),
        vec![
            KeyValue::new("correlation-id", id.to_string()),
            KeyValue::new("step", step.name),
        ],
    );
    span.end();
}

/// Emits the end event in a root span: the end lives in a trace of its own.
fn emit_end(shop: &Shop, spec: &FlowSpec, id: &str, outcome: Outcome) {
    let tracer = shop.tracer(spec.end.0);
    let kind = if spec.end.0 == Service::Fulfillment {
        SpanKind::Consumer
    } else {
        SpanKind::Server
    };
    let mut span = tracer
        .span_builder(spec.end.1)
        .with_kind(kind)
        .start_with_context(tracer, &Context::new());
    span.add_event(
        format!("flow.{}.end", spec.name),
        vec![
            KeyValue::new("correlation-id", id.to_string()),
            KeyValue::new("outcome", outcome.as_str()),
        ],
    );
    if outcome == Outcome::Failure {
        span.set_status(Status::error(format!("{} failed", spec.name)));
    }
    span.end();
}

/// What happens after the start, in time order: (share of the latency, what).
enum Beat {
    Via(Service, &'static str),
    Step(usize),
    End(Outcome),
}

fn beats(spec: &FlowSpec, plan: &Plan) -> Vec<(f64, Beat)> {
    let mut beats = Vec::new();
    if let Some((service, op)) = spec.via {
        beats.push((0.4, Beat::Via(service, op)));
    }
    for (i, step) in spec.steps.iter().enumerate().take(plan.steps) {
        beats.push((step.at, Beat::Step(i)));
    }
    if let Some(outcome) = plan.outcome {
        beats.push((1.0, Beat::End(outcome)));
    }
    beats.sort_by(|a, b| a.0.total_cmp(&b.0));
    beats
}

pub async fn run_instance(
    shop: Arc<Shop>,
    plan: Plan,
    tally: Tally,
    mut abort: watch::Receiver<bool>,
) {
    let spec = &FLOWS[plan.flow];
    let id = plan.correlation_id.as_str();
    let start_tracer = shop.tracer(spec.start.0);
    let mut start_span = start_tracer
        .span_builder(spec.start.1)
        .with_kind(SpanKind::Server)
        .start(start_tracer);
    start_span.add_event(
        format!("flow.{}.start", spec.name),
        vec![KeyValue::new("correlation-id", id.to_string())],
    );
    tally.lock().unwrap().entry(spec.name).or_default().started += 1;
    let start_cx = Context::new().with_remote_span_context(start_span.span_context().clone());
    if !plan.start_last {
        start_span.end();
    }

    let mut steps_sent = 0;
    let mut ended = false;
    let mut elapsed = 0.0;
    for (at, beat) in beats(spec, &plan) {
        if !sleep_or_abort(plan.latency.mul_f64(at - elapsed), &mut abort).await {
            break;
        }
        elapsed = at;
        match beat {
            Beat::Via(service, op) => {
                let tracer = shop.tracer(service);
                let mut span = tracer
                    .span_builder(op)
                    .with_kind(SpanKind::Internal)
                    .start_with_context(tracer, &start_cx);
                span.set_attribute(KeyValue::new("payment.amount", 42.0));
                span.end();
            }
            Beat::Step(i) => {
                emit_step(&shop, spec.name, &spec.steps[i], id, &start_cx);
                steps_sent += 1;
                tally.lock().unwrap().entry(spec.name).or_default().steps[i] += 1;
            }
            Beat::End(outcome) => {
                emit_end(&shop, spec, id, outcome);
                ended = true;
                let mut tally = tally.lock().unwrap();
                let c = tally.entry(spec.name).or_default();
                match outcome {
                    Outcome::Success => c.success += 1,
                    Outcome::Failure => c.failure += 1,
                    Outcome::Cancelled => c.cancelled += 1,
                }
            }
        }
    }
    // Unfinished instances wait out the rest of their latency, as finished ones do.
    if !ended && elapsed < 1.0 {
        sleep_or_abort(plan.latency.mul_f64(1.0 - elapsed), &mut abort).await;
    }
    if !ended && !spec.steps.is_empty() {
        tally.lock().unwrap().entry(spec.name).or_default().stalled[steps_sent] += 1;
    }
    if plan.start_last && (ended || steps_sent > 0) {
        sleep_or_abort(END_FIRST_HOLD, &mut abort).await;
    }
    // Ends the start span if still open (start-last instances, aborted ones).
    drop(start_span);
}
