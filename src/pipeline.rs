//! The one way in for every transport: walk an OTLP request, extract flow events, hand
//! them to the correlation store, count what happened.

use std::sync::Arc;
use std::time::{SystemTime, UNIX_EPOCH};

use opentelemetry_proto::tonic::collector::logs::v1::ExportLogsServiceRequest;
use opentelemetry_proto::tonic::collector::trace::v1::ExportTraceServiceRequest;
use opentelemetry_proto::tonic::trace::v1::status::StatusCode;

use crate::flows::event::{AttributeLayers, NO_ATTRIBUTES};
use crate::flows::network::NetworkFlows;
use crate::flows::scan::{event_time, scan_traces_with_network};
use crate::flows::store::StoreError;
use crate::flows::{CorrelationStore, Extractor, FlowEvent, Source, TraceRef};
use crate::metrics::Metrics;
use crate::model::{Rejection, RejectionSummary, Transport};

/// OpenTelemetry severity numbers 17–24 are ERROR and FATAL.
const SEVERITY_ERROR: i32 = 17;

pub struct Pipeline {
    extractor: Extractor,
    store: Arc<dyn CorrelationStore>,
    metrics: Arc<Metrics>,
    network: Option<NetworkFlows>,
}

/// The flow events of one request, applied to the store together (one round trip for a
/// shared store), and what was refused.
#[derive(Default)]
struct Batch {
    events: Vec<FlowEvent>,
    rejected: RejectionSummary,
}

impl Pipeline {
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

    pub fn metrics(&self) -> &Metrics {
        &self.metrics
    }

    pub fn store(&self) -> &dyn CorrelationStore {
        &*self.store
    }

    /// Applies the batch's events and hands back what was refused.
    fn finish(&self, batch: Batch) -> Result<RejectionSummary, StoreError> {
        if !batch.events.is_empty() {
            let apply = || self.store.apply_batch(&mut batch.events.into_iter());
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
        Ok(batch.rejected)
    }

    fn accept(&self, result: Result<Option<FlowEvent>, Rejection>, batch: &mut Batch) {
        match result {
            Ok(None) => {}
            Ok(Some(event)) => {
                self.metrics.event_accepted(event.kind, event.source);
                batch.events.push(event);
            }
            Err(rejection) => {
                self.metrics.event_rejected(&rejection);
                tracing::debug!(
                    reason = rejection.reason(),
                    "flow event rejected: {rejection}"
                );
                batch.rejected.add(rejection);
            }
        }
    }

    /// A protobuf `ExportTraceServiceRequest`, decoded selectively (see
    /// [`crate::flows::scan`]). A malformed body changes nothing.
    #[allow(clippy::type_complexity)]
    pub fn traces_protobuf(
        &self,
        body: &[u8],
        transport: Transport,
    ) -> Result<Result<RejectionSummary, StoreError>, String> {
        let scan =
            scan_traces_with_network(body, &self.extractor, self.network.as_ref(), now_nanos())?;
        if let Some(network) = &self.network {
            for record in &scan.network {
                network.apply(record, &*self.metrics);
            }
        }
        self.metrics.spans_received(transport, scan.spans);
        let mut batch = Batch {
            events: Vec::with_capacity(scan.events.len()),
            ..Batch::default()
        };
        for result in scan.events {
            self.accept(result.map(Some), &mut batch);
        }
        Ok(self.finish(batch))
    }

    /// Span events named `flow.<flow>.start|end`, from a decoded request (OTLP/JSON).
    pub fn traces(
        &self,
        request: &ExportTraceServiceRequest,
        transport: Transport,
    ) -> Result<RejectionSummary, StoreError> {
        let received = now_nanos();
        let mut batch = Batch::default();
        let mut spans = 0u64;
        for resource_spans in &request.resource_spans {
            let resource = resource_spans
                .resource
                .as_ref()
                .map(|r| r.attributes.as_slice())
                .unwrap_or_default();
            for scope_spans in &resource_spans.scope_spans {
                spans += scope_spans.spans.len() as u64;
                for span in &scope_spans.spans {
                    if let Some(network) = &self.network {
                        network.decoded_span(span, resource, &*self.metrics);
                    }
                    let mut flow_events = span
                        .events
                        .iter()
                        .filter(|e| self.extractor.may_be_flow_event(&e.name))
                        .peekable();
                    if flow_events.peek().is_none() {
                        continue;
                    }
                    let is_error = span
                        .status
                        .as_ref()
                        .is_some_and(|s| s.code == StatusCode::Error as i32);
                    let trace = TraceRef::from_ids(&span.trace_id, &span.span_id);
                    for event in flow_events {
                        let layers = AttributeLayers {
                            event: &event.attributes[..],
                            parent: &span.attributes[..],
                            resource,
                        };
                        let result = self.extractor.extract(
                            &event.name,
                            layers,
                            event_time(event.time_unix_nano, span.end_time_unix_nano),
                            received,
                            is_error,
                            trace,
                            Source::SpanEvent,
                        );
                        self.accept(result, &mut batch);
                    }
                }
            }
        }
        self.metrics.spans_received(transport, spans);
        self.finish(batch)
    }

    /// Log records whose `event_name` (or `event.name` attribute) is a flow event name.
    pub fn logs(
        &self,
        request: &ExportLogsServiceRequest,
        transport: Transport,
    ) -> Result<RejectionSummary, StoreError> {
        let received = now_nanos();
        let mut batch = Batch::default();
        let mut records = 0u64;
        for resource_logs in &request.resource_logs {
            let resource = resource_logs
                .resource
                .as_ref()
                .map(|r| r.attributes.as_slice())
                .unwrap_or_default();
            for scope_logs in &resource_logs.scope_logs {
                records += scope_logs.log_records.len() as u64;
                for record in &scope_logs.log_records {
                    let name = if record.event_name.is_empty() {
                        match record.attributes.iter().find(|kv| kv.key == "event.name") {
                            Some(kv) => match kv.value.as_ref().and_then(|v| v.value.as_ref()) {
                                Some(opentelemetry_proto::tonic::common::v1::any_value::Value::StringValue(s)) => s.as_str(),
                                _ => continue,
                            },
                            None => continue,
                        }
                    } else {
                        record.event_name.as_str()
                    };
                    if !self.extractor.may_be_flow_event(name) {
                        continue;
                    }
                    let timestamp = if record.time_unix_nano != 0 {
                        record.time_unix_nano
                    } else {
                        record.observed_time_unix_nano
                    };
                    let layers = AttributeLayers {
                        event: &record.attributes[..],
                        parent: NO_ATTRIBUTES,
                        resource,
                    };
                    let result = self.extractor.extract(
                        name,
                        layers,
                        timestamp,
                        received,
                        record.severity_number >= SEVERITY_ERROR,
                        TraceRef::from_ids(&record.trace_id, &record.span_id),
                        Source::Log,
                    );
                    self.accept(result, &mut batch);
                }
            }
        }
        self.metrics.log_records_received(transport, records);
        self.finish(batch)
    }
}

fn now_nanos() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| u64::try_from(d.as_nanos()).unwrap_or(u64::MAX))
        .unwrap_or(0)
}
