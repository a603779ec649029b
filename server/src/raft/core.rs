//! The consensus core: roles, terms, elections (pre-vote, check-quorum, leader stickiness),
//! and the dispatch of every input (`tick`, `step`, `propose`, `read_index`). Replication is
//! in `replication.rs` (leader side) and `follower.rs`; membership in `membership.rs`, leader
//! transfer in `transfer.rs`; the output side (`ready`, `advance`) in `ready.rs`. Pure: no
//! clock, no IO; the only randomness is the seeded RNG.

use std::collections::BTreeMap;

use rand::{Rng, SeedableRng};
use rand_chacha::ChaCha8Rng;
use tracing::{debug, warn};

use super::config::{ConfigError, RaftConfig};
use super::log::RaftLog;
use super::membership::{self, ConfLog};
use super::message::{entry_size, AppendResult, HardState, Message, MessageKind};
use super::progress::{ProgressTracker, VoteResult};
use super::read_only::{ForwardedReads, ReadOnly, ReadRequest};
use super::storage::{Storage, StorageError};
use super::{Entry, EntryKind};

/// The role of a core.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Role {
    /// Follows a leader (or waits for one).
    Follower,
    /// Asking for pre-votes (§9.6) without having raised its term.
    PreCandidate,
    /// Campaigning in its current term.
    Candidate,
    /// Leader of its current term.
    Leader,
}

/// Why a proposal was refused.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum ProposeError {
    /// Only the leader appends; the hint is the leader this node knows, if any.
    #[error("not leader (leader hint {leader_hint:?})")]
    NotLeader {
        /// The current leader as far as this node knows.
        leader_hint: Option<u64>,
    },
    /// Leadership is being transferred; proposals wait for the new leader.
    #[error("leader transfer in progress")]
    TransferInProgress,
    /// The encoded entry exceeds `max_entry_bytes`.
    #[error("proposal of {size} bytes exceeds the limit of {max}")]
    ProposalTooLarge {
        /// Encoded size.
        size: u64,
        /// The limit.
        max: u64,
    },
    /// Configuration entries go through [`Raft::propose_conf_change`], which checks them.
    #[error("configuration changes are proposed with propose_conf_change")]
    ConfigEntry,
}

/// Why a read index could not be requested.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
pub enum ReadIndexError {
    /// No leader known to ask.
    #[error("no leader")]
    NoLeader,
}

/// Why a core could not be built.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum NewRaftError {
    /// Bad configuration.
    #[error(transparent)]
    Config(#[from] ConfigError),
    /// Storage could not be read.
    #[error(transparent)]
    Storage(#[from] StorageError),
}

/// A linearizable read may be served once the applied index reaches `index` (§6.4).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ReadState {
    /// The caller's context given to `read_index`.
    pub ctx: u64,
    /// The read index.
    pub index: u64,
}

/// A snapshot being received, chunk by chunk. Invariant: `data.len()` is the next offset.
#[derive(Debug, Clone)]
pub(super) struct Staging {
    pub(super) meta: super::SnapshotMeta,
    pub(super) data: Vec<u8>,
}

/// One consensus core. See the module docs of [`super`] for the Ready contract.
#[derive(Debug)]
pub struct Raft<S> {
    pub(super) cfg: RaftConfig,
    /// This node's id (= `cfg.id`).
    pub(super) id: u64,
    /// Current term. Invariant: never decreases; durable before any message of it is sent.
    pub(super) term: u64,
    /// Vote in `term` (0 = none). Invariant: set at most once per term.
    pub(super) vote: u64,
    /// Leader of `term` if known. Invariant: `Some(id)` iff `role == Leader`.
    pub(super) leader: Option<u64>,
    /// Current role.
    pub(super) role: Role,
    /// The log.
    pub(super) log: RaftLog<S>,
    /// Progress of every member (meaningful on the leader), and the membership in force.
    /// Invariant: `tracker.conf == conf_log.current()` (kept by `apply_conf`).
    pub(super) tracker: ProgressTracker,
    /// The configurations of the log: where the one in force comes from, and what a
    /// truncation rolls back to.
    pub(super) conf_log: ConfLog,
    /// The configuration changed since the last Ready.
    pub(super) conf_dirty: bool,
    /// (Pre-)votes received in the current campaign.
    pub(super) votes: BTreeMap<u64, bool>,
    /// Ticks since the last heartbeat from a leader (follower), since the campaign began
    /// (candidate), or since the last check-quorum (leader).
    pub(super) election_elapsed: u32,
    /// Ticks since the last heartbeat broadcast (leader).
    pub(super) heartbeat_elapsed: u32,
    /// Election timeout drawn in `[election_tick, 2 * election_tick)` at each reset.
    pub(super) randomized_timeout: u32,
    /// The only source of randomness, seeded from the configuration.
    pub(super) rng: ChaCha8Rng,
    /// Messages that may leave only after this Ready's hard state and entries are durable.
    pub(super) msgs: Vec<Message>,
    /// The leader's own appends, which may leave before its fsync (§10.2.1).
    pub(super) msgs_early: Vec<Message>,
    /// Pending ReadIndex batches (leader).
    pub(super) read_only: ReadOnly,
    /// Reads this node (not leading) passes to its leader, one request at a time.
    forwarded: ForwardedReads,
    /// Reads whose index is known, for the next Ready.
    pub(super) read_states: Vec<ReadState>,
    /// Leader transfer target (leader only; proposals are refused while set).
    pub(super) transferee: Option<u64>,
    /// Leader ticks since the transfer began; it is aborted after an election timeout.
    pub(super) transfer_elapsed: u32,
    /// Snapshot chunks received so far (follower).
    pub(super) staging: Option<Staging>,
    /// Appends should be (re)considered for every follower at the next `ready`.
    pub(super) bcast_pending: bool,
    /// The commit index moved since the last broadcast: send it even without new entries.
    pub(super) commit_dirty: bool,
    /// The hard state last handed out in a Ready (what the driver has or is persisting).
    pub(super) prev_hs: HardState,
}

impl<S: Storage> Raft<S> {
    /// A core over `store`, restarting from its hard state as a follower.
    pub fn new(cfg: RaftConfig, store: S) -> Result<Raft<S>, NewRaftError> {
        cfg.validate()?;
        let (hs, conf) = store.initial_state()?;
        let conf_log = membership::recover(&store, conf)?;
        let log = RaftLog::new(store, hs.commit, cfg.applied)?;
        let rng = ChaCha8Rng::seed_from_u64(cfg.seed);
        let tracker = ProgressTracker::new(conf_log.current().clone(), cfg.max_inflight_msgs);
        let mut r = Raft {
            id: cfg.id,
            cfg,
            term: hs.term,
            vote: hs.vote,
            leader: None,
            role: Role::Follower,
            log,
            tracker,
            conf_log,
            conf_dirty: false,
            votes: BTreeMap::new(),
            election_elapsed: 0,
            heartbeat_elapsed: 0,
            randomized_timeout: 0,
            rng,
            msgs: Vec::new(),
            msgs_early: Vec::new(),
            read_only: ReadOnly::default(),
            forwarded: ForwardedReads::default(),
            read_states: Vec::new(),
            transferee: None,
            transfer_elapsed: 0,
            staging: None,
            bcast_pending: false,
            commit_dirty: false,
            prev_hs: HardState {
                term: hs.term,
                vote: hs.vote,
                commit: 0,
            },
        };
        r.prev_hs.commit = r.log.committed;
        r.become_follower(hs.term, None);
        Ok(r)
    }

    /// This node's id.
    pub fn id(&self) -> u64 {
        self.id
    }
    /// Current term.
    pub fn term(&self) -> u64 {
        self.term
    }
    /// Current role.
    pub fn role(&self) -> Role {
        self.role
    }
    /// The leader known for the current term.
    pub fn leader(&self) -> Option<u64> {
        self.leader
    }
    /// Commit index.
    pub fn commit(&self) -> u64 {
        self.log.committed
    }
    /// Applied index (as acknowledged by `advance`).
    pub fn applied(&self) -> u64 {
        self.log.applied
    }
    /// Last log index (unstable entries included).
    pub fn last_index(&self) -> u64 {
        self.log.last_index()
    }
    /// Reads waiting for or inside a ReadIndex round (leader).
    pub fn pending_reads(&self) -> usize {
        self.read_only.pending()
    }
    /// The durable storage, read-only.
    pub fn store(&self) -> &S {
        &self.log.store
    }
    /// The durable storage, for the driver to persist a Ready before `advance`.
    pub fn store_mut(&mut self) -> &mut S {
        &mut self.log.store
    }
    /// The log (read-only), for inspection.
    pub fn raft_log(&self) -> &RaftLog<S> {
        &self.log
    }
    /// The progress tracker (membership; per-follower progress on a leader).
    pub fn tracker(&self) -> &ProgressTracker {
        &self.tracker
    }

    /// Advances logical time by one tick: election timeouts, heartbeats, check-quorum.
    pub fn tick(&mut self) {
        if self.role == Role::Leader {
            self.tick_leader();
        } else {
            // Sent again after two heartbeat intervals unanswered (a lost message must not
            // hold up the reads behind it for long); dropped at the driver's read timeout
            // (four election timeouts).
            let resend_after = 2 * u64::from(self.cfg.heartbeat_tick);
            let give_up_after = 4 * u64::from(self.cfg.election_tick);
            if self.forwarded.tick(resend_after, give_up_after) {
                self.forward_reads();
            }
            self.election_elapsed += 1;
            if self.promotable() && self.election_elapsed >= self.randomized_timeout {
                self.election_elapsed = 0;
                self.campaign(self.cfg.pre_vote, false);
            }
        }
    }

    fn tick_leader(&mut self) {
        self.heartbeat_elapsed += 1;
        self.election_elapsed += 1;
        if self.election_elapsed >= self.cfg.election_tick {
            self.election_elapsed = 0;
            if self.cfg.check_quorum && !self.quorum_active() {
                debug!(
                    id = self.id,
                    term = self.term,
                    "check-quorum failed; stepping down"
                );
                self.become_follower(self.term, None);
                return;
            }
        }
        self.tick_transfer();
        if self.heartbeat_elapsed >= self.cfg.heartbeat_tick {
            self.heartbeat_elapsed = 0;
            self.bcast_heartbeat();
        }
    }

    /// Whether a quorum of voters was heard from since the last check; resets the marks.
    fn quorum_active(&mut self) -> bool {
        let id = self.id;
        let active: Vec<u64> = self
            .tracker
            .progress
            .iter()
            .filter(|(pid, p)| **pid == id || p.recent_active)
            .map(|(pid, _)| *pid)
            .collect();
        for (pid, p) in self.tracker.progress.iter_mut() {
            p.recent_active = *pid == id;
        }
        self.tracker.has_quorum(&active)
    }

    /// Whether this node may campaign: it is a voter in its configuration (learners, removed
    /// nodes and nodes waiting to join never campaign).
    pub fn promotable(&self) -> bool {
        self.tracker.conf.voters.contains(&self.id)
    }

    fn reset(&mut self, term: u64) {
        if term != self.term {
            self.term = term;
            self.vote = 0;
        }
        self.leader = None;
        self.election_elapsed = 0;
        self.heartbeat_elapsed = 0;
        let e = self.cfg.election_tick;
        self.randomized_timeout = self.rng.random_range(e..2 * e);
        self.votes.clear();
        self.read_only.clear();
        self.forwarded.clear();
        self.abort_transfer();
        self.tracker.prune();
        self.tracker.reset(self.log.last_index());
    }

    pub(super) fn become_follower(&mut self, term: u64, leader: Option<u64>) {
        self.reset(term);
        self.role = Role::Follower;
        self.leader = leader;
    }

    fn become_pre_candidate(&mut self) {
        self.votes.clear();
        self.read_only.clear();
        self.forwarded.clear();
        self.leader = None;
        self.role = Role::PreCandidate;
    }

    fn become_candidate(&mut self) {
        self.reset(self.term.saturating_add(1));
        self.vote = self.id;
        self.role = Role::Candidate;
    }

    fn become_leader(&mut self) {
        self.reset(self.term);
        self.role = Role::Leader;
        self.leader = Some(self.id);
        let stable = self.log.stable_last();
        if let Some(p) = self.tracker.progress.get_mut(&self.id) {
            p.become_replicate();
            p.maybe_update(stable);
        }
        let time_ms = self.last_entry_time();
        let noop = Entry {
            index: self.log.last_index() + 1,
            term: self.term,
            proposer_term: self.term,
            time_ms,
            kind: EntryKind::Noop,
        };
        self.log.append(&[noop]);
        self.bcast_pending = true;
        debug!(id = self.id, term = self.term, "became leader");
    }

    /// Starts a pre-vote round (if `pre`) or an election; never outside the voters.
    pub(super) fn campaign(&mut self, pre: bool, transfer: bool) {
        if !self.promotable() {
            debug!(id = self.id, "not a voter; no campaign");
            return;
        }
        let vote_term = if pre {
            self.become_pre_candidate();
            self.term.saturating_add(1)
        } else {
            self.become_candidate();
            self.term
        };
        if self.poll(self.id, true) == VoteResult::Won {
            return;
        }
        let (last_index, last_term) = (self.log.last_index(), self.log.last_term());
        let voters: Vec<u64> = self
            .tracker
            .conf
            .voters
            .iter()
            .copied()
            .filter(|v| *v != self.id)
            .collect();
        for to in voters {
            let kind = if pre {
                MessageKind::PreVote {
                    last_index,
                    last_term,
                }
            } else {
                MessageKind::Vote {
                    last_index,
                    last_term,
                    transfer,
                }
            };
            self.msgs.push(Message {
                from: self.id,
                to,
                term: vote_term,
                kind,
            });
        }
    }

    /// Records a (pre-)vote and acts on the outcome.
    fn poll(&mut self, from: u64, granted: bool) -> VoteResult {
        self.votes.entry(from).or_insert(granted);
        let result = self.tracker.tally(&self.votes);
        match (result, self.role) {
            (VoteResult::Won, Role::PreCandidate) => self.campaign(false, false),
            (VoteResult::Won, Role::Candidate) => self.become_leader(),
            (VoteResult::Lost, _) => self.become_follower(self.term, None),
            _ => {}
        }
        result
    }

    pub(super) fn send(&mut self, to: u64, kind: MessageKind) {
        self.msgs.push(Message {
            from: self.id,
            to,
            term: self.term,
            kind,
        });
    }

    /// Feeds a message received from a peer. Bad or stale messages are dropped (logged).
    pub fn step(&mut self, m: Message) {
        if m.to != self.id || m.from == self.id || m.from == 0 {
            warn!(
                id = self.id,
                from = m.from,
                to = m.to,
                "misaddressed message dropped"
            );
            return;
        }
        if m.term > self.term {
            let (is_vote, transfer) = match &m.kind {
                MessageKind::PreVote { .. } => (true, false),
                MessageKind::Vote { transfer, .. } => (true, *transfer),
                _ => (false, false),
            };
            let pre = matches!(m.kind, MessageKind::PreVote { .. });
            if is_vote && !transfer && self.in_lease(pre) {
                debug!(
                    id = self.id,
                    from = m.from,
                    "(pre)vote ignored: leader lease"
                );
                return;
            }
            let keep_term = matches!(m.kind, MessageKind::PreVote { .. })
                || matches!(m.kind, MessageKind::PreVoteResp { reject: false });
            if !keep_term {
                let leader = match m.kind {
                    MessageKind::Append { .. }
                    | MessageKind::Heartbeat { .. }
                    | MessageKind::InstallSnapshot { .. } => Some(m.from),
                    _ => None,
                };
                self.become_follower(m.term, leader);
            }
        } else if m.term < self.term {
            match m.kind {
                MessageKind::Append { .. } | MessageKind::Heartbeat { .. }
                    if self.cfg.check_quorum || self.cfg.pre_vote =>
                {
                    // Tell a stale leader about the newer term so it steps down.
                    self.send(
                        m.from,
                        MessageKind::AppendResp {
                            result: AppendResult::Match(0),
                        },
                    );
                }
                MessageKind::PreVote { .. } => {
                    self.send(m.from, MessageKind::PreVoteResp { reject: true });
                }
                // §3.3: a stale request is rejected with the current term, so that its sender
                // catches up. A candidate that only this node can elect may hear of the newer
                // term no other way (this node, on an older configuration, may not count it
                // as a voter and so never asks it for a vote): without the answer the two
                // could campaign past each other forever (simulation seed 10193).
                MessageKind::Vote { .. } => {
                    self.send(m.from, MessageKind::VoteResp { reject: true });
                }
                _ => debug!(
                    id = self.id,
                    from = m.from,
                    kind = m.kind.name(),
                    "stale term; dropped"
                ),
            }
            return;
        }
        match m.kind {
            MessageKind::PreVote {
                last_index,
                last_term,
            } => self.handle_vote_request(m.from, m.term, last_index, last_term, true),
            MessageKind::Vote {
                last_index,
                last_term,
                ..
            } => self.handle_vote_request(m.from, m.term, last_index, last_term, false),
            _ => match self.role {
                Role::Leader => self.step_leader(m),
                Role::Candidate | Role::PreCandidate => self.step_candidate(m),
                Role::Follower => self.step_follower(m),
            },
        }
    }

    /// Whether a (pre-)vote must be ignored because a leader was heard from within the
    /// election timeout: always for pre-votes (§9.6), for votes with check-quorum (leader
    /// stickiness, §4.2.3).
    fn in_lease(&self, pre: bool) -> bool {
        (pre || self.cfg.check_quorum)
            && self.leader.is_some()
            && self.election_elapsed < self.cfg.election_tick
    }

    fn handle_vote_request(
        &mut self,
        from: u64,
        term: u64,
        last_index: u64,
        last_term: u64,
        pre: bool,
    ) {
        let can_vote = self.vote == from
            || (self.vote == 0 && self.leader.is_none())
            || (pre && term > self.term);
        if can_vote && self.log.is_up_to_date(last_index, last_term) {
            let kind = if pre {
                MessageKind::PreVoteResp { reject: false }
            } else {
                self.election_elapsed = 0;
                self.vote = from;
                MessageKind::VoteResp { reject: false }
            };
            self.msgs.push(Message {
                from: self.id,
                to: from,
                term,
                kind,
            });
        } else {
            let kind = if pre {
                MessageKind::PreVoteResp { reject: true }
            } else {
                MessageKind::VoteResp { reject: true }
            };
            self.send(from, kind);
        }
    }

    fn step_candidate(&mut self, m: Message) {
        match m.kind {
            MessageKind::PreVoteResp { reject } if self.role == Role::PreCandidate => {
                self.poll(m.from, !reject);
            }
            MessageKind::VoteResp { reject } if self.role == Role::Candidate => {
                self.poll(m.from, !reject);
            }
            MessageKind::Append { .. }
            | MessageKind::Heartbeat { .. }
            | MessageKind::InstallSnapshot { .. } => {
                self.become_follower(m.term, Some(m.from));
                self.step_follower(m);
            }
            _ => debug!(
                id = self.id,
                kind = m.kind.name(),
                "candidate ignores message"
            ),
        }
    }

    fn step_follower(&mut self, m: Message) {
        match m.kind {
            MessageKind::Append {
                prev_index,
                prev_term,
                entries,
                commit,
            } => {
                self.heard_from_leader(m.from);
                self.handle_append(m.from, m.term, prev_index, prev_term, &entries, commit);
            }
            MessageKind::Heartbeat { commit, read_ctx } => {
                self.heard_from_leader(m.from);
                self.log.commit_to(commit);
                self.send(m.from, MessageKind::HeartbeatResp { read_ctx });
            }
            MessageKind::InstallSnapshot {
                meta,
                offset,
                data,
                last,
            } => {
                self.heard_from_leader(m.from);
                self.handle_snapshot_chunk(m.from, meta, offset, data, last);
            }
            MessageKind::TimeoutNow if self.promotable() && self.leader == Some(m.from) => {
                self.campaign(false, true)
            }
            MessageKind::ReadIndexResp { ctx, index } if Some(m.from) == self.leader => {
                for ctx in self.forwarded.answered(ctx).unwrap_or_default() {
                    self.read_states.push(ReadState { ctx, index });
                }
                self.forward_reads();
            }
            _ => debug!(
                id = self.id,
                kind = m.kind.name(),
                "follower ignores message"
            ),
        }
    }

    fn heard_from_leader(&mut self, from: u64) {
        self.election_elapsed = 0;
        self.leader = Some(from);
    }

    /// Appends a proposal as a new entry of the current term (leader only); returns its
    /// index. `proposer_term` is the term the driver believed current when it decided the
    /// entry (DESIGN §3a.5); `time_ms` its entry time, raised to the previous entry's time if
    /// lower (entry time never goes backwards). Appends are sent at the next `ready`, so
    /// proposals made together travel in one batch.
    pub fn propose(
        &mut self,
        kind: EntryKind,
        proposer_term: u64,
        time_ms: u64,
    ) -> Result<u64, ProposeError> {
        if self.role != Role::Leader {
            return Err(ProposeError::NotLeader {
                leader_hint: self.leader,
            });
        }
        if self.transferee.is_some() {
            return Err(ProposeError::TransferInProgress);
        }
        if matches!(kind, EntryKind::Config(_)) {
            return Err(ProposeError::ConfigEntry);
        }
        let entry = Entry {
            index: self.log.last_index() + 1,
            term: self.term,
            proposer_term,
            time_ms: time_ms.max(self.last_entry_time()),
            kind,
        };
        let size = entry_size(&entry);
        if size > self.cfg.max_entry_bytes {
            return Err(ProposeError::ProposalTooLarge {
                size,
                max: self.cfg.max_entry_bytes,
            });
        }
        let index = self.log.append(&[entry]);
        self.bcast_pending = true;
        Ok(index)
    }

    /// Asks for a read index (§6.4). The answer comes as a [`ReadState`] with `ctx` in a
    /// later Ready (on a follower, once the leader answered). Requests are batched: one
    /// heartbeat round serves all reads that arrived before it started. A leader that has
    /// not yet committed an entry of its term holds the request until it has.
    pub fn read_index(&mut self, ctx: u64) -> Result<(), ReadIndexError> {
        match (self.role, self.leader) {
            (Role::Leader, _) => {
                self.read_only.add(ReadRequest { ctx, from: self.id });
                self.maybe_start_read_round();
                Ok(())
            }
            (_, Some(_)) => {
                self.forwarded.add(ctx);
                self.forward_reads();
                Ok(())
            }
            (_, None) => Err(ReadIndexError::NoLeader),
        }
    }

    /// Sends the leader one `ReadIndex` request for the reads waiting, unless one is in
    /// flight (its answer starts the next).
    fn forward_reads(&mut self) {
        let Some(leader) = self.leader else {
            return;
        };
        if let Some(ctx) = self.forwarded.maybe_start() {
            self.send(leader, MessageKind::ReadIndex { ctx });
        }
    }

    /// Entry time of the last entry in the log (from the snapshot if compacted away). A
    /// driver computes a proposal's entry time as this plus its own monotonic time elapsed
    /// since it last stamped an entry (DESIGN §3a.12).
    pub fn last_entry_time(&self) -> u64 {
        let last = self.log.last_index();
        if let Ok(es) = self.log.entries(last, last + 1, u64::MAX) {
            if let Some(e) = es.first() {
                return e.time_ms;
            }
        }
        match self.log.pending_snapshot() {
            Some(s) => s.meta.time_ms,
            None => self.log.store.snapshot_meta().map_or(0, |m| m.time_ms),
        }
    }
}
