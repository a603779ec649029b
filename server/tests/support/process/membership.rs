//! What the membership tests (`membership_process.rs`, `membership_removal_process.rs`) share:
//! their timings, waits for a configuration or a caught-up member, and membership changes
//! proposed the way `lockctl cluster add|promote|remove` does.

use std::collections::{BTreeMap, BTreeSet};
use std::time::{Duration, Instant};

use lockd_client::Client;
use lockd_protocol::{ClusterStatus, MemberChange};

use super::{tolerated_during_failover, Cluster, Settings};

/// How long the write load runs (at least) between the steps of a scenario, in ms.
pub const RUN_MS: u64 = 500;

/// Node logs: info, plus the configuration changes the core appends (the harness reads the
/// `Identify` entries from them).
const RUST_LOG: &str = "info,lockd_server::raft::membership=debug";

/// Test timings: 20 ms ticks, election timeout 200-400 ms, TTLs from 100 ms, no spinning;
/// logs at [`RUST_LOG`].
pub fn fast() -> Settings {
    Settings::fast("membership", 20, 100).rust_log(RUST_LOG)
}

impl Cluster {
    /// Waits until node `id` has applied what the leader of `voters` had committed when the
    /// wait began; returns (that index, `id`'s status).
    pub async fn wait_caught_up(
        &self,
        id: u64,
        voters: &[u64],
        within: Duration,
    ) -> (u64, ClusterStatus) {
        let (leader, _) = self.agreed_leader(voters, within).await;
        let target = self
            .status(leader)
            .await
            .expect("leader status")
            .commit_index;
        (target, self.wait_applied(id, target, within).await)
    }

    /// Waits until every node of `ask` reports the configuration `voters` + `learners`.
    pub async fn wait_configuration(
        &self,
        ask: &[u64],
        voters: &[u64],
        learners: &[u64],
        within: Duration,
    ) {
        let want_members: BTreeSet<u64> = voters.iter().chain(learners).copied().collect();
        let want_learners: BTreeSet<u64> = learners.iter().copied().collect();
        let deadline = Instant::now() + within;
        loop {
            let mut views = BTreeMap::new();
            for &id in ask {
                views.insert(id, self.status(id).await);
            }
            let agree = views.values().all(|s| {
                s.as_ref().is_some_and(|s| {
                    s.members.iter().map(|m| m.id).collect::<BTreeSet<_>>() == want_members
                        && s.learners.iter().copied().collect::<BTreeSet<_>>() == want_learners
                })
            });
            if agree {
                return;
            }
            assert!(
                Instant::now() < deadline,
                "nodes {ask:?} did not report voters {voters:?} and learners {learners:?} \
                 within {within:?}; views {views:#?}"
            );
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }

    /// Waits until a node's log shows a leader appending the `Identify` entry of node `id`
    /// (its data-directory incarnation is then in the configuration), and every running node
    /// has applied past it.
    pub async fn wait_identified(&self, id: u64, within: Duration) {
        let needle = format!("Identify {{ id: {id},");
        let deadline = Instant::now() + within;
        let index = loop {
            let found = self.members.values().find_map(|m| {
                std::fs::read_to_string(&m.log).ok()?.lines().find_map(|l| {
                    if !(l.contains("configuration change") && l.contains(&needle)) {
                        return None;
                    }
                    let rest = &l[l.find("index=")? + "index=".len()..];
                    rest.split_whitespace().next()?.parse::<u64>().ok()
                })
            });
            if let Some(index) = found {
                break index;
            }
            assert!(
                Instant::now() < deadline,
                "no leader recorded node {id}'s incarnation within {within:?}"
            );
            tokio::time::sleep(Duration::from_millis(20)).await;
        };
        for running in self.running() {
            self.wait_applied(running, index, within).await;
        }
    }
}

/// Removes member `id` (what `lockctl cluster remove` sends) through `admin`, as
/// [`change_members`] does, until the answer shows it gone.
pub async fn remove_member(
    cluster: &Cluster,
    admin: &Client,
    id: u64,
    among: &[u64],
) -> ClusterStatus {
    change_members(cluster, admin, MemberChange::Remove { id }, among, |s| {
        !is_member(s, id)
    })
    .await
}

/// Proposes a membership change through `admin` (which follows the leader), retrying while
/// the answer is "not now" (a leader change, another change or a transfer in progress).
/// If an attempt's answer is lost, `done`, applied to the status of a node of `among` that
/// leads, tells whether it applied. Returns the leader's view after the change.
pub async fn change_members(
    cluster: &Cluster,
    admin: &Client,
    change: MemberChange,
    among: &[u64],
    done: impl Fn(&ClusterStatus) -> bool,
) -> ClusterStatus {
    let deadline = Instant::now() + Duration::from_secs(20);
    let mut failures = Vec::new();
    loop {
        match admin.change_members(change.clone()).await {
            Ok(s) => {
                assert!(done(&s.status), "{change:?} answered {:#?}", s.status);
                if !failures.is_empty() {
                    println!("note: {change:?} done after failed attempts {failures:?}");
                }
                return s.status;
            }
            Err(e) if tolerated_during_failover(&e) => {
                failures.push(e.to_string());
                // Did it apply? Ask whoever leads now (a removed leader steps down).
                let asked = Instant::now();
                while asked.elapsed() < Duration::from_secs(3) {
                    if let Some(s) = leader_view(cluster, among).await {
                        if done(&s) {
                            println!("note: {change:?} applied although answered {failures:?}");
                            return s;
                        }
                        break;
                    }
                    tokio::time::sleep(Duration::from_millis(20)).await;
                }
            }
            Err(e) => panic!("{change:?} failed: {e} (before: {failures:?})"),
        }
        assert!(
            Instant::now() < deadline,
            "{change:?} not done within 20 s: {failures:?}"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

/// The status of a node of `among` that says it leads, if one does.
async fn leader_view(cluster: &Cluster, among: &[u64]) -> Option<ClusterStatus> {
    for &id in among {
        if let Some(s) = cluster.status(id).await {
            if s.leader == Some(id) {
                return Some(s);
            }
        }
    }
    None
}

pub fn is_member(s: &ClusterStatus, id: u64) -> bool {
    s.members.iter().any(|m| m.id == id)
}

pub fn is_learner(s: &ClusterStatus, id: u64) -> bool {
    s.learners.contains(&id)
}
