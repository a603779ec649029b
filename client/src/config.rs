//! Client configuration: endpoints, timeouts, default session TTL and reconnect backoff.

use std::time::Duration;

/// Exponential backoff between reconnect rounds and retries.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Backoff {
    /// First delay.
    pub initial: Duration,
    /// Largest delay.
    pub max: Duration,
}

impl Default for Backoff {
    fn default() -> Self {
        Backoff {
            initial: Duration::from_millis(25),
            max: Duration::from_secs(1),
        }
    }
}

impl Backoff {
    /// The delay after `delay`: doubled, capped at `max`.
    pub fn next(&self, delay: Duration) -> Duration {
        (delay * 2).clamp(self.initial, self.max)
    }

    /// `delay` with up to 25% random jitter removed, so clients do not retry in lockstep.
    pub(crate) fn jittered(delay: Duration) -> Duration {
        use std::hash::{BuildHasher, Hasher};
        let mut h = std::collections::hash_map::RandomState::new().build_hasher();
        h.write_u64(delay.as_nanos() as u64);
        let quarter = delay / 4;
        let cut = quarter.mul_f64((h.finish() % 1000) as f64 / 1000.0);
        delay.saturating_sub(cut)
    }
}

/// How a [`crate::Client`] connects and retries.
///
/// ```
/// use std::time::Duration;
/// let config = lockd_client::ClientConfig::new(["10.0.0.1:7001", "10.0.0.2:7001"])
///     .client_name("billing")
///     .request_timeout(Duration::from_secs(5));
/// assert_eq!(config.endpoints.len(), 2);
/// ```
#[derive(Clone, Debug)]
pub struct ClientConfig {
    /// Client addresses of the nodes to try, in order (rotated on failure).
    pub endpoints: Vec<String>,
    /// Name sent in `Hello`, for the server's logs.
    pub client_name: String,
    /// Overall bound on one call, retries and reconnects included.
    pub request_timeout: Duration,
    /// Bound on one TCP connect plus handshake.
    pub connect_timeout: Duration,
    /// TTL of the client's default session (used by ephemeral creates without a session).
    pub default_session_ttl: Duration,
    /// Delays between reconnect rounds and retries.
    pub backoff: Backoff,
    /// Most attempts for one call (each reconnect or retry is one attempt). With more than
    /// one allowed, retries of a request answered `NotLeader` while a leader is elected do
    /// not count: they go on (at least every 100 ms) until the request timeout.
    pub max_attempts: u32,
    /// Largest frame accepted from the server.
    pub max_frame: usize,
}

impl Default for ClientConfig {
    fn default() -> Self {
        ClientConfig {
            endpoints: vec!["127.0.0.1:7001".to_string()],
            client_name: format!("lockd-client/{}", env!("CARGO_PKG_VERSION")),
            request_timeout: Duration::from_secs(10),
            connect_timeout: Duration::from_secs(2),
            default_session_ttl: Duration::from_secs(10),
            backoff: Backoff::default(),
            max_attempts: 32,
            max_frame: lockd_protocol::DEFAULT_MAX_FRAME,
        }
    }
}

impl ClientConfig {
    /// Defaults with the given endpoints.
    pub fn new<I, S>(endpoints: I) -> Self
    where
        I: IntoIterator<Item = S>,
        S: Into<String>,
    {
        ClientConfig {
            endpoints: endpoints.into_iter().map(Into::into).collect(),
            ..ClientConfig::default()
        }
    }

    /// Sets the name sent in `Hello`.
    pub fn client_name(mut self, name: impl Into<String>) -> Self {
        self.client_name = name.into();
        self
    }

    /// Sets the overall bound on one call.
    pub fn request_timeout(mut self, timeout: Duration) -> Self {
        self.request_timeout = timeout;
        self
    }

    /// Sets the bound on one connect plus handshake.
    pub fn connect_timeout(mut self, timeout: Duration) -> Self {
        self.connect_timeout = timeout;
        self
    }

    /// Sets the default session's TTL.
    pub fn default_session_ttl(mut self, ttl: Duration) -> Self {
        self.default_session_ttl = ttl;
        self
    }

    /// Sets the backoff.
    pub fn backoff(mut self, backoff: Backoff) -> Self {
        self.backoff = backoff;
        self
    }

    /// Sets the most attempts per call.
    pub fn max_attempts(mut self, attempts: u32) -> Self {
        self.max_attempts = attempts.max(1);
        self
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn backoff_doubles_and_caps() {
        let b = Backoff {
            initial: Duration::from_millis(10),
            max: Duration::from_millis(50),
        };
        assert_eq!(b.next(Duration::ZERO), Duration::from_millis(10));
        assert_eq!(b.next(Duration::from_millis(10)), Duration::from_millis(20));
        assert_eq!(b.next(Duration::from_millis(40)), Duration::from_millis(50));
        let j = Backoff::jittered(Duration::from_millis(100));
        assert!(j <= Duration::from_millis(100) && j >= Duration::from_millis(75));
    }
}
