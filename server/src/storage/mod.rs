//! Durable state of a node in one redb database (DESIGN §5).
//!
//! Tables: `raft_log` (index → entry), `raft_state` (term, vote, identity, first log index), and the state machine's tables (`nodes`, `sessions`, `ephemerals`, `dedup`,
//! `fsm_meta`). [`Storage::commit_batch`] is the group commit: appending a batch of entries,
//! the hard state, applying the committed entries and recording the applied index happen in
//! one write transaction with one fsync, so a crash never applies an entry twice nor loses an
//! acknowledged one. This module does no networking and knows nothing of clients.
//!
//! For replication, [`RaftStore`] (`raft_store.rs`) is the redb implementation of
//! [`crate::raft::Storage`] and persists a Ready in one transaction, or its log writes and
//! its applying in two; [`snapshot`] defines
//! the snapshot format (a dump of the fsm tables at the applied index).

pub mod backend;
mod raft_store;
pub mod snapshot;
mod tables;

use std::path::Path;
use std::sync::Arc;

use lockd_protocol::codec::{from_bytes, to_bytes};
use lockd_protocol::SessionId;
use redb::{Database, Durability, ReadableDatabase, ReadableTable, StorageBackend};

use crate::fsm::{self, Applied, FsmRead, SessionRecord, StoreError};
use crate::raft::Entry;
pub use raft_store::{PersistInput, RaftStore, StageOutcome};
pub use tables::{FsmTxn, FsmView};
use tables::{RAFT_LOG, RAFT_STATE, SESSIONS};

/// Errors of the storage layer.
#[derive(Debug, thiserror::Error)]
pub enum StorageError {
    #[error("redb: {0}")]
    Redb(#[from] redb::Error),
    #[error("corrupt record: {0}")]
    Corrupt(String),
    #[error(transparent)]
    Fsm(#[from] StoreError),
    #[error("io: {0}")]
    Io(#[from] std::io::Error),
}

macro_rules! from_redb {
    ($($t:ty),*) => {$(
        impl From<$t> for StorageError {
            fn from(e: $t) -> Self {
                StorageError::Redb(e.into())
            }
        }
    )*};
}
from_redb!(
    redb::DatabaseError,
    redb::TransactionError,
    redb::TableError,
    redb::StorageError,
    redb::CommitError,
    redb::SetDurabilityError
);

/// Term and vote: what Raft must persist before it speaks (§3a.1). The commit index is not
/// part of it: it is volatile in Raft, and on restart everything up to the applied index is
/// known committed.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct HardState {
    pub term: u64,
    pub vote: u64,
}

/// Who this data directory belongs to (DESIGN §3a.9).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Identity {
    pub cluster_id: u64,
    pub node_id: u64,
    /// Random, drawn when the data directory was created.
    pub incarnation: u64,
}

/// What a node finds on disk when it starts.
#[derive(Debug, Clone)]
pub struct Recovered {
    pub identity: Option<Identity>,
    pub hard_state: HardState,
    pub applied: fsm::AppliedState,
    pub last_index: u64,
    pub last_term: u64,
    /// Entry time of the last entry in the log.
    pub last_time_ms: u64,
    pub sessions: Vec<(SessionId, SessionRecord)>,
    /// Lock-delays and wait deadlines pending in the state machine.
    pub lock_timers: Vec<crate::fsm::LockTimer>,
}

/// One group commit: entries to append (already numbered), the hard state if it changed, and
/// the index up to which entries are committed and must be applied.
#[derive(Debug, Default)]
pub struct Batch {
    pub entries: Vec<Entry>,
    /// Written only when it changed: every table a commit touches costs page writes that the
    /// fsync must flush, so the common write touches as few tables as possible.
    pub hard_state: Option<HardState>,
    /// Apply every entry with index ≤ this (and > the applied index).
    pub apply_to: u64,
}

/// The node's database.
#[derive(Debug, Clone)]
pub struct Storage {
    db: Arc<Database>,
    /// Entries kept below the applied index before the log is compacted.
    log_retain: u64,
}

const KEY_TERM: &str = "term";
const KEY_VOTE: &str = "vote";
const KEY_CLUSTER: &str = "cluster_id";
const KEY_NODE: &str = "node_id";
const KEY_INCARNATION: &str = "incarnation";
const KEY_FIRST_INDEX: &str = "first_index";
/// Term of the entry at `first_index - 1` (the compaction point), so `term()` can still
/// answer for it after the entry is gone.
const KEY_OFFSET_TERM: &str = "offset_term";

/// Compaction deletes at most this many entries per batch, to keep commits short.
const COMPACT_STEP: u64 = 4096;

impl Storage {
    /// Opens (or creates) the database file `dir/lockd.redb`.
    pub fn open(dir: &Path, log_retain: u64) -> Result<Storage, StorageError> {
        std::fs::create_dir_all(dir)?;
        let db = Database::create(dir.join("lockd.redb"))?;
        Self::init(db, log_retain)
    }

    /// Opens a database on a custom backend (tests: one that loses unsynced writes).
    pub fn with_backend(
        backend: impl StorageBackend,
        log_retain: u64,
    ) -> Result<Storage, StorageError> {
        let db = Database::builder().create_with_backend(backend)?;
        Self::init(db, log_retain)
    }

    fn init(db: Database, log_retain: u64) -> Result<Storage, StorageError> {
        let txn = db.begin_write()?;
        {
            txn.open_table(RAFT_LOG)?;
            txn.open_table(RAFT_STATE)?;
            let mut fsm_txn = FsmTxn::open(&txn)?;
            fsm::bootstrap(&mut fsm_txn)?;
        }
        txn.commit()?;
        Ok(Storage {
            db: Arc::new(db),
            log_retain,
        })
    }

    /// Records the identity of a new data directory. Refuses to overwrite another one.
    pub fn set_identity(&self, identity: Identity) -> Result<(), StorageError> {
        let txn = self.db.begin_write()?;
        {
            let mut state = txn.open_table(RAFT_STATE)?;
            if let Some(existing) = state.get(KEY_CLUSTER)? {
                if existing.value() != identity.cluster_id {
                    return Err(StorageError::Corrupt(
                        "data directory belongs to another cluster".into(),
                    ));
                }
            }
            state.insert(KEY_CLUSTER, identity.cluster_id)?;
            state.insert(KEY_NODE, identity.node_id)?;
            state.insert(KEY_INCARNATION, identity.incarnation)?;
        }
        txn.commit()?;
        Ok(())
    }

    /// Reads everything a starting node needs.
    pub fn recover(&self) -> Result<Recovered, StorageError> {
        let txn = self.db.begin_read()?;
        let state = txn.open_table(RAFT_STATE)?;
        let get = |key: &str| -> Result<Option<u64>, StorageError> {
            Ok(state.get(key)?.map(|v| v.value()))
        };
        let identity = match (get(KEY_CLUSTER)?, get(KEY_NODE)?, get(KEY_INCARNATION)?) {
            (Some(cluster_id), Some(node_id), Some(incarnation)) => Some(Identity {
                cluster_id,
                node_id,
                incarnation,
            }),
            _ => None,
        };
        let hard_state = HardState {
            term: get(KEY_TERM)?.unwrap_or(0),
            vote: get(KEY_VOTE)?.unwrap_or(0),
        };
        let log = txn.open_table(RAFT_LOG)?;
        let (last_index, last_term, last_time_ms) = match log.last()? {
            Some((_, bytes)) => {
                let entry: Entry = decode(bytes.value())?;
                (entry.index, entry.term, entry.time_ms)
            }
            None => (0, 0, 0),
        };
        let view = FsmView::new(&txn);
        let applied = view.applied()?;
        let mut sessions = Vec::new();
        for item in txn.open_table(SESSIONS)?.iter()? {
            let (id, bytes) = item?;
            sessions.push((SessionId(id.value()), decode(bytes.value())?));
        }
        let mut lock_timers = Vec::new();
        let mut after: Option<String> = None;
        loop {
            let (page, more) = view.locks(after.as_deref(), 1000)?;
            for (name, lock) in &page {
                lock_timers.extend(fsm::locks::timers_of(name, lock));
            }
            after = page.last().map(|(name, _)| name.clone());
            if !more {
                break;
            }
        }
        Ok(Recovered {
            lock_timers,
            identity,
            hard_state,
            applied,
            last_index,
            last_term,
            last_time_ms: last_time_ms.max(applied.time_ms),
            sessions,
        })
    }

    /// The group commit: appends `batch.entries`, stores the hard state, applies entries up to
    /// `batch.apply_to` and records the applied index, all in one transaction made durable
    /// with one fsync. Returns the outcome of each applied entry, in order.
    pub fn commit_batch(&self, batch: &Batch) -> Result<Vec<(u64, Applied)>, StorageError> {
        let mut txn = self.db.begin_write()?;
        txn.set_durability(Durability::Immediate)?;
        let mut outcomes = Vec::new();
        {
            let mut log = txn.open_table(RAFT_LOG)?;
            for entry in &batch.entries {
                log.insert(entry.index, to_bytes(entry).map_err(corrupt)?.as_slice())?;
            }
            let mut state = txn.open_table(RAFT_STATE)?;
            if let Some(hard_state) = batch.hard_state {
                state.insert(KEY_TERM, hard_state.term)?;
                state.insert(KEY_VOTE, hard_state.vote)?;
            }

            let mut fsm_txn = FsmTxn::open(&txn)?;
            let mut next = fsm_txn.applied()?.index + 1;
            let first_new = batch.entries.first().map_or(u64::MAX, |e| e.index);
            while next <= batch.apply_to {
                // Entries of this batch are usually the ones to apply: no need to re-read them.
                let in_batch = next
                    .checked_sub(first_new)
                    .and_then(|offset| batch.entries.get(offset as usize));
                let outcome = match in_batch {
                    Some(entry) => fsm::apply(&mut fsm_txn, entry)?,
                    None => match log.get(next)? {
                        Some(bytes) => fsm::apply(&mut fsm_txn, &decode(bytes.value())?)?,
                        None => {
                            return Err(StorageError::Corrupt(format!("log entry {next} missing")))
                        }
                    },
                };
                outcomes.push((next, outcome));
                next += 1;
            }
            compact(&mut log, &mut state, batch.apply_to, self.log_retain)?;
        }
        txn.commit()?;
        Ok(outcomes)
    }

    /// A consistent read view of the applied state.
    pub fn read(&self) -> Result<redb::ReadTransaction, StorageError> {
        Ok(self.db.begin_read()?)
    }
}

/// Deletes log entries more than `retain` below `applied`, a bounded step at a time, and
/// records the new first index and the term of the entry just before it.
fn compact(
    log: &mut redb::Table<u64, &[u8]>,
    state: &mut redb::Table<&str, u64>,
    applied: u64,
    retain: u64,
) -> Result<(), StorageError> {
    let first = state.get(KEY_FIRST_INDEX)?.map(|v| v.value()).unwrap_or(1);
    let keep_from = applied.saturating_sub(retain);
    if keep_from <= first + COMPACT_STEP / 4 {
        return Ok(());
    }
    let until = keep_from.min(first + COMPACT_STEP);
    let offset_term = match log.get(until - 1)? {
        Some(bytes) => decode::<Entry>(bytes.value())?.term,
        None => {
            return Err(StorageError::Corrupt(format!(
                "log entry {} missing at compaction",
                until - 1
            )))
        }
    };
    for index in first..until {
        log.remove(index)?;
    }
    state.insert(KEY_FIRST_INDEX, until)?;
    state.insert(KEY_OFFSET_TERM, offset_term)?;
    Ok(())
}

fn corrupt(e: impl std::fmt::Display) -> StorageError {
    StorageError::Corrupt(e.to_string())
}

pub(crate) fn decode<T: bincode::Decode<()>>(bytes: &[u8]) -> Result<T, StorageError> {
    from_bytes(bytes).map_err(corrupt)
}
