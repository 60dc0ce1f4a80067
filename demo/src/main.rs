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
use std::path::PathBuf;
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

mod journey;
mod network;

const HELP: &str = "\
flowmetrics-demo - simulated shop traffic for flowmetrics, sent with the OpenTelemetry SDK

USAGE:
    flowmetrics-demo [OPTIONS]

Simulates three services (order-service, payment-service, fulfillment-service), each with
its own OpenTelemetry tracer provider and service.name, running three business flows:

    checkout  start: order-service
              steps: cart (order-service), payment_authorized (payment-service),
                     packed, shipped (fulfillment-service)
              end:   fulfillment-service
    payment   start: payment-service   end: payment-service (callback, another trace)
    refund    start: order-service     end: payment-service

Each flow instance is a span carrying the event `flow.<flow>.start` with attribute
`correlation-id`, and later, in another service and trace, a span carrying
`flow.<flow>.end` with attributes `correlation-id` and `outcome`. Outcomes are mostly
`success`, some `failure` (span status ERROR), some `cancelled`; 1-5% of instances
never end (flowmetrics counts them as `incomplete` once the flow timeout passes).

Checkout instances also pass through steps, each a span event `flow.checkout.step`
with attributes `correlation-id` and `step`, at 10%, 40%, 70% and 90% of the latency.
Successful checkouts send all four; failed ones stop after `cart` (payment declined)
or `packed` (out of stock); cancelled ones after `cart` or `payment_authorized`.
Unfinished checkouts stall after any number of steps, from none (`start`) to
`shipped`, and never send the later steps or the end. Configure flowmetrics with
`flows.per_flow.checkout.steps: [cart, payment_authorized, packed, shipped]`.

About 10% of instances export their start after everything else they send (steps and
end): the start's span stays open until after those have been exported. Latencies follow a log-normal spread per flow, from
milliseconds to tens of seconds, capped at --max-latency. Spans are exported in batches
every 500ms.

OPTIONS:
    --endpoint URL         OTLP endpoint. HTTP: base URL, `/v1/traces` is appended
                           unless present. gRPC: the server URL.
                           [default: http://127.0.0.1:4318 for http,
                                     http://127.0.0.1:4317 for grpc]
    --protocol PROTO       `http` (OTLP/HTTP protobuf) or `grpc` (OTLP/gRPC)
                           [default: http]
    --rate N               flow instances started per second, on average (Poisson
                           arrivals); fractions allowed [default: 20]
    --duration D           how long to start new flows, e.g. 30s, 5m, 1h30m;
                           0 runs until SIGINT/SIGTERM [default: 60s]
    --seed N               seed (u64) for every random choice; the same seed replays
                           the same flows [default: derived from the clock, printed]
    --max-latency D        cap on a flow's start-to-end latency; also bounds how long
                           the exit waits for in-flight flows [default: 30s]
    --progress D           print a progress line this often (flows started and
                           ended per flow, exports OK/failed, rate); 0 turns it
                           off [default: 5s]
    --summary PATH         write what was sent as JSON:
                           {\"flows\":{\"checkout\":{\"started\":N,\"success\":N,
                           \"failure\":N,\"cancelled\":N,\"unfinished\":N,
                           \"steps\":{\"cart\":N,...},\"stalled\":{\"start\":N,
                           \"cart\":N,...}},...}}
                           unfinished = started without an end sent; steps =
                           step events sent; stalled = unfinished instances by
                           the last step sent (flows with steps only)
    --network-flows        instead of flows, export Flow Spans (network flow records
                           between the shop's workloads, --rate records/s)
    -h, --help             print this help

EXIT:
    When --duration is over, or on SIGINT/SIGTERM, no new flows start; flows in flight
    still get their end (the wait is bounded by --max-latency plus 3s), then the
    providers are flushed and shut down, the summary is written and a summary table
    goes to stderr. A second SIGINT/SIGTERM stops waiting: flows still in flight count as
    unfinished. A failed export is reported at once with the endpoint and the cause
    (e.g. `connection refused at http://127.0.0.1:4318`), later ones in the progress
    lines.
    Exit status: 0 on success, 1 when an export failed, 2 on bad arguments.

EXAMPLES:
    flowmetrics-demo --duration 10s --summary /tmp/sent.json
    flowmetrics-demo --protocol grpc --rate 100 --duration 0
    flowmetrics-demo --endpoint http://flowmetrics:4318 --seed 7 --max-latency 5s
";

/// How long a start span stays open after the instance's last event was emitted, for
/// instances whose start is exported last: longer than the batch delay, so the other
/// events' batches leave first.
const END_FIRST_HOLD: Duration = Duration::from_millis(2000);
const BATCH_DELAY: Duration = Duration::from_millis(500);
const EXPORT_TIMEOUT: Duration = Duration::from_secs(5);

// ---------------------------------------------------------------------------------------
// Arguments

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Transport {
    Http,
    Grpc,
}

#[derive(Debug)]
struct Args {
    endpoint: String,
    transport: Transport,
    rate: f64,
    /// `None`: forever.
    duration: Option<Duration>,
    seed: u64,
    summary: Option<PathBuf>,
    max_latency: Duration,
    /// `None`: no progress lines.
    progress: Option<Duration>,
}

enum Parsed {
    Run(Args),
    Help,
}

fn parse_duration(flag: &str, value: &str) -> Result<Duration, String> {
    if value.trim() == "0" {
        return Ok(Duration::ZERO);
    }
    humantime::parse_duration(value.trim())
        .map_err(|e| format!("{flag}: invalid duration {value:?} ({e}); use e.g. 30s, 5m, 1h"))
}

fn parse_args(mut argv: impl Iterator<Item = String>) -> Result<Parsed, String> {
    let mut endpoint = None;
    let mut transport = Transport::Http;
    let mut rate = 20.0;
    let mut duration = Some(Duration::from_secs(60));
    let mut seed = None;
    let mut summary = None;
    let mut max_latency = Duration::from_secs(30);
    let mut progress = Some(Duration::from_secs(5));

    while let Some(arg) = argv.next() {
        if arg == "-h" || arg == "--help" {
            return Ok(Parsed::Help);
        }
        let (flag, inline) = match arg.split_once('=') {
            Some((f, v)) if f.starts_with("--") => (f.to_string(), Some(v.to_string())),
            _ => (arg.clone(), None),
        };
        let known = [
            "--endpoint",
            "--protocol",
            "--rate",
            "--duration",
            "--seed",
            "--summary",
            "--max-latency",
            "--progress",
        ];
        if !known.contains(&flag.as_str()) {
            return Err(format!("unknown argument {arg:?}"));
        }
        let value = match inline {
            Some(v) => v,
            None => argv.next().ok_or_else(|| format!("{flag} needs a value"))?,
        };
        match flag.as_str() {
            "--endpoint" => {
                if !(value.starts_with("http://") || value.starts_with("https://")) {
                    return Err(format!("--endpoint: {value:?} is not an http:// URL"));
                }
                endpoint = Some(value);
            }
            "--protocol" => {
                transport = match value.to_ascii_lowercase().as_str() {
                    "http" | "http/protobuf" => Transport::Http,
                    "grpc" => Transport::Grpc,
                    _ => return Err(format!("--protocol: {value:?} is neither http nor grpc")),
                }
            }
            "--rate" => {
                rate = value
                    .parse::<f64>()
                    .ok()
                    .filter(|r| r.is_finite() && *r > 0.0 && *r <= 1_000_000.0)
                    .ok_or_else(|| format!("--rate: {value:?} is not a number in (0, 1000000]"))?
            }
            "--duration" => {
                let d = parse_duration("--duration", &value)?;
                duration = (!d.is_zero()).then_some(d);
            }
            "--seed" => {
                seed =
                    Some(value.parse::<u64>().map_err(|_| {
                        format!("--seed: {value:?} is not an unsigned 64-bit integer")
                    })?)
            }
            "--summary" => summary = Some(PathBuf::from(value)),
            "--max-latency" => {
                max_latency = parse_duration("--max-latency", &value)?;
                if max_latency < Duration::from_millis(1) {
                    return Err("--max-latency must be at least 1ms".into());
                }
            }
            "--progress" => {
                let d = parse_duration("--progress", &value)?;
                progress = (!d.is_zero()).then_some(d.max(Duration::from_millis(100)));
            }
            _ => unreachable!(),
        }
    }
    let endpoint = endpoint.unwrap_or_else(|| match transport {
        Transport::Http => "http://127.0.0.1:4318".into(),
        Transport::Grpc => "http://127.0.0.1:4317".into(),
    });
    let seed = seed.unwrap_or_else(|| {
        let now = SystemTime::now()
            .duration_since(UNIX_EPOCH)
            .unwrap_or_default();
        now.as_nanos() as u64 ^ u64::from(std::process::id()).rotate_left(32)
    });
    Ok(Parsed::Run(Args {
        endpoint,
        transport,
        rate,
        duration,
        seed,
        summary,
        max_latency,
        progress,
    }))
}

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
    let (network_flows, argv) = network::take_flag(std::env::args().skip(1));
    let args = match parse_args(argv.into_iter()) {
        Ok(Parsed::Run(args)) => args,
        Ok(Parsed::Help) => {
            print!("{HELP}");
            return ExitCode::SUCCESS;
        }
        Err(e) => {
            eprintln!("flowmetrics-demo: {e}\nTry `flowmetrics-demo --help`.");
            return ExitCode::from(2);
        }
    };
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .expect("tokio runtime");
    if network_flows {
        return runtime.block_on(network::run(args));
    }
    runtime.block_on(run(args))
}

async fn run(args: Args) -> ExitCode {
    let stats = Arc::new(ExportStats::default());
    let mut providers = Vec::new();
    let mut tracers = Vec::new();
    for (service, name) in SERVICES {
        let provider = match build_provider(&args, name, &stats) {
            Ok(p) => p,
            Err(e) => {
                eprintln!("flowmetrics-demo: {e}");
                return ExitCode::from(2);
            }
        };
        tracers.push((service, provider.tracer("flowmetrics-demo")));
        providers.push(provider);
    }
    let shop = Arc::new(Shop { tracers });

    let run_id = format!(
        "{:x}",
        SystemTime::now()
            .duration_since(UNIX_EPOCH)
            .unwrap_or_default()
            .as_millis()
            & 0xff_ffff_ffff
    );
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

    let tally: Tally = Arc::default();
    let (abort_tx, abort_rx) = watch::channel(false);
    let mut signals = watch_signals();
    let mut rng = Rng(args.seed);
    let mut tasks = JoinSet::new();
    let began = Instant::now();
    let stop_at = args.duration.map(|d| began + d);
    let mut next = began;
    let mut n = 0u64;
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

    // Generate until the duration is over or a signal comes.
    loop {
        // Poisson arrivals: exponential gaps.
        let gap = -(1.0 - rng.unit()).ln() / args.rate;
        next += Duration::from_secs_f64(gap);
        if stop_at.is_some_and(|s| next >= s) {
            tokio::select! {
                _ = tokio::time::sleep_until(stop_at.unwrap()) => {}
                _ = signals.changed() => {}
            }
            break;
        }
        tokio::select! {
            _ = tokio::time::sleep_until(next) => {}
            _ = signals.changed() => break,
        }
        let p = plan(&mut rng, &run_id, n, args.max_latency);
        n += 1;
        tasks.spawn(journey::run_instance(
            shop.clone(),
            p,
            tally.clone(),
            abort_rx.clone(),
        ));
        while tasks.try_join_next().is_some() {}
    }

    // Let flows in flight end, bounded.
    if !tasks.is_empty() {
        eprintln!(
            "flowmetrics-demo: stopped starting flows; waiting for {} in flight (at most {}, signal again to stop now)",
            tasks.len(),
            humantime::format_duration(args.max_latency + END_FIRST_HOLD + Duration::from_secs(1))
        );
        let deadline = Instant::now() + args.max_latency + END_FIRST_HOLD + Duration::from_secs(1);
        let drained = async { while tasks.join_next().await.is_some() {} };
        tokio::pin!(drained);
        let finished = tokio::select! {
            _ = &mut drained => true,
            _ = tokio::time::sleep_until(deadline) => false,
            _ = signals.changed() => false,
        };
        if !finished {
            let _ = abort_tx.send(true);
            drained.await;
        }
    }

    // Flush and shut down the providers; both block, so off the async workers.
    let endpoint = args.endpoint.clone();
    let flushed = tokio::task::spawn_blocking(move || {
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
    for e in flushed {
        if seen.insert(e.clone()) {
            eprintln!("flowmetrics-demo: warning: {e}");
        }
    }

    let _ = done_tx.send(true);
    if let Some(progress) = progress {
        let _ = progress.await;
    }
    let tally = tally.lock().unwrap().clone();
    let mut code = ExitCode::SUCCESS;
    if let Some(path) = &args.summary {
        if let Err(e) = std::fs::write(path, summary_json(&tally)) {
            eprintln!("flowmetrics-demo: cannot write {}: {e}", path.display());
            code = ExitCode::FAILURE;
        }
    }
    let exports = stats.totals();
    eprint!(
        "flowmetrics-demo: done in {:.1}s, sent to {}:\n{}",
        began.elapsed().as_secs_f64(),
        args.endpoint,
        summary_table(&tally, &exports)
    );
    let failed = exports.failed;
    if let Some(first) = stats.first_error.lock().unwrap().as_ref() {
        eprintln!("flowmetrics-demo: {failed} exports failed; the first: {first}");
    }
    if failed > 0 {
        code = ExitCode::FAILURE;
    }
    code
}

#[cfg(test)]
mod tests {
    use super::*;

    fn args(list: &[&str]) -> Result<Parsed, String> {
        parse_args(list.iter().map(|s| s.to_string()))
    }

    #[test]
    fn defaults_and_flags() {
        let Parsed::Run(a) = args(&["--seed", "7"]).unwrap() else {
            panic!()
        };
        assert_eq!(a.endpoint, "http://127.0.0.1:4318");
        assert_eq!(a.transport, Transport::Http);
        assert_eq!(a.rate, 20.0);
        assert_eq!(a.duration, Some(Duration::from_secs(60)));
        assert_eq!(a.seed, 7);
        assert_eq!(a.max_latency, Duration::from_secs(30));
        assert_eq!(a.progress, Some(Duration::from_secs(5)));
        let Parsed::Run(a) = args(&["--progress", "0"]).unwrap() else {
            panic!()
        };
        assert_eq!(a.progress, None);

        let Parsed::Run(a) = args(&[
            "--protocol=grpc",
            "--duration",
            "0",
            "--rate",
            "2.5",
            "--max-latency",
            "5s",
        ])
        .unwrap() else {
            panic!()
        };
        assert_eq!(a.endpoint, "http://127.0.0.1:4317");
        assert_eq!(a.transport, Transport::Grpc);
        assert_eq!(a.duration, None);
        assert_eq!(a.rate, 2.5);
        assert_eq!(a.max_latency, Duration::from_secs(5));

        assert!(matches!(args(&["--help"]), Ok(Parsed::Help)));
        for bad in [
            &["--rate", "0"][..],
            &["--rate"],
            &["--protocol", "udp"],
            &["--duration", "soon"],
            &["--endpoint", "localhost:4318"],
            &["--frobnicate"],
        ] {
            assert!(args(bad).is_err(), "{bad:?}");
        }
    }

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
