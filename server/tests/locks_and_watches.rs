//! Locks (FIFO grants, fencing, lock-delay, timeouts, cancel-or-release) and watch streams
//! (catch-up, revision-atomic delivery, bookmarks, Compacted, Lagged) against a live server,
//! over the raw protocol.

mod support;

use std::time::{Duration, Instant};

use lockd_protocol::{
    AcquireOp, CancelOp, ClientMessage, Error, Event, EventKind, Fence, LockResult, MultiOp,
    ReleaseOp, Reply, Request, ServerMessage, SessionId, SessionSeq, SetOp, WaitEndReason,
    WatchRequest, WatchTarget, WriteOp, WriteResult,
};
use support::{create_op, Raw, TestServer};

/// A raw connection with one explicit session and its own seq counter.
struct Client {
    raw: Raw,
    session: SessionId,
    seq: u64,
}

impl Client {
    async fn open(addr: std::net::SocketAddr, ttl_ms: u64) -> Client {
        let mut raw = Raw::connect(addr).await;
        let session = raw.open_session(ttl_ms).await.session;
        Client {
            raw,
            session,
            seq: 0,
        }
    }

    fn header(&mut self) -> SessionSeq {
        self.seq += 1;
        SessionSeq {
            session: self.session,
            seq: self.seq,
            floor: self.seq,
        }
    }

    async fn write(&mut self, op: WriteOp) -> (u64, Result<Reply, Error>) {
        let session = Some(self.header());
        self.raw.request(Request::Write { session, op }).await
    }

    async fn fenced(&mut self, op: WriteOp, lock: &str, token: u64) -> Result<Reply, Error> {
        let session = Some(self.header());
        let fence = Fence {
            lock: lock.into(),
            token,
        };
        self.raw
            .request(Request::FencedWrite { session, op, fence })
            .await
            .1
    }

    async fn acquire(
        &mut self,
        lock: &str,
        delay_ms: Option<u64>,
        timeout_ms: Option<u64>,
    ) -> LockResult {
        let op = AcquireOp {
            lock: lock.into(),
            value: vec![],
            try_only: false,
            timeout_ms,
            lock_delay_ms: delay_ms,
        };
        match self.write(WriteOp::Acquire(op)).await.1 {
            Ok(Reply::Write(WriteResult::Lock(result))) => result,
            other => panic!("acquire: {other:?}"),
        }
    }
}

fn set_op(path: &str, data: &[u8]) -> WriteOp {
    WriteOp::Set(SetOp {
        path: path.into(),
        data: data.to_vec(),
        expected_version: None,
    })
}

/// Opens a watch on `raw`; returns (watch id, start revision).
async fn watch(
    raw: &mut Raw,
    target: WatchTarget,
    start: Option<u64>,
) -> Result<(u64, u64), Error> {
    let request = Request::Watch(WatchRequest {
        target,
        start_revision: start,
        with_data: true,
    });
    match raw.request(request).await.1 {
        Ok(Reply::WatchCreated {
            watch_id,
            start_revision,
        }) => Ok((watch_id, start_revision)),
        Ok(other) => panic!("{other:?}"),
        Err(e) => Err(e),
    }
}

/// Watch frames received until `done` says stop (10 s at most).
async fn collect(
    raw: &mut Raw,
    mut done: impl FnMut(&[ServerMessage]) -> bool,
) -> Vec<ServerMessage> {
    let mut frames = Vec::new();
    let deadline = Instant::now() + Duration::from_secs(10);
    while !done(&frames) {
        assert!(
            Instant::now() < deadline,
            "watch frames did not arrive: {frames:?}"
        );
        match raw.recv().await {
            Some(
                m @ (ServerMessage::WatchEvents { .. }
                | ServerMessage::WatchProgress { .. }
                | ServerMessage::WatchEnded { .. }),
            ) => frames.push(m),
            Some(_) => {}
            None => panic!("connection closed"),
        }
    }
    frames
}

fn events_of(frames: &[ServerMessage]) -> Vec<Event> {
    frames
        .iter()
        .flat_map(|f| match f {
            ServerMessage::WatchEvents { events, .. } => events.clone(),
            _ => vec![],
        })
        .collect()
}

fn granted(events: &[Event], lock: &str) -> Vec<(u64, SessionId, u64)> {
    events
        .iter()
        .filter_map(|e| match &e.kind {
            EventKind::LockGranted {
                lock: l,
                token,
                session,
                acquire_id,
                ..
            } if l == lock => Some((*token, *session, *acquire_id)),
            _ => None,
        })
        .collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn release_hands_over_in_fifo_order_and_fencing_follows_the_grant() {
    let dir = tempfile::tempdir().unwrap();
    let server = TestServer::start(dir.path().to_path_buf()).await;
    let mut a = Client::open(server.addr, 10_000).await;
    let mut b = Client::open(server.addr, 10_000).await;
    let mut c = Client::open(server.addr, 10_000).await;
    a.raw.create("/data", b"0").await.unwrap();

    let LockResult::Granted { token: t1 } = a.acquire("L", None, None).await else {
        panic!()
    };
    let LockResult::Queued { waiter_id: wb } = b.acquire("L", None, None).await else {
        panic!()
    };
    let LockResult::Queued { waiter_id: wc } = c.acquire("L", None, None).await else {
        panic!()
    };
    // B learns of its grant from its session's stream, resumable from its acquire's revision.
    watch(&mut b.raw, WatchTarget::Session(b.session), Some(wb))
        .await
        .unwrap();

    assert!(
        a.fenced(set_op("/data", b"a"), "L", t1).await.is_ok(),
        "the holder's fenced write applies"
    );
    let release = WriteOp::Release(ReleaseOp {
        lock: "L".into(),
        token: t1,
    });
    assert_eq!(
        a.write(release.clone()).await.1,
        Ok(Reply::Write(WriteResult::Released))
    );
    assert_eq!(
        a.write(release).await.1,
        Err(Error::LockNotHeld {
            lock: "L".into(),
            token: t1
        })
    );

    let frames = collect(&mut b.raw, |f| !granted(&events_of(f), "L").is_empty()).await;
    let grants = granted(&events_of(&frames), "L");
    let (t2, holder, acquire) = grants[0];
    assert_eq!((holder, acquire), (b.session, wb), "FIFO: B queued first");
    assert!(t2 > t1, "tokens grow");
    assert_eq!(
        a.fenced(set_op("/data", b"stale"), "L", t1).await,
        Err(Error::FencingRejected {
            lock: "L".into(),
            token: t1
        })
    );
    // Any session may use the holder's token (Chubby's sequencer: helpers carry it).
    assert!(c.fenced(set_op("/data", b"b"), "L", t2).await.is_ok());

    // Cancel-or-release: B cancels its (granted) acquire, which releases to C.
    let cancel = WriteOp::Cancel(CancelOp {
        lock: "L".into(),
        acquire_id: wb,
    });
    assert_eq!(
        b.write(cancel).await.1,
        Ok(Reply::Write(WriteResult::Cancelled { released: true }))
    );
    let (_, info) = c
        .raw
        .request(Request::Read {
            consistency: Default::default(),
            op: lockd_protocol::ReadOp::Lock { name: "L".into() },
        })
        .await;
    match info.unwrap() {
        Reply::Lock(info) => {
            let holder = info.holder.expect("C holds it");
            assert_eq!((holder.session, holder.acquire_id), (c.session, wc));
            assert!(holder.token > t2);
        }
        other => panic!("{other:?}"),
    }
    server.stop().await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn try_lock_and_wait_timeouts() {
    let dir = tempfile::tempdir().unwrap();
    let server = TestServer::start(dir.path().to_path_buf()).await;
    let mut a = Client::open(server.addr, 10_000).await;
    let mut b = Client::open(server.addr, 10_000).await;
    assert!(matches!(
        a.acquire("T", None, None).await,
        LockResult::Granted { .. }
    ));
    let try_op = AcquireOp {
        lock: "T".into(),
        value: vec![],
        try_only: true,
        timeout_ms: None,
        lock_delay_ms: None,
    };
    assert_eq!(
        b.write(WriteOp::Acquire(try_op)).await.1,
        Ok(Reply::Write(WriteResult::Lock(LockResult::NotAcquired)))
    );
    let LockResult::Queued { waiter_id } = b.acquire("T", None, Some(100)).await else {
        panic!()
    };
    watch(&mut b.raw, WatchTarget::Session(b.session), Some(waiter_id))
        .await
        .unwrap();
    let started = Instant::now();
    let frames = collect(&mut b.raw, |f| {
        events_of(f).iter().any(|e| {
            matches!(
                e.kind,
                EventKind::LockWaitEnded {
                    reason: WaitEndReason::TimedOut,
                    ..
                }
            )
        })
    })
    .await;
    assert!(started.elapsed() < Duration::from_secs(5));
    assert!(granted(&events_of(&frames), "T").is_empty());
    server.stop().await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_paused_holder_loses_the_lock_and_nobody_gets_it_before_the_lock_delay() {
    let dir = tempfile::tempdir().unwrap();
    let server = TestServer::start(dir.path().to_path_buf()).await;
    let mut holder = Client::open(server.addr, 100).await;
    let mut other = Client::open(server.addr, 10_000).await;
    other.raw.create("/resource", b"").await.unwrap();
    let LockResult::Granted { token: old } = holder.acquire("P", Some(400), None).await else {
        panic!()
    };
    assert!(holder
        .fenced(set_op("/resource", b"holder"), "P", old)
        .await
        .is_ok());
    let LockResult::Queued { waiter_id } = other.acquire("P", None, None).await else {
        panic!()
    };
    watch(
        &mut other.raw,
        WatchTarget::Lock("P".into()),
        Some(waiter_id),
    )
    .await
    .unwrap();
    // The holder pauses: no keepalives. Its session expires, the grant is revoked at once,
    // and the lock stays free of grants for the lock-delay.
    let frames = collect(&mut other.raw, |f| !granted(&events_of(f), "P").is_empty()).await;
    let events = events_of(&frames);
    let revoked_at = events
        .iter()
        .position(|e| matches!(&e.kind, EventKind::LockRevoked { token, .. } if *token == old))
        .expect("revoked");
    let granted_at = events
        .iter()
        .position(|e| matches!(e.kind, EventKind::LockGranted { .. }))
        .expect("granted");
    assert!(revoked_at < granted_at);
    let (new, session, _) = granted(&events, "P")[0];
    assert_eq!(session, other.session);
    assert!(new > old);
    // (How long the grant waited is checked in `lock_delay_is_measured_from_the_expiry`.)
    // The paused holder resumes: its fenced write is rejected; the new holder's applies.
    assert_eq!(
        holder.fenced(set_op("/resource", b"late"), "P", old).await,
        Err(Error::SessionExpired {
            session: holder.session
        })
    );
    let mut third = Client::open(server.addr, 10_000).await;
    assert_eq!(
        third.fenced(set_op("/resource", b"late"), "P", old).await,
        Err(Error::FencingRejected {
            lock: "P".into(),
            token: old
        })
    );
    assert!(other
        .fenced(set_op("/resource", b"new"), "P", new)
        .await
        .is_ok());
    server.stop().await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn lock_delay_is_measured_from_the_expiry() {
    let dir = tempfile::tempdir().unwrap();
    let server = TestServer::start(dir.path().to_path_buf()).await;
    let mut holder = Client::open(server.addr, 100).await;
    let mut waiter = Client::open(server.addr, 10_000).await;
    assert!(matches!(
        holder.acquire("D", Some(500), None).await,
        LockResult::Granted { .. }
    ));
    let LockResult::Queued { waiter_id } = waiter.acquire("D", None, None).await else {
        panic!()
    };
    watch(
        &mut waiter.raw,
        WatchTarget::Lock("D".into()),
        Some(waiter_id),
    )
    .await
    .unwrap();
    let frames = collect(&mut waiter.raw, |f| {
        events_of(f)
            .iter()
            .any(|e| matches!(e.kind, EventKind::LockRevoked { .. }))
    })
    .await;
    let revoked = Instant::now();
    assert!(granted(&events_of(&frames), "D").is_empty());
    collect(&mut waiter.raw, |f| !granted(&events_of(f), "D").is_empty()).await;
    let waited = revoked.elapsed();
    assert!(
        waited >= Duration::from_millis(400),
        "granted {waited:?} after the revocation, delay 500 ms (100 ms slack for the revocation event to arrive)"
    );
    server.stop().await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn watches_replay_history_deliver_whole_revisions_and_bookmark() {
    let dir = tempfile::tempdir().unwrap();
    let server = TestServer::start(dir.path().to_path_buf()).await;
    let mut writer = Raw::connect(server.addr).await;
    let (first, _) = writer
        .request(Request::Write {
            session: None,
            op: create_op("/w", b"", false),
        })
        .await;
    writer.create("/w/a", b"1").await.unwrap();
    writer.set("/w/a", b"2").await.unwrap();
    writer.create("/other", b"").await.unwrap();

    // From the past: the history, in order, only under /w.
    let mut watcher = Raw::connect(server.addr).await;
    let (_, start) = watch(&mut watcher, WatchTarget::Prefix("/w".into()), Some(first))
        .await
        .unwrap();
    assert_eq!(start, first);
    let frames = collect(&mut watcher, |f| events_of(f).len() >= 3).await;
    let kinds: Vec<_> = events_of(&frames).into_iter().map(|e| e.kind).collect();
    assert!(matches!(&kinds[0], EventKind::Created { path, .. } if path == "/w"));
    assert!(matches!(&kinds[1], EventKind::Created { path, .. } if path == "/w/a"));
    assert!(
        matches!(&kinds[2], EventKind::Changed { path, data: Some(d), .. } if path == "/w/a" && d == b"2")
    );

    // Live: a multi's events share one revision and arrive whole.
    let ops = (0..5)
        .map(|i| {
            MultiOp::Create(lockd_protocol::CreateOp {
                path: format!("/w/m{i}"),
                data: vec![],
                ephemeral: false,
                sequential: false,
            })
        })
        .collect();
    let (rev, result) = writer
        .request(Request::Write {
            session: None,
            op: WriteOp::Multi(ops),
        })
        .await;
    result.unwrap();
    let frames = collect(&mut watcher, |f| {
        events_of(f).iter().filter(|e| e.revision == rev).count() == 5
    })
    .await;
    assert!(matches!(
        frames.last(),
        Some(ServerMessage::WatchEvents {
            revision_complete: true,
            ..
        })
    ));

    // Quiet: bookmarks carry the latest revision.
    writer.create("/other/x", b"").await.unwrap();
    let (now, _) = writer
        .request(Request::Read {
            consistency: Default::default(),
            op: lockd_protocol::ReadOp::Stat { path: "/".into() },
        })
        .await;
    let frames = collect(&mut watcher, |f| {
        f.iter()
            .any(|m| matches!(m, ServerMessage::WatchProgress { revision, .. } if *revision >= now))
    })
    .await;
    assert!(events_of(&frames).is_empty(), "nothing under /w changed");

    // A session expiry deleting 1,000 ephemerals reaches a watcher as one complete revision.
    let mut owner = Raw::connect(server.addr).await;
    let grant = owner.open_session(100).await;
    writer.create("/eph", b"").await.unwrap();
    let creates: Vec<_> = (0..1000)
        .map(|i| {
            MultiOp::Create(lockd_protocol::CreateOp {
                path: format!("/eph/{i:04}"),
                data: vec![7; 100],
                ephemeral: true,
                sequential: false,
            })
        })
        .collect();
    owner
        .write_in(
            SessionSeq {
                session: grant.session,
                seq: 1,
                floor: 1,
            },
            WriteOp::Multi(creates),
        )
        .await
        .unwrap();
    let (_, _) = watch(&mut watcher, WatchTarget::Children("/eph".into()), None)
        .await
        .unwrap();
    let frames = collect(&mut watcher, |f| {
        events_of(f)
            .iter()
            .filter(|e| matches!(e.kind, EventKind::Deleted { .. }))
            .count()
            == 1000
    })
    .await;
    let deletes: Vec<_> = events_of(&frames)
        .into_iter()
        .filter(|e| matches!(e.kind, EventKind::Deleted { .. }))
        .collect();
    assert!(
        deletes.iter().all(|e| e.revision == deletes[0].revision),
        "one revision"
    );
    server.stop().await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn resuming_before_the_kept_history_is_compacted() {
    let dir = tempfile::tempdir().unwrap();
    let server = TestServer::start(dir.path().to_path_buf()).await;
    let mut writer = Raw::connect(server.addr).await;
    writer.create("/c", b"").await.unwrap();
    // More revisions than the history keeps, pipelined.
    let total = lockd_server::fsm::EVENT_HISTORY_REVISIONS + 200;
    for i in 0..total {
        let request = Request::Write {
            session: None,
            op: set_op("/c", &i.to_be_bytes()),
        };
        futures_util::SinkExt::feed(
            &mut writer.framed,
            ClientMessage::Request {
                request_id: 1_000_000 + i,
                request,
            },
        )
        .await
        .unwrap();
    }
    futures_util::SinkExt::flush(&mut writer.framed)
        .await
        .unwrap();
    let mut answered = 0;
    while answered < total {
        if let Some(ServerMessage::Response { result, .. }) = writer.recv().await {
            result.unwrap();
            answered += 1;
        }
    }
    let mut watcher = Raw::connect(server.addr).await;
    match watch(&mut watcher, WatchTarget::Node("/c".into()), Some(2)).await {
        Err(Error::Compacted { oldest }) => assert!(oldest > 2),
        other => panic!("{other:?}"),
    }
    server.stop().await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_slow_watcher_is_cancelled_with_lagged_and_resumes_without_loss() {
    let dir = tempfile::tempdir().unwrap();
    let server = TestServer::start(dir.path().to_path_buf()).await;
    let mut writer = Raw::connect(server.addr).await;
    writer.create("/s", b"").await.unwrap();
    let mut watcher = Raw::connect(server.addr).await;
    let (_, start) = watch(&mut watcher, WatchTarget::Node("/s".into()), None)
        .await
        .unwrap();
    // The watcher does not read while 5,000 commits of 8 KiB events go by: its socket fills,
    // its connection falls behind the 1,024-commit channel.
    let big = vec![1u8; 8 * 1024];
    for _ in 0..5_000 {
        writer.set("/s", &big).await.unwrap();
    }
    let mut versions = Vec::new();
    let mut resume = None;
    let deadline = Instant::now() + Duration::from_secs(20);
    while resume.is_none() {
        assert!(Instant::now() < deadline);
        match watcher.recv().await {
            Some(ServerMessage::WatchEvents { events, .. }) => {
                versions.extend(events.iter().filter_map(|e| match &e.kind {
                    EventKind::Changed { stat, .. } => Some(stat.version),
                    _ => None,
                }))
            }
            Some(ServerMessage::WatchEnded {
                reason: Error::Lagged { resume_from },
                ..
            }) => resume = Some(resume_from),
            Some(_) => {}
            None => panic!("closed"),
        }
    }
    let resume_from = resume.unwrap();
    assert!(resume_from > start);
    watch(
        &mut watcher,
        WatchTarget::Node("/s".into()),
        Some(resume_from),
    )
    .await
    .unwrap();
    let frames = collect(&mut watcher, |f| {
        events_of(f)
            .iter()
            .any(|e| matches!(&e.kind, EventKind::Changed { stat, .. } if stat.version == 5_000))
    })
    .await;
    versions.extend(events_of(&frames).iter().filter_map(|e| match &e.kind {
        EventKind::Changed { stat, .. } => Some(stat.version),
        _ => None,
    }));
    assert_eq!(
        versions,
        (1..=5_000).collect::<Vec<u64>>(),
        "every change exactly once, in order"
    );
    server.stop().await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_revision_just_answered_can_be_watched_from_and_now_is_after_it() {
    let dir = tempfile::tempdir().unwrap();
    let server = TestServer::start(dir.path().to_path_buf()).await;
    let mut writer = Raw::connect(server.addr).await;
    let mut watcher = Raw::connect(server.addr).await;
    writer.create("/r", b"").await.unwrap();
    for i in 0..200u32 {
        let (rev, result) = writer
            .request(Request::Write {
                session: None,
                op: set_op("/r", &i.to_be_bytes()),
            })
            .await;
        result.unwrap();
        // From the revision just answered: never FutureRevision.
        let (id, start) = watch(&mut watcher, WatchTarget::Node("/r".into()), Some(rev))
            .await
            .unwrap();
        assert_eq!(start, rev);
        watcher
            .request(Request::CancelWatch { watch_id: id })
            .await
            .1
            .unwrap();
        // "Now" starts after every answered write.
        let (id, start) = watch(&mut watcher, WatchTarget::Node("/r".into()), None)
            .await
            .unwrap();
        assert!(
            start > rev,
            "start {start} must be after the answered revision {rev}"
        );
        watcher
            .request(Request::CancelWatch { watch_id: id })
            .await
            .1
            .unwrap();
    }
    server.stop().await.unwrap();
}
