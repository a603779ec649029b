//! Session workloads: many sessions (TTL `--ttl-ms`) held open over a few connections for
//! `--seconds`; reports how many expired and the CPU the server processes spent meanwhile.
//!
//! * `sessions`: through the client library, one [`Client`] per connection, the sessions
//!   spread evenly over the clients. Each client first dials endpoint `c mod n`; opening a
//!   session is a write, so a client on a follower follows the `NotLeader` redirect and its
//!   connection (and so its keepalives) moves to the leader. Expiry is what the library
//!   reports: a session whose status becomes [`SessionStatus::Expired`] (the server pushed
//!   `SessionEvent`, answered a keepalive `Expired`, or the safe bound passed unconfirmed).
//! * `sessions-spread`: the sessions are opened on the leader over bare connections, then
//!   kept alive by bare connections pinned to the endpoints round-robin (followers pass
//!   their keepalives to the leader in batches), one `KeepAlive` frame per connection every
//!   third of the TTL, as the library does. Expired = answered `Expired`, pushed
//!   `SessionEvent`, or no `Ok` answer for a send within the safe bound (TTL − tick − drift;
//!   before the first answer, counted from the start of the opening phase). The sessions
//!   are closed on the leader at the end.

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use futures_util::{SinkExt, StreamExt};
use hdrhistogram::Histogram;
use lockd_client::{Client, ClientConfig, Session, SessionStatus};
use lockd_protocol::{ClientMessage, KeepAliveResult, Reply, Request, ServerMessage, SessionId};
use tokio::sync::Semaphore;
use tokio::task::JoinSet;

use crate::cluster::{endpoints_for, leader_addr, tally, CpuMeter, CpuUsage};
use crate::watch::{connect, BenchError};

/// Settings of a session run.
#[derive(Debug, Clone)]
pub struct SessionsRun {
    pub endpoints: Vec<String>,
    pub sessions: usize,
    pub connections: usize,
    pub ttl_ms: u64,
    pub seconds: u64,
    /// Seconds between the last open and the start of the measured window.
    pub settle: u64,
    pub server_pids: Vec<u32>,
}

/// Most session opens (and closes) in flight at once in `sessions`.
const OPEN_CONCURRENCY: usize = 512;

fn meter(pids: &[u32]) -> Result<(Option<CpuMeter>, CpuMeter), BenchError> {
    let servers = if pids.is_empty() {
        None
    } else {
        Some(CpuMeter::start(pids.iter().map(u32::to_string).collect())?)
    };
    Ok((servers, CpuMeter::start(vec!["self".into()])?))
}

fn print_cpu(servers: Option<&CpuUsage>, own: &CpuUsage) {
    match servers {
        Some(s) => println!(
            "  server CPU over {:.1}s: {} ; bench process {:.1}%",
            s.wall,
            s.describe(),
            own.percent_of_core()
        ),
        None => println!(
            "  server CPU: not measured (no --server-pid); bench process {:.1}%",
            own.percent_of_core()
        ),
    }
}

/// Where the clients are connected now, per address.
fn connected(clients: &[Client]) -> String {
    let addrs: Vec<Option<String>> = clients.iter().map(Client::connected_to).collect();
    tally(addrs.iter().map(Option::as_deref))
}

/// `sessions`: through the client library.
pub async fn library(run: &SessionsRun) -> Result<(), BenchError> {
    let ttl = Duration::from_millis(run.ttl_ms);
    let connections = run.connections.max(1);
    let mut clients = Vec::with_capacity(connections);
    for c in 0..connections {
        let config = ClientConfig::new(endpoints_for(&run.endpoints, c))
            .client_name(format!("bench-sessions-{c}"));
        clients.push(Client::with_config(config).await?);
    }
    let dialled = connected(&clients);
    let open_started = Instant::now();
    let permits = Arc::new(Semaphore::new(OPEN_CONCURRENCY));
    let mut opening = JoinSet::new();
    for i in 0..run.sessions {
        let client = clients[i % connections].clone();
        let permit = permits.clone().acquire_owned().await?;
        opening.spawn(async move {
            let session = client.session(ttl).await;
            drop(permit);
            (i % connections, session)
        });
    }
    let mut sessions: Vec<Vec<Session>> = vec![Vec::new(); connections];
    while let Some(joined) = opening.join_next().await {
        let (c, session) = joined?;
        sessions[c].push(session?);
    }
    let open_secs = open_started.elapsed().as_secs_f64();
    let on = connected(&clients);
    println!(
        "sessions   sessions={} connections={connections} ttl={}ms: opened in {open_secs:.1}s ({:.0}/s); connections first dialled {dialled}; after opening on {on}",
        run.sessions,
        run.ttl_ms,
        run.sessions as f64 / open_secs
    );
    let all: Vec<&Session> = sessions.iter().flatten().collect();
    let count = |status: SessionStatus| all.iter().filter(|s| s.status() == status).count();
    tokio::time::sleep(Duration::from_secs(run.settle)).await;
    let expired_before = count(SessionStatus::Expired);
    let (servers, own) = meter(&run.server_pids)?;
    let window_end = Instant::now() + Duration::from_secs(run.seconds);
    let mut worst_unconfirmed = 0;
    while Instant::now() < window_end {
        tokio::time::sleep(Duration::from_secs(1).min(window_end - Instant::now())).await;
        let unconfirmed = count(SessionStatus::Jeopardy) + count(SessionStatus::Safe);
        worst_unconfirmed = worst_unconfirmed.max(unconfirmed);
    }
    let server_usage = servers.as_ref().map(CpuMeter::read).transpose()?;
    let own_usage = own.read()?;
    let expired = count(SessionStatus::Expired);
    println!(
        "  window {}s (after {}s settle): expired {expired} of {} (before the window {expired_before}); most in jeopardy at one check {worst_unconfirmed}; connections on {}",
        run.seconds,
        run.settle,
        all.len(),
        connected(&clients),
    );
    print_cpu(server_usage.as_ref(), &own_usage);
    let close_started = Instant::now();
    let mut closing = JoinSet::new();
    for s in sessions.into_iter().flatten() {
        let permit = permits.clone().acquire_owned().await?;
        closing.spawn(async move {
            let r = s.close().await;
            drop(permit);
            r
        });
    }
    let mut close_failed = 0;
    while let Some(joined) = closing.join_next().await {
        if joined?.is_err() {
            close_failed += 1;
        }
    }
    println!(
        "  closed in {:.1}s ({close_failed} failed)",
        close_started.elapsed().as_secs_f64()
    );
    Ok(())
}

type Conn = crate::watch::Conn;

/// Sends `requests` over one bare connection to `addr`, `window` in flight, and returns the
/// replies in the order they came.
async fn pipeline(
    addr: String,
    requests: Vec<Request>,
    window: usize,
) -> Result<Vec<Reply>, BenchError> {
    let mut conn = connect(&addr).await?;
    let n = requests.len();
    let mut replies = Vec::with_capacity(n);
    let mut requests = requests.into_iter();
    let (mut sent, mut in_flight) = (0u64, 0);
    while replies.len() < n {
        while in_flight < window {
            let Some(request) = requests.next() else {
                break;
            };
            sent += 1;
            in_flight += 1;
            conn.feed(ClientMessage::Request {
                request_id: sent,
                request,
            })
            .await?;
        }
        conn.flush().await?;
        match conn.next().await {
            Some(Ok(ServerMessage::Response { result, .. })) => {
                in_flight -= 1;
                replies.push(result.map_err(|e| format!("{addr}: {e}"))?);
            }
            Some(Ok(_)) => {}
            other => return Err(format!("{addr}: {other:?}").into()),
        }
    }
    Ok(replies)
}

/// Runs `requests` over `connections` bare connections to `addr` in parallel.
async fn pipeline_many(
    addr: &str,
    requests: Vec<Request>,
    connections: usize,
) -> Result<Vec<Reply>, BenchError> {
    let connections = connections.clamp(1, requests.len().max(1));
    let mut shares: Vec<Vec<Request>> = vec![Vec::new(); connections];
    for (i, r) in requests.into_iter().enumerate() {
        shares[i % connections].push(r);
    }
    let mut running = JoinSet::new();
    for share in shares {
        running.spawn(pipeline(addr.to_string(), share, 64));
    }
    let mut replies = Vec::new();
    while let Some(joined) = running.join_next().await {
        replies.extend(joined??);
    }
    Ok(replies)
}

/// What one keepalive connection saw.
#[derive(Debug)]
struct KeptAlive {
    expired: usize,
    /// Frames answered, and their round trips (µs) inside the measured window.
    rounds: Histogram<u64>,
    /// Frames not answered within the interval.
    unanswered: u64,
    addr: String,
}

/// The timing of the bare keepalive loops.
#[derive(Clone, Copy, Debug)]
struct KeepPlan {
    /// Between two frames of one connection.
    interval: Duration,
    /// How long after the send of its last answered keepalive a session is known to live.
    safe: Duration,
    /// When the first session was asked for (the safe bound before any answer).
    opened_from: Instant,
    /// Round trips are recorded from here.
    measure_from: Instant,
    /// No frame is sent after this.
    end: Instant,
}

/// Keeps `ids` alive over one bare connection to `addr` until `plan.end`, one frame per
/// interval.
async fn keep_alive_raw(
    addr: String,
    ids: Vec<SessionId>,
    plan: KeepPlan,
    expired_total: Arc<AtomicU64>,
) -> Result<KeptAlive, BenchError> {
    let KeepPlan {
        interval,
        safe,
        opened_from,
        measure_from,
        end,
    } = plan;
    let mut conn: Conn = connect(&addr).await?;
    let mut last_ok = vec![opened_from; ids.len()];
    let mut expired = vec![false; ids.len()];
    let index: std::collections::HashMap<SessionId, usize> =
        ids.iter().enumerate().map(|(i, id)| (*id, i)).collect();
    let mut rounds = Histogram::<u64>::new_with_bounds(1, 60_000_000, 3)?;
    let mut unanswered = 0;
    let mut request_id = 0u64;
    // The first round soon (the earliest sessions were opened a while ago), at a random
    // point of the first half second, as independent clients would.
    let offset = Duration::from_millis(500)
        .min(interval)
        .mul_f64(rand::random::<f64>());
    let mut next = Instant::now() + offset;
    let expire = |i: usize, expired: &mut Vec<bool>| {
        if !expired[i] {
            expired[i] = true;
            expired_total.fetch_add(1, Ordering::Relaxed);
        }
    };
    while next < end {
        tokio::time::sleep_until(next.into()).await;
        request_id += 1;
        let sent = Instant::now();
        let live: Vec<SessionId> = ids
            .iter()
            .zip(&expired)
            .filter(|(_, e)| !**e)
            .map(|(id, _)| *id)
            .collect();
        conn.send(ClientMessage::KeepAlive {
            request_id,
            sessions: live,
        })
        .await?;
        let deadline = sent + interval;
        let mut answered = false;
        while !answered {
            let frame = match tokio::time::timeout_at(deadline.into(), conn.next()).await {
                Err(_) => break,
                Ok(Some(Ok(frame))) => frame,
                Ok(other) => {
                    return Err(format!("keepalive connection to {addr}: {other:?}").into())
                }
            };
            match frame {
                ServerMessage::KeepAliveReply {
                    request_id: id,
                    results,
                } if id == request_id => {
                    answered = true;
                    if sent >= measure_from {
                        let _ = rounds.record(sent.elapsed().as_micros().max(1) as u64);
                    }
                    for (session, result) in results {
                        let Some(&i) = index.get(&session) else {
                            continue;
                        };
                        match result {
                            KeepAliveResult::Ok { .. } => last_ok[i] = sent,
                            KeepAliveResult::Expired => expire(i, &mut expired),
                        }
                    }
                }
                ServerMessage::SessionEvent { session, .. } => {
                    if let Some(&i) = index.get(&session) {
                        expire(i, &mut expired);
                    }
                }
                _ => {}
            }
        }
        if !answered {
            unanswered += 1;
        }
        let now = Instant::now();
        let lapsed: Vec<usize> = (last_ok.iter().enumerate())
            .filter(|(_, ok)| now >= **ok + safe)
            .map(|(i, _)| i)
            .collect();
        for i in lapsed {
            expire(i, &mut expired);
        }
        next += interval;
    }
    Ok(KeptAlive {
        expired: expired.iter().filter(|e| **e).count(),
        rounds,
        unanswered,
        addr,
    })
}

/// `sessions-spread`: opened on the leader, kept alive over bare connections on every endpoint.
pub async fn spread(run: &SessionsRun) -> Result<(), BenchError> {
    let leader = leader_addr(&run.endpoints).await?;
    let connections = run.connections.max(1);
    let open_started = Instant::now();
    let opens = vec![Request::OpenSession { ttl_ms: run.ttl_ms }; run.sessions];
    let mut ids = Vec::with_capacity(run.sessions);
    let mut tick_ms = 0;
    for reply in pipeline_many(&leader, opens, 8).await? {
        match reply {
            Reply::SessionOpened(grant) => {
                ids.push(grant.session);
                tick_ms = grant.tick_ms;
            }
            other => return Err(format!("OpenSession answered {other:?}").into()),
        }
    }
    let open_secs = open_started.elapsed().as_secs_f64();
    println!(
        "sessions-spread sessions={} connections={connections} ttl={}ms: opened on the leader {leader} in {open_secs:.1}s ({:.0}/s)",
        run.sessions,
        run.ttl_ms,
        ids.len() as f64 / open_secs
    );
    // The library's interval and safe bound (drift 1000 ppm as lockd grants by default).
    let interval = Duration::from_millis(run.ttl_ms / 3).max(Duration::from_millis(10));
    let drift = Duration::from_millis(run.ttl_ms.div_ceil(1000));
    let safe =
        Duration::from_millis(run.ttl_ms).saturating_sub(drift + Duration::from_millis(tick_ms));
    let all_ids = ids.clone();
    let mut shares: Vec<Vec<SessionId>> = vec![Vec::new(); connections];
    for (i, id) in ids.into_iter().enumerate() {
        shares[i % connections].push(id);
    }
    let measure_from = Instant::now() + Duration::from_secs(run.settle);
    let end = measure_from + Duration::from_secs(run.seconds);
    let expired_total = Arc::new(AtomicU64::new(0));
    let mut keeping = JoinSet::new();
    for (c, share) in shares.into_iter().enumerate() {
        keeping.spawn(keep_alive_raw(
            run.endpoints[c % run.endpoints.len()].clone(),
            share,
            KeepPlan {
                interval,
                safe,
                opened_from: open_started,
                measure_from,
                end,
            },
            expired_total.clone(),
        ));
    }
    tokio::time::sleep_until(measure_from.into()).await;
    let expired_before = expired_total.load(Ordering::Relaxed);
    let (servers, own) = meter(&run.server_pids)?;
    tokio::time::sleep_until(end.into()).await;
    let server_usage = servers.as_ref().map(CpuMeter::read).transpose()?;
    let own_usage = own.read()?;
    let mut rounds = Histogram::<u64>::new_with_bounds(1, 60_000_000, 3)?;
    let (mut expired, mut unanswered, mut addrs) = (0, 0, Vec::new());
    while let Some(joined) = keeping.join_next().await {
        let kept = joined??;
        expired += kept.expired;
        unanswered += kept.unanswered;
        rounds.add(&kept.rounds)?;
        addrs.push(kept.addr);
    }
    let ms = |q: f64| rounds.value_at_quantile(q) as f64 / 1000.0;
    println!(
        "  window {}s (after {}s settle): expired {expired} of {} (before the window {expired_before}); keepalive frames {} answered p50={:.2}ms p99={:.2}ms max={:.2}ms, {unanswered} unanswered; connections on {}",
        run.seconds,
        run.settle,
        run.sessions,
        rounds.len(),
        ms(0.5),
        ms(0.99),
        rounds.max() as f64 / 1000.0,
        tally(addrs.iter().map(|a| Some(a.as_str()))),
    );
    print_cpu(server_usage.as_ref(), &own_usage);
    let close_started = Instant::now();
    let closes = all_ids
        .into_iter()
        .map(|session| Request::CloseSession { session })
        .collect();
    pipeline_many(&leader, closes, 8).await?;
    println!("  closed in {:.1}s", close_started.elapsed().as_secs_f64());
    Ok(())
}
