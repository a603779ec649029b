//! Safety invariants checked by the simulation after every step: election safety, log
//! matching, leader completeness, state machine safety (same entry and same state digest at
//! each applied index on every node), committed entries never change, and linearizable
//! reads (a read index is at least the revision of every write completed before the read
//! began). Membership (§4.1-4.2): every node's configuration is the one computed from its log
//! (snapshot configuration plus the configuration entries after it), a leader's log holds at
//! most one uncommitted configuration entry, only voters campaign, and a leader outside its
//! configuration still has its removal uncommitted (it steps down once it commits). Pure
//! bookkeeping; a violation is returned as a message.

use std::collections::BTreeMap;

use crate::raft::{Entry, EntryKind, MemStorage, Raft, Role, Storage};

/// What the checker has learned so far.
#[derive(Debug, Default)]
pub struct Checker {
    /// The leader of each term seen. Invariant: one per term (election safety).
    leaders: BTreeMap<u64, u64>,
    /// Term of each index known committed somewhere. Invariant: never changes.
    committed: BTreeMap<u64, u64>,
    /// For each committed index, the term of the node that first reported it committed: the
    /// entry was committed in that term or earlier, so every leader of a later term holds it.
    committed_by: BTreeMap<u64, u64>,
    /// Entry and state digest after applying each index, from the first node to apply it.
    applied: BTreeMap<u64, (Entry, u64)>,
}

/// Entries a core holds, from its first retained index (durable and unstable).
fn log_of(r: &Raft<MemStorage>) -> (u64, Vec<Entry>) {
    let log = r.raft_log();
    let first = log.first_index();
    (
        first,
        log.entries(first, log.last_index() + 1, u64::MAX)
            .unwrap_or_default(),
    )
}

impl Checker {
    /// Checks the live cores; `Err` describes the first violation.
    pub fn check_cores<'a>(
        &mut self,
        cores: impl Iterator<Item = &'a Raft<MemStorage>>,
    ) -> Result<(), String> {
        let cores: Vec<&Raft<MemStorage>> = cores.collect();
        for r in &cores {
            if r.role() == Role::Leader {
                let prev = *self.leaders.entry(r.term()).or_insert(r.id());
                if prev != r.id() {
                    return Err(format!(
                        "election safety: {prev} and {} lead term {}",
                        r.id(),
                        r.term()
                    ));
                }
            }
            let log = r.raft_log();
            let first = log.first_index();
            for i in
                first.max(self.committed.last_key_value().map_or(0, |(k, _)| *k + 1))..=r.commit()
            {
                if let Ok(t) = log.term(i) {
                    self.committed.insert(i, t);
                    self.committed_by.insert(i, r.term());
                }
            }
            let top = r.commit().min(log.last_index());
            if top < first {
                continue;
            }
            for (&i, &t) in self.committed.range(first..=top) {
                if log.term(i) != Ok(t) {
                    return Err(format!(
                        "committed entry {i} (term {t}) changed on node {}",
                        r.id()
                    ));
                }
            }
        }
        // Leader completeness: a leader holds every entry committed in an earlier term (from
        // its first index; a deposed leader that does not know it may lack newer ones).
        for r in cores.iter().filter(|r| r.role() == Role::Leader) {
            let log = r.raft_log();
            let first = log.first_index();
            for (&i, &t) in self.committed.range(first..) {
                let by = self.committed_by.get(&i).copied().unwrap_or(0);
                if by < r.term() && log.term(i) != Ok(t) {
                    return Err(format!(
                        "leader completeness: leader {} lacks committed {i}",
                        r.id()
                    ));
                }
            }
        }
        // Log matching: same (index, term) ⇒ identical prefixes (compared where both hold entries).
        let logs: Vec<(u64, Vec<Entry>)> = cores.iter().map(|r| log_of(r)).collect();
        for (r, log) in cores.iter().zip(&logs) {
            check_membership(r, &log.1).map_err(|e| format!("node {}: {e}", r.id()))?;
        }
        for a in 0..logs.len() {
            for b in a + 1..logs.len() {
                check_matching(&logs[a], &logs[b]).map_err(|e| {
                    format!(
                        "log matching between nodes {} and {}: {e}",
                        cores[a].id(),
                        cores[b].id()
                    )
                })?;
            }
        }
        Ok(())
    }

    /// Records that `node` applied `entry`, reaching a state with `digest`.
    pub fn applied(&mut self, node: u64, entry: &Entry, digest: u64) -> Result<(), String> {
        match self.applied.get(&entry.index) {
            Some((e, _)) if e != entry => Err(format!(
                "state machine safety: node {node} applied {:?} at {}, another node {:?}",
                entry.kind, entry.index, e.kind
            )),
            Some((_, d)) if *d != digest => Err(format!(
                "state digests differ at index {} on node {node}",
                entry.index
            )),
            Some(_) => Ok(()),
            None => {
                self.applied.insert(entry.index, (entry.clone(), digest));
                Ok(())
            }
        }
    }

    /// Number of indexes known committed.
    pub fn committed_count(&self) -> usize {
        self.committed.len()
    }

    /// Highest term with a leader.
    pub fn max_term(&self) -> u64 {
        self.leaders.last_key_value().map_or(0, |(t, _)| *t)
    }
}

/// The membership invariants of one core, given the entries it holds.
fn check_membership(r: &Raft<MemStorage>, entries: &[Entry]) -> Result<(), String> {
    let base = match r.raft_log().pending_snapshot() {
        Some(s) => s.meta.clone(),
        None => r.store().snapshot_meta().map_err(|e| e.to_string())?,
    };
    let mut conf = base.conf;
    let mut uncommitted = 0;
    for e in entries.iter().filter(|e| e.index > base.index) {
        if let EntryKind::Config(change) = &e.kind {
            conf.apply(change);
            if e.index > r.commit() {
                uncommitted += 1;
            }
        }
    }
    if r.conf() != &conf {
        return Err(format!(
            "configuration {:?} is not the one of its log {conf:?}",
            r.conf()
        ));
    }
    let voter = conf.voters.contains(&r.id());
    match r.role() {
        Role::Leader if uncommitted > 1 => Err(format!(
            "leader holds {uncommitted} uncommitted configuration entries"
        )),
        Role::Leader if !voter && uncommitted == 0 => {
            Err("leader outside its committed configuration".into())
        }
        Role::Candidate | Role::PreCandidate if !voter => {
            Err(format!("campaigns outside the voters {:?}", conf.voters))
        }
        _ => Ok(()),
    }
}

fn check_matching(a: &(u64, Vec<Entry>), b: &(u64, Vec<Entry>)) -> Result<(), String> {
    let lo = a.0.max(b.0);
    let hi = (a.0 + a.1.len() as u64).min(b.0 + b.1.len() as u64);
    // Highest common index with equal terms; everything from `lo` up to it must be equal.
    let mut top = None;
    for i in (lo..hi).rev() {
        let ea = &a.1[(i - a.0) as usize];
        let eb = &b.1[(i - b.0) as usize];
        if ea.term == eb.term {
            top = Some(i);
            break;
        }
    }
    if let Some(top) = top {
        for i in lo..=top {
            let ea = &a.1[(i - a.0) as usize];
            let eb = &b.1[(i - b.0) as usize];
            if ea != eb {
                return Err(format!("differ at {i} below matching index {top}"));
            }
        }
    }
    Ok(())
}

/// Durable storage check: the stored log never holds an entry below its snapshot.
pub fn check_store(s: &MemStorage) -> Result<(), String> {
    let first = s.first_index().map_err(|e| e.to_string())?;
    match s.all_entries().first() {
        Some(e) if e.index != first => Err(format!("stored log starts at {} not {first}", e.index)),
        _ => Ok(()),
    }
}
