//! Each stage's settings, from the one [`Config`]: part of the app's wiring, and with
//! `lib.rs` the only code that knows both the configuration and the stages. No stage
//! reads `Config` itself.

use std::collections::HashMap;
use std::sync::Arc;

use crate::config::{Config, DimensionSource, MaxConnections, StoreKind};
use crate::flows::event::DimensionLookup;
use crate::flows::network::{NetworkDimensionLookup, NetworkFlowsSettings};
use crate::flows::state::StateSettings;
use crate::flows::store::{OverdueSettings, RedisSettings};
use crate::flows::{ExtractorSettings, RestoreRules, StoreSettings};
use crate::ingest::limits::{auto_connections, open_file_limit, LimitSettings};
use crate::metrics::{FlowObjective, MetricsSettings, ObjectiveSettings};
use crate::model::sanitize_label_name;

/// How flow events are recognised (`events`, `flows.allow_unknown`, `dimensions`).
pub fn extractor(config: &Config) -> ExtractorSettings {
    let dims = |side| {
        config
            .dimensions
            .iter()
            .filter(|d| d.from == side)
            .map(|d| DimensionLookup {
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
        max_correlation_id_bytes: events.max_correlation_id_bytes,
        known_flows: (!config.flows.allow_unknown)
            .then(|| config.flows.per_flow.keys().cloned().collect()),
        start_dims: dims(DimensionSource::Start),
        end_dims: dims(DimensionSource::End),
        // Past the series limit, new names and values land in the overflow series
        // anyway: there is no point remembering more of them than that.
        intern_capacity: config.limits.max_series_per_metric,
    }
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
    }
}

/// Where the shared store is (`correlation.redis`).
pub fn redis(config: &Config) -> RedisSettings {
    let redis = &config.correlation.redis;
    RedisSettings {
        url: redis.url.clone(),
        cluster: redis.cluster_nodes(),
        shards: redis.shard_count(),
        ca_file: (!redis.ca_file.is_empty()).then(|| redis.ca_file.clone().into()),
        key_prefix: redis.key_prefix.clone(),
        connect_timeout: redis.connect_timeout,
        command_timeout: redis.command_timeout,
        pool_size: redis.pool_size,
    }
}

/// Label names, buckets and the series limit of the metric families.
pub fn metrics(config: &Config) -> MetricsSettings {
    let labels = |side| {
        config
            .dimensions
            .iter()
            .filter(|d| d.from == side)
            .map(|d| sanitize_label_name(&d.label))
            .collect()
    };
    // Flows with their own buckets or their own objective's `within` (docs/behaviour.md
    // §10: `within` is always a bound of the flow's histogram).
    let per_flow_buckets: HashMap<String, Vec<f64>> = config
        .flows
        .per_flow
        .iter()
        .filter(|(_, o)| o.buckets.is_some() || o.objective.is_some())
        .map(|(name, _)| (name.clone(), config.duration_buckets_for(name)))
        .collect();
    MetricsSettings {
        max_series_per_metric: config.limits.max_series_per_metric,
        start_dim_labels: labels(DimensionSource::Start),
        end_dim_labels: labels(DimensionSource::End),
        default_buckets: config.default_duration_buckets(),
        per_flow_buckets,
        in_flight_capacity: config.limits.max_in_flight,
        network_labels: config.network_flows.enabled.then(|| network_labels(config)),
        series_idle_timeout: config.limits.series_idle_timeout,
        longest_flow_timeout: store(config).longest_timeout,
        shared_store: config.correlation.store == StoreKind::Redis,
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
        config
            .dimensions
            .iter()
            .filter(|d| d.from == side)
            .map(|d| {
                (
                    sanitize_label_name(&d.label),
                    Arc::from(d.default.clone().unwrap_or_default()),
                )
            })
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
                attributes: d.attribute.clone(),
                default: d.default.clone().unwrap_or_default(),
            })
            .collect(),
        intern_capacity: config.limits.max_series_per_metric,
        dedup_capacity: usize::try_from(config.limits.max_in_flight.min(MAX_FINGERPRINTS))
            .unwrap_or(usize::MAX),
        dedup_window: config.limits.dedup_window,
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
    let max_connections = match l.max_connections {
        MaxConnections::Fixed(n) => n,
        MaxConnections::Auto => auto_connections(open_file_limit(), listeners),
    };
    let cpus = std::thread::available_parallelism().map_or(2, |n| n.get());
    LimitSettings {
        max_body_bytes: l.max_request_body_bytes,
        max_buffered_bytes: l.max_buffered_bytes,
        max_connections,
        idle_timeout: l.idle_timeout,
        request_read_timeout: l.request_read_timeout,
        decode_slots: cpus * 2,
    }
}

/// Each flow's objective (`flows.*.objective`), for its gauges.
pub fn objectives(config: &Config) -> ObjectiveSettings {
    let as_metric = |o: crate::config::Objective| FlowObjective {
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
