//! Small value types shared by requests, responses and the server's state machine.

use bincode::{Decode, Encode};

/// A revision: the Raft log index of the entry that made a change. Strictly increasing.
pub type Revision = u64;

/// Identifies a session. It is the revision of the entry that opened it, so ids are unique
/// for the life of a cluster and never reused.
#[derive(Encode, Decode, Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct SessionId(pub u64);

impl std::fmt::Display for SessionId {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{:#x}", self.0)
    }
}

/// Metadata of a node in the namespace (ZooKeeper's `Stat`).
#[derive(Encode, Decode, Clone, Debug, PartialEq, Eq, Default)]
pub struct Stat {
    /// Revision that created the node.
    pub create_rev: Revision,
    /// Revision of the last change to the node's data (equals `create_rev` until set).
    pub mod_rev: Revision,
    /// Number of data changes since creation (0 for a new node).
    pub version: u64,
    /// Number of changes to the set of children.
    pub children_version: u64,
    /// Owner session of an ephemeral node.
    pub ephemeral_owner: Option<SessionId>,
    /// Length of the data in bytes.
    pub data_len: u32,
    /// Number of children.
    pub num_children: u32,
}

/// How a read is served.
#[derive(Encode, Decode, Clone, Copy, Debug, PartialEq, Eq, Default)]
pub enum Consistency {
    /// Reflects every write completed before the read began (the default).
    #[default]
    Linearizable,
    /// Served from the answering node's applied state; may lag. The response's revision says
    /// how far it reflects.
    Stale,
}

/// Exactly-once header of a write made under a session (DESIGN §3a.7).
#[derive(Encode, Decode, Clone, Copy, Debug, PartialEq, Eq)]
pub struct SessionSeq {
    /// The session the write belongs to (and the owner of ephemeral nodes it creates).
    pub session: SessionId,
    /// The client's sequence number for this request, starting at 1.
    pub seq: u64,
    /// The client's lowest sequence number without a response: everything below it has been
    /// answered, so the server may forget those responses.
    pub floor: u64,
}

/// A cluster member as clients see it.
#[derive(Encode, Decode, Clone, Debug, PartialEq, Eq)]
pub struct MemberInfo {
    /// Node id.
    pub id: u64,
    /// Address clients connect to.
    pub client_addr: String,
}
