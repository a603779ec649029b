//! Random entry sequences: determinism, `apply` never failing, and the store's invariants.

use lockd_protocol::path;
use proptest::prelude::*;
use proptest::strategy::ValueTree;
use proptest::test_runner::TestRunner;

use lockd_protocol::{MultiOp, Reply, SessionId, SessionSeq, WriteOp, SEQ_WINDOW};

use super::*;

/// Paths the random operations use: a small tree (so operations collide), the root, a
/// sequential prefix, and an invalid path.
const PATHS: &[&str] = &[
    "/", "/a", "/b", "/a/x", "/a/y", "/b/x", "/a/x/z", "/a/n-", "/e", "/e/x", "/a//bad",
];

#[derive(Debug, Clone)]
enum OpSpec {
    Create {
        p: usize,
        ephemeral: bool,
        sequential: bool,
    },
    Set {
        p: usize,
        version: Option<u64>,
    },
    Delete {
        p: usize,
        version: Option<u64>,
    },
    Check {
        p: usize,
        version: u64,
    },
}

/// How a write picks its seq and floor relative to its client's history.
#[derive(Debug, Clone, Copy)]
enum SeqSpec {
    /// The next seq; the floor moves up by 0..3 (never past the seq).
    Fresh(u8),
    /// An earlier seq again, with the client's current floor: a duplicate or a stale request.
    Retry(u8),
    /// Beyond the window.
    Beyond(u8),
}

#[derive(Debug, Clone)]
enum Spec {
    Open,
    /// Closes the n-th session opened so far (live or not), or an unknown one.
    Close(u8),
    /// Expires these sessions; the bool says whether the proposer's term is current.
    Expire(Vec<u8>, bool),
    Noop,
    NewTerm,
    Write {
        who: u8,
        seq: SeqSpec,
        op: OpSpec,
    },
    Multi {
        who: u8,
        seq: SeqSpec,
        ops: Vec<OpSpec>,
    },
}

fn op_spec() -> impl Strategy<Value = OpSpec> {
    let p = 0..PATHS.len();
    prop_oneof![
        3 => (p.clone(), any::<bool>(), prop::bool::weighted(0.2))
            .prop_map(|(p, ephemeral, sequential)| OpSpec::Create { p, ephemeral, sequential }),
        2 => (p.clone(), prop::option::of(0u64..3)).prop_map(|(p, version)| OpSpec::Set { p, version }),
        2 => (p.clone(), prop::option::of(0u64..3)).prop_map(|(p, version)| OpSpec::Delete { p, version }),
        1 => (p, 0u64..3).prop_map(|(p, version)| OpSpec::Check { p, version }),
    ]
}

fn seq_spec() -> impl Strategy<Value = SeqSpec> {
    prop_oneof![
        8 => any::<u8>().prop_map(SeqSpec::Fresh),
        2 => any::<u8>().prop_map(SeqSpec::Retry),
        1 => any::<u8>().prop_map(SeqSpec::Beyond),
    ]
}

fn spec() -> impl Strategy<Value = Spec> {
    prop_oneof![
        2 => Just(Spec::Open),
        1 => any::<u8>().prop_map(Spec::Close),
        1 => (prop::collection::vec(any::<u8>(), 0..4), prop::bool::weighted(0.7))
            .prop_map(|(who, current)| Spec::Expire(who, current)),
        1 => Just(Spec::Noop),
        1 => Just(Spec::NewTerm),
        10 => (any::<u8>(), seq_spec(), op_spec()).prop_map(|(who, seq, op)| Spec::Write { who, seq, op }),
        3 => (any::<u8>(), seq_spec(), prop::collection::vec(op_spec(), 0..5))
            .prop_map(|(who, seq, ops)| Spec::Multi { who, seq, ops }),
    ]
}

fn specs(len: std::ops::Range<usize>) -> impl Strategy<Value = Vec<Spec>> {
    prop::collection::vec(spec(), len)
}

impl OpSpec {
    fn multi_op(&self) -> MultiOp {
        match *self {
            OpSpec::Create {
                p,
                ephemeral,
                sequential,
            } => MultiOp::Create(cop(PATHS[p], b"d", ephemeral, sequential)),
            OpSpec::Set { p, version } => MultiOp::Set(sop(PATHS[p], b"s", version)),
            OpSpec::Delete { p, version } => MultiOp::Delete(dop(PATHS[p], version)),
            OpSpec::Check { p, version } => check(PATHS[p], version),
        }
    }

    fn write_op(&self) -> WriteOp {
        match self.multi_op() {
            MultiOp::Create(c) => WriteOp::Create(c),
            MultiOp::Set(s) => WriteOp::Set(s),
            MultiOp::Delete(d) => WriteOp::Delete(d),
            check @ MultiOp::Check(_) => WriteOp::Multi(vec![check]),
        }
    }
}

/// A client's view of one session it opened.
struct Client {
    id: SessionId,
    next: u64,
    floor: u64,
    /// Closed, or expired by a current-term expiry (the builder knows what will apply).
    ended: bool,
}

/// Turns specs into entries the way a leader would number them.
struct Builder {
    index: u64,
    term: u64,
    time_ms: u64,
    clients: Vec<Client>,
}

impl Builder {
    fn new() -> Self {
        Builder {
            index: 0,
            term: 1,
            time_ms: 0,
            clients: Vec::new(),
        }
    }

    /// Mostly a live client; sometimes any client (likely an ended one); `None` for a session
    /// id never issued.
    fn pick(&self, who: u8) -> Option<usize> {
        let live: Vec<usize> = (0..self.clients.len())
            .filter(|&n| !self.clients[n].ended)
            .collect();
        match who {
            0..=229 if !live.is_empty() => Some(live[who as usize % live.len()]),
            0..=244 if !self.clients.is_empty() => Some(who as usize % self.clients.len()),
            _ => None,
        }
    }

    fn header(&mut self, who: u8, seq: SeqSpec) -> SessionSeq {
        let Some(n) = self.pick(who) else {
            return SessionSeq {
                session: SessionId(self.index + 1 + who as u64),
                seq: 1,
                floor: 1,
            };
        };
        let client = &mut self.clients[n];
        let (seq, floor) = match seq {
            SeqSpec::Fresh(up) => {
                let seq = client.next;
                client.next += 1;
                client.floor = (client.floor + u64::from(up % 3)).min(seq);
                (seq, client.floor)
            }
            SeqSpec::Retry(back) => (
                client.next.saturating_sub(1 + u64::from(back % 4)).max(1),
                client.floor,
            ),
            SeqSpec::Beyond(by) => (client.floor + SEQ_WINDOW + u64::from(by), client.floor),
        };
        SessionSeq {
            session: client.id,
            seq,
            floor,
        }
    }

    fn build(&mut self, spec: &Spec) -> Entry {
        let mut proposer_term = self.term;
        let command = match spec {
            Spec::Open => {
                self.clients.push(Client {
                    id: SessionId(self.index + 1),
                    next: 1,
                    floor: 1,
                    ended: false,
                });
                Some(Command::OpenSession {
                    ttl_ms: 5_000,
                    tick_ms: 100,
                    drift_ppm: 500,
                    implicit: false,
                })
            }
            Spec::Close(who) => {
                let session = match self.pick(*who) {
                    Some(n) => {
                        self.clients[n].ended = true;
                        self.clients[n].id
                    }
                    None => SessionId(self.index + 1),
                };
                Some(Command::CloseSession { session })
            }
            Spec::Expire(who, current) => {
                if !current {
                    proposer_term = if self.term > 1 {
                        self.term - 1
                    } else {
                        self.term + 1
                    };
                }
                let mut sessions = Vec::new();
                for w in who {
                    sessions.push(match self.pick(*w) {
                        Some(n) => {
                            self.clients[n].ended |= *current;
                            self.clients[n].id
                        }
                        None => SessionId(self.index + 50),
                    });
                }
                Some(Command::Expire { sessions })
            }
            Spec::Noop => None,
            Spec::NewTerm => {
                self.term += 1;
                proposer_term = self.term;
                None
            }
            Spec::Write { who, seq, op } => Some(Command::Write {
                session: self.header(*who, *seq),
                op: op.write_op(),
                fence: None,
            }),
            Spec::Multi { who, seq, ops } => {
                let op = WriteOp::Multi(ops.iter().map(OpSpec::multi_op).collect());
                Some(Command::Write {
                    session: self.header(*who, *seq),
                    op,
                    fence: None,
                })
            }
        };
        self.index += 1;
        self.time_ms += 7;
        let kind = command.map_or(EntryKind::Noop, EntryKind::Command);
        Entry {
            index: self.index,
            term: self.term,
            proposer_term,
            time_ms: self.time_ms,
            kind,
        }
    }
}

fn entries(specs: &[Spec]) -> Vec<Entry> {
    let mut builder = Builder::new();
    specs.iter().map(|spec| builder.build(spec)).collect()
}

fn fresh_store() -> MemStore {
    let mut store = MemStore::default();
    bootstrap(&mut store).unwrap();
    store
}

fn node_path(parent: &str, name: &str) -> String {
    if parent.is_empty() {
        "/".to_string()
    } else {
        path::join(parent, name)
    }
}

/// The store's structural invariants.
fn check_invariants(store: &MemStore) {
    assert!(
        store.nodes.contains_key(&(String::new(), String::new())),
        "the root exists"
    );
    let mut counts: BTreeMap<String, u32> = BTreeMap::new();
    for ((parent, name), node) in &store.nodes {
        assert!(
            node.create_rev <= node.mod_rev && node.mod_rev <= store.applied.index,
            "{node:?}"
        );
        if parent.is_empty() {
            assert!(name.is_empty(), "only the root has the empty parent");
            continue;
        }
        let p = node_path(parent, name);
        assert!(path::validate(&p).is_ok(), "stored path {p:?} is valid");
        let (pp, pn) = split_path(parent);
        let parent_node = store.nodes.get(&(pp.to_string(), pn.to_string()));
        let parent_node = parent_node.unwrap_or_else(|| panic!("{p}: parent {parent} is missing"));
        assert_eq!(
            parent_node.ephemeral_owner, None,
            "{p}: ephemeral parent {parent} has a child"
        );
        *counts.entry(parent.clone()).or_default() += 1;
        if let Some(owner) = node.ephemeral_owner {
            assert!(
                store.sessions.contains_key(&owner),
                "{p}: owner {owner} is not live"
            );
            assert!(
                store.ephemerals.contains_key(&(owner, p.clone())),
                "{p}: not in the ephemeral index"
            );
        }
    }
    for ((parent, name), node) in &store.nodes {
        let p = node_path(parent, name);
        assert_eq!(
            node.num_children,
            counts.get(&p).copied().unwrap_or(0),
            "{p}: num_children"
        );
        assert!(
            node.children_version >= u64::from(node.num_children),
            "{p}: children_version"
        );
    }
    for (session, p) in store.ephemerals.keys() {
        assert!(
            store.sessions.contains_key(session),
            "index entry {p} of dead session {session}"
        );
        let (parent, name) = split_path(p);
        let node = store.nodes.get(&(parent.to_string(), name.to_string()));
        let owner = node.and_then(|n| n.ephemeral_owner);
        assert_eq!(owner, Some(*session), "index entry {p} of {session}");
    }
    for (session, seq) in store.dedup.keys() {
        let record = store.sessions.get(session);
        let record = record.unwrap_or_else(|| panic!("response kept for dead session {session}"));
        assert!(
            *seq >= record.floor,
            "response {seq} of {session} below floor {}",
            record.floor
        );
    }
}

/// Applies one entry and checks what must hold for it whatever it was.
fn apply_checked(store: &mut MemStore, entry: &Entry) -> Applied {
    let before = store.clone();
    let applied = apply(store, entry).expect("apply must not fail");
    assert_eq!(
        store.applied,
        AppliedState {
            index: entry.index,
            term: entry.term,
            time_ms: entry.time_ms,
            history_from: before.applied.history_from,
        }
    );
    assert!(applied.revision <= entry.index);
    let unchanged_namespace = match &entry.kind {
        EntryKind::Command(Command::Write { .. }) => {
            applied.result.is_err() || applied.revision < entry.index
        }
        EntryKind::Command(Command::Expire { .. }) => entry.proposer_term != entry.term,
        EntryKind::Command(
            Command::OpenSession { .. }
            | Command::EndLockDelay { .. }
            | Command::ExpireWaiters { .. },
        )
        | EntryKind::Noop
        | EntryKind::Config(_) => true,
        EntryKind::Command(Command::CloseSession { .. }) => applied.result.is_err(),
    };
    if unchanged_namespace {
        assert_eq!(store.nodes, before.nodes, "{entry:?} -> {applied:?}");
        assert_eq!(
            store.ephemerals, before.ephemerals,
            "{entry:?} -> {applied:?}"
        );
    }
    if let EntryKind::Command(Command::Expire { .. }) = &entry.kind {
        if entry.proposer_term != entry.term {
            let mut expected = before;
            expected.applied = store.applied;
            assert_eq!(*store, expected, "a stale-term expiry changes nothing");
        }
    }
    check_invariants(store);
    applied
}

#[test]
fn the_same_entries_give_the_same_state_and_answers() {
    let mut runner = TestRunner::deterministic();
    let specs = specs(3_000..4_000).new_tree(&mut runner).unwrap().current();
    let entries = entries(&specs);
    assert!(entries.len() > 100);
    let mut one = fresh_store();
    let mut two = fresh_store();
    let first: Vec<Applied> = entries
        .iter()
        .map(|e| apply(&mut one, e).unwrap())
        .collect();
    // The second store stops half way and goes on from a copy, as a restarted node would.
    let (head, tail) = entries.split_at(entries.len() / 2);
    let mut second: Vec<Applied> = head.iter().map(|e| apply(&mut two, e).unwrap()).collect();
    let mut copy = two.clone();
    second.extend(tail.iter().map(|e| apply(&mut copy, e).unwrap()));
    assert_eq!(first, second);
    assert_eq!(one, copy);
    check_invariants(&one);
    // The run exercised more than trivial failures.
    let ok_writes = first
        .iter()
        .filter(|a| matches!(a.result, Ok(Reply::Write(_))))
        .count();
    assert!(
        ok_writes > entries.len() / 10,
        "{ok_writes} of {} writes succeeded",
        entries.len()
    );
    assert!(one.nodes.len() > 1);
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 300, ..ProptestConfig::default() })]

    #[test]
    fn random_entries_keep_the_invariants(specs in specs(1..150)) {
        let entries = entries(&specs);
        let mut store = fresh_store();
        let mut twin = fresh_store();
        for entry in &entries {
            let applied = apply_checked(&mut store, entry);
            prop_assert_eq!(apply(&mut twin, entry).unwrap(), applied);
        }
        prop_assert_eq!(store, twin);
    }
}
