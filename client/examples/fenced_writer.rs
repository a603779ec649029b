//! A fenced writer: acquires a lock, writes with its fencing token, releases; then shows
//! that a write carrying the old token is rejected once someone else holds the lock, and
//! how an outside resource would check tokens itself (reject any token lower than the
//! highest it has seen).
//!
//! `cargo run -p lockd-client --example fenced_writer -- 127.0.0.1:7001`

use lockd_client::Client;

/// An outside resource that remembers the highest token it has accepted.
#[derive(Default)]
struct Storage {
    highest: u64,
    value: String,
}

impl Storage {
    fn write(&mut self, token: u64, value: &str) -> Result<(), String> {
        if token < self.highest {
            return Err(format!("token {token} is older than {}", self.highest));
        }
        self.highest = token;
        self.value = value.to_string();
        Ok(())
    }
}

#[tokio::main]
async fn main() -> Result<(), lockd_client::Error> {
    let endpoint = std::env::args()
        .nth(1)
        .unwrap_or_else(|| "127.0.0.1:7001".into());
    let client = Client::connect([endpoint]).await?;
    match client.create("/fenced", Vec::new()).await {
        Ok(_) => {}
        Err(e) if e.is_node_exists() => {}
        Err(e) => return Err(e),
    }
    let mut outside = Storage::default();

    let first = client.lock("fenced-demo").await?;
    let old = first.token();
    client
        .set("/fenced", b"first".to_vec())
        .fence(&first)
        .await?;
    outside
        .write(old, "first")
        .map_err(|e| lockd_client::Error::Protocol(format!("unexpected rejection: {e}")))?;
    println!("wrote with token {old}");
    first.release().await?;

    let second = client.lock("fenced-demo").await?;
    println!("new holder has token {}", second.token());
    client
        .set("/fenced", b"second".to_vec())
        .fence(&second)
        .await?;
    let _ = outside.write(second.token(), "second");

    // A paused first holder waking up with its old token:
    match client
        .set("/fenced", b"stale".to_vec())
        .fenced("fenced-demo", old)
        .await
    {
        Err(e) if e.is_fencing_rejected() => println!("lockd rejected the old token: {e}"),
        other => println!("unexpected: {other:?}"),
    }
    if let Err(e) = outside.write(old, "stale") {
        println!("the outside resource rejected it too: {e}");
    }
    second.release().await?;
    Ok(())
}
