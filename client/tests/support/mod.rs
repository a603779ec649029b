//! Shared helpers of the client's end-to-end tests: a real lockd server running in this
//! process (port 0, a temp dir), a raw protocol connection for what the client API cannot
//! do on purpose, a proxy that can lose a response, and bounded polling.
#![allow(dead_code)]

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use futures_util::{SinkExt, StreamExt};
use lockd_client::{Client, ClientConfig};
use lockd_protocol::{
    ClientMessage, Error, FrameCodec, Hello, Reply, Request, ServerMessage, WriteResult,
    PROTOCOL_VERSION,
};
use lockd_server::Config;
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::{oneshot, Notify};
use tokio_util::codec::{Framed, FramedRead, FramedWrite};
use tokio_util::sync::CancellationToken;

/// A lockd server running in this process over `dir`.
pub struct TestServer {
    pub addr: SocketAddr,
    pub dir: PathBuf,
    stop: Option<oneshot::Sender<()>>,
    task: Option<tokio::task::JoinHandle<Result<(), lockd_server::ServerError>>>,
}

impl TestServer {
    /// Starts a server with the test timings (tick 10 ms, TTL min 50 ms) on `dir`.
    pub async fn start(dir: &Path) -> TestServer {
        let listener = TcpListener::bind("127.0.0.1:0").await.expect("bind");
        Self::start_on(listener, dir).await
    }

    /// Starts a server on an already bound listener (so its address can be known, and
    /// given to a client, before the server runs).
    pub async fn start_on(listener: TcpListener, dir: &Path) -> TestServer {
        let _ = tracing_subscriber::fmt()
            .with_env_filter(tracing_subscriber::EnvFilter::from_default_env())
            .with_test_writer()
            .try_init();
        let addr = listener.local_addr().expect("addr");
        let mut config = Config::for_tests(dir.to_path_buf());
        // Advertise the real address in HelloOk / cluster status.
        config.client_addr = addr.to_string();
        let (stop, stopped) = oneshot::channel::<()>();
        let task = tokio::spawn(lockd_server::run(listener, config, async {
            let _ = stopped.await;
        }));
        TestServer {
            addr,
            dir: dir.to_path_buf(),
            stop: Some(stop),
            task: Some(task),
        }
    }

    pub fn endpoint(&self) -> String {
        self.addr.to_string()
    }

    /// Graceful shutdown, bounded; panics if the server failed.
    pub async fn stop(mut self) {
        if let Some(stop) = self.stop.take() {
            let _ = stop.send(());
        }
        let task = self.task.take().expect("running");
        tokio::time::timeout(Duration::from_secs(10), task)
            .await
            .expect("server shut down within 10 s")
            .expect("server task joined")
            .expect("server ended without error");
    }
}

impl Drop for TestServer {
    fn drop(&mut self) {
        if let Some(stop) = self.stop.take() {
            let _ = stop.send(());
        }
    }
}

/// A temp dir and a server on it.
pub async fn server() -> (tempfile::TempDir, TestServer) {
    let dir = tempfile::tempdir().expect("temp dir");
    let server = TestServer::start(dir.path()).await;
    (dir, server)
}

/// Client settings for tests: short connect timeout and backoff, bounded request time.
pub fn config<I, S>(endpoints: I) -> ClientConfig
where
    I: IntoIterator<Item = S>,
    S: Into<String>,
{
    ClientConfig::new(endpoints)
        .client_name("e2e")
        .request_timeout(Duration::from_secs(10))
        .connect_timeout(Duration::from_secs(2))
}

pub async fn client(server: &TestServer) -> Client {
    Client::with_config(config([server.endpoint()]))
        .await
        .expect("connect")
}

/// Polls `check` every 10 ms until it returns true, for at most `limit`.
pub async fn eventually<F, Fut>(limit: Duration, mut check: F) -> bool
where
    F: FnMut() -> Fut,
    Fut: std::future::Future<Output = bool>,
{
    let deadline = tokio::time::Instant::now() + limit;
    loop {
        if check().await {
            return true;
        }
        if tokio::time::Instant::now() >= deadline {
            return false;
        }
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
}

/// A raw protocol connection, for requests the client API deliberately does not offer
/// (closing another client's session).
pub struct Raw {
    framed: Framed<TcpStream, FrameCodec<ServerMessage, ClientMessage>>,
    next_id: u64,
}

impl Raw {
    pub async fn connect(addr: SocketAddr) -> Raw {
        let stream = TcpStream::connect(addr).await.expect("connect");
        let mut raw = Raw {
            framed: Framed::new(stream, FrameCodec::default()),
            next_id: 1,
        };
        raw.framed
            .send(ClientMessage::Hello(Hello {
                protocol_version: PROTOCOL_VERSION,
                client_name: "raw".into(),
            }))
            .await
            .expect("send hello");
        match raw.recv().await {
            Some(ServerMessage::HelloOk(_)) => raw,
            other => panic!("expected HelloOk, got {other:?}"),
        }
    }

    async fn recv(&mut self) -> Option<ServerMessage> {
        match tokio::time::timeout(Duration::from_secs(10), self.framed.next()).await {
            Ok(Some(Ok(m))) => Some(m),
            Ok(Some(Err(e))) => panic!("bad frame: {e}"),
            Ok(None) => None,
            Err(_) => panic!("no frame within 10 s"),
        }
    }

    /// Sends one request and waits (10 s at most) for its response.
    pub async fn request(&mut self, request: Request) -> (u64, Result<Reply, Error>) {
        let request_id = self.next_id;
        self.next_id += 1;
        self.framed
            .send(ClientMessage::Request {
                request_id,
                request,
            })
            .await
            .expect("send");
        loop {
            match self.recv().await {
                Some(ServerMessage::Response {
                    request_id: id,
                    revision,
                    result,
                }) if id == request_id => return (revision, result),
                Some(_) => continue,
                None => panic!("connection closed while waiting for a response"),
            }
        }
    }
}

/// A TCP proxy in front of a server that can lose one response: once armed, the first
/// `Created` write response coming back from the server is withheld (never forwarded), and
/// from then on the client's connection receives nothing until [`Proxy::cut`] closes it.
/// Client → server bytes are forwarded untouched.
pub struct Proxy {
    pub addr: SocketAddr,
    state: Arc<ProxyState>,
    accept: tokio::task::JoinHandle<()>,
}

struct ProxyState {
    armed: AtomicBool,
    withheld: Mutex<Option<ServerMessage>>,
    hit: Notify,
    cut: Mutex<CancellationToken>,
}

impl Proxy {
    pub async fn start(target: SocketAddr) -> Proxy {
        let listener = TcpListener::bind("127.0.0.1:0").await.expect("bind proxy");
        let addr = listener.local_addr().expect("proxy addr");
        let state = Arc::new(ProxyState {
            armed: AtomicBool::new(false),
            withheld: Mutex::new(None),
            hit: Notify::new(),
            cut: Mutex::new(CancellationToken::new()),
        });
        let st = state.clone();
        let accept = tokio::spawn(async move {
            while let Ok((client, _)) = listener.accept().await {
                let Ok(upstream) = TcpStream::connect(target).await else {
                    continue;
                };
                let cut = st.cut.lock().expect("lock").clone();
                tokio::spawn(relay(client, upstream, st.clone(), cut));
            }
        });
        Proxy {
            addr,
            state,
            accept,
        }
    }

    /// Withhold the next `Created` response.
    pub fn arm(&self) {
        self.state.armed.store(true, Ordering::SeqCst);
    }

    /// Waits (bounded) until a response was withheld, and returns it.
    pub async fn withheld(&self) -> ServerMessage {
        let deadline = tokio::time::Instant::now() + Duration::from_secs(10);
        loop {
            let notified = self.state.hit.notified();
            if let Some(m) = self.state.withheld.lock().expect("lock").clone() {
                return m;
            }
            tokio::time::timeout_at(deadline, notified)
                .await
                .expect("a response was withheld within 10 s");
        }
    }

    /// Closes every connection made so far; with `refuse_new` also stops accepting.
    pub fn cut(&self, refuse_new: bool) {
        if refuse_new {
            self.accept.abort();
        }
        let mut cut = self.state.cut.lock().expect("lock");
        cut.cancel();
        *cut = CancellationToken::new();
    }
}

impl Drop for Proxy {
    fn drop(&mut self) {
        self.accept.abort();
        self.state.cut.lock().expect("lock").cancel();
    }
}

async fn relay(
    client: TcpStream,
    upstream: TcpStream,
    st: Arc<ProxyState>,
    cut: CancellationToken,
) {
    let (mut client_rd, mut client_wr) = client.into_split();
    let (up_rd, mut up_wr) = upstream.into_split();
    let up = async {
        let _ = tokio::io::copy(&mut client_rd, &mut up_wr).await;
    };
    let down = async {
        let mut from_server =
            FramedRead::new(up_rd, FrameCodec::<ServerMessage, ClientMessage>::default());
        let mut to_client = FramedWrite::new(
            &mut client_wr,
            FrameCodec::<ClientMessage, ServerMessage>::default(),
        );
        let mut blackhole = false;
        while let Some(Ok(message)) = from_server.next().await {
            if blackhole {
                continue;
            }
            let is_created = matches!(
                &message,
                ServerMessage::Response {
                    result: Ok(Reply::Write(WriteResult::Created { .. })),
                    ..
                }
            );
            if is_created && st.armed.swap(false, Ordering::SeqCst) {
                *st.withheld.lock().expect("lock") = Some(message);
                st.hit.notify_waiters();
                blackhole = true;
                continue;
            }
            if to_client.send(message).await.is_err() {
                return;
            }
        }
        if blackhole {
            // Like a network that lost the rest of the stream: the client hears nothing,
            // not even the close, until the test cuts the connection.
            std::future::pending::<()>().await;
        }
    };
    // Whichever ends first ends the relay; dropping the halves closes both sockets.
    tokio::select! {
        _ = cut.cancelled() => {}
        _ = up => {}
        _ = down => {}
    }
}
