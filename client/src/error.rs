//! The client's error type: the server's typed errors, kept matchable, plus what can go wrong
//! on the client's side (connecting, lost connections, timeouts, expired sessions).

use std::time::Duration;

use lockd_protocol::SessionId;

/// Result alias of this crate.
pub type Result<T, E = Error> = std::result::Result<T, E>;

/// Everything a client call can fail with.
///
/// Server answers keep their case, so callers match on them directly:
///
/// ```no_run
/// # async fn f(client: lockd_client::Client) {
/// use lockd_client::Error;
/// use lockd_protocol::Error as Wire;
/// match client.get("/config").await {
///     Ok(got) => println!("{} bytes at revision {}", got.data.len(), got.revision),
///     Err(Error::Server(Wire::NoNode { path })) => println!("{path} is missing"),
///     Err(e) => eprintln!("failed: {e}"),
/// }
/// # }
/// ```
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// The server answered the request with this error.
    #[error("{0}")]
    Server(lockd_protocol::Error),
    /// The client rejected the arguments before sending anything (same cases as the
    /// server would use, e.g. `InvalidPath`).
    #[error("{0}")]
    Invalid(lockd_protocol::Error),
    /// The server refused the connection with `Goodbye` during the handshake (for example
    /// `UnsupportedVersion`).
    #[error("server refused the connection: {0}")]
    Goodbye(lockd_protocol::Error),
    /// No endpoint accepted a connection in time.
    #[error("could not connect to any endpoint after {attempts} attempts: {last}")]
    ConnectFailed {
        /// Connection attempts made.
        attempts: u32,
        /// The last attempt's failure.
        last: String,
    },
    /// The connection was lost and the request could not be completed by retrying.
    #[error("connection lost{}", reason.as_ref().map(|r| format!(": {r}")).unwrap_or_default())]
    ConnectionLost {
        /// The reason the server gave in `Goodbye`, if any.
        reason: Option<lockd_protocol::Error>,
    },
    /// The request got no answer within the request timeout (retries included). For a write
    /// this means its outcome is unknown.
    #[error("request timed out after {0:?}")]
    Timeout(Duration),
    /// A write without a session was in flight when its connection was lost: it may or may
    /// not have been applied, and it is never retried automatically.
    #[error("outcome unknown: {0}")]
    Indeterminate(String),
    /// The session used for the request has expired or was closed (detected by the client:
    /// keepalive answered `Expired`, a session event, or the safe bound passed).
    #[error("session {0} has expired")]
    SessionExpired(SessionId),
    /// The server answered with something that does not fit the request.
    #[error("protocol violation: {0}")]
    Protocol(String),
    /// A try-lock found the lock held (or others waiting for it).
    #[error("lock {lock} is held by another grant")]
    NotAcquired {
        /// The lock.
        lock: String,
    },
    /// An acquire stopped waiting without a grant: its timeout passed, it was cancelled, or
    /// its session ended.
    #[error("waiting for lock {lock} ended without a grant: {reason:?}")]
    LockWaitEnded {
        /// The lock.
        lock: String,
        /// Why the wait ended.
        reason: lockd_protocol::WaitEndReason,
    },
    /// The client configuration is unusable (e.g. no endpoints).
    #[error("invalid configuration: {0}")]
    Config(String),
}

impl Error {
    /// The wire error inside [`Error::Server`], [`Error::Invalid`] or [`Error::Goodbye`].
    pub fn wire(&self) -> Option<&lockd_protocol::Error> {
        match self {
            Error::Server(e) | Error::Invalid(e) | Error::Goodbye(e) => Some(e),
            _ => None,
        }
    }

    /// True if the node (or a create's parent) does not exist.
    pub fn is_no_node(&self) -> bool {
        matches!(self.wire(), Some(lockd_protocol::Error::NoNode { .. }))
    }

    /// True if a create found the node already there.
    pub fn is_node_exists(&self) -> bool {
        matches!(self.wire(), Some(lockd_protocol::Error::NodeExists { .. }))
    }

    /// True if a conditional write found another version.
    pub fn is_bad_version(&self) -> bool {
        matches!(self.wire(), Some(lockd_protocol::Error::BadVersion { .. }))
    }

    /// True if the session is gone, whether the server or the client found out.
    pub fn is_session_expired(&self) -> bool {
        matches!(self, Error::SessionExpired(_))
            || matches!(
                self.wire(),
                Some(lockd_protocol::Error::SessionExpired { .. })
            )
    }

    /// True if a fenced write was rejected: the lock is no longer held under that token.
    pub fn is_fencing_rejected(&self) -> bool {
        matches!(
            self.wire(),
            Some(lockd_protocol::Error::FencingRejected { .. })
        )
    }

    /// True if a lock was not acquired: a try-lock found it held, or the wait timed out.
    pub fn is_not_acquired(&self) -> bool {
        matches!(
            self,
            Error::NotAcquired { .. }
                | Error::LockWaitEnded {
                    reason: lockd_protocol::WaitEndReason::TimedOut,
                    ..
                }
        )
    }

    /// True if a write's outcome is unknown (it may or may not have been applied).
    pub fn is_indeterminate(&self) -> bool {
        matches!(self, Error::Indeterminate(_) | Error::Timeout(_))
            || matches!(self.wire(), Some(lockd_protocol::Error::Indeterminate(_)))
    }
}

/// Validates a path before it is sent.
pub(crate) fn check_path(path: &str) -> Result<()> {
    lockd_protocol::path::validate(path).map_err(Error::Invalid)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn predicates_match_server_and_client_cases() {
        let e = Error::Server(lockd_protocol::Error::NoNode { path: "/x".into() });
        assert!(e.is_no_node());
        assert_eq!(e.to_string(), "no node /x");
        assert!(Error::SessionExpired(SessionId(3)).is_session_expired());
        assert!(Error::Server(lockd_protocol::Error::SessionExpired {
            session: SessionId(3)
        })
        .is_session_expired());
        assert!(check_path("relative").is_err());
        assert!(matches!(
            check_path("/a//b"),
            Err(Error::Invalid(lockd_protocol::Error::InvalidPath { .. }))
        ));
    }
}
