//! Measures the storage layer alone: `Storage::commit_batch` with batches of N single-write
//! entries, as the event loop issues them. Prints commits/s, entries/s and latency percentiles.
//! `cargo run --release -p lockd-server --example commit_bench -- [batch] [seconds] [dir]`

use std::time::{Duration, Instant};

use lockd_protocol::{CreateOp, SessionSeq, SetOp, WriteOp};
use lockd_server::fsm::Command;
use lockd_server::raft::{Entry, EntryKind};
use lockd_server::storage::{Batch, HardState, Storage};

fn main() -> Result<(), Box<dyn std::error::Error>> {
    let args: Vec<String> = std::env::args().collect();
    let batch_size: u64 = args.get(1).map(|s| s.parse()).transpose()?.unwrap_or(1);
    let seconds: u64 = args.get(2).map(|s| s.parse()).transpose()?.unwrap_or(5);
    let dir = args
        .get(3)
        .cloned()
        .unwrap_or_else(|| "/tmp/lockd-commit-bench".into());
    let _ = std::fs::remove_dir_all(&dir);
    let storage = Storage::open(dir.as_ref(), 10_000)?;
    let mut index = 0u64;
    let commit =
        |entries: Vec<Entry>, index: u64| -> Result<Duration, Box<dyn std::error::Error>> {
            let start = Instant::now();
            let hard_state = (index == 1).then_some(HardState { term: 1, vote: 1 });
            storage.commit_batch(&Batch {
                entries,
                hard_state,
                apply_to: index,
            })?;
            Ok(start.elapsed())
        };
    let entry = |index: u64, command: Command| Entry {
        index,
        term: 1,
        proposer_term: 1,
        time_ms: index,
        kind: EntryKind::Command(command),
    };
    // A session and 1,000 keys.
    index += 1;
    commit(
        vec![entry(
            index,
            Command::OpenSession {
                ttl_ms: 60_000,
                tick_ms: 100,
                drift_ppm: 1000,
                implicit: std::env::var("EXPLICIT").is_err(),
            },
        )],
        index,
    )?;
    let session = lockd_protocol::SessionId(index);
    let mut seq = 0u64;
    let mut next = |op: WriteOp| {
        seq += 1;
        Command::Write {
            session: SessionSeq {
                session,
                seq,
                floor: seq,
            },
            op,
            fence: None,
        }
    };
    let mut entries = Vec::new();
    for k in 0..1000 {
        index += 1;
        let op = WriteOp::Create(CreateOp {
            path: format!("/k{k:06}"),
            data: vec![b'x'; 64],
            ephemeral: false,
            sequential: false,
        });
        entries.push(entry(index, next(op)));
    }
    commit(entries, index)?;
    let mut latencies = Vec::new();
    let started = Instant::now();
    let mut entries_done = 0u64;
    while started.elapsed() < Duration::from_secs(seconds) {
        let mut entries = Vec::new();
        for _ in 0..batch_size {
            index += 1;
            let op = WriteOp::Set(SetOp {
                path: format!("/k{:06}", index % 1000),
                data: vec![b'y'; 64],
                expected_version: None,
            });
            entries.push(entry(index, next(op)));
        }
        latencies.push(commit(entries, index)?);
        entries_done += batch_size;
    }
    let elapsed = started.elapsed().as_secs_f64();
    latencies.sort();
    let pct = |q: f64| {
        latencies[((latencies.len() as f64 * q) as usize).min(latencies.len() - 1)].as_micros()
    };
    println!(
        "batch={batch_size} commits/s={:.0} entries/s={:.0} p50={}us p99={}us p99.9={}us max={}us",
        latencies.len() as f64 / elapsed,
        entries_done as f64 / elapsed,
        pct(0.5),
        pct(0.99),
        pct(0.999),
        pct(1.0)
    );
    Ok(())
}
