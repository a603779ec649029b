//! Errors that travel on the wire. Every failed request is answered with one of these; the
//! client crate maps them into its own error type without losing the case.

use bincode::{Decode, Encode};

use crate::{Revision, SessionId};

/// A typed error carried in a response (or in `Goodbye` before the server closes a
/// connection). Variants are only ever added at the end, so old clients decode new servers'
/// known cases.
#[derive(Encode, Decode, Clone, Debug, PartialEq, Eq, thiserror::Error)]
pub enum Error {
    // --- connection and framing ---
    /// The client's protocol version is not spoken by the server.
    #[error("unsupported protocol version {client} (server speaks {server})")]
    UnsupportedVersion { client: u32, server: u32 },
    /// The first frame on a connection must be `Hello`.
    #[error("the first frame must be Hello")]
    HelloRequired,
    /// A frame's length prefix exceeds the limit; the connection is closed.
    #[error("frame of {len} bytes exceeds the limit of {max} bytes")]
    FrameTooLarge { len: u64, max: u64 },
    /// A frame could not be decoded; the connection is closed.
    #[error("malformed frame: {0}")]
    Malformed(String),

    // --- arguments ---
    /// The path breaks the namespace's rules.
    #[error("invalid path {path:?}: {reason}")]
    InvalidPath { path: String, reason: String },
    /// Node data above the configured limit.
    #[error("data of {len} bytes exceeds the limit of {max} bytes")]
    DataTooLarge { len: u64, max: u64 },
    /// A whole proposal (a `multi` included) above the configured limit.
    #[error("request of {len} bytes exceeds the proposal limit of {max} bytes")]
    RequestTooLarge { len: u64, max: u64 },
    /// Any other argument out of range.
    #[error("invalid argument: {0}")]
    InvalidArgument(String),

    // --- namespace ---
    /// The node (or, for create, its parent) does not exist.
    #[error("no node {path}")]
    NoNode { path: String },
    /// A node exists at the path already.
    #[error("node {path} already exists")]
    NodeExists { path: String },
    /// Deleting a node that has children.
    #[error("node {path} has children")]
    NotEmpty { path: String },
    /// A compare-and-set or check found another version.
    #[error("version mismatch on {path}: expected {expected}, found {actual}")]
    BadVersion {
        path: String,
        expected: u64,
        actual: u64,
    },
    /// Ephemeral nodes cannot have children.
    #[error("ephemeral node {path} cannot have children")]
    EphemeralParent { path: String },
    /// One operation of a `multi` failed; nothing was applied.
    #[error("multi operation {index} failed, nothing applied: {error}")]
    MultiFailed { index: u32, error: Cause },

    // --- sessions and exactly-once ---
    /// The session has expired or was closed.
    #[error("session {session} has expired")]
    SessionExpired { session: SessionId },
    /// The session id was never issued by this cluster.
    #[error("unknown session {session}")]
    UnknownSession { session: SessionId },
    /// A request below the session's floor: its response was already acknowledged and
    /// forgotten, so it is not applied again.
    #[error("stale request: seq {seq} is below the floor {floor} of session {session}")]
    StaleRequest {
        session: SessionId,
        seq: u64,
        floor: u64,
    },
    /// A sequence number too far above the session's floor.
    #[error(
        "seq {seq} of session {session} is beyond the window (floor {floor}, window {window})"
    )]
    SeqOutOfWindow {
        session: SessionId,
        seq: u64,
        floor: u64,
        window: u64,
    },

    // --- cluster and server ---
    /// This node is not the leader; retry on the hinted node.
    #[error("not the leader (leader hint: {leader_hint:?})")]
    NotLeader { leader_hint: Option<u64> },
    /// The server is shutting down and takes no new requests.
    #[error("server is shutting down")]
    ShuttingDown,
    /// The server cannot serve the request now (no leader, overloaded, ...); retry later.
    #[error("unavailable: {0}")]
    Unavailable(String),
    /// The server's storage failed.
    #[error("storage error: {0}")]
    Storage(String),
    /// A response would exceed the frame limit.
    #[error("response of {len} bytes exceeds the frame limit")]
    ResponseTooLarge { len: u64 },
    /// A bug or an unexpected condition in the server.
    #[error("internal error: {0}")]
    Internal(String),
    /// The answer to a request is unknown: it may or may not have been applied (the
    /// connection carrying it was lost and it could not be retried safely).
    #[error("outcome unknown: {0}")]
    Indeterminate(String),
    /// A revision newer than the node has applied was required.
    #[error("revision {requested} not yet applied (applied {applied})")]
    FutureRevision {
        requested: Revision,
        applied: Revision,
    },

    // --- locks and watches ---
    /// A fenced write whose lock is no longer held under that token.
    #[error("fencing rejected: lock {lock} is not held under token {token}")]
    FencingRejected { lock: String, token: u64 },
    /// Release of a grant that does not hold the lock (released, revoked, or never).
    #[error("lock {lock} is not held under token {token}")]
    LockNotHeld { lock: String, token: u64 },
    /// Cancel of an acquire that is neither waiting nor holding.
    #[error("no acquire {acquire_id} on lock {lock}")]
    NoSuchAcquire { lock: String, acquire_id: u64 },
    /// The watch's start revision is older than the kept event history.
    #[error("revision compacted: the oldest kept revision is {oldest}")]
    Compacted { oldest: Revision },
    /// The watch fell behind and was cancelled; resume from `resume_from`.
    #[error("watch fell behind; resume from revision {resume_from}")]
    Lagged { resume_from: Revision },
    /// No such watch on this connection.
    #[error("no watch {watch_id}")]
    NoSuchWatch { watch_id: u64 },
    /// A membership change or leader transfer the cluster refuses as asked (unknown member,
    /// already a member, a learner still behind, the last voter, ...).
    #[error("membership change refused: {0}")]
    MembershipRefused(String),
}

/// The error inside [`Error::MultiFailed`]: an [`Error`] behind a box whose decoding refuses
/// nesting deeper than [`MAX_CAUSE_DEPTH`], so a small hostile frame of deeply nested
/// `MultiFailed` cannot overflow the decoder's stack.
#[derive(Encode, Clone, Debug, PartialEq, Eq)]
pub struct Cause(pub Box<Error>);

/// How deeply `MultiFailed` errors may nest on the wire (the server never nests them).
pub const MAX_CAUSE_DEPTH: u32 = 4;

thread_local! {
    static CAUSE_DEPTH: std::cell::Cell<u32> = const { std::cell::Cell::new(0) };
}

impl<Context> Decode<Context> for Cause {
    fn decode<D: bincode::de::Decoder<Context = Context>>(
        decoder: &mut D,
    ) -> Result<Self, bincode::error::DecodeError> {
        let depth = CAUSE_DEPTH.with(|d| d.get());
        if depth >= MAX_CAUSE_DEPTH {
            return Err(bincode::error::DecodeError::Other(
                "MultiFailed nested too deeply",
            ));
        }
        CAUSE_DEPTH.with(|d| d.set(depth + 1));
        let inner = Error::decode(decoder);
        CAUSE_DEPTH.with(|d| d.set(depth));
        Ok(Cause(Box::new(inner?)))
    }
}

impl<'de, Context> bincode::BorrowDecode<'de, Context> for Cause {
    fn borrow_decode<D: bincode::de::BorrowDecoder<'de, Context = Context>>(
        decoder: &mut D,
    ) -> Result<Self, bincode::error::DecodeError> {
        Self::decode(decoder)
    }
}

impl From<Error> for Cause {
    fn from(error: Error) -> Self {
        Cause(Box::new(error))
    }
}

impl std::ops::Deref for Cause {
    type Target = Error;
    fn deref(&self) -> &Error {
        &self.0
    }
}

impl std::fmt::Display for Cause {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        self.0.fmt(f)
    }
}

impl Error {
    /// True for errors after which the same request may succeed on retry elsewhere or later
    /// (and that guarantee the request was not applied).
    pub fn is_retryable(&self) -> bool {
        matches!(
            self,
            Error::NotLeader { .. } | Error::ShuttingDown | Error::Unavailable(_)
        )
    }
}
