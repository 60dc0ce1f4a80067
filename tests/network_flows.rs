//! Network Flow Spans (docs/behaviour.md §8) on every ingest path, and OTLP/JSON enum names.

mod common;

use std::collections::BTreeMap;

use common::attr as s;
use common::*;
use flowmetrics::config::{Config, NetworkDimension};
use hyper::StatusCode;
use opentelemetry_proto::tonic::collector::trace::v1::trace_service_client::TraceServiceClient;
use opentelemetry_proto::tonic::collector::trace::v1::ExportTraceServiceRequest;
use opentelemetry_proto::tonic::trace::v1::Span;
use prost::Message;

/// The Flow Span example of the convention's primer, verbatim.
const SEED_EXAMPLE: &str = r#"{
  "name": "flow",
  "kind": "SPAN_KIND_INTERNAL",
  "startTimeUnixNano": "1727149620000000000",
  "endTimeUnixNano": "1727149680000000000",
  "attributes": [
    { "key": "flow.community_id", "value": { "stringValue": "1:LQU9qZlK+B+2dM2I2n1kI/M5a/g=" } },
    { "key": "flow.direction", "value": { "stringValue": "initiator" } },
    { "key": "flow.bytes.delta", "value": { "intValue": "1024" } },
    { "key": "flow.reverse.bytes.delta", "value": { "intValue": "32768" } },
    { "key": "source.address", "value": { "stringValue": "10.1.1.5" } },
    { "key": "source.port", "value": { "intValue": "54211" } },
    { "key": "source.k8s.pod.name", "value": { "stringValue": "frontend-abcde" } },
    { "key": "destination.address", "value": { "stringValue": "10.1.2.10" } },
    { "key": "destination.port", "value": { "intValue": "80" } },
    { "key": "destination.k8s.pod.name", "value": { "stringValue": "backend-xyz" } },
    { "key": "network.transport", "value": { "stringValue": "tcp" } }
  ]
}"#;

/// Labels of a record with the default dimensions (direction first when given).
fn default_labels(direction: Option<&str>, transport: &str, src: &str, dst: &str) -> String {
    let direction = direction.map_or(String::new(), |d| format!("direction=\"{d}\","));
    format!(
        "{{{direction}transport=\"{transport}\",source_workload=\"{src}\",\
         source_namespace=\"shop\",destination_workload=\"{dst}\",\
         destination_namespace=\"shop\"}}"
    )
}

/// A Flow Span between two deployments of namespace `shop` (namespace on the resource).
fn flow_span(id: u8, src: &str, dst: &str, bytes: [i64; 2], packets: [i64; 2]) -> Span {
    Span {
        trace_id: vec![id; 16],
        span_id: vec![id; 8],
        name: "flow".into(),
        start_time_unix_nano: 1_000,
        end_time_unix_nano: 2_000,
        attributes: vec![
            s("flow.community_id", "1:abc"),
            int_attr("flow.bytes.delta", bytes[0]),
            int_attr("flow.reverse.bytes.delta", bytes[1]),
            int_attr("flow.packets.delta", packets[0]),
            int_attr("flow.reverse.packets.delta", packets[1]),
            s("network.transport", "tcp"),
            s("source.address", "10.0.0.1"),
            s("source.k8s.deployment.name", src),
            s("destination.k8s.deployment.name", dst),
        ],
        ..Default::default()
    }
}

/// `spans` under a resource of namespace `shop`.
fn request(spans: Vec<Span>) -> ExportTraceServiceRequest {
    let namespace = |side: &str| s(&format!("{side}.k8s.namespace.name"), "shop");
    otlp::traces(
        Some(vec![namespace("source"), namespace("destination")]),
        spans,
    )
}

async fn post_protobuf(app: &flowmetrics::RunningApp, req: &ExportTraceServiceRequest) {
    export_ok(app, PROTOBUF, req.encode_to_vec()).await;
}

async fn post_json(app: &flowmetrics::RunningApp, signal: &str, body: String) {
    let url = format!("http://{}/v1/{signal}", app.otlp_http.unwrap());
    let r = post(&url, "application/json", body).await;
    assert_eq!(r.status, StatusCode::OK, "{}", r.text());
}

fn network(samples: &BTreeMap<String, f64>, family: &str, labels: &str) -> f64 {
    value(
        samples,
        &format!("flowmetrics_network_{family}_total{labels}"),
    )
}

#[tokio::test]
async fn the_seed_example_posted_verbatim_over_json_counts_its_bytes() {
    let app = start(test_config()).await;
    let body = format!(r#"{{"resourceSpans":[{{"scopeSpans":[{{"spans":[{SEED_EXAMPLE}]}}]}}]}}"#);
    post_json(&app, "traces", body).await;
    let m = scrape(&app).await;
    // No k8s workload or namespace attributes in the example: never the pod names or
    // addresses it does carry.
    let labels = |d: Option<&str>| {
        let d = d.map_or(String::new(), |d| format!("direction=\"{d}\","));
        format!(
            "{{{d}transport=\"tcp\",source_workload=\"unknown\",source_namespace=\"unknown\",\
             destination_workload=\"unknown\",destination_namespace=\"unknown\"}}"
        )
    };
    assert_eq!(network(&m, "bytes", &labels(Some("forward"))), 1024.0);
    assert_eq!(network(&m, "bytes", &labels(Some("reverse"))), 32768.0);
    assert_eq!(network(&m, "packets", &labels(Some("forward"))), 0.0);
    assert_eq!(network(&m, "flow_records", &labels(None)), 1.0);
    let text = scrape_text(&app).await;
    assert!(!text.contains("frontend-abcde") && !text.contains("10.1.1.5"));
    app.shutdown().await;
}

#[tokio::test]
async fn protobuf_and_grpc_flow_spans_are_counted_with_resource_dimensions() {
    let app = start(test_config()).await;
    post_protobuf(
        &app,
        &request(vec![flow_span(1, "web", "api", [100, 2000], [2, 3])]),
    )
    .await;
    let endpoint = format!("http://{}", app.otlp_grpc.unwrap());
    let mut grpc = TraceServiceClient::connect(endpoint).await.unwrap();
    grpc.export(request(vec![
        flow_span(2, "web", "api", [50, 0], [1, 0]),
        // A plain span beside them: not a record.
        Span {
            name: "GET /".into(),
            attributes: vec![s("flow.direction", "initiator")],
            ..Default::default()
        },
    ]))
    .await
    .unwrap();
    let m = scrape(&app).await;
    let l = |d| default_labels(d, "tcp", "web", "api");
    assert_eq!(network(&m, "bytes", &l(Some("forward"))), 150.0);
    assert_eq!(network(&m, "bytes", &l(Some("reverse"))), 2000.0);
    assert_eq!(network(&m, "packets", &l(Some("forward"))), 3.0);
    assert_eq!(network(&m, "packets", &l(Some("reverse"))), 3.0);
    assert_eq!(network(&m, "flow_records", &l(None)), 2.0);
    assert_eq!(
        value(&m, "flowmetrics_otlp_spans_total{transport=\"grpc\"}"),
        2.0
    );
    app.shutdown().await;
}

#[tokio::test]
async fn a_flow_span_with_flow_events_counts_as_both() {
    let app = start(test_config()).await;
    let mut span = flow_span(3, "web", "api", [10, 20], [1, 1]);
    span.events
        .push(otlp::flow_event("flow.checkout.start", "c1", None, 5));
    post_protobuf(&app, &request(vec![span.clone()])).await;
    let mut json_span = span;
    json_span.trace_id = vec![4; 16];
    json_span.events[0].attributes = vec![s("correlation-id", "c2")];
    post_json(
        &app,
        "traces",
        serde_json::to_string(&request(vec![json_span])).unwrap(),
    )
    .await;
    let m = scrape(&app).await;
    let l = default_labels(None, "tcp", "web", "api");
    assert_eq!(network(&m, "flow_records", &l), 2.0);
    assert_eq!(
        value(&m, "flowmetrics_flows_started_total{flow=\"checkout\"}"),
        2.0
    );
    app.shutdown().await;
}

#[tokio::test]
async fn retried_exports_count_once_on_every_path() {
    let app = start(test_config()).await;
    let req = request(vec![flow_span(5, "web", "db", [7, 9], [1, 1])]);
    for _ in 0..3 {
        post_protobuf(&app, &req).await;
    }
    let json = serde_json::to_string(&req).unwrap();
    post_json(&app, "traces", json).await;
    let endpoint = format!("http://{}", app.otlp_grpc.unwrap());
    let mut grpc = TraceServiceClient::connect(endpoint).await.unwrap();
    grpc.export(req.clone()).await.unwrap();
    // A new window of the same span is a new record.
    let mut next = req.clone();
    next.resource_spans[0].scope_spans[0].spans[0].start_time_unix_nano = 2_000;
    next.resource_spans[0].scope_spans[0].spans[0].end_time_unix_nano = 3_000;
    post_protobuf(&app, &next).await;
    let m = scrape(&app).await;
    let l = |d| default_labels(d, "tcp", "web", "db");
    assert_eq!(network(&m, "flow_records", &l(None)), 2.0);
    assert_eq!(network(&m, "bytes", &l(Some("forward"))), 14.0);
    app.shutdown().await;
}

#[tokio::test]
async fn dimension_overrides_try_attributes_in_order() {
    let mut config = test_config();
    config.network_flows.dimensions = vec![
        NetworkDimension {
            label: "src".into(),
            attribute: vec!["source.k8s.pod.name".into(), "source.address".into()],
            default: None,
        },
        NetworkDimension {
            label: "proto.name".into(),
            attribute: vec!["network.protocol.name".into()],
            default: Some("other".into()),
        },
    ];
    let app = start(config).await;
    let mut with_pod = flow_span(6, "web", "api", [1, 0], [0, 0]);
    with_pod.attributes.push(s("source.k8s.pod.name", "web-1"));
    post_protobuf(
        &app,
        &request(vec![with_pod, flow_span(7, "web", "api", [2, 0], [0, 0])]),
    )
    .await;
    let m = scrape(&app).await;
    let bytes = |src: &str| {
        value(
            &m,
            &format!(
                "flowmetrics_network_bytes_total{{direction=\"forward\",src=\"{src}\",proto_name=\"other\"}}"
            ),
        )
    };
    assert_eq!(bytes("web-1"), 1.0);
    assert_eq!(bytes("10.0.0.1"), 2.0);
    app.shutdown().await;
}

#[tokio::test]
async fn the_series_limit_folds_new_label_sets_into_the_overflow_series() {
    let mut config = test_config();
    config.limits.max_series_per_metric = 2;
    let app = start(config).await;
    let spans = (0..5)
        .map(|i| flow_span(10 + i, &format!("w{i}"), "api", [1, 1], [1, 1]))
        .collect();
    post_protobuf(&app, &request(spans)).await;
    let m = scrape(&app).await;
    let records: Vec<_> = m
        .keys()
        .filter(|k| k.starts_with("flowmetrics_network_flow_records_total"))
        .collect();
    assert_eq!(records.len(), 3, "{records:?}");
    assert_values(
        &m,
        &[
            (
                r#"flowmetrics_network_flow_records_total{otel_metric_overflow="true"}"#,
                3.0,
            ),
            (
                r#"flowmetrics_series_overflow_total{metric="flowmetrics_network_flow_records_total"}"#,
                3.0,
            ),
        ],
    );
    // bytes: w0 forward + reverse fill it; everything else is folded (4 × 2 + 0).
    assert_eq!(
        value(
            &m,
            "flowmetrics_network_bytes_total{otel_metric_overflow=\"true\"}"
        ),
        8.0
    );
    app.shutdown().await;
}

#[tokio::test]
async fn unusable_deltas_are_rejected_as_invalid_network_flow() {
    let app = start(test_config()).await;
    let mut bad = flow_span(20, "web", "api", [0, 0], [0, 0]);
    bad.attributes = vec![
        s("flow.community_id", "1:x"),
        s("flow.bytes.delta", "lots"),
        int_attr("flow.packets.delta", -4),
    ];
    let mut partial = flow_span(21, "web", "api", [0, 0], [0, 0]);
    partial.attributes = vec![
        s("flow.bytes.delta", "12"),
        int_attr("flow.reverse.bytes.delta", 30),
    ];
    post_protobuf(&app, &request(vec![bad, partial])).await;
    let m = scrape(&app).await;
    assert_eq!(
        value(
            &m,
            "flowmetrics_flow_events_rejected_total{reason=\"invalid_network_flow\"}"
        ),
        1.0
    );
    let l = |d: Option<&str>| {
        let d = d.map_or(String::new(), |d| format!("direction=\"{d}\","));
        format!(
            "{{{d}transport=\"unknown\",source_workload=\"unknown\",source_namespace=\"shop\",\
             destination_workload=\"unknown\",destination_namespace=\"shop\"}}"
        )
    };
    assert_eq!(network(&m, "flow_records", &l(None)), 1.0);
    assert_eq!(network(&m, "bytes", &l(Some("forward"))), 0.0);
    assert_eq!(network(&m, "bytes", &l(Some("reverse"))), 30.0);
    app.shutdown().await;
}

#[tokio::test]
async fn disabled_network_flows_expose_nothing() {
    let env = vec![(
        "FLOWMETRICS_NETWORK_FLOWS__ENABLED".to_string(),
        "false".to_string(),
    )];
    let loaded = Config::load(None, env).unwrap();
    assert!(!loaded.network_flows.enabled);
    let mut config = test_config();
    config.network_flows = loaded.network_flows;
    let app = start(config).await;
    let req = request(vec![flow_span(30, "web", "api", [1, 1], [1, 1])]);
    post_protobuf(&app, &req).await;
    post_json(&app, "traces", serde_json::to_string(&req).unwrap()).await;
    let text = scrape_text(&app).await;
    assert!(!text.contains("flowmetrics_network_"), "{text}");
    assert!(!text.contains("invalid_network_flow"), "{text}");
    app.shutdown().await;
}

#[tokio::test]
async fn enum_names_are_accepted_in_traces_and_logs_json() {
    let app = start(test_config()).await;
    let traces = r#"{"resourceSpans":[{"scopeSpans":[{"spans":[{
        "traceId":"0102030405060708090a0b0c0d0e0f10","spanId":"0102030405060708",
        "name":"pay","kind":"SPAN_KIND_SERVER","status":{"code":"STATUS_CODE_ERROR"},
        "events":[
          {"name":"flow.pay.start","timeUnixNano":"1","attributes":[{"key":"correlation-id","value":{"stringValue":"p1"}}]},
          {"name":"flow.pay.end","timeUnixNano":"2","attributes":[{"key":"correlation-id","value":{"stringValue":"p1"}}]}
        ]}]}]}]}"#;
    post_json(&app, "traces", traces.into()).await;
    let logs = r#"{"resourceLogs":[{"scopeLogs":[{"logRecords":[
        {"eventName":"flow.ship.start","severityNumber":"SEVERITY_NUMBER_INFO","timeUnixNano":"1",
         "attributes":[{"key":"correlation-id","value":{"stringValue":"s1"}}]},
        {"eventName":"flow.ship.end","severityNumber":"SEVERITY_NUMBER_ERROR","timeUnixNano":"2",
         "attributes":[{"key":"correlation-id","value":{"stringValue":"s1"}}]}
    ]}]}]}"#;
    post_json(&app, "logs", logs.into()).await;
    let m = scrape(&app).await;
    // Status ERROR and severity ERROR, read from their names, make both failures.
    for flow in ["pay", "ship"] {
        assert_eq!(
            value(
                &m,
                &format!(
                    "flowmetrics_flows_completed_total{{flow=\"{flow}\",outcome=\"failure\"}}"
                )
            ),
            1.0,
            "{flow}: {m:?}"
        );
    }
    let url = format!("http://{}/v1/traces", app.otlp_http.unwrap());
    let bad = r#"{"resourceSpans":[{"scopeSpans":[{"spans":[{"kind":"SPAN_KIND_NOPE"}]}]}]}"#;
    let r = post(&url, "application/json", bad).await;
    assert_eq!(r.status, StatusCode::BAD_REQUEST);
    app.shutdown().await;
}

#[tokio::test]
async fn each_resource_labels_its_own_flow_spans() {
    // Two resources in one export, two Flow Spans each: a resource's attributes are
    // read once for its spans, and never carried over to the next resource's.
    let app = start(test_config()).await;
    let mut req = request(vec![
        flow_span(5, "web", "api", [10, 0], [1, 0]),
        flow_span(6, "web", "api", [20, 0], [1, 0]),
    ]);
    let mut other = request(vec![
        flow_span(7, "web", "api", [30, 0], [1, 0]),
        flow_span(8, "web", "api", [40, 0], [1, 0]),
    ])
    .resource_spans
    .remove(0);
    other.resource.as_mut().unwrap().attributes = vec![
        s("source.k8s.namespace.name", "billing"),
        s("destination.k8s.namespace.name", "billing"),
    ];
    req.resource_spans.push(other);
    post_protobuf(&app, &req).await;
    let m = scrape(&app).await;
    let shop = default_labels(Some("forward"), "tcp", "web", "api");
    let billing = shop.replace("\"shop\"", "\"billing\"");
    assert_eq!(network(&m, "bytes", &shop), 30.0);
    assert_eq!(network(&m, "bytes", &billing), 70.0);
    app.shutdown().await;
}
