//! The state file: what the correlation store holds (open instances, waiting ends, retry
//! fingerprints), written at shutdown and at every checkpoint, read back at start
//! (SPEC §3 "restarts").
//!
//! Layout: an 8-byte magic, a little-endian `u32` format version, the body
//! ([`StoreSnapshot`] in postcard), and a little-endian CRC-32 of the body. Times are
//! wall-clock unix nanoseconds, so they mean the same after a restart (the store's own
//! clock is monotonic and starts anew with each process). Writes go to a temporary file
//! in the same directory, which is fsynced and renamed over the old one: a crash leaves
//! the old file or the new one, never a mix.

use std::fs::{self, File};
use std::io::{self, BufWriter, Read, Write};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use serde::{Deserialize, Serialize};

use super::store::CorrelationStore;
use crate::model::{is_valid_flow_name, is_valid_step_name};

pub const MAGIC: [u8; 8] = *b"FLOWMST\x01";
/// Bumped whenever [`StoreSnapshot`] changes shape; another version is set aside.
/// 2: steps (`SavedState::Stepped`, `SavedState::Pending`), appended so that a
/// version 1 file decodes as it is.
pub const VERSION: u32 = 2;
/// Older versions this build still reads.
const READS_VERSIONS: [u32; 2] = [1, 2];
const HEADER: usize = MAGIC.len() + 4;
const TRAILER: usize = 4;

/// Where the state lives and how often it is checkpointed (`state.*`).
#[derive(Debug, Clone)]
pub struct StateSettings {
    pub path: PathBuf,
    pub checkpoint_interval: Duration,
    /// A larger file is not read (it is input too).
    pub max_file_bytes: u64,
}

/// Everything a store needs to carry on after a restart.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct StoreSnapshot {
    pub saved_at_unix_nanos: u64,
    /// Seed of the hashers that turn (flow, correlation id) into a key: the file holds
    /// keys, not ids, so the new process must hash new events the same way.
    pub key_seed: u64,
    /// Dimension labels of the run that wrote the file: values are matched to the new
    /// run's labels by name.
    pub start_dim_labels: Vec<String>,
    pub end_dim_labels: Vec<String>,
    /// Flow names and dimension values, each once; entries refer to them by index.
    pub strings: Vec<Arc<str>>,
    pub entries: Vec<SavedEntry>,
    /// Retry fingerprints, one item per store shard.
    pub shards: Vec<SavedShard>,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct SavedEntry {
    pub key: [u8; 16],
    /// Index into [`StoreSnapshot::strings`].
    pub flow: u32,
    pub deadline_unix_nanos: u64,
    pub state: SavedState,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub enum SavedState {
    Open {
        start_nanos: u64,
        dims: Vec<u32>,
    },
    Waiting {
        /// 0 success, 1 failure, 2 cancelled.
        outcome: u8,
        timestamp_nanos: u64,
        dims: Vec<u32>,
        trace: Option<([u8; 16], [u8; 8])>,
    },
    /// An open instance with the steps it reached (version 2).
    Stepped {
        start_nanos: u64,
        dims: Vec<u32>,
        steps: Vec<SavedStep>,
    },
    /// Steps waiting for their start, with or without a waiting end (version 2).
    Pending {
        end: Option<SavedEnd>,
        steps: Vec<SavedStep>,
    },
}

/// A step of an entry (version 2).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct SavedStep {
    /// Index into [`StoreSnapshot::strings`].
    pub step: u32,
    pub timestamp_nanos: u64,
    /// Kept for waiting steps only (the exemplar when their start comes).
    pub trace: Option<([u8; 16], [u8; 8])>,
}

/// A waiting end beside waiting steps (version 2).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct SavedEnd {
    /// 0 success, 1 failure, 2 cancelled.
    pub outcome: u8,
    pub timestamp_nanos: u64,
    pub dims: Vec<u32>,
    pub trace: Option<([u8; 16], [u8; 8])>,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct SavedShard {
    /// Generation tag (1 or 2) of the newer fingerprints.
    pub current_tag: u8,
    pub rotated_at_unix_nanos: u64,
    /// Fingerprints with their generation tag in the low two bits.
    pub fingerprints: Vec<u64>,
}

/// Why a state file was not used.
#[derive(Debug)]
pub enum StateError {
    Io(io::Error),
    TooLarge(u64),
    Truncated,
    Foreign,
    Version(u32),
    Checksum,
    Decode(postcard::Error),
    Invalid(&'static str),
}

impl std::fmt::Display for StateError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            StateError::Io(e) => write!(f, "cannot read it: {e}"),
            StateError::TooLarge(n) => write!(f, "it is larger than the limit ({n} bytes)"),
            StateError::Truncated => f.write_str("it is truncated"),
            StateError::Foreign => f.write_str("it is not a flowmetrics state file"),
            StateError::Version(v) => {
                write!(f, "it has format version {v}, this build reads {VERSION}")
            }
            StateError::Checksum => f.write_str("its checksum does not match (corrupt)"),
            StateError::Decode(e) => write!(f, "it does not decode: {e}"),
            StateError::Invalid(why) => write!(f, "it is inconsistent: {why}"),
        }
    }
}

impl StoreSnapshot {
    /// Checks every reference before anything is applied (never half-applied).
    pub fn validate(&self) -> Result<(), StateError> {
        let n = self.strings.len();
        let in_range = |i: &u32| (*i as usize) < n;
        for e in &self.entries {
            if !in_range(&e.flow) {
                return Err(StateError::Invalid("flow index out of range"));
            }
            if !is_valid_flow_name(&self.strings[e.flow as usize]) {
                return Err(StateError::Invalid("invalid flow name"));
            }
            let (outcome, dims, steps): (Option<u8>, &[u32], &[SavedStep]) = match &e.state {
                SavedState::Open { dims, .. } => (None, dims, &[]),
                SavedState::Waiting { outcome, dims, .. } => (Some(*outcome), dims, &[]),
                SavedState::Stepped { dims, steps, .. } => (None, dims, steps),
                SavedState::Pending { end, steps } => match end {
                    Some(end) => (Some(end.outcome), &end.dims, steps),
                    None => (None, &[], steps),
                },
            };
            if outcome.is_some_and(|o| o > 2) {
                return Err(StateError::Invalid("unknown outcome"));
            }
            if !dims.iter().all(in_range) {
                return Err(StateError::Invalid("dimension index out of range"));
            }
            for step in steps {
                if !in_range(&step.step) || !is_valid_step_name(&self.strings[step.step as usize]) {
                    return Err(StateError::Invalid("invalid step"));
                }
            }
        }
        if self.shards.iter().any(|s| !matches!(s.current_tag, 1 | 2)) {
            return Err(StateError::Invalid("unknown fingerprint generation"));
        }
        Ok(())
    }
}

/// Wall-clock now, in unix nanoseconds.
pub fn unix_nanos_now() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| u64::try_from(d.as_nanos()).unwrap_or(u64::MAX))
}

/// Encodes a snapshot into the file format.
pub fn encode(snapshot: &StoreSnapshot, out: impl Write) -> io::Result<u64> {
    let mut out = CrcWriter {
        inner: out,
        crc: crc32fast::Hasher::new(),
        written: 0,
    };
    out.inner.write_all(&MAGIC)?;
    out.inner.write_all(&VERSION.to_le_bytes())?;
    let mut out = postcard::to_io(snapshot, out).map_err(io::Error::other)?;
    let crc = std::mem::take(&mut out.crc).finalize();
    out.inner.write_all(&crc.to_le_bytes())?;
    out.inner.flush()?;
    Ok((HEADER + TRAILER) as u64 + out.written)
}

/// Decodes the file format, checking magic, version and checksum first.
pub fn decode(bytes: &[u8]) -> Result<StoreSnapshot, StateError> {
    if bytes.len() < MAGIC.len() {
        return Err(if MAGIC.starts_with(bytes) {
            StateError::Truncated
        } else {
            StateError::Foreign
        });
    }
    if bytes[..MAGIC.len()] != MAGIC {
        return Err(StateError::Foreign);
    }
    if bytes.len() < HEADER + TRAILER {
        return Err(StateError::Truncated);
    }
    let mut version = [0; 4];
    version.copy_from_slice(&bytes[MAGIC.len()..HEADER]);
    let version = u32::from_le_bytes(version);
    if !READS_VERSIONS.contains(&version) {
        return Err(StateError::Version(version));
    }
    let (body, trailer) = bytes[HEADER..].split_at(bytes.len() - HEADER - TRAILER);
    let mut crc = [0; 4];
    crc.copy_from_slice(trailer);
    if crc32fast::hash(body) != u32::from_le_bytes(crc) {
        // A cut-off file fails here too; it cannot be told from a damaged one.
        return Err(StateError::Checksum);
    }
    let (snapshot, rest) =
        postcard::take_from_bytes::<StoreSnapshot>(body).map_err(StateError::Decode)?;
    if !rest.is_empty() {
        return Err(StateError::Invalid("bytes after the body"));
    }
    snapshot.validate()?;
    Ok(snapshot)
}

/// Reads the state file. `Ok(None)`: there is none (a fresh start).
pub fn read(path: &Path, max_bytes: u64) -> Result<Option<StoreSnapshot>, StateError> {
    let file = match File::open(path) {
        Ok(f) => f,
        Err(e) if e.kind() == io::ErrorKind::NotFound => return Ok(None),
        Err(e) => return Err(StateError::Io(e)),
    };
    let len = file.metadata().map_err(StateError::Io)?.len();
    if len > max_bytes {
        return Err(StateError::TooLarge(max_bytes));
    }
    let mut bytes = Vec::with_capacity(len as usize);
    // `take`: the file may grow between the size check and the read.
    file.take(max_bytes.saturating_add(1))
        .read_to_end(&mut bytes)
        .map_err(StateError::Io)?;
    if bytes.len() as u64 > max_bytes {
        return Err(StateError::TooLarge(max_bytes));
    }
    decode(&bytes).map(Some)
}

/// Reads the state file; one that cannot be used is logged at WARN and renamed aside
/// (`<path>.corrupt-<unix seconds>`) so that it is neither lost nor read again.
pub fn load_or_set_aside(path: &Path, max_bytes: u64) -> Option<StoreSnapshot> {
    match read(path, max_bytes) {
        Ok(snapshot) => snapshot,
        Err(e) => {
            let secs = unix_nanos_now() / 1_000_000_000;
            let aside = PathBuf::from(format!("{}.corrupt-{secs}", path.display()));
            match fs::rename(path, &aside) {
                Ok(()) => tracing::warn!(
                    "state file {} not used: {e}; moved to {}, starting with no open flows",
                    path.display(),
                    aside.display()
                ),
                Err(re) => tracing::warn!(
                    "state file {} not used: {e}; cannot move it aside ({re}), starting with \
                     no open flows",
                    path.display()
                ),
            }
            None
        }
    }
}

/// Writes the state file atomically: temporary file in the same directory, fsync,
/// rename, fsync of the directory. Returns the bytes written.
pub fn write(path: &Path, snapshot: &StoreSnapshot) -> io::Result<u64> {
    let dir = match path.parent() {
        Some(d) if !d.as_os_str().is_empty() => d.to_path_buf(),
        _ => PathBuf::from("."),
    };
    fs::create_dir_all(&dir)?;
    let tmp = PathBuf::from(format!("{}.tmp", path.display()));
    let result = (|| {
        let file = File::create(&tmp)?;
        let mut out = BufWriter::with_capacity(1 << 20, file);
        let n = encode(snapshot, &mut out)?;
        let file = out.into_inner().map_err(|e| e.into_error())?;
        file.sync_all()?;
        fs::rename(&tmp, path)?;
        // The rename itself must survive a power loss.
        File::open(&dir)?.sync_all()?;
        Ok(n)
    })();
    if result.is_err() {
        let _ = fs::remove_file(&tmp);
    }
    result
}

/// The start and end dimension labels of a run, in order.
pub type DimLabels = (Vec<String>, Vec<String>);

/// Takes a snapshot of `store` and writes it to the state file. `labels`: the start and
/// end dimension labels of this run. `Ok(None)`: the store has nothing to save.
pub fn save(
    store: &dyn CorrelationStore,
    path: &Path,
    labels: &DimLabels,
) -> io::Result<Option<Saved>> {
    write_snapshot(store.snapshot(), path, labels)
}

/// The last write, at shutdown, once nothing is applied any more
/// ([`CorrelationStore::final_snapshot`]).
pub fn save_final(
    store: &dyn CorrelationStore,
    path: &Path,
    labels: &DimLabels,
) -> io::Result<Option<Saved>> {
    write_snapshot(store.final_snapshot(), path, labels)
}

fn write_snapshot(
    snapshot: Option<StoreSnapshot>,
    path: &Path,
    labels: &DimLabels,
) -> io::Result<Option<Saved>> {
    let began = Instant::now();
    let Some(mut snapshot) = snapshot else {
        return Ok(None);
    };
    snapshot.start_dim_labels.clone_from(&labels.0);
    snapshot.end_dim_labels.clone_from(&labels.1);
    let bytes = write(path, &snapshot)?;
    Ok(Some(Saved {
        entries: snapshot.entries.len(),
        bytes,
        took: began.elapsed(),
    }))
}

/// What one write of the state file did.
#[derive(Debug, Clone, Copy)]
pub struct Saved {
    pub entries: usize,
    pub bytes: u64,
    pub took: Duration,
}

/// Writes the state file every `checkpoint_interval` on a thread of its own (the
/// snapshot and the write are blocking work), until dropped; a write under way when it
/// is dropped finishes first, so the final write at shutdown never races it.
pub struct Checkpointer {
    stop: Arc<AtomicBool>,
    handle: Option<std::thread::JoinHandle<()>>,
}

impl Checkpointer {
    pub fn start(
        store: Arc<dyn CorrelationStore>,
        settings: StateSettings,
        labels: DimLabels,
    ) -> io::Result<Self> {
        let stop = Arc::new(AtomicBool::new(false));
        let thread_stop = stop.clone();
        let handle = std::thread::Builder::new()
            .name("state-checkpoint".into())
            .spawn(move || loop {
                let next = Instant::now() + settings.checkpoint_interval;
                // park_timeout may wake early: sleep until the interval is really over.
                while !thread_stop.load(Ordering::Acquire) && Instant::now() < next {
                    std::thread::park_timeout(next.saturating_duration_since(Instant::now()));
                }
                if thread_stop.load(Ordering::Acquire) {
                    return;
                }
                match save(&*store, &settings.path, &labels) {
                    Ok(Some(s)) => tracing::debug!(
                        entries = s.entries,
                        bytes = s.bytes,
                        "checkpoint: state written to {} in {:?}",
                        settings.path.display(),
                        s.took
                    ),
                    Ok(None) => return,
                    Err(e) => tracing::warn!(
                        "checkpoint: cannot write the state file {}: {e}",
                        settings.path.display()
                    ),
                }
            })?;
        Ok(Self {
            stop,
            handle: Some(handle),
        })
    }
}

impl Drop for Checkpointer {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::Release);
        if let Some(h) = self.handle.take() {
            h.thread().unpark();
            let _ = h.join();
        }
    }
}

/// Passes bytes through while computing their CRC-32 (the body's checksum).
struct CrcWriter<W> {
    inner: W,
    crc: crc32fast::Hasher,
    written: u64,
}

impl<W: Write> Write for CrcWriter<W> {
    fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
        let n = self.inner.write(buf)?;
        self.crc.update(&buf[..n]);
        self.written += n as u64;
        Ok(n)
    }

    fn flush(&mut self) -> io::Result<()> {
        self.inner.flush()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn sample() -> StoreSnapshot {
        StoreSnapshot {
            saved_at_unix_nanos: 1_700_000_000_000_000_000,
            key_seed: 42,
            start_dim_labels: vec!["service".into()],
            end_dim_labels: vec![],
            strings: vec![Arc::from("checkout"), Arc::from("web")],
            entries: vec![
                SavedEntry {
                    key: [7; 16],
                    flow: 0,
                    deadline_unix_nanos: 1_700_000_300_000_000_000,
                    state: SavedState::Open {
                        start_nanos: 5,
                        dims: vec![1],
                    },
                },
                SavedEntry {
                    key: [9; 16],
                    flow: 0,
                    deadline_unix_nanos: 1_700_000_300_000_000_000,
                    state: SavedState::Waiting {
                        outcome: 1,
                        timestamp_nanos: 6,
                        dims: vec![],
                        trace: Some(([1; 16], [2; 8])),
                    },
                },
            ],
            shards: vec![SavedShard {
                current_tag: 2,
                rotated_at_unix_nanos: 1_700_000_000_000_000_000,
                fingerprints: vec![0xabc1, 0xdef2],
            }],
        }
    }

    fn bytes() -> Vec<u8> {
        let mut out = Vec::new();
        encode(&sample(), &mut out).unwrap();
        out
    }

    #[test]
    fn round_trip() {
        let b = bytes();
        assert_eq!(decode(&b).unwrap(), sample());
        let dir = std::env::temp_dir().join(format!("fm-state-unit-{}", std::process::id()));
        let path = dir.join("state");
        let n = write(&path, &sample()).unwrap();
        assert_eq!(n, b.len() as u64);
        assert_eq!(read(&path, 1 << 20).unwrap(), Some(sample()));
        assert!(!PathBuf::from(format!("{}.tmp", path.display())).exists());
        let _ = fs::remove_dir_all(dir);
    }

    #[test]
    fn any_flipped_byte_is_refused() {
        let b = bytes();
        for i in 0..b.len() {
            let mut bad = b.clone();
            bad[i] ^= 0x40;
            assert!(decode(&bad).is_err(), "byte {i} flipped went unnoticed");
        }
    }

    #[test]
    fn every_truncation_is_refused() {
        let b = bytes();
        for len in 0..b.len() {
            assert!(decode(&b[..len]).is_err(), "cut at {len} went unnoticed");
        }
        assert!(matches!(decode(&b[..10]), Err(StateError::Truncated)));
    }

    #[test]
    fn another_version_or_a_foreign_file_is_refused() {
        let mut b = bytes();
        b[MAGIC.len()..HEADER].copy_from_slice(&(VERSION + 1).to_le_bytes());
        assert!(matches!(decode(&b), Err(StateError::Version(v)) if v == VERSION + 1));
        assert!(matches!(
            decode(b"{\"json\": true, \"padding\": 1234}"),
            Err(StateError::Foreign)
        ));
    }

    #[test]
    fn inconsistent_content_is_refused_whole() {
        let mut s = sample();
        s.entries[1].flow = 9;
        let mut out = Vec::new();
        encode(&s, &mut out).unwrap();
        assert!(matches!(decode(&out), Err(StateError::Invalid(_))));
    }

    #[test]
    fn a_missing_file_is_a_fresh_start_and_a_bad_one_is_set_aside() {
        let dir = std::env::temp_dir().join(format!("fm-state-aside-{}", std::process::id()));
        fs::create_dir_all(&dir).unwrap();
        let path = dir.join("state");
        assert!(load_or_set_aside(&path, 1 << 20).is_none());
        fs::write(&path, &bytes()[..20]).unwrap();
        assert!(load_or_set_aside(&path, 1 << 20).is_none());
        assert!(!path.exists());
        let aside: Vec<_> = fs::read_dir(&dir)
            .unwrap()
            .map(|e| e.unwrap().file_name().into_string().unwrap())
            .collect();
        assert!(
            aside.iter().any(|n| n.starts_with("state.corrupt-")),
            "{aside:?}"
        );
        // Larger than allowed: not even read.
        fs::write(&path, bytes()).unwrap();
        assert!(matches!(read(&path, 10), Err(StateError::TooLarge(10))));
        let _ = fs::remove_dir_all(dir);
    }
}
