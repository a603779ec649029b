//! The core's view of the log: stable entries (in [`Storage`], persisted by the driver), an
//! unstable suffix (appended here, handed out in a Ready, not yet durable), a pending
//! snapshot received from a leader, and the commit and applied indexes. No IO: the driver
//! moves entries from unstable to stable by persisting them and calling `advance`.

use tracing::warn;

use super::message::{entry_size, Snapshot};
use super::storage::{Storage, StorageError};
use super::Entry;

/// The log of one core.
#[derive(Debug)]
pub struct RaftLog<S> {
    /// Durable entries and snapshots, written by the driver.
    pub(super) store: S,
    /// A snapshot received from the leader, not yet installed by the driver. While set, it
    /// replaces the whole stored log: indexes ≤ its index are compacted.
    pending_snapshot: Option<Snapshot>,
    /// Entries not yet durable. Invariant: consecutive, the first at `unstable_offset`.
    unstable: Vec<Entry>,
    /// Index of the first unstable entry (= last stable index + 1 when the log is consistent).
    unstable_offset: u64,
    /// Highest index known committed. Invariant: `applied ≤ committed ≤ last_index()`.
    pub(super) committed: u64,
    /// Highest index handed out to apply and acknowledged by `advance`.
    pub(super) applied: u64,
}

impl<S: Storage> RaftLog<S> {
    /// A log over `store`, with the commit index from the hard state and the driver's
    /// applied index.
    pub fn new(store: S, committed: u64, applied: u64) -> Result<RaftLog<S>, StorageError> {
        let last = store.last_index()?;
        let first = store.first_index()?;
        let committed = committed.clamp(first - 1, last);
        Ok(RaftLog {
            store,
            pending_snapshot: None,
            unstable: Vec::new(),
            unstable_offset: last + 1,
            committed,
            applied: applied.clamp(first - 1, committed),
        })
    }

    /// First index held as an entry.
    pub fn first_index(&self) -> u64 {
        match &self.pending_snapshot {
            Some(s) => s.meta.index + 1,
            None => self.store.first_index().unwrap_or(1),
        }
    }

    /// Last index of the log (unstable entries included).
    pub fn last_index(&self) -> u64 {
        if let Some(e) = self.unstable.last() {
            return e.index;
        }
        match &self.pending_snapshot {
            Some(s) => s.meta.index,
            None => self.unstable_offset - 1,
        }
    }

    /// Term of the entry at `index`.
    pub fn term(&self, index: u64) -> Result<u64, StorageError> {
        if let Some(s) = &self.pending_snapshot {
            if index == s.meta.index {
                return Ok(s.meta.term);
            }
            if index < s.meta.index {
                return Err(StorageError::Compacted);
            }
        }
        if index >= self.unstable_offset {
            return self
                .unstable
                .get((index - self.unstable_offset) as usize)
                .map(|e| e.term)
                .ok_or(StorageError::Unavailable);
        }
        if self.pending_snapshot.is_some() {
            return Err(StorageError::Unavailable);
        }
        self.store.term(index)
    }

    /// Term of the last entry.
    pub fn last_term(&self) -> u64 {
        self.term(self.last_index()).unwrap_or(0)
    }

    /// Whether the entry at `index` has `term`.
    pub fn match_term(&self, index: u64, term: u64) -> bool {
        self.term(index) == Ok(term)
    }

    /// Whether a log ending at (`last_index`, `last_term`) is at least as up to date as this
    /// one (§3.6.1).
    pub fn is_up_to_date(&self, last_index: u64, last_term: u64) -> bool {
        let my_term = self.last_term();
        last_term > my_term || (last_term == my_term && last_index >= self.last_index())
    }

    /// Entries in `[lo, hi)`, capped at `max_bytes` (at least one entry).
    pub fn entries(&self, lo: u64, hi: u64, max_bytes: u64) -> Result<Vec<Entry>, StorageError> {
        if lo < self.first_index() {
            return Err(StorageError::Compacted);
        }
        let hi = hi.min(self.last_index() + 1);
        if lo >= hi {
            return Ok(Vec::new());
        }
        let mut out = Vec::new();
        if lo < self.unstable_offset {
            out = self
                .store
                .entries(lo, hi.min(self.unstable_offset), max_bytes)?;
            if hi <= self.unstable_offset || (out.len() as u64) < self.unstable_offset - lo {
                return Ok(out);
            }
        }
        let mut size: u64 = out.iter().map(entry_size).sum();
        let from = lo.max(self.unstable_offset);
        for e in &self.unstable[(from - self.unstable_offset) as usize..] {
            if e.index >= hi {
                break;
            }
            size = size.saturating_add(entry_size(e));
            if !out.is_empty() && size > max_bytes {
                break;
            }
            out.push(e.clone());
        }
        Ok(out)
    }

    /// Appends entries (consecutive), truncating any conflicting suffix. Returns the new last
    /// index. Callers never truncate at or below `committed`.
    pub fn append(&mut self, entries: &[Entry]) -> u64 {
        let Some(first) = entries.first() else {
            return self.last_index();
        };
        let after = first.index;
        let end = self.unstable_offset + self.unstable.len() as u64;
        if after == end {
            self.unstable.extend_from_slice(entries);
        } else if after <= self.unstable_offset {
            // Replaces stable entries too: the driver overwrites them when persisting.
            self.unstable_offset = after;
            self.unstable = entries.to_vec();
        } else {
            self.unstable
                .truncate((after - self.unstable_offset) as usize);
            self.unstable.extend_from_slice(entries);
        }
        self.last_index()
    }

    /// The follower's side of AppendEntries: if the log holds (`prev_index`, `prev_term`),
    /// appends what is new and advances commit; returns the last index the request covers.
    /// `None` if the log does not match at `prev_index`, or the request would truncate a
    /// committed entry (a bad message: logged and refused).
    pub fn maybe_append(
        &mut self,
        prev_index: u64,
        prev_term: u64,
        commit: u64,
        entries: &[Entry],
    ) -> Option<u64> {
        if !self.match_term(prev_index, prev_term) {
            return None;
        }
        let last_new = prev_index + entries.len() as u64;
        let conflict = entries
            .iter()
            .find(|e| !self.match_term(e.index, e.term))
            .map(|e| e.index);
        if let Some(c) = conflict {
            if c <= self.committed {
                warn!(
                    conflict = c,
                    committed = self.committed,
                    "append conflicts with committed entry; dropped"
                );
                return None;
            }
            self.append(&entries[(c - prev_index - 1) as usize..]);
        }
        self.commit_to(commit.min(last_new));
        Some(last_new)
    }

    /// The last index ≤ `index` whose term ≤ `term`, with its term (fast backtracking, §3.5).
    /// An index whose term is unknown (compacted) is returned with term 0.
    pub fn find_conflict_by_term(&self, index: u64, term: u64) -> (u64, u64) {
        let mut i = index.min(self.last_index());
        while i > 0 {
            match self.term(i) {
                Ok(t) if t <= term => return (i, t),
                Ok(_) => i -= 1,
                Err(_) => return (i, 0),
            }
        }
        (0, 0)
    }

    /// Raises the commit index (never lowers it, never beyond the last index).
    pub fn commit_to(&mut self, index: u64) {
        let index = index.min(self.last_index());
        if index > self.committed {
            self.committed = index;
        }
    }

    /// Marks entries up to (`index`, `term`) durable, if they are still in the log.
    pub fn stable_to(&mut self, index: u64, term: u64) {
        if index < self.unstable_offset || !self.match_term(index, term) {
            return;
        }
        let n = (index + 1 - self.unstable_offset) as usize;
        self.unstable.drain(..n.min(self.unstable.len()));
        self.unstable_offset = index + 1;
    }

    /// Marks the pending snapshot at `index` installed by the driver.
    pub fn stable_snapshot_to(&mut self, index: u64) {
        if self
            .pending_snapshot
            .as_ref()
            .is_some_and(|s| s.meta.index == index)
        {
            self.pending_snapshot = None;
            self.applied = self.applied.max(index);
        }
    }

    /// Records that entries up to `index` have been applied.
    pub fn applied_to(&mut self, index: u64) {
        if index > self.applied && index <= self.committed {
            self.applied = index;
        }
    }

    /// Last index known durable (0 while a received snapshot awaits installation).
    pub fn stable_last(&self) -> u64 {
        if self.pending_snapshot.is_some() {
            return 0;
        }
        self.unstable_offset - 1
    }

    /// Entries not yet durable.
    pub fn unstable_entries(&self) -> &[Entry] {
        &self.unstable
    }

    /// The snapshot waiting to be installed.
    pub fn pending_snapshot(&self) -> Option<&Snapshot> {
        self.pending_snapshot.as_ref()
    }

    /// Committed entries not yet applied, capped at `max_bytes`.
    pub fn next_committed_entries(&self, max_bytes: u64) -> Vec<Entry> {
        let lo = (self.applied + 1).max(self.first_index());
        if lo > self.committed {
            return Vec::new();
        }
        self.entries(lo, self.committed + 1, max_bytes)
            .unwrap_or_default()
    }

    /// Replaces the log with a snapshot received from the leader (§5.3): everything up to its
    /// index is covered, entries after it are discarded, commit moves to its index.
    pub fn restore(&mut self, snapshot: Snapshot) {
        self.committed = snapshot.meta.index;
        self.unstable_offset = snapshot.meta.index + 1;
        self.unstable.clear();
        self.pending_snapshot = Some(snapshot);
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::raft::{EntryKind, MemStorage};

    fn ent(index: u64, term: u64) -> Entry {
        Entry {
            index,
            term,
            proposer_term: term,
            time_ms: 0,
            kind: EntryKind::Noop,
        }
    }

    fn log_with(stable: &[Entry], unstable: &[Entry]) -> RaftLog<MemStorage> {
        let mut s = MemStorage::new_with_voters([1]);
        s.append(stable);
        let mut l = RaftLog::new(s, 0, 0).unwrap();
        l.append(unstable);
        l
    }

    #[test]
    fn s3_5_entries_span_stable_and_unstable_with_byte_cap() {
        let l = log_with(&[ent(1, 1), ent(2, 1)], &[ent(3, 2), ent(4, 2)]);
        let all: Vec<u64> = l
            .entries(1, 5, u64::MAX)
            .unwrap()
            .iter()
            .map(|e| e.index)
            .collect();
        assert_eq!(all, vec![1, 2, 3, 4]);
        let one = entry_size(&ent(1, 1));
        let capped: Vec<u64> = l
            .entries(2, 5, 2 * one)
            .unwrap()
            .iter()
            .map(|e| e.index)
            .collect();
        assert_eq!(capped, vec![2, 3]);
        assert_eq!(l.entries(1, 5, 0).unwrap().len(), 1, "always one entry");
        assert_eq!(l.entries(0, 2, u64::MAX), Err(StorageError::Compacted));
    }

    #[test]
    fn s3_5_conflicting_suffix_truncated_even_below_stable() {
        let mut l = log_with(&[ent(1, 1), ent(2, 1), ent(3, 1)], &[]);
        assert_eq!(l.maybe_append(1, 1, 0, &[ent(2, 2), ent(3, 2)]), Some(3));
        assert_eq!(l.term(2), Ok(2));
        assert_eq!(
            l.unstable_entries().len(),
            2,
            "replacements are unstable until persisted"
        );
        // A stale Ready of the old entries cannot mark the new ones durable.
        l.stable_to(3, 1);
        assert_eq!(l.unstable_entries().len(), 2);
        l.stable_to(3, 2);
        assert!(l.unstable_entries().is_empty());
    }

    #[test]
    fn s3_5_mismatch_and_committed_conflicts_refused() {
        let mut l = log_with(&[ent(1, 1), ent(2, 1)], &[]);
        assert_eq!(
            l.maybe_append(2, 2, 0, &[ent(3, 2)]),
            None,
            "prev term mismatch"
        );
        l.commit_to(2);
        assert_eq!(
            l.maybe_append(1, 1, 2, &[ent(2, 3)]),
            None,
            "would truncate a committed entry"
        );
        assert_eq!(l.term(2), Ok(1));
    }

    #[test]
    fn s3_5_find_conflict_by_term_skips_a_term() {
        let l = log_with(
            &[ent(1, 1), ent(2, 2), ent(3, 2), ent(4, 2), ent(5, 4)],
            &[],
        );
        assert_eq!(l.find_conflict_by_term(5, 3), (4, 2));
        assert_eq!(l.find_conflict_by_term(9, 9), (5, 4));
        assert_eq!(l.find_conflict_by_term(4, 1), (1, 1));
        assert_eq!(l.find_conflict_by_term(4, 0), (0, 0));
    }

    #[test]
    fn s5_3_restore_replaces_log_and_moves_commit() {
        let mut l = log_with(&[ent(1, 1)], &[ent(2, 1)]);
        let meta = crate::raft::SnapshotMeta {
            index: 10,
            term: 3,
            ..Default::default()
        };
        l.restore(Snapshot { meta, data: vec![] });
        assert_eq!((l.first_index(), l.last_index(), l.committed), (11, 10, 10));
        assert_eq!(l.term(10), Ok(3));
        assert_eq!(l.term(5), Err(StorageError::Compacted));
        assert!(l.next_committed_entries(u64::MAX).is_empty());
        l.append(&[ent(11, 3)]);
        l.stable_snapshot_to(10);
        assert_eq!(l.applied, 10);
        assert_eq!(l.last_index(), 11);
    }
}
