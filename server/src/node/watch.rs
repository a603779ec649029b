//! Watch streams of one connection (DESIGN §3a.13).
//!
//! The event loop publishes the events of each commit, after the commit, as one shared
//! `Arc` on a broadcast channel, and only then advances the published applied index. Each
//! connection with watches receives them, filters them per watch and turns them into
//! `WatchEvents` frames; fan-out never runs on the commit path. A watch starting in the past
//! first replays the event history kept in redb. A connection that falls behind the channel
//! (a slow reader) ends its watches with `Lagged { resume_from }`; a start older than the
//! kept history gets `Compacted { oldest }`. Progress notifications (bookmarks) say "every
//! event up to revision R has been sent", so a quiet watch resumes from a recent revision.

use std::collections::BTreeMap;
use std::sync::Arc;

use lockd_protocol::{
    Error, Event, EventKind, Reply, Revision, ServerMessage, WatchRequest, WatchTarget,
};
use tokio::sync::broadcast;

use super::Node;

/// Events of one commit, in revision order.
#[derive(Debug)]
pub struct Published {
    pub events: Vec<Event>,
    /// The node installed a snapshot: the revisions it skipped were never published here, so
    /// every watch ends with `Lagged` and resumes from the event history the snapshot carries
    /// (DESIGN §3a.10).
    pub reset: bool,
}

/// Most events read from the history for one catch-up.
const MAX_CATCH_UP_EVENTS: usize = 200_000;

#[derive(Debug)]
struct WatchState {
    target: WatchTarget,
    with_data: bool,
    /// Every event below this revision has been sent (or filtered out).
    next_rev: Revision,
}

/// The watches of one connection.
#[derive(Debug, Default)]
pub struct Watches {
    watches: BTreeMap<u64, WatchState>,
    next_id: u64,
    events: Option<broadcast::Receiver<Arc<Published>>>,
    /// Frames to send after the current reply (catch-up events of a new watch).
    pub outbox: Vec<ServerMessage>,
    max_frame_bytes: usize,
}

fn path_of(kind: &EventKind) -> Option<&str> {
    match kind {
        EventKind::Created { path, .. }
        | EventKind::Changed { path, .. }
        | EventKind::Deleted { path } => Some(path),
        _ => None,
    }
}

fn matches(target: &WatchTarget, kind: &EventKind) -> bool {
    match target {
        WatchTarget::Node(p) => path_of(kind) == Some(p),
        WatchTarget::Children(p) => {
            path_of(kind).and_then(lockd_protocol::path::parent) == Some(p.as_str())
        }
        WatchTarget::Prefix(p) => path_of(kind).is_some_and(|path| {
            p == "/"
                || path == p
                || (path.starts_with(p.as_str()) && path.as_bytes().get(p.len()) == Some(&b'/'))
        }),
        WatchTarget::Session(s) => match kind {
            EventKind::SessionEnded { session, .. }
            | EventKind::LockGranted { session, .. }
            | EventKind::LockReleased { session, .. }
            | EventKind::LockRevoked { session, .. }
            | EventKind::LockWaitEnded { session, .. } => session == s,
            _ => false,
        },
        WatchTarget::Lock(name) => match kind {
            EventKind::LockGranted { lock, .. }
            | EventKind::LockReleased { lock, .. }
            | EventKind::LockRevoked { lock, .. }
            | EventKind::LockWaitEnded { lock, .. } => lock == name,
            _ => false,
        },
    }
}

/// A copy of `event` without node data (copying the data only to drop it would cost a large
/// allocation per watcher).
fn without_data(event: &Event) -> Event {
    let kind = match &event.kind {
        EventKind::Created { path, stat, .. } => EventKind::Created {
            path: path.clone(),
            stat: stat.clone(),
            data: None,
        },
        EventKind::Changed { path, stat, .. } => EventKind::Changed {
            path: path.clone(),
            stat: stat.clone(),
            data: None,
        },
        other => other.clone(),
    };
    Event {
        revision: event.revision,
        kind,
    }
}

fn approx_size(event: &Event) -> usize {
    let data = match &event.kind {
        EventKind::Created { data, path, .. } | EventKind::Changed { data, path, .. } => {
            data.as_ref().map_or(0, Vec::len) + path.len()
        }
        EventKind::LockGranted { value, lock, .. } => value.len() + lock.len(),
        _ => 64,
    };
    data + 96
}

impl Watches {
    /// Whether any watch is open (the connection then listens to published events).
    pub fn is_empty(&self) -> bool {
        self.watches.is_empty()
    }

    /// The channel of published events, once a watch exists.
    pub fn receiver(&mut self) -> Option<&mut broadcast::Receiver<Arc<Published>>> {
        self.events.as_mut()
    }

    /// Opens a watch: answers with its id and concrete start revision, and queues the
    /// history events from the start revision on in `outbox`.
    pub fn create(
        &mut self,
        node: &Node,
        request: WatchRequest,
    ) -> (Revision, Result<Reply, Error>) {
        if let Err(e) = validate_target(&request.target) {
            return (0, Err(e));
        }
        self.max_frame_bytes = node.config().max_frame / 2;
        if self.events.is_none() {
            // Subscribe before reading the applied index: nothing published after it is missed.
            self.events = Some(node.subscribe_events());
        }
        let applied = node.published_index();
        let start = request.start_revision.unwrap_or(applied + 1).max(1);
        if start > applied + 1 {
            return (
                applied,
                Err(Error::FutureRevision {
                    requested: start,
                    applied,
                }),
            );
        }
        let mut state = WatchState {
            target: request.target,
            with_data: request.with_data,
            next_rev: start,
        };
        if start <= applied {
            match node.history(start, MAX_CATCH_UP_EVENTS) {
                Ok(history) => {
                    let id = self.next_id + 1;
                    let events: Vec<Event> = history
                        .into_iter()
                        .filter(|e| e.revision <= applied)
                        .collect();
                    deliver(
                        &mut self.outbox,
                        self.max_frame_bytes,
                        id,
                        &mut state,
                        &events,
                    );
                }
                Err(e) => return (applied, Err(e)),
            }
            state.next_rev = applied + 1;
        }
        self.next_id += 1;
        let watch_id = self.next_id;
        // Catch-up frames were built under the id that is now assigned.
        self.watches.insert(watch_id, state);
        (
            applied,
            Ok(Reply::WatchCreated {
                watch_id,
                start_revision: start,
            }),
        )
    }

    /// Ends a watch.
    pub fn cancel(&mut self, watch_id: u64) -> Result<Reply, Error> {
        match self.watches.remove(&watch_id) {
            Some(_) => Ok(Reply::WatchCancelled),
            None => Err(Error::NoSuchWatch { watch_id }),
        }
    }

    /// Turns published events into frames in `outbox`.
    pub fn on_published(&mut self, published: &Published) {
        if published.reset {
            self.on_lagged();
            return;
        }
        // Runs per connection per commit: borrow the fields apart instead of moving watches.
        for (id, state) in &mut self.watches {
            deliver(
                &mut self.outbox,
                self.max_frame_bytes,
                *id,
                state,
                &published.events,
            );
        }
    }

    /// The connection fell behind the channel: every watch ends with `Lagged`.
    pub fn on_lagged(&mut self) {
        for (watch_id, state) in std::mem::take(&mut self.watches) {
            let reason = Error::Lagged {
                resume_from: state.next_rev,
            };
            self.outbox
                .push(ServerMessage::WatchEnded { watch_id, reason });
        }
        self.events = None;
    }

    /// Bookmarks: every watch has been sent everything up to `revision`.
    pub fn progress(&mut self, revision: Revision) {
        for (watch_id, state) in &mut self.watches {
            if state.next_rev <= revision {
                state.next_rev = revision + 1;
            }
            self.outbox.push(ServerMessage::WatchProgress {
                watch_id: *watch_id,
                revision: state.next_rev - 1,
            });
        }
    }

    /// Ends every watch with `reason` (shutdown).
    pub fn end_all(&mut self, reason: Error) {
        for (watch_id, _) in std::mem::take(&mut self.watches) {
            self.outbox.push(ServerMessage::WatchEnded {
                watch_id,
                reason: reason.clone(),
            });
        }
    }
}

/// Queues in `outbox` frames for the events of `events` that `state` wants and has not had,
/// split by size (anywhere, even inside a revision), with `revision_complete` marking the
/// frames that end a revision.
fn deliver(
    outbox: &mut Vec<ServerMessage>,
    max_frame_bytes: usize,
    watch_id: u64,
    state: &mut WatchState,
    events: &[Event],
) {
    let mut frame: Vec<Event> = Vec::new();
    let mut bytes = 0;
    for (i, event) in events.iter().enumerate() {
        if event.revision < state.next_rev {
            continue;
        }
        if matches(&state.target, &event.kind) {
            let event = if state.with_data {
                event.clone()
            } else {
                without_data(event)
            };
            bytes += approx_size(&event);
            frame.push(event);
        }
        let revision_ends = events
            .get(i + 1)
            .is_none_or(|next| next.revision != event.revision);
        if revision_ends {
            state.next_rev = event.revision + 1;
        }
        if bytes >= max_frame_bytes.max(1) && !frame.is_empty() {
            let events = std::mem::take(&mut frame);
            outbox.push(ServerMessage::WatchEvents {
                watch_id,
                events,
                revision_complete: revision_ends,
            });
            bytes = 0;
        }
    }
    if !frame.is_empty() {
        outbox.push(ServerMessage::WatchEvents {
            watch_id,
            events: frame,
            revision_complete: true,
        });
    }
}

fn validate_target(target: &WatchTarget) -> Result<(), Error> {
    match target {
        WatchTarget::Node(p) | WatchTarget::Children(p) | WatchTarget::Prefix(p) => {
            lockd_protocol::path::validate(p)
        }
        WatchTarget::Lock(name) => crate::fsm::locks::validate_name(name),
        WatchTarget::Session(_) => Ok(()),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn created(rev: u64, path: &str) -> Event {
        Event {
            revision: rev,
            kind: EventKind::Created {
                path: path.into(),
                stat: Default::default(),
                data: Some(b"d".to_vec()),
            },
        }
    }

    #[test]
    fn targets_match_their_events() {
        let kind = created(1, "/a/b").kind;
        assert!(matches(&WatchTarget::Node("/a/b".into()), &kind));
        assert!(!matches(&WatchTarget::Node("/a".into()), &kind));
        assert!(matches(&WatchTarget::Children("/a".into()), &kind));
        assert!(!matches(&WatchTarget::Children("/".into()), &kind));
        assert!(matches(&WatchTarget::Prefix("/a".into()), &kind));
        assert!(matches(&WatchTarget::Prefix("/".into()), &kind));
        assert!(!matches(&WatchTarget::Prefix("/a/b/c".into()), &kind));
        assert!(!matches(
            &WatchTarget::Prefix("/a/".into()),
            &created(1, "/ab").kind
        ));
        assert!(!matches(
            &WatchTarget::Prefix("/a".into()),
            &created(1, "/ab").kind
        ));
    }

    #[test]
    fn a_revision_is_delivered_once_and_large_ones_span_frames_marked_incomplete() {
        let mut watches = Watches {
            max_frame_bytes: 300,
            ..Watches::default()
        };
        let mut state = WatchState {
            target: WatchTarget::Prefix("/".into()),
            with_data: false,
            next_rev: 2,
        };
        let events: Vec<Event> = (0..10)
            .map(|i| created(3, &format!("/n{i}")))
            .chain([created(1, "/old"), created(4, "/x")])
            .collect();
        deliver(
            &mut watches.outbox,
            watches.max_frame_bytes,
            7,
            &mut state,
            &events,
        );
        let frames: Vec<_> = std::mem::take(&mut watches.outbox);
        let mut seen = 0;
        for (i, frame) in frames.iter().enumerate() {
            let ServerMessage::WatchEvents {
                events,
                revision_complete,
                ..
            } = frame
            else {
                panic!()
            };
            seen += events.len();
            assert!(
                events.iter().all(|e| e.revision >= 2),
                "nothing below next_rev"
            );
            if i + 1 < frames.len() {
                assert!(events.iter().all(|e| e.revision == 3));
            }
            if events.last().is_some_and(|e| e.revision == 3) && *revision_complete {
                assert!(events.iter().all(|e| e.revision == 3));
            }
        }
        assert_eq!(seen, 11);
        assert!(frames.len() > 2, "split by size");
        assert_eq!(state.next_rev, 5);
        // Delivered again: nothing new.
        deliver(
            &mut watches.outbox,
            watches.max_frame_bytes,
            7,
            &mut state,
            &events,
        );
        assert!(watches.outbox.is_empty());
    }
}
