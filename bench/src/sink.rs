//! The transport-only server of the ceiling row: flowmetrics' own accept loop and
//! connection handling (`flowmetrics::server::serve`, default limits) and its own body
//! reader (`Limits::read_body`), started and pinned to the server's core exactly as
//! `flowmetrics` is, answering 200 with an empty body and decoding nothing.
//!
//! What it measures is what the loopback, the kernel's socket copies and the HTTP stack
//! cost on their own: no server that reads the bodies this way goes faster on this
//! machine, so the rare row is also given as a share of it.

use std::net::SocketAddr;

use bytes::Bytes;
use flowmetrics::config::Config;
use flowmetrics::ingest::limits::Limits;
use flowmetrics::server::{serve, HttpResponse};
use http_body_util::Full;
use hyper::body::Incoming;
use hyper::header::{HeaderValue, CONTENT_LENGTH, CONTENT_TYPE};
use hyper::{Request, Response, StatusCode};
use tokio::net::TcpListener;
use tokio::sync::watch;

/// Serves until killed (the harness's guard sends SIGTERM, then SIGKILL): OTLP/HTTP on
/// `FLOWMETRICS_LISTEN__OTLP_HTTP`, `/readyz` (any path answers 200) on
/// `FLOWMETRICS_LISTEN__METRICS`, as the harness starts `flowmetrics`.
pub fn serve_from_env() -> Result<(), String> {
    let addr = |var: &str| -> Result<SocketAddr, String> {
        std::env::var(var)
            .map_err(|_| format!("{var} is not set"))?
            .parse()
            .map_err(|e| format!("{var}: {e}"))
    };
    let (otlp, admin) = (
        addr("FLOWMETRICS_LISTEN__OTLP_HTTP")?,
        addr("FLOWMETRICS_LISTEN__METRICS")?,
    );
    let settings = flowmetrics::settings::limits(&Config::default());
    let (conn, admin_conn) = (settings.conn_limits(), settings.admin_conn_limits());
    let limits = Limits::new(settings);
    // The same runtime flowmetrics builds: multi-threaded, one worker per allowed core.
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
        .map_err(|e| e.to_string())?;
    runtime.block_on(async move {
        let otlp = TcpListener::bind(otlp).await.map_err(|e| e.to_string())?;
        let admin = TcpListener::bind(admin).await.map_err(|e| e.to_string())?;
        // Never set: the process is killed.
        let (_stop, shutdown) = watch::channel(false);
        let ready = |_req: Request<Incoming>| async { respond(StatusCode::OK) };
        tokio::spawn(serve(admin, ready, admin_conn, shutdown.clone()));
        let read = move |req| read_and_drop(req, limits.clone());
        serve(otlp, read, conn, shutdown).await;
        Ok(())
    })
}

/// Reads the body as the OTLP handler does (one contiguous buffer, within the limits)
/// and drops it.
async fn read_and_drop(req: Request<Incoming>, limits: Limits) -> HttpResponse {
    let deadline = limits.deadline();
    let declared = req
        .headers()
        .get(CONTENT_LENGTH)
        .and_then(|v| v.to_str().ok()?.parse::<u64>().ok());
    let limit = limits.settings.max_body_bytes;
    let mut held = limits.hold();
    let mut body = req.into_body();
    let read = limits
        .read_body(&mut body, limit, declared, deadline, &mut held)
        .await;
    match read {
        Ok(body) => {
            std::hint::black_box(&body);
            respond(StatusCode::OK)
        }
        Err(_) => respond(StatusCode::BAD_REQUEST),
    }
}

fn respond(status: StatusCode) -> HttpResponse {
    let mut response = Response::new(Full::new(Bytes::new()));
    *response.status_mut() = status;
    response.headers_mut().insert(
        CONTENT_TYPE,
        HeaderValue::from_static("application/x-protobuf"),
    );
    response
}
