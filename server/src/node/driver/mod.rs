//! The node's loop: one thread that owns the [`Raft`] core over the redb [`RaftStore`] and
//! drives it by the Ready contract of [`crate::raft`].
//!
//! Each cycle takes every input waiting (peer messages, client proposals, reads, keepalives;
//! up to `max_batch` proposals), ticks the core when a tick is due, does the tick's session
//! work, proposes the queued commands (a follower answers `NotLeader { leader_hint }` at
//! once), and then handles Ready after Ready: early messages (the leader's own appends) go
//! out first; the Ready's new entries and hard state are made durable with one fsync (group
//! commit) and its committed entries applied, in one redb transaction or, with several
//! voters, in two ([`Driver::persist_order`]: a leader applies first and answers without
//! waiting for the fsync of newer entries, a follower acknowledges first); the other
//! messages go out once the writes are durable; the applied entries' events are published,
//! the published index advances, proposers of applied entries are answered, and the core is
//! advanced.
//!
//! A proposal is remembered by (index, term). It is answered with the state machine's
//! outcome only if the entry applied at its index has its term; if another term's entry took
//! that index, the proposal never applied and gets `NotLeader` (safe to retry): never
//! somebody else's answer. Linearizable reads and keepalives go through
//! [`Raft::read_index`]: a read is answered once applied ≥ its read index, a keepalive is
//! renewed then by the leader's [`LeaderDuties`] (DESIGN §3a.4). A follower passes its
//! keepalives to the leader in one batch per tick ([`Forwarder`]).
//!
//! What this module must not do: answer a proposal before its entry is committed, durable
//! and applied; send `messages` before the Ready is durable; expire sessions or fire lock
//! timers unless its leadership is active. A storage failure stops the loop (fail-stop):
//! after a failed fsync it cannot know what is durable.

use std::collections::{BTreeMap, BTreeSet};
use std::sync::atomic::Ordering;
use std::time::{Duration, Instant};

use tokio::sync::mpsc::error::TryRecvError;
use tokio::sync::mpsc::UnboundedReceiver;

use lockd_protocol::{Error, SessionId};

mod membership;
mod ready;

use super::forward::{Forwarder, KeepAliveReply};
use super::leader::LeaderDuties;
use super::peer::{Inbound, SideMessage};
use super::replicated::{Input, Outbox, ProposalReply, Publish, ReadReply, ReplicatedConfig};
use super::watch::Published;
use crate::fsm::Command;
use crate::raft::{Configuration, EntryKind, MemberInfo, ProposeError, Raft, Role};
use crate::storage::{RaftStore, StorageError};

/// Readies handled per cycle before the loop looks at its inputs again.
const MAX_READIES_PER_CYCLE: usize = 16;

/// The loop's two queues, waited on together: requests from this node's connections, and
/// what the peer transport delivers (taken straight from its channel: no thread in between,
/// since every hand-off between threads costs a wake-up on each replicated write).
pub(super) struct Inputs {
    clients: UnboundedReceiver<Input>,
    /// `None` once the transport is gone (in a one-member cluster, from the start).
    peers: Option<tokio::sync::mpsc::Receiver<Inbound>>,
    /// A current-thread runtime to wait on both queues and the next tick at once.
    runtime: tokio::runtime::Runtime,
}

/// Every client-side sender is gone.
#[derive(Debug)]
pub(super) struct Closed;

fn from_peer(inbound: Inbound) -> Input {
    match inbound {
        Inbound::Raft(m) => Input::Peer(m),
        Inbound::Side { from, message } => Input::Side { from, message },
    }
}

impl Inputs {
    pub fn new(
        clients: UnboundedReceiver<Input>,
        peers: tokio::sync::mpsc::Receiver<Inbound>,
    ) -> std::io::Result<Inputs> {
        let runtime = tokio::runtime::Builder::new_current_thread()
            .enable_time()
            .build()?;
        Ok(Inputs {
            clients,
            peers: Some(peers),
            runtime,
        })
    }

    /// The next input waiting, peers first, without blocking.
    fn try_next(&mut self) -> Result<Option<Input>, Closed> {
        if let Some(peers) = &mut self.peers {
            match peers.try_recv() {
                Ok(inbound) => return Ok(Some(from_peer(inbound))),
                Err(TryRecvError::Disconnected) => self.peers = None,
                Err(TryRecvError::Empty) => {}
            }
        }
        match self.clients.try_recv() {
            Ok(input) => Ok(Some(input)),
            Err(TryRecvError::Empty) => Ok(None),
            Err(TryRecvError::Disconnected) => Err(Closed),
        }
    }

    /// Waits for the next input until `deadline`, polling for `spin` first: waking a parked
    /// thread costs tens of µs on a small VM, and a client that just got its answer usually
    /// sends the next request within that time.
    fn wait(&mut self, deadline: Instant, spin: Duration) -> Result<Option<Input>, Closed> {
        let spin_until = Instant::now() + spin;
        loop {
            if let Some(input) = self.try_next()? {
                return Ok(Some(input));
            }
            if Instant::now() >= spin_until {
                break;
            }
            std::hint::spin_loop();
        }
        let Inputs {
            clients,
            peers,
            runtime,
        } = self;
        let deadline = tokio::time::Instant::from_std(deadline);
        runtime.block_on(async {
            let peer = async {
                match peers.as_mut() {
                    Some(p) => p.recv().await,
                    None => std::future::pending().await,
                }
            };
            tokio::select! {
                input = clients.recv() => input.map(Some).ok_or(Closed),
                inbound = peer => match inbound {
                    Some(inbound) => Ok(Some(from_peer(inbound))),
                    None => Ok(None),
                },
                _ = tokio::time::sleep_until(deadline) => Ok(None),
            }
        })
    }
}

/// A client proposal waiting for its entry to apply.
#[derive(Debug)]
struct Pending {
    term: u64,
    reply: ProposalReply,
    /// It opens a connection's implicit session: pin it here once applied.
    implicit_open: bool,
}

/// Who asked for a keepalive: a client of this node, or a follower's batch.
#[derive(Debug)]
enum KeepAliveFrom {
    Local(KeepAliveReply),
    Peer { from: u64, id: u64 },
}

/// A keepalive on the leader, waiting for its quorum round (and maybe an expiry entry).
#[derive(Debug)]
struct KeepAliveJob {
    sessions: Vec<SessionId>,
    from: KeepAliveFrom,
}

impl KeepAliveJob {
    /// Answers with an error (a follower's batch just goes unanswered and times out there).
    fn fail(self, error: Error) {
        if let KeepAliveFrom::Local(reply) = self.from {
            let _ = reply.send(Err(error));
        }
    }
}

/// What waits on a read index.
#[derive(Debug)]
enum Waiting {
    Read(ReadReply),
    KeepAlive(KeepAliveJob),
}

impl Waiting {
    fn fail(self, error: Error) {
        match self {
            Waiting::Read(reply) => {
                let _ = reply.send(Err(error));
            }
            Waiting::KeepAlive(job) => job.fail(error),
        }
    }
}

/// The state owned by the loop thread.
pub(super) struct Driver {
    raft: Raft<RaftStore>,
    config: ReplicatedConfig,
    outbox: Box<dyn Outbox>,
    publish: Publish,
    /// Client proposals by log index. Invariant: every key > the applied index at the end of
    /// a cycle.
    proposals: BTreeMap<u64, Pending>,
    /// Read-index requests asked of the core, by ctx, with the time they were asked.
    asked: BTreeMap<u64, (Instant, Waiting)>,
    /// Requests whose read index is known, waiting for applied ≥ index.
    indexed: Vec<(u64, Waiting)>,
    /// Keepalives waiting for an `Expire` entry of theirs to apply, by that entry's index.
    deferred: Vec<(u64, KeepAliveJob)>,
    next_ctx: u64,
    /// Commands taken from the channel this cycle, proposed after the tick.
    queued: Vec<(Command, ProposalReply)>,
    /// Entry time: `time_base_ms` + monotonic time since `clock_base` (DESIGN §3a.12),
    /// rebased when this node becomes leader.
    time_base_ms: u64,
    clock_base: Instant,
    /// Role and term at the end of the previous cycle.
    was_leader: bool,
    seen_term: u64,
    duties: LeaderDuties,
    forwarder: Forwarder,
    /// Implicit sessions of this node's live connections: never expired while pinned.
    pinned: BTreeSet<SessionId>,
    /// The leader transfer this node started, if any.
    transfer: Option<membership::Transfer>,
    /// Whether this node has been in a configuration (a joining node is not yet).
    was_member: bool,
    /// The configuration the transport was last pointed at, and members removed by an
    /// uncommitted change that it still reaches (`membership::reach_members`).
    reached: Configuration,
    departing: BTreeMap<u64, MemberInfo>,
}

impl Driver {
    /// A driver around `raft`. A sole voter campaigns (and wins) here, without waiting for
    /// an election timeout: ticks are this core's only clock, so ticking it is the way.
    pub fn new(
        mut raft: Raft<RaftStore>,
        config: ReplicatedConfig,
        outbox: Box<dyn Outbox>,
        publish: Publish,
    ) -> Result<Driver, StorageError> {
        let voters = &raft.tracker().conf.voters;
        if voters.len() == 1 && voters.contains(&raft.id()) {
            for _ in 0..2 * config.raft.election_tick + 2 {
                if raft.role() == Role::Leader {
                    break;
                }
                raft.tick();
            }
        }
        publish
            .status
            .applied
            .store(raft.applied(), Ordering::Release);

        let tick_ms = config.tick.as_millis().max(1) as u64;
        let mut driver = Driver {
            time_base_ms: raft.last_entry_time(),
            clock_base: Instant::now(),
            seen_term: raft.term(),
            raft,
            config,
            outbox,
            publish,
            proposals: BTreeMap::new(),
            asked: BTreeMap::new(),
            indexed: Vec::new(),
            deferred: Vec::new(),
            // Random, not 1: an answer queued for this node's previous process (the leader's
            // peer queue outlives a reconnect) must not match a read of this one.
            next_ctx: (super::random_u64() >> 1) | 1,
            queued: Vec::new(),
            was_leader: false,
            duties: LeaderDuties::new(tick_ms),
            forwarder: Forwarder::default(),
            pinned: BTreeSet::new(),
            transfer: None,
            was_member: false,
            reached: Configuration::default(),
            departing: BTreeMap::new(),
        };
        driver.reach_members();
        driver.publish_status();
        Ok(driver)
    }

    /// Runs until `Shutdown`, every sender is gone, or storage fails.
    pub fn run(mut self, mut inputs: Inputs) -> Result<(), StorageError> {
        let tick = self.config.tick;
        let mut next_tick = Instant::now() + tick;
        loop {
            let first = if self.raft.has_ready() {
                inputs.try_next()
            } else {
                inputs.wait(next_tick, self.config.spin)
            };
            let Ok(first) = first else {
                break;
            };
            let mut stop = false;
            let mut input = first;
            while let Some(i) = input {
                stop |= self.take(i);
                if stop || self.queued.len() >= self.config.max_batch {
                    break;
                }
                input = inputs.try_next().unwrap_or(None);
            }
            if stop {
                break;
            }
            let now = Instant::now();
            if now >= next_tick {
                self.raft.tick();
                self.on_tick(now);
                next_tick += tick;
                if next_tick < now {
                    next_tick = now + tick;
                }
            }
            self.propose_queued();
            for _ in 0..MAX_READIES_PER_CYCLE {
                if !self.raft.has_ready() {
                    break;
                }
                if let Err(e) = self.handle_ready() {
                    tracing::error!(node = self.raft.id(), error = %e, "storage failed; stopping");
                    self.fail_all(&Error::Storage(e.to_string()));
                    return Err(e);
                }
            }
            self.after_cycle();
        }
        self.fail_all(&Error::ShuttingDown);
        Ok(())
    }

    /// Takes one input. True on `Shutdown`.
    fn take(&mut self, input: Input) -> bool {
        match input {
            Input::Peer(m) => self.raft.step(m),
            Input::Side { from, message } => self.take_side(from, message),
            Input::Propose { command, reply } => self.queued.push((command, reply)),
            Input::Read { reply } => self.ask_read_index(Waiting::Read(reply)),
            Input::KeepAlive { sessions, reply } => {
                if self.raft.role() == Role::Leader {
                    let from = KeepAliveFrom::Local(reply);
                    self.ask_read_index(Waiting::KeepAlive(KeepAliveJob { sessions, from }));
                } else {
                    self.forwarder.gather(sessions, reply);
                }
            }
            Input::ChangeMembers { change, reply } => self.change_members(change, reply),
            Input::Transfer { to, reply } => self.start_transfer(to, reply),
            Input::Unpin { session } => {
                self.pinned.remove(&session);
                self.duties.unpin(session);
            }
            Input::Shutdown => return true,
        }
        false
    }

    fn take_side(&mut self, from: u64, message: SideMessage) {
        match message {
            SideMessage::KeepAlive { id, sessions } => {
                if self.raft.role() == Role::Leader {
                    let from = KeepAliveFrom::Peer { from, id };
                    self.ask_read_index(Waiting::KeepAlive(KeepAliveJob { sessions, from }));
                } else {
                    tracing::debug!(from, id, "keepalive batch for a node that does not lead");
                }
            }
            SideMessage::KeepAliveAck { id, results } => self.forwarder.acknowledged(id, results),
        }
    }

    /// Asks the core for a read index on behalf of `waiting`: one quorum round of the
    /// leader's current term, begun after now (§6.4), batched with every other request.
    fn ask_read_index(&mut self, waiting: Waiting) {
        let ctx = self.next_ctx;
        self.next_ctx += 1;
        match self.raft.read_index(ctx) {
            Ok(()) => {
                self.asked.insert(ctx, (Instant::now(), waiting));
            }
            Err(_) => waiting.fail(self.not_leader()),
        }
    }

    /// The tick's work besides the core's: keepalive batches of a follower, timeouts, and an
    /// active leader's expiry and lock timers.
    fn on_tick(&mut self, now: Instant) {
        let timeout = self.config.read_timeout;
        let leaderless = &self.publish.status.leaderless_ticks;
        if self.raft.leader().is_some() {
            leaderless.store(0, Ordering::Release);
        } else {
            leaderless.fetch_add(1, Ordering::AcqRel);
        }
        self.forwarder.expire(timeout);
        if self.raft.role() != Role::Leader {
            let leader = self.raft.leader().filter(|&l| l != self.raft.id());
            self.forwarder.flush(
                leader,
                &self.pinned,
                self.config.pin_refresh,
                self.outbox.as_ref(),
            );
        }
        let late: Vec<u64> = self
            .asked
            .iter()
            .filter(|(_, (at, _))| now.duration_since(*at) >= timeout)
            .map(|(&ctx, _)| ctx)
            .collect();
        for ctx in late {
            if let Some((_, waiting)) = self.asked.remove(&ctx) {
                waiting.fail(Error::Unavailable("read index timed out".into()));
            }
        }
        if self.duties.active_term() != Some(self.raft.term()) {
            return;
        }
        self.identify_members();
        let expired = self.duties.take_expired();
        if !expired.is_empty() {
            if let Some(index) = self.propose_own(Command::Expire {
                sessions: expired.clone(),
            }) {
                self.duties.expiring(&expired, index);
            }
        }
        for command in self.duties.due_lock_commands(self.entry_time_ms()) {
            self.propose_own(command);
        }
    }

    fn entry_time_ms(&self) -> u64 {
        self.time_base_ms + self.clock_base.elapsed().as_millis() as u64
    }

    /// Proposes an entry the loop decided on (expiry, lock timers); its index if appended.
    fn propose_own(&mut self, command: Command) -> Option<u64> {
        let time_ms = self.entry_time_ms();
        let term = self.raft.term();
        match self
            .raft
            .propose(EntryKind::Command(command), term, time_ms)
        {
            Ok(index) => {
                if let Some(old) = self.proposals.remove(&index) {
                    let _ = old.reply.send(Err(self.not_leader()));
                }
                Some(index)
            }
            Err(e) => {
                tracing::warn!(error = %e, "could not propose a leader entry");
                None
            }
        }
    }

    fn propose_queued(&mut self) {
        if self.queued.is_empty() {
            return;
        }
        let time_ms = self.entry_time_ms();
        let term = self.raft.term();
        for (command, reply) in std::mem::take(&mut self.queued) {
            let implicit_open = matches!(command, Command::OpenSession { implicit: true, .. });
            match self
                .raft
                .propose(EntryKind::Command(command), term, time_ms)
            {
                Ok(index) => {
                    let pending = Pending {
                        term,
                        reply,
                        implicit_open,
                    };
                    // A leftover at this index belongs to an entry that was truncated.
                    if let Some(old) = self.proposals.insert(index, pending) {
                        let _ = old.reply.send(Err(self.not_leader()));
                    }
                }
                Err(ProposeError::NotLeader { leader_hint }) => {
                    let _ = reply.send(Err(Error::NotLeader { leader_hint }));
                }
                Err(e) => {
                    let _ = reply.send(Err(Error::Unavailable(e.to_string())));
                }
            }
        }
    }

    fn not_leader(&self) -> Error {
        Error::NotLeader {
            leader_hint: self.raft.leader(),
        }
    }

    /// Answers reads and keepalives whose read index has applied.
    fn serve_indexed(&mut self, applied: u64) {
        let (done, waiting): (Vec<_>, Vec<_>) = std::mem::take(&mut self.indexed)
            .into_iter()
            .partition(|(index, _)| *index <= applied);
        self.indexed = waiting;
        let deferred = std::mem::take(&mut self.deferred);
        let (due, still): (Vec<_>, Vec<_>) = deferred
            .into_iter()
            .partition(|(index, _)| *index <= applied);
        self.deferred = still;
        let jobs = due.into_iter().map(|(_, job)| job);
        let mut keepalives = Vec::new();
        for (index, waiting) in done {
            match waiting {
                Waiting::Read(reply) => {
                    let _ = reply.send(Ok(index));
                }
                Waiting::KeepAlive(job) => keepalives.push(job),
            }
        }
        for job in keepalives.into_iter().chain(jobs) {
            self.renew(job, applied);
        }
    }

    /// Renews a keepalive's sessions (its quorum round is done) and answers it, or defers it
    /// until a pending `Expire` of one of its sessions applies.
    fn renew(&mut self, job: KeepAliveJob, applied: u64) {
        if self.duties.active_term() != Some(self.raft.term()) {
            job.fail(self.not_leader());
            return;
        }
        match self.duties.renew(&job.sessions, applied) {
            Err(index) => self.deferred.push((index, job)),
            Ok(results) => match job.from {
                KeepAliveFrom::Local(reply) => {
                    let _ = reply.send(Ok(results));
                }
                KeepAliveFrom::Peer { from, id } => self
                    .outbox
                    .send_side(from, SideMessage::KeepAliveAck { id, results }),
            },
        }
    }

    /// Reacts to a change of role or term: a new leader rebases its entry time and serves
    /// the keepalives it was forwarding; a node that stops leading forgets its duties and
    /// fails what depended on them.
    fn after_cycle(&mut self) {
        let leader = self.raft.role() == Role::Leader;
        let term = self.raft.term();
        if term != self.seen_term || (self.was_leader && !leader) {
            self.duties.deactivate();
            self.publish.status.active_term.store(0, Ordering::Release);
            let error = self.not_leader();
            for (_, (_, waiting)) in std::mem::take(&mut self.asked) {
                waiting.fail(error.clone());
            }
            let indexed = std::mem::take(&mut self.indexed);
            for (index, waiting) in indexed {
                match waiting {
                    // A read whose index was confirmed stays valid.
                    Waiting::Read(reply) => self.indexed.push((index, Waiting::Read(reply))),
                    Waiting::KeepAlive(job) => job.fail(error.clone()),
                }
            }
            for (_, job) in std::mem::take(&mut self.deferred) {
                job.fail(error.clone());
            }
        }
        if leader && !self.was_leader {
            // Entries of this term are stamped from the last entry's time plus this node's
            // own monotonic time since then (DESIGN §3a.12).
            self.time_base_ms = self.raft.last_entry_time();
            self.clock_base = Instant::now();
            for (sessions, reply) in self.forwarder.take_all() {
                let from = KeepAliveFrom::Local(reply);
                self.ask_read_index(Waiting::KeepAlive(KeepAliveJob { sessions, from }));
            }
        }
        self.was_leader = leader;
        self.seen_term = term;
        // Published first: the answer to a membership change or transfer reports it.
        self.publish_status();
        self.after_membership();
        self.publish_status();
    }

    /// Answers everything still waiting. Proposals already in the log may yet commit (here
    /// or under another leader): they get `Indeterminate`, never a retryable error.
    fn fail_all(&mut self, error: &Error) {
        for (_, p) in std::mem::take(&mut self.proposals) {
            let _ = p.reply.send(Err(Error::Indeterminate(format!(
                "appended but not known applied: {error}"
            ))));
        }
        for (_, reply) in std::mem::take(&mut self.queued) {
            let _ = reply.send(Err(error.clone()));
        }
        for (_, (_, waiting)) in std::mem::take(&mut self.asked) {
            waiting.fail(error.clone());
        }
        for (_, waiting) in std::mem::take(&mut self.indexed) {
            waiting.fail(error.clone());
        }
        for (_, job) in std::mem::take(&mut self.deferred) {
            job.fail(error.clone());
        }
        for (_, reply) in self.forwarder.take_all() {
            let _ = reply.send(Err(error.clone()));
        }
        self.fail_transfer(error);
    }

    fn publish_status(&self) {
        let s = &self.publish.status;
        let role = match self.raft.role() {
            Role::Follower => 0,
            Role::PreCandidate => 1,
            Role::Candidate => 2,
            Role::Leader => 3,
        };
        s.term.store(self.raft.term(), Ordering::Release);
        s.leader
            .store(self.raft.leader().unwrap_or(0), Ordering::Release);
        s.role.store(role, Ordering::Release);
        s.commit.store(self.raft.commit(), Ordering::Release);
    }
}
