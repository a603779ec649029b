//! [`RaftStore`]: the redb-backed [`crate::raft::Storage`] the consensus core reads, and the
//! durable side of the Ready contract ([`RaftStore::persist`]): one write transaction holding
//! what it is given of a Ready (the snapshot install, the appended entries, the hard state,
//! the application of committed entries with the applied index, and compaction), with
//! `Durability::Immediate` if it writes entries, a new term or vote, or a snapshot, and
//! without fsync if it only applies. The driver passes a whole Ready, or its log part and its
//! applying in two calls.
//!
//! Layout (same database as [`Storage`]): `raft_log` (index → entry), `raft_state` (`term`,
//! `vote`, `commit`, `first_index`, `offset_term`: the first index held and the term of the
//! entry just before it), the fsm tables (the configuration as of the applied index is the
//! `conf` record of `fsm_meta`, rewritten in the transaction that applies a configuration
//! entry, so every snapshot carries the one at its own index, §3a.8), and
//! `snapshot_staging` ((term, index, offset) → chunk, §3a.10). Configurations appended but
//! not yet applied need no record of their own: they are the `Config` entries of
//! `raft_log` after the applied index, which the core replays on top of `conf` at startup
//! ([`raft::Storage::conf_index`] is the applied index).
//!
//! Snapshots are not stored as files: a snapshot is the fsm tables dumped from one read
//! transaction at the applied index ([`super::snapshot`]). The dump is built when the core
//! first asks for [`Storage::snapshot_meta`] (or by [`RaftStore::create_snapshot`]) and kept
//! in memory while its index is still ≥ the compaction point, so a transfer reads stable
//! bytes even while the applied index moves on. Entries are compacted only below
//! `applied - margin`, so the state at the applied index always covers the log's gap.
//!
//! Caches: first/last index and their terms, the hard state and the configuration are kept
//! in memory; only [`RaftStore::persist`] writes them, and it updates the caches after its
//! transaction commits. Do not write the log of the same database through
//! [`Storage::commit_batch`] while a `RaftStore` is open on it.

use std::collections::{BTreeMap, BTreeSet};
use std::sync::{Arc, Mutex};

use lockd_protocol::codec::to_bytes;
use redb::{Durability, ReadableDatabase, ReadableTable, TableDefinition, WriteTransaction};

use super::tables::{FSM_META, RAFT_LOG, RAFT_STATE};
use super::{
    compact, corrupt, decode, snapshot, FsmTxn, FsmView, Storage, StorageError, KEY_FIRST_INDEX,
    KEY_OFFSET_TERM, KEY_TERM, KEY_VOTE,
};
use crate::fsm::{self, Applied, FsmRead};
use crate::raft::{
    self, Configuration, Entry, EntryKind, HardState, Ready, Snapshot, SnapshotMeta,
    StorageError as RaftError,
};

/// Chunks of a snapshot being received, keyed by (term, index, offset).
const SNAPSHOT_STAGING: TableDefinition<(u64, u64, u64), &[u8]> =
    TableDefinition::new("snapshot_staging");
const KEY_COMMIT: &str = "commit";
const KEY_CONF: &str = "conf";

/// What one Ready asks to make durable (see the contract in [`crate::raft`]).
#[derive(Debug, Default, Clone, Copy)]
pub struct PersistInput<'a> {
    /// A snapshot to install before anything else.
    pub snapshot: Option<&'a Snapshot>,
    /// Entries to append, replacing stored entries at or after the first one's index.
    pub entries: &'a [Entry],
    /// The hard state, if it changed.
    pub hard_state: Option<HardState>,
    /// Committed entries to apply, in order; those at or below the applied index are skipped.
    pub committed: &'a [Entry],
}

impl<'a> PersistInput<'a> {
    /// Everything a Ready asks to persist and apply.
    pub fn from_ready(ready: &'a Ready) -> PersistInput<'a> {
        PersistInput {
            snapshot: ready.snapshot.as_ref(),
            entries: &ready.entries,
            hard_state: ready.hard_state,
            committed: &ready.committed_entries,
        }
    }
}

/// Answer to a staged snapshot chunk.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum StageOutcome {
    /// Stored; the next chunk starts at this offset.
    Staged { next_offset: u64 },
    /// The chunk's offset is not the next one expected; resend from `expected`.
    WrongOffset { expected: u64 },
}

/// Durable log position, mirrored in memory.
/// Invariants: `first ≥ 1`; entries span `first..=last` (none if `last + 1 == first`);
/// `offset_term` is the term at `first - 1`, `last_term` the term at `last`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
struct LogPos {
    first: u64,
    offset_term: u64,
    last: u64,
    last_term: u64,
}

/// A materialised snapshot kept for transfers.
#[derive(Debug)]
struct Image {
    meta: SnapshotMeta,
    data: Vec<u8>,
}

/// The redb-backed Raft storage of one node. See the module docs.
#[derive(Debug)]
pub struct RaftStore {
    storage: Storage,
    pos: LogPos,
    hard_state: HardState,
    /// The configuration as of `conf_index` (the applied index).
    conf: Configuration,
    conf_index: u64,
    image: Mutex<Option<Arc<Image>>>,
}

fn other(e: StorageError) -> RaftError {
    RaftError::Other(e.to_string())
}

fn enc<T: bincode::Encode>(value: &T) -> Result<Vec<u8>, StorageError> {
    to_bytes(value).map_err(corrupt)
}

/// The configuration record as written before it held members' addresses and incarnations.
/// Still read, so that data directories made before keep opening.
#[derive(bincode::Encode, bincode::Decode)]
struct ConfigurationV1 {
    voters: BTreeSet<u64>,
    learners: BTreeSet<u64>,
}

/// Decodes the stored configuration record (current format, else the first one).
fn decode_conf(bytes: &[u8]) -> Result<Configuration, StorageError> {
    decode(bytes).or_else(|e| match decode::<ConfigurationV1>(bytes) {
        Ok(v1) => Ok(Configuration {
            voters: v1.voters,
            learners: v1.learners,
            members: BTreeMap::new(),
        }),
        Err(_) => Err(e),
    })
}

impl RaftStore {
    /// Opens the Raft view of `storage`'s database. Discards staged snapshot chunks left by a
    /// crash (the leader restarts an interrupted transfer from offset 0).
    pub fn open(storage: Storage) -> Result<RaftStore, StorageError> {
        let mut txn = storage.db.begin_write()?;
        txn.set_durability(Durability::Immediate)?;
        txn.delete_table(SNAPSHOT_STAGING)?;
        txn.open_table(SNAPSHOT_STAGING)?;
        txn.commit()?;

        let txn = storage.db.begin_read()?;
        let state = txn.open_table(RAFT_STATE)?;
        let get = |key: &str| -> Result<Option<u64>, StorageError> {
            Ok(state.get(key)?.map(|v| v.value()))
        };
        let hard_state = HardState {
            term: get(KEY_TERM)?.unwrap_or(0),
            vote: get(KEY_VOTE)?.unwrap_or(0),
            commit: get(KEY_COMMIT)?.unwrap_or(0),
        };
        let first = get(KEY_FIRST_INDEX)?.unwrap_or(1).max(1);
        let offset_term = match get(KEY_OFFSET_TERM)? {
            Some(t) => t,
            None if first == 1 => 0,
            None => return Err(corrupt("term of the compaction point missing")),
        };
        let log = txn.open_table(RAFT_LOG)?;
        let (last, last_term) = match log.last()? {
            Some((k, v)) => (k.value(), decode::<Entry>(v.value())?.term),
            None => (first - 1, offset_term),
        };
        if last + 1 < first {
            return Err(corrupt("log ends below its first index"));
        }
        let conf = match txn.open_table(FSM_META)?.get(KEY_CONF)? {
            Some(v) => decode_conf(v.value())?,
            None => Configuration::default(),
        };
        let conf_index = FsmView::new(&txn).applied()?.index;
        Ok(RaftStore {
            storage,
            pos: LogPos {
                first,
                offset_term,
                last,
                last_term,
            },
            hard_state,
            conf,
            conf_index,
            image: Mutex::new(None),
        })
    }

    /// Records the initial configuration of a new cluster member, if none is stored yet.
    pub fn bootstrap(&mut self, conf: Configuration) -> Result<(), StorageError> {
        let mut txn = self.storage.db.begin_write()?;
        txn.set_durability(Durability::Immediate)?;
        {
            let mut meta = txn.open_table(FSM_META)?;
            if meta.get(KEY_CONF)?.is_some() {
                return Ok(());
            }
            meta.insert(KEY_CONF, enc(&conf)?.as_slice())?;
        }
        txn.commit()?;
        self.conf = conf;
        Ok(())
    }

    /// The underlying database handle (reads for clients, recovery).
    pub fn storage(&self) -> &Storage {
        &self.storage
    }

    /// The persisted hard state.
    pub fn hard_state(&self) -> HardState {
        self.hard_state
    }

    /// The state machine's applied index.
    pub fn applied(&self) -> Result<u64, StorageError> {
        let txn = self.storage.db.begin_read()?;
        Ok(FsmView::new(&txn).applied()?.index)
    }

    fn lock_image(&self) -> std::sync::MutexGuard<'_, Option<Arc<Image>>> {
        // The image is replaced whole; a poisoned lock still holds a consistent value.
        self.image.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Dumps the fsm tables at the applied index from one read transaction and keeps the
    /// result for transfers. Returns its metadata (index 0 if nothing was applied yet).
    pub fn create_snapshot(&self) -> Result<SnapshotMeta, StorageError> {
        let txn = self.storage.db.begin_read()?;
        let applied = FsmView::new(&txn).applied()?;
        let conf = match txn.open_table(FSM_META)?.get(KEY_CONF)? {
            Some(v) => decode_conf(v.value())?,
            None => Configuration::default(),
        };
        let meta = SnapshotMeta {
            index: applied.index,
            term: applied.term,
            conf,
            time_ms: applied.time_ms,
        };
        if applied.index == 0 {
            return Ok(meta);
        }
        let data = snapshot::dump(&txn, applied.index, applied.term)?;
        *self.lock_image() = Some(Arc::new(Image {
            meta: meta.clone(),
            data,
        }));
        Ok(meta)
    }

    /// Stores one chunk of a snapshot being received (§3a.10). A chunk at offset 0 discards
    /// every other staged snapshot. Committed without fsync: losing staged chunks only means
    /// a new transfer.
    pub fn stage_snapshot_chunk(
        &self,
        meta: &SnapshotMeta,
        offset: u64,
        data: &[u8],
    ) -> Result<StageOutcome, StorageError> {
        let mut txn = self.storage.db.begin_write()?;
        txn.set_durability(Durability::None)?;
        let outcome = {
            let mut staging = txn.open_table(SNAPSHOT_STAGING)?;
            let (term, index) = (meta.term, meta.index);
            if offset == 0 {
                staging.retain(|_, _| false)?;
            } else {
                let expected = staged_len(&staging, term, index)?;
                if expected != offset {
                    return Ok(StageOutcome::WrongOffset { expected });
                }
            }
            staging.insert((term, index, offset), data)?;
            StageOutcome::Staged {
                next_offset: offset + data.len() as u64,
            }
        };
        txn.commit()?;
        Ok(outcome)
    }

    /// The staged snapshot for `meta`, assembled and verified, if complete and intact.
    pub fn staged_snapshot(&self, meta: &SnapshotMeta) -> Result<Option<Snapshot>, StorageError> {
        let txn = self.storage.db.begin_read()?;
        let staging = txn.open_table(SNAPSHOT_STAGING)?;
        let mut data = Vec::new();
        for item in staging.range((meta.term, meta.index, 0)..=(meta.term, meta.index, u64::MAX))? {
            let (k, v) = item?;
            if k.value().2 != data.len() as u64 {
                return Ok(None);
            }
            data.extend_from_slice(v.value());
        }
        if data.is_empty() || snapshot::verify(&data, meta.index, meta.term).is_err() {
            return Ok(None);
        }
        Ok(Some(Snapshot {
            meta: meta.clone(),
            data,
        }))
    }

    /// Persists a Ready, or part of one (see [`PersistInput`]): in one write transaction, made
    /// durable with one fsync unless it only applies (and moves the commit index), installs
    /// the snapshot (verified first; the log suffix after it is kept only if
    /// the entry at its index has its term, Figure 5.3), appends the entries (truncating a
    /// conflicting suffix), writes the hard state, applies the committed entries recording
    /// the applied index (and, for configuration entries, the configuration as of it), and
    /// compacts the log more than the storage's retain margin below
    /// the applied index. Returns each applied entry's outcome, in order. On error nothing
    /// was written.
    pub fn persist(
        &mut self,
        input: PersistInput<'_>,
    ) -> Result<Vec<(u64, Applied)>, StorageError> {
        let mut txn = self.storage.db.begin_write()?;
        // Applying committed entries (and moving the commit index) needs no fsync of its own:
        // the entries are durable already and the applied state, recorded atomically with
        // the applied index, is re-derived from them after a crash (DESIGN §3a.3). Only new
        // entries, a new term or vote, and snapshots must be durable before the Ready's
        // messages go out.
        let needs_sync = input.snapshot.is_some()
            || !input.entries.is_empty()
            || input.hard_state.is_some_and(|hs| {
                (hs.term, hs.vote) != (self.hard_state.term, self.hard_state.vote)
            });
        txn.set_durability(if needs_sync {
            Durability::Immediate
        } else {
            Durability::None
        })?;
        let mut pos = self.pos;
        let mut hard_state = self.hard_state;
        let mut conf = self.conf.clone();
        let mut conf_applied = false;
        if let Some(snap) = input.snapshot {
            install(&txn, snap, &mut pos)?;
            hard_state.commit = hard_state.commit.max(snap.meta.index);
            conf = snap.meta.conf.clone();
        }
        append(&txn, input.entries, &mut pos)?;
        if let Some(hs) = input.hard_state {
            hard_state = HardState {
                commit: hs.commit.max(hard_state.commit),
                ..hs
            };
        }
        if hard_state != self.hard_state {
            let mut state = txn.open_table(RAFT_STATE)?;
            state.insert(KEY_TERM, hard_state.term)?;
            state.insert(KEY_VOTE, hard_state.vote)?;
            state.insert(KEY_COMMIT, hard_state.commit)?;
        }
        let mut outcomes = Vec::new();
        let applied = {
            let mut fsm_txn = FsmTxn::open(&txn)?;
            let mut applied = fsm_txn.applied()?.index;
            for entry in input.committed {
                if entry.index <= applied {
                    continue;
                }
                if entry.index != applied + 1 || entry.index > pos.last {
                    return Err(corrupt(format!(
                        "entry {} applied after {applied} (log ends at {})",
                        entry.index, pos.last
                    )));
                }
                outcomes.push((entry.index, fsm::apply(&mut fsm_txn, entry)?));
                if let EntryKind::Config(change) = &entry.kind {
                    conf.apply(change);
                    conf_applied = true;
                }
                applied = entry.index;
            }
            applied
        };
        if conf_applied {
            txn.open_table(FSM_META)?
                .insert(KEY_CONF, enc(&conf)?.as_slice())?;
        }
        {
            let mut log = txn.open_table(RAFT_LOG)?;
            let mut state = txn.open_table(RAFT_STATE)?;
            compact(&mut log, &mut state, applied, self.storage.log_retain)?;
            pos.first = state.get(KEY_FIRST_INDEX)?.map_or(pos.first, |v| v.value());
            pos.offset_term = state
                .get(KEY_OFFSET_TERM)?
                .map_or(pos.offset_term, |v| v.value());
        }
        txn.commit()?;
        self.pos = pos;
        self.hard_state = hard_state;
        self.conf = conf;
        self.conf_index = applied;
        if let Some(snap) = input.snapshot {
            *self.lock_image() = Some(Arc::new(Image {
                meta: snap.meta.clone(),
                data: snap.data.clone(),
            }));
        }
        Ok(outcomes)
    }

    /// [`RaftStore::persist`] of everything in `ready`.
    pub fn persist_ready(&mut self, ready: &Ready) -> Result<Vec<(u64, Applied)>, StorageError> {
        self.persist(PersistInput::from_ready(ready))
    }
}

fn staged_len(
    staging: &impl ReadableTable<(u64, u64, u64), &'static [u8]>,
    term: u64,
    index: u64,
) -> Result<u64, StorageError> {
    let mut len = 0u64;
    for item in staging.range((term, index, 0)..=(term, index, u64::MAX))? {
        let (k, v) = item?;
        if k.value().2 != len {
            break;
        }
        len += v.value().len() as u64;
    }
    Ok(len)
}

/// Installs `snap` in `txn`: fsm tables replaced, configuration recorded, staging cleared,
/// the log truncated per Figure 5.3.
fn install(txn: &WriteTransaction, snap: &Snapshot, pos: &mut LogPos) -> Result<(), StorageError> {
    let (index, term) = (snap.meta.index, snap.meta.term);
    if index == 0 || term == 0 {
        return Err(corrupt("snapshot without index or term"));
    }
    snapshot::restore(txn, &snap.data, index, term)?;
    {
        let fsm_txn = FsmTxn::open(txn)?;
        let applied = fsm_txn.applied()?;
        if (applied.index, applied.term) != (index, term) {
            return Err(corrupt(format!(
                "snapshot ({index}, {term}) holds applied state ({}, {})",
                applied.index, applied.term
            )));
        }
    }
    txn.open_table(FSM_META)?
        .insert(KEY_CONF, enc(&snap.meta.conf)?.as_slice())?;
    txn.open_table(SNAPSHOT_STAGING)?.retain(|_, _| false)?;
    let mut log = txn.open_table(RAFT_LOG)?;
    let keep_suffix = match log.get(index)? {
        Some(v) => decode::<Entry>(v.value())?.term == term,
        None => false,
    };
    if keep_suffix {
        log.retain_in(..=index, |_, _| false)?;
    } else {
        log.retain(|_, _| false)?;
        pos.last = index;
        pos.last_term = term;
    }
    pos.first = index + 1;
    pos.offset_term = term;
    let mut state = txn.open_table(RAFT_STATE)?;
    state.insert(KEY_FIRST_INDEX, pos.first)?;
    state.insert(KEY_OFFSET_TERM, pos.offset_term)?;
    Ok(())
}

/// Appends `entries` in `txn`, replacing stored entries from the first one's index on.
/// Entries at or below the compaction point are skipped (already covered by the state).
fn append(txn: &WriteTransaction, entries: &[Entry], pos: &mut LogPos) -> Result<(), StorageError> {
    let skip = entries.iter().take_while(|e| e.index < pos.first).count();
    let entries = &entries[skip..];
    let (Some(first), Some(last)) = (entries.first(), entries.last()) else {
        return Ok(());
    };
    if first.index > pos.last + 1 {
        return Err(corrupt(format!(
            "append at {} leaves a gap after {}",
            first.index, pos.last
        )));
    }
    if entries.windows(2).any(|w| w[1].index != w[0].index + 1) {
        return Err(corrupt("appended entries are not consecutive"));
    }
    let applied = FsmTxn::open(txn)?.applied()?.index;
    let mut log = txn.open_table(RAFT_LOG)?;
    for entry in entries {
        if entry.index <= applied {
            // Committed and applied: must match what is stored, never be replaced.
            let stored = match log.get(entry.index)? {
                Some(v) => decode::<Entry>(v.value())?.term,
                None => return Err(corrupt(format!("applied entry {} missing", entry.index))),
            };
            if stored != entry.term {
                return Err(corrupt(format!(
                    "append conflicts with applied entry {}",
                    entry.index
                )));
            }
            continue;
        }
        log.insert(entry.index, enc(entry)?.as_slice())?;
    }
    if last.index < pos.last {
        log.retain_in(last.index + 1.., |_, _| false)?;
    }
    pos.last = last.index;
    pos.last_term = last.term;
    Ok(())
}

impl raft::Storage for RaftStore {
    fn initial_state(&self) -> Result<(HardState, Configuration), RaftError> {
        Ok((self.hard_state, self.conf.clone()))
    }

    fn conf_index(&self) -> Result<u64, RaftError> {
        Ok(self.conf_index)
    }

    fn entries(&self, lo: u64, hi: u64, max_bytes: u64) -> Result<Vec<Entry>, RaftError> {
        if lo < self.pos.first {
            return Err(RaftError::Compacted);
        }
        if hi > self.pos.last + 1 {
            return Err(RaftError::Unavailable);
        }
        let mut out = Vec::new();
        if lo >= hi {
            return Ok(out);
        }
        let txn = self.storage.db.begin_read().map_err(|e| other(e.into()))?;
        let log = txn.open_table(RAFT_LOG).map_err(|e| other(e.into()))?;
        let mut size = 0u64;
        let range = log.range(lo..hi).map_err(|e| other(e.into()))?;
        for (expect, item) in (lo..).zip(range) {
            let (k, v) = item.map_err(|e| other(e.into()))?;
            if k.value() != expect {
                return Err(RaftError::Other(format!("log entry {expect} missing")));
            }
            // Stored bytes are the entry in the wire encoding: their length is entry_size.
            size = size.saturating_add(v.value().len() as u64);
            if !out.is_empty() && size > max_bytes {
                break;
            }
            out.push(decode::<Entry>(v.value()).map_err(other)?);
        }
        if out.is_empty() {
            return Err(RaftError::Other(format!("log entry {lo} missing")));
        }
        Ok(out)
    }

    fn term(&self, index: u64) -> Result<u64, RaftError> {
        let pos = &self.pos;
        if index + 1 == pos.first {
            return Ok(pos.offset_term);
        }
        if index < pos.first {
            return Err(RaftError::Compacted);
        }
        if index > pos.last {
            return Err(RaftError::Unavailable);
        }
        if index == pos.last {
            return Ok(pos.last_term);
        }
        let txn = self.storage.db.begin_read().map_err(|e| other(e.into()))?;
        let log = txn.open_table(RAFT_LOG).map_err(|e| other(e.into()))?;
        let found = log.get(index).map_err(|e| other(e.into()))?;
        match found {
            Some(v) => Ok(decode::<Entry>(v.value()).map_err(other)?.term),
            None => Err(RaftError::Other(format!("log entry {index} missing"))),
        }
    }

    fn first_index(&self) -> Result<u64, RaftError> {
        Ok(self.pos.first)
    }

    fn last_index(&self) -> Result<u64, RaftError> {
        Ok(self.pos.last)
    }

    fn snapshot_meta(&self) -> Result<SnapshotMeta, RaftError> {
        if let Some(image) = self.lock_image().as_ref() {
            if image.meta.index + 1 >= self.pos.first {
                return Ok(image.meta.clone());
            }
        }
        self.create_snapshot().map_err(other)
    }

    fn snapshot_chunk(
        &self,
        index: u64,
        offset: u64,
        max: u64,
    ) -> Result<(Vec<u8>, bool), RaftError> {
        let image = self.lock_image().clone();
        let Some(image) = image.filter(|i| i.meta.index == index && index > 0) else {
            return Err(RaftError::SnapshotUnavailable);
        };
        let len = image.data.len() as u64;
        let start = offset.min(len);
        let end = offset.saturating_add(max.max(1)).min(len);
        Ok((
            image.data[start as usize..end as usize].to_vec(),
            end == len,
        ))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::raft::{ConfChange, Raft, RaftConfig, Storage as _};
    use crate::storage::backend::LossyBackend;

    fn entry(index: u64, kind: EntryKind) -> Entry {
        Entry {
            index,
            term: 1,
            proposer_term: 1,
            time_ms: index,
            kind,
        }
    }

    /// DESIGN §3a.8: the configuration as of the applied index is stored with the applied
    /// state (so snapshots carry it); appended configuration entries after it are replayed
    /// by the core at startup.
    #[test]
    fn s4_1_configuration_applied_with_its_entry_and_recovered_with_the_log() {
        let backend = LossyBackend::new();
        let storage = Storage::with_backend(backend.clone(), 1000).unwrap();
        let mut store = RaftStore::open(storage).unwrap();
        store
            .bootstrap(Configuration::with_voters([1, 2, 3]))
            .unwrap();
        let add = ConfChange::AddLearner {
            id: 4,
            peer_addr: "p4".into(),
            client_addr: "c4".into(),
        };
        let es = vec![
            entry(1, EntryKind::Noop),
            entry(2, EntryKind::Config(add.clone())),
            entry(3, EntryKind::Config(ConfChange::Promote { id: 4 })),
        ];
        store
            .persist(PersistInput {
                snapshot: None,
                entries: &es,
                hard_state: Some(HardState {
                    term: 1,
                    vote: 1,
                    commit: 2,
                }),
                committed: &es[..2],
            })
            .unwrap();
        let mut applied_conf = Configuration::with_voters([1, 2, 3]);
        applied_conf.apply(&add);
        assert_eq!(store.conf_index().unwrap(), 2);
        assert_eq!(store.initial_state().unwrap().1, applied_conf);
        let meta = store.create_snapshot().unwrap();
        assert_eq!((meta.index, &meta.conf), (2, &applied_conf));
        drop(store);

        let storage =
            Storage::with_backend(LossyBackend::from_image(backend.crash_image()), 1000).unwrap();
        let store = RaftStore::open(storage).unwrap();
        assert_eq!(store.conf_index().unwrap(), 2);
        assert_eq!(store.initial_state().unwrap().1, applied_conf);
        let raft = Raft::new(
            RaftConfig {
                applied: 2,
                ..RaftConfig::new(1)
            },
            store,
        )
        .unwrap();
        let mut expected = applied_conf;
        expected.apply(&ConfChange::Promote { id: 4 });
        assert_eq!(raft.conf(), &expected, "entry 3 replayed on top");
    }

    #[test]
    fn configuration_records_of_the_first_format_still_decode() {
        let v1 = ConfigurationV1 {
            voters: [1, 2, 3].into_iter().collect(),
            learners: [4].into_iter().collect(),
        };
        let mut expected = Configuration::with_voters([1, 2, 3]);
        expected.learners.insert(4);
        assert_eq!(decode_conf(&enc(&v1).unwrap()).unwrap(), expected);
        let mut now = expected.clone();
        now.members.insert(4, crate::raft::MemberInfo::default());
        assert_eq!(decode_conf(&enc(&now).unwrap()).unwrap(), now);
        assert!(decode_conf(&[1, 2]).is_err());
    }
}
