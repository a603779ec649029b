//! The leader's view of each member: how far its log matches, what to send next, and the
//! flow-control state (Probe / Replicate / Snapshot) with an inflight window. Also the
//! quorum arithmetic over voters (commit index as the quorum-median of match indexes, vote
//! tallies). Learners are tracked and replicated to but never counted.

use std::collections::{BTreeMap, VecDeque};

use super::membership::Configuration;
use super::message::SnapshotMeta;

/// Flow-control state of one follower.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ProgressState {
    /// Match unknown: one append at a time until the follower accepts one.
    Probe,
    /// Match known: appends are pipelined optimistically, up to the inflight window.
    Replicate,
    /// The follower needs a snapshot; appends pause until it reports the snapshot applied.
    Snapshot,
}

/// A snapshot transfer in progress. One chunk is in flight at a time.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SnapshotSend {
    /// The snapshot being sent.
    pub meta: SnapshotMeta,
    /// Offset of the next chunk to send (or of the chunk in flight).
    pub offset: u64,
    /// Heartbeat answers since the chunk in flight was sent; past a few, it is resent
    /// (it or its answer was lost).
    pub stalled: u32,
}

/// Unacknowledged appends to one follower, by the last index each carried. Invariant: at
/// most `cap` items, increasing.
#[derive(Debug, Clone)]
pub struct Inflights {
    cap: usize,
    last_indexes: VecDeque<u64>,
}

impl Inflights {
    /// An empty window of `cap` messages.
    pub fn new(cap: usize) -> Inflights {
        Inflights {
            cap,
            last_indexes: VecDeque::new(),
        }
    }
    /// Whether no more appends may be sent.
    pub fn full(&self) -> bool {
        self.last_indexes.len() >= self.cap
    }
    /// Number of appends in flight.
    pub fn count(&self) -> usize {
        self.last_indexes.len()
    }
    /// Records an append whose last entry is `index`.
    pub fn add(&mut self, index: u64) {
        self.last_indexes.push_back(index);
    }
    /// Frees every append whose last index ≤ `index` (acknowledged).
    pub fn free_le(&mut self, index: u64) {
        while self.last_indexes.front().is_some_and(|&i| i <= index) {
            self.last_indexes.pop_front();
        }
    }
    /// Frees the oldest append (a heartbeat answer shows the follower is alive, though an
    /// ack may have been lost: let one more append probe it).
    pub fn free_first_one(&mut self) {
        self.last_indexes.pop_front();
    }
    /// Frees everything.
    pub fn reset(&mut self) {
        self.last_indexes.clear();
    }
}

/// What the leader knows of one member.
#[derive(Debug, Clone)]
pub struct Progress {
    /// Highest index known to match the leader's log (durably, on that member).
    /// Invariant: `matched < next`.
    pub matched: u64,
    /// Next index to send.
    pub next: u64,
    /// Flow-control state.
    pub state: ProgressState,
    /// In Probe: an append was sent and not answered; pause until a response or heartbeat.
    pub probe_sent: bool,
    /// In Snapshot: the transfer in progress.
    pub snapshot: Option<SnapshotSend>,
    /// Appends in flight (meaningful in Replicate).
    pub inflights: Inflights,
    /// Heard from since the last check-quorum round.
    pub recent_active: bool,
    /// A learner: replicated to, never counted.
    pub is_learner: bool,
}

impl Progress {
    fn new(next: u64, cap: usize, is_learner: bool) -> Progress {
        Progress {
            matched: 0,
            next,
            state: ProgressState::Probe,
            probe_sent: false,
            snapshot: None,
            inflights: Inflights::new(cap),
            recent_active: false,
            is_learner,
        }
    }

    /// Enters Probe, resuming after what is known to match.
    pub fn become_probe(&mut self) {
        if let (ProgressState::Snapshot, Some(s)) = (self.state, &self.snapshot) {
            self.next = (self.matched + 1).max(s.meta.index + 1);
        } else {
            self.next = self.matched + 1;
        }
        self.state = ProgressState::Probe;
        self.reset_flow();
    }

    /// Enters Replicate after a successful probe.
    pub fn become_replicate(&mut self) {
        self.next = self.matched + 1;
        self.state = ProgressState::Replicate;
        self.reset_flow();
    }

    /// Enters Snapshot, sending `meta`.
    pub fn become_snapshot(&mut self, meta: SnapshotMeta) {
        self.state = ProgressState::Snapshot;
        self.reset_flow();
        self.snapshot = Some(SnapshotSend {
            meta,
            offset: 0,
            stalled: 0,
        });
    }

    fn reset_flow(&mut self) {
        self.probe_sent = false;
        self.snapshot = None;
        self.inflights.reset();
    }

    /// Whether sending appends is paused.
    pub fn is_paused(&self) -> bool {
        match self.state {
            ProgressState::Probe => self.probe_sent,
            ProgressState::Replicate => self.inflights.full(),
            ProgressState::Snapshot => true,
        }
    }

    /// Records an acknowledged match; returns whether it moved.
    pub fn maybe_update(&mut self, index: u64) -> bool {
        let moved = index > self.matched;
        if moved {
            self.matched = index;
            self.probe_sent = false;
        }
        self.next = self.next.max(index + 1);
        moved
    }

    /// Handles a rejection of the append whose prev index was `rejected`, moving `next` back
    /// to at most `hint + 1`. Returns false if the rejection is stale.
    pub fn maybe_decr_to(&mut self, rejected: u64, hint: u64) -> bool {
        if self.state == ProgressState::Replicate {
            if rejected <= self.matched {
                return false;
            }
            self.next = self.matched + 1;
            return true;
        }
        if self.next.checked_sub(1) != Some(rejected) {
            return false;
        }
        self.next = rejected.min(hint.saturating_add(1)).max(self.matched + 1);
        self.probe_sent = false;
        true
    }

    /// Records that an append with `n` entries ending at `last` was sent.
    pub fn sent_entries(&mut self, n: usize, last: u64) {
        match self.state {
            ProgressState::Replicate if n > 0 => {
                self.next = last + 1;
                self.inflights.add(last);
            }
            ProgressState::Probe => self.probe_sent = true,
            _ => {}
        }
    }
}

/// Progress of every member, by id (ordered: iteration is deterministic).
/// Invariant: keys ⊇ `conf.ids()`; the others are members a leader's uncommitted
/// configuration removed: it still replicates to them (so they learn of their removal) but
/// never counts them, and forgets them ([`ProgressTracker::prune`]) once that configuration
/// commits.
#[derive(Debug, Clone)]
pub struct ProgressTracker {
    /// The membership in force.
    pub conf: Configuration,
    /// Per member.
    pub progress: BTreeMap<u64, Progress>,
    cap: usize,
}

impl ProgressTracker {
    /// A tracker for `conf` with inflight windows of `cap`.
    pub fn new(conf: Configuration, cap: usize) -> ProgressTracker {
        let mut t = ProgressTracker {
            conf: Configuration::default(),
            progress: BTreeMap::new(),
            cap,
        };
        t.set_conf(conf, 1);
        t
    }

    /// Replaces the membership; new members start probing at `next`. Removed members keep
    /// their progress until [`ProgressTracker::prune`].
    pub fn set_conf(&mut self, conf: Configuration, next: u64) {
        for id in conf.ids() {
            let learner = conf.learners.contains(&id);
            let cap = self.cap;
            self.progress
                .entry(id)
                .and_modify(|p| p.is_learner = learner)
                .or_insert_with(|| Progress::new(next, cap, learner));
        }
        self.conf = conf;
    }

    /// Forgets the progress of nodes that are no longer members.
    pub fn prune(&mut self) {
        let conf = &self.conf;
        self.progress.retain(|id, _| conf.contains(*id));
    }

    /// Resets every member for a new leader whose last index is `last`.
    pub fn reset(&mut self, last: u64) {
        let cap = self.cap;
        for p in self.progress.values_mut() {
            *p = Progress::new(last + 1, cap, p.is_learner);
        }
    }

    /// Number of voters forming a majority.
    pub fn quorum(&self) -> usize {
        self.conf.voters.len() / 2 + 1
    }

    /// The highest index matched by a quorum of voters: with match indexes sorted in
    /// decreasing order, the quorum-th one (the "median").
    pub fn committed_index(&self) -> u64 {
        let mut m: Vec<u64> = self
            .conf
            .voters
            .iter()
            .map(|id| self.progress.get(id).map_or(0, |p| p.matched))
            .collect();
        if m.is_empty() {
            return 0;
        }
        m.sort_unstable_by(|a, b| b.cmp(a));
        m[self.quorum() - 1]
    }

    /// Whether `ids` contains a quorum of voters.
    pub fn has_quorum<'a>(&self, ids: impl IntoIterator<Item = &'a u64>) -> bool {
        ids.into_iter()
            .filter(|id| self.conf.voters.contains(id))
            .count()
            >= self.quorum()
    }

    /// Outcome of an election given the votes cast so far.
    pub fn tally(&self, votes: &BTreeMap<u64, bool>) -> VoteResult {
        let mut granted = 0;
        let mut rejected = 0;
        for id in &self.conf.voters {
            match votes.get(id) {
                Some(true) => granted += 1,
                Some(false) => rejected += 1,
                None => {}
            }
        }
        if granted >= self.quorum() {
            VoteResult::Won
        } else if rejected >= self.quorum() {
            VoteResult::Lost
        } else {
            VoteResult::Pending
        }
    }
}

/// Outcome of a (pre-)vote round.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum VoteResult {
    /// A quorum granted.
    Won,
    /// A quorum refused.
    Lost,
    /// Not decided yet.
    Pending,
}

#[cfg(test)]
mod tests {
    use super::*;

    fn tracker(voters: &[u64], matched: &[u64]) -> ProgressTracker {
        let mut t = ProgressTracker::new(Configuration::with_voters(voters.iter().copied()), 4);
        for (id, m) in voters.iter().zip(matched) {
            t.progress.get_mut(id).unwrap().matched = *m;
        }
        t
    }

    #[test]
    fn s3_6_commit_index_is_quorum_median_over_voters() {
        assert_eq!(tracker(&[1], &[7]).committed_index(), 7);
        assert_eq!(tracker(&[1, 2, 3], &[5, 3, 9]).committed_index(), 5);
        assert_eq!(tracker(&[1, 2, 3, 4], &[5, 3, 9, 1]).committed_index(), 3);
        assert_eq!(
            tracker(&[1, 2, 3, 4, 5], &[1, 2, 3, 4, 5]).committed_index(),
            3
        );
    }

    #[test]
    fn s4_learners_do_not_count_for_commit_or_votes() {
        let mut conf = Configuration::with_voters([1, 2, 3]);
        conf.learners.insert(4);
        conf.learners.insert(5);
        let mut t = ProgressTracker::new(conf, 4);
        for (id, m) in [(1, 9), (2, 1), (3, 1), (4, 9), (5, 9)] {
            t.progress.get_mut(&id).unwrap().matched = m;
        }
        assert_eq!(t.committed_index(), 1);
        let votes: BTreeMap<u64, bool> = [(1, true), (4, true), (5, true)].into_iter().collect();
        assert_eq!(t.tally(&votes), VoteResult::Pending);
        assert!(!t.has_quorum(&[1, 4, 5]));
    }

    #[test]
    fn s10_2_inflight_window_fills_and_frees() {
        let mut i = Inflights::new(3);
        for x in [3, 5, 9] {
            i.add(x);
        }
        assert!(i.full());
        i.free_le(5);
        assert_eq!(i.count(), 1);
        assert!(!i.full());
    }
}
