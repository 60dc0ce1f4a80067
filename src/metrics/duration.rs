//! A duration series (flows and steps, docs/behaviour.md §4): classic buckets, native
//! (exponential) buckets, or both, per flow (`flows.*.histogram`), and a tally of the
//! same observations by bucket, which the overview reads (prometheus-client has no
//! reader for a histogram's buckets).
//!
//! prometheus-client keeps exemplars only with classic buckets
//! (`HistogramWithExemplars`) and native buckets only in its plain `Histogram`, and
//! neither exposes its counts; so a series records into both and is written by whichever
//! the exposition can carry: the text formats (which have no native buckets) get the
//! classic histogram with its exemplars, the protobuf format the native one.

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;

use prometheus_client::encoding::{EncodeMetric, MetricEncoder};
use prometheus_client::metrics::exemplar::HistogramWithExemplars;
use prometheus_client::metrics::histogram::{Histogram, NativeHistogramConfig};
use prometheus_client::metrics::{MetricType, TypedMetric};

use super::exposition::{self, ExpositionFormat};
use super::family::{Pinnable, Reading};
use super::TraceExemplar;

/// Which buckets a flow's duration histogram has (`flows.*.histogram`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum HistogramMode {
    /// Classic buckets only.
    #[default]
    Classic,
    /// Native (exponential) buckets only.
    Native,
    /// Classic and native buckets on the same series.
    Both,
}

/// How a flow's duration histogram is built.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct HistogramShape {
    /// Classic, native or both.
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

/// One series of a duration family. Cheap to clone: clones share every part.
#[derive(Clone, Debug)]
pub struct DurationSeries {
    /// What the text formats show, with exemplars: the classic buckets, or (native only)
    /// just `_count`, `_sum` and the `+Inf` bucket, as client_golang shows a native-only
    /// histogram in text.
    classic: HistogramWithExemplars<TraceExemplar>,
    /// What the protobuf format shows when native buckets are on: native buckets, plus
    /// the classic ones for `both`.
    native: Option<Histogram>,
    tally: Arc<Tally>,
}

#[derive(Debug)]
struct Tally {
    /// Finite upper bounds, ascending (`+Inf` is implicit, as in prometheus-client).
    bounds: Arc<[f64]>,
    /// Observations per bucket (not cumulative), the last one `+Inf`.
    counts: Box<[AtomicU64]>,
    sum_bits: AtomicU64,
}

impl DurationSeries {
    /// `bounds`: finite, ascending, shared by the series of a flow. `native_family`:
    /// some flow of the family has native buckets. Prometheus decides per family, by its
    /// first series, whether a protobuf histogram family is native, so then every series
    /// carries native buckets there (a `classic` flow's as `both`).
    pub fn new(bounds: Arc<[f64]>, shape: HistogramShape, native_family: bool) -> Self {
        let config = || {
            NativeHistogramConfig::new(shape.native_bucket_factor)
                .max_buckets(usize::try_from(shape.native_max_buckets).unwrap_or(usize::MAX))
        };
        let (classic, native) = match shape.mode {
            HistogramMode::Classic if !native_family => (&bounds[..], None),
            HistogramMode::Native => (&[][..], Some(Histogram::new_native(config()))),
            HistogramMode::Classic | HistogramMode::Both => (
                &bounds[..],
                Some(Histogram::new_classic_and_native(
                    bounds.iter().copied(),
                    config(),
                )),
            ),
        };
        let classic = HistogramWithExemplars::new(classic.iter().copied());
        let counts = (0..=bounds.len()).map(|_| AtomicU64::new(0)).collect();
        Self {
            classic,
            native,
            tally: Arc::new(Tally {
                bounds,
                counts,
                sum_bits: AtomicU64::new(0f64.to_bits()),
            }),
        }
    }

    /// Classic buckets only (step durations).
    pub fn classic(bounds: Arc<[f64]>) -> Self {
        Self::new(bounds, HistogramShape::default(), false)
    }

    pub fn observe(&self, seconds: f64, exemplar: Option<TraceExemplar>) {
        self.classic.observe(seconds, exemplar, None);
        if let Some(native) = &self.native {
            native.observe(seconds);
        }
        let tally = &*self.tally;
        // The bucket prometheus-client counts it in: the first bound ≥ the value.
        if !seconds.is_nan() {
            let bucket = tally.bounds.partition_point(|b| *b < seconds);
            tally.counts[bucket].fetch_add(1, Ordering::Relaxed);
        }
        let _ = tally
            .sum_bits
            .fetch_update(Ordering::Relaxed, Ordering::Relaxed, |bits| {
                Some((f64::from_bits(bits) + seconds).to_bits())
            });
    }
    /// Adds this series' cumulative buckets ((upper bound, count), ascending, ending with
    /// `+Inf`) into `into` by bound, and returns (count, sum).
    pub fn add_to(&self, into: &mut Vec<(f64, u64)>) -> (u64, f64) {
        let tally = &*self.tally;
        let mut cumulative = 0;
        let bounds = tally.bounds.iter().copied().chain([f64::INFINITY]);
        for (bound, count) in bounds.zip(tally.counts.iter()) {
            cumulative += count.load(Ordering::Relaxed);
            match into.iter_mut().find(|(b, _)| *b == bound) {
                Some(slot) => slot.1 += cumulative,
                None => into.push((bound, cumulative)),
            }
        }
        into.sort_by(|a, b| a.0.total_cmp(&b.0));
        (
            cumulative,
            f64::from_bits(tally.sum_bits.load(Ordering::Relaxed)),
        )
    }
}

impl TypedMetric for DurationSeries {
    const TYPE: MetricType = MetricType::Histogram;
}

impl EncodeMetric for DurationSeries {
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

/// Not part of the invariant (docs/behaviour.md §3): written as it is when encoded.
impl Pinnable for DurationSeries {
    fn read(&self) -> Option<Reading> {
        None
    }

    fn encode_reading(&self, _: Reading, encoder: MetricEncoder) -> Result<(), std::fmt::Error> {
        self.encode(encoder)
    }
}
