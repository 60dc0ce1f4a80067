//! The ingest families (docs/behaviour.md §4): flow events accepted, refused and
//! ignored as duplicates, and the OTLP requests, spans and log records received. Their
//! fixed series exist from the start (at 0), so rates and alerts work before the first
//! event; the handles kept here skip the family lookup per event.

use prometheus_client::encoding::EncodeLabelSet;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::registry::Registry;

use crate::flows::event::Source;
use crate::flows::EventKind;
use crate::model::{Rejection, Signal, Transport};

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct KindSourceLabels {
    kind: &'static str,
    source: &'static str,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct KindLabel {
    kind: &'static str,
}

/// `reason`: [`Rejection::REASONS`] and `invalid_network_flow`.
#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct ReasonLabel {
    reason: &'static str,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct RequestLabels {
    transport: &'static str,
    signal: &'static str,
    /// HTTP status or gRPC code name.
    code: &'static str,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct TransportLabel {
    transport: &'static str,
}

pub(super) struct EventMetrics {
    /// flow_events_total by [source][kind].
    accepted: [[Counter; 3]; 2],
    rejected: Family<ReasonLabel, Counter>,
    /// flow_events_duplicate_total by kind.
    duplicates: [Counter; 3],
    requests: Family<RequestLabels, Counter>,
    spans: Family<TransportLabel, Counter>,
    log_records: Family<TransportLabel, Counter>,
}

impl EventMetrics {
    pub(super) fn register(registry: &mut Registry) -> Self {
        let events = Family::<KindSourceLabels, Counter>::default();
        registry.register(
            "flowmetrics_flow_events",
            "Flow events accepted, by kind (start, end) and source (span_event, log)",
            events.clone(),
        );
        let rejected = Family::default();
        registry.register(
            "flowmetrics_flow_events_rejected",
            "Flow events refused, by reason",
            rejected.clone(),
        );
        let duplicate = Family::<KindLabel, Counter>::default();
        registry.register(
            "flowmetrics_flow_events_duplicate",
            "Flow events ignored as duplicates (a second start or end of an instance, or \
             a retried export within limits.dedup_window)",
            duplicate.clone(),
        );
        let requests = Family::default();
        registry.register(
            "flowmetrics_otlp_requests",
            "OTLP export requests, by transport, signal and response code (HTTP status or \
             gRPC code name)",
            requests.clone(),
        );
        let spans = Family::default();
        registry.register(
            "flowmetrics_otlp_spans",
            "Spans received in OTLP trace exports",
            spans.clone(),
        );
        let log_records = Family::default();
        registry.register(
            "flowmetrics_otlp_log_records",
            "Log records received in OTLP log exports",
            log_records.clone(),
        );
        let accepted = [Source::SpanEvent, Source::Log].map(|source| {
            EventKind::LABELS.map(|kind| {
                let source = source.label();
                events
                    .get_or_create(&KindSourceLabels { kind, source })
                    .clone()
            })
        });
        let duplicates =
            EventKind::LABELS.map(|kind| duplicate.get_or_create(&KindLabel { kind }).clone());
        let this = Self {
            accepted,
            rejected,
            duplicates,
            requests,
            spans,
            log_records,
        };
        for reason in Rejection::REASONS {
            let _ = this.rejected(reason);
        }
        this
    }

    /// The `flowmetrics_flow_events_rejected_total` series for `reason`.
    pub(super) fn rejected(&self, reason: &'static str) -> Counter {
        self.rejected.get_or_create(&ReasonLabel { reason }).clone()
    }

    pub(super) fn accepted(&self, kind: EventKind, source: Source) {
        self.accepted[source as usize][kind.index()].inc();
    }

    pub(super) fn duplicate(&self, kind: EventKind) {
        self.duplicates[kind.index()].inc();
    }

    pub(super) fn refused(&self, rejection: &Rejection) {
        let reason = rejection.reason();
        self.rejected.get_or_create(&ReasonLabel { reason }).inc();
    }

    pub(super) fn request(&self, transport: Transport, signal: Signal, code: &'static str) {
        let labels = RequestLabels {
            transport: transport.label(),
            signal: signal.label(),
            code,
        };
        self.requests.get_or_create(&labels).inc();
    }

    pub(super) fn spans(&self, transport: Transport, n: u64) {
        let transport = transport.label();
        self.spans
            .get_or_create(&TransportLabel { transport })
            .inc_by(n);
    }

    pub(super) fn log_records(&self, transport: Transport, n: u64) {
        let transport = transport.label();
        self.log_records
            .get_or_create(&TransportLabel { transport })
            .inc_by(n);
    }
}
