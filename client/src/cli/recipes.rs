//! lockctl's coordination commands: `lock` and `elect` (run a command while holding a lock or
//! leadership), `elect --observe`, `watch`, `locks`, and the `--fence` option of `put`.
//!
//! A command run under a lock gets its own process group. lockctl watches the guard: when
//! the session's safe bound comes within the grace period (no keepalive answered) it sends
//! SIGTERM to the group, and SIGKILL at the bound; when the lock is lost outright, SIGKILL at
//! once. It then exits non-zero. A paused lockctl cannot kill anything: only resources that
//! check the fencing token are safe from a paused holder.

use std::process::Stdio;
use std::time::Duration;

use futures_util::StreamExt;
use lockd_protocol::{EventKind, WatchTarget};
use serde_json::{json, Value};
use tokio::time::Instant;

use super::format::data_fields;
use super::run::{seconds, Out};
use super::{ElectCmd, LockCmd, WatchCmd};
use crate::{Client, Error, LeaderElection, LockGuard, Result, Session, WatchItem};

/// Exit code when the lock was lost while the command ran.
const EXIT_LOST: u8 = 75;
/// Longest default grace between SIGTERM and SIGKILL.
const MAX_DEFAULT_GRACE: Duration = Duration::from_secs(2);

fn invalid(msg: String) -> Error {
    Error::Invalid(lockd_protocol::Error::InvalidArgument(msg))
}

/// Parses `NAME:TOKEN` (the name may itself contain colons).
pub(super) fn parse_fence(s: &str) -> Result<(String, u64)> {
    let (name, token) = s
        .rsplit_once(':')
        .ok_or_else(|| invalid(format!("--fence wants NAME:TOKEN, got {s:?}")))?;
    let token = token
        .parse()
        .map_err(|_| invalid(format!("--fence token must be a number, got {token:?}")))?;
    if name.is_empty() {
        return Err(invalid("--fence lock name is empty".into()));
    }
    Ok((name.to_string(), token))
}

/// The command: `args` without a leading `--`.
fn command_part(args: &[String]) -> &[String] {
    match args.split_first() {
        Some((first, rest)) if first == "--" => rest,
        _ => args,
    }
}

fn grace(flag: Option<f64>, ttl: Duration) -> Result<Duration> {
    match flag {
        Some(g) => seconds(g, "--grace"),
        None => Ok((ttl / 4).min(MAX_DEFAULT_GRACE)),
    }
}

/// `lockctl lock NAME -- CMD...`
pub(super) async fn lock(client: &Client, c: LockCmd) -> Result<u8> {
    let cmd = command_part(&c.cmd);
    if cmd.is_empty() {
        return Err(invalid("lock wants a command after --".into()));
    }
    let ttl = seconds(c.ttl, "--ttl")?;
    let grace = grace(c.grace, ttl)?;
    let session = client.session(ttl).await?;
    let mut builder = client.lock(c.name.clone()).session(&session);
    if let Some(t) = c.timeout {
        builder = builder.timeout(seconds(t, "--timeout")?);
    }
    if let Some(d) = c.lock_delay {
        let d =
            Duration::try_from_secs_f64(d).map_err(|_| invalid(format!("bad --lock-delay {d}")))?;
        builder = builder.lock_delay(d);
    }
    let guard = builder.await?;
    let code = run_held(&session, &guard, cmd, &[], grace).await;
    finish(session, guard, code).await
}

/// `lockctl elect NAME VALUE -- CMD...` or `lockctl elect NAME --observe`.
pub(super) async fn elect(client: &Client, out: &Out, c: ElectCmd) -> Result<u8> {
    if c.observe {
        observe(client, out, &c.name).await?;
        return Ok(0);
    }
    let Some((value, cmd)) = c.args.split_first() else {
        return Err(invalid("elect wants VALUE -- CMD, or --observe".into()));
    };
    // Once VALUE starts the greedy positional list, argh keeps everything after it, a later
    // `--` and options included: insist on `--` right after VALUE, so that an option written
    // after VALUE is an error and not a command to run.
    if cmd.first().map(String::as_str) != Some("--") {
        return Err(invalid(
            "usage: elect NAME [options] VALUE -- CMD... (options go before VALUE)".into(),
        ));
    }
    let cmd = command_part(cmd);
    if cmd.is_empty() {
        return Err(invalid("elect wants a command after --".into()));
    }
    let ttl = seconds(c.ttl, "--ttl")?;
    let grace = grace(c.grace, ttl)?;
    let session = client.session(ttl).await?;
    let leadership = LeaderElection::new(client, c.name.clone())
        .session(&session)
        .campaign(value.clone().into_bytes())
        .await?;
    let env = [("LOCKD_LEADER_VALUE", value.as_str())];
    let code = run_held(&session, leadership.guard(), cmd, &env, grace).await;
    // `resign` releases the same grant as the guard.
    let lost = leadership.is_lost() || matches!(code, Ok(RunOutcome::Lost));
    let resigned = if lost {
        Ok(())
    } else {
        leadership.resign().await
    };
    outcome(code, lost, resigned)
}

async fn finish(session: Session, guard: LockGuard, code: Result<RunOutcome>) -> Result<u8> {
    // After a loss the server may be unreachable: leave the session to expire.
    let lost = guard.is_lost() || matches!(code, Ok(RunOutcome::Lost));
    let released = if lost { Ok(()) } else { guard.release().await };
    if !lost {
        let _ = session.close().await;
    }
    outcome(code, lost, released)
}

fn outcome(code: Result<RunOutcome>, lost_after: bool, released: Result<()>) -> Result<u8> {
    match code? {
        RunOutcome::Exited(code) if !lost_after => {
            if let Err(e) = released {
                eprintln!("lockctl: releasing the lock failed: {e}");
            }
            Ok(code)
        }
        RunOutcome::Exited(_) | RunOutcome::Lost => {
            eprintln!("lockctl: the lock was lost while the command ran");
            Ok(EXIT_LOST)
        }
    }
}

enum RunOutcome {
    /// The command's exit code (128 + signal if killed by a signal).
    Exited(u8),
    /// The lock was lost; the command's group was killed.
    Lost,
}

/// Sends `signal` to the process group `pgid` with kill(1): the workspace forbids `unsafe`,
/// so `libc::killpg` is out of reach.
fn signal_group(pgid: u32, signal: &str) {
    let sent = std::process::Command::new("kill")
        .args(["-s", signal, "--", &format!("-{pgid}")])
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .status();
    match sent {
        Ok(s) if s.success() => {}
        other => tracing::debug!(pgid, signal, "kill: {other:?}"),
    }
}

fn exit_code(status: std::process::ExitStatus) -> u8 {
    use std::os::unix::process::ExitStatusExt;
    match (status.code(), status.signal()) {
        (Some(c), _) => u8::try_from(c & 0xff).unwrap_or(1),
        (None, Some(sig)) => u8::try_from((128 + sig) & 0xff).unwrap_or(1),
        (None, None) => 1,
    }
}

/// Runs `cmd` in its own process group while `guard` holds; see the module docs.
async fn run_held(
    session: &Session,
    guard: &LockGuard,
    cmd: &[String],
    env: &[(&str, &str)],
    grace: Duration,
) -> Result<RunOutcome> {
    use std::os::unix::process::CommandExt;
    let Some((program, args)) = cmd.split_first() else {
        return Err(invalid("empty command".into()));
    };
    let mut command = std::process::Command::new(program);
    command
        .args(args)
        .env("LOCKD_FENCING_TOKEN", guard.token().to_string())
        .env("LOCKD_LOCK", guard.name())
        .stdin(Stdio::inherit())
        .process_group(0);
    for (k, v) in env {
        command.env(k, v);
    }
    let mut child = command
        .spawn()
        .map_err(|e| invalid(format!("cannot run {program:?}: {e}")))?;
    let pgid = child.id();
    let mut wait = tokio::task::spawn_blocking(move || child.wait());
    let lost = guard.lost();
    tokio::pin!(lost);
    // SIGTERM sent; SIGKILL due at this instant.
    let mut kill_at: Option<Instant> = None;
    let mut was_lost = false;
    // Stopped by lockctl before the safe bound: counts as lost.
    let mut stopped = false;
    loop {
        let bound = session.safe_until();
        let next_check = match (kill_at, bound) {
            (Some(k), _) => k,
            (None, Some(b)) => b.checked_sub(grace).unwrap_or(b),
            (None, None) => Instant::now(),
        };
        tokio::select! {
            status = &mut wait => {
                let status = status
                    .map_err(|e| invalid(format!("waiting for the command failed: {e}")))?
                    .map_err(|e| invalid(format!("waiting for the command failed: {e}")))?;
                return Ok(if was_lost || stopped {
                    RunOutcome::Lost
                } else {
                    RunOutcome::Exited(exit_code(status))
                });
            }
            _ = &mut lost, if !was_lost => {
                // Lost outright (revoked, expired or past the bound): stop everything now.
                was_lost = true;
                signal_group(pgid, "KILL");
                kill_at = Some(Instant::now() + Duration::from_secs(3600));
            }
            _ = tokio::signal::ctrl_c() => {
                signal_group(pgid, "TERM");
            }
            _ = tokio::time::sleep_until(next_check) => {
                let now = Instant::now();
                match kill_at {
                    Some(k) if now >= k && !was_lost => {
                        signal_group(pgid, "KILL");
                        was_lost = true;
                    }
                    Some(_) => {}
                    None => {
                        // The bound may have moved with an answered keepalive.
                        let bound = session.safe_until();
                        if bound.is_none_or(|b| b.checked_sub(grace).is_none_or(|t| now >= t)) {
                            eprintln!("lockctl: no keepalive answered; stopping the command before the safe bound");
                            signal_group(pgid, "TERM");
                            kill_at = Some(bound.unwrap_or(now));
                            stopped = true;
                        }
                    }
                }
            }
        }
    }
}

async fn observe(client: &Client, out: &Out, name: &str) -> Result<()> {
    let mut changes = LeaderElection::new(client, name).observe();
    while let Some(change) = changes.next().await {
        let leader = change?;
        if out.json {
            let v = match &leader {
                Some(l) => {
                    let mut obj = serde_json::Map::new();
                    obj.insert("election".into(), json!(name));
                    obj.insert("token".into(), json!(l.token));
                    obj.insert("session".into(), json!(l.session.to_string()));
                    data_fields(&l.value, &mut obj);
                    Value::Object(obj)
                }
                None => json!({"election": name, "leader": null}),
            };
            out.json(v);
        } else {
            match &leader {
                Some(l) => out.line(&format!(
                    "leader {} token {} session {}",
                    String::from_utf8_lossy(&l.value),
                    l.token,
                    l.session
                )),
                None => out.line("no leader"),
            }
        }
    }
    Ok(())
}

/// `lockctl watch PATH ...`
pub(super) async fn watch(client: &Client, out: &Out, c: WatchCmd) -> Result<()> {
    let target = match (c.recursive, c.children) {
        (true, true) => {
            return Err(invalid(
                "--recursive and --children exclude each other".into(),
            ))
        }
        (true, false) => WatchTarget::Prefix(c.path),
        (false, true) => WatchTarget::Children(c.path),
        (false, false) => WatchTarget::Node(c.path),
    };
    let mut builder = client.watch(target);
    if let Some(rev) = c.from {
        builder = builder.from(rev);
    }
    if c.data {
        builder = builder.with_data();
    }
    let mut stream = builder.await?;
    loop {
        let item = tokio::select! {
            item = stream.next() => item,
            _ = tokio::signal::ctrl_c() => return Ok(()),
        };
        let Some(item) = item else { return Ok(()) };
        let WatchItem::Revision { events, .. } = item? else {
            continue;
        };
        for event in events {
            if out.json {
                out.json(event_json(event.revision, &event.kind));
            } else {
                out.line(&event_text(event.revision, &event.kind));
            }
        }
    }
}

fn event_json(revision: u64, kind: &EventKind) -> Value {
    let mut obj = serde_json::Map::new();
    obj.insert("revision".into(), json!(revision));
    match kind {
        EventKind::Created { path, stat, data } | EventKind::Changed { path, stat, data } => {
            let t = if matches!(kind, EventKind::Created { .. }) {
                "created"
            } else {
                "changed"
            };
            obj.insert("type".into(), json!(t));
            obj.insert("path".into(), json!(path));
            obj.insert("version".into(), json!(stat.version));
            if let Some(d) = data {
                data_fields(d, &mut obj);
            }
        }
        EventKind::Deleted { path } => {
            obj.insert("type".into(), json!("deleted"));
            obj.insert("path".into(), json!(path));
        }
        other => {
            obj.insert("type".into(), json!("other"));
            obj.insert("event".into(), json!(format!("{other:?}")));
        }
    }
    Value::Object(obj)
}

fn event_text(revision: u64, kind: &EventKind) -> String {
    match kind {
        EventKind::Created { path, stat, data } | EventKind::Changed { path, stat, data } => {
            let t = if matches!(kind, EventKind::Created { .. }) {
                "created"
            } else {
                "changed"
            };
            let data = data
                .as_ref()
                .map(|d| format!(" {}", String::from_utf8_lossy(d)))
                .unwrap_or_default();
            format!("{revision} {t} {path} version {}{data}", stat.version)
        }
        EventKind::Deleted { path } => format!("{revision} deleted {path}"),
        other => format!("{revision} {other:?}"),
    }
}

/// `lockctl locks`
pub(super) async fn locks(client: &Client, out: &Out) -> Result<()> {
    for l in client.locks().await? {
        if out.json {
            let holder = l.holder.as_ref().map(|h| {
                let mut obj = serde_json::Map::new();
                obj.insert("token".into(), json!(h.token));
                obj.insert("session".into(), json!(h.session.to_string()));
                obj.insert("acquire_id".into(), json!(h.acquire_id));
                data_fields(&h.value, &mut obj);
                Value::Object(obj)
            });
            let waiters: Vec<Value> = l
                .waiters
                .iter()
                .map(|w| json!({"acquire_id": w.acquire_id, "session": w.session.to_string()}))
                .collect();
            out.json(json!({
                "name": l.name,
                "holder": holder,
                "waiters": waiters,
                "lock_delay_ms": l.lock_delay_ms,
                "delayed_until_ms": l.delayed_until_ms,
            }));
        } else {
            let holder = match &l.holder {
                Some(h) => format!("held token {} session {}", h.token, h.session),
                None if l.delayed_until_ms.is_some() => "free (in lock-delay)".to_string(),
                None => "free".to_string(),
            };
            out.line(&format!(
                "{} {holder} waiters {} lock-delay {} ms",
                l.name,
                l.waiters.len(),
                l.lock_delay_ms
            ));
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn fences_parse_name_and_token() {
        assert_eq!(parse_fence("db:42").expect("ok"), ("db".to_string(), 42));
        assert_eq!(parse_fence("a:b:7").expect("ok"), ("a:b".to_string(), 7));
        assert!(parse_fence("db").is_err());
        assert!(parse_fence("db:x").is_err());
        assert!(parse_fence(":3").is_err());
    }

    #[test]
    fn grace_defaults_to_a_quarter_of_the_ttl_capped() {
        assert_eq!(
            grace(None, Duration::from_secs(4)).expect("ok"),
            Duration::from_secs(1)
        );
        assert_eq!(
            grace(None, Duration::from_secs(60)).expect("ok"),
            MAX_DEFAULT_GRACE
        );
        assert!(grace(Some(-1.0), Duration::from_secs(4)).is_err());
    }
}
