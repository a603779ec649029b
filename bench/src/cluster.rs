//! Endpoints of a cluster (spreading clients over them, finding the leader for workloads that
//! bypass the client library) and CPU time of server processes from /proc.

use std::collections::BTreeMap;
use std::time::{Duration, Instant};

use lockd_client::{Client, ClientConfig};

use crate::watch::BenchError;

/// Parses `--addr`: one or more comma-separated client addresses.
pub fn parse_endpoints(addr: &str) -> Result<Vec<String>, BenchError> {
    let endpoints: Vec<String> = addr
        .split(',')
        .map(str::trim)
        .filter(|a| !a.is_empty())
        .map(String::from)
        .collect();
    if endpoints.is_empty() {
        return Err("--addr names no endpoint".into());
    }
    Ok(endpoints)
}

/// The endpoint list for client number `c`: rotated so that it starts at endpoint `c mod n`
/// (the client dials its own endpoint first; the others are its fail-over list).
pub fn endpoints_for(endpoints: &[String], c: usize) -> Vec<String> {
    let n = endpoints.len();
    (0..n).map(|k| endpoints[(c + k) % n].clone()).collect()
}

/// The leader's client address, from `cluster status` as one of the endpoints sees it
/// (retried for a few seconds while no leader is known).
pub async fn leader_addr(endpoints: &[String]) -> Result<String, BenchError> {
    let client = Client::with_config(ClientConfig::new(endpoints.iter().cloned())).await?;
    let deadline = Instant::now() + Duration::from_secs(5);
    loop {
        let status = client.cluster_status().await?.status;
        if let Some(leader) = status.leader {
            if let Some(m) = status.members.iter().find(|m| m.id == leader) {
                return Ok(m.client_addr.clone());
            }
            if status.members.is_empty() && leader == status.node_id {
                // A single node that lists no members answers for itself.
                return Ok(endpoints[0].clone());
            }
        }
        if Instant::now() >= deadline {
            return Err(format!("no leader known (status {status:?})").into());
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

/// "127.0.0.1:7001=5 127.0.0.1:7002=6": how many connections ended up on each address.
pub fn tally<'a>(addrs: impl IntoIterator<Item = Option<&'a str>>) -> String {
    let mut counts: BTreeMap<&str, usize> = BTreeMap::new();
    for a in addrs {
        *counts.entry(a.unwrap_or("none")).or_default() += 1;
    }
    counts
        .iter()
        .map(|(a, n)| format!("{a}={n}"))
        .collect::<Vec<_>>()
        .join(" ")
}

/// Parses `--server-pid`: comma-separated pids.
pub fn parse_pids(pids: &str) -> Result<Vec<u32>, BenchError> {
    pids.split(',')
        .map(str::trim)
        .filter(|p| !p.is_empty())
        .map(|p| {
            p.parse()
                .map_err(|_| BenchError::from(format!("bad pid {p:?}")))
        })
        .collect()
}

/// utime + stime of a process, in clock ticks (fields 14 and 15 of /proc/PID/stat).
fn cpu_ticks(pid: &str) -> Result<u64, BenchError> {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat"))
        .map_err(|e| format!("/proc/{pid}/stat: {e}"))?;
    // The command name (field 2) is in parentheses and may contain spaces.
    let rest = stat
        .rsplit_once(')')
        .map(|(_, r)| r)
        .ok_or("malformed stat")?;
    let fields: Vec<&str> = rest.split_whitespace().collect();
    // `rest` starts at field 3 (state): utime is field 14, stime field 15.
    let field = |i: usize| -> Result<u64, BenchError> {
        fields
            .get(i - 3)
            .and_then(|v| v.parse().ok())
            .ok_or_else(|| format!("/proc/{pid}/stat: no field {i}").into())
    };
    Ok(field(14)? + field(15)?)
}

/// Clock ticks per second (`getconf CLK_TCK`; 100 if that fails).
fn ticks_per_second() -> u64 {
    std::process::Command::new("getconf")
        .arg("CLK_TCK")
        .output()
        .ok()
        .and_then(|o| String::from_utf8(o.stdout).ok())
        .and_then(|s| s.trim().parse().ok())
        .filter(|&t| t > 0)
        .unwrap_or(100)
}

/// CPU time of a set of processes between two readings.
#[derive(Debug)]
pub struct CpuMeter {
    pids: Vec<String>,
    ticks_per_second: u64,
    start_ticks: Vec<u64>,
    start: Instant,
}

/// CPU used over a window.
#[derive(Debug)]
pub struct CpuUsage {
    /// Each process's CPU seconds, in the order given.
    pub per_process: Vec<f64>,
    /// Wall-clock seconds of the window.
    pub wall: f64,
}

impl CpuUsage {
    pub fn total_seconds(&self) -> f64 {
        self.per_process.iter().sum()
    }

    /// Total CPU as a percentage of one core.
    pub fn percent_of_core(&self) -> f64 {
        100.0 * self.total_seconds() / self.wall
    }

    /// "12.3% of one core (3.1 + 4.6 + 4.6)".
    pub fn describe(&self) -> String {
        let parts: Vec<String> = self
            .per_process
            .iter()
            .map(|s| format!("{:.1}", 100.0 * s / self.wall))
            .collect();
        format!(
            "{:.1}% of one core ({})",
            self.percent_of_core(),
            parts.join(" + ")
        )
    }
}

impl CpuMeter {
    /// Starts a window for `pids` ("self" is this process).
    pub fn start(pids: Vec<String>) -> Result<CpuMeter, BenchError> {
        let start_ticks = pids
            .iter()
            .map(|p| cpu_ticks(p))
            .collect::<Result<_, _>>()?;
        Ok(CpuMeter {
            pids,
            ticks_per_second: ticks_per_second(),
            start_ticks,
            start: Instant::now(),
        })
    }

    /// CPU used since `start` (fails if a process has gone).
    pub fn read(&self) -> Result<CpuUsage, BenchError> {
        let wall = self.start.elapsed().as_secs_f64();
        let mut per_process = Vec::with_capacity(self.pids.len());
        for (pid, start) in self.pids.iter().zip(&self.start_ticks) {
            let ticks = cpu_ticks(pid)?.saturating_sub(*start);
            per_process.push(ticks as f64 / self.ticks_per_second as f64);
        }
        Ok(CpuUsage { per_process, wall })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn endpoints_rotate_per_client() {
        let e = parse_endpoints("a:1, b:2,c:3").unwrap();
        assert_eq!(endpoints_for(&e, 0), ["a:1", "b:2", "c:3"]);
        assert_eq!(endpoints_for(&e, 4), ["b:2", "c:3", "a:1"]);
        assert!(parse_endpoints(" , ").is_err());
    }

    #[test]
    fn own_cpu_is_readable() {
        if !std::path::Path::new("/proc/self/stat").exists() {
            return; // not Linux: the CPU meter is Linux-only, like the benchmark runs
        }
        let meter = CpuMeter::start(vec!["self".into()]).unwrap();
        let usage = meter.read().unwrap();
        assert_eq!(usage.per_process.len(), 1);
        assert!(usage.percent_of_core() >= 0.0);
        assert_eq!(parse_pids("1, 2,").unwrap(), [1, 2]);
        assert!(parse_pids("x").is_err());
    }

    #[test]
    fn tally_counts_addresses() {
        assert_eq!(
            tally([Some("b"), Some("a"), None, Some("b")]),
            "a=1 b=2 none=1"
        );
    }
}
