//! The `flowmetrics` binary itself: check-config, config errors, start-up logs, a
//! graceful exit on SIGTERM, and `probe` (the container healthcheck).

mod common;

use std::io::{BufRead, BufReader};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

const BIN: &str = env!("CARGO_BIN_EXE_flowmetrics");

fn flowmetrics(args: &[&str], env: &[(&str, &str)]) -> Command {
    let mut c = Command::new(BIN);
    c.args(args);
    // Only what the test sets: no FLOWMETRICS_* from the outer environment.
    for (k, _) in std::env::vars() {
        if k.starts_with("FLOWMETRICS_") || k == "RUST_LOG" {
            c.env_remove(k);
        }
    }
    c.envs(env.iter().copied());
    c
}

#[test]
fn check_config_prints_the_effective_config() {
    let out = flowmetrics(
        &["check-config"],
        &[
            ("FLOWMETRICS_LISTEN__METRICS", "9999"),
            ("FLOWMETRICS_FLOWS__DEFAULT__TIMEOUT", "10s"),
        ],
    )
    .output()
    .unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let yaml = String::from_utf8(out.stdout).unwrap();
    assert!(yaml.contains("metrics: 127.0.0.1:9999"), "{yaml}");
    assert!(yaml.contains("timeout: 10s"), "{yaml}");
    assert!(yaml.contains("max_in_flight: 1000000"), "{yaml}");
}

#[test]
fn config_errors_name_key_and_source_and_exit_2() {
    let dir = std::env::temp_dir().join(format!("fm-cli-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let file = dir.join("bad.yaml");
    std::fs::write(&file, "limits:\n  max_in_flite: 5\n").unwrap();
    let out = flowmetrics(&["check-config", "--config", file.to_str().unwrap()], &[])
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(2));
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(
        err.contains("max_in_flite") && err.contains("bad.yaml"),
        "{err}"
    );

    // Through FLOWMETRICS_CONFIG too, and env errors name the variable.
    let out = flowmetrics(
        &["check-config"],
        &[("FLOWMETRICS_CONFIG", file.to_str().unwrap())],
    )
    .output()
    .unwrap();
    assert_eq!(out.status.code(), Some(2));
    let out = flowmetrics(
        &["check-config"],
        &[("FLOWMETRICS_LIMITS__MAX_IN_FLIGHT", "lots")],
    )
    .output()
    .unwrap();
    assert_eq!(out.status.code(), Some(2));
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains("FLOWMETRICS_LIMITS__MAX_IN_FLIGHT"), "{err}");
    let _ = std::fs::remove_dir_all(&dir);

    let out = flowmetrics(&["frobnicate"], &[]).output().unwrap();
    assert_eq!(out.status.code(), Some(2));
}

#[test]
fn runs_logs_each_endpoint_and_exits_cleanly_on_sigterm() {
    let mut child = flowmetrics(
        &[],
        &[
            ("FLOWMETRICS_LISTEN__METRICS", "127.0.0.1:0"),
            ("FLOWMETRICS_LISTEN__OTLP_HTTP", "127.0.0.1:0"),
            ("FLOWMETRICS_LISTEN__OTLP_GRPC", "127.0.0.1:0"),
            ("FLOWMETRICS_LOG__FORMAT", "json"),
        ],
    )
    .stderr(Stdio::piped())
    .spawn()
    .unwrap();
    let mut lines = BufReader::new(child.stderr.take().unwrap()).lines();
    let mut seen = Vec::new();
    let give_up = Instant::now() + Duration::from_secs(20);
    while Instant::now() < give_up {
        let Some(Ok(line)) = lines.next() else { break };
        let v: serde_json::Value =
            serde_json::from_str(&line).unwrap_or_else(|e| panic!("not JSON ({e}): {line}"));
        let msg = v["fields"]["message"]
            .as_str()
            .unwrap_or_default()
            .to_string();
        seen.push(msg.clone());
        if msg.contains("flowmetrics started") {
            break;
        }
    }
    for endpoint in [
        "metrics: http://127.0.0.1:",
        "OTLP/HTTP: http://127.0.0.1:",
        "OTLP/gRPC: 127.0.0.1:",
    ] {
        assert!(
            seen.iter().any(|l| l.starts_with(endpoint)),
            "no line for {endpoint}: {seen:?}"
        );
    }
    let status = Command::new("kill")
        .args(["-TERM", &child.id().to_string()])
        .status()
        .unwrap();
    assert!(status.success());
    let rest: Vec<String> = lines.map_while(Result::ok).collect();
    let exit = child.wait().unwrap();
    assert_eq!(exit.code(), Some(0), "{rest:?}");
    assert!(rest.iter().any(|l| l.contains("stopped")), "{rest:?}");
}

/// `probe` against a running server: 0 for `/readyz` (200), 1 for a path that answers
/// 404 and for a closed port, 2 for something that is not an http URL.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn probe_exits_0_on_200_and_1_otherwise() {
    let app = common::start(common::test_config()).await;
    let closed = {
        let l = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        l.local_addr().unwrap()
    };
    let cases = [
        (format!("http://{}/readyz", app.metrics), Some(0)),
        (format!("http://{}/healthz", app.metrics), Some(0)),
        (format!("http://{}/no-such-page", app.metrics), Some(1)),
        (format!("http://{closed}/readyz"), Some(1)),
        ("https://127.0.0.1:1/readyz".to_string(), Some(2)),
    ];
    for (url, want) in cases {
        let out = tokio::task::spawn_blocking({
            let url = url.clone();
            move || flowmetrics(&["probe", &url], &[]).output().unwrap()
        })
        .await
        .unwrap();
        let stderr = String::from_utf8_lossy(&out.stderr);
        assert_eq!(out.status.code(), want, "{url}: {stderr}");
        if want == Some(1) {
            assert!(
                stderr.contains(&url[7..]),
                "{url}: the failure names the URL: {stderr}"
            );
        }
    }
    app.shutdown().await;
}
