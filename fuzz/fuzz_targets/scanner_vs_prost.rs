//! Differential: the selective scanner against a full prost decode of the same bytes.
//! Whenever prost (plus the id-length checks every path makes) accepts a body, the scan
//! accepts it and finds exactly the same flow events, in order. Where prost refuses
//! and the scan accepts, the difference is one README lists (bytes the scan never looks
//! into); the scan never refuses what prost accepts.
#![no_main]

mod common;

use flowmetrics::flows::scan::{reference_scan, scan_traces};
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    let x = common::extractor();
    let scan = scan_traces(data, x, 1);
    let Ok(full) = reference_scan(data, x, 1) else {
        return;
    };
    let scan = match scan {
        Ok(scan) => scan,
        Err(e) => panic!("prost accepts, the scan refuses: {e}"),
    };
    assert_eq!(scan.spans, full.spans, "span counts differ");
    assert_eq!(
        format!("{:?}", scan.events),
        format!("{:?}", full.events),
        "flow events differ"
    );
});
