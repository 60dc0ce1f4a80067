//! Several flowmetrics replicas on one real redis-server (`correlation.store: redis`):
//! each flow's start goes to one replica and its end to another at random, ends often
//! first, over OTLP/HTTP from clients that retry as exporters do (503 → again, to any
//! replica). The counters summed over replicas must be exact for every outcome, with
//! one replica stopped mid-run, and with Redis itself stopped and restarted under load.
//! (The scenario is in tests/common/replicas.rs; tests/redis_cluster.rs runs it on a
//! Redis Cluster.)

mod common;

use std::sync::atomic::Ordering;
use std::time::{Duration, Instant};

use common::redis::RedisServer;
use common::replicas::*;
use common::*;
use flowmetrics::RunningApp;
use hyper::StatusCode;
use opentelemetry_proto::tonic::collector::trace::v1::trace_service_client::TraceServiceClient;
use opentelemetry_proto::tonic::collector::trace::v1::ExportTraceServiceRequest;
use prost::Message;

#[derive(Clone, Copy, PartialEq)]
enum Fault {
    None,
    /// Replica 0 takes no more exports after a third of the batches, then stops.
    StopReplica,
    /// Redis is stopped for some seconds after a third of the batches.
    StopRedis,
}

async fn replica(url: &str) -> RunningApp {
    replica_with(|c| c.correlation.redis.url = url.into()).await
}

async fn run(fault: Fault, seed: u64) {
    let Some(mut redis) = (match fault {
        // Open flows must outlive the restart: an append-only file, synced per write.
        Fault::StopRedis => RedisServer::start_persistent(),
        _ => RedisServer::start(),
    }) else {
        return;
    };
    let url = redis.url();
    let mut apps = three_replicas(|c| c.correlation.redis.url = url.clone()).await;
    let urls = trace_urls(&apps);
    let traffic = Traffic::start(urls, seed).await;
    let mut stopped_scrape = None;
    traffic.a_third_sent().await;
    match fault {
        Fault::None => {}
        Fault::StopReplica => {
            traffic.replica0_out.store(true, Ordering::Release);
            // Exports already on their way to it finish; then its last scrape is what
            // Prometheus keeps of it, and it stops with its open flows in Redis.
            tokio::time::sleep(Duration::from_millis(300)).await;
            stopped_scrape = Some(scrape(&apps[0]).await);
            apps.remove(0).shutdown().await;
        }
        Fault::StopRedis => {
            redis.stop();
            wait_ready(
                &apps,
                StatusCode::SERVICE_UNAVAILABLE,
                "/readyz stayed 200 without Redis",
            )
            .await;
            tokio::time::sleep(Duration::from_secs(3)).await;
            redis.restart();
            wait_ready(
                &apps,
                StatusCode::OK,
                "/readyz stayed 503 after Redis came back",
            )
            .await;
        }
    }
    let refused = traffic.refused.clone();
    traffic.finish().await;
    if fault == Fault::StopRedis {
        assert!(refused.load(Ordering::Relaxed) > 0, "no export was refused");
    }
    let scrapes = final_scrapes(&apps, stopped_scrape).await;
    assert_exact(&scrapes);
    if fault == Fault::StopRedis {
        assert!(
            store_errors(&scrapes) > 0.0,
            "store errors were not counted"
        );
    }
    for app in apps {
        app.shutdown().await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn three_replicas_on_one_redis_count_every_outcome_exactly() {
    run(Fault::None, 0x1234_5678_9abc_def1).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_replica_stopped_mid_run_loses_nothing() {
    run(Fault::StopReplica, 0x0fed_cba9_8765_4321).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn redis_stopped_and_restarted_under_load_counts_nothing_twice() {
    run(Fault::StopRedis, 0x5555_aaaa_3333_cccc).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_export_while_redis_is_down_is_refused_for_a_retry() {
    let Some(mut redis) = RedisServer::start() else {
        return;
    };
    let app = replica(&redis.url()).await;
    let url = traces_url(&app);
    let body = batches(7).swap_remove(0);
    assert_eq!(post_once(&url, body.clone()).await, Some(StatusCode::OK));
    redis.stop();
    let r = post(&url, "application/x-protobuf", body.clone()).await;
    assert_eq!(r.status, StatusCode::SERVICE_UNAVAILABLE);
    assert_eq!(r.headers.get("retry-after").unwrap(), "1");
    let give_up = Instant::now() + Duration::from_secs(5);
    while readyz(&app).await != StatusCode::SERVICE_UNAVAILABLE {
        assert!(Instant::now() < give_up, "/readyz stayed 200 without Redis");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    // gRPC: UNAVAILABLE, which OTLP exporters retry.
    let endpoint = format!("http://{}", app.otlp_grpc.unwrap());
    let mut grpc = TraceServiceClient::connect(endpoint).await.unwrap();
    let request = ExportTraceServiceRequest::decode(&body[..]).unwrap();
    let status = grpc.export(request).await.expect_err("refused");
    assert_eq!(status.code(), tonic::Code::Unavailable);
    let m = scrape(&app).await;
    assert!(value(&m, r#"flowmetrics_store_errors_total{op="apply"}"#) >= 2.0);
    assert!(m.contains_key(r#"flowmetrics_store_latency_seconds_count{op="apply"}"#));
    assert_eq!(
        value(
            &m,
            r#"flowmetrics_otlp_requests_total{transport="http",signal="traces",code="503"}"#
        ),
        1.0
    );
    redis.restart();
    // The retry lands; what the first export applied is recognised, not counted again.
    let give_up = Instant::now() + Duration::from_secs(5);
    while post_once(&url, body.clone()).await != Some(StatusCode::OK) {
        assert!(Instant::now() < give_up, "never served again");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    app.shutdown().await;
}

/// Redis out of memory (`maxmemory` with `noeviction`) answers but takes no writes:
/// exports are refused 503 / UNAVAILABLE with the store's own error, `/readyz` says not
/// ready (as when Redis is unreachable), and both recover once memory is raised.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn while_redis_refuses_writes_exports_are_refused_and_it_is_not_ready() {
    let Some(redis) = RedisServer::start() else {
        return;
    };
    let app = replica(&redis.url()).await;
    wait_ready(std::slice::from_ref(&app), StatusCode::OK, "never ready").await;
    let url = traces_url(&app);
    let body = batches(11).swap_remove(0);
    let mut con = redis.connection().unwrap();
    let config_set = |con: &mut ::redis::Connection, key: &str, value: &str| {
        ::redis::cmd("CONFIG")
            .arg("SET")
            .arg(key)
            .arg(value)
            .query::<()>(con)
            .unwrap();
    };
    config_set(&mut con, "maxmemory-policy", "noeviction");
    config_set(&mut con, "maxmemory", "1");

    let r = post(&url, "application/x-protobuf", body.clone()).await;
    assert_eq!(r.status, StatusCode::SERVICE_UNAVAILABLE, "{}", r.text());
    let text = r.text();
    assert!(
        text.contains("refuses writes") && text.contains("OOM"),
        "{text}"
    );
    assert!(!text.contains("overloaded"), "{text}");
    let endpoint = format!("http://{}", app.otlp_grpc.unwrap());
    let mut grpc = TraceServiceClient::connect(endpoint).await.unwrap();
    let request = ExportTraceServiceRequest::decode(&body[..]).unwrap();
    let status = grpc.export(request).await.expect_err("refused");
    assert_eq!(status.code(), tonic::Code::Unavailable);
    assert!(status.message().contains("refuses writes"), "{status:?}");
    // The sweeper's calls (reads and deletes) still succeed: readiness must not follow them.
    wait_ready(
        std::slice::from_ref(&app),
        StatusCode::SERVICE_UNAVAILABLE,
        "/readyz stayed 200 while Redis refused writes",
    )
    .await;
    tokio::time::sleep(Duration::from_millis(1500)).await;
    assert_eq!(readyz(&app).await, StatusCode::SERVICE_UNAVAILABLE);

    config_set(&mut con, "maxmemory", "0");
    wait_ready(
        std::slice::from_ref(&app),
        StatusCode::OK,
        "/readyz stayed 503 after Redis took writes again",
    )
    .await;
    assert_eq!(post_once(&url, body).await, Some(StatusCode::OK));
    app.shutdown().await;
}

/// Numbers for BENCHMARKS.md (not a test of speed: it asserts nothing about it).
/// `cargo test --release --test redis_replicas -- --ignored --nocapture`
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
#[ignore]
async fn measure_throughput_latency_cpu_and_memory() {
    let Some(redis) = RedisServer::start() else {
        return;
    };
    // Memory per open instance: 100k starts, each with its retry fingerprint.
    {
        let app = replica(&redis.url()).await;
        let url = traces_url(&app);
        let before = redis.used_memory();
        let base = now_nanos();
        for chunk in 0..200u64 {
            let spans = (0..500u64)
                .map(|i| {
                    let id = chunk * 500 + i;
                    let name = "flow.mem.start";
                    let event = otlp::flow_event(name, &format!("order-{id:08}"), None, base + id);
                    otlp::span(&[0xab; 16], &(id + 1).to_be_bytes(), vec![event])
                })
                .collect();
            let body = otlp::traces(None, spans).encode_to_vec();
            assert_eq!(post_once(&url, body).await, Some(StatusCode::OK));
        }
        let after = redis.used_memory();
        println!(
            "memory: {} bytes per open instance (instance, deadline entry, start fingerprint; \
             16-byte ids, no dims)",
            (after - before) / 100_000
        );
        app.shutdown().await;
        redis.flush();
    }
    for replicas in [1usize, 3] {
        let mut apps = Vec::new();
        for _ in 0..replicas {
            apps.push(replica(&redis.url()).await);
        }
        let urls = trace_urls(&apps);
        let pid = redis.pid().unwrap();
        let run = throughput(&urls, || proc_cpu_ticks(pid)).await;
        println!(
            "{replicas} replica(s): {:.0} events/s in all, {:.0} per replica; p99 export \
             (100 events) {:.1} ms; Redis CPU {:.2} of a core per 100k events/s",
            run.events_per_sec,
            run.events_per_sec / replicas as f64,
            run.p99.as_secs_f64() * 1e3,
            run.cpu_per_100k,
        );
        for app in apps {
            app.shutdown().await;
        }
        redis.flush();
    }
}
