//! Deterministic simulation of whole clusters of the real consensus core ([`crate::raft`])
//! with the real state machine ([`crate::fsm`] over its in-memory `MemStore`), in one thread,
//! driven by one seeded RNG: a network that drops, duplicates, delays and reorders messages
//! and partitions nodes (asymmetric too); crashes that lose whatever the driver had not yet
//! persisted; pauses (a deposed leader that does not know it); clients proposing and reading
//! throughout; log compaction with snapshots; membership changes (spare nodes join as
//! learners, learners are promoted, members are removed, the leader included, and removed
//! nodes keep running) and leader transfers, all during those faults
//! (`sim/membership.rs`). After every step [`check::Checker`] verifies the
//! safety invariants. A run is a pure function of its [`SimConfig`]: the same seed gives the
//! same trace. No IO, no clock, no hash-map iteration.

pub mod check;
mod membership;
#[cfg(test)]
mod tests;

use std::collections::{BTreeMap, BTreeSet};

use lockd_protocol::SessionId;
use rand::{Rng, SeedableRng};
use rand_chacha::ChaCha8Rng;

use crate::fsm::{self, Command, MemStore};
use crate::raft::{
    AppendResult, Entry, EntryKind, MemStorage, Message, MessageKind, Raft, RaftConfig, ReadState,
    Ready, Role, Storage,
};
use check::Checker;

/// Knobs of one simulated run.
#[derive(Debug, Clone)]
pub struct SimConfig {
    /// Seed of everything random in the run.
    pub seed: u64,
    /// Voters the cluster starts with (ids `1..=nodes`).
    pub nodes: u64,
    /// Extra nodes started empty, waiting to be added (ids after the voters).
    pub spares: u64,
    /// Per-step probability that the leader proposes a random configuration change.
    pub conf_change: f64,
    /// Per-step probability that the leader starts a transfer to a random voter.
    pub transfer: f64,
    /// Promotion lag allowed (see [`RaftConfig::max_promote_lag`]).
    pub max_promote_lag: u64,
    /// Steps (each: one tick of every running node, then deliveries).
    pub steps: u64,
    /// Probability that a message is lost.
    pub drop: f64,
    /// Probability that a message is delivered twice.
    pub duplicate: f64,
    /// Messages take 0..=max_delay steps (so they reorder).
    pub max_delay: u64,
    /// Per-step probability of a new random partition (possibly asymmetric).
    pub partition: f64,
    /// Per-step probability of healing every partition.
    pub heal: f64,
    /// Per-step probability of crashing a random node (losing unpersisted writes).
    pub crash: f64,
    /// Per-step probability of pausing a random node for a while.
    pub pause: f64,
    /// Per-step probability of a client proposal (at the node that believes it leads).
    pub propose: f64,
    /// Per-step probability of a linearizable read at a random node.
    pub read: f64,
    /// Compact a node's log once it has applied this many entries past its snapshot.
    pub compact_every: u64,
    /// Entries kept behind the applied index when compacting.
    pub compact_margin: u64,
    /// Record a digest of every Ready (for determinism checks).
    pub trace: bool,
    /// Pre-vote on every node.
    pub pre_vote: bool,
    /// Check-quorum on every node.
    pub check_quorum: bool,
    /// Inflight window per follower.
    pub max_inflight_msgs: usize,
    /// Append batch / snapshot chunk byte cap.
    pub max_size_per_msg: u64,
}

impl SimConfig {
    /// A default faulty run for `seed`.
    pub fn new(seed: u64) -> SimConfig {
        SimConfig {
            seed,
            nodes: 3,
            spares: 1,
            conf_change: 0.02,
            transfer: 0.004,
            max_promote_lag: 20,
            steps: 1500,
            drop: 0.05,
            duplicate: 0.02,
            max_delay: 2,
            partition: 0.01,
            heal: 0.03,
            crash: 0.004,
            pause: 0.004,
            propose: 0.3,
            read: 0.1,
            compact_every: 40,
            compact_margin: 5,
            trace: false,
            pre_vote: true,
            check_quorum: true,
            max_inflight_msgs: 4,
            max_size_per_msg: 256,
        }
    }
}

/// What a run did (for reports and determinism checks).
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct SimStats {
    /// Proposals accepted by a leader.
    pub proposed: u64,
    /// Proposals applied on their proposer in the term they were proposed (acknowledged).
    pub acknowledged: u64,
    /// Reads answered with a read index and served.
    pub reads: u64,
    /// Crashes.
    pub crashes: u64,
    /// Crashes of a leader that had applied (and answered) committed entries of a Ready
    /// before its new entries were durable (the lockd driver's order).
    pub crashes_after_apply_first: u64,
    /// Snapshots installed from a leader.
    pub snapshots_installed: u64,
    /// Configuration changes appended by a leader.
    pub conf_changes: u64,
    /// Promotions among them.
    pub promotions: u64,
    /// Removals of the proposing leader itself among them.
    pub leader_removals: u64,
    /// Leader transfers started.
    pub transfers: u64,
    /// Highest term with a leader.
    pub max_term: u64,
    /// Indexes known committed.
    pub committed: u64,
    /// FNV digest over every Ready (when tracing).
    pub trace_digest: u64,
}

/// One simulated node: the core (None while crashed), its durable storage while crashed, and
/// its state machine (applied atomically with persistence, so it survives crashes).
#[derive(Debug)]
struct SimNode {
    raft: Option<Raft<MemStorage>>,
    /// Durable storage while crashed.
    down_store: Option<MemStorage>,
    /// Step at which a crashed node restarts.
    restart_at: u64,
    /// While now < paused_until, the node neither ticks nor receives.
    paused_until: u64,
    cfg: RaftConfig,
    fsm: MemStore,
    /// Every applied entry from the last snapshot on (the snapshot's data = all applied
    /// entries; installing replays them into a fresh state machine).
    applied_log: Vec<Entry>,
    applied: u64,
    /// Proposals made here: index → (term, step when proposed).
    proposals: BTreeMap<u64, u64>,
    /// Reads with a known index waiting for apply: (ctx, index).
    ready_reads: Vec<ReadState>,
}

/// A whole-cluster simulation.
#[derive(Debug)]
pub struct Sim {
    cfg: SimConfig,
    rng: ChaCha8Rng,
    now: u64,
    nodes: BTreeMap<u64, SimNode>,
    /// Messages in flight by (delivery step, tiebreak).
    inflight: BTreeMap<(u64, u64), Message>,
    /// Cut links (from, to).
    cut: BTreeSet<(u64, u64)>,
    checker: Checker,
    /// Highest revision of a write acknowledged so far.
    acked_rev: u64,
    /// Reads in progress: (node, ctx) → highest acknowledged revision when they began.
    reads: BTreeMap<(u64, u64), u64>,
    next_ctx: u64,
    stats: SimStats,
}

fn fnv(h: u64, bytes: &[u8]) -> u64 {
    bytes
        .iter()
        .fold(h, |h, b| (h ^ u64::from(*b)).wrapping_mul(0x100_0000_01b3))
}

fn digest(store: &MemStore) -> u64 {
    fnv(0xcbf2_9ce4_8422_2325, format!("{store:?}").as_bytes())
}

/// Snapshot data of the simulation: every applied entry (replayed on install).
fn encode_entries(entries: &[Entry]) -> Vec<u8> {
    bincode::encode_to_vec(entries, bincode::config::standard()).unwrap_or_default()
}

fn decode_entries(data: &[u8]) -> Option<Vec<Entry>> {
    bincode::decode_from_slice(data, bincode::config::standard())
        .ok()
        .map(|(v, _)| v)
}

fn fresh_fsm() -> MemStore {
    let mut s = MemStore::default();
    // An in-memory store cannot fail.
    let _ = fsm::bootstrap(&mut s);
    s
}

impl Sim {
    /// A cluster of `cfg.nodes` fresh voters and `cfg.spares` empty nodes.
    pub fn new(cfg: SimConfig) -> Sim {
        let mut rng = ChaCha8Rng::seed_from_u64(cfg.seed);
        let voters: Vec<u64> = (1..=cfg.nodes).collect();
        let mut nodes = BTreeMap::new();
        for id in 1..=cfg.nodes + cfg.spares {
            let rc = RaftConfig {
                seed: rng.random(),
                pre_vote: cfg.pre_vote,
                check_quorum: cfg.check_quorum,
                max_inflight_msgs: cfg.max_inflight_msgs,
                max_size_per_msg: cfg.max_size_per_msg,
                max_promote_lag: cfg.max_promote_lag,
                ..RaftConfig::new(id)
            };
            // A spare starts without configuration, like `lockd --join`.
            let store = if id <= cfg.nodes {
                MemStorage::new_with_voters(voters.clone())
            } else {
                MemStorage::new_with_voters([])
            };
            let raft = Raft::new(rc.clone(), store).unwrap_or_else(|e| panic!("bad config: {e}"));
            nodes.insert(
                id,
                SimNode {
                    raft: Some(raft),
                    down_store: None,
                    restart_at: 0,
                    paused_until: 0,
                    cfg: rc,
                    fsm: fresh_fsm(),
                    applied_log: Vec::new(),
                    applied: 0,
                    proposals: BTreeMap::new(),
                    ready_reads: Vec::new(),
                },
            );
        }
        Sim {
            cfg,
            rng,
            now: 0,
            nodes,
            inflight: BTreeMap::new(),
            cut: BTreeSet::new(),
            checker: Checker::default(),
            acked_rev: 0,
            reads: BTreeMap::new(),
            next_ctx: 0,
            stats: SimStats::default(),
        }
    }

    /// Runs every step; `Err` names the step and the violated invariant.
    pub fn run(mut self) -> Result<SimStats, String> {
        for _ in 0..self.cfg.steps {
            self.step()
                .map_err(|e| format!("seed {} step {}: {e}", self.cfg.seed, self.now))?;
        }
        // Quiesce: heal everything and let the cluster settle, then check liveness.
        self.cut.clear();
        for n in self.nodes.values_mut() {
            n.paused_until = 0;
            n.restart_at = 0;
        }
        let quiet = SimConfig {
            drop: 0.0,
            duplicate: 0.0,
            partition: 0.0,
            crash: 0.0,
            pause: 0.0,
            conf_change: 0.0,
            transfer: 0.0,
            ..self.cfg.clone()
        };
        self.cfg = quiet;
        for _ in 0..200 {
            self.step()
                .map_err(|e| format!("seed {} step {} (settling): {e}", self.cfg.seed, self.now))?;
        }
        let leaders = self.running().filter(|r| r.role() == Role::Leader).count();
        if leaders != 1 {
            return Err(format!(
                "seed {}: {leaders} leaders after healing\n{}",
                self.cfg.seed,
                self.describe()
            ));
        }
        self.stats.max_term = self.checker.max_term();
        self.stats.committed = self.checker.committed_count() as u64;
        Ok(self.stats)
    }

    /// One line per running node: role, term, log, commit and configuration.
    fn describe(&self) -> String {
        let mut out = String::new();
        for r in self.running() {
            let conf = r.conf();
            out.push_str(&format!(
                "node {}: {:?} term {} leader {:?} last {} (term {}) commit {} voters {:?} learners {:?}\n",
                r.id(),
                r.role(),
                r.term(),
                r.leader(),
                r.last_index(),
                r.raft_log().last_term(),
                r.commit(),
                conf.voters,
                conf.learners,
            ));
        }
        out
    }

    fn running(&self) -> impl Iterator<Item = &Raft<MemStorage>> {
        self.nodes.values().filter_map(|n| n.raft.as_ref())
    }

    fn step(&mut self) -> Result<(), String> {
        self.now += 1;
        self.faults();
        let ids: Vec<u64> = self.nodes.keys().copied().collect();
        for &id in &ids {
            let now = self.now;
            let n = self.node(id);
            if n.paused_until <= now {
                if let Some(r) = &mut n.raft {
                    r.tick();
                }
            }
            self.process(id)?;
        }
        self.clients();
        self.membership();
        self.deliver()?;
        for &id in &ids {
            self.process(id)?;
            self.maybe_compact(id);
        }
        let cores = self.nodes.values().filter_map(|n| n.raft.as_ref());
        self.checker.check_cores(cores)?;
        for n in self.nodes.values() {
            if let Some(s) = n.raft.as_ref().map(|r| r.store()).or(n.down_store.as_ref()) {
                check::check_store(s)?;
            }
        }
        Ok(())
    }

    fn node(&mut self, id: u64) -> &mut SimNode {
        self.nodes
            .get_mut(&id)
            .unwrap_or_else(|| unreachable!("node {id} exists"))
    }

    fn faults(&mut self) {
        let n = self.cfg.nodes + self.cfg.spares;
        if self.rng.random_bool(self.cfg.partition) {
            // Split into two random sides; sometimes only one direction is cut.
            let side: BTreeSet<u64> = (1..=n).filter(|_| self.rng.random_bool(0.5)).collect();
            let one_way = self.rng.random_bool(0.3);
            for a in 1..=n {
                for b in 1..=n {
                    if side.contains(&a) && !side.contains(&b) {
                        self.cut.insert((a, b));
                        if !one_way {
                            self.cut.insert((b, a));
                        }
                    }
                }
            }
        }
        if self.rng.random_bool(self.cfg.heal) {
            self.cut.clear();
        }
        if self.rng.random_bool(self.cfg.crash) {
            let id = self.rng.random_range(1..=n);
            self.crash(id);
        }
        if self.rng.random_bool(self.cfg.pause) {
            let id = self.rng.random_range(1..=n);
            let until = self.now + self.rng.random_range(5..40);
            self.node(id).paused_until = until;
        }
        let now = self.now;
        let restarts: Vec<u64> = self
            .nodes
            .iter()
            .filter(|(_, n)| n.raft.is_none() && n.restart_at <= now)
            .map(|(id, _)| *id)
            .collect();
        for id in restarts {
            self.restart(id);
        }
    }

    /// Crashes `id` mid-Ready: its early messages may be out, its writes are lost.
    fn crash(&mut self, id: u64) {
        let restart_at = self.now + self.rng.random_range(5..60);
        let Some(mut raft) = self.node(id).raft.take() else {
            return;
        };
        if raft.has_ready() {
            let rd = raft.ready();
            for m in rd.early_messages {
                self.send(m);
            }
        }
        self.go_down(id, raft, restart_at);
    }

    /// A crash's bookkeeping: what `raft` made durable is what the node restarts from.
    fn go_down(&mut self, id: u64, raft: Raft<MemStorage>, restart_at: u64) {
        let n = self.node(id);
        n.down_store = Some(raft.store().clone());
        n.restart_at = restart_at;
        n.ready_reads.clear();
        n.proposals.clear();
        self.reads.retain(|(node, _), _| *node != id);
        self.stats.crashes += 1;
    }

    fn restart(&mut self, id: u64) {
        let n = self.node(id);
        let Some(store) = n.down_store.take() else {
            return;
        };
        let cfg = RaftConfig {
            applied: n.applied,
            ..n.cfg.clone()
        };
        n.raft = Some(Raft::new(cfg, store).unwrap_or_else(|e| panic!("restart: {e}")));
    }

    fn send(&mut self, m: Message) {
        if self.cut.contains(&(m.from, m.to)) || self.rng.random_bool(self.cfg.drop) {
            return;
        }
        let copies = if self.rng.random_bool(self.cfg.duplicate) {
            2
        } else {
            1
        };
        for _ in 0..copies {
            let at = self.now + self.rng.random_range(0..=self.cfg.max_delay);
            let tiebreak = self.rng.random();
            self.inflight.insert((at, tiebreak), m.clone());
        }
    }

    fn deliver(&mut self) -> Result<(), String> {
        while let Some(entry) = self.inflight.first_entry() {
            if entry.key().0 > self.now {
                break;
            }
            let m = entry.remove();
            let now = self.now;
            let to = m.to;
            let n = self.node(to);
            if n.paused_until > now {
                // Held until the pause ends (a paused process reads its socket later).
                let at = n.paused_until;
                let tiebreak = self.rng.random();
                self.inflight.insert((at, tiebreak), m);
                continue;
            }
            if let Some(r) = &mut n.raft {
                r.step(m);
            }
            self.process(to)?;
        }
        Ok(())
    }

    /// Handles the Readies of `id` per the contract (crash points are in `crash`).
    fn process(&mut self, id: u64) -> Result<(), String> {
        for _ in 0..10 {
            let Some(raft) = self.node(id).raft.as_mut() else {
                return Ok(());
            };
            if !raft.has_ready() {
                return Ok(());
            }
            let rd = raft.ready();
            if self.cfg.trace {
                self.stats.trace_digest =
                    fnv(self.stats.trace_digest, format!("{id}{rd:?}").as_bytes());
            }
            for m in rd.early_messages.clone() {
                if !matches!(m.kind, MessageKind::Append { .. })
                    || rd.soft_state.role != Role::Leader
                {
                    return Err(format!("node {id} may not send {m:?} before persisting"));
                }
                self.send(m);
            }
            if self.apply_first_then_crash(id, &rd)? {
                return Ok(());
            }
            self.persist(id, &rd);
            for m in rd.messages.clone() {
                self.check_durable(id, &m)?;
                self.send(m);
            }
            self.apply(id, &rd)?;
            if let Some(raft) = self.node(id).raft.as_mut() {
                raft.advance(&rd);
            }
        }
        Ok(())
    }

    /// The lockd driver's order with several voters (`persist_order`): a leader applies the
    /// committed entries below a Ready's first new entry, and answers their proposers, before
    /// making the new entries durable. Sometimes crash right between the two (at ten times
    /// the crash rate); true if it did.
    fn apply_first_then_crash(&mut self, id: u64, rd: &Ready) -> Result<bool, String> {
        let first_new = rd.entries.first().map_or(u64::MAX, |e| e.index);
        let applies_first = rd.soft_state.role == Role::Leader
            && rd.snapshot.is_none()
            && !rd.entries.is_empty()
            && !rd.committed_entries.is_empty()
            && rd.committed_entries.iter().all(|e| e.index < first_new);
        if !applies_first || !self.rng.random_bool((self.cfg.crash * 10.0).min(1.0)) {
            return Ok(false);
        }
        let mut applied_part = rd.clone();
        applied_part.read_states.clear();
        self.apply(id, &applied_part)?;
        let restart_at = self.now + self.rng.random_range(5..60);
        if let Some(raft) = self.node(id).raft.take() {
            self.go_down(id, raft, restart_at);
            self.stats.crashes_after_apply_first += 1;
        }
        Ok(true)
    }

    /// Persist before send (DESIGN §3a.1): what a message claims is durable on its sender.
    fn check_durable(&mut self, id: u64, m: &Message) -> Result<(), String> {
        let Some(store) = self.node(id).raft.as_ref().map(|r| r.store()) else {
            return Ok(());
        };
        let hs = store.hard_state();
        let ok = match &m.kind {
            MessageKind::PreVote { .. } | MessageKind::PreVoteResp { reject: false } => true,
            MessageKind::VoteResp { reject: false } => hs.term == m.term && hs.vote == m.to,
            MessageKind::AppendResp {
                result: AppendResult::Match(i),
            } => hs.term >= m.term && store.last_index().is_ok_and(|l| l >= *i),
            _ => hs.term >= m.term,
        };
        if ok {
            Ok(())
        } else {
            Err(format!(
                "persist before send: node {id} sends {m:?} with durable {hs:?}"
            ))
        }
    }

    fn persist(&mut self, id: u64, rd: &Ready) {
        let n = self.node(id);
        let Some(raft) = n.raft.as_mut() else { return };
        if let Some(s) = &rd.snapshot {
            raft.store_mut()
                .apply_snapshot(s.meta.clone(), s.data.clone());
        }
        raft.store_mut().append(&rd.entries);
        if let Some(hs) = rd.hard_state {
            raft.store_mut().set_hard_state(hs);
        }
    }

    fn apply(&mut self, id: u64, rd: &Ready) -> Result<(), String> {
        if let Some(s) = &rd.snapshot {
            let entries: Vec<Entry> = decode_entries(&s.data)
                .ok_or_else(|| format!("node {id}: undecodable snapshot"))?;
            let n = self.node(id);
            n.fsm = fresh_fsm();
            n.applied_log.clear();
            n.applied = 0;
            for e in &entries {
                self.apply_one(id, e)?;
            }
            self.stats.snapshots_installed += 1;
        }
        for e in &rd.committed_entries {
            if e.index <= self.node(id).applied {
                continue;
            }
            self.apply_one(id, e)?;
        }
        for rs in &rd.read_states {
            self.node(id).ready_reads.push(*rs);
        }
        self.serve_reads(id)
    }

    fn apply_one(&mut self, id: u64, e: &Entry) -> Result<(), String> {
        let now = self.now;
        let n = self.node(id);
        if e.index != n.applied + 1 {
            return Err(format!("node {id} applies {} after {}", e.index, n.applied));
        }
        fsm::apply(&mut n.fsm, e).map_err(|err| format!("fsm: {err:?}"))?;
        n.applied = e.index;
        n.applied_log.push(e.clone());
        let acked = n.proposals.remove(&e.index).is_some_and(|t| t == e.term);
        let d = digest(&n.fsm);
        let _ = now;
        if acked {
            self.acked_rev = self.acked_rev.max(e.index);
            self.stats.acknowledged += 1;
        }
        self.checker.applied(id, e, d)
    }

    fn serve_reads(&mut self, id: u64) -> Result<(), String> {
        let n = self.node(id);
        let applied = n.applied;
        let (ready, waiting): (Vec<ReadState>, Vec<ReadState>) =
            n.ready_reads.drain(..).partition(|r| r.index <= applied);
        n.ready_reads = waiting;
        for r in ready {
            if let Some(min) = self.reads.remove(&(id, r.ctx)) {
                if r.index < min {
                    return Err(format!(
                        "linearizability: read {} on node {id} got index {} < acknowledged write {min}",
                        r.ctx, r.index
                    ));
                }
                self.stats.reads += 1;
            }
        }
        Ok(())
    }

    fn clients(&mut self) {
        let n = self.cfg.nodes + self.cfg.spares;
        if self.rng.random_bool(self.cfg.propose) {
            let leader = self
                .nodes
                .iter()
                .find(|(_, nd)| {
                    nd.raft.as_ref().is_some_and(|r| r.role() == Role::Leader)
                        && nd.paused_until <= self.now
                })
                .map(|(id, _)| *id);
            if let Some(id) = leader {
                let close = self.rng.random_bool(0.3);
                let hi = self.node(id).applied.max(1);
                let target = self.rng.random_range(1..=hi);
                let now = self.now;
                let nd = self.node(id);
                if let Some(r) = nd.raft.as_mut() {
                    let kind = if close {
                        Command::CloseSession {
                            session: SessionId(target),
                        }
                    } else {
                        Command::OpenSession {
                            ttl_ms: 10_000,
                            tick_ms: 100,
                            drift_ppm: 100,
                            implicit: false,
                        }
                    };
                    let term = r.term();
                    if let Ok(index) = r.propose(EntryKind::Command(kind), term, now) {
                        nd.proposals.insert(index, term);
                        self.stats.proposed += 1;
                    }
                }
            }
        }
        if self.rng.random_bool(self.cfg.read) {
            let id = self.rng.random_range(1..=n);
            self.next_ctx += 1;
            let ctx = self.next_ctx;
            let min = self.acked_rev;
            let nd = self.node(id);
            if let Some(r) = nd.raft.as_mut() {
                if r.read_index(ctx).is_ok() {
                    self.reads.insert((id, ctx), min);
                }
            }
        }
    }

    /// Takes a snapshot at the applied index and compacts with a margin.
    fn maybe_compact(&mut self, id: u64) {
        let (every, margin) = (self.cfg.compact_every, self.cfg.compact_margin);
        let n = self.node(id);
        let Some(raft) = n.raft.as_mut() else { return };
        let snap_index = raft.store().snapshot_meta().map_or(0, |m| m.index);
        if n.applied < snap_index + every || raft.raft_log().pending_snapshot().is_some() {
            return;
        }
        if raft.store().last_index().unwrap_or(0) < n.applied {
            return;
        }
        let data = encode_entries(&n.applied_log);
        let store = raft.store_mut();
        store.create_snapshot(n.applied, data);
        store.compact(n.applied.saturating_sub(margin));
    }
}
