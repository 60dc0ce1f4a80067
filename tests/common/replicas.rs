//! Several flowmetrics replicas sharing one correlation store (a Redis, or a Redis
//! Cluster): each flow's start goes to one replica and its end to another at random,
//! ends often first, over OTLP/HTTP from clients that retry as exporters do (503 →
//! again, to any replica). The counters summed over replicas must be exact for every
//! outcome: [`assert_exact`].
#![allow(dead_code)]

use std::collections::BTreeMap;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use bytes::Bytes;
use flowmetrics::config::{Config, StoreKind};
use flowmetrics::RunningApp;
use http_body_util::{BodyExt, Full};
use hyper::{Request, StatusCode};
use prost::Message;
use tokio::sync::Mutex;

use super::otlp::{flow_event, span, traces};
use super::{http_client, settled_scrapes, start, test_config, PROTOBUF};

pub const FLOW: &str = "pay";
pub const IDS: u64 = 900;
pub const BATCH: usize = 20;
/// Long enough that an end sent first always meets its start, also across an outage.
pub const TIMEOUT: Duration = Duration::from_secs(8);

/// What each id is: 0 start only (incomplete), 1 failure, 2 cancelled, 3 end only
/// (unmatched), else success; the duration is a multiple of 1/4 s (exact sums).
pub fn plan(id: u64) -> (bool, Option<&'static str>, f64) {
    let d = (id % 7 + 1) as f64 * 0.25;
    match id % 10 {
        0 => (true, None, d),
        1 => (true, Some("failure"), d),
        2 => (true, Some("cancelled"), d),
        3 => (false, Some("success"), d),
        _ => (true, Some("success"), d),
    }
}

pub use super::otlp::now_nanos;

/// Every event of the run, shuffled (so ends often come first), in batches.
pub fn batches(seed: u64) -> Vec<Vec<u8>> {
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
    Rng(seed).shuffle(&mut events);
    events
        .chunks(BATCH)
        .map(|chunk| {
            let spans = chunk
                .iter()
                .map(|(name, id, outcome, ts)| {
                    let event = flow_event(name.clone(), &format!("o-{id}"), *outcome, *ts);
                    span(&[0xab; 16], &(id + 1).to_be_bytes(), vec![event])
                })
                .collect();
            traces(Some(vec![]), spans).encode_to_vec()
        })
        .collect()
}

pub struct Rng(pub u64);

impl Rng {
    pub fn below(&mut self, n: u64) -> u64 {
        self.0 ^= self.0 << 13;
        self.0 ^= self.0 >> 7;
        self.0 ^= self.0 << 17;
        self.0 % n
    }

    /// Fisher-Yates over `items`.
    pub fn shuffle<T>(&mut self, items: &mut [T]) {
        for i in (1..items.len()).rev() {
            items.swap(i, self.below(i as u64 + 1) as usize);
        }
    }
}

/// One POST; `None` when the replica cannot be reached at all.
pub async fn post_once(url: &str, body: Vec<u8>) -> Option<StatusCode> {
    let request = Request::post(url)
        .header("content-type", PROTOBUF)
        .body(Full::new(Bytes::from(body)))
        .ok()?;
    let response =
        tokio::time::timeout(Duration::from_secs(10), http_client(false).request(request))
            .await
            .ok()?
            .ok()?;
    let status = response.status();
    let _ = response.into_body().collect().await;
    Some(status)
}

/// A replica on the shared store; `store` sets where it is (`correlation.redis.*`).
pub async fn replica_with(store: impl FnOnce(&mut Config)) -> RunningApp {
    let mut c = test_config();
    c.correlation.store = StoreKind::Redis;
    c.correlation.redis.connect_timeout = Duration::from_millis(300);
    c.correlation.redis.command_timeout = Duration::from_secs(1);
    c.flows.default.timeout = TIMEOUT;
    store(&mut c);
    start(c).await
}

pub use super::readyz;

/// Three replicas on the shared store (`store` says where it is), ready.
pub async fn three_replicas(store: impl Fn(&mut Config)) -> Vec<RunningApp> {
    let mut apps = Vec::new();
    for _ in 0..3 {
        apps.push(replica_with(&store).await);
    }
    wait_ready(&apps, StatusCode::OK, "replica never ready").await;
    apps
}

/// The replicas' OTLP/HTTP trace endpoints.
pub fn trace_urls(apps: &[RunningApp]) -> Vec<String> {
    apps.iter().map(super::traces_url).collect()
}

/// `flowmetrics_store_errors_total` summed over the scrapes.
pub fn store_errors(scrapes: &[BTreeMap<String, f64>]) -> f64 {
    scrapes
        .iter()
        .flat_map(|m| m.iter())
        .filter(|(k, _)| k.starts_with("flowmetrics_store_errors_total"))
        .map(|(_, v)| v)
        .sum()
}

/// Waits until every replica answers `/readyz` with `status`.
pub async fn wait_ready(apps: &[RunningApp], status: StatusCode, what: &str) {
    let give_up = Instant::now() + Duration::from_secs(5);
    for app in apps {
        while readyz(app).await != status {
            assert!(Instant::now() < give_up, "{what}");
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }
}

/// Sums every series of `family` for the flow over the given scrapes; `also` must
/// appear in the series' labels.
pub fn total(scrapes: &[BTreeMap<String, f64>], family: &str, also: &str) -> f64 {
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

/// The run's exports, sent by four clients that retry as exporters do.
pub struct Traffic {
    pub total_batches: usize,
    pub sent: Arc<AtomicUsize>,
    /// Replica 0 is out of rotation once set (it is to be stopped).
    pub replica0_out: Arc<AtomicBool>,
    /// Exports refused (503) or not answered, each retried.
    pub refused: Arc<AtomicUsize>,
    clients: Vec<tokio::task::JoinHandle<()>>,
}

impl Traffic {
    /// Starts sending `batches(seed)` to the replicas behind `urls` (exactly three).
    pub async fn start(urls: Vec<String>, seed: u64) -> Traffic {
        let queue: Arc<Mutex<Vec<Vec<u8>>>> = Arc::new(Mutex::new(batches(seed)));
        let total_batches = queue.lock().await.len();
        let sent = Arc::new(AtomicUsize::new(0));
        let replica0_out = Arc::new(AtomicBool::new(false));
        let refused = Arc::new(AtomicUsize::new(0));
        let clients = (0..4u64)
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
        Traffic {
            total_batches,
            sent,
            replica0_out,
            refused,
            clients,
        }
    }

    /// Waits until a third of the batches went through.
    pub async fn a_third_sent(&self) {
        while self.sent.load(Ordering::Acquire) < self.total_batches / 3 {
            tokio::time::sleep(Duration::from_millis(5)).await;
        }
    }

    /// Waits until every batch went through.
    pub async fn finish(self) {
        for c in self.clients {
            c.await.expect("client");
        }
    }
}

/// Scrapes the running replicas (plus `stopped`, a stopped one's last scrape) until
/// the start-only ids have timed out and the end-only ones are unmatched, then once
/// more a moment later (nothing may be counted twice late).
pub async fn final_scrapes(
    apps: &[RunningApp],
    stopped: Option<BTreeMap<String, f64>>,
) -> Vec<BTreeMap<String, f64>> {
    let earlier: Vec<_> = stopped.into_iter().collect();
    let within = TIMEOUT + Duration::from_secs(20);
    settled_scrapes(
        apps,
        &earlier,
        within,
        Duration::from_millis(300),
        |scrapes| {
            total(scrapes, "flowmetrics_flow_errors_total", "incomplete") >= 90.0
                && total(scrapes, "flowmetrics_flow_unmatched_ends_total", "") >= 90.0
        },
    )
    .await
}

/// Every outcome of [`plan`], summed over the replicas' scrapes, exactly.
pub fn assert_exact(scrapes: &[BTreeMap<String, f64>]) {
    let mut expected_duration = 0.0;
    for id in 0..IDS {
        if let (true, Some("success"), d) = plan(id) {
            expected_duration += d;
        }
    }
    let get = |family: &str, also: &str| total(scrapes, family, also);
    assert_eq!(get("flowmetrics_flows_started_total", ""), 810.0, "started");
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
}

/// What [`throughput`] measured.
pub struct Throughput {
    pub events_per_sec: f64,
    /// p99 latency of one export (100 events).
    pub p99: Duration,
    /// CPU of the store's servers (as `cpu_ticks` counts it) per 100k events/s, in cores.
    pub cpu_per_100k: f64,
}

/// 2,000 exports of 100 events (50 starts, 50 ends of other ids), pre-encoded, sent by
/// 8 clients round-robin over the replicas behind `urls`; `cpu_ticks` reads the store's
/// servers' CPU (clock ticks).
pub async fn throughput(urls: &[String], cpu_ticks: impl Fn() -> u64) -> Throughput {
    let urls = urls.to_vec();
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
                    let ts = base + id * 1000 + i % 2;
                    let event = flow_event(name, &format!("o-{id:08}"), outcome, ts);
                    span(&[0xab; 16], &(i + 1).to_be_bytes(), vec![event])
                })
                .collect();
            traces(None, spans).encode_to_vec()
        })
        .collect();
    let queue = Arc::new(Mutex::new(bodies));
    let cpu_before = cpu_ticks();
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
    let cpu_secs = cpu_ticks().saturating_sub(cpu_before) as f64 / 100.0;
    latencies.sort();
    let p99 = latencies[latencies.len() * 99 / 100];
    let events = (exports * 100) as f64;
    Throughput {
        events_per_sec: events / elapsed,
        p99,
        cpu_per_100k: cpu_secs / elapsed / (events / elapsed / 100_000.0),
    }
}

/// utime + stime of a process, in clock ticks (100 per second on Linux).
pub fn proc_cpu_ticks(pid: u32) -> u64 {
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
