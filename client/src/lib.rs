//! Async Rust client for lockd, and the library behind the `lockctl` CLI.
//!
//! Layers: a private connection module (one framed TCP connection, a reader and a writer
//! task, many requests in flight) → [`Client`] (requests, retries, reconnects, the default
//! session) → [`Session`] (keepalives, safe bound, exactly-once writes). Operations are
//! builders that send when awaited:
//!
//! ```no_run
//! # async fn demo() -> Result<(), lockd_client::Error> {
//! use std::time::Duration;
//! use lockd_client::Client;
//!
//! let client = Client::connect(["127.0.0.1:7001"]).await?;
//! client.create("/services", Vec::new()).await?;
//! let session = client.session(Duration::from_secs(10)).await?;
//! let me = session.create("/services/api-", b"10.0.0.5:80".to_vec())
//!     .ephemeral()
//!     .sequential()
//!     .await?;
//! let got = client.get(&me.path).await?;
//! println!("{} = {:?} (revision {})", me.path, got.data, got.revision);
//! session.close().await?;
//! # Ok(()) }
//! ```
#![warn(clippy::unwrap_used, missing_docs)]

pub mod cli;
mod client;
mod config;
mod conn;
mod error;
mod ops;
pub mod recipes;
mod session;
mod watch;

pub use client::{Client, ClusterStatusResponse};
pub use config::{Backoff, ClientConfig};
pub use error::{Error, Result};
pub use ops::{
    ChildrenBuilder, ChildrenResponse, CreateBuilder, Created, DeleteBuilder, DeleteResponse,
    GetBuilder, GetResponse, MultiBuilder, MultiResponse, SetBuilder, SetResponse, StatBuilder,
    StatResponse,
};
pub use recipes::election::{Leader, LeaderElection, Leadership};
pub use recipes::lock::{LockBuilder, LockGuard};
pub use session::{safe_bound, Session, SessionStatus};
pub use watch::{WatchBuilder, WatchItem, WatchStream};

/// The wire protocol crate, re-exported for its types (`Stat`, `SessionId`, errors, ...).
pub use lockd_protocol as protocol;
