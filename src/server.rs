//! The accept loop shared by every listener: HTTP/1.1 and h2c on one port, a cap on
//! connections, an idle timeout on each (also before the protocol is known), stops
//! accepting on shutdown and lets requests in flight finish (bounded).
//!
//! At the cap, the connection idle longest (no request in flight) is closed to make room,
//! as nginx reuses keep-alive connections: a flood of silent connections only recycles
//! itself. When every connection has a request in flight, new ones wait in the kernel's
//! backlog (their descriptors are not this process's).

use std::collections::HashMap;
use std::convert::Infallible;
use std::future::Future;
use std::io;
use std::net::SocketAddr;
use std::pin::Pin;
use std::sync::atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex, PoisonError};
use std::task::{Context, Poll};
use std::time::Duration;

use bytes::Bytes;
use http_body_util::Full;
use hyper::body::Incoming;
use hyper::service::service_fn;
use hyper::{Request, Response};
use hyper_util::rt::{TokioExecutor, TokioIo, TokioTimer};
use hyper_util::server::conn::auto;
use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::{watch, Notify, OwnedSemaphorePermit, Semaphore};
use tokio::task::{JoinHandle, JoinSet};
use tokio::time::Instant;

use crate::logging::RateLimited;

/// How long requests in flight may take to finish after a shutdown signal.
pub const DRAIN_TIMEOUT: Duration = Duration::from_secs(10);

/// How long an idle connection told to close (h2 GOAWAY) may take to do so.
const CLOSE_GRACE: Duration = Duration::from_secs(5);

/// How long a connection closed to make room may take to go.
const EVICT_GRACE: Duration = Duration::from_secs(1);

/// "accept failed" (out of descriptors, say) is logged at most this often per listener.
const ACCEPT_WARN_EVERY: Duration = Duration::from_secs(10);

/// Streams one HTTP/2 (gRPC) connection may have open at once.
pub const MAX_CONCURRENT_STREAMS: u32 = 100;

/// An answer whose body is whole in memory.
pub type HttpResponse = Response<Full<Bytes>>;

/// Per-listener connection limits.
#[derive(Debug, Clone, Copy)]
pub struct ConnLimits {
    /// Connections served at once; at it the idlest is closed for a new one, or, when
    /// none is idle, new ones wait in the kernel's backlog.
    pub max_connections: usize,
    /// A connection with no request in flight and no byte moved this long is closed.
    pub idle_timeout: Duration,
    /// HTTP/1 request headers must arrive within this.
    pub header_read_timeout: Duration,
    /// Streams one h2 connection may have open at once.
    pub max_concurrent_streams: u32,
    /// A response whose body is not handed to the connection whole within this closes
    /// the connection at once (no graceful close: its reader is too slow or stalled).
    /// `None`: no deadline (OTLP answers are small and bounded by the idle timeout).
    pub write_timeout: Option<Duration>,
}

/// Resolves once `shutdown` is true (or its sender is gone).
pub async fn stopped(shutdown: &mut watch::Receiver<bool>) {
    let _ = shutdown.wait_for(|stop| *stop).await;
}

/// Binds `addr`; the error names it and its config key.
pub async fn bind(addr: &str, key: &'static str) -> Result<TcpListener, crate::StartError> {
    TcpListener::bind(addr)
        .await
        .map_err(|source| crate::StartError::Listen {
            addr: addr.to_owned(),
            key,
            source,
        })
}

/// Serves `handler` on `listener` on a task of its own; returns the bound address and
/// the task.
pub fn spawn<H, F, B>(
    listener: TcpListener,
    handler: H,
    limits: ConnLimits,
    shutdown: watch::Receiver<bool>,
) -> Result<(SocketAddr, JoinHandle<()>), crate::StartError>
where
    H: Fn(Request<Incoming>) -> F + Clone + Send + Sync + 'static,
    F: Future<Output = Response<B>> + Send + 'static,
    B: hyper::body::Body + Send + Unpin + 'static,
    B::Data: Send,
    B::Error: Into<Box<dyn std::error::Error + Send + Sync>>,
{
    let addr = listener
        .local_addr()
        .map_err(crate::StartError::ListenerAddress)?;
    let task = tokio::spawn(serve(listener, handler, limits, shutdown));
    Ok((addr, task))
}

/// Serves `handler` on `listener` until `shutdown` turns true.
pub async fn serve<H, F, B>(
    listener: TcpListener,
    handler: H,
    limits: ConnLimits,
    mut shutdown: watch::Receiver<bool>,
) where
    H: Fn(Request<Incoming>) -> F + Clone + Send + Sync + 'static,
    F: Future<Output = Response<B>> + Send + 'static,
    B: hyper::body::Body + Send + Unpin + 'static,
    B::Data: Send,
    B::Error: Into<Box<dyn std::error::Error + Send + Sync>>,
{
    let builder = connection_builder(&limits);
    let slots = Arc::new(Semaphore::new(limits.max_connections.max(1)));
    let open = Arc::new(Open::default());
    let mut connections = JoinSet::new();
    let mut next_id = 0u64;
    let accept_warning = RateLimited::new(ACCEPT_WARN_EVERY);
    loop {
        while connections.try_join_next().is_some() {}
        let Some(stream) = accept(&listener, &accept_warning, &mut shutdown).await else {
            break;
        };
        let Some(permit) = take_slot(&slots, &open, &mut shutdown).await else {
            break;
        };
        let _ = stream.set_nodelay(true);
        let activity = Arc::new(Activity::new());
        next_id += 1;
        let id = next_id;
        open.insert(id, activity.clone());
        let io = TokioIo::new(Tracked {
            inner: stream,
            activity: activity.clone(),
        });
        let service = tracked_service(handler.clone(), activity.clone(), limits.write_timeout);
        let conn = builder.serve_connection(io, service).into_owned();
        let stop = shutdown.clone();
        let open = open.clone();
        connections.spawn(async move {
            drive(conn, &activity, limits.idle_timeout, stop).await;
            open.remove(id);
            drop(permit);
        });
    }
    drop(listener);
    drain(connections).await;
}

/// HTTP/1.1 and h2c, with the header and stream limits.
fn connection_builder(limits: &ConnLimits) -> auto::Builder<TokioExecutor> {
    let mut builder = auto::Builder::new(TokioExecutor::new());
    // A slowloris trickling its headers keeps the connection busy, not idle: this
    // bounds it.
    builder
        .http1()
        .timer(TokioTimer::new())
        .header_read_timeout(limits.header_read_timeout);
    builder
        .http2()
        .timer(TokioTimer::new())
        .max_concurrent_streams(limits.max_concurrent_streams);
    builder
}

/// The next connection; `None` once `shutdown` turns true.
async fn accept(
    listener: &TcpListener,
    warning: &RateLimited,
    shutdown: &mut watch::Receiver<bool>,
) -> Option<TcpStream> {
    loop {
        tokio::select! {
            accepted = listener.accept() => match accepted {
                Ok((stream, _peer)) => return Some(stream),
                Err(e) => {
                    // Out of fds and the like: back off instead of spinning.
                    warning.warn(format_args!(
                        "accept failed on {}: {e}",
                        listener.local_addr().map_or_else(|_| "?".into(), |a| a.to_string())
                    ));
                    tokio::time::sleep(Duration::from_millis(50)).await;
                }
            },
            _ = stopped(shutdown) => return None,
        }
    }
}

/// A place under `limits.max_connections`; `None` once `shutdown` turns true.
async fn take_slot(
    slots: &Arc<Semaphore>,
    open: &Open,
    shutdown: &mut watch::Receiver<bool>,
) -> Option<OwnedSemaphorePermit> {
    if let Ok(permit) = slots.clone().try_acquire_owned() {
        return Some(permit);
    }
    // At the cap: make room by closing the idlest connection, if any. Until a slot
    // frees nothing more is accepted: the descriptors stay with the kernel's backlog,
    // so other listeners (and /metrics) keep working.
    open.evict_idlest();
    tokio::select! {
        permit = slots.clone().acquire_owned() => Some(permit.expect("never closed")),
        _ = stopped(shutdown) => None,
    }
}

/// `handler`, counting its requests in flight on the connection and, with a write
/// timeout, bounding how long each response may take to be handed over.
fn tracked_service<H, F, B>(
    handler: H,
    activity: Arc<Activity>,
    write_timeout: Option<Duration>,
) -> impl hyper::service::Service<
    Request<Incoming>,
    Response = Response<DeadlineBody<B>>,
    Error = Infallible,
    Future = impl Future<Output = Result<Response<DeadlineBody<B>>, Infallible>> + Send,
> + Clone
where
    H: Fn(Request<Incoming>) -> F + Clone + Send + Sync + 'static,
    F: Future<Output = Response<B>> + Send + 'static,
    B: hyper::body::Body + Send + Unpin + 'static,
{
    service_fn(move |req| {
        let handler = handler.clone();
        let guard = InFlight::new(activity.clone());
        let activity = activity.clone();
        async move {
            let response = handler(req).await;
            drop(guard);
            let deadline = write_timeout.map(|t| WriteDeadline::start(activity, t));
            Ok::<_, Infallible>(response.map(|body| DeadlineBody {
                inner: body,
                deadline,
            }))
        }
    })
}

/// Connections see the same signal as the accept loop and close gracefully; waits for
/// them (bounded by [`DRAIN_TIMEOUT`]).
async fn drain(mut connections: JoinSet<()>) {
    let drained = tokio::time::timeout(DRAIN_TIMEOUT, async {
        while connections.join_next().await.is_some() {}
    })
    .await;
    if drained.is_err() {
        tracing::warn!("requests still in flight after {DRAIN_TIMEOUT:?}; closing them");
        connections.shutdown().await;
    }
}

/// Runs one connection until it ends, goes idle, or the service stops.
async fn drive<S, B>(
    conn: auto::Connection<'static, TokioIo<Tracked>, S, TokioExecutor>,
    activity: &Activity,
    idle_timeout: Duration,
    mut stop: watch::Receiver<bool>,
) where
    S: hyper::service::Service<Request<Incoming>, Response = Response<B>> + Send + 'static,
    S::Future: Send + 'static,
    S::Error: Into<Box<dyn std::error::Error + Send + Sync>>,
    B: hyper::body::Body + Send + 'static,
    B::Data: Send,
    B::Error: Into<Box<dyn std::error::Error + Send + Sync>>,
{
    let mut conn = std::pin::pin!(conn);
    let grace = tokio::select! {
        result = conn.as_mut() => {
            if let Err(e) = result {
                tracing::debug!("connection ended: {e}");
            }
            return;
        }
        _ = activity.idle(idle_timeout) => {
            tracing::debug!("closing a connection idle for {idle_timeout:?}");
            CLOSE_GRACE
        }
        _ = activity.cut.notified() => {
            tracing::debug!("closing a connection whose response was not written in time (limits.response_write_timeout)");
            return;
        }
        _ = activity.evict.notified() => {
            tracing::debug!("closing the idlest connection to make room (limits.max_connections)");
            EVICT_GRACE
        }
        _ = stopped(&mut stop) => DRAIN_TIMEOUT,
    };
    // HTTP/1: closes after the request in flight; h2: GOAWAY, then ends with its streams.
    conn.as_mut().graceful_shutdown();
    if tokio::time::timeout(grace, conn.as_mut()).await.is_err() {
        // Given up on: reset, so the kernel does not go on sending what is buffered.
        activity.reset.store(true, Ordering::Relaxed);
    }
}

/// The open connections of a listener, to find the idlest when at the cap.
#[derive(Default)]
struct Open(Mutex<HashMap<u64, Arc<Activity>>>);

impl Open {
    fn insert(&self, id: u64, activity: Arc<Activity>) {
        self.0
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .insert(id, activity);
    }

    fn remove(&self, id: u64) {
        self.0
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .remove(&id);
    }

    /// Tells the connection idle longest (no request in flight, not already told) to
    /// close.
    fn evict_idlest(&self) {
        let open = self.0.lock().unwrap_or_else(PoisonError::into_inner);
        let idlest = open
            .values()
            .filter(|a| {
                a.in_flight.load(Ordering::Relaxed) == 0 && !a.evicted.load(Ordering::Relaxed)
            })
            .min_by_key(|a| a.last_activity());
        if let Some(a) = idlest {
            a.evicted.store(true, Ordering::Relaxed);
            a.evict.notify_one();
        }
    }
}

/// When a connection last moved a byte, and how many of its requests are being handled.
struct Activity {
    start: Instant,
    last_ms: AtomicU64,
    in_flight: AtomicUsize,
    /// Told to close to make room.
    evicted: AtomicBool,
    evict: Notify,
    /// A response missed its write deadline: close now.
    cut: Notify,
    /// Set with `cut`: the socket is reset when dropped, so what the kernel still holds
    /// for the slow reader is discarded too (a plain close would keep sending it).
    reset: AtomicBool,
}

impl Activity {
    fn new() -> Self {
        Self {
            start: Instant::now(),
            last_ms: AtomicU64::new(0),
            in_flight: AtomicUsize::new(0),
            evicted: AtomicBool::new(false),
            evict: Notify::new(),
            cut: Notify::new(),
            reset: AtomicBool::new(false),
        }
    }

    fn last_activity(&self) -> Instant {
        self.start + Duration::from_millis(self.last_ms.load(Ordering::Relaxed))
    }

    fn touch(&self) {
        let ms = u64::try_from(self.start.elapsed().as_millis()).unwrap_or(u64::MAX);
        self.last_ms.store(ms, Ordering::Relaxed);
    }

    /// Resolves once nothing has moved for `timeout` and no request is in flight.
    async fn idle(&self, timeout: Duration) {
        loop {
            let last = Duration::from_millis(self.last_ms.load(Ordering::Relaxed));
            let due = self.start + last + timeout;
            let now = Instant::now();
            if now >= due {
                if self.in_flight.load(Ordering::Relaxed) == 0 {
                    return;
                }
                // A request is being handled (its own read timeout bounds it).
                tokio::time::sleep(timeout).await;
            } else {
                tokio::time::sleep_until(due).await;
            }
        }
    }
}

/// Counts a request in flight on its connection while alive.
struct InFlight(Arc<Activity>);

impl InFlight {
    fn new(activity: Arc<Activity>) -> Self {
        activity.in_flight.fetch_add(1, Ordering::Relaxed);
        Self(activity)
    }
}

impl Drop for InFlight {
    fn drop(&mut self) {
        self.0.in_flight.fetch_sub(1, Ordering::Relaxed);
        self.0.touch();
    }
}

/// Cuts the connection off unless dropped within the write timeout: held by a response
/// body until hyper has taken its last frame.
/// The response counts as in flight meanwhile: its connection is not the idlest one to
/// close at the connection cap.
struct WriteDeadline(tokio::task::JoinHandle<()>, #[allow(dead_code)] InFlight);

impl WriteDeadline {
    fn start(activity: Arc<Activity>, timeout: Duration) -> Self {
        let busy = InFlight::new(activity.clone());
        Self(
            tokio::spawn(async move {
                tokio::time::sleep(timeout).await;
                activity.reset.store(true, Ordering::Relaxed);
                activity.cut.notify_one();
            }),
            busy,
        )
    }
}

impl Drop for WriteDeadline {
    fn drop(&mut self) {
        self.0.abort();
    }
}

/// A response body with its [`WriteDeadline`] (dropped with the body, when hyper has
/// taken the last frame or the stream is reset).
pub struct DeadlineBody<B> {
    inner: B,
    deadline: Option<WriteDeadline>,
}

impl<B: hyper::body::Body + Unpin> hyper::body::Body for DeadlineBody<B> {
    type Data = B::Data;
    type Error = B::Error;

    fn poll_frame(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<hyper::body::Frame<Self::Data>, Self::Error>>> {
        let poll = Pin::new(&mut self.inner).poll_frame(cx);
        if matches!(poll, Poll::Ready(None)) {
            self.deadline = None;
        }
        poll
    }

    fn is_end_stream(&self) -> bool {
        self.inner.is_end_stream()
    }

    fn size_hint(&self) -> hyper::body::SizeHint {
        self.inner.size_hint()
    }
}

/// A TCP stream that notes every byte moved in its [`Activity`].
struct Tracked {
    inner: TcpStream,
    activity: Arc<Activity>,
}

impl Drop for Tracked {
    fn drop(&mut self) {
        if self.activity.reset.load(Ordering::Relaxed) {
            // SO_LINGER 0: close sends a reset and drops the unsent bytes (no blocking).
            let _ = self.inner.set_zero_linger();
        }
    }
}

impl AsyncRead for Tracked {
    fn poll_read(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        let before = buf.filled().len();
        let poll = Pin::new(&mut self.inner).poll_read(cx, buf);
        if matches!(poll, Poll::Ready(Ok(()))) && buf.filled().len() > before {
            self.activity.touch();
        }
        poll
    }
}

impl AsyncWrite for Tracked {
    fn poll_write(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        let poll = Pin::new(&mut self.inner).poll_write(cx, buf);
        if matches!(poll, Poll::Ready(Ok(n)) if n > 0) {
            self.activity.touch();
        }
        poll
    }

    fn poll_write_vectored(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[io::IoSlice<'_>],
    ) -> Poll<io::Result<usize>> {
        let poll = Pin::new(&mut self.inner).poll_write_vectored(cx, bufs);
        if matches!(poll, Poll::Ready(Ok(n)) if n > 0) {
            self.activity.touch();
        }
        poll
    }

    fn is_write_vectored(&self) -> bool {
        self.inner.is_write_vectored()
    }

    fn poll_flush(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.inner).poll_flush(cx)
    }

    fn poll_shutdown(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.inner).poll_shutdown(cx)
    }
}
