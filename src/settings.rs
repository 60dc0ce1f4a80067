//! Each stage's settings, from the one [`Config`]: part of the app's wiring, and with
//! `lib.rs` the only code that knows both the configuration and the stages. No stage
//! reads `Config` itself.

use std::collections::HashMap;
use std::num::{NonZero, NonZeroU32};
use std::sync::Arc;

use crate::config::{
    Config, Dimension, DimensionSource, HistogramKind, MaxConnections, Objective, RedisTarget,
    StoreKind,
};
use crate::flows::extract::DimensionLookup;
use crate::flows::label_value::{LabelBound, LabelCuts};
use crate::flows::network::{NetworkDimensionLookup, NetworkFlowsSettings};
use crate::flows::state::StateSettings;
use crate::flows::steps::StepSettings;
use crate::flows::store::{OverdueSettings, RedisSettings};
use crate::flows::{ExtractorSettings, RestoreRules, StoreSettings};
use crate::ingest::limits::{connection_budget, open_file_limit, LimitSettings};
use crate::metrics::{
    FlowObjective, HistogramMode, HistogramShape, MetricsSettings, ObjectiveSettings,
};
use crate::model::sanitize_label_name;

/// How flow events are recognised (`events`, `flows.allow_unknown`, `dimensions`).
pub fn extractor(config: &Config) -> ExtractorSettings {
    let dims = |side| {
        dimensions(config, side)
            .map(|(label, d)| DimensionLookup {
                label,
                attribute: d.attribute.clone(),
                default: d.default.clone().unwrap_or_default(),
            })
            .collect()
    };
    let events = &config.events;
    ExtractorSettings {
        prefix: events.prefix.clone(),
        start_suffix: events.start_suffix.clone(),
        end_suffix: events.end_suffix.clone(),
        correlation_keys: events.correlation_keys.clone(),
        outcome_key: events.outcome_key.clone(),
        steps: steps(config),
        max_correlation_id_bytes: events.max_correlation_id_bytes.get(),
        known_flows: (!config.flows.allow_unknown)
            .then(|| config.flows.per_flow.keys().cloned().collect()),
        start_dims: dims(DimensionSource::Start),
        end_dims: dims(DimensionSource::End),
        // Past the series limit, new names and values land in the overflow series
        // anyway: there is no point remembering more of them than that.
        intern_capacity: config.limits.max_series_per_metric,
        label_values: label_bound(config, Arc::new(label_cuts(config))),
    }
}

/// The dimensions read from `side`'s event, each with its label as exposed.
fn dimensions(
    config: &Config,
    side: DimensionSource,
) -> impl Iterator<Item = (String, &Dimension)> {
    config
        .dimensions
        .iter()
        .filter(move |d| d.from == side)
        .map(|d| (sanitize_label_name(&d.label), d))
}

/// Every label whose values come from client data, for counting cuts (the app exposes
/// the counts of [`crate::metrics::Metrics::label_cuts`] and hands those to the stages).
pub fn label_cuts(config: &Config) -> LabelCuts {
    let flow = config
        .dimensions
        .iter()
        .map(|d| sanitize_label_name(&d.label));
    let network = network_labels(config);
    let labels: Vec<String> = flow.chain(network).collect();
    LabelCuts::new(labels.iter().map(String::as_str))
}

/// `limits.max_label_value_bytes`, counting cuts in `cuts`.
pub fn label_bound(config: &Config, cuts: Arc<LabelCuts>) -> LabelBound {
    LabelBound::new(config.limits.max_label_value_bytes.get(), cuts)
}

/// Step events and names (`events.step_*`, `flows.per_flow.*.steps`,
/// `limits.max_steps_per_flow`).
pub fn steps(config: &Config) -> StepSettings {
    StepSettings {
        suffix: config.events.step_suffix.clone(),
        key: config.events.step_key.clone(),
        declared: declared_steps(config),
        max_per_flow: config.limits.max_steps_per_flow,
        max_flows: config.limits.max_series_per_metric,
    }
}

/// Flows with a declared step list, in order.
pub fn declared_steps(config: &Config) -> HashMap<String, Vec<String>> {
    config
        .flows
        .per_flow
        .iter()
        .filter_map(|(flow, o)| Some((flow.clone(), o.steps.clone()?)))
        .collect()
}

/// The correlation store's bounds and timeouts (`limits`, `flows.*.timeout`).
pub fn store(config: &Config) -> StoreSettings {
    let timeouts = config.clone();
    let longest_timeout = config
        .flows
        .per_flow
        .values()
        .filter_map(|o| o.timeout)
        .chain([config.flows.default.timeout])
        .max()
        .unwrap_or(config.flows.default.timeout);
    StoreSettings {
        capacity: config.limits.max_in_flight,
        dedup_window: config.limits.dedup_window,
        timeout_for: Arc::new(move |flow| timeouts.timeout_for(flow)),
        longest_timeout,
        step_flows: declared_steps(config)
            .into_keys()
            .map(|f| Arc::from(f.as_str()))
            .collect(),
    }
}

/// Where the shared store is (`correlation.redis`).
pub fn redis(config: &Config) -> RedisSettings {
    let redis = &config.correlation.redis;
    let (url, cluster) = match redis.target() {
        RedisTarget::Server(url) => (url, Vec::new()),
        RedisTarget::Cluster { nodes, .. } => (String::new(), nodes),
    };
    RedisSettings {
        url,
        cluster,
        shards: redis.shard_count(),
        ca_file: (!redis.ca_file.is_empty()).then(|| redis.ca_file.clone().into()),
        key_prefix: redis.key_prefix.clone(),
        connect_timeout: redis.connect_timeout,
        command_timeout: redis.command_timeout,
        pool_size: redis.pool_size.get(),
    }
}

/// Label names, buckets and the series limit of the metric families.
pub fn metrics(config: &Config) -> MetricsSettings {
    let labels = |side| dimensions(config, side).map(|(label, _)| label).collect();
    // Flows with their own buckets or their own objective's `within` (docs/behaviour.md
    // §10: `within` is always a bound of the flow's histogram).
    let per_flow_buckets: HashMap<String, Vec<f64>> = config
        .flows
        .per_flow
        .iter()
        .filter(|(_, o)| o.buckets.is_some() || o.objective.is_some())
        .map(|(name, _)| (name.clone(), config.duration_buckets_for(name)))
        .collect();
    let default = &config.flows.default;
    let shape = |kind: HistogramKind, factor: f64, max_buckets: NonZeroU32| HistogramShape {
        mode: match kind {
            HistogramKind::Classic => HistogramMode::Classic,
            HistogramKind::Native => HistogramMode::Native,
            HistogramKind::Both => HistogramMode::Both,
        },
        native_bucket_factor: factor,
        native_max_buckets: max_buckets.get(),
    };
    let per_flow_histogram = config
        .flows
        .per_flow
        .iter()
        .filter(|(_, o)| {
            o.histogram.is_some()
                || o.native_bucket_factor.is_some()
                || o.native_max_buckets.is_some()
        })
        .map(|(name, o)| {
            let s = shape(
                o.histogram.unwrap_or(default.histogram),
                o.native_bucket_factor
                    .unwrap_or(default.native_bucket_factor),
                o.native_max_buckets.unwrap_or(default.native_max_buckets),
            );
            (name.clone(), s)
        })
        .collect();
    MetricsSettings {
        max_series_per_metric: config.limits.max_series_per_metric,
        start_dim_labels: labels(DimensionSource::Start),
        end_dim_labels: labels(DimensionSource::End),
        default_buckets: config.default_duration_buckets(),
        per_flow_buckets,
        default_histogram: shape(
            default.histogram,
            default.native_bucket_factor,
            default.native_max_buckets,
        ),
        per_flow_histogram,
        label_cuts: Arc::new(label_cuts(config)),
        in_flight_capacity: config.limits.max_in_flight,
        network_labels: config.network_flows.enabled.then(|| network_labels(config)),
        series_idle_timeout: config.limits.series_idle_timeout,
        longest_flow_timeout: store(config).longest_timeout,
        shared_store: config.correlation.store == StoreKind::Redis,
        state_file: config.correlation.store == StoreKind::Memory && !config.state.path.is_empty(),
        declared_steps: declared_steps(config),
        objectives: objectives(config),
    }
}

/// The state file (`state.*`); `None` when `state.path` is empty.
pub fn state(config: &Config) -> Option<StateSettings> {
    if config.state.path.is_empty() {
        return None;
    }
    Some(StateSettings {
        path: config.state.path.clone().into(),
        checkpoint_interval: config.state.checkpoint_interval,
        // Generous for any real entry (dims and ids are bounded where they come in),
        // but a bound: the file is input too.
        max_file_bytes: (64 << 20) + config.limits.max_in_flight.saturating_mul(1024),
    })
}

/// What a state file written under another configuration must be checked against:
/// the flows tracked now and today's dimensions, by label.
pub fn restore_rules(config: &Config) -> RestoreRules {
    let dims = |side| {
        dimensions(config, side)
            .map(|(label, d)| (label, Arc::from(d.default.clone().unwrap_or_default())))
            .collect()
    };
    RestoreRules {
        known_flows: (!config.flows.allow_unknown)
            .then(|| Arc::new(config.flows.per_flow.keys().cloned().collect())),
        start_dims: dims(DimensionSource::Start),
        end_dims: dims(DimensionSource::End),
    }
}

/// How Flow Spans are read (`network_flows`); `None` when they are off.
pub fn network_flows(config: &Config) -> Option<NetworkFlowsSettings> {
    /// Retry fingerprints of network records remembered at most.
    const MAX_FINGERPRINTS: u64 = 1 << 20;
    let network = &config.network_flows;
    network.enabled.then(|| NetworkFlowsSettings {
        dimensions: network
            .dimensions
            .iter()
            .map(|d| NetworkDimensionLookup {
                label: sanitize_label_name(&d.label),
                attributes: d.attribute.clone(),
                default: d.default.clone().unwrap_or_default(),
            })
            .collect(),
        intern_capacity: config.limits.max_series_per_metric,
        dedup_capacity: usize::try_from(config.limits.max_in_flight.min(MAX_FINGERPRINTS))
            .unwrap_or(usize::MAX),
        dedup_window: config.limits.dedup_window,
        label_values: label_bound(config, Arc::new(label_cuts(config))),
    })
}

/// Label names of the network families' dimensions, in config order.
pub fn network_labels(config: &Config) -> Vec<String> {
    config
        .network_flows
        .dimensions
        .iter()
        .map(|d| sanitize_label_name(&d.label))
        .collect()
}

/// What a client may hold on either transport (`limits`).
pub fn limits(config: &Config) -> LimitSettings {
    let l = &config.limits;
    let listeners = [&config.listen.otlp_http, &config.listen.otlp_grpc]
        .iter()
        .filter(|a| !a.is_empty())
        .count()
        .max(1);
    let fd_limit = open_file_limit();
    let budget = connection_budget(fd_limit, listeners);
    let max_connections = match l.max_connections {
        MaxConnections::Fixed(n) => {
            let wanted = (n as u64).saturating_mul(listeners as u64) + budget.admin as u64;
            if wanted > budget.available {
                tracing::warn!(
                    "limits.max_connections: {n} per OTLP listener with {} for /metrics may \
                     take every descriptor the open-file limit ({fd_limit}) leaves; at most \
                     {} per listener keep some for the state file and the store \
                     (max_connections: auto does this)",
                    budget.admin,
                    budget.per_otlp_listener
                );
            }
            n
        }
        MaxConnections::Auto => budget.per_otlp_listener,
    };
    let cpus = std::thread::available_parallelism().map_or(2, NonZero::get);
    LimitSettings {
        max_body_bytes: l.max_request_body_bytes,
        max_buffered_bytes: l.max_buffered_bytes,
        max_connections,
        admin_max_connections: budget.admin,
        idle_timeout: l.idle_timeout,
        request_read_timeout: l.request_read_timeout,
        response_write_timeout: l.response_write_timeout,
        decode_slots: cpus * 2,
    }
}

/// Each flow's objective (`flows.*.objective`), for its gauges.
pub fn objectives(config: &Config) -> ObjectiveSettings {
    let as_metric = |o: Objective| FlowObjective {
        target: o.target,
        within_secs: o.within_secs(),
    };
    ObjectiveSettings {
        default: config.flows.default.objective.map(as_metric),
        per_flow: config
            .flows
            .per_flow
            .keys()
            .filter_map(|flow| Some((flow.clone(), as_metric(config.objective_for(flow)?))))
            .collect(),
    }
}

/// Which flows' open instances are checked for being overdue (`flows.*.overdue_after`,
/// else `objective.within`); `None`: no flow can be, and the stores keep no ages.
pub fn overdue(config: &Config) -> Option<OverdueSettings> {
    if !config.any_overdue_threshold() {
        return None;
    }
    let thresholds = config.clone();
    Some(OverdueSettings {
        threshold_for: Arc::new(move |flow| {
            // A flow the config does not track never reaches the store.
            thresholds.overdue_threshold_for(flow)
        }),
        named: config
            .flows
            .per_flow
            .keys()
            .filter(|flow| config.overdue_threshold_for(flow).is_some())
            .cloned()
            .collect(),
        max_flows: config.limits.max_series_per_metric,
    })
}
