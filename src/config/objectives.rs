//! Flow objectives and overdue thresholds (docs/behaviour.md §10):
//! `flows.default.objective`, `flows.per_flow.<flow>.objective: { target, within }` and
//! `overdue_after`, their checks, and what they mean for one flow.

use std::time::Duration;

use serde::{Deserialize, Serialize};

use super::error::{Invalid, Key, Problem};
use super::validate::check_positive_duration;
use super::Config;

/// "`target` of the instances succeed (within `within`, when set)".
#[derive(Debug, Clone, Copy, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Objective {
    /// The share of counted instances that must be good, strictly between 0 and 1.
    pub target: f64,
    /// A success counts as good only if it took at most this long; unset: any success.
    #[serde(
        default,
        with = "super::values::opt_duration",
        skip_serializing_if = "Option::is_none"
    )]
    pub within: Option<Duration>,
}

impl Objective {
    /// `within` in seconds, as the duration histogram's bound.
    pub fn within_secs(&self) -> Option<f64> {
        self.within.map(|w| w.as_secs_f64())
    }
}

/// `key.objective` and `key.overdue_after`.
pub(super) fn check(
    key: &Key,
    objective: Option<&Objective>,
    overdue_after: Option<Duration>,
) -> Result<(), Invalid> {
    if let Some(objective) = objective {
        let key = key.field("objective");
        let target = objective.target;
        if !(target > 0.0 && target < 1.0) {
            return Err(Problem::ObjectiveTarget(target).at(key.field("target")));
        }
        check_positive_duration(&key.field("within"), objective.within)?;
    }
    check_positive_duration(&key.field("overdue_after"), overdue_after)
}

impl Config {
    /// The objective `flow` is measured against: its own, else `flows.default`'s.
    pub fn objective_for(&self, flow: &str) -> Option<Objective> {
        self.per_flow_or(flow, |o| o.objective, self.flows.default.objective)
    }

    /// How old (now − start timestamp) an open instance of `flow` may get before it is
    /// overdue: its `overdue_after` (own, else default), else its objective's `within`.
    /// `None`: the flow has neither, and no overdue series.
    pub fn overdue_threshold_for(&self, flow: &str) -> Option<Duration> {
        self.per_flow_or(flow, |o| o.overdue_after, self.flows.default.overdue_after)
            .or_else(|| self.objective_for(flow).and_then(|o| o.within))
    }

    /// Whether any flow, named or not, can have an overdue threshold (else the stores
    /// keep no ages at all).
    pub fn any_overdue_threshold(&self) -> bool {
        self.default_overdue_threshold().is_some()
            || self
                .flows
                .per_flow
                .keys()
                .any(|f| self.overdue_threshold_for(f).is_some())
    }

    /// The threshold of a flow not named in `flows.per_flow`.
    pub fn default_overdue_threshold(&self) -> Option<Duration> {
        self.flows
            .default
            .overdue_after
            .or(self.flows.default.objective.and_then(|o| o.within))
    }

    /// The bounds `flow`'s duration histogram must contain whatever its buckets say
    /// (classic buckets or a native histogram's exact bounds): its objective's `within`,
    /// so that "good" is read off one bucket, exactly.
    pub fn required_duration_bounds(&self, flow: &str) -> Vec<f64> {
        self.objective_for(flow)
            .and_then(|o| o.within_secs())
            .into_iter()
            .collect()
    }

    /// The classic buckets of flows under `flows.default` (its objective's `within`
    /// added when missing).
    pub fn default_duration_buckets(&self) -> Vec<f64> {
        let within = self.flows.default.objective.and_then(|o| o.within_secs());
        with_bounds(&self.flows.default.buckets, within)
    }

    /// The classic buckets of `flow` (its own or the default ones, with the bounds of
    /// [`Config::required_duration_bounds`] added when missing).
    pub fn duration_buckets_for(&self, flow: &str) -> Vec<f64> {
        let own = self
            .flows
            .per_flow
            .get(flow)
            .and_then(|o| o.buckets.as_ref());
        let mut buckets = own.unwrap_or(&self.flows.default.buckets).clone();
        for bound in self.required_duration_bounds(flow) {
            buckets = with_bounds(&buckets, Some(bound));
        }
        buckets
    }
}

/// `buckets` with `bound` inserted in order when it is not one of them already.
pub fn with_bounds(buckets: &[f64], bound: Option<f64>) -> Vec<f64> {
    let mut out = buckets.to_vec();
    if let Some(bound) = bound {
        if let Err(at) = out.binary_search_by(|b| b.total_cmp(&bound)) {
            out.insert(at, bound);
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    fn config(yaml: &str) -> Config {
        let dir = std::env::temp_dir().join(format!("fm-objectives-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let path = dir.join(format!(
            "{:x}.yaml",
            std::time::SystemTime::now()
                .duration_since(std::time::UNIX_EPOCH)
                .unwrap()
                .as_nanos()
        ));
        std::fs::write(&path, yaml).unwrap();
        let config = Config::load(Some(&path), Vec::new());
        let _ = std::fs::remove_file(&path);
        config.unwrap()
    }

    #[test]
    fn within_is_added_to_the_buckets_once_and_in_order() {
        let c = config(
            "flows:\n  default: { objective: { target: 0.99, within: 7s } }\n  per_flow:\n    a: { buckets: [1, 10], objective: { target: 0.9, within: 10s } }\n    b: { buckets: [1, 10] }\n    c: { overdue_after: 1m }\n",
        );
        assert_eq!(c.duration_buckets_for("a"), vec![1.0, 10.0]);
        assert_eq!(c.duration_buckets_for("b"), vec![1.0, 7.0, 10.0]);
        assert!(c.default_duration_buckets().contains(&7.0));
        assert_eq!(c.duration_buckets_for("zzz"), c.default_duration_buckets());
        assert_eq!(c.required_duration_bounds("a"), vec![10.0]);
        assert_eq!(c.overdue_threshold_for("a"), Some(Duration::from_secs(10)));
        assert_eq!(c.overdue_threshold_for("c"), Some(Duration::from_secs(60)));
        assert_eq!(c.overdue_threshold_for("zzz"), Some(Duration::from_secs(7)));
    }

    #[test]
    fn no_objective_no_threshold() {
        let c = config("flows:\n  per_flow:\n    a: { objective: { target: 0.5 } }\n");
        assert_eq!(c.objective_for("a").map(|o| o.target), Some(0.5));
        assert_eq!(c.overdue_threshold_for("a"), None);
        assert!(!c.any_overdue_threshold());
        assert!(c.required_duration_bounds("a").is_empty());
    }
}
