//! Configuration of one consensus core. Pure data: the driver builds it from its own
//! configuration (ticks, sizes) and a seed; the core never reads a clock or an environment.

/// Why a [`RaftConfig`] is unusable.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum ConfigError {
    /// Node id 0 means "none" in messages and votes.
    #[error("node id must not be 0")]
    ZeroId,
    /// The heartbeat interval must be positive and shorter than the election timeout.
    #[error("need 0 < heartbeat_tick ({heartbeat_tick}) < election_tick ({election_tick})")]
    Ticks {
        /// Configured heartbeat interval.
        heartbeat_tick: u32,
        /// Configured election timeout.
        election_tick: u32,
    },
    /// At least one append must be allowed in flight.
    #[error("max_inflight_msgs must be at least 1")]
    ZeroInflight,
}

/// Settings of one [`super::Raft`] core.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RaftConfig {
    /// This node's id; never 0.
    pub id: u64,
    /// Base election timeout in ticks. A follower's actual timeout is drawn from
    /// `[election_tick, 2 * election_tick)` with the seeded RNG after every reset; a leader
    /// checks its quorum (check-quorum) once per `election_tick` ticks.
    pub election_tick: u32,
    /// Ticks between leader heartbeats; `0 < heartbeat_tick < election_tick`.
    pub heartbeat_tick: u32,
    /// Appends a leader keeps unacknowledged per follower in Replicate state (pipelining).
    pub max_inflight_msgs: usize,
    /// Byte cap of one AppendEntries batch and of one InstallSnapshot chunk. A batch always
    /// carries at least one entry, even a larger one.
    pub max_size_per_msg: u64,
    /// Largest encoded entry a proposal may produce; larger ones get
    /// [`super::ProposeError::ProposalTooLarge`]. Keep it below the peer frame limit (§3a.14).
    pub max_entry_bytes: u64,
    /// Run a pre-vote round (§9.6) before incrementing the term.
    pub pre_vote: bool,
    /// Byte cap of the committed entries handed out in one Ready (at least one entry), so a
    /// follower catching up applies in bounded transactions.
    pub max_apply_bytes: u64,
    /// A leader steps down when it has not heard from a quorum within an election timeout,
    /// and followers that heard from a leader within one ignore (pre)votes (§6.2, §9.6).
    pub check_quorum: bool,
    /// Seed of the RNG that draws election timeouts. Give each node its own seed.
    pub seed: u64,
    /// Index the driver's state machine has already applied (restart); committed entries
    /// above it are handed out again.
    pub applied: u64,
    /// A learner is promoted only if its match index is at most this many entries behind
    /// the leader's last index ([`super::ConfChangeError::LearnerBehind`]).
    pub max_promote_lag: u64,
}

impl RaftConfig {
    /// Defaults for a node id: election 10 ticks, heartbeat 1, 256 in flight, 1 MiB batches,
    /// 3 MiB entries, 16 MiB applied per Ready, pre-vote and check-quorum on, seed = id,
    /// promotion within 1000 entries of the leader.
    pub fn new(id: u64) -> RaftConfig {
        RaftConfig {
            id,
            election_tick: 10,
            heartbeat_tick: 1,
            max_inflight_msgs: 256,
            max_size_per_msg: 1 << 20,
            max_entry_bytes: 3 << 20,
            max_apply_bytes: 16 << 20,
            pre_vote: true,
            check_quorum: true,
            seed: id,
            applied: 0,
            max_promote_lag: 1000,
        }
    }

    /// Checks the settings.
    pub fn validate(&self) -> Result<(), ConfigError> {
        if self.id == 0 {
            return Err(ConfigError::ZeroId);
        }
        if self.heartbeat_tick == 0 || self.heartbeat_tick >= self.election_tick {
            return Err(ConfigError::Ticks {
                heartbeat_tick: self.heartbeat_tick,
                election_tick: self.election_tick,
            });
        }
        if self.max_inflight_msgs == 0 {
            return Err(ConfigError::ZeroInflight);
        }
        Ok(())
    }
}
