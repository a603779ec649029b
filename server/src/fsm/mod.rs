//! The replicated state machine: namespace, sessions and exactly-once bookkeeping.
//!
//! Pure and deterministic: `apply` takes one committed entry and a store, and returns what
//! happened. It never reads a clock (time arrives as the entry's `time_ms`), never draws
//! random numbers, and never iterates a hash map (DESIGN §3a.2; enforced by clippy's
//! `disallowed_types` here). Every node applying the same entries to the same state reaches
//! the same state. Validation that depends on node configuration (size limits, TTL bounds)
//! happens before proposing, never here.
#![deny(clippy::disallowed_types)]

pub mod locks;
mod namespace;
mod store;

#[cfg(test)]
mod tests;

use bincode::{Decode, Encode};
use lockd_protocol::{
    Error, Event, EventKind, Fence, LockInfo, ReadOp, Reply, SessionEventKind, SessionGrant,
    SessionId, SessionSeq, WriteOp, SEQ_WINDOW,
};

pub use locks::LockTimer;
pub use namespace::{split_path, stat_of};
pub use store::{
    AppliedState, DedupRecord, FsmRead, FsmStore, LockRecord, MemStore, NodeRecord, SessionRecord,
    StoreError,
};

/// The session of writes made without one that create nothing owned (no ephemeral node, no
/// acquire): they need no session entry, no keepalive and no dedup record. Never issued as a
/// real session (ids are log indexes, which start at 1); clients cannot name it.
pub const ANONYMOUS: SessionId = SessionId(0);

/// Whether an operation creates something a session must own (an ephemeral node, a lock
/// grant or wait), so that it cannot run anonymously.
pub fn needs_owner(op: &WriteOp) -> bool {
    match op {
        WriteOp::Create(c) => c.ephemeral,
        WriteOp::Multi(ops) => ops
            .iter()
            .any(|op| matches!(op, lockd_protocol::MultiOp::Create(c) if c.ephemeral)),
        WriteOp::Acquire(_) => true,
        WriteOp::Set(_) | WriteOp::Delete(_) | WriteOp::Release(_) | WriteOp::Cancel(_) => false,
    }
}

/// Revisions of event history kept for watches; older ones are compacted in the same
/// deterministic way on every node.
pub const EVENT_HISTORY_REVISIONS: u64 = 10_000;
/// History is compacted in steps of this many revisions.
const HISTORY_COMPACTION_STEP: u64 = 64;

use crate::raft::{Entry, EntryKind};

/// A state machine command: the payload of a `Command` entry.
#[derive(Encode, Decode, Clone, Debug, PartialEq, Eq)]
pub enum Command {
    /// A namespace or lock write under a session (the implicit one included), exactly once;
    /// with a fence, applied only while that lock is held under that token.
    Write {
        session: SessionSeq,
        op: WriteOp,
        fence: Option<Fence>,
    },
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
    /// Ends a lock's delay if the entry time has reached it (leader-proposed).
    EndLockDelay { lock: String },
    /// Ends waits whose deadline the entry time has reached (leader-proposed).
    ExpireWaiters { lock: String, acquire_ids: Vec<u64> },
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
    /// The watch events of this entry (all of its revision), as stored in the history.
    pub events: Vec<Event>,
    /// Lock deadlines the leader must act on.
    pub lock_timers: Vec<LockTimer>,
}

impl Applied {
    fn reply(revision: u64, result: Result<Reply, Error>) -> Self {
        Applied {
            revision,
            result,
            ended_sessions: Vec::new(),
            opened_session: None,
            events: Vec::new(),
            lock_timers: Vec::new(),
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
    let mut fx = locks::LockEffects::default();
    let mut applied = match &entry.kind {
        // Noop and Expire answer nobody; the result is a placeholder. A configuration entry
        // changes nothing here (the consensus core and the Raft store keep the
        // configuration): it only advances the applied index, as a no-op does.
        EntryKind::Noop | EntryKind::Config(_) => Applied::reply(rev, Ok(Reply::SessionClosed)),
        EntryKind::Command(command) => apply_command(store, entry, command, &mut fx)?,
    };
    let previous = store.applied()?;
    if !fx.events.is_empty() {
        applied.events = fx
            .events
            .into_iter()
            .map(|kind| Event {
                revision: rev,
                kind,
            })
            .collect();
        store.put_events(rev, &applied.events)?;
    }
    applied.lock_timers = fx.timers;
    // Deterministic compaction of the event history: every node keeps the same revisions.
    let mut history_from = previous.history_from;
    let keep_from = rev.saturating_sub(EVENT_HISTORY_REVISIONS);
    if keep_from >= history_from + HISTORY_COMPACTION_STEP {
        store.remove_events_below(keep_from)?;
        history_from = keep_from;
    }
    store.set_applied(AppliedState {
        index: rev,
        term: entry.term,
        time_ms: entry.time_ms,
        history_from,
    })?;
    Ok(applied)
}

fn apply_command<S: FsmStore>(
    store: &mut S,
    entry: &Entry,
    command: &Command,
    fx: &mut locks::LockEffects,
) -> Result<Applied, StoreError> {
    let rev = entry.index;
    match command {
        Command::Write { session, op, fence } => {
            apply_write(store, entry, *session, op, fence.as_ref(), fx)
        }
        Command::EndLockDelay { lock } => {
            locks::end_delay(store, rev, entry.time_ms, lock, fx)?;
            Ok(Applied::reply(rev, Ok(Reply::SessionClosed)))
        }
        Command::ExpireWaiters { lock, acquire_ids } => {
            locks::expire_waiters(store, entry.time_ms, lock, acquire_ids, fx)?;
            Ok(Applied::reply(rev, Ok(Reply::SessionClosed)))
        }
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
            end_session(store, rev, entry.time_ms, *session, false, fx)?;
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
                    end_session(store, rev, entry.time_ms, session, true, fx)?;
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
    entry: &Entry,
    header: SessionSeq,
    op: &WriteOp,
    fence: Option<&Fence>,
    fx: &mut locks::LockEffects,
) -> Result<Applied, StoreError> {
    let rev = entry.index;
    let id = header.session;
    if id == ANONYMOUS {
        // A session-less write that owns nothing: nobody retries it, nothing is kept.
        if needs_owner(op) {
            return Ok(Applied::reply(
                rev,
                Err(Error::UnknownSession { session: id }),
            ));
        }
        let result = apply_op(store, entry, id, op, fence, fx)?;
        return Ok(Applied::reply(rev, result));
    }
    let Some(mut session) = store.session(id)? else {
        return Ok(Applied::reply(rev, Err(missing_session(id, rev))));
    };
    if session.implicit {
        // The server numbers an implicit session's requests and never resends one (a client
        // whose connection is lost gets `Indeterminate`), so no response is kept: skipping
        // the dedup and floor records keeps the common write to three tables.
        let result = apply_op(store, entry, id, op, fence, fx)?;
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
    let result = apply_op(store, entry, id, op, fence, fx)?;
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

/// Checks the fence, then applies a namespace or lock operation.
fn apply_op<S: FsmStore>(
    store: &mut S,
    entry: &Entry,
    session: SessionId,
    op: &WriteOp,
    fence: Option<&Fence>,
    fx: &mut locks::LockEffects,
) -> Result<Result<Reply, Error>, StoreError> {
    let rev = entry.index;
    if let Some(fence) = fence {
        if !locks::holds(store, &fence.lock, fence.token)? {
            return Ok(Err(Error::FencingRejected {
                lock: fence.lock.clone(),
                token: fence.token,
            }));
        }
    }
    let result = match op {
        WriteOp::Acquire(a) => locks::acquire(store, rev, entry.time_ms, session, a, fx)?,
        WriteOp::Release(r) => locks::release(store, rev, r, fx)?,
        WriteOp::Cancel(c) => locks::cancel(store, rev, c, fx)?,
        _ => namespace::apply_op(store, rev, session, op, &mut fx.events)?,
    };
    Ok(result.map(Reply::Write))
}

/// Deletes a session's ephemeral nodes, ends its grants and waits, forgets its responses,
/// removes it: all in the one entry that ends it.
fn end_session<S: FsmStore>(
    store: &mut S,
    rev: u64,
    time_ms: u64,
    session: SessionId,
    expired: bool,
    fx: &mut locks::LockEffects,
) -> Result<(), StoreError> {
    for path in store.ephemerals(session)? {
        fx.events
            .extend(namespace::delete_ephemeral(store, rev, session, &path)?);
    }
    locks::end_session(store, rev, time_ms, session, expired, fx)?;
    fx.events.push(EventKind::SessionEnded { session, expired });
    store.remove_dedup_below(session, u64::MAX)?;
    store.remove_session(session)
}

/// Serves a read from the applied state.
pub fn read<S: FsmRead>(
    store: &S,
    op: &ReadOp,
    max_children: usize,
) -> Result<Result<Reply, Error>, StoreError> {
    match op {
        ReadOp::Lock { name } => {
            if let Err(e) = locks::validate_name(name) {
                return Ok(Err(e));
            }
            let lock = store.lock(name)?.unwrap_or_default();
            Ok(Ok(Reply::Lock(lock_info(name.clone(), lock))))
        }
        ReadOp::Locks { start_after, limit } => {
            let limit = if *limit == 0 {
                1000
            } else {
                (*limit as usize).min(max_children)
            };
            let (locks, more) = store.locks(start_after.as_deref(), limit)?;
            let locks = locks
                .into_iter()
                .map(|(name, lock)| lock_info(name, lock))
                .collect();
            Ok(Ok(Reply::Locks { locks, more }))
        }
        _ => namespace::read(store, op, max_children),
    }
}

fn lock_info(name: String, lock: LockRecord) -> LockInfo {
    LockInfo {
        name,
        holder: lock.holder,
        waiters: lock.waiters,
        lock_delay_ms: lock.lock_delay_ms,
        delayed_until_ms: lock.delayed_until_ms,
    }
}
