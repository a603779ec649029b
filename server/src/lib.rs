//! lockd server: a coordination service (sessions, ephemeral nodes, exactly-once writes)
//! kept in a redb store behind a length-prefixed binary protocol.
//!
//! Layers, from pure to IO: [`fsm`] (the deterministic state machine), [`raft`] (the log
//! entry format; the consensus core), [`storage`] (redb tables and the group commit), and
//! [`node`] (the only place with IO: the event loop, sessions' deadlines, client
//! connections). [`run`] serves clients on a listener until a shutdown future resolves.
#![warn(clippy::unwrap_used)]

pub mod config;
pub mod fsm;
pub mod node;
pub mod raft;
pub mod sim;
pub mod storage;

pub use config::Config;
pub use node::{run, ServerError};
