//! Scrape load against the real binary: clients that GET `/metrics` in a tight loop
//! (pinned with the load generator), and a storm of concurrent and slow scrapers whose
//! effect on the server's peak RSS is read from `/proc/<pid>/status` (VmHWM).

use std::io::{Read, Write};
use std::net::{SocketAddr, TcpStream};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use crate::server;

/// Clients scraping `/metrics` back to back until dropped.
pub struct LoopScrapers {
    stop: Arc<AtomicBool>,
    pub scrapes: Arc<AtomicU64>,
    threads: Vec<JoinHandle<()>>,
}

impl LoopScrapers {
    pub fn start(addr: SocketAddr, clients: usize) -> LoopScrapers {
        let stop = Arc::new(AtomicBool::new(false));
        let scrapes = Arc::new(AtomicU64::new(0));
        let threads = (0..clients)
            .map(|_| {
                let (stop, scrapes) = (stop.clone(), scrapes.clone());
                std::thread::spawn(move || {
                    server::pin_to_cpu(server::LOAD_CPU);
                    // Lowest priority beside the load generator: the row measures what
                    // the scrapes cost the server, not a starved load generator.
                    // SAFETY: setpriority on the calling thread (Linux: who 0 = caller).
                    unsafe {
                        libc::setpriority(libc::PRIO_PROCESS, 0, 19);
                    }
                    while !stop.load(Ordering::Relaxed) {
                        if get(addr, Duration::from_secs(30)).is_some_and(|n| n > 0) {
                            scrapes.fetch_add(1, Ordering::Relaxed);
                        }
                    }
                })
            })
            .collect();
        LoopScrapers {
            stop,
            scrapes,
            threads,
        }
    }
}

impl Drop for LoopScrapers {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::Relaxed);
        for t in self.threads.drain(..) {
            let _ = t.join();
        }
    }
}

/// GET /metrics on a fresh connection, body read and discarded: its length.
fn get(addr: SocketAddr, timeout: Duration) -> Option<u64> {
    let mut s = TcpStream::connect(addr).ok()?;
    s.set_read_timeout(Some(timeout)).ok()?;
    s.write_all(b"GET /metrics HTTP/1.1\r\nhost: x\r\nconnection: close\r\n\r\n")
        .ok()?;
    let mut buf = vec![0u8; 256 * 1024];
    let mut total = 0u64;
    loop {
        match s.read(&mut buf) {
            Ok(0) => return Some(total),
            Ok(n) => total += n as u64,
            Err(_) => return None,
        }
    }
}

/// What a storm did.
pub struct Storm {
    pub complete: u64,
    pub slow_cut: u64,
    pub peak_rss: u64,
    pub secs: f64,
}

/// `concurrent` clients GET `/metrics` at once while `slow` more read their answer one
/// byte a second (until the server cuts them off, or 60 s); returns the server's peak
/// RSS (VmHWM) afterwards.
pub fn storm(addr: SocketAddr, pid: u32, concurrent: usize, slow: usize) -> Storm {
    let started = Instant::now();
    let slow_threads: Vec<_> = (0..slow)
        .map(|_| {
            std::thread::spawn(move || {
                let mut s = TcpStream::connect(addr).ok()?;
                s.write_all(b"GET /metrics HTTP/1.1\r\nhost: x\r\n\r\n")
                    .ok()?;
                s.set_read_timeout(Some(Duration::from_secs(60))).ok()?;
                let t = Instant::now();
                let mut byte = [0u8; 1];
                while t.elapsed() < Duration::from_secs(60) {
                    if let Ok(Some(_)) = s.take_error() {
                        return Some(());
                    }
                    match s.read(&mut byte) {
                        Ok(0) | Err(_) => return Some(()),
                        Ok(_) => std::thread::sleep(Duration::from_secs(1)),
                    }
                }
                None
            })
        })
        .collect();
    let fast: Vec<_> = (0..concurrent)
        .map(|_| std::thread::spawn(move || get(addr, Duration::from_secs(60))))
        .collect();
    let complete = fast
        .into_iter()
        .map(|t| t.join().ok().flatten().is_some_and(|n| n > 1024))
        .filter(|ok| *ok)
        .count() as u64;
    let slow_cut = slow_threads
        .into_iter()
        .map(|t| t.join().ok().flatten().is_some())
        .filter(|cut| *cut)
        .count() as u64;
    Storm {
        complete,
        slow_cut,
        peak_rss: peak_rss_bytes(pid),
        secs: started.elapsed().as_secs_f64(),
    }
}

/// VmHWM of a process, in bytes.
pub fn peak_rss_bytes(pid: u32) -> u64 {
    std::fs::read_to_string(format!("/proc/{pid}/status"))
        .ok()
        .and_then(|s| {
            s.lines()
                .find(|l| l.starts_with("VmHWM:"))
                .and_then(|l| l.split_whitespace().nth(1))
                .and_then(|kb| kb.parse::<u64>().ok())
        })
        .map_or(0, |kb| kb * 1024)
}
