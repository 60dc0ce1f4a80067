//! The moka cache of the in-process store and its eviction listener: what an entry
//! holds ([`Slot`]), how long it lives, and how what moka removes on its own (time-outs,
//! capacity evictions) is counted.
//!
//! Exactly once: every event of one instance is applied under the lock of its shard
//! (the shard also holds that instance's retry fingerprints), so the read-modify-write
//! of one key never interleaves with another event of the same key. What remains is
//! moka's own removals, which can race with ours:
//! - `remove` may hand back an entry that expired by its time-to-live; moka then also
//!   calls the listener (in this thread, before `remove` returns) with `Expired`. The
//!   listener counts it, and tells this thread so through [`EXPIRED_IN_REMOVE`].
//! - `remove` may hand back an entry past its per-entry deadline with cause `Explicit`:
//!   the listener records nothing, so the caller counts it (it checks the deadline).
//! - `insert` over an entry that `get` no longer returns (past its per-entry deadline)
//!   reports the old one as `Replaced`: the listener counts it as timed out. The store
//!   never replaces a live entry.
//! - housekeeping removes an entry before calling the listener, so a concurrent `remove`
//!   of the same key finds nothing: one of the two owns the entry.

use std::borrow::Cow;
use std::cell::Cell;
use std::sync::{Arc, OnceLock};
use std::time::{Duration, Instant};

use foldhash::fast::RandomState;
use moka::notification::RemovalCause;
use moka::policy::{EvictionPolicy, Expiry};
use moka::sync::Cache;

use super::saved::FinalSnapshot;
use super::step_words::{Numbering, Words};
use super::steps::{self, ClosedMarks, Pending, Stepped};
use crate::flows::event::DimValues;
use crate::flows::store::open_ages::OpenAges;
use crate::flows::store::{FlowSink, Report, StoreSettings};
use crate::logging::RateLimited;

/// An instance's identity, (flow, correlation id), as a 128-bit digest: a moka key
/// with no allocation and no string compare (collisions: ~2⁻⁸⁸ at a million entries).
pub(super) type Key = u128;

/// A moka value: small and cheap to clone (moka clones it on `get` and for the
/// listener).
#[derive(Clone, Debug)]
pub(super) struct Slot {
    pub flow: Arc<str>,
    /// Store clock (nanoseconds since [`Clock::epoch`]) at which the entry times out.
    pub deadline: u64,
    pub state: SlotState,
}

#[derive(Clone, Debug)]
pub(super) enum SlotState {
    Open {
        /// Earliest start timestamp seen (duplicates can only lower it).
        start_nanos: u64,
        dims: DimValues,
    },
    /// Open with steps reached, or an end and/or steps waiting for the start (see
    /// [`steps`]). At most 16 bytes beside the niche of `dims`: `Open` entries are
    /// exactly as small as without steps.
    More(More),
}

#[derive(Clone, Debug)]
pub(super) enum More {
    /// Open with steps, by number ([`step_words`]): one allocation.
    Steps(Words),
    Shared(Arc<Shared>),
}

#[derive(Debug)]
pub(super) enum Shared {
    /// Open with steps by name, when they cannot be numbered.
    Stepped(Stepped),
    Waiting(Pending),
}

/// A slot's state, borrowed, with the shared cases unwrapped (steps held by number
/// read back by name).
pub(super) enum View<'a> {
    Open {
        start_nanos: u64,
        dims: &'a DimValues,
    },
    Stepped(Cow<'a, Stepped>),
    Waiting(&'a Pending),
}

impl SlotState {
    /// An open instance with steps: by number where it can be.
    pub(super) fn stepped(numbering: &Numbering, flow: &Arc<str>, open: Stepped) -> Self {
        SlotState::More(match numbering.encode(flow, &open) {
            Some(words) => More::Steps(words),
            None => More::Shared(Arc::new(Shared::Stepped(open))),
        })
    }

    pub(super) fn waiting(pending: Pending) -> Self {
        SlotState::More(More::Shared(Arc::new(Shared::Waiting(pending))))
    }

    /// The start time of an open instance (with or without steps).
    pub(super) fn open_start(&self) -> Option<u64> {
        match self {
            SlotState::Open { start_nanos, .. } => Some(*start_nanos),
            SlotState::More(More::Steps(words)) => Some(words.start_nanos()),
            SlotState::More(More::Shared(shared)) => match &**shared {
                Shared::Stepped(open) => Some(open.start_nanos),
                Shared::Waiting(_) => None,
            },
        }
    }

    pub(super) fn is_waiting(&self) -> bool {
        matches!(self, SlotState::More(More::Shared(shared)) if matches!(**shared, Shared::Waiting(_)))
    }

    /// `flow`: the entry's flow (step numbers are per flow).
    pub(super) fn view<'a>(&'a self, numbering: &Numbering, flow: &str) -> View<'a> {
        match self {
            SlotState::Open { start_nanos, dims } => View::Open {
                start_nanos: *start_nanos,
                dims,
            },
            SlotState::More(More::Steps(words)) => {
                View::Stepped(Cow::Owned(numbering.decode(flow, words)))
            }
            SlotState::More(More::Shared(shared)) => match &**shared {
                Shared::Stepped(open) => View::Stepped(Cow::Borrowed(open)),
                Shared::Waiting(pending) => View::Waiting(pending),
            },
        }
    }
}

/// Why an entry left without its counterpart.
#[derive(Clone, Copy, PartialEq, Eq)]
pub(super) enum Gone {
    TimedOut,
    Evicted,
}

/// Nanoseconds since the store was made, from a monotonic clock (as moka's own).
#[derive(Clone, Copy)]
pub(super) struct Clock {
    pub epoch: Instant,
}

impl Clock {
    pub(super) fn at(&self, t: Instant) -> u64 {
        u64::try_from(t.saturating_duration_since(self.epoch).as_nanos()).unwrap_or(u64::MAX)
    }

    pub(super) fn now(&self) -> u64 {
        self.at(Instant::now())
    }
}

thread_local! {
    /// The key this thread is removing, and whether the listener (called by moka
    /// inside that `remove`) counted it as expired.
    pub(super) static EXPIRED_IN_REMOVE: Cell<Option<(Key, bool)>> = const { Cell::new(None) };
}

/// Entries whose remaining time is within this of the cache's time-to-live are left to
/// the time-to-live (exact) instead of the per-entry timer wheel (coarse).
const TTL_SLACK: Duration = Duration::from_millis(50);
/// moka refuses a time-to-live of a thousand years or more.
const LONGEST_TTL: Duration = Duration::from_secs(100 * 365 * 24 * 3600);
/// Capacity evictions are logged at most this often.
const EVICTION_WARN_EVERY: Duration = Duration::from_secs(10);

/// Per-entry expiry: only for entries due before the time-to-live would remove them.
struct Deadlines {
    clock: Clock,
    ttl: Duration,
}

impl Expiry<Key, Slot> for Deadlines {
    fn expire_after_create(&self, _: &Key, slot: &Slot, created_at: Instant) -> Option<Duration> {
        let remaining =
            Duration::from_nanos(slot.deadline.saturating_sub(self.clock.at(created_at)));
        (!timed_by_ttl(remaining, self.ttl)).then_some(remaining)
    }
}

/// Whether an entry written with `remaining` time left is timed by the cache's
/// time-to-live `ttl` (exact) rather than by a per-entry expiry (coarse).
pub(super) fn timed_by_ttl(remaining: Duration, ttl: Duration) -> bool {
    remaining + TTL_SLACK >= ttl
}

/// An open instance left the store: its start time no longer counts as open.
pub(super) fn forget_age(ages: &OnceLock<OpenAges>, slot: &Slot) {
    if let (Some(ages), Some(start_nanos)) = (ages.get(), slot.state.open_start()) {
        ages.closed(&slot.flow, start_nanos);
    }
}

/// The cache every store uses: bounded, LRU, the longest timeout as time-to-live, a
/// per-entry expiry for earlier deadlines, and the listener that counts what moka
/// removes on its own.
pub(super) fn build_cache(
    settings: &StoreSettings,
    clock: Clock,
    sink: Arc<dyn FlowSink>,
    final_snapshot: Arc<FinalSnapshot>,
    closed: Arc<ClosedMarks>,
    numbering: Arc<Numbering>,
    ages: Arc<OnceLock<OpenAges>>,
) -> Cache<Key, Slot, RandomState> {
    let ttl = settings
        .longest_timeout
        .clamp(Duration::from_millis(1), LONGEST_TTL);
    let eviction_warning = RateLimited::new(EVICTION_WARN_EVERY);
    let on_removal = move |key: Arc<Key>, slot: Slot, cause: RemovalCause| {
        let why = match cause {
            // The store's own removal: the caller settles it.
            RemovalCause::Explicit => return,
            // Written to the state file at shutdown: the next run counts it.
            _ if final_snapshot.leave_to_next_run(*key) => return,
            RemovalCause::Expired => {
                EXPIRED_IN_REMOVE.with(|cell| {
                    if let Some((watched, _)) = cell.get() {
                        if watched == *key {
                            cell.set(Some((watched, true)));
                        }
                    }
                });
                Gone::TimedOut
            }
            // Only an entry past its per-entry deadline is ever replaced (see above).
            RemovalCause::Replaced => Gone::TimedOut,
            RemovalCause::Size => {
                eviction_warning.warn(format_args!(
                    "correlation store full (limits.max_in_flight): evicting the oldest \
                     entries (flow {}); raise the limit or shorten flow timeouts",
                    slot.flow
                ));
                Gone::Evicted
            }
        };
        steps::gone(&*sink, &closed, &numbering, *key, &slot, why, clock.now());
    };
    let listener = move |key: Arc<Key>, slot: Slot, cause: RemovalCause| {
        // Whatever but the store's own removal took it, the instance is no longer open.
        if cause != RemovalCause::Explicit {
            forget_age(&ages, &slot);
        }
        on_removal(key, slot, cause);
    };
    Cache::builder()
        .max_capacity(settings.capacity)
        .eviction_policy(EvictionPolicy::lru())
        .time_to_live(ttl)
        .expire_after(Deadlines { clock, ttl })
        .eviction_listener(listener)
        .build_with_hasher(RandomState::default())
}

/// An entry that left without its counterpart: an open instance timed out or was
/// dropped, a waiting end never met its start.
pub(super) fn report_gone(sink: &dyn FlowSink, numbering: &Numbering, slot: &Slot, why: Gone) {
    let flow = &slot.flow;
    match (slot.state.view(numbering, flow), why) {
        (View::Open { dims, .. }, Gone::Evicted) => sink.report(Report::Dropped {
            flow,
            start_dims: dims,
        }),
        (View::Open { dims, .. }, Gone::TimedOut) => sink.report(Report::TimedOut {
            flow,
            start_dims: dims,
            transits: &[],
            last_step: None,
        }),
        (View::Stepped(open), Gone::Evicted) => sink.report(Report::Dropped {
            flow,
            start_dims: &open.dims,
        }),
        (View::Stepped(open), Gone::TimedOut) => steps::timed_out(sink, flow, &open),
        (View::Waiting(pending), _) => {
            if pending.end.is_some() {
                sink.report(Report::Unmatched {
                    flow,
                    evicted: why == Gone::Evicted,
                });
            }
            steps::steps_unmatched(sink, flow, pending);
        }
    }
}

/// The store's moka cache alone, built exactly as the store builds it (capacity,
/// policy, expiry, listener, key and value types): the benchmark's baseline, one insert
/// per start and one remove per end.
#[cfg(feature = "test-hooks")]
pub struct CacheBaseline {
    cache: Cache<Key, Slot, RandomState>,
    clock: Clock,
    flow: Arc<str>,
    dims: DimValues,
    timeout_nanos: u64,
}

#[cfg(feature = "test-hooks")]
impl CacheBaseline {
    /// A cache built as the store builds its own, for one flow named `baseline`.
    pub fn new(settings: StoreSettings, sink: Arc<dyn FlowSink>) -> Self {
        let clock = Clock {
            epoch: Instant::now(),
        };
        let timeout_nanos =
            u64::try_from((settings.timeout_for)("baseline").as_nanos()).unwrap_or(u64::MAX);
        Self {
            cache: build_cache(
                &settings,
                clock,
                sink,
                Arc::default(),
                Arc::new(ClosedMarks::new(&[], 0, 1)),
                Arc::default(),
                Arc::default(),
            ),
            clock,
            flow: Arc::from("baseline"),
            dims: Arc::from([]),
            timeout_nanos,
        }
    }

    /// Opens an instance under `key`.
    pub fn start(&self, key: u128, start_nanos: u64) {
        let slot = Slot {
            flow: self.flow.clone(),
            deadline: self.clock.now().saturating_add(self.timeout_nanos),
            state: SlotState::Open {
                start_nanos,
                dims: self.dims.clone(),
            },
        };
        self.cache.insert(key, slot);
    }

    /// Closes the instance under `key`; `false` when it was not there.
    pub fn end(&self, key: u128) -> bool {
        self.cache.remove(&key).is_some()
    }

    /// Runs moka's pending housekeeping (expiry, eviction).
    pub fn run_pending_tasks(&self) {
        self.cache.run_pending_tasks();
    }
}
