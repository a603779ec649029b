//! Exclusive locks: [`Client::lock`] acquires, [`LockGuard`] holds.
//!
//! An acquire is one exactly-once write through a session (`WriteOp::Acquire`). The server
//! answers `Granted { token }` (the token is the revision of the granting entry and the
//! acquire id) or `Queued { waiter_id }` (the acquire id); a queued acquire's grant arrives as
//! a `LockGranted` event on the session's event stream, which the client watches from
//! `waiter_id`, so the grant cannot be missed even across reconnects. If the acquiring future
//! is dropped or its timeout passes, the client sends `Cancel` (cancel-or-release: a grant
//! that raced the cancel is released). Dropping a [`LockGuard`] releases it in the
//! background; [`LockGuard::release`] releases and reports the outcome.

use std::future::{Future, IntoFuture};
use std::pin::Pin;
use std::time::Duration;

use lockd_protocol::{
    AcquireOp, CancelOp, Consistency, EventKind, Fence, LockInfo, LockResult, ReadOp, ReleaseOp,
    Reply, Request, Revision, WaitEndReason, WatchTarget, WriteOp, WriteResult,
};
use tokio::task::JoinHandle;
use tokio::time::Instant;
use tokio_util::sync::CancellationToken;

use crate::client::{unexpected, Client, Policy};
use crate::error::{Error, Result};
use crate::session::Session;
use crate::watch::{WatchItem, WatchStream};

/// How long after its own timeout the client stops waiting for the server's
/// `LockWaitEnded`, and cancels by itself.
const TIMEOUT_GRACE: Duration = Duration::from_millis(500);

type BoxFuture<'a, T> = Pin<Box<dyn Future<Output = Result<T>> + Send + 'a>>;

/// Builder of an acquire; see [`Client::lock`].
#[derive(Debug)]
#[must_use = "a builder does nothing until awaited"]
pub struct LockBuilder<'a> {
    client: &'a Client,
    session: Option<Session>,
    op: AcquireOp,
}

impl<'a> LockBuilder<'a> {
    /// Do not wait: fail with [`Error::NotAcquired`] if the lock is not free now.
    pub fn try_lock(mut self) -> Self {
        self.op.try_only = true;
        self
    }

    /// Stop waiting after `d`: then fail with [`Error::LockWaitEnded`] (`TimedOut`).
    pub fn timeout(mut self, d: Duration) -> Self {
        self.op.timeout_ms = Some(u64::try_from(d.as_millis()).unwrap_or(u64::MAX));
        self
    }

    /// Set the lock's lock-delay (at most 60 s): after a holder's session *expires*, nobody
    /// gets the lock before the delay has passed. A clean release hands over at once.
    pub fn lock_delay(mut self, d: Duration) -> Self {
        self.op.lock_delay_ms = Some(u64::try_from(d.as_millis()).unwrap_or(u64::MAX));
        self
    }

    /// A value stored with the grant (visible to [`Client::lock_info`] and lock watchers).
    pub fn value(mut self, value: impl Into<Vec<u8>>) -> Self {
        self.op.value = value.into();
        self
    }

    /// Acquire for `session` (default: the client's default session). The lock is held
    /// while the session lives.
    pub fn session(mut self, session: &Session) -> Self {
        self.session = Some(session.clone());
        self
    }
}

impl<'a> IntoFuture for LockBuilder<'a> {
    type Output = Result<LockGuard>;
    type IntoFuture = BoxFuture<'a, LockGuard>;

    fn into_future(self) -> Self::IntoFuture {
        Box::pin(async move {
            let session = match self.session {
                Some(s) => s,
                None => self.client.default_session().await?,
            };
            acquire(session, self.op).await
        })
    }
}

/// A lock's state as read from the server.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct LockInfoResponse {
    /// Holder, waiters, delay.
    pub info: LockInfo,
    /// Revision the answer reflects.
    pub revision: Revision,
}

impl Client {
    /// Acquires the exclusive lock `name`; await the builder for a [`LockGuard`].
    ///
    /// ```no_run
    /// # async fn demo(client: lockd_client::Client) -> Result<(), lockd_client::Error> {
    /// use std::time::Duration;
    /// let guard = client.lock("billing").timeout(Duration::from_secs(5)).await?;
    /// client.set("/billing/state", b"busy".to_vec()).fence(&guard).await?;
    /// guard.release().await?;
    /// # Ok(()) }
    /// ```
    pub fn lock(&self, name: impl Into<String>) -> LockBuilder<'_> {
        LockBuilder {
            client: self,
            session: None,
            op: AcquireOp {
                lock: name.into(),
                value: Vec::new(),
                try_only: false,
                timeout_ms: None,
                lock_delay_ms: None,
            },
        }
    }

    /// Reads one lock's holder, waiters and delay (linearizable).
    ///
    /// ```no_run
    /// # async fn demo(client: lockd_client::Client) -> Result<(), lockd_client::Error> {
    /// let info = client.lock_info("billing").await?.info;
    /// println!("held: {}", info.holder.is_some());
    /// # Ok(()) }
    /// ```
    pub async fn lock_info(&self, name: impl Into<String>) -> Result<LockInfoResponse> {
        let op = ReadOp::Lock { name: name.into() };
        match self.read(op).await? {
            (revision, Reply::Lock(info)) => Ok(LockInfoResponse { info, revision }),
            (_, other) => Err(unexpected("Lock", &other)),
        }
    }

    /// Lists every lock with a holder, waiters or a delay, in name order.
    ///
    /// ```no_run
    /// # async fn demo(client: lockd_client::Client) -> Result<(), lockd_client::Error> {
    /// for lock in client.locks().await? {
    ///     println!("{} ({} waiting)", lock.name, lock.waiters.len());
    /// }
    /// # Ok(()) }
    /// ```
    pub async fn locks(&self) -> Result<Vec<LockInfo>> {
        let mut out: Vec<LockInfo> = Vec::new();
        loop {
            let op = ReadOp::Locks {
                start_after: out.last().map(|l| l.name.clone()),
                limit: 0,
            };
            match self.read(op).await? {
                (_, Reply::Locks { locks, more }) => {
                    let progressed = !locks.is_empty();
                    out.extend(locks);
                    if !more {
                        return Ok(out);
                    }
                    if !progressed {
                        return Err(Error::Protocol("locks page empty but more = true".into()));
                    }
                }
                (_, other) => return Err(unexpected("Locks", &other)),
            }
        }
    }

    async fn read(&self, op: ReadOp) -> Result<(Revision, Reply)> {
        let request = Request::Read {
            consistency: Consistency::Linearizable,
            op,
        };
        self.execute(request, Policy::Idempotent).await
    }
}

/// Sends `Cancel` for an acquire whose caller went away before it completed.
struct Abandon {
    session: Session,
    lock: String,
    write: Option<JoinHandle<Result<(Revision, Reply)>>>,
    acquire_id: Option<u64>,
    armed: bool,
}

impl Drop for Abandon {
    fn drop(&mut self) {
        if !self.armed {
            return;
        }
        let Ok(rt) = tokio::runtime::Handle::try_current() else {
            return;
        };
        let session = self.session.clone();
        let lock = self.lock.clone();
        let write = self.write.take();
        let known = self.acquire_id;
        rt.spawn(async move {
            let acquire_id = match (known, write) {
                (Some(id), _) => Some(id),
                (None, Some(write)) => match write.await {
                    Ok(Ok((_, Reply::Write(WriteResult::Lock(r))))) => match r {
                        LockResult::Granted { token } => Some(token),
                        LockResult::Queued { waiter_id } => Some(waiter_id),
                        LockResult::NotAcquired => None,
                    },
                    _ => None,
                },
                (None, None) => None,
            };
            if let Some(acquire_id) = acquire_id {
                let op = WriteOp::Cancel(CancelOp {
                    lock: lock.clone(),
                    acquire_id,
                });
                if let Err(e) = session.write(op).await {
                    tracing::debug!(lock, acquire_id, "cancel of an abandoned acquire: {e}");
                }
            }
        });
    }
}

/// Acquires as described in the module docs.
pub(crate) async fn acquire(session: Session, op: AcquireOp) -> Result<LockGuard> {
    if op.lock.is_empty() {
        return Err(Error::Invalid(lockd_protocol::Error::InvalidArgument(
            "empty lock name".into(),
        )));
    }
    session.shared.ensure_alive()?;
    let name = op.lock.clone();
    let value = op.value.clone();
    let client_deadline = op
        .timeout_ms
        .map(|ms| Instant::now() + Duration::from_millis(ms) + TIMEOUT_GRACE);
    // The write runs in its own task so that an acquire the server applied is always
    // followed by a cancel, even if this future is dropped while the write is in flight.
    let write = tokio::spawn({
        let s = session.clone();
        async move { s.write(WriteOp::Acquire(op)).await }
    });
    let mut abandon = Abandon {
        session: session.clone(),
        lock: name.clone(),
        write: Some(write),
        acquire_id: None,
        armed: true,
    };
    let joined = match abandon.write.as_mut() {
        Some(w) => w.await,
        None => return Err(Error::Protocol("acquire task missing".into())),
    };
    abandon.write = None;
    let reply = match joined {
        Ok(Ok((_, reply))) => reply,
        Ok(Err(e)) => {
            abandon.armed = false;
            return Err(e);
        }
        Err(e) => {
            abandon.armed = false;
            return Err(Error::Protocol(format!("acquire task failed: {e}")));
        }
    };
    let result = match reply {
        Reply::Write(WriteResult::Lock(r)) => r,
        other => {
            abandon.armed = false;
            return Err(unexpected("Acquire", &other));
        }
    };
    match result {
        LockResult::Granted { token } => {
            abandon.armed = false;
            Ok(LockGuard::new(session, name, token, token, value, None))
        }
        LockResult::NotAcquired => {
            abandon.armed = false;
            Err(Error::NotAcquired { lock: name })
        }
        LockResult::Queued { waiter_id } => {
            abandon.acquire_id = Some(waiter_id);
            let waited = wait_for_grant(&session, &name, waiter_id, client_deadline).await;
            let (token, stream) = match waited {
                Ok(granted) => granted,
                Err(e) => {
                    // Nothing to cancel if the server ended the wait or the session is gone;
                    // otherwise (client-side timeout, watch failure) `abandon` cancels.
                    let client_timed_out = client_deadline.is_some_and(|d| Instant::now() >= d);
                    let server_ended =
                        matches!(e, Error::LockWaitEnded { .. }) && !client_timed_out;
                    abandon.armed = !(server_ended || e.is_session_expired());
                    return Err(e);
                }
            };
            abandon.armed = false;
            Ok(LockGuard::new(
                session, name, token, waiter_id, value, stream,
            ))
        }
    }
}

/// Waits for the grant of `waiter_id` on the session's event stream; answers its token and
/// the stream (kept by the guard to learn of a revocation).
async fn wait_for_grant(
    session: &Session,
    name: &str,
    waiter_id: u64,
    deadline: Option<Instant>,
) -> Result<(u64, Option<WatchStream>)> {
    let client = session.client();
    let timed_out = || Error::LockWaitEnded {
        lock: name.to_string(),
        reason: WaitEndReason::TimedOut,
    };
    let mut from = waiter_id;
    loop {
        let watch = client.watch(WatchTarget::Session(session.id())).from(from);
        let mut stream = tokio::select! {
            s = watch => s?,
            _ = session.expired() => return Err(Error::SessionExpired(session.id())),
            _ = sleep_until_opt(deadline) => return Err(timed_out()),
        };
        loop {
            let item = tokio::select! {
                item = stream.next() => item,
                _ = session.expired() => return Err(Error::SessionExpired(session.id())),
                _ = sleep_until_opt(deadline) => return Err(timed_out()),
            };
            match item {
                Some(Ok(WatchItem::Revision { events, .. })) => {
                    for event in events {
                        match event.kind {
                            EventKind::LockGranted {
                                lock,
                                token,
                                acquire_id,
                                ..
                            } if lock == name && acquire_id == waiter_id => {
                                return Ok((token, Some(stream)))
                            }
                            EventKind::LockWaitEnded {
                                lock,
                                acquire_id,
                                reason,
                                ..
                            } if lock == name && acquire_id == waiter_id => {
                                return Err(Error::LockWaitEnded { lock, reason })
                            }
                            EventKind::SessionEnded { .. } => {
                                return Err(Error::SessionExpired(session.id()))
                            }
                            _ => {}
                        }
                    }
                }
                Some(Ok(WatchItem::Progress(_))) => {}
                // A transient failure: the stream retries from its resume point.
                Some(Err(e))
                    if !matches!(e.wire(), Some(lockd_protocol::Error::Compacted { .. })) =>
                {
                    tracing::debug!(lock = name, "waiting for a grant: {e}");
                }
                // The history is gone: read the lock's state instead.
                Some(Err(_)) | None => break,
            }
        }
        let read = client.lock_info(name).await?;
        if let Some(holder) = read.info.holder.filter(|h| h.acquire_id == waiter_id) {
            return Ok((holder.token, None));
        }
        if !read.info.waiters.iter().any(|w| w.acquire_id == waiter_id) {
            return Err(Error::LockWaitEnded {
                lock: name.to_string(),
                reason: WaitEndReason::Cancelled,
            });
        }
        from = read.revision + 1;
    }
}

async fn sleep_until_opt(deadline: Option<Instant>) {
    match deadline {
        Some(d) => tokio::time::sleep_until(d).await,
        None => std::future::pending().await,
    }
}

/// A held lock. Dropping it releases the lock in the background; prefer
/// [`LockGuard::release`], which reports the outcome.
///
/// ```no_run
/// # async fn demo(client: lockd_client::Client) -> Result<(), lockd_client::Error> {
/// let guard = client.lock("reports").await?;
/// let cancel = guard.cancellation_token();
/// tokio::select! {
///     _ = guard.lost() => eprintln!("lock lost: stop writing"),
///     _ = do_work(guard.token(), cancel) => {}
/// }
/// guard.release().await?;
/// # Ok(()) }
/// # async fn do_work(_token: u64, _c: tokio_util::sync::CancellationToken) {}
/// ```
#[derive(Debug)]
pub struct LockGuard {
    session: Session,
    name: String,
    token: u64,
    acquire_id: u64,
    value: Vec<u8>,
    lost: CancellationToken,
    stop: CancellationToken,
    released: bool,
}

impl LockGuard {
    fn new(
        session: Session,
        name: String,
        token: u64,
        acquire_id: u64,
        value: Vec<u8>,
        stream: Option<WatchStream>,
    ) -> LockGuard {
        let lost = CancellationToken::new();
        let stop = CancellationToken::new();
        tokio::spawn(monitor(
            session.clone(),
            name.clone(),
            token,
            lost.clone(),
            stop.clone(),
            stream,
        ));
        LockGuard {
            session,
            name,
            token,
            acquire_id,
            value,
            lost,
            stop,
            released: false,
        }
    }

    /// The fencing token: the revision of the entry that granted the lock. Strictly
    /// increasing per lock; hand it to resources that should reject older holders.
    pub fn token(&self) -> u64 {
        self.token
    }

    /// The lock's name.
    pub fn name(&self) -> &str {
        &self.name
    }

    /// The acquire id (the revision of the acquire entry; equal to the token when the lock
    /// was free).
    pub fn acquire_id(&self) -> u64 {
        self.acquire_id
    }

    /// The value stored with the grant.
    pub fn value(&self) -> &[u8] {
        &self.value
    }

    /// The session holding the lock.
    pub fn session(&self) -> &Session {
        &self.session
    }

    /// The fence to attach to writes that must apply only while this grant holds the lock.
    pub fn fence(&self) -> Fence {
        Fence {
            lock: self.name.clone(),
            token: self.token,
        }
    }

    /// True once the lock is lost (or released).
    pub fn is_lost(&self) -> bool {
        self.lost.is_cancelled()
    }

    /// Resolves when the lock is lost: its grant was revoked, its session expired, or the
    /// session's safe bound passed without a confirming keepalive (whichever first). Also
    /// resolves when the guard is released or dropped.
    pub fn lost(&self) -> impl Future<Output = ()> + Send + 'static {
        self.lost.clone().cancelled_owned()
    }

    /// A token cancelled when [`LockGuard::lost`] resolves, for the work done under the
    /// lock. Cancelling it yourself does not affect the lock.
    pub fn cancellation_token(&self) -> CancellationToken {
        self.lost.child_token()
    }

    /// Releases the lock; the next waiter gets it in the same entry. Fails with
    /// `LockNotHeld` if the grant was already revoked.
    pub async fn release(mut self) -> Result<()> {
        self.released = true;
        self.stop.cancel();
        self.lost.cancel();
        let op = WriteOp::Release(ReleaseOp {
            lock: self.name.clone(),
            token: self.token,
        });
        match self.session.write(op).await? {
            (_, Reply::Write(WriteResult::Released)) => Ok(()),
            (_, other) => Err(unexpected("Release", &other)),
        }
    }
}

impl Drop for LockGuard {
    fn drop(&mut self) {
        self.stop.cancel();
        self.lost.cancel();
        if self.released || self.session.shared.is_expired() {
            return;
        }
        let Ok(rt) = tokio::runtime::Handle::try_current() else {
            return;
        };
        let session = self.session.clone();
        let op = WriteOp::Release(ReleaseOp {
            lock: self.name.clone(),
            token: self.token,
        });
        rt.spawn(async move {
            if let Err(e) = session.write(op).await {
                tracing::debug!("release of a dropped lock guard: {e}");
            }
        });
    }
}

/// Fires `lost` when the grant is revoked or released, the session expires, or its safe
/// bound passes, unless `stop` fires first.
async fn monitor(
    session: Session,
    name: String,
    token: u64,
    lost: CancellationToken,
    stop: CancellationToken,
    mut stream: Option<WatchStream>,
) {
    if stream.is_none() {
        // Watch the session's events from the grant on (in the background: the acquire has
        // returned already; nothing after the grant revision is missed).
        let watch = session
            .client()
            .watch(WatchTarget::Session(session.id()))
            .from(token);
        stream = tokio::select! {
            s = watch => s.map_err(|e| tracing::debug!(lock = name, "guard watch: {e}")).ok(),
            _ = stop.cancelled() => return,
        };
    }
    let mut status = session.watch_status();
    while let Some(bound) = session.safe_until() {
        if Instant::now() >= bound {
            tracing::info!(
                lock = name,
                token,
                "lock lost: the session's safe bound passed"
            );
            break;
        }
        tokio::select! {
            _ = stop.cancelled() => return,
            // Re-checked above: the bound moves forward with each answered keepalive.
            _ = tokio::time::sleep_until(bound) => {}
            changed = status.changed() => {
                if changed.is_err() {
                    break;
                }
            }
            item = next_item(&mut stream) => match item {
                Some(Ok(WatchItem::Revision { events, .. })) => {
                    if events.iter().any(|e| ends_grant(&e.kind, &name, token)) {
                        tracing::info!(lock = name, token, "lock lost: grant revoked");
                        break;
                    }
                }
                Some(Ok(WatchItem::Progress(_))) => {}
                Some(Err(e)) => tracing::debug!(lock = name, "guard watch: {e}"),
                None => stream = None,
            },
        }
    }
    lost.cancel();
}

fn ends_grant(kind: &EventKind, name: &str, token: u64) -> bool {
    match kind {
        EventKind::LockRevoked { lock, token: t, .. }
        | EventKind::LockReleased { lock, token: t, .. } => lock == name && *t == token,
        _ => false,
    }
}

async fn next_item(stream: &mut Option<WatchStream>) -> Option<Result<WatchItem>> {
    match stream {
        Some(s) => s.next().await,
        None => std::future::pending().await,
    }
}
