//! One client connection: handshake, pipelined requests, keepalives, pushed session events.
//!
//! One task per connection. Frames are read in order; reads are answered at once from the
//! applied state, writes and keepalives are handed to the event loop and their answers sent
//! as they complete (possibly out of order; the request id matches them). A framing error
//! closes the connection with a `Goodbye` naming it; every other bad input is a typed error
//! response and the connection goes on. On shutdown, reading stops, in-flight requests are
//! answered, and a `Goodbye { ShuttingDown }` closes the connection.

use std::collections::{BTreeSet, HashSet};
use std::pin::Pin;
use std::time::Duration;

use futures_util::stream::FuturesUnordered;
use futures_util::{FutureExt, SinkExt, StreamExt};
use lockd_protocol::{
    CancelOp, ClientMessage, Error, Fence, FrameCodec, FrameError, HelloOk, MultiOp, ReleaseOp,
    Reply, Request, ServerMessage, SessionId, SessionSeq, WriteOp, PROTOCOL_VERSION,
};
use tokio::net::TcpStream;
use tokio_util::codec::Framed;
use tokio_util::sync::CancellationToken;

use super::watch::{Published, Watches};
use super::Node;
use crate::fsm::Command;
use std::sync::Arc;
use tokio::sync::broadcast;

type Conn = Framed<TcpStream, FrameCodec<ClientMessage, ServerMessage>>;
type Pending = FuturesUnordered<Pin<Box<dyn std::future::Future<Output = Done> + Send>>>;

/// Most operations in one `multi`: the bincode decode budget counts decoded memory, so a
/// response to a much larger multi could not be decoded by clients.
const MAX_MULTI_OPS: usize = 10_000;

/// Initial read buffer of a connection, in bytes.
const INITIAL_BUFFER: usize = 512;

/// How long a new connection may take to say Hello.
const HELLO_TIMEOUT: Duration = Duration::from_secs(10);

/// A completed request.
enum Done {
    /// Nothing to send (a keepalive the loop could not answer: the connection is closing).
    Nothing,
    Reply(ServerMessage),
    /// A write under the implicit session finished: its seq no longer holds the floor.
    ImplicitWrite(u64, ServerMessage),
}

/// The connection's implicit session: session-less writes run under it (DESIGN §3a.7).
struct Implicit {
    session: SessionId,
    next_seq: u64,
    in_flight: BTreeSet<u64>,
}

impl Implicit {
    fn next(&mut self) -> SessionSeq {
        let seq = self.next_seq;
        self.next_seq += 1;
        self.in_flight.insert(seq);
        let floor = self.in_flight.first().copied().unwrap_or(seq);
        SessionSeq {
            session: self.session,
            seq,
            floor,
        }
    }
}

struct Connection {
    conn: Conn,
    node: Node,
    implicit: Option<Implicit>,
    /// Sessions this connection kept alive: it is told when they end.
    watched_sessions: HashSet<SessionId>,
    /// Watch streams opened on this connection.
    watches: Watches,
}

/// The next published commit, or never if the connection has no watch.
async fn next_published(
    rx: Option<&mut broadcast::Receiver<Arc<Published>>>,
) -> Result<Arc<Published>, broadcast::error::RecvError> {
    match rx {
        Some(rx) => rx.recv().await,
        None => std::future::pending().await,
    }
}

/// Serves one connection until the client leaves, a framing error, or `cancel`.
pub async fn serve(stream: TcpStream, node: Node, cancel: CancellationToken) {
    let codec = FrameCodec::new(node.config().max_frame);
    // Start small: most connections are idle most of the time (10,000 watch connections),
    // and the buffers grow for large frames as needed.
    let mut conn = Framed::with_capacity(stream, codec, INITIAL_BUFFER);
    match tokio::time::timeout(HELLO_TIMEOUT, conn.next()).await {
        Ok(Some(Ok(ClientMessage::Hello(hello)))) if hello.protocol_version == PROTOCOL_VERSION => {
            tracing::debug!(client = %hello.client_name, "hello");
            let ok = HelloOk {
                protocol_version: PROTOCOL_VERSION,
                node_id: node.identity().node_id,
                cluster_id: node.identity().cluster_id,
                leader_hint: node.leader_hint(),
                members: node.members(),
            };
            if conn.send(ServerMessage::HelloOk(ok)).await.is_err() {
                return;
            }
        }
        Ok(Some(Ok(ClientMessage::Hello(hello)))) => {
            let reason = Error::UnsupportedVersion {
                client: hello.protocol_version,
                server: PROTOCOL_VERSION,
            };
            return goodbye(&mut conn, reason).await;
        }
        Ok(Some(Ok(_))) => return goodbye(&mut conn, Error::HelloRequired).await,
        Ok(Some(Err(e))) => return goodbye(&mut conn, e.into()).await,
        Ok(None) => return,
        Err(_) => return goodbye(&mut conn, Error::HelloRequired).await,
    }
    let mut this = Connection {
        conn,
        node,
        implicit: None,
        watched_sessions: HashSet::new(),
        watches: Watches::default(),
    };
    let reason = this.serve_requests(cancel).await;
    this.finish(reason).await;
}

/// Answers a connection over the limit with `Goodbye { Unavailable }` and closes it.
pub async fn refuse(stream: TcpStream, max_frame: usize) {
    let mut conn = Framed::new(stream, FrameCodec::new(max_frame));
    let reason = Error::Unavailable("too many connections".into());
    let _ = tokio::time::timeout(Duration::from_secs(1), goodbye(&mut conn, reason)).await;
}

async fn goodbye(conn: &mut Conn, reason: Error) {
    tracing::debug!(%reason, "closing connection");
    let _ = conn.send(ServerMessage::Goodbye { reason }).await;
}

impl Connection {
    /// The request loop. Returns the reason to give the client when closing, if any.
    async fn serve_requests(&mut self, cancel: CancellationToken) -> Option<Error> {
        let mut pending: Pending = FuturesUnordered::new();
        let mut events = self.node.session_events();
        let mut progress =
            tokio::time::interval(Duration::from_millis(self.node.config().watch_progress_ms));
        progress.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        loop {
            tokio::select! {
                biased;
                Some(done) = pending.next(), if !pending.is_empty() => {
                    if self.complete(done, &mut pending).await.is_err() {
                        return None;
                    }
                }
                frame = self.conn.next() => match frame {
                    None => break,
                    Some(Err(FrameError::Io(e))) => {
                        tracing::debug!(error = %e, "connection lost");
                        break;
                    }
                    Some(Err(e)) => {
                        tracing::info!(error = %e, "bad frame; closing");
                        self.drain(&mut pending).await;
                        return Some(e.into());
                    }
                    Some(Ok(message)) => {
                        if let Some(reply) = self.handle(message, &mut pending).await {
                            if self.send_reply(reply).await.is_err() {
                                return None;
                            }
                        }
                        if self.send_watch_frames().await.is_err() {
                            return None;
                        }
                    }
                },
                published = next_published(self.watches.receiver()) => {
                    match published {
                        Ok(published) => self.watches.on_published(&published),
                        Err(broadcast::error::RecvError::Lagged(_)) => self.watches.on_lagged(),
                        Err(broadcast::error::RecvError::Closed) => self.watches.end_all(Error::ShuttingDown),
                    }
                    if self.send_watch_frames().await.is_err() {
                        return None;
                    }
                }
                _ = progress.tick(), if !self.watches.is_empty() => {
                    if self.node.leaderless_too_long() {
                        let reason = Error::Unavailable("this node has had no leader for three election timeouts; resume the watch on another node".into());
                        self.watches.end_all(reason);
                        if self.send_watch_frames().await.is_err() {
                            return None;
                        }
                        continue;
                    }
                    // Everything published up to this index is in the channel already (the
                    // loop publishes before advancing it): if the channel is empty, every
                    // watch has been sent all its events up to it.
                    let revision = self.node.published_index();
                    if self.watches.receiver().is_some_and(|rx| rx.is_empty()) {
                        self.watches.progress(revision);
                        if self.send_watch_frames().await.is_err() {
                            return None;
                        }
                    }
                }
                event = events.recv() => match event {
                    Ok(ended) if self.watched_sessions.remove(&ended.session) => {
                        let push = ServerMessage::SessionEvent {
                            session: ended.session,
                            revision: ended.revision,
                            event: ended.kind,
                        };
                        if self.conn.send(push).await.is_err() {
                            return None;
                        }
                    }
                    Ok(_) | Err(tokio::sync::broadcast::error::RecvError::Lagged(_)) => {}
                    Err(tokio::sync::broadcast::error::RecvError::Closed) => return Some(Error::ShuttingDown),
                },
                _ = cancel.cancelled() => {
                    self.drain(&mut pending).await;
                    self.watches.end_all(Error::ShuttingDown);
                    let _ = self.send_watch_frames().await;
                    return Some(Error::ShuttingDown);
                }
            }
        }
        // The client closed its side: in-flight writes still complete in the event loop.
        self.drain(&mut pending).await;
        None
    }

    /// Answers everything in flight.
    async fn drain(&mut self, pending: &mut Pending) {
        while let Some(done) = pending.next().await {
            let _ = self.complete(done, pending).await;
        }
    }

    /// Sends a completed answer, and any others already complete, with one flush.
    async fn complete(&mut self, done: Done, pending: &mut Pending) -> Result<(), FrameError> {
        let mut next = Some(done);
        while let Some(done) = next {
            let message = match done {
                Done::Nothing => {
                    next = pending.next().now_or_never().flatten();
                    continue;
                }
                Done::Reply(message) => message,
                Done::ImplicitWrite(seq, message) => {
                    if let Some(implicit) = &mut self.implicit {
                        implicit.in_flight.remove(&seq);
                    }
                    message
                }
            };
            self.feed_reply(message).await?;
            next = pending.next().now_or_never().flatten();
        }
        self.conn.flush().await
    }

    /// Sends the queued watch frames.
    async fn send_watch_frames(&mut self) -> Result<(), FrameError> {
        if self.watches.outbox.is_empty() {
            return Ok(());
        }
        for frame in std::mem::take(&mut self.watches.outbox) {
            self.conn.feed(frame).await?;
        }
        self.conn.flush().await
    }

    async fn send_reply(&mut self, message: ServerMessage) -> Result<(), FrameError> {
        self.feed_reply(message).await?;
        self.conn.flush().await
    }

    /// Queues a reply; one too large for a frame becomes a `ResponseTooLarge` error.
    async fn feed_reply(&mut self, message: ServerMessage) -> Result<(), FrameError> {
        let request_id = match &message {
            ServerMessage::Response { request_id, .. } => Some(*request_id),
            _ => None,
        };
        match self.conn.feed(message).await {
            Err(FrameError::TooLarge { len, .. }) if request_id.is_some() => {
                let revision = 0;
                let result = Err(Error::ResponseTooLarge { len });
                let request_id = request_id.unwrap_or_default();
                self.conn
                    .feed(ServerMessage::Response {
                        request_id,
                        revision,
                        result,
                    })
                    .await
            }
            other => other,
        }
    }

    /// Handles one frame: returns an immediate reply, or queues a future in `pending`.
    async fn handle(
        &mut self,
        message: ClientMessage,
        pending: &mut Pending,
    ) -> Option<ServerMessage> {
        let (request_id, request) = match message {
            ClientMessage::Hello(_) => {
                return Some(ServerMessage::Response {
                    request_id: 0,
                    revision: 0,
                    result: Err(Error::InvalidArgument("Hello was already received".into())),
                })
            }
            ClientMessage::KeepAlive {
                request_id,
                sessions,
            } => {
                self.watched_sessions.extend(sessions.iter().copied());
                let node = self.node.clone();
                pending.push(Box::pin(async move {
                    // No reply rather than a wrong one: an empty or `Expired` answer would
                    // misstate sessions that may well be alive.
                    match node.keepalive(sessions).await {
                        Ok(results) => Done::Reply(ServerMessage::KeepAliveReply {
                            request_id,
                            results,
                        }),
                        Err(_) => Done::Nothing,
                    }
                }));
                return None;
            }
            ClientMessage::Request {
                request_id,
                request,
            } => (request_id, request),
        };
        let respond = |revision, result| {
            Some(ServerMessage::Response {
                request_id,
                revision,
                result,
            })
        };
        if self.node.removed() {
            let me = self.node.identity().node_id;
            let gone = Error::Unavailable(format!(
                "node {me} was removed from the cluster; use another member"
            ));
            return respond(self.node.published_index(), Err(gone));
        }
        match request {
            Request::ChangeMembers(change) => {
                let node = self.node.clone();
                let change = async move { node.change_members(change).await };
                self.answer_with_status(request_id, change, pending);
                None
            }
            Request::TransferLeader { to } => {
                let node = self.node.clone();
                let transfer = async move { node.transfer_leader(to).await };
                self.answer_with_status(request_id, transfer, pending);
                None
            }
            Request::Read { consistency, op } => {
                if let Some((revision, result)) = self.node.read_now(&op, consistency) {
                    return respond(revision, result);
                }
                let node = self.node.clone();
                pending.push(Box::pin(async move {
                    let (revision, result) = node.read(&op, consistency).await;
                    Done::Reply(ServerMessage::Response {
                        request_id,
                        revision,
                        result,
                    })
                }));
                None
            }
            Request::ClusterStatus => {
                let status = self.node.status();
                respond(status.commit_index, Ok(Reply::ClusterStatus(status)))
            }
            Request::OpenSession { ttl_ms } => {
                let config = self.node.config();
                let command = Command::OpenSession {
                    ttl_ms: config.clamp_ttl(ttl_ms),
                    tick_ms: config.tick_ms,
                    drift_ppm: config.drift_ppm,
                    implicit: false,
                };
                self.propose(request_id, command, None, pending);
                None
            }
            Request::CloseSession { session } => {
                self.propose(request_id, Command::CloseSession { session }, None, pending);
                None
            }
            Request::Write { session, op } => {
                self.write(request_id, session, op, None, pending).await
            }
            Request::FencedWrite { session, op, fence } => {
                self.write(request_id, session, op, Some(fence), pending)
                    .await
            }
            Request::Watch(watch) => {
                let (revision, result) = self.watches.create(&self.node, watch);
                respond(revision, result)
            }
            Request::CancelWatch { watch_id } => {
                let result = self.watches.cancel(watch_id);
                respond(self.node.published_index(), result)
            }
        }
    }

    /// Queues `operation` (a membership change or transfer); it is answered with the
    /// cluster's status as this node sees it once done.
    fn answer_with_status(
        &self,
        request_id: u64,
        operation: impl std::future::Future<Output = Result<(), Error>> + Send + 'static,
        pending: &mut Pending,
    ) {
        let node = self.node.clone();
        pending.push(Box::pin(async move {
            let result = operation
                .await
                .map(|()| Reply::ClusterStatus(node.status()));
            Done::Reply(ServerMessage::Response {
                request_id,
                revision: node.published_index(),
                result,
            })
        }));
    }

    /// Proposes a write (fenced or not) under its session or the implicit one.
    async fn write(
        &mut self,
        request_id: u64,
        session: Option<SessionSeq>,
        op: WriteOp,
        fence: Option<Fence>,
        pending: &mut Pending,
    ) -> Option<ServerMessage> {
        let respond = |revision, result| {
            Some(ServerMessage::Response {
                request_id,
                revision,
                result,
            })
        };
        {
            {
                if let Err(e) = check_write(&op, self.node.config()) {
                    return respond(self.node.published_index(), Err(e));
                }
                if let Some(fence) = &fence {
                    if let Err(e) = crate::fsm::locks::validate_name(&fence.lock) {
                        return respond(self.node.published_index(), Err(e));
                    }
                }
                let (header, implicit_seq) = match session {
                    Some(header) if header.session == crate::fsm::ANONYMOUS => {
                        let unknown = Error::UnknownSession {
                            session: header.session,
                        };
                        return respond(self.node.published_index(), Err(unknown));
                    }
                    Some(header) => (header, None),
                    // Owning nothing, a write needs no session at all: no session entries for
                    // a one-shot `lockctl put`.
                    None if !crate::fsm::needs_owner(&op) => {
                        let anonymous = SessionSeq {
                            session: crate::fsm::ANONYMOUS,
                            seq: 0,
                            floor: 0,
                        };
                        (anonymous, None)
                    }
                    None => match self.implicit_seq().await {
                        Ok(header) => (header, Some(header.seq)),
                        Err(e) => return respond(self.node.published_index(), Err(e)),
                    },
                };
                self.propose(
                    request_id,
                    Command::Write {
                        session: header,
                        op,
                        fence,
                    },
                    implicit_seq,
                    pending,
                );
                None
            }
        }
    }

    fn propose(
        &self,
        request_id: u64,
        command: Command,
        implicit_seq: Option<u64>,
        pending: &mut Pending,
    ) {
        let node = self.node.clone();
        pending.push(Box::pin(async move {
            let (revision, result) = match node.propose(command).await {
                Ok(applied) => (applied.revision, applied.result),
                Err(e) => (0, Err(e)),
            };
            let message = ServerMessage::Response {
                request_id,
                revision,
                result,
            };
            match implicit_seq {
                Some(seq) => Done::ImplicitWrite(seq, message),
                None => Done::Reply(message),
            }
        }));
    }

    /// The next (session, seq, floor) of the implicit session, opening it on first use.
    async fn implicit_seq(&mut self) -> Result<SessionSeq, Error> {
        if self.implicit.is_none() {
            let config = self.node.config();
            let command = Command::OpenSession {
                ttl_ms: config.implicit_session_ttl_ms,
                tick_ms: config.tick_ms,
                drift_ppm: config.drift_ppm,
                implicit: true,
            };
            let applied = self.node.propose(command).await?;
            let session = match applied.result? {
                Reply::SessionOpened(grant) => grant.session,
                other => {
                    return Err(Error::Internal(format!(
                        "unexpected reply to OpenSession: {other:?}"
                    )))
                }
            };
            self.implicit = Some(Implicit {
                session,
                next_seq: 1,
                in_flight: BTreeSet::new(),
            });
        }
        let implicit = self
            .implicit
            .as_mut()
            .ok_or_else(|| Error::Internal("no implicit session".into()))?;
        if implicit.in_flight.len() as u64 >= lockd_protocol::SEQ_WINDOW - 1 {
            return Err(Error::Unavailable(
                "too many writes in flight on this connection".into(),
            ));
        }
        Ok(implicit.next())
    }

    /// Closes the connection: says why, and ends the implicit session.
    async fn finish(mut self, reason: Option<Error>) {
        if let Some(reason) = reason {
            goodbye(&mut self.conn, reason).await;
        }
        if let Some(implicit) = self.implicit.take() {
            // Unpin first: if the close is lost (shutdown), the session still expires.
            self.node.unpin(implicit.session);
            let _ = self
                .node
                .propose(Command::CloseSession {
                    session: implicit.session,
                })
                .await;
        }
    }
}

/// Checks sizes and paths before anything is proposed (DESIGN §3a.14). The state machine
/// checks paths again; sizes depend on configuration, so only here.
fn check_write(op: &WriteOp, config: &crate::Config) -> Result<(), Error> {
    let check_data = |data: &[u8]| {
        if data.len() > config.max_data {
            Err(Error::DataTooLarge {
                len: data.len() as u64,
                max: config.max_data as u64,
            })
        } else {
            Ok(())
        }
    };
    let ops: Vec<(&str, Option<&[u8]>)> = match op {
        WriteOp::Acquire(a) => {
            crate::fsm::locks::validate_name(&a.lock)?;
            return check_data(&a.value);
        }
        WriteOp::Release(ReleaseOp { lock, .. }) | WriteOp::Cancel(CancelOp { lock, .. }) => {
            return crate::fsm::locks::validate_name(lock);
        }
        WriteOp::Create(c) => vec![(&c.path, Some(&c.data))],
        WriteOp::Set(s) => vec![(&s.path, Some(&s.data))],
        WriteOp::Delete(d) => vec![(&d.path, None)],
        WriteOp::Multi(ops) => ops
            .iter()
            .map(|op| match op {
                MultiOp::Create(c) => (c.path.as_str(), Some(c.data.as_slice())),
                MultiOp::Set(s) => (s.path.as_str(), Some(s.data.as_slice())),
                MultiOp::Delete(d) => (d.path.as_str(), None),
                MultiOp::Check(c) => (c.path.as_str(), None),
            })
            .collect(),
    };
    if ops.len() > MAX_MULTI_OPS {
        return Err(Error::RequestTooLarge {
            len: ops.len() as u64,
            max: MAX_MULTI_OPS as u64,
        });
    }
    let mut total = 0usize;
    for (index, (path, data)) in ops.iter().enumerate() {
        let checked =
            lockd_protocol::path::validate(path).and_then(|()| data.map_or(Ok(()), check_data));
        if let Err(error) = checked {
            return Err(match op {
                WriteOp::Multi(_) => Error::MultiFailed {
                    index: index as u32,
                    error: error.into(),
                },
                _ => error,
            });
        }
        total += path.len() + data.map_or(0, |d| d.len()) + 16;
    }
    if total > config.max_proposal {
        return Err(Error::RequestTooLarge {
            len: total as u64,
            max: config.max_proposal as u64,
        });
    }
    Ok(())
}
