//! Transports in: OTLP/HTTP and OTLP/gRPC, both feeding [`crate::pipeline::Pipeline`].
//! Each stage says why it refused an export with its own error; [`reply::Refusal`]
//! gathers them and chooses the HTTP status and gRPC code of each.

pub mod decode;
pub mod grpc;
pub mod http;
pub mod json;
pub mod limits;
pub mod reply;
