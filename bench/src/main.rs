//! `lockd-bench`: closed-loop workloads against a running lockd, in the shape of
//! ../shared/bench-anchors.md (64-byte values, 1,000 random keys, warm-up then a measured
//! window, every client with its own connection). Prints ops/s and latency percentiles.

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

mod watch;

use argh::FromArgs;
use hdrhistogram::Histogram;
use lockd_client::{Client, ClientConfig};
use rand::{Rng, SeedableRng};

/// Closed-loop benchmark of a running lockd.
#[derive(FromArgs, Debug)]
struct Args {
    /// server address (default 127.0.0.1:7001)
    #[argh(option, default = "String::from(\"127.0.0.1:7001\")")]
    addr: String,
    /// workload: put, put-raw, get, get-stale, lock-own, lock-contended, watch-fanout (clients = watchers), watch-idle (clients = connections) (default put)
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
    /// watch-idle: the server's pid, to read its memory
    #[argh(option)]
    server_pid: Option<u32>,
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

async fn prepare(addr: &str, keys: u64, value: &[u8]) -> Result<(), lockd_client::Error> {
    let client = Client::with_config(ClientConfig::new([addr])).await?;
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

/// One client's closed loop; records latencies (µs) once `measuring` is set.
async fn client_loop(
    addr: String,
    workload: Workload,
    keys: u64,
    value: Vec<u8>,
    seed: u64,
    measuring: Arc<AtomicBool>,
    stop: Arc<AtomicBool>,
) -> Result<Histogram<u64>, lockd_client::Error> {
    if workload == Workload::PutRaw {
        return raw_put_loop(addr, keys, value, seed, measuring, stop).await;
    }
    if workload == Workload::LockOwnRaw {
        return raw_lock_loop(addr, seed, measuring, stop).await;
    }
    let client = Client::with_config(ClientConfig::new([addr.as_str()])).await?;
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
    Ok(histogram)
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

async fn run(args: &Args, workload: Workload, clients: usize) -> Result<(), lockd_client::Error> {
    let value = vec![b'x'; args.value_size];
    let measuring = Arc::new(AtomicBool::new(false));
    let stop = Arc::new(AtomicBool::new(false));
    let tasks: Vec<_> = (0..clients)
        .map(|c| {
            tokio::spawn(client_loop(
                args.addr.clone(),
                workload,
                args.keys,
                value.clone(),
                c as u64 + 1,
                measuring.clone(),
                stop.clone(),
            ))
        })
        .collect();
    tokio::time::sleep(Duration::from_secs(args.warmup)).await;
    measuring.store(true, Ordering::Relaxed);
    let started = Instant::now();
    tokio::time::sleep(Duration::from_secs(args.seconds)).await;
    measuring.store(false, Ordering::Relaxed);
    let elapsed = started.elapsed();
    stop.store(true, Ordering::Relaxed);
    let mut total = Histogram::<u64>::new_with_bounds(1, 60_000_000, 3)
        .map_err(|e| lockd_client::Error::Protocol(e.to_string()))?;
    for t in tasks {
        let h = t
            .await
            .map_err(|e| lockd_client::Error::Protocol(e.to_string()))??;
        let _ = total.add(&h);
    }
    let ms = |q: f64| total.value_at_quantile(q) as f64 / 1000.0;
    println!(
        "{:<10} clients={:<4} ops/s={:>9.0}  p50={:.2}ms p99={:.2}ms p99.9={:.2}ms max={:.2}ms  (n={})",
        args.workload,
        clients,
        total.len() as f64 / elapsed.as_secs_f64(),
        ms(0.5),
        ms(0.99),
        ms(0.999),
        total.max() as f64 / 1000.0,
        total.len()
    );
    Ok(())
}

#[tokio::main]
async fn main() -> std::process::ExitCode {
    let args: Args = argh::from_env();
    let client_counts: Result<Vec<usize>, _> =
        args.clients.split(',').map(|c| c.trim().parse()).collect();
    match (args.workload.as_str(), &client_counts) {
        ("watch-fanout", Ok(counts)) => {
            for &watchers in counts {
                if let Err(e) = watch::fanout(&args.addr, watchers, args.rate, args.seconds).await {
                    eprintln!("lockd-bench: {e}");
                    return std::process::ExitCode::FAILURE;
                }
            }
            return std::process::ExitCode::SUCCESS;
        }
        ("watch-idle", Ok(counts)) => {
            let Some(pid) = args.server_pid else {
                eprintln!("lockd-bench: watch-idle needs --server-pid");
                return std::process::ExitCode::from(2);
            };
            for &connections in counts {
                if let Err(e) = watch::idle(&args.addr, args.watches, connections.max(1), pid).await
                {
                    eprintln!("lockd-bench: {e}");
                    return std::process::ExitCode::FAILURE;
                }
            }
            return std::process::ExitCode::SUCCESS;
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
            eprintln!("lockd-bench: unknown workload {other:?} (put, get, get-stale)");
            return std::process::ExitCode::from(2);
        }
    };
    let client_counts: Result<Vec<usize>, _> =
        args.clients.split(',').map(|c| c.trim().parse()).collect();
    let Ok(client_counts) = client_counts else {
        eprintln!("lockd-bench: --clients takes comma-separated numbers");
        return std::process::ExitCode::from(2);
    };
    if let Err(e) = prepare(&args.addr, args.keys, &vec![b'x'; args.value_size]).await {
        eprintln!("lockd-bench: preparing keys failed: {e}");
        return std::process::ExitCode::FAILURE;
    }
    for clients in client_counts {
        if let Err(e) = run(&args, workload, clients).await {
            eprintln!("lockd-bench: run with {clients} clients failed: {e}");
            return std::process::ExitCode::FAILURE;
        }
    }
    std::process::ExitCode::SUCCESS
}
