//! Coordination recipes built on the server's first-class locks and watches: [`lock`]
//! (exclusive locks with fencing tokens and a `lost()` signal) and [`election`] (leader
//! election with observers).
//!
//! Losing a lock must be impossible to miss: a guard's `lost()` future and cancellation
//! token fire when its grant is revoked, when its session expires, or at the session's safe
//! bound (the send time of the last answered keepalive + TTL − a margin for clock rate and
//! tick, DESIGN §3a.5), whichever comes first, even if the server cannot be reached. Work done
//! under a lock should stop then; outside resources are protected against a paused holder
//! only if they check the fencing token.

pub mod election;
pub mod lock;
pub(crate) mod lock_hub;
