//! The leader's side of replication: sending appends with per-follower flow control
//! (Probe / Replicate / Snapshot, inflight window, byte-capped batches), handling their
//! answers with fast backtracking (§3.5), advancing commit only by counting entries of the
//! current term (§3.6.2, Figure 3.7), heartbeats, chunked snapshot sending, and completing
//! batched ReadIndex rounds (§6.4).

use tracing::{debug, warn};

use super::core::{Raft, ReadState, Role};
use super::message::{AppendResult, Message, MessageKind};
use super::progress::ProgressState;
use super::read_only::ReadRequest;
use super::storage::{Storage, StorageError};

impl<S: Storage> Raft<S> {
    pub(super) fn step_leader(&mut self, m: Message) {
        if !self.tracker.progress.contains_key(&m.from) {
            if let MessageKind::ReadIndex { .. } | MessageKind::AppendResp { .. } = m.kind {
                debug!(
                    id = self.id,
                    from = m.from,
                    "message from non-member dropped"
                );
            }
            return;
        }
        if let Some(p) = self.tracker.progress.get_mut(&m.from) {
            p.recent_active = true;
        }
        match m.kind {
            MessageKind::AppendResp { result } => self.handle_append_resp(m.from, result),
            MessageKind::HeartbeatResp { read_ctx } => self.handle_heartbeat_resp(m.from, read_ctx),
            MessageKind::SnapshotResp {
                index,
                next_offset,
                reject,
            } => self.handle_snapshot_resp(m.from, index, next_offset, reject),
            MessageKind::ReadIndex { ctx } => {
                self.read_only.add(ReadRequest { ctx, from: m.from });
                self.maybe_start_read_round();
            }
            _ => debug!(id = self.id, kind = m.kind.name(), "leader ignores message"),
        }
    }

    fn handle_append_resp(&mut self, from: u64, result: AppendResult) {
        let last = self.log.last_index();
        let Some(pr) = self.tracker.progress.get_mut(&from) else {
            return;
        };
        match result {
            AppendResult::Match(index) => {
                if index > last {
                    warn!(
                        id = self.id,
                        from, index, last, "append ack beyond our log; dropped"
                    );
                    return;
                }
                let moved = pr.maybe_update(index);
                match pr.state {
                    ProgressState::Probe => pr.become_replicate(),
                    ProgressState::Snapshot => {
                        if pr
                            .snapshot
                            .as_ref()
                            .is_none_or(|s| pr.matched >= s.meta.index)
                        {
                            pr.become_replicate();
                        }
                    }
                    ProgressState::Replicate => pr.inflights.free_le(index),
                }
                if moved {
                    self.maybe_commit();
                    self.maybe_send_timeout_now(from);
                }
                self.bcast_pending = true;
            }
            AppendResult::NeedSnapshot => {
                if pr.state != ProgressState::Snapshot {
                    debug!(id = self.id, from, "member without configuration; snapshot");
                    self.start_snapshot(from);
                }
            }
            AppendResult::Reject {
                rejected,
                hint_index,
                hint_term,
            } => {
                let probe = if hint_term > 0 {
                    self.log.find_conflict_by_term(hint_index, hint_term).0
                } else {
                    hint_index
                };
                let Some(pr) = self.tracker.progress.get_mut(&from) else {
                    return;
                };
                if pr.state == ProgressState::Snapshot {
                    return;
                }
                if pr.maybe_decr_to(rejected, probe) {
                    debug!(
                        id = self.id,
                        from,
                        rejected,
                        next = pr.next,
                        "append rejected; backing off"
                    );
                    if pr.state == ProgressState::Replicate {
                        pr.become_probe();
                    }
                    self.bcast_pending = true;
                }
            }
        }
    }

    fn handle_heartbeat_resp(&mut self, from: u64, read_ctx: u64) {
        let last = self.log.last_index();
        let Some(pr) = self.tracker.progress.get_mut(&from) else {
            return;
        };
        pr.probe_sent = false;
        if pr.state == ProgressState::Replicate && pr.inflights.full() {
            pr.inflights.free_first_one();
        }
        let mut resend_chunk = false;
        if let Some(s) = &mut pr.snapshot {
            s.stalled += 1;
            resend_chunk = s.stalled > 2;
        }
        let lagging = pr.matched < last;
        if lagging {
            // Also recovers a lost last append in Replicate: an empty append at `next - 1`
            // is either acknowledged or rejected (then probing resumes).
            self.send_append(from, true);
            self.bcast_pending = true;
        }
        if resend_chunk {
            self.send_snapshot_chunk(from);
        }
        self.maybe_send_timeout_now(from);
        self.read_only.ack(from, read_ctx);
        self.complete_reads();
    }

    fn handle_snapshot_resp(&mut self, from: u64, index: u64, next_offset: u64, reject: bool) {
        let Some(pr) = self.tracker.progress.get_mut(&from) else {
            return;
        };
        let Some(s) = &mut pr.snapshot else { return };
        if pr.state != ProgressState::Snapshot || s.meta.index != index {
            return;
        }
        if reject {
            debug!(
                id = self.id,
                from, next_offset, "snapshot chunk refused; resuming"
            );
        }
        s.offset = next_offset;
        self.send_snapshot_chunk(from);
    }

    /// Raises commit to the quorum-median of voters' match indexes, only if that entry is of
    /// the current term (§3.6.2: older entries commit indirectly). Returns whether it moved.
    /// A leader whose removal this commits steps down (§4.2.2).
    pub(super) fn maybe_commit(&mut self) -> bool {
        let index = self.tracker.committed_index();
        if index <= self.log.committed || self.log.term(index) != Ok(self.term) {
            return false;
        }
        self.log.commit_to(index);
        self.commit_dirty = true;
        self.bcast_pending = true;
        // The first commit of the term unblocks held reads (§6.4).
        self.maybe_start_read_round();
        self.maybe_step_down_removed();
        true
    }

    /// Sends what each follower needs (called when a Ready is assembled).
    pub(super) fn flush_appends(&mut self) {
        if self.role != Role::Leader || !self.bcast_pending {
            return;
        }
        self.bcast_pending = false;
        let peers: Vec<u64> = self
            .tracker
            .progress
            .keys()
            .copied()
            .filter(|p| *p != self.id)
            .collect();
        for to in peers {
            let allow_empty = self
                .tracker
                .progress
                .get(&to)
                .is_some_and(|p| p.state == ProgressState::Probe || self.commit_dirty);
            let mut first = allow_empty;
            while self.send_append(to, first) {
                first = false;
            }
        }
        self.commit_dirty = false;
    }

    /// Sends one append to `to` if flow control allows; returns whether one with entries was
    /// sent and more may follow. `allow_empty`: send even without entries (a probe, a commit
    /// update, or a check after a heartbeat).
    fn send_append(&mut self, to: u64, allow_empty: bool) -> bool {
        let last = self.log.last_index();
        let commit = self.log.committed;
        let Some(pr) = self.tracker.progress.get(&to) else {
            return false;
        };
        if pr.is_paused() {
            return false;
        }
        let next = pr.next;
        let prev_term = self.log.term(next - 1);
        let entries = self.log.entries(next, last + 1, self.cfg.max_size_per_msg);
        let (prev_term, entries) = match (prev_term, entries) {
            (Ok(t), Ok(es)) => (t, es),
            (Err(StorageError::Compacted), _) | (_, Err(StorageError::Compacted)) => {
                self.start_snapshot(to);
                return false;
            }
            (Err(e), _) | (_, Err(e)) => {
                warn!(id = self.id, to, next, error = %e, "cannot read log for append");
                return false;
            }
        };
        if entries.is_empty() && !allow_empty {
            return false;
        }
        let n = entries.len();
        let last_sent = entries.last().map_or(next - 1, |e| e.index);
        if let Some(pr) = self.tracker.progress.get_mut(&to) {
            pr.sent_entries(n, last_sent);
        }
        let kind = MessageKind::Append {
            prev_index: next - 1,
            prev_term,
            entries,
            commit,
        };
        self.msgs_early.push(Message {
            from: self.id,
            to,
            term: self.term,
            kind,
        });
        n > 0 && last_sent < last
    }

    fn start_snapshot(&mut self, to: u64) {
        let meta = match self.log.store.snapshot_meta() {
            Ok(m) if m.index > 0 => m,
            Ok(_) | Err(_) => {
                warn!(
                    id = self.id,
                    to, "follower needs a snapshot but none is available"
                );
                return;
            }
        };
        debug!(id = self.id, to, index = meta.index, "sending snapshot");
        if let Some(pr) = self.tracker.progress.get_mut(&to) {
            pr.become_snapshot(meta);
        }
        self.send_snapshot_chunk(to);
    }

    /// Sends the chunk at the current offset of the transfer to `to`.
    fn send_snapshot_chunk(&mut self, to: u64) {
        let Some(pr) = self.tracker.progress.get_mut(&to) else {
            return;
        };
        let Some(s) = &mut pr.snapshot else { return };
        s.stalled = 0;
        let (meta, offset) = (s.meta.clone(), s.offset);
        match self
            .log
            .store
            .snapshot_chunk(meta.index, offset, self.cfg.max_size_per_msg)
        {
            Ok((data, last)) => {
                self.send(
                    to,
                    MessageKind::InstallSnapshot {
                        meta,
                        offset,
                        data,
                        last,
                    },
                );
            }
            Err(e) => {
                debug!(id = self.id, to, error = %e, "snapshot gone; restarting transfer");
                pr.snapshot = None;
                pr.become_probe();
                self.bcast_pending = true;
            }
        }
    }

    /// Heartbeats to every member, carrying the ReadIndex round in flight.
    pub(super) fn bcast_heartbeat(&mut self) {
        let read_ctx = self.read_only.current_id();
        let committed = self.log.committed;
        let targets: Vec<(u64, u64)> = self
            .tracker
            .progress
            .iter()
            .filter(|(id, _)| **id != self.id)
            .map(|(id, p)| (*id, p.matched.min(committed)))
            .collect();
        for (to, commit) in targets {
            self.send(to, MessageKind::Heartbeat { commit, read_ctx });
        }
    }

    /// Starts a ReadIndex round if reads wait, none is in flight, and an entry of this term
    /// is committed (§6.4); completes it at once with a single voter.
    pub(super) fn maybe_start_read_round(&mut self) {
        if self.role != Role::Leader || self.log.term(self.log.committed) != Ok(self.term) {
            return;
        }
        if self
            .read_only
            .maybe_start(self.log.committed, self.id)
            .is_some()
        {
            self.bcast_heartbeat();
            self.complete_reads();
        }
    }

    /// Answers the round in flight if a quorum confirmed it, then starts the next one.
    pub(super) fn complete_reads(&mut self) {
        let tracker = &self.tracker;
        let Some(round) = self.read_only.take_if(|acks| tracker.has_quorum(acks)) else {
            return;
        };
        for req in round.requests {
            if req.from == self.id {
                self.read_states.push(ReadState {
                    ctx: req.ctx,
                    index: round.index,
                });
            } else {
                self.send(
                    req.from,
                    MessageKind::ReadIndexResp {
                        ctx: req.ctx,
                        index: round.index,
                    },
                );
            }
        }
        self.maybe_start_read_round();
    }
}
