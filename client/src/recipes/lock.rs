//! Exclusive locks: [`Client::lock`] acquires, [`LockGuard`] holds.
//!
//! An acquire is one exactly-once write through a session (`WriteOp::Acquire`). The server
//! answers `Granted { token }` (the token is the revision of the granting entry and the
//! acquire id) or `Queued { waiter_id }` (the acquire id); a queued acquire's grant arrives as
//! a `LockGranted` event on the session's event stream. If the acquiring future is dropped or
//! its timeout passes, the client sends `Cancel` (cancel-or-release: a grant that raced the
//! cancel is released). Dropping a [`LockGuard`] releases it in the background;
//! [`LockGuard::release`] releases and reports the outcome.
//!
//! Each session has one lock event hub: a single long-lived watch of the session's events
//! (`WatchTarget::Session`), opened on the session's first acquire from the session's opening
//! revision (so it covers every acquire the session ever makes) and resumed by the watch
//! machinery across reconnects and `Lagged`. The hub hands grants and ended waits to the
//! waiting acquires, and revocations to the guards, in-process; it also fires the guards'
//! `lost()` at the session's safe bound and at its end. A grant or revocation that reaches
//! the hub before the acquire's answer has been processed is kept (while any acquire of the
//! session is in flight) and claimed when the acquire registers, so nothing is missed. If
//! the hub's stream has a gap (`Compacted`), the hub re-reads the locks of its waiters and
//! guards once the watch is open again.

use std::future::{Future, IntoFuture};
use std::pin::Pin;
use std::sync::Arc;
use std::time::Duration;

use lockd_protocol::{
    AcquireOp, CancelOp, Consistency, Fence, LockInfo, LockResult, ReadOp, ReleaseOp, Reply,
    Request, Revision, WaitEndReason, WriteOp, WriteResult,
};
use tokio::time::Instant;
use tokio_util::sync::CancellationToken;

use crate::client::{unexpected, Client, Policy};
use crate::error::{Error, Result};
use crate::session::{SeqLease, Session};

use super::lock_hub::{LockHub, WaitOutcome, WaiterEntry};

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

/// Sends `Cancel` for an acquire whose caller went away before it completed. Costs nothing
/// unless actually abandoned: only then is a task spawned.
struct Abandon {
    session: Session,
    lock: String,
    /// The acquire write in flight and the seq it was sent with: if the caller goes away
    /// before the answer, the write is sent again under the same seq (the server answers a
    /// duplicate with the first result) to learn the acquire id, then cancelled.
    write: Option<(AcquireOp, SeqLease)>,
    /// The acquire id once known (queued, not yet granted).
    acquired: Option<u64>,
}

impl Abandon {
    async fn send(&self) -> Result<(Revision, Reply)> {
        match &self.write {
            Some((op, lease)) => {
                self.session
                    .write_leased(lease, WriteOp::Acquire(op.clone()))
                    .await
            }
            None => Err(Error::Protocol("acquire write missing".into())),
        }
    }
}

impl Drop for Abandon {
    fn drop(&mut self) {
        let write = self.write.take();
        let known = self.acquired.take();
        if write.is_none() && known.is_none() {
            return;
        }
        let Ok(rt) = tokio::runtime::Handle::try_current() else {
            return;
        };
        let session = self.session.clone();
        let lock = self.lock.clone();
        rt.spawn(async move {
            let acquire_id = match (known, write) {
                (Some(id), _) => Some(id),
                (None, Some((op, lease))) => {
                    let answer = session.write_leased(&lease, WriteOp::Acquire(op)).await;
                    drop(lease);
                    match answer {
                        Ok((_, Reply::Write(WriteResult::Lock(r)))) => match r {
                            LockResult::Granted { token } => Some(token),
                            LockResult::Queued { waiter_id } => Some(waiter_id),
                            LockResult::NotAcquired => None,
                        },
                        _ => None,
                    }
                }
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
    let hub = session.lock_hub();
    let name = op.lock.clone();
    let value = op.value.clone();
    let client_deadline = op
        .timeout_ms
        .map(|ms| Instant::now() + Duration::from_millis(ms) + TIMEOUT_GRACE);
    // Taken before the write is sent: events of this acquire that reach the hub before its
    // answer is processed are kept for it.
    let ticket = hub.ticket();
    let lease = session.lease_seq().await?;
    let mut abandon = Abandon {
        session: session.clone(),
        lock: name.clone(),
        write: Some((op, lease)),
        acquired: None,
    };
    let written = abandon.send().await;
    // Answered (or failed for good): the seq is done.
    abandon.write = None;
    let result = match written? {
        (_, Reply::Write(WriteResult::Lock(r))) => r,
        (_, other) => return Err(unexpected("Acquire", &other)),
    };
    match result {
        LockResult::Granted { token } => {
            let lost = CancellationToken::new();
            hub.register_grant(ticket, token, &name, &lost);
            Ok(LockGuard::new(
                session, hub, name, token, token, value, lost,
            ))
        }
        LockResult::NotAcquired => Err(Error::NotAcquired { lock: name }),
        LockResult::Queued { waiter_id } => {
            abandon.acquired = Some(waiter_id);
            let lost = CancellationToken::new();
            let outcome = match hub.register_waiter(ticket, waiter_id, &name, &lost) {
                Ok(outcome) => outcome,
                Err(rx) => {
                    let _entry = WaiterEntry {
                        hub: &hub,
                        acquire_id: waiter_id,
                    };
                    tokio::select! {
                        outcome = rx => outcome.unwrap_or(WaitOutcome::SessionEnded),
                        _ = session.expired() => WaitOutcome::SessionEnded,
                        _ = sleep_until_opt(client_deadline) => WaitOutcome::ClientTimeout,
                    }
                }
            };
            match outcome {
                WaitOutcome::Granted(token) => {
                    abandon.acquired = None;
                    Ok(LockGuard::new(
                        session, hub, name, token, waiter_id, value, lost,
                    ))
                }
                WaitOutcome::Ended(reason) => {
                    // Nothing to cancel: the server ended the wait (unless the client's own
                    // deadline passed meanwhile: then cancel anyway, to be sure).
                    let client_timed_out = client_deadline.is_some_and(|d| Instant::now() >= d);
                    if !client_timed_out {
                        abandon.acquired = None;
                    }
                    Err(Error::LockWaitEnded { lock: name, reason })
                }
                WaitOutcome::SessionEnded => {
                    abandon.acquired = None;
                    Err(Error::SessionExpired(session.id()))
                }
                // `abandon` cancels (or releases a grant that raced the deadline).
                WaitOutcome::ClientTimeout => Err(Error::LockWaitEnded {
                    lock: name,
                    reason: WaitEndReason::TimedOut,
                }),
            }
        }
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
    hub: Arc<LockHub>,
    name: String,
    token: u64,
    acquire_id: u64,
    value: Vec<u8>,
    lost: CancellationToken,
    released: bool,
}

impl LockGuard {
    /// A guard for a grant registered with `hub` under `lost`.
    fn new(
        session: Session,
        hub: Arc<LockHub>,
        name: String,
        token: u64,
        acquire_id: u64,
        value: Vec<u8>,
        lost: CancellationToken,
    ) -> LockGuard {
        if session.safe_until().is_none_or(|b| Instant::now() >= b) {
            tracing::info!(
                lock = name,
                token,
                "lock lost: the session's safe bound passed"
            );
            lost.cancel();
        }
        LockGuard {
            session,
            hub,
            name,
            token,
            acquire_id,
            value,
            lost,
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
        self.hub.forget_grant(self.token);
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
        self.lost.cancel();
        self.hub.forget_grant(self.token);
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
