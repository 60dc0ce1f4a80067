//! The shared correlation store: Redis or Valkey (one server, or a Redis Cluster) holds
//! every open instance, every end waiting for its start, the deadlines and the retry
//! fingerprints, so that any replica closes what another opened (SPEC §3 "several
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
//! `s{h}i<flow>\0<id>` the instance; `s{h}s<ts>` / `s{h}e<ts>` a retry fingerprint that
//! expires after the dedup window; `sdeadlines` the shard's instance keys by deadline
//! (ms); `s{r}<replica>:<call>` a call's reply. (Only the first `{…}` of a key is its
//! Cluster hash tag: in `p{3}{h}i…` it is `3`.) An instance's value: its state (`o`
//! open, `w` an end waiting), its event timestamp as 20 digits (compared as strings:
//! Lua numbers are doubles), then the payload encoded here (flow, dims, and for an end
//! its outcome and trace).
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
    duration_secs, CorrelationStore, EndRecord, FlowSink, OverdueSettings, Report, StoreSettings,
    StoreUnavailable,
};

mod ages;
use crate::flows::event::{DimValues, EventKind, FlowEvent, Outcome, TraceRef};

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

const APPLY: &str = r#"
local zset = KEYS[1]
local window = ARGV[1]
local cap = tonumber(ARGV[2])
local t = redis.call('TIME')
local now = tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000)
local out = {}
local function emit(i, code, v)
  out[#out + 1] = tostring(i)
  out[#out + 1] = code
  out[#out + 1] = v or ''
end
local acks = tonumber(ARGV[3])
local n = (#KEYS - 2 - acks) / 2
-- Open instances per flow by start second (docs/behaviour.md §10 "overdue"), when asked.
local track = ARGV[3 * n + 4] == '1'
local prefix = string.sub(zset, 1, -10)
local function age(key, v, d)
  if not track or string.sub(v, 1, 1) ~= 'o' then return end
  local flow = string.match(key, '%x}i([%w_%.:%-]+)')
  if not flow then return end
  local ages, second = prefix .. 'ages:' .. flow, string.sub(v, 2, 12)
  if redis.call('HINCRBY', ages, second, d) <= 0 then redis.call('HDEL', ages, second) end
end
local function take(key, old)
  redis.call('DEL', key)
  redis.call('ZREM', zset, key)
  age(key, old, -1)
end
-- Results this replica has read: no longer needed for recovery.
for j = 2 * n + 3, #KEYS do redis.call('DEL', KEYS[j]) end
for i = 1, n do
  local key = KEYS[2 * i + 1]
  local fp = KEYS[2 * i + 2]
  local kind = ARGV[3 * i + 1]
  local value = ARGV[3 * i + 2]
  local timeout = tonumber(ARGV[3 * i + 3])
  if not redis.call('SET', fp, '1', 'NX', 'PX', window) then
    emit(i, 'D')
  else
    local old = redis.call('GET', key)
    if old then
      local due = redis.call('ZSCORE', zset, key)
      if due and tonumber(due) <= now then
        -- Past its deadline and not yet swept: it timed out, and this event finds nothing.
        take(key, old)
        emit(i, 'T', old)
        old = nil
      end
    end
    if not old then
      redis.call('SET', key, value)
      redis.call('ZADD', zset, now + timeout, key)
      age(key, value, 1)
      if kind == 's' then emit(i, 'O') else emit(i, 'W') end
    elseif kind == 's' then
      if string.sub(old, 1, 1) == 'o' then
        -- The earliest start wins; the instance keeps its dims and deadline.
        if string.sub(value, 2, 21) < string.sub(old, 2, 21) then
          local earlier = string.sub(value, 1, 21) .. string.sub(old, 22)
          redis.call('SET', key, earlier)
          age(key, old, -1)
          age(key, earlier, 1)
        end
        emit(i, 'D')
      else
        take(key, old)
        emit(i, 'P', old)
      end
    elseif string.sub(old, 1, 1) == 'o' then
      take(key, old)
      emit(i, 'C', old)
    else
      emit(i, 'D')
    end
  end
end
-- Full: the entries due soonest leave (timed out if already due). The keys popped are
-- not in KEYS, but they are this shard's: in the hash slot of KEYS[1] (the shard's tag).
local over = redis.call('ZCARD', zset) - cap
while over > 0 do
  local popped = redis.call('ZPOPMIN', zset)
  if #popped == 0 then break end
  local v = redis.call('GET', popped[1])
  redis.call('DEL', popped[1])
  if v then
    age(popped[1], v, -1)
    if tonumber(popped[2]) <= now then emit(0, 'T', v) else emit(0, 'E', v) end
  end
  over = over - 1
end
-- Kept until this replica has read the reply: if the reply is lost, the replica reads
-- the outcomes from here and reports them (the exporter's retry finds only duplicates).
local parts = {}
for j = 1, #out do parts[j] = #out[j] .. ':' .. out[j] end
redis.call('SET', KEYS[2], table.concat(parts), 'PX', math.max(tonumber(window), 60000))
return out
"#;

const CLAIM: &str = r#"
local v = redis.call('GET', KEYS[1])
if v then redis.call('DEL', KEYS[1]) end
return v
"#;

const SWEEP: &str = r#"
local track = ARGV[2] == '1'
local prefix = string.sub(KEYS[1], 1, -10)
local t = redis.call('TIME')
local now = tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000)
local due = redis.call('ZRANGEBYSCORE', KEYS[1], '-inf', now, 'LIMIT', 0, tonumber(ARGV[1]))
local out = { tostring(redis.call('ZCARD', KEYS[1]) - #due) }
-- Not in KEYS, but of this shard: in the hash slot of KEYS[1] (the shard's tag).
for _, key in ipairs(due) do
  local v = redis.call('GET', key)
  redis.call('DEL', key)
  redis.call('ZREM', KEYS[1], key)
  if v then
    out[#out + 1] = v
    local flow = string.match(key, '%x}i([%w_%.:%-]+)')
    if track and flow and string.sub(v, 1, 1) == 'o' then
      local ages, second = prefix .. 'ages:' .. flow, string.sub(v, 2, 12)
      if redis.call('HINCRBY', ages, second, -1) <= 0 then redis.call('HDEL', ages, second) end
    end
  end
end
return out
"#;

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
    capacity: u64,
    /// Entries one shard may hold: `capacity` spread evenly, rounded up.
    shard_capacity: u64,
    available: AtomicBool,
    last_warning: Mutex<Option<Instant>>,
    /// Open-instance ages of flows with an overdue threshold; `None`: none has one.
    ages: Option<ages::RedisAges>,
}

/// One shard: its keys all start with `prefix`.
struct Shard {
    /// `p{n}` (one hash slot on a cluster), or `p` alone for one shard on one server.
    prefix: Vec<u8>,
    deadlines: Vec<u8>,
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
                Shard {
                    prefix,
                    deadlines,
                    acks: Mutex::new(Vec::new()),
                    entries: AtomicU64::new(0),
                }
            })
            .collect();
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
            capacity: settings.capacity,
            shard_capacity: settings.capacity.div_ceil(u64::from(count)),
            available: AtomicBool::new(false),
            last_warning: Mutex::new(None),
            ages: None,
        })
    }

    /// Keeps, in the store, the ages of open instances (per flow, by start second) and
    /// reports the overdue counts of flows with a threshold about every two seconds.
    /// Every replica must be configured alike: each one reports the same, global values.
    pub fn track_open_ages(mut self, settings: OverdueSettings) -> Self {
        self.ages = Some(ages::RedisAges::new(settings));
        self
    }

    /// Times a call, tells the probe, and keeps the availability flag.
    fn call<T>(
        &self,
        op: &'static str,
        f: impl FnOnce(&mut Conn) -> RedisResult<T>,
        ok: impl FnOnce(&T) -> bool,
    ) -> RedisResult<T> {
        let started = Instant::now();
        let result = self.pool.with(f);
        let fine = result.as_ref().is_ok_and(ok);
        self.probe
            .store_call(op, started.elapsed().as_secs_f64(), fine);
        self.available.store(fine, Ordering::Release);
        let error = match &result {
            Err(e) => Some(e.to_string()),
            Ok(_) if !fine => Some("a script call failed".to_string()),
            Ok(_) => None,
        };
        if let Some(e) = error {
            self.warn(op, &e);
        }
        result
    }

    fn warn(&self, op: &'static str, e: &str) {
        let mut last = self.last_warning.lock().unwrap_or_else(|p| p.into_inner());
        let now = Instant::now();
        if last.is_none_or(|t| now.duration_since(t) >= WARN_EVERY) {
            *last = Some(now);
            tracing::warn!(op, "correlation store (redis) unavailable: {e}");
        }
    }

    /// Runs `cmds` (EVALSHA of `script`) pipelined; one result per command.
    fn eval_all(
        &self,
        op: &'static str,
        script: &Script,
        cmds: &[Cmd],
    ) -> RedisResult<Vec<RedisResult<Value>>> {
        self.call(
            op,
            |con| con.eval_all(script, cmds),
            |results| results.iter().all(Result::is_ok),
        )
    }

    /// The EVALSHA of one chunk of one shard's events.
    fn apply_cmd(&self, call: &Call) -> Cmd {
        let shard = &self.shards[call.shard];
        let mut keys: Vec<Vec<u8>> =
            Vec::with_capacity(2 + 2 * call.events.len() + call.acks.len());
        let mut args: Vec<Vec<u8>> = Vec::with_capacity(3 + 3 * call.events.len());
        keys.push(shard.deadlines.clone());
        keys.push(call.result_key.clone());
        args.push(self.window_ms.to_string().into_bytes());
        args.push(self.shard_capacity.to_string().into_bytes());
        args.push(call.acks.len().to_string().into_bytes());
        for event in &call.events {
            let tag = hex(digest(&event.flow, &event.correlation_id));
            let mut key = shard.tagged(&tag, b'i');
            key.extend_from_slice(event.flow.as_bytes());
            key.push(0);
            key.extend_from_slice(event.correlation_id.as_bytes());
            let (kind, state) = match event.kind {
                EventKind::Start => (b's', b'o'),
                EventKind::End(_) => (b'e', b'w'),
            };
            let mut fingerprint = shard.tagged(&tag, kind);
            fingerprint.extend_from_slice(event.timestamp_nanos.to_string().as_bytes());
            let timeout_ms = u64::try_from((self.timeout_for)(&event.flow).as_millis())
                .unwrap_or(u64::MAX)
                .min(MAX_TIMEOUT_MS);
            keys.push(key);
            keys.push(fingerprint);
            args.push(vec![kind]);
            args.push(encode(state, event));
            args.push(timeout_ms.to_string().into_bytes());
        }
        keys.extend(call.acks.iter().cloned());
        args.push(if self.ages.is_some() {
            b"1".to_vec()
        } else {
            b"0".to_vec()
        });
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
            tracing::warn!(
                "correlation store (redis): too many exports without a reply; the \
                 outcomes of the oldest are not counted if they were applied"
            );
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
                |_| true,
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
        for record in out.chunks_exact(3) {
            let index = std::str::from_utf8(&record[0])
                .ok()
                .and_then(|s| s.parse::<usize>().ok())
                .unwrap_or(0);
            let event = index.checked_sub(1).and_then(|i| events.get(i));
            self.settle(event, record[1].first().copied(), &record[2]);
        }
    }

    /// Reports one outcome the script returned for `event` (none: an eviction).
    fn settle(&self, event: Option<&FlowEvent>, code: Option<u8>, stored: &[u8]) {
        let sink = &*self.sink;
        let stored = || {
            let entry = decode(stored);
            if entry.is_none() {
                tracing::warn!("correlation store (redis): an entry could not be read");
            }
            entry
        };
        match (code, event) {
            (Some(b'T'), _) => {
                if let Some(entry) = stored() {
                    entry.gone(sink, false);
                }
            }
            (Some(b'E'), _) => {
                if let Some(entry) = stored() {
                    warn_evicted(&self.last_warning, &entry.flow);
                    entry.gone(sink, true);
                }
            }
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
                sink.report(Report::Completed {
                    flow: &e.flow,
                    start_dims: &e.dims,
                    end: &end,
                    duration_secs: duration_secs(e.timestamp_nanos, end.timestamp_nanos),
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
                sink.report(Report::Completed {
                    flow: &entry.flow,
                    start_dims: &entry.dims,
                    end: &end,
                    duration_secs: duration_secs(entry.timestamp_nanos, e.timestamp_nanos),
                });
            }
            // `W`: the end waits; nothing to report yet.
            _ => {}
        }
    }
}

impl CorrelationStore for RedisStore {
    fn apply_batch(
        &self,
        events: &mut dyn Iterator<Item = FlowEvent>,
    ) -> Result<(), StoreUnavailable> {
        let events: Vec<FlowEvent> = events.collect();
        if events.is_empty() {
            return Ok(());
        }
        if let Some(ages) = &self.ages {
            ages.note_flows(&events);
        }
        let calls = self.calls(events);
        let cmds: Vec<Cmd> = calls.iter().map(|c| self.apply_cmd(c)).collect();
        // A call that applied while another failed is recognised when the exporter
        // retries the whole batch (its fingerprints are in the store).
        let results = match self.eval_all("apply", &self.apply, &cmds) {
            Ok(results) => results,
            Err(_) => {
                for call in calls {
                    self.failed(call);
                }
                return Err(StoreUnavailable);
            }
        };
        let mut refused = false;
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
                Err(_) => {
                    refused = true;
                    self.failed(call);
                }
            }
        }
        if refused {
            Err(StoreUnavailable)
        } else {
            Ok(())
        }
    }

    fn run_pending_tasks(&self) {
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
                        cmd.arg(self.sweep.get_hash())
                            .arg(1)
                            .arg(&self.shards[n].deadlines[..])
                            .arg(SWEEP_LIMIT)
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
                    for stored in due {
                        self.settle(None, Some(b'T'), stored);
                    }
                    if due.len() >= SWEEP_LIMIT {
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
        self.available.load(Ordering::Acquire)
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
    /// The waiting end; `None` for an open instance.
    end: Option<EndRecord>,
}

impl Entry {
    fn gone(&self, sink: &dyn FlowSink, evicted: bool) {
        match (&self.end, evicted) {
            (Some(_), _) => sink.report(Report::Unmatched {
                flow: &self.flow,
                evicted,
            }),
            (None, true) => sink.report(Report::Dropped {
                flow: &self.flow,
                start_dims: &self.dims,
            }),
            (None, false) => sink.report(Report::TimedOut {
                flow: &self.flow,
                start_dims: &self.dims,
            }),
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
        b'o' => None,
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

fn warn_evicted(last: &Mutex<Option<Instant>>, flow: &str) {
    let mut last = last.lock().unwrap_or_else(|p| p.into_inner());
    let now = Instant::now();
    if last.is_none_or(|t| now.duration_since(t) >= WARN_EVERY) {
        *last = Some(now);
        tracing::warn!(
            flow,
            "correlation store full (limits.max_in_flight): evicting the entries due \
             soonest; raise the limit or shorten flow timeouts"
        );
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
