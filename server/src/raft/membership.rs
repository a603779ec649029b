//! Cluster membership (dissertation chapter 4, DESIGN §3a.8-9): the [`Configuration`]
//! (voters, learners, and each member's addresses and incarnation), single-server changes as
//! log entries ([`ConfChange`], §4.1), and how the core keeps its configuration in step with
//! its log.
//!
//! # Rules the core enforces
//!
//! * A configuration **takes effect when its entry is appended** (leader and followers
//!   alike), not when it commits (§4.1), and is **rolled back if the entry is truncated**: the
//!   core then uses the last configuration entry still in its log, else the configuration it
//!   started from (storage or snapshot).
//! * A leader appends a configuration entry only after an entry of its current term has
//!   committed (the 2015 single-server-change bug: a new leader must not add a change on top
//!   of a configuration a previous leader may have changed concurrently), and only while no
//!   other configuration entry is uncommitted. Changes are one server at a time.
//! * A learner (or a node outside the configuration) never campaigns and never counts toward
//!   a quorum. It still answers vote requests: the candidate counts the answer only if the
//!   node is a voter in the candidate's own configuration (a promoted learner may not have
//!   seen its promotion yet, and refusing would block elections that need it).
//! * A leader that removes itself keeps leading, replicating but not counting itself, until
//!   the new configuration commits, then hands over (TimeoutNow to the most up-to-date
//!   voter) and steps down (§4.2.2). A node outside its configuration never campaigns.
//! * A node with no configuration at all (a new member started to join) accepts no entries:
//!   it answers appends with [`super::AppendResult::NeedSnapshot`] until a snapshot gives it
//!   the configuration its first entries build on (the bootstrap configuration is not a log
//!   entry, so replaying a log from index 1 on an empty configuration would be wrong).
//!
//! # Recovery
//!
//! [`super::Storage::initial_state`] returns the configuration as of
//! [`super::Storage::conf_index`] (for the redb store: the applied index, whose configuration
//! is kept in the fsm tables and updated in the same transaction as the entry's application;
//! for [`super::MemStorage`]: its snapshot index). Every entry after that index is still in
//! the log (compaction stays below the applied index), so [`super::Raft::new`] replays the
//! configuration entries in `(conf_index, last_index]` on top of it. Committed configuration
//! entries are folded into the base as the commit index moves, so the core only remembers
//! the changes that could still be truncated.

use std::collections::{BTreeMap, BTreeSet};

use bincode::{Decode, Encode};
use tracing::{debug, warn};

use super::core::{Raft, Role};
use super::message::{entry_size, MessageKind};
use super::storage::{Storage, StorageError};
use super::{Entry, EntryKind};

/// What the configuration records about one member, besides its role.
#[derive(Encode, Decode, Clone, Debug, Default, PartialEq, Eq)]
pub struct MemberInfo {
    /// Address other members reach its peer port at.
    pub peer_addr: String,
    /// Address clients reach it at (given to clients in `HelloOk` and `NotLeader`).
    pub client_addr: String,
    /// Incarnation id of its data directory (DESIGN §3a.9), `None` until the leader learned
    /// it from the member's handshake and recorded it with [`ConfChange::Identify`].
    pub incarnation: Option<u64>,
}

/// Cluster membership: voters decide elections and commits; learners only replicate.
/// Invariants: `voters` and `learners` are disjoint; the keys of `members` are members
/// (a member without an entry has no known addresses, e.g. in a bare [`Self::with_voters`]).
#[derive(Encode, Decode, Clone, Debug, Default, PartialEq, Eq)]
pub struct Configuration {
    /// Members that vote and count for commit.
    pub voters: BTreeSet<u64>,
    /// Members that receive the log but never vote or count for commit.
    pub learners: BTreeSet<u64>,
    /// Addresses and identity of members, by id.
    pub members: BTreeMap<u64, MemberInfo>,
}

impl Configuration {
    /// A configuration of voters only, without addresses.
    pub fn with_voters(voters: impl IntoIterator<Item = u64>) -> Configuration {
        Configuration {
            voters: voters.into_iter().collect(),
            ..Configuration::default()
        }
    }

    /// A bootstrap configuration of voters with their addresses.
    pub fn with_members(members: impl IntoIterator<Item = (u64, MemberInfo)>) -> Configuration {
        let members: BTreeMap<u64, MemberInfo> = members.into_iter().collect();
        Configuration {
            voters: members.keys().copied().collect(),
            learners: BTreeSet::new(),
            members,
        }
    }

    /// Every member, voters then learners, each once.
    pub fn ids(&self) -> impl Iterator<Item = u64> + '_ {
        self.voters.iter().chain(self.learners.iter()).copied()
    }

    /// Whether `id` is a voter or a learner.
    pub fn contains(&self, id: u64) -> bool {
        self.voters.contains(&id) || self.learners.contains(&id)
    }

    /// What is recorded about member `id`, if anything.
    pub fn member(&self, id: u64) -> Option<&MemberInfo> {
        self.members.get(&id)
    }

    /// Whether `change` is valid on top of this configuration (the checks that do not depend
    /// on replication progress).
    pub fn check(&self, change: &ConfChange) -> Result<(), ConfChangeError> {
        match change {
            ConfChange::AddLearner { id, .. } => {
                if *id == 0 {
                    return Err(ConfChangeError::ZeroId);
                }
                if self.contains(*id) {
                    return Err(ConfChangeError::AlreadyMember { id: *id });
                }
            }
            ConfChange::Promote { id } => {
                if self.voters.contains(id) {
                    return Err(ConfChangeError::NotLearner { id: *id });
                }
                if !self.learners.contains(id) {
                    return Err(ConfChangeError::UnknownMember { id: *id });
                }
            }
            ConfChange::Remove { id } => {
                if !self.contains(*id) {
                    return Err(ConfChangeError::UnknownMember { id: *id });
                }
                if self.voters.len() == 1 && self.voters.contains(id) {
                    return Err(ConfChangeError::RemovingLastVoter { id: *id });
                }
            }
            ConfChange::Identify {
                id,
                incarnation,
                client_addr,
            } => {
                if !self.contains(*id) {
                    return Err(ConfChangeError::UnknownMember { id: *id });
                }
                let info = self.members.get(id);
                match info.and_then(|m| m.incarnation) {
                    Some(known) if known != *incarnation => {
                        return Err(ConfChangeError::IncarnationMismatch { id: *id, known });
                    }
                    Some(_) if info.is_some_and(|m| m.client_addr == *client_addr) => {
                        return Err(ConfChangeError::Unchanged { id: *id });
                    }
                    _ => {}
                }
            }
        }
        Ok(())
    }

    /// Applies `change`. Total: a change that [`Self::check`] would refuse changes nothing
    /// (every node computes the same result from the same log either way).
    pub fn apply(&mut self, change: &ConfChange) {
        if self.check(change).is_err() {
            return;
        }
        match change {
            ConfChange::AddLearner {
                id,
                peer_addr,
                client_addr,
            } => {
                self.learners.insert(*id);
                self.members.insert(
                    *id,
                    MemberInfo {
                        peer_addr: peer_addr.clone(),
                        client_addr: client_addr.clone(),
                        incarnation: None,
                    },
                );
            }
            ConfChange::Promote { id } => {
                self.learners.remove(id);
                self.voters.insert(*id);
            }
            ConfChange::Remove { id } => {
                self.voters.remove(id);
                self.learners.remove(id);
                self.members.remove(id);
            }
            ConfChange::Identify {
                id,
                incarnation,
                client_addr,
            } => {
                let info = self.members.entry(*id).or_default();
                info.incarnation = Some(*incarnation);
                info.client_addr.clone_from(client_addr);
            }
        }
    }
}

/// One single-server configuration change (§4.1), carried by [`EntryKind::Config`].
#[derive(Encode, Decode, Clone, Debug, PartialEq, Eq)]
pub enum ConfChange {
    /// Adds a non-voting member that receives the log (§4.2.1: new servers join as learners
    /// and are promoted once caught up).
    AddLearner {
        /// The new member's node id.
        id: u64,
        /// Its peer address.
        peer_addr: String,
        /// Its client address.
        client_addr: String,
    },
    /// Makes a learner a voter.
    Promote {
        /// The learner.
        id: u64,
    },
    /// Removes a voter or a learner (the leader included, §4.2.2).
    Remove {
        /// The member.
        id: u64,
    },
    /// Records the identity a member presented in its handshake: its incarnation (fixed once
    /// recorded: a wiped member must be removed and re-added, DESIGN §3a.9) and its client
    /// address.
    Identify {
        /// The member.
        id: u64,
        /// Incarnation id of its data directory.
        incarnation: u64,
        /// Its client address.
        client_addr: String,
    },
}

impl ConfChange {
    /// The member the change is about.
    pub fn id(&self) -> u64 {
        match self {
            ConfChange::AddLearner { id, .. }
            | ConfChange::Promote { id }
            | ConfChange::Remove { id }
            | ConfChange::Identify { id, .. } => *id,
        }
    }
}

/// Why a configuration change was refused.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum ConfChangeError {
    /// Only the leader appends; the hint is the leader this node knows, if any.
    #[error("not leader (leader hint {leader_hint:?})")]
    NotLeader {
        /// The current leader as far as this node knows.
        leader_hint: Option<u64>,
    },
    /// The leader has not yet committed an entry of its term (its no-op); retry shortly.
    #[error("no entry of the leader's term committed yet")]
    NoCommitInTerm,
    /// Another configuration change is not yet committed; one at a time.
    #[error("a configuration change is in progress")]
    ChangeInProgress,
    /// A leader transfer is in progress.
    #[error("leader transfer in progress")]
    TransferInProgress,
    /// Node id 0 means "none".
    #[error("node id must not be 0")]
    ZeroId,
    /// The node is not a member.
    #[error("node {id} is not a member")]
    UnknownMember {
        /// The node.
        id: u64,
    },
    /// The node is a member already.
    #[error("node {id} is already a member")]
    AlreadyMember {
        /// The node.
        id: u64,
    },
    /// Only learners are promoted.
    #[error("node {id} is not a learner")]
    NotLearner {
        /// The node.
        id: u64,
    },
    /// The learner is too far behind the leader's log to be promoted yet (or has not
    /// acknowledged any entry yet).
    #[error("learner is {lag} entries behind, or has acknowledged nothing yet (promotion needs it within {max} entries): wait for it to catch up")]
    LearnerBehind {
        /// Leader's last index minus the learner's match index.
        lag: u64,
        /// [`super::RaftConfig::max_promote_lag`].
        max: u64,
    },
    /// A configuration needs at least one voter.
    #[error("node {id} is the last voter")]
    RemovingLastVoter {
        /// The node.
        id: u64,
    },
    /// A different incarnation is recorded for this member: it was wiped and must be removed
    /// and re-added.
    #[error("node {id} has incarnation {known} recorded")]
    IncarnationMismatch {
        /// The node.
        id: u64,
        /// The recorded incarnation.
        known: u64,
    },
    /// The identity given is the one recorded already.
    #[error("node {id}'s identity is recorded already")]
    Unchanged {
        /// The node.
        id: u64,
    },
    /// The encoded entry exceeds `max_entry_bytes`.
    #[error("configuration entry of {size} bytes exceeds the limit of {max}")]
    TooLarge {
        /// Encoded size.
        size: u64,
        /// The limit.
        max: u64,
    },
}

/// The configurations of a core's log: the configuration as of `base_index` (from storage, a
/// snapshot, or folded committed entries) and the configuration entries after it that the
/// log still holds. Invariants: every key of `changes` is > `base_index`; `current` is
/// `base` with every change applied in index order.
#[derive(Debug, Clone)]
pub(super) struct ConfLog {
    base_index: u64,
    base: Configuration,
    /// index → (term, change).
    changes: BTreeMap<u64, (u64, ConfChange)>,
    current: Configuration,
}

impl ConfLog {
    pub(super) fn new(base_index: u64, base: Configuration) -> ConfLog {
        ConfLog {
            base_index,
            current: base.clone(),
            base,
            changes: BTreeMap::new(),
        }
    }

    /// Replaces everything with the configuration of a snapshot at `index`.
    pub(super) fn reset(&mut self, index: u64, conf: Configuration) {
        *self = ConfLog::new(index, conf);
    }

    /// The configuration as of the last entry of the log.
    pub(super) fn current(&self) -> &Configuration {
        &self.current
    }

    /// Whether this node has no configuration at all (never bootstrapped, no snapshot yet).
    pub(super) fn is_unconfigured(&self) -> bool {
        self.base.voters.is_empty() && self.changes.is_empty()
    }

    /// Index of the last configuration entry above `committed`, if any.
    pub(super) fn uncommitted(&self, committed: u64) -> Option<u64> {
        self.changes
            .range(committed + 1..)
            .next_back()
            .map(|(i, _)| *i)
    }

    /// Records `entry` if it is a configuration entry above the base. Returns whether the
    /// configuration changed.
    pub(super) fn record(&mut self, entry: &Entry) -> bool {
        let EntryKind::Config(change) = &entry.kind else {
            return false;
        };
        if entry.index <= self.base_index {
            return false;
        }
        let value = (entry.term, change.clone());
        if self.changes.get(&entry.index) == Some(&value) {
            return false;
        }
        self.changes.insert(entry.index, value);
        self.recompute()
    }

    /// Drops the changes above `after` whose entry is gone from the log (`holds(index, term)`
    /// false), and every change after the first such one. Returns whether the configuration
    /// changed.
    pub(super) fn truncate_missing(
        &mut self,
        after: u64,
        holds: impl Fn(u64, u64) -> bool,
    ) -> bool {
        let gone = self
            .changes
            .range(after + 1..)
            .find(|(i, (t, _))| !holds(**i, *t))
            .map(|(i, _)| *i);
        match gone {
            Some(from) => {
                self.changes.split_off(&from);
                self.recompute()
            }
            None => false,
        }
    }

    /// Folds the changes at or below `committed` (never truncated) into the base.
    pub(super) fn fold_committed(&mut self, committed: u64) {
        while let Some(entry) = self.changes.first_entry() {
            if *entry.key() > committed {
                break;
            }
            let (index, (_, change)) = entry.remove_entry();
            self.base.apply(&change);
            self.base_index = index;
        }
    }

    fn recompute(&mut self) -> bool {
        let mut conf = self.base.clone();
        for (_, change) in self.changes.values() {
            conf.apply(change);
        }
        let changed = conf != self.current;
        self.current = conf;
        changed
    }
}

/// Builds the configuration log of a core starting over `store`: the stored configuration
/// `conf` plus every configuration entry after its index (see the module docs, Recovery).
pub(super) fn recover<S: Storage>(store: &S, conf: Configuration) -> Result<ConfLog, StorageError> {
    let base_index = store.conf_index()?;
    let mut conf_log = ConfLog::new(base_index, conf);
    let first = store.first_index()?;
    let last = store.last_index()?;
    if base_index + 1 < first {
        // Entries between the configuration and the log were compacted: the storage broke
        // its contract.
        return Err(StorageError::Compacted);
    }
    let mut lo = base_index + 1;
    while lo <= last {
        let batch = store.entries(lo, last + 1, 1 << 20)?;
        let Some(end) = batch.last().map(|e| e.index) else {
            break;
        };
        for e in &batch {
            conf_log.record(e);
        }
        lo = end + 1;
    }
    Ok(conf_log)
}

impl<S: Storage> Raft<S> {
    /// The configuration in force: as of the last entry of this node's log.
    pub fn conf(&self) -> &Configuration {
        self.conf_log.current()
    }

    /// Match index of member `id` as this node tracks it (meaningful on the leader).
    pub fn progress_of(&self, id: u64) -> Option<u64> {
        self.tracker.progress.get(&id).map(|p| p.matched)
    }

    /// Index of the uncommitted configuration entry in this node's log, if any.
    pub fn pending_conf_index(&self) -> Option<u64> {
        self.conf_log.uncommitted(self.log.committed)
    }

    /// Appends a configuration change as a new entry of the current term (leader only) and
    /// puts it in force at once (§4.1); returns its index. A removed member still receives
    /// the log until the change commits, so that it learns of its removal. `proposer_term` and `time_ms` as
    /// for [`Raft::propose`]. Refused unless an entry of this term has committed, no other
    /// change is uncommitted and no leader transfer is under way; a promotion also needs the
    /// learner within [`super::RaftConfig::max_promote_lag`] entries of the leader's log.
    pub fn propose_conf_change(
        &mut self,
        change: ConfChange,
        proposer_term: u64,
        time_ms: u64,
    ) -> Result<u64, ConfChangeError> {
        if self.role != Role::Leader {
            return Err(ConfChangeError::NotLeader {
                leader_hint: self.leader,
            });
        }
        if self.transferee.is_some() {
            return Err(ConfChangeError::TransferInProgress);
        }
        if self.log.term(self.log.committed) != Ok(self.term) {
            return Err(ConfChangeError::NoCommitInTerm);
        }
        if self.pending_conf_index().is_some() {
            return Err(ConfChangeError::ChangeInProgress);
        }
        self.conf().check(&change)?;
        // Members removed by the previous (committed) change are gone for good.
        self.tracker.prune();
        let last = self.log.last_index();
        if let ConfChange::Promote { id } = change {
            let matched = self.progress_of(id).unwrap_or(0).min(last);
            let (lag, max) = (last - matched, self.cfg.max_promote_lag);
            if lag > max || matched == 0 {
                return Err(ConfChangeError::LearnerBehind { lag, max });
            }
        }
        let entry = Entry {
            index: last + 1,
            term: self.term,
            proposer_term,
            time_ms: time_ms.max(self.last_entry_time()),
            kind: EntryKind::Config(change),
        };
        let size = entry_size(&entry);
        if size > self.cfg.max_entry_bytes {
            return Err(ConfChangeError::TooLarge {
                size,
                max: self.cfg.max_entry_bytes,
            });
        }
        debug!(id = self.id, index = entry.index, kind = ?entry.kind, "configuration change");
        let index = self.log.append(std::slice::from_ref(&entry));
        self.bcast_pending = true;
        if self.conf_log.record(&entry) {
            self.apply_conf();
        }
        Ok(index)
    }

    /// A follower appended `entries` after `prev_index`: forget configuration entries that
    /// were truncated (rolling back to the last one still in the log, §4.1) and take on new
    /// ones.
    pub(super) fn sync_conf(&mut self, prev_index: u64, entries: &[Entry]) {
        let log = &self.log;
        let mut changed = self
            .conf_log
            .truncate_missing(prev_index, |i, t| log.match_term(i, t));
        for e in entries {
            changed |= self.conf_log.record(e);
        }
        if changed {
            self.apply_conf();
        }
    }

    /// Puts the configuration of the log in force: the progress tracker follows it; a leader
    /// replicates to new members, may commit with the new quorum, aborts a transfer to a
    /// node no longer a voter, and steps down once its own removal is committed.
    pub(super) fn apply_conf(&mut self) {
        let conf = self.conf_log.current();
        if *conf == self.tracker.conf {
            return;
        }
        debug!(id = self.id, conf = ?conf, "configuration in force");
        let conf = conf.clone();
        self.tracker.set_conf(conf, self.log.last_index() + 1);
        self.conf_dirty = true;
        if self.role != Role::Leader {
            self.tracker.prune();
            return;
        }
        if let Some(t) = self.transferee {
            if !self.tracker.conf.voters.contains(&t) {
                self.abort_transfer();
            }
        }
        self.bcast_pending = true;
        self.maybe_commit();
        self.complete_reads();
        self.maybe_step_down_removed();
    }

    /// §4.2.2: a leader outside the configuration leads until that configuration commits,
    /// then tells followers the commit index, hands over to the most up-to-date voter with
    /// TimeoutNow and steps down. It never campaigns again while outside the configuration.
    pub(super) fn maybe_step_down_removed(&mut self) {
        if self.role != Role::Leader
            || self.tracker.conf.voters.contains(&self.id)
            || self.pending_conf_index().is_some()
        {
            return;
        }
        self.commit_dirty = true;
        self.bcast_pending = true;
        self.flush_appends();
        // Sent as a follower's messages, after this Ready is durable: only a leader's
        // appends may go early.
        let appends = std::mem::take(&mut self.msgs_early);
        self.msgs.extend(appends);
        let last = self.log.last_index();
        let best = self
            .tracker
            .conf
            .voters
            .iter()
            .filter_map(|v| self.tracker.progress.get(v).map(|p| (p.matched, *v)))
            .max();
        if let Some((matched, to)) = best {
            if matched == last {
                self.send(to, MessageKind::TimeoutNow);
            }
        }
        warn!(
            id = self.id,
            term = self.term,
            "removed from the configuration; stepping down"
        );
        self.become_follower(self.term, None);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn add(id: u64) -> ConfChange {
        ConfChange::AddLearner {
            id,
            peer_addr: format!("p{id}"),
            client_addr: format!("c{id}"),
        }
    }

    #[test]
    fn s4_1_changes_apply_one_server_at_a_time() {
        let mut c = Configuration::with_voters([1, 2, 3]);
        assert_eq!(
            c.check(&add(2)),
            Err(ConfChangeError::AlreadyMember { id: 2 })
        );
        c.apply(&add(4));
        assert!(c.learners.contains(&4) && !c.voters.contains(&4));
        assert_eq!(c.member(4).map(|m| m.client_addr.as_str()), Some("c4"));
        assert_eq!(
            c.check(&ConfChange::Promote { id: 1 }),
            Err(ConfChangeError::NotLearner { id: 1 })
        );
        c.apply(&ConfChange::Promote { id: 4 });
        assert_eq!(c.voters.len(), 4);
        c.apply(&ConfChange::Remove { id: 4 });
        assert_eq!(c, Configuration::with_voters([1, 2, 3]));
        assert_eq!(
            c.check(&ConfChange::Remove { id: 9 }),
            Err(ConfChangeError::UnknownMember { id: 9 })
        );
        let mut one = Configuration::with_voters([1]);
        assert_eq!(
            one.check(&ConfChange::Remove { id: 1 }),
            Err(ConfChangeError::RemovingLastVoter { id: 1 })
        );
        one.apply(&ConfChange::Remove { id: 1 });
        assert_eq!(one.voters.len(), 1, "an invalid change changes nothing");
    }

    #[test]
    fn s3a_9_incarnation_fixed_once_recorded() {
        let mut c = Configuration::with_voters([1]);
        let id = |inc: u64| ConfChange::Identify {
            id: 1,
            incarnation: inc,
            client_addr: "c1".into(),
        };
        c.apply(&id(7));
        assert_eq!(c.member(1).and_then(|m| m.incarnation), Some(7));
        assert_eq!(
            c.check(&id(8)),
            Err(ConfChangeError::IncarnationMismatch { id: 1, known: 7 })
        );
        assert_eq!(c.check(&id(7)), Err(ConfChangeError::Unchanged { id: 1 }));
    }

    fn conf_entry(index: u64, term: u64, change: ConfChange) -> Entry {
        Entry {
            index,
            term,
            proposer_term: term,
            time_ms: 0,
            kind: EntryKind::Config(change),
        }
    }

    #[test]
    fn s4_1_conf_log_rolls_back_truncated_changes_and_folds_committed_ones() {
        let mut l = ConfLog::new(0, Configuration::with_voters([1, 2, 3]));
        assert!(l.record(&conf_entry(3, 1, add(4))));
        assert!(l.record(&conf_entry(5, 1, ConfChange::Promote { id: 4 })));
        assert_eq!(l.current().voters.len(), 4);
        assert_eq!(l.uncommitted(3), Some(5));
        // Entry 5 replaced by another term's entry: back to the configuration of entry 3.
        assert!(l.truncate_missing(4, |i, t| i == 3 && t == 1));
        assert_eq!(l.current().learners.len(), 1);
        assert_eq!(l.current().voters.len(), 3);
        l.fold_committed(3);
        assert_eq!(l.uncommitted(0), None);
        assert!(
            !l.truncate_missing(0, |_, _| false),
            "folded: never rolled back"
        );
        assert!(l.current().learners.contains(&4));
    }
}
