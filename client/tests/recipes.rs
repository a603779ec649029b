//! Locks, fencing, lock-delay, leader election and resumable watches against a real
//! in-process server with test timings (tick 10 ms, TTL min 50 ms, progress every 50 ms).

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::Duration;

use futures_util::StreamExt;
use lockd_client::protocol::{EventKind, WatchTarget};
use lockd_client::{Client, ClientConfig, Error, Leader, LeaderElection, WatchItem};
use lockd_server::storage::Storage;
use lockd_server::Config;
use tokio::net::TcpListener;
use tokio::sync::oneshot;
use tokio::time::{timeout, Instant};

/// Contenders and rounds of the mutual exclusion test (CI-sized).
const CONTENDERS: usize = 16;
const ROUNDS: usize = 50;

struct Server {
    addr: SocketAddr,
    stop: Option<oneshot::Sender<()>>,
    task: Option<tokio::task::JoinHandle<Result<(), lockd_server::ServerError>>>,
}

impl Server {
    async fn start(dir: &Path) -> Server {
        let listener = TcpListener::bind("127.0.0.1:0").await.expect("bind");
        Server::start_on(dir, listener).await
    }

    async fn start_on(dir: &Path, listener: TcpListener) -> Server {
        let config = Config::for_tests(dir.to_path_buf());
        let storage = Storage::open(&config.data_dir, config.log_retain).expect("open storage");
        let addr = listener.local_addr().expect("addr");
        let (stop, stopped) = oneshot::channel::<()>();
        let task = tokio::spawn(lockd_server::node::run_with_storage(
            listener,
            config,
            storage,
            async {
                let _ = stopped.await;
            },
        ));
        Server {
            addr,
            stop: Some(stop),
            task: Some(task),
        }
    }

    async fn stop(mut self) {
        if let Some(stop) = self.stop.take() {
            let _ = stop.send(());
        }
        if let Some(task) = self.task.take() {
            let joined = timeout(Duration::from_secs(10), task).await;
            assert!(matches!(joined, Ok(Ok(Ok(())))), "clean stop: {joined:?}");
        }
    }
}

impl Drop for Server {
    fn drop(&mut self) {
        if let Some(stop) = self.stop.take() {
            let _ = stop.send(());
        }
    }
}

async fn client(addrs: &[SocketAddr]) -> Client {
    let config = ClientConfig::new(addrs.iter().map(|a| a.to_string()))
        .request_timeout(Duration::from_secs(10))
        .default_session_ttl(Duration::from_secs(2));
    Client::with_config(config).await.expect("connect")
}

fn tmp() -> (tempfile::TempDir, PathBuf) {
    let dir = tempfile::tempdir().expect("tempdir");
    let path = dir.path().join("data");
    (dir, path)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn mutual_exclusion_keeps_the_counter_exact_and_grants_fifo() {
    let (_d, dir) = tmp();
    let server = Server::start(&dir).await;
    let setup = client(&[server.addr]).await;
    setup
        .create("/counter", b"0".to_vec())
        .await
        .expect("create");
    // Every grant of the lock, from now on.
    let start = setup.get("/counter").await.expect("get").revision + 1;
    let mut grants = setup
        .watch(WatchTarget::Lock("mx".into()))
        .from(start)
        .await
        .expect("watch");
    let mut tasks = Vec::new();
    for _ in 0..CONTENDERS {
        let c = client(&[server.addr]).await;
        tasks.push(tokio::spawn(async move {
            for _ in 0..ROUNDS {
                let guard = c.lock("mx").await.expect("lock");
                let got = c.get("/counter").await.expect("get");
                let n: u64 = std::str::from_utf8(&got.data)
                    .expect("utf8")
                    .parse()
                    .expect("number");
                c.set("/counter", (n + 1).to_string().into_bytes())
                    .if_version(got.stat.version)
                    .fence(&guard)
                    .await
                    .expect("compare-and-set under the lock");
                guard.release().await.expect("release");
            }
        }));
    }
    for t in tasks {
        t.await.expect("task");
    }
    let got = setup.get("/counter").await.expect("get");
    assert_eq!(got.data, (CONTENDERS * ROUNDS).to_string().into_bytes());
    let mut seen: Vec<(u64, u64)> = Vec::new();
    while seen.len() < CONTENDERS * ROUNDS {
        let item = timeout(Duration::from_secs(5), grants.next())
            .await
            .expect("grant events in time")
            .expect("stream open")
            .expect("no error");
        if let WatchItem::Revision { events, .. } = item {
            for e in events {
                if let EventKind::LockGranted {
                    token, acquire_id, ..
                } = e.kind
                {
                    seen.push((acquire_id, token));
                }
            }
        }
    }
    // FIFO: acquires are granted in the order they were made (acquire id = revision).
    assert!(seen.windows(2).all(|w| w[0].0 < w[1].0), "FIFO grants");
    assert!(seen.windows(2).all(|w| w[0].1 < w[1].1), "tokens increase");
    server.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn two_tasks_on_one_session_exclude_each_other() {
    let (_d, dir) = tmp();
    let server = Server::start(&dir).await;
    let c = client(&[server.addr]).await;
    let session = c.session(Duration::from_secs(2)).await.expect("session");
    let inside = Arc::new(AtomicBool::new(false));
    let mut tasks = Vec::new();
    for _ in 0..2 {
        let (c, session, inside) = (c.clone(), session.clone(), inside.clone());
        tasks.push(tokio::spawn(async move {
            for _ in 0..20 {
                let guard = c.lock("one").session(&session).await.expect("lock");
                assert!(!inside.swap(true, Ordering::SeqCst), "both inside");
                tokio::time::sleep(Duration::from_millis(2)).await;
                inside.store(false, Ordering::SeqCst);
                guard.release().await.expect("release");
            }
        }));
    }
    for t in tasks {
        t.await.expect("task");
    }
    // try-lock of a held lock fails at once; the first holder's release frees it.
    let held = c.lock("one").session(&session).await.expect("lock");
    let err = c.lock("one").session(&session).try_lock().await;
    assert!(matches!(err, Err(Error::NotAcquired { .. })), "{err:?}");
    held.release().await.expect("release");
    let again = c.lock("one").try_lock().await.expect("free again");
    again.release().await.expect("release");
    server.stop().await;
}

/// The pause scenario (optionally with a lock-delay): the holder's fenced write succeeds;
/// its keepalives stop; its session expires; another client gets a higher token; the old
/// token is rejected.
async fn pause_scenario(lock_delay: Option<Duration>) {
    let (_d, dir) = tmp();
    let server = Server::start(&dir).await;
    let holder = client(&[server.addr]).await;
    let other = client(&[server.addr]).await;
    other
        .create("/resource", b"".to_vec())
        .await
        .expect("create");
    let session = holder
        .session(Duration::from_millis(200))
        .await
        .expect("session");
    let mut builder = holder.lock("res").session(&session);
    if let Some(d) = lock_delay {
        builder = builder.lock_delay(d);
    }
    let guard = builder.await.expect("lock");
    let old = guard.token();
    holder
        .set("/resource", b"from the holder".to_vec())
        .fence(&guard)
        .await
        .expect("fenced write while holding");
    // Learn when the session ends, as seen by another client.
    let mut ended = other
        .watch(WatchTarget::Session(session.id()))
        .await
        .expect("watch session");
    let paused = Instant::now();
    session.pause_keepalives(true);
    // Sample the safe bound until `lost()` fires: once keepalives stop being answered it
    // stops moving, and the last value seen is the bound `lost()` fired at.
    let mut bound = session.safe_until();
    let lost = guard.lost();
    tokio::pin!(lost);
    let deadline = Instant::now() + Duration::from_secs(2);
    loop {
        tokio::select! {
            _ = &mut lost => break,
            _ = tokio::time::sleep(Duration::from_millis(2)) => {
                assert!(Instant::now() < deadline, "lost() fires at the safe bound");
                if let Some(b) = session.safe_until() {
                    bound = Some(b);
                }
            }
        }
    }
    let lost_at = Instant::now();
    // Generous for a loaded CI box; the safety property is checked against the bound below.
    assert!(
        lost_at - paused < Duration::from_millis(1_000),
        "lost soon after keepalives stopped"
    );
    let bound = bound.expect("a safe bound while the session was alive");
    let expired_seen = loop {
        let item = timeout(Duration::from_secs(3), ended.next())
            .await
            .expect("session ends")
            .expect("open")
            .expect("ok");
        if let WatchItem::Revision { events, .. } = item {
            if events
                .iter()
                .any(|e| matches!(e.kind, EventKind::SessionEnded { expired: true, .. }))
            {
                break Instant::now();
            }
        }
    };
    // The safety property: the server's expiry is never seen before the client's safe
    // bound (which `lost()` fires at), whatever the scheduling of the tasks in this test.
    assert!(
        bound <= expired_seen,
        "the server expired the session before the client's safe bound"
    );
    if let Some(delay) = lock_delay {
        let early = other.lock("res").try_lock().await;
        assert!(matches!(early, Err(Error::NotAcquired { .. })), "{early:?}");
        let g = other
            .lock("res")
            .timeout(Duration::from_secs(5))
            .await
            .expect("lock");
        let waited = Instant::now() - expired_seen;
        // Slack for the time the expiry event took to reach this client on a loaded box.
        assert!(
            waited + Duration::from_millis(100) >= delay,
            "granted {waited:?} after expiry, delay {delay:?}"
        );
        assert!(g.token() > old);
        g.release().await.expect("release");
    }
    let newer = other
        .lock("res")
        .timeout(Duration::from_secs(5))
        .await
        .expect("lock");
    assert!(newer.token() > old, "tokens increase");
    other
        .set("/resource", b"from the new holder".to_vec())
        .fence(&newer)
        .await
        .expect("new holder writes");
    let rejected = holder
        .set("/resource", b"stale".to_vec())
        .fenced("res", old)
        .await;
    assert!(
        rejected.as_ref().is_err_and(Error::is_fencing_rejected),
        "{rejected:?}"
    );
    assert_eq!(
        other.get("/resource").await.expect("get").data,
        b"from the new holder"
    );
    newer.release().await.expect("release");
    server.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn paused_holder_loses_the_lock_and_its_token_is_fenced_off() {
    pause_scenario(None).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn lock_delay_blocks_grants_after_expiry() {
    pause_scenario(Some(Duration::from_millis(400))).await;
}

/// The next leader change, within 5 s.
async fn next<S>(changes: &mut S) -> Option<Leader>
where
    S: futures_util::Stream<Item = Result<Option<Leader>, Error>> + Unpin,
{
    timeout(Duration::from_secs(5), changes.next())
        .await
        .expect("a change in time")
        .expect("stream open")
        .expect("no error")
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn election_campaign_resign_and_observe() {
    let (_d, dir) = tmp();
    let server = Server::start(&dir).await;
    let a = client(&[server.addr]).await;
    let b = client(&[server.addr]).await;
    let watcher = client(&[server.addr]).await;
    let observed = LeaderElection::new(&watcher, "leader");
    let mut changes = observed.observe();
    assert_eq!(next(&mut changes).await, None, "no leader at first");
    let la = LeaderElection::new(&a, "leader")
        .campaign(b"a".to_vec())
        .await
        .expect("a leads");
    let seen = next(&mut changes).await.expect("a");
    assert_eq!((seen.value.as_slice(), seen.token), (&b"a"[..], la.token()));
    let eb = LeaderElection::new(&b, "leader");
    let campaign_b = tokio::spawn(async move { eb.campaign(b"b".to_vec()).await });
    tokio::time::sleep(Duration::from_millis(50)).await;
    assert!(!campaign_b.is_finished(), "b waits while a leads");
    let token_a = la.token();
    la.resign().await.expect("resign");
    let lb = campaign_b.await.expect("join").expect("b leads");
    let seen = next(&mut changes).await.expect("b");
    assert_eq!(seen.value, b"b");
    assert!(seen.token > token_a && seen.token == lb.token());
    let done = LeaderElection::new(&b, "leader");
    assert_eq!(
        done.leader().await.expect("read").map(|l| l.token),
        Some(lb.token())
    );
    // run_while_leader: its token is cancelled on loss; here the work just returns.
    let token_b = lb.token();
    lb.resign().await.expect("resign");
    assert_eq!(next(&mut changes).await, None);
    let token = done
        .run_while_leader(b"c".to_vec(), |token, cancel| async move {
            assert!(!cancel.is_cancelled());
            token
        })
        .await
        .expect("run");
    assert!(token > token_b);
    let seen = next(&mut changes).await.expect("c");
    assert_eq!((seen.value.as_slice(), seen.token), (&b"c"[..], token));
    assert_eq!(next(&mut changes).await, None, "c resigned");
    server.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn watch_has_no_gap_and_no_duplicate_across_a_server_restart() {
    let (_d, dir) = tmp();
    // The restarted server listens on a second port, known to the client from the start.
    let spare = std::net::TcpListener::bind("127.0.0.1:0").expect("reserve");
    let second: SocketAddr = spare.local_addr().expect("addr");
    drop(spare);
    let first = Server::start(&dir).await;
    let watcher = client(&[first.addr, second]).await;
    let created = watcher.create("/w", b"".to_vec()).await.expect("create");
    let mut stream = watcher
        .watch(WatchTarget::Prefix("/w".into()))
        .from(created.revision + 1)
        .with_data()
        .await
        .expect("watch");
    let writer = client(&[first.addr, second]).await;
    for i in 0..20 {
        writer
            .create(format!("/w/{i}"), i.to_string().into_bytes())
            .await
            .expect("create");
    }
    // One multi: three events at one revision.
    writer
        .multi()
        .create("/w/m1", "")
        .create("/w/m2", "")
        .set("/w/0", "x")
        .await
        .expect("multi");
    // Read a few revisions before the restart, leave the rest in flight.
    let mut paths: Vec<String> = Vec::new();
    let mut revisions: Vec<u64> = Vec::new();
    let mut take = |item: WatchItem, paths: &mut Vec<String>| {
        if let WatchItem::Revision { revision, events } = item {
            revisions.push(revision);
            for e in events {
                match e.kind {
                    EventKind::Created { path, .. } | EventKind::Changed { path, .. } => {
                        paths.push(path)
                    }
                    other => panic!("unexpected {other:?}"),
                }
            }
        }
    };
    for _ in 0..5 {
        let item = stream.next().await.expect("open").expect("ok");
        take(item, &mut paths);
    }
    first.stop().await;
    let listener = TcpListener::bind(second)
        .await
        .expect("rebind the second port");
    let restarted = Server::start_on(&dir, listener).await;
    for i in 20..30 {
        writer
            .create(format!("/w/{i}"), i.to_string().into_bytes())
            .await
            .expect("create after the restart");
    }
    while paths.len() < 33 {
        let item = timeout(Duration::from_secs(10), stream.next())
            .await
            .expect("events in time")
            .expect("open")
            .expect("ok");
        take(item, &mut paths);
    }
    let mut expected: Vec<String> = (0..20).map(|i| format!("/w/{i}")).collect();
    expected.extend(["/w/m1".to_string(), "/w/m2".into(), "/w/0".into()]);
    expected.extend((20..30).map(|i| format!("/w/{i}")));
    assert_eq!(paths, expected, "every event once, in order");
    assert!(
        revisions.windows(2).all(|w| w[0] < w[1]),
        "revisions increase"
    );
    restarted.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn lockctl_lock_runs_the_command_with_its_token_and_exit_code() {
    let (_d, dir) = tmp();
    let server = Server::start(&dir).await;
    let addr = server.addr.to_string();
    let run = |args: Vec<String>| {
        tokio::task::spawn_blocking(move || {
            std::process::Command::new(env!("CARGO_BIN_EXE_lockctl"))
                .args(args)
                .output()
                .expect("run lockctl")
        })
    };
    let args = |rest: &[&str]| {
        let mut v = vec!["--endpoints".to_string(), addr.clone()];
        v.extend(rest.iter().map(|s| s.to_string()));
        v
    };
    let out = run(args(&[
        "lock",
        "job",
        "--",
        "sh",
        "-c",
        "echo $LOCKD_LOCK $LOCKD_FENCING_TOKEN; exit 3",
    ]))
    .await
    .expect("join");
    assert_eq!(out.status.code(), Some(3), "the command's status");
    let stdout = String::from_utf8_lossy(&out.stdout);
    let mut words = stdout.split_whitespace();
    assert_eq!(words.next(), Some("job"));
    let token: u64 = words.next().expect("token").parse().expect("number");
    // The lock was released: a write fenced with that token is rejected.
    let c = client(&[server.addr]).await;
    c.create("/job", b"".to_vec()).await.expect("create");
    let fence = format!("job:{token}");
    let out = run(args(&["put", "/job", "x", "--fence", &fence]))
        .await
        .expect("join");
    assert_eq!(out.status.code(), Some(1));
    assert!(
        String::from_utf8_lossy(&out.stderr).contains("fencing rejected"),
        "{out:?}"
    );
    let held = c.lock("job").await.expect("lock");
    let fence = format!("job:{}", held.token());
    let out = run(args(&["put", "/job", "y", "--fence", &fence]))
        .await
        .expect("join");
    assert!(out.status.success(), "{out:?}");
    let out = run(args(&["--json", "locks"])).await.expect("join");
    let line = String::from_utf8_lossy(&out.stdout);
    assert!(line.contains("\"name\":\"job\"") && line.contains(&held.token().to_string()));
    held.release().await.expect("release");
    server.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_quiet_watch_resumes_from_its_last_bookmark() {
    // The watched node stays quiet while more revisions than the server keeps in its history
    // go by elsewhere. Resuming from the watch's start would be `Compacted`; resuming from
    // the last bookmark works.
    let (_d, dir) = tmp();
    let spare = std::net::TcpListener::bind("127.0.0.1:0").expect("reserve");
    let second: SocketAddr = spare.local_addr().expect("addr");
    drop(spare);
    let first = Server::start(&dir).await;
    let watcher = client(&[first.addr, second]).await;
    watcher
        .create("/quiet", b"".to_vec())
        .await
        .expect("create");
    watcher.create("/busy", b"".to_vec()).await.expect("create");
    let mut stream = watcher
        .watch(WatchTarget::Node("/quiet".into()))
        .progress()
        .await
        .expect("watch");
    let started = stream.start_revision();
    let writer = client(&[first.addr, second]).await;
    let total = lockd_server::fsm::EVENT_HISTORY_REVISIONS + 500;
    let mut last = 0;
    for chunk in 0..total.div_ceil(1000) {
        let writes = (0..1000u64).map(|i| {
            let value = (chunk * 1000 + i).to_be_bytes().to_vec();
            std::future::IntoFuture::into_future(writer.set("/busy", value))
        });
        for done in futures_util::future::join_all(writes).await {
            last = last.max(done.expect("set").revision);
        }
    }
    // Wait for a bookmark at or past the last write.
    loop {
        match timeout(Duration::from_secs(10), stream.next())
            .await
            .expect("bookmark in time")
        {
            Some(Ok(WatchItem::Progress(revision))) if revision >= last => break,
            Some(Ok(WatchItem::Revision { .. })) => panic!("/quiet did not change"),
            Some(Ok(_)) => {}
            other => panic!("{other:?}"),
        }
    }
    assert!(
        stream.resume_revision() > last,
        "resume point follows the bookmarks"
    );
    assert!(last - started > lockd_server::fsm::EVENT_HISTORY_REVISIONS);
    first.stop().await;
    let listener = TcpListener::bind(second)
        .await
        .expect("rebind the second port");
    let restarted = Server::start_on(&dir, listener).await;
    let changed = writer
        .set("/quiet", b"now".to_vec())
        .await
        .expect("set after the restart");
    loop {
        match timeout(Duration::from_secs(10), stream.next())
            .await
            .expect("event in time")
        {
            Some(Ok(WatchItem::Revision { revision, events })) => {
                assert_eq!(revision, changed.revision);
                assert!(
                    matches!(&events[0].kind, EventKind::Changed { path, .. } if path == "/quiet")
                );
                break;
            }
            Some(Ok(WatchItem::Progress(_))) => {}
            other => panic!("resumed from the bookmark, not compacted: {other:?}"),
        }
    }
    restarted.stop().await;
}
