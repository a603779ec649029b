//! Batched ReadIndex (§6.4) on the leader. Read requests (local or forwarded by followers)
//! wait in a batch; one heartbeat round at a time confirms leadership for a whole batch: the
//! round records the commit index when it starts, and once a quorum of voters has answered a
//! heartbeat carrying the round id, every request of the batch gets that index. Requests that
//! arrive while a round is in flight join the next round. A follower batches the same way
//! ([`ForwardedReads`]): one `ReadIndex` request to the leader at a time. No IO, no clock.

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

/// Reads a follower passes to its leader, batched: at most one `ReadIndex` request in flight;
/// reads that arrive meanwhile wait for the next. They may not share the answer of the
/// request in flight: the leader may have fixed that read index before they arrived, and a
/// write acknowledged in between would then be missed (§6.4).
#[derive(Debug, Clone, Default)]
pub struct ForwardedReads {
    /// The request in flight, if any. Invariant: at most one.
    in_flight: Option<ForwardedBatch>,
    /// Contexts of reads waiting for the next request, in arrival order.
    waiting: Vec<u64>,
}

/// One `ReadIndex` request a follower sent its leader on behalf of several reads.
#[derive(Debug, Clone)]
struct ForwardedBatch {
    /// Context the request carries: the last read's (read contexts are unique).
    ctx: u64,
    /// Every read the request answers.
    reads: Vec<u64>,
    /// Ticks since it was sent.
    ticks: u64,
}

impl ForwardedReads {
    /// Queues a read for the next request.
    pub fn add(&mut self, ctx: u64) {
        self.waiting.push(ctx);
    }

    /// Starts a request for the waiting reads if none is in flight; returns its context.
    pub fn maybe_start(&mut self) -> Option<u64> {
        if self.in_flight.is_some() {
            return None;
        }
        let ctx = *self.waiting.last()?;
        self.in_flight = Some(ForwardedBatch {
            ctx,
            reads: std::mem::take(&mut self.waiting),
            ticks: 0,
        });
        Some(ctx)
    }

    /// The leader answered request `ctx`: the reads it carried, if it is the one in flight.
    pub fn answered(&mut self, ctx: u64) -> Option<Vec<u64>> {
        if self.in_flight.as_ref().is_some_and(|b| b.ctx == ctx) {
            return self.in_flight.take().map(|b| b.reads);
        }
        None
    }

    /// Counts a tick; a request unanswered for `timeout` ticks (lost, or sent to a leader
    /// that stepped down) is given up and its reads wait for the next one. True if so.
    pub fn tick(&mut self, timeout: u64) -> bool {
        let Some(batch) = &mut self.in_flight else {
            return false;
        };
        batch.ticks += 1;
        if batch.ticks < timeout {
            return false;
        }
        let mut reads = self.in_flight.take().map(|b| b.reads).unwrap_or_default();
        reads.append(&mut self.waiting);
        self.waiting = reads;
        true
    }

    /// Drops every read (the leader is gone: callers retry).
    pub fn clear(&mut self) {
        self.in_flight = None;
        self.waiting.clear();
    }
}

#[cfg(test)]
mod tests {
    use super::ForwardedReads;

    #[test]
    fn reads_arriving_while_a_request_is_in_flight_wait_for_the_next() {
        let mut f = ForwardedReads::default();
        f.add(1);
        f.add(2);
        assert_eq!(f.maybe_start(), Some(2));
        f.add(3);
        assert_eq!(f.maybe_start(), None, "one request in flight at a time");
        assert_eq!(
            f.answered(1),
            None,
            "only the request's own context answers it"
        );
        assert_eq!(f.answered(2), Some(vec![1, 2]));
        assert_eq!(f.answered(2), None);
        assert_eq!(f.maybe_start(), Some(3));
        assert_eq!(f.answered(3), Some(vec![3]));
    }

    #[test]
    fn an_unanswered_request_is_given_up_after_its_timeout_and_its_reads_go_again() {
        let mut f = ForwardedReads::default();
        f.add(1);
        assert_eq!(f.maybe_start(), Some(1));
        f.add(2);
        assert!(!f.tick(2));
        assert!(f.tick(2));
        assert_eq!(
            f.answered(1),
            None,
            "a late answer to the given-up request is ignored"
        );
        assert_eq!(f.maybe_start(), Some(2));
        assert_eq!(f.answered(2), Some(vec![1, 2]));
    }
}
