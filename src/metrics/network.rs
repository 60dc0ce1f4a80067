//! The `flowmetrics_network_*` families (docs/behaviour.md §4, §8): prometheus-client `Family`s of
//! counters, registered in the registry and written by its encoder, behind a wrapper
//! that enforces `limits.max_series_per_metric` with one `otel_metric_overflow="true"`
//! series (as the flow families do).

use std::hash::{Hash, Hasher};
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};

use prometheus_client::encoding::{EncodeLabel, EncodeLabelSet, LabelSetEncoder};
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::registry::Registry;

use super::family::OverflowReporter;
use super::Metrics;
use crate::flows::event::DimValues;
use crate::flows::network::{NetworkFlowRecord, NetworkSink};
use crate::model::OVERFLOW_LABEL;

type Pair = [(&'static str, &'static str); 1];

const DIRECTIONS: [&str; 2] = ["forward", "reverse"];

/// One series' labels: `direction` (bytes, packets), then the configured dimensions;
/// `values: None` is the overflow series.
#[derive(Clone, Debug)]
pub struct NetworkLabels {
    names: Arc<[Box<str>]>,
    direction: Option<&'static str>,
    values: Option<DimValues>,
    /// A digest of `direction` and `values`, made once per record: `Family` hashes its
    /// keys with SipHash, and five lookups per record over every label string cost a
    /// third of a Flow Span's time; hashed as one word, they cost almost nothing.
    digest: u64,
}

impl NetworkLabels {
    /// `values_digest`: [`values_digest`] of `values`, shared by a record's series.
    fn new(
        names: &Arc<[Box<str>]>,
        direction: Option<&'static str>,
        values: Option<DimValues>,
        values_digest: u64,
    ) -> Self {
        let tag = match direction {
            None => 0,
            Some("forward") => 1,
            Some(_) => 2,
        };
        let digest = values_digest.rotate_left(2) ^ tag;
        Self {
            names: names.clone(),
            direction,
            values,
            digest,
        }
    }
}

/// Fixed, so that equal label sets always have equal digests.
const LABELS_DIGEST: foldhash::fast::FixedState = foldhash::fast::FixedState::with_seed(0x6e77);

fn values_digest(values: Option<&[Arc<str>]>) -> u64 {
    std::hash::BuildHasher::hash_one(&LABELS_DIGEST, values)
}

// By value: the names are the same for every series of a family.
impl PartialEq for NetworkLabels {
    fn eq(&self, other: &Self) -> bool {
        self.digest == other.digest
            && self.direction == other.direction
            && self.values == other.values
    }
}

impl Eq for NetworkLabels {}

impl Hash for NetworkLabels {
    fn hash<H: Hasher>(&self, state: &mut H) {
        state.write_u64(self.digest);
    }
}

impl EncodeLabelSet for NetworkLabels {
    fn encode(&self, encoder: &mut LabelSetEncoder) -> Result<(), std::fmt::Error> {
        let Some(values) = &self.values else {
            return (OVERFLOW_LABEL, "true").encode(encoder.encode_label());
        };
        if let Some(direction) = self.direction {
            ("direction", direction).encode(encoder.encode_label())?;
        }
        for (name, value) in self.names.iter().zip(values.iter()) {
            (&**name, &**value).encode(encoder.encode_label())?;
        }
        Ok(())
    }
}

/// A counter family with a series limit.
#[derive(Clone)]
struct LimitedCounters {
    /// The sample name: the `metric` label of `flowmetrics_series_overflow_total`.
    name: &'static str,
    family: Family<NetworkLabels, Counter>,
    max: usize,
    /// Series are created one at a time, so the limit holds under concurrency.
    create: Arc<Mutex<()>>,
    /// Regular series created (`Family` does not count them; it never drops one).
    series: Arc<AtomicUsize>,
    overflowed: Arc<AtomicBool>,
    /// Counts folds in `flowmetrics_series_overflow_total` and warns, as for the flow
    /// families.
    overflow: Arc<OverflowReporter>,
    overflow_labels: NetworkLabels,
}

impl LimitedCounters {
    fn new(
        name: &'static str,
        help: &str,
        max: usize,
        names: &Arc<[Box<str>]>,
        registry: &mut Registry,
        overflow: &Arc<OverflowReporter>,
    ) -> Self {
        let family = Family::default();
        let base = name.strip_suffix("_total").unwrap_or(name);
        registry.register(base, help, family.clone());
        Self {
            name,
            family,
            max,
            create: Arc::default(),
            series: Arc::default(),
            overflowed: Arc::default(),
            overflow: overflow.clone(),
            overflow_labels: NetworkLabels::new(names, None, None, values_digest(None)),
        }
    }

    fn inc_by(&self, labels: &NetworkLabels, n: u64) {
        if let Some(c) = self.family.get(labels) {
            c.inc_by(n);
            return;
        }
        let _one_at_a_time = self.create.lock().unwrap_or_else(|e| e.into_inner());
        if let Some(c) = self.family.get(labels) {
            c.inc_by(n);
            return;
        }
        if self.series.load(Ordering::Relaxed) < self.max {
            self.series.fetch_add(1, Ordering::Relaxed);
            self.family.get_or_create(labels).inc_by(n);
            return;
        }
        self.overflowed.store(true, Ordering::Relaxed);
        self.family.get_or_create(&self.overflow_labels).inc_by(n);
        self.overflow.folded(self.name, self.max);
    }

    /// Series held now (including the overflow series).
    fn len(&self) -> usize {
        self.series.load(Ordering::Relaxed) + usize::from(self.overflowed.load(Ordering::Relaxed))
    }
}

/// The network families, present when `network_flows.enabled`.
pub struct NetworkMetrics {
    names: Arc<[Box<str>]>,
    records: LimitedCounters,
    bytes: LimitedCounters,
    packets: LimitedCounters,
    invalid: Counter,
}

impl NetworkMetrics {
    /// `labels`: the network dimensions' label names; `None` when network flows are off.
    pub fn new(
        labels: Option<&[String]>,
        max: usize,
        registry: &mut Registry,
        overflow: &Arc<OverflowReporter>,
        rejected: &Family<Pair, Counter>,
    ) -> Option<Self> {
        let names: Arc<[Box<str>]> = labels?.iter().map(|l| Box::from(l.as_str())).collect();
        let mut family =
            |name, help| LimitedCounters::new(name, help, max, &names, registry, overflow);
        let records = family(
            "flowmetrics_network_flow_records_total",
            "Network flow records (Flow Spans) counted, retries excluded",
        );
        let bytes = family(
            "flowmetrics_network_bytes_total",
            "Bytes of network flow records, by direction: forward (flow.bytes.delta, \
             source to destination) and reverse (flow.reverse.bytes.delta)",
        );
        let packets = family(
            "flowmetrics_network_packets_total",
            "Packets of network flow records, by direction: forward (flow.packets.delta) \
             and reverse (flow.reverse.packets.delta)",
        );
        let invalid = rejected
            .get_or_create(&[("reason", "invalid_network_flow")])
            .clone();
        Some(Self {
            names,
            records,
            bytes,
            packets,
            invalid,
        })
    }

    pub fn record(&self, record: &NetworkFlowRecord) {
        let digest = values_digest(Some(&record.dims));
        let labels = |direction| {
            NetworkLabels::new(&self.names, direction, Some(record.dims.clone()), digest)
        };
        self.records.inc_by(&labels(None), 1);
        for (i, direction) in DIRECTIONS.into_iter().enumerate() {
            let labels = labels(Some(direction));
            self.bytes.inc_by(&labels, record.bytes[i]);
            self.packets.inc_by(&labels, record.packets[i]);
        }
    }

    /// Series per network family (for tests).
    pub fn series_counts(&self) -> [(&'static str, usize); 3] {
        [
            (self.records.name, self.records.len()),
            (self.bytes.name, self.bytes.len()),
            (self.packets.name, self.packets.len()),
        ]
    }
}

impl NetworkSink for Metrics {
    fn network_record(&self, record: &NetworkFlowRecord) {
        if let Some(network) = self.network() {
            network.record(record);
        }
    }

    fn network_invalid(&self) {
        if let Some(network) = self.network() {
            network.invalid.inc();
        }
    }
}
