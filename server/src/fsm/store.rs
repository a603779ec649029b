//! The small store interface the state machine applies through (DESIGN §3a.3): a redb write
//! transaction in production (`storage::FsmTxn`), [`MemStore`] in tests and the simulation.
//! Implementations must iterate in key order; nothing here may depend on hash order.

use std::collections::BTreeMap;

use bincode::{Decode, Encode};
use lockd_protocol::{Error, Event, LockHolder, LockWaiter, Reply, Revision, SessionId};

/// A failure of the underlying store. Not a client error: the node stops applying.
#[derive(Debug, Clone, thiserror::Error)]
#[error("store: {0}")]
pub struct StoreError(pub String);

/// A node of the namespace as stored.
#[derive(Encode, Decode, Clone, Debug, PartialEq, Eq, Default)]
pub struct NodeRecord {
    pub data: Vec<u8>,
    pub create_rev: Revision,
    pub mod_rev: Revision,
    pub version: u64,
    pub children_version: u64,
    pub ephemeral_owner: Option<SessionId>,
    pub num_children: u32,
    /// Next suffix for a sequential child.
    pub next_sequence: u64,
}

/// A live session as stored. Terms are fixed when opened and never re-clamped.
#[derive(Encode, Decode, Clone, Debug, PartialEq, Eq)]
pub struct SessionRecord {
    pub ttl_ms: u64,
    pub tick_ms: u64,
    pub drift_ppm: u64,
    /// A connection's implicit session (closed with its connection).
    pub implicit: bool,
    /// Highest floor the client has sent: responses below it are forgotten.
    pub floor: u64,
}

/// A remembered response, for answering a retried request (DESIGN §3a.7).
#[derive(Encode, Decode, Clone, Debug, PartialEq, Eq)]
pub struct DedupRecord {
    pub revision: Revision,
    pub result: Result<Reply, Error>,
}

/// Applied position and clock of the state machine.
#[derive(Encode, Decode, Clone, Copy, Debug, PartialEq, Eq, Default)]
pub struct AppliedState {
    pub index: u64,
    pub term: u64,
    /// Entry time of the last applied entry.
    pub time_ms: u64,
    /// Oldest revision of the kept event history (0 before any compaction).
    pub history_from: u64,
}

/// A lock as stored. Removed when nobody holds or waits and it has no delay settings.
#[derive(Encode, Decode, Clone, Debug, PartialEq, Eq, Default)]
pub struct LockRecord {
    pub holder: Option<LockHolder>,
    /// FIFO: the front is granted next.
    pub waiters: Vec<LockWaiter>,
    pub lock_delay_ms: u64,
    /// While set, no grant is made; cleared by a leader's `EndLockDelay` entry whose time is
    /// at least this (DESIGN §3a.12).
    pub delayed_until_ms: Option<u64>,
}

/// Read access to the state machine's tables.
pub trait FsmRead {
    /// The node at (parent, name); the root is ("", "").
    fn node(&self, parent: &str, name: &str) -> Result<Option<NodeRecord>, StoreError>;
    /// Children names of `parent` after `start_after`, at most `limit`; and whether more exist.
    fn children(
        &self,
        parent: &str,
        start_after: Option<&str>,
        limit: usize,
    ) -> Result<(Vec<String>, bool), StoreError>;
    fn session(&self, id: SessionId) -> Result<Option<SessionRecord>, StoreError>;
    /// Paths of a session's ephemeral nodes, in order.
    fn ephemerals(&self, id: SessionId) -> Result<Vec<String>, StoreError>;
    fn dedup(&self, id: SessionId, seq: u64) -> Result<Option<DedupRecord>, StoreError>;
    fn applied(&self) -> Result<AppliedState, StoreError>;
    fn lock(&self, name: &str) -> Result<Option<LockRecord>, StoreError>;
    /// Locks after `start_after` in name order, at most `limit`; and whether more exist.
    fn locks(
        &self,
        start_after: Option<&str>,
        limit: usize,
    ) -> Result<(Vec<(String, LockRecord)>, bool), StoreError>;
    /// (lock, acquire id) of every grant and wait of a session, in order.
    fn session_locks(&self, id: SessionId) -> Result<Vec<(String, u64)>, StoreError>;
    /// Events of revisions `from..`, whole revisions, stopping after `max_events` events.
    fn events(&self, from: Revision, max_events: usize) -> Result<Vec<Event>, StoreError>;
}

/// Write access, used only by `Fsm::apply`.
pub trait FsmStore: FsmRead {
    fn put_node(&mut self, parent: &str, name: &str, node: &NodeRecord) -> Result<(), StoreError>;
    fn remove_node(&mut self, parent: &str, name: &str) -> Result<(), StoreError>;
    fn put_session(&mut self, id: SessionId, session: &SessionRecord) -> Result<(), StoreError>;
    fn remove_session(&mut self, id: SessionId) -> Result<(), StoreError>;
    fn add_ephemeral(&mut self, id: SessionId, path: &str) -> Result<(), StoreError>;
    fn remove_ephemeral(&mut self, id: SessionId, path: &str) -> Result<(), StoreError>;
    fn put_dedup(
        &mut self,
        id: SessionId,
        seq: u64,
        record: &DedupRecord,
    ) -> Result<(), StoreError>;
    /// Removes the session's records with seq < `below` (all of them for `u64::MAX`).
    fn remove_dedup_below(&mut self, id: SessionId, below: u64) -> Result<(), StoreError>;
    fn set_applied(&mut self, applied: AppliedState) -> Result<(), StoreError>;
    fn put_lock(&mut self, name: &str, lock: &LockRecord) -> Result<(), StoreError>;
    fn remove_lock(&mut self, name: &str) -> Result<(), StoreError>;
    fn add_session_lock(
        &mut self,
        id: SessionId,
        name: &str,
        acquire_id: u64,
    ) -> Result<(), StoreError>;
    fn remove_session_lock(
        &mut self,
        id: SessionId,
        name: &str,
        acquire_id: u64,
    ) -> Result<(), StoreError>;
    /// Stores the events of one revision.
    fn put_events(&mut self, revision: Revision, events: &[Event]) -> Result<(), StoreError>;
    /// Removes the events of revisions below `below`.
    fn remove_events_below(&mut self, below: Revision) -> Result<(), StoreError>;
}

/// In-memory store with ordered maps: the simulation's and unit tests' state machine.
#[derive(Debug, Default, Clone, PartialEq, Eq)]
pub struct MemStore {
    pub nodes: BTreeMap<(String, String), NodeRecord>,
    pub sessions: BTreeMap<SessionId, SessionRecord>,
    pub ephemerals: BTreeMap<(SessionId, String), ()>,
    pub dedup: BTreeMap<(SessionId, u64), DedupRecord>,
    pub applied: AppliedState,
    pub locks: BTreeMap<String, LockRecord>,
    pub session_locks: BTreeMap<(SessionId, String, u64), ()>,
    pub events: BTreeMap<Revision, Vec<Event>>,
}

impl FsmRead for MemStore {
    fn node(&self, parent: &str, name: &str) -> Result<Option<NodeRecord>, StoreError> {
        Ok(self
            .nodes
            .get(&(parent.to_string(), name.to_string()))
            .cloned())
    }

    fn children(
        &self,
        parent: &str,
        start_after: Option<&str>,
        limit: usize,
    ) -> Result<(Vec<String>, bool), StoreError> {
        use std::ops::Bound;
        let lower = match start_after {
            Some(after) => Bound::Excluded((parent.to_string(), after.to_string())),
            None => Bound::Included((parent.to_string(), String::new())),
        };
        let mut names = Vec::new();
        for ((p, name), _) in self.nodes.range((lower, Bound::Unbounded)) {
            if p != parent {
                break;
            }
            if names.len() == limit {
                return Ok((names, true));
            }
            names.push(name.clone());
        }
        Ok((names, false))
    }

    fn session(&self, id: SessionId) -> Result<Option<SessionRecord>, StoreError> {
        Ok(self.sessions.get(&id).cloned())
    }

    fn ephemerals(&self, id: SessionId) -> Result<Vec<String>, StoreError> {
        Ok(self
            .ephemerals
            .range((id, String::new())..)
            .take_while(|((s, _), _)| *s == id)
            .map(|((_, p), _)| p.clone())
            .collect())
    }

    fn dedup(&self, id: SessionId, seq: u64) -> Result<Option<DedupRecord>, StoreError> {
        Ok(self.dedup.get(&(id, seq)).cloned())
    }

    fn applied(&self) -> Result<AppliedState, StoreError> {
        Ok(self.applied)
    }

    fn lock(&self, name: &str) -> Result<Option<LockRecord>, StoreError> {
        Ok(self.locks.get(name).cloned())
    }

    fn locks(
        &self,
        start_after: Option<&str>,
        limit: usize,
    ) -> Result<(Vec<(String, LockRecord)>, bool), StoreError> {
        use std::ops::Bound;
        let lower = match start_after {
            Some(after) => Bound::Excluded(after.to_string()),
            None => Bound::Unbounded,
        };
        let mut out = Vec::new();
        for (name, lock) in self.locks.range((lower, Bound::Unbounded)) {
            if out.len() == limit {
                return Ok((out, true));
            }
            out.push((name.clone(), lock.clone()));
        }
        Ok((out, false))
    }

    fn session_locks(&self, id: SessionId) -> Result<Vec<(String, u64)>, StoreError> {
        Ok(self
            .session_locks
            .range((id, String::new(), 0)..)
            .take_while(|((s, _, _), _)| *s == id)
            .map(|((_, name, acquire), _)| (name.clone(), *acquire))
            .collect())
    }

    fn events(&self, from: Revision, max_events: usize) -> Result<Vec<Event>, StoreError> {
        let mut out = Vec::new();
        for (_, events) in self.events.range(from..) {
            if out.len() >= max_events {
                break;
            }
            out.extend(events.iter().cloned());
        }
        Ok(out)
    }
}

impl FsmStore for MemStore {
    fn put_node(&mut self, parent: &str, name: &str, node: &NodeRecord) -> Result<(), StoreError> {
        self.nodes
            .insert((parent.to_string(), name.to_string()), node.clone());
        Ok(())
    }

    fn remove_node(&mut self, parent: &str, name: &str) -> Result<(), StoreError> {
        self.nodes.remove(&(parent.to_string(), name.to_string()));
        Ok(())
    }

    fn put_session(&mut self, id: SessionId, session: &SessionRecord) -> Result<(), StoreError> {
        self.sessions.insert(id, session.clone());
        Ok(())
    }

    fn remove_session(&mut self, id: SessionId) -> Result<(), StoreError> {
        self.sessions.remove(&id);
        Ok(())
    }

    fn add_ephemeral(&mut self, id: SessionId, path: &str) -> Result<(), StoreError> {
        self.ephemerals.insert((id, path.to_string()), ());
        Ok(())
    }

    fn remove_ephemeral(&mut self, id: SessionId, path: &str) -> Result<(), StoreError> {
        self.ephemerals.remove(&(id, path.to_string()));
        Ok(())
    }

    fn put_dedup(
        &mut self,
        id: SessionId,
        seq: u64,
        record: &DedupRecord,
    ) -> Result<(), StoreError> {
        self.dedup.insert((id, seq), record.clone());
        Ok(())
    }

    fn remove_dedup_below(&mut self, id: SessionId, below: u64) -> Result<(), StoreError> {
        let doomed: Vec<_> = self
            .dedup
            .range((id, 0)..(id, below))
            .map(|(k, _)| *k)
            .collect();
        for key in doomed {
            self.dedup.remove(&key);
        }
        Ok(())
    }

    fn set_applied(&mut self, applied: AppliedState) -> Result<(), StoreError> {
        self.applied = applied;
        Ok(())
    }

    fn put_lock(&mut self, name: &str, lock: &LockRecord) -> Result<(), StoreError> {
        self.locks.insert(name.to_string(), lock.clone());
        Ok(())
    }

    fn remove_lock(&mut self, name: &str) -> Result<(), StoreError> {
        self.locks.remove(name);
        Ok(())
    }

    fn add_session_lock(
        &mut self,
        id: SessionId,
        name: &str,
        acquire_id: u64,
    ) -> Result<(), StoreError> {
        self.session_locks
            .insert((id, name.to_string(), acquire_id), ());
        Ok(())
    }

    fn remove_session_lock(
        &mut self,
        id: SessionId,
        name: &str,
        acquire_id: u64,
    ) -> Result<(), StoreError> {
        self.session_locks
            .remove(&(id, name.to_string(), acquire_id));
        Ok(())
    }

    fn put_events(&mut self, revision: Revision, events: &[Event]) -> Result<(), StoreError> {
        self.events.insert(revision, events.to_vec());
        Ok(())
    }

    fn remove_events_below(&mut self, below: Revision) -> Result<(), StoreError> {
        self.events = self.events.split_off(&below);
        Ok(())
    }
}
