//! Transports in: OTLP/HTTP and OTLP/gRPC, both feeding [`crate::pipeline::Pipeline`].

pub mod decode;
pub mod grpc;
pub mod http;
pub mod json;
pub mod limits;
pub mod reply;
