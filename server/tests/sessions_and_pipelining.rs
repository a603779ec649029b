//! Sessions (TTL, keepalive, expiry of ephemerals, pushed events), exactly-once retries and
//! pipelining against a live in-process server.

mod support;

use std::collections::HashSet;

use futures_util::SinkExt;
use std::time::Duration;

use lockd_protocol::{
    ClientMessage, Error, KeepAliveResult, Reply, Request, ServerMessage, SessionEventKind,
    SessionSeq, SetOp, WriteOp, WriteResult,
};
use support::{create_op, eventually, Raw, TestServer};

#[tokio::test]
async fn ttl_is_clamped_and_returned_with_tick_and_drift() {
    let dir = tempfile::tempdir().unwrap();
    let server = TestServer::start(dir.path().to_path_buf()).await;
    let mut raw = Raw::connect(server.addr).await;
    let grant = raw.open_session(1).await;
    assert_eq!(grant.ttl_ms, 50, "raised to the minimum");
    assert_eq!(grant.tick_ms, 10);
    assert_eq!(grant.drift_ppm, 1_000);
    let grant = raw.open_session(u64::MAX).await;
    assert_eq!(grant.ttl_ms, 300_000, "lowered to the maximum");
    server.stop().await.unwrap();
}

#[tokio::test]
async fn expiry_removes_ephemerals_and_tells_the_keepalive_connection() {
    let dir = tempfile::tempdir().unwrap();
    let server = TestServer::start(dir.path().to_path_buf()).await;
    let mut owner = Raw::connect(server.addr).await;
    let mut observer = Raw::connect(server.addr).await;
    let grant = owner.open_session(400).await;
    let header = SessionSeq {
        session: grant.session,
        seq: 1,
        floor: 1,
    };
    owner
        .write_in(header, create_op("/eph", b"mine", true))
        .await
        .unwrap();

    // Kept alive for well over the TTL, the session and its node live.
    for _ in 0..10 {
        let results = owner.keepalive(vec![grant.session]).await;
        assert_eq!(
            results,
            vec![(grant.session, KeepAliveResult::Ok { ttl_ms: 400 })]
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    assert!(
        observer.get("/eph").await.is_ok(),
        "alive after 500 ms of keepalives with TTL 400 ms"
    );

    // Then it stops: the server pushes the expiry to the connection that kept it alive.
    let pushed = tokio::time::timeout(Duration::from_secs(5), async {
        loop {
            if let Some(ServerMessage::SessionEvent { session, event, .. }) = owner.recv().await {
                return (session, event);
            }
        }
    })
    .await
    .expect("expiry pushed");
    assert_eq!(pushed, (grant.session, SessionEventKind::Expired));
    assert!(matches!(
        observer.get("/eph").await,
        Err(Error::NoNode { .. })
    ));
    assert_eq!(
        owner.keepalive(vec![grant.session]).await,
        vec![(grant.session, KeepAliveResult::Expired)]
    );
    let late = SessionSeq {
        session: grant.session,
        seq: 2,
        floor: 2,
    };
    assert!(matches!(
        owner.write_in(late, create_op("/late", b"", true)).await,
        Err(Error::SessionExpired { .. })
    ));
    server.stop().await.unwrap();
}

#[tokio::test]
async fn implicit_session_ephemerals_end_with_the_connection() {
    let dir = tempfile::tempdir().unwrap();
    let server = TestServer::start(dir.path().to_path_buf()).await;
    let mut observer = Raw::connect(server.addr).await;
    {
        let mut conn = Raw::connect(server.addr).await;
        conn.write(create_op("/conn-bound", b"", true))
            .await
            .unwrap();
        assert!(observer.get("/conn-bound").await.is_ok());
    }
    let gone = eventually(Duration::from_secs(5), || async {
        let mut raw = Raw::connect(server.addr).await;
        matches!(raw.get("/conn-bound").await, Err(Error::NoNode { .. }))
    })
    .await;
    assert!(gone, "the implicit session closed with its connection");
    server.stop().await.unwrap();
}

#[tokio::test]
async fn retried_write_returns_the_first_result() {
    let dir = tempfile::tempdir().unwrap();
    let server = TestServer::start(dir.path().to_path_buf()).await;
    let mut raw = Raw::connect(server.addr).await;
    let grant = raw.open_session(10_000).await;
    let first = SessionSeq {
        session: grant.session,
        seq: 1,
        floor: 1,
    };
    let created = raw
        .write_in(first, create_op("/once", b"", false))
        .await
        .unwrap();
    // The same request again (as after a lost response and a reconnect): the first answer.
    let mut other_conn = Raw::connect(server.addr).await;
    assert_eq!(
        other_conn
            .write_in(first, create_op("/once", b"", false))
            .await
            .unwrap(),
        created
    );
    let set = SetOp {
        path: "/once".into(),
        data: b"v1".to_vec(),
        expected_version: Some(0),
    };
    let second = SessionSeq {
        session: grant.session,
        seq: 2,
        floor: 1,
    };
    let r1 = raw
        .write_in(second, WriteOp::Set(set.clone()))
        .await
        .unwrap();
    let r2 = raw.write_in(second, WriteOp::Set(set)).await.unwrap();
    assert_eq!(
        r1, r2,
        "not BadVersion: the retry is answered from the dedup record"
    );
    // Once the floor passes a seq, the seq is stale.
    let third = SessionSeq {
        session: grant.session,
        seq: 1,
        floor: 3,
    };
    assert!(matches!(
        raw.write_in(third, create_op("/x", b"", false)).await,
        Err(Error::StaleRequest { .. })
    ));
    match raw.get("/once").await.unwrap() {
        Reply::Node { stat, .. } => assert_eq!(stat.version, 1),
        other => panic!("{other:?}"),
    }
    server.stop().await.unwrap();
}

#[tokio::test]
async fn thousand_pipelined_requests_on_one_connection() {
    let dir = tempfile::tempdir().unwrap();
    let server = TestServer::start(dir.path().to_path_buf()).await;
    let mut raw = Raw::connect(server.addr).await;
    raw.create("/p", b"").await.unwrap();
    // 1,000 requests written back to back before reading any answer: writes and reads mixed.
    for i in 0..1000u64 {
        let request = if i % 4 == 3 {
            Request::Read {
                consistency: lockd_protocol::Consistency::Linearizable,
                op: lockd_protocol::ReadOp::Stat { path: "/p".into() },
            }
        } else {
            Request::Write {
                session: None,
                op: create_op(&format!("/p/n{i}"), &i.to_be_bytes(), false),
            }
        };
        raw.framed
            .feed(ClientMessage::Request {
                request_id: 10_000 + i,
                request,
            })
            .await
            .unwrap();
    }
    raw.framed.flush().await.unwrap();
    let mut seen = HashSet::new();
    let mut revisions = HashSet::new();
    while seen.len() < 1000 {
        match raw.recv().await {
            Some(ServerMessage::Response {
                request_id,
                revision,
                result,
            }) => {
                let i = request_id - 10_000;
                assert!(seen.insert(request_id), "one answer per request");
                match result.unwrap() {
                    Reply::Write(WriteResult::Created { path, stat }) => {
                        assert_eq!(path, format!("/p/n{i}"));
                        assert_eq!(stat.create_rev, revision);
                        assert!(
                            revisions.insert(revision),
                            "each write has its own revision"
                        );
                    }
                    Reply::Stat(Some(_)) => assert_eq!(i % 4, 3),
                    other => panic!("{other:?}"),
                }
            }
            other => panic!("unexpected {other:?}"),
        }
    }
    assert_eq!(revisions.len(), 750);
    server.stop().await.unwrap();
}
