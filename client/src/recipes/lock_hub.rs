//! The lock event hub of a session: one long-lived watch of the session's events that hands
//! grants and ended waits to waiting acquires and revocations to held guards, in-process
//! (see [`super::lock`] for the protocol). It keeps grants and revocations that arrive before
//! the acquire's answer until the acquire registers, and re-reads its locks after a gap.
//!
//! What this module must not do: decide anything the server did not say; a guard is lost
//! only on a revocation, the session's end, or its safe bound.

use std::collections::{BTreeSet, HashMap, VecDeque};
use std::sync::{Arc, Mutex, Weak};
use std::time::Duration;

use lockd_protocol::{EventKind, LockInfo, Revision, SessionId, WaitEndReason, WatchTarget};
use tokio::sync::{oneshot, Notify};
use tokio::time::Instant;
use tokio_util::sync::CancellationToken;

use crate::client::{lock, Client, WeakClient};
use crate::error::Result;
use crate::session::{Session, SessionShared, SessionStatus};
use crate::watch::{WatchItem, WatchStream};

/// How a wait ended.
#[derive(Debug)]
pub(super) enum WaitOutcome {
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
pub(super) struct Ticket {
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
pub(super) struct WaiterEntry<'a> {
    pub(super) hub: &'a LockHub,
    pub(super) acquire_id: u64,
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

    pub(super) fn ticket(self: &Arc<Self>) -> Ticket {
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
    pub(super) fn register_grant(
        &self,
        ticket: Ticket,
        token: u64,
        name: &str,
        lost: &CancellationToken,
    ) {
        let mut st = lock(&self.state);
        st.hold(token, name, lost);
        self.finish(st, ticket);
    }

    /// Registers a queued acquire: its outcome if already known, else a receiver of it.
    pub(super) fn register_waiter(
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

    pub(super) fn forget_grant(&self, token: u64) {
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
