//! The correlation table: pairs starts with ends, times out open instances, evicts the
//! oldest entries when full, and reports every outcome to a [`FlowSink`].
//!
//! Every entry carries a `settled` flag. Whoever flips it first — the end that closes
//! the instance, the start that meets a waiting end, or moka's eviction listener — is the
//! one that reports it, so each instance is counted exactly once even when moka hands an
//! expired-but-not-yet-evicted entry back and still fires its listener afterwards.

use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use moka::notification::RemovalCause;
use moka::ops::compute::Op;
use moka::policy::{EvictionPolicy, Expiry};
use moka::sync::Cache;

use super::dedup::{RecentEvents, Seen};
use super::event::{DimValues, EventKind, FlowEvent, Outcome, TraceRef};

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
/// recording sink in tests.
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

#[derive(Clone, PartialEq, Eq, Hash, Debug)]
struct InstanceKey {
    flow: Arc<str>,
    id: Box<str>,
}

enum State {
    Open {
        /// Earliest start timestamp seen (duplicates can only lower it).
        start_nanos: AtomicU64,
        dims: DimValues,
    },
    WaitingForStart(EndRecord),
}

struct Entry {
    settled: AtomicBool,
    deadline: Instant,
    state: State,
}

impl Entry {
    /// True for exactly one caller over the entry's life.
    fn settle(&self) -> bool {
        !self.settled.swap(true, Ordering::AcqRel)
    }
}

struct DeadlineExpiry;

impl Expiry<InstanceKey, Arc<Entry>> for DeadlineExpiry {
    fn expire_after_create(
        &self,
        _key: &InstanceKey,
        value: &Arc<Entry>,
        created_at: Instant,
    ) -> Option<Duration> {
        Some(value.deadline.saturating_duration_since(created_at))
    }
    // Reads and updates keep the original deadline (the trait's defaults).
}

/// Settings the table needs, apart from the sink.
#[derive(Clone)]
pub struct TableSettings {
    pub capacity: u64,
    pub dedup_window: Duration,
    /// Per-flow timeout lookup.
    pub timeout_for: Arc<dyn Fn(&str) -> Duration + Send + Sync>,
}

pub struct FlowTable {
    cache: Cache<InstanceKey, Arc<Entry>>,
    sink: Arc<dyn FlowSink>,
    recent: RecentEvents,
    timeout_for: Arc<dyn Fn(&str) -> Duration + Send + Sync>,
}

/// Capacity evictions are logged at most this often.
const EVICTION_WARN_EVERY: Duration = Duration::from_secs(10);

impl FlowTable {
    pub fn new(settings: TableSettings, sink: Arc<dyn FlowSink>) -> Self {
        let listener_sink = sink.clone();
        let last_warn = Mutex::new(None::<Instant>);
        let cache = Cache::builder()
            .max_capacity(settings.capacity)
            // Default TinyLFU would refuse new entries when full; we evict the oldest.
            .eviction_policy(EvictionPolicy::lru())
            .expire_after(DeadlineExpiry)
            .eviction_listener(
                move |key: Arc<InstanceKey>, entry: Arc<Entry>, cause: RemovalCause| {
                    // Entries we remove or replace on purpose are settled first; an
                    // unsettled one here left by expiry or by capacity.
                    if !entry.settle() {
                        return;
                    }
                    let evicted = cause == RemovalCause::Size;
                    if evicted {
                        warn_evicted(&last_warn, &key.flow);
                    }
                    report_gone(&*listener_sink, &key.flow, &entry, evicted);
                },
            )
            .build();
        // Remember every event of a full table for the window, at least.
        let dedup_capacity = usize::try_from(settings.capacity.saturating_mul(2))
            .unwrap_or(usize::MAX)
            .max(1024);
        Self {
            cache,
            sink,
            recent: RecentEvents::new(settings.dedup_window, dedup_capacity),
            timeout_for: settings.timeout_for,
        }
    }

    /// Applies one flow event (SPEC §3).
    pub fn apply(&self, event: FlowEvent) {
        let now = Instant::now();
        if self.recent.check_and_remember(&event, now) == Seen::Again {
            self.sink.report(Report::Duplicate { kind: event.kind });
            return;
        }
        let deadline = now + (self.timeout_for)(&event.flow);
        let key = InstanceKey {
            flow: event.flow,
            id: event.correlation_id,
        };
        let sink = &*self.sink;
        let flow = key.flow.clone();
        let FlowEvent {
            kind,
            timestamp_nanos,
            dims,
            trace,
            ..
        } = event;
        self.cache.entry(key).and_compute_with(|current| {
            let current = current.map(|e| e.into_value()).filter(|e| {
                if e.settled.load(Ordering::Acquire) {
                    // Already accounted for (evicted, listener ran): only a leftover.
                    return false;
                }
                if e.deadline <= now {
                    // Past its deadline but not yet evicted by moka: gone for us.
                    // Account for it here, so the listener will not.
                    if e.settle() {
                        report_gone(sink, &flow, e, false);
                    }
                    return false;
                }
                true
            });
            let new_entry = |state| {
                Arc::new(Entry {
                    settled: AtomicBool::new(false),
                    deadline,
                    state,
                })
            };
            match kind {
                EventKind::Start => {
                    if let Some(entry) = &current {
                        match &entry.state {
                            State::Open { start_nanos, .. } => {
                                start_nanos.fetch_min(timestamp_nanos, Ordering::AcqRel);
                                sink.report(Report::Duplicate { kind });
                                return Op::Nop;
                            }
                            // Settling can lose only to the listener evicting it this
                            // instant; then the start opens a fresh instance below.
                            State::WaitingForStart(end) if entry.settle() => {
                                sink.report(Report::Opened {
                                    flow: &flow,
                                    start_dims: &dims,
                                });
                                complete(sink, &flow, &dims, timestamp_nanos, end);
                                return Op::Remove;
                            }
                            State::WaitingForStart(_) => {}
                        }
                    }
                    sink.report(Report::Opened {
                        flow: &flow,
                        start_dims: &dims,
                    });
                    Op::Put(new_entry(State::Open {
                        start_nanos: AtomicU64::new(timestamp_nanos),
                        dims,
                    }))
                }
                EventKind::End(outcome) => {
                    let end = EndRecord {
                        outcome,
                        timestamp_nanos,
                        dims,
                        trace,
                    };
                    if let Some(entry) = &current {
                        match &entry.state {
                            State::WaitingForStart(_) => {
                                sink.report(Report::Duplicate { kind });
                                return Op::Nop;
                            }
                            State::Open {
                                start_nanos,
                                dims: start_dims,
                            } if entry.settle() => {
                                let start = start_nanos.load(Ordering::Acquire);
                                complete(sink, &flow, start_dims, start, &end);
                                return Op::Remove;
                            }
                            State::Open { .. } => {}
                        }
                    }
                    Op::Put(new_entry(State::WaitingForStart(end)))
                }
            }
        });
    }

    /// Runs moka's housekeeping: expirations and evictions fire only from here (or
    /// from writes). Call it on a short interval.
    pub fn run_pending_tasks(&self) {
        self.cache.run_pending_tasks();
    }

    /// Entries held now (open instances and waiting ends), as moka counts them.
    pub fn len(&self) -> u64 {
        self.cache.entry_count()
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// Fingerprints held for retry detection, and their bytes.
    pub fn dedup_footprint(&self) -> (usize, usize) {
        self.recent.footprint()
    }
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
fn report_gone(sink: &dyn FlowSink, flow: &Arc<str>, entry: &Entry, evicted: bool) {
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

fn warn_evicted(last: &Mutex<Option<Instant>>, flow: &str) {
    let mut last = last.lock().expect("warn lock");
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

/// Drives moka's maintenance on a dedicated thread until dropped. A thread (not a tokio
/// task) because a burst of expirations can take a while and must not stall request
/// handling.
pub struct Maintenance {
    stop: Arc<AtomicBool>,
    handle: Option<std::thread::JoinHandle<()>>,
}

impl Maintenance {
    pub fn start(table: Arc<FlowTable>, every: Duration) -> Self {
        let stop = Arc::new(AtomicBool::new(false));
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

    /// Waits (bounded) for moka's expiry to fire, driving maintenance as the service does.
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
        // No maintenance runs between the deadline and the end: moka still holds the
        // expired entry and will fire its listener later. The end must not complete it,
        // and the listener must not count it a second time.
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
        t.run_pending_tasks();
        t.apply(ev("late", "w", OK, SEC));
        for i in 0..50 {
            t.apply(ev("o", &format!("new-{i}"), START, SEC));
        }
        t.run_pending_tasks();
        assert!(t.len() <= 100, "{}", t.len());
        let dropped = rec.get("o", "dropped") + rec.get("late", "unmatched");
        assert_eq!(dropped, 51);
        // The newest instances are (nearly all) still there: their ends complete them.
        // moka's LRU order is approximate across its write buffer, hence the margin.
        for i in 0..50 {
            t.apply(ev("o", &format!("new-{i}"), OK, 2 * SEC));
        }
        assert!(rec.get("o", "success") >= 45, "{}", rec.get("o", "success"));
        assert_eq!(rec.get("o", "started"), 150);
        t.run_pending_tasks();
        // The invariant holds whatever was evicted.
        assert_eq!(
            rec.get("o", "success") + rec.get("o", "dropped") + rec.in_progress("o"),
            150
        );
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
