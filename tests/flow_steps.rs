//! Flow steps end to end (docs/steps.md): real OpenTelemetry Rust SDK exporters (three
//! tracer providers, three `service.name`s, three traces per instance, and a logger)
//! against a flowmetrics on loopback, with exact sums for every step family; and a
//! restart in the middle, with steps recorded before and after it.

mod common;

use std::collections::BTreeMap;
use std::time::{Duration, SystemTime};

use common::sdk::Transport::Grpc;
use common::sdk::{self, flush_logs, flush_traces, logger_provider, shutdown_all, tracer_provider};
use common::*;
use flowmetrics::config::{Config, FlowOverride};
use opentelemetry::logs::{LogRecord as _, Logger as _, LoggerProvider as _};
use opentelemetry::KeyValue;
use opentelemetry_sdk::trace::SdkTracerProvider;

const STEPS: [&str; 4] = ["placed", "paid", "packed", "shipped"];

/// One root span (a trace of its own) named `op` with one flow event.
fn emit(
    provider: &SdkTracerProvider,
    op: &'static str,
    event: &'static str,
    at: SystemTime,
    attrs: Vec<KeyValue>,
) {
    sdk::emit(provider, "flow-steps-test", op, event, at, attrs, false);
}

fn id(i: usize) -> KeyValue {
    KeyValue::new("correlation-id", format!("order-{i}"))
}

fn step_attrs(i: usize, step: &str) -> Vec<KeyValue> {
    vec![id(i), KeyValue::new("step", step.to_string())]
}

/// Which service emits each step: the order service places, payments pays, the
/// warehouse packs and ships (and ends the flow).
fn emitter<'a>(
    step: usize,
    web: &'a SdkTracerProvider,
    pay: &'a SdkTracerProvider,
    warehouse: &'a SdkTracerProvider,
) -> &'a SdkTracerProvider {
    match step {
        0 => web,
        1 => pay,
        _ => warehouse,
    }
}

fn config(timeout: Duration) -> Config {
    let mut c = test_config();
    c.dimensions =
        serde_yaml::from_str("- { label: service, attribute: service.name, default: unknown }\n")
            .unwrap();
    c.flows.per_flow.insert(
        "order".into(),
        FlowOverride {
            timeout: Some(timeout),
            steps: Some(STEPS.iter().map(ToString::to_string).collect()),
            ..Default::default()
        },
    );
    c
}

fn sum_of(m: &BTreeMap<String, f64>, prefix: &str) -> f64 {
    m.iter()
        .filter(|(k, _)| k.starts_with(prefix))
        .map(|(_, v)| v)
        .sum()
}

/// 20 instances of `order`: 0–9 reach every step and end after 5 s; 10–19 stall, two
/// at each point (`start`, then after each step) and time out. Each step k comes k + 1
/// seconds after the start. The warehouse exports first (its steps and ends wait), then
/// payments, then the order service (starts and `placed`). Also: a second `paid` of
/// instance 1 (a duplicate), a `paid` of instance 2 after its end (after_close), a step
/// of an order never started, sent as a log record (no_start), and an undeclared step
/// name (rejected).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_journey_across_three_services_counts_every_step_exactly() {
    let app = start(config(Duration::from_secs(3))).await;
    let web = tracer_provider(&app, Grpc, "order-service");
    let pay = tracer_provider(&app, Grpc, "payment-service");
    let warehouse = tracer_provider(&app, Grpc, "warehouse-service");
    let logs = logger_provider(&app, Grpc, "payment-service");
    let base = SystemTime::now() - Duration::from_secs(60);
    let at = |secs: u64| base + Duration::from_secs(secs);
    let reach = |i: usize| if i < 10 { 4 } else { (i - 10) % 5 };

    for exporter in [2usize, 1, 0] {
        for i in 0..20 {
            for step in (0..reach(i)).filter(|&k| [0, 1, 2, 2][k] == exporter) {
                let p = emitter(step, &web, &pay, &warehouse);
                emit(
                    p,
                    "step",
                    "flow.order.step",
                    at(step as u64 + 1),
                    step_attrs(i, STEPS[step]),
                );
            }
            if exporter == 2 && i < 10 {
                let attrs = vec![id(i), KeyValue::new("outcome", "success")];
                emit(&warehouse, "ship", "flow.order.end", at(5), attrs);
            }
            if exporter == 0 {
                emit(&web, "POST /orders", "flow.order.start", at(0), vec![id(i)]);
            }
        }
        if exporter == 1 {
            // The same step again, another timestamp: a duplicate (the earliest wins).
            emit(
                &pay,
                "step",
                "flow.order.step",
                at(9),
                step_attrs(1, "paid"),
            );
            emit(
                &pay,
                "step",
                "flow.order.step",
                at(2),
                step_attrs(1, "teleported"),
            );
        }
        flush_traces([[&web, &pay, &warehouse][exporter]]).await;
    }
    let done = r#"flowmetrics_flows_completed_total{flow="order",outcome="success",service="order-service"}"#;
    scrape_until_value(&app, Duration::from_secs(5), done, 10.0).await;
    // Instance 2 has ended: a late step counts after_close only.
    emit(
        &pay,
        "step",
        "flow.order.step",
        at(30),
        step_attrs(2, "paid"),
    );
    flush_traces([&pay]).await;
    let logger = logs.logger("flow-steps-test");
    let mut record = logger.create_log_record();
    record.set_event_name("flow.order.step");
    record.set_timestamp(at(2));
    record.add_attribute("correlation-id", "order-never-started");
    record.add_attribute("step", "paid");
    logger.emit(record);
    flush_logs(&logs).await;

    // The stalled ones time out (3 s), the lone step is no_start.
    let m = scrape_until(&app, Duration::from_secs(10), |m| {
        value(m, r#"flowmetrics_flow_errors_total{flow="order",error_reason="incomplete",service="order-service"}"#) >= 10.0
            && value(m, r#"flowmetrics_flow_steps_unmatched_total{flow="order",reason="no_start"}"#) >= 1.0
    })
    .await;
    let get = |k: &str| value(&m, k);
    let dims = r#"service="order-service""#;
    assert_values(
        &m,
        &[
            (
                &format!(r#"flowmetrics_flows_started_total{{flow="order",{dims}}}"#),
                20.0,
            ),
            (
                &format!(
                    r#"flowmetrics_flow_errors_total{{flow="order",error_reason="incomplete",{dims}}}"#
                ),
                10.0,
            ),
        ],
    );
    // Per step: 10 complete instances plus the stalled ones that got that far.
    let reached = [18.0, 16.0, 14.0, 12.0];
    for (k, step) in STEPS.iter().enumerate() {
        let series = |name: &str| format!(r#"{name}{{flow="order",step="{step}",{dims}}}"#);
        let n = reached[k];
        assert_eq!(get(&series("flowmetrics_flow_steps_total")), n, "{step}");
        assert_eq!(
            get(&series("flowmetrics_flow_step_duration_seconds_count")),
            n,
            "{step}"
        );
        let since_start = get(&series("flowmetrics_flow_step_duration_seconds_sum"));
        assert!(
            (since_start - n * (k as f64 + 1.0)).abs() < 1e-6,
            "{step}: {since_start}"
        );
        // Every instance closed (end or time-out): one transit of 1 s per step reached.
        assert_eq!(
            get(&series("flowmetrics_flow_step_transit_seconds_count")),
            n,
            "{step}"
        );
        let transit = get(&series("flowmetrics_flow_step_transit_seconds_sum"));
        assert!((transit - n).abs() < 1e-6, "{step}: {transit}");
    }
    let mut stalled = 0.0;
    for last in ["start", "placed", "paid", "packed", "shipped"] {
        let n = get(&format!(
            r#"flowmetrics_flow_stalled_total{{flow="order",last_step="{last}",{dims}}}"#
        ));
        assert_eq!(n, 2.0, "stalled at {last}");
        stalled += n;
    }
    assert_eq!(stalled, sum_of(&m, "flowmetrics_flow_stalled_total{"));
    assert_eq!(stalled, 10.0, "Σ stalled = incomplete");
    assert_values(
        &m,
        &[
            (
                r#"flowmetrics_flow_steps_unmatched_total{flow="order",reason="after_close"}"#,
                1.0,
            ),
            (
                r#"flowmetrics_flow_steps_unmatched_total{flow="order",reason="no_start"}"#,
                1.0,
            ),
            (
                r#"flowmetrics_flow_events_duplicate_total{kind="step"}"#,
                1.0,
            ),
            (
                r#"flowmetrics_flow_events_rejected_total{reason="unknown_step"}"#,
                1.0,
            ),
            (
                r#"flowmetrics_flow_events_total{kind="step",source="span_event"}"#,
                62.0,
            ),
            (
                r#"flowmetrics_flow_events_total{kind="step",source="log"}"#,
                1.0,
            ),
            (r#"flowmetrics_flows_in_progress{flow="order"}"#, 0.0),
            (
                r#"flowmetrics_flow_unmatched_ends_total{flow="order"}"#,
                0.0,
            ),
        ],
    );

    shutdown_all(vec![web, pay, warehouse], vec![logs]).await;
    app.shutdown().await;
}

/// Steps recorded before a restart (and steps waiting for their start) carry over the
/// state file: after the restart the instances go on and close with every transit.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn steps_hold_across_a_restart() {
    let dir = std::env::temp_dir().join(format!("fm-flow-steps-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    std::fs::create_dir_all(&dir).unwrap();
    let mut c = config(Duration::from_secs(300));
    c.state.path = dir.join("state").to_str().unwrap().into();
    let base = SystemTime::now() - Duration::from_secs(60);
    let at = |secs: u64| base + Duration::from_secs(secs);

    let app = start(c.clone()).await;
    let web = tracer_provider(&app, Grpc, "order-service");
    for i in 0..3 {
        emit(&web, "POST /orders", "flow.order.start", at(0), vec![id(i)]);
        emit(
            &web,
            "step",
            "flow.order.step",
            at(1),
            step_attrs(i, "placed"),
        );
    }
    // Instance 3's step comes before its start and waits across the restart.
    emit(
        &web,
        "step",
        "flow.order.step",
        at(2),
        step_attrs(3, "paid"),
    );
    flush_traces([&web]).await;
    let series =
        r#"flowmetrics_flow_steps_total{flow="order",step="placed",service="order-service"}"#;
    scrape_until_value(&app, Duration::from_secs(5), series, 3.0).await;
    shutdown_all(vec![web], vec![]).await;
    app.shutdown().await;

    let app = start(c).await;
    let web = tracer_provider(&app, Grpc, "order-service");
    // A retried export of a step handled before the restart is a duplicate.
    emit(
        &web,
        "step",
        "flow.order.step",
        at(1),
        step_attrs(0, "placed"),
    );
    for i in 0..3 {
        emit(
            &web,
            "step",
            "flow.order.step",
            at(3),
            step_attrs(i, "paid"),
        );
        let attrs = vec![id(i), KeyValue::new("outcome", "success")];
        emit(&web, "ship", "flow.order.end", at(4), attrs);
    }
    emit(&web, "POST /orders", "flow.order.start", at(0), vec![id(3)]);
    emit(
        &web,
        "step",
        "flow.order.step",
        at(3),
        step_attrs(3, "packed"),
    );
    emit(
        &web,
        "ship",
        "flow.order.end",
        at(4),
        vec![id(3), KeyValue::new("outcome", "success")],
    );
    flush_traces([&web]).await;
    let dims = r#"service="order-service""#;
    let m = scrape_until(&app, Duration::from_secs(5), |m| {
        value(
            m,
            &format!(
                r#"flowmetrics_flows_completed_total{{flow="order",outcome="success",{dims}}}"#
            ),
        ) >= 4.0
    })
    .await;
    let get = |k: &str| value(&m, k);
    assert_values(
        &m,
        &[
            (
                &format!(r#"flowmetrics_flows_restored_total{{flow="order",{dims}}}"#),
                3.0,
            ),
            (
                &format!(r#"flowmetrics_flows_started_total{{flow="order",{dims}}}"#),
                1.0,
            ),
            (
                &format!(
                    r#"flowmetrics_flows_completed_total{{flow="order",outcome="success",{dims}}}"#
                ),
                4.0,
            ),
            (
                r#"flowmetrics_flow_events_duplicate_total{kind="step"}"#,
                1.0,
            ),
        ],
    );
    // This run counts the steps it saw reach an instance: paid ×4 (one waited across the
    // restart), packed ×1; placed was counted by the first run.
    let series = |name: &str, step: &str| format!(r#"{name}{{flow="order",step="{step}",{dims}}}"#);
    for (family, step, want) in [
        ("steps_total", "placed", 0.0),
        ("steps_total", "paid", 4.0),
        ("steps_total", "packed", 1.0),
        // Transits at close include the steps recorded before the restart.
        ("step_transit_seconds_count", "placed", 3.0),
        ("step_transit_seconds_sum", "placed", 3.0),
        ("step_transit_seconds_count", "paid", 4.0),
        // 0–2: placed at 1 s, paid at 3 s (2 s); 3: paid at 2 s, the first step (2 s).
        ("step_transit_seconds_sum", "paid", 8.0),
        ("step_transit_seconds_sum", "packed", 1.0),
    ] {
        let name = format!("flowmetrics_flow_{family}");
        assert_eq!(get(&series(&name, step)), want, "{name} {step}");
    }
    assert_values(
        &m,
        &[
            (
                r#"flowmetrics_flow_steps_unmatched_total{flow="order",reason="no_start"}"#,
                0.0,
            ),
            (r#"flowmetrics_flows_in_progress{flow="order"}"#, 0.0),
        ],
    );
    shutdown_all(vec![web], vec![]).await;
    app.shutdown().await;
    let _ = std::fs::remove_dir_all(&dir);
}

/// A flow that uses steps without declaring them: its unmatched series exist at 0 from
/// its first step, so dashboards and `rate()` see them before anything goes wrong (a
/// declared flow has them from its first event).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_undeclared_flow_has_its_unmatched_step_series_at_zero_from_its_first_step() {
    use common::otlp::{event, flow_event, span, traces};
    use prost::Message;
    let app = start(test_config()).await;
    let now = common::otlp::now_nanos();
    let before = scrape(&app).await;
    let unmatched = |reason: &str| {
        format!(r#"flowmetrics_flow_steps_unmatched_total{{flow="signup",reason="{reason}"}}"#)
    };
    assert!(!before.contains_key(&unmatched("no_start")));
    let step = event(
        "flow.signup.step",
        now,
        vec![attr("correlation-id", "s1"), attr("step", "verified")],
    );
    let spans = vec![
        span(
            &[1; 16],
            &[1; 8],
            vec![flow_event(
                "flow.signup.start",
                "s1",
                None,
                now - common::otlp::SEC,
            )],
        ),
        span(&[1; 16], &[2; 8], vec![step]),
    ];
    export_ok(&app, PROTOBUF, traces(None, spans).encode_to_vec()).await;
    let m = scrape_until(&app, Duration::from_secs(10), |m| {
        m.contains_key(&unmatched("after_close"))
    })
    .await;
    assert_present(
        &m,
        &[
            (&unmatched("after_close"), 0.0),
            (&unmatched("no_start"), 0.0),
            (
                r#"flowmetrics_flow_steps_total{flow="signup",step="verified"}"#,
                1.0,
            ),
        ],
    );
    app.shutdown().await;
}
