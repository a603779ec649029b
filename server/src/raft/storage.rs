//! What the core reads of the durable log: the [`Storage`] trait, and [`MemStorage`], an
//! in-memory implementation for tests and the simulation. The core only reads storage; the
//! driver writes it (persisting each Ready) before calling `advance`. A redb-backed
//! implementation belongs in `storage/`, not here.

use super::message::{entry_size, Configuration, HardState, SnapshotMeta};
use super::Entry;

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
    /// Hard state and membership as of the last persisted Ready (startup).
    fn initial_state(&self) -> Result<(HardState, Configuration), StorageError>;
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

/// An in-memory [`Storage`], written by a test driver.
/// Invariant: `entries` are consecutive from `snapshot.index + 1`.
#[derive(Debug, Clone, Default)]
pub struct MemStorage {
    hard_state: HardState,
    conf: Configuration,
    snapshot: SnapshotMeta,
    snapshot_data: Vec<u8>,
    entries: Vec<Entry>,
}

impl MemStorage {
    /// Empty storage of a cluster bootstrapped with these voters.
    pub fn new_with_voters(voters: impl IntoIterator<Item = u64>) -> MemStorage {
        let conf = Configuration::with_voters(voters);
        MemStorage {
            conf: conf.clone(),
            snapshot: SnapshotMeta {
                index: 0,
                term: 0,
                conf,
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
    /// Entries at or below the snapshot are ignored.
    pub fn append(&mut self, entries: &[Entry]) {
        let Some(first) = entries.first() else { return };
        let offset = self.snapshot.index + 1;
        let skip = offset.saturating_sub(first.index) as usize;
        let entries = &entries[skip.min(entries.len())..];
        let Some(first) = entries.first() else { return };
        let keep = (first.index - offset) as usize;
        self.entries.truncate(keep);
        self.entries.extend_from_slice(entries);
    }

    /// Installs a snapshot: discards every entry (the core installs only snapshots beyond its
    /// log), takes its membership.
    pub fn apply_snapshot(&mut self, meta: SnapshotMeta, data: Vec<u8>) {
        self.entries.clear();
        self.conf = meta.conf.clone();
        self.hard_state.commit = self.hard_state.commit.max(meta.index);
        self.snapshot = meta;
        self.snapshot_data = data;
    }

    /// Records a snapshot of the state machine at `index` (≤ last index) taken by the
    /// driver; entries are kept until [`MemStorage::compact`].
    pub fn create_snapshot(&mut self, index: u64, conf: Configuration, data: Vec<u8>) {
        let Ok(term) = self.term(index) else { return };
        if index <= self.snapshot.index {
            return;
        }
        let offset = self.snapshot.index + 1;
        self.entries.drain(..(index + 1 - offset) as usize);
        self.snapshot = SnapshotMeta { index, term, conf };
        self.snapshot_data = data;
    }

    /// Discards entries up to `index`, which must be covered by the snapshot. Log compaction
    /// is the driver's call: it keeps a margin behind the applied index so that briefly
    /// lagging followers catch up by entries, not by snapshot.
    pub fn compact(&mut self, index: u64) {
        let offset = self.snapshot.index + 1;
        let n = (index + 1)
            .saturating_sub(offset)
            .min(self.entries.len() as u64);
        self.entries.drain(..n as usize);
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
        Ok((self.hard_state, self.conf.clone()))
    }

    fn entries(&self, lo: u64, hi: u64, max_bytes: u64) -> Result<Vec<Entry>, StorageError> {
        let offset = self.snapshot.index + 1;
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
        if index == self.snapshot.index {
            return Ok(self.snapshot.term);
        }
        if index < self.snapshot.index {
            return Err(StorageError::Compacted);
        }
        self.entries
            .get((index - self.snapshot.index - 1) as usize)
            .map(|e| e.term)
            .ok_or(StorageError::Unavailable)
    }

    fn first_index(&self) -> Result<u64, StorageError> {
        Ok(self.snapshot.index + 1)
    }

    fn last_index(&self) -> Result<u64, StorageError> {
        Ok(self.snapshot.index + self.entries.len() as u64)
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
