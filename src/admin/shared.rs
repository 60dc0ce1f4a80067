//! Responses shared by concurrent requests, and a bound on how many exist at once.
//!
//! A request for a body (an exposition in one format, the overview's JSON) that arrives
//! while the same body is being made waits for it and gets the same [`Bytes`] (shared,
//! not copied). At most one body per key is made at a time; a finished one is not
//! reused (the next request makes a fresh one, so a scrape always sees what was recorded
//! before it arrived, unless it joins one already being made).
//!
//! Every body holds a place in a budget of [`MAX_BODIES`] until its last reference is
//! dropped (the last slow reader cut off by the write deadline): with readers holding
//! older bodies, memory is at most that many bodies, however many clients there are.
//! A body that finds no place within [`BODY_WAIT`] is answered 503.
//!
//! Encodes are paced: one starts no sooner than [`ENCODE_PACE`] times the last one's
//! length after it ended, so that scrapers in a tight loop take at most about a quarter
//! of a core from ingest. A request that arrives meanwhile joins the body about to be
//! made, which still starts after it arrived (no scrape gets older data).

use std::collections::HashMap;
use std::hash::Hash;
use std::sync::{Arc, Mutex, PoisonError};
use std::time::Duration;

use bytes::Bytes;
use tokio::sync::{watch, OwnedSemaphorePermit, Semaphore};

use crate::metrics::ExpositionFormat;

/// Distinct bodies in memory at once, across every key.
pub const MAX_BODIES: usize = 4;
/// How long making a body waits for a place among [`MAX_BODIES`].
pub const BODY_WAIT: Duration = Duration::from_secs(5);

/// After an encode of length d, the next starts no sooner than `ENCODE_PACE × d` later.
pub const ENCODE_PACE: u32 = 3;
/// The longest a body waits for its turn under [`ENCODE_PACE`].
const MAX_PACE_WAIT: Duration = Duration::from_secs(2);

/// What a body is.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum BodyKey {
    /// `/metrics`, in one format, gzip-compressed or not.
    Exposition {
        /// The exposition format asked for.
        format: ExpositionFormat,
        /// Compressed with gzip.
        gzip: bool,
    },
    /// `/api/flows`.
    Overview,
    /// `/`: the page with the overview's data in it.
    Page,
}

/// Why no body.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
pub enum BodyError {
    /// Every place for a body is held by responses still being written.
    #[error("every place for a response body is held by responses still being written")]
    Busy,
    /// Making the body failed.
    #[error("making the response failed")]
    Failed,
}

type Outcome = Option<Result<Bytes, BodyError>>;

/// The bodies of `/metrics`, `/` and `/api/flows`: one made for every request that
/// asks while it is being made, and a bound on how many are held at once.
pub struct SharedBodies {
    making: Arc<Mutex<HashMap<BodyKey, watch::Receiver<Outcome>>>>,
    places: Arc<Semaphore>,
    wait: Duration,
    /// When the next encode may start ([`ENCODE_PACE`]).
    next_start: Arc<Mutex<tokio::time::Instant>>,
}

impl Default for SharedBodies {
    fn default() -> Self {
        Self::new(MAX_BODIES, BODY_WAIT)
    }
}

/// A body's bytes and its place in the budget, freed with the last reference.
struct Owned {
    bytes: Vec<u8>,
    _place: OwnedSemaphorePermit,
}

impl AsRef<[u8]> for Owned {
    fn as_ref(&self) -> &[u8] {
        &self.bytes
    }
}

impl SharedBodies {
    /// At most `max_bodies` bodies held at once; a request waits at most `wait` for a place.
    pub fn new(max_bodies: usize, wait: Duration) -> Self {
        Self {
            making: Arc::default(),
            places: Arc::new(Semaphore::new(max_bodies.max(1))),
            wait,
            next_start: Arc::new(Mutex::new(tokio::time::Instant::now())),
        }
    }

    /// The body for `key`: the one being made now, or a new one made by `make` (on the
    /// blocking pool: encoding must not stall the async workers).
    pub async fn get<F>(&self, key: BodyKey, make: F) -> Result<Bytes, BodyError>
    where
        F: FnOnce() -> Vec<u8> + Send + 'static,
    {
        let mut outcome = {
            let mut making = self.making.lock().unwrap_or_else(PoisonError::into_inner);
            match making.get(&key) {
                Some(rx) => rx.clone(),
                None => {
                    let (tx, rx) = watch::channel(None);
                    making.insert(key, rx.clone());
                    // Its own task: a requester that goes away does not stop the others'.
                    tokio::spawn(make_body(
                        self.making.clone(),
                        key,
                        tx,
                        self.places.clone(),
                        self.wait,
                        self.next_start.clone(),
                        make,
                    ));
                    rx
                }
            }
        };
        let done = match outcome.wait_for(Option::is_some).await {
            Ok(done) => done.clone(),
            Err(_) => None,
        };
        done.unwrap_or(Err(BodyError::Failed))
    }

    /// Places free now (for tests).
    pub fn free_places(&self) -> usize {
        self.places.available_permits()
    }
}

async fn make_body<F>(
    making: Arc<Mutex<HashMap<BodyKey, watch::Receiver<Outcome>>>>,
    key: BodyKey,
    tx: watch::Sender<Outcome>,
    places: Arc<Semaphore>,
    wait: Duration,
    next_start: Arc<Mutex<tokio::time::Instant>>,
    make: F,
) where
    F: FnOnce() -> Vec<u8> + Send + 'static,
{
    let turn = *next_start.lock().unwrap_or_else(PoisonError::into_inner);
    let now = tokio::time::Instant::now();
    tokio::time::sleep_until(turn.min(now + MAX_PACE_WAIT)).await;
    let outcome = match tokio::time::timeout(wait, places.acquire_owned()).await {
        Ok(Ok(place)) => tokio::task::spawn_blocking(move || {
            let started = tokio::time::Instant::now();
            let bytes = Bytes::from_owner(Owned {
                bytes: make(),
                _place: place,
            });
            let ended = tokio::time::Instant::now();
            let turn = ended + (ended - started) * ENCODE_PACE;
            let mut next = next_start.lock().unwrap_or_else(PoisonError::into_inner);
            *next = (*next).max(turn);
            bytes
        })
        .await
        .map_err(|e| {
            tracing::error!("making a response failed: {e}");
            BodyError::Failed
        }),
        _ => {
            tracing::warn!(
                "no place for a response body within {wait:?}: {} bodies are held by \
                 responses still being written (limits.response_write_timeout bounds them)",
                MAX_BODIES
            );
            Err(BodyError::Busy)
        }
    };
    // Gone from the map first: a request arriving after this makes a fresh body.
    making
        .lock()
        .unwrap_or_else(PoisonError::into_inner)
        .remove(&key);
    let _ = tx.send(Some(outcome));
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::atomic::{AtomicUsize, Ordering};

    const KEY: BodyKey = BodyKey::Exposition {
        format: ExpositionFormat::OpenMetrics,
        gzip: false,
    };

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn concurrent_requests_share_one_body() {
        let shared = Arc::new(SharedBodies::default());
        let made = Arc::new(AtomicUsize::new(0));
        let (go_tx, go_rx) = std::sync::mpsc::channel::<()>();
        let go_rx = Arc::new(Mutex::new(go_rx));
        let mut tasks = Vec::new();
        for _ in 0..10 {
            let (shared, made, go_rx) = (shared.clone(), made.clone(), go_rx.clone());
            tasks.push(tokio::spawn(async move {
                shared
                    .get(KEY, move || {
                        made.fetch_add(1, Ordering::SeqCst);
                        let _ = go_rx.lock().unwrap().recv();
                        vec![7u8; 1000]
                    })
                    .await
            }));
        }
        tokio::time::sleep(Duration::from_millis(200)).await;
        go_tx.send(()).unwrap();
        let mut bodies = Vec::new();
        for t in tasks {
            bodies.push(t.await.unwrap().unwrap());
        }
        assert_eq!(made.load(Ordering::SeqCst), 1);
        let first = bodies[0].as_ptr();
        assert!(bodies
            .iter()
            .all(|b| b.as_ptr() == first && b.len() == 1000));
        // Held by the responses: one place; freed with the last reference.
        assert_eq!(shared.free_places(), MAX_BODIES - 1);
        drop(bodies);
        assert_eq!(shared.free_places(), MAX_BODIES);
        // Not reused once finished: the next request makes a new one.
        let again = shared.get(KEY, || vec![1u8]).await.unwrap();
        assert_eq!(&again[..], &[1u8]);
    }

    #[tokio::test]
    async fn bodies_past_the_budget_wait_then_are_refused() {
        let shared = SharedBodies::new(2, Duration::from_millis(100));
        let a = shared.get(KEY, || vec![1]).await.unwrap();
        let b = shared.get(BodyKey::Overview, || vec![2]).await.unwrap();
        assert_eq!(
            shared.get(KEY, || vec![3]).await.unwrap_err(),
            BodyError::Busy
        );
        drop(a);
        assert_eq!(&shared.get(KEY, || vec![4]).await.unwrap()[..], &[4]);
        drop(b);
    }
}
