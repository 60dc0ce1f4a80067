//! The shared correlation store: Redis or Valkey (one server, or a Redis Cluster) holds
//! every open instance, every end waiting for its start, the deadlines and the retry
//! fingerprints, so that any replica closes what another opened (docs/behaviour.md §3 "several
//! replicas").
//!
//! The keys are split into shards (`correlation.redis.shards`); an instance belongs to
//! shard `digest(flow, id) mod shards`. Every key of a shard starts with the shard's
//! prefix `p{n}`, so on a Redis Cluster all of them (instances, fingerprints, the
//! shard's deadlines, its result keys) are in the hash slot of `n`, and every script
//! call touches one slot only. With one shard on one server the prefix is just `p`:
//! the layout of a single-server deployment is unchanged.
//!
//! One export batch is one server-side script call (EVALSHA) per shard it touches, in
//! chunks of at most [`CHUNK`] events so that no script holds a server for long; the
//! calls are pipelined (one round trip per batch on one server, one per node on a
//! cluster). The script applies each event atomically and returns what happened; this
//! replica reports that to its sink. Deadlines are scores in each shard's sorted set,
//! on the server's clock (`TIME`, so replicas' clocks do not matter), popped by a
//! script on whichever replica's sweeper gets there first: each time-out is counted
//! once, with no leader.
//!
//! A reply can be lost after the script ran (a timeout, a dropped connection): the
//! export is refused and retried, and the retry finds only duplicates. So the script
//! also keeps its reply under a key of its own; the replica deletes it with its next
//! call to that shard once read, or, when the reply was lost, reads it back from its
//! sweeper and reports it then (once: reading deletes it).
//!
//! Keys (`s` the shard's prefix, `h` a stable 64-bit digest of flow and id in hex):
//! `s{h}i<flow>\0<id>` the instance; `s{h}s<ts>` / `s{h}e<ts>` / `s{h}t<step>\0<ts>` a
//! retry fingerprint that expires after the dedup window; `sdeadlines` the shard's
//! instance keys by deadline (ms); `s{r}<replica>:<call>` a call's reply. (Only the first
//! `{…}` of a key is its Cluster hash tag: in `p{3}{h}i…` it is `3`.) An instance's
//! value: its state (`o` open, `w` an end waiting, `p` steps waiting for their start),
//! its event timestamp as 20 digits (compared as strings: Lua numbers are doubles), then
//! the payload encoded here (flow, dims, and for an end its outcome and trace).
//!
//! Steps (docs/behaviour.md §9, [`steps`]): `s{h}k<flow>\0<id>` the instance's steps (a
//! hash), `s{h}c<flow>\0<id>` a closed instance's mark (for the dedup window, so that a
//! later step counts as after_close), `sstepflows` the flows that sent a step (only
//! their instances leave a mark). The scripts live in `redis/*.lua`.
//!
//! Overdue instances (docs/behaviour.md §10, [`ages`]): `sages:<flow>` a flow's open
//! instances by start second (a hash), for flows with a threshold only, and `sagelog`
//! the changes not yet folded into them.
//!
//! The client is redis-rs' synchronous connection (or its cluster connection, which
//! routes each call by its first key) with socket timeouts, in a small pool: the store
//! is called from blocking threads (pipeline, maintenance thread), and a dropped
//! connection is simply not returned to the pool, so the next call reconnects.

use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use redis::cluster::{ClusterClient, ClusterConnection};
use redis::{
    Client, Cmd, Connection, ConnectionLike, FromRedisValue, RedisError, RedisResult, Script,
    TlsCertificates, Value,
};

use super::{
    duration_secs, CorrelationStore, EndRecord, FlowSink, OverdueSettings, Report,
    StepUnmatchedReason, StoreError, StoreSettings,
};
use crate::flows::event::{DimValues, EventKind, FlowEvent, Outcome, TraceRef};
use crate::logging::RateLimited;

mod ages;
mod steps;
use steps::StoredStep;

/// Events per script call: bounds how long one call holds the server.
const CHUNK: usize = 1000;
/// Due entries popped per sweep call; a sweep loops up to [`SWEEP_ROUNDS`] calls.
const SWEEP_LIMIT: usize = 1000;
const SWEEP_ROUNDS: usize = 50;
/// Errors are logged at most this often.
const WARN_EVERY: Duration = Duration::from_secs(10);
/// Batches whose reply was lost, kept to read their outcomes back; beyond, the oldest
/// are given up (their counts are lost, logged).
const MAX_PENDING: usize = 64;
/// Read results acknowledged per call.
const MAX_ACKS: usize = 256;
/// Longest timeout in ms the script is handed: Lua prints numbers with 14 digits.
const MAX_TIMEOUT_MS: u64 = 1_000_000_000_000;

/// The overdue log's functions (`ages_log.lua`) come first in each script that uses them.
const APPLY: &str = concat!(
    include_str!("redis/ages_log.lua"),
    include_str!("redis/apply.lua")
);
const CLAIM: &str = include_str!("redis/claim.lua");
const SWEEP: &str = concat!(
    include_str!("redis/ages_log.lua"),
    include_str!("redis/sweep.lua")
);

/// Where the shared store is and how long to wait for it (`correlation.redis`).
#[derive(Clone, Debug)]
pub struct RedisSettings {
    /// One server; used when `cluster` is empty.
    pub url: String,
    /// Seed nodes of a Redis Cluster (any of its nodes; the rest are discovered).
    pub cluster: Vec<String>,
    /// Shards the keys are spread over, each in one hash slot (1..=1024).
    pub shards: u32,
    /// PEM CA certificate(s) for `rediss://`, in place of the system's roots.
    pub ca_file: Option<std::path::PathBuf>,
    pub key_prefix: String,
    pub connect_timeout: Duration,
    pub command_timeout: Duration,
    pub pool_size: usize,
}

/// Told about every call to the shared store: `op` is `apply`, `sweep` or `recover`
/// (reading back the outcomes of a batch whose reply was lost). Implemented
/// by the metrics registry (errors counter, latency histogram).
pub trait StoreProbe: Send + Sync + 'static {
    fn store_call(&self, op: &'static str, seconds: f64, ok: bool);
}

pub struct RedisStore {
    pool: Pool,
    apply: Script,
    sweep: Script,
    claim: Script,
    shards: Vec<Shard>,
    /// Batches sent whose reply never came: their outcomes may be in the store.
    pending: Mutex<std::collections::VecDeque<Pending>>,
    /// Makes result keys unique: this replica's random id and a call counter.
    replica_id: u64,
    calls: AtomicU64,
    /// How long a lost batch's result is looked for (the script may still be queued).
    recover_for: Duration,
    sink: Arc<dyn FlowSink>,
    probe: Arc<dyn StoreProbe>,
    timeout_for: Arc<dyn Fn(&str) -> Duration + Send + Sync>,
    window_ms: u64,
    /// How long a closed instance of a flow with steps stays marked: the longest timeout.
    mark_ms: u64,
    capacity: u64,
    /// Entries one shard may hold: `capacity` spread evenly, rounded up.
    shard_capacity: u64,
    available: AtomicBool,
    /// The last apply was refused for want of writes (out of memory, read-only): the
    /// sweeper's calls, which only delete, still succeed, so only a write (an apply, or
    /// the sweeper's probe) says the store is usable again.
    writes_refused: AtomicBool,
    /// Written by the probe, with a short expiry.
    probe_key: Vec<u8>,
    warnings: Warnings,
    /// Flows this replica has told every shard about (they use steps).
    step_flows: steps::KnownStepFlows,
    /// Open-instance ages of flows with an overdue threshold; `None`: no flow has one.
    ages: Option<ages::RedisAges>,
}

/// The store's repeated warnings, each rate-limited on its own.
struct Warnings {
    unavailable: RateLimited,
    evicted: RateLimited,
    lost: RateLimited,
    unreadable: RateLimited,
}

impl Warnings {
    fn new() -> Self {
        Self {
            unavailable: RateLimited::new(WARN_EVERY),
            evicted: RateLimited::new(WARN_EVERY),
            lost: RateLimited::new(WARN_EVERY),
            unreadable: RateLimited::new(WARN_EVERY),
        }
    }
}

/// One shard: its keys all start with `prefix`.
struct Shard {
    /// `p{n}` (one hash slot on a cluster), or `p` alone for one shard on one server.
    prefix: Vec<u8>,
    deadlines: Vec<u8>,
    /// The flows that sent a step to this shard.
    stepflows: Vec<u8>,
    /// Result keys of replies read, deleted by the next call to this shard.
    acks: Mutex<Vec<Vec<u8>>>,
    /// Entries at the last sweep: read by `/metrics` without a round trip.
    entries: AtomicU64,
}

impl Shard {
    /// `prefix{tag}` followed by `what`.
    fn tagged(&self, tag: &[u8; 16], what: u8) -> Vec<u8> {
        let mut key = Vec::with_capacity(self.prefix.len() + 20);
        key.extend_from_slice(&self.prefix);
        key.push(b'{');
        key.extend_from_slice(tag);
        key.push(b'}');
        key.push(what);
        key
    }
}

/// One script call of a batch: a chunk of one shard's events.
struct Call {
    shard: usize,
    events: Vec<FlowEvent>,
    result_key: Vec<u8>,
    acks: Vec<Vec<u8>>,
}

impl RedisStore {
    /// Connects lazily: the service starts (not ready) while the store is down.
    pub fn new(
        settings: StoreSettings,
        redis: RedisSettings,
        sink: Arc<dyn FlowSink>,
        probe: Arc<dyn StoreProbe>,
    ) -> Result<Self, String> {
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
        let target = if cluster {
            // Few, short retries: a call must end within about `command_timeout`, and
            // the exporter retries a refused export anyway.
            let mut builder = ClusterClient::builder(redis.cluster.iter().map(String::as_str))
                .connection_timeout(redis.connect_timeout)
                .response_timeout(redis.command_timeout)
                .retries(2)
                .min_retry_wait(20)
                .max_retry_wait(200);
            if let Some(certs) = certs {
                builder = builder.certs(certs);
            }
            let client = builder
                .build()
                .map_err(|e| format!("correlation.redis.cluster {:?}: {e}", redis.cluster))?;
            Target::Cluster(client)
        } else {
            let client = match certs {
                Some(certs) => Client::build_with_tls(redis.url.as_str(), certs),
                None => Client::open(redis.url.as_str()),
            }
            .map_err(|e| format!("correlation.redis.url {:?}: {e}", redis.url))?;
            Target::One(client)
        };
        let count = redis.shards.clamp(1, 1024);
        let shards = (0..count)
            .map(|n| {
                let mut prefix = redis.key_prefix.clone().into_bytes();
                if cluster || count > 1 {
                    prefix.extend_from_slice(format!("{{{n}}}").as_bytes());
                }
                let mut deadlines = prefix.clone();
                deadlines.extend_from_slice(b"deadlines");
                let mut stepflows = prefix.clone();
                stepflows.extend_from_slice(b"stepflows");
                Shard {
                    prefix,
                    deadlines,
                    stepflows,
                    acks: Mutex::new(Vec::new()),
                    entries: AtomicU64::new(0),
                }
            })
            .collect::<Vec<Shard>>();
        let mut probe_key = shards[0].prefix.clone();
        probe_key.extend_from_slice(b"probe");
        Ok(Self {
            pool: Pool {
                target,
                idle: Mutex::new(Vec::new()),
                size: redis.pool_size.max(1),
                connect_timeout: redis.connect_timeout,
                command_timeout: redis.command_timeout,
            },
            apply: Script::new(APPLY),
            sweep: Script::new(SWEEP),
            claim: Script::new(CLAIM),
            shards,
            pending: Mutex::new(std::collections::VecDeque::new()),
            replica_id: std::hash::BuildHasher::hash_one(
                &std::collections::hash_map::RandomState::new(),
                std::process::id(),
            ),
            calls: AtomicU64::new(0),
            recover_for: redis.command_timeout * 2 + redis.connect_timeout + Duration::from_secs(5),
            sink,
            probe,
            timeout_for: settings.timeout_for,
            window_ms: u64::try_from(settings.dedup_window.as_millis())
                .unwrap_or(u64::MAX)
                .max(1),
            mark_ms: u64::try_from(settings.longest_timeout.as_millis())
                .unwrap_or(u64::MAX)
                .clamp(1, MAX_TIMEOUT_MS),
            capacity: settings.capacity,
            shard_capacity: settings.capacity.div_ceil(u64::from(count)),
            available: AtomicBool::new(false),
            warnings: Warnings::new(),
            writes_refused: AtomicBool::new(false),
            probe_key,
            step_flows: steps::KnownStepFlows::new(settings.step_flows.clone()),
            ages: None,
        })
    }

    /// Keeps, in the store, the open instances of flows with an overdue threshold (per
    /// flow, by start second) and reports their overdue counts about every two seconds
    /// (docs/behaviour.md §10). Every replica must be configured alike: each one reports
    /// the same, global values.
    pub fn track_open_ages(mut self, settings: OverdueSettings) -> Self {
        self.ages = Some(ages::RedisAges::new(settings));
        self
    }

    /// The first step of a flow this replica sees: every shard learns that the flow uses
    /// steps (so that its closed instances leave a mark there), in one round trip, once
    /// per flow and replica. Flows without steps never get here.
    fn announce_step_flows(&self, events: &[FlowEvent]) {
        let new = self.step_flows.unknown(events);
        if new.is_empty() {
            return;
        }
        let keys: Vec<&[u8]> = self.shards.iter().map(|s| &s.stepflows[..]).collect();
        // A failure is not one for the batch: each step still marks its own shard.
        if self
            .call("apply", |con| con.add_to_all(&keys, &new), |_| None)
            .is_ok()
        {
            self.step_flows.learned(new);
        }
    }

    /// Times a call, tells the probe, and keeps the availability flags. `failure`
    /// finds an error inside a reply that arrived (a script that failed in a pipeline):
    /// the reply is still handed back, for the commands that did run.
    fn call<T>(
        &self,
        op: &'static str,
        f: impl FnOnce(&mut Conn) -> RedisResult<T>,
        failure: impl FnOnce(&T) -> Option<StoreError>,
    ) -> Result<T, StoreError> {
        let started = Instant::now();
        let result = self.pool.with(f).map_err(|e| store_error(&e));
        let error = match &result {
            Err(e) => Some(e.clone()),
            Ok(reply) => failure(reply),
        };
        self.probe
            .store_call(op, started.elapsed().as_secs_f64(), error.is_none());
        self.available.store(error.is_none(), Ordering::Release);
        match &error {
            Some(e @ StoreError::WritesRefused(_)) => {
                self.writes_refused.store(true, Ordering::Release);
                self.warn(op, e);
            }
            Some(e) => self.warn(op, e),
            None if op == "apply" => self.writes_refused.store(false, Ordering::Release),
            None => {}
        }
        result
    }

    fn warn(&self, op: &'static str, e: &StoreError) {
        self.warnings.unavailable.warn(format_args!(
            "correlation store (redis) unavailable ({op}): {e}"
        ));
    }

    /// While writes are refused: one short-lived write, to see whether they are taken
    /// again (the store is ready again only then).
    fn probe_writes(&self) {
        if !self.writes_refused.load(Ordering::Acquire) {
            return;
        }
        let written = self.pool.with(|con| {
            redis::cmd("SET")
                .arg(&self.probe_key[..])
                .arg(1)
                .arg("PX")
                .arg(1000)
                .query::<Value>(con.like())
        });
        if written.is_ok() {
            self.writes_refused.store(false, Ordering::Release);
            tracing::info!("correlation store (redis): writes are taken again");
        }
    }

    /// Runs `cmds` (EVALSHA of `script`) pipelined; one result per command.
    fn eval_all(
        &self,
        op: &'static str,
        script: &Script,
        cmds: &[Cmd],
    ) -> Result<Vec<RedisResult<Value>>, StoreError> {
        self.call(
            op,
            |con| con.eval_all(script, cmds),
            |results| {
                results
                    .iter()
                    .find_map(|r| r.as_ref().err())
                    .map(store_error)
            },
        )
    }

    /// The EVALSHA of one chunk of one shard's events.
    fn apply_cmd(&self, call: &Call) -> Cmd {
        let shard = &self.shards[call.shard];
        let mut keys: Vec<Vec<u8>> =
            Vec::with_capacity(3 + 2 * call.events.len() + call.acks.len());
        let mut args: Vec<Vec<u8>> = Vec::with_capacity(6 + 4 * call.events.len());
        keys.push(shard.deadlines.clone());
        keys.push(call.result_key.clone());
        keys.push(shard.stepflows.clone());
        args.push(self.window_ms.to_string().into_bytes());
        args.push(self.shard_capacity.to_string().into_bytes());
        args.push(call.acks.len().to_string().into_bytes());
        args.push(shard.prefix.len().to_string().into_bytes());
        args.push(self.mark_ms.to_string().into_bytes());
        // Whether the open instances of the last event's flow are counted: one look-up
        // per run of events of one flow.
        let mut counted: Option<(&Arc<str>, bool)> = None;
        for event in &call.events {
            let tag = hex(digest(&event.flow, &event.correlation_id));
            let mut key = shard.tagged(&tag, b'i');
            key.extend_from_slice(event.flow.as_bytes());
            key.push(0);
            key.extend_from_slice(event.correlation_id.as_bytes());
            let (kind, state) = match event.kind {
                EventKind::Start => (b's', b'o'),
                EventKind::End(_) => (b'e', b'w'),
                EventKind::Step => (b't', b'p'),
            };
            let mut fingerprint = shard.tagged(&tag, kind);
            if let Some(step) = &event.step {
                fingerprint.extend_from_slice(step.as_bytes());
                fingerprint.push(0);
            }
            fingerprint.extend_from_slice(event.timestamp_nanos.to_string().as_bytes());
            let timeout_ms = u64::try_from((self.timeout_for)(&event.flow).as_millis())
                .unwrap_or(u64::MAX)
                .min(MAX_TIMEOUT_MS);
            keys.push(key);
            keys.push(fingerprint);
            let count = match (&self.ages, counted) {
                (None, _) => false,
                (Some(_), Some((flow, known))) if *flow == event.flow => known,
                (Some(ages), _) => ages.counted(&event.flow),
            };
            counted = Some((&event.flow, count));
            // A counted flow's name follows the kind: the script parses no key for it.
            let mut kind_arg = vec![kind];
            if count {
                kind_arg.extend_from_slice(event.flow.as_bytes());
            }
            args.push(kind_arg);
            args.push(encode(state, event));
            args.push(timeout_ms.to_string().into_bytes());
            args.push(match event.kind {
                EventKind::Step => steps::step_argument(event),
                _ => Vec::new(),
            });
        }
        keys.extend(call.acks.iter().cloned());
        args.push(vec![if self.ages.is_some() { b'1' } else { b'0' }]);
        let mut cmd = redis::cmd("EVALSHA");
        cmd.arg(self.apply.get_hash())
            .arg(keys.len())
            .arg(&keys[..])
            .arg(&args[..]);
        cmd
    }

    /// Splits a batch by shard (order kept within each), in chunks of [`CHUNK`].
    fn calls(&self, events: Vec<FlowEvent>) -> Vec<Call> {
        let count = self.shards.len();
        let mut groups: Vec<(usize, Vec<FlowEvent>)> = if count == 1 {
            vec![(0, events)]
        } else {
            let mut by_shard: Vec<Vec<FlowEvent>> = Vec::new();
            by_shard.resize_with(count, Vec::new);
            for event in events {
                let n = (digest(&event.flow, &event.correlation_id) % count as u64) as usize;
                by_shard[n].push(event);
            }
            by_shard
                .into_iter()
                .enumerate()
                .filter(|(_, e)| !e.is_empty())
                .collect()
        };
        let mut calls = Vec::new();
        for (shard, mut events) in groups.drain(..) {
            loop {
                let rest = events.split_off(events.len().min(CHUNK));
                let call = self.calls.fetch_add(1, Ordering::Relaxed);
                let mut result_key = self.shards[shard].prefix.clone();
                result_key
                    .extend_from_slice(format!("{{r}}{:016x}:{call}", self.replica_id).as_bytes());
                let acks: Vec<Vec<u8>> = {
                    let mut acks = self.shards[shard]
                        .acks
                        .lock()
                        .unwrap_or_else(|p| p.into_inner());
                    let keep = acks.len().saturating_sub(MAX_ACKS);
                    acks.split_off(keep)
                };
                calls.push(Call {
                    shard,
                    events,
                    result_key,
                    acks,
                });
                if rest.is_empty() {
                    break;
                }
                events = rest;
            }
        }
        calls
    }

    /// A call failed or its reply was lost: its acks are sent again later, and its
    /// outcomes looked for.
    fn failed(&self, call: Call) {
        self.shards[call.shard]
            .acks
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .extend(call.acks);
        self.remember_lost(call.result_key, call.events);
    }

    /// The script may have run although its reply never came: keep what is needed to
    /// read its outcomes back ([`RedisStore::recover`]).
    fn remember_lost(&self, result_key: Vec<u8>, events: Vec<FlowEvent>) {
        let mut pending = self.pending.lock().unwrap_or_else(|p| p.into_inner());
        if pending.len() >= MAX_PENDING {
            pending.pop_front();
            self.warnings.lost.warn(format_args!(
                "correlation store (redis): too many exports without a reply; the \
                 outcomes of the oldest are not counted if they were applied"
            ));
        }
        pending.push_back(Pending {
            result_key,
            events,
            since: Instant::now(),
        });
    }

    /// Reads back the outcomes of batches whose reply was lost, and reports them: the
    /// store removes each result as it is read, so they are reported once.
    fn recover(&self) {
        let lost: Vec<Pending> = self
            .pending
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .drain(..)
            .collect();
        let mut keep = Vec::new();
        let mut lost = lost.into_iter();
        for batch in lost.by_ref() {
            let mut invocation = self.claim.prepare_invoke();
            invocation.key(&batch.result_key[..]);
            // `invoke` loads the script after NOSCRIPT (on a cluster: on every primary).
            match self.call(
                "recover",
                |con| invocation.invoke::<Option<Vec<u8>>>(con.like()),
                |_| None,
            ) {
                Ok(Some(blob)) => match parse_netstrings(&blob) {
                    Some(out) => self.settle_all(&batch.events, &out),
                    None => tracing::warn!("correlation store (redis): a result could not be read"),
                },
                // Not applied yet (the script may still be queued), or never.
                Ok(None) if batch.since.elapsed() < self.recover_for => keep.push(batch),
                Ok(None) => {}
                Err(_) => {
                    keep.push(batch);
                    break;
                }
            }
        }
        keep.extend(lost);
        if !keep.is_empty() {
            let mut pending = self.pending.lock().unwrap_or_else(|p| p.into_inner());
            for batch in keep.into_iter().rev() {
                pending.push_front(batch);
            }
            pending.truncate(MAX_PENDING);
        }
    }

    fn settle_all(&self, events: &[FlowEvent], out: &[Vec<u8>]) {
        for record in out.chunks_exact(4) {
            let index = std::str::from_utf8(&record[0])
                .ok()
                .and_then(|s| s.parse::<usize>().ok())
                .unwrap_or(0);
            let event = index.checked_sub(1).and_then(|i| events.get(i));
            self.settle(event, record[1].first().copied(), &record[2], &record[3]);
        }
    }

    /// Reports one outcome the script returned for `event` (none: an eviction), with the
    /// steps of the instance it concerns when the script handed them back.
    fn settle(&self, event: Option<&FlowEvent>, code: Option<u8>, stored: &[u8], kept: &[u8]) {
        let sink = &*self.sink;
        let stored = || {
            let entry = decode(stored);
            if entry.is_none() {
                self.warnings.unreadable.warn(format_args!(
                    "correlation store (redis): an entry could not be read"
                ));
            }
            entry
        };
        match (code, event) {
            (Some(b'T'), _) => {
                if let Some(entry) = stored() {
                    entry.gone(sink, false, &steps::parse_steps(kept));
                }
            }
            (Some(b'E'), _) => {
                if let Some(entry) = stored() {
                    self.warnings.evicted.warn(format_args!(
                        "correlation store full (limits.max_in_flight): evicting the entries \
                         due soonest (flow {}); raise the limit or shorten flow timeouts",
                        entry.flow
                    ));
                    entry.gone(sink, true, &steps::parse_steps(kept));
                }
            }
            (Some(b'S'), Some(e)) => {
                sink.report(Report::Opened {
                    flow: &e.flow,
                    start_dims: &e.dims,
                });
                let kept = steps::parse_steps(kept);
                steps::report_reached(sink, &e.flow, &e.dims, e.timestamp_nanos, &kept);
            }
            (Some(b'R'), Some(e)) => {
                let (Some(entry), Some(step)) = (stored(), &e.step) else {
                    return;
                };
                sink.report(Report::StepReached {
                    flow: &entry.flow,
                    start_dims: &entry.dims,
                    step,
                    since_start_secs: duration_secs(entry.timestamp_nanos, e.timestamp_nanos),
                    trace: e.trace,
                });
            }
            (Some(b'A'), Some(e)) => sink.report(Report::StepUnmatched {
                flow: &e.flow,
                reason: StepUnmatchedReason::AfterClose,
            }),
            (Some(b'O'), Some(e)) => sink.report(Report::Opened {
                flow: &e.flow,
                start_dims: &e.dims,
            }),
            (Some(b'D'), Some(e)) => sink.report(Report::Duplicate { kind: e.kind }),
            (Some(b'P'), Some(e)) => {
                let Some(Entry { end: Some(end), .. }) = stored() else {
                    return;
                };
                sink.report(Report::Opened {
                    flow: &e.flow,
                    start_dims: &e.dims,
                });
                let kept = steps::parse_steps(kept);
                steps::report_reached(sink, &e.flow, &e.dims, e.timestamp_nanos, &kept);
                sink.report(Report::Completed {
                    flow: &e.flow,
                    start_dims: &e.dims,
                    end: &end,
                    duration_secs: duration_secs(e.timestamp_nanos, end.timestamp_nanos),
                    transits: &steps::transits(e.timestamp_nanos, &kept),
                });
            }
            (Some(b'C'), Some(e)) => {
                let (Some(entry), EventKind::End(outcome)) = (stored(), e.kind) else {
                    return;
                };
                let end = EndRecord {
                    outcome,
                    timestamp_nanos: e.timestamp_nanos,
                    dims: e.dims.clone(),
                    trace: e.trace,
                };
                let kept = steps::parse_steps(kept);
                sink.report(Report::Completed {
                    flow: &entry.flow,
                    start_dims: &entry.dims,
                    end: &end,
                    duration_secs: duration_secs(entry.timestamp_nanos, e.timestamp_nanos),
                    transits: &steps::transits(entry.timestamp_nanos, &kept),
                });
            }
            // `W`: the end waits; nothing to report yet.
            _ => {}
        }
    }
}

impl CorrelationStore for RedisStore {
    fn apply_batch(&self, events: &mut dyn Iterator<Item = FlowEvent>) -> Result<(), StoreError> {
        let events: Vec<FlowEvent> = events.collect();
        if events.is_empty() {
            return Ok(());
        }
        self.announce_step_flows(&events);
        let calls = self.calls(events);
        let cmds: Vec<Cmd> = calls.iter().map(|c| self.apply_cmd(c)).collect();
        // A call that applied while another failed is recognised when the exporter
        // retries the whole batch (its fingerprints are in the store).
        let results = match self.eval_all("apply", &self.apply, &cmds) {
            Ok(results) => results,
            Err(e) => {
                for call in calls {
                    self.failed(call);
                }
                return Err(e);
            }
        };
        let mut refused = None;
        for (call, result) in calls.into_iter().zip(results) {
            let out = result.and_then(|v| Vec::<Vec<u8>>::from_redis_value(v).map_err(Into::into));
            match out {
                Ok(out) => {
                    self.settle_all(&call.events, &out);
                    self.shards[call.shard]
                        .acks
                        .lock()
                        .unwrap_or_else(|p| p.into_inner())
                        .push(call.result_key);
                }
                Err(e) => {
                    refused.get_or_insert_with(|| store_error(&e));
                    self.failed(call);
                }
            }
        }
        refused.map_or(Ok(()), Err)
    }

    fn run_pending_tasks(&self) {
        self.probe_writes();
        let lost = !self
            .pending
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .is_empty();
        if lost {
            self.recover();
        }
        if let Some(ages) = &self.ages {
            ages.report_if_due(self);
        }
        // A sweep's reply cannot be read back (unlike an apply's): on a cluster, where a
        // NOSCRIPT or a failed node in a pipeline loses the replies of the calls sent
        // with it, each shard is swept in a call of its own.
        let per_call = match self.pool.target {
            Target::Cluster(_) => 1,
            Target::One(_) => self.shards.len(),
        };
        // Every shard at first; then again those that had more due than one call pops.
        let mut due_shards: Vec<usize> = (0..self.shards.len()).collect();
        for _ in 0..SWEEP_ROUNDS {
            let mut again = Vec::new();
            for group in due_shards.chunks(per_call) {
                let cmds: Vec<Cmd> = group
                    .iter()
                    .map(|&n| {
                        let mut cmd = redis::cmd("EVALSHA");
                        let shard = &self.shards[n];
                        cmd.arg(self.sweep.get_hash())
                            .arg(2)
                            .arg(&shard.deadlines[..])
                            .arg(&shard.stepflows[..])
                            .arg(SWEEP_LIMIT)
                            .arg(shard.prefix.len())
                            .arg(self.mark_ms)
                            .arg(u8::from(self.ages.is_some()));
                        cmd
                    })
                    .collect();
                let Ok(results) = self.eval_all("sweep", &self.sweep, &cmds) else {
                    return;
                };
                for (&n, result) in group.iter().zip(results) {
                    let Ok(out) = result
                        .and_then(|v| Vec::<Vec<u8>>::from_redis_value(v).map_err(Into::into))
                    else {
                        continue;
                    };
                    let Some((left, due)) = out.split_first() else {
                        continue;
                    };
                    let left = std::str::from_utf8(left)
                        .ok()
                        .and_then(|s| s.parse::<u64>().ok())
                        .unwrap_or(0);
                    self.shards[n].entries.store(left, Ordering::Relaxed);
                    for popped in due.chunks_exact(2) {
                        self.settle(None, Some(b'T'), &popped[0], &popped[1]);
                    }
                    if due.len() / 2 >= SWEEP_LIMIT {
                        again.push(n);
                    }
                }
            }
            if again.is_empty() {
                return;
            }
            due_shards = again;
        }
    }

    fn entries(&self) -> u64 {
        self.shards
            .iter()
            .map(|s| s.entries.load(Ordering::Relaxed))
            .sum()
    }

    fn capacity(&self) -> u64 {
        self.capacity
    }

    fn blocks(&self) -> bool {
        true
    }

    fn available(&self) -> bool {
        self.available.load(Ordering::Acquire) && !self.writes_refused.load(Ordering::Acquire)
    }
}

/// Where connections go.
enum Target {
    One(Client),
    Cluster(ClusterClient),
}

/// A connection to one server, or to a cluster (which holds one per node it uses).
enum Conn {
    One(Connection),
    Cluster(Box<ClusterConnection>),
}

impl Conn {
    fn like(&mut self) -> &mut dyn ConnectionLike {
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
    fn eval_all(&mut self, script: &Script, cmds: &[Cmd]) -> RedisResult<Vec<RedisResult<Value>>> {
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
                    // A cluster pipeline answers only the errors when some command
                    // failed: the others ran, and their replies are lost (their
                    // outcomes are read back from their result keys).
                    Err(e) => {
                        let Some(errors) = e.clone().into_server_errors() else {
                            return Err(e);
                        };
                        let mut values = vec![Value::Nil; cmds.len()];
                        let mut failed = vec![false; cmds.len()];
                        for (i, error) in errors.iter() {
                            if let Some(v) = values.get_mut(*i) {
                                *v = Value::ServerError(error.clone());
                                failed[*i] = true;
                            }
                        }
                        let mut results: Vec<RedisResult<Value>> = Vec::new();
                        for (value, failed) in values.into_iter().zip(failed) {
                            results.push(if failed {
                                value.extract_error()
                            } else {
                                Err(RedisError::from((
                                    redis::ErrorKind::Io,
                                    "reply lost in a pipeline with a failed command",
                                )))
                            });
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
    fn add_to_all(&mut self, keys: &[&[u8]], members: &[Arc<str>]) -> RedisResult<()> {
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

/// Synchronous connections, opened on demand; at most `size` kept idle.
struct Pool {
    target: Target,
    idle: Mutex<Vec<Conn>>,
    size: usize,
    connect_timeout: Duration,
    command_timeout: Duration,
}

impl Pool {
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

    fn with<T>(&self, f: impl FnOnce(&mut Conn) -> RedisResult<T>) -> RedisResult<T> {
        let pooled = self.idle.lock().unwrap_or_else(|p| p.into_inner()).pop();
        let mut con = match pooled {
            Some(con) => con,
            None => self.connect()?,
        };
        let result = f(&mut con);
        let mut idle = self.idle.lock().unwrap_or_else(|p| p.into_inner());
        match &result {
            Ok(_) if idle.len() < self.size => idle.push(con),
            Ok(_) => {}
            // The others were opened to the same servers: after a restart they are all
            // dead, and each would cost a failed export.
            Err(e) if e.is_io_error() || e.is_timeout() || e.is_connection_dropped() => {
                idle.clear()
            }
            Err(_) => {}
        }
        result
    }
}

/// The PEM file of `correlation.redis.ca_file`, checked: redis-rs reads it only when
/// it connects, and a file that is not PEM would make every connection fail, long after
/// the start.
fn read_ca_file(path: &std::path::Path) -> Result<Vec<u8>, String> {
    use rustls::pki_types::{pem::PemObject, CertificateDer};
    let fail = |e: String| format!("correlation.redis.ca_file {:?}: {e}", path.display());
    let pem = std::fs::read(path).map_err(|e| fail(e.to_string()))?;
    match CertificateDer::pem_slice_iter(&pem).collect::<Result<Vec<_>, _>>() {
        Ok(found) if !found.is_empty() => Ok(pem),
        Ok(_) => Err(fail("no PEM certificate in it".into())),
        Err(e) => Err(fail(format!("not PEM certificates: {e}"))),
    }
}

/// A stable digest of the instance's identity: the same on every replica and version.
fn digest(flow: &str, id: &str) -> u64 {
    // FNV-1a, 64 bits.
    let mut h: u64 = 0xcbf2_9ce4_8422_2325;
    for b in flow.bytes().chain([0xff]).chain(id.bytes()) {
        h ^= u64::from(b);
        h = h.wrapping_mul(0x0000_0100_0000_01b3);
    }
    h
}

/// The digest in hex: the instance's part of its keys.
fn hex(h: u64) -> [u8; 16] {
    let mut out = [0u8; 16];
    for (i, byte) in out.iter_mut().enumerate() {
        *byte = b"0123456789abcdef"[((h >> (60 - 4 * i)) & 0xf) as usize];
    }
    out
}

/// A batch sent whose reply did not come.
struct Pending {
    result_key: Vec<u8>,
    events: Vec<FlowEvent>,
    since: Instant,
}

/// `len:bytes` repeated, as the script keeps its reply.
fn parse_netstrings(mut blob: &[u8]) -> Option<Vec<Vec<u8>>> {
    let mut out = Vec::new();
    while !blob.is_empty() {
        let colon = blob.iter().position(|&b| b == b':')?;
        let len: usize = std::str::from_utf8(&blob[..colon]).ok()?.parse().ok()?;
        let rest = &blob[colon + 1..];
        out.push(rest.get(..len)?.to_vec());
        blob = &rest[len..];
    }
    Some(out)
}

/// What an instance's value holds, read back.
struct Entry {
    flow: Arc<str>,
    timestamp_nanos: u64,
    dims: DimValues,
    /// Opened by its start (else an end, or only steps, wait for it).
    opened: bool,
    /// The waiting end; `None` for an open instance or waiting steps.
    end: Option<EndRecord>,
}

impl Entry {
    /// The entry left the store by time-out or eviction, with `steps` its steps.
    fn gone(&self, sink: &dyn FlowSink, evicted: bool, kept: &[StoredStep]) {
        if !self.opened {
            if self.end.is_some() {
                sink.report(Report::Unmatched {
                    flow: &self.flow,
                    evicted,
                });
            }
            steps::report_no_start(sink, &self.flow, kept);
        } else if evicted {
            sink.report(Report::Dropped {
                flow: &self.flow,
                start_dims: &self.dims,
            });
        } else {
            sink.report(Report::TimedOut {
                flow: &self.flow,
                start_dims: &self.dims,
                transits: &steps::transits(self.timestamp_nanos, kept),
                last_step: kept.last().map(|s| &s.name),
            });
        }
    }
}

/// `state`, the timestamp as 20 digits, then flow, the number of dims, the dims, and
/// for an end its outcome and trace; lengths as u32 little-endian.
fn encode(state: u8, event: &FlowEvent) -> Vec<u8> {
    let mut out = Vec::with_capacity(64);
    out.push(state);
    out.extend_from_slice(format!("{:020}", event.timestamp_nanos).as_bytes());
    put_str(&mut out, &event.flow);
    let count = u32::try_from(event.dims.len()).unwrap_or(u32::MAX);
    out.extend_from_slice(&count.to_le_bytes());
    for dim in event.dims.iter().take(count as usize) {
        put_str(&mut out, dim);
    }
    if let EventKind::End(outcome) = event.kind {
        out.push(match outcome {
            Outcome::Success => b's',
            Outcome::Failure => b'f',
            Outcome::Cancelled => b'c',
        });
        if let Some(trace) = event.trace {
            out.extend_from_slice(&trace.trace_id);
            out.extend_from_slice(&trace.span_id);
        }
    }
    out
}

fn put_str(out: &mut Vec<u8>, s: &str) {
    let len = u32::try_from(s.len()).unwrap_or(u32::MAX);
    out.extend_from_slice(&len.to_le_bytes());
    out.extend_from_slice(&s.as_bytes()[..len as usize]);
}

/// Reads what [`encode`] wrote; `None` for anything else.
fn decode(raw: &[u8]) -> Option<Entry> {
    let mut r = Reader(raw);
    let state = r.take(1)?[0];
    let timestamp_nanos: u64 = std::str::from_utf8(r.take(20)?).ok()?.parse().ok()?;
    let flow = r.string()?;
    let count = r.u32()? as usize;
    // Each dim takes at least its 4-byte length: a corrupt count cannot allocate much.
    let mut dims = Vec::with_capacity(count.min(r.0.len() / 4));
    for _ in 0..count {
        dims.push(r.string()?);
    }
    let dims: DimValues = dims.into();
    let end = match state {
        b'o' | b'p' => None,
        b'w' => {
            let outcome = match r.take(1)?[0] {
                b's' => Outcome::Success,
                b'f' => Outcome::Failure,
                b'c' => Outcome::Cancelled,
                _ => return None,
            };
            let trace = match r.0.len() {
                0 => None,
                24 => TraceRef::from_ids(&r.0[..16], &r.0[16..]),
                _ => return None,
            };
            Some(EndRecord {
                outcome,
                timestamp_nanos,
                dims: dims.clone(),
                trace,
            })
        }
        _ => return None,
    };
    Some(Entry {
        flow,
        timestamp_nanos,
        dims,
        opened: state == b'o',
        end,
    })
}

struct Reader<'a>(&'a [u8]);

impl<'a> Reader<'a> {
    fn take(&mut self, n: usize) -> Option<&'a [u8]> {
        let (head, tail) = (self.0.get(..n)?, self.0.get(n..)?);
        self.0 = tail;
        Some(head)
    }

    fn u32(&mut self) -> Option<u32> {
        Some(u32::from_le_bytes(self.take(4)?.try_into().ok()?))
    }

    fn string(&mut self) -> Option<Arc<str>> {
        let len = self.u32()? as usize;
        Some(Arc::from(String::from_utf8_lossy(self.take(len)?).as_ref()))
    }
}

/// What a failed call means for the exporter and the operator.
fn store_error(e: &RedisError) -> StoreError {
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

#[cfg(test)]
mod tests {
    use super::*;
    use crate::flows::event::Source;

    fn event(kind: EventKind, trace: Option<TraceRef>) -> FlowEvent {
        FlowEvent {
            flow: Arc::from("checkout"),
            correlation_id: "o-1".into(),
            kind,
            timestamp_nanos: 1_700_000_000_123_456_789,
            dims: Arc::from([Arc::from("web"), Arc::from("")]),
            trace,
            source: Source::SpanEvent,
            step: None,
        }
    }

    #[test]
    fn values_read_back_as_written() {
        let open = decode(&encode(b'o', &event(EventKind::Start, None))).unwrap();
        assert_eq!(&*open.flow, "checkout");
        assert_eq!(open.timestamp_nanos, 1_700_000_000_123_456_789);
        assert_eq!(open.dims.len(), 2);
        assert!(open.end.is_none());
        let trace = TraceRef {
            trace_id: [7; 16],
            span_id: [9; 8],
        };
        let end = event(EventKind::End(Outcome::Failure), Some(trace));
        let waiting = decode(&encode(b'w', &end)).unwrap();
        let record = waiting.end.unwrap();
        assert_eq!(record.outcome, Outcome::Failure);
        assert_eq!(record.trace, Some(trace));
        assert_eq!(&*record.dims[0], "web");
        assert!(decode(b"x").is_none());
        assert!(decode(b"o0000000000000000000").is_none());
    }

    #[test]
    fn the_tag_is_stable_and_tells_flows_apart() {
        assert_eq!(digest("a", "b"), digest("a", "b"));
        assert_ne!(digest("ab", ""), digest("a", "b"));
        assert!(hex(digest("a", "b")).iter().all(u8::is_ascii_hexdigit));
        // Keys written by earlier versions are found: the digest must never change.
        assert_eq!(&hex(digest("checkout", "o-1")), b"18e69ca00a2a0ffd");
    }
}
