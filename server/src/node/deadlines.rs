//! In-memory session deadlines, kept by the leader's event loop (DESIGN §3a.4-5).
//!
//! Keepalives are not log entries: they only move a deadline here. Deadlines are counted in
//! ticks and round up — current tick + ceil(TTL / tick) + 1 — so a session never expires
//! before its last answered keepalive's arrival + TTL on this node's monotonic clock. Every
//! restart (and, with Raft, every new leader) starts all deadlines afresh with a full TTL.

use std::collections::{BTreeSet, HashMap};

use lockd_protocol::SessionId;

#[derive(Debug, Clone, Copy)]
struct Deadline {
    at_tick: u64,
    ttl_ms: u64,
    ttl_ticks: u64,
    /// A connection's implicit session: it lives while its connection does.
    pinned: bool,
}

/// Deadlines of live sessions, indexed by session and by expiry tick.
#[derive(Debug, Default)]
pub struct Deadlines {
    by_session: HashMap<SessionId, Deadline>,
    /// (deadline tick, session) for every unpinned session.
    by_tick: BTreeSet<(u64, SessionId)>,
}

/// Ticks covering `ttl_ms`, rounded up, plus one for the partial current tick.
fn ttl_ticks(ttl_ms: u64, tick_ms: u64) -> u64 {
    ttl_ms.div_ceil(tick_ms.max(1)) + 1
}

impl Deadlines {
    /// Starts tracking a session with a full TTL from `now_tick`.
    pub fn insert(
        &mut self,
        session: SessionId,
        ttl_ms: u64,
        tick_ms: u64,
        pinned: bool,
        now_tick: u64,
    ) {
        self.remove(session);
        let ttl_ticks = ttl_ticks(ttl_ms, tick_ms);
        let at_tick = now_tick + ttl_ticks;
        self.by_session.insert(
            session,
            Deadline {
                at_tick,
                ttl_ms,
                ttl_ticks,
                pinned,
            },
        );
        if !pinned {
            self.by_tick.insert((at_tick, session));
        }
    }

    /// Stops tracking a session.
    pub fn remove(&mut self, session: SessionId) {
        if let Some(d) = self.by_session.remove(&session) {
            self.by_tick.remove(&(d.at_tick, session));
        }
    }

    /// Unpins a session (its connection closed without closing it) so it can expire.
    pub fn unpin(&mut self, session: SessionId, now_tick: u64) {
        if let Some(d) = self.by_session.get_mut(&session) {
            if d.pinned {
                d.pinned = false;
                d.at_tick = now_tick + d.ttl_ticks;
                self.by_tick.insert((d.at_tick, session));
            }
        }
    }

    /// Extends a live session's deadline to a full TTL from `now_tick` and returns the TTL;
    /// `None` if the session is not live.
    pub fn renew(&mut self, session: SessionId, now_tick: u64) -> Option<u64> {
        let d = self.by_session.get_mut(&session)?;
        if !d.pinned {
            self.by_tick.remove(&(d.at_tick, session));
            d.at_tick = now_tick + d.ttl_ticks;
            self.by_tick.insert((d.at_tick, session));
        }
        Some(d.ttl_ms)
    }

    /// Number of tracked sessions.
    pub(crate) fn len(&self) -> usize {
        self.by_session.len()
    }

    /// Removes and returns every session whose deadline is at or before `now_tick`.
    pub fn take_expired(&mut self, now_tick: u64) -> Vec<SessionId> {
        let mut expired = Vec::new();
        while let Some(&(at_tick, session)) = self.by_tick.first() {
            if at_tick > now_tick {
                break;
            }
            self.by_tick.pop_first();
            self.by_session.remove(&session);
            expired.push(session);
        }
        expired
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn deadline_rounds_up_and_adds_a_tick() {
        // TTL 250 ms with 100 ms ticks: 3 ticks + 1.
        let mut d = Deadlines::default();
        d.insert(SessionId(1), 250, 100, false, 10);
        assert!(d.take_expired(13).is_empty());
        assert_eq!(d.take_expired(14), vec![SessionId(1)]);
        assert_eq!(d.len(), 0);
    }

    #[test]
    fn renew_moves_the_deadline() {
        let mut d = Deadlines::default();
        d.insert(SessionId(1), 100, 100, false, 0);
        assert_eq!(d.renew(SessionId(1), 5), Some(100));
        assert!(d.take_expired(6).is_empty());
        assert_eq!(d.take_expired(7), vec![SessionId(1)]);
        assert_eq!(d.renew(SessionId(1), 8), None);
    }

    #[test]
    fn pinned_sessions_never_expire_until_unpinned() {
        let mut d = Deadlines::default();
        d.insert(SessionId(2), 100, 100, true, 0);
        assert!(d.take_expired(1_000).is_empty());
        d.unpin(SessionId(2), 1_000);
        assert!(d.take_expired(1_001).is_empty());
        assert_eq!(d.take_expired(1_002), vec![SessionId(2)]);
    }
}
