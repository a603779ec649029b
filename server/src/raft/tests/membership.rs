//! Membership changes (dissertation chapter 4, DESIGN §3a.8): learners that catch up and are
//! promoted (§4.2.1), the rules that make single-server changes safe (§4.1: in force when
//! appended, rolled back when truncated, one at a time, and only after the leader's first
//! commit of its term: the 2015 bug), removing the leader (§4.2.2), removed servers that must
//! not disrupt (§4.2.3), recovery, and snapshots carrying the configuration (§5.3).

use std::collections::BTreeSet;

use super::network::Network;
use crate::raft::{
    ConfChange, ConfChangeError, Configuration, EntryKind, MemStorage, Message, MessageKind,
    ProposeError, RaftConfig, Role, Storage,
};

fn add(id: u64) -> ConfChange {
    ConfChange::AddLearner {
        id,
        peer_addr: format!("10.0.0.{id}:7101"),
        client_addr: format!("10.0.0.{id}:7001"),
    }
}

fn set(ids: &[u64]) -> BTreeSet<u64> {
    ids.iter().copied().collect()
}

/// Three voters with a leader (1) that has compacted its log, and node 4 started empty to
/// join (it takes no entries before a snapshot gives it a configuration).
fn three_and_a_joiner(f: impl Fn(RaftConfig) -> RaftConfig + Copy) -> Network {
    let mut net = Network::new(3, f);
    net.add_node(4, MemStorage::new_with_voters([]), f);
    net.elect(1);
    for _ in 0..5 {
        net.propose(1);
    }
    net.stabilize();
    net.snapshot(1);
    net
}

#[test]
fn s4_2_1_learner_catches_up_then_promotion_makes_commit_need_the_new_majority() {
    let mut net = three_and_a_joiner(|c| c);
    net.tick_all(20);
    assert_eq!(
        net.node(4).term(),
        0,
        "a node waiting to join never campaigns"
    );

    let i = net.conf_change(1, add(4)).unwrap();
    assert!(
        net.node(1).conf().learners.contains(&4),
        "in force on the leader once appended, before it commits"
    );
    let rd = net.process(1).unwrap();
    assert_eq!(
        rd.conf.as_ref().map(|c| c.learners.clone()),
        Some(set(&[4])),
        "the Ready tells the driver about the new member"
    );
    net.stabilize();
    net.tick_all(3);
    let last = net.node(1).last_index();
    assert!(net.node(1).commit() >= i);
    assert_eq!(
        net.node(4).commit(),
        last,
        "the learner caught up by snapshot + entries"
    );
    assert_eq!(net.node(1).progress_of(4), Some(last));
    let leader_conf = net.node(1).conf().clone();
    assert_eq!(
        leader_conf.member(4).map(|m| m.client_addr.as_str()),
        Some("10.0.0.4:7001")
    );
    for id in 1..=4 {
        assert_eq!(net.node(id).conf(), &leader_conf, "node {id}");
    }

    net.conf_change(1, ConfChange::Promote { id: 4 }).unwrap();
    net.stabilize();
    for id in 1..=4 {
        assert_eq!(net.node(id).conf().voters, set(&[1, 2, 3, 4]), "node {id}");
    }
    // Four voters: the leader and node 4 are no majority any more...
    net.isolate(2);
    net.isolate(3);
    let j = net.propose(1);
    net.stabilize();
    assert!(net.node(1).commit() < j, "2 of 4 voters do not commit");
    // ...three of them are.
    net.heal();
    net.isolate(2);
    net.tick_all(2);
    assert_eq!(net.node(1).commit(), j, "1, 3 and 4 commit");
    assert_eq!(net.node(4).commit(), j);
}

#[test]
fn s4_2_1_promotion_refused_while_the_learner_is_behind() {
    let mut net = three_and_a_joiner(|c| RaftConfig {
        max_promote_lag: 3,
        ..c
    });
    net.isolate(4);
    net.conf_change(1, add(4)).unwrap();
    for _ in 0..5 {
        net.propose(1);
    }
    net.stabilize();
    let last = net.node(1).last_index();
    assert_eq!(
        net.conf_change(1, ConfChange::Promote { id: 4 }),
        Err(ConfChangeError::LearnerBehind { lag: last, max: 3 })
    );
    assert!(net.node(1).conf().learners.contains(&4));
    net.heal();
    net.tick_all(3);
    assert_eq!(net.node(1).progress_of(4), Some(last));
    net.conf_change(1, ConfChange::Promote { id: 4 }).unwrap();
    net.stabilize();
    assert!(net.node(4).conf().voters.contains(&4));
}

#[test]
fn s4_2_1_learner_that_never_catches_up_is_never_counted_or_promoted() {
    let mut net = three_and_a_joiner(|c| RaftConfig {
        max_promote_lag: 10,
        ..c
    });
    net.isolate(4);
    net.conf_change(1, add(4)).unwrap();
    for round in 0..30 {
        net.propose(1);
        net.tick_all(1);
        let refused = net.conf_change(1, ConfChange::Promote { id: 4 });
        assert!(
            matches!(refused, Err(ConfChangeError::LearnerBehind { max: 10, .. })),
            "round {round}: {refused:?}"
        );
    }
    assert_eq!(net.node(1).progress_of(4), Some(0));
    assert_eq!(net.node(4).last_index(), 0);
    let last = net.node(1).last_index();
    assert_eq!(net.node(1).commit(), last, "the voters commit without it");
    // Leader + learner is no quorum, whatever the learner holds.
    net.isolate(2);
    net.isolate(3);
    let i = net.propose(1);
    net.stabilize();
    assert!(net.node(1).commit() < i);
    assert_eq!(net.node(1).conf().voters, set(&[1, 2, 3]));
}

/// A learner never campaigns and its vote never counts while it is a learner in the
/// candidate's configuration, but it answers vote requests: a candidate that holds the
/// learner's promotion (which the learner has not seen yet) needs that vote. Here leader 1
/// promotes 4, only 2 gets the entry, and 1 crashes: 2 needs 3 of {1, 2, 3, 4}, and 3 cannot
/// win (2's log is ahead of 3's).
#[test]
fn s4_2_1_a_promoted_learner_votes_before_it_sees_its_promotion() {
    let mut conf = Configuration::with_voters([1, 2, 3]);
    conf.apply(&add(4));
    let mut net = Network::with_conf(&conf);
    net.elect(1);
    net.propose(1);
    net.stabilize();
    net.cut.insert((1, 3));
    net.cut.insert((1, 4));
    net.conf_change(1, ConfChange::Promote { id: 4 }).unwrap();
    net.stabilize();
    assert_eq!(net.node(2).conf().voters, set(&[1, 2, 3, 4]));
    assert_eq!(net.node(4).conf().learners, set(&[4]), "4 has not seen it");
    net.isolate(1);
    net.tick_all(60);
    let leaders: Vec<u64> = net
        .leaders()
        .into_iter()
        .map(|l| l.0)
        .filter(|l| *l != 1)
        .collect();
    assert_eq!(leaders, vec![2], "elected with the votes of 3 and 4");
    assert!(net.node(4).conf().voters.contains(&4));
}

#[test]
fn s4_1_one_change_at_a_time() {
    let mut net = Network::new(3, |c| c);
    net.elect(1);
    let term = net.node(1).term();
    assert_eq!(
        net.node(1)
            .propose(EntryKind::Config(ConfChange::Remove { id: 3 }), term, 0),
        Err(ProposeError::ConfigEntry),
        "configuration entries only through propose_conf_change"
    );
    net.isolate(2);
    net.isolate(3);
    let i = net.conf_change(1, add(4)).unwrap();
    assert_eq!(net.node(1).pending_conf_index(), Some(i));
    assert_eq!(
        net.conf_change(1, add(5)),
        Err(ConfChangeError::ChangeInProgress)
    );
    assert_eq!(
        net.conf_change(1, ConfChange::Remove { id: 3 }),
        Err(ConfChangeError::ChangeInProgress)
    );
    assert_eq!(
        net.conf_change(2, add(5)),
        Err(ConfChangeError::NotLeader {
            leader_hint: Some(1)
        })
    );
    net.heal();
    net.tick_all(2);
    assert_eq!(net.node(1).pending_conf_index(), None);
    assert_eq!(
        net.conf_change(1, add(4)),
        Err(ConfChangeError::AlreadyMember { id: 4 })
    );
    assert_eq!(
        net.conf_change(1, ConfChange::Promote { id: 2 }),
        Err(ConfChangeError::NotLearner { id: 2 })
    );
    assert_eq!(
        net.conf_change(1, ConfChange::Remove { id: 9 }),
        Err(ConfChangeError::UnknownMember { id: 9 })
    );
    net.conf_change(1, add(5)).unwrap();
    net.stabilize();
    assert_eq!(net.node(3).conf().learners, set(&[4, 5]));
}

#[test]
fn s4_1_a_lone_voter_cannot_remove_itself() {
    let mut net = Network::new(1, |c| c);
    net.elect(1);
    net.stabilize();
    assert_eq!(
        net.conf_change(1, ConfChange::Remove { id: 1 }),
        Err(ConfChangeError::RemovingLastVoter { id: 1 })
    );
}

/// The 2015 single-server-change bug (Ongaro, raft-dev, "bug in single-server membership
/// changes"): leader 1 of voters {1,2,3,4} appends a change (promote learner 5) that only it
/// holds; a new leader elected by the old configuration must not append its own change
/// (remove a voter) before an entry of its term commits, or the two changes' quorums need
/// not overlap and a committed change could be lost when 1 returns.
#[test]
fn s4_1_no_change_before_the_new_leaders_first_commit_2015_bug() {
    let mut conf = Configuration::with_voters([1, 2, 3, 4]);
    conf.apply(&add(5));
    let mut net = Network::with_conf(&conf);
    net.elect(1);
    net.propose(1);
    net.stabilize();
    net.isolate(1);
    let c1 = net.conf_change(1, ConfChange::Promote { id: 5 }).unwrap();
    net.stabilize();
    assert_eq!(net.node(1).conf().voters, set(&[1, 2, 3, 4, 5]));

    // A new leader among 2, 3, 4 whose no-op cannot commit yet (acks are lost).
    net.filter = Some(Box::new(|m: Message| {
        (!matches!(m.kind, MessageKind::AppendResp { .. })).then_some(m)
    }));
    net.tick_all(40);
    let leaders: Vec<(u64, u64)> = net.leaders().into_iter().filter(|l| l.0 != 1).collect();
    assert_eq!(leaders.len(), 1, "{leaders:?}");
    let (l2, t2) = leaders[0];
    let victim = *[4, 3, 2].iter().find(|v| **v != l2).unwrap();
    assert_eq!(
        net.conf_change(l2, ConfChange::Remove { id: victim }),
        Err(ConfChangeError::NoCommitInTerm)
    );
    net.filter = None;
    net.tick_all(2);
    let c2 = net
        .conf_change(l2, ConfChange::Remove { id: victim })
        .unwrap();
    assert_eq!(
        net.node(l2).raft_log().term(c1),
        Ok(t2),
        "the new leader's no-op took the index of 1's change"
    );
    net.tick_all(2);
    assert_eq!(
        net.node(l2).commit(),
        c2,
        "committed by 2 of the 3 remaining voters"
    );

    net.heal();
    net.tick_all(30);
    assert_eq!(net.leaders(), vec![(l2, t2)]);
    let expected = net.node(l2).conf().clone();
    assert_eq!(expected.voters.len(), 3);
    assert_eq!(expected.learners, set(&[5]));
    for id in 1..=5 {
        assert_eq!(net.node(id).conf(), &expected, "node {id}");
        assert!(net.node(id).commit() >= c2);
    }
    assert!(
        !net.node(1).conf().voters.contains(&5),
        "1's uncommitted promotion was truncated and rolled back"
    );
}

#[test]
fn s4_1_truncated_change_rolls_back_a_followers_configuration_and_restart_replays_the_log() {
    let mut net = Network::new(5, |c| c);
    net.elect(1);
    net.stabilize();
    let base = net.node(2).conf().clone();
    for to in [3, 4, 5] {
        net.cut.insert((1, to));
    }
    let i = net.conf_change(1, add(9)).unwrap();
    net.stabilize();
    assert!(
        net.node(2).conf().learners.contains(&9),
        "in force when appended"
    );
    assert!(net.node(2).commit() < i);
    // Recovery: the stored configuration plus the log's configuration entries.
    net.restart(2);
    assert!(
        net.node(2).conf().learners.contains(&9),
        "replayed from the log"
    );

    // 3, 4 and 5 elect a leader without the entry; its no-op takes index i.
    net.heal();
    net.isolate(1);
    net.isolate(2);
    net.tick_all(40);
    let leader = net.leaders().into_iter().find(|l| l.0 > 2).unwrap().0;
    net.tick_all(1);
    assert_ne!(
        net.node(leader).raft_log().term(i),
        net.node(2).raft_log().term(i)
    );
    net.cut.retain(|(a, b)| *a == 1 || *b == 1);
    net.tick_all(3);
    assert_eq!(net.node(2).leader(), Some(leader));
    assert_eq!(
        net.node(2).conf(),
        &base,
        "rolled back: entry {i} was truncated"
    );
    net.restart(2);
    assert_eq!(net.node(2).conf(), &base);
}

/// §4.2.2: the leader removing itself keeps leading (replicating, not counting itself) until
/// the new configuration commits, then steps down; the others go on without it.
#[test]
fn s4_2_2_removing_the_leader() {
    let mut net = Network::new(3, |c| c);
    net.elect(1);
    net.stabilize();
    let term = net.node(1).term();
    net.filter = Some(Box::new(|m: Message| {
        let ack_from_3 = m.from == 3 && matches!(m.kind, MessageKind::AppendResp { .. });
        (!ack_from_3).then_some(m)
    }));
    let i = net.conf_change(1, ConfChange::Remove { id: 1 }).unwrap();
    let j = net.propose(1);
    net.stabilize();
    assert_eq!(net.node(1).conf().voters, set(&[2, 3]));
    assert_eq!(
        net.node(1).role(),
        Role::Leader,
        "leads until the removal commits"
    );
    assert!(
        net.node(1).commit() < i,
        "1 and 2 hold it, but 1 no longer counts: 2 and 3 must both"
    );
    assert_eq!(net.node(2).last_index(), j, "still replicating");

    net.filter = None;
    let sent_before = net.sent.len();
    net.tick_node(1, 1);
    assert_ne!(
        net.node(1).role(),
        Role::Leader,
        "stepped down once committed"
    );
    let successor = net.leaders();
    assert_eq!(
        successor.len(),
        1,
        "TimeoutNow handed over at once: {successor:?}"
    );
    let (leader, new_term) = successor[0];
    assert!(leader != 1 && new_term > term);
    assert!(net.node(leader).commit() >= j);

    net.tick_all(50);
    assert_eq!(net.leaders(), vec![(leader, new_term)]);
    assert!(
        net.sent[sent_before..].iter().all(|m| m.from != 1
            || !matches!(
                m.kind,
                MessageKind::PreVote { .. } | MessageKind::Vote { .. }
            )),
        "the removed leader never campaigns"
    );
    let k = net.propose(leader);
    net.stabilize();
    for id in [2, 3] {
        assert_eq!(net.node(id).commit(), k);
    }
}

#[test]
fn s4_2_3_removed_server_that_knows_never_campaigns() {
    let mut net = Network::new(3, |c| c);
    net.elect(1);
    net.stabilize();
    net.conf_change(1, ConfChange::Remove { id: 3 }).unwrap();
    net.stabilize();
    assert_eq!(net.node(3).conf().voters, set(&[1, 2]));
    net.isolate(3);
    let (term, sent) = (net.node(3).term(), net.sent.len());
    net.tick_node(3, 100);
    assert_eq!(net.node(3).term(), term);
    assert!(net.sent[sent..].iter().all(|m| m.from != 3));
}

#[test]
fn s4_2_3_removed_server_that_does_not_know_cannot_disrupt_with_pre_vote() {
    let mut net = Network::new(3, |c| c);
    net.elect(1);
    net.stabilize();
    net.isolate(3);
    let i = net.conf_change(1, ConfChange::Remove { id: 3 }).unwrap();
    net.stabilize();
    assert_eq!(net.node(1).commit(), i, "committed by 1 and 2");
    assert!(net.node(3).conf().voters.contains(&3), "3 never heard");
    let term = net.node(1).term();
    net.heal();
    for _ in 0..100 {
        net.tick_all(1);
        assert_eq!(net.leaders(), vec![(1, term)]);
    }
    assert_eq!(
        net.node(3).term(),
        term,
        "its pre-votes fail; its term stays"
    );
    // The leader no longer talks to it: it never learns, and never matters.
    assert_eq!(net.node(1).progress_of(3), None);
}

/// §5.3 and DESIGN §3a.8: a snapshot carries the configuration as of its index, and a
/// follower restored from it takes that configuration (then the entries after it).
#[test]
fn s5_3_snapshots_carry_the_configuration() {
    let mut net = three_and_a_joiner(|c| c);
    net.isolate(3);
    net.conf_change(1, add(4)).unwrap();
    net.tick_all(3);
    net.conf_change(1, ConfChange::Promote { id: 4 }).unwrap();
    net.tick_all(2);
    let snap_index = net.snapshot(1);
    let meta = net.node(1).store().snapshot_meta().unwrap();
    assert_eq!(meta.index, snap_index);
    assert_eq!(
        meta.conf.voters,
        set(&[1, 2, 3, 4]),
        "as of the snapshot index"
    );
    assert_eq!(
        meta.conf.member(4).map(|m| m.peer_addr.as_str()),
        Some("10.0.0.4:7101")
    );
    let before = net.node(3).conf().clone();
    assert_eq!(before.voters, set(&[1, 2, 3]));
    net.heal();
    net.tick_all(3);
    let installed = net.node(3).store().snapshot_meta().unwrap();
    assert_eq!(
        installed.index, snap_index,
        "3 was restored from the snapshot"
    );
    assert_eq!(net.node(3).conf(), &meta.conf);
    net.restart(3);
    assert_eq!(
        net.node(3).conf(),
        &meta.conf,
        "and recovers it from storage"
    );
}
