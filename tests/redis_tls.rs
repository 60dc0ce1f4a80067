//! The shared store over TLS (`rediss://`): a redis-server with a certificate from a CA
//! of the test's own, trusted through `correlation.redis.ca_file`.

mod common;

use std::time::Duration;

use common::redis::TlsRedisServer;
use common::replicas::*;
use common::{assert_values, otlp, scrape_until_value, traces_url};
use hyper::StatusCode;
use prost::Message;

/// One export: the flow's start and end (1.5 s apart) for `id`.
fn pair(id: &str) -> Vec<u8> {
    let base = now_nanos();
    let end = base + 1_500_000_000;
    let spans = [
        otlp::flow_event("flow.pay.start", id, None, base),
        otlp::flow_event("flow.pay.end", id, Some("success"), end),
    ]
    .map(|event| otlp::span(&[0xab; 16], &[1; 8], vec![event]));
    otlp::traces(None, spans.to_vec()).encode_to_vec()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_flow_completes_through_a_tls_redis_trusted_by_its_ca_file() {
    let Some(server) = TlsRedisServer::start() else {
        return;
    };
    let (url, ca) = (server.url(), server.ca_file());
    let app = replica_with(|c| {
        c.correlation.redis.url = url;
        c.correlation.redis.ca_file = ca.display().to_string();
    })
    .await;
    wait_ready(
        std::slice::from_ref(&app),
        StatusCode::OK,
        "never ready over TLS",
    )
    .await;
    let otlp = traces_url(&app);
    assert_eq!(post_once(&otlp, pair("o-1")).await, Some(StatusCode::OK));
    let series = r#"flowmetrics_flows_completed_total{flow="pay",outcome="success"}"#;
    let m = scrape_until_value(&app, Duration::from_secs(5), series, 1.0).await;
    assert_values(
        &m,
        &[(r#"flowmetrics_flow_duration_seconds_sum{flow="pay"}"#, 1.5)],
    );
    assert_eq!(readyz(&app).await, StatusCode::OK);
    app.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_tls_redis_whose_certificate_is_not_trusted_is_not_used() {
    let Some(server) = TlsRedisServer::start() else {
        return;
    };
    // The system's roots do not know the test's CA: the handshake fails.
    let url = server.url();
    let app = replica_with(|c| c.correlation.redis.url = url).await;
    let otlp = traces_url(&app);
    assert_eq!(
        post_once(&otlp, pair("o-2")).await,
        Some(StatusCode::SERVICE_UNAVAILABLE)
    );
    assert_eq!(readyz(&app).await, StatusCode::SERVICE_UNAVAILABLE);
    app.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_ca_file_missing_or_not_pem_stops_the_start_naming_it() {
    let dir = std::env::temp_dir().join(format!("flowmetrics-ca-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let garbage = dir.join("garbage.pem");
    std::fs::write(&garbage, "not a certificate\n").unwrap();
    for path in [dir.join("missing.pem"), garbage] {
        let mut c = common::test_config();
        c.correlation.store = flowmetrics::config::StoreKind::Redis;
        c.correlation.redis.url = "rediss://127.0.0.1:1/0".into();
        c.correlation.redis.ca_file = path.display().to_string();
        let err = match flowmetrics::App::new(c).start().await {
            Ok(app) => {
                app.shutdown().await;
                panic!("started with ca_file {path:?}");
            }
            Err(e) => e.to_string(),
        };
        assert!(err.contains("correlation.redis"), "{err}");
    }
    let _ = std::fs::remove_dir_all(&dir);
}
