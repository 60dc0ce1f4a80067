//! What a store keeps across a restart ([`StoreSnapshot`]): the shape the state file
//! holds (src/flows/state.rs writes and reads it), produced and consumed by the store.
//! Strings are kept once and referred to by index; times are wall-clock unix
//! nanoseconds, so they mean the same after a restart.

use std::sync::Arc;
use std::time::{SystemTime, UNIX_EPOCH};

use serde::{Deserialize, Serialize};

use super::super::event::Outcome;
use crate::model::{is_valid_flow_name, is_valid_step_name};

/// Everything a store needs to carry on after a restart.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct StoreSnapshot {
    /// When the snapshot was taken.
    pub saved_at_unix_nanos: u64,
    /// Seed of the hashers that turn (flow, correlation id) into a key: the file holds
    /// keys, not ids, so the new process must hash new events the same way.
    pub key_seed: u64,
    /// Dimension labels of the run that wrote the file: values are matched to the new
    /// run's labels by name.
    pub start_dim_labels: Vec<String>,
    /// The same for end dimensions.
    pub end_dim_labels: Vec<String>,
    /// Flow names and dimension values, each once; entries refer to them by index.
    pub strings: Vec<Arc<str>>,
    /// Open instances and waiting ends (and steps).
    pub entries: Vec<SavedEntry>,
    /// Retry fingerprints, one item per store shard.
    pub shards: Vec<SavedShard>,
}

/// The retry fingerprints of one shard of the store.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct SavedShard {
    /// Generation tag (1 or 2) of the newer fingerprints.
    pub current_tag: u8,
    /// When the shard last rotated its generations.
    pub rotated_at_unix_nanos: u64,
    /// Fingerprints with their generation tag in the low two bits.
    pub fingerprints: Vec<u64>,
}

/// One entry of the store: an open instance, or what waits for its start.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct SavedEntry {
    /// The entry's key: the hash of (flow, correlation id).
    pub key: [u8; 16],
    /// Index into [`StoreSnapshot::strings`].
    pub flow: u32,
    /// When the entry times out.
    pub deadline_unix_nanos: u64,
    /// What the entry holds.
    pub state: SavedState,
}

/// What an entry holds.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub enum SavedState {
    /// An open instance without steps.
    Open {
        /// Unix nanoseconds of its start event.
        start_nanos: u64,
        /// Its start dimension values, as indexes into [`StoreSnapshot::strings`].
        dims: Vec<u32>,
    },
    /// An end waiting for its start (the file holds its fields as a struct variant's:
    /// the same bytes).
    Waiting(SavedEnd),
    /// An open instance with the steps it reached (version 2).
    Stepped {
        /// Unix nanoseconds of its start event.
        start_nanos: u64,
        /// Its start dimension values, as indexes into [`StoreSnapshot::strings`].
        dims: Vec<u32>,
        /// The steps it reached.
        steps: Vec<SavedStep>,
    },
    /// Steps waiting for their start, with or without a waiting end (version 2).
    Pending {
        /// The end waiting beside the steps, if any.
        end: Option<SavedEnd>,
        /// The steps waiting for the start.
        steps: Vec<SavedStep>,
    },
}

/// A step of an entry (version 2).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct SavedStep {
    /// Index into [`StoreSnapshot::strings`].
    pub step: u32,
    /// Unix nanoseconds of the step event.
    pub timestamp_nanos: u64,
    /// Kept for waiting steps only (the exemplar when their start comes).
    pub trace: Option<([u8; 16], [u8; 8])>,
}

/// A waiting end, alone or beside waiting steps (version 2).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct SavedEnd {
    /// [`Outcome::code`].
    pub outcome: u8,
    /// Unix nanoseconds of the end event.
    pub timestamp_nanos: u64,
    /// Its end dimension values, as indexes into [`StoreSnapshot::strings`].
    pub dims: Vec<u32>,
    /// The end event's trace and span ids, for the exemplar.
    pub trace: Option<([u8; 16], [u8; 8])>,
}

/// Why a snapshot read back cannot be applied: a reference or a value out of range.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
#[error("{0}")]
pub struct Inconsistent(pub &'static str);

impl StoreSnapshot {
    /// Checks every reference before anything is applied (never half-applied).
    pub fn validate(&self) -> Result<(), Inconsistent> {
        let n = self.strings.len();
        let in_range = |i: &u32| (*i as usize) < n;
        for e in &self.entries {
            if !in_range(&e.flow) {
                return Err(Inconsistent("flow index out of range"));
            }
            if !is_valid_flow_name(&self.strings[e.flow as usize]) {
                return Err(Inconsistent("invalid flow name"));
            }
            let (outcome, dims, steps): (Option<u8>, &[u32], &[SavedStep]) = match &e.state {
                SavedState::Open { dims, .. } => (None, dims, &[]),
                SavedState::Waiting(end) => (Some(end.outcome), &end.dims, &[]),
                SavedState::Stepped { dims, steps, .. } => (None, dims, steps),
                SavedState::Pending { end, steps } => match end {
                    Some(end) => (Some(end.outcome), &end.dims, steps),
                    None => (None, &[], steps),
                },
            };
            if outcome.is_some_and(|o| Outcome::from_code(o).is_none()) {
                return Err(Inconsistent("unknown outcome"));
            }
            if !dims.iter().all(in_range) {
                return Err(Inconsistent("dimension index out of range"));
            }
            for step in steps {
                if !in_range(&step.step) || !is_valid_step_name(&self.strings[step.step as usize]) {
                    return Err(Inconsistent("invalid step"));
                }
            }
        }
        if self.shards.iter().any(|s| !matches!(s.current_tag, 1 | 2)) {
            return Err(Inconsistent("unknown fingerprint generation"));
        }
        // Restoring a key twice would count its instance twice.
        let mut keys: Vec<[u8; 16]> = self.entries.iter().map(|e| e.key).collect();
        keys.sort_unstable();
        if keys.windows(2).any(|w| w[0] == w[1]) {
            return Err(Inconsistent("an entry appears twice"));
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
