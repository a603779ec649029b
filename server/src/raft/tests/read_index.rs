//! ReadIndex (§6.4): the new-leader rule, batching, forwarding from followers, and a
//! partitioned leader that cannot confirm its leadership.

use super::network::Network;
use crate::raft::{Message, MessageKind, ReadIndexError, ReadState};

fn read_rounds(net: &Network) -> usize {
    let ctxs: std::collections::BTreeSet<u64> = net
        .sent
        .iter()
        .filter_map(|m| match m.kind {
            MessageKind::Heartbeat { read_ctx, .. } if read_ctx != 0 => Some(read_ctx),
            _ => None,
        })
        .collect();
    ctxs.len()
}

#[test]
fn s6_4_read_index_needs_current_term_commit() {
    let mut net = Network::new(3, |c| c);
    // The new leader's no-op cannot commit: followers' acks are lost.
    net.filter = Some(Box::new(|m: Message| {
        (!matches!(m.kind, MessageKind::AppendResp { .. })).then_some(m)
    }));
    net.elect(1);
    assert_eq!(net.node(1).commit(), 0);
    net.node(1).read_index(7).unwrap();
    net.tick_all(3);
    assert!(
        net.read_states.get(&1).is_none_or(|r| r.is_empty()),
        "no read before a commit of the term"
    );
    assert_eq!(net.node(1).pending_reads(), 1);
    net.filter = None;
    net.tick_all(2);
    assert_eq!(net.read_states[&1], vec![ReadState { ctx: 7, index: 1 }]);
}

#[test]
fn s6_4_read_index_batched_into_one_round() {
    let mut net = Network::new(3, |c| c);
    net.elect(1);
    let i = net.propose(1);
    net.stabilize();
    net.sent.clear();
    for ctx in 1..=3 {
        net.node(1).read_index(ctx).unwrap();
    }
    // Arrives while the first round is in flight: joins the next one.
    net.process_all();
    net.node(1).read_index(4).unwrap();
    net.stabilize();
    assert_eq!(read_rounds(&net), 2);
    let got: Vec<ReadState> = net.read_states[&1].clone();
    let want: Vec<ReadState> = (1..=4).map(|ctx| ReadState { ctx, index: i }).collect();
    assert_eq!(got, want);
}

#[test]
fn s6_4_read_index_is_commit_at_request_time() {
    let mut net = Network::new(3, |c| c);
    net.elect(1);
    for _ in 0..5 {
        net.propose(1);
    }
    net.stabilize();
    let commit = net.node(1).commit();
    net.node(1).read_index(9).unwrap();
    net.stabilize();
    assert_eq!(
        net.read_states[&1],
        vec![ReadState {
            ctx: 9,
            index: commit
        }]
    );
}

#[test]
fn s6_4_follower_forwards_read_index_to_leader() {
    let mut net = Network::new(3, |c| c);
    net.elect(1);
    let i = net.propose(1);
    net.stabilize();
    net.node(2).read_index(42).unwrap();
    net.stabilize();
    assert_eq!(net.read_states[&2], vec![ReadState { ctx: 42, index: i }]);
    assert!(net.read_states.get(&1).is_none_or(|r| r.is_empty()));
}

#[test]
fn s6_4_follower_without_leader_refuses() {
    let mut net = Network::new(3, |c| c);
    assert_eq!(net.node(2).read_index(1), Err(ReadIndexError::NoLeader));
}

#[test]
fn s6_4_partitioned_leader_cannot_serve_reads() {
    let mut net = Network::new(3, |c| c);
    net.elect(1);
    net.isolate(1);
    net.node(1).read_index(5).unwrap();
    net.tick_all(30);
    assert!(
        net.read_states.get(&1).is_none_or(|r| r.is_empty()),
        "a deposed leader answers no read"
    );
}

#[test]
fn s6_4_single_voter_reads_at_once() {
    let mut net = Network::new(1, |c| c);
    net.elect(1);
    net.node(1).read_index(3).unwrap();
    net.stabilize();
    assert_eq!(net.read_states[&1], vec![ReadState { ctx: 3, index: 1 }]);
}
