//! Exact time-outs for the entries the main cache cannot time exactly.
//!
//! The main cache's time-to-live (the longest flow timeout) is exact, but it counts from
//! an entry's last write: it times an instance of a flow on the longest timeout that is
//! never written again. Any other deadline (a flow with a shorter timeout, an instance
//! written again by each of its steps) falls to moka's per-entry expiry, whose timer
//! wheel fires up to ~1.07 s late.
//!
//! So such an instance is also put in a batch: the keys of the instances of one timeout
//! made within one window of time (50 ms), the value of one entry of a small moka cache
//! of that timeout. The entry is written once, by the window's first instance, and the
//! cache's time-to-live is the timeout plus one window, which moka applies exactly: the
//! batch expires after every deadline in it (at most two windows after each), and the
//! store's housekeeping then takes each of its instances that is still there out of the
//! main cache and counts it (under the instance's shard lock, as an event of it would).
//! An instance costs its 16-byte key in a batch, not a moka entry of its own; a key
//! whose instance closed meanwhile stays until its batch expires, and finds nothing.
//! So the keys held are bounded apart (twice `limits.max_in_flight`): past that, new
//! instances are left to the per-entry expiry until batches expire.
//!
//! The main cache stays the one place that holds instances, enforces
//! `limits.max_in_flight` and counts what it removes (its listener); its per-entry
//! expiry stays the backstop (whichever removes an instance first counts it).

use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex, PoisonError, RwLock};
use std::time::Duration;

use foldhash::fast::RandomState;
use moka::notification::RemovalCause;
use moka::policy::EvictionPolicy;
use moka::sync::Cache;

use super::cache::Key;

/// The span of starts one batch holds, at most (a batch expires up to two of them
/// after a deadline in it).
const WINDOW_NANOS: u64 = 50_000_000;
/// Windows of one timeout alive at once, at most: a longer timeout gets wider windows.
const MAX_WINDOWS: u64 = 100_000;
/// Beyond this window (timeouts over ~14 h), moka's per-entry expiry is as close.
const MAX_WINDOW_NANOS: u64 = 500_000_000;
/// Distinct timeouts with batches of their own; the timeouts come from the
/// configuration, so this is only a guard. Beyond it, the per-entry expiry times them.
const MAX_TIMEOUTS: usize = 64;

/// The keys of the instances of one timeout made in one window.
type Batch = Arc<Mutex<Vec<Key>>>;

fn lock<T>(m: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    m.lock().unwrap_or_else(PoisonError::into_inner)
}

/// The batches of one timeout.
struct Timeout {
    timeout_nanos: u64,
    window_nanos: u64,
    /// Window number → its batch; time-to-live: the timeout plus one window.
    batches: Cache<u64, Batch, RandomState>,
    /// The newest window and its batch: most instances go there without a cache call.
    filling: Mutex<Option<(u64, Batch)>>,
}

impl Timeout {
    fn new(
        timeout_nanos: u64,
        window_nanos: u64,
        fired: Arc<Mutex<Vec<Batch>>>,
        held: Arc<AtomicU64>,
    ) -> Self {
        let batches = Cache::builder()
            // Windows alive at once: the timeout's, one more for the time-to-live, and
            // room for late clock readings. Never reached, so nothing is evicted.
            .max_capacity(2 * (timeout_nanos / window_nanos + 2))
            .eviction_policy(EvictionPolicy::lru())
            .time_to_live(Duration::from_nanos(
                timeout_nanos.saturating_add(window_nanos),
            ))
            // Called by moka's housekeeping, or inside an insert (with a shard lock
            // held): only hand the batch over.
            .eviction_listener(move |_: Arc<u64>, batch: Batch, cause| match cause {
                RemovalCause::Expired => lock(&fired).push(batch),
                // Not due: the per-entry expiry times its instances.
                _ => {
                    held.fetch_sub(lock(&batch).len() as u64, Ordering::Relaxed);
                }
            })
            .build_with_hasher(RandomState::default());
        Self {
            timeout_nanos,
            window_nanos,
            batches,
            filling: Mutex::new(None),
        }
    }

    /// Adds `key`, made at `now` (store clock), to its window's batch. A batch is
    /// written when its window's first instance comes, so it expires no earlier than
    /// the timeout plus one window after the window began: after every deadline in it.
    fn add(&self, key: Key, now: u64) {
        let window = now / self.window_nanos;
        let mut filling = lock(&self.filling);
        let batch = match &*filling {
            Some((newest, batch)) if *newest == window => return lock(batch).push(key),
            // A clock reading older than the newest window (read before another
            // thread's): its batch, made now if need be (then it expires later).
            Some((newest, _)) if *newest > window => {
                drop(filling);
                self.batches.get_with(window, Batch::default)
            }
            _ => {
                let batch = Batch::default();
                self.batches.insert(window, batch.clone());
                *filling = Some((window, batch.clone()));
                batch
            }
        };
        lock(&batch).push(key);
    }
}

/// The batches of every distinct timeout, and those that expired.
pub(super) struct ExactTimeouts {
    /// Set once a timeout has batches: until then, the housekeeping has nothing to run.
    any: AtomicBool,
    timeouts: RwLock<Vec<Timeout>>,
    /// Expired batches, until the housekeeping takes them.
    fired: Arc<Mutex<Vec<Batch>>>,
    /// Keys in batches, and their bound.
    held: Arc<AtomicU64>,
    max_held: u64,
}

impl ExactTimeouts {
    /// `capacity`: the store's (`limits.max_in_flight`); batches hold twice as many keys.
    pub(super) fn new(capacity: u64) -> Self {
        Self {
            any: AtomicBool::new(false),
            timeouts: RwLock::new(Vec::new()),
            fired: Arc::default(),
            held: Arc::default(),
            max_held: capacity.saturating_mul(2),
        }
    }

    /// Times the instance `key`, made at `now` (store clock) and due `timeout_nanos`
    /// later. Once per instance.
    pub(super) fn start(&self, key: Key, timeout_nanos: u64, now: u64) {
        if self.held.fetch_add(1, Ordering::Relaxed) >= self.max_held {
            self.held.fetch_sub(1, Ordering::Relaxed);
            return;
        }
        if !self.add(key, timeout_nanos, now) {
            self.held.fetch_sub(1, Ordering::Relaxed);
        }
    }

    /// Adds `key` to its timeout's batches, made if need be; `false`: not batched.
    fn add(&self, key: Key, timeout_nanos: u64, now: u64) -> bool {
        let of = |timeouts: &[Timeout]| -> Option<usize> {
            timeouts
                .iter()
                .position(|t| t.timeout_nanos == timeout_nanos)
        };
        {
            let timeouts = self.timeouts.read().unwrap_or_else(PoisonError::into_inner);
            if let Some(i) = of(&timeouts) {
                timeouts[i].add(key, now);
                return true;
            }
        }
        let window_nanos = WINDOW_NANOS.max(timeout_nanos / MAX_WINDOWS);
        if window_nanos > MAX_WINDOW_NANOS {
            return false;
        }
        let mut timeouts = self
            .timeouts
            .write()
            .unwrap_or_else(PoisonError::into_inner);
        let i = match of(&timeouts) {
            Some(i) => i,
            None if timeouts.len() >= MAX_TIMEOUTS => return false,
            None => {
                timeouts.push(Timeout::new(
                    timeout_nanos,
                    window_nanos,
                    self.fired.clone(),
                    self.held.clone(),
                ));
                self.any.store(true, Ordering::Release);
                timeouts.len() - 1
            }
        };
        timeouts[i].add(key, now);
        true
    }

    /// Runs the batches' housekeeping and hands back the keys of those that expired:
    /// every instance among them that is still open is due.
    pub(super) fn take_due(&self) -> Vec<Key> {
        if !self.any.load(Ordering::Acquire) {
            return Vec::new();
        }
        {
            let timeouts = self.timeouts.read().unwrap_or_else(PoisonError::into_inner);
            for t in timeouts.iter() {
                t.batches.run_pending_tasks();
            }
        }
        let fired = std::mem::take(&mut *lock(&self.fired));
        let due: Vec<Key> = fired
            .iter()
            .flat_map(|batch| std::mem::take(&mut *lock(batch)))
            .collect();
        self.held.fetch_sub(due.len() as u64, Ordering::Relaxed);
        due
    }

    /// Keys in batches that have not expired (tests).
    #[cfg(test)]
    pub(super) fn waiting(&self) -> usize {
        let timeouts = self.timeouts.read().unwrap_or_else(PoisonError::into_inner);
        timeouts
            .iter()
            .flat_map(|t| t.batches.iter().map(|(_, batch)| lock(&batch).len()))
            .sum()
    }
}
