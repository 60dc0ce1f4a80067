//! Step names (docs/behaviour.md §9): which names a flow accepts, and one shared `Arc`
//! per (flow, step), so that a million instances at a step hold one copy of its name.
//!
//! A flow with a declared list accepts exactly those names (`unknown_step` else); any
//! other flow accepts at most `max_per_flow` distinct names (`too_many_steps` beyond).
//! The names seen are remembered for at most `max_flows` flows: past that, new flows'
//! steps are still accepted (by the name rules) but neither counted nor shared; the
//! metric families' series limit bounds what they can cost downstream.

use std::collections::HashMap;
use std::sync::{Arc, PoisonError, RwLock};

use crate::model::{is_valid_step_name, Rejection};

/// How step events are recognised and which names are allowed (`events.step_suffix`,
/// `events.step_key`, `flows.per_flow.*.steps`, `limits.max_steps_per_flow`).
#[derive(Debug, Clone)]
pub struct StepSettings {
    /// `events.step_suffix`: end of step event names.
    pub suffix: String,
    /// `events.step_key`: the attribute naming a step event's step.
    pub key: String,
    /// Flows with a declared step list, in order.
    pub declared: HashMap<String, Vec<String>>,
    /// `limits.max_steps_per_flow`: distinct step names a flow without a declared list may use.
    pub max_per_flow: usize,
    /// Flows whose names are remembered (the intern capacity).
    pub max_flows: usize,
}

impl Default for StepSettings {
    fn default() -> Self {
        Self {
            suffix: ".step".into(),
            key: "step".into(),
            declared: HashMap::new(),
            max_per_flow: 32,
            max_flows: 10_000,
        }
    }
}

/// The step names of every flow: declared ones fixed, others as they come.
pub struct StepNames {
    declared: HashMap<Box<str>, Arc<[Arc<str>]>>,
    seen: RwLock<HashMap<Box<str>, Vec<Arc<str>>>>,
    max_per_flow: usize,
    max_flows: usize,
}

impl StepNames {
    /// Takes the declared lists; other flows' names are learnt as they come.
    pub fn new(settings: &StepSettings) -> Self {
        let declared = settings
            .declared
            .iter()
            .map(|(flow, steps)| {
                let names: Arc<[Arc<str>]> = steps.iter().map(|s| Arc::from(s.as_str())).collect();
                (Box::from(flow.as_str()), names)
            })
            .collect();
        Self {
            declared,
            seen: RwLock::default(),
            max_per_flow: settings.max_per_flow,
            max_flows: settings.max_flows,
        }
    }

    /// The flow's declared steps, in order.
    pub fn declared(&self, flow: &str) -> Option<&Arc<[Arc<str>]>> {
        self.declared.get(flow)
    }

    /// The shared name of `step` in `flow`, or why the event is refused.
    pub fn admit(&self, flow: &str, step: &str) -> Result<Arc<str>, Rejection> {
        if !is_valid_step_name(step) {
            return Err(Rejection::InvalidStep);
        }
        if let Some(declared) = self.declared.get(flow) {
            return declared
                .iter()
                .find(|s| ***s == *step)
                .cloned()
                .ok_or(Rejection::UnknownStep);
        }
        let find = |names: &[Arc<str>]| names.iter().find(|s| ***s == *step).cloned();
        {
            let seen = self.seen.read().unwrap_or_else(PoisonError::into_inner);
            if let Some(names) = seen.get(flow) {
                if let Some(name) = find(names) {
                    return Ok(name);
                }
                if names.len() >= self.max_per_flow {
                    return Err(Rejection::TooManySteps);
                }
            }
        }
        let mut seen = self.seen.write().unwrap_or_else(PoisonError::into_inner);
        let room_for_flow = seen.len() < self.max_flows;
        let names = match seen.get_mut(flow) {
            Some(names) => names,
            None if room_for_flow => seen.entry(flow.into()).or_default(),
            None => return Ok(Arc::from(step)),
        };
        if let Some(name) = find(names) {
            return Ok(name);
        }
        if names.len() >= self.max_per_flow {
            return Err(Rejection::TooManySteps);
        }
        let name: Arc<str> = Arc::from(step);
        names.push(name.clone());
        Ok(name)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn names(declared: &[(&str, &[&str])], max: usize) -> StepNames {
        StepNames::new(&StepSettings {
            declared: declared
                .iter()
                .map(|(f, s)| (f.to_string(), s.iter().map(ToString::to_string).collect()))
                .collect(),
            max_per_flow: max,
            ..StepSettings::default()
        })
    }

    #[test]
    fn declared_flows_accept_only_their_steps() {
        let n = names(&[("order", &["placed", "paid"])], 1);
        assert_eq!(&*n.admit("order", "paid").unwrap(), "paid");
        assert_eq!(n.admit("order", "packed"), Err(Rejection::UnknownStep));
        // The per-flow cap is for undeclared flows only.
        assert!(n.admit("order", "placed").is_ok());
    }

    #[test]
    fn undeclared_flows_take_at_most_the_limit_of_distinct_names() {
        let n = names(&[], 2);
        let a = n.admit("f", "a").unwrap();
        assert!(Arc::ptr_eq(&a, &n.admit("f", "a").unwrap()), "shared");
        assert!(n.admit("f", "b").is_ok());
        assert_eq!(n.admit("f", "c"), Err(Rejection::TooManySteps));
        assert!(n.admit("f", "b").is_ok(), "known names still pass");
        assert!(n.admit("g", "c").is_ok(), "per flow");
    }

    #[test]
    fn step_names_follow_the_flow_name_rules_up_to_64_characters() {
        let n = names(&[], 32);
        for bad in ["", "a b", "é", &"x".repeat(65)] {
            assert_eq!(n.admit("f", bad), Err(Rejection::InvalidStep), "{bad:?}");
        }
        assert!(n.admit("f", &"x".repeat(64)).is_ok());
        assert!(n.admit("f", "payment.authorized:v2-x").is_ok());
    }
}
