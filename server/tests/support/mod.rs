//! Shared helpers of the server's integration tests: an in-process server on port 0 over a
//! temp dir (or a given storage), and a raw protocol connection; in [`process`], clusters of
//! real `lockd` processes.
#![allow(dead_code)]

pub mod process;

use std::net::SocketAddr;
use std::path::PathBuf;
use std::time::Duration;

use futures_util::{SinkExt, StreamExt};
use lockd_protocol::{
    ClientMessage, Consistency, CreateOp, Error, FrameCodec, Hello, ReadOp, Reply, Request,
    ServerMessage, SessionGrant, SessionId, SessionSeq, SetOp, WriteOp, PROTOCOL_VERSION,
};
use lockd_server::storage::Storage;
use lockd_server::Config;
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::oneshot;
use tokio_util::codec::Framed;

/// A server running in this process.
pub struct TestServer {
    pub addr: SocketAddr,
    pub dir: PathBuf,
    stop: Option<oneshot::Sender<()>>,
    task: Option<tokio::task::JoinHandle<Result<(), lockd_server::ServerError>>>,
}

impl TestServer {
    /// Starts a server with test timings on `dir`.
    pub async fn start(dir: PathBuf) -> TestServer {
        Self::start_with(Config::for_tests(dir)).await
    }

    pub async fn start_with(config: Config) -> TestServer {
        let storage = Storage::open(&config.data_dir, config.log_retain).expect("open storage");
        Self::start_on(config, storage).await
    }

    /// Starts a server over an already opened storage.
    pub async fn start_on(mut config: Config, storage: Storage) -> TestServer {
        let _ = tracing_subscriber::fmt()
            .with_env_filter(tracing_subscriber::EnvFilter::from_default_env())
            .with_test_writer()
            .try_init();
        let listener = TcpListener::bind("127.0.0.1:0").await.expect("bind");
        let addr = listener.local_addr().expect("addr");
        // Members tell clients this address (HelloOk, NotLeader redirects).
        config.client_addr = addr.to_string();
        let dir = config.data_dir.clone();
        let (stop, stopped) = oneshot::channel::<()>();
        let task = tokio::spawn(lockd_server::node::run_with_storage(
            listener,
            config,
            storage,
            async {
                let _ = stopped.await;
            },
        ));
        TestServer {
            addr,
            dir,
            stop: Some(stop),
            task: Some(task),
        }
    }

    /// Whether the server's task is still running (it ends early if, say, its peer port was
    /// taken).
    pub fn is_running(&self) -> bool {
        self.task.as_ref().is_some_and(|t| !t.is_finished())
    }

    /// Graceful shutdown; returns the server's result.
    pub async fn stop(mut self) -> Result<(), lockd_server::ServerError> {
        if let Some(stop) = self.stop.take() {
            let _ = stop.send(());
        }
        let task = self.task.take().expect("running");
        tokio::time::timeout(Duration::from_secs(10), task)
            .await
            .expect("shutdown in time")
            .expect("join")
    }
}

/// A raw protocol connection.
pub struct Raw {
    pub framed: Framed<TcpStream, FrameCodec<ServerMessage, ClientMessage>>,
    next_id: u64,
}

impl Raw {
    /// Connects and says Hello.
    pub async fn connect(addr: SocketAddr) -> Raw {
        let mut raw = Raw::connect_no_hello(addr).await;
        raw.send(ClientMessage::Hello(Hello {
            protocol_version: PROTOCOL_VERSION,
            client_name: "test".into(),
        }))
        .await;
        match raw.recv().await {
            Some(ServerMessage::HelloOk(_)) => raw,
            other => panic!("expected HelloOk, got {other:?}"),
        }
    }

    pub async fn connect_no_hello(addr: SocketAddr) -> Raw {
        let stream = TcpStream::connect(addr).await.expect("connect");
        Raw {
            framed: Framed::new(stream, FrameCodec::default()),
            next_id: 1,
        }
    }

    pub async fn send(&mut self, message: ClientMessage) {
        self.framed.send(message).await.expect("send");
    }

    /// The next frame, or None when the server closed the connection (10 s at most).
    pub async fn recv(&mut self) -> Option<ServerMessage> {
        match tokio::time::timeout(Duration::from_secs(10), self.framed.next()).await {
            Ok(Some(Ok(message))) => Some(message),
            Ok(Some(Err(e))) => panic!("bad frame from server: {e}"),
            Ok(None) => None,
            Err(_) => panic!("no frame from the server within 10 s"),
        }
    }

    /// Like [`Raw::request`], but `None` if the connection fails or closes.
    pub async fn try_request(&mut self, request: Request) -> Option<(u64, Result<Reply, Error>)> {
        let request_id = self.next_id;
        self.next_id += 1;
        self.framed
            .send(ClientMessage::Request {
                request_id,
                request,
            })
            .await
            .ok()?;
        loop {
            match tokio::time::timeout(Duration::from_secs(10), self.framed.next()).await {
                Ok(Some(Ok(ServerMessage::Response {
                    request_id: id,
                    revision,
                    result,
                }))) if id == request_id => return Some((revision, result)),
                Ok(Some(Ok(_))) => continue,
                _ => return None,
            }
        }
    }

    /// Sends one request and waits for its response (other frames are skipped).
    pub async fn request(&mut self, request: Request) -> (u64, Result<Reply, Error>) {
        let request_id = self.next_id;
        self.next_id += 1;
        self.send(ClientMessage::Request {
            request_id,
            request,
        })
        .await;
        loop {
            match self.recv().await {
                Some(ServerMessage::Response {
                    request_id: id,
                    revision,
                    result,
                }) if id == request_id => return (revision, result),
                Some(_) => continue,
                None => panic!("connection closed while waiting for request {request_id}"),
            }
        }
    }

    pub async fn write(&mut self, op: WriteOp) -> Result<Reply, Error> {
        self.request(Request::Write { session: None, op }).await.1
    }

    pub async fn write_in(&mut self, session: SessionSeq, op: WriteOp) -> Result<Reply, Error> {
        self.request(Request::Write {
            session: Some(session),
            op,
        })
        .await
        .1
    }

    pub async fn create(&mut self, path: &str, data: &[u8]) -> Result<Reply, Error> {
        self.write(create_op(path, data, false)).await
    }

    pub async fn set(&mut self, path: &str, data: &[u8]) -> Result<Reply, Error> {
        self.write(WriteOp::Set(SetOp {
            path: path.into(),
            data: data.to_vec(),
            expected_version: None,
        }))
        .await
    }

    pub async fn get(&mut self, path: &str) -> Result<Reply, Error> {
        self.request(Request::Read {
            consistency: Consistency::Linearizable,
            op: ReadOp::Get { path: path.into() },
        })
        .await
        .1
    }

    pub async fn open_session(&mut self, ttl_ms: u64) -> SessionGrant {
        match self.request(Request::OpenSession { ttl_ms }).await.1 {
            Ok(Reply::SessionOpened(grant)) => grant,
            other => panic!("open session: {other:?}"),
        }
    }

    pub async fn keepalive(
        &mut self,
        sessions: Vec<SessionId>,
    ) -> Vec<(SessionId, lockd_protocol::KeepAliveResult)> {
        let request_id = self.next_id;
        self.next_id += 1;
        self.send(ClientMessage::KeepAlive {
            request_id,
            sessions,
        })
        .await;
        loop {
            match self.recv().await {
                Some(ServerMessage::KeepAliveReply {
                    request_id: id,
                    results,
                }) if id == request_id => return results,
                Some(_) => continue,
                None => panic!("connection closed while waiting for a keepalive reply"),
            }
        }
    }
}

pub fn create_op(path: &str, data: &[u8], ephemeral: bool) -> WriteOp {
    WriteOp::Create(CreateOp {
        path: path.into(),
        data: data.to_vec(),
        ephemeral,
        sequential: false,
    })
}

/// Polls `check` every 10 ms until it returns true, for at most `limit`.
pub async fn eventually<F, Fut>(limit: Duration, mut check: F) -> bool
where
    F: FnMut() -> Fut,
    Fut: std::future::Future<Output = bool>,
{
    let deadline = tokio::time::Instant::now() + limit;
    while tokio::time::Instant::now() < deadline {
        if check().await {
            return true;
        }
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    false
}
