//! One framed TCP connection to a lockd node: the handshake, a reader task and a writer task,
//! and the map of requests awaiting their answers.
//!
//! Many requests are in flight at once (pipelining) and answers may arrive in any order: each
//! caller registers a oneshot under its request id, queues its frame for the writer, and
//! awaits the oneshot. The writer batches queued frames into one flush. When the connection
//! ends, the writer fails every request still queued as *not sent* (safe to retry anywhere)
//! and every other pending request as *lost* (it may have reached the server).

use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use futures_util::{SinkExt, StreamExt};
use lockd_protocol::{
    ClientMessage, FrameCodec, FrameError, Hello, HelloOk, KeepAliveResult, Reply, Revision,
    ServerMessage, SessionEventKind, SessionId, PROTOCOL_VERSION,
};
use tokio::net::TcpStream;
use tokio::sync::{mpsc, oneshot};
use tokio::time::Instant;
use tokio_util::codec::Framed;
use tokio_util::sync::CancellationToken;

type Sink = futures_util::stream::SplitSink<
    Framed<TcpStream, FrameCodec<ServerMessage, ClientMessage>>,
    ClientMessage,
>;
type Source =
    futures_util::stream::SplitStream<Framed<TcpStream, FrameCodec<ServerMessage, ClientMessage>>>;

/// Frames queued for the writer before callers wait.
const QUEUE: usize = 1024;

/// An answer routed to the caller that sent the request.
#[derive(Debug)]
pub(crate) enum Answer {
    Response {
        revision: Revision,
        result: Result<Reply, lockd_protocol::Error>,
    },
    KeepAlive(Vec<(SessionId, KeepAliveResult)>),
}

/// Why a call got no answer.
#[derive(Debug)]
pub(crate) enum CallError {
    /// The frame never reached the socket: retrying is always safe.
    NotSent,
    /// The connection ended after the frame was (maybe) written.
    Lost(Option<lockd_protocol::Error>),
    /// The frame could not be encoded (e.g. larger than the frame limit).
    Rejected(lockd_protocol::Error),
    /// The deadline passed.
    Timeout,
}

/// Receives frames the server pushes without a request.
pub(crate) trait PushHandler: Send + Sync + 'static {
    fn session_event(&self, session: SessionId, revision: Revision, event: SessionEventKind);
    /// A frame of a watch stream (`WatchEvents`, `WatchProgress`, `WatchEnded`).
    fn watch_message(&self, message: ServerMessage) {
        tracing::debug!(?message, "watch frame with no watch registered");
    }
    /// Sees every response just before it is handed to its caller, in frame order, so a
    /// `WatchCreated` answer can route the watch's frames that follow it on the wire.
    fn response(&self, _request_id: u64, _result: &Result<Reply, lockd_protocol::Error>) {}
}

/// Why connecting to one endpoint failed.
#[derive(Debug, thiserror::Error)]
pub(crate) enum ConnectError {
    #[error("{addr}: {error}")]
    Io { addr: String, error: std::io::Error },
    #[error("{addr}: timed out")]
    Timeout { addr: String },
    #[error("{addr}: server said goodbye: {reason}")]
    Goodbye {
        addr: String,
        reason: lockd_protocol::Error,
    },
    #[error("{addr}: {error}")]
    Frame { addr: String, error: FrameError },
    #[error("{addr}: {what}")]
    Protocol { addr: String, what: String },
}

enum Outcome {
    Answer(Answer),
    NotSent,
    Lost,
    Rejected(lockd_protocol::Error),
}

#[derive(Default)]
struct Pending {
    dead: bool,
    waiting: HashMap<u64, oneshot::Sender<Outcome>>,
}

struct Shared {
    pending: Mutex<Pending>,
    goodbye: Mutex<Option<lockd_protocol::Error>>,
    cancel: CancellationToken,
}

impl Shared {
    fn finish(&self, request_id: u64, outcome: Outcome) {
        let tx = lock(&self.pending).waiting.remove(&request_id);
        match tx {
            Some(tx) => {
                let _ = tx.send(outcome);
            }
            None => tracing::debug!(request_id, "answer for a request nobody waits for"),
        }
    }

    fn goodbye(&self) -> Option<lockd_protocol::Error> {
        lock(&self.goodbye).clone()
    }
}

fn lock<T>(m: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    m.lock().unwrap_or_else(std::sync::PoisonError::into_inner)
}

/// A live (or recently live) connection. Dropping the last handle closes it.
pub(crate) struct Connection {
    /// The address dialled.
    pub(crate) addr: String,
    /// The server's handshake answer.
    pub(crate) hello: HelloOk,
    /// Distinguishes successive connections of one client.
    pub(crate) generation: u64,
    tx: mpsc::Sender<ClientMessage>,
    shared: Arc<Shared>,
}

impl std::fmt::Debug for Connection {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Connection")
            .field("addr", &self.addr)
            .field("generation", &self.generation)
            .field("alive", &self.is_alive())
            .finish()
    }
}

impl Drop for Connection {
    fn drop(&mut self) {
        self.shared.cancel.cancel();
    }
}

/// Removes a pending entry if the caller stops waiting (timeout or cancellation).
struct PendingGuard<'a> {
    shared: &'a Shared,
    request_id: u64,
}

impl Drop for PendingGuard<'_> {
    fn drop(&mut self) {
        lock(&self.shared.pending).waiting.remove(&self.request_id);
    }
}

impl Connection {
    /// Dials `addr`, sends `Hello` and waits for `HelloOk`, all within `timeout`.
    pub(crate) async fn connect(
        addr: &str,
        client_name: &str,
        max_frame: usize,
        timeout: Duration,
        generation: u64,
        push: Arc<dyn PushHandler>,
    ) -> Result<Connection, ConnectError> {
        let deadline = Instant::now() + timeout;
        let timed_out = || ConnectError::Timeout {
            addr: addr.to_string(),
        };
        let stream = tokio::time::timeout_at(deadline, TcpStream::connect(addr))
            .await
            .map_err(|_| timed_out())?
            .map_err(|error| ConnectError::Io {
                addr: addr.to_string(),
                error,
            })?;
        if let Err(e) = stream.set_nodelay(true) {
            tracing::debug!(addr, "set_nodelay: {e}");
        }
        let mut framed = Framed::new(stream, FrameCodec::new(max_frame));
        let hello = ClientMessage::Hello(Hello {
            protocol_version: PROTOCOL_VERSION,
            client_name: client_name.to_string(),
        });
        let frame_err = |error| ConnectError::Frame {
            addr: addr.to_string(),
            error,
        };
        tokio::time::timeout_at(deadline, framed.send(hello))
            .await
            .map_err(|_| timed_out())?
            .map_err(frame_err)?;
        let first = tokio::time::timeout_at(deadline, framed.next())
            .await
            .map_err(|_| timed_out())?;
        let hello = match first {
            Some(Ok(ServerMessage::HelloOk(ok))) => ok,
            Some(Ok(ServerMessage::Goodbye { reason })) => {
                return Err(ConnectError::Goodbye {
                    addr: addr.to_string(),
                    reason,
                })
            }
            Some(Ok(other)) => {
                return Err(ConnectError::Protocol {
                    addr: addr.to_string(),
                    what: format!("expected HelloOk, got {other:?}"),
                })
            }
            Some(Err(e)) => return Err(frame_err(e)),
            None => {
                return Err(ConnectError::Protocol {
                    addr: addr.to_string(),
                    what: "connection closed during the handshake".into(),
                })
            }
        };
        tracing::debug!(addr, node = hello.node_id, generation, "connected");
        let shared = Arc::new(Shared {
            pending: Mutex::new(Pending::default()),
            goodbye: Mutex::new(None),
            cancel: CancellationToken::new(),
        });
        let (sink, source) = framed.split();
        let (tx, rx) = mpsc::channel(QUEUE);
        tokio::spawn(read_loop(source, shared.clone(), push, addr.to_string()));
        tokio::spawn(write_loop(sink, rx, shared.clone()));
        Ok(Connection {
            addr: addr.to_string(),
            hello,
            generation,
            tx,
            shared,
        })
    }

    /// False once the connection has failed or been closed.
    pub(crate) fn is_alive(&self) -> bool {
        !self.shared.cancel.is_cancelled()
    }

    /// Resolves when the connection has failed or been closed.
    pub(crate) async fn closed(&self) {
        self.shared.cancel.cancelled().await
    }

    /// The reason of a `Goodbye` the server sent, if any.
    pub(crate) fn goodbye(&self) -> Option<lockd_protocol::Error> {
        self.shared.goodbye()
    }

    /// Sends `msg` (a request or keepalive with id `request_id`) and waits for its answer
    /// until `deadline`.
    pub(crate) async fn call(
        &self,
        request_id: u64,
        msg: ClientMessage,
        deadline: Instant,
    ) -> Result<Answer, CallError> {
        let (tx, rx) = oneshot::channel();
        {
            let mut pending = lock(&self.shared.pending);
            if pending.dead {
                return Err(CallError::NotSent);
            }
            pending.waiting.insert(request_id, tx);
        }
        let _guard = PendingGuard {
            shared: &self.shared,
            request_id,
        };
        match tokio::time::timeout_at(deadline, self.tx.send(msg)).await {
            Err(_) => return Err(CallError::Timeout),
            // The writer is gone and never saw the frame.
            Ok(Err(_)) => return Err(CallError::NotSent),
            Ok(Ok(())) => {}
        }
        match tokio::time::timeout_at(deadline, rx).await {
            Err(_) => Err(CallError::Timeout),
            Ok(Err(_)) => Err(CallError::Lost(self.goodbye())),
            Ok(Ok(Outcome::Answer(a))) => Ok(a),
            Ok(Ok(Outcome::NotSent)) => Err(CallError::NotSent),
            Ok(Ok(Outcome::Lost)) => Err(CallError::Lost(self.goodbye())),
            Ok(Ok(Outcome::Rejected(e))) => Err(CallError::Rejected(e)),
        }
    }
}

fn request_id(msg: &ClientMessage) -> Option<u64> {
    match msg {
        ClientMessage::Request { request_id, .. } | ClientMessage::KeepAlive { request_id, .. } => {
            Some(*request_id)
        }
        ClientMessage::Hello(_) => None,
    }
}

async fn read_loop(
    mut source: Source,
    shared: Arc<Shared>,
    push: Arc<dyn PushHandler>,
    addr: String,
) {
    loop {
        let frame = tokio::select! {
            _ = shared.cancel.cancelled() => break,
            frame = source.next() => frame,
        };
        match frame {
            None => {
                tracing::debug!(addr, "server closed the connection");
                break;
            }
            Some(Err(e)) => {
                tracing::warn!(addr, "reading from server failed: {e}");
                break;
            }
            Some(Ok(ServerMessage::Response {
                request_id,
                revision,
                result,
            })) => {
                push.response(request_id, &result);
                shared.finish(
                    request_id,
                    Outcome::Answer(Answer::Response { revision, result }),
                )
            }
            Some(Ok(ServerMessage::KeepAliveReply {
                request_id,
                results,
            })) => shared.finish(request_id, Outcome::Answer(Answer::KeepAlive(results))),
            Some(Ok(ServerMessage::SessionEvent {
                session,
                revision,
                event,
            })) => push.session_event(session, revision, event),
            Some(Ok(ServerMessage::Goodbye { reason })) => {
                tracing::info!(addr, "server said goodbye: {reason}");
                *lock(&shared.goodbye) = Some(reason);
                break;
            }
            Some(Ok(ServerMessage::HelloOk(_))) => {
                tracing::warn!(addr, "unexpected HelloOk after the handshake");
            }
            Some(Ok(
                message @ (ServerMessage::WatchEvents { .. }
                | ServerMessage::WatchProgress { .. }
                | ServerMessage::WatchEnded { .. }),
            )) => push.watch_message(message),
        }
    }
    shared.cancel.cancel();
}

async fn write_loop(mut sink: Sink, mut rx: mpsc::Receiver<ClientMessage>, shared: Arc<Shared>) {
    'outer: loop {
        let first = tokio::select! {
            _ = shared.cancel.cancelled() => break,
            msg = rx.recv() => match msg {
                Some(m) => m,
                None => break,
            },
        };
        let mut next = Some(first);
        while let Some(msg) = next.take() {
            let id = request_id(&msg);
            let fed = tokio::select! {
                _ = shared.cancel.cancelled() => break 'outer,
                r = sink.feed(msg) => r,
            };
            match fed {
                Ok(()) => {}
                Err(FrameError::TooLarge { len, max }) => {
                    if let Some(id) = id {
                        shared.finish(
                            id,
                            Outcome::Rejected(lockd_protocol::Error::RequestTooLarge { len, max }),
                        );
                    }
                }
                Err(FrameError::Encode(e)) => {
                    if let Some(id) = id {
                        shared.finish(
                            id,
                            Outcome::Rejected(lockd_protocol::Error::InvalidArgument(e)),
                        );
                    }
                }
                Err(e) => {
                    tracing::warn!("writing to server failed: {e}");
                    break 'outer;
                }
            }
            next = rx.try_recv().ok();
        }
        let flushed = tokio::select! {
            _ = shared.cancel.cancelled() => break,
            r = sink.flush() => r,
        };
        if let Err(e) = flushed {
            tracing::warn!("writing to server failed: {e}");
            break;
        }
    }
    shared.cancel.cancel();
    // Frames still queued never reached the socket.
    rx.close();
    while let Ok(msg) = rx.try_recv() {
        if let Some(id) = request_id(&msg) {
            shared.finish(id, Outcome::NotSent);
        }
    }
    let rest: Vec<_> = {
        let mut pending = lock(&shared.pending);
        pending.dead = true;
        pending.waiting.drain().collect()
    };
    for (_, tx) in rest {
        let _ = tx.send(Outcome::Lost);
    }
    let _ = tokio::time::timeout(Duration::from_millis(100), sink.close()).await;
}
