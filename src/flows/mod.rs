//! Flow events and their correlation. Knows nothing of HTTP, gRPC, Prometheus or the
//! configuration file: it is handed its settings, and the store reports what happened
//! to a [`FlowSink`](store::FlowSink).
//!
//! A trace export is walked once, by [`scan`] (protobuf bytes read in place, with
//! [`wire`]) or by [`decoded`] (a decoded request: OTLP/JSON, and logs); both hand every
//! event that may be a flow event to the rules of [`extract`] as an
//! [`EventContext`](extract::EventContext), looked up through [`attributes`]. [`event`]
//! is what comes out; [`network`] reads Flow Spans; [`store`] pairs events; [`dedup`]
//! recognises retried exports.

pub mod attributes;
pub mod decoded;
pub mod dedup;
pub mod event;
pub mod extract;
pub mod intern;
pub mod label_value;
pub mod network;
pub mod scan;
pub mod state;
pub mod steps;
pub mod store;
#[cfg(test)]
mod test_attrs;
pub mod wire;

pub use event::{EventKind, FlowEvent, Outcome, Source, TraceRef};
pub use extract::{Extractor, ExtractorSettings};
pub use store::{
    CorrelationStore, FlowSink, MemoryStore, Report, RestoreRules, RestoreSummary, StoreSettings,
};
