//! redb table definitions and the state machine's store implementations over them:
//! [`FsmTxn`] (inside the group commit's write transaction) and [`FsmView`] (a read
//! transaction, for serving reads).

use lockd_protocol::codec::to_bytes;
use lockd_protocol::{Event, Revision, SessionId};
use redb::{ReadTransaction, ReadableTable, Table, TableDefinition, WriteTransaction};

use super::decode;
use crate::fsm::{
    AppliedState, DedupRecord, FsmRead, FsmStore, LockRecord, NodeRecord, SessionRecord, StoreError,
};

pub(super) const RAFT_LOG: TableDefinition<u64, &[u8]> = TableDefinition::new("raft_log");
pub(super) const RAFT_STATE: TableDefinition<&str, u64> = TableDefinition::new("raft_state");
pub(super) const NODES: TableDefinition<(&str, &str), &[u8]> = TableDefinition::new("nodes");
pub(super) const SESSIONS: TableDefinition<u64, &[u8]> = TableDefinition::new("sessions");
pub(super) const EPHEMERALS: TableDefinition<(u64, &str), ()> = TableDefinition::new("ephemerals");
pub(super) const DEDUP: TableDefinition<(u64, u64), &[u8]> = TableDefinition::new("dedup");
pub(super) const FSM_META: TableDefinition<&str, &[u8]> = TableDefinition::new("fsm_meta");
pub(super) const LOCKS: TableDefinition<&str, &[u8]> = TableDefinition::new("locks");
pub(super) const SESSION_LOCKS: TableDefinition<(u64, &str, u64), ()> =
    TableDefinition::new("session_locks");
pub(super) const EVENTS: TableDefinition<u64, &[u8]> = TableDefinition::new("events");
const KEY_APPLIED: &str = "applied";

fn store_err(e: impl std::fmt::Display) -> StoreError {
    StoreError(e.to_string())
}

fn encode<T: bincode::Encode>(value: &T) -> Result<Vec<u8>, StoreError> {
    to_bytes(value).map_err(store_err)
}

fn decode_rec<T: bincode::Decode<()>>(bytes: &[u8]) -> Result<T, StoreError> {
    decode(bytes).map_err(store_err)
}

// Generic readers shared by the write and the read side.

fn get_node(
    t: &impl ReadableTable<(&'static str, &'static str), &'static [u8]>,
    parent: &str,
    name: &str,
) -> Result<Option<NodeRecord>, StoreError> {
    match t.get((parent, name)).map_err(store_err)? {
        Some(v) => Ok(Some(decode_rec(v.value())?)),
        None => Ok(None),
    }
}

fn list_children(
    t: &impl ReadableTable<(&'static str, &'static str), &'static [u8]>,
    parent: &str,
    start_after: Option<&str>,
    limit: usize,
) -> Result<(Vec<String>, bool), StoreError> {
    let mut names = Vec::new();
    let range = t
        .range((parent, start_after.unwrap_or(""))..)
        .map_err(store_err)?;
    for item in range {
        let (key, _) = item.map_err(store_err)?;
        let (p, name) = key.value();
        if p != parent {
            break;
        }
        if Some(name) == start_after {
            continue;
        }
        if names.len() == limit {
            return Ok((names, true));
        }
        names.push(name.to_string());
    }
    Ok((names, false))
}

fn get_session(
    t: &impl ReadableTable<u64, &'static [u8]>,
    id: SessionId,
) -> Result<Option<SessionRecord>, StoreError> {
    match t.get(id.0).map_err(store_err)? {
        Some(v) => Ok(Some(decode_rec(v.value())?)),
        None => Ok(None),
    }
}

fn list_ephemerals(
    t: &impl ReadableTable<(u64, &'static str), ()>,
    id: SessionId,
) -> Result<Vec<String>, StoreError> {
    let mut paths = Vec::new();
    for item in t.range((id.0, "")..).map_err(store_err)? {
        let (key, _) = item.map_err(store_err)?;
        let (session, path) = key.value();
        if session != id.0 {
            break;
        }
        paths.push(path.to_string());
    }
    Ok(paths)
}

fn get_dedup(
    t: &impl ReadableTable<(u64, u64), &'static [u8]>,
    id: SessionId,
    seq: u64,
) -> Result<Option<DedupRecord>, StoreError> {
    match t.get((id.0, seq)).map_err(store_err)? {
        Some(v) => Ok(Some(decode_rec(v.value())?)),
        None => Ok(None),
    }
}

fn get_applied(
    t: &impl ReadableTable<&'static str, &'static [u8]>,
) -> Result<AppliedState, StoreError> {
    match t.get(KEY_APPLIED).map_err(store_err)? {
        Some(v) => decode_rec(v.value()),
        None => Ok(AppliedState::default()),
    }
}

fn get_lock(
    t: &impl ReadableTable<&'static str, &'static [u8]>,
    name: &str,
) -> Result<Option<LockRecord>, StoreError> {
    match t.get(name).map_err(store_err)? {
        Some(v) => Ok(Some(decode_rec(v.value())?)),
        None => Ok(None),
    }
}

fn list_locks(
    t: &impl ReadableTable<&'static str, &'static [u8]>,
    start_after: Option<&str>,
    limit: usize,
) -> Result<(Vec<(String, LockRecord)>, bool), StoreError> {
    let mut out = Vec::new();
    for item in t.range(start_after.unwrap_or("")..).map_err(store_err)? {
        let (key, value) = item.map_err(store_err)?;
        if Some(key.value()) == start_after {
            continue;
        }
        if out.len() == limit {
            return Ok((out, true));
        }
        out.push((key.value().to_string(), decode_rec(value.value())?));
    }
    Ok((out, false))
}

fn list_session_locks(
    t: &impl ReadableTable<(u64, &'static str, u64), ()>,
    id: SessionId,
) -> Result<Vec<(String, u64)>, StoreError> {
    let mut out = Vec::new();
    for item in t.range((id.0, "", 0)..).map_err(store_err)? {
        let (key, _) = item.map_err(store_err)?;
        let (session, name, acquire_id) = key.value();
        if session != id.0 {
            break;
        }
        out.push((name.to_string(), acquire_id));
    }
    Ok(out)
}

fn list_events(
    t: &impl ReadableTable<u64, &'static [u8]>,
    from: Revision,
    max_events: usize,
) -> Result<Vec<Event>, StoreError> {
    let mut out = Vec::new();
    for item in t.range(from..).map_err(store_err)? {
        if out.len() >= max_events {
            break;
        }
        let (_, value) = item.map_err(store_err)?;
        let events: Vec<Event> = decode_rec(value.value())?;
        out.extend(events);
    }
    Ok(out)
}

/// The state machine's tables inside a write transaction.
pub struct FsmTxn<'txn> {
    nodes: Table<'txn, (&'static str, &'static str), &'static [u8]>,
    sessions: Table<'txn, u64, &'static [u8]>,
    ephemerals: Table<'txn, (u64, &'static str), ()>,
    dedup: Table<'txn, (u64, u64), &'static [u8]>,
    meta: Table<'txn, &'static str, &'static [u8]>,
    locks: Table<'txn, &'static str, &'static [u8]>,
    session_locks: Table<'txn, (u64, &'static str, u64), ()>,
    events: Table<'txn, u64, &'static [u8]>,
}

impl std::fmt::Debug for FsmTxn<'_> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("FsmTxn")
    }
}

impl<'txn> FsmTxn<'txn> {
    /// Opens the state machine's tables in `txn`.
    pub fn open(txn: &'txn WriteTransaction) -> Result<Self, redb::TableError> {
        Ok(FsmTxn {
            nodes: txn.open_table(NODES)?,
            sessions: txn.open_table(SESSIONS)?,
            ephemerals: txn.open_table(EPHEMERALS)?,
            dedup: txn.open_table(DEDUP)?,
            meta: txn.open_table(FSM_META)?,
            locks: txn.open_table(LOCKS)?,
            session_locks: txn.open_table(SESSION_LOCKS)?,
            events: txn.open_table(EVENTS)?,
        })
    }
}

impl FsmRead for FsmTxn<'_> {
    fn node(&self, parent: &str, name: &str) -> Result<Option<NodeRecord>, StoreError> {
        get_node(&self.nodes, parent, name)
    }
    fn children(
        &self,
        parent: &str,
        start_after: Option<&str>,
        limit: usize,
    ) -> Result<(Vec<String>, bool), StoreError> {
        list_children(&self.nodes, parent, start_after, limit)
    }
    fn session(&self, id: SessionId) -> Result<Option<SessionRecord>, StoreError> {
        get_session(&self.sessions, id)
    }
    fn ephemerals(&self, id: SessionId) -> Result<Vec<String>, StoreError> {
        list_ephemerals(&self.ephemerals, id)
    }
    fn dedup(&self, id: SessionId, seq: u64) -> Result<Option<DedupRecord>, StoreError> {
        get_dedup(&self.dedup, id, seq)
    }
    fn applied(&self) -> Result<AppliedState, StoreError> {
        get_applied(&self.meta)
    }
    fn lock(&self, name: &str) -> Result<Option<LockRecord>, StoreError> {
        get_lock(&self.locks, name)
    }
    fn locks(
        &self,
        start_after: Option<&str>,
        limit: usize,
    ) -> Result<(Vec<(String, LockRecord)>, bool), StoreError> {
        list_locks(&self.locks, start_after, limit)
    }
    fn session_locks(&self, id: SessionId) -> Result<Vec<(String, u64)>, StoreError> {
        list_session_locks(&self.session_locks, id)
    }
    fn events(&self, from: Revision, max_events: usize) -> Result<Vec<Event>, StoreError> {
        list_events(&self.events, from, max_events)
    }
}

impl FsmStore for FsmTxn<'_> {
    fn put_node(&mut self, parent: &str, name: &str, node: &NodeRecord) -> Result<(), StoreError> {
        self.nodes
            .insert((parent, name), encode(node)?.as_slice())
            .map_err(store_err)?;
        Ok(())
    }
    fn remove_node(&mut self, parent: &str, name: &str) -> Result<(), StoreError> {
        self.nodes.remove((parent, name)).map_err(store_err)?;
        Ok(())
    }
    fn put_session(&mut self, id: SessionId, session: &SessionRecord) -> Result<(), StoreError> {
        self.sessions
            .insert(id.0, encode(session)?.as_slice())
            .map_err(store_err)?;
        Ok(())
    }
    fn remove_session(&mut self, id: SessionId) -> Result<(), StoreError> {
        self.sessions.remove(id.0).map_err(store_err)?;
        Ok(())
    }
    fn add_ephemeral(&mut self, id: SessionId, path: &str) -> Result<(), StoreError> {
        self.ephemerals
            .insert((id.0, path), ())
            .map_err(store_err)?;
        Ok(())
    }
    fn remove_ephemeral(&mut self, id: SessionId, path: &str) -> Result<(), StoreError> {
        self.ephemerals.remove((id.0, path)).map_err(store_err)?;
        Ok(())
    }
    fn put_dedup(
        &mut self,
        id: SessionId,
        seq: u64,
        record: &DedupRecord,
    ) -> Result<(), StoreError> {
        self.dedup
            .insert((id.0, seq), encode(record)?.as_slice())
            .map_err(store_err)?;
        Ok(())
    }
    fn remove_dedup_below(&mut self, id: SessionId, below: u64) -> Result<(), StoreError> {
        self.dedup
            .retain_in((id.0, 0)..(id.0, below), |_, _| false)
            .map_err(store_err)
    }
    fn set_applied(&mut self, applied: AppliedState) -> Result<(), StoreError> {
        self.meta
            .insert(KEY_APPLIED, encode(&applied)?.as_slice())
            .map_err(store_err)?;
        Ok(())
    }
    fn put_lock(&mut self, name: &str, lock: &LockRecord) -> Result<(), StoreError> {
        self.locks
            .insert(name, encode(lock)?.as_slice())
            .map_err(store_err)?;
        Ok(())
    }
    fn remove_lock(&mut self, name: &str) -> Result<(), StoreError> {
        self.locks.remove(name).map_err(store_err)?;
        Ok(())
    }
    fn add_session_lock(
        &mut self,
        id: SessionId,
        name: &str,
        acquire_id: u64,
    ) -> Result<(), StoreError> {
        self.session_locks
            .insert((id.0, name, acquire_id), ())
            .map_err(store_err)?;
        Ok(())
    }
    fn remove_session_lock(
        &mut self,
        id: SessionId,
        name: &str,
        acquire_id: u64,
    ) -> Result<(), StoreError> {
        self.session_locks
            .remove((id.0, name, acquire_id))
            .map_err(store_err)?;
        Ok(())
    }
    fn put_events(&mut self, revision: Revision, events: &[Event]) -> Result<(), StoreError> {
        self.events
            .insert(revision, encode(&events.to_vec())?.as_slice())
            .map_err(store_err)?;
        Ok(())
    }
    fn remove_events_below(&mut self, below: Revision) -> Result<(), StoreError> {
        self.events
            .retain_in(..below, |_, _| false)
            .map_err(store_err)
    }
}

/// Read-only view of the state machine in a read transaction. Tables open on demand.
pub struct FsmView<'a> {
    txn: &'a ReadTransaction,
}

impl std::fmt::Debug for FsmView<'_> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("FsmView")
    }
}

impl<'a> FsmView<'a> {
    /// A view over `txn`.
    pub fn new(txn: &'a ReadTransaction) -> Self {
        FsmView { txn }
    }

    fn table<K: redb::Key + 'static, V: redb::Value + 'static>(
        &self,
        def: TableDefinition<K, V>,
    ) -> Result<redb::ReadOnlyTable<K, V>, StoreError> {
        self.txn.open_table(def).map_err(store_err)
    }
}

impl FsmRead for FsmView<'_> {
    fn node(&self, parent: &str, name: &str) -> Result<Option<NodeRecord>, StoreError> {
        get_node(&self.table(NODES)?, parent, name)
    }
    fn children(
        &self,
        parent: &str,
        start_after: Option<&str>,
        limit: usize,
    ) -> Result<(Vec<String>, bool), StoreError> {
        list_children(&self.table(NODES)?, parent, start_after, limit)
    }
    fn session(&self, id: SessionId) -> Result<Option<SessionRecord>, StoreError> {
        get_session(&self.table(SESSIONS)?, id)
    }
    fn ephemerals(&self, id: SessionId) -> Result<Vec<String>, StoreError> {
        list_ephemerals(&self.table(EPHEMERALS)?, id)
    }
    fn dedup(&self, id: SessionId, seq: u64) -> Result<Option<DedupRecord>, StoreError> {
        get_dedup(&self.table(DEDUP)?, id, seq)
    }
    fn applied(&self) -> Result<AppliedState, StoreError> {
        get_applied(&self.table(FSM_META)?)
    }
    fn lock(&self, name: &str) -> Result<Option<LockRecord>, StoreError> {
        get_lock(&self.table(LOCKS)?, name)
    }
    fn locks(
        &self,
        start_after: Option<&str>,
        limit: usize,
    ) -> Result<(Vec<(String, LockRecord)>, bool), StoreError> {
        list_locks(&self.table(LOCKS)?, start_after, limit)
    }
    fn session_locks(&self, id: SessionId) -> Result<Vec<(String, u64)>, StoreError> {
        list_session_locks(&self.table(SESSION_LOCKS)?, id)
    }
    fn events(&self, from: Revision, max_events: usize) -> Result<Vec<Event>, StoreError> {
        list_events(&self.table(EVENTS)?, from, max_events)
    }
}
