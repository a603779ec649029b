//! The peer wire format: what two lockd nodes say to each other on the peer port.
//!
//! Framing is the client framing (`lockd_protocol::codec`: `u32` big-endian length, then one
//! bincode 2 payload), with its own message type: every frame is one [`PeerFrame`], an
//! envelope that names the sender's cluster id, node id and incarnation, around a
//! [`PeerMessage`]. The identity travels on every frame so the receiver checks it on every
//! frame, not only at the handshake (DESIGN §3a.9).
//!
//! This module is pure data plus the byte-budget splitter for batches; it does no IO and must
//! not trust anything it decodes (the transport validates every field).

use bincode::enc::write::SizeWriter;
use bincode::{Decode, Encode};
use lockd_protocol::codec::{wire_config, MAX_FRAME_LIMIT};
use lockd_protocol::{KeepAliveResult, SessionId};

use crate::raft::Message;

/// Version of the peer protocol; a dialer with another version is refused.
pub const PEER_PROTOCOL_VERSION: u32 = 2;

/// Longest client address a handshake may carry, in bytes (a DNS name of 253 bytes and a
/// port fit with room to spare); a longer one is refused.
pub const MAX_CLIENT_ADDR_LEN: usize = 512;

/// Bytes the peer frame limit adds on top of the client frame limit (§3a.14): room for the
/// envelope and the AppendEntries header around the largest entry a client may propose.
pub const PEER_FRAME_HEADROOM: usize = 64 * 1024;

/// Upper bound on the encoded size of a [`PeerFrame`] around a batch, excluding the
/// messages themselves: three u64 varints (≤ 9 bytes each), the variant tag and the vector
/// length, with margin. It also bounds the envelope around any other message.
pub const BATCH_FRAME_OVERHEAD: usize = 64;

/// The peer frame limit for a given client frame limit: client limit + headroom, clamped to
/// the codec's hard ceiling.
pub fn peer_frame_limit(client_max_frame: usize) -> usize {
    client_max_frame
        .saturating_add(PEER_FRAME_HEADROOM)
        .min(MAX_FRAME_LIMIT)
}

/// One frame on the peer port: the sender's identity around a message.
#[derive(Encode, Decode, Clone, Debug, PartialEq, Eq)]
pub struct PeerFrame {
    /// The cluster the sender belongs to.
    pub cluster_id: u64,
    /// The sender's node id.
    pub from: u64,
    /// The sender's data directory incarnation.
    pub incarnation: u64,
    /// What the frame says.
    pub body: PeerMessage,
}

/// What a peer frame says.
#[derive(Encode, Decode, Clone, Debug, PartialEq, Eq)]
pub enum PeerMessage {
    /// First frame of a connection, from the dialer. The dialer's cluster id, node id and
    /// incarnation are in the envelope.
    Hello {
        /// The dialer's [`PEER_PROTOCOL_VERSION`].
        protocol_version: u32,
        /// The node id the dialer believes it is talking to (catches misconfigured
        /// addresses).
        to: u64,
        /// The dialer's client address (empty if not configured), at most
        /// [`MAX_CLIENT_ADDR_LEN`] bytes.
        client_addr: String,
    },
    /// The acceptor's answer to an acceptable `Hello`; its identity is in the envelope.
    HelloOk {
        /// The acceptor's [`PEER_PROTOCOL_VERSION`].
        protocol_version: u32,
        /// The acceptor's client address (empty if not configured), at most
        /// [`MAX_CLIENT_ADDR_LEN`] bytes.
        client_addr: String,
    },
    /// The connection is refused or closed, and why. The sender closes right after it.
    Refused {
        /// Why.
        reason: RefuseReason,
    },
    /// Raft messages, in the order the sender queued them.
    Batch(Vec<Message>),
    /// Keepalives a follower gathered in one tick, forwarded to the leader (§3a.4).
    KeepAliveBatch {
        /// Batch id chosen by the follower, echoed by the ack.
        id: u64,
        /// Sessions to renew.
        sessions: Vec<SessionId>,
    },
    /// The leader's answer to a `KeepAliveBatch`, one result per session in order, sent only
    /// after a quorum heartbeat round that began after the batch arrived.
    KeepAliveBatchAck {
        /// The batch's id.
        id: u64,
        /// One result per session of the batch.
        results: Vec<(SessionId, KeepAliveResult)>,
    },
}

impl PeerMessage {
    /// Short name for logs.
    pub fn name(&self) -> &'static str {
        match self {
            PeerMessage::Hello { .. } => "Hello",
            PeerMessage::HelloOk { .. } => "HelloOk",
            PeerMessage::Refused { .. } => "Refused",
            PeerMessage::Batch(_) => "Batch",
            PeerMessage::KeepAliveBatch { .. } => "KeepAliveBatch",
            PeerMessage::KeepAliveBatchAck { .. } => "KeepAliveBatchAck",
        }
    }
}

/// Why a peer connection was refused or closed.
#[derive(Encode, Decode, Clone, Debug, PartialEq, Eq, thiserror::Error)]
pub enum RefuseReason {
    #[error("peer protocol version {theirs} is not ours ({ours})")]
    ProtocolVersion { ours: u32, theirs: u32 },
    #[error("cluster id {got:#x} is not ours ({expected:#x})")]
    WrongCluster { expected: u64, got: u64 },
    #[error("node {id} is not a known peer")]
    UnknownNode { id: u64 },
    #[error("node {id} has incarnation {got:#x}, expected {expected:#x}")]
    WrongIncarnation { id: u64, expected: u64, got: u64 },
    #[error("the dialer addressed node {to}, but this is node {me}")]
    WrongTarget { to: u64, me: u64 },
    #[error("the first frame was {got}, not Hello")]
    ExpectedHello { got: String },
    #[error("frame from node {from} (incarnation {incarnation:#x}, cluster {cluster_id:#x}) does not match the handshake")]
    IdentityChanged {
        cluster_id: u64,
        from: u64,
        incarnation: u64,
    },
    #[error("unexpected {got} after the handshake")]
    Unexpected { got: String },
    #[error("a newer connection from the same peer replaced this one")]
    Replaced,
    #[error("client address of {len} bytes is longer than {max}")]
    ClientAddrTooLong { len: u64, max: u64 },
}

/// Encoded size of `message` on the wire, or `None` if it cannot be encoded.
pub fn message_size(message: &Message) -> Option<usize> {
    encoded_size(message)
}

/// Encoded size of anything on the wire, or `None` if it cannot be encoded.
pub(super) fn encoded_size(value: &impl Encode) -> Option<usize> {
    let mut size = SizeWriter::default();
    bincode::encode_into_writer(value, &mut size, wire_config()).ok()?;
    Some(size.bytes_written)
}

/// Splits `messages` into batches whose frames stay within `max_frame` bytes, keeping their
/// order. Every batch holds at least one message; a message that cannot fit a frame on its
/// own (or cannot be encoded) is left out and returned in the second vector, in order.
pub fn split_batches(
    messages: impl IntoIterator<Item = Message>,
    max_frame: usize,
) -> (Vec<Vec<Message>>, Vec<Message>) {
    let sized = messages
        .into_iter()
        .map(|m| (message_size(&m).unwrap_or(usize::MAX), m));
    split_sized(sized, max_frame)
}

/// [`split_batches`] over messages whose encoded sizes are already known (`usize::MAX` for
/// one that cannot be encoded).
pub(super) fn split_sized(
    messages: impl IntoIterator<Item = (usize, Message)>,
    max_frame: usize,
) -> (Vec<Vec<Message>>, Vec<Message>) {
    let budget = max_frame
        .min(MAX_FRAME_LIMIT)
        .saturating_sub(BATCH_FRAME_OVERHEAD);
    let mut batches = Vec::new();
    let mut oversized = Vec::new();
    let mut current = Vec::new();
    let mut used = 0usize;
    for (size, message) in messages {
        if size > budget {
            oversized.push(message);
            continue;
        }
        if !current.is_empty() && used + size > budget {
            batches.push(std::mem::take(&mut current));
            used = 0;
        }
        used += size;
        current.push(message);
    }
    if !current.is_empty() {
        batches.push(current);
    }
    (batches, oversized)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::raft::{MessageKind, SnapshotMeta};
    use bytes::BytesMut;
    use lockd_protocol::codec::{encode_frame, from_bytes, to_bytes};

    fn chunk(from: u64, offset: u64, len: usize) -> Message {
        Message {
            from,
            to: 2,
            term: u64::MAX,
            kind: MessageKind::InstallSnapshot {
                meta: SnapshotMeta::default(),
                offset,
                data: vec![0xab; len],
                last: false,
            },
        }
    }

    #[test]
    fn frames_round_trip() {
        let frames = [
            PeerMessage::Hello {
                protocol_version: PEER_PROTOCOL_VERSION,
                to: 3,
                client_addr: "lockd-3.example:7000".to_string(),
            },
            PeerMessage::HelloOk {
                protocol_version: PEER_PROTOCOL_VERSION,
                client_addr: String::new(),
            },
            PeerMessage::Refused {
                reason: RefuseReason::WrongIncarnation {
                    id: 1,
                    expected: 2,
                    got: 3,
                },
            },
            PeerMessage::Batch(vec![chunk(1, 0, 10), chunk(1, 10, 3)]),
            PeerMessage::KeepAliveBatch {
                id: 9,
                sessions: vec![SessionId(1), SessionId(u64::MAX)],
            },
            PeerMessage::KeepAliveBatchAck {
                id: 9,
                results: vec![
                    (SessionId(1), KeepAliveResult::Ok { ttl_ms: 10_000 }),
                    (SessionId(2), KeepAliveResult::Expired),
                ],
            },
        ];
        for body in frames {
            let frame = PeerFrame {
                cluster_id: u64::MAX,
                from: 1,
                incarnation: u64::MAX - 1,
                body,
            };
            let bytes = to_bytes(&frame).unwrap();
            assert_eq!(from_bytes::<PeerFrame>(&bytes).unwrap(), frame);
        }
    }

    #[test]
    fn batches_split_below_the_frame_limit_in_order() {
        let max_frame = 4096;
        let messages: Vec<Message> = (0..50)
            .map(|i| chunk(u64::MAX, i, 700 + i as usize))
            .collect();
        let (batches, oversized) = split_batches(messages.clone(), max_frame);
        assert!(oversized.is_empty());
        assert!(batches.len() > 1 && batches.iter().all(|b| !b.is_empty()));
        for batch in &batches {
            let frame = PeerFrame {
                cluster_id: u64::MAX,
                from: u64::MAX,
                incarnation: u64::MAX,
                body: PeerMessage::Batch(batch.clone()),
            };
            let mut buf = BytesMut::new();
            encode_frame(&frame, max_frame, &mut buf).expect("batch fits its frame");
        }
        let flat: Vec<Message> = batches.into_iter().flatten().collect();
        assert_eq!(flat, messages);
    }

    #[test]
    fn a_message_larger_than_a_frame_is_set_aside() {
        let (batches, oversized) = split_batches(
            vec![chunk(1, 0, 10), chunk(1, 1, 5000), chunk(1, 2, 10)],
            4096,
        );
        assert_eq!(batches, vec![vec![chunk(1, 0, 10), chunk(1, 2, 10)]]);
        assert_eq!(oversized, vec![chunk(1, 1, 5000)]);
    }
}
