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
use super::limits::{Held, Limits};
use super::reply::{export_response, status_body, Refusal};
use crate::model::{RejectionSummary, Signal, Transport};
use crate::pipeline::Pipeline;
use crate::server::HttpResponse;

/// The OTLP/HTTP endpoints: `POST /v1/traces`, `/v1/logs` and `/v1/metrics`.
#[derive(Clone)]
pub struct OtlpHttp {
    pipeline: Arc<Pipeline>,
    limits: Limits,
}

/// How an answer is written: OTLP requests get a `google.rpc.Status` in their media
/// type, anything else plain text (a curl user reads it).
#[derive(Clone, Copy)]
enum Answer {
    Otlp(MediaType),
    Plain,
}

impl OtlpHttp {
    /// Serves exports into `pipeline`, under `limits`.
    pub fn new(pipeline: Arc<Pipeline>, limits: Limits) -> Self {
        Self { pipeline, limits }
    }

    /// Answers one HTTP request.
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
                let refusal = Refusal::NoSuchPath(path.to_string());
                tracing::debug!("export refused: {refusal}");
                return self.early(req, Answer::Plain, &refusal, deadline);
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
            Err(refusal) => {
                let (status, label) = (refusal.http_status(), refusal.http_label());
                tracing::debug!(status = %status, code = label, "export refused: {refusal}");
                refusal.log("OTLP/HTTP");
                overloaded = refusal.is_overload();
                let answer = if status == StatusCode::METHOD_NOT_ALLOWED {
                    Answer::Plain
                } else {
                    answer
                };
                (error(answer, &refusal), label)
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
        refusal: &Refusal,
        deadline: tokio::time::Instant,
    ) -> HttpResponse {
        self.linger(req, deadline);
        error(answer, refusal)
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
    ) -> Result<(MediaType, RejectionSummary), Refusal> {
        let header = |name| {
            req.headers()
                .get(name)
                .and_then(|v: &HeaderValue| v.to_str().ok())
        };
        let header_text = |name| header(name).unwrap_or("").to_string();
        let checked = if req.method() != Method::POST {
            Err(Refusal::MethodNotAllowed(req.method().to_string()))
        } else if let Some(media) = media {
            ContentEncoding::from_header(header(CONTENT_ENCODING))
                .map(|encoding| (media, encoding))
                .ok_or_else(|| Refusal::ContentEncoding(header_text(CONTENT_ENCODING)))
        } else {
            Err(Refusal::ContentType(header_text(CONTENT_TYPE)))
        };
        let (media, encoding) = match checked {
            Ok(checked) => checked,
            Err(refusal) => {
                self.linger(req, deadline);
                return Err(refusal);
            }
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
                let refusal = Refusal::read(e, Transport::Http, limit);
                if matches!(refusal, Refusal::TooLarge { .. } | Refusal::Busy(_)) {
                    self.limits.linger(body, deadline);
                }
                return Err(refusal);
            }
        };
        let pipeline = self.pipeline.clone();
        let inline = Limits::decodes_inline(
            body.len(),
            encoding != ContentEncoding::Identity,
            pipeline.store().blocks(),
        );
        self.limits
            .decode(deadline, inline, move || {
                decode_export(&pipeline, signal, media, encoding, body, limit, held)
            })
            .await
            .unwrap_or(Err(Refusal::Busy(Transport::Http)))
            .map(|rejected| (media, rejected))
    }
}

/// One request body decoded and answered as the handler does, without a connection
/// (for the fuzz targets): the answer's status and body.
#[cfg(feature = "test-hooks")]
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
        Err(refusal) => (
            refusal.http_status(),
            status_body(media, refusal.grpc_code(), &refusal.to_string()),
        ),
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
) -> Result<RejectionSummary, Refusal> {
    let invalid = |e: DecodeError| Refusal::decode(e, Transport::Http);
    let body = decompress_within(body, encoding, limit, &mut |n| held.take(n)).map_err(invalid)?;
    // Decoded messages take about what their bytes took: paid for as such.
    let structs = media == MediaType::Json || signal == Signal::Logs;
    if structs && !held.take(body.len()) {
        return Err(Refusal::Busy(Transport::Http));
    }
    Ok(match signal {
        Signal::Traces if media == MediaType::Protobuf => {
            pipeline.traces_protobuf(&body, Transport::Http)?
        }
        Signal::Traces => {
            let request: ExportTraceServiceRequest = decode(&body, media).map_err(invalid)?;
            pipeline.traces(&request, Transport::Http)?
        }
        Signal::Logs => {
            let request: ExportLogsServiceRequest = decode(&body, media).map_err(invalid)?;
            pipeline.logs(&request, Transport::Http)?
        }
        // Accepted and discarded: SDKs and flowgen send every signal to one endpoint.
        Signal::Metrics => RejectionSummary::default(),
    })
}

fn error(answer: Answer, refusal: &Refusal) -> HttpResponse {
    let status = refusal.http_status();
    let message = refusal.to_string();
    let mut r = match answer {
        Answer::Otlp(media) => respond(
            status,
            media,
            status_body(media, refusal.grpc_code(), &message),
        ),
        Answer::Plain => {
            let mut r = Response::new(Full::new(Bytes::from(format!("{message}\n"))));
            *r.status_mut() = status;
            r.headers_mut().insert(
                CONTENT_TYPE,
                HeaderValue::from_static("text/plain; charset=utf-8"),
            );
            r
        }
    };
    if status == StatusCode::METHOD_NOT_ALLOWED {
        r.headers_mut()
            .insert(ALLOW, HeaderValue::from_static("POST"));
    }
    if status == StatusCode::SERVICE_UNAVAILABLE {
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
