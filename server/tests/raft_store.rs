//! The redb-backed Raft storage (`storage::RaftStore`): log reads and writes, hard state
//! across reopen, snapshots (dump, chunked transfer, staging, atomic install, Figure 5.3),
//! compaction with a margin, crash safety with a backend that loses unsynced writes, and a
//! single-voter core driven through propose → ready → persist → advance.

use lockd_protocol::{AcquireOp, CreateOp, ReadOp, Reply, SessionId, SessionSeq, WriteOp};
use lockd_server::fsm::{self, Command};
use lockd_server::raft::{
    Configuration, Entry, EntryKind, HardState, Raft, RaftConfig, Role, Snapshot, Storage as _,
    StorageError as RaftError,
};
use lockd_server::storage::backend::LossyBackend;
use lockd_server::storage::{snapshot, FsmView, PersistInput, RaftStore, StageOutcome, Storage};

fn open(backend: &LossyBackend, retain: u64) -> RaftStore {
    let storage = Storage::with_backend(backend.clone(), retain).expect("open storage");
    RaftStore::open(storage).expect("open raft store")
}

fn new_store(retain: u64) -> (LossyBackend, RaftStore) {
    let backend = LossyBackend::new();
    let mut store = open(&backend, retain);
    store
        .bootstrap(Configuration::with_voters([1, 2, 3]))
        .expect("bootstrap");
    (backend, store)
}

fn entry(index: u64, term: u64, kind: EntryKind) -> Entry {
    Entry {
        index,
        term,
        proposer_term: term,
        time_ms: index * 10,
        kind,
    }
}

fn noop(index: u64, term: u64) -> Entry {
    entry(index, term, EntryKind::Noop)
}

fn write(session: u64, seq: u64, op: WriteOp) -> EntryKind {
    EntryKind::Command(Command::Write {
        session: SessionSeq {
            session: SessionId(session),
            seq,
            floor: seq,
        },
        op,
        fence: None,
    })
}

fn open_session() -> EntryKind {
    EntryKind::Command(Command::OpenSession {
        ttl_ms: 10_000,
        tick_ms: 100,
        drift_ppm: 1000,
        implicit: false,
    })
}

fn create(path: &str, ephemeral: bool) -> WriteOp {
    WriteOp::Create(CreateOp {
        path: path.into(),
        data: path.as_bytes().to_vec(),
        ephemeral,
        sequential: false,
    })
}

fn acquire(lock: &str) -> WriteOp {
    WriteOp::Acquire(AcquireOp {
        lock: lock.into(),
        value: b"v".to_vec(),
        try_only: false,
        timeout_ms: None,
        lock_delay_ms: Some(1000),
    })
}

/// Entries 1..=7 of term 1 touching every fsm table: sessions 1 and 2, nodes, an ephemeral,
/// a held lock with a waiter, dedup records and events.
fn workload() -> Vec<Entry> {
    vec![
        entry(1, 1, open_session()),
        entry(2, 1, open_session()),
        entry(3, 1, write(1, 1, create("/a", false))),
        entry(4, 1, write(1, 2, create("/a/e", true))),
        entry(5, 1, write(1, 3, acquire("l"))),
        entry(6, 1, write(2, 1, acquire("l"))),
        noop(7, 1),
    ]
}

fn persist(store: &mut RaftStore, entries: &[Entry], commit: &[Entry]) {
    let hs = HardState {
        term: entries.last().map_or(1, |e| e.term),
        vote: 1,
        commit: commit.last().map_or(0, |e| e.index),
    };
    store
        .persist(PersistInput {
            snapshot: None,
            entries,
            hard_state: Some(hs),
            committed: commit,
        })
        .expect("persist");
}

fn dump_of(store: &RaftStore) -> (u64, Vec<u8>) {
    let txn = store.storage().read().expect("read");
    let applied = {
        use lockd_server::fsm::FsmRead;
        FsmView::new(&txn).applied().expect("applied")
    };
    let data = snapshot::dump(&txn, applied.index, applied.term).expect("dump");
    (applied.index, data)
}

fn reads(store: &RaftStore) -> Vec<String> {
    let txn = store.storage().read().expect("read");
    let view = FsmView::new(&txn);
    let ops = [
        ReadOp::Get { path: "/a".into() },
        ReadOp::Get {
            path: "/a/e".into(),
        },
        ReadOp::Lock { name: "l".into() },
    ];
    ops.iter()
        .map(|op| format!("{:?}", fsm::read(&view, op, 100).expect("read")))
        .collect()
}

fn transfer(src: &RaftStore, chunk: u64) -> Snapshot {
    let meta = src.snapshot_meta().expect("meta");
    let mut data = Vec::new();
    loop {
        let (bytes, last) = src
            .snapshot_chunk(meta.index, data.len() as u64, chunk)
            .expect("chunk");
        data.extend_from_slice(&bytes);
        if last {
            break;
        }
    }
    Snapshot { meta, data }
}

fn install(dst: &mut RaftStore, snap: &Snapshot) {
    dst.persist(PersistInput {
        snapshot: Some(snap),
        ..PersistInput::default()
    })
    .expect("install");
}

#[test]
fn entries_terms_and_bounds_after_appends() {
    let (_b, mut store) = new_store(1000);
    assert_eq!(store.first_index().unwrap(), 1);
    assert_eq!(store.last_index().unwrap(), 0);
    assert_eq!(store.term(0).unwrap(), 0);
    let es: Vec<Entry> = (1..=5).map(|i| noop(i, 1 + i / 3)).collect();
    persist(&mut store, &es, &[]);
    assert_eq!(store.last_index().unwrap(), 5);
    assert_eq!(store.entries(1, 6, u64::MAX).unwrap(), es);
    assert_eq!(store.entries(2, 4, u64::MAX).unwrap(), es[1..3].to_vec());
    assert_eq!(store.term(3).unwrap(), 2);
    assert_eq!(store.term(5).unwrap(), 2);
    assert_eq!(store.term(6), Err(RaftError::Unavailable));
    assert_eq!(store.entries(1, 7, u64::MAX), Err(RaftError::Unavailable));
    // Byte caps: at least one entry, even over the cap.
    assert_eq!(store.entries(1, 6, 0).unwrap().len(), 1);
    let one = lockd_server::raft::entry_size(&es[0]);
    assert_eq!(store.entries(1, 6, 2 * one).unwrap().len(), 2);
}

#[test]
fn conflicting_suffix_is_overwritten() {
    let (_b, mut store) = new_store(1000);
    let es: Vec<Entry> = (1..=5).map(|i| noop(i, 1)).collect();
    persist(&mut store, &es, &es[..1]);
    // A new leader of term 2 replaces 3..=5 with 3..=4.
    let new = vec![noop(3, 2), noop(4, 2)];
    persist(&mut store, &new, &[]);
    assert_eq!(store.last_index().unwrap(), 4);
    assert_eq!(store.term(4).unwrap(), 2);
    assert_eq!(store.term(2).unwrap(), 1);
    assert_eq!(store.entries(3, 5, u64::MAX).unwrap(), new);
    // Overwriting an applied entry with another term is refused, and nothing is written.
    let bad = store.persist(PersistInput {
        entries: &[noop(1, 3)],
        ..PersistInput::default()
    });
    assert!(bad.is_err());
    assert_eq!(store.term(1).unwrap(), 1);
}

#[test]
fn hard_state_and_log_survive_reopen() {
    let (backend, mut store) = new_store(1000);
    let es = workload();
    persist(&mut store, &es, &es[..4]);
    let hs = store.hard_state();
    assert_eq!(
        hs,
        HardState {
            term: 1,
            vote: 1,
            commit: 4
        }
    );
    drop(store);
    let store = open(&LossyBackend::from_image(backend.crash_image()), 1000);
    let (hs2, conf) = store.initial_state().unwrap();
    assert_eq!(hs2, hs);
    assert_eq!(conf, Configuration::with_voters([1, 2, 3]));
    assert_eq!(store.last_index().unwrap(), 7);
    assert_eq!(store.applied().unwrap(), 4);
    assert_eq!(store.entries(1, 8, u64::MAX).unwrap(), es);
}

#[test]
fn snapshot_transfer_reproduces_the_state_machine() {
    let (_b, mut src) = new_store(1000);
    let es = workload();
    persist(&mut src, &es, &es);
    let snap = transfer(&src, 37);
    assert_eq!((snap.meta.index, snap.meta.term), (7, 1));
    assert_eq!(snap.meta.conf, Configuration::with_voters([1, 2, 3]));

    let (_b2, mut dst) = new_store(1000);
    persist(&mut dst, &[noop(1, 1), noop(2, 2)], &[]);
    install(&mut dst, &snap);
    assert_eq!(dump_of(&dst), dump_of(&src), "tables equal");
    assert_eq!(reads(&dst), reads(&src));
    assert!(reads(&dst)[2].contains("waiters"), "lock with its waiter");
    // Entry 2 had another term: the whole log is gone.
    assert_eq!(dst.first_index().unwrap(), 8);
    assert_eq!(dst.last_index().unwrap(), 7);
    assert_eq!(dst.term(7).unwrap(), 1);
    assert_eq!(dst.hard_state().commit, 7);
    assert_eq!(dst.entries(5, 6, 0), Err(RaftError::Compacted));
    // The installed snapshot serves further transfers as is.
    assert_eq!(transfer(&dst, 1 << 20), snap);
    // A damaged snapshot is refused and nothing changes.
    let (_b3, mut other) = new_store(1000);
    let mut bad = snap.clone();
    let mid = bad.data.len() / 2;
    bad.data[mid] ^= 1;
    assert!(other
        .persist(PersistInput {
            snapshot: Some(&bad),
            ..PersistInput::default()
        })
        .is_err());
    assert_eq!(other.applied().unwrap(), 0);
    // The source keeps going: applying more after the snapshot leaves the image stable.
    persist(&mut src, &[noop(8, 1)], &[noop(8, 1)]);
    assert_eq!(src.snapshot_meta().unwrap().index, 7);
}

#[test]
fn snapshot_matching_the_log_keeps_the_suffix() {
    let (_b, mut src) = new_store(1000);
    let es = workload();
    persist(&mut src, &es, &es[..5]);
    let snap = transfer(&src, 64);
    assert_eq!(snap.meta.index, 5);

    let (_b2, mut dst) = new_store(1000);
    persist(&mut dst, &es, &[]);
    install(&mut dst, &snap);
    assert_eq!(dst.first_index().unwrap(), 6);
    assert_eq!(dst.last_index().unwrap(), 7);
    assert_eq!(dst.entries(6, 8, u64::MAX).unwrap(), es[5..].to_vec());
    assert_eq!(dst.term(5).unwrap(), 1);
    assert_eq!(dst.applied().unwrap(), 5);
    // Applying the rest on both sides gives equal states.
    persist(&mut src, &[], &es[5..]);
    persist(&mut dst, &[], &es[5..]);
    assert_eq!(dump_of(&dst), dump_of(&src));
}

#[test]
fn crash_while_staging_keeps_the_old_state() {
    let (_b, mut src) = new_store(1000);
    let es = workload();
    persist(&mut src, &es, &es);
    let snap = transfer(&src, 1 << 20);

    let (backend, mut dst) = new_store(1000);
    let mine = [noop(1, 1), noop(2, 1)];
    persist(&mut dst, &mine, &mine);
    let before = dump_of(&dst);
    let chunks: Vec<&[u8]> = snap.data.chunks(50).collect();
    let mut offset = 0u64;
    for (i, chunk) in chunks.iter().enumerate() {
        if i == chunks.len() / 2 {
            // A wrong offset is answered with the expected one.
            assert_eq!(
                dst.stage_snapshot_chunk(&snap.meta, offset + 1, chunk)
                    .unwrap(),
                StageOutcome::WrongOffset { expected: offset }
            );
            break;
        }
        let outcome = dst.stage_snapshot_chunk(&snap.meta, offset, chunk).unwrap();
        offset += chunk.len() as u64;
        assert_eq!(
            outcome,
            StageOutcome::Staged {
                next_offset: offset
            }
        );
    }
    assert_eq!(dst.staged_snapshot(&snap.meta).unwrap(), None, "incomplete");
    let image = backend.crash_image();
    drop(dst);
    let dst = open(&LossyBackend::from_image(image), 1000);
    assert_eq!(dump_of(&dst), before);
    assert_eq!(dst.last_index().unwrap(), 2);
    assert_eq!(dst.staged_snapshot(&snap.meta).unwrap(), None);

    // Staging every chunk, then installing the assembled snapshot, works.
    let mut dst = dst;
    let mut offset = 0u64;
    for chunk in &chunks {
        dst.stage_snapshot_chunk(&snap.meta, offset, chunk).unwrap();
        offset += chunk.len() as u64;
    }
    let staged = dst.staged_snapshot(&snap.meta).unwrap().expect("complete");
    assert_eq!(staged, snap);
    install(&mut dst, &staged);
    assert_eq!(dump_of(&dst), dump_of(&src));
}

#[test]
fn compaction_keeps_a_margin() {
    let (backend, mut store) = new_store(100);
    let es: Vec<Entry> = (1..=2000).map(|i| noop(i, 1)).collect();
    for batch in es.chunks(100) {
        persist(&mut store, batch, batch);
    }
    let first = store.first_index().unwrap();
    assert!(first > 1, "compacted");
    assert!(first <= 2000 - 100 + 1, "margin of 100 kept: first {first}");
    assert_eq!(store.term(first - 1).unwrap(), 1);
    assert_eq!(
        store.entries(first - 1, first, 0),
        Err(RaftError::Compacted)
    );
    let meta = store.snapshot_meta().unwrap();
    assert!(meta.index + 1 >= first, "snapshot covers the gap");
    drop(store);
    let store = open(&LossyBackend::from_image(backend.crash_image()), 100);
    assert_eq!(store.first_index().unwrap(), first);
    assert_eq!(store.term(first - 1).unwrap(), 1);
}

#[test]
fn single_voter_core_runs_on_the_store() {
    let backend = LossyBackend::new();
    let mut store = open(&backend, 1000);
    store.bootstrap(Configuration::with_voters([1])).unwrap();
    let mut raft = Raft::new(RaftConfig::new(1), store).expect("core");
    let mut applied = Vec::new();
    let mut drive = |raft: &mut Raft<RaftStore>| {
        while raft.has_ready() {
            let rd = raft.ready();
            let out = raft.store_mut().persist_ready(&rd).expect("persist");
            applied.extend(out);
            raft.advance(&rd);
        }
    };
    for _ in 0..40 {
        raft.tick();
        drive(&mut raft);
        if raft.role() == Role::Leader {
            break;
        }
    }
    assert_eq!(raft.role(), Role::Leader);
    let term = raft.hard_state().term;
    let index = raft.propose(open_session(), term, 5).expect("propose");
    drive(&mut raft);
    let index2 = raft
        .propose(write(index, 1, create("/x", false)), term, 6)
        .expect("propose");
    drive(&mut raft);
    let last = applied.last().expect("applied");
    assert_eq!(last.0, index2);
    assert!(matches!(last.1.result, Ok(Reply::Write(_))), "{last:?}");
    assert_eq!(raft.store().applied().unwrap(), index2);
    assert_eq!(raft.store().hard_state().commit, index2);
    // A restart from the durable image sees the same log and hard state.
    let store = open(&LossyBackend::from_image(backend.crash_image()), 1000);
    assert_eq!(store.last_index().unwrap(), index2);
    assert_eq!(
        store.initial_state().unwrap().1,
        Configuration::with_voters([1])
    );
}
