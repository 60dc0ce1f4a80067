//! The `flowmetrics-demo` binary as a user runs it: progress lines, the final summary
//! table, failed exports that name the endpoint and the cause, and the flow events it
//! sends (decoded from the OTLP requests) matching its summary.

use std::collections::{BTreeMap, HashMap};
use std::io::{BufRead, BufReader, Read, Write};
use std::net::{TcpListener, TcpStream};
use std::process::{Command, Output};
use std::sync::{Arc, Mutex};

use opentelemetry_proto::tonic::collector::trace::v1::ExportTraceServiceRequest;
use opentelemetry_proto::tonic::common::v1::any_value::Value;
use prost::Message as _;

const BIN: &str = env!("CARGO_BIN_EXE_flowmetrics-demo");

/// Request bodies in the order they arrived.
type Bodies = Arc<Mutex<Vec<Vec<u8>>>>;

/// A minimal OTLP/HTTP sink on loopback: answers every request with `status` and an
/// empty (valid) protobuf body; keeps the request bodies.
fn sink(status: &'static str) -> (String, Bodies) {
    let listener = TcpListener::bind("127.0.0.1:0").unwrap();
    let url = format!("http://{}", listener.local_addr().unwrap());
    let requests = Bodies::default();
    let counter = requests.clone();
    std::thread::spawn(move || {
        for conn in listener.incoming().flatten() {
            let counter = counter.clone();
            std::thread::spawn(move || serve(conn, status, &counter));
        }
    });
    (url, requests)
}

fn serve(conn: TcpStream, status: &str, counter: &Mutex<Vec<Vec<u8>>>) {
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
        counter.lock().unwrap().push(body);
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
    assert!(!requests.lock().unwrap().is_empty());

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

/// One flow event as the sink received it.
struct Received {
    flow: String,
    kind: String,
    id: String,
    step: Option<String>,
    /// Index of the request that carried it.
    request: usize,
}

fn decode_events(bodies: &[Vec<u8>]) -> Vec<Received> {
    let mut out = Vec::new();
    for (request, body) in bodies.iter().enumerate() {
        let req = ExportTraceServiceRequest::decode(body.as_slice()).expect("OTLP protobuf");
        for span in req
            .resource_spans
            .iter()
            .flat_map(|r| &r.scope_spans)
            .flat_map(|s| &s.spans)
        {
            for event in &span.events {
                let Some(rest) = event.name.strip_prefix("flow.") else {
                    continue;
                };
                let (flow, kind) = rest.rsplit_once('.').unwrap();
                let attr = |key: &str| {
                    event
                        .attributes
                        .iter()
                        .find(|kv| kv.key == key)
                        .and_then(|kv| kv.value.as_ref()?.value.clone())
                        .map(|v| match v {
                            Value::StringValue(s) => s,
                            other => panic!("{key}: not a string: {other:?}"),
                        })
                };
                out.push(Received {
                    flow: flow.to_string(),
                    kind: kind.to_string(),
                    id: attr("correlation-id").expect("correlation-id on every flow event"),
                    step: attr("step"),
                    request,
                });
            }
        }
    }
    out
}

#[test]
fn checkout_steps_are_sent_in_order_and_stall_at_every_step_as_the_summary_says() {
    const ORDER: [&str; 4] = ["cart", "payment_authorized", "packed", "shipped"];
    let (url, requests) = sink("200 OK");
    let summary = std::env::temp_dir().join(format!("demo-steps-{}.json", std::process::id()));
    let out = demo(
        &url,
        &["--rate", "400", "--summary", summary.to_str().unwrap()],
    );
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(out.status.success(), "{stderr}");
    let json: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(&summary).unwrap()).unwrap();
    let _ = std::fs::remove_file(&summary);
    let events = decode_events(&requests.lock().unwrap());

    // Per checkout instance: its start's request, its steps (name, request), its end's.
    #[derive(Default)]
    struct Instance {
        start: Option<usize>,
        steps: Vec<(String, usize)>,
        end: Option<usize>,
    }
    let mut checkout: HashMap<&str, Instance> = HashMap::new();
    for e in &events {
        assert!(
            e.kind == "start" || e.kind == "end" || e.kind == "step",
            "{}",
            e.kind
        );
        if e.kind == "step" {
            assert_eq!(e.flow, "checkout", "only checkout has steps");
        }
        if e.flow != "checkout" {
            continue;
        }
        let i = checkout.entry(&e.id).or_default();
        match e.kind.as_str() {
            "start" => i.start = Some(e.request),
            "end" => i.end = Some(e.request),
            _ => i
                .steps
                .push((e.step.clone().expect("step attribute"), e.request)),
        }
    }

    let mut sent = BTreeMap::<&str, u64>::new();
    let mut stalled = BTreeMap::<&str, u64>::new();
    let (mut step_before_start, mut end_before_start) = (0, 0);
    for (id, i) in &checkout {
        let start = i.start.unwrap_or_else(|| panic!("{id}: no start"));
        // The steps an instance sends are the first k of the order, each once.
        let mut names: Vec<&str> = i.steps.iter().map(|(s, _)| s.as_str()).collect();
        names.sort_by_key(|n| ORDER.iter().position(|o| o == n).expect("a known step"));
        assert_eq!(names, ORDER[..names.len()], "{id}");
        for n in &names {
            *sent.entry(n).or_default() += 1;
        }
        if i.end.is_none() {
            *stalled
                .entry(names.last().copied().unwrap_or("start"))
                .or_default() += 1;
        }
        step_before_start += i.steps.iter().any(|(_, r)| *r < start) as u32;
        end_before_start += i.end.is_some_and(|r| r < start) as u32;
    }
    let want = &json["flows"]["checkout"];
    assert_eq!(want["started"], checkout.len() as u64);
    for step in ORDER {
        assert_eq!(want["steps"][step], sent[step], "step {step} sent");
    }
    let mut unfinished = 0;
    for at in ["start", "cart", "payment_authorized", "packed", "shipped"] {
        let n = stalled.get(at).copied().unwrap_or(0);
        assert_eq!(want["stalled"][at], n, "stalled at {at}");
        assert!(n > 0, "some instances stall at {at}: {stalled:?}");
        unfinished += n;
    }
    assert_eq!(want["unfinished"], unfinished);
    assert!(
        step_before_start > 0,
        "some steps are exported before their start"
    );
    assert!(
        end_before_start > 0,
        "some ends are exported before their start"
    );
    assert!(
        stderr.contains("checkout steps sent: cart ")
            && stderr.contains("checkout unfinished, by last step sent: start "),
        "{stderr}"
    );
    // Flows without steps have no step keys in the summary.
    assert!(json["flows"]["payment"].get("steps").is_none());
}
