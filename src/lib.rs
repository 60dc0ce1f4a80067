//! flowmetrics: OpenTelemetry flow events in, Prometheus RED metrics per flow out.
//!
//! Data moves one way: [`ingest`] (HTTP, gRPC: decode, limits, answers) →
//! [`pipeline`] (walk requests) → [`flows`] (extract events, correlate in the moka
//! store) → [`metrics`] (prometheus-client families, limits, exemplars) → [`admin`]
//! (`/metrics`). Each stage imports only the stages before it and [`model`], the shared
//! vocabulary; [`config`] imports only [`model`]. [`App`] wires it together (with
//! [`settings`], which turns the config into each stage's settings); `main` and the
//! integration tests both start it.

pub mod admin;
pub mod config;
pub mod flows;
pub mod ingest;
pub mod metrics;
pub mod model;
pub mod pipeline;
pub mod server;
pub mod settings;

use std::net::SocketAddr;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::Duration;

use tokio::net::TcpListener;
use tokio::sync::watch;
use tokio::task::JoinHandle;

use crate::config::{Config, StoreKind};
use crate::flows::store::{Maintenance, RedisStore};
use crate::flows::{CorrelationStore, Extractor, MemoryStore};
use crate::metrics::Metrics;
use crate::pipeline::Pipeline;

/// How often the correlation store's housekeeping (moka's `run_pending_tasks`) runs:
/// time-outs are counted at most about this long after their deadline (plus up to ~1 s
/// for flows whose timeout is shorter than the longest one: moka's timer wheel).
const MAINTENANCE_INTERVAL: Duration = Duration::from_millis(20);

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
        let metrics = Arc::new(Metrics::new(settings::metrics(&config)));
        let store: Arc<dyn CorrelationStore> = match config.correlation.store {
            StoreKind::Memory => {
                Arc::new(MemoryStore::new(settings::store(&config), metrics.clone()))
            }
            StoreKind::Redis => Arc::new(
                RedisStore::new(
                    settings::store(&config),
                    settings::redis(&config),
                    metrics.clone(),
                    metrics.clone(),
                )
                .map_err(|e| std::io::Error::new(std::io::ErrorKind::InvalidInput, e))?,
            ),
        };
        let maintenance = Maintenance::start(store.clone(), MAINTENANCE_INTERVAL);
        let pipeline = Arc::new(Pipeline::new(
            Extractor::new(settings::extractor(&config)),
            store.clone(),
            metrics.clone(),
        ));
        let ready = Arc::new(AtomicBool::new(false));
        let (shutdown, stop) = watch::channel(false);
        let mut tasks = Vec::new();

        let metrics_listener = bind(&config.listen.metrics, "listen.metrics").await?;
        let metrics_addr = metrics_listener.local_addr()?;
        let entries = store.clone();
        let overview = admin::Overview::start(
            metrics.clone(),
            move || entries.entries(),
            admin::overview::SAMPLE_INTERVAL,
            stop.clone(),
        );
        let admin = admin::Admin {
            metrics: metrics.clone(),
            store: store.clone(),
            ready: ready.clone(),
            overview,
        };
        tasks.push(tokio::spawn(server::serve(
            metrics_listener,
            move |req| admin.clone().handle(req),
            stop.clone(),
        )));
        tracing::info!(
            "metrics: http://{metrics_addr}/metrics (also /healthz, /readyz; overview at /)"
        );

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

        // The metrics' clock and idle-series removal (limits.series_idle_timeout).
        {
            let metrics = metrics.clone();
            let mut stop = stop.clone();
            tasks.push(tokio::spawn(async move {
                let mut tick = tokio::time::interval(Duration::from_secs(1));
                tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Skip);
                loop {
                    tokio::select! {
                        _ = tick.tick() => metrics.housekeeping(),
                        _ = server::stopped(&mut stop) => break,
                    }
                }
            }));
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
