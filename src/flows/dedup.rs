//! Recently handled events, for telling a retried export from new data (SPEC §3).
//!
//! Each event is remembered as a 64-bit fingerprint of (flow, correlation id, kind,
//! timestamp) in two generations of hash sets: lookups check both, inserts go to the
//! current one, and the current one becomes the previous one every `window`. So an event
//! is remembered for at least `window` and at most `2 × window`. Each generation holds
//! at most `capacity` fingerprints; a full generation rotates early (the window shrinks
//! under extreme load rather than memory growing).

use std::collections::HashSet;
use std::hash::{BuildHasher, Hash, Hasher};
use std::sync::Mutex;
use std::time::{Duration, Instant};

use super::event::{EventKind, FlowEvent};

const SHARDS: usize = 16;

pub struct RecentEvents {
    shards: Vec<Mutex<Generations>>,
    hasher: std::collections::hash_map::RandomState,
    window: Duration,
    capacity_per_shard: usize,
}

struct Generations {
    current: HashSet<u64, IdentityBuild>,
    previous: HashSet<u64, IdentityBuild>,
    rotated_at: Instant,
}

/// What the caller learns about one event.
#[derive(Debug, PartialEq, Eq)]
pub enum Seen {
    New,
    Again,
}

impl RecentEvents {
    /// `window` zero turns deduplication off. `capacity` bounds each generation.
    pub fn new(window: Duration, capacity: usize) -> Self {
        let capacity_per_shard = (capacity / SHARDS).max(1);
        Self {
            shards: (0..SHARDS)
                .map(|_| {
                    Mutex::new(Generations {
                        current: HashSet::default(),
                        previous: HashSet::default(),
                        rotated_at: Instant::now(),
                    })
                })
                .collect(),
            hasher: Default::default(),
            window,
            capacity_per_shard,
        }
    }

    fn fingerprint(&self, event: &FlowEvent) -> u64 {
        let mut h = self.hasher.build_hasher();
        event.flow.hash(&mut h);
        event.correlation_id.hash(&mut h);
        matches!(event.kind, EventKind::Start).hash(&mut h);
        event.timestamp_nanos.hash(&mut h);
        h.finish()
    }

    /// Records the event and says whether it was seen within the window.
    pub fn check_and_remember(&self, event: &FlowEvent, now: Instant) -> Seen {
        if self.window.is_zero() {
            return Seen::New;
        }
        let fp = self.fingerprint(event);
        let mut shard = self.shards[(fp as usize) % SHARDS]
            .lock()
            .expect("dedup shard lock");
        if now.duration_since(shard.rotated_at) >= self.window
            || shard.current.len() >= self.capacity_per_shard
        {
            let g = &mut *shard;
            g.previous = std::mem::take(&mut g.current);
            g.rotated_at = now;
        }
        if shard.previous.contains(&fp) || !shard.current.insert(fp) {
            Seen::Again
        } else {
            Seen::New
        }
    }

    /// Fingerprints held now, and the bytes their tables occupy.
    pub fn footprint(&self) -> (usize, usize) {
        let mut entries = 0;
        let mut bytes = 0;
        for shard in &self.shards {
            let g = shard.lock().expect("dedup shard lock");
            entries += g.current.len() + g.previous.len();
            // hashbrown: one u64 slot plus one control byte per bucket.
            bytes += (g.current.capacity() + g.previous.capacity()) * 9;
        }
        (entries, bytes)
    }
}

/// Fingerprints are already uniformly distributed hashes: no need to hash them again.
#[derive(Default, Clone, Copy)]
struct IdentityBuild;

impl BuildHasher for IdentityBuild {
    type Hasher = IdentityHasher;
    fn build_hasher(&self) -> IdentityHasher {
        IdentityHasher(0)
    }
}

struct IdentityHasher(u64);

impl Hasher for IdentityHasher {
    fn finish(&self) -> u64 {
        self.0
    }
    fn write(&mut self, bytes: &[u8]) {
        for b in bytes {
            self.0 = (self.0 << 8) | u64::from(*b);
        }
    }
    fn write_u64(&mut self, n: u64) {
        self.0 = n;
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::flows::event::{Outcome, Source};
    use std::sync::Arc;

    fn ev(id: &str, kind: EventKind, ts: u64) -> FlowEvent {
        FlowEvent {
            flow: Arc::from("f"),
            correlation_id: id.into(),
            kind,
            timestamp_nanos: ts,
            dims: Arc::from(Vec::new()),
            trace: None,
            source: Source::SpanEvent,
        }
    }

    #[test]
    fn same_event_again_is_seen_new_timestamp_is_not() {
        let r = RecentEvents::new(Duration::from_secs(60), 1000);
        let now = Instant::now();
        assert_eq!(
            r.check_and_remember(&ev("a", EventKind::Start, 1), now),
            Seen::New
        );
        assert_eq!(
            r.check_and_remember(&ev("a", EventKind::Start, 1), now),
            Seen::Again
        );
        assert_eq!(
            r.check_and_remember(&ev("a", EventKind::Start, 2), now),
            Seen::New
        );
        assert_eq!(
            r.check_and_remember(&ev("a", EventKind::End(Outcome::Success), 1), now),
            Seen::New
        );
        assert_eq!(
            r.check_and_remember(&ev("b", EventKind::Start, 1), now),
            Seen::New
        );
    }

    #[test]
    fn forgotten_after_two_windows() {
        let r = RecentEvents::new(Duration::from_secs(10), 1000);
        let t0 = Instant::now();
        r.check_and_remember(&ev("a", EventKind::Start, 1), t0);
        // Still remembered one window later (it moved to the previous generation).
        assert_eq!(
            r.check_and_remember(&ev("a", EventKind::Start, 1), t0 + Duration::from_secs(11)),
            Seen::Again
        );
        // The re-insert kept it in the previous generation only; two rotations drop it.
        assert_eq!(
            r.check_and_remember(&ev("zz", EventKind::Start, 1), t0 + Duration::from_secs(22)),
            Seen::New
        );
        assert_eq!(
            r.check_and_remember(&ev("a", EventKind::Start, 1), t0 + Duration::from_secs(33)),
            Seen::New
        );
    }

    #[test]
    fn memory_stays_bounded_under_a_flood() {
        let r = RecentEvents::new(Duration::from_secs(3600), 1600);
        let now = Instant::now();
        for i in 0..100_000 {
            r.check_and_remember(&ev(&i.to_string(), EventKind::Start, 1), now);
        }
        let (entries, _) = r.footprint();
        assert!(entries <= 2 * 1600, "{entries}");
    }

    #[test]
    fn a_remembered_event_costs_a_few_bytes() {
        // The budget: small next to the table (hundreds of bytes per entry).
        let r = RecentEvents::new(Duration::from_secs(300), 2_000_000);
        let now = Instant::now();
        for i in 0..200_000u64 {
            r.check_and_remember(&ev(&i.to_string(), EventKind::Start, i), now);
        }
        let (entries, bytes) = r.footprint();
        assert_eq!(entries, 200_000);
        let per_event = bytes as f64 / entries as f64;
        println!("dedup: {per_event:.1} bytes per remembered event");
        assert!(per_event <= 24.0, "{per_event}");
    }

    #[test]
    fn zero_window_disables() {
        let r = RecentEvents::new(Duration::ZERO, 10);
        let now = Instant::now();
        assert_eq!(
            r.check_and_remember(&ev("a", EventKind::Start, 1), now),
            Seen::New
        );
        assert_eq!(
            r.check_and_remember(&ev("a", EventKind::Start, 1), now),
            Seen::New
        );
    }
}
