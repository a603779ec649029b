//! Simulation runs: many seeds of faulty 3- and 5-node clusters (with membership changes and
//! leader transfers), and determinism.

use super::{Sim, SimConfig};

/// `LOCKD_SIM_SEED=<seed>` replays one seed.
fn seeds(default: std::ops::Range<u64>) -> Vec<u64> {
    match std::env::var("LOCKD_SIM_SEED")
        .ok()
        .and_then(|s| s.parse().ok())
    {
        Some(seed) => vec![seed],
        None => default.collect(),
    }
}

#[test]
fn sim_three_nodes_many_seeds_keep_safety() {
    for seed in seeds(0..200) {
        let stats = Sim::new(SimConfig::new(seed)).run().unwrap_or_else(|e| {
            panic!("{e}\nreplay: LOCKD_SIM_SEED={seed} cargo test -p lockd-server --lib sim_three")
        });
        assert!(
            stats.acknowledged > 0,
            "seed {seed}: no progress: {stats:?}"
        );
    }
}

#[test]
fn sim_five_nodes_many_seeds_keep_safety() {
    for seed in seeds(1000..1100) {
        let cfg = SimConfig {
            nodes: 5,
            ..SimConfig::new(seed)
        };
        let stats = Sim::new(cfg).run().unwrap_or_else(|e| {
            panic!("{e}\nreplay: LOCKD_SIM_SEED={seed} cargo test -p lockd-server --lib sim_five")
        });
        assert!(
            stats.acknowledged > 0,
            "seed {seed}: no progress: {stats:?}"
        );
    }
}

#[test]
fn sim_same_seed_same_trace() {
    let run = || {
        Sim::new(SimConfig {
            trace: true,
            steps: 600,
            ..SimConfig::new(7)
        })
        .run()
        .unwrap()
    };
    let (a, b) = (run(), run());
    assert_ne!(a.trace_digest, 0);
    assert_eq!(a, b);
    let c = Sim::new(SimConfig {
        trace: true,
        steps: 600,
        ..SimConfig::new(8)
    })
    .run()
    .unwrap();
    assert_ne!(a.trace_digest, c.trace_digest);
}

#[test]
fn sim_runs_exercise_faults_snapshots_reads_and_membership() {
    let mut total = super::SimStats::default();
    for seed in 0..10 {
        let s = Sim::new(SimConfig::new(seed)).run().unwrap_or_else(|e| {
            panic!("{e}\nreplay: LOCKD_SIM_SEED={seed} cargo test -p lockd-server --lib sim_three")
        });
        println!("seed {seed}: {s:?}");
        total.crashes += s.crashes;
        total.crashes_after_apply_first += s.crashes_after_apply_first;
        total.snapshots_installed += s.snapshots_installed;
        total.reads += s.reads;
        total.acknowledged += s.acknowledged;
        total.conf_changes += s.conf_changes;
        total.promotions += s.promotions;
        total.leader_removals += s.leader_removals;
        total.transfers += s.transfers;
    }
    assert!(
        total.crashes > 0
            && total.crashes_after_apply_first > 0
            && total.snapshots_installed > 0
            && total.reads > 0,
        "{total:?}"
    );
    assert!(
        total.conf_changes > 0
            && total.promotions > 0
            && total.leader_removals > 0
            && total.transfers > 0,
        "{total:?}"
    );
}

/// A longer run: `LOCKD_SIM_COUNT=<n> cargo test -p lockd-server --lib sim_long -- --ignored`.
#[test]
#[ignore]
fn sim_long() {
    let count: u64 = std::env::var("LOCKD_SIM_COUNT")
        .ok()
        .and_then(|s| s.parse().ok())
        .unwrap_or(500);
    for seed in 10_000..10_000 + count {
        let nodes = if seed % 3 == 0 { 5 } else { 3 };
        let cfg = SimConfig {
            nodes,
            steps: 3000,
            pre_vote: seed % 4 != 1,
            check_quorum: seed % 4 != 2,
            drop: if seed % 5 == 0 { 0.2 } else { 0.05 },
            crash: if seed % 7 == 0 { 0.02 } else { 0.004 },
            max_inflight_msgs: 1 + (seed % 8) as usize,
            max_size_per_msg: 64 << (seed % 6),
            ..SimConfig::new(seed)
        };
        Sim::new(cfg).run().unwrap_or_else(|e| panic!("{e}"));
    }
}

/// Membership churn: frequent changes and transfers, two spares, 3 to 5 voters.
/// `LOCKD_SIM_COUNT=<n> cargo test -p lockd-server --lib sim_membership_long -- --ignored`.
#[test]
#[ignore]
fn sim_membership_long() {
    let count: u64 = std::env::var("LOCKD_SIM_COUNT")
        .ok()
        .and_then(|s| s.parse().ok())
        .unwrap_or(300);
    let mut total = super::SimStats::default();
    for seed in seeds(20_000..20_000 + count) {
        let cfg = SimConfig {
            nodes: 3 + 2 * (seed % 2),
            spares: 2,
            conf_change: 0.1,
            transfer: 0.02,
            max_promote_lag: 5 + seed % 50,
            pre_vote: seed % 4 != 1,
            check_quorum: seed % 4 != 2,
            ..SimConfig::new(seed)
        };
        let s = Sim::new(cfg).run().unwrap_or_else(|e| {
            panic!("{e}\nreplay: LOCKD_SIM_SEED={seed} cargo test -p lockd-server --lib sim_membership_long -- --ignored")
        });
        total.conf_changes += s.conf_changes;
        total.promotions += s.promotions;
        total.leader_removals += s.leader_removals;
        total.transfers += s.transfers;
        total.acknowledged += s.acknowledged;
    }
    println!("{total:?}");
}
