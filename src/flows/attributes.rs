//! Attribute lookup: the keys the extraction rules want, and the attribute lists
//! (decoded `KeyValue`s, or protobuf bytes read in place) they are looked up in, layer by
//! layer.

use std::cell::OnceCell;

use opentelemetry_proto::tonic::common::v1::{any_value, KeyValue};

/// An attribute value as flowmetrics reads it (borrowed, never copied).
#[derive(Debug, Clone, Copy, PartialEq)]
pub enum AttrValue<'a> {
    /// A string value.
    Str(&'a str),
    /// An integer value.
    Int(i64),
    /// A boolean value.
    Bool(bool),
    /// A double value.
    Double(f64),
    /// Arrays, maps, bytes, or an empty value: never a correlation id or a label.
    Other,
}

/// The attribute keys an [`Extractor`](super::extract::Extractor) reads (correlation keys, outcome key, dimension
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

    /// How many keys are wanted.
    pub fn len(&self) -> usize {
        self.keys.len()
    }

    /// No key is wanted.
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
    /// Wraps `attributes`; nothing is looked up until first use.
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
    /// The event's own attributes.
    pub event: E,
    /// Its span's (or log record's).
    pub parent: P,
    /// The resource's.
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
pub(crate) struct Lookup<'l, 'a, E, P, R> {
    layers: &'l AttributeLayers<E, P, R>,
    keys: &'l Keys,
    /// Per layer (0 event, 1 parent, 2 resource), once read.
    found: [Option<Found<'a>>; 3],
}

impl<'l, 'a, E: Attributes<'a>, P: Attributes<'a>, R: Attributes<'a>> Lookup<'l, 'a, E, P, R> {
    #[inline]
    pub(crate) fn new(layers: &'l AttributeLayers<E, P, R>, keys: &'l Keys) -> Self {
        Self {
            layers,
            keys,
            found: [None, None, None],
        }
    }

    /// Layer `layer`, the value in `slot`.
    #[inline]
    pub(crate) fn in_layer(&mut self, layer: usize, slot: usize) -> Option<AttrValue<'a>> {
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
    pub(crate) fn get(&mut self, slot: usize) -> Option<AttrValue<'a>> {
        (0..3).find_map(|layer| self.in_layer(layer, slot))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

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
}
