//! The host table and its indexes: by id, by agent, by (cloud area, address), by module and by
//! business, plus the address conflicts found while building them.

use std::{collections::BTreeMap, net::IpAddr};

// The index keys are ids and addresses from the operator's file and from authenticated agents,
// never from callers: flooding resistance buys nothing here, while SipHash's cost shows when a
// request names 50,000 hosts.
use rustc_hash::FxHashMap;

use crate::{model::Host, topology::Topology};

/// An address claimed by more than one targetable host in a cloud area. The earliest claim holds
/// it: a host of the file before any agent's, then the agent that has claimed it the longest,
/// then the lowest id. The others are quarantined: they can be targeted by host id, but not by
/// this address, until an operator resolves the conflict. A newcomer never takes an address away.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct AddressConflict {
    pub bk_cloud_id: i64,
    pub ip: IpAddr,
    pub held_by: i64,
    /// The hosts that claim the address too, by id.
    pub claimed_by: Vec<i64>,
}

/// Hosts sorted by id; positions are `u32` so that position order is host id order.
#[derive(Debug, Clone, Default)]
pub(crate) struct HostTable {
    pub(crate) hosts: Vec<Host>,
    by_id: FxHashMap<i64, u32>,
    by_agent: FxHashMap<String, u32>,
    /// (cloud, address) to the targetable host holding it.
    holders: FxHashMap<(i64, IpAddr), u32>,
    /// (cloud, address) to unassigned hosts with it: they are found, then refused as outside
    /// every scope.
    unassigned: FxHashMap<(i64, IpAddr), Vec<u32>>,
    pub(crate) conflicts: Vec<AddressConflict>,
    /// Per topology node position: the hosts in that module (empty for other nodes), sorted.
    pub(crate) in_module: Vec<Vec<u32>>,
    /// Business to its hosts, sorted.
    pub(crate) of_business: FxHashMap<i64, Vec<u32>>,
}

impl HostTable {
    /// Indexes hosts whose references have been checked against `topology`. `claimed_since`
    /// says since when an agent's host has claimed its addresses; hosts not in it (the file's)
    /// claim theirs since always.
    pub(crate) fn build(
        mut hosts: Vec<Host>,
        topology: &Topology,
        claimed_since: &FxHashMap<i64, i64>,
    ) -> Self {
        hosts.sort_unstable_by_key(|h| h.bk_host_id);
        for host in &mut hosts {
            for ip in &mut host.ips {
                *ip = ip.to_canonical();
            }
        }
        let mut table = Self {
            in_module: vec![Vec::new(); topology.nodes.len()],
            ..Self::default()
        };
        table.by_id.reserve(hosts.len());
        let rank = |i: u32| {
            let id = hosts[i as usize].bk_host_id;
            (claimed_since.get(&id).copied().unwrap_or(i64::MIN), id)
        };
        // Every claimant of a contested address, in position (host id) order.
        let mut contested: BTreeMap<(i64, IpAddr), Vec<u32>> = BTreeMap::new();
        for (i, host) in hosts.iter().enumerate() {
            let i = i as u32;
            table.by_id.insert(host.bk_host_id, i);
            if let Some(agent) = &host.agent_id {
                table.by_agent.insert(agent.clone(), i);
            }
            let Some(biz) = host.bk_biz_id else {
                for ip in &host.ips {
                    let holders = table.unassigned.entry((host.bk_cloud_id, *ip)).or_default();
                    if holders.last() != Some(&i) {
                        holders.push(i);
                    }
                }
                continue;
            };
            table.of_business.entry(biz).or_default().push(i);
            for module in &host.modules {
                if let Some(m) = topology.module(*module) {
                    table.in_module[m as usize].push(i);
                }
            }
            for ip in &host.ips {
                let key = (host.bk_cloud_id, *ip);
                let holder = table.holders.entry(key).or_insert(i);
                if *holder != i {
                    let claimants = contested.entry(key).or_insert_with(|| vec![*holder]);
                    if claimants.last() != Some(&i) {
                        claimants.push(i);
                    }
                    if rank(i) < rank(*holder) {
                        *holder = i;
                    }
                }
            }
        }
        table.conflicts = contested
            .into_iter()
            .map(|((bk_cloud_id, ip), claimants)| {
                let holder = table.holders[&(bk_cloud_id, ip)];
                AddressConflict {
                    bk_cloud_id,
                    ip,
                    held_by: hosts[holder as usize].bk_host_id,
                    claimed_by: claimants
                        .into_iter()
                        .filter(|&c| c != holder)
                        .map(|c| hosts[c as usize].bk_host_id)
                        .collect(),
                }
            })
            .collect();
        table.hosts = hosts;
        table
    }

    pub(crate) fn position(&self, bk_host_id: i64) -> Option<u32> {
        self.by_id.get(&bk_host_id).copied()
    }

    pub(crate) fn by_agent(&self, agent_id: &str) -> Option<&Host> {
        self.by_agent
            .get(agent_id)
            .map(|&i| &self.hosts[i as usize])
    }

    /// The targetable host holding an address.
    pub(crate) fn holder(&self, bk_cloud_id: i64, ip: IpAddr) -> Option<u32> {
        self.holders.get(&(bk_cloud_id, ip)).copied()
    }

    /// Unassigned hosts with an address.
    pub(crate) fn unassigned_with(&self, bk_cloud_id: i64, ip: IpAddr) -> &[u32] {
        self.unassigned
            .get(&(bk_cloud_id, ip))
            .map_or(&[], Vec::as_slice)
    }
}
