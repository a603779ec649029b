//! The real `lockctl` binary against a lockd server started in this process. The child
//! runs on a blocking thread so the (multi-thread) runtime keeps serving meanwhile.

mod support;

use std::process::{Command, Output};
use std::time::{Duration, Instant};

use serde_json::Value;
use support::{client, eventually, server};
use tokio::net::TcpListener;

/// Runs lockctl with `args` (and `env` added), bounded by the child's own `--timeout`;
/// LOCKD_ENDPOINTS and RUST_LOG from the test's environment are not passed on.
async fn lockctl_env(args: &[&str], env: &[(&str, &str)]) -> Output {
    let mut cmd = Command::new(env!("CARGO_BIN_EXE_lockctl"));
    cmd.args(args)
        .env_remove("LOCKD_ENDPOINTS")
        .env_remove("RUST_LOG");
    for (k, v) in env {
        cmd.env(k, v);
    }
    tokio::task::spawn_blocking(move || cmd.output().expect("run lockctl"))
        .await
        .expect("join")
}

/// `lockctl --endpoints <addr> --timeout 5 <args>`.
async fn lockctl(addr: &str, args: &[&str]) -> Output {
    let mut all = vec!["--endpoints", addr, "--timeout", "5"];
    all.extend_from_slice(args);
    lockctl_env(&all, &[]).await
}

fn stdout(o: &Output) -> String {
    String::from_utf8(o.stdout.clone()).expect("utf-8 stdout")
}

fn stderr(o: &Output) -> String {
    String::from_utf8(o.stderr.clone()).expect("utf-8 stderr")
}

/// Asserts success and returns stdout.
fn ok(o: &Output) -> String {
    assert!(
        o.status.success(),
        "lockctl failed ({:?}): {}",
        o.status,
        stderr(o)
    );
    stdout(o)
}

/// Asserts exit code 1 with exactly one `lockctl: ...` line on stderr, and returns it.
fn failed(o: &Output) -> String {
    assert_eq!(
        o.status.code(),
        Some(1),
        "stdout {:?} stderr {:?}",
        stdout(o),
        stderr(o)
    );
    let err = stderr(o);
    let lines: Vec<&str> = err.lines().collect();
    assert_eq!(lines.len(), 1, "one line on stderr: {err:?}");
    assert!(lines[0].starts_with("lockctl: "), "{err:?}");
    assert!(o.stdout.is_empty(), "nothing on stdout: {:?}", stdout(o));
    lines[0].to_string()
}

fn json(o: &Output) -> Value {
    serde_json::from_str(ok(o).trim()).expect("one JSON object")
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn put_get_stat_ls_delete() {
    let (_dir, srv) = server().await;
    let addr = srv.endpoint();
    let c = client(&srv).await;

    // put creates, then sets.
    let out = ok(&lockctl(&addr, &["put", "/config", r#"{"db":"primary"}"#]).await);
    assert!(out.starts_with("created /config (revision "), "{out}");
    let out = ok(&lockctl(&addr, &["put", "/config", "second"]).await);
    assert!(out.starts_with("set /config version 1 (revision "), "{out}");
    let got = c.get("/config").await.expect("get");
    assert_eq!((got.data.as_slice(), got.stat.version), (&b"second"[..], 1));

    // get prints the raw data, nothing added on a pipe.
    assert_eq!(ok(&lockctl(&addr, &["get", "/config"]).await), "second");
    let j = json(&lockctl(&addr, &["--json", "get", "/config"]).await);
    assert_eq!(j["path"], "/config");
    assert_eq!(j["data"], "second");
    assert_eq!(j["stat"]["version"], 1);
    let revision = j["revision"].as_u64().expect("revision");
    assert!(revision >= got.stat.mod_rev, "{j}");
    assert_eq!(j["stat"]["mod_rev"], got.stat.mod_rev);

    // compare-and-set through put --if-version.
    let out = ok(&lockctl(&addr, &["put", "/config", "third", "--if-version", "1"]).await);
    assert!(out.starts_with("set /config version 2"), "{out}");
    let line = failed(&lockctl(&addr, &["put", "/config", "lost", "--if-version", "1"]).await);
    assert!(line.contains("version mismatch"), "{line}");
    assert_eq!(c.get("/config").await.expect("get").data, b"third");
    // --if-version never creates.
    let line = failed(&lockctl(&addr, &["put", "/absent", "x", "--if-version", "0"]).await);
    assert!(line.contains("no node /absent"), "{line}");
    assert!(!c.exists("/absent").await.expect("exists"));

    // stat, text and JSON.
    let out = ok(&lockctl(&addr, &["stat", "/config"]).await);
    assert!(out.contains("path              /config\n"), "{out}");
    assert!(out.contains("version           2\n"), "{out}");
    assert!(out.contains("data_len          5\n"), "{out}");
    let j = json(&lockctl(&addr, &["--json", "stat", "/config"]).await);
    assert_eq!(j["stat"]["version"], 2);
    assert_eq!(j["stat"]["ephemeral_owner"], Value::Null);

    // create and ls.
    assert_eq!(
        ok(&lockctl(&addr, &["create", "/config/b", "second"]).await),
        "/config/b\n"
    );
    assert_eq!(
        ok(&lockctl(&addr, &["create", "/config/a", "first"]).await),
        "/config/a\n"
    );
    assert_eq!(ok(&lockctl(&addr, &["ls", "/config"]).await), "a\nb\n");
    let j = json(&lockctl(&addr, &["--json", "ls", "/config"]).await);
    assert_eq!(j["children"], serde_json::json!(["a", "b"]));
    let line = failed(&lockctl(&addr, &["create", "/config/a"]).await);
    assert!(line.contains("already exists"), "{line}");

    // delete: refused with children, at a wrong version; then done.
    let line = failed(&lockctl(&addr, &["delete", "/config"]).await);
    assert!(line.contains("has children"), "{line}");
    let line = failed(&lockctl(&addr, &["delete", "/config/a", "--if-version", "3"]).await);
    assert!(line.contains("version mismatch"), "{line}");
    let out = ok(&lockctl(&addr, &["delete", "/config/a"]).await);
    assert!(out.starts_with("deleted /config/a (revision "), "{out}");
    assert!(!c.exists("/config/a").await.expect("exists"));
    assert_eq!(ok(&lockctl(&addr, &["ls", "/config"]).await), "b\n");

    // Missing nodes.
    let line = failed(&lockctl(&addr, &["get", "/config/a"]).await);
    assert_eq!(line, "lockctl: no node /config/a");
    failed(&lockctl(&addr, &["stat", "/config/a"]).await);
    failed(&lockctl(&addr, &["ls", "/nowhere"]).await);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sequential_and_ephemeral_creates() {
    let (_dir, srv) = server().await;
    let addr = srv.endpoint();
    let c = client(&srv).await;
    ok(&lockctl(&addr, &["create", "/jobs"]).await);
    assert_eq!(
        ok(&lockctl(&addr, &["create", "/jobs/job-", "--sequential"]).await),
        "/jobs/job-0000000000\n"
    );
    let j = json(
        &lockctl(
            &addr,
            &["--json", "create", "/jobs/job-", "p", "--sequential"],
        )
        .await,
    );
    assert_eq!(j["path"], "/jobs/job-0000000001");
    assert_eq!(j["ephemeral"], false);
    assert_eq!(c.get("/jobs/job-0000000001").await.expect("get").data, b"p");

    // An ephemeral node outlives lockctl until its session's TTL lapses. 0.5 s rather than
    // 0.2 s: the node must still be there when checked after the process exits, on a
    // loaded machine too.
    let out = ok(&lockctl(
        &addr,
        &["create", "/jobs/w", "busy", "--ephemeral", "--ttl", "0.5"],
    )
    .await);
    let exited = Instant::now();
    let mut lines = out.lines();
    assert_eq!(lines.next(), Some("/jobs/w"));
    let info = lines.next().expect("session line");
    assert!(info.contains("ttl 500ms"), "{info}");
    let stat = c.stat("/jobs/w").await.expect("stat").stat;
    let stat = stat.expect("exists right after lockctl exits");
    assert!(stat.ephemeral_owner.is_some());
    let gone = eventually(Duration::from_secs(3), || async {
        !c.exists("/jobs/w").await.expect("exists")
    })
    .await;
    assert!(gone, "the unclosed session lapsed and took the node");
    assert!(
        exited.elapsed() >= Duration::from_millis(250),
        "lapsed after about the TTL, not at exit: {:?}",
        exited.elapsed()
    );

    // The same with --json and a sequential name.
    let j = json(
        &lockctl(
            &addr,
            &[
                "--json",
                "create",
                "/jobs/e-",
                "--ephemeral",
                "--sequential",
                "--ttl",
                "0.5",
            ],
        )
        .await,
    );
    assert_eq!(j["path"], "/jobs/e-0000000002");
    assert_eq!(j["ephemeral"], true);
    assert_eq!(j["session"]["ttl_ms"], 500);
    assert_eq!(
        j["stat"]["ephemeral_owner"], j["session"]["session"],
        "owned by the session it reports"
    );
    let gone = eventually(Duration::from_secs(3), || async {
        !c.exists("/jobs/e-0000000002").await.expect("exists")
    })
    .await;
    assert!(gone);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn cluster_status_and_endpoints_from_the_environment() {
    let (_dir, srv) = server().await;
    let addr = srv.endpoint();
    let out = ok(&lockctl(&addr, &["cluster", "status"]).await);
    assert!(out.contains("leader    "), "{out}");
    assert!(out.contains(&format!("{addr} (leader)")), "{out}");
    let j = json(&lockctl(&addr, &["--json", "cluster", "status"]).await);
    let node = j["node_id"].as_u64().expect("node_id");
    assert_eq!(j["leader"].as_u64(), Some(node));
    assert!(j["revision"].is_u64(), "{j}");
    assert!(
        j["applied_index"].as_u64() <= j["commit_index"].as_u64(),
        "{j}"
    );
    let members = j["members"].as_array().expect("members");
    assert_eq!(members.len(), 1);
    assert_eq!(members[0]["client_addr"], addr.as_str());
    assert_eq!(members[0]["leader"], true);

    // LOCKD_ENDPOINTS names the server when --endpoints is absent (empty items ignored)...
    let o = lockctl_env(
        &["--timeout", "5", "put", "/env", "from-env"],
        &[("LOCKD_ENDPOINTS", &format!(" ,{addr}"))],
    )
    .await;
    ok(&o);
    let c = client(&srv).await;
    assert_eq!(c.get("/env").await.expect("get").data, b"from-env");
    // ...and --endpoints wins over it.
    let o = lockctl_env(
        &["--endpoints", &addr, "--timeout", "1", "get", "/env"],
        &[("LOCKD_ENDPOINTS", "127.0.0.1:1")],
    )
    .await;
    assert_eq!(ok(&o), "from-env");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn failures_exit_non_zero_with_one_line() {
    // A port nothing listens on (bound, then released)...
    let refused = {
        let l = TcpListener::bind("127.0.0.1:0").await.expect("bind");
        l.local_addr().expect("addr").to_string()
    };
    // ...and one that accepts connections but never answers the handshake.
    let silent = TcpListener::bind("127.0.0.1:0").await.expect("bind");
    let silent_addr = silent.local_addr().expect("addr").to_string();

    for addr in [&refused, &silent_addr] {
        let started = Instant::now();
        let o = lockctl_env(&["--endpoints", addr, "--timeout", "1", "get", "/a"], &[]).await;
        let took = started.elapsed();
        let line = failed(&o);
        assert!(
            line.contains("could not connect") || line.contains("timed out"),
            "{addr}: {line}"
        );
        assert!(
            took < Duration::from_secs(4),
            "{addr}: gave up after {took:?}"
        );
    }

    // Invalid paths are refused before connecting: the endpoint is never tried.
    for bad in ["relative", "/a/", "/a//b"] {
        let o = lockctl_env(
            &["--endpoints", &refused, "--timeout", "1", "get", bad],
            &[],
        )
        .await;
        let line = failed(&o);
        assert!(line.starts_with("lockctl: invalid path"), "{line}");
    }
    // Usage errors exit 2.
    let o = lockctl_env(&["--endpoints", &refused, "get"], &[]).await;
    assert_eq!(o.status.code(), Some(2), "{}", stderr(&o));
    let o = lockctl_env(
        &[
            "--endpoints",
            &refused,
            "put",
            "/a",
            "v",
            "--if-version",
            "x",
        ],
        &[],
    )
    .await;
    assert_eq!(o.status.code(), Some(2), "{}", stderr(&o));
    // A non-positive --ttl is an argument error, found before connecting.
    let o = lockctl_env(
        &[
            "--endpoints",
            &refused,
            "create",
            "/e",
            "--ephemeral",
            "--ttl",
            "0",
        ],
        &[],
    )
    .await;
    let line = failed(&o);
    assert!(line.contains("--ttl must be a positive number"), "{line}");
    let o = lockctl_env(&["--endpoints", &refused, "session", "--ttl", "-1"], &[]).await;
    let line = failed(&o);
    assert!(line.contains("--ttl must be a positive number"), "{line}");
    drop(silent);
}
