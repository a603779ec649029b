//! The handle to a node's replicated loop: one thread per node that owns a [`Raft`] core over
//! a [`RaftStore`] (see `driver.rs` for the loop itself), with Raft messages carried by an
//! [`Outbox`] (in production the [`PeerTransport`]; a one-member cluster uses [`NoPeers`]).
//!
//! [`ReplicatedNode`] is what the client-facing layer talks to: proposals, linearizable reads
//! (ReadIndex), keepalives (served by the leader, forwarded in batches by a follower), the
//! pins of implicit sessions, and the node's published status, watch events and ended
//! sessions.
//!
//! What this module must not do: touch the core or the store (only the loop thread does), or
//! block on anything but the loop's answer.

use std::collections::BTreeMap;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex, PoisonError};
use std::thread::JoinHandle;
use std::time::Duration;

use lockd_protocol::{Error, ReadOp, Reply, SessionEventKind, SessionId};
use tokio::sync::{broadcast, oneshot};
use tokio_util::sync::CancellationToken;

use super::driver::{Driver, Inputs};
pub use super::forward::{KeepAliveReply, KeepAliveResults};
use super::peer::{Inbound, PeerTransport, SideMessage};
use super::watch::Published;
use crate::fsm::{self, Applied, Command, FsmRead};
use crate::raft::{ConfChange, Configuration, MemberInfo, Message, NewRaftError, Raft, RaftConfig};
use crate::storage::{FsmView, RaftStore, Storage, StorageError};

/// Commits of events a watcher may fall behind before it lags.
const WATCH_CHANNEL_COMMITS: usize = 1024;
/// Most children a read lists.
const MAX_CHILDREN: usize = 10_000;

/// Where a Raft core's outgoing messages go. Must not block.
pub trait Outbox: Send + 'static {
    /// Queues messages for their `to` nodes; may drop them (Raft tolerates loss).
    fn send(&self, messages: Vec<Message>);
    /// Queues a side message (keepalive forwarding) for node `to`; may drop it.
    fn send_side(&self, to: u64, message: SideMessage);
    /// The configuration changed: reach its members from now on.
    fn set_members(&self, _conf: &Configuration) {}
    /// Incarnation and client address each peer presented in its handshake, by node id.
    fn peer_identities(&self) -> BTreeMap<u64, (u64, String)> {
        BTreeMap::new()
    }
    /// Forgets the incarnation node `id` presented so far (it joins the configuration again:
    /// its earlier handshakes may come from a data directory since wiped).
    fn forget_identity(&self, _id: u64) {}
}

impl Outbox for PeerTransport {
    fn send(&self, messages: Vec<Message>) {
        PeerTransport::send(self, messages)
    }
    fn send_side(&self, to: u64, message: SideMessage) {
        PeerTransport::send_side(self, to, message)
    }
}

impl<T: Outbox + Sync> Outbox for Arc<T> {
    fn send(&self, messages: Vec<Message>) {
        (**self).send(messages)
    }
    fn send_side(&self, to: u64, message: SideMessage) {
        (**self).send_side(to, message)
    }
    fn set_members(&self, conf: &Configuration) {
        (**self).set_members(conf)
    }
    fn peer_identities(&self) -> BTreeMap<u64, (u64, String)> {
        (**self).peer_identities()
    }
    fn forget_identity(&self, id: u64) {
        (**self).forget_identity(id)
    }
}

/// The outbox of a one-member cluster: there is nobody to send to.
#[derive(Debug, Default, Clone, Copy)]
pub struct NoPeers;

impl Outbox for NoPeers {
    fn send(&self, messages: Vec<Message>) {
        if !messages.is_empty() {
            tracing::debug!(count = messages.len(), "no peers: messages dropped");
        }
    }
    fn send_side(&self, _: u64, _: SideMessage) {}
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
    /// Addresses of the initial members, recorded with `voters`.
    pub addresses: BTreeMap<u64, MemberInfo>,
    /// A joining node: records no initial configuration, never campaigns before the leader
    /// adds it, and learns the configuration from the leader (DESIGN §3a.9).
    pub join: bool,
    /// Length of one tick (elections, heartbeats, session deadlines, keepalive batches).
    pub tick: Duration,
    /// A linearizable read or a forwarded keepalive not answered within this time gets
    /// `Unavailable` (its leader may have changed and the request been lost with it).
    pub read_timeout: Duration,
    /// How long the loop polls for input before parking its thread (latency at low load).
    pub spin: Duration,
    /// Most client proposals taken into one cycle.
    pub max_batch: usize,
    /// How often a follower re-sends the implicit sessions of its connections to the leader.
    pub pin_refresh: Duration,
}

impl ReplicatedConfig {
    /// Defaults for node `id` of a cluster of `voters`: 10 ms ticks, seed = id, no spinning.
    pub fn new(id: u64, voters: impl IntoIterator<Item = u64>) -> ReplicatedConfig {
        ReplicatedConfig {
            raft: RaftConfig::new(id),
            voters: voters.into_iter().collect(),
            addresses: BTreeMap::new(),
            join: false,
            tick: Duration::from_millis(10),
            read_timeout: Duration::from_secs(2),
            spin: Duration::ZERO,
            max_batch: 1024,
            pin_refresh: Duration::from_secs(5),
        }
    }
}

pub(super) type ProposalReply = oneshot::Sender<Result<Applied, Error>>;
pub(super) type ReadReply = oneshot::Sender<Result<u64, Error>>;
pub(super) type TransferReply = oneshot::Sender<Result<(), Error>>;

/// Inputs of the loop.
#[derive(Debug)]
pub(super) enum Input {
    Peer(Message),
    Side {
        from: u64,
        message: SideMessage,
    },
    Propose {
        command: Command,
        reply: ProposalReply,
    },
    Read {
        reply: ReadReply,
    },
    KeepAlive {
        sessions: Vec<SessionId>,
        reply: KeepAliveReply,
    },
    /// A membership change, answered like a proposal once its entry applied.
    ChangeMembers {
        change: ConfChange,
        reply: ProposalReply,
    },
    /// A leader transfer, answered once the target leads or the transfer ended.
    Transfer {
        to: u64,
        reply: TransferReply,
    },
    /// An implicit session's connection on this node closed.
    Unpin {
        session: SessionId,
    },
    Shutdown,
}

/// A session that ended, as broadcast to connections.
#[derive(Debug, Clone, Copy)]
pub struct SessionEnded {
    pub session: SessionId,
    pub revision: u64,
    pub kind: SessionEventKind,
}

/// What the loop publishes for observers. Role: 0 follower, 1 pre-candidate, 2 candidate,
/// 3 leader.
#[derive(Debug, Default)]
pub(super) struct StatusCell {
    pub term: AtomicU64,
    pub leader: AtomicU64,
    pub role: AtomicU64,
    pub commit: AtomicU64,
    /// Applied index whose events have been published (set after publishing, before the
    /// proposers of those entries are answered).
    pub applied: AtomicU64,
    /// Term whose leadership is active here (0 = none): see `leader.rs`.
    pub active_term: AtomicU64,
    /// Ticks since this node last knew a leader.
    pub leaderless_ticks: AtomicU64,
    /// The node was a member and a committed configuration no longer names it.
    pub removed: AtomicBool,
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
    /// Whether this node is the leader and an entry of its term has applied here (it serves
    /// keepalives and decides expiry).
    pub leader_active: bool,
    /// Commit index.
    pub commit: u64,
    /// Applied index (of the durable state machine).
    pub applied: u64,
}

/// Channels the loop publishes on.
#[derive(Debug, Clone)]
pub(super) struct Publish {
    pub status: Arc<StatusCell>,
    /// The configuration in force (as of this node's last log entry).
    pub conf: Arc<Mutex<Configuration>>,
    pub watch_events: broadcast::Sender<Arc<Published>>,
    pub session_events: broadcast::Sender<SessionEnded>,
}

/// A handle to a running replicated node. Cheap to share; call [`ReplicatedNode::stop`] to
/// stop it.
#[derive(Debug)]
pub struct ReplicatedNode {
    id: u64,
    /// Voters of the configuration the node started with.
    voters: Vec<u64>,
    tx: tokio::sync::mpsc::UnboundedSender<Input>,
    storage: Storage,
    publish: Publish,
    /// Cancelled when the loop thread has ended.
    stopped: CancellationToken,
    thread: Mutex<Option<JoinHandle<Result<(), StorageError>>>>,
}

impl ReplicatedNode {
    /// Opens the Raft view of `storage` (bootstrapping `config.voters` if it has no
    /// configuration), builds the core and starts the loop thread. Peer messages arrive on
    /// `inbound` (the transport's channel); outgoing ones go to `outbox`. A sole voter
    /// elects itself before this returns.
    pub fn start(
        config: ReplicatedConfig,
        storage: Storage,
        outbox: impl Outbox,
        inbound: tokio::sync::mpsc::Receiver<Inbound>,
    ) -> Result<ReplicatedNode, ReplicatedError> {
        let mut store = RaftStore::open(storage.clone())?;
        if !config.join {
            let mut initial = Configuration::with_voters(config.voters.iter().copied());
            initial.members = config
                .addresses
                .iter()
                .filter(|(id, _)| initial.voters.contains(id))
                .map(|(&id, info)| (id, info.clone()))
                .collect();
            store.bootstrap(initial)?;
        }
        let mut raft_config = config.raft.clone();
        raft_config.applied = store.applied()?;
        let id = raft_config.id;
        let raft = Raft::new(raft_config, store)?;
        let voters = raft.tracker().conf.voters.iter().copied().collect();
        let (tx, rx) = tokio::sync::mpsc::unbounded_channel();
        let inputs = Inputs::new(rx, inbound)?;
        let (watch_events, _) = broadcast::channel(WATCH_CHANNEL_COMMITS);
        let (session_events, _) = broadcast::channel(4096);
        let publish = Publish {
            status: Arc::new(StatusCell::default()),
            conf: Arc::new(Mutex::new(raft.conf().clone())),
            watch_events,
            session_events,
        };
        let driver = Driver::new(raft, config, Box::new(outbox), publish.clone())?;
        let stopped = CancellationToken::new();
        let stopped_by_loop = stopped.clone();
        let thread = std::thread::Builder::new()
            .name(format!("lockd-node-{id}"))
            .spawn(move || {
                let result = driver.run(inputs);
                stopped_by_loop.cancel();
                result
            })?;
        Ok(ReplicatedNode {
            id,
            voters,
            tx,
            storage,
            publish,
            stopped,
            thread: Mutex::new(Some(thread)),
        })
    }

    /// This node's id.
    pub fn id(&self) -> u64 {
        self.id
    }

    /// Voters of the configuration the node started with.
    pub fn voters(&self) -> Vec<u64> {
        self.voters.clone()
    }

    /// The configuration in force on this node.
    pub fn conf(&self) -> Configuration {
        self.publish
            .conf
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .clone()
    }

    /// Whether a committed configuration removed this node.
    pub fn removed(&self) -> bool {
        self.publish.status.removed.load(Ordering::Acquire)
    }

    /// Proposes a membership change (leader only); resolves once its entry applied here.
    pub async fn change_members(&self, change: ConfChange) -> Result<Applied, Error> {
        let (reply, answer) = oneshot::channel();
        self.send(Input::ChangeMembers { change, reply })?;
        answer.await.map_err(|_| Error::ShuttingDown)?
    }

    /// Hands leadership to `to` (leader only); resolves once `to` leads, or with an error
    /// if the transfer was refused or aborted.
    pub async fn transfer_leader(&self, to: u64) -> Result<(), Error> {
        let (reply, answer) = oneshot::channel();
        self.send(Input::Transfer { to, reply })?;
        answer.await.map_err(|_| Error::ShuttingDown)?
    }

    /// The node's database (for reads of the applied state).
    pub fn storage(&self) -> &Storage {
        &self.storage
    }

    /// Consensus state as last published by the loop.
    pub fn status(&self) -> ReplicatedStatus {
        let s = &self.publish.status;
        let term = s.term.load(Ordering::Acquire);
        let is_leader = s.role.load(Ordering::Acquire) == 3;
        ReplicatedStatus {
            term,
            leader: s.leader.load(Ordering::Acquire),
            is_leader,
            leader_active: is_leader && s.active_term.load(Ordering::Acquire) == term,
            commit: s.commit.load(Ordering::Acquire),
            applied: s.applied.load(Ordering::Acquire),
        }
    }

    /// Ticks since this node last knew a leader (0 while it knows one).
    pub fn leaderless_ticks(&self) -> u64 {
        self.publish.status.leaderless_ticks.load(Ordering::Acquire)
    }

    /// The last applied index whose events have been published.
    pub fn published_index(&self) -> u64 {
        self.publish.status.applied.load(Ordering::Acquire)
    }

    /// Replicates, commits and applies a command; resolves with its outcome once applied
    /// here. A follower answers `NotLeader { leader_hint }`.
    pub async fn propose(&self, command: Command) -> Result<Applied, Error> {
        let (reply, answer) = oneshot::channel();
        self.send(Input::Propose { command, reply })?;
        answer.await.map_err(|_| Error::ShuttingDown)?
    }

    /// Renews sessions; one result per session, in order. Answered only once the leader has
    /// extended the deadlines after a quorum round of its term (directly on the leader, or
    /// through a follower's batch).
    pub async fn keepalive(&self, sessions: Vec<SessionId>) -> Result<KeepAliveResults, Error> {
        let (reply, answer) = oneshot::channel();
        self.send(Input::KeepAlive { sessions, reply })?;
        answer.await.map_err(|_| Error::ShuttingDown)?
    }

    /// Lets an implicit session of a connection on this node expire after its TTL.
    pub fn unpin(&self, session: SessionId) {
        let _ = self.send(Input::Unpin { session });
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
        self.publish.watch_events.subscribe()
    }

    /// Notifications of sessions that ended.
    pub fn session_events(&self) -> broadcast::Receiver<SessionEnded> {
        self.publish.session_events.subscribe()
    }

    /// Resolves when the loop has stopped (shutdown or a storage failure).
    pub async fn stopped(&self) {
        self.stopped.cancelled().await
    }

    /// Stops the loop (dropping the outbox with it) and waits for the thread. Proposals
    /// already appended get `Indeterminate`; other unanswered requests get `ShuttingDown`.
    pub fn stop(&self) -> Result<(), StorageError> {
        let _ = self.tx.send(Input::Shutdown);
        let thread = self
            .thread
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .take();
        match thread.map(JoinHandle::join) {
            None | Some(Ok(Ok(()))) => Ok(()),
            Some(Ok(Err(e))) => Err(e),
            Some(Err(_)) => Err(StorageError::Corrupt("replicated loop panicked".into())),
        }
    }

    fn send(&self, input: Input) -> Result<(), Error> {
        self.tx.send(input).map_err(|_| Error::ShuttingDown)
    }
}
