//! The replicated state machine: namespace, sessions and exactly-once bookkeeping.
//!
//! Pure and deterministic: `apply` takes one committed entry and a store, and returns what
//! happened. It never reads a clock (time arrives as the entry's `time_ms`), never draws
//! random numbers, and never iterates a hash map (DESIGN §3a.2; enforced by clippy's
//! `disallowed_types` here). Every node applying the same entries to the same state reaches
//! the same state. Validation that depends on node configuration (size limits, TTL bounds)
//! happens before proposing, never here.
#![deny(clippy::disallowed_types)]

mod namespace;
mod store;

#[cfg(test)]
mod tests;

use bincode::{Decode, Encode};
use lockd_protocol::{
    Error, ReadOp, Reply, SessionEventKind, SessionGrant, SessionId, SessionSeq, WriteOp,
    SEQ_WINDOW,
};

pub use namespace::{split_path, stat_of};
pub use store::{
    AppliedState, DedupRecord, FsmRead, FsmStore, MemStore, NodeRecord, SessionRecord, StoreError,
};

use crate::raft::{Entry, EntryKind};

/// A state machine command: the payload of a `Command` entry.
#[derive(Encode, Decode, Clone, Debug, PartialEq, Eq)]
pub enum Command {
    /// A namespace write under a session (the implicit one included), exactly once.
    Write { session: SessionSeq, op: WriteOp },
    /// Opens a session whose id will be this entry's index. The terms are already clamped.
    OpenSession {
        ttl_ms: u64,
        tick_ms: u64,
        drift_ppm: u64,
        implicit: bool,
    },
    /// Closes a session.
    CloseSession { session: SessionId },
    /// Ends sessions whose deadline passed on the leader that proposed this entry.
    Expire { sessions: Vec<SessionId> },
}

/// What applying one entry did.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Applied {
    /// Revision the result reflects: the entry's index, or for an answered duplicate the
    /// revision of the first application.
    pub revision: u64,
    /// The answer for the proposer.
    pub result: Result<Reply, Error>,
    /// Sessions that ended in this entry.
    pub ended_sessions: Vec<(SessionId, SessionEventKind)>,
    /// A session opened by this entry, with its terms.
    pub opened_session: Option<SessionGrant>,
}

impl Applied {
    fn reply(revision: u64, result: Result<Reply, Error>) -> Self {
        Applied {
            revision,
            result,
            ended_sessions: Vec::new(),
            opened_session: None,
        }
    }
}

/// Creates the root node if the store is empty. Run once when a store is created.
pub fn bootstrap<S: FsmStore>(store: &mut S) -> Result<(), StoreError> {
    if store.node("", "")?.is_none() {
        store.put_node("", "", &NodeRecord::default())?;
    }
    Ok(())
}

/// Applies one committed entry. An `Err` is a store failure; every client-visible failure is
/// inside `Applied::result`.
pub fn apply<S: FsmStore>(store: &mut S, entry: &Entry) -> Result<Applied, StoreError> {
    let rev = entry.index;
    let applied = match &entry.kind {
        EntryKind::Noop => Applied::reply(rev, Ok(Reply::SessionClosed)),
        EntryKind::Command(command) => apply_command(store, entry, command)?,
    };
    store.set_applied(AppliedState {
        index: rev,
        term: entry.term,
        time_ms: entry.time_ms,
    })?;
    Ok(applied)
}

fn apply_command<S: FsmStore>(
    store: &mut S,
    entry: &Entry,
    command: &Command,
) -> Result<Applied, StoreError> {
    let rev = entry.index;
    match command {
        Command::Write { session, op } => apply_write(store, rev, *session, op),
        Command::OpenSession {
            ttl_ms,
            tick_ms,
            drift_ppm,
            implicit,
        } => {
            let id = SessionId(rev);
            let record = SessionRecord {
                ttl_ms: *ttl_ms,
                tick_ms: *tick_ms,
                drift_ppm: *drift_ppm,
                implicit: *implicit,
                floor: 0,
            };
            store.put_session(id, &record)?;
            let grant = SessionGrant {
                session: id,
                ttl_ms: *ttl_ms,
                tick_ms: *tick_ms,
                drift_ppm: *drift_ppm,
            };
            let mut applied = Applied::reply(rev, Ok(Reply::SessionOpened(grant)));
            applied.opened_session = Some(grant);
            Ok(applied)
        }
        Command::CloseSession { session } => {
            if store.session(*session)?.is_none() {
                return Ok(Applied::reply(rev, Err(missing_session(*session, rev))));
            }
            end_session(store, rev, *session)?;
            let mut applied = Applied::reply(rev, Ok(Reply::SessionClosed));
            applied
                .ended_sessions
                .push((*session, SessionEventKind::Closed));
            Ok(applied)
        }
        Command::Expire { sessions } => {
            let mut applied = Applied::reply(rev, Ok(Reply::SessionClosed));
            // A deposed leader's expiry decision must not apply (DESIGN §3a.5).
            if entry.proposer_term != entry.term {
                return Ok(applied);
            }
            for &session in sessions {
                if store.session(session)?.is_some() {
                    end_session(store, rev, session)?;
                    applied
                        .ended_sessions
                        .push((session, SessionEventKind::Expired));
                }
            }
            Ok(applied)
        }
    }
}

/// The error for a write naming a session that is not live: ids are the index of the entry
/// that opened them, so an id below the current index was issued and has ended.
fn missing_session(session: SessionId, rev: u64) -> Error {
    if session.0 < rev && session.0 > 0 {
        Error::SessionExpired { session }
    } else {
        Error::UnknownSession { session }
    }
}

fn apply_write<S: FsmStore>(
    store: &mut S,
    rev: u64,
    header: SessionSeq,
    op: &WriteOp,
) -> Result<Applied, StoreError> {
    let id = header.session;
    let Some(mut session) = store.session(id)? else {
        return Ok(Applied::reply(rev, Err(missing_session(id, rev))));
    };
    if session.implicit {
        // The server numbers an implicit session's requests and never resends one (a client
        // whose connection is lost gets `Indeterminate`), so no response is kept: skipping
        // the dedup and floor records keeps the common write to three tables.
        let result = namespace::apply_op(store, rev, id, op)?.map(Reply::Write);
        return Ok(Applied::reply(rev, result));
    }
    if header.floor > session.floor {
        store.remove_dedup_below(id, header.floor)?;
        session.floor = header.floor;
        store.put_session(id, &session)?;
    }
    let floor = session.floor;
    if header.seq < floor {
        let stale = Error::StaleRequest {
            session: id,
            seq: header.seq,
            floor,
        };
        return Ok(Applied::reply(rev, Err(stale)));
    }
    if header.seq >= floor.saturating_add(SEQ_WINDOW) {
        let beyond = Error::SeqOutOfWindow {
            session: id,
            seq: header.seq,
            floor,
            window: SEQ_WINDOW,
        };
        return Ok(Applied::reply(rev, Err(beyond)));
    }
    // Duplicates are answered before any version check (§3a.7).
    if let Some(first) = store.dedup(id, header.seq)? {
        return Ok(Applied::reply(first.revision, first.result));
    }
    let result = namespace::apply_op(store, rev, id, op)?.map(Reply::Write);
    store.put_dedup(
        id,
        header.seq,
        &DedupRecord {
            revision: rev,
            result: result.clone(),
        },
    )?;
    Ok(Applied::reply(rev, result))
}

/// Deletes a session's ephemeral nodes, forgets its responses, removes it.
fn end_session<S: FsmStore>(store: &mut S, rev: u64, session: SessionId) -> Result<(), StoreError> {
    for path in store.ephemerals(session)? {
        namespace::delete_ephemeral(store, rev, session, &path)?;
    }
    store.remove_dedup_below(session, u64::MAX)?;
    store.remove_session(session)
}

/// Serves a read from the applied state.
pub fn read<S: FsmRead>(
    store: &S,
    op: &ReadOp,
    max_children: usize,
) -> Result<Result<Reply, Error>, StoreError> {
    namespace::read(store, op, max_children)
}
