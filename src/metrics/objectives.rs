//! The objective and overdue families (docs/behaviour.md §10): each flow's objective as
//! two gauges, so that one set of recording and alerting rules serves every flow by
//! joining on them, and the overdue count and oldest open age the store reports.

use std::collections::{HashMap, HashSet};
use std::sync::atomic::AtomicU64;
use std::sync::{Arc, Mutex, PoisonError};

use prometheus_client::encoding::EncodeLabelSet;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::registry::{Registry, Unit};

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct FlowLabel {
    flow: String,
}
type FloatGauge = Gauge<f64, AtomicU64>;

/// One flow's objective: `target` of its counted instances are good (succeed, within
/// `within_secs` when set).
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct FlowObjective {
    /// The share of counted instances that must be good (strictly between 0 and 1).
    pub target: f64,
    /// Seconds within which a success must complete to be good; `None`: every success is.
    pub within_secs: Option<f64>,
}

/// Which flow is measured against which objective (from `flows.*.objective`).
#[derive(Debug, Clone, Default)]
pub struct ObjectiveSettings {
    /// Every flow not in `per_flow`.
    pub default: Option<FlowObjective>,
    /// Flows named in `flows.per_flow` that have an objective (their own or the
    /// default): their gauges exist from the start.
    pub per_flow: HashMap<String, FlowObjective>,
}

impl ObjectiveSettings {
    fn objective_for(&self, flow: &str) -> Option<FlowObjective> {
        self.per_flow.get(flow).copied().or(self.default)
    }
}

pub(super) struct ObjectiveMetrics {
    settings: ObjectiveSettings,
    target: Family<FlowLabel, FloatGauge>,
    seconds: Family<FlowLabel, FloatGauge>,
    overdue: Family<FlowLabel, Gauge>,
    oldest_open: Family<FlowLabel, FloatGauge>,
    /// Flows whose objective gauges exist, at most `max_flows` of them.
    shown: Mutex<HashSet<Arc<str>>>,
    max_flows: usize,
}

impl ObjectiveMetrics {
    pub(super) fn register(
        registry: &mut Registry,
        settings: ObjectiveSettings,
        max: usize,
    ) -> Self {
        let this = Self {
            settings,
            target: Family::default(),
            seconds: Family::default(),
            overdue: Family::default(),
            oldest_open: Family::default(),
            shown: Mutex::new(HashSet::new()),
            max_flows: max,
        };
        registry.register(
            "flowmetrics_flow_objective_target",
            "The flow's objective (flows.*.objective.target): the share of its counted \
             instances (success, failure, incomplete) that must be good",
            this.target.clone(),
        );
        registry.register_with_unit(
            "flowmetrics_flow_objective",
            "The flow's objective.within: a success is good when it took at most this \
             long (a bound of flowmetrics_flow_duration_seconds); absent: any success is good",
            Unit::Seconds,
            this.seconds.clone(),
        );
        registry.register(
            "flowmetrics_flows_overdue",
            "Open instances older (now - start timestamp) than the flow's overdue_after, \
             else its objective's within",
            this.overdue.clone(),
        );
        registry.register_with_unit(
            "flowmetrics_flow_oldest_open",
            "Age (now - start timestamp) of the flow's oldest open instance; 0 when none \
             is open. For flows with an overdue threshold",
            Unit::Seconds,
            this.oldest_open.clone(),
        );
        let mut named: Vec<&String> = this.settings.per_flow.keys().collect();
        named.sort();
        for flow in named {
            this.flow_seen(&Arc::from(flow.as_str()));
        }
        this
    }

    /// A flow's first event (or a name from the config): its objective gauges, once.
    pub(super) fn flow_seen(&self, flow: &Arc<str>) {
        let Some(objective) = self.settings.objective_for(flow) else {
            return;
        };
        let mut shown = self.shown.lock().unwrap_or_else(PoisonError::into_inner);
        if shown.contains(flow) || shown.len() >= self.max_flows {
            return;
        }
        shown.insert(flow.clone());
        let label = FlowLabel {
            flow: flow.to_string(),
        };
        self.target.get_or_create(&label).set(objective.target);
        if let Some(within) = objective.within_secs {
            self.seconds.get_or_create(&label).set(within);
        }
    }

    /// The store's latest count for a flow with an overdue threshold.
    pub(super) fn overdue(&self, flow: &Arc<str>, overdue: u64, oldest_open_secs: f64) {
        let label = FlowLabel {
            flow: flow.to_string(),
        };
        self.overdue
            .get_or_create(&label)
            .set(i64::try_from(overdue).unwrap_or(i64::MAX));
        self.oldest_open
            .get_or_create(&label)
            .set(oldest_open_secs.max(0.0));
    }
}

impl super::Metrics {
    /// The objective `flow` is measured against, if any.
    pub fn objective_for(&self, flow: &str) -> Option<FlowObjective> {
        self.objectives.settings.objective_for(flow)
    }
}
