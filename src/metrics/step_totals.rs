//! Per-flow step totals for the overview page (docs/behaviour.md §9): instances that
//! reached each step, the time from the start to it (the bucket tally kept beside the
//! histogram), and where timed-out instances stalled. Read with the other totals, in
//! the same consistent cut ([`Metrics::flow_totals`](super::Metrics::flow_totals)).

use std::collections::BTreeMap;
use std::sync::Arc;

use super::family::SeriesLabels;
use super::steps::StepMetrics;
use super::totals::{FlowTotals, StepTotals};

impl StepMetrics {
    /// Adds every flow's steps into `flows` (a flow seen only here gets its row).
    pub(super) fn add_totals(&self, flows: &mut BTreeMap<Arc<str>, FlowTotals>) {
        fn step<'a>(
            flows: &'a mut BTreeMap<Arc<str>, FlowTotals>,
            labels: &SeriesLabels,
        ) -> Option<&'a mut StepTotals> {
            let name = labels.step()?;
            let totals = flows.entry(labels.flow().clone()).or_default();
            let at = match totals.steps.iter().position(|s| *s.step == **name) {
                Some(at) => at,
                None => {
                    totals.steps.push(StepTotals {
                        step: name.to_string(),
                        ..StepTotals::default()
                    });
                    totals.steps.len() - 1
                }
            };
            Some(&mut totals.steps[at])
        }
        self.steps.for_each_metric(|l, c| {
            if let Some(s) = step(flows, l) {
                s.reached += c.get();
            }
        });
        self.duration.for_each_metric(|l, h| {
            if let Some(s) = step(flows, l) {
                h.add_to(&mut s.to_step_buckets);
            }
        });
        self.stalled.for_each_metric(|l, c| {
            let n = c.get();
            match l.step() {
                Some(name) if &**name == "start" => {
                    flows.entry(l.flow().clone()).or_default().stalled_at_start += n;
                }
                Some(_) => {
                    if let Some(s) = step(flows, l) {
                        s.stalled += n;
                    }
                }
                None => {}
            }
        });
        for (flow, totals) in flows.iter_mut() {
            self.order(flow, &mut totals.steps);
        }
    }

    /// Declared steps in their order (any others after them), else by instances
    /// reached, most first, then by name.
    fn order(&self, flow: &str, steps: &mut [StepTotals]) {
        let declared = self.declared.get(flow);
        let rank = |s: &StepTotals| {
            declared
                .and_then(|d| d.iter().position(|n| **n == *s.step))
                .unwrap_or(usize::MAX)
        };
        steps.sort_by(|a, b| {
            rank(a)
                .cmp(&rank(b))
                .then(b.reached.cmp(&a.reached))
                .then(a.step.cmp(&b.step))
        });
    }
}
