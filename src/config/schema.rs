//! The configuration's shape: one struct per top-level section, their defaults, and the
//! closed sets of values (store kinds, histogram kinds, log formats). How each value is
//! written (durations, sizes, lists) is in [`super::values`].

use std::collections::BTreeMap;
use std::num::{NonZeroU32, NonZeroUsize};
use std::time::Duration;

use serde::{Deserialize, Deserializer, Serialize};

use super::objectives::Objective;
use super::values::{
    byte_size, duration, listen_addr, nonzero_u32, nonzero_usize, off_or_duration, opt_duration,
    opt_nonzero_u32, opt_string_list, string_like, string_list, url_or_nodes,
};

/// The whole effective configuration.
#[derive(Debug, Clone, Default, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct Config {
    /// `listen`: the OTLP/HTTP, OTLP/gRPC and metrics listener addresses.
    pub listen: ListenSection,
    /// `events`: how flow events are named and which attributes they carry.
    pub events: EventsSection,
    /// `flows`: timeouts, buckets, objectives and steps, for every flow and per flow.
    pub flows: FlowsSection,
    /// `dimensions`: extra labels read from attributes (default: none).
    pub dimensions: Vec<Dimension>,
    /// `limits`: bounds on requests, connections, open instances and series.
    pub limits: LimitsSection,
    /// `state`: the state file that keeps open flows across restarts (default: none).
    pub state: StateSection,
    /// `shutdown`: what happens between a stop signal and exit.
    pub shutdown: ShutdownSection,
    /// `network_flows`: counters from Flow Spans (on by default).
    pub network_flows: NetworkFlowsSection,
    /// `correlation`: where open instances are kept (default: in process).
    pub correlation: CorrelationSection,
    /// `log`: log level and format.
    pub log: LogSection,
}

/// Where open instances live (docs/behaviour.md §3 "several replicas", §5 `correlation`).
#[derive(Debug, Clone, Default, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct CorrelationSection {
    /// `correlation.store`: `memory` (default) or `redis`.
    pub store: StoreKind,
    /// `correlation.redis`: the shared store, used with `store: redis`.
    pub redis: RedisSection,
}

/// `correlation.store`: in process (`memory`, the default) or in Redis (`redis`).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum StoreKind {
    /// moka, in process: one replica.
    #[default]
    Memory,
    /// Redis or Valkey, shared by every replica.
    Redis,
}

/// `correlation.redis`: where the shared store is and how long to wait for it.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct RedisSection {
    /// One server (or one endpoint in front of several, such as a proxy); a list (or a
    /// comma-separated string) of URLs is a Redis Cluster's nodes, as `cluster`. Read
    /// through [`RedisSection::target`].
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
    /// Start of every key (default `flowmetrics:`); replicas of one deployment share it.
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
    #[serde(deserialize_with = "nonzero_usize")]
    pub pool_size: NonZeroUsize,
}

pub(super) const DEFAULT_REDIS_URL: &str = "redis://127.0.0.1:6379/0";

/// What the store connects to, read once from `correlation.redis.url` and `.cluster`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum RedisTarget {
    /// One server (or one endpoint in front of several).
    Server(String),
    /// A Redis Cluster's seed nodes, and the key that listed them.
    Cluster {
        /// Node URLs, any of them (the rest are discovered).
        nodes: Vec<String>,
        /// The key that listed them, for error messages.
        listed_in: NodeList,
    },
}

/// Which key a cluster's nodes were given in.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum NodeList {
    /// `correlation.redis.cluster`.
    Cluster,
    /// `correlation.redis.url`, as a list or a comma-separated string.
    Url,
}

impl RedisSection {
    /// One server, or a cluster's nodes (`cluster`, else a list in `url`). `url` holds a
    /// list comma-separated; this is the one place that reads it.
    pub fn target(&self) -> RedisTarget {
        if !self.cluster.is_empty() {
            return RedisTarget::Cluster {
                nodes: self.cluster.clone(),
                listed_in: NodeList::Cluster,
            };
        }
        if !self.url.contains(',') {
            return RedisTarget::Server(self.url.clone());
        }
        let nodes = self
            .url
            .split(',')
            .map(str::trim)
            .filter(|u| !u.is_empty())
            .map(String::from)
            .collect();
        RedisTarget::Cluster {
            nodes,
            listed_in: NodeList::Url,
        }
    }

    /// `shards`, or its default.
    pub fn shard_count(&self) -> u32 {
        let cluster = matches!(self.target(), RedisTarget::Cluster { .. });
        self.shards.unwrap_or(if cluster { 16 } else { 1 })
    }
}

impl RedisTarget {
    /// Every URL the store connects to.
    pub fn urls(&self) -> &[String] {
        match self {
            RedisTarget::Server(url) => std::slice::from_ref(url),
            RedisTarget::Cluster { nodes, .. } => nodes,
        }
    }
}

impl Default for RedisSection {
    fn default() -> Self {
        Self {
            url: DEFAULT_REDIS_URL.into(),
            cluster: Vec::new(),
            shards: None,
            ca_file: String::new(),
            key_prefix: "flowmetrics:".into(),
            connect_timeout: Duration::from_secs(1),
            command_timeout: Duration::from_secs(2),
            pool_size: NonZeroUsize::new(8).expect("not 0"),
        }
    }
}

/// Listener addresses. An empty string disables that listener.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct ListenSection {
    /// OTLP/HTTP listener (default `127.0.0.1:4318`).
    #[serde(deserialize_with = "listen_addr")]
    pub otlp_http: String,
    /// OTLP/gRPC listener (default `127.0.0.1:4317`).
    #[serde(deserialize_with = "listen_addr")]
    pub otlp_grpc: String,
    /// `/metrics`, `/healthz`, `/readyz`, the overview and `/api/flows` (default `127.0.0.1:9464`); cannot be disabled.
    #[serde(deserialize_with = "listen_addr")]
    pub metrics: String,
}

impl Default for ListenSection {
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
pub struct EventsSection {
    /// Start of every flow event name (default `flow.`).
    #[serde(deserialize_with = "string_like")]
    pub prefix: String,
    /// End of start event names (default `.start`).
    #[serde(deserialize_with = "string_like")]
    pub start_suffix: String,
    /// End of end event names (default `.end`).
    #[serde(deserialize_with = "string_like")]
    pub end_suffix: String,
    /// Step events: `<prefix><flow><step_suffix>` (docs/behaviour.md §9).
    #[serde(deserialize_with = "string_like")]
    pub step_suffix: String,
    /// The attribute of a step event that names its step.
    #[serde(deserialize_with = "string_like")]
    pub step_key: String,
    /// Attribute keys tried in order for the correlation id, each on the event, then the span (or log record), then the resource.
    #[serde(deserialize_with = "string_list")]
    pub correlation_keys: Vec<String>,
    /// Attribute holding an end's outcome (default `outcome`).
    #[serde(deserialize_with = "string_like")]
    pub outcome_key: String,
    /// Longer correlation ids are rejected (`correlation_id_too_long`; default 256).
    #[serde(deserialize_with = "nonzero_usize")]
    pub max_correlation_id_bytes: NonZeroUsize,
}

impl Default for EventsSection {
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
            max_correlation_id_bytes: NonZeroUsize::new(256).expect("not 0"),
        }
    }
}

/// Per-flow settings: the default for every flow, overrides by name.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct FlowsSection {
    /// `flows.default`: what every flow gets unless it has its own.
    pub default: FlowDefaults,
    /// `flows.per_flow.<flow>`: overrides for one flow, by name.
    pub per_flow: BTreeMap<String, FlowOverride>,
    /// `false`: only flows named in `per_flow` are tracked, others are rejected (`unknown_flow`; default `true`).
    pub allow_unknown: bool,
}

impl Default for FlowsSection {
    fn default() -> Self {
        Self {
            default: FlowDefaults::default(),
            per_flow: BTreeMap::new(),
            allow_unknown: true,
        }
    }
}

/// `flows.default`: what every flow gets unless `flows.per_flow` says otherwise.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct FlowDefaults {
    /// How long an instance stays open, and an end waits for its start (default 5m).
    #[serde(with = "duration")]
    pub timeout: Duration,
    /// Classic duration histogram bounds, seconds (default [`DEFAULT_BUCKETS`]).
    pub buckets: Vec<f64>,
    /// Which buckets `flowmetrics_flow_duration_seconds` keeps (docs/behaviour.md §4).
    pub histogram: HistogramKind,
    /// Native buckets: each at most this factor wider than the one before (client_golang's
    /// `NativeHistogramBucketFactor`); the schema is the largest resolution within it.
    pub native_bucket_factor: f64,
    /// Native buckets per series at most; beyond, the resolution halves (0 would mean
    /// unbounded to the client library).
    #[serde(deserialize_with = "nonzero_u32")]
    pub native_max_buckets: NonZeroU32,
    /// docs/behaviour.md §10: what "good" means for every flow without its own, and
    /// when an open instance is overdue.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub objective: Option<Objective>,
    /// Open instances older than this are overdue (default: the objective's `within`).
    #[serde(with = "opt_duration", skip_serializing_if = "Option::is_none")]
    pub overdue_after: Option<Duration>,
}

/// Classic buckets (`buckets`), native (exponential) buckets, or both.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum HistogramKind {
    /// Classic buckets only, from `buckets`.
    #[default]
    Classic,
    /// Native (exponential) buckets only: protobuf exposition only.
    Native,
    /// Classic and native buckets on the same series.
    Both,
}

/// client_golang's default: schema 3, each bucket 2^(1/8) ≈ 1.09 times the one before.
pub const DEFAULT_NATIVE_BUCKET_FACTOR: f64 = 1.1;
/// Native buckets per series at most, unless configured.
pub const DEFAULT_NATIVE_MAX_BUCKETS: u32 = 160;

/// Default duration buckets (seconds): flows run from milliseconds to an hour.
pub const DEFAULT_BUCKETS: [f64; 18] = [
    0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0, 120.0, 300.0, 600.0,
    1800.0, 3600.0,
];

impl Default for FlowDefaults {
    fn default() -> Self {
        Self {
            timeout: Duration::from_secs(300),
            buckets: DEFAULT_BUCKETS.to_vec(),
            histogram: HistogramKind::Classic,
            native_bucket_factor: DEFAULT_NATIVE_BUCKET_FACTOR,
            native_max_buckets: NonZeroU32::new(DEFAULT_NATIVE_MAX_BUCKETS).expect("not 0"),
            objective: None,
            overdue_after: None,
        }
    }
}

/// An override for one flow; unset fields fall back to `flows.default` (the same keys,
/// each optional, plus the flow's `steps`).
#[derive(Debug, Clone, Default, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct FlowOverride {
    /// Overrides `flows.default.timeout`.
    #[serde(with = "opt_duration", skip_serializing_if = "Option::is_none")]
    pub timeout: Option<Duration>,
    /// Overrides `flows.default.buckets`.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub buckets: Option<Vec<f64>>,
    /// Overrides `flows.default.histogram`.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub histogram: Option<HistogramKind>,
    /// Overrides `flows.default.native_bucket_factor`.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub native_bucket_factor: Option<f64>,
    /// Overrides `flows.default.native_max_buckets`.
    #[serde(
        deserialize_with = "opt_nonzero_u32",
        skip_serializing_if = "Option::is_none"
    )]
    pub native_max_buckets: Option<NonZeroU32>,
    /// Overrides `flows.default.objective`.
    pub objective: Option<Objective>,
    /// Overrides `flows.default.overdue_after`.
    #[serde(with = "opt_duration", skip_serializing_if = "Option::is_none")]
    pub overdue_after: Option<Duration>,
    /// The flow's steps, in order: other step names are refused (`unknown_step`), and
    /// every declared step's series exist from the flow's first event.
    #[serde(
        deserialize_with = "opt_string_list",
        skip_serializing_if = "Option::is_none"
    )]
    pub steps: Option<Vec<String>>,
}

/// Which event of an instance a dimension is read from.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum DimensionSource {
    /// Captured when the instance opens; labels every series of the instance.
    #[default]
    Start,
    /// Labels only what an end produces (`completed`, `errors`, `duration`).
    End,
}

/// An extra label taken from an attribute.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Dimension {
    /// The label's name (sanitised to Prometheus rules); must not clash with flowmetrics' own labels.
    #[serde(deserialize_with = "string_like")]
    pub label: String,
    /// The attribute read, on the event, then its span (or log record), then the resource.
    #[serde(deserialize_with = "string_like")]
    pub attribute: String,
    /// Which event of the instance the value is read from (default: the start).
    #[serde(default)]
    pub from: DimensionSource,
    /// The value when the attribute is missing (default: empty).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub default: Option<String>,
}

/// Network Flow Spans (docs/behaviour.md §8): traffic counters from spans of the Flow Span convention.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct NetworkFlowsSection {
    /// `false`: Flow Spans are skipped at no cost (default `true`).
    pub enabled: bool,
    /// The labels of the network families (default: transport, source/destination workload and namespace).
    pub dimensions: Vec<NetworkDimension>,
}

/// A label of the network families: the first of `attribute` present on the span (then
/// on its resource), else `default`.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct NetworkDimension {
    /// The label's name; the flow and network families' own labels are reserved.
    #[serde(deserialize_with = "string_like")]
    pub label: String,
    /// Attributes tried in order; the first one present gives the value.
    #[serde(deserialize_with = "string_list")]
    pub attribute: Vec<String>,
    /// The value when none of the attributes is present (default: empty).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub default: Option<String>,
}

impl Default for NetworkFlowsSection {
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

/// `limits`: what one client, one flow and the whole service may hold.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct LimitsSection {
    /// Open instances plus waiting ends; when full the oldest are evicted (default 1000000).
    pub max_in_flight: u64,
    /// Distinct step names an undeclared flow may use (`too_many_steps` beyond).
    pub max_steps_per_flow: usize,
    /// Label sets per flow family; beyond it one overflow series (default 10000).
    pub max_series_per_metric: usize,
    /// Request size limit, as sent and after decompression; also the gRPC message limit (default 64 MiB).
    pub max_request_body_bytes: usize,
    /// A repeat of an event already handled within this window is a retry and ignored; `0s` disables (default 5m).
    #[serde(with = "duration")]
    pub dedup_window: Duration,
    /// `off` (None) or how long a label set may go without a recording before its
    /// series are removed.
    #[serde(with = "off_or_duration")]
    pub series_idle_timeout: Option<Duration>,
    /// Connections per OTLP listener (default `auto`).
    pub max_connections: MaxConnections,
    /// A connection with no request in flight and no byte moved this long is closed (default 60s).
    #[serde(with = "duration")]
    pub idle_timeout: Duration,
    /// Headers, then the whole body, must arrive within this (default 30s).
    #[serde(with = "duration")]
    pub request_read_timeout: Duration,
    /// All request bodies being read or decoded, both transports together (default 512 MiB).
    #[serde(with = "byte_size")]
    pub max_buffered_bytes: u64,
    /// Label values taken from client data are cut to at most this many bytes.
    #[serde(deserialize_with = "nonzero_usize")]
    pub max_label_value_bytes: NonZeroUsize,
    /// On the metrics listener: a response (`/metrics`, `/`, `/api/flows`) not written
    /// whole within this closes its connection (slow or stalled readers).
    #[serde(with = "duration")]
    pub response_write_timeout: Duration,
}

/// Connections per OTLP listener: `auto` (a share of the open-file limit) or a number.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum MaxConnections {
    /// A share of the open-file limit, so that the metrics listener, the state file and the store keep descriptors.
    #[default]
    Auto,
    /// At most this many.
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

impl Default for LimitsSection {
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
            max_label_value_bytes: NonZeroUsize::new(256).expect("not 0"),
            response_write_timeout: Duration::from_secs(30),
        }
    }
}

/// The state file that carries open instances across a restart (docs/behaviour.md §3).
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct StateSection {
    /// Empty: no state file.
    #[serde(deserialize_with = "string_like")]
    pub path: String,
    /// How often the state file is rewritten while running (default 30s).
    #[serde(with = "duration")]
    pub checkpoint_interval: Duration,
}

impl Default for StateSection {
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
pub struct ShutdownSection {
    /// `/metrics` keeps answering this long after the state is written.
    #[serde(with = "duration")]
    pub final_scrape_wait: Duration,
}

/// `log.format`: how log lines are written to stderr.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum LogFormat {
    /// Human-readable lines, coloured only on a terminal (the default).
    #[default]
    Text,
    /// One JSON object per line.
    Json,
}

/// `log`: the log level (or filter) and format.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct LogSection {
    /// Level or filter (`info,flowmetrics=debug`; default `info`); `RUST_LOG` overrides.
    #[serde(deserialize_with = "string_like")]
    pub level: String,
    /// `text` (default) or `json`.
    pub format: LogFormat,
}

impl Default for LogSection {
    fn default() -> Self {
        Self {
            level: "info".into(),
            format: LogFormat::Text,
        }
    }
}

impl Config {
    /// The value of one `flows.per_flow.<flow>` key, falling back to `flows.default`'s.
    pub(super) fn per_flow_or<T>(
        &self,
        flow: &str,
        own: impl FnOnce(&FlowOverride) -> Option<T>,
        default: Option<T>,
    ) -> Option<T> {
        self.flows.per_flow.get(flow).and_then(own).or(default)
    }

    /// The timeout of `flow`: its own, else `flows.default`'s.
    pub fn timeout_for(&self, flow: &str) -> Duration {
        let default = self.flows.default.timeout;
        self.per_flow_or(flow, |o| o.timeout, Some(default))
            .unwrap_or(default)
    }

    /// The effective configuration as YAML (for `check-config`).
    pub fn to_yaml(&self) -> String {
        serde_yaml::to_string(self).unwrap_or_else(|e| format!("# cannot render: {e}\n"))
    }
}
