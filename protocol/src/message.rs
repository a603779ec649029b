//! Messages on a client connection: what the client sends ([`ClientMessage`]) and what the
//! server sends back or pushes ([`ServerMessage`]).

use bincode::{Decode, Encode};

use crate::{Consistency, Error, MemberInfo, Revision, SessionId, SessionSeq, Stat};

/// A frame sent by a client.
#[derive(Encode, Decode, Clone, Debug, PartialEq, Eq)]
pub enum ClientMessage {
    /// Must be the first frame on a connection.
    Hello(Hello),
    /// A request; answered by exactly one [`ServerMessage::Response`] with the same id.
    /// Many may be in flight (pipelining); responses may come out of order.
    Request { request_id: u64, request: Request },
    /// Renews several sessions at once; answered by [`ServerMessage::KeepAliveReply`].
    KeepAlive {
        request_id: u64,
        sessions: Vec<SessionId>,
    },
}

/// The handshake.
#[derive(Encode, Decode, Clone, Debug, PartialEq, Eq)]
pub struct Hello {
    /// [`crate::PROTOCOL_VERSION`] of the client.
    pub protocol_version: u32,
    /// Free-form name for the server's logs.
    pub client_name: String,
}

/// A client request.
#[derive(Encode, Decode, Clone, Debug, PartialEq, Eq)]
pub enum Request {
    /// A read of the namespace.
    Read {
        consistency: Consistency,
        op: ReadOp,
    },
    /// A write. With `session: None` the write runs under the connection's implicit session
    /// (opened by the server on the first such write, closed with the connection).
    Write {
        session: Option<SessionSeq>,
        op: WriteOp,
    },
    /// Opens a session with the requested TTL (clamped to the server's bounds).
    OpenSession { ttl_ms: u64 },
    /// Closes a session: its ephemeral nodes are deleted.
    CloseSession { session: SessionId },
    /// Describes the cluster as this node sees it.
    ClusterStatus,
    /// A write applied only if `fence.lock` is still held under the grant with
    /// `fence.token`, whoever sends it (Chubby's sequencer check); else `FencingRejected`.
    FencedWrite {
        session: Option<SessionSeq>,
        op: WriteOp,
        fence: Fence,
    },
    /// Starts a watch stream; answered `WatchCreated`, then events are pushed.
    Watch(WatchRequest),
    /// Ends a watch stream; answered `WatchCancelled`.
    CancelWatch { watch_id: u64 },
    /// Changes the cluster's membership, one server at a time (leader only); answered with
    /// the `ClusterStatus` once the configuration entry applied.
    ChangeMembers(MemberChange),
    /// Hands leadership to member `to` (leader only, §3.10); answered with the
    /// `ClusterStatus` once `to` leads, or an error if the transfer aborted.
    TransferLeader { to: u64 },
}

/// One membership change (DESIGN §3a.8).
#[derive(Encode, Decode, Clone, Debug, PartialEq, Eq)]
pub enum MemberChange {
    /// Adds a non-voting learner that receives the log; start it with `lockd --join`.
    AddLearner {
        id: u64,
        peer_addr: String,
        client_addr: String,
    },
    /// Makes a caught-up learner a voter.
    Promote { id: u64 },
    /// Removes a member (the leader included: it steps down once the change commits).
    Remove { id: u64 },
}

/// Names a lock grant: writes carrying it apply only while the grant holds the lock.
#[derive(Encode, Decode, Clone, Debug, PartialEq, Eq)]
pub struct Fence {
    pub lock: String,
    pub token: u64,
}

/// What a watch observes.
#[derive(Encode, Decode, Clone, Debug, PartialEq, Eq)]
pub enum WatchTarget {
    /// Changes to one node (created, changed, deleted).
    Node(String),
    /// Children of a node being created or deleted (and changes to them).
    Children(String),
    /// Every node at or below a path.
    Prefix(String),
    /// Events of one session: its lock grants, revocations and ended waits, and its end.
    Session(SessionId),
    /// Events of one lock: grants (with the holder's value), releases, revocations.
    Lock(String),
}

/// A new watch.
#[derive(Encode, Decode, Clone, Debug, PartialEq, Eq)]
pub struct WatchRequest {
    pub target: WatchTarget,
    /// First revision to deliver; `None` = from the next revision ("now").
    pub start_revision: Option<Revision>,
    /// Include node data in created/changed events.
    pub with_data: bool,
}

/// Acquire a named exclusive lock for the writing session. Each acquire is its own grant or
/// waiter (DESIGN §3a.11). Answered `Lock(Granted { token })` or `Lock(Queued { waiter_id })`
/// (or `Lock(NotAcquired)` for a try-acquire of a held lock).
#[derive(Encode, Decode, Clone, Debug, PartialEq, Eq)]
pub struct AcquireOp {
    pub lock: String,
    /// Stored with the grant (a leader election's value); at most the data size limit.
    pub value: Vec<u8>,
    /// Do not queue: answer `NotAcquired` if the lock is not free now.
    pub try_only: bool,
    /// Give up waiting after this long (entry time); the waiter then gets a
    /// `LockWaitEnded { TimedOut }` event.
    pub timeout_ms: Option<u64>,
    /// The lock's lock-delay (at most 60 s), set by the first acquire that names one.
    pub lock_delay_ms: Option<u64>,
}

/// Release the grant `token` of `lock`.
#[derive(Encode, Decode, Clone, Debug, PartialEq, Eq)]
pub struct ReleaseOp {
    pub lock: String,
    pub token: u64,
}

/// Cancel-or-release: withdraw the acquire `acquire_id`; if it was granted meanwhile,
/// release that grant.
#[derive(Encode, Decode, Clone, Debug, PartialEq, Eq)]
pub struct CancelOp {
    pub lock: String,
    pub acquire_id: u64,
}

/// Read operations.
#[derive(Encode, Decode, Clone, Debug, PartialEq, Eq)]
pub enum ReadOp {
    /// Data and stat of a node.
    Get { path: String },
    /// Stat of a node, or `None` if it does not exist (`exists`).
    Stat { path: String },
    /// Children names in byte order, a page at a time: names after `start_after`, at most
    /// `limit` (0 = server default). `more` in the reply says whether a next page exists.
    Children {
        path: String,
        start_after: Option<String>,
        limit: u32,
    },
    /// Holder, waiters and delay of a lock.
    Lock { name: String },
    /// Locks in name order, a page at a time.
    Locks {
        start_after: Option<String>,
        limit: u32,
    },
}

/// Create a node.
#[derive(Encode, Decode, Clone, Debug, PartialEq, Eq)]
pub struct CreateOp {
    pub path: String,
    pub data: Vec<u8>,
    /// Deleted when the owning session ends.
    pub ephemeral: bool,
    /// Append a 10-digit zero-padded counter of the parent to the name.
    pub sequential: bool,
}

/// Replace a node's data, optionally only at an expected version (compare-and-set).
#[derive(Encode, Decode, Clone, Debug, PartialEq, Eq)]
pub struct SetOp {
    pub path: String,
    pub data: Vec<u8>,
    pub expected_version: Option<u64>,
}

/// Delete a node, optionally only at an expected version.
#[derive(Encode, Decode, Clone, Debug, PartialEq, Eq)]
pub struct DeleteOp {
    pub path: String,
    pub expected_version: Option<u64>,
}

/// Check a node's version (only inside `multi`).
#[derive(Encode, Decode, Clone, Debug, PartialEq, Eq)]
pub struct CheckOp {
    pub path: String,
    pub version: u64,
}

/// Write operations.
#[derive(Encode, Decode, Clone, Debug, PartialEq, Eq)]
pub enum WriteOp {
    Create(CreateOp),
    Set(SetOp),
    Delete(DeleteOp),
    /// All operations apply, in order, or none does.
    Multi(Vec<MultiOp>),
    Acquire(AcquireOp),
    Release(ReleaseOp),
    Cancel(CancelOp),
}

/// One operation of a `multi`.
#[derive(Encode, Decode, Clone, Debug, PartialEq, Eq)]
pub enum MultiOp {
    Create(CreateOp),
    Set(SetOp),
    Delete(DeleteOp),
    Check(CheckOp),
}

/// A frame sent by the server.
#[derive(Encode, Decode, Clone, Debug, PartialEq, Eq)]
pub enum ServerMessage {
    /// Answer to a `Hello` the server accepts.
    HelloOk(HelloOk),
    /// Answer to a request. `revision` is the revision the answer reflects.
    Response {
        request_id: u64,
        revision: Revision,
        result: Result<Reply, Error>,
    },
    /// Answer to a keepalive: one result per session, in request order.
    KeepAliveReply {
        request_id: u64,
        results: Vec<(SessionId, KeepAliveResult)>,
    },
    /// Pushed when a session this connection kept alive has ended.
    SessionEvent {
        session: SessionId,
        revision: Revision,
        event: SessionEventKind,
    },
    /// Sent before the server closes the connection, with the reason.
    Goodbye { reason: Error },
    /// Events of a watch. All events of one revision arrive in order; a revision too large
    /// for one frame spans several, and only the last has `revision_complete` set.
    WatchEvents {
        watch_id: u64,
        events: Vec<Event>,
        revision_complete: bool,
    },
    /// Progress notification (bookmark): every event of the watch up to `revision` has been
    /// sent. A client resumes from max(last complete revision, last bookmark) + 1.
    WatchProgress { watch_id: u64, revision: Revision },
    /// The watch ended: `Lagged { resume_from }`, `Compacted { oldest }`, `ShuttingDown`...
    WatchEnded { watch_id: u64, reason: Error },
}

/// One event of the history.
#[derive(Encode, Decode, Clone, Debug, PartialEq, Eq)]
pub struct Event {
    pub revision: Revision,
    pub kind: EventKind,
}

/// What happened.
#[derive(Encode, Decode, Clone, Debug, PartialEq, Eq)]
pub enum EventKind {
    Created {
        path: String,
        stat: Stat,
        data: Option<Vec<u8>>,
    },
    Changed {
        path: String,
        stat: Stat,
        data: Option<Vec<u8>>,
    },
    Deleted {
        path: String,
    },
    /// A session ended (`expired` false: closed).
    SessionEnded {
        session: SessionId,
        expired: bool,
    },
    /// `token` now holds `lock`, for `session`'s acquire `acquire_id`, with its `value`.
    LockGranted {
        lock: String,
        token: u64,
        session: SessionId,
        acquire_id: u64,
        value: Vec<u8>,
    },
    /// The grant was released by its holder.
    LockReleased {
        lock: String,
        token: u64,
        session: SessionId,
    },
    /// The grant was taken away: its session ended. Its token fails from now on.
    LockRevoked {
        lock: String,
        token: u64,
        session: SessionId,
    },
    /// A waiter stopped waiting without a grant.
    LockWaitEnded {
        lock: String,
        acquire_id: u64,
        session: SessionId,
        reason: WaitEndReason,
    },
}

/// Why a waiter stopped waiting.
#[derive(Encode, Decode, Clone, Copy, Debug, PartialEq, Eq)]
pub enum WaitEndReason {
    TimedOut,
    Cancelled,
    SessionEnded,
}

/// The server's handshake answer.
#[derive(Encode, Decode, Clone, Debug, PartialEq, Eq)]
pub struct HelloOk {
    pub protocol_version: u32,
    pub node_id: u64,
    pub cluster_id: u64,
    pub leader_hint: Option<u64>,
    /// Client addresses of the cluster's members.
    pub members: Vec<MemberInfo>,
}

/// Result of one session's keepalive.
#[derive(Encode, Decode, Clone, Copy, Debug, PartialEq, Eq)]
pub enum KeepAliveResult {
    /// The deadline was extended to (at least) arrival + `ttl_ms`.
    Ok { ttl_ms: u64 },
    /// The session has ended (expired, closed or never existed).
    Expired,
}

/// Events pushed about a session.
#[derive(Encode, Decode, Clone, Copy, Debug, PartialEq, Eq)]
pub enum SessionEventKind {
    Expired,
    Closed,
}

/// Successful answers.
#[derive(Encode, Decode, Clone, Debug, PartialEq, Eq)]
pub enum Reply {
    /// `Get`.
    Node { data: Vec<u8>, stat: Stat },
    /// `Stat`: `None` when the node does not exist.
    Stat(Option<Stat>),
    /// `Children`: a page of names; `more` if a next page exists.
    Children { names: Vec<String>, more: bool },
    /// A write.
    Write(WriteResult),
    /// `OpenSession`.
    SessionOpened(SessionGrant),
    /// `CloseSession`.
    SessionClosed,
    /// `ClusterStatus`.
    ClusterStatus(ClusterStatus),
    /// `ReadOp::Lock`.
    Lock(LockInfo),
    /// `ReadOp::Locks`.
    Locks { locks: Vec<LockInfo>, more: bool },
    /// `Watch`: the stream's id and the concrete first revision it delivers.
    WatchCreated {
        watch_id: u64,
        start_revision: Revision,
    },
    /// `CancelWatch`.
    WatchCancelled,
}

/// A lock's state.
#[derive(Encode, Decode, Clone, Debug, PartialEq, Eq)]
pub struct LockInfo {
    pub name: String,
    pub holder: Option<LockHolder>,
    /// Waiters in grant order.
    pub waiters: Vec<LockWaiter>,
    pub lock_delay_ms: u64,
    /// While set, no grant is made before this entry time (ms).
    pub delayed_until_ms: Option<u64>,
}

/// The current grant.
#[derive(Encode, Decode, Clone, Debug, PartialEq, Eq)]
pub struct LockHolder {
    pub token: u64,
    pub session: SessionId,
    pub acquire_id: u64,
    pub value: Vec<u8>,
}

/// A queued acquire.
#[derive(Encode, Decode, Clone, Debug, PartialEq, Eq)]
pub struct LockWaiter {
    pub acquire_id: u64,
    pub session: SessionId,
    pub value: Vec<u8>,
    /// Entry time (ms) after which the wait ends.
    pub deadline_ms: Option<u64>,
}

/// What a write did.
#[derive(Encode, Decode, Clone, Debug, PartialEq, Eq)]
pub enum WriteResult {
    /// The created path (with the sequential suffix, if any).
    Created {
        path: String,
        stat: Stat,
    },
    Set {
        stat: Stat,
    },
    Deleted,
    /// Per-operation results of a successful `multi`.
    Multi(Vec<MultiResult>),
    /// `Acquire`.
    Lock(LockResult),
    /// `Release`.
    Released,
    /// `Cancel`: `released` if the acquire had been granted and the grant was released.
    Cancelled {
        released: bool,
    },
}

/// Outcome of an acquire.
#[derive(Encode, Decode, Clone, Copy, Debug, PartialEq, Eq)]
pub enum LockResult {
    /// Held now; `token` is the fencing token (= this revision) and the acquire id.
    Granted { token: u64 },
    /// Waiting; the grant comes as a `LockGranted` event for the session.
    Queued { waiter_id: u64 },
    /// A try-acquire of a lock that is not free.
    NotAcquired,
}

/// Result of one operation of a successful `multi`.
#[derive(Encode, Decode, Clone, Debug, PartialEq, Eq)]
pub enum MultiResult {
    Created { path: String, stat: Stat },
    Set { stat: Stat },
    Deleted,
    Checked,
}

/// A new session's terms, as stored in the replicated record (never re-clamped).
#[derive(Encode, Decode, Clone, Copy, Debug, PartialEq, Eq)]
pub struct SessionGrant {
    pub session: SessionId,
    /// Effective TTL after clamping.
    pub ttl_ms: u64,
    /// Length of the server's tick: deadlines are checked once per tick.
    pub tick_ms: u64,
    /// Bound on the server clock's rate error, parts per million.
    pub drift_ppm: u64,
}

/// `ClusterStatus` answer.
#[derive(Encode, Decode, Clone, Debug, PartialEq, Eq)]
pub struct ClusterStatus {
    pub cluster_id: u64,
    pub node_id: u64,
    pub leader: Option<u64>,
    pub term: u64,
    pub commit_index: u64,
    pub applied_index: u64,
    pub members: Vec<MemberInfo>,
    /// Members (of `members`) that are non-voting learners.
    pub learners: Vec<u64>,
}
