//! Real OpenTelemetry Rust SDK clients (`opentelemetry_sdk` providers with the
//! `opentelemetry-otlp` HTTP/protobuf and gRPC/tonic exporters) against a flowmetrics on
//! loopback: spans with flow events from two services, and log-based events.
//!
//! The SDK's batch processors export from their own threads and `force_flush` blocks until
//! the export is answered, so flushes run on the blocking pool of a multi-thread runtime.

mod common;

use std::collections::BTreeMap;
use std::time::{Duration, SystemTime};

use common::sdk::*;
use common::*;
use opentelemetry::logs::{LogRecord as _, Logger as _, LoggerProvider as _};
use opentelemetry::KeyValue;
use opentelemetry_sdk::logs::SdkLogger;
use opentelemetry_sdk::trace::SdkTracerProvider;

/// One span named `op` carrying one event.
fn span_with_event(
    provider: &SdkTracerProvider,
    op: &'static str,
    event: &'static str,
    at: SystemTime,
    attributes: Vec<KeyValue>,
    error: bool,
) {
    emit(
        provider,
        "sdk-clients-test",
        op,
        event,
        at,
        attributes,
        error,
    );
}

/// A flow event as a log record, named by its event name or, `by_attribute`, by an
/// `event.name` attribute.
fn log_event(
    logger: &SdkLogger,
    name: &'static str,
    by_attribute: bool,
    at: SystemTime,
    attributes: &[(&'static str, &'static str)],
) {
    let mut record = logger.create_log_record();
    if by_attribute {
        record.set_timestamp(at);
        record.add_attribute("event.name", name);
    } else {
        record.set_event_name(name);
        record.set_timestamp(at);
    }
    for (k, v) in attributes {
        record.add_attribute(*k, *v);
    }
    logger.emit(record);
}

fn id(v: String) -> KeyValue {
    KeyValue::new("correlation-id", v)
}

fn rejected_total(m: &BTreeMap<String, f64>) -> f64 {
    m.iter()
        .filter(|(k, _)| k.starts_with("flowmetrics_flow_events_rejected_total"))
        .map(|(_, v)| v)
        .sum()
}

/// order-service starts flows, fulfillment-service ends them, each from its own tracer
/// provider (so its own `service.name`), in traces of their own:
/// - `checkout`: 10 instances, in order: 6 success, 2 failure, 1 cancelled, 1 never ended;
/// - `refund`: 3 instances whose ends are exported before their starts.
async fn shop_over(transport: Transport) {
    let mut config = test_config();
    config.dimensions = serde_yaml::from_str(
        "- { label: service, attribute: service.name, default: unknown }\n\
         - { label: end_service, attribute: service.name, from: end, default: unknown }\n",
    )
    .unwrap();
    let app = start(config).await;
    let orders = tracer_provider(&app, transport, "order-service");
    let fulfillment = tracer_provider(&app, transport, "fulfillment-service");

    let base = SystemTime::now() - Duration::from_secs(60);
    let checkout: [Option<&str>; 10] = [
        Some("success"),
        Some("success"),
        Some("failure"),
        Some("success"),
        Some("cancelled"),
        Some("success"),
        Some("success"),
        Some("failure"),
        Some("success"),
        None,
    ];
    for i in 0..checkout.len() {
        let attrs = vec![id(format!("order-{i}"))];
        span_with_event(
            &orders,
            "POST /checkout",
            "flow.checkout.start",
            base,
            attrs,
            false,
        );
    }
    // The refunds' ends are exported first and wait for their starts.
    for i in 0..3 {
        let at = base + Duration::from_secs(1);
        let attrs = vec![
            id(format!("refund-{i}")),
            KeyValue::new("outcome", "success"),
        ];
        span_with_event(
            &fulfillment,
            "refund settled",
            "flow.refund.end",
            at,
            attrs,
            false,
        );
    }
    flush_traces([&fulfillment]).await;
    for i in 0..3 {
        let attrs = vec![id(format!("refund-{i}"))];
        span_with_event(
            &orders,
            "POST /refund",
            "flow.refund.start",
            base,
            attrs,
            false,
        );
    }
    flush_traces([&orders]).await;
    // Checkout i takes (i + 1) × 100 ms.
    for (i, outcome) in checkout.iter().enumerate() {
        let Some(outcome) = outcome else { continue };
        let at = base + Duration::from_millis(100 * (i as u64 + 1));
        let attrs = vec![id(format!("order-{i}")), KeyValue::new("outcome", *outcome)];
        let error = *outcome == "failure";
        span_with_event(
            &fulfillment,
            "ship order",
            "flow.checkout.end",
            at,
            attrs,
            error,
        );
    }
    flush_traces([&fulfillment]).await;

    let end_events = r#"flowmetrics_flow_events_total{kind="end",source="span_event"}"#;
    let m = scrape_until(&app, Duration::from_secs(5), |m| {
        value(m, end_events) >= 12.0
    })
    .await;
    let get = |k: &str| value(&m, k);
    // The instances that ended: with the start's and the end's service.
    let ended = |family: &str, labels: &str| {
        let dims = r#"service="order-service",end_service="fulfillment-service""#;
        get(&format!("flowmetrics_{family}{{{labels},{dims}}}"))
    };
    for (family, labels, want) in [
        (
            "flows_completed_total",
            r#"flow="checkout",outcome="success""#,
            6.0,
        ),
        (
            "flows_completed_total",
            r#"flow="checkout",outcome="failure""#,
            2.0,
        ),
        (
            "flows_completed_total",
            r#"flow="checkout",outcome="cancelled""#,
            1.0,
        ),
        (
            "flow_errors_total",
            r#"flow="checkout",error_reason="failure""#,
            2.0,
        ),
        ("flow_duration_seconds_count", r#"flow="checkout""#, 6.0),
        (
            "flows_completed_total",
            r#"flow="refund",outcome="success""#,
            3.0,
        ),
        ("flow_duration_seconds_count", r#"flow="refund""#, 3.0),
    ] {
        assert_eq!(ended(family, labels), want, "{family}{{{labels}}}");
    }
    // Durations come from the SDK's event timestamps: 0.1 + 0.2 + 0.4 + 0.6 + 0.7 + 0.9.
    let sum = ended("flow_duration_seconds_sum", r#"flow="checkout""#);
    assert!((sum - 2.9).abs() < 1e-6, "checkout duration sum {sum}");
    let sum = ended("flow_duration_seconds_sum", r#"flow="refund""#);
    assert!((sum - 3.0).abs() < 1e-6, "refund duration sum {sum}");
    let started = |flow: &str| {
        format!(r#"flowmetrics_flows_started_total{{flow="{flow}",service="order-service"}}"#)
    };
    let open = |flow: &str| format!(r#"flowmetrics_flows_in_progress{{flow="{flow}"}}"#);
    assert_values(
        &m,
        &[
            (&started("checkout"), 10.0),
            (&open("checkout"), 1.0),
            (&started("refund"), 3.0),
            (&open("refund"), 0.0),
            (
                r#"flowmetrics_flow_unmatched_ends_total{flow="refund"}"#,
                0.0,
            ),
            (
                r#"flowmetrics_flow_events_total{kind="start",source="span_event"}"#,
                13.0,
            ),
            (end_events, 12.0),
        ],
    );
    assert_eq!(rejected_total(&m), 0.0);
    let t = transport.label();
    assert_eq!(
        get(&format!(
            r#"flowmetrics_otlp_spans_total{{transport="{t}"}}"#
        )),
        25.0
    );
    let ok = format!(
        r#"flowmetrics_otlp_requests_total{{transport="{t}",signal="traces",code="{}"}}"#,
        transport.ok_code()
    );
    assert!(get(&ok) >= 3.0, "{ok} = {}", get(&ok));
    let all_requests: f64 = m
        .iter()
        .filter(|(k, _)| k.starts_with("flowmetrics_otlp_requests_total{"))
        .map(|(_, v)| v)
        .sum();
    assert_eq!(all_requests, get(&ok), "every export answered OK");

    shutdown_all(vec![orders, fulfillment], vec![]).await;
    app.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sdk_http_protobuf_exporter_two_services() {
    shop_over(Transport::Http).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sdk_grpc_tonic_exporter_two_services() {
    shop_over(Transport::Grpc).await;
}

/// Log-based events from the SDK's Logger API, paired with span events:
/// - `x-1`: span-event start, log end with `event_name`, success after 500 ms;
/// - `x-2`: span-event start, log end named by the `event.name` attribute, failure;
/// - `x-3`: log end exported before its span-event start, cancelled;
/// - `y-1`: log start, span-event end.
async fn log_events_over(transport: Transport) {
    let app = start(test_config()).await;
    let orders = tracer_provider(&app, transport, "order-service");
    let fulfillment = logger_provider(&app, transport, "fulfillment-service");
    let logger = fulfillment.logger("sdk-clients-test");
    let base = SystemTime::now() - Duration::from_secs(60);

    for i in [1, 2] {
        let attrs = vec![id(format!("x-{i}"))];
        span_with_event(&orders, "POST /x", "flow.x.start", base, attrs, false);
    }
    flush_traces([&orders]).await;

    let at = |ms: u64| base + Duration::from_millis(ms);
    log_event(
        &logger,
        "flow.x.end",
        false,
        at(500),
        &[("correlation-id", "x-1"), ("outcome", "success")],
    );
    log_event(
        &logger,
        "flow.x.end",
        true,
        at(700),
        &[("correlation-id", "x-2"), ("outcome", "failure")],
    );
    log_event(
        &logger,
        "flow.x.end",
        false,
        at(2000),
        &[("correlation-id", "x-3"), ("outcome", "cancelled")],
    );
    log_event(
        &logger,
        "flow.y.start",
        false,
        base,
        &[("correlation-id", "y-1")],
    );
    flush_logs(&fulfillment).await;

    span_with_event(
        &orders,
        "POST /x",
        "flow.x.start",
        base,
        vec![id("x-3".into())],
        false,
    );
    let attrs = vec![id("y-1".into()), KeyValue::new("outcome", "success")];
    span_with_event(
        &orders,
        "POST /y",
        "flow.y.end",
        base + Duration::from_secs(3),
        attrs,
        false,
    );
    flush_traces([&orders]).await;

    let m = scrape_until(&app, Duration::from_secs(5), |m| {
        value(
            m,
            r#"flowmetrics_flows_completed_total{flow="x",outcome="cancelled"}"#,
        ) >= 1.0
            && value(
                m,
                r#"flowmetrics_flows_completed_total{flow="y",outcome="success"}"#,
            ) >= 1.0
    })
    .await;
    let get = |series: &str| value(&m, &format!("flowmetrics_{series}"));
    for (series, want) in [
        (r#"flows_started_total{flow="x"}"#, 3.0),
        (r#"flows_completed_total{flow="x",outcome="success"}"#, 1.0),
        (r#"flows_completed_total{flow="x",outcome="failure"}"#, 1.0),
        (
            r#"flows_completed_total{flow="x",outcome="cancelled"}"#,
            1.0,
        ),
        (r#"flow_errors_total{flow="x",error_reason="failure"}"#, 1.0),
        (r#"flow_duration_seconds_count{flow="x"}"#, 1.0),
        (r#"flows_in_progress{flow="x"}"#, 0.0),
        (r#"flows_started_total{flow="y"}"#, 1.0),
        (r#"flows_completed_total{flow="y",outcome="success"}"#, 1.0),
        (r#"flow_duration_seconds_count{flow="y"}"#, 1.0),
        (
            r#"flow_events_total{kind="start",source="span_event"}"#,
            3.0,
        ),
        (r#"flow_events_total{kind="end",source="span_event"}"#, 1.0),
        (r#"flow_events_total{kind="start",source="log"}"#, 1.0),
        (r#"flow_events_total{kind="end",source="log"}"#, 3.0),
    ] {
        assert_eq!(get(series), want, "{series}");
    }
    let sum = get(r#"flow_duration_seconds_sum{flow="x"}"#);
    assert!((sum - 0.5).abs() < 1e-6, "x duration sum {sum}");
    let sum = get(r#"flow_duration_seconds_sum{flow="y"}"#);
    assert!((sum - 3.0).abs() < 1e-6, "y duration sum {sum}");
    assert_eq!(rejected_total(&m), 0.0);
    let t = transport.label();
    let records = format!(r#"otlp_log_records_total{{transport="{t}"}}"#);
    assert_eq!(get(&records), 4.0);
    let ok = format!(
        r#"otlp_requests_total{{transport="{t}",signal="logs",code="{}"}}"#,
        transport.ok_code()
    );
    assert!(get(&ok) >= 1.0, "{ok}");

    shutdown_all(vec![orders], vec![fulfillment]).await;
    app.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sdk_log_events_pair_with_span_events_http() {
    log_events_over(Transport::Http).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sdk_log_events_pair_with_span_events_grpc() {
    log_events_over(Transport::Grpc).await;
}
