//! Scenario tests of the core over an in-memory network, named after the dissertation
//! sections (or DESIGN rules) they check.

mod election;
mod membership;
mod network;
mod read_index;
mod replication;
mod snapshot;
mod transfer;
