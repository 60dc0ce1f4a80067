//! Three flowmetrics replicas on one real redis-server (`correlation.store: redis`), fed
//! by the OpenTelemetry Rust SDK: one `SdkTracerProvider` per replica and transport
//! (replica 0 over OTLP/HTTP protobuf, replica 1 over OTLP/gRPC, replica 2 over both),
//! each exporting through its batch processor. Every flow's start goes to one replica
//! and its end to another (never the same replica, so only a shared store pairs them),
//! chosen at random, and about half of the ends are exported, and answered, before their
//! start is even emitted. Some instances never end (incomplete, after a short flow
//! timeout), some never start (unmatched ends). The counters summed over the replicas
//! must be exact for every outcome, and so must the duration count and sum.
//!
//! The raw-protobuf clients of tests/redis_replicas.rs stay for the fault tests: they
//! need control over retries, which the SDK exporters do not give.

mod common;

use std::collections::BTreeMap;
use std::time::{Duration, SystemTime};

use common::redis::RedisServer;
use common::replicas::{wait_ready, Rng};
use common::sdk::{
    self, flush_traces, shutdown_all, tracer_provider, Transport, TransportExt as _,
};
use common::*;
use flowmetrics::config::StoreKind;
use flowmetrics::RunningApp;
use hyper::StatusCode;
use opentelemetry::KeyValue;
use opentelemetry_sdk::trace::SdkTracerProvider;

/// The same correlation ids are used in both flows: (flow, id) is the instance.
const FLOWS: [&str; 2] = ["checkout", "checkout.payment"];
/// Correlation ids per flow.
const IDS: u64 = 200;
/// Instances per round: a round's ends-first ends are flushed, then its starts, then
/// its other ends.
const ROUND: usize = 40;
/// The flows' timeout: far longer than a round takes (an end sent first always meets
/// its start), short enough that the start-only instances time out soon.
const TIMEOUT: Duration = Duration::from_secs(6);

/// (replica, transport) of each tracer provider.
const PROVIDERS: [(usize, Transport); 4] = [
    (0, Transport::Http),
    (1, Transport::Grpc),
    (2, Transport::Http),
    (2, Transport::Grpc),
];

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Fate {
    /// Never ends: counted incomplete after the timeout.
    StartOnly,
    /// Never starts: counted as an unmatched end after the timeout.
    EndOnly,
    /// Starts and ends with this outcome.
    Pair(&'static str),
}

#[derive(Debug)]
struct Instance {
    flow: &'static str,
    id: String,
    fate: Fate,
    /// For a pair: its end is exported (and answered) before its start is emitted.
    end_first: bool,
    /// A failure told by the end span's ERROR status, with no `outcome` attribute.
    by_status: bool,
    /// Indexes into [`PROVIDERS`].
    start_via: usize,
    end_via: usize,
    start_at: SystemTime,
    end_at: SystemTime,
    /// Quarter seconds: every sum of them is exact in f64, in any order.
    quarters: u64,
}

/// What every instance is and which providers carry it, shuffled.
fn plan(seed: u64, base: SystemTime) -> Vec<Instance> {
    let mut rng = Rng(seed);
    let mut instances = Vec::new();
    for (f, flow) in FLOWS.iter().enumerate() {
        for n in 0..IDS {
            // The same id has a different fate in each flow.
            let fate = match (n + 3 * f as u64) % 10 {
                0 => Fate::StartOnly,
                1 => Fate::EndOnly,
                2 | 3 => Fate::Pair("failure"),
                4 => Fate::Pair("cancelled"),
                _ => Fate::Pair("success"),
            };
            let start_via = rng.below(PROVIDERS.len() as u64) as usize;
            // The end goes to a provider of another replica.
            let others: Vec<usize> = (0..PROVIDERS.len())
                .filter(|&p| PROVIDERS[p].0 != PROVIDERS[start_via].0)
                .collect();
            let end_via = others[rng.below(others.len() as u64) as usize];
            let quarters = (n * 7 + f as u64) % 12 + 1;
            // Distinct start timestamps, 1 ms apart.
            let start_at = base + Duration::from_millis(f as u64 * IDS + n);
            instances.push(Instance {
                flow,
                id: format!("o-{n}"),
                fate,
                end_first: rng.below(2) == 0,
                by_status: fate == Fate::Pair("failure") && n % 4 == 2,
                start_via,
                end_via,
                start_at,
                end_at: start_at + Duration::from_millis(250 * quarters),
                quarters,
            });
        }
    }
    rng.shuffle(&mut instances);
    instances
}

/// One span carrying one flow event at its explicit timestamp; `error` sets its status.
fn emit(
    provider: &SdkTracerProvider,
    event: String,
    at: SystemTime,
    attrs: Vec<KeyValue>,
    error: bool,
) {
    sdk::emit(provider, "redis-sdk-test", "work", event, at, attrs, error);
}

fn emit_start(providers: &[SdkTracerProvider], i: &Instance) {
    let attrs = vec![KeyValue::new("correlation-id", i.id.clone())];
    let event = format!("flow.{}.start", i.flow);
    emit(&providers[i.start_via], event, i.start_at, attrs, false);
}

fn emit_end(providers: &[SdkTracerProvider], i: &Instance) {
    let outcome = match i.fate {
        Fate::Pair(o) => o,
        _ => "success",
    };
    let mut attrs = vec![KeyValue::new("correlation-id", i.id.clone())];
    if !i.by_status {
        attrs.push(KeyValue::new("outcome", outcome));
    }
    let event = format!("flow.{}.end", i.flow);
    emit(&providers[i.end_via], event, i.end_at, attrs, i.by_status);
}

async fn replica(url: &str) -> RunningApp {
    let mut c = test_config();
    c.correlation.store = StoreKind::Redis;
    c.correlation.redis.url = url.into();
    c.flows.default.timeout = TIMEOUT;
    start(c).await
}

/// Sums, over the scrapes, every series of `family` whose labels contain each of `also`.
fn total(scrapes: &[BTreeMap<String, f64>], family: &str, also: &[&str]) -> f64 {
    scrapes
        .iter()
        .flat_map(|m| m.iter())
        .filter(|(series, _)| {
            series.starts_with(&format!("{family}{{"))
                && also.iter().all(|label| series.contains(label))
        })
        .map(|(_, v)| v)
        .sum()
}

#[derive(Debug, Default, Clone, Copy, PartialEq)]
struct Expected {
    started: f64,
    success: f64,
    failure: f64,
    cancelled: f64,
    incomplete: f64,
    unmatched: f64,
    duration_sum: f64,
}

fn expected(instances: &[Instance], flow: &str) -> Expected {
    let mut e = Expected::default();
    for i in instances.iter().filter(|i| i.flow == flow) {
        match i.fate {
            Fate::StartOnly => {
                e.started += 1.0;
                e.incomplete += 1.0;
            }
            Fate::EndOnly => e.unmatched += 1.0,
            Fate::Pair(outcome) => {
                e.started += 1.0;
                match outcome {
                    "success" => {
                        e.success += 1.0;
                        e.duration_sum += i.quarters as f64 * 0.25;
                    }
                    "failure" => e.failure += 1.0,
                    _ => e.cancelled += 1.0,
                }
            }
        }
    }
    e
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sdk_exporters_to_three_replicas_on_one_redis_count_every_outcome_exactly() {
    let Some(redis) = RedisServer::start() else {
        return;
    };
    let mut apps = Vec::new();
    for _ in 0..3 {
        apps.push(replica(&redis.url()).await);
    }
    wait_ready(&apps, StatusCode::OK, "replica never ready").await;
    let providers: Vec<SdkTracerProvider> = PROVIDERS
        .iter()
        .map(|&(r, t)| tracer_provider(&apps[r], t, format!("replica-{r}-{}", t.label())))
        .collect();

    let instances = plan(0x2545_f491_4f6c_dd1d, SystemTime::now());
    let pairs = |i: &&Instance| matches!(i.fate, Fate::Pair(_));
    assert!(
        instances
            .iter()
            .filter(pairs)
            .filter(|i| i.end_first)
            .count()
            > 100,
        "the plan sends many ends first"
    );
    for round in instances.chunks(ROUND) {
        // Ends first: exported and answered before their starts are emitted.
        for i in round.iter().filter(pairs).filter(|i| i.end_first) {
            emit_end(&providers, i);
        }
        for i in round.iter().filter(|i| i.fate == Fate::EndOnly) {
            emit_end(&providers, i);
        }
        flush_traces(&providers).await;
        for i in round.iter().filter(|i| i.fate != Fate::EndOnly) {
            emit_start(&providers, i);
        }
        flush_traces(&providers).await;
        for i in round.iter().filter(pairs).filter(|i| !i.end_first) {
            emit_end(&providers, i);
        }
        flush_traces(&providers).await;
    }

    let expect: Vec<Expected> = FLOWS.iter().map(|f| expected(&instances, f)).collect();
    // Wait for the time-outs (start-only instances, ends that never met a start), and a
    // moment more: nothing may be counted twice late.
    let within = TIMEOUT + Duration::from_secs(20);
    let settle = Duration::from_millis(500);
    let scrapes = settled_scrapes(&apps, &[], within, settle, |scrapes| {
        FLOWS.iter().zip(&expect).all(|(flow, e)| {
            let flow = format!("flow=\"{flow}\"");
            let incomplete = [flow.as_str(), "incomplete"];
            total(scrapes, "flowmetrics_flow_errors_total", &incomplete) >= e.incomplete
                && total(scrapes, "flowmetrics_flow_unmatched_ends_total", &[&flow]) >= e.unmatched
        })
    })
    .await;

    for (flow, e) in FLOWS.iter().zip(&expect) {
        let f = format!("flow=\"{flow}\"");
        let get = |family: &str, also: &[&str]| {
            let mut labels = vec![f.as_str()];
            labels.extend_from_slice(also);
            total(&scrapes, family, &labels)
        };
        let actual = Expected {
            started: get("flowmetrics_flows_started_total", &[]),
            success: get(
                "flowmetrics_flows_completed_total",
                &["outcome=\"success\""],
            ),
            failure: get(
                "flowmetrics_flows_completed_total",
                &["outcome=\"failure\""],
            ),
            cancelled: get(
                "flowmetrics_flows_completed_total",
                &["outcome=\"cancelled\""],
            ),
            incomplete: get(
                "flowmetrics_flow_errors_total",
                &["error_reason=\"incomplete\""],
            ),
            unmatched: get("flowmetrics_flow_unmatched_ends_total", &[]),
            // Every value is a multiple of 1/4 s, so each replica's sum and the sum over
            // replicas are exact whatever the order: compared with ==.
            duration_sum: get("flowmetrics_flow_duration_seconds_sum", &[]),
        };
        assert_eq!(actual, *e, "flow {flow}: summed over the three replicas");
        assert_eq!(
            get(
                "flowmetrics_flow_errors_total",
                &["error_reason=\"failure\""]
            ),
            e.failure,
            "flow {flow}: errors{{failure}}"
        );
        assert_eq!(
            get("flowmetrics_flow_duration_seconds_count", &[]),
            e.success,
            "flow {flow}: duration count"
        );
        assert_eq!(get("flowmetrics_flows_in_progress", &[]), 0.0, "{flow}");
        assert_eq!(get("flowmetrics_flows_dropped_total", &[]), 0.0, "{flow}");
        assert_eq!(
            get("flowmetrics_flow_negative_durations_total", &[]),
            0.0,
            "{flow}"
        );
    }
    // Every event arrived once, none was refused.
    let starts = instances.iter().filter(|i| i.fate != Fate::EndOnly).count() as f64;
    let ends = instances
        .iter()
        .filter(|i| i.fate != Fate::StartOnly)
        .count() as f64;
    let events = |kind: &str| {
        let kind = format!("kind=\"{kind}\"");
        total(
            &scrapes,
            "flowmetrics_flow_events_total",
            &[&kind, "source=\"span_event\""],
        )
    };
    assert_eq!(events("start"), starts, "start events");
    assert_eq!(events("end"), ends, "end events");
    assert_eq!(
        total(&scrapes, "flowmetrics_flow_events_duplicate_total", &[]),
        0.0
    );
    assert_eq!(
        total(&scrapes, "flowmetrics_flow_events_rejected_total", &[]),
        0.0
    );
    // Each replica was fed over its transports, and answered every export OK.
    for (r, scrape) in scrapes.iter().enumerate() {
        let one = std::slice::from_ref(scrape);
        for transport in [Transport::Http, Transport::Grpc] {
            let (label, ok) = (transport.label(), transport.ok_code());
            let t = format!("transport=\"{label}\"");
            let fed = PROVIDERS.contains(&(r, transport));
            let all = total(one, "flowmetrics_otlp_requests_total", &[&t]);
            let code = format!("code=\"{ok}\"");
            let answered_ok = total(one, "flowmetrics_otlp_requests_total", &[&t, &code]);
            assert_eq!(all, answered_ok, "replica {r} {label}: every export OK");
            assert_eq!(all > 0.0, fed, "replica {r} fed over {label}: {fed}");
        }
    }

    shutdown_all(providers, vec![]).await;
    for app in apps {
        app.shutdown().await;
    }
}
