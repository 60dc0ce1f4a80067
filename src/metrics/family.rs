//! A metric family with a series limit, for the flow and network families.
//!
//! prometheus-client's `Family` neither counts its series nor lets its constructor see
//! the labels (per-flow buckets need the flow name), so those families use this type: it
//! holds prometheus-client's own metrics (`Counter`, `Gauge`, `HistogramWithExemplars`,
//! …) per label set, at most `max_series` of them plus one overflow series labelled
//! `otel_metric_overflow="true"` (the OpenTelemetry SDK convention), and it is written by
//! prometheus-client's encoder through [`EncodeMetric`], as `Family` is.
//!
//! Recording is on the hot path: a series is found from borrowed label values (a
//! [`SeriesKey`]: [`SeriesRef`] for the flow families) with one hash-table probe and no
//! allocation; the owned labels (a [`SeriesLabelSet`]) are built only when a series is
//! created.

use std::collections::HashMap;
use std::hash::{BuildHasher, Hasher};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{
    Arc, Mutex, MutexGuard, OnceLock, PoisonError, RwLock, RwLockReadGuard, RwLockWriteGuard,
};
use std::time::Duration;

use hashbrown::{DefaultHashBuilder, HashTable};
use prometheus_client::encoding::{EncodeLabelSet, EncodeMetric, LabelSetEncoder, MetricEncoder};
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::exemplar::{CounterWithExemplar, Exemplar};
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::metrics::{MetricType, TypedMetric};
use prometheus_client::registry::Registry;

use crate::flows::event::DimValues;
use crate::logging::RateLimited;
use crate::model::OVERFLOW_LABEL;

/// Which labels a family's series carry, in exposition order: `flow`, then `extra` (e.g.
/// `outcome`), then the start dimensions, then the end dimensions.
#[derive(Clone, Debug, Default)]
pub struct Layout {
    pub extra: Option<&'static str>,
    /// The name of a label whose values are step names (`step`, `last_step`), after
    /// `extra`.
    pub step: Option<&'static str>,
    pub start_dims: Arc<[Box<str>]>,
    pub end_dims: Arc<[Box<str>]>,
}

/// The label values of one recording, borrowed from the caller. `extra` is set exactly
/// when the layout has an extra label; `start`/`end` are empty when the layout has no
/// such dimensions.
#[derive(Clone, Copy, Debug)]
pub struct SeriesRef<'a> {
    pub flow: &'a Arc<str>,
    pub extra: Option<&'static str>,
    /// Set exactly when the layout has a step label.
    pub step: Option<&'a Arc<str>>,
    pub start: &'a DimValues,
    pub end: &'a DimValues,
}

/// A series' labels, owned: what prometheus-client's encoder writes for it.
#[derive(Debug)]
pub struct SeriesLabels {
    layout: Arc<Layout>,
    flow: Arc<str>,
    extra: Option<&'static str>,
    step: Option<Arc<str>>,
    start: DimValues,
    end: DimValues,
}

impl SeriesLabels {
    pub fn flow(&self) -> &Arc<str> {
        &self.flow
    }

    /// The value of the family's extra label (`outcome`, `error_reason`, `reason`).
    pub fn extra(&self) -> Option<&'static str> {
        self.extra
    }

    /// The value of the family's step label (`step`, `last_step`), if it has one.
    pub fn step(&self) -> Option<&Arc<str>> {
        self.step.as_ref()
    }

    /// The start dimension values (empty when the family has none).
    pub fn start(&self) -> &DimValues {
        &self.start
    }
}

impl EncodeLabelSet for SeriesLabels {
    fn encode(&self, encoder: &mut LabelSetEncoder) -> Result<(), std::fmt::Error> {
        use prometheus_client::encoding::EncodeLabel;
        ("flow", &*self.flow).encode(encoder.encode_label())?;
        if let (Some(name), Some(value)) = (self.layout.extra, self.extra) {
            (name, value).encode(encoder.encode_label())?;
        }
        if let (Some(name), Some(value)) = (self.layout.step, &self.step) {
            (name, &**value).encode(encoder.encode_label())?;
        }
        let start = self.layout.start_dims.iter().zip(self.start.iter());
        let end = self.layout.end_dims.iter().zip(self.end.iter());
        for (name, value) in start.chain(end) {
            (&**name, &**value).encode(encoder.encode_label())?;
        }
        Ok(())
    }
}

/// A series' labels as a limited family keeps and writes them.
pub trait SeriesLabelSet: EncodeLabelSet + std::fmt::Debug + Send + Sync + 'static {
    /// What every series of one family shares (its label names).
    type Layout: std::fmt::Debug + Send + Sync + 'static;
}

impl SeriesLabelSet for SeriesLabels {
    type Layout = Layout;
}

/// Borrowed label values that find a series of a family with labels `L`.
pub trait SeriesKey<L: SeriesLabelSet>: Copy {
    /// By content, so equal values held in different `Arc`s find the same series.
    fn hash_with(&self, hasher: &DefaultHashBuilder) -> u64;
    fn matches(&self, labels: &L) -> bool;
    /// The owned labels, made once, when the series is created.
    fn to_labels(self, layout: &Arc<L::Layout>) -> L;
    /// The flow the series belongs to: the family's constructor sees it (per-flow
    /// buckets).
    fn flow(&self) -> Option<&str>;
}

/// The overflow series' one label.
const OVERFLOW_LABELS: [(&str, &str); 1] = [(OVERFLOW_LABEL, "true")];

impl SeriesKey<SeriesLabels> for SeriesRef<'_> {
    /// Only the bytes are written (no length prefixes or separators): the layout is
    /// fixed per family, and a rare collision costs one more comparison, not a wrong
    /// match.
    #[inline]
    fn hash_with(&self, hasher: &DefaultHashBuilder) -> u64 {
        let mut h = hasher.build_hasher();
        h.write(self.flow.as_bytes());
        if let Some(extra) = self.extra {
            h.write(extra.as_bytes());
        }
        if let Some(step) = self.step {
            h.write(step.as_bytes());
        }
        for value in self.start.iter().chain(self.end.iter()) {
            h.write(value.as_bytes());
        }
        h.finish()
    }

    #[inline]
    fn matches(&self, key: &SeriesLabels) -> bool {
        // Names and values are interned upstream and `extra` is a constant, so the
        // pointer checks usually decide (`==` on an `Arc<str>` would compare bytes).
        fn same<T: ?Sized + PartialEq>(a: &Arc<T>, b: &Arc<T>) -> bool {
            Arc::ptr_eq(a, b) || a == b
        }
        let same_extra = match (self.extra, key.extra) {
            (Some(a), Some(b)) => std::ptr::eq(a, b) || a == b,
            (a, b) => a.is_none() && b.is_none(),
        };
        let same_step = match (self.step, &key.step) {
            (Some(a), Some(b)) => same(a, b),
            (a, b) => a.is_none() && b.is_none(),
        };
        same(self.flow, &key.flow)
            && same_extra
            && same_step
            && same(self.start, &key.start)
            && same(self.end, &key.end)
    }

    fn to_labels(self, layout: &Arc<Layout>) -> SeriesLabels {
        debug_assert_eq!(layout.extra.is_some(), self.extra.is_some());
        SeriesLabels {
            layout: layout.clone(),
            flow: self.flow.clone(),
            extra: self.extra,
            step: self.step.cloned(),
            start: self.start.clone(),
            end: self.end.clone(),
        }
    }

    fn flow(&self) -> Option<&str> {
        Some(self.flow)
    }
}

/// Builds a series' metric; sees the flow name (`None` for the overflow series).
type Constructor<M> = Box<dyn Fn(Option<&str>) -> M + Send + Sync>;

/// Shared by every limited family: counts folds per family and rate-limits the warning.
pub struct OverflowReporter {
    counter_for: Box<dyn Fn(&'static str) -> Counter + Send + Sync>,
    /// One rate-limited warning per family.
    warnings: RwLock<HashMap<&'static str, RateLimited>>,
}

const OVERFLOW_WARN_EVERY: Duration = Duration::from_secs(60);

impl OverflowReporter {
    pub fn new(counter_for: impl Fn(&'static str) -> Counter + Send + Sync + 'static) -> Self {
        Self {
            counter_for: Box::new(counter_for),
            warnings: RwLock::new(HashMap::new()),
        }
    }

    /// Counts one recording folded into `metric`'s overflow series, and warns (at most
    /// once a minute per family).
    pub(super) fn folded(&self, metric: &'static str, max: usize) {
        (self.counter_for)(metric).inc();
        let warn = |limit: &RateLimited| {
            limit.warn(format_args!(
                "series limit reached (limits.max_series_per_metric = {max}) in {metric}: new \
                 label sets are recorded in the otel_metric_overflow=\"true\" series"
            ));
        };
        if let Some(limit) = self
            .warnings
            .read()
            .unwrap_or_else(PoisonError::into_inner)
            .get(metric)
        {
            return warn(limit);
        }
        let mut warnings = self
            .warnings
            .write()
            .unwrap_or_else(PoisonError::into_inner);
        warn(
            warnings
                .entry(metric)
                .or_insert_with(|| RateLimited::new(OVERFLOW_WARN_EVERY)),
        );
    }
}

/// What every limited family of one registry shares: `limits.max_series_per_metric`,
/// where folds are counted, and the clock that stamps each recording (for idle series).
/// Cheap to clone.
#[derive(Clone)]
pub struct SeriesLimit {
    pub max_series: usize,
    pub overflow: Arc<OverflowReporter>,
    /// Seconds since start, shared by the families.
    pub clock: Arc<AtomicU64>,
}

/// The `metric` label of `flowmetrics_series_overflow_total`: the folding family's
/// sample name.
#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct MetricLabel {
    metric: &'static str,
}

impl SeriesLimit {
    /// Registers `flowmetrics_series_overflow`, where every family under this limit
    /// counts the recordings it folds.
    pub fn registered(registry: &mut Registry, max_series: usize) -> Self {
        let folds = Family::<MetricLabel, Counter>::default();
        registry.register(
            "flowmetrics_series_overflow",
            "Recordings folded into a family's otel_metric_overflow=\"true\" series because \
             the family reached limits.max_series_per_metric",
            folds.clone(),
        );
        Self {
            max_series,
            overflow: Arc::new(OverflowReporter::new(move |metric| {
                folds.get_or_create(&MetricLabel { metric }).clone()
            })),
            clock: Arc::new(AtomicU64::new(0)),
        }
    }

    /// A family under this limit. `name`: the sample name as exposed (`…_total` for
    /// counters, `…_seconds` for durations), the `metric` label of its folds.
    pub fn family<M, L: SeriesLabelSet>(
        &self,
        name: &'static str,
        layout: L::Layout,
        make: impl Fn(Option<&str>) -> M + Send + Sync + 'static,
    ) -> LimitedFamily<M, L> {
        LimitedFamily::new(name, self.clone(), layout, make)
    }
}

/// Cheap to clone: clones share the series (as prometheus-client's `Family` does).
pub struct LimitedFamily<M, L: SeriesLabelSet = SeriesLabels> {
    inner: Arc<Inner<M, L>>,
}

impl<M, L: SeriesLabelSet> Clone for LimitedFamily<M, L> {
    fn clone(&self) -> Self {
        Self {
            inner: self.inner.clone(),
        }
    }
}

struct Series<M, L> {
    hash: u64,
    /// Shared with the pinned copies a scrape encodes from.
    labels: Arc<L>,
    metric: M,
    /// The family clock's reading at the last recording (or creation).
    touched: AtomicU64,
}

struct Inner<M, L: SeriesLabelSet> {
    /// The sample name as exposed (`…_total` for counters): the overflow counter's
    /// `metric` label.
    name: &'static str,
    limit: SeriesLimit,
    layout: Arc<L::Layout>,
    hasher: DefaultHashBuilder,
    series: RwLock<HashTable<Series<M, L>>>,
    /// What the next encode writes instead of the live series (see [`Self::pin`]).
    pinned: Mutex<Option<Pinned<M, L>>>,
    /// Kept apart from `series`, so a full family folds under the read lock.
    overflow_series: OnceLock<M>,
    make: Constructor<M>,
}

/// The locks, poisoned or not: a panic elsewhere leaves the series as they were.
impl<M, L: SeriesLabelSet> Inner<M, L> {
    fn read(&self) -> RwLockReadGuard<'_, HashTable<Series<M, L>>> {
        self.series.read().unwrap_or_else(PoisonError::into_inner)
    }

    fn write(&self) -> RwLockWriteGuard<'_, HashTable<Series<M, L>>> {
        self.series.write().unwrap_or_else(PoisonError::into_inner)
    }

    fn pinned(&self) -> MutexGuard<'_, Option<Pinned<M, L>>> {
        self.pinned.lock().unwrap_or_else(PoisonError::into_inner)
    }
}

impl<M, L: SeriesLabelSet> std::fmt::Debug for LimitedFamily<M, L> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("LimitedFamily")
            .field("name", &self.inner.name)
            .finish_non_exhaustive()
    }
}

impl<M, L: SeriesLabelSet> LimitedFamily<M, L> {
    pub fn new(
        name: &'static str,
        limit: SeriesLimit,
        layout: L::Layout,
        make: impl Fn(Option<&str>) -> M + Send + Sync + 'static,
    ) -> Self {
        Self {
            inner: Arc::new(Inner {
                name,
                limit,
                layout: Arc::new(layout),
                hasher: DefaultHashBuilder::default(),
                series: RwLock::new(HashTable::new()),
                pinned: Mutex::new(None),
                overflow_series: OnceLock::new(),
                make: Box::new(make),
            }),
        }
    }

    /// The sample name as exposed.
    pub fn name(&self) -> &'static str {
        self.inner.name
    }

    /// Runs `f` on the series for `labels`, creating it (or folding into the overflow
    /// series when the family is full). Allocates only when it creates a series.
    pub fn with<R>(&self, labels: impl SeriesKey<L>, f: impl FnOnce(&M) -> R) -> R {
        self.lookup(labels, &mut false, f)
    }

    /// As [`Self::with`], and says whether this call created the series.
    pub fn with_created(&self, labels: impl SeriesKey<L>, f: impl FnOnce(&M)) -> bool {
        let mut created = false;
        self.lookup(labels, &mut created, f);
        created
    }

    fn lookup<R>(
        &self,
        labels: impl SeriesKey<L>,
        created: &mut bool,
        f: impl FnOnce(&M) -> R,
    ) -> R {
        let this = &*self.inner;
        let (max, clock) = (this.limit.max_series, &this.limit.clock);
        let hash = labels.hash_with(&this.hasher);
        {
            let series = this.read();
            if let Some(s) = series.find(hash, |s| labels.matches(&s.labels)) {
                // Written only when the clock moved: the line stays clean between ticks.
                let now = clock.load(Ordering::Relaxed);
                if s.touched.load(Ordering::Relaxed) != now {
                    s.touched.store(now, Ordering::Relaxed);
                }
                return f(&s.metric);
            }
            // The family never shrinks: full now means full for good.
            if series.len() >= max {
                drop(series);
                return self.fold(f);
            }
        }
        let mut series = this.write();
        if let Some(s) = series.find(hash, |s| labels.matches(&s.labels)) {
            return f(&s.metric);
        }
        if series.len() >= max {
            drop(series);
            return self.fold(f);
        }
        let new = Series {
            hash,
            labels: Arc::new(labels.to_labels(&this.layout)),
            metric: (this.make)(labels.flow()),
            touched: AtomicU64::new(clock.load(Ordering::Relaxed)),
        };
        let entry = series.insert_unique(hash, new, |s| s.hash);
        *created = true;
        f(&entry.get().metric)
    }

    /// Calls `f` with every series' labels and the clock reading of its last recording.
    pub fn for_each(&self, mut f: impl FnMut(&L, u64)) {
        let series = self.inner.read();
        for s in series.iter() {
            f(&s.labels, s.touched.load(Ordering::Relaxed));
        }
    }

    /// Calls `f` with every series' labels and metric (not the overflow series: it belongs
    /// to no label set).
    pub fn for_each_metric(&self, mut f: impl FnMut(&L, &M)) {
        let series = self.inner.read();
        for s in series.iter() {
            f(&s.labels, &s.metric);
        }
    }

    /// Removes the series for which `keep` (labels, last recording, metric) is false,
    /// freeing their places under the limit; returns how many went.
    pub fn retain(&self, mut keep: impl FnMut(&L, u64, &M) -> bool) -> usize {
        let mut series = self.inner.write();
        let before = series.len();
        series.retain(|s| keep(&s.labels, s.touched.load(Ordering::Relaxed), &s.metric));
        let removed = before - series.len();
        if removed > 0 && series.len() < series.capacity() / 4 {
            series.shrink_to_fit(|s| s.hash);
        }
        removed
    }

    fn fold<R>(&self, f: impl FnOnce(&M) -> R) -> R {
        let this = &*self.inner;
        this.limit.overflow.folded(this.name, this.limit.max_series);
        f(this.overflow_series.get_or_init(|| (this.make)(None)))
    }

    /// Series held now (including the overflow series).
    pub fn len(&self) -> usize {
        self.inner.read().len() + usize::from(self.inner.overflow_series.get().is_some())
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }
}

/// A reading of a series taken while reports are held (see [`LimitedFamily::pin`]).
#[derive(Clone, Copy, Debug)]
pub enum Reading {
    Count(u64),
    Level(i64),
}

/// What an encoder answers.
type Written = Result<(), std::fmt::Error>;

/// No exemplar: the type prometheus-client's encoder needs to be told.
type NoExemplar = Option<&'static Exemplar<Vec<(String, String)>, u64>>;

/// A metric whose value can be read now and written later as read. Histograms answer
/// `None` (prometheus-client has no reader for their buckets; they take no part in the
/// invariant of docs/behaviour.md §3) and are written as they are when encoded.
pub trait Pinnable: EncodeMetric + TypedMetric + Clone {
    fn read(&self) -> Option<Reading>;

    /// Writes `reading` (taken from `self` by [`Pinnable::read`]) as this metric's value.
    fn encode_reading(&self, reading: Reading, mut encoder: MetricEncoder) -> Written {
        match reading {
            Reading::Count(v) => encoder.encode_counter(&v, NoExemplar::None),
            Reading::Level(v) => encoder.encode_gauge(&v),
        }
    }
}

impl Pinnable for Counter {
    fn read(&self) -> Option<Reading> {
        Some(Reading::Count(self.get()))
    }
}

impl Pinnable for Gauge {
    fn read(&self) -> Option<Reading> {
        Some(Reading::Level(self.get()))
    }
}

impl<S: EncodeLabelSet + Send + Sync + std::fmt::Debug + 'static> Pinnable
    for CounterWithExemplar<S>
{
    fn read(&self) -> Option<Reading> {
        Some(Reading::Count(self.get().0))
    }

    /// The value as read; the exemplar as it is now (a sample trace, newer at most).
    fn encode_reading(&self, reading: Reading, mut encoder: MetricEncoder) -> Written {
        match reading {
            Reading::Count(v) => {
                let (_, exemplar) = self.get();
                encoder.encode_counter(&v, exemplar.as_ref())
            }
            Reading::Level(_) => self.encode(encoder),
        }
    }
}

impl Pinnable for prometheus_client::metrics::histogram::Histogram {
    fn read(&self) -> Option<Reading> {
        None
    }
}

/// One series as an encode writes it: its labels (`None`: the overflow series), its
/// metric, and the reading taken when pinned (`None`: written as it is then).
struct PinnedSeries<M, L> {
    labels: Option<Arc<L>>,
    metric: M,
    reading: Option<Reading>,
}

type Pinned<M, L> = Vec<PinnedSeries<M, L>>;

impl<M: Pinnable, L: SeriesLabelSet> LimitedFamily<M, L> {
    /// Copies the family's series (labels and metric handles, shared, and each value as
    /// read now) for the next encode, which then writes this copy and holds no lock of
    /// the family while it writes. Taken for every invariant family while reports are
    /// held, it makes the exposition one consistent cut (docs/behaviour.md §3) at the
    /// cost of a walk over the series, not of the whole encode.
    pub fn pin(&self) {
        let pinned = self.copy_series();
        *self.inner.pinned() = Some(pinned);
    }

    /// Drops a pinned copy the encode did not take (a family it skipped).
    pub fn unpin(&self) {
        self.inner.pinned().take();
    }

    fn copy_series(&self) -> Pinned<M, L> {
        let this = &*self.inner;
        let series = this.read();
        let mut out = Vec::with_capacity(series.len() + 1);
        out.extend(series.iter().map(|s| PinnedSeries {
            labels: Some(s.labels.clone()),
            reading: s.metric.read(),
            metric: s.metric.clone(),
        }));
        drop(series);
        if let Some(m) = this.overflow_series.get() {
            out.push(PinnedSeries {
                labels: None,
                reading: m.read(),
                metric: m.clone(),
            });
        }
        out
    }
}

impl<M: Pinnable, L: SeriesLabelSet> EncodeMetric for LimitedFamily<M, L> {
    /// Every series, the overflow series last: the pinned copy when there is one, else a
    /// copy made now (so the family's lock is not held while the text is written).
    fn encode(&self, mut encoder: MetricEncoder) -> Result<(), std::fmt::Error> {
        let pinned = self.inner.pinned().take();
        let series = pinned.unwrap_or_else(|| self.copy_series());
        for s in &series {
            let family = match &s.labels {
                Some(labels) => encoder.encode_family(&**labels)?,
                None => encoder.encode_family(&OVERFLOW_LABELS)?,
            };
            match s.reading {
                Some(reading) => s.metric.encode_reading(reading, family)?,
                None => s.metric.encode(family)?,
            }
        }
        Ok(())
    }

    fn metric_type(&self) -> MetricType {
        M::TYPE
    }

    /// A family without series is left out of the exposition (no HELP/TYPE lines); with
    /// a pinned copy, that copy decides.
    fn is_empty(&self) -> bool {
        match &*self.inner.pinned() {
            Some(pinned) => pinned.is_empty(),
            None => LimitedFamily::is_empty(self),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use prometheus_client::encoding::text::encode;
    use prometheus_client::metrics::histogram::Histogram;
    use prometheus_client::registry::Registry;

    fn dims(values: &[&str]) -> DimValues {
        values.iter().map(|v| Arc::from(*v)).collect()
    }

    fn names(names: &[&str]) -> Arc<[Box<str>]> {
        names.iter().map(|n| Box::from(*n)).collect()
    }

    fn counters(max: usize, layout: Layout) -> (LimitedFamily<Counter>, Counter) {
        let folds = Counter::default();
        let f2 = folds.clone();
        let limit = SeriesLimit {
            max_series: max,
            overflow: Arc::new(OverflowReporter::new(move |_| f2.clone())),
            clock: Arc::new(AtomicU64::new(0)),
        };
        (
            limit.family("x_total", layout, |_| Counter::default()),
            folds,
        )
    }

    fn flow_only<'a>(flow: &'a Arc<str>, none: &'a DimValues) -> SeriesRef<'a> {
        SeriesRef {
            flow,
            extra: None,
            step: None,
            start: none,
            end: none,
        }
    }

    fn text(
        name: &str,
        family: impl EncodeMetric + Send + Sync + std::fmt::Debug + 'static,
    ) -> String {
        let mut registry = Registry::default();
        registry.register(name, "X", family);
        let mut out = String::new();
        encode(&mut out, &registry).unwrap();
        out
    }

    #[test]
    fn finds_a_series_by_content_when_the_arcs_differ() {
        let layout = Layout {
            extra: Some("outcome"),
            step: None,
            start_dims: names(&["region"]),
            end_dims: names(&["code"]),
        };
        let (fam, _) = counters(10, layout);
        let (flow_a, flow_b): (Arc<str>, Arc<str>) = (Arc::from("checkout"), Arc::from("checkout"));
        let (start_a, start_b) = (dims(&["eu"]), dims(&["eu"]));
        let (end_a, end_b) = (dims(&["200"]), dims(&["200"]));
        assert!(!Arc::ptr_eq(&flow_a, &flow_b) && !Arc::ptr_eq(&start_a, &start_b));
        fn key<'a>(
            flow: &'a Arc<str>,
            start: &'a DimValues,
            end: &'a DimValues,
            extra: &'static str,
        ) -> SeriesRef<'a> {
            SeriesRef {
                flow,
                extra: Some(extra),
                step: None,
                start,
                end,
            }
        }
        fam.with(key(&flow_a, &start_a, &end_a, "success"), Counter::inc);
        fam.with(key(&flow_b, &start_b, &end_b, "success"), Counter::inc);
        assert_eq!(fam.len(), 1);
        assert_eq!(
            fam.with(key(&flow_b, &start_a, &end_b, "success"), Counter::get),
            2
        );
        // Any differing value is another series.
        fam.with(key(&flow_a, &start_a, &end_a, "failure"), Counter::inc);
        fam.with(
            key(&flow_a, &dims(&["us"]), &end_a, "success"),
            Counter::inc,
        );
        fam.with(key(&flow_a, &start_a, &dims(&["500"]), "success"), |c| {
            c.inc()
        });
        fam.with(key(&Arc::from("login"), &start_a, &end_a, "success"), |c| {
            c.inc()
        });
        assert_eq!(fam.len(), 5);
    }

    #[test]
    fn folds_into_one_overflow_series_past_the_limit() {
        let (fam, folds) = counters(3, Layout::default());
        let none = dims(&[]);
        let flows: Vec<Arc<str>> = (0..100).map(|i| Arc::from(i.to_string())).collect();
        for flow in &flows {
            fam.with(flow_only(flow, &none), Counter::inc);
        }
        // Existing series keep counting.
        fam.with(flow_only(&flows[0], &none), Counter::inc);
        assert_eq!(fam.len(), 4);
        assert_eq!(fam.with(flow_only(&flows[0], &none), Counter::get), 2);
        assert_eq!(folds.get(), 97);

        let out = text("x", fam);
        assert!(
            out.contains("x_total{otel_metric_overflow=\"true\"} 97\n"),
            "{out}"
        );
        assert_eq!(out.matches("x_total{").count(), 4);
    }

    #[test]
    fn a_zero_limit_records_everything_in_the_overflow_series() {
        let (fam, folds) = counters(0, Layout::default());
        let (none, flow) = (dims(&[]), Arc::from("a"));
        fam.with(flow_only(&flow, &none), Counter::inc);
        fam.with(flow_only(&flow, &none), Counter::inc);
        assert_eq!((fam.len(), folds.get()), (1, 2));
    }

    #[test]
    fn the_constructor_sees_the_flow_and_labels_are_escaped() {
        let limit = SeriesLimit {
            max_series: 10,
            overflow: Arc::new(OverflowReporter::new(|_| Counter::default())),
            clock: Arc::new(AtomicU64::new(0)),
        };
        let layout = Layout {
            extra: None,
            step: None,
            start_dims: names(&["region", "tier"]),
            end_dims: names(&["code"]),
        };
        let fam: LimitedFamily<Histogram> =
            limit.family("d_seconds", layout, |flow: Option<&str>| {
                let buckets: &[f64] = if flow == Some("checkout") {
                    &[0.5]
                } else {
                    &[1.0, 2.0]
                };
                Histogram::new(buckets.iter().copied())
            });
        let flow: Arc<str> = Arc::from("checkout");
        let (start, end) = (dims(&["eu", "a\"b\\c\nd"]), dims(&["200"]));
        let key = SeriesRef {
            flow: &flow,
            extra: None,
            step: None,
            start: &start,
            end: &end,
        };
        fam.with(key, |h| h.observe(0.25));
        let out = text("d", fam);
        let labels = r#"flow="checkout",region="eu",tier="a\"b\\c\nd",code="200""#;
        assert!(
            out.contains(&format!("d_bucket{{le=\"0.5\",{labels}}} 1\n")),
            "{out}"
        );
        assert!(!out.contains("le=\"1.0\""), "{out}");
    }
}
