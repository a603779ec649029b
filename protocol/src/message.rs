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
}
