//! A leader-elected worker: every instance campaigns on one election; the leader does the
//! work (here: appends a heartbeat to /leader-worker/log, fenced with its token) until it
//! loses leadership or finishes its rounds, then resigns and campaigns again.
//!
//! Run a server (`lockd --data-dir /tmp/lockd`), then several of these:
//! `cargo run -p lockd-client --example leader_worker -- 127.0.0.1:7001 worker-1`

use std::time::Duration;

use lockd_client::{Client, LeaderElection};

#[tokio::main]
async fn main() -> Result<(), lockd_client::Error> {
    let mut args = std::env::args().skip(1);
    let endpoint = args.next().unwrap_or_else(|| "127.0.0.1:7001".into());
    let me = args
        .next()
        .unwrap_or_else(|| format!("worker-{}", std::process::id()));
    let client = Client::connect([endpoint]).await?;
    match client.create("/leader-worker", Vec::new()).await {
        Ok(_) => {}
        Err(e) if e.is_node_exists() => {}
        Err(e) => return Err(e),
    }
    let election = LeaderElection::new(&client, "leader-worker");
    for term in 0..3 {
        println!("{me}: campaigning (term {term})");
        let worker = client.clone();
        let name = me.clone();
        let rounds = election
            .run_while_leader(me.clone().into_bytes(), |token, cancel| async move {
                println!("{name}: leading with fencing token {token}");
                let mut rounds = 0u32;
                while !cancel.is_cancelled() && rounds < 10 {
                    let line = format!("{name} token {token} round {rounds}");
                    // Fenced: rejected if another leader took over meanwhile.
                    let write = worker
                        .set("/leader-worker", line.into_bytes())
                        .fenced("leader-worker", token)
                        .await;
                    if let Err(e) = write {
                        eprintln!("{name}: write rejected, stepping down: {e}");
                        break;
                    }
                    rounds += 1;
                    tokio::select! {
                        _ = cancel.cancelled() => break,
                        _ = tokio::time::sleep(Duration::from_millis(500)) => {}
                    }
                }
                rounds
            })
            .await?;
        println!("{me}: did {rounds} rounds as leader, resigned");
    }
    Ok(())
}
