//! What the scripts answered, reported to the sink: the outcome of each event of an
//! apply call, the instances a sweep or an eviction took out, and the outcomes of calls
//! whose reply was lost, read back from the result key the script kept.

use std::sync::{Arc, PoisonError};
use std::time::Instant;

use super::ages::RedisAges;
use super::codec::{decode, open_start, parse_netstrings, Entry};
use super::steps::{self, StoredStep};
use super::{Call, RedisStore, MAX_PENDING};
use crate::flows::event::{DimValues, EventKind, FlowEvent};
use crate::flows::store::{
    duration_secs, EndRecord, FlowSink, Report, StepUnmatchedReason, StoreError,
};

impl RedisStore {
    /// A call failed or its reply was lost: its acks are sent again later, and its
    /// outcomes looked for.
    pub(super) fn failed(&self, call: Call) {
        self.shards[call.shard]
            .acks
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .extend(call.acks);
        self.remember_lost(call.result_key, call.events);
    }

    /// A call that ran, but whose reply a cluster pipeline dropped (another call in it
    /// was refused): its outcomes are read back from its result key at once, so that
    /// the export is taken. If they cannot be, the call is treated as failed.
    pub(super) fn read_back(&self, call: Call) -> Result<(), StoreError> {
        let error = match self.claim_kept(&call.result_key) {
            Ok(Some(blob)) if self.settle_kept(&call.events, &blob) => return Ok(()),
            Ok(Some(_)) => StoreError::Failed("a call's kept result could not be read".into()),
            Ok(None) => StoreError::Failed("a call's kept result was not found".into()),
            Err(e) => e,
        };
        self.failed(call);
        Err(error)
    }

    /// Reads and deletes a call's kept result (so it is reported once); `None` if there
    /// is none: not applied yet (the script may still be queued), or never.
    fn claim_kept(&self, result_key: &[u8]) -> Result<Option<Vec<u8>>, StoreError> {
        let mut invocation = self.claim.prepare_invoke();
        invocation.key(result_key);
        // `invoke` loads the script after NOSCRIPT (on a cluster: on every primary).
        self.call(
            "recover",
            |con| invocation.invoke::<Option<Vec<u8>>>(con.like()),
            |_| None,
        )
    }

    /// Reports the outcomes of a kept result; `false` if it could not be read.
    fn settle_kept(&self, events: &[FlowEvent], blob: &[u8]) -> bool {
        let Some(out) = parse_netstrings(blob) else {
            return false;
        };
        self.settle_all(events, &out);
        true
    }

    /// The script may have run although its reply never came: keep what is needed to
    /// read its outcomes back ([`RedisStore::recover`]).
    fn remember_lost(&self, result_key: Vec<u8>, events: Vec<FlowEvent<'static>>) {
        let mut pending = self.pending.lock().unwrap_or_else(PoisonError::into_inner);
        if pending.len() >= MAX_PENDING {
            pending.pop_front();
            self.warnings.lost.warn(format_args!(
                "correlation store (redis): too many exports without a reply; the \
                 outcomes of the oldest are not counted if they were applied"
            ));
        }
        pending.push_back(Pending {
            result_key,
            events,
            since: Instant::now(),
        });
    }

    /// Reads back the outcomes of batches whose reply was lost, and reports them: the
    /// store removes each result as it is read, so they are reported once.
    pub(super) fn recover(&self) {
        let lost: Vec<Pending> = self
            .pending
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .drain(..)
            .collect();
        let mut keep = Vec::new();
        let mut lost = lost.into_iter();
        for batch in lost.by_ref() {
            match self.claim_kept(&batch.result_key) {
                Ok(Some(blob)) => {
                    if !self.settle_kept(&batch.events, &blob) {
                        tracing::warn!("correlation store (redis): a result could not be read");
                    }
                }
                Ok(None) if batch.since.elapsed() < self.recover_for => keep.push(batch),
                Ok(None) => {}
                Err(_) => {
                    keep.push(batch);
                    break;
                }
            }
        }
        keep.extend(lost);
        if !keep.is_empty() {
            let mut pending = self.pending.lock().unwrap_or_else(PoisonError::into_inner);
            for batch in keep.into_iter().rev() {
                pending.push_front(batch);
            }
            pending.truncate(MAX_PENDING);
        }
    }

    pub(super) fn settle_all(&self, events: &[FlowEvent], out: &[Vec<u8>]) {
        for record in out.chunks_exact(4) {
            let index = std::str::from_utf8(&record[0])
                .ok()
                .and_then(|s| s.parse::<usize>().ok())
                .unwrap_or(0);
            let event = index.checked_sub(1).and_then(|i| events.get(i));
            self.settle(event, record[1].first().copied(), &record[2], &record[3]);
        }
    }

    /// Reports one outcome the script returned for `event` (none: an eviction), with the
    /// steps of the instance it concerns when the script handed them back.
    pub(super) fn settle(
        &self,
        event: Option<&FlowEvent>,
        code: Option<u8>,
        stored: &[u8],
        kept: &[u8],
    ) {
        if let Some(ages) = &self.ages {
            counts_of_open(ages, event, code, stored);
        }
        let sink = &*self.sink;
        let stored = || {
            let entry = decode(stored);
            if entry.is_none() {
                self.warnings.unreadable.warn(format_args!(
                    "correlation store (redis): an entry could not be read"
                ));
            }
            entry
        };
        match (code, event) {
            (Some(b'T'), _) => {
                if let Some(entry) = stored() {
                    entry.gone(sink, false, &steps::parse_steps(kept));
                }
            }
            (Some(b'E'), _) => {
                if let Some(entry) = stored() {
                    self.warnings.evicted.warn(format_args!(
                        "correlation store full (limits.max_in_flight): evicting the entries \
                         due soonest (flow {}); raise the limit or shorten flow timeouts",
                        entry.flow
                    ));
                    entry.gone(sink, true, &steps::parse_steps(kept));
                }
            }
            (Some(b'S'), Some(e)) => {
                sink.report(Report::Opened {
                    flow: &e.flow,
                    start_dims: &e.dims,
                });
                let kept = steps::parse_steps(kept);
                steps::report_reached(sink, &e.flow, &e.dims, e.timestamp_nanos, &kept);
            }
            (Some(b'R'), Some(e)) => {
                let (Some(entry), Some(step)) = (stored(), &e.step) else {
                    return;
                };
                sink.report(Report::StepReached {
                    flow: &entry.flow,
                    start_dims: &entry.dims,
                    step,
                    since_start_secs: duration_secs(entry.timestamp_nanos, e.timestamp_nanos),
                    trace: e.trace,
                });
            }
            (Some(b'A'), Some(e)) => sink.report(Report::StepUnmatched {
                flow: &e.flow,
                reason: StepUnmatchedReason::AfterClose,
            }),
            (Some(b'O'), Some(e)) => sink.report(Report::Opened {
                flow: &e.flow,
                start_dims: &e.dims,
            }),
            (Some(b'D'), Some(e)) => sink.report(Report::Duplicate { kind: e.kind }),
            (Some(b'P'), Some(e)) => {
                let Some(Entry { end: Some(end), .. }) = stored() else {
                    return;
                };
                sink.report(Report::Opened {
                    flow: &e.flow,
                    start_dims: &e.dims,
                });
                let kept = steps::parse_steps(kept);
                steps::report_reached(sink, &e.flow, &e.dims, e.timestamp_nanos, &kept);
                completed(sink, &e.flow, &e.dims, e.timestamp_nanos, &end, &kept);
            }
            (Some(b'C'), Some(e)) => {
                let (Some(entry), EventKind::End(outcome)) = (stored(), e.kind) else {
                    return;
                };
                let end = EndRecord {
                    outcome,
                    timestamp_nanos: e.timestamp_nanos,
                    dims: e.dims.clone(),
                    trace: e.trace,
                };
                let kept = steps::parse_steps(kept);
                completed(
                    sink,
                    &entry.flow,
                    &entry.dims,
                    entry.timestamp_nanos,
                    &end,
                    &kept,
                );
            }
            // `W`: the end waits; nothing to report yet.
            _ => {}
        }
    }
}

/// What an outcome changes in the overdue counts (ages.rs): an instance opened (by this
/// event, with its start) or an open one left (its stored value has its start); a
/// duplicate start that moved an instance's start earlier hands back the value it had.
fn counts_of_open(ages: &RedisAges, event: Option<&FlowEvent>, code: Option<u8>, stored: &[u8]) {
    match (code, event) {
        (Some(b'O' | b'S'), Some(e)) => ages.opened(&e.flow, e.timestamp_nanos),
        (Some(b'C' | b'T' | b'E'), _) => {
            if let Some((flow, start_nanos)) = open_start(stored) {
                ages.closed(flow, start_nanos);
            }
        }
        (Some(b'D'), Some(e)) => {
            if let Some((flow, start_nanos)) = open_start(stored) {
                ages.closed(flow, start_nanos);
                ages.opened(&e.flow, e.timestamp_nanos);
            }
        }
        _ => {}
    }
}

/// A batch sent whose reply did not come.
pub(super) struct Pending {
    result_key: Vec<u8>,
    events: Vec<FlowEvent<'static>>,
    since: Instant,
}

impl Entry {
    /// The entry left the store by time-out or eviction, with `steps` its steps.
    fn gone(&self, sink: &dyn FlowSink, evicted: bool, kept: &[StoredStep]) {
        if !self.opened {
            if self.end.is_some() {
                sink.report(Report::Unmatched {
                    flow: &self.flow,
                    evicted,
                });
            }
            steps::report_no_start(sink, &self.flow, kept);
        } else if evicted {
            sink.report(Report::Dropped {
                flow: &self.flow,
                start_dims: &self.dims,
            });
        } else {
            sink.report(Report::TimedOut {
                flow: &self.flow,
                start_dims: &self.dims,
                transits: &steps::transits(self.timestamp_nanos, kept),
                last_step: kept.last().map(|s| &s.name),
            });
        }
    }
}

/// An instance completed: its start's flow, dims and timestamp, its end, its steps.
fn completed(
    sink: &dyn FlowSink,
    flow: &Arc<str>,
    start_dims: &DimValues,
    started_nanos: u64,
    end: &EndRecord,
    kept: &[StoredStep],
) {
    sink.report(Report::Completed {
        flow,
        start_dims,
        end,
        duration_secs: duration_secs(started_nanos, end.timestamp_nanos),
        transits: &steps::transits(started_nanos, kept),
    });
}
