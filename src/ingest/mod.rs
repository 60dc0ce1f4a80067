//! Transports in: OTLP/HTTP and OTLP/gRPC, both feeding [`crate::pipeline::Pipeline`].

pub mod decode;
pub mod grpc;
pub mod http;
pub mod json;
pub mod limits;
pub mod reply;

use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{SystemTime, UNIX_EPOCH};

use crate::flows::store::StoreError;

/// When a refusal for the store was last logged (Unix ms), for all transports.
static STORE_WARNED: AtomicU64 = AtomicU64::new(0);

/// An export refused because the correlation store failed: logged with the store's own
/// error (a WARN at most every 10 s; each refusal is counted in
/// `flowmetrics_otlp_requests_total` anyway), answered 503 / UNAVAILABLE by the
/// transport with the message returned here, and retried by the exporter.
pub(crate) fn store_refusal(transport: &str, e: &StoreError) -> String {
    let now = SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| u64::try_from(d.as_millis()).unwrap_or(u64::MAX));
    let last = STORE_WARNED.load(Ordering::Relaxed);
    if now.saturating_sub(last) >= 10_000
        && STORE_WARNED
            .compare_exchange(last, now, Ordering::Relaxed, Ordering::Relaxed)
            .is_ok()
    {
        tracing::warn!("{transport}: refusing exports: {e}; clients retry on 503 / UNAVAILABLE");
    }
    format!("{e}; retry shortly")
}
