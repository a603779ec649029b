//! A Ready's storage, answers and publishing: the half of the loop ([`Driver`]) that runs
//! after the core hands out work. Writes go to storage in the order the Ready contract of
//! [`crate::raft`] allows; replies and events go out only for entries committed and applied
//! here.
//!
//! What this module must not do: send a Ready's `messages` before its writes are durable;
//! answer a proposal whose index another term's entry took.

use std::sync::atomic::Ordering;
use std::sync::Arc;

use lockd_protocol::Error;

use super::{Driver, Published};
use crate::fsm::Applied;
use crate::node::replicated::SessionEnded;
use crate::raft::{Message, Ready, Role};
use crate::storage::{PersistInput, StorageError};

/// The order of a Ready's storage writes; see [`Driver::persist_order`].
enum PersistOrder {
    Together,
    ApplyFirst,
    LogFirst,
}

impl Driver {
    /// One Ready, in the order of the contract in [`crate::raft`].
    pub(super) fn handle_ready(&mut self) -> Result<(), StorageError> {
        let mut ready = self.raft.ready();
        if ready.conf.is_some() {
            // New members must be reachable before this Ready's messages to them go out,
            // and a status answer must not show entries applied under a configuration older
            // than theirs.
            self.publish_conf();
        }
        let early = std::mem::take(&mut ready.early_messages);
        if !early.is_empty() {
            self.outbox.send(early);
        }
        let messages = std::mem::take(&mut ready.messages);
        let whole = PersistInput::from_ready(&ready);
        let log_part = PersistInput {
            committed: &[],
            ..whole
        };
        let apply_part = PersistInput {
            committed: &ready.committed_entries,
            ..PersistInput::default()
        };
        match self.persist_order(&ready) {
            PersistOrder::Together => {
                let outcomes = self.raft.store_mut().persist(whole)?;
                self.send_after_persist(messages);
                self.finish_apply(&ready, outcomes)?;
            }
            PersistOrder::ApplyFirst => {
                let outcomes = self.raft.store_mut().persist(apply_part)?;
                self.finish_apply(&ready, outcomes)?;
                self.raft.store_mut().persist(log_part)?;
                self.send_after_persist(messages);
            }
            PersistOrder::LogFirst => {
                self.raft.store_mut().persist(log_part)?;
                self.send_after_persist(messages);
                let outcomes = self.raft.store_mut().persist(apply_part)?;
                self.finish_apply(&ready, outcomes)?;
            }
        }
        for rs in std::mem::take(&mut ready.read_states) {
            if let Some((_, waiting)) = self.asked.remove(&rs.ctx) {
                self.indexed.push((rs.index, waiting));
            }
        }
        self.raft.advance(&ready);
        let applied = self.raft.applied();
        self.publish
            .status
            .applied
            .store(applied, Ordering::Release);
        // Proposals at or below the applied index that were not answered above either lost
        // their index to another term's entry, or had it covered by an installed snapshot.
        while let Some(entry) = self.proposals.first_entry() {
            if *entry.key() > applied {
                break;
            }
            let pending = entry.remove();
            let error = if ready.snapshot.is_some() {
                Error::Indeterminate("entry covered by an installed snapshot".into())
            } else {
                self.not_leader()
            };
            let _ = pending.reply.send(Err(error));
        }
        self.serve_indexed(applied);
        Ok(())
    }

    /// In which order a Ready's log writes and its applying go to storage. Both in one
    /// transaction is the fewest commits, but then the applied entries' answers wait for
    /// the fsync of the new entries. Committed entries all below the Ready's first new entry
    /// were made durable by earlier Readies (each handled to the end before the next; this
    /// holds for a leader removed from the configuration too, which commits without counting
    /// itself), so a leader applies them first without fsync and answers, then makes the new
    /// entries durable; a follower makes the new entries durable
    /// first and acknowledges them, since the leader's commit waits on that, then applies.
    /// A snapshot, or a single voter (whose entries commit as soon as they are durable),
    /// keeps one transaction.
    fn persist_order(&self, ready: &Ready) -> PersistOrder {
        let split = ready.snapshot.is_none()
            && !ready.entries.is_empty()
            && !ready.committed_entries.is_empty()
            && self.raft.conf().voters.len() > 1;
        if !split {
            return PersistOrder::Together;
        }
        let first_new = ready.entries.first().map_or(u64::MAX, |e| e.index);
        let all_durable = ready.committed_entries.iter().all(|e| e.index < first_new);
        if self.raft.role() == Role::Leader && all_durable {
            PersistOrder::ApplyFirst
        } else {
            PersistOrder::LogFirst
        }
    }

    /// Sends the Ready's messages that wait for its writes to be durable.
    fn send_after_persist(&self, messages: Vec<Message>) {
        if !messages.is_empty() {
            self.outbox.send(messages);
        }
    }

    /// After a Ready's committed entries applied: activates a leadership whose own-term entry
    /// applied, publishes the entries' events and the new indexes, answers their proposers.
    fn finish_apply(
        &mut self,
        ready: &Ready,
        outcomes: Vec<(u64, Applied)>,
    ) -> Result<(), StorageError> {
        let term = self.raft.term();
        let own_term_applied = ready.committed_entries.iter().any(|e| e.term == term);
        if self.raft.role() == Role::Leader
            && own_term_applied
            && self.duties.active_term() != Some(term)
        {
            self.activate(term)?;
        }
        let mut events = Vec::new();
        let mut answers = Vec::new();
        let mut last_revision = None;
        for (index, mut applied) in outcomes {
            last_revision = Some(index);
            events.append(&mut applied.events);
            // Committed entries are in index order: no scan per outcome on the hot path.
            let entry_term = ready
                .committed_entries
                .binary_search_by_key(&index, |e| e.index)
                .ok()
                .map(|i| ready.committed_entries[i].term);
            let ours = match self.proposals.remove(&index) {
                Some(p) if Some(p.term) == entry_term => Some(p),
                Some(other) => {
                    // Another term's entry took this proposal's index: it never applied.
                    answers.push((other.reply, Err(self.not_leader())));
                    None
                }
                None => None,
            };
            self.track_sessions(&applied, ours.as_ref().is_some_and(|p| p.implicit_open));
            for timer in std::mem::take(&mut applied.lock_timers) {
                self.duties.add_lock_timer(timer);
            }
            if let Some(p) = ours {
                answers.push((p.reply, Ok(applied)));
            }
        }
        if ready.snapshot.is_some() {
            let reset = Published {
                events: Vec::new(),
                reset: true,
            };
            let _ = self.publish.watch_events.send(Arc::new(reset));
        }
        if !events.is_empty() {
            let published = Published {
                events,
                reset: false,
            };
            let _ = self.publish.watch_events.send(Arc::new(published));
        }
        if let Some(index) = last_revision {
            // Commit first: a status read between the two never shows applied > commit.
            let commit = self.raft.commit().max(index);
            self.publish.status.commit.store(commit, Ordering::Release);
            self.publish.status.applied.store(index, Ordering::Release);
        }
        for (reply, answer) in answers {
            let _ = reply.send(answer);
        }
        Ok(())
    }

    /// Keeps the leader's deadlines, this node's pins and the session-end broadcast in step
    /// with an applied entry.
    fn track_sessions(&mut self, applied: &Applied, implicit_here: bool) {
        if let Some(grant) = &applied.opened_session {
            if implicit_here {
                self.pinned.insert(grant.session);
            }
            self.duties
                .opened(grant.session, grant.ttl_ms, implicit_here);
        }
        for &(session, kind) in &applied.ended_sessions {
            self.duties.ended(session);
            self.pinned.remove(&session);
            let _ = self.publish.session_events.send(SessionEnded {
                session,
                revision: applied.revision,
                kind,
            });
        }
    }

    /// Starts this leadership's duties: fresh full TTLs for every session, lock timers from
    /// the applied state.
    fn activate(&mut self, term: u64) -> Result<(), StorageError> {
        let recovered = self.raft.store().storage().recover()?;
        let now_ms = self.entry_time_ms();
        self.duties.activate(
            term,
            now_ms,
            &recovered.sessions,
            &self.pinned,
            recovered.lock_timers,
        );
        self.publish
            .status
            .active_term
            .store(term, Ordering::Release);
        Ok(())
    }
}
