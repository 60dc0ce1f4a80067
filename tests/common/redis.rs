//! A real `redis-server` for the tests: started on a free loopback port in a temporary
//! directory, with no persistence, and stopped when dropped. Without `redis-server` on
//! PATH the tests that need one are skipped with a message, unless
//! `FLOWMETRICS_REQUIRE_REDIS` is set (CI: `scripts/redis-test.sh`), where they fail.
#![allow(dead_code)]

use std::net::TcpListener;
use std::path::PathBuf;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

pub struct RedisServer {
    pub port: u16,
    dir: PathBuf,
    persistent: bool,
    child: Option<Child>,
}

/// Whether a redis-server can be run here; prints why not.
pub fn available() -> bool {
    let found = Command::new("redis-server")
        .arg("--version")
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .status()
        .is_ok_and(|s| s.success());
    if !found {
        assert!(
            std::env::var_os("FLOWMETRICS_REQUIRE_REDIS").is_none(),
            "redis-server not found, and FLOWMETRICS_REQUIRE_REDIS is set"
        );
        eprintln!("SKIPPED: redis-server not found (install it: scripts/redis-test.sh does)");
    }
    found
}

impl RedisServer {
    /// A new server on a free port; `None` (skip) if redis-server is not installed.
    pub fn start() -> Option<RedisServer> {
        Self::start_with(false)
    }

    /// With an append-only file synced on every write: what it holds survives a stop,
    /// also a SIGKILL (the README's persistence settings).
    pub fn start_persistent() -> Option<RedisServer> {
        Self::start_with(true)
    }

    fn start_with(persistent: bool) -> Option<RedisServer> {
        if !available() {
            return None;
        }
        let port = TcpListener::bind("127.0.0.1:0")
            .and_then(|l| l.local_addr())
            .expect("a free port")
            .port();
        let dir =
            std::env::temp_dir().join(format!("flowmetrics-redis-{}-{port}", std::process::id()));
        std::fs::create_dir_all(&dir).expect("temp dir");
        let mut server = RedisServer {
            port,
            dir,
            persistent,
            child: None,
        };
        server.restart();
        Some(server)
    }

    pub fn url(&self) -> String {
        format!("redis://127.0.0.1:{}/0", self.port)
    }

    /// Starts it again on the same port (after [`RedisServer::stop`]).
    pub fn restart(&mut self) {
        assert!(self.child.is_none(), "already running");
        let child = Command::new("redis-server")
            .args(["--port", &self.port.to_string()])
            .args(["--bind", "127.0.0.1"])
            .args(if self.persistent {
                [
                    "--save",
                    "",
                    "--appendonly",
                    "yes",
                    "--appendfsync",
                    "always",
                ]
            } else {
                ["--save", "", "--appendonly", "no", "--appendfsync", "no"]
            })
            .arg("--dir")
            .arg(&self.dir)
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .expect("redis-server starts");
        self.child = Some(child);
        let give_up = Instant::now() + Duration::from_secs(10);
        while self.ping().is_err() {
            assert!(Instant::now() < give_up, "redis-server did not answer");
            std::thread::sleep(Duration::from_millis(20));
        }
    }

    /// Stops it (SIGKILL: nothing is saved; it has no persistence anyway).
    pub fn stop(&mut self) {
        if let Some(mut child) = self.child.take() {
            let _ = child.kill();
            let _ = child.wait();
        }
    }

    pub fn pid(&self) -> Option<u32> {
        self.child.as_ref().map(Child::id)
    }

    pub fn connection(&self) -> redis::RedisResult<redis::Connection> {
        redis::Client::open(self.url())?.get_connection_with_timeout(Duration::from_secs(1))
    }

    fn ping(&self) -> redis::RedisResult<()> {
        redis::cmd("PING").query::<String>(&mut self.connection()?)?;
        Ok(())
    }

    /// Empties it.
    pub fn flush(&self) {
        redis::cmd("FLUSHALL")
            .query::<()>(&mut self.connection().expect("connects"))
            .expect("FLUSHALL");
    }

    /// `INFO memory`'s `used_memory`.
    pub fn used_memory(&self) -> u64 {
        let info: String = redis::cmd("INFO")
            .arg("memory")
            .query(&mut self.connection().expect("connects"))
            .expect("INFO");
        info.lines()
            .find_map(|l| l.strip_prefix("used_memory:"))
            .and_then(|v| v.trim().parse().ok())
            .unwrap_or(0)
    }
}

impl Drop for RedisServer {
    fn drop(&mut self) {
        self.stop();
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}
