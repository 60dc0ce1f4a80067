//! The transport-only server of the ceiling row: the HTTP stack flowmetrics serves OTLP
//! with (hyper's HTTP/1.1 + h2c connection builder on a tokio runtime, started and
//! pinned to the server's core exactly as `flowmetrics` is), reading every request body
//! whole and answering 200 with an empty export response, decoding nothing.
//!
//! What it measures is what the loopback, the kernel's socket copies and hyper cost on
//! their own: no server that reads the bodies can go faster on this machine, so the
//! end-to-end rows are also given as a share of it.

use std::convert::Infallible;
use std::net::SocketAddr;

use bytes::Bytes;
use http_body_util::{BodyExt, Full};
use hyper::body::Incoming;
use hyper::{Request, Response, StatusCode};
use hyper_util::rt::{TokioExecutor, TokioIo};
use hyper_util::server::conn::auto;
use tokio::net::TcpListener;

/// Serves until killed (the harness's guard sends SIGTERM, then SIGKILL): OTLP/HTTP on
/// `FLOWMETRICS_LISTEN__OTLP_HTTP`, `/readyz` (and an empty `/metrics`) on
/// `FLOWMETRICS_LISTEN__METRICS`, as the harness starts `flowmetrics`.
pub fn serve_from_env() -> Result<(), String> {
    let addr = |var: &str| -> Result<SocketAddr, String> {
        std::env::var(var)
            .map_err(|_| format!("{var} is not set"))?
            .parse()
            .map_err(|e| format!("{var}: {e}"))
    };
    let (otlp, metrics) = (
        addr("FLOWMETRICS_LISTEN__OTLP_HTTP")?,
        addr("FLOWMETRICS_LISTEN__METRICS")?,
    );
    // The same runtime flowmetrics builds: multi-threaded, one worker per allowed core.
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
        .map_err(|e| e.to_string())?;
    runtime.block_on(async move {
        let otlp = TcpListener::bind(otlp).await.map_err(|e| e.to_string())?;
        let metrics = TcpListener::bind(metrics)
            .await
            .map_err(|e| e.to_string())?;
        tokio::spawn(accept_loop(metrics, false));
        accept_loop(otlp, true).await;
        Ok(())
    })
}

async fn accept_loop(listener: TcpListener, otlp: bool) {
    let builder = auto::Builder::new(TokioExecutor::new());
    loop {
        let Ok((stream, _)) = listener.accept().await else {
            continue;
        };
        let _ = stream.set_nodelay(true);
        let conn = builder
            .serve_connection(
                TokioIo::new(stream),
                hyper::service::service_fn(move |req| answer(req, otlp)),
            )
            .into_owned();
        tokio::spawn(conn);
    }
}

/// Reads the body whole (one contiguous buffer, as flowmetrics decodes from) and drops it.
async fn answer(req: Request<Incoming>, otlp: bool) -> Result<Response<Full<Bytes>>, Infallible> {
    let body = req.into_body().collect().await.map(|b| b.to_bytes());
    let status = match body {
        Ok(body) => {
            std::hint::black_box(&body);
            StatusCode::OK
        }
        Err(_) => StatusCode::BAD_REQUEST,
    };
    let mut response = Response::new(Full::new(Bytes::new()));
    *response.status_mut() = status;
    if otlp {
        response.headers_mut().insert(
            hyper::header::CONTENT_TYPE,
            hyper::header::HeaderValue::from_static("application/x-protobuf"),
        );
    }
    Ok(response)
}
