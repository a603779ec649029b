//! The lockd wire protocol: frame codec, message types and typed errors.
//!
//! Everything a client and a server must agree on lives here, and nothing else: this crate
//! does no IO beyond implementing a `tokio_util` codec over byte buffers. A frame is a `u32`
//! big-endian payload length followed by a bincode 2 payload (standard config with a size
//! limit). See `docs/protocol.md` for every message.
#![warn(clippy::unwrap_used)]

pub mod codec;
pub mod error;
pub mod message;
pub mod path;
pub mod types;

pub use codec::{FrameCodec, FrameError, DEFAULT_MAX_FRAME, MAX_FRAME_LIMIT};
pub use error::{Cause, Error};
pub use message::*;
pub use types::*;

/// Version of the client protocol spoken by this crate. A server answers a `Hello` with
/// another version with [`Error::UnsupportedVersion`] and closes the connection.
pub const PROTOCOL_VERSION: u32 = 2;

/// How far above a session's floor a request's seq may be: the most requests one session may
/// have in flight. The server keeps at most this many responses per session.
pub const SEQ_WINDOW: u64 = 1 << 16;
