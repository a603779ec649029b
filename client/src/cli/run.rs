//! Executes a parsed lockctl command against the cluster and prints its results.

use std::io::{IsTerminal, Write};
use std::time::Duration;

use serde_json::{json, Value};

use super::format::{
    cluster_json, cluster_text, data_fields, grant_json, grant_text, stat_json, stat_text,
};
use super::{ClusterCommand, Command, Lockctl};
use crate::{Client, ClientConfig, Error, Result, SessionStatus};

/// How many times `put` alternates set and create when racing other writers.
const PUT_ROUNDS: usize = 3;

/// Runs `args`: connects to the endpoints (flag, else `LOCKD_ENDPOINTS`, else the default)
/// and executes the subcommand, printing results to stdout.
///
/// ```no_run
/// # async fn demo() -> Result<(), lockd_client::Error> {
/// use argh::FromArgs;
/// let args = lockd_client::cli::Lockctl::from_args(&["lockctl"], &["ls", "/"])
///     .expect("valid arguments");
/// lockd_client::cli::run(args).await?;
/// # Ok(()) }
/// ```
pub async fn run(args: Lockctl) -> Result<()> {
    run_code(args).await.map(drop)
}

/// Like [`run`], answering the process exit code on success: 0, or for `lock` and `elect`
/// with a command, the command's own status (non-zero if the lock was lost).
///
/// ```no_run
/// # async fn demo() -> Result<(), lockd_client::Error> {
/// use argh::FromArgs;
/// let args = lockd_client::cli::Lockctl::from_args(&["lockctl"], &["lock", "db", "--", "true"])
///     .expect("valid arguments");
/// let code = lockd_client::cli::run_code(args).await?;
/// # Ok(()) }
/// ```
pub async fn run_code(args: Lockctl) -> Result<u8> {
    let endpoints = super::endpoints(
        args.endpoints.as_deref(),
        std::env::var("LOCKD_ENDPOINTS").ok(),
    );
    let timeout = seconds(args.timeout, "--timeout")?;
    if let Some(path) = command_path(&args.command) {
        crate::error::check_path(path)?;
    }
    // Reject bad TTLs before connecting, like paths (not only once a server answered).
    match &args.command {
        Command::Create(c) if c.ephemeral => {
            seconds(c.ttl, "--ttl")?;
        }
        Command::Session(c) => {
            seconds(c.ttl, "--ttl")?;
        }
        Command::Lock(c) => {
            seconds(c.ttl, "--ttl")?;
        }
        Command::Elect(c) => {
            seconds(c.ttl, "--ttl")?;
        }
        _ => {}
    }
    let config = ClientConfig::new(endpoints)
        .client_name(format!("lockctl/{}", env!("CARGO_PKG_VERSION")))
        .request_timeout(timeout)
        .connect_timeout(timeout.min(Duration::from_secs(2)));
    let client = Client::with_config(config).await?;
    let out = Out { json: args.json };
    match args.command {
        Command::Get(c) => {
            let get = client.get(&c.path);
            let got = if c.stale {
                get.stale().await?
            } else {
                get.await?
            };
            if out.json {
                let mut obj = serde_json::Map::new();
                obj.insert("path".into(), json!(c.path));
                data_fields(&got.data, &mut obj);
                obj.insert("stat".into(), stat_json(&got.stat));
                obj.insert("revision".into(), json!(got.revision));
                out.json(Value::Object(obj));
            } else {
                out.raw(&got.data);
            }
        }
        Command::Put(c) => {
            let fence = c
                .fence
                .as_deref()
                .map(super::recipes::parse_fence)
                .transpose()?;
            put(
                &client,
                &out,
                &c.path,
                c.data.into_bytes(),
                c.if_version,
                fence,
            )
            .await?
        }
        Command::Lock(c) => return super::recipes::lock(&client, c).await,
        Command::Elect(c) => return super::recipes::elect(&client, &out, c).await,
        Command::Watch(c) => super::recipes::watch(&client, &out, c).await?,
        Command::Locks(_) => super::recipes::locks(&client, &out).await?,
        Command::Create(c) => {
            let data = c.data.unwrap_or_default().into_bytes();
            if c.ephemeral {
                let ttl = seconds(c.ttl, "--ttl")?;
                let session = client.session(ttl).await?;
                let mut b = session.create(&c.path, data).ephemeral();
                if c.sequential {
                    b = b.sequential();
                }
                let created = b.await?;
                let grant = session.grant();
                if out.json {
                    out.json(json!({
                        "path": created.path,
                        "stat": stat_json(&created.stat),
                        "revision": created.revision,
                        "ephemeral": true,
                        "session": grant_json(&grant),
                    }));
                } else {
                    out.line(&created.path);
                    out.line(&format!(
                        "ephemeral under {}; deleted when the session expires (not closed on exit)",
                        grant_text(&grant)
                    ));
                }
                // Deliberately not closed: the session lapses after its TTL.
            } else {
                let mut b = client.create(&c.path, data);
                if c.sequential {
                    b = b.sequential();
                }
                let created = b.await?;
                if out.json {
                    out.json(json!({
                        "path": created.path,
                        "stat": stat_json(&created.stat),
                        "revision": created.revision,
                        "ephemeral": false,
                    }));
                } else {
                    out.line(&created.path);
                }
            }
        }
        Command::Delete(c) => {
            let mut b = client.delete(&c.path);
            if let Some(v) = c.if_version {
                b = b.if_version(v);
            }
            let deleted = b.await?;
            if out.json {
                out.json(json!({"path": c.path, "deleted": true, "revision": deleted.revision}));
            } else {
                out.line(&format!(
                    "deleted {} (revision {})",
                    c.path, deleted.revision
                ));
            }
        }
        Command::Ls(c) => {
            let b = client.children(&c.path);
            let listed = if c.stale { b.stale().await? } else { b.await? };
            if out.json {
                out.json(
                    json!({"path": c.path, "children": listed.names, "revision": listed.revision}),
                );
            } else {
                for name in &listed.names {
                    out.line(name);
                }
            }
        }
        Command::Stat(c) => {
            let b = client.stat(&c.path);
            let got = if c.stale { b.stale().await? } else { b.await? };
            let Some(stat) = got.stat else {
                return Err(Error::Server(lockd_protocol::Error::NoNode {
                    path: c.path,
                }));
            };
            if out.json {
                out.json(
                    json!({"path": c.path, "stat": stat_json(&stat), "revision": got.revision}),
                );
            } else {
                out.line(&stat_text(&c.path, &stat, got.revision));
            }
        }
        Command::Session(c) => session(&client, &out, seconds(c.ttl, "--ttl")?).await?,
        Command::Cluster(c) => match c.command {
            ClusterCommand::Status(_) => {
                let s = client.cluster_status().await?;
                print_cluster(&out, &s.status, s.revision);
            }
            ClusterCommand::Add(a) => {
                let change = lockd_protocol::MemberChange::AddLearner {
                    id: a.id,
                    peer_addr: a.peer_addr.clone(),
                    client_addr: a.client_addr.clone(),
                };
                let s = client.change_members(change).await?;
                print_cluster(&out, &s.status, s.revision);
            }
            ClusterCommand::Promote(p) => {
                let change = lockd_protocol::MemberChange::Promote { id: p.id };
                let s = client.change_members(change).await?;
                print_cluster(&out, &s.status, s.revision);
            }
            ClusterCommand::Remove(r) => {
                let change = lockd_protocol::MemberChange::Remove { id: r.id };
                let s = client.change_members(change).await?;
                print_cluster(&out, &s.status, s.revision);
            }
            ClusterCommand::TransferLeader(t) => {
                let s = client.transfer_leader(t.id).await?;
                print_cluster(&out, &s.status, s.revision);
            }
        },
    }
    Ok(0)
}

fn print_cluster(out: &Out, status: &lockd_protocol::ClusterStatus, revision: u64) {
    if out.json {
        out.json(cluster_json(status, revision));
    } else {
        out.line(&cluster_text(status, revision));
    }
}

/// The node path a command names, checked before connecting.
fn command_path(c: &Command) -> Option<&str> {
    match c {
        Command::Get(c) => Some(&c.path),
        Command::Put(c) => Some(&c.path),
        Command::Create(c) => Some(&c.path),
        Command::Delete(c) => Some(&c.path),
        Command::Ls(c) => Some(&c.path),
        Command::Stat(c) => Some(&c.path),
        Command::Watch(c) => Some(&c.path),
        Command::Session(_)
        | Command::Cluster(_)
        | Command::Lock(_)
        | Command::Elect(_)
        | Command::Locks(_) => None,
    }
}

pub(super) fn seconds(s: f64, flag: &str) -> Result<Duration> {
    Duration::try_from_secs_f64(s)
        .ok()
        .filter(|d| !d.is_zero())
        .ok_or_else(|| {
            Error::Invalid(lockd_protocol::Error::InvalidArgument(format!(
                "{flag} must be a positive number of seconds, got {s}"
            )))
        })
}

/// Set if the node exists, else create it; alternates a few times when racing others.
async fn put(
    client: &Client,
    out: &Out,
    path: &str,
    data: Vec<u8>,
    if_version: Option<u64>,
    fence: Option<(String, u64)>,
) -> Result<()> {
    let mut last = None;
    for _ in 0..PUT_ROUNDS {
        let mut set = client.set(path, data.clone());
        if let Some(v) = if_version {
            set = set.if_version(v);
        }
        if let Some((lock, token)) = &fence {
            set = set.fenced(lock.clone(), *token);
        }
        match set.await {
            Ok(r) => {
                if out.json {
                    out.json(json!({"path": path, "action": "set", "stat": stat_json(&r.stat), "revision": r.revision}));
                } else {
                    out.line(&format!(
                        "set {path} version {} (revision {})",
                        r.stat.version, r.revision
                    ));
                }
                return Ok(());
            }
            Err(e) if e.is_no_node() && if_version.is_none() => {}
            Err(e) => return Err(e),
        }
        let mut create = client.create(path, data.clone());
        if let Some((lock, token)) = &fence {
            create = create.fenced(lock.clone(), *token);
        }
        match create.await {
            Ok(c) => {
                if out.json {
                    out.json(json!({"path": c.path, "action": "created", "stat": stat_json(&c.stat), "revision": c.revision}));
                } else {
                    out.line(&format!("created {} (revision {})", c.path, c.revision));
                }
                return Ok(());
            }
            // Someone created it meanwhile: set again.
            Err(e) if e.is_node_exists() => last = Some(e),
            Err(e) => return Err(e),
        }
    }
    Err(last.unwrap_or_else(|| Error::Protocol("put gave up".into())))
}

/// Keeps a session alive until Ctrl-C (then closes it) or expiry (an error).
async fn session(client: &Client, out: &Out, ttl: Duration) -> Result<()> {
    let session = client.session(ttl).await?;
    let grant = session.grant();
    if out.json {
        let mut obj = grant_json(&grant);
        obj["status"] = json!(status_name(session.status()));
        out.json(obj);
    } else {
        out.line(&grant_text(&grant));
        out.line(&format!("status {}", status_name(session.status())));
    }
    let mut status = session.watch_status();
    loop {
        tokio::select! {
            r = tokio::signal::ctrl_c() => {
                if let Err(e) = r {
                    tracing::warn!("cannot listen for Ctrl-C: {e}");
                }
                session.close().await?;
                if out.json {
                    out.json(json!({"session": grant.session.to_string(), "status": "closed"}));
                } else {
                    out.line(&format!("session {} closed", grant.session));
                }
                return Ok(());
            }
            changed = status.changed() => {
                if changed.is_err() {
                    return Err(Error::SessionExpired(grant.session));
                }
                let now = *status.borrow_and_update();
                if out.json {
                    out.json(json!({"session": grant.session.to_string(), "status": status_name(now)}));
                } else {
                    out.line(&format!("status {}", status_name(now)));
                }
                if now == SessionStatus::Expired {
                    return Err(Error::SessionExpired(grant.session));
                }
            }
        }
    }
}

fn status_name(s: SessionStatus) -> &'static str {
    match s {
        SessionStatus::Connected => "connected",
        SessionStatus::Jeopardy => "jeopardy",
        SessionStatus::Safe => "safe",
        SessionStatus::Expired => "expired",
    }
}

/// Where results go.
pub(super) struct Out {
    pub(super) json: bool,
}

impl Out {
    pub(super) fn line(&self, s: &str) {
        let mut stdout = std::io::stdout().lock();
        let _ = writeln!(stdout, "{s}");
    }

    pub(super) fn json(&self, v: Value) {
        self.line(&v.to_string());
    }

    /// Raw bytes; a newline is added only for a terminal, so pipes get the exact data.
    fn raw(&self, data: &[u8]) {
        let mut stdout = std::io::stdout().lock();
        let _ = stdout.write_all(data);
        if std::io::stdout().is_terminal() && !data.ends_with(b"\n") {
            let _ = stdout.write_all(b"\n");
        }
        let _ = stdout.flush();
    }
}
