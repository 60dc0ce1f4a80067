//! Several flowmetrics replicas on one real redis-server (`correlation.store: redis`):
//! each flow's start goes to one replica and its end to another at random, ends often
//! first, over OTLP/HTTP from clients that retry as exporters do (503 → again, to any
//! replica). The counters summed over replicas must be exact for every outcome, with
//! one replica stopped mid-run, and with Redis itself stopped and restarted under load.

mod common;

use std::collections::BTreeMap;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use bytes::Bytes;
use common::attr as s;
use common::redis::RedisServer;
use common::*;
use flowmetrics::config::StoreKind;
use flowmetrics::RunningApp;
use http_body_util::{BodyExt, Full};
use hyper::{Method, Request, StatusCode};
use hyper_util::client::legacy::Client;
use hyper_util::rt::TokioExecutor;
use opentelemetry_proto::tonic::collector::trace::v1::trace_service_client::TraceServiceClient;
use opentelemetry_proto::tonic::collector::trace::v1::ExportTraceServiceRequest;
use opentelemetry_proto::tonic::resource::v1::Resource;
use opentelemetry_proto::tonic::trace::v1::{span, ResourceSpans, ScopeSpans, Span};
use prost::Message;
use tokio::sync::Mutex;

const FLOW: &str = "pay";
const IDS: u64 = 900;
const BATCH: usize = 20;
/// Long enough that an end sent first always meets its start, also across an outage.
const TIMEOUT: Duration = Duration::from_secs(8);

#[derive(Clone, Copy, PartialEq)]
enum Fault {
    None,
    /// Replica 0 takes no more exports after a third of the batches, then stops.
    StopReplica,
    /// Redis is stopped for some seconds after a third of the batches.
    StopRedis,
}

/// What each id is: 0 start only (incomplete), 1 failure, 2 cancelled, 3 end only
/// (unmatched), else success; the duration is a multiple of 1/4 s (exact sums).
fn plan(id: u64) -> (bool, Option<&'static str>, f64) {
    let d = (id % 7 + 1) as f64 * 0.25;
    match id % 10 {
        0 => (true, None, d),
        1 => (true, Some("failure"), d),
        2 => (true, Some("cancelled"), d),
        3 => (false, Some("success"), d),
        _ => (true, Some("success"), d),
    }
}

fn now_nanos() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .unwrap()
        .as_nanos() as u64
}

/// Every event of the run, shuffled (so ends often come first), in batches.
fn batches(seed: u64) -> Vec<Vec<u8>> {
    let base = now_nanos();
    let mut events = Vec::new();
    for id in 0..IDS {
        let (has_start, end, d) = plan(id);
        let start_ts = base + id * 1_000_000;
        if has_start {
            events.push((format!("flow.{FLOW}.start"), id, None, start_ts));
        }
        if let Some(outcome) = end {
            let end_ts = start_ts + (d * 1e9) as u64;
            events.push((format!("flow.{FLOW}.end"), id, Some(outcome), end_ts));
        }
    }
    let mut rng = Rng(seed);
    for i in (1..events.len()).rev() {
        events.swap(i, rng.below(i as u64 + 1) as usize);
    }
    events
        .chunks(BATCH)
        .map(|chunk| {
            let spans = chunk
                .iter()
                .map(|(name, id, outcome, ts)| {
                    let mut attributes = vec![s("correlation-id", &format!("o-{id}"))];
                    if let Some(o) = outcome {
                        attributes.push(s("outcome", o));
                    }
                    Span {
                        trace_id: vec![0xab; 16],
                        span_id: (id + 1).to_be_bytes().to_vec(),
                        name: "work".into(),
                        events: vec![span::Event {
                            time_unix_nano: *ts,
                            name: name.clone(),
                            attributes,
                            ..Default::default()
                        }],
                        ..Default::default()
                    }
                })
                .collect();
            ExportTraceServiceRequest {
                resource_spans: vec![ResourceSpans {
                    resource: Some(Resource::default()),
                    scope_spans: vec![ScopeSpans {
                        spans,
                        ..Default::default()
                    }],
                    ..Default::default()
                }],
            }
            .encode_to_vec()
        })
        .collect()
}

struct Rng(u64);

impl Rng {
    fn below(&mut self, n: u64) -> u64 {
        self.0 ^= self.0 << 13;
        self.0 ^= self.0 >> 7;
        self.0 ^= self.0 << 17;
        self.0 % n
    }
}

/// One POST; `None` when the replica cannot be reached at all.
async fn post_once(url: &str, body: Vec<u8>) -> Option<StatusCode> {
    let client: Client<_, Full<Bytes>> = Client::builder(TokioExecutor::new()).build_http();
    let request = Request::builder()
        .method(Method::POST)
        .uri(url)
        .header("content-type", "application/x-protobuf")
        .body(Full::new(Bytes::from(body)))
        .ok()?;
    let response = tokio::time::timeout(Duration::from_secs(10), client.request(request))
        .await
        .ok()?
        .ok()?;
    let status = response.status();
    let _ = response.into_body().collect().await;
    Some(status)
}

async fn replica(url: &str) -> RunningApp {
    let mut c = test_config();
    c.correlation.store = StoreKind::Redis;
    c.correlation.redis.url = url.into();
    c.correlation.redis.connect_timeout = Duration::from_millis(300);
    c.correlation.redis.command_timeout = Duration::from_secs(1);
    c.flows.default.timeout = TIMEOUT;
    start(c).await
}

async fn readyz(app: &RunningApp) -> StatusCode {
    let url = format!("http://{}/readyz", app.metrics);
    request(Method::GET, &url, &[], Bytes::new()).await.status
}

/// Sums every series of `family` for the flow over the given scrapes; `also` must
/// appear in the series' labels.
fn total(scrapes: &[BTreeMap<String, f64>], family: &str, also: &str) -> f64 {
    scrapes
        .iter()
        .flat_map(|m| m.iter())
        .filter(|(series, _)| {
            series.starts_with(&format!("{family}{{"))
                && series.contains(&format!("flow=\"{FLOW}\""))
                && series.contains(also)
        })
        .map(|(_, v)| v)
        .sum()
}

async fn run(fault: Fault, seed: u64) {
    let Some(mut redis) = (match fault {
        // Open flows must outlive the restart: an append-only file, synced per write.
        Fault::StopRedis => RedisServer::start_persistent(),
        _ => RedisServer::start(),
    }) else {
        return;
    };
    let mut apps = Vec::new();
    for _ in 0..3 {
        apps.push(replica(&redis.url()).await);
    }
    for app in &apps {
        let give_up = Instant::now() + Duration::from_secs(5);
        while readyz(app).await != StatusCode::OK {
            assert!(Instant::now() < give_up, "replica never ready");
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }
    let urls: Vec<String> = apps
        .iter()
        .map(|a| format!("http://{}/v1/traces", a.otlp_http.unwrap()))
        .collect();
    let queue: Arc<Mutex<Vec<Vec<u8>>>> = Arc::new(Mutex::new(batches(seed)));
    let total_batches = queue.lock().await.len();
    let sent = Arc::new(AtomicUsize::new(0));
    // Replica 0 is out of rotation once it is to be stopped.
    let replica0_out = Arc::new(std::sync::atomic::AtomicBool::new(false));
    let refused = Arc::new(AtomicUsize::new(0));

    let clients: Vec<_> = (0..4u64)
        .map(|client| {
            let (queue, urls, sent) = (queue.clone(), urls.clone(), sent.clone());
            let (out, refused) = (replica0_out.clone(), refused.clone());
            tokio::spawn(async move {
                let mut rng = Rng(seed ^ (client + 1).wrapping_mul(0x9e37_79b9_7f4a_7c15));
                loop {
                    let Some(body) = queue.lock().await.pop() else {
                        break;
                    };
                    // An exporter's retries: again and again, to any replica in rotation.
                    loop {
                        let first: u64 = if out.load(Ordering::Acquire) { 1 } else { 0 };
                        let to = (first + rng.below(3 - first)) as usize;
                        match post_once(&urls[to], body.clone()).await {
                            Some(StatusCode::OK) => break,
                            Some(StatusCode::SERVICE_UNAVAILABLE) | None => {
                                refused.fetch_add(1, Ordering::Relaxed);
                                tokio::time::sleep(Duration::from_millis(100)).await;
                            }
                            Some(other) => panic!("export answered {other}"),
                        }
                    }
                    sent.fetch_add(1, Ordering::AcqRel);
                    // Slow enough that the faults land mid-run.
                    tokio::time::sleep(Duration::from_millis(5)).await;
                }
            })
        })
        .collect();

    let mut stopped_scrape = None;
    let third = total_batches / 3;
    while sent.load(Ordering::Acquire) < third {
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
    match fault {
        Fault::None => {}
        Fault::StopReplica => {
            replica0_out.store(true, Ordering::Release);
            // Exports already on their way to it finish; then its last scrape is what
            // Prometheus keeps of it, and it stops with its open flows in Redis.
            tokio::time::sleep(Duration::from_millis(300)).await;
            stopped_scrape = Some(scrape(&apps[0]).await);
            apps.remove(0).shutdown().await;
        }
        Fault::StopRedis => {
            redis.stop();
            let give_up = Instant::now() + Duration::from_secs(5);
            for app in &apps {
                while readyz(app).await != StatusCode::SERVICE_UNAVAILABLE {
                    assert!(Instant::now() < give_up, "/readyz stayed 200 without Redis");
                    tokio::time::sleep(Duration::from_millis(20)).await;
                }
            }
            tokio::time::sleep(Duration::from_secs(3)).await;
            redis.restart();
            for app in &apps {
                let give_up = Instant::now() + Duration::from_secs(5);
                while readyz(app).await != StatusCode::OK {
                    assert!(
                        Instant::now() < give_up,
                        "/readyz stayed 503 after Redis came back"
                    );
                    tokio::time::sleep(Duration::from_millis(20)).await;
                }
            }
        }
    }
    for c in clients {
        c.await.expect("client");
    }
    if fault == Fault::StopRedis {
        assert!(refused.load(Ordering::Relaxed) > 0, "no export was refused");
    }

    // Wait for the start-only ids to time out, on the replicas still running.
    let give_up = Instant::now() + TIMEOUT + Duration::from_secs(20);
    let scrapes = loop {
        let mut scrapes: Vec<_> = stopped_scrape.iter().cloned().collect();
        for app in &apps {
            scrapes.push(scrape(app).await);
        }
        let done = total(&scrapes, "flowmetrics_flow_errors_total", "incomplete") >= 90.0
            && total(&scrapes, "flowmetrics_flow_unmatched_ends_total", "") >= 90.0;
        if done || Instant::now() > give_up {
            break scrapes;
        }
        tokio::time::sleep(Duration::from_millis(200)).await;
    };
    // A moment more: nothing may be counted twice late.
    tokio::time::sleep(Duration::from_millis(300)).await;
    let mut expected_duration = 0.0;
    for id in 0..IDS {
        if let (true, Some("success"), d) = plan(id) {
            expected_duration += d;
        }
    }
    let get = |family: &str, also: &str| total(&scrapes, family, also);
    let started = get("flowmetrics_flows_started_total", "");
    assert_eq!(started, 810.0, "started");
    assert_eq!(
        get("flowmetrics_flows_completed_total", "outcome=\"success\""),
        540.0
    );
    assert_eq!(
        get("flowmetrics_flows_completed_total", "outcome=\"failure\""),
        90.0
    );
    assert_eq!(
        get("flowmetrics_flows_completed_total", "outcome=\"cancelled\""),
        90.0
    );
    assert_eq!(get("flowmetrics_flow_errors_total", "incomplete"), 90.0);
    assert_eq!(get("flowmetrics_flow_errors_total", "\"failure\""), 90.0);
    assert_eq!(get("flowmetrics_flow_unmatched_ends_total", ""), 90.0);
    assert_eq!(get("flowmetrics_flows_dropped_total", ""), 0.0);
    assert_eq!(get("flowmetrics_flow_duration_seconds_count", ""), 540.0);
    assert_eq!(
        get("flowmetrics_flow_duration_seconds_sum", ""),
        expected_duration
    );
    // Summed over replicas, in progress is what is still open: nothing.
    assert_eq!(get("flowmetrics_flows_in_progress", ""), 0.0);
    if fault == Fault::StopRedis {
        let errors: f64 = scrapes
            .iter()
            .flat_map(|m| m.iter())
            .filter(|(k, _)| k.starts_with("flowmetrics_store_errors_total"))
            .map(|(_, v)| v)
            .sum();
        assert!(errors > 0.0, "store errors were not counted");
    }
    for app in apps {
        app.shutdown().await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn three_replicas_on_one_redis_count_every_outcome_exactly() {
    run(Fault::None, 0x1234_5678_9abc_def1).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_replica_stopped_mid_run_loses_nothing() {
    run(Fault::StopReplica, 0x0fed_cba9_8765_4321).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn redis_stopped_and_restarted_under_load_counts_nothing_twice() {
    run(Fault::StopRedis, 0x5555_aaaa_3333_cccc).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_export_while_redis_is_down_is_refused_for_a_retry() {
    let Some(mut redis) = RedisServer::start() else {
        return;
    };
    let app = replica(&redis.url()).await;
    let url = format!("http://{}/v1/traces", app.otlp_http.unwrap());
    let body = batches(7).swap_remove(0);
    assert_eq!(post_once(&url, body.clone()).await, Some(StatusCode::OK));
    redis.stop();
    let r = post(&url, "application/x-protobuf", body.clone()).await;
    assert_eq!(r.status, StatusCode::SERVICE_UNAVAILABLE);
    assert_eq!(r.headers.get("retry-after").unwrap(), "1");
    let give_up = Instant::now() + Duration::from_secs(5);
    while readyz(&app).await != StatusCode::SERVICE_UNAVAILABLE {
        assert!(Instant::now() < give_up, "/readyz stayed 200 without Redis");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    // gRPC: UNAVAILABLE, which OTLP exporters retry.
    let endpoint = format!("http://{}", app.otlp_grpc.unwrap());
    let mut grpc = TraceServiceClient::connect(endpoint).await.unwrap();
    let request = ExportTraceServiceRequest::decode(&body[..]).unwrap();
    let status = grpc.export(request).await.expect_err("refused");
    assert_eq!(status.code(), tonic::Code::Unavailable);
    let m = scrape(&app).await;
    assert!(value(&m, r#"flowmetrics_store_errors_total{op="apply"}"#) >= 2.0);
    assert!(m.contains_key(r#"flowmetrics_store_latency_seconds_count{op="apply"}"#));
    assert_eq!(
        value(
            &m,
            r#"flowmetrics_otlp_requests_total{transport="http",signal="traces",code="503"}"#
        ),
        1.0
    );
    redis.restart();
    // The retry lands; what the first export applied is recognised, not counted again.
    let give_up = Instant::now() + Duration::from_secs(5);
    while post_once(&url, body.clone()).await != Some(StatusCode::OK) {
        assert!(Instant::now() < give_up, "never served again");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    app.shutdown().await;
}

/// Numbers for BENCHMARKS.md (not a test of speed: it asserts nothing about it).
/// `cargo test --release --test redis_replicas -- --ignored --nocapture`
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
#[ignore]
async fn measure_throughput_latency_cpu_and_memory() {
    let Some(redis) = RedisServer::start() else {
        return;
    };
    // Memory per open instance: 100k starts, each with its retry fingerprint.
    {
        let app = replica(&redis.url()).await;
        let url = format!("http://{}/v1/traces", app.otlp_http.unwrap());
        let before = redis.used_memory();
        let base = now_nanos();
        for chunk in 0..200u64 {
            let spans = (0..500u64)
                .map(|i| {
                    let id = chunk * 500 + i;
                    Span {
                        trace_id: vec![0xab; 16],
                        span_id: (id + 1).to_be_bytes().to_vec(),
                        name: "work".into(),
                        events: vec![span::Event {
                            time_unix_nano: base + id,
                            name: "flow.mem.start".into(),
                            attributes: vec![s("correlation-id", &format!("order-{id:08}"))],
                            ..Default::default()
                        }],
                        ..Default::default()
                    }
                })
                .collect();
            let body = ExportTraceServiceRequest {
                resource_spans: vec![ResourceSpans {
                    scope_spans: vec![ScopeSpans {
                        spans,
                        ..Default::default()
                    }],
                    ..Default::default()
                }],
            }
            .encode_to_vec();
            assert_eq!(post_once(&url, body).await, Some(StatusCode::OK));
        }
        let after = redis.used_memory();
        println!(
            "memory: {} bytes per open instance (instance, deadline entry, start fingerprint; \
             16-byte ids, no dims)",
            (after - before) / 100_000
        );
        app.shutdown().await;
        redis.flush();
    }
    for replicas in [1usize, 3] {
        let mut apps = Vec::new();
        for _ in 0..replicas {
            apps.push(replica(&redis.url()).await);
        }
        let urls: Vec<String> = apps
            .iter()
            .map(|a| format!("http://{}/v1/traces", a.otlp_http.unwrap()))
            .collect();
        // 100-event exports (50 starts, 50 ends of other ids), pre-encoded.
        let base = now_nanos();
        let exports = 2000u64;
        let bodies: Vec<Vec<u8>> = (0..exports)
            .map(|b| {
                let spans = (0..100u64)
                    .map(|i| {
                        let id = b * 50 + i / 2;
                        let (name, outcome) = if i % 2 == 0 {
                            ("flow.pay.start", None)
                        } else {
                            ("flow.pay.end", Some("success"))
                        };
                        let mut attributes = vec![s("correlation-id", &format!("o-{id:08}"))];
                        if let Some(o) = outcome {
                            attributes.push(s("outcome", o));
                        }
                        Span {
                            trace_id: vec![0xab; 16],
                            span_id: (i + 1).to_be_bytes().to_vec(),
                            name: "work".into(),
                            events: vec![span::Event {
                                time_unix_nano: base + id * 1000 + i % 2,
                                name: name.into(),
                                attributes,
                                ..Default::default()
                            }],
                            ..Default::default()
                        }
                    })
                    .collect();
                ExportTraceServiceRequest {
                    resource_spans: vec![ResourceSpans {
                        scope_spans: vec![ScopeSpans {
                            spans,
                            ..Default::default()
                        }],
                        ..Default::default()
                    }],
                }
                .encode_to_vec()
            })
            .collect();
        let queue = Arc::new(Mutex::new(bodies));
        let cpu_before = proc_cpu_ticks(redis.pid().unwrap());
        let started = Instant::now();
        let clients: Vec<_> = (0..8usize)
            .map(|c| {
                let (queue, urls) = (queue.clone(), urls.clone());
                tokio::spawn(async move {
                    let mut latencies = Vec::new();
                    let mut n = c;
                    while let Some(body) = queue.lock().await.pop() {
                        n += 1;
                        let t = Instant::now();
                        let status = post_once(&urls[n % urls.len()], body).await;
                        latencies.push(t.elapsed());
                        assert_eq!(status, Some(StatusCode::OK));
                    }
                    latencies
                })
            })
            .collect();
        let mut latencies = Vec::new();
        for c in clients {
            latencies.extend(c.await.unwrap());
        }
        let elapsed = started.elapsed().as_secs_f64();
        let cpu_secs = (proc_cpu_ticks(redis.pid().unwrap()) - cpu_before) as f64 / 100.0;
        latencies.sort();
        let p99 = latencies[latencies.len() * 99 / 100];
        let events = (exports * 100) as f64;
        println!(
            "{replicas} replica(s): {:.0} events/s in all, {:.0} per replica; p99 export \
             (100 events) {:.1} ms; Redis CPU {:.2} of a core per 100k events/s",
            events / elapsed,
            events / elapsed / replicas as f64,
            p99.as_secs_f64() * 1e3,
            cpu_secs / elapsed / (events / elapsed / 100_000.0),
        );
        for app in apps {
            app.shutdown().await;
        }
        redis.flush();
    }
}

/// utime + stime of a process, in clock ticks (100 per second on Linux).
fn proc_cpu_ticks(pid: u32) -> u64 {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).unwrap_or_default();
    // Fields after the command name (which may hold spaces) ends with ')'.
    let rest = stat.rsplit_once(')').map(|(_, r)| r).unwrap_or("");
    let fields: Vec<&str> = rest.split_whitespace().collect();
    let get = |i: usize| {
        fields
            .get(i)
            .and_then(|v| v.parse::<u64>().ok())
            .unwrap_or(0)
    };
    // utime and stime are fields 14 and 15 of the whole line: 11 and 12 after ')'.
    get(11) + get(12)
}
