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

use std::collections::{BTreeSet, HashMap, VecDeque};
use std::future::{Future, IntoFuture};
use std::pin::Pin;
use std::sync::{Arc, Mutex, Weak};
use std::time::Duration;

use lockd_protocol::{
    AcquireOp, CancelOp, Consistency, EventKind, Fence, LockInfo, LockResult, ReadOp, ReleaseOp,
    Reply, Request, Revision, SessionId, WaitEndReason, WatchTarget, WriteOp, WriteResult,
};
use tokio::sync::{oneshot, Notify};
use tokio::time::Instant;
use tokio_util::sync::CancellationToken;

use crate::client::{lock, unexpected, Client, Policy, WeakClient};
use crate::error::{Error, Result};
use crate::session::{SeqLease, Session, SessionShared, SessionStatus};
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

/// How a wait ended.
#[derive(Debug)]
enum WaitOutcome {
    Granted(u64),
    Ended(WaitEndReason),
    SessionEnded,
    /// The client's own deadline (timeout + grace) passed first.
    ClientTimeout,
}

/// A queued acquire waiting for its grant.
struct Waiter {
    lock: String,
    /// The future guard's `lost` token, registered with the grant by the hub itself so that
    /// a revocation right after the grant cannot be missed.
    lost: CancellationToken,
    tx: oneshot::Sender<WaitOutcome>,
}

/// A grant whose guard wants to know when it ends.
struct Held {
    lock: String,
    lost: CancellationToken,
}

#[derive(Default)]
struct HubState {
    /// Every event of the session at or after this revision reaches the hub. Entries with
    /// a lower id (or token) are re-read from the server (`recheck`).
    covered_from: Revision,
    next_ticket: u64,
    /// Tickets of acquires whose answer has not been processed yet.
    in_flight: BTreeSet<u64>,
    /// Events nobody claimed yet, tagged with `next_ticket` at arrival: only acquires with a
    /// lower ticket can claim them, so they are dropped once those are all done.
    unclaimed: VecDeque<(u64, EventKind)>,
    /// Queued acquires, by acquire id.
    waiters: HashMap<u64, Waiter>,
    /// Live grants, by token.
    held: HashMap<u64, Held>,
    /// Entries below `covered_from` must be re-read.
    recheck: bool,
    /// The hub's timer is set to the session's safe bound.
    timer_armed: bool,
    /// The session has ended: nothing will be granted or kept.
    ended: bool,
}

fn ends_grant(kind: &EventKind, token: u64) -> bool {
    matches!(
        kind,
        EventKind::LockRevoked { token: t, .. } | EventKind::LockReleased { token: t, .. }
            if *t == token
    )
}

impl HubState {
    fn end_ticket(&mut self, ticket: u64) {
        self.in_flight.remove(&ticket);
        match self.in_flight.first() {
            None => self.unclaimed.clear(),
            Some(&min) => {
                while self.unclaimed.front().is_some_and(|(tag, _)| *tag <= min) {
                    self.unclaimed.pop_front();
                }
            }
        }
    }

    fn stash(&mut self, kind: EventKind) {
        if !self.in_flight.is_empty() {
            self.unclaimed.push_back((self.next_ticket, kind));
        }
    }

    fn take_unclaimed(&mut self, want: impl Fn(&EventKind) -> bool) -> Option<EventKind> {
        let i = self.unclaimed.iter().position(|(_, k)| want(k))?;
        self.unclaimed.remove(i).map(|(_, k)| k)
    }

    /// Registers the grant `token`, unless it has ended already (then `lost` fires).
    fn hold(&mut self, token: u64, lock: &str, lost: &CancellationToken) {
        if self.ended || self.unclaimed.iter().any(|(_, k)| ends_grant(k, token)) {
            lost.cancel();
            return;
        }
        if token < self.covered_from {
            self.recheck = true;
        }
        self.held.insert(
            token,
            Held {
                lock: lock.to_string(),
                lost: lost.clone(),
            },
        );
    }

    /// Hands one event of the session to whoever waits for it. True at the session's end.
    fn dispatch(&mut self, kind: EventKind) -> bool {
        match kind {
            EventKind::LockGranted {
                token, acquire_id, ..
            } if self.waiters.contains_key(&acquire_id) => {
                if let Some(w) = self.waiters.remove(&acquire_id) {
                    self.held.insert(
                        token,
                        Held {
                            lock: w.lock,
                            lost: w.lost,
                        },
                    );
                    if w.tx.send(WaitOutcome::Granted(token)).is_err() {
                        // The waiter is gone: its cancel releases the grant.
                        self.held.remove(&token);
                    }
                }
            }
            EventKind::LockWaitEnded {
                acquire_id, reason, ..
            } if self.waiters.contains_key(&acquire_id) => {
                if let Some(w) = self.waiters.remove(&acquire_id) {
                    let _ = w.tx.send(WaitOutcome::Ended(reason));
                }
            }
            EventKind::LockReleased { token, .. } | EventKind::LockRevoked { token, .. }
                if self.held.contains_key(&token) =>
            {
                if let Some(h) = self.held.remove(&token) {
                    tracing::info!(lock = h.lock, token, "lock lost: grant ended");
                    h.lost.cancel();
                }
            }
            EventKind::SessionEnded { .. } => return true,
            other => self.stash(other),
        }
        false
    }

    fn lose_held(&mut self, why: &str) {
        for (token, h) in self.held.drain() {
            tracing::info!(lock = h.lock, token, "lock lost: {why}");
            h.lost.cancel();
        }
    }

    fn end(&mut self) {
        self.ended = true;
        for (_, w) in self.waiters.drain() {
            let _ = w.tx.send(WaitOutcome::SessionEnded);
        }
        self.lose_held("the session ended");
        self.unclaimed.clear();
    }
}

/// One session's lock events, fanned out in-process to its waiters and guards. See the
/// module docs.
pub(crate) struct LockHub {
    state: Mutex<HubState>,
    /// Wakes the hub's task (a guard to time, entries to re-read).
    wake: Notify,
}

impl std::fmt::Debug for LockHub {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let st = lock(&self.state);
        f.debug_struct("LockHub")
            .field("covered_from", &st.covered_from)
            .field("waiters", &st.waiters.len())
            .field("held", &st.held.len())
            .finish_non_exhaustive()
    }
}

/// An acquire in flight; ends when its answer is registered or when dropped.
struct Ticket {
    hub: Arc<LockHub>,
    id: u64,
    ended: bool,
}

impl Drop for Ticket {
    fn drop(&mut self) {
        if !self.ended {
            lock(&self.hub.state).end_ticket(self.id);
        }
    }
}

/// Removes a waiter that stops waiting.
struct WaiterEntry<'a> {
    hub: &'a LockHub,
    acquire_id: u64,
}

impl Drop for WaiterEntry<'_> {
    fn drop(&mut self) {
        lock(&self.hub.state).waiters.remove(&self.acquire_id);
    }
}

impl LockHub {
    /// Creates the hub of `session` and starts its task, which watches the session's events
    /// from its opening revision on.
    pub(crate) fn start(session: &Session) -> Arc<LockHub> {
        let from = session.revision();
        let hub = Arc::new(LockHub {
            state: Mutex::new(HubState {
                covered_from: from,
                ..HubState::default()
            }),
            wake: Notify::new(),
        });
        tokio::spawn(run_hub(
            hub.clone(),
            Arc::downgrade(&session.shared),
            session.client().downgrade(),
            session.id(),
            from,
            session.shared.subscribe_status(),
        ));
        hub
    }

    fn ticket(self: &Arc<Self>) -> Ticket {
        let mut st = lock(&self.state);
        let id = st.next_ticket;
        st.next_ticket += 1;
        st.in_flight.insert(id);
        Ticket {
            hub: self.clone(),
            id,
            ended: false,
        }
    }

    /// Ends `ticket` under the held state lock, then wakes the task if it has work.
    fn finish(&self, mut st: std::sync::MutexGuard<'_, HubState>, mut ticket: Ticket) {
        st.end_ticket(ticket.id);
        ticket.ended = true;
        let wake = st.recheck || !st.timer_armed;
        drop(st);
        if wake {
            self.wake.notify_one();
        }
    }

    /// Registers an immediate grant (its `lost` fires at once if it has ended already).
    fn register_grant(&self, ticket: Ticket, token: u64, name: &str, lost: &CancellationToken) {
        let mut st = lock(&self.state);
        st.hold(token, name, lost);
        self.finish(st, ticket);
    }

    /// Registers a queued acquire: its outcome if already known, else a receiver of it.
    fn register_waiter(
        &self,
        ticket: Ticket,
        acquire_id: u64,
        name: &str,
        lost: &CancellationToken,
    ) -> std::result::Result<WaitOutcome, oneshot::Receiver<WaitOutcome>> {
        let mut st = lock(&self.state);
        let granted = st.take_unclaimed(
            |k| matches!(k, EventKind::LockGranted { acquire_id: a, .. } if *a == acquire_id),
        );
        let outcome = if let Some(EventKind::LockGranted { token, .. }) = granted {
            st.hold(token, name, lost);
            Ok(WaitOutcome::Granted(token))
        } else if let Some(EventKind::LockWaitEnded { reason, .. }) = st.take_unclaimed(
            |k| matches!(k, EventKind::LockWaitEnded { acquire_id: a, .. } if *a == acquire_id),
        ) {
            Ok(WaitOutcome::Ended(reason))
        } else if st.ended {
            Ok(WaitOutcome::SessionEnded)
        } else {
            let (tx, rx) = oneshot::channel();
            if acquire_id < st.covered_from {
                st.recheck = true;
            }
            st.waiters.insert(
                acquire_id,
                Waiter {
                    lock: name.to_string(),
                    lost: lost.clone(),
                    tx,
                },
            );
            Err(rx)
        };
        self.finish(st, ticket);
        outcome
    }

    fn forget_grant(&self, token: u64) {
        lock(&self.state).held.remove(&token);
    }
}

/// What the hub's event source produced.
enum Feed {
    Item(Option<Result<WatchItem>>),
    Opened(Result<WatchStream>),
    /// The client is gone.
    Gone,
}

async fn open_stream(
    client: &WeakClient,
    id: SessionId,
    from: Option<Revision>,
) -> Option<Result<WatchStream>> {
    let client = client.upgrade()?;
    let mut watch = client.watch(WatchTarget::Session(id));
    if let Some(from) = from {
        watch = watch.from(from);
    }
    Some(watch.await.map(|mut stream| {
        // The client owns the session that owns this task: do not keep it alive.
        stream.downgrade_client();
        stream
    }))
}

/// The hub's task: follows the session's events, fires guards at the safe bound, ends with
/// the session (or when the session handle is dropped).
async fn run_hub(
    hub: Arc<LockHub>,
    session: Weak<SessionShared>,
    client: WeakClient,
    id: SessionId,
    from: Revision,
    mut status: tokio::sync::watch::Receiver<SessionStatus>,
) {
    let mut stream: Option<WatchStream> = None;
    let mut open_from = Some(from);
    let mut failures = 0u32;
    let mut recheck_after = Instant::now();
    let timer = tokio::time::sleep_until(Instant::now());
    tokio::pin!(timer);
    'run: loop {
        let is_open = stream.is_some();
        let fed = {
            // Kept across the housekeeping below: an open or a read in progress is never
            // dropped half-way.
            let feed = async {
                match stream.as_mut() {
                    Some(s) => Feed::Item(s.next().await),
                    None => {
                        if failures > 0 {
                            let pause = Duration::from_millis(20 << failures.min(6));
                            tokio::time::sleep(pause).await;
                        }
                        match open_stream(&client, id, open_from).await {
                            Some(opened) => Feed::Opened(opened),
                            None => Feed::Gone,
                        }
                    }
                }
            };
            tokio::pin!(feed);
            loop {
                let bound = {
                    let Some(shared) = session.upgrade() else {
                        break 'run;
                    };
                    if shared.is_expired() {
                        break 'run;
                    }
                    shared.safe_until()
                };
                let now = Instant::now();
                let armed = now < bound;
                let recheck = {
                    let mut st = lock(&hub.state);
                    if !armed {
                        st.lose_held("the session's safe bound passed");
                    }
                    st.timer_armed = armed;
                    let due = is_open && st.recheck && now >= recheck_after;
                    if due {
                        st.recheck = false;
                    }
                    due
                };
                if recheck {
                    let done = match client.upgrade() {
                        Some(c) => recheck_entries(&hub, &c).await,
                        None => break 'run,
                    };
                    if !done {
                        lock(&hub.state).recheck = true;
                        recheck_after = Instant::now() + Duration::from_millis(100);
                    }
                    continue;
                }
                if armed && timer.deadline() != bound {
                    timer.as_mut().reset(bound);
                }
                let retry = is_open && lock(&hub.state).recheck;
                tokio::select! {
                    biased;
                    changed = status.changed() => {
                        if changed.is_err() {
                            break 'run;
                        }
                    }
                    _ = hub.wake.notified() => {}
                    _ = &mut timer, if armed => {}
                    _ = tokio::time::sleep_until(recheck_after), if retry => {}
                    fed = &mut feed => break fed,
                }
            }
        };
        match fed {
            Feed::Gone => break,
            Feed::Opened(Ok(s)) => {
                failures = 0;
                let mut st = lock(&hub.state);
                let start = s.start_revision();
                if start > st.covered_from {
                    // A gap: whatever waits or holds from before may have missed events.
                    st.covered_from = start;
                    st.recheck = true;
                }
                drop(st);
                stream = Some(s);
            }
            Feed::Opened(Err(e)) => match e.wire() {
                Some(lockd_protocol::Error::Compacted { oldest }) => open_from = Some(*oldest),
                _ => {
                    tracing::debug!(session = %id, "lock events: opening the watch: {e}");
                    failures += 1;
                }
            },
            Feed::Item(Some(Ok(WatchItem::Revision { events, .. }))) => {
                let mut st = lock(&hub.state);
                let mut ended = false;
                for event in events {
                    ended |= st.dispatch(event.kind);
                }
                drop(st);
                if ended {
                    if let Some(shared) = session.upgrade() {
                        shared.set_expired("the session ended (lock event stream)");
                    }
                    break;
                }
            }
            Feed::Item(Some(Ok(WatchItem::Progress(_)))) => {}
            // Transient: the stream resumes by itself; a fatal error ends it next.
            Feed::Item(Some(Err(e))) => tracing::debug!(session = %id, "lock events: {e}"),
            Feed::Item(None) => {
                // The history is gone (or the stream failed for good): watch from now on and
                // re-read what is waiting or held.
                stream = None;
                open_from = None;
            }
        }
    }
    lock(&hub.state).end();
}

/// Re-reads the locks of waiters and guards the hub may have missed events of (their id is
/// below `covered_from`). False if a read failed (tried again later).
async fn recheck_entries(hub: &LockHub, client: &Client) -> bool {
    let (waiters, held, names) = {
        let st = lock(&hub.state);
        let covered = st.covered_from;
        let waiters: Vec<u64> = st
            .waiters
            .keys()
            .copied()
            .filter(|id| *id < covered)
            .collect();
        let held: Vec<u64> = st.held.keys().copied().filter(|t| *t < covered).collect();
        let names: BTreeSet<String> = waiters
            .iter()
            .filter_map(|id| st.waiters.get(id).map(|w| w.lock.clone()))
            .chain(
                held.iter()
                    .filter_map(|t| st.held.get(t).map(|h| h.lock.clone())),
            )
            .collect();
        (waiters, held, names)
    };
    let mut infos: HashMap<String, LockInfo> = HashMap::new();
    for name in names {
        match client.lock_info(name.clone()).await {
            Ok(read) => {
                infos.insert(name, read.info);
            }
            Err(e) => {
                tracing::debug!(lock = name, "lock events: re-reading the lock: {e}");
                return false;
            }
        }
    }
    let mut st = lock(&hub.state);
    for id in waiters {
        let Some(info) = st.waiters.get(&id).and_then(|w| infos.get(&w.lock)) else {
            continue;
        };
        let holder = info
            .holder
            .as_ref()
            .filter(|h| h.acquire_id == id)
            .map(|h| h.token);
        let waiting = info.waiters.iter().any(|w| w.acquire_id == id);
        if holder.is_none() && waiting {
            continue;
        }
        let Some(w) = st.waiters.remove(&id) else {
            continue;
        };
        match holder {
            Some(token) => {
                st.held.insert(
                    token,
                    Held {
                        lock: w.lock,
                        lost: w.lost,
                    },
                );
                if w.tx.send(WaitOutcome::Granted(token)).is_err() {
                    st.held.remove(&token);
                }
            }
            None => {
                let _ = w.tx.send(WaitOutcome::Ended(WaitEndReason::Cancelled));
            }
        }
    }
    for token in held {
        let Some(info) = st.held.get(&token).and_then(|h| infos.get(&h.lock)) else {
            continue;
        };
        if info.holder.as_ref().is_some_and(|h| h.token == token) {
            continue;
        }
        if let Some(h) = st.held.remove(&token) {
            tracing::info!(lock = h.lock, token, "lock lost: grant ended");
            h.lost.cancel();
        }
    }
    true
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
