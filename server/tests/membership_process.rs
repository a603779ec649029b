//! Membership changes with real `lockd` processes on loopback, driven through `lockd-client`
//! (the requests `lockctl cluster add|promote|remove|transfer-leader` send): growing 3 → 5
//! under write load, replacing a member whose data dir was wiped (restarting it under its old
//! id is refused), leader transfers back and forth (their write pause compared with a SIGTERM
//! and a SIGKILL of the leader), and a learner that never catches up.
//!
//! Also: the answers to membership requests carry a current status. Ignored: a measurement,
//! the catch-up time of a new member with a ~100 MB store. The removal of members is tested
//! in `membership_removal_process.rs`.
//!
//! The harness is `support::process`: multi-process tests run one at a time (DESIGN §3a.15),
//! every test takes `SERIAL` first; when a test fails, the tail of every node's log is printed
//! and the cluster's temp dir is kept; every wait polls a condition with a deadline.

mod support;

use std::time::{Duration, Instant};

use futures_util::StreamExt;
use lockd_client::Client;
use lockd_protocol::{Error as WireError, MemberChange};
use support::process::load::{assert_no_write_lost, Load, Pause, SessionProbe};
use support::process::membership::{
    change_members, fast, is_learner, is_member, remove_member, RUN_MS,
};
use support::process::{ms, pinned_client, Cluster, How, SERIAL};

// ---------------------------------------------------------------------------------------------
// Scenarios
// ---------------------------------------------------------------------------------------------

/// Grows 3 → 5 under write load: nodes 4 and 5 are added as learners, started with `--join`,
/// promoted once caught up. Every node then reports five voters; every acknowledged write is
/// on every node (linearizable reads); the session writer's sets applied exactly once; a
/// session kept alive throughout has not expired.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn grow_three_to_five_under_load() {
    let _serial = SERIAL.lock().await;
    let started = Instant::now();
    let mut cluster = Cluster::start(3, 5, fast()).await;
    let (leader, term) = cluster
        .agreed_leader(&[1, 2, 3], Duration::from_secs(15))
        .await;
    let initial = cluster.endpoints(&[1, 2, 3]);
    let admin = Client::connect(initial.clone())
        .await
        .expect("connect admin");
    admin.create("/g", Vec::new()).await.expect("create /g");
    let probe = SessionProbe::open(initial.clone(), "/g/probe").await;
    let load = Load::start(&initial, "/g", 2).await;
    load.run(Duration::from_millis(RUN_MS), 50, "before growing")
        .await;

    let mut voters = vec![1, 2, 3];
    for id in [4u64, 5] {
        let added_at = Instant::now();
        let after_add = change_members(
            &cluster,
            &admin,
            MemberChange::AddLearner {
                id,
                peer_addr: cluster.peer_addr(id),
                client_addr: cluster.addr(id),
            },
            &voters,
            |s| is_learner(s, id),
        )
        .await;
        assert!(
            is_member(&after_add, id) && is_learner(&after_add, id),
            "{after_add:#?}"
        );
        // The learner falls behind before it starts; the voters commit meanwhile.
        load.run(
            Duration::from_millis(RUN_MS),
            30,
            "with a learner not yet started",
        )
        .await;
        let lag_before_start = added_at.elapsed();
        let joined_at = Instant::now();
        cluster.start_member(id, How::Join(voters.clone())).await;
        let (target, learner) = cluster
            .wait_caught_up(id, &voters, Duration::from_secs(20))
            .await;
        let caught_up = joined_at.elapsed();
        assert!(
            is_learner(&learner, id),
            "node {id} reports itself a learner before its promotion: {learner:#?}"
        );
        let after_promote = change_members(
            &cluster,
            &admin,
            MemberChange::Promote { id },
            &voters,
            |s| is_member(s, id) && !is_learner(s, id),
        )
        .await;
        voters.push(id);
        println!(
            "node {id}: added as a learner, started with --join {:.0} ms later, applied the \
             leader's commit {target} {:.0} ms after its start, promoted (leader's commit then \
             {})",
            ms(lag_before_start),
            ms(caught_up),
            after_promote.commit_index
        );
        // Writes go on after each promotion (committed by the larger quorum).
        load.run(Duration::from_millis(RUN_MS), 30, "after a promotion")
            .await;
    }
    cluster
        .wait_configuration(&voters, &voters, &[], Duration::from_secs(10))
        .await;
    let (leader_now, term_now) = cluster
        .agreed_leader(&voters, Duration::from_secs(10))
        .await;
    if (leader_now, term_now) != (leader, term) {
        println!(
            "note: leadership moved from {leader} (term {term}) to {leader_now} (term {term_now})"
        );
    }
    let (expected, session_sets, unknown) = load.stop().await;
    println!(
        "grow 3 -> 5: {} writes acknowledged, {} with unknown outcome {unknown:?}; session \
         writer {session_sets:?} (attempted, acknowledged)",
        expected.len(),
        unknown.len()
    );
    assert_no_write_lost(&cluster, &voters, "/g", &expected, session_sets).await;
    probe.assert_alive(&cluster, &voters).await;
    println!(
        "grow 3 -> 5: test took {:.1} s",
        started.elapsed().as_secs_f64()
    );
}

/// A member whose data dir was wiped and that is restarted under its old id with `--peers`
/// is refused by its peers and exits with an error saying so, while the cluster keeps
/// working. The operator's path then works: remove it, add it again as a learner, start it
/// with `--join` on an empty dir, wait for it to catch up, promote it; it has all the data.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn wiped_member_is_refused_then_replaced() {
    let _serial = SERIAL.lock().await;
    let started = Instant::now();
    let mut cluster = Cluster::start(3, 3, fast()).await;
    let all = [1, 2, 3];
    let (leader, _) = cluster.agreed_leader(&all, Duration::from_secs(15)).await;
    let victim = *all
        .iter()
        .rev()
        .find(|&&i| i != leader)
        .expect("a follower");
    let rest: Vec<u64> = all.iter().copied().filter(|&i| i != victim).collect();
    let admin = Client::connect(cluster.endpoints(&rest))
        .await
        .expect("connect admin");
    admin.create("/w", Vec::new()).await.expect("create /w");
    let load = Load::start(&cluster.endpoints(&all), "/w", 1).await;
    load.run(Duration::from_millis(RUN_MS), 50, "before the wipe")
        .await;
    // The victim's incarnation is recorded in the configuration.
    cluster
        .wait_identified(victim, Duration::from_secs(10))
        .await;

    cluster.kill(victim);
    cluster.wipe(victim);
    let restarted_at = Instant::now();
    cluster.spawn_member(victim, How::Bootstrap);
    let exit = cluster
        .wait_exit(victim, Duration::from_secs(20))
        .await
        .unwrap_or_else(|| {
            panic!("node {victim} restarted on a wiped dir under its old id kept running")
        });
    let refused_after = restarted_at.elapsed();
    let log = cluster.log_text(victim);
    let restart_log = &log[log
        .rfind("===== test harness: start #2")
        .expect("second start")..];
    assert!(!exit.success(), "node {victim} exited with {exit}");
    let refusal = restart_log
        .lines()
        .find(|l| l.starts_with("lockd: ") && l.contains("the cluster refuses this node"))
        .unwrap_or_else(|| panic!("no refusal on stderr of node {victim}:\n{restart_log}"));
    assert!(
        refusal.contains(&format!("node {victim} has incarnation"))
            && refusal.contains("wiped")
            && refusal.contains("--join"),
        "the refusal says why and what to do: {refusal}"
    );
    // The cluster kept working.
    load.run(
        Duration::from_millis(RUN_MS),
        30,
        "while the wiped node was refused",
    )
    .await;
    assert!(cluster.status(victim).await.is_none());

    // The operator's path.
    remove_member(&cluster, &admin, victim, &rest).await;
    change_members(
        &cluster,
        &admin,
        MemberChange::AddLearner {
            id: victim,
            peer_addr: cluster.peer_addr(victim),
            client_addr: cluster.addr(victim),
        },
        &rest,
        |s| is_learner(s, victim),
    )
    .await;
    cluster.wipe(victim);
    let joined_at = Instant::now();
    cluster.start_member(victim, How::Join(rest.clone())).await;
    let (target, _) = cluster
        .wait_caught_up(victim, &rest, Duration::from_secs(20))
        .await;
    let caught_up = joined_at.elapsed();
    change_members(
        &cluster,
        &admin,
        MemberChange::Promote { id: victim },
        &rest,
        |s| is_member(s, victim) && !is_learner(s, victim),
    )
    .await;
    cluster
        .wait_configuration(&all, &all, &[], Duration::from_secs(10))
        .await;
    load.run(Duration::from_millis(RUN_MS), 30, "after the replacement")
        .await;
    let (expected, session_sets, unknown) = load.stop().await;
    assert_no_write_lost(&cluster, &all, "/w", &expected, session_sets).await;
    println!(
        "wiped member {victim}: refused and exited ({exit}) {:.0} ms after its restart, saying \
         {refusal:?}; replaced: joined, applied the leader's commit {target} after {:.0} ms, \
         promoted; {} writes acknowledged, unknown outcome {unknown:?}; test took {:.1} s",
        ms(refused_after),
        ms(caught_up),
        expected.len(),
        started.elapsed().as_secs_f64()
    );
}

/// Transfers leadership A → B → A → B under write load: each target leads afterwards, in a
/// higher term. Prints the client-visible write latency (p99, max) around each transfer, and
/// under the same load and timings around a SIGTERM of the leader (which hands leadership
/// over before it exits) and around a SIGKILL of the leader.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn leader_transfer_back_and_forth_under_load() {
    let _serial = SERIAL.lock().await;
    let started = Instant::now();
    let mut cluster = Cluster::start(3, 3, fast()).await;
    let all = [1, 2, 3];
    let (a, mut term) = cluster.agreed_leader(&all, Duration::from_secs(15)).await;
    let b = *all.iter().find(|&&i| i != a).expect("another voter");
    let endpoints = cluster.endpoints(&all);
    let admin = Client::connect(endpoints.clone())
        .await
        .expect("connect admin");
    admin.create("/t", Vec::new()).await.expect("create /t");
    let probe = SessionProbe::open(endpoints.clone(), "/t/probe").await;
    let load = Load::start(&endpoints, "/t", 16).await;
    load.run(Duration::from_millis(500), 50, "before the transfers")
        .await;
    let steady_from = Instant::now();
    load.run(Duration::from_millis(500), 50, "steady").await;
    let steady = load.record.pause(steady_from, Instant::now());

    // Each event is measured over the writes in flight from its start until 50 ms after the
    // new leader is known (a longer window only adds unaffected writes to the percentiles);
    // the load then runs on for 300 ms before the next event.
    const AFTER: Duration = Duration::from_millis(300);
    const WINDOW_AFTER: Duration = Duration::from_millis(50);
    let mut transfers = Vec::new();
    let mut reply_views = Vec::new();
    for (round, target) in [b, a, b, a].into_iter().enumerate() {
        let t0 = Instant::now();
        let answered = admin
            .transfer_leader(target)
            .await
            .unwrap_or_else(|e| panic!("transfer #{round} to {target}: {e}"));
        let took = t0.elapsed();
        // The answer's status is the old leader's view when it answered.
        reply_views.push(answered.status.leader);
        let (leader, new_term) = cluster.agreed_leader(&all, Duration::from_secs(10)).await;
        assert_eq!(
            leader, target,
            "transfer #{round}: node {target} leads afterwards"
        );
        assert!(
            new_term > term,
            "transfer #{round}: term {new_term} after {term}"
        );
        term = new_term;
        load.run(AFTER, 30, "after a transfer").await;
        let pause = load.record.pause(t0, t0 + took + WINDOW_AFTER);
        println!(
            "transfer #{round} to node {target} (term {new_term}) answered after {:.0} ms: {pause}",
            ms(took)
        );
        transfers.push(pause);
    }

    // SIGTERM of the leader: it hands leadership over, then exits.
    let (leader, term) = cluster.agreed_leader(&all, Duration::from_secs(10)).await;
    let others: Vec<u64> = all.iter().copied().filter(|&i| i != leader).collect();
    let termed_at = Instant::now();
    cluster.signal(leader, "TERM");
    let (after_term, term_after_term) = cluster
        .agreed_leader(&others, Duration::from_secs(10))
        .await;
    let term_known = termed_at.elapsed();
    assert!(term_after_term > term && after_term != leader);
    let exit = cluster
        .wait_exit(leader, Duration::from_secs(15))
        .await
        .expect("the leader exits after SIGTERM");
    let handed_over = cluster
        .log_text(leader)
        .lines()
        .any(|l| l.contains("SIGTERM received"));
    load.run(AFTER, 30, "after the SIGTERM").await;
    let termed = load
        .record
        .pause(termed_at, termed_at + term_known + WINDOW_AFTER);
    // Back to three, caught up.
    cluster.start_member(leader, How::Bootstrap).await;
    cluster
        .wait_caught_up(leader, &others, Duration::from_secs(20))
        .await;
    load.run(Duration::from_millis(300), 30, "after the restart")
        .await;

    // SIGKILL of the leader.
    let (leader, term) = cluster.agreed_leader(&all, Duration::from_secs(10)).await;
    let killed_at = Instant::now();
    cluster.kill(leader);
    let survivors = cluster.running();
    let (new_leader, new_term) = cluster
        .agreed_leader(&survivors, Duration::from_secs(10))
        .await;
    let kill_known = killed_at.elapsed();
    assert!(new_term > term && new_leader != leader);
    load.run(AFTER, 30, "after the SIGKILL").await;
    let killed = load
        .record
        .pause(killed_at, killed_at + kill_known + WINDOW_AFTER);

    let (expected, session_sets, unknown) = load.stop().await;
    assert_no_write_lost(&cluster, &survivors, "/t", &expected, session_sets).await;
    probe.assert_alive(&cluster, &survivors).await;

    let worst = |f: fn(&Pause) -> f64| transfers.iter().map(f).fold(0.0, f64::max);
    println!(
        "write pause (tick 20 ms, election timeout 200-400 ms; 16 create writers and 1 session \
         writer, closed loop; writes in flight from the event to 50 ms after the new leader is known):\n  \
         steady (500 ms):  {steady}\n  \
         leader transfer:  worst of 4: p99 {:.0} ms, max {:.0} ms, longest gap {:.0} ms \
         (answers named leaders {reply_views:?})\n  \
         leader SIGTERM:   {termed} (others agreed on a new leader after {:.0} ms; exit \
         {exit}; logged SIGTERM: {handed_over})\n  \
         leader SIGKILL:   {killed} (survivors agreed on node {new_leader} after {:.0} ms)\n  \
         {} writes acknowledged, {} with unknown outcome; test took {:.1} s",
        worst(|p| p.p99_ms),
        worst(|p| p.max_ms),
        worst(|p| p.max_gap_ms),
        ms(term_known),
        ms(kill_known),
        expected.len(),
        unknown.len(),
        started.elapsed().as_secs_f64()
    );
}

/// The status that answers a leader transfer names the new leader, and the status that
/// answers a membership change has applied ≤ commit (what `lockctl cluster transfer-leader`
/// and `cluster add|promote|remove` print).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn status_in_membership_answers_is_current() {
    let _serial = SERIAL.lock().await;
    let cluster = Cluster::start(3, 4, fast()).await;
    let all = [1, 2, 3];
    let (first, _) = cluster.agreed_leader(&all, Duration::from_secs(15)).await;
    let other = *all.iter().find(|&&i| i != first).expect("another voter");
    let admin = Client::connect(cluster.endpoints(&all))
        .await
        .expect("connect admin");
    let mut wrong = Vec::new();
    for (round, target) in [other, first].into_iter().cycle().take(10).enumerate() {
        let answer = admin
            .transfer_leader(target)
            .await
            .unwrap_or_else(|e| panic!("transfer #{round} to {target}: {e}"))
            .status;
        cluster.agreed_leader(&all, Duration::from_secs(10)).await;
        if answer.leader != Some(target) {
            wrong.push(format!(
                "transfer #{round} to {target} answered by node {} with leader {:?}",
                answer.node_id, answer.leader
            ));
        }
    }
    for round in 0..5 {
        let add = MemberChange::AddLearner {
            id: 4,
            peer_addr: cluster.peer_addr(4),
            client_addr: cluster.addr(4),
        };
        for change in [add, MemberChange::Remove { id: 4 }] {
            let answer = admin
                .change_members(change.clone())
                .await
                .unwrap_or_else(|e| panic!("{change:?}: {e}"))
                .status;
            if answer.applied_index > answer.commit_index {
                wrong.push(format!(
                    "round {round}: {change:?} answered with applied {} > commit {}",
                    answer.applied_index, answer.commit_index
                ));
            }
        }
    }
    assert!(wrong.is_empty(), "answers with a stale status: {wrong:#?}");
}

/// A learner that never catches up (added, never started): its promotion is refused as
/// "behind", and the cluster keeps committing with its three voters; removing it works.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn learner_that_never_catches_up_is_not_promoted() {
    let _serial = SERIAL.lock().await;
    let started = Instant::now();
    let cluster = Cluster::start(3, 4, fast()).await;
    let voters = [1, 2, 3];
    cluster
        .agreed_leader(&voters, Duration::from_secs(15))
        .await;
    let admin = Client::connect(cluster.endpoints(&voters))
        .await
        .expect("connect admin");
    admin.create("/l", Vec::new()).await.expect("create /l");
    change_members(
        &cluster,
        &admin,
        MemberChange::AddLearner {
            id: 4,
            peer_addr: cluster.peer_addr(4),
            client_addr: cluster.addr(4),
        },
        &voters,
        |s| is_learner(s, 4),
    )
    .await;
    cluster
        .wait_configuration(&voters, &voters, &[4], Duration::from_secs(10))
        .await;

    let mut refusals = Vec::new();
    for round in 0..3 {
        let before = cluster
            .status(
                cluster
                    .agreed_leader(&voters, Duration::from_secs(10))
                    .await
                    .0,
            )
            .await
            .expect("leader status");
        // The cluster commits with its three voters.
        let mut last = 0;
        for i in 0..20 {
            last = admin
                .create(format!("/l/r{round}-{i}"), Vec::new())
                .await
                .expect("a write with a learner that never answers")
                .revision;
        }
        for id in voters {
            cluster
                .wait_applied(id, last, Duration::from_secs(10))
                .await;
        }
        assert!(last > before.commit_index);
        let refused = admin
            .change_members(MemberChange::Promote { id: 4 })
            .await
            .expect_err("the promotion of a learner that never answered");
        let text = refused.to_string();
        assert!(
            matches!(refused.wire(), Some(WireError::MembershipRefused(_)))
                && text.starts_with("membership change refused:")
                && text.contains("behind"),
            "promotion refused as behind: {text}"
        );
        refusals.push(text);
    }
    cluster
        .wait_configuration(&voters, &voters, &[4], Duration::from_secs(10))
        .await;
    remove_member(&cluster, &admin, 4, &voters).await;
    cluster
        .wait_configuration(&voters, &voters, &[], Duration::from_secs(10))
        .await;
    admin
        .create("/l/after", Vec::new())
        .await
        .expect("a write after removing the learner");
    println!(
        "learner that never catches up: promotions refused: {refusals:?}; test took {:.1} s",
        started.elapsed().as_secs_f64()
    );
}

/// Fills a 3-node cluster with about 100 MB (25,600 values of 4 KiB, written 32 at a time),
/// then adds a fourth node and times how long it takes, from `cluster add`, to apply the
/// leader's commit index. Prints the data size (and the leader's data dir on disk).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
#[ignore = "measurement (about 15 s): cargo test -p lockd-server --test membership_process -- --ignored --nocapture catch_up"]
async fn catch_up_time_of_a_new_member_with_100_mb() {
    const VALUES: usize = 25_600;
    const VALUE_SIZE: usize = 4096;
    const IN_FLIGHT: usize = 32;
    let _serial = SERIAL.lock().await;
    let mut cluster = Cluster::start(3, 4, fast().log_snapshots()).await;
    let voters = [1, 2, 3];
    let (leader, _) = cluster
        .agreed_leader(&voters, Duration::from_secs(15))
        .await;
    let client = Client::connect(cluster.endpoints(&voters))
        .await
        .expect("connect");
    client
        .create("/big", Vec::new())
        .await
        .expect("create /big");
    let fill_started = Instant::now();
    let client = &client;
    let failures: Vec<String> = futures_util::stream::iter(0..VALUES)
        .map(|i| async move {
            let mut data = vec![(i % 251) as u8; VALUE_SIZE];
            data[..8].copy_from_slice(&(i as u64).to_be_bytes());
            client
                .create(format!("/big/k{i:06}"), data)
                .await
                .err()
                .map(|e| format!("k{i}: {e}"))
        })
        .buffer_unordered(IN_FLIGHT)
        .filter_map(|f| async move { f })
        .collect()
        .await;
    assert!(
        failures.is_empty(),
        "fill failed: {:?}",
        &failures[..failures.len().min(5)]
    );
    let fill = fill_started.elapsed();
    let mb = (VALUES * VALUE_SIZE) as f64 / 1e6;
    let leader_dir = dir_size(&cluster.member(leader).data_dir);
    let leader_status = cluster.status(leader).await.expect("leader status");

    let added_at = Instant::now();
    change_members(
        &cluster,
        client,
        MemberChange::AddLearner {
            id: 4,
            peer_addr: cluster.peer_addr(4),
            client_addr: cluster.addr(4),
        },
        &voters,
        |s| is_learner(s, 4),
    )
    .await;
    cluster.start_member(4, How::Join(voters.to_vec())).await;
    let started_at = added_at.elapsed();
    let (target, _) = cluster
        .wait_caught_up(4, &voters, Duration::from_secs(600))
        .await;
    let caught_up = added_at.elapsed();
    let log4 = cluster.log_text(4);
    let snapshots = log4.matches("installing snapshot").count();
    let got = pinned_client(&cluster.addr(4))
        .await
        .get(format!("/big/k{:06}", VALUES - 1))
        .stale()
        .await
        .expect("the last value on the new member");
    assert_eq!(&got.data[..8], &((VALUES - 1) as u64).to_be_bytes());
    change_members(
        &cluster,
        client,
        MemberChange::Promote { id: 4 },
        &voters,
        |s| is_member(s, 4) && !is_learner(s, 4),
    )
    .await;
    println!(
        "catch-up: {VALUES} values of {VALUE_SIZE} B = {mb:.0} MB of data written in {:.1} s \
         (leader applied {}, data dir {:.0} MB on disk); new member 4 added, started (serving \
         after {:.2} s), applied the leader's commit {target} {:.1} s after `cluster add` \
         ({:.1} MB/s; {}), then promoted; data dir of node 4: {:.0} MB",
        fill.as_secs_f64(),
        leader_status.applied_index,
        leader_dir as f64 / 1e6,
        started_at.as_secs_f64(),
        caught_up.as_secs_f64(),
        mb / caught_up.as_secs_f64(),
        if snapshots > 0 {
            format!("{snapshots} snapshot install(s), then the log")
        } else {
            "by log replay only".to_string()
        },
        dir_size(&cluster.member(4).data_dir) as f64 / 1e6,
    );
    cluster.kill(4);
}

fn dir_size(dir: &std::path::Path) -> u64 {
    std::fs::read_dir(dir)
        .map(|entries| {
            entries
                .filter_map(Result::ok)
                .map(|e| {
                    let meta = e.metadata().ok();
                    match meta {
                        Some(m) if m.is_dir() => dir_size(&e.path()),
                        Some(m) => m.len(),
                        None => 0,
                    }
                })
                .sum()
        })
        .unwrap_or(0)
}
