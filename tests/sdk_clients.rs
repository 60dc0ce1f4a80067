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
    let dims = r#"service="order-service",end_service="fulfillment-service""#;

    assert_eq!(
        get(r#"flowmetrics_flows_started_total{flow="checkout",service="order-service"}"#),
        10.0
    );
    for (outcome, n) in [("success", 6.0), ("failure", 2.0), ("cancelled", 1.0)] {
        let series = format!(
            r#"flowmetrics_flows_completed_total{{flow="checkout",outcome="{outcome}",{dims}}}"#
        );
        assert_eq!(get(&series), n, "{series}");
    }
    assert_values(
        &m,
        &[
            (
                &format!(
                    r#"flowmetrics_flow_errors_total{{flow="checkout",error_reason="failure",{dims}}}"#
                ),
                2.0,
            ),
            (
                &format!(r#"flowmetrics_flow_duration_seconds_count{{flow="checkout",{dims}}}"#),
                6.0,
            ),
        ],
    );
    // Durations come from the SDK's event timestamps: 0.1 + 0.2 + 0.4 + 0.6 + 0.7 + 0.9.
    let sum = get(&format!(
        r#"flowmetrics_flow_duration_seconds_sum{{flow="checkout",{dims}}}"#
    ));
    assert!((sum - 2.9).abs() < 1e-6, "checkout duration sum {sum}");
    assert_values(
        &m,
        &[
            (r#"flowmetrics_flows_in_progress{flow="checkout"}"#, 1.0),
            (
                r#"flowmetrics_flows_started_total{flow="refund",service="order-service"}"#,
                3.0,
            ),
            (
                &format!(
                    r#"flowmetrics_flows_completed_total{{flow="refund",outcome="success",{dims}}}"#
                ),
                3.0,
            ),
            (
                &format!(r#"flowmetrics_flow_duration_seconds_count{{flow="refund",{dims}}}"#),
                3.0,
            ),
        ],
    );
    let sum = get(&format!(
        r#"flowmetrics_flow_duration_seconds_sum{{flow="refund",{dims}}}"#
    ));
    assert!((sum - 3.0).abs() < 1e-6, "refund duration sum {sum}");
    assert_values(
        &m,
        &[
            (r#"flowmetrics_flows_in_progress{flow="refund"}"#, 0.0),
            (
                r#"flowmetrics_flow_unmatched_ends_total{flow="refund"}"#,
                0.0,
            ),
            (
                r#"flowmetrics_flow_events_total{kind="start",source="span_event"}"#,
                13.0,
            ),
        ],
    );
    assert_eq!(get(end_events), 12.0);
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

    let mut record = logger.create_log_record();
    record.set_event_name("flow.x.end");
    record.set_timestamp(base + Duration::from_millis(500));
    record.add_attribute("correlation-id", "x-1");
    record.add_attribute("outcome", "success");
    logger.emit(record);

    let mut record = logger.create_log_record();
    record.set_timestamp(base + Duration::from_millis(700));
    record.add_attribute("event.name", "flow.x.end");
    record.add_attribute("correlation-id", "x-2");
    record.add_attribute("outcome", "failure");
    logger.emit(record);

    let mut record = logger.create_log_record();
    record.set_event_name("flow.x.end");
    record.set_timestamp(base + Duration::from_secs(2));
    record.add_attribute("correlation-id", "x-3");
    record.add_attribute("outcome", "cancelled");
    logger.emit(record);

    let mut record = logger.create_log_record();
    record.set_event_name("flow.y.start");
    record.set_timestamp(base);
    record.add_attribute("correlation-id", "y-1");
    logger.emit(record);
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
    let get = |k: &str| value(&m, k);
    assert_values(
        &m,
        &[
            (r#"flowmetrics_flows_started_total{flow="x"}"#, 3.0),
            (
                r#"flowmetrics_flows_completed_total{flow="x",outcome="success"}"#,
                1.0,
            ),
            (
                r#"flowmetrics_flows_completed_total{flow="x",outcome="failure"}"#,
                1.0,
            ),
            (
                r#"flowmetrics_flows_completed_total{flow="x",outcome="cancelled"}"#,
                1.0,
            ),
            (
                r#"flowmetrics_flow_errors_total{flow="x",error_reason="failure"}"#,
                1.0,
            ),
            (r#"flowmetrics_flow_duration_seconds_count{flow="x"}"#, 1.0),
        ],
    );
    let sum = get(r#"flowmetrics_flow_duration_seconds_sum{flow="x"}"#);
    assert!((sum - 0.5).abs() < 1e-6, "x duration sum {sum}");
    assert_values(
        &m,
        &[
            (r#"flowmetrics_flows_in_progress{flow="x"}"#, 0.0),
            (r#"flowmetrics_flows_started_total{flow="y"}"#, 1.0),
            (
                r#"flowmetrics_flows_completed_total{flow="y",outcome="success"}"#,
                1.0,
            ),
            (r#"flowmetrics_flow_duration_seconds_count{flow="y"}"#, 1.0),
        ],
    );
    let sum = get(r#"flowmetrics_flow_duration_seconds_sum{flow="y"}"#);
    assert!((sum - 3.0).abs() < 1e-6, "y duration sum {sum}");

    assert_values(
        &m,
        &[
            (
                r#"flowmetrics_flow_events_total{kind="start",source="span_event"}"#,
                3.0,
            ),
            (
                r#"flowmetrics_flow_events_total{kind="end",source="span_event"}"#,
                1.0,
            ),
            (
                r#"flowmetrics_flow_events_total{kind="start",source="log"}"#,
                1.0,
            ),
            (
                r#"flowmetrics_flow_events_total{kind="end",source="log"}"#,
                3.0,
            ),
        ],
    );
    assert_eq!(rejected_total(&m), 0.0);
    let t = transport.label();
    assert_eq!(
        get(&format!(
            r#"flowmetrics_otlp_log_records_total{{transport="{t}"}}"#
        )),
        4.0
    );
    let ok = format!(
        r#"flowmetrics_otlp_requests_total{{transport="{t}",signal="logs",code="{}"}}"#,
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
