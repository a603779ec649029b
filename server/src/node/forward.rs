//! Keepalives received by a follower, passed to the leader in one batch per tick
//! (DESIGN §3, §3a.4).
//!
//! A follower does not keep deadlines: it gathers the keepalives its clients send during a
//! tick, sends their sessions (deduplicated, plus the implicit sessions of its own
//! connections when they are due for a refresh) to the leader as one
//! [`SideMessage::KeepAlive`], and answers each client only from the leader's
//! [`SideMessage::KeepAliveAck`] for that batch. An answered keepalive therefore always
//! means the leader extended the deadline; the client's safety bound depends on it. A batch
//! not acknowledged in time is answered with an error (never `Ok`, never `Expired`).
//!
//! Never one forwarded request per keepalive: one peer message per tick, however many
//! clients and sessions. This module does no IO of its own; it hands batches to an
//! [`Outbox`].

use std::collections::{BTreeMap, BTreeSet};
use std::time::{Duration, Instant};

use lockd_protocol::{Error, KeepAliveResult, SessionId};
use tokio::sync::oneshot;

use super::peer::SideMessage;
use super::replicated::Outbox;

/// One result per session of a keepalive frame.
pub type KeepAliveResults = Vec<(SessionId, KeepAliveResult)>;
/// Where a keepalive's results go.
pub type KeepAliveReply = oneshot::Sender<Result<KeepAliveResults, Error>>;

/// A client's keepalive waiting for the leader.
#[derive(Debug)]
struct Waiter {
    sessions: Vec<SessionId>,
    reply: KeepAliveReply,
}

/// A batch sent to the leader.
#[derive(Debug)]
struct Sent {
    at: Instant,
    waiters: Vec<Waiter>,
}

/// The follower side of keepalive forwarding.
#[derive(Debug)]
pub struct Forwarder {
    next_id: u64,
    /// Keepalives received since the last batch, with their arrival time.
    gathered: Vec<(Instant, Waiter)>,
    /// Batches sent and not yet acknowledged, by id.
    in_flight: BTreeMap<u64, Sent>,
    /// When the implicit sessions of this node's connections were last sent along.
    pins_sent_at: Option<Instant>,
}

impl Default for Forwarder {
    fn default() -> Self {
        Forwarder {
            next_id: 1,
            gathered: Vec::new(),
            in_flight: BTreeMap::new(),
            pins_sent_at: None,
        }
    }
}

impl Forwarder {
    /// Queues a client's keepalive for the next batch.
    pub fn gather(&mut self, sessions: Vec<SessionId>, reply: KeepAliveReply) {
        self.gathered
            .push((Instant::now(), Waiter { sessions, reply }));
    }

    /// Sends what was gathered (and, every `pin_refresh`, the `pinned` sessions) to `leader`
    /// as one batch. Without a known leader the keepalives wait (until `expire`).
    pub fn flush(
        &mut self,
        leader: Option<u64>,
        pinned: &BTreeSet<SessionId>,
        pin_refresh: Duration,
        outbox: &dyn Outbox,
    ) {
        let Some(leader) = leader else {
            return;
        };
        let now = Instant::now();
        let pins_due = !pinned.is_empty()
            && self
                .pins_sent_at
                .is_none_or(|at| now.duration_since(at) >= pin_refresh);
        if self.gathered.is_empty() && !pins_due {
            return;
        }
        let mut sessions: BTreeSet<SessionId> = self
            .gathered
            .iter()
            .flat_map(|(_, w)| w.sessions.iter().copied())
            .collect();
        if pins_due {
            sessions.extend(pinned.iter().copied());
            self.pins_sent_at = Some(now);
        }
        let id = self.next_id;
        self.next_id += 1;
        let waiters = self.gathered.drain(..).map(|(_, w)| w).collect();
        self.in_flight.insert(id, Sent { at: now, waiters });
        outbox.send_side(
            leader,
            SideMessage::KeepAlive {
                id,
                sessions: sessions.into_iter().collect(),
            },
        );
    }

    /// The leader answered batch `id`: answer its keepalives.
    pub fn acknowledged(&mut self, id: u64, results: KeepAliveResults) {
        let Some(sent) = self.in_flight.remove(&id) else {
            return; // Timed out already, or not ours.
        };
        let by_session: BTreeMap<SessionId, KeepAliveResult> = results.into_iter().collect();
        for waiter in sent.waiters {
            let results: Option<KeepAliveResults> = waiter
                .sessions
                .iter()
                .map(|s| by_session.get(s).map(|r| (*s, *r)))
                .collect();
            let answer = results
                .ok_or_else(|| Error::Unavailable("the leader's answer left out a session".into()));
            let _ = waiter.reply.send(answer);
        }
    }

    /// Answers with an error every keepalive older than `timeout` (its batch or its answer
    /// was lost, e.g. with a leader).
    pub fn expire(&mut self, timeout: Duration) {
        let now = Instant::now();
        let late = |at: Instant| now.duration_since(at) >= timeout;
        let error = || Error::Unavailable("no answer from the leader for a keepalive".into());
        let (old, young): (Vec<_>, Vec<_>) = self.gathered.drain(..).partition(|(at, _)| late(*at));
        self.gathered = young;
        for (_, w) in old {
            let _ = w.reply.send(Err(error()));
        }
        let expired: Vec<u64> = self
            .in_flight
            .iter()
            .filter(|(_, s)| late(s.at))
            .map(|(&id, _)| id)
            .collect();
        for id in expired {
            if let Some(sent) = self.in_flight.remove(&id) {
                for w in sent.waiters {
                    let _ = w.reply.send(Err(error()));
                }
            }
        }
    }

    /// Takes every waiting keepalive (this node became leader and serves them itself, or is
    /// stopping).
    pub fn take_all(&mut self) -> Vec<(Vec<SessionId>, KeepAliveReply)> {
        let gathered = self.gathered.drain(..).map(|(_, w)| w);
        let sent = std::mem::take(&mut self.in_flight)
            .into_values()
            .flat_map(|s| s.waiters);
        gathered
            .chain(sent)
            .map(|w| (w.sessions, w.reply))
            .collect()
    }
}

#[cfg(test)]
mod tests {
    use std::sync::Mutex;

    use super::*;
    use crate::raft::Message;

    #[derive(Default)]
    struct Recorder(Mutex<Vec<(u64, SideMessage)>>);

    impl Outbox for std::sync::Arc<Recorder> {
        fn send(&self, _: Vec<Message>) {}
        fn send_side(&self, to: u64, message: SideMessage) {
            self.0.lock().expect("lock").push((to, message));
        }
    }

    #[test]
    fn one_batch_per_flush_and_answers_only_from_the_ack() {
        let outbox = std::sync::Arc::new(Recorder::default());
        let mut f = Forwarder::default();
        let (tx1, mut rx1) = oneshot::channel();
        let (tx2, mut rx2) = oneshot::channel();
        f.gather(vec![SessionId(1), SessionId(2)], tx1);
        f.gather(vec![SessionId(2)], tx2);
        f.flush(None, &BTreeSet::new(), Duration::ZERO, &outbox);
        assert!(outbox.0.lock().expect("lock").is_empty(), "no leader: wait");
        f.flush(Some(3), &BTreeSet::new(), Duration::ZERO, &outbox);
        let sent = outbox.0.lock().expect("lock").clone();
        let [(3, SideMessage::KeepAlive { id, sessions })] = sent.as_slice() else {
            panic!("expected one batch to node 3, got {sent:?}");
        };
        assert_eq!(sessions, &vec![SessionId(1), SessionId(2)]);
        assert!(rx1.try_recv().is_err(), "no answer before the ack");
        let ok = KeepAliveResult::Ok { ttl_ms: 5 };
        f.acknowledged(
            *id,
            vec![(SessionId(1), ok), (SessionId(2), KeepAliveResult::Expired)],
        );
        assert_eq!(
            rx1.try_recv().expect("answered").expect("ok"),
            vec![(SessionId(1), ok), (SessionId(2), KeepAliveResult::Expired)]
        );
        assert_eq!(
            rx2.try_recv().expect("answered").expect("ok"),
            vec![(SessionId(2), KeepAliveResult::Expired)]
        );
    }

    #[test]
    fn an_unanswered_batch_gets_an_error_not_a_result() {
        let outbox = std::sync::Arc::new(Recorder::default());
        let mut f = Forwarder::default();
        let (tx, mut rx) = oneshot::channel();
        f.gather(vec![SessionId(1)], tx);
        f.flush(
            Some(2),
            &BTreeSet::from([SessionId(9)]),
            Duration::ZERO,
            &outbox,
        );
        f.expire(Duration::ZERO);
        assert!(matches!(rx.try_recv(), Ok(Err(Error::Unavailable(_)))));
        let sent = outbox.0.lock().expect("lock").clone();
        assert!(
            matches!(&sent[0].1, SideMessage::KeepAlive { sessions, .. } if sessions == &vec![SessionId(1), SessionId(9)]),
            "pinned sessions ride along: {sent:?}"
        );
    }
}
