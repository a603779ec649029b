//! The follower's side of replication: AppendEntries (consistency check, truncation of
//! conflicting suffixes, reject hints for fast backtracking) and chunked InstallSnapshot
//! (staging, and the rule of DESIGN §3a.10: a snapshot at or below commit, or already in the
//! log, is not installed). Every answer goes out only after the Ready that carries the
//! corresponding state is durable.

use tracing::{debug, warn};

use super::core::{Raft, Staging};
use super::message::{AppendResult, MessageKind, Snapshot, SnapshotMeta};
use super::storage::Storage;
use super::Entry;

/// Whether entries of an Append from a leader of `term` are well-formed: consecutive from
/// `prev_index + 1`, terms non-decreasing from `prev_term` and never above `term`.
fn entries_well_formed(term: u64, prev_index: u64, prev_term: u64, entries: &[Entry]) -> bool {
    let mut last_term = prev_term;
    for (i, e) in entries.iter().enumerate() {
        let expected = prev_index.checked_add(1 + i as u64);
        if expected != Some(e.index) || e.term < last_term || e.term > term {
            return false;
        }
        last_term = e.term;
    }
    prev_term <= term
}

impl<S: Storage> Raft<S> {
    pub(super) fn handle_append(
        &mut self,
        from: u64,
        term: u64,
        prev_index: u64,
        prev_term: u64,
        entries: &[Entry],
        commit: u64,
    ) {
        if !entries_well_formed(term, prev_index, prev_term, entries) {
            warn!(id = self.id, from, prev_index, "malformed append dropped");
            return;
        }
        if self.conf_log.is_unconfigured() {
            // A new member: its first entries need the configuration they build on, which
            // only a snapshot carries (raft/membership.rs).
            self.send(
                from,
                MessageKind::AppendResp {
                    result: AppendResult::NeedSnapshot,
                },
            );
            return;
        }
        if prev_index < self.log.committed {
            let committed = self.log.committed;
            self.send(
                from,
                MessageKind::AppendResp {
                    result: AppendResult::Match(committed),
                },
            );
            return;
        }
        if let Some(last) = self
            .log
            .maybe_append(prev_index, prev_term, commit, entries)
        {
            self.sync_conf(prev_index, entries);
            self.send(
                from,
                MessageKind::AppendResp {
                    result: AppendResult::Match(last),
                },
            );
            return;
        }
        if self.log.match_term(prev_index, prev_term) {
            // maybe_append refused to truncate a committed entry: already logged.
            return;
        }
        let (hint_index, hint_term) = self
            .log
            .find_conflict_by_term(prev_index.min(self.log.last_index()), prev_term);
        debug!(
            id = self.id,
            from, prev_index, hint_index, hint_term, "append rejected"
        );
        let result = AppendResult::Reject {
            rejected: prev_index,
            hint_index,
            hint_term,
        };
        self.send(from, MessageKind::AppendResp { result });
    }

    /// Whether a snapshot need not be installed: at or below commit, or already in the log
    /// (§3a.10). In the latter case commit advances to its index.
    fn snapshot_redundant(&mut self, meta: &SnapshotMeta) -> bool {
        if meta.index <= self.log.committed {
            return true;
        }
        if self.log.match_term(meta.index, meta.term) {
            self.log.commit_to(meta.index);
            return true;
        }
        false
    }

    pub(super) fn handle_snapshot_chunk(
        &mut self,
        from: u64,
        meta: SnapshotMeta,
        offset: u64,
        data: Vec<u8>,
        last: bool,
    ) {
        if meta.index == 0 || meta.term == 0 || meta.index == u64::MAX || meta.term > self.term {
            warn!(id = self.id, from, "snapshot without index or term dropped");
            return;
        }
        let index = meta.index;
        if offset == 0 {
            if self.snapshot_redundant(&meta) {
                self.staging = None;
                let committed = self.log.committed;
                self.send(
                    from,
                    MessageKind::AppendResp {
                        result: AppendResult::Match(committed),
                    },
                );
                return;
            }
            self.staging = Some(Staging { meta, data });
        } else {
            let expected = match &self.staging {
                Some(s) if s.meta == meta => s.data.len() as u64,
                _ => 0,
            };
            if expected != offset {
                self.send(
                    from,
                    MessageKind::SnapshotResp {
                        index,
                        next_offset: expected,
                        reject: true,
                    },
                );
                return;
            }
            if let Some(s) = &mut self.staging {
                s.data.extend_from_slice(&data);
            }
        }
        if !last {
            let next_offset = self.staging.as_ref().map_or(0, |s| s.data.len() as u64);
            self.send(
                from,
                MessageKind::SnapshotResp {
                    index,
                    next_offset,
                    reject: false,
                },
            );
            return;
        }
        let Some(staged) = self.staging.take() else {
            return;
        };
        if self.snapshot_redundant(&staged.meta) {
            let committed = self.log.committed;
            self.send(
                from,
                MessageKind::AppendResp {
                    result: AppendResult::Match(committed),
                },
            );
            return;
        }
        debug!(
            id = self.id,
            index,
            term = staged.meta.term,
            "installing snapshot"
        );
        self.conf_log.reset(index, staged.meta.conf.clone());
        self.log.restore(Snapshot {
            meta: staged.meta,
            data: staged.data,
        });
        self.apply_conf();
        self.send(
            from,
            MessageKind::AppendResp {
                result: AppendResult::Match(index),
            },
        );
    }
}
