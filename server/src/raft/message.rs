//! Messages between consensus cores, and the small records they carry (hard state,
//! configuration, snapshot metadata). Pure data with bincode derives, so the transport can
//! frame them with `lockd_protocol::codec`. Messages come from the network and are untrusted:
//! the core validates them and drops bad ones; nothing here panics on content.

use bincode::{Decode, Encode};

use super::membership::Configuration;
use super::Entry;

/// What must be durable before messages of a Ready leave the node (§3a.1).
#[derive(Encode, Decode, Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct HardState {
    /// Current term; never decreases.
    pub term: u64,
    /// Candidate voted for in `term`, 0 for none. At most one per term.
    pub vote: u64,
    /// Highest index known committed. Persisting it lets a restart re-apply without waiting
    /// for a leader; it never decreases.
    pub commit: u64,
}

/// Identifies a snapshot: the state machine as of `index`, whose entry had `term`, with the
/// configuration in force at that index.
#[derive(Encode, Decode, Clone, Debug, Default, PartialEq, Eq)]
pub struct SnapshotMeta {
    /// Last index the snapshot covers; 0 means "no snapshot".
    pub index: u64,
    /// Term of the entry at `index`.
    pub term: u64,
    /// Membership as of `index`.
    pub conf: Configuration,
    /// Entry time of the entry at `index`, so entry time stays monotonic after compaction.
    pub time_ms: u64,
}

/// A complete snapshot handed to the driver to install.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Snapshot {
    /// What the snapshot covers.
    pub meta: SnapshotMeta,
    /// The state machine's serialised state, as produced by the leader's driver.
    pub data: Vec<u8>,
}

/// One message between two cores.
#[derive(Encode, Decode, Clone, Debug, PartialEq, Eq)]
pub struct Message {
    /// Sender id.
    pub from: u64,
    /// Receiver id.
    pub to: u64,
    /// The sender's term (for PreVote: the term it would campaign in; for a granted
    /// PreVoteResp: the term of the request).
    pub term: u64,
    /// What the message says.
    pub kind: MessageKind,
}

/// How an AppendEntries request was answered.
#[derive(Encode, Decode, Clone, Copy, Debug, PartialEq, Eq)]
pub enum AppendResult {
    /// The follower's log matches the leader's up to and including this index, durably.
    Match(u64),
    /// The entry at `rejected` (the request's prev index) did not match. `hint_index` and
    /// `hint_term` let the leader skip a whole term at once (§3.5 fast backtracking): the
    /// follower's last index ≤ `rejected` whose term ≤ the request's prev term, and its term.
    Reject {
        /// The prev index of the rejected request.
        rejected: u64,
        /// Where the follower suggests probing next.
        hint_index: u64,
        /// The follower's term at `hint_index` (0 if unknown).
        hint_term: u64,
    },
    /// The follower has no configuration (a new member that has not yet received a
    /// snapshot): it takes no entries until a snapshot gives it one. Sent at once, without
    /// anything durable to claim.
    NeedSnapshot,
}

/// The kinds of messages.
#[derive(Encode, Decode, Clone, Debug, PartialEq, Eq)]
pub enum MessageKind {
    /// Would you vote for me in `term` (§9.6)? Changes no state on the receiver.
    PreVote {
        /// Candidate's last log index.
        last_index: u64,
        /// Candidate's last log term.
        last_term: u64,
    },
    /// Answer to a PreVote.
    PreVoteResp {
        /// Whether the pre-vote was refused.
        reject: bool,
    },
    /// RequestVote (§3.4).
    Vote {
        /// Candidate's last log index.
        last_index: u64,
        /// Candidate's last log term.
        last_term: u64,
        /// Campaign started by a leader transfer (TimeoutNow): bypasses leader stickiness.
        transfer: bool,
    },
    /// Answer to a Vote; sent only once the vote is durable.
    VoteResp {
        /// Whether the vote was refused.
        reject: bool,
    },
    /// AppendEntries (§3.5).
    Append {
        /// Index of the entry before `entries`.
        prev_index: u64,
        /// Term of the entry at `prev_index`.
        prev_term: u64,
        /// Entries at `prev_index + 1 ..`, consecutive.
        entries: Vec<Entry>,
        /// Leader's commit index.
        commit: u64,
    },
    /// Answer to an Append or a completed snapshot; sent only once durable.
    AppendResp {
        /// Match or rejection.
        result: AppendResult,
    },
    /// Leader heartbeat; carries the current ReadIndex round (0 when none).
    Heartbeat {
        /// Commit index, capped at what the follower is known to hold.
        commit: u64,
        /// ReadIndex round id this heartbeat confirms leadership for.
        read_ctx: u64,
    },
    /// Answer to a heartbeat, echoing its round id.
    HeartbeatResp {
        /// The round id of the heartbeat.
        read_ctx: u64,
    },
    /// One chunk of a snapshot (InstallSnapshot, §5.3), sent one at a time.
    InstallSnapshot {
        /// The snapshot being sent.
        meta: SnapshotMeta,
        /// Byte offset of `data` in the snapshot.
        offset: u64,
        /// The chunk.
        data: Vec<u8>,
        /// Whether this is the final chunk.
        last: bool,
    },
    /// Acknowledges or refuses a non-final snapshot chunk (the final one is answered with an
    /// AppendResp once installed).
    SnapshotResp {
        /// Index of the snapshot the chunk belonged to.
        index: u64,
        /// The offset the follower expects next.
        next_offset: u64,
        /// Whether the chunk was refused (wrong offset or unknown snapshot).
        reject: bool,
    },
    /// Start an election now, bypassing pre-vote and stickiness (leader transfer, §3.10).
    TimeoutNow,
    /// A follower asks the leader for a read index on behalf of its client (§6.4).
    ReadIndex {
        /// Caller's request context, echoed back.
        ctx: u64,
    },
    /// The leader's answer to a forwarded ReadIndex.
    ReadIndexResp {
        /// The request context.
        ctx: u64,
        /// Read index: serve the read once applied ≥ this.
        index: u64,
    },
}

impl MessageKind {
    /// Short name for logs.
    pub fn name(&self) -> &'static str {
        match self {
            MessageKind::PreVote { .. } => "PreVote",
            MessageKind::PreVoteResp { .. } => "PreVoteResp",
            MessageKind::Vote { .. } => "Vote",
            MessageKind::VoteResp { .. } => "VoteResp",
            MessageKind::Append { .. } => "Append",
            MessageKind::AppendResp { .. } => "AppendResp",
            MessageKind::Heartbeat { .. } => "Heartbeat",
            MessageKind::HeartbeatResp { .. } => "HeartbeatResp",
            MessageKind::InstallSnapshot { .. } => "InstallSnapshot",
            MessageKind::SnapshotResp { .. } => "SnapshotResp",
            MessageKind::TimeoutNow => "TimeoutNow",
            MessageKind::ReadIndex { .. } => "ReadIndex",
            MessageKind::ReadIndexResp { .. } => "ReadIndexResp",
        }
    }
}

/// Encoded size of an entry in bytes (standard bincode config, as on the wire).
pub fn entry_size(entry: &Entry) -> u64 {
    let mut w = bincode::enc::write::SizeWriter::default();
    match bincode::encode_into_writer(entry, &mut w, bincode::config::standard()) {
        Ok(()) => w.bytes_written as u64,
        Err(_) => u64::MAX,
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::raft::{ConfChange, EntryKind};
    use lockd_protocol::codec::{from_bytes, to_bytes};

    #[test]
    fn messages_round_trip_through_the_wire_codec() {
        let entry = Entry {
            index: 3,
            term: 2,
            proposer_term: 2,
            time_ms: 9,
            kind: EntryKind::Noop,
        };
        let conf_entry = Entry {
            index: 4,
            kind: EntryKind::Config(ConfChange::AddLearner {
                id: 4,
                peer_addr: "10.0.0.4:7101".into(),
                client_addr: "10.0.0.4:7001".into(),
            }),
            ..entry.clone()
        };
        let mut conf = Configuration::with_voters([1, 2, 3]);
        conf.apply(&ConfChange::AddLearner {
            id: 4,
            peer_addr: "p".into(),
            client_addr: "c".into(),
        });
        let kinds = vec![
            MessageKind::PreVote {
                last_index: 1,
                last_term: 1,
            },
            MessageKind::Vote {
                last_index: 1,
                last_term: 1,
                transfer: true,
            },
            MessageKind::Append {
                prev_index: 2,
                prev_term: 2,
                entries: vec![entry.clone(), conf_entry],
                commit: 2,
            },
            MessageKind::AppendResp {
                result: AppendResult::Reject {
                    rejected: 5,
                    hint_index: 3,
                    hint_term: 2,
                },
            },
            MessageKind::Heartbeat {
                commit: 1,
                read_ctx: 4,
            },
            MessageKind::InstallSnapshot {
                meta: SnapshotMeta {
                    index: 7,
                    term: 2,
                    conf,
                    time_ms: 5,
                },
                offset: 0,
                data: vec![1, 2, 3],
                last: false,
            },
            MessageKind::SnapshotResp {
                index: 7,
                next_offset: 3,
                reject: false,
            },
            MessageKind::TimeoutNow,
            MessageKind::AppendResp {
                result: AppendResult::NeedSnapshot,
            },
            MessageKind::ReadIndexResp { ctx: 1, index: 2 },
        ];
        for kind in kinds {
            let m = Message {
                from: 1,
                to: 2,
                term: 3,
                kind,
            };
            let bytes = to_bytes(&m).unwrap();
            assert_eq!(from_bytes::<Message>(&bytes).unwrap(), m);
            assert!(
                from_bytes::<Message>(&bytes[..bytes.len() - 1]).is_err(),
                "truncated"
            );
        }
        assert_eq!(
            entry_size(&entry),
            bincode::encode_to_vec(&entry, bincode::config::standard())
                .unwrap()
                .len() as u64
        );
    }
}
