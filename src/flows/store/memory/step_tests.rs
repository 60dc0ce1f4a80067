//! Every ordering of steps against starts, ends, time-outs, retries and restarts.

use std::collections::BTreeMap;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use super::*;
use crate::flows::event::{Outcome, Source};
use crate::flows::store::RestoreRules;
use crate::flows::store::StepUnmatchedReason;

const SEC: u64 = 1_000_000_000;

/// What the store reports, as text: `reached step@since`, `transit step@secs`,
/// `stalled step`, and counts per kind.
#[derive(Default)]
struct Log {
    counts: Mutex<BTreeMap<String, i64>>,
    lines: Mutex<Vec<String>>,
}

impl Log {
    fn add(&self, what: impl Into<String>) {
        *self.counts.lock().unwrap().entry(what.into()).or_default() += 1;
    }
    fn get(&self, what: &str) -> i64 {
        *self.counts.lock().unwrap().get(what).unwrap_or(&0)
    }
    fn line(&self, line: String) {
        self.lines.lock().unwrap().push(line);
    }
    fn lines(&self) -> Vec<String> {
        std::mem::take(&mut *self.lines.lock().unwrap())
    }
}

impl FlowSink for Log {
    fn report(&self, report: Report<'_>) {
        match report {
            Report::Opened { .. } => self.add("started"),
            Report::Restored { .. } => self.add("restored"),
            Report::Discarded { .. } => self.add("discarded"),
            Report::Completed { end, transits, .. } => {
                self.add(end.outcome.as_str());
                for t in transits {
                    self.line(format!("transit {}@{}", t.step, t.transit_secs));
                }
            }
            Report::TimedOut {
                transits,
                last_step,
                ..
            } => {
                self.add("incomplete");
                for t in transits {
                    self.line(format!("transit {}@{}", t.step, t.transit_secs));
                }
                let last = last_step.map_or("start", |s| &**s);
                self.add(format!("stalled {last}"));
                self.line(format!("stalled {last}"));
            }
            Report::Dropped { .. } => self.add("dropped"),
            Report::Unmatched { .. } => self.add("unmatched_end"),
            Report::Duplicate { kind } => self.add(format!("dup_{}", kind.label())),
            Report::StepReached {
                step,
                since_start_secs,
                ..
            } => {
                self.add("reached");
                self.line(format!("reached {step}@{since_start_secs}"));
            }
            Report::StepUnmatched { reason, .. } => self.add(reason.label()),
            Report::Overdue { .. } => {}
        }
    }
}

fn store_with(timeout: Duration, declared: &[&str]) -> (Arc<MemoryStore>, Arc<Log>) {
    numbered_store(timeout, declared, Numbering::default())
}

fn numbered_store(
    timeout: Duration,
    declared: &[&str],
    numbering: Numbering,
) -> (Arc<MemoryStore>, Arc<Log>) {
    let log = Arc::new(Log::default());
    let store = MemoryStore::with_numbering(
        StoreSettings {
            capacity: 10_000,
            dedup_window: Duration::from_secs(300),
            timeout_for: Arc::new(move |_| timeout),
            longest_timeout: timeout,
            step_flows: declared.iter().map(|f| Arc::from(*f)).collect(),
        },
        log.clone(),
        numbering,
    );
    (Arc::new(store), log)
}

fn store() -> (Arc<MemoryStore>, Arc<Log>) {
    store_with(Duration::from_secs(60), &[])
}

fn event(id: &str, kind: EventKind, secs: u64, step: Option<&str>) -> FlowEvent<'static> {
    FlowEvent {
        flow: Arc::from("order"),
        correlation_id: id.to_owned().into(),
        kind,
        timestamp_nanos: secs * SEC,
        dims: Arc::from([]),
        trace: None,
        source: Source::SpanEvent,
        step: step.map(Arc::from),
    }
}

fn start(id: &str, secs: u64) -> FlowEvent<'static> {
    event(id, EventKind::Start, secs, None)
}
fn end(id: &str, secs: u64) -> FlowEvent<'static> {
    event(id, EventKind::End(Outcome::Success), secs, None)
}
fn step(id: &str, name: &str, secs: u64) -> FlowEvent<'static> {
    event(id, EventKind::Step, secs, Some(name))
}

/// Applies events in order, written `start <id> @<secs>`, `step <id> <name> @<secs>`,
/// `end <id> @<secs>` (a success), separated by commas.
fn apply_all(t: &MemoryStore, script: &str) {
    for event in script.split(", ") {
        let words: Vec<&str> = event.split(' ').collect();
        let secs = |w: &str| w.trim_start_matches('@').parse::<u64>().unwrap();
        t.apply(match words[..] {
            ["start", id, at] => start(id, secs(at)),
            ["end", id, at] => end(id, secs(at)),
            ["step", id, name, at] => step(id, name, secs(at)),
            _ => panic!("not an event: {event}"),
        });
    }
}

/// Entries now (moka counts after its housekeeping).
fn entries(t: &MemoryStore) -> u64 {
    t.run_pending_tasks();
    t.entries()
}

fn wait_for(t: &MemoryStore, until: impl Fn() -> bool) {
    let give_up = Instant::now() + Duration::from_secs(5);
    while !until() && Instant::now() < give_up {
        t.run_pending_tasks();
        std::thread::sleep(Duration::from_millis(20));
    }
}

#[test]
fn a_step_after_its_start_is_reached_and_its_transit_observed_at_the_end() {
    let (t, log) = store();
    let events = "start 1 @100, step 1 paid @102, step 1 packed @107, end 1 @110";
    apply_all(&t, events);
    assert_eq!(
        log.lines(),
        [
            "reached paid@2",
            "reached packed@7",
            "transit paid@2",
            "transit packed@5"
        ]
    );
    assert_eq!(log.get("success"), 1);
}

#[test]
fn steps_and_an_end_before_their_start_wait_and_count_when_it_comes() {
    let (t, log) = store();
    apply_all(&t, "step 1 packed @107, end 1 @110, step 1 paid @102");
    assert_eq!(log.get("reached"), 0);
    assert_eq!(entries(&t), 1, "one entry waits for the start");
    t.apply(start("1", 100));
    assert_eq!(
        log.lines(),
        [
            "reached packed@7",
            "reached paid@2",
            "transit paid@2",
            "transit packed@5"
        ]
    );
    assert_eq!((log.get("started"), log.get("success")), (1, 1));
    // A step before its start, with no end: the instance stays open with it.
    apply_all(&t, "step 2 paid @203, start 2 @200, end 2 @210");
    assert_eq!(log.lines(), ["reached paid@3", "transit paid@3"]);
    assert_eq!(entries(&t), 0);
}

#[test]
fn a_step_after_the_end_is_after_close_and_nowhere_else() {
    let (t, log) = store();
    let events = "start 1 @100, step 1 paid @101, end 1 @110, step 1 packed @111";
    apply_all(&t, events);
    assert_eq!(log.get("after_close"), 1);
    assert_eq!(log.get("reached"), 1);
    assert_eq!(entries(&t), 0, "nothing waits");
    // Another instance of the same flow (it uses steps now): closed without a step.
    apply_all(&t, "start 2 @100, end 2 @110, step 2 paid @111");
    assert_eq!(log.get("after_close"), 2);
}

#[test]
fn a_declared_flow_knows_closes_from_its_first_instance() {
    let (t, log) = store_with(Duration::from_secs(60), &["order"]);
    apply_all(&t, "start 1 @100, end 1 @110, step 1 paid @105");
    assert_eq!(log.get("after_close"), 1);
    // An undeclared flow learns it uses steps from its first step event.
    let (t, log) = store();
    apply_all(&t, "start 1 @100, end 1 @110, step 1 paid @105");
    assert_eq!(
        log.get("after_close"),
        0,
        "not known to use steps yet: waits"
    );
    assert_eq!(entries(&t), 1);
}

#[test]
fn a_step_after_the_time_out_is_after_close() {
    let (t, log) = store_with(Duration::from_millis(200), &[]);
    t.apply(start("1", 100));
    t.apply(step("1", "paid", 101));
    wait_for(&t, || log.get("incomplete") == 1);
    assert_eq!(log.get("stalled paid"), 1);
    t.apply(step("1", "packed", 102));
    assert_eq!(log.get("after_close"), 1);
    assert_eq!(log.get("no_start"), 0);
}

#[test]
fn a_step_whose_start_never_comes_is_no_start() {
    let (t, log) = store_with(Duration::from_millis(200), &[]);
    let events = "step 1 paid @101, step 1 packed @102, step 2 paid @101, end 2 @105";
    apply_all(&t, events);
    wait_for(&t, || log.get("no_start") == 3);
    assert_eq!(log.get("no_start"), 3);
    assert_eq!(log.get("unmatched_end"), 1);
    assert_eq!((log.get("reached"), log.get("incomplete")), (0, 0));
}

#[test]
fn a_second_event_of_a_step_is_a_duplicate_and_the_earliest_wins() {
    let (t, log) = store();
    let events = "start 1 @100, step 1 paid @105, step 1 paid @103, end 1 @110";
    apply_all(&t, events);
    assert_eq!(log.get("dup_step"), 1);
    assert_eq!(log.lines(), ["reached paid@5", "transit paid@3"]);
    // While waiting for the start too.
    apply_all(&t, "step 2 paid @205, step 2 paid @202, start 2 @200");
    assert_eq!(log.get("dup_step"), 2);
    assert_eq!(log.lines(), ["reached paid@2"]);
}

#[test]
fn a_retried_step_is_a_duplicate_also_after_its_instance_closed() {
    let (t, log) = store();
    let batch = [start("1", 100), step("1", "paid", 101), end("1", 110)];
    for e in batch.clone() {
        t.apply(e);
    }
    for e in batch {
        t.apply(e);
    }
    assert_eq!(log.get("dup_step"), 1);
    assert_eq!((log.get("dup_start"), log.get("dup_end")), (1, 1));
    assert_eq!(log.get("after_close"), 0, "a retry is not a late step");
    assert_eq!(log.get("reached"), 1);
    // Same time, another step: not a retry.
    t.apply(step("1", "packed", 101));
    assert_eq!(log.get("after_close"), 1);
}

#[test]
fn last_step_is_the_latest_by_timestamp_not_by_arrival() {
    let (t, log) = store_with(Duration::from_millis(200), &[]);
    let events = "start 1 @100, step 1 shipped @109, step 1 paid @102, step 1 packed @105";
    apply_all(&t, events);
    wait_for(&t, || log.get("incomplete") == 1);
    let lines = log.lines();
    assert_eq!(
        lines[3..],
        [
            "transit paid@2",
            "transit packed@3",
            "transit shipped@4",
            "stalled shipped"
        ]
    );
}

#[test]
fn steps_past_the_numbering_limits_are_kept_by_name_with_the_same_counts() {
    use super::step_words::NumberingLimits;
    let limits = NumberingLimits {
        flows: 1,
        steps_per_flow: 2,
        steps: 2,
        dim_lists: 1,
    };
    let (t, log) = numbered_store(
        Duration::from_millis(200),
        &[],
        Numbering::with_limits(limits),
    );
    apply_all(&t, "start 1 @100, step 1 shipped @109, step 1 paid @102");
    let slot = t.cache.get(&t.key("order", "1")).unwrap();
    assert!(matches!(slot.state, SlotState::More(More::Steps(_))));
    // A third name has no number: the instance goes on by name.
    t.apply(step("1", "packed", 105));
    t.apply(step("1", "packed", 104));
    let slot = t.cache.get(&t.key("order", "1")).unwrap();
    assert!(matches!(slot.state, SlotState::More(More::Shared(_))));
    apply_all(&t, "start 2 @100, step 2 paid @101, end 2 @103");
    wait_for(&t, || log.get("incomplete") == 1);
    assert_eq!(log.get("dup_step"), 1);
    assert_eq!(log.get("reached"), 4);
    let lines = log.lines();
    assert_eq!(
        lines[4..],
        [
            "transit paid@1",
            "transit paid@2",
            "transit packed@2",
            "transit shipped@5",
            "stalled shipped"
        ]
    );
}

#[test]
fn stalled_instances_sum_to_the_incomplete_ones() {
    let (t, log) = store_with(Duration::from_millis(200), &[]);
    let names = ["a", "b", "c"];
    for i in 0..60u64 {
        let id = i.to_string();
        t.apply(start(&id, 100));
        for (n, name) in names.iter().enumerate().take((i % 4) as usize) {
            t.apply(step(&id, name, 101 + n as u64));
        }
        if i % 5 == 0 {
            t.apply(end(&id, 120));
        }
    }
    wait_for(&t, || log.get("incomplete") == 48);
    let stalled: i64 = ["start", "a", "b", "c"]
        .iter()
        .map(|s| log.get(&format!("stalled {s}")))
        .sum();
    assert_eq!(stalled, log.get("incomplete"));
    assert_eq!(log.get("incomplete"), 48);
    assert_eq!(log.get("stalled start"), 12);
    assert_eq!(log.get("stalled c"), 12);
}

#[test]
fn a_pairs_only_slot_is_as_small_as_without_steps() {
    // flow (16) + deadline (8) + Open { start, dims } (24): the tag lives in the dims
    // pointer's niche, as it did before steps.
    assert_eq!(std::mem::size_of::<Slot>(), 48);
}

#[test]
fn a_pairs_only_instance_stays_a_plain_open_entry() {
    let (t, _) = store();
    t.apply(start("1", 100));
    let slot = t.cache.get(&t.key("order", "1")).unwrap();
    assert!(matches!(slot.state, SlotState::Open { .. }));
    assert!(!t.closed.any.load(std::sync::atomic::Ordering::Relaxed));
    t.apply(step("1", "paid", 101));
    let slot = t.cache.get(&t.key("order", "1")).unwrap();
    assert!(matches!(
        slot.state.view(&t.numbering, &slot.flow),
        View::Stepped(_)
    ));
    assert!(
        matches!(slot.state, SlotState::More(super::More::Steps(_))),
        "held by number"
    );
}

fn through_the_file(t: &MemoryStore, timeout: Duration) -> (Arc<MemoryStore>, Arc<Log>) {
    let mut bytes = Vec::new();
    crate::flows::state::encode(&t.snapshot_now(), &mut bytes).unwrap();
    let snap = crate::flows::state::decode(&bytes).unwrap();
    let (fresh, log) = store_with(timeout, &[]);
    let mut fresh = Arc::into_inner(fresh).unwrap();
    fresh.restore(snap, &RestoreRules::default());
    (Arc::new(fresh), log)
}

#[test]
fn recorded_and_waiting_steps_hold_across_a_restart() {
    let (t, log) = store();
    let events = "start 1 @100, step 1 paid @102, step 2 paid @203, step 3 paid @303, end 3 @310";
    apply_all(&t, events);
    assert_eq!(log.get("reached"), 1);
    let (t2, log) = through_the_file(&t, Duration::from_secs(60));
    assert_eq!(log.get("restored"), 1);
    // Retries of what the first run handled are duplicates.
    t2.apply(step("1", "paid", 102));
    assert_eq!(log.get("dup_step"), 1);
    t2.apply(step("1", "packed", 105));
    t2.apply(end("1", 110));
    t2.apply(start("2", 200));
    t2.apply(start("3", 300));
    assert_eq!(
        log.lines(),
        [
            "reached packed@5",
            "transit paid@2",
            "transit packed@3",
            "reached paid@3",
            "reached paid@3",
            "transit paid@3"
        ]
    );
    assert_eq!(entries(&t2), 1, "instance 2 is open with its step");
    let (t3, log) = through_the_file(&t2, Duration::from_millis(200));
    wait_for(&t3, || log.get("incomplete") == 1);
    assert_eq!(log.get("stalled paid"), 1);
}

#[test]
fn a_version_1_state_file_is_read_as_before() {
    let bytes = include_bytes!("../../testdata/state-v1.bin");
    assert_eq!(&bytes[8..12], &1u32.to_le_bytes(), "written as version 1");
    let snap = crate::flows::state::decode(bytes).unwrap();
    let (fresh, log) = store();
    let mut fresh = Arc::into_inner(fresh).unwrap();
    let summary = fresh.restore(
        snap,
        &RestoreRules {
            start_dims: vec![("service".into(), Arc::from("unknown"))],
            ..RestoreRules::default()
        },
    );
    assert_eq!((summary.open, summary.waiting), (1, 1));
    let t = Arc::new(fresh);
    // o-1 opened at 1000 s (service web); o-2's end (1005 s) waits for its start.
    t.apply(step("o-1", "paid", 1_002));
    t.apply(end("o-1", 1_010));
    t.apply(start("o-2", 1_001));
    assert_eq!(log.get("success"), 2);
    assert_eq!(log.lines(), ["reached paid@2", "transit paid@2"]);
    assert_eq!(entries(&t), 0);
    let _ = StepUnmatchedReason::NoStart;
}

#[test]
fn an_instance_written_again_by_a_step_times_out_at_its_deadline() {
    // The step at 200 ms writes the entry again, so the cache's time-to-live would count
    // from the step (500 ms) and moka's timer wheel from its first tick (1.07 s): the
    // instance's batch (exact_timeouts) expires by 350 ms (deadline 300 ms plus at most
    // one 50 ms window), and it is looked at 430 ms in.
    let (s, log) = store_with(Duration::from_millis(300), &["order"]);
    let made = std::time::Instant::now();
    s.apply(start("1", 10));
    std::thread::sleep(Duration::from_millis(200));
    s.apply(step("1", "paid", 11));
    std::thread::sleep(
        (made + Duration::from_millis(430)).saturating_duration_since(std::time::Instant::now()),
    );
    s.run_pending_tasks();
    assert_eq!(log.get("incomplete"), 1);
    assert_eq!(log.get("stalled paid"), 1, "{:?}", log.lines());
    std::thread::sleep(Duration::from_millis(150));
    s.run_pending_tasks();
    assert_eq!(log.get("incomplete"), 1, "counted once");
}
