//! `lockd-bench`: closed-loop workloads against a running lockd (one node or a cluster), in
//! the shape of ../shared/bench-anchors.md (64-byte values, 1,000 random keys, warm-up then
//! a measured window, every client with its own connection). Prints ops/s and latency
//! percentiles, and the servers' CPU when given their pids.
//!
//! With several endpoints (`--addr a,b,c`) client `c` dials endpoint `c mod n` first. Through
//! the client library a write answered `NotLeader` is followed to the leader, so writers end
//! up connected to the leader while readers stay where they dialled (linearizable reads are
//! served by any node). Workloads that bypass the library (`put-raw`, `lock-own-raw`, the
//! watch writer, session opening in `sessions-spread`) send their writes to the leader,
//! found through `cluster status`.

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

mod cluster;
mod sessions;
mod watch;

use argh::FromArgs;
use hdrhistogram::Histogram;
use lockd_client::{Client, ClientConfig};
use rand::{Rng, SeedableRng};

/// Closed-loop benchmark of a running lockd.
#[derive(FromArgs, Debug)]
struct Args {
    /// server address, or comma-separated addresses of a cluster's nodes (clients are spread
    /// over them round-robin) (default 127.0.0.1:7001)
    #[argh(option, default = "String::from(\"127.0.0.1:7001\")")]
    addr: String,
    /// workload: put, put-raw, get, get-stale, lock-own, lock-own-raw, lock-contended, watch-fanout (clients = watchers), watch-idle (clients = connections), sessions and sessions-spread (clients = connections) (default put)
    #[argh(option, default = "String::from(\"put\")")]
    workload: String,
    /// concurrent clients, comma-separated for several runs (default 1,16)
    #[argh(option, default = "String::from(\"1,16\")")]
    clients: String,
    /// measured seconds per run (default 10)
    #[argh(option, default = "10")]
    seconds: u64,
    /// warm-up seconds per run (default 2)
    #[argh(option, default = "2")]
    warmup: u64,
    /// number of distinct keys (default 1000)
    #[argh(option, default = "1000")]
    keys: u64,
    /// value size in bytes (default 64)
    #[argh(option, default = "64")]
    value_size: usize,
    /// watch-fanout: writes per second (default 100)
    #[argh(option, default = "100")]
    rate: u64,
    /// watch-idle: number of watches (default 10000)
    #[argh(option, default = "10000")]
    watches: usize,
    /// comma-separated pids of the server processes: their summed CPU over the measured
    /// window is printed (watch-idle: the memory of the first, which must serve the first
    /// --addr)
    #[argh(option)]
    server_pid: Option<String>,
    /// sessions: number of sessions (default 10000)
    #[argh(option, default = "10000")]
    sessions: usize,
    /// sessions: TTL requested for each session, in ms (default 10000)
    #[argh(option, default = "10000")]
    ttl_ms: u64,
    /// sessions: seconds between opening the sessions and the measured window (default 2)
    #[argh(option, default = "2")]
    settle: u64,
}

#[derive(Clone, Copy, Debug, PartialEq)]
enum Workload {
    Put,
    /// `put` over a bare framed connection, without the client library (to see its cost).
    PutRaw,
    Get,
    GetStale,
    /// Every client its own lock: one op = acquire + release.
    LockOwn,
    /// All clients one lock: one op = one acquisition (a handoff); latency = acquire wait.
    LockContended,
    /// `lock-own` over a bare connection with an explicit session (no client library).
    LockOwnRaw,
}

fn key(i: u64) -> String {
    format!("/bench/k{i:06}")
}

async fn prepare(endpoints: &[String], keys: u64, value: &[u8]) -> Result<(), lockd_client::Error> {
    let client = Client::with_config(ClientConfig::new(endpoints.iter().cloned())).await?;
    match client.create("/bench", Vec::new()).await {
        Ok(_) | Err(lockd_client::Error::Server(lockd_protocol::Error::NodeExists { .. })) => {}
        Err(e) => return Err(e),
    }
    let mut pending = Vec::new();
    for i in 0..keys {
        let client = client.clone();
        let value = value.to_vec();
        pending.push(tokio::spawn(async move {
            match client.create(key(i), value).await {
                Ok(_)
                | Err(lockd_client::Error::Server(lockd_protocol::Error::NodeExists { .. })) => {
                    Ok(())
                }
                Err(e) => Err(e),
            }
        }));
    }
    for p in pending {
        p.await
            .map_err(|e| lockd_client::Error::Protocol(e.to_string()))??;
    }
    Ok(())
}

/// Where a client connects: its endpoint list (library workloads), or the leader (raw ones).
#[derive(Clone, Debug)]
enum Target {
    Endpoints(Vec<String>),
    Leader(String),
}

/// A client's latencies and the address it was connected to at the end.
type ClientResult = (Histogram<u64>, Option<String>);

/// One client's closed loop; records latencies (µs) once `measuring` is set.
async fn client_loop(
    target: Target,
    workload: Workload,
    keys: u64,
    value: Vec<u8>,
    seed: u64,
    measuring: Arc<AtomicBool>,
    stop: Arc<AtomicBool>,
) -> Result<ClientResult, lockd_client::Error> {
    let endpoints = match target {
        Target::Leader(addr) => {
            let histogram = match workload {
                Workload::PutRaw => {
                    raw_put_loop(addr.clone(), keys, value, seed, measuring, stop).await?
                }
                Workload::LockOwnRaw => raw_lock_loop(addr.clone(), seed, measuring, stop).await?,
                other => unreachable!("{other:?} runs through the client library"),
            };
            return Ok((histogram, Some(addr)));
        }
        Target::Endpoints(endpoints) => endpoints,
    };
    let client = Client::with_config(ClientConfig::new(endpoints)).await?;
    let mut rng = rand::rngs::StdRng::seed_from_u64(seed);
    let mut histogram = Histogram::<u64>::new_with_bounds(1, 60_000_000, 3)
        .map_err(|e| lockd_client::Error::Protocol(e.to_string()))?;
    while !stop.load(Ordering::Relaxed) {
        let k = key(rng.random_range(0..keys));
        let start = Instant::now();
        match workload {
            Workload::Put => {
                client.set(&k, value.clone()).await?;
            }
            Workload::PutRaw | Workload::LockOwnRaw => unreachable!("handled by the raw loops"),
            Workload::LockOwn => {
                let guard = client.lock(format!("bench-own-{seed}")).await?;
                guard.release().await?;
            }
            Workload::LockContended => {
                let guard = client.lock("bench-contended").await?;
                let waited = start.elapsed();
                guard.release().await?;
                if measuring.load(Ordering::Relaxed) {
                    let _ = histogram.record(waited.as_micros().max(1) as u64);
                }
                continue;
            }
            Workload::Get => {
                client.get(&k).await?;
            }
            Workload::GetStale => {
                client.get(&k).stale().await?;
            }
        }
        if measuring.load(Ordering::Relaxed) {
            let _ = histogram.record(start.elapsed().as_micros().max(1) as u64);
        }
    }
    Ok((histogram, client.connected_to()))
}

async fn raw_put_loop(
    addr: String,
    keys: u64,
    value: Vec<u8>,
    seed: u64,
    measuring: Arc<AtomicBool>,
    stop: Arc<AtomicBool>,
) -> Result<Histogram<u64>, lockd_client::Error> {
    use futures_util::{SinkExt, StreamExt};
    use lockd_protocol::{ClientMessage, Request, ServerMessage, SetOp, WriteOp};
    let fail = |e: &dyn std::fmt::Display| lockd_client::Error::Protocol(e.to_string());
    let mut framed = watch::connect(&addr).await.map_err(|e| fail(&e))?;
    let mut rng = rand::rngs::StdRng::seed_from_u64(seed);
    let mut histogram =
        Histogram::<u64>::new_with_bounds(1, 60_000_000, 3).map_err(|e| fail(&e))?;
    let mut request_id = 0;
    while !stop.load(Ordering::Relaxed) {
        request_id += 1;
        let op = WriteOp::Set(SetOp {
            path: key(rng.random_range(0..keys)),
            data: value.clone(),
            expected_version: None,
        });
        let start = Instant::now();
        framed
            .send(ClientMessage::Request {
                request_id,
                request: Request::Write { session: None, op },
            })
            .await
            .map_err(|e| fail(&e))?;
        match framed.next().await {
            Some(Ok(ServerMessage::Response { result: Ok(_), .. })) => {}
            other => return Err(fail(&format!("{other:?}"))),
        }
        if measuring.load(Ordering::Relaxed) {
            let _ = histogram.record(start.elapsed().as_micros().max(1) as u64);
        }
    }
    Ok(histogram)
}

async fn raw_lock_loop(
    addr: String,
    seed: u64,
    measuring: Arc<AtomicBool>,
    stop: Arc<AtomicBool>,
) -> Result<Histogram<u64>, lockd_client::Error> {
    use futures_util::{SinkExt, StreamExt};
    use lockd_protocol::{
        AcquireOp, ClientMessage, FrameCodec, LockResult, ReleaseOp, Reply, Request, ServerMessage,
        SessionSeq, WriteOp, WriteResult,
    };
    let fail = |e: &dyn std::fmt::Display| lockd_client::Error::Protocol(e.to_string());
    let mut framed = watch::connect(&addr).await.map_err(|e| fail(&e))?;
    let mut request_id = 0;
    let mut call = async |framed: &mut tokio_util::codec::Framed<
        tokio::net::TcpStream,
        FrameCodec<ServerMessage, ClientMessage>,
    >,
                          request: Request|
           -> Result<Reply, lockd_client::Error> {
        request_id += 1;
        framed
            .send(ClientMessage::Request {
                request_id,
                request,
            })
            .await
            .map_err(|e| fail(&e))?;
        match framed.next().await {
            Some(Ok(ServerMessage::Response {
                result: Ok(reply), ..
            })) => Ok(reply),
            other => Err(fail(&format!("{other:?}"))),
        }
    };
    let session = match call(&mut framed, Request::OpenSession { ttl_ms: 30_000 }).await? {
        Reply::SessionOpened(grant) => grant.session,
        other => return Err(fail(&format!("{other:?}"))),
    };
    let mut histogram =
        Histogram::<u64>::new_with_bounds(1, 60_000_000, 3).map_err(|e| fail(&e))?;
    let mut seq = 0;
    let lock = format!("bench-raw-{seed}");
    while !stop.load(Ordering::Relaxed) {
        let start = Instant::now();
        seq += 1;
        let header = SessionSeq {
            session,
            seq,
            floor: seq,
        };
        let op = WriteOp::Acquire(AcquireOp {
            lock: lock.clone(),
            value: vec![],
            try_only: false,
            timeout_ms: None,
            lock_delay_ms: None,
        });
        let token = match call(
            &mut framed,
            Request::Write {
                session: Some(header),
                op,
            },
        )
        .await?
        {
            Reply::Write(WriteResult::Lock(LockResult::Granted { token })) => token,
            other => return Err(fail(&format!("{other:?}"))),
        };
        seq += 1;
        let header = SessionSeq {
            session,
            seq,
            floor: seq,
        };
        let op = WriteOp::Release(ReleaseOp {
            lock: lock.clone(),
            token,
        });
        call(
            &mut framed,
            Request::Write {
                session: Some(header),
                op,
            },
        )
        .await?;
        if measuring.load(Ordering::Relaxed) {
            let _ = histogram.record(start.elapsed().as_micros().max(1) as u64);
        }
    }
    Ok(histogram)
}

async fn run(
    args: &Args,
    setup: &Setup,
    workload: Workload,
    clients: usize,
) -> Result<(), lockd_client::Error> {
    let value = vec![b'x'; args.value_size];
    let measuring = Arc::new(AtomicBool::new(false));
    let stop = Arc::new(AtomicBool::new(false));
    let tasks: Vec<_> = (0..clients)
        .map(|c| {
            let target = match &setup.leader {
                Some(leader) => Target::Leader(leader.clone()),
                None => Target::Endpoints(cluster::endpoints_for(&setup.endpoints, c)),
            };
            tokio::spawn(client_loop(
                target,
                workload,
                args.keys,
                value.clone(),
                c as u64 + 1,
                measuring.clone(),
                stop.clone(),
            ))
        })
        .collect();
    let fail = |e: &dyn std::fmt::Display| lockd_client::Error::Protocol(e.to_string());
    tokio::time::sleep(Duration::from_secs(args.warmup)).await;
    let cpu = match setup.server_pids.is_empty() {
        true => None,
        false => Some(
            cluster::CpuMeter::start(setup.server_pids.iter().map(u32::to_string).collect())
                .map_err(|e| fail(&e))?,
        ),
    };
    measuring.store(true, Ordering::Relaxed);
    let started = Instant::now();
    tokio::time::sleep(Duration::from_secs(args.seconds)).await;
    measuring.store(false, Ordering::Relaxed);
    let elapsed = started.elapsed();
    let cpu = cpu.map(|m| m.read()).transpose().map_err(|e| fail(&e))?;
    stop.store(true, Ordering::Relaxed);
    let mut total = Histogram::<u64>::new_with_bounds(1, 60_000_000, 3).map_err(|e| fail(&e))?;
    let mut connected = Vec::with_capacity(clients);
    for t in tasks {
        let (h, addr) = t.await.map_err(|e| fail(&e))??;
        let _ = total.add(&h);
        connected.push(addr);
    }
    let ms = |q: f64| total.value_at_quantile(q) as f64 / 1000.0;
    let ops = total.len() as f64 / elapsed.as_secs_f64();
    println!(
        "{:<10} clients={:<4} ops/s={:>9.0}  p50={:.2}ms p99={:.2}ms p99.9={:.2}ms max={:.2}ms  (n={})",
        args.workload,
        clients,
        ops,
        ms(0.5),
        ms(0.99),
        ms(0.999),
        total.max() as f64 / 1000.0,
        total.len()
    );
    if setup.endpoints.len() > 1 || cpu.is_some() {
        let cpu = cpu.map_or_else(String::new, |c| {
            format!(
                "; server CPU {}, {:.0} µs per op",
                c.describe(),
                1e6 * c.total_seconds() / (ops * c.wall).max(1.0)
            )
        });
        let on = cluster::tally(connected.iter().map(Option::as_deref));
        println!("           connected at the end: {on}{cpu}");
    }
    Ok(())
}

/// What every run shares: the endpoints, the leader for raw workloads, the server pids.
#[derive(Debug)]
struct Setup {
    endpoints: Vec<String>,
    leader: Option<String>,
    server_pids: Vec<u32>,
}

#[tokio::main]
async fn main() -> std::process::ExitCode {
    let args: Args = argh::from_env();
    match bench(&args).await {
        Ok(()) => std::process::ExitCode::SUCCESS,
        Err(Failure::Usage(e)) => {
            eprintln!("lockd-bench: {e}");
            std::process::ExitCode::from(2)
        }
        Err(Failure::Run(e)) => {
            eprintln!("lockd-bench: {e}");
            std::process::ExitCode::FAILURE
        }
    }
}

#[derive(Debug)]
enum Failure {
    Usage(String),
    Run(String),
}

fn run_failed(what: impl std::fmt::Display) -> impl FnOnce(watch::BenchError) -> Failure {
    move |e| Failure::Run(format!("{what}: {e}"))
}

async fn bench(args: &Args) -> Result<(), Failure> {
    let endpoints =
        cluster::parse_endpoints(&args.addr).map_err(|e| Failure::Usage(e.to_string()))?;
    let server_pids = match &args.server_pid {
        Some(p) => cluster::parse_pids(p).map_err(|e| Failure::Usage(e.to_string()))?,
        None => Vec::new(),
    };
    let client_counts: Vec<usize> = args
        .clients
        .split(',')
        .map(|c| c.trim().parse())
        .collect::<Result<_, _>>()
        .map_err(|_| Failure::Usage("--clients takes comma-separated numbers".into()))?;
    let leader = || async {
        cluster::leader_addr(&endpoints)
            .await
            .map_err(run_failed("finding the leader"))
    };
    match args.workload.as_str() {
        "watch-fanout" => {
            let leader = leader().await?;
            for &watchers in &client_counts {
                watch::fanout(&leader, &endpoints, watchers, args.rate, args.seconds)
                    .await
                    .map_err(run_failed("watch-fanout"))?;
            }
            return Ok(());
        }
        "watch-idle" => {
            let Some(&pid) = server_pids.first() else {
                return Err(Failure::Usage("watch-idle needs --server-pid".into()));
            };
            let leader = leader().await?;
            for &connections in &client_counts {
                watch::idle(
                    &leader,
                    &endpoints[0],
                    args.watches,
                    connections.max(1),
                    pid,
                )
                .await
                .map_err(run_failed("watch-idle"))?;
            }
            return Ok(());
        }
        "sessions" | "sessions-spread" => {
            for &connections in &client_counts {
                let run = sessions::SessionsRun {
                    endpoints: endpoints.clone(),
                    sessions: args.sessions,
                    connections,
                    ttl_ms: args.ttl_ms,
                    seconds: args.seconds,
                    settle: args.settle,
                    server_pids: server_pids.clone(),
                };
                if args.workload == "sessions" {
                    sessions::library(&run).await
                } else {
                    sessions::spread(&run).await
                }
                .map_err(run_failed(&args.workload))?;
            }
            return Ok(());
        }
        _ => {}
    }
    let workload = match args.workload.as_str() {
        "put" => Workload::Put,
        "put-raw" => Workload::PutRaw,
        "lock-own" => Workload::LockOwn,
        "lock-contended" => Workload::LockContended,
        "lock-own-raw" => Workload::LockOwnRaw,
        "get" => Workload::Get,
        "get-stale" => Workload::GetStale,
        other => {
            return Err(Failure::Usage(format!(
                "unknown workload {other:?} (see --help)"
            )))
        }
    };
    let leader = match workload {
        Workload::PutRaw | Workload::LockOwnRaw => Some(leader().await?),
        _ => None,
    };
    let setup = Setup {
        endpoints,
        leader,
        server_pids,
    };
    prepare(&setup.endpoints, args.keys, &vec![b'x'; args.value_size])
        .await
        .map_err(|e| Failure::Run(format!("preparing keys failed: {e}")))?;
    for clients in client_counts {
        run(args, &setup, workload, clients)
            .await
            .map_err(|e| Failure::Run(format!("run with {clients} clients failed: {e}")))?;
    }
    Ok(())
}
