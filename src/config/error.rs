//! What can be wrong with a configuration, as types: [`ConfigError`] (the file cannot
//! be read, values do not parse, a value is out of range), each naming the [`Key`] and
//! the [`Origin`] of the value, and [`Problem`], what validation found.

use std::fmt;
use std::path::PathBuf;
use std::time::Duration;

use crate::config_checks::{ConfigFileError, LogFilterError};

use super::report::describe_kind;
use super::validate::{MAX_BODY_LIMIT, MAX_BUFFERED_LIMIT, MAX_CONNECTIONS_LIMIT, MAX_STEPS_LIMIT};

/// A configuration that cannot be used. Its text names the key and where its value
/// came from, e.g. `flows.default.timeout from environment variable
/// FLOWMETRICS_FLOWS__DEFAULT__TIMEOUT: "soon" is not a duration (…)`.
#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    /// The config file is missing, not a regular file, or too large.
    #[error("config file {}: {reason}", path.display())]
    File {
        /// The config file as given.
        path: PathBuf,
        /// Why it cannot be read.
        #[source]
        reason: ConfigFileError,
    },
    /// Values that do not parse: every one found, in one message.
    #[error("{}", join(.0))]
    Unreadable(Vec<ReadError>),
    /// A value that parses but cannot be used (the first one found).
    #[error("{key} {origin}: {problem}")]
    Invalid {
        /// The key whose value is wrong.
        key: Key,
        /// Where the value came from.
        origin: Origin,
        /// What is wrong with it.
        problem: Problem,
    },
}

fn join(errors: &[ReadError]) -> String {
    let all: Vec<String> = errors.iter().map(ToString::to_string).collect();
    all.join("; ")
}

/// One value (or the file itself) that could not be read.
#[derive(Debug, thiserror::Error)]
pub enum ReadError {
    /// Nothing was read: the file is not YAML.
    #[error("config file {}: not valid YAML: {problem}", file.display())]
    NotYaml {
        /// The config file.
        file: PathBuf,
        /// What the YAML parser found.
        problem: ReadProblem,
    },
    /// A problem of the whole configuration, at no key.
    #[error("configuration {origin}: {problem}")]
    Whole {
        /// Where the configuration came from.
        origin: Origin,
        /// What is wrong with it.
        problem: ReadProblem,
    },
    /// A key whose value has the wrong type or form, or that is not a key at all.
    #[error("{key} {origin}: {problem}")]
    Value {
        /// The key whose value does not parse.
        key: Key,
        /// Where the value came from.
        origin: Origin,
        /// What is wrong with it.
        problem: ReadProblem,
    },
}

/// What is wrong with a value that does not parse, in words without serde's backticks
/// or Rust type names.
#[derive(Debug, thiserror::Error)]
pub enum ReadProblem {
    /// A key that must be given is not.
    #[error("is required")]
    Required,
    /// What serde (or a value's own parser, as a message) found.
    #[error("{}", describe_kind(.0))]
    Invalid(figment::error::Kind),
}

/// Where a value came from.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Origin {
    /// The config file (`--config` or `FLOWMETRICS_CONFIG`).
    File(PathBuf),
    /// The variable's name.
    Env(String),
    /// Nowhere given: the built-in default.
    Defaults,
}

impl fmt::Display for Origin {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Origin::File(path) => write!(f, "in config file {}", path.display()),
            Origin::Env(name) => write!(f, "from environment variable {name}"),
            Origin::Defaults => f.write_str("in the built-in defaults"),
        }
    }
}

/// One step of a config key: a mapping key or a list index.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum KeySeg {
    /// A mapping key (a field, or a flow's name).
    Key(String),
    /// A list index.
    Index(usize),
}

/// A config key, shown as `a.b`, `list[0].c`, and `map["x.y"]` for keys that are not
/// plain words (flow names may hold dots and colons).
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Key(pub Vec<KeySeg>);

impl Key {
    /// A top-level section, e.g. `limits`.
    pub fn root(section: &str) -> Key {
        Key(vec![KeySeg::Key(section.into())])
    }

    /// This key's `name` (a field, or an entry of a mapping).
    pub fn field(&self, name: &str) -> Key {
        let mut key = self.clone();
        key.0.push(KeySeg::Key(name.into()));
        key
    }

    /// This list's `i`th element.
    pub fn index(&self, i: usize) -> Key {
        let mut key = self.clone();
        key.0.push(KeySeg::Index(i));
        key
    }
}

impl fmt::Display for Key {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let mut first = true;
        for seg in &self.0 {
            match seg {
                KeySeg::Index(i) => write!(f, "[{i}]")?,
                KeySeg::Key(k)
                    if !k.is_empty()
                        && k.chars()
                            .all(|c| c.is_ascii_alphanumeric() || c == '_' || c == '-') =>
                {
                    if !first {
                        f.write_str(".")?;
                    }
                    f.write_str(k)?;
                }
                KeySeg::Key(k) => write!(f, "[{k:?}]")?,
            }
            first = false;
        }
        Ok(())
    }
}

/// What validation found wrong with one value.
#[derive(Debug, Clone, PartialEq, thiserror::Error)]
pub enum Problem {
    /// A listener address that is not an address, a port or `""`.
    #[error("{0:?} is not an address like 127.0.0.1:4318, a port, or \"\" to disable")]
    NotAnAddress(String),
    /// `listen.metrics` is empty.
    #[error("the metrics listener cannot be disabled")]
    MetricsListenerOff,
    /// A Redis URL that turns certificate checks off (`#insecure`).
    #[error(
        "{0:?}: certificate checks cannot be turned off; set correlation.redis.ca_file to \
         the CA that signed the server's"
    )]
    InsecureRedisUrl(String),
    /// A Redis URL whose scheme is not `redis://` or `rediss://`.
    #[error("{0:?} is not a redis:// or rediss:// (TLS) URL")]
    NotARedisUrl(String),
    /// Both `correlation.redis.url` and `correlation.redis.cluster` are set.
    #[error(
        "set correlation.redis.url (one server) or correlation.redis.cluster (a cluster's \
         nodes), not both"
    )]
    UrlAndCluster,
    /// `correlation.redis.key_prefix` holds a brace while a cluster is used (braces pick the hash slot).
    #[error("must not contain {{ or }} with a cluster")]
    BraceInClusterPrefix,
    /// `correlation.redis.ca_file` is set but no URL uses TLS.
    #[error("is only used with rediss:// (TLS) URLs")]
    CaFileWithoutTls,
    /// `correlation.redis.shards` is outside 1–1024.
    #[error("must be 1 to 1024")]
    Shards,
    /// A count that must be at least 1 is 0.
    #[error("must be at least 1")]
    AtLeastOne,
    /// A value that must not be empty is.
    #[error("must not be empty")]
    Empty,
    /// A duration that must be longer than 0s is 0s.
    #[error("must be longer than 0s")]
    Zero,
    /// A duration is longer than 365 days.
    #[error("must be at most 365d")]
    TooLong,
    /// `limits.series_idle_timeout` is under 1s.
    #[error("must be off or at least 1s")]
    IdleSeriesTooSoon,
    /// A duration is outside its range (the lower bound given).
    #[error("must be between {} and 365d", humantime::format_duration(*.0))]
    DurationRange(Duration),
    /// `limits.max_steps_per_flow` is outside its range.
    #[error("must be between 1 and {MAX_STEPS_LIMIT}")]
    StepLimit,
    /// `limits.max_request_body_bytes` is outside its range.
    #[error("must be between 1024 and {MAX_BODY_LIMIT} (2 GiB)")]
    BodyLimit,
    /// `limits.max_buffered_bytes` is smaller than `limits.max_request_body_bytes` (given) or too large.
    #[error(
        "must be between limits.max_request_body_bytes ({0}) and {MAX_BUFFERED_LIMIT} (1 TiB): \
         a body that fits no budget could never be read"
    )]
    BufferLimit(usize),
    /// `limits.max_connections` is 0 or too large.
    #[error("must be `auto` or between 1 and {MAX_CONNECTIONS_LIMIT}")]
    ConnectionLimit,
    /// `events.end_suffix` equals `events.start_suffix`.
    #[error("must differ from events.start_suffix")]
    EndIsStart,
    /// `events.step_suffix` equals the start or end suffix.
    #[error("must differ from events.start_suffix and events.end_suffix")]
    StepIsStartOrEnd,
    /// `events.correlation_keys` has no non-empty key.
    #[error("needs at least one non-empty key")]
    NoCorrelationKey,
    /// A flow name under `flows.per_flow` breaks the flow-name rules.
    #[error("flow names are 1-128 characters of [A-Za-z0-9_.:-]")]
    FlowName,
    /// `flows.allow_unknown` is false and no flow is named, so nothing would be tracked.
    #[error("is false but flows.per_flow names no flow, so nothing would be tracked")]
    NothingTracked,
    /// A flow's `steps` list is empty.
    #[error("needs at least one step (or leave it out)")]
    NoSteps,
    /// A flow's `steps` list is longer than the limit.
    #[error("at most {MAX_STEPS_LIMIT} steps")]
    TooManySteps,
    /// A declared step name breaks the step-name rules.
    #[error("{0:?}: step names are 1-64 characters of [A-Za-z0-9_.:-]")]
    StepName(String),
    /// A declared step name appears twice in its flow's list.
    #[error("{0:?} is listed twice")]
    StepTwice(String),
    /// A `buckets` list is empty.
    #[error("needs at least one bucket")]
    NoBuckets,
    /// A bucket bound is not a finite number of seconds above 0.
    #[error("bucket bounds are finite seconds above 0")]
    BucketBound,
    /// Bucket bounds are not strictly increasing.
    #[error("bucket bounds must be strictly increasing")]
    BucketOrder,
    /// A `native_bucket_factor` is not greater than 1.
    #[error("must be a number greater than 1 (e.g. 1.1)")]
    NativeFactor,
    /// An objective's `target` is not strictly between 0 and 1.
    #[error("{0} is not a ratio strictly between 0 and 1 (e.g. 0.99)")]
    ObjectiveTarget(f64),
    /// A dimension's label is one of flowmetrics' own.
    #[error("{0:?} is reserved by flowmetrics' own labels")]
    ReservedLabel(String),
    /// Two dimensions have the same label once sanitised.
    #[error("{0:?} is used by another dimension (after sanitising)")]
    LabelTaken(String),
    /// A network dimension lists no non-empty attribute.
    #[error("needs at least one non-empty attribute")]
    NoAttribute,
    /// `log.level` is not a level or filter.
    #[error("{0}")]
    LogFilter(#[from] LogFilterError),
}

impl Problem {
    /// This problem, found at `key`.
    pub fn at(self, key: Key) -> Invalid {
        Invalid { key, problem: self }
    }
}

/// A problem and the key it was found at, before its origin is looked up.
#[derive(Debug, Clone, PartialEq)]
pub struct Invalid {
    /// The key the problem was found at.
    pub key: Key,
    /// What is wrong.
    pub problem: Problem,
}
