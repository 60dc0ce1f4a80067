//! A flow duration series: prometheus-client's histogram, which the exposition writes,
//! and a tally of the same observations by bucket, which the overview reads
//! (prometheus-client has no reader for a histogram's buckets).

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;

use prometheus_client::encoding::{EncodeMetric, MetricEncoder};
use prometheus_client::metrics::exemplar::HistogramWithExemplars;
use prometheus_client::metrics::{MetricType, TypedMetric};

use super::family::{Pinnable, Reading};
use super::TraceExemplar;

/// Cheap to clone: clones share the histogram and the tally.
#[derive(Clone, Debug)]
pub struct DurationSeries {
    histogram: HistogramWithExemplars<TraceExemplar>,
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
    /// `bounds`: finite, ascending, shared by the series of a flow.
    pub fn new(bounds: Arc<[f64]>) -> Self {
        let counts = (0..=bounds.len()).map(|_| AtomicU64::new(0)).collect();
        Self {
            histogram: HistogramWithExemplars::new(bounds.iter().copied()),
            tally: Arc::new(Tally {
                bounds,
                counts,
                sum_bits: AtomicU64::new(0f64.to_bits()),
            }),
        }
    }

    pub fn observe(&self, seconds: f64, exemplar: Option<TraceExemplar>) {
        self.histogram.observe(seconds, exemplar, None);
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
        self.histogram.encode(encoder)
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
