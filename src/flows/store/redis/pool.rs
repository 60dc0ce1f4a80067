//! Connections to the shared store: one server or a Redis Cluster, plain or TLS, in a
//! small pool of synchronous connections; pipelined script calls that survive a script
//! cache emptied by a restart; and what a failed call means for the exporter.

use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex, PoisonError};
use std::time::Duration;

use redis::cluster::{ClusterClient, ClusterConnection};
use redis::{
    Client, Cmd, Connection, ConnectionLike, RedisError, RedisResult, Script, TlsCertificates,
    Value,
};

use super::{RedisSettings, APPLY, CLAIM, SWEEP};
use crate::flows::store::StoreError;

/// The store cannot be set up from its settings (the service does not start).
#[derive(Debug, thiserror::Error)]
pub enum RedisSetupError {
    /// `correlation.redis.ca_file` cannot be used.
    #[error(transparent)]
    CaFile(#[from] CaFileError),
    /// The cluster client cannot be made from the node URLs.
    #[error("correlation.redis.cluster {nodes:?}: {source}")]
    Cluster {
        /// The nodes as configured.
        nodes: Vec<String>,
        /// What the client said.
        source: RedisError,
    },
    /// The client cannot be made from the URL.
    #[error("correlation.redis.url {url:?}: {source}")]
    Url {
        /// The URL as configured.
        url: String,
        /// What the client said.
        source: RedisError,
    },
}

/// `correlation.redis.ca_file` is not a usable CA certificate file.
#[derive(Debug, thiserror::Error)]
pub enum CaFileError {
    /// The file cannot be read.
    #[error("correlation.redis.ca_file {:?}: {source}", path.display())]
    Unreadable {
        /// The file as configured.
        path: PathBuf,
        /// What reading it said.
        source: std::io::Error,
    },
    /// The file holds no PEM certificate.
    #[error("correlation.redis.ca_file {:?}: no PEM certificate in it", path.display())]
    NoCertificate {
        /// The file as configured.
        path: PathBuf,
    },
    /// The file is not PEM.
    #[error("correlation.redis.ca_file {:?}: not PEM certificates: {source}", path.display())]
    NotPem {
        /// The file as configured.
        path: PathBuf,
        /// What the PEM parser said.
        source: rustls::pki_types::pem::Error,
    },
}

/// Where connections go.
pub(super) enum Target {
    One(Client),
    Cluster(ClusterClient),
}

impl Target {
    fn new(redis: &RedisSettings) -> Result<Self, RedisSetupError> {
        let cluster = !redis.cluster.is_empty();
        let tls = if cluster {
            redis.cluster.iter().any(|u| u.starts_with("rediss://"))
        } else {
            redis.url.starts_with("rediss://")
        };
        if tls {
            // rustls needs a process-wide crypto provider; another part of the process
            // may have set one already, which is as good.
            let _ = rustls::crypto::ring::default_provider().install_default();
        }
        let certs = match &redis.ca_file {
            Some(path) => Some(TlsCertificates {
                client_tls: None,
                root_cert: Some(read_ca_file(path)?),
            }),
            None => None,
        };
        if !cluster {
            return match certs {
                Some(certs) => Client::build_with_tls(redis.url.as_str(), certs),
                None => Client::open(redis.url.as_str()),
            }
            .map(Target::One)
            .map_err(|source| RedisSetupError::Url {
                url: redis.url.clone(),
                source,
            });
        }
        // Few, short retries: a call must end within about `command_timeout`, and the
        // exporter retries a refused export anyway.
        let mut builder = ClusterClient::builder(redis.cluster.iter().map(String::as_str))
            .connection_timeout(redis.connect_timeout)
            .response_timeout(redis.command_timeout)
            .retries(2)
            .min_retry_wait(20)
            .max_retry_wait(200);
        if let Some(certs) = certs {
            builder = builder.certs(certs);
        }
        builder
            .build()
            .map(Target::Cluster)
            .map_err(|source| RedisSetupError::Cluster {
                nodes: redis.cluster.clone(),
                source,
            })
    }
}

/// A connection to one server, or to a cluster (which holds one per node it uses).
pub(super) enum Conn {
    One(Connection),
    Cluster(Box<ClusterConnection>),
}

impl Conn {
    pub(super) fn like(&mut self) -> &mut dyn ConnectionLike {
        match self {
            Conn::One(c) => c,
            Conn::Cluster(c) => &mut **c,
        }
    }

    /// Sends `cmds` (EVALSHA of `script`) in one pipeline, and answers one result per
    /// command. A command refused before it ran (NOSCRIPT: a server restarted, a node
    /// added or failed over; MOVED/ASK/TRYAGAIN: slots moving) is sent again once on
    /// its own, after loading the script on every primary for NOSCRIPT: redis-rs'
    /// pipelines hand such replies back as they are instead of following them. A
    /// command that failed while running is not: it may have applied in part.
    pub(super) fn eval_all(
        &mut self,
        script: &Script,
        cmds: &[Cmd],
    ) -> RedisResult<Vec<RedisResult<Value>>> {
        let values = match self {
            Conn::One(c) => {
                let mut packed = Vec::new();
                for cmd in cmds {
                    cmd.write_packed_command(&mut packed);
                }
                c.req_packed_commands(&packed, 0, cmds.len())?
            }
            Conn::Cluster(c) => {
                let mut pipe = redis::cluster::cluster_pipe();
                for cmd in cmds {
                    pipe.add_command(cmd.clone());
                }
                match pipe.query::<Vec<Value>>(c) {
                    Ok(values) => values,
                    // A cluster pipeline with a command refused (a NOSCRIPT from a node
                    // whose scripts were flushed) answers only the errors: the others
                    // ran, but their replies are dropped (an apply's is read back from
                    // the result key it keeps).
                    Err(e) => {
                        let Some(errors) = e.clone().into_server_errors() else {
                            return Err(e);
                        };
                        let mut results: Vec<RedisResult<Value>> =
                            cmds.iter().map(|_| Err(dropped_reply())).collect();
                        for (i, error) in errors.iter() {
                            if let Some(result) = results.get_mut(*i) {
                                *result = Value::ServerError(error.clone()).extract_error();
                            }
                        }
                        return Ok(self.retry_refused(script, cmds, results));
                    }
                }
            }
        };
        if values.len() != cmds.len() {
            return Err(RedisError::from((
                redis::ErrorKind::UnexpectedReturnType,
                "a pipeline answered a different number of replies",
            )));
        }
        let results: Vec<RedisResult<Value>> =
            values.into_iter().map(Value::extract_error).collect();
        Ok(self.retry_refused(script, cmds, results))
    }

    /// `SADD key members…` for every key, pipelined (routed by key on a cluster).
    pub(super) fn add_to_all(&mut self, keys: &[&[u8]], members: &[Arc<str>]) -> RedisResult<()> {
        let members: Vec<&str> = members.iter().map(|m| &**m).collect();
        let mut cmds = keys.iter().map(|key| {
            let mut cmd = redis::cmd("SADD");
            cmd.arg(*key).arg(&members[..]);
            cmd
        });
        match self {
            Conn::One(c) => {
                let mut pipe = redis::pipe();
                for cmd in cmds.by_ref() {
                    pipe.add_command(cmd);
                }
                pipe.query::<Vec<Value>>(c).map(drop)
            }
            Conn::Cluster(c) => {
                let mut pipe = redis::cluster::cluster_pipe();
                for cmd in cmds.by_ref() {
                    pipe.add_command(cmd);
                }
                pipe.query::<Vec<Value>>(c).map(drop)
            }
        }
    }

    /// Sends again, once and on its own, each command refused before it ran.
    fn retry_refused(
        &mut self,
        script: &Script,
        cmds: &[Cmd],
        mut results: Vec<RedisResult<Value>>,
    ) -> Vec<RedisResult<Value>> {
        let refused = |r: &RedisResult<Value>| {
            r.as_ref().err().is_some_and(|e| {
                e.kind() == redis::ErrorKind::Server(redis::ServerErrorKind::NoScript)
                    || e.is_cluster_error()
            })
        };
        if !results.iter().any(refused) {
            return results;
        }
        let no_script = results.iter().any(|r| {
            r.as_ref().err().is_some_and(|e| {
                e.kind() == redis::ErrorKind::Server(redis::ServerErrorKind::NoScript)
            })
        });
        // SCRIPT LOAD goes to every primary on a cluster (redis-rs routes it so).
        let loaded = if no_script {
            script.load(self.like()).map(|_| ())
        } else {
            Ok(())
        };
        for (i, result) in results.iter_mut().enumerate() {
            if refused(result) {
                *result = match &loaded {
                    Ok(()) => cmds[i].query::<Value>(self.like()),
                    Err(e) => Err(e.clone()),
                };
            }
        }
        results
    }
}

/// What stands for the reply of a call that ran in a cluster pipeline which dropped it
/// (another call in it was refused).
fn dropped_reply() -> RedisError {
    RedisError::from((
        redis::ErrorKind::Client,
        "reply dropped",
        DROPPED_REPLY.to_owned(),
    ))
}

const DROPPED_REPLY: &str = "a call in the same cluster pipeline was refused";

/// The call ran, but its reply was dropped by a cluster pipeline ([`Conn::eval_all`]).
pub(super) fn is_dropped_reply(e: &RedisError) -> bool {
    e.kind() == redis::ErrorKind::Client && e.detail() == Some(DROPPED_REPLY)
}

/// Synchronous connections, opened on demand; at most `size` kept idle.
pub(super) struct Pool {
    pub(super) target: Target,
    idle: Mutex<Vec<Conn>>,
    size: usize,
    connect_timeout: Duration,
    command_timeout: Duration,
}

impl Pool {
    /// Connects lazily: nothing is opened before the first call.
    pub(super) fn new(redis: &RedisSettings) -> Result<Self, RedisSetupError> {
        Ok(Self {
            target: Target::new(redis)?,
            idle: Mutex::new(Vec::new()),
            size: redis.pool_size.max(1),
            connect_timeout: redis.connect_timeout,
            command_timeout: redis.command_timeout,
        })
    }

    fn connect(&self) -> RedisResult<Conn> {
        Ok(match &self.target {
            Target::One(client) => {
                let con = client.get_connection_with_timeout(self.connect_timeout)?;
                con.set_read_timeout(Some(self.command_timeout))?;
                con.set_write_timeout(Some(self.command_timeout))?;
                Conn::One(con)
            }
            Target::Cluster(client) => {
                // Connection and read timeouts come from the client's builder.
                let mut con = client.get_connection()?;
                con.set_write_timeout(Some(self.command_timeout))?;
                // On every primary (redis-rs routes SCRIPT LOAD so): a NOSCRIPT in a
                // cluster pipeline costs the replies of the other commands in it. A
                // failure here is not one: NOSCRIPT is handled when it comes.
                for code in [APPLY, SWEEP, CLAIM] {
                    let _ = Script::new(code).load(&mut con);
                }
                Conn::Cluster(Box::new(con))
            }
        })
    }

    pub(super) fn with<T>(&self, f: impl FnOnce(&mut Conn) -> RedisResult<T>) -> RedisResult<T> {
        let pooled = self
            .idle
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .pop();
        let mut con = match pooled {
            Some(con) => con,
            None => self.connect()?,
        };
        let result = f(&mut con);
        let mut idle = self.idle.lock().unwrap_or_else(PoisonError::into_inner);
        match &result {
            Ok(_) if idle.len() < self.size => idle.push(con),
            Ok(_) => {}
            // The others were opened to the same servers: after a restart they are all
            // dead, and each would cost a failed export.
            Err(e) if e.is_io_error() || e.is_timeout() || e.is_connection_dropped() => {
                idle.clear();
            }
            Err(_) => {}
        }
        result
    }
}

/// The PEM file of `correlation.redis.ca_file`, checked: redis-rs reads it only when
/// it connects, and a file that is not PEM would make every connection fail, long after
/// the start.
fn read_ca_file(path: &Path) -> Result<Vec<u8>, CaFileError> {
    use rustls::pki_types::{pem::PemObject, CertificateDer};
    let path = path.to_path_buf();
    let pem = match std::fs::read(&path) {
        Ok(pem) => pem,
        Err(source) => return Err(CaFileError::Unreadable { path, source }),
    };
    match CertificateDer::pem_slice_iter(&pem).collect::<Result<Vec<_>, _>>() {
        Ok(found) if !found.is_empty() => Ok(pem),
        Ok(_) => Err(CaFileError::NoCertificate { path }),
        Err(source) => Err(CaFileError::NotPem { path, source }),
    }
}

/// What a failed call means for the exporter and the operator.
pub(super) fn store_error(e: &RedisError) -> StoreError {
    // A script's write refused comes back with the server's code, or in its text.
    const NO_WRITES: [&str; 4] = ["OOM", "READONLY", "MISCONF", "NOREPLICAS"];
    let text = e.to_string();
    let refused = e.code().is_some_and(|c| NO_WRITES.contains(&c))
        || NO_WRITES.iter().any(|c| text.contains(&format!("{c} ")));
    if refused {
        StoreError::WritesRefused(text)
    } else if e.is_timeout() {
        StoreError::Timeout(text)
    } else if e.is_io_error() || e.is_connection_refusal() || e.is_connection_dropped() {
        StoreError::Unreachable(text)
    } else {
        StoreError::Failed(text)
    }
}
