//! The correlation table: pairs starts with ends, times out open instances, evicts the
//! oldest entries when full, and reports every outcome to a [`FlowSink`].
//!
//! The table is a set of shards, each a hash map behind its own mutex. An event's flow
//! and correlation id pick its shard, and everything about one instance — pairing,
//! retry detection, timeout, eviction — happens under that shard's lock, so every
//! instance is reported exactly once without further bookkeeping.
//!
//! Timeouts: an entry's deadline is its arrival time plus its flow's timeout, so entries
//! with the same timeout reach their deadlines in the order they arrived. Each shard
//! keeps one FIFO of pending deadlines per distinct timeout; housekeeping pops the due
//! fronts (O(1) per timeout), and the oldest entry, for eviction when the table is full,
//! is the oldest of those fronts. An entry closed before its deadline leaves a stale
//! queue item behind: skipped when popped, and compacted away once stale items outnumber
//! live entries, so queues stay within twice the table.

use std::collections::VecDeque;
use std::hash::BuildHasher;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::{Duration, Instant};

use hashbrown::{DefaultHashBuilder, HashTable};

use super::dedup::{RecentEvents, Seen};
use super::event::{DimValues, EventKind, FlowEvent, Outcome, TraceRef};
use crate::config::Config;

/// What the table tells its sink. `flow` is the flow name; `start_dims` the dimension
/// values captured from the start event.
#[derive(Debug)]
pub enum Report<'a> {
    /// A new instance opened.
    Opened {
        flow: &'a Arc<str>,
        start_dims: &'a DimValues,
    },
    /// An instance closed by its end event.
    Completed {
        flow: &'a Arc<str>,
        start_dims: &'a DimValues,
        end: &'a EndRecord,
        /// end − start in seconds; negative from clock skew.
        duration_secs: f64,
    },
    /// The instance's deadline passed with no end.
    TimedOut {
        flow: &'a Arc<str>,
        start_dims: &'a DimValues,
    },
    /// The instance was evicted because the table was full.
    Dropped {
        flow: &'a Arc<str>,
        start_dims: &'a DimValues,
    },
    /// An end waited for its start, which never came (or it was evicted while waiting).
    Unmatched { flow: &'a Arc<str>, evicted: bool },
    /// An event ignored as a duplicate (a second start, a second end, or a retry).
    Duplicate { kind: EventKind },
}

/// Receives what the table decides. Implemented by the metrics registry, and by a
/// recording sink in tests. Called with a shard lock held: it must not call back into
/// the table.
pub trait FlowSink: Send + Sync + 'static {
    fn report(&self, report: Report<'_>);
}

/// An end event, kept while it waits for its start and handed to the sink on completion.
#[derive(Debug, Clone)]
pub struct EndRecord {
    pub outcome: Outcome,
    pub timestamp_nanos: u64,
    pub dims: DimValues,
    pub trace: Option<TraceRef>,
}

/// Settings the table needs, apart from the sink.
#[derive(Clone)]
pub struct TableSettings {
    pub capacity: u64,
    pub dedup_window: Duration,
    /// Per-flow timeout lookup.
    pub timeout_for: Arc<dyn Fn(&str) -> Duration + Send + Sync>,
}

impl TableSettings {
    /// The settings the service runs with.
    pub fn from_config(config: &Config) -> Self {
        let timeouts = config.clone();
        Self {
            capacity: config.limits.max_in_flight,
            dedup_window: config.limits.dedup_window,
            timeout_for: Arc::new(move |flow| timeouts.timeout_for(flow)),
        }
    }
}

pub struct FlowTable {
    shards: Box<[Mutex<Shard>]>,
    hasher: DefaultHashBuilder,
    sink: Arc<dyn FlowSink>,
    timeout_for: Arc<dyn Fn(&str) -> Duration + Send + Sync>,
    capacity: usize,
    /// Entries across all shards (the capacity check needs the total).
    len: AtomicUsize,
    /// Origin of the table's clock: deadlines are nanoseconds since then.
    epoch: Instant,
    last_evict_warning: Mutex<Option<Instant>>,
}

struct Shard {
    entries: HashTable<Entry>,
    /// One FIFO per distinct timeout (a handful: the default and per-flow overrides).
    queues: Vec<DeadlineQueue>,
    /// Insertion counter: tells a live queue item from a stale one, and age.
    next_seq: u64,
    recent: RecentEvents,
}

struct DeadlineQueue {
    timeout_nanos: u64,
    items: VecDeque<Pending>,
}

#[derive(Clone, Copy)]
struct Pending {
    deadline: u64,
    seq: u64,
    hash: u64,
}

struct Entry {
    /// Kept so that growing the map never rehashes strings.
    hash: u64,
    seq: u64,
    deadline: u64,
    flow: Arc<str>,
    id: Box<str>,
    state: State,
}

enum State {
    Open {
        /// Earliest start timestamp seen (duplicates can only lower it).
        start_nanos: u64,
        dims: DimValues,
    },
    /// Boxed: waiting ends are the minority, and open entries stay small.
    WaitingForStart(Box<EndRecord>),
}

/// Expirations handled per lock hold: a burst of timeouts lets writers in between.
const EXPIRE_BATCH: usize = 4096;
/// Stale queue items tolerated beyond the live entries before a compaction.
const COMPACT_SLACK: usize = 1024;
/// Capacity evictions are logged at most this often.
const EVICTION_WARN_EVERY: Duration = Duration::from_secs(10);
/// Shards hold at least this many entries' worth of capacity (small tables: one shard,
/// so "the oldest" is exact where tests and tiny limits can see it).
const MIN_SHARD_CAPACITY: u64 = 4096;
const MAX_SHARDS: u64 = 64;

impl FlowTable {
    pub fn new(settings: TableSettings, sink: Arc<dyn FlowSink>) -> Self {
        let shard_count = (settings.capacity / MIN_SHARD_CAPACITY)
            .next_power_of_two()
            .clamp(1, MAX_SHARDS) as usize;
        // Remember every event of a full table for the window, at least.
        let dedup_capacity = usize::try_from(settings.capacity.saturating_mul(2))
            .unwrap_or(usize::MAX)
            .max(1024)
            / shard_count;
        let window_nanos = u64::try_from(settings.dedup_window.as_nanos()).unwrap_or(u64::MAX);
        let shards = (0..shard_count)
            .map(|_| {
                Mutex::new(Shard {
                    entries: HashTable::new(),
                    queues: Vec::new(),
                    next_seq: 0,
                    recent: RecentEvents::new(window_nanos, dedup_capacity, 0),
                })
            })
            .collect();
        Self {
            shards,
            hasher: DefaultHashBuilder::default(),
            sink,
            timeout_for: settings.timeout_for,
            capacity: usize::try_from(settings.capacity).unwrap_or(usize::MAX),
            len: AtomicUsize::new(0),
            epoch: Instant::now(),
            last_evict_warning: Mutex::new(None),
        }
    }

    fn clock(&self) -> u64 {
        u64::try_from(self.epoch.elapsed().as_nanos()).unwrap_or(u64::MAX)
    }

    fn shard(&self, hash: u64) -> MutexGuard<'_, Shard> {
        // Bits the hash table itself does not use (it takes the low bits for the bucket
        // and the top seven for its tag), so every shard's map still sees good hashes.
        let index = (hash >> 40) as usize & (self.shards.len() - 1);
        // A panic while holding a shard (a sink bug) leaves it consistent enough to go
        // on: every step leaves the map and queues valid.
        self.shards[index]
            .lock()
            .unwrap_or_else(|poisoned| poisoned.into_inner())
    }

    /// Applies one flow event (SPEC §3).
    pub fn apply(&self, event: FlowEvent) {
        let hash = self.hasher.hash_one((&*event.flow, &*event.correlation_id));
        let fingerprint =
            self.hasher
                .hash_one((hash, event.kind == EventKind::Start, event.timestamp_nanos));
        let sink = &*self.sink;
        let now = self.clock();
        let mut shard = self.shard(hash);
        if shard.recent.check_and_remember(fingerprint, now) == Seen::Again {
            sink.report(Report::Duplicate { kind: event.kind });
            return;
        }
        let FlowEvent {
            flow,
            correlation_id,
            kind,
            timestamp_nanos,
            dims,
            trace,
            ..
        } = event;
        let same_instance = |e: &Entry| e.hash == hash && e.flow == flow && e.id == correlation_id;
        match shard.entries.find_entry(hash, same_instance) {
            Ok(found) if found.get().deadline <= now => {
                // Past its deadline, not yet reached by housekeeping: it timed out.
                // The event then starts afresh (a late end waits, and is unmatched).
                let (gone, _) = found.remove();
                self.len.fetch_sub(1, Ordering::Relaxed);
                report_gone(sink, &gone, false);
            }
            Ok(mut found) => match (kind, &mut found.get_mut().state) {
                (EventKind::Start, State::Open { start_nanos, .. }) => {
                    *start_nanos = (*start_nanos).min(timestamp_nanos);
                    sink.report(Report::Duplicate { kind });
                    return;
                }
                (EventKind::End(_), State::WaitingForStart(_)) => {
                    sink.report(Report::Duplicate { kind });
                    return;
                }
                (EventKind::Start, State::WaitingForStart(_)) => {
                    let (entry, _) = found.remove();
                    self.len.fetch_sub(1, Ordering::Relaxed);
                    let State::WaitingForStart(end) = &entry.state else {
                        unreachable!("matched above")
                    };
                    sink.report(Report::Opened {
                        flow: &flow,
                        start_dims: &dims,
                    });
                    complete(sink, &flow, &dims, timestamp_nanos, end);
                    return;
                }
                (EventKind::End(outcome), State::Open { .. }) => {
                    let (entry, _) = found.remove();
                    self.len.fetch_sub(1, Ordering::Relaxed);
                    let State::Open {
                        start_nanos,
                        dims: start_dims,
                    } = &entry.state
                    else {
                        unreachable!("matched above")
                    };
                    let end = EndRecord {
                        outcome,
                        timestamp_nanos,
                        dims,
                        trace,
                    };
                    complete(sink, &flow, start_dims, *start_nanos, &end);
                    return;
                }
            },
            Err(_) => {}
        }
        let state = match kind {
            EventKind::Start => {
                sink.report(Report::Opened {
                    flow: &flow,
                    start_dims: &dims,
                });
                State::Open {
                    start_nanos: timestamp_nanos,
                    dims,
                }
            }
            EventKind::End(outcome) => State::WaitingForStart(Box::new(EndRecord {
                outcome,
                timestamp_nanos,
                dims,
                trace,
            })),
        };
        if self.len.load(Ordering::Relaxed) >= self.capacity {
            self.evict_oldest(&mut shard, now);
        }
        // Only new entries need their flow's timeout: ends that close an instance skip it.
        let timeout = (self.timeout_for)(&flow);
        let timeout_nanos = u64::try_from(timeout.as_nanos()).unwrap_or(u64::MAX);
        shard.insert(
            Entry {
                hash,
                seq: 0,
                deadline: now.saturating_add(timeout_nanos),
                flow,
                id: correlation_id,
                state,
            },
            timeout_nanos,
        );
        self.len.fetch_add(1, Ordering::Relaxed);
    }

    /// Makes room in a full table: the shard's oldest entry goes. Shards fill evenly
    /// (uniform hashes), so that is close to the oldest overall. An empty shard has
    /// nothing to give; the table then runs over by at most one entry per shard.
    /// The oldest may already be past its deadline (housekeeping not there yet): then it
    /// timed out rather than being dropped.
    fn evict_oldest(&self, shard: &mut Shard, now: u64) {
        if let Some(entry) = shard.pop_oldest() {
            self.len.fetch_sub(1, Ordering::Relaxed);
            let evicted = entry.deadline > now;
            if evicted {
                self.warn_evicted(&entry.flow);
            }
            report_gone(&*self.sink, &entry, evicted);
        }
    }

    /// Housekeeping: reports and removes every entry past its deadline. Call it on a
    /// short interval; timeouts are counted at most that late.
    pub fn run_pending_tasks(&self) {
        for shard in self.shards.iter() {
            loop {
                let now = self.clock();
                let mut shard = shard.lock().unwrap_or_else(|p| p.into_inner());
                let (expired, done) = shard.expire_due(now, EXPIRE_BATCH, &*self.sink);
                self.len.fetch_sub(expired, Ordering::Relaxed);
                if done {
                    shard.shrink_if_sparse();
                    break;
                }
            }
        }
    }

    /// Entries held now (open instances and waiting ends).
    pub fn len(&self) -> u64 {
        self.len.load(Ordering::Relaxed) as u64
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    fn warn_evicted(&self, flow: &str) {
        let mut last = self
            .last_evict_warning
            .lock()
            .unwrap_or_else(|p| p.into_inner());
        let now = Instant::now();
        if last.is_none_or(|t| now.duration_since(t) >= EVICTION_WARN_EVERY) {
            *last = Some(now);
            tracing::warn!(
                flow,
                "correlation table full (limits.max_in_flight): evicting the oldest entries; \
                 raise the limit or shorten flow timeouts"
            );
        }
    }
}

impl Shard {
    /// Items across all queues, live and stale (a handful of queues: cheap to sum).
    fn queued(&self) -> usize {
        self.queues.iter().map(|q| q.items.len()).sum()
    }

    fn insert(&mut self, mut entry: Entry, timeout_nanos: u64) {
        entry.seq = self.next_seq;
        self.next_seq += 1;
        let pending = Pending {
            deadline: entry.deadline,
            seq: entry.seq,
            hash: entry.hash,
        };
        match self
            .queues
            .iter_mut()
            .find(|q| q.timeout_nanos == timeout_nanos)
        {
            Some(queue) => queue.items.push_back(pending),
            None => self.queues.push(DeadlineQueue {
                timeout_nanos,
                items: VecDeque::from([pending]),
            }),
        }
        self.entries.insert_unique(entry.hash, entry, |e| e.hash);
        if self.queued() > 2 * self.entries.len() + COMPACT_SLACK {
            self.compact_queues();
        }
    }

    /// Drops queue items whose entry has left (closed before its deadline).
    fn compact_queues(&mut self) {
        let entries = &self.entries;
        for queue in &mut self.queues {
            queue.items.retain(|p| is_live(entries, p));
            if queue.items.capacity() > 4 * queue.items.len() + COMPACT_SLACK {
                queue.items.shrink_to_fit();
            }
        }
    }

    /// Removes the entry that arrived first.
    fn pop_oldest(&mut self) -> Option<Entry> {
        let entries = &self.entries;
        let mut oldest: Option<(usize, u64)> = None;
        for (index, queue) in self.queues.iter_mut().enumerate() {
            while let Some(front) = queue.items.front() {
                if is_live(entries, front) {
                    if oldest.is_none_or(|(_, seq)| front.seq < seq) {
                        oldest = Some((index, front.seq));
                    }
                    break;
                }
                queue.items.pop_front();
            }
        }
        let (index, _) = oldest?;
        let pending = self.queues[index].items.pop_front()?;
        self.take(&pending)
    }

    /// Removes the queue item's entry, if it is still the one the item was queued for.
    fn take(&mut self, pending: &Pending) -> Option<Entry> {
        self.entries
            .find_entry(pending.hash, |e| e.seq == pending.seq)
            .ok()
            .map(|found| found.remove().0)
    }

    /// Reports and removes up to `budget` entries past their deadline. Returns how many
    /// left and whether every due one was handled.
    fn expire_due(&mut self, now: u64, mut budget: usize, sink: &dyn FlowSink) -> (usize, bool) {
        let mut expired = 0;
        for index in 0..self.queues.len() {
            loop {
                let queue = &mut self.queues[index].items;
                let Some(front) = queue.front().copied() else {
                    break;
                };
                if front.deadline > now {
                    break;
                }
                if budget == 0 {
                    return (expired, false);
                }
                budget -= 1;
                queue.pop_front();
                if let Some(entry) = self.take(&front) {
                    expired += 1;
                    report_gone(sink, &entry, false);
                }
            }
        }
        (expired, true)
    }

    /// After a burst, gives memory back rather than keeping the peak forever.
    fn shrink_if_sparse(&mut self) {
        let len = self.entries.len();
        if self.entries.capacity() > 4 * len + COMPACT_SLACK {
            self.entries.shrink_to(2 * len, |e| e.hash);
        }
        if self.queued() > 2 * len + COMPACT_SLACK {
            self.compact_queues();
        }
    }
}

fn is_live(entries: &HashTable<Entry>, pending: &Pending) -> bool {
    entries
        .find(pending.hash, |e| e.seq == pending.seq)
        .is_some()
}

fn complete(
    sink: &dyn FlowSink,
    flow: &Arc<str>,
    start_dims: &DimValues,
    start_nanos: u64,
    end: &EndRecord,
) {
    let duration_secs = (i128::from(end.timestamp_nanos) - i128::from(start_nanos)) as f64 / 1e9;
    sink.report(Report::Completed {
        flow,
        start_dims,
        end,
        duration_secs,
    });
}

/// An entry that left without its counterpart: an open instance timed out or was
/// dropped, a waiting end never met its start.
fn report_gone(sink: &dyn FlowSink, entry: &Entry, evicted: bool) {
    let flow = &entry.flow;
    match &entry.state {
        State::Open { dims, .. } if evicted => sink.report(Report::Dropped {
            flow,
            start_dims: dims,
        }),
        State::Open { dims, .. } => sink.report(Report::TimedOut {
            flow,
            start_dims: dims,
        }),
        State::WaitingForStart(_) => sink.report(Report::Unmatched { flow, evicted }),
    }
}

/// Runs the table's housekeeping on a dedicated thread until dropped. A thread (not a
/// tokio task) because a burst of expirations can take a while and must not stall
/// request handling.
pub struct Maintenance {
    stop: Arc<std::sync::atomic::AtomicBool>,
    handle: Option<std::thread::JoinHandle<()>>,
}

impl Maintenance {
    pub fn start(table: Arc<FlowTable>, every: Duration) -> Self {
        let stop = Arc::new(std::sync::atomic::AtomicBool::new(false));
        let thread_stop = stop.clone();
        let handle = std::thread::Builder::new()
            .name("flow-table-maintenance".into())
            .spawn(move || {
                while !thread_stop.load(Ordering::Acquire) {
                    table.run_pending_tasks();
                    std::thread::park_timeout(every);
                }
            })
            .expect("spawn maintenance thread");
        Self {
            stop,
            handle: Some(handle),
        }
    }
}

impl Drop for Maintenance {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::Release);
        if let Some(h) = self.handle.take() {
            h.thread().unpark();
            let _ = h.join();
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::flows::event::Source;
    use std::collections::BTreeMap;

    /// Counts what the table reports, per flow.
    #[derive(Default)]
    struct Recorder {
        counts: Mutex<BTreeMap<(String, String), i64>>,
        durations: Mutex<Vec<f64>>,
    }

    impl Recorder {
        fn get(&self, flow: &str, what: &str) -> i64 {
            *self
                .counts
                .lock()
                .unwrap()
                .get(&(flow.to_string(), what.to_string()))
                .unwrap_or(&0)
        }
        fn add(&self, flow: &str, what: &str) {
            *self
                .counts
                .lock()
                .unwrap()
                .entry((flow.to_string(), what.to_string()))
                .or_default() += 1;
        }
        /// started = Σ completed + incomplete + dropped + in_progress, with
        /// in_progress = opened − closed.
        fn in_progress(&self, flow: &str) -> i64 {
            self.get(flow, "started")
                - self.get(flow, "success")
                - self.get(flow, "failure")
                - self.get(flow, "cancelled")
                - self.get(flow, "incomplete")
                - self.get(flow, "dropped")
        }
    }

    impl FlowSink for Recorder {
        fn report(&self, report: Report<'_>) {
            match report {
                Report::Opened { flow, .. } => self.add(flow, "started"),
                Report::Completed {
                    flow,
                    end,
                    duration_secs,
                    ..
                } => {
                    self.add(flow, end.outcome.as_str());
                    if end.outcome == Outcome::Success {
                        self.durations.lock().unwrap().push(duration_secs);
                    }
                }
                Report::TimedOut { flow, .. } => self.add(flow, "incomplete"),
                Report::Dropped { flow, .. } => self.add(flow, "dropped"),
                Report::Unmatched { flow, .. } => self.add(flow, "unmatched"),
                Report::Duplicate { kind } => self.add("*", &format!("dup_{}", kind.label())),
            }
        }
    }

    fn table_with(
        timeout: Duration,
        capacity: u64,
        dedup: Duration,
    ) -> (Arc<FlowTable>, Arc<Recorder>) {
        let rec = Arc::new(Recorder::default());
        let table = FlowTable::new(
            TableSettings {
                capacity,
                dedup_window: dedup,
                timeout_for: Arc::new(move |_| timeout),
            },
            rec.clone(),
        );
        (Arc::new(table), rec)
    }

    /// Flow "short" times out after `short`, every other flow after ten minutes.
    fn table_with_short_flow(capacity: u64, short: Duration) -> (Arc<FlowTable>, Arc<Recorder>) {
        let rec = Arc::new(Recorder::default());
        let table = FlowTable::new(
            TableSettings {
                capacity,
                dedup_window: Duration::from_secs(300),
                timeout_for: Arc::new(move |flow| {
                    if flow == "short" {
                        short
                    } else {
                        Duration::from_secs(600)
                    }
                }),
            },
            rec.clone(),
        );
        (Arc::new(table), rec)
    }

    fn table(timeout: Duration) -> (Arc<FlowTable>, Arc<Recorder>) {
        table_with(timeout, 1000, Duration::from_secs(300))
    }

    fn ev(flow: &str, id: &str, kind: EventKind, ts: u64) -> FlowEvent {
        FlowEvent {
            flow: Arc::from(flow),
            correlation_id: id.into(),
            kind,
            timestamp_nanos: ts,
            dims: Arc::from(Vec::new()),
            trace: None,
            source: Source::SpanEvent,
        }
    }

    const START: EventKind = EventKind::Start;
    const OK: EventKind = EventKind::End(Outcome::Success);
    const FAIL: EventKind = EventKind::End(Outcome::Failure);
    const CANCEL: EventKind = EventKind::End(Outcome::Cancelled);
    const SEC: u64 = 1_000_000_000;

    /// Waits (bounded) for a timeout to be reported, driving housekeeping as the service
    /// does.
    fn settle_expiries(t: &FlowTable, rec: &Recorder, until: impl Fn(&Recorder) -> bool) {
        let give_up = Instant::now() + Duration::from_secs(5);
        while !until(rec) && Instant::now() < give_up {
            t.run_pending_tasks();
            std::thread::sleep(Duration::from_millis(20));
        }
    }

    #[test]
    fn start_then_end_completes_with_duration() {
        let (t, rec) = table(Duration::from_secs(60));
        t.apply(ev("order", "1", START, 10 * SEC));
        assert_eq!(rec.in_progress("order"), 1);
        t.apply(ev("order", "1", OK, 12 * SEC + SEC / 2));
        assert_eq!(rec.get("order", "started"), 1);
        assert_eq!(rec.get("order", "success"), 1);
        assert_eq!(rec.in_progress("order"), 0);
        assert_eq!(*rec.durations.lock().unwrap(), vec![2.5]);
        t.run_pending_tasks();
        assert_eq!(t.len(), 0);
    }

    #[test]
    fn failure_and_cancelled_outcomes() {
        let (t, rec) = table(Duration::from_secs(60));
        t.apply(ev("o", "f", START, SEC));
        t.apply(ev("o", "f", FAIL, 2 * SEC));
        t.apply(ev("o", "c", START, SEC));
        t.apply(ev("o", "c", CANCEL, 2 * SEC));
        assert_eq!(rec.get("o", "failure"), 1);
        assert_eq!(rec.get("o", "cancelled"), 1);
        assert_eq!(rec.in_progress("o"), 0);
    }

    #[test]
    fn end_before_start_pairs_when_the_start_arrives() {
        let (t, rec) = table(Duration::from_secs(60));
        t.apply(ev("order", "1", OK, 15 * SEC));
        assert_eq!(rec.get("order", "started"), 0);
        assert_eq!(rec.get("order", "success"), 0);
        t.apply(ev("order", "1", START, 10 * SEC));
        assert_eq!(rec.get("order", "started"), 1);
        assert_eq!(rec.get("order", "success"), 1);
        assert_eq!(*rec.durations.lock().unwrap(), vec![5.0]);
        assert_eq!(rec.in_progress("order"), 0);
        assert_eq!(rec.get("order", "unmatched"), 0);
    }

    #[test]
    fn end_whose_start_never_comes_is_unmatched_only() {
        let (t, rec) = table(Duration::from_millis(200));
        t.apply(ev("order", "1", OK, SEC));
        settle_expiries(&t, &rec, |r| r.get("order", "unmatched") > 0);
        assert_eq!(rec.get("order", "unmatched"), 1);
        assert_eq!(rec.get("order", "started"), 0);
        assert_eq!(rec.get("order", "success"), 0);
        assert_eq!(rec.get("order", "incomplete"), 0);
    }

    #[test]
    fn timeout_counts_incomplete_once_and_a_late_end_is_unmatched() {
        let (t, rec) = table(Duration::from_millis(200));
        t.apply(ev("order", "1", START, SEC));
        let deadline = Instant::now() + Duration::from_millis(200);
        settle_expiries(&t, &rec, |r| r.get("order", "incomplete") > 0);
        assert_eq!(rec.get("order", "incomplete"), 1);
        // Counted within 2 s of the deadline (SPEC §3).
        assert!(Instant::now() < deadline + Duration::from_secs(2));
        assert_eq!(rec.in_progress("order"), 0);
        t.apply(ev("order", "1", OK, 2 * SEC));
        settle_expiries(&t, &rec, |r| r.get("order", "unmatched") > 0);
        assert_eq!(rec.get("order", "incomplete"), 1);
        assert_eq!(rec.get("order", "success"), 0);
        assert_eq!(rec.get("order", "unmatched"), 1);
        assert_eq!(rec.get("order", "started"), 1);
    }

    #[test]
    fn late_end_racing_an_unevicted_expiry_counts_once() {
        // No housekeeping runs between the deadline and the end: the table still holds
        // the expired entry and its queue item. The end must not complete it, and
        // housekeeping must not count it a second time later.
        let (t, rec) = table(Duration::from_millis(100));
        t.apply(ev("order", "1", START, SEC));
        std::thread::sleep(Duration::from_millis(150));
        t.apply(ev("order", "1", OK, 2 * SEC));
        assert_eq!(rec.get("order", "incomplete"), 1);
        assert_eq!(rec.get("order", "success"), 0);
        settle_expiries(&t, &rec, |r| r.get("order", "unmatched") > 0);
        for _ in 0..10 {
            t.run_pending_tasks();
            std::thread::sleep(Duration::from_millis(20));
        }
        assert_eq!(rec.get("order", "incomplete"), 1);
        assert_eq!(rec.get("order", "success"), 0);
        assert_eq!(rec.get("order", "unmatched"), 1);
        assert_eq!(rec.in_progress("order"), 0);
    }

    #[test]
    fn duplicate_start_keeps_the_earliest_timestamp() {
        let (t, rec) = table(Duration::from_secs(60));
        t.apply(ev("o", "1", START, 10 * SEC));
        t.apply(ev("o", "1", START, 8 * SEC));
        t.apply(ev("o", "1", START, 12 * SEC));
        assert_eq!(rec.get("o", "started"), 1);
        assert_eq!(rec.get("*", "dup_start"), 2);
        t.apply(ev("o", "1", OK, 11 * SEC));
        assert_eq!(*rec.durations.lock().unwrap(), vec![3.0]);
        assert_eq!(rec.in_progress("o"), 0);
    }

    #[test]
    fn second_end_while_waiting_is_a_duplicate() {
        let (t, rec) = table(Duration::from_secs(60));
        t.apply(ev("o", "1", OK, 10 * SEC));
        t.apply(ev("o", "1", FAIL, 11 * SEC));
        assert_eq!(rec.get("*", "dup_end"), 1);
        t.apply(ev("o", "1", START, 9 * SEC));
        assert_eq!(rec.get("o", "success"), 1);
        assert_eq!(rec.get("o", "failure"), 0);
    }

    #[test]
    fn same_id_in_two_flows_is_two_instances() {
        let (t, rec) = table(Duration::from_secs(60));
        t.apply(ev("a", "shared", START, SEC));
        t.apply(ev("b", "shared", START, SEC));
        assert_eq!(rec.get("a", "started"), 1);
        assert_eq!(rec.get("b", "started"), 1);
        t.apply(ev("b", "shared", FAIL, 2 * SEC));
        assert_eq!(rec.get("b", "failure"), 1);
        assert_eq!(rec.in_progress("a"), 1);
        assert_eq!(rec.in_progress("b"), 0);
    }

    #[test]
    fn negative_duration_is_reported_as_such() {
        let (t, rec) = table(Duration::from_secs(60));
        t.apply(ev("o", "1", START, 10 * SEC));
        t.apply(ev("o", "1", OK, 9 * SEC));
        assert_eq!(rec.get("o", "success"), 1);
        assert_eq!(*rec.durations.lock().unwrap(), vec![-1.0]);
    }

    #[test]
    fn full_table_evicts_the_oldest() {
        let (t, rec) = table_with(Duration::from_secs(60), 100, Duration::from_secs(300));
        for i in 0..100 {
            t.apply(ev("o", &format!("old-{i}"), START, SEC));
        }
        t.apply(ev("late", "w", OK, SEC));
        for i in 0..50 {
            t.apply(ev("o", &format!("new-{i}"), START, SEC));
        }
        assert_eq!(t.len(), 100);
        // The 51 oldest went, in arrival order: old-0 to make room for the waiting end,
        // old-1..old-50 for the new starts (the waiting end is younger: it stays).
        assert_eq!(rec.get("o", "dropped"), 51);
        assert_eq!(rec.get("late", "unmatched"), 0);
        for i in 0..50 {
            t.apply(ev("o", &format!("new-{i}"), OK, 2 * SEC));
        }
        assert_eq!(rec.get("o", "success"), 50);
        t.apply(ev("o", "old-50", OK, 2 * SEC));
        t.apply(ev("o", "old-51", OK, 2 * SEC));
        assert_eq!(
            rec.get("o", "success"),
            51,
            "old-50 was evicted, old-51 was not"
        );
        assert_eq!(rec.get("o", "started"), 150);
        assert_eq!(
            rec.get("o", "success") + rec.get("o", "dropped") + rec.in_progress("o"),
            150
        );
    }

    #[test]
    fn a_full_table_times_out_an_overdue_oldest_instead_of_dropping_it() {
        let (t, rec) = table_with(Duration::from_millis(50), 2, Duration::from_secs(300));
        t.apply(ev("o", "1", START, SEC));
        t.apply(ev("o", "2", START, SEC));
        std::thread::sleep(Duration::from_millis(60));
        // No housekeeping ran: "1" is overdue when "3" needs its room.
        t.apply(ev("o", "3", START, SEC));
        assert_eq!(rec.get("o", "incomplete"), 1);
        assert_eq!(rec.get("o", "dropped"), 0);
        assert_eq!(t.len(), 2);
    }

    #[test]
    fn eviction_takes_the_oldest_across_timeouts() {
        // Two flows with different timeouts live in different deadline queues; the
        // oldest entry overall goes first whatever its queue.
        let (t, rec) = table_with_short_flow(3, Duration::from_secs(10));
        t.apply(ev("long", "1", START, SEC));
        t.apply(ev("short", "1", START, SEC));
        t.apply(ev("long", "2", START, SEC));
        t.apply(ev("short", "2", START, SEC));
        assert_eq!(rec.get("long", "dropped"), 1);
        t.apply(ev("short", "3", START, SEC));
        assert_eq!(rec.get("short", "dropped"), 1);
        t.apply(ev("long", "2", OK, 2 * SEC));
        t.apply(ev("short", "2", OK, 2 * SEC));
        assert_eq!(rec.get("long", "success") + rec.get("short", "success"), 2);
    }

    #[test]
    fn per_flow_timeouts_fire_independently() {
        let (t, rec) = table_with_short_flow(1000, Duration::from_millis(100));
        // The long-timeout entry arrives first and sits at the front of its own queue;
        // it must not hold back the short one behind it.
        t.apply(ev("long", "1", START, SEC));
        t.apply(ev("short", "1", START, SEC));
        settle_expiries(&t, &rec, |r| r.get("short", "incomplete") > 0);
        assert_eq!(rec.get("short", "incomplete"), 1);
        assert_eq!(rec.get("long", "incomplete"), 0);
        assert_eq!(t.len(), 1);
    }

    #[test]
    fn a_burst_of_timeouts_larger_than_one_batch_is_all_counted() {
        let (t, rec) = table_with(Duration::from_millis(50), 100_000, Duration::ZERO);
        let n = 3 * EXPIRE_BATCH + 7;
        for i in 0..n {
            t.apply(ev("b", &i.to_string(), START, SEC));
        }
        std::thread::sleep(Duration::from_millis(60));
        t.run_pending_tasks();
        assert_eq!(rec.get("b", "incomplete"), n as i64);
        assert!(t.is_empty());
    }

    #[test]
    fn closed_entries_do_not_pile_up_in_the_deadline_queues() {
        // A long timeout and a steady open/close load: each closed entry leaves a stale
        // queue item; compaction keeps them within twice the live entries.
        let (t, rec) = table_with(Duration::from_secs(3600), 1_000_000, Duration::ZERO);
        for i in 0..200_000u64 {
            let id = i.to_string();
            t.apply(ev("s", &id, START, SEC));
            if i >= 10 {
                t.apply(ev("s", &(i - 10).to_string(), OK, 2 * SEC));
            }
        }
        assert_eq!(rec.in_progress("s"), 10);
        let queued: usize = t.shards.iter().map(|s| s.lock().unwrap().queued()).sum();
        assert!(
            queued <= 2 * 10 + t.shards.len() * (COMPACT_SLACK + 1),
            "{queued} queue items for 10 entries"
        );
    }

    #[test]
    fn a_sharded_table_stays_within_its_capacity() {
        const CAPACITY: u64 = 100_000;
        let (t, rec) = table_with(Duration::from_secs(60), CAPACITY, Duration::ZERO);
        assert!(t.shards.len() > 1);
        for i in 0..150_000 {
            t.apply(ev("c", &i.to_string(), START, SEC));
        }
        let held = t.len();
        assert!(
            held <= CAPACITY + t.shards.len() as u64,
            "{held} entries, capacity {CAPACITY}"
        );
        assert_eq!(rec.get("c", "dropped") as u64, 150_000 - held);
        assert_eq!(rec.in_progress("c") as u64, held);
    }

    #[test]
    fn retried_events_are_duplicates_even_after_the_instance_closed() {
        let (t, rec) = table(Duration::from_secs(60));
        let batch = [ev("o", "1", START, 10 * SEC), ev("o", "1", OK, 11 * SEC)];
        for e in batch.clone() {
            t.apply(e);
        }
        for e in batch {
            t.apply(e);
        }
        assert_eq!(rec.get("o", "started"), 1);
        assert_eq!(rec.get("o", "success"), 1);
        assert_eq!(rec.get("*", "dup_start"), 1);
        assert_eq!(rec.get("*", "dup_end"), 1);
        // A new instance reusing the id (new timestamps) counts.
        t.apply(ev("o", "1", START, 20 * SEC));
        t.apply(ev("o", "1", OK, 21 * SEC));
        assert_eq!(rec.get("o", "started"), 2);
        assert_eq!(rec.get("o", "success"), 2);
    }

    #[test]
    fn concurrent_load_on_a_small_table_keeps_the_invariant() {
        // Starts race far ahead of ends through a table a third of the size needed:
        // many instances are dropped, but every one is accounted for exactly once.
        const N: usize = 3000;
        let (t, rec) = table_with(Duration::from_secs(60), 1000, Duration::from_secs(300));
        let threads: Vec<_> = (0..2)
            .map(|n| {
                let t = t.clone();
                std::thread::spawn(move || {
                    for i in 0..N {
                        let kind = if n == 0 { START } else { OK };
                        t.apply(ev("c", &i.to_string(), kind, (10 + n) * SEC));
                    }
                })
            })
            .collect();
        for th in threads {
            th.join().unwrap();
        }
        t.run_pending_tasks();
        assert_eq!(rec.get("c", "started"), N as i64);
        assert_eq!(
            rec.get("c", "success") + rec.get("c", "dropped") + rec.in_progress("c"),
            N as i64
        );
        assert!(rec.in_progress("c") <= 1000);
        // Ends either completed an instance, were unmatched, or still wait.
        assert!(rec.get("c", "success") + rec.get("c", "unmatched") <= N as i64);
    }

    #[test]
    fn concurrent_starts_and_ends_count_each_instance_once() {
        // Threads 0 and 2 send every start, 1 and 3 every end, racing each other:
        // each instance must complete exactly once, whatever the interleaving.
        const N: usize = 3000;
        let (t, rec) = table_with(Duration::from_secs(60), 100_000, Duration::from_secs(300));
        let threads: Vec<_> = (0..4)
            .map(|n| {
                let t = t.clone();
                std::thread::spawn(move || {
                    for i in 0..N {
                        let id = i.to_string();
                        let kind = if n % 2 == 0 { START } else { OK };
                        let ts = if n % 2 == 0 { 10 * SEC } else { 11 * SEC };
                        t.apply(ev("c", &id, kind, ts));
                    }
                })
            })
            .collect();
        for th in threads {
            th.join().unwrap();
        }
        assert_eq!(rec.get("c", "started"), N as i64);
        assert_eq!(rec.get("c", "success"), N as i64);
        assert_eq!(rec.in_progress("c"), 0);
        assert_eq!(rec.get("*", "dup_start"), N as i64);
        assert_eq!(rec.get("*", "dup_end"), N as i64);
        assert!(rec.durations.lock().unwrap().iter().all(|d| *d == 1.0));
    }
}
