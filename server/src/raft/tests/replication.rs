//! Log replication (§3.5), the commit rule (§3.6.2, Figure 3.7), the leader counting itself
//! only once durable (§10.2.1), flow control, fast backtracking, proposals and bad input.

use super::network::{ent, store_with, Network};
use crate::raft::{AppendResult, EntryKind, Message, MessageKind, ProposeError, RaftConfig, Role};

#[test]
fn s3_5_log_replication_commits_on_quorum_and_applies_everywhere() {
    let mut net = Network::new(3, |c| c);
    net.elect(1);
    for _ in 0..10 {
        net.propose(1);
    }
    net.stabilize();
    net.tick_all(1);
    for id in 1..=3 {
        assert_eq!(net.node(id).commit(), 11);
        let applied: Vec<u64> = net.applied[&id].iter().map(|e| e.index).collect();
        assert_eq!(applied, (1..=11).collect::<Vec<_>>());
    }
}

#[test]
fn s3_5_minority_down_still_commits_majority_down_does_not() {
    let mut net = Network::new(5, |c| c);
    net.elect(1);
    net.isolate(4);
    net.isolate(5);
    let i = net.propose(1);
    net.stabilize();
    assert_eq!(net.node(1).commit(), i);
    net.isolate(3);
    let j = net.propose(1);
    net.stabilize();
    assert_eq!(net.node(1).commit(), i, "two of five cannot commit {j}");
}

#[test]
fn s3_5_conflicting_logs_repaired() {
    // Follower 2 has extra entries from an old term; follower 3 lags.
    let v = [1, 2, 3];
    let stores = vec![
        store_with(&v, &[ent(1, 1), ent(2, 1), ent(3, 3), ent(4, 3)], 3),
        store_with(
            &v,
            &[ent(1, 1), ent(2, 2), ent(3, 2), ent(4, 2), ent(5, 2)],
            2,
        ),
        store_with(&v, &[ent(1, 1)], 3),
    ];
    let mut net = Network::with_stores(stores, |c| c);
    net.elect(1);
    net.tick_all(2);
    let leader_log = net.node(1).store().all_entries().to_vec();
    assert_eq!(leader_log.len(), 5);
    for id in [2, 3] {
        assert_eq!(
            net.node(id).store().all_entries(),
            &leader_log[..],
            "node {id}"
        );
        assert_eq!(net.node(id).commit(), 5);
    }
}

#[test]
fn s3_5_fast_backtracking_skips_whole_terms() {
    // Follower 2 holds 50 entries of term 2 that the leader (term 3 entries) lacks.
    let v = [1, 2, 3];
    let mut f: Vec<_> = vec![ent(1, 1)];
    f.extend((2..=51).map(|i| ent(i, 2)));
    let mut l: Vec<_> = vec![ent(1, 1)];
    l.extend((2..=60).map(|i| ent(i, 3)));
    let stores = vec![
        store_with(&v, &l, 3),
        store_with(&v, &f, 2),
        store_with(&v, &l, 3),
    ];
    let mut net = Network::with_stores(stores, |c| c);
    net.elect(1);
    net.tick_all(2);
    let rejects = net
        .sent
        .iter()
        .filter(|m| {
            m.from == 2
                && matches!(
                    m.kind,
                    MessageKind::AppendResp {
                        result: AppendResult::Reject { .. }
                    }
                )
        })
        .count();
    assert!(
        rejects <= 2,
        "one term skipped per rejection, got {rejects} rejections"
    );
    assert_eq!(
        net.nodes[&2].store().all_entries(),
        net.nodes[&1].store().all_entries()
    );
}

#[test]
fn s3_6_2_figure_3_7_old_term_entries_not_committed_by_counting() {
    // Figure 3.7 (c): S1 leads term 4 holding (2, term 2); S5 holds (2, term 3).
    let v = [1, 2, 3, 4, 5];
    let stores = vec![
        store_with(&v, &[ent(1, 1), ent(2, 2)], 3),
        store_with(&v, &[ent(1, 1), ent(2, 2)], 3),
        store_with(&v, &[ent(1, 1)], 3),
        store_with(&v, &[ent(1, 1)], 3),
        store_with(&v, &[ent(1, 1), ent(2, 3)], 3),
    ];
    let mut net = Network::with_stores(stores, |c| c);
    // S1 manages to replicate (2, term 2) to S2 and S3, but none of its term-4 entries.
    net.filter = Some(Box::new(|mut m: Message| {
        if let MessageKind::Append { entries, .. } = &mut m.kind {
            entries.retain(|e| e.term < 4);
        }
        Some(m)
    }));
    net.cut.extend([(1, 4), (1, 5)]);
    net.elect(1);
    assert_eq!(net.node(1).term(), 4);
    net.tick_all(3);
    assert_eq!(
        net.node(3).store().all_entries().len(),
        2,
        "(2, term 2) on a majority"
    );
    let pr = &net.node(1).tracker().progress;
    assert_eq!((pr[&2].matched, pr[&3].matched), (2, 2));
    assert_eq!(
        net.node(1).commit(),
        0,
        "an old-term entry is not committed by counting"
    );
    // Once an entry of term 4 reaches a majority, everything before it commits.
    net.filter = None;
    net.tick_all(2);
    assert_eq!(net.node(1).commit(), 3);
    assert_eq!(
        net.applied[&1].iter().map(|e| e.term).collect::<Vec<_>>(),
        vec![1, 2, 4]
    );
}

#[test]
fn s10_2_1_leader_counts_itself_only_once_persisted() {
    let mut net = Network::new(3, |c| c);
    net.elect(1);
    let idx = net.propose(1);
    // The leader's appends go out before its own persistence.
    let rd = net.node(1).ready();
    for m in rd.early_messages.iter().filter(|m| m.to == 2).cloned() {
        net.node(2).step(m);
    }
    let rd2 = net.node(2).ready();
    net.node(2).store_mut().append(&rd2.entries);
    net.node(2).advance(&rd2);
    for m in rd2.messages {
        net.node(1).step(m);
    }
    assert!(
        net.node(1).commit() < idx,
        "follower 2 alone is not a quorum"
    );
    net.node(1).store_mut().append(&rd.entries);
    net.node(1).advance(&rd);
    assert_eq!(
        net.node(1).commit(),
        idx,
        "leader + 2 once the leader's write is durable"
    );
}

#[test]
fn s10_2_flow_control_inflight_window() {
    let mut net = Network::new(3, |c| RaftConfig {
        max_inflight_msgs: 3,
        max_size_per_msg: 1,
        ..c
    });
    net.elect(1);
    net.tick_all(1);
    net.cut.insert((2, 1)); // 2's acks are lost: its window fills up
    for _ in 0..10 {
        net.propose(1);
    }
    net.stabilize();
    let appends_to_2 = net.node(1).tracker().progress[&2].inflights.count();
    assert_eq!(
        appends_to_2, 3,
        "no more than max_inflight appends in flight"
    );
    let sent = net
        .sent
        .iter()
        .filter(|m| {
            m.to == 2
                && matches!(&m.kind, MessageKind::Append { entries, .. } if !entries.is_empty())
        })
        .count();
    assert!(sent <= 4, "{sent}");
    net.heal();
    net.tick_all(3);
    assert_eq!(net.node(2).commit(), 11);
}

#[test]
fn s3a_14_append_batches_capped_in_bytes_but_carry_one_entry() {
    let mut net = Network::new(2, |c| RaftConfig {
        max_size_per_msg: 1,
        ..c
    });
    net.elect(1);
    net.propose(1);
    net.propose(1);
    net.stabilize();
    for m in &net.sent {
        if let MessageKind::Append { entries, .. } = &m.kind {
            assert!(entries.len() <= 1);
        }
    }
    assert_eq!(net.node(2).commit(), 3);
}

#[test]
fn propose_errors_are_typed() {
    let mut net = Network::new(3, |c| RaftConfig {
        max_entry_bytes: 64,
        ..c
    });
    net.elect(1);
    assert_eq!(
        net.node(2).propose(EntryKind::Noop, 1, 0),
        Err(ProposeError::NotLeader {
            leader_hint: Some(1)
        })
    );
    let big = EntryKind::Command(crate::fsm::Command::EndLockDelay {
        lock: "x".repeat(100),
    });
    assert!(matches!(
        net.node(1).propose(big, 1, 0),
        Err(ProposeError::ProposalTooLarge { .. })
    ));
}

#[test]
fn s3_4_entry_time_never_goes_backwards() {
    let mut net = Network::new(1, |c| c);
    net.elect(1);
    net.node(1).propose(EntryKind::Noop, 1, 500).unwrap();
    net.node(1).propose(EntryKind::Noop, 1, 100).unwrap();
    net.stabilize();
    let times: Vec<u64> = net.applied[&1].iter().map(|e| e.time_ms).collect();
    assert_eq!(times, vec![0, 500, 500]);
}

#[test]
fn untrusted_messages_are_dropped_without_panic() {
    let mut net = Network::new(3, |c| c);
    net.elect(1);
    let term = net.node(2).term();
    let bad = [
        MessageKind::Append {
            prev_index: 1,
            prev_term: 1,
            entries: vec![ent(7, 1)],
            commit: 99,
        },
        MessageKind::Append {
            prev_index: 1,
            prev_term: 1,
            entries: vec![ent(2, 99)],
            commit: 0,
        },
        MessageKind::Append {
            prev_index: u64::MAX,
            prev_term: 1,
            entries: vec![],
            commit: u64::MAX,
        },
        MessageKind::InstallSnapshot {
            meta: Default::default(),
            offset: 9,
            data: vec![],
            last: true,
        },
        MessageKind::Heartbeat {
            commit: u64::MAX,
            read_ctx: 0,
        },
    ];
    for kind in bad {
        net.node(2).step(Message {
            from: 1,
            to: 2,
            term,
            kind,
        });
    }
    net.node(2).step(Message {
        from: 2,
        to: 2,
        term,
        kind: MessageKind::TimeoutNow,
    });
    net.node(2).step(Message {
        from: 1,
        to: 9,
        term,
        kind: MessageKind::TimeoutNow,
    });
    net.node(1).step(Message {
        from: 2,
        to: 1,
        term,
        kind: MessageKind::AppendResp {
            result: AppendResult::Match(u64::MAX),
        },
    });
    assert!(net.node(2).commit() <= net.node(2).last_index());
    net.stabilize();
    net.tick_all(2);
    assert_eq!(net.node(1).role(), Role::Leader);
    let i = net.propose(1);
    net.stabilize();
    assert_eq!(net.node(2).commit(), i);
}

#[test]
fn s3_8_restart_keeps_term_vote_and_log() {
    let mut net = Network::new(3, |c| c);
    net.elect(1);
    net.propose(1);
    net.stabilize();
    let (term, last) = (net.node(2).term(), net.node(2).last_index());
    net.restart(2);
    assert_eq!(net.node(2).term(), term);
    assert_eq!(net.node(2).last_index(), last);
    assert_eq!(net.node(2).hard_state().vote, 1);
    net.tick_all(2);
    assert_eq!(net.node(2).leader(), Some(1));
}

#[test]
fn s4_2_1_learner_replicates_but_never_votes_or_counts() {
    let mut conf = crate::raft::Configuration::with_voters([1, 2, 3]);
    conf.learners.insert(4);
    let mut net = Network::with_conf(&conf);
    net.elect(1);
    let i = net.propose(1);
    net.stabilize();
    assert_eq!(
        net.node(4).commit(),
        i,
        "the learner receives and applies the log"
    );
    assert_eq!(net.applied[&4].len() as u64, i);
    net.isolate(2);
    net.isolate(3);
    let j = net.propose(1);
    net.stabilize();
    assert_eq!(net.node(4).last_index(), j, "the learner holds the entry");
    assert_eq!(net.node(1).commit(), i, "leader + learner is no quorum");
    // A learner never campaigns, however long it hears nothing.
    net.isolate(4);
    let term = net.node(4).term();
    net.tick_node(4, 100);
    assert_eq!(net.node(4).term(), term);
    assert_eq!(net.node(4).role(), Role::Follower);
}

#[test]
fn committed_entries_handed_out_in_bounded_readies() {
    let mut net = Network::new(1, |c| RaftConfig {
        max_apply_bytes: 1,
        ..c
    });
    net.elect(1);
    for _ in 0..4 {
        net.propose(1);
    }
    let mut sizes = Vec::new();
    while let Some(rd) = net.process(1) {
        if !rd.committed_entries.is_empty() {
            sizes.push(rd.committed_entries.len());
        }
    }
    assert!(sizes.iter().all(|n| *n == 1), "{sizes:?}");
    assert_eq!(net.node(1).applied(), 5);
}

/// Random, often absurd, messages (extreme indexes and terms) never panic a core.
#[test]
fn untrusted_random_messages_never_panic() {
    use rand::{Rng, SeedableRng};
    let mut rng = rand_chacha::ChaCha8Rng::seed_from_u64(99);
    let pick = |rng: &mut rand_chacha::ChaCha8Rng| -> u64 {
        match rng.random_range(0..4) {
            0 => rng.random_range(0..4),
            1 => u64::MAX - rng.random_range(0..2),
            2 => rng.random(),
            _ => rng.random_range(0..30),
        }
    };
    for round in 0..1000 {
        let mut net = Network::new(3, |c| c);
        net.elect(1);
        net.propose(1);
        net.stabilize();
        for _ in 0..20 {
            let to = rng.random_range(1..=3);
            let from = rng.random_range(1..=4);
            let e = |rng: &mut rand_chacha::ChaCha8Rng, i: u64| crate::raft::Entry {
                index: i,
                term: rng.random_range(0..5),
                proposer_term: 0,
                time_ms: 0,
                kind: EntryKind::Noop,
            };
            let kind = match rng.random_range(0..9) {
                0 => MessageKind::PreVote {
                    last_index: pick(&mut rng),
                    last_term: pick(&mut rng),
                },
                1 => MessageKind::Vote {
                    last_index: pick(&mut rng),
                    last_term: pick(&mut rng),
                    transfer: rng.random(),
                },
                2 => {
                    let prev = pick(&mut rng);
                    let n = rng.random_range(0..3);
                    let entries = (0..n)
                        .map(|k| e(&mut rng, prev.wrapping_add(1 + k)))
                        .collect();
                    MessageKind::Append {
                        prev_index: prev,
                        prev_term: pick(&mut rng),
                        entries,
                        commit: pick(&mut rng),
                    }
                }
                3 => MessageKind::AppendResp {
                    result: if rng.random() {
                        AppendResult::Match(pick(&mut rng))
                    } else {
                        AppendResult::Reject {
                            rejected: pick(&mut rng),
                            hint_index: pick(&mut rng),
                            hint_term: pick(&mut rng),
                        }
                    },
                },
                4 => MessageKind::Heartbeat {
                    commit: pick(&mut rng),
                    read_ctx: pick(&mut rng),
                },
                5 => MessageKind::HeartbeatResp {
                    read_ctx: pick(&mut rng),
                },
                6 => MessageKind::InstallSnapshot {
                    meta: crate::raft::SnapshotMeta {
                        index: pick(&mut rng),
                        term: pick(&mut rng),
                        conf: Default::default(),
                        time_ms: 0,
                    },
                    offset: pick(&mut rng),
                    data: vec![0; rng.random_range(0..4)],
                    last: rng.random(),
                },
                7 => MessageKind::SnapshotResp {
                    index: pick(&mut rng),
                    next_offset: pick(&mut rng),
                    reject: rng.random(),
                },
                _ => MessageKind::ReadIndexResp {
                    ctx: pick(&mut rng),
                    index: pick(&mut rng),
                },
            };
            let term = if rng.random() {
                net.node(to).term()
            } else {
                pick(&mut rng)
            };
            net.node(to).step(Message {
                from,
                to,
                term,
                kind,
            });
            for id in 1..=3 {
                net.node(id).tick();
            }
            net.process_all();
            net.queue.clear();
        }
        let _ = round;
    }
}
