//! Per-flow totals for the overview page, read from the flow families' own series (no
//! text in between): one walk over the series while reports are held, so the totals
//! are one consistent cut, as an exposition is (docs/behaviour.md §3).

use std::collections::BTreeMap;
use std::sync::Arc;

use super::family::SeriesLabels;
use super::Metrics;

/// One flow's counters, summed over its dimension labels. Series folded into
/// `otel_metric_overflow` belong to no flow and are not counted.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct FlowTotals {
    /// The flow's name.
    pub flow: String,
    /// Instances opened (`flowmetrics_flows_started_total`).
    pub started: u64,
    /// Instances ended with outcome `success`.
    pub completed_success: u64,
    /// Instances ended with outcome `failure`.
    pub completed_failure: u64,
    /// Instances ended with outcome `cancelled`.
    pub completed_cancelled: u64,
    /// Instances that timed out with no end.
    pub incomplete: u64,
    /// Instances open now.
    pub in_progress: i64,
    /// Instances evicted from a full store.
    pub dropped: u64,
    /// Ends whose start never came.
    pub unmatched: u64,
    /// Cumulative duration buckets: (upper bound in seconds, count), ascending, ending
    /// with `+Inf`.
    pub duration_buckets: Vec<(f64, u64)>,
    /// Instances in the duration histogram.
    pub duration_count: u64,
    /// Their durations, summed, in seconds.
    pub duration_sum: f64,
    /// The flow's steps (docs/behaviour.md §9), declared ones in their order, others by
    /// instances reached (most first); empty for a flow without steps.
    pub steps: Vec<StepTotals>,
    /// Timed-out instances that had reached no step (`last_step="start"`).
    pub stalled_at_start: u64,
}

/// One step of a flow, summed over its dimension labels.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct StepTotals {
    /// The step's name.
    pub step: String,
    /// Instances that reached it.
    pub reached: u64,
    /// Cumulative buckets of the time from the start to the step, as `duration_buckets`.
    pub to_step_buckets: Vec<(f64, u64)>,
    /// Timed-out instances for which it was the last step reached.
    pub stalled: u64,
}

impl FlowTotals {
    /// Instances closed: completed with any outcome, or timed out.
    pub fn ended(&self) -> u64 {
        self.completed_success + self.completed_failure + self.completed_cancelled + self.incomplete
    }

    /// Instances that failed or timed out.
    pub fn errors(&self) -> u64 {
        self.completed_failure + self.incomplete
    }
}

impl Metrics {
    /// Every flow's totals, sorted by flow name.
    pub fn flow_totals(&self) -> Vec<FlowTotals> {
        let mut flows: BTreeMap<Arc<str>, FlowTotals> = BTreeMap::new();
        let quiet = self.gate.close();
        self.read_totals(&mut flows);
        drop(quiet);
        flows
            .into_iter()
            .map(|(flow, mut totals)| {
                totals.flow = flow.to_string();
                totals
            })
            .collect()
    }

    fn read_totals(&self, flows: &mut BTreeMap<Arc<str>, FlowTotals>) {
        fn at<'a>(
            flows: &'a mut BTreeMap<Arc<str>, FlowTotals>,
            labels: &SeriesLabels,
        ) -> &'a mut FlowTotals {
            flows.entry(labels.flow().clone()).or_default()
        }
        self.flows
            .started
            .for_each_metric(|l, c| at(flows, l).started += c.get());
        self.flows.completed.for_each_metric(|l, c| {
            let totals = at(flows, l);
            let n = c.get().0;
            match l.extra() {
                Some("success") => totals.completed_success += n,
                Some("failure") => totals.completed_failure += n,
                Some("cancelled") => totals.completed_cancelled += n,
                _ => {}
            }
        });
        self.flows.errors.for_each_metric(|l, c| {
            let totals = at(flows, l);
            if l.extra() == Some("incomplete") {
                totals.incomplete += c.get();
            }
        });
        self.flows
            .in_progress
            .for_each_metric(|l, g| at(flows, l).in_progress += g.get());
        self.flows
            .dropped
            .for_each_metric(|l, c| at(flows, l).dropped += c.get());
        self.flows
            .unmatched_ends
            .for_each_metric(|l, c| at(flows, l).unmatched += c.get());
        self.flows.duration.for_each_metric(|l, h| {
            let totals = at(flows, l);
            let (count, sum) = h.add_to(&mut totals.duration_buckets);
            totals.duration_count += count;
            totals.duration_sum += sum;
        });
        // A flow seen only here still gets its row (at zero), as in the exposition.
        self.flows.restored.for_each_metric(|l, _| {
            at(flows, l);
        });
        self.flows.negative_durations.for_each_metric(|l, _| {
            at(flows, l);
        });
        self.steps.add_totals(flows);
    }
}
