//! Three flowmetrics replicas on a three-primary Redis Cluster
//! (`correlation.redis.cluster`): the same exactness check as tests/redis_replicas.rs
//! (starts to one replica, ends to another, ends often first, start-only ids time out),
//! with the keys spread over the shards and so over every primary; also over TLS.

mod common;

use std::time::Instant;

use flowmetrics::config::Config;
use flowmetrics::RunningApp;

use common::redis::RedisCluster;
use common::replicas::*;
use hyper::StatusCode;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn three_replicas_on_a_redis_cluster_count_every_outcome_exactly() {
    let started = Instant::now();
    let Some(cluster) = RedisCluster::start(3) else {
        return;
    };
    eprintln!("cluster up in {:.1}s", started.elapsed().as_secs_f64());
    exactly(&cluster, 0x2468_ace0_1357_9bdf).await;
    eprintln!("whole test {:.1}s", started.elapsed().as_secs_f64());
}

/// The same over TLS (`rediss://` nodes, the cluster bus in TLS too), trusting the
/// test's CA through `correlation.redis.ca_file`.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn three_replicas_on_a_tls_redis_cluster_count_every_outcome_exactly() {
    let Some(cluster) = RedisCluster::start_tls(3) else {
        return;
    };
    exactly(&cluster, 0x1357_9bdf_2468_ace0).await;
}

/// A replica's settings for `cluster`. The connect timeout is the default (1 s), not the
/// 300 ms of the other replica tests, which wait through outages: a TLS handshake in a
/// debug build on a loaded machine can take longer, and these tests are about a healthy
/// cluster (no store error allowed).
fn on_cluster(c: &mut Config, cluster: &RedisCluster) {
    c.correlation.redis.cluster = cluster.urls();
    if cluster.urls()[0].starts_with("rediss://") {
        c.correlation.redis.ca_file = cluster.ca_file().display().to_string();
    }
    c.correlation.redis.connect_timeout = Config::default().correlation.redis.connect_timeout;
}

async fn exactly(cluster: &RedisCluster, seed: u64) {
    let apps = three_replicas(|c| on_cluster(c, cluster)).await;
    let urls = trace_urls(&apps);
    let traffic = Traffic::start(urls, seed).await;
    traffic.a_third_sent().await;
    // Mid-run: instances, fingerprints and deadlines are on every primary, not one.
    let mid_run = cluster.keys_per_node();
    traffic.finish().await;
    let scrapes = final_scrapes(&apps, None).await;
    assert_exact(&scrapes);
    // The retry fingerprints stay for the dedup window: still on every primary.
    let after = cluster.keys_per_node();
    assert!(
        mid_run.iter().all(|&n| n > 0) && after.iter().all(|&n| n > 0),
        "keys per primary mid-run {mid_run:?}, after {after:?}"
    );
    assert_eq!(
        store_errors(&scrapes),
        0.0,
        "store errors on a healthy cluster"
    );
    for app in apps {
        app.shutdown().await;
    }
}

/// One replica on `cluster`, ready, that took the last export of `batches(seed)`: the
/// replica, its trace URL, the other exports, and the flow starts sent so far.
async fn one_replica_after_an_export(
    cluster: &RedisCluster,
    seed: u64,
) -> (RunningApp, String, Vec<Vec<u8>>, usize) {
    let app = replica_with(|c| on_cluster(c, cluster)).await;
    wait_ready(
        std::slice::from_ref(&app),
        StatusCode::OK,
        "replica never ready",
    )
    .await;
    let url = format!("http://{}/v1/traces", app.otlp_http.unwrap());
    let mut bodies = batches(seed);
    let first = bodies.pop().unwrap();
    let starts = starts_in(&first);
    assert_eq!(post_once(&url, first).await, Some(StatusCode::OK));
    (app, url, bodies, starts)
}

/// A script missing on the primaries (flushed, as after a restart or a failover) is
/// loaded again on every primary, and the batch goes through.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn scripts_flushed_on_every_primary_are_loaded_again() {
    let Some(cluster) = RedisCluster::start(3) else {
        return;
    };
    let (app, url, mut bodies, _) = one_replica_after_an_export(&cluster, 11).await;
    for &port in &cluster.ports {
        cluster
            .node_cmd(port, &["SCRIPT", "FLUSH"])
            .expect("SCRIPT FLUSH");
    }
    for body in bodies.drain(..10) {
        assert_eq!(post_once(&url, body).await, Some(StatusCode::OK));
    }
    let m = common::scrape(&app).await;
    assert_eq!(
        store_errors(std::slice::from_ref(&m)),
        0.0,
        "a batch failed after SCRIPT FLUSH"
    );
    app.shutdown().await;
}

/// Scripts flushed on one primary only (one node restarted): a pipeline's calls to that
/// node are refused with NOSCRIPT while those to the others run, and redis-rs drops
/// their replies. The refused calls are sent again after the script is loaded, the
/// dropped replies are read back from Redis, and the export is taken.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn scripts_flushed_on_one_primary_refuse_no_export() {
    let Some(cluster) = RedisCluster::start(3) else {
        return;
    };
    let (app, url, mut bodies, mut starts) = one_replica_after_an_export(&cluster, 12).await;
    // Each batch spreads over every shard, so over every primary.
    for (round, body) in bodies.drain(..10).enumerate() {
        let port = cluster.ports[round % cluster.ports.len()];
        cluster
            .node_cmd(port, &["SCRIPT", "FLUSH"])
            .expect("SCRIPT FLUSH");
        starts += starts_in(&body);
        assert_eq!(
            post_once(&url, body).await,
            Some(StatusCode::OK),
            "an export refused after SCRIPT FLUSH on one primary (round {round})"
        );
    }
    let m = common::scrape(&app).await;
    // The outcomes of the calls whose replies were dropped were read back: every start
    // is counted (each id starts at most once).
    assert_eq!(
        total(
            std::slice::from_ref(&m),
            "flowmetrics_flows_started_total",
            ""
        ),
        starts as f64,
        "starts counted"
    );
    assert_eq!(
        store_errors(std::slice::from_ref(&m)),
        0.0,
        "a call failed after SCRIPT FLUSH on one primary"
    );
    app.shutdown().await;
}

/// Numbers for docs/replicas.md (not a test of speed: it asserts nothing about it).
/// `cargo test --release --test redis_cluster measure -- --ignored --nocapture`
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
#[ignore]
async fn measure_throughput_on_a_cluster() {
    let Some(cluster) = RedisCluster::start(3) else {
        return;
    };
    for replicas in [1usize, 3] {
        let mut apps = Vec::new();
        for _ in 0..replicas {
            apps.push(replica_with(|c| on_cluster(c, &cluster)).await);
        }
        wait_ready(&apps, StatusCode::OK, "replica never ready").await;
        let urls = trace_urls(&apps);
        let pids = cluster.pids();
        let run = throughput(&urls, || pids.iter().map(|&p| proc_cpu_ticks(p)).sum()).await;
        println!(
            "cluster, 3 primaries, 16 shards, {replicas} replica(s): {:.0} events/s in all; \
             p99 export (100 events) {:.1} ms; Redis CPU (all nodes) {:.2} of a core per \
             100k events/s",
            run.events_per_sec,
            run.p99.as_secs_f64() * 1e3,
            run.cpu_per_100k,
        );
        for app in apps {
            app.shutdown().await;
        }
        for &port in &cluster.ports {
            let _ = cluster.node_cmd(port, &["FLUSHALL"]);
        }
    }
}

/// How many flow starts an export body holds.
fn starts_in(body: &[u8]) -> usize {
    use opentelemetry_proto::tonic::collector::trace::v1::ExportTraceServiceRequest;
    use prost::Message;
    let request = ExportTraceServiceRequest::decode(body).expect("a body made here");
    request
        .resource_spans
        .iter()
        .flat_map(|r| &r.scope_spans)
        .flat_map(|s| &s.spans)
        .flat_map(|s| &s.events)
        .filter(|e| e.name == format!("flow.{FLOW}.start"))
        .count()
}
