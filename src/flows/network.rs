//! Network Flow Spans (docs/behaviour.md §8): a span of the Flow Span convention is one network flow
//! record. Recognised by its `flow.*` attributes; read into a [`NetworkFlowRecord`]
//! (label values, forward/reverse bytes and packets); retries recognised by a compact
//! fingerprint of the span's identity. Knows nothing of Prometheus: what happened goes
//! to a [`NetworkSink`].

use std::collections::VecDeque;
use std::hash::{Hash, Hasher};
use std::sync::{Arc, Mutex, PoisonError};
use std::time::{Duration, Instant};

use hashbrown::HashSet;
use opentelemetry_proto::tonic::common::v1::KeyValue;
use opentelemetry_proto::tonic::trace::v1::Span;

use super::attributes::{AttrValue, Attributes, Found, Keys};
use super::event::DimValues;
use super::intern::Interner;
use super::label_value::{CutSlot, LabelBound};

/// Attribute of a Flow Span: bytes sent source → destination in its window.
pub const BYTES: &str = "flow.bytes.delta";
/// Attribute of a Flow Span: bytes sent destination → source in its window.
pub const REVERSE_BYTES: &str = "flow.reverse.bytes.delta";
/// Attribute of a Flow Span: packets sent source → destination in its window.
pub const PACKETS: &str = "flow.packets.delta";
/// Attribute of a Flow Span: packets sent destination → source in its window.
pub const REVERSE_PACKETS: &str = "flow.reverse.packets.delta";
/// Attribute of a Flow Span: the Community ID of its connection.
pub const COMMUNITY_ID: &str = "flow.community_id";

/// Does an attribute with this key make its span a Flow Span? Checked for every span
/// attribute by the selective scanner, so the length decides first.
#[inline(always)]
pub fn is_flow_span_key(key: &[u8]) -> bool {
    match key.len() {
        16 => key == BYTES.as_bytes(),
        17 => key == COMMUNITY_ID.as_bytes(),
        18 => key == PACKETS.as_bytes(),
        24 => key == REVERSE_BYTES.as_bytes(),
        26 => key == REVERSE_PACKETS.as_bytes(),
        _ => false,
    }
}

/// What identifies one record across retries: its span and observation window.
#[derive(Debug, Clone, Copy, Default)]
pub struct SpanIdentity<'a> {
    /// The span's trace id.
    pub trace_id: &'a [u8],
    /// The span's span id.
    pub span_id: &'a [u8],
    /// Start of the observation window, unix nanoseconds.
    pub start_nanos: u64,
    /// End of the observation window, unix nanoseconds.
    pub end_nanos: u64,
}

impl SpanIdentity<'_> {
    /// `None` without ids: nothing tells a retry from a new record then.
    fn fingerprint(&self) -> Option<u64> {
        let zero = |b: &[u8]| b.iter().all(|&x| x == 0);
        if zero(self.trace_id) && zero(self.span_id) {
            return None;
        }
        // SipHash with fixed keys: stable, and good enough that distinct records
        // practically never collide.
        let mut h = std::hash::DefaultHasher::new();
        self.trace_id.hash(&mut h);
        self.span_id.hash(&mut h);
        self.start_nanos.hash(&mut h);
        self.end_nanos.hash(&mut h);
        Some(h.finish())
    }
}

/// One Flow Span, read.
#[derive(Debug, Clone)]
pub struct NetworkFlowRecord {
    /// Values of `network_flows.dimensions`, in config order.
    pub dims: DimValues,
    /// Forward (source → destination), reverse.
    pub bytes: [u64; 2],
    /// Forward (source → destination), reverse.
    pub packets: [u64; 2],
    /// At least one delta was a non-negative integer.
    pub usable: bool,
    fingerprint: Option<u64>,
}

/// Where records go once they are known not to be retries.
pub trait NetworkSink {
    /// Counts one record into the network families.
    fn network_record(&self, record: &NetworkFlowRecord);
    /// A Flow Span with no usable delta (`invalid_network_flow`).
    fn network_invalid(&self);
}

struct Rule {
    /// Slots in `NetworkFlows::keys`, in the order they are tried.
    slots: Vec<usize>,
    default: Arc<str>,
    /// Where cuts of this label's values are counted.
    cut: CutSlot,
}

/// What [`NetworkFlows`] is told (built from `network_flows` and `limits` by the app).
#[derive(Debug, Clone)]
pub struct NetworkFlowsSettings {
    /// `network_flows.dimensions`, in label order.
    pub dimensions: Vec<NetworkDimensionLookup>,
    /// Distinct values and value lists remembered for sharing (the series limit).
    pub intern_capacity: usize,
    /// Retry fingerprints remembered at most.
    pub dedup_capacity: usize,
    /// How long a record's fingerprint is remembered (`limits.dedup_window`).
    pub dedup_window: std::time::Duration,
    /// `limits.max_label_value_bytes`, and where cuts are counted.
    pub label_values: LabelBound,
}

/// One network dimension: its label, the attributes tried in order, and the value when
/// none is set.
#[derive(Debug, Clone)]
pub struct NetworkDimensionLookup {
    /// The label's name.
    pub label: String,
    /// Attributes tried in order, on the span, then its resource.
    pub attributes: Vec<String>,
    /// The value when none of them is set.
    pub default: String,
}

/// Everything needed to read Flow Spans, built once from its settings.
pub struct NetworkFlows {
    keys: Keys,
    /// bytes, reverse bytes, packets, reverse packets.
    delta_slots: [usize; 4],
    rules: Vec<Rule>,
    values: Interner,
    dim_lists: Interner<[Arc<str>]>,
    seen: Fingerprints,
    label_values: LabelBound,
}

impl NetworkFlows {
    /// `None` when network flows are off (`network_flows.enabled: false`).
    pub fn new(settings: Option<NetworkFlowsSettings>) -> Option<Self> {
        let settings = settings?;
        let mut keys = Keys::default();
        let delta_slots = [BYTES, REVERSE_BYTES, PACKETS, REVERSE_PACKETS].map(|k| keys.add(k));
        let rules = settings
            .dimensions
            .iter()
            .map(|d| Rule {
                slots: d.attributes.iter().map(|a| keys.add(a)).collect(),
                default: Arc::from(d.default.as_str()),
                cut: settings.label_values.slot(&d.label),
            })
            .collect();
        let max = settings.intern_capacity;
        Some(Self {
            keys,
            delta_slots,
            rules,
            values: Interner::new(max.saturating_mul(2)),
            dim_lists: Interner::new(max),
            seen: Fingerprints::new(settings.dedup_capacity, settings.dedup_window),
            label_values: settings.label_values,
        })
    }

    /// Reads a Flow Span: deltas from the span's attributes, label values from the
    /// span's, then the resource's.
    pub fn extract<'a>(
        &self,
        span: impl Attributes<'a>,
        resource: impl Attributes<'a>,
        identity: SpanIdentity<'_>,
    ) -> NetworkFlowRecord {
        let n = self.keys.len();
        // The usual key count fits on the stack: no allocation per Flow Span.
        let mut span_found = Found::<INLINE_KEYS>::with_len(n);
        let on_span = span_found.slots(n);
        span.find_all(&self.keys, on_span);
        let mut resource_found = Found::<INLINE_KEYS>::with_len(n);
        let on_resource = resource_found.slots(n);
        // Read only when a key is not on the span.
        let mut resource_read = false;
        let mut lookup = |slot: usize| {
            on_span[slot].or_else(|| {
                if !resource_read {
                    resource.find_all(&self.keys, on_resource);
                    resource_read = true;
                }
                on_resource[slot]
            })
        };
        let mut usable = false;
        let mut delta = |slot: usize| match lookup(slot) {
            Some(AttrValue::Int(v)) if v >= 0 => {
                usable = true;
                v.unsigned_abs()
            }
            _ => 0,
        };
        let [b, rb, p, rp] = self.delta_slots;
        let bytes = [delta(b), delta(rb)];
        let packets = [delta(p), delta(rp)];
        let dims: DimValues = self
            .rules
            .iter()
            .map(|rule| {
                rule.slots
                    .iter()
                    .find_map(|&slot| lookup(slot).and_then(label_text))
                    .map(|v| self.values.intern(self.label_values.apply(rule.cut, &v)))
                    .unwrap_or_else(|| rule.default.clone())
            })
            .collect();
        NetworkFlowRecord {
            dims: self.dim_lists.share(dims),
            bytes,
            packets,
            usable,
            fingerprint: identity.fingerprint(),
        }
    }

    /// Counts a record unless it is a retry of one already counted.
    pub fn apply(&self, record: &NetworkFlowRecord, sink: &impl NetworkSink) {
        if let Some(fp) = record.fingerprint {
            if !self.seen.first_time(fp) {
                return;
            }
        }
        if record.usable {
            sink.network_record(record);
        } else {
            sink.network_invalid();
        }
    }

    /// A decoded span (OTLP/JSON), read if it is a Flow Span.
    pub fn decoded_span(&self, span: &Span, resource: &[KeyValue]) -> Option<NetworkFlowRecord> {
        if !span
            .attributes
            .iter()
            .any(|kv| is_flow_span_key(kv.key.as_bytes()))
        {
            return None;
        }
        let identity = SpanIdentity {
            trace_id: &span.trace_id,
            span_id: &span.span_id,
            start_nanos: span.start_time_unix_nano,
            end_nanos: span.end_time_unix_nano,
        };
        Some(self.extract(&span.attributes[..], resource, identity))
    }

    /// Retry fingerprints held now.
    pub fn fingerprints(&self) -> usize {
        self.seen.len()
    }
}

/// Wanted keys held on the stack: the four counters and the default dimensions'
/// attributes.
const INLINE_KEYS: usize = 24;

/// Strings, integers and booleans as label values; "" counts as absent.
fn label_text(value: AttrValue<'_>) -> Option<std::borrow::Cow<'_, str>> {
    match value {
        AttrValue::Str(s) if !s.is_empty() => Some(s.into()),
        AttrValue::Int(i) => Some(i.to_string().into()),
        AttrValue::Bool(b) => Some(b.to_string().into()),
        _ => None,
    }
}

/// Fingerprints of counted records, each kept for `window`, at most `capacity` (the
/// oldest go first). A u64 per record, not a copy of it.
struct Fingerprints {
    inner: Mutex<FingerprintsInner>,
    capacity: usize,
    window: Duration,
    epoch: Instant,
}

#[derive(Default)]
struct FingerprintsInner {
    set: HashSet<u64>,
    /// Insertion order: (fingerprint, milliseconds since `epoch`).
    order: VecDeque<(u64, u64)>,
}

impl Fingerprints {
    fn new(capacity: usize, window: Duration) -> Self {
        Self {
            inner: Mutex::default(),
            capacity: capacity.max(1),
            window,
            epoch: Instant::now(),
        }
    }

    fn now_ms(&self) -> u64 {
        u64::try_from(self.epoch.elapsed().as_millis()).unwrap_or(u64::MAX)
    }

    /// True the first time `fp` is seen within the window (and remembers it).
    fn first_time(&self, fp: u64) -> bool {
        let now = self.now_ms();
        let window = u64::try_from(self.window.as_millis()).unwrap_or(u64::MAX);
        // A poisoned lock only means another thread panicked mid-update: the set is
        // still a valid set.
        let mut inner = self.inner.lock().unwrap_or_else(PoisonError::into_inner);
        let FingerprintsInner { set, order } = &mut *inner;
        while let Some(&(old, at)) = order.front() {
            if at.saturating_add(window) > now {
                break;
            }
            order.pop_front();
            set.remove(&old);
        }
        if set.contains(&fp) {
            return false;
        }
        if set.len() >= self.capacity {
            if let Some((old, _)) = order.pop_front() {
                set.remove(&old);
            }
        }
        set.insert(fp);
        order.push_back((fp, now));
        true
    }

    fn len(&self) -> usize {
        self.inner
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .set
            .len()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::config::Config;
    use crate::flows::attributes::NO_ATTRIBUTES;
    use crate::flows::test_attrs::{int_kv as int, kv, str_kv as s};
    use opentelemetry_proto::tonic::common::v1::any_value;

    #[derive(Default)]
    struct Sink {
        records: Mutex<Vec<NetworkFlowRecord>>,
        invalid: std::sync::atomic::AtomicUsize,
    }

    impl NetworkSink for Sink {
        fn network_record(&self, record: &NetworkFlowRecord) {
            self.records.lock().unwrap().push(record.clone());
        }
        fn network_invalid(&self) {
            self.invalid
                .fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        }
    }

    const ID: SpanIdentity<'static> = SpanIdentity {
        trace_id: &[1; 16],
        span_id: &[2; 8],
        start_nanos: 10,
        end_nanos: 20,
    };

    #[test]
    fn marker_keys_are_recognised_by_length_then_bytes() {
        for k in [BYTES, REVERSE_BYTES, PACKETS, REVERSE_PACKETS, COMMUNITY_ID] {
            assert!(is_flow_span_key(k.as_bytes()), "{k}");
        }
        for k in ["http.status_code", "flow.direction", "flow.bytes", ""] {
            assert!(!is_flow_span_key(k.as_bytes()), "{k}");
        }
    }

    #[test]
    fn defaults_read_transport_and_k8s_workloads_never_addresses() {
        let net = NetworkFlows::new(crate::settings::network_flows(&Config::default())).unwrap();
        let span = [
            int(BYTES, 1024),
            int(REVERSE_BYTES, 32768),
            int(PACKETS, 3),
            s("network.transport", "tcp"),
            s("source.address", "10.1.1.5"),
            s("source.k8s.statefulset.name", "db"),
            s("destination.k8s.deployment.name", "api"),
        ];
        let resource = [s("destination.k8s.namespace.name", "prod")];
        let r = net.extract(&span[..], &resource[..], ID);
        assert_eq!(r.bytes, [1024, 32768]);
        assert_eq!(r.packets, [3, 0]);
        assert!(r.usable);
        let dims: Vec<&str> = r.dims.iter().map(|d| &**d).collect();
        assert_eq!(dims, ["tcp", "db", "unknown", "api", "prod"]);
        assert_eq!(
            crate::settings::network_labels(&Config::default()),
            [
                "transport",
                "source_workload",
                "source_namespace",
                "destination_workload",
                "destination_namespace"
            ]
        );
    }

    #[test]
    fn non_integer_and_negative_deltas_count_as_zero() {
        let net = NetworkFlows::new(crate::settings::network_flows(&Config::default())).unwrap();
        let span = [
            s(BYTES, "1024"),
            kv(REVERSE_BYTES, any_value::Value::DoubleValue(1.5)),
            int(PACKETS, -1),
            s(COMMUNITY_ID, "1:abc"),
        ];
        let r = net.extract(&span[..], NO_ATTRIBUTES, ID);
        assert_eq!((r.bytes, r.packets, r.usable), ([0, 0], [0, 0], false));
        let sink = Sink::default();
        net.apply(&r, &sink);
        assert_eq!(sink.invalid.load(std::sync::atomic::Ordering::Relaxed), 1);
        assert!(sink.records.lock().unwrap().is_empty());
    }

    #[test]
    fn retries_count_once_and_a_new_window_counts_again() {
        let net = NetworkFlows::new(crate::settings::network_flows(&Config::default())).unwrap();
        let sink = Sink::default();
        let span = [int(BYTES, 1)];
        for _ in 0..3 {
            net.apply(&net.extract(&span[..], NO_ATTRIBUTES, ID), &sink);
        }
        let next = SpanIdentity {
            start_nanos: 20,
            end_nanos: 30,
            ..ID
        };
        net.apply(&net.extract(&span[..], NO_ATTRIBUTES, next), &sink);
        // Without ids nothing identifies a retry: each one counts.
        for _ in 0..2 {
            let r = net.extract(&span[..], NO_ATTRIBUTES, SpanIdentity::default());
            net.apply(&r, &sink);
        }
        assert_eq!(sink.records.lock().unwrap().len(), 4);
        assert_eq!(net.fingerprints(), 2);
    }

    #[test]
    fn fingerprints_are_bounded_and_expire() {
        let f = Fingerprints::new(3, Duration::from_secs(300));
        for fp in 0..10 {
            assert!(f.first_time(fp));
        }
        assert_eq!(f.len(), 3);
        assert!(!f.first_time(9));
        assert!(f.first_time(0), "evicted for room");
        let f = Fingerprints::new(100, Duration::ZERO);
        assert!(f.first_time(1));
        assert!(f.first_time(1), "expired at once");
        assert_eq!(f.len(), 1);
    }

    #[test]
    fn disabled_builds_nothing() {
        let mut c = Config::default();
        c.network_flows.enabled = false;
        assert!(NetworkFlows::new(crate::settings::network_flows(&c)).is_none());
    }
}
