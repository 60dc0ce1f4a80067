//! gRPC unary framing: the 5-byte prefix, compression flag and encodings, message
//! length against the body, one message per call. Never a panic; a message framed
//! correctly is judged as the same bytes are over OTLP/HTTP protobuf.
#![no_main]

mod common;

use bytes::Bytes;
use flowmetrics::ingest::grpc::answer_message;
use flowmetrics::ingest::http::answer_body;
use libfuzzer_sys::fuzz_target;

const PATHS: [(&str, &str); 3] = [
    (
        "/opentelemetry.proto.collector.trace.v1.TraceService/Export",
        "/v1/traces",
    ),
    (
        "/opentelemetry.proto.collector.logs.v1.LogsService/Export",
        "/v1/logs",
    ),
    (
        "/opentelemetry.proto.collector.metrics.v1.MetricsService/Export",
        "/v1/metrics",
    ),
];
const ENCODINGS: [Option<&[u8]>; 3] = [None, Some(b"gzip"), Some(b"zstd")];

fuzz_target!(|data: &[u8]| {
    let Some((&selector, rest)) = data.split_first() else {
        return;
    };
    let w = common::world();
    let (grpc_path, http_path) = PATHS[usize::from(selector % 3)];
    let encoding = ENCODINGS[usize::from(selector / 3 % 3)];
    // Top bit: `rest` is the message, framed (and compressed) here; else it is the
    // whole body, framing included.
    if selector & 0x80 == 0 {
        let _ = answer_message(
            &w.pipeline,
            &w.limits,
            grpc_path,
            encoding,
            Bytes::copy_from_slice(rest),
        );
        return;
    }
    let (flag, payload) = match encoding {
        None => (0u8, rest.to_vec()),
        Some(b"gzip") => (1, common::gzip(rest)),
        Some(_) => (1, common::zstd(rest)),
    };
    let mut framed = vec![flag];
    framed.extend_from_slice(&(payload.len() as u32).to_be_bytes());
    framed.extend_from_slice(&payload);
    let grpc = answer_message(
        &w.pipeline,
        &w.limits,
        grpc_path,
        encoding,
        Bytes::from(framed),
    );
    let (http, _) = answer_body(
        &w.pipeline,
        &w.limits,
        http_path,
        Some("application/x-protobuf"),
        None,
        Bytes::copy_from_slice(rest),
    );
    assert_eq!(
        grpc.is_ok(),
        http.as_u16() == 200,
        "gRPC {:?} but HTTP {http}",
        grpc.as_ref().map(|_| ()).map_err(|s| s.code())
    );
});
