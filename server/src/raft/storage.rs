//! What the core reads of the durable log: the [`Storage`] trait, and [`MemStorage`], an
//! in-memory implementation for tests and the simulation. The core only reads storage; the
//! driver writes it (persisting each Ready) before calling `advance`. A redb-backed
//! implementation belongs in `storage/`, not here.

use super::membership::Configuration;
use super::message::{entry_size, HardState, SnapshotMeta};
use super::{Entry, EntryKind};

/// Why storage could not answer.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum StorageError {
    /// The requested index is below the first retained entry (covered by the snapshot).
    #[error("index compacted")]
    Compacted,
    /// The requested index is above the last stored entry.
    #[error("index unavailable")]
    Unavailable,
    /// The requested snapshot is no longer (or not yet) available; retry with the current one.
    #[error("snapshot temporarily unavailable")]
    SnapshotUnavailable,
    /// Anything else (IO); the core treats it like `Unavailable` and retries later.
    #[error("storage: {0}")]
    Other(String),
}

/// Durable state read by the core. Indexes: entries span `first_index()..=last_index()`;
/// `first_index() - 1` is the snapshot index, whose term `term()` must still answer.
pub trait Storage {
    /// Hard state as of the last persisted Ready, and the configuration as of
    /// [`Storage::conf_index`] (startup).
    fn initial_state(&self) -> Result<(HardState, Configuration), StorageError>;
    /// The index the configuration of [`Storage::initial_state`] is as of. Every entry after
    /// it must still be in the log (`conf_index() + 1 >= first_index()`): the core replays
    /// the configuration entries after it (see `raft/membership.rs`, Recovery). A store that
    /// keeps the configuration with its applied state answers its applied index.
    fn conf_index(&self) -> Result<u64, StorageError>;
    /// Entries in `[lo, hi)`, stopping once their encoded size would exceed `max_bytes`
    /// (always at least one entry when `lo < hi`).
    fn entries(&self, lo: u64, hi: u64, max_bytes: u64) -> Result<Vec<Entry>, StorageError>;
    /// Term of the entry at `index` (the snapshot index included; 0 for index 0).
    fn term(&self, index: u64) -> Result<u64, StorageError>;
    /// First index still held as an entry (snapshot index + 1).
    fn first_index(&self) -> Result<u64, StorageError>;
    /// Last index held (the snapshot index if no entries follow it).
    fn last_index(&self) -> Result<u64, StorageError>;
    /// Metadata of the latest snapshot (index 0 if none).
    fn snapshot_meta(&self) -> Result<SnapshotMeta, StorageError>;
    /// Bytes `[offset, offset + max)` of the snapshot at `index`, and whether they end it.
    /// `SnapshotUnavailable` if that snapshot is gone (the leader then restarts the transfer).
    fn snapshot_chunk(
        &self,
        index: u64,
        offset: u64,
        max: u64,
    ) -> Result<(Vec<u8>, bool), StorageError>;
}

/// An in-memory [`Storage`], written by a test driver. Its configuration is the snapshot's:
/// `conf_index` is the snapshot index, and the entries after it are all kept.
/// Invariants: `entries` are consecutive from `offset + 1`; `snapshot.index ≥ offset`
/// (entries are compacted only below a snapshot); the term at `offset` is `offset_term`.
#[derive(Debug, Clone, Default)]
pub struct MemStorage {
    hard_state: HardState,
    snapshot: SnapshotMeta,
    snapshot_data: Vec<u8>,
    /// Index of the last compacted entry (0 if none).
    offset: u64,
    /// Term of the entry at `offset`.
    offset_term: u64,
    entries: Vec<Entry>,
}

impl MemStorage {
    /// Empty storage of a cluster bootstrapped with these voters.
    /// An empty voter list gives a node without configuration (a new member about to join).
    pub fn new_with_voters(voters: impl IntoIterator<Item = u64>) -> MemStorage {
        MemStorage::new_with_conf(Configuration::with_voters(voters))
    }

    /// Empty storage of a cluster bootstrapped with this membership.
    pub fn new_with_conf(conf: Configuration) -> MemStorage {
        MemStorage {
            snapshot: SnapshotMeta {
                index: 0,
                term: 0,
                conf,
                time_ms: 0,
            },
            ..MemStorage::default()
        }
    }

    /// Records the hard state.
    pub fn set_hard_state(&mut self, hs: HardState) {
        self.hard_state = hs;
    }

    /// The recorded hard state.
    pub fn hard_state(&self) -> HardState {
        self.hard_state
    }

    /// Appends entries, replacing any stored entries at or after the first one's index.
    /// Entries at or below the compaction point are ignored.
    pub fn append(&mut self, entries: &[Entry]) {
        let Some(first) = entries.first() else { return };
        let start = self.offset + 1;
        let skip = start.saturating_sub(first.index) as usize;
        let entries = &entries[skip.min(entries.len())..];
        let Some(first) = entries.first() else { return };
        let keep = (first.index - start) as usize;
        self.entries.truncate(keep);
        self.entries.extend_from_slice(entries);
    }

    /// Installs a snapshot received from a leader: discards every entry (the core installs
    /// only snapshots beyond its log) and takes its membership.
    pub fn apply_snapshot(&mut self, meta: SnapshotMeta, data: Vec<u8>) {
        self.entries.clear();
        self.hard_state.commit = self.hard_state.commit.max(meta.index);
        self.offset = meta.index;
        self.offset_term = meta.term;
        self.snapshot = meta;
        self.snapshot_data = data;
    }

    /// Records a snapshot of the state machine at `index` (an applied index within the log)
    /// taken by the driver, with the configuration as of `index` (the previous snapshot's
    /// plus the configuration entries up to `index`). Entries stay until
    /// [`MemStorage::compact`].
    pub fn create_snapshot(&mut self, index: u64, data: Vec<u8>) {
        if index <= self.snapshot.index {
            return;
        }
        let Ok(es) = self.entries(self.snapshot.index + 1, index + 1, u64::MAX) else {
            return;
        };
        let Some(e) = es.last().filter(|e| e.index == index) else {
            return;
        };
        let mut conf = self.snapshot.conf.clone();
        for c in &es {
            if let EntryKind::Config(change) = &c.kind {
                conf.apply(change);
            }
        }
        self.snapshot = SnapshotMeta {
            index,
            term: e.term,
            conf,
            time_ms: e.time_ms,
        };
        self.snapshot_data = data;
    }

    /// Discards entries up to `index` (clamped to the snapshot index). Log compaction is the
    /// driver's call: it keeps a margin behind the snapshot so that briefly lagging
    /// followers catch up by entries, not by snapshot.
    pub fn compact(&mut self, index: u64) {
        let index = index.min(self.snapshot.index);
        if index <= self.offset {
            return;
        }
        let Ok(term) = self.term(index) else { return };
        self.entries.drain(..(index - self.offset) as usize);
        self.offset = index;
        self.offset_term = term;
    }

    /// The stored snapshot's data.
    pub fn snapshot_data(&self) -> &[u8] {
        &self.snapshot_data
    }

    /// Every stored entry.
    pub fn all_entries(&self) -> &[Entry] {
        &self.entries
    }
}

impl Storage for MemStorage {
    fn initial_state(&self) -> Result<(HardState, Configuration), StorageError> {
        Ok((self.hard_state, self.snapshot.conf.clone()))
    }

    fn conf_index(&self) -> Result<u64, StorageError> {
        Ok(self.snapshot.index)
    }

    fn entries(&self, lo: u64, hi: u64, max_bytes: u64) -> Result<Vec<Entry>, StorageError> {
        let offset = self.offset + 1;
        if lo < offset {
            return Err(StorageError::Compacted);
        }
        if hi > self.last_index()? + 1 {
            return Err(StorageError::Unavailable);
        }
        let mut out = Vec::new();
        let mut size = 0u64;
        for e in &self.entries[(lo - offset) as usize..(hi - offset) as usize] {
            size = size.saturating_add(entry_size(e));
            if !out.is_empty() && size > max_bytes {
                break;
            }
            out.push(e.clone());
        }
        Ok(out)
    }

    fn term(&self, index: u64) -> Result<u64, StorageError> {
        if index == self.offset {
            return Ok(self.offset_term);
        }
        if index < self.offset {
            return Err(StorageError::Compacted);
        }
        self.entries
            .get((index - self.offset - 1) as usize)
            .map(|e| e.term)
            .ok_or(StorageError::Unavailable)
    }

    fn first_index(&self) -> Result<u64, StorageError> {
        Ok(self.offset + 1)
    }

    fn last_index(&self) -> Result<u64, StorageError> {
        Ok(self.offset + self.entries.len() as u64)
    }

    fn snapshot_meta(&self) -> Result<SnapshotMeta, StorageError> {
        Ok(self.snapshot.clone())
    }

    fn snapshot_chunk(
        &self,
        index: u64,
        offset: u64,
        max: u64,
    ) -> Result<(Vec<u8>, bool), StorageError> {
        if index != self.snapshot.index || index == 0 {
            return Err(StorageError::SnapshotUnavailable);
        }
        let len = self.snapshot_data.len() as u64;
        let start = offset.min(len);
        let end = offset.saturating_add(max.max(1)).min(len);
        Ok((
            self.snapshot_data[start as usize..end as usize].to_vec(),
            end == len,
        ))
    }
}
