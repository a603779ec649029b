//! Consensus: the log entry format (fixed from the start, DESIGN §3a.12: term, kind,
//! proposer term, entry time) and a pure, deterministic Raft core in the style of
//! etcd-raft's `RawNode`: [`Raft`] takes inputs ([`Raft::tick`], [`Raft::step`],
//! [`Raft::propose`], [`Raft::read_index`]) and hands its outputs to a driver as a
//! [`Ready`]. The core does no IO, reads no clock (time is ticks), and draws randomness only
//! from a `ChaCha8Rng` seeded by [`RaftConfig::seed`]. It never iterates a hash map.
//!
//! # The Ready contract
//!
//! The driver (node layer) runs a loop. Whenever [`Raft::has_ready`] is true it calls
//! [`Raft::ready`] and handles the [`Ready`] **in this order**:
//!
//! 1. **Send `early_messages` now** if it likes. They are only the leader's own
//!    AppendEntries, which may leave before the leader's own write is durable (dissertation
//!    §10.2.1): the leader counts itself toward commit only after step 5, so an entry is
//!    never committed on the strength of an un-fsynced leader log. Nothing else may be sent
//!    before step 3.
//! 2. **Install `snapshot`** if present (state machine restored from its data, the stored
//!    log replaced by its metadata: index, term, configuration), **then persist `entries`**
//!    (they replace any stored entries at or after the first one's index: a follower's
//!    conflicting suffix is truncated this way) **and `hard_state`** (term, vote, commit) if
//!    present, all in one atomic write, made durable (fsync). With the in-memory
//!    [`MemStorage`]: `apply_snapshot`, `append`, `set_hard_state` through
//!    [`Raft::store_mut`].
//! 3. **Only now send `messages`.** They include every vote and vote grant, every message of a
//!    newly adopted term, every AppendResp (whose match index claims entries durable), the
//!    answer to the final snapshot chunk, heartbeats, ReadIndex traffic (DESIGN §3a.1:
//!    persist before send).
//! 4. **Apply `committed_entries`** in order (they may include entries of this same Ready's
//!    `entries`, hence after step 2). Client replies and pushed events go out only for applied
//!    entries.
//! 5. **Call [`Raft::advance`] with the Ready.** The core then marks the entries durable
//!    (the leader counts its own match index from here), the snapshot installed and the
//!    committed entries applied.
//!
//! `read_states` carry (ctx, index): the read with that ctx may be served once the applied
//! index is ≥ index (§6.4). A leader confirms its leadership with a quorum heartbeat round
//! that began after the request arrived, and serves no read index before an entry of its own
//! term is committed. Requests are batched: one round serves every read that was waiting.
//!
//! `ready` must not be called again before `advance` of the previous Ready. Inputs (`step`,
//! `tick`, `propose`, `read_index`) may be fed between `ready` and `advance`; their effects
//! appear in the next Ready. If the driver crashes before finishing step 2, none of the
//! Ready's messages went out except early appends, which are safe to lose.
//!
//! # Driving a core
//!
//! The driver owns one [`Raft`] per node, over a [`Storage`] implementation it also writes.
//! Each event-loop cycle: feed peer messages with [`Raft::step`], elapsed ticks with
//! [`Raft::tick`], client writes with [`Raft::propose`] (a `NotLeader` error carries the
//! leader hint for the client), linearizable reads and keepalive batches with
//! [`Raft::read_index`] (the returned [`ReadState`] proves a quorum confirmed this leader
//! after the request arrived: DESIGN §3a.4 and §3a.6); then handle one Ready as above, in
//! one write transaction with one fsync (group commit). Log compaction is the driver's
//! decision: snapshot the state machine at its applied index and discard entries some margin
//! below it ([`MemStorage::create_snapshot`] and [`MemStorage::compact`] show the storage
//! side). A restart rebuilds the core with [`Raft::new`] from storage, with
//! [`RaftConfig::applied`] set to the state machine's applied index.
//!
//! Messages from the network are untrusted: malformed or misaddressed ones are dropped with a
//! log line, never a panic.
#![deny(clippy::disallowed_types)]

mod config;
mod core;
mod entry;
mod follower;
mod log;
mod membership;
mod message;
mod progress;
mod read_only;
mod ready;
mod replication;
mod storage;
mod transfer;

#[cfg(test)]
mod tests;

pub use config::{ConfigError, RaftConfig};
pub use core::{NewRaftError, ProposeError, Raft, ReadIndexError, ReadState, Role};
pub use entry::{Entry, EntryKind};
pub use log::RaftLog;
pub use membership::{ConfChange, ConfChangeError, Configuration, MemberInfo};
pub use message::{
    entry_size, AppendResult, HardState, Message, MessageKind, Snapshot, SnapshotMeta,
};
pub use progress::{Inflights, Progress, ProgressState, ProgressTracker, VoteResult};
pub use ready::{Ready, SoftState};
pub use storage::{MemStorage, Storage, StorageError};
pub use transfer::TransferError;
