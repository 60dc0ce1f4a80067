//! The correlation store: pairs starts with ends, times out open instances, evicts the
//! oldest entries when full, and reports every outcome to a [`FlowSink`].
//!
//! The rules (docs/behaviour.md §3) are the same for every backend; [`memory::MemoryStore`] keeps the
//! instances in a moka cache inside the process. A backend shared by several replicas
//! implements [`CorrelationStore`] beside it, and nothing in ingest or metrics changes.

pub mod memory;
pub mod open_ages;
pub mod redis;
pub mod snapshot;

use std::sync::Arc;
use std::time::Duration;

use super::event::{DimValues, EventKind, FlowEvent, Outcome, TraceRef};

#[cfg(feature = "test-hooks")]
pub use memory::CacheBaseline;
pub use memory::{Maintenance, MemoryStore};
pub use open_ages::{OpenAges, OverdueSettings};
pub use redis::{RedisSettings, RedisStore, StoreProbe};
pub use snapshot::{unix_nanos_now, StoreSnapshot};

/// What a store tells its sink. `flow` is the flow name; `start_dims` the dimension
/// values captured from the start event.
#[derive(Debug)]
pub enum Report<'a> {
    /// A new instance opened.
    Opened {
        /// The flow's name.
        flow: &'a Arc<str>,
        /// The dimension values captured from the start event.
        start_dims: &'a DimValues,
    },
    /// An instance closed by its end event.
    Completed {
        /// The flow's name.
        flow: &'a Arc<str>,
        /// The dimension values captured from the start event.
        start_dims: &'a DimValues,
        /// The end event that closed it.
        end: &'a EndRecord,
        /// end − start in seconds; negative from clock skew.
        duration_secs: f64,
        /// The steps it reached, by event timestamp (empty for a flow without steps).
        transits: &'a [StepTransit],
    },
    /// The instance's deadline passed with no end.
    TimedOut {
        /// The flow's name.
        flow: &'a Arc<str>,
        /// The dimension values captured from the start event.
        start_dims: &'a DimValues,
        /// The steps it reached, by event timestamp (empty for a flow without steps).
        transits: &'a [StepTransit],
        /// The latest step it reached by event timestamp; `None`: none (`start`).
        last_step: Option<&'a Arc<str>>,
    },
    /// A step of an instance whose start is known (on the step's arrival, or on the
    /// start's when the step came first). Once per (instance, step).
    StepReached {
        /// The flow's name.
        flow: &'a Arc<str>,
        /// The dimension values captured from the start event.
        start_dims: &'a DimValues,
        /// The step reached.
        step: &'a Arc<str>,
        /// step − start in seconds, by event timestamps; negative from clock skew.
        since_start_secs: f64,
        /// The step event's trace, for the exemplar.
        trace: Option<TraceRef>,
    },
    /// A step that never met its instance: counted here and nowhere else.
    StepUnmatched {
        /// The flow's name.
        flow: &'a Arc<str>,
        /// Why it was not counted with an instance.
        reason: StepUnmatchedReason,
    },
    /// The instance was evicted because the store was full.
    Dropped {
        /// The flow's name.
        flow: &'a Arc<str>,
        /// The dimension values captured from the start event.
        start_dims: &'a DimValues,
    },
    /// An open instance read back from the state file at start (counted instead of
    /// `Opened`: it was opened by the run before).
    Restored {
        /// The flow's name.
        flow: &'a Arc<str>,
        /// The dimension values captured from the start event.
        start_dims: &'a DimValues,
    },
    /// A restored instance of a flow the new configuration no longer tracks
    /// (`flows.allow_unknown: false` and not in `flows.per_flow`): counted restored and
    /// dropped at once, so the invariant holds.
    Discarded {
        /// The flow's name.
        flow: &'a Arc<str>,
        /// The dimension values captured from the start event.
        start_dims: &'a DimValues,
    },
    /// An end waited for its start, which never came (or it was evicted while waiting).
    Unmatched {
        /// The flow's name.
        flow: &'a Arc<str>,
        /// `true`: evicted from a full store while waiting, rather than timed out.
        evicted: bool,
    },
    /// An event ignored as a duplicate (a second start, a second end, or a retry).
    Duplicate {
        /// The kind of the ignored event.
        kind: EventKind,
    },
    /// The open instances of a flow with an overdue threshold (docs/behaviour.md §10),
    /// counted about once a second: how many are older than the threshold, and the age
    /// of the oldest (0 when none is open).
    Overdue {
        /// The flow's name.
        flow: &'a Arc<str>,
        /// Open instances older than the flow's overdue threshold.
        overdue: u64,
        /// Age of the oldest open instance in seconds (0 when none is open).
        oldest_open_secs: f64,
    },
}

/// One step of a closing instance: its time since the step before it by event
/// timestamp (the first step's since the start). Negative only from clock skew.
#[derive(Debug, Clone, PartialEq)]
pub struct StepTransit {
    /// The step reached.
    pub step: Arc<str>,
    /// Seconds since the step before it (the first step's since the start).
    pub transit_secs: f64,
}

impl StepTransit {
    /// The transits of steps given in the order reached (by event timestamp), each
    /// (step, timestamp): both stores close an instance's journey with this.
    pub(crate) fn in_order<'a>(
        start_nanos: u64,
        steps: impl IntoIterator<Item = (&'a Arc<str>, u64)>,
    ) -> Vec<StepTransit> {
        let mut previous = start_nanos;
        steps
            .into_iter()
            .map(|(step, timestamp_nanos)| {
                let transit_secs = duration_secs(previous, timestamp_nanos);
                previous = timestamp_nanos;
                StepTransit {
                    step: step.clone(),
                    transit_secs,
                }
            })
            .collect()
    }
}

/// Why a step event was not counted with an instance (`reason` label).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum StepUnmatchedReason {
    /// Its instance had already closed (ended or timed out).
    AfterClose,
    /// Its start never came within the flow's timeout (or it was evicted from a full
    /// store while waiting).
    NoStart,
}

impl StepUnmatchedReason {
    /// The `reason` label value.
    pub fn label(self) -> &'static str {
        match self {
            StepUnmatchedReason::AfterClose => "after_close",
            StepUnmatchedReason::NoStart => "no_start",
        }
    }

    /// Every `reason` label value, in declaration order.
    pub const LABELS: [&'static str; 2] = ["after_close", "no_start"];
}

/// Receives what the store decides. Implemented by the metrics registry, and by a
/// recording sink in tests. It may be called from any thread, also from inside the
/// store's own bookkeeping: it must not call back into the store.
pub trait FlowSink: Send + Sync + 'static {
    /// Handles one decision of the store; must not call back into the store.
    fn report(&self, report: Report<'_>);
}

/// An end event, kept while it waits for its start and handed to the sink on completion.
#[derive(Debug, Clone)]
pub struct EndRecord {
    /// The outcome the end reported.
    pub outcome: Outcome,
    /// Unix nanoseconds of the end event.
    pub timestamp_nanos: u64,
    /// Values of the end dimensions, in config order.
    pub dims: DimValues,
    /// The end event's trace, for the exemplar.
    pub trace: Option<TraceRef>,
}

/// What every backend needs to know, apart from the sink.
#[derive(Clone)]
pub struct StoreSettings {
    /// Open instances plus waiting ends, all flows together (`limits.max_in_flight`).
    pub capacity: u64,
    /// How long a handled event is remembered to recognise a retried export.
    pub dedup_window: Duration,
    /// Per-flow timeout lookup (`flows.default.timeout`, `flows.per_flow.*.timeout`).
    pub timeout_for: Arc<dyn Fn(&str) -> Duration + Send + Sync>,
    /// The longest timeout any flow can have: the store's time-to-live.
    pub longest_timeout: Duration,
    /// Flows with declared steps (`flows.per_flow.*.steps`): they use steps from their
    /// first event on (others from their first step event).
    pub step_flows: Vec<Arc<str>>,
}

/// A correlation store, in process or shared. Every method is cheap to call from a
/// request handler except [`CorrelationStore::run_pending_tasks`], which belongs on a
/// thread of its own ([`Maintenance`]).
pub trait CorrelationStore: Send + Sync + 'static {
    /// Applies one export's flow events, in order (docs/behaviour.md §3). A shared store that cannot
    /// be reached refuses: the exporter retries, and what did apply is recognised as a
    /// retry then.
    fn apply_batch(&self, events: &mut dyn Iterator<Item = FlowEvent>) -> Result<(), StoreError>;

    /// Whether [`CorrelationStore::apply_batch`] waits on the network (the caller keeps
    /// it off async worker threads).
    fn blocks(&self) -> bool {
        false
    }

    /// Whether the store can be used now (`/readyz`).
    fn available(&self) -> bool {
        true
    }

    /// Counts and removes what is due: time-outs, capacity evictions.
    fn run_pending_tasks(&self);

    /// Called once at shutdown, after the last event and the last housekeeping: writes
    /// out what the store still holds only in this process (the shared store's changes
    /// to the overdue counts).
    fn shutdown(&self) {}

    /// Entries held now: open instances plus ends waiting for their start.
    fn entries(&self) -> u64;

    /// The most entries it holds (`limits.max_in_flight`).
    fn capacity(&self) -> u64;

    /// What a state file must keep to carry on after a restart; `None`: this backend
    /// keeps its state elsewhere and there is nothing to save. Must not stall ingest.
    fn snapshot(&self) -> Option<StoreSnapshot> {
        None
    }

    /// The snapshot written at shutdown, when nothing is applied any more: like
    /// [`CorrelationStore::snapshot`], and every entry already past its deadline but
    /// not in the snapshot is counted now (this run), so each is counted by exactly one
    /// of the two runs. Blocks until that is settled (about a second at most).
    fn final_snapshot(&self) -> Option<StoreSnapshot> {
        self.run_pending_tasks();
        self.snapshot()
    }
}

/// How a snapshot written under another configuration is read back.
#[derive(Clone, Default)]
pub struct RestoreRules {
    /// `Some`: only these flows are tracked now (`flows.allow_unknown: false`).
    pub known_flows: Option<Arc<std::collections::HashSet<String>>>,
    /// (label, default value) of each start dimension now, in order.
    pub start_dims: Vec<(String, Arc<str>)>,
    /// The same for end dimensions.
    pub end_dims: Vec<(String, Arc<str>)>,
}

/// What a restore did, for the start-up log.
#[derive(Debug, Default, Clone, Copy, PartialEq, Eq)]
pub struct RestoreSummary {
    /// Open instances back in the store.
    pub open: u64,
    /// Ends back in the store, waiting for their start.
    pub waiting: u64,
    /// Open instances whose deadline passed while the service was down (incomplete).
    pub expired: u64,
    /// Waiting ends whose deadline passed (unmatched).
    pub expired_ends: u64,
    /// Entries of flows no longer tracked.
    pub discarded: u64,
}

/// Why a shared store refused a batch. The transports answer every one 503 /
/// UNAVAILABLE (the exporter retries) and log it as what it is.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum StoreError {
    /// No connection: refused, reset, or not yet made.
    #[error("the correlation store cannot be reached: {0}")]
    Unreachable(String),
    /// No answer within `correlation.redis.command_timeout`.
    #[error("the correlation store did not answer in time: {0}")]
    Timeout(String),
    /// The store answers but takes no writes: out of memory (`maxmemory` with the
    /// `noeviction` policy), a read-only replica, a failed persistence.
    #[error("the correlation store refuses writes: {0}")]
    WritesRefused(String),
    /// Any other error the store answered.
    #[error("the correlation store failed: {0}")]
    Failed(String),
}

/// end − start in seconds, exact for any two u64 timestamps.
pub(crate) fn duration_secs(start_nanos: u64, end_nanos: u64) -> f64 {
    (i128::from(end_nanos) - i128::from(start_nanos)) as f64 / 1e9
}

impl Outcome {
    /// The outcomes by [`Outcome::code`].
    const BY_CODE: [Outcome; 3] = [Outcome::Success, Outcome::Failure, Outcome::Cancelled];

    /// The one byte an outcome is stored as, wherever a store keeps an end (the state
    /// file's `SavedEnd::outcome`): 0 success, 1 failure, 2 cancelled.
    pub const fn code(self) -> u8 {
        match self {
            Outcome::Success => 0,
            Outcome::Failure => 1,
            Outcome::Cancelled => 2,
        }
    }

    /// What [`Outcome::code`] wrote; `None` for any other byte.
    pub fn from_code(code: u8) -> Option<Outcome> {
        Self::BY_CODE.get(usize::from(code)).copied()
    }
}
