//! Leader election (§3.4), the election restriction (§3.6.1), pre-vote (§9.6), check-quorum
//! and leader stickiness (§6.2, §4.2.3), persist-before-send (§3a.1) and determinism.

use super::network::{ent, store_with, Network};
use crate::raft::{Message, MessageKind, Role};

#[test]
fn s3_4_three_nodes_elect_one_leader_by_timeout() {
    let mut net = Network::new(3, |c| c);
    net.tick_all(25);
    let leaders = net.leaders();
    assert_eq!(leaders.len(), 1, "{leaders:?}");
    let (leader, term) = leaders[0];
    for n in net.nodes.values() {
        assert_eq!(n.term(), term);
        assert_eq!(n.leader(), Some(leader));
    }
}

#[test]
fn s3_4_five_nodes_elect_one_leader_and_commit_its_noop() {
    let mut net = Network::new(5, |c| c);
    net.tick_all(25);
    let leaders = net.leaders();
    assert_eq!(leaders.len(), 1);
    for n in net.nodes.values() {
        assert_eq!(n.commit(), 1, "the new leader's no-op commits everywhere");
    }
    for a in net.applied.values() {
        assert_eq!(a.len(), 1);
    }
}

#[test]
fn s3_4_leader_election_one_vote_per_term() {
    let mut net = Network::new(3, |c| crate::raft::RaftConfig {
        pre_vote: false,
        ..c
    });
    // 1 and 2 campaign in the same term; 3 hears 1 first.
    net.node(1).campaign(false, false);
    net.node(2).campaign(false, false);
    net.process_all();
    while net.deliver_one() {}
    net.process_all();
    while net.deliver_one() {}
    net.stabilize();
    let leaders = net.leaders();
    assert!(
        leaders.len() <= 1,
        "at most one leader per term: {leaders:?}"
    );
    let votes: Vec<u64> = net.nodes.values().map(|n| n.hard_state().vote).collect();
    assert_eq!(
        votes[2], 1,
        "3 voted once, for the first candidate it heard"
    );
    // Further vote requests in the same term from 2 are refused.
    let term = net.node(3).term();
    net.node(3).step(Message {
        from: 2,
        to: 3,
        term,
        kind: MessageKind::Vote {
            last_index: 9,
            last_term: 9,
            transfer: false,
        },
    });
    let rd = net.node(3).ready();
    assert!(rd
        .messages
        .iter()
        .all(|m| m.kind == MessageKind::VoteResp { reject: true }));
}

/// §3.3: "If a server receives a request with a stale term number, it rejects the
/// request", answering with its current term (which the candidate then adopts, as it does
/// from any message of a newer term).
#[test]
fn s3_3_a_stale_vote_request_is_answered_with_the_current_term() {
    let mut net = Network::new(3, |c| crate::raft::RaftConfig {
        pre_vote: false,
        ..c
    });
    net.tick_all(25);
    let (leader, term) = net.leaders()[0];
    let follower = (1..=3).find(|&id| id != leader).expect("a follower");
    net.node(follower).step(Message {
        from: 9,
        to: follower,
        term: term - 1,
        kind: MessageKind::Vote {
            last_index: 100,
            last_term: term - 1,
            transfer: false,
        },
    });
    let rd = net.node(follower).ready();
    let answer: Vec<&Message> = rd.messages.iter().filter(|m| m.to == 9).collect();
    assert_eq!(answer.len(), 1, "{:?}", rd.messages);
    assert_eq!(answer[0].kind, MessageKind::VoteResp { reject: true });
    assert_eq!(answer[0].term, term);
    net.node(follower).advance(&rd);
}

#[test]
fn s3_4_randomized_timeout_in_range_and_seeded() {
    let mut net = Network::new(1, |c| c);
    let mut seen = std::collections::BTreeSet::new();
    for _ in 0..200 {
        let t = net.node(1).randomized_timeout;
        assert!((10..20).contains(&t), "{t}");
        seen.insert(t);
        let term = net.node(1).term();
        net.node(1).become_follower(term, None);
    }
    assert!(seen.len() > 5, "timeouts should spread: {seen:?}");
}

#[test]
fn s3_6_1_candidate_with_stale_log_is_refused() {
    let v = [1, 2, 3];
    let stores = vec![
        store_with(&v, &[ent(1, 1)], 1),
        store_with(&v, &[ent(1, 1), ent(2, 2)], 2),
        store_with(&v, &[ent(1, 1), ent(2, 2)], 2),
    ];
    let mut net = Network::with_stores(stores, |c| c);
    net.campaign(1);
    assert_ne!(net.node(1).role(), Role::Leader);
    net.elect(2);
}

#[test]
fn s9_6_prevote_partitioned_node_does_not_disrupt() {
    let mut net = Network::new(3, |c| c);
    net.elect(1);
    let term = net.node(1).term();
    net.isolate(3);
    // 3 times out over and over while partitioned: pre-vote keeps its term.
    for _ in 0..100 {
        net.node(3).tick();
        net.stabilize();
    }
    assert_eq!(net.node(3).term(), term, "pre-vote fails, term not raised");
    net.heal();
    net.tick_all(3);
    assert_eq!(net.node(1).role(), Role::Leader);
    assert_eq!(
        net.node(1).term(),
        term,
        "rejoining node did not depose the leader"
    );
    assert_eq!(net.node(3).leader(), Some(1));
}

#[test]
fn s9_6_without_prevote_rejoining_node_with_higher_term_is_ignored_by_sticky_followers() {
    let mut net = Network::new(3, |c| crate::raft::RaftConfig {
        pre_vote: false,
        ..c
    });
    net.elect(1);
    let term = net.node(1).term();
    net.isolate(3);
    net.tick_node(3, 40);
    assert!(
        net.node(3).term() > term,
        "without pre-vote the isolated node's term grows"
    );
    net.heal();
    // 3's vote requests reach 2 while 2 has heard from leader 1 within the timeout.
    net.tick_node(3, 20);
    assert_eq!(
        net.node(2).leader(),
        Some(1),
        "follower 2 stuck with its leader"
    );
    assert_eq!(net.node(2).term(), term);
}

#[test]
fn s6_2_check_quorum_partitioned_leader_steps_down_and_cannot_commit() {
    let mut net = Network::new(3, |c| c);
    net.elect(1);
    let old_term = net.node(1).term();
    net.isolate(1);
    let idx = net.propose(1);
    net.stabilize();
    assert!(net.node(1).commit() < idx, "no quorum: not committed");
    net.tick_all(30);
    assert_ne!(
        net.node(1).role(),
        Role::Leader,
        "check-quorum deposed the old leader"
    );
    let leaders = net.leaders();
    assert_eq!(leaders.len(), 1);
    assert_ne!(leaders[0].0, 1);
    net.heal();
    net.tick_all(5);
    let new_leader = net.leaders()[0].0;
    assert_eq!(net.node(1).leader(), Some(new_leader));
    assert_ne!(
        net.node(1).raft_log().term(idx),
        Ok(old_term),
        "uncommitted entry replaced"
    );
    assert!(net.node(1).commit() >= idx);
    assert!(net.applied[&1]
        .iter()
        .all(|e| (e.index, e.term) != (idx, old_term)));
}

#[test]
fn s3a_1_vote_grant_only_after_persistence() {
    let mut net = Network::new(3, |c| crate::raft::RaftConfig {
        pre_vote: false,
        ..c
    });
    net.node(1).campaign(false, false);
    let rd = net.node(1).ready();
    assert!(
        rd.early_messages.is_empty(),
        "vote requests wait for the new term"
    );
    assert!(rd.hard_state.is_some_and(|h| h.term == 1 && h.vote == 1));
    assert_eq!(rd.messages.len(), 2);
    net.node(1).advance(&rd);
    let req = rd.messages.into_iter().find(|m| m.to == 2).unwrap();
    net.node(2).step(req);
    let rd2 = net.node(2).ready();
    assert!(rd2.early_messages.is_empty());
    assert!(
        rd2.hard_state.is_some_and(|h| h.term == 1 && h.vote == 1),
        "vote persisted"
    );
    assert!(rd2
        .messages
        .iter()
        .any(|m| m.kind == MessageKind::VoteResp { reject: false }));
}

#[test]
fn s10_2_1_only_leader_appends_may_precede_persistence() {
    let mut net = Network::new(3, |c| c);
    net.elect(1);
    net.propose(1);
    let rd = net.node(1).ready();
    assert!(!rd.entries.is_empty());
    assert!(!rd.early_messages.is_empty());
    assert!(rd
        .early_messages
        .iter()
        .all(|m| matches!(m.kind, MessageKind::Append { .. }) && m.from == 1));
    net.node(1).advance(&rd);
    for m in rd.early_messages {
        net.node(m.to).step(m);
    }
    for id in [2, 3] {
        let rd = net.node(id).ready();
        assert!(
            rd.early_messages.is_empty(),
            "followers never send before persisting"
        );
        assert!(rd
            .messages
            .iter()
            .any(|m| matches!(m.kind, MessageKind::AppendResp { .. })));
        assert!(!rd.entries.is_empty());
    }
}

#[test]
fn determinism_same_seed_same_ready_sequence() {
    let run = || {
        let mut net = Network::new(5, |c| c);
        net.tick_all(30);
        let leader = net.leaders()[0].0;
        for _ in 0..5 {
            net.propose(leader);
        }
        net.isolate(leader);
        net.tick_all(40);
        net.heal();
        net.tick_all(10);
        net.trace
    };
    let a = run();
    let b = run();
    assert!(!a.is_empty());
    assert_eq!(a, b);
}

#[test]
fn s9_6_prevote_alone_protects_a_healthy_leader() {
    let mut net = Network::new(3, |c| crate::raft::RaftConfig {
        check_quorum: false,
        ..c
    });
    net.elect(1);
    let term = net.node(1).term();
    net.isolate(3);
    net.tick_node(3, 50);
    net.heal();
    net.node(3).campaign(true, false);
    net.stabilize();
    net.tick_all(3);
    assert_eq!(net.node(1).role(), Role::Leader);
    assert_eq!(
        net.node(1).term(),
        term,
        "followers in contact with the leader refuse pre-votes"
    );
}
