//! A metric family with a series limit. prometheus-client's `Family` neither counts its
//! series nor lets a constructor see the labels (needed for per-flow buckets), so flow
//! families use this instead: at most `max_series` label sets, then one overflow series
//! labelled `otel_metric_overflow="true"` (the OpenTelemetry SDK convention).

use std::collections::HashMap;
use std::fmt::Write as _;
use std::sync::{Arc, Mutex, RwLock};
use std::time::{Duration, Instant};

use prometheus_client::encoding::{EncodeLabelSet, EncodeMetric, LabelSetEncoder, MetricEncoder};
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::MetricType;

use crate::flows::event::TraceRef;

/// The label that marks the overflow series.
pub const OVERFLOW_LABEL: &str = "otel_metric_overflow";

/// Label names and values of one series, in exposition order.
#[derive(Clone, Debug, PartialEq, Eq, Hash)]
pub enum SeriesLabels {
    Labels(Box<[(Arc<str>, Arc<str>)]>),
    Overflow,
}

impl SeriesLabels {
    /// The value of `name`, if this series has that label.
    pub fn value_of(&self, name: &str) -> Option<&str> {
        match self {
            SeriesLabels::Labels(pairs) => {
                pairs.iter().find(|(n, _)| &**n == name).map(|(_, v)| &**v)
            }
            SeriesLabels::Overflow => None,
        }
    }
}

impl EncodeLabelSet for SeriesLabels {
    fn encode(&self, encoder: &mut LabelSetEncoder) -> Result<(), std::fmt::Error> {
        match self {
            SeriesLabels::Labels(pairs) => {
                for (name, value) in pairs.iter() {
                    (&**name, &**value).encode(encoder.encode_label())?;
                }
                Ok(())
            }
            SeriesLabels::Overflow => (OVERFLOW_LABEL, "true").encode(encoder.encode_label()),
        }
    }
}

use prometheus_client::encoding::EncodeLabel;

/// Exemplar labels: the end event's trace and span as lowercase hex, formatted at
/// encode time (63 characters of names and values; OpenMetrics allows 128). `Copy`, so
/// recording an exemplar allocates nothing.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct TraceExemplar(pub TraceRef);

impl EncodeLabelSet for TraceExemplar {
    fn encode(&self, encoder: &mut LabelSetEncoder) -> Result<(), std::fmt::Error> {
        // One write of text built on the stack: the text encoder copies label-key text
        // verbatim, and hex needs no escaping.
        const TEXT: &[u8; 70] =
            br#"trace_id="________________________________",span_id="________________""#;
        let mut text = *TEXT;
        hex_into(&self.0.trace_id, &mut text[10..42]);
        hex_into(&self.0.span_id, &mut text[53..69]);
        let text = std::str::from_utf8(&text).expect("hex digits are ASCII");
        encoder.encode_label().encode_label_key()?.write_str(text)
    }
}

fn hex_into(bytes: &[u8], out: &mut [u8]) {
    const DIGITS: &[u8; 16] = b"0123456789abcdef";
    for (pair, b) in out.chunks_exact_mut(2).zip(bytes) {
        pair[0] = DIGITS[usize::from(b >> 4)];
        pair[1] = DIGITS[usize::from(b & 0xf)];
    }
}

type Constructor<M> = Box<dyn Fn(&SeriesLabels) -> M + Send + Sync>;

/// Shared by every limited family: counts folds per family and rate-limits the warning.
pub struct OverflowReporter {
    counter_for: Box<dyn Fn(&'static str) -> Counter + Send + Sync>,
    last_warn: Mutex<HashMap<&'static str, Instant>>,
}

const OVERFLOW_WARN_EVERY: Duration = Duration::from_secs(60);

impl OverflowReporter {
    pub fn new(counter_for: impl Fn(&'static str) -> Counter + Send + Sync + 'static) -> Self {
        Self {
            counter_for: Box::new(counter_for),
            last_warn: Mutex::new(HashMap::new()),
        }
    }

    fn folded(&self, metric: &'static str, max: usize) {
        (self.counter_for)(metric).inc();
        let mut last = self.last_warn.lock().expect("overflow warn lock");
        let now = Instant::now();
        if last
            .get(metric)
            .is_none_or(|t| now.duration_since(*t) >= OVERFLOW_WARN_EVERY)
        {
            last.insert(metric, now);
            tracing::warn!(
                metric,
                max_series = max,
                "series limit reached (limits.max_series_per_metric): new label sets are \
                 recorded in the otel_metric_overflow=\"true\" series"
            );
        }
    }
}

/// Cheap to clone: clones share the series (as prometheus-client's `Family` does).
pub struct LimitedFamily<M> {
    inner: Arc<Inner<M>>,
}

impl<M> Clone for LimitedFamily<M> {
    fn clone(&self) -> Self {
        Self {
            inner: self.inner.clone(),
        }
    }
}

struct Inner<M> {
    name: &'static str,
    metric_type: MetricType,
    max_series: usize,
    series: RwLock<HashMap<SeriesLabels, M>>,
    make: Constructor<M>,
    overflow: Arc<OverflowReporter>,
}

impl<M> std::fmt::Debug for LimitedFamily<M> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("LimitedFamily")
            .field("name", &self.inner.name)
            .finish_non_exhaustive()
    }
}

impl<M> LimitedFamily<M> {
    pub fn new(
        name: &'static str,
        metric_type: MetricType,
        max_series: usize,
        overflow: Arc<OverflowReporter>,
        make: impl Fn(&SeriesLabels) -> M + Send + Sync + 'static,
    ) -> Self {
        Self {
            inner: Arc::new(Inner {
                name,
                metric_type,
                max_series,
                series: RwLock::new(HashMap::new()),
                make: Box::new(make),
                overflow,
            }),
        }
    }

    /// Runs `f` on the series for `labels`, creating it (or folding into the overflow
    /// series when the family is full).
    pub fn with<R>(&self, labels: SeriesLabels, f: impl FnOnce(&M) -> R) -> R {
        let this = &*self.inner;
        if let Some(m) = this.series.read().expect("series lock").get(&labels) {
            return f(m);
        }
        let mut series = this.series.write().expect("series lock");
        if let Some(m) = series.get(&labels) {
            return f(m);
        }
        let regular = series.len() - usize::from(series.contains_key(&SeriesLabels::Overflow));
        let labels = if regular < this.max_series {
            labels
        } else {
            this.overflow.folded(this.name, this.max_series);
            SeriesLabels::Overflow
        };
        let m = series
            .entry(labels)
            .or_insert_with_key(|labels| (this.make)(labels));
        f(m)
    }

    /// Series held now (including the overflow series).
    pub fn len(&self) -> usize {
        self.inner.series.read().expect("series lock").len()
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }
}

impl<M: EncodeMetric + Send + Sync + 'static> EncodeMetric for LimitedFamily<M> {
    fn encode(&self, mut encoder: MetricEncoder) -> Result<(), std::fmt::Error> {
        let series = self.inner.series.read().expect("series lock");
        for (labels, m) in series.iter() {
            m.encode(encoder.encode_family(labels)?)?;
        }
        Ok(())
    }

    fn metric_type(&self) -> MetricType {
        self.inner.metric_type
    }

    fn is_empty(&self) -> bool {
        self.inner.series.read().expect("series lock").is_empty()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn labels(v: &str) -> SeriesLabels {
        SeriesLabels::Labels(vec![(Arc::from("flow"), Arc::from(v))].into())
    }

    #[test]
    fn folds_into_one_overflow_series_past_the_limit() {
        let folds = Counter::default();
        let f2 = folds.clone();
        let reporter = Arc::new(OverflowReporter::new(move |_| f2.clone()));
        let fam: LimitedFamily<Counter> =
            LimitedFamily::new("x", MetricType::Counter, 3, reporter, |_| {
                Counter::default()
            });
        for i in 0..100 {
            fam.with(labels(&i.to_string()), |c| c.inc());
        }
        // Existing series keep counting.
        fam.with(labels("0"), |c| c.inc());
        assert_eq!(fam.len(), 4);
        assert_eq!(fam.with(labels("0"), |c| c.get()), 2);
        assert_eq!(fam.with(SeriesLabels::Overflow, |c| c.get()), 97);
        assert_eq!(folds.get(), 97);
        assert_eq!(labels("a").value_of("flow"), Some("a"));
    }
}
