//! The bounds every OTLP request meets, on both transports (docs/behaviour.md §5–§6): body size,
//! a deadline for the whole request, a budget of buffered bytes shared by all requests
//! being read or decoded, a bound on decodes at once (run off the async workers), and a
//! lingering read of what an early answer left unread.
//!
//! Reading a body holds budget for the bytes it has, never a decode slot: a thousand slow
//! clients hold what they sent, no more, and no one waits for them.

use std::sync::Arc;
use std::time::Duration;

use bytes::{Bytes, BytesMut};
use http_body_util::BodyExt;
use hyper::body::Body;
use tokio::sync::{OwnedSemaphorePermit, Semaphore};
use tokio::time::Instant;

use crate::logging::RateLimited;
use crate::server::ConnLimits;

/// File descriptors no listener may take: stdio, the runtime's epoll and wakers, the
/// listeners themselves, the state file and its directory, the Redis store's
/// connections, /proc reads of the process metrics. Plus an eighth of the limit as
/// slack (at most [`MAX_SLACK_FDS`]).
const BASE_RESERVED_FDS: u64 = 32;
const MAX_SLACK_FDS: u64 = 224;

/// Connections the metrics listener serves at once (Prometheus, probes, people), at
/// most: fewer when the open-file limit is low.
pub const ADMIN_CONNECTIONS: usize = 128;

/// Streams one h2 connection to the metrics listener may have open at once: a scraper
/// needs one; each stream of a connection shares the same encoded body.
pub const ADMIN_CONCURRENT_STREAMS: u32 = 8;

/// What an early answer reads and discards at least (see [`Limits::linger`]): enough
/// for the bodies SDKs send whole before reading, a fraction of a second on a LAN.
pub const LINGER_BYTES: usize = 64 * 1024 * 1024;

/// An early answer reads and discards up to this many times `max_body_bytes`: a client
/// that writes its whole body before reading (the OTLP SDK exporters, Python's
/// `requests`) sees its 413 for a body up to this size, instead of a reset it would
/// retry.
pub const LINGER_BODIES: usize = 4;

/// The limits, as configured.
#[derive(Debug, Clone)]
pub struct LimitSettings {
    /// A body, as sent and after decompression.
    pub max_body_bytes: usize,
    /// All bodies being read or decoded, both transports together.
    pub max_buffered_bytes: u64,
    /// Per OTLP listener.
    pub max_connections: usize,
    /// The metrics listener.
    pub admin_max_connections: usize,
    /// A connection with no request in flight and no byte moved this long is closed.
    pub idle_timeout: Duration,
    /// Headers and body of one request.
    pub request_read_timeout: Duration,
    /// Decodes running at once.
    pub decode_slots: usize,
    /// Metrics listener: a response not written whole within this closes its
    /// connection.
    pub response_write_timeout: Duration,
}

impl LimitSettings {
    /// What the accept loop of an OTLP listener enforces.
    pub fn conn_limits(&self) -> ConnLimits {
        ConnLimits {
            max_connections: self.max_connections,
            idle_timeout: self.idle_timeout,
            header_read_timeout: self.request_read_timeout,
            max_concurrent_streams: crate::server::MAX_CONCURRENT_STREAMS,
            write_timeout: None,
        }
    }

    /// The metrics listener: its own small cap, so saturated OTLP listeners never take
    /// its descriptors, the same read timeouts, few h2 streams per connection, and a
    /// deadline for writing each response (a slow reader is cut off).
    pub fn admin_conn_limits(&self) -> ConnLimits {
        ConnLimits {
            max_connections: self.admin_max_connections,
            max_concurrent_streams: ADMIN_CONCURRENT_STREAMS,
            write_timeout: Some(self.response_write_timeout),
            ..self.conn_limits()
        }
    }
}

/// How the open-file limit is shared between the listeners' connections.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ConnectionBudget {
    /// Each OTLP listener's share (`max_connections: auto`).
    pub per_otlp_listener: usize,
    /// The metrics listener's cap.
    pub admin: usize,
    /// Descriptors connections may take in all, after the reserve.
    pub available: u64,
}

/// What is left of the open-file limit after the reserve: an eighth of it (2 to
/// [`ADMIN_CONNECTIONS`]) for the metrics listener, the rest split between the OTLP
/// listeners (at least 1 each). No connection can then take the descriptors the state
/// file and the store need.
pub fn connection_budget(open_file_limit: u64, otlp_listeners: usize) -> ConnectionBudget {
    let reserve = BASE_RESERVED_FDS + (open_file_limit / 8).min(MAX_SLACK_FDS);
    let available = open_file_limit.saturating_sub(reserve);
    let admin = (available / 8).clamp(2, ADMIN_CONNECTIONS as u64);
    let share = available.saturating_sub(admin) / otlp_listeners.max(1) as u64;
    ConnectionBudget {
        per_otlp_listener: usize::try_from(share)
            .unwrap_or(usize::MAX)
            .clamp(1, 1_000_000),
        admin: admin as usize,
        available,
    }
}

/// The process's soft limit on open files (`RLIMIT_NOFILE`); 1024 when it cannot be read.
pub fn open_file_limit() -> u64 {
    let mut limit = libc::rlimit {
        rlim_cur: 0,
        rlim_max: 0,
    };
    // SAFETY: getrlimit only writes the struct it is given.
    if unsafe { libc::getrlimit(libc::RLIMIT_NOFILE, &mut limit) } == 0 {
        limit.rlim_cur
    } else {
        1024
    }
}

/// Why a body was not read whole.
#[derive(Debug)]
pub enum ReadError {
    /// Over `max_body_bytes`.
    TooLarge,
    /// Not all there by the request's deadline.
    Timeout,
    /// The buffered-bytes budget is spent: overloaded.
    Busy,
    /// The client reset or closed its stream: not bad input.
    Canceled,
    /// Malformed framing (say, a bad HTTP/1 chunk).
    Invalid(String),
}

/// Budget held for a request's bytes; returned when dropped.
pub struct Held {
    budget: Arc<Semaphore>,
    permit: Option<OwnedSemaphorePermit>,
}

impl Held {
    /// Takes `n` more bytes of budget, `false` when it is spent.
    pub fn take(&mut self, n: usize) -> bool {
        if n == 0 {
            return true;
        }
        let Ok(n) = u32::try_from(n) else {
            return false;
        };
        match self.budget.clone().try_acquire_many_owned(n) {
            Ok(more) => {
                match &mut self.permit {
                    Some(p) => p.merge(more),
                    None => self.permit = Some(more),
                }
                true
            }
            Err(_) => false,
        }
    }

    /// Returns `n` bytes of budget no longer needed.
    fn give_back(&mut self, n: usize) {
        if let Some(p) = &mut self.permit {
            drop(p.split(n.min(p.num_permits())));
        }
    }

    /// Bytes held.
    pub fn bytes(&self) -> usize {
        self.permit
            .as_ref()
            .map_or(0, OwnedSemaphorePermit::num_permits)
    }
}

/// Largest uncompressed body decoded on the async worker that read it (see
/// [`Limits::decodes_inline`]): an SDK's usual export (512 spans) fits; at the scan's
/// slowest, a body of nothing but flow events, it is about 4 ms of work.
pub const INLINE_DECODE_BYTES: usize = 512 * 1024;

/// The shared limits of both transports.
#[derive(Clone)]
pub struct Limits {
    /// What they were made from.
    pub settings: Arc<LimitSettings>,
    budget: Arc<Semaphore>,
    decode_slots: Arc<Semaphore>,
    overload_warning: Arc<RateLimited>,
}

impl Limits {
    /// Sets up the buffered-bytes budget and the decode slots.
    pub fn new(settings: LimitSettings) -> Self {
        let budget = usize::try_from(settings.max_buffered_bytes)
            .unwrap_or(usize::MAX)
            .min(Semaphore::MAX_PERMITS);
        Self {
            budget: Arc::new(Semaphore::new(budget)),
            decode_slots: Arc::new(Semaphore::new(settings.decode_slots.max(1))),
            settings: Arc::new(settings),
            overload_warning: Arc::new(RateLimited::new(Duration::from_secs(10))),
        }
    }

    /// Logs that requests were refused as overloaded: a WARN at most every 10 s (each
    /// refusal is counted in `flowmetrics_otlp_requests_total` anyway).
    pub fn note_overload(&self, transport: &str) {
        self.overload_warning.warn(format_args!(
            "{transport}: refusing requests as overloaded: the buffered-bytes budget \
             (limits.max_buffered_bytes, {} bytes) is spent, or no decode slot freed within \
             limits.request_read_timeout; clients retry on 503 / UNAVAILABLE",
            self.settings.max_buffered_bytes
        ));
    }

    /// An empty hold on the budget.
    pub fn hold(&self) -> Held {
        Held {
            budget: self.budget.clone(),
            permit: None,
        }
    }

    /// The deadline of a request whose handling starts now.
    pub fn deadline(&self) -> Instant {
        Instant::now() + self.settings.request_read_timeout
    }

    /// Reads a whole body of at most `limit` bytes by `deadline`, holding budget for
    /// exactly the bytes received so far (a declared length reserves nothing: a client
    /// that declares 64 MiB and sends nothing holds nothing).
    pub async fn read_body<B>(
        &self,
        body: &mut B,
        limit: usize,
        size_hint: Option<u64>,
        deadline: Instant,
        held: &mut Held,
    ) -> Result<Bytes, ReadError>
    where
        B: Body<Data = Bytes, Error = hyper::Error> + Unpin,
    {
        if size_hint.is_some_and(|n| n > limit as u64) {
            return Err(ReadError::TooLarge);
        }
        let mut chunks: Vec<Bytes> = Vec::new();
        let mut len = 0usize;
        loop {
            let frame = match tokio::time::timeout_at(deadline, body.frame()).await {
                Err(_) => return Err(ReadError::Timeout),
                Ok(None) => break,
                Ok(Some(Err(e))) => return Err(classify(&e)),
                Ok(Some(Ok(frame))) => frame,
            };
            let Ok(data) = frame.into_data() else {
                continue; // trailers
            };
            if len + data.len() > limit {
                return Err(ReadError::TooLarge);
            }
            if !held.take(data.len()) {
                return Err(ReadError::Busy);
            }
            len += data.len();
            if !data.is_empty() {
                chunks.push(data);
            }
        }
        if chunks.len() <= 1 {
            return Ok(chunks.pop().unwrap_or_default());
        }
        // One contiguous copy, paid for while both exist.
        if !held.take(len) {
            return Err(ReadError::Busy);
        }
        let mut whole = BytesMut::with_capacity(len);
        for chunk in chunks {
            whole.extend_from_slice(&chunk);
        }
        held.give_back(len);
        Ok(whole.freeze())
    }

    /// Whether an export of `body_len` bytes is decoded on the async worker that read it
    /// ([`Limits::decode`]): only an uncompressed body of at most [`INLINE_DECODE_BYTES`]
    /// for a store that does not wait on the network, so the work is bounded (a few
    /// milliseconds at most, far less for the usual export of few flow events).
    pub fn decodes_inline(body_len: usize, compressed: bool, store_blocks: bool) -> bool {
        !compressed && !store_blocks && body_len <= INLINE_DECODE_BYTES
    }

    /// Runs `work`, at most `decode_slots` at once; `None` if no slot frees up by
    /// `deadline`. On the blocking pool (decompression and decoding must not stall the
    /// async workers that answer `/healthz` and every other connection), unless
    /// `inline` ([`Limits::decodes_inline`]): then on this worker, sparing a small
    /// export the two thread hand-offs, which cost as much as decoding it.
    pub async fn decode<T, F>(&self, deadline: Instant, inline: bool, work: F) -> Option<T>
    where
        F: FnOnce() -> T + Send + 'static,
        T: Send + 'static,
    {
        let slot = tokio::time::timeout_at(deadline, self.decode_slots.clone().acquire_owned())
            .await
            .ok()?
            .ok()?;
        if inline {
            let out = std::panic::catch_unwind(std::panic::AssertUnwindSafe(work));
            drop(slot);
            // A panic in decoding must not take the connection (or the worker) with it.
            return out
                .map_err(|_| tracing::error!("decoding failed: it panicked"))
                .ok();
        }
        let joined = tokio::task::spawn_blocking(move || {
            let out = work();
            drop(slot);
            out
        })
        .await;
        match joined {
            Ok(out) => Some(out),
            // A panic in decoding must not take the connection with it.
            Err(e) => {
                tracing::error!("decoding failed: {e}");
                None
            }
        }
    }

    /// Reads and discards what a client still sends after an early answer (a 413 before
    /// the body was read whole) until the request's deadline, up to [`LINGER_BODIES`]
    /// times `max_body_bytes` (at least [`LINGER_BYTES`]), so that a client that writes
    /// its whole body before reading sees the answer instead of a reset (nginx's
    /// lingering close). Nothing is kept: it costs time, bounded by the deadline, not
    /// memory. Runs beside the answer.
    pub fn linger<B>(&self, mut body: B, deadline: Instant)
    where
        B: Body<Data = Bytes> + Unpin + Send + 'static,
    {
        if body.is_end_stream() {
            return;
        }
        let max = self
            .settings
            .max_body_bytes
            .saturating_mul(LINGER_BODIES)
            .max(LINGER_BYTES);
        tokio::spawn(async move {
            let mut discarded = 0usize;
            while discarded <= max {
                match tokio::time::timeout_at(deadline, body.frame()).await {
                    Ok(Some(Ok(frame))) => {
                        discarded += frame.data_ref().map_or(0, bytes::Bytes::len);
                    }
                    _ => break,
                }
            }
        });
    }
}

/// A body read error: the peer going away is not bad input, broken framing is. hyper
/// reports both as body errors; what tells them apart is the I/O error underneath (a
/// bad chunk size or chunk end is `InvalidData`/`InvalidInput`, a closed connection
/// `UnexpectedEof` or a reset).
fn classify(e: &hyper::Error) -> ReadError {
    let malformed = io_cause(e).is_some_and(|io| {
        matches!(
            io.kind(),
            std::io::ErrorKind::InvalidData | std::io::ErrorKind::InvalidInput
        )
    });
    if malformed {
        let cause = io_cause(e).map_or_else(|| e.to_string(), ToString::to_string);
        ReadError::Invalid(format!("malformed request body: {cause}"))
    } else if e.is_parse() || e.is_parse_too_large() || e.is_user() {
        ReadError::Invalid(format!("malformed request body: {e}"))
    } else {
        ReadError::Canceled
    }
}

/// The I/O error at the bottom of a hyper error, if there is one.
fn io_cause(e: &hyper::Error) -> Option<&std::io::Error> {
    let mut source = std::error::Error::source(e);
    while let Some(cause) = source {
        if let Some(io) = cause.downcast_ref::<std::io::Error>() {
            return Some(io);
        }
        source = cause.source();
    }
    None
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_budget_leaves_room_and_counts_the_metrics_listener() {
        let b = connection_budget(1024, 2);
        assert_eq!((b.per_otlp_listener, b.admin), (378, 108));
        assert_eq!(connection_budget(1024, 1).per_otlp_listener, 756);
        // `ulimit -n 64`: every listener together stays under the limit, with room.
        let b = connection_budget(64, 2);
        assert_eq!((b.per_otlp_listener, b.admin), (10, 3));
        assert!(2 * b.per_otlp_listener as u64 + b.admin as u64 + 32 <= 64);
        assert_eq!(connection_budget(u64::MAX, 2).per_otlp_listener, 1_000_000);
        assert_eq!(connection_budget(u64::MAX, 2).admin, ADMIN_CONNECTIONS);
        assert_eq!(connection_budget(8, 2).per_otlp_listener, 1);
    }

    #[test]
    fn budget_is_shared_and_returned() {
        let limits = Limits::new(LimitSettings {
            max_body_bytes: 1024,
            max_buffered_bytes: 100,
            max_connections: 1,
            admin_max_connections: 1,
            idle_timeout: Duration::from_secs(1),
            request_read_timeout: Duration::from_secs(1),
            decode_slots: 1,
            response_write_timeout: Duration::from_secs(1),
        });
        let mut a = limits.hold();
        let mut b = limits.hold();
        assert!(a.take(60));
        assert!(!b.take(41));
        assert!(b.take(40));
        assert!(!b.take(1));
        drop(a);
        assert!(b.take(60));
        assert_eq!(b.bytes(), 100);
        assert!(!b.take(usize::MAX));
    }
}
