//! The whole `/metrics` exposition, with every kind of series flowmetrics can produce,
//! must parse with a real OpenMetrics parser (prometheus_client's reference parser;
//! `scripts/test.sh` installs it).

mod common;

use std::collections::BTreeMap;
use std::process::Command;
use std::time::Duration;

use common::*;
use serde_json::Value;

fn parse_with_reference_parser(text: &str) -> BTreeMap<String, Value> {
    let path =
        std::env::temp_dir().join(format!("flowmetrics-exposition-{}.txt", std::process::id()));
    std::fs::write(&path, text).unwrap();
    let script = concat!(env!("CARGO_MANIFEST_DIR"), "/scripts/check_openmetrics.py");
    let out = Command::new("python3")
        .arg(script)
        .arg(&path)
        .output()
        .expect("python3 runs (scripts/test.sh installs the test prerequisites)");
    let _ = std::fs::remove_file(&path);
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(
        !stderr.contains("No module named"),
        "the OpenMetrics reference parser is missing: run scripts/test.sh, or `pip install prometheus-client`\n{stderr}"
    );
    assert!(out.status.success(), "{stderr}\n--- exposition ---\n{text}");
    serde_json::from_slice(&out.stdout).unwrap()
}

fn json_event(
    name: &str,
    id: &str,
    outcome: Option<&str>,
    ts: u64,
    span: &str,
    attrs: &str,
) -> String {
    let outcome = outcome
        .map(|o| format!(r#",{{"key":"outcome","value":{{"stringValue":"{o}"}}}}"#))
        .unwrap_or_default();
    format!(
        r#"{{"resourceSpans":[{{"resource":{{"attributes":[{{"key":"service.name","value":{{"stringValue":"shop"}}}}]}},
        "scopeSpans":[{{"spans":[{{"traceId":"0af7651916cd43dd8448eb211c80319c","spanId":"{span}","attributes":[{attrs}],
        "events":[{{"timeUnixNano":"{ts}","name":"{name}","attributes":[{{"key":"correlation-id","value":{{"stringValue":"{id}"}}}}{outcome}]}}]}}]}}]}}]}}"#
    )
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn full_exposition_parses_with_the_reference_parser() {
    let mut config = test_config();
    config.flows.default.timeout = Duration::from_millis(300);
    config.limits.max_series_per_metric = 3;
    config.limits.max_in_flight = 50;
    // Every flow under an objective (target and seconds gauges), and the overdue gauges.
    config.flows.default.objective = Some(flowmetrics::config::Objective {
        target: 0.99,
        within: Some(Duration::from_secs(2)),
    });
    config.dimensions = serde_yaml::from_str(
        "- { label: service, attribute: service.name, default: unknown }\n\
         - { label: region, attribute: cloud.region, from: end }\n",
    )
    .unwrap();
    let app = start(config).await;
    let url = format!("http://{}/v1/traces", app.otlp_http.unwrap());
    let region = r#"{"key":"cloud.region","value":{"stringValue":"eu-west-1"}}"#;
    let s = 1_000_000_000u64;
    for (i, flow) in ["a", "b", "c", "d", "e"].iter().enumerate() {
        let id = format!("id-{i}");
        post(
            &url,
            "application/json",
            json_event(
                &format!("flow.{flow}.start"),
                &id,
                None,
                10 * s,
                "00f067aa0ba902b7",
                "",
            ),
        )
        .await;
        post(
            &url,
            "application/json",
            json_event(
                &format!("flow.{flow}.end"),
                &id,
                Some("success"),
                12 * s,
                "00f067aa0ba902b8",
                region,
            ),
        )
        .await;
    }
    // failure, cancelled, negative duration, incomplete, unmatched, rejected, duplicate.
    for (name, id, outcome, ts, span) in [
        ("flow.a.start", "f", None, 10 * s, "1111111111111111"),
        (
            "flow.a.end",
            "f",
            Some("failed"),
            11 * s,
            "1111111111111112",
        ),
        ("flow.a.start", "n", None, 10 * s, "1111111111111111"),
        (
            "flow.a.end",
            "n",
            Some("success"),
            9 * s,
            "1111111111111112",
        ),
        ("flow.a.start", "late", None, 10 * s, "1111111111111111"),
        ("flow.a.end", "lonely", None, 10 * s, "1111111111111111"),
        (
            "flow.a.end",
            "bad",
            Some("nope"),
            10 * s,
            "1111111111111111",
        ),
        (
            "flow.a.end",
            "f",
            Some("failed"),
            11 * s,
            "1111111111111112",
        ),
    ] {
        post(
            &url,
            "application/json",
            json_event(name, id, outcome, ts, span, ""),
        )
        .await;
    }
    let _ = scrape_until(&app, Duration::from_secs(5), |m| {
        value(m, r#"flowmetrics_flow_unmatched_ends_total{flow="a"}"#) >= 1.0
            && m.contains_key(r#"flowmetrics_flows_overdue{flow="a"}"#)
    })
    .await;

    let text = scrape_text(&app).await;
    if std::env::var_os("PRINT_EXPOSITION").is_some() {
        println!("{text}");
    }
    let families = parse_with_reference_parser(&text);
    for (family, kind) in [
        ("flowmetrics_flows_started", "counter"),
        ("flowmetrics_flows_completed", "counter"),
        ("flowmetrics_flow_errors", "counter"),
        ("flowmetrics_flow_duration_seconds", "histogram"),
        ("flowmetrics_flows_in_progress", "gauge"),
        ("flowmetrics_flow_unmatched_ends", "counter"),
        ("flowmetrics_flow_negative_durations", "counter"),
        ("flowmetrics_flow_events", "counter"),
        ("flowmetrics_flow_events_rejected", "counter"),
        ("flowmetrics_flow_events_duplicate", "counter"),
        ("flowmetrics_otlp_requests", "counter"),
        ("flowmetrics_otlp_spans", "counter"),
        ("flowmetrics_in_flight_entries", "gauge"),
        ("flowmetrics_series_overflow", "counter"),
        ("flowmetrics_build_info", "gauge"),
        ("flowmetrics_flow_objective_target", "gauge"),
        ("flowmetrics_flow_objective_seconds", "gauge"),
        ("flowmetrics_flows_overdue", "gauge"),
        ("flowmetrics_flow_oldest_open_seconds", "gauge"),
        ("process_resident_memory_bytes", "gauge"),
        ("process_cpu_seconds", "counter"),
    ] {
        let f = families
            .get(family)
            .unwrap_or_else(|| panic!("{family} missing:\n{text}"));
        assert_eq!(f["type"], kind, "{family}");
        assert!(
            !f["help"].as_str().unwrap().is_empty(),
            "{family} has no HELP"
        );
    }
    // Exemplars parse, carry the end event's ids, and stay within 128 characters.
    for family in [
        "flowmetrics_flow_duration_seconds",
        "flowmetrics_flows_completed",
    ] {
        let exemplars = families[family]["exemplars"].as_array().unwrap();
        assert!(!exemplars.is_empty(), "{family} has no exemplar");
        let labels = &exemplars[0]["labels"];
        assert_eq!(labels["trace_id"], "0af7651916cd43dd8448eb211c80319c");
        assert!(
            labels["span_id"]
                .as_str()
                .unwrap()
                .starts_with("00f067aa0ba902b")
                || labels["span_id"] == "1111111111111112"
        );
        let size: usize = labels
            .as_object()
            .unwrap()
            .iter()
            .map(|(k, v)| k.len() + v.as_str().unwrap().len())
            .sum();
        assert!(size <= 128);
    }
    // The overflow series is there, labelled per the OpenTelemetry convention.
    assert!(
        text.contains(r#"flowmetrics_flows_started_total{otel_metric_overflow="true"}"#),
        "{text}"
    );
    app.shutdown().await;
}
