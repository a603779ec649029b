//! The [`Client`]: one shared connection, requests with retries, reconnects with backoff, and
//! the default session.
//!
//! Retry rules (DESIGN §3a.7): a request whose frame never reached a socket is always retried;
//! reads and session administration are retried after any connection loss; writes made
//! through a [`Session`] are retried with the same sequence number (the server's dedup answers
//! with the first result); writes without a session are retried only after an error that
//! guarantees they were not applied ([`lockd_protocol::Error::is_retryable`]), and come back
//! [`Error::Indeterminate`] if their connection is lost while they are in flight.

use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex, Weak};
use std::time::Duration;

use lockd_protocol::{ClientMessage, ClusterStatus, Reply, Request, Revision, SessionSeq};
use tokio::time::Instant;

use crate::config::{Backoff, ClientConfig};
use crate::conn::{Answer, CallError, ConnectError, Connection};
use crate::error::{Error, Result};
use crate::session::{self, Registry, Session, SessionShared};

/// Longest wait for a hinted leader's handshake before the endpoints are tried instead.
const HINT_CONNECT_TIMEOUT: Duration = Duration::from_millis(500);

/// Longest wait between retries of a request answered `NotLeader` (a leader change under
/// way), whatever the configured backoff: the client notices the new leader at most this
/// long after it is elected.
const ELECTION_RETRY_CAP: Duration = Duration::from_millis(100);

/// Shortest wait between those retries, whatever the configured backoff (even zero): they
/// are not counted as attempts, so they must not spin.
const ELECTION_RETRY_MIN: Duration = Duration::from_millis(10);

/// A handle to a lockd cluster. Cheap to clone: clones share one connection, the default
/// session and the keepalive task.
///
/// ```no_run
/// # async fn demo() -> Result<(), lockd_client::Error> {
/// let client = lockd_client::Client::connect(["127.0.0.1:7001"]).await?;
/// client.create("/app", b"v1".to_vec()).await?;
/// let got = client.get("/app").await?;
/// assert_eq!(got.data, b"v1");
/// # Ok(()) }
/// ```
#[derive(Clone)]
pub struct Client {
    pub(crate) inner: Arc<Inner>,
}

impl std::fmt::Debug for Client {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Client")
            .field("endpoints", &self.inner.config.endpoints)
            .finish_non_exhaustive()
    }
}

pub(crate) struct Inner {
    pub(crate) config: ClientConfig,
    next_request_id: AtomicU64,
    current: Mutex<Option<Arc<Connection>>>,
    /// Preferred next address (the hinted leader), set without waiting for the dial lock.
    preferred: Mutex<Option<String>>,
    /// Set when the current node cannot serve (removed, unavailable): the next dial starts
    /// at the next endpoint instead of the same one.
    rotate: AtomicBool,
    dial: tokio::sync::Mutex<DialState>,
    pub(crate) registry: Arc<Registry>,
    pub(crate) watches: Arc<crate::watch::WatchRouter>,
    default_session: tokio::sync::Mutex<Option<Arc<SessionShared>>>,
    keepalive_started: AtomicBool,
}

#[derive(Default)]
struct DialState {
    generation: u64,
    /// Where the next dial starts in the candidate list.
    next: usize,
    /// Client addresses of members learned from `HelloOk`.
    members: Vec<String>,
}

/// How a request may be retried.
#[derive(Clone, Copy)]
pub(crate) enum Policy<'a> {
    /// Reads and session administration: retried after any connection loss.
    Idempotent,
    /// A write without a session: retried only when it surely was not applied.
    Once,
    /// A write through a session: retried with the same seq, fresh floor.
    Session(&'a SessionShared),
}

pub(crate) fn lock<T>(m: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    m.lock().unwrap_or_else(std::sync::PoisonError::into_inner)
}

/// A weak handle used by background tasks so they do not keep the client alive.
#[derive(Clone)]
pub(crate) struct WeakClient(Weak<Inner>);

impl WeakClient {
    pub(crate) fn upgrade(&self) -> Option<Client> {
        self.0.upgrade().map(|inner| Client { inner })
    }
}

impl Client {
    /// Connects with default settings to the first reachable endpoint of `endpoints`.
    ///
    /// ```no_run
    /// # async fn demo() -> Result<(), lockd_client::Error> {
    /// let client = lockd_client::Client::connect(["10.0.0.1:7001", "10.0.0.2:7001"]).await?;
    /// # Ok(()) }
    /// ```
    pub async fn connect<I, S>(endpoints: I) -> Result<Client>
    where
        I: IntoIterator<Item = S>,
        S: Into<String>,
    {
        Client::with_config(ClientConfig::new(endpoints)).await
    }

    /// Connects with the given configuration. Fails with [`Error::ConnectFailed`] if no
    /// endpoint answers the handshake within the request timeout, or [`Error::Goodbye`] if a
    /// server refuses it (e.g. `UnsupportedVersion`).
    ///
    /// ```no_run
    /// # async fn demo() -> Result<(), lockd_client::Error> {
    /// use lockd_client::{Client, ClientConfig};
    /// let client = Client::with_config(ClientConfig::new(["127.0.0.1:7001"]).client_name("me")).await?;
    /// # Ok(()) }
    /// ```
    pub async fn with_config(config: ClientConfig) -> Result<Client> {
        if config.endpoints.is_empty() {
            return Err(Error::Config("no endpoints".into()));
        }
        let client = Client::unconnected(config);
        let deadline = Instant::now() + client.inner.config.request_timeout;
        client.connection(deadline).await?;
        Ok(client)
    }

    /// A client that connects on first use.
    pub(crate) fn unconnected(config: ClientConfig) -> Client {
        Client {
            inner: Arc::new(Inner {
                config,
                next_request_id: AtomicU64::new(1),
                current: Mutex::new(None),
                preferred: Mutex::new(None),
                rotate: AtomicBool::new(false),
                dial: tokio::sync::Mutex::new(DialState::default()),
                registry: Arc::new(Registry::default()),
                watches: Arc::new(crate::watch::WatchRouter::default()),
                default_session: tokio::sync::Mutex::new(None),
                keepalive_started: AtomicBool::new(false),
            }),
        }
    }

    /// The configuration in use.
    pub fn config(&self) -> &ClientConfig {
        &self.inner.config
    }

    /// The address of the node currently connected, if any.
    pub fn connected_to(&self) -> Option<String> {
        self.live_connection().map(|c| c.addr.clone())
    }

    /// Opens a session with the requested TTL (the server clamps it; see
    /// [`Session::grant`]). It is kept alive in the background while any clone of the
    /// returned handle exists.
    ///
    /// ```no_run
    /// # async fn demo(client: lockd_client::Client) -> Result<(), lockd_client::Error> {
    /// use std::time::Duration;
    /// let session = client.session(Duration::from_secs(10)).await?;
    /// session.create("/workers/me", b"".to_vec()).ephemeral().await?;
    /// # Ok(()) }
    /// ```
    pub async fn session(&self, ttl: Duration) -> Result<Session> {
        let ttl_ms = u64::try_from(ttl.as_millis()).unwrap_or(u64::MAX);
        if ttl_ms == 0 {
            return Err(Error::Invalid(lockd_protocol::Error::InvalidArgument(
                "session TTL must be positive".into(),
            )));
        }
        let sent = Instant::now();
        let (revision, reply) = self
            .execute(Request::OpenSession { ttl_ms }, Policy::Idempotent)
            .await?;
        let Reply::SessionOpened(grant) = reply else {
            return Err(unexpected("OpenSession", &reply));
        };
        let shared = Arc::new(SessionShared::new(grant, revision, sent));
        self.inner.registry.insert(&shared);
        self.ensure_keepalive();
        tracing::debug!(session = %grant.session, ttl_ms = grant.ttl_ms, "session opened");
        Ok(Session::from_parts(shared, self.clone()))
    }

    /// The client's default session, opened on first need with the configured default TTL
    /// and kept alive in the background. Ephemeral creates without an explicit session use
    /// it. If it has expired, a new one is opened (the old one's ephemeral nodes are gone).
    ///
    /// ```no_run
    /// # async fn demo(client: lockd_client::Client) -> Result<(), lockd_client::Error> {
    /// let session = client.default_session().await?;
    /// println!("default session {}", session.id());
    /// # Ok(()) }
    /// ```
    pub async fn default_session(&self) -> Result<Session> {
        let mut slot = self.inner.default_session.lock().await;
        if let Some(shared) = slot.as_ref() {
            if !shared.is_expired() {
                return Ok(Session::from_parts(shared.clone(), self.clone()));
            }
        }
        let session = self.session(self.inner.config.default_session_ttl).await?;
        *slot = Some(session.shared.clone());
        Ok(session)
    }

    /// The cluster as the answering node sees it.
    ///
    /// ```no_run
    /// # async fn demo(client: lockd_client::Client) -> Result<(), lockd_client::Error> {
    /// let status = client.cluster_status().await?;
    /// println!("leader {:?} at revision {}", status.status.leader, status.revision);
    /// # Ok(()) }
    /// ```
    pub async fn cluster_status(&self) -> Result<ClusterStatusResponse> {
        let (revision, reply) = self
            .execute(Request::ClusterStatus, Policy::Idempotent)
            .await?;
        match reply {
            Reply::ClusterStatus(status) => Ok(ClusterStatusResponse { status, revision }),
            other => Err(unexpected("ClusterStatus", &other)),
        }
    }

    /// Changes the cluster's membership, one server at a time (sent to the leader; see
    /// docs/operations.md). Resolves with the cluster as the leader sees it once the change
    /// applied there.
    pub async fn change_members(
        &self,
        change: lockd_protocol::MemberChange,
    ) -> Result<ClusterStatusResponse> {
        let (revision, reply) = self
            .execute(Request::ChangeMembers(change), Policy::Once)
            .await?;
        match reply {
            Reply::ClusterStatus(status) => Ok(ClusterStatusResponse { status, revision }),
            other => Err(unexpected("ClusterStatus", &other)),
        }
    }

    /// Hands leadership to member `to` (§3.10). Resolves once `to` leads.
    pub async fn transfer_leader(&self, to: u64) -> Result<ClusterStatusResponse> {
        let (revision, reply) = self
            .execute(Request::TransferLeader { to }, Policy::Once)
            .await?;
        match reply {
            Reply::ClusterStatus(status) => Ok(ClusterStatusResponse { status, revision }),
            other => Err(unexpected("ClusterStatus", &other)),
        }
    }

    pub(crate) fn downgrade(&self) -> WeakClient {
        WeakClient(Arc::downgrade(&self.inner))
    }

    fn ensure_keepalive(&self) {
        if !self.inner.keepalive_started.swap(true, Ordering::AcqRel) {
            tokio::spawn(session::keepalive_loop(
                self.downgrade(),
                self.inner.registry.clone(),
            ));
        }
        self.inner.registry.wake();
    }

    pub(crate) fn next_request_id(&self) -> u64 {
        self.inner.next_request_id.fetch_add(1, Ordering::Relaxed)
    }

    fn live_connection(&self) -> Option<Arc<Connection>> {
        let mut current = lock(&self.inner.current);
        match current.as_ref() {
            Some(c) if c.is_alive() => Some(c.clone()),
            Some(_) => {
                *current = None;
                None
            }
            None => None,
        }
    }

    /// Stops using `conn` for new requests (requests in flight on it still complete).
    /// Retires `conn` and makes the next dial start at the next endpoint: the node behind
    /// it cannot serve (removed, cut off, paused).
    pub(crate) fn retire_and_rotate(&self, conn: &Connection) {
        self.inner.rotate.store(true, Ordering::Release);
        self.retire(conn);
    }

    pub(crate) fn retire(&self, conn: &Connection) {
        let mut current = lock(&self.inner.current);
        if current.as_ref().map(|c| c.generation) == Some(conn.generation) {
            *current = None;
        }
    }

    /// The live connection, dialling one if needed.
    pub(crate) async fn connection(&self, deadline: Instant) -> Result<Arc<Connection>> {
        if let Some(c) = self.live_connection() {
            return Ok(c);
        }
        let timeout = self.inner.config.request_timeout;
        let mut dial = tokio::time::timeout_at(deadline, self.inner.dial.lock())
            .await
            .map_err(|_| Error::Timeout(timeout))?;
        if let Some(c) = self.live_connection() {
            return Ok(c);
        }
        let conn = Arc::new(self.dial(&mut dial, deadline).await?);
        *lock(&self.inner.current) = Some(conn.clone());
        Ok(conn)
    }

    async fn dial(&self, dial: &mut DialState, deadline: Instant) -> Result<Connection> {
        let config = &self.inner.config;
        let mut attempts = 0u32;
        let mut delay = Duration::ZERO;
        let mut last = String::from("deadline passed before any attempt");
        loop {
            let mut list: Vec<String> = config.endpoints.clone();
            for m in &dial.members {
                if !list.contains(m) {
                    list.push(m.clone());
                }
            }
            if self.inner.rotate.swap(false, Ordering::AcqRel) {
                dial.next = dial.next.wrapping_add(1);
            }
            let mut candidates: Vec<(Option<usize>, String)> = Vec::new();
            if let Some(p) = lock(&self.inner.preferred).take() {
                candidates.push((None, p));
            }
            let n = list.len();
            for k in 0..n {
                let i = (dial.next + k) % n;
                candidates.push((Some(i), list[i].clone()));
            }
            for (index, addr) in candidates {
                let now = Instant::now();
                if now >= deadline || attempts >= config.max_attempts {
                    break;
                }
                attempts += 1;
                dial.generation += 1;
                // A hinted leader may be one that stopped answering (paused, or just
                // deposed): give it less time before falling back on the endpoints.
                let patience = match index {
                    None => config.connect_timeout.min(HINT_CONNECT_TIMEOUT),
                    Some(_) => config.connect_timeout,
                };
                let timeout = patience.min(deadline - now);
                let push: Arc<dyn crate::conn::PushHandler> = Arc::new(crate::watch::ConnPush {
                    generation: dial.generation,
                    registry: self.inner.registry.clone(),
                    router: self.inner.watches.clone(),
                });
                match Connection::connect(
                    &addr,
                    &config.client_name,
                    config.max_frame,
                    timeout,
                    dial.generation,
                    push,
                )
                .await
                {
                    Ok(conn) => {
                        dial.members = conn
                            .hello
                            .members
                            .iter()
                            .map(|m| m.client_addr.clone())
                            .collect();
                        if let Some(i) = index {
                            dial.next = i;
                        }
                        return Ok(conn);
                    }
                    Err(ConnectError::Goodbye {
                        reason: reason @ lockd_protocol::Error::UnsupportedVersion { .. },
                        ..
                    }) => return Err(Error::Goodbye(reason)),
                    Err(e) => {
                        tracing::debug!("connect failed: {e}");
                        last = e.to_string();
                    }
                }
            }
            dial.next = dial.next.wrapping_add(1);
            delay = config.backoff.next(delay);
            let wake = Instant::now() + Backoff::jittered(delay);
            if attempts >= config.max_attempts || wake >= deadline {
                return Err(Error::ConnectFailed { attempts, last });
            }
            tokio::time::sleep_until(wake).await;
        }
    }

    /// Follows a `NotLeader` answer: prefer the hinted leader's client address when known.
    /// True if that names another node than `conn`'s.
    fn follow_leader(&self, conn: &Connection, hint: Option<u64>) -> bool {
        let addr = hint.and_then(|id| {
            conn.hello
                .members
                .iter()
                .find(|m| m.id == id)
                .map(|m| m.client_addr.clone())
        });
        let mut redirected = false;
        if let Some(addr) = addr {
            if addr != conn.addr {
                tracing::debug!(leader = %addr, "following the leader hint");
                *lock(&self.inner.preferred) = Some(addr);
                redirected = true;
            }
        }
        self.retire(conn);
        redirected
    }

    /// Sends `request` under `policy`, retrying as the policy allows until the request
    /// timeout or the attempt limit.
    pub(crate) async fn execute(
        &self,
        mut request: Request,
        policy: Policy<'_>,
    ) -> Result<(Revision, Reply)> {
        let config = &self.inner.config;
        let deadline = Instant::now() + config.request_timeout;
        let mut delay = Duration::ZERO;
        let mut attempts = 0u32;
        let mut followed_hint = false;
        loop {
            attempts += 1;
            if let Policy::Session(s) = policy {
                s.ensure_alive()?;
                if let Request::Write {
                    session: Some(SessionSeq { floor, .. }),
                    ..
                }
                | Request::FencedWrite {
                    session: Some(SessionSeq { floor, .. }),
                    ..
                } = &mut request
                {
                    *floor = s.floor();
                }
            }
            let conn = self.connection(deadline).await?;
            let request_id = self.next_request_id();
            let msg = ClientMessage::Request {
                request_id,
                request: request.clone(),
            };
            let failure = match conn.call(request_id, msg, deadline).await {
                Ok(Answer::Response {
                    revision,
                    result: Ok(reply),
                }) => return Ok((revision, reply)),
                Ok(Answer::Response {
                    result: Err(e),
                    revision,
                }) => {
                    if !e.is_retryable() {
                        if let (Policy::Session(s), lockd_protocol::Error::SessionExpired { .. }) =
                            (policy, &e)
                        {
                            s.set_expired("the server answered SessionExpired");
                        }
                        return Err(Error::Server(e));
                    }
                    tracing::debug!(revision, "retryable error: {e}");
                    let redirected = match &e {
                        lockd_protocol::Error::NotLeader { leader_hint } => {
                            self.follow_leader(&conn, *leader_hint)
                        }
                        // A node shutting down, removed, or unable to serve: try another.
                        lockd_protocol::Error::ShuttingDown
                        | lockd_protocol::Error::Unavailable(_) => {
                            self.retire_and_rotate(&conn);
                            false
                        }
                        _ => false,
                    };
                    // A hint naming another node is news: follow it at once. Without one
                    // (no leader yet), back off.
                    // Only the first redirect goes at once: a hint that keeps naming the
                    // same unreachable node (a leader just killed) must not burn attempts.
                    delay = if redirected && !followed_hint {
                        followed_hint = true;
                        Duration::ZERO
                    } else if matches!(e, lockd_protocol::Error::NotLeader { .. }) {
                        // An election is under way: it takes about an election timeout, and
                        // a backoff grown to its cap would add up to that cap after it. These
                        // retries are bounded by the request's deadline, not by attempts
                        // (frequent as they are, they would use them up during an election),
                        // unless the client allows no retries at all.
                        if config.max_attempts > 1 {
                            attempts = attempts.saturating_sub(1);
                        }
                        config
                            .backoff
                            .next(delay)
                            .clamp(ELECTION_RETRY_MIN, ELECTION_RETRY_CAP)
                    } else {
                        config.backoff.next(delay)
                    };
                    Error::Server(e)
                }
                Ok(Answer::KeepAlive(_)) => {
                    return Err(Error::Protocol("keepalive reply to a request".to_string()))
                }
                Err(CallError::NotSent) => Error::ConnectionLost {
                    reason: conn.goodbye(),
                },
                Err(CallError::Lost(reason)) => {
                    if let Policy::Once = policy {
                        return Err(Error::Indeterminate(format!(
                            "connection to {} lost while a write without a session was in flight{}",
                            conn.addr,
                            reason.map(|r| format!(" ({r})")).unwrap_or_default()
                        )));
                    }
                    Error::ConnectionLost { reason }
                }
                Err(CallError::Rejected(e)) => return Err(Error::Invalid(e)),
                Err(CallError::Timeout) => {
                    // A node that accepts but never answers (paused, wedged) must not keep
                    // this client: the next request dials again.
                    self.retire(&conn);
                    return Err(Error::Timeout(config.request_timeout));
                }
            };
            drop(conn);
            if attempts >= config.max_attempts || Instant::now() >= deadline {
                return Err(failure);
            }
            if !delay.is_zero() {
                let wake = Instant::now() + Backoff::jittered(delay);
                if wake >= deadline {
                    return Err(failure);
                }
                tokio::time::sleep_until(wake).await;
            }
        }
    }
}

/// Answer of [`Client::cluster_status`].
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ClusterStatusResponse {
    /// The cluster as the answering node sees it.
    pub status: ClusterStatus,
    /// Revision the answer reflects.
    pub revision: Revision,
}

pub(crate) fn unexpected(what: &str, reply: &Reply) -> Error {
    Error::Protocol(format!("unexpected reply to {what}: {reply:?}"))
}
