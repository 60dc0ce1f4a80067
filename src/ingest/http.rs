//! OTLP/HTTP: `POST /v1/traces`, `/v1/logs`, `/v1/metrics` (accepted, discarded).
//! Routing, media types, encodings, body limits and status codes (docs/behaviour.md §6).

use std::sync::Arc;

use bytes::Bytes;
use http_body_util::Full;
use hyper::body::Incoming;
use hyper::header::{
    HeaderValue, ALLOW, CONTENT_ENCODING, CONTENT_LENGTH, CONTENT_TYPE, EXPECT, RETRY_AFTER,
};
use hyper::{Method, Request, Response, StatusCode};
use opentelemetry_proto::tonic::collector::logs::v1::ExportLogsServiceRequest;
use opentelemetry_proto::tonic::collector::trace::v1::ExportTraceServiceRequest;

use super::decode::{decode, decompress_within, ContentEncoding, DecodeError, MediaType};
use super::limits::{Held, Limits, ReadError};
use super::reply::{export_response, grpc_code, status_body};
use super::store_refusal;
use crate::flows::store::StoreError;
use crate::model::{RejectionSummary, Signal, Transport};
use crate::pipeline::Pipeline;
use crate::server::HttpResponse;

#[derive(Clone)]
pub struct OtlpHttp {
    pipeline: Arc<Pipeline>,
    limits: Limits,
}

/// An error answer: status, gRPC-style code for the `google.rpc.Status` body, message,
/// and the `code` label it is counted under.
struct Failure {
    status: StatusCode,
    code: i32,
    message: String,
    label: &'static str,
    /// Refused for want of memory budget or a decode slot (logged as overload).
    overloaded: bool,
}

impl Failure {
    fn new(status: StatusCode, code: i32, message: impl Into<String>) -> Self {
        Self {
            status,
            code,
            message: message.into(),
            label: status_label(status),
            overloaded: false,
        }
    }

    /// The correlation store refused the export: logged as such, and retried.
    fn store(e: &StoreError) -> Self {
        Self::new(
            StatusCode::SERVICE_UNAVAILABLE,
            grpc_code::UNAVAILABLE,
            store_refusal("OTLP/HTTP", e),
        )
    }
}

/// How an answer is written: OTLP requests get a `google.rpc.Status` in their media
/// type, anything else plain text (a curl user reads it).
#[derive(Clone, Copy)]
enum Answer {
    Otlp(MediaType),
    Plain,
}

impl OtlpHttp {
    pub fn new(pipeline: Arc<Pipeline>, limits: Limits) -> Self {
        Self { pipeline, limits }
    }

    pub async fn handle(self, req: Request<Incoming>) -> HttpResponse {
        let deadline = self.limits.deadline();
        let media = MediaType::from_header(
            req.headers()
                .get(CONTENT_TYPE)
                .and_then(|v| v.to_str().ok()),
        );
        let answer = media.map_or(Answer::Plain, Answer::Otlp);
        let signal = match req.uri().path() {
            "/v1/traces" => Signal::Traces,
            "/v1/logs" => Signal::Logs,
            "/v1/metrics" => Signal::Metrics,
            path => {
                let msg = format!(
                    "no such path {path}: OTLP/HTTP accepts POST /v1/traces, /v1/logs, /v1/metrics"
                );
                tracing::debug!("export refused: {msg}");
                let failure = Failure::new(StatusCode::NOT_FOUND, grpc_code::NOT_FOUND, msg);
                return self.early(req, Answer::Plain, failure, deadline);
            }
        };
        let mut overloaded = false;
        let (response, label) = match self.export(req, signal, media, deadline).await {
            Ok((media, rejected)) => {
                if !rejected.is_empty() {
                    tracing::debug!("{}", rejected.message());
                }
                let body = export_response(signal, media, &rejected);
                (respond(StatusCode::OK, media, body), "200")
            }
            Err(failure) => {
                tracing::debug!(status = %failure.status, code = failure.label, "export refused: {}", failure.message);
                let label = failure.label;
                overloaded = failure.overloaded;
                let answer = if failure.status == StatusCode::METHOD_NOT_ALLOWED {
                    Answer::Plain
                } else {
                    answer
                };
                (error(answer, failure), label)
            }
        };
        if overloaded {
            self.limits.note_overload("OTLP/HTTP");
        }
        self.pipeline
            .metrics()
            .request(Transport::Http, signal, label);
        response
    }

    /// An answer before the body was read: what the client still sends is read and
    /// discarded (bounded) so that it sees the answer.
    fn early(
        &self,
        req: Request<Incoming>,
        answer: Answer,
        failure: Failure,
        deadline: tokio::time::Instant,
    ) -> HttpResponse {
        self.linger(req, deadline);
        error(answer, failure)
    }

    fn linger(&self, req: Request<Incoming>, deadline: tokio::time::Instant) {
        // A client waiting for `100 Continue` has sent nothing: reading would invite it.
        if req.headers().contains_key(EXPECT) {
            return;
        }
        self.limits.linger(req.into_body(), deadline);
    }

    async fn export(
        &self,
        req: Request<Incoming>,
        signal: Signal,
        media: Option<MediaType>,
        deadline: tokio::time::Instant,
    ) -> Result<(MediaType, RejectionSummary), Failure> {
        if req.method() != Method::POST {
            let failure = Failure::new(
                StatusCode::METHOD_NOT_ALLOWED,
                grpc_code::UNIMPLEMENTED,
                format!("method {} not allowed: use POST", req.method()),
            );
            self.linger(req, deadline);
            return Err(failure);
        }
        let header = |name| {
            req.headers()
                .get(name)
                .and_then(|v: &HeaderValue| v.to_str().ok())
        };
        let Some(media) = media else {
            let failure = Failure::new(
                StatusCode::UNSUPPORTED_MEDIA_TYPE,
                grpc_code::INVALID_ARGUMENT,
                format!(
                    "unsupported content type {:?}: use application/x-protobuf or application/json",
                    header(CONTENT_TYPE).unwrap_or("")
                ),
            );
            self.linger(req, deadline);
            return Err(failure);
        };
        let Some(encoding) = ContentEncoding::from_header(header(CONTENT_ENCODING)) else {
            let failure = Failure::new(
                StatusCode::UNSUPPORTED_MEDIA_TYPE,
                grpc_code::INVALID_ARGUMENT,
                format!(
                    "unsupported content encoding {:?}: use gzip, deflate, zstd or none",
                    header(CONTENT_ENCODING).unwrap_or("")
                ),
            );
            self.linger(req, deadline);
            return Err(failure);
        };
        let declared = header(CONTENT_LENGTH).and_then(|v| v.parse::<u64>().ok());
        let limit = self.limits.settings.max_body_bytes;
        let mut held = self.limits.hold();
        let mut body = req.into_body();
        let read = self
            .limits
            .read_body(&mut body, limit, declared, deadline, &mut held)
            .await;
        let body = match read {
            Ok(bytes) => bytes,
            Err(e) => {
                let failure = read_failure(e, limit);
                if matches!(
                    failure.status,
                    StatusCode::PAYLOAD_TOO_LARGE | StatusCode::SERVICE_UNAVAILABLE
                ) {
                    self.limits.linger(body, deadline);
                }
                return Err(failure);
            }
        };
        let pipeline = self.pipeline.clone();
        self.limits
            .decode(deadline, move || {
                decode_export(&pipeline, signal, media, encoding, body, limit, held)
            })
            .await
            .unwrap_or_else(|| Err(busy()))
            .map(|rejected| (media, rejected))
    }
}

/// One request body decoded and answered as the handler does, without a connection
/// (for the fuzz targets): the answer's status and body.
#[doc(hidden)]
pub fn answer_body(
    pipeline: &Pipeline,
    limits: &Limits,
    path: &str,
    content_type: Option<&str>,
    content_encoding: Option<&str>,
    body: Bytes,
) -> (StatusCode, Bytes) {
    let signal = match path {
        "/v1/traces" => Signal::Traces,
        "/v1/logs" => Signal::Logs,
        "/v1/metrics" => Signal::Metrics,
        _ => return (StatusCode::NOT_FOUND, Bytes::new()),
    };
    let Some(media) = MediaType::from_header(content_type) else {
        return (StatusCode::UNSUPPORTED_MEDIA_TYPE, Bytes::new());
    };
    let Some(encoding) = ContentEncoding::from_header(content_encoding) else {
        return (StatusCode::UNSUPPORTED_MEDIA_TYPE, Bytes::new());
    };
    let limit = limits.settings.max_body_bytes;
    if body.len() > limit {
        return (StatusCode::PAYLOAD_TOO_LARGE, Bytes::new());
    }
    match decode_export(
        pipeline,
        signal,
        media,
        encoding,
        body,
        limit,
        limits.hold(),
    ) {
        Ok(rejected) => (StatusCode::OK, export_response(signal, media, &rejected)),
        Err(f) => (f.status, status_body(media, f.code, &f.message)),
    }
}

/// Decompresses, decodes and counts one export (on the blocking pool).
fn decode_export(
    pipeline: &Pipeline,
    signal: Signal,
    media: MediaType,
    encoding: ContentEncoding,
    body: Bytes,
    limit: usize,
    mut held: Held,
) -> Result<RejectionSummary, Failure> {
    let invalid = |e: DecodeError| match e {
        DecodeError::TooLarge { .. } => too_large(limit),
        DecodeError::Busy => busy(),
        DecodeError::Invalid(m) => {
            Failure::new(StatusCode::BAD_REQUEST, grpc_code::INVALID_ARGUMENT, m)
        }
    };
    let body = decompress_within(body, encoding, limit, &mut |n| held.take(n)).map_err(invalid)?;
    // Decoded messages take about what their bytes took: paid for as such.
    let structs = media == MediaType::Json || signal == Signal::Logs;
    if structs && !held.take(body.len()) {
        return Err(busy());
    }
    let rejected = match signal {
        Signal::Traces if media == MediaType::Protobuf => pipeline
            .traces_protobuf(&body, Transport::Http)
            .map_err(|m| invalid(DecodeError::Invalid(m)))?,
        Signal::Traces => {
            let request: ExportTraceServiceRequest = decode(&body, media).map_err(invalid)?;
            pipeline.traces(&request, Transport::Http)
        }
        Signal::Logs => {
            let request: ExportLogsServiceRequest = decode(&body, media).map_err(invalid)?;
            pipeline.logs(&request, Transport::Http)
        }
        // Accepted and discarded: SDKs and flowgen send every signal to one endpoint.
        Signal::Metrics => Ok(RejectionSummary::default()),
    };
    drop(held);
    rejected.map_err(|e| Failure::store(&e))
}

fn too_large(limit: usize) -> Failure {
    Failure::new(
        StatusCode::PAYLOAD_TOO_LARGE,
        grpc_code::RESOURCE_EXHAUSTED,
        format!("request body over limits.max_request_body_bytes ({limit} bytes)"),
    )
}

fn busy() -> Failure {
    Failure {
        overloaded: true,
        ..Failure::new(
            StatusCode::SERVICE_UNAVAILABLE,
            grpc_code::UNAVAILABLE,
            "overloaded: request bodies in memory are at limits.max_buffered_bytes; retry shortly",
        )
    }
}

fn read_failure(e: ReadError, limit: usize) -> Failure {
    match e {
        ReadError::TooLarge => too_large(limit),
        ReadError::Busy => busy(),
        ReadError::Timeout => Failure::new(
            StatusCode::REQUEST_TIMEOUT,
            grpc_code::UNAVAILABLE,
            "request body not received within limits.request_read_timeout",
        ),
        ReadError::Canceled => Failure {
            label: "canceled",
            ..Failure::new(
                StatusCode::BAD_REQUEST,
                grpc_code::CANCELLED,
                "the client closed the request",
            )
        },
        ReadError::Invalid(m) => {
            Failure::new(StatusCode::BAD_REQUEST, grpc_code::INVALID_ARGUMENT, m)
        }
    }
}

fn error(answer: Answer, failure: Failure) -> HttpResponse {
    let mut r = match answer {
        Answer::Otlp(media) => respond(
            failure.status,
            media,
            status_body(media, failure.code, &failure.message),
        ),
        Answer::Plain => {
            let mut r = Response::new(Full::new(Bytes::from(format!("{}\n", failure.message))));
            *r.status_mut() = failure.status;
            r.headers_mut().insert(
                CONTENT_TYPE,
                HeaderValue::from_static("text/plain; charset=utf-8"),
            );
            r
        }
    };
    if failure.status == StatusCode::METHOD_NOT_ALLOWED {
        r.headers_mut()
            .insert(ALLOW, HeaderValue::from_static("POST"));
    }
    if failure.status == StatusCode::SERVICE_UNAVAILABLE {
        r.headers_mut()
            .insert(RETRY_AFTER, HeaderValue::from_static("1"));
    }
    r
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
