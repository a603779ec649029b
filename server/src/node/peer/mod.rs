//! The peer transport: carries Raft messages, and the side messages of keepalive forwarding
//! (DESIGN §3a.4), between lockd nodes over TCP.
//!
//! One ordered connection per peer and direction, like etcd's stream: this node *dials* each
//! peer and only writes on that connection; peers dial us and we only read from the
//! connections we *accept*. [`PeerTransport::send`] and [`PeerTransport::send_side`] are
//! non-blocking: they append to a bounded per-peer queue shared by both kinds (the oldest
//! messages are dropped when it is full, e.g. while a peer is down; Raft tolerates loss, and
//! a lost keepalive batch is retried by its owner) and wake that peer's writer task, which
//! connects with exponential backoff and jitter, handshakes, and drains the queue in order:
//! consecutive Raft messages in as few `Batch` frames as the frame limit allows
//! ([`split_batches`]), each [`SideMessage`] in a frame of its own between them. A message too
//! large for a frame on its own is dropped and counted.
//!
//! The handshake and every later frame are checked against the cluster id, the sender's node
//! id and its incarnation (DESIGN §3a.9); a mismatch closes the connection with a typed
//! [`RefuseReason`], sent to the other side, logged, and kept in [`PeerTransport::refusals`].
//! Both handshake frames also carry the sender's client address (at most
//! [`MAX_CLIENT_ADDR_LEN`] bytes), collected in [`PeerTransport::client_addrs`].
//! Received Raft messages whose `to` is not this node or whose `from` is not the handshaken
//! peer are dropped; side messages are attributed to the handshaken peer. Everything else goes
//! to the `inbound` channel as an [`Inbound`], in the order each peer sent it.
//!
//! What this module must not do: interpret Raft or side messages (their owner validates
//! them), block the caller of `send`, hold more than its queue bounds (messages and bytes)
//! per peer, allocate for a frame longer than the limit, or trust anything it reads.

mod accept;
mod wire;
mod writer;

use std::collections::{BTreeMap, VecDeque};
use std::net::SocketAddr;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, MutexGuard, PoisonError};
use std::time::Duration;

use bytes::BytesMut;
use futures_util::StreamExt;
use lockd_protocol::codec::{encode_frame, FrameCodec, FrameError};
use lockd_protocol::{KeepAliveResult, SessionId};
use tokio::io::AsyncWriteExt;
use tokio::net::tcp::{OwnedReadHalf, OwnedWriteHalf};
use tokio::net::TcpListener;
use tokio::sync::{mpsc, Notify};
use tokio_util::codec::FramedRead;
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;
use tracing::Instrument;

use crate::raft::Message;
pub use wire::{
    message_size, peer_frame_limit, split_batches, PeerFrame, PeerMessage, RefuseReason,
    BATCH_FRAME_OVERHEAD, MAX_CLIENT_ADDR_LEN, PEER_FRAME_HEADROOM, PEER_PROTOCOL_VERSION,
};
use writer::Outgoing;

/// How many refusals [`PeerTransport::refusals`] remembers.
const REFUSALS_KEPT: usize = 32;

/// Non-Raft messages between nodes (keepalive forwarding, DESIGN §3a.4).
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum SideMessage {
    /// A follower's keepalives of one tick, for the leader.
    KeepAlive { id: u64, sessions: Vec<SessionId> },
    /// The leader's answer to a `KeepAlive` batch, one result per session in order.
    KeepAliveAck {
        id: u64,
        results: Vec<(SessionId, KeepAliveResult)>,
    },
}

impl From<SideMessage> for PeerMessage {
    fn from(message: SideMessage) -> PeerMessage {
        match message {
            SideMessage::KeepAlive { id, sessions } => PeerMessage::KeepAliveBatch { id, sessions },
            SideMessage::KeepAliveAck { id, results } => {
                PeerMessage::KeepAliveBatchAck { id, results }
            }
        }
    }
}

/// What the transport delivers to its owner, in arrival order per peer.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Inbound {
    /// A Raft message addressed to this node by the peer that sent it.
    Raft(Message),
    /// A side message from peer `from` (the node id of the connection's handshake).
    Side { from: u64, message: SideMessage },
}

/// Where a peer listens, and the incarnation it must present if known.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct PeerInfo {
    /// The peer's peer-port address.
    pub addr: SocketAddr,
    /// The incarnation recorded for the peer in the configuration; `None` accepts any (at
    /// bootstrap, before it is known). Either way a connection keeps the incarnation of its
    /// handshake for every later frame.
    pub incarnation: Option<u64>,
}

impl From<SocketAddr> for PeerInfo {
    fn from(addr: SocketAddr) -> Self {
        PeerInfo {
            addr,
            incarnation: None,
        }
    }
}

/// Reconnect delays: `initial · 2^attempt`, capped at `max`, each drawn uniformly from the
/// upper half of that (jitter, so peers that lost each other do not redial in lockstep).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Backoff {
    /// Delay before the first retry.
    pub initial: Duration,
    /// Largest delay.
    pub max: Duration,
}

impl Default for Backoff {
    fn default() -> Self {
        Backoff {
            initial: Duration::from_millis(50),
            max: Duration::from_secs(2),
        }
    }
}

impl Backoff {
    /// The delay before retry number `attempt` (0-based), with jitter from the OS-seeded
    /// thread RNG.
    pub fn delay(&self, attempt: u32) -> Duration {
        let base = self
            .initial
            .saturating_mul(1u32 << attempt.min(16))
            .min(self.max);
        let nanos = base.as_nanos().min(u64::MAX as u128) as u64;
        Duration::from_nanos(rand::random_range(nanos / 2..=nanos))
    }
}

/// Configuration of a [`PeerTransport`].
#[derive(Clone, Debug)]
pub struct PeerConfig {
    /// This node's id.
    pub id: u64,
    /// The cluster id every frame must carry.
    pub cluster_id: u64,
    /// This node's incarnation.
    pub incarnation: u64,
    /// The other members (an entry for `id` itself is ignored).
    pub peers: BTreeMap<u64, PeerInfo>,
    /// Frame limit on the peer port, both ways ([`peer_frame_limit`] of the client limit).
    pub max_frame: usize,
    /// Reconnect delays.
    pub backoff: Backoff,
    /// Messages queued per peer before the oldest are dropped.
    pub queue_len: usize,
    /// Encoded bytes queued per peer before the oldest messages are dropped (the newest one
    /// is always kept).
    pub queue_bytes: usize,
    /// Time allowed for connecting, for each step of the handshake and for each write; a
    /// peer that stops reading for longer is disconnected.
    pub io_timeout: Duration,
    /// This node's client address, told to peers in the handshake (empty: none). Longer
    /// than [`MAX_CLIENT_ADDR_LEN`] bytes makes peers refuse us.
    pub client_addr: String,
}

impl PeerConfig {
    /// A configuration with default limits.
    pub fn new(
        id: u64,
        cluster_id: u64,
        incarnation: u64,
        peers: impl IntoIterator<Item = (u64, PeerInfo)>,
    ) -> PeerConfig {
        PeerConfig {
            id,
            cluster_id,
            incarnation,
            peers: peers.into_iter().collect(),
            max_frame: peer_frame_limit(lockd_protocol::DEFAULT_MAX_FRAME),
            backoff: Backoff::default(),
            queue_len: 8192,
            queue_bytes: 64 * 1024 * 1024,
            io_timeout: Duration::from_secs(5),
            client_addr: String::new(),
        }
    }
}

/// Why a peer connection failed or ended.
#[derive(Debug, thiserror::Error)]
pub enum PeerError {
    #[error("io: {0}")]
    Io(#[from] std::io::Error),
    #[error(transparent)]
    Frame(#[from] FrameError),
    #[error("refused by the peer: {0}")]
    RefusedByPeer(RefuseReason),
    #[error("refused: {0}")]
    Refused(RefuseReason),
    #[error("timed out")]
    Timeout,
    #[error("connection closed")]
    Closed,
}

/// A refused or closed peer connection, kept for diagnosis and tests.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Refusal {
    /// The peer's node id, when known (the node we dialed, or the id an acceptor's dialer
    /// claimed).
    pub peer: Option<u64>,
    /// True when this node refused; false when the peer refused us.
    pub by_us: bool,
    /// Why.
    pub reason: RefuseReason,
}

/// Counters of a transport, for tests and status.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct PeerStats {
    /// `Batch` frames written by our dialers.
    pub batch_frames_sent: u64,
    /// Raft messages written by our dialers.
    pub messages_sent: u64,
    /// `Batch` frames read on accepted connections.
    pub batch_frames_received: u64,
    /// Raft messages handed to `inbound`.
    pub messages_delivered: u64,
    /// Side messages written by our dialers (one frame each).
    pub side_messages_sent: u64,
    /// Side messages handed to `inbound`.
    pub side_messages_delivered: u64,
    /// Handshakes our dialers completed.
    pub handshakes_dialed: u64,
    /// Handshakes we accepted.
    pub handshakes_accepted: u64,
    /// Messages (Raft or side) dropped from a full queue.
    pub dropped_queue_full: u64,
    /// Messages (Raft or side) to nodes that are not peers.
    pub dropped_unknown_peer: u64,
    /// Messages (Raft or side) too large for a frame on their own.
    pub dropped_oversized: u64,
    /// Received messages not addressed to us or not from the handshaken peer.
    pub dropped_misaddressed: u64,
    /// Accepted connections closed for an undecodable or oversized frame.
    pub malformed_connections: u64,
}

#[derive(Debug, Default)]
struct Counters {
    batch_frames_sent: AtomicU64,
    messages_sent: AtomicU64,
    batch_frames_received: AtomicU64,
    messages_delivered: AtomicU64,
    side_messages_sent: AtomicU64,
    side_messages_delivered: AtomicU64,
    handshakes_dialed: AtomicU64,
    handshakes_accepted: AtomicU64,
    dropped_queue_full: AtomicU64,
    dropped_unknown_peer: AtomicU64,
    dropped_oversized: AtomicU64,
    dropped_misaddressed: AtomicU64,
    malformed_connections: AtomicU64,
}

fn bump(counter: &AtomicU64, n: u64) {
    counter.fetch_add(n, Ordering::Relaxed);
}

fn lock<T>(mutex: &Mutex<T>) -> MutexGuard<'_, T> {
    mutex.lock().unwrap_or_else(PoisonError::into_inner)
}

/// Messages waiting for a peer's writer, with their encoded sizes.
#[derive(Debug, Default)]
struct Queue {
    messages: VecDeque<(usize, Outgoing)>,
    /// Sum of the sizes in `messages` (saturating).
    bytes: usize,
}

impl Queue {
    /// Appends, then drops the oldest messages while over either bound; returns how many
    /// were dropped.
    fn push(&mut self, size: usize, message: Outgoing, max_len: usize, max_bytes: usize) -> u64 {
        self.messages.push_back((size, message));
        self.bytes = self.bytes.saturating_add(size);
        let mut dropped = 0;
        while self.messages.len() > max_len || (self.bytes > max_bytes && self.messages.len() > 1) {
            if let Some((size, _)) = self.messages.pop_front() {
                self.bytes = self.bytes.saturating_sub(size);
                dropped += 1;
            }
        }
        dropped
    }

    fn take(&mut self) -> VecDeque<(usize, Outgoing)> {
        self.bytes = 0;
        std::mem::take(&mut self.messages)
    }
}

/// One peer we send to: its queue and its writer task's controls.
#[derive(Debug)]
struct PeerSlot {
    id: u64,
    info: Mutex<PeerInfo>,
    /// Bumped when `info` changes, so the writer reconnects.
    generation: AtomicU64,
    queue: Mutex<Queue>,
    /// Wakes the writer: messages queued or `info` changed.
    wake: Notify,
    /// Stops the writer.
    cancel: CancellationToken,
}

#[derive(Debug)]
struct Shared {
    id: u64,
    cluster_id: u64,
    incarnation: u64,
    max_frame: usize,
    backoff: Backoff,
    queue_len: usize,
    queue_bytes: usize,
    io_timeout: Duration,
    client_addr: String,
    peers: Mutex<BTreeMap<u64, Arc<PeerSlot>>>,
    /// Client addresses learned from handshakes, by peer id (only current peers).
    client_addrs: Mutex<BTreeMap<u64, String>>,
    /// Incarnations presented in handshakes, by peer id (only current peers).
    incarnations: Mutex<BTreeMap<u64, u64>>,
    /// Accepted connection per peer id: (connection number, its cancel token).
    accepted: Mutex<BTreeMap<u64, (u64, CancellationToken)>>,
    next_conn: AtomicU64,
    inbound: mpsc::Sender<Inbound>,
    counters: Counters,
    refusals: Mutex<VecDeque<Refusal>>,
    cancel: CancellationToken,
    tracker: TaskTracker,
    runtime: tokio::runtime::Handle,
}

/// The running transport. Dropping it stops every task (without waiting for them).
#[derive(Debug)]
pub struct PeerTransport {
    shared: Arc<Shared>,
    local_addr: SocketAddr,
}

impl PeerTransport {
    /// Binds `addr` and starts; see [`PeerTransport::start`].
    pub async fn bind(
        config: PeerConfig,
        addr: SocketAddr,
        inbound: mpsc::Sender<Inbound>,
    ) -> std::io::Result<PeerTransport> {
        let listener = TcpListener::bind(addr).await?;
        PeerTransport::start(config, listener, inbound)
    }

    /// Starts accepting peers on `listener` and a writer task per peer. Must be called inside
    /// a tokio runtime; the tasks run on it.
    pub fn start(
        config: PeerConfig,
        listener: TcpListener,
        inbound: mpsc::Sender<Inbound>,
    ) -> std::io::Result<PeerTransport> {
        let local_addr = listener.local_addr()?;
        let shared = Arc::new(Shared {
            id: config.id,
            cluster_id: config.cluster_id,
            incarnation: config.incarnation,
            max_frame: config.max_frame.min(lockd_protocol::MAX_FRAME_LIMIT),
            backoff: config.backoff,
            queue_len: config.queue_len.max(1),
            queue_bytes: config.queue_bytes,
            io_timeout: config.io_timeout,
            client_addr: config.client_addr,
            peers: Mutex::new(BTreeMap::new()),
            client_addrs: Mutex::new(BTreeMap::new()),
            incarnations: Mutex::new(BTreeMap::new()),
            accepted: Mutex::new(BTreeMap::new()),
            next_conn: AtomicU64::new(1),
            inbound,
            counters: Counters::default(),
            refusals: Mutex::new(VecDeque::new()),
            cancel: CancellationToken::new(),
            tracker: TaskTracker::new(),
            runtime: tokio::runtime::Handle::current(),
        });
        let transport = PeerTransport { shared, local_addr };
        // The peers first, then the acceptor: a `Hello` checked before the peer set is in
        // place would be refused as from an unknown node, and the refused node would take
        // that for the cluster not knowing it (and exit).
        transport.set_peers(config.peers);
        let shared = &transport.shared;
        let span = tracing::info_span!("peer_accept", node = shared.id, %local_addr);
        let task = accept::accept_loop(shared.clone(), listener);
        spawn_cancellable(shared, shared.cancel.clone(), task, span);
        Ok(transport)
    }

    /// The address the transport accepts peers on.
    pub fn local_addr(&self) -> SocketAddr {
        self.local_addr
    }

    /// Queues messages for their `to` nodes and wakes the writers. Never blocks; callable
    /// from any thread. Messages to unknown nodes are dropped; a full queue drops its oldest.
    pub fn send(&self, messages: Vec<Message>) {
        let shared = &self.shared;
        let peers = lock(&shared.peers);
        let mut woken: Vec<&Arc<PeerSlot>> = Vec::new();
        for message in messages {
            let Some(slot) = peers.get(&message.to) else {
                bump(&shared.counters.dropped_unknown_peer, 1);
                tracing::debug!(to = message.to, "message for an unknown peer dropped");
                continue;
            };
            let size = message_size(&message).unwrap_or(usize::MAX);
            shared.enqueue(slot, size, Outgoing::Raft(message));
            if !woken.iter().any(|w| w.id == slot.id) {
                woken.push(slot);
            }
        }
        for slot in woken {
            slot.wake.notify_one();
        }
    }

    /// Queues a side message for peer `to` on the same ordered connection as its Raft
    /// messages, and wakes its writer. Never blocks; callable from any thread. Dropped
    /// (counted) if `to` is unknown; subject to the same queue bounds as Raft messages, and
    /// dropped (counted) by the writer if it does not fit a frame on its own.
    pub fn send_side(&self, to: u64, message: SideMessage) {
        let shared = &self.shared;
        let peers = lock(&shared.peers);
        let Some(slot) = peers.get(&to) else {
            bump(&shared.counters.dropped_unknown_peer, 1);
            tracing::debug!(to, "side message for an unknown peer dropped");
            return;
        };
        let body = PeerMessage::from(message);
        let size = wire::encoded_size(&body).unwrap_or(usize::MAX);
        shared.enqueue(slot, size, Outgoing::Side(body));
        slot.wake.notify_one();
    }

    /// Client addresses of peers, learned from handshakes (the `Hello`s we accepted and the
    /// `HelloOk`s our dialers received), by node id. Excludes this node, peers that told none
    /// and peers no longer configured.
    pub fn client_addrs(&self) -> BTreeMap<u64, String> {
        lock(&self.shared.client_addrs).clone()
    }

    /// Incarnations peers presented in their handshakes, by node id (the leader records
    /// them in the configuration, DESIGN §3a.9).
    pub fn incarnations(&self) -> BTreeMap<u64, u64> {
        lock(&self.shared.incarnations).clone()
    }

    /// Forgets the incarnation node `id` presented in its handshakes so far; its next
    /// handshake tells it again.
    pub fn forget_identity(&self, id: u64) {
        lock(&self.shared.incarnations).remove(&id);
    }

    /// Replaces the set of peers: new ones get a writer, removed ones lose theirs (and their
    /// queue), and a changed address or incarnation makes the writer reconnect.
    pub fn set_peers(&self, peers: BTreeMap<u64, PeerInfo>) {
        let shared = &self.shared;
        let mut slots = lock(&shared.peers);
        slots.retain(|id, slot| {
            let keep = peers.contains_key(id);
            if !keep {
                slot.cancel.cancel();
            }
            keep
        });
        lock(&shared.client_addrs).retain(|id, _| slots.contains_key(id));
        lock(&shared.incarnations).retain(|id, _| slots.contains_key(id));
        for (&id, &info) in peers.iter().filter(|(&id, _)| id != shared.id) {
            if let Some(slot) = slots.get(&id) {
                let mut current = lock(&slot.info);
                if *current != info {
                    if current.incarnation.is_some() && info.incarnation.is_none() {
                        // Removed and added again: what its last handshake told belongs to
                        // the data directory it had then (maybe since wiped), and must not
                        // be recorded as the new member's identity.
                        lock(&shared.incarnations).remove(&id);
                    }
                    *current = info;
                    slot.generation.fetch_add(1, Ordering::AcqRel);
                    slot.wake.notify_one();
                }
                continue;
            }
            let slot = Arc::new(PeerSlot {
                id,
                info: Mutex::new(info),
                generation: AtomicU64::new(0),
                queue: Mutex::new(Queue::default()),
                wake: Notify::new(),
                cancel: shared.cancel.child_token(),
            });
            slots.insert(id, slot.clone());
            let span = tracing::info_span!("peer_writer", node = shared.id, peer = id);
            let task = writer::run_writer(shared.clone(), slot.clone());
            spawn_cancellable(shared, slot.cancel.clone(), task, span);
        }
    }

    /// Counters so far.
    pub fn stats(&self) -> PeerStats {
        let c = &self.shared.counters;
        let get = |a: &AtomicU64| a.load(Ordering::Relaxed);
        PeerStats {
            batch_frames_sent: get(&c.batch_frames_sent),
            messages_sent: get(&c.messages_sent),
            batch_frames_received: get(&c.batch_frames_received),
            messages_delivered: get(&c.messages_delivered),
            side_messages_sent: get(&c.side_messages_sent),
            side_messages_delivered: get(&c.side_messages_delivered),
            handshakes_dialed: get(&c.handshakes_dialed),
            handshakes_accepted: get(&c.handshakes_accepted),
            dropped_queue_full: get(&c.dropped_queue_full),
            dropped_unknown_peer: get(&c.dropped_unknown_peer),
            dropped_oversized: get(&c.dropped_oversized),
            dropped_misaddressed: get(&c.dropped_misaddressed),
            malformed_connections: get(&c.malformed_connections),
        }
    }

    /// The most recent refusals, oldest first.
    pub fn refusals(&self) -> Vec<Refusal> {
        lock(&self.shared.refusals).iter().cloned().collect()
    }

    /// Stops accepting and sending, and waits for every task to end. Queued messages are
    /// dropped.
    pub async fn shutdown(self) {
        self.shared.cancel.cancel();
        self.shared.tracker.close();
        self.shared.tracker.wait().await;
    }
}

impl Drop for PeerTransport {
    fn drop(&mut self) {
        self.shared.cancel.cancel();
    }
}

/// Runs `task` on the transport's runtime until it ends or `cancel` fires.
fn spawn_cancellable(
    shared: &Shared,
    cancel: CancellationToken,
    task: impl std::future::Future<Output = ()> + Send + 'static,
    span: tracing::Span,
) {
    let guarded = async move {
        tokio::select! {
            _ = cancel.cancelled() => {}
            _ = task => {}
        }
    };
    shared
        .tracker
        .spawn_on(guarded.instrument(span), &shared.runtime);
}

impl Shared {
    fn record_refusal(&self, peer: Option<u64>, by_us: bool, reason: RefuseReason) {
        tracing::warn!(?peer, by_us, %reason, "peer connection refused");
        let mut refusals = lock(&self.refusals);
        if refusals.len() >= REFUSALS_KEPT {
            refusals.pop_front();
        }
        refusals.push_back(Refusal {
            peer,
            by_us,
            reason,
        });
    }

    /// Appends to `slot`'s queue within the bounds, counting what that drops. The caller
    /// wakes the writer.
    fn enqueue(&self, slot: &PeerSlot, size: usize, message: Outgoing) {
        let dropped = lock(&slot.queue).push(size, message, self.queue_len, self.queue_bytes);
        bump(&self.counters.dropped_queue_full, dropped);
    }

    /// Records the client address `peer` told in its handshake (already checked against
    /// [`MAX_CLIENT_ADDR_LEN`]; an empty one forgets it) and its incarnation. Ignored for
    /// non-peers.
    fn learn_client_addr(&self, peer: u64, client_addr: &str, incarnation: u64) {
        let peers = lock(&self.peers);
        if peer == self.id || !peers.contains_key(&peer) {
            return;
        }
        lock(&self.incarnations).insert(peer, incarnation);
        let mut addrs = lock(&self.client_addrs);
        if client_addr.is_empty() {
            addrs.remove(&peer);
        } else if addrs.get(&peer).map(String::as_str) != Some(client_addr) {
            addrs.insert(peer, client_addr.to_string());
        }
    }

    fn frame(&self, body: PeerMessage) -> PeerFrame {
        PeerFrame {
            cluster_id: self.cluster_id,
            from: self.id,
            incarnation: self.incarnation,
            body,
        }
    }

    fn codec(&self) -> FrameCodec<PeerFrame, PeerFrame> {
        FrameCodec::new(self.max_frame)
    }

    /// Writes one frame (handshake and refusal frames; batches are written in bulk).
    async fn write_frame(
        &self,
        write: &mut OwnedWriteHalf,
        body: PeerMessage,
    ) -> Result<(), PeerError> {
        let mut buf = BytesMut::new();
        encode_frame(&self.frame(body), self.max_frame, &mut buf)?;
        self.write_all(write, &buf).await
    }

    /// Writes `bytes` within the IO timeout.
    async fn write_all(&self, write: &mut OwnedWriteHalf, bytes: &[u8]) -> Result<(), PeerError> {
        tokio::time::timeout(self.io_timeout, write.write_all(bytes))
            .await
            .map_err(|_| PeerError::Timeout)??;
        Ok(())
    }

    /// Tells the other side why, best effort, and records it.
    async fn refuse(&self, write: &mut OwnedWriteHalf, peer: Option<u64>, reason: RefuseReason) {
        let _ = self
            .write_frame(
                write,
                PeerMessage::Refused {
                    reason: reason.clone(),
                },
            )
            .await;
        let _ = write.shutdown().await;
        self.record_refusal(peer, true, reason);
    }
}

type PeerReader = FramedRead<OwnedReadHalf, FrameCodec<PeerFrame, PeerFrame>>;

/// Next frame within the handshake timeout.
async fn read_frame(shared: &Shared, reader: &mut PeerReader) -> Result<PeerFrame, PeerError> {
    match tokio::time::timeout(shared.io_timeout, reader.next()).await {
        Err(_) => Err(PeerError::Timeout),
        Ok(None) => Err(PeerError::Closed),
        Ok(Some(frame)) => Ok(frame?),
    }
}

/// Checks a handshake frame's envelope and client address against what we expect of `peer`.
fn check_identity(
    shared: &Shared,
    frame: &PeerFrame,
    expected_incarnation: Option<u64>,
    peer: u64,
    protocol_version: u32,
    client_addr: &str,
) -> Option<RefuseReason> {
    if protocol_version != PEER_PROTOCOL_VERSION {
        return Some(RefuseReason::ProtocolVersion {
            ours: PEER_PROTOCOL_VERSION,
            theirs: protocol_version,
        });
    }
    if frame.cluster_id != shared.cluster_id {
        return Some(RefuseReason::WrongCluster {
            expected: shared.cluster_id,
            got: frame.cluster_id,
        });
    }
    if frame.from != peer {
        return Some(RefuseReason::WrongTarget {
            to: peer,
            me: frame.from,
        });
    }
    if let Some(expected) = expected_incarnation.filter(|&e| e != frame.incarnation) {
        return Some(RefuseReason::WrongIncarnation {
            id: peer,
            expected,
            got: frame.incarnation,
        });
    }
    if client_addr.len() > MAX_CLIENT_ADDR_LEN {
        return Some(RefuseReason::ClientAddrTooLong {
            len: client_addr.len() as u64,
            max: MAX_CLIENT_ADDR_LEN as u64,
        });
    }
    None
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::raft::MessageKind;

    fn message(n: u64) -> Outgoing {
        Outgoing::Raft(Message {
            from: 1,
            to: 2,
            term: n,
            kind: MessageKind::TimeoutNow,
        })
    }

    #[test]
    fn the_queue_drops_its_oldest_beyond_either_bound() {
        let mut queue = Queue::default();
        let dropped: u64 = (0..10).map(|n| queue.push(10, message(n), 4, 1000)).sum();
        assert_eq!(dropped, 6);
        let kept: Vec<u64> = queue
            .messages
            .iter()
            .map(|(_, m)| match m {
                Outgoing::Raft(m) => m.term,
                Outgoing::Side(_) => u64::MAX,
            })
            .collect();
        assert_eq!(kept, vec![6, 7, 8, 9]);
        assert_eq!(queue.bytes, 40);
        assert_eq!(queue.push(35, message(10), 4, 50), 3);
        assert_eq!(queue.bytes, 45);
        // The newest message is kept even when it alone exceeds the byte bound.
        assert_eq!(queue.push(500, message(11), 4, 50), 2);
        assert_eq!(queue.take().len(), 1);
        assert_eq!(queue.bytes, 0);
    }

    #[test]
    fn backoff_grows_with_jitter_up_to_its_cap() {
        let backoff = Backoff {
            initial: Duration::from_millis(10),
            max: Duration::from_millis(200),
        };
        for attempt in 0..40 {
            let base = Duration::from_millis(10 * (1u64 << attempt.min(16)))
                .min(Duration::from_millis(200));
            let delay = backoff.delay(attempt);
            assert!(delay >= base / 2 && delay <= base, "{attempt}: {delay:?}");
        }
    }
}
