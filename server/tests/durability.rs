//! Nothing acknowledged is lost: across a graceful restart, across a simulated power loss
//! (a storage backend that throws away unsynced writes), and across SIGKILL of the real
//! `lockd` binary under load.

mod support;

use std::process::{Child, Command, Stdio};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use lockd_protocol::{Reply, Request, WriteOp};
use lockd_server::storage::backend::LossyBackend;
use lockd_server::storage::Storage;
use lockd_server::Config;
use support::{create_op, Raw, TestServer};

/// (path, data) of every acknowledged write, in order of acknowledgement.
type Acked = Arc<Mutex<Vec<(String, Vec<u8>)>>>;

/// Writers that create `/w{writer}-{i}` with data `i` until told to stop; the keys whose
/// creation was acknowledged are pushed to `acked` as soon as the answer arrives.
fn spawn_writers(
    addr: std::net::SocketAddr,
    writers: usize,
    acked: Acked,
) -> Vec<tokio::task::JoinHandle<()>> {
    (0..writers)
        .map(|w| {
            let acked = acked.clone();
            tokio::spawn(async move {
                let Ok(stream) = tokio::net::TcpStream::connect(addr).await else {
                    return;
                };
                drop(stream);
                let mut raw = Raw::connect(addr).await;
                for i in 0u64.. {
                    let path = format!("/w{w}-{i}");
                    let data = i.to_be_bytes().to_vec();
                    let request = Request::Write {
                        session: None,
                        op: create_op(&path, &data, false),
                    };
                    match raw.try_request(request).await {
                        Some((_, Ok(_))) => acked.lock().unwrap().push((path, data)),
                        Some((_, Err(e))) => panic!("write {path} failed: {e}"),
                        None => return,
                    }
                }
            })
        })
        .collect()
}

async fn assert_all_present(addr: std::net::SocketAddr, acked: &[(String, Vec<u8>)]) {
    let mut raw = Raw::connect(addr).await;
    for (path, data) in acked {
        match raw.get(path).await {
            Ok(Reply::Node { data: found, .. }) => assert_eq!(&found, data, "{path}"),
            other => panic!("acknowledged write {path} lost: {other:?}"),
        }
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn graceful_restart_keeps_every_acknowledged_write() {
    let dir = tempfile::tempdir().unwrap();
    let server = TestServer::start(dir.path().to_path_buf()).await;
    let mut raw = Raw::connect(server.addr).await;
    raw.create("/kept", b"1").await.unwrap();
    raw.set("/kept", b"2").await.unwrap();
    let grant = raw.open_session(60_000).await;
    server.stop().await.unwrap();

    let server = TestServer::start(dir.path().to_path_buf()).await;
    let mut raw = Raw::connect(server.addr).await;
    match raw.get("/kept").await.unwrap() {
        Reply::Node { data, stat } => {
            assert_eq!(data, b"2");
            assert_eq!(stat.version, 1);
        }
        other => panic!("{other:?}"),
    }
    // The session survived the restart with a fresh deadline (DESIGN §3a.5).
    let results = raw.keepalive(vec![grant.session]).await;
    assert_eq!(
        results,
        vec![(
            grant.session,
            lockd_protocol::KeepAliveResult::Ok { ttl_ms: 60_000 }
        )]
    );
    // Revisions keep increasing across the restart.
    let (revision, _) = raw
        .request(Request::Write {
            session: None,
            op: create_op("/after", b"", false),
        })
        .await;
    assert!(revision > grant.session.0);
    server.stop().await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn power_loss_keeps_every_acknowledged_write() {
    for round in 0..3u64 {
        let backend = LossyBackend::new();
        let config = Config::for_tests(format!("lossy-{round}").into());
        let storage = Storage::with_backend(backend.clone(), config.log_retain).unwrap();
        let server = TestServer::start_on(config.clone(), storage).await;
        let acked = Arc::new(Mutex::new(Vec::new()));
        let writers = spawn_writers(server.addr, 4, acked.clone());
        tokio::time::sleep(Duration::from_millis(150 + 100 * round)).await;
        // Power fails now: first note what was acknowledged, then take what the disk holds.
        let acked_before = acked.lock().unwrap().clone();
        let image = backend.crash_image();
        assert!(
            acked_before.len() > 10,
            "writers made progress ({} writes)",
            acked_before.len()
        );
        let _ = server.stop().await;
        for w in writers {
            let _ = w.await;
        }

        let storage = Storage::with_backend(LossyBackend::from_image(image), config.log_retain)
            .expect("the store opens cleanly after a power loss");
        let server = TestServer::start_on(config, storage).await;
        assert_all_present(server.addr, &acked_before).await;
        server.stop().await.unwrap();
    }
}

/// Tests with real processes run one at a time (DESIGN §3a.15).
static PROCESS_TESTS: tokio::sync::Mutex<()> = tokio::sync::Mutex::const_new(());

fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port()
}

fn spawn_lockd(dir: &std::path::Path, port: u16) -> Child {
    Command::new(env!("CARGO_BIN_EXE_lockd"))
        .args([
            "--data-dir",
            dir.to_str().unwrap(),
            "--client-addr",
            &format!("127.0.0.1:{port}"),
        ])
        .args(["--tick-ms", "10", "--session-ttl-min-ms", "50"])
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .expect("spawn lockd")
}

async fn wait_until_serving(port: u16) -> std::net::SocketAddr {
    let addr: std::net::SocketAddr = format!("127.0.0.1:{port}").parse().unwrap();
    for _ in 0..500 {
        if tokio::net::TcpStream::connect(addr).await.is_ok() {
            return addr;
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    panic!("lockd did not start listening on {addr}");
}

/// Starts the real `lockd` on `dir` with 4 writers already writing to it.
async fn lockd_under_load(
    dir: &std::path::Path,
) -> (Child, Vec<tokio::task::JoinHandle<()>>, Acked) {
    let port = free_port();
    let child = spawn_lockd(dir, port);
    let addr = wait_until_serving(port).await;
    let acked = Arc::new(Mutex::new(Vec::new()));
    let writers = spawn_writers(addr, 4, acked.clone());
    (child, writers, acked)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sigkill_under_load_keeps_every_acknowledged_write() {
    let _one_at_a_time = PROCESS_TESTS.lock().await;
    let dir = tempfile::tempdir().unwrap();
    let (mut child, writers, acked) = lockd_under_load(dir.path()).await;
    tokio::time::sleep(Duration::from_millis(700)).await;
    child.kill().expect("SIGKILL");
    child.wait().unwrap();
    for w in writers {
        let _ = w.await;
    }
    let acked = acked.lock().unwrap().clone();
    assert!(
        acked.len() > 50,
        "writers made progress ({} writes)",
        acked.len()
    );

    let port = free_port();
    let mut child = spawn_lockd(dir.path(), port);
    let addr = wait_until_serving(port).await;
    assert_all_present(addr, &acked).await;
    // And the store takes new writes.
    let mut raw = Raw::connect(addr).await;
    raw.write(WriteOp::Create(lockd_protocol::CreateOp {
        path: "/after-crash".into(),
        data: vec![],
        ephemeral: false,
        sequential: false,
    }))
    .await
    .unwrap();
    child.kill().unwrap();
    child.wait().unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sigterm_shuts_down_gracefully_under_load() {
    let _one_at_a_time = PROCESS_TESTS.lock().await;
    let dir = tempfile::tempdir().unwrap();
    let (mut child, writers, acked) = lockd_under_load(dir.path()).await;
    tokio::time::sleep(Duration::from_millis(300)).await;
    let pid = child.id().to_string();
    let status = Command::new("kill").args(["-TERM", &pid]).status().unwrap();
    assert!(status.success());
    let exited = tokio::task::spawn_blocking(move || {
        for _ in 0..500 {
            if let Some(status) = child.try_wait().unwrap() {
                return Some(status);
            }
            std::thread::sleep(Duration::from_millis(20));
        }
        let _ = child.kill();
        None
    })
    .await
    .unwrap();
    let status = exited.expect("lockd exits within 10 s of SIGTERM");
    assert!(status.success(), "clean exit: {status:?}");
    for w in writers {
        let _ = w.await;
    }
    let acked = acked.lock().unwrap().clone();
    let port = free_port();
    let mut child = spawn_lockd(dir.path(), port);
    let addr = wait_until_serving(port).await;
    assert_all_present(addr, &acked).await;
    child.kill().unwrap();
    child.wait().unwrap();
}

#[tokio::test]
async fn a_data_dir_of_another_cluster_is_refused() {
    let dir = tempfile::tempdir().unwrap();
    let server = TestServer::start(dir.path().to_path_buf()).await;
    server.stop().await.unwrap();
    let config = Config {
        cluster_token: "another".into(),
        ..Config::for_tests(dir.path().to_path_buf())
    };
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let result = lockd_server::run(listener, config, std::future::pending()).await;
    assert!(
        matches!(result, Err(lockd_server::ServerError::WrongCluster { .. })),
        "{result:?}"
    );
}
