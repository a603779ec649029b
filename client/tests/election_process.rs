//! Leader election with real processes: the `lockctl elect` holding leadership is killed with
//! SIGKILL (and its command with it); another `lockctl elect` becomes leader within the TTL
//! and a little, with a higher fencing token, and an observer sees the change.

mod support;

use std::io::{BufRead, BufReader};
use std::path::Path;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

fn elect(addr: &str, value: &str, dir: &Path) -> Child {
    let script = format!(
        "echo $$ > {d}/{v}.pid; echo $LOCKD_FENCING_TOKEN > {d}/{v}.token.tmp; mv {d}/{v}.token.tmp {d}/{v}.token; exec sleep 60",
        d = dir.display(),
        v = value
    );
    Command::new(env!("CARGO_BIN_EXE_lockctl"))
        .args([
            "--endpoints",
            addr,
            "elect",
            "E",
            "--ttl",
            "1",
            value,
            "--",
            "sh",
            "-c",
            &script,
        ])
        .env_remove("LOCKD_ENDPOINTS")
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .expect("spawn lockctl elect")
}

/// Waits (bounded) for `dir/name` and returns its trimmed contents.
fn wait_file(dir: &Path, name: &str, limit: Duration) -> Option<String> {
    let deadline = Instant::now() + limit;
    while Instant::now() < deadline {
        if let Ok(text) = std::fs::read_to_string(dir.join(name)) {
            return Some(text.trim().to_string());
        }
        std::thread::sleep(Duration::from_millis(10));
    }
    None
}

fn kill(pid: &str, signal: &str) {
    let _ = Command::new("kill").args([signal, pid]).status();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn killing_the_leader_process_elects_another_within_the_ttl() {
    let (_dir, server) = support::server().await;
    let addr = server.endpoint();
    let work = tempfile::tempdir().expect("temp dir");
    let dir = work.path().to_path_buf();
    let result = tokio::task::spawn_blocking(move || {
        let mut observer = Command::new(env!("CARGO_BIN_EXE_lockctl"))
            .args(["--endpoints", &addr, "elect", "E", "--observe"])
            .env_remove("LOCKD_ENDPOINTS")
            .stdout(Stdio::piped())
            .stderr(Stdio::null())
            .spawn()
            .expect("spawn observer");
        let mut a = elect(&addr, "a", &dir);
        let token_a: u64 = wait_file(&dir, "a.token", Duration::from_secs(10))
            .expect("a leads")
            .parse()
            .unwrap();
        let mut b = elect(&addr, "b", &dir);
        std::thread::sleep(Duration::from_millis(300));
        assert!(!dir.join("b.token").exists(), "b must wait while a leads");

        // The leader's process dies without a word: its session expires after the TTL.
        let killed = Instant::now();
        a.kill().expect("SIGKILL lockctl a");
        a.wait().unwrap();
        if let Some(pid) = wait_file(&dir, "a.pid", Duration::from_secs(1)) {
            kill(&pid, "-KILL");
        }
        let token_b: u64 = wait_file(&dir, "b.token", Duration::from_secs(10))
            .expect("b leads")
            .parse()
            .unwrap();
        let took = killed.elapsed();
        assert!(token_b > token_a, "tokens grow: {token_a} then {token_b}");
        assert!(
            took < Duration::from_millis(1_000 + 2_000),
            "new leader after {took:?} with TTL 1 s"
        );

        // The observer printed a, then b.
        let stdout = observer.stdout.take().expect("piped");
        let mut lines = BufReader::new(stdout).lines();
        let mut seen = Vec::new();
        while !seen.iter().any(|l: &String| l.contains(" b ")) {
            match lines.next() {
                Some(Ok(line)) => seen.push(line),
                _ => break,
            }
        }
        let _ = observer.kill();
        let _ = observer.wait();
        let _ = b.kill();
        let _ = b.wait();
        if let Some(pid) = wait_file(&dir, "b.pid", Duration::from_secs(1)) {
            kill(&pid, "-KILL");
        }
        (took, seen)
    })
    .await
    .expect("join");
    let (took, seen) = result;
    let a_at = seen
        .iter()
        .position(|l| l.contains(" a "))
        .unwrap_or_else(|| panic!("observer saw a: {seen:?}"));
    let b_at = seen
        .iter()
        .position(|l| l.contains(" b "))
        .unwrap_or_else(|| panic!("observer saw b: {seen:?}"));
    assert!(a_at < b_at, "{seen:?}");
    eprintln!("new leader {took:?} after SIGKILL of the old one (TTL 1 s)");
    server.stop().await;
}
