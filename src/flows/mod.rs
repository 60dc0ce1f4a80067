//! Flow events and their correlation. Knows nothing of HTTP, gRPC, Prometheus or the
//! configuration file: it is handed its settings, and the store reports what happened
//! to a [`FlowSink`](store::FlowSink).
//!
//! [`scan`] reads protobuf trace exports (with [`wire`]) and [`event`] recognises flow
//! events in what it finds; [`store`] pairs them; [`dedup`] recognises retried exports.

pub mod dedup;
pub mod event;
pub mod intern;
pub mod label_value;
pub mod network;
pub mod scan;
pub mod state;
pub mod steps;
pub mod store;
pub mod wire;

pub use event::{EventKind, Extractor, ExtractorSettings, FlowEvent, Outcome, Source, TraceRef};
pub use store::{
    CorrelationStore, FlowSink, MemoryStore, Report, RestoreRules, RestoreSummary, StoreSettings,
};
