//! Recently handled events, for telling a retried export from new data (SPEC §3).
//!
//! Each event is remembered as a fingerprint of (flow, correlation id, kind, timestamp),
//! tagged with the generation it arrived in. Lookups see both generations; every
//! `window` (or when the current generation reaches `capacity`) the table drops the
//! previous generation and the current one becomes the previous. So an event is
//! remembered for at least `window` and at most `2 × window`, and memory stays within
//! `2 × capacity` fingerprints (under extreme load the window shrinks instead).
//!
//! Both generations share one hash table so that a check costs one probe: on a large
//! table that probe is a cache miss, and this runs for every event.
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
    /// Fingerprints shifted left by one; the low bit is the generation they arrived in.
    remembered: HashTable<u64>,
    generation: u64,
    in_current: usize,
    /// Clock reading (nanoseconds, the table's clock) of the last rotation.
    rotated_at: u64,
    window_nanos: u64,
    capacity: usize,
}

impl RecentEvents {
    /// `window_nanos` zero turns deduplication off. `capacity` bounds each generation.
    pub fn new(window_nanos: u64, capacity: usize, now: u64) -> Self {
        Self {
            remembered: HashTable::new(),
            generation: 0,
            in_current: 0,
            rotated_at: now,
            window_nanos,
            capacity: capacity.max(1),
        }
    }

    /// Records the fingerprint and says whether it was seen within the window.
    pub fn check_and_remember(&mut self, fingerprint: u64, now: u64) -> Seen {
        if self.window_nanos == 0 {
            return Seen::New;
        }
        let since = now.saturating_sub(self.rotated_at);
        if since >= self.window_nanos.saturating_mul(2) {
            // Quiet for two windows: everything remembered is too old.
            self.remembered.clear();
            self.in_current = 0;
            self.rotated_at = now;
        } else if since >= self.window_nanos || self.in_current >= self.capacity {
            self.rotate(now);
        }
        // Fingerprints are uniform hashes already: they serve as their own hash.
        let key = fingerprint >> 1;
        let entry = self.remembered.entry(key, |v| v >> 1 == key, |v| v >> 1);
        match entry {
            hashbrown::hash_table::Entry::Occupied(_) => Seen::Again,
            hashbrown::hash_table::Entry::Vacant(slot) => {
                slot.insert(key << 1 | self.generation);
                self.in_current += 1;
                Seen::New
            }
        }
    }

    /// Forgets the previous generation; the current one becomes the previous. The
    /// table keeps its buckets, so a steady load does not regrow it every window.
    fn rotate(&mut self, now: u64) {
        let current = self.generation;
        self.remembered.retain(|v| *v & 1 == current);
        self.generation ^= 1;
        self.in_current = 0;
        self.rotated_at = now;
    }

    /// Fingerprints held now, and the bytes their table occupies.
    pub fn footprint(&self) -> (usize, usize) {
        // hashbrown: one u64 slot plus one control byte per bucket.
        (self.remembered.len(), self.remembered.capacity() * 9)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::hash::BuildHasher;

    const SEC: u64 = 1_000_000_000;

    /// A fingerprint, the same for the same inputs within the test.
    fn fp(id: &str, start: bool, ts: u64) -> u64 {
        std::hash::BuildHasherDefault::<std::collections::hash_map::DefaultHasher>::default()
            .hash_one((id, start, ts))
    }

    #[test]
    fn same_event_again_is_seen_new_timestamp_is_not() {
        let mut r = RecentEvents::new(60 * SEC, 1000, 0);
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
    fn a_quiet_spell_of_two_windows_forgets_everything() {
        let mut r = RecentEvents::new(10 * SEC, 1000, 0);
        let a = fp("a", true, 1);
        r.check_and_remember(a, 0);
        r.check_and_remember(fp("b", true, 1), 9 * SEC);
        // 21 s after the last rotation: "b" is only 12 s old, but the rotation at 10 s
        // never happened (no events), so both generations are older than one window.
        assert_eq!(r.check_and_remember(a, 21 * SEC), Seen::New);
        assert_eq!(r.footprint().0, 1);
    }

    #[test]
    fn a_full_generation_rotates_early_and_keeps_its_buckets() {
        let mut r = RecentEvents::new(3600 * SEC, 1000, 0);
        for i in 0..1000 {
            r.check_and_remember(fp(&i.to_string(), true, 1), 0);
        }
        let buckets = r.remembered.capacity();
        // The 1001st rotates: the first 1000 are now the previous generation.
        assert_eq!(r.check_and_remember(fp("new", true, 1), 0), Seen::New);
        assert_eq!(r.check_and_remember(fp("0", true, 1), 0), Seen::Again);
        for i in 1000..2000 {
            r.check_and_remember(fp(&i.to_string(), true, 1), 0);
        }
        // Second rotation: the first 1000 are gone, the table did not grow.
        assert_eq!(r.check_and_remember(fp("0", true, 1), 0), Seen::New);
        assert!(r.remembered.capacity() <= 2 * buckets);
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
