//! `/metrics` that no client can blow up or stall (docs/behaviour.md §4, §7), against
//! the real binary on loopback: scrapes in a loop do not hold ingest, many concurrent
//! and slow scrapers and zero-window h2 streams stay within a memory bound, and a
//! hammered overview does not stall exports. Each bound is generous (what matters is the
//! order of magnitude) and fails on a server that encodes while holding reports, or
//! that keeps a body per connection.

mod common;

use std::net::SocketAddr;
use std::path::PathBuf;
use std::process::{Child, Command, Stdio};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use common::{attr, otlp};
use opentelemetry_proto::tonic::trace::v1::span;
use prost::Message;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;

const BIN: &str = env!("CARGO_BIN_EXE_flowmetrics");
/// The write deadline the servers here run with (limits.response_write_timeout).
const WRITE_TIMEOUT: Duration = Duration::from_secs(3);

/// The binary as a child process, killed when dropped.
struct Server {
    child: Child,
    http: SocketAddr,
    metrics: SocketAddr,
    dir: PathBuf,
}

impl Drop for Server {
    fn drop(&mut self) {
        common::reap(&mut self.child, &self.dir);
    }
}

fn free_port() -> SocketAddr {
    SocketAddr::from(([127, 0, 0, 1], common::free_port()))
}

impl Server {
    async fn start(name: &str) -> Server {
        let dir =
            std::env::temp_dir().join(format!("flowmetrics-scrape-{name}-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let config = dir.join("config.yaml");
        std::fs::write(
            &config,
            format!(
                "log: {{ level: warn }}\nlimits:\n  response_write_timeout: {}s\n  \
                 max_series_per_metric: 50000\ndimensions:\n  - {{ label: key, attribute: key }}\n",
                WRITE_TIMEOUT.as_secs()
            ),
        )
        .unwrap();
        let (http, metrics) = (free_port(), free_port());
        let mut command = Command::new(BIN);
        for (k, _) in std::env::vars() {
            if k.starts_with("FLOWMETRICS_") || k == "RUST_LOG" {
                command.env_remove(k);
            }
        }
        let child = command
            .arg("--config")
            .arg(&config)
            .env("FLOWMETRICS_LISTEN__OTLP_HTTP", http.to_string())
            .env("FLOWMETRICS_LISTEN__OTLP_GRPC", "")
            .env("FLOWMETRICS_LISTEN__METRICS", metrics.to_string())
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .expect("flowmetrics starts");
        let server = Server {
            child,
            http,
            metrics,
            dir,
        };
        let deadline = Instant::now() + Duration::from_secs(30);
        while get(server.metrics, "/readyz").await.map(|(s, _)| s) != Some(200) {
            assert!(Instant::now() < deadline, "server not ready");
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        server
    }

    /// Peak and current resident memory of the server, in MiB.
    fn rss_mib(&self) -> (u64, u64) {
        let status = std::fs::read_to_string(format!("/proc/{}/status", self.child.id())).unwrap();
        let field = |name: &str| {
            status
                .lines()
                .find_map(|l| l.strip_prefix(name))
                .and_then(|v| v.split_whitespace().next()?.parse::<u64>().ok())
                .unwrap()
                / 1024
        };
        (field("VmHWM:"), field("VmRSS:"))
    }

    /// `label_sets` flows instances, each its own `key` value, started and ended with
    /// success: every label set has started, completed, errors and duration series.
    async fn seed(&self, label_sets: usize) {
        for end in [false, true] {
            for chunk in (0..label_sets).collect::<Vec<_>>().chunks(5000) {
                let events = chunk
                    .iter()
                    .map(|i| event(&format!("c{i}"), &format!("k{i}"), end))
                    .collect();
                assert_eq!(self.export(events).await, Some(200));
            }
        }
    }

    /// Posts one export; its status, `None` if the connection failed.
    async fn export(&self, events: Vec<span::Event>) -> Option<u16> {
        let body = export_body(events);
        let mut stream = TcpStream::connect(self.http).await.ok()?;
        let head = format!(
            "POST /v1/traces HTTP/1.1\r\nhost: x\r\nconnection: close\r\ncontent-type: \
             application/x-protobuf\r\ncontent-length: {}\r\n\r\n",
            body.len()
        );
        stream.write_all(head.as_bytes()).await.ok()?;
        stream.write_all(&body).await.ok()?;
        let mut reply = Vec::new();
        stream.read_to_end(&mut reply).await.ok()?;
        status_of(&reply)
    }
}

fn event(id: &str, key: &str, end: bool) -> span::Event {
    let mut attributes = vec![attr("correlation-id", id)];
    let (name, ts) = if end {
        attributes.push(attr("outcome", "success"));
        ("flow.checkout.end", 1_700_000_000_250_000_000)
    } else {
        attributes.push(attr("key", key));
        ("flow.checkout.start", 1_700_000_000_000_000_000)
    };
    otlp::event(name, ts, attributes)
}

fn export_body(events: Vec<span::Event>) -> Vec<u8> {
    let spans = events
        .into_iter()
        .map(|e| otlp::span(&[1; 16], &[2; 8], vec![e]))
        .collect();
    otlp::traces(None, spans).encode_to_vec()
}

fn status_of(reply: &[u8]) -> Option<u16> {
    std::str::from_utf8(reply.get(..12)?)
        .ok()?
        .split(' ')
        .nth(1)?
        .parse()
        .ok()
}

/// GET over a fresh HTTP/1.1 connection: (status, body bytes), read and discarded as
/// they come (the client holds no body).
async fn get(addr: SocketAddr, path: &str) -> Option<(u16, u64)> {
    let mut stream = TcpStream::connect(addr).await.ok()?;
    let head = format!("GET {path} HTTP/1.1\r\nhost: x\r\nconnection: close\r\n\r\n");
    stream.write_all(head.as_bytes()).await.ok()?;
    let mut buf = vec![0u8; 64 * 1024];
    let mut first = Vec::new();
    let mut total = 0u64;
    loop {
        let n = stream.read(&mut buf).await.ok()?;
        if n == 0 {
            break;
        }
        if first.len() < 16 {
            first.extend_from_slice(&buf[..n.min(16)]);
        }
        total += n as u64;
    }
    Some((status_of(&first)?, total))
}

/// Exports (one start each) sent back to back for `period`, while `load` runs: how many
/// were answered 200.
async fn exports_during(server: &Server, period: Duration) -> u64 {
    let until = Instant::now() + period;
    let mut ok = 0;
    let mut i = 0u64;
    while Instant::now() < until {
        i += 1;
        let e = event(&format!("x{i}"), "k0", false);
        if tokio::time::timeout(period, server.export(vec![e])).await == Ok(Some(200)) {
            ok += 1;
        }
    }
    ok
}

/// `clients` tasks each GETting `paths` in turn until `stop`.
fn hammer(
    addr: SocketAddr,
    paths: &'static [&'static str],
    clients: usize,
    stop: Arc<AtomicBool>,
) -> Arc<AtomicU64> {
    let answered = Arc::new(AtomicU64::new(0));
    for c in 0..clients {
        let (stop, answered) = (stop.clone(), answered.clone());
        tokio::spawn(async move {
            let mut n = c;
            while !stop.load(Ordering::Relaxed) {
                if let Some((200, _)) = get(addr, paths[n % paths.len()]).await {
                    answered.fetch_add(1, Ordering::Relaxed);
                }
                n += 1;
            }
        });
    }
    answered
}

const LABEL_SETS: usize = 10_000;
const PERIOD: Duration = Duration::from_secs(8);
/// Exports in [`PERIOD`] at least: a sequential client does thousands on an idle
/// server; a server whose scrapes hold reports lets through a handful.
const MIN_EXPORTS: u64 = 40;

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn exports_keep_flowing_while_four_clients_scrape_in_a_loop() {
    let server = Server::start("loop").await;
    server.seed(LABEL_SETS).await;
    let (_, size) = get(server.metrics, "/metrics").await.unwrap();
    assert!(size > 5_000_000, "a large exposition: {size} bytes");
    let stop = Arc::new(AtomicBool::new(false));
    let scrapes = hammer(server.metrics, &["/metrics"], 4, stop.clone());
    let exports = exports_during(&server, PERIOD).await;
    stop.store(true, Ordering::Relaxed);
    let scrapes = scrapes.load(Ordering::Relaxed);
    eprintln!("exposition {size} bytes: {exports} exports, {scrapes} scrapes in {PERIOD:?}");
    assert!(scrapes >= 1, "the scrapers were answered");
    assert!(
        exports >= MIN_EXPORTS,
        "{exports} exports in {PERIOD:?} while {scrapes} scrapes were answered"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_hammered_overview_does_not_stall_exports() {
    let server = Server::start("overview").await;
    server.seed(LABEL_SETS).await;
    let stop = Arc::new(AtomicBool::new(false));
    let answered = hammer(server.metrics, &["/api/flows", "/"], 16, stop.clone());
    let exports = exports_during(&server, PERIOD).await;
    stop.store(true, Ordering::Relaxed);
    let overview = answered.load(Ordering::Relaxed);
    eprintln!("{exports} exports, {overview} overview answers in {PERIOD:?}");
    assert!(
        answered.load(Ordering::Relaxed) >= 16,
        "the overview was answered"
    );
    assert!(exports >= MIN_EXPORTS, "{exports} exports in {PERIOD:?}");
}

/// How a slow reader ended.
#[derive(Debug)]
enum Slow {
    /// Its body not written in time: the connection was closed after this long.
    Cut(Duration),
    /// Answered with this status instead of a body.
    Refused(Option<u16>),
    /// Closed before an answer (to make room at the connection cap).
    Closed,
    /// Still open after a minute.
    Held,
}

/// Peak resident memory of the server while 300 clients scrape at once and 200 more
/// read one byte a second: bodies are shared and their number bounded, slow readers
/// are cut off. A server that keeps a body per connection peaks at gigabytes.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn many_concurrent_and_slow_scrapers_stay_within_a_memory_bound() {
    let server = Server::start("rss").await;
    server.seed(LABEL_SETS).await;
    let (_, size) = get(server.metrics, "/metrics").await.unwrap();
    let (base, _) = server.rss_mib();
    let mut slow = Vec::new();
    for _ in 0..200 {
        let addr = server.metrics;
        slow.push(tokio::spawn(async move {
            let socket = tokio::net::TcpSocket::new_v4().unwrap();
            socket.set_recv_buffer_size(4096).unwrap();
            let mut stream = socket.connect(addr).await.unwrap();
            let mut head = [0u8; 12];
            let answer = tokio::time::timeout(Duration::from_secs(60), async {
                stream
                    .write_all(b"GET /metrics HTTP/1.1\r\nhost: x\r\n\r\n")
                    .await?;
                stream.read_exact(&mut head).await
            });
            if !matches!(answer.await, Ok(Ok(_))) {
                // Closed before an answer: made room for others at the connection cap.
                return Slow::Closed;
            }
            match status_of(&head) {
                Some(200) => {}
                // Refused (no place for another body): nothing held.
                status => return Slow::Refused(status),
            }
            // The write deadline runs from here (the answer's head is written first).
            let started = Instant::now();
            let mut byte = [0u8; 1];
            // Until the server cuts it off (or the test gives up).
            while started.elapsed() < Duration::from_secs(60) {
                // A reset shows as the socket's error before the bytes already
                // received here are read.
                if let Ok(Some(_)) = stream.take_error() {
                    return Slow::Cut(started.elapsed());
                }
                match stream.read(&mut byte).await {
                    Ok(0) | Err(_) => return Slow::Cut(started.elapsed()),
                    Ok(_) => tokio::time::sleep(Duration::from_secs(1)).await,
                }
            }
            Slow::Held
        }));
    }
    let scrapes: Vec<_> = (0..300)
        .map(|_| {
            let addr = server.metrics;
            // A server that never answers fails the count below, not the test's time.
            let patience = Duration::from_secs(120);
            tokio::spawn(async move {
                tokio::time::timeout(patience, get(addr, "/metrics"))
                    .await
                    .ok()
                    .flatten()
            })
        })
        .collect();
    let mut complete = 0;
    for s in scrapes {
        if let Ok(Some((200, n))) = s.await {
            if n >= size / 2 {
                complete += 1;
            }
        }
    }
    let (mut cut, mut refused, mut closed) = (0, 0, 0);
    for s in slow {
        match s.await.unwrap() {
            Slow::Cut(after) => {
                assert!(
                    after < WRITE_TIMEOUT * 10,
                    "a slow reader held on for {after:?}"
                );
                cut += 1;
            }
            Slow::Refused(Some(503)) => refused += 1,
            Slow::Closed => closed += 1,
            other => panic!("a slow reader: {other:?}"),
        }
    }
    let (peak, now) = server.rss_mib();
    let size_mib = size / (1 << 20);
    eprintln!(
        "exposition {size_mib} MiB; RSS before {base} MiB, peak {peak} MiB, after {now} MiB; \
         {complete} complete scrapes, {cut} slow readers cut off, {refused} refused (503), {closed} closed unanswered"
    );
    assert!(cut > 0, "some slow readers got a body");
    assert!(complete >= 30, "{complete} of 300 scrapes complete");
    let (status, _) = get(server.metrics, "/metrics").await.unwrap();
    assert_eq!(status, 200, "a normal scrape after the storm");
    // Bodies in memory at once are few (4), whatever the number of clients.
    let bound = base + 12 * size_mib + 100;
    assert!(peak <= bound, "peak RSS {peak} MiB over {bound} MiB");
}

/// h2c on the metrics port: 120 connections each try 100 `GET /metrics` streams with a
/// zero receive window and never read. Streams per connection are few, every
/// connection is closed by the write deadline, and memory stays bounded.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn zero_window_h2_streams_are_bounded_and_cut_off() {
    let server = Server::start("h2").await;
    server.seed(50).await;
    let (_, size) = get(server.metrics, "/metrics").await.unwrap();
    let (base, _) = server.rss_mib();
    let started = Instant::now();
    let mut connections = Vec::new();
    for _ in 0..120 {
        let addr = server.metrics;
        connections.push(tokio::spawn(async move {
            let tcp = TcpStream::connect(addr).await.unwrap();
            let (client, conn) = h2::client::Builder::new()
                .initial_window_size(0)
                .handshake::<_, bytes::Bytes>(tcp)
                .await
                .unwrap();
            let conn = tokio::spawn(conn);
            let mut held = Vec::new();
            let mut opened = 0;
            for _ in 0..100 {
                let ready =
                    tokio::time::timeout(Duration::from_millis(300), client.clone().ready()).await;
                let Ok(Ok(mut ready)) = ready else { break };
                let request = hyper::Request::get(format!("http://{addr}/metrics"))
                    .body(())
                    .unwrap();
                match ready.send_request(request, true) {
                    Ok((response, _)) => {
                        held.push(tokio::spawn(response));
                        opened += 1;
                    }
                    Err(_) => break,
                }
            }
            // Closed by the server (the bodies could not be written in time).
            let closed = tokio::time::timeout(Duration::from_secs(60), conn)
                .await
                .is_ok();
            drop(held);
            (opened, closed, started.elapsed())
        }));
    }
    let (peak_during, _) = {
        tokio::time::sleep(Duration::from_secs(1)).await;
        let (status, _) = get(server.metrics, "/metrics").await.unwrap();
        assert_eq!(status, 200, "a normal scrape beside them");
        server.rss_mib()
    };
    for c in connections {
        let (opened, closed, after) = c.await.unwrap();
        assert!(closed, "the server closed the connection");
        assert!(after < WRITE_TIMEOUT * 5, "closed after {after:?}");
        assert!(opened <= 100);
    }
    let (peak, _) = server.rss_mib();
    eprintln!(
        "exposition {} KiB; RSS before {base} MiB, peak {peak} MiB ({peak_during} MiB early)",
        size / 1024
    );
    let bound = base + 150;
    assert!(peak <= bound, "peak RSS {peak} MiB over {bound} MiB");
}
