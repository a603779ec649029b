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
///
/// A request unanswered for a while (lost, or sent to a leader that stepped down) is sent
/// again with the reads waiting since; reads older than the give-up age are dropped (the
/// driver has failed them by then), so what is kept is bounded by the reads of that window.
#[derive(Debug, Clone, Default)]
pub struct ForwardedReads {
    /// The request in flight, if any. Invariant: at most one.
    in_flight: Option<ForwardedBatch>,
    /// Reads waiting for the next request, in arrival order: (context, tick it arrived).
    waiting: Vec<(u64, u64)>,
    /// Ticks counted so far.
    now: u64,
}

/// One `ReadIndex` request a follower sent its leader on behalf of several reads.
#[derive(Debug, Clone)]
struct ForwardedBatch {
    /// Context the request carries: the last read's (read contexts are unique).
    ctx: u64,
    /// Every read the request answers: (context, tick it arrived).
    reads: Vec<(u64, u64)>,
    /// Tick it was sent.
    sent_at: u64,
}

impl ForwardedReads {
    /// Queues a read for the next request.
    pub fn add(&mut self, ctx: u64) {
        self.waiting.push((ctx, self.now));
    }

    /// Starts a request for the waiting reads if none is in flight; returns its context.
    pub fn maybe_start(&mut self) -> Option<u64> {
        if self.in_flight.is_some() {
            return None;
        }
        let (ctx, _) = *self.waiting.last()?;
        self.in_flight = Some(ForwardedBatch {
            ctx,
            reads: std::mem::take(&mut self.waiting),
            sent_at: self.now,
        });
        Some(ctx)
    }

    /// The leader answered request `ctx`: the reads it carried, if it is the one in flight.
    pub fn answered(&mut self, ctx: u64) -> Option<Vec<u64>> {
        if self.in_flight.as_ref().is_some_and(|b| b.ctx == ctx) {
            let batch = self.in_flight.take()?;
            return Some(batch.reads.into_iter().map(|(ctx, _)| ctx).collect());
        }
        None
    }

    /// Counts a tick. A request unanswered for `resend_after` ticks is given up: its reads
    /// younger than `give_up_after` ticks wait again, ahead of the others, and true says a
    /// new request should go out. (A late answer to the old request still counts if the new
    /// one carries the same reads: they all arrived before the old one was sent.)
    pub fn tick(&mut self, resend_after: u64, give_up_after: u64) -> bool {
        self.now += 1;
        let now = self.now;
        let due = self
            .in_flight
            .as_ref()
            .is_some_and(|b| now - b.sent_at >= resend_after);
        if !due {
            return false;
        }
        let mut reads = self.in_flight.take().map(|b| b.reads).unwrap_or_default();
        reads.append(&mut self.waiting);
        reads.retain(|&(_, arrived)| now - arrived < give_up_after);
        self.waiting = reads;
        true
    }

    /// Drops every read (no leader any more): the driver fails them at its read timeout.
    pub fn clear(&mut self) {
        self.in_flight = None;
        self.waiting.clear();
    }

    /// Reads kept, waiting or in flight.
    #[cfg(test)]
    fn len(&self) -> usize {
        self.waiting.len() + self.in_flight.as_ref().map_or(0, |b| b.reads.len())
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
    fn an_unanswered_request_is_sent_again_and_old_reads_are_dropped() {
        let mut f = ForwardedReads::default();
        f.add(1); // arrives at tick 0
        assert_eq!(f.maybe_start(), Some(1));
        assert!(!f.tick(2, 5), "tick 1: not due yet");
        f.add(2); // arrives at tick 1
        assert!(f.tick(2, 5), "tick 2: due");
        assert_eq!(
            f.answered(1),
            None,
            "given up: a late answer no longer counts"
        );
        assert_eq!(f.maybe_start(), Some(2), "one request for both reads");
        assert_eq!(f.len(), 2);
        assert!(!f.tick(2, 5), "tick 3");
        assert!(
            f.tick(2, 5),
            "tick 4: due again, both reads younger than five ticks"
        );
        assert_eq!(f.maybe_start(), Some(2));
        assert_eq!(f.len(), 2);
        assert!(!f.tick(2, 5), "tick 5");
        assert!(
            f.tick(2, 5),
            "tick 6: due; both reads are five ticks old or more"
        );
        assert_eq!(f.maybe_start(), None);
        assert_eq!(f.len(), 0, "nothing kept beyond the give-up age");
        f.add(3);
        assert_eq!(f.maybe_start(), Some(3));
        assert_eq!(f.answered(3), Some(vec![3]));
    }
}
