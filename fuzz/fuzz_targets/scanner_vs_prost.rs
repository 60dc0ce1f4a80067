//! Differential: the selective scanner against a full prost decode of the same bytes.
//! Whenever prost (plus the id-length checks every path makes) accepts a body, the scan
//! accepts it and finds exactly the same flow events, in order. Where prost refuses
//! and the scan accepts, the difference is one docs/limits.md lists (bytes the scan never
//! looks into); the scan never refuses what prost accepts.
#![no_main]

mod common;

use flowmetrics::flows::decoded::trace_events;
use flowmetrics::flows::scan::scan_traces;
use flowmetrics::ingest::decode::{decode, MediaType};
use libfuzzer_sys::fuzz_target;
use opentelemetry_proto::tonic::collector::trace::v1::ExportTraceServiceRequest;

fuzz_target!(|data: &[u8]| {
    let x = common::extractor();
    let scan = scan_traces(data, x, 1);
    let Ok(full) = decode::<ExportTraceServiceRequest>(data, MediaType::Protobuf) else {
        return;
    };
    let full_spans: u64 = full
        .resource_spans
        .iter()
        .flat_map(|r| &r.scope_spans)
        .map(|s| s.spans.len() as u64)
        .sum();
    let full_events = trace_events(&full, x, None, 1).events;
    let scan = match scan {
        Ok(scan) => scan,
        Err(e) => panic!("prost accepts, the scan refuses: {e}"),
    };
    assert_eq!(scan.spans, full_spans, "span counts differ");
    assert_eq!(
        format!("{:?}", scan.events),
        format!("{:?}", full_events),
        "flow events differ"
    );
});
