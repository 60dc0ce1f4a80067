//! Answers to export requests: `Export*ServiceResponse` with `partial_success`, and
//! `google.rpc.Status` bodies for errors, each in the request's media type.

use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{SystemTime, UNIX_EPOCH};

use bytes::Bytes;
use hyper::StatusCode;
use opentelemetry_proto::tonic::collector::logs::v1::{
    ExportLogsPartialSuccess as LogsPartial, ExportLogsServiceResponse as LogsResponse,
};
use opentelemetry_proto::tonic::collector::metrics::v1::ExportMetricsServiceResponse;
use opentelemetry_proto::tonic::collector::trace::v1::{
    ExportTracePartialSuccess as TracePartial, ExportTraceServiceResponse as TraceResponse,
};
use prost::Message;
use tonic::Code;

use super::decode::{DecodeError, InvalidBody, MediaType};
use super::limits::ReadError;
use crate::flows::scan::ScanError;
use crate::flows::store::StoreError;
use crate::model::{RejectionSummary, Signal, Transport};
use crate::pipeline::PipelineError;

/// `$response` whose `partial_success`, when there is a `$message`, carries it, with
/// `$rejected: 0`.
macro_rules! refusing {
    ($message:ident; $response:ident, $partial:ident.$rejected:ident) => {
        $response {
            partial_success: $message.map(|error_message| $partial {
                $rejected: 0,
                error_message,
            }),
        }
    };
}

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
            &refusing!(message; TraceResponse, TracePartial.rejected_spans),
        ),
        Signal::Logs => encode(
            media,
            &refusing!(message; LogsResponse, LogsPartial.rejected_log_records),
        ),
        Signal::Metrics => encode(media, &ExportMetricsServiceResponse::default()),
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
    /// The gRPC status code.
    #[prost(int32, tag = "1")]
    pub code: i32,
    /// What went wrong, for the client to read.
    #[prost(string, tag = "2")]
    pub message: String,
}

/// An OTLP/HTTP error body: `google.rpc.Status` in the request's media type.
pub fn status_body(media: MediaType, code: Code, message: &str) -> Bytes {
    encode(
        media,
        &RpcStatus {
            code: code as i32,
            message: message.to_string(),
        },
    )
}

/// Why an export was refused, whichever stage refused it (transport, limits, framing,
/// decoding, the pipeline), and how each transport answers it: the one place where
/// HTTP statuses and gRPC codes are chosen. Its text is what the client reads.
#[derive(Debug, thiserror::Error)]
pub enum Refusal {
    /// OTLP/HTTP: a path that is no OTLP endpoint.
    #[error("no such path {0}: OTLP/HTTP accepts POST /v1/traces, /v1/logs, /v1/metrics")]
    NoSuchPath(String),
    /// OTLP/gRPC: a service or method that is not served.
    #[error("no such method {0}: flowmetrics serves the OTLP Trace, Logs and Metrics services")]
    NoSuchMethod(String),
    /// OTLP/HTTP: a method other than POST.
    #[error("method {0} not allowed: use POST")]
    MethodNotAllowed(String),
    /// OTLP/HTTP: a `Content-Type` other than protobuf or JSON.
    #[error("unsupported content type {0:?}: use application/x-protobuf or application/json")]
    ContentType(String),
    /// OTLP/HTTP: a `Content-Encoding` other than gzip, deflate, zstd or none.
    #[error("unsupported content encoding {0:?}: use gzip, deflate, zstd or none")]
    ContentEncoding(String),
    /// OTLP/gRPC: a `grpc-encoding` this server does not speak.
    #[error("message compression {0:?} not supported: use gzip, zstd or none")]
    MessageCompression(String),
    /// A body over `limits.max_request_body_bytes`, as sent or once decompressed.
    #[error("{} over limits.max_request_body_bytes ({limit} bytes)", body(*.transport))]
    TooLarge {
        /// The transport it came in on.
        transport: Transport,
        /// The limit, bytes.
        limit: usize,
    },
    /// The buffered-bytes budget is spent (or no decode slot came in time): overload.
    #[error("overloaded: {} in memory are at limits.max_buffered_bytes; retry shortly", bodies(*.0))]
    Busy(Transport),
    /// The body did not arrive within `limits.request_read_timeout`.
    #[error("{} not received within limits.request_read_timeout", body(*.0))]
    Timeout(Transport),
    /// The client went away: not bad input.
    #[error("{}", canceled(*.0))]
    Canceled(Transport),
    /// Broken framing of the body (say, a bad HTTP/1 chunk).
    #[error("{0}")]
    MalformedBody(String),
    /// A gRPC unary call's body is not one well-framed message.
    #[error(transparent)]
    Framing(#[from] FramingError),
    /// A body that does not decode: its encoding, media type or ids are wrong.
    #[error(transparent)]
    Decode(#[from] InvalidBody),
    /// The protobuf trace export, read selectively, is malformed.
    #[error("protobuf body: {0}")]
    Malformed(ScanError),
    /// The correlation store failed: the exporter retries.
    #[error("{0}; retry shortly")]
    Store(#[from] StoreError),
}

impl From<PipelineError> for Refusal {
    fn from(e: PipelineError) -> Self {
        match e {
            PipelineError::Malformed(e) => Refusal::Malformed(e),
            PipelineError::Store(e) => Refusal::Store(e),
        }
    }
}

/// A gRPC unary call's body is not one well-framed message.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
pub enum FramingError {
    /// The body holds no message.
    #[error("missing request message")]
    Missing,
    /// The body ends inside the 5-byte message header.
    #[error("truncated gRPC message header")]
    TruncatedHeader,
    /// The compression flag is neither 0 nor 1.
    #[error("invalid gRPC compression flag")]
    CompressionFlag,
    /// The body ends before the message's stated length.
    #[error("gRPC message shorter than its length")]
    Short,
    /// Bytes follow the one message of a unary call.
    #[error("more than one message in a unary call")]
    Several,
    /// The flag says compressed, but the call named no `grpc-encoding`.
    #[error("compressed message without grpc-encoding")]
    CompressedWithoutEncoding,
}

fn body(transport: Transport) -> &'static str {
    match transport {
        Transport::Http => "request body",
        Transport::Grpc => "message",
    }
}

fn bodies(transport: Transport) -> &'static str {
    match transport {
        Transport::Http => "request bodies",
        Transport::Grpc => "messages",
    }
}

fn canceled(transport: Transport) -> &'static str {
    match transport {
        Transport::Http => "the client closed the request",
        Transport::Grpc => "the client reset the stream",
    }
}

impl Refusal {
    /// A body not read whole.
    pub fn read(e: ReadError, transport: Transport, limit: usize) -> Self {
        match e {
            ReadError::TooLarge => Refusal::TooLarge { transport, limit },
            ReadError::Timeout => Refusal::Timeout(transport),
            ReadError::Busy => Refusal::Busy(transport),
            ReadError::Canceled => Refusal::Canceled(transport),
            ReadError::Invalid(m) => Refusal::MalformedBody(m),
        }
    }

    /// A body not decompressed or decoded.
    pub fn decode(e: DecodeError, transport: Transport) -> Self {
        match e {
            DecodeError::TooLarge { limit } => Refusal::TooLarge { transport, limit },
            DecodeError::Busy => Refusal::Busy(transport),
            DecodeError::Invalid(e) => Refusal::Decode(e),
        }
    }

    /// The code of a gRPC answer, and of the `google.rpc.Status` of an HTTP one.
    pub fn grpc_code(&self) -> Code {
        match self {
            Refusal::NoSuchPath(_) => Code::NotFound,
            Refusal::NoSuchMethod(_)
            | Refusal::MethodNotAllowed(_)
            | Refusal::MessageCompression(_) => Code::Unimplemented,
            Refusal::TooLarge { .. } => Code::ResourceExhausted,
            Refusal::Busy(_) | Refusal::Store(_) => Code::Unavailable,
            Refusal::Timeout(Transport::Http) => Code::Unavailable,
            Refusal::Timeout(Transport::Grpc) => Code::DeadlineExceeded,
            Refusal::Canceled(_) => Code::Cancelled,
            Refusal::ContentType(_)
            | Refusal::ContentEncoding(_)
            | Refusal::MalformedBody(_)
            | Refusal::Framing(_)
            | Refusal::Decode(_)
            | Refusal::Malformed(_) => Code::InvalidArgument,
        }
    }

    /// The status of an HTTP answer (docs/behaviour.md §6).
    pub fn http_status(&self) -> StatusCode {
        match self {
            Refusal::NoSuchPath(_) => StatusCode::NOT_FOUND,
            Refusal::MethodNotAllowed(_) => StatusCode::METHOD_NOT_ALLOWED,
            Refusal::ContentType(_) | Refusal::ContentEncoding(_) => {
                StatusCode::UNSUPPORTED_MEDIA_TYPE
            }
            Refusal::TooLarge { .. } => StatusCode::PAYLOAD_TOO_LARGE,
            Refusal::Busy(_) | Refusal::Store(_) => StatusCode::SERVICE_UNAVAILABLE,
            Refusal::Timeout(_) => StatusCode::REQUEST_TIMEOUT,
            Refusal::Canceled(_)
            | Refusal::MalformedBody(_)
            | Refusal::Framing(_)
            | Refusal::Decode(_)
            | Refusal::Malformed(_) => StatusCode::BAD_REQUEST,
            // gRPC only.
            Refusal::NoSuchMethod(_) | Refusal::MessageCompression(_) => {
                StatusCode::NOT_IMPLEMENTED
            }
        }
    }

    /// The `code` label an HTTP refusal is counted under.
    pub fn http_label(&self) -> &'static str {
        if let Refusal::Canceled(_) = self {
            return "canceled";
        }
        match self.http_status().as_u16() {
            400 => "400",
            404 => "404",
            405 => "405",
            413 => "413",
            408 => "408",
            415 => "415",
            503 => "503",
            _ => "500",
        }
    }

    /// The gRPC answer.
    pub fn status(&self) -> tonic::Status {
        tonic::Status::new(self.grpc_code(), self.to_string())
    }

    /// Refused for want of memory budget or a decode slot (logged as overload).
    pub fn is_overload(&self) -> bool {
        matches!(self, Refusal::Busy(_))
    }

    /// Logs what the client is not told: a failing correlation store (a WARN at most
    /// every 10 s; each refusal is counted in `flowmetrics_otlp_requests_total` anyway).
    pub fn log(&self, transport: &str) {
        if let Refusal::Store(e) = self {
            warn_store_refusal(transport, e);
        }
    }
}

/// When a refusal for the store was last logged (Unix ms), for all transports.
static STORE_WARNED: AtomicU64 = AtomicU64::new(0);

fn warn_store_refusal(transport: &str, e: &StoreError) {
    let now = SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| u64::try_from(d.as_millis()).unwrap_or(u64::MAX));
    let last = STORE_WARNED.load(Ordering::Relaxed);
    if now.saturating_sub(last) >= 10_000
        && STORE_WARNED
            .compare_exchange(last, now, Ordering::Relaxed, Ordering::Relaxed)
            .is_ok()
    {
        tracing::warn!("{transport}: refusing exports: {e}; clients retry on 503 / UNAVAILABLE");
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn status_bodies_in_both_media_types() {
        let json = status_body(MediaType::Json, Code::InvalidArgument, "bad");
        assert_eq!(&json[..], br#"{"code":3,"message":"bad"}"#);
        let pb = status_body(MediaType::Protobuf, Code::InvalidArgument, "bad");
        let back = RpcStatus::decode(&pb[..]).unwrap();
        assert_eq!(back.code, 3);
        assert_eq!(back.message, "bad");
    }
}
