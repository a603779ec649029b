//! The per-session lock event hub: guards learn of revocations and releases made by anyone,
//! waits end on timeout or session end, abandoned acquires (queued or still in flight) leave
//! no waiter behind, and many acquires on one session never miss a grant.

mod support;

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::Duration;

use lockd_client::protocol::{ReleaseOp, Reply, Request, WriteOp, WriteResult};
use lockd_client::{Client, Error};
use support::{eventually, Raw};
use tokio::time::timeout;

async fn release_elsewhere(raw: &mut Raw, lock: &str, token: u64) {
    let (_, result) = raw
        .request(Request::Write {
            session: None,
            op: WriteOp::Release(ReleaseOp {
                lock: lock.into(),
                token,
            }),
        })
        .await;
    assert!(
        matches!(result, Ok(Reply::Write(WriteResult::Released))),
        "{result:?}"
    );
}

async fn no_waiters(c: &Client, lock: &str) -> bool {
    let c = c.clone();
    let lock = lock.to_string();
    eventually(Duration::from_secs(5), move || {
        let (c, lock) = (c.clone(), lock.clone());
        async move {
            c.lock_info(lock)
                .await
                .is_ok_and(|r| r.info.waiters.is_empty())
        }
    })
    .await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_release_by_someone_else_fires_lost_for_immediate_and_queued_grants() {
    let (_dir, server) = support::server().await;
    let a = support::client(&server).await;
    let b = support::client(&server).await;
    let mut raw = Raw::connect(server.addr).await;

    let guard = a.lock("x").await.expect("lock");
    assert!(!guard.is_lost());
    release_elsewhere(&mut raw, "x", guard.token()).await;
    timeout(Duration::from_secs(2), guard.lost())
        .await
        .expect("lost after a foreign release (immediate grant)");

    let held = a.lock("y").await.expect("lock");
    let waiting = tokio::spawn(async move { b.lock("y").await });
    let a2 = a.clone();
    assert!(
        eventually(Duration::from_secs(5), move || {
            let a2 = a2.clone();
            async move {
                a2.lock_info("y")
                    .await
                    .is_ok_and(|r| r.info.waiters.len() == 1)
            }
        })
        .await,
        "b queued"
    );
    held.release().await.expect("release");
    let queued = waiting.await.expect("join").expect("b granted");
    assert!(!queued.is_lost());
    release_elsewhere(&mut raw, "y", queued.token()).await;
    timeout(Duration::from_secs(2), queued.lost())
        .await
        .expect("lost after a foreign release (queued grant)");
    server.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn closing_the_session_elsewhere_fires_lost_and_ends_waits() {
    let (_dir, server) = support::server().await;
    let a = support::client(&server).await;
    let other = support::client(&server).await;
    let mut raw = Raw::connect(server.addr).await;
    let session = a.session(Duration::from_secs(5)).await.expect("session");
    let guard = a.lock("g").session(&session).await.expect("lock");
    let blocker = other.lock("w").await.expect("lock");
    let (a2, s2) = (a.clone(), session.clone());
    let waiting = tokio::spawn(async move { a2.lock("w").session(&s2).await });
    tokio::time::sleep(Duration::from_millis(100)).await;
    let (_, closed) = raw
        .request(Request::CloseSession {
            session: session.id(),
        })
        .await;
    assert!(closed.is_ok(), "{closed:?}");
    timeout(Duration::from_secs(2), guard.lost())
        .await
        .expect("lost when the session ends");
    let ended = timeout(Duration::from_secs(2), waiting)
        .await
        .expect("the wait ends")
        .expect("join");
    assert!(
        matches!(
            ended,
            Err(Error::SessionExpired(_)) | Err(Error::LockWaitEnded { .. })
        ),
        "{ended:?}"
    );
    blocker.release().await.expect("release");
    server.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn timed_out_and_abandoned_acquires_leave_no_waiter() {
    let (_dir, server) = support::server().await;
    let a = support::client(&server).await;
    let holder = support::client(&server).await;
    let held = holder.lock("t").await.expect("lock");

    let timed_out = a.lock("t").timeout(Duration::from_millis(100)).await;
    assert!(
        matches!(timed_out, Err(Error::LockWaitEnded { .. })),
        "{timed_out:?}"
    );
    assert!(no_waiters(&a, "t").await, "the timed-out wait is gone");

    // Dropped while queued.
    let a2 = a.clone();
    let queued = tokio::spawn(async move { a2.lock("t").await });
    tokio::time::sleep(Duration::from_millis(100)).await;
    queued.abort();
    assert!(no_waiters(&a, "t").await, "the dropped wait was cancelled");

    // Dropped at any point, mostly with the acquire write in flight.
    for i in 0..30 {
        let a2 = a.clone();
        let acquiring = tokio::spawn(async move { a2.lock("t").await });
        for _ in 0..(i % 5) {
            tokio::task::yield_now().await;
        }
        acquiring.abort();
    }
    assert!(
        no_waiters(&a, "t").await,
        "abandoned acquires were cancelled"
    );
    held.release().await.expect("release");
    let again = a.lock("t").try_lock().await.expect("free");
    again.release().await.expect("release");
    server.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn many_acquires_on_one_session_never_miss_a_grant() {
    let (_dir, server) = support::server().await;
    let c = support::client(&server).await;
    let session = c.session(Duration::from_secs(5)).await.expect("session");
    let inside = Arc::new(AtomicBool::new(false));
    let mut tasks = Vec::new();
    for t in 0..8 {
        let (c, session, inside) = (c.clone(), session.clone(), inside.clone());
        tasks.push(tokio::spawn(async move {
            for _ in 0..40 {
                let own = c
                    .lock(format!("own-{t}"))
                    .session(&session)
                    .await
                    .expect("own lock");
                let shared = c.lock("shared").session(&session).await.expect("lock");
                assert!(!inside.swap(true, Ordering::SeqCst), "both inside");
                tokio::task::yield_now().await;
                inside.store(false, Ordering::SeqCst);
                assert!(!shared.is_lost() && !own.is_lost());
                shared.release().await.expect("release");
                own.release().await.expect("release");
            }
        }));
    }
    for t in tasks {
        timeout(Duration::from_secs(60), t)
            .await
            .expect("in time")
            .expect("task");
    }
    server.stop().await;
}
