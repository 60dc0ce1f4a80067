//! Recently handled events, for telling a retried export from new data (SPEC §3).
//!
//! Each event is remembered as a 64-bit fingerprint of (flow, correlation id, kind,
//! timestamp) in two generations of hash sets: lookups check both, inserts go to the
//! current one, and the current one becomes the previous one every `window`. So an event
//! is remembered for at least `window` and at most `2 × window`. Each generation holds
//! at most `capacity` fingerprints; a full generation rotates early (the window shrinks
//! under extreme load rather than memory growing).
//!
//! Every correlation-table shard owns one of these and uses it under the shard's lock:
//! an event's fingerprint lives in the same shard as its instance.

use hashbrown::HashTable;

/// What the caller learns about one event.
#[derive(Debug, PartialEq, Eq)]
pub enum Seen {
    New,
    Again,
}

pub struct RecentEvents {
    current: HashTable<u64>,
    previous: HashTable<u64>,
    /// Clock reading (nanoseconds, the table's clock) of the last rotation.
    rotated_at: u64,
    window_nanos: u64,
    capacity: usize,
}

impl RecentEvents {
    /// `window_nanos` zero turns deduplication off. `capacity` bounds each generation.
    pub fn new(window_nanos: u64, capacity: usize, now: u64) -> Self {
        Self {
            current: HashTable::new(),
            previous: HashTable::new(),
            rotated_at: now,
            window_nanos,
            capacity: capacity.max(1),
        }
    }

    /// Records the fingerprint and says whether it was seen within the window.
    /// Fingerprints are already uniform hashes, so they serve as their own hash.
    pub fn check_and_remember(&mut self, fingerprint: u64, now: u64) -> Seen {
        if self.window_nanos == 0 {
            return Seen::New;
        }
        if now.saturating_sub(self.rotated_at) >= self.window_nanos
            || self.current.len() >= self.capacity
        {
            self.previous = std::mem::take(&mut self.current);
            self.rotated_at = now;
        }
        let same = |fp: &u64| *fp == fingerprint;
        if self.previous.find(fingerprint, same).is_some() {
            return Seen::Again;
        }
        match self.current.entry(fingerprint, same, |fp| *fp) {
            hashbrown::hash_table::Entry::Occupied(_) => Seen::Again,
            hashbrown::hash_table::Entry::Vacant(slot) => {
                slot.insert(fingerprint);
                Seen::New
            }
        }
    }

    /// Fingerprints held now, and the bytes their tables occupy.
    pub fn footprint(&self) -> (usize, usize) {
        let entries = self.current.len() + self.previous.len();
        // hashbrown: one u64 slot plus one control byte per bucket.
        let bytes = (self.current.capacity() + self.previous.capacity()) * 9;
        (entries, bytes)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::hash::BuildHasher;

    const SEC: u64 = 1_000_000_000;

    /// A fingerprint as the table makes one.
    fn fp(id: &str, start: bool, ts: u64) -> u64 {
        let hasher = hashbrown::DefaultHashBuilder::default();
        hasher.hash_one((id, start, ts))
    }

    #[test]
    fn same_event_again_is_seen_new_timestamp_is_not() {
        let mut r = RecentEvents::new(60 * SEC, 1000, 0);
        let hasher = hashbrown::DefaultHashBuilder::default();
        let fp = |id: &str, start: bool, ts: u64| hasher.hash_one((id, start, ts));
        assert_eq!(r.check_and_remember(fp("a", true, 1), 0), Seen::New);
        assert_eq!(r.check_and_remember(fp("a", true, 1), 0), Seen::Again);
        assert_eq!(r.check_and_remember(fp("a", true, 2), 0), Seen::New);
        assert_eq!(r.check_and_remember(fp("a", false, 1), 0), Seen::New);
        assert_eq!(r.check_and_remember(fp("b", true, 1), 0), Seen::New);
    }

    #[test]
    fn forgotten_after_two_windows() {
        let mut r = RecentEvents::new(10 * SEC, 1000, 0);
        let a = fp("a", true, 1);
        r.check_and_remember(a, 0);
        // Still remembered one window later (it moved to the previous generation).
        assert_eq!(r.check_and_remember(a, 11 * SEC), Seen::Again);
        // The re-check kept it in the previous generation only; two rotations drop it.
        assert_eq!(r.check_and_remember(fp("zz", true, 1), 22 * SEC), Seen::New);
        assert_eq!(r.check_and_remember(a, 33 * SEC), Seen::New);
    }

    #[test]
    fn memory_stays_bounded_under_a_flood() {
        let mut r = RecentEvents::new(3600 * SEC, 1600, 0);
        for i in 0..100_000 {
            r.check_and_remember(fp(&i.to_string(), true, 1), 0);
        }
        let (entries, _) = r.footprint();
        assert!(entries <= 2 * 1600, "{entries}");
    }

    #[test]
    fn a_remembered_event_costs_a_few_bytes() {
        // The budget: small next to the table (hundreds of bytes per entry).
        let mut r = RecentEvents::new(300 * SEC, 2_000_000, 0);
        for i in 0..200_000u64 {
            r.check_and_remember(fp(&i.to_string(), true, i), 0);
        }
        let (entries, bytes) = r.footprint();
        assert_eq!(entries, 200_000);
        let per_event = bytes as f64 / entries as f64;
        println!("dedup: {per_event:.1} bytes per remembered event");
        assert!(per_event <= 24.0, "{per_event}");
    }

    #[test]
    fn zero_window_disables() {
        let mut r = RecentEvents::new(0, 10, 0);
        assert_eq!(r.check_and_remember(fp("a", true, 1), 0), Seen::New);
        assert_eq!(r.check_and_remember(fp("a", true, 1), 0), Seen::New);
    }
}
