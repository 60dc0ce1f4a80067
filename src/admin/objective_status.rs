//! The overview's objective column (docs/behaviour.md §10): over the page's window,
//! whether each flow with an objective meets it — good ÷ counted at or above the target —
//! or is burning its error budget.

use serde::Serialize;

use crate::metrics::{FlowObjective, FlowTotals};

/// Where a flow stands against its objective over the page's window.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum ObjectiveState {
    /// The flow has no objective.
    None,
    /// Good ÷ counted is at least the target over the window (or nothing was counted).
    Met,
    /// Good ÷ counted is below the target: the error budget goes faster than it may.
    Burning,
}

/// One flow's objective column on the overview page.
#[derive(Debug, Clone, Serialize)]
pub struct ObjectiveCell {
    /// Met, burning, or no objective.
    pub state: ObjectiveState,
    /// The objective's target ratio; `None` without one.
    pub target: Option<f64>,
    /// Good ÷ counted over the window; `None` when nothing was counted.
    pub sli: Option<f64>,
}

/// Good instances so far: successes within the objective's `within` (its histogram
/// bucket: `within` is always a bound), else every success.
fn good(objective: &FlowObjective, t: &FlowTotals) -> u64 {
    match objective.within_secs {
        Some(within) => t
            .duration_buckets
            .iter()
            .find(|(bound, _)| *bound == within)
            .map_or(0, |&(_, count)| count),
        None => t.completed_success,
    }
}

/// Counted instances so far: success, failure and incomplete (cancelled is neither).
fn counted(t: &FlowTotals) -> u64 {
    t.completed_success + t.completed_failure + t.incomplete
}

/// The cell of a flow whose totals are `now`, and were `base` at the window's start.
pub fn objective_cell(
    objective: Option<FlowObjective>,
    now: &FlowTotals,
    base: &FlowTotals,
) -> ObjectiveCell {
    let Some(objective) = objective else {
        return ObjectiveCell {
            state: ObjectiveState::None,
            target: None,
            sli: None,
        };
    };
    // A counter lower than before was reset: count from 0.
    let delta = |now: u64, before: u64| now.checked_sub(before).unwrap_or(now);
    let counted = delta(counted(now), counted(base));
    let good = delta(good(&objective, now), good(&objective, base)).min(counted);
    let sli = (counted > 0).then(|| good as f64 / counted as f64);
    let state = match sli {
        Some(sli) if sli < objective.target => ObjectiveState::Burning,
        _ => ObjectiveState::Met,
    };
    ObjectiveCell {
        state,
        target: Some(objective.target),
        sli,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn totals(success: u64, failure: u64, incomplete: u64, within_1s: u64) -> FlowTotals {
        FlowTotals {
            completed_success: success,
            completed_failure: failure,
            completed_cancelled: 7,
            incomplete,
            duration_buckets: vec![(1.0, within_1s), (f64::INFINITY, success)],
            ..FlowTotals::default()
        }
    }

    #[test]
    fn met_burning_and_none_over_the_window() {
        let within = FlowObjective {
            target: 0.9,
            within_secs: Some(1.0),
        };
        let base = totals(100, 0, 0, 100);
        // Window: 10 successes (9 within 1 s), 1 incomplete; cancelled do not count.
        let cell = objective_cell(Some(within), &totals(110, 0, 1, 109), &base);
        assert_eq!(cell.state, ObjectiveState::Burning);
        assert_eq!(cell.sli, Some(9.0 / 11.0));
        let cell = objective_cell(Some(within), &totals(120, 0, 0, 119), &base);
        assert_eq!((cell.state, cell.sli), (ObjectiveState::Met, Some(0.95)));
        let any_success = FlowObjective {
            target: 0.9,
            within_secs: None,
        };
        let cell = objective_cell(Some(any_success), &totals(110, 0, 0, 100), &base);
        assert_eq!((cell.state, cell.sli), (ObjectiveState::Met, Some(1.0)));
        let cell = objective_cell(Some(any_success), &base, &base);
        assert_eq!((cell.state, cell.sli), (ObjectiveState::Met, None));
        assert_eq!(
            objective_cell(None, &base, &base).state,
            ObjectiveState::None
        );
    }
}
