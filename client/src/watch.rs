//! Watch streams: events of a node, its children, a prefix, a session or a lock, delivered a
//! whole revision at a time, in revision order, each exactly once, across reconnects.
//!
//! The server pushes `WatchEvents` frames (a large revision may span several; only the last
//! has `revision_complete`), `WatchProgress` bookmarks and `WatchEnded`. The reader task of a
//! connection routes a watch's frames to its stream through a bounded channel; the route is
//! installed by the reader itself when it sees the `WatchCreated` answer, so no frame that
//! follows the answer on the wire is missed. The stream buffers a revision until it is
//! complete, and keeps its resume point: max(last complete revision, last bookmark) + 1
//! (DESIGN §3a.13). When the connection is lost, the server ends the watch with `Lagged` or
//! `ShuttingDown`, or the client-side channel overflows, the stream re-creates the watch from
//! the resume point and drops what it had of an incomplete revision: no gap, no duplicate.
//! `Compacted { oldest }` (history no longer kept) ends the stream with an error item; the
//! caller then re-reads the state it cares about.

use std::collections::{HashMap, VecDeque};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use futures_util::Stream;
use lockd_protocol::{
    ClientMessage, Event, Reply, Request, Revision, ServerMessage, SessionEventKind, SessionId,
    WatchRequest, WatchTarget,
};
use tokio::sync::mpsc;
use tokio::time::Instant;

use crate::client::{lock, Client, WeakClient};
use crate::config::Backoff;
use crate::conn::{Answer, CallError, Connection, PushHandler};
use crate::error::{Error, Result};
use crate::session::Registry;

/// Frames buffered per watch between the connection's reader and the stream. When a
/// consumer falls this far behind, the stream resumes from its resume point instead.
const FRAME_BUFFER: usize = 256;

/// One item of a [`WatchStream`].
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum WatchItem {
    /// Every event of the watch at one revision, in order. Never split.
    Revision {
        /// The revision.
        revision: Revision,
        /// Its events matching the watch.
        events: Vec<Event>,
    },
    /// Bookmark: everything up to this revision has been delivered (only with
    /// [`WatchBuilder::progress`]).
    Progress(Revision),
}

/// Where frames of each watch go, keyed by (connection generation, id).
#[derive(Default)]
pub(crate) struct WatchRouter {
    /// Watches being created, by (generation, request id): routed once answered.
    creating: Mutex<HashMap<(u64, u64), mpsc::Sender<ServerMessage>>>,
    creating_count: AtomicUsize,
    /// Live watches, by (generation, watch id).
    routes: Mutex<HashMap<(u64, u64), mpsc::Sender<ServerMessage>>>,
}

impl WatchRouter {
    fn expect(&self, generation: u64, request_id: u64, tx: mpsc::Sender<ServerMessage>) {
        lock(&self.creating).insert((generation, request_id), tx);
        self.creating_count.fetch_add(1, Ordering::AcqRel);
    }

    fn unexpect(&self, generation: u64, request_id: u64) {
        if lock(&self.creating)
            .remove(&(generation, request_id))
            .is_some()
        {
            self.creating_count.fetch_sub(1, Ordering::AcqRel);
        }
    }

    fn remove(&self, generation: u64, watch_id: u64) {
        lock(&self.routes).remove(&(generation, watch_id));
    }

    fn created(
        &self,
        generation: u64,
        request_id: u64,
        result: &Result<Reply, lockd_protocol::Error>,
    ) {
        if self.creating_count.load(Ordering::Acquire) == 0 {
            return;
        }
        let Some(tx) = lock(&self.creating).remove(&(generation, request_id)) else {
            return;
        };
        self.creating_count.fetch_sub(1, Ordering::AcqRel);
        if let Ok(Reply::WatchCreated { watch_id, .. }) = result {
            lock(&self.routes).insert((generation, *watch_id), tx);
        }
    }

    fn route(&self, generation: u64, message: ServerMessage) {
        let watch_id = match &message {
            ServerMessage::WatchEvents { watch_id, .. }
            | ServerMessage::WatchProgress { watch_id, .. }
            | ServerMessage::WatchEnded { watch_id, .. } => *watch_id,
            _ => return,
        };
        let mut routes = lock(&self.routes);
        let key = (generation, watch_id);
        let Some(tx) = routes.get(&key) else {
            tracing::debug!(watch_id, "frame for a watch nobody follows");
            return;
        };
        let ended = matches!(message, ServerMessage::WatchEnded { .. });
        match tx.try_send(message) {
            Ok(()) if ended => {
                routes.remove(&key);
            }
            Ok(()) => {}
            // Full: dropping the route closes the channel; the stream resumes from its
            // resume point. Closed: the stream is gone.
            Err(_) => {
                routes.remove(&key);
            }
        }
    }
}

/// The push handler of one connection: session events to the registry, watch frames and
/// watch-creating answers to the router.
pub(crate) struct ConnPush {
    pub(crate) generation: u64,
    pub(crate) registry: Arc<Registry>,
    pub(crate) router: Arc<WatchRouter>,
}

impl PushHandler for ConnPush {
    fn session_event(&self, session: SessionId, revision: Revision, event: SessionEventKind) {
        self.registry.session_event(session, revision, event);
    }

    fn watch_message(&self, message: ServerMessage) {
        self.router.route(self.generation, message);
    }

    fn response(&self, request_id: u64, result: &Result<Reply, lockd_protocol::Error>) {
        self.router.created(self.generation, request_id, result);
    }
}

/// Builder of a watch; see [`Client::watch`].
#[derive(Debug)]
#[must_use = "a builder does nothing until awaited"]
pub struct WatchBuilder<'a> {
    client: &'a Client,
    target: WatchTarget,
    start: Option<Revision>,
    with_data: bool,
    progress: bool,
}

impl WatchBuilder<'_> {
    /// Start at revision `rev` (events of `rev` included). Default: the next revision.
    pub fn from(mut self, rev: Revision) -> Self {
        self.start = Some(rev);
        self
    }

    /// Include node data in created and changed events.
    pub fn with_data(mut self) -> Self {
        self.with_data = true;
        self
    }

    /// Also yield [`WatchItem::Progress`] bookmarks.
    pub fn progress(mut self) -> Self {
        self.progress = true;
        self
    }
}

impl<'a> std::future::IntoFuture for WatchBuilder<'a> {
    type Output = Result<WatchStream>;
    type IntoFuture =
        std::pin::Pin<Box<dyn std::future::Future<Output = Result<WatchStream>> + Send + 'a>>;

    fn into_future(self) -> Self::IntoFuture {
        Box::pin(async move {
            if let WatchTarget::Node(p) | WatchTarget::Children(p) | WatchTarget::Prefix(p) =
                &self.target
            {
                crate::error::check_path(p)?;
            }
            let mut stream = WatchStream {
                client: StreamClient::Strong(self.client.clone()),
                target: self.target,
                with_data: self.with_data,
                progress: self.progress,
                resume_from: 0,
                start_revision: 0,
                live: None,
                pending: Vec::new(),
                ready: VecDeque::new(),
                fatal: None,
                done: false,
            };
            let (live, start) = stream.open(self.client, self.start).await?;
            stream.live = Some(live);
            stream.resume_from = start;
            stream.start_revision = start;
            Ok(stream)
        })
    }
}

impl Client {
    /// Watches `target`. Await the builder to create the stream; then call
    /// [`WatchStream::next`] for whole revisions.
    ///
    /// ```no_run
    /// # async fn demo(client: lockd_client::Client) -> Result<(), lockd_client::Error> {
    /// use lockd_client::{protocol::WatchTarget, WatchItem};
    /// let mut stream = client.watch(WatchTarget::Prefix("/config".into())).with_data().await?;
    /// while let Some(item) = stream.next().await {
    ///     if let WatchItem::Revision { revision, events } = item? {
    ///         println!("revision {revision}: {} events", events.len());
    ///     }
    /// }
    /// # Ok(()) }
    /// ```
    pub fn watch(&self, target: WatchTarget) -> WatchBuilder<'_> {
        WatchBuilder {
            client: self,
            target,
            start: None,
            with_data: false,
            progress: false,
        }
    }
}

/// A server watch this stream currently follows.
struct Live {
    conn: Arc<Connection>,
    watch_id: u64,
    rx: mpsc::Receiver<ServerMessage>,
    router: Arc<WatchRouter>,
}

impl Drop for Live {
    fn drop(&mut self) {
        self.router.remove(self.conn.generation, self.watch_id);
        if !self.conn.is_alive() {
            return;
        }
        // Best effort: tell the server to stop sending.
        if let Ok(handle) = tokio::runtime::Handle::try_current() {
            let conn = self.conn.clone();
            let watch_id = self.watch_id;
            handle.spawn(async move {
                // Request ids of this connection only need to be unique among its pending
                // calls; the top bit keeps these apart from the client's counter.
                let request_id = (1u64 << 63) | watch_id;
                let msg = ClientMessage::Request {
                    request_id,
                    request: Request::CancelWatch { watch_id },
                };
                let deadline = Instant::now() + Duration::from_secs(2);
                let _ = conn.call(request_id, msg, deadline).await;
            });
        }
    }
}

/// A resumable watch: yields whole revisions in order, each once. See the module docs.
///
/// Items are `Ok(WatchItem)` or an error. `Compacted` (and other errors that a retry cannot
/// fix) end the stream after the error item; a failure to reconnect in time is yielded as an
/// error item and the next call tries again from the same resume point.
pub struct WatchStream {
    client: StreamClient,
    target: WatchTarget,
    with_data: bool,
    progress: bool,
    /// Next revision wanted: max(last complete revision, last bookmark) + 1.
    resume_from: Revision,
    start_revision: Revision,
    live: Option<Live>,
    /// Events of a revision not yet complete.
    pending: Vec<Event>,
    ready: VecDeque<WatchItem>,
    fatal: Option<Error>,
    done: bool,
}

impl std::fmt::Debug for WatchStream {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("WatchStream")
            .field("target", &self.target)
            .field("resume_from", &self.resume_from)
            .finish_non_exhaustive()
    }
}

/// The client a stream re-creates its watch through.
enum StreamClient {
    Strong(Client),
    /// Does not keep the client alive: the stream ends once the client is gone (for
    /// background streams the client itself owns, such as a session's lock events).
    Weak(WeakClient),
}

/// What one frame did to the stream.
enum Flow {
    Continue,
    /// The server watch is over and must be re-created from the resume point.
    Resume,
}

impl WatchStream {
    /// The concrete first revision the stream delivers (answered by the server).
    pub fn start_revision(&self) -> Revision {
        self.start_revision
    }

    /// The revision a resume would start from: every event below it has been delivered.
    pub fn resume_revision(&self) -> Revision {
        self.resume_from
    }

    /// Holds the client weakly from now on: when every other handle of the client is gone,
    /// the stream ends (`None`) instead of keeping the client alive.
    pub(crate) fn downgrade_client(&mut self) {
        if let StreamClient::Strong(c) = &self.client {
            self.client = StreamClient::Weak(c.downgrade());
        }
    }

    fn client(&self) -> Option<Client> {
        match &self.client {
            StreamClient::Strong(c) => Some(c.clone()),
            StreamClient::Weak(w) => w.upgrade(),
        }
    }

    /// The next item; `None` once the stream has ended (after a fatal error item).
    pub async fn next(&mut self) -> Option<Result<WatchItem>> {
        let mut delay = Duration::ZERO;
        loop {
            if let Some(item) = self.ready.pop_front() {
                return Some(Ok(item));
            }
            if let Some(e) = self.fatal.take() {
                self.done = true;
                self.live = None;
                return Some(Err(e));
            }
            if self.done {
                return None;
            }
            let Some(live) = self.live.as_mut() else {
                if !delay.is_zero() {
                    tokio::time::sleep(Backoff::jittered(delay)).await;
                }
                let Some(client) = self.client() else {
                    self.done = true;
                    return None;
                };
                delay = client.config().backoff.next(delay);
                match self.open(&client, Some(self.resume_from)).await {
                    Ok((live, _)) => self.live = Some(live),
                    Err(e) if fatal(&e) => {
                        self.fatal = Some(e);
                    }
                    Err(e) => return Some(Err(e)),
                }
                continue;
            };
            let message = tokio::select! {
                biased;
                m = live.rx.recv() => m,
                _ = live.conn.closed() => {
                    // Frames already routed are valid: take them before resuming.
                    let mut rest = Vec::new();
                    while let Ok(m) = live.rx.try_recv() {
                        rest.push(m);
                    }
                    for m in rest {
                        // Whatever a frame says, the watch is re-created next.
                        let _ = self.on_frame(m);
                    }
                    self.restart();
                    continue;
                }
            };
            match message {
                Some(m) => {
                    if let Flow::Resume = self.on_frame(m) {
                        self.restart();
                    }
                }
                // The route was dropped (client-side overflow): resume.
                None => self.restart(),
            }
        }
    }

    /// Turns the stream into a [`futures_util::Stream`].
    pub fn into_stream(self) -> impl Stream<Item = Result<WatchItem>> + Send + Unpin {
        Box::pin(futures_util::stream::unfold(self, |mut s| async move {
            s.next().await.map(|item| (item, s))
        }))
    }

    /// Drops the server watch and any incomplete revision; the next call resumes.
    fn restart(&mut self) {
        self.live = None;
        self.pending.clear();
    }

    fn flush_pending(&mut self) {
        let Some(first) = self.pending.first() else {
            return;
        };
        let revision = first.revision;
        let events = std::mem::take(&mut self.pending);
        self.resume_from = self.resume_from.max(revision + 1);
        self.ready
            .push_back(WatchItem::Revision { revision, events });
    }

    fn on_frame(&mut self, message: ServerMessage) -> Flow {
        match message {
            ServerMessage::WatchEvents {
                events,
                revision_complete,
                ..
            } => {
                for event in events {
                    if event.revision < self.resume_from {
                        continue; // delivered already
                    }
                    if self
                        .pending
                        .first()
                        .is_some_and(|p| p.revision != event.revision)
                    {
                        self.flush_pending();
                    }
                    self.pending.push(event);
                }
                if revision_complete {
                    self.flush_pending();
                }
                Flow::Continue
            }
            ServerMessage::WatchProgress { revision, .. } => {
                if self.pending.first().is_some_and(|p| p.revision <= revision) {
                    self.flush_pending();
                }
                if revision >= self.resume_from {
                    self.resume_from = revision + 1;
                    if self.progress {
                        self.ready.push_back(WatchItem::Progress(revision));
                    }
                }
                Flow::Continue
            }
            ServerMessage::WatchEnded { reason, .. } => {
                let error = Error::Server(reason);
                if fatal(&error) {
                    self.fatal = Some(error);
                    Flow::Continue
                } else {
                    tracing::debug!(
                        resume_from = self.resume_from,
                        "watch ended: {error}; resuming"
                    );
                    Flow::Resume
                }
            }
            other => {
                tracing::debug!(?other, "unexpected frame on a watch");
                Flow::Continue
            }
        }
    }

    /// Creates the server watch from `start`; answers it and its concrete start revision.
    async fn open(&self, client: &Client, start: Option<Revision>) -> Result<(Live, Revision)> {
        let config = client.config();
        let deadline = Instant::now() + config.request_timeout;
        let router = client.inner.watches.clone();
        let mut delay = Duration::ZERO;
        let mut lagging = 0u64;
        loop {
            let conn = client.connection(deadline).await?;
            let request_id = client.next_request_id();
            let (tx, rx) = mpsc::channel(FRAME_BUFFER);
            router.expect(conn.generation, request_id, tx);
            let msg = ClientMessage::Request {
                request_id,
                request: Request::Watch(WatchRequest {
                    target: self.target.clone(),
                    start_revision: start,
                    with_data: self.with_data,
                }),
            };
            let answer = conn.call(request_id, msg, deadline).await;
            router.unexpect(conn.generation, request_id);
            let failure = match answer {
                Ok(Answer::Response {
                    result:
                        Ok(Reply::WatchCreated {
                            watch_id,
                            start_revision,
                        }),
                    ..
                }) => {
                    let live = Live {
                        conn,
                        watch_id,
                        rx,
                        router,
                    };
                    return Ok((live, start_revision));
                }
                Ok(Answer::Response { result: Ok(r), .. }) => {
                    return Err(crate::client::unexpected("Watch", &r))
                }
                // The node has not yet published the revision: a revision the caller just
                // learned (an acquire's waiter id, a write's revision) may be answered before
                // the node's watch side has caught up. Retry soon.
                Ok(Answer::Response {
                    result: Err(e @ lockd_protocol::Error::FutureRevision { .. }),
                    ..
                }) => {
                    lagging += 1;
                    let wake = Instant::now() + Duration::from_millis(lagging.min(50));
                    if wake >= deadline {
                        return Err(Error::Server(e));
                    }
                    drop(conn);
                    tokio::time::sleep_until(wake).await;
                    continue;
                }
                Ok(Answer::Response { result: Err(e), .. }) => {
                    if !e.is_retryable() {
                        return Err(Error::Server(e));
                    }
                    Error::Server(e)
                }
                Ok(Answer::KeepAlive(_)) => {
                    return Err(Error::Protocol("keepalive reply to a watch".into()))
                }
                Err(CallError::NotSent | CallError::Lost(_)) => Error::ConnectionLost {
                    reason: conn.goodbye(),
                },
                Err(CallError::Rejected(e)) => return Err(Error::Invalid(e)),
                Err(CallError::Timeout) => return Err(Error::Timeout(config.request_timeout)),
            };
            drop(conn);
            delay = config.backoff.next(delay);
            let wake = Instant::now() + Backoff::jittered(delay);
            if wake >= deadline {
                return Err(failure);
            }
            tokio::time::sleep_until(wake).await;
        }
    }
}

/// Errors after which re-creating the watch cannot help.
fn fatal(e: &Error) -> bool {
    match e.wire() {
        Some(w) => !(w.is_retryable() || matches!(w, lockd_protocol::Error::Lagged { .. })),
        None => matches!(e, Error::Protocol(_) | Error::Config(_)),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use lockd_protocol::EventKind;

    fn ev(revision: Revision, path: &str) -> Event {
        Event {
            revision,
            kind: EventKind::Deleted { path: path.into() },
        }
    }

    fn stream() -> WatchStream {
        WatchStream {
            client: StreamClient::Strong(Client::unconnected(crate::ClientConfig::new([
                "127.0.0.1:1",
            ]))),
            target: WatchTarget::Prefix("/".into()),
            with_data: false,
            progress: true,
            resume_from: 5,
            start_revision: 5,
            live: None,
            pending: Vec::new(),
            ready: VecDeque::new(),
            fatal: None,
            done: false,
        }
    }

    fn frame(events: Vec<Event>, complete: bool) -> ServerMessage {
        ServerMessage::WatchEvents {
            watch_id: 1,
            events,
            revision_complete: complete,
        }
    }

    #[tokio::test]
    async fn revisions_are_delivered_whole_once_and_advance_the_resume_point() {
        let mut s = stream();
        s.on_frame(frame(vec![ev(4, "/old"), ev(5, "/a"), ev(6, "/b")], false));
        assert_eq!(s.ready.len(), 1, "5 is complete once 6 starts");
        assert_eq!(s.resume_from, 6);
        s.on_frame(frame(vec![ev(6, "/c")], true));
        assert_eq!(
            s.ready.pop_back(),
            Some(WatchItem::Revision {
                revision: 6,
                events: vec![ev(6, "/b"), ev(6, "/c")]
            })
        );
        assert_eq!(s.resume_from, 7);
        // A resumed watch replaying 6 delivers nothing twice.
        s.on_frame(frame(vec![ev(6, "/b"), ev(6, "/c")], true));
        s.on_frame(ServerMessage::WatchProgress {
            watch_id: 1,
            revision: 9,
        });
        assert_eq!(s.resume_from, 10);
        assert_eq!(s.ready.pop_back(), Some(WatchItem::Progress(9)));
        // An incomplete revision is dropped on resume and delivered again by the server.
        s.on_frame(frame(vec![ev(11, "/x")], false));
        assert!(matches!(
            s.on_frame(ServerMessage::WatchEnded {
                watch_id: 1,
                reason: lockd_protocol::Error::Lagged { resume_from: 10 }
            }),
            Flow::Resume
        ));
        s.restart();
        assert!(s.pending.is_empty());
        assert_eq!(s.resume_from, 10);
        s.on_frame(ServerMessage::WatchEnded {
            watch_id: 1,
            reason: lockd_protocol::Error::Compacted { oldest: 50 },
        });
        assert!(s.fatal.is_some());
    }
}
