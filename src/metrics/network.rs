//! The `flowmetrics_network_*` families (docs/behaviour.md §4, §8): counters per
//! network label set in [`LimitedFamily`]s, the same series-limited family the flow
//! families use (`limits.max_series_per_metric`, one `otel_metric_overflow="true"`
//! series), written by prometheus-client's encoder.

use std::sync::Arc;

use hashbrown::DefaultHashBuilder;
use prometheus_client::encoding::{EncodeLabel, EncodeLabelSet, EncodeLabelValue, LabelSetEncoder};
use prometheus_client::metrics::counter::Counter;

use super::events::EventMetrics;
use super::family::{LimitedFamily, SeriesKey, SeriesLabelSet};
use super::{Metrics, Registrar};
use crate::flows::event::DimValues;
use crate::flows::network::{NetworkFlowRecord, NetworkSink};

/// `direction` of the bytes and packets families. The values are the variants' names
/// as written (prometheus-client's derive).
#[allow(non_camel_case_types)]
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, EncodeLabelValue)]
enum Direction {
    forward,
    reverse,
}

/// One series' labels: `direction` (bytes, packets), then the configured dimensions.
#[derive(Debug)]
pub struct NetworkLabels {
    names: Arc<Vec<Box<str>>>,
    direction: Option<Direction>,
    values: DimValues,
}

impl SeriesLabelSet for NetworkLabels {
    /// The network dimensions' label names.
    type Layout = Vec<Box<str>>;
}

impl EncodeLabelSet for NetworkLabels {
    fn encode(&self, encoder: &mut LabelSetEncoder) -> Result<(), std::fmt::Error> {
        if let Some(direction) = self.direction {
            ("direction", direction).encode(encoder.encode_label())?;
        }
        for (name, value) in self.names.iter().zip(self.values.iter()) {
            (&**name, &**value).encode(encoder.encode_label())?;
        }
        Ok(())
    }
}

/// A record's label values, borrowed, with a digest of them made once per record: five
/// lookups per record over every label string would cost a third of a Flow Span's time;
/// hashed as one word, they cost almost nothing.
#[derive(Clone, Copy)]
struct NetworkKey<'a> {
    direction: Option<Direction>,
    values: &'a DimValues,
    digest: u64,
}

/// Fixed, so that equal label sets always have equal digests.
const LABELS_DIGEST: foldhash::fast::FixedState = foldhash::fast::FixedState::with_seed(0x6e77);

impl<'a> NetworkKey<'a> {
    /// `values_digest`: the digest of `values`, shared by a record's series.
    fn new(direction: Option<Direction>, values: &'a DimValues, values_digest: u64) -> Self {
        let tag = match direction {
            None => 0,
            Some(Direction::forward) => 1,
            Some(Direction::reverse) => 2,
        };
        Self {
            direction,
            values,
            digest: values_digest.rotate_left(2) ^ tag,
        }
    }
}

impl SeriesKey<NetworkLabels> for NetworkKey<'_> {
    #[inline]
    fn hash_with(&self, hasher: &DefaultHashBuilder) -> u64 {
        std::hash::BuildHasher::hash_one(hasher, self.digest)
    }

    #[inline]
    fn matches(&self, labels: &NetworkLabels) -> bool {
        self.direction == labels.direction
            && (Arc::ptr_eq(self.values, &labels.values) || *self.values == labels.values)
    }

    fn to_labels(self, layout: &Arc<Vec<Box<str>>>) -> NetworkLabels {
        NetworkLabels {
            names: layout.clone(),
            direction: self.direction,
            values: self.values.clone(),
        }
    }

    fn flow(&self) -> Option<&str> {
        None
    }
}

/// The network families, present when `network_flows.enabled`.
pub struct NetworkMetrics {
    records: LimitedFamily<Counter, NetworkLabels>,
    bytes: LimitedFamily<Counter, NetworkLabels>,
    packets: LimitedFamily<Counter, NetworkLabels>,
    /// `flowmetrics_flow_events_rejected_total{reason="invalid_network_flow"}`.
    invalid: Counter,
}

impl NetworkMetrics {
    /// `None` when network flows are off (and no `invalid_network_flow` series either).
    pub(super) fn register(r: &mut Registrar<'_>, events: &EventMetrics) -> Option<Self> {
        let labels = r.settings.network_labels.as_deref()?;
        let names: Vec<Box<str>> = labels.iter().map(|l| Box::from(l.as_str())).collect();
        let mut family = |name_help| -> LimitedFamily<Counter, NetworkLabels> {
            r.family(name_help, names.clone(), |_| Counter::default())
        };
        Some(Self {
            records: family((
                "flowmetrics_network_flow_records_total",
                "Network flow records (Flow Spans) counted, retries excluded",
            )),
            bytes: family((
                "flowmetrics_network_bytes_total",
                "Bytes of network flow records, by direction: forward (flow.bytes.delta, \
                 source to destination) and reverse (flow.reverse.bytes.delta)",
            )),
            packets: family((
                "flowmetrics_network_packets_total",
                "Packets of network flow records, by direction: forward (flow.packets.delta) \
                 and reverse (flow.reverse.packets.delta)",
            )),
            invalid: events.rejected("invalid_network_flow"),
        })
    }

    /// Counts one network flow record into the network families.
    pub fn record(&self, record: &NetworkFlowRecord) {
        let digest = std::hash::BuildHasher::hash_one(&LABELS_DIGEST, &*record.dims);
        self.records
            .with(NetworkKey::new(None, &record.dims, digest), Counter::inc);
        for (i, direction) in [Direction::forward, Direction::reverse]
            .into_iter()
            .enumerate()
        {
            let key = NetworkKey::new(Some(direction), &record.dims, digest);
            self.bytes.with(key, |c| c.inc_by(record.bytes[i]));
            self.packets.with(key, |c| c.inc_by(record.packets[i]));
        }
    }

    /// Series per network family (for tests).
    pub fn series_counts(&self) -> [(&'static str, usize); 3] {
        [&self.records, &self.bytes, &self.packets].map(|f| (f.name(), f.len()))
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
