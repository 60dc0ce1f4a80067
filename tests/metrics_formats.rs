//! `/metrics` over loopback: the format by `Accept` (OpenMetrics, text 0.0.4 checked by
//! Prometheus' own promtool and the Python 0.0.4 parser, Prometheus protobuf decoded with
//! the upstream `io.prometheus.client` messages), gzip by `Accept-Encoding`, native
//! histograms in the protobuf format, and label values from clients bounded in bytes.

mod common;

use std::io::{Read as _, Write as _};
use std::process::{Command, Stdio};

use common::attr as s;
use common::otlp::{self, gzip};
use common::*;
use flowmetrics::config::{FlowOverride, HistogramKind};
use hyper::{Method, StatusCode};
use opentelemetry_proto::tonic::collector::trace::v1::ExportTraceServiceRequest;
use opentelemetry_proto::tonic::common::v1::KeyValue;
use opentelemetry_proto::tonic::trace::v1::Span;
use prometheus_client::encoding::prometheus_protobuf::prometheus_data_model::{
    Metric, MetricFamily, MetricType,
};
use prost::Message;

const PROTOBUF: &str =
    "application/vnd.google.protobuf;proto=io.prometheus.client.MetricFamily;encoding=delimited";

/// A start and a success end of `flow`, 0.25 s apart, one span each; `resource` extra
/// attributes on the resource.
fn flow_request(flow: &str, id: &str, resource: Vec<KeyValue>) -> ExportTraceServiceRequest {
    let event = |i: u8, kind: &str, ts: u64| {
        let event = otlp::event(
            format!("flow.{flow}.{kind}"),
            ts,
            vec![s("correlation-id", id)],
        );
        otlp::span(&[0xab; 16], &[i; 8], vec![event])
    };
    let base = 1_700_000_000_000_000_000u64;
    otlp::traces(
        Some(resource),
        vec![event(1, "start", base), event(2, "end", base + 250_000_000)],
    )
}

fn gunzip(b: &[u8]) -> Vec<u8> {
    let mut out = Vec::new();
    flate2::read::GzDecoder::new(b)
        .read_to_end(&mut out)
        .expect("a gzip body");
    out
}

async fn export(app: &flowmetrics::RunningApp, body: ExportTraceServiceRequest) {
    let r = request_raw(
        &traces_url(app),
        Method::POST,
        &[
            ("content-type", "application/x-protobuf"),
            ("content-encoding", "gzip"),
        ],
        gzip(&body.encode_to_vec()),
    )
    .await;
    assert_eq!(r.status, StatusCode::OK, "{}", r.text());
}

async fn request_raw(url: &str, method: Method, headers: &[(&str, &str)], body: Vec<u8>) -> Reply {
    common::request(method, url, headers, body).await
}

async fn scrape_with(app: &flowmetrics::RunningApp, headers: &[(&str, &str)]) -> Reply {
    let r = request_raw(
        &format!("http://{}/metrics", app.metrics),
        Method::GET,
        headers,
        Vec::new(),
    )
    .await;
    assert_eq!(r.status, StatusCode::OK);
    r
}

fn header<'r>(r: &'r Reply, name: &str) -> &'r str {
    r.headers
        .get(name)
        .map(|v| v.to_str().unwrap())
        .unwrap_or("")
}

fn decode_families(mut body: &[u8]) -> Vec<MetricFamily> {
    let mut out = Vec::new();
    while !body.is_empty() {
        out.push(MetricFamily::decode_length_delimited(&mut body).expect("delimited protobuf"));
    }
    out
}

fn label<'m>(m: &'m Metric, name: &str) -> Option<&'m str> {
    m.label
        .iter()
        .find(|l| l.name == name)
        .map(|l| l.value.as_str())
}

/// Runs `program args…` with `input` on stdin; (success, stdout + stderr).
fn run_with_input(program: &str, args: &[&str], input: &[u8]) -> Option<(bool, String)> {
    let mut child = Command::new(program)
        .args(args)
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .ok()?;
    child.stdin.take().unwrap().write_all(input).unwrap();
    let out = child.wait_with_output().unwrap();
    let text = format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    Some((out.status.success(), text))
}

fn app_config() -> flowmetrics::config::Config {
    let mut config = test_config();
    config.flows.per_flow.insert(
        "both".into(),
        FlowOverride {
            histogram: Some(HistogramKind::Both),
            ..FlowOverride::default()
        },
    );
    config.flows.per_flow.insert(
        "native".into(),
        FlowOverride {
            histogram: Some(HistogramKind::Native),
            ..FlowOverride::default()
        },
    );
    config
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_format_follows_accept_and_gzip_follows_accept_encoding() {
    let app = start(app_config()).await;
    for (i, flow) in ["classic", "both", "native"].iter().enumerate() {
        export(&app, flow_request(flow, &format!("id{i}"), vec![])).await;
    }

    // Default and asked-for OpenMetrics: as before.
    for headers in [
        &[][..],
        &[("accept", "application/openmetrics-text; version=1.0.0")][..],
        &[("accept", "text/html")][..],
    ] {
        let r = scrape_with(&app, headers).await;
        assert!(header(&r, "content-type").starts_with("application/openmetrics-text"));
        assert!(r.text().ends_with("# EOF\n"));
        assert!(header(&r, "vary").contains("Accept-Encoding"));
        assert_eq!(header(&r, "content-encoding"), "");
    }

    // 0.0.4 to a scraper that asks only for it, readable by promtool and the Python
    // 0.0.4 parser.
    let r = scrape_with(&app, &[("accept", "text/plain;version=0.0.4")]).await;
    assert_eq!(
        header(&r, "content-type"),
        "text/plain; version=0.0.4; charset=utf-8"
    );
    let text = r.text();
    assert!(!text.contains("# EOF") && !text.contains("# UNIT") && !text.contains(" # {"));
    // Native-only flows show _count, _sum and the +Inf bucket in text.
    assert!(
        text.contains(r#"flowmetrics_flow_duration_seconds_bucket{le="+Inf",flow="native"} 1"#),
        "{text}"
    );
    assert!(!text.contains(r#"le="0.25",flow="native""#), "{text}");
    assert!(text.contains(r#"flowmetrics_flow_duration_seconds_bucket{le="0.25",flow="both"} 1"#));
    // promtool comes with Debian's `prometheus` (.ci/run and scripts/e2e.sh install it);
    // without it this one check is skipped and the test reported as skipped.
    match run_with_input("promtool", &["check", "metrics"], text.as_bytes()) {
        Some((ok, out)) => assert!(
            ok,
            "promtool check metrics:\n{out}\n--- exposition ---\n{text}"
        ),
        None => common::skip("promtool not found (apt-get install prometheus)"),
    }
    let script = concat!(env!("CARGO_MANIFEST_DIR"), "/scripts/check_text004.py");
    let (ok, out) = run_with_input("python3", &[script], text.as_bytes()).expect("python3 runs");
    assert!(
        !out.contains("No module named"),
        "the 0.0.4 parser is missing: run scripts/test.sh\n{out}"
    );
    assert!(ok, "{out}\n--- exposition ---\n{text}");
    let summary: serde_json::Value = serde_json::from_str(&out).unwrap();
    // The parser names a counter family without its `_total`, as OpenMetrics does; a
    // sample outside its family's metadata would show up as an `unknown` family.
    assert_eq!(
        summary["flowmetrics_flows_started"]["type"], "counter",
        "{out}"
    );
    assert_eq!(summary["flowmetrics_flows_started"]["samples"], 3, "{out}");
    assert_eq!(
        summary["flowmetrics_flow_duration_seconds"]["type"],
        "histogram"
    );
    for (family, f) in summary.as_object().unwrap() {
        let kind = f["type"].as_str().unwrap();
        assert!(
            ["counter", "gauge", "histogram"].contains(&kind),
            "{family} is {kind}:\n{out}"
        );
    }

    // Protobuf, gzip'd as Prometheus asks for it.
    let r = scrape_with(
        &app,
        &[
            (
                "accept",
                &format!(
                    "{PROTOBUF};q=0.5,application/openmetrics-text;version=1.0.0;q=0.4,*/*;q=0.1"
                ),
            ),
            ("accept-encoding", "gzip"),
        ],
    )
    .await;
    assert_eq!(
        header(&r, "content-type"),
        "application/vnd.google.protobuf; proto=io.prometheus.client.MetricFamily; encoding=delimited"
    );
    assert_eq!(header(&r, "content-encoding"), "gzip");
    assert!(header(&r, "vary").contains("Accept-Encoding"));
    let families = decode_families(&gunzip(&r.body));
    let duration = families
        .iter()
        .find(|f| f.name == "flowmetrics_flow_duration_seconds")
        .expect("duration family");
    assert_eq!(duration.r#type, MetricType::Histogram as i32);
    let series = |flow: &str| {
        duration
            .metric
            .iter()
            .find(|m| label(m, "flow") == Some(flow))
            .and_then(|m| m.histogram.clone())
            .unwrap_or_else(|| panic!("no {flow} series"))
    };
    let (classic, both, native) = (series("classic"), series("both"), series("native"));
    // Prometheus judges a protobuf histogram family native by its first series: with
    // native flows in the family, a classic flow carries native buckets there too.
    assert_eq!((classic.schema, classic.bucket.len()), (3, 19));
    assert!(!classic.positive_span.is_empty());
    assert_eq!((both.schema, both.bucket.len()), (3, 19));
    assert!(native.bucket.is_empty());
    for h in [&both, &native] {
        assert_eq!((h.sample_count, h.sample_sum), (1, 0.25));
        assert_eq!(h.zero_threshold, 2f64.powi(-128));
        // 0.25 = 2^-2 is the upper bound of native bucket -16 at schema 3.
        assert_eq!(h.positive_span.len(), 1);
        assert_eq!(
            (h.positive_span[0].offset, h.positive_span[0].length),
            (-16, 1)
        );
        assert_eq!(h.positive_delta, [1]);
    }
    let started = families
        .iter()
        .find(|f| f.name == "flowmetrics_flows_started_total")
        .unwrap();
    assert_eq!(started.r#type, MetricType::Counter as i32);
    assert_eq!(started.metric.len(), 3);

    // gzip round trip: the same text, compressed.
    let plain = scrape_with(&app, &[("accept", "text/plain;version=0.0.4")]).await;
    let packed = scrape_with(
        &app,
        &[
            ("accept", "text/plain;version=0.0.4"),
            ("accept-encoding", "deflate, gzip;q=0.8"),
        ],
    )
    .await;
    assert_eq!(header(&packed, "content-encoding"), "gzip");
    let unpacked = String::from_utf8(gunzip(&packed.body)).unwrap();
    let strip_process = |t: &str| {
        t.lines()
            .filter(|l| !l.contains("process_"))
            .collect::<Vec<_>>()
            .join("\n")
    };
    assert_eq!(strip_process(&unpacked), strip_process(&plain.text()));
    assert!(packed.body.len() * 3 < plain.body.len());
    app.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_megabyte_label_value_is_cut_to_the_bound_and_counted() {
    let mut config = test_config();
    config.dimensions =
        serde_yaml::from_str("- { label: service, attribute: service.name, default: unknown }\n")
            .unwrap();
    let app = start(config).await;
    let huge = "x".repeat(1 << 20);
    export(
        &app,
        flow_request("checkout", "big", vec![s("service.name", &huge)]),
    )
    .await;
    // A Flow Span whose source workload (a default network dimension) is as long.
    let flow_span = Span {
        trace_id: vec![7; 16],
        span_id: vec![7; 8],
        name: "flow".into(),
        start_time_unix_nano: 1_000,
        end_time_unix_nano: 2_000,
        attributes: vec![
            int_attr("flow.bytes.delta", 10),
            s("source.k8s.deployment.name", &huge),
        ],
        ..Default::default()
    };
    export(&app, otlp::traces(Some(vec![]), vec![flow_span])).await;

    let r = scrape_with(&app, &[]).await;
    let text = r.text();
    assert!(
        text.len() < 64 * 1024,
        "/metrics is {} bytes after two 1 MiB values",
        text.len()
    );
    let samples = parse_samples(&text);
    let cut = "x".repeat(256);
    assert_eq!(
        value(
            &samples,
            &format!(r#"flowmetrics_flows_started_total{{flow="checkout",service="{cut}"}}"#)
        ),
        1.0,
        "{text}"
    );
    assert_values(
        &samples,
        &[
            (
                r#"flowmetrics_label_values_truncated_total{label="service"}"#,
                1.0,
            ),
            (
                r#"flowmetrics_label_values_truncated_total{label="source_workload"}"#,
                1.0,
            ),
        ],
    );
    let records = samples
        .iter()
        .find(|(k, _)| k.starts_with("flowmetrics_network_flow_records_total{"))
        .expect("a network record series");
    assert!(
        records.0.contains(&format!(r#"source_workload="{cut}""#)),
        "{}",
        records.0
    );
    // No other label was cut, and no longer value is anywhere.
    assert_eq!(
        text.matches("flowmetrics_label_values_truncated_total{")
            .count(),
        2
    );
    assert!(!text.contains(&"x".repeat(257)));
    app.shutdown().await;
}
