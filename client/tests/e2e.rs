//! End-to-end tests of the client library against a real lockd server started in this
//! process (port 0, a temp dir, test timings: tick 10 ms, session TTL at least 50 ms).

mod support;

use std::collections::BTreeSet;
use std::time::Duration;

use futures_util::future::join_all;
use lockd_client::protocol::{Error as Wire, MultiResult, ServerMessage, WriteResult};
use lockd_client::{Client, Error, SessionStatus};
use lockd_protocol::{Reply, Request};
use support::{client, config, eventually, server, Proxy, Raw, TestServer};
use tokio::net::TcpListener;
use tokio::time::Instant;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn namespace_round_trip_with_typed_errors() {
    let (_dir, srv) = server().await;
    let c = client(&srv).await;

    let created = c.create("/app", b"v0".to_vec()).await.expect("create");
    assert_eq!(created.path, "/app");
    assert_eq!(created.stat.version, 0);
    assert_eq!(created.stat.create_rev, created.revision);
    assert_eq!(created.stat.ephemeral_owner, None);

    let got = c.get("/app").await.expect("get");
    assert_eq!(got.data, b"v0");
    assert_eq!(got.stat, created.stat);
    assert!(got.revision >= created.revision);

    // Compare-and-set: applies at the current version, fails typed at another.
    let set = c
        .set("/app", b"v1".to_vec())
        .if_version(0)
        .await
        .expect("cas");
    assert_eq!(set.stat.version, 1);
    assert_eq!(set.stat.mod_rev, set.revision);
    assert!(
        set.revision > created.revision,
        "writes advance the revision"
    );
    match c.set("/app", b"lost".to_vec()).if_version(0).await {
        Err(Error::Server(Wire::BadVersion {
            path,
            expected,
            actual,
        })) => assert_eq!((path.as_str(), expected, actual), ("/app", 0, 1)),
        other => panic!("expected BadVersion, got {other:?}"),
    }
    assert_eq!(
        c.get("/app").await.expect("get").data,
        b"v1",
        "failed CAS changed nothing"
    );
    let unconditional = c.set("/app", b"v2".to_vec()).await.expect("set");
    assert_eq!(unconditional.stat.version, 2);
    assert!(unconditional.revision > set.revision);

    match c.create("/app", Vec::<u8>::new()).await {
        Err(Error::Server(Wire::NodeExists { path })) => assert_eq!(path, "/app"),
        other => panic!("expected NodeExists, got {other:?}"),
    }
    match c.get("/missing").await {
        Err(Error::Server(Wire::NoNode { path })) => assert_eq!(path, "/missing"),
        other => panic!("expected NoNode, got {other:?}"),
    }
    let e = c
        .create("/missing/child", Vec::<u8>::new())
        .await
        .expect_err("parent missing");
    assert!(e.is_no_node(), "{e:?}");

    // stat and exists.
    let child = c.create("/app/child", b"c".to_vec()).await.expect("child");
    assert!(child.revision > unconditional.revision);
    let stat = c.stat("/app").await.expect("stat");
    let s = stat.stat.expect("exists");
    assert_eq!((s.version, s.num_children, s.data_len), (2, 1, 2));
    assert!(stat.revision >= child.revision);
    assert_eq!(c.stat("/nope").await.expect("stat").stat, None);
    assert!(c.exists("/app/child").await.expect("exists"));
    assert!(!c.exists("/nope").await.expect("exists"));

    // delete: NotEmpty, BadVersion, then in order.
    match c.delete("/app").await {
        Err(Error::Server(Wire::NotEmpty { path })) => assert_eq!(path, "/app"),
        other => panic!("expected NotEmpty, got {other:?}"),
    }
    let e = c
        .delete("/app/child")
        .if_version(7)
        .await
        .expect_err("bad version");
    assert!(e.is_bad_version(), "{e:?}");
    assert!(c.exists("/app/child").await.expect("exists"));
    let d1 = c.delete("/app/child").if_version(0).await.expect("delete");
    assert!(d1.revision > child.revision);
    let d2 = c.delete("/app").await.expect("delete");
    assert!(d2.revision > d1.revision);
    assert!(!c.exists("/app").await.expect("exists"));
    match c.delete("/app").await {
        Err(Error::Server(Wire::NoNode { .. })) => {}
        other => panic!("expected NoNode, got {other:?}"),
    }
    let status = c.cluster_status().await.expect("status");
    assert!(status.revision >= d2.revision);
    assert_eq!(status.status.members.len(), 1);
    assert_eq!(status.status.members[0].client_addr, srv.endpoint());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn children_listing_spans_many_pages() {
    let (_dir, srv) = server().await;
    let c = client(&srv).await;
    c.create("/many", Vec::<u8>::new()).await.expect("parent");
    // Names whose byte order differs from creation order ("n10" < "n9"), created from the
    // highest number down, so a sorted answer is the server's doing.
    const N: usize = 2_500;
    let names: Vec<String> = (0..N).rev().map(|i| format!("n{i}")).collect();
    for chunk in names.chunks(500) {
        let creates = chunk.iter().map(|name| {
            let c = c.clone();
            let path = format!("/many/{name}");
            async move { c.create(path, Vec::<u8>::new()).await }
        });
        for r in join_all(creates).await {
            r.expect("create child");
        }
    }
    let mut want = names.clone();
    want.sort();

    let paged = c.children("/many").page_size(97).await.expect("children");
    assert_eq!(paged.names.len(), N);
    assert_eq!(paged.names, want, "all names, in byte order, none repeated");
    let whole = c
        .children("/many")
        .await
        .expect("children, server's page size");
    assert_eq!(whole.names, want);
    assert_eq!(
        c.stat("/many")
            .await
            .expect("stat")
            .stat
            .expect("exists")
            .num_children,
        N as u32
    );
    assert!(c.children("/many/n1").await.expect("leaf").names.is_empty());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn multi_is_all_or_nothing() {
    let (_dir, srv) = server().await;
    let c = client(&srv).await;
    c.create("/m", b"0".to_vec()).await.expect("create");
    c.create("/gone", Vec::<u8>::new()).await.expect("create");

    let ok = c
        .multi()
        .check("/m", 0)
        .set("/m", b"1".to_vec())
        .create("/m/a", b"a".to_vec())
        .delete("/gone")
        .await
        .expect("multi");
    assert_eq!(ok.results.len(), 4);
    assert_eq!(ok.results[0], MultiResult::Checked);
    match &ok.results[1] {
        MultiResult::Set { stat } => assert_eq!((stat.version, stat.mod_rev), (1, ok.revision)),
        other => panic!("expected Set, got {other:?}"),
    }
    match &ok.results[2] {
        MultiResult::Created { path, stat } => {
            assert_eq!(path, "/m/a");
            assert_eq!(stat.create_rev, ok.revision);
        }
        other => panic!("expected Created, got {other:?}"),
    }
    assert_eq!(ok.results[3], MultiResult::Deleted);
    assert_eq!(c.get("/m").await.expect("get").data, b"1");
    assert!(!c.exists("/gone").await.expect("exists"));

    // The third op fails: the first two (a create and a set) must not be applied.
    let before = c.get("/m").await.expect("get");
    match c
        .multi()
        .create("/m/b", b"b".to_vec())
        .set("/m", b"2".to_vec())
        .set_if_version("/m/a", b"x".to_vec(), 5)
        .await
    {
        Err(Error::Server(Wire::MultiFailed { index, error })) => {
            assert_eq!(index, 2);
            assert!(
                matches!(
                    *error.0,
                    Wire::BadVersion {
                        expected: 5,
                        actual: 0,
                        ..
                    }
                ),
                "{error:?}"
            );
        }
        other => panic!("expected MultiFailed, got {other:?}"),
    }
    assert!(
        !c.exists("/m/b").await.expect("exists"),
        "create rolled back"
    );
    let after = c.get("/m").await.expect("get");
    assert_eq!(
        (after.data, after.stat),
        (before.data, before.stat),
        "set rolled back"
    );
    match c.multi().check("/nope", 0).await {
        Err(Error::Server(Wire::MultiFailed { index: 0, error })) => {
            assert!(matches!(*error.0, Wire::NoNode { .. }), "{error:?}")
        }
        other => panic!("expected MultiFailed at 0, got {other:?}"),
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn invalid_paths_are_rejected_before_sending() {
    let (_dir, srv) = server().await;
    let c = client(&srv).await;
    // Error::Invalid is the client's own rejection; the server would answer Error::Server.
    for bad in ["relative", "/a/", "/a//b", "", "/a/./b"] {
        let results = [
            c.get(bad).await.map(drop),
            c.create(bad, Vec::<u8>::new()).await.map(drop),
            c.set(bad, Vec::<u8>::new()).await.map(drop),
            c.delete(bad).await.map(drop),
            c.children(bad).await.map(drop),
            c.stat(bad).await.map(drop),
            c.multi()
                .create("/fine", Vec::<u8>::new())
                .delete(bad)
                .await
                .map(drop),
        ];
        for r in results {
            assert!(
                matches!(r, Err(Error::Invalid(Wire::InvalidPath { .. }))),
                "{bad:?}: {r:?}"
            );
        }
    }
    assert!(
        !c.exists("/fine").await.expect("exists"),
        "the multi was not sent"
    );
    // The same client still works: nothing broke the connection.
    c.create("/fine", Vec::<u8>::new())
        .await
        .expect("valid create");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn session_ttl_is_clamped_by_the_server() {
    let (_dir, srv) = server().await;
    let c = client(&srv).await;
    let short = c.session(Duration::from_millis(1)).await.expect("session");
    assert_eq!(short.grant().ttl_ms, 50, "raised to session_ttl_min_ms");
    assert_eq!(short.grant().tick_ms, 10);
    let long = c
        .session(Duration::from_secs(3_600))
        .await
        .expect("session");
    assert_eq!(
        long.grant().ttl_ms,
        lockd_server::Config::for_tests(std::path::PathBuf::new()).session_ttl_max_ms,
        "lowered to session_ttl_max_ms"
    );
    assert_ne!(short.id(), long.id());
    assert!(
        long.revision() > short.revision(),
        "opening a session is a write"
    );
    assert!(matches!(
        c.session(Duration::ZERO).await,
        Err(Error::Invalid(Wire::InvalidArgument(_)))
    ));
    long.close().await.expect("close");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn keepalives_hold_ephemerals_and_close_deletes_them() {
    let (_dir, srv) = server().await;
    let c = client(&srv).await;
    let session = c
        .session(Duration::from_millis(200))
        .await
        .expect("session");
    assert_eq!(session.grant().ttl_ms, 200);
    let e = session
        .create("/worker", b"busy".to_vec())
        .ephemeral()
        .await
        .expect("ephemeral");
    assert_eq!(e.stat.ephemeral_owner, Some(session.id()));
    match c.create("/worker/child", Vec::<u8>::new()).await {
        Err(Error::Server(Wire::EphemeralParent { path })) => assert_eq!(path, "/worker"),
        other => panic!("expected EphemeralParent, got {other:?}"),
    }

    // Five TTLs: only the background keepalives keep the node.
    tokio::time::sleep(Duration::from_secs(1)).await;
    assert_ne!(session.status(), SessionStatus::Expired);
    assert!(session.safe_until().expect("alive") > Instant::now());
    let still = c
        .stat("/worker")
        .await
        .expect("stat")
        .stat
        .expect("kept alive");
    assert_eq!(still.ephemeral_owner, Some(session.id()));

    session.close().await.expect("close");
    assert_eq!(session.status(), SessionStatus::Expired);
    assert!(session.safe_until().is_none());
    // Closing is committed before it is answered: the node is gone at once.
    assert!(!c.exists("/worker").await.expect("exists"));
    let e = session
        .create("/late", Vec::<u8>::new())
        .await
        .expect_err("closed session");
    assert!(
        matches!(e, Error::SessionExpired(id) if id == session.id()),
        "{e:?}"
    );
    session.close().await.expect("closing twice succeeds");
    assert!(!c.exists("/late").await.expect("exists"));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn ephemeral_without_session_uses_the_default_session() {
    let (_dir, srv) = server().await;
    let observer = client(&srv).await;
    let c = Client::with_config(
        config([srv.endpoint()]).default_session_ttl(Duration::from_millis(200)),
    )
    .await
    .expect("connect");
    let e = c
        .create("/svc-", b"10.0.0.1".to_vec())
        .ephemeral()
        .sequential()
        .await
        .expect("ephemeral");
    assert_eq!(e.path, "/svc-0000000000");
    let default = c.default_session().await.expect("default session");
    assert_eq!(default.grant().ttl_ms, 200);
    assert_eq!(e.stat.ephemeral_owner, Some(default.id()));
    let again = c
        .create("/svc-", Vec::<u8>::new())
        .ephemeral()
        .sequential()
        .await
        .expect("second");
    assert_eq!(
        again.stat.ephemeral_owner,
        Some(default.id()),
        "one default session"
    );
    drop(default);

    // No handle to the default session is held: the client keeps it alive by itself.
    tokio::time::sleep(Duration::from_secs(1)).await;
    assert!(observer.exists(&e.path).await.expect("exists"));

    drop(c);
    let gone = eventually(Duration::from_secs(3), || async {
        !observer.exists(&e.path).await.expect("exists")
            && !observer.exists(&again.path).await.expect("exists")
    })
    .await;
    assert!(gone, "the default session ends with its client");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn dropped_client_lets_its_session_expire() {
    let (_dir, srv) = server().await;
    let observer = client(&srv).await;
    let b = client(&srv).await;
    let ttl = Duration::from_millis(300);
    let session = b.session(ttl).await.expect("session");
    session
        .create("/lease", Vec::<u8>::new())
        .ephemeral()
        .await
        .expect("ephemeral");
    // Renewed past its first TTL.
    tokio::time::sleep(ttl * 2).await;
    assert!(observer.exists("/lease").await.expect("exists"));

    drop(session);
    drop(b);
    let dropped = Instant::now();
    assert!(
        observer.exists("/lease").await.expect("exists"),
        "not yet expired"
    );
    let gone = eventually(ttl + Duration::from_secs(2), || async {
        !observer.exists("/lease").await.expect("exists")
    })
    .await;
    assert!(gone, "the session expired once keepalives stopped");
    // The last keepalive was at most a third of the TTL before the drop.
    assert!(
        dropped.elapsed() >= ttl / 3,
        "expired too early: {:?}",
        dropped.elapsed()
    );
}

/// A session the server ends while its client still holds it must report `Expired`.
/// The API offers no way to make a live client stop its keepalives, and a server restart
/// gives sessions a fresh TTL, so the deterministic way is to end the session on the server
/// from elsewhere: a raw `CloseSession` on another connection. The holder then learns it
/// from the pushed `SessionEvent` or from its next keepalive answered `Expired`, whichever
/// comes first, long before its own safe bound (TTL 10 s) could pass.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn session_ended_by_the_server_reports_expired() {
    let (_dir, srv) = server().await;
    let a = client(&srv).await;
    let session = a.session(Duration::from_secs(10)).await.expect("session");
    session
        .create("/held", Vec::<u8>::new())
        .ephemeral()
        .await
        .expect("ephemeral");
    let mut status = session.watch_status();
    assert_eq!(*status.borrow_and_update(), SessionStatus::Connected);

    let started = Instant::now();
    let mut raw = Raw::connect(srv.addr).await;
    let (_, closed) = raw
        .request(Request::CloseSession {
            session: session.id(),
        })
        .await;
    assert_eq!(closed, Ok(Reply::SessionClosed));
    assert!(!a.exists("/held").await.expect("exists"));

    tokio::time::timeout(Duration::from_secs(3), session.expired())
        .await
        .expect("Expired reported within 3 s");
    assert!(
        started.elapsed() < Duration::from_secs(5),
        "not the safe bound"
    );
    let seen = tokio::time::timeout(
        Duration::from_secs(1),
        status.wait_for(|s| *s == SessionStatus::Expired),
    )
    .await
    .expect("watch_status sees Expired")
    .map(|s| *s);
    assert_eq!(seen.expect("sender alive"), SessionStatus::Expired);
    assert!(session.safe_until().is_none());
    let e = session
        .set("/held", Vec::<u8>::new())
        .await
        .expect_err("expired");
    assert!(e.is_session_expired(), "{e:?}");
    // The client itself is fine, and opens new sessions.
    let fresh = a
        .session(Duration::from_secs(10))
        .await
        .expect("new session");
    assert_eq!(fresh.status(), SessionStatus::Connected);
}

/// With the server gone, no keepalive is answered: the session goes into jeopardy and the
/// client declares it expired at its safe bound, on its own. The session is still in the
/// store, so a restarted server gives it a fresh TTL and then expires it (nobody renews it).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn unreachable_server_expires_the_session_at_its_safe_bound() {
    let dir = tempfile::tempdir().expect("temp dir");
    let srv = TestServer::start(dir.path()).await;
    let c = client(&srv).await;
    let ttl = Duration::from_millis(300);
    let session = c.session(ttl).await.expect("session");
    session
        .create("/eph", Vec::<u8>::new())
        .ephemeral()
        .await
        .expect("ephemeral");
    let mut status = session.watch_status();
    srv.stop().await;
    let stopped = Instant::now();
    let first_change = tokio::time::timeout(ttl * 2, status.changed())
        .await
        .expect("status changes within 2 TTLs")
        .map(|()| *status.borrow_and_update());
    assert!(
        matches!(
            first_change,
            Ok(SessionStatus::Jeopardy | SessionStatus::Expired)
        ),
        "{first_change:?}"
    );
    tokio::time::timeout(ttl * 2, session.expired())
        .await
        .expect("expired within 2 TTLs of the last answered keepalive");
    // Not before the bound: the last keepalive was answered at most a third of a TTL
    // before the stop, and the bound is TTL − tick after it.
    assert!(stopped.elapsed() >= ttl / 2, "{:?}", stopped.elapsed());
    let e = session
        .create("/x", Vec::<u8>::new())
        .await
        .expect_err("expired");
    assert!(matches!(e, Error::SessionExpired(_)), "{e:?}");

    let srv = TestServer::start(dir.path()).await;
    let c2 = client(&srv).await;
    assert!(
        c2.exists("/eph").await.expect("exists"),
        "restored with the session"
    );
    let gone = eventually(ttl + Duration::from_secs(2), || async {
        !c2.exists("/eph").await.expect("exists")
    })
    .await;
    assert!(gone, "the restored session expires after its fresh TTL");
    srv.stop().await;
}

/// The server applies a session write but its response is lost (the proxy withholds it and
/// then cuts the connection); the client retries with the same seq on a new connection and
/// gets the first result from the dedup record. A sequential create shows it: applied twice
/// it would create a second node with the next number.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn lost_response_of_a_session_write_is_applied_once() {
    let (_dir, srv) = server().await;
    let proxy = Proxy::start(srv.addr).await;
    let c = Client::with_config(config([proxy.addr.to_string()]))
        .await
        .expect("connect via proxy");
    c.create("/q", Vec::<u8>::new()).await.expect("parent");
    let session = c.session(Duration::from_secs(5)).await.expect("session");

    proxy.arm();
    let s = session.clone();
    let write =
        tokio::spawn(async move { s.create("/q/job-", b"once".to_vec()).sequential().await });
    let withheld = proxy.withheld().await;
    let ServerMessage::Response {
        result: Ok(Reply::Write(WriteResult::Created { path: first, .. })),
        ..
    } = withheld
    else {
        panic!("withheld {withheld:?}");
    };
    assert!(!write.is_finished(), "the client has no answer yet");
    proxy.cut(false);

    let created = tokio::time::timeout(Duration::from_secs(10), write)
        .await
        .expect("retried in time")
        .expect("join")
        .expect("retry answered from the dedup record, not NodeExists");
    assert_eq!(created.path, first);
    assert_eq!(created.path, "/q/job-0000000000");
    assert_eq!(
        c.children("/q").await.expect("ls").names,
        ["job-0000000000"]
    );
    let next = session
        .create("/q/job-", Vec::<u8>::new())
        .sequential()
        .await
        .expect("next");
    assert_eq!(next.path, "/q/job-0000000001", "the counter advanced once");
}

/// As above, but the server is restarted (gracefully, same data dir, another port) while
/// the response is lost, and the client reaches the new server through its second
/// endpoint: the dedup record survived the restart.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn lost_response_is_answered_once_after_a_restart() {
    let dir = tempfile::tempdir().expect("temp dir");
    let first = TestServer::start(dir.path()).await;
    // The restarted server's listener, bound now so the client can be told its address.
    let second_listener = TcpListener::bind("127.0.0.1:0").await.expect("bind");
    let second_addr = second_listener.local_addr().expect("addr");
    let proxy = Proxy::start(first.addr).await;
    let c = Client::with_config(config([proxy.addr.to_string(), second_addr.to_string()]))
        .await
        .expect("connect via proxy");
    assert_eq!(c.connected_to(), Some(proxy.addr.to_string()));
    c.create("/r", Vec::<u8>::new()).await.expect("parent");
    let session = c.session(Duration::from_secs(5)).await.expect("session");

    proxy.arm();
    let s = session.clone();
    let write = tokio::spawn(async move { s.create("/r/n-", b"x".to_vec()).sequential().await });
    let withheld = proxy.withheld().await;
    let ServerMessage::Response {
        result: Ok(Reply::Write(WriteResult::Created { path: applied, .. })),
        ..
    } = withheld
    else {
        panic!("withheld {withheld:?}");
    };
    first.stop().await;
    let second = TestServer::start_on(second_listener, dir.path()).await;
    proxy.cut(true);

    let created = tokio::time::timeout(Duration::from_secs(10), write)
        .await
        .expect("retried in time")
        .expect("join")
        .expect("retry after restart answered from the dedup record");
    assert_eq!(created.path, applied);
    assert_eq!(c.connected_to(), Some(second_addr.to_string()));
    assert_eq!(c.children("/r").await.expect("ls").names, ["n-0000000000"]);
    // The session lives on after the restart.
    let next = session
        .create("/r/n-", Vec::<u8>::new())
        .sequential()
        .await
        .expect("next");
    assert_eq!(next.path, "/r/n-0000000001");
    session.close().await.expect("close");
    second.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn acknowledged_writes_survive_a_graceful_restart() {
    let dir = tempfile::tempdir().expect("temp dir");
    let srv = TestServer::start(dir.path()).await;
    let c = client(&srv).await;
    c.create("/d", Vec::<u8>::new()).await.expect("parent");
    let creates = (0..300).map(|i| {
        let c = c.clone();
        async move {
            c.create(format!("/d/k{i:03}"), format!("v{i}").into_bytes())
                .await
        }
    });
    let mut last = 0;
    for r in join_all(creates).await {
        last = last.max(r.expect("create").revision);
    }
    let set = c.set("/d/k007", b"changed".to_vec()).await.expect("set");
    let del = c.delete("/d/k008").await.expect("delete");
    last = last.max(set.revision).max(del.revision);
    drop(c);
    srv.stop().await;

    let srv = TestServer::start(dir.path()).await;
    let c = client(&srv).await;
    let names = c.children("/d").await.expect("ls").names;
    assert_eq!(names.len(), 299);
    let reads = (0..300).map(|i| {
        let c = c.clone();
        async move { (i, c.get(format!("/d/k{i:03}")).await) }
    });
    for (i, r) in join_all(reads).await {
        match (i, r) {
            (8, Err(e)) => assert!(e.is_no_node(), "{e:?}"),
            (7, Ok(got)) => assert_eq!((got.data, got.stat.version), (b"changed".to_vec(), 1)),
            (i, Ok(got)) => {
                assert_eq!(got.data, format!("v{i}").into_bytes());
                assert!(
                    got.revision >= last,
                    "reads reflect every acknowledged write"
                );
            }
            (i, Err(e)) => panic!("k{i:03}: {e}"),
        }
    }
    let after = c.create("/d/new", Vec::<u8>::new()).await.expect("create");
    assert!(
        after.revision > last,
        "revisions continue after the restart"
    );
    srv.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn thousand_pipelined_requests_on_one_connection() {
    let (_dir, srv) = server().await;
    let c = client(&srv).await;
    c.create("/p", Vec::<u8>::new()).await.expect("parent");
    const N: usize = 1_000;
    let creates = (0..N).map(|i| {
        let c = c.clone();
        async move {
            c.create(format!("/p/{i}"), i.to_string().into_bytes())
                .await
        }
    });
    let created: Vec<_> = join_all(creates)
        .await
        .into_iter()
        .map(|r| r.expect("create"))
        .collect();
    let revisions: BTreeSet<u64> = created.iter().map(|c| c.revision).collect();
    assert_eq!(revisions.len(), N, "every write is its own revision");
    for (i, c) in created.iter().enumerate() {
        assert_eq!(c.path, format!("/p/{i}"));
    }

    // A mix of reads and writes in flight together.
    let mixed = (0..N).map(|i| {
        let c = c.clone();
        async move {
            if i % 2 == 0 {
                let got = c.get(format!("/p/{i}")).await.expect("get");
                assert_eq!(
                    got.data,
                    i.to_string().into_bytes(),
                    "answer routed to its caller"
                );
            } else {
                let set = c
                    .set(format!("/p/{i}"), b"odd".to_vec())
                    .if_version(0)
                    .await
                    .expect("set");
                assert_eq!(set.stat.version, 1);
            }
        }
    });
    join_all(mixed).await;
    assert_eq!(c.get("/p/999").await.expect("get").data, b"odd");
    assert_eq!(c.children("/p").await.expect("ls").names.len(), N);
}
