//! Hosts that come from agents: the agent says who its host is, the file says where it goes (the
//! rule is spelled out in the crate documentation).

use std::{collections::BTreeMap, collections::HashSet, net::IpAddr};

use rustc_hash::FxHashMap;

use crate::{
    hosts::HostTable,
    inventory::Inventory,
    model::{Host, Value},
};

/// Where hosts go: business, modules and extra fields.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct Placement {
    /// `None`: the unassigned pool (then `modules` is empty).
    pub bk_biz_id: Option<i64>,
    pub modules: Vec<i64>,
    pub attributes: BTreeMap<String, Value>,
}

/// The placement of one agent's host.
#[derive(Debug, Clone, PartialEq)]
pub struct AgentPlacement {
    pub agent_id: String,
    pub placement: Placement,
    /// The address the operator approved for the agent, if any.
    pub address: Option<PinnedAddress>,
}

/// An agent's address as the inventory pins it: the agent must report one of these addresses in
/// this cloud area, and its host is targeted by them whatever it reports.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PinnedAddress {
    pub bk_cloud_id: i64,
    /// Canonical; the first is the primary one.
    pub ips: Vec<IpAddr>,
}

/// A registered agent: what it reports about its host, and the host id the controller gave it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct AgentHost {
    pub agent_id: String,
    pub bk_host_id: i64,
    pub bk_cloud_id: i64,
    /// The first is the primary address.
    pub ips: Vec<IpAddr>,
    pub hostname: String,
    pub os_type: String,
    /// Since when (Unix ms) the agent has claimed its addresses: an earlier claim holds an
    /// address against a later one.
    pub address_since: i64,
}

/// An agent's host with its placement applied.
#[derive(Debug, Clone, PartialEq)]
pub struct PlacedHost {
    pub host: Host,
    /// Whether the file lists the agent (otherwise `[unlisted_agents]` placed it).
    pub listed: bool,
}

/// Registered agents merged into an inventory.
#[derive(Debug, Clone)]
pub struct Merged {
    pub inventory: Inventory,
    /// Agents left out, in the order given.
    pub refused: Vec<RefusedAgent>,
}

/// An agent whose host could not join the inventory.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RefusedAgent {
    pub agent_id: String,
    pub reason: AgentRefusal,
}

/// Why an agent's host was left out of a merge.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum AgentRefusal {
    /// The host id belongs to a host of the file or to an agent earlier in the list.
    #[error("host id {0} is taken")]
    HostIdTaken(i64),
    /// The agent appears earlier in the list, or a host of the file already names it.
    #[error("agent is registered twice")]
    DuplicateAgent,
    /// The agent reported no address.
    #[error("agent reported no address")]
    NoAddress,
}

impl Inventory {
    /// Whether a `[[host]]` entry places this agent (otherwise it is an unlisted agent).
    pub fn lists_agent(&self, agent_id: &str) -> bool {
        self.placements.contains_key(agent_id)
    }

    /// The address the inventory pins an agent to, if it does.
    pub fn pinned_address(&self, agent_id: &str) -> Option<&PinnedAddress> {
        self.pinned.get(agent_id)
    }

    /// The host an agent's registration stands for: its own report, placed by the file.
    pub fn place_agent(&self, agent: &AgentHost) -> PlacedHost {
        let listed = self.placements.get(&agent.agent_id);
        let placement = listed.unwrap_or(&self.unlisted_agents);
        // The operator's pin wins over what the agent reported (which the controller checked
        // against the pin when the agent registered; the pin may have changed since).
        let (bk_cloud_id, ips) = match self.pinned.get(&agent.agent_id) {
            Some(pin) => (pin.bk_cloud_id, pin.ips.clone()),
            None => (
                agent.bk_cloud_id,
                agent.ips.iter().map(IpAddr::to_canonical).collect(),
            ),
        };
        PlacedHost {
            host: Host {
                bk_host_id: agent.bk_host_id,
                bk_cloud_id,
                ips,
                hostname: agent.hostname.clone(),
                os_type: agent.os_type.clone(),
                agent_id: Some(agent.agent_id.clone()),
                bk_biz_id: placement.bk_biz_id,
                modules: placement.modules.clone(),
                attributes: placement.attributes.clone(),
            },
            listed: listed.is_some(),
        }
    }

    /// This inventory's file hosts plus the hosts of `agents`, re-indexed. Agents merged by an
    /// earlier call are replaced, not kept: pass every registered agent each time. The script
    /// library is carried over as it is now.
    pub fn with_agents(&self, agents: &[AgentHost]) -> Merged {
        let mut hosts: Vec<Host> = self.declared_hosts.as_ref().clone();
        let mut ids: HashSet<i64> = hosts.iter().map(|h| h.bk_host_id).collect();
        let mut seen: HashSet<&str> = self
            .declared_hosts
            .iter()
            .filter_map(|h| h.agent_id.as_deref())
            .collect();
        let mut refused = Vec::new();
        let mut claimed_since = FxHashMap::default();
        hosts.reserve(agents.len());
        for agent in agents {
            let reason = if !seen.insert(&agent.agent_id) {
                Some(AgentRefusal::DuplicateAgent)
            } else if agent.ips.is_empty() {
                Some(AgentRefusal::NoAddress)
            } else if !ids.insert(agent.bk_host_id) {
                Some(AgentRefusal::HostIdTaken(agent.bk_host_id))
            } else {
                None
            };
            match reason {
                Some(reason) => refused.push(RefusedAgent {
                    agent_id: agent.agent_id.clone(),
                    reason,
                }),
                None => {
                    // An address the operator approved holds against agents' own claims
                    // (the file's hosts, at i64::MIN, still come first).
                    let since = if self.pinned.contains_key(&agent.agent_id) {
                        i64::MIN + 1
                    } else {
                        agent.address_since
                    };
                    claimed_since.insert(agent.bk_host_id, since);
                    hosts.push(self.place_agent(agent).host);
                }
            }
        }
        Merged {
            inventory: self.with_host_table(HostTable::build(
                hosts,
                &self.topology,
                &claimed_since,
            )),
            refused,
        }
    }
}
