//! The metrics listener: `/metrics`, `/healthz`, `/readyz`, and a landing page.

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;

use bytes::Bytes;
use http_body_util::Full;
use hyper::body::Incoming;
use hyper::header::{HeaderValue, ALLOW, CONTENT_TYPE};
use hyper::{Method, Request, Response, StatusCode};

use crate::flows::CorrelationStore;
use crate::metrics::Metrics;
use crate::server::HttpResponse;

const OPENMETRICS: &str = "application/openmetrics-text; version=1.0.0; charset=utf-8";

const LANDING: &str = "<!doctype html><html><head><title>flowmetrics</title></head><body>\
<h1>flowmetrics</h1><p>OpenTelemetry flow events in, Prometheus RED metrics out.</p>\
<ul><li><a href=\"/metrics\">/metrics</a></li><li><a href=\"/healthz\">/healthz</a></li>\
<li><a href=\"/readyz\">/readyz</a></li></ul></body></html>";

#[derive(Clone)]
pub struct Admin {
    pub metrics: Arc<Metrics>,
    pub store: Arc<dyn CorrelationStore>,
    /// Set once every listener is bound.
    pub ready: Arc<AtomicBool>,
}

impl Admin {
    pub async fn handle(self, req: Request<Incoming>) -> HttpResponse {
        if req.method() != Method::GET && req.method() != Method::HEAD {
            let mut r = plain(
                StatusCode::METHOD_NOT_ALLOWED,
                "only GET and HEAD are allowed\n",
            );
            r.headers_mut()
                .insert(ALLOW, HeaderValue::from_static("GET, HEAD"));
            return r;
        }
        match req.uri().path() {
            "/metrics" => {
                let body = self.metrics.encode(self.store.entries());
                respond(StatusCode::OK, OPENMETRICS, Bytes::from(body))
            }
            "/healthz" => plain(StatusCode::OK, "ok\n"),
            "/readyz" if self.ready.load(Ordering::Acquire) => plain(StatusCode::OK, "ready\n"),
            "/readyz" => plain(StatusCode::SERVICE_UNAVAILABLE, "starting\n"),
            "/" => respond(
                StatusCode::OK,
                "text/html; charset=utf-8",
                Bytes::from_static(LANDING.as_bytes()),
            ),
            _ => plain(StatusCode::NOT_FOUND, "not found: try /metrics\n"),
        }
    }
}

fn plain(status: StatusCode, body: &'static str) -> HttpResponse {
    respond(
        status,
        "text/plain; charset=utf-8",
        Bytes::from_static(body.as_bytes()),
    )
}

fn respond(status: StatusCode, content_type: &str, body: Bytes) -> HttpResponse {
    let mut response = Response::new(Full::new(body));
    *response.status_mut() = status;
    response.headers_mut().insert(
        CONTENT_TYPE,
        HeaderValue::from_str(content_type).expect("valid header"),
    );
    response
}
