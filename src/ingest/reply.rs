//! Answers to export requests: `Export*ServiceResponse` with `partial_success`, and
//! `google.rpc.Status` bodies for errors, each in the request's media type.

use bytes::Bytes;
use opentelemetry_proto::tonic::collector::logs::v1::{
    ExportLogsPartialSuccess, ExportLogsServiceResponse,
};
use opentelemetry_proto::tonic::collector::metrics::v1::ExportMetricsServiceResponse;
use opentelemetry_proto::tonic::collector::trace::v1::{
    ExportTracePartialSuccess, ExportTraceServiceResponse,
};
use prost::Message;

use super::decode::MediaType;
use crate::model::{RejectionSummary, Signal};

/// The success answer for `signal`, carrying `partial_success` when events were refused.
/// Spans and log records themselves are never refused (`rejected_*: 0`): flowmetrics
/// only reads flow events out of them.
pub fn export_response(signal: Signal, media: MediaType, rejected: &RejectionSummary) -> Bytes {
    if rejected.is_empty() && media == MediaType::Json {
        // serde would write `{"partialSuccess":null}`; an empty message is `{}`.
        return Bytes::from_static(b"{}");
    }
    let message = (!rejected.is_empty()).then(|| rejected.message());
    match signal {
        Signal::Traces => encode(
            media,
            &ExportTraceServiceResponse {
                partial_success: message.map(|error_message| ExportTracePartialSuccess {
                    rejected_spans: 0,
                    error_message,
                }),
            },
        ),
        Signal::Logs => encode(
            media,
            &ExportLogsServiceResponse {
                partial_success: message.map(|error_message| ExportLogsPartialSuccess {
                    rejected_log_records: 0,
                    error_message,
                }),
            },
        ),
        Signal::Metrics => encode(
            media,
            &ExportMetricsServiceResponse {
                partial_success: None,
            },
        ),
    }
}

fn encode<M: Message + serde::Serialize>(media: MediaType, message: &M) -> Bytes {
    match media {
        MediaType::Protobuf => Bytes::from(message.encode_to_vec()),
        MediaType::Json => {
            Bytes::from(serde_json::to_vec(message).unwrap_or_else(|_| b"{}".to_vec()))
        }
    }
}

/// `google.rpc.Status`, the body of every OTLP/HTTP error answer.
#[derive(Clone, PartialEq, prost::Message, serde::Serialize)]
pub struct RpcStatus {
    #[prost(int32, tag = "1")]
    pub code: i32,
    #[prost(string, tag = "2")]
    pub message: String,
}

/// gRPC status codes used in `google.rpc.Status` bodies.
pub mod grpc_code {
    pub const CANCELLED: i32 = 1;
    pub const INVALID_ARGUMENT: i32 = 3;
    pub const NOT_FOUND: i32 = 5;
    pub const RESOURCE_EXHAUSTED: i32 = 8;
    pub const UNIMPLEMENTED: i32 = 12;
    pub const INTERNAL: i32 = 13;
    pub const UNAVAILABLE: i32 = 14;
}

pub fn status_body(media: MediaType, code: i32, message: &str) -> Bytes {
    encode(
        media,
        &RpcStatus {
            code,
            message: message.to_string(),
        },
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn status_bodies_in_both_media_types() {
        let json = status_body(MediaType::Json, grpc_code::INVALID_ARGUMENT, "bad");
        assert_eq!(&json[..], br#"{"code":3,"message":"bad"}"#);
        let pb = status_body(MediaType::Protobuf, grpc_code::INVALID_ARGUMENT, "bad");
        let back = RpcStatus::decode(&pb[..]).unwrap();
        assert_eq!(back.code, 3);
        assert_eq!(back.message, "bad");
    }
}
