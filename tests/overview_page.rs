//! The live overview on the metrics listener: `/api/flows` (what the page polls) and `/`
//! (the page, carrying the same data for its first paint), over real HTTP.

mod common;

use std::time::Duration;

use bytes::Bytes;
use common::otlp::now_nanos;
use common::{export_ok, get, parse_samples, request, scrape_text, start, sum_series, test_config};
use hyper::{Method, StatusCode};
use serde_json::Value;

/// One OTLP/JSON trace export with one span per event: (event name, correlation id,
/// outcome — for a `.step` event the step — or "", timestamp ns).
fn export(events: &[(&str, &str, &str, u64)]) -> String {
    let spans: Vec<String> = events
        .iter()
        .enumerate()
        .map(|(i, (name, id, outcome, ts))| {
            let mut attrs = format!(r#"{{"key":"correlation-id","value":{{"stringValue":"{id}"}}}}"#);
            if !outcome.is_empty() {
                let key = if name.ends_with(".step") { "step" } else { "outcome" };
                attrs.push_str(&format!(
                    r#",{{"key":"{key}","value":{{"stringValue":"{outcome}"}}}}"#
                ));
            }
            format!(
                r#"{{"traceId":"{:032x}","spanId":"{:016x}","name":"op","startTimeUnixNano":"{ts}","endTimeUnixNano":"{ts}","events":[{{"timeUnixNano":"{ts}","name":"{name}","attributes":[{attrs}]}}]}}"#,
                i + 1,
                i + 1
            )
        })
        .collect();
    format!(
        r#"{{"resourceSpans":[{{"resource":{{"attributes":[]}},"scopeSpans":[{{"spans":[{}]}}]}}]}}"#,
        spans.join(",")
    )
}

async fn send(app: &flowmetrics::RunningApp, body: String) {
    let r = export_ok(app, "application/json", body).await;
    assert!(!r.text().contains("rejected"), "{}", r.text());
}

/// checkout: 4 started; 2 success (0.2 s and 3 s), 1 failure, 1 still open.
/// payment: 1 started, 1 cancelled.
async fn feed(app: &flowmetrics::RunningApp) {
    let t = now_nanos() - 10_000_000_000;
    let s = 1_000_000_000u64;
    send(
        app,
        export(&[
            ("flow.checkout.start", "c1", "", t),
            ("flow.checkout.start", "c2", "", t),
            ("flow.checkout.start", "c3", "", t),
            ("flow.checkout.start", "c4", "", t),
            ("flow.payment.start", "p1", "", t),
        ]),
    )
    .await;
    send(
        app,
        export(&[
            ("flow.checkout.end", "c1", "success", t + s / 5),
            ("flow.checkout.end", "c2", "success", t + 3 * s),
            ("flow.checkout.end", "c3", "failure", t + s),
            ("flow.payment.end", "p1", "cancelled", t + s),
        ]),
    )
    .await;
}

fn row<'a>(report: &'a Value, flow: &str) -> &'a Value {
    report["flows"]
        .as_array()
        .unwrap()
        .iter()
        .find(|f| f["flow"] == flow)
        .unwrap_or_else(|| panic!("no {flow} in {report}"))
}

fn close(v: &Value, want: f64) -> bool {
    v.as_f64().is_some_and(|x| (x - want).abs() < 1e-9)
}

/// `/api/flows`, parsed.
async fn api_flows(app: &flowmetrics::RunningApp) -> Value {
    serde_json::from_slice(&get(app, "/api/flows").await.body).unwrap()
}

/// The data the page carries for its first paint.
fn initial_data(page: &str) -> Value {
    let data = page
        .split_once(r#"<script type="application/json" id="initial-data">"#)
        .and_then(|(_, rest)| rest.split_once("</script>"))
        .map(|(json, _)| json)
        .expect("initial data block");
    serde_json::from_str(data).unwrap()
}

/// The names of a flow's steps, in the order given.
fn step_names(flow: &Value) -> Vec<&str> {
    flow["steps"]
        .as_array()
        .unwrap()
        .iter()
        .map(|s| s["step"].as_str().unwrap())
        .collect()
}

fn check_counts(report: &Value) {
    assert_eq!(report["flow_count"], 2, "{report}");
    let c = row(report, "checkout");
    for (field, want) in [
        ("started", 4),
        ("success", 2),
        ("failure", 1),
        ("cancelled", 0),
        ("incomplete", 0),
        ("in_progress", 1),
        ("dropped", 0),
    ] {
        assert_eq!(c[field], want, "{field}: {c}");
    }
    assert!(close(&c["error_ratio"], 1.0 / 3.0), "{c}");
    // Default buckets: 0.2 s in (0.1, 0.25], 3 s in (2.5, 5]. p50: rank 1 of 2 is the
    // end of the first; p99: rank 1.98, 98% into (2.5, 5].
    assert!(close(&c["p50"], 0.25), "{c}");
    assert!(close(&c["p99"], 2.5 + 2.5 * 0.98), "{c}");
    assert_eq!(
        c["steps"],
        serde_json::json!([]),
        "a flow without steps: {c}"
    );
    let p = row(report, "payment");
    assert_eq!(p["started"], 1, "{p}");
    assert_eq!(p["cancelled"], 1, "{p}");
    assert_eq!(p["in_progress"], 0, "{p}");
    assert!(close(&p["error_ratio"], 0.0), "{p}");
    assert!(p["p50"].is_null(), "no success, no percentile: {p}");
}

#[tokio::test]
async fn api_flows_reports_each_flow_with_its_counts_and_percentiles() {
    let app = start(test_config()).await;

    let r = get(&app, "/api/flows").await;
    assert_eq!(r.status, StatusCode::OK);
    let empty: Value = serde_json::from_slice(&r.body).unwrap();
    assert_eq!(empty["flow_count"], 0, "{empty}");

    feed(&app).await;
    // The last sparkline point runs from the first sample to now; give it some width.
    tokio::time::sleep(Duration::from_millis(700)).await;
    let r = get(&app, "/api/flows").await;
    assert_eq!(r.status, StatusCode::OK);
    assert!(r.headers["content-type"]
        .to_str()
        .unwrap()
        .starts_with("application/json"));
    assert_eq!(r.headers["cache-control"], "no-store");
    let report: Value = serde_json::from_slice(&r.body).unwrap();
    check_counts(&report);
    let c = row(&report, "checkout");
    let spark = c["spark_started"].as_array().unwrap();
    assert!(!spark.is_empty(), "{c}");
    assert!(spark.iter().any(|v| v.as_f64().unwrap() > 0.0), "{c}");
    assert!(c["started_per_second"].is_null() || c["started_per_second"].as_f64().unwrap() > 0.0);
    app.shutdown().await;
}

#[tokio::test]
async fn the_page_is_self_contained_and_carries_the_current_numbers() {
    let app = start(test_config()).await;
    feed(&app).await;
    let r = get(&app, "/").await;
    assert_eq!(r.status, StatusCode::OK);
    assert!(r.headers["content-type"]
        .to_str()
        .unwrap()
        .starts_with("text/html"));
    let csp = r.headers["content-security-policy"].to_str().unwrap();
    assert!(csp.contains("default-src 'none'") && csp.contains("connect-src 'self'"));
    let page = r.text();
    assert!(page.contains(r#"href="/metrics""#), "links to /metrics");
    assert!(
        page.contains(r#"fetch("/api/flows""#),
        "polls its own origin"
    );
    // Nothing from elsewhere: no external script, style sheet, font or image.
    for needle in [
        "<script src",
        "<link",
        "@import",
        "url(",
        "<img",
        "https://",
    ] {
        assert!(!page.contains(needle), "page contains {needle:?}");
    }
    // Flow names only ever reach the DOM as text.
    assert!(!page.contains("innerHTML") && !page.contains("insertAdjacentHTML"));
    check_counts(&initial_data(&page));

    let head = request(
        Method::HEAD,
        &format!("http://{}/api/flows", app.metrics),
        &[],
        Bytes::new(),
    )
    .await;
    assert_eq!(head.status, StatusCode::OK);
    app.shutdown().await;
}

/// The page's totals are the exposition's own numbers: each flow's sum over its series.
#[tokio::test]
async fn api_flows_totals_equal_the_exposition_sums() {
    let app = start(test_config()).await;
    feed(&app).await;
    let text = scrape_text(&app).await;
    let report = api_flows(&app).await;
    let samples = parse_samples(&text);
    let sum = |name: &str, flow: &str, filter: &str| -> f64 {
        sum_series(&samples, name, &[&format!("flow=\"{flow}\""), filter])
    };
    for flow in ["checkout", "payment"] {
        let row = row(&report, flow);
        let checks = [
            ("started", sum("flowmetrics_flows_started_total", flow, "")),
            (
                "success",
                sum(
                    "flowmetrics_flows_completed_total",
                    flow,
                    "outcome=\"success\"",
                ),
            ),
            (
                "failure",
                sum(
                    "flowmetrics_flows_completed_total",
                    flow,
                    "outcome=\"failure\"",
                ),
            ),
            (
                "cancelled",
                sum(
                    "flowmetrics_flows_completed_total",
                    flow,
                    "outcome=\"cancelled\"",
                ),
            ),
            (
                "incomplete",
                sum("flowmetrics_flow_errors_total", flow, "\"incomplete\""),
            ),
            (
                "in_progress",
                sum("flowmetrics_flows_in_progress", flow, ""),
            ),
            ("dropped", sum("flowmetrics_flows_dropped_total", flow, "")),
        ];
        for (field, want) in checks {
            assert_eq!(row[field].as_f64(), Some(want), "{flow} {field}: {row}");
        }
    }
    assert!(row(&report, "checkout")["started"].as_u64().unwrap() > 0);
    app.shutdown().await;
}

/// `order` declares placed → paid → shipped; `ship` uses steps a and b undeclared.
/// Both time out after 1 s: order's o1 stalls at paid, o2 at placed, o3 at start; o4
/// reaches every step and ends. ship's s1 reaches a and b and ends, s2 stalls at a.
async fn feed_journeys(app: &flowmetrics::RunningApp) {
    let t = now_nanos() - 10_000_000_000;
    let ms = 1_000_000u64;
    send(
        app,
        export(&[
            ("flow.order.step", "o1", "placed", t + 1000 * ms),
            ("flow.order.start", "o1", "", t),
            ("flow.order.start", "o2", "", t),
            ("flow.order.start", "o3", "", t),
            ("flow.order.start", "o4", "", t),
            ("flow.order.step", "o1", "paid", t + 2000 * ms),
            ("flow.order.step", "o2", "placed", t + 500 * ms),
            ("flow.order.step", "o4", "placed", t + 500 * ms),
            ("flow.order.step", "o4", "paid", t + 800 * ms),
            ("flow.order.step", "o4", "shipped", t + 900 * ms),
            ("flow.order.end", "o4", "success", t + 1000 * ms),
            ("flow.ship.start", "s1", "", t),
            ("flow.ship.start", "s2", "", t),
            ("flow.ship.step", "s1", "b", t + 200 * ms),
            ("flow.ship.step", "s1", "a", t + 100 * ms),
            ("flow.ship.step", "s2", "a", t + 100 * ms),
            ("flow.ship.end", "s1", "success", t + 300 * ms),
        ]),
    )
    .await;
}

fn step_row<'a>(flow: &'a Value, step: &str) -> &'a Value {
    flow["steps"]
        .as_array()
        .unwrap()
        .iter()
        .find(|s| s["step"] == step)
        .unwrap_or_else(|| panic!("no step {step} in {flow}"))
}

#[tokio::test]
async fn api_flows_shows_each_journey_reached_conversion_median_and_stalls() {
    let mut config = test_config();
    config.flows.default.timeout = Duration::from_secs(1);
    config.flows.per_flow.insert(
        "order".into(),
        flowmetrics::config::FlowOverride {
            steps: Some(vec!["placed".into(), "paid".into(), "shipped".into()]),
            ..Default::default()
        },
    );
    let app = start(config).await;
    feed_journeys(&app).await;
    // Until the time-outs are counted (within 2 s after the 1 s timeout).
    let give_up = std::time::Instant::now() + Duration::from_secs(10);
    let report = loop {
        let report = api_flows(&app).await;
        let done =
            row(&report, "order")["incomplete"] == 3 && row(&report, "ship")["incomplete"] == 1;
        if done || std::time::Instant::now() > give_up {
            break report;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    };
    let order = row(&report, "order");
    assert_eq!(order["started"], 4, "{order}");
    assert_eq!(order["incomplete"], 3, "{order}");
    assert_eq!(
        step_names(order),
        ["placed", "paid", "shipped"],
        "declared order: {order}"
    );
    let placed = step_row(order, "placed");
    assert_eq!(placed["reached"], 3, "{placed}");
    assert!(close(&placed["conversion"], 0.75), "{placed}");
    // 0.5 s, 0.5 s and 1 s: rank 1.5 of 3 lies 3/4 into (0.25, 0.5].
    assert!(close(&placed["p50"], 0.4375), "{placed}");
    assert_eq!(placed["stalled"], 1, "{placed}");
    let paid = step_row(order, "paid");
    assert_eq!(paid["reached"], 2, "{paid}");
    assert!(close(&paid["conversion"], 0.5), "{paid}");
    assert_eq!(paid["stalled"], 1, "{paid}");
    let shipped = step_row(order, "shipped");
    assert_eq!(shipped["reached"], 1, "{shipped}");
    assert_eq!(shipped["stalled"], 0, "{shipped}");
    assert_eq!(order["stalled_at_start"], 1, "{order}");

    // Undeclared: by instances reached, most first.
    let ship = row(&report, "ship");
    assert_eq!(step_names(ship), ["a", "b"], "{ship}");
    assert!(close(&step_row(ship, "a")["conversion"], 1.0), "{ship}");
    assert_eq!(step_row(ship, "a")["stalled"], 1, "{ship}");
    assert!(close(&step_row(ship, "b")["conversion"], 0.5), "{ship}");
    assert_eq!(ship["stalled_at_start"], 0, "{ship}");

    // The same numbers as the exposition's step families.
    let samples = parse_samples(&scrape_text(&app).await);
    let sum = |name: &str, labels: &[&str]| sum_series(&samples, name, labels);
    for (flow, step) in [
        ("order", "placed"),
        ("order", "paid"),
        ("order", "shipped"),
        ("ship", "a"),
        ("ship", "b"),
    ] {
        let f = format!("flow=\"{flow}\"");
        let st = format!("step=\"{step}\"");
        let last = format!("last_step=\"{step}\"");
        let r = step_row(row(&report, flow), step);
        assert_eq!(
            r["reached"].as_f64(),
            Some(sum("flowmetrics_flow_steps_total", &[&f, &st]))
        );
        assert_eq!(
            r["stalled"].as_f64(),
            Some(sum("flowmetrics_flow_stalled_total", &[&f, &last]))
        );
    }

    // The page carries the journeys for its first paint and renders them as tables.
    let page = get(&app, "/").await.text();
    assert!(page.contains(r#"id="journeys""#) && page.contains("renderJourneys"));
    let initial = initial_data(&page);
    assert_eq!(step_row(row(&initial, "order"), "placed")["reached"], 3);
    app.shutdown().await;
}

/// The objective column: checkout (99% within 1 s) had 1 good of 3 counted — burning;
/// payment (50%, any success) counted nothing (one cancelled) — met; search has none.
#[tokio::test]
async fn api_flows_says_whether_each_objective_is_met() {
    use flowmetrics::config::{FlowOverride, Objective};
    let mut config = test_config();
    for (flow, target, within) in [("checkout", 0.99, Some(1)), ("payment", 0.5, None)] {
        config.flows.per_flow.insert(
            flow.into(),
            FlowOverride {
                objective: Some(Objective {
                    target,
                    within: within.map(Duration::from_secs),
                }),
                ..FlowOverride::default()
            },
        );
    }
    let app = start(config).await;
    feed(&app).await;
    let t = now_nanos();
    send(
        &app,
        export(&[
            ("flow.search.start", "s1", "", t),
            ("flow.search.end", "s1", "failure", t),
        ]),
    )
    .await;
    let report = api_flows(&app).await;
    let c = &row(&report, "checkout")["objective"];
    assert_eq!(c["state"], "burning", "{c}");
    assert!(close(&c["target"], 0.99), "{c}");
    assert!(
        close(&c["sli"], 1.0 / 3.0),
        "0.2 s is good, 3 s and the failure not: {c}"
    );
    let p = &row(&report, "payment")["objective"];
    assert_eq!(p["state"], "met", "{p}");
    assert!(
        p["sli"].is_null(),
        "a cancelled instance is not counted: {p}"
    );
    let s = &row(&report, "search")["objective"];
    assert_eq!(s["state"], "none", "{s}");
    assert!(s["target"].is_null(), "{s}");
    // The page renders the column.
    let page = get(&app, "/").await.text();
    assert!(page.contains("<th rowspan=\"2\">objective</th>"));
    app.shutdown().await;
}
