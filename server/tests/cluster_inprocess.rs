//! Three `lockd` nodes in one process (each a full `run` over its own temp dir, client port
//! and peer port on loopback), spoken to over raw client connections: what only a cluster
//! shows. A follower answers writes `NotLeader` naming the leader and gives members' client
//! addresses in `HelloOk`; a linearizable read on a follower sees a write acknowledged just
//! before (ReadIndex, §6.4); keepalives sent only to a follower keep a session alive through
//! the leader (batched forwarding, DESIGN §3a.4), and once they stop the session expires.
//! Every wait is bounded.

mod support;

use std::collections::BTreeMap;
use std::time::{Duration, Instant};

use lockd_protocol::{Consistency, Error, KeepAliveResult, ReadOp, Reply, Request, SessionSeq};
use lockd_server::Config;
use support::{create_op, eventually, Raw, TestServer};

const WAIT: Duration = Duration::from_secs(20);

struct Cluster {
    servers: BTreeMap<u64, TestServer>,
    _dirs: Vec<tempfile::TempDir>,
}

/// Ports picked by binding port 0 and letting go (the nodes bind them right after).
fn free_ports(n: usize) -> Vec<u16> {
    let listeners: Vec<std::net::TcpListener> = (0..n)
        .map(|_| std::net::TcpListener::bind("127.0.0.1:0").expect("bind"))
        .collect();
    listeners
        .iter()
        .map(|l| l.local_addr().expect("addr").port())
        .collect()
}

/// Starts three nodes and waits until they agree on a leader. A node whose peer port was
/// taken in the meantime (ports picked by `free_ports` are free only until somebody else,
/// e.g. another node's outgoing connection, takes them) stops at once: then everything starts
/// again on other ports.
async fn start_cluster() -> Cluster {
    for attempt in 1..=5 {
        let cluster = start_cluster_on(&free_ports(3)).await;
        match cluster.agreed_leader().await {
            Ok(_) => return cluster,
            Err(why) => {
                eprintln!("cluster start, attempt {attempt}: {why}; again on other ports");
                for (_, server) in cluster.servers {
                    let _ = server.stop().await;
                }
            }
        }
    }
    panic!("the cluster did not start in five attempts");
}

async fn start_cluster_on(ports: &[u16]) -> Cluster {
    let peers = (1..=3u64)
        .map(|id| format!("{id}=127.0.0.1:{}", ports[id as usize - 1]))
        .collect::<Vec<_>>()
        .join(",");
    let mut servers = BTreeMap::new();
    let mut dirs = Vec::new();
    for id in 1..=3u64 {
        let dir = tempfile::tempdir().expect("tempdir");
        let config = Config {
            id,
            peers: peers.clone(),
            peer_addr: format!("127.0.0.1:{}", ports[id as usize - 1]),
            election_ticks: 10,
            session_ttl_min_ms: 100,
            ..Config::for_tests(dir.path().join("data"))
        };
        servers.insert(id, TestServer::start_with(config).await);
        dirs.push(dir);
    }
    Cluster {
        servers,
        _dirs: dirs,
    }
}

impl Cluster {
    /// Waits until every node names the same leader; returns it.
    async fn leader(&self) -> u64 {
        self.agreed_leader()
            .await
            .unwrap_or_else(|why| panic!("{why}"))
    }

    /// Waits until every node names the same leader; an error if a node stopped or they do
    /// not agree in time.
    async fn agreed_leader(&self) -> Result<u64, String> {
        let deadline = Instant::now() + WAIT;
        loop {
            let mut leaders = Vec::new();
            for (id, server) in &self.servers {
                if !server.is_running() {
                    return Err(format!("node {id} stopped"));
                }
                let mut raw = Raw::connect(server.addr).await;
                if let (_, Ok(Reply::ClusterStatus(s))) = raw.request(Request::ClusterStatus).await
                {
                    leaders.push(s.leader);
                }
            }
            if leaders.len() == self.servers.len() && leaders.iter().all(|l| *l == leaders[0]) {
                if let Some(leader) = leaders[0] {
                    return Ok(leader);
                }
            }
            if Instant::now() >= deadline {
                return Err(format!("no agreed leader: {leaders:?}"));
            }
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }

    async fn raw(&self, id: u64) -> Raw {
        Raw::connect(self.servers[&id].addr).await
    }

    async fn stop(self) {
        for (_, server) in self.servers {
            server.stop().await.expect("clean stop");
        }
    }
}

fn get(path: &str, consistency: Consistency) -> Request {
    Request::Read {
        consistency,
        op: ReadOp::Get { path: path.into() },
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_follower_redirects_writes_to_the_leader_it_names() {
    let cluster = start_cluster().await;
    let leader = cluster.leader().await;
    let follower = (1..=3).find(|&id| id != leader).expect("a follower");
    let mut raw = cluster.raw(follower).await;
    match raw.write(create_op("/f", b"x", false)).await {
        Err(Error::NotLeader { leader_hint }) => assert_eq!(leader_hint, Some(leader)),
        other => panic!("a follower took a write: {other:?}"),
    }
    // The members' client addresses, learned over the peer handshakes, reach clients.
    let leader_addr = cluster.servers[&leader].addr.to_string();
    let learned = eventually(WAIT, || async {
        let mut raw = cluster.raw(follower).await;
        match raw.request(Request::ClusterStatus).await.1 {
            Ok(Reply::ClusterStatus(s)) => s
                .members
                .iter()
                .any(|m| m.id == leader && m.client_addr == leader_addr),
            _ => false,
        }
    })
    .await;
    assert!(
        learned,
        "the follower never listed the leader's client address"
    );
    let mut on_leader = cluster.raw(leader).await;
    on_leader
        .write(create_op("/f", b"x", false))
        .await
        .expect("the leader takes the write");
    cluster.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_linearizable_read_on_a_follower_sees_the_write_just_acknowledged() {
    let cluster = start_cluster().await;
    let leader = cluster.leader().await;
    let mut on_leader = cluster.raw(leader).await;
    let mut followers = Vec::new();
    for id in (1..=3).filter(|&id| id != leader) {
        followers.push(cluster.raw(id).await);
    }
    on_leader.create("/x", b"v").await.expect("create /x");
    for i in 0..30 {
        let data = format!("v{i}");
        on_leader.set("/x", data.as_bytes()).await.expect("set");
        for follower in &mut followers {
            let (_, reply) = follower.request(get("/x", Consistency::Linearizable)).await;
            match reply {
                Ok(Reply::Node { data: got, .. }) => {
                    assert_eq!(
                        got,
                        data.as_bytes(),
                        "a follower's linearizable read was stale"
                    )
                }
                other => panic!("read on a follower: {other:?}"),
            }
        }
    }
    cluster.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn keepalives_sent_only_to_a_follower_keep_the_session_alive() {
    let cluster = start_cluster().await;
    let leader = cluster.leader().await;
    let follower = (1..=3).find(|&id| id != leader).expect("a follower");
    let mut on_leader = cluster.raw(leader).await;
    let grant = on_leader.open_session(300).await;
    let session = grant.session;
    let header = SessionSeq {
        session,
        seq: 1,
        floor: 1,
    };
    on_leader
        .write_in(header, create_op("/eph", b"", true))
        .await
        .expect("ephemeral");
    // Keep it alive through the follower only, for several TTLs.
    let mut via_follower = cluster.raw(follower).await;
    let until = Instant::now() + Duration::from_millis(1_500);
    while Instant::now() < until {
        let results = tokio::time::timeout(WAIT, via_follower.keepalive(vec![session]))
            .await
            .expect("a keepalive through a follower was never answered");
        assert!(
            matches!(results.as_slice(), [(s, KeepAliveResult::Ok { .. })] if *s == session),
            "keepalive through a follower: {results:?}"
        );
        tokio::time::sleep(Duration::from_millis(80)).await;
    }
    let (_, reply) = on_leader
        .request(get("/eph", Consistency::Linearizable))
        .await;
    assert!(
        reply.is_ok(),
        "the session died while kept alive: {reply:?}"
    );
    // Stop: the leader expires it, and a late keepalive through the follower says so.
    let gone = eventually(WAIT, || async {
        let mut raw = cluster.raw(leader).await;
        matches!(
            raw.request(get("/eph", Consistency::Linearizable)).await.1,
            Err(Error::NoNode { .. })
        )
    })
    .await;
    assert!(
        gone,
        "the session never expired once its keepalives stopped"
    );
    let results = tokio::time::timeout(WAIT, via_follower.keepalive(vec![session]))
        .await
        .expect("a late keepalive was never answered");
    assert_eq!(results, vec![(session, KeepAliveResult::Expired)]);
    cluster.stop().await;
}
