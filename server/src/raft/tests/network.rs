//! A deterministic in-memory cluster of cores for scenario tests: a FIFO message queue
//! pumped by hand, per-link drops, isolation, an optional rewriting filter, and a driver
//! that follows the Ready contract with [`MemStorage`].

use std::collections::{BTreeMap, BTreeSet, VecDeque};

use crate::raft::{
    ConfChange, ConfChangeError, Entry, EntryKind, MemStorage, Message, Raft, RaftConfig,
    ReadState, Ready, Role,
};

/// A message rewriting hook: `None` drops the message.
pub type Filter = Box<dyn FnMut(Message) -> Option<Message>>;

/// A test cluster.
pub struct Network {
    pub nodes: BTreeMap<u64, Raft<MemStorage>>,
    pub queue: VecDeque<Message>,
    /// Links (from, to) that drop everything.
    pub cut: BTreeSet<(u64, u64)>,
    pub filter: Option<Filter>,
    pub applied: BTreeMap<u64, Vec<Entry>>,
    pub read_states: BTreeMap<u64, Vec<ReadState>>,
    /// Every Ready handled, per node, in order (for determinism checks).
    pub trace: Vec<(u64, String)>,
    /// Every message sent, in order.
    pub sent: Vec<Message>,
}

/// A test configuration: election 10 ticks, heartbeat 1, seed from the id.
pub fn cfg(id: u64) -> RaftConfig {
    RaftConfig {
        seed: id * 7919,
        ..RaftConfig::new(id)
    }
}

/// A bare entry of `term` at `index`.
pub fn ent(index: u64, term: u64) -> Entry {
    Entry {
        index,
        term,
        proposer_term: term,
        time_ms: 0,
        kind: EntryKind::Noop,
    }
}

/// Storage of a member of `voters` already holding `entries` and `term`.
pub fn store_with(voters: &[u64], entries: &[Entry], term: u64) -> MemStorage {
    let mut s = MemStorage::new_with_voters(voters.iter().copied());
    s.append(entries);
    s.set_hard_state(crate::raft::HardState {
        term,
        vote: 0,
        commit: 0,
    });
    s
}

impl Network {
    /// `n` fresh nodes 1..=n with configurations from `f`.
    pub fn new(n: u64, f: impl Fn(RaftConfig) -> RaftConfig) -> Network {
        let voters: Vec<u64> = (1..=n).collect();
        let stores = voters
            .iter()
            .map(|_| MemStorage::new_with_voters(voters.clone()))
            .collect();
        Network::with_stores(stores, f)
    }

    /// Nodes 1..=n (n = the configuration's members), each starting from `conf`.
    pub fn with_conf(conf: &crate::raft::Configuration) -> Network {
        let stores = conf
            .ids()
            .map(|_| MemStorage::new_with_conf(conf.clone()))
            .collect();
        Network::with_stores(stores, |c| c)
    }

    /// Nodes 1..=n over the given storages.
    pub fn with_stores(stores: Vec<MemStorage>, f: impl Fn(RaftConfig) -> RaftConfig) -> Network {
        let mut nodes = BTreeMap::new();
        for (i, s) in stores.into_iter().enumerate() {
            let id = i as u64 + 1;
            nodes.insert(id, Raft::new(f(cfg(id)), s).unwrap());
        }
        Network {
            nodes,
            queue: VecDeque::new(),
            cut: BTreeSet::new(),
            filter: None,
            applied: BTreeMap::new(),
            read_states: BTreeMap::new(),
            trace: Vec::new(),
            sent: Vec::new(),
        }
    }

    pub fn node(&mut self, id: u64) -> &mut Raft<MemStorage> {
        self.nodes.get_mut(&id).unwrap()
    }

    /// Adds node `id` over `store` (e.g. `MemStorage::new_with_voters([])`: a new member
    /// waiting to be added), configured by `f`.
    pub fn add_node(&mut self, id: u64, store: MemStorage, f: impl Fn(RaftConfig) -> RaftConfig) {
        self.nodes.insert(id, Raft::new(f(cfg(id)), store).unwrap());
    }

    /// Proposes a configuration change on `id` at its current term.
    pub fn conf_change(&mut self, id: u64, change: ConfChange) -> Result<u64, ConfChangeError> {
        let term = self.node(id).term();
        self.node(id).propose_conf_change(change, term, 0)
    }

    /// Has `id` snapshot its state machine at its applied index (empty data) and compact its
    /// log up to it, so that new and lagging members catch up by snapshot.
    pub fn snapshot(&mut self, id: u64) -> u64 {
        let applied = self.node(id).applied();
        let store = self.node(id).store_mut();
        store.create_snapshot(applied, Vec::new());
        store.compact(applied);
        applied
    }

    /// Handles one Ready of `id` per the contract. Returns it.
    pub fn process(&mut self, id: u64) -> Option<Ready> {
        let node = self.nodes.get_mut(&id)?;
        if !node.has_ready() {
            return None;
        }
        let rd = node.ready();
        self.trace.push((id, format!("{rd:?}")));
        for m in &rd.early_messages {
            self.send(m.clone());
        }
        let node = self.nodes.get_mut(&id)?;
        if let Some(s) = &rd.snapshot {
            node.store_mut()
                .apply_snapshot(s.meta.clone(), s.data.clone());
        }
        node.store_mut().append(&rd.entries);
        if let Some(hs) = rd.hard_state {
            node.store_mut().set_hard_state(hs);
        }
        for m in &rd.messages {
            self.send(m.clone());
        }
        self.applied
            .entry(id)
            .or_default()
            .extend(rd.committed_entries.iter().cloned());
        self.read_states
            .entry(id)
            .or_default()
            .extend(rd.read_states.iter().copied());
        self.nodes.get_mut(&id)?.advance(&rd);
        Some(rd)
    }

    fn send(&mut self, m: Message) {
        self.sent.push(m.clone());
        self.queue.push_back(m);
    }

    /// Processes every node's Ready until none has one.
    pub fn process_all(&mut self) {
        for _ in 0..100 {
            let ids: Vec<u64> = self.nodes.keys().copied().collect();
            let mut any = false;
            for id in ids {
                any |= self.process(id).is_some();
            }
            if !any {
                return;
            }
        }
    }

    /// Delivers one queued message (dropping it if its link is cut). Returns false if empty.
    pub fn deliver_one(&mut self) -> bool {
        let Some(m) = self.queue.pop_front() else {
            return false;
        };
        if self.cut.contains(&(m.from, m.to)) {
            return true;
        }
        let m = match &mut self.filter {
            Some(f) => match f(m) {
                Some(m) => m,
                None => return true,
            },
            None => m,
        };
        if let Some(n) = self.nodes.get_mut(&m.to) {
            n.step(m);
        }
        true
    }

    /// Processes and delivers until quiet.
    pub fn stabilize(&mut self) {
        for _ in 0..10_000 {
            self.process_all();
            if self.queue.is_empty() {
                return;
            }
            while self.deliver_one() {}
        }
        panic!("network did not stabilize");
    }

    /// Ticks every node once, then stabilizes.
    pub fn tick_all(&mut self, n: usize) {
        for _ in 0..n {
            for node in self.nodes.values_mut() {
                node.tick();
            }
            self.stabilize();
        }
    }

    /// Ticks one node `n` times, stabilizing after each.
    pub fn tick_node(&mut self, id: u64, n: usize) {
        for _ in 0..n {
            self.node(id).tick();
            self.stabilize();
        }
    }

    /// Makes `id` campaign at once (pre-vote if configured) and stabilizes.
    pub fn campaign(&mut self, id: u64) {
        let pre = self.node(id).cfg.pre_vote;
        self.node(id).campaign(pre, false);
        self.stabilize();
    }

    /// Campaigns with `id` and asserts it won.
    pub fn elect(&mut self, id: u64) {
        self.campaign(id);
        assert_eq!(
            self.node(id).role(),
            Role::Leader,
            "node {id} should have won"
        );
    }

    /// Cuts every link to and from `id`.
    pub fn isolate(&mut self, id: u64) {
        for other in self.nodes.keys().copied().collect::<Vec<_>>() {
            if other != id {
                self.cut.insert((id, other));
                self.cut.insert((other, id));
            }
        }
    }

    /// Restores every link.
    pub fn heal(&mut self) {
        self.cut.clear();
    }

    /// Leaders in the cluster, with their terms.
    pub fn leaders(&self) -> Vec<(u64, u64)> {
        self.nodes
            .values()
            .filter(|n| n.role() == Role::Leader)
            .map(|n| (n.id(), n.term()))
            .collect()
    }

    /// Proposes a no-op command on `id` (must be leader); returns its index.
    pub fn propose(&mut self, id: u64) -> u64 {
        let term = self.node(id).term();
        self.node(id).propose(EntryKind::Noop, term, 0).unwrap()
    }

    /// Restarts `id` from its durable storage (unpersisted state is lost).
    pub fn restart(&mut self, id: u64) {
        let store = self.node(id).store().clone();
        let cfg = self.node(id).cfg.clone();
        let applied = self
            .applied
            .get(&id)
            .and_then(|a| a.last())
            .map_or(0, |e| e.index);
        self.nodes
            .insert(id, Raft::new(RaftConfig { applied, ..cfg }, store).unwrap());
    }
}
