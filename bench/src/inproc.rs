//! Measurements inside this process, on one thread: the prost baseline, the pipeline,
//! `/metrics` encoding, and how late time-outs fire.

use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use flowmetrics::admin::exposition;
use flowmetrics::config::{Config, HistogramKind};
use flowmetrics::flows::event::{DimValues, EventKind, FlowEvent, Outcome, Source, TraceRef};
use flowmetrics::flows::network::NetworkFlows;
use flowmetrics::flows::store::{CacheBaseline, EndRecord, Maintenance};
use flowmetrics::flows::{
    CorrelationStore, Extractor, FlowSink, MemoryStore, Report, StoreSettings,
};
use flowmetrics::metrics::{ExpositionFormat, Metrics};
use flowmetrics::model::Transport;
use flowmetrics::pipeline::Pipeline;
use flowmetrics::settings;
use opentelemetry_proto::tonic::collector::trace::v1::ExportTraceServiceRequest;
use prost::Message;

use crate::load::percentile;
use crate::workload::{Template, LAG};

/// Bounds of one timed loop.
#[derive(Clone, Copy)]
pub struct Budget {
    pub max_batches: u64,
    pub max_time: Duration,
}

pub struct Throughput {
    pub batches: u64,
    pub secs: f64,
    pub spans_per_sec: f64,
    pub events_per_sec: f64,
    /// Share of the time spent in the store's housekeeping (pipeline only).
    pub housekeeping_share: f64,
}

fn throughput(t: &Template, batches: u64, secs: f64, housekeeping_share: f64) -> Throughput {
    let secs = secs.max(1e-9);
    Throughput {
        batches,
        secs,
        spans_per_sec: (batches * t.spans) as f64 / secs,
        events_per_sec: (batches * t.events) as f64 / secs,
        housekeeping_share,
    }
}

/// `prost` decode of the same bytes into `ExportTraceServiceRequest` (and drop), one
/// thread.
pub fn baseline(t: &Template, budget: Budget) -> Throughput {
    let pool: Vec<Vec<u8>> = (0..16).map(|b| t.batch(b)).collect();
    for body in &pool {
        std::hint::black_box(ExportTraceServiceRequest::decode(&body[..]).expect("decodes"));
    }
    let started = Instant::now();
    let mut batches = 0;
    while batches < budget.max_batches && started.elapsed() < budget.max_time {
        let body = &pool[(batches % pool.len() as u64) as usize];
        let request = ExportTraceServiceRequest::decode(&body[..]).expect("decodes");
        std::hint::black_box(&request);
        drop(request);
        batches += 1;
    }
    throughput(t, batches, started.elapsed().as_secs_f64(), 0.0)
}

/// What the service builds at start, minus the listeners.
pub fn pipeline_for(config: &Config) -> (Pipeline, Arc<MemoryStore>, Arc<Metrics>) {
    let metrics = Arc::new(Metrics::new(settings::metrics(config)));
    let store = Arc::new(MemoryStore::new(settings::store(config), metrics.clone()));
    let pipeline = Pipeline::new(
        Extractor::new(settings::extractor(config)),
        store.clone(),
        metrics.clone(),
    )
    .with_network_flows(NetworkFlows::new(settings::network_flows(config)));
    (pipeline, store, metrics)
}

/// One batch through the service's path for OTLP/protobuf bodies (what the HTTP and gRPC
/// handlers call): selective decode → extract → correlate → record. Not inlined, so a
/// profiler can collect just this.
#[inline(never)]
pub fn measured_batch(pipeline: &Pipeline, body: &[u8]) -> Duration {
    let t0 = Instant::now();
    let rejected = pipeline
        .traces_protobuf(body, Transport::Http)
        .expect("workload decodes");
    std::hint::black_box(&rejected);
    t0.elapsed()
}

/// The in-process pipeline on this thread; the store's housekeeping runs inline every
/// 100 ms (the service runs it on a thread of its own at that interval).
pub fn pipeline(t: &Template, budget: Budget) -> Throughput {
    let (pipeline, table, _metrics) = pipeline_for(&Config::default());
    let mut body = t.bytes.clone();
    for b in 0..LAG {
        t.patch(&mut body, b);
        measured_batch(&pipeline, &body);
    }
    let mut busy = Duration::ZERO;
    let mut housekeeping = Duration::ZERO;
    let started = Instant::now();
    let mut last_housekeeping = Instant::now();
    let mut batches = 0;
    while batches < budget.max_batches && started.elapsed() < budget.max_time {
        t.patch(&mut body, LAG + batches);
        busy += measured_batch(&pipeline, &body);
        if last_housekeeping.elapsed() >= Duration::from_millis(100) {
            let h = Instant::now();
            table.run_pending_tasks();
            housekeeping += h.elapsed();
            last_housekeeping = Instant::now();
        }
        batches += 1;
    }
    let secs = (busy + housekeeping).as_secs_f64();
    throughput(
        t,
        batches,
        secs,
        housekeeping.as_secs_f64() / secs.max(1e-9),
    )
}

/// moka alone: the store's cache exactly as the store builds it, on this thread, with
/// the flow workload's steady instance pattern (each batch opens `starts` instances
/// and closes those opened `LAG` batches earlier): one insert per start, one remove per
/// end, housekeeping every 100 ms as in [`pipeline`]. Keys are precomputed.
pub fn moka_alone(t: &Template, budget: Budget) -> Throughput {
    let config = Config::default();
    let cache = CacheBaseline::new(settings::store(&config), Arc::new(NoSink));
    let per_batch = t.events / 2;
    let key = |batch: u64, i: u64| {
        // Distinct, well-spread 128-bit keys (the store's are hashes too).
        let n = batch * per_batch + i;
        u128::from(n.wrapping_mul(0x9e37_79b9_7f4a_7c15)) << 64 | u128::from(n)
    };
    let batch_ops = |b: u64| moka_batch(&cache, b, per_batch, key);
    for b in 0..LAG {
        batch_ops(b);
    }
    let started = Instant::now();
    let mut last_housekeeping = Instant::now();
    let mut batches = 0;
    while batches < budget.max_batches && started.elapsed() < budget.max_time {
        batch_ops(LAG + batches);
        if last_housekeeping.elapsed() >= Duration::from_millis(100) {
            cache.run_pending_tasks();
            last_housekeeping = Instant::now();
        }
        batches += 1;
    }
    throughput(t, batches, started.elapsed().as_secs_f64(), 0.0)
}

/// One batch of [`moka_alone`]: `per_batch` inserts, and as many removes once `LAG`
/// batches are open. Not inlined, so that a profiler can collect just the cache's work
/// (`--toggle-collect='*moka_batch*'`), as `measured_batch` for the pipeline.
#[inline(never)]
fn moka_batch(cache: &CacheBaseline, b: u64, per_batch: u64, key: impl Fn(u64, u64) -> u128) {
    for i in 0..per_batch {
        cache.start(key(b, i), b);
        if b >= LAG {
            cache.end(key(b - LAG, i));
        }
    }
}

/// A sink that records nothing (the baseline measures the cache alone).
struct NoSink;

impl FlowSink for NoSink {
    fn report(&self, _: Report<'_>) {}
}

pub struct Encode {
    pub flows: usize,
    pub series: usize,
    pub bytes: usize,
    pub p50_ms: f64,
    pub max_ms: f64,
}

/// A registry with `flows` flows, each started and completed once (8 series per flow:
/// started, in_progress, duration, completed x 3 and errors x 2), durations from 0.2 to
/// 10.1 s; duration histograms of the given kind; `max_series` per family.
fn seeded_metrics(flows: usize, histogram: HistogramKind, max_series: usize) -> Metrics {
    let mut config = Config::default();
    config.limits.max_series_per_metric = max_series;
    config.flows.default.histogram = histogram;
    let metrics = Metrics::new(settings::metrics(&config));
    let no_dims: DimValues = Arc::from(Vec::new());
    for f in 0..flows {
        let flow: Arc<str> = Arc::from(format!("flow-{f:05}"));
        metrics.report(Report::Opened {
            flow: &flow,
            start_dims: &no_dims,
        });
        let end = EndRecord {
            outcome: Outcome::Success,
            timestamp_nanos: 1_750_000_001_000_000_000,
            dims: no_dims.clone(),
            trace: TraceRef::from_ids(&[7; 16], &[9; 8]),
        };
        metrics.report(Report::Completed {
            flow: &flow,
            start_dims: &no_dims,
            end: &end,
            duration_secs: 0.2 + (f % 100) as f64 / 10.0,
            transits: &[],
        });
    }
    metrics
}

/// Time to encode `/metrics` with `flows` flows (see [`seeded_metrics`]).
pub fn encode(flows: usize, reps: usize) -> Encode {
    let metrics = seeded_metrics(flows, HistogramKind::Classic, flows.max(10_000) + 1);
    timed_bodies(&metrics, flows, reps, |m| m.encode(0).into_bytes())
}

/// `reps` bodies made by `make`: p50 and max time, and the body's size.
fn timed_bodies(
    metrics: &Metrics,
    flows: usize,
    reps: usize,
    make: impl Fn(&Metrics) -> Vec<u8>,
) -> Encode {
    let series = metrics.series_counts().iter().map(|(_, n)| n).sum();
    let mut times = Vec::with_capacity(reps);
    let mut bytes = 0;
    for _ in 0..reps.max(1) {
        let t = Instant::now();
        let body = make(metrics);
        times.push(t.elapsed().as_secs_f64() * 1e3);
        bytes = body.len();
        std::hint::black_box(body);
    }
    times.sort_by(f64::total_cmp);
    Encode {
        flows,
        series,
        bytes,
        p50_ms: percentile(&times, 0.5),
        max_ms: *times.last().unwrap_or(&0.0),
    }
}

/// One `/metrics` body as a scrape gets it: a format, gzip'd or not.
#[derive(Clone, Copy)]
pub struct Exposition {
    pub format: ExpositionFormat,
    pub gzip: bool,
    pub histogram: HistogramKind,
}

/// Time to make the `/metrics` body of `flows` flows in a format (the encode, plus gzip
/// when asked), and its size. Every series fits under the series limit.
pub fn encode_exposition(flows: usize, reps: usize, how: Exposition) -> Encode {
    let metrics = seeded_metrics(flows, how.histogram, 3 * flows + 1);
    timed_bodies(&metrics, flows, reps, |m| {
        let body = m
            .encode_format(how.format, 0)
            .expect("the exposition encodes");
        if how.gzip {
            exposition::gzip(&body)
        } else {
            body
        }
    })
}

/// Records when each instance's time-out is reported. Instances are flows named `t<n>`.
struct Stamps {
    fired: Mutex<Vec<Option<Instant>>>,
}

impl FlowSink for Stamps {
    fn report(&self, report: Report<'_>) {
        if let Report::TimedOut { flow, .. } = report {
            if let Some(n) = flow.strip_prefix('t').and_then(|n| n.parse::<usize>().ok()) {
                let now = Instant::now();
                if let Some(slot) = self.fired.lock().unwrap().get_mut(n) {
                    slot.get_or_insert(now);
                }
            }
        }
    }
}

/// Event `kind` of instance `i` of the timeliness run (flow `t{i}`).
fn instance_event(
    i: usize,
    kind: EventKind,
    step: Option<&str>,
    dims: &DimValues,
) -> FlowEvent<'static> {
    FlowEvent {
        flow: Arc::from(format!("t{i}")),
        correlation_id: format!("id-{i}").into(),
        kind,
        timestamp_nanos: 1_750_000_000_000_000_000 + i as u64,
        dims: dims.clone(),
        trace: None,
        source: Source::SpanEvent,
        step: step.map(Arc::from),
    }
}

pub struct Lateness {
    pub instances: usize,
    pub counted: usize,
    pub p50_ms: f64,
    pub p99_ms: f64,
    pub max_ms: f64,
}

/// Opens `n` instances spread over `spread` with a `timeout`, drives the table's
/// housekeeping exactly as the service does (a thread, every 20 ms), and measures how
/// long after each deadline its time-out is reported.
///
/// `longest`: the longest timeout of any flow (the cache's time-to-live). Equal to
/// `timeout` (and no steps), time-outs come from moka's time-to-live; otherwise from the
/// store's exact timers. `step`: every flow declares steps and each instance reaches
/// one a quarter second after its start (its entry written again).
pub fn timeliness(
    n: usize,
    spread: Duration,
    timeout: Duration,
    longest: Duration,
    step: bool,
) -> Lateness {
    let stamps = Arc::new(Stamps {
        fired: Mutex::new(vec![None; n]),
    });
    let table = Arc::new(MemoryStore::new(
        StoreSettings {
            capacity: 1_000_000,
            dedup_window: Duration::from_secs(300),
            timeout_for: Arc::new(move |_| timeout),
            longest_timeout: longest,
            step_flows: if step {
                (0..n).map(|i| Arc::from(format!("t{i}"))).collect()
            } else {
                Vec::new()
            },
        },
        stamps.clone(),
    ));
    // Mirrors MAINTENANCE_INTERVAL in the service.
    let maintenance = Maintenance::start(table.clone(), Duration::from_millis(20));
    let no_dims: DimValues = Arc::from(Vec::new());
    let mut deadlines = Vec::with_capacity(n);
    let started = Instant::now();
    let chunk = 100.max(n / 100);
    let step_lag = n / 8;
    for i in 0..n {
        if i % chunk == 0 {
            // Pace the opens evenly over `spread`.
            let due = started + spread.mul_f64(i as f64 / n as f64);
            if let Some(wait) = due.checked_duration_since(Instant::now()) {
                std::thread::sleep(wait);
            }
        }
        let opened = Instant::now();
        table.apply(instance_event(i, EventKind::Start, None, &no_dims));
        deadlines.push(opened + timeout);
        // A step a quarter of the spread after its start: the entry is written again.
        if step && i >= step_lag {
            let j = i - step_lag;
            table.apply(instance_event(j, EventKind::Step, Some("paid"), &no_dims));
        }
    }
    if step {
        for j in n.saturating_sub(step_lag)..n {
            table.apply(instance_event(j, EventKind::Step, Some("paid"), &no_dims));
        }
    }
    let give_up = Instant::now() + timeout + Duration::from_secs(10);
    loop {
        let done = stamps.fired.lock().unwrap().iter().all(Option::is_some);
        if done || Instant::now() > give_up {
            break;
        }
        std::thread::sleep(Duration::from_millis(20));
    }
    drop(maintenance);
    let fired = stamps.fired.lock().unwrap();
    let mut late: Vec<f64> = fired
        .iter()
        .zip(&deadlines)
        .filter_map(|(f, d)| f.map(|f| f.saturating_duration_since(*d).as_secs_f64() * 1e3))
        .collect();
    late.sort_by(f64::total_cmp);
    Lateness {
        instances: n,
        counted: late.len(),
        p50_ms: percentile(&late, 0.5),
        p99_ms: percentile(&late, 0.99),
        max_ms: *late.last().unwrap_or(&0.0),
    }
}

/// `--profile-scan`: the scan alone (what a server does with every span before any
/// event reaches the store), `batches` times over one body, with the default config.
pub fn scan_alone(t: &Template, batches: u64) {
    let config = Config::default();
    let extractor = flowmetrics::flows::Extractor::new(settings::extractor(&config));
    let network = NetworkFlows::new(settings::network_flows(&config));
    let body = t.batch(0);
    let started = Instant::now();
    let mut spans = 0;
    for _ in 0..batches {
        spans += measured_scan(&body, &extractor, network.as_ref());
    }
    let secs = started.elapsed().as_secs_f64();
    eprintln!(
        "scanned {batches} bodies of {} spans: {:.1} ns per span, {:.2}M spans/s",
        t.spans,
        secs * 1e9 / spans as f64,
        spans as f64 / secs / 1e6
    );
}

#[inline(never)]
fn measured_scan(
    body: &[u8],
    extractor: &flowmetrics::flows::Extractor,
    network: Option<&NetworkFlows>,
) -> u64 {
    let found = flowmetrics::flows::scan::scan_traces_with_network(body, extractor, network, 1)
        .expect("the workload is well formed");
    std::hint::black_box(&found);
    found.spans
}
