//! The `flowmetrics-demo` binary as a user runs it: progress lines, the final summary
//! table, and failed exports that name the endpoint and the cause.

use std::io::{BufRead, BufReader, Read, Write};
use std::net::{TcpListener, TcpStream};
use std::process::{Command, Output};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;

const BIN: &str = env!("CARGO_BIN_EXE_flowmetrics-demo");

/// A minimal OTLP/HTTP sink on loopback: answers every request with `status` and an
/// empty (valid) protobuf body; counts the requests.
fn sink(status: &'static str) -> (String, Arc<AtomicU64>) {
    let listener = TcpListener::bind("127.0.0.1:0").unwrap();
    let url = format!("http://{}", listener.local_addr().unwrap());
    let requests = Arc::new(AtomicU64::new(0));
    let counter = requests.clone();
    std::thread::spawn(move || {
        for conn in listener.incoming().flatten() {
            let counter = counter.clone();
            std::thread::spawn(move || serve(conn, status, &counter));
        }
    });
    (url, requests)
}

fn serve(conn: TcpStream, status: &str, counter: &AtomicU64) {
    let mut reader = BufReader::new(conn.try_clone().unwrap());
    let mut conn = conn;
    loop {
        let mut length = 0usize;
        let mut line = String::new();
        loop {
            line.clear();
            if reader.read_line(&mut line).unwrap_or(0) == 0 {
                return;
            }
            let l = line.trim_end();
            if l.is_empty() {
                break;
            }
            if let Some((k, v)) = l.split_once(':') {
                if k.eq_ignore_ascii_case("content-length") {
                    length = v.trim().parse().unwrap_or(0);
                }
            }
        }
        let mut body = vec![0; length];
        if reader.read_exact(&mut body).is_err() {
            return;
        }
        counter.fetch_add(1, Ordering::Relaxed);
        let reply = format!(
            "HTTP/1.1 {status}\r\ncontent-type: application/x-protobuf\r\ncontent-length: 0\r\n\r\n"
        );
        if conn.write_all(reply.as_bytes()).is_err() {
            return;
        }
    }
}

fn demo(endpoint: &str, extra: &[&str]) -> Output {
    Command::new(BIN)
        .args([
            "--endpoint",
            endpoint,
            "--rate",
            "50",
            "--duration",
            "2500ms",
            "--max-latency",
            "50ms",
            "--progress",
            "1s",
            "--seed",
            "3",
        ])
        .args(extra)
        .output()
        .unwrap()
}

/// The final table's row for `name`: started, success, failure, cancelled, unfinished.
fn table_row(stderr: &str, name: &str) -> Vec<u64> {
    let line = stderr
        .lines()
        .find(|l| l.split_whitespace().next() == Some(name))
        .unwrap_or_else(|| panic!("no {name} row in:\n{stderr}"));
    line.split_whitespace()
        .skip(1)
        .map(|n| n.parse().unwrap())
        .collect()
}

#[test]
fn progress_lines_and_a_summary_table_that_matches_the_summary_file() {
    let (url, requests) = sink("200 OK");
    let summary = std::env::temp_dir().join(format!("demo-cli-{}.json", std::process::id()));
    let out = demo(&url, &["--summary", summary.to_str().unwrap()]);
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(out.status.success(), "{stderr}");
    assert!(requests.load(Ordering::Relaxed) > 0);

    let progress: Vec<&str> = stderr
        .lines()
        .filter(|l| l.contains(" flows/s") && l.contains(" ended"))
        .collect();
    assert!(progress.len() >= 2, "a line every second:\n{stderr}");
    for line in &progress {
        for flow in ["checkout", "payment", "refund"] {
            assert!(line.contains(&format!("{flow} ")), "{line}");
        }
        assert!(
            line.contains(" started ") && line.contains(" ended"),
            "{line}"
        );
        assert!(
            line.contains("exports ") && line.contains(" failed"),
            "{line}"
        );
    }

    let json = std::fs::read_to_string(&summary).unwrap();
    let _ = std::fs::remove_file(&summary);
    let mut total = [0u64; 5];
    for flow in ["checkout", "payment", "refund"] {
        let row = table_row(&stderr, flow);
        let field = |k: &str| -> u64 {
            let at = json.find(&format!("\"{flow}\":")).unwrap();
            let rest = &json[at..];
            let at = rest.find(&format!("\"{k}\":")).unwrap() + k.len() + 3;
            rest[at..]
                .split(|c: char| !c.is_ascii_digit())
                .next()
                .unwrap()
                .parse()
                .unwrap()
        };
        let want: Vec<u64> = ["started", "success", "failure", "cancelled", "unfinished"]
            .iter()
            .map(|k| field(k))
            .collect();
        assert_eq!(row, want, "{flow}: table vs {json}");
        for (t, v) in total.iter_mut().zip(&row) {
            *t += v;
        }
    }
    assert_eq!(table_row(&stderr, "total"), total.to_vec(), "{stderr}");
    assert!(total[0] > 0, "{stderr}");
    assert!(stderr.contains(" ok, 0 failed"), "{stderr}");
}

#[test]
fn a_refused_connection_names_the_endpoint_and_the_cause() {
    // A port nothing listens on: bound, then closed.
    let port = TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port();
    for protocol in ["http", "grpc"] {
        let endpoint = format!("http://127.0.0.1:{port}");
        let out = demo(&endpoint, &["--protocol", protocol, "--duration", "1s"]);
        let stderr = String::from_utf8_lossy(&out.stderr);
        assert_eq!(out.status.code(), Some(1), "{protocol}: {stderr}");
        let warning = format!("failed: connection refused at {endpoint}");
        assert!(stderr.contains(&warning), "{protocol}: {stderr}");
        assert!(
            stderr.contains(" 0 ok, ") && !stderr.contains(" 0 failed ("),
            "{protocol}: {stderr}"
        );
    }
}

#[test]
fn a_rejecting_server_is_named_with_its_status() {
    let (url, _) = sink("503 Service Unavailable");
    let out = demo(&url, &["--duration", "1s"]);
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(1), "{stderr}");
    assert!(
        stderr.contains(&format!("failed: HTTP 503 Service Unavailable at {url}")),
        "{stderr}"
    );
}
