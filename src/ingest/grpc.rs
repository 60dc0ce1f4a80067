//! OTLP/gRPC: TraceService and LogsService feed the pipeline; MetricsService is accepted
//! and discarded. Served by hyper (HTTP/2) with tonic's gRPC framing and compression.
//!
//! tonic's generated servers decode with prost and answer a malformed message with
//! INTERNAL; SPEC §6 wants INVALID_ARGUMENT. So requests arrive here as raw bytes (a
//! pass-through codec) and are decoded by [`decode`](super::decode::decode), the same
//! function the HTTP side uses.

use std::sync::Arc;

use bytes::{Buf, BufMut, Bytes};
use hyper::body::Incoming;
use hyper::header::HeaderValue;
use hyper::{Request, Response};
use opentelemetry_proto::tonic::collector::logs::v1::ExportLogsServiceRequest;
use tokio::sync::Semaphore;
use tonic::codec::{Codec, CompressionEncoding, DecodeBuf, Decoder, EncodeBuf, Encoder};
use tonic::{Code, Status};

use super::decode::{decode, DecodeError, MediaType};
use super::http::MAX_CONCURRENT_EXPORTS;
use super::reply::export_response;
use crate::model::{Signal, Transport};
use crate::pipeline::Pipeline;

const TRACE_EXPORT: &str = "/opentelemetry.proto.collector.trace.v1.TraceService/Export";
const LOGS_EXPORT: &str = "/opentelemetry.proto.collector.logs.v1.LogsService/Export";
const METRICS_EXPORT: &str = "/opentelemetry.proto.collector.metrics.v1.MetricsService/Export";

#[derive(Clone)]
pub struct OtlpGrpc {
    pipeline: Arc<Pipeline>,
    max_message_bytes: usize,
    permits: Arc<Semaphore>,
}

impl OtlpGrpc {
    pub fn new(pipeline: Arc<Pipeline>, max_message_bytes: usize) -> Self {
        Self {
            pipeline,
            max_message_bytes,
            permits: Arc::new(Semaphore::new(MAX_CONCURRENT_EXPORTS)),
        }
    }

    pub async fn handle(self, req: Request<Incoming>) -> Response<tonic::body::Body> {
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
        let mut grpc = tonic::server::Grpc::new(RawCodec)
            .accept_compressed(CompressionEncoding::Gzip)
            .accept_compressed(CompressionEncoding::Zstd)
            .apply_max_message_size_config(Some(self.max_message_bytes), None);
        let metrics_pipeline = self.pipeline.clone();
        let service = ExportService {
            handler: self,
            signal,
        };
        let mut response = grpc.unary(service, req).await;
        let code = normalize_status(&mut response);
        metrics_pipeline
            .metrics()
            .request(Transport::Grpc, signal, code_label(code));
        response
    }

    fn export(&self, signal: Signal, body: Bytes) -> Result<Bytes, Status> {
        let _permit = self.permits.try_acquire().map_err(|_| {
            Status::unavailable("too many export requests in progress; retry shortly")
        })?;
        let invalid = |e: DecodeError| match e {
            DecodeError::TooLarge { limit } => Status::resource_exhausted(format!(
                "message over limits.max_request_body_bytes ({limit} bytes)"
            )),
            DecodeError::Invalid(m) => Status::invalid_argument(m),
        };
        let rejected = match signal {
            Signal::Traces => self
                .pipeline
                .traces_protobuf(&body, Transport::Grpc)
                .map_err(|m| invalid(DecodeError::Invalid(m)))?,
            Signal::Logs => {
                let request: ExportLogsServiceRequest =
                    decode(&body, MediaType::Protobuf).map_err(invalid)?;
                self.pipeline.logs(&request, Transport::Grpc)
            }
            Signal::Metrics => Ok(Default::default()),
        }
        .map_err(|e| Status::unavailable(e.to_string()))?;
        if !rejected.is_empty() {
            tracing::debug!("{}", rejected.message());
        }
        Ok(export_response(signal, MediaType::Protobuf, &rejected))
    }
}

/// Maps tonic's own answers for oversized and undecompressable messages onto SPEC §6
/// codes, and returns the final code. Errors found before our service runs come back
/// "trailers-only": the status is in the response headers.
fn normalize_status(response: &mut Response<tonic::body::Body>) -> Code {
    let Some(raw) = response.headers().get("grpc-status") else {
        return Code::Ok;
    };
    let code = Code::from_bytes(raw.as_bytes());
    let mapped = match code {
        // A frame longer than the limit.
        Code::OutOfRange => Code::ResourceExhausted,
        // A corrupt compressed frame.
        Code::Internal => Code::InvalidArgument,
        other => other,
    };
    if mapped != code {
        response.headers_mut().insert(
            "grpc-status",
            HeaderValue::from_str(&(mapped as i32).to_string()).expect("digits"),
        );
    }
    mapped
}

fn code_label(code: Code) -> &'static str {
    match code {
        Code::Ok => "OK",
        Code::InvalidArgument => "INVALID_ARGUMENT",
        Code::ResourceExhausted => "RESOURCE_EXHAUSTED",
        Code::Unavailable => "UNAVAILABLE",
        Code::Unimplemented => "UNIMPLEMENTED",
        _ => "INTERNAL",
    }
}

struct ExportService {
    handler: OtlpGrpc,
    signal: Signal,
}

impl tonic::server::UnaryService<Bytes> for ExportService {
    type Response = Bytes;
    type Future = std::future::Ready<Result<tonic::Response<Bytes>, Status>>;

    fn call(&mut self, request: tonic::Request<Bytes>) -> Self::Future {
        let result = self
            .handler
            .export(self.signal, request.into_inner())
            .map(tonic::Response::new);
        std::future::ready(result)
    }
}

/// Passes message bytes through unchanged (framing and compression stay with tonic).
#[derive(Clone, Copy, Default)]
struct RawCodec;

impl Codec for RawCodec {
    type Encode = Bytes;
    type Decode = Bytes;
    type Encoder = RawCodec;
    type Decoder = RawCodec;

    fn encoder(&mut self) -> Self::Encoder {
        RawCodec
    }

    fn decoder(&mut self) -> Self::Decoder {
        RawCodec
    }
}

impl Encoder for RawCodec {
    type Item = Bytes;
    type Error = Status;

    fn encode(&mut self, item: Bytes, dst: &mut EncodeBuf<'_>) -> Result<(), Status> {
        dst.put(item);
        Ok(())
    }
}

impl Decoder for RawCodec {
    type Item = Bytes;
    type Error = Status;

    fn decode(&mut self, src: &mut DecodeBuf<'_>) -> Result<Option<Bytes>, Status> {
        Ok(Some(src.copy_to_bytes(src.remaining())))
    }
}
