//! Sessions: open, close, expiry (and the proposer-term rule), ephemeral cleanup.

use lockd_protocol::{Error, Reply, SessionEventKind, SessionGrant, SessionId};

use super::super::SessionRecord;
use super::*;

#[test]
fn open_session_grants_the_entry_index_and_stores_terms_unchanged() {
    let mut h = Harness::new();
    let noop = h.entry(EntryKind::Noop);
    h.apply_entry(&noop);
    let applied = h.apply(Command::OpenSession {
        ttl_ms: 12_345,
        tick_ms: 50,
        drift_ppm: 300,
        implicit: false,
    });
    let grant = SessionGrant {
        session: SessionId(2),
        ttl_ms: 12_345,
        tick_ms: 50,
        drift_ppm: 300,
    };
    assert_eq!(applied.revision, 2);
    assert_eq!(applied.result, Ok(Reply::SessionOpened(grant)));
    assert_eq!(applied.opened_session, Some(grant));
    assert!(applied.ended_sessions.is_empty());
    let record = SessionRecord {
        ttl_ms: 12_345,
        tick_ms: 50,
        drift_ppm: 300,
        implicit: false,
        floor: 0,
    };
    assert_eq!(h.store.sessions.get(&SessionId(2)), Some(&record));

    let applied = h.apply(Command::OpenSession {
        ttl_ms: 1,
        tick_ms: 1,
        drift_ppm: 0,
        implicit: true,
    });
    assert_eq!(applied.opened_session.unwrap().session, SessionId(3));
    let record = SessionRecord {
        ttl_ms: 1,
        tick_ms: 1,
        drift_ppm: 0,
        implicit: true,
        floor: 0,
    };
    assert_eq!(h.store.sessions.get(&SessionId(3)), Some(&record));
    assert_eq!(h.store.sessions.len(), 2);
}

#[test]
fn a_noop_entry_only_moves_the_applied_position() {
    let mut h = Harness::new();
    let s = h.open();
    h.ok(s, create_eph("/e"));
    let before = h.store.clone();
    let entry = h.entry(EntryKind::Noop);
    let applied = h.apply_entry(&entry);
    assert_eq!(applied.revision, entry.index);
    assert!(applied.ended_sessions.is_empty() && applied.opened_session.is_none());
    h.assert_only_bookkeeping(&before, None);
}

/// Two sessions with ephemerals under the root and under /dir, and a plain node of `s`.
fn two_sessions() -> (Harness, SessionId, SessionId) {
    let mut h = Harness::new();
    let s = h.open();
    let t = h.open();
    h.mk(s, "/dir");
    h.mk(s, "/dir/plain");
    h.ok(s, create_eph("/e1"));
    h.ok(s, create_eph("/dir/e2"));
    h.ok(s, create_seq("/dir/q-", true));
    h.ok(t, create_eph("/dir/t"));
    (h, s, t)
}

#[test]
fn close_deletes_the_sessions_ephemerals_and_nothing_else() {
    let (mut h, s, t) = two_sessions();
    let dir = h.node("/dir").unwrap();
    let root = h.node("/").unwrap();
    assert_eq!(dir.num_children, 4);
    let dedup_of_t: Vec<_> = h
        .store
        .dedup
        .keys()
        .filter(|(id, _)| *id == t)
        .cloned()
        .collect();
    assert!(!dedup_of_t.is_empty());

    let applied = h.close(s);
    assert_eq!(applied.result, Ok(Reply::SessionClosed));
    assert_eq!(applied.revision, h.index);
    assert_eq!(applied.ended_sessions, vec![(s, SessionEventKind::Closed)]);
    for p in ["/e1", "/dir/e2", "/dir/q-0000000000"] {
        assert_eq!(h.node(p), None, "{p}");
    }
    assert!(
        h.node("/dir/plain").is_some(),
        "plain nodes outlive their creator"
    );
    let dir_after = h.node("/dir").unwrap();
    assert_eq!(dir_after.num_children, 2);
    assert_eq!(dir_after.children_version, dir.children_version + 2);
    assert_eq!(dir_after.next_sequence, 1, "the counter is never rewound");
    let root_after = h.node("/").unwrap();
    assert_eq!(root_after.num_children, root.num_children - 1);
    assert_eq!(root_after.children_version, root.children_version + 1);
    assert!(!h.store.sessions.contains_key(&s));
    assert_eq!(
        h.store.ephemerals.keys().cloned().collect::<Vec<_>>(),
        vec![(t, "/dir/t".to_string())]
    );
    assert_eq!(
        h.store.dedup.keys().cloned().collect::<Vec<_>>(),
        dedup_of_t,
        "only s's responses are dropped"
    );

    // Closing again, or writing under it, is SessionExpired and changes nothing.
    let before = h.store.clone();
    let applied = h.close(s);
    assert_eq!(applied.result, Err(Error::SessionExpired { session: s }));
    assert!(applied.ended_sessions.is_empty());
    h.assert_only_bookkeeping(&before, None);
    let applied = h.write(s, create_eph("/again"));
    assert_eq!(applied.result, Err(Error::SessionExpired { session: s }));
    h.assert_only_bookkeeping(&before, None);
    // A session id never issued.
    let unknown = SessionId(h.index + 10);
    assert_eq!(
        h.close(unknown).result,
        Err(Error::UnknownSession { session: unknown })
    );
    h.assert_only_bookkeeping(&before, None);
}

#[test]
fn expire_ends_the_listed_live_sessions_and_ignores_dead_ones() {
    let (mut h, s, t) = two_sessions();
    let u = h.open();
    let closed = h.open();
    h.close(closed);
    h.term = 3;
    let unknown = SessionId(h.index + 100);
    let applied = h.expire(&[closed, s, unknown, t, s]);
    assert_eq!(applied.result, Ok(Reply::SessionClosed));
    assert_eq!(
        applied.ended_sessions,
        vec![
            (s, SessionEventKind::Expired),
            (t, SessionEventKind::Expired)
        ]
    );
    assert!(h.store.ephemerals.is_empty());
    assert_eq!(
        h.store.sessions.keys().cloned().collect::<Vec<_>>(),
        vec![u]
    );
    let dir = h.node("/dir").unwrap();
    assert_eq!(dir.num_children, 1);
    assert_eq!(h.node("/").unwrap().num_children, 1);
    assert_eq!(
        h.write(t, create("/x", b"")).result,
        Err(Error::SessionExpired { session: t })
    );
    // An expiry of nothing live is a no-op.
    let before = h.store.clone();
    let applied = h.expire(&[s, t]);
    assert!(applied.ended_sessions.is_empty());
    h.assert_only_bookkeeping(&before, None);
}

#[test]
fn expire_from_another_term_is_ignored() {
    let (mut h, s, t) = two_sessions();
    for (term, proposer_term) in [(2, 1), (2, 3)] {
        h.term = term;
        let before = h.store.clone();
        let mut entry = h.entry(EntryKind::Command(Command::Expire {
            sessions: vec![s, t],
        }));
        entry.proposer_term = proposer_term;
        let applied = h.apply_entry(&entry);
        assert!(applied.ended_sessions.is_empty());
        assert_eq!(applied.revision, entry.index);
        h.assert_only_bookkeeping(&before, None);
    }
    // The same sessions expire once a current-term leader proposes it.
    let applied = h.expire(&[s, t]);
    assert_eq!(applied.ended_sessions.len(), 2);
}

#[test]
fn one_expiry_deletes_a_thousand_ephemerals_in_one_entry() {
    let mut h = Harness::new();
    let s = h.open();
    let other = h.open();
    h.mk(other, "/locks");
    for i in 0..1_000 {
        if i % 2 == 0 {
            h.ok(s, create_seq("/locks/l-", true));
        } else {
            h.ok(s, create_eph(&format!("/e{i:04}")));
        }
    }
    h.ok(other, create_seq("/locks/l-", true));
    assert_eq!(h.store.ephemerals.len(), 1_001);
    let locks = h.node("/locks").unwrap();
    assert_eq!((locks.num_children, locks.children_version), (501, 501));

    let index_before = h.index;
    let applied = h.expire(&[s]);
    assert_eq!(h.index, index_before + 1);
    assert_eq!(applied.revision, h.index);
    assert_eq!(applied.ended_sessions, vec![(s, SessionEventKind::Expired)]);
    assert_eq!(
        h.store.ephemerals.keys().cloned().collect::<Vec<_>>(),
        vec![(other, "/locks/l-0000000500".to_string())]
    );
    let locks = h.node("/locks").unwrap();
    assert_eq!(
        (
            locks.num_children,
            locks.children_version,
            locks.next_sequence
        ),
        (1, 1_001, 501)
    );
    let root = h.node("/").unwrap();
    assert_eq!((root.num_children, root.children_version), (1, 1_001));
    assert_eq!(h.store.nodes.len(), 3);
}
