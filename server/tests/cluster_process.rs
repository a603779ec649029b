//! Three real `lockd` processes on loopback, driven through `lockd-client`: redirects, leader
//! SIGKILL under load, snapshot catch-up of a restarted follower, and sessions across a leader
//! change. Ignored: a measurement, the election time after a SIGKILL of the leader with the
//! shipped timings. A SIGSTOPped leader is tested in `cluster_sigstop_process.rs`.
//!
//! The harness is `support::process`: multi-process tests run one at a time (DESIGN §3a.15),
//! every test takes `SERIAL` first; when a test fails, the tail of every node's log is printed
//! and the cluster's temp dir is kept; every wait polls a condition with a deadline.

mod support;

use std::collections::BTreeMap;
use std::sync::atomic::Ordering;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use futures_util::StreamExt;
use lockd_client::{Client, SessionStatus};
use support::process::load::{spawn_create_writer, spawn_session_writer, Record, SessionEnd};
use support::process::{
    assert_all_present, cluster_fast, ms, pinned_client, Cluster, Reads, Settings, SERIAL,
};

/// Reads of acknowledged writes, 32 at a time: linearizable (on a survivor) or stale (on a
/// node that catches up).
const LINEARIZABLE: Reads = Reads {
    stale: false,
    in_flight: 32,
};
const STALE: Reads = Reads {
    stale: true,
    in_flight: 32,
};

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
    let cluster = Cluster::start(3, 3, cluster_fast()).await;
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
    let mut cluster = Cluster::start(3, 3, cluster_fast()).await;
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
    let session_writer = spawn_session_writer(
        session_client,
        "/s2/session".into(),
        record.clone(),
        SessionEnd::Keep,
    );

    record
        .wait_for(
            "100 writes (10 of them by the session writer) before the kill",
            Duration::from_secs(15),
            |r| {
                let acked = r.acked();
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
            |r| r.count_acked_sent_after(killed_at) >= 100,
        )
        .await;
    record.stop.store(true, Ordering::Relaxed);
    for w in writers {
        tokio::time::timeout(Duration::from_secs(15), w)
            .await
            .expect("writer stops")
            .expect("writer panicked");
    }
    let (session_sets, _) = tokio::time::timeout(Duration::from_secs(15), session_writer)
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
        assert_all_present(&cluster.addr(id), &expected, LINEARIZABLE, "survivor").await;
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
    assert_all_present(
        &cluster.addr(old_leader),
        &expected,
        STALE,
        "restarted node",
    )
    .await;
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
    let mut cluster = Cluster::start(
        3,
        3,
        cluster_fast()
            .log_retain(RETAIN)
            .rust_log("info,lockd_server::raft=debug"),
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
        STALE,
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
    let mut cluster = Cluster::start(3, 3, cluster_fast()).await;
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
    let mut cluster = Cluster::start(3, 3, Settings::shipped("cluster")).await;
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
