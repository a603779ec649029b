//! The loop's side of membership (DESIGN §3a.8-9): configuration changes proposed for
//! operators, leader transfers and their answers, and keeping the peer transport and the
//! published configuration in step with the configuration in force.
//!
//! The rules themselves (one change at a time, only after a commit in the term, promotion
//! only when caught up, removing the leader, aborting a transfer) live in the pure core
//! (`raft/membership.rs`, `raft/transfer.rs`); this module only feeds it and reports.

use std::sync::atomic::Ordering;
use std::sync::PoisonError;
use std::time::{Duration, Instant};

use lockd_protocol::Error;

use super::{Driver, Pending};
use crate::node::replicated::{ProposalReply, TransferReply};
use crate::raft::{ConfChange, ConfChangeError, Role, TransferError};

/// A leader transfer this node started, waiting for its outcome.
#[derive(Debug)]
pub(super) struct Transfer {
    to: u64,
    deadline: Instant,
    reply: TransferReply,
}

/// What a refused change means to a client: a wrong request, or "not now, retry".
fn conf_error(e: ConfChangeError) -> Error {
    match e {
        ConfChangeError::NotLeader { leader_hint } => Error::NotLeader { leader_hint },
        ConfChangeError::NoCommitInTerm
        | ConfChangeError::ChangeInProgress
        | ConfChangeError::TransferInProgress => Error::Unavailable(e.to_string()),
        other => Error::MembershipRefused(other.to_string()),
    }
}

impl Driver {
    /// Proposes a configuration change; it is answered when its entry applies.
    pub(super) fn change_members(&mut self, change: ConfChange, reply: ProposalReply) {
        let time_ms = self.entry_time_ms();
        let term = self.raft.term();
        match self.raft.propose_conf_change(change, term, time_ms) {
            Ok(index) => {
                let pending = Pending {
                    term,
                    reply,
                    implicit_open: false,
                };
                if let Some(old) = self.proposals.insert(index, pending) {
                    let _ = old.reply.send(Err(self.not_leader()));
                }
            }
            Err(e) => {
                let _ = reply.send(Err(conf_error(e)));
            }
        }
    }

    /// Starts a leader transfer to `to`.
    pub(super) fn start_transfer(&mut self, to: u64, reply: TransferReply) {
        if self.transfer.is_some() {
            let _ = reply.send(Err(Error::Unavailable(
                "a leader transfer is in progress".into(),
            )));
            return;
        }
        match self.raft.transfer_leader(to) {
            Ok(()) => {
                // The core aborts after an election timeout; wait a little longer for the
                // target's election to show.
                let patience = self.config.tick * self.config.raft.election_tick * 3;
                self.transfer = Some(Transfer {
                    to,
                    deadline: Instant::now() + patience.max(Duration::from_millis(100)),
                    reply,
                });
            }
            Err(TransferError::NotLeader { leader_hint }) => {
                let _ = reply.send(Err(Error::NotLeader { leader_hint }));
            }
            Err(TransferError::InProgress { target }) => {
                let _ = reply.send(Err(Error::Unavailable(format!(
                    "a leader transfer to {target} is in progress"
                ))));
            }
            Err(e) => {
                let _ = reply.send(Err(Error::MembershipRefused(e.to_string())));
            }
        }
    }

    /// Answers a finished transfer, and follows configuration changes: the transport, the
    /// published configuration, and whether this node was removed.
    pub(super) fn after_membership(&mut self) {
        if let Some(t) = self.transfer.take() {
            let leader = self.raft.leader();
            let outcome = if leader == Some(t.to) && self.raft.role() != Role::Leader {
                Some(Ok(()))
            } else if self.raft.role() == Role::Leader && self.raft.transferee().is_none() {
                Some(Err(Error::Unavailable(format!(
                    "leader transfer to {} aborted: it did not win an election in time",
                    t.to
                ))))
            } else if Instant::now() >= t.deadline {
                Some(Err(Error::Unavailable(format!(
                    "leader transfer to {} did not finish in time (leader now {leader:?})",
                    t.to
                ))))
            } else {
                None
            };
            match outcome {
                Some(answer) => {
                    let _ = t.reply.send(answer);
                }
                None => self.transfer = Some(t),
            }
        }
        self.publish_conf();
        let me = self.raft.id();
        if self.raft.conf().contains(me) {
            self.was_member = true;
        } else if self.was_member
            && self.raft.pending_conf_index().is_none()
            && !self.publish.status.removed.swap(true, Ordering::AcqRel)
        {
            tracing::warn!(
                node = me,
                "removed from the cluster: no longer serving clients"
            );
            // This node will not learn how its pending proposals end.
            for (_, p) in std::mem::take(&mut self.proposals) {
                let _ = p.reply.send(Err(Error::Indeterminate(format!(
                    "node {me} was removed from the cluster with this write in flight"
                ))));
            }
        }
    }

    /// Publishes the configuration in force (for status answers) if it changed, and points
    /// the transport at its members.
    pub(super) fn publish_conf(&mut self) {
        let conf = self.raft.conf().clone();
        let changed = {
            let mut published = self
                .publish
                .conf
                .lock()
                .unwrap_or_else(PoisonError::into_inner);
            let changed = *published != conf;
            if changed {
                *published = conf.clone();
            }
            changed
        };
        if changed {
            tracing::info!(
                voters = ?conf.voters,
                learners = ?conf.learners,
                "configuration in force"
            );
            self.reach_members();
        }
    }

    /// Points the transport at the members of the configuration in force, and at members
    /// removed from it: the core keeps sending a removed member heartbeats (with the commit
    /// index) until its next change, which is how that member learns it was removed. A
    /// removed member stays reachable here until it is added back (harmless: the core sends
    /// it nothing once it forgot it).
    pub(super) fn reach_members(&mut self) {
        let conf = self.raft.conf().clone();
        if !self.reached.members.is_empty() {
            // A member that joins again (removed, maybe wiped, added back): what it told in
            // handshakes before must not become its recorded identity (DESIGN §3a.9). Not at
            // start-up, when every member is new here and its handshake is current.
            for id in conf.ids().filter(|&id| !self.reached.contains(id)) {
                self.outbox.forget_identity(id);
            }
        }
        for (&id, info) in &self.reached.members {
            if !conf.contains(id) {
                self.departing.insert(id, info.clone());
            }
        }
        self.departing.retain(|id, _| !conf.contains(*id));
        let mut reach = conf.clone();
        for (&id, info) in &self.departing {
            reach.learners.insert(id);
            reach.members.insert(id, info.clone());
        }
        self.outbox.set_members(&reach);
        self.reached = conf;
    }

    /// On the active leader, once per tick: records in the configuration the incarnation a
    /// member presented in its handshake, if none is recorded yet (one change at a time).
    /// From then on its peers refuse any other incarnation under that id: a wiped member
    /// cannot rejoin under its old id (DESIGN §3a.9).
    pub(super) fn identify_members(&mut self) {
        if self.raft.role() != Role::Leader
            || self.duties.active_term() != Some(self.raft.term())
            || self.raft.pending_conf_index().is_some()
            || self.raft.transferee().is_some()
        {
            return;
        }
        let conf = self.raft.conf();
        let known = self.outbox.peer_identities();
        let unrecorded = conf.ids().find_map(|id| {
            let recorded = conf.member(id).and_then(|m| m.incarnation);
            match (recorded, known.get(&id)) {
                (None, Some((incarnation, client_addr))) => Some(ConfChange::Identify {
                    id,
                    incarnation: *incarnation,
                    client_addr: client_addr.clone(),
                }),
                _ => None,
            }
        });
        if let Some(change) = unrecorded {
            let (time_ms, term) = (self.entry_time_ms(), self.raft.term());
            if let Err(e) = self.raft.propose_conf_change(change, term, time_ms) {
                tracing::debug!(error = %e, "could not record a member's incarnation");
            }
        }
    }

    /// Fails the transfer in progress (the loop stops).
    pub(super) fn fail_transfer(&mut self, error: &Error) {
        if let Some(t) = self.transfer.take() {
            let _ = t.reply.send(Err(error.clone()));
        }
    }
}
