//! flowmetrics: OpenTelemetry flow events in, Prometheus RED metrics per flow out.
//!
//! Data moves one way: [`ingest`] (HTTP, gRPC: decode, limits, answers) →
//! [`pipeline`] (walk requests) → [`flows`] (extract events, correlate) →
//! [`metrics`] (families, limits, exemplars) → [`admin`] (`/metrics`).
//! [`App`] wires it together; `main` and the integration tests both start it.

pub mod admin;
pub mod config;
pub mod flows;
pub mod ingest;
pub mod metrics;
pub mod pipeline;
pub mod server;

use std::net::SocketAddr;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::Duration;

use tokio::net::TcpListener;
use tokio::sync::watch;
use tokio::task::JoinHandle;

use crate::config::Config;
use crate::flows::table::{Maintenance, TableSettings};
use crate::flows::{Extractor, FlowTable};
use crate::metrics::Metrics;
use crate::pipeline::Pipeline;

/// How often the correlation table's housekeeping runs: time-outs are counted at most
/// this long (plus the time to report them) after their deadline.
const MAINTENANCE_INTERVAL: Duration = Duration::from_millis(100);

/// A configured, not yet started service.
pub struct App {
    config: Config,
}

/// A running service: its bound addresses, and the handle to stop it.
pub struct RunningApp {
    pub otlp_http: Option<SocketAddr>,
    pub otlp_grpc: Option<SocketAddr>,
    pub metrics: SocketAddr,
    pub pipeline: Arc<Pipeline>,
    shutdown: watch::Sender<bool>,
    tasks: Vec<JoinHandle<()>>,
    _maintenance: Maintenance,
}

impl App {
    pub fn new(config: Config) -> Self {
        Self { config }
    }

    /// Binds every listener, then serves until [`RunningApp::shutdown`].
    pub async fn start(self) -> std::io::Result<RunningApp> {
        let config = self.config;
        let metrics = Arc::new(Metrics::new(&config));
        let table = Arc::new(FlowTable::new(
            TableSettings::from_config(&config),
            metrics.clone(),
        ));
        let maintenance = Maintenance::start(table.clone(), MAINTENANCE_INTERVAL);
        let pipeline = Arc::new(
            Pipeline::new(Extractor::new(&config), table.clone(), metrics.clone())
                .with_network_flows(flows::network::NetworkFlows::new(&config)),
        );
        let ready = Arc::new(AtomicBool::new(false));
        let (shutdown, stop) = watch::channel(false);
        let mut tasks = Vec::new();

        let metrics_listener = bind(&config.listen.metrics, "listen.metrics").await?;
        let metrics_addr = metrics_listener.local_addr()?;
        let admin = admin::Admin {
            metrics: metrics.clone(),
            table: table.clone(),
            ready: ready.clone(),
        };
        tasks.push(tokio::spawn(server::serve(
            metrics_listener,
            move |req| admin.clone().handle(req),
            stop.clone(),
        )));
        tracing::info!("metrics: http://{metrics_addr}/metrics (also /healthz, /readyz)");

        let mut otlp_http = None;
        if !config.listen.otlp_http.is_empty() {
            let listener = bind(&config.listen.otlp_http, "listen.otlp_http").await?;
            let addr = listener.local_addr()?;
            let handler =
                ingest::http::OtlpHttp::new(pipeline.clone(), config.limits.max_request_body_bytes);
            tasks.push(tokio::spawn(server::serve(
                listener,
                move |req| handler.clone().handle(req),
                stop.clone(),
            )));
            tracing::info!("OTLP/HTTP: http://{addr}/v1/traces, /v1/logs, /v1/metrics");
            otlp_http = Some(addr);
        } else {
            tracing::info!("OTLP/HTTP: disabled (listen.otlp_http is empty)");
        }

        let mut otlp_grpc = None;
        if !config.listen.otlp_grpc.is_empty() {
            let listener = bind(&config.listen.otlp_grpc, "listen.otlp_grpc").await?;
            let addr = listener.local_addr()?;
            let handler =
                ingest::grpc::OtlpGrpc::new(pipeline.clone(), config.limits.max_request_body_bytes);
            tasks.push(tokio::spawn(server::serve(
                listener,
                move |req| handler.clone().handle(req),
                stop.clone(),
            )));
            tracing::info!("OTLP/gRPC: {addr} (TraceService, LogsService, MetricsService)");
            otlp_grpc = Some(addr);
        } else {
            tracing::info!("OTLP/gRPC: disabled (listen.otlp_grpc is empty)");
        }

        ready.store(true, Ordering::Release);
        Ok(RunningApp {
            otlp_http,
            otlp_grpc,
            metrics: metrics_addr,
            pipeline,
            shutdown,
            tasks,
            _maintenance: maintenance,
        })
    }
}

async fn bind(addr: &str, key: &str) -> std::io::Result<TcpListener> {
    TcpListener::bind(addr)
        .await
        .map_err(|e| std::io::Error::new(e.kind(), format!("cannot listen on {addr} ({key}): {e}")))
}

impl RunningApp {
    /// Stops accepting, lets requests in flight finish (bounded), and returns.
    pub async fn shutdown(self) {
        let _ = self.shutdown.send(true);
        for task in self.tasks {
            let _ = task.await;
        }
    }
}
