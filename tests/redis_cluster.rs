//! Three flowmetrics replicas on a three-primary Redis Cluster
//! (`correlation.redis.cluster`): the same exactness check as tests/redis_replicas.rs
//! (starts to one replica, ends to another, ends often first, start-only ids time out),
//! with the keys spread over the shards and so over every primary; also over TLS.

mod common;

use std::time::Instant;

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

async fn exactly(cluster: &RedisCluster, seed: u64) {
    let (nodes, ca) = (cluster.urls(), cluster.ca_file());
    let apps = three_replicas(|c| {
        if nodes[0].starts_with("rediss://") {
            c.correlation.redis.ca_file = ca.display().to_string();
        }
        c.correlation.redis.cluster = nodes.clone();
    })
    .await;
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

/// A script missing on the primaries (flushed, as after a restart or a failover) is
/// loaded again on every primary, and the batch goes through.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn scripts_flushed_on_every_primary_are_loaded_again() {
    let Some(cluster) = RedisCluster::start(3) else {
        return;
    };
    let nodes = cluster.urls();
    let app = replica_with(|c| c.correlation.redis.cluster = nodes).await;
    wait_ready(
        std::slice::from_ref(&app),
        StatusCode::OK,
        "replica never ready",
    )
    .await;
    let url = format!("http://{}/v1/traces", app.otlp_http.unwrap());
    let mut bodies = batches(11);
    assert_eq!(
        post_once(&url, bodies.pop().unwrap()).await,
        Some(StatusCode::OK)
    );
    for &port in &cluster.ports {
        cluster
            .node_cmd(port, &["SCRIPT", "FLUSH"])
            .expect("SCRIPT FLUSH");
    }
    for body in bodies.drain(..10) {
        assert_eq!(post_once(&url, body).await, Some(StatusCode::OK));
    }
    let m = common::scrape(&app).await;
    let errors: f64 = m
        .iter()
        .filter(|(k, _)| k.starts_with("flowmetrics_store_errors_total"))
        .map(|(_, v)| v)
        .sum();
    assert_eq!(errors, 0.0, "a batch failed after SCRIPT FLUSH");
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
            let nodes = cluster.urls();
            apps.push(replica_with(|c| c.correlation.redis.cluster = nodes).await);
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
