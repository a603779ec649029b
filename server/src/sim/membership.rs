//! The simulation's operator: random single-server configuration changes and leader
//! transfers proposed at a leader (any node that believes it leads, deposed ones included),
//! during whatever faults the run injects. Spare nodes join as learners, learners are
//! promoted once caught up, members are removed (the leader itself too, §4.2.2) and come back
//! later; removed nodes keep running with whatever log and configuration they have. The core
//! refuses what its rules forbid (one change at a time, none before the leader's first
//! commit, promotion only within the lag, nothing during a transfer); refusals are part of
//! the run.

use rand::seq::IteratorRandom;
use rand::Rng;

use super::Sim;
use crate::raft::{ConfChange, Role};

impl Sim {
    /// A running, unpaused node that believes it leads, drawn at random.
    fn random_leader(&mut self) -> Option<u64> {
        let now = self.now;
        let leaders: Vec<u64> = self
            .nodes
            .iter()
            .filter(|(_, n)| {
                n.paused_until <= now && n.raft.as_ref().is_some_and(|r| r.role() == Role::Leader)
            })
            .map(|(id, _)| *id)
            .collect();
        leaders.into_iter().choose(&mut self.rng)
    }

    /// One step of the operator: maybe a configuration change, maybe a leader transfer.
    pub(super) fn membership(&mut self) {
        if self.rng.random_bool(self.cfg.conf_change) {
            if let Some(id) = self.random_leader() {
                self.change_conf(id);
            }
        }
        if self.rng.random_bool(self.cfg.transfer) {
            if let Some(id) = self.random_leader() {
                self.start_transfer(id);
            }
        }
    }

    fn change_conf(&mut self, leader: u64) {
        let total = self.cfg.nodes + self.cfg.spares;
        // Keep a majority of the starting size, so crashes alone do not stall the cluster.
        let min_voters = self.cfg.nodes.saturating_sub(1).max(1) as usize;
        let Some(conf) = self.nodes[&leader].raft.as_ref().map(|r| r.conf().clone()) else {
            return;
        };
        let outsiders = (1..=total).filter(|id| !conf.contains(*id));
        let change = match self.rng.random_range(0..5u32) {
            0 => outsiders
                .choose(&mut self.rng)
                .map(|id| ConfChange::AddLearner {
                    id,
                    peer_addr: format!("sim-{id}:peer"),
                    client_addr: format!("sim-{id}:client"),
                }),
            1 => conf
                .learners
                .iter()
                .copied()
                .choose(&mut self.rng)
                .map(|id| ConfChange::Promote { id }),
            2 if conf.voters.len() > min_voters => conf
                .voters
                .iter()
                .copied()
                .choose(&mut self.rng)
                .map(|id| ConfChange::Remove { id }),
            3 => conf
                .learners
                .iter()
                .copied()
                .choose(&mut self.rng)
                .map(|id| ConfChange::Remove { id }),
            4 => conf
                .ids()
                .choose(&mut self.rng)
                .map(|id| ConfChange::Identify {
                    id,
                    incarnation: id * 1000,
                    client_addr: format!("sim-{id}:client"),
                }),
            _ => None,
        };
        let Some(change) = change else { return };
        let now = self.now;
        let Some(raft) = self.node(leader).raft.as_mut() else {
            return;
        };
        let term = raft.term();
        if raft.propose_conf_change(change.clone(), term, now).is_ok() {
            self.stats.conf_changes += 1;
            match change {
                ConfChange::Promote { .. } => self.stats.promotions += 1,
                ConfChange::Remove { id } if id == leader => self.stats.leader_removals += 1,
                _ => {}
            }
        }
    }

    fn start_transfer(&mut self, leader: u64) {
        let Some(raft) = self.nodes[&leader].raft.as_ref() else {
            return;
        };
        let voters: Vec<u64> = raft
            .conf()
            .voters
            .iter()
            .copied()
            .filter(|v| *v != leader)
            .collect();
        let Some(target) = voters.into_iter().choose(&mut self.rng) else {
            return;
        };
        let Some(raft) = self.node(leader).raft.as_mut() else {
            return;
        };
        if raft.transfer_leader(target).is_ok() {
            self.stats.transfers += 1;
        }
    }
}
