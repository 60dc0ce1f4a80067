//! Flow objectives and overdue instances (docs/behaviour.md §10) on the in-process
//! store, through OTLP/HTTP on loopback: the objective gauges, `within` among the
//! duration buckets, and exact overdue counts from controlled start timestamps.

mod common;

use std::time::Duration;

use common::otlp::{self, now_nanos, SEC};
use common::*;
use flowmetrics::config::{FlowOverride, Objective};
use prost::Message;

/// (event name, correlation id, timestamp).
async fn send(app: &flowmetrics::RunningApp, events: &[(String, String, u64)]) {
    let spans = events
        .iter()
        .map(|(name, id, ts)| {
            let event = otlp::flow_event(name.clone(), id, None, *ts);
            otlp::span(&[3; 16], &[4; 8], vec![event])
        })
        .collect();
    export_ok(app, PROTOBUF, otlp::traces(None, spans).encode_to_vec()).await;
}

fn starts(flow: &str, prefix: &str, ages_secs: &[u64], now: u64) -> Vec<(String, String, u64)> {
    ages_secs
        .iter()
        .enumerate()
        .map(|(i, age)| {
            (
                format!("flow.{flow}.start"),
                format!("{prefix}-{i}"),
                now - age * SEC,
            )
        })
        .collect()
}

fn end(flow: &str, id: &str, ts: u64) -> (String, String, u64) {
    (format!("flow.{flow}.end"), id.to_string(), ts)
}

fn objective(target: f64, within: Option<u64>) -> Option<Objective> {
    Some(Objective {
        target,
        within: within.map(Duration::from_secs),
    })
}

#[tokio::test]
async fn objective_gauges_and_exact_overdue_counts() {
    let mut config = test_config();
    let flows = &mut config.flows.per_flow;
    flows.insert(
        "checkout".into(),
        FlowOverride {
            timeout: Some(Duration::from_secs(600)),
            objective: objective(0.99, Some(45)),
            ..FlowOverride::default()
        },
    );
    flows.insert(
        "refund".into(),
        FlowOverride {
            objective: objective(0.95, None),
            ..FlowOverride::default()
        },
    );
    flows.insert(
        "orders".into(),
        FlowOverride {
            overdue_after: Some(Duration::from_secs(60)),
            ..FlowOverride::default()
        },
    );
    let app = start(config).await;

    // Named flows: gauges from the start, overdue at 0 within a second or two.
    let m = scrape_until(&app, Duration::from_secs(5), |m| {
        m.contains_key(r#"flowmetrics_flows_overdue{flow="checkout"}"#)
    })
    .await;
    assert_present(
        &m,
        &[
            (
                r#"flowmetrics_flow_objective_target{flow="checkout"}"#,
                0.99,
            ),
            (
                r#"flowmetrics_flow_objective_seconds{flow="checkout"}"#,
                45.0,
            ),
            (r#"flowmetrics_flow_objective_target{flow="refund"}"#, 0.95),
        ],
    );
    // No `within`: no seconds gauge, and (no overdue_after either) no overdue series.
    assert!(!m.contains_key(r#"flowmetrics_flow_objective_seconds{flow="refund"}"#));
    assert!(!m.contains_key(r#"flowmetrics_flows_overdue{flow="refund"}"#));
    // overdue_after without an objective: overdue series, no objective gauges.
    assert!(!m.contains_key(r#"flowmetrics_flow_objective_target{flow="orders"}"#));
    assert_present(
        &m,
        &[
            (r#"flowmetrics_flows_overdue{flow="orders"}"#, 0.0),
            (
                r#"flowmetrics_flow_oldest_open_seconds{flow="orders"}"#,
                0.0,
            ),
        ],
    );

    let now = now_nanos();
    let mut events = starts("checkout", "c", &[120, 120, 120, 60, 60, 5, 5, 5, 5], now);
    events.extend(starts("orders", "o", &[90, 90, 10], now));
    events.extend(starts("refund", "r", &[1000], now));
    events.extend(starts("other", "x", &[1000], now));
    send(&app, &events).await;

    let checkout = r#"flowmetrics_flows_overdue{flow="checkout"}"#;
    let oldest = r#"flowmetrics_flow_oldest_open_seconds{flow="checkout"}"#;
    let m = scrape_until(&app, Duration::from_secs(5), |m| {
        value(m, checkout) == 5.0 && value(m, r#"flowmetrics_flows_overdue{flow="orders"}"#) == 2.0
    })
    .await;
    assert_eq!(value(&m, checkout), 5.0, "3 at 120 s and 2 at 60 s > 45 s");
    assert_eq!(
        value(&m, r#"flowmetrics_flows_overdue{flow="orders"}"#),
        2.0
    );
    let age = value(&m, oldest);
    assert!((120.0..=124.0).contains(&age), "oldest {age}");
    assert!(!m.contains_key(r#"flowmetrics_flows_overdue{flow="other"}"#));
    assert!(!m.contains_key(r#"flowmetrics_flows_overdue{flow="refund"}"#));

    // Closed instances leave the count; the youngest stay out of it.
    let later = now_nanos();
    send(
        &app,
        &[
            end("checkout", "c-0", later),
            end("checkout", "c-1", later),
            end("checkout", "c-3", later),
            end("checkout", "c-5", later),
        ],
    )
    .await;
    let m = scrape_until_value(&app, Duration::from_secs(5), checkout, 2.0).await;
    assert_eq!(value(&m, checkout), 2.0, "one at 120 s and one at 60 s");
    assert!(value(&m, oldest) >= 120.0);
    send(&app, &[end("checkout", "c-2", later)]).await;
    let m = scrape_until_value(&app, Duration::from_secs(5), checkout, 1.0).await;
    let age = value(&m, oldest);
    assert!(
        (60.0..=66.0).contains(&age),
        "oldest now the 60 s one: {age}"
    );
    app.shutdown().await;
}

#[tokio::test]
async fn a_default_objective_applies_to_every_flow_from_its_first_event() {
    let mut config = test_config();
    config.flows.default.objective = objective(0.9, Some(2));
    let app = start(config).await;
    let m = scrape(&app).await;
    assert!(
        !m.keys()
            .any(|k| k.starts_with("flowmetrics_flow_objective")),
        "no flow seen yet, no objective series"
    );
    let now = now_nanos();
    send(
        &app,
        &[
            ("flow.anything.start".into(), "a".into(), now - 10 * SEC),
            ("flow.anything.end".into(), "a".into(), now - 9 * SEC),
            ("flow.anything.start".into(), "b".into(), now - 3 * SEC),
        ],
    )
    .await;
    let m = scrape_until(&app, Duration::from_secs(5), |m| {
        value(m, r#"flowmetrics_flows_overdue{flow="anything"}"#) == 1.0
    })
    .await;
    assert_present(
        &m,
        &[
            (r#"flowmetrics_flow_objective_target{flow="anything"}"#, 0.9),
            (
                r#"flowmetrics_flow_objective_seconds{flow="anything"}"#,
                2.0,
            ),
            // `within` (2 s) is a bucket bound although the default buckets skip from 1 to 2.5.
            (
                r#"flowmetrics_flow_duration_seconds_bucket{le="2.0",flow="anything"}"#,
                1.0,
            ),
        ],
    );
    assert_eq!(
        value(&m, r#"flowmetrics_flows_overdue{flow="anything"}"#),
        1.0,
        "the 3 s old instance is past 2 s"
    );
    app.shutdown().await;
}

/// Instances leave the count however they leave: timed out, evicted from a full store;
/// and restored ones (state file) count again after a restart.
#[tokio::test]
async fn time_outs_evictions_and_restarts_keep_the_count_exact() {
    let dir = std::env::temp_dir().join(format!("fm-objectives-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let config = || {
        let mut config = test_config();
        config.limits.max_in_flight = 10;
        config.state.path = dir.join("state").display().to_string();
        let overdue = |timeout| FlowOverride {
            timeout: Some(Duration::from_secs(timeout)),
            overdue_after: Some(Duration::from_secs(5)),
            ..FlowOverride::default()
        };
        config.flows.per_flow.insert("t".into(), overdue(1));
        config.flows.per_flow.insert("e".into(), overdue(600));
        config.flows.per_flow.insert("r".into(), overdue(600));
        config
    };
    let overdue = |flow: &str| format!(r#"flowmetrics_flows_overdue{{flow="{flow}"}}"#);
    let app = start(config()).await;
    let now = now_nanos();

    // Time-outs: three overdue instances, gone once their 1 s timeout passes.
    send(&app, &starts("t", "t", &[60, 60, 60], now)).await;
    scrape_until_value(&app, Duration::from_secs(5), &overdue("t"), 3.0).await;
    let m = scrape_until(&app, Duration::from_secs(8), |m| {
        value(m, &overdue("t")) == 0.0
            && value(
                m,
                r#"flowmetrics_flow_errors_total{flow="t",error_reason="incomplete"}"#,
            ) == 3.0
    })
    .await;
    assert_eq!(value(&m, &overdue("t")), 0.0, "timed out: no longer open");

    // Evictions: a full store (10 entries) drops the oldest for new ones.
    send(&app, &starts("e", "e", &[60; 6], now)).await;
    scrape_until_value(&app, Duration::from_secs(5), &overdue("e"), 6.0).await;
    send(&app, &starts("other", "x", &[0; 10], now_nanos())).await;
    let m = scrape_until(&app, Duration::from_secs(8), |m| {
        value(
            m,
            r#"flowmetrics_flows_dropped_total{flow="e",reason="capacity"}"#,
        ) == 6.0
            && value(m, &overdue("e")) == 0.0
    })
    .await;
    assert_eq!(
        value(
            &m,
            r#"flowmetrics_flows_dropped_total{flow="e",reason="capacity"}"#
        ),
        6.0
    );
    assert_eq!(value(&m, &overdue("e")), 0.0, "evicted: no longer open");

    // Restarts: open instances written at shutdown count again once read back.
    send(&app, &starts("r", "r", &[60, 60, 1], now_nanos())).await;
    scrape_until_value(&app, Duration::from_secs(5), &overdue("r"), 2.0).await;
    app.shutdown().await;
    let app = start(config()).await;
    let m = scrape_until_value(&app, Duration::from_secs(5), &overdue("r"), 2.0).await;
    assert_eq!(
        value(&m, r#"flowmetrics_flows_restored_total{flow="r"}"#),
        3.0
    );
    assert_eq!(
        value(&m, &overdue("r")),
        2.0,
        "restored with their start timestamps"
    );
    app.shutdown().await;
    let _ = std::fs::remove_dir_all(&dir);
}
