//! The command line: flags, their defaults and checks, and the help text.

use std::path::PathBuf;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use clap::{CommandFactory as _, Parser};

const ABOUT: &str =
    "flowmetrics-demo - simulated shop traffic for flowmetrics, sent with the OpenTelemetry SDK";

const LONG_ABOUT: &str = "\
flowmetrics-demo - simulated shop traffic for flowmetrics, sent with the OpenTelemetry SDK

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
end): the start's span stays open until after those have been exported. Latencies
follow a log-normal spread per flow, from milliseconds to tens of seconds, capped at
--max-latency. Spans are exported in batches every 500ms.";

const AFTER_HELP: &str = "\
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
    flowmetrics-demo --endpoint http://flowmetrics:4318 --seed 7 --max-latency 5s";

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Transport {
    Http,
    Grpc,
}

/// What a run is to do, checked.
#[derive(Debug)]
pub struct Args {
    pub endpoint: String,
    pub transport: Transport,
    pub rate: f64,
    /// `None`: forever.
    pub duration: Option<Duration>,
    pub seed: u64,
    pub summary: Option<PathBuf>,
    pub max_latency: Duration,
    /// `None`: no progress lines.
    pub progress: Option<Duration>,
    /// Flow Spans instead of flows.
    pub network_flows: bool,
}

pub enum Parsed {
    Run(Args),
    Help,
}

#[derive(Parser, Debug)]
#[command(
    name = "flowmetrics-demo",
    about = ABOUT,
    long_about = LONG_ABOUT,
    after_long_help = AFTER_HELP,
    disable_help_flag = true,
    args_override_self = true
)]
struct Cli {
    /// OTLP endpoint. HTTP: base URL, `/v1/traces` is appended unless present. gRPC: the
    /// server URL [default: http://127.0.0.1:4318 for http, http://127.0.0.1:4317 for
    /// grpc]
    #[arg(long, value_name = "URL", value_parser = endpoint)]
    endpoint: Option<String>,
    /// `http` (OTLP/HTTP protobuf) or `grpc` (OTLP/gRPC)
    #[arg(long, value_name = "PROTO", default_value = "http", value_parser = protocol)]
    protocol: Transport,
    /// Flow instances started per second, on average (Poisson arrivals); fractions
    /// allowed
    #[arg(long, value_name = "N", default_value = "20", value_parser = rate)]
    rate: f64,
    /// How long to start new flows, e.g. 30s, 5m, 1h30m; 0 runs until SIGINT/SIGTERM
    #[arg(long, value_name = "D", default_value = "60s", value_parser = duration)]
    duration: Duration,
    /// Seed (u64) for every random choice; the same seed replays the same flows
    /// [default: derived from the clock, printed]
    #[arg(long, value_name = "N")]
    seed: Option<u64>,
    /// Cap on a flow's start-to-end latency; also bounds how long the exit waits for
    /// in-flight flows
    #[arg(long, value_name = "D", default_value = "30s", value_parser = max_latency)]
    max_latency: Duration,
    /// Print a progress line this often (flows started and ended per flow, exports
    /// OK/failed, rate); 0 turns it off
    #[arg(long, value_name = "D", default_value = "5s", value_parser = duration)]
    progress: Duration,
    /// Write what was sent as JSON: {"flows":{"checkout":{"started":N,"success":N,
    /// "failure":N,"cancelled":N,"unfinished":N,"steps":{"cart":N,...},
    /// "stalled":{"start":N,"cart":N,...}},...}}; unfinished = started without an end
    /// sent; steps = step events sent; stalled = unfinished instances by the last step
    /// sent (flows with steps only)
    #[arg(long, value_name = "PATH")]
    summary: Option<PathBuf>,
    /// Instead of flows, export Flow Spans (network flow records between the shop's
    /// workloads, --rate records/s)
    #[arg(long)]
    network_flows: bool,
    /// Print this help
    #[arg(short, long)]
    help: bool,
}

/// `0`, or a duration such as 30s, 5m, 1h.
fn duration(value: &str) -> Result<Duration, String> {
    if value.trim() == "0" {
        return Ok(Duration::ZERO);
    }
    humantime::parse_duration(value.trim())
        .map_err(|e| format!("invalid duration {value:?} ({e}); use e.g. 30s, 5m, 1h"))
}

fn max_latency(value: &str) -> Result<Duration, String> {
    let d = duration(value)?;
    if d < Duration::from_millis(1) {
        return Err("must be at least 1ms".into());
    }
    Ok(d)
}

fn endpoint(value: &str) -> Result<String, String> {
    if !(value.starts_with("http://") || value.starts_with("https://")) {
        return Err(format!("{value:?} is not an http:// URL"));
    }
    Ok(value.to_string())
}

fn protocol(value: &str) -> Result<Transport, String> {
    match value.to_ascii_lowercase().as_str() {
        "http" | "http/protobuf" => Ok(Transport::Http),
        "grpc" => Ok(Transport::Grpc),
        _ => Err(format!("{value:?} is neither http nor grpc")),
    }
}

fn rate(value: &str) -> Result<f64, String> {
    value
        .parse::<f64>()
        .ok()
        .filter(|r| r.is_finite() && *r > 0.0 && *r <= 1_000_000.0)
        .ok_or_else(|| format!("{value:?} is not a number in (0, 1000000]"))
}

/// The arguments after the program's name.
pub fn parse_args(argv: impl Iterator<Item = String>) -> Result<Parsed, clap::Error> {
    let cli = Cli::try_parse_from(std::iter::once("flowmetrics-demo".to_string()).chain(argv))?;
    if cli.help {
        return Ok(Parsed::Help);
    }
    let endpoint = cli.endpoint.unwrap_or_else(|| match cli.protocol {
        Transport::Http => "http://127.0.0.1:4318".into(),
        Transport::Grpc => "http://127.0.0.1:4317".into(),
    });
    let seed = cli.seed.unwrap_or_else(|| {
        let now = SystemTime::now()
            .duration_since(UNIX_EPOCH)
            .unwrap_or_default();
        now.as_nanos() as u64 ^ u64::from(std::process::id()).rotate_left(32)
    });
    Ok(Parsed::Run(Args {
        endpoint,
        transport: cli.protocol,
        rate: cli.rate,
        duration: (!cli.duration.is_zero()).then_some(cli.duration),
        seed,
        summary: cli.summary,
        max_latency: cli.max_latency,
        progress: (!cli.progress.is_zero()).then_some(cli.progress.max(Duration::from_millis(100))),
        network_flows: cli.network_flows,
    }))
}

/// The full help text (`--help`).
pub fn help() -> String {
    Cli::command().render_long_help().to_string()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn args(list: &[&str]) -> Result<Parsed, clap::Error> {
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
}
