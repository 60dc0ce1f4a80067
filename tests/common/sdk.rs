//! OpenTelemetry Rust SDK clients (`opentelemetry_sdk` providers with the
//! `opentelemetry-otlp` HTTP/protobuf and gRPC/tonic exporters) pointed at a flowmetrics.
//!
//! The SDK's batch processors export from their own threads and `force_flush` blocks until
//! the export is answered, so flushes run on the blocking pool of a multi-thread runtime.

use std::net::SocketAddr;
use std::time::{Duration, SystemTime};

use async_trait::async_trait;
use flowmetrics::RunningApp;
use opentelemetry::trace::{Span as _, Status, Tracer as _, TracerProvider as _};
use opentelemetry::KeyValue;
use opentelemetry_http::hyper::HyperClient;
use opentelemetry_http::{Bytes, HttpClient, HttpError, Request, Response};
use opentelemetry_otlp::{Protocol, WithExportConfig as _, WithHttpConfig as _};
use opentelemetry_sdk::logs::SdkLoggerProvider;
use opentelemetry_sdk::trace::SdkTracerProvider;
use opentelemetry_sdk::Resource;

/// The library's own transport type: the tests name exporters by it.
pub use flowmetrics::model::Transport;

/// What the tests need of a transport beyond its label.
pub trait TransportExt {
    /// How `flowmetrics_otlp_requests_total` spells success on this transport.
    fn ok_code(self) -> &'static str;
}

impl TransportExt for Transport {
    fn ok_code(self) -> &'static str {
        match self {
            Transport::Http => "200",
            Transport::Grpc => "OK",
        }
    }
}

/// The batch processors export from a thread of their own, outside any Tokio runtime; the
/// SDK's Hyper client needs one, so each request runs as a task on the test's runtime.
#[derive(Debug)]
struct RuntimeHyperClient {
    inner: HyperClient,
    runtime: tokio::runtime::Handle,
}

impl RuntimeHyperClient {
    fn new() -> Self {
        Self {
            inner: HyperClient::with_default_connector(Duration::from_secs(10), None),
            runtime: tokio::runtime::Handle::current(),
        }
    }
}

#[async_trait]
impl HttpClient for RuntimeHyperClient {
    async fn send_bytes(&self, request: Request<Bytes>) -> Result<Response<Bytes>, HttpError> {
        let inner = self.inner.clone();
        self.runtime
            .spawn(async move { inner.send_bytes(request).await })
            .await?
    }
}

fn resource(service: impl Into<String>) -> Resource {
    Resource::builder_empty()
        .with_service_name(service.into())
        .build()
}

fn http_endpoint(app: &RunningApp, signal: &str) -> String {
    let addr = app.otlp_http.expect("OTLP/HTTP listener");
    format!("http://{addr}/v1/{signal}")
}

fn grpc_endpoint(app: &RunningApp) -> String {
    let addr: SocketAddr = app
        .otlp_grpc
        .expect("OTLP/gRPC listener (listen.otlp_grpc)");
    format!("http://{addr}")
}

/// An exporter (`SpanExporter` or `LogExporter`) to `app` over `transport`; `signal` is
/// the OTLP/HTTP path's last part.
macro_rules! exporter {
    ($exporter:ty, $app:expr, $transport:expr, $signal:literal) => {
        match $transport {
            Transport::Http => <$exporter>::builder()
                .with_http()
                .with_protocol(Protocol::HttpBinary)
                .with_endpoint(http_endpoint($app, $signal))
                .with_http_client(RuntimeHyperClient::new())
                .build(),
            Transport::Grpc => <$exporter>::builder()
                .with_tonic()
                .with_protocol(Protocol::Grpc)
                .with_endpoint(grpc_endpoint($app))
                .build(),
        }
    };
}

/// A tracer provider for `service` exporting to `app` (batch processor, default settings:
/// nothing leaves before a flush unless five seconds pass).
pub fn tracer_provider(
    app: &RunningApp,
    transport: Transport,
    service: impl Into<String>,
) -> SdkTracerProvider {
    let exporter = exporter!(opentelemetry_otlp::SpanExporter, app, transport, "traces");
    SdkTracerProvider::builder()
        .with_resource(resource(service))
        .with_batch_exporter(exporter.expect("span exporter"))
        .build()
}

/// A logger provider for `service` exporting to `app`, as `tracer_provider`.
pub fn logger_provider(
    app: &RunningApp,
    transport: Transport,
    service: impl Into<String>,
) -> SdkLoggerProvider {
    let exporter = exporter!(opentelemetry_otlp::LogExporter, app, transport, "logs");
    SdkLoggerProvider::builder()
        .with_resource(resource(service))
        .with_batch_exporter(exporter.expect("log exporter"))
        .build()
}

/// One span named `op` (from the tracer `scope`) carrying one event at its explicit
/// timestamp; `error` sets the span's status to Error.
pub fn emit(
    provider: &SdkTracerProvider,
    scope: &'static str,
    op: &'static str,
    event: impl Into<std::borrow::Cow<'static, str>>,
    at: SystemTime,
    attributes: Vec<KeyValue>,
    error: bool,
) {
    let mut span = provider.tracer(scope).start(op);
    span.add_event_with_timestamp(event, at, attributes);
    if error {
        span.set_status(Status::error("flow failed"));
    }
    span.end();
}

/// Flushes every provider at once; each flush blocks until its export is answered.
pub async fn flush_traces<'a>(providers: impl IntoIterator<Item = &'a SdkTracerProvider>) {
    let flushes: Vec<_> = providers
        .into_iter()
        .cloned()
        .map(|p| tokio::task::spawn_blocking(move || p.force_flush()))
        .collect();
    for f in flushes {
        f.await.unwrap().expect("spans exported");
    }
}

pub async fn flush_logs(provider: &SdkLoggerProvider) {
    let p = provider.clone();
    tokio::task::spawn_blocking(move || p.force_flush())
        .await
        .unwrap()
        .expect("log records exported");
}

pub async fn shutdown_all(tracers: Vec<SdkTracerProvider>, loggers: Vec<SdkLoggerProvider>) {
    tokio::task::spawn_blocking(move || {
        for p in tracers {
            p.shutdown().expect("tracer provider shuts down");
        }
        for p in loggers {
            p.shutdown().expect("logger provider shuts down");
        }
    })
    .await
    .unwrap();
}
