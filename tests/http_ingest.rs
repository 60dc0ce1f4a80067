//! OTLP/HTTP over loopback against a real flowmetrics: the seed's curl bodies, every
//! body format and encoding, every error status of docs/behaviour.md §6, and a concurrent load
//! whose counters must match exactly what was sent.

mod common;

use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use common::attr as s;
use common::otlp::{self, deflate, gzip};
use common::*;
use hyper::{Method, StatusCode};
use opentelemetry_proto::tonic::collector::trace::v1::{
    ExportTraceServiceRequest, ExportTraceServiceResponse,
};
use prost::Message;

fn seed_body(event: &str, id: &str, outcome: Option<&str>, ts_secs: u64, service: &str) -> String {
    let outcome = outcome
        .map(|o| format!(r#", {{"key": "outcome", "value": {{ "stringValue": "{o}" }}}}"#))
        .unwrap_or_default();
    // The shape of the curl examples in the Go connector's README, verbatim apart from
    // the substituted values.
    format!(
        r#"{{
        "resourceSpans": [{{
            "resource": {{
            "attributes": [{{
                "key": "service.name",
                "value": {{ "stringValue": "{service}" }}
            }}]
            }},
            "scopeSpans": [{{
            "spans": [{{
                "traceId": "99999999999999999999999999999999",
                "spanId": "1111111111111111",
                "name": "create-order",
                "startTimeUnixNano": "{ts_secs}000000000",
                "endTimeUnixNano": "{ts_secs}000000000",
                "events": [{{
                "timeUnixNano": "{ts_secs}000000000",
                "name": "{event}",
                "attributes": [{{
                    "key": "correlation-id",
                    "value": {{ "stringValue": "{id}" }}
                }}{outcome}]
                }}]
            }}]
            }}]
        }}]
        }}"#
    )
}

/// One span per event under a resource of service `test`: (event name, correlation id,
/// outcome, timestamp ns).
fn request(events: &[(&str, &str, Option<&str>, u64)]) -> ExportTraceServiceRequest {
    otlp::traces(
        Some(vec![s("service.name", "test")]),
        otlp::flow_spans(events),
    )
}

const PB: &str = "application/x-protobuf";
const JSON: &str = "application/json";
const SEC: u64 = 1_000_000_000;

#[tokio::test]
async fn seed_curl_examples_work_unchanged() {
    let app = start(test_config()).await;
    let url = traces_url(&app);
    let now = 1_700_000_000;
    for body in [
        seed_body(
            "flow.order_processing.start",
            "order-001",
            None,
            now,
            "order-service",
        ),
        seed_body(
            "flow.order_processing.end",
            "order-001",
            Some("success"),
            now + 2,
            "fulfillment-service",
        ),
        seed_body(
            "flow.order_processing.end",
            "order-002",
            Some("cancelled"),
            now + 3,
            "fulfillment-service",
        ),
    ] {
        let r = post(&url, JSON, body).await;
        assert_eq!(r.status, StatusCode::OK, "{}", r.text());
        assert_eq!(r.headers["content-type"], JSON);
        assert_eq!(r.text(), "{}");
    }
    // The cancelled end for a second order pairs once its start arrives.
    post(
        &url,
        JSON,
        seed_body(
            "flow.order_processing.start",
            "order-002",
            None,
            now,
            "order-service",
        ),
    )
    .await;
    let m = scrape(&app).await;
    assert_values(
        &m,
        &[
            (
                r#"flowmetrics_flows_started_total{flow="order_processing"}"#,
                2.0,
            ),
            (
                r#"flowmetrics_flows_completed_total{flow="order_processing",outcome="success"}"#,
                1.0,
            ),
            (
                r#"flowmetrics_flows_completed_total{flow="order_processing",outcome="cancelled"}"#,
                1.0,
            ),
            (
                r#"flowmetrics_flow_duration_seconds_count{flow="order_processing"}"#,
                1.0,
            ),
            (
                r#"flowmetrics_flow_duration_seconds_sum{flow="order_processing"}"#,
                2.0,
            ),
            (
                r#"flowmetrics_flows_in_progress{flow="order_processing"}"#,
                0.0,
            ),
            (
                r#"flowmetrics_otlp_requests_total{transport="http",signal="traces",code="200"}"#,
                4.0,
            ),
            (
                r#"flowmetrics_flow_events_total{kind="start",source="span_event"}"#,
                2.0,
            ),
        ],
    );
    app.shutdown().await;
}

#[tokio::test]
async fn protobuf_in_every_encoding() {
    let app = start(test_config()).await;
    let url = traces_url(&app);
    type Compress = fn(&[u8]) -> Vec<u8>;
    let encodings: [(&str, Compress); 4] = [
        ("identity", |b| b.to_vec()),
        ("gzip", gzip),
        ("deflate", deflate),
        ("zstd", |b| zstd::encode_all(b, 3).unwrap()),
    ];
    for (i, (encoding, compress)) in encodings.iter().enumerate() {
        let id = format!("o-{i}");
        let body = request(&[
            ("flow.pay.start", &id, None, 10 * SEC),
            ("flow.pay.end", &id, Some("failure"), 11 * SEC),
        ])
        .encode_to_vec();
        let r = request_with(&url, PB, encoding, compress(&body)).await;
        assert_eq!(r.status, StatusCode::OK, "{encoding}: {}", r.text());
        assert_eq!(r.headers["content-type"], PB);
        let reply = ExportTraceServiceResponse::decode(&r.body[..]).unwrap();
        assert!(reply.partial_success.is_none());
    }
    let m = scrape(&app).await;
    assert_values(
        &m,
        &[
            (
                r#"flowmetrics_flows_completed_total{flow="pay",outcome="failure"}"#,
                4.0,
            ),
            (
                r#"flowmetrics_flow_errors_total{flow="pay",error_reason="failure"}"#,
                4.0,
            ),
            (
                r#"flowmetrics_flow_duration_seconds_count{flow="pay"}"#,
                0.0,
            ),
        ],
    );
    app.shutdown().await;
}

async fn request_with(url: &str, content_type: &str, encoding: &str, body: Vec<u8>) -> Reply {
    common::request(
        Method::POST,
        url,
        &[
            ("content-type", content_type),
            ("content-encoding", encoding),
        ],
        body,
    )
    .await
}

#[tokio::test]
async fn rejected_events_get_partial_success_and_counters() {
    let app = start(test_config()).await;
    let url = traces_url(&app);
    let mut req = request(&[
        ("flow.ok.start", "1", None, SEC),
        ("flow.ok.end", "1", Some("done"), 2 * SEC),
        ("flow.bad name.start", "2", None, SEC),
    ]);
    // An event with no correlation id anywhere.
    req.resource_spans[0].scope_spans[0].spans[0].events.push(
        opentelemetry_proto::tonic::trace::v1::span::Event {
            name: "flow.ok.start".into(),
            time_unix_nano: SEC,
            ..Default::default()
        },
    );
    let r = post(&url, PB, req.encode_to_vec()).await;
    assert_eq!(r.status, StatusCode::OK);
    let reply = ExportTraceServiceResponse::decode(&r.body[..]).unwrap();
    let partial = reply.partial_success.expect("partial success");
    assert_eq!(partial.rejected_spans, 0);
    assert_eq!(
        partial.error_message,
        "3 flow events rejected: 1 missing correlation id, 1 invalid outcome \"done\", 1 invalid flow name"
    );
    // JSON answers carry the same in JSON.
    let json = post(
        &url,
        JSON,
        seed_body("flow.x.end", "9", Some("maybe"), 5, "svc"),
    )
    .await;
    assert_eq!(json.status, StatusCode::OK);
    assert!(
        json.text()
            .contains(r#""errorMessage":"1 flow event rejected: 1 invalid outcome \"maybe\"""#),
        "{}",
        json.text()
    );
    let m = scrape(&app).await;
    assert_values(
        &m,
        &[
            (
                r#"flowmetrics_flow_events_rejected_total{reason="invalid_outcome"}"#,
                2.0,
            ),
            (
                r#"flowmetrics_flow_events_rejected_total{reason="missing_correlation_id"}"#,
                1.0,
            ),
            (
                r#"flowmetrics_flow_events_rejected_total{reason="invalid_flow_name"}"#,
                1.0,
            ),
        ],
    );
    // The valid start in the same request was kept.
    assert_eq!(
        value(&m, r#"flowmetrics_flows_started_total{flow="ok"}"#),
        1.0
    );
    app.shutdown().await;
}

/// Every error answer is a google.rpc.Status in the request's media type.
#[derive(prost::Message)]
struct RpcStatus {
    #[prost(int32, tag = "1")]
    code: i32,
    #[prost(string, tag = "2")]
    message: String,
}

#[tokio::test]
async fn error_statuses() {
    let mut config = test_config();
    config.limits.max_request_body_bytes = 64 * 1024;
    let app = start(config).await;
    let base = format!("http://{}", app.otlp_http.unwrap());
    let url = format!("{base}/v1/traces");

    // 400: undecodable protobuf and JSON.
    let r = post(&url, PB, Bytes::from_static(b"\xff\xff\xff\xff")).await;
    assert_eq!(r.status, StatusCode::BAD_REQUEST);
    let status = RpcStatus::decode(&r.body[..]).unwrap();
    assert_eq!(status.code, 3);
    assert!(status.message.contains("protobuf"), "{}", status.message);
    let r = post(&url, JSON, "{not json").await;
    assert_eq!(r.status, StatusCode::BAD_REQUEST);
    let v: serde_json::Value = serde_json::from_slice(&r.body).unwrap();
    assert_eq!(v["code"], 3);
    // 400: corrupt gzip.
    let r = request_with(&url, PB, "gzip", b"\x1f\x8bnot gzip at all".to_vec()).await;
    assert_eq!(r.status, StatusCode::BAD_REQUEST);

    // 404 and 405.
    let r = post(&format!("{base}/v1/spans"), JSON, "{}").await;
    assert_eq!(r.status, StatusCode::NOT_FOUND);
    let r = common::request(Method::GET, &url, &[("content-type", JSON)], Bytes::new()).await;
    assert_eq!(r.status, StatusCode::METHOD_NOT_ALLOWED);
    assert_eq!(r.headers["allow"], "POST");

    // 415: media type and content encoding.
    let r = post(&url, "text/plain", "hi").await;
    assert_eq!(r.status, StatusCode::UNSUPPORTED_MEDIA_TYPE);
    let r = request_with(&url, PB, "br", vec![1, 2, 3]).await;
    assert_eq!(r.status, StatusCode::UNSUPPORTED_MEDIA_TYPE);

    // 413: too large as sent, and too large once decompressed (a gzip bomb).
    let r = post(&url, PB, vec![0u8; 65 * 1024]).await;
    assert_eq!(r.status, StatusCode::PAYLOAD_TOO_LARGE);
    let bomb = gzip(&vec![0u8; 50 * 1024 * 1024]);
    assert!(bomb.len() < 64 * 1024);
    let r = request_with(&url, PB, "gzip", bomb).await;
    assert_eq!(r.status, StatusCode::PAYLOAD_TOO_LARGE);
    assert_eq!(RpcStatus::decode(&r.body[..]).unwrap().code, 8);

    // None of it changed any state; a good request still works.
    let ok = post(
        &url,
        PB,
        request(&[("flow.f.start", "1", None, SEC)]).encode_to_vec(),
    )
    .await;
    assert_eq!(ok.status, StatusCode::OK);
    let series = "flowmetrics_in_flight_entries";
    let m = scrape_until_value(&app, Duration::from_secs(5), series, 1.0).await;
    assert_values(
        &m,
        &[
            (r#"flowmetrics_flows_started_total{flow="f"}"#, 1.0),
            (r#"flowmetrics_in_flight_entries"#, 1.0),
        ],
    );
    // (404s name no signal, so they are not in this family.)
    for code in ["400", "405", "413", "415"] {
        let series = format!(
            r#"flowmetrics_otlp_requests_total{{transport="http",signal="traces",code="{code}"}}"#
        );
        assert!(value(&m, &series) >= 1.0, "{series}");
    }
    app.shutdown().await;
}

#[tokio::test]
async fn metrics_signal_is_accepted_and_discarded() {
    let app = start(test_config()).await;
    let url = format!("http://{}/v1/metrics", app.otlp_http.unwrap());
    let r = post(&url, PB, Bytes::new()).await;
    assert_eq!(r.status, StatusCode::OK);
    let m = scrape(&app).await;
    assert_eq!(
        value(
            &m,
            r#"flowmetrics_otlp_requests_total{transport="http",signal="metrics",code="200"}"#
        ),
        1.0
    );
    app.shutdown().await;
}

#[tokio::test]
async fn admin_endpoints() {
    let app = start(test_config()).await;
    let base = format!("http://{}", app.metrics);
    for (path, want) in [
        ("/healthz", StatusCode::OK),
        ("/readyz", StatusCode::OK),
        ("/", StatusCode::OK),
        ("/nope", StatusCode::NOT_FOUND),
    ] {
        let r = common::request(Method::GET, &format!("{base}{path}"), &[], Bytes::new()).await;
        assert_eq!(r.status, want, "{path}");
    }
    let r = common::request(Method::GET, &format!("{base}/"), &[], Bytes::new()).await;
    assert!(r.text().contains("/metrics"));
    let r = common::request(Method::GET, &format!("{base}/metrics"), &[], Bytes::new()).await;
    assert!(r.headers["content-type"]
        .to_str()
        .unwrap()
        .starts_with("application/openmetrics-text"));
    let text = r.text();
    assert!(text.ends_with("# EOF\n"));
    for family in [
        "process_resident_memory_bytes",
        "process_cpu_seconds_total",
        "process_open_fds",
        "process_start_time_seconds",
        "flowmetrics_build_info{version=",
    ] {
        assert!(text.contains(family), "{family} missing");
    }
    app.shutdown().await;
}

#[tokio::test]
async fn timeouts_count_incomplete_through_the_service() {
    let mut config = test_config();
    config.flows.default.timeout = Duration::from_millis(300);
    let app = start(config).await;
    let url = traces_url(&app);
    post(
        &url,
        PB,
        request(&[
            ("flow.slow.start", "1", None, SEC),
            ("flow.slow.end", "2", None, SEC),
        ])
        .encode_to_vec(),
    )
    .await;
    let m = scrape_until(&app, Duration::from_secs(5), |m| {
        value(
            m,
            r#"flowmetrics_flow_errors_total{flow="slow",error_reason="incomplete"}"#,
        ) == 1.0
            && value(m, r#"flowmetrics_flow_unmatched_ends_total{flow="slow"}"#) == 1.0
    })
    .await;
    assert_values(
        &m,
        &[
            (
                r#"flowmetrics_flow_errors_total{flow="slow",error_reason="incomplete"}"#,
                1.0,
            ),
            (r#"flowmetrics_flow_unmatched_ends_total{flow="slow"}"#, 1.0),
            (r#"flowmetrics_flows_in_progress{flow="slow"}"#, 0.0),
            (r#"flowmetrics_in_flight_entries"#, 0.0),
        ],
    );
    app.shutdown().await;
}

/// Several clients, thousands of flows with known outcomes, ends sometimes before starts
/// and in other requests: the scraped counters must match exactly.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn concurrent_clients_counters_match_exactly() {
    const CLIENTS: usize = 8;
    const FLOWS_PER_CLIENT: usize = 500;
    const BATCH: usize = 50;
    let app = start(test_config()).await;
    let url = traces_url(&app);
    let outcome_of = |i: usize| match i % 10 {
        0..=5 => Some("success"),
        6 | 7 => Some("failure"),
        8 => Some("cancelled"),
        _ => None, // never ends
    };
    let mut tasks = Vec::new();
    for c in 0..CLIENTS {
        let url = url.clone();
        tasks.push(tokio::spawn(async move {
            for batch_start in (0..FLOWS_PER_CLIENT).step_by(BATCH) {
                let ids: Vec<String> = (batch_start..batch_start + BATCH)
                    .map(|i| format!("c{c}-{i}"))
                    .collect();
                let mut starts = Vec::new();
                let mut ends = Vec::new();
                for (k, id) in ids.iter().enumerate() {
                    let i = batch_start + k;
                    starts.push(("flow.conc.start", id.as_str(), None, 100 * SEC));
                    if let Some(o) = outcome_of(i) {
                        ends.push(("flow.conc.end", id.as_str(), Some(o), 101 * SEC));
                    }
                }
                // Odd batches send their ends first.
                let (first, second) = if (batch_start / BATCH) % 2 == 1 {
                    (ends, starts)
                } else {
                    (starts, ends)
                };
                for part in [first, second] {
                    let r = post(&url, PB, request(&part).encode_to_vec()).await;
                    assert_eq!(r.status, StatusCode::OK);
                }
            }
        }));
    }
    // Scraped all along: every exposition satisfies the invariant of docs/behaviour.md §3.
    let done = Arc::new(std::sync::atomic::AtomicBool::new(false));
    let scraper = {
        let done = done.clone();
        let metrics = format!("http://{}/metrics", app.metrics);
        tokio::spawn(async move {
            let mut scrapes = 0;
            while !done.load(std::sync::atomic::Ordering::Relaxed) || scrapes == 0 {
                let m = parse_samples(
                    &common::request(Method::GET, &metrics, &[], Bytes::new())
                        .await
                        .text(),
                );
                let get = |s: &str| m.get(s).copied().unwrap_or(0.0);
                let started = get(r#"flowmetrics_flows_started_total{flow="conc"}"#);
                let closed: f64 = ["success", "failure", "cancelled"]
                    .iter()
                    .map(|o| {
                        get(&format!(
                            r#"flowmetrics_flows_completed_total{{flow="conc",outcome="{o}"}}"#
                        ))
                    })
                    .sum::<f64>()
                    + get(
                        r#"flowmetrics_flow_errors_total{flow="conc",error_reason="incomplete"}"#,
                    )
                    + get(r#"flowmetrics_flows_dropped_total{flow="conc",reason="capacity"}"#)
                    + get(r#"flowmetrics_flows_in_progress{flow="conc"}"#);
                assert_eq!(started, closed, "invariant broken at scrape {scrapes}");
                scrapes += 1;
            }
            scrapes
        })
    };
    for t in tasks {
        t.await.unwrap();
    }
    done.store(true, std::sync::atomic::Ordering::Relaxed);
    let scrapes = scraper.await.unwrap();
    assert!(scrapes > 0);
    let total = (CLIENTS * FLOWS_PER_CLIENT) as f64;
    let m = scrape(&app).await;
    let get = |s: &str| value(&m, s);
    assert_eq!(
        get(r#"flowmetrics_flows_started_total{flow="conc"}"#),
        total
    );
    assert_eq!(
        get(r#"flowmetrics_flows_completed_total{flow="conc",outcome="success"}"#),
        total * 0.6
    );
    assert_eq!(
        get(r#"flowmetrics_flows_completed_total{flow="conc",outcome="failure"}"#),
        total * 0.2
    );
    assert_eq!(
        get(r#"flowmetrics_flows_completed_total{flow="conc",outcome="cancelled"}"#),
        total * 0.1
    );
    assert_eq!(
        get(r#"flowmetrics_flows_in_progress{flow="conc"}"#),
        total * 0.1
    );
    assert_eq!(
        get(r#"flowmetrics_flow_duration_seconds_count{flow="conc"}"#),
        total * 0.6
    );
    assert_eq!(
        get(r#"flowmetrics_flow_duration_seconds_sum{flow="conc"}"#),
        total * 0.6
    );
    assert_eq!(
        get(r#"flowmetrics_flow_errors_total{flow="conc",error_reason="failure"}"#),
        total * 0.2
    );
    assert_eq!(
        get(r#"flowmetrics_flow_events_duplicate_total{kind="start"}"#),
        0.0
    );
    app.shutdown().await;
}

/// Events without a time take their span's end time, so an export sent twice (an
/// exporter's retry) is recognised as such: one instance, not two. Sent as protobuf
/// (the selective scanner) and as JSON (the full decode), which must agree.
#[tokio::test]
async fn a_retried_export_of_events_without_a_time_is_one_instance() {
    let app = start(test_config()).await;
    let url = traces_url(&app);
    for (flow, media) in [
        ("untimed_pb", "application/x-protobuf"),
        ("untimed_json", "application/json"),
    ] {
        let mut req = request(&[
            (&format!("flow.{flow}.start"), "r-1", None, 0),
            (&format!("flow.{flow}.end"), "r-1", Some("success"), 0),
        ]);
        let spans = &mut req.resource_spans[0].scope_spans[0].spans;
        spans[0].end_time_unix_nano = 1_700_000_000_000_000_000;
        spans[1].end_time_unix_nano = 1_700_000_002_500_000_000;
        let body = if media == "application/json" {
            serde_json::to_vec(&req).unwrap()
        } else {
            req.encode_to_vec()
        };
        for attempt in 0..2 {
            // Apart in time, as a retry is: a receive time would differ.
            tokio::time::sleep(Duration::from_millis(20)).await;
            let r = post(&url, media, body.clone()).await;
            assert_eq!(
                r.status,
                StatusCode::OK,
                "{flow} attempt {attempt}: {}",
                r.text()
            );
        }
        let m = scrape(&app).await;
        let get = |series: String| value(&m, &series);
        assert_eq!(
            get(format!(
                r#"flowmetrics_flows_started_total{{flow="{flow}"}}"#
            )),
            1.0,
            "{flow}"
        );
        assert_eq!(
            get(format!(
                r#"flowmetrics_flow_duration_seconds_sum{{flow="{flow}"}}"#
            )),
            2.5,
            "{flow}: the spans' end times are the events' times"
        );
    }
    let m = scrape(&app).await;
    assert_values(
        &m,
        &[
            (
                r#"flowmetrics_flow_events_duplicate_total{kind="start"}"#,
                2.0,
            ),
            (
                r#"flowmetrics_flow_events_duplicate_total{kind="end"}"#,
                2.0,
            ),
        ],
    );
    app.shutdown().await;
}
