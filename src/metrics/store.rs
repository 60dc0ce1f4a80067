//! The correlation store's families (docs/behaviour.md §4, §7): its occupancy, failed
//! writes of the state file (memory store with `state.path`), and the errors and
//! latency of calls to a shared store (`correlation.store: redis`).

use prometheus_client::encoding::{EncodeLabelSet, EncodeLabelValue, LabelValueEncoder};
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::metrics::histogram::Histogram;
use prometheus_client::registry::{Registry, Unit};

use super::MetricsSettings;
use crate::flows::store::StoreProbe;

/// A call to the shared store, as `op`: `apply` (an export's events), `sweep`
/// (time-outs), `recover` (replies kept across a lost connection). The values are the
/// variants' names as written (prometheus-client's derive).
#[allow(non_camel_case_types)]
#[derive(Clone, Copy, Debug, Hash, PartialEq, Eq, EncodeLabelValue)]
enum StoreOp {
    apply,
    sweep,
    recover,
}

impl StoreOp {
    const ALL: [StoreOp; 3] = [StoreOp::apply, StoreOp::sweep, StoreOp::recover];

    /// The store names its calls as strings ([`StoreProbe`]).
    fn from_name(name: &str) -> Option<Self> {
        match name {
            "apply" => Some(StoreOp::apply),
            "sweep" => Some(StoreOp::sweep),
            "recover" => Some(StoreOp::recover),
            _ => None,
        }
    }
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct OpLabel {
    op: StoreOp,
}

/// A write of the state file, as `write`.
#[derive(Clone, Copy, Debug, Hash, PartialEq, Eq)]
enum StateWrite {
    /// The periodic one: the previous file stays when it fails.
    Checkpoint,
    /// The one at shutdown.
    Final,
}

/// By hand: `final` is a Rust keyword, so no variant can be named as the value.
impl EncodeLabelValue for StateWrite {
    fn encode(&self, encoder: &mut LabelValueEncoder) -> Result<(), std::fmt::Error> {
        let value = match self {
            StateWrite::Checkpoint => "checkpoint",
            StateWrite::Final => "final",
        };
        EncodeLabelValue::encode(&value, encoder)
    }
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct WriteLabel {
    write: StateWrite,
}

/// Round trips to a shared store: 0.25 ms to 2.5 s.
fn latency_histogram() -> Histogram {
    Histogram::new([
        0.00025, 0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5,
    ])
}

/// `flowmetrics_in_flight_entries` (set at each scrape) and
/// `flowmetrics_in_flight_capacity`; returns the entries gauge.
pub(super) fn register_occupancy(registry: &mut Registry, capacity: u64) -> Gauge {
    let entries = Gauge::default();
    registry.register(
        "flowmetrics_in_flight_entries",
        "Entries in the correlation store now: open instances plus ends waiting for \
         their start",
        entries.clone(),
    );
    let in_flight_capacity = Gauge::<i64>::default();
    in_flight_capacity.set(i64::try_from(capacity).unwrap_or(i64::MAX));
    registry.register(
        "flowmetrics_in_flight_capacity",
        "Entries the correlation store holds at most (limits.max_in_flight); the \
         oldest are evicted beyond it",
        in_flight_capacity,
    );
    entries
}

pub(super) struct StoreMetrics {
    /// `flowmetrics_state_write_errors_total` by write: checkpoint, final.
    state_write_errors: [Counter; 2],
    errors: Family<OpLabel, Counter>,
    latency: Family<OpLabel, Histogram, fn() -> Histogram>,
}

impl StoreMetrics {
    /// Registers the state file's family with `state.path` (memory store), the shared
    /// store's with `correlation.store: redis`; unregistered ones count unseen.
    pub(super) fn register(registry: &mut Registry, settings: &MetricsSettings) -> Self {
        let state_errors = Family::<WriteLabel, Counter>::default();
        if settings.state_file {
            registry.register(
                "flowmetrics_state_write_errors",
                "Writes of the state file that failed, by write: checkpoint (the previous \
                 file stays) or final (at shutdown: the previous file is set aside, its open \
                 flows are lost)",
                state_errors.clone(),
            );
        }
        let state_write_errors = [StateWrite::Checkpoint, StateWrite::Final]
            .map(|write| state_errors.get_or_create(&WriteLabel { write }).clone());
        let errors = Family::<OpLabel, Counter>::default();
        let latency: Family<OpLabel, Histogram, fn() -> Histogram> =
            Family::new_with_constructor(latency_histogram);
        if settings.shared_store {
            registry.register(
                "flowmetrics_store_errors",
                "Calls to the shared correlation store that failed (unreachable, timed \
                 out), by operation: apply (an export's events) or sweep (time-outs)",
                errors.clone(),
            );
            registry.register_with_unit(
                "flowmetrics_store_latency",
                "Round trip of calls to the shared correlation store, by operation",
                Unit::Seconds,
                latency.clone(),
            );
            for op in StoreOp::ALL {
                let _ = errors.get_or_create(&OpLabel { op });
            }
        }
        Self {
            state_write_errors,
            errors,
            latency,
        }
    }

    pub(super) fn state_write_failed(&self, final_write: bool) {
        self.state_write_errors[usize::from(final_write)].inc();
    }
}

impl StoreProbe for super::Metrics {
    fn store_call(&self, op: &'static str, seconds: f64, ok: bool) {
        let Some(op) = StoreOp::from_name(op) else {
            debug_assert!(false, "a store call without a StoreOp: {op}");
            return;
        };
        let store = &self.store;
        store
            .latency
            .get_or_create(&OpLabel { op })
            .observe(seconds);
        if !ok {
            store.errors.get_or_create(&OpLabel { op }).inc();
        }
    }
}
