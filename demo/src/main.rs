//! `flowmetrics-demo`: a traffic generator that simulates a small shop and emits flow
//! start/end span events through the OpenTelemetry Rust SDK, so flowmetrics (or anything
//! else speaking OTLP) has realistic flows to count.
//!
//! Three services, each with its own tracer provider and `service.name`:
//! `order-service`, `payment-service` and `fulfillment-service`. Three flows:
//!
//! * `checkout`: started by order-service, then four steps (`flow.checkout.step`):
//!   `cart` (order-service) and `payment_authorized` (payment-service) in the start's trace,
//!   `packed` and `shipped` (fulfillment-service) in traces of their own; ended by
//!   fulfillment-service in a trace of its own. Unfinished instances stall after any
//!   number of steps (see `journey`);
//! * `payment`: started and ended by payment-service, in two different traces (the end
//!   comes from the payment provider's callback);
//! * `refund`: started by order-service, ended by payment-service.
//!
//! Choices (flow, outcome, latency, ordering) come from a seeded PRNG, so a seed replays
//! the same sequence of flow instances.

use std::collections::BTreeMap;
use std::fmt::Write as _;
use std::process::ExitCode;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use async_trait::async_trait;
use opentelemetry::trace::TracerProvider as _;
use opentelemetry::KeyValue;
use opentelemetry_http::hyper::HyperClient;
use opentelemetry_http::{Bytes, HttpClient, HttpError, Request, Response};
use opentelemetry_otlp::{Protocol, WithExportConfig as _, WithHttpConfig as _};
use opentelemetry_sdk::error::OTelSdkResult;
use opentelemetry_sdk::trace::{
    BatchConfigBuilder, BatchSpanProcessor, SdkTracer, SdkTracerProvider, SpanData, SpanExporter,
};
use opentelemetry_sdk::Resource;
use tokio::sync::watch;
use tokio::task::JoinSet;
use tokio::time::Instant;

mod cli;
mod journey;
mod network;

use cli::{parse_args, Args, Parsed, Transport};

/// How long a start span stays open after the instance's last event was emitted, for
/// instances whose start is exported last: longer than the batch delay, so the other
/// events' batches leave first.
const END_FIRST_HOLD: Duration = Duration::from_millis(2000);
const BATCH_DELAY: Duration = Duration::from_millis(500);
const EXPORT_TIMEOUT: Duration = Duration::from_secs(5);

// ---------------------------------------------------------------------------------------
// Randomness

/// SplitMix64: small, fast, and good enough for choosing flows.
struct Rng(u64);

impl Rng {
    fn next_u64(&mut self) -> u64 {
        self.0 = self.0.wrapping_add(0x9E37_79B9_7F4A_7C15);
        let mut z = self.0;
        z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
        z ^ (z >> 31)
    }

    /// Uniform in [0, 1).
    fn unit(&mut self) -> f64 {
        (self.next_u64() >> 11) as f64 / (1u64 << 53) as f64
    }

    /// Standard normal (Box–Muller).
    fn normal(&mut self) -> f64 {
        let u1 = 1.0 - self.unit(); // (0, 1]
        let u2 = self.unit();
        (-2.0 * u1.ln()).sqrt() * (std::f64::consts::TAU * u2).cos()
    }

    /// Index chosen with the given weights.
    fn pick(&mut self, weights: &[f64]) -> usize {
        let total: f64 = weights.iter().sum();
        let mut x = self.unit() * total;
        for (i, w) in weights.iter().enumerate() {
            if x < *w {
                return i;
            }
            x -= w;
        }
        weights.len() - 1
    }
}

// ---------------------------------------------------------------------------------------
// The shop

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Service {
    Order,
    Payment,
    Fulfillment,
}

const SERVICES: [(Service, &str); 3] = [
    (Service::Order, "order-service"),
    (Service::Payment, "payment-service"),
    (Service::Fulfillment, "fulfillment-service"),
];

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Outcome {
    Success,
    Failure,
    Cancelled,
}

impl Outcome {
    fn as_str(self) -> &'static str {
        match self {
            Outcome::Success => "success",
            Outcome::Failure => "failure",
            Outcome::Cancelled => "cancelled",
        }
    }
}

struct FlowSpec {
    name: &'static str,
    /// Share of all instances.
    weight: f64,
    start: (Service, &'static str),
    /// A span in between, in the start's trace, at 40% of the latency.
    via: Option<(Service, &'static str)>,
    end: (Service, &'static str),
    /// Log-normal latency: median and sigma of the underlying normal.
    median: Duration,
    sigma: f64,
    /// Weights of success, failure, cancelled, never finished.
    outcomes: [f64; 4],
    /// The steps between start and end, in order (empty: none).
    steps: &'static [journey::StepSpec],
}

const FLOWS: [FlowSpec; 3] = [
    FlowSpec {
        name: "checkout",
        weight: 0.5,
        start: (Service::Order, "POST /checkout"),
        // payment-service charges in between: the payment_authorized step's span.
        via: None,
        end: (Service::Fulfillment, "ship order"),
        median: Duration::from_millis(1200),
        sigma: 1.1,
        // More never-finished instances than the other flows, so that every step has
        // stalled instances to show.
        outcomes: [0.83, 0.08, 0.04, 0.05],
        steps: &journey::CHECKOUT_STEPS,
    },
    FlowSpec {
        name: "payment",
        weight: 0.35,
        start: (Service::Payment, "authorize payment"),
        via: None,
        end: (Service::Payment, "capture callback"),
        median: Duration::from_millis(250),
        sigma: 1.0,
        outcomes: [0.91, 0.06, 0.02, 0.01],
        steps: &[],
    },
    FlowSpec {
        name: "refund",
        weight: 0.15,
        start: (Service::Order, "POST /refund"),
        via: None,
        end: (Service::Payment, "refund settled"),
        median: Duration::from_secs(4),
        sigma: 1.0,
        outcomes: [0.78, 0.10, 0.09, 0.03],
        steps: &[],
    },
];

/// One flow instance, fully decided up front.
struct Plan {
    flow: usize,
    correlation_id: String,
    latency: Duration,
    /// `None`: never finished.
    outcome: Option<Outcome>,
    /// How many of the flow's steps are sent (a prefix of them).
    steps: usize,
    /// The start is exported after the instance's steps and end.
    start_last: bool,
}

fn plan(rng: &mut Rng, run_id: &str, n: u64, max_latency: Duration) -> Plan {
    let weights: Vec<f64> = FLOWS.iter().map(|f| f.weight).collect();
    let flow = rng.pick(&weights);
    let spec = &FLOWS[flow];
    let latency_s = spec.median.as_secs_f64() * (spec.sigma * rng.normal()).exp();
    let latency = Duration::from_secs_f64(latency_s.clamp(0.001, max_latency.as_secs_f64()));
    let outcome = match rng.pick(&spec.outcomes) {
        0 => Some(Outcome::Success),
        1 => Some(Outcome::Failure),
        2 => Some(Outcome::Cancelled),
        _ => None,
    };
    let steps = journey::steps_reached(rng, spec.steps.len(), outcome);
    let start_last = rng.unit() < 0.10;
    Plan {
        flow,
        correlation_id: format!("{}-{run_id}-{n}", spec.name),
        latency,
        outcome,
        steps,
        // Only when something else is sent before it.
        start_last: start_last && (outcome.is_some() || steps > 0),
    }
}

// ---------------------------------------------------------------------------------------
// What was sent

#[derive(Default, Clone, Copy)]
struct Counts {
    started: u64,
    success: u64,
    failure: u64,
    cancelled: u64,
    /// Step events sent, by the step's index in the flow's steps.
    steps: [u64; journey::MAX_STEPS],
    /// Unfinished instances by the number of steps they sent (0: stalled at `start`).
    stalled: [u64; journey::MAX_STEPS + 1],
}

impl Counts {
    fn unfinished(&self) -> u64 {
        self.started - self.success - self.failure - self.cancelled
    }
}

type Tally = Arc<Mutex<BTreeMap<&'static str, Counts>>>;

fn summary_json(tally: &BTreeMap<&'static str, Counts>) -> String {
    let mut out = String::from("{\"flows\":{");
    for (i, spec) in FLOWS.iter().enumerate() {
        let c = tally.get(spec.name).copied().unwrap_or_default();
        if i > 0 {
            out.push(',');
        }
        let _ = write!(
            out,
            "\"{}\":{{\"started\":{},\"success\":{},\"failure\":{},\"cancelled\":{},\"unfinished\":{}",
            spec.name,
            c.started,
            c.success,
            c.failure,
            c.cancelled,
            c.unfinished()
        );
        if !spec.steps.is_empty() {
            out.push_str(&journey::summary_json(spec.steps, &c.steps, &c.stalled));
        }
        out.push('}');
    }
    out.push_str("}}\n");
    out
}

/// The final report: one row per flow, a total, and the exports.
fn summary_table(tally: &BTreeMap<&'static str, Counts>, exports: &ExportTotals) -> String {
    let mut rows: Vec<(String, Counts)> = FLOWS
        .iter()
        .map(|spec| {
            let c = tally.get(spec.name).copied().unwrap_or_default();
            (spec.name.to_string(), c)
        })
        .collect();
    let total = rows.iter().fold(Counts::default(), |t, (_, c)| Counts {
        started: t.started + c.started,
        success: t.success + c.success,
        failure: t.failure + c.failure,
        cancelled: t.cancelled + c.cancelled,
        ..Counts::default()
    });
    rows.push(("total".into(), total));
    let mut out = format!(
        "  {:<10} {:>9} {:>9} {:>9} {:>10} {:>11}\n",
        "flow", "started", "success", "failure", "cancelled", "unfinished"
    );
    for (name, c) in &rows {
        let _ = writeln!(
            out,
            "  {:<10} {:>9} {:>9} {:>9} {:>10} {:>11}",
            name,
            c.started,
            c.success,
            c.failure,
            c.cancelled,
            c.unfinished()
        );
    }
    for spec in FLOWS.iter().filter(|s| !s.steps.is_empty()) {
        let c = tally.get(spec.name).copied().unwrap_or_default();
        out.push_str(&journey::summary_lines(spec, &c.steps, &c.stalled));
    }
    let _ = writeln!(
        out,
        "  exports: {} ok, {} failed ({} spans exported, {} failed)",
        exports.ok, exports.failed, exports.spans_ok, exports.spans_failed
    );
    out
}

/// One progress line: per flow started and ended so far, exports, and the start rate
/// since the previous line.
fn progress_line(
    elapsed: Duration,
    tally: &BTreeMap<&'static str, Counts>,
    exports: &ExportTotals,
    rate: f64,
) -> String {
    let flows: Vec<String> = FLOWS
        .iter()
        .map(|spec| {
            let c = tally.get(spec.name).copied().unwrap_or_default();
            format!(
                "{} {} started {} ended",
                spec.name,
                c.started,
                c.success + c.failure + c.cancelled
            )
        })
        .collect();
    format!(
        "flowmetrics-demo: {:>4}s: {}; exports {} ok, {} failed; {rate:.1} flows/s",
        elapsed.as_secs(),
        flows.join(", "),
        exports.ok,
        exports.failed
    )
}

/// Export counters at one moment.
#[derive(Debug, Default, Clone, Copy)]
struct ExportTotals {
    ok: u64,
    failed: u64,
    spans_ok: u64,
    spans_failed: u64,
}

async fn report_progress(
    every: Duration,
    began: Instant,
    tally: Tally,
    stats: Arc<ExportStats>,
    mut done: watch::Receiver<bool>,
) {
    let mut tick = tokio::time::interval_at(began + every, every);
    let mut last = (began, 0u64);
    loop {
        tokio::select! {
            _ = tick.tick() => {}
            _ = done.wait_for(|d| *d) => return,
        }
        let now = Instant::now();
        let tally = tally.lock().unwrap().clone();
        let started: u64 = tally.values().map(|c| c.started).sum();
        let secs = now.duration_since(last.0).as_secs_f64().max(1e-3);
        let rate = (started - last.1) as f64 / secs;
        last = (now, started);
        let mut line = progress_line(now.duration_since(began), &tally, &stats.totals(), rate);
        let more = stats.unreported_failures.swap(0, Ordering::Relaxed);
        if more > 0 {
            if let Some(e) = stats.last_error.lock().unwrap().as_ref() {
                let _ = write!(line, " ({more} more failed exports, last: {e})");
            }
        }
        eprintln!("{line}");
    }
}

// ---------------------------------------------------------------------------------------
// Export plumbing

/// The SDK's batch processor exports from its own thread, outside any Tokio runtime; the
/// Hyper client needs one, so each request runs as a task on the demo's runtime. It also
/// notes why a request failed, which the SDK's error flattens to text.
#[derive(Debug)]
struct RuntimeHyperClient {
    inner: HyperClient,
    runtime: tokio::runtime::Handle,
    /// Why this provider's last request failed, for its [`CountingExporter`].
    last_cause: Arc<Mutex<Option<String>>>,
}

#[async_trait]
impl HttpClient for RuntimeHyperClient {
    async fn send_bytes(&self, request: Request<Bytes>) -> Result<Response<Bytes>, HttpError> {
        let inner = self.inner.clone();
        let result = self
            .runtime
            .spawn(async move { inner.send_bytes(request).await })
            .await?;
        let cause = match &result {
            Ok(r) if r.status().is_success() => None,
            Ok(r) => Some(format!("HTTP {}", r.status())),
            Err(e) => Some(cause_of(e.as_ref())),
        };
        *self.last_cause.lock().unwrap() = cause;
        result
    }
}

/// A short cause for a failed request: the innermost I/O error when there is one
/// ("connection refused"), else the error chain's text.
fn cause_of(err: &(dyn std::error::Error + 'static)) -> String {
    let mut chain = Vec::new();
    let mut io_kind = None;
    let mut next = Some(err);
    while let Some(e) = next {
        if let Some(io) = e.downcast_ref::<std::io::Error>() {
            io_kind = Some(io.kind());
        }
        chain.push(e.to_string());
        next = e.source();
    }
    if let Some(kind) = io_kind {
        if let Some(known) = io_cause(kind) {
            return known.into();
        }
    }
    cause_from_text(&chain.join(": "))
}

fn io_cause(kind: std::io::ErrorKind) -> Option<&'static str> {
    use std::io::ErrorKind as K;
    Some(match kind {
        K::ConnectionRefused => "connection refused",
        K::ConnectionReset => "connection reset",
        K::ConnectionAborted => "connection aborted",
        K::TimedOut => "timed out",
        K::AddrNotAvailable => "address not available",
        K::BrokenPipe => "connection closed",
        _ => return None,
    })
}

/// Recognises the usual causes in an exporter's error text (the gRPC exporter hands back
/// text only).
fn cause_from_text(text: &str) -> String {
    let lower = text.to_ascii_lowercase();
    for (needle, cause) in [
        ("connection refused", "connection refused"),
        ("connection reset", "connection reset"),
        ("timed out", "timed out"),
        ("deadline", "timed out"),
        ("dns error", "host name not resolved"),
        ("failed to lookup", "host name not resolved"),
        ("name or service not known", "host name not resolved"),
    ] {
        if lower.contains(needle) {
            return cause.into();
        }
    }
    let text = text.trim();
    if text.chars().count() > 200 {
        let short: String = text.chars().take(200).collect();
        format!("{short}…")
    } else {
        text.to_string()
    }
}

#[derive(Debug, Default)]
struct ExportStats {
    spans_ok: AtomicU64,
    spans_failed: AtomicU64,
    exports_ok: AtomicU64,
    exports_failed: AtomicU64,
    /// Failures not yet reported one by one (the first is reported at once).
    unreported_failures: AtomicU64,
    first_error: Mutex<Option<String>>,
    last_error: Mutex<Option<String>>,
}

impl ExportStats {
    fn totals(&self) -> ExportTotals {
        ExportTotals {
            ok: self.exports_ok.load(Ordering::Relaxed),
            failed: self.exports_failed.load(Ordering::Relaxed),
            spans_ok: self.spans_ok.load(Ordering::Relaxed),
            spans_failed: self.spans_failed.load(Ordering::Relaxed),
        }
    }
}

/// Counts exported and failed spans; reports the first failure at once.
#[derive(Debug)]
struct CountingExporter {
    inner: opentelemetry_otlp::SpanExporter,
    stats: Arc<ExportStats>,
    service: &'static str,
    endpoint: String,
    /// Set by the HTTP client (OTLP/HTTP only).
    last_cause: Arc<Mutex<Option<String>>>,
}

impl SpanExporter for CountingExporter {
    async fn export(&self, batch: Vec<SpanData>) -> OTelSdkResult {
        let n = batch.len() as u64;
        let result = self.inner.export(batch).await;
        match &result {
            Ok(()) => {
                self.stats.spans_ok.fetch_add(n, Ordering::Relaxed);
                self.stats.exports_ok.fetch_add(1, Ordering::Relaxed);
            }
            Err(e) => {
                self.stats.spans_failed.fetch_add(n, Ordering::Relaxed);
                self.stats.exports_failed.fetch_add(1, Ordering::Relaxed);
                let cause = self
                    .last_cause
                    .lock()
                    .unwrap()
                    .take()
                    .unwrap_or_else(|| cause_from_text(&e.to_string()));
                let msg = format!(
                    "export of {n} span{} from {} failed: {cause} at {}",
                    if n == 1 { "" } else { "s" },
                    self.service,
                    self.endpoint
                );
                *self.stats.last_error.lock().unwrap() = Some(msg.clone());
                let mut first = self.stats.first_error.lock().unwrap();
                if first.is_none() {
                    eprintln!("flowmetrics-demo: warning: {msg}");
                    *first = Some(msg);
                } else {
                    self.stats
                        .unreported_failures
                        .fetch_add(1, Ordering::Relaxed);
                }
            }
        }
        result
    }

    fn shutdown_with_timeout(&self, timeout: Duration) -> OTelSdkResult {
        self.inner.shutdown_with_timeout(timeout)
    }

    fn force_flush(&self) -> OTelSdkResult {
        self.inner.force_flush()
    }

    fn set_resource(&mut self, resource: &Resource) {
        self.inner.set_resource(resource);
    }
}

fn build_provider(
    args: &Args,
    service: &'static str,
    stats: &Arc<ExportStats>,
) -> Result<SdkTracerProvider, String> {
    let last_cause = Arc::new(Mutex::new(None));
    let exporter = match args.transport {
        Transport::Http => {
            let base = args.endpoint.trim_end_matches('/');
            let url = if base.ends_with("/v1/traces") {
                base.to_string()
            } else {
                format!("{base}/v1/traces")
            };
            opentelemetry_otlp::SpanExporter::builder()
                .with_http()
                .with_protocol(Protocol::HttpBinary)
                .with_endpoint(url)
                .with_timeout(EXPORT_TIMEOUT)
                .with_http_client(RuntimeHyperClient {
                    inner: HyperClient::with_default_connector(EXPORT_TIMEOUT, None),
                    runtime: tokio::runtime::Handle::current(),
                    last_cause: last_cause.clone(),
                })
                .build()
        }
        Transport::Grpc => opentelemetry_otlp::SpanExporter::builder()
            .with_tonic()
            .with_endpoint(args.endpoint.clone())
            .with_timeout(EXPORT_TIMEOUT)
            .build(),
    }
    .map_err(|e| format!("cannot build the OTLP exporter for {service}: {e}"))?;
    let exporter = CountingExporter {
        inner: exporter,
        stats: stats.clone(),
        service,
        endpoint: args.endpoint.clone(),
        last_cause,
    };
    let processor = BatchSpanProcessor::builder(exporter)
        .with_batch_config(
            BatchConfigBuilder::default()
                .with_scheduled_delay(BATCH_DELAY)
                .with_max_queue_size(65_536)
                .with_max_export_batch_size(1024)
                .build(),
        )
        .build();
    Ok(SdkTracerProvider::builder()
        .with_resource(
            Resource::builder_empty()
                .with_service_name(service)
                .with_attribute(KeyValue::new("service.namespace", "shop"))
                .with_attribute(KeyValue::new("deployment.environment.name", "demo"))
                .build(),
        )
        .with_span_processor(processor)
        .build())
}

struct Shop {
    tracers: Vec<(Service, SdkTracer)>,
}

impl Shop {
    fn tracer(&self, service: Service) -> &SdkTracer {
        &self.tracers.iter().find(|(s, _)| *s == service).unwrap().1
    }
}

// ---------------------------------------------------------------------------------------
// Main

/// Counts SIGINT/SIGTERM.
fn watch_signals() -> watch::Receiver<u32> {
    let (tx, rx) = watch::channel(0u32);
    tokio::spawn(async move {
        #[cfg(unix)]
        let mut term = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate())
            .expect("SIGTERM handler");
        loop {
            #[cfg(unix)]
            tokio::select! {
                r = tokio::signal::ctrl_c() => { if r.is_err() { std::future::pending::<()>().await; } }
                _ = term.recv() => {}
            }
            #[cfg(not(unix))]
            if tokio::signal::ctrl_c().await.is_err() {
                std::future::pending::<()>().await;
            }
            tx.send_modify(|n| *n += 1);
        }
    });
    rx
}

fn main() -> ExitCode {
    let args = match parse_args(std::env::args().skip(1)) {
        Ok(Parsed::Run(args)) => args,
        Ok(Parsed::Help) => {
            print!("{}", cli::help());
            return ExitCode::SUCCESS;
        }
        Err(e) => {
            let _ = e.print();
            return ExitCode::from(2);
        }
    };
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .expect("tokio runtime");
    if args.network_flows {
        return runtime.block_on(network::run(args));
    }
    runtime.block_on(run(args))
}

async fn run(args: Args) -> ExitCode {
    let stats = Arc::new(ExportStats::default());
    let (providers, shop) = match start_shop(&args, &stats) {
        Ok(started) => started,
        Err(e) => {
            eprintln!("flowmetrics-demo: {e}");
            return ExitCode::from(2);
        }
    };
    announce(&args);
    let tally: Tally = Arc::default();
    let (abort_tx, abort_rx) = watch::channel(false);
    let mut signals = watch_signals();
    let began = Instant::now();
    let (done_tx, done_rx) = watch::channel(false);
    let progress = args.progress.map(|every| {
        tokio::spawn(report_progress(
            every,
            began,
            tally.clone(),
            stats.clone(),
            done_rx,
        ))
    });
    let instances = Instances {
        shop,
        tally: tally.clone(),
        abort: abort_rx,
    };
    let tasks = generate(&args, &instances, began, &mut signals).await;
    drain(tasks, &args, &mut signals, &abort_tx).await;
    for e in flush_and_shut_down(providers, args.endpoint.clone()).await {
        eprintln!("flowmetrics-demo: warning: {e}");
    }
    let _ = done_tx.send(true);
    if let Some(progress) = progress {
        let _ = progress.await;
    }
    let tally = tally.lock().unwrap().clone();
    report_sent(&args, &tally, &stats, began)
}

/// One tracer provider per service, and the shop's tracers.
fn start_shop(
    args: &Args,
    stats: &Arc<ExportStats>,
) -> Result<(Vec<SdkTracerProvider>, Arc<Shop>), String> {
    let mut providers = Vec::new();
    let mut tracers = Vec::new();
    for (service, name) in SERVICES {
        let provider = build_provider(args, name, stats)?;
        tracers.push((service, provider.tracer("flowmetrics-demo")));
        providers.push(provider);
    }
    Ok((providers, Arc::new(Shop { tracers })))
}

fn announce(args: &Args) {
    eprintln!(
        "flowmetrics-demo: {} flows/s to {} ({}), {}, seed {}, max latency {}",
        args.rate,
        args.endpoint,
        match args.transport {
            Transport::Http => "OTLP/HTTP protobuf",
            Transport::Grpc => "OTLP/gRPC",
        },
        match args.duration {
            Some(d) => format!("for {}", humantime::format_duration(d)),
            None => "until stopped".into(),
        },
        args.seed,
        humantime::format_duration(args.max_latency),
    );
}

/// What every flow instance's task needs.
struct Instances {
    shop: Arc<Shop>,
    tally: Tally,
    abort: watch::Receiver<bool>,
}

/// Starts flow instances (Poisson arrivals) until the duration is over or a signal
/// comes; the instances still in flight.
async fn generate(
    args: &Args,
    instances: &Instances,
    began: Instant,
    signals: &mut watch::Receiver<u32>,
) -> JoinSet<()> {
    let run_id = format!(
        "{:x}",
        SystemTime::now()
            .duration_since(UNIX_EPOCH)
            .unwrap_or_default()
            .as_millis()
            & 0xff_ffff_ffff
    );
    let mut rng = Rng(args.seed);
    let mut tasks = JoinSet::new();
    let stop_at = args.duration.map(|d| began + d);
    let mut next = began;
    let mut n = 0u64;
    loop {
        // Poisson arrivals: exponential gaps.
        let gap = -(1.0 - rng.unit()).ln() / args.rate;
        next += Duration::from_secs_f64(gap);
        if let Some(stop_at) = stop_at.filter(|s| next >= *s) {
            tokio::select! {
                _ = tokio::time::sleep_until(stop_at) => {}
                _ = signals.changed() => {}
            }
            return tasks;
        }
        tokio::select! {
            _ = tokio::time::sleep_until(next) => {}
            _ = signals.changed() => return tasks,
        }
        let p = plan(&mut rng, &run_id, n, args.max_latency);
        n += 1;
        tasks.spawn(journey::run_instance(
            instances.shop.clone(),
            p,
            instances.tally.clone(),
            instances.abort.clone(),
        ));
        while tasks.try_join_next().is_some() {}
    }
}

/// Lets the flows in flight end, bounded by the longest latency; a signal (or the
/// bound) aborts the rest.
async fn drain(
    mut tasks: JoinSet<()>,
    args: &Args,
    signals: &mut watch::Receiver<u32>,
    abort: &watch::Sender<bool>,
) {
    if tasks.is_empty() {
        return;
    }
    let bound = args.max_latency + END_FIRST_HOLD + Duration::from_secs(1);
    eprintln!(
        "flowmetrics-demo: stopped starting flows; waiting for {} in flight (at most {}, signal again to stop now)",
        tasks.len(),
        humantime::format_duration(bound)
    );
    let deadline = Instant::now() + bound;
    let drained = async { while tasks.join_next().await.is_some() {} };
    tokio::pin!(drained);
    let finished = tokio::select! {
        _ = &mut drained => true,
        _ = tokio::time::sleep_until(deadline) => false,
        _ = signals.changed() => false,
    };
    if !finished {
        let _ = abort.send(true);
        drained.await;
    }
}

/// Flushes and shuts down the providers (both block, so off the async workers); the
/// distinct failures.
async fn flush_and_shut_down(providers: Vec<SdkTracerProvider>, endpoint: String) -> Vec<String> {
    let errors = tokio::task::spawn_blocking(move || {
        let mut errors = Vec::new();
        for p in &providers {
            if let Err(e) = p.force_flush() {
                errors.push(format!(
                    "final flush failed: {} at {endpoint}",
                    cause_from_text(&e.to_string())
                ));
            }
        }
        for p in &providers {
            if let Err(e) = p.shutdown() {
                errors.push(format!(
                    "shutdown failed: {} at {endpoint}",
                    cause_from_text(&e.to_string())
                ));
            }
        }
        errors
    })
    .await
    .unwrap_or_else(|e| vec![format!("flush task: {e}")]);
    let mut seen = std::collections::BTreeSet::new();
    errors
        .into_iter()
        .filter(|e| seen.insert(e.clone()))
        .collect()
}

/// Writes the summary file and the table of what was sent; failure when an export (or
/// the summary) failed.
fn report_sent(
    args: &Args,
    tally: &BTreeMap<&'static str, Counts>,
    stats: &ExportStats,
    began: Instant,
) -> ExitCode {
    let summary_written = write_summary(args, &summary_json(tally));
    let exports = stats.totals();
    eprint!(
        "flowmetrics-demo: done in {:.1}s, sent to {}:\n{}",
        began.elapsed().as_secs_f64(),
        args.endpoint,
        summary_table(tally, &exports)
    );
    let failed = exports.failed;
    if let Some(first) = stats.first_error.lock().unwrap().as_ref() {
        eprintln!("flowmetrics-demo: {failed} exports failed; the first: {first}");
    }
    exit_code(summary_written, failed)
}

/// Writes `json` to `--summary`, when given; whether that went well (or was not asked).
fn write_summary(args: &Args, json: &str) -> bool {
    let Some(path) = &args.summary else {
        return true;
    };
    match std::fs::write(path, json) {
        Ok(()) => true,
        Err(e) => {
            eprintln!("flowmetrics-demo: cannot write {}: {e}", path.display());
            false
        }
    }
}

/// Success when the summary was written and no export failed.
fn exit_code(summary_written: bool, failed: u64) -> ExitCode {
    if summary_written && failed == 0 {
        ExitCode::SUCCESS
    } else {
        ExitCode::FAILURE
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn same_seed_same_plans() {
        let draw = |seed| {
            let mut rng = Rng(seed);
            (0..200)
                .map(|n| {
                    let p = plan(&mut rng, "r", n, Duration::from_secs(30));
                    (p.flow, p.latency, p.outcome, p.steps, p.start_last)
                })
                .collect::<Vec<_>>()
        };
        assert_eq!(draw(1), draw(1));
        assert_ne!(draw(1), draw(2));
    }

    #[test]
    fn plans_have_the_promised_spread() {
        let mut rng = Rng(99);
        let max = Duration::from_secs(30);
        let plans: Vec<Plan> = (0..20_000).map(|n| plan(&mut rng, "r", n, max)).collect();
        let share = |f: &dyn Fn(&Plan) -> bool| {
            plans.iter().filter(|p| f(p)).count() as f64 / plans.len() as f64
        };
        assert!(share(&|p| p.flow == 0) > 0.45);
        assert!(share(&|p| p.outcome == Some(Outcome::Success)) > 0.8);
        assert!(share(&|p| p.outcome == Some(Outcome::Failure)) > 0.04);
        assert!(share(&|p| p.outcome == Some(Outcome::Cancelled)) > 0.02);
        assert!(share(&|p| p.outcome.is_none()) > 0.005);
        assert!(share(&|p| p.start_last) > 0.05);
        assert!(plans.iter().all(|p| p.steps <= FLOWS[p.flow].steps.len()));
        // Every checkout success sends all its steps; unfinished ones stall everywhere.
        assert!(plans
            .iter()
            .filter(|p| p.flow == 0 && p.outcome == Some(Outcome::Success))
            .all(|p| p.steps == journey::CHECKOUT_STEPS.len()));
        for k in 0..=journey::CHECKOUT_STEPS.len() {
            assert!(
                share(&|p| p.flow == 0 && p.outcome.is_none() && p.steps == k) > 0.002,
                "checkout instances stalling after {k} steps"
            );
        }
        assert!(share(&|p| p.flow != 0 && p.steps > 0) == 0.0);
        assert!(share(&|p| p.latency < Duration::from_millis(100)) > 0.02);
        assert!(share(&|p| p.latency > Duration::from_secs(10)) > 0.005);
        assert!(plans
            .iter()
            .all(|p| p.latency <= max && p.latency >= Duration::from_millis(1)));
    }

    #[test]
    fn causes_are_short_and_named() {
        assert_eq!(
            cause_from_text("TonicTracesClient export failed with gRPC code: Unavailable: transport error: tcp connect error: Connection refused (os error 111)"),
            "connection refused"
        );
        assert_eq!(
            cause_from_text("dns error: failed to lookup address information"),
            "host name not resolved"
        );
        assert_eq!(cause_from_text(" odd failure "), "odd failure");
        let refused = std::io::Error::from(std::io::ErrorKind::ConnectionRefused);
        assert_eq!(cause_of(&refused), "connection refused");
    }

    #[test]
    fn summary_shape() {
        let mut t = BTreeMap::new();
        t.insert(
            "payment",
            Counts {
                started: 5,
                success: 2,
                failure: 1,
                cancelled: 1,
                ..Counts::default()
            },
        );
        t.insert(
            "checkout",
            Counts {
                started: 3,
                success: 1,
                steps: [3, 2, 1, 1],
                stalled: [1, 1, 0, 0, 0],
                ..Counts::default()
            },
        );
        assert_eq!(
            summary_json(&t),
            "{\"flows\":{\"checkout\":{\"started\":3,\"success\":1,\"failure\":0,\"cancelled\":0,\"unfinished\":2,\
             \"steps\":{\"cart\":3,\"payment_authorized\":2,\"packed\":1,\"shipped\":1},\
             \"stalled\":{\"start\":1,\"cart\":1,\"payment_authorized\":0,\"packed\":0,\"shipped\":0}},\
             \"payment\":{\"started\":5,\"success\":2,\"failure\":1,\"cancelled\":1,\"unfinished\":1},\
             \"refund\":{\"started\":0,\"success\":0,\"failure\":0,\"cancelled\":0,\"unfinished\":0}}}\n"
        );
    }
}
