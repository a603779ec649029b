//! What only an established leader does: keep session deadlines, decide expiry, and end lock
//! timeouts and lock-delays (DESIGN §3a.4, §3a.5, §3a.12).
//!
//! [`LeaderDuties`] is active only while its node is the leader *and* an entry of the
//! leader's term has applied on it. Activation starts every session's deadline afresh with a
//! full TTL (Chubby's fail-over grace: a leader change never expires a live client) and loads
//! the lock timers from the applied state; losing leadership forgets all of it, so a deposed
//! leader proposes nothing and extends nothing. Keepalives reach [`LeaderDuties::renew`] only
//! after a quorum round of the leader's term that began after they arrived (the driver runs
//! them through ReadIndex), so an answered keepalive always means a current leader moved the
//! deadline.
//!
//! This module decides; it does no IO and proposes nothing itself: it returns the commands
//! the driver must propose. It must not expire a session whose deadline it did not start in
//! its own term, and must not answer `Ok` for a session whose `Expire` it already proposed.

use std::collections::{BTreeMap, BTreeSet};
use std::time::Instant;

use lockd_protocol::{KeepAliveResult, SessionId};

use super::deadlines::Deadlines;
use crate::fsm::SessionRecord;
use crate::fsm::{Command, LockTimer};

/// Session deadlines and lock timers of an established leader.
#[derive(Debug)]
pub struct LeaderDuties {
    tick_ms: u64,
    /// Origin of the tick count used for deadlines (this node's monotonic clock).
    clock_base: Instant,
    /// Term of the leadership these duties belong to; `None` while inactive.
    /// Invariant: `deadlines`, `expiring` and `lock_timers` are empty while inactive.
    term: Option<u64>,
    deadlines: Deadlines,
    /// Sessions whose `Expire` this leader proposed, with that entry's index, until it
    /// applies. A keepalive naming one is answered `Expired` only after the entry applied.
    expiring: BTreeMap<SessionId, u64>,
    /// Lock deadlines by the entry time (ms) at which their entry must be proposed.
    lock_timers: BTreeMap<u64, Vec<LockTimer>>,
    /// Entry time at which this leadership became active: a lock-delay ends only after a
    /// full delay of it (§3a.12).
    active_since_ms: u64,
}

impl LeaderDuties {
    /// Inactive duties counting deadlines in ticks of `tick_ms`.
    pub fn new(tick_ms: u64) -> LeaderDuties {
        LeaderDuties {
            tick_ms: tick_ms.max(1),
            clock_base: Instant::now(),
            term: None,
            deadlines: Deadlines::default(),
            expiring: BTreeMap::new(),
            lock_timers: BTreeMap::new(),
            active_since_ms: 0,
        }
    }

    /// The term of the active leadership, if active.
    pub fn active_term(&self) -> Option<u64> {
        self.term
    }

    fn now_tick(&self) -> u64 {
        self.clock_base.elapsed().as_millis() as u64 / self.tick_ms
    }

    /// Becomes active for `term`: every session gets a full TTL from now (those in `pinned`
    /// live while their connection here does), and the lock timers start over.
    pub fn activate(
        &mut self,
        term: u64,
        now_ms: u64,
        sessions: &[(SessionId, SessionRecord)],
        pinned: &BTreeSet<SessionId>,
        timers: Vec<LockTimer>,
    ) {
        self.deactivate();
        self.term = Some(term);
        self.active_since_ms = now_ms;
        let now = self.now_tick();
        for (session, record) in sessions {
            let pin = pinned.contains(session);
            self.deadlines
                .insert(*session, record.ttl_ms, self.tick_ms, pin, now);
        }
        for timer in timers {
            self.add_lock_timer(timer);
        }
        tracing::info!(
            term,
            sessions = sessions.len(),
            timers = self.lock_timers.values().map(Vec::len).sum::<usize>(),
            "leadership active: every session has a fresh full TTL"
        );
    }

    /// Forgets everything (leadership lost or a new term).
    pub fn deactivate(&mut self) {
        self.term = None;
        self.deadlines = Deadlines::default();
        self.expiring.clear();
        self.lock_timers.clear();
    }

    /// A session opened by an applied entry.
    pub fn opened(&mut self, session: SessionId, ttl_ms: u64, pinned: bool) {
        if self.term.is_some() {
            let now = self.now_tick();
            self.deadlines
                .insert(session, ttl_ms, self.tick_ms, pinned, now);
        }
    }

    /// A session ended by an applied entry.
    pub fn ended(&mut self, session: SessionId) {
        self.deadlines.remove(session);
        self.expiring.remove(&session);
    }

    /// The connection of an implicit session here closed: it may now expire.
    pub fn unpin(&mut self, session: SessionId) {
        let now = self.now_tick();
        self.deadlines.unpin(session, now);
    }

    /// Renews `sessions` (their quorum round is done). `Err(index)` if one of them has an
    /// `Expire` proposed at `index` that has not applied yet (`applied`): answer after it.
    pub fn renew(
        &mut self,
        sessions: &[SessionId],
        applied: u64,
    ) -> Result<Vec<(SessionId, KeepAliveResult)>, u64> {
        let wait = sessions
            .iter()
            .filter_map(|s| self.expiring.get(s))
            .copied()
            .filter(|&index| index > applied)
            .max();
        if let Some(index) = wait {
            return Err(index);
        }
        let now = self.now_tick();
        Ok(sessions
            .iter()
            .map(|&s| {
                let result = match self.deadlines.renew(s, now) {
                    Some(ttl_ms) => KeepAliveResult::Ok { ttl_ms },
                    None => KeepAliveResult::Expired,
                };
                (s, result)
            })
            .collect())
    }

    /// Sessions past their deadline, to be expired by one `Expire` entry.
    pub fn take_expired(&mut self) -> Vec<SessionId> {
        if self.term.is_none() {
            return Vec::new();
        }
        let now = self.now_tick();
        let expired = self.deadlines.take_expired(now);
        if !expired.is_empty() {
            tracing::info!(
                count = expired.len(),
                live = self.deadlines.len(),
                "expiring sessions"
            );
        }
        expired
    }

    /// Records that `Expire` of `sessions` was proposed at `index`.
    pub fn expiring(&mut self, sessions: &[SessionId], index: u64) {
        for &s in sessions {
            self.expiring.insert(s, index);
        }
    }

    /// A lock deadline from an applied entry.
    pub fn add_lock_timer(&mut self, timer: LockTimer) {
        if self.term.is_none() {
            return;
        }
        let at_ms = match &timer {
            LockTimer::DelayEnds {
                at_ms, delay_ms, ..
            } => (*at_ms).max(self.active_since_ms + delay_ms),
            LockTimer::WaiterDeadline { at_ms, .. } => *at_ms,
        };
        self.lock_timers.entry(at_ms).or_default().push(timer);
    }

    /// Commands ending the lock-delays and waits due at entry time `now_ms`. Their effect is
    /// checked again against the entry time when applied, so an early or repeated one is
    /// harmless.
    pub fn due_lock_commands(&mut self, now_ms: u64) -> Vec<Command> {
        let mut commands = Vec::new();
        while let Some(entry) = self.lock_timers.first_entry() {
            if *entry.key() > now_ms {
                break;
            }
            let mut waiters: BTreeMap<String, Vec<u64>> = BTreeMap::new();
            for timer in entry.remove() {
                match timer {
                    LockTimer::DelayEnds { lock, .. } => {
                        commands.push(Command::EndLockDelay { lock })
                    }
                    LockTimer::WaiterDeadline {
                        lock, acquire_id, ..
                    } => waiters.entry(lock).or_default().push(acquire_id),
                }
            }
            for (lock, acquire_ids) in waiters {
                commands.push(Command::ExpireWaiters { lock, acquire_ids });
            }
        }
        commands
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn record(ttl_ms: u64) -> SessionRecord {
        SessionRecord {
            ttl_ms,
            tick_ms: 1,
            drift_ppm: 0,
            implicit: false,
            floor: 0,
        }
    }

    #[test]
    fn inactive_duties_expire_nothing_and_renew_nothing() {
        let mut d = LeaderDuties::new(1);
        d.opened(SessionId(1), 0, false);
        assert!(d.take_expired().is_empty());
        assert_eq!(
            d.renew(&[SessionId(1)], 0),
            Ok(vec![(SessionId(1), KeepAliveResult::Expired)])
        );
    }

    #[test]
    fn activation_gives_a_full_ttl_and_pins_local_implicit_sessions() {
        let mut d = LeaderDuties::new(1);
        let sessions = vec![(SessionId(1), record(60_000)), (SessionId(2), record(1))];
        let pinned = BTreeSet::from([SessionId(2)]);
        d.activate(3, 0, &sessions, &pinned, Vec::new());
        std::thread::sleep(std::time::Duration::from_millis(5));
        // Session 2 has a 1 ms TTL but is pinned; session 1 has a minute left.
        assert!(d.take_expired().is_empty());
        d.unpin(SessionId(2));
        std::thread::sleep(std::time::Duration::from_millis(5));
        assert_eq!(d.take_expired(), vec![SessionId(2)]);
        d.deactivate();
        assert_eq!(d.active_term(), None);
    }

    #[test]
    fn a_keepalive_for_a_session_being_expired_waits_for_the_expiry_entry() {
        let mut d = LeaderDuties::new(1);
        d.activate(
            2,
            0,
            &[(SessionId(7), record(1))],
            &BTreeSet::new(),
            Vec::new(),
        );
        std::thread::sleep(std::time::Duration::from_millis(5));
        let expired = d.take_expired();
        assert_eq!(expired, vec![SessionId(7)]);
        d.expiring(&expired, 40);
        assert_eq!(d.renew(&[SessionId(7)], 39), Err(40));
        d.ended(SessionId(7));
        assert_eq!(
            d.renew(&[SessionId(7)], 40),
            Ok(vec![(SessionId(7), KeepAliveResult::Expired)])
        );
    }

    #[test]
    fn lock_delay_ends_only_after_a_full_delay_of_leadership() {
        let mut d = LeaderDuties::new(1);
        let timer = LockTimer::DelayEnds {
            lock: "l".into(),
            at_ms: 100,
            delay_ms: 500,
        };
        d.activate(2, 1_000, &[], &BTreeSet::new(), vec![timer]);
        assert!(d.due_lock_commands(1_499).is_empty());
        assert_eq!(
            d.due_lock_commands(1_500),
            vec![Command::EndLockDelay { lock: "l".into() }]
        );
    }
}
