//! The state file: what the correlation store holds (open instances, waiting ends, retry
//! fingerprints), written at shutdown and at every checkpoint, read back at start
//! (docs/behaviour.md §3 "restarts").
//!
//! Layout: an 8-byte magic, a little-endian `u32` format version, the body
//! ([`StoreSnapshot`] in postcard), the body's length (little-endian `u64`) and a
//! little-endian CRC-32 of the body (version 1 had no length). A file is read only if it
//! is a regular file; its magic, version and declared length are checked against the
//! file's size, then the checksum over a streamed read, before anything is allocated for
//! it: a FIFO, a device or a large file of garbage costs nothing. Times are
//! wall-clock unix nanoseconds, so they mean the same after a restart (the store's own
//! clock is monotonic and starts anew with each process). Writes go to a temporary file
//! in the same directory, which is fsynced and renamed over the old one: a crash leaves
//! the old file or the new one, never a mix.

use std::fs::{self, File};
use std::io::{self, BufWriter, IntoInnerError, Read, Seek, SeekFrom, Write};
use std::os::unix::fs::OpenOptionsExt as _;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use super::store::snapshot::{unix_nanos_now, Inconsistent, StoreSnapshot};
use super::store::CorrelationStore;
use crate::logging::RateLimited;

/// The first bytes of every state file.
pub const MAGIC: [u8; 8] = *b"FLOWMST\x01";
/// Bumped whenever [`StoreSnapshot`] or the layout changes; another version is set
/// aside. 2: the trailer declares the body's length. 3: steps (`SavedState::Stepped`,
/// `SavedState::Pending`), appended so that older bodies decode as they are. Versions 1
/// (no declared length) and 2 are still read.
pub const VERSION: u32 = 3;
const LENGTH_VERSION: u32 = 2;
const LEGACY_VERSION: u32 = 1;
const HEADER: usize = MAGIC.len() + 4;
/// Body length and CRC-32.
const TRAILER: usize = 8 + 4;
const LEGACY_TRAILER: usize = 4;

/// Where the state lives and how often it is checkpointed (`state.*`).
#[derive(Debug, Clone)]
pub struct StateSettings {
    /// `state.path`: the state file.
    pub path: PathBuf,
    /// `state.checkpoint_interval`: how often it is rewritten while running.
    pub checkpoint_interval: Duration,
    /// A larger file is not read (it is input too).
    pub max_file_bytes: u64,
}

/// Why a state file was not used.
#[derive(Debug, thiserror::Error)]
pub enum StateError {
    /// The file cannot be read.
    #[error("cannot read it: {0}")]
    Io(io::Error),
    /// The file is larger than the limit (its size given).
    #[error("it is larger than the limit ({0} bytes)")]
    TooLarge(u64),
    /// The file ends before its header or trailer.
    #[error("it is truncated")]
    Truncated,
    /// The file does not start with [`MAGIC`].
    #[error("it is not a flowmetrics state file")]
    Foreign,
    /// The file has a format version this build does not read.
    #[error("it has format version {0}, this build reads {VERSION}")]
    Version(u32),
    /// The body's CRC-32 does not match the trailer.
    #[error("its checksum does not match (corrupt)")]
    Checksum,
    /// The body does not decode as a snapshot.
    #[error("it does not decode: {0}")]
    Decode(postcard::Error),
    /// The snapshot refers to strings or values that are not there.
    #[error("it is inconsistent: {0}")]
    Invalid(&'static str),
    /// A FIFO, device, socket or directory.
    #[error("it is not a regular file (a FIFO, device, socket or directory)")]
    NotRegular,
    /// The declared body length does not match the file's size.
    #[error("its declared length does not match its size")]
    Length,
}

impl From<Inconsistent> for StateError {
    fn from(Inconsistent(why): Inconsistent) -> Self {
        StateError::Invalid(why)
    }
}

/// Encodes a snapshot into the file format.
pub fn encode(snapshot: &StoreSnapshot, out: impl Write) -> io::Result<u64> {
    let mut out = CrcWriter {
        inner: out,
        crc: crc32fast::Hasher::new(),
        written: 0,
        error: None,
    };
    out.inner.write_all(&MAGIC)?;
    out.inner.write_all(&VERSION.to_le_bytes())?;
    if let Err(e) = postcard::to_io(snapshot, &mut out) {
        // postcard reports any write error as "the serialize buffer is full": the
        // writer kept the real one (ENOSPC, EFBIG, EIO).
        return Err(out.error.take().unwrap_or_else(|| io::Error::other(e)));
    }
    let crc = std::mem::take(&mut out.crc).finalize();
    out.inner.write_all(&out.written.to_le_bytes())?;
    out.inner.write_all(&crc.to_le_bytes())?;
    out.inner.flush()?;
    Ok((HEADER + TRAILER) as u64 + out.written)
}

/// Where the body is, after the header and trailer checks: `(body length, crc)`.
fn check_frame(header: &[u8], len: u64, trailer: &[u8]) -> Result<(u64, u32), StateError> {
    if header.len() < MAGIC.len() {
        return Err(if MAGIC.starts_with(header) {
            StateError::Truncated
        } else {
            StateError::Foreign
        });
    }
    if header[..MAGIC.len()] != MAGIC {
        return Err(StateError::Foreign);
    }
    if header.len() < HEADER {
        return Err(StateError::Truncated);
    }
    let version = u32::from_le_bytes(header[MAGIC.len()..HEADER].try_into().expect("4 bytes"));
    let crc_at = trailer.len().saturating_sub(4);
    let crc = |t: &[u8]| u32::from_le_bytes(t[crc_at..].try_into().expect("4 bytes"));
    match version {
        VERSION | LENGTH_VERSION => {
            if len < (HEADER + TRAILER) as u64 || trailer.len() < TRAILER {
                return Err(StateError::Truncated);
            }
            let declared = u64::from_le_bytes(trailer[..8].try_into().expect("8 bytes"));
            if declared != len - (HEADER + TRAILER) as u64 {
                return Err(StateError::Length);
            }
            Ok((declared, crc(trailer)))
        }
        LEGACY_VERSION => {
            if len < (HEADER + LEGACY_TRAILER) as u64 || trailer.len() < LEGACY_TRAILER {
                return Err(StateError::Truncated);
            }
            Ok((len - (HEADER + LEGACY_TRAILER) as u64, crc(trailer)))
        }
        other => Err(StateError::Version(other)),
    }
}

/// The body of a checked frame: postcard, then every reference checked.
fn decode_body(body: &[u8]) -> Result<StoreSnapshot, StateError> {
    let (snapshot, rest) =
        postcard::take_from_bytes::<StoreSnapshot>(body).map_err(StateError::Decode)?;
    if !rest.is_empty() {
        return Err(StateError::Invalid("bytes after the body"));
    }
    snapshot.validate()?;
    Ok(snapshot)
}

/// Decodes the file format, checking magic, version, length and checksum first.
pub fn decode(bytes: &[u8]) -> Result<StoreSnapshot, StateError> {
    let header = &bytes[..bytes.len().min(HEADER)];
    let trailer = &bytes[bytes.len().saturating_sub(TRAILER).max(header.len())..];
    let legacy = &bytes[bytes.len().saturating_sub(LEGACY_TRAILER).max(header.len())..];
    let is_legacy = header.len() == HEADER && header[MAGIC.len()..] == LEGACY_VERSION.to_le_bytes();
    let (body_len, crc) = check_frame(
        header,
        bytes.len() as u64,
        if is_legacy { legacy } else { trailer },
    )?;
    let body = &bytes[HEADER..HEADER + body_len as usize];
    if crc32fast::hash(body) != crc {
        // A cut-off file fails here too; it cannot be told from a damaged one.
        return Err(StateError::Checksum);
    }
    decode_body(body)
}

/// Reads the state file. `Ok(None)`: there is none (a fresh start).
pub fn read(path: &Path, max_bytes: u64) -> Result<Option<StoreSnapshot>, StateError> {
    // Non-blocking: opening a FIFO must not wait for a writer.
    let mut file = match fs::OpenOptions::new()
        .read(true)
        .custom_flags(libc::O_NONBLOCK)
        .open(path)
    {
        Ok(f) => f,
        Err(e) if e.kind() == io::ErrorKind::NotFound => return Ok(None),
        Err(e) => return Err(StateError::Io(e)),
    };
    let meta = file.metadata().map_err(StateError::Io)?;
    if !meta.is_file() {
        return Err(StateError::NotRegular);
    }
    let len = meta.len();
    if len > max_bytes {
        return Err(StateError::TooLarge(max_bytes));
    }
    let io = StateError::Io;
    let mut header = vec![0; HEADER.min(len as usize)];
    file.read_exact(&mut header).map_err(io)?;
    let trailer_len = if header.ends_with(&LEGACY_VERSION.to_le_bytes()) && header.len() == HEADER {
        LEGACY_TRAILER
    } else {
        TRAILER
    };
    let mut trailer = vec![0; trailer_len.min(len.saturating_sub(header.len() as u64) as usize)];
    file.seek(SeekFrom::End(-(trailer.len() as i64)))
        .map_err(io)?;
    file.read_exact(&mut trailer).map_err(io)?;
    let (body_len, crc) = check_frame(&header, len, &trailer)?;
    // The checksum over a streamed read first: garbage of a plausible size is refused
    // without a byte allocated for it.
    file.seek(SeekFrom::Start(HEADER as u64)).map_err(io)?;
    let mut hasher = crc32fast::Hasher::new();
    let mut chunk = vec![0; 64 * 1024];
    let mut body_file = (&mut file).take(body_len);
    loop {
        let n = body_file.read(&mut chunk).map_err(io)?;
        if n == 0 {
            break;
        }
        hasher.update(&chunk[..n]);
    }
    if hasher.finalize() != crc {
        return Err(StateError::Checksum);
    }
    file.seek(SeekFrom::Start(HEADER as u64)).map_err(io)?;
    let mut body = Vec::new();
    file.take(body_len).read_to_end(&mut body).map_err(io)?;
    if body.len() as u64 != body_len || crc32fast::hash(&body) != crc {
        // Changed while being read.
        return Err(StateError::Checksum);
    }
    decode_body(&body).map(Some)
}

/// Reads the state file; one that cannot be used is logged at WARN and renamed aside
/// (`<path>.corrupt-<unix seconds>`) so that it is neither lost nor read again.
///
/// It is read under another name, `<path>.loading`, and put back once read: a start
/// that dies reading it (out of memory under a container's limit, say) leaves it there,
/// and the next start sets it aside instead of dying the same way (no crash loop).
pub fn load_or_set_aside(path: &Path, max_bytes: u64) -> Option<StoreSnapshot> {
    let loading = PathBuf::from(format!("{}.loading", path.display()));
    if fs::symlink_metadata(&loading).is_ok() {
        set_aside(&loading, path, "the last start ended while reading it");
    }
    let reading = match fs::rename(path, &loading) {
        Ok(()) => loading.as_path(),
        Err(e) if e.kind() == io::ErrorKind::NotFound => return None,
        // A directory it cannot be renamed in: read in place.
        Err(_) => path,
    };
    match read(reading, max_bytes) {
        Ok(snapshot) => {
            if reading != path {
                if let Err(e) = fs::rename(reading, path) {
                    tracing::warn!(
                        "state file {}: cannot rename it back from {} ({e}); the next \
                         checkpoint writes it anew",
                        path.display(),
                        reading.display()
                    );
                }
            }
            snapshot
        }
        Err(e) => {
            set_aside(reading, path, &e.to_string());
            None
        }
    }
}

/// Renames `file` to `<path>.corrupt-<unix seconds>`, logging why it is not used.
fn set_aside(file: &Path, path: &Path, why: &str) {
    let secs = unix_nanos_now() / 1_000_000_000;
    let aside = PathBuf::from(format!("{}.corrupt-{secs}", path.display()));
    match fs::rename(file, &aside) {
        Ok(()) => tracing::warn!(
            "state file {} not used: {why}; moved to {}, starting with no open flows",
            path.display(),
            aside.display()
        ),
        Err(re) => tracing::warn!(
            "state file {} not used: {why}; cannot move it aside ({re}), starting with \
             no open flows",
            path.display()
        ),
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
        let file = out.into_inner().map_err(IntoInnerError::into_error)?;
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
    /// Entries written.
    pub entries: usize,
    /// Size of the file, bytes.
    pub bytes: u64,
    /// How long writing it took.
    pub took: Duration,
}

impl Saved {
    /// Logs the write: the final one at INFO, a checkpoint at DEBUG.
    pub fn log(&self, path: &Path, final_write: bool) {
        let Saved {
            entries,
            bytes,
            took,
        } = *self;
        let path = path.display();
        if final_write {
            tracing::info!(entries, bytes, "state written to {path} in {took:?}");
        } else {
            tracing::debug!(
                entries,
                bytes,
                "checkpoint: state written to {path} in {took:?}"
            );
        }
    }
}

/// Moves the file of the last checkpoint out of the way after the final write failed:
/// it predates this run's last changes (instances completed since would be restored and
/// counted a second time), so the next run must not take it as current. Kept beside as
/// `<path>.stale-<unix seconds>`; removed if it cannot be renamed.
pub fn set_aside_stale(path: &Path) {
    if fs::symlink_metadata(path).is_err() {
        return;
    }
    let secs = unix_nanos_now() / 1_000_000_000;
    let aside = PathBuf::from(format!("{}.stale-{secs}", path.display()));
    match fs::rename(path, &aside) {
        Ok(()) => tracing::warn!(
            "the last checkpoint {} is older than this run's state: moved to {} so that \
             the next run does not restore it",
            path.display(),
            aside.display()
        ),
        Err(re) => match fs::remove_file(path) {
            Ok(()) => tracing::warn!(
                "the last checkpoint {} is older than this run's state and cannot be moved \
                 aside ({re}): removed",
                path.display()
            ),
            Err(e) => tracing::error!(
                "the last checkpoint {} is older than this run's state and can be neither \
                 moved aside ({re}) nor removed ({e}): the next run will restore it and may \
                 count instances completed since a second time",
                path.display()
            ),
        },
    }
}

/// Writes the state file every `checkpoint_interval` on a thread of its own (the
/// snapshot and the write are blocking work), until dropped; a write under way when it
/// is dropped finishes first, so the final write at shutdown never races it.
pub struct Checkpointer {
    shared: Arc<CheckpointFlags>,
    handle: Option<std::thread::JoinHandle<()>>,
}

#[derive(Default)]
struct CheckpointFlags {
    stop: AtomicBool,
    /// Write now, not at the end of the interval (SIGUSR1).
    now: AtomicBool,
}

impl Checkpointer {
    /// `on_failure` is called for each write that fails (a counter).
    pub fn start(
        store: Arc<dyn CorrelationStore>,
        settings: StateSettings,
        labels: DimLabels,
        on_failure: impl Fn() + Send + 'static,
    ) -> io::Result<Self> {
        let shared = Arc::new(CheckpointFlags::default());
        let flags = shared.clone();
        let warning = RateLimited::new(Duration::from_secs(60));
        let handle = std::thread::Builder::new()
            .name("state-checkpoint".into())
            .spawn(move || loop {
                let next = Instant::now() + settings.checkpoint_interval;
                // park_timeout may wake early: sleep until the interval is really over.
                while !flags.stop.load(Ordering::Acquire)
                    && !flags.now.swap(false, Ordering::AcqRel)
                    && Instant::now() < next
                {
                    std::thread::park_timeout(next.saturating_duration_since(Instant::now()));
                }
                if flags.stop.load(Ordering::Acquire) {
                    return;
                }
                match save(&*store, &settings.path, &labels) {
                    Ok(Some(saved)) => saved.log(&settings.path, false),
                    Ok(None) => return,
                    Err(e) => {
                        on_failure();
                        warning.warn(format_args!(
                            "checkpoint: cannot write the state file {}: {e}",
                            settings.path.display()
                        ));
                    }
                }
            })?;
        Ok(Self {
            shared,
            handle: Some(handle),
        })
    }

    /// Writes a checkpoint now (on the checkpoint thread).
    pub fn checkpoint_now(&self) {
        self.shared.now.store(true, Ordering::Release);
        if let Some(h) = &self.handle {
            h.thread().unpark();
        }
    }
}

impl Drop for Checkpointer {
    fn drop(&mut self) {
        self.shared.stop.store(true, Ordering::Release);
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
    /// The first write error, which postcard does not pass on.
    error: Option<io::Error>,
}

impl<W: Write> Write for CrcWriter<W> {
    fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
        let n = match self.inner.write(buf) {
            Ok(n) => n,
            Err(e) => {
                let kind = e.kind();
                self.error.get_or_insert(e);
                return Err(kind.into());
            }
        };
        self.crc.update(&buf[..n]);
        self.written += n as u64;
        Ok(n)
    }

    fn flush(&mut self) -> io::Result<()> {
        // postcard flushes at its end, and hides this error too.
        self.inner.flush().map_err(|e| {
            let kind = e.kind();
            self.error.get_or_insert(e);
            kind.into()
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::flows::store::snapshot::{SavedEnd, SavedEntry, SavedShard, SavedState};

    /// A new directory for one test, and the state file's path in it.
    fn fresh_dir(test: &str) -> (PathBuf, PathBuf) {
        let dir = std::env::temp_dir().join(format!("fm-state-{test}-{}", std::process::id()));
        fs::create_dir_all(&dir).unwrap();
        let path = dir.join("state");
        (dir, path)
    }

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
                    state: SavedState::Waiting(SavedEnd {
                        outcome: 1,
                        timestamp_nanos: 6,
                        dims: vec![],
                        trace: Some(([1; 16], [2; 8])),
                    }),
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
    fn an_entry_appearing_twice_is_refused_whole() {
        let mut s = sample();
        s.entries[1].key = s.entries[0].key;
        let mut out = Vec::new();
        encode(&s, &mut out).unwrap();
        assert!(
            matches!(decode(&out), Err(StateError::Invalid(why)) if why.contains("twice")),
            "{:?}",
            decode(&out)
        );
        // From a file: set aside, nothing restored.
        let (dir, path) = fresh_dir("dup");
        fs::write(&path, &out).unwrap();
        assert!(load_or_set_aside(&path, 1 << 20).is_none());
        assert!(!path.exists());
        let _ = fs::remove_dir_all(dir);
    }

    #[test]
    fn a_file_whose_reading_ended_the_last_start_is_set_aside_not_read_again() {
        let dir = std::env::temp_dir().join(format!("fm-state-loading-{}", std::process::id()));
        let _ = fs::remove_dir_all(&dir);
        fs::create_dir_all(&dir).unwrap();
        let path = dir.join("state");
        // What a start killed while reading leaves: the file under its reading name.
        write(&dir.join("state.loading"), &sample()).unwrap();
        assert!(load_or_set_aside(&path, 1 << 20).is_none());
        assert!(!dir.join("state.loading").exists());
        let names: Vec<_> = fs::read_dir(&dir)
            .unwrap()
            .map(|e| e.unwrap().file_name().into_string().unwrap())
            .collect();
        assert!(
            names.iter().any(|n| n.starts_with("state.corrupt-")),
            "{names:?}"
        );
        // A file read whole is back under its name.
        write(&path, &sample()).unwrap();
        assert_eq!(load_or_set_aside(&path, 1 << 20), Some(sample()));
        assert_eq!(read(&path, 1 << 20).unwrap(), Some(sample()));
        assert!(!dir.join("state.loading").exists());
        let _ = fs::remove_dir_all(dir);
    }

    #[test]
    fn a_declared_length_that_is_not_the_size_is_refused() {
        let mut b = bytes();
        let at = b.len() - TRAILER;
        let declared = u64::from_le_bytes(b[at..at + 8].try_into().unwrap());
        b[at..at + 8].copy_from_slice(&(declared + 1).to_le_bytes());
        assert!(matches!(decode(&b), Err(StateError::Length)));
        let (dir, path) = fresh_dir("len");
        fs::write(&path, &b).unwrap();
        assert!(matches!(read(&path, 1 << 20), Err(StateError::Length)));
        let _ = fs::remove_dir_all(dir);
    }

    #[test]
    fn a_version_1_file_is_still_read() {
        // Version 1: magic, version, body, CRC (no declared length).
        let mut body = Vec::new();
        postcard::to_io(&sample(), &mut body).unwrap();
        let mut v1 = MAGIC.to_vec();
        v1.extend_from_slice(&1u32.to_le_bytes());
        v1.extend_from_slice(&body);
        v1.extend_from_slice(&crc32fast::hash(&body).to_le_bytes());
        assert_eq!(decode(&v1).unwrap(), sample());
        let (dir, path) = fresh_dir("v1");
        fs::write(&path, &v1).unwrap();
        assert_eq!(read(&path, 1 << 20).unwrap(), Some(sample()));
        let _ = fs::remove_dir_all(dir);
    }

    #[test]
    fn a_full_disk_is_reported_as_such() {
        // The temporary file is /dev/full: every write fails with ENOSPC. Large enough
        // that postcard itself meets the error (past the 1 MiB write buffer).
        let (dir, path) = fresh_dir("full");
        std::os::unix::fs::symlink("/dev/full", dir.join("state.tmp")).unwrap();
        let mut big = sample();
        big.entries = (0..100_000u32)
            .map(|i| {
                let mut e = sample().entries[0].clone();
                e.key[..4].copy_from_slice(&i.to_le_bytes());
                e
            })
            .collect();
        let err = write(&path, &big).unwrap_err();
        assert_eq!(err.raw_os_error(), Some(libc::ENOSPC), "{err}");
        assert!(!err.to_string().contains("serialize buffer"), "{err}");
        // Small enough to stay in the buffer: the flush reports it.
        std::os::unix::fs::symlink("/dev/full", dir.join("state.tmp")).unwrap();
        let err = write(&path, &sample()).unwrap_err();
        assert_eq!(err.raw_os_error(), Some(libc::ENOSPC), "{err}");
        let _ = fs::remove_dir_all(dir);
    }

    #[test]
    fn a_missing_file_is_a_fresh_start_and_a_bad_one_is_set_aside() {
        let (dir, path) = fresh_dir("aside");
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
