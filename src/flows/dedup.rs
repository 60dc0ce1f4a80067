//! Recently handled events, for telling a retried export from new data (docs/behaviour.md §3).
//!
//! Each event is remembered as a fingerprint of (flow, correlation id, kind, timestamp),
//! tagged with the generation it arrived in. Lookups see both generations; every
//! `window` (or when the current generation reaches `capacity`) the previous generation
//! is dropped and the current one becomes the previous. So an event is remembered for at
//! least `window` and at most `2 × window`, and memory stays within `2 × capacity`
//! fingerprints (under extreme load the window shrinks instead).
//!
//! At high rates these sets are tens of megabytes and every event probes them at a random
//! place, so the cost is cache misses. Hence a flat open-addressing array of `u64` with
//! linear probing: the fingerprint is its own key and hash, and one check reads (and an
//! insert writes) a single cache line, where a general hash table touches two. The array
//! grows by a quarter as it fills, but never past what two full generations need (its length
//! is no power of two: a fingerprint's place is its high bits scaled to the length).
//!
//! Every correlation-table shard owns one of these and uses it under the shard's lock:
//! an event's fingerprint lives in the same shard as its instance.
//!
//! The probe misses the cache all the same (a tenth of the store's time in a profile), so
//! the store asks for the next event's line while it handles the current one: a
//! [`ProbeHint`] tells where a table is without taking its lock.

use std::sync::atomic::{AtomicPtr, AtomicUsize, Ordering};
use std::sync::Arc;

/// What the caller learns about one event.
#[derive(Debug, PartialEq, Eq)]
pub enum Seen {
    /// Not seen within the window: handle it.
    New,
    /// Seen within the window: a retry, ignored.
    Again,
}

/// Low two bits of a slot: the generation tag (1 or 2). 0 in the whole slot: empty.
const TAG_BITS: u64 = 0b11;
/// The table grows past this fill (in tenths): probes stay within a line or two.
const MAX_FILL_TENTHS: usize = 7;
const INITIAL_SLOTS: usize = 1024;

/// Fingerprints of the events handled within the dedup window (two generations), in an open-addressing table.
pub struct RecentEvents {
    /// Fingerprints without their low two bits, or-ed with their generation's tag.
    slots: Vec<u64>,
    /// Where `slots` is, for readers without the lock; set whenever `slots` is replaced.
    hint: Arc<ProbeHint>,
    len: usize,
    current_tag: u64,
    in_current: usize,
    /// Clock reading (nanoseconds, the store's clock) of the last rotation.
    rotated_at: u64,
    window_nanos: u64,
    capacity: usize,
}

impl RecentEvents {
    /// `window_nanos` zero turns deduplication off. `capacity` bounds each generation.
    pub fn new(window_nanos: u64, capacity: usize, now: u64) -> Self {
        Self {
            slots: Vec::new(),
            hint: Arc::default(),
            len: 0,
            current_tag: 1,
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
            self.slots.fill(0);
            self.len = 0;
            self.in_current = 0;
            self.rotated_at = now;
        } else if since >= self.window_nanos || self.in_current >= self.capacity {
            self.rotate(now);
        }
        if (self.len + 1) * 10 > self.slots.len() * MAX_FILL_TENTHS {
            // By a quarter, not double: the slack an array carries after growing is a
            // fifth of it at most, not half (RSS per open instance, BENCHMARKS.md). The
            // rebuilds this adds copy in order, at memory speed.
            let grown = (self.slots.len() + self.slots.len() / 4)
                .max(INITIAL_SLOTS)
                .min(slots_for(self.capacity.saturating_mul(2)))
                .max(slots_for(self.len + 1));
            self.rebuild(grown, |_| true);
        }
        let key = stored_key(fingerprint);
        let size = self.slots.len();
        let mut at = home(key, size);
        loop {
            let slot = self.slots[at];
            if slot == 0 {
                self.slots[at] = key | self.current_tag;
                self.len += 1;
                self.in_current += 1;
                return Seen::New;
            }
            if slot & !TAG_BITS == key {
                return Seen::Again;
            }
            at = next(at, size);
        }
    }

    /// Whether the fingerprint was remembered within the window, without remembering it.
    pub fn contains(&self, fingerprint: u64, now: u64) -> bool {
        if self.window_nanos == 0
            || self.slots.is_empty()
            || now.saturating_sub(self.rotated_at) >= self.window_nanos.saturating_mul(2)
        {
            return false;
        }
        let key = stored_key(fingerprint);
        let size = self.slots.len();
        let mut at = home(key, size);
        loop {
            match self.slots[at] {
                0 => return false,
                slot if slot & !TAG_BITS == key => return true,
                _ => at = next(at, size),
            }
        }
    }

    /// Where this table is, for [`ProbeHint::prefetch`] without the lock.
    pub fn hint(&self) -> Arc<ProbeHint> {
        self.hint.clone()
    }

    fn replace_slots(&mut self, slots: Vec<u64>) -> Vec<u64> {
        let old = std::mem::replace(&mut self.slots, slots);
        self.hint.set(&self.slots);
        old
    }

    /// Forgets the previous generation; the current one becomes the previous.
    fn rotate(&mut self, now: u64) {
        let keep = self.current_tag;
        let size = self.slots.len();
        self.rebuild(size, |slot| slot & TAG_BITS == keep);
        self.current_tag ^= TAG_BITS;
        self.in_current = 0;
        self.rotated_at = now;
    }

    /// Re-places the slots that `keep` accepts into a fresh array of `size` slots.
    /// Walking the old array in order visits home positions in order, so the writes to
    /// the new one are nearly sequential.
    fn rebuild(&mut self, size: usize, keep: impl Fn(u64) -> bool) {
        let old = self.replace_slots(vec![0; size]);
        self.len = 0;
        for slot in old.into_iter().filter(|&s| s != 0 && keep(s)) {
            let mut at = home(slot & !TAG_BITS, size);
            while self.slots[at] != 0 {
                at = next(at, size);
            }
            self.slots[at] = slot;
            self.len += 1;
        }
    }

    /// The remembered fingerprints (each with its generation tag in the low two bits),
    /// the current generation's tag, and the clock reading of the last rotation: what a
    /// state file keeps.
    pub fn export(&self) -> (Vec<u64>, u64, u64) {
        let slots = self.slots.iter().copied().filter(|&s| s != 0).collect();
        (slots, self.current_tag, self.rotated_at)
    }

    /// Replaces the contents with exported fingerprints. Slots that are not a tagged
    /// fingerprint are skipped, and at most two generations' capacity is taken (the
    /// state file is input: it cannot make the table grow past its bound).
    pub fn import(&mut self, slots: &[u64], current_tag: u64, rotated_at: u64) {
        if self.window_nanos == 0 {
            return;
        }
        let current_tag = if current_tag == 2 { 2 } else { 1 };
        let valid = |s: &&u64| matches!(**s & TAG_BITS, 1 | 2) && **s & !TAG_BITS != 0;
        let kept: Vec<u64> = slots
            .iter()
            .filter(valid)
            .take(self.capacity.saturating_mul(2))
            .copied()
            .collect();
        let size = slots_for(kept.len()).max(INITIAL_SLOTS);
        self.replace_slots(vec![0; size]);
        self.len = 0;
        self.in_current = 0;
        for slot in kept {
            let mut at = home(slot & !TAG_BITS, size);
            loop {
                let here = self.slots[at];
                if here == 0 {
                    self.slots[at] = slot;
                    self.len += 1;
                    self.in_current += usize::from(slot & TAG_BITS == current_tag);
                    break;
                }
                // The same fingerprint twice (a forged file): keep one.
                if here & !TAG_BITS == slot & !TAG_BITS {
                    break;
                }
                at = next(at, size);
            }
        }
        self.current_tag = current_tag;
        self.rotated_at = rotated_at;
    }

    /// Fingerprints held now, and the bytes their table occupies (tests measure it).
    #[cfg(test)]
    pub fn footprint(&self) -> (usize, usize) {
        (self.len, self.slots.len() * std::mem::size_of::<u64>())
    }
}

/// Where a table's slots are, read without its lock. A reading taken while the table is
/// replaced can be stale or torn: it then names a wrong line, and a prefetch of a wrong
/// line only costs the line.
#[derive(Debug, Default)]
pub struct ProbeHint {
    base: AtomicPtr<u64>,
    len: AtomicUsize,
}

impl ProbeHint {
    fn set(&self, slots: &[u64]) {
        self.base
            .store(slots.as_ptr().cast_mut(), Ordering::Relaxed);
        self.len.store(slots.len(), Ordering::Relaxed);
    }

    /// Asks the CPU for the line where the probe for `fingerprint` starts, so that the
    /// [`RecentEvents::check_and_remember`] that follows finds it in cache. Reads nothing.
    #[inline]
    pub fn prefetch(&self, fingerprint: u64) {
        let len = self.len.load(Ordering::Relaxed);
        if len == 0 {
            return;
        }
        let at = home(stored_key(fingerprint), len);
        let line = self.base.load(Ordering::Relaxed).wrapping_add(at);
        prefetch_line(line);
    }
}

#[cfg(target_arch = "x86_64")]
#[inline]
fn prefetch_line(line: *const u64) {
    use std::arch::x86_64::{_mm_prefetch, _MM_HINT_T0};
    // SAFETY: a prefetch is a hint: it reads no memory the program sees and cannot fault,
    // whatever the address.
    unsafe { _mm_prefetch::<_MM_HINT_T0>(line.cast()) }
}

#[cfg(not(target_arch = "x86_64"))]
#[inline]
fn prefetch_line(_: *const u64) {}

/// What a fingerprint is stored as: without its tag bits, and never zero (an empty slot).
fn stored_key(fingerprint: u64) -> u64 {
    (fingerprint & !TAG_BITS).max(TAG_BITS + 1)
}

/// Where a key's probe starts in an array of `size` slots: the bits above the tag
/// (fingerprints are uniform) scaled to the size. In key order, so a rebuild that walks
/// the old array in order writes the new one nearly in order.
fn home(key: u64, size: usize) -> usize {
    ((u128::from(key >> 2) * size as u128) >> 62) as usize
}

/// The slot after `at`, wrapping around.
fn next(at: usize, size: usize) -> usize {
    if at + 1 == size {
        0
    } else {
        at + 1
    }
}

/// Slots that hold `n` fingerprints within the fill limit.
fn slots_for(n: usize) -> usize {
    n.saturating_mul(10) / MAX_FILL_TENTHS + 1
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::hash::BuildHasher;

    const SEC: u64 = 1_000_000_000;

    /// Starts of ids `ids`, all at time 0.
    fn remember_ids(r: &mut RecentEvents, ids: std::ops::Range<u32>) {
        for i in ids {
            r.check_and_remember(fp(&i.to_string(), true, 1), 0);
        }
    }

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

    /// The hint names the table in use after every replacement (growth, rotation, a
    /// restore): a stale one would prefetch lines nobody reads.
    #[test]
    fn the_probe_hint_follows_the_table() {
        fn follows(hint: &ProbeHint, r: &RecentEvents) -> bool {
            hint.len.load(Ordering::Relaxed) == r.slots.len()
                && std::ptr::eq(hint.base.load(Ordering::Relaxed), r.slots.as_ptr())
        }
        let mut r = RecentEvents::new(10 * SEC, 100_000, 0);
        let hint = r.hint();
        for i in 0..5_000u32 {
            r.check_and_remember(fp(&i.to_string(), true, 1), 0);
            assert!(follows(&hint, &r), "after {} fingerprints", i + 1);
        }
        r.check_and_remember(fp("later", true, 1), 10 * SEC);
        assert!(follows(&hint, &r), "after a rotation");
        let (slots, tag, rotated_at) = r.export();
        let mut restored = RecentEvents::new(10 * SEC, 100_000, 0);
        let hint = restored.hint();
        restored.import(&slots, tag, rotated_at);
        assert!(follows(&hint, &restored), "after a restore");
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
    fn a_full_generation_rotates_early_and_memory_stays_put() {
        let mut r = RecentEvents::new(3600 * SEC, 1000, 0);
        remember_ids(&mut r, 0..1000);
        let slots = r.slots.len();
        // The 1001st rotates: the first 1000 are now the previous generation.
        assert_eq!(r.check_and_remember(fp("new", true, 1), 0), Seen::New);
        assert_eq!(r.check_and_remember(fp("0", true, 1), 0), Seen::Again);
        remember_ids(&mut r, 1000..2000);
        // Second rotation: the first 1000 are gone; the array grew at most once (to
        // hold two generations).
        assert_eq!(r.check_and_remember(fp("0", true, 1), 0), Seen::New);
        assert!(r.slots.len() <= 2 * slots);
    }

    #[test]
    fn the_array_never_grows_past_two_full_generations() {
        let mut r = RecentEvents::new(3600 * SEC, 1000, 0);
        remember_ids(&mut r, 0..10_000);
        // 2,000 fingerprints at 70% fill: 2,858 slots, not the 4,096 of a doubling.
        assert_eq!(r.slots.len(), slots_for(2000));
        // The last two generations: 8,000 to 9,999.
        assert!(r.contains(fp("9999", true, 1), 0));
        assert!(r.contains(fp("8000", true, 1), 0));
        assert!(!r.contains(fp("7999", true, 1), 0));
    }

    #[test]
    fn the_first_event_may_come_after_a_window() {
        let mut r = RecentEvents::new(10 * SEC, 1000, 0);
        assert_eq!(r.check_and_remember(fp("a", true, 1), 15 * SEC), Seen::New);
        assert_eq!(
            r.check_and_remember(fp("a", true, 1), 16 * SEC),
            Seen::Again
        );
    }

    #[test]
    fn zero_fingerprints_are_remembered_too() {
        let mut r = RecentEvents::new(10 * SEC, 1000, 0);
        for fp in [0, 1, 2, 3] {
            r.check_and_remember(fp, 0);
        }
        // All four share the kept bits (zero), remembered as one.
        assert_eq!(r.check_and_remember(0, 0), Seen::Again);
        assert_eq!(r.footprint().0, 1);
    }

    #[test]
    fn memory_stays_bounded_under_a_flood() {
        let mut r = RecentEvents::new(3600 * SEC, 1600, 0);
        remember_ids(&mut r, 0..100_000);
        let (entries, _) = r.footprint();
        assert!(entries <= 2 * 1600, "{entries}");
    }

    #[test]
    fn a_remembered_event_costs_a_few_bytes() {
        // The budget: small next to the correlation store (hundreds of bytes per entry).
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
