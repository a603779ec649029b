//! Watch workloads over the raw protocol: fan-out latency of one writer's changes to many
//! watchers, and the server memory taken by many idle watches.

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use futures_util::{SinkExt, StreamExt};
use hdrhistogram::Histogram;
use lockd_protocol::{
    ClientMessage, CreateOp, EventKind, FrameCodec, Hello, Reply, Request, ServerMessage, SetOp,
    WatchRequest, WatchTarget, WriteOp,
};
use tokio::net::TcpStream;
use tokio_util::codec::Framed;

pub type Conn = Framed<TcpStream, FrameCodec<ServerMessage, ClientMessage>>;

/// A failed benchmark step.
pub type BenchError = Box<dyn std::error::Error + Send + Sync>;

/// A raw connection that has said Hello.
pub async fn connect(addr: &str) -> Result<Conn, BenchError> {
    let stream = TcpStream::connect(addr).await?;
    stream.set_nodelay(true)?;
    let mut conn = Framed::new(stream, FrameCodec::default());
    conn.send(ClientMessage::Hello(Hello {
        protocol_version: lockd_protocol::PROTOCOL_VERSION,
        client_name: "bench".into(),
    }))
    .await?;
    match conn.next().await {
        Some(Ok(ServerMessage::HelloOk(_))) => Ok(conn),
        other => Err(format!("handshake: {other:?}").into()),
    }
}

async fn request(conn: &mut Conn, id: u64, request: Request) -> Result<Reply, BenchError> {
    conn.send(ClientMessage::Request {
        request_id: id,
        request,
    })
    .await?;
    loop {
        match conn.next().await {
            Some(Ok(ServerMessage::Response {
                request_id, result, ..
            })) if request_id == id => return Ok(result?),
            Some(Ok(_)) => continue,
            other => return Err(format!("no answer: {other:?}").into()),
        }
    }
}

async fn ensure(conn: &mut Conn, path: &str) -> Result<(), BenchError> {
    let op = WriteOp::Create(CreateOp {
        path: path.into(),
        data: vec![],
        ephemeral: false,
        sequential: false,
    });
    match request(conn, 1, Request::Write { session: None, op }).await {
        Ok(_) => Ok(()),
        Err(e) if e.to_string().contains("already exists") => Ok(()),
        Err(e) => Err(e),
    }
}

async fn open_watch(conn: &mut Conn, id: u64, path: &str) -> Result<(), BenchError> {
    let watch = WatchRequest {
        target: WatchTarget::Prefix(path.into()),
        start_revision: None,
        with_data: true,
    };
    match request(conn, id, Request::Watch(watch)).await? {
        Reply::WatchCreated { .. } => Ok(()),
        other => Err(format!("watch: {other:?}").into()),
    }
}

/// `watchers` connections watch /fan, spread round-robin over `endpoints`; one writer on the
/// leader (`leader`) changes /fan/k `rate` times a second with its send time in the data;
/// prints the delivery latency (send → watcher) percentiles.
pub async fn fanout(
    leader: &str,
    endpoints: &[String],
    watchers: usize,
    rate: u64,
    seconds: u64,
) -> Result<(), BenchError> {
    let mut writer = connect(leader).await?;
    ensure(&mut writer, "/fan").await?;
    ensure(&mut writer, "/fan/k").await?;
    let base = Instant::now();
    let measuring = Arc::new(AtomicBool::new(true));
    let mut tasks = Vec::new();
    for w in 0..watchers {
        let mut conn = connect(&endpoints[w % endpoints.len()]).await?;
        open_watch(&mut conn, 2, "/fan").await?;
        let measuring = measuring.clone();
        tasks.push(tokio::spawn(async move {
            let mut histogram =
                Histogram::<u64>::new_with_bounds(1, 60_000_000, 3).expect("bounds");
            while measuring.load(Ordering::Relaxed) {
                let Ok(Some(Ok(frame))) =
                    tokio::time::timeout(Duration::from_millis(200), conn.next()).await
                else {
                    continue;
                };
                if let ServerMessage::WatchEvents { events, .. } = frame {
                    for event in events {
                        if let EventKind::Changed {
                            data: Some(data), ..
                        } = event.kind
                        {
                            if let Ok(bytes) = <[u8; 8]>::try_from(data.as_slice()) {
                                let sent = Duration::from_nanos(u64::from_be_bytes(bytes));
                                let latency = base.elapsed().saturating_sub(sent);
                                let _ = histogram.record(latency.as_micros().max(1) as u64);
                            }
                        }
                    }
                }
            }
            histogram
        }));
    }
    let interval = Duration::from_micros(1_000_000 / rate.max(1));
    let end = Instant::now() + Duration::from_secs(seconds);
    let mut writes = 0u64;
    let mut write_latency = Histogram::<u64>::new_with_bounds(1, 60_000_000, 3)?;
    let mut next = Instant::now();
    while Instant::now() < end {
        let sent = base.elapsed().as_nanos() as u64;
        let op = WriteOp::Set(SetOp {
            path: "/fan/k".into(),
            data: sent.to_be_bytes().to_vec(),
            expected_version: None,
        });
        let started = Instant::now();
        request(
            &mut writer,
            10 + writes,
            Request::Write { session: None, op },
        )
        .await?;
        let _ = write_latency.record(started.elapsed().as_micros().max(1) as u64);
        writes += 1;
        next += interval;
        tokio::time::sleep_until(next.into()).await;
    }
    tokio::time::sleep(Duration::from_millis(500)).await;
    measuring.store(false, Ordering::Relaxed);
    let mut total = Histogram::<u64>::new_with_bounds(1, 60_000_000, 3)?;
    for t in tasks {
        total.add(&t.await?)?;
    }
    let ms = |h: &Histogram<u64>, q: f64| h.value_at_quantile(q) as f64 / 1000.0;
    println!(
        "watch-fanout watchers={watchers} writes={writes} deliveries={} (expected {}) delivery p50={:.2}ms p99={:.2}ms max={:.2}ms; write p50={:.2}ms p99={:.2}ms",
        total.len(),
        writes * watchers as u64,
        ms(&total, 0.5),
        ms(&total, 0.99),
        total.max() as f64 / 1000.0,
        ms(&write_latency, 0.5),
        ms(&write_latency, 0.99),
    );
    Ok(())
}

fn rss_kib(pid: u32) -> Result<u64, BenchError> {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status"))?;
    status
        .lines()
        .find_map(|l| l.strip_prefix("VmRSS:"))
        .and_then(|v| v.split_whitespace().next())
        .and_then(|v| v.parse().ok())
        .ok_or_else(|| "no VmRSS".into())
}

/// Opens `watches` idle watches over `connections` connections to `addr` and prints the
/// resident memory of that server (`server_pid`) before and after; the parent node is
/// created through the leader (`leader`).
pub async fn idle(
    leader: &str,
    addr: &str,
    watches: usize,
    connections: usize,
    server_pid: u32,
) -> Result<(), BenchError> {
    let mut setup = connect(leader).await?;
    ensure(&mut setup, "/idle").await?;
    let before = rss_kib(server_pid)?;
    let mut conns = Vec::new();
    for c in 0..connections {
        let mut conn = connect(addr).await?;
        for w in 0..watches / connections {
            open_watch(&mut conn, 100 + w as u64, &format!("/idle/w{c}-{w}")).await?;
        }
        conns.push(conn);
    }
    tokio::time::sleep(Duration::from_secs(2)).await;
    let after = rss_kib(server_pid)?;
    println!(
        "idle-watches watches={watches} connections={connections} server RSS before={:.1}MiB after={:.1}MiB delta={:.1}MiB",
        before as f64 / 1024.0,
        after as f64 / 1024.0,
        (after as f64 - before as f64) / 1024.0
    );
    drop(conns);
    Ok(())
}
