//! The output side of the core: [`Ready`] (what the driver must persist, send and apply)
//! and `advance` (the driver reports it done). The contract is in the docs of [`super`].

use super::core::{Raft, ReadState, Role};
use super::membership::Configuration;
use super::message::{HardState, Message, Snapshot};
use super::storage::Storage;
use super::Entry;

/// Role and leader, for the driver's bookkeeping (not persisted).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct SoftState {
    /// Role of the core.
    pub role: Role,
    /// Leader known for the current term.
    pub leader: Option<u64>,
    /// Current term.
    pub term: u64,
}

/// One batch of work for the driver; see the contract in [`super`].
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Ready {
    /// Role, leader and term now.
    pub soft_state: SoftState,
    /// Hard state to persist, if it changed.
    pub hard_state: Option<HardState>,
    /// Entries to persist, replacing any stored entries at or after the first one's index.
    pub entries: Vec<Entry>,
    /// A snapshot to install (state machine and log) before anything else of this Ready.
    pub snapshot: Option<Snapshot>,
    /// Messages that may be sent at once, before persisting: only the leader's own appends
    /// (§10.2.1).
    pub early_messages: Vec<Message>,
    /// Messages to send only once `hard_state`, `entries` and `snapshot` are durable.
    pub messages: Vec<Message>,
    /// Committed entries to apply, in order (they may include entries of `entries`: apply
    /// after persisting).
    pub committed_entries: Vec<Entry>,
    /// Reads whose index is known: serve each once applied ≥ its index.
    pub read_states: Vec<ReadState>,
    /// The configuration in force, if it changed since the previous Ready (a change was
    /// appended, truncated away, or came with a snapshot). The driver adds new members to its
    /// peer transport before sending this Ready's messages and drops removed ones after.
    /// At startup it reads [`Raft::conf`] instead.
    pub conf: Option<Configuration>,
    /// (index, term) of the last entry in `entries`, for `advance`.
    last_entry: Option<(u64, u64)>,
}

impl<S: Storage> Raft<S> {
    /// Whether a Ready has anything in it.
    pub fn has_ready(&self) -> bool {
        let hs = self.hard_state();
        hs != self.prev_hs
            || !self.log.unstable_entries().is_empty()
            || self.log.pending_snapshot().is_some()
            || !self.msgs.is_empty()
            || !self.msgs_early.is_empty()
            || !self.read_states.is_empty()
            || self.conf_dirty
            || (self.role == Role::Leader && self.bcast_pending)
            || (self.log.pending_snapshot().is_none() && self.log.committed > self.log.applied)
    }

    /// The hard state as it is now.
    pub fn hard_state(&self) -> HardState {
        HardState {
            term: self.term,
            vote: self.vote,
            commit: self.log.committed,
        }
    }

    /// Collects the work to do. Call `advance` with it before calling `ready` again.
    pub fn ready(&mut self) -> Ready {
        self.flush_appends();
        // Committed configuration entries are never truncated: stop tracking them, and stop
        // replicating to the members they removed (the appends just flushed told them the
        // commit index when they could).
        self.conf_log.fold_committed(self.log.committed);
        if self.pending_conf_index().is_none() {
            self.tracker.prune();
        }
        let conf = std::mem::take(&mut self.conf_dirty).then(|| self.tracker.conf.clone());
        let hs = self.hard_state();
        let hard_state = (hs != self.prev_hs).then_some(hs);
        self.prev_hs = hs;
        let entries = self.log.unstable_entries().to_vec();
        let last_entry = entries.last().map(|e| (e.index, e.term));
        Ready {
            soft_state: SoftState {
                role: self.role,
                leader: self.leader,
                term: self.term,
            },
            hard_state,
            entries,
            snapshot: self.log.pending_snapshot().cloned(),
            early_messages: std::mem::take(&mut self.msgs_early),
            messages: std::mem::take(&mut self.msgs),
            committed_entries: self.log.next_committed_entries(self.cfg.max_apply_bytes),
            read_states: std::mem::take(&mut self.read_states),
            conf,
            last_entry,
        }
    }

    /// Reports a Ready done: its snapshot installed, its hard state and entries durable,
    /// its committed entries applied. The leader now counts its own log as durable up to
    /// the Ready's last entry, which may advance commit (seen in the next Ready).
    pub fn advance(&mut self, ready: &Ready) {
        if let Some(s) = &ready.snapshot {
            self.log.stable_snapshot_to(s.meta.index);
        }
        if let Some((index, term)) = ready.last_entry {
            self.log.stable_to(index, term);
        }
        if let Some(e) = ready.committed_entries.last() {
            self.log.applied_to(e.index);
        }
        if self.role == Role::Leader {
            let stable = self.log.stable_last();
            let id = self.id;
            if let Some(p) = self.tracker.progress.get_mut(&id) {
                if p.maybe_update(stable) {
                    self.maybe_commit();
                }
            }
        }
    }
}
