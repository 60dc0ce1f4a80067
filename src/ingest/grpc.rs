//! OTLP/gRPC: TraceService and LogsService feed the pipeline; MetricsService is accepted
//! and discarded. Served by hyper (HTTP/2); tonic provides the status type.
//!
//! Unary calls are framed here rather than by tonic's server: the message is read under
//! the same limits as an HTTP body (byte budget, read deadline, size) before anything is
//! decompressed, and a malformed one is INVALID_ARGUMENT (docs/behaviour.md §6), not tonic's INTERNAL.

use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll};

use bytes::{BufMut, Bytes, BytesMut};
use hyper::body::{Frame, Incoming};
use hyper::header::{HeaderMap, HeaderValue, CONTENT_TYPE};
use hyper::{Request, Response};
use opentelemetry_proto::tonic::collector::logs::v1::ExportLogsServiceRequest;
use tonic::{Code, Status};

use super::decode::{decode, decompress_within, ContentEncoding, DecodeError, MediaType};
use super::limits::{Held, Limits, ReadError};
use super::reply::export_response;
use super::store_refusal;
use crate::flows::store::StoreError;
use crate::model::{Signal, Transport};
use crate::pipeline::Pipeline;

const TRACE_EXPORT: &str = "/opentelemetry.proto.collector.trace.v1.TraceService/Export";
const LOGS_EXPORT: &str = "/opentelemetry.proto.collector.logs.v1.LogsService/Export";
const METRICS_EXPORT: &str = "/opentelemetry.proto.collector.metrics.v1.MetricsService/Export";

/// The 5-byte prefix of a gRPC message: compressed flag, big-endian length.
const FRAME_HEADER: usize = 5;

#[derive(Clone)]
pub struct OtlpGrpc {
    pipeline: Arc<Pipeline>,
    limits: Limits,
}

/// Message compression of a call (`grpc-encoding`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum GrpcEncoding {
    Identity,
    Gzip,
    Zstd,
}

impl GrpcEncoding {
    /// `None`: an encoding this server does not speak (UNIMPLEMENTED, as gRPC says).
    pub fn from_header(value: Option<&[u8]>) -> Option<GrpcEncoding> {
        match value {
            None | Some(b"identity") => Some(GrpcEncoding::Identity),
            Some(b"gzip") => Some(GrpcEncoding::Gzip),
            Some(b"zstd") => Some(GrpcEncoding::Zstd),
            Some(_) => None,
        }
    }
}

impl OtlpGrpc {
    pub fn new(pipeline: Arc<Pipeline>, limits: Limits) -> Self {
        Self { pipeline, limits }
    }

    pub async fn handle(self, req: Request<Incoming>) -> Response<tonic::body::Body> {
        let deadline = self.limits.deadline();
        let signal = match req.uri().path() {
            TRACE_EXPORT => Signal::Traces,
            LOGS_EXPORT => Signal::Logs,
            METRICS_EXPORT => Signal::Metrics,
            _ => {
                // Unknown service or method: UNIMPLEMENTED, as gRPC servers answer.
                return Status::unimplemented(format!(
                    "no such method {}: flowmetrics serves the OTLP Trace, Logs and Metrics services",
                    req.uri().path()
                ))
                .into_http();
            }
        };
        let result = self.export(req, signal, deadline).await;
        let mut overloaded = false;
        let (code, response) = match result {
            Ok(message) => (Code::Ok, ok_response(message)),
            Err(refused) => {
                overloaded =
                    matches!(refused, Refused::Status(ref s) if s.code() == Code::Unavailable);
                let status = refused.into_status();
                tracing::debug!(code = ?status.code(), "export refused: {}", status.message());
                let mut r: Response<tonic::body::Body> = status.clone().into_http();
                if status.code() == Code::Unimplemented {
                    r.headers_mut().insert(
                        "grpc-accept-encoding",
                        HeaderValue::from_static("gzip,zstd"),
                    );
                }
                (status.code(), r)
            }
        };
        if overloaded {
            self.limits.note_overload("OTLP/gRPC");
        }
        self.pipeline
            .metrics()
            .request(Transport::Grpc, signal, code_label(code));
        response
    }

    async fn export(
        &self,
        req: Request<Incoming>,
        signal: Signal,
        deadline: tokio::time::Instant,
    ) -> Result<Bytes, Refused> {
        let encoding = req
            .headers()
            .get("grpc-encoding")
            .map(HeaderValue::as_bytes);
        let Some(encoding) = GrpcEncoding::from_header(encoding) else {
            return Err(Status::unimplemented(format!(
                "message compression {:?} not supported: use gzip, zstd or none",
                String::from_utf8_lossy(encoding.unwrap_or_default())
            ))
            .into());
        };
        let limit = self.limits.settings.max_body_bytes;
        let mut held = self.limits.hold();
        let mut body = req.into_body();
        let framed = self
            .limits
            .read_body(&mut body, limit + FRAME_HEADER, None, deadline, &mut held)
            .await
            .map_err(|e| match e {
                ReadError::TooLarge => too_large(limit),
                ReadError::Busy => busy(),
                ReadError::Timeout => Status::deadline_exceeded(
                    "message not received within limits.request_read_timeout",
                ),
                ReadError::Canceled => Status::cancelled("the client reset the stream"),
                ReadError::Invalid(m) => Status::invalid_argument(m),
            })?;
        let pipeline = self.pipeline.clone();
        self.limits
            .decode(deadline, move || {
                let message = unary_message(framed, encoding, limit, &mut held)?;
                export(&pipeline, signal, &message, &mut held)
            })
            .await
            .unwrap_or_else(|| Err(busy().into()))
    }
}

/// Why a call was refused: a status to answer, or the correlation store's failure
/// (answered UNAVAILABLE, and logged as what it is rather than as overload).
enum Refused {
    Status(Status),
    Store(StoreError),
}

impl From<Status> for Refused {
    fn from(status: Status) -> Self {
        Refused::Status(status)
    }
}

impl Refused {
    fn into_status(self) -> Status {
        match self {
            Refused::Status(status) => status,
            Refused::Store(e) => Status::unavailable(store_refusal("OTLP/gRPC", &e)),
        }
    }
}

/// One call's body framed, decoded and answered as the handler does, without a
/// connection (for the fuzz targets): the encoded response message or the status.
#[doc(hidden)]
pub fn answer_message(
    pipeline: &Pipeline,
    limits: &Limits,
    path: &str,
    grpc_encoding: Option<&[u8]>,
    framed: Bytes,
) -> Result<Bytes, Status> {
    let signal = match path {
        TRACE_EXPORT => Signal::Traces,
        LOGS_EXPORT => Signal::Logs,
        METRICS_EXPORT => Signal::Metrics,
        _ => return Err(Status::unimplemented("no such method")),
    };
    let encoding = GrpcEncoding::from_header(grpc_encoding)
        .ok_or_else(|| Status::unimplemented("compression"))?;
    let limit = limits.settings.max_body_bytes;
    if framed.len() > limit + FRAME_HEADER {
        return Err(too_large(limit));
    }
    let mut held = limits.hold();
    let message = unary_message(framed, encoding, limit, &mut held)?;
    export(pipeline, signal, &message, &mut held).map_err(Refused::into_status)
}

/// The one message of a unary call's body (framing checked, decompressed within
/// `limit`, buffers paid for from `held`).
pub fn unary_message(
    framed: Bytes,
    encoding: GrpcEncoding,
    limit: usize,
    held: &mut Held,
) -> Result<Bytes, Status> {
    let Some(header) = framed.get(..FRAME_HEADER) else {
        return Err(Status::invalid_argument(if framed.is_empty() {
            "missing request message"
        } else {
            "truncated gRPC message header"
        }));
    };
    let compressed = match header[0] {
        0 => false,
        1 => true,
        _ => return Err(Status::invalid_argument("invalid gRPC compression flag")),
    };
    let len = u32::from_be_bytes(header[1..].try_into().expect("4 bytes")) as usize;
    if len > limit {
        return Err(too_large(limit));
    }
    let rest = framed.len() - FRAME_HEADER;
    if rest < len {
        return Err(Status::invalid_argument(
            "gRPC message shorter than its length",
        ));
    }
    if rest > len {
        return Err(Status::invalid_argument(
            "more than one message in a unary call",
        ));
    }
    let message = framed.slice(FRAME_HEADER..);
    if !compressed {
        return Ok(message);
    }
    let encoding = match encoding {
        GrpcEncoding::Identity => {
            return Err(Status::invalid_argument(
                "compressed message without grpc-encoding",
            ))
        }
        GrpcEncoding::Gzip => ContentEncoding::Gzip,
        GrpcEncoding::Zstd => ContentEncoding::Zstd,
    };
    decompress_within(message, encoding, limit, &mut |n| held.take(n)).map_err(decode_status)
}

fn decode_status(e: DecodeError) -> Status {
    match e {
        DecodeError::TooLarge { limit } => too_large(limit),
        DecodeError::Busy => busy(),
        DecodeError::Invalid(m) => Status::invalid_argument(m),
    }
}

fn too_large(limit: usize) -> Status {
    Status::resource_exhausted(format!(
        "message over limits.max_request_body_bytes ({limit} bytes)"
    ))
}

fn busy() -> Status {
    Status::unavailable(
        "overloaded: messages in memory are at limits.max_buffered_bytes; retry shortly",
    )
}

/// Decodes and counts one message; the encoded `Export*ServiceResponse`.
fn export(
    pipeline: &Pipeline,
    signal: Signal,
    message: &[u8],
    held: &mut Held,
) -> Result<Bytes, Refused> {
    let rejected = match signal {
        Signal::Traces => pipeline
            .traces_protobuf(message, Transport::Grpc)
            .map_err(Status::invalid_argument)?,
        Signal::Logs => {
            // Decoded messages take about what their bytes took: paid for as such.
            if !held.take(message.len()) {
                return Err(busy().into());
            }
            let request: ExportLogsServiceRequest =
                decode(message, MediaType::Protobuf).map_err(decode_status)?;
            pipeline.logs(&request, Transport::Grpc)
        }
        Signal::Metrics => Ok(Default::default()),
    }
    .map_err(Refused::Store)?;
    if !rejected.is_empty() {
        tracing::debug!("{}", rejected.message());
    }
    Ok(export_response(signal, MediaType::Protobuf, &rejected))
}

fn ok_response(message: Bytes) -> Response<tonic::body::Body> {
    let mut framed = BytesMut::with_capacity(FRAME_HEADER + message.len());
    framed.put_u8(0);
    framed.put_u32(u32::try_from(message.len()).unwrap_or(u32::MAX));
    framed.put(message);
    let mut trailers = HeaderMap::new();
    trailers.insert("grpc-status", HeaderValue::from_static("0"));
    let mut response = Response::new(tonic::body::Body::new(Unary {
        data: Some(framed.freeze()),
        trailers: Some(trailers),
    }));
    response
        .headers_mut()
        .insert(CONTENT_TYPE, HeaderValue::from_static("application/grpc"));
    response
}

fn code_label(code: Code) -> &'static str {
    match code {
        Code::Ok => "OK",
        Code::InvalidArgument => "INVALID_ARGUMENT",
        Code::ResourceExhausted => "RESOURCE_EXHAUSTED",
        Code::Unavailable => "UNAVAILABLE",
        Code::Unimplemented => "UNIMPLEMENTED",
        Code::Cancelled => "CANCELLED",
        Code::DeadlineExceeded => "DEADLINE_EXCEEDED",
        _ => "INTERNAL",
    }
}

/// A unary answer's body: one data frame, then the trailers.
struct Unary {
    data: Option<Bytes>,
    trailers: Option<HeaderMap>,
}

impl hyper::body::Body for Unary {
    type Data = Bytes;
    type Error = std::convert::Infallible;

    fn poll_frame(
        mut self: Pin<&mut Self>,
        _: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, Self::Error>>> {
        if let Some(data) = self.data.take() {
            return Poll::Ready(Some(Ok(Frame::data(data))));
        }
        Poll::Ready(self.trailers.take().map(|t| Ok(Frame::trailers(t))))
    }

    fn is_end_stream(&self) -> bool {
        self.data.is_none() && self.trailers.is_none()
    }
}
