//! The flow families (docs/behaviour.md §3, §4): instances started, restored, completed
//! by outcome, errors, durations, in progress, dropped, unmatched ends and negative
//! durations. Each is a [`LimitedFamily`] keyed by the flow, an optional extra label,
//! and the start and end dimensions its layout names. Registered here; recorded from
//! the store's reports.

use std::collections::HashMap;
use std::sync::Arc;

use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::exemplar::CounterWithExemplar;
use prometheus_client::metrics::gauge::Gauge;

use super::duration::{DurationSeries, HistogramMode};
use super::family::{Layout, LimitedFamily, SeriesLabels, SeriesRef};
use super::{MetricsSettings, Registrar, TraceExemplar};
use crate::flows::event::{DimValues, Outcome};
use crate::flows::store::EndRecord;

type ExemplarCounter = CounterWithExemplar<TraceExemplar>;

const OUTCOMES: [Outcome; 3] = [Outcome::Success, Outcome::Failure, Outcome::Cancelled];

/// `error_reason` of `flowmetrics_flow_errors_total`.
#[derive(Clone, Copy, Debug)]
enum ErrorReason {
    Failure,
    Incomplete,
}

impl ErrorReason {
    fn label(self) -> &'static str {
        match self {
            ErrorReason::Failure => "failure",
            ErrorReason::Incomplete => "incomplete",
        }
    }
}

/// `reason` of `flowmetrics_flows_dropped_total`.
#[derive(Clone, Copy, Debug)]
enum DropReason {
    /// The correlation store was full.
    Capacity,
    /// Restored for a flow the configuration no longer tracks.
    ConfigChanged,
}

impl DropReason {
    fn label(self) -> &'static str {
        match self {
            DropReason::Capacity => "capacity",
            DropReason::ConfigChanged => "config_changed",
        }
    }
}

pub(super) struct FlowFamilies {
    pub(super) started: LimitedFamily<Counter>,
    pub(super) restored: LimitedFamily<Counter>,
    pub(super) completed: LimitedFamily<ExemplarCounter>,
    pub(super) errors: LimitedFamily<Counter>,
    pub(super) duration: LimitedFamily<DurationSeries>,
    pub(super) in_progress: LimitedFamily<Gauge>,
    pub(super) dropped: LimitedFamily<Counter>,
    pub(super) unmatched_ends: LimitedFamily<Counter>,
    pub(super) negative_durations: LimitedFamily<Counter>,
    /// No dimension values (families without start or end dimensions).
    no_dims: DimValues,
    /// One empty value per end dimension: series whose instance had no end.
    empty_end_dims: DimValues,
    has_end_dims: bool,
}

/// Label names as the layouts keep them.
pub(super) fn label_names(names: &[String]) -> Arc<[Box<str>]> {
    names.iter().map(|n| Box::from(n.as_str())).collect()
}

impl FlowFamilies {
    pub(super) fn register(r: &mut Registrar<'_>) -> Self {
        let settings = r.settings;
        let start_dims = label_names(&settings.start_dim_labels);
        let end_dims = label_names(&settings.end_dim_labels);
        let flow_only = Layout::default;
        let with_start = || Layout {
            start_dims: start_dims.clone(),
            ..Layout::default()
        };
        let with_dims = |extra| Layout {
            extra,
            step: None,
            start_dims: start_dims.clone(),
            end_dims: end_dims.clone(),
        };
        Self {
            started: r.counters(
                (
                    "flowmetrics_flows_started_total",
                    "Flow instances opened by a start event",
                ),
                with_start(),
            ),
            restored: r.counters(
                (
                    "flowmetrics_flows_restored_total",
                    "Open flow instances read back from the state file at start (state.path); \
                 they count here instead of in flowmetrics_flows_started_total",
                ),
                with_start(),
            ),
            completed: r.family(
                (
                    "flowmetrics_flows_completed_total",
                    "Flow instances closed by an end event, by outcome (success, failure, \
                 cancelled)",
                ),
                with_dims(Some("outcome")),
                |_| ExemplarCounter::default(),
            ),
            errors: r.counters(
                (
                    "flowmetrics_flow_errors_total",
                    "Failed flows: error_reason=\"failure\" for failure ends, \"incomplete\" for \
                 instances whose timeout passed without an end",
                ),
                with_dims(Some("error_reason")),
            ),
            duration: r.family(
                (
                    "flowmetrics_flow_duration_seconds",
                    "Start-to-end duration of successful flows, from the two events' timestamps",
                ),
                with_dims(None),
                duration_series(settings),
            ),
            in_progress: r.family(
                (
                    "flowmetrics_flows_in_progress",
                    "Flow instances open now (started, not yet ended, timed out or dropped)",
                ),
                flow_only(),
                |_| Gauge::default(),
            ),
            dropped: r.counters(
                (
                    "flowmetrics_flows_dropped_total",
                    "Open flow instances dropped before they ended; reason=\"capacity\": the \
                 correlation store was full (limits.max_in_flight); reason=\"config_changed\": \
                 restored from the state file for a flow the configuration no longer tracks",
                ),
                Layout {
                    extra: Some("reason"),
                    ..Layout::default()
                },
            ),
            unmatched_ends: r.counters(
                (
                    "flowmetrics_flow_unmatched_ends_total",
                    "End events whose start never arrived within the flow's timeout (or that \
                 were evicted from a full store while waiting)",
                ),
                flow_only(),
            ),
            negative_durations: r.counters(
                (
                    "flowmetrics_flow_negative_durations_total",
                    "Successful flows whose end timestamp is earlier than their start (clock \
                 skew); not observed in the duration histogram",
                ),
                flow_only(),
            ),
            no_dims: Arc::from([]),
            empty_end_dims: end_dims.iter().map(|_| Arc::from("")).collect(),
            has_end_dims: !end_dims.is_empty(),
        }
    }
}

/// The duration histogram's constructor: per-flow buckets and shape (`flows.*.buckets`,
/// `flows.*.histogram`), else the default ones.
fn duration_series(
    settings: &MetricsSettings,
) -> impl Fn(Option<&str>) -> DurationSeries + Send + Sync + 'static {
    // As prometheus-client keeps them: finite bounds (`+Inf` is implicit).
    let finite =
        |b: &[f64]| -> Arc<[f64]> { b.iter().copied().filter(|b| b.is_finite()).collect() };
    let default_buckets = finite(&settings.default_buckets);
    let per_flow: HashMap<String, Arc<[f64]>> = settings
        .per_flow_buckets
        .iter()
        .map(|(flow, b)| (flow.clone(), finite(b)))
        .collect();
    let default_shape = settings.default_histogram;
    let per_flow_shape = settings.per_flow_histogram.clone();
    let native_family = std::iter::once(&default_shape)
        .chain(per_flow_shape.values())
        .any(|s| s.mode != HistogramMode::Classic);
    move |flow: Option<&str>| {
        let buckets = flow
            .and_then(|f| per_flow.get(f))
            .unwrap_or(&default_buckets);
        let shape = flow
            .and_then(|f| per_flow_shape.get(f))
            .unwrap_or(&default_shape);
        DurationSeries::new(buckets.clone(), *shape, native_family)
    }
}

/// Recording, from the store's reports (docs/behaviour.md §3 holds across them: each
/// report is atomic to a scrape, see `Metrics::report`).
impl FlowFamilies {
    fn flow_only<'a>(&'a self, flow: &'a Arc<str>) -> SeriesRef<'a> {
        SeriesRef {
            flow,
            extra: None,
            step: None,
            start: &self.no_dims,
            end: &self.no_dims,
        }
    }

    /// flow, [extra], start dims, end dims (empty values when the instance had no end).
    fn with_dims<'a>(
        &'a self,
        flow: &'a Arc<str>,
        extra: Option<&'static str>,
        start_dims: &'a DimValues,
        end_dims: Option<&'a DimValues>,
    ) -> SeriesRef<'a> {
        SeriesRef {
            flow,
            extra,
            step: None,
            start: start_dims,
            end: end_dims.unwrap_or(&self.empty_end_dims),
        }
    }

    /// An instance opened by a start event, or (`restored`) read back from the state
    /// file. True when its label set is new: its zero series are then created.
    pub(super) fn opened(&self, flow: &Arc<str>, start_dims: &DimValues, restored: bool) -> bool {
        let family = if restored {
            &self.restored
        } else {
            &self.started
        };
        let key = SeriesRef {
            start: start_dims,
            ..self.flow_only(flow)
        };
        let first = family.with_created(key, |c| {
            c.inc();
        });
        if first {
            self.create_zero_series(flow, start_dims, None);
        }
        self.in_progress.with(self.flow_only(flow), Gauge::inc);
        first
    }

    /// An instance read back from the state file for a flow no longer tracked.
    pub(super) fn discarded(&self, flow: &Arc<str>, start_dims: &DimValues) {
        let key = SeriesRef {
            start: start_dims,
            ..self.flow_only(flow)
        };
        self.restored.with(key, |c| {
            c.inc();
        });
        self.drop_one(flow, DropReason::ConfigChanged);
    }

    fn drop_one(&self, flow: &Arc<str>, reason: DropReason) {
        let labels = SeriesRef {
            extra: Some(reason.label()),
            ..self.flow_only(flow)
        };
        self.dropped.with(labels, Counter::inc);
    }

    /// An open instance dropped because the store was full.
    pub(super) fn dropped(&self, flow: &Arc<str>) {
        self.drop_one(flow, DropReason::Capacity);
        self.in_progress.with(self.flow_only(flow), Gauge::dec);
    }

    /// An instance whose timeout passed without an end.
    pub(super) fn timed_out(&self, flow: &Arc<str>, start_dims: &DimValues) {
        let labels = self.with_dims(
            flow,
            Some(ErrorReason::Incomplete.label()),
            start_dims,
            None,
        );
        self.errors.with(labels, Counter::inc);
        self.in_progress.with(self.flow_only(flow), Gauge::dec);
    }

    pub(super) fn unmatched_end(&self, flow: &Arc<str>) {
        self.unmatched_ends.with(self.flow_only(flow), Counter::inc);
    }

    /// A label set's `completed{outcome}` and `errors{error_reason}` series, at 0, so
    /// `rate()` and alerts see them from the first scrape (docs/behaviour.md §4). Called
    /// when a label set is first seen: with `end` `None` (a start) only the series whose
    /// labels a start already knows; with end dimensions configured, the outcomes of a
    /// (start, end) label set are created when its first end arrives.
    fn create_zero_series(&self, flow: &Arc<str>, start: &DimValues, end: Option<&DimValues>) {
        let incomplete = self.with_dims(flow, Some(ErrorReason::Incomplete.label()), start, None);
        self.errors.with(incomplete, |_| ());
        if end.is_none() && self.has_end_dims {
            return;
        }
        for outcome in OUTCOMES {
            let labels = self.with_dims(flow, Some(outcome.as_str()), start, end);
            self.completed.with(labels, |_| ());
        }
        let failure = self.with_dims(flow, Some(ErrorReason::Failure.label()), start, end);
        self.errors.with(failure, |_| ());
    }

    /// An instance closed by an end event.
    pub(super) fn completed(
        &self,
        flow: &Arc<str>,
        start_dims: &DimValues,
        end: &EndRecord,
        duration_secs: f64,
    ) {
        let outcome = Some(end.outcome.as_str());
        let exemplar = end.trace.map(TraceExemplar);
        let labels = |extra| self.with_dims(flow, extra, start_dims, Some(&end.dims));
        let first = self.completed.with_created(labels(outcome), |c| {
            c.inc_by(1, exemplar, None);
        });
        if first && self.has_end_dims {
            self.create_zero_series(flow, start_dims, Some(&end.dims));
        }
        self.in_progress.with(self.flow_only(flow), Gauge::dec);
        match end.outcome {
            Outcome::Failure => self
                .errors
                .with(labels(Some(ErrorReason::Failure.label())), |c| {
                    c.inc();
                }),
            Outcome::Success if duration_secs < 0.0 => {
                self.negative_durations.with(self.flow_only(flow), |c| {
                    c.inc();
                });
            }
            Outcome::Success => self
                .duration
                .with(labels(None), |h| h.observe(duration_secs, exemplar)),
            Outcome::Cancelled => {}
        }
    }
}

/// What a scrape and idle removal do with the families.
impl FlowFamilies {
    /// Pins (or unpins) the families of the invariant of docs/behaviour.md §3: started,
    /// restored, completed, errors, in progress, dropped.
    pub(super) fn pin(&self, pin: bool) {
        fn set<M: super::family::Pinnable>(f: &LimitedFamily<M>, pin: bool) {
            if pin {
                f.pin();
            } else {
                f.unpin();
            }
        }
        set(&self.started, pin);
        set(&self.restored, pin);
        set(&self.completed, pin);
        set(&self.errors, pin);
        set(&self.in_progress, pin);
        set(&self.dropped, pin);
    }

    /// The families whose series belong to a (flow, start dimensions) label set.
    pub(super) fn note_label_sets(&self, note: &mut impl FnMut(&SeriesLabels, u64)) {
        self.started.for_each(&mut *note);
        self.completed.for_each(&mut *note);
        self.errors.for_each(&mut *note);
        self.duration.for_each(&mut *note);
    }

    /// Removes the label-set series `keep` refuses.
    pub(super) fn retain_label_sets(&self, keep: &impl Fn(&SeriesLabels) -> bool) -> usize {
        self.started.retain(|l, _, _| keep(l))
            + self.completed.retain(|l, _, _| keep(l))
            + self.errors.retain(|l, _, _| keep(l))
            + self.duration.retain(|l, _, _| keep(l))
    }

    /// Removes the per-flow series `keep_flow` refuses (never an in-progress gauge
    /// that is not at 0).
    pub(super) fn retain_flows(&self, keep_flow: &impl Fn(&SeriesLabels, u64) -> bool) -> usize {
        self.in_progress
            .retain(|l, t, g| keep_flow(l, t) || g.get() != 0)
            + self.dropped.retain(|l, t, _| keep_flow(l, t))
            + self.unmatched_ends.retain(|l, t, _| keep_flow(l, t))
            + self.negative_durations.retain(|l, t, _| keep_flow(l, t))
    }

    /// Series counts per family (for tests and the benchmark).
    pub(super) fn series_counts(&self) -> [(&'static str, usize); 8] {
        [
            ("flows_started", self.started.len()),
            ("flows_completed", self.completed.len()),
            ("flow_errors", self.errors.len()),
            ("flow_duration", self.duration.len()),
            ("flows_in_progress", self.in_progress.len()),
            ("flows_dropped", self.dropped.len()),
            ("unmatched_ends", self.unmatched_ends.len()),
            ("negative_durations", self.negative_durations.len()),
        ]
    }
}
