//! Hostile clients over real loopback sockets (docs/behaviour.md §6): silent connections, a full
//! connection cap, slow bodies, a spent byte budget, a body written whole before the
//! answer is read, heavy decodes next to `/healthz`. Each time a good client must still
//! be served, and the bad ones must be bounded.

mod common;

use std::net::SocketAddr;
use std::time::{Duration, Instant};

use common::*;
use hyper::StatusCode;
use prost::Message;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;
use tokio::task::JoinHandle;

const PB: &str = PROTOBUF;
/// Upper bound of every wait in these tests: generous, never reached when things work.
const PATIENCE: Duration = Duration::from_secs(30);

/// The status of the answer on `s`, within [`PATIENCE`].
async fn status_within_patience(s: &mut TcpStream) -> Option<u16> {
    tokio::time::timeout(PATIENCE, read_status(s))
        .await
        .unwrap()
}

/// A connection with the head of a trace export of `len` bytes sent, its body not yet.
async fn headed(addr: SocketAddr, len: usize) -> TcpStream {
    let mut s = TcpStream::connect(addr).await.unwrap();
    s.write_all(&head("/v1/traces", PB, len)).await.unwrap();
    s
}

fn export(flow: &str, id: &str) -> Vec<u8> {
    let event = otlp::flow_event(
        format!("flow.{flow}.start"),
        id,
        None,
        1_700_000_000_000_000_000,
    );
    otlp::traces(None, vec![otlp::span(&[1; 16], &[2; 8], vec![event])]).encode_to_vec()
}

fn head(path: &str, content_type: &str, length: usize) -> Vec<u8> {
    format!(
        "POST {path} HTTP/1.1\r\nhost: flowmetrics\r\ncontent-type: {content_type}\r\ncontent-length: {length}\r\n\r\n"
    )
    .into_bytes()
}

/// The status code of the answer on `stream`, `None` if the connection ends first.
async fn read_status(stream: &mut TcpStream) -> Option<u16> {
    let mut buf = Vec::new();
    let mut chunk = [0u8; 4096];
    loop {
        if let Some(end) = buf.windows(4).position(|w| w == b"\r\n\r\n") {
            let head = String::from_utf8_lossy(&buf[..end]).into_owned();
            return head.split(' ').nth(1)?.parse().ok();
        }
        match stream.read(&mut chunk).await {
            Ok(0) | Err(_) => return None,
            Ok(n) => buf.extend_from_slice(&chunk[..n]),
        }
    }
}

/// One export over a fresh connection: its status.
async fn good_export(addr: SocketAddr, id: &str) -> StatusCode {
    let url = format!("http://{addr}/v1/traces");
    tokio::time::timeout(PATIENCE, post(&url, PB, export("good", id)))
        .await
        .expect("a good client is answered")
        .status
}

/// Resolves when the server closes `stream` (EOF or reset).
async fn closed_by_server(mut stream: TcpStream) {
    let mut chunk = [0u8; 1024];
    loop {
        match stream.read(&mut chunk).await {
            Ok(0) | Err(_) => return,
            Ok(_) => {}
        }
    }
}

const H2_PREFACE: &[u8] = b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n\x00\x00\x00\x04\x00\x00\x00\x00\x00";

/// Item 1: silent connections (nothing sent, or only the HTTP/2 preface) beyond the cap
/// on all three listeners; a good client still exports, `/metrics` still answers, and
/// every silent connection is closed by the idle timeout.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn silent_connections_beyond_the_cap_are_closed_and_starve_no_one() {
    const CAP: usize = 8;
    const SILENT: usize = 40;
    let mut config = test_config();
    config.limits.max_connections = flowmetrics::config::MaxConnections::Fixed(CAP);
    config.limits.idle_timeout = Duration::from_secs(1);
    let app = start(config).await;
    let targets = [app.otlp_http.unwrap(), app.otlp_grpc.unwrap(), app.metrics];
    let mut silent = Vec::new();
    for (i, addr) in targets.iter().cycle().take(SILENT * 3).enumerate() {
        let mut s = TcpStream::connect(addr).await.unwrap();
        if i % 2 == 1 {
            s.write_all(H2_PREFACE).await.unwrap();
        }
        silent.push(s);
    }
    // Five times the cap of silent connections on each OTLP listener: served anyway.
    for i in 0..3 {
        assert_eq!(
            good_export(app.otlp_http.unwrap(), &format!("g{i}")).await,
            StatusCode::OK
        );
        let m = tokio::time::timeout(PATIENCE, scrape(&app))
            .await
            .expect("/metrics answers");
        assert!(m.contains_key("flowmetrics_in_flight_entries"));
    }
    // And every silent one is closed (a read that never ends fails the test).
    let all = futures_join(silent.into_iter().map(closed_by_server));
    tokio::time::timeout(PATIENCE, all)
        .await
        .expect("every silent connection is closed by limits.idle_timeout");
    app.shutdown().await;
}

async fn futures_join<F: std::future::Future<Output = ()> + Send + 'static>(
    futures: impl Iterator<Item = F>,
) {
    let handles: Vec<_> = futures.map(tokio::spawn).collect();
    for h in handles {
        h.await.unwrap();
    }
}

/// Item 1: at the cap, silent connections make room: the idlest is closed for a new
/// one, so a good client is served long before the idle timeout (60 s) would free one.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn at_the_cap_the_idlest_connection_makes_room() {
    const CAP: usize = 8;
    let mut config = test_config();
    config.limits.max_connections = flowmetrics::config::MaxConnections::Fixed(CAP);
    config.limits.idle_timeout = Duration::from_secs(60);
    let app = start(config).await;
    let addr = app.otlp_http.unwrap();
    let mut silent = Vec::new();
    for _ in 0..CAP * 5 {
        silent.push(TcpStream::connect(addr).await.unwrap());
    }
    let started = Instant::now();
    for i in 0..3 {
        assert_eq!(good_export(addr, &format!("room{i}")).await, StatusCode::OK);
    }
    assert!(
        started.elapsed() < Duration::from_secs(30),
        "served only after {:?}",
        started.elapsed()
    );
    // The oldest silent ones were closed; the service holds no more than its cap.
    tokio::time::timeout(PATIENCE, closed_by_server(silent.remove(0)))
        .await
        .expect("the idlest connection was closed to make room");
    app.shutdown().await;
}

/// Item 1: when every connection has a request in flight, nothing more is accepted (the
/// descriptors stay with the kernel), the metrics listener is unaffected, and a waiting
/// client is served as soon as a slot frees.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn at_the_cap_with_every_connection_busy_new_clients_wait() {
    const CAP: usize = 4;
    let mut config = test_config();
    config.limits.max_connections = flowmetrics::config::MaxConnections::Fixed(CAP);
    let app = start(config).await;
    let addr = app.otlp_http.unwrap();
    let mut busy = Vec::new();
    for _ in 0..CAP {
        // A request in flight: headers sent, body not yet.
        let s = headed(addr, 100).await;
        busy.push(s);
    }
    tokio::time::sleep(Duration::from_millis(300)).await;
    let body = export("capped", "c1");
    let mut waiting = TcpStream::connect(addr).await.unwrap();
    waiting
        .write_all(&head("/v1/traces", PB, body.len()))
        .await
        .unwrap();
    waiting.write_all(&body).await.unwrap();
    let mut waiting = tokio::spawn(async move { read_status(&mut waiting).await });
    assert!(
        tokio::time::timeout(Duration::from_secs(1), &mut waiting)
            .await
            .is_err(),
        "a connection beyond limits.max_connections was served"
    );
    let m = tokio::time::timeout(PATIENCE, scrape(&app))
        .await
        .expect("/metrics answers while the OTLP listener is full");
    assert!(m.contains_key("flowmetrics_in_flight_entries"));
    drop(busy.pop());
    let status = tokio::time::timeout(PATIENCE, waiting)
        .await
        .expect("served once a slot frees")
        .unwrap();
    assert_eq!(status, Some(200));
    app.shutdown().await;
}

/// Item 2: 80 clients trickling their bodies hold no export slot: a good client gets
/// 200 every time while they trickle; the slow ones end with 408 at the deadline.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn slow_bodies_do_not_shut_out_good_clients() {
    const SLOW: usize = 80;
    let mut config = test_config();
    config.limits.request_read_timeout = Duration::from_secs(4);
    let app = start(config).await;
    let addr = app.otlp_http.unwrap();
    let mut slow = Vec::new();
    for _ in 0..SLOW {
        let mut s = headed(addr, 1000).await;
        slow.push(tokio::spawn(async move {
            // One byte every 200 ms: never done within the deadline.
            for _ in 0..100 {
                if s.write_all(b"\x0a").await.is_err() {
                    break;
                }
                tokio::time::sleep(Duration::from_millis(200)).await;
            }
            read_status(&mut s).await
        }));
    }
    tokio::time::sleep(Duration::from_millis(500)).await;
    for i in 0..5 {
        assert_eq!(
            good_export(addr, &format!("fast{i}")).await,
            StatusCode::OK,
            "a good client was refused while slow bodies trickled"
        );
    }
    for s in slow {
        let status = tokio::time::timeout(PATIENCE, s).await.unwrap().unwrap();
        assert_eq!(status, Some(408));
    }
    let m = scrape(&app).await;
    assert_eq!(
        value(
            &m,
            r#"flowmetrics_otlp_requests_total{transport="http",signal="traces",code="408"}"#
        ),
        SLOW as f64
    );
    app.shutdown().await;
}

/// Item 2: what bounds bodies being read is a budget of bytes. Three stalled bodies of
/// 400 KiB spend a 1 MiB budget: the next one gets 503 + Retry-After; once the stalled
/// ones time out, it gets 200.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_spent_byte_budget_answers_503_then_recovers() {
    const KIB: usize = 1024;
    let mut config = test_config();
    config.limits.max_request_body_bytes = 512 * KIB;
    config.limits.max_buffered_bytes = 1024 * KIB as u64;
    config.limits.request_read_timeout = Duration::from_secs(2);
    let app = start(config).await;
    let addr = app.otlp_http.unwrap();
    let mut stalled = Vec::new();
    for _ in 0..3 {
        let mut s = headed(addr, 400 * KIB).await;
        s.write_all(&vec![0u8; 300 * KIB]).await.unwrap();
        stalled.push(s);
    }
    tokio::time::sleep(Duration::from_millis(300)).await;
    let url = format!("http://{addr}/v1/traces");
    // A valid export padded to 300 KiB with an unknown field.
    let mut body = export("budget", "b1");
    body.extend_from_slice(&[0xfa, 0x3f]); // field 1023, length-delimited
    body.extend_from_slice(&[0x80, 0xe0, 0x12]); // 300 KiB
    body.extend_from_slice(&vec![0u8; 300 * KIB]);
    let r = post(&url, PB, body.clone()).await;
    assert_eq!(r.status, StatusCode::SERVICE_UNAVAILABLE, "{}", r.text());
    assert_eq!(r.headers["retry-after"], "1");
    for mut s in stalled {
        assert_eq!(status_within_patience(&mut s).await, Some(408));
    }
    let r = post(&url, PB, body).await;
    assert_eq!(r.status, StatusCode::OK, "{}", r.text());
    app.shutdown().await;
}

/// Item 4: a client that writes its whole over-long body before reading (Python's
/// http.client, most SDK transports) sees the 413, as sent with a length and chunked.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_over_long_body_written_whole_still_gets_its_413() {
    const LIMIT: usize = 64 * 1024;
    const SENT: usize = 4 * 1024 * 1024;
    let mut config = test_config();
    config.limits.max_request_body_bytes = LIMIT;
    let app = start(config).await;
    let addr = app.otlp_http.unwrap();
    for (path, content_type, want) in [
        ("/v1/traces", PB, 413),
        ("/v1/logs", "application/json", 413),
        ("/v1/traces", "text/plain", 415),
        ("/v2/nothing", PB, 404),
    ] {
        let mut s = TcpStream::connect(addr).await.unwrap();
        let mut request = head(path, content_type, SENT);
        request.resize(request.len() + SENT, b'x');
        tokio::time::timeout(PATIENCE, s.write_all(&request))
            .await
            .unwrap()
            .unwrap_or_else(|e| panic!("{path} {content_type}: writing the body: {e}"));
        let status = status_within_patience(&mut s).await;
        assert_eq!(status, Some(want), "{path} {content_type}");
    }
    // Chunked: the limit is found while reading.
    let mut s = TcpStream::connect(addr).await.unwrap();
    let mut request = format!(
        "POST /v1/traces HTTP/1.1\r\nhost: x\r\ncontent-type: {PB}\r\ntransfer-encoding: chunked\r\n\r\n"
    )
    .into_bytes();
    for _ in 0..(SENT / 4096) {
        request.extend_from_slice(b"1000\r\n");
        request.resize(request.len() + 4096, 0);
        request.extend_from_slice(b"\r\n");
    }
    request.extend_from_slice(b"0\r\n\r\n");
    tokio::time::timeout(PATIENCE, s.write_all(&request))
        .await
        .unwrap()
        .expect("writing a chunked body");
    let status = status_within_patience(&mut s).await;
    assert_eq!(status, Some(413));
    app.shutdown().await;
}

/// Item 10: answers to requests that are not OTLP are text a person can read; OTLP
/// requests keep their `google.rpc.Status`.
#[tokio::test]
async fn non_otlp_requests_are_answered_in_plain_text() {
    let app = start(test_config()).await;
    let base = format!("http://{}", app.otlp_http.unwrap());
    for (method, path, content_type, status) in [
        (hyper::Method::POST, "/nope", PB, 404),
        (hyper::Method::GET, "/v1/traces", "", 405),
        (hyper::Method::POST, "/v1/traces", "text/plain", 415),
    ] {
        let headers: Vec<(&str, &str)> = if content_type.is_empty() {
            vec![]
        } else {
            vec![("content-type", content_type)]
        };
        let r = request(method, &format!("{base}{path}"), &headers, "hello").await;
        assert_eq!(r.status.as_u16(), status, "{path}");
        assert_eq!(
            r.headers["content-type"], "text/plain; charset=utf-8",
            "{path}"
        );
        assert!(
            r.text().is_ascii() && r.text().ends_with('\n'),
            "{:?}",
            r.text()
        );
    }
    let r = post(&format!("{base}/v1/traces"), "application/json", "{nope").await;
    assert_eq!(r.status, StatusCode::BAD_REQUEST);
    assert_eq!(r.headers["content-type"], "application/json");
    assert!(r.text().starts_with("{\"code\":3"), "{}", r.text());
    app.shutdown().await;
}

/// A JSON export of `spans` spans, each with a flow event and padding attributes.
fn big_json(spans: usize) -> Vec<u8> {
    let span = r#"{"traceId":"0102030405060708090a0b0c0d0e0f10","spanId":"0102030405060708","name":"work","attributes":[{"key":"a","value":{"stringValue":"aaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaa"}},{"key":"b","value":{"intValue":"12345"}}],"events":[{"timeUnixNano":"1700000000000000000","name":"flow.heavy.start","attributes":[{"key":"correlation-id","value":{"stringValue":"x"}}]}]}"#;
    let mut out = br#"{"resourceSpans":[{"scopeSpans":[{"spans":["#.to_vec();
    for i in 0..spans {
        if i > 0 {
            out.push(b',');
        }
        out.extend_from_slice(span.as_bytes());
    }
    out.extend_from_slice(b"]}]}]}");
    out
}

/// Item 5: decoding runs off the async workers. Four clients post large JSON bodies
/// at once (on a runtime of one worker, so a decode on it would stall everything);
/// `/healthz` keeps answering while they are decoded.
#[tokio::test(flavor = "multi_thread", worker_threads = 1)]
async fn heavy_decodes_leave_healthz_responsive() {
    let app = start(test_config()).await;
    let url = format!("http://{}/v1/traces", app.otlp_http.unwrap());
    let body = bytes::Bytes::from(big_json(60_000));
    let started = Instant::now();
    let posts: Vec<_> = (0..4)
        .map(|_| {
            let (url, body) = (url.clone(), body.clone());
            tokio::spawn(async move { post(&url, "application/json", body).await.status })
        })
        .collect();
    let healthz = format!("http://{}/healthz", app.metrics);
    let mut worst = Duration::ZERO;
    let mut probes = 0;
    while !posts.iter().all(JoinHandle::is_finished) {
        let t = Instant::now();
        let r = tokio::time::timeout(
            PATIENCE,
            request(hyper::Method::GET, &healthz, &[], bytes::Bytes::new()),
        )
        .await
        .expect("/healthz answers");
        assert_eq!(r.status, StatusCode::OK);
        worst = worst.max(t.elapsed());
        probes += 1;
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    let decoding = started.elapsed();
    for p in posts {
        assert_eq!(p.await.unwrap(), StatusCode::OK);
    }
    // Only meaningful when decoding took long enough to stall a probe; it does (seconds,
    // against a bound of a quarter of it).
    assert!(probes >= 3, "{probes} probes in {decoding:?}");
    assert!(
        worst < decoding / 4,
        "/healthz took {worst:?} while decoding took {decoding:?}"
    );
    app.shutdown().await;
}

/// A chunked body with broken framing is bad input: 400 with a status that says so,
/// counted as `code="400"`, not as a client that went away.
#[tokio::test]
async fn a_malformed_chunked_body_is_a_400_that_says_why() {
    let app = start(test_config()).await;
    let addr = app.otlp_http.unwrap();
    let mut s = TcpStream::connect(addr).await.unwrap();
    let request = "POST /v1/traces HTTP/1.1\r\nhost: x\r\ncontent-type: application/json\r\ntransfer-encoding: chunked\r\n\r\n4\r\n{\"a\"\r\nzz\r\n";
    s.write_all(request.as_bytes()).await.unwrap();
    let mut answer = Vec::new();
    tokio::time::timeout(PATIENCE, s.read_to_end(&mut answer))
        .await
        .expect("answered")
        .ok();
    let answer = String::from_utf8_lossy(&answer);
    assert!(answer.starts_with("HTTP/1.1 400"), "{answer}");
    assert!(answer.contains("malformed request body"), "{answer}");
    assert!(!answer.contains("closed the request"), "{answer}");
    let m = scrape(&app).await;
    let series = |code: &str| {
        value(
            &m,
            &format!(
                r#"flowmetrics_otlp_requests_total{{transport="http",signal="traces",code="{code}"}}"#
            ),
        )
    };
    assert_eq!(series("400"), 1.0);
    assert_eq!(series("canceled"), 0.0);
    app.shutdown().await;
}

/// A body of three times the limit, past the 64 MiB that once ended the lingering read,
/// written whole before the answer is read: the client sees its 413 (which exporters do
/// not retry), not a broken pipe (which they do).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_body_three_times_the_limit_written_whole_gets_its_413() {
    const LIMIT: usize = 32 * 1024 * 1024;
    const SENT: usize = 3 * LIMIT;
    let mut config = test_config();
    config.limits.max_request_body_bytes = LIMIT;
    config.limits.request_read_timeout = Duration::from_secs(60);
    let app = start(config).await;
    let addr = app.otlp_http.unwrap();
    let mut s = TcpStream::connect(addr).await.unwrap();
    let mut request = head("/v1/traces", PB, SENT);
    request.resize(request.len() + SENT, b'x');
    tokio::time::timeout(Duration::from_secs(60), s.write_all(&request))
        .await
        .expect("written within the deadline")
        .expect("the whole body is taken, not reset");
    let status = status_within_patience(&mut s).await;
    assert_eq!(status, Some(413));
    app.shutdown().await;
}
