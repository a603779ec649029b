//! Bad input against a live server: each case gets a typed error (or, for framing errors, a
//! `Goodbye` naming the reason and a closed connection), and the server goes on serving.

mod support;

use std::time::Duration;

use lockd_protocol::{
    ClientMessage, CreateOp, DeleteOp, Error, Hello, MultiOp, Reply, Request, ServerMessage,
    SessionId, SessionSeq, WriteOp,
};
use support::{create_op, Raw, TestServer};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;

/// Writes raw bytes on a fresh connection and returns everything the server sends back until
/// it closes the connection.
async fn raw_bytes(addr: std::net::SocketAddr, hello_first: bool, bytes: &[u8]) -> Vec<u8> {
    let mut stream = TcpStream::connect(addr).await.unwrap();
    if hello_first {
        let hello = ClientMessage::Hello(Hello {
            protocol_version: lockd_protocol::PROTOCOL_VERSION,
            client_name: "raw".into(),
        });
        let mut buf = bytes::BytesMut::new();
        lockd_protocol::codec::encode_frame(&hello, 1 << 20, &mut buf).unwrap();
        stream.write_all(&buf).await.unwrap();
    }
    stream.write_all(bytes).await.unwrap();
    // Half-close: a server waiting for the rest of a truncated frame sees the end.
    stream.shutdown().await.unwrap();
    let mut out = Vec::new();
    tokio::time::timeout(Duration::from_secs(10), stream.read_to_end(&mut out))
        .await
        .expect("server closes the connection")
        .unwrap();
    out
}

/// Decodes the frames in `bytes`.
fn frames(bytes: &[u8]) -> Vec<ServerMessage> {
    use tokio_util::codec::Decoder;
    let mut codec = lockd_protocol::FrameCodec::<ServerMessage, ClientMessage>::default();
    let mut buf = bytes::BytesMut::from(bytes);
    let mut out = Vec::new();
    while let Some(message) = codec.decode(&mut buf).unwrap() {
        out.push(message);
    }
    out
}

fn goodbye_reason(bytes: &[u8]) -> Error {
    match frames(bytes).pop() {
        Some(ServerMessage::Goodbye { reason }) => reason,
        other => panic!("expected a Goodbye, got {other:?}"),
    }
}

async fn still_serves(addr: std::net::SocketAddr, path: &str) {
    let mut raw = Raw::connect(addr).await;
    raw.create(path, b"ok")
        .await
        .expect("a normal request works");
    assert!(matches!(raw.get(path).await, Ok(Reply::Node { data, .. }) if data == b"ok"));
}

#[tokio::test]
async fn framing_errors_close_only_that_connection() {
    let dir = tempfile::tempdir().unwrap();
    let server = TestServer::start(dir.path().to_path_buf()).await;
    let addr = server.addr;
    // A second connection stays open throughout and keeps working.
    let mut bystander = Raw::connect(addr).await;

    // 4 GiB length prefix: rejected before any allocation.
    let reason = goodbye_reason(&raw_bytes(addr, true, &[0xff, 0xff, 0xff, 0xff, 1, 2, 3]).await);
    assert!(
        matches!(
            reason,
            Error::FrameTooLarge {
                len: 4294967295,
                ..
            }
        ),
        "{reason:?}"
    );
    still_serves(addr, "/after-huge-prefix").await;

    // Garbage bytes that form a small frame.
    let reason = goodbye_reason(&raw_bytes(addr, true, &[0, 0, 0, 3, 0xde, 0xad, 0xbe]).await);
    assert!(matches!(reason, Error::Malformed(_)), "{reason:?}");
    still_serves(addr, "/after-garbage").await;

    // An unknown message tag.
    let reason = goodbye_reason(&raw_bytes(addr, true, &[0, 0, 0, 2, 77, 0]).await);
    assert!(matches!(reason, Error::Malformed(_)), "{reason:?}");

    // Garbage instead of Hello.
    let reason = goodbye_reason(&raw_bytes(addr, false, b"GET / HTTP/1.1\r\n\r\n").await);
    assert!(
        matches!(reason, Error::FrameTooLarge { .. } | Error::Malformed(_)),
        "{reason:?}"
    );

    // A truncated frame, then the client goes away: nothing to answer, nothing breaks.
    let out = raw_bytes(addr, true, &[0, 0, 0, 50, 1, 2]).await;
    assert!(frames(&out)
        .iter()
        .all(|m| !matches!(m, ServerMessage::Response { .. })));
    still_serves(addr, "/after-truncated").await;

    bystander
        .create("/bystander", b"x")
        .await
        .expect("the other connection still works");
    server.stop().await.unwrap();
}

#[tokio::test]
async fn handshake_errors() {
    let dir = tempfile::tempdir().unwrap();
    let server = TestServer::start(dir.path().to_path_buf()).await;

    let mut raw = Raw::connect_no_hello(server.addr).await;
    raw.send(ClientMessage::Hello(Hello {
        protocol_version: 999,
        client_name: "future".into(),
    }))
    .await;
    match raw.recv().await {
        Some(ServerMessage::Goodbye {
            reason:
                Error::UnsupportedVersion {
                    client: 999,
                    server,
                },
        }) => {
            assert_eq!(server, lockd_protocol::PROTOCOL_VERSION)
        }
        other => panic!("{other:?}"),
    }
    assert!(
        raw.recv().await.is_none(),
        "connection closed after the version error"
    );

    let mut raw = Raw::connect_no_hello(server.addr).await;
    raw.send(ClientMessage::Request {
        request_id: 1,
        request: Request::ClusterStatus,
    })
    .await;
    assert!(matches!(
        raw.recv().await,
        Some(ServerMessage::Goodbye {
            reason: Error::HelloRequired
        })
    ));
    assert!(raw.recv().await.is_none());

    still_serves(server.addr, "/after-handshakes").await;
    server.stop().await.unwrap();
}

#[tokio::test]
async fn request_errors_are_typed_and_the_connection_goes_on() {
    let dir = tempfile::tempdir().unwrap();
    let server = TestServer::start(dir.path().to_path_buf()).await;
    let mut raw = Raw::connect(server.addr).await;

    let long = format!("/{}", "x".repeat(2000));
    for path in [
        "relative",
        "",
        "/a//b",
        "/a/../b",
        "/a\0b",
        "/trailing/",
        long.as_str(),
    ] {
        let err = raw.create(path, b"").await.unwrap_err();
        assert!(
            matches!(err, Error::InvalidPath { .. }),
            "{path:?}: {err:?}"
        );
        let err = raw.get(path).await.unwrap_err();
        assert!(
            matches!(err, Error::InvalidPath { .. }),
            "{path:?}: {err:?}"
        );
    }

    let big = vec![7u8; 1024 * 1024 + 1];
    assert!(matches!(
        raw.create("/big", &big).await,
        Err(Error::DataTooLarge {
            len: 1048577,
            max: 1048576
        })
    ));
    assert!(
        matches!(raw.create("/missing/child", b"").await, Err(Error::NoNode { path }) if path == "/missing")
    );
    raw.create("/parent", b"").await.unwrap();
    raw.create("/parent/child", b"").await.unwrap();
    let delete_parent = WriteOp::Delete(DeleteOp {
        path: "/parent".into(),
        expected_version: None,
    });
    assert!(matches!(
        raw.write(delete_parent).await,
        Err(Error::NotEmpty { .. })
    ));
    assert!(matches!(
        raw.create("/parent", b"").await,
        Err(Error::NodeExists { .. })
    ));

    // A multi whose total size is over the proposal limit.
    let ops = (0..3)
        .map(|i| {
            MultiOp::Create(CreateOp {
                path: format!("/m{i}"),
                data: vec![1; 1 << 20],
                ephemeral: false,
                sequential: false,
            })
        })
        .collect();
    assert!(matches!(
        raw.write(WriteOp::Multi(ops)).await,
        Err(Error::RequestTooLarge { .. })
    ));

    // Unknown and ended sessions.
    let unknown = SessionSeq {
        session: SessionId(1 << 40),
        seq: 1,
        floor: 1,
    };
    assert!(matches!(
        raw.write_in(unknown, create_op("/u", b"", false)).await,
        Err(Error::UnknownSession { .. })
    ));
    let grant = raw.open_session(1_000).await;
    let (_, closed) = raw
        .request(Request::CloseSession {
            session: grant.session,
        })
        .await;
    assert!(matches!(closed, Ok(Reply::SessionClosed)));
    let ended = SessionSeq {
        session: grant.session,
        seq: 1,
        floor: 1,
    };
    assert!(matches!(
        raw.write_in(ended, create_op("/e", b"", true)).await,
        Err(Error::SessionExpired { .. })
    ));

    // A second Hello is an error response, not a disconnect.
    raw.send(ClientMessage::Hello(Hello {
        protocol_version: 1,
        client_name: "again".into(),
    }))
    .await;
    assert!(matches!(
        raw.recv().await,
        Some(ServerMessage::Response {
            result: Err(Error::InvalidArgument(_)),
            ..
        })
    ));

    // Nothing of the failed requests was applied; the connection still works.
    assert!(matches!(raw.get("/u").await, Err(Error::NoNode { .. })));
    assert!(matches!(raw.get("/m0").await, Err(Error::NoNode { .. })));
    raw.create("/fine", b"yes").await.unwrap();
    server.stop().await.unwrap();
}

#[tokio::test]
async fn connections_over_the_limit_are_told_and_closed() {
    let dir = tempfile::tempdir().unwrap();
    let config = lockd_server::Config {
        max_connections: 2,
        ..lockd_server::Config::for_tests(dir.path().to_path_buf())
    };
    let server = TestServer::start_with(config).await;
    let _a = Raw::connect(server.addr).await;
    let _b = Raw::connect(server.addr).await;
    let mut c = Raw::connect_no_hello(server.addr).await;
    match c.recv().await {
        Some(ServerMessage::Goodbye {
            reason: Error::Unavailable(_),
        }) => {}
        other => panic!("{other:?}"),
    }
    assert!(c.recv().await.is_none());
    drop(_a);
    let served = support::eventually(Duration::from_secs(5), || async {
        let mut raw = Raw::connect_no_hello(server.addr).await;
        raw.send(ClientMessage::Hello(Hello {
            protocol_version: lockd_protocol::PROTOCOL_VERSION,
            client_name: "t".into(),
        }))
        .await;
        matches!(raw.recv().await, Some(ServerMessage::HelloOk(_)))
    })
    .await;
    assert!(served, "a freed slot is used again");
    server.stop().await.unwrap();
}
