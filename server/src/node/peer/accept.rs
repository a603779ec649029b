//! The accepting side of the peer transport: the accept loop, the acceptor's half of the
//! handshake (which learns the dialer's client address), and the reader that checks every
//! frame against the handshake and hands Raft and side messages to `inbound`. It never writes
//! after `HelloOk` except to refuse, it never delivers a Raft message that is not addressed
//! to this node by the handshaken peer, and it attributes every side message to that peer.

use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::time::Duration;

use futures_util::StreamExt;
use tokio::net::tcp::OwnedWriteHalf;
use tokio::net::{TcpListener, TcpStream};
use tokio_util::codec::FramedRead;
use tokio_util::sync::CancellationToken;

use super::{
    bump, check_identity, lock, read_frame, spawn_cancellable, Inbound, PeerError, PeerFrame,
    PeerMessage, PeerReader, RefuseReason, Shared, SideMessage, PEER_PROTOCOL_VERSION,
};

pub(super) async fn accept_loop(shared: Arc<Shared>, listener: TcpListener) {
    let mut backoff_ms = 1;
    loop {
        match listener.accept().await {
            Ok((stream, remote)) => {
                backoff_ms = 1;
                let _ = stream.set_nodelay(true);
                let span = tracing::info_span!(
                    "peer_conn",
                    dir = "in",
                    %remote,
                    peer = tracing::field::Empty
                );
                let cancel = shared.cancel.child_token();
                let task = serve_inbound(shared.clone(), stream, cancel.clone());
                spawn_cancellable(&shared, cancel, task, span);
            }
            Err(e) => {
                // Out of file descriptors and the like: back off instead of spinning.
                tracing::warn!(error = %e, "peer accept failed");
                tokio::time::sleep(Duration::from_millis(backoff_ms)).await;
                backoff_ms = (backoff_ms * 2).min(1_000);
            }
        }
    }
}

/// Handshakes an accepted connection and forwards what it carries to `inbound`.
async fn serve_inbound(shared: Arc<Shared>, stream: TcpStream, cancel: CancellationToken) {
    let (read, mut write) = stream.into_split();
    let mut reader = FramedRead::new(read, shared.codec());
    let hello = match read_frame(&shared, &mut reader).await {
        Ok(frame) => frame,
        Err(e) => {
            if matches!(e, PeerError::Frame(_)) {
                bump(&shared.counters.malformed_connections, 1);
            }
            tracing::debug!(error = %e, "peer handshake failed");
            return;
        }
    };
    let peer = hello.from;
    if let Some(reason) = check_hello(&shared, &hello) {
        shared.refuse(&mut write, Some(peer), reason).await;
        return;
    }
    tracing::Span::current().record("peer", peer);
    let ok = PeerMessage::HelloOk {
        protocol_version: PEER_PROTOCOL_VERSION,
        client_addr: shared.client_addr.clone(),
    };
    if let Err(e) = shared.write_frame(&mut write, ok).await {
        tracing::debug!(error = %e, "peer handshake failed");
        return;
    }
    bump(&shared.counters.handshakes_accepted, 1);
    if let PeerMessage::Hello { client_addr, .. } = &hello.body {
        shared.learn_client_addr(peer, client_addr, hello.incarnation);
    }
    // A newer connection from the same peer replaces the old one (its dialer restarted).
    let conn = shared.next_conn.fetch_add(1, Ordering::Relaxed);
    if let Some((_, old)) = lock(&shared.accepted).insert(peer, (conn, cancel)) {
        old.cancel();
    }
    tracing::debug!("peer accepted");
    let result = receive(&shared, &hello, &mut reader, &mut write).await;
    {
        let mut accepted = lock(&shared.accepted);
        if accepted.get(&peer).is_some_and(|(c, _)| *c == conn) {
            accepted.remove(&peer);
        }
    }
    match result {
        Ok(()) | Err(PeerError::Closed) => tracing::debug!("peer connection closed"),
        Err(PeerError::Refused(reason)) => shared.refuse(&mut write, Some(peer), reason).await,
        Err(PeerError::RefusedByPeer(reason)) => shared.record_refusal(Some(peer), false, reason),
        Err(e) => {
            if matches!(e, PeerError::Frame(_)) {
                bump(&shared.counters.malformed_connections, 1);
            }
            tracing::info!(error = %e, "peer connection failed");
        }
    }
}

/// Why an acceptable-looking `Hello` must be refused, if it must.
fn check_hello(shared: &Shared, hello: &PeerFrame) -> Option<RefuseReason> {
    let PeerMessage::Hello {
        protocol_version,
        to,
        ref client_addr,
    } = hello.body
    else {
        return Some(RefuseReason::ExpectedHello {
            got: hello.body.name().to_string(),
        });
    };
    if protocol_version != PEER_PROTOCOL_VERSION {
        return Some(RefuseReason::ProtocolVersion {
            ours: PEER_PROTOCOL_VERSION,
            theirs: protocol_version,
        });
    }
    if hello.cluster_id != shared.cluster_id {
        return Some(RefuseReason::WrongCluster {
            expected: shared.cluster_id,
            got: hello.cluster_id,
        });
    }
    if to != shared.id {
        return Some(RefuseReason::WrongTarget { to, me: shared.id });
    }
    let expected = {
        let peers = lock(&shared.peers);
        match peers.get(&hello.from) {
            Some(slot) => lock(&slot.info).incarnation,
            None => return Some(RefuseReason::UnknownNode { id: hello.from }),
        }
    };
    check_identity(
        shared,
        hello,
        expected,
        hello.from,
        protocol_version,
        client_addr,
    )
}

/// Reads frames after the handshake until the peer closes or breaks a rule.
async fn receive(
    shared: &Shared,
    hello: &PeerFrame,
    reader: &mut PeerReader,
    write: &mut OwnedWriteHalf,
) -> Result<(), PeerError> {
    let _ = write; // The acceptor writes only to refuse (in the caller).
    while let Some(frame) = reader.next().await {
        let frame = frame?;
        if (frame.cluster_id, frame.from, frame.incarnation)
            != (hello.cluster_id, hello.from, hello.incarnation)
        {
            return Err(PeerError::Refused(RefuseReason::IdentityChanged {
                cluster_id: frame.cluster_id,
                from: frame.from,
                incarnation: frame.incarnation,
            }));
        }
        let message = match frame.body {
            PeerMessage::Batch(messages) => {
                bump(&shared.counters.batch_frames_received, 1);
                for message in messages {
                    if message.to != shared.id || message.from != hello.from {
                        bump(&shared.counters.dropped_misaddressed, 1);
                        tracing::debug!(
                            from = message.from,
                            to = message.to,
                            "misaddressed message dropped"
                        );
                        continue;
                    }
                    if shared.inbound.send(Inbound::Raft(message)).await.is_err() {
                        return Ok(()); // Nobody listens any more.
                    }
                    bump(&shared.counters.messages_delivered, 1);
                }
                continue;
            }
            PeerMessage::KeepAliveBatch { id, sessions } => SideMessage::KeepAlive { id, sessions },
            PeerMessage::KeepAliveBatchAck { id, results } => {
                SideMessage::KeepAliveAck { id, results }
            }
            PeerMessage::Refused { reason } => return Err(PeerError::RefusedByPeer(reason)),
            other @ (PeerMessage::Hello { .. } | PeerMessage::HelloOk { .. }) => {
                return Err(PeerError::Refused(RefuseReason::Unexpected {
                    got: other.name().to_string(),
                }));
            }
        };
        let side = Inbound::Side {
            from: hello.from,
            message,
        };
        if shared.inbound.send(side).await.is_err() {
            return Ok(()); // Nobody listens any more.
        }
        bump(&shared.counters.side_messages_delivered, 1);
    }
    Err(PeerError::Closed)
}
