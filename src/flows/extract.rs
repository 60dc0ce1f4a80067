//! The rules that make a flow event: one [`EventContext`] in (whichever decoder found
//! it: the selective protobuf scan, [`super::scan`], or a decoded request,
//! [`super::decoded`]), a [`FlowEvent`] or a [`Rejection`] out.

use std::collections::HashSet;
use std::sync::Arc;

use super::attributes::{AttrValue, AttributeLayers, Attributes, Keys, Lookup};
use super::event::{DimValues, EventKind, FlowEvent, Outcome, Source, TraceRef};
use super::intern::Interner;
use super::label_value::{CutSlot, LabelBound};
use super::network::NetworkFlowRecord;
use super::steps::{StepNames, StepSettings};
use crate::model::{is_valid_flow_name, Rejection};

/// One event that may be a flow event, as a decoder found it: everything the rules read.
pub struct EventContext<'n, E, P, R> {
    /// `flow.<flow>.start|end|step`, or anything else (then not a flow event).
    pub name: &'n str,
    /// Where its attributes are looked up: the event, its span (or log record), the
    /// resource.
    pub layers: AttributeLayers<E, P, R>,
    /// Unix nanoseconds: the event's own time (0 when unset), and what stands in for it
    /// when unset: its span's end time, a log record's observed time.
    pub time_nanos: u64,
    /// Stands in for `time_nanos` when that is unset.
    pub fallback_nanos: u64,
    /// What its span (or log record) says about it.
    pub origin: Origin,
}

impl<E, P, R> EventContext<'_, E, P, R> {
    /// The event's time (docs/behaviour.md §3): its own, else the fallback, else when it
    /// was received.
    fn timestamp_nanos(&self, received_nanos: u64) -> u64 {
        if self.time_nanos != 0 {
            self.time_nanos
        } else if self.fallback_nanos != 0 {
            self.fallback_nanos
        } else {
            received_nanos
        }
    }
}

/// What an event's span (or log record) says about every event in it.
#[derive(Debug, Clone, Copy)]
pub struct Origin {
    /// The span's status is ERROR (a log record's severity ERROR or worse): an end
    /// without an outcome attribute failed.
    pub is_error: bool,
    /// The span (or log record) it came from, for exemplars.
    pub trace: Option<TraceRef>,
    /// A span event or a log record.
    pub source: Source,
}

/// What a walk of one trace export found.
#[derive(Debug, Default)]
pub struct TraceEvents<'a> {
    /// Spans read.
    pub spans: u64,
    /// Flow events and refusals, in the order of the request.
    pub events: Vec<Result<FlowEvent<'a>, Rejection>>,
    /// Flow Spans read (empty unless network flows are counted).
    pub network: Vec<NetworkFlowRecord>,
}

/// A string or integer attribute as text; other types (and "") do not count as present.
fn scalar_text(value: AttrValue<'_>) -> Option<std::borrow::Cow<'_, str>> {
    match value {
        AttrValue::Str(s) if !s.is_empty() => Some(s.into()),
        AttrValue::Int(i) => Some(i.to_string().into()),
        _ => None,
    }
}

/// A dimension value as a label value: strings as they are, scalars printed.
fn label_text(value: AttrValue<'_>) -> Option<std::borrow::Cow<'_, str>> {
    match value {
        AttrValue::Str(s) => Some(s.into()),
        AttrValue::Int(i) => Some(i.to_string().into()),
        AttrValue::Bool(b) => Some(b.to_string().into()),
        AttrValue::Double(d) => Some(d.to_string().into()),
        AttrValue::Other => None,
    }
}

struct DimensionRule {
    /// Slot of the attribute in `Extractor::keys`.
    slot: usize,
    default: Arc<str>,
    /// Where cuts of this label's values are counted.
    cut: CutSlot,
}

/// Everything needed to recognise flow events, built once from the config.
pub struct Extractor {
    prefix: String,
    start_suffix: String,
    end_suffix: String,
    step_suffix: String,
    /// Every attribute key read, once.
    keys: Keys,
    /// Slots of `events.correlation_keys`, in config order.
    correlation_slots: Vec<usize>,
    outcome_slot: usize,
    step_slot: usize,
    step_names: StepNames,
    max_correlation_id_bytes: usize,
    known_flows: Option<HashSet<String>>,
    start_dims: Vec<DimensionRule>,
    end_dims: Vec<DimensionRule>,
    names: Interner,
    values: Interner,
    /// Whole dimension-value lists: instances with the same labels share one.
    dim_lists: Interner<[Arc<str>]>,
    empty_dims: DimValues,
    label_values: LabelBound,
}

/// What the extractor is told (built from `events.*`, `flows.*`, `dimensions` and the
/// series limit by the app).
#[derive(Debug, Clone)]
pub struct ExtractorSettings {
    /// `events.prefix`: start of every flow event name.
    pub prefix: String,
    /// `events.start_suffix`: end of start event names.
    pub start_suffix: String,
    /// `events.end_suffix`: end of end event names.
    pub end_suffix: String,
    /// Tried in order: the first present is the correlation id.
    pub correlation_keys: Vec<String>,
    /// `events.outcome_key`: the attribute holding an end's outcome.
    pub outcome_key: String,
    /// Step events: suffix, step attribute, declared lists, limits.
    pub steps: StepSettings,
    /// `events.max_correlation_id_bytes`: longer ids are refused.
    pub max_correlation_id_bytes: usize,
    /// `Some`: only these flows are tracked (`flows.allow_unknown: false`).
    pub known_flows: Option<HashSet<String>>,
    /// Dimensions read from the start event, then from the end event, in label order.
    pub start_dims: Vec<DimensionLookup>,
    /// Dimensions read from the end event, in label order.
    pub end_dims: Vec<DimensionLookup>,
    /// Distinct flow names, values and value lists remembered for sharing; past the
    /// series limit new ones land in the overflow series anyway.
    pub intern_capacity: usize,
    /// `limits.max_label_value_bytes`, and where cuts are counted.
    pub label_values: LabelBound,
}

/// One dimension: its label, which attribute to read, and the value when it is absent.
#[derive(Debug, Clone)]
pub struct DimensionLookup {
    /// The label's name.
    pub label: String,
    /// The attribute read, on the event, then its span (or log record), then the resource.
    pub attribute: String,
    /// The value when the attribute is absent.
    pub default: String,
}

impl Extractor {
    /// Builds the extractor: every attribute key it reads is registered once, here.
    pub fn new(settings: ExtractorSettings) -> Self {
        let mut keys = Keys::default();
        let correlation_slots = settings
            .correlation_keys
            .iter()
            .map(|k| keys.add(k))
            .collect();
        let outcome_slot = keys.add(&settings.outcome_key);
        let step_slot = keys.add(&settings.steps.key);
        let mut rules = |dims: &[DimensionLookup]| {
            dims.iter()
                .map(|d| DimensionRule {
                    slot: keys.add(&d.attribute),
                    default: Arc::from(d.default.as_str()),
                    cut: settings.label_values.slot(&d.label),
                })
                .collect()
        };
        let start_dims = rules(&settings.start_dims);
        let end_dims = rules(&settings.end_dims);
        let capacity = settings.intern_capacity;
        Self {
            prefix: settings.prefix,
            start_suffix: settings.start_suffix,
            end_suffix: settings.end_suffix,
            step_suffix: settings.steps.suffix.clone(),
            keys,
            correlation_slots,
            outcome_slot,
            step_slot,
            step_names: StepNames::new(&settings.steps),
            max_correlation_id_bytes: settings.max_correlation_id_bytes,
            known_flows: settings.known_flows,
            start_dims,
            end_dims,
            names: Interner::new(capacity),
            values: Interner::new(capacity.saturating_mul(2)),
            dim_lists: Interner::new(capacity),
            empty_dims: Arc::from(Vec::new()),
            label_values: settings.label_values,
        }
    }

    /// Splits an event name into (side, flow name) when it has the flow shape. Names
    /// with the prefix but no suffix of ours are not flow events at all.
    fn classify<'n>(&self, name: &'n str) -> Option<(Side, &'n str)> {
        let rest = name.strip_prefix(self.prefix.as_str())?;
        if let Some(flow) = rest.strip_suffix(self.start_suffix.as_str()) {
            Some((Side::Start, flow))
        } else if let Some(flow) = rest.strip_suffix(self.end_suffix.as_str()) {
            Some((Side::End, flow))
        } else {
            rest.strip_suffix(self.step_suffix.as_str())
                .map(|flow| (Side::Step, flow))
        }
    }

    /// The flow's declared steps, in order (`flows.per_flow.<flow>.steps`).
    pub fn declared_steps(&self, flow: &str) -> Option<&Arc<[Arc<str>]>> {
        self.step_names.declared(flow)
    }

    /// Cheap pre-check: could this name be a flow event?
    pub fn may_be_flow_event(&self, name: &str) -> bool {
        name.starts_with(self.prefix.as_str())
    }

    /// Recognises one event. `Ok(None)`: not a flow event. `received_nanos`: when its
    /// request arrived, the event's time when it carries none.
    #[inline(never)] // one copy per attribute source; keeps the scan loop small
    pub fn extract<'a, E: Attributes<'a>, P: Attributes<'a>, R: Attributes<'a>>(
        &self,
        event: &EventContext<'_, E, P, R>,
        received_nanos: u64,
    ) -> Result<Option<FlowEvent<'a>>, Rejection> {
        let Some((side, flow)) = self.classify(event.name) else {
            return Ok(None);
        };
        if !is_valid_flow_name(flow) {
            return Err(Rejection::InvalidFlowName);
        }
        if let Some(known) = &self.known_flows {
            if !known.contains(flow) {
                return Err(Rejection::UnknownFlow);
            }
        }
        let mut lookup = Lookup::new(&event.layers, &self.keys);
        let correlation_id = self
            .correlation_slots
            .iter()
            .find_map(|&slot| lookup.get(slot).and_then(scalar_text))
            .ok_or(Rejection::MissingCorrelationId)?;
        if correlation_id.len() > self.max_correlation_id_bytes {
            return Err(Rejection::CorrelationIdTooLong);
        }
        let mut step = None;
        let kind = match side {
            Side::Start => EventKind::Start,
            Side::Step => {
                // On the event itself, as the outcome: a span's or resource's `step`
                // attribute describes something else.
                let name = match lookup.in_layer(0, self.step_slot) {
                    Some(AttrValue::Str(s)) if !s.is_empty() => s,
                    Some(AttrValue::Str(_)) | None => return Err(Rejection::MissingStep),
                    Some(_) => return Err(Rejection::InvalidStep),
                };
                step = Some(self.step_names.admit(flow, name)?);
                EventKind::Step
            }
            Side::End => {
                let outcome = match lookup.in_layer(0, self.outcome_slot) {
                    Some(AttrValue::Str(raw)) => Outcome::parse(raw)
                        .ok_or_else(|| Rejection::InvalidOutcome(truncate(raw, 64)))?,
                    Some(other) => {
                        return Err(Rejection::InvalidOutcome(truncate(
                            &label_text(other).unwrap_or_default(),
                            64,
                        )))
                    }
                    None if event.origin.is_error => Outcome::Failure,
                    None => Outcome::Success,
                };
                EventKind::End(outcome)
            }
        };
        // A step carries no dimensions: its series take the start's.
        let rules: &[DimensionRule] = match side {
            Side::Start => &self.start_dims,
            Side::End => &self.end_dims,
            Side::Step => &[],
        };
        let dims = if rules.is_empty() {
            self.empty_dims.clone()
        } else {
            let values: DimValues = rules
                .iter()
                .map(|rule| match lookup.get(rule.slot).and_then(label_text) {
                    Some(v) => self.values.intern(self.label_values.apply(rule.cut, &v)),
                    None => rule.default.clone(),
                })
                .collect();
            self.dim_lists.share(values)
        };
        Ok(Some(FlowEvent {
            flow: self.names.intern(flow),
            // Borrowed from the request (an integer id is printed).
            correlation_id,
            kind,
            timestamp_nanos: event.timestamp_nanos(received_nanos),
            dims,
            trace: event.origin.trace,
            source: event.origin.source,
            step,
        }))
    }

    /// [`Extractor::extract`], keeping the verdict: the flow event, or why it was refused
    /// (other events leave nothing).
    #[inline]
    pub fn extract_into<'a, E: Attributes<'a>, P: Attributes<'a>, R: Attributes<'a>>(
        &self,
        event: &EventContext<'_, E, P, R>,
        received_nanos: u64,
        found: &mut Vec<Result<FlowEvent<'a>, Rejection>>,
    ) {
        if let Some(verdict) = self.extract(event, received_nanos).transpose() {
            found.push(verdict);
        }
    }
}

/// Which suffix an event name ends in.
#[derive(Clone, Copy, PartialEq, Eq)]
enum Side {
    Start,
    End,
    Step,
}

fn truncate(s: &str, max_chars: usize) -> String {
    s.chars().take(max_chars).collect()
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::config::Config;
    use crate::flows::attributes::{SharedLayer, NO_ATTRIBUTES};
    use crate::flows::test_attrs::{kv, str_kv as s};
    use opentelemetry_proto::tonic::common::v1::{any_value, KeyValue};

    /// An event named `name` with these attribute layers, at time 10 of a span whose
    /// status is ERROR when `is_error`.
    fn candidate<'n, E, P, R>(
        name: &'n str,
        event: E,
        parent: P,
        resource: R,
        is_error: bool,
    ) -> EventContext<'n, E, P, R> {
        EventContext {
            name,
            layers: AttributeLayers {
                event,
                parent,
                resource,
            },
            time_nanos: 10,
            fallback_nanos: 0,
            origin: Origin {
                is_error,
                trace: None,
                source: Source::SpanEvent,
            },
        }
    }

    fn extractor() -> Extractor {
        Extractor::new(crate::settings::extractor(&Config::default()))
    }

    fn extract(
        x: &Extractor,
        name: &str,
        attributes: &[KeyValue],
        is_error: bool,
    ) -> Result<Option<FlowEvent<'static>>, Rejection> {
        let e = candidate(name, attributes, NO_ATTRIBUTES, NO_ATTRIBUTES, is_error);
        x.extract(&e, 99)
            .map(|found| found.map(FlowEvent::into_owned))
    }

    /// An extractor of the default configuration with these `dimensions` (YAML).
    fn with_dimensions(yaml: &str) -> Extractor {
        let c = Config {
            dimensions: serde_yaml::from_str(yaml).unwrap(),
            ..Default::default()
        };
        Extractor::new(crate::settings::extractor(&c))
    }

    /// [`extract`] of a flow event that is accepted.
    fn accept(
        x: &Extractor,
        name: &str,
        attributes: &[KeyValue],
        is_error: bool,
    ) -> FlowEvent<'static> {
        extract(x, name, attributes, is_error).unwrap().unwrap()
    }

    #[test]
    fn recognises_start_and_end_with_dotted_flow_names() {
        let x = extractor();
        let e = accept(
            &x,
            "flow.checkout.payment.start",
            &[s("correlation-id", "a")],
            false,
        );
        assert_eq!(&*e.flow, "checkout.payment");
        assert_eq!(e.kind, EventKind::Start);
        assert_eq!(&*e.correlation_id, "a");
        let e = accept(&x, "flow.order.end", &[s("correlation_id", "b")], false);
        assert_eq!(e.kind, EventKind::End(Outcome::Success));
    }

    #[test]
    fn other_event_names_are_not_flow_events() {
        let x = extractor();
        for name in ["exception", "flow.bytes.delta", "order.start", "flow.start"] {
            assert_eq!(
                extract(&x, name, &[s("correlation-id", "a")], false)
                    .unwrap()
                    .map(|e| e.flow),
                None,
                "{name}"
            );
        }
    }

    #[test]
    fn invalid_flow_names_are_rejected() {
        let x = extractor();
        let long = format!("flow.{}.start", "a".repeat(129));
        for name in [
            "flow..start",
            "flow.a b.start",
            "flow.é.start",
            long.as_str(),
        ] {
            assert_eq!(
                extract(&x, name, &[s("correlation-id", "a")], false).unwrap_err(),
                Rejection::InvalidFlowName,
                "{name}"
            );
        }
        let ok = format!("flow.{}.start", "a".repeat(128));
        assert!(extract(&x, &ok, &[s("correlation-id", "a")], false).is_ok());
    }

    #[test]
    fn outcome_aliases_are_case_insensitive() {
        let x = extractor();
        let aliases: [(Outcome, &[&str]); 3] = [
            (Outcome::Success, &["success", "OK"]),
            (Outcome::Failure, &["Failure", "failed", "ERROR"]),
            (Outcome::Cancelled, &["cancelled", "Canceled"]),
        ];
        for (want, raws) in aliases {
            for &raw in raws {
                let attributes = [s("correlation-id", "a"), s("outcome", raw)];
                let e = accept(&x, "flow.o.end", &attributes, false);
                assert_eq!(e.kind, EventKind::End(want), "{raw}");
            }
        }
        assert_eq!(
            extract(
                &x,
                "flow.o.end",
                &[s("correlation-id", "a"), s("outcome", "done")],
                false
            )
            .unwrap_err(),
            Rejection::InvalidOutcome("done".into())
        );
    }

    #[test]
    fn missing_outcome_follows_span_status() {
        let x = extractor();
        let e = accept(&x, "flow.o.end", &[s("correlation-id", "a")], true);
        assert_eq!(e.kind, EventKind::End(Outcome::Failure));
        let e = accept(&x, "flow.o.end", &[s("correlation-id", "a")], false);
        assert_eq!(e.kind, EventKind::End(Outcome::Success));
        // An explicit outcome wins over the status.
        let e = accept(
            &x,
            "flow.o.end",
            &[s("correlation-id", "a"), s("outcome", "cancelled")],
            true,
        );
        assert_eq!(e.kind, EventKind::End(Outcome::Cancelled));
    }

    #[test]
    fn correlation_id_lookup_order_types_and_limits() {
        let x = extractor();
        let span = [s("correlation-id", "from-span")];
        let resource = [s("correlation-id", "from-resource")];
        let event = [kv("correlation_id", any_value::Value::IntValue(42))];
        let get = |attributes: &[KeyValue], parent: &[KeyValue], resource: &[KeyValue]| {
            x.extract(
                &candidate("flow.f.start", attributes, parent, resource, false),
                2,
            )
            .map(|found| found.map(FlowEvent::into_owned))
        };
        // First key in the list wins across layers? No: the first *key* present anywhere,
        // searched event → span → resource for each key in order.
        assert_eq!(
            &*get(&[], &span, &resource).unwrap().unwrap().correlation_id,
            "from-span"
        );
        assert_eq!(
            &*get(&[], &[], &resource).unwrap().unwrap().correlation_id,
            "from-resource"
        );
        assert_eq!(
            &*get(&event, &[], &[]).unwrap().unwrap().correlation_id,
            "42"
        );
        assert_eq!(
            get(&[], &[], &[]).unwrap_err(),
            Rejection::MissingCorrelationId
        );
        let bools = [kv("correlation-id", any_value::Value::BoolValue(true))];
        assert_eq!(
            get(&bools, &[], &[]).unwrap_err(),
            Rejection::MissingCorrelationId
        );
        let empty = [s("correlation-id", "")];
        assert_eq!(
            get(&empty, &[], &[]).unwrap_err(),
            Rejection::MissingCorrelationId
        );
        let long = [s("correlation-id", &"x".repeat(257))];
        assert_eq!(
            get(&long, &[], &[]).unwrap_err(),
            Rejection::CorrelationIdTooLong
        );
        let just_fits = [s("correlation-id", &"x".repeat(256))];
        assert!(get(&just_fits, &[], &[]).is_ok());
    }

    #[test]
    fn zero_timestamp_means_received_time() {
        let x = extractor();
        let attributes = [s("correlation-id", "a")];
        let mut e = candidate(
            "flow.f.start",
            &attributes[..],
            NO_ATTRIBUTES,
            NO_ATTRIBUTES,
            false,
        );
        e.time_nanos = 0;
        let e = x.extract(&e, 777).unwrap().unwrap();
        assert_eq!(e.timestamp_nanos, 777);
    }

    #[test]
    fn unknown_flows_are_rejected_when_not_allowed() {
        let mut c = Config::default();
        c.flows.allow_unknown = false;
        c.flows.per_flow.insert("known".into(), Default::default());
        let x = Extractor::new(crate::settings::extractor(&c));
        assert!(extract(&x, "flow.known.start", &[s("correlation-id", "a")], false).is_ok());
        assert_eq!(
            extract(&x, "flow.other.start", &[s("correlation-id", "a")], false).unwrap_err(),
            Rejection::UnknownFlow
        );
    }

    #[test]
    fn step_events_carry_their_shared_name_and_no_dimensions() {
        let x = with_dimensions("- { label: tier, attribute: tier }\n");
        let attrs = [
            s("correlation-id", "a"),
            s("step", "paid"),
            s("tier", "gold"),
        ];
        let e = accept(&x, "flow.order.step", &attrs, false);
        assert_eq!(
            (e.kind, e.step.as_deref(), e.dims.len()),
            (EventKind::Step, Some("paid"), 0)
        );
        let again = accept(&x, "flow.order.step", &attrs, false);
        assert!(Arc::ptr_eq(
            e.step.as_ref().unwrap(),
            again.step.as_ref().unwrap()
        ));
        assert_eq!(e.kind.label(), "step");
        assert!(accept(&x, "flow.order.start", &attrs, false).step.is_none());
        for (attrs, want) in [
            (vec![s("correlation-id", "a")], Rejection::MissingStep),
            (
                vec![s("correlation-id", "a"), s("step", "")],
                Rejection::MissingStep,
            ),
            (
                vec![s("correlation-id", "a"), s("step", "a b")],
                Rejection::InvalidStep,
            ),
            (
                vec![
                    s("correlation-id", "a"),
                    kv("step", any_value::Value::BoolValue(true)),
                ],
                Rejection::InvalidStep,
            ),
            (vec![s("step", "paid")], Rejection::MissingCorrelationId),
        ] {
            assert_eq!(
                extract(&x, "flow.order.step", &attrs, false).unwrap_err(),
                want
            );
        }
    }

    #[test]
    fn declared_and_undeclared_step_names() {
        let mut c: Config = serde_yaml::from_str(
            "events: { step_suffix: .reached, step_key: stage }\nflows:\n  per_flow:\n    order: { steps: [placed, paid] }\nlimits: { max_steps_per_flow: 2 }\n",
        )
        .unwrap();
        c.flows.allow_unknown = true;
        let x = Extractor::new(crate::settings::extractor(&c));
        let step = |flow: &str, name: &str| {
            let event = format!("flow.{flow}.reached");
            extract(
                &x,
                &event,
                &[s("correlation-id", "a"), s("stage", name)],
                false,
            )
            .map(|e| e.unwrap().step.unwrap().to_string())
        };
        assert_eq!(step("order", "paid").unwrap(), "paid");
        assert_eq!(step("order", "packed"), Err(Rejection::UnknownStep));
        assert_eq!(step("other", "x").unwrap(), "x");
        assert_eq!(step("other", "y").unwrap(), "y");
        assert_eq!(step("other", "z"), Err(Rejection::TooManySteps));
        assert_eq!(step("other", "x").unwrap(), "x");
        // The default suffix is not a flow event under this configuration.
        assert_eq!(
            extract(&x, "flow.order.step", &[s("correlation-id", "a")], false)
                .unwrap()
                .map(|e| e.kind),
            None
        );
        assert_eq!(x.declared_steps("order").map(|s| s.len()), Some(2));
    }

    #[test]
    fn attribute_layers_are_searched_in_order_and_shared_once() {
        let x = with_dimensions(
            "- { label: a, attribute: x, default: dflt }\n- { label: b, attribute: y }\n",
        );
        let resource = [
            s("x", "from-resource"),
            s("y", "res-y"),
            s("correlation-id", "r"),
        ];
        let shared = SharedLayer::new(&resource[..]);
        let get = |attributes: &[KeyValue], parent: &[KeyValue]| {
            x.extract(
                &candidate("flow.f.start", attributes, parent, &shared, false),
                2,
            )
            .unwrap()
            .unwrap()
            .into_owned()
        };
        let e = get(&[s("correlation-id", "e")], &[s("x", "from-span")]);
        assert_eq!(
            (&*e.correlation_id, &*e.dims[0], &*e.dims[1]),
            ("e", "from-span", "res-y")
        );
        let e = get(&[s("x", "")], &[]);
        // Present but empty on the event: that is the value (no fall-through).
        assert_eq!((&*e.correlation_id, &*e.dims[0]), ("r", ""));
        let e = get(
            &[kv("x", any_value::Value::ArrayValue(Default::default()))],
            &[],
        );
        // Present but not a scalar: the default.
        assert_eq!(&*e.dims[0], "dflt");
    }
}
