//! `--network-flows`: the demo as a network observer (an eBPF agent, say) exporting one
//! Flow Span per flow record between the shop's workloads, following the Flow Span
//! convention: `flow.*` deltas, `network.transport`, `source.*` / `destination.*` with
//! addresses, ports and Kubernetes metadata.

use std::process::ExitCode;
use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::time::{Duration, SystemTime};

use opentelemetry::trace::{Span as _, SpanKind, Tracer as _, TracerProvider as _};
use opentelemetry::KeyValue;
use tokio::time::Instant;

use super::{build_provider, exit_code, watch_signals, write_summary, Args, ExportStats, Rng};

/// A workload: (namespace, kind, name, pod address).
type Workload = (&'static str, &'static str, &'static str, &'static str);

const WORKLOADS: [Workload; 7] = [
    ("shop", "deployment", "frontend", "10.1.1.5"),
    ("shop", "deployment", "cart", "10.1.1.17"),
    ("shop", "deployment", "checkout", "10.1.1.23"),
    ("shop", "deployment", "payments", "10.1.2.4"),
    ("shop", "deployment", "catalog", "10.1.2.10"),
    ("data", "statefulset", "postgres", "10.1.3.2"),
    ("data", "statefulset", "redis", "10.1.3.9"),
];

/// (source, destination, transport, port, weight, median request bytes, reply factor).
const CONVERSATIONS: [(usize, usize, &str, i64, f64, f64, f64); 8] = [
    (0, 4, "tcp", 8080, 5.0, 900.0, 30.0),
    (0, 1, "tcp", 8080, 3.0, 700.0, 4.0),
    (0, 2, "tcp", 8080, 1.5, 1500.0, 2.0),
    (2, 3, "tcp", 8443, 1.0, 2200.0, 0.8),
    (2, 5, "tcp", 5432, 2.0, 600.0, 6.0),
    (1, 6, "tcp", 6379, 4.0, 120.0, 3.0),
    (4, 5, "tcp", 5432, 2.5, 400.0, 25.0),
    (3, 4, "udp", 53, 0.5, 80.0, 1.5),
];

/// Observation window of one record: records are exported when it closes.
const WINDOW: Duration = Duration::from_secs(10);

#[derive(Default)]
struct Sent {
    records: u64,
    bytes: [u64; 2],
    packets: [u64; 2],
}

pub async fn run(args: Args) -> ExitCode {
    let stats = Arc::new(ExportStats::default());
    let provider = match build_provider(&args, "network-agent", &stats) {
        Ok(p) => p,
        Err(e) => {
            eprintln!("flowmetrics-demo: {e}");
            return ExitCode::from(2);
        }
    };
    let tracer = provider.tracer("flowmetrics-demo-network");
    eprintln!(
        "flowmetrics-demo: {} Flow Span records/s to {}, seed {}",
        args.rate, args.endpoint, args.seed
    );
    let mut signals = watch_signals();
    let mut rng = Rng(args.seed);
    let weights: Vec<f64> = CONVERSATIONS.iter().map(|c| c.4).collect();
    let began = Instant::now();
    let stop_at = args.duration.map(|d| began + d);
    let mut next = began;
    let mut sent = Sent::default();
    loop {
        next += Duration::from_secs_f64(-(1.0 - rng.unit()).ln() / args.rate);
        if stop_at.is_some_and(|s| next >= s) {
            break;
        }
        tokio::select! {
            _ = tokio::time::sleep_until(next) => {}
            _ = signals.changed() => break,
        }
        let (attributes, forward, reverse) = record(&mut rng, &weights);
        let end = SystemTime::now();
        let mut span = tracer
            .span_builder("flow")
            .with_kind(SpanKind::Internal)
            .with_start_time(end - WINDOW)
            .with_attributes(attributes)
            .start(&tracer);
        span.end_with_timestamp(end);
        sent.add(forward, reverse);
    }

    let flushed = tokio::task::spawn_blocking(move || -> Result<(), String> {
        provider.force_flush().map_err(|e| e.to_string())?;
        provider.shutdown().map_err(|e| e.to_string())
    })
    .await
    .unwrap_or_else(|e| Err(e.to_string()));
    if let Err(e) = flushed {
        eprintln!("flowmetrics-demo: warning: flush: {e}");
    }
    report_sent(&args, &sent, &stats, began)
}

/// One flow record between two workloads of a conversation drawn by weight: the span's
/// attributes, the bytes forward and in reply.
fn record(rng: &mut Rng, weights: &[f64]) -> (Vec<KeyValue>, i64, i64) {
    let (src, dst, transport, port, _, median, reply) = CONVERSATIONS[rng.pick(weights)];
    let (s, d) = (WORKLOADS[src], WORKLOADS[dst]);
    // Log-normal sizes around the conversation's median; ~1400-byte segments.
    let forward = (median * (0.6 * rng.normal()).exp()).round().max(1.0) as i64;
    let reverse = (forward as f64 * reply * (0.4 * rng.normal()).exp()).round() as i64;
    let source_port = 32768 + (rng.next_u64() % 28000) as i64;
    let mut attributes = vec![
        KeyValue::new("flow.community_id", format!("1:{:016x}", rng.next_u64())),
        KeyValue::new("flow.direction", "initiator"),
        KeyValue::new("flow.bytes.delta", forward),
        KeyValue::new("flow.reverse.bytes.delta", reverse),
        KeyValue::new("flow.packets.delta", packets(forward)),
        KeyValue::new("flow.reverse.packets.delta", packets(reverse)),
        KeyValue::new("network.transport", transport),
        KeyValue::new("network.type", "ipv4"),
    ];
    for (side, w, p) in [("source", s, source_port), ("destination", d, port)] {
        let (namespace, kind, name, address) = w;
        attributes.extend([
            KeyValue::new(format!("{side}.address"), address),
            KeyValue::new(format!("{side}.port"), p),
            KeyValue::new(format!("{side}.k8s.namespace.name"), namespace),
            KeyValue::new(format!("{side}.k8s.{kind}.name"), name),
            KeyValue::new(
                format!("{side}.k8s.pod.name"),
                format!("{name}-{:05x}", rng.next_u64() & 0xfffff),
            ),
        ]);
    }
    (attributes, forward, reverse)
}

/// Packets for `bytes`: ~1400-byte segments, and one more.
fn packets(bytes: i64) -> i64 {
    (bytes + 1399) / 1400 + 1
}

impl Sent {
    fn add(&mut self, forward: i64, reverse: i64) {
        self.records += 1;
        self.bytes[0] += forward as u64;
        self.bytes[1] += reverse as u64;
        self.packets[0] += packets(forward) as u64;
        self.packets[1] += packets(reverse) as u64;
    }
}

/// Writes the summary file and the line of what was sent; failure when an export (or
/// the summary) failed.
fn report_sent(args: &Args, sent: &Sent, stats: &ExportStats, began: Instant) -> ExitCode {
    let json = format!(
        "{{\"network\":{{\"records\":{},\"bytes\":{{\"forward\":{},\"reverse\":{}}},\"packets\":{{\"forward\":{},\"reverse\":{}}}}}}}\n",
        sent.records, sent.bytes[0], sent.bytes[1], sent.packets[0], sent.packets[1]
    );
    let summary_written = write_summary(args, &json);
    let failed = stats.spans_failed.load(Ordering::Relaxed);
    eprintln!(
        "flowmetrics-demo: sent {} Flow Span records ({} + {} bytes) in {:.1}s; {} spans exported, {failed} failed",
        sent.records,
        sent.bytes[0],
        sent.bytes[1],
        began.elapsed().as_secs_f64(),
        stats.spans_ok.load(Ordering::Relaxed),
    );
    exit_code(summary_written, failed)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_flag_is_taken_among_the_others() {
        use crate::cli::{parse_args, Parsed};
        let parse = |argv: &[&str]| match parse_args(argv.iter().map(|a| a.to_string())) {
            Ok(Parsed::Run(args)) => args,
            _ => panic!("{argv:?}"),
        };
        let on = parse(&["--rate", "5", "--network-flows", "--seed", "1"]);
        assert!(on.network_flows);
        assert_eq!((on.rate, on.seed), (5.0, 1));
        assert!(!parse(&["--rate", "5", "--seed", "1"]).network_flows);
    }

    #[test]
    fn conversations_name_existing_workloads() {
        for c in CONVERSATIONS {
            assert!(c.0 < WORKLOADS.len() && c.1 < WORKLOADS.len() && c.0 != c.1);
        }
    }
}
