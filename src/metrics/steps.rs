//! The step families (docs/behaviour.md §9): steps reached, time from the start to each
//! step, transit between consecutive steps, where timed-out instances stalled, and steps
//! that never met their instance. The store decides what happened; this decides how it
//! is counted.

use std::collections::HashMap;
use std::sync::Arc;

use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::histogram::Histogram;

use super::duration::DurationSeries;
use super::family::{Layout, LimitedFamily, SeriesLabels, SeriesRef};
use super::flow_families::label_names;
use super::{Registrar, TraceExemplar};
use crate::flows::event::{DimValues, TraceRef};
use crate::flows::store::{StepTransit, StepUnmatchedReason};

/// Kept out of [`StepMetrics::register`]: a brace inside a string split over lines.
const STALLED_HELP: &str = "Timed-out instances by the latest step they reached by event \
     timestamp (last_step=\"start\": none); per flow they sum to \
     flowmetrics_flow_errors_total{error_reason=\"incomplete\"}";

pub(super) struct StepMetrics {
    pub(super) steps: LimitedFamily<Counter>,
    /// With a tally of its buckets beside it, for the overview (time to step).
    pub(super) duration: LimitedFamily<DurationSeries>,
    transit: LimitedFamily<Histogram>,
    pub(super) stalled: LimitedFamily<Counter>,
    unmatched: LimitedFamily<Counter>,
    /// Flows with declared steps, in order: their series exist from the first event.
    pub(super) declared: HashMap<Box<str>, Box<[Arc<str>]>>,
    /// `last_step` of an instance that reached no step.
    start: Arc<str>,
    no_dims: DimValues,
}

impl StepMetrics {
    pub(super) fn register(r: &mut Registrar<'_>) -> Self {
        let settings = r.settings;
        let start_dims = label_names(&settings.start_dim_labels);
        let by_step = |step| Layout {
            extra: None,
            step: Some(step),
            start_dims: start_dims.clone(),
            end_dims: Arc::from([]),
        };
        let buckets = Arc::new((
            settings.default_buckets.clone(),
            settings.per_flow_buckets.clone(),
        ));
        let buckets_of = move |flow: Option<&str>| {
            let (default, per_flow) = &*buckets;
            flow.and_then(|f| per_flow.get(f))
                .unwrap_or(default)
                .clone()
        };
        let steps = r.counters(
            (
                "flowmetrics_flow_steps_total",
                "Flow instances that reached a step, by step (each instance and step once, \
                 when both the step and the instance's start are known)",
            ),
            by_step("step"),
        );
        let of = buckets_of.clone();
        let duration = r.family(
            (
                "flowmetrics_flow_step_duration_seconds",
                "Time from an instance's start to a step, from the two events' timestamps",
            ),
            by_step("step"),
            move |flow| DurationSeries::classic(Arc::from(of(flow))),
        );
        let transit = r.family(
            (
                "flowmetrics_flow_step_transit_seconds",
                "Time from the step before (by event timestamp; the start for the first step) \
                 to a step, observed when the instance closes (end or time-out)",
            ),
            by_step("step"),
            move |flow| Histogram::new(buckets_of(flow)),
        );
        let stalled = r.counters(
            ("flowmetrics_flow_stalled_total", STALLED_HELP),
            by_step("last_step"),
        );
        let unmatched = r.counters(
            (
                "flowmetrics_flow_steps_unmatched_total",
                "Step events counted with no instance: reason=\"after_close\" (its instance \
                 had ended or timed out), \"no_start\" (its start never came within the \
                 timeout, or it was evicted from a full store while waiting)",
            ),
            Layout {
                extra: Some("reason"),
                ..Layout::default()
            },
        );
        Self {
            steps,
            duration,
            transit,
            stalled,
            unmatched,
            declared: declared_steps(&settings.declared_steps),
            start: Arc::from("start"),
            no_dims: Arc::from([]),
        }
    }

    fn labels<'a>(
        &'a self,
        flow: &'a Arc<str>,
        step: &'a Arc<str>,
        start_dims: &'a DimValues,
    ) -> SeriesRef<'a> {
        SeriesRef {
            flow,
            extra: None,
            step: Some(step),
            start: start_dims,
            end: &self.no_dims,
        }
    }

    /// A label set first seen: a declared flow's step series at 0, so `rate()` and
    /// conversion ratios see every step from the first scrape.
    pub fn create_zero_series(&self, flow: &Arc<str>, start_dims: &DimValues) {
        let Some(steps) = self.declared.get(&**flow) else {
            return;
        };
        for step in steps.iter() {
            let labels = self.labels(flow, step, start_dims);
            self.steps.with(labels, |_| ());
            self.duration.with(labels, |_| ());
            self.transit.with(labels, |_| ());
            self.stalled.with(labels, |_| ());
        }
        self.stalled
            .with(self.labels(flow, &self.start, start_dims), |_| ());
        self.unmatched_at_zero(flow);
    }

    fn unmatched_at_zero(&self, flow: &Arc<str>) {
        for reason in StepUnmatchedReason::LABELS {
            self.unmatched
                .with(self.unmatched_labels(flow, reason), |_| ());
        }
    }

    fn unmatched_labels<'a>(&'a self, flow: &'a Arc<str>, reason: &'static str) -> SeriesRef<'a> {
        SeriesRef {
            flow,
            extra: Some(reason),
            step: None,
            start: &self.no_dims,
            end: &self.no_dims,
        }
    }

    pub fn reached(
        &self,
        flow: &Arc<str>,
        start_dims: &DimValues,
        step: &Arc<str>,
        since_start_secs: f64,
        trace: Option<TraceRef>,
    ) {
        let labels = self.labels(flow, step, start_dims);
        let first = self.steps.with_created(labels, |c| {
            c.inc();
        });
        // A flow that uses steps without declaring them: its unmatched series at 0 from
        // its first step, as a declared flow's are from its first event.
        if first {
            self.unmatched_at_zero(flow);
        }
        // Negative (clock skew): counted above, not observed.
        if since_start_secs >= 0.0 {
            self.duration.with(labels, |h| {
                h.observe(since_start_secs, trace.map(TraceExemplar));
            });
        }
    }

    /// An instance closed (end or time-out): the transits of its steps.
    pub fn closed(&self, flow: &Arc<str>, start_dims: &DimValues, transits: &[StepTransit]) {
        for t in transits.iter().filter(|t| t.transit_secs >= 0.0) {
            self.transit
                .with(self.labels(flow, &t.step, start_dims), |h| {
                    h.observe(t.transit_secs);
                });
        }
    }

    pub fn stalled(&self, flow: &Arc<str>, start_dims: &DimValues, last_step: Option<&Arc<str>>) {
        let step = last_step.unwrap_or(&self.start);
        self.stalled.with(self.labels(flow, step, start_dims), |c| {
            c.inc();
        });
    }

    pub fn unmatched(&self, flow: &Arc<str>, reason: StepUnmatchedReason) {
        self.unmatched
            .with(self.unmatched_labels(flow, reason.label()), |c| {
                c.inc();
            });
    }

    /// Every step series' labels and last recording, for idle removal.
    pub fn for_each_by_label_set(&self, f: &mut impl FnMut(&SeriesLabels, u64)) {
        self.steps.for_each(&mut *f);
        self.duration.for_each(&mut *f);
        self.transit.for_each(&mut *f);
        self.stalled.for_each(&mut *f);
    }

    /// Removes idle series: `keep` for (flow, start dims) label sets, `keep_flow` for
    /// the per-flow unmatched series.
    pub fn retain(
        &self,
        keep: &impl Fn(&SeriesLabels) -> bool,
        keep_flow: &impl Fn(&SeriesLabels, u64) -> bool,
    ) -> usize {
        self.steps.retain(|l, _, _| keep(l))
            + self.duration.retain(|l, _, _| keep(l))
            + self.transit.retain(|l, _, _| keep(l))
            + self.stalled.retain(|l, _, _| keep(l))
            + self.unmatched.retain(|l, t, _| keep_flow(l, t))
    }
}

/// The declared steps, interned once.
fn declared_steps(declared: &HashMap<String, Vec<String>>) -> HashMap<Box<str>, Box<[Arc<str>]>> {
    declared
        .iter()
        .map(|(flow, steps)| {
            let steps = steps.iter().map(|s| Arc::from(s.as_str())).collect();
            (Box::from(flow.as_str()), steps)
        })
        .collect()
}
