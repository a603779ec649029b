//! Consensus. For now this holds the log entry format, fixed from the start (DESIGN §3a.12):
//! term, kind, proposer term and entry time. The single-node driver in `node/` appends to its
//! own log and commits; the replicated core replaces exactly that step.
#![deny(clippy::disallowed_types)]

mod entry;

pub use entry::{Entry, EntryKind};
