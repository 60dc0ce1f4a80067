//! Shared helpers for the integration tests: start a real flowmetrics on loopback
//! ephemeral ports, talk HTTP to it, read its `/metrics`.
#![allow(dead_code)]

pub mod otlp;
pub mod process;
pub mod redis;
pub mod replicas;
pub mod sdk;
pub mod store;

use std::collections::BTreeMap;
use std::time::{Duration, Instant};

use bytes::Bytes;
use flowmetrics::config::Config;
use flowmetrics::{App, RunningApp};
use http_body_util::{BodyExt, Full};
use hyper::{Method, Request, StatusCode};
use hyper_util::client::legacy::connect::HttpConnector;
use hyper_util::client::legacy::Client;
use hyper_util::rt::TokioExecutor;

/// Marks the running test as skipped (a prerequisite such as redis-server is missing):
/// says why on stderr, and appends the test's name to the file named by
/// `SKIPPED_TESTS_FILE`, which scripts/test.sh reads to report it as skipped
/// rather than passed (libtest has no run-time skip: the test returns early and passes).
pub fn skip(reason: &str) {
    eprintln!("SKIPPED: {reason}");
    let Some(file) = std::env::var_os("SKIPPED_TESTS_FILE") else {
        return;
    };
    let binary = std::env::args()
        .next()
        .map(std::path::PathBuf::from)
        .and_then(|p| p.file_name().map(|n| n.to_string_lossy().into_owned()))
        .unwrap_or_default();
    // libtest names each test's thread after the test.
    let test = std::thread::current()
        .name()
        .unwrap_or("unnamed")
        .to_string();
    use std::io::Write;
    if let Ok(mut f) = std::fs::OpenOptions::new()
        .create(true)
        .append(true)
        .open(file)
    {
        // One short line per write with O_APPEND: lines from parallel tests stay whole.
        let _ = f.write_all(format!("{binary} {test}\n").as_bytes());
    }
}

/// A loopback port free when asked.
pub fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0")
        .and_then(|l| l.local_addr())
        .expect("a free port")
        .port()
}

/// Kills a child process the test started, waits for it, and removes its directory.
pub fn reap(child: &mut std::process::Child, dir: &std::path::Path) {
    let _ = child.kill();
    let _ = child.wait();
    let _ = std::fs::remove_dir_all(dir);
}

/// A string attribute, as OTLP carries it.
pub fn attr(key: &str, value: &str) -> opentelemetry_proto::tonic::common::v1::KeyValue {
    use opentelemetry_proto::tonic::common::v1::{any_value, AnyValue, KeyValue};
    KeyValue {
        key: key.into(),
        value: Some(AnyValue {
            value: Some(any_value::Value::StringValue(value.into())),
        }),
        ..Default::default()
    }
}

/// An integer attribute, as OTLP carries it.
pub fn int_attr(key: &str, value: i64) -> opentelemetry_proto::tonic::common::v1::KeyValue {
    use opentelemetry_proto::tonic::common::v1::{any_value, AnyValue, KeyValue};
    KeyValue {
        key: key.into(),
        value: Some(AnyValue {
            value: Some(any_value::Value::IntValue(value)),
        }),
        ..Default::default()
    }
}

/// A config listening on ephemeral loopback ports.
pub fn test_config() -> Config {
    let mut c = Config::default();
    c.listen.otlp_http = "127.0.0.1:0".into();
    c.listen.otlp_grpc = "127.0.0.1:0".into();
    c.listen.metrics = "127.0.0.1:0".into();
    c
}

pub async fn start(config: Config) -> RunningApp {
    App::new(config).start().await.expect("flowmetrics starts")
}

pub const PROTOBUF: &str = "application/x-protobuf";

/// The path of a gRPC trace export.
pub const TRACE_EXPORT: &str = "/opentelemetry.proto.collector.trace.v1.TraceService/Export";

/// `app`'s OTLP/HTTP trace endpoint.
pub fn traces_url(app: &RunningApp) -> String {
    format!(
        "http://{}/v1/traces",
        app.otlp_http.expect("OTLP/HTTP listener")
    )
}

/// POSTs a trace export to `app` and asserts it is taken whole (200).
pub async fn export_ok(app: &RunningApp, content_type: &str, body: impl Into<Bytes>) -> Reply {
    let r = post(&traces_url(app), content_type, body).await;
    assert_eq!(r.status, StatusCode::OK, "{}", r.text());
    r
}

/// The status of `app`'s `/readyz`.
pub async fn readyz(app: &RunningApp) -> StatusCode {
    get(app, "/readyz").await.status
}

/// One gRPC message frame: the compressed flag, the length, the message.
pub fn grpc_frame(compressed: bool, message: &[u8]) -> Vec<u8> {
    let mut f = vec![u8::from(compressed)];
    f.extend_from_slice(&(message.len() as u32).to_be_bytes());
    f.extend_from_slice(message);
    f
}

/// A plain-HTTP client: HTTP/1.1, or HTTP/2 only (as gRPC speaks).
pub fn http_client(http2_only: bool) -> Client<HttpConnector, Full<Bytes>> {
    Client::builder(TokioExecutor::new())
        .http2_only(http2_only)
        .build_http()
}

pub struct Reply {
    pub status: StatusCode,
    pub headers: hyper::HeaderMap,
    pub body: Bytes,
}

impl Reply {
    pub fn text(&self) -> String {
        String::from_utf8_lossy(&self.body).into_owned()
    }
}

/// Sends one request; `headers` are (name, value) pairs.
pub async fn request(
    method: Method,
    url: &str,
    headers: &[(&str, &str)],
    body: impl Into<Bytes>,
) -> Reply {
    let client = http_client(false);
    let mut builder = Request::builder().method(method).uri(url);
    for (k, v) in headers {
        builder = builder.header(*k, *v);
    }
    let response = client
        .request(builder.body(Full::new(body.into())).unwrap())
        .await
        .expect("request sent");
    let status = response.status();
    let headers = response.headers().clone();
    let body = response.into_body().collect().await.unwrap().to_bytes();
    Reply {
        status,
        headers,
        body,
    }
}

pub async fn post(url: &str, content_type: &str, body: impl Into<Bytes>) -> Reply {
    request(Method::POST, url, &[("content-type", content_type)], body).await
}

/// GET `path` from `app`'s metrics listener.
pub async fn get(app: &RunningApp, path: &str) -> Reply {
    let url = format!("http://{}{path}", app.metrics);
    request(Method::GET, &url, &[], Bytes::new()).await
}

/// Sum of the series of `name` whose labels contain every one of `labels`.
pub fn sum_series(samples: &BTreeMap<String, f64>, name: &str, labels: &[&str]) -> f64 {
    samples
        .iter()
        .filter(|(s, _)| {
            let (n, l) = s.split_once('{').unwrap_or((s, ""));
            n == name && labels.iter().all(|want| l.contains(want))
        })
        .map(|(_, v)| v)
        .sum()
}

/// The raw exposition from `/metrics`.
pub async fn scrape_text(app: &RunningApp) -> String {
    let r = get(app, "/metrics").await;
    assert_eq!(r.status, StatusCode::OK);
    r.text()
}

/// Samples by their full series text (`name{labels}`), exemplars stripped.
pub async fn scrape(app: &RunningApp) -> BTreeMap<String, f64> {
    parse_samples(&scrape_text(app).await)
}

pub fn parse_samples(text: &str) -> BTreeMap<String, f64> {
    let mut out = BTreeMap::new();
    for line in text.lines() {
        if line.starts_with('#') || line.is_empty() {
            continue;
        }
        let line = line.split(" # ").next().unwrap();
        let (series, value) = line.rsplit_once(' ').unwrap();
        out.insert(series.to_string(), value.parse().unwrap());
    }
    out
}

/// Value of a series, 0 when absent.
pub fn value(samples: &BTreeMap<String, f64>, series: &str) -> f64 {
    samples.get(series).copied().unwrap_or(0.0)
}

/// Asserts the value of each series (0 when absent) in `samples`.
#[track_caller]
pub fn assert_values(samples: &BTreeMap<String, f64>, want: &[(&str, f64)]) {
    for (series, v) in want {
        assert_eq!(value(samples, series), *v, "{series}");
    }
}

/// Asserts each series is in `samples`, with this value.
#[track_caller]
pub fn assert_present(samples: &BTreeMap<String, f64>, want: &[(&str, f64)]) {
    for (series, v) in want {
        assert_eq!(samples.get(*series), Some(v), "{series}");
    }
}

/// Asserts each (family, what its labels must contain, sum of its series) in `samples`.
#[track_caller]
pub fn assert_sums(samples: &BTreeMap<String, f64>, want: &[(&str, &[&str], f64)]) {
    for (name, labels, v) in want {
        assert_eq!(sum_series(samples, name, labels), *v, "{name} {labels:?}");
    }
}

/// Scrapes until `series` has the value `want` (or `timeout` passes), asserts that it
/// has, and returns the last scrape.
pub async fn scrape_until_value(
    app: &RunningApp,
    timeout: Duration,
    series: &str,
    want: f64,
) -> BTreeMap<String, f64> {
    let m = scrape_until(app, timeout, |m| value(m, series) == want).await;
    assert_eq!(value(&m, series), want, "{series}");
    m
}

/// Scrapes until `ok` holds or `timeout` passes; returns the last scrape.
pub async fn scrape_until(
    app: &RunningApp,
    timeout: Duration,
    ok: impl Fn(&BTreeMap<String, f64>) -> bool,
) -> BTreeMap<String, f64> {
    let give_up = Instant::now() + timeout;
    loop {
        let s = scrape(app).await;
        if ok(&s) || Instant::now() > give_up {
            return s;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

/// One scrape of each app, in order.
pub async fn scrape_all(apps: &[RunningApp]) -> Vec<BTreeMap<String, f64>> {
    let mut scrapes = Vec::new();
    for app in apps {
        scrapes.push(scrape(app).await);
    }
    scrapes
}

/// Scrapes every app (after `earlier`, say a stopped replica's last scrape) until `done`
/// holds of them all or `within` passes; then, after `settle` more (nothing may be
/// counted twice late), the last scrapes.
pub async fn settled_scrapes(
    apps: &[RunningApp],
    earlier: &[BTreeMap<String, f64>],
    within: Duration,
    settle: Duration,
    done: impl Fn(&[BTreeMap<String, f64>]) -> bool,
) -> Vec<BTreeMap<String, f64>> {
    let give_up = Instant::now() + within;
    let all = || async {
        let mut scrapes = earlier.to_vec();
        scrapes.extend(scrape_all(apps).await);
        scrapes
    };
    while !done(&all().await) && Instant::now() < give_up {
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    tokio::time::sleep(settle).await;
    all().await
}
