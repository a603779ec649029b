//! The IO layer: the only part of the server with threads, sockets and clocks.
//!
//! [`Node`] is a cheap handle to this node's replicated loop (`replicated` + `driver`), its
//! storage and its peer transport; `connection` serves one client connection; [`run`]
//! accepts connections until shutdown. A node without `--peers` is a one-member cluster of
//! the same code. Stale reads are served on the connection's task from a redb read
//! transaction of the applied state; linearizable reads, writes and keepalives go through
//! the loop.

mod connection;
mod deadlines;
mod driver;
mod forward;
mod leader;
pub mod peer;
pub mod replicated;
mod watch;

use std::collections::BTreeMap;
use std::future::Future;
use std::net::{SocketAddr, ToSocketAddrs};
use std::sync::Arc;

use lockd_protocol::{
    ClusterStatus, Consistency, Error, KeepAliveResult, ReadOp, Reply, SessionId,
};
use tokio::net::TcpListener;
use tokio::sync::{broadcast, mpsc, Semaphore};
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;
use tracing::Instrument;

use crate::config::{Config, ConfigError};
use crate::fsm::{Applied, Command, FsmRead};
use crate::raft::{ConfChange, Configuration, MemberInfo, RaftConfig};
use crate::storage::{FsmView, Identity, Storage, StorageError};
use peer::{Inbound, PeerConfig, PeerInfo, PeerTransport};
pub use replicated::SessionEnded;
use replicated::{NoPeers, Outbox, ReplicatedConfig, ReplicatedError, ReplicatedNode};

/// Why the server could not start or stopped.
#[derive(Debug, thiserror::Error)]
pub enum ServerError {
    #[error(transparent)]
    Config(#[from] ConfigError),
    #[error(transparent)]
    Storage(#[from] StorageError),
    #[error("io: {0}")]
    Io(#[from] std::io::Error),
    #[error(
        "data directory belongs to cluster {stored:#x}, but --cluster-token gives {configured:#x}"
    )]
    WrongCluster { stored: u64, configured: u64 },
    #[error("data directory belongs to node {stored}, but --id is {configured}")]
    WrongNode { stored: u64, configured: u64 },
    #[error("cannot resolve peer address {addr}: {reason}")]
    PeerAddr { addr: String, reason: String },
    #[error("cannot start the node: {0}")]
    Start(#[from] ReplicatedError),
    #[error("{0}")]
    RefusedByCluster(String),
    #[error("the event loop stopped: {0}")]
    LoopStopped(String),
}

#[derive(Debug)]
struct Shared {
    config: Config,
    identity: Identity,
    replicated: ReplicatedNode,
    /// The peer transport; `None` in a one-member cluster.
    transport: Option<Arc<PeerTransport>>,
    /// Voters of the stored configuration (this node included).
    voters: Vec<u64>,
}

/// A handle to a running node. Cheap to clone.
#[derive(Debug, Clone)]
pub struct Node {
    shared: Arc<Shared>,
}

/// The identity of the data in `storage`, created (with a fresh incarnation) if it has none;
/// refused if it belongs to another cluster or node.
pub fn open_identity(config: &Config, storage: &Storage) -> Result<Identity, ServerError> {
    match storage.recover()?.identity {
        Some(identity) if identity.cluster_id != config.cluster_id() => {
            Err(ServerError::WrongCluster {
                stored: identity.cluster_id,
                configured: config.cluster_id(),
            })
        }
        Some(identity) if identity.node_id != config.id => Err(ServerError::WrongNode {
            stored: identity.node_id,
            configured: config.id,
        }),
        Some(identity) => Ok(identity),
        None => {
            let identity = Identity {
                cluster_id: config.cluster_id(),
                node_id: config.id,
                incarnation: random_u64(),
            };
            storage.set_identity(identity)?;
            Ok(identity)
        }
    }
}

/// The transport as the loop's outbox: the configuration's peer addresses win; members it
/// records no address for are reached at their `--peers` address.
struct ClusterOutbox {
    transport: Arc<PeerTransport>,
    me: u64,
    fallback: BTreeMap<u64, SocketAddr>,
}

impl Outbox for ClusterOutbox {
    fn send(&self, messages: Vec<crate::raft::Message>) {
        self.transport.send(messages)
    }
    fn send_side(&self, to: u64, message: peer::SideMessage) {
        self.transport.send_side(to, message)
    }
    fn set_members(&self, conf: &Configuration) {
        let mut peers = BTreeMap::new();
        for id in conf.ids().filter(|&id| id != self.me) {
            let info = conf.member(id);
            let recorded = info
                .map(|m| m.peer_addr.as_str())
                .filter(|a| !a.is_empty())
                .and_then(|a| a.to_socket_addrs().ok()?.next());
            let Some(addr) = recorded.or_else(|| self.fallback.get(&id).copied()) else {
                tracing::warn!(peer = id, "no peer address for a member");
                continue;
            };
            let incarnation = info.and_then(|m| m.incarnation);
            peers.insert(id, PeerInfo { addr, incarnation });
        }
        // Keep reaching the `--peers` nodes while this node is not in any configuration yet
        // (a joining node answers the leader before it learns the configuration).
        if conf.ids().next().is_none() {
            for (&id, &addr) in self.fallback.iter().filter(|(&id, _)| id != self.me) {
                peers.entry(id).or_insert(PeerInfo::from(addr));
            }
        }
        self.transport.set_peers(peers);
    }
    fn peer_identities(&self) -> BTreeMap<u64, (u64, String)> {
        let addrs = self.transport.client_addrs();
        self.transport
            .incarnations()
            .into_iter()
            .map(|(id, inc)| (id, (inc, addrs.get(&id).cloned().unwrap_or_default())))
            .collect()
    }
    fn forget_identity(&self, id: u64) {
        self.transport.forget_identity(id)
    }
}

/// Resolves the peer addresses of the initial cluster.
fn resolve_peers(config: &Config) -> Result<BTreeMap<u64, SocketAddr>, ServerError> {
    let mut peers = BTreeMap::new();
    for (id, addr) in config.peer_map()? {
        let resolved = addr
            .to_socket_addrs()
            .map_err(|e| ServerError::PeerAddr {
                addr: addr.clone(),
                reason: e.to_string(),
            })?
            .next()
            .ok_or_else(|| ServerError::PeerAddr {
                addr: addr.clone(),
                reason: "no address".into(),
            })?;
        peers.insert(id, resolved);
    }
    Ok(peers)
}

impl Node {
    /// Starts the node on `storage`: its identity, its peer transport (bound on
    /// `config.peer_addr` when `config.peers` names other members) and its loop thread. A
    /// one-member cluster elects itself before this returns. Must be called inside a tokio
    /// runtime (the transport's tasks run on it).
    pub fn start(config: Config, storage: Storage) -> Result<Node, ServerError> {
        config.validate()?;
        let identity = open_identity(&config, &storage)?;
        let peers = resolve_peers(&config)?;
        let initial: Vec<u64> = if peers.is_empty() {
            vec![config.id]
        } else {
            peers.keys().copied().collect()
        };
        let mut raft = RaftConfig::new(config.id);
        raft.election_tick = config.election_ticks;
        raft.max_entry_bytes = config.max_proposal as u64 + 4096;
        // Election timeouts differ per node and per data directory, and replay with it.
        raft.seed = identity.incarnation ^ config.id;
        let addresses: BTreeMap<u64, MemberInfo> = config
            .peer_map()?
            .into_iter()
            .map(|(id, peer_addr)| {
                let client_addr = if id == config.id {
                    config.client_addr.clone()
                } else {
                    String::new()
                };
                let info = MemberInfo {
                    peer_addr,
                    client_addr,
                    incarnation: (id == config.id).then_some(identity.incarnation),
                };
                (id, info)
            })
            .collect();
        let replicated_config = ReplicatedConfig {
            raft,
            voters: initial,
            addresses,
            join: config.join,
            tick: config.tick(),
            read_timeout: config.tick() * config.election_ticks * 4,
            spin: std::time::Duration::from_micros(config.spin_us.unwrap_or(if peers.len() > 1 {
                0
            } else {
                200
            })),
            max_batch: config.max_batch,
            pin_refresh: std::time::Duration::from_millis(
                (config.implicit_session_ttl_ms / 4).max(config.tick_ms),
            ),
        };
        let (inbound_tx, inbound_rx) = mpsc::channel::<Inbound>(4096);
        let others: BTreeMap<u64, PeerInfo> = peers
            .iter()
            .filter(|(&id, _)| id != config.id)
            .map(|(&id, &addr)| (id, PeerInfo::from(addr)))
            .collect();
        let (replicated, transport) = if others.is_empty() {
            drop(inbound_tx);
            let node = ReplicatedNode::start(replicated_config, storage, NoPeers, inbound_rx)?;
            (node, None)
        } else {
            let mut peer_config =
                PeerConfig::new(config.id, identity.cluster_id, identity.incarnation, others);
            peer_config.max_frame = peer::peer_frame_limit(config.max_frame);
            peer_config.client_addr = config.client_addr.clone();
            let listener = std::net::TcpListener::bind(&config.peer_addr)?;
            listener.set_nonblocking(true)?;
            let listener = TcpListener::from_std(listener)?;
            let transport = Arc::new(PeerTransport::start(peer_config, listener, inbound_tx)?);
            tracing::info!(peer_addr = %transport.local_addr(), "peer transport up");
            let outbox = ClusterOutbox {
                transport: transport.clone(),
                me: config.id,
                fallback: peers.clone(),
            };
            let node = ReplicatedNode::start(replicated_config, storage, outbox, inbound_rx)?;
            (node, Some(transport))
        };
        // A node with data keeps its stored configuration and ignores `--peers` for it
        // (DESIGN §3a.9); `--peers` still gives the peers' addresses.
        let voters = replicated.voters();
        for id in voters.iter().filter(|&&id| id != config.id) {
            if !peers.contains_key(id) {
                tracing::warn!(peer = id, "no address for a member: pass it in --peers");
            }
        }
        Ok(Node {
            shared: Arc::new(Shared {
                config,
                identity,
                replicated,
                transport,
                voters,
            }),
        })
    }

    /// The node's configuration.
    pub fn config(&self) -> &Config {
        &self.shared.config
    }

    /// Appends, commits and applies a command; resolves once it is applied.
    pub async fn propose(&self, command: Command) -> Result<Applied, Error> {
        self.shared.replicated.propose(command).await
    }

    /// Renews sessions; one result per session, in order.
    pub async fn keepalive(
        &self,
        sessions: Vec<SessionId>,
    ) -> Result<Vec<(SessionId, KeepAliveResult)>, Error> {
        self.shared.replicated.keepalive(sessions).await
    }

    /// Lets an implicit session expire after its TTL (its connection is gone).
    pub fn unpin(&self, session: SessionId) {
        self.shared.replicated.unpin(session)
    }

    /// A read served at once, without a quorum round, if it can be: every `stale` read, and
    /// a linearizable one on the active leader of a one-member cluster (every acknowledged
    /// write is applied before it is acknowledged, and nobody else can lead). `None`: use
    /// [`Node::read`].
    pub fn read_now(
        &self,
        op: &ReadOp,
        consistency: Consistency,
    ) -> Option<(u64, Result<Reply, Error>)> {
        let sole = self.shared.voters == [self.shared.identity.node_id];
        let inline = consistency == Consistency::Stale
            || (sole && self.shared.replicated.status().leader_active);
        inline.then(|| self.shared.replicated.read_applied(op))
    }

    /// Serves a read: linearizable ones after a ReadIndex round (§6.4), on any member.
    pub async fn read(&self, op: &ReadOp, consistency: Consistency) -> (u64, Result<Reply, Error>) {
        if let Some(answer) = self.read_now(op, consistency) {
            return answer;
        }
        self.shared.replicated.read(op).await
    }

    /// The cluster as this node sees it.
    pub fn status(&self) -> ClusterStatus {
        let s = self.shared.replicated.status();
        ClusterStatus {
            cluster_id: self.shared.identity.cluster_id,
            node_id: self.shared.identity.node_id,
            leader: (s.leader != 0).then_some(s.leader),
            term: s.term,
            commit_index: s.commit,
            applied_index: s.applied,
            members: self.members(),
            learners: self.shared.replicated.conf().learners.into_iter().collect(),
        }
    }

    /// The leader this node knows of.
    pub fn leader_hint(&self) -> Option<u64> {
        let leader = self.shared.replicated.status().leader;
        (leader != 0).then_some(leader)
    }

    /// Client addresses of the members in the configuration in force, as far as this node
    /// knows them (recorded in the configuration, or told by the peer in its handshake).
    pub fn members(&self) -> Vec<lockd_protocol::MemberInfo> {
        let me = self.shared.identity.node_id;
        let known = self
            .shared
            .transport
            .as_ref()
            .map(|t| t.client_addrs())
            .unwrap_or_default();
        let conf = self.shared.replicated.conf();
        let mut ids: Vec<u64> = conf.ids().collect();
        if ids.is_empty() {
            ids = self.shared.voters.clone();
        }
        ids.into_iter()
            .filter_map(|id| {
                let recorded = conf
                    .member(id)
                    .map(|m| m.client_addr.clone())
                    .filter(|a| !a.is_empty());
                let client_addr = if id == me {
                    self.shared.config.client_addr.clone()
                } else {
                    recorded.or_else(|| known.get(&id).cloned())?
                };
                Some(lockd_protocol::MemberInfo { id, client_addr })
            })
            .collect()
    }

    /// Resolves if the cluster refuses this node's data directory: a peer holds a different
    /// incarnation for this node id (the directory was wiped or replaced, DESIGN §3a.9).
    /// Never resolves in a one-member cluster.
    pub async fn refused_by_cluster(&self) -> String {
        let me = self.shared.identity.node_id;
        let Some(transport) = self.shared.transport.clone() else {
            return std::future::pending().await;
        };
        let joining = self.shared.config.join;
        loop {
            let refusals = transport.refusals();
            // Not a member of the configuration its peers run: a node bootstrapped with
            // --peers into a cluster that already has a log, or a removed one restarted.
            // (A --join node is unknown to its peers until the leader adds it.)
            let unknown = refusals.iter().find(|r| {
                !joining
                    && !r.by_us
                    && matches!(r.reason, peer::RefuseReason::UnknownNode { id } if id == me)
            });
            if let Some(r) = unknown {
                // Only if no peer accepts this node: the others may just be behind.
                let accepted = transport.stats().handshakes_dialed > 0;
                if !accepted {
                    return format!(
                        "the cluster refuses this node: {} (node {me} is not in the \
                         configuration its peers run: a new member must be added with \
                         `lockctl cluster add` and started with --join; see docs/operations.md)",
                        r.reason
                    );
                }
            }
            let refusal = refusals.into_iter().find(|r| {
                !r.by_us && matches!(r.reason, peer::RefuseReason::WrongIncarnation { id, .. } if id == me)
            });
            if let Some(r) = refusal {
                return format!(
                    "the cluster refuses this node: {} (this data directory is not the one the \
                     cluster knows as node {me}; it was wiped or replaced. Remove node {me} with \
                     `lockctl cluster remove {me}`, then add it again and start it with --join: \
                     see docs/operations.md)",
                    r.reason
                );
            }
            tokio::time::sleep(std::time::Duration::from_millis(250)).await;
        }
    }

    /// Whether a committed configuration removed this node (it then serves no client).
    pub fn removed(&self) -> bool {
        self.shared.replicated.removed()
    }

    /// Proposes a membership change (leader only); resolves once it applied here.
    pub async fn change_members(&self, change: lockd_protocol::MemberChange) -> Result<(), Error> {
        use lockd_protocol::MemberChange;
        let change = match change {
            MemberChange::AddLearner {
                id,
                peer_addr,
                client_addr,
            } => {
                if id == 0 {
                    return Err(Error::InvalidArgument("member id 0".into()));
                }
                for (what, addr) in [("peer", &peer_addr), ("client", &client_addr)] {
                    if addr
                        .to_socket_addrs()
                        .map(|mut a| a.next().is_none())
                        .unwrap_or(true)
                    {
                        return Err(Error::InvalidArgument(format!(
                            "{what} address {addr:?} is not HOST:PORT"
                        )));
                    }
                }
                ConfChange::AddLearner {
                    id,
                    peer_addr,
                    client_addr,
                }
            }
            MemberChange::Promote { id } => ConfChange::Promote { id },
            MemberChange::Remove { id } => ConfChange::Remove { id },
        };
        self.shared
            .replicated
            .change_members(change)
            .await?
            .result
            .map(|_| ())
    }

    /// Hands leadership to `to`; resolves once `to` leads.
    pub async fn transfer_leader(&self, to: u64) -> Result<(), Error> {
        self.shared.replicated.transfer_leader(to).await
    }

    /// On the leader of a cluster with other voters: hands leadership to one of them before
    /// this node stops (graceful shutdown), so clients see a short pause, not an election
    /// timeout. Best effort; returns what happened.
    pub async fn hand_over_leadership(&self) -> Option<Result<u64, Error>> {
        let status = self.shared.replicated.status();
        if !status.is_leader {
            return None;
        }
        let me = self.shared.identity.node_id;
        let conf = self.shared.replicated.conf();
        let target = conf.voters.iter().copied().find(|&v| v != me)?;
        tracing::info!(to = target, "handing leadership over before shutting down");
        Some(self.transfer_leader(target).await.map(|()| target))
    }

    /// Identity of this node's data.
    pub fn identity(&self) -> Identity {
        self.shared.identity
    }

    /// Notifications of sessions that ended.
    pub fn session_events(&self) -> broadcast::Receiver<SessionEnded> {
        self.shared.replicated.session_events()
    }

    /// Subscribes to the events of every commit from now on.
    pub(crate) fn subscribe_events(&self) -> broadcast::Receiver<Arc<watch::Published>> {
        self.shared.replicated.subscribe_events()
    }

    /// Whether this node has had no leader for three election timeouts: its watch streams
    /// then end with an error instead of going silent (DESIGN §3a.13).
    pub fn leaderless_too_long(&self) -> bool {
        let limit = 3 * 2 * u64::from(self.shared.config.election_ticks);
        self.shared.replicated.leaderless_ticks() >= limit
    }

    /// The last revision whose events have been published.
    pub fn published_index(&self) -> u64 {
        self.shared.replicated.published_index()
    }

    /// Events from revision `from` on (whole revisions, about `max_events` at most), or
    /// `Compacted` if `from` is older than the kept history.
    pub fn history(
        &self,
        from: u64,
        max_events: usize,
    ) -> Result<Vec<lockd_protocol::Event>, Error> {
        let read = || -> Result<Result<Vec<lockd_protocol::Event>, Error>, StorageError> {
            let txn = self.shared.replicated.storage().read()?;
            let view = FsmView::new(&txn);
            let oldest = view.applied()?.history_from;
            if from < oldest {
                return Ok(Err(Error::Compacted { oldest }));
            }
            Ok(Ok(view.events(from, max_events)?))
        };
        read().unwrap_or_else(|e| Err(Error::Storage(e.to_string())))
    }

    /// Resolves when the loop has stopped (shutdown or a storage failure).
    pub async fn stopped(&self) {
        self.shared.replicated.stopped().await
    }

    /// Stops the loop and waits for its thread (blocking).
    pub fn stop(&self) -> Result<(), StorageError> {
        self.shared.replicated.stop()
    }
}

/// Eight random bytes from the OS, for the data directory's incarnation id and the loop's
/// first read context.
fn random_u64() -> u64 {
    use std::io::Read;
    let mut bytes = [0u8; 8];
    if std::fs::File::open("/dev/urandom")
        .and_then(|mut f| f.read_exact(&mut bytes))
        .is_ok()
    {
        return u64::from_le_bytes(bytes);
    }
    // No /dev/urandom: fall back on the std hasher's per-process random keys.
    use std::hash::{BuildHasher, Hasher};
    let mut hasher = std::collections::hash_map::RandomState::new().build_hasher();
    hasher.write_u128(
        std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map(|d| d.as_nanos())
            .unwrap_or(0),
    );
    hasher.finish()
}

/// Opens the data directory in `config` and serves clients on `listener` until `shutdown`
/// resolves; then stops accepting, lets connections finish their in-flight requests, commits
/// what is queued and returns.
pub async fn run(
    listener: TcpListener,
    config: Config,
    shutdown: impl Future<Output = ()>,
) -> Result<(), ServerError> {
    config.validate()?;
    let storage = Storage::open(&config.data_dir, config.log_retain)?;
    run_with_storage(listener, config, storage, shutdown).await
}

/// [`run`] over an already opened storage (tests use one that drops unsynced writes).
pub async fn run_with_storage(
    listener: TcpListener,
    config: Config,
    storage: Storage,
    shutdown: impl Future<Output = ()>,
) -> Result<(), ServerError> {
    let node = Node::start(config, storage)?;
    let addr = listener.local_addr()?;
    tracing::info!(%addr, node = node.identity().node_id, "serving clients");
    let cancel = CancellationToken::new();
    let tracker = TaskTracker::new();
    let limit = Arc::new(Semaphore::new(node.config().max_connections));
    let loop_stopped = node.clone();
    let refused = node.clone();
    let fatal: Arc<std::sync::Mutex<Option<String>>> = Arc::default();
    let fatal_set = fatal.clone();
    let shutdown = async move {
        tokio::select! {
            _ = shutdown => {}
            _ = loop_stopped.stopped() => tracing::error!("event loop stopped; shutting down"),
            why = refused.refused_by_cluster() => {
                tracing::error!("{why}");
                *fatal_set.lock().unwrap_or_else(std::sync::PoisonError::into_inner) = Some(why);
            }
        }
    };
    tokio::pin!(shutdown);
    let mut backoff_ms = 1;
    loop {
        let accepted = tokio::select! {
            _ = &mut shutdown => break,
            accepted = listener.accept() => accepted,
        };
        match accepted {
            Ok((stream, peer)) => {
                backoff_ms = 1;
                // At the connection limit, say so and close rather than leave the client
                // hanging in the accept backlog.
                let Ok(permit) = limit.clone().try_acquire_owned() else {
                    tracing::warn!(%peer, "connection limit reached; refusing");
                    tracker.spawn(connection::refuse(stream, node.config().max_frame));
                    continue;
                };
                let _ = stream.set_nodelay(true);
                let node = node.clone();
                let cancel = cancel.clone();
                let span = tracing::info_span!("connection", %peer);
                tracker.spawn(
                    async move {
                        connection::serve(stream, node, cancel).await;
                        drop(permit);
                    }
                    .instrument(span),
                );
            }
            Err(e) => {
                // Out of file descriptors and the like: back off instead of spinning.
                tracing::warn!(error = %e, "accept failed");
                tokio::time::sleep(std::time::Duration::from_millis(backoff_ms)).await;
                backoff_ms = (backoff_ms * 2).min(1_000);
            }
        }
    }
    // A leader hands over first (§3.10): its clients then see a short pause, not an election.
    let patience = node.config().tick() * node.config().election_ticks * 4;
    match tokio::time::timeout(patience, node.hand_over_leadership()).await {
        Ok(Some(Ok(to))) => tracing::info!(to, "leadership handed over"),
        Ok(Some(Err(e))) => tracing::warn!(error = %e, "leadership hand-over failed"),
        Ok(None) => {}
        Err(_) => tracing::warn!("leadership hand-over timed out"),
    }
    tracing::info!("shutting down: draining connections");
    drop(listener);
    cancel.cancel();
    tracker.close();
    tracker.wait().await;
    let stopper = node.clone();
    let result = tokio::task::spawn_blocking(move || stopper.stop())
        .await
        .map_err(|e| ServerError::LoopStopped(e.to_string()))?;
    result.map_err(ServerError::Storage)?;
    let fatal = fatal
        .lock()
        .unwrap_or_else(std::sync::PoisonError::into_inner)
        .take();
    match fatal {
        Some(why) => Err(ServerError::RefusedByCluster(why)),
        None => Ok(()),
    }
}
