//! Exact time-outs for the entries the main cache cannot time exactly.
//!
//! The main cache's time-to-live (the longest flow timeout) is exact, but it counts from
//! an entry's last write: it times an instance of a flow on the longest timeout that is
//! never written again. Any other deadline (a flow with a shorter timeout, an instance
//! written again by each of its steps) falls to moka's per-entry expiry, whose timer
//! wheel fires up to ~1.07 s late. So such an instance also gets a timer here: an entry
//! in a small moka cache of its timeout (one per distinct timeout, each with that
//! timeout as its exact time-to-live) written once, when the instance is made. When it
//! expires, the store's housekeeping takes the instance out of the main cache and counts
//! it (under the instance's shard lock, as any event of it), about a housekeeping
//! interval after its deadline.
//!
//! The main cache stays the one place that holds instances and enforces
//! `limits.max_in_flight`; a timer holds only the 16-byte key. A timer left behind (its
//! instance closed by an end before it was stopped, or evicted) finds nothing when it
//! fires. The per-entry expiry stays as the backstop: whichever of the two removes an
//! instance first counts it.

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex, PoisonError, RwLock};
use std::time::Duration;

use foldhash::fast::RandomState;
use moka::notification::RemovalCause;
use moka::policy::EvictionPolicy;
use moka::sync::Cache;

use super::cache::Key;

/// Distinct timeouts with a timer cache of their own; the timeouts come from the
/// configuration, so this is only a guard. Beyond it, the per-entry expiry times them.
const MAX_TIMEOUTS: usize = 64;

/// The keys of one timeout's running timers; its time-to-live is that timeout.
type TimerCache = Cache<Key, (), RandomState>;

/// One timer cache per distinct timeout, and the keys whose timers fired.
pub(super) struct ExactTimeouts {
    /// Each timer cache holds at most this many keys (`limits.max_in_flight`).
    capacity: u64,
    /// Set once a timer cache exists: until then, stopping a timer is one load.
    any: AtomicBool,
    /// (timeout in nanoseconds, its timer cache).
    timers: RwLock<Vec<(u64, TimerCache)>>,
    /// Keys whose timers expired since the housekeeping last took them.
    fired: Arc<Mutex<Vec<Key>>>,
}

impl ExactTimeouts {
    pub(super) fn new(capacity: u64) -> Self {
        Self {
            capacity,
            any: AtomicBool::new(false),
            timers: RwLock::new(Vec::new()),
            fired: Arc::default(),
        }
    }

    /// Starts the timer of a new entry due `timeout_nanos` from now. Written once per
    /// instance: a second write would move its deadline.
    pub(super) fn start(&self, key: Key, timeout_nanos: u64) {
        {
            let timers = self.timers.read().unwrap_or_else(PoisonError::into_inner);
            if let Some((_, timer)) = timers.iter().find(|(t, _)| *t == timeout_nanos) {
                timer.insert(key, ());
                return;
            }
        }
        let mut timers = self.timers.write().unwrap_or_else(PoisonError::into_inner);
        if let Some((_, timer)) = timers.iter().find(|(t, _)| *t == timeout_nanos) {
            timer.insert(key, ());
            return;
        }
        if timers.len() >= MAX_TIMEOUTS {
            return;
        }
        let timer = self.timer_cache(timeout_nanos);
        timer.insert(key, ());
        timers.push((timeout_nanos, timer));
        self.any.store(true, Ordering::Release);
    }

    fn timer_cache(&self, timeout_nanos: u64) -> TimerCache {
        let fired = self.fired.clone();
        Cache::builder()
            .max_capacity(self.capacity)
            .eviction_policy(EvictionPolicy::lru())
            .time_to_live(Duration::from_nanos(timeout_nanos))
            // Called by moka's housekeeping, or inside an insert or remove of a timer
            // that has just expired (with a shard lock held): only note the key.
            .eviction_listener(move |key: Arc<Key>, (), cause| {
                if cause == RemovalCause::Expired {
                    fired
                        .lock()
                        .unwrap_or_else(PoisonError::into_inner)
                        .push(*key);
                }
            })
            .build_with_hasher(RandomState::default())
    }

    /// Stops the timer of `key`, if it has one (its instance closed or was evicted).
    pub(super) fn stop(&self, key: Key) {
        if !self.any.load(Ordering::Acquire) {
            return;
        }
        let timers = self.timers.read().unwrap_or_else(PoisonError::into_inner);
        for (_, timer) in timers.iter() {
            timer.invalidate(&key);
        }
    }

    /// Runs the timer caches' housekeeping and hands back the keys whose timers fired.
    pub(super) fn take_fired(&self) -> Vec<Key> {
        if self.any.load(Ordering::Acquire) {
            let timers = self.timers.read().unwrap_or_else(PoisonError::into_inner);
            for (_, timer) in timers.iter() {
                timer.run_pending_tasks();
            }
        }
        std::mem::take(&mut *self.fired.lock().unwrap_or_else(PoisonError::into_inner))
    }

    /// Timers running (tests and the benchmark).
    #[cfg(test)]
    pub(super) fn running(&self) -> u64 {
        let timers = self.timers.read().unwrap_or_else(PoisonError::into_inner);
        timers
            .iter()
            .map(|(_, timer)| {
                timer.run_pending_tasks();
                timer.entry_count()
            })
            .sum()
    }
}
