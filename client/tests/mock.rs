//! The client against a scripted mock server speaking the wire protocol on 127.0.0.1:0:
//! handshake, pipelining, reconnects and retries, keepalives, session expiry, Goodbye.

use std::time::Duration;

use futures_util::{SinkExt, StreamExt};
use lockd_client::protocol::{
    self, ClientMessage, CreateOp, FrameCodec, HelloOk, KeepAliveResult, MemberInfo, ReadOp, Reply,
    Request, ServerMessage, SessionEventKind, SessionGrant, SessionId, Stat, WriteOp, WriteResult,
    PROTOCOL_VERSION,
};
use lockd_client::{Backoff, Client, ClientConfig, Error, SessionStatus};
use tokio::net::{TcpListener, TcpStream};
use tokio::time::timeout;
use tokio_util::codec::Framed;

type Conn = Framed<TcpStream, FrameCodec<ClientMessage, ServerMessage>>;

const WAIT: Duration = Duration::from_secs(5);

struct Mock {
    listener: TcpListener,
    addr: String,
}

impl Mock {
    async fn new() -> Mock {
        let listener = TcpListener::bind("127.0.0.1:0").await.expect("bind");
        let addr = listener.local_addr().expect("addr").to_string();
        Mock { listener, addr }
    }

    async fn accept_raw(&self) -> Conn {
        let (stream, _) = timeout(WAIT, self.listener.accept())
            .await
            .expect("client connects")
            .expect("accept");
        Framed::new(stream, FrameCodec::default())
    }

    /// Accepts a connection and completes the handshake.
    async fn accept(&self, node_id: u64, members: Vec<MemberInfo>) -> Conn {
        let mut conn = self.accept_raw().await;
        match recv(&mut conn).await {
            ClientMessage::Hello(h) => assert_eq!(h.protocol_version, PROTOCOL_VERSION),
            other => panic!("expected Hello, got {other:?}"),
        }
        conn.send(ServerMessage::HelloOk(HelloOk {
            protocol_version: PROTOCOL_VERSION,
            node_id,
            cluster_id: 42,
            leader_hint: Some(node_id),
            members,
        }))
        .await
        .expect("send HelloOk");
        conn
    }
}

async fn recv(conn: &mut Conn) -> ClientMessage {
    timeout(WAIT, conn.next())
        .await
        .expect("a frame in time")
        .expect("connection open")
        .expect("valid frame")
}

/// The next request, answering keepalives on the way.
async fn next_request(conn: &mut Conn) -> (u64, Request) {
    loop {
        match recv(conn).await {
            ClientMessage::Request {
                request_id,
                request,
            } => return (request_id, request),
            ClientMessage::KeepAlive {
                request_id,
                sessions,
            } => {
                let results = sessions
                    .into_iter()
                    .map(|s| (s, KeepAliveResult::Ok { ttl_ms: 60_000 }))
                    .collect();
                reply_raw(
                    conn,
                    ServerMessage::KeepAliveReply {
                        request_id,
                        results,
                    },
                )
                .await;
            }
            ClientMessage::Hello(_) => panic!("Hello after the handshake"),
        }
    }
}

async fn reply_raw(conn: &mut Conn, msg: ServerMessage) {
    conn.send(msg).await.expect("send");
}

async fn reply(
    conn: &mut Conn,
    request_id: u64,
    revision: u64,
    result: Result<Reply, protocol::Error>,
) {
    reply_raw(
        conn,
        ServerMessage::Response {
            request_id,
            revision,
            result,
        },
    )
    .await;
}

fn config(endpoints: &[&str]) -> ClientConfig {
    ClientConfig::new(endpoints.iter().copied())
        .request_timeout(Duration::from_secs(5))
        .connect_timeout(Duration::from_secs(1))
        .backoff(Backoff {
            initial: Duration::from_millis(5),
            max: Duration::from_millis(50),
        })
}

async fn open_session(conn: &mut Conn, id: u64, ttl_ms: u64) {
    let (rid, req) = next_request(conn).await;
    assert!(matches!(req, Request::OpenSession { .. }), "{req:?}");
    let grant = SessionGrant {
        session: SessionId(id),
        ttl_ms,
        tick_ms: 10,
        drift_ppm: 0,
    };
    reply(conn, rid, id, Ok(Reply::SessionOpened(grant))).await;
}

fn created(path: &str) -> Result<Reply, protocol::Error> {
    Ok(Reply::Write(WriteResult::Created {
        path: path.to_string(),
        stat: Stat::default(),
    }))
}

#[tokio::test]
async fn handshake_then_get() {
    let mock = Mock::new().await;
    let addr = mock.addr.clone();
    let server = tokio::spawn(async move {
        let mut conn = mock.accept(1, vec![]).await;
        let (rid, req) = next_request(&mut conn).await;
        assert_eq!(
            req,
            Request::Read {
                consistency: protocol::Consistency::Linearizable,
                op: ReadOp::Get { path: "/a".into() }
            }
        );
        let stat = Stat {
            version: 3,
            ..Stat::default()
        };
        reply(
            &mut conn,
            rid,
            17,
            Ok(Reply::Node {
                data: b"hi".to_vec(),
                stat,
            }),
        )
        .await;
        let (rid, _) = next_request(&mut conn).await;
        reply(
            &mut conn,
            rid,
            18,
            Err(protocol::Error::NoNode { path: "/b".into() }),
        )
        .await;
        conn
    });
    let client = Client::with_config(config(&[&addr]))
        .await
        .expect("connect");
    let got = client.get("/a").await.expect("get");
    assert_eq!(got.data, b"hi");
    assert_eq!(got.stat.version, 3);
    assert_eq!(got.revision, 17);
    let err = client.get("/b").await.expect_err("no node");
    assert!(matches!(&err, Error::Server(protocol::Error::NoNode { path }) if path == "/b"));
    // Invalid paths never reach the server.
    assert!(matches!(
        client.get("b").await,
        Err(Error::Invalid(protocol::Error::InvalidPath { .. }))
    ));
    let _conn = server.await.expect("mock");
}

#[tokio::test]
async fn pipelined_answers_out_of_order_reach_their_callers() {
    const N: usize = 64;
    let mock = Mock::new().await;
    let addr = mock.addr.clone();
    let server = tokio::spawn(async move {
        let mut conn = mock.accept(1, vec![]).await;
        let mut got = Vec::new();
        while got.len() < N {
            got.push(next_request(&mut conn).await);
        }
        // All N are in flight at once; answer in reverse order.
        for (rid, req) in got.into_iter().rev() {
            let Request::Read {
                op: ReadOp::Get { path },
                ..
            } = req
            else {
                panic!("unexpected {req:?}");
            };
            let data = path.clone().into_bytes();
            reply(
                &mut conn,
                rid,
                rid,
                Ok(Reply::Node {
                    data,
                    stat: Stat::default(),
                }),
            )
            .await;
        }
        conn
    });
    let client = Client::with_config(config(&[&addr]))
        .await
        .expect("connect");
    let calls = (0..N).map(|i| {
        let client = client.clone();
        async move {
            let path = format!("/n{i}");
            let got = client.get(path.clone()).await.expect("get");
            assert_eq!(got.data, path.as_bytes());
        }
    });
    timeout(WAIT, futures_util::future::join_all(calls))
        .await
        .expect("all answered");
    let _conn = server.await.expect("mock");
}

#[tokio::test]
async fn session_write_is_retried_with_the_same_seq_after_reconnect() {
    let mock = Mock::new().await;
    let addr = mock.addr.clone();
    let server = tokio::spawn(async move {
        let mut conn = mock.accept(1, vec![]).await;
        open_session(&mut conn, 9, 60_000).await;
        let (_, first) = next_request(&mut conn).await;
        let Request::Write {
            session: Some(ss),
            op: WriteOp::Create(CreateOp {
                ephemeral: true, ..
            }),
        } = first.clone()
        else {
            panic!("expected a session create, got {first:?}");
        };
        assert_eq!((ss.session, ss.seq, ss.floor), (SessionId(9), 1, 1));
        drop(conn); // lose the connection with the write in flight
        let mut conn = mock.accept(1, vec![]).await;
        let (rid, again) = next_request(&mut conn).await;
        assert_eq!(again, first, "retried with the same seq");
        reply(&mut conn, rid, 30, created("/e")).await;
        let (rid, next) = next_request(&mut conn).await;
        let Request::Write {
            session: Some(ss), ..
        } = next
        else {
            panic!("expected a session write, got {next:?}");
        };
        assert_eq!((ss.seq, ss.floor), (2, 2));
        reply(&mut conn, rid, 31, Ok(Reply::Write(WriteResult::Deleted))).await;
        conn
    });
    let client = Client::with_config(config(&[&addr]))
        .await
        .expect("connect");
    let session = client
        .session(Duration::from_secs(60))
        .await
        .expect("session");
    assert_eq!(session.id(), SessionId(9));
    let c = session
        .create("/e", b"x".to_vec())
        .ephemeral()
        .await
        .expect("create");
    assert_eq!((c.path.as_str(), c.revision), ("/e", 30));
    let d = session.delete("/e").await.expect("delete");
    assert_eq!(d.revision, 31);
    let _conn = server.await.expect("mock");
}

#[tokio::test]
async fn sessionless_write_in_flight_on_a_lost_connection_is_indeterminate() {
    let mock = Mock::new().await;
    let addr = mock.addr.clone();
    let server = tokio::spawn(async move {
        let mut conn = mock.accept(1, vec![]).await;
        let (_, req) = next_request(&mut conn).await;
        assert!(
            matches!(req, Request::Write { session: None, .. }),
            "{req:?}"
        );
        drop(conn);
        let mut conn = mock.accept(1, vec![]).await;
        // The lost write is not retried: the next request is the read.
        let (rid, req) = next_request(&mut conn).await;
        assert!(matches!(req, Request::Read { .. }), "{req:?}");
        reply(&mut conn, rid, 5, Ok(Reply::Stat(None))).await;
        conn
    });
    let client = Client::with_config(config(&[&addr]))
        .await
        .expect("connect");
    let err = client.create("/x", b"1".to_vec()).await.expect_err("lost");
    assert!(matches!(err, Error::Indeterminate(_)), "{err:?}");
    assert!(err.is_indeterminate());
    assert!(!client.exists("/x").await.expect("stat"));
    let _conn = server.await.expect("mock");
}

#[tokio::test]
async fn retryable_errors_are_retried_and_not_leader_follows_the_hint() {
    // a is unavailable (say, cut off from its leader): the client moves on to the next
    // member, b; b is a follower naming a as leader; a, reached again, takes the write.
    let a = Mock::new().await;
    let b = Mock::new().await;
    let members = vec![
        MemberInfo {
            id: 1,
            client_addr: a.addr.clone(),
        },
        MemberInfo {
            id: 2,
            client_addr: b.addr.clone(),
        },
    ];
    let addr_a = a.addr.clone();
    let m = members.clone();
    let server_a = tokio::spawn(async move {
        let mut first = a.accept(1, m.clone()).await;
        let (rid, _) = next_request(&mut first).await;
        let unavailable = Err(protocol::Error::Unavailable("election".into()));
        reply(&mut first, rid, 0, unavailable).await;
        let mut conn = a.accept(1, m).await;
        let (rid, req) = next_request(&mut conn).await;
        assert!(matches!(req, Request::Write { session: None, .. }));
        reply(&mut conn, rid, 8, created("/w")).await;
        (first, conn)
    });
    let server_b = tokio::spawn(async move {
        let mut conn = b.accept(2, members).await;
        let (rid, req) = next_request(&mut conn).await;
        assert!(matches!(req, Request::Write { session: None, .. }));
        let hint = Err(protocol::Error::NotLeader {
            leader_hint: Some(1),
        });
        reply(&mut conn, rid, 0, hint).await;
        conn
    });
    let client = Client::with_config(config(&[&addr_a]))
        .await
        .expect("connect");
    let c = client
        .create("/w", Vec::<u8>::new())
        .await
        .expect("create via leader");
    assert_eq!(c.revision, 8);
    let (_first, conn) = server_a.await.expect("mock a");
    let _b = server_b.await.expect("mock b");
    assert_eq!(
        client.connected_to(),
        Some(conn.get_ref().local_addr().expect("addr").to_string())
    );
}

#[tokio::test]
async fn keepalive_answered_expired_expires_the_session() {
    let mock = Mock::new().await;
    let addr = mock.addr.clone();
    let server = tokio::spawn(async move {
        let mut conn = mock.accept(1, vec![]).await;
        open_session(&mut conn, 4, 300).await;
        match recv(&mut conn).await {
            ClientMessage::KeepAlive {
                request_id,
                sessions,
            } => {
                assert_eq!(sessions, vec![SessionId(4)]);
                let results = vec![(SessionId(4), KeepAliveResult::Expired)];
                reply_raw(
                    &mut conn,
                    ServerMessage::KeepAliveReply {
                        request_id,
                        results,
                    },
                )
                .await;
            }
            other => panic!("expected a keepalive, got {other:?}"),
        }
        conn
    });
    let client = Client::with_config(config(&[&addr]))
        .await
        .expect("connect");
    let session = client
        .session(Duration::from_millis(300))
        .await
        .expect("session");
    assert!(session.safe_until().is_some());
    timeout(WAIT, session.expired()).await.expect("expired");
    assert_eq!(session.status(), SessionStatus::Expired);
    assert_eq!(session.safe_until(), None);
    let err = session
        .create("/e", Vec::<u8>::new())
        .await
        .expect_err("fails fast");
    assert!(
        matches!(err, Error::SessionExpired(SessionId(4))),
        "{err:?}"
    );
    let _conn = server.await.expect("mock");
}

#[tokio::test]
async fn pushed_session_event_expires_the_session() {
    let mock = Mock::new().await;
    let addr = mock.addr.clone();
    let server = tokio::spawn(async move {
        let mut conn = mock.accept(1, vec![]).await;
        open_session(&mut conn, 5, 60_000).await;
        let event = ServerMessage::SessionEvent {
            session: SessionId(5),
            revision: 12,
            event: SessionEventKind::Closed,
        };
        reply_raw(&mut conn, event).await;
        conn
    });
    let client = Client::with_config(config(&[&addr]))
        .await
        .expect("connect");
    let session = client
        .session(Duration::from_secs(60))
        .await
        .expect("session");
    timeout(WAIT, session.expired()).await.expect("expired");
    let _conn = server.await.expect("mock");
}

#[tokio::test]
async fn unanswered_keepalives_mean_jeopardy_then_expiry_at_the_safe_bound() {
    let mock = Mock::new().await;
    let addr = mock.addr.clone();
    let server = tokio::spawn(async move {
        let mut conn = mock.accept(1, vec![]).await;
        open_session(&mut conn, 6, 400).await;
        // Swallow keepalives without answering.
        while let Ok(Some(Ok(_))) = timeout(WAIT, conn.next()).await {}
    });
    let client = Client::with_config(config(&[&addr]))
        .await
        .expect("connect");
    let session = client
        .session(Duration::from_millis(400))
        .await
        .expect("session");
    let bound = session.safe_until().expect("bound");
    let mut status = session.watch_status();
    timeout(WAIT, status.wait_for(|s| *s == SessionStatus::Jeopardy))
        .await
        .expect("jeopardy in time")
        .expect("status");
    timeout(WAIT, session.expired()).await.expect("expired");
    assert!(
        tokio::time::Instant::now() >= bound,
        "not before the safe bound"
    );
    server.abort();
}

#[tokio::test]
async fn goodbye_unsupported_version_is_a_typed_error() {
    let mock = Mock::new().await;
    let addr = mock.addr.clone();
    let server = tokio::spawn(async move {
        let mut conn = mock.accept_raw().await;
        let _hello = recv(&mut conn).await;
        let reason = protocol::Error::UnsupportedVersion {
            client: PROTOCOL_VERSION,
            server: PROTOCOL_VERSION + 1,
        };
        reply_raw(&mut conn, ServerMessage::Goodbye { reason }).await;
    });
    let err = Client::with_config(config(&[&addr]))
        .await
        .expect_err("refused");
    assert!(
        matches!(
            err,
            Error::Goodbye(protocol::Error::UnsupportedVersion { .. })
        ),
        "{err:?}"
    );
    server.await.expect("mock");
}

#[tokio::test]
async fn no_endpoint_reachable_is_connect_failed() {
    // Bind then drop to get a port nobody listens on.
    let addr = {
        let l = TcpListener::bind("127.0.0.1:0").await.expect("bind");
        l.local_addr().expect("addr").to_string()
    };
    let cfg = config(&[&addr])
        .request_timeout(Duration::from_millis(500))
        .max_attempts(3);
    let err = Client::with_config(cfg).await.expect_err("nothing there");
    assert!(matches!(err, Error::ConnectFailed { .. }), "{err:?}");
}

#[tokio::test]
async fn reads_in_flight_on_a_lost_connection_are_retried() {
    let mock = Mock::new().await;
    let addr = mock.addr.clone();
    let server = tokio::spawn(async move {
        let mut conn = mock.accept(1, vec![]).await;
        let (_, first) = next_request(&mut conn).await;
        drop(conn);
        let mut conn = mock.accept(1, vec![]).await;
        let (rid, again) = next_request(&mut conn).await;
        assert_eq!(again, first);
        reply(
            &mut conn,
            rid,
            3,
            Ok(Reply::Children {
                names: vec!["a".into()],
                more: false,
            }),
        )
        .await;
        conn
    });
    let client = Client::with_config(config(&[&addr]))
        .await
        .expect("connect");
    let listed = client.children("/").await.expect("children");
    assert_eq!((listed.names, listed.revision), (vec!["a".to_string()], 3));
    let _conn = server.await.expect("mock");
}

#[tokio::test]
async fn keepalives_continue_on_a_new_connection() {
    let mock = Mock::new().await;
    let addr = mock.addr.clone();
    let server = tokio::spawn(async move {
        let mut conn = mock.accept(1, vec![]).await;
        open_session(&mut conn, 8, 600).await;
        drop(conn);
        let mut conn = mock.accept(1, vec![]).await;
        // Answer keepalives on the new connection for a while.
        for _ in 0..3 {
            match recv(&mut conn).await {
                ClientMessage::KeepAlive {
                    request_id,
                    sessions,
                } => {
                    assert_eq!(sessions, vec![SessionId(8)]);
                    let results = vec![(SessionId(8), KeepAliveResult::Ok { ttl_ms: 600 })];
                    reply_raw(
                        &mut conn,
                        ServerMessage::KeepAliveReply {
                            request_id,
                            results,
                        },
                    )
                    .await;
                }
                other => panic!("expected a keepalive, got {other:?}"),
            }
        }
        conn
    });
    let client = Client::with_config(config(&[&addr]))
        .await
        .expect("connect");
    let session = client
        .session(Duration::from_millis(600))
        .await
        .expect("session");
    let first_bound = session.safe_until().expect("bound");
    let conn = server.await.expect("mock");
    assert_ne!(session.status(), SessionStatus::Expired);
    assert!(
        session.safe_until().expect("bound") > first_bound,
        "renewed"
    );
    drop(conn);
}

/// During an election every node answers `NotLeader` without a hint. The client retries at
/// most every 100 ms whatever its backoff cap (so it notices the new leader soon after it is
/// elected), and these retries are bounded by the request's deadline, not by its attempts.
#[tokio::test]
async fn not_leader_during_an_election_is_retried_often_until_the_deadline() {
    let mock = Mock::new().await;
    let addr = mock.addr.clone();
    let answers_before_ok = 40u32;
    // The client drops a connection that answered NotLeader and dials again (another
    // endpoint may lead): one connection per answer.
    let server = tokio::spawn(async move {
        let mut gaps = Vec::new();
        let mut last = tokio::time::Instant::now();
        for _ in 0..answers_before_ok {
            let mut conn = mock.accept(1, vec![]).await;
            let (rid, _) = next_request(&mut conn).await;
            gaps.push(last.elapsed());
            last = tokio::time::Instant::now();
            let electing = Err(protocol::Error::NotLeader { leader_hint: None });
            reply(&mut conn, rid, 0, electing).await;
        }
        let mut conn = mock.accept(1, vec![]).await;
        let (rid, _) = next_request(&mut conn).await;
        gaps.push(last.elapsed());
        reply(&mut conn, rid, 5, created("/w")).await;
        (conn, gaps)
    });
    let mut cfg = config(&[&addr]);
    cfg.backoff = Backoff {
        initial: Duration::from_millis(5),
        max: Duration::from_secs(2),
    };
    cfg.max_attempts = 8;
    cfg.request_timeout = Duration::from_secs(20);
    let client = Client::with_config(cfg).await.expect("connect");
    let c = client
        .create("/w", Vec::<u8>::new())
        .await
        .expect("the write succeeds once a leader is elected");
    assert_eq!(c.revision, 5);
    let (_conn, gaps) = server.await.expect("mock");
    let longest = gaps.iter().max().copied().unwrap_or_default();
    assert!(
        longest < Duration::from_millis(500),
        "a retry waited {longest:?} (gaps {gaps:?})"
    );
}
