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
//! Overdue instances (docs/behaviour.md §10, [`ages`]): `fages:<flow>`, with `f` the
//! first shard's prefix, a flow's open instances by start second (a hash), for flows
//! with a threshold only; each replica writes the opens and closes it saw there, from
//! the scripts' answers.
//!
//! The client is redis-rs' synchronous connection (or its cluster connection, which
//! routes each call by its first key) with socket timeouts, in a small pool: the store
//! is called from blocking threads (pipeline, maintenance thread), and a dropped
//! connection is simply not returned to the pool, so the next call reconnects.
//!
//! Here: the store, its calls to the server and its `CorrelationStore` side. Beside it:
//! [`pool`] (connections, TLS, pipelined script calls), [`codec`] (instance values, kept
//! replies, key digests), [`outcomes`] (the scripts' answers reported to the sink, lost
//! replies read back), [`steps`], [`ages`], and the scripts (`redis/*.lua`).

use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex, PoisonError};
use std::time::{Duration, Instant};

use redis::{Cmd, FromRedisValue, RedisResult, Script, Value};

use super::{CorrelationStore, FlowSink, OverdueSettings, StoreError, StoreSettings};
use crate::flows::event::{EventKind, FlowEvent};
use crate::logging::RateLimited;

mod ages;
mod codec;
mod outcomes;
mod pool;
mod steps;
use codec::{digest, encode, hex};
use outcomes::Pending;
use pool::{is_dropped_reply, store_error, Conn, Pool, Target};
pub use pool::{CaFileError, RedisSetupError};

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

const APPLY: &str = include_str!("redis/apply.lua");
const CLAIM: &str = include_str!("redis/claim.lua");
const SWEEP: &str = include_str!("redis/sweep.lua");

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
    /// Start of every key (`correlation.redis.key_prefix`).
    pub key_prefix: String,
    /// Opening a connection must succeed within this.
    pub connect_timeout: Duration,
    /// One command must be answered within this, else the export is refused and retried.
    pub command_timeout: Duration,
    /// Idle connections kept open.
    pub pool_size: usize,
}

/// Told about every call to the shared store: `op` is `apply`, `sweep` or `recover`
/// (reading back the outcomes of a batch whose reply was lost). Implemented
/// by the metrics registry (errors counter, latency histogram).
pub trait StoreProbe: Send + Sync + 'static {
    /// Called after each call to the store: its `op`, how long it took, whether it succeeded.
    fn store_call(&self, op: &'static str, seconds: f64, ok: bool);
}

/// The correlation store in Redis (or Valkey), shared by every replica.
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
    /// `correlation.redis.shards` (1..=1024) shards; on one server one shard has the
    /// plain prefix (the keys of a deployment from before shards).
    fn all(redis: &RedisSettings) -> Vec<Shard> {
        let count = redis.shards.clamp(1, 1024);
        let tagged = !redis.cluster.is_empty() || count > 1;
        (0..count)
            .map(|n| {
                let mut prefix = redis.key_prefix.clone().into_bytes();
                if tagged {
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
            .collect()
    }

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
    events: Vec<FlowEvent<'static>>,
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
    ) -> Result<Self, RedisSetupError> {
        let pool = Pool::new(&redis)?;
        let shards = Shard::all(&redis);
        let count = shards.len() as u64;
        let mut probe_key = shards[0].prefix.clone();
        probe_key.extend_from_slice(b"probe");
        Ok(Self {
            pool,
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
            shard_capacity: settings.capacity.div_ceil(count),
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
                    .find_map(|r| r.as_ref().err().filter(|e| !is_dropped_reply(e)))
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
            args.push(vec![kind]);
            args.push(encode(state, event));
            args.push(timeout_ms.to_string().into_bytes());
            args.push(match event.kind {
                EventKind::Step => steps::step_argument(event),
                _ => Vec::new(),
            });
        }
        keys.extend(call.acks.iter().cloned());
        let mut cmd = redis::cmd("EVALSHA");
        cmd.arg(self.apply.get_hash())
            .arg(keys.len())
            .arg(&keys[..])
            .arg(&args[..]);
        cmd
    }

    /// Pops every shard's instances past their deadline and reports them.
    fn sweep(&self) {
        // A sweep's reply cannot be read back (unlike an apply's): on a cluster, where a
        // call refused in a pipeline (NOSCRIPT) drops the replies of the calls sent with
        // it, each shard is swept in a call of its own.
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
                            .arg(self.mark_ms);
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

    /// Splits a batch by shard (order kept within each), in chunks of [`CHUNK`].
    fn calls(&self, events: Vec<FlowEvent<'static>>) -> Vec<Call> {
        let count = self.shards.len();
        let mut groups: Vec<(usize, Vec<FlowEvent<'static>>)> = if count == 1 {
            vec![(0, events)]
        } else {
            let mut by_shard: Vec<Vec<FlowEvent<'static>>> = Vec::new();
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
                        .unwrap_or_else(PoisonError::into_inner);
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
}

impl CorrelationStore for RedisStore {
    fn apply_batch(&self, events: &mut dyn Iterator<Item = FlowEvent>) -> Result<(), StoreError> {
        // Owned: a call whose reply is lost keeps its events for the read-back.
        let events: Vec<FlowEvent<'static>> = events.map(FlowEvent::into_owned).collect();
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
                        .unwrap_or_else(PoisonError::into_inner)
                        .push(call.result_key);
                }
                Err(e) if is_dropped_reply(&e) => {
                    if let Err(e) = self.read_back(call) {
                        refused.get_or_insert(e);
                    }
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
            .unwrap_or_else(PoisonError::into_inner)
            .is_empty();
        if lost {
            self.recover();
        }
        self.sweep();
        // After the sweep: its time-outs are in the counts written and read.
        if let Some(ages) = &self.ages {
            ages.maintain(self);
        }
    }

    fn shutdown(&self) {
        if let Some(ages) = &self.ages {
            ages.write_changes(self);
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
