//! The IO layer: the only part of the server with threads, sockets and clocks.
//!
//! [`Node`] is a cheap handle to the event loop thread (`event_loop`) and the storage;
//! `connection` serves one client connection; [`run`] accepts connections until shutdown.
//! Reads are served on the connection's task from a redb read transaction of the applied
//! state; writes and keepalives go through the event loop.

mod connection;
mod deadlines;
mod event_loop;
pub mod peer;
pub mod replicated;
mod watch;

use std::future::Future;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{mpsc, Arc};

use lockd_protocol::{
    ClusterStatus, Consistency, Error, KeepAliveResult, MemberInfo, ReadOp, Reply, SessionId,
};
use tokio::net::TcpListener;
use tokio::sync::{broadcast, oneshot, Semaphore};
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;
use tracing::Instrument;

use crate::config::{Config, ConfigError};
use crate::fsm::{self, Applied, Command, FsmRead};
use crate::storage::{FsmView, Identity, Storage, StorageError};
pub use event_loop::SessionEnded;
use event_loop::{EventLoop, LoopMsg};

/// Commits of events a connection may fall behind before its watches end with `Lagged`.
const WATCH_CHANNEL_COMMITS: usize = 1024;

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
    #[error("the event loop stopped: {0}")]
    LoopStopped(String),
}

/// Indexes published by the event loop for status queries.
#[derive(Debug, Default)]
pub struct NodeStatus {
    term: AtomicU64,
    commit: AtomicU64,
}

impl NodeStatus {
    fn set_indexes(&self, term: u64, commit: u64) {
        self.term.store(term, Ordering::Release);
        self.commit.store(commit, Ordering::Release);
    }
}

#[derive(Debug)]
struct Shared {
    config: Config,
    identity: Identity,
    storage: Storage,
    status: Arc<NodeStatus>,
    tx: mpsc::Sender<LoopMsg>,
    events: broadcast::Sender<SessionEnded>,
    watch_events: broadcast::Sender<Arc<watch::Published>>,
    /// Cancelled when the event loop has stopped.
    stopped: CancellationToken,
}

/// A handle to a running node. Cheap to clone.
#[derive(Debug, Clone)]
pub struct Node {
    shared: Arc<Shared>,
}

impl Node {
    /// Recovers the node from `storage`, commits a no-op of a new term and starts the event
    /// loop thread. Blocks for that first commit.
    pub fn start(
        config: Config,
        storage: Storage,
    ) -> Result<(Node, std::thread::JoinHandle<Result<(), StorageError>>), ServerError> {
        config.validate()?;
        let identity = match storage.recover()?.identity {
            Some(identity) if identity.cluster_id != config.cluster_id() => {
                return Err(ServerError::WrongCluster {
                    stored: identity.cluster_id,
                    configured: config.cluster_id(),
                });
            }
            Some(identity) => identity,
            None => {
                let identity = Identity {
                    cluster_id: config.cluster_id(),
                    node_id: config.id,
                    incarnation: random_u64(),
                };
                storage.set_identity(identity)?;
                identity
            }
        };
        let status = Arc::new(NodeStatus::default());
        let (events, _) = broadcast::channel(4096);
        let (watch_events, _) = broadcast::channel(WATCH_CHANNEL_COMMITS);
        let event_loop = EventLoop::start(
            config.clone(),
            storage.clone(),
            status.clone(),
            events.clone(),
            watch_events.clone(),
        )?;
        let (tx, rx) = mpsc::channel();
        let stopped = CancellationToken::new();
        let stopped_by_loop = stopped.clone();
        let thread = std::thread::Builder::new()
            .name("lockd-event-loop".into())
            .spawn(move || {
                let result = event_loop.run(rx);
                stopped_by_loop.cancel();
                result
            })?;
        let shared = Shared {
            config,
            identity,
            storage,
            status,
            tx,
            events,
            watch_events,
            stopped,
        };
        Ok((
            Node {
                shared: Arc::new(shared),
            },
            thread,
        ))
    }

    /// The node's configuration.
    pub fn config(&self) -> &Config {
        &self.shared.config
    }

    /// Appends, commits and applies a command; resolves once it is applied.
    pub async fn propose(&self, command: Command) -> Result<Applied, Error> {
        let (reply, answer) = oneshot::channel();
        self.send(LoopMsg::Propose { command, reply })?;
        answer.await.map_err(|_| Error::ShuttingDown)?
    }

    /// Renews sessions; one result per session, in order.
    pub async fn keepalive(
        &self,
        sessions: Vec<SessionId>,
    ) -> Result<Vec<(SessionId, KeepAliveResult)>, Error> {
        let (reply, answer) = oneshot::channel();
        self.send(LoopMsg::KeepAlive { sessions, reply })?;
        answer.await.map_err(|_| Error::ShuttingDown)
    }

    /// Lets an implicit session expire after its TTL (its connection is gone).
    pub fn unpin(&self, session: SessionId) {
        let _ = self.send(LoopMsg::Unpin { session });
    }

    fn send(&self, msg: LoopMsg) -> Result<(), Error> {
        self.shared.tx.send(msg).map_err(|_| Error::ShuttingDown)
    }

    /// Serves a read from the applied state; returns the revision it reflects. With one
    /// voter every acknowledged write is applied before it is acknowledged, so the latest
    /// committed read transaction is linearizable; the Raft issue adds ReadIndex here.
    pub fn read(&self, op: &ReadOp, _consistency: Consistency) -> (u64, Result<Reply, Error>) {
        let outcome = (|| -> Result<(u64, Result<Reply, Error>), StorageError> {
            let txn = self.shared.storage.read()?;
            let view = FsmView::new(&txn);
            let revision = view.applied()?.index;
            let result = fsm::read(&view, op, 10_000)?;
            Ok((revision, result))
        })();
        outcome.unwrap_or_else(|e| (0, Err(Error::Storage(e.to_string()))))
    }

    /// The cluster as this node sees it.
    pub fn status(&self) -> ClusterStatus {
        let commit = self.shared.status.commit.load(Ordering::Acquire);
        ClusterStatus {
            cluster_id: self.shared.identity.cluster_id,
            node_id: self.shared.identity.node_id,
            leader: Some(self.shared.identity.node_id),
            term: self.shared.status.term.load(Ordering::Acquire),
            commit_index: commit,
            applied_index: commit,
            members: self.members(),
        }
    }

    /// Client addresses of the members.
    pub fn members(&self) -> Vec<MemberInfo> {
        vec![MemberInfo {
            id: self.shared.identity.node_id,
            client_addr: self.shared.config.client_addr.clone(),
        }]
    }

    /// Identity of this node's data.
    pub fn identity(&self) -> Identity {
        self.shared.identity
    }

    /// Notifications of sessions that ended.
    pub fn session_events(&self) -> broadcast::Receiver<SessionEnded> {
        self.shared.events.subscribe()
    }

    /// Subscribes to the events of every commit from now on.
    pub(crate) fn subscribe_events(&self) -> broadcast::Receiver<Arc<watch::Published>> {
        self.shared.watch_events.subscribe()
    }

    /// The last revision whose events have been published.
    pub fn published_index(&self) -> u64 {
        self.shared.status.commit.load(Ordering::Acquire)
    }

    /// Events from revision `from` on (whole revisions, about `max_events` at most), or
    /// `Compacted` if `from` is older than the kept history.
    pub fn history(
        &self,
        from: u64,
        max_events: usize,
    ) -> Result<Vec<lockd_protocol::Event>, Error> {
        let read = || -> Result<Result<Vec<lockd_protocol::Event>, Error>, StorageError> {
            let txn = self.shared.storage.read()?;
            let view = FsmView::new(&txn);
            let oldest = view.applied()?.history_from;
            if from < oldest {
                return Ok(Err(Error::Compacted { oldest }));
            }
            Ok(Ok(view.events(from, max_events)?))
        };
        read().unwrap_or_else(|e| Err(Error::Storage(e.to_string())))
    }

    /// Resolves when the event loop has stopped (shutdown or a storage failure).
    pub async fn stopped(&self) {
        self.shared.stopped.cancelled().await
    }

    /// Asks the event loop to commit what is queued and stop.
    pub fn stop(&self) {
        let _ = self.send(LoopMsg::Shutdown);
    }
}

/// Eight random bytes from the OS, for the data directory's incarnation id.
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
    let (node, thread) = tokio::task::spawn_blocking(move || Node::start(config, storage))
        .await
        .map_err(|e| ServerError::LoopStopped(e.to_string()))??;
    let addr = listener.local_addr()?;
    tracing::info!(%addr, node = node.identity().node_id, "serving clients");
    let cancel = CancellationToken::new();
    let tracker = TaskTracker::new();
    let limit = Arc::new(Semaphore::new(node.config().max_connections));
    let loop_stopped = node.clone();
    let shutdown = async move {
        tokio::select! {
            _ = shutdown => {}
            _ = loop_stopped.stopped() => tracing::error!("event loop stopped; shutting down"),
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
    tracing::info!("shutting down: draining connections");
    drop(listener);
    cancel.cancel();
    tracker.close();
    tracker.wait().await;
    node.stop();
    let result = tokio::task::spawn_blocking(move || thread.join())
        .await
        .map_err(|e| ServerError::LoopStopped(e.to_string()))?;
    match result {
        Ok(Ok(())) => Ok(()),
        Ok(Err(e)) => Err(ServerError::Storage(e)),
        Err(_) => Err(ServerError::LoopStopped("event loop panicked".into())),
    }
}
