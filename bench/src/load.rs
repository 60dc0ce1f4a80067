//! The end-to-end load generator: a thread of its own, pinned to the core the server does
//! not use, running a single-threaded tokio runtime with a few keep-alive connections.

use std::net::SocketAddr;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use bytes::{Bytes, BytesMut};
use http_body_util::{BodyExt, Full};
use hyper::Request;
use hyper_util::rt::TokioIo;
use tonic::codec::{Codec, DecodeBuf, Decoder, EncodeBuf, Encoder};
use tonic::Status;

use crate::server::{self, Server};
use crate::workload::Template;

/// How a request goes over the wire.
#[derive(Clone)]
pub enum Wire {
    /// OTLP/HTTP, `application/x-protobuf`, no compression; bodies patched per request.
    Protobuf,
    /// OTLP/HTTP with `Content-Encoding: gzip`; bodies compressed ahead of time (the
    /// run ends when they are used up).
    Gzip(Arc<Vec<Bytes>>),
    /// OTLP/gRPC over a tonic channel per connection, the same patched protobuf bytes
    /// as `Protobuf` (encoding a message per request would load the generator, not the
    /// server).
    Grpc,
}

pub struct Load {
    pub wire: Wire,
    pub template: Arc<Template>,
    pub connections: usize,
    pub warmup: Duration,
    pub measure: Duration,
    pub max_requests: u64,
    /// GET /metrics this often while loading.
    pub scrape_every: Option<Duration>,
    /// Sample the server's RSS this often (for the steady-load row).
    pub rss_every: Option<Duration>,
    /// First batch number (so runs against one server never reuse ids).
    pub first_batch: u64,
}

#[derive(Debug, Default, Clone)]
pub struct LoadResult {
    pub ok: u64,
    pub failed: u64,
    pub window_secs: f64,
    pub spans_per_sec: f64,
    pub events_per_sec: f64,
    pub p50_ms: f64,
    pub p99_ms: f64,
    pub server_cpu: f64,
    pub load_cpu: f64,
    pub scrape_ms: Vec<f64>,
    /// (seconds since start, RSS bytes).
    pub rss: Vec<(f64, u64)>,
    pub first_error: Option<String>,
    pub batches_used: u64,
}

struct Sample {
    begun: Instant,
    done: Instant,
    ok: bool,
}

/// Runs `load` against `server` and waits for the result.
pub fn run(server: &Server, load: Load) -> LoadResult {
    let http = server.http;
    let grpc = server.grpc;
    let metrics = server.metrics;
    let pid = server.pid;
    std::thread::scope(|scope| {
        scope
            .spawn(move || {
                server::pin_to_cpu(server::LOAD_CPU);
                let rt = tokio::runtime::Builder::new_current_thread()
                    .enable_all()
                    .build()
                    .expect("load generator runtime");
                rt.block_on(drive(http, grpc, metrics, pid, load))
            })
            .join()
            .expect("load generator thread")
    })
}

async fn drive(
    http: SocketAddr,
    grpc: SocketAddr,
    metrics: SocketAddr,
    pid: u32,
    load: Load,
) -> LoadResult {
    let next = Arc::new(AtomicU64::new(load.first_batch));
    let limit = load.first_batch + load.max_requests;
    let start = Instant::now();
    let from = start + load.warmup;
    let until = from + load.measure;
    let errors = Arc::new(std::sync::Mutex::new(None::<String>));
    let finished = Arc::new(std::sync::atomic::AtomicBool::new(false));

    let workers: Vec<_> = (0..load.connections)
        .map(|_| {
            tokio::spawn(
                Worker {
                    next: next.clone(),
                    limit,
                    until,
                    template: load.template.clone(),
                    wire: load.wire.clone(),
                    errors: errors.clone(),
                    http,
                    grpc,
                }
                .run(),
            )
        })
        .collect();
    let sampler = tokio::spawn(
        Sampler {
            scrape_every: load.scrape_every,
            rss_every: load.rss_every,
            finished: finished.clone(),
            start,
            from,
            until,
            pid,
            metrics,
        }
        .run(),
    );

    let mut samples = Vec::new();
    for w in workers {
        if let Ok(s) = w.await {
            samples.extend(s);
        }
    }
    // Workers may stop early (out of requests): the sampler stops with them.
    finished.store(true, Ordering::Release);
    let side = sampler.await.unwrap_or_default();
    let first_error = errors.lock().unwrap().take();
    let mut result = summarize(&samples, from, until, &load.template);
    result.server_cpu = side.server_cpu;
    result.load_cpu = side.load_cpu;
    result.scrape_ms = side.scrape_ms;
    result.rss = side.rss;
    result.first_error = first_error;
    result.batches_used = next.load(Ordering::Relaxed).min(limit) - load.first_batch;
    result
}

/// One connection sending batches one after the other until the window closes or the
/// batch numbers run out.
struct Worker {
    next: Arc<AtomicU64>,
    limit: u64,
    until: Instant,
    template: Arc<Template>,
    wire: Wire,
    errors: Arc<std::sync::Mutex<Option<String>>>,
    http: SocketAddr,
    grpc: SocketAddr,
}

impl Worker {
    async fn run(self) -> Vec<Sample> {
        let mut samples = Vec::new();
        let mut conn = match Conn::open(&self.wire, self.http, self.grpc).await {
            Ok(c) => c,
            Err(e) => {
                self.errors.lock().unwrap().get_or_insert(e);
                return samples;
            }
        };
        let mut bodies = Bodies::default();
        while Instant::now() < self.until {
            let batch = self.next.fetch_add(1, Ordering::Relaxed);
            if batch >= self.limit {
                break;
            }
            let body = match &self.wire {
                Wire::Gzip(pool) => match pool.get(batch as usize) {
                    Some(body) => body.clone(),
                    None => break,
                },
                _ => bodies.next(&self.template, batch),
            };
            let begun = Instant::now();
            let result = tokio::time::timeout(
                Duration::from_secs(10),
                conn.send(&self.wire, body, self.http),
            )
            .await
            .unwrap_or_else(|_| Err("request timed out after 10 s".into()));
            let done = Instant::now();
            let ok = result.is_ok();
            if let Err(e) = result {
                self.errors.lock().unwrap().get_or_insert(e);
            }
            samples.push(Sample { begun, done, ok });
            if !ok {
                // A broken connection: open a new one (bounded by the loop's time).
                tokio::time::sleep(Duration::from_millis(50)).await;
                if let Ok(c) = Conn::open(&self.wire, self.http, self.grpc).await {
                    conn = c;
                }
            }
        }
        samples
    }
}

/// What is read beside the load: server and generator CPU over the measured window,
/// scrape times, RSS.
#[derive(Default)]
struct SideReadings {
    scrape_ms: Vec<f64>,
    rss: Vec<(f64, u64)>,
    server_cpu: f64,
    load_cpu: f64,
}

struct Sampler {
    scrape_every: Option<Duration>,
    rss_every: Option<Duration>,
    finished: Arc<std::sync::atomic::AtomicBool>,
    start: Instant,
    from: Instant,
    until: Instant,
    pid: u32,
    metrics: SocketAddr,
}

impl Sampler {
    async fn run(self) -> SideReadings {
        let mut side = SideReadings::default();
        let tick = Duration::from_millis(100);
        let mut next_scrape = self.scrape_every.map(|_| self.from);
        let mut next_rss = self.rss_every.map(|_| self.start);
        let mut cpu_from = None;
        let mut measured_from = self.from;
        while Instant::now() < self.until && !self.finished.load(Ordering::Acquire) {
            let now = Instant::now();
            if cpu_from.is_none() && now >= self.from {
                cpu_from = Some((server::cpu_secs(self.pid), server::thread_cpu_secs()));
                measured_from = now;
            }
            if let (Some(at), Some(every)) = (next_scrape, self.scrape_every) {
                if now >= at {
                    if let Some(ms) = self.timed_scrape().await {
                        side.scrape_ms.push(ms);
                    }
                    next_scrape = Some(at + every);
                }
            }
            if let (Some(at), Some(every)) = (next_rss, self.rss_every) {
                if now >= at {
                    let since = now.duration_since(self.start).as_secs_f64();
                    side.rss.push((since, server::rss_bytes(self.pid)));
                    next_rss = Some(at + every);
                }
            }
            let left = self.until.saturating_duration_since(Instant::now());
            tokio::time::sleep(tick.min(left)).await;
        }
        if let Some((s0, l0)) = cpu_from {
            let secs = measured_from.elapsed().as_secs_f64().max(1e-9);
            side.server_cpu = (server::cpu_secs(self.pid) - s0) / secs;
            side.load_cpu = (server::thread_cpu_secs() - l0) / secs;
        }
        side
    }

    /// One GET /metrics: its time in ms, if answered 200 within 10 s.
    async fn timed_scrape(&self) -> Option<f64> {
        let t = Instant::now();
        let answer = tokio::time::timeout(
            Duration::from_secs(10),
            server::get_async(self.metrics, "/metrics"),
        )
        .await;
        matches!(answer, Ok(Ok((200, _)))).then(|| t.elapsed().as_secs_f64() * 1e3)
    }
}

/// Throughput and latency of the requests answered within the measured window.
fn summarize(samples: &[Sample], from: Instant, until: Instant, template: &Template) -> LoadResult {
    let end = samples
        .iter()
        .map(|s| s.done)
        .max()
        .unwrap_or(until)
        .min(until);
    let window = end.saturating_duration_since(from).as_secs_f64();
    let mut latencies: Vec<f64> = samples
        .iter()
        .filter(|s| s.ok && s.begun >= from && s.done <= end)
        .map(|s| s.done.duration_since(s.begun).as_secs_f64() * 1e3)
        .collect();
    let counted = samples
        .iter()
        .filter(|s| s.ok && s.done >= from && s.done <= end)
        .count() as f64;
    latencies.sort_by(f64::total_cmp);
    let failed = samples.iter().filter(|s| !s.ok).count() as u64;
    let per_sec = |items: u64| {
        if window > 0.0 {
            counted * items as f64 / window
        } else {
            0.0
        }
    };
    LoadResult {
        ok: samples.len() as u64 - failed,
        failed,
        window_secs: window,
        spans_per_sec: per_sec(template.spans),
        events_per_sec: per_sec(template.events),
        p50_ms: percentile(&latencies, 0.50),
        p99_ms: percentile(&latencies, 0.99),
        ..LoadResult::default()
    }
}

pub fn percentile(sorted: &[f64], q: f64) -> f64 {
    if sorted.is_empty() {
        return 0.0;
    }
    let rank = ((sorted.len() as f64 * q).ceil() as usize).clamp(1, sorted.len());
    sorted[rank - 1]
}

/// The bodies of one connection: one buffer, patched in place for each batch once the
/// previous request has let go of it, instead of a copy of the whole template per
/// request: the rare workload's 300 KiB bodies change in a few dozen bytes, and the
/// generator shares the machine with the server it measures.
#[derive(Default)]
struct Bodies {
    last: Option<Bytes>,
}

impl Bodies {
    fn next(&mut self, template: &Template, batch: u64) -> Bytes {
        let mut buffer = match self.last.take().map(Bytes::try_into_mut) {
            // Every slot is written for every batch: the buffer is the template again.
            Some(Ok(buffer)) => buffer,
            _ => BytesMut::from(&template.bytes[..]),
        };
        template.patch(&mut buffer, batch);
        let body = buffer.freeze();
        self.last = Some(body.clone());
        body
    }
}

enum Conn {
    Http(hyper::client::conn::http1::SendRequest<Full<Bytes>>),
    Grpc(tonic::client::Grpc<tonic::transport::Channel>),
}

impl Conn {
    async fn open(wire: &Wire, http: SocketAddr, grpc: SocketAddr) -> Result<Conn, String> {
        match wire {
            Wire::Grpc => {
                let channel = tonic::transport::Endpoint::from_shared(format!("http://{grpc}"))
                    .map_err(|e| e.to_string())?
                    .tcp_nodelay(true)
                    .connect()
                    .await
                    .map_err(|e| format!("gRPC connect: {e}"))?;
                Ok(Conn::Grpc(tonic::client::Grpc::new(channel)))
            }
            _ => {
                let stream = tokio::net::TcpStream::connect(http)
                    .await
                    .map_err(|e| format!("connect: {e}"))?;
                let _ = stream.set_nodelay(true);
                let (sender, conn) = hyper::client::conn::http1::handshake(TokioIo::new(stream))
                    .await
                    .map_err(|e| format!("handshake: {e}"))?;
                tokio::spawn(conn);
                Ok(Conn::Http(sender))
            }
        }
    }

    async fn send(&mut self, wire: &Wire, body: Bytes, http: SocketAddr) -> Result<(), String> {
        match self {
            Conn::Grpc(client) => {
                client.ready().await.map_err(|e| format!("gRPC: {e}"))?;
                let path = tonic::codegen::http::uri::PathAndQuery::from_static(
                    "/opentelemetry.proto.collector.trace.v1.TraceService/Export",
                );
                client
                    .unary(tonic::Request::new(body), path, PassThrough)
                    .await
                    .map_err(|s| format!("gRPC: {s}"))?;
                Ok(())
            }
            Conn::Http(sender) => {
                let mut req = Request::post("/v1/traces")
                    .header("host", http.to_string())
                    .header("content-type", "application/x-protobuf");
                if let Wire::Gzip(_) = wire {
                    req = req.header("content-encoding", "gzip");
                }
                let req = req.body(Full::new(body)).map_err(|e| e.to_string())?;
                sender.ready().await.map_err(|e| e.to_string())?;
                let resp = sender.send_request(req).await.map_err(|e| e.to_string())?;
                let status = resp.status();
                let _ = resp
                    .into_body()
                    .collect()
                    .await
                    .map_err(|e| e.to_string())?;
                if status.is_success() {
                    Ok(())
                } else {
                    Err(format!("HTTP {status}"))
                }
            }
        }
    }
}

/// Sends message bytes as they are and ignores the (empty) answer's contents.
#[derive(Clone, Copy, Default)]
struct PassThrough;

impl Codec for PassThrough {
    type Encode = Bytes;
    type Decode = ();
    type Encoder = PassThrough;
    type Decoder = PassThrough;

    fn encoder(&mut self) -> Self::Encoder {
        PassThrough
    }

    fn decoder(&mut self) -> Self::Decoder {
        PassThrough
    }
}

impl Encoder for PassThrough {
    type Item = Bytes;
    type Error = Status;

    fn encode(&mut self, item: Bytes, dst: &mut EncodeBuf<'_>) -> Result<(), Status> {
        bytes::BufMut::put(dst, item);
        Ok(())
    }
}

impl Decoder for PassThrough {
    type Item = ();
    type Error = Status;

    fn decode(&mut self, src: &mut DecodeBuf<'_>) -> Result<Option<()>, Status> {
        bytes::Buf::advance(src, bytes::Buf::remaining(src));
        Ok(Some(()))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::workload::Shape;

    /// A reused buffer holds exactly the batch asked for, and a body still held
    /// elsewhere is never written over.
    #[test]
    fn reused_bodies_are_the_batches_asked_for() {
        let template = Template::new(Shape::Sparse);
        let mut bodies = Bodies::default();
        let first = bodies.next(&template, 7);
        assert_eq!(first[..], template.batch(7)[..]);
        // Still held: a new buffer, the held one unchanged.
        let second = bodies.next(&template, 8);
        assert_eq!(first[..], template.batch(7)[..]);
        assert_ne!(first.as_ptr(), second.as_ptr());
        let at = second.as_ptr();
        drop((first, second));
        // Let go of: the same buffer, patched for the new batch.
        let third = bodies.next(&template, 9);
        assert_eq!(third.as_ptr(), at);
        assert_eq!(third[..], template.batch(9)[..]);
        assert_ne!(template.batch(8)[..], template.batch(9)[..]);
    }
}
