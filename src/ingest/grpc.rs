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
use tonic::Code;

use super::decode::{decode, decompress_within, ContentEncoding, MediaType};
use super::limits::{Held, Limits};
use super::reply::{export_response, FramingError, Refusal};
use crate::model::{Signal, Transport};
use crate::pipeline::Pipeline;

const TRACE_EXPORT: &str = "/opentelemetry.proto.collector.trace.v1.TraceService/Export";
const LOGS_EXPORT: &str = "/opentelemetry.proto.collector.logs.v1.LogsService/Export";
const METRICS_EXPORT: &str = "/opentelemetry.proto.collector.metrics.v1.MetricsService/Export";

/// The 5-byte prefix of a gRPC message: compressed flag, big-endian length.
const FRAME_HEADER: usize = 5;

/// The OTLP/gRPC service: the Trace, Logs and Metrics `Export` calls.
#[derive(Clone)]
pub struct OtlpGrpc {
    pipeline: Arc<Pipeline>,
    limits: Limits,
}

/// Message compression of a call (`grpc-encoding`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum GrpcEncoding {
    /// Not compressed.
    Identity,
    /// gzip.
    Gzip,
    /// Zstandard.
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
    /// Serves exports into `pipeline`, under `limits`.
    pub fn new(pipeline: Arc<Pipeline>, limits: Limits) -> Self {
        Self { pipeline, limits }
    }

    /// Answers one gRPC call.
    pub async fn handle(self, req: Request<Incoming>) -> Response<tonic::body::Body> {
        let deadline = self.limits.deadline();
        let signal = match req.uri().path() {
            TRACE_EXPORT => Signal::Traces,
            LOGS_EXPORT => Signal::Logs,
            METRICS_EXPORT => Signal::Metrics,
            path => {
                // Unknown service or method: UNIMPLEMENTED, as gRPC servers answer.
                return Refusal::NoSuchMethod(path.to_string()).status().into_http();
            }
        };
        let result = self.export(req, signal, deadline).await;
        let mut overloaded = false;
        let (code, response) = match result {
            Ok(message) => (Code::Ok, ok_response(message)),
            Err(refusal) => {
                refusal.log("OTLP/gRPC");
                overloaded = refusal.is_overload();
                let status = refusal.status();
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
    ) -> Result<Bytes, Refusal> {
        let encoding = req
            .headers()
            .get("grpc-encoding")
            .map(HeaderValue::as_bytes);
        let Some(encoding) = GrpcEncoding::from_header(encoding) else {
            return Err(Refusal::MessageCompression(
                String::from_utf8_lossy(encoding.unwrap_or_default()).into_owned(),
            ));
        };
        let limit = self.limits.settings.max_body_bytes;
        let mut held = self.limits.hold();
        let mut body = req.into_body();
        let framed = self
            .limits
            .read_body(&mut body, limit + FRAME_HEADER, None, deadline, &mut held)
            .await
            .map_err(|e| Refusal::read(e, Transport::Grpc, limit))?;
        let pipeline = self.pipeline.clone();
        let inline = Limits::decodes_inline(
            framed.len(),
            encoding != GrpcEncoding::Identity,
            pipeline.store().blocks(),
        );
        self.limits
            .decode(deadline, inline, move || {
                let message = unary_message(framed, encoding, limit, &mut held)?;
                export(&pipeline, signal, &message, &mut held)
            })
            .await
            .unwrap_or(Err(Refusal::Busy(Transport::Grpc)))
    }
}

/// One call's body framed, decoded and answered as the handler does, without a
/// connection (for the fuzz targets): the encoded response message or the status.
#[cfg(feature = "test-hooks")]
pub fn answer_message(
    pipeline: &Pipeline,
    limits: &Limits,
    path: &str,
    grpc_encoding: Option<&[u8]>,
    framed: Bytes,
) -> Result<Bytes, tonic::Status> {
    let signal = match path {
        TRACE_EXPORT => Signal::Traces,
        LOGS_EXPORT => Signal::Logs,
        METRICS_EXPORT => Signal::Metrics,
        _ => return Err(Refusal::NoSuchMethod(path.to_string()).status()),
    };
    let encoding = GrpcEncoding::from_header(grpc_encoding).ok_or_else(|| {
        let named = String::from_utf8_lossy(grpc_encoding.unwrap_or_default());
        Refusal::MessageCompression(named.into_owned()).status()
    })?;
    let limit = limits.settings.max_body_bytes;
    let transport = Transport::Grpc;
    if framed.len() > limit + FRAME_HEADER {
        return Err(Refusal::TooLarge { transport, limit }.status());
    }
    let mut held = limits.hold();
    unary_message(framed, encoding, limit, &mut held)
        .and_then(|message| export(pipeline, signal, &message, &mut held))
        .map_err(|refusal| refusal.status())
}

/// The one message of a unary call's body (framing checked, decompressed within
/// `limit`, buffers paid for from `held`).
pub fn unary_message(
    framed: Bytes,
    encoding: GrpcEncoding,
    limit: usize,
    held: &mut Held,
) -> Result<Bytes, Refusal> {
    let Some(header) = framed.get(..FRAME_HEADER) else {
        return Err(if framed.is_empty() {
            FramingError::Missing
        } else {
            FramingError::TruncatedHeader
        }
        .into());
    };
    let compressed = match header[0] {
        0 => false,
        1 => true,
        _ => return Err(FramingError::CompressionFlag.into()),
    };
    let len = u32::from_be_bytes(header[1..].try_into().expect("4 bytes")) as usize;
    let transport = Transport::Grpc;
    if len > limit {
        return Err(Refusal::TooLarge { transport, limit });
    }
    let rest = framed.len() - FRAME_HEADER;
    if rest != len {
        let wrong = if rest < len {
            FramingError::Short
        } else {
            FramingError::Several
        };
        return Err(wrong.into());
    }
    let message = framed.slice(FRAME_HEADER..);
    if !compressed {
        return Ok(message);
    }
    let encoding = match encoding {
        GrpcEncoding::Identity => return Err(FramingError::CompressedWithoutEncoding.into()),
        GrpcEncoding::Gzip => ContentEncoding::Gzip,
        GrpcEncoding::Zstd => ContentEncoding::Zstd,
    };
    decompress_within(message, encoding, limit, &mut |n| held.take(n))
        .map_err(|e| Refusal::decode(e, transport))
}

/// Decodes and counts one message; the encoded `Export*ServiceResponse`.
fn export(
    pipeline: &Pipeline,
    signal: Signal,
    message: &[u8],
    held: &mut Held,
) -> Result<Bytes, Refusal> {
    let rejected = match signal {
        Signal::Traces => pipeline.traces_protobuf(message, Transport::Grpc)?,
        Signal::Logs => {
            // Decoded messages take about what their bytes took: paid for as such.
            if !held.take(message.len()) {
                return Err(Refusal::Busy(Transport::Grpc));
            }
            let request: ExportLogsServiceRequest = decode(message, MediaType::Protobuf)
                .map_err(|e| Refusal::decode(e, Transport::Grpc))?;
            pipeline.logs(&request, Transport::Grpc)?
        }
        Signal::Metrics => Default::default(),
    };
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
