//! The metrics listener: `/metrics`, `/healthz`, `/readyz`, and the live overview page
//! at `/` with the JSON it polls at `/api/flows`.

mod body;
pub mod exposition;
pub mod objective_status;
pub mod overview;
pub mod shared;

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;

use bytes::Bytes;
use hyper::body::Incoming;
use hyper::header::{HeaderValue, ALLOW, CACHE_CONTROL, CONTENT_TYPE, RETRY_AFTER};
use hyper::{Method, Request, Response, StatusCode};

use crate::flows::CorrelationStore;
use crate::metrics::Metrics;
pub use body::SharedBody;
pub use overview::{flow_totals, FlowTotals, Overview};
use shared::{BodyError, BodyKey, SharedBodies};

/// What the metrics listener answers with.
pub type AdminResponse = Response<SharedBody>;

/// The overview page: one static file, plain JavaScript, nothing fetched from elsewhere.
const PAGE: &str = include_str!("overview.html");
/// Where the page carries its first data, so it shows numbers before its first poll.
const PAGE_DATA_SLOT: &str = "__FLOWMETRICS_INITIAL_DATA__";
/// The page may run its own inline script and style and fetch from this origin only.
const PAGE_CSP: &str = "default-src 'none'; script-src 'unsafe-inline'; \
style-src 'unsafe-inline'; connect-src 'self'; img-src 'self' data:; base-uri 'none'; \
form-action 'none'; frame-ancestors 'none'";

/// The metrics listener: `/metrics`, `/healthz`, `/readyz`, the overview page and `/api/flows`.
#[derive(Clone)]
pub struct Admin {
    /// What `/metrics` and the overview read.
    pub metrics: Arc<Metrics>,
    /// The correlation store, whose availability `/readyz` reports.
    pub store: Arc<dyn CorrelationStore>,
    /// Set once every listener is bound.
    pub ready: Arc<AtomicBool>,
    /// Per-flow history for the overview page.
    pub overview: Arc<Overview>,
    /// Bodies shared by concurrent requests, and their budget.
    pub bodies: Arc<SharedBodies>,
}

impl Admin {
    /// Answers one request to the metrics listener.
    pub async fn handle(self, req: Request<Incoming>) -> AdminResponse {
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
                let (format, gzip) = exposition::negotiate(req.headers());
                let key = BodyKey::Exposition { format, gzip };
                let (metrics, store) = (self.metrics.clone(), self.store.clone());
                let made = self
                    .bodies
                    .get(key, move || {
                        exposition::make_body(&metrics, store.entries(), format, gzip)
                    })
                    .await;
                match made {
                    Ok(body) if !body.is_empty() => exposition::answer(format, gzip, body),
                    Ok(_) => plain(
                        StatusCode::INTERNAL_SERVER_ERROR,
                        "the metrics could not be written; see the log\n",
                    ),
                    Err(e) => unavailable(e),
                }
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
                let overview = self.overview.clone();
                let made = self
                    .bodies
                    .get(BodyKey::Page, move || {
                        let data = overview::json_for_script(&overview.json());
                        PAGE.replacen(PAGE_DATA_SLOT, &data, 1).into_bytes()
                    })
                    .await;
                let body = match made {
                    Ok(body) => body,
                    Err(e) => return unavailable(e),
                };
                let mut r = respond(StatusCode::OK, "text/html; charset=utf-8", body);
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
                let overview = self.overview.clone();
                let made = self
                    .bodies
                    .get(BodyKey::Overview, move || overview.json().into_bytes())
                    .await;
                let mut r = match made {
                    Ok(body) => respond(StatusCode::OK, "application/json", body),
                    Err(e) => return unavailable(e),
                };
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

/// 503 with `Retry-After`: every place for a body is taken (or making it failed).
fn unavailable(e: BodyError) -> AdminResponse {
    let mut r = respond(
        StatusCode::SERVICE_UNAVAILABLE,
        "text/plain; charset=utf-8",
        Bytes::from(format!("{e}; retry shortly\n")),
    );
    r.headers_mut()
        .insert(RETRY_AFTER, HeaderValue::from_static("1"));
    r
}

fn plain(status: StatusCode, body: &'static str) -> AdminResponse {
    respond(
        status,
        "text/plain; charset=utf-8",
        Bytes::from_static(body.as_bytes()),
    )
}

fn respond(status: StatusCode, content_type: &str, body: Bytes) -> AdminResponse {
    let mut response = Response::new(SharedBody::new(body));
    *response.status_mut() = status;
    response.headers_mut().insert(
        CONTENT_TYPE,
        HeaderValue::from_str(content_type).expect("valid header"),
    );
    response
}
