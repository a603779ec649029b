//! Exactly-once writes (DESIGN §3a.7).

use lockd_protocol::{Error, Reply, SessionId, WriteOp, WriteResult, SEQ_WINDOW};

use super::*;

#[test]
fn a_duplicate_returns_the_first_result_and_revision_without_applying() {
    let mut h = Harness::new();
    let s = h.open();
    let first = h.write_seq(s, 1, 1, create("/a", b"x"));
    assert!(matches!(
        &first.result,
        Ok(Reply::Write(WriteResult::Created { .. }))
    ));
    let first_set = h.write_seq(s, 2, 1, set("/a", b"y", None));
    h.write_seq(s, 3, 1, set("/a", b"z", None));
    for (seq, original) in [(1, &first), (2, &first_set)] {
        let op = if seq == 1 {
            create("/a", b"x")
        } else {
            set("/a", b"y", None)
        };
        let before = h.store.clone();
        let again = h.write_seq(s, seq, 1, op);
        assert_eq!(
            again.result, original.result,
            "not NodeExists, not a second version bump"
        );
        assert_eq!(again.revision, original.revision);
        assert!(again.revision < h.index);
        h.assert_only_bookkeeping(&before, None);
    }
    let a = h.node("/a").unwrap();
    assert_eq!((a.version, a.data.as_slice()), (2, &b"z"[..]));
}

#[test]
fn a_duplicate_of_a_failed_request_fails_the_same_way() {
    let mut h = Harness::new();
    let s = h.open();
    let first = h.write_seq(s, 1, 1, create("/x/y", b""));
    assert_eq!(first.result, Err(Error::NoNode { path: "/x".into() }));
    assert_eq!(
        h.store.dedup.get(&(s, 1)).map(|r| r.revision),
        Some(first.revision)
    );
    h.write_seq(s, 2, 1, create("/x", b""));
    let before = h.store.clone();
    let again = h.write_seq(s, 1, 1, create("/x/y", b""));
    assert_eq!(
        (again.result, again.revision),
        (first.result, first.revision)
    );
    h.assert_only_bookkeeping(&before, None);
    assert_eq!(h.node("/x/y"), None);
}

#[test]
fn duplicates_are_answered_before_version_checks() {
    let mut h = Harness::new();
    let s = h.open();
    h.write_seq(s, 1, 1, create("/v", b""));
    let first = h.write_seq(s, 2, 1, set("/v", b"1", Some(0)));
    let first_delete = h.write_seq(s, 3, 1, WriteOp::Multi(vec![check("/v", 1)]));
    assert!(first_delete.result.is_ok());
    h.write_seq(s, 4, 1, set("/v", b"2", Some(1)));
    // Re-applying either now would be a BadVersion; the remembered answers come back instead.
    let again = h.write_seq(s, 2, 1, set("/v", b"1", Some(0)));
    assert_eq!(
        (&again.result, again.revision),
        (&first.result, first.revision)
    );
    let again = h.write_seq(s, 3, 1, WriteOp::Multi(vec![check("/v", 1)]));
    assert_eq!(again.result, first_delete.result);
    assert_eq!(h.node("/v").unwrap().version, 2);
}

#[test]
fn pipelined_seqs_applied_out_of_order_dedup_independently() {
    let mut h = Harness::new();
    let s = h.open();
    let mut firsts = BTreeMap::new();
    for seq in [3u64, 1, 2, 5, 4] {
        let applied = h.write_seq(s, seq, 1, create(&format!("/p{seq}"), b""));
        assert!(applied.result.is_ok());
        firsts.insert(seq, applied);
    }
    assert_eq!(h.store.dedup.keys().filter(|(id, _)| *id == s).count(), 5);
    let before = h.store.clone();
    for seq in [4u64, 5, 1, 3, 2] {
        let again = h.write_seq(s, seq, 1, create(&format!("/p{seq}"), b""));
        let first = &firsts[&seq];
        assert_eq!(
            (&again.result, again.revision),
            (&first.result, first.revision)
        );
        assert!(
            again.events.is_empty(),
            "a duplicate changes nothing, so no events"
        );
    }
    h.assert_only_bookkeeping(&before, None);
    // A duplicate's answer does not depend on the op it carries: the (session, seq) decides.
    let again = h.write_seq(s, 1, 1, delete("/p1", None));
    assert_eq!(
        (&again.result, again.revision),
        (&firsts[&1].result, firsts[&1].revision)
    );
    assert!(h.node("/p1").is_some());
}

#[test]
fn the_floor_forgets_responses_and_rejects_stale_seqs() {
    let mut h = Harness::new();
    let s = h.open();
    let other = h.open();
    for seq in 1..=3 {
        h.write_seq(s, seq, 1, create(&format!("/n{seq}"), b""));
    }
    h.write_seq(other, 1, 1, create("/o", b""));
    let fourth = h.write_seq(s, 4, 3, create("/n4", b""));
    assert!(fourth.result.is_ok());
    assert_eq!(h.store.sessions[&s].floor, 3);
    let kept: Vec<_> = h.store.dedup.keys().cloned().collect();
    assert_eq!(kept, vec![(s, 3), (s, 4), (other, 1)]);

    let before = h.store.clone();
    for seq in [1, 2] {
        let stale = h.write_seq(s, seq, 1, create(&format!("/n{seq}"), b""));
        assert_eq!(
            stale.result,
            Err(Error::StaleRequest {
                session: s,
                seq,
                floor: 3
            })
        );
        assert_eq!(stale.revision, h.index);
    }
    // A stale request is not applied even where applying would succeed.
    let stale = h.write_seq(s, 2, 2, create("/brand-new", b""));
    assert_eq!(
        stale.result,
        Err(Error::StaleRequest {
            session: s,
            seq: 2,
            floor: 3
        })
    );
    h.assert_only_bookkeeping(&before, None);
    assert_eq!(
        h.store.sessions[&s].floor, 3,
        "an older floor never lowers it"
    );
    // Seq 3 is at the floor: still answered from memory.
    let again = h.write_seq(s, 3, 2, create("/n3", b""));
    assert!(matches!(
        again.result,
        Ok(Reply::Write(WriteResult::Created { .. }))
    ));
    // A request may advance the floor up to its own seq.
    h.write_seq(s, 5, 5, create("/n5", b""));
    assert_eq!(
        h.store
            .dedup
            .keys()
            .filter(|(id, _)| *id == s)
            .cloned()
            .collect::<Vec<_>>(),
        vec![(s, 5)]
    );
    let stale = h.write_seq(s, 4, 4, create("/n4", b""));
    assert_eq!(
        stale.result,
        Err(Error::StaleRequest {
            session: s,
            seq: 4,
            floor: 5
        })
    );
}

#[test]
fn seqs_beyond_the_window_are_rejected() {
    let mut h = Harness::new();
    let s = h.open();
    h.write_seq(s, 1, 1, create("/a", b""));
    let before = h.store.clone();
    for seq in [1 + SEQ_WINDOW, 2 * SEQ_WINDOW, u64::MAX] {
        let beyond = h.write_seq(s, seq, 1, create("/b", b""));
        let error = Error::SeqOutOfWindow {
            session: s,
            seq,
            floor: 1,
            window: SEQ_WINDOW,
        };
        assert_eq!(beyond.result, Err(error));
    }
    h.assert_only_bookkeeping(&before, None);
    // The last seq inside the window is fine.
    let edge = SEQ_WINDOW;
    let applied = h.write_seq(s, edge, 1, create("/b", b""));
    assert!(applied.result.is_ok());
    // The window moves with the floor.
    let applied = h.write_seq(s, 10 + SEQ_WINDOW, 11, create("/c", b""));
    assert!(applied.result.is_ok());
    assert_eq!(h.store.sessions[&s].floor, 11);
}

#[test]
fn writes_on_unknown_or_ended_sessions_are_never_applied() {
    let mut h = Harness::new();
    let s = h.open();
    h.write_seq(s, 1, 1, create("/a", b""));
    let ended = h.open();
    h.write_seq(ended, 1, 1, create_eph("/mine"));
    h.close(ended);
    let before = h.store.clone();
    let ids: [fn(u64) -> SessionId; 3] = [
        |next| SessionId(next),
        |next| SessionId(next + 7),
        |_| SessionId(u64::MAX),
    ];
    for id in ids {
        let unknown = id(h.index + 1);
        let applied = h.write_seq(unknown, 1, 1, create("/u", b""));
        assert_eq!(
            applied.result,
            Err(Error::UnknownSession { session: unknown })
        );
    }
    // A retry of an answered request after the session ended: SessionExpired, never re-applied.
    for (seq, op) in [(1, create_eph("/mine")), (2, create("/z", b""))] {
        let applied = h.write_seq(ended, seq, 1, op);
        assert_eq!(
            applied.result,
            Err(Error::SessionExpired { session: ended })
        );
    }
    h.assert_only_bookkeeping(&before, None);
}

#[test]
fn implicit_sessions_keep_no_responses() {
    // The server numbers an implicit session's writes and never resends one, so nothing is
    // kept for it: the write path touches fewer tables.
    let mut h = Harness::new();
    let applied = h.apply(Command::OpenSession {
        ttl_ms: 10_000,
        tick_ms: 100,
        drift_ppm: 200,
        implicit: true,
    });
    let s = applied.opened_session.expect("opened").session;
    h.write_seq(s, 1, 1, create("/a", b"x"));
    h.write_seq(s, 2, 2, set("/a", b"y", None));
    assert!(h.store.dedup.is_empty());
    assert_eq!(
        h.store.sessions[&s].floor, 0,
        "the session record is not rewritten"
    );
    assert_eq!(h.node("/a").unwrap().version, 1);
    // Ephemerals still belong to it and end with it.
    h.write_seq(s, 3, 3, create_eph("/e"));
    h.close(s);
    assert_eq!(h.node("/e"), None);
}

#[test]
fn anonymous_writes_keep_nothing_and_cannot_own() {
    let mut h = Harness::new();
    let anonymous = crate::fsm::ANONYMOUS;
    let first = h.write_seq(anonymous, 0, 0, create("/a", b"x"));
    assert!(first.result.is_ok());
    // The same (session, seq) again is a new write, not a duplicate: nothing is remembered.
    let again = h.write_seq(anonymous, 0, 0, create("/a", b"x"));
    assert_eq!(again.result, Err(Error::NodeExists { path: "/a".into() }));
    assert!(h.store.dedup.is_empty());
    assert!(h.store.sessions.is_empty());
    // Ephemeral nodes and locks need an owner.
    let eph = h.write_seq(anonymous, 0, 0, create_eph("/e"));
    assert_eq!(
        eph.result,
        Err(Error::UnknownSession { session: anonymous })
    );
    assert_eq!(h.node("/e"), None);
}
