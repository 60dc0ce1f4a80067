//! Logging that never blocks or kills the service: lines go through a bounded queue to
//! a writer thread (tracing-appender's lossy `non_blocking`); a line that finds the queue
//! full, or that stderr refuses (a closed pipe), is dropped and counted
//! (`flowmetrics_log_lines_dropped_total`), never waited for.
//!
//! Also the one rate-limited warning every repeated condition uses ([`RateLimited`]).

use std::io::{self, IsTerminal as _, Write};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::OnceLock;
use std::time::{Duration, Instant};

use tracing_appender::non_blocking::{ErrorCounter, NonBlockingBuilder, WorkerGuard};

use crate::config::{Config, LogFormat};

/// Lines queued for the writer thread at most: a few MiB of log, then lines are dropped.
const QUEUED_LINES: usize = 16_384;

/// How long the exit waits for queued lines to be written (a stuck reader must not hold
/// the exit).
const FLUSH_AT_EXIT: Duration = Duration::from_secs(2);

static QUEUE_DROPS: OnceLock<ErrorCounter> = OnceLock::new();
static WRITE_FAILURES: AtomicU64 = AtomicU64::new(0);

/// Log lines dropped so far: the queue was full, or stderr refused them.
pub fn lines_dropped() -> u64 {
    let queued = QUEUE_DROPS.get().map_or(0, |c| c.dropped_lines() as u64);
    queued + WRITE_FAILURES.load(Ordering::Relaxed)
}

/// Keeps the writer thread; [`LogGuard::finish`] flushes what is queued (bounded).
pub struct LogGuard(Option<WorkerGuard>);

impl LogGuard {
    /// Writes what is queued, waiting at most [`FLUSH_AT_EXIT`].
    pub fn finish(mut self) {
        let Some(guard) = self.0.take() else { return };
        let (done, wait) = std::sync::mpsc::channel();
        // The guard's drop may wait on a stuck reader: on a thread of its own.
        let spawned = std::thread::Builder::new()
            .name("log-flush".into())
            .spawn(move || {
                drop(guard);
                let _ = done.send(());
            });
        if spawned.is_ok() {
            let _ = wait.recv_timeout(FLUSH_AT_EXIT);
        }
    }
}

/// `RUST_LOG`, unless unset or blank (an env file's `RUST_LOG=` means "not set").
pub fn rust_log() -> Option<String> {
    std::env::var("RUST_LOG")
        .ok()
        .filter(|v| !v.trim().is_empty())
}

/// The filter in force: `RUST_LOG` if set, else `log.level` (both validated before).
fn filter(config: &Config) -> tracing_subscriber::EnvFilter {
    let spec = rust_log().unwrap_or_else(|| config.log.level.clone());
    tracing_subscriber::EnvFilter::try_new(&spec)
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("info"))
}

/// Installs the global subscriber writing to stderr through the lossy queue.
pub fn init(config: &Config) -> LogGuard {
    // Colour only for a person at a terminal: not in files, pipes, journald or
    // `docker logs`; NO_COLOR (https://no-color.org) turns it off there too.
    let colour =
        io::stderr().is_terminal() && std::env::var_os("NO_COLOR").is_none_or(|v| v.is_empty());
    let (writer, guard) = NonBlockingBuilder::default()
        .lossy(true)
        .buffered_lines_limit(QUEUED_LINES)
        .thread_name("log-writer")
        .finish(CountingStderr);
    let _ = QUEUE_DROPS.set(writer.error_counter());
    let builder = tracing_subscriber::fmt()
        .with_env_filter(filter(config))
        .with_ansi(colour)
        .with_writer(writer);
    let installed = match config.log.format {
        LogFormat::Json => builder.json().try_init(),
        LogFormat::Text => builder.try_init(),
    };
    if installed.is_err() {
        write_stderr("flowmetrics: a logger was already installed");
    }
    LogGuard(Some(guard))
}

/// Writes one line straight to stderr, ignoring failure (never panics, unlike
/// `eprintln!` on a closed pipe).
pub fn write_stderr(line: &str) {
    let mut err = io::stderr().lock();
    let _ = writeln!(err, "{line}");
}

/// stderr for the writer thread: a write it refuses (EPIPE, EIO) drops the line and
/// counts it, so the thread carries on.
struct CountingStderr;

impl Write for CountingStderr {
    fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
        if io::stderr().lock().write_all(buf).is_err() {
            WRITE_FAILURES.fetch_add(1, Ordering::Relaxed);
        }
        Ok(buf.len())
    }

    fn flush(&mut self) -> io::Result<()> {
        let _ = io::stderr().lock().flush();
        Ok(())
    }
}

/// A warning that may repeat fast (an accept error per connection attempt, a refusal
/// per request): logged at most once per `every`, with how many were held back since.
pub struct RateLimited {
    every: Duration,
    since: Instant,
    /// Milliseconds after `since` when it may log next (0: at once).
    next_ms: AtomicU64,
    suppressed: AtomicU64,
}

impl RateLimited {
    /// Logs at most once per `every`.
    pub fn new(every: Duration) -> Self {
        Self {
            every,
            since: Instant::now(),
            next_ms: AtomicU64::new(0),
            suppressed: AtomicU64::new(0),
        }
    }

    /// `Some(n)` when a warning is due now (`n`: how many were held back since the last
    /// one); `None`: counted, not logged.
    pub fn due(&self) -> Option<u64> {
        let now = u64::try_from(self.since.elapsed().as_millis()).unwrap_or(u64::MAX);
        let next = self.next_ms.load(Ordering::Relaxed);
        let every = u64::try_from(self.every.as_millis()).unwrap_or(u64::MAX);
        if now >= next
            && self
                .next_ms
                .compare_exchange(
                    next,
                    now.saturating_add(every),
                    Ordering::Relaxed,
                    Ordering::Relaxed,
                )
                .is_ok()
        {
            return Some(self.suppressed.swap(0, Ordering::Relaxed));
        }
        self.suppressed.fetch_add(1, Ordering::Relaxed);
        None
    }

    /// Logs `message` at WARN if due, noting how many were held back.
    pub fn warn(&self, message: std::fmt::Arguments<'_>) {
        match self.due() {
            Some(0) => tracing::warn!("{message}"),
            Some(n) => tracing::warn!("{message} ({n} more like it since the last one)"),
            None => {}
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_repeated_warning_is_let_through_once_per_period() {
        let limit = RateLimited::new(Duration::from_millis(200));
        assert_eq!(limit.due(), Some(0));
        for _ in 0..1000 {
            assert_eq!(limit.due(), None);
        }
        std::thread::sleep(Duration::from_millis(250));
        assert_eq!(limit.due(), Some(1000));
        assert_eq!(limit.due(), None);
    }
}
