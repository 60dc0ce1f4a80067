//! OTLP/HTTP: `POST /v1/traces`, `/v1/logs`, `/v1/metrics` (accepted, discarded).
//! Routing, media types, encodings, body limits and status codes (SPEC §6).

use std::sync::Arc;

use bytes::Bytes;
use http_body_util::{BodyExt, Full, Limited};
use hyper::body::Incoming;
use hyper::header::{
    HeaderValue, ALLOW, CONTENT_ENCODING, CONTENT_LENGTH, CONTENT_TYPE, RETRY_AFTER,
};
use hyper::{Method, Request, Response, StatusCode};
use opentelemetry_proto::tonic::collector::logs::v1::ExportLogsServiceRequest;
use opentelemetry_proto::tonic::collector::trace::v1::ExportTraceServiceRequest;
use tokio::sync::Semaphore;

use super::decode::{decode, decompress, ContentEncoding, DecodeError, MediaType};
use super::reply::{export_response, grpc_code, status_body};
use crate::model::RejectionSummary;
use crate::model::{Signal, Transport};
use crate::pipeline::Pipeline;
use crate::server::HttpResponse;

/// Export requests processed at once; beyond this the answer is 503 + Retry-After, so
/// a flood cannot pile up bodies in memory (each up to `max_request_body_bytes`).
pub const MAX_CONCURRENT_EXPORTS: usize = 64;

/// How long a request body may take to arrive.
const BODY_READ_TIMEOUT: std::time::Duration = std::time::Duration::from_secs(30);

#[derive(Clone)]
pub struct OtlpHttp {
    pipeline: Arc<Pipeline>,
    max_body_bytes: usize,
    permits: Arc<Semaphore>,
}

/// An error answer: status, gRPC-style code for the `google.rpc.Status` body, message.
struct Failure {
    status: StatusCode,
    code: i32,
    message: String,
}

impl Failure {
    fn new(status: StatusCode, code: i32, message: impl Into<String>) -> Self {
        Self {
            status,
            code,
            message: message.into(),
        }
    }
}

impl OtlpHttp {
    pub fn new(pipeline: Arc<Pipeline>, max_body_bytes: usize) -> Self {
        Self {
            pipeline,
            max_body_bytes,
            permits: Arc::new(Semaphore::new(MAX_CONCURRENT_EXPORTS)),
        }
    }

    pub async fn handle(self, req: Request<Incoming>) -> HttpResponse {
        let signal = match req.uri().path() {
            "/v1/traces" => Signal::Traces,
            "/v1/logs" => Signal::Logs,
            "/v1/metrics" => Signal::Metrics,
            path => {
                let media = request_media(&req);
                let msg = format!(
                    "no such path {path}: OTLP/HTTP accepts POST /v1/traces, /v1/logs, /v1/metrics"
                );
                return error(
                    media,
                    Failure::new(StatusCode::NOT_FOUND, grpc_code::NOT_FOUND, msg),
                );
            }
        };
        let media = request_media(&req);
        let response = match self.export(req, signal).await {
            Ok((media, rejected)) => {
                if !rejected.is_empty() {
                    tracing::debug!("{}", rejected.message());
                }
                respond(
                    StatusCode::OK,
                    media,
                    export_response(signal, media, &rejected),
                )
            }
            Err(failure) => {
                tracing::debug!(status = %failure.status, "export refused: {}", failure.message);
                let allow = failure.status == StatusCode::METHOD_NOT_ALLOWED;
                let busy = failure.status == StatusCode::SERVICE_UNAVAILABLE;
                let mut r = error(media, failure);
                if allow {
                    r.headers_mut()
                        .insert(ALLOW, HeaderValue::from_static("POST"));
                }
                if busy {
                    r.headers_mut()
                        .insert(RETRY_AFTER, HeaderValue::from_static("1"));
                }
                r
            }
        };
        self.pipeline
            .metrics()
            .request(Transport::Http, signal, status_label(response.status()));
        response
    }

    async fn export(
        &self,
        req: Request<Incoming>,
        signal: Signal,
    ) -> Result<(MediaType, RejectionSummary), Failure> {
        if req.method() != Method::POST {
            return Err(Failure::new(
                StatusCode::METHOD_NOT_ALLOWED,
                grpc_code::UNIMPLEMENTED,
                format!("method {} not allowed: use POST", req.method()),
            ));
        }
        let header = |name| {
            req.headers()
                .get(name)
                .and_then(|v: &HeaderValue| v.to_str().ok())
        };
        let media = MediaType::from_header(header(CONTENT_TYPE)).ok_or_else(|| {
            Failure::new(
                StatusCode::UNSUPPORTED_MEDIA_TYPE,
                grpc_code::INVALID_ARGUMENT,
                format!(
                    "unsupported content type {:?}: use application/x-protobuf or application/json",
                    header(CONTENT_TYPE).unwrap_or("")
                ),
            )
        })?;
        let encoding = ContentEncoding::from_header(header(CONTENT_ENCODING)).ok_or_else(|| {
            Failure::new(
                StatusCode::UNSUPPORTED_MEDIA_TYPE,
                grpc_code::INVALID_ARGUMENT,
                format!(
                    "unsupported content encoding {:?}: use gzip, deflate, zstd or none",
                    header(CONTENT_ENCODING).unwrap_or("")
                ),
            )
        })?;
        let too_large = || {
            Failure::new(
                StatusCode::PAYLOAD_TOO_LARGE,
                grpc_code::RESOURCE_EXHAUSTED,
                format!(
                    "request body over limits.max_request_body_bytes ({} bytes)",
                    self.max_body_bytes
                ),
            )
        };
        let declared = header(CONTENT_LENGTH).and_then(|v| v.parse::<u64>().ok());
        if declared.is_some_and(|n| n > self.max_body_bytes as u64) {
            return Err(too_large());
        }
        let _permit = self.permits.try_acquire().map_err(|_| {
            Failure::new(
                StatusCode::SERVICE_UNAVAILABLE,
                grpc_code::UNAVAILABLE,
                "too many export requests in progress; retry shortly",
            )
        })?;
        // A client that stalls mid-body must not hold a permit (and memory) for ever.
        let body = tokio::time::timeout(
            BODY_READ_TIMEOUT,
            Limited::new(req.into_body(), self.max_body_bytes).collect(),
        )
        .await
        .map_err(|_| {
            Failure::new(
                StatusCode::REQUEST_TIMEOUT,
                grpc_code::UNAVAILABLE,
                format!("request body not received within {BODY_READ_TIMEOUT:?}"),
            )
        })?
        .map_err(|e| {
            if e.downcast_ref::<http_body_util::LengthLimitError>()
                .is_some()
            {
                too_large()
            } else {
                Failure::new(
                    StatusCode::BAD_REQUEST,
                    grpc_code::INVALID_ARGUMENT,
                    format!("reading body: {e}"),
                )
            }
        })?
        .to_bytes();
        let invalid = |e: DecodeError| match e {
            DecodeError::TooLarge { .. } => too_large(),
            DecodeError::Invalid(m) => {
                Failure::new(StatusCode::BAD_REQUEST, grpc_code::INVALID_ARGUMENT, m)
            }
        };
        let body = decompress(body, encoding, self.max_body_bytes).map_err(invalid)?;
        let rejected = match signal {
            Signal::Traces if media == MediaType::Protobuf => self
                .pipeline
                .traces_protobuf(&body, Transport::Http)
                .map_err(|m| invalid(DecodeError::Invalid(m)))?,
            Signal::Traces => {
                let request: ExportTraceServiceRequest = decode(&body, media).map_err(invalid)?;
                self.pipeline.traces(&request, Transport::Http)
            }
            Signal::Logs => {
                let request: ExportLogsServiceRequest = decode(&body, media).map_err(invalid)?;
                self.pipeline.logs(&request, Transport::Http)
            }
            // Accepted and discarded: SDKs and flowgen send every signal to one endpoint.
            Signal::Metrics => Ok(RejectionSummary::default()),
        };
        let rejected = rejected.map_err(|e| {
            Failure::new(
                StatusCode::SERVICE_UNAVAILABLE,
                grpc_code::UNAVAILABLE,
                e.to_string(),
            )
        })?;
        Ok((media, rejected))
    }
}

/// The media type to answer in: the request's, else protobuf.
fn request_media(req: &Request<Incoming>) -> MediaType {
    MediaType::from_header(
        req.headers()
            .get(CONTENT_TYPE)
            .and_then(|v| v.to_str().ok()),
    )
    .unwrap_or(MediaType::Protobuf)
}

fn error(media: MediaType, failure: Failure) -> HttpResponse {
    respond(
        failure.status,
        media,
        status_body(media, failure.code, &failure.message),
    )
}

fn respond(status: StatusCode, media: MediaType, body: Bytes) -> HttpResponse {
    let mut response = Response::new(Full::new(body));
    *response.status_mut() = status;
    response
        .headers_mut()
        .insert(CONTENT_TYPE, HeaderValue::from_static(media.content_type()));
    response
}

fn status_label(status: StatusCode) -> &'static str {
    match status.as_u16() {
        200 => "200",
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
