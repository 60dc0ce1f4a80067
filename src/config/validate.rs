//! What a configuration must be beyond its types: one check per section, each naming
//! the first [`Problem`] and its [`Key`]. Counts that must be at least 1 are already
//! `NonZero*` in the schema; what no type says is checked here.

use std::collections::HashSet;
use std::time::Duration;

use super::error::{Invalid, Key, Problem};
use super::objectives;
use super::schema::{
    Config, CorrelationSection, FlowDefaults, FlowOverride, LimitsSection, MaxConnections,
    NodeList, RedisSection, RedisTarget, StoreKind, DEFAULT_REDIS_URL,
};
use crate::config_checks::check_log_filter;
use crate::model::{is_valid_flow_name, is_valid_step_name, sanitize_label_name, RESERVED_LABELS};

/// Upper bounds of the limits: beyond them a value is a typo, or would overflow (a
/// deadline past what `Instant` holds, a gRPC length prefix past 32 bits).
pub(super) const MAX_BODY_LIMIT: usize = 2 * 1024 * 1024 * 1024;
pub(super) const MAX_BUFFERED_LIMIT: u64 = 1024 * 1024 * 1024 * 1024;
pub(super) const MAX_CONNECTIONS_LIMIT: usize = 1_000_000;
pub(super) const MAX_DURATION: Duration = Duration::from_secs(365 * 24 * 3600);
/// Distinct steps of one flow: a journey, not a label value dump.
pub(super) const MAX_STEPS_LIMIT: usize = 1024;

type Checked = Result<(), Invalid>;

/// `Err` with `problem` at `key` unless `ok`.
fn ensure(ok: bool, key: impl FnOnce() -> Key, problem: impl FnOnce() -> Problem) -> Checked {
    if ok {
        Ok(())
    } else {
        Err(problem().at(key()))
    }
}

impl Config {
    /// Every section, in the order they are documented; the first problem wins.
    pub(super) fn validate(&self) -> Checked {
        self.validate_listen()?;
        validate_correlation(&self.correlation)?;
        self.validate_events()?;
        self.validate_flows()?;
        self.validate_dimensions()?;
        ensure(
            !self.state.checkpoint_interval.is_zero(),
            || Key::root("state").field("checkpoint_interval"),
            || Problem::Zero,
        )?;
        self.validate_network_dimensions()?;
        validate_limits(&self.limits)?;
        check_log_filter(&self.log.level)
            .map_err(|e| Problem::from(e).at(Key::root("log").field("level")))
    }

    /// Addresses are checked as they are read (`values::listen_addr`); here, that the
    /// one listener that must be there is.
    fn validate_listen(&self) -> Checked {
        ensure(
            !self.listen.metrics.is_empty(),
            || Key::root("listen").field("metrics"),
            || Problem::MetricsListenerOff,
        )
    }

    fn validate_events(&self) -> Checked {
        let events = &self.events;
        let key = |name: &str| Key::root("events").field(name);
        for (name, value) in [
            ("prefix", &events.prefix),
            ("start_suffix", &events.start_suffix),
            ("end_suffix", &events.end_suffix),
            ("step_suffix", &events.step_suffix),
            ("outcome_key", &events.outcome_key),
            ("step_key", &events.step_key),
        ] {
            ensure(!value.is_empty(), || key(name), || Problem::Empty)?;
        }
        ensure(
            events.start_suffix != events.end_suffix,
            || key("end_suffix"),
            || Problem::EndIsStart,
        )?;
        ensure(
            ![&events.start_suffix, &events.end_suffix].contains(&&events.step_suffix),
            || key("step_suffix"),
            || Problem::StepIsStartOrEnd,
        )?;
        let keys = &events.correlation_keys;
        ensure(
            !keys.is_empty() && !keys.iter().any(String::is_empty),
            || key("correlation_keys"),
            || Problem::NoCorrelationKey,
        )
    }

    fn validate_flows(&self) -> Checked {
        let flows = Key::root("flows");
        validate_flow_defaults(&flows.field("default"), &self.flows.default)?;
        for (name, over) in &self.flows.per_flow {
            validate_flow_override(&flows.field("per_flow").field(name), name, over)?;
        }
        ensure(
            self.flows.allow_unknown || !self.flows.per_flow.is_empty(),
            || flows.field("allow_unknown"),
            || Problem::NothingTracked,
        )
    }

    fn validate_dimensions(&self) -> Checked {
        let list = Key::root("dimensions");
        let labels = self.dimensions.iter().map(|d| d.label.as_str());
        check_dimension_labels(&list, labels, &RESERVED_LABELS)?;
        for (i, dim) in self.dimensions.iter().enumerate() {
            ensure(
                !dim.attribute.is_empty(),
                || list.index(i).field("attribute"),
                || Problem::Empty,
            )?;
        }
        Ok(())
    }

    fn validate_network_dimensions(&self) -> Checked {
        // The network families' own label, and every label the flow families reserve:
        // the overview page lists network rows beside flow rows, and a `flow` or
        // `outcome` dimension there would read as a flow that does not exist.
        let reserved: Vec<&str> = std::iter::once("direction")
            .chain(RESERVED_LABELS)
            .collect();
        let list = Key::root("network_flows").field("dimensions");
        let dims = &self.network_flows.dimensions;
        let labels = dims.iter().map(|d| d.label.as_str());
        check_dimension_labels(&list, labels, &reserved)?;
        for (i, dim) in dims.iter().enumerate() {
            ensure(
                !dim.attribute.is_empty() && !dim.attribute.iter().any(String::is_empty),
                || list.index(i).field("attribute"),
                || Problem::NoAttribute,
            )?;
        }
        Ok(())
    }
}

/// `correlation.redis`: checked when the shared store is used, apart from its counts.
fn validate_correlation(correlation: &CorrelationSection) -> Checked {
    let redis = &correlation.redis;
    let key = |name: &str| Key::root("correlation").field("redis").field(name);
    ensure(
        redis.shards.is_none_or(|n| (1..=1024).contains(&n)),
        || key("shards"),
        || Problem::Shards,
    )?;
    if correlation.store != StoreKind::Redis {
        return Ok(());
    }
    let target = redis.target();
    validate_redis_urls(redis, &target, key)?;
    let cluster = matches!(target, RedisTarget::Cluster { .. });
    // The shards' hash tags follow the prefix: a brace in it would become the tag of
    // every key, and put them all in one slot.
    ensure(
        !cluster || !redis.key_prefix.contains(['{', '}']),
        || key("key_prefix"),
        || Problem::BraceInClusterPrefix,
    )?;
    let tls = target.urls().iter().any(|u| u.starts_with("rediss://"));
    ensure(
        redis.ca_file.is_empty() || tls,
        || key("ca_file"),
        || Problem::CaFileWithoutTls,
    )
}

/// Each URL of the target, under the key that listed it.
fn validate_redis_urls(
    redis: &RedisSection,
    target: &RedisTarget,
    key: impl Fn(&str) -> Key,
) -> Checked {
    // `#insecure` (no certificate check) needs a redis-rs feature left out on purpose.
    let check = |url: &String, key: Key| {
        if url.ends_with("#insecure") {
            return Err(Problem::InsecureRedisUrl(url.clone()).at(key));
        }
        ensure(
            url.starts_with("redis://") || url.starts_with("rediss://"),
            || key,
            || Problem::NotARedisUrl(url.clone()),
        )
    };
    match target {
        RedisTarget::Server(url) => check(url, key("url")),
        RedisTarget::Cluster { nodes, listed_in } => {
            let list = match listed_in {
                NodeList::Url => key("url"),
                NodeList::Cluster => {
                    ensure(
                        redis.url == DEFAULT_REDIS_URL,
                        || key("cluster"),
                        || Problem::UrlAndCluster,
                    )?;
                    key("cluster")
                }
            };
            nodes
                .iter()
                .enumerate()
                .try_for_each(|(i, url)| check(url, list.index(i)))
        }
    }
}

/// `flows.default`: its timeout, buckets, native histogram and objective.
fn validate_flow_defaults(key: &Key, default: &FlowDefaults) -> Checked {
    check_timeout(key, Some(default.timeout))?;
    check_buckets(key, Some(&default.buckets))?;
    check_native_factor(key, Some(default.native_bucket_factor))?;
    objectives::check(key, default.objective.as_ref(), default.overdue_after)
}

/// `flows.per_flow.<name>`: its name, what it overrides, and its declared steps.
fn validate_flow_override(key: &Key, name: &str, over: &FlowOverride) -> Checked {
    ensure(
        is_valid_flow_name(name),
        || key.clone(),
        || Problem::FlowName,
    )?;
    check_timeout(key, over.timeout)?;
    check_buckets(key, over.buckets.as_ref())?;
    check_native_factor(key, over.native_bucket_factor)?;
    if let Some(steps) = &over.steps {
        check_declared_steps(&key.field("steps"), steps)?;
    }
    objectives::check(key, over.objective.as_ref(), over.overdue_after)
}

/// `limits`: each bound within what the service can hold.
fn validate_limits(limits: &LimitsSection) -> Checked {
    let key = |name: &str| Key::root("limits").field(name);
    ensure(
        limits
            .series_idle_timeout
            .is_none_or(|t| t >= Duration::from_secs(1)),
        || key("series_idle_timeout"),
        || Problem::IdleSeriesTooSoon,
    )?;
    for (name, zero) in [
        ("max_in_flight", limits.max_in_flight == 0),
        ("max_series_per_metric", limits.max_series_per_metric == 0),
    ] {
        ensure(!zero, || key(name), || Problem::AtLeastOne)?;
    }
    ensure(
        (1..=MAX_STEPS_LIMIT).contains(&limits.max_steps_per_flow),
        || key("max_steps_per_flow"),
        || Problem::StepLimit,
    )?;
    let body = limits.max_request_body_bytes;
    ensure(
        (1024..=MAX_BODY_LIMIT).contains(&body),
        || key("max_request_body_bytes"),
        || Problem::BodyLimit,
    )?;
    ensure(
        (body as u64..=MAX_BUFFERED_LIMIT).contains(&limits.max_buffered_bytes),
        || key("max_buffered_bytes"),
        || Problem::BufferLimit(body),
    )?;
    if let MaxConnections::Fixed(n) = limits.max_connections {
        ensure(
            (1..=MAX_CONNECTIONS_LIMIT).contains(&n),
            || key("max_connections"),
            || Problem::ConnectionLimit,
        )?;
    }
    let at_least = Duration::from_millis(100);
    for (name, value, min) in [
        ("idle_timeout", limits.idle_timeout, at_least),
        (
            "request_read_timeout",
            limits.request_read_timeout,
            at_least,
        ),
        (
            "response_write_timeout",
            limits.response_write_timeout,
            at_least,
        ),
        ("dedup_window", limits.dedup_window, Duration::ZERO),
    ] {
        ensure(
            (min..=MAX_DURATION).contains(&value),
            || key(name),
            || Problem::DurationRange(min),
        )?;
    }
    Ok(())
}

/// The labels of a dimension list (`list[i].label`), once sanitised: not empty, not one of
/// `reserved` or `__`-prefixed, and distinct.
fn check_dimension_labels<'a>(
    list: &Key,
    labels: impl Iterator<Item = &'a str>,
    reserved: &[&str],
) -> Checked {
    let mut seen = HashSet::new();
    for (i, raw) in labels.enumerate() {
        let key = || list.index(i).field("label");
        let label = sanitize_label_name(raw);
        ensure(!label.is_empty(), key, || Problem::Empty)?;
        ensure(
            !reserved.contains(&label.as_str()) && !label.starts_with("__"),
            key,
            || Problem::ReservedLabel(label.clone()),
        )?;
        ensure(seen.insert(label.clone()), key, || {
            Problem::LabelTaken(label.clone())
        })?;
    }
    Ok(())
}

/// A declared step list: names by the flow-name rules (1–64 characters), each once, at
/// most `MAX_STEPS_LIMIT`.
fn check_declared_steps(key: &Key, steps: &[String]) -> Checked {
    ensure(!steps.is_empty(), || key.clone(), || Problem::NoSteps)?;
    ensure(
        steps.len() <= MAX_STEPS_LIMIT,
        || key.clone(),
        || Problem::TooManySteps,
    )?;
    for (i, step) in steps.iter().enumerate() {
        ensure(
            is_valid_step_name(step),
            || key.index(i),
            || Problem::StepName(step.clone()),
        )?;
        ensure(
            !steps[..i].contains(step),
            || key.index(i),
            || Problem::StepTwice(step.clone()),
        )?;
    }
    Ok(())
}

/// `key.timeout`: above 0, at most a year.
fn check_timeout(key: &Key, timeout: Option<Duration>) -> Checked {
    check_positive_duration(&key.field("timeout"), timeout)
}

/// A duration that must be above 0 and at most a year (`None`: unset, fine).
pub(super) fn check_positive_duration(key: &Key, value: Option<Duration>) -> Checked {
    match value {
        Some(d) if d.is_zero() => Err(Problem::Zero.at(key.clone())),
        Some(d) if d > MAX_DURATION => Err(Problem::TooLong.at(key.clone())),
        _ => Ok(()),
    }
}

/// `key.buckets`: at least one, finite seconds above 0, strictly increasing.
fn check_buckets(key: &Key, buckets: Option<&Vec<f64>>) -> Checked {
    let Some(buckets) = buckets else {
        return Ok(());
    };
    let key = || key.field("buckets");
    ensure(!buckets.is_empty(), key, || Problem::NoBuckets)?;
    ensure(
        buckets.iter().all(|b| b.is_finite() && *b > 0.0),
        key,
        || Problem::BucketBound,
    )?;
    ensure(buckets.windows(2).all(|w| w[0] < w[1]), key, || {
        Problem::BucketOrder
    })
}

/// `key.native_bucket_factor`: above 1 (1.1 is client_golang's default).
fn check_native_factor(key: &Key, factor: Option<f64>) -> Checked {
    ensure(
        factor.is_none_or(|f| f.is_finite() && f > 1.0),
        || key.field("native_bucket_factor"),
        || Problem::NativeFactor,
    )
}
