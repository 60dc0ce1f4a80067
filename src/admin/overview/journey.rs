//! The overview's journey of a flow with steps (docs/behaviour.md §9): per step, the
//! instances that reached it, their share of the instances started, the median time
//! from the start to it, and the timed-out instances that stalled there.

use serde::Serialize;

use super::{quantile, FlowTotals};

#[derive(Debug, Serialize, PartialEq)]
pub(super) struct StepRow {
    step: String,
    reached: u64,
    /// reached ÷ started, since flowmetrics started; `None` before any start.
    conversion: Option<f64>,
    /// Median time from the start to the step, over every observation so far.
    p50: Option<f64>,
    /// Timed-out instances whose last step was this one.
    stalled: u64,
}

/// The flow's steps in journey order (as [`FlowTotals::steps`]); empty without steps.
pub(super) fn step_rows(t: &FlowTotals) -> Vec<StepRow> {
    t.steps
        .iter()
        .map(|s| StepRow {
            step: s.step.clone(),
            reached: s.reached,
            conversion: (t.started > 0).then(|| s.reached as f64 / t.started as f64),
            p50: quantile(0.50, &s.to_step_buckets),
            stalled: s.stalled,
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::metrics::StepTotals;

    #[test]
    fn rows_follow_the_steps_with_conversion_median_and_stalls() {
        let t = FlowTotals {
            flow: "order".into(),
            started: 200,
            steps: vec![
                StepTotals {
                    step: "placed".into(),
                    reached: 150,
                    to_step_buckets: vec![(1.0, 50), (2.0, 150), (f64::INFINITY, 150)],
                    stalled: 7,
                },
                StepTotals {
                    step: "shipped".into(),
                    ..StepTotals::default()
                },
            ],
            ..FlowTotals::default()
        };
        let rows = step_rows(&t);
        assert_eq!(rows[0].step, "placed");
        assert_eq!(rows[0].conversion, Some(0.75));
        // rank 75 of 150: a quarter into (1, 2].
        assert_eq!(rows[0].p50, Some(1.25));
        assert_eq!(rows[0].stalled, 7);
        assert_eq!(rows[1].reached, 0);
        assert_eq!(rows[1].conversion, Some(0.0));
        assert_eq!(rows[1].p50, None);
        let none = FlowTotals::default();
        assert!(step_rows(&none).is_empty());
    }
}
