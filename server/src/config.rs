//! Server configuration: addresses, data directory, timings and size limits. Every timing is
//! configurable so tests run fast (DESIGN §3a.15). Loaded from flags and/or a TOML file with
//! the same keys (see `main.rs`).

use std::collections::BTreeMap;
use std::path::PathBuf;
use std::time::Duration;

use serde::Deserialize;

/// Configuration of one lockd node.
#[derive(Debug, Clone, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct Config {
    /// This node's id in the cluster.
    pub id: u64,
    /// Directory of the redb database.
    pub data_dir: PathBuf,
    /// Address clients connect to.
    pub client_addr: String,
    /// Address peers connect to.
    pub peer_addr: String,
    /// The initial cluster as `ID=HOST:PORT,...` (peer addresses, this node included);
    /// empty for a one-member cluster. Read only when the data directory is new: a node
    /// with data ignores it (DESIGN §3a.9).
    pub peers: String,
    /// Election timeout in ticks (randomized in [n, 2n)); heartbeats go every tick.
    pub election_ticks: u32,
    /// Start as a new member of an existing cluster: record no initial configuration, never
    /// campaign, wait for the leader (after `lockctl cluster add`). `peers` then gives the
    /// existing members' peer addresses.
    pub join: bool,
    /// Cluster identity, fixed at bootstrap: its hash is the cluster id.
    pub cluster_token: String,
    /// Length of one tick: session deadlines are checked once per tick.
    pub tick_ms: u64,
    /// Smallest session TTL granted; shorter requests are raised to it.
    pub session_ttl_min_ms: u64,
    /// Largest session TTL granted; longer requests are lowered to it.
    pub session_ttl_max_ms: u64,
    /// TTL of a connection's implicit session (it lives while the connection does).
    pub implicit_session_ttl_ms: u64,
    /// Bound on the clock's rate error, in parts per million, told to clients.
    pub drift_ppm: u64,
    /// Largest frame accepted or sent, in bytes.
    pub max_frame: usize,
    /// Largest node data, in bytes.
    pub max_data: usize,
    /// Largest proposal (one request, a `multi` included), in bytes.
    pub max_proposal: usize,
    /// Most entries in one group commit.
    pub max_batch: usize,
    /// Most concurrent client connections.
    pub max_connections: usize,
    /// Log entries kept below the applied index before compaction.
    pub log_retain: u64,
    /// Log format: "text" or "json".
    pub log_format: String,
    /// How long the loop polls for new requests before parking its thread, in µs (0 = park
    /// at once). Trades a little CPU for lower latency at low concurrency on a one-member
    /// cluster. Unset: 200 for a one-member cluster, 0 with peers (nodes sharing a machine
    /// would take each other's CPU; measured 1.6x slower on 3 nodes over 2 cores).
    pub spin_us: Option<u64>,
    /// Interval of watch progress notifications (bookmarks), in ms.
    pub watch_progress_ms: u64,
}

impl Default for Config {
    fn default() -> Self {
        Config {
            id: 1,
            data_dir: PathBuf::from("lockd-data"),
            client_addr: "127.0.0.1:7001".to_string(),
            peer_addr: "127.0.0.1:7101".to_string(),
            peers: String::new(),
            election_ticks: 10,
            join: false,
            cluster_token: "lockd".to_string(),
            tick_ms: 100,
            session_ttl_min_ms: 1_000,
            session_ttl_max_ms: 300_000,
            implicit_session_ttl_ms: 30_000,
            drift_ppm: 1_000,
            max_frame: lockd_protocol::DEFAULT_MAX_FRAME,
            max_data: 1024 * 1024,
            max_proposal: 3 * 1024 * 1024,
            max_batch: 1024,
            max_connections: 10_000,
            log_retain: 10_000,
            log_format: "text".to_string(),
            spin_us: None,
            watch_progress_ms: 1_000,
        }
    }
}

/// A configuration that cannot work.
#[derive(Debug, thiserror::Error)]
#[error("invalid configuration: {0}")]
pub struct ConfigError(pub String);

impl Config {
    /// Settings for tests: short ticks and TTLs, everything else default.
    pub fn for_tests(data_dir: PathBuf) -> Self {
        Config {
            data_dir,
            client_addr: "127.0.0.1:0".to_string(),
            tick_ms: 10,
            session_ttl_min_ms: 50,
            implicit_session_ttl_ms: 2_000,
            spin_us: Some(0),
            watch_progress_ms: 50,
            ..Config::default()
        }
    }

    /// Checks that the limits fit together (DESIGN §3a.14).
    pub fn validate(&self) -> Result<(), ConfigError> {
        let fail = |m: &str| Err(ConfigError(m.to_string()));
        if self.tick_ms == 0 {
            return fail("tick_ms must be > 0");
        }
        if self.session_ttl_min_ms < 2 * self.tick_ms {
            return fail("session_ttl_min_ms must be at least two ticks");
        }
        if self.session_ttl_min_ms > self.session_ttl_max_ms {
            return fail("session_ttl_min_ms exceeds session_ttl_max_ms");
        }
        if self.max_frame > lockd_protocol::MAX_FRAME_LIMIT {
            return fail("max_frame exceeds the 64 MiB ceiling");
        }
        if self.max_data + 2048 > self.max_proposal {
            return fail("max_proposal must exceed max_data by at least 2 KiB (path and headers)");
        }
        if self.max_proposal + 4096 > self.max_frame {
            return fail("max_frame must exceed max_proposal by at least 4 KiB");
        }
        if self.max_batch == 0 || self.max_connections == 0 {
            return fail("max_batch and max_connections must be > 0");
        }
        if self.watch_progress_ms == 0 {
            return fail("watch_progress_ms must be > 0");
        }
        if self.spin_us.is_some_and(|us| us > 10_000) {
            return fail("spin_us must be at most 10000");
        }
        if self.drift_ppm >= 100_000 {
            return fail("drift_ppm must be below 100000 (10%)");
        }
        if self.election_ticks < 3 {
            return fail("election_ticks must be at least 3 (heartbeats go every tick)");
        }
        if self.id == 0 {
            return fail("id must be > 0");
        }
        self.peer_map()?;
        Ok(())
    }

    /// The initial cluster from `peers`: node id → peer address. Empty for a one-member
    /// cluster; otherwise it must name this node.
    pub fn peer_map(&self) -> Result<BTreeMap<u64, String>, ConfigError> {
        let mut map = BTreeMap::new();
        for item in self
            .peers
            .split(',')
            .map(str::trim)
            .filter(|p| !p.is_empty())
        {
            let bad = || ConfigError(format!("peers: {item:?} is not ID=HOST:PORT"));
            let (id, addr) = item.split_once('=').ok_or_else(bad)?;
            let id: u64 = id.trim().parse().map_err(|_| bad())?;
            let addr = addr.trim();
            if id == 0 || addr.is_empty() || !addr.contains(':') {
                return Err(bad());
            }
            if map.insert(id, addr.to_string()).is_some() {
                return Err(ConfigError(format!("peers: node {id} is named twice")));
            }
        }
        if self.join && map.keys().all(|&id| id == self.id) {
            return Err(ConfigError(
                "join needs peers: the peer addresses of the cluster's members".into(),
            ));
        }
        if !self.join && !map.is_empty() && !map.contains_key(&self.id) {
            return Err(ConfigError(format!(
                "peers does not name this node (--id {})",
                self.id
            )));
        }
        Ok(map)
    }

    /// The tick as a duration.
    pub fn tick(&self) -> Duration {
        Duration::from_millis(self.tick_ms)
    }

    /// Clamps a requested TTL into the configured bounds.
    pub fn clamp_ttl(&self, requested_ms: u64) -> u64 {
        requested_ms.clamp(self.session_ttl_min_ms, self.session_ttl_max_ms)
    }

    /// The cluster id derived from the token (FNV-1a, stable across versions).
    pub fn cluster_id(&self) -> u64 {
        self.cluster_token
            .bytes()
            .fold(0xcbf2_9ce4_8422_2325u64, |hash, byte| {
                (hash ^ byte as u64).wrapping_mul(0x0100_0000_01b3)
            })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn defaults_and_test_settings_are_valid() {
        Config::default().validate().unwrap();
        Config::for_tests("x".into()).validate().unwrap();
    }

    #[test]
    fn rejects_limits_that_do_not_fit() {
        let config = Config {
            max_data: 4 * 1024 * 1024,
            ..Config::default()
        };
        assert!(config.validate().is_err());
        let config = Config {
            session_ttl_min_ms: 10,
            ..Config::default()
        };
        assert!(config.validate().is_err());
    }

    #[test]
    fn reads_toml_with_the_flag_names_and_rejects_unknown_keys() {
        let config: Config = toml::from_str(
            "data_dir = \"/var/lib/lockd\"\nclient_addr = \"0.0.0.0:7001\"\ntick_ms = 50\nsession_ttl_max_ms = 60000\n",
        )
        .unwrap();
        assert_eq!(config.data_dir, std::path::PathBuf::from("/var/lib/lockd"));
        assert_eq!(config.client_addr, "0.0.0.0:7001");
        assert_eq!((config.tick_ms, config.session_ttl_max_ms), (50, 60_000));
        assert_eq!(
            config.max_data,
            Config::default().max_data,
            "unset keys keep defaults"
        );
        assert!(toml::from_str::<Config>("tick_msec = 5").is_err());
    }

    #[test]
    fn parses_the_initial_cluster() {
        let config = Config {
            id: 2,
            peers: "1=127.0.0.1:7101, 2=127.0.0.1:7102,3=localhost:7103".into(),
            ..Config::default()
        };
        let map = config.peer_map().unwrap();
        assert_eq!(map.len(), 3);
        assert_eq!(map[&3], "localhost:7103");
        for bad in [
            "1=127.0.0.1:7101,3=x:1",
            "1=a:1,1=b:2",
            "x=a:1",
            "2=",
            "2=nohostport",
        ] {
            let config = Config {
                id: 2,
                peers: bad.into(),
                ..Config::default()
            };
            assert!(config.validate().is_err(), "{bad} accepted");
        }
    }

    #[test]
    fn clamps_ttl() {
        let config = Config::default();
        assert_eq!(config.clamp_ttl(1), 1_000);
        assert_eq!(config.clamp_ttl(5_000), 5_000);
        assert_eq!(config.clamp_ttl(u64::MAX), 300_000);
    }
}
