//! Hostile HTTP/2 clients over loopback (docs/behaviour.md §6): many large gRPC streams, stalled
//! ones, and streams the client resets. Memory stays within the byte budget, and a
//! reset is not counted as bad input.

mod common;

use std::time::{Duration, Instant};

use bytes::Bytes;
use common::*;
use h2::client::SendRequest;
use h2::Reason;
use prost::Message;
use tokio::net::TcpStream;
use tokio::task::JoinHandle;

const PATIENCE: Duration = Duration::from_secs(60);
const MIB: usize = 1024 * 1024;

/// The tests of this file run one at a time: one measures the process's RSS, which the
/// other's streams would inflate.
static ONE_AT_A_TIME: tokio::sync::Mutex<()> = tokio::sync::Mutex::const_new(());

/// This process's resident memory (the service runs in it), in bytes.
fn rss() -> usize {
    let status = std::fs::read_to_string("/proc/self/status").unwrap();
    let line = status
        .lines()
        .find(|l| l.starts_with("VmRSS:"))
        .expect("VmRSS");
    let kib: usize = line.split_whitespace().nth(1).unwrap().parse().unwrap();
    kib * 1024
}

async fn h2_client(addr: std::net::SocketAddr) -> SendRequest<Bytes> {
    let tcp = TcpStream::connect(addr).await.unwrap();
    let (client, connection) = h2::client::handshake(tcp).await.unwrap();
    tokio::spawn(async move {
        let _ = connection.await;
    });
    client
}

fn grpc_request(addr: std::net::SocketAddr, path: &str) -> hyper::Request<()> {
    hyper::Request::post(format!("http://{addr}{path}"))
        .header("content-type", "application/grpc")
        .header("te", "trailers")
        .body(())
        .unwrap()
}

/// Sends `bytes` of `chunk` repeated, as flow control allows; `false` once the server
/// stopped the stream.
async fn send_within_window(
    stream: &mut h2::SendStream<Bytes>,
    chunk: &Bytes,
    mut bytes: usize,
    end: bool,
) -> bool {
    while bytes > 0 {
        let want = bytes.min(chunk.len());
        stream.reserve_capacity(want);
        let granted = match std::future::poll_fn(|cx| stream.poll_capacity(cx)).await {
            Some(Ok(n)) => n.min(want),
            _ => return false,
        };
        if granted == 0 {
            continue;
        }
        bytes -= granted;
        if stream
            .send_data(chunk.slice(..granted), end && bytes == 0)
            .is_err()
        {
            return false;
        }
    }
    true
}

/// The grpc-status of an answer (headers for trailers-only answers, else trailers).
async fn grpc_status(response: h2::client::ResponseFuture) -> Option<String> {
    let response = response.await.ok()?;
    if let Some(s) = response.headers().get("grpc-status") {
        return Some(s.to_str().unwrap().to_string());
    }
    let mut body = response.into_body();
    while let Some(data) = body.data().await {
        let data = data.ok()?;
        let _ = body.flow_control().release_capacity(data.len());
    }
    let trailers = body.trailers().await.ok()??;
    Some(trailers.get("grpc-status")?.to_str().unwrap().to_string())
}

/// Item 3: 100 streams of 30 MiB messages over 4 connections, half of them stalling
/// after 20 MiB. The memory they take stays under `limits.max_buffered_bytes` plus a
/// margin (it used to be all of it: 3 GB), the ones over budget get UNAVAILABLE, the
/// stalled ones are cut at the read deadline, and a good export still works.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn many_large_grpc_streams_stay_within_the_byte_budget() {
    let _alone = ONE_AT_A_TIME.lock().await;
    const BUDGET: usize = 64 * MIB;
    const MARGIN: usize = 96 * MIB;
    const STREAMS: usize = 100;
    const MESSAGE: usize = 30 * MIB;
    let mut config = test_config();
    config.limits.max_request_body_bytes = 32 * MIB;
    config.limits.max_buffered_bytes = BUDGET as u64;
    config.limits.request_read_timeout = Duration::from_secs(5);
    let app = start(config).await;
    let addr = app.otlp_grpc.unwrap();
    let baseline = rss();
    let chunk = Bytes::from(vec![0u8; MIB]);
    let mut clients = Vec::new();
    for _ in 0..4 {
        clients.push(h2_client(addr).await);
    }
    let mut calls = Vec::new();
    for i in 0..STREAMS {
        let mut client = clients[i % clients.len()].clone().ready().await.unwrap();
        let chunk = chunk.clone();
        calls.push(tokio::spawn(async move {
            let (response, mut stream) = client
                .send_request(grpc_request(addr, TRACE_EXPORT), false)
                .unwrap();
            let mut header = vec![0u8];
            header.extend_from_slice(&(MESSAGE as u32).to_be_bytes());
            let _ = stream.send_data(Bytes::from(header), false);
            let stall = i % 2 == 1;
            let sent = if stall { 20 * MIB } else { MESSAGE };
            let status = tokio::spawn(grpc_status(response));
            if send_within_window(&mut stream, &chunk, sent, !stall).await && stall {
                // Hold the stream open, sending nothing more, until answered.
                let status = status.await.unwrap();
                drop(stream);
                return status;
            }
            status.await.unwrap()
        }));
    }
    let mut peak = 0;
    let started = Instant::now();
    while !calls.iter().all(JoinHandle::is_finished) {
        peak = peak.max(rss());
        assert!(started.elapsed() < PATIENCE, "calls still open");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    let mut codes = std::collections::BTreeMap::<String, usize>::new();
    for c in calls {
        let code = c.await.unwrap().unwrap_or_else(|| "reset".into());
        *codes.entry(code).or_default() += 1;
    }
    let grown = peak.saturating_sub(baseline);
    assert!(
        grown < BUDGET + MARGIN,
        "RSS grew by {} MiB (budget {} MiB); answers {codes:?}",
        grown / MIB,
        BUDGET / MIB
    );
    // Over budget: UNAVAILABLE (14), retryable.
    assert!(codes.get("14").is_some_and(|n| *n > 0), "{codes:?}");
    // A good export afterwards.
    let event = otlp::flow_event("flow.after.start", "1", None, 1);
    let good = otlp::traces(None, vec![otlp::span(&[], &[], vec![event])]).encode_to_vec();
    let framed = grpc_frame(false, &good);
    let mut client = h2_client(addr).await.ready().await.unwrap();
    let (response, mut stream) = client
        .send_request(grpc_request(addr, TRACE_EXPORT), false)
        .unwrap();
    stream.send_data(Bytes::from(framed), true).unwrap();
    assert_eq!(grpc_status(response).await.as_deref(), Some("0"));
    let m = scrape(&app).await;
    assert_eq!(
        value(&m, r#"flowmetrics_flows_started_total{flow="after"}"#),
        1.0
    );
    println!(
        "RSS grew by {} MiB for {STREAMS} streams of {} MiB; answers {codes:?}",
        grown / MIB,
        MESSAGE / MIB
    );
    app.shutdown().await;
}

/// Item 6: streams the client resets mid-body, on both transports, are counted as
/// canceled (`canceled` / `CANCELLED`), never as 400 / INVALID_ARGUMENT.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn reset_streams_are_canceled_not_bad_input() {
    let _alone = ONE_AT_A_TIME.lock().await;
    const RESETS: usize = 200;
    let app = start(test_config()).await;
    let chunk = Bytes::from(vec![0x0a; 100]);
    for (addr, path, content_type) in [
        (
            app.otlp_http.unwrap(),
            "/v1/traces",
            "application/x-protobuf",
        ),
        (app.otlp_grpc.unwrap(), TRACE_EXPORT, "application/grpc"),
    ] {
        let client = h2_client(addr).await;
        let mut streams = Vec::new();
        for _ in 0..RESETS {
            let mut client = client.clone().ready().await.unwrap();
            let req = hyper::Request::post(format!("http://{addr}{path}"))
                .header("content-type", content_type)
                .header("content-length", "100000")
                .body(())
                .unwrap();
            let (_response, mut stream) = client.send_request(req, false).unwrap();
            stream.send_data(chunk.clone(), false).unwrap();
            streams.push(stream);
        }
        // Let the handlers start reading, then reset every stream.
        tokio::time::sleep(Duration::from_millis(300)).await;
        for mut s in streams {
            s.send_reset(Reason::CANCEL);
        }
    }
    let m = scrape_until(&app, Duration::from_secs(10), |m| {
        value(
            m,
            r#"flowmetrics_otlp_requests_total{transport="http",signal="traces",code="canceled"}"#,
        ) + value(
            m,
            r#"flowmetrics_otlp_requests_total{transport="grpc",signal="traces",code="CANCELLED"}"#,
        ) >= (2 * RESETS) as f64
    })
    .await;
    let bad: Vec<_> = m
        .iter()
        .filter(|(k, v)| {
            k.starts_with("flowmetrics_otlp_requests_total")
                && (k.contains("code=\"400\"") || k.contains("INVALID_ARGUMENT"))
                && **v > 0.0
        })
        .collect();
    assert!(bad.is_empty(), "resets counted as bad input: {bad:?}");
    let canceled = value(
        &m,
        r#"flowmetrics_otlp_requests_total{transport="http",signal="traces",code="canceled"}"#,
    );
    let cancelled = value(
        &m,
        r#"flowmetrics_otlp_requests_total{transport="grpc",signal="traces",code="CANCELLED"}"#,
    );
    assert!(
        canceled > 0.0 && cancelled > 0.0,
        "canceled {canceled}, CANCELLED {cancelled}"
    );
    app.shutdown().await;
}
