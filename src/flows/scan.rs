//! Selective decoding of protobuf trace exports: finds flow events without decoding the
//! rest. A span without a flow event costs a walk over its bytes, nothing more; for the
//! few with one, attributes are read in place (borrowed) from the event, span and
//! resource bytes.
//!
//! Accepts what a full decode accepts, and checks the same things flowmetrics relies on
//! (well-formed framing, UTF-8 event names, trace/span id lengths). Fields it never
//! reads are only skipped, so bytes a full decode would refuse there (say, invalid
//! UTF-8 in an unrelated attribute) pass.

use std::cell::Cell;

use super::attributes::{AttrValue, AttributeLayers, Attributes, Keys, SharedLayer};
use super::event::{Source, TraceRef};
use super::extract::{EventContext, Extractor, Origin, TraceEvents};
use super::network::{is_flow_span_key, NetworkFlows, SpanIdentity};
use super::wire::{check_wire, utf8, Fields, Value, WireError};
use crate::model::IdField;

/// Why a protobuf trace export was refused whole (before any of its events is applied).
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
pub enum ScanError {
    /// Not valid protobuf.
    #[error(transparent)]
    Wire(#[from] WireError),
    /// Past prost's recursion limit.
    #[error("messages nested too deeply")]
    TooDeep,
    /// An attribute a flow event reads is malformed: a full decode refuses it too.
    #[error("an attribute a flow event reads is malformed (not UTF-8, or bad framing)")]
    MalformedAttribute,
    /// A span's trace, span or parent span id of the wrong length.
    #[error("{} must be {} bytes", .0.name(), .0.bytes())]
    IdLength(IdField),
}

// Field numbers from opentelemetry/proto/{collector/trace,trace,resource,common}/v1.
const REQUEST_RESOURCE_SPANS: u32 = 1;
const RESOURCE_SPANS_RESOURCE: u32 = 1;
const RESOURCE_SPANS_SCOPE_SPANS: u32 = 2;
const RESOURCE_ATTRIBUTES: u32 = 1;
const SCOPE_SPANS_SPANS: u32 = 2;
const SPAN_TRACE_ID: u32 = 1;
const SPAN_SPAN_ID: u32 = 2;
const SPAN_PARENT_SPAN_ID: u32 = 4;
const SPAN_START_TIME: u32 = 7;
const SPAN_END_TIME: u32 = 8;
const SPAN_ATTRIBUTES: u32 = 9;
const SPAN_EVENTS: u32 = 11;
const SPAN_STATUS: u32 = 15;
const SPAN_FLAGS: u32 = 16;
const STATUS_CODE: u32 = 3;
const STATUS_CODE_ERROR: u64 = 2;
const EVENT_TIME: u32 = 1;
const EVENT_NAME: u32 = 2;
const EVENT_ATTRIBUTES: u32 = 3;
const KEY_VALUE_KEY: u32 = 1;
const KEY_VALUE_VALUE: u32 = 2;
const ANY_STRING: u32 = 1;
const ANY_BOOL: u32 = 2;
const ANY_INT: u32 = 3;
const ANY_DOUBLE: u32 = 4;
const ANY_BYTES: u32 = 7;
/// `string_value_strindex`: a value, though not one flowmetrics reads.
const ANY_STRINDEX: u32 = 8;
// Keys (field number << 3 | wire type 2) of the fast paths.
const KV_KEY_TAG: u8 = (KEY_VALUE_KEY as u8) << 3 | 2;
const KV_VALUE_TAG: u8 = (KEY_VALUE_VALUE as u8) << 3 | 2;
const EVENT_TIME_TAG: u8 = (EVENT_TIME as u8) << 3 | 1;
const EVENT_NAME_TAG: u8 = (EVENT_NAME as u8) << 3 | 2;
const EVENT_ATTRIBUTES_TAG: u8 = (EVENT_ATTRIBUTES as u8) << 3 | 2;
const STATUS_CODE_TAG: u8 = (STATUS_CODE as u8) << 3;
const ANY_STRING_TAG: u8 = (ANY_STRING as u8) << 3 | 2;
const SPANS_TAG: u8 = (SCOPE_SPANS_SPANS as u8) << 3 | 2;

/// What a walk does with a field, by its key's first byte. (Flat, so that one jump
/// table dispatches it.)
#[derive(Clone, Copy)]
enum KeyAction {
    /// The general reader: longer keys, groups, field number 0.
    General,
    /// Not needed: stepped over.
    SkipVarint,
    SkipFixed64,
    SkipBytes,
    SkipFixed32,
    /// A length-delimited field to look at.
    Read,
    /// A span attribute: only its key is looked at (Flow Spans, docs/behaviour.md §8).
    Attribute,
    /// The first byte of `flags` (field 16, fixed32), the one span field every recent
    /// SDK writes with a two-byte key.
    SkipFlags,
}

/// `SPAN_KEYS[key byte]`: fields 1–15 of a `Span`.
const SPAN_KEYS: [KeyAction; 256] = {
    let mut keys = [KeyAction::General; 256];
    let mut number = 1;
    while number < 16 {
        let key = number << 3;
        // Only the wire type the schema gives a field is fast; another one goes to the
        // general reader, which refuses it (as prost does).
        match span_wire(number as u32) {
            Some(0) => keys[key] = KeyAction::SkipVarint,
            Some(1) => keys[key | 1] = KeyAction::SkipFixed64,
            Some(5) => keys[key | 5] = KeyAction::SkipFixed32,
            _ => {
                keys[key | 2] = match number as u32 {
                    SPAN_TRACE_ID | SPAN_SPAN_ID | SPAN_PARENT_SPAN_ID | SPAN_EVENTS
                    | SPAN_STATUS => KeyAction::Read,
                    _ => KeyAction::SkipBytes,
                }
            }
        }
        number += 1;
    }
    keys[SPAN_FLAGS_KEY[0] as usize] = KeyAction::SkipFlags;
    keys
};

/// The key of `flags` (field 16, wire type 5) as a varint: two bytes.
const SPAN_FLAGS_KEY: [u8; 2] = {
    let key = SPAN_FLAGS << 3 | 5;
    [0x80 | (key & 0x7f) as u8, (key >> 7) as u8]
};

/// Wire types of the fields of the messages the scan walks (opentelemetry-proto v1):
/// a known field with another wire type is refused, as prost refuses it.
const fn span_wire(number: u32) -> Option<u8> {
    match number {
        1..=5 | 9 | 11 | 13 | 15 => Some(2),
        6 | 10 | 12 | 14 => Some(0),
        7 | 8 => Some(1),
        16 => Some(5),
        _ => None,
    }
}

fn event_wire(number: u32) -> Option<u8> {
    match number {
        EVENT_TIME => Some(1),
        EVENT_NAME | EVENT_ATTRIBUTES => Some(2),
        4 => Some(0),
        _ => None,
    }
}

/// `ExportTraceServiceRequest`, `ResourceSpans`, `ScopeSpans`: messages and strings.
fn container_wire(number: u32) -> Option<u8> {
    match number {
        1..=3 => Some(2),
        _ => None,
    }
}

fn request_wire(number: u32) -> Option<u8> {
    (number == REQUEST_RESOURCE_SPANS).then_some(2)
}

fn status_wire(number: u32) -> Option<u8> {
    match number {
        2 => Some(2),
        STATUS_CODE => Some(0),
        _ => None,
    }
}

fn resource_wire(number: u32) -> Option<u8> {
    match number {
        RESOURCE_ATTRIBUTES | 3 => Some(2),
        2 => Some(0),
        _ => None,
    }
}

fn key_value_wire(number: u32) -> Option<u8> {
    match number {
        KEY_VALUE_KEY | KEY_VALUE_VALUE => Some(2),
        3 => Some(0), // key_strindex
        _ => None,
    }
}

fn any_value_wire(number: u32) -> Option<u8> {
    match number {
        ANY_STRING | 5..=ANY_BYTES => Some(2),
        ANY_BOOL | ANY_INT | ANY_STRINDEX => Some(0),
        ANY_DOUBLE => Some(1),
        _ => None,
    }
}

/// prost's recursion limit: a message nested deeper than this is refused.
const MAX_DEPTH: u32 = 100;
/// Depths (the request is 0) of the messages attribute lists hang off.
const RESOURCE_DEPTH: u32 = 2;
const SPAN_DEPTH: u32 = 3;
const EVENT_DEPTH: u32 = 4;

// Set when an attribute a flow event reads is malformed (not UTF-8, bad framing,
// nested too deeply): a full decode refuses such a request, so the scan does too. The
// lookups run behind the `Attributes` trait, which has no error path; a flag per
// thread, reset and checked around each extraction, carries it out.
thread_local! {
    static MALFORMED_READ: std::cell::Cell<bool> = const { std::cell::Cell::new(false) };
}

/// Depth (the request is 0) of the `AnyValue` of a `KeyValue` in attribute list `field`.
fn value_depth(field: u32) -> u32 {
    match field {
        EVENT_ATTRIBUTES => EVENT_DEPTH + 2,
        SPAN_ATTRIBUTES => SPAN_DEPTH + 2,
        _ => RESOURCE_DEPTH + 2,
    }
}

fn check_key_value(kv: &[u8], depth: u32) -> Result<(), ScanError> {
    if depth > MAX_DEPTH {
        return Err(ScanError::TooDeep);
    }
    let mut fields = Fields::new(kv);
    while let Some((number, value)) = fields.next_field()? {
        check_wire(number, &value, key_value_wire)?;
        match (number, value) {
            (KEY_VALUE_KEY, Value::Bytes(k)) => {
                utf8(k)?;
            }
            (KEY_VALUE_VALUE, Value::Bytes(v)) => check_any_value(v, depth + 1)?,
            _ if depth >= MAX_DEPTH => return Err(ScanError::TooDeep),
            _ => {}
        }
    }
    Ok(())
}

fn check_any_value(any: &[u8], depth: u32) -> Result<(), ScanError> {
    if depth > MAX_DEPTH {
        return Err(ScanError::TooDeep);
    }
    let mut fields = Fields::new(any);
    while let Some((number, value)) = fields.next_field()? {
        check_wire(number, &value, any_value_wire)?;
        match (number, value) {
            (ANY_STRING, Value::Bytes(s)) => {
                utf8(s)?;
            }
            // ArrayValue (repeated AnyValue 1) and KeyValueList (repeated KeyValue 1).
            (5, Value::Bytes(list)) => check_list(list, depth + 1, check_any_value)?,
            (6, Value::Bytes(list)) => check_list(list, depth + 1, check_key_value)?,
            (1..=ANY_STRINDEX, _) => {}
            _ if depth >= MAX_DEPTH => return Err(ScanError::TooDeep),
            _ => {}
        }
    }
    Ok(())
}

fn check_list(
    list: &[u8],
    depth: u32,
    item: fn(&[u8], u32) -> Result<(), ScanError>,
) -> Result<(), ScanError> {
    if depth > MAX_DEPTH {
        return Err(ScanError::TooDeep);
    }
    let mut fields = Fields::new(list);
    while let Some((number, value)) = fields.next_field()? {
        match (number, value) {
            (1, Value::Bytes(b)) => item(b, depth + 1)?,
            (1, _) => return Err(WireError::WrongWireType.into()),
            _ if depth >= MAX_DEPTH => return Err(ScanError::TooDeep),
            _ => {}
        }
    }
    Ok(())
}
/// `SPAN_KEYS`, plus a look at span attribute keys: used only when Flow Spans are
/// counted, so that with `network_flows.enabled: false` the walk is unchanged.
const SPAN_KEYS_NETWORK: [KeyAction; 256] = {
    let mut keys = SPAN_KEYS;
    keys[(SPAN_ATTRIBUTES as usize) << 3 | 2] = KeyAction::Attribute;
    keys
};

/// Walks an `ExportTraceServiceRequest` and extracts its flow events. Nothing is applied
/// here: a malformed request is refused whole, before any event reaches the correlation store.
pub fn scan_traces<'a>(
    body: &'a [u8],
    extractor: &Extractor,
    received_nanos: u64,
) -> Result<TraceEvents<'a>, ScanError> {
    scan_traces_with_network(body, extractor, None, received_nanos)
}

/// [`scan_traces`], also reading Flow Spans when `network` is given.
pub fn scan_traces_with_network<'a>(
    body: &'a [u8],
    extractor: &Extractor,
    network: Option<&NetworkFlows>,
    received_nanos: u64,
) -> Result<TraceEvents<'a>, ScanError> {
    let mut scan = Scan {
        x: extractor,
        received: received_nanos,
        found: TraceEvents::default(),
        candidates: Vec::new(),
        network,
        resource: SharedLayer::new(RawAttributes {
            msg: &[],
            outer: None,
            field: RESOURCE_ATTRIBUTES,
        }),
    };
    scan.request(body)?;
    Ok(scan.found)
}

/// An event that looks like a flow event, remembered until its span has been read whole
/// (the span's status and ids may come after it).
struct Candidate<'a> {
    name: &'a str,
    time: u64,
    /// The part of the event holding its attributes.
    attributes: &'a [u8],
}

/// What a span's own fields say about it.
#[derive(Default)]
struct SpanIds<'a> {
    trace_id: &'a [u8],
    span_id: &'a [u8],
    parent_span_id: &'a [u8],
    /// Status code ERROR.
    is_error: bool,
    /// Has a Flow Span attribute (looked for only with `network_flows.enabled`).
    flow_span: bool,
}

struct Scan<'x, 'a> {
    x: &'x Extractor,
    received: u64,
    found: TraceEvents<'a>,
    /// Reused for every span: most spans have no candidate, none allocates.
    candidates: Vec<Candidate<'a>>,
    network: Option<&'x NetworkFlows>,
    /// The current resource's attributes for Flow Spans, read once per resource for
    /// all its spans (a `SharedLayer` caches one key set: the flow extractor has its
    /// own).
    resource: SharedLayer<'a, RawAttributes<'a>>,
}

impl<'a> Scan<'_, 'a> {
    fn request(&mut self, body: &'a [u8]) -> Result<(), ScanError> {
        let mut fields = Fields::new(body);
        while let Some(field) = fields.next_field()? {
            check_wire(field.0, &field.1, request_wire)?;
            if let (REQUEST_RESOURCE_SPANS, Value::Bytes(resource_spans)) = field {
                self.resource_spans(resource_spans)?;
            }
        }
        Ok(())
    }

    fn resource_spans(&mut self, msg: &'a [u8]) -> Result<(), ScanError> {
        // The resource may come after its spans on the wire: find it first. Repeated, the
        // message fields merge (as prost does); for attributes that means the lists add
        // up, which `RawAttributes` gets by reading every occurrence.
        let mut resources = 0;
        let mut resource: &[u8] = &[];
        let mut fields = Fields::new(msg);
        while let Some(field) = fields.next_field()? {
            check_wire(field.0, &field.1, container_wire)?;
            if let (RESOURCE_SPANS_RESOURCE, Value::Bytes(r)) = field {
                resources += 1;
                resource = r;
                let mut fields = Fields::new(r);
                while let Some(field) = fields.next_field()? {
                    check_wire(field.0, &field.1, resource_wire)?;
                }
            }
        }
        let resource = if resources > 1 {
            RawAttributes {
                msg,
                outer: Some(RESOURCE_SPANS_RESOURCE),
                field: RESOURCE_ATTRIBUTES,
            }
        } else {
            RawAttributes {
                msg: resource,
                outer: None,
                field: RESOURCE_ATTRIBUTES,
            }
        };
        self.resource = SharedLayer::new(resource);
        let resource = SharedLayer::new(resource);
        let mut fields = Fields::new(msg);
        while let Some(field) = fields.next_field()? {
            if let (RESOURCE_SPANS_SCOPE_SPANS, Value::Bytes(scope_spans)) = field {
                let mut rest = scope_spans;
                while !rest.is_empty() {
                    // A span of 128 bytes to 16 KiB, the usual size, inline; anything
                    // else (and every other field) through the general reader.
                    if let [SPANS_TAG, l0, l1, ref tail @ ..] = *rest {
                        if l0 >= 0x80 && l1 < 0x80 && l1 > 0 {
                            let len = usize::from(l0 & 0x7f) | usize::from(l1) << 7;
                            if let Some((span, after)) = tail.split_at_checked(len) {
                                rest = after;
                                self.found.spans += 1;
                                self.span(span, &resource)?;
                                continue;
                            }
                        }
                    }
                    let mut fields = Fields::new(rest);
                    let field = fields.next_field()?.ok_or(WireError::PastTheEnd)?;
                    rest = fields.rest();
                    check_wire(field.0, &field.1, container_wire)?;
                    if let (SCOPE_SPANS_SPANS, Value::Bytes(span)) = field {
                        self.found.spans += 1;
                        self.span(span, &resource)?;
                    }
                }
            }
        }
        Ok(())
    }

    /// One pass over the span's own fields; events are looked into only for their name
    /// and time, attributes not at all unless an event turns out to be a flow event.
    fn span(
        &mut self,
        span: &'a [u8],
        resource: &SharedLayer<'a, RawAttributes<'a>>,
    ) -> Result<(), ScanError> {
        let mut ids = SpanIds::default();
        self.candidates.clear();
        let mut rest = span;
        let keys = if self.network.is_some() {
            &SPAN_KEYS_NETWORK
        } else {
            &SPAN_KEYS
        };
        while let [tag, ref tail @ ..] = *rest {
            // One table lookup says what to do with the usual fields (one-byte key,
            // lengths and varints of one byte); anything else, and every error, goes
            // through the general reader below.
            match keys[usize::from(tag)] {
                KeyAction::SkipBytes => {
                    if let [len, ref tail @ ..] = *tail {
                        if let Some(after) = tail.get(usize::from(len)..).filter(|_| len < 0x80) {
                            rest = after;
                            continue;
                        }
                    }
                }
                KeyAction::SkipVarint => {
                    if let [b, ref after @ ..] = *tail {
                        if b < 0x80 {
                            rest = after;
                            continue;
                        }
                    }
                }
                KeyAction::SkipFixed64 => {
                    if let Some(after) = tail.get(8..) {
                        rest = after;
                        continue;
                    }
                }
                KeyAction::SkipFixed32 => {
                    if let Some(after) = tail.get(4..) {
                        rest = after;
                        continue;
                    }
                }
                KeyAction::Read => {
                    if let [len, ref tail @ ..] = *tail {
                        if len < 0x80 {
                            if let Some((bytes, after)) = tail.split_at_checked(len.into()) {
                                rest = after;
                                self.span_field(&mut ids, u32::from(tag >> 3), bytes)?;
                                continue;
                            }
                        }
                    }
                }
                KeyAction::Attribute => {
                    // As SkipBytes, plus one look at the key (see `may_be_flow_span_kv`).
                    if let [len, ref tail @ ..] = *tail {
                        if let Some(after) = tail.get(usize::from(len)..).filter(|_| len < 0x80) {
                            if may_be_flow_span_kv(tail) {
                                ids.flow_span |= is_flow_span_kv(&tail[..usize::from(len)]);
                            }
                            rest = after;
                            continue;
                        }
                    }
                }
                KeyAction::SkipFlags => {
                    // The same first byte starts the keys of fields 32, 48, …: the
                    // second byte tells.
                    if let [second, _, _, _, _, ref after @ ..] = *tail {
                        if second == SPAN_FLAGS_KEY[1] {
                            rest = after;
                            continue;
                        }
                    }
                }
                KeyAction::General => {}
            }
            let mut fields = Fields::new(rest);
            let field = fields.next_field()?.ok_or(WireError::PastTheEnd)?;
            rest = fields.rest();
            check_wire(field.0, &field.1, span_wire)?;
            if let (number, Value::Bytes(bytes)) = field {
                self.span_field(&mut ids, number, bytes)?;
            }
        }
        check_id(ids.trace_id, IdField::TraceId)?;
        check_id(ids.span_id, IdField::SpanId)?;
        check_id(ids.parent_span_id, IdField::ParentSpanId)?;
        if ids.flow_span {
            self.network_record(span, &ids);
        }
        if self.candidates.is_empty() {
            return Ok(());
        }
        self.extract_candidates(span, ids, resource)
    }

    /// One length-delimited field of a span.
    #[inline(always)]
    fn span_field(
        &mut self,
        ids: &mut SpanIds<'a>,
        number: u32,
        bytes: &'a [u8],
    ) -> Result<(), ScanError> {
        match number {
            // Repeated, the last one wins: lengths are checked once the span is read.
            SPAN_TRACE_ID => ids.trace_id = bytes,
            SPAN_SPAN_ID => ids.span_id = bytes,
            SPAN_PARENT_SPAN_ID => ids.parent_span_id = bytes,
            SPAN_EVENTS => self.event(bytes)?,
            SPAN_ATTRIBUTES if self.network.is_some() => {
                ids.flow_span |= may_be_flow_span_kv(bytes) && is_flow_span_kv(bytes);
            }
            SPAN_STATUS => {
                if let Some(error) = status_is_error(bytes)? {
                    ids.is_error = error;
                }
            }
            _ => {}
        }
        Ok(())
    }

    /// A Flow Span, read by now: its window (for retry identity) and attributes.
    #[inline(never)]
    fn network_record(&mut self, span: &'a [u8], ids: &SpanIds<'a>) {
        let Some(network) = self.network else { return };
        let mut identity = SpanIdentity {
            trace_id: ids.trace_id,
            span_id: ids.span_id,
            ..SpanIdentity::default()
        };
        // The span was walked once already: errors cannot happen here.
        let mut fields = Fields::new(span);
        while let Ok(Some(field)) = fields.next_field() {
            match field {
                (SPAN_START_TIME, Value::Fixed64(t)) => identity.start_nanos = t,
                (SPAN_END_TIME, Value::Fixed64(t)) => identity.end_nanos = t,
                _ => {}
            }
        }
        let attributes = RawAttributes {
            msg: span,
            outer: None,
            field: SPAN_ATTRIBUTES,
        };
        let record = network.extract(attributes, &self.resource, identity);
        self.found.network.push(record);
    }

    /// The flow events of one span, read by now.
    #[inline(never)]
    fn extract_candidates(
        &mut self,
        span: &'a [u8],
        ids: SpanIds<'a>,
        resource: &SharedLayer<'a, RawAttributes<'a>>,
    ) -> Result<(), ScanError> {
        MALFORMED_READ.with(|m| m.set(false));
        let origin = Origin {
            is_error: ids.is_error,
            trace: TraceRef::from_ids(ids.trace_id, ids.span_id),
            source: Source::SpanEvent,
        };
        // An event without a time takes its span's end time (docs/behaviour.md §3): a
        // retried export then carries the same time, and is recognised as a retry. Read
        // only when needed: almost every event has its own time.
        let span_end = if self.candidates.iter().any(|c| c.time == 0) {
            span_end_time(span)
        } else {
            0
        };
        let parent = RawAttributes {
            msg: span,
            outer: None,
            field: SPAN_ATTRIBUTES,
        };
        for c in self.candidates.drain(..) {
            let event = EventContext {
                name: c.name,
                layers: AttributeLayers {
                    event: RawAttributes {
                        msg: c.attributes,
                        outer: None,
                        field: EVENT_ATTRIBUTES,
                    },
                    parent,
                    resource,
                },
                time_nanos: c.time,
                fallback_nanos: span_end,
                origin,
            };
            self.x
                .extract_into(&event, self.received, &mut self.found.events);
        }
        if MALFORMED_READ.with(Cell::get) {
            return Err(ScanError::MalformedAttribute);
        }
        Ok(())
    }

    /// Name (checked UTF-8, whatever it is) and time of one span event.
    #[inline(never)]
    fn event(&mut self, event: &'a [u8]) -> Result<(), ScanError> {
        let mut name = "";
        let mut time = 0;
        // Where the attributes are (first to last), so that lookups skip the rest.
        let mut attributes = (event.len(), event.len());
        let mut rest = event;
        while let [tag, ref tail @ ..] = *rest {
            let at = event.len() - rest.len();
            // The usual layout inline, anything else through the general reader.
            let (field, after) = match (tag, tail) {
                (EVENT_TIME_TAG, tail) if tail.len() >= 8 => {
                    let (t, after) = tail.split_at(8);
                    let t = u64::from_le_bytes(t.try_into().expect("8 bytes"));
                    ((EVENT_TIME, Value::Fixed64(t)), after)
                }
                (EVENT_NAME_TAG | EVENT_ATTRIBUTES_TAG, &[len, ref tail @ ..])
                    if len < 0x80 && usize::from(len) <= tail.len() =>
                {
                    let (b, after) = tail.split_at(len.into());
                    ((u32::from(tag >> 3), Value::Bytes(b)), after)
                }
                _ => {
                    let mut fields = Fields::new(rest);
                    let field = fields.next_field()?.ok_or(WireError::PastTheEnd)?;
                    check_wire(field.0, &field.1, event_wire)?;
                    (field, fields.rest())
                }
            };
            rest = after;
            match field {
                // Repeated, the last one wins, and every one must be text (as in a full
                // decode).
                (EVENT_NAME, Value::Bytes(b)) => name = utf8(b)?,
                (EVENT_TIME, Value::Fixed64(t)) => time = t,
                (EVENT_ATTRIBUTES, _) => {
                    attributes.0 = attributes.0.min(at);
                    attributes.1 = event.len() - rest.len();
                }
                _ => {}
            }
        }
        if self.x.may_be_flow_event(name) {
            self.candidates.push(Candidate {
                name,
                time,
                attributes: &event[attributes.0..attributes.1],
            });
        }
        Ok(())
    }
}

/// Could the `KeyValue` at the start of `bytes` be a Flow Span marker? (`bytes` may go
/// on past it: a `KeyValue` shorter than 3 bytes then just fails the full check.)
/// Runs for every span attribute: for the usual encoding (key first) the tag and the
/// key's first byte decide, as few keys start with "f"; anything else goes to
/// [`is_flow_span_kv`]. (A key of 128 bytes or more has a second length byte where the
/// key would start, and is no marker either.)
#[inline(always)]
fn may_be_flow_span_kv(bytes: &[u8]) -> bool {
    match *bytes {
        [KV_KEY_TAG, _, b'f', ..] => true,
        [KV_KEY_TAG, ..] => false,
        _ => true,
    }
}

/// Is this `KeyValue`'s key one that marks a Flow Span?
#[inline(never)]
fn is_flow_span_kv(kv: &[u8]) -> bool {
    key_value(kv).is_some_and(|(k, _)| is_flow_span_key(k))
}

/// The status code of a `Status` is ERROR: `Some(true)`; another code: `Some(false)`; no
/// code: `None`. Repeated, the last one wins (and repeated statuses merge, as in a full
/// decode).
#[inline]
fn status_is_error(status: &[u8]) -> Result<Option<bool>, ScanError> {
    match *status {
        [] => return Ok(None),
        [STATUS_CODE_TAG, code] if code < 0x80 => {
            return Ok(Some(u64::from(code) == STATUS_CODE_ERROR))
        }
        _ => {}
    }
    status_fields(status)
}

#[inline(never)]
fn status_fields(status: &[u8]) -> Result<Option<bool>, ScanError> {
    let mut is_error = None;
    let mut fields = Fields::new(status);
    while let Some(field) = fields.next_field()? {
        check_wire(field.0, &field.1, status_wire)?;
        if let (STATUS_CODE, Value::Varint(code)) = field {
            is_error = Some(code == STATUS_CODE_ERROR);
        }
    }
    Ok(is_error)
}

#[inline]
fn check_id(bytes: &[u8], field: IdField) -> Result<(), ScanError> {
    if field.fits(bytes) {
        Ok(())
    } else {
        Err(ScanError::IdLength(field))
    }
}

/// The repeated `KeyValue` field `field` of a message, read in place; with `outer`, of
/// every occurrence of the sub-message `outer` of `msg` (the resource of a
/// `ResourceSpans`).
#[derive(Clone, Copy)]
pub struct RawAttributes<'a> {
    msg: &'a [u8],
    outer: Option<u32>,
    field: u32,
}

/// One pass over an attribute list: every wanted key found at once.
fn collect<'a>(
    msg: &'a [u8],
    field: u32,
    keys: &Keys,
    found: &mut [Option<AttrValue<'a>>],
    missing: &mut usize,
) {
    // The bytes were walked once already, so errors cannot happen here; stop quietly
    // if they do.
    let mut fields = Fields::new(msg);
    while let Ok(Some((number, value))) = fields.next_field() {
        let Value::Bytes(kv) = value else { continue };
        if number != field {
            continue;
        }
        let Some((k, v)) = key_value(kv) else {
            MALFORMED_READ.with(|m| m.set(true));
            return;
        };
        let Some(slot) = keys.slot(k) else { continue };
        if found[slot].is_none() {
            found[slot] = Some(checked_any_value(v, value_depth(field)));
            *missing -= 1;
            if *missing == 0 {
                return;
            }
        }
    }
}

impl<'a, 'r: 'a> Attributes<'a> for RawAttributes<'r> {
    fn find_all(&self, keys: &Keys, found: &mut [Option<AttrValue<'a>>]) {
        let mut missing = found.len();
        if missing == 0 {
            return;
        }
        let Some(outer) = self.outer else {
            return collect(self.msg, self.field, keys, found, &mut missing);
        };
        let mut fields = Fields::new(self.msg);
        while let Ok(Some((number, value))) = fields.next_field() {
            if let (true, Value::Bytes(inner)) = (number == outer, value) {
                collect(inner, self.field, keys, found, &mut missing);
                if missing == 0 {
                    return;
                }
            }
        }
    }
}

/// A `KeyValue`: its key and its value's bytes (last one wins, as in a full decode).
/// `None` if it does not parse.
#[inline]
fn key_value(kv: &[u8]) -> Option<(&[u8], &[u8])> {
    // What every encoder writes: the key, then the value, lengths under 128.
    if let [KV_KEY_TAG, klen, ref rest @ ..] = *kv {
        if let Some((k, rest)) = rest.split_at_checked(usize::from(klen)) {
            match *rest {
                [] if klen < 0x80 => return Some((k, &[])),
                [KV_VALUE_TAG, vlen, ref v @ ..]
                    if klen < 0x80 && vlen < 0x80 && usize::from(vlen) == v.len() =>
                {
                    return Some((k, v))
                }
                _ => {}
            }
        }
    }
    let mut k: &[u8] = &[];
    let mut v: &[u8] = &[];
    let mut fields = Fields::new(kv);
    loop {
        match fields.next_field() {
            Ok(Some((KEY_VALUE_KEY, Value::Bytes(b)))) => k = b,
            Ok(Some((KEY_VALUE_VALUE, Value::Bytes(b)))) => v = b,
            Ok(Some(_)) => {}
            Ok(None) => return Some((k, v)),
            Err(_) => return None,
        }
    }
}

/// An `AnyValue` that is read, checked as a full decode checks it (a malformed one sets
/// [`MALFORMED_READ`]). A lone short string, the common case, has nothing to check but
/// its UTF-8: validated once, not once per check and once per read.
#[inline]
fn checked_any_value(msg: &[u8], depth: u32) -> AttrValue<'_> {
    if let [ANY_STRING_TAG, len, ref s @ ..] = *msg {
        if len < 0x80 && usize::from(len) == s.len() {
            return match utf8(s) {
                Ok(s) => AttrValue::Str(s),
                Err(_) => {
                    MALFORMED_READ.with(|m| m.set(true));
                    AttrValue::Other
                }
            };
        }
    }
    if check_any_value(msg, depth).is_err() {
        MALFORMED_READ.with(|m| m.set(true));
    }
    any_value(msg)
}

/// An `AnyValue`. Like a full decode, the last value field present wins.
fn any_value(msg: &[u8]) -> AttrValue<'_> {
    // A string under 128 bytes, alone: the common case.
    if let [ANY_STRING_TAG, len, ref s @ ..] = *msg {
        if len < 0x80 && usize::from(len) == s.len() {
            return utf8(s).map(AttrValue::Str).unwrap_or(AttrValue::Other);
        }
    }
    let mut value = AttrValue::Other;
    let mut fields = Fields::new(msg);
    loop {
        value = match fields.next_field() {
            Ok(Some((ANY_STRING, Value::Bytes(b)))) => {
                utf8(b).map(AttrValue::Str).unwrap_or(AttrValue::Other)
            }
            Ok(Some((ANY_BOOL, Value::Varint(b)))) => AttrValue::Bool(b != 0),
            Ok(Some((ANY_INT, Value::Varint(i)))) => AttrValue::Int(i as i64),
            Ok(Some((ANY_DOUBLE, Value::Fixed64(d)))) => AttrValue::Double(f64::from_bits(d)),
            // Arrays, maps, bytes (or a known field of the wrong type).
            Ok(Some((ANY_STRING..=ANY_STRINDEX, _))) => AttrValue::Other,
            // Unknown fields are skipped, as in a full decode.
            Ok(Some(_)) => value,
            Ok(None) => return value,
            Err(_) => return AttrValue::Other,
        };
    }
}

/// A span's `end_time_unix_nano` (the last one, as a full decode reads it); 0 if unset.
/// The span was walked once already: errors cannot happen here.
fn span_end_time(span: &[u8]) -> u64 {
    let mut end = 0;
    let mut fields = Fields::new(span);
    while let Ok(Some(field)) = fields.next_field() {
        if let (SPAN_END_TIME, Value::Fixed64(t)) = field {
            end = t;
        }
    }
    end
}

#[cfg(test)]
mod tests {
    use std::borrow::Cow;

    use super::*;
    use crate::config::Config;
    use crate::flows::test_attrs::{kv, str_kv};
    use crate::flows::FlowEvent;
    use crate::model::Rejection;
    use opentelemetry_proto::tonic::collector::trace::v1::ExportTraceServiceRequest;
    use opentelemetry_proto::tonic::common::v1::{any_value, AnyValue, KeyValue};
    use opentelemetry_proto::tonic::resource::v1::Resource;
    use opentelemetry_proto::tonic::trace::v1::{
        span, status, ResourceSpans, ScopeSpans, Span, Status,
    };
    use prost::Message;
    use std::sync::Arc;

    #[test]
    fn flow_span_keys_are_found_in_any_encoding() {
        let encoded = |key: &str| str_kv(key, "x").encode_to_vec();
        let marker = |kv: &[u8]| may_be_flow_span_kv(kv) && is_flow_span_kv(kv);
        assert!(marker(&encoded("flow.bytes.delta")));
        assert!(marker(&encoded("flow.community_id")));
        for key in [
            "flow.direction",
            "http.status_code",
            "flow",
            "",
            &"f".repeat(200),
        ] {
            assert!(!marker(&encoded(key)), "{key}");
        }
        // Value before key: legal protobuf, found by the general reader.
        let mut swapped = Vec::new();
        let value = AnyValue {
            value: Some(any_value::Value::IntValue(3)),
        }
        .encode_to_vec();
        swapped.extend([KV_VALUE_TAG, value.len() as u8]);
        swapped.extend(&value);
        swapped.extend([KV_KEY_TAG, 18]);
        swapped.extend(b"flow.packets.delta");
        assert!(marker(&swapped));
    }

    /// A request exercising every lookup: ids on event, span and resource, int ids,
    /// outcomes, status-derived failure, dimensions, non-flow events, bad events.
    fn varied_request() -> ExportTraceServiceRequest {
        let span = |events: Vec<span::Event>, attrs: Vec<KeyValue>, error: bool| Span {
            trace_id: vec![9; 16],
            span_id: vec![1; 8],
            attributes: attrs,
            events,
            status: error.then(|| Status {
                code: status::StatusCode::Error as i32,
                ..Default::default()
            }),
            ..Default::default()
        };
        let event = |name: &str, attrs: Vec<KeyValue>| span::Event {
            name: name.into(),
            time_unix_nano: 5,
            attributes: attrs,
            ..Default::default()
        };
        ExportTraceServiceRequest {
            resource_spans: vec![ResourceSpans {
                resource: Some(Resource {
                    attributes: vec![
                        str_kv("service.name", "svc"),
                        str_kv("correlation.id", "from-resource"),
                    ],
                    ..Default::default()
                }),
                scope_spans: vec![ScopeSpans {
                    spans: vec![
                        span(
                            vec![event(
                                "flow.a.start",
                                vec![str_kv("correlation-id", "e1"), str_kv("tier", "gold")],
                            )],
                            vec![],
                            false,
                        ),
                        span(
                            vec![event("flow.a.end", vec![])],
                            vec![kv("correlation_id", any_value::Value::IntValue(77))],
                            true,
                        ),
                        span(
                            vec![event("flow.a.end", vec![str_kv("outcome", "canceled")])],
                            vec![],
                            false,
                        ),
                        span(
                            vec![event(
                                "flow.b.end",
                                vec![str_kv("correlation-id", "x"), str_kv("outcome", "nope")],
                            )],
                            vec![],
                            false,
                        ),
                        span(
                            vec![
                                event("exception", vec![]),
                                event("flow.bad name.start", vec![]),
                            ],
                            vec![str_kv("tier", "span-tier")],
                            false,
                        ),
                        span(vec![], vec![str_kv("http.method", "GET")], false),
                        // Steps: the name is read from the event only (not its span).
                        span(
                            vec![
                                event(
                                    "flow.a.step",
                                    vec![str_kv("correlation-id", "e1"), str_kv("step", "paid")],
                                ),
                                event("flow.a.step", vec![str_kv("correlation-id", "e1")]),
                                event(
                                    "flow.a.step",
                                    vec![kv("step", any_value::Value::IntValue(5))],
                                ),
                                event("flow.a.step", vec![str_kv("step", "bad name")]),
                            ],
                            vec![str_kv("step", "span-step")],
                            false,
                        ),
                    ],
                    ..Default::default()
                }],
                ..Default::default()
            }],
        }
    }

    fn config() -> Config {
        Config {
            dimensions: serde_yaml::from_str(
                "- { label: tier, attribute: tier, default: none }\n- { label: service, attribute: service.name }\n",
            )
            .unwrap(),
            ..Default::default()
        }
    }

    /// The same events as a full prost decode through the decoded-struct path.
    fn full_decode<'r>(
        req: &'r ExportTraceServiceRequest,
        x: &Extractor,
    ) -> Vec<Result<FlowEvent<'r>, Rejection>> {
        crate::flows::decoded::trace_events(req, x, None, 1).events
    }

    #[test]
    fn selective_and_full_decoding_agree() {
        let x = Extractor::new(crate::settings::extractor(&config()));
        let req = varied_request();
        let bytes = req.encode_to_vec();
        let scan = scan_traces(&bytes, &x, 1).unwrap();
        assert_eq!(scan.spans, 7);
        let full = full_decode(&req, &x);
        let show = |v: &[Result<FlowEvent, Rejection>]| format!("{v:?}");
        assert_eq!(show(&scan.events), show(&full));
        assert_eq!(scan.events.len(), 9);
        let step = scan.events[5].as_ref().unwrap();
        assert_eq!(
            (step.kind, step.step.as_deref(), step.dims.len()),
            (crate::flows::EventKind::Step, Some("paid"), 0)
        );
        assert_eq!(
            scan.events[6..]
                .iter()
                .map(|e| e.as_ref().unwrap_err().reason())
                .collect::<Vec<_>>(),
            ["missing_step", "invalid_step", "invalid_step"]
        );
        let ok: Vec<_> = scan.events.iter().filter_map(|e| e.as_ref().ok()).collect();
        assert_eq!(&*ok[0].correlation_id, "e1");
        assert_eq!(&*ok[0].dims[0], "gold");
        assert_eq!(&*ok[1].correlation_id, "77");
        assert_eq!(
            ok[1].kind,
            crate::flows::EventKind::End(crate::flows::Outcome::Failure)
        );
        assert_eq!(&*ok[2].correlation_id, "from-resource");
        // Text ids are read in place (the in-memory store only hashes them); an integer
        // id is printed.
        assert!(matches!(ok[0].correlation_id, Cow::Borrowed(_)));
        assert!(matches!(ok[1].correlation_id, Cow::Owned(_)));
        assert!(matches!(ok[2].correlation_id, Cow::Borrowed(_)));
    }

    /// An event without a time takes its span's end time, else the receive time, the
    /// same in both paths; repeated `end_time_unix_nano` fields: the last wins in both.
    #[test]
    fn both_paths_fall_back_to_the_span_end_then_the_receive_time() {
        let x = Extractor::new(crate::settings::extractor(&config()));
        let mut req = varied_request();
        let spans = &mut req.resource_spans[0].scope_spans[0].spans;
        for sp in spans.iter_mut() {
            for e in &mut sp.events {
                e.time_unix_nano = 0;
            }
        }
        spans[0].end_time_unix_nano = 42;
        spans[1].end_time_unix_nano = 0;
        let mut bytes = req.encode_to_vec();
        let scan = scan_traces(&bytes, &x, 1).unwrap();
        let full = full_decode(&req, &x);
        let show = |v: &[Result<FlowEvent, Rejection>]| format!("{v:?}");
        assert_eq!(show(&scan.events), show(&full));
        let times: Vec<u64> = scan
            .events
            .iter()
            .filter_map(|e| e.as_ref().ok())
            .map(|e| e.timestamp_nanos)
            .collect();
        assert_eq!(times[..2], [42, 1], "span end, then receive time");

        // The first span again, with a second end time after its events: the last wins.
        let span = req.resource_spans[0].scope_spans[0].spans[0].encode_to_vec();
        let mut twice = span.clone();
        twice.extend(fixed64_field(SPAN_END_TIME, 43));
        let scope = bytes_field(2, &twice);
        let resource = bytes_field(2, &scope);
        bytes = bytes_field(1, &resource);
        let scan = scan_traces(&bytes, &x, 1).unwrap();
        let decoded = ExportTraceServiceRequest::decode(&bytes[..]).unwrap();
        assert_eq!(show(&scan.events), show(&full_decode(&decoded, &x)));
        assert_eq!(scan.events[0].as_ref().unwrap().timestamp_nanos, 43);
    }

    #[test]
    fn malformed_and_bad_ids_are_refused_whole() {
        let x = Extractor::new(crate::settings::extractor(&config()));
        let mut req = varied_request();
        let good = req.encode_to_vec();
        for cut in [1, good.len() / 2, good.len() - 1] {
            assert!(scan_traces(&good[..cut], &x, 1).is_err(), "cut at {cut}");
        }
        req.resource_spans[0].scope_spans[0].spans[0].trace_id = vec![1; 15];
        let err = scan_traces(&req.encode_to_vec(), &x, 1).err().unwrap();
        assert!(err.to_string().contains("traceId"), "{err}");
    }

    // Hand-written wire bytes: what prost never writes but may read.
    fn varint(mut v: u64, out: &mut Vec<u8>) {
        while v >= 0x80 {
            out.push(v as u8 | 0x80);
            v >>= 7;
        }
        out.push(v as u8);
    }

    fn bytes_field(number: u32, bytes: &[u8]) -> Vec<u8> {
        let mut out = Vec::new();
        varint(u64::from(number << 3 | 2), &mut out);
        varint(bytes.len() as u64, &mut out);
        out.extend_from_slice(bytes);
        out
    }

    fn varint_field(number: u32, v: u64) -> Vec<u8> {
        let mut out = Vec::new();
        varint(u64::from(number << 3), &mut out);
        varint(v, &mut out);
        out
    }

    fn fixed64_field(number: u32, v: u64) -> Vec<u8> {
        let mut out = Vec::new();
        varint(u64::from(number << 3 | 1), &mut out);
        out.extend_from_slice(&v.to_le_bytes());
        out
    }

    fn fixed32_field(number: u32, v: u32) -> Vec<u8> {
        let mut out = Vec::new();
        varint(u64::from(number << 3 | 5), &mut out);
        out.extend_from_slice(&v.to_le_bytes());
        out
    }

    fn message(fields: &[Vec<u8>]) -> Vec<u8> {
        fields.concat()
    }

    /// A string `KeyValue`, with its fields in the given order and an unknown field.
    fn odd_kv(key: &str, value: &str) -> Vec<u8> {
        let any = message(&[
            varint_field(ANY_INT, 5),
            bytes_field(ANY_STRING, value.as_bytes()),
        ]);
        message(&[
            varint_field(7, 1),
            bytes_field(KEY_VALUE_VALUE, &any),
            bytes_field(KEY_VALUE_KEY, key.as_bytes()),
        ])
    }

    fn plain_kv(key: &str, value: &str) -> Vec<u8> {
        str_kv(key, value).encode_to_vec()
    }

    fn odd_config() -> Config {
        let mut c = config();
        // Long keys (fingerprint and full compare), keys differing only in the middle,
        // one-byte keys.
        c.events.correlation_keys =
            vec!["aaaaaaaa-key-one-bbbbbbbb".into(), "correlation-id".into()];
        c.dimensions = serde_yaml::from_str(
            "- { label: tier, attribute: t, default: none }\n- { label: service, attribute: service.name }\n- { label: region, attribute: region, from: end }\n",
        )
        .unwrap();
        c
    }

    /// Fields out of the usual order, repeated, unknown, long: the scan must find the same
    /// events a full decode does.
    fn odd_request() -> Vec<u8> {
        let long_value = "v".repeat(300);
        let long_id = "i".repeat(257);
        let event = |name_first: &str, name: &str, attrs: Vec<Vec<u8>>| {
            let mut fields = vec![bytes_field(99, b"unknown"), fixed64_field(EVENT_TIME, 1)];
            for a in &attrs[..attrs.len() / 2] {
                fields.push(bytes_field(EVENT_ATTRIBUTES, a));
            }
            fields.push(bytes_field(EVENT_NAME, name_first.as_bytes()));
            fields.push(fixed64_field(EVENT_TIME, 42));
            for a in &attrs[attrs.len() / 2..] {
                fields.push(bytes_field(EVENT_ATTRIBUTES, a));
            }
            // Repeated: the last name wins.
            fields.push(bytes_field(EVENT_NAME, name.as_bytes()));
            fields.push(varint_field(4, 3));
            message(&fields)
        };
        let status =
            |code: u64| message(&[bytes_field(2, b"msg"), varint_field(STATUS_CODE, code)]);
        let span = |events: Vec<Vec<u8>>, attrs: Vec<Vec<u8>>, statuses: Vec<u64>| {
            let mut fields = Vec::new();
            for e in &events {
                fields.push(bytes_field(SPAN_EVENTS, e));
            }
            for code in statuses {
                fields.push(bytes_field(SPAN_STATUS, &status(code)));
            }
            fields.push(bytes_field(5, long_value.as_bytes()));
            for a in &attrs {
                fields.push(bytes_field(SPAN_ATTRIBUTES, a));
            }
            fields.push(bytes_field(SPAN_SPAN_ID, &[3; 8]));
            fields.push(bytes_field(SPAN_TRACE_ID, &[4; 16]));
            fields.push(varint_field(2000, 1));
            fields.push(message(&[vec![0x85, 0x01], 1u32.to_le_bytes().to_vec()]));
            message(&fields)
        };
        let spans = [
            span(
                vec![event(
                    "exception",
                    "flow.a.start",
                    vec![
                        // Same length and ends as the wanted key: not it.
                        plain_kv("aaaaaaaa-key-two-bbbbbbbb", "decoy"),
                        odd_kv("t", "gold"),
                    ],
                )],
                vec![plain_kv("aaaaaaaa-key-one-bbbbbbbb", "from-span")],
                vec![],
            ),
            span(
                vec![event(
                    "flow.b.start",
                    "flow.a.end",
                    vec![
                        plain_kv("correlation-id", "c1"),
                        plain_kv("correlation-id", "second-ignored"),
                        plain_kv("region", &long_value),
                    ],
                )],
                vec![],
                // Repeated statuses merge: the last code wins.
                vec![STATUS_CODE_ERROR, 1],
            ),
            span(
                vec![
                    event("x", "flow.a.end", vec![plain_kv("t", "no-id")]),
                    event(
                        "y",
                        "flow.a.start",
                        vec![plain_kv("correlation-id", &long_id)],
                    ),
                    event(
                        "z",
                        "flow.c.end",
                        vec![
                            odd_kv("outcome", "Canceled"),
                            plain_kv("correlation-id", "c2"),
                        ],
                    ),
                ],
                vec![plain_kv("t", "span-tier")],
                vec![1, STATUS_CODE_ERROR],
            ),
        ];
        let scope = message(
            &spans
                .iter()
                .map(|s| bytes_field(SCOPE_SPANS_SPANS, s))
                .collect::<Vec<_>>(),
        );
        // The resource after the spans, in two parts that merge.
        let resource_a = message(&[bytes_field(
            RESOURCE_ATTRIBUTES,
            &plain_kv("service.name", "svc"),
        )]);
        let resource_b = message(&[
            varint_field(2, 0),
            bytes_field(
                RESOURCE_ATTRIBUTES,
                &plain_kv("correlation-id", "from-resource"),
            ),
        ]);
        let resource_spans = message(&[
            bytes_field(3, b"https://schema"),
            bytes_field(RESOURCE_SPANS_SCOPE_SPANS, &scope),
            bytes_field(RESOURCE_SPANS_RESOURCE, &resource_a),
            bytes_field(RESOURCE_SPANS_RESOURCE, &resource_b),
        ]);
        message(&[
            bytes_field(REQUEST_RESOURCE_SPANS, &resource_spans),
            bytes_field(
                REQUEST_RESOURCE_SPANS,
                &message(&[bytes_field(RESOURCE_SPANS_SCOPE_SPANS, &scope)]),
            ),
        ])
    }

    #[test]
    fn odd_encodings_decode_like_prost() {
        let x = Extractor::new(crate::settings::extractor(&odd_config()));
        let bytes = odd_request();
        let req = ExportTraceServiceRequest::decode(&bytes[..]).expect("prost reads it");
        let scan = scan_traces(&bytes, &x, 1).unwrap();
        assert_eq!(scan.spans, 6);
        let full = full_decode(&req, &x);
        let show = |v: &[Result<FlowEvent, Rejection>]| format!("{v:?}");
        assert_eq!(show(&scan.events), show(&full));
        let first: Vec<_> = scan.events[..5]
            .iter()
            .map(|e| {
                e.as_ref()
                    .map(|e| (&*e.correlation_id, &e.dims[..], e.kind, e.timestamp_nanos))
                    .map_err(Clone::clone)
            })
            .collect();
        use crate::flows::{EventKind, Outcome};
        let svc: Arc<str> = "svc".into();
        let gold: Arc<str> = "gold".into();
        // 300 bytes sent, cut to limits.max_label_value_bytes (256) by either path.
        let long: Arc<str> = "v".repeat(256).into();
        assert_eq!(
            first,
            vec![
                Ok(("from-span", &[gold, svc.clone()][..], EventKind::Start, 42)),
                Ok(("c1", &[long][..], EventKind::End(Outcome::Success), 42)),
                // No id on the event or span: the resource's; status ERROR (last one).
                Ok((
                    "from-resource",
                    &["".into()][..],
                    EventKind::End(Outcome::Failure),
                    42
                )),
                Err(Rejection::CorrelationIdTooLong),
                Ok((
                    "c2",
                    &["".into()][..],
                    EventKind::End(Outcome::Cancelled),
                    42
                )),
            ]
        );
        // The second resource_spans has no resource at all.
        assert_eq!(scan.events.len(), 10);
        assert_eq!(
            scan.events[5].as_ref().unwrap().dims[1],
            std::sync::Arc::<str>::from("")
        );
        assert_eq!(
            scan.events[7].as_ref().unwrap_err(),
            &Rejection::MissingCorrelationId
        );
    }

    /// A request of one span with one event holding `event_attr` (raw `KeyValue` bytes),
    /// then `span_extra` raw span fields.
    fn one_event_request(event_fields: &[Vec<u8>], span_extra: &[u8]) -> Vec<u8> {
        let event = message(event_fields);
        let mut span = message(&[
            bytes_field(SPAN_TRACE_ID, &[1; 16]),
            bytes_field(SPAN_EVENTS, &event),
        ]);
        span.extend_from_slice(span_extra);
        request_of(&[span])
    }

    /// A request of one resource and one scope holding `spans` (encoded `Span`s).
    fn request_of(spans: &[Vec<u8>]) -> Vec<u8> {
        let scope: Vec<u8> = spans
            .iter()
            .flat_map(|s| bytes_field(SCOPE_SPANS_SPANS, s))
            .collect();
        let rs = bytes_field(RESOURCE_SPANS_SCOPE_SPANS, &scope);
        bytes_field(REQUEST_RESOURCE_SPANS, &rs)
    }

    /// One `flow.a.start` event with a correlation id and a `tier` attribute (a dimension)
    /// whose `AnyValue` is `any`.
    fn tier_request(any: &[u8]) -> Vec<u8> {
        let tier = message(&[
            bytes_field(KEY_VALUE_KEY, b"tier"),
            bytes_field(KEY_VALUE_VALUE, any),
        ]);
        one_event_request(
            &[
                bytes_field(EVENT_NAME, b"flow.a.start"),
                bytes_field(EVENT_ATTRIBUTES, &plain_kv("correlation-id", "c1")),
                bytes_field(EVENT_ATTRIBUTES, &tier),
            ],
            &[],
        )
    }

    /// Both ways agree: same verdict, and the same events when accepted.
    fn assert_like_prost(bytes: &[u8]) -> Result<usize, ()> {
        let x = Extractor::new(crate::settings::extractor(&config()));
        let full = crate::ingest::decode::decode::<ExportTraceServiceRequest>(
            bytes,
            crate::ingest::decode::MediaType::Protobuf,
        );
        let scan = scan_traces(bytes, &x, 1);
        match (full, scan) {
            (Ok(req), Ok(scan)) => {
                let show = |v: &[Result<FlowEvent, Rejection>]| format!("{v:?}");
                assert_eq!(show(&scan.events), show(&full_decode(&req, &x)));
                Ok(scan.events.len())
            }
            (Err(_), Err(_)) => Err(()),
            (full, scan) => panic!(
                "prost {:?}, scan {:?}",
                full.map(|_| ()),
                scan.map(|s| s.events)
            ),
        }
    }

    /// Item 9 (a): a value length sent as the non-minimal varint `85 00` with exactly
    /// 133 bytes after the `0x85` once lost its correlation id in the fast path.
    #[test]
    fn a_non_minimal_value_length_keeps_the_correlation_id() {
        let any = bytes_field(ANY_STRING, b"abc");
        let mut kv = bytes_field(KEY_VALUE_KEY, b"correlation-id");
        kv.extend_from_slice(&[KV_VALUE_TAG, 0x85, 0x00]);
        kv.extend_from_slice(&any);
        kv.extend(bytes_field(15, &[7; 125]));
        assert_eq!(
            kv.len() - kv.iter().position(|&b| b == 0x85).unwrap() - 1,
            133
        );
        let body = one_event_request(
            &[
                fixed64_field(EVENT_TIME, 5),
                bytes_field(EVENT_NAME, b"flow.a.start"),
                bytes_field(EVENT_ATTRIBUTES, &kv),
            ],
            &[],
        );
        assert_eq!(assert_like_prost(&body), Ok(1));
        let x = Extractor::new(crate::settings::extractor(&config()));
        let scan = scan_traces(&body, &x, 1).unwrap();
        assert_eq!(&*scan.events[0].as_ref().unwrap().correlation_id, "abc");
    }

    /// Item 9 (c): an event time as a varint, groups, invalid UTF-8 where an event reads,
    /// known fields with the wrong wire type: refused or accepted exactly as prost does.
    #[test]
    fn wire_types_groups_and_utf8_as_prost() {
        let name = bytes_field(EVENT_NAME, b"flow.a.start");
        let id = bytes_field(EVENT_ATTRIBUTES, &plain_kv("correlation-id", "c1"));
        // Time as a varint: prost refuses it.
        let body = one_event_request(
            &[varint_field(EVENT_TIME, 5), name.clone(), id.clone()],
            &[],
        );
        assert_eq!(assert_like_prost(&body), Err(()));
        // A group in an unknown span field (20), with a nested group: skipped by both.
        let group = b"\xa3\x01\x08\x01\x1b\x1c\xa4\x01";
        let body = one_event_request(
            &[fixed64_field(EVENT_TIME, 5), name.clone(), id.clone()],
            group,
        );
        assert_eq!(assert_like_prost(&body), Ok(1));
        // An unterminated group: refused by both.
        let body = one_event_request(&[name.clone(), id.clone()], b"\xa3\x01\x08\x01");
        assert_eq!(assert_like_prost(&body), Err(()));
        // Invalid UTF-8 in the correlation id, on the event or (when the event has none)
        // on its span, and a malformed value read as a dimension: prost refuses the
        // request, so does the scan.
        let bad_id = message(&[
            bytes_field(KEY_VALUE_KEY, b"correlation-id"),
            bytes_field(KEY_VALUE_VALUE, &bytes_field(ANY_STRING, b"\xff\xfe")),
        ]);
        let body = one_event_request(&[name.clone(), bytes_field(EVENT_ATTRIBUTES, &bad_id)], &[]);
        assert_eq!(assert_like_prost(&body), Err(()));
        let body = one_event_request(
            std::slice::from_ref(&name),
            &bytes_field(SPAN_ATTRIBUTES, &bad_id),
        );
        assert_eq!(assert_like_prost(&body), Err(()));
        let bad_tier = tier_request(&bytes_field(5, b"\x0a\x05ab"));
        assert_eq!(assert_like_prost(&bad_tier), Err(()));
        // An attribute no flow event reads is not looked into (one of the differences
        // docs/limits.md lists): prost refuses its bad key, the scan does not.
        let bad_key = message(&[bytes_field(KEY_VALUE_KEY, b"\xc3")]);
        let body = one_event_request(
            &[
                name.clone(),
                id.clone(),
                bytes_field(EVENT_ATTRIBUTES, &bad_key),
            ],
            &[],
        );
        assert!(ExportTraceServiceRequest::decode(&body[..]).is_err());
        let x = Extractor::new(crate::settings::extractor(&config()));
        assert_eq!(scan_traces(&body, &x, 1).unwrap().events.len(), 1);
        // Known span, status and event fields with the wrong wire type.
        for extra in [
            varint_field(SPAN_TRACE_ID, 1),
            bytes_field(6, b"k"), // kind
            varint_field(7, 1),   // start time
            bytes_field(SPAN_STATUS, &bytes_field(STATUS_CODE, b"x")),
            bytes_field(SPAN_EVENTS, &varint_field(EVENT_NAME, 1)),
        ] {
            let body = one_event_request(&[name.clone(), id.clone()], &extra);
            assert_eq!(assert_like_prost(&body), Err(()), "{extra:?}");
        }
        // Repeated span ids: the last one counts (found by the scanner_vs_prost target).
        let body = one_event_request(
            &[name.clone(), id.clone()],
            &[
                bytes_field(SPAN_SPAN_ID, &[1; 3]),
                bytes_field(SPAN_SPAN_ID, &[1; 8]),
            ]
            .concat(),
        );
        assert_eq!(assert_like_prost(&body), Ok(1));
        // Item 9 (b): a body ending `02 01 00` (field 0) was answered 200.
        let mut body = one_event_request(&[name.clone(), id.clone()], &[]);
        body.extend_from_slice(b"\x02\x01\x00");
        assert_eq!(assert_like_prost(&body), Err(()));
        // Attribute values nested past prost's recursion limit.
        let mut any = bytes_field(ANY_STRING, b"deep");
        for _ in 0..60 {
            any = bytes_field(5, &bytes_field(1, &any));
        }
        assert_eq!(assert_like_prost(&tier_request(&any)), Err(()));
    }

    /// Around prost's recursion limit: the verdicts match at every depth.
    #[test]
    fn nesting_depth_is_judged_as_prost_judges_it() {
        let mut verdicts = Vec::new();
        for levels in 40..52 {
            let mut any = message(&[bytes_field(ANY_STRING, b"deep"), varint_field(9, 1)]);
            for _ in 0..levels {
                any = bytes_field(5, &message(&[bytes_field(1, &any), varint_field(9, 1)]));
            }
            // Read (a dimension), so judged as prost judges it.
            verdicts.push(assert_like_prost(&tier_request(&any)).is_ok());
        }
        // Both sides of the limit were tried.
        assert!(
            verdicts.contains(&true) && verdicts.contains(&false),
            "{verdicts:?}"
        );
    }

    /// Every one-byte change of the test requests that prost still reads must give the
    /// same events (the scan may refuse more: it checks id lengths, prost does not; of
    /// ~14,000 such changes, 13 are refused that way and none otherwise).
    #[test]
    fn mutations_prost_accepts_extract_like_prost() {
        let x = Extractor::new(crate::settings::extractor(&odd_config()));
        let compared: usize = [odd_request(), varied_request().encode_to_vec()]
            .iter()
            .map(|good| flips_read_like_prost(good, &x, &[0x01, 0x02, 0x08, 0x80, 0xff]))
            .sum();
        assert!(compared > 1000, "{compared}");
    }

    /// `good` with each byte flipped by each of `changes` in turn: every request prost
    /// reads, the scan reads to the same events, or refuses for an id of the wrong length
    /// (which prost does not check). How many requests were compared.
    fn flips_read_like_prost(good: &[u8], x: &Extractor, changes: &[u8]) -> usize {
        let show = |v: &[Result<FlowEvent, Rejection>]| format!("{v:?}");
        let mut compared = 0;
        for at in 0..good.len() {
            for change in changes {
                let mut bytes = good.to_vec();
                bytes[at] ^= change;
                let Ok(req) = ExportTraceServiceRequest::decode(&bytes[..]) else {
                    continue;
                };
                let scan = match scan_traces(&bytes, x, 1) {
                    Ok(scan) => scan,
                    Err(ScanError::IdLength(_)) => continue,
                    Err(e) => panic!("byte {at} ^ {change:#x}: {e}"),
                };
                assert_eq!(
                    show(&scan.events),
                    show(&full_decode(&req, x)),
                    "byte {at} ^ {change:#x}"
                );
                compared += 1;
            }
        }
        compared
    }

    /// Spans as SDKs send them: `flags` (field 16, a two-byte key) and lengths of two
    /// bytes, both read inline. Also fields 32 and 48, whose keys start with the same byte
    /// as `flags`; and with bytes flipped, what prost reads the scan reads the same (ids
    /// of the wrong length aside).
    #[test]
    fn flags_and_two_byte_span_lengths_read_like_prost() {
        let event = message(&[
            fixed64_field(EVENT_TIME, 7),
            bytes_field(EVENT_NAME, b"flow.a.start"),
            bytes_field(EVENT_ATTRIBUTES, &plain_kv("correlation-id", "c1")),
        ]);
        let span = |extra: Vec<u8>, name_len: usize| {
            message(&[
                bytes_field(SPAN_TRACE_ID, &[1; 16]),
                bytes_field(SPAN_SPAN_ID, &[2; 8]),
                bytes_field(5, &vec![b'n'; name_len]),
                bytes_field(SPAN_EVENTS, &event),
                extra,
            ])
        };
        let spans = [
            span(fixed32_field(SPAN_FLAGS, 1), 200),
            span(fixed32_field(SPAN_FLAGS, 1), 10),
            span(fixed32_field(32, 1), 300),
            span(fixed32_field(48, 1), 150),
        ];
        assert!(spans[0].len() >= 0x80 && spans[1].len() < 0x80);
        let good = request_of(&spans);
        assert_eq!(assert_like_prost(&good), Ok(4));
        // `flags` with another wire type is refused, as prost refuses it.
        let bad = request_of(&[span(varint_field(SPAN_FLAGS, 1), 200)]);
        assert_eq!(assert_like_prost(&bad), Err(()));
        // The first byte of `flags` with a second byte that makes field number 0.
        let zero = request_of(&[span(vec![0x85, 0, 1, 0, 0, 0], 200)]);
        assert_eq!(assert_like_prost(&zero), Err(()));
        // Flipped bytes: what prost reads, the scan reads the same. (The scan may accept
        // more: fields it never reads, such as links, are only skipped.)
        let x = Extractor::new(crate::settings::extractor(&config()));
        let compared = flips_read_like_prost(&good, &x, &[0x01, 0x04, 0x40, 0x80, 0xff]);
        assert!(compared > 500, "{compared}");
    }
}
