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
    pub network_flows: NetworkFlows,
    pub log: Log,
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
}

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

/// Network Flow Spans (SPEC §8): traffic counters from spans of the Flow Span convention.
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
    pub max_series_per_metric: usize,
    pub max_request_body_bytes: usize,
    #[serde(with = "duration")]
    pub dedup_window: Duration,
}

impl Default for Limits {
    fn default() -> Self {
        Self {
            max_in_flight: 1_000_000,
            max_series_per_metric: 10_000,
            max_request_body_bytes: 64 * 1024 * 1024,
            dedup_window: Duration::from_secs(300),
        }
    }
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
            if !path.exists() {
                return Err(ConfigError(format!(
                    "config file {} does not exist",
                    path.display()
                )));
            }
            figment = figment.merge(Yaml::file_exact(path));
        }
        let env_vars: Vec<(String, String)> = env
            .into_iter()
            .filter(|(k, _)| k.starts_with(ENV_PREFIX) && k != CONFIG_ENV)
            .collect();
        figment = figment.merge(EnvVars(env_vars));
        let config: Config = figment
            .extract()
            .map_err(|e| ConfigError(describe_figment_error(e)))?;
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
        let fail = |key: &str, msg: String| -> Result<(), ConfigError> {
            let source = figment
                .find_metadata(key)
                .map(|m| match &m.source {
                    Some(src) => format!("{} ({src})", m.name),
                    None => m.name.to_string(),
                })
                .unwrap_or_else(|| "defaults".into());
            Err(ConfigError(format!("invalid `{key}` from {source}: {msg}")))
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
        if self.listen.metrics.is_empty() {
            fail(
                "listen.metrics",
                "the metrics listener cannot be disabled".into(),
            )?;
        }
        for (key, value) in [
            ("events.prefix", &self.events.prefix),
            ("events.start_suffix", &self.events.start_suffix),
            ("events.end_suffix", &self.events.end_suffix),
            ("events.outcome_key", &self.events.outcome_key),
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
        for (name, over) in &self.flows.per_flow {
            if !crate::flows::event::is_valid_flow_name(name) {
                fail(
                    &format!("flows.per_flow.{name}"),
                    "flow names are 1-128 characters of [A-Za-z0-9_.:-]".into(),
                )?;
            }
            check_flow_settings(
                &format!("flows.per_flow.{name}"),
                over.timeout,
                over.buckets.as_ref(),
            )
            .or_else(|(k, m)| fail(&k, m))?;
        }
        if !self.flows.allow_unknown && self.flows.per_flow.is_empty() {
            fail(
                "flows.allow_unknown",
                "is false but flows.per_flow names no flow, so nothing would be tracked".into(),
            )?;
        }
        self.validate_dimensions().or_else(|(k, m)| fail(&k, m))?;
        self.validate_network_dimensions()
            .or_else(|(k, m)| fail(&k, m))?;
        if self.limits.max_in_flight == 0 {
            fail("limits.max_in_flight", "must be at least 1".into())?;
        }
        if self.limits.max_series_per_metric == 0 {
            fail("limits.max_series_per_metric", "must be at least 1".into())?;
        }
        if self.limits.max_request_body_bytes < 1024 {
            fail(
                "limits.max_request_body_bytes",
                "must be at least 1024".into(),
            )?;
        }
        if self
            .log
            .level
            .parse::<tracing_subscriber::EnvFilter>()
            .is_err()
        {
            fail(
                "log.level",
                format!("{:?} is not a level or filter", self.log.level),
            )?;
        }
        Ok(())
    }

    fn validate_dimensions(&self) -> Result<(), (String, String)> {
        const RESERVED: [&str; 5] = [
            "flow",
            "outcome",
            "error_reason",
            "le",
            crate::metrics::OVERFLOW_LABEL,
        ];
        let mut seen = std::collections::HashSet::new();
        for (i, dim) in self.dimensions.iter().enumerate() {
            let key = format!("dimensions[{i}].label");
            let label = sanitize_label_name(&dim.label);
            if label.is_empty() {
                return Err((key, "must not be empty".into()));
            }
            if RESERVED.contains(&label.as_str()) || label.starts_with("__") {
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
        const RESERVED: [&str; 2] = ["direction", crate::metrics::OVERFLOW_LABEL];
        let mut seen = std::collections::HashSet::new();
        for (i, dim) in self.network_flows.dimensions.iter().enumerate() {
            let key = format!("network_flows.dimensions[{i}].label");
            let label = sanitize_label_name(&dim.label);
            if label.is_empty() {
                return Err((key, "must not be empty".into()));
            }
            if RESERVED.contains(&label.as_str()) || label.starts_with("__") {
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

/// Turns a configured label into a valid Prometheus label name: `[a-zA-Z_][a-zA-Z0-9_]*`.
pub fn sanitize_label_name(raw: &str) -> String {
    let mut out: String = raw
        .chars()
        .map(|c| if c.is_ascii_alphanumeric() { c } else { '_' })
        .collect();
    if out.starts_with(|c: char| c.is_ascii_digit()) {
        out.insert(0, '_');
    }
    out
}

fn check_flow_settings(
    key: &str,
    timeout: Option<Duration>,
    buckets: Option<&Vec<f64>>,
) -> Result<(), (String, String)> {
    if timeout.is_some_and(|t| t.is_zero()) {
        return Err((format!("{key}.timeout"), "must be longer than 0s".into()));
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

/// Every problem at once, each as "`key` from SOURCE: what is wrong".
fn describe_figment_error(err: figment::Error) -> String {
    err.into_iter()
        .map(|e| {
            let key = if e.path.is_empty() {
                "(top level)".to_string()
            } else {
                e.path.join(".")
            };
            let source = match &e.metadata {
                Some(m) if m.source.is_none() => {
                    let path: Vec<&str> = e.path.iter().map(String::as_str).collect();
                    format!(
                        "{} {}",
                        m.name,
                        m.interpolate(&figment::Profile::Default, &path)
                    )
                }
                Some(m) => format!("{} {}", m.name, m.source.as_ref().expect("checked")),
                None => "defaults".to_string(),
            };
            format!("`{key}` from {source}: {}", e.kind)
        })
        .collect::<Vec<_>>()
        .join("; ")
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
    Ok(match Raw::deserialize(d)? {
        Raw::S(s) => s,
        Raw::I(i) => i.to_string(),
        Raw::U(u) => u.to_string(),
        Raw::F(f) => f.to_string(),
        Raw::B(b) => b.to_string(),
    })
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
    let items = match Raw::deserialize(d)? {
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
        match Raw::deserialize(d)? {
            Raw::S(s) => humantime::parse_duration(s.trim()).map_err(|e| {
                serde::de::Error::custom(format!("{s:?} is not a duration like 90s or 5m: {e}"))
            }),
            Raw::U(u) => Ok(Duration::from_secs(u)),
            Raw::F(f) if f.is_finite() && f >= 0.0 => Ok(Duration::from_secs_f64(f)),
            Raw::F(f) => Err(serde::de::Error::custom(format!("{f} is not a duration"))),
        }
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
    fn effective_config_renders_and_reloads() {
        let c = Config::load(None, env(&[])).unwrap();
        let yaml = c.to_yaml();
        assert!(yaml.contains("timeout: 5m"), "{yaml}");
        let f = yaml_file(&yaml);
        let again = Config::load(Some(&f.path), env(&[])).unwrap();
        assert_eq!(again.flows.default.timeout, c.flows.default.timeout);
    }
}
