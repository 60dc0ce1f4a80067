//! OTLP/gRPC over loopback: traces and logs feed the same pipeline as HTTP, metrics are
//! discarded, and bad input gets the codes of docs/behaviour.md §6.

mod common;

use bytes::Bytes;
use common::attr as s;
use common::otlp::{self, flow_spans, SEC};
use common::*;
use http_body_util::{BodyExt, Full};
use opentelemetry_proto::tonic::collector::logs::v1::logs_service_client::LogsServiceClient;
use opentelemetry_proto::tonic::collector::logs::v1::ExportLogsServiceRequest;
use opentelemetry_proto::tonic::collector::metrics::v1::metrics_service_client::MetricsServiceClient;
use opentelemetry_proto::tonic::collector::metrics::v1::ExportMetricsServiceRequest;
use opentelemetry_proto::tonic::collector::trace::v1::trace_service_client::TraceServiceClient;
use opentelemetry_proto::tonic::common::v1::{any_value, AnyValue};
use opentelemetry_proto::tonic::logs::v1::{LogRecord, ResourceLogs, ScopeLogs};
use prost::Message;
use tonic::codec::CompressionEncoding;

fn log_events(records: Vec<LogRecord>) -> ExportLogsServiceRequest {
    ExportLogsServiceRequest {
        resource_logs: vec![ResourceLogs {
            scope_logs: vec![ScopeLogs {
                log_records: records,
                ..Default::default()
            }],
            ..Default::default()
        }],
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn traces_and_logs_over_grpc_with_compression() {
    let app = start(test_config()).await;
    let endpoint = format!("http://{}", app.otlp_grpc.unwrap());
    let mut traces = TraceServiceClient::connect(endpoint.clone())
        .await
        .unwrap()
        .send_compressed(CompressionEncoding::Gzip);
    let reply = traces
        .export(otlp::traces(
            None,
            flow_spans(&[
                ("flow.ship.start", "a", None, 10 * SEC),
                ("flow.ship.start", "b", None, 10 * SEC),
            ]),
        ))
        .await
        .unwrap()
        .into_inner();
    assert!(reply.partial_success.is_none());

    // The end of "a" arrives as a log record (event_name), zstd-compressed; the end of
    // "b" as a log record named by its `event.name` attribute, with an ERROR severity
    // and no outcome, so it counts as a failure.
    let mut logs = LogsServiceClient::connect(endpoint.clone())
        .await
        .unwrap()
        .send_compressed(CompressionEncoding::Zstd);
    let records = vec![
        LogRecord {
            event_name: "flow.ship.end".into(),
            time_unix_nano: 12 * SEC,
            attributes: vec![s("correlation-id", "a"), s("outcome", "ok")],
            trace_id: vec![1; 16],
            span_id: vec![2; 8],
            ..Default::default()
        },
        LogRecord {
            observed_time_unix_nano: 13 * SEC,
            severity_number: 17,
            attributes: vec![s("event.name", "flow.ship.end"), s("correlation-id", "b")],
            ..Default::default()
        },
        // Not flow events: no name, or a flow name without a correlation id.
        LogRecord {
            body: Some(AnyValue {
                value: Some(any_value::Value::StringValue("hello".into())),
            }),
            ..Default::default()
        },
        LogRecord {
            event_name: "flow.ship.end".into(),
            ..Default::default()
        },
    ];
    let reply = logs.export(log_events(records)).await.unwrap().into_inner();
    let partial = reply.partial_success.expect("one rejected");
    assert_eq!(partial.rejected_log_records, 0);
    assert_eq!(
        partial.error_message,
        "1 flow event rejected: 1 missing correlation id"
    );

    let mut metrics = MetricsServiceClient::connect(endpoint).await.unwrap();
    metrics
        .export(ExportMetricsServiceRequest::default())
        .await
        .unwrap();

    let m = scrape(&app).await;
    let get = |k: &str| value(&m, k);
    assert_values(
        &m,
        &[
            (r#"flowmetrics_flows_started_total{flow="ship"}"#, 2.0),
            (
                r#"flowmetrics_flows_completed_total{flow="ship",outcome="success"}"#,
                1.0,
            ),
            (
                r#"flowmetrics_flows_completed_total{flow="ship",outcome="failure"}"#,
                1.0,
            ),
            (r#"flowmetrics_flow_duration_seconds_sum{flow="ship"}"#, 2.0),
            (
                r#"flowmetrics_flow_events_total{kind="end",source="log"}"#,
                2.0,
            ),
            (
                r#"flowmetrics_flow_events_rejected_total{reason="missing_correlation_id"}"#,
                1.0,
            ),
            (
                r#"flowmetrics_otlp_log_records_total{transport="grpc"}"#,
                4.0,
            ),
            (r#"flowmetrics_otlp_spans_total{transport="grpc"}"#, 2.0),
        ],
    );
    for signal in ["traces", "logs", "metrics"] {
        let key = format!(
            r#"flowmetrics_otlp_requests_total{{transport="grpc",signal="{signal}",code="OK"}}"#
        );
        assert_eq!(get(&key), 1.0, "{key}");
    }
    // The log end's own trace and span became the exemplar.
    let text = scrape_text(&app).await;
    assert!(
        text.contains(r#"trace_id="01010101010101010101010101010101",span_id="0202020202020202""#)
    );
    app.shutdown().await;
}

/// A raw gRPC call: (grpc-status, grpc-message) of the answer.
async fn raw_call(
    app: &flowmetrics::RunningApp,
    path: &str,
    encoding: Option<&str>,
    frame: Vec<u8>,
) -> (String, String) {
    let client = http_client(true);
    let mut req = hyper::Request::post(format!("http://{}{path}", app.otlp_grpc.unwrap()))
        .header("content-type", "application/grpc")
        .header("te", "trailers");
    if let Some(e) = encoding {
        req = req.header("grpc-encoding", e);
    }
    let response = client
        .request(req.body(Full::new(Bytes::from(frame))).unwrap())
        .await
        .unwrap();
    let headers = response.headers().clone();
    let collected = response.into_body().collect().await.unwrap();
    let trailers = collected.trailers().cloned().unwrap_or_default();
    let pick = |k: &str| {
        headers
            .get(k)
            .or_else(|| trailers.get(k))
            .map(|v| v.to_str().unwrap().to_string())
            .unwrap_or_default()
    };
    (pick("grpc-status"), pick("grpc-message"))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn bad_grpc_input_gets_spec_codes_and_changes_nothing() {
    let mut config = test_config();
    config.limits.max_request_body_bytes = 64 * 1024;
    let app = start(config).await;

    // Malformed protobuf → INVALID_ARGUMENT (3).
    let (code, message) = raw_call(
        &app,
        TRACE_EXPORT,
        None,
        grpc_frame(false, b"\xff\xff\xff\xff"),
    )
    .await;
    assert_eq!(code, "3", "{message}");
    // Oversized message → RESOURCE_EXHAUSTED (8).
    let (code, _) = raw_call(
        &app,
        TRACE_EXPORT,
        None,
        grpc_frame(false, &vec![0u8; 70 * 1024]),
    )
    .await;
    assert_eq!(code, "8");
    // A gzip bomb → RESOURCE_EXHAUSTED.
    let mut gz = flate2::write::GzEncoder::new(Vec::new(), flate2::Compression::best());
    std::io::Write::write_all(&mut gz, &vec![0u8; 20 * 1024 * 1024]).unwrap();
    let (code, _) = raw_call(
        &app,
        TRACE_EXPORT,
        Some("gzip"),
        grpc_frame(true, &gz.finish().unwrap()),
    )
    .await;
    assert_eq!(code, "8");
    // Corrupt gzip → INVALID_ARGUMENT.
    let (code, _) = raw_call(
        &app,
        TRACE_EXPORT,
        Some("gzip"),
        grpc_frame(true, b"\x1f\x8bjunk"),
    )
    .await;
    assert_eq!(code, "3");
    // Unknown compression → UNIMPLEMENTED (12), as gRPC specifies.
    let (code, _) = raw_call(&app, TRACE_EXPORT, Some("br"), grpc_frame(true, b"xx")).await;
    assert_eq!(code, "12");
    // Unknown method → UNIMPLEMENTED.
    let (code, _) = raw_call(&app, "/foo.Bar/Baz", None, grpc_frame(false, b"")).await;
    assert_eq!(code, "12");
    // A valid message still works afterwards.
    let ok = otlp::traces(None, flow_spans(&[("flow.g.start", "1", None, SEC)])).encode_to_vec();
    let (code, _) = raw_call(&app, TRACE_EXPORT, None, grpc_frame(false, &ok)).await;
    assert_eq!(code, "0");

    let m = scrape(&app).await;
    assert_values(
        &m,
        &[
            (r#"flowmetrics_flows_started_total{flow="g"}"#, 1.0),
            (
                r#"flowmetrics_otlp_requests_total{transport="grpc",signal="traces",code="INVALID_ARGUMENT"}"#,
                2.0,
            ),
            (
                r#"flowmetrics_otlp_requests_total{transport="grpc",signal="traces",code="RESOURCE_EXHAUSTED"}"#,
                2.0,
            ),
        ],
    );
    app.shutdown().await;
}
