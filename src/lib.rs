//! flowmetrics: OpenTelemetry flow events in, Prometheus RED metrics per flow out.
//!
//! Data moves one way: [`ingest`] (HTTP, gRPC: limits, decompression, answers) →
//! [`pipeline`] (the one entry both transports call) → [`flows`] (walk the request once,
//! extract flow events, correlate them in the store) → [`metrics`] (prometheus-client
//! families, limits, exemplars) → [`admin`] (`/metrics`). [`flows`] imports only
//! [`model`], the shared vocabulary (and [`logging`]'s rate-limited warning); [`metrics`]
//! implements the sinks [`flows`] reports to; [`pipeline`] joins the two; [`ingest`]
//! calls [`pipeline`] and maps every stage's error to its answer
//! ([`ingest::reply::Refusal`]); [`config`] imports only [`model`].
//! [`App`] wires it together (with [`settings`], which turns the config into each
//! stage's settings); `main` and the integration tests both start it. Around the
//! process: [`logging`] (a log writer that never blocks, and the one rate-limited
//! warning), [`signals`], and [`config_checks`] (what the config file and log filter
//! must be before they are used).

pub mod admin;
pub mod config;
pub mod config_checks;
pub mod flows;
pub mod ingest;
pub mod logging;
pub mod metrics;
pub mod model;
pub mod pipeline;
pub mod probe;
pub mod server;
pub mod settings;
pub mod signals;

use std::net::SocketAddr;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::Duration;

use tokio::sync::watch;
use tokio::task::JoinHandle;

use crate::config::{Config, StoreKind};
use crate::flows::state::{self, Checkpointer, DimLabels, StateSettings};
use crate::flows::store::redis::RedisSetupError;
use crate::flows::store::{Maintenance, RedisStore};
use crate::flows::{CorrelationStore, Extractor, MemoryStore, RestoreRules};
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
    /// Where OTLP/HTTP is served; `None` when `listen.otlp_http` is empty.
    pub otlp_http: Option<SocketAddr>,
    /// Where OTLP/gRPC is served; `None` when `listen.otlp_grpc` is empty.
    pub otlp_grpc: Option<SocketAddr>,
    /// Where `/metrics` (and `/healthz`, `/readyz`, the overview) is served.
    pub metrics: SocketAddr,
    /// The stages after the transports: its metrics and its correlation store.
    pub pipeline: Arc<Pipeline>,
    /// Stops the OTLP listeners.
    shutdown: watch::Sender<bool>,
    tasks: Vec<JoinHandle<()>>,
    /// Stops the metrics listener, last.
    stop_admin: watch::Sender<bool>,
    admin_task: JoinHandle<()>,
    ready: Arc<AtomicBool>,
    store: Arc<dyn CorrelationStore>,
    state: Option<(StateSettings, DimLabels)>,
    final_scrape_wait: Duration,
    maintenance: Maintenance,
    checkpointer: Option<Checkpointer>,
    registry: Arc<Metrics>,
}

/// Why [`App::start`] could not start the service (the binary exits 1 with its message).
#[derive(Debug, thiserror::Error)]
pub enum StartError {
    /// A listener's address could not be bound (in use, not local, no permission).
    #[error("cannot listen on {addr} ({key}): {source}")]
    Listen {
        /// The address as configured.
        addr: String,
        /// Its config key (`listen.otlp_http`, `listen.otlp_grpc`, `listen.metrics`).
        key: &'static str,
        /// What binding said.
        source: std::io::Error,
    },
    /// A bound listener's own address could not be read.
    #[error("cannot read a bound listener's address: {0}")]
    ListenerAddress(std::io::Error),
    /// The shared correlation store could not be set up from its configuration.
    #[error(transparent)]
    Store(#[from] RedisSetupError),
    /// The thread that writes state-file checkpoints could not be started.
    #[error("cannot start the state checkpoint thread: {0}")]
    Checkpointer(std::io::Error),
}

impl App {
    /// A service that will run with `config`.
    pub fn new(config: Config) -> Self {
        Self { config }
    }

    /// Binds every listener, then serves until [`RunningApp::shutdown`].
    pub async fn start(self) -> Result<RunningApp, StartError> {
        let config = self.config;
        let metrics = Arc::new(Metrics::new(settings::metrics(&config)));
        let rules = settings::restore_rules(&config);
        let mut state = settings::state(&config);
        let store = correlation_store(&config, &metrics, &rules, &mut state)?;
        let labels = |dims: &[(String, Arc<str>)]| dims.iter().map(|(l, _)| l.clone()).collect();
        let state = state.map(|st| (st, (labels(&rules.start_dims), labels(&rules.end_dims))));
        let checkpointer = start_checkpointer(&store, state.as_ref(), &metrics)?;
        let maintenance = Maintenance::start(store.clone(), MAINTENANCE_INTERVAL);
        let pipeline = build_pipeline(&config, &metrics, &store);
        let limits = ingest::limits::Limits::new(settings::limits(&config));
        let ready = Arc::new(AtomicBool::new(false));
        let (shutdown, stop) = watch::channel(false);
        // The metrics listener outlives the OTLP ones (shutdown.final_scrape_wait).
        let (stop_admin, admin_stop) = watch::channel(false);
        let metrics_listener = server::bind(&config.listen.metrics, "listen.metrics").await?;
        let overview = admin::Overview::start(
            metrics.clone(),
            admin::overview::SAMPLE_INTERVAL,
            stop.clone(),
        );
        let admin = admin::Admin {
            metrics: metrics.clone(),
            store: store.clone(),
            ready: ready.clone(),
            overview,
            bodies: Arc::new(admin::shared::SharedBodies::default()),
        };
        let (metrics_addr, admin_task) = server::spawn(
            metrics_listener,
            move |req| admin.clone().handle(req),
            limits.settings.admin_conn_limits(),
            admin_stop,
        )?;
        tracing::info!(
            "metrics: http://{metrics_addr}/metrics (also /healthz, /readyz; overview at /)"
        );
        let mut otlp = Listeners {
            limits: limits.settings.conn_limits(),
            stop: stop.clone(),
            tasks: Vec::new(),
        };
        let http = ingest::http::OtlpHttp::new(pipeline.clone(), limits.clone());
        let grpc = ingest::grpc::OtlpGrpc::new(pipeline.clone(), limits.clone());
        let otlp_http = otlp
            .serve(&OTLP_HTTP, &config.listen.otlp_http, move |req| {
                http.clone().handle(req)
            })
            .await?;
        let otlp_grpc = otlp
            .serve(&OTLP_GRPC, &config.listen.otlp_grpc, move |req| {
                grpc.clone().handle(req)
            })
            .await?;
        let mut tasks = otlp.tasks;
        tasks.push(spawn_housekeeping(metrics.clone(), stop));

        ready.store(true, Ordering::Release);
        Ok(RunningApp {
            otlp_http,
            otlp_grpc,
            metrics: metrics_addr,
            pipeline,
            shutdown,
            tasks,
            stop_admin,
            admin_task,
            ready,
            store,
            state,
            final_scrape_wait: config.shutdown.final_scrape_wait,
            maintenance,
            checkpointer,
            registry: metrics,
        })
    }
}

/// Writes the state file every `state.checkpoint_interval`, when there is one.
fn start_checkpointer(
    store: &Arc<dyn CorrelationStore>,
    state: Option<&(StateSettings, DimLabels)>,
    metrics: &Arc<Metrics>,
) -> Result<Option<Checkpointer>, StartError> {
    let Some((st, labels)) = state else {
        return Ok(None);
    };
    let metrics = metrics.clone();
    Checkpointer::start(store.clone(), st.clone(), labels.clone(), move || {
        metrics.state_write_failed(false);
    })
    .map(Some)
    .map_err(StartError::Checkpointer)
}

/// The stages after the transports: extraction, the store, the metrics.
fn build_pipeline(
    config: &Config,
    metrics: &Arc<Metrics>,
    store: &Arc<dyn CorrelationStore>,
) -> Arc<Pipeline> {
    // Both extraction stages count the label values they cut where /metrics shows them.
    let label_values = settings::label_bound(config, metrics.label_cuts());
    let mut extractor = settings::extractor(config);
    extractor.label_values = label_values.clone();
    let mut network = settings::network_flows(config);
    if let Some(network) = &mut network {
        network.label_values = label_values;
    }
    Arc::new(
        Pipeline::new(Extractor::new(extractor), store.clone(), metrics.clone())
            .with_network_flows(flows::network::NetworkFlows::new(network)),
    )
}

/// An OTLP listener as the log names it.
struct Listener {
    name: &'static str,
    /// Its config key.
    key: &'static str,
    /// What is served at the bound address.
    served: fn(SocketAddr) -> String,
}

const OTLP_HTTP: Listener = Listener {
    name: "OTLP/HTTP",
    key: "listen.otlp_http",
    served: |addr| format!("http://{addr}/v1/traces, /v1/logs, /v1/metrics"),
};

const OTLP_GRPC: Listener = Listener {
    name: "OTLP/gRPC",
    key: "listen.otlp_grpc",
    served: |addr| format!("{addr} (TraceService, LogsService, MetricsService)"),
};

/// The OTLP listeners: their connection limits, the signal that stops them, and the
/// tasks serving them.
struct Listeners {
    limits: server::ConnLimits,
    stop: watch::Receiver<bool>,
    tasks: Vec<JoinHandle<()>>,
}

impl Listeners {
    /// Serves `handler` on `addr`; `None` when `addr` is empty (the listener is off).
    async fn serve<H, F, B>(
        &mut self,
        listener: &Listener,
        addr: &str,
        handler: H,
    ) -> Result<Option<SocketAddr>, StartError>
    where
        H: Fn(hyper::Request<hyper::body::Incoming>) -> F + Clone + Send + Sync + 'static,
        F: std::future::Future<Output = hyper::Response<B>> + Send + 'static,
        B: hyper::body::Body + Send + Unpin + 'static,
        B::Data: Send,
        B::Error: Into<Box<dyn std::error::Error + Send + Sync>>,
    {
        let Listener { name, key, served } = listener;
        if addr.is_empty() {
            tracing::info!("{name}: disabled ({key} is empty)");
            return Ok(None);
        }
        let socket = server::bind(addr, key).await?;
        let (bound, task) = server::spawn(socket, handler, self.limits, self.stop.clone())?;
        self.tasks.push(task);
        tracing::info!("{name}: {}", served(bound));
        Ok(Some(bound))
    }
}

/// The metrics' clock and idle-series removal (limits.series_idle_timeout), once a
/// second until `stop`.
fn spawn_housekeeping(metrics: Arc<Metrics>, mut stop: watch::Receiver<bool>) -> JoinHandle<()> {
    tokio::spawn(async move {
        let mut tick = tokio::time::interval(Duration::from_secs(1));
        tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Skip);
        loop {
            tokio::select! {
                _ = tick.tick() => metrics.housekeeping(),
                _ = server::stopped(&mut stop) => break,
            }
        }
    })
}

/// The correlation store the config asks for: moka in process (with what the state
/// file held, if any), or Redis shared by several replicas (which keeps open flows
/// itself: `state` is dropped with a warning).
fn correlation_store(
    config: &Config,
    metrics: &Arc<Metrics>,
    rules: &RestoreRules,
    state: &mut Option<StateSettings>,
) -> Result<Arc<dyn CorrelationStore>, StartError> {
    match config.correlation.store {
        StoreKind::Memory => {
            let mut memory = MemoryStore::new(settings::store(config), metrics.clone());
            if let Some(overdue) = settings::overdue(config) {
                memory = memory.track_open_ages(overdue);
            }
            if let Some(st) = state.as_ref() {
                match state::load_or_set_aside(&st.path, st.max_file_bytes) {
                    Some(snapshot) => {
                        let r = memory.restore(snapshot, rules);
                        tracing::info!(
                            open = r.open,
                            waiting_ends = r.waiting,
                            timed_out_while_down = r.expired,
                            ends_timed_out_while_down = r.expired_ends,
                            dropped_config_changed = r.discarded,
                            "state restored from {}",
                            st.path.display()
                        );
                    }
                    None => tracing::info!(
                        "state file {}: nothing to restore, starting with no open flows",
                        st.path.display()
                    ),
                }
            }
            Ok(Arc::new(memory))
        }
        StoreKind::Redis => {
            if state.take().is_some() {
                tracing::warn!(
                    "state.path is not used with correlation.store: redis (open flows are kept in Redis)"
                );
            }
            let mut redis = RedisStore::new(
                settings::store(config),
                settings::redis(config),
                metrics.clone(),
                metrics.clone(),
            )?;
            if let Some(overdue) = settings::overdue(config) {
                redis = redis.track_open_ages(overdue);
            }
            Ok(Arc::new(redis))
        }
    }
}

impl RunningApp {
    /// Writes a checkpoint of the state file now; `false` when there is no state file.
    pub fn checkpoint_now(&self) -> bool {
        match &self.checkpointer {
            Some(c) => {
                c.checkpoint_now();
                true
            }
            None => false,
        }
    }

    /// docs/behaviour.md §7: not ready at once; the OTLP listeners stop accepting and let requests in
    /// flight finish (bounded); the state file is written; `/metrics` answers for
    /// `shutdown.final_scrape_wait` more; then it returns.
    pub async fn shutdown(self) {
        self.ready.store(false, Ordering::Release);
        let _ = self.shutdown.send(true);
        for task in self.tasks {
            let _ = task.await;
        }
        let (store, state) = (self.store, self.state);
        let (maintenance, checkpointer) = (self.maintenance, self.checkpointer);
        let metrics = self.registry.clone();
        // Joining threads and writing the file block: off the runtime's workers.
        let _ = tokio::task::spawn_blocking(move || {
            drop(checkpointer);
            // After the last housekeeping, what the store holds only here is written out.
            drop(maintenance);
            store.shutdown();
            // What is in the file is the next run's to count; what is already due is
            // counted now (final_snapshot), so each instance is counted once.
            let Some((st, labels)) = state else { return };
            match state::save_final(&*store, &st.path, &labels) {
                Ok(Some(saved)) => saved.log(&st.path, true),
                Ok(None) => {}
                Err(e) => {
                    metrics.state_write_failed(true);
                    tracing::error!(
                        entries = store.entries(),
                        "cannot write the state file {}: {e}; these open flows are lost",
                        st.path.display()
                    );
                    state::set_aside_stale(&st.path);
                }
            }
        })
        .await;
        if !self.final_scrape_wait.is_zero() {
            tracing::info!(
                "OTLP stopped; /metrics answers for {} more (shutdown.final_scrape_wait)",
                humantime::format_duration(self.final_scrape_wait)
            );
            tokio::time::sleep(self.final_scrape_wait).await;
        }
        let _ = self.stop_admin.send(true);
        let _ = self.admin_task.await;
    }
}
