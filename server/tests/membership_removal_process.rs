//! Removing members of a cluster of real `lockd` processes on loopback, driven through
//! `lockd-client` (the requests `lockctl cluster remove` sends): a follower and then the
//! leader of five voters under write load; a removed follower learns it was removed and tells
//! clients so; the session of a client on a removed leader survives; writes in flight on a
//! removed leader are answered. Adding members: `membership_process.rs`.
//!
//! The harness is `support::process`: multi-process tests run one at a time (DESIGN §3a.15),
//! every test takes `SERIAL` first; when a test fails, the tail of every node's log is printed
//! and the cluster's temp dir is kept; every wait polls a condition with a deadline.

mod support;

use std::time::{Duration, Instant};

use lockd_client::Client;
use support::process::load::{assert_no_write_lost, Load, SessionProbe};
use support::process::membership::{fast, remove_member, RUN_MS};
use support::process::{ms, pinned, pinned_client, Cluster, SERIAL};

/// What node `addr` answers to a linearizable read, by a client that does not move on.
async fn answer_of(addr: &str) -> Result<(), String> {
    let client = pinned(addr, Duration::from_secs(2))
        .await
        .map_err(|e| format!("connect: {e}"))?;
    client.get("/").await.map(|_| ()).map_err(|e| e.to_string())
}

/// Waits until node `id` answers client requests with "node N was removed from the cluster".
async fn wait_answers_removed(cluster: &Cluster, id: u64, within: Duration) -> String {
    let deadline = Instant::now() + within;
    let addr = cluster.addr(id);
    let want = format!("node {id} was removed from the cluster");
    loop {
        let answer = answer_of(&addr).await;
        if let Err(e) = &answer {
            if e.contains(&want) {
                return e.clone();
            }
        }
        assert!(
            Instant::now() < deadline,
            "node {id} does not answer {want:?} within {within:?}: last answer {answer:?}"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

// ---------------------------------------------------------------------------------------------
// Scenarios
// ---------------------------------------------------------------------------------------------

/// From five voters under write load: removes a follower, then the leader. The removed
/// leader steps down and a new leader among the remaining three is elected; writes go on;
/// the removed leader answers clients "node N was removed from the cluster"; every
/// acknowledged write is on the remaining three; the session writer's sets applied exactly
/// once; a session kept alive throughout lives. The session's client lists the remaining
/// members first: with a removed node first, its client dials that node again and again and
/// the session expires (a bug: `session_of_a_client_on_a_removed_leader_survives`).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn remove_a_follower_and_the_leader_under_load() {
    let _serial = SERIAL.lock().await;
    let started = Instant::now();
    let cluster = Cluster::start(5, 5, fast()).await;
    let all = [1, 2, 3, 4, 5];
    let (leader, term) = cluster.agreed_leader(&all, Duration::from_secs(15)).await;
    let follower = *all.iter().find(|&&i| i != leader).expect("a follower");
    let remaining: Vec<u64> = all
        .iter()
        .copied()
        .filter(|&i| i != leader && i != follower)
        .collect();
    let endpoints = cluster.endpoints(&all);
    let admin = Client::connect(endpoints.clone())
        .await
        .expect("connect admin");
    admin.create("/r", Vec::new()).await.expect("create /r");
    let mut probe_endpoints = cluster.endpoints(&remaining);
    probe_endpoints.extend(cluster.endpoints(&[follower, leader]));
    let probe = SessionProbe::open(probe_endpoints, "/r/probe").await;
    let load = Load::start(&endpoints, "/r", 2).await;
    load.run(Duration::from_millis(RUN_MS), 50, "before the removals")
        .await;

    // A follower first.
    probe.mark(&format!("removing follower {follower}"));
    let mut voters: Vec<u64> = all.to_vec();
    remove_member(&cluster, &admin, follower, &voters).await;
    voters.retain(|&i| i != follower);
    cluster
        .wait_configuration(&voters, &voters, &[], Duration::from_secs(10))
        .await;
    load.run(
        Duration::from_millis(RUN_MS),
        30,
        "after removing a follower",
    )
    .await;
    // What the removed follower answers (it should say it was removed: see
    // `removed_follower_is_told_it_was_removed`).
    let follower_answer = answer_of(&cluster.addr(follower)).await;

    // Then the leader.
    let (leader_now, _) = cluster
        .agreed_leader(&voters, Duration::from_secs(10))
        .await;
    if leader_now != leader {
        println!("note: leadership moved from {leader} to {leader_now} before its removal");
    }
    let removed_at = Instant::now();
    probe.mark(&format!("removing leader {leader_now}"));
    remove_member(&cluster, &admin, leader_now, &voters).await;
    voters.retain(|&i| i != leader_now);
    let (new_leader, new_term) = cluster
        .agreed_leader(&voters, Duration::from_secs(10))
        .await;
    let elected_after = removed_at.elapsed();
    assert_ne!(new_leader, leader_now);
    assert!(new_term > term, "term {new_term} after {term}");
    cluster
        .wait_configuration(&voters, &voters, &[], Duration::from_secs(10))
        .await;
    let removed_answer = wait_answers_removed(&cluster, leader_now, Duration::from_secs(5)).await;
    // The removed leader does not lead any more, by its own account.
    let old_view = cluster.status(leader_now).await;
    if let Some(s) = &old_view {
        assert_ne!(
            s.leader,
            Some(leader_now),
            "the removed leader still leads: {s:#?}"
        );
    }
    load.run(
        Duration::from_millis(RUN_MS),
        50,
        "after removing the leader",
    )
    .await;

    let (expected, session_sets, unknown) = load.stop().await;
    println!(
        "removals: follower {follower} removed (it then answered a read with \
         {follower_answer:?}); leader {leader_now} removed, node {new_leader} leads term \
         {new_term} {:.0} ms after the request; the removed leader answers {removed_answer:?}; \
         {} writes acknowledged, {} with unknown outcome {unknown:?}; session writer \
         {session_sets:?}",
        ms(elected_after),
        expected.len(),
        unknown.len()
    );
    assert_no_write_lost(&cluster, &voters, "/r", &expected, session_sets).await;
    probe.assert_alive(&cluster, &voters).await;
    println!(
        "removals: test took {:.1} s",
        started.elapsed().as_secs_f64()
    );
}

/// A client whose session is kept alive through the leader (its only traffic: keepalives)
/// keeps the session when that leader is removed: the other two members elect a leader
/// that gives every session a fresh TTL, and the client moves on to one of them.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn session_of_a_client_on_a_removed_leader_survives() {
    let _serial = SERIAL.lock().await;
    let cluster = Cluster::start(3, 3, fast()).await;
    let all = [1, 2, 3];
    let (leader, _) = cluster.agreed_leader(&all, Duration::from_secs(15)).await;
    let rest: Vec<u64> = all.iter().copied().filter(|&i| i != leader).collect();
    // The usual endpoint list: every member, the leader first.
    let mut endpoints = cluster.endpoints(&[leader]);
    endpoints.extend(cluster.endpoints(&rest));
    let probe = SessionProbe::open(endpoints, "/probe").await;
    assert_eq!(
        probe.session.client().connected_to(),
        Some(cluster.addr(leader))
    );
    let admin = Client::connect(cluster.endpoints(&rest))
        .await
        .expect("connect admin");
    probe.mark(&format!("removing leader {leader}"));
    remove_member(&cluster, &admin, leader, &all).await;
    let (new_leader, _) = cluster.agreed_leader(&rest, Duration::from_secs(10)).await;
    probe.mark(&format!("node {new_leader} leads"));
    // Three TTLs with only keepalives.
    tokio::time::sleep(Duration::from_secs(6)).await;
    probe.mark("checking");
    println!(
        "client of a removed leader: timeline {:?} (node {leader} = {})",
        probe.timeline.lock().expect("lock"),
        cluster.addr(leader)
    );
    probe.assert_alive(&cluster, &rest).await;
}

/// Writes in flight on a leader when it is removed are answered (acknowledged, or an error
/// the client can act on) in less than the writers' 3 s request timeout. The scenario of
/// `remove_a_follower_and_the_leader_under_load` (five voters, a follower removed, then the
/// leader), five times.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn writes_in_flight_on_a_removed_leader_are_answered() {
    let _serial = SERIAL.lock().await;
    let mut stuck = Vec::new();
    for attempt in 0..5 {
        let cluster = Cluster::start(5, 5, fast()).await;
        let all = [1, 2, 3, 4, 5];
        let (leader, _) = cluster.agreed_leader(&all, Duration::from_secs(15)).await;
        let admin = Client::connect(cluster.endpoints(&all))
            .await
            .expect("connect admin");
        admin.create("/x", Vec::new()).await.expect("create /x");
        let load = Load::start(&cluster.endpoints(&all), "/x", 2).await;
        load.run(Duration::from_millis(RUN_MS), 50, "before the removals")
            .await;
        let follower = *all.iter().find(|&&i| i != leader).expect("a follower");
        let mut voters: Vec<u64> = all.iter().copied().filter(|&i| i != follower).collect();
        remove_member(&cluster, &admin, follower, &all).await;
        load.run(
            Duration::from_millis(RUN_MS),
            30,
            "after removing a follower",
        )
        .await;
        let (leader, _) = cluster
            .agreed_leader(&voters, Duration::from_secs(10))
            .await;
        let removed_at = Instant::now();
        remove_member(&cluster, &admin, leader, &voters).await;
        voters.retain(|&i| i != leader);
        let (new_leader, _) = cluster
            .agreed_leader(&voters, Duration::from_secs(10))
            .await;
        let elected = removed_at.elapsed();
        load.run(
            Duration::from_millis(RUN_MS),
            30,
            "after removing the leader",
        )
        .await;
        let (_, _, unknown) = load.stop().await;
        let timed_out: Vec<_> = unknown
            .into_iter()
            .filter(|(_, e)| e.contains("timed out"))
            .collect();
        println!(
            "attempt {attempt}: leader {leader} removed, node {new_leader} leads {:.0} ms \
             later; writes unanswered for 3 s: {timed_out:?}",
            ms(elected)
        );
        if !timed_out.is_empty() {
            stuck.push((attempt, ms(elected), timed_out));
        }
    }
    assert!(
        stuck.is_empty(),
        "writes sent to a leader being removed were not answered within 3 s \
         (attempt, ms until a new leader, writes): {stuck:?}"
    );
}

/// A follower removed from the cluster learns that its removal committed and tells clients
/// so, like a removed leader does. Under write load, eight times, each on a fresh three-node
/// cluster.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn removed_follower_is_told_it_was_removed() {
    let _serial = SERIAL.lock().await;
    let mut failures = Vec::new();
    for attempt in 0..8 {
        let cluster = Cluster::start(3, 3, fast()).await;
        let all = [1, 2, 3];
        let (leader, _) = cluster.agreed_leader(&all, Duration::from_secs(15)).await;
        let admin = Client::connect(cluster.endpoints(&all))
            .await
            .expect("connect admin");
        admin
            .create("/f", b"before".to_vec())
            .await
            .expect("create /f");
        // (the writers below create /f/w…; /f holds data "before" until the removal)
        let follower = *all.iter().find(|&&i| i != leader).expect("a follower");
        let rest: Vec<u64> = all.iter().copied().filter(|&i| i != follower).collect();
        // Under write load, through the nodes that stay.
        let load = Load::start(&cluster.endpoints(&rest), "/f", 2).await;
        load.run(Duration::from_millis(200), 20, "before the removal")
            .await;
        remove_member(&cluster, &admin, follower, &all).await;
        load.run(Duration::from_millis(200), 20, "after the removal")
            .await;
        load.stop().await;
        admin
            .set("/f", b"after".to_vec())
            .await
            .expect("write after the removal");
        cluster
            .wait_configuration(&rest, &rest, &[], Duration::from_secs(10))
            .await;
        let deadline = Instant::now() + Duration::from_secs(3);
        let want = format!("node {follower} was removed from the cluster");
        loop {
            let answer = answer_of(&cluster.addr(follower)).await;
            if matches!(&answer, Err(e) if e.contains(&want)) {
                println!("attempt {attempt}: follower {follower} answers {answer:?}");
                break;
            }
            if Instant::now() >= deadline {
                let status = cluster.status(follower).await;
                let stale = pinned_client(&cluster.addr(follower))
                    .await
                    .get("/f")
                    .stale()
                    .await
                    .map(|g| String::from_utf8_lossy(&g.data).into_owned());
                let failure = format!(
                    "attempt {attempt}: 3 s after its removal, follower {follower} answers a \
                     read with {answer:?}, not {want:?}; its status {status:?}; a stale read \
                     of /f there gives {stale:?} (the cluster has \"after\")"
                );
                println!("{failure}");
                failures.push(failure);
                break;
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }
    assert!(failures.is_empty(), "{failures:#?}");
}
