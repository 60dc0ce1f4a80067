//! The flow duration histogram (docs/behaviour.md §4): classic buckets, native
//! (exponential) buckets, or both, per flow (`flows.*.histogram`).
//!
//! prometheus-client keeps exemplars only with classic buckets
//! (`HistogramWithExemplars`) and native buckets only in its plain `Histogram`, and
//! neither exposes its counts; so a series records into both and is written by whichever
//! the exposition can carry: the text formats (which have no native buckets) get the
//! classic histogram with its exemplars, the protobuf format the native one.

use prometheus_client::encoding::{EncodeMetric, MetricEncoder};
use prometheus_client::metrics::exemplar::HistogramWithExemplars;
use prometheus_client::metrics::histogram::{Histogram, NativeHistogramConfig};
use prometheus_client::metrics::{MetricType, TypedMetric};

use super::exposition::{self, ExpositionFormat};
use super::TraceExemplar;

/// Which buckets a flow's duration histogram has (`flows.*.histogram`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum HistogramMode {
    #[default]
    Classic,
    Native,
    Both,
}

/// How a flow's duration histogram is built.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct HistogramShape {
    pub mode: HistogramMode,
    /// `native_bucket_factor`: the schema is the finest whose factor is within it.
    pub native_bucket_factor: f64,
    /// `native_max_buckets`: beyond, the resolution halves (prometheus-client, as
    /// client_golang does).
    pub native_max_buckets: u32,
}

impl Default for HistogramShape {
    fn default() -> Self {
        Self {
            mode: HistogramMode::Classic,
            native_bucket_factor: 1.1,
            native_max_buckets: 160,
        }
    }
}

/// One series of `flowmetrics_flow_duration_seconds`.
#[derive(Debug)]
pub struct DurationHistogram {
    /// What the text formats show, with exemplars: the classic buckets, or (native only)
    /// just `_count`, `_sum` and the `+Inf` bucket, as client_golang shows a native-only
    /// histogram in text.
    classic: HistogramWithExemplars<TraceExemplar>,
    /// What the protobuf format shows when native buckets are on: native buckets, plus
    /// the classic ones for `both`.
    native: Option<Histogram>,
}

impl DurationHistogram {
    /// `native_family`: some flow of the family has native buckets. Prometheus decides
    /// per family, by its first series, whether a protobuf histogram family is native,
    /// so then every series carries native buckets there (a `classic` flow's as `both`).
    pub fn new(buckets: &[f64], shape: HistogramShape, native_family: bool) -> Self {
        let config = || {
            NativeHistogramConfig::new(shape.native_bucket_factor)
                .max_buckets(usize::try_from(shape.native_max_buckets).unwrap_or(usize::MAX))
        };
        let (classic, native) = match shape.mode {
            HistogramMode::Classic if !native_family => (buckets, None),
            HistogramMode::Native => (&[][..], Some(Histogram::new_native(config()))),
            HistogramMode::Classic | HistogramMode::Both => (
                buckets,
                Some(Histogram::new_classic_and_native(
                    buckets.iter().copied(),
                    config(),
                )),
            ),
        };
        Self {
            classic: HistogramWithExemplars::new(classic.iter().copied()),
            native,
        }
    }

    pub fn observe(&self, seconds: f64, exemplar: Option<TraceExemplar>) {
        self.classic.observe(seconds, exemplar, None);
        if let Some(native) = &self.native {
            native.observe(seconds);
        }
    }
}

impl TypedMetric for DurationHistogram {
    const TYPE: MetricType = MetricType::Histogram;
}

impl EncodeMetric for DurationHistogram {
    fn encode(&self, encoder: MetricEncoder) -> Result<(), std::fmt::Error> {
        match &self.native {
            Some(native) if exposition::current() == ExpositionFormat::Protobuf => {
                native.encode(encoder)
            }
            _ => self.classic.encode(encoder),
        }
    }

    fn metric_type(&self) -> MetricType {
        Self::TYPE
    }
}
