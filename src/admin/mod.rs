//! The metrics listener: `/metrics`, `/healthz`, `/readyz`, and the live overview page
//! at `/` with the JSON it polls at `/api/flows`.

pub mod objective_status;
pub mod overview;

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;

use bytes::Bytes;
use http_body_util::Full;
use hyper::body::Incoming;
use hyper::header::{HeaderValue, ALLOW, CACHE_CONTROL, CONTENT_TYPE};
use hyper::{Method, Request, Response, StatusCode};

use crate::flows::CorrelationStore;
use crate::metrics::Metrics;
use crate::server::HttpResponse;

pub use overview::{flow_totals, FlowTotals, Overview};

const OPENMETRICS: &str = "application/openmetrics-text; version=1.0.0; charset=utf-8";

/// The overview page: one static file, plain JavaScript, nothing fetched from elsewhere.
const PAGE: &str = include_str!("overview.html");
/// Where the page carries its first data, so it shows numbers before its first poll.
const PAGE_DATA_SLOT: &str = "__FLOWMETRICS_INITIAL_DATA__";
/// The page may run its own inline script and style and fetch from this origin only.
const PAGE_CSP: &str = "default-src 'none'; script-src 'unsafe-inline'; \
style-src 'unsafe-inline'; connect-src 'self'; img-src 'self' data:; base-uri 'none'; \
form-action 'none'; frame-ancestors 'none'";

#[derive(Clone)]
pub struct Admin {
    pub metrics: Arc<Metrics>,
    pub store: Arc<dyn CorrelationStore>,
    /// Set once every listener is bound.
    pub ready: Arc<AtomicBool>,
    /// Per-flow history for the overview page.
    pub overview: Arc<Overview>,
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
            "/readyz" if !self.store.available() => plain(
                StatusCode::SERVICE_UNAVAILABLE,
                "correlation store unavailable\n",
            ),
            "/readyz" if self.ready.load(Ordering::Acquire) => plain(StatusCode::OK, "ready\n"),
            "/readyz" => plain(
                StatusCode::SERVICE_UNAVAILABLE,
                "not ready: starting or shutting down\n",
            ),
            "/" => {
                let data = overview::json_for_script(&self.overview.json());
                let mut r = respond(
                    StatusCode::OK,
                    "text/html; charset=utf-8",
                    Bytes::from(PAGE.replacen(PAGE_DATA_SLOT, &data, 1)),
                );
                let headers = r.headers_mut();
                headers.insert(CACHE_CONTROL, HeaderValue::from_static("no-store"));
                headers.insert(
                    "content-security-policy",
                    HeaderValue::from_static(PAGE_CSP),
                );
                headers.insert(
                    "x-content-type-options",
                    HeaderValue::from_static("nosniff"),
                );
                r
            }
            "/api/flows" => {
                let mut r = respond(
                    StatusCode::OK,
                    "application/json",
                    Bytes::from(self.overview.json()),
                );
                r.headers_mut()
                    .insert(CACHE_CONTROL, HeaderValue::from_static("no-store"));
                r
            }
            _ => plain(
                StatusCode::NOT_FOUND,
                "not found: try /metrics, or / for the overview\n",
            ),
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
