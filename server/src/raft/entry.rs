//! The log entry: what is appended, replicated, made durable and then applied.

use bincode::{Decode, Encode};

use super::membership::ConfChange;
use crate::fsm::Command;

/// One log entry. Its `index` is the revision of every change it makes.
#[derive(Encode, Decode, Clone, Debug, PartialEq, Eq)]
pub struct Entry {
    /// Position in the log, from 1.
    pub index: u64,
    /// Term of the leader that appended it.
    pub term: u64,
    /// Term the proposer believed current when it built the entry. For leader-decided
    /// entries (expiry) the state machine ignores the entry unless this equals `term`
    /// (DESIGN §3a.5): a deposed leader's decision must not apply under a new leader.
    pub proposer_term: u64,
    /// Monotonic entry time in ms: the previous entry's time plus the proposing leader's own
    /// monotonic time elapsed since it last stamped an entry. Never wall-clock time; the only
    /// notion of time the state machine sees.
    pub time_ms: u64,
    /// What the entry does.
    pub kind: EntryKind,
}

/// Kinds of entries.
#[derive(Encode, Decode, Clone, Debug, PartialEq, Eq)]
pub enum EntryKind {
    /// Appended by a new leader; committing it commits everything before it (§3.6.2).
    Noop,
    /// A state machine command.
    Command(Command),
    /// A single-server configuration change (§4.1). In force on each node once appended to
    /// its log; a no-op for the state machine's namespace (the applied index and revision
    /// still advance). Appended only through [`super::Raft::propose_conf_change`].
    Config(ConfChange),
}
