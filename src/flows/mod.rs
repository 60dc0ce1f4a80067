//! Flow events and their correlation. Knows nothing of HTTP, gRPC or Prometheus: the
//! table reports what happened to a [`FlowSink`](table::FlowSink).

pub mod dedup;
pub mod event;
pub mod intern;
pub mod network;
pub mod table;

pub use event::{EventKind, Extractor, FlowEvent, Outcome, Rejection, Source, TraceRef};
pub use table::{FlowSink, FlowTable, Report};
