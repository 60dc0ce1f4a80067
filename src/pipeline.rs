//! The one way in for every transport: walk an OTLP request, extract flow events, hand
//! them to the correlation store, count what happened.

use std::sync::Arc;
use std::time::{SystemTime, UNIX_EPOCH};

use opentelemetry_proto::tonic::collector::logs::v1::ExportLogsServiceRequest;
use opentelemetry_proto::tonic::collector::trace::v1::ExportTraceServiceRequest;

use crate::flows::decoded::{log_events, trace_events};
use crate::flows::extract::TraceEvents;
use crate::flows::network::NetworkFlows;
use crate::flows::scan::{scan_traces_with_network, ScanError};
use crate::flows::store::StoreError;
use crate::flows::{CorrelationStore, Extractor, FlowEvent};
use crate::metrics::Metrics;
use crate::model::{Rejection, RejectionSummary, Transport};

/// The stages after the transports: extraction, correlation, metrics. Both transports call it.
pub struct Pipeline {
    extractor: Extractor,
    store: Arc<dyn CorrelationStore>,
    metrics: Arc<Metrics>,
    network: Option<NetworkFlows>,
}

/// Why an export changed nothing.
#[derive(Debug, thiserror::Error)]
pub enum PipelineError {
    /// The protobuf body is malformed: refused whole, before any event was applied.
    #[error("protobuf body: {0}")]
    Malformed(#[from] ScanError),
    /// The correlation store could not take the events.
    #[error(transparent)]
    Store(#[from] StoreError),
}

impl Pipeline {
    /// Joins the extractor, the store and the metrics; network flows are off until [`Pipeline::with_network_flows`].
    pub fn new(
        extractor: Extractor,
        store: Arc<dyn CorrelationStore>,
        metrics: Arc<Metrics>,
    ) -> Self {
        Self {
            extractor,
            store,
            metrics,
            network: None,
        }
    }

    /// Counts Flow Spans too (docs/behaviour.md §8); `None`: they are not looked for.
    pub fn with_network_flows(mut self, network: Option<NetworkFlows>) -> Self {
        self.network = network;
        self
    }

    /// The metrics the pipeline records into.
    pub fn metrics(&self) -> &Metrics {
        &self.metrics
    }

    /// The correlation store the pipeline applies events to.
    pub fn store(&self) -> &dyn CorrelationStore {
        &*self.store
    }

    /// A protobuf `ExportTraceServiceRequest`, decoded selectively (see
    /// [`crate::flows::scan`]). A malformed body changes nothing.
    pub fn traces_protobuf(
        &self,
        body: &[u8],
        transport: Transport,
    ) -> Result<RejectionSummary, PipelineError> {
        let found =
            scan_traces_with_network(body, &self.extractor, self.network.as_ref(), now_nanos())?;
        Ok(self.traces_found(found, transport)?)
    }

    /// Span events named `flow.<flow>.start|end|step`, from a decoded request (OTLP/JSON).
    pub fn traces(
        &self,
        request: &ExportTraceServiceRequest,
        transport: Transport,
    ) -> Result<RejectionSummary, StoreError> {
        let found = trace_events(request, &self.extractor, self.network.as_ref(), now_nanos());
        self.traces_found(found, transport)
    }

    /// Log records whose `event_name` (or `event.name` attribute) is a flow event name.
    pub fn logs(
        &self,
        request: &ExportLogsServiceRequest,
        transport: Transport,
    ) -> Result<RejectionSummary, StoreError> {
        let found = log_events(request, &self.extractor, now_nanos());
        self.metrics.log_records_received(transport, found.records);
        self.apply(found.events)
    }

    fn traces_found(
        &self,
        found: TraceEvents,
        transport: Transport,
    ) -> Result<RejectionSummary, StoreError> {
        if let Some(network) = &self.network {
            for record in &found.network {
                network.apply(record, &*self.metrics);
            }
        }
        self.metrics.spans_received(transport, found.spans);
        self.apply(found.events)
    }

    /// Counts every verdict, applies the flow events together (one round trip for a
    /// shared store) and hands back what was refused.
    fn apply(
        &self,
        verdicts: Vec<Result<FlowEvent, Rejection>>,
    ) -> Result<RejectionSummary, StoreError> {
        let mut events = Vec::with_capacity(verdicts.len());
        let mut rejected = RejectionSummary::default();
        for verdict in verdicts {
            match verdict {
                Ok(event) => {
                    self.metrics.event_accepted(event.kind, event.source);
                    events.push(event);
                }
                Err(rejection) => {
                    self.metrics.event_rejected(&rejection);
                    tracing::debug!(
                        reason = rejection.reason(),
                        "flow event rejected: {rejection}"
                    );
                    rejected.add(rejection);
                }
            }
        }
        if !events.is_empty() {
            let apply = || self.store.apply_batch(&mut events.into_iter());
            // A store that waits on the network must not hold an async worker: the
            // runtime moves that worker's other tasks elsewhere meanwhile.
            let on_workers = tokio::runtime::Handle::try_current()
                .is_ok_and(|h| h.runtime_flavor() == tokio::runtime::RuntimeFlavor::MultiThread);
            if self.store.blocks() && on_workers {
                tokio::task::block_in_place(apply)?;
            } else {
                apply()?;
            }
        }
        Ok(rejected)
    }
}

fn now_nanos() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| u64::try_from(d.as_nanos()).unwrap_or(u64::MAX))
        .unwrap_or(0)
}
