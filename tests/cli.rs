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

/// Runs the binary to its end and asserts it exited 0 (`what` prefixes the message).
fn succeeds(args: &[&str], env: &[(&str, &str)], what: &str) -> std::process::Output {
    let out = flowmetrics(args, env).output().unwrap();
    assert!(
        out.status.success(),
        "{what}{}",
        String::from_utf8_lossy(&out.stderr)
    );
    out
}

#[test]
fn check_config_prints_the_effective_config() {
    let out = succeeds(
        &["check-config"],
        &[
            ("FLOWMETRICS_LISTEN__METRICS", "9999"),
            ("FLOWMETRICS_FLOWS__DEFAULT__TIMEOUT", "10s"),
        ],
        "",
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

/// Runs to its end, or is killed after `within` (then `None`).
fn output_within(mut c: Command, within: Duration) -> Option<std::process::Output> {
    let mut child = c
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let give_up = Instant::now() + within;
    while child.try_wait().unwrap().is_none() {
        if Instant::now() > give_up {
            let _ = child.kill();
            let _ = child.wait();
            return None;
        }
        std::thread::sleep(Duration::from_millis(20));
    }
    Some(child.wait_with_output().unwrap())
}

#[test]
fn a_log_level_that_is_no_level_is_a_config_error() {
    // `verbose` parses as a filter for a target named "verbose": every line of the
    // service would be off.
    let out = flowmetrics(&["check-config"], &[("FLOWMETRICS_LOG__LEVEL", "verbose")])
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(2));
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(
        err.contains("log.level")
            && err.contains("FLOWMETRICS_LOG__LEVEL")
            && err.contains("verbose"),
        "{err}"
    );
    let out = flowmetrics(&["check-config"], &[("RUST_LOG", "verbose")])
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(2));
    assert!(String::from_utf8_lossy(&out.stderr).contains("RUST_LOG"));
    // A blank RUST_LOG (an env file's `RUST_LOG=`) is no filter: log.level applies.
    let out = flowmetrics(&["check-config"], &[("RUST_LOG", "")])
        .output()
        .unwrap();
    assert!(out.status.success());
    // Real filters still pass.
    for ok in [
        "debug",
        "warn,flowmetrics=debug",
        "info,hyper=off",
        "flowmetrics[run]=trace",
    ] {
        succeeds(
            &["check-config"],
            &[("FLOWMETRICS_LOG__LEVEL", ok)],
            &format!("{ok}: "),
        );
    }
}

#[test]
fn a_start_error_reaches_stderr_whatever_the_log_filter() {
    let taken = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let addr = taken.local_addr().unwrap().to_string();
    for level in ["off", "warn,flowmetrics=off", "info"] {
        let out = flowmetrics(
            &[],
            &[
                ("FLOWMETRICS_LISTEN__METRICS", &addr),
                ("FLOWMETRICS_LISTEN__OTLP_HTTP", "127.0.0.1:0"),
                ("FLOWMETRICS_LISTEN__OTLP_GRPC", ""),
                ("FLOWMETRICS_LOG__LEVEL", level),
            ],
        );
        let out = output_within(out, Duration::from_secs(20)).expect("exits");
        assert_eq!(out.status.code(), Some(1), "{level}");
        let err = String::from_utf8_lossy(&out.stderr);
        assert!(
            err.contains(&format!("cannot listen on {addr}")),
            "{level}: {err:?}"
        );
    }
}

#[test]
fn help_lists_the_exit_statuses() {
    let out = flowmetrics(&["--help"], &[]).output().unwrap();
    assert!(out.status.success());
    let help = String::from_utf8_lossy(&out.stdout);
    assert!(help.contains("Exit status"), "{help}");
    for code in ["  0  ", "  1  ", "  2  "] {
        assert!(help.contains(code), "{code:?} missing: {help}");
    }
    let ops = std::fs::read_to_string(concat!(env!("CARGO_MANIFEST_DIR"), "/docs/operations.md"))
        .unwrap();
    assert!(ops.contains("## Exit statuses"), "{ops}");
}

#[test]
fn a_config_file_must_be_a_bounded_regular_file() {
    let dir = std::env::temp_dir().join(format!("fm-cli-file-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    std::fs::create_dir_all(&dir).unwrap();
    let fifo = dir.join("fifo.yaml");
    let c = std::ffi::CString::new(fifo.to_str().unwrap()).unwrap();
    // SAFETY: a valid C string.
    assert_eq!(unsafe { libc::mkfifo(c.as_ptr(), 0o600) }, 0);
    let large = dir.join("large.yaml");
    std::fs::write(&large, format!("# {}\n", "x".repeat(2 << 20))).unwrap();
    for (file, why) in [
        (fifo.to_str().unwrap(), "not a regular file"),
        ("/dev/zero", "not a regular file"),
        (large.to_str().unwrap(), "larger than"),
    ] {
        for command in [&["check-config", "--config", file][..], &["--config", file]] {
            let out = output_within(flowmetrics(command, &[]), Duration::from_secs(20))
                .unwrap_or_else(|| panic!("{command:?} did not end"));
            assert_eq!(out.status.code(), Some(2), "{command:?}");
            let err = String::from_utf8_lossy(&out.stderr);
            assert!(
                err.contains(file) && err.contains(why),
                "{command:?}: {err}"
            );
        }
    }
    let _ = std::fs::remove_dir_all(&dir);
}

#[test]
fn the_project_variables_stay_out_of_the_configuration_namespace() {
    // Every FLOWMETRICS_* variable the scripts, tests and benchmarks set or read must
    // be configuration (the service refuses any other as an unknown key).
    let out = flowmetrics(&["check-config"], &[]).output().unwrap();
    let yaml = String::from_utf8(out.stdout).unwrap();
    let sections: Vec<&str> = yaml
        .lines()
        .filter(|l| {
            !l.starts_with(' ') && l.ends_with(':') || l.contains(": ") && !l.starts_with(' ')
        })
        .filter_map(|l| l.split(':').next())
        .collect();
    let root = env!("CARGO_MANIFEST_DIR");
    let mut names = Vec::new();
    for dir in ["scripts", "tests", "tests/common", "bench/src", "docs"] {
        let Ok(entries) = std::fs::read_dir(format!("{root}/{dir}")) else {
            continue;
        };
        for entry in entries.map_while(Result::ok) {
            let Ok(text) = std::fs::read_to_string(entry.path()) else {
                continue;
            };
            let bytes = text.as_bytes();
            for (at, _) in text.match_indices("FLOWMETRICS_") {
                // A variable name starts here (not inside another, like E2E_FLOWMETRICS_BIN).
                if at > 0 && (bytes[at - 1].is_ascii_alphanumeric() || bytes[at - 1] == b'_') {
                    continue;
                }
                let name: String = text[at..]
                    .chars()
                    .take_while(|c| c.is_ascii_uppercase() || c.is_ascii_digit() || *c == '_')
                    .collect();
                names.push((name, entry.path()));
            }
        }
    }
    assert!(!names.is_empty());
    for (name, file) in names {
        let key = name["FLOWMETRICS_".len()..].to_ascii_lowercase();
        let section = key.split("__").next().unwrap();
        if name == "FLOWMETRICS_CONFIG" || name == "FLOWMETRICS_" || section.is_empty() {
            continue;
        }
        assert!(
            sections.contains(&section),
            "{name} in {} is not configuration: {sections:?}",
            file.display()
        );
    }
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
