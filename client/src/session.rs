//! Sessions: opening, exactly-once sequence numbers, keepalives, the safe bound and status.
//!
//! Every session of a client is renewed by one background task, which sends one
//! `KeepAlive` frame for all of them every third of the shortest TTL, to whichever node the
//! client is connected to. The task records the *send time* of the last keepalive answered
//! `Ok`; the session is known to live until its safe bound (DESIGN §3a.5):
//! `last answered send time + ttl − (ttl × drift_ppm / 10⁶ + tick)`.

use std::collections::{BTreeSet, HashMap};
use std::sync::{Arc, Mutex, OnceLock, Weak};
use std::time::Duration;

use lockd_protocol::{
    ClientMessage, KeepAliveResult, Request, Revision, SessionEventKind, SessionGrant, SessionId,
    SEQ_WINDOW,
};
use tokio::sync::{watch, Notify};
use tokio::time::Instant;

use crate::client::{lock, Client, Policy, WeakClient};
use crate::conn::{Answer, PushHandler};
use crate::error::{Error, Result};

/// What the client knows about a session's liveness.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum SessionStatus {
    /// Keepalives are being answered.
    Connected,
    /// A keepalive went unanswered: the session may still be alive (until
    /// [`Session::safe_until`]) but the client cannot confirm it.
    Jeopardy,
    /// A keepalive was answered again after jeopardy, before the safe bound passed. The next
    /// answered keepalive returns the status to `Connected`.
    Safe,
    /// The session has ended: the server said so, or the safe bound passed unconfirmed.
    /// Final.
    Expired,
}

/// The latest instant the session is known to live, given the send time of the last
/// keepalive (or open) the server answered `Ok`.
///
/// ```
/// use std::time::Duration;
/// use lockd_client::safe_bound;
/// let t = tokio::time::Instant::now();
/// // ttl 10 s, tick 100 ms, drift 1000 ppm: 10 s − (10 ms + 100 ms)
/// let bound = safe_bound(t, 10_000, 100, 1_000);
/// assert_eq!(bound - t, Duration::from_millis(9_890));
/// ```
pub fn safe_bound(last_ok_send: Instant, ttl_ms: u64, tick_ms: u64, drift_ppm: u64) -> Instant {
    let drift_ms = (u128::from(ttl_ms) * u128::from(drift_ppm)).div_ceil(1_000_000);
    let margin = u64::try_from(drift_ms)
        .unwrap_or(u64::MAX)
        .saturating_add(tick_ms);
    last_ok_send + Duration::from_millis(ttl_ms.saturating_sub(margin))
}

/// Sequence numbers of one session's writes (DESIGN §3a.7): they start at 1 and increase;
/// the floor is the lowest seq still without a response (or the next seq if none is in
/// flight); a seq is handed out only while it stays within the window above the floor.
#[derive(Debug)]
pub(crate) struct SeqTracker {
    next: u64,
    window: u64,
    in_flight: BTreeSet<u64>,
}

impl SeqTracker {
    pub(crate) fn new(window: u64) -> Self {
        SeqTracker {
            next: 1,
            window: window.max(1),
            in_flight: BTreeSet::new(),
        }
    }

    /// Lowest seq without a response.
    pub(crate) fn floor(&self) -> u64 {
        self.in_flight.first().copied().unwrap_or(self.next)
    }

    /// The next seq, or `None` if it would leave the window.
    pub(crate) fn try_acquire(&mut self) -> Option<u64> {
        if self.next - self.floor() >= self.window {
            return None;
        }
        let seq = self.next;
        self.next += 1;
        self.in_flight.insert(seq);
        Some(seq)
    }

    /// `seq` got its response (or was abandoned: the client will not resend it).
    pub(crate) fn finish(&mut self, seq: u64) {
        self.in_flight.remove(&seq);
    }
}

struct State {
    /// Send time of the last open/keepalive answered `Ok`.
    last_ok_send: Instant,
    ttl_ms: u64,
    seq: SeqTracker,
}

/// The shared part of a session, referenced by handles, the registry (weakly) and the
/// keepalive task.
pub(crate) struct SessionShared {
    grant: SessionGrant,
    revision: Revision,
    state: Mutex<State>,
    status: watch::Sender<SessionStatus>,
    seq_freed: Notify,
    /// Test hook: the keepalive task skips this session (a paused process).
    paused: std::sync::atomic::AtomicBool,
    /// The session's lock events, fanned out to its waiters and guards (started on the
    /// first acquire).
    lock_hub: OnceLock<Arc<crate::recipes::lock_hub::LockHub>>,
}

impl SessionShared {
    pub(crate) fn new(grant: SessionGrant, revision: Revision, sent: Instant) -> Self {
        SessionShared {
            grant,
            revision,
            state: Mutex::new(State {
                last_ok_send: sent,
                ttl_ms: grant.ttl_ms,
                seq: SeqTracker::new(SEQ_WINDOW),
            }),
            status: watch::Sender::new(SessionStatus::Connected),
            seq_freed: Notify::new(),
            paused: std::sync::atomic::AtomicBool::new(false),
            lock_hub: OnceLock::new(),
        }
    }

    pub(crate) fn id(&self) -> SessionId {
        self.grant.session
    }

    pub(crate) fn is_expired(&self) -> bool {
        *self.status.borrow() == SessionStatus::Expired
    }

    pub(crate) fn ensure_alive(&self) -> Result<()> {
        if self.is_expired() {
            Err(Error::SessionExpired(self.id()))
        } else {
            Ok(())
        }
    }

    pub(crate) fn floor(&self) -> u64 {
        lock(&self.state).seq.floor()
    }

    /// A receiver of status changes; its `changed()` fails once the session is dropped.
    pub(crate) fn subscribe_status(&self) -> watch::Receiver<SessionStatus> {
        self.status.subscribe()
    }

    pub(crate) fn safe_until(&self) -> Instant {
        let st = lock(&self.state);
        safe_bound(
            st.last_ok_send,
            st.ttl_ms,
            self.grant.tick_ms,
            self.grant.drift_ppm,
        )
    }

    pub(crate) fn set_expired(&self, why: &str) {
        let changed = self.status.send_if_modified(|s| {
            let was = *s;
            *s = SessionStatus::Expired;
            was != SessionStatus::Expired
        });
        if changed {
            tracing::info!(session = %self.id(), "session expired: {why}");
        }
        // Wake writers waiting for a seq so they fail fast.
        self.seq_freed.notify_waiters();
    }

    fn set_status(&self, next: SessionStatus) {
        self.status.send_if_modified(|s| {
            if *s == SessionStatus::Expired || *s == next {
                return false;
            }
            *s = next;
            true
        });
    }

    fn on_keepalive_ok(&self, sent: Instant, ttl_ms: u64) {
        {
            let mut st = lock(&self.state);
            if sent > st.last_ok_send {
                st.last_ok_send = sent;
            }
            st.ttl_ms = ttl_ms;
        }
        let next = match *self.status.borrow() {
            SessionStatus::Jeopardy => SessionStatus::Safe,
            _ => SessionStatus::Connected,
        };
        self.set_status(next);
    }

    fn on_keepalive_missed(&self) {
        self.set_status(SessionStatus::Jeopardy);
    }

    /// Expires the session if its safe bound has passed.
    fn check_bound(&self, now: Instant) {
        if !self.is_expired() && now >= self.safe_until() {
            self.set_expired("no keepalive answered before the safe bound");
        }
    }

    /// Waits for a seq within the window.
    async fn acquire_seq(&self) -> Result<u64> {
        loop {
            let freed = self.seq_freed.notified();
            self.ensure_alive()?;
            if let Some(seq) = lock(&self.state).seq.try_acquire() {
                return Ok(seq);
            }
            freed.await;
        }
    }

    fn finish_seq(&self, seq: u64) {
        lock(&self.state).seq.finish(seq);
        self.seq_freed.notify_waiters();
    }
}

/// A seq reserved for one write, released when dropped. Unlike [`SeqGuard`] it can outlive
/// the future that sent the write: whoever holds it may send the write again with the same
/// seq (the server answers a duplicate with the first result), e.g. to learn the outcome of
/// a write whose caller went away.
pub(crate) struct SeqLease {
    shared: Arc<SessionShared>,
    seq: u64,
}

impl Drop for SeqLease {
    fn drop(&mut self) {
        self.shared.finish_seq(self.seq);
    }
}

/// Releases a seq when its write ends in any way (answer, error, timeout or cancellation).
struct SeqGuard<'a> {
    session: &'a SessionShared,
    seq: u64,
}

impl Drop for SeqGuard<'_> {
    fn drop(&mut self) {
        self.session.finish_seq(self.seq);
    }
}

/// A session: owner of ephemeral nodes, unit of exactly-once writes. Clones share it;
/// keepalives continue while any clone exists (or it is the client's default session).
///
/// ```no_run
/// # async fn demo(client: lockd_client::Client) -> Result<(), lockd_client::Error> {
/// use std::time::Duration;
/// use lockd_client::SessionStatus;
/// let session = client.session(Duration::from_secs(10)).await?;
/// let created = session.create("/election/n-", b"me".to_vec()).ephemeral().sequential().await?;
/// println!("{} until {:?}", created.path, session.safe_until());
/// let mut status = session.watch_status();
/// while status.changed().await.is_ok() {
///     if *status.borrow() == SessionStatus::Expired { break; }
/// }
/// # Ok(()) }
/// ```
#[derive(Clone)]
pub struct Session {
    pub(crate) shared: Arc<SessionShared>,
    pub(crate) client: Client,
}

impl std::fmt::Debug for Session {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Session")
            .field("id", &self.id())
            .field("grant", &self.shared.grant)
            .field("status", &self.status())
            .finish()
    }
}

impl Session {
    pub(crate) fn from_parts(shared: Arc<SessionShared>, client: Client) -> Self {
        Session { shared, client }
    }

    /// The session id.
    pub fn id(&self) -> SessionId {
        self.shared.id()
    }

    /// The terms the server granted (effective TTL, tick, drift bound).
    pub fn grant(&self) -> SessionGrant {
        self.shared.grant
    }

    /// The revision of the entry that opened the session.
    pub fn revision(&self) -> Revision {
        self.shared.revision
    }

    /// The client this session belongs to.
    pub fn client(&self) -> &Client {
        &self.client
    }

    /// The current status.
    pub fn status(&self) -> SessionStatus {
        *self.shared.status.borrow()
    }

    /// A receiver of status changes. Short-lived states (`Safe`) may be skipped by a slow
    /// reader; `Expired` is final and never missed.
    pub fn watch_status(&self) -> watch::Receiver<SessionStatus> {
        self.shared.status.subscribe()
    }

    /// The latest instant the session is known to be alive, or `None` once expired.
    pub fn safe_until(&self) -> Option<Instant> {
        if self.shared.is_expired() {
            None
        } else {
            Some(self.shared.safe_until())
        }
    }

    /// Resolves when the session has expired (or was closed).
    pub async fn expired(&self) {
        let mut rx = self.watch_status();
        // The sender lives as long as `self`, so this only ends at Expired.
        let _ = rx.wait_for(|s| *s == SessionStatus::Expired).await;
    }

    /// Test hook simulating a paused process: while `paused`, the background task sends no
    /// keepalives for this session and does not check its bound (a guard's `lost()` still
    /// fires at the safe bound). Not for production use.
    #[doc(hidden)]
    pub fn pause_keepalives(&self, paused: bool) {
        self.shared
            .paused
            .store(paused, std::sync::atomic::Ordering::Relaxed);
        self.client.inner.registry.wake();
    }

    /// Closes the session: the server deletes its ephemeral nodes. The status becomes
    /// `Expired`. Closing an already ended session succeeds.
    pub async fn close(&self) -> Result<()> {
        let result = self
            .client
            .execute(
                Request::CloseSession { session: self.id() },
                Policy::Idempotent,
            )
            .await;
        match result {
            Ok(_) => {}
            Err(Error::Server(
                lockd_protocol::Error::SessionExpired { .. }
                | lockd_protocol::Error::UnknownSession { .. },
            )) => {}
            Err(e) => return Err(e),
        }
        self.shared.set_expired("closed");
        self.client.inner.registry.remove(self.id());
        Ok(())
    }

    /// The session's lock event hub, started on first use.
    pub(crate) fn lock_hub(&self) -> Arc<crate::recipes::lock_hub::LockHub> {
        self.shared
            .lock_hub
            .get_or_init(|| crate::recipes::lock_hub::LockHub::start(self))
            .clone()
    }

    /// Reserves the next seq (waiting while the window is full) for [`Session::write_leased`].
    pub(crate) async fn lease_seq(&self) -> Result<SeqLease> {
        let seq = self.shared.acquire_seq().await?;
        Ok(SeqLease {
            shared: self.shared.clone(),
            seq,
        })
    }

    /// Sends a write under this session with the leased seq; retried with the same seq after
    /// reconnects. Sending it again with the same lease is answered with the first result.
    pub(crate) async fn write_leased(
        &self,
        lease: &SeqLease,
        op: lockd_protocol::WriteOp,
    ) -> Result<(Revision, lockd_protocol::Reply)> {
        let shared = &*self.shared;
        debug_assert!(Arc::ptr_eq(&lease.shared, &self.shared));
        let request = Request::Write {
            session: Some(lockd_protocol::SessionSeq {
                session: shared.id(),
                seq: lease.seq,
                floor: shared.floor(),
            }),
            op,
        };
        self.client.execute(request, Policy::Session(shared)).await
    }

    /// Sends a write under this session with the next seq (waiting while the window is
    /// full); retried with the same seq after reconnects.
    pub(crate) async fn write(
        &self,
        op: lockd_protocol::WriteOp,
    ) -> Result<(Revision, lockd_protocol::Reply)> {
        self.write_fenced(op, None).await
    }

    /// Like [`Session::write`], sent as a `FencedWrite` when `fence` is given.
    pub(crate) async fn write_fenced(
        &self,
        op: lockd_protocol::WriteOp,
        fence: Option<lockd_protocol::Fence>,
    ) -> Result<(Revision, lockd_protocol::Reply)> {
        let shared = &*self.shared;
        let seq = shared.acquire_seq().await?;
        let _guard = SeqGuard {
            session: shared,
            seq,
        };
        let header = Some(lockd_protocol::SessionSeq {
            session: shared.id(),
            seq,
            floor: shared.floor(),
        });
        let request = match fence {
            None => Request::Write {
                session: header,
                op,
            },
            Some(fence) => Request::FencedWrite {
                session: header,
                op,
                fence,
            },
        };
        self.client.execute(request, Policy::Session(shared)).await
    }
}

/// The client's sessions, by id (weakly held), and the receiver of pushed session events.
#[derive(Default)]
pub(crate) struct Registry {
    sessions: Mutex<HashMap<SessionId, Weak<SessionShared>>>,
    wake: Notify,
}

impl Registry {
    pub(crate) fn insert(&self, s: &Arc<SessionShared>) {
        lock(&self.sessions).insert(s.id(), Arc::downgrade(s));
    }

    pub(crate) fn remove(&self, id: SessionId) {
        lock(&self.sessions).remove(&id);
    }

    pub(crate) fn wake(&self) {
        self.wake.notify_one();
    }

    fn get(&self, id: SessionId) -> Option<Arc<SessionShared>> {
        lock(&self.sessions).get(&id).and_then(Weak::upgrade)
    }

    /// Live sessions; forgets dropped and expired ones.
    fn live(&self) -> Vec<Arc<SessionShared>> {
        let mut map = lock(&self.sessions);
        let mut out = Vec::with_capacity(map.len());
        map.retain(|_, w| match w.upgrade() {
            Some(s) if !s.is_expired() => {
                if !s.paused.load(std::sync::atomic::Ordering::Relaxed) {
                    out.push(s);
                }
                true
            }
            _ => false,
        });
        out
    }
}

impl PushHandler for Registry {
    fn session_event(&self, session: SessionId, revision: Revision, event: SessionEventKind) {
        if let Some(s) = self.get(session) {
            let why = match event {
                SessionEventKind::Expired => format!("expired at revision {revision}"),
                SessionEventKind::Closed => format!("closed at revision {revision}"),
            };
            s.set_expired(&why);
        }
    }
}

/// Shortest and longest pause between keepalive rounds.
const MIN_INTERVAL: Duration = Duration::from_millis(10);
const MAX_INTERVAL: Duration = Duration::from_secs(10);

/// Interval between keepalives for sessions with the given shortest TTL.
pub(crate) fn keepalive_interval(min_ttl_ms: u64) -> Duration {
    (Duration::from_millis(min_ttl_ms) / 3).clamp(MIN_INTERVAL, MAX_INTERVAL)
}

/// One keepalive frame for `ids`, answered or failed by `deadline`.
async fn keepalive_round(
    client: &Client,
    ids: Vec<SessionId>,
    deadline: Instant,
) -> Result<Vec<(SessionId, KeepAliveResult)>> {
    let conn = client.connection(deadline).await?;
    let request_id = client.next_request_id();
    let msg = ClientMessage::KeepAlive {
        request_id,
        sessions: ids,
    };
    match conn.call(request_id, msg, deadline).await {
        Ok(Answer::KeepAlive(results)) => Ok(results),
        Err(crate::conn::CallError::Timeout) => {
            // Unanswered for a whole round: the node may be paused or cut off from its
            // leader. Dial again (another endpoint) for the next round.
            client.retire_and_rotate(&conn);
            Err(Error::Timeout(
                deadline.saturating_duration_since(Instant::now()),
            ))
        }
        Ok(other) => Err(Error::Protocol(format!(
            "unexpected answer to a keepalive: {other:?}"
        ))),
        Err(e) => Err(Error::ConnectionLost {
            reason: match e {
                crate::conn::CallError::Lost(r) => r,
                _ => None,
            },
        }),
    }
}

/// Renews every live session of a client until the client is dropped.
pub(crate) async fn keepalive_loop(client: WeakClient, registry: Arc<Registry>) {
    loop {
        let sessions = registry.live();
        if sessions.is_empty() {
            // Idle: wait for a new session, checking now and then whether the client is gone.
            let _ = tokio::time::timeout(Duration::from_secs(1), registry.wake.notified()).await;
            if client.upgrade().is_none() {
                return;
            }
            continue;
        }
        let min_ttl = sessions
            .iter()
            .map(|s| lock(&s.state).ttl_ms)
            .min()
            .unwrap_or(0);
        let interval = keepalive_interval(min_ttl);
        let sent = Instant::now();
        let earliest_bound = sessions.iter().map(|s| s.safe_until()).min();
        let mut round_deadline = sent + interval;
        if let Some(b) = earliest_bound {
            round_deadline = round_deadline.min(b).max(sent + MIN_INTERVAL);
        }
        let Some(strong) = client.upgrade() else {
            return;
        };
        let ids: Vec<SessionId> = sessions.iter().map(|s| s.id()).collect();
        // The round itself gives up at `round_deadline` (retiring a silent connection);
        // the outer bound only guards against a stuck dial.
        let result = tokio::time::timeout_at(
            round_deadline + MIN_INTERVAL,
            keepalive_round(&strong, ids, round_deadline),
        )
        .await;
        drop(strong);
        let answered = match result {
            Ok(Ok(results)) => {
                // By id, not by a scan per result: 100,000 sessions on one client made the
                // scan quadratic and the answers late enough for every session to expire.
                let by_id: std::collections::BTreeMap<SessionId, _> =
                    sessions.iter().map(|s| (s.id(), s)).collect();
                for (id, r) in results {
                    let Some(s) = by_id.get(&id) else {
                        continue;
                    };
                    match r {
                        KeepAliveResult::Ok { ttl_ms } => s.on_keepalive_ok(sent, ttl_ms),
                        KeepAliveResult::Expired => s.set_expired("keepalive answered Expired"),
                    }
                }
                true
            }
            Ok(Err(e)) => {
                tracing::debug!("keepalive failed: {e}");
                false
            }
            Err(_) => {
                tracing::debug!("keepalive unanswered");
                false
            }
        };
        if !answered {
            for s in &sessions {
                s.on_keepalive_missed();
            }
        }
        let now = Instant::now();
        for s in &sessions {
            s.check_bound(now);
        }
        // After a failure retry soon; otherwise wait for the next round, waking for any
        // safe bound that falls earlier.
        let next = if answered {
            sent + interval
        } else {
            now + (interval / 4).max(MIN_INTERVAL)
        };
        loop {
            let bound = sessions
                .iter()
                .filter(|s| !s.is_expired())
                .map(|s| s.safe_until())
                .min();
            let wake = bound.map_or(next, |b| b.min(next));
            tokio::time::sleep_until(wake).await;
            let now = Instant::now();
            for s in &sessions {
                s.check_bound(now);
            }
            if now >= next {
                break;
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn safe_bound_subtracts_drift_and_tick() {
        let t = Instant::now();
        assert_eq!(
            safe_bound(t, 10_000, 100, 0) - t,
            Duration::from_millis(9_900)
        );
        // drift rounds up: 1 ms of drift for 1 s at 1 ppm... ceil(1000 * 1 / 1e6) = 1
        assert_eq!(safe_bound(t, 1_000, 0, 1) - t, Duration::from_millis(999));
        assert_eq!(
            safe_bound(t, 10_000, 50, 500_000) - t,
            Duration::from_millis(4_950)
        );
        // never before the send time
        assert_eq!(safe_bound(t, 100, 200, 0), t);
        assert_eq!(safe_bound(t, u64::MAX / 2, 0, u64::MAX) - t, Duration::ZERO);
    }

    #[test]
    fn seq_floor_and_window() {
        let mut s = SeqTracker::new(3);
        assert_eq!(s.floor(), 1);
        assert_eq!(s.try_acquire(), Some(1));
        assert_eq!(s.try_acquire(), Some(2));
        assert_eq!(s.try_acquire(), Some(3));
        assert_eq!(s.floor(), 1);
        assert_eq!(s.try_acquire(), None, "window of 3 above floor 1 is full");
        s.finish(2);
        assert_eq!(s.floor(), 1, "floor waits for the lowest seq");
        assert_eq!(s.try_acquire(), None);
        s.finish(1);
        assert_eq!(s.floor(), 3);
        assert_eq!(s.try_acquire(), Some(4));
        assert_eq!(s.try_acquire(), Some(5));
        assert_eq!(s.try_acquire(), None);
        s.finish(3);
        s.finish(4);
        s.finish(5);
        assert_eq!(s.floor(), 6, "nothing in flight: floor is the next seq");
    }

    #[test]
    fn interval_is_a_third_of_the_ttl() {
        assert_eq!(keepalive_interval(9_000), Duration::from_secs(3));
        assert_eq!(keepalive_interval(1), MIN_INTERVAL);
        assert_eq!(keepalive_interval(u64::MAX / 2), MAX_INTERVAL);
    }

    #[tokio::test]
    async fn status_transitions() {
        let grant = SessionGrant {
            session: SessionId(7),
            ttl_ms: 1_000,
            tick_ms: 10,
            drift_ppm: 0,
        };
        let s = SessionShared::new(grant, 1, Instant::now());
        assert_eq!(*s.status.borrow(), SessionStatus::Connected);
        s.on_keepalive_missed();
        assert_eq!(*s.status.borrow(), SessionStatus::Jeopardy);
        s.on_keepalive_ok(Instant::now(), 1_000);
        assert_eq!(*s.status.borrow(), SessionStatus::Safe);
        s.on_keepalive_ok(Instant::now(), 1_000);
        assert_eq!(*s.status.borrow(), SessionStatus::Connected);
        s.check_bound(Instant::now() + Duration::from_secs(2));
        assert_eq!(*s.status.borrow(), SessionStatus::Expired);
        s.on_keepalive_ok(Instant::now(), 1_000);
        assert_eq!(*s.status.borrow(), SessionStatus::Expired, "final");
        assert!(matches!(s.ensure_alive(), Err(Error::SessionExpired(_))));
    }
}
