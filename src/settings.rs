//! Each stage's settings, from the one [`Config`]: part of the app's wiring, and with
//! `lib.rs` the only code that knows both the configuration and the stages. No stage
//! reads `Config` itself.

use std::collections::HashMap;
use std::sync::Arc;

use crate::config::{Config, DimensionSource, StoreKind};
use crate::flows::event::DimensionLookup;
use crate::flows::store::RedisSettings;
use crate::flows::{ExtractorSettings, StoreSettings};
use crate::metrics::MetricsSettings;
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
    let per_flow_buckets: HashMap<String, Vec<f64>> = config
        .flows
        .per_flow
        .iter()
        .filter_map(|(name, o)| Some((name.clone(), o.buckets.clone()?)))
        .collect();
    MetricsSettings {
        max_series_per_metric: config.limits.max_series_per_metric,
        start_dim_labels: labels(DimensionSource::Start),
        end_dim_labels: labels(DimensionSource::End),
        default_buckets: config.flows.default.buckets.clone(),
        per_flow_buckets,
        in_flight_capacity: config.limits.max_in_flight,
        series_idle_timeout: config.limits.series_idle_timeout,
        longest_flow_timeout: store(config).longest_timeout,
        shared_store: config.correlation.store == StoreKind::Redis,
    }
}
