//! The whole exposition against a golden text, captured from the prometheus-client
//! encoder this module replaced for the flow families: any change to a name, label,
//! value format, exemplar or line order shows up here.

use std::sync::Arc;

use super::*;
use crate::config::{Config, Dimension, DimensionSource, FlowOverride, HistogramKind, Objective};
use crate::flows::event::Outcome;
use crate::flows::event::TraceRef;
use crate::flows::label_value::LabelBound;
use crate::flows::store::{EndRecord, StepTransit, StepUnmatchedReason};

const GOLDEN: &str = include_str!("testdata/exposition.txt");

fn dims(values: &[&str]) -> DimValues {
    values.iter().map(|v| Arc::from(*v)).collect()
}

fn trace(n: u8) -> Option<TraceRef> {
    TraceRef::from_ids(
        &[n, 1, 2, 3, 4, 5, 6, 7, 8, 9, 0xa, 0xb, 0xc, 0xd, 0xe, 0xff],
        &[0xde, 0xad, 0xbe, 0xef, 0, 1, 2, n],
    )
}

fn config() -> Config {
    let mut config = Config::default();
    config.limits.max_series_per_metric = 4;
    config.dimensions = vec![
        Dimension {
            label: "region".into(),
            attribute: "app.region".into(),
            from: DimensionSource::Start,
            default: None,
        },
        Dimension {
            label: "http.code".into(),
            attribute: "http.code".into(),
            from: DimensionSource::End,
            default: None,
        },
    ];
    // Bounds whose shortest form differs from a naive one (exponents, long fractions).
    config.flows.per_flow.insert(
        "checkout".into(),
        FlowOverride {
            timeout: None,
            steps: None,
            buckets: Some(vec![
                1e-7,
                0.000123,
                0.1,
                0.3,
                1.0,
                2.5,
                123_456_789.125,
                1e15,
                1e16,
                1e21,
            ]),
            histogram: Some(HistogramKind::Both),
            // `within` is added to the buckets (between 1.0 and 2.5).
            objective: Some(Objective {
                target: 0.99,
                within: Some(std::time::Duration::from_secs(2)),
            }),
            ..FlowOverride::default()
        },
    );
    // Declared steps: their series exist from the flow's first event.
    config.flows.per_flow.insert(
        "login".into(),
        FlowOverride {
            histogram: Some(HistogramKind::Native),
            steps: Some(vec!["placed".into(), "paid".into()]),
            ..FlowOverride::default()
        },
    );
    // Every other flow: a target and no `within` (no seconds gauge), from its first event.
    config.flows.default.objective = Some(Objective {
        target: 0.95,
        within: None,
    });
    config
}

/// Drives every kind of report (and the self-metrics) into `m`.
fn record(m: &Metrics) {
    let checkout: Arc<str> = Arc::from("checkout");
    let login: Arc<str> = Arc::from("login");
    let eu = dims(&["eu"]);
    let odd = dims(&["a\"b\\c\nd é}{,="]);
    let ok = dims(&["200"]);
    let failed = dims(&["500"]);
    let end = |outcome, dims: &DimValues, trace| EndRecord {
        outcome,
        timestamp_nanos: 1_750_000_001_000_000_000,
        dims: dims.clone(),
        trace,
    };
    let completed = |flow: &Arc<str>, start_dims: &DimValues, end: &EndRecord, duration_secs| {
        m.report(Report::Completed {
            flow,
            start_dims,
            end,
            duration_secs,
            transits: &[],
        });
    };

    let timed_out = |flow: &Arc<str>, transits: &[StepTransit], last_step: Option<&Arc<str>>| {
        m.report(Report::TimedOut {
            flow,
            start_dims: &eu,
            transits,
            last_step,
        });
    };

    for _ in 0..1234 {
        m.report(Report::Opened {
            flow: &checkout,
            start_dims: &eu,
        });
    }
    m.report(Report::Opened {
        flow: &checkout,
        start_dims: &odd,
    });
    m.report(Report::Opened {
        flow: &login,
        start_dims: &eu,
    });

    // Sums that need 17 digits, values on a bound, past the last bound, tiny and huge.
    completed(&checkout, &eu, &end(Outcome::Success, &ok, trace(1)), 0.1);
    completed(&checkout, &eu, &end(Outcome::Success, &ok, trace(2)), 0.2);
    completed(&checkout, &eu, &end(Outcome::Success, &ok, None), 0.3);
    completed(&checkout, &eu, &end(Outcome::Success, &ok, trace(3)), 2e21);
    completed(&checkout, &eu, &end(Outcome::Success, &ok, trace(4)), 1e-9);
    completed(&checkout, &odd, &end(Outcome::Success, &ok, trace(5)), 7.0);
    // The counter's exemplar is the last increment's: none here.
    completed(&checkout, &odd, &end(Outcome::Success, &ok, None), 0.0);
    let failure = end(Outcome::Failure, &failed, trace(6));
    completed(&checkout, &eu, &failure, 1.5);
    completed(&checkout, &eu, &end(Outcome::Cancelled, &ok, trace(7)), 1.5);
    completed(&checkout, &eu, &end(Outcome::Success, &ok, trace(8)), -0.5);
    completed(&login, &eu, &end(Outcome::Success, &ok, trace(9)), 0.042);
    completed(&login, &eu, &end(Outcome::Success, &ok, None), 0.1);
    completed(&login, &eu, &end(Outcome::Success, &ok, None), 0.2);
    let slow = end(Outcome::Success, &failed, trace(10));
    completed(&login, &eu, &slow, 4000.0);
    // Steps: reached (one before its start: not observed), transits on close, where a
    // timed-out instance stalled, steps that met no instance.
    let paid: Arc<str> = Arc::from("paid");
    let packed: Arc<str> = Arc::from("packed");
    for (flow, step, since, trace) in [
        (&checkout, &paid, 0.25, trace(11)),
        (&checkout, &packed, 2.5, None),
        (&checkout, &paid, -1.0, trace(12)),
        (&login, &paid, 1.0, trace(13)),
    ] {
        m.report(Report::StepReached {
            flow,
            start_dims: &eu,
            step,
            since_start_secs: since,
            trace,
        });
    }
    let transits = [
        StepTransit {
            step: paid.clone(),
            transit_secs: 0.25,
        },
        StepTransit {
            step: packed.clone(),
            transit_secs: 2.25,
        },
    ];
    m.report(Report::Completed {
        flow: &checkout,
        start_dims: &eu,
        end: &end(Outcome::Success, &ok, None),
        duration_secs: 3.0,
        transits: &transits,
    });
    timed_out(&login, &transits[..1], Some(&paid));
    timed_out(&login, &[], None);
    m.report(Report::StepUnmatched {
        flow: &login,
        reason: StepUnmatchedReason::AfterClose,
    });
    m.report(Report::StepUnmatched {
        flow: &checkout,
        reason: StepUnmatchedReason::NoStart,
    });
    m.report(Report::Duplicate {
        kind: EventKind::Step,
    });
    m.event_accepted(EventKind::Step, Source::Log);
    m.report(Report::Dropped {
        flow: &checkout,
        start_dims: &eu,
    });
    m.report(Report::Unmatched {
        flow: &login,
        evicted: false,
    });
    m.report(Report::Duplicate {
        kind: EventKind::Start,
    });
    m.report(Report::Overdue {
        flow: &checkout,
        overdue: 3,
        oldest_open_secs: 42.5,
    });

    // Past the limit of 4 series: the rest folds into the overflow series.
    for i in 0..6u8 {
        let flow: Arc<str> = Arc::from(format!("f{i}"));
        m.report(Report::Opened {
            flow: &flow,
            start_dims: &eu,
        });
        let e = end(Outcome::Success, &ok, trace(20 + i));
        completed(&flow, &eu, &e, f64::from(i) * 0.75);
        timed_out(&flow, &[], None);
        m.report(Report::Unmatched {
            flow: &flow,
            evicted: true,
        });
    }

    m.event_accepted(EventKind::Start, Source::SpanEvent);
    m.event_accepted(EventKind::End(Outcome::Success), Source::Log);
    m.event_rejected(&Rejection::UnknownFlow);
    m.request(Transport::Grpc, Signal::Traces, "OK");
    m.request(Transport::Http, Signal::Logs, "400");
    m.spans_received(Transport::Grpc, 17);
    m.log_records_received(Transport::Http, 3);
    let bound = LabelBound::new(4, m.label_cuts());
    assert_eq!(bound.apply(bound.slot("region"), "eu-west-1"), "eu-w");
}

/// Process metrics dropped (they change from run to run), and the series of each family
/// sorted by their labels (series order follows a randomly seeded hash); a series' own
/// lines (sum, count, buckets) keep their order.
fn normalize(text: &str) -> String {
    fn labels(line: &str) -> &str {
        let line = line.split(" # {").next().unwrap_or(line);
        let labels = match (line.find('{'), line.rfind('}')) {
            (Some(a), Some(b)) => &line[a + 1..b],
            _ => "",
        };
        match labels.strip_prefix("le=\"") {
            Some(rest) => rest.split_once("\",").map_or(rest, |(_, rest)| rest),
            None => labels,
        }
    }
    let mut out = String::new();
    let mut series: Vec<(&str, Vec<&str>)> = Vec::new();
    let flush = |series: &mut Vec<(&str, Vec<&str>)>, out: &mut String| {
        series.sort_by_key(|(key, _)| *key);
        for line in series.drain(..).flat_map(|(_, lines)| lines) {
            out.push_str(line);
            out.push('\n');
        }
    };
    for line in text.lines() {
        let family = ["# HELP ", "# TYPE ", "# UNIT "]
            .iter()
            .find_map(|p| line.strip_prefix(p));
        if line.starts_with("process_") || family.is_some_and(|f| f.starts_with("process_")) {
            continue;
        }
        if line.starts_with('#') {
            flush(&mut series, &mut out);
            out.push_str(line);
            out.push('\n');
            continue;
        }
        let key = labels(line);
        match series.last_mut() {
            Some((last, lines)) if *last == key => lines.push(line),
            _ => series.push((key, vec![line])),
        }
    }
    flush(&mut series, &mut out);
    out
}

#[test]
fn exposition_matches_the_golden_text() {
    let m = Metrics::new(crate::settings::metrics(&config()));
    record(&m);
    let text = m.encode(42);
    assert!(text.ends_with("\n# EOF\n") && text.matches("# EOF").count() == 1);
    let got = normalize(&text);
    if std::env::var_os("UPDATE_GOLDEN").is_some() {
        let path = concat!(
            env!("CARGO_MANIFEST_DIR"),
            "/src/metrics/testdata/exposition.txt"
        );
        std::fs::write(path, &got).expect("write golden");
        return;
    }
    for (i, (got, want)) in got.lines().zip(GOLDEN.lines()).enumerate() {
        assert_eq!(got, want, "line {}", i + 1);
    }
    assert_eq!(got, GOLDEN);
}

#[test]
fn a_family_without_series_is_not_exposed() {
    let text = Metrics::new(crate::settings::metrics(&config())).encode(0);
    for family in [
        "flowmetrics_series_overflow",
        "flowmetrics_flows_started",
        "flowmetrics_flows_completed",
        "flowmetrics_flow_errors",
        "flowmetrics_flow_duration_seconds",
        "flowmetrics_flows_in_progress",
        "flowmetrics_flows_dropped",
        "flowmetrics_flow_unmatched_ends",
        "flowmetrics_flow_negative_durations",
    ] {
        assert!(!text.contains(&format!("{family} ")), "{family}: {text}");
    }
    assert!(
        text.contains("# TYPE flowmetrics_flow_events counter\n"),
        "{text}"
    );
}

#[test]
fn a_new_flow_has_its_outcome_and_error_series_at_zero() {
    let config = Config {
        dimensions: vec![Dimension {
            label: "region".into(),
            attribute: "app.region".into(),
            from: DimensionSource::Start,
            default: None,
        }],
        ..Config::default()
    };
    let m = Metrics::new(crate::settings::metrics(&config));
    let flow: Arc<str> = Arc::from("order");
    m.report(Report::Opened {
        flow: &flow,
        start_dims: &dims(&["eu"]),
    });
    let text = m.encode(1);
    for series in [
        r#"flowmetrics_flows_completed_total{flow="order",outcome="success",region="eu"} 0"#,
        r#"flowmetrics_flows_completed_total{flow="order",outcome="failure",region="eu"} 0"#,
        r#"flowmetrics_flows_completed_total{flow="order",outcome="cancelled",region="eu"} 0"#,
        r#"flowmetrics_flow_errors_total{flow="order",error_reason="failure",region="eu"} 0"#,
        r#"flowmetrics_flow_errors_total{flow="order",error_reason="incomplete",region="eu"} 0"#,
        r#"flowmetrics_flows_started_total{flow="order",region="eu"} 1"#,
        r#"flowmetrics_flows_in_progress{flow="order"} 1"#,
        "flowmetrics_in_flight_capacity 1000000",
    ] {
        assert!(text.contains(&format!("{series}\n")), "{series}\n{text}");
    }
}

#[test]
fn with_end_dimensions_outcomes_appear_with_the_first_end() {
    // The end's labels are unknown at the start: the zero series come with the first
    // end of each (start, end) label set, not with empty end labels.
    let m = Metrics::new(crate::settings::metrics(&config()));
    let flow: Arc<str> = Arc::from("login");
    let (eu, ok) = (dims(&["eu"]), dims(&["200"]));
    m.report(Report::Opened {
        flow: &flow,
        start_dims: &eu,
    });
    let text = m.encode(1);
    assert!(
        !text.contains(r#"flowmetrics_flows_completed_total{flow="login""#),
        "{text}"
    );
    assert!(text.contains(
        "flowmetrics_flow_errors_total{flow=\"login\",error_reason=\"incomplete\",region=\"eu\",http_code=\"\"} 0\n"
    ));
    let end = EndRecord {
        outcome: Outcome::Cancelled,
        timestamp_nanos: 2,
        dims: ok,
        trace: None,
    };
    m.report(Report::Completed {
        flow: &flow,
        start_dims: &eu,
        end: &end,
        duration_secs: 1.0,
        transits: &[],
    });
    let text = m.encode(0);
    for outcome in ["success", "failure"] {
        let series = format!(
            "flowmetrics_flows_completed_total{{flow=\"login\",outcome=\"{outcome}\",region=\"eu\",http_code=\"200\"}} 0\n"
        );
        assert!(text.contains(&series), "{series}{text}");
    }
}

#[test]
fn idle_label_sets_are_removed_from_every_family_and_free_their_place() {
    let mut config = Config::default();
    // Three flows fill flows_completed (three outcome series each).
    config.limits.max_series_per_metric = 9;
    config.limits.series_idle_timeout = Some(std::time::Duration::from_secs(60));
    config.flows.default.timeout = std::time::Duration::from_secs(10);
    let m = Metrics::new(crate::settings::metrics(&config));
    assert_eq!(m.idle_secs, Some(60));
    let none = dims(&[]);
    let run = |m: &Metrics, name: &str, close: bool| {
        let flow: Arc<str> = Arc::from(name);
        m.report(Report::Opened {
            flow: &flow,
            start_dims: &none,
        });
        if close {
            let end = EndRecord {
                outcome: Outcome::Success,
                timestamp_nanos: 2,
                dims: none.clone(),
                trace: None,
            };
            m.report(Report::Completed {
                flow: &flow,
                start_dims: &none,
                end: &end,
                duration_secs: 1.0,
                transits: &[],
            });
        }
    };
    // t = 0: "old" runs once and closes; "open" stays open.
    run(&m, "old", true);
    run(&m, "open", false);
    // t = 100: "busy" is recorded; "old" and "open" have been idle for 100 s.
    m.clock.store(100, Ordering::Relaxed);
    run(&m, "busy", true);
    let removed = m.remove_idle(100 - 60);
    assert!(removed > 0);
    let text = m.encode(1);
    assert!(!text.contains("flow=\"old\""), "{text}");
    assert!(
        text.contains("flowmetrics_flows_started_total{flow=\"busy\"} 1\n"),
        "{text}"
    );
    // The open instance keeps its in-progress series (its label set's counters went:
    // when it closes, they start again from 0, a reset to Prometheus).
    assert!(
        text.contains("flowmetrics_flows_in_progress{flow=\"open\"} 1\n"),
        "{text}"
    );
    // The freed places take new label sets instead of the overflow series.
    run(&m, "new", true);
    let text = m.encode(1);
    assert!(
        text.contains("flowmetrics_flows_started_total{flow=\"new\"} 1\n"),
        "{text}"
    );
    assert!(!text.contains("otel_metric_overflow"), "{text}");
}

mod formats {
    use super::*;
    use prometheus_client::encoding::prometheus_protobuf::prometheus_data_model::{
        Histogram as ProtoHistogram, MetricFamily, MetricType as ProtoType,
    };
    use prost::Message;

    fn families(body: &[u8]) -> Vec<MetricFamily> {
        let mut rest = body;
        let mut out = Vec::new();
        while !rest.is_empty() {
            out.push(MetricFamily::decode_length_delimited(&mut rest).expect("delimited"));
        }
        out
    }

    fn duration_of<'f>(families: &'f [MetricFamily], flow: &str, code: &str) -> &'f ProtoHistogram {
        let family = families
            .iter()
            .find(|f| f.name == "flowmetrics_flow_duration_seconds")
            .expect("duration family");
        assert_eq!(family.r#type, ProtoType::Histogram as i32);
        let label = |m: &&prometheus_client::encoding::prometheus_protobuf::prometheus_data_model::Metric,
                     name: &str| {
            m.label.iter().find(|l| l.name == name).map(|l| l.value.clone())
        };
        family
            .metric
            .iter()
            .find(|m| {
                label(m, "flow").as_deref() == Some(flow)
                    && label(m, "http_code").as_deref() == Some(code)
            })
            .and_then(|m| m.histogram.as_ref())
            .unwrap_or_else(|| panic!("no series for {flow} {code}"))
    }

    #[test]
    fn protobuf_carries_native_classic_and_both() {
        let m = Metrics::new(crate::settings::metrics(&config()));
        record(&m);
        let body = m.encode_format(ExpositionFormat::Protobuf, 42).unwrap();
        let families = families(&body);
        // The text exposition's families, in the same order.
        let text = m.encode(42);
        let names: Vec<&str> = families
            .iter()
            .map(|f| f.name.as_str())
            .filter(|n| !n.starts_with("process_"))
            .collect();
        for name in &names {
            assert!(
                text.contains(&format!("\n{name}")),
                "{name} not in the text"
            );
        }
        assert!(names.contains(&"flowmetrics_label_values_truncated_total"));

        // native only: schema 3 (factor 1.1), the default zero threshold, no classic
        // buckets; 0.042, 0.1, 0.2 in three native buckets.
        let login = duration_of(&families, "login", "200");
        assert_eq!((login.sample_count, login.schema), (3, 3));
        assert!((login.sample_sum - 0.342).abs() < 1e-12);
        assert_eq!(login.zero_threshold, 2f64.powi(-128));
        assert!(login.bucket.is_empty());
        let positive: i64 = login
            .positive_delta
            .iter()
            .scan(0, |c, d| {
                *c += d;
                Some(*c)
            })
            .sum();
        assert_eq!(positive, 3);
        assert_eq!(login.positive_span.iter().map(|s| s.length).sum::<u32>(), 3);
        // 0.042 is in the bucket (2^((i-1)/8), 2^(i/8)]: i = ceil(8·log2(0.042)) = -36.
        assert_eq!(login.positive_span[0].offset, -36);

        // both: the classic buckets and the native ones in one histogram.
        let checkout = duration_of(&families, "checkout", "200");
        assert_eq!(checkout.schema, 3);
        // Ten bounds, the objective's `within` (2 s) and +Inf.
        assert_eq!(checkout.bucket.len(), 12);
        assert!(!checkout.positive_span.is_empty());
        // 0.0 (the odd-region series) lands in the zero bucket.
        let families_odd = families
            .iter()
            .find(|f| f.name == "flowmetrics_flow_duration_seconds")
            .unwrap();
        let odd = families_odd
            .metric
            .iter()
            .find(|m| m.label.iter().any(|l| l.value.starts_with("a\"b")))
            .and_then(|m| m.histogram.as_ref())
            .unwrap();
        assert_eq!(odd.zero_count, 1);

        // classic flows (folded into the overflow series): native buckets too, since
        // Prometheus judges the whole family by its first series.
        let overflow = families_odd
            .metric
            .iter()
            .find(|m| m.label.iter().any(|l| l.name == "otel_metric_overflow"))
            .and_then(|m| m.histogram.as_ref())
            .unwrap();
        assert_eq!((overflow.schema, overflow.bucket.len()), (3, 19));
        assert!(!overflow.positive_span.is_empty());
        for series in &families_odd.metric {
            let h = series.histogram.as_ref().unwrap();
            assert!(h.zero_threshold > 0.0, "every series is native: {series:?}");
        }
    }

    #[test]
    fn protobuf_without_native_flows_is_classic_with_exemplars() {
        let mut config = config();
        config.flows.per_flow.clear();
        let m = Metrics::new(crate::settings::metrics(&config));
        record(&m);
        let families = families(&m.encode_format(ExpositionFormat::Protobuf, 0).unwrap());
        let duration = families
            .iter()
            .find(|f| f.name == "flowmetrics_flow_duration_seconds")
            .unwrap();
        for series in &duration.metric {
            let h = series.histogram.as_ref().unwrap();
            assert!(h.positive_span.is_empty() && h.zero_threshold == 0.0);
            assert_eq!(h.bucket.len(), 19);
        }
        let exemplar = duration
            .metric
            .iter()
            .flat_map(|m| m.histogram.as_ref().unwrap().bucket.iter())
            .find_map(|b| b.exemplar.as_ref())
            .expect("a classic bucket exemplar");
        assert!(exemplar.label.iter().any(|l| l.name == "trace_id"));
        let completed = families
            .iter()
            .find(|f| f.name == "flowmetrics_flows_completed_total")
            .unwrap();
        assert!(completed
            .metric
            .iter()
            .any(|m| m.counter.as_ref().unwrap().exemplar.is_some()));
    }

    #[test]
    fn text_0_0_4_has_no_openmetrics_only_lines() {
        let m = Metrics::new(crate::settings::metrics(&config()));
        record(&m);
        let body = m.encode_format(ExpositionFormat::Text004, 42).unwrap();
        let text = String::from_utf8(body).unwrap();
        assert!(!text.contains("# EOF") && !text.contains("# UNIT") && !text.contains(" # {"));
        assert!(text.contains("# TYPE flowmetrics_flows_started_total counter\n"));
        assert!(text.contains("# TYPE flowmetrics_flow_duration_seconds histogram\n"));
        // Same samples as the OpenMetrics text, exemplars aside.
        let om = m.encode(42);
        let samples = |t: &str| {
            t.lines()
                .filter(|l| !l.starts_with('#') && !l.starts_with("process_"))
                .map(|l| l.split(" # {").next().unwrap().to_string())
                .collect::<std::collections::BTreeSet<_>>()
        };
        assert_eq!(samples(&text), samples(&om));
    }
}

#[test]
fn flow_totals_sum_each_flows_own_series_and_skip_the_overflow() {
    let m = Metrics::new(crate::settings::metrics(&config()));
    record(&m);
    let totals = m.flow_totals();
    let names: Vec<&str> = totals.iter().map(|t| t.flow.as_str()).collect();
    assert_eq!(names, ["checkout", "f0", "f1", "f2", "login"]);
    let checkout = &totals[0];
    // Two label sets (one with an odd region value); the failure end folded (full family);
    // one success closed with its steps' transits.
    assert_eq!(checkout.started, 1235);
    assert_eq!(checkout.completed_success, 9);
    assert_eq!(checkout.completed_failure, 0);
    assert_eq!(checkout.completed_cancelled, 1);
    assert_eq!(checkout.incomplete, 0);
    assert_eq!(checkout.in_progress, 1223);
    assert_eq!(checkout.dropped, 1);
    assert_eq!(checkout.unmatched, 0);
    // The negative duration is not observed; 2e21 lies past the last bound.
    assert_eq!(checkout.duration_count, 8);
    assert_eq!(checkout.duration_sum, 2e21 + 10.0);
    // Ten bounds, the objective's `within` (2 s) and +Inf.
    assert_eq!(checkout.duration_buckets.len(), 12);
    assert_eq!(checkout.duration_buckets[0], (1e-7, 2));
    assert_eq!(checkout.duration_buckets[2], (0.1, 3));
    assert_eq!(checkout.duration_buckets[5], (2.0, 5));
    assert_eq!(checkout.duration_buckets[10], (1e21, 7));
    assert_eq!(checkout.duration_buckets[11], (f64::INFINITY, 8));

    let login = &totals[4];
    assert_eq!(login.started, 1);
    assert_eq!(login.completed_success, 0, "folded: the family was full");
    assert_eq!(login.incomplete, 2);
    assert_eq!(login.in_progress, -5);
    assert_eq!(login.unmatched, 1);
    assert_eq!(login.duration_count, 4);
    assert!((login.duration_sum - 4000.342).abs() < 1e-9);
    let buckets = &login.duration_buckets;
    assert_eq!(buckets.last(), Some(&(f64::INFINITY, 4)));
    let at = |bound: f64| buckets.iter().find(|(b, _)| *b == bound).unwrap().1;
    assert_eq!((at(0.05), at(0.1), at(0.25), at(3600.0)), (1, 2, 3, 3));

    let f0 = &totals[1];
    assert_eq!((f0.started, f0.in_progress, f0.unmatched), (1, -1, 1));
    let f2 = &totals[3];
    assert_eq!((f2.started, f2.in_progress, f2.unmatched), (0, 0, 1));
}

/// Reports from four threads while totals and expositions are read: every reading sees
/// `started = Σ completed + incomplete + dropped + in_progress` per flow.
#[test]
fn every_reading_is_one_consistent_cut_while_reports_go_on() {
    let mut config = Config::default();
    config.limits.max_series_per_metric = 10_000;
    let m = Arc::new(Metrics::new(crate::settings::metrics(&config)));
    let stop = Arc::new(std::sync::atomic::AtomicBool::new(false));
    let writers: Vec<_> = (0..4)
        .map(|t| {
            let (m, stop) = (m.clone(), stop.clone());
            std::thread::spawn(move || {
                let flow: Arc<str> = Arc::from(format!("flow{}", t % 2));
                let none = dims(&[]);
                let end = |outcome| EndRecord {
                    outcome,
                    timestamp_nanos: 0,
                    dims: none.clone(),
                    trace: None,
                };
                let mut i = 0u64;
                while !stop.load(Ordering::Relaxed) {
                    let start_dims = dims(&[&format!("{}", i % 50)]);
                    m.report(Report::Opened {
                        flow: &flow,
                        start_dims: &start_dims,
                    });
                    let outcome =
                        [Outcome::Success, Outcome::Failure, Outcome::Cancelled][i as usize % 3];
                    match i % 5 {
                        0 => m.report(Report::TimedOut {
                            flow: &flow,
                            start_dims: &start_dims,
                            transits: &[],
                            last_step: None,
                        }),
                        1 => m.report(Report::Dropped {
                            flow: &flow,
                            start_dims: &start_dims,
                        }),
                        2 => {}
                        _ => m.report(Report::Completed {
                            flow: &flow,
                            start_dims: &start_dims,
                            end: &end(outcome),
                            duration_secs: 0.01,
                            transits: &[],
                        }),
                    }
                    i += 1;
                }
            })
        })
        .collect();
    let balanced = |t: &FlowTotals| {
        t.started as i64
            == (t.completed_success + t.completed_failure + t.completed_cancelled) as i64
                + t.incomplete as i64
                + t.dropped as i64
                + t.in_progress
    };
    let mut checked = 0;
    let deadline = Instant::now() + Duration::from_millis(1500);
    while Instant::now() < deadline {
        for t in m.flow_totals() {
            assert!(balanced(&t), "{t:?}");
            checked += 1;
        }
        let text = m.encode(0);
        for flow in ["flow0", "flow1"] {
            let sum = |prefix: &str, filter: &str| -> i64 {
                text.lines()
                    .filter(|l| l.starts_with(prefix) && l.contains(&format!("flow=\"{flow}\"")))
                    .filter(|l| l.contains(filter))
                    .map(|l| {
                        let value = l.split(" # ").next().unwrap().rsplit(' ').next().unwrap();
                        value.parse::<i64>().unwrap()
                    })
                    .sum()
            };
            let started = sum("flowmetrics_flows_started_total{", "");
            let ended = sum("flowmetrics_flows_completed_total{", "")
                + sum("flowmetrics_flow_errors_total{", "incomplete")
                + sum("flowmetrics_flows_dropped_total{", "")
                + sum("flowmetrics_flows_in_progress{", "");
            assert_eq!(started, ended, "{flow}");
        }
    }
    stop.store(true, Ordering::Relaxed);
    for w in writers {
        w.join().unwrap();
    }
    assert!(checked > 0);
}

#[test]
fn a_shared_store_shows_every_op_from_the_start() {
    use crate::flows::store::StoreProbe;
    let mut config = config();
    config.correlation.store = crate::config::StoreKind::Redis;
    let m = Metrics::new(crate::settings::metrics(&config));
    let text = m.encode(0);
    for op in ["apply", "sweep", "recover"] {
        let zero = format!("flowmetrics_store_errors_total{{op=\"{op}\"}} 0\n");
        assert!(text.contains(&zero), "{text}");
    }
    m.store_call("recover", 0.001, false);
    let text = m.encode(0);
    assert!(text.contains("flowmetrics_store_errors_total{op=\"recover\"} 1\n"));
    assert!(text.contains("flowmetrics_store_latency_seconds_count{op=\"recover\"} 1\n"));
    assert!(!text.contains("flowmetrics_state_write_errors"), "{text}");
}

#[test]
fn network_flows_off_have_no_network_series_at_all() {
    let mut config = config();
    config.network_flows.enabled = false;
    let m = Metrics::new(crate::settings::metrics(&config));
    assert!(m.network().is_none());
    let text = m.encode(0);
    assert!(!text.contains("invalid_network_flow"), "{text}");
    assert!(!text.contains("flowmetrics_network_"), "{text}");
}
