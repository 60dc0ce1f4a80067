//! What a flow event is, and how one is recognised inside a span event or a log record.

use std::cell::OnceCell;
use std::collections::HashSet;

use std::sync::Arc;

use opentelemetry_proto::tonic::common::v1::{any_value, KeyValue};

use super::intern::Interner;
use super::label_value::{CutSlot, LabelBound};
use super::steps::{StepNames, StepSettings};
use crate::model::{is_valid_flow_name, Rejection};

/// Values of the configured dimensions of one side (start or end), in config order.
pub type DimValues = Arc<[Arc<str>]>;

#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Outcome {
    Success,
    Failure,
    Cancelled,
}

impl Outcome {
    pub fn as_str(self) -> &'static str {
        match self {
            Outcome::Success => "success",
            Outcome::Failure => "failure",
            Outcome::Cancelled => "cancelled",
        }
    }

    /// Case-insensitive, with the aliases of docs/behaviour.md §2.
    pub fn parse(raw: &str) -> Option<Outcome> {
        const TABLE: [(&str, Outcome); 7] = [
            ("success", Outcome::Success),
            ("ok", Outcome::Success),
            ("failure", Outcome::Failure),
            ("failed", Outcome::Failure),
            ("error", Outcome::Failure),
            ("cancelled", Outcome::Cancelled),
            ("canceled", Outcome::Cancelled),
        ];
        // Nothing to trim when both ends are ASCII and not white space (every other
        // white space character starts with a byte of 0x80 or more).
        let plain = |b: Option<&u8>| b.is_some_and(|&b| b < 0x80 && !b.is_ascii_whitespace());
        let raw = if plain(raw.as_bytes().first()) && plain(raw.as_bytes().last()) {
            raw
        } else {
            raw.trim()
        };
        TABLE
            .iter()
            .find(|(name, _)| name.eq_ignore_ascii_case(raw))
            .map(|(_, o)| *o)
    }
}

/// What an event does to its instance. Copy and two bytes: the step's name travels on
/// the event ([`FlowEvent::step`]), so pairs-only flows carry nothing for steps.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum EventKind {
    Start,
    End(Outcome),
    /// A step reached (docs/behaviour.md §9); [`FlowEvent::step`] names it.
    Step,
}

impl EventKind {
    pub fn label(self) -> &'static str {
        match self {
            EventKind::Start => "start",
            EventKind::End(_) => "end",
            EventKind::Step => "step",
        }
    }

    /// 0 start, 1 end, 2 step: for per-kind counters.
    pub fn index(self) -> usize {
        match self {
            EventKind::Start => 0,
            EventKind::End(_) => 1,
            EventKind::Step => 2,
        }
    }

    /// Every `kind` label value, in [`EventKind::index`] order.
    pub const LABELS: [&'static str; 3] = ["start", "end", "step"];
}

/// Where a flow event was found.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Source {
    SpanEvent = 0,
    Log = 1,
}

impl Source {
    pub fn label(self) -> &'static str {
        match self {
            Source::SpanEvent => "span_event",
            Source::Log => "log",
        }
    }
}

/// The trace and span an event was emitted in, for exemplars.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct TraceRef {
    pub trace_id: [u8; 16],
    pub span_id: [u8; 8],
}

impl TraceRef {
    /// Only well-formed, non-zero ids make an exemplar.
    pub fn from_ids(trace_id: &[u8], span_id: &[u8]) -> Option<TraceRef> {
        let trace_id: [u8; 16] = trace_id.try_into().ok()?;
        let span_id: [u8; 8] = span_id.try_into().ok()?;
        if trace_id == [0; 16] || span_id == [0; 8] {
            return None;
        }
        Some(TraceRef { trace_id, span_id })
    }
}

/// One recognised flow event, ready for the correlation store.
#[derive(Debug, Clone)]
pub struct FlowEvent {
    pub flow: Arc<str>,
    pub correlation_id: Box<str>,
    pub kind: EventKind,
    /// Unix nanoseconds: the event's own time, else its span's end time (a log
    /// record's observed time), else the time it was received.
    pub timestamp_nanos: u64,
    /// Values of the dimensions read from this side (start dims on a start, end dims on
    /// an end).
    pub dims: DimValues,
    pub trace: Option<TraceRef>,
    pub source: Source,
    /// The step's name (shared by every event of that step of the flow), exactly when
    /// `kind` is [`EventKind::Step`].
    pub step: Option<Arc<str>>,
}

/// An attribute value as flowmetrics reads it (borrowed, never copied).
#[derive(Debug, Clone, Copy, PartialEq)]
pub enum AttrValue<'a> {
    Str(&'a str),
    Int(i64),
    Bool(bool),
    Double(f64),
    /// Arrays, maps, bytes, or an empty value: never a correlation id or a label.
    Other,
}

/// The attribute keys an [`Extractor`] reads (correlation keys, outcome key, dimension
/// attributes), each once: one pass over an attribute list finds all of them.
#[derive(Debug, Default)]
pub struct Keys {
    keys: Vec<WantedKey>,
    /// Bit `n` set: some wanted key is `n` bytes long (all of 64 and more share bit 63).
    /// Most attribute keys are rejected on their length alone.
    lengths: u64,
}

#[derive(Debug)]
struct WantedKey {
    fingerprint: Fingerprint,
    bytes: Box<[u8]>,
}

/// Length and up to 16 bytes of a key, compared as three integers. For keys of up to 16
/// bytes equal fingerprints mean equal keys.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
struct Fingerprint {
    len: usize,
    head: u64,
    tail: u64,
}

impl Fingerprint {
    #[inline(always)]
    fn of(b: &[u8]) -> Self {
        let n = b.len();
        let (head, tail) = match (b.first_chunk::<8>(), b.last_chunk::<8>()) {
            (Some(h), Some(t)) => (u64::from_le_bytes(*h), u64::from_le_bytes(*t)),
            _ => match (b.first_chunk::<4>(), b.last_chunk::<4>()) {
                (Some(h), Some(t)) => (
                    u64::from(u32::from_le_bytes(*h)) | u64::from(u32::from_le_bytes(*t)) << 32,
                    0,
                ),
                // 0–3 bytes: first, middle and last cover them all.
                _ if n > 0 => (
                    u64::from(b[0]) | u64::from(b[n / 2]) << 8 | u64::from(b[n - 1]) << 16,
                    0,
                ),
                _ => (0, 0),
            },
        };
        Self { len: n, head, tail }
    }
}

#[inline(always)]
fn length_bit(len: usize) -> u64 {
    1 << len.min(63)
}

impl Keys {
    /// The slot of `key`, added if new.
    pub fn add(&mut self, key: &str) -> usize {
        self.slot(key.as_bytes()).unwrap_or_else(|| {
            self.keys.push(WantedKey {
                fingerprint: Fingerprint::of(key.as_bytes()),
                bytes: key.as_bytes().into(),
            });
            self.lengths |= length_bit(key.len());
            self.keys.len() - 1
        })
    }

    pub fn len(&self) -> usize {
        self.keys.len()
    }

    pub fn is_empty(&self) -> bool {
        self.keys.is_empty()
    }

    /// The slot of `key` if it is wanted.
    #[inline]
    pub fn slot(&self, key: &[u8]) -> Option<usize> {
        if self.lengths & length_bit(key.len()) == 0 {
            return None;
        }
        let f = Fingerprint::of(key);
        self.keys
            .iter()
            .position(|k| k.fingerprint == f && (f.len <= 16 || *k.bytes == *key))
    }
}

/// Somewhere attributes can be looked up: decoded `KeyValue`s, or raw protobuf bytes (see
/// `flows::scan`). Values borrow from the underlying data (`'a`).
pub trait Attributes<'a> {
    /// For every slot `i` of `keys`, the value of the first attribute named like it goes
    /// to `found[i]`. `found` has one entry per slot, all `None` on entry; keys that are
    /// absent stay `None`.
    fn find_all(&self, keys: &Keys, found: &mut [Option<AttrValue<'a>>]);
}

impl<'a, 'k: 'a> Attributes<'a> for &'k [KeyValue] {
    fn find_all(&self, keys: &Keys, found: &mut [Option<AttrValue<'a>>]) {
        let mut missing = found.len();
        if missing == 0 {
            return;
        }
        for kv in self.iter() {
            let Some(i) = keys.slot(kv.key.as_bytes()) else {
                continue;
            };
            if found[i].is_none() {
                found[i] = Some(decoded_value(kv));
                missing -= 1;
                if missing == 0 {
                    return;
                }
            }
        }
    }
}

fn decoded_value(kv: &KeyValue) -> AttrValue<'_> {
    match kv.value.as_ref().and_then(|v| v.value.as_ref()) {
        Some(any_value::Value::StringValue(s)) => AttrValue::Str(s),
        Some(any_value::Value::IntValue(i)) => AttrValue::Int(*i),
        Some(any_value::Value::BoolValue(b)) => AttrValue::Bool(*b),
        Some(any_value::Value::DoubleValue(d)) => AttrValue::Double(*d),
        _ => AttrValue::Other,
    }
}

/// No attributes at all.
pub const NO_ATTRIBUTES: &[KeyValue] = &[];

/// An attribute list shared by many events (a resource, for every span under it): looked
/// through once, on first use, then answered from the copy. Use it with one extractor
/// only (the copy is per slot of that extractor's keys).
pub struct SharedLayer<'a, A> {
    attributes: A,
    found: OnceCell<Box<[Option<AttrValue<'a>>]>>,
}

impl<'a, A: Attributes<'a>> SharedLayer<'a, A> {
    pub fn new(attributes: A) -> Self {
        Self {
            attributes,
            found: OnceCell::new(),
        }
    }
}

// `'r: 'a`: a resource outlives the events it is shared by.
impl<'a, 'r: 'a, A: Attributes<'r>> Attributes<'a> for &SharedLayer<'r, A> {
    fn find_all(&self, keys: &Keys, found: &mut [Option<AttrValue<'a>>]) {
        let cached = self.found.get_or_init(|| {
            let mut all = vec![None; keys.len()].into_boxed_slice();
            self.attributes.find_all(keys, &mut all);
            all
        });
        found.copy_from_slice(cached);
    }
}

/// Attribute lists searched in order: the event, its span (or log record), the resource.
#[derive(Clone, Copy)]
pub struct AttributeLayers<E, P, R> {
    pub event: E,
    pub parent: P,
    pub resource: R,
}

/// Room for this many wanted keys without allocating (3 correlation keys, the outcome
/// key and 4 dimensions); more fall back to the heap.
const INLINE_KEYS: usize = 8;

/// The wanted keys' values in one layer: on the stack for up to `N` keys, else on the
/// heap (also used for Flow Spans, with a larger `N`).
pub(crate) enum Found<'a, const N: usize = INLINE_KEYS> {
    Inline([Option<AttrValue<'a>>; N]),
    Heap(Box<[Option<AttrValue<'a>>]>),
}

impl<'a, const N: usize> Found<'a, N> {
    /// Room for `n` values, all empty.
    #[inline]
    pub(crate) fn with_len(n: usize) -> Self {
        if n <= N {
            Found::Inline([None; N])
        } else {
            Found::Heap(vec![None; n].into_boxed_slice())
        }
    }

    /// The first `n` slots (`n` as given to [`Found::with_len`]).
    #[inline]
    pub(crate) fn slots(&mut self, n: usize) -> &mut [Option<AttrValue<'a>>] {
        match self {
            Found::Inline(a) => &mut a[..n],
            Found::Heap(v) => v,
        }
    }
}

/// Lookups through the layers of one event. A layer is read (in one pass, for all wanted
/// keys) only when a lookup reaches it: an id on the event never touches the span's or the
/// resource's attributes.
struct Lookup<'l, 'a, E, P, R> {
    layers: &'l AttributeLayers<E, P, R>,
    keys: &'l Keys,
    /// Per layer (0 event, 1 parent, 2 resource), once read.
    found: [Option<Found<'a>>; 3],
}

impl<'l, 'a, E: Attributes<'a>, P: Attributes<'a>, R: Attributes<'a>> Lookup<'l, 'a, E, P, R> {
    #[inline]
    fn new(layers: &'l AttributeLayers<E, P, R>, keys: &'l Keys) -> Self {
        Self {
            layers,
            keys,
            found: [None, None, None],
        }
    }

    /// Layer `layer`, the value in `slot`.
    #[inline]
    fn in_layer(&mut self, layer: usize, slot: usize) -> Option<AttrValue<'a>> {
        let n = self.keys.len();
        let found = match &mut self.found[layer] {
            Some(found) => found,
            empty => {
                // Built in place: the slots are filled where they stay.
                let found = empty.insert(Found::with_len(n));
                let slots = found.slots(n);
                match layer {
                    0 => self.layers.event.find_all(self.keys, slots),
                    1 => self.layers.parent.find_all(self.keys, slots),
                    _ => self.layers.resource.find_all(self.keys, slots),
                }
                found
            }
        };
        found.slots(n)[slot]
    }

    /// The first layer's value for `slot`: event, then parent, then resource.
    #[inline]
    fn get(&mut self, slot: usize) -> Option<AttrValue<'a>> {
        (0..3).find_map(|layer| self.in_layer(layer, slot))
    }
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
    pub prefix: String,
    pub start_suffix: String,
    pub end_suffix: String,
    /// Tried in order: the first present is the correlation id.
    pub correlation_keys: Vec<String>,
    pub outcome_key: String,
    /// Step events: suffix, step attribute, declared lists, limits.
    pub steps: StepSettings,
    pub max_correlation_id_bytes: usize,
    /// `Some`: only these flows are tracked (`flows.allow_unknown: false`).
    pub known_flows: Option<HashSet<String>>,
    /// Dimensions read from the start event, then from the end event, in label order.
    pub start_dims: Vec<DimensionLookup>,
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
    pub label: String,
    pub attribute: String,
    pub default: String,
}

impl Extractor {
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

    /// Recognises one event. `Ok(None)`: not a flow event. `is_error`: the span's status
    /// is ERROR (or the log record's severity is ERROR or worse), used when no outcome
    /// attribute is given.
    #[allow(clippy::too_many_arguments)]
    #[inline(never)] // one copy per attribute source; keeps the scan loop small
    pub fn extract<'a, E: Attributes<'a>, P: Attributes<'a>, R: Attributes<'a>>(
        &self,
        name: &str,
        layers: AttributeLayers<E, P, R>,
        timestamp_nanos: u64,
        received_nanos: u64,
        is_error: bool,
        trace: Option<TraceRef>,
        source: Source,
    ) -> Result<Option<FlowEvent>, Rejection> {
        let Some((side, flow)) = self.classify(name) else {
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
        let mut lookup = Lookup::new(&layers, &self.keys);
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
                    None if is_error => Outcome::Failure,
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
            // Borrowed text is copied once, straight into the box.
            correlation_id: correlation_id.into(),
            kind,
            timestamp_nanos: if timestamp_nanos == 0 {
                received_nanos
            } else {
                timestamp_nanos
            },
            dims,
            trace,
            source,
            step,
        }))
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
    use opentelemetry_proto::tonic::common::v1::AnyValue;

    fn kv(key: &str, value: any_value::Value) -> KeyValue {
        KeyValue {
            key: key.into(),
            value: Some(AnyValue { value: Some(value) }),
            ..Default::default()
        }
    }

    fn s(key: &str, v: &str) -> KeyValue {
        kv(key, any_value::Value::StringValue(v.into()))
    }

    fn extractor() -> Extractor {
        Extractor::new(crate::settings::extractor(&Config::default()))
    }

    fn extract(
        x: &Extractor,
        name: &str,
        event: &[KeyValue],
        is_error: bool,
    ) -> Result<Option<FlowEvent>, Rejection> {
        x.extract(
            name,
            AttributeLayers {
                event,
                parent: NO_ATTRIBUTES,
                resource: NO_ATTRIBUTES,
            },
            10,
            99,
            is_error,
            None,
            Source::SpanEvent,
        )
    }

    #[test]
    fn recognises_start_and_end_with_dotted_flow_names() {
        let x = extractor();
        let e = extract(
            &x,
            "flow.checkout.payment.start",
            &[s("correlation-id", "a")],
            false,
        )
        .unwrap()
        .unwrap();
        assert_eq!(&*e.flow, "checkout.payment");
        assert_eq!(e.kind, EventKind::Start);
        assert_eq!(&*e.correlation_id, "a");
        let e = extract(&x, "flow.order.end", &[s("correlation_id", "b")], false)
            .unwrap()
            .unwrap();
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
    fn outcomes_are_trimmed() {
        assert_eq!(Outcome::parse(" Success\t"), Some(Outcome::Success));
        assert_eq!(Outcome::parse("\u{2003}ok\u{a0}"), Some(Outcome::Success));
        assert_eq!(Outcome::parse("failed\n"), Some(Outcome::Failure));
        assert_eq!(Outcome::parse(""), None);
        assert_eq!(Outcome::parse("  "), None);
        assert_eq!(Outcome::parse("okay"), None);
    }

    #[test]
    fn outcome_aliases_are_case_insensitive() {
        let x = extractor();
        for (raw, want) in [
            ("success", Outcome::Success),
            ("OK", Outcome::Success),
            ("Failure", Outcome::Failure),
            ("failed", Outcome::Failure),
            ("ERROR", Outcome::Failure),
            ("cancelled", Outcome::Cancelled),
            ("Canceled", Outcome::Cancelled),
        ] {
            let e = extract(
                &x,
                "flow.o.end",
                &[s("correlation-id", "a"), s("outcome", raw)],
                false,
            )
            .unwrap()
            .unwrap();
            assert_eq!(e.kind, EventKind::End(want), "{raw}");
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
        let e = extract(&x, "flow.o.end", &[s("correlation-id", "a")], true)
            .unwrap()
            .unwrap();
        assert_eq!(e.kind, EventKind::End(Outcome::Failure));
        let e = extract(&x, "flow.o.end", &[s("correlation-id", "a")], false)
            .unwrap()
            .unwrap();
        assert_eq!(e.kind, EventKind::End(Outcome::Success));
        // An explicit outcome wins over the status.
        let e = extract(
            &x,
            "flow.o.end",
            &[s("correlation-id", "a"), s("outcome", "cancelled")],
            true,
        )
        .unwrap()
        .unwrap();
        assert_eq!(e.kind, EventKind::End(Outcome::Cancelled));
    }

    #[test]
    fn correlation_id_lookup_order_types_and_limits() {
        let x = extractor();
        let span = [s("correlation-id", "from-span")];
        let resource = [s("correlation-id", "from-resource")];
        let event = [kv("correlation_id", any_value::Value::IntValue(42))];
        let get = |event: &[KeyValue], parent: &[KeyValue], resource: &[KeyValue]| {
            x.extract(
                "flow.f.start",
                AttributeLayers {
                    event,
                    parent,
                    resource,
                },
                1,
                2,
                false,
                None,
                Source::SpanEvent,
            )
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
        let e = x
            .extract(
                "flow.f.start",
                AttributeLayers {
                    event: &[s("correlation-id", "a")][..],
                    parent: NO_ATTRIBUTES,
                    resource: NO_ATTRIBUTES,
                },
                0,
                777,
                false,
                None,
                Source::Log,
            )
            .unwrap()
            .unwrap();
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
        let c = Config {
            dimensions: serde_yaml::from_str("- { label: tier, attribute: tier }\n").unwrap(),
            ..Default::default()
        };
        let x = Extractor::new(crate::settings::extractor(&c));
        let attrs = [
            s("correlation-id", "a"),
            s("step", "paid"),
            s("tier", "gold"),
        ];
        let e = extract(&x, "flow.order.step", &attrs, false)
            .unwrap()
            .unwrap();
        assert_eq!(
            (e.kind, e.step.as_deref(), e.dims.len()),
            (EventKind::Step, Some("paid"), 0)
        );
        let again = extract(&x, "flow.order.step", &attrs, false)
            .unwrap()
            .unwrap();
        assert!(Arc::ptr_eq(
            e.step.as_ref().unwrap(),
            again.step.as_ref().unwrap()
        ));
        assert_eq!(e.kind.label(), "step");
        assert!(extract(&x, "flow.order.start", &attrs, false)
            .unwrap()
            .unwrap()
            .step
            .is_none());
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
    fn trace_refs_need_well_formed_ids() {
        assert!(TraceRef::from_ids(&[1; 16], &[2; 8]).is_some());
        assert!(TraceRef::from_ids(&[1; 15], &[2; 8]).is_none());
        assert!(TraceRef::from_ids(&[0; 16], &[2; 8]).is_none());
        assert!(TraceRef::from_ids(&[1; 16], &[]).is_none());
    }

    #[test]
    fn keys_match_exactly_whatever_their_length() {
        let mut keys = Keys::default();
        let wanted: Vec<String> = (0..40)
            .map(|n| (0..n).map(|i| (b'a' + (i % 26) as u8) as char).collect())
            .collect();
        for (i, k) in wanted.iter().enumerate() {
            assert_eq!(keys.add(k), i);
        }
        assert_eq!(keys.add(&wanted[3]), 3, "added once");
        for (i, k) in wanted.iter().enumerate() {
            assert_eq!(keys.slot(k.as_bytes()), Some(i), "{k:?}");
            // One byte different, anywhere: not the key.
            for at in 0..k.len() {
                let mut other = k.clone().into_bytes();
                other[at] = b'#';
                assert_eq!(keys.slot(&other), None, "{k:?} at {at}");
            }
        }
        assert_eq!(keys.slot(&[b'a'; 41]), None);
        assert_eq!(keys.slot("é".as_bytes()), None);
    }

    #[test]
    fn attribute_layers_are_searched_in_order_and_shared_once() {
        let c = Config {
            dimensions: serde_yaml::from_str(
                "- { label: a, attribute: x, default: dflt }\n- { label: b, attribute: y }\n",
            )
            .unwrap(),
            ..Default::default()
        };
        let x = Extractor::new(crate::settings::extractor(&c));
        let resource = [
            s("x", "from-resource"),
            s("y", "res-y"),
            s("correlation-id", "r"),
        ];
        let shared = SharedLayer::new(&resource[..]);
        let get = |event: &[KeyValue], parent: &[KeyValue]| {
            x.extract(
                "flow.f.start",
                AttributeLayers {
                    event,
                    parent,
                    resource: &shared,
                },
                1,
                2,
                false,
                None,
                Source::SpanEvent,
            )
            .unwrap()
            .unwrap()
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
