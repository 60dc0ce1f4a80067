//! Configuration: built-in defaults, then a YAML file, then `FLOWMETRICS_*` environment
//! variables (`__` nests). Read once at start into typed structs; nothing else in the
//! crate reads the environment.
//!
//! [`schema`]: the sections and their defaults; [`values`]: how durations, sizes and
//! lists are written; [`load`]: the layering; [`validate`]: what the types do not say;
//! [`error`] and [`report`]: how a problem names its key and its source;
//! [`objectives`]: objectives and overdue thresholds per flow.

mod error;
mod load;
mod objectives;
mod report;
mod schema;
mod validate;
mod values;

pub use crate::config_checks::{check_log_filter, MAX_CONFIG_FILE_BYTES};
pub use error::{ConfigError, Key, KeySeg, Origin, Problem, ReadError, ReadProblem};
pub use load::CONFIG_ENV;
pub use objectives::{with_bounds, Objective};
pub use schema::{
    Config, CorrelationSection, Dimension, DimensionSource, EventsSection, FlowDefaults,
    FlowOverride, FlowsSection, HistogramKind, LimitsSection, ListenSection, LogFormat, LogSection,
    MaxConnections, NetworkDimension, NetworkFlowsSection, NodeList, RedisSection, RedisTarget,
    ShutdownSection, StateSection, StoreKind, DEFAULT_BUCKETS, DEFAULT_NATIVE_BUCKET_FACTOR,
    DEFAULT_NATIVE_MAX_BUCKETS,
};

#[cfg(test)]
mod tests;
