//! The replicated driver (`node::replicated`): three nodes in one process, each with its own
//! in-memory crash-test storage and its own peer transport on 127.0.0.1:0. A leader is
//! elected; writes on it apply on every node with the same state; a write on a follower gets
//! `NotLeader` naming the leader; when the leader stops, the other two elect a new one and go
//! on committing, and nothing acknowledged is lost. Every wait is bounded.

use std::collections::BTreeMap;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use lockd_protocol::{CreateOp, Error, ReadOp, Reply, SessionId, SessionSeq, WriteOp};
use lockd_server::fsm::Command;
use lockd_server::node::peer::{
    Backoff, Inbound, PeerConfig, PeerInfo, PeerTransport, SideMessage,
};
use lockd_server::node::replicated::{Outbox, ReplicatedConfig, ReplicatedNode};
use lockd_server::raft::Message;
use lockd_server::storage::backend::LossyBackend;
use lockd_server::storage::Storage;
use tokio::net::TcpListener;
use tokio::sync::mpsc;

const WAIT: Duration = Duration::from_secs(15);
const CLUSTER: u64 = 0x5EED;

struct Cluster {
    ids: Vec<u64>,
    nodes: BTreeMap<u64, ReplicatedNode>,
    /// Per node: whether its outgoing messages are delivered.
    links: BTreeMap<u64, Arc<AtomicBool>>,
    /// Per node: its transport (shared with its outbox) and its crash-test disk.
    transports: BTreeMap<u64, Arc<PeerTransport>>,
    backends: BTreeMap<u64, LossyBackend>,
    addrs: BTreeMap<u64, PeerInfo>,
}

/// An outbox that drops everything while its link is down (a one-way partition).
struct Gate {
    transport: Arc<PeerTransport>,
    up: Arc<AtomicBool>,
}

impl Outbox for Gate {
    fn send(&self, messages: Vec<Message>) {
        if self.up.load(Ordering::Acquire) {
            self.transport.send(messages);
        }
    }
    fn send_side(&self, to: u64, message: SideMessage) {
        if self.up.load(Ordering::Acquire) {
            self.transport.send_side(to, message);
        }
    }
}

async fn start_cluster(ids: &[u64]) -> Cluster {
    let _ = tracing_subscriber::fmt()
        .with_env_filter(tracing_subscriber::EnvFilter::from_default_env())
        .with_test_writer()
        .try_init();
    let mut listeners = BTreeMap::new();
    for &id in ids {
        let listener = TcpListener::bind("127.0.0.1:0").await.expect("bind");
        listeners.insert(id, listener);
    }
    let addrs: BTreeMap<u64, PeerInfo> = listeners
        .iter()
        .map(|(&id, l)| (id, PeerInfo::from(l.local_addr().expect("addr"))))
        .collect();
    let mut cluster = Cluster {
        ids: ids.to_vec(),
        nodes: BTreeMap::new(),
        links: BTreeMap::new(),
        transports: BTreeMap::new(),
        backends: BTreeMap::new(),
        addrs,
    };
    for (id, listener) in listeners {
        cluster.start_node(id, listener, LossyBackend::new());
    }
    cluster
}

impl Cluster {
    /// Starts node `id` on `listener` over `backend`, with the peers in `self.addrs`.
    fn start_node(&mut self, id: u64, listener: TcpListener, backend: LossyBackend) {
        let mut peer_config = PeerConfig::new(
            id,
            CLUSTER,
            1000 + id,
            self.addrs
                .iter()
                .filter(|(&p, _)| p != id)
                .map(|(&p, &i)| (p, i)),
        );
        peer_config.backoff = Backoff {
            initial: Duration::from_millis(5),
            max: Duration::from_millis(100),
        };
        let (tx, rx) = mpsc::channel::<Inbound>(4096);
        let transport =
            Arc::new(PeerTransport::start(peer_config, listener, tx).expect("transport"));
        let storage = Storage::with_backend(backend.clone(), 1000).expect("storage");
        let mut config = ReplicatedConfig::new(id, self.ids.iter().copied());
        config.tick = Duration::from_millis(10);
        config.raft.seed = 0xABCD_0000 + id;
        let up = Arc::new(AtomicBool::new(true));
        let gate = Gate {
            transport: transport.clone(),
            up: up.clone(),
        };
        let node = ReplicatedNode::start(config, storage, gate, rx).expect("start node");
        self.nodes.insert(id, node);
        self.links.insert(id, up);
        self.transports.insert(id, transport);
        self.backends.insert(id, backend);
    }

    /// Stops node `id` and its transport; returns its durable disk image (what survives a
    /// power loss at this moment).
    fn crash(&mut self, id: u64) -> Vec<u8> {
        let node = self.nodes.remove(&id).expect("node");
        node.stop().expect("stop");
        drop(self.transports.remove(&id));
        self.backends.remove(&id).expect("backend").crash_image()
    }

    /// Restarts node `id` from a disk image on a new port, and tells the others.
    async fn restart(&mut self, id: u64, image: Vec<u8>) {
        let listener = TcpListener::bind("127.0.0.1:0").await.expect("bind");
        self.addrs
            .insert(id, PeerInfo::from(listener.local_addr().expect("addr")));
        for (&other, transport) in &self.transports {
            let peers = self
                .addrs
                .iter()
                .filter(|(&p, _)| p != other)
                .map(|(&p, &i)| (p, i))
                .collect();
            transport.set_peers(peers);
        }
        self.start_node(id, listener, LossyBackend::from_image(image));
    }

    /// Waits until every running node agrees on one leader, newer than `after_term`.
    async fn leader(&self, after_term: u64) -> u64 {
        let deadline = Instant::now() + WAIT;
        loop {
            let statuses: Vec<_> = self.nodes.values().map(|n| n.status()).collect();
            if let Some(l) = statuses.iter().find(|s| s.is_leader && s.term > after_term) {
                if statuses
                    .iter()
                    .all(|s| s.leader == l.leader && s.term == l.term)
                {
                    return l.leader;
                }
            }
            assert!(Instant::now() < deadline, "no agreed leader: {statuses:?}");
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
    }

    /// Waits until every running node has applied at least `index`.
    async fn applied_all(&self, index: u64) {
        let deadline = Instant::now() + WAIT;
        while self.nodes.values().any(|n| n.status().applied < index) {
            let statuses: Vec<_> = self.nodes.values().map(|n| n.status()).collect();
            assert!(
                Instant::now() < deadline,
                "not applied {index}: {statuses:?}"
            );
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
    }

    fn stop_all(&mut self) {
        for (_, node) in std::mem::take(&mut self.nodes) {
            node.stop().expect("stop");
        }
        self.transports.clear();
    }

    fn node(&self, id: u64) -> &ReplicatedNode {
        self.nodes.get(&id).expect("node")
    }
}

fn open_session() -> Command {
    Command::OpenSession {
        ttl_ms: 60_000,
        tick_ms: 10,
        drift_ppm: 1000,
        implicit: false,
    }
}

fn create(session: SessionId, seq: u64, path: &str) -> Command {
    Command::Write {
        session: SessionSeq {
            session,
            seq,
            floor: seq,
        },
        op: WriteOp::Create(CreateOp {
            path: path.into(),
            data: path.as_bytes().to_vec(),
            ephemeral: false,
            sequential: false,
        }),
        fence: None,
    }
}

fn get(path: &str) -> ReadOp {
    ReadOp::Get { path: path.into() }
}

/// Opens a session on the leader; returns it with the revision it was applied at.
async fn session_on(node: &ReplicatedNode) -> (SessionId, u64) {
    let applied = node.propose(open_session()).await.expect("open session");
    let grant = applied.opened_session.expect("grant");
    (grant.session, applied.revision)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn three_nodes_replicate_and_survive_the_leader() {
    let mut cluster = start_cluster(&[1, 2, 3]).await;
    let leader = cluster.leader(0).await;
    let first_term = cluster.node(leader).status().term;

    // Writes on the leader apply everywhere.
    let (session, _) = session_on(cluster.node(leader)).await;
    let mut acknowledged = Vec::new();
    let mut last_rev = 0;
    for seq in 1..=20u64 {
        let path = format!("/a{seq}");
        let applied = cluster
            .node(leader)
            .propose(create(session, seq, &path))
            .await
            .expect("write on the leader");
        assert!(applied.result.is_ok(), "{:?}", applied.result);
        last_rev = applied.revision;
        acknowledged.push(path);
    }
    cluster.applied_all(last_rev).await;

    // A follower refuses writes and names the leader.
    let follower = *cluster
        .nodes
        .keys()
        .find(|&&id| id != leader)
        .expect("follower");
    let refused = cluster
        .node(follower)
        .propose(create(session, 100, "/never"))
        .await;
    match refused {
        Err(Error::NotLeader { leader_hint }) => assert_eq!(leader_hint, Some(leader)),
        other => panic!("expected NotLeader, got {other:?}"),
    }

    // Same state on every node; linearizable reads on a follower see every acknowledged write.
    for path in &acknowledged {
        let mut seen = Vec::new();
        for node in cluster.nodes.values() {
            let (_, reply) = node.read_applied(&get(path));
            seen.push(reply.expect("read"));
        }
        assert!(seen.windows(2).all(|w| w[0] == w[1]), "{path}: {seen:?}");
        assert!(matches!(&seen[0], Reply::Node { data, .. } if data == path.as_bytes()));
    }
    let (rev, reply) = cluster.node(follower).read(&get("/a20")).await;
    assert!(rev >= last_rev, "linearizable read at {rev} < {last_rev}");
    assert!(reply.is_ok(), "{reply:?}");
    assert!(cluster
        .node(follower)
        .read_applied(&get("/never"))
        .1
        .is_err());

    // Stop the leader: the other two elect a new one and keep committing.
    let old = cluster.nodes.remove(&leader).expect("leader");
    old.stop().expect("stop the leader");
    drop(cluster.transports.remove(&leader));
    let new_leader = cluster.leader(first_term).await;
    assert_ne!(new_leader, leader);
    let (session2, _) = {
        let deadline = Instant::now() + WAIT;
        loop {
            match cluster.node(new_leader).propose(open_session()).await {
                Ok(applied) => {
                    let grant = applied.opened_session.expect("grant");
                    break (grant.session, applied.revision);
                }
                Err(e) => {
                    assert!(Instant::now() < deadline, "no commit after failover: {e}");
                    tokio::time::sleep(Duration::from_millis(20)).await;
                }
            }
        }
    };
    for seq in 1..=10u64 {
        let path = format!("/b{seq}");
        let applied = cluster
            .node(new_leader)
            .propose(create(session2, seq, &path))
            .await
            .expect("write on the new leader");
        assert!(applied.result.is_ok(), "{:?}", applied.result);
        last_rev = applied.revision;
        acknowledged.push(path);
    }
    cluster.applied_all(last_rev).await;
    for node in cluster.nodes.values() {
        for path in &acknowledged {
            let (_, reply) = node.read_applied(&get(path));
            assert!(
                matches!(&reply, Ok(Reply::Node { data, .. }) if data == path.as_bytes()),
                "node {} lost {path}: {reply:?}",
                node.id()
            );
        }
        assert_eq!(
            node.status().applied,
            cluster.node(new_leader).status().applied
        );
    }
    // The stopped leader's state holds every write acknowledged while it led.
    for path in acknowledged.iter().filter(|p| p.starts_with("/a")) {
        assert!(
            old.read_applied(&get(path)).1.is_ok(),
            "old leader lacks {path}"
        );
    }
    cluster.stop_all();
}

/// A leader cut off from its followers accepts a proposal that can never commit; the others
/// elect a new leader whose entries take that index. The proposer gets an error, never
/// another entry's outcome, and the write exists nowhere.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn an_overwritten_proposal_gets_an_error() {
    let mut cluster = start_cluster(&[1, 2, 3]).await;
    let leader = cluster.leader(0).await;
    let first_term = cluster.node(leader).status().term;
    let (session, rev) = session_on(cluster.node(leader)).await;
    cluster.applied_all(rev).await;

    // Cut the leader's outgoing messages and propose on it.
    cluster.links[&leader].store(false, Ordering::Release);
    let old = cluster.nodes.remove(&leader).expect("leader");
    let doomed = {
        let command = create(session, 1, "/lost");
        async move {
            let outcome = old.propose(command).await;
            (old, outcome)
        }
    };
    let doomed = tokio::spawn(doomed);

    // The other two elect a new leader and commit over the doomed index.
    let new_leader = cluster.leader(first_term).await;
    assert_ne!(new_leader, leader);
    let (session2, _) = session_on(cluster.node(new_leader)).await;
    let mut last_rev = 0;
    for seq in 1..=5u64 {
        let applied = cluster
            .node(new_leader)
            .propose(create(session2, seq, &format!("/c{seq}")))
            .await
            .expect("write on the new leader");
        last_rev = applied.revision;
    }

    // Heal: the old leader (which already hears the new one) replaces its entry, learns that
    // the new entry at that index committed, and answers the proposal with an error.
    // Still unanswered: it was appended on the old leader (not refused at once), and its
    // index is not known committed there while its answers are cut.
    assert!(
        !doomed.is_finished(),
        "the doomed proposal was answered early"
    );
    cluster.links[&leader].store(true, Ordering::Release);
    let (old, outcome) = tokio::time::timeout(WAIT, doomed)
        .await
        .expect("the doomed proposal is answered")
        .expect("task");
    assert!(
        matches!(outcome, Err(Error::NotLeader { .. })),
        "expected an error, got {outcome:?}"
    );
    cluster.nodes.insert(leader, old);
    cluster.applied_all(last_rev).await;
    for node in cluster.nodes.values() {
        assert!(
            node.read_applied(&get("/lost")).1.is_err(),
            "node {}",
            node.id()
        );
        assert!(
            node.read_applied(&get("/c5")).1.is_ok(),
            "node {}",
            node.id()
        );
    }
    cluster.stop_all();
}

/// The leader crashes losing whatever it had not fsynced, restarts from its durable image on
/// a new port, rejoins as a follower and catches up; every acknowledged write is on all three.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_crashed_leader_restarts_from_its_durable_state_and_catches_up() {
    let mut cluster = start_cluster(&[1, 2, 3]).await;
    let leader = cluster.leader(0).await;
    let first_term = cluster.node(leader).status().term;
    let (session, _) = session_on(cluster.node(leader)).await;
    let mut acknowledged = Vec::new();
    for seq in 1..=10u64 {
        let path = format!("/d{seq}");
        cluster
            .node(leader)
            .propose(create(session, seq, &path))
            .await
            .expect("write");
        acknowledged.push(path);
    }
    let image = cluster.crash(leader);

    let new_leader = cluster.leader(first_term).await;
    let (session2, _) = session_on(cluster.node(new_leader)).await;
    for seq in 1..=10u64 {
        let path = format!("/e{seq}");
        cluster
            .node(new_leader)
            .propose(create(session2, seq, &path))
            .await
            .expect("write");
        acknowledged.push(path);
    }
    cluster.restart(leader, image).await;
    // Bounded retries: the restarted node may disturb nothing (pre-vote), but a leader
    // change while it rejoins is allowed.
    let deadline = Instant::now() + WAIT;
    let mut seq = 11;
    let last_rev = loop {
        let leader_now = cluster.leader(0).await;
        match cluster
            .node(leader_now)
            .propose(create(session2, seq, "/after-restart"))
            .await
        {
            Ok(applied) => break applied.revision,
            Err(e) => {
                assert!(Instant::now() < deadline, "no commit after restart: {e}");
                seq += 1;
                tokio::time::sleep(Duration::from_millis(20)).await;
            }
        }
    };
    acknowledged.push("/after-restart".into());
    cluster.applied_all(last_rev).await;
    let applied: Vec<u64> = cluster.nodes.values().map(|n| n.status().applied).collect();
    for node in cluster.nodes.values() {
        for path in &acknowledged {
            let (_, reply) = node.read_applied(&get(path));
            assert!(
                matches!(&reply, Ok(Reply::Node { data, .. }) if data == path.as_bytes()),
                "node {} lacks {path}: {reply:?} (applied {applied:?})",
                node.id()
            );
        }
    }
    cluster.stop_all();
}
