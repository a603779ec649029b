//! The dialing side of the peer transport: one writer task per peer, which connects with
//! backoff, handshakes as the dialer, and drains the peer's queue onto the connection in
//! queue order. Consecutive Raft messages travel batched in `Batch` frames cut by the byte
//! budget ([`split_sized`]); each side message is a frame of its own between them. The writer
//! reads only to learn why the acceptor closed; anything else it reads ends the connection.

use std::sync::atomic::Ordering;
use std::sync::Arc;

use bytes::BytesMut;
use futures_util::StreamExt;
use lockd_protocol::codec::{encode_frame, MAX_FRAME_LIMIT};
use tokio::net::tcp::OwnedWriteHalf;
use tokio::net::TcpStream;
use tokio_util::codec::FramedRead;
use tracing::Instrument;

use super::wire::split_sized;
use super::{
    bump, check_identity, lock, read_frame, PeerError, PeerFrame, PeerInfo, PeerMessage,
    PeerReader, PeerSlot, RefuseReason, Shared, BATCH_FRAME_OVERHEAD, PEER_PROTOCOL_VERSION,
};
use crate::raft::Message;

/// Encoded frames are written once this many bytes have accumulated.
const WRITE_CHUNK: usize = 1024 * 1024;

/// One queued message for a peer.
#[derive(Debug)]
pub(super) enum Outgoing {
    /// A Raft message.
    Raft(Message),
    /// A side message, already in its wire form (`KeepAliveBatch` or `KeepAliveBatchAck`).
    Side(PeerMessage),
}

/// The frame bodies for `queued` messages (with their encoded sizes), in queue order: each
/// run of consecutive Raft messages split into `Batch`es within `max_frame`, each side
/// message a body of its own. A message too large for a frame on its own (or that cannot be
/// encoded, size `usize::MAX`) is left out; the second value counts those.
pub(super) fn frame_bodies(
    queued: impl IntoIterator<Item = (usize, Outgoing)>,
    max_frame: usize,
) -> (Vec<PeerMessage>, u64) {
    let budget = max_frame
        .min(MAX_FRAME_LIMIT)
        .saturating_sub(BATCH_FRAME_OVERHEAD);
    let mut bodies = Vec::new();
    let mut oversized = 0u64;
    let mut run: Vec<(usize, Message)> = Vec::new();
    for (size, outgoing) in queued {
        match outgoing {
            Outgoing::Raft(message) => run.push((size, message)),
            Outgoing::Side(body) => {
                oversized += flush_run(&mut run, &mut bodies, max_frame);
                if size > budget {
                    oversized += 1;
                } else {
                    bodies.push(body);
                }
            }
        }
    }
    oversized += flush_run(&mut run, &mut bodies, max_frame);
    (bodies, oversized)
}

/// Appends the batches of a Raft run to `bodies`, emptying it; returns how many of its
/// messages were left out for being too large.
fn flush_run(
    run: &mut Vec<(usize, Message)>,
    bodies: &mut Vec<PeerMessage>,
    max_frame: usize,
) -> u64 {
    if run.is_empty() {
        return 0;
    }
    let (batches, left_out) = split_sized(run.drain(..), max_frame);
    bodies.extend(batches.into_iter().map(PeerMessage::Batch));
    left_out.len() as u64
}

/// Keeps a connection to the slot's peer and drains its queue onto it, redialing with
/// backoff, until the slot is cancelled.
pub(super) async fn run_writer(shared: Arc<Shared>, slot: Arc<PeerSlot>) {
    let mut attempt = 0u32;
    loop {
        let generation = slot.generation.load(Ordering::Acquire);
        let info = *lock(&slot.info);
        let span = tracing::info_span!("peer_conn", dir = "out", peer = slot.id, addr = %info.addr);
        let outcome = async {
            let (reader, write) = dial(&shared, slot.id, info).await?;
            tracing::debug!("connected");
            bump(&shared.counters.handshakes_dialed, 1);
            attempt = 0;
            stream_to_peer(&shared, &slot, generation, reader, write).await
        }
        .instrument(span.clone())
        .await;
        match outcome {
            Ok(()) => {}
            Err(PeerError::RefusedByPeer(reason)) => {
                shared.record_refusal(Some(slot.id), false, reason)
            }
            Err(PeerError::Refused(reason)) => shared.record_refusal(Some(slot.id), true, reason),
            Err(e) => {
                span.in_scope(|| tracing::debug!(error = %e, attempt, "peer connection ended"))
            }
        }
        if slot.generation.load(Ordering::Acquire) != generation {
            continue; // New address: dial it now.
        }
        let delay = shared.backoff.delay(attempt);
        attempt = attempt.saturating_add(1);
        tokio::select! {
            _ = tokio::time::sleep(delay) => {}
            _ = address_changed(&slot, generation) => {}
        }
    }
}

/// Resolves once the slot's address changes. Consumes wake-ups meant for queued messages,
/// which is harmless: the queue is drained as soon as a connection is up.
async fn address_changed(slot: &PeerSlot, generation: u64) {
    while slot.generation.load(Ordering::Acquire) == generation {
        slot.wake.notified().await;
    }
}

/// Connects to `peer` and completes the handshake as the dialer; learns the peer's client
/// address from its `HelloOk`.
async fn dial(
    shared: &Shared,
    peer: u64,
    info: PeerInfo,
) -> Result<(PeerReader, OwnedWriteHalf), PeerError> {
    let stream = tokio::time::timeout(shared.io_timeout, TcpStream::connect(info.addr))
        .await
        .map_err(|_| PeerError::Timeout)??;
    let _ = stream.set_nodelay(true);
    let (read, mut write) = stream.into_split();
    let mut reader = FramedRead::new(read, shared.codec());
    let hello = PeerMessage::Hello {
        protocol_version: PEER_PROTOCOL_VERSION,
        to: peer,
        client_addr: shared.client_addr.clone(),
    };
    shared.write_frame(&mut write, hello).await?;
    let answer = read_frame(shared, &mut reader).await?;
    let reason = match &answer.body {
        PeerMessage::Refused { reason } => return Err(PeerError::RefusedByPeer(reason.clone())),
        PeerMessage::HelloOk {
            protocol_version,
            client_addr,
        } => {
            let expected = info.incarnation;
            match check_identity(
                shared,
                &answer,
                expected,
                peer,
                *protocol_version,
                client_addr,
            ) {
                Some(reason) => reason,
                None => {
                    shared.learn_client_addr(peer, client_addr, answer.incarnation);
                    return Ok((reader, write));
                }
            }
        }
        other => RefuseReason::Unexpected {
            got: other.name().to_string(),
        },
    };
    let refusal = PeerMessage::Refused {
        reason: reason.clone(),
    };
    let _ = shared.write_frame(&mut write, refusal).await;
    Err(PeerError::Refused(reason))
}

/// Sends queued messages until the connection fails, the address changes or the peer
/// closes. The acceptor never writes after its `HelloOk` except to refuse, so anything read
/// ends the connection.
async fn stream_to_peer(
    shared: &Shared,
    slot: &PeerSlot,
    generation: u64,
    mut reader: PeerReader,
    mut write: OwnedWriteHalf,
) -> Result<(), PeerError> {
    let mut buf = BytesMut::new();
    loop {
        if slot.generation.load(Ordering::Acquire) != generation {
            // Keep the queue for the new address rather than write it to the old one.
            tracing::info!("peer address changed; reconnecting");
            return Ok(());
        }
        let queued = lock(&slot.queue).take();
        if !queued.is_empty() {
            let (bodies, oversized) = frame_bodies(queued, shared.max_frame);
            if oversized > 0 {
                bump(&shared.counters.dropped_oversized, oversized);
                tracing::warn!(
                    count = oversized,
                    max_frame = shared.max_frame,
                    "messages larger than a peer frame dropped"
                );
            }
            let (mut batches, mut messages, mut sides) = (0u64, 0u64, 0u64);
            buf.clear();
            for body in bodies {
                match &body {
                    PeerMessage::Batch(batch) => {
                        batches += 1;
                        messages += batch.len() as u64;
                    }
                    _ => sides += 1,
                }
                encode_frame(&shared.frame(body), shared.max_frame, &mut buf)?;
                // Write every MiB or so rather than encode a whole large queue at once.
                if buf.len() >= WRITE_CHUNK {
                    shared.write_all(&mut write, &buf).await?;
                    buf.clear();
                }
            }
            shared.write_all(&mut write, &buf).await?;
            bump(&shared.counters.batch_frames_sent, batches);
            bump(&shared.counters.messages_sent, messages);
            bump(&shared.counters.side_messages_sent, sides);
            // Do not keep a large buffer around for a connection that is mostly idle.
            if buf.capacity() > 2 * WRITE_CHUNK {
                buf = BytesMut::new();
            }
            continue;
        }
        tokio::select! {
            _ = slot.wake.notified() => {}
            frame = reader.next() => {
                return match frame {
                    None => Err(PeerError::Closed),
                    Some(Err(e)) => Err(e.into()),
                    Some(Ok(PeerFrame { body: PeerMessage::Refused { reason }, .. })) => {
                        Err(PeerError::RefusedByPeer(reason))
                    }
                    Some(Ok(frame)) => Err(PeerError::Refused(RefuseReason::Unexpected {
                        got: frame.body.name().to_string(),
                    })),
                };
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::raft::MessageKind;
    use lockd_protocol::SessionId;

    fn raft(n: u64, len: usize) -> (usize, Outgoing) {
        let message = Message {
            from: 1,
            to: 2,
            term: n,
            kind: MessageKind::InstallSnapshot {
                meta: Default::default(),
                offset: n,
                data: vec![0; len],
                last: false,
            },
        };
        let size = super::super::message_size(&message).unwrap();
        (size, Outgoing::Raft(message))
    }

    fn side(id: u64, sessions: u64) -> (usize, Outgoing) {
        let body = PeerMessage::KeepAliveBatch {
            id,
            sessions: (0..sessions).map(SessionId).collect(),
        };
        let size = super::super::wire::encoded_size(&body).unwrap();
        (size, Outgoing::Side(body))
    }

    fn shape(bodies: &[PeerMessage]) -> Vec<String> {
        bodies
            .iter()
            .map(|b| match b {
                PeerMessage::Batch(batch) => {
                    let terms: Vec<String> = batch.iter().map(|m| m.term.to_string()).collect();
                    format!("B[{}]", terms.join(","))
                }
                PeerMessage::KeepAliveBatch { id, .. } => format!("K{id}"),
                other => other.name().to_string(),
            })
            .collect()
    }

    #[test]
    fn side_messages_cut_raft_runs_and_keep_their_place() {
        let queued = vec![
            raft(0, 10),
            raft(1, 10),
            side(7, 3),
            side(8, 3),
            raft(2, 10),
        ];
        let (bodies, oversized) = frame_bodies(queued, 4096);
        assert_eq!(oversized, 0);
        assert_eq!(shape(&bodies), ["B[0,1]", "K7", "K8", "B[2]"]);
    }

    #[test]
    fn oversized_messages_of_either_kind_are_left_out() {
        let queued = vec![
            raft(0, 1500),
            raft(1, 1500),
            raft(2, 1500),
            raft(3, 5000),
            side(7, 2000),
            side(8, 1),
            raft(4, 10),
        ];
        let (bodies, oversized) = frame_bodies(queued, 4096);
        assert_eq!(oversized, 2);
        assert_eq!(shape(&bodies), ["B[0,1]", "B[2]", "K8", "B[4]"]);
    }
}
