//! Dimensions, per-flow settings, cardinality limits and retry dedup, through HTTP.

mod common;

use std::time::Duration;

use common::attr as s;
use common::otlp::{self, SEC};
use common::*;
use opentelemetry_proto::tonic::common::v1::KeyValue;
use opentelemetry_proto::tonic::trace::v1::Span;
use prost::Message;

const PB: &str = PROTOBUF;

struct Ev<'a> {
    name: &'a str,
    id: &'a str,
    ts: u64,
    event_attrs: Vec<KeyValue>,
    span_attrs: Vec<KeyValue>,
}

fn ev<'a>(name: &'a str, id: &'a str, ts: u64) -> Ev<'a> {
    Ev {
        name,
        id,
        ts,
        event_attrs: vec![],
        span_attrs: vec![],
    }
}

fn export(resource: Vec<KeyValue>, events: Vec<Ev<'_>>) -> Vec<u8> {
    let spans = events
        .into_iter()
        .map(|e| {
            let mut attributes = vec![s("correlation-id", e.id)];
            attributes.extend(e.event_attrs);
            let event = otlp::event(e.name, e.ts, attributes);
            Span {
                attributes: e.span_attrs,
                ..otlp::span(&[3; 16], &[4; 8], vec![event])
            }
        })
        .collect();
    otlp::traces(Some(resource), spans).encode_to_vec()
}

async fn send(app: &flowmetrics::RunningApp, body: Vec<u8>) {
    export_ok(app, PB, body).await;
}

#[tokio::test]
async fn dimensions_lookup_order_defaults_and_end_first_instances() {
    let mut config = test_config();
    config.dimensions = serde_yaml::from_str(
        "- { label: service, attribute: service.name, default: unknown }\n\
         - { label: tier, attribute: tier, default: none }\n\
         - { label: region, attribute: cloud.region, from: end }\n",
    )
    .unwrap();
    let app = start(config).await;
    let resource = vec![
        s("service.name", "order-service"),
        s("tier", "from-resource"),
    ];
    // Start 1: tier on the span beats the resource; the event beats both.
    let mut a = ev("flow.buy.start", "1", 10 * SEC);
    a.span_attrs = vec![s("tier", "from-span")];
    let mut b = ev("flow.buy.start", "2", 10 * SEC);
    b.span_attrs = vec![s("tier", "from-span")];
    b.event_attrs = vec![s("tier", "gold")];
    send(&app, export(resource.clone(), vec![a, b])).await;
    // Start 3 has no resource at all: defaults.
    send(
        &app,
        export(vec![], vec![ev("flow.buy.start", "3", 10 * SEC)]),
    )
    .await;
    // Instance 4's end arrives first, from another service, carrying the region.
    let mut end4 = ev("flow.buy.end", "4", 12 * SEC);
    end4.event_attrs = vec![s("cloud.region", "eu-west-1")];
    send(
        &app,
        export(vec![s("service.name", "fulfillment")], vec![end4]),
    )
    .await;
    send(
        &app,
        export(resource.clone(), vec![ev("flow.buy.start", "4", 10 * SEC)]),
    )
    .await;

    let m = scrape(&app).await;
    assert_values(
        &m,
        &[
            (
                r#"flowmetrics_flows_started_total{flow="buy",service="order-service",tier="from-span"}"#,
                1.0,
            ),
            (
                r#"flowmetrics_flows_started_total{flow="buy",service="order-service",tier="gold"}"#,
                1.0,
            ),
            (
                r#"flowmetrics_flows_started_total{flow="buy",service="unknown",tier="none"}"#,
                1.0,
            ),
            (
                r#"flowmetrics_flows_started_total{flow="buy",service="order-service",tier="from-resource"}"#,
                1.0,
            ),
            // The end-first instance carries its start's dimensions, and the end's region.
            (
                r#"flowmetrics_flows_completed_total{flow="buy",outcome="success",service="order-service",tier="from-resource",region="eu-west-1"}"#,
                1.0,
            ),
            (
                r#"flowmetrics_flow_duration_seconds_count{flow="buy",service="order-service",tier="from-resource",region="eu-west-1"}"#,
                1.0,
            ),
            // in_progress is per flow only.
            (r#"flowmetrics_flows_in_progress{flow="buy"}"#, 3.0),
        ],
    );
    app.shutdown().await;
}

#[tokio::test]
async fn per_flow_settings_and_unknown_flows() {
    let mut config = test_config();
    config.flows.allow_unknown = false;
    config.flows.per_flow =
        serde_yaml::from_str("quick: { timeout: 300ms, buckets: [0.5, 1, 2] }\nslow: {}\n")
            .unwrap();
    let app = start(config).await;
    send(
        &app,
        export(
            vec![],
            vec![
                ev("flow.quick.start", "q1", 10 * SEC),
                ev("flow.quick.start", "q2", 10 * SEC),
                ev("flow.slow.start", "s1", 10 * SEC),
                ev("flow.other.start", "o1", 10 * SEC),
            ],
        ),
    )
    .await;
    send(
        &app,
        export(
            vec![],
            vec![
                ev("flow.quick.end", "q1", 11 * SEC),
                ev("flow.slow.end", "s1", 11 * SEC),
            ],
        ),
    )
    .await;
    let series = r#"flowmetrics_flow_errors_total{flow="quick",error_reason="incomplete"}"#;
    let m = scrape_until_value(&app, Duration::from_secs(5), series, 1.0).await;
    assert_values(
        &m,
        &[
            (r#"flowmetrics_flows_in_progress{flow="slow"}"#, 0.0),
            (
                r#"flowmetrics_flow_events_rejected_total{reason="unknown_flow"}"#,
                1.0,
            ),
            (r#"flowmetrics_flows_started_total{flow="other"}"#, 0.0),
            // Per-flow buckets for quick, the defaults for slow: one valid family.
            (
                r#"flowmetrics_flow_duration_seconds_bucket{le="2.0",flow="quick"}"#,
                1.0,
            ),
        ],
    );
    assert!(
        !m.contains_key(r#"flowmetrics_flow_duration_seconds_bucket{le="3600.0",flow="quick"}"#)
    );
    assert_eq!(
        value(
            &m,
            r#"flowmetrics_flow_duration_seconds_bucket{le="3600.0",flow="slow"}"#
        ),
        1.0
    );
    app.shutdown().await;
}

fn rss_bytes() -> u64 {
    let status = std::fs::read_to_string("/proc/self/status").unwrap();
    let kb: u64 = status
        .lines()
        .find_map(|l| l.strip_prefix("VmRSS:"))
        .and_then(|v| v.trim().trim_end_matches(" kB").trim().parse().ok())
        .unwrap();
    kb * 1024
}

/// A flood of distinct flow names and dimension values: every family stops at the limit
/// plus one overflow series, and memory stops growing.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_flood_of_flow_names_is_bounded() {
    const LIMIT: usize = 1000;
    const NAMES: usize = 100_000;
    const BATCH: usize = 1000;
    let mut config = test_config();
    config.limits.max_series_per_metric = LIMIT;
    config.dimensions = serde_yaml::from_str("- { label: user, attribute: user.id }\n").unwrap();
    let app = start(config).await;
    let mut rss_half = 0;
    for batch in 0..NAMES / BATCH {
        let names: Vec<String> = (0..BATCH)
            .map(|i| format!("flow.f{}.start", batch * BATCH + i))
            .collect();
        let ends: Vec<String> = (0..BATCH)
            .map(|i| format!("flow.f{}.end", batch * BATCH + i))
            .collect();
        let user: Vec<String> = (0..BATCH)
            .map(|i| format!("u{}", batch * BATCH + i))
            .collect();
        for names in [&names, &ends] {
            let events = names
                .iter()
                .zip(&user)
                .map(|(n, u)| {
                    let mut e = ev(n, "id", 10 * SEC);
                    e.event_attrs = vec![s("user.id", u)];
                    e
                })
                .collect::<Vec<_>>();
            send(&app, export(vec![], events)).await;
        }
        if batch == NAMES / BATCH / 2 {
            rss_half = rss_bytes();
        }
    }
    let rss_end = rss_bytes();
    for (family, series) in app.pipeline.metrics().series_counts() {
        if [
            "flows_started",
            "flows_completed",
            "flow_duration",
            "flows_in_progress",
        ]
        .contains(&family)
        {
            assert_eq!(series, LIMIT + 1, "{family}");
        }
    }
    let text = scrape_text(&app).await;
    let started_series = text
        .lines()
        .filter(|l| l.starts_with("flowmetrics_flows_started_total{"))
        .count();
    assert_eq!(started_series, LIMIT + 1);
    let m = parse_samples(&text);
    assert_values(
        &m,
        &[
            (
                r#"flowmetrics_flows_started_total{otel_metric_overflow="true"}"#,
                (NAMES - LIMIT) as f64,
            ),
            (
                r#"flowmetrics_series_overflow_total{metric="flowmetrics_flows_started_total"}"#,
                (NAMES - LIMIT) as f64,
            ),
        ],
    );
    // The second half of the flood (50,000 more names) must not grow memory materially.
    let growth = rss_end.saturating_sub(rss_half);
    assert!(
        growth < 24 * 1024 * 1024,
        "RSS grew {growth} bytes over the second half"
    );
    app.shutdown().await;
}

#[tokio::test]
async fn retried_exports_count_once_and_reused_ids_count_again() {
    let app = start(test_config()).await;
    let start_batch = export(
        vec![],
        vec![
            ev("flow.pay.start", "p1", 10 * SEC),
            ev("flow.pay.start", "p2", 10 * SEC),
        ],
    );
    let end_batch = export(vec![], vec![ev("flow.pay.end", "p1", 11 * SEC)]);
    send(&app, start_batch.clone()).await;
    send(&app, start_batch.clone()).await; // retried before completion
    send(&app, end_batch.clone()).await;
    send(&app, end_batch.clone()).await; // retried after completion
    send(&app, start_batch.clone()).await; // the start batch again, after p1 closed
    let m = scrape(&app).await;
    assert_values(
        &m,
        &[
            (r#"flowmetrics_flows_started_total{flow="pay"}"#, 2.0),
            (
                r#"flowmetrics_flows_completed_total{flow="pay",outcome="success"}"#,
                1.0,
            ),
            (r#"flowmetrics_flows_in_progress{flow="pay"}"#, 1.0),
            (
                r#"flowmetrics_flow_events_duplicate_total{kind="start"}"#,
                4.0,
            ),
            (
                r#"flowmetrics_flow_events_duplicate_total{kind="end"}"#,
                1.0,
            ),
        ],
    );
    // p1 reused for a new order, with new timestamps: a second instance.
    send(
        &app,
        export(vec![], vec![ev("flow.pay.start", "p1", 20 * SEC)]),
    )
    .await;
    send(
        &app,
        export(vec![], vec![ev("flow.pay.end", "p1", 25 * SEC)]),
    )
    .await;
    let m = scrape(&app).await;
    assert_values(
        &m,
        &[
            (r#"flowmetrics_flows_started_total{flow="pay"}"#, 3.0),
            (
                r#"flowmetrics_flows_completed_total{flow="pay",outcome="success"}"#,
                2.0,
            ),
            (r#"flowmetrics_flow_duration_seconds_sum{flow="pay"}"#, 6.0),
        ],
    );
    app.shutdown().await;
}
