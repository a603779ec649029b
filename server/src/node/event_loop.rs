//! The node's event loop: one thread that owns the log's tail, the session deadlines and the
//! group commit.
//!
//! Each cycle takes every message waiting (up to `max_batch` proposals), advances the tick,
//! proposes expiry of sessions past their deadline, numbers the proposals as log entries of
//! the current term, and commits them with `Storage::commit_batch`: append + apply + applied
//! index in one transaction and one fsync. Only then are proposers answered (DESIGN §3a.1),
//! and keepalives for sessions that just expired are answered `Expired` only after the
//! expiry entry applied (§3a.4). A storage failure stops the loop: after a failed fsync the
//! node cannot know what is durable, so it fails stop rather than answer wrongly.
//!
//! With one voter, "replicate and commit" is "append to my own log and commit"; the Raft core
//! replaces exactly that step.

use std::collections::BTreeMap;
use std::sync::mpsc::{Receiver, RecvTimeoutError};
use std::sync::Arc;
use std::time::{Duration, Instant};

use lockd_protocol::{Error, KeepAliveResult, SessionEventKind, SessionId};
use tokio::sync::{broadcast, oneshot};

use super::deadlines::Deadlines;
use super::watch::Published;
use super::NodeStatus;
use crate::config::Config;
use crate::fsm::{Applied, Command, LockTimer};
use crate::raft::{Entry, EntryKind};
use crate::storage::{Batch, HardState, Storage, StorageError};

/// Where a proposal's outcome goes.
type ProposalReply = oneshot::Sender<Result<Applied, Error>>;
/// One result per session of a keepalive frame.
type KeepAliveResults = Vec<(SessionId, KeepAliveResult)>;
/// Where a keepalive's results go.
type KeepAliveReply = oneshot::Sender<KeepAliveResults>;

/// Messages to the event loop.
#[derive(Debug)]
pub enum LoopMsg {
    /// Append, commit and apply a command; answer with its outcome.
    Propose {
        command: Command,
        reply: ProposalReply,
    },
    /// Renew sessions; answer one result per session.
    KeepAlive {
        sessions: Vec<SessionId>,
        reply: KeepAliveReply,
    },
    /// An implicit session's connection closed: let it expire if the close is lost.
    Unpin { session: SessionId },
    /// Commit what is queued, then stop.
    Shutdown,
}

/// A session that ended, as broadcast to connections.
#[derive(Debug, Clone, Copy)]
pub struct SessionEnded {
    pub session: SessionId,
    pub revision: u64,
    pub kind: SessionEventKind,
}

/// State owned by the loop thread.
pub struct EventLoop {
    config: Config,
    storage: Storage,
    status: std::sync::Arc<NodeStatus>,
    events: broadcast::Sender<SessionEnded>,
    /// Where each commit's watch events are published (after the commit).
    watch_events: broadcast::Sender<Arc<Published>>,
    deadlines: Deadlines,
    /// Lock deadlines by entry time (ms) at which an entry must be proposed.
    lock_timers: BTreeMap<u64, Vec<LockTimer>>,
    /// Entry time at which this node became leader: lock-delays end only after a full delay
    /// of leadership (DESIGN §3a.12).
    leader_since_ms: u64,
    /// Current term; this node is its leader.
    term: u64,
    /// The hard state last made durable.
    persisted: Option<HardState>,
    /// Index of the last entry in the log (all of it committed and applied).
    last_index: u64,
    /// Entry time: `time_base_ms` + monotonic time since `clock_base`.
    time_base_ms: u64,
    clock_base: Instant,
    /// Proposals of this cycle with their repliers (None for the loop's own).
    pending: Vec<(EntryKind, Option<ProposalReply>)>,
    /// Keepalive answers of this cycle, sent after its commit.
    keepalive_replies: Vec<(KeepAliveReply, KeepAliveResults)>,
}

impl std::fmt::Debug for EventLoop {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("EventLoop")
            .field("term", &self.term)
            .field("last_index", &self.last_index)
            .finish()
    }
}

impl EventLoop {
    /// Recovers from storage, starts a new term and commits its no-op entry, and restarts
    /// every session's deadline with a full TTL.
    pub fn start(
        config: Config,
        storage: Storage,
        status: std::sync::Arc<NodeStatus>,
        events: broadcast::Sender<SessionEnded>,
        watch_events: broadcast::Sender<Arc<Published>>,
    ) -> Result<EventLoop, StorageError> {
        let recovered = storage.recover()?;
        let mut this = EventLoop {
            watch_events,
            lock_timers: BTreeMap::new(),
            leader_since_ms: recovered.last_time_ms,
            term: recovered.hard_state.term,
            persisted: Some(recovered.hard_state),
            last_index: recovered.last_index,
            time_base_ms: recovered.last_time_ms,
            clock_base: Instant::now(),
            config,
            storage,
            status,
            events,
            deadlines: Deadlines::default(),
            pending: Vec::new(),
            keepalive_replies: Vec::new(),
        };
        // A new term, whose first entry commits everything before it (§3.6.2 / §6.4: no read
        // or keepalive is served before an entry of the current term has committed).
        this.term += 1;
        this.pending.push((EntryKind::Noop, None));
        this.commit_pending()?;
        for timer in recovered.lock_timers {
            this.add_lock_timer(timer);
        }
        for (session, record) in &recovered.sessions {
            this.deadlines
                .insert(*session, record.ttl_ms, this.config.tick_ms, false, 0);
        }
        tracing::info!(
            term = this.term,
            index = this.last_index,
            sessions = recovered.sessions.len(),
            "recovered"
        );
        Ok(this)
    }

    fn now_tick(&self) -> u64 {
        (self.clock_base.elapsed().as_millis() as u64) / self.config.tick_ms
    }

    fn entry_time_ms(&self) -> u64 {
        self.time_base_ms + self.clock_base.elapsed().as_millis() as u64
    }

    /// Runs until `Shutdown` or until every sender is gone.
    pub fn run(mut self, rx: Receiver<LoopMsg>) -> Result<(), StorageError> {
        let tick = Duration::from_millis(self.config.tick_ms);
        let mut next_tick = Instant::now() + tick;
        let mut stop = false;
        while !stop {
            let wait = next_tick.saturating_duration_since(Instant::now());
            // Waking a parked thread costs tens of µs on a small VM; a client that just got
            // its answer usually sends the next request within that time, so poll briefly
            // before parking (bounded: at most `spin_us` per cycle).
            let spin_until = Instant::now() + Duration::from_micros(self.config.spin_us);
            let mut spun = None;
            while spun.is_none() && Instant::now() < spin_until {
                spun = rx.try_recv().ok();
                std::hint::spin_loop();
            }
            let first = if let Some(msg) = spun {
                Ok(msg)
            } else {
                rx.recv_timeout(wait)
            };
            let first = match first {
                Ok(msg) => Some(msg),
                Err(RecvTimeoutError::Timeout) => None,
                Err(RecvTimeoutError::Disconnected) => break,
            };
            if Instant::now() >= next_tick {
                self.expire_due();
                self.fire_lock_timers();
                next_tick += tick;
                if next_tick < Instant::now() {
                    next_tick = Instant::now() + tick;
                }
            }
            let mut msg = first;
            while let Some(m) = msg {
                stop |= self.handle(m);
                if stop || self.pending.len() >= self.config.max_batch {
                    break;
                }
                msg = rx.try_recv().ok();
            }
            if let Err(e) = self.commit_pending() {
                tracing::error!(error = %e, "storage failed; stopping the node");
                return Err(e);
            }
            self.send_keepalive_replies();
        }
        Ok(())
    }

    /// Queues a message's work. True on `Shutdown`.
    fn handle(&mut self, msg: LoopMsg) -> bool {
        match msg {
            LoopMsg::Propose { command, reply } => self
                .pending
                .push((EntryKind::Command(command), Some(reply))),
            LoopMsg::KeepAlive { sessions, reply } => {
                let now = self.now_tick();
                let results = sessions
                    .iter()
                    .map(|&s| {
                        let result = match self.deadlines.renew(s, now) {
                            Some(ttl_ms) => KeepAliveResult::Ok { ttl_ms },
                            None => KeepAliveResult::Expired,
                        };
                        (s, result)
                    })
                    .collect();
                self.keepalive_replies.push((reply, results));
            }
            LoopMsg::Unpin { session } => {
                let now = self.now_tick();
                self.deadlines.unpin(session, now);
            }
            LoopMsg::Shutdown => return true,
        }
        false
    }

    fn add_lock_timer(&mut self, timer: LockTimer) {
        let at_ms = match &timer {
            LockTimer::DelayEnds {
                at_ms, delay_ms, ..
            } => (*at_ms).max(self.leader_since_ms + delay_ms),
            LockTimer::WaiterDeadline { at_ms, .. } => *at_ms,
        };
        self.lock_timers.entry(at_ms).or_default().push(timer);
    }

    /// Proposes the entries that end due lock-delays and waits. Their effect is checked
    /// again against the entry time when applied, so an early or repeated one is harmless.
    fn fire_lock_timers(&mut self) {
        let now_ms = self.entry_time_ms();
        while let Some(entry) = self.lock_timers.first_entry() {
            if *entry.key() > now_ms {
                break;
            }
            let mut waiters: BTreeMap<String, Vec<u64>> = BTreeMap::new();
            for timer in entry.remove() {
                match timer {
                    LockTimer::DelayEnds { lock, .. } => self
                        .pending
                        .push((EntryKind::Command(Command::EndLockDelay { lock }), None)),
                    LockTimer::WaiterDeadline {
                        lock, acquire_id, ..
                    } => waiters.entry(lock).or_default().push(acquire_id),
                }
            }
            for (lock, acquire_ids) in waiters {
                self.pending.push((
                    EntryKind::Command(Command::ExpireWaiters { lock, acquire_ids }),
                    None,
                ));
            }
        }
    }

    /// Proposes expiry of every session past its deadline. The keepalives of this cycle that
    /// name them find them gone and get `Expired`, sent after the expiry entry applied.
    fn expire_due(&mut self) {
        let expired = self.deadlines.take_expired(self.now_tick());
        if !expired.is_empty() {
            tracing::info!(
                count = expired.len(),
                live = self.deadlines.len(),
                "expiring sessions"
            );
            self.pending.push((
                EntryKind::Command(Command::Expire { sessions: expired }),
                None,
            ));
        }
    }

    /// Appends the pending commands as entries, commits and applies them, answers proposers.
    fn commit_pending(&mut self) -> Result<(), StorageError> {
        if self.pending.is_empty() {
            return Ok(());
        }
        let time_ms = self.entry_time_ms();
        let pending = std::mem::take(&mut self.pending);
        let mut entries = Vec::with_capacity(pending.len());
        let mut repliers = Vec::with_capacity(pending.len());
        for (kind, reply) in pending {
            self.last_index += 1;
            entries.push(Entry {
                index: self.last_index,
                term: self.term,
                proposer_term: self.term,
                time_ms,
                kind,
            });
            repliers.push(reply);
        }
        let hard_state = HardState {
            term: self.term,
            vote: self.config.id,
        };
        let changed = (self.persisted != Some(hard_state)).then_some(hard_state);
        let batch = Batch {
            entries,
            hard_state: changed,
            apply_to: self.last_index,
        };
        let outcomes = match self.storage.commit_batch(&batch) {
            Ok(outcomes) => outcomes,
            Err(e) => {
                for reply in repliers.into_iter().flatten() {
                    let _ = reply.send(Err(Error::Storage(e.to_string())));
                }
                return Err(e);
            }
        };
        self.persisted = Some(hard_state);
        let now = self.now_tick();
        let mut published = Vec::new();
        let mut answers = Vec::with_capacity(repliers.len());
        for ((_, mut applied), reply) in outcomes.into_iter().zip(repliers) {
            published.append(&mut applied.events);
            for timer in std::mem::take(&mut applied.lock_timers) {
                self.add_lock_timer(timer);
            }
            if let Some(grant) = applied.opened_session {
                let implicit = matches!(
                    batch
                        .entries
                        .iter()
                        .find(|e| e.index == grant.session.0)
                        .map(|e| &e.kind),
                    Some(EntryKind::Command(Command::OpenSession {
                        implicit: true,
                        ..
                    }))
                );
                self.deadlines.insert(
                    grant.session,
                    grant.ttl_ms,
                    self.config.tick_ms,
                    implicit,
                    now,
                );
            }
            for &(session, kind) in &applied.ended_sessions {
                self.deadlines.remove(session);
                let _ = self.events.send(SessionEnded {
                    session,
                    revision: applied.revision,
                    kind,
                });
            }
            if let Some(reply) = reply {
                answers.push((reply, applied));
            }
        }
        // Publish before advancing the published index (a watch that reads the index after
        // subscribing has every later event in its channel), and advance it before answering
        // (a client that saw revision R can watch from R at once, and "now" is after R).
        if !published.is_empty() {
            let _ = self
                .watch_events
                .send(Arc::new(Published { events: published }));
        }
        self.status.set_indexes(self.term, self.last_index);
        for (reply, applied) in answers {
            let _ = reply.send(Ok(applied));
        }
        Ok(())
    }

    fn send_keepalive_replies(&mut self) {
        for (reply, results) in self.keepalive_replies.drain(..) {
            let _ = reply.send(results);
        }
    }
}
