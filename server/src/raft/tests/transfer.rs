//! Leader transfer (dissertation §3.10): the leader stops taking proposals, catches the
//! target up, sends TimeoutNow; the target campaigns past pre-vote and leader stickiness.
//! A transfer whose target is gone is aborted after an election timeout.

use super::network::Network;
use crate::raft::{ConfChange, ConfChangeError, MessageKind, ProposeError, Role, TransferError};

#[test]
fn s3_10_transfer_catches_the_target_up_and_hands_over() {
    let mut net = Network::new(3, |c| c);
    net.elect(1);
    let term = net.node(1).term();
    net.isolate(3);
    for _ in 0..5 {
        net.propose(1);
    }
    net.stabilize();
    let last = net.node(1).last_index();
    assert!(net.node(3).last_index() < last);

    net.node(1).transfer_leader(3).unwrap();
    assert_eq!(net.node(1).transferee(), Some(3));
    let term_now = net.node(1).term();
    assert_eq!(
        net.node(1)
            .propose(crate::raft::EntryKind::Noop, term_now, 0),
        Err(ProposeError::TransferInProgress)
    );
    assert_eq!(
        net.conf_change(1, ConfChange::Remove { id: 2 }),
        Err(ConfChangeError::TransferInProgress)
    );
    assert_eq!(
        net.node(1).transfer_leader(2),
        Err(TransferError::InProgress { target: 3 })
    );
    net.stabilize();
    assert!(
        net.sent.iter().all(|m| m.kind != MessageKind::TimeoutNow),
        "no TimeoutNow before the target holds the whole log"
    );

    net.heal();
    net.tick_all(1);
    let timeout_now = net
        .sent
        .iter()
        .position(|m| m.kind == MessageKind::TimeoutNow && m.to == 3)
        .expect("TimeoutNow sent once 3 caught up");
    assert!(
        !net.sent[timeout_now..]
            .iter()
            .any(|m| matches!(m.kind, MessageKind::PreVote { .. })),
        "the target skips pre-vote"
    );
    let leaders = net.leaders();
    assert_eq!(leaders.len(), 1);
    assert_eq!(leaders[0].0, 3, "2 granted its vote though it had a leader");
    assert!(leaders[0].1 > term);
    assert_eq!(net.node(1).role(), Role::Follower);
    assert_eq!(net.node(1).transferee(), None);
    assert!(net.node(3).commit() >= last, "nothing lost");
    let i = net.propose(3);
    net.stabilize();
    assert_eq!(net.node(1).commit(), i);
}

#[test]
fn s3_10_transfer_to_a_crashed_target_is_aborted_after_an_election_timeout() {
    let mut net = Network::new(3, |c| c);
    net.elect(1);
    net.stabilize();
    let term = net.node(1).term();
    net.isolate(3);
    net.propose(1);
    net.stabilize();
    net.node(1).transfer_leader(3).unwrap();
    let election_tick = net.node(1).cfg.election_tick as usize;
    for _ in 0..election_tick - 1 {
        net.tick_all(1);
        assert_eq!(net.node(1).transferee(), Some(3));
        assert_eq!(
            net.node(1).propose(crate::raft::EntryKind::Noop, term, 0),
            Err(ProposeError::TransferInProgress)
        );
    }
    net.tick_all(1);
    assert_eq!(net.node(1).transferee(), None, "aborted");
    assert_eq!(
        net.leaders(),
        vec![(1, term)],
        "still leading in the same term"
    );
    let i = net.propose(1);
    net.stabilize();
    assert_eq!(net.node(1).commit(), i, "takes proposals again");
}

#[test]
fn s3_10_transfer_targets_must_be_other_voters() {
    let mut net = Network::new(3, |c| c);
    net.elect(1);
    net.stabilize();
    assert_eq!(
        net.node(2).transfer_leader(3),
        Err(TransferError::NotLeader {
            leader_hint: Some(1)
        })
    );
    assert_eq!(
        net.node(1).transfer_leader(1),
        Err(TransferError::ToSelf { id: 1 })
    );
    assert_eq!(
        net.node(1).transfer_leader(7),
        Err(TransferError::NotVoter { id: 7 })
    );
    net.conf_change(
        1,
        ConfChange::AddLearner {
            id: 4,
            peer_addr: String::new(),
            client_addr: String::new(),
        },
    )
    .unwrap();
    assert_eq!(
        net.node(1).transfer_leader(4),
        Err(TransferError::NotVoter { id: 4 }),
        "a learner cannot lead"
    );
}

#[test]
fn s3_10_learner_ignores_timeout_now() {
    let mut conf = crate::raft::Configuration::with_voters([1, 2, 3]);
    conf.learners.insert(4);
    let mut net = Network::with_conf(&conf);
    net.elect(1);
    net.stabilize();
    let term = net.node(1).term();
    net.node(4).step(crate::raft::Message {
        from: 1,
        to: 4,
        term,
        kind: MessageKind::TimeoutNow,
    });
    net.stabilize();
    assert_eq!(net.node(4).term(), term);
    assert_eq!(net.leaders(), vec![(1, term)]);
}
