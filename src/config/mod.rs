//! Configuration: built-in defaults, then a YAML file, then `FLOWMETRICS_*` environment
//! variables (`__` nests). Read once at start into typed structs; nothing else in the
//! crate reads the environment.

use std::collections::BTreeMap;
use std::fmt;
use std::net::SocketAddr;
use std::path::Path;
use std::time::Duration;

use figment::providers::{Format, Serialized, Yaml};
use figment::value::{Dict, Value};
use figment::Figment;
use serde::{Deserialize, Deserializer, Serialize};

use crate::config_checks::check_config_file;
pub use crate::config_checks::{check_log_filter, MAX_CONFIG_FILE_BYTES};
use crate::model::{is_valid_flow_name, is_valid_step_name, sanitize_label_name, RESERVED_LABELS};

mod objectives;
pub use objectives::{with_bounds, Objective};

/// Environment variable naming the config file when `--config` is not given.
pub const CONFIG_ENV: &str = "FLOWMETRICS_CONFIG";
const ENV_PREFIX: &str = "FLOWMETRICS_";

/// The whole effective configuration.
#[derive(Debug, Clone, Default, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct Config {
    pub listen: Listen,
    pub events: Events,
    pub flows: Flows,
    pub dimensions: Vec<Dimension>,
    pub limits: Limits,
    pub state: State,
    pub shutdown: Shutdown,
    pub network_flows: NetworkFlows,
    pub correlation: Correlation,
    pub log: Log,
}

/// Where open instances live (docs/behaviour.md §3 "several replicas", §5 `correlation`).
#[derive(Debug, Clone, Default, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct Correlation {
    pub store: StoreKind,
    pub redis: RedisConfig,
}

#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum StoreKind {
    /// moka, in process: one replica.
    #[default]
    Memory,
    /// Redis or Valkey, shared by every replica.
    Redis,
}

#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct RedisConfig {
    /// One server (or one endpoint in front of several, such as a proxy); a list (or a
    /// comma-separated string) of URLs is a Redis Cluster's nodes, as `cluster`.
    #[serde(deserialize_with = "url_or_nodes")]
    pub url: String,
    /// Nodes of a Redis Cluster, any of them (the others are discovered); when set,
    /// `url` must be left unset.
    #[serde(deserialize_with = "string_list")]
    pub cluster: Vec<String>,
    /// Shards the keys are spread over, each in one hash slot; unset: 16 with a
    /// cluster (so that they spread over its primaries), 1 on one server.
    pub shards: Option<u32>,
    /// PEM file of the CA that signed the servers' certificates (`rediss://`), in place
    /// of the system's roots; `""`: the system's.
    #[serde(deserialize_with = "string_like")]
    pub ca_file: String,
    #[serde(deserialize_with = "string_like")]
    pub key_prefix: String,
    /// Opening a connection must succeed within this.
    #[serde(with = "duration")]
    pub connect_timeout: Duration,
    /// One command (a batch's script) must be answered within this, else the export is
    /// answered 503 and retried by the exporter.
    #[serde(with = "duration")]
    pub command_timeout: Duration,
    /// Idle connections kept open (more are opened under load, then closed).
    pub pool_size: usize,
}

const DEFAULT_REDIS_URL: &str = "redis://127.0.0.1:6379/0";

impl RedisConfig {
    /// The cluster's nodes, from `cluster` or from a list in `url`; empty: one server.
    pub fn cluster_nodes(&self) -> Vec<String> {
        if !self.cluster.is_empty() {
            return self.cluster.clone();
        }
        if !self.url.contains(',') {
            return Vec::new();
        }
        self.url
            .split(',')
            .map(str::trim)
            .filter(|u| !u.is_empty())
            .map(String::from)
            .collect()
    }

    /// `shards`, or its default.
    pub fn shard_count(&self) -> u32 {
        self.shards.unwrap_or(if self.cluster_nodes().is_empty() {
            1
        } else {
            16
        })
    }
}

impl Default for RedisConfig {
    fn default() -> Self {
        Self {
            url: DEFAULT_REDIS_URL.into(),
            cluster: Vec::new(),
            shards: None,
            ca_file: String::new(),
            key_prefix: "flowmetrics:".into(),
            connect_timeout: Duration::from_secs(1),
            command_timeout: Duration::from_secs(2),
            pool_size: 8,
        }
    }
}

/// Listener addresses. An empty string disables that listener.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct Listen {
    #[serde(deserialize_with = "listen_addr")]
    pub otlp_http: String,
    #[serde(deserialize_with = "listen_addr")]
    pub otlp_grpc: String,
    #[serde(deserialize_with = "listen_addr")]
    pub metrics: String,
}

impl Default for Listen {
    fn default() -> Self {
        Self {
            otlp_http: "127.0.0.1:4318".into(),
            otlp_grpc: "127.0.0.1:4317".into(),
            metrics: "127.0.0.1:9464".into(),
        }
    }
}

/// How flow events are recognised inside spans and log records.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct Events {
    #[serde(deserialize_with = "string_like")]
    pub prefix: String,
    #[serde(deserialize_with = "string_like")]
    pub start_suffix: String,
    #[serde(deserialize_with = "string_like")]
    pub end_suffix: String,
    /// Step events: `<prefix><flow><step_suffix>` (docs/behaviour.md §9).
    #[serde(deserialize_with = "string_like")]
    pub step_suffix: String,
    /// The attribute of a step event that names its step.
    #[serde(deserialize_with = "string_like")]
    pub step_key: String,
    #[serde(deserialize_with = "string_list")]
    pub correlation_keys: Vec<String>,
    #[serde(deserialize_with = "string_like")]
    pub outcome_key: String,
    pub max_correlation_id_bytes: usize,
}

impl Default for Events {
    fn default() -> Self {
        Self {
            prefix: "flow.".into(),
            start_suffix: ".start".into(),
            end_suffix: ".end".into(),
            step_suffix: ".step".into(),
            step_key: "step".into(),
            correlation_keys: vec![
                "correlation-id".into(),
                "correlation_id".into(),
                "correlation.id".into(),
            ],
            outcome_key: "outcome".into(),
            max_correlation_id_bytes: 256,
        }
    }
}

/// Per-flow settings: the default for every flow, overrides by name.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct Flows {
    pub default: FlowSettings,
    pub per_flow: BTreeMap<String, FlowOverride>,
    pub allow_unknown: bool,
}

impl Default for Flows {
    fn default() -> Self {
        Self {
            default: FlowSettings::default(),
            per_flow: BTreeMap::new(),
            allow_unknown: true,
        }
    }
}

#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct FlowSettings {
    #[serde(with = "duration")]
    pub timeout: Duration,
    pub buckets: Vec<f64>,
    /// Which buckets `flowmetrics_flow_duration_seconds` keeps (docs/behaviour.md §4).
    pub histogram: HistogramKind,
    /// Native buckets: each at most this factor wider than the one before (client_golang's
    /// `NativeHistogramBucketFactor`); the schema is the largest resolution within it.
    pub native_bucket_factor: f64,
    /// Native buckets per series at most; beyond, the resolution halves.
    pub native_max_buckets: u32,
    /// docs/behaviour.md §10: what "good" means for every flow without its own.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub objective: Option<Objective>,
    #[serde(with = "opt_duration", skip_serializing_if = "Option::is_none")]
    pub overdue_after: Option<Duration>,
}

/// Classic buckets (`buckets`), native (exponential) buckets, or both.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum HistogramKind {
    #[default]
    Classic,
    Native,
    Both,
}

/// client_golang's default: schema 3, each bucket 2^(1/8) ≈ 1.09 times the one before.
pub const DEFAULT_NATIVE_BUCKET_FACTOR: f64 = 1.1;
pub const DEFAULT_NATIVE_MAX_BUCKETS: u32 = 160;

/// Default duration buckets (seconds): flows run from milliseconds to an hour.
pub const DEFAULT_BUCKETS: [f64; 18] = [
    0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0, 120.0, 300.0, 600.0,
    1800.0, 3600.0,
];

impl Default for FlowSettings {
    fn default() -> Self {
        Self {
            timeout: Duration::from_secs(300),
            buckets: DEFAULT_BUCKETS.to_vec(),
            histogram: HistogramKind::Classic,
            native_bucket_factor: DEFAULT_NATIVE_BUCKET_FACTOR,
            native_max_buckets: DEFAULT_NATIVE_MAX_BUCKETS,
            objective: None,
            overdue_after: None,
        }
    }
}

/// An override for one flow; unset fields fall back to `flows.default`.
#[derive(Debug, Clone, Default, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct FlowOverride {
    #[serde(with = "opt_duration", skip_serializing_if = "Option::is_none")]
    pub timeout: Option<Duration>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub buckets: Option<Vec<f64>>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub histogram: Option<HistogramKind>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub native_bucket_factor: Option<f64>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub native_max_buckets: Option<u32>,
    /// The flow's steps, in order: other step names are refused (`unknown_step`), and
    /// every declared step's series exist from the flow's first event.
    #[serde(
        default,
        deserialize_with = "opt_string_list",
        skip_serializing_if = "Option::is_none"
    )]
    pub steps: Option<Vec<String>>,
    pub objective: Option<Objective>,
    #[serde(with = "opt_duration", skip_serializing_if = "Option::is_none")]
    pub overdue_after: Option<Duration>,
}

/// Which event of an instance a dimension is read from.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum DimensionSource {
    #[default]
    Start,
    End,
}

/// An extra label taken from an attribute.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Dimension {
    #[serde(deserialize_with = "string_like")]
    pub label: String,
    #[serde(deserialize_with = "string_like")]
    pub attribute: String,
    #[serde(default)]
    pub from: DimensionSource,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub default: Option<String>,
}

/// Network Flow Spans (docs/behaviour.md §8): traffic counters from spans of the Flow Span convention.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct NetworkFlows {
    pub enabled: bool,
    pub dimensions: Vec<NetworkDimension>,
}

/// A label of the network families: the first of `attribute` present on the span (then
/// on its resource), else `default`.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct NetworkDimension {
    #[serde(deserialize_with = "string_like")]
    pub label: String,
    #[serde(deserialize_with = "string_list")]
    pub attribute: Vec<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub default: Option<String>,
}

impl Default for NetworkFlows {
    fn default() -> Self {
        // Workloads, not pods or addresses: a pod name changes with every rollout.
        let side = |side: &str, what: &str, keys: &[&str]| NetworkDimension {
            label: format!("{side}_{what}"),
            attribute: keys.iter().map(|k| format!("{side}.k8s.{k}")).collect(),
            default: Some("unknown".into()),
        };
        const WORKLOAD: [&str; 5] = [
            "deployment.name",
            "statefulset.name",
            "daemonset.name",
            "cronjob.name",
            "job.name",
        ];
        Self {
            enabled: true,
            dimensions: vec![
                NetworkDimension {
                    label: "transport".into(),
                    attribute: vec!["network.transport".into()],
                    default: Some("unknown".into()),
                },
                side("source", "workload", &WORKLOAD),
                side("source", "namespace", &["namespace.name"]),
                side("destination", "workload", &WORKLOAD),
                side("destination", "namespace", &["namespace.name"]),
            ],
        }
    }
}

#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct Limits {
    pub max_in_flight: u64,
    /// Distinct step names an undeclared flow may use (`too_many_steps` beyond).
    pub max_steps_per_flow: usize,
    pub max_series_per_metric: usize,
    pub max_request_body_bytes: usize,
    #[serde(with = "duration")]
    pub dedup_window: Duration,
    /// `off` (None) or how long a label set may go without a recording before its
    /// series are removed.
    #[serde(with = "off_or_duration")]
    pub series_idle_timeout: Option<Duration>,
    pub max_connections: MaxConnections,
    #[serde(with = "duration")]
    pub idle_timeout: Duration,
    #[serde(with = "duration")]
    pub request_read_timeout: Duration,
    #[serde(with = "byte_size")]
    pub max_buffered_bytes: u64,
    /// Label values taken from client data are cut to at most this many bytes.
    pub max_label_value_bytes: usize,
    /// On the metrics listener: a response (`/metrics`, `/`, `/api/flows`) not written
    /// whole within this closes its connection (slow or stalled readers).
    #[serde(with = "duration")]
    pub response_write_timeout: Duration,
}

/// Connections per OTLP listener: `auto` (a share of the open-file limit) or a number.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum MaxConnections {
    #[default]
    Auto,
    Fixed(usize),
}

impl Serialize for MaxConnections {
    fn serialize<S: serde::Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        match self {
            MaxConnections::Auto => s.serialize_str("auto"),
            MaxConnections::Fixed(n) => s.serialize_u64(*n as u64),
        }
    }
}

impl<'de> Deserialize<'de> for MaxConnections {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        let raw = string_like(d)?;
        let raw = raw.trim();
        if raw.eq_ignore_ascii_case("auto") {
            return Ok(MaxConnections::Auto);
        }
        raw.parse::<usize>()
            .map(MaxConnections::Fixed)
            .map_err(|_| serde::de::Error::custom(format!("{raw:?} is not `auto` or a number")))
    }
}

impl Default for Limits {
    fn default() -> Self {
        Self {
            max_in_flight: 1_000_000,
            max_steps_per_flow: 32,
            max_series_per_metric: 10_000,
            max_request_body_bytes: 64 * 1024 * 1024,
            dedup_window: Duration::from_secs(300),
            series_idle_timeout: None,
            max_connections: MaxConnections::Auto,
            idle_timeout: Duration::from_secs(60),
            request_read_timeout: Duration::from_secs(30),
            max_buffered_bytes: 512 * 1024 * 1024,
            max_label_value_bytes: 256,
            response_write_timeout: Duration::from_secs(30),
        }
    }
}

/// The state file that carries open instances across a restart (docs/behaviour.md §3).
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct State {
    /// Empty: no state file.
    #[serde(deserialize_with = "string_like")]
    pub path: String,
    #[serde(with = "duration")]
    pub checkpoint_interval: Duration,
}

impl Default for State {
    fn default() -> Self {
        Self {
            path: String::new(),
            checkpoint_interval: Duration::from_secs(30),
        }
    }
}

/// What happens between a stop signal and exit (docs/behaviour.md §7).
#[derive(Debug, Clone, Default, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct Shutdown {
    /// `/metrics` keeps answering this long after the state is written.
    #[serde(with = "duration")]
    pub final_scrape_wait: Duration,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum LogFormat {
    #[default]
    Text,
    Json,
}

#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct Log {
    #[serde(deserialize_with = "string_like")]
    pub level: String,
    pub format: LogFormat,
}

impl Default for Log {
    fn default() -> Self {
        Self {
            level: "info".into(),
            format: LogFormat::Text,
        }
    }
}

/// Upper bounds of the limits: beyond them a value is a typo, or would overflow (a
/// deadline past what `Instant` holds, a gRPC length prefix past 32 bits).
const MAX_BODY_LIMIT: usize = 2 * 1024 * 1024 * 1024;
const MAX_BUFFERED_LIMIT: u64 = 1024 * 1024 * 1024 * 1024;
const MAX_CONNECTIONS_LIMIT: usize = 1_000_000;
const MAX_DURATION: Duration = Duration::from_secs(365 * 24 * 3600);
/// Distinct steps of one flow: a journey, not a label value dump.
const MAX_STEPS_LIMIT: usize = 1024;

/// A configuration error, naming the key and where its value came from.
#[derive(Debug)]
pub struct ConfigError(String);

impl fmt::Display for ConfigError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0)
    }
}

impl std::error::Error for ConfigError {}

impl Config {
    /// Loads defaults, then `file` (if any), then the given environment variables.
    /// `env` is passed in (rather than read here) so tests can layer their own.
    pub fn load(
        file: Option<&Path>,
        env: impl IntoIterator<Item = (String, String)>,
    ) -> Result<Config, ConfigError> {
        let mut figment = Figment::from(Serialized::defaults(Config::default()));
        if let Some(path) = file {
            check_config_file(path)
                .map_err(|e| ConfigError(format!("config file {}: {e}", path.display())))?;
            figment = figment.merge(Yaml::file_exact(path));
        }
        let env_vars: Vec<(String, String)> = env
            .into_iter()
            .filter(|(k, _)| k.starts_with(ENV_PREFIX) && k != CONFIG_ENV)
            .collect();
        figment = figment.merge(EnvVars(env_vars));
        let config: Config = figment
            .extract()
            .map_err(|e| ConfigError(describe_figment_error(e, &figment)))?;
        config.validate(&figment)?;
        Ok(config)
    }

    /// Loads from the process environment: `--config`, else `FLOWMETRICS_CONFIG`.
    pub fn from_process_env(file: Option<&Path>) -> Result<Config, ConfigError> {
        let env: Vec<(String, String)> = std::env::vars().collect();
        let from_env = env
            .iter()
            .find(|(k, _)| k == CONFIG_ENV)
            .map(|(_, v)| std::path::PathBuf::from(v));
        let file = file.map(Path::to_path_buf).or(from_env);
        Config::load(file.as_deref(), env)
    }

    fn validate(&self, figment: &Figment) -> Result<(), ConfigError> {
        // `key` in the notation of every config error: `a.b`, `list[0].c`, `map["x.y"]`.
        let fail = |key: &str, msg: String| -> Result<(), ConfigError> {
            let path = parse_key(key);
            let source = source_of(figment, &path);
            Err(ConfigError(format!(
                "{} {source}: {msg}",
                render_key(&path)
            )))
        };
        for (key, value) in [
            ("listen.otlp_http", &self.listen.otlp_http),
            ("listen.otlp_grpc", &self.listen.otlp_grpc),
            ("listen.metrics", &self.listen.metrics),
        ] {
            if !value.is_empty() && value.parse::<SocketAddr>().is_err() {
                fail(key, format!("{value:?} is not an address like 127.0.0.1:4318, a port, or \"\" to disable"))?;
            }
        }
        let redis = &self.correlation.redis;
        let not_a_url = |url: &str| {
            if url.ends_with("#insecure") {
                format!(
                    "{url:?}: certificate checks cannot be turned off; set \
                     correlation.redis.ca_file to the CA that signed the server's"
                )
            } else {
                format!("{url:?} is not a redis:// or rediss:// (TLS) URL")
            }
        };
        // `#insecure` (no certificate check) needs a redis-rs feature left out on purpose.
        let is_url = |url: &str| {
            (url.starts_with("redis://") || url.starts_with("rediss://"))
                && !url.ends_with("#insecure")
        };
        let nodes = redis.cluster_nodes();
        if self.correlation.store == StoreKind::Redis {
            if nodes.is_empty() {
                if !is_url(&redis.url) {
                    fail("correlation.redis.url", not_a_url(&redis.url))?;
                }
            } else if redis.cluster.is_empty() {
                // Nodes listed in `url`.
                for (i, url) in nodes.iter().enumerate() {
                    if !is_url(url) {
                        fail(&format!("correlation.redis.url[{i}]"), not_a_url(url))?;
                    }
                }
            } else {
                if redis.url != DEFAULT_REDIS_URL {
                    fail(
                        "correlation.redis.cluster",
                        "set correlation.redis.url (one server) or correlation.redis.cluster \
                         (a cluster's nodes), not both"
                            .into(),
                    )?;
                }
                for (i, url) in redis.cluster.iter().enumerate() {
                    if !is_url(url) {
                        fail(&format!("correlation.redis.cluster[{i}]"), not_a_url(url))?;
                    }
                }
            }
            // The shards' hash tags follow the prefix: a brace in it would become the
            // tag of every key, and put them all in one slot.
            if !nodes.is_empty() && redis.key_prefix.contains(['{', '}']) {
                fail(
                    "correlation.redis.key_prefix",
                    "must not contain { or } with a cluster".into(),
                )?;
            }
            let tls = if nodes.is_empty() {
                redis.url.starts_with("rediss://")
            } else {
                nodes.iter().any(|u| u.starts_with("rediss://"))
            };
            if !redis.ca_file.is_empty() && !tls {
                fail(
                    "correlation.redis.ca_file",
                    "is only used with rediss:// (TLS) URLs".into(),
                )?;
            }
        }
        if redis.shards.is_some_and(|n| !(1..=1024).contains(&n)) {
            fail("correlation.redis.shards", "must be 1 to 1024".into())?;
        }
        if redis.pool_size == 0 {
            fail("correlation.redis.pool_size", "must be at least 1".into())?;
        }
        if self.listen.metrics.is_empty() {
            fail(
                "listen.metrics",
                "the metrics listener cannot be disabled".into(),
            )?;
        }
        if self
            .limits
            .series_idle_timeout
            .is_some_and(|t| t < Duration::from_secs(1))
        {
            fail(
                "limits.series_idle_timeout",
                "must be off or at least 1s".into(),
            )?;
        }
        for (key, value) in [
            ("events.prefix", &self.events.prefix),
            ("events.start_suffix", &self.events.start_suffix),
            ("events.end_suffix", &self.events.end_suffix),
            ("events.step_suffix", &self.events.step_suffix),
            ("events.outcome_key", &self.events.outcome_key),
            ("events.step_key", &self.events.step_key),
        ] {
            if value.is_empty() {
                fail(key, "must not be empty".into())?;
            }
        }
        if self.events.start_suffix == self.events.end_suffix {
            fail(
                "events.end_suffix",
                "must differ from events.start_suffix".into(),
            )?;
        }
        if [&self.events.start_suffix, &self.events.end_suffix].contains(&&self.events.step_suffix)
        {
            fail(
                "events.step_suffix",
                "must differ from events.start_suffix and events.end_suffix".into(),
            )?;
        }
        if self.events.correlation_keys.is_empty()
            || self.events.correlation_keys.iter().any(String::is_empty)
        {
            fail(
                "events.correlation_keys",
                "needs at least one non-empty key".into(),
            )?;
        }
        if self.events.max_correlation_id_bytes == 0 {
            fail(
                "events.max_correlation_id_bytes",
                "must be at least 1".into(),
            )?;
        }
        check_flow_settings(
            "flows.default",
            Some(self.flows.default.timeout),
            Some(&self.flows.default.buckets),
        )
        .or_else(|(k, m)| fail(&k, m))?;
        let default = &self.flows.default;
        check_native_settings(
            "flows.default",
            Some(default.native_bucket_factor),
            Some(default.native_max_buckets),
        )
        .or_else(|(k, m)| fail(&k, m))?;
        objectives::check(
            "flows.default",
            self.flows.default.objective.as_ref(),
            self.flows.default.overdue_after,
        )
        .or_else(|(k, m)| fail(&k, m))?;
        for (name, over) in &self.flows.per_flow {
            let flow_key = render_key(&[
                KeySeg::Key("flows".into()),
                KeySeg::Key("per_flow".into()),
                KeySeg::Key(name.clone()),
            ]);
            if !is_valid_flow_name(name) {
                fail(
                    &flow_key,
                    "flow names are 1-128 characters of [A-Za-z0-9_.:-]".into(),
                )?;
            }
            check_flow_settings(&flow_key, over.timeout, over.buckets.as_ref())
                .or_else(|(k, m)| fail(&k, m))?;
            check_native_settings(
                &flow_key,
                over.native_bucket_factor,
                over.native_max_buckets,
            )
            .or_else(|(k, m)| fail(&k, m))?;
            if let Some(steps) = &over.steps {
                check_declared_steps(name, steps).or_else(|(k, m)| fail(&k, m))?;
            }
            objectives::check(&flow_key, over.objective.as_ref(), over.overdue_after)
                .or_else(|(k, m)| fail(&k, m))?;
        }
        if !self.flows.allow_unknown && self.flows.per_flow.is_empty() {
            fail(
                "flows.allow_unknown",
                "is false but flows.per_flow names no flow, so nothing would be tracked".into(),
            )?;
        }
        self.validate_dimensions().or_else(|(k, m)| fail(&k, m))?;
        if self.state.checkpoint_interval.is_zero() {
            fail("state.checkpoint_interval", "must be longer than 0s".into())?;
        }
        self.validate_network_dimensions()
            .or_else(|(k, m)| fail(&k, m))?;
        if self.limits.max_in_flight == 0 {
            fail("limits.max_in_flight", "must be at least 1".into())?;
        }
        if !(1..=MAX_STEPS_LIMIT).contains(&self.limits.max_steps_per_flow) {
            fail(
                "limits.max_steps_per_flow",
                format!("must be between 1 and {MAX_STEPS_LIMIT}"),
            )?;
        }
        if self.limits.max_series_per_metric == 0 {
            fail("limits.max_series_per_metric", "must be at least 1".into())?;
        }
        if self.limits.max_label_value_bytes == 0 {
            fail("limits.max_label_value_bytes", "must be at least 1".into())?;
        }
        let limits = &self.limits;
        if !(1024..=MAX_BODY_LIMIT).contains(&limits.max_request_body_bytes) {
            fail(
                "limits.max_request_body_bytes",
                format!("must be between 1024 and {MAX_BODY_LIMIT} (2 GiB)"),
            )?;
        }
        if limits.max_buffered_bytes < limits.max_request_body_bytes as u64
            || limits.max_buffered_bytes > MAX_BUFFERED_LIMIT
        {
            fail(
                "limits.max_buffered_bytes",
                format!(
                    "must be between limits.max_request_body_bytes ({}) and {MAX_BUFFERED_LIMIT} (1 TiB): \
                     a body that fits no budget could never be read",
                    limits.max_request_body_bytes
                ),
            )?;
        }
        if let MaxConnections::Fixed(n) = limits.max_connections {
            if !(1..=MAX_CONNECTIONS_LIMIT).contains(&n) {
                fail(
                    "limits.max_connections",
                    format!("must be `auto` or between 1 and {MAX_CONNECTIONS_LIMIT}"),
                )?;
            }
        }
        for (key, value, min) in [
            (
                "limits.idle_timeout",
                limits.idle_timeout,
                Duration::from_millis(100),
            ),
            (
                "limits.request_read_timeout",
                limits.request_read_timeout,
                Duration::from_millis(100),
            ),
            (
                "limits.response_write_timeout",
                limits.response_write_timeout,
                Duration::from_millis(100),
            ),
            ("limits.dedup_window", limits.dedup_window, Duration::ZERO),
        ] {
            if value < min || value > MAX_DURATION {
                fail(
                    key,
                    format!(
                        "must be between {} and 365d",
                        humantime::format_duration(min)
                    ),
                )?;
            }
        }
        if let Err(e) = check_log_filter(&self.log.level) {
            fail("log.level", e.to_string())?;
        }
        Ok(())
    }

    fn validate_dimensions(&self) -> Result<(), (String, String)> {
        let labels = self.dimensions.iter().map(|d| d.label.as_str());
        check_dimension_labels("dimensions", labels, &RESERVED_LABELS)?;
        for (i, dim) in self.dimensions.iter().enumerate() {
            if dim.attribute.is_empty() {
                return Err((
                    format!("dimensions[{i}].attribute"),
                    "must not be empty".into(),
                ));
            }
        }
        Ok(())
    }

    fn validate_network_dimensions(&self) -> Result<(), (String, String)> {
        // The network families' own label, and every label the flow families reserve:
        // the overview page lists network rows beside flow rows, and a `flow` or
        // `outcome` dimension there would read as a flow that does not exist.
        let reserved: Vec<&str> = std::iter::once("direction")
            .chain(RESERVED_LABELS)
            .collect();
        let dims = &self.network_flows.dimensions;
        let labels = dims.iter().map(|d| d.label.as_str());
        check_dimension_labels("network_flows.dimensions", labels, &reserved)?;
        for (i, dim) in dims.iter().enumerate() {
            if dim.attribute.is_empty() || dim.attribute.iter().any(String::is_empty) {
                return Err((
                    format!("network_flows.dimensions[{i}].attribute"),
                    "needs at least one non-empty attribute".into(),
                ));
            }
        }
        Ok(())
    }

    /// The settings that apply to `flow`, falling back to `flows.default`.
    pub fn timeout_for(&self, flow: &str) -> Duration {
        self.flows
            .per_flow
            .get(flow)
            .and_then(|o| o.timeout)
            .unwrap_or(self.flows.default.timeout)
    }

    /// The effective configuration as YAML (for `check-config`).
    pub fn to_yaml(&self) -> String {
        serde_yaml::to_string(self).unwrap_or_else(|e| format!("# cannot render: {e}\n"))
    }
}

/// The labels of a dimension list (`list[i].label`), once sanitised: not empty, not one of
/// `reserved` or `__`-prefixed, and distinct.
fn check_dimension_labels<'a>(
    list: &str,
    labels: impl Iterator<Item = &'a str>,
    reserved: &[&str],
) -> Result<(), (String, String)> {
    let mut seen = std::collections::HashSet::new();
    for (i, raw) in labels.enumerate() {
        let key = format!("{list}[{i}].label");
        let label = sanitize_label_name(raw);
        if label.is_empty() {
            return Err((key, "must not be empty".into()));
        }
        if reserved.contains(&label.as_str()) || label.starts_with("__") {
            return Err((
                key,
                format!("{label:?} is reserved by flowmetrics' own labels"),
            ));
        }
        if !seen.insert(label.clone()) {
            return Err((
                key,
                format!("{label:?} is used by another dimension (after sanitising)"),
            ));
        }
    }
    Ok(())
}

/// A declared step list: names by the flow-name rules (1–64 characters), each once, at
/// most `MAX_STEPS_LIMIT`.
fn check_declared_steps(flow: &str, steps: &[String]) -> Result<(), (String, String)> {
    let key = |i: Option<usize>| {
        let mut path = vec![
            KeySeg::Key("flows".into()),
            KeySeg::Key("per_flow".into()),
            KeySeg::Key(flow.into()),
            KeySeg::Key("steps".into()),
        ];
        path.extend(i.map(KeySeg::Index));
        render_key(&path)
    };
    if steps.is_empty() {
        return Err((
            key(None),
            "needs at least one step (or leave it out)".into(),
        ));
    }
    if steps.len() > MAX_STEPS_LIMIT {
        return Err((key(None), format!("at most {MAX_STEPS_LIMIT} steps")));
    }
    for (i, step) in steps.iter().enumerate() {
        if !is_valid_step_name(step) {
            return Err((
                key(Some(i)),
                format!("{step:?}: step names are 1-64 characters of [A-Za-z0-9_.:-]"),
            ));
        }
        if steps[..i].contains(step) {
            return Err((key(Some(i)), format!("{step:?} is listed twice")));
        }
    }
    Ok(())
}

fn check_flow_settings(
    key: &str,
    timeout: Option<Duration>,
    buckets: Option<&Vec<f64>>,
) -> Result<(), (String, String)> {
    if timeout.is_some_and(|t| t.is_zero()) {
        return Err((format!("{key}.timeout"), "must be longer than 0s".into()));
    }
    if timeout.is_some_and(|t| t > MAX_DURATION) {
        return Err((format!("{key}.timeout"), "must be at most 365d".into()));
    }
    if let Some(buckets) = buckets {
        if buckets.is_empty() {
            return Err((format!("{key}.buckets"), "needs at least one bucket".into()));
        }
        if buckets.iter().any(|b| !b.is_finite() || *b <= 0.0) {
            return Err((
                format!("{key}.buckets"),
                "bucket bounds are finite seconds above 0".into(),
            ));
        }
        if buckets.windows(2).any(|w| w[0] >= w[1]) {
            return Err((
                format!("{key}.buckets"),
                "bucket bounds must be strictly increasing".into(),
            ));
        }
    }
    Ok(())
}

/// Native histogram settings: a factor above 1 (1.1 is client_golang's default) and a
/// bucket limit of at least 1 (0 would mean unbounded to the client library).
fn check_native_settings(
    key: &str,
    factor: Option<f64>,
    max_buckets: Option<u32>,
) -> Result<(), (String, String)> {
    if factor.is_some_and(|f| !f.is_finite() || f <= 1.0) {
        return Err((
            format!("{key}.native_bucket_factor"),
            "must be a number greater than 1 (e.g. 1.1)".into(),
        ));
    }
    if max_buckets == Some(0) {
        return Err((
            format!("{key}.native_max_buckets"),
            "must be at least 1".into(),
        ));
    }
    Ok(())
}

/// Every problem at once, each as "KEY SOURCE: what is wrong", e.g.
/// `flows.default.timeout from environment variable FLOWMETRICS_FLOWS__DEFAULT__TIMEOUT:
/// "soon" is not a duration (…)` or `dimensions[0].labl in config file fm.yaml: unknown
/// key; expected one of: label, attribute, from, default`.
fn describe_figment_error(err: figment::Error, figment: &Figment) -> String {
    err.into_iter()
        .map(|e| {
            let mut path = key_path(figment, &e.path);
            let source = match &e.metadata {
                Some(m) => describe_source(m, &path),
                None => source_of(figment, &path),
            };
            let message = match &e.kind {
                figment::error::Kind::MissingField(field) => {
                    path.push(KeySeg::Key(field.to_string()));
                    "is required".to_string()
                }
                kind => describe_kind(kind),
            };
            if path.is_empty() {
                // Nothing was read: the file itself is the problem (YAML syntax).
                let file = e
                    .metadata
                    .as_ref()
                    .and_then(|m| m.source.as_ref())
                    .and_then(figment::Source::file_path);
                return match file {
                    Some(p) => format!("config file {}: not valid YAML: {message}", p.display()),
                    None => format!("configuration {source}: {message}"),
                };
            }
            format!("{} {source}: {message}", render_key(&path))
        })
        .collect::<Vec<_>>()
        .join("; ")
}

/// What went wrong, in words, without serde's backticks.
fn describe_kind(kind: &figment::error::Kind) -> String {
    use figment::error::Kind;
    match kind {
        Kind::Message(m) => m.clone(),
        Kind::InvalidType(actual, expected) | Kind::InvalidValue(actual, expected) => {
            format!(
                "{} is not {}",
                describe_actual(actual),
                describe_expected(expected)
            )
        }
        Kind::InvalidLength(n, expected) => format!("has {n} items, expected {expected}"),
        Kind::UnknownVariant(found, expected) => {
            format!("{found:?} is not one of: {}", expected.join(", "))
        }
        Kind::UnknownField(_, &[]) => "unknown key".into(),
        Kind::UnknownField(_, expected) => {
            format!("unknown key; expected one of: {}", expected.join(", "))
        }
        Kind::MissingField(field) => format!("{field} is required"),
        Kind::DuplicateField(field) => format!("{field} is given twice"),
        Kind::ISizeOutOfRange(_) | Kind::USizeOutOfRange(_) => "is out of range".into(),
        Kind::Unsupported(actual) => format!("{} is not supported here", describe_actual(actual)),
        Kind::UnsupportedKey(actual, _) => {
            format!("{} cannot be a key", describe_actual(actual))
        }
    }
}

fn describe_actual(actual: &figment::error::Actual) -> String {
    use figment::error::Actual;
    match actual {
        Actual::Bool(b) => b.to_string(),
        Actual::Unsigned(n) => n.to_string(),
        Actual::Signed(n) => n.to_string(),
        Actual::Float(f) => f.to_string(),
        Actual::Char(c) => format!("{:?}", c.to_string()),
        Actual::Str(s) => format!("{s:?}"),
        Actual::Bytes(_) => "a byte string".into(),
        Actual::Unit | Actual::Option => "an empty value".into(),
        Actual::Seq => "a list".into(),
        Actual::Map => "a mapping".into(),
        Actual::Other(o) => o.clone(),
        _ => "this value".into(),
    }
}

/// serde's "expected" (a Rust type name, often) as a reader would put it.
fn describe_expected(expected: &str) -> String {
    let e = expected.trim_matches('`');
    match e {
        "f32" | "f64" => "a number".into(),
        "u8" | "u16" | "u32" | "u64" | "u128" | "usize" => "a whole number (0 or more)".into(),
        "i8" | "i16" | "i32" | "i64" | "i128" | "isize" => "a whole number".into(),
        "bool" | "a boolean" => "true or false".into(),
        "a string" | "string" | "a borrowed string" => "a string".into(),
        "a sequence" => "a list".into(),
        "a map" => "a mapping".into(),
        _ if e.starts_with("struct ") || e.starts_with("a map") => "a mapping (nested keys)".into(),
        _ if e.starts_with("enum ") => "one of the allowed values".into(),
        _ => e.replace('`', ""),
    }
}

/// One step of a config key: a mapping key or a list index.
#[derive(Debug, Clone, PartialEq)]
enum KeySeg {
    Key(String),
    Index(usize),
}

/// `a.b`, `list[0].c`, and `map["x.y"]` for keys that are not plain words (flow names
/// may hold dots and colons).
fn render_key(path: &[KeySeg]) -> String {
    let mut out = String::new();
    for seg in path {
        match seg {
            KeySeg::Index(i) => {
                let _ = fmt::Write::write_fmt(&mut out, format_args!("[{i}]"));
            }
            KeySeg::Key(k)
                if !k.is_empty()
                    && k.chars()
                        .all(|c| c.is_ascii_alphanumeric() || c == '_' || c == '-') =>
            {
                if !out.is_empty() {
                    out.push('.');
                }
                out.push_str(k);
            }
            KeySeg::Key(k) => {
                let _ = fmt::Write::write_fmt(&mut out, format_args!("[{k:?}]"));
            }
        }
    }
    out
}

/// The inverse of [`render_key`], for the keys validation names.
fn parse_key(key: &str) -> Vec<KeySeg> {
    let mut path = Vec::new();
    let mut rest = key;
    while !rest.is_empty() {
        if let Some(after) = rest.strip_prefix("[\"") {
            // A quoted key: up to the closing `"]` (flow names hold no quotes).
            let end = after.find("\"]").unwrap_or(after.len());
            path.push(KeySeg::Key(after[..end].to_string()));
            rest = after.get(end + 2..).unwrap_or("");
        } else if let Some(after) = rest.strip_prefix('[') {
            let end = after.find(']').unwrap_or(after.len());
            match after[..end].parse() {
                Ok(i) => path.push(KeySeg::Index(i)),
                Err(_) => path.push(KeySeg::Key(after[..end].to_string())),
            }
            rest = after.get(end + 1..).unwrap_or("");
        } else {
            let rest_trimmed = rest.strip_prefix('.').unwrap_or(rest);
            let end = rest_trimmed.find(['.', '[']).unwrap_or(rest_trimmed.len());
            path.push(KeySeg::Key(rest_trimmed[..end].to_string()));
            rest = &rest_trimmed[end..];
        }
    }
    path
}

/// figment's error path (all strings) with list indices told apart from mapping keys by
/// looking at the merged value.
fn key_path(figment: &Figment, raw: &[String]) -> Vec<KeySeg> {
    let mut value = raw.first().and_then(|first| figment.find_value(first).ok());
    let mut path = Vec::new();
    for (i, seg) in raw.iter().enumerate() {
        let is_index =
            i > 0 && matches!(value, Some(Value::Array(..))) && seg.parse::<usize>().is_ok();
        if i > 0 {
            value = match (value, is_index) {
                (Some(Value::Array(_, items)), true) => seg
                    .parse::<usize>()
                    .ok()
                    .and_then(|n| items.into_iter().nth(n)),
                (Some(Value::Dict(_, mut dict)), false) => dict.remove(seg),
                _ => None,
            };
        }
        path.push(if is_index {
            KeySeg::Index(seg.parse().expect("checked"))
        } else {
            KeySeg::Key(seg.clone())
        });
    }
    path
}

/// Where the value at `path` came from: the deepest value along the path that the
/// merged configuration holds (a list element reports its list's source).
fn source_of(figment: &Figment, path: &[KeySeg]) -> String {
    let Some(KeySeg::Key(first)) = path.first() else {
        return "in the built-in defaults".into();
    };
    let Ok(mut value) = figment.find_value(first) else {
        return "in the built-in defaults".into();
    };
    let mut tag = value.tag();
    for seg in &path[1..] {
        let next = match (value, seg) {
            (Value::Dict(_, mut dict), KeySeg::Key(k)) => dict.remove(k),
            (Value::Array(_, items), KeySeg::Index(i)) => items.into_iter().nth(*i),
            _ => None,
        };
        match next {
            Some(v) => {
                tag = v.tag();
                value = v;
            }
            None => break,
        }
    }
    match figment.get_metadata(tag) {
        Some(m) => describe_source(m, path),
        None => "in the built-in defaults".into(),
    }
}

/// "in config file PATH", "from environment variable NAME" or "in the built-in defaults".
fn describe_source(m: &figment::Metadata, path: &[KeySeg]) -> String {
    match &m.source {
        Some(figment::Source::File(p)) => format!("in config file {}", p.display()),
        Some(_) => "in the built-in defaults".into(),
        None => {
            let keys: Vec<String> = path
                .iter()
                .map(|s| match s {
                    KeySeg::Key(k) => k.clone(),
                    KeySeg::Index(i) => i.to_string(),
                })
                .collect();
            let keys: Vec<&str> = keys.iter().map(String::as_str).collect();
            format!(
                "from {} {}",
                m.name,
                m.interpolate(&figment::Profile::Default, &keys)
            )
        }
    }
}

/// `FLOWMETRICS_*` variables as a figment provider. Values are type-sniffed as figment's
/// own `Env` does (so `9464` arrives as a number); errors name the variable.
struct EnvVars(Vec<(String, String)>);

impl figment::Provider for EnvVars {
    fn metadata(&self) -> figment::Metadata {
        figment::Metadata::named("environment variable").interpolater(|_, keys| {
            let upper: Vec<String> = keys.iter().map(|k| k.to_ascii_uppercase()).collect();
            format!("{ENV_PREFIX}{}", upper.join("__"))
        })
    }

    fn data(&self) -> Result<figment::value::Map<figment::Profile, Dict>, figment::Error> {
        let mut root = Dict::new();
        for (name, raw) in &self.0 {
            let path: Vec<String> = name[ENV_PREFIX.len()..]
                .to_ascii_lowercase()
                .split("__")
                .map(str::to_string)
                .collect();
            if path.iter().any(String::is_empty) {
                continue;
            }
            let value: Value = raw.parse().unwrap_or_else(|_| Value::from(raw.clone()));
            insert_nested(&mut root, &path, value);
        }
        Ok(figment::Profile::Default.collect(root))
    }
}

fn insert_nested(dict: &mut Dict, path: &[String], value: Value) {
    match path {
        [] => {}
        [last] => {
            dict.insert(last.clone(), value);
        }
        [head, rest @ ..] => {
            let child = dict
                .entry(head.clone())
                .or_insert_with(|| Value::from(Dict::new()));
            if child.as_dict().is_none() {
                *child = Value::from(Dict::new());
            }
            if let Value::Dict(_, inner) = child {
                insert_nested(inner, rest, value);
            }
        }
    }
}

/// Accepts `host:port`, a bare port (`9464`, number or string: figment sniffs env values
/// into numbers) meaning 127.0.0.1:port, `:port` meaning all interfaces, or "" (disabled).
fn listen_addr<'de, D: Deserializer<'de>>(d: D) -> Result<String, D::Error> {
    let raw = string_like(d)?;
    let trimmed = raw.trim();
    if trimmed.is_empty() {
        return Ok(String::new());
    }
    if let Ok(port) = trimmed.parse::<u16>() {
        return Ok(format!("127.0.0.1:{port}"));
    }
    if let Some(port) = trimmed.strip_prefix(':') {
        if let Ok(port) = port.parse::<u16>() {
            return Ok(format!("0.0.0.0:{port}"));
        }
    }
    if trimmed.parse::<SocketAddr>().is_err() {
        return Err(serde::de::Error::custom(format!(
            "{trimmed:?} is not an address like 127.0.0.1:4318, a port, or \"\" to disable"
        )));
    }
    Ok(trimmed.to_string())
}

/// A string that figment may have sniffed into a number or bool (env values).
fn string_like<'de, D: Deserializer<'de>>(d: D) -> Result<String, D::Error> {
    #[derive(Deserialize)]
    #[serde(untagged)]
    enum Raw {
        S(String),
        I(i64),
        U(u64),
        F(f64),
        B(bool),
    }
    let raw =
        Raw::deserialize(d).map_err(|_: D::Error| serde::de::Error::custom("expected a string"))?;
    Ok(match raw {
        Raw::S(s) => s,
        Raw::I(i) => i.to_string(),
        Raw::U(u) => u.to_string(),
        Raw::F(f) => f.to_string(),
        Raw::B(b) => b.to_string(),
    })
}

fn opt_string_list<'de, D: Deserializer<'de>>(d: D) -> Result<Option<Vec<String>>, D::Error> {
    string_list(d).map(Some)
}

/// A URL, or a list of them (a cluster's nodes), kept comma-separated.
fn url_or_nodes<'de, D: Deserializer<'de>>(d: D) -> Result<String, D::Error> {
    string_list(d)
        .map(|urls| urls.join(","))
        .map_err(|_: D::Error| serde::de::Error::custom("expected a URL or a list of URLs"))
}

fn string_list<'de, D: Deserializer<'de>>(d: D) -> Result<Vec<String>, D::Error> {
    #[derive(Deserialize)]
    #[serde(untagged)]
    enum Item {
        S(String),
        I(i64),
    }
    #[derive(Deserialize)]
    #[serde(untagged)]
    enum Raw {
        List(Vec<Item>),
        One(Item),
    }
    let raw = Raw::deserialize(d)
        .map_err(|_: D::Error| serde::de::Error::custom("expected a list of strings"))?;
    let items = match raw {
        Raw::List(v) => v,
        Raw::One(i) => vec![i],
    };
    Ok(items
        .into_iter()
        .map(|i| match i {
            Item::S(s) => s,
            Item::I(i) => i.to_string(),
        })
        .collect())
}

/// Durations: human-readable strings (`90s`, `5m`), or a plain number of seconds.
mod duration {
    use super::*;

    pub fn serialize<S: serde::Serializer>(d: &Duration, s: S) -> Result<S::Ok, S::Error> {
        s.serialize_str(&humantime::format_duration(*d).to_string())
    }

    pub fn deserialize<'de, D: Deserializer<'de>>(d: D) -> Result<Duration, D::Error> {
        #[derive(Deserialize)]
        #[serde(untagged)]
        enum Raw {
            S(String),
            U(u64),
            F(f64),
        }
        let raw = Raw::deserialize(d).map_err(|_: D::Error| {
            serde::de::Error::custom("expected a duration like 90s, 5m or 1h30m")
        })?;
        match raw {
            Raw::S(s) => humantime::parse_duration(s.trim()).map_err(|e| {
                serde::de::Error::custom(format!(
                    "{s:?} is not a duration ({}); write a number and a unit, like 90s, 5m or 1h30m",
                    duration_problem(&e)
                ))
            }),
            Raw::U(u) => Ok(Duration::from_secs(u)),
            // `try_`: a huge number (1e300) is an error, not a panic.
            Raw::F(f) => Duration::try_from_secs_f64(f)
                .map_err(|_| serde::de::Error::custom(format!("{f} is not a duration"))),
        }
    }
}

/// humantime's error without its character offsets.
fn duration_problem(e: &humantime::DurationError) -> String {
    use humantime::DurationError as E;
    match e {
        E::InvalidCharacter(_) => "unexpected character".into(),
        E::NumberExpected(_) => "a number is missing".into(),
        E::UnknownUnit { unit, .. } => format!("unknown unit {unit:?}"),
        E::NumberOverflow => "too long".into(),
        E::Empty => "empty".into(),
    }
}

/// Byte sizes: a plain number of bytes, or a number with a unit (`512MiB`, `64 MB`, `1g`).
mod byte_size {
    use super::*;

    pub fn serialize<S: serde::Serializer>(n: &u64, s: S) -> Result<S::Ok, S::Error> {
        const MIB: u64 = 1024 * 1024;
        if *n >= MIB && n.is_multiple_of(MIB) {
            s.serialize_str(&format!("{}MiB", n / MIB))
        } else {
            s.serialize_u64(*n)
        }
    }

    pub fn deserialize<'de, D: Deserializer<'de>>(d: D) -> Result<u64, D::Error> {
        let raw = string_like(d)?;
        parse(&raw).ok_or_else(|| {
            serde::de::Error::custom(format!(
                "{raw:?} is not a size like 512MiB, 64MB or a number of bytes"
            ))
        })
    }

    pub fn parse(raw: &str) -> Option<u64> {
        let raw = raw.trim();
        let split = raw.find(|c: char| !c.is_ascii_digit()).unwrap_or(raw.len());
        let (number, unit) = raw.split_at(split);
        let number: u64 = number.parse().ok()?;
        let factor: u64 = match unit.trim().to_ascii_lowercase().as_str() {
            "" | "b" => 1,
            "k" | "kb" => 1000,
            "kib" => 1 << 10,
            "m" | "mb" => 1000 * 1000,
            "mib" => 1 << 20,
            "g" | "gb" => 1000 * 1000 * 1000,
            "gib" => 1 << 30,
            "t" | "tb" => 1000 * 1000 * 1000 * 1000,
            "tib" => 1 << 40,
            _ => return None,
        };
        number.checked_mul(factor)
    }
}

mod opt_duration {
    use super::*;

    pub fn serialize<S: serde::Serializer>(d: &Option<Duration>, s: S) -> Result<S::Ok, S::Error> {
        match d {
            Some(d) => super::duration::serialize(d, s),
            None => s.serialize_none(),
        }
    }

    pub fn deserialize<'de, D: Deserializer<'de>>(d: D) -> Result<Option<Duration>, D::Error> {
        super::duration::deserialize(d).map(Some)
    }
}

/// `off` (also `false`, `none`, `""`) or a duration.
mod off_or_duration {
    use super::*;

    pub fn serialize<S: serde::Serializer>(d: &Option<Duration>, s: S) -> Result<S::Ok, S::Error> {
        match d {
            Some(d) => super::duration::serialize(d, s),
            None => s.serialize_str("off"),
        }
    }

    pub fn deserialize<'de, D: Deserializer<'de>>(d: D) -> Result<Option<Duration>, D::Error> {
        #[derive(Deserialize)]
        #[serde(untagged)]
        enum Raw {
            Off(bool),
            S(String),
            Other(serde_yaml::Value),
        }
        match Raw::deserialize(d)? {
            Raw::Off(false) => Ok(None),
            Raw::Off(true) => Err(serde::de::Error::custom(
                "expected off or a duration like 1h",
            )),
            Raw::S(s) if matches!(s.trim().to_ascii_lowercase().as_str(), "off" | "none" | "") => {
                Ok(None)
            }
            Raw::S(s) => {
                super::duration::deserialize(serde::de::value::StrDeserializer::<D::Error>::new(&s))
                    .map(Some)
            }
            Raw::Other(v) => super::duration::deserialize(v)
                .map(Some)
                .map_err(serde::de::Error::custom),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::io::Write;

    fn env(pairs: &[(&str, &str)]) -> Vec<(String, String)> {
        pairs
            .iter()
            .map(|(k, v)| (k.to_string(), v.to_string()))
            .collect()
    }

    fn yaml_file(text: &str) -> tempfile_lite::TempFile {
        let f = tempfile_lite::TempFile::new("yaml");
        std::fs::File::create(&f.path)
            .unwrap()
            .write_all(text.as_bytes())
            .unwrap();
        f
    }

    /// A tiny self-cleaning temp file, to avoid a dev-dependency for one helper.
    mod tempfile_lite {
        use std::path::PathBuf;
        use std::sync::atomic::{AtomicU32, Ordering};
        static N: AtomicU32 = AtomicU32::new(0);
        pub struct TempFile {
            pub path: PathBuf,
        }
        impl TempFile {
            pub fn new(ext: &str) -> Self {
                let n = N.fetch_add(1, Ordering::Relaxed);
                let path = std::env::temp_dir()
                    .join(format!("flowmetrics-test-{}-{n}.{ext}", std::process::id()));
                Self { path }
            }
        }
        impl Drop for TempFile {
            fn drop(&mut self) {
                let _ = std::fs::remove_file(&self.path);
            }
        }
    }

    #[test]
    fn a_redis_cluster_is_a_list_of_nodes_with_16_shards_by_default() {
        let f = yaml_file(
            "correlation:\n  store: redis\n  redis:\n    cluster: [\"redis://10.0.0.1:6379\", \"redis://10.0.0.2:6379\"]\n",
        );
        let c = Config::load(Some(&f.path), env(&[])).unwrap();
        assert_eq!(c.correlation.redis.cluster.len(), 2);
        assert_eq!(c.correlation.redis.shard_count(), 16);
        let one = Config::load(None, env(&[("FLOWMETRICS_CORRELATION__STORE", "redis")])).unwrap();
        assert_eq!(one.correlation.redis.shard_count(), 1);
        let c = Config::load(
            None,
            env(&[
                ("FLOWMETRICS_CORRELATION__STORE", "redis"),
                (
                    "FLOWMETRICS_CORRELATION__REDIS__CLUSTER",
                    "[redis://a:1, redis://b:2]",
                ),
                ("FLOWMETRICS_CORRELATION__REDIS__SHARDS", "64"),
            ]),
        )
        .unwrap();
        assert_eq!(c.correlation.redis.cluster, ["redis://a:1", "redis://b:2"]);
        assert_eq!(c.correlation.redis.shard_count(), 64);
        let tls = Config::load(
            None,
            env(&[
                ("FLOWMETRICS_CORRELATION__STORE", "redis"),
                ("FLOWMETRICS_CORRELATION__REDIS__URL", "rediss://r:6380/0"),
                ("FLOWMETRICS_CORRELATION__REDIS__CA_FILE", "/etc/ca.pem"),
            ]),
        )
        .unwrap();
        assert_eq!(tls.correlation.redis.ca_file, "/etc/ca.pem");
        // The nodes may also be listed in `url`: a YAML list, or a comma-separated string.
        let f = yaml_file(
            "correlation:\n  store: redis\n  redis:\n    url: [\"redis://10.0.0.1:6379\", \"redis://10.0.0.2:6379\"]\n",
        );
        let c = Config::load(Some(&f.path), env(&[])).unwrap();
        assert_eq!(
            c.correlation.redis.cluster_nodes(),
            ["redis://10.0.0.1:6379", "redis://10.0.0.2:6379"]
        );
        assert_eq!(c.correlation.redis.shard_count(), 16);
        let c = Config::load(
            None,
            env(&[
                ("FLOWMETRICS_CORRELATION__STORE", "redis"),
                (
                    "FLOWMETRICS_CORRELATION__REDIS__URL",
                    "redis://a:1, redis://b:2",
                ),
            ]),
        )
        .unwrap();
        assert_eq!(
            c.correlation.redis.cluster_nodes(),
            ["redis://a:1", "redis://b:2"]
        );
        let bad = Config::load(
            None,
            env(&[
                ("FLOWMETRICS_CORRELATION__STORE", "redis"),
                (
                    "FLOWMETRICS_CORRELATION__REDIS__URL",
                    "[redis://a:1, http://b:2]",
                ),
            ]),
        )
        .unwrap_err()
        .to_string();
        assert!(bad.contains("correlation.redis.url[1]"), "{bad}");
    }

    #[test]
    fn a_bad_redis_cluster_setting_fails_naming_the_key() {
        for (pairs, key) in [
            (
                vec![(
                    "FLOWMETRICS_CORRELATION__REDIS__CLUSTER",
                    "[redis://a:1, http://b:2]",
                )],
                "correlation.redis.cluster[1]",
            ),
            (
                vec![
                    ("FLOWMETRICS_CORRELATION__REDIS__CLUSTER", "[redis://a:1]"),
                    ("FLOWMETRICS_CORRELATION__REDIS__URL", "redis://c:3"),
                ],
                "correlation.redis.cluster",
            ),
            (
                vec![
                    ("FLOWMETRICS_CORRELATION__REDIS__CLUSTER", "[redis://a:1]"),
                    ("FLOWMETRICS_CORRELATION__REDIS__KEY_PREFIX", "fm{x}:"),
                ],
                "correlation.redis.key_prefix",
            ),
            (
                vec![("FLOWMETRICS_CORRELATION__REDIS__SHARDS", "0")],
                "correlation.redis.shards",
            ),
            (
                vec![("FLOWMETRICS_CORRELATION__REDIS__CA_FILE", "/etc/ca.pem")],
                "correlation.redis.ca_file",
            ),
            (
                vec![("FLOWMETRICS_CORRELATION__REDIS__URL", "tcp://a:1")],
                "correlation.redis.url",
            ),
            (
                vec![(
                    "FLOWMETRICS_CORRELATION__REDIS__URL",
                    "rediss://a:1/0#insecure",
                )],
                "correlation.redis.url",
            ),
            (
                vec![("FLOWMETRICS_CORRELATION__REDIS__SHARDS", "1025")],
                "correlation.redis.shards",
            ),
        ] {
            let mut pairs = pairs;
            pairs.push(("FLOWMETRICS_CORRELATION__STORE", "redis"));
            let err = Config::load(None, env(&pairs)).unwrap_err().to_string();
            assert!(err.starts_with(key), "{key}: {err}");
        }
    }

    #[test]
    fn defaults_need_no_file() {
        let c = Config::load(None, env(&[])).unwrap();
        assert_eq!(c.listen.otlp_http, "127.0.0.1:4318");
        assert_eq!(c.listen.metrics, "127.0.0.1:9464");
        assert_eq!(c.flows.default.timeout, Duration::from_secs(300));
        assert_eq!(c.flows.default.buckets.len(), 18);
        assert_eq!(c.limits.max_in_flight, 1_000_000);
        assert_eq!(c.limits.dedup_window, Duration::from_secs(300));
    }

    #[test]
    fn histogram_kinds_and_label_value_bound_are_checked() {
        let f = yaml_file(
            "flows:\n  default: { histogram: native }\n  per_flow:\n    pay: { histogram: both, native_max_buckets: 40 }\nlimits:\n  max_label_value_bytes: 64\n",
        );
        let c = Config::load(Some(&f.path), env(&[])).unwrap();
        assert_eq!(c.flows.default.histogram, HistogramKind::Native);
        assert_eq!(c.flows.default.native_bucket_factor, 1.1);
        assert_eq!(c.flows.per_flow["pay"].histogram, Some(HistogramKind::Both));
        assert_eq!(c.flows.per_flow["pay"].native_max_buckets, Some(40));
        assert_eq!(c.limits.max_label_value_bytes, 64);
        for (yaml, key) in [
            (
                "flows:\n  default: { histogram: sparse }\n",
                "flows.default.histogram",
            ),
            (
                "flows:\n  default: { native_bucket_factor: 1 }\n",
                "flows.default.native_bucket_factor",
            ),
            (
                "flows:\n  per_flow:\n    pay: { native_max_buckets: 0 }\n",
                "flows.per_flow.pay.native_max_buckets",
            ),
            (
                "limits:\n  max_label_value_bytes: 0\n",
                "limits.max_label_value_bytes",
            ),
        ] {
            let f = yaml_file(yaml);
            let err = Config::load(Some(&f.path), env(&[]))
                .unwrap_err()
                .to_string();
            assert!(err.contains(key), "{yaml}: {err}");
        }
    }

    #[test]
    fn env_overrides_file_and_numbers_are_accepted() {
        let f =
            yaml_file("listen:\n  metrics: 127.0.0.1:1000\nflows:\n  default:\n    timeout: 1m\n");
        let c = Config::load(
            Some(&f.path),
            env(&[
                ("FLOWMETRICS_LISTEN__METRICS", "9465"),
                ("FLOWMETRICS_FLOWS__DEFAULT__TIMEOUT", "10s"),
                ("FLOWMETRICS_LISTEN__OTLP_GRPC", ""),
                ("FLOWMETRICS_EVENTS__PREFIX", "biz."),
                ("FLOWMETRICS_CONFIG", "/ignored/by/load"),
                ("OTHER_VAR", "x"),
            ]),
        )
        .unwrap();
        assert_eq!(c.listen.metrics, "127.0.0.1:9465");
        assert_eq!(c.flows.default.timeout, Duration::from_secs(10));
        assert_eq!(c.listen.otlp_grpc, "");
        assert_eq!(c.events.prefix, "biz.");
    }

    #[test]
    fn file_values_apply() {
        let f = yaml_file(
            "events:\n  correlation_keys: [order.id]\nflows:\n  per_flow:\n    order_processing: { timeout: 30m }\nlog: { level: debug, format: json }\n",
        );
        let c = Config::load(Some(&f.path), env(&[])).unwrap();
        assert_eq!(c.events.correlation_keys, vec!["order.id"]);
        assert_eq!(c.timeout_for("order_processing"), Duration::from_secs(1800));
        assert_eq!(c.timeout_for("other"), Duration::from_secs(300));
        assert_eq!(c.log.format, LogFormat::Json);
    }

    #[test]
    fn unknown_keys_fail_naming_key_and_source() {
        let f = yaml_file("listen:\n  metrix: 1.2.3.4:5\n");
        let err = Config::load(Some(&f.path), env(&[]))
            .unwrap_err()
            .to_string();
        assert!(err.contains("metrix"), "{err}");
        assert!(
            err.contains(f.path.file_name().unwrap().to_str().unwrap()),
            "{err}"
        );

        let err = Config::load(None, env(&[("FLOWMETRICS_BOGUS", "1")]))
            .unwrap_err()
            .to_string();
        assert!(err.contains("bogus"), "{err}");
        assert!(err.contains("FLOWMETRICS_"), "{err}");
    }

    #[test]
    fn bad_values_fail_naming_key_and_source() {
        let err = Config::load(
            None,
            env(&[("FLOWMETRICS_FLOWS__DEFAULT__TIMEOUT", "soon")]),
        )
        .unwrap_err()
        .to_string();
        assert!(err.contains("timeout"), "{err}");
        assert!(err.contains("FLOWMETRICS_FLOWS__DEFAULT__TIMEOUT"), "{err}");

        let f = yaml_file("listen:\n  otlp_http: not-an-address\n");
        let err = Config::load(Some(&f.path), env(&[]))
            .unwrap_err()
            .to_string();
        assert!(err.contains("otlp_http"), "{err}");

        let f = yaml_file("flows:\n  default:\n    buckets: [1, 0.5]\n");
        let err = Config::load(Some(&f.path), env(&[]))
            .unwrap_err()
            .to_string();
        assert!(err.contains("flows.default.buckets"), "{err}");
        assert!(
            err.contains(f.path.file_name().unwrap().to_str().unwrap()),
            "{err}"
        );
    }

    #[test]
    fn missing_file_is_an_error() {
        let err = Config::load(Some(Path::new("/nonexistent/fm.yaml")), env(&[]))
            .unwrap_err()
            .to_string();
        assert!(err.contains("/nonexistent/fm.yaml"), "{err}");
    }

    #[test]
    fn dimension_labels_are_sanitised_and_checked() {
        assert_eq!(sanitize_label_name("service.name"), "service_name");
        assert_eq!(sanitize_label_name("1abc"), "_1abc");
        let f = yaml_file("dimensions:\n  - { label: outcome, attribute: x }\n");
        let err = Config::load(Some(&f.path), env(&[]))
            .unwrap_err()
            .to_string();
        assert!(err.contains("reserved"), "{err}");
        let f = yaml_file(
            "dimensions:\n  - { label: a.b, attribute: x }\n  - { label: a_b, attribute: y }\n",
        );
        let err = Config::load(Some(&f.path), env(&[]))
            .unwrap_err()
            .to_string();
        assert!(err.contains("another dimension"), "{err}");
    }

    #[test]
    fn limits_keys_parse_and_are_range_checked() {
        let f = yaml_file(
            "limits:\n  max_connections: 12\n  idle_timeout: 1s\n  request_read_timeout: 2s\n  max_buffered_bytes: 128MiB\n",
        );
        let c = Config::load(Some(&f.path), env(&[])).unwrap();
        assert_eq!(c.limits.max_connections, MaxConnections::Fixed(12));
        assert_eq!(c.limits.idle_timeout, Duration::from_secs(1));
        assert_eq!(c.limits.request_read_timeout, Duration::from_secs(2));
        assert_eq!(c.limits.max_buffered_bytes, 128 << 20);
        let c = Config::load(
            None,
            env(&[
                ("FLOWMETRICS_LIMITS__MAX_CONNECTIONS", "auto"),
                ("FLOWMETRICS_LIMITS__MAX_BUFFERED_BYTES", "100000000"),
            ]),
        )
        .unwrap();
        assert_eq!(c.limits.max_connections, MaxConnections::Auto);
        assert_eq!(c.limits.max_buffered_bytes, 100_000_000);
        assert_eq!(byte_size::parse("64 MB"), Some(64_000_000));
        assert_eq!(byte_size::parse("1g"), Some(1_000_000_000));
        assert_eq!(byte_size::parse("99999999999999999999GiB"), None);
        assert_eq!(byte_size::parse("lots"), None);
        // Renders back as it reads.
        let again = yaml_file(&Config::default().to_yaml());
        assert_eq!(
            Config::load(Some(&again.path), env(&[]))
                .unwrap()
                .limits
                .max_buffered_bytes,
            512 << 20
        );

        for (var, value, key) in [
            // limit + 1 used to wrap to 0: every compressed body decoded to nothing.
            (
                "FLOWMETRICS_LIMITS__MAX_REQUEST_BODY_BYTES",
                "18446744073709551615",
                "limits.max_request_body_bytes",
            ),
            (
                "FLOWMETRICS_LIMITS__MAX_REQUEST_BODY_BYTES",
                "3000000000",
                "limits.max_request_body_bytes",
            ),
            (
                "FLOWMETRICS_LIMITS__MAX_BUFFERED_BYTES",
                "1MiB",
                "limits.max_buffered_bytes",
            ),
            (
                "FLOWMETRICS_LIMITS__MAX_BUFFERED_BYTES",
                "4TiB",
                "limits.max_buffered_bytes",
            ),
            (
                "FLOWMETRICS_LIMITS__MAX_CONNECTIONS",
                "0",
                "limits.max_connections",
            ),
            (
                "FLOWMETRICS_LIMITS__MAX_CONNECTIONS",
                "many",
                "limits.max_connections",
            ),
            (
                "FLOWMETRICS_LIMITS__IDLE_TIMEOUT",
                "0s",
                "limits.idle_timeout",
            ),
            (
                "FLOWMETRICS_LIMITS__REQUEST_READ_TIMEOUT",
                "400d",
                "limits.request_read_timeout",
            ),
            (
                "FLOWMETRICS_LIMITS__RESPONSE_WRITE_TIMEOUT",
                "10ms",
                "limits.response_write_timeout",
            ),
        ] {
            let err = Config::load(None, env(&[(var, value)]))
                .unwrap_err()
                .to_string();
            assert!(err.contains(key), "{var}={value}: {err}");
            assert!(err.contains(var), "{var}={value}: {err}");
        }
    }

    #[test]
    fn huge_durations_are_errors_not_panics() {
        for (text, key) in [
            ("limits:\n  dedup_window: 1e30\n", "dedup_window"),
            ("flows:\n  default:\n    timeout: 1e300\n", "timeout"),
            (
                "flows:\n  default:\n    timeout: 1e12\n",
                "flows.default.timeout",
            ),
            (
                "flows:\n  per_flow:\n    a: { timeout: 100000000000 }\n",
                "flows.per_flow.a.timeout",
            ),
            ("limits:\n  dedup_window: 999999999y\n", "dedup_window"),
        ] {
            let f = yaml_file(text);
            let err = Config::load(Some(&f.path), env(&[]))
                .unwrap_err()
                .to_string();
            assert!(err.contains(key), "{text}: {err}");
            assert!(
                err.contains(f.path.file_name().unwrap().to_str().unwrap()),
                "{text}: {err}"
            );
        }
    }

    #[test]
    fn step_settings_load_and_bad_ones_name_key_and_source() {
        let f = yaml_file(
            "events: { step_suffix: .reached, step_key: stage }\nflows:\n  per_flow:\n    order.v2: { steps: [placed, payment_authorized, shipped] }\nlimits: { max_steps_per_flow: 8 }\n",
        );
        let c = Config::load(Some(&f.path), env(&[])).unwrap();
        assert_eq!(
            (&*c.events.step_suffix, &*c.events.step_key),
            (".reached", "stage")
        );
        assert_eq!(c.limits.max_steps_per_flow, 8);
        assert_eq!(
            c.flows.per_flow["order.v2"].steps.as_deref(),
            Some(
                &[
                    "placed".to_string(),
                    "payment_authorized".into(),
                    "shipped".into()
                ][..]
            )
        );
        let d = Config::default();
        assert_eq!(
            (&*d.events.step_suffix, &*d.events.step_key),
            (".step", "step")
        );
        assert_eq!(d.limits.max_steps_per_flow, 32);
        let long = "s".repeat(65);
        for (text, key) in [
            (
                "flows:\n  per_flow:\n    o: { steps: [a, b, a] }\n".to_string(),
                "flows.per_flow.o.steps[2]",
            ),
            (
                "flows:\n  per_flow:\n    o: { steps: [a, \"b c\"] }\n".into(),
                "flows.per_flow.o.steps[1]",
            ),
            (
                format!("flows:\n  per_flow:\n    o: {{ steps: [{long}] }}\n"),
                "flows.per_flow.o.steps[0]",
            ),
            (
                "flows:\n  per_flow:\n    o: { steps: [] }\n".into(),
                "flows.per_flow.o.steps",
            ),
            (
                "limits: { max_steps_per_flow: 0 }\n".into(),
                "limits.max_steps_per_flow",
            ),
            (
                "events: { step_suffix: .end }\n".into(),
                "events.step_suffix",
            ),
            ("events: { step_key: \"\" }\n".into(), "events.step_key"),
        ] {
            let f = yaml_file(&text);
            let err = Config::load(Some(&f.path), env(&[]))
                .unwrap_err()
                .to_string();
            assert!(err.contains(key), "{text}: {err}");
            assert!(
                err.contains(f.path.file_name().unwrap().to_str().unwrap()),
                "{text}: {err}"
            );
        }
        let err = Config::load(
            None,
            env(&[("FLOWMETRICS_LIMITS__MAX_STEPS_PER_FLOW", "0")]),
        )
        .unwrap_err()
        .to_string();
        assert!(
            err.contains("FLOWMETRICS_LIMITS__MAX_STEPS_PER_FLOW"),
            "{err}"
        );
    }

    #[test]
    fn effective_config_renders_and_reloads() {
        let c = Config::load(None, env(&[])).unwrap();
        let yaml = c.to_yaml();
        assert!(yaml.contains("timeout: 5m"), "{yaml}");
        let f = yaml_file(&yaml);
        let again = Config::load(Some(&f.path), env(&[])).unwrap();
        assert_eq!(again.flows.default.timeout, c.flows.default.timeout);
    }
}
