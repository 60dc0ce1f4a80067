//! The whole OTLP/HTTP path after the socket, over every signal, media type and
//! encoding: decompression, decoding (selective or full), extraction, correlation,
//! metrics, answer. Never a panic, only the statuses docs/behaviour.md §6 names, and a body compressed
//! by any encoding is judged as it is uncompressed.
#![no_main]

mod common;

use bytes::Bytes;
use flowmetrics::ingest::http::answer_body;
use libfuzzer_sys::fuzz_target;

const PATHS: [&str; 3] = ["/v1/traces", "/v1/logs", "/v1/metrics"];
const MEDIA: [&str; 2] = ["application/x-protobuf", "application/json"];
const ENCODINGS: [Option<&str>; 4] = [None, Some("gzip"), Some("deflate"), Some("zstd")];

fuzz_target!(|data: &[u8]| {
    let Some((&selector, body)) = data.split_first() else {
        return;
    };
    let w = common::world();
    let path = PATHS[usize::from(selector % 3)];
    let media = MEDIA[usize::from(selector / 3 % 2)];
    let encoding = ENCODINGS[usize::from(selector / 6 % 4)];
    let answer = |encoding: Option<&str>, body: Vec<u8>| {
        answer_body(
            &w.pipeline,
            &w.limits,
            path,
            Some(media),
            encoding,
            Bytes::from(body),
        )
        .0
    };
    // Top bit: the body is plain and compressed here, to reach the decoders through
    // every encoding; else it goes in as it is (the decompressors' own input).
    let compressed_here = selector & 0x80 != 0;
    let sent = match (compressed_here, encoding) {
        (false, _) | (true, None) => body.to_vec(),
        (true, Some("gzip")) => common::gzip(body),
        (true, Some("deflate")) => common::deflate(body),
        (true, Some(_)) => common::zstd(body),
    };
    let status = answer(encoding, sent).as_u16();
    assert!(
        matches!(status, 200 | 400 | 413),
        "status {status} for {path} {media} {encoding:?}"
    );
    if compressed_here && encoding.is_some() {
        let plain = answer(None, body.to_vec()).as_u16();
        assert_eq!(status, plain, "{encoding:?} judged unlike identity");
    }
});
