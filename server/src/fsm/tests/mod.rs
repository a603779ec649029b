//! Unit tests of the pure state machine, applied to a [`MemStore`] with hand-built entries.

mod dedup;
mod multi;
mod namespace;
mod props;
mod sessions;

use std::collections::BTreeMap;

use lockd_protocol::{
    CheckOp, CreateOp, DeleteOp, Error, MultiOp, ReadOp, Reply, SessionId, SessionSeq, SetOp, Stat,
    WriteOp, WriteResult,
};

use super::{
    apply, bootstrap, read, split_path, Applied, AppliedState, Command, DedupRecord, MemStore,
    NodeRecord,
};
use crate::raft::{Entry, EntryKind};

/// Page cap passed to reads unless a test is about it.
const MAX_CHILDREN: usize = 10_000;

/// A store plus the log position: numbers entries 1, 2, 3, ... under `term`.
struct Harness {
    store: MemStore,
    index: u64,
    term: u64,
    time_ms: u64,
    /// Next seq per session for [`Harness::write`].
    seqs: BTreeMap<SessionId, u64>,
}

impl Harness {
    fn new() -> Self {
        let mut store = MemStore::default();
        bootstrap(&mut store).expect("bootstrap");
        Harness {
            store,
            index: 0,
            term: 1,
            time_ms: 1_000,
            seqs: BTreeMap::new(),
        }
    }

    /// The next entry, with proposer_term = term.
    fn entry(&mut self, kind: EntryKind) -> Entry {
        self.index += 1;
        self.time_ms += 10;
        Entry {
            index: self.index,
            term: self.term,
            proposer_term: self.term,
            time_ms: self.time_ms,
            kind,
        }
    }

    fn apply_entry(&mut self, entry: &Entry) -> Applied {
        let applied = apply(&mut self.store, entry).expect("apply never fails on a MemStore");
        assert_eq!(self.store.applied.index, entry.index);
        assert_eq!(self.store.applied.term, entry.term);
        assert_eq!(self.store.applied.time_ms, entry.time_ms);
        applied
    }

    fn apply(&mut self, command: Command) -> Applied {
        let entry = self.entry(EntryKind::Command(command));
        self.apply_entry(&entry)
    }

    fn open(&mut self) -> SessionId {
        let applied = self.apply(Command::OpenSession {
            ttl_ms: 10_000,
            tick_ms: 100,
            drift_ppm: 200,
            implicit: false,
        });
        let grant = applied.opened_session.expect("opened");
        grant.session
    }

    fn close(&mut self, session: SessionId) -> Applied {
        self.apply(Command::CloseSession { session })
    }

    fn expire(&mut self, sessions: &[SessionId]) -> Applied {
        self.apply(Command::Expire {
            sessions: sessions.to_vec(),
        })
    }

    /// A write with an explicit exactly-once header.
    fn write_seq(&mut self, session: SessionId, seq: u64, floor: u64, op: WriteOp) -> Applied {
        self.apply(Command::Write {
            session: SessionSeq {
                session,
                seq,
                floor,
            },
            op,
            fence: None,
        })
    }

    /// A write with the session's next seq (from 1) and floor 1: earlier responses are kept.
    fn write(&mut self, session: SessionId, op: WriteOp) -> Applied {
        let next = self.seqs.entry(session).or_insert(1);
        let seq = *next;
        *next += 1;
        self.write_seq(session, seq, 1, op)
    }

    /// The seq the next [`Harness::write`] of `session` will use.
    fn next_seq(&self, session: SessionId) -> u64 {
        self.seqs.get(&session).copied().unwrap_or(1)
    }

    fn ok(&mut self, session: SessionId, op: WriteOp) -> WriteResult {
        let applied = self.write(session, op);
        assert_eq!(
            applied.revision, self.index,
            "a fresh write reflects its own entry"
        );
        match applied.result {
            Ok(Reply::Write(result)) => result,
            other => panic!("expected a write result, got {other:?}"),
        }
    }

    fn fail(&mut self, session: SessionId, op: WriteOp) -> Error {
        let applied = self.write(session, op);
        applied.result.expect_err("expected the write to fail")
    }

    /// Creates a plain node and returns its path.
    fn mk(&mut self, session: SessionId, p: &str) -> String {
        match self.ok(session, create(p, b"")) {
            WriteResult::Created { path, .. } => path,
            other => panic!("unexpected {other:?}"),
        }
    }

    fn node(&self, p: &str) -> Option<NodeRecord> {
        let (parent, name) = split_path(p);
        self.store
            .nodes
            .get(&(parent.to_string(), name.to_string()))
            .cloned()
    }

    fn read(&self, op: ReadOp) -> Result<Reply, Error> {
        read(&self.store, &op, MAX_CHILDREN).expect("read never fails on a MemStore")
    }

    fn stat(&self, p: &str) -> Option<Stat> {
        match self.read(ReadOp::Stat {
            path: p.to_string(),
        }) {
            Ok(Reply::Stat(stat)) => stat,
            other => panic!("unexpected {other:?}"),
        }
    }

    fn children(
        &self,
        p: &str,
        start_after: Option<&str>,
        limit: u32,
    ) -> Result<(Vec<String>, bool), Error> {
        let op = ReadOp::Children {
            path: p.to_string(),
            start_after: start_after.map(str::to_string),
            limit,
        };
        self.read(op).map(|reply| match reply {
            Reply::Children { names, more } => (names, more),
            other => panic!("unexpected {other:?}"),
        })
    }

    /// Asserts that the last entry changed nothing but the applied position and, for a write
    /// that reached the namespace, its own dedup record.
    fn assert_only_bookkeeping(
        &self,
        before: &MemStore,
        write: Option<(SessionId, u64, &Applied)>,
    ) {
        let mut expected = before.clone();
        expected.applied = self.store.applied;
        if let Some((session, seq, applied)) = write {
            let record = DedupRecord {
                revision: applied.revision,
                result: applied.result.clone(),
            };
            expected.dedup.insert((session, seq), record);
        }
        assert_eq!(self.store, expected);
    }
}

fn cop(p: &str, data: &[u8], ephemeral: bool, sequential: bool) -> CreateOp {
    CreateOp {
        path: p.to_string(),
        data: data.to_vec(),
        ephemeral,
        sequential,
    }
}

fn sop(p: &str, data: &[u8], expected_version: Option<u64>) -> SetOp {
    SetOp {
        path: p.to_string(),
        data: data.to_vec(),
        expected_version,
    }
}

fn dop(p: &str, expected_version: Option<u64>) -> DeleteOp {
    DeleteOp {
        path: p.to_string(),
        expected_version,
    }
}

fn create(p: &str, data: &[u8]) -> WriteOp {
    WriteOp::Create(cop(p, data, false, false))
}

fn create_eph(p: &str) -> WriteOp {
    WriteOp::Create(cop(p, b"", true, false))
}

fn create_seq(p: &str, ephemeral: bool) -> WriteOp {
    WriteOp::Create(cop(p, b"", ephemeral, true))
}

fn set(p: &str, data: &[u8], expected_version: Option<u64>) -> WriteOp {
    WriteOp::Set(sop(p, data, expected_version))
}

fn delete(p: &str, expected_version: Option<u64>) -> WriteOp {
    WriteOp::Delete(dop(p, expected_version))
}

fn check(p: &str, version: u64) -> MultiOp {
    MultiOp::Check(CheckOp {
        path: p.to_string(),
        version,
    })
}

/// The path a `Created` result names.
fn created_path(result: &WriteResult) -> &str {
    match result {
        WriteResult::Created { path, .. } => path,
        other => panic!("expected Created, got {other:?}"),
    }
}
