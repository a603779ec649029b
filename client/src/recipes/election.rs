//! Leader election on a named lock: the leader is the lock's holder, its value travels with
//! the acquire and is stored with the grant in the same entry, so observers never see a new
//! token with an old value.
//!
//! [`LeaderElection::campaign`] waits to become leader and answers a [`Leadership`] (a
//! [`LockGuard`] underneath) whose `lost()` and cancellation token fire at revocation,
//! session expiry or the safe bound. [`LeaderElection::observe`] reads the current holder,
//! then watches the lock from the read's revision + 1, so no change is missed; after
//! `Compacted` it re-reads.

use std::collections::VecDeque;
use std::future::Future;
use std::time::Duration;

use futures_util::Stream;
use lockd_protocol::{EventKind, LockHolder, SessionId, WatchTarget};
use tokio_util::sync::CancellationToken;

use crate::client::Client;
use crate::error::{Error, Result};
use crate::recipes::lock::LockGuard;
use crate::session::Session;
use crate::watch::{WatchItem, WatchStream};

/// The current leader, as observers see it.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Leader {
    /// The value the leader campaigned with.
    pub value: Vec<u8>,
    /// Its fencing token (increases with every new leader).
    pub token: u64,
    /// Its session.
    pub session: SessionId,
}

impl From<LockHolder> for Leader {
    fn from(h: LockHolder) -> Self {
        Leader {
            value: h.value,
            token: h.token,
            session: h.session,
        }
    }
}

/// An election named after its lock.
///
/// ```no_run
/// # async fn demo(client: lockd_client::Client) -> Result<(), lockd_client::Error> {
/// use lockd_client::LeaderElection;
/// let election = LeaderElection::new(&client, "scheduler");
/// let leadership = election.campaign(b"host-a:9000".to_vec()).await?;
/// println!("leading with token {}", leadership.token());
/// leadership.resign().await?;
/// # Ok(()) }
/// ```
#[derive(Clone, Debug)]
pub struct LeaderElection {
    client: Client,
    name: String,
    session: Option<Session>,
    lock_delay: Option<Duration>,
}

impl LeaderElection {
    /// An election on the lock `name`.
    pub fn new(client: &Client, name: impl Into<String>) -> Self {
        LeaderElection {
            client: client.clone(),
            name: name.into(),
            session: None,
            lock_delay: None,
        }
    }

    /// Campaign with `session` (default: the client's default session).
    pub fn session(mut self, session: &Session) -> Self {
        self.session = Some(session.clone());
        self
    }

    /// The lock-delay after a leader's session expires (see [`crate::LockBuilder::lock_delay`]).
    pub fn lock_delay(mut self, d: Duration) -> Self {
        self.lock_delay = Some(d);
        self
    }

    /// The election's name (its lock).
    pub fn name(&self) -> &str {
        &self.name
    }

    /// Waits to become leader with `value`.
    pub async fn campaign(&self, value: impl Into<Vec<u8>>) -> Result<Leadership> {
        let mut builder = self.client.lock(self.name.clone()).value(value);
        if let Some(s) = &self.session {
            builder = builder.session(s);
        }
        if let Some(d) = self.lock_delay {
            builder = builder.lock_delay(d);
        }
        Ok(Leadership {
            guard: builder.await?,
        })
    }

    /// The current leader, if any.
    pub async fn leader(&self) -> Result<Option<Leader>> {
        let read = self.client.lock_info(self.name.clone()).await?;
        Ok(read.info.holder.map(Leader::from))
    }

    /// Campaigns, then runs `work(token, cancel)` while leader. `cancel` is cancelled when
    /// leadership is lost (revoked, session expired, or the safe bound passed); `work` must
    /// stop then: it is not aborted. Resigns when `work` returns.
    ///
    /// ```no_run
    /// # async fn demo(client: lockd_client::Client) -> Result<(), lockd_client::Error> {
    /// use lockd_client::LeaderElection;
    /// let election = LeaderElection::new(&client, "compactor");
    /// election.run_while_leader(b"me".to_vec(), |token, cancel| async move {
    ///     while !cancel.is_cancelled() {
    ///         // ... do leader work, fenced with `token` ...
    ///         tokio::time::sleep(std::time::Duration::from_millis(100)).await;
    ///     }
    /// }).await?;
    /// # Ok(()) }
    /// ```
    pub async fn run_while_leader<F, Fut, T>(&self, value: impl Into<Vec<u8>>, work: F) -> Result<T>
    where
        F: FnOnce(u64, CancellationToken) -> Fut,
        Fut: Future<Output = T>,
    {
        let leadership = self.campaign(value).await?;
        let out = work(leadership.token(), leadership.cancellation_token()).await;
        if !leadership.is_lost() {
            leadership.resign().await?;
        }
        Ok(out)
    }

    /// A stream of leader changes: first the current leader (`None` if there is none),
    /// then each change: `Some(leader)` at a grant, `None` when the leader releases or loses
    /// the lock with no successor in the same revision.
    ///
    /// ```no_run
    /// # async fn demo(client: lockd_client::Client) -> Result<(), lockd_client::Error> {
    /// use futures_util::StreamExt;
    /// let election = lockd_client::LeaderElection::new(&client, "scheduler");
    /// let mut changes = election.observe();
    /// while let Some(change) = changes.next().await {
    ///     match change? {
    ///         Some(l) => println!("leader {:?} (token {})", l.value, l.token),
    ///         None => println!("no leader"),
    ///     }
    /// }
    /// # Ok(()) }
    /// ```
    pub fn observe(&self) -> impl Stream<Item = Result<Option<Leader>>> + Send + Unpin {
        let observer = Observer {
            client: self.client.clone(),
            name: self.name.clone(),
            stream: None,
            current: None,
            started: false,
            queue: VecDeque::new(),
        };
        Box::pin(futures_util::stream::unfold(observer, |mut o| async move {
            o.next().await.map(|item| (item, o))
        }))
    }
}

/// State of [`LeaderElection::observe`].
struct Observer {
    client: Client,
    name: String,
    stream: Option<WatchStream>,
    current: Option<Leader>,
    started: bool,
    queue: VecDeque<Option<Leader>>,
}

impl Observer {
    fn change(&mut self, next: Option<Leader>) {
        if !self.started || next != self.current {
            self.started = true;
            self.current = next.clone();
            self.queue.push_back(next);
        }
    }

    async fn next(&mut self) -> Option<Result<Option<Leader>>> {
        loop {
            if let Some(change) = self.queue.pop_front() {
                return Some(Ok(change));
            }
            let Some(stream) = self.stream.as_mut() else {
                let read = match self.client.lock_info(self.name.clone()).await {
                    Ok(r) => r,
                    Err(e) => return Some(Err(e)),
                };
                self.change(read.info.holder.map(Leader::from));
                let watch = self
                    .client
                    .watch(WatchTarget::Lock(self.name.clone()))
                    .from(read.revision + 1);
                match watch.await {
                    Ok(s) => self.stream = Some(s),
                    Err(e) => return Some(Err(e)),
                }
                continue;
            };
            match stream.next().await {
                Some(Ok(WatchItem::Revision { events, .. })) => {
                    // Only the state at the end of the revision counts.
                    let mut next = self.current.clone();
                    for event in events {
                        match event.kind {
                            EventKind::LockGranted {
                                token,
                                session,
                                value,
                                ..
                            } => {
                                next = Some(Leader {
                                    value,
                                    token,
                                    session,
                                })
                            }
                            EventKind::LockReleased { token, .. }
                            | EventKind::LockRevoked { token, .. }
                                if next.as_ref().is_some_and(|l| l.token == token) =>
                            {
                                next = None
                            }
                            _ => {}
                        }
                    }
                    self.change(next);
                }
                Some(Ok(WatchItem::Progress(_))) => {}
                Some(Err(Error::Server(lockd_protocol::Error::Compacted { .. }))) => {
                    self.stream = None; // re-read the state
                }
                Some(Err(e)) => return Some(Err(e)),
                None => self.stream = None,
            }
        }
    }
}

/// Leadership won by [`LeaderElection::campaign`].
#[derive(Debug)]
pub struct Leadership {
    guard: LockGuard,
}

impl Leadership {
    /// The leader's fencing token.
    pub fn token(&self) -> u64 {
        self.guard.token()
    }

    /// The value campaigned with.
    pub fn value(&self) -> &[u8] {
        self.guard.value()
    }

    /// The lock underneath (for fenced writes: `client.set(..).fence(leadership.guard())`).
    pub fn guard(&self) -> &LockGuard {
        &self.guard
    }

    /// True once leadership is lost (or resigned).
    pub fn is_lost(&self) -> bool {
        self.guard.is_lost()
    }

    /// Resolves when leadership is lost; see [`LockGuard::lost`].
    pub fn lost(&self) -> impl Future<Output = ()> + Send + 'static {
        self.guard.lost()
    }

    /// A token cancelled when leadership is lost.
    pub fn cancellation_token(&self) -> CancellationToken {
        self.guard.cancellation_token()
    }

    /// Gives up leadership: the next candidate is granted in the same entry.
    pub async fn resign(self) -> Result<()> {
        self.guard.release().await
    }
}
