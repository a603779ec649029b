//! Leader transfer (dissertation §3.10). The leader stops taking proposals and configuration
//! changes, brings the target's log up to date, and sends it TimeoutNow; the target then
//! campaigns at once in a new term, bypassing pre-vote, and its vote requests carry the
//! `transfer` flag so voters grant them even while they have a leader (check-quorum
//! stickiness, §4.2.3). If the target has not taken over within an election timeout the
//! leader aborts the transfer and takes proposals again. A transfer also ends when the leader
//! steps down (it saw the target's higher term) or the target stops being a voter.

use tracing::debug;

use super::core::{Raft, Role};
use super::message::MessageKind;
use super::storage::Storage;

/// Why a leader transfer could not start.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum TransferError {
    /// Only the leader transfers leadership; the hint is the leader this node knows.
    #[error("not leader (leader hint {leader_hint:?})")]
    NotLeader {
        /// The current leader as far as this node knows.
        leader_hint: Option<u64>,
    },
    /// The leader is the target.
    #[error("node {id} is already the leader")]
    ToSelf {
        /// This node.
        id: u64,
    },
    /// The target must be a voter.
    #[error("node {id} is not a voter")]
    NotVoter {
        /// The target.
        id: u64,
    },
    /// Another transfer is under way.
    #[error("a transfer to node {target} is in progress")]
    InProgress {
        /// Its target.
        target: u64,
    },
}

impl<S: Storage> Raft<S> {
    /// Starts handing leadership to voter `target` (§3.10). Proposals and configuration
    /// changes are refused (`TransferInProgress`) until the transfer ends: the target wins an
    /// election (this node then steps down on its higher term), or an election timeout passes
    /// and the transfer is aborted.
    pub fn transfer_leader(&mut self, target: u64) -> Result<(), TransferError> {
        if self.role != Role::Leader {
            return Err(TransferError::NotLeader {
                leader_hint: self.leader,
            });
        }
        if target == self.id {
            return Err(TransferError::ToSelf { id: target });
        }
        if !self.tracker.conf.voters.contains(&target) {
            return Err(TransferError::NotVoter { id: target });
        }
        if let Some(t) = self.transferee {
            return Err(TransferError::InProgress { target: t });
        }
        debug!(id = self.id, term = self.term, target, "leader transfer");
        self.transferee = Some(target);
        self.transfer_elapsed = 0;
        if !self.maybe_send_timeout_now(target) {
            // Catch the target up first; TimeoutNow follows its acknowledgement.
            self.bcast_pending = true;
        }
        Ok(())
    }

    /// The target of the leader transfer in progress, if any.
    pub fn transferee(&self) -> Option<u64> {
        self.transferee
    }

    /// Sends TimeoutNow to `from` if it is the transfer target and holds the whole log.
    /// Returns whether it was sent. Sent again on later acknowledgements while the transfer
    /// lasts (a lost TimeoutNow is retried; a duplicate reaches a target whose term moved on
    /// and is dropped as stale).
    pub(super) fn maybe_send_timeout_now(&mut self, from: u64) -> bool {
        if self.transferee != Some(from) || self.progress_of(from) != Some(self.log.last_index()) {
            return false;
        }
        self.send(from, MessageKind::TimeoutNow);
        true
    }

    /// Counts a leader tick against the transfer; aborts it after an election timeout.
    pub(super) fn tick_transfer(&mut self) {
        if self.transferee.is_none() {
            return;
        }
        self.transfer_elapsed += 1;
        if self.transfer_elapsed >= self.cfg.election_tick {
            debug!(id = self.id, term = self.term, "leader transfer timed out");
            self.abort_transfer();
        }
    }

    /// Ends the transfer in progress: proposals are taken again.
    pub(super) fn abort_transfer(&mut self) {
        self.transferee = None;
        self.transfer_elapsed = 0;
    }
}
