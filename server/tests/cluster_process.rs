//! Three real `lockd` processes on loopback, driven through `lockd-client`: redirects, leader
//! SIGKILL under load, snapshot catch-up of a restarted follower, sessions across a leader
//! change, and a SIGSTOPped leader.
//!
//! Multi-process tests run one at a time (DESIGN §3a.15): every test takes `SERIAL` first.
//! Each node's stderr goes to `node-N.log` in the cluster's temp dir; when a test fails, the
//! tail of every log is printed and the temp dir is kept. Every wait polls a condition with a
//! deadline.

mod support;

use std::collections::BTreeMap;
use std::fs::OpenOptions;
use std::io::Write as _;
use std::net::TcpListener;
use std::path::PathBuf;
use std::process::{Child, Command, Stdio};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use futures_util::StreamExt;
use lockd_client::{Client, ClientConfig, Error as ClientError, SessionStatus};
use lockd_protocol::{
    ClientMessage, ClusterStatus, Consistency, Error as WireError, ReadOp, Reply, Request,
    ServerMessage, SetOp, WriteOp, WriteResult,
};

/// Tests with real processes run one at a time (DESIGN §3a.15).
static SERIAL: tokio::sync::Mutex<()> = tokio::sync::Mutex::const_new(());

/// Lines of each node's log printed when a test fails.
const LOG_TAIL: usize = 60;

// ---------------------------------------------------------------------------------------------
// The cluster harness
// ---------------------------------------------------------------------------------------------

/// How the nodes are started: extra flags, and keys for a `--config` TOML file.
#[derive(Clone, Debug)]
struct Settings {
    flags: Vec<String>,
    toml: String,
}

impl Settings {
    /// Test timings: 10 ms ticks, election timeout 100-200 ms, short TTLs allowed, no spinning.
    fn fast() -> Settings {
        let flags = [
            "--tick-ms",
            "10",
            "--election-ticks",
            "10",
            "--session-ttl-min-ms",
            "50",
            "--spin-us",
            "0",
        ];
        Settings {
            flags: flags.iter().map(|s| s.to_string()).collect(),
            toml: String::new(),
        }
    }

    /// The shipped defaults (tick 100 ms, 10 election ticks).
    fn shipped() -> Settings {
        Settings {
            flags: Vec::new(),
            toml: String::new(),
        }
    }

    /// Keeps only `n` log entries below the applied index (compaction forces snapshots).
    fn log_retain(mut self, n: u64) -> Settings {
        self.toml.push_str(&format!("log_retain = {n}\n"));
        self
    }
}

#[derive(Debug)]
struct Member {
    id: u64,
    client_addr: String,
    peer_addr: String,
    data_dir: PathBuf,
    log: PathBuf,
    child: Option<Child>,
    starts: u32,
}

/// Three `lockd` processes; kills them all when dropped.
#[derive(Debug)]
struct Cluster {
    dir: Option<tempfile::TempDir>,
    token: String,
    cluster_id: u64,
    peers: String,
    config_file: PathBuf,
    settings: Settings,
    /// `RUST_LOG` of the nodes.
    rust_log: String,
    members: Vec<Member>,
}

/// Why starting the nodes failed.
enum StartError {
    /// A port picked as free was taken before the node bound it: pick others.
    PortTaken,
    Other(String),
}

fn free_ports(n: usize) -> Vec<u16> {
    // Hold every listener until all are picked, so the ports differ.
    let listeners: Vec<TcpListener> = (0..n)
        .map(|_| TcpListener::bind("127.0.0.1:0").expect("bind 127.0.0.1:0"))
        .collect();
    listeners
        .iter()
        .map(|l| l.local_addr().expect("local addr").port())
        .collect()
}

fn tail(path: &std::path::Path, lines: usize) -> String {
    let text = std::fs::read_to_string(path).unwrap_or_else(|e| format!("(no log: {e})"));
    let all: Vec<&str> = text.lines().collect();
    all[all.len().saturating_sub(lines)..].join("\n")
}

impl Cluster {
    /// Starts three nodes and waits until each serves clients (not yet for a leader).
    async fn start(settings: Settings) -> Cluster {
        Cluster::start_with_log(settings, "info").await
    }

    async fn start_with_log(settings: Settings, rust_log: &str) -> Cluster {
        for attempt in 1..=5 {
            let mut cluster = Cluster::spawn(settings.clone(), rust_log);
            match cluster.wait_all_serving(Duration::from_secs(20)).await {
                Ok(()) => return cluster,
                Err(StartError::PortTaken) if attempt < 5 => {
                    eprintln!("a port was taken (attempt {attempt}); starting again on others");
                    cluster.kill_all();
                }
                Err(StartError::PortTaken) => panic!("ports taken five times in a row"),
                Err(StartError::Other(why)) => panic!("cluster did not start: {why}"),
            }
        }
        unreachable!()
    }

    fn spawn(settings: Settings, rust_log: &str) -> Cluster {
        let dir = tempfile::Builder::new()
            .prefix("lockd-cluster-")
            .tempdir()
            .expect("temp dir");
        let ports = free_ports(6);
        let nanos = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map(|d| d.as_nanos())
            .unwrap_or(0);
        // A token of its own: a stray process on a reused port cannot pass for a member.
        let token = format!("cluster-process-{}-{nanos}", std::process::id());
        let cluster_id = lockd_server::Config {
            cluster_token: token.clone(),
            ..lockd_server::Config::default()
        }
        .cluster_id();
        let members: Vec<Member> = (1..=3u64)
            .map(|id| {
                let i = (id - 1) as usize;
                Member {
                    id,
                    client_addr: format!("127.0.0.1:{}", ports[i]),
                    peer_addr: format!("127.0.0.1:{}", ports[3 + i]),
                    data_dir: dir.path().join(format!("data-{id}")),
                    log: dir.path().join(format!("node-{id}.log")),
                    child: None,
                    starts: 0,
                }
            })
            .collect();
        let peers = members
            .iter()
            .map(|m| format!("{}={}", m.id, m.peer_addr))
            .collect::<Vec<_>>()
            .join(",");
        let config_file = dir.path().join("lockd.toml");
        std::fs::write(&config_file, &settings.toml).expect("write config");
        let mut cluster = Cluster {
            dir: Some(dir),
            token,
            cluster_id,
            peers,
            config_file,
            settings,
            rust_log: rust_log.to_string(),
            members,
        };
        for id in 1..=3 {
            cluster.spawn_member(id);
        }
        cluster
    }

    fn member(&self, id: u64) -> &Member {
        &self.members[(id - 1) as usize]
    }

    fn member_mut(&mut self, id: u64) -> &mut Member {
        &mut self.members[(id - 1) as usize]
    }

    fn addr(&self, id: u64) -> String {
        self.member(id).client_addr.clone()
    }

    /// Client addresses, `first` first.
    fn endpoints_from(&self, first: u64) -> Vec<String> {
        let mut ids: Vec<u64> = vec![first];
        ids.extend((1..=3).filter(|&i| i != first));
        ids.into_iter().map(|i| self.addr(i)).collect()
    }

    /// The node whose client address is `addr`.
    fn id_of(&self, addr: Option<&str>) -> Option<u64> {
        self.members
            .iter()
            .find(|m| Some(m.client_addr.as_str()) == addr)
            .map(|m| m.id)
    }

    fn running(&self) -> Vec<u64> {
        self.members
            .iter()
            .filter(|m| m.child.is_some())
            .map(|m| m.id)
            .collect()
    }

    fn spawn_member(&mut self, id: u64) {
        let token = self.token.clone();
        let peers = self.peers.clone();
        let config_file = self.config_file.clone();
        let flags = self.settings.flags.clone();
        let rust_log = self.rust_log.clone();
        let m = self.member_mut(id);
        assert!(m.child.is_none(), "node {id} is already running");
        m.starts += 1;
        let mut log = OpenOptions::new()
            .create(true)
            .append(true)
            .open(&m.log)
            .expect("open node log");
        writeln!(
            log,
            "===== test harness: start #{} of node {id} =====",
            m.starts
        )
        .expect("write log");
        let child = Command::new(env!("CARGO_BIN_EXE_lockd"))
            .arg("--id")
            .arg(id.to_string())
            .arg("--data-dir")
            .arg(&m.data_dir)
            .args(["--client-addr", &m.client_addr])
            .args(["--peer-addr", &m.peer_addr])
            .args(["--peers", &peers])
            .args(["--cluster-token", &token])
            .arg("--config")
            .arg(&config_file)
            .args(&flags)
            .env("RUST_LOG", &rust_log)
            .env("NO_COLOR", "1")
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::from(log))
            .spawn()
            .expect("spawn lockd");
        m.child = Some(child);
    }

    /// Restarts a stopped node on its data dir and ports, and waits until it serves.
    async fn restart(&mut self, id: u64) {
        self.spawn_member(id);
        match self.wait_serving(id, Duration::from_secs(20)).await {
            Ok(()) => {}
            Err(StartError::PortTaken) => panic!("node {id}: its port was taken while it was down"),
            Err(StartError::Other(why)) => panic!("node {id} did not restart: {why}"),
        }
    }

    fn pid(&self, id: u64) -> u32 {
        self.member(id).child.as_ref().expect("running").id()
    }

    /// SIGKILL; returns once the process is gone.
    fn kill(&mut self, id: u64) {
        let m = self.member_mut(id);
        let mut child = m.child.take().expect("node is running");
        child.kill().expect("SIGKILL");
        child.wait().expect("reap");
    }

    fn signal(&self, id: u64, signal: &str) {
        let status = Command::new("kill")
            .arg(format!("-{signal}"))
            .arg(self.pid(id).to_string())
            .status()
            .expect("run kill");
        assert!(status.success(), "kill -{signal} node {id} failed");
    }

    fn kill_all(&mut self) {
        for m in &mut self.members {
            if let Some(mut child) = m.child.take() {
                let _ = child.kill();
                let _ = child.wait();
            }
        }
    }

    async fn wait_all_serving(&mut self, within: Duration) -> Result<(), StartError> {
        for id in 1..=3 {
            self.wait_serving(id, within).await?;
        }
        Ok(())
    }

    /// Waits until node `id` answers a status request as itself, or its process exits.
    async fn wait_serving(&mut self, id: u64, within: Duration) -> Result<(), StartError> {
        let deadline = Instant::now() + within;
        loop {
            let exited = {
                let m = self.member_mut(id);
                match m.child.as_mut().map(|c| c.try_wait()) {
                    Some(Ok(Some(status))) => Some(status.to_string()),
                    Some(Ok(None)) => None,
                    Some(Err(e)) => Some(e.to_string()),
                    None => Some("not started".into()),
                }
            };
            if let Some(status) = exited {
                self.member_mut(id).child = None;
                let log = std::fs::read_to_string(&self.member(id).log).unwrap_or_default();
                if log.contains("Address already in use") {
                    return Err(StartError::PortTaken);
                }
                return Err(StartError::Other(format!("node {id} exited: {status}")));
            }
            if self.status(id).await.is_some() {
                return Ok(());
            }
            if Instant::now() >= deadline {
                return Err(StartError::Other(format!(
                    "node {id} not serving after {within:?}"
                )));
            }
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }

    /// Node `id`'s view of the cluster, if it answers within 1 s as itself.
    async fn status(&self, id: u64) -> Option<ClusterStatus> {
        let addr = self.addr(id);
        let client = pinned(&addr, Duration::from_secs(1)).await.ok()?;
        let status = client.cluster_status().await.ok()?.status;
        let same_node = client.connected_to().as_deref() == Some(addr.as_str());
        (same_node && status.node_id == id && status.cluster_id == self.cluster_id)
            .then_some(status)
    }

    /// Statuses of the running nodes that answer.
    async fn statuses(&self) -> BTreeMap<u64, ClusterStatus> {
        let mut out = BTreeMap::new();
        for id in self.running() {
            if let Some(s) = self.status(id).await {
                out.insert(id, s);
            }
        }
        out
    }

    /// Waits until the nodes `among` all answer and agree on one leader (one of them) and
    /// one term; returns (leader, term).
    async fn agreed_leader(&self, among: &[u64], within: Duration) -> (u64, u64) {
        let deadline = Instant::now() + within;
        loop {
            let mut views = BTreeMap::new();
            for &id in among {
                if let Some(s) = self.status(id).await {
                    views.insert(id, s);
                }
            }
            if views.len() == among.len() {
                let first = views.values().next().expect("non-empty");
                let (leader, term) = (first.leader, first.term);
                if let Some(l) = leader {
                    if among.contains(&l)
                        && views.values().all(|s| s.leader == leader && s.term == term)
                    {
                        return (l, term);
                    }
                }
            }
            assert!(
                Instant::now() < deadline,
                "nodes {among:?} did not agree on a leader within {within:?}; last views: {views:#?}"
            );
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
    }

    /// The leader of all three running nodes.
    async fn leader(&self) -> (u64, u64) {
        self.agreed_leader(&self.running(), Duration::from_secs(15))
            .await
    }

    /// Waits until node `id` has applied at least `index`; returns its status.
    async fn wait_applied(&self, id: u64, index: u64, within: Duration) -> ClusterStatus {
        let deadline = Instant::now() + within;
        loop {
            let status = self.status(id).await;
            if let Some(s) = &status {
                if s.applied_index >= index {
                    return s.clone();
                }
            }
            assert!(
                Instant::now() < deadline,
                "node {id} did not apply index {index} within {within:?}; last status {status:?}"
            );
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }

    fn log_text(&self, id: u64) -> String {
        std::fs::read_to_string(&self.member(id).log).unwrap_or_default()
    }
}

impl Drop for Cluster {
    fn drop(&mut self) {
        self.kill_all();
        if std::thread::panicking() {
            for m in &self.members {
                eprintln!(
                    "\n----- node {} (client {}, peer {}): last {LOG_TAIL} lines of {} -----\n{}",
                    m.id,
                    m.client_addr,
                    m.peer_addr,
                    m.log.display(),
                    tail(&m.log, LOG_TAIL)
                );
            }
            if let Some(dir) = self.dir.take() {
                eprintln!("----- kept the cluster's files in {}", dir.keep().display());
            }
        }
    }
}

/// A client that talks to `addr` only: one attempt per call, no fail-over to other members.
async fn pinned(addr: &str, timeout: Duration) -> Result<Client, ClientError> {
    Client::with_config(
        ClientConfig::new([addr])
            .max_attempts(1)
            .request_timeout(timeout)
            .connect_timeout(timeout),
    )
    .await
}

/// A client pinned to `addr`, connected to it.
async fn pinned_client(addr: &str) -> Client {
    let client = pinned(addr, Duration::from_secs(5))
        .await
        .unwrap_or_else(|e| panic!("connect to {addr}: {e}"));
    assert_eq!(client.connected_to().as_deref(), Some(addr));
    client
}

/// Reads every `(path, data)` from node `addr` (linearizable or stale) and checks the data.
async fn assert_all_present(addr: &str, expected: &[(String, Vec<u8>)], stale: bool, what: &str) {
    let client = pinned_client(addr).await;
    let client = &client;
    let failures: Vec<String> = futures_util::stream::iter(expected.iter())
        .map(|(path, data)| async move {
            let got = if stale {
                client.get(path.as_str()).stale().await
            } else {
                client.get(path.as_str()).await
            };
            match got {
                Ok(g) if &g.data == data => None,
                Ok(g) => Some(format!("{path}: data {:?}, expected {:?}", g.data, data)),
                Err(e) => Some(format!("{path}: {e}")),
            }
        })
        .buffer_unordered(32)
        .filter_map(|f| async move { f })
        .collect()
        .await;
    assert_eq!(
        client.connected_to().as_deref(),
        Some(addr),
        "reads moved off {addr}"
    );
    assert!(
        failures.is_empty(),
        "{what}: {} of {} acknowledged writes wrong or missing on {addr} ({} reads), first: {:?}",
        failures.len(),
        expected.len(),
        if stale { "stale" } else { "linearizable" },
        &failures[..failures.len().min(10)]
    );
}

fn ms(d: Duration) -> f64 {
    d.as_secs_f64() * 1000.0
}

/// An error that may come back from a write while a leader is lost: its outcome is unknown or
/// it surely did not apply. Anything else (e.g. `NodeExists` for a fresh path) is a bug.
fn tolerated_during_failover(e: &ClientError) -> bool {
    e.is_indeterminate()
        || matches!(
            e,
            ClientError::ConnectionLost { .. } | ClientError::ConnectFailed { .. }
        )
        || e.wire().is_some_and(WireError::is_retryable)
}

// ---------------------------------------------------------------------------------------------
// Write load with a record of every acknowledged write
// ---------------------------------------------------------------------------------------------

#[derive(Clone, Debug)]
struct Ack {
    path: String,
    data: Vec<u8>,
    sent: Instant,
    acked: Instant,
}

#[derive(Default, Debug)]
struct Record {
    acked: Mutex<Vec<Ack>>,
    /// Writes whose outcome is unknown (tolerated errors), with the error.
    unknown: Mutex<Vec<(String, String)>>,
    /// Errors that should never happen.
    unexpected: Mutex<Vec<(String, String)>>,
    stop: AtomicBool,
}

impl Record {
    fn acked(&self) -> Vec<Ack> {
        self.acked.lock().expect("lock").clone()
    }

    fn count(&self) -> usize {
        self.acked.lock().expect("lock").len()
    }

    fn acked_sent_after(&self, t: Instant) -> usize {
        self.acked
            .lock()
            .expect("lock")
            .iter()
            .filter(|a| a.sent >= t)
            .count()
    }

    /// First acknowledgement of a write sent at or after `t`.
    fn first_ack_sent_after(&self, t: Instant) -> Option<Instant> {
        self.acked
            .lock()
            .expect("lock")
            .iter()
            .filter(|a| a.sent >= t)
            .map(|a| a.acked)
            .min()
    }

    fn note_error(&self, path: String, e: &ClientError) {
        if tolerated_during_failover(e) {
            self.unknown
                .lock()
                .expect("lock")
                .push((path, e.to_string()));
        } else {
            self.unexpected
                .lock()
                .expect("lock")
                .push((path, e.to_string()));
        }
    }

    async fn wait_for(&self, what: &str, within: Duration, cond: impl Fn(&Record) -> bool) {
        let deadline = Instant::now() + within;
        while !cond(self) {
            assert!(
                Instant::now() < deadline,
                "{what} not reached within {within:?} ({} acked, unknown {:?}, unexpected {:?})",
                self.count(),
                self.unknown.lock().expect("lock"),
                self.unexpected.lock().expect("lock")
            );
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
    }
}

/// A writer creating `{prefix}/w{w}-{i}` (data `i`) one after another, without a session,
/// until `record.stop`.
fn spawn_create_writer(
    client: Client,
    prefix: &str,
    w: usize,
    record: Arc<Record>,
) -> tokio::task::JoinHandle<()> {
    let prefix = prefix.to_string();
    tokio::spawn(async move {
        for i in 0u64.. {
            if record.stop.load(Ordering::Relaxed) {
                return;
            }
            let path = format!("{prefix}/w{w}-{i}");
            let data = format!("{w}-{i}").into_bytes();
            let sent = Instant::now();
            match client.create(path.as_str(), data.clone()).await {
                Ok(created) => {
                    assert_eq!(created.path, path);
                    record.acked.lock().expect("lock").push(Ack {
                        path,
                        data,
                        sent,
                        acked: Instant::now(),
                    });
                }
                Err(e) => record.note_error(path, &e),
            }
        }
    })
}

/// A writer setting `path` to `i` for i = 1, 2, ... through a session (exactly-once retries)
/// until `record.stop`. Returns the number of sets attempted.
fn spawn_session_writer(
    client: Client,
    path: String,
    record: Arc<Record>,
) -> tokio::task::JoinHandle<u64> {
    tokio::spawn(async move {
        let session = client
            .session(Duration::from_secs(5))
            .await
            .expect("open the writer's session");
        session
            .create(path.as_str(), b"0".to_vec())
            .await
            .expect("create the session writer's node");
        let mut attempted = 0;
        for i in 1u64.. {
            if record.stop.load(Ordering::Relaxed) {
                break;
            }
            attempted += 1;
            let data = i.to_string().into_bytes();
            let sent = Instant::now();
            match session.set(path.as_str(), data.clone()).await {
                Ok(set) => {
                    assert_eq!(set.stat.version, i, "set #{i} of {path} applied once");
                    record.acked.lock().expect("lock").push(Ack {
                        path: path.clone(),
                        data,
                        sent,
                        acked: Instant::now(),
                    });
                }
                Err(e) => {
                    record.note_error(path.clone(), &e);
                    break;
                }
            }
        }
        attempted
    })
}

// ---------------------------------------------------------------------------------------------
// Scenarios
// ---------------------------------------------------------------------------------------------

/// A client given one endpoint, leader or follower, has its writes applied (following
/// `NotLeader` to the leader); every node then serves them to linearizable reads at once, and
/// the nodes agree on one leader and term while commit and applied indexes advance.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn writes_through_any_endpoint_reach_the_leader_and_every_node_reads_them() {
    let _serial = SERIAL.lock().await;
    let started = Instant::now();
    let cluster = Cluster::start(Settings::fast()).await;
    let (leader, term) = cluster.leader().await;
    let before = cluster.statuses().await;
    assert_eq!(before.len(), 3, "every node answers status: {before:#?}");
    for s in before.values() {
        assert_eq!(s.members.len(), 3, "{s:?}");
        let mut addrs: Vec<&str> = s.members.iter().map(|m| m.client_addr.as_str()).collect();
        addrs.sort_unstable();
        let mut expected: Vec<String> = (1..=3).map(|i| cluster.addr(i)).collect();
        expected.sort_unstable();
        assert_eq!(
            addrs, expected,
            "node {} knows every client address",
            s.node_id
        );
    }
    let leader_addr = cluster.addr(leader);

    let setup = Client::connect([cluster.addr(leader)])
        .await
        .expect("connect");
    setup.create("/s1", Vec::new()).await.expect("create /s1");
    setup
        .create("/s1/shared", b"0".to_vec())
        .await
        .expect("create /s1/shared");
    let readers: Vec<(u64, Client)> = {
        let mut v = Vec::new();
        for id in 1..=3 {
            v.push((id, pinned_client(&cluster.addr(id)).await));
        }
        v
    };

    for via in 1..=3u64 {
        let client = Client::connect([cluster.addr(via)])
            .await
            .unwrap_or_else(|e| panic!("connect to node {via}: {e}"));
        assert_eq!(client.connected_to(), Some(cluster.addr(via)));
        let path = format!("/s1/via-{via}");
        let data = format!("written through node {via}").into_bytes();
        let created = client
            .create(path.as_str(), data.clone())
            .await
            .unwrap_or_else(|e| panic!("create through node {via}: {e}"));
        let set = client
            .set("/s1/shared", format!("{via}").into_bytes())
            .await
            .unwrap_or_else(|e| panic!("set through node {via}: {e}"));
        assert_eq!(set.stat.version, via, "each set applied once");
        // The client followed NotLeader to the leader (unless an election moved leadership
        // meanwhile, which 100 ms election timeouts allow on a loaded machine).
        let (now_leader, now_term) = cluster.leader().await;
        if now_term == term {
            assert_eq!(
                client.connected_to().as_deref(),
                Some(leader_addr.as_str()),
                "a client of node {via} ends up on the leader (node {leader})"
            );
        } else {
            println!(
                "note: leader changed to node {now_leader} in term {now_term} during the test"
            );
        }
        // Linearizable: every node serves both writes at once, no waiting.
        for (id, reader) in &readers {
            let got = reader
                .get(path.as_str())
                .await
                .unwrap_or_else(|e| panic!("read {path} on node {id}: {e}"));
            assert_eq!(got.data, data, "{path} on node {id}");
            assert!(got.revision >= created.revision, "revision on node {id}");
            let shared = reader.get("/s1/shared").await.expect("read /s1/shared");
            assert_eq!(
                (shared.data, shared.stat.version),
                (format!("{via}").into_bytes(), via),
                "/s1/shared on node {id} right after the set through node {via}"
            );
            assert_eq!(reader.connected_to(), Some(cluster.addr(*id)));
        }
    }

    // Status: one leader, one term, commit and applied advanced everywhere.
    let (leader_after, term_after) = cluster.leader().await;
    if (leader_after, term_after) != (leader, term) {
        println!(
            "note: leadership moved from node {leader} (term {term}) to node {leader_after} \
             (term {term_after}) in a steady cluster"
        );
    }
    let leader_commit = cluster
        .status(leader_after)
        .await
        .expect("leader status")
        .commit_index;
    for id in 1..=3 {
        let after = cluster
            .wait_applied(id, leader_commit, Duration::from_secs(5))
            .await;
        let was = &before[&id];
        assert!(
            after.commit_index >= was.commit_index + 8 && after.applied_index > was.applied_index,
            "node {id}: commit/applied advanced by the 8 writes: before {was:?}, after {after:?}"
        );
        assert!(after.applied_index <= after.commit_index, "{after:?}");
        assert_eq!((after.leader, after.term), (Some(leader_after), term_after));
    }
    println!(
        "writes through any endpoint: leader {leader}, term {term}, {:.1} s",
        started.elapsed().as_secs_f64()
    );
}

/// SIGKILL of the leader under write load: the survivors elect a leader, writers resume, and
/// every acknowledged write is there on the survivors (linearizable reads) and, once it has
/// caught up, on the restarted node (stale reads). Session writes are applied exactly once
/// across the fail-over.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn leader_sigkill_under_load_loses_no_acknowledged_write() {
    let _serial = SERIAL.lock().await;
    let started = Instant::now();
    let mut cluster = Cluster::start(Settings::fast()).await;
    let (old_leader, old_term) = cluster.leader().await;
    let setup = Client::connect(cluster.endpoints_from(old_leader))
        .await
        .expect("connect");
    setup.create("/s2", Vec::new()).await.expect("create /s2");

    let record = Arc::new(Record::default());
    let mut writers = Vec::new();
    for w in 0..3usize {
        // Writers start on different nodes and follow the leader from there.
        let first = (w as u64 % 3) + 1;
        let client = Client::connect(cluster.endpoints_from(first))
            .await
            .expect("connect writer");
        writers.push(spawn_create_writer(client, "/s2", w, record.clone()));
    }
    let session_client = Client::connect(cluster.endpoints_from(old_leader))
        .await
        .expect("connect session writer");
    let session_writer = spawn_session_writer(session_client, "/s2/session".into(), record.clone());

    record
        .wait_for(
            "100 writes (10 of them by the session writer) before the kill",
            Duration::from_secs(15),
            |r| {
                let acked = r.acked.lock().expect("lock");
                acked.len() >= 100 && acked.iter().filter(|a| a.path == "/s2/session").count() >= 10
            },
        )
        .await;
    let killed_at = Instant::now();
    cluster.kill(old_leader);
    let acked_before_kill = record.count();

    let survivors: Vec<u64> = cluster.running();
    let (new_leader, new_term) = cluster
        .agreed_leader(&survivors, Duration::from_secs(10))
        .await;
    let leader_seen = killed_at.elapsed();
    assert_ne!(new_leader, old_leader);
    assert!(new_term > old_term, "term {new_term} after {old_term}");
    record
        .wait_for(
            "100 writes sent after the kill acknowledged",
            Duration::from_secs(15),
            |r| r.acked_sent_after(killed_at) >= 100,
        )
        .await;
    record.stop.store(true, Ordering::Relaxed);
    for w in writers {
        tokio::time::timeout(Duration::from_secs(15), w)
            .await
            .expect("writer stops")
            .expect("writer panicked");
    }
    let session_sets = tokio::time::timeout(Duration::from_secs(15), session_writer)
        .await
        .expect("session writer stops")
        .expect("session writer panicked");
    let recovery = record
        .first_ack_sent_after(killed_at)
        .expect("a write after the kill")
        - killed_at;
    let acked = record.acked();
    let unknown = record.unknown.lock().expect("lock").clone();
    let unexpected = record.unexpected.lock().expect("lock").clone();
    println!(
        "leader SIGKILL under load: node {old_leader} (term {old_term}) killed after {acked_before_kill} acked writes; \
         survivors agreed on node {new_leader} (term {new_term}) after {:.0} ms; \
         time to recovery (kill -> first acknowledged write sent after it) {:.0} ms; \
         {} writes acked in all ({} session sets of {session_sets} attempted), {} with unknown \
         outcome: {unknown:?}",
        ms(leader_seen),
        ms(recovery),
        acked.len(),
        acked.iter().filter(|a| a.path == "/s2/session").count(),
        unknown.len(),
    );
    assert!(
        unexpected.is_empty(),
        "unexpected write errors: {unexpected:?}"
    );

    // The latest value of each path (creates are written once; the session node many times).
    let mut latest: BTreeMap<String, Vec<u8>> = BTreeMap::new();
    for a in &acked {
        latest.insert(a.path.clone(), a.data.clone());
    }
    let session_acked = acked.iter().filter(|a| a.path == "/s2/session").count() as u64;
    // The session node's last set may have applied without an acknowledgement (its writer
    // stops at the first error): it is checked by version below, not by data.
    let expected: Vec<(String, Vec<u8>)> = latest
        .into_iter()
        .filter(|(path, _)| path != "/s2/session")
        .collect();
    for &id in &survivors {
        assert_all_present(&cluster.addr(id), &expected, false, "survivor").await;
        let got = pinned_client(&cluster.addr(id))
            .await
            .get("/s2/session")
            .await
            .expect("read the session node");
        // Every set that was acknowledged applied exactly once; at most the last one, whose
        // answer was lost, applied without an acknowledgement.
        assert!(
            got.stat.version >= session_acked && got.stat.version <= session_sets,
            "/s2/session on node {id}: version {} with {session_acked} sets acknowledged of {session_sets}",
            got.stat.version
        );
    }

    // The killed node comes back, catches up, and has every acknowledged write.
    let target = cluster
        .status(new_leader)
        .await
        .expect("leader status")
        .commit_index;
    cluster.restart(old_leader).await;
    let caught_up = cluster
        .wait_applied(old_leader, target, Duration::from_secs(20))
        .await;
    assert_eq!(caught_up.leader, Some(new_leader), "{caught_up:?}");
    assert_eq!(caught_up.term, new_term, "{caught_up:?}");
    assert_all_present(&cluster.addr(old_leader), &expected, true, "restarted node").await;
    println!(
        "leader SIGKILL under load: restarted node {old_leader} caught up; test took {:.1} s",
        started.elapsed().as_secs_f64()
    );
}

/// A follower down while the leader writes far past its log retention comes back and catches
/// up through a snapshot: it applies up to the leader's index and serves the same data.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn restarted_follower_catches_up_by_snapshot_after_log_compaction() {
    let _serial = SERIAL.lock().await;
    let started = Instant::now();
    // What the leader sent the dead follower stays queued in its peer transport and arrives
    // when the follower restarts, so the writes must outrun the leader's in-flight window of
    // 256 appends: with at most 2 writes in flight each append carries at most 2 entries, so
    // at most ~512 entries reach the follower that way. Storage compacts in steps, once
    // applied - retain is more than 1024 past the first index (COMPACT_STEP / 4 in
    // storage/mod.rs): with retain 100, 1400 writes compact the log up to ~1030, past
    // everything the follower can have.
    const RETAIN: u64 = 100;
    const WRITES: usize = 1_400;
    const IN_FLIGHT: usize = 2;
    let mut cluster = Cluster::start_with_log(
        Settings::fast().log_retain(RETAIN),
        "info,lockd_server::raft=debug",
    )
    .await;
    let (leader, term) = cluster.leader().await;
    let follower = (1..=3).find(|&i| i != leader).expect("a follower");
    let client = Client::connect(cluster.endpoints_from(leader))
        .await
        .expect("connect");
    client.create("/s3", Vec::new()).await.expect("create /s3");
    client
        .create("/s3/before", b"before".to_vec())
        .await
        .expect("create /s3/before");
    let before = cluster
        .wait_applied(
            follower,
            cluster.status(leader).await.expect("status").commit_index,
            Duration::from_secs(5),
        )
        .await;
    cluster.kill(follower);

    // Many small writes, IN_FLIGHT at a time.
    let client = &client;
    let write_started = Instant::now();
    let results: Vec<Result<(String, Vec<u8>), String>> = futures_util::stream::iter(0..WRITES)
        .map(|i| async move {
            let path = format!("/s3/k{i:05}");
            let data = format!("value {i}").into_bytes();
            client
                .create(path.as_str(), data.clone())
                .await
                .map(|_| (path.clone(), data))
                .map_err(|e| format!("{path}: {e}"))
        })
        .buffer_unordered(IN_FLIGHT)
        .collect()
        .await;
    let write_time = write_started.elapsed();
    let mut expected: Vec<(String, Vec<u8>)> = Vec::new();
    for r in results {
        expected.push(r.unwrap_or_else(|e| panic!("write with one follower down failed: {e}")));
    }
    expected.push(("/s3/before".into(), b"before".to_vec()));
    let leader_status = cluster.status(leader).await.expect("leader status");
    assert!(
        leader_status.applied_index > before.applied_index + 1024 + RETAIN + 50,
        "the leader applied far enough past the follower for compaction: {leader_status:?}, follower was at {}",
        before.applied_index
    );

    let restarted_at = Instant::now();
    cluster.restart(follower).await;
    let caught_up = cluster
        .wait_applied(
            follower,
            leader_status.commit_index,
            Duration::from_secs(30),
        )
        .await;
    let catch_up_time = restarted_at.elapsed();
    let (leader_now, term_now) = cluster.leader().await;
    if (leader_now, term_now) != (leader, term) {
        println!(
            "note: leadership moved from node {leader} (term {term}) to node {leader_now} \
             (term {term_now}) during the test"
        );
    }

    // It was a snapshot: a leader sent one to the follower, and the follower installed it.
    let follower_log = cluster.log_text(follower);
    let sent = (1..=3).filter(|&i| i != follower).any(|i| {
        cluster
            .log_text(i)
            .lines()
            .any(|l| l.contains("sending snapshot") && l.contains(&format!("to={follower}")))
    });
    let installed = follower_log
        .lines()
        .any(|l| l.contains("installing snapshot"));
    assert!(
        sent && installed,
        "snapshot sent by node {leader}: {sent}, installed by node {follower}: {installed}; \
         follower before the kill {before:?}, leader after the writes {leader_status:?}, \
         follower after catching up {caught_up:?}"
    );

    // Same data: every write, read stale on the restarted follower, and the same listing.
    assert_all_present(
        &cluster.addr(follower),
        &expected,
        true,
        "snapshot catch-up",
    )
    .await;
    let on_follower = pinned_client(&cluster.addr(follower))
        .await
        .children("/s3")
        .stale()
        .await
        .expect("list on the follower");
    let on_leader = pinned_client(&cluster.addr(leader))
        .await
        .children("/s3")
        .await
        .expect("list on the leader");
    assert_eq!(on_follower.names.len(), WRITES + 1);
    assert_eq!(on_follower.names, on_leader.names);

    // And it goes on replicating from the log after the snapshot.
    let after = client
        .create("/s3/after", b"after".to_vec())
        .await
        .expect("write after catch-up");
    let got = pinned_client(&cluster.addr(follower))
        .await
        .get("/s3/after")
        .await
        .expect("linearizable read on the follower");
    assert_eq!(got.data, b"after");
    assert!(got.revision >= after.revision);
    println!(
        "snapshot catch-up: {WRITES} writes in {:.0} ms with node {follower} down (leader {leader} applied {}); \
         restarted node applied {} after {:.0} ms; test took {:.1} s",
        ms(write_time),
        leader_status.applied_index,
        caught_up.applied_index,
        ms(catch_up_time),
        started.elapsed().as_secs_f64()
    );
}

/// A session (TTL 1 s) kept alive by the client lives through a SIGKILL of the leader: after
/// more than two TTLs its ephemeral node is still there on the new leader and session writes
/// still apply; closing it removes the node.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn session_and_its_ephemeral_survive_a_leader_change() {
    let _serial = SERIAL.lock().await;
    let started = Instant::now();
    const TTL: Duration = Duration::from_secs(1);
    let mut cluster = Cluster::start(Settings::fast()).await;
    let (old_leader, old_term) = cluster.leader().await;
    let setup = Client::connect(cluster.endpoints_from(old_leader))
        .await
        .expect("connect");
    setup.create("/s4", Vec::new()).await.expect("create /s4");

    // Session A's client is on the leader. Sessions B and C have clients given one follower
    // each: their ephemeral creates move them to the leader, and after the kill they dial
    // their follower again; one of the two survivors stays a follower, so one of B and C is
    // then kept alive through a follower (keepalives forwarded in the follower's batches).
    let followers: Vec<u64> = (1..=3).filter(|&i| i != old_leader).collect();
    let client_a = Client::connect(cluster.endpoints_from(old_leader))
        .await
        .expect("connect A");
    let client_b = Client::connect([cluster.addr(followers[0])])
        .await
        .expect("connect B");
    let client_c = Client::connect([cluster.addr(followers[1])])
        .await
        .expect("connect C");
    let mut sessions = Vec::new();
    for (name, client) in [("a", &client_a), ("b", &client_b), ("c", &client_c)] {
        let session = client.session(TTL).await.expect("open session");
        assert_eq!(session.grant().ttl_ms, TTL.as_millis() as u64);
        let path = format!("/s4/eph-{name}");
        let created = session
            .create(path.as_str(), name.as_bytes().to_vec())
            .ephemeral()
            .await
            .expect("ephemeral create");
        assert_eq!(created.stat.ephemeral_owner, Some(session.id()));
        // Record every status the session passes through.
        let mut rx = session.watch_status();
        let seen = Arc::new(Mutex::new(vec![*rx.borrow()]));
        let log = seen.clone();
        tokio::spawn(async move {
            while rx.changed().await.is_ok() {
                let s = *rx.borrow();
                log.lock().expect("lock").push(s);
                if s == SessionStatus::Expired {
                    return;
                }
            }
        });
        sessions.push((name, session, path, seen));
    }

    let killed_at = Instant::now();
    cluster.kill(old_leader);
    let survivors = cluster.running();
    let (new_leader, new_term) = cluster
        .agreed_leader(&survivors, Duration::from_secs(10))
        .await;
    let elected = killed_at.elapsed();
    assert!(new_term > old_term);
    // More than two TTLs pass with the client keeping the sessions alive.
    let live_until = killed_at + TTL * 5 / 2;
    tokio::time::sleep_until(live_until.into()).await;

    let on_new_leader = pinned_client(&cluster.addr(new_leader)).await;
    for (name, session, path, seen) in &sessions {
        let statuses = seen.lock().expect("lock").clone();
        let on = cluster.id_of(session.client().connected_to().as_deref());
        println!(
            "session {name}: statuses {statuses:?}; kept alive through node {on:?} \
             ({})",
            if on == Some(new_leader) {
                "the new leader"
            } else {
                "a follower"
            }
        );
        assert_ne!(
            session.status(),
            SessionStatus::Expired,
            "session {name} expired across the leader change; statuses {statuses:?}"
        );
        let got = on_new_leader
            .get(path.as_str())
            .await
            .unwrap_or_else(|e| panic!("ephemeral {path} on the new leader: {e}"));
        assert_eq!(got.stat.ephemeral_owner, Some(session.id()));
        // The server agrees that the session is live: a write under it applies.
        session
            .create(format!("/s4/touch-{name}"), Vec::new())
            .await
            .unwrap_or_else(|e| panic!("write under session {name} after the leader change: {e}"));
    }

    for (name, session, path, _) in &sessions {
        session
            .close()
            .await
            .unwrap_or_else(|e| panic!("close {name}: {e}"));
        assert_eq!(session.status(), SessionStatus::Expired);
        for &id in &survivors {
            let got = pinned_client(&cluster.addr(id))
                .await
                .get(path.as_str())
                .await;
            assert!(
                matches!(&got, Err(e) if e.is_no_node()),
                "{path} on node {id} after close: {got:?}"
            );
        }
    }
    println!(
        "session across a leader change: node {old_leader} killed, node {new_leader} elected after {:.0} ms; \
         test took {:.1} s",
        ms(elected),
        started.elapsed().as_secs_f64()
    );
}

/// Waits for the answers to `ids` on a raw connection; each within `within`.
async fn raw_answers(
    raw: &mut support::Raw,
    ids: &[u64],
    within: Duration,
) -> BTreeMap<u64, (u64, Result<Reply, WireError>)> {
    let mut answers = BTreeMap::new();
    let deadline = Instant::now() + within;
    while answers.len() < ids.len() {
        let left = deadline.saturating_duration_since(Instant::now());
        let frame = tokio::time::timeout(left, raw.recv())
            .await
            .unwrap_or_else(|_| panic!("no answer to {ids:?} within {within:?}; got {answers:?}"));
        match frame {
            Some(ServerMessage::Response {
                request_id,
                revision,
                result,
            }) if ids.contains(&request_id) => {
                answers.insert(request_id, (revision, result));
            }
            Some(_) => {}
            None => panic!("connection closed before answering {ids:?}; got {answers:?}"),
        }
    }
    answers
}

/// SIGSTOP of the leader: a fresh client writes through a new leader within a bounded time.
/// On SIGCONT the old leader steps down (it reports the new leader and term), a linearizable
/// read through it returns the latest data, and the requests it received while stopped are
/// answered with an error or with the applied result, never with stale state; a write among
/// them applies at most once.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn stopped_leader_is_replaced_and_steps_down_without_stale_answers() {
    let _serial = SERIAL.lock().await;
    let started = Instant::now();
    let cluster = Cluster::start(Settings::fast()).await;
    let (old_leader, old_term) = cluster.leader().await;
    let setup = Client::connect(cluster.endpoints_from(old_leader))
        .await
        .expect("connect");
    setup.create("/s5", Vec::new()).await.expect("create /s5");
    setup
        .create("/s5/latest", b"v1".to_vec())
        .await
        .expect("create /s5/latest");
    setup
        .create("/s5/counter", b"c0".to_vec())
        .await
        .expect("create /s5/counter");
    let mut raw = support::Raw::connect(cluster.addr(old_leader).parse().expect("addr")).await;

    let stopped_at = Instant::now();
    cluster.signal(old_leader, "STOP");
    // Requests that reach the stopped leader's socket: a write and a linearizable read.
    const WRITE_ID: u64 = 1_001;
    const READ_ID: u64 = 1_002;
    raw.send(ClientMessage::Request {
        request_id: WRITE_ID,
        request: Request::Write {
            session: None,
            op: WriteOp::Set(SetOp {
                path: "/s5/counter".into(),
                data: b"while stopped".to_vec(),
                expected_version: None,
            }),
        },
    })
    .await;
    raw.send(ClientMessage::Request {
        request_id: READ_ID,
        request: Request::Read {
            consistency: Consistency::Linearizable,
            op: ReadOp::Get {
                path: "/s5/latest".into(),
            },
        },
    })
    .await;

    // A new client (the stopped node listed last) gets a write through within a bound.
    let others: Vec<u64> = (1..=3).filter(|&i| i != old_leader).collect();
    let mut endpoints: Vec<String> = others.iter().map(|&i| cluster.addr(i)).collect();
    endpoints.push(cluster.addr(old_leader));
    let fresh =
        Client::with_config(ClientConfig::new(endpoints).request_timeout(Duration::from_secs(3)))
            .await
            .expect("connect a fresh client");
    let deadline = stopped_at + Duration::from_secs(10);
    let mut failures = Vec::new();
    let written = loop {
        match fresh.set("/s5/latest", b"v2".to_vec()).await {
            Ok(set) => break set,
            Err(e) => {
                assert!(tolerated_during_failover(&e), "write v2: {e}");
                failures.push(e.to_string());
                assert!(
                    Instant::now() < deadline,
                    "no write through a new leader within 10 s of SIGSTOP: {failures:?}"
                );
            }
        }
    };
    let moved_on = stopped_at.elapsed();
    let (new_leader, new_term) = cluster
        .agreed_leader(&others, Duration::from_secs(10))
        .await;
    assert!(new_term > old_term);

    let continued_at = Instant::now();
    cluster.signal(old_leader, "CONT");
    let answers = raw_answers(&mut raw, &[WRITE_ID, READ_ID], Duration::from_secs(10)).await;

    // The old leader steps down: it reports the new leader and term.
    let deadline = continued_at + Duration::from_secs(10);
    let stepped_down = loop {
        let status = cluster.status(old_leader).await;
        if let Some(s) = &status {
            if s.leader == Some(new_leader) && s.term == new_term {
                break continued_at.elapsed();
            }
        }
        assert!(
            Instant::now() < deadline,
            "node {old_leader} did not step down within 10 s of SIGCONT: {status:?}"
        );
        tokio::time::sleep(Duration::from_millis(10)).await;
    };
    let (leader, term) = cluster.leader().await;
    assert_eq!((leader, term), (new_leader, new_term));

    // A linearizable read through the old leader sees the latest write, and the next one.
    let through_old = pinned_client(&cluster.addr(old_leader)).await;
    let got = through_old
        .get("/s5/latest")
        .await
        .expect("read via old leader");
    assert_eq!(got.data, b"v2", "linearizable read through the old leader");
    assert!(got.revision >= written.revision);
    let v3 = fresh
        .set("/s5/latest", b"v3".to_vec())
        .await
        .expect("write v3");
    let got = through_old
        .get("/s5/latest")
        .await
        .expect("read via old leader");
    assert_eq!(got.data, b"v3", "read-after-write through the old leader");
    assert!(got.revision >= v3.revision);

    // What the stopped leader answered.
    let (read_revision, read_answer) = &answers[&READ_ID];
    match read_answer {
        Ok(Reply::Node { data, .. }) => assert_eq!(
            data, b"v2",
            "a linearizable read received while stopped and answered after SIGCONT \
             (revision {read_revision}) must not return stale data"
        ),
        Ok(other) => panic!("read answered {other:?}"),
        Err(e) => assert!(e.is_retryable(), "read answered with {e}"),
    }
    let (write_revision, write_answer) = &answers[&WRITE_ID];
    let mut counter = None;
    for id in 1..=3 {
        let got = pinned_client(&cluster.addr(id))
            .await
            .get("/s5/counter")
            .await
            .expect("read /s5/counter");
        if let Some(c) = &counter {
            assert_eq!(&got.data, c, "/s5/counter differs on node {id}");
        }
        counter = Some(got.data.clone());
        match write_answer {
            Ok(Reply::Write(WriteResult::Set { stat })) => {
                assert_eq!(stat.version, 1, "the write applied once");
                assert_eq!(stat.mod_rev, *write_revision);
                assert_eq!(
                    (got.data.as_slice(), got.stat.version, got.stat.mod_rev),
                    (&b"while stopped"[..], 1, *write_revision),
                    "the acknowledged write is there, once, on node {id}"
                );
            }
            Ok(other) => panic!("write answered {other:?}"),
            Err(WireError::Indeterminate(_)) => assert!(
                got.stat.version <= 1,
                "an indeterminate write applied at most once: {got:?}"
            ),
            Err(e) => {
                assert!(e.is_retryable(), "write answered with {e}");
                assert_eq!(
                    (got.data.as_slice(), got.stat.version),
                    (&b"c0"[..], 0),
                    "a write answered {e} did not apply (node {id})"
                );
            }
        }
    }
    println!(
        "SIGSTOP of leader {old_leader} (term {old_term}): a fresh client wrote after {:.0} ms \
         (failures before: {failures:?}); node {new_leader} leads term {new_term}; after SIGCONT \
         the old leader reported the new leader after {:.0} ms; while stopped it was sent a \
         write, answered {write_answer:?}, and a linearizable read, answered {read_answer:?}; \
         test took {:.1} s",
        ms(moved_on),
        ms(stepped_down),
        started.elapsed().as_secs_f64()
    );
}

/// A client connected to the leader when it is SIGSTOPped (its TCP connection stays up) moves
/// on to the new leader within a bounded time.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn client_of_a_stopped_leader_moves_on_to_the_new_leader() {
    let _serial = SERIAL.lock().await;
    let cluster = Cluster::start(Settings::fast()).await;
    let (old_leader, _) = cluster.leader().await;
    let client = Client::with_config(
        ClientConfig::new(cluster.endpoints_from(old_leader))
            .request_timeout(Duration::from_secs(2)),
    )
    .await
    .expect("connect");
    client.create("/s6", Vec::new()).await.expect("create /s6");
    assert_eq!(client.connected_to(), Some(cluster.addr(old_leader)));

    let stopped_at = Instant::now();
    cluster.signal(old_leader, "STOP");
    let deadline = stopped_at + Duration::from_secs(10);
    let mut failures = Vec::new();
    for i in 0u64.. {
        match client.create(format!("/s6/n{i}"), Vec::new()).await {
            Ok(_) => break,
            Err(e) => {
                assert!(tolerated_during_failover(&e), "write: {e}");
                failures.push(format!("{:.0} ms: {e}", ms(stopped_at.elapsed())));
                assert!(
                    Instant::now() < deadline,
                    "a client connected to the stopped leader did not get a write through \
                     within 10 s (still on {:?}): {failures:?}",
                    client.connected_to()
                );
            }
        }
    }
    println!(
        "client of a SIGSTOPped leader: wrote through {:?} after {:.0} ms; failures: {failures:?}",
        client.connected_to(),
        ms(stopped_at.elapsed())
    );
    cluster.signal(old_leader, "CONT");
}

fn median(v: &[f64]) -> f64 {
    let mut s = v.to_vec();
    s.sort_by(f64::total_cmp);
    let n = s.len();
    if n % 2 == 1 {
        s[n / 2]
    } else {
        (s[n / 2 - 1] + s[n / 2]) / 2.0
    }
}

/// With the shipped timings (tick 100 ms, 10 election ticks), ten rounds of: SIGKILL the
/// leader, time until a client write succeeds and until the survivors agree on a new leader,
/// then restart the killed node. Prints each figure and the medians.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
#[ignore = "measurement (about a minute): cargo test -p lockd-server --test cluster_process -- --ignored --nocapture election_time"]
async fn election_time_after_sigkill() {
    let _serial = SERIAL.lock().await;
    let mut cluster = Cluster::start(Settings::shipped()).await;
    let client = Client::connect(cluster.endpoints_from(1))
        .await
        .expect("connect");
    client.create("/e", Vec::new()).await.expect("create /e");
    let (mut write_ms, mut leader_ms, mut gap_ms) = (Vec::new(), Vec::new(), Vec::new());
    for round in 0..10 {
        let (leader, term) = cluster.leader().await;
        // Steady: the client writes, every node has applied it.
        let w = client
            .create(format!("/e/steady-{round}"), Vec::new())
            .await
            .expect("steady write");
        for id in 1..=3 {
            cluster
                .wait_applied(id, w.revision, Duration::from_secs(10))
                .await;
        }
        let killed_at = Instant::now();
        cluster.kill(leader);
        let survivors = cluster.running();
        let client_task = {
            let client = client.clone();
            tokio::spawn(async move {
                for i in 0u64.. {
                    if client
                        .create(format!("/e/r{round}-{i}"), Vec::new())
                        .await
                        .is_ok()
                    {
                        return killed_at.elapsed();
                    }
                    assert!(killed_at.elapsed() < Duration::from_secs(30));
                }
                unreachable!()
            })
        };
        let (new_leader, new_term) = cluster
            .agreed_leader(&survivors, Duration::from_secs(30))
            .await;
        let leader_after = killed_at.elapsed();
        let write_after = client_task.await.expect("client task");
        assert!(new_term > term && new_leader != leader);
        println!(
            "round {round}: killed leader {leader} (term {term}); new leader {new_leader} (term {new_term}) \
             reported by both survivors after {:.0} ms; first client write after {:.0} ms",
            ms(leader_after),
            ms(write_after)
        );
        leader_ms.push(ms(leader_after));
        write_ms.push(ms(write_after));
        gap_ms.push(ms(write_after.saturating_sub(leader_after)));
        cluster.restart(leader).await;
    }
    println!(
        "median over {} rounds: survivors agree on a new leader {:.0} ms, client write {:.0} ms \
         (write after leader known: {:.0} ms)",
        leader_ms.len(),
        median(&leader_ms),
        median(&write_ms),
        median(&gap_ms)
    );
    println!("leader: {leader_ms:.0?}");
    println!("write:  {write_ms:.0?}");
    println!("gap:    {gap_ms:.0?}");
}
