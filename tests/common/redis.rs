//! A real `redis-server` for the tests (also a Redis Cluster of several, or one that
//! speaks TLS only): started on a free loopback port in a temporary directory, with no
//! persistence, and stopped when dropped. Without `redis-server` on
//! PATH the tests that need one are skipped with a message, unless
//! `REQUIRE_REDIS_TESTS` is set (CI: `scripts/redis-test.sh`), where they fail.
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

/// Whether `tool` runs here (`tool version_arg` succeeds); prints why not, and fails
/// instead when `REQUIRE_REDIS_TESTS` is set (CI: a missing server must not pass as a
/// skipped test). `installed_by`: the script that installs it.
fn tool_available(tool: &str, version_arg: &str, installed_by: &str) -> bool {
    let found = Command::new(tool)
        .arg(version_arg)
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .status()
        .is_ok_and(|s| s.success());
    if !found {
        assert!(
            std::env::var_os("REQUIRE_REDIS_TESTS").is_none(),
            "{tool} not found, and REQUIRE_REDIS_TESTS is set"
        );
        super::skip(&format!("{tool} not found ({installed_by} installs it)"));
    }
    found
}

/// Whether a redis-server can be run here; prints why not.
pub fn available() -> bool {
    tool_available("redis-server", "--version", "scripts/redis-test.sh")
}

impl RedisServer {
    /// A new server on a free port; `None` (skip) if redis-server is not installed.
    pub fn start() -> Option<RedisServer> {
        Self::start_with(false)
    }

    /// With an append-only file synced on every write: what it holds survives a stop,
    /// also a SIGKILL (the persistence settings of docs/replicas.md).
    pub fn start_persistent() -> Option<RedisServer> {
        Self::start_with(true)
    }

    fn start_with(persistent: bool) -> Option<RedisServer> {
        if !available() {
            return None;
        }
        let port = super::free_port();
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
        let mut command = Command::new("redis-server");
        let child = command
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
            .arg(&self.dir);
        let child = quiet_spawn(child);
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

/// A Redis Cluster of `masters` primaries (no replicas) on free loopback ports, each
/// in a temporary directory with no persistence; stopped when dropped.
pub struct RedisCluster {
    pub ports: Vec<u16>,
    dir: PathBuf,
    children: Vec<Child>,
    /// Nodes speak TLS only (also on the cluster bus), with [`make_certs`]' CA.
    tls: bool,
}

impl RedisCluster {
    /// `None` (skip) if redis-server or redis-cli is not installed.
    pub fn start(masters: usize) -> Option<RedisCluster> {
        Self::start_with(masters, false)
    }

    /// The same, speaking TLS only; `None` (skip) also without openssl.
    pub fn start_tls(masters: usize) -> Option<RedisCluster> {
        Self::start_with(masters, true)
    }

    fn start_with(masters: usize, tls: bool) -> Option<RedisCluster> {
        if !available() || (tls && !openssl_available()) {
            return None;
        }
        if !tool_available("redis-cli", "--version", "scripts/redis-cluster-test.sh") {
            return None;
        }
        // Held together so that no two nodes get the same port; a node also listens on
        // port + 10000 (the cluster bus): ports above 55535 cannot have one.
        let mut listeners = Vec::new();
        while listeners.len() < masters {
            let l = TcpListener::bind("127.0.0.1:0").expect("a free port");
            let port = l.local_addr().expect("its address").port();
            if port <= 55_535 && TcpListener::bind(("127.0.0.1", port + 10_000)).is_ok() {
                listeners.push(l);
            }
        }
        let ports: Vec<u16> = listeners
            .iter()
            .map(|l| l.local_addr().unwrap().port())
            .collect();
        drop(listeners);
        let dir = std::env::temp_dir().join(format!(
            "flowmetrics-redis-cluster-{}-{}",
            std::process::id(),
            ports[0]
        ));
        std::fs::create_dir_all(&dir).expect("temp dir");
        if tls {
            make_certs(&dir);
        }
        let mut cluster = RedisCluster {
            ports: ports.clone(),
            dir,
            children: Vec::new(),
            tls,
        };
        for &port in &ports {
            let mut server = Command::new("redis-server");
            if tls {
                server
                    .args(["--port", "0", "--tls-port", &port.to_string()])
                    .args(["--tls-cluster", "yes"])
                    .args(tls_server_args(&cluster.dir));
            } else {
                server.args(["--port", &port.to_string()]);
            }
            let child = server
                .args(["--bind", "127.0.0.1"])
                .args(["--cluster-enabled", "yes"])
                .arg("--cluster-config-file")
                .arg(cluster.dir.join(format!("nodes-{port}.conf")))
                .args(["--save", "", "--appendonly", "no"])
                .arg("--dir")
                .arg(&cluster.dir);
            let child = quiet_spawn(child);
            cluster.children.push(child);
        }
        let give_up = Instant::now() + Duration::from_secs(10);
        for &port in &ports {
            while cluster.node_cmd(port, &["PING"]).is_none() {
                assert!(Instant::now() < give_up, "a cluster node did not answer");
                std::thread::sleep(Duration::from_millis(20));
            }
        }
        let nodes: Vec<String> = ports.iter().map(|p| format!("127.0.0.1:{p}")).collect();
        let mut cli = Command::new("redis-cli");
        if tls {
            cli.arg("--tls")
                .arg("--cacert")
                .arg(cluster.dir.join("ca.crt"));
        }
        let created = cli
            .args(["--cluster", "create"])
            .args(&nodes)
            .args(["--cluster-replicas", "0", "--cluster-yes"])
            .stdout(Stdio::null())
            .stderr(Stdio::inherit())
            .status()
            .expect("redis-cli runs");
        assert!(created.success(), "redis-cli --cluster create failed");
        let give_up = Instant::now() + Duration::from_secs(20);
        for &port in &ports {
            while !cluster
                .node_cmd(port, &["CLUSTER", "INFO"])
                .is_some_and(|info| info.contains("cluster_state:ok"))
            {
                assert!(Instant::now() < give_up, "the cluster never became ok");
                std::thread::sleep(Duration::from_millis(50));
            }
        }
        Some(cluster)
    }

    /// Seed URLs, one per node.
    pub fn urls(&self) -> Vec<String> {
        let scheme = if self.tls { "rediss" } else { "redis" };
        self.ports
            .iter()
            .map(|p| format!("{scheme}://127.0.0.1:{p}"))
            .collect()
    }

    /// The CA certificate (PEM) of a TLS cluster.
    pub fn ca_file(&self) -> PathBuf {
        self.dir.join("ca.crt")
    }

    /// A command sent to one node directly (not routed), its reply as text.
    pub fn node_cmd(&self, port: u16, args: &[&str]) -> Option<String> {
        let client = if self.tls {
            let _ = rustls::crypto::ring::default_provider().install_default();
            redis::Client::build_with_tls(
                format!("rediss://127.0.0.1:{port}"),
                redis::TlsCertificates {
                    client_tls: None,
                    root_cert: Some(std::fs::read(self.ca_file()).ok()?),
                },
            )
        } else {
            redis::Client::open(format!("redis://127.0.0.1:{port}"))
        };
        let mut con = client
            .ok()?
            .get_connection_with_timeout(Duration::from_secs(1))
            .ok()?;
        let mut cmd = redis::cmd(args[0]);
        for a in &args[1..] {
            cmd.arg(*a);
        }
        let value: redis::Value = cmd.query(&mut con).ok()?;
        Some(match value {
            redis::Value::Int(n) => n.to_string(),
            redis::Value::SimpleString(s) => s,
            redis::Value::BulkString(b) => String::from_utf8_lossy(&b).into_owned(),
            redis::Value::VerbatimString { text, .. } => text,
            other => format!("{other:?}"),
        })
    }

    /// The nodes' process ids.
    pub fn pids(&self) -> Vec<u32> {
        self.children.iter().map(Child::id).collect()
    }

    /// Keys on each node (DBSIZE), in the order of `ports`.
    pub fn keys_per_node(&self) -> Vec<u64> {
        self.ports
            .iter()
            .map(|&p| {
                self.node_cmd(p, &["DBSIZE"])
                    .and_then(|n| n.parse().ok())
                    .unwrap_or(0)
            })
            .collect()
    }
}

impl Drop for RedisCluster {
    fn drop(&mut self) {
        for child in &mut self.children {
            let _ = child.kill();
            let _ = child.wait();
        }
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}

/// A redis-server that speaks TLS only, with a certificate signed by a CA made for it
/// (`openssl` CLI, in its temporary directory); stopped when dropped.
pub struct TlsRedisServer {
    pub port: u16,
    dir: PathBuf,
    child: Child,
}

impl TlsRedisServer {
    /// `None` (skip) if redis-server or openssl is not installed.
    pub fn start() -> Option<TlsRedisServer> {
        if !available() {
            return None;
        }
        if !openssl_available() {
            return None;
        }
        let port = super::free_port();
        let dir = std::env::temp_dir().join(format!(
            "flowmetrics-redis-tls-{}-{port}",
            std::process::id()
        ));
        std::fs::create_dir_all(&dir).expect("temp dir");
        make_certs(&dir);
        let child = Command::new("redis-server")
            .args(["--port", "0", "--tls-port", &port.to_string()])
            .args(["--bind", "127.0.0.1"])
            .args([
                "--tls-cert-file",
                "server.crt",
                "--tls-key-file",
                "server.key",
            ])
            .args(["--tls-ca-cert-file", "ca.crt", "--tls-auth-clients", "no"])
            .args(["--save", "", "--appendonly", "no"])
            .arg("--dir")
            .arg(&dir)
            .current_dir(&dir)
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .expect("redis-server starts");
        let server = TlsRedisServer { port, dir, child };
        // Listening is enough here: the test's own client checks the TLS handshake.
        let give_up = Instant::now() + Duration::from_secs(10);
        while std::net::TcpStream::connect(("127.0.0.1", port)).is_err() {
            assert!(
                Instant::now() < give_up,
                "redis-server (TLS) did not listen"
            );
            std::thread::sleep(Duration::from_millis(20));
        }
        Some(server)
    }

    pub fn url(&self) -> String {
        format!("rediss://127.0.0.1:{}/0", self.port)
    }

    /// The CA certificate (PEM) that signed the server's.
    pub fn ca_file(&self) -> PathBuf {
        self.dir.join("ca.crt")
    }
}

impl Drop for TlsRedisServer {
    fn drop(&mut self) {
        super::reap(&mut self.child, &self.dir);
    }
}

/// Starts a redis-server command line, its output discarded.
fn quiet_spawn(command: &mut Command) -> Child {
    command
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .expect("redis-server starts")
}

/// Whether the `openssl` CLI can be run here; prints why not.
fn openssl_available() -> bool {
    tool_available("openssl", "version", "scripts/redis-test.sh")
}

/// A CA (`ca.crt`) and a server certificate it signed for 127.0.0.1 (`server.crt`,
/// `server.key`), in `dir`.
fn make_certs(dir: &std::path::Path) {
    let openssl = |args: &[&str]| {
        let status = Command::new("openssl")
            .args(args)
            .current_dir(dir)
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .status()
            .expect("openssl runs");
        assert!(status.success(), "openssl {args:?} failed");
    };
    openssl(&[
        "req",
        "-x509",
        "-newkey",
        "rsa:2048",
        "-nodes",
        "-keyout",
        "ca.key",
        "-out",
        "ca.crt",
        "-days",
        "2",
        "-subj",
        "/CN=flowmetrics test CA",
    ]);
    openssl(&[
        "req",
        "-newkey",
        "rsa:2048",
        "-nodes",
        "-keyout",
        "server.key",
        "-out",
        "server.csr",
        "-subj",
        "/CN=127.0.0.1",
    ]);
    std::fs::write(
        dir.join("ext.cnf"),
        "subjectAltName=IP:127.0.0.1,DNS:localhost\n",
    )
    .expect("ext.cnf");
    openssl(&[
        "x509",
        "-req",
        "-in",
        "server.csr",
        "-CA",
        "ca.crt",
        "-CAkey",
        "ca.key",
        "-CAcreateserial",
        "-out",
        "server.crt",
        "-days",
        "2",
        "-extfile",
        "ext.cnf",
    ]);
}

/// redis-server's TLS settings for [`make_certs`]' files in `dir`; no client
/// certificates.
fn tls_server_args(dir: &std::path::Path) -> Vec<std::ffi::OsString> {
    let mut args: Vec<std::ffi::OsString> = Vec::new();
    for (flag, file) in [
        ("--tls-cert-file", "server.crt"),
        ("--tls-key-file", "server.key"),
        ("--tls-ca-cert-file", "ca.crt"),
    ] {
        args.push(flag.into());
        args.push(dir.join(file).into());
    }
    args.push("--tls-auth-clients".into());
    args.push("no".into());
    args
}
