//! Snapshots (§5.3): chunked InstallSnapshot to a lagging follower after log compaction,
//! lost chunks, and DESIGN §3a.10 (a snapshot at or below commit, or already in the log, is
//! not installed).

use super::network::{ent, store_with, Network};
use crate::raft::{AppendResult, Message, MessageKind, RaftConfig, SnapshotMeta, Storage};

/// Cluster of 3 where node 3 missed 20 entries, then the leader compacted them away.
fn lagging_follower(chunk: u64) -> (Network, Vec<u8>) {
    let mut net = Network::new(3, |c| RaftConfig {
        max_size_per_msg: chunk,
        ..c
    });
    net.elect(1);
    net.isolate(3);
    for _ in 0..20 {
        net.propose(1);
    }
    net.stabilize();
    let applied = net.node(1).applied();
    assert_eq!(applied, 21);
    let data: Vec<u8> = (0..100u8).collect();
    let store = net.node(1).store_mut();
    store.create_snapshot(applied - 2, data.clone());
    store.compact(applied - 2);
    (net, data)
}

#[test]
fn s5_3_snapshot_installed_on_lagging_follower_in_chunks() {
    let (mut net, data) = lagging_follower(16);
    net.sent.clear();
    net.heal();
    net.tick_all(3);
    let chunks = net
        .sent
        .iter()
        .filter(|m| matches!(m.kind, MessageKind::InstallSnapshot { .. }))
        .count();
    assert_eq!(chunks, 7, "100 bytes in 16-byte chunks");
    let snap = net.node(3).store().snapshot_meta().unwrap();
    assert_eq!(snap.index, 19);
    assert_eq!(net.node(3).store().snapshot_data(), &data[..]);
    assert_eq!(
        net.node(3).commit(),
        21,
        "caught up with entries after the snapshot"
    );
    assert_eq!(net.node(3).applied(), 21);
    let tail: Vec<u64> = net.applied[&3].iter().map(|e| e.index).collect();
    assert_eq!(
        tail,
        vec![1, 20, 21],
        "applied no-op, then the snapshot, then 20..=21"
    );
}

#[test]
fn s5_3_lost_snapshot_chunk_is_resent() {
    let (mut net, data) = lagging_follower(16);
    let mut dropped = false;
    net.filter = Some(Box::new(move |m: Message| {
        if let MessageKind::InstallSnapshot { offset: 32, .. } = m.kind {
            if !dropped {
                dropped = true;
                return None;
            }
        }
        Some(m)
    }));
    net.heal();
    net.tick_all(10);
    assert_eq!(net.node(3).store().snapshot_data(), &data[..]);
    assert_eq!(net.node(3).commit(), 21);
}

#[test]
fn s3a_10_snapshot_at_or_below_commit_not_installed() {
    let v = [1, 2];
    let entries: Vec<_> = (1..=5).map(|i| ent(i, 1)).collect();
    let mut net = Network::with_stores(
        vec![store_with(&v, &entries, 1), store_with(&v, &entries, 1)],
        |c| c,
    );
    net.node(2).step(Message {
        from: 1,
        to: 2,
        term: 1,
        kind: MessageKind::Heartbeat {
            commit: 5,
            read_ctx: 0,
        },
    });
    net.process(2);
    net.node(2).step(Message {
        from: 1,
        to: 2,
        term: 1,
        kind: MessageKind::InstallSnapshot {
            meta: SnapshotMeta {
                index: 3,
                term: 1,
                conf: Default::default(),
                time_ms: 0,
            },
            offset: 0,
            data: vec![1, 2, 3],
            last: true,
        },
    });
    let rd = net.node(2).ready();
    assert!(rd.snapshot.is_none());
    assert!(rd.messages.iter().any(|m| m.kind
        == MessageKind::AppendResp {
            result: AppendResult::Match(5)
        }));
}

#[test]
fn s3a_10_snapshot_already_in_log_advances_commit_only() {
    let v = [1, 2];
    let entries: Vec<_> = (1..=5).map(|i| ent(i, 1)).collect();
    let mut net = Network::with_stores(
        vec![store_with(&v, &entries, 1), store_with(&v, &entries, 1)],
        |c| c,
    );
    for (offset, last) in [(0, false), (2, true)] {
        net.node(2).step(Message {
            from: 1,
            to: 2,
            term: 1,
            kind: MessageKind::InstallSnapshot {
                meta: SnapshotMeta {
                    index: 4,
                    term: 1,
                    conf: Default::default(),
                    time_ms: 0,
                },
                offset,
                data: vec![1, 2],
                last,
            },
        });
    }
    let rd = net.node(2).ready();
    assert!(rd.snapshot.is_none(), "(4, 1) is in the log: not installed");
    assert_eq!(net.node(2).commit(), 4);
    assert_eq!(rd.committed_entries.len(), 4);
    assert_eq!(net.node(2).last_index(), 5, "the log suffix is kept");
}

#[test]
fn s5_3_chunk_at_wrong_offset_is_refused() {
    let v = [1, 2];
    let mut net = Network::with_stores(vec![store_with(&v, &[], 1), store_with(&v, &[], 1)], |c| c);
    net.node(2).step(Message {
        from: 1,
        to: 2,
        term: 1,
        kind: MessageKind::InstallSnapshot {
            meta: SnapshotMeta {
                index: 9,
                term: 1,
                conf: Default::default(),
                time_ms: 0,
            },
            offset: 5,
            data: vec![1],
            last: true,
        },
    });
    let rd = net.node(2).ready();
    assert!(rd.snapshot.is_none());
    assert!(rd.messages.iter().any(|m| m.kind
        == MessageKind::SnapshotResp {
            index: 9,
            next_offset: 0,
            reject: true
        }));
}

#[test]
fn s3a_12_entry_time_survives_compaction() {
    let mut net = Network::new(1, |c| c);
    net.elect(1);
    net.node(1)
        .propose(crate::raft::EntryKind::Noop, 1, 700)
        .unwrap();
    net.stabilize();
    let store = net.node(1).store_mut();
    store.create_snapshot(2, vec![]);
    store.compact(2);
    assert_eq!(net.node(1).last_entry_time(), 700);
    net.restart(1);
    net.elect(1);
    net.stabilize();
    assert_eq!(
        net.applied[&1].last().map(|e| (e.index, e.time_ms)),
        Some((3, 700))
    );
}

#[test]
fn s5_3_crash_in_the_middle_of_installing_a_snapshot() {
    let (mut net, data) = lagging_follower(16);
    net.heal();
    // Let three chunks reach node 3, then crash it: its staged chunks are lost.
    let mut chunks_seen = 0;
    for _ in 0..500 {
        net.process_all();
        let Some(m) = net.queue.front() else {
            net.node(1).tick();
            continue;
        };
        if m.to == 3 && matches!(m.kind, MessageKind::InstallSnapshot { .. }) {
            chunks_seen += 1;
            if chunks_seen > 3 {
                break;
            }
        }
        net.deliver_one();
    }
    net.queue.clear();
    assert!(chunks_seen > 3, "transfer under way");
    assert!(
        net.node(3).store().snapshot_meta().unwrap().index == 0,
        "nothing installed yet"
    );
    net.restart(3);
    net.tick_all(10);
    assert_eq!(
        net.node(3).store().snapshot_data(),
        &data[..],
        "transfer restarted and completed"
    );
    assert_eq!(net.node(3).commit(), 21);
}
