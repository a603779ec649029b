//! Batched ReadIndex (§6.4) on the leader. Read requests (local or forwarded by followers)
//! wait in a batch; one heartbeat round at a time confirms leadership for a whole batch: the
//! round records the commit index when it starts, and once a quorum of voters has answered a
//! heartbeat carrying the round id, every request of the batch gets that index. Requests that
//! arrive while a round is in flight join the next round. No IO, no clock.

use std::collections::BTreeSet;

/// One read request.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ReadRequest {
    /// Caller's context, echoed in the ReadState.
    pub ctx: u64,
    /// Who asked: this node's id for a local request, else the follower to answer.
    pub from: u64,
}

/// A heartbeat round confirming leadership for a batch of reads.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ReadRound {
    /// Round id carried by heartbeats; increasing, never 0.
    pub id: u64,
    /// Commit index when the round started: the read index of every request in it.
    pub index: u64,
    /// The batch.
    pub requests: Vec<ReadRequest>,
    /// Members that answered a heartbeat of this round (the leader included).
    pub acks: BTreeSet<u64>,
}

/// Pending reads of a leader.
#[derive(Debug, Clone, Default)]
pub struct ReadOnly {
    /// Last round id handed out.
    last_id: u64,
    /// The round in flight, if any. Invariant: at most one.
    pub(super) round: Option<ReadRound>,
    /// Requests waiting for the next round (or for the leader's first commit in its term).
    waiting: Vec<ReadRequest>,
}

impl ReadOnly {
    /// Queues a request for the next round.
    pub fn add(&mut self, req: ReadRequest) {
        self.waiting.push(req);
    }

    /// Starts a round for the waiting requests if none is in flight; returns its id.
    pub fn maybe_start(&mut self, commit: u64, self_id: u64) -> Option<u64> {
        if self.round.is_some() || self.waiting.is_empty() {
            return None;
        }
        self.last_id += 1;
        let acks = [self_id].into_iter().collect();
        self.round = Some(ReadRound {
            id: self.last_id,
            index: commit,
            requests: std::mem::take(&mut self.waiting),
            acks,
        });
        Some(self.last_id)
    }

    /// Id of the round in flight (0 if none), carried by heartbeats.
    pub fn current_id(&self) -> u64 {
        self.round.as_ref().map_or(0, |r| r.id)
    }

    /// Records a heartbeat answer for round `id`.
    pub fn ack(&mut self, from: u64, id: u64) {
        if let Some(r) = &mut self.round {
            if r.id == id && id != 0 {
                r.acks.insert(from);
            }
        }
    }

    /// Takes the round in flight if `done(acks)` says a quorum confirmed it.
    pub fn take_if(&mut self, done: impl FnOnce(&BTreeSet<u64>) -> bool) -> Option<ReadRound> {
        if self.round.as_ref().is_some_and(|r| done(&r.acks)) {
            return self.round.take();
        }
        None
    }

    /// Drops every request (leadership lost: callers retry).
    pub fn clear(&mut self) {
        self.round = None;
        self.waiting.clear();
    }

    /// Number of requests waiting or in flight.
    pub fn pending(&self) -> usize {
        self.waiting.len() + self.round.as_ref().map_or(0, |r| r.requests.len())
    }
}
