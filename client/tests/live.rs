//! Smoke test against a running lockd, only when `LOCKD_TEST_ENDPOINTS` is set (e.g.
//! `LOCKD_TEST_ENDPOINTS=127.0.0.1:7001 cargo test -p lockd-client --test live`). Tests that
//! start their own server in-process come with `lockd_server::run`.

use std::time::Duration;

use lockd_client::{Client, SessionStatus};

#[tokio::test]
async fn live_server_round_trip() {
    let Ok(endpoints) = std::env::var("LOCKD_TEST_ENDPOINTS") else {
        eprintln!("LOCKD_TEST_ENDPOINTS not set; skipping");
        return;
    };
    let client = Client::connect(endpoints.split(',').map(str::to_string))
        .await
        .expect("connect");
    let root = format!("/live-{}", std::process::id());
    client
        .create(&root, b"r".to_vec())
        .await
        .expect("create root");

    // Pipelined session writes: seqs and floors advance together.
    let session = client
        .session(Duration::from_secs(5))
        .await
        .expect("session");
    let creates = (0..50).map(|i| {
        let session = session.clone();
        let path = format!("{root}/c{i:02}");
        async move { session.create(path, vec![i as u8]).await }
    });
    for r in futures_util::future::join_all(creates).await {
        r.expect("create");
    }
    let listed = client.children(&root).page_size(7).await.expect("children");
    assert_eq!(listed.names.len(), 50);
    assert_eq!(listed.names[0], "c00");

    // Ephemeral through the default session.
    let e = client
        .create(format!("{root}/e-"), Vec::<u8>::new())
        .ephemeral()
        .sequential()
        .await
        .expect("ephemeral");
    let owner = client
        .stat(&e.path)
        .await
        .expect("stat")
        .stat
        .expect("exists");
    let default = client.default_session().await.expect("default");
    assert_eq!(owner.ephemeral_owner, Some(default.id()));

    // Compare-and-set and multi.
    let set = client
        .set(&root, b"r2".to_vec())
        .if_version(0)
        .await
        .expect("cas");
    assert_eq!(set.stat.version, 1);
    assert!(client
        .set(&root, b"r3".to_vec())
        .if_version(0)
        .await
        .expect_err("stale version")
        .is_bad_version());
    let m = client
        .multi()
        .check(&root, 1)
        .set(format!("{root}/c00"), b"m".to_vec())
        .delete(format!("{root}/c01"))
        .await
        .expect("multi");
    assert_eq!(m.results.len(), 3);
    assert_eq!(
        client
            .get(format!("{root}/c00"))
            .stale()
            .await
            .expect("get")
            .data,
        b"m"
    );

    assert_eq!(session.status(), SessionStatus::Connected);
    session.close().await.expect("close");
    assert_eq!(session.status(), SessionStatus::Expired);
    assert!(session
        .create(format!("{root}/late"), Vec::<u8>::new())
        .await
        .expect_err("closed")
        .is_session_expired());
}
