//! Write load on a process cluster with a record of every write attempt: session-less create
//! loops and a session writer ([`Record`], [`spawn_create_writer`], [`spawn_session_writer`]);
//! for the membership tests, the writers of one test as a whole ([`Load`]), the write pause
//! around an event ([`Pause`]) and a session kept alive throughout ([`SessionProbe`]).

use std::collections::BTreeMap;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use lockd_client::{Client, ClientConfig, Error as ClientError, Session, SessionStatus};

use super::{assert_all_present, ms, pinned_client, tolerated_during_failover, Cluster, Reads};

#[derive(Clone, Debug)]
pub struct Attempt {
    /// Which writer (the session writer is [`SESSION_WRITER`]).
    pub writer: usize,
    pub path: String,
    pub data: Vec<u8>,
    pub sent: Instant,
    pub done: Instant,
    pub ok: bool,
}

#[derive(Default, Debug)]
pub struct Record {
    attempts: Mutex<Vec<Attempt>>,
    /// Writes whose outcome is unknown (tolerated errors), with the error.
    pub unknown: Mutex<Vec<(String, String)>>,
    /// Errors that should never happen.
    pub unexpected: Mutex<Vec<(String, String)>>,
    pub stop: AtomicBool,
}

impl Record {
    /// The acknowledged writes.
    pub fn acked(&self) -> Vec<Attempt> {
        let attempts = self.attempts.lock().expect("lock");
        attempts.iter().filter(|a| a.ok).cloned().collect()
    }

    /// How many writes were acknowledged.
    pub fn count(&self) -> usize {
        let attempts = self.attempts.lock().expect("lock");
        attempts.iter().filter(|a| a.ok).count()
    }

    pub fn count_acked_sent_after(&self, t: Instant) -> usize {
        let attempts = self.attempts.lock().expect("lock");
        attempts.iter().filter(|a| a.ok && a.sent >= t).count()
    }

    /// First acknowledgement of a write sent at or after `t`.
    pub fn first_ack_sent_after(&self, t: Instant) -> Option<Instant> {
        let attempts = self.attempts.lock().expect("lock");
        attempts
            .iter()
            .filter(|a| a.ok && a.sent >= t)
            .map(|a| a.done)
            .min()
    }

    fn note(
        &self,
        writer: usize,
        path: String,
        data: Vec<u8>,
        sent: Instant,
        result: Result<(), ClientError>,
    ) {
        let ok = result.is_ok();
        if let Err(e) = result {
            let list = if tolerated_during_failover(&e) {
                &self.unknown
            } else {
                &self.unexpected
            };
            list.lock()
                .expect("lock")
                .push((path.clone(), e.to_string()));
        }
        self.attempts.lock().expect("lock").push(Attempt {
            writer,
            path,
            data,
            sent,
            done: Instant::now(),
            ok,
        });
    }

    /// Waits until `cond` holds.
    pub async fn wait_for(&self, what: &str, within: Duration, cond: impl Fn(&Record) -> bool) {
        self.wait_until(within, cond, || {
            format!(
                "{what} not reached within {within:?} ({} acked, ",
                self.count()
            )
        })
        .await;
    }

    /// Waits until `n` writes sent at or after `t` are acknowledged.
    pub async fn wait_acked_after(&self, t: Instant, n: usize, within: Duration, what: &str) {
        self.wait_until(
            within,
            |r| r.count_acked_sent_after(t) >= n,
            || {
                format!(
                    "{what}: {n} writes not acknowledged within {within:?} ({} were; ",
                    self.count_acked_sent_after(t)
                )
            },
        )
        .await;
    }

    /// Polls `cond` every 10 ms; fails with `why()` and the write errors after `within`.
    async fn wait_until(
        &self,
        within: Duration,
        cond: impl Fn(&Record) -> bool,
        why: impl Fn() -> String,
    ) {
        let deadline = Instant::now() + within;
        while !cond(self) {
            assert!(
                Instant::now() < deadline,
                "{}unknown {:?}, unexpected {:?})",
                why(),
                self.unknown.lock().expect("lock"),
                self.unexpected.lock().expect("lock")
            );
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
    }

    /// Client-visible write latency around [from, to]. A writer that gets an error writes
    /// again at once, so what its user waits for is the time from the first attempt after
    /// its previous acknowledgement to the next acknowledgement: the effective latency of
    /// an acknowledged write. Counts the acknowledged writes whose effective interval
    /// overlaps [from, to], and the failed attempts inside it.
    pub fn pause(&self, from: Instant, to: Instant) -> Pause {
        let attempts = self.attempts.lock().expect("lock");
        let mut by_writer: BTreeMap<usize, Vec<&Attempt>> = BTreeMap::new();
        for a in attempts.iter() {
            by_writer.entry(a.writer).or_default().push(a);
        }
        let (mut latencies, mut failed, mut max_gap) = (Vec::new(), 0, 0.0f64);
        for list in by_writer.values_mut() {
            list.sort_by_key(|a| a.sent);
            let mut first_since_ack: Option<Instant> = None;
            let mut last_ack: Option<Instant> = None;
            for a in list.iter() {
                let start = *first_since_ack.get_or_insert(a.sent);
                let overlaps = a.done >= from && start <= to;
                if !a.ok {
                    if overlaps {
                        failed += 1;
                    }
                    continue;
                }
                if overlaps {
                    latencies.push(ms(a.done - start));
                    if let Some(prev) = last_ack {
                        max_gap = max_gap.max(ms(a.done - prev));
                    }
                }
                first_since_ack = None;
                last_ack = Some(a.done);
            }
        }
        latencies.sort_by(f64::total_cmp);
        let pct = |p: f64| -> f64 {
            if latencies.is_empty() {
                return 0.0;
            }
            let i = ((latencies.len() as f64 * p).ceil() as usize).clamp(1, latencies.len());
            latencies[i - 1]
        };
        Pause {
            writes: latencies.len(),
            failed,
            p50_ms: pct(0.5),
            p99_ms: pct(0.99),
            max_ms: latencies.last().copied().unwrap_or(0.0),
            max_gap_ms: max_gap,
        }
    }
}

/// Client-visible write latency over a window.
#[derive(Clone, Copy, Debug)]
pub struct Pause {
    /// Acknowledged writes.
    pub writes: usize,
    /// Failed attempts (the writer wrote again).
    pub failed: usize,
    /// Effective latency of the acknowledged writes.
    pub p50_ms: f64,
    pub p99_ms: f64,
    pub max_ms: f64,
    /// Longest time between two consecutive acknowledgements of one writer.
    pub max_gap_ms: f64,
}

impl std::fmt::Display for Pause {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(
            f,
            "{} writes acknowledged ({} failed attempts): latency p50 {:.0} ms, p99 {:.0} ms, \
             max {:.0} ms; longest gap between a writer's acknowledgements {:.0} ms",
            self.writes, self.failed, self.p50_ms, self.p99_ms, self.max_ms, self.max_gap_ms
        )
    }
}

/// The `writer` of the session writer's attempts.
pub const SESSION_WRITER: usize = usize::MAX;

/// A writer creating `{prefix}/w{w}-{i}` (data `i`) one after another, without a session,
/// until `record.stop`.
pub fn spawn_create_writer(
    client: Client,
    prefix: &str,
    w: usize,
    record: Arc<Record>,
) -> tokio::task::JoinHandle<()> {
    let prefix = prefix.to_string();
    tokio::spawn(async move {
        for i in 0u64.. {
            if record.stop.load(Ordering::Relaxed) {
                return;
            }
            let path = format!("{prefix}/w{w}-{i}");
            let data = format!("{w}-{i}").into_bytes();
            let sent = Instant::now();
            let result = client
                .create(path.as_str(), data.clone())
                .await
                .map(|created| {
                    assert_eq!(created.path, path);
                });
            record.note(w, path, data, sent, result);
        }
    })
}

/// What the session writer does with its session when it stops.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum SessionEnd {
    /// Leaves it open.
    Keep,
    /// Closes it.
    Close,
}

/// A writer setting `path` to `i` for i = 1, 2, ... through a session (exactly-once retries)
/// until `record.stop` or its first error. Returns (sets attempted, sets acknowledged).
pub fn spawn_session_writer(
    client: Client,
    path: String,
    record: Arc<Record>,
    end: SessionEnd,
) -> tokio::task::JoinHandle<(u64, u64)> {
    tokio::spawn(async move {
        let session = client
            .session(Duration::from_secs(5))
            .await
            .expect("open the writer's session");
        session
            .create(path.as_str(), b"0".to_vec())
            .await
            .expect("create the session writer's node");
        let (mut attempted, mut acked) = (0, 0);
        for i in 1u64.. {
            if record.stop.load(Ordering::Relaxed) {
                break;
            }
            attempted += 1;
            let data = i.to_string().into_bytes();
            let sent = Instant::now();
            match session.set(path.as_str(), data.clone()).await {
                Ok(set) => {
                    assert_eq!(set.stat.version, i, "set #{i} of {path} applied once");
                    acked += 1;
                    record.note(SESSION_WRITER, path.clone(), data, sent, Ok(()));
                }
                Err(e) => {
                    record.note(SESSION_WRITER, path.clone(), data, sent, Err(e));
                    break;
                }
            }
        }
        if end == SessionEnd::Close {
            let _ = session.close().await;
        }
        (attempted, acked)
    })
}

// ---------------------------------------------------------------------------------------------
// The load of the membership tests, and a session kept alive throughout
// ---------------------------------------------------------------------------------------------

/// A writer's client: a write unanswered for 3 s comes back as a timeout (an unknown
/// outcome), so that a write stuck on a removed leader (a bug, see
/// `writes_in_flight_on_a_removed_leader_are_answered` in `membership_removal_process.rs`)
/// stalls its writer for 3 s, not 10.
async fn writer_client(endpoints: Vec<String>) -> Client {
    Client::with_config(ClientConfig::new(endpoints).request_timeout(Duration::from_secs(3)))
        .await
        .expect("connect writer")
}

/// Writers of one test: `creators` session-less create loops and one session writer, each
/// on its own client.
pub struct Load {
    pub record: Arc<Record>,
    prefix: String,
    creators: Vec<tokio::task::JoinHandle<()>>,
    session_writer: tokio::task::JoinHandle<(u64, u64)>,
}

impl Load {
    pub async fn start(endpoints: &[String], prefix: &str, creators: usize) -> Load {
        let record = Arc::new(Record::default());
        let mut handles = Vec::new();
        for w in 0..creators {
            // Each writer's client tries the endpoints from a different one.
            let mut eps = endpoints.to_vec();
            let n = eps.len();
            eps.rotate_left(w % n);
            let client = writer_client(eps).await;
            handles.push(spawn_create_writer(client, prefix, w, record.clone()));
        }
        let client = writer_client(endpoints.to_vec()).await;
        let session_writer = spawn_session_writer(
            client,
            format!("{prefix}/session"),
            record.clone(),
            SessionEnd::Close,
        );
        Load {
            record,
            prefix: prefix.to_string(),
            creators: handles,
            session_writer,
        }
    }

    /// Stops the writers and checks them: no unexpected error, the session writer's sets
    /// applied exactly once. Returns what every node must serve (path, data), (session sets
    /// attempted, acknowledged), and the writes with an unknown outcome (path, error).
    pub async fn stop(self) -> (Vec<(String, Vec<u8>)>, (u64, u64), Vec<(String, String)>) {
        self.record.stop.store(true, Ordering::Relaxed);
        for w in self.creators {
            tokio::time::timeout(Duration::from_secs(20), w)
                .await
                .expect("writer stops")
                .expect("writer panicked");
        }
        let session_sets = tokio::time::timeout(Duration::from_secs(20), self.session_writer)
            .await
            .expect("session writer stops")
            .expect("session writer panicked");
        let unexpected = self.record.unexpected.lock().expect("lock").clone();
        assert!(
            unexpected.is_empty(),
            "unexpected write errors: {unexpected:?}"
        );
        let session_path = format!("{}/session", self.prefix);
        // The session node's last set may have applied without an acknowledgement (its
        // writer stops at its first error): it is checked by version, not by data.
        let expected = self
            .record
            .acked()
            .into_iter()
            .filter(|a| a.path != session_path)
            .map(|a| (a.path, a.data))
            .collect();
        let unknown = self.record.unknown.lock().expect("lock").clone();
        (expected, session_sets, unknown)
    }

    /// Lets the load run for at least `min` and at least `n` more acknowledged writes.
    pub async fn run(&self, min: Duration, n: usize, what: &str) {
        let from = Instant::now();
        self.record
            .wait_acked_after(from, n, min + Duration::from_secs(15), what)
            .await;
        tokio::time::sleep_until((from + min).into()).await;
    }
}

/// Every acknowledged write is on each of `ids` (linearizable reads), and the session
/// writer's node has a version between its acknowledged and attempted sets.
pub async fn assert_no_write_lost(
    cluster: &Cluster,
    ids: &[u64],
    prefix: &str,
    expected: &[(String, Vec<u8>)],
    (attempted, acked): (u64, u64),
) {
    let reads = Reads {
        stale: false,
        in_flight: 64,
    };
    for &id in ids {
        assert_all_present(&cluster.addr(id), expected, reads, &format!("node {id}")).await;
        let got = pinned_client(&cluster.addr(id))
            .await
            .get(format!("{prefix}/session"))
            .await
            .expect("read the session writer's node");
        assert!(
            got.stat.version >= acked && got.stat.version <= attempted,
            "{prefix}/session on node {id}: version {} with {acked} sets acknowledged of \
             {attempted}",
            got.stat.version
        );
    }
}

/// A session (TTL 2 s) kept alive by its client throughout a test, with an ephemeral node;
/// records every status the client saw.
pub struct SessionProbe {
    pub session: Session,
    path: String,
    seen: Arc<Mutex<Vec<SessionStatus>>>,
    /// What the probe's client went through: status changes, and the node it is connected
    /// to (sampled every 10 ms), with the time since the probe opened.
    pub timeline: Arc<Mutex<Vec<String>>>,
    opened: Instant,
}

impl SessionProbe {
    pub async fn open(endpoints: Vec<String>, path: &str) -> SessionProbe {
        let opened = Instant::now();
        let client = Client::connect(endpoints).await.expect("connect the probe");
        let session = client
            .session(Duration::from_secs(2))
            .await
            .expect("open the probe's session");
        let created = session
            .create(path, b"alive".to_vec())
            .ephemeral()
            .await
            .expect("ephemeral create");
        assert_eq!(created.stat.ephemeral_owner, Some(session.id()));
        let mut rx = session.watch_status();
        let seen = Arc::new(Mutex::new(vec![*rx.borrow()]));
        let timeline = Arc::new(Mutex::new(Vec::new()));
        let (log, events) = (seen.clone(), timeline.clone());
        tokio::spawn(async move {
            while rx.changed().await.is_ok() {
                let s = *rx.borrow();
                log.lock().expect("lock").push(s);
                events
                    .lock()
                    .expect("lock")
                    .push(format!("{:.0} ms: {s:?}", ms(opened.elapsed())));
                if s == SessionStatus::Expired {
                    return;
                }
            }
        });
        let (events, watched) = (timeline.clone(), session.clone());
        tokio::spawn(async move {
            let mut last = None;
            while watched.status() != SessionStatus::Expired {
                let now = watched.client().connected_to();
                if now != last {
                    events.lock().expect("lock").push(format!(
                        "{:.0} ms: connected to {now:?}",
                        ms(opened.elapsed())
                    ));
                    last = now;
                }
                tokio::time::sleep(Duration::from_millis(10)).await;
            }
        });
        SessionProbe {
            session,
            path: path.to_string(),
            seen,
            timeline,
            opened,
        }
    }

    /// Notes a test event in the timeline.
    pub fn mark(&self, what: &str) {
        self.timeline
            .lock()
            .expect("lock")
            .push(format!("{:.0} ms: {what}", ms(self.opened.elapsed())));
    }

    /// The session never expired: the client never saw it expire, its ephemeral node is on
    /// every node of `ids` with this owner, and a write under it applies.
    pub async fn assert_alive(&self, cluster: &Cluster, ids: &[u64]) {
        let statuses = self.seen.lock().expect("lock").clone();
        assert!(
            !statuses.contains(&SessionStatus::Expired)
                && self.session.status() != SessionStatus::Expired,
            "the probe session expired; statuses {statuses:?}; timeline {:?}",
            self.timeline.lock().expect("lock")
        );
        for &id in ids {
            let got = pinned_client(&cluster.addr(id))
                .await
                .get(self.path.as_str())
                .await
                .unwrap_or_else(|e| {
                    panic!("the probe's ephemeral {} on node {id}: {e}", self.path)
                });
            assert_eq!(
                got.stat.ephemeral_owner,
                Some(self.session.id()),
                "node {id}"
            );
        }
        self.session
            .set(self.path.as_str(), b"still alive".to_vec())
            .await
            .expect("a write under the probe session");
        println!(
            "probe session: statuses seen {statuses:?}; alive at the end; timeline {:?}",
            self.timeline.lock().expect("lock")
        );
    }
}
