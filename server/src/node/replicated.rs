//! A first replicated driver: one thread per node that owns a [`Raft`] core over a
//! [`RaftStore`] and drives it by the Ready contract of [`crate::raft`], with Raft messages
//! carried by an [`Outbox`] (in production the [`super::peer::PeerTransport`]).
//!
//! Each cycle the loop takes every input waiting (peer messages, client proposals and reads),
//! ticks the core when a tick is due, proposes the queued commands (a follower answers
//! `NotLeader { leader_hint }` at once), and then handles Ready after Ready: early messages
//! (the leader's own appends) go out first, then the whole Ready is persisted and applied in
//! one redb write transaction with one fsync ([`RaftStore::persist_ready`]), then the other
//! messages go out, proposers of applied entries are answered, and the core is advanced.
//!
//! A proposal is remembered by (index, term). It is answered with the state machine's outcome
//! only if the entry applied at its index has its term; if another term's entry took that
//! index, the proposal never applied and gets `NotLeader` (safe to retry): never somebody
//! else's answer. Linearizable reads go through [`Raft::read_index`] (on a follower the core
//! asks the leader) and are answered once the applied index reaches the read index; the
//! caller then reads the applied state. Applied watch events are published on a broadcast
//! channel like the single-node loop does.
//!
//! What this module must not do (yet): it is not used by `run()`/`lockd`; it keeps no session
//! deadlines and proposes no expiry (so no node, follower or leader, expires sessions here),
//! forwards no keepalives, fires no lock timers, and takes no snapshots beyond what
//! [`RaftStore`] does on its own. It must never answer a proposal before its entry is
//! committed, durable and applied, nor send `messages` before the Ready is durable. A storage
//! failure stops the loop (fail-stop): after a failed fsync it cannot know what is durable.

use std::collections::BTreeMap;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::mpsc::{self, Receiver, RecvTimeoutError, Sender};
use std::sync::Arc;
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use lockd_protocol::{Error, ReadOp, Reply};
use tokio::sync::{broadcast, oneshot};

use super::peer::PeerTransport;
use super::watch::Published;
use crate::fsm::{self, Applied, Command, FsmRead};
use crate::raft::{
    Configuration, EntryKind, Message, NewRaftError, ProposeError, Raft, RaftConfig, Role,
};
use crate::storage::{FsmView, RaftStore, Storage, StorageError};

/// Commits of events a watcher may fall behind before it lags.
const WATCH_CHANNEL_COMMITS: usize = 1024;
/// Readies handled per cycle before the loop looks at its inputs again.
const MAX_READIES_PER_CYCLE: usize = 16;
/// Most children a read lists.
const MAX_CHILDREN: usize = 10_000;

/// Where a Raft core's outgoing messages go. Must not block.
pub trait Outbox: Send + 'static {
    /// Queues messages for their `to` nodes; may drop them (Raft tolerates loss).
    fn send(&self, messages: Vec<Message>);
}

impl Outbox for PeerTransport {
    fn send(&self, messages: Vec<Message>) {
        PeerTransport::send(self, messages)
    }
}

impl<T: Outbox + Sync> Outbox for Arc<T> {
    fn send(&self, messages: Vec<Message>) {
        (**self).send(messages)
    }
}

/// Why a replicated node could not start.
#[derive(Debug, thiserror::Error)]
pub enum ReplicatedError {
    #[error(transparent)]
    Storage(#[from] StorageError),
    #[error(transparent)]
    Raft(#[from] NewRaftError),
    #[error("io: {0}")]
    Io(#[from] std::io::Error),
}

/// Settings of one replicated node.
#[derive(Debug, Clone)]
pub struct ReplicatedConfig {
    /// The core's settings (id, ticks, seed, sizes). `applied` is taken from the store.
    pub raft: RaftConfig,
    /// Voters of the initial configuration, recorded only if the store has none yet.
    pub voters: Vec<u64>,
    /// Length of one tick.
    pub tick: Duration,
    /// A linearizable read not answered within this time gets `Unavailable` (its leader may
    /// have changed and the request been lost with it).
    pub read_timeout: Duration,
}

impl ReplicatedConfig {
    /// Defaults for node `id` of a cluster of `voters`: 10 ms ticks, seed = id.
    pub fn new(id: u64, voters: impl IntoIterator<Item = u64>) -> ReplicatedConfig {
        ReplicatedConfig {
            raft: RaftConfig::new(id),
            voters: voters.into_iter().collect(),
            tick: Duration::from_millis(10),
            read_timeout: Duration::from_secs(2),
        }
    }
}

type ProposalReply = oneshot::Sender<Result<Applied, Error>>;
type ReadReply = oneshot::Sender<Result<u64, Error>>;

/// Inputs of the loop.
#[derive(Debug)]
enum Input {
    Peer(Message),
    Propose {
        command: Command,
        reply: ProposalReply,
    },
    Read {
        reply: ReadReply,
    },
    Shutdown,
}

/// What the loop publishes for observers (status, tests). Role: 0 follower, 1
/// pre-candidate, 2 candidate, 3 leader.
#[derive(Debug, Default)]
struct StatusCell {
    term: AtomicU64,
    leader: AtomicU64,
    role: AtomicU64,
    commit: AtomicU64,
    applied: AtomicU64,
}

/// A snapshot of a node's consensus state.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ReplicatedStatus {
    /// Current term.
    pub term: u64,
    /// Known leader of the term (0 = none).
    pub leader: u64,
    /// Whether this node is the leader.
    pub is_leader: bool,
    /// Commit index.
    pub commit: u64,
    /// Applied index (of the durable state machine).
    pub applied: u64,
}

/// A handle to a running replicated node. Dropping it does not stop the node; call
/// [`ReplicatedNode::stop`].
#[derive(Debug)]
pub struct ReplicatedNode {
    id: u64,
    tx: Sender<Input>,
    storage: Storage,
    status: Arc<StatusCell>,
    watch_events: broadcast::Sender<Arc<Published>>,
    thread: Option<JoinHandle<Result<(), StorageError>>>,
}

impl ReplicatedNode {
    /// Opens the Raft view of `storage` (bootstrapping `config.voters` if it has no
    /// configuration), builds the core and starts the loop thread. Peer messages arrive on
    /// `inbound` (the transport's channel); outgoing ones go to `outbox`.
    pub fn start(
        config: ReplicatedConfig,
        storage: Storage,
        outbox: impl Outbox,
        mut inbound: tokio::sync::mpsc::Receiver<Message>,
    ) -> Result<ReplicatedNode, ReplicatedError> {
        let mut store = RaftStore::open(storage.clone())?;
        store.bootstrap(Configuration::with_voters(config.voters.iter().copied()))?;
        let mut raft_config = config.raft.clone();
        raft_config.applied = store.applied()?;
        let id = raft_config.id;
        let raft = Raft::new(raft_config, store)?;
        let (tx, rx) = mpsc::channel();
        let status = Arc::new(StatusCell::default());
        let (watch_events, _) = broadcast::channel(WATCH_CHANNEL_COMMITS);
        // The transport delivers on a tokio channel; a small thread moves its messages into
        // the loop's channel so the loop waits on one queue. It ends with either side.
        let peer_tx = tx.clone();
        std::thread::Builder::new()
            .name(format!("lockd-peer-in-{id}"))
            .spawn(move || {
                while let Some(m) = inbound.blocking_recv() {
                    if peer_tx.send(Input::Peer(m)).is_err() {
                        break;
                    }
                }
            })?;
        let driver = Driver {
            time_base_ms: raft.last_entry_time(),
            clock_base: Instant::now(),
            raft,
            config,
            outbox: Box::new(outbox),
            status: status.clone(),
            watch_events: watch_events.clone(),
            proposals: BTreeMap::new(),
            reads_asked: BTreeMap::new(),
            reads_ready: Vec::new(),
            next_read_ctx: 1,
            queued: Vec::new(),
            was_leader: false,
        };
        driver.publish_status();
        let thread = std::thread::Builder::new()
            .name(format!("lockd-replicated-{id}"))
            .spawn(move || driver.run(rx))?;
        Ok(ReplicatedNode {
            id,
            tx,
            storage,
            status,
            watch_events,
            thread: Some(thread),
        })
    }

    /// This node's id.
    pub fn id(&self) -> u64 {
        self.id
    }

    /// The node's database (for reads of the applied state).
    pub fn storage(&self) -> &Storage {
        &self.storage
    }

    /// Consensus state as last published by the loop.
    pub fn status(&self) -> ReplicatedStatus {
        let s = &self.status;
        ReplicatedStatus {
            term: s.term.load(Ordering::Acquire),
            leader: s.leader.load(Ordering::Acquire),
            is_leader: s.role.load(Ordering::Acquire) == 3,
            commit: s.commit.load(Ordering::Acquire),
            applied: s.applied.load(Ordering::Acquire),
        }
    }

    /// Replicates, commits and applies a command; resolves with its outcome once applied
    /// here. A follower answers `NotLeader { leader_hint }`.
    pub async fn propose(&self, command: Command) -> Result<Applied, Error> {
        let (reply, answer) = oneshot::channel();
        self.send(Input::Propose { command, reply })?;
        answer.await.map_err(|_| Error::ShuttingDown)?
    }

    /// A linearizable read (ReadIndex, §6.4) of the applied state; returns the revision it
    /// reflects. Works on followers too (the core asks the leader for the index).
    pub async fn read(&self, op: &ReadOp) -> (u64, Result<Reply, Error>) {
        let (reply, answer) = oneshot::channel();
        if let Err(e) = self.send(Input::Read { reply }) {
            return (0, Err(e));
        }
        match answer.await {
            Ok(Ok(_index)) => self.read_applied(op),
            Ok(Err(e)) => (0, Err(e)),
            Err(_) => (0, Err(Error::ShuttingDown)),
        }
    }

    /// Reads the applied state as it is (a `stale` read).
    pub fn read_applied(&self, op: &ReadOp) -> (u64, Result<Reply, Error>) {
        let outcome = (|| -> Result<(u64, Result<Reply, Error>), StorageError> {
            let txn = self.storage.read()?;
            let view = FsmView::new(&txn);
            let revision = view.applied()?.index;
            Ok((revision, fsm::read(&view, op, MAX_CHILDREN)?))
        })();
        outcome.unwrap_or_else(|e| (0, Err(Error::Storage(e.to_string()))))
    }

    /// Subscribes to the watch events of every entry applied from now on.
    pub fn subscribe_events(&self) -> broadcast::Receiver<Arc<Published>> {
        self.watch_events.subscribe()
    }

    /// Stops the loop (dropping the outbox with it) and waits for the thread. Proposals
    /// already appended get `Indeterminate`; other unanswered requests get `ShuttingDown`.
    pub fn stop(&mut self) -> Result<(), StorageError> {
        let _ = self.tx.send(Input::Shutdown);
        match self.thread.take().map(JoinHandle::join) {
            None | Some(Ok(Ok(()))) => Ok(()),
            Some(Ok(Err(e))) => Err(e),
            Some(Err(_)) => Err(StorageError::Corrupt("replicated loop panicked".into())),
        }
    }

    fn send(&self, input: Input) -> Result<(), Error> {
        self.tx.send(input).map_err(|_| Error::ShuttingDown)
    }
}

/// A proposal waiting for its entry to apply.
#[derive(Debug)]
struct Pending {
    term: u64,
    reply: ProposalReply,
}

/// The state owned by the loop thread.
struct Driver {
    raft: Raft<RaftStore>,
    config: ReplicatedConfig,
    outbox: Box<dyn Outbox>,
    status: Arc<StatusCell>,
    watch_events: broadcast::Sender<Arc<Published>>,
    /// Proposals by log index. Invariant: every key > the applied index at the end of a cycle.
    proposals: BTreeMap<u64, Pending>,
    /// Reads asked of the core, by ctx, with the time they were asked.
    reads_asked: BTreeMap<u64, (Instant, ReadReply)>,
    /// Reads whose index is known, waiting for applied ≥ index.
    reads_ready: Vec<(u64, ReadReply)>,
    next_read_ctx: u64,
    /// Commands taken from the channel this cycle, proposed after the tick.
    queued: Vec<(Command, ProposalReply)>,
    /// Entry time: `time_base_ms` + monotonic time since `clock_base` (DESIGN §3a.12),
    /// rebased when this node becomes leader.
    time_base_ms: u64,
    clock_base: Instant,
    /// Whether the core was leader at the end of the previous cycle.
    was_leader: bool,
}

impl Driver {
    fn run(mut self, rx: Receiver<Input>) -> Result<(), StorageError> {
        let tick = self.config.tick;
        let mut next_tick = Instant::now() + tick;
        loop {
            let wait = if self.raft.has_ready() {
                Duration::ZERO
            } else {
                next_tick.saturating_duration_since(Instant::now())
            };
            let mut input = match rx.recv_timeout(wait) {
                Ok(i) => Some(i),
                Err(RecvTimeoutError::Timeout) => None,
                Err(RecvTimeoutError::Disconnected) => break,
            };
            let mut stop = false;
            while let Some(i) = input {
                stop |= self.take(i);
                if stop {
                    break;
                }
                input = rx.try_recv().ok();
            }
            if stop {
                break;
            }
            let now = Instant::now();
            if now >= next_tick {
                self.raft.tick();
                next_tick += tick;
                if next_tick < now {
                    next_tick = now + tick;
                }
                self.expire_reads(now);
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
            self.rebase_time_on_election();
            self.publish_status();
        }
        self.fail_all(&Error::ShuttingDown);
        Ok(())
    }

    /// Takes one input. True on `Shutdown`.
    fn take(&mut self, input: Input) -> bool {
        match input {
            Input::Peer(m) => self.raft.step(m),
            Input::Propose { command, reply } => self.queued.push((command, reply)),
            Input::Read { reply } => {
                let ctx = self.next_read_ctx;
                self.next_read_ctx += 1;
                match self.raft.read_index(ctx) {
                    Ok(()) => {
                        self.reads_asked.insert(ctx, (Instant::now(), reply));
                    }
                    Err(_) => {
                        let _ = reply.send(Err(Error::NotLeader { leader_hint: None }));
                    }
                }
            }
            Input::Shutdown => return true,
        }
        false
    }

    /// A node that just became leader stamps its entries from the last entry's time plus its
    /// own monotonic time since then (DESIGN §3a.12), not from a clock base of a past term.
    fn rebase_time_on_election(&mut self) {
        let leader = self.raft.role() == Role::Leader;
        if leader && !self.was_leader {
            self.time_base_ms = self.raft.last_entry_time();
            self.clock_base = Instant::now();
        }
        self.was_leader = leader;
    }

    fn entry_time_ms(&self) -> u64 {
        self.time_base_ms + self.clock_base.elapsed().as_millis() as u64
    }

    fn propose_queued(&mut self) {
        if self.queued.is_empty() {
            return;
        }
        let time_ms = self.entry_time_ms();
        let term = self.raft.term();
        for (command, reply) in std::mem::take(&mut self.queued) {
            match self
                .raft
                .propose(EntryKind::Command(command), term, time_ms)
            {
                Ok(index) => {
                    // A leftover at this index belongs to an entry that was truncated.
                    if let Some(old) = self.proposals.insert(index, Pending { term, reply }) {
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

    /// One Ready, in the order of the contract in [`crate::raft`].
    fn handle_ready(&mut self) -> Result<(), StorageError> {
        let mut ready = self.raft.ready();
        let early = std::mem::take(&mut ready.early_messages);
        if !early.is_empty() {
            self.outbox.send(early);
        }
        let outcomes = self.raft.store_mut().persist_ready(&ready)?;
        let messages = std::mem::take(&mut ready.messages);
        if !messages.is_empty() {
            self.outbox.send(messages);
        }
        let mut events = Vec::new();
        for (index, mut applied) in outcomes {
            events.append(&mut applied.events);
            let Some(pending) = self.proposals.remove(&index) else {
                continue;
            };
            let term = ready
                .committed_entries
                .iter()
                .find(|e| e.index == index)
                .map(|e| e.term);
            let answer = if term == Some(pending.term) {
                Ok(applied)
            } else {
                Err(self.not_leader())
            };
            let _ = pending.reply.send(answer);
        }
        if !events.is_empty() {
            let _ = self.watch_events.send(Arc::new(Published { events }));
        }
        for rs in std::mem::take(&mut ready.read_states) {
            if let Some((_, reply)) = self.reads_asked.remove(&rs.ctx) {
                self.reads_ready.push((rs.index, reply));
            }
        }
        self.raft.advance(&ready);
        let applied = self.raft.applied();
        // Proposals at or below the applied index that were not answered above had their
        // entry covered by a snapshot: whether it applied is unknown here.
        while let Some(entry) = self.proposals.first_entry() {
            if *entry.key() > applied {
                break;
            }
            let _ = entry.remove().reply.send(Err(Error::Indeterminate(
                "entry covered by an installed snapshot".into(),
            )));
        }
        let (done, waiting): (Vec<_>, Vec<_>) = std::mem::take(&mut self.reads_ready)
            .into_iter()
            .partition(|(index, _)| *index <= applied);
        self.reads_ready = waiting;
        for (index, reply) in done {
            let _ = reply.send(Ok(index));
        }
        Ok(())
    }

    /// Reads asked too long ago (their request or answer was lost, e.g. with a leader).
    fn expire_reads(&mut self, now: Instant) {
        let timeout = self.config.read_timeout;
        let expired: Vec<u64> = self
            .reads_asked
            .iter()
            .filter(|(_, (at, _))| now.duration_since(*at) >= timeout)
            .map(|(&ctx, _)| ctx)
            .collect();
        for ctx in expired {
            if let Some((_, reply)) = self.reads_asked.remove(&ctx) {
                let _ = reply.send(Err(Error::Unavailable("read index timed out".into())));
            }
        }
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
        for (_, (_, reply)) in std::mem::take(&mut self.reads_asked) {
            let _ = reply.send(Err(error.clone()));
        }
        for (_, reply) in std::mem::take(&mut self.reads_ready) {
            let _ = reply.send(Err(error.clone()));
        }
    }

    fn publish_status(&self) {
        let s = &self.status;
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
        s.applied.store(self.raft.applied(), Ordering::Release);
    }
}
