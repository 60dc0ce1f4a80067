//! The store's housekeeping: moka has no thread of its own, so a thread of the
//! service's runs the store's pending tasks (time-outs, evictions, overdue counts) on a
//! short interval.

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::Duration;

use crate::flows::store::CorrelationStore;

/// Runs a store's housekeeping on a dedicated thread until dropped: moka has no thread
/// of its own, and a burst of expirations must not stall a tokio worker.
pub struct Maintenance {
    stop: Arc<AtomicBool>,
    handle: Option<std::thread::JoinHandle<()>>,
}

impl Maintenance {
    /// Runs `store`'s pending tasks every `every` on a thread of its own.
    pub fn start(store: Arc<dyn CorrelationStore>, every: Duration) -> Self {
        let stop = Arc::new(AtomicBool::new(false));
        let thread_stop = stop.clone();
        let handle = std::thread::Builder::new()
            .name("store-maintenance".into())
            .spawn(move || {
                while !thread_stop.load(Ordering::Acquire) {
                    store.run_pending_tasks();
                    std::thread::park_timeout(every);
                }
            })
            .expect("spawn maintenance thread");
        Self {
            stop,
            handle: Some(handle),
        }
    }
}

impl Drop for Maintenance {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::Release);
        if let Some(h) = self.handle.take() {
            h.thread().unpark();
            let _ = h.join();
        }
    }
}
