//! A metric family with a series limit. prometheus-client's `Family` neither counts its
//! series nor lets a constructor see the labels (needed for per-flow buckets), so flow
//! families use this instead: at most `max_series` label sets, then one overflow series
//! labelled `otel_metric_overflow="true"` (the OpenTelemetry SDK convention).
//!
//! Recording is on the hot path: a series is found from borrowed label values
//! ([`SeriesRef`]) without allocating; the owned key and the label text are built only
//! when a series is created. Families write their own OpenMetrics text
//! ([`LimitedFamily::encode`]), from that label text.

use std::collections::HashMap;
use std::fmt::Write as _;
use std::hash::{BuildHasher, Hasher};
use std::sync::{Arc, Mutex, OnceLock, RwLock};
use std::time::{Duration, Instant};

use hashbrown::{DefaultHashBuilder, HashTable};
use prometheus_client::metrics::counter::Counter;

use super::instruments::{FlowMetric, Scratch};
use crate::flows::event::DimValues;

/// The label that marks the overflow series.
pub const OVERFLOW_LABEL: &str = "otel_metric_overflow";

/// Which labels a family's series carry, in exposition order: `flow`, then `extra` (e.g.
/// `outcome`), then the start dimensions, then the end dimensions.
#[derive(Clone, Debug, Default)]
pub struct Layout {
    pub extra: Option<&'static str>,
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
    pub start: &'a DimValues,
    pub end: &'a DimValues,
}

/// The owned form of [`SeriesRef`], kept with each series.
#[derive(Debug)]
struct SeriesKey {
    flow: Arc<str>,
    extra: Option<&'static str>,
    start: DimValues,
    end: DimValues,
}

impl SeriesRef<'_> {
    /// By content, so equal values held in different `Arc`s find the same series. Only
    /// the bytes are written (no length prefixes or separators): the layout is fixed per
    /// family, and a rare collision costs one more comparison, not a wrong match.
    #[inline]
    fn hash_with(&self, hasher: &DefaultHashBuilder) -> u64 {
        let mut h = hasher.build_hasher();
        h.write(self.flow.as_bytes());
        if let Some(extra) = self.extra {
            h.write(extra.as_bytes());
        }
        for value in self.start.iter().chain(self.end.iter()) {
            h.write(value.as_bytes());
        }
        h.finish()
    }

    #[inline]
    fn matches(&self, key: &SeriesKey) -> bool {
        // Names and values are interned upstream and `extra` is a constant, so the
        // pointer checks usually decide (`==` on an `Arc<str>` would compare bytes).
        fn same<T: ?Sized + PartialEq>(a: &Arc<T>, b: &Arc<T>) -> bool {
            Arc::ptr_eq(a, b) || a == b
        }
        let same_extra = match (self.extra, key.extra) {
            (Some(a), Some(b)) => std::ptr::eq(a, b) || a == b,
            (a, b) => a.is_none() && b.is_none(),
        };
        same(self.flow, &key.flow)
            && same_extra
            && same(self.start, &key.start)
            && same(self.end, &key.end)
    }

    fn to_key(self) -> SeriesKey {
        SeriesKey {
            flow: self.flow.clone(),
            extra: self.extra,
            start: self.start.clone(),
            end: self.end.clone(),
        }
    }

    /// `name="value",…` with values escaped as the text encoder escapes them.
    fn render(&self, layout: &Layout) -> Box<str> {
        debug_assert_eq!(layout.extra.is_some(), self.extra.is_some());
        let mut out = String::with_capacity(64);
        let mut label = |name: &str, value: &str| {
            if !out.is_empty() {
                out.push(',');
            }
            out.push_str(name);
            out.push_str("=\"");
            escape_into(&mut out, value);
            out.push('"');
        };
        label("flow", self.flow);
        if let (Some(name), Some(value)) = (layout.extra, self.extra) {
            label(name, value);
        }
        for (name, value) in layout.start_dims.iter().zip(self.start.iter()) {
            label(name, value);
        }
        for (name, value) in layout.end_dims.iter().zip(self.end.iter()) {
            label(name, value);
        }
        out.into_boxed_str()
    }
}

/// OpenMetrics label value escaping (backslash, double quote, newline).
fn escape_into(out: &mut String, value: &str) {
    for c in value.chars() {
        match c {
            '\\' => out.push_str("\\\\"),
            '"' => out.push_str("\\\""),
            '\n' => out.push_str("\\n"),
            c => out.push(c),
        }
    }
}

/// The overflow series' labels, rendered.
const OVERFLOW_LABELS: &str = "otel_metric_overflow=\"true\"";

/// Builds a series' metric; sees the flow name (`None` for the overflow series).
type Constructor<M> = Box<dyn Fn(Option<&str>) -> M + Send + Sync>;

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

struct Series<M> {
    hash: u64,
    key: SeriesKey,
    labels: Box<str>,
    metric: M,
}

struct Inner<M> {
    /// The sample name (`…_total` for counters); also the overflow warning's `metric`.
    name: &'static str,
    /// `# HELP`, `# TYPE` and `# UNIT` lines.
    header: Box<str>,
    max_series: usize,
    layout: Layout,
    hasher: DefaultHashBuilder,
    series: RwLock<HashTable<Series<M>>>,
    /// Kept apart from `series`, so a full family folds under the read lock.
    overflow_series: OnceLock<M>,
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

/// What a family's header says. `name` is the sample name as exposed (with `_total`
/// for counters, with the unit suffix when there is a unit); help gets a final `.`, as
/// prometheus-client's registry adds one.
pub struct Descriptor {
    pub name: &'static str,
    pub help: &'static str,
    pub unit: Option<&'static str>,
}

impl Descriptor {
    fn header<M: FlowMetric>(&self) -> Box<str> {
        let family = self.name.strip_suffix(M::SUFFIX).unwrap_or(self.name);
        debug_assert!(self.unit.is_none_or(|u| family.ends_with(&format!("_{u}"))));
        let (help, kind) = (self.help, M::TYPE);
        let mut header = format!("# HELP {family} {help}.\n# TYPE {family} {kind}\n");
        if let Some(unit) = self.unit {
            let _ = writeln!(header, "# UNIT {family} {unit}");
        }
        header.into_boxed_str()
    }
}

impl<M: FlowMetric> LimitedFamily<M> {
    pub fn new(
        descriptor: Descriptor,
        max_series: usize,
        layout: Layout,
        overflow: Arc<OverflowReporter>,
        make: impl Fn(Option<&str>) -> M + Send + Sync + 'static,
    ) -> Self {
        Self {
            inner: Arc::new(Inner {
                name: descriptor.name,
                header: descriptor.header::<M>(),
                max_series,
                layout,
                hasher: DefaultHashBuilder::default(),
                series: RwLock::new(HashTable::new()),
                overflow_series: OnceLock::new(),
                make: Box::new(make),
                overflow,
            }),
        }
    }

    /// Runs `f` on the series for `labels`, creating it (or folding into the overflow
    /// series when the family is full). Allocates only when it creates a series.
    pub fn with<R>(&self, labels: SeriesRef<'_>, f: impl FnOnce(&M) -> R) -> R {
        let this = &*self.inner;
        let hash = labels.hash_with(&this.hasher);
        {
            let series = this.series.read().expect("series lock");
            if let Some(s) = series.find(hash, |s| labels.matches(&s.key)) {
                return f(&s.metric);
            }
            // The family never shrinks: full now means full for good.
            if series.len() >= this.max_series {
                drop(series);
                return self.fold(f);
            }
        }
        let mut series = this.series.write().expect("series lock");
        if let Some(s) = series.find(hash, |s| labels.matches(&s.key)) {
            return f(&s.metric);
        }
        if series.len() >= this.max_series {
            drop(series);
            return self.fold(f);
        }
        let new = Series {
            hash,
            key: labels.to_key(),
            labels: labels.render(&this.layout),
            metric: (this.make)(Some(&**labels.flow)),
        };
        let entry = series.insert_unique(hash, new, |s| s.hash);
        f(&entry.get().metric)
    }

    /// Appends the family's text: the header and every series, the overflow series
    /// last; nothing while it has no series.
    pub fn encode(&self, out: &mut String) {
        let this = &*self.inner;
        let mut scratch = Scratch::default();
        let series = this.series.read().expect("series lock");
        let overflow = this.overflow_series.get();
        if series.is_empty() && overflow.is_none() {
            return;
        }
        out.push_str(&this.header);
        for s in series.iter() {
            s.metric.encode(out, this.name, &s.labels, &mut scratch);
        }
        drop(series);
        if let Some(m) = overflow {
            m.encode(out, this.name, OVERFLOW_LABELS, &mut scratch);
        }
    }

    fn fold<R>(&self, f: impl FnOnce(&M) -> R) -> R {
        let this = &*self.inner;
        this.overflow.folded(this.name, this.max_series);
        f(this.overflow_series.get_or_init(|| (this.make)(None)))
    }

    /// Series held now (including the overflow series).
    pub fn len(&self) -> usize {
        let regular = self.inner.series.read().expect("series lock").len();
        regular + usize::from(self.inner.overflow_series.get().is_some())
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::flows::event::TraceRef;
    use crate::metrics::instruments::{self, Buckets, ExemplarHistogram};

    fn dims(values: &[&str]) -> DimValues {
        values.iter().map(|v| Arc::from(*v)).collect()
    }

    fn names(names: &[&str]) -> Arc<[Box<str>]> {
        names.iter().map(|n| Box::from(*n)).collect()
    }

    fn counters(max: usize, layout: Layout) -> (LimitedFamily<instruments::Counter>, Counter) {
        let folds = Counter::default();
        let f2 = folds.clone();
        let reporter = Arc::new(OverflowReporter::new(move |_| f2.clone()));
        let descriptor = Descriptor {
            name: "x_total",
            help: "X",
            unit: None,
        };
        let fam = LimitedFamily::new(descriptor, max, layout, reporter, |_| {
            instruments::Counter::default()
        });
        (fam, folds)
    }

    fn flow_only<'a>(flow: &'a Arc<str>, none: &'a DimValues) -> SeriesRef<'a> {
        SeriesRef {
            flow,
            extra: None,
            start: none,
            end: none,
        }
    }

    #[test]
    fn finds_a_series_by_content_when_the_arcs_differ() {
        let layout = Layout {
            extra: Some("outcome"),
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
                start,
                end,
            }
        }
        fam.with(key(&flow_a, &start_a, &end_a, "success"), |c| c.inc());
        fam.with(key(&flow_b, &start_b, &end_b, "success"), |c| c.inc());
        assert_eq!(fam.len(), 1);
        assert_eq!(
            fam.with(key(&flow_b, &start_a, &end_b, "success"), |c| c.get()),
            2
        );
        // Any differing value is another series.
        fam.with(key(&flow_a, &start_a, &end_a, "failure"), |c| c.inc());
        fam.with(key(&flow_a, &dims(&["us"]), &end_a, "success"), |c| c.inc());
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
            fam.with(flow_only(flow, &none), |c| c.inc());
        }
        // Existing series keep counting.
        fam.with(flow_only(&flows[0], &none), |c| c.inc());
        assert_eq!(fam.len(), 4);
        assert_eq!(fam.with(flow_only(&flows[0], &none), |c| c.get()), 2);
        assert_eq!(folds.get(), 97);
        let overflow = fam.inner.overflow_series.get();
        assert_eq!(overflow.map(instruments::Counter::get), Some(97));

        let mut out = String::new();
        fam.encode(&mut out);
        assert!(out.starts_with("# HELP x X.\n# TYPE x counter\n"), "{out}");
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
        fam.with(flow_only(&flow, &none), |c| c.inc());
        fam.with(flow_only(&flow, &none), |c| c.inc());
        assert_eq!((fam.len(), folds.get()), (1, 2));
    }

    #[test]
    fn encodes_start_and_end_dims_and_an_exemplar() {
        let reporter = Arc::new(OverflowReporter::new(|_| Counter::default()));
        let layout = Layout {
            extra: None,
            start_dims: names(&["region", "tier"]),
            end_dims: names(&["code"]),
        };
        let descriptor = Descriptor {
            name: "d_seconds",
            help: "Durations",
            unit: Some("seconds"),
        };
        let fam = LimitedFamily::new(descriptor, 10, layout, reporter, |flow: Option<&str>| {
            let buckets: &[f64] = if flow == Some("checkout") {
                &[0.5]
            } else {
                &[1.0, 2.0]
            };
            ExemplarHistogram::new(Buckets::new(buckets))
        });
        let trace = TraceRef::from_ids(
            &[0, 1, 2, 3, 4, 5, 6, 7, 8, 9, 0xa, 0xb, 0xc, 0xd, 0xe, 0xff],
            &[0xde, 0xad, 0xbe, 0xef, 0, 1, 2, 3],
        );
        let flow: Arc<str> = Arc::from("checkout");
        let (start, end) = (dims(&["eu", "a\"b\\c\nd"]), dims(&["200"]));
        let key = SeriesRef {
            flow: &flow,
            extra: None,
            start: &start,
            end: &end,
        };
        fam.with(key, |h| h.observe(0.25, trace));

        let mut out = String::new();
        fam.encode(&mut out);
        let labels = r#"flow="checkout",region="eu",tier="a\"b\\c\nd",code="200""#;
        let exemplar =
            r#"# {trace_id="000102030405060708090a0b0c0d0eff",span_id="deadbeef00010203"} 0.25"#;
        let expected = format!(
            "# HELP d_seconds Durations.\n\
             # TYPE d_seconds histogram\n\
             # UNIT d_seconds seconds\n\
             d_seconds_sum{{{labels}}} 0.25\n\
             d_seconds_count{{{labels}}} 1\n\
             d_seconds_bucket{{le=\"0.5\",{labels}}} 1 {exemplar}\n\
             d_seconds_bucket{{le=\"+Inf\",{labels}}} 1\n"
        );
        assert_eq!(out, expected);
    }
}
