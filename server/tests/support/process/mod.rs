//! The harness of the tests with real `lockd` processes on loopback (`cluster_process.rs`,
//! `cluster_sigstop_process.rs`, `membership_process.rs`, `membership_removal_process.rs`): a
//! cluster of nodes started from the `lockd` binary, and clients pinned to one node. [`load`]
//! adds write load with a record of every write; [`membership`] holds what the membership
//! tests share.
//!
//! Multi-process tests run one at a time (DESIGN §3a.15): every test takes [`SERIAL`] first.
//! Ports are picked free (a start that finds one taken starts again on others). Each node's
//! stderr goes to `node-N.log` in the cluster's temp dir; when a test fails, the tail of every
//! log is printed and the temp dir is kept. Dropping the cluster kills every child. Every wait
//! polls a condition with a deadline.

pub mod load;
pub mod membership;

use std::collections::BTreeMap;
use std::fs::OpenOptions;
use std::io::Write as _;
use std::net::TcpListener;
use std::path::PathBuf;
use std::process::{Child, Command, ExitStatus, Stdio};
use std::time::{Duration, Instant};

use futures_util::StreamExt;
use lockd_client::{Client, ClientConfig, Error as ClientError};
use lockd_protocol::{ClusterStatus, Error as WireError};

/// Tests with real processes run one at a time (DESIGN §3a.15).
pub static SERIAL: tokio::sync::Mutex<()> = tokio::sync::Mutex::const_new(());

/// Lines of each node's log printed when a test fails.
const LOG_TAIL: usize = 60;

/// How the nodes are started: extra flags, keys for a `--config` TOML file, `RUST_LOG`; and
/// the name of the test file's clusters.
#[derive(Clone, Debug)]
pub struct Settings {
    /// Names the cluster's temp dir (`lockd-NAME-…`) and its token (`NAME-process-…`).
    name: &'static str,
    flags: Vec<String>,
    toml: String,
    /// `RUST_LOG` of the nodes.
    rust_log: String,
}

impl Settings {
    /// Test timings: ticks of `tick_ms`, an election timeout of 10-20 ticks, session TTLs
    /// from `session_ttl_min_ms`, no spinning. Logs at info.
    pub fn fast(name: &'static str, tick_ms: u64, session_ttl_min_ms: u64) -> Settings {
        let flags = [
            "--tick-ms".to_string(),
            tick_ms.to_string(),
            "--election-ticks".to_string(),
            "10".to_string(),
            "--session-ttl-min-ms".to_string(),
            session_ttl_min_ms.to_string(),
            "--spin-us".to_string(),
            "0".to_string(),
        ];
        Settings {
            flags: Vec::from(flags),
            ..Settings::shipped(name)
        }
    }

    /// The shipped defaults (tick 100 ms, 10 election ticks). Logs at info.
    pub fn shipped(name: &'static str) -> Settings {
        Settings {
            name,
            flags: Vec::new(),
            toml: String::new(),
            rust_log: "info".to_string(),
        }
    }

    /// Keeps only `n` log entries below the applied index (compaction forces snapshots).
    pub fn log_retain(mut self, n: u64) -> Settings {
        self.toml.push_str(&format!("log_retain = {n}\n"));
        self
    }

    /// The nodes' `RUST_LOG`.
    pub fn rust_log(mut self, filter: &str) -> Settings {
        self.rust_log = filter.to_string();
        self
    }

    /// Also logs the core's snapshot transfers ("sending snapshot", "installing snapshot").
    pub fn log_snapshots(mut self) -> Settings {
        self.rust_log
            .push_str(",lockd_server::raft::replication=debug,lockd_server::raft::follower=debug");
        self
    }
}

/// The timings of the three-node tests (`cluster_process.rs`, `cluster_sigstop_process.rs`):
/// 10 ms ticks, election timeout 100-200 ms, short TTLs allowed (from 50 ms), no spinning.
pub fn cluster_fast() -> Settings {
    Settings::fast("cluster", 10, 50)
}

/// How a node is started.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum How {
    /// A member of the initial cluster: `--peers` of the initial members.
    Bootstrap,
    /// A new member after `cluster add`: `--join --peers` of these members (and itself).
    Join(Vec<u64>),
}

#[derive(Debug)]
pub struct Member {
    pub id: u64,
    pub client_addr: String,
    pub peer_addr: String,
    pub data_dir: PathBuf,
    pub log: PathBuf,
    child: Option<Child>,
    starts: u32,
}

/// Slots for `lockd` processes (ports reserved for each), some started as the initial
/// cluster; kills them all when dropped.
#[derive(Debug)]
pub struct Cluster {
    dir: Option<tempfile::TempDir>,
    token: String,
    cluster_id: u64,
    /// The members of the initial cluster (`--peers` of a bootstrapping node).
    initial: Vec<u64>,
    config_file: PathBuf,
    settings: Settings,
    members: BTreeMap<u64, Member>,
}

/// Why starting a node failed.
#[derive(Debug)]
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

/// The last `lines` lines of a node's log, without the core's debug lines that print the
/// whole configuration in force (the membership tests log them only to find `Identify`
/// entries).
fn tail(path: &std::path::Path, lines: usize) -> String {
    let text = std::fs::read_to_string(path).unwrap_or_else(|e| format!("(no log: {e})"));
    let all: Vec<&str> = text
        .lines()
        .filter(|l| !(l.contains(" DEBUG ") && l.contains("configuration in force")))
        .collect();
    all[all.len().saturating_sub(lines)..].join("\n")
}

impl Cluster {
    /// Starts nodes `1..=initial` as the initial cluster, with slots (ports, data dirs) for
    /// nodes up to `slots`, and waits until each serves clients (not yet for a leader).
    pub async fn start(initial: u64, slots: u64, settings: Settings) -> Cluster {
        for attempt in 1..=5 {
            let mut cluster = Cluster::spawn(initial, slots, settings.clone());
            let mut result = Ok(());
            for id in 1..=initial {
                result = cluster.wait_serving(id, Duration::from_secs(20)).await;
                if result.is_err() {
                    break;
                }
            }
            match result {
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

    fn spawn(initial: u64, slots: u64, settings: Settings) -> Cluster {
        let dir = tempfile::Builder::new()
            .prefix(&format!("lockd-{}-", settings.name))
            .tempdir()
            .expect("temp dir");
        let ports = free_ports(2 * slots as usize);
        let nanos = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map(|d| d.as_nanos())
            .unwrap_or(0);
        // A token of its own: a stray process on a reused port cannot pass for a member.
        let token = format!("{}-process-{}-{nanos}", settings.name, std::process::id());
        let cluster_id = lockd_server::Config {
            cluster_token: token.clone(),
            ..lockd_server::Config::default()
        }
        .cluster_id();
        let members = (1..=slots)
            .map(|id| {
                let i = (id - 1) as usize;
                let member = Member {
                    id,
                    client_addr: format!("127.0.0.1:{}", ports[i]),
                    peer_addr: format!("127.0.0.1:{}", ports[slots as usize + i]),
                    data_dir: dir.path().join(format!("data-{id}")),
                    log: dir.path().join(format!("node-{id}.log")),
                    child: None,
                    starts: 0,
                };
                (id, member)
            })
            .collect();
        let config_file = dir.path().join("lockd.toml");
        std::fs::write(&config_file, &settings.toml).expect("write config");
        let mut cluster = Cluster {
            dir: Some(dir),
            token,
            cluster_id,
            initial: (1..=initial).collect(),
            config_file,
            settings,
            members,
        };
        for id in 1..=initial {
            cluster.spawn_member(id, How::Bootstrap);
        }
        cluster
    }

    pub fn member(&self, id: u64) -> &Member {
        &self.members[&id]
    }

    fn member_mut(&mut self, id: u64) -> &mut Member {
        self.members.get_mut(&id).expect("a slot for this id")
    }

    pub fn addr(&self, id: u64) -> String {
        self.member(id).client_addr.clone()
    }

    pub fn peer_addr(&self, id: u64) -> String {
        self.member(id).peer_addr.clone()
    }

    /// Client addresses of `ids`, in that order.
    pub fn endpoints(&self, ids: &[u64]) -> Vec<String> {
        ids.iter().map(|&i| self.addr(i)).collect()
    }

    /// Client addresses of every slot, `first` first.
    pub fn endpoints_from(&self, first: u64) -> Vec<String> {
        let mut ids: Vec<u64> = vec![first];
        ids.extend(self.members.keys().copied().filter(|&i| i != first));
        self.endpoints(&ids)
    }

    /// The node whose client address is `addr`.
    pub fn id_of(&self, addr: Option<&str>) -> Option<u64> {
        self.members
            .values()
            .find(|m| Some(m.client_addr.as_str()) == addr)
            .map(|m| m.id)
    }

    pub fn running(&self) -> Vec<u64> {
        self.members
            .values()
            .filter(|m| m.child.is_some())
            .map(|m| m.id)
            .collect()
    }

    /// `ID=PEER_ADDR,...` of `ids`.
    fn peers_flag(&self, ids: &[u64]) -> String {
        ids.iter()
            .map(|&i| format!("{i}={}", self.peer_addr(i)))
            .collect::<Vec<_>>()
            .join(",")
    }

    /// Starts node `id`'s process (it must not be running); does not wait.
    pub fn spawn_member(&mut self, id: u64, how: How) {
        let mut args: Vec<String> = Vec::new();
        match &how {
            How::Bootstrap => {
                args.extend(["--peers".to_string(), self.peers_flag(&self.initial)]);
            }
            How::Join(members) => {
                let mut ids: Vec<u64> = members.clone();
                if !ids.contains(&id) {
                    ids.push(id);
                }
                args.extend([
                    "--join".to_string(),
                    "--peers".to_string(),
                    self.peers_flag(&ids),
                ]);
            }
        }
        args.extend(["--cluster-token".to_string(), self.token.clone()]);
        args.extend([
            "--config".to_string(),
            self.config_file.display().to_string(),
        ]);
        args.extend(self.settings.flags.iter().cloned());
        let rust_log = self.settings.rust_log.clone();
        let m = self.member_mut(id);
        assert!(m.child.is_none(), "node {id} is already running");
        m.starts += 1;
        std::fs::create_dir_all(&m.data_dir).expect("create data dir");
        let mut log = OpenOptions::new()
            .create(true)
            .append(true)
            .open(&m.log)
            .expect("open node log");
        writeln!(
            log,
            "===== test harness: start #{} of node {id} ({how:?}): lockd --id {id} --data-dir {} \
             --client-addr {} --peer-addr {} {} =====",
            m.starts,
            m.data_dir.display(),
            m.client_addr,
            m.peer_addr,
            args.join(" ")
        )
        .expect("write log");
        let child = Command::new(env!("CARGO_BIN_EXE_lockd"))
            .arg("--id")
            .arg(id.to_string())
            .arg("--data-dir")
            .arg(&m.data_dir)
            .args(["--client-addr", &m.client_addr])
            .args(["--peer-addr", &m.peer_addr])
            .args(&args)
            .env("RUST_LOG", &rust_log)
            .env("NO_COLOR", "1")
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::from(log))
            .spawn()
            .expect("spawn lockd");
        m.child = Some(child);
    }

    /// Starts node `id` and waits until it serves clients.
    pub async fn start_member(&mut self, id: u64, how: How) {
        self.spawn_member(id, how);
        match self.wait_serving(id, Duration::from_secs(20)).await {
            Ok(()) => {}
            Err(StartError::PortTaken) => panic!("node {id}: a port of its slot was taken"),
            Err(StartError::Other(why)) => panic!("node {id} did not start: {why}"),
        }
    }

    /// Restarts a stopped member of the initial cluster on its data dir and ports, and waits
    /// until it serves.
    pub async fn restart(&mut self, id: u64) {
        self.start_member(id, How::Bootstrap).await;
    }

    fn pid(&self, id: u64) -> u32 {
        self.member(id).child.as_ref().expect("running").id()
    }

    /// SIGKILL; returns once the process is gone.
    pub fn kill(&mut self, id: u64) {
        let m = self.member_mut(id);
        let mut child = m.child.take().expect("node is running");
        child.kill().expect("SIGKILL");
        child.wait().expect("reap");
    }

    /// Sends `signal` (`STOP`, `CONT`, `TERM`...) to node `id`.
    pub fn signal(&self, id: u64, signal: &str) {
        let status = Command::new("kill")
            .arg(format!("-{signal}"))
            .arg(self.pid(id).to_string())
            .status()
            .expect("run kill");
        assert!(status.success(), "kill -{signal} node {id} failed");
    }

    fn kill_all(&mut self) {
        for m in self.members.values_mut() {
            if let Some(mut child) = m.child.take() {
                let _ = child.kill();
                let _ = child.wait();
            }
        }
    }

    /// Deletes node `id`'s data directory (the node must be stopped).
    pub fn wipe(&mut self, id: u64) {
        let m = self.member(id);
        assert!(m.child.is_none(), "wipe of a running node {id}");
        std::fs::remove_dir_all(&m.data_dir).expect("wipe data dir");
    }

    /// Waits until node `id`'s process exits; returns its exit status.
    pub async fn wait_exit(&mut self, id: u64, within: Duration) -> Option<ExitStatus> {
        let deadline = Instant::now() + within;
        loop {
            let m = self.member_mut(id);
            let status = m.child.as_mut().expect("running").try_wait().expect("wait");
            if let Some(status) = status {
                m.child = None;
                return Some(status);
            }
            if Instant::now() >= deadline {
                return None;
            }
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
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
                let log = self.log_text(id);
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
    pub async fn status(&self, id: u64) -> Option<ClusterStatus> {
        let addr = self.addr(id);
        let client = pinned(&addr, Duration::from_secs(1)).await.ok()?;
        let status = client.cluster_status().await.ok()?.status;
        let same_node = client.connected_to().as_deref() == Some(addr.as_str());
        (same_node && status.node_id == id && status.cluster_id == self.cluster_id)
            .then_some(status)
    }

    /// Statuses of the running nodes that answer.
    pub async fn statuses(&self) -> BTreeMap<u64, ClusterStatus> {
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
    pub async fn agreed_leader(&self, among: &[u64], within: Duration) -> (u64, u64) {
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

    /// The leader of all running nodes (they agree within 15 s).
    pub async fn leader(&self) -> (u64, u64) {
        self.agreed_leader(&self.running(), Duration::from_secs(15))
            .await
    }

    /// Waits until node `id` has applied at least `index`; returns its status.
    pub async fn wait_applied(&self, id: u64, index: u64, within: Duration) -> ClusterStatus {
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

    /// Node `id`'s log (stderr of all its starts).
    pub fn log_text(&self, id: u64) -> String {
        std::fs::read_to_string(&self.member(id).log).unwrap_or_default()
    }
}

impl Drop for Cluster {
    fn drop(&mut self) {
        self.kill_all();
        if std::thread::panicking() {
            for m in self.members.values().filter(|m| m.starts > 0) {
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
pub async fn pinned(addr: &str, timeout: Duration) -> Result<Client, ClientError> {
    Client::with_config(
        ClientConfig::new([addr])
            .max_attempts(1)
            .request_timeout(timeout)
            .connect_timeout(timeout),
    )
    .await
}

/// A client pinned to `addr`, connected to it.
pub async fn pinned_client(addr: &str) -> Client {
    let client = pinned(addr, Duration::from_secs(5))
        .await
        .unwrap_or_else(|e| panic!("connect to {addr}: {e}"));
    assert_eq!(client.connected_to().as_deref(), Some(addr));
    client
}

/// How [`assert_all_present`] reads.
#[derive(Clone, Copy, Debug)]
pub struct Reads {
    /// Stale reads (a node that is catching up serves them), else linearizable ones.
    pub stale: bool,
    /// Reads in flight at a time.
    pub in_flight: usize,
}

/// Reads every `(path, data)` from node `addr` and checks the data.
pub async fn assert_all_present(
    addr: &str,
    expected: &[(String, Vec<u8>)],
    reads: Reads,
    what: &str,
) {
    let client = pinned_client(addr).await;
    let client = &client;
    let failures: Vec<String> = futures_util::stream::iter(expected.iter())
        .map(|(path, data)| async move {
            let got = if reads.stale {
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
        .buffer_unordered(reads.in_flight)
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
        if reads.stale { "stale" } else { "linearizable" },
        &failures[..failures.len().min(10)]
    );
}

pub fn ms(d: Duration) -> f64 {
    d.as_secs_f64() * 1000.0
}

/// An error that may come back from a write while a leader is lost or leadership moves: its
/// outcome is unknown or it surely did not apply. Anything else (e.g. `NodeExists` for a fresh
/// path) is a bug.
pub fn tolerated_during_failover(e: &ClientError) -> bool {
    e.is_indeterminate()
        || matches!(
            e,
            ClientError::ConnectionLost { .. } | ClientError::ConnectFailed { .. }
        )
        || e.wire().is_some_and(WireError::is_retryable)
}
