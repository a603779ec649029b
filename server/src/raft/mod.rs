//! Consensus: the log entry format (fixed from the start, DESIGN §3a.12: term, kind,
//! proposer term, entry time) and a pure, deterministic Raft core in the style of
//! etcd-raft's `RawNode`: [`Raft`] takes inputs ([`Raft::tick`], [`Raft::step`],
//! [`Raft::propose`], [`Raft::read_index`], [`Raft::propose_conf_change`],
//! [`Raft::transfer_leader`]) and hands its outputs to a driver as a [`Ready`]. The core does
//! no IO, reads no clock (time is ticks), and draws randomness only from a `ChaCha8Rng`
//! seeded by [`RaftConfig::seed`]. It never iterates a hash map.
//!
//! What it does: elections with pre-vote and check-quorum (§3.4, §9.6, §6.2), replication
//! with flow control and commit by counting only entries of the current term (§3.5-3.6),
//! batched ReadIndex (§6.4), chunked snapshots (§5.3), single-server membership changes
//! with learners (§4.1-4.3, `membership.rs`: in force when appended, rolled back when
//! truncated, one at a time, none before the leader's first commit of its term; a removed
//! leader steps down once its removal commits) and leader transfer (§3.10,
//! `transfer.rs`). What it must not do: IO, clocks, unseeded randomness, hash-map
//! iteration, trusting message content (bad messages are dropped), or letting a learner, a
//! removed node or a node waiting to join campaign.
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
//!    `entries`, hence after step 2; committed entries all below the first of `entries` are
//!    durable since an earlier Ready, so a driver may apply those before steps 2-3, and a
//!    leader does, to answer without waiting for the newer entries' fsync). Client replies and pushed events go out only for applied
//!    entries. A `Config` entry changes nothing in the state machine's namespace; the store
//!    records the configuration as of the applied index with it (same transaction), so
//!    snapshots carry the configuration of their own index.
//! 5. **Call [`Raft::advance`] with the Ready.** The core then marks the entries durable
//!    (the leader counts its own match index from here), the snapshot installed and the
//!    committed entries applied.
//!
//! `conf` is the configuration in force when it changed since the previous Ready (appended,
//! rolled back, or installed with a snapshot). Update the peer transport's addresses from it
//! (each member's [`MemberInfo`]) **before** sending the Ready's messages, so that appends
//! to a new learner find it. A removed member keeps receiving appends until its removal
//! commits (so that it learns of it): keep its address until [`Raft::pending_conf_index`] is
//! `None`, or drop messages to unknown peers (always safe).
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
//! after the request arrived: DESIGN §3a.4 and §3a.6); then handle one Ready as above: its
//! writes with one fsync (group commit), its applying in the same transaction or, as the
//! lockd driver does with several voters, in a second one without fsync. Log compaction is the driver's
//! decision: snapshot the state machine at its applied index and discard entries some margin
//! below it ([`MemStorage::create_snapshot`] and [`MemStorage::compact`] show the storage
//! side). A restart rebuilds the core with [`Raft::new`] from storage, with
//! [`RaftConfig::applied`] set to the state machine's applied index; the configuration is
//! the stored one (as of [`Storage::conf_index`]) plus the `Config` entries of the log after
//! it.
//!
//! Membership: operator requests become [`Raft::propose_conf_change`] (typed refusals in
//! [`ConfChangeError`]); a member's incarnation, learned from its handshake, is recorded with
//! [`ConfChange::Identify`]. A new member starts with an empty configuration (no bootstrap)
//! and takes no entries until a snapshot arrives: the leader must be able to produce one
//! ([`Storage::snapshot_meta`] with index > 0). [`Raft::conf`] is the configuration in force
//! (clients' member list), [`Raft::progress_of`] a member's match index (cluster status,
//! promotion readiness). [`Raft::transfer_leader`] hands leadership over (§3.10).
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
