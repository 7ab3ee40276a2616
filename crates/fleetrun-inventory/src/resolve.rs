//! Turning a job's `target_server` into hosts, as bk-job does through CMDB.

use std::{borrow::Cow, collections::HashSet, net::IpAddr, sync::Arc};

use rustc_hash::FxHashSet;

use crate::{
    group::{DynamicGroup, HostTest, ObjectKind},
    inventory::Inventory,
    model::{BIZ, Scope},
};

/// bk-job's limit on the hosts of one step.
pub const MAX_TARGET_HOSTS: usize = 50_000;

/// A job's `target_server`. `host_ids`, when present and not empty, makes `ips` ignored.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Targets {
    /// `host_id_list`.
    pub host_ids: Option<Vec<i64>>,
    /// `ip_list`: (`bk_cloud_id`, `ip`).
    pub ips: Option<Vec<(i64, String)>>,
    /// `topo_node_list`: (`node_type`, `id`); `node_type` is `biz`, `set`, `module` or a custom
    /// level.
    pub topo_nodes: Vec<(String, i64)>,
    /// `dynamic_group_list` ids.
    pub dynamic_groups: Vec<String>,
}

/// The hosts a request stands for: no host twice, ordered by first occurrence (host ids, then
/// addresses, then topology nodes, then dynamic groups; within a node or group by host id).
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Resolved {
    pub hosts: Vec<ResolvedHost>,
}

/// One target host.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ResolvedHost {
    pub bk_host_id: i64,
    pub bk_cloud_id: i64,
    /// The address the request named the host by, or else its primary address.
    pub ip: IpAddr,
    /// The first way the request reached the host.
    pub via: Via,
}

/// How a request reached a host. Names are shared by every host reached the same way.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Via {
    HostId,
    Ip,
    /// (`bk_obj_id`, `bk_inst_id`) as the request named the node.
    TopoNode(Arc<str>, i64),
    /// The dynamic group's id.
    DynamicGroup(Arc<str>),
}

/// The request's targets could not be resolved. Checked in the order of the variants (after
/// the scope), so one request always gives the same error.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum ResolveError {
    /// The scope is neither a business nor a business set of the inventory.
    #[error("scope {0} does not exist")]
    UnknownScope(Scope),
    /// No host ids, addresses, nodes or groups at all.
    #[error("no target hosts given")]
    Empty,
    /// Host ids, or `cloud:ip` addresses, that no host has (an address only conflicting hosts
    /// claim cannot occur: its earliest claimant holds it).
    #[error("hosts not in the inventory: {}", .0.join(", "))]
    UnknownHosts(Vec<String>),
    /// Topology nodes that do not exist in the scope's businesses. A node of another business is
    /// reported the same way: bk-job looks nodes up inside the scope, so it is simply not there.
    #[error("topology nodes not found: {}", nodes(.0))]
    UnknownTopoNodes(Vec<(String, i64)>),
    /// Dynamic groups that do not exist in the scope's businesses.
    #[error("dynamic groups not found: {}", .0.join(", "))]
    UnknownDynamicGroups(Vec<String>),
    /// Hosts named by id or address that are outside the scope, unassigned ones included.
    #[error("hosts outside the scope: {}", ids(.0))]
    OutsideScope(Vec<i64>),
    /// The targets stand for no host (empty modules, groups that match nothing).
    #[error("targets resolve to no host")]
    NoHosts,
    /// More hosts than one step may have.
    #[error("{0} target hosts, more than {MAX_TARGET_HOSTS}")]
    TooMany(usize),
}

fn nodes(nodes: &[(String, i64)]) -> String {
    let names: Vec<String> = nodes.iter().map(|(o, i)| format!("{o}:{i}")).collect();
    names.join(", ")
}

fn ids(ids: &[i64]) -> String {
    let ids: Vec<String> = ids.iter().map(i64::to_string).collect();
    ids.join(", ")
}

impl ResolveError {
    /// The bk-job error code. Unknown topology nodes share 1244030 with unknown hosts.
    pub fn code(&self) -> i32 {
        match self {
            ResolveError::UnknownScope(_) => 1240003,
            ResolveError::Empty => 1244001,
            ResolveError::UnknownHosts(_) | ResolveError::UnknownTopoNodes(_) => 1244030,
            ResolveError::UnknownDynamicGroups(_) => 1211003,
            ResolveError::OutsideScope(_) => 1244002,
            ResolveError::NoHosts => 1244028,
            ResolveError::TooMany(_) => 1244022,
        }
    }
}

/// A topology node of the request, found in scope.
enum NodeTarget {
    Business(i64),
    Node(u32),
}

/// What a request names, each found in its scope.
struct Found<'r> {
    /// Hosts named by id or address: position, way, and the address used.
    hosts: Vec<(u32, Via, Option<IpAddr>)>,
    nodes: Vec<(NodeTarget, &'r str, i64)>,
    groups: Vec<&'r DynamicGroup>,
}

impl Inventory {
    /// The hosts `targets` stand for in `scope`; a business set scope covers the hosts of all its
    /// member businesses.
    pub fn resolve(&self, scope: &Scope, targets: &Targets) -> Result<Resolved, ResolveError> {
        let businesses = self
            .businesses_in(scope)
            .ok_or(ResolveError::UnknownScope(*scope))?;
        let businesses: FxHashSet<i64> = businesses.iter().copied().collect();
        let found = self.look_up(&businesses, targets)?;
        let hosts = self.expand(found);
        if hosts.is_empty() {
            return Err(ResolveError::NoHosts);
        }
        if hosts.len() > MAX_TARGET_HOSTS {
            return Err(ResolveError::TooMany(hosts.len()));
        }
        Ok(Resolved { hosts })
    }

    /// Finds everything the request names before anything is expanded, so that a bad request
    /// costs no expansion.
    fn look_up<'r>(
        &'r self,
        businesses: &FxHashSet<i64>,
        targets: &'r Targets,
    ) -> Result<Found<'r>, ResolveError> {
        let in_scope = |biz: Option<i64>| biz.is_some_and(|b| businesses.contains(&b));
        let host_ids = targets.host_ids.as_deref().filter(|l| !l.is_empty());
        let ips = match host_ids {
            Some(_) => None,
            None => targets.ips.as_deref().filter(|l| !l.is_empty()),
        };
        if host_ids.is_none()
            && ips.is_none()
            && targets.topo_nodes.is_empty()
            && targets.dynamic_groups.is_empty()
        {
            return Err(ResolveError::Empty);
        }
        let hosts = &self.hosts.hosts;
        let mut found = Found {
            hosts: Vec::new(),
            nodes: Vec::new(),
            groups: Vec::new(),
        };

        let mut unknown_hosts = Vec::new();
        let mut outside = Vec::new();
        for &id in host_ids.unwrap_or_default() {
            match self.hosts.position(id) {
                None => unknown_hosts.push(id.to_string()),
                Some(i) if in_scope(hosts[i as usize].bk_biz_id) => {
                    found.hosts.push((i, Via::HostId, None));
                }
                Some(_) => outside.push(id),
            }
        }
        for (cloud, text) in ips.unwrap_or_default() {
            let Ok(ip) = text.trim().parse::<IpAddr>().map(|ip| ip.to_canonical()) else {
                unknown_hosts.push(format!("{cloud}:{text}"));
                continue;
            };
            match self.hosts.holder(*cloud, ip) {
                Some(i) if in_scope(hosts[i as usize].bk_biz_id) => {
                    found.hosts.push((i, Via::Ip, Some(ip)));
                }
                Some(i) => outside.push(hosts[i as usize].bk_host_id),
                None => {
                    let unassigned = self.hosts.unassigned_with(*cloud, ip);
                    if unassigned.is_empty() {
                        unknown_hosts.push(format!("{cloud}:{ip}"));
                    }
                    outside.extend(unassigned.iter().map(|&i| hosts[i as usize].bk_host_id));
                }
            }
        }

        let mut unknown_nodes = Vec::new();
        for (obj, inst) in &targets.topo_nodes {
            let target = if obj == BIZ {
                businesses
                    .contains(inst)
                    .then_some(NodeTarget::Business(*inst))
            } else {
                self.topology
                    .find(obj, *inst)
                    .filter(|&n| in_scope(Some(self.topology.business[n as usize])))
                    .map(NodeTarget::Node)
            };
            match target {
                Some(target) => found.nodes.push((target, obj.as_str(), *inst)),
                None => unknown_nodes.push((obj.clone(), *inst)),
            }
        }

        let mut unknown_groups = Vec::new();
        for id in &targets.dynamic_groups {
            match self
                .dynamic_group(id)
                .filter(|g| businesses.contains(&g.bk_biz_id))
            {
                Some(group) => found.groups.push(group),
                None => unknown_groups.push(id.clone()),
            }
        }

        if !unknown_hosts.is_empty() {
            return Err(ResolveError::UnknownHosts(first_occurrences(unknown_hosts)));
        }
        if !unknown_nodes.is_empty() {
            let nodes = first_occurrences(unknown_nodes);
            return Err(ResolveError::UnknownTopoNodes(nodes));
        }
        if !unknown_groups.is_empty() {
            let groups = first_occurrences(unknown_groups);
            return Err(ResolveError::UnknownDynamicGroups(groups));
        }
        if !outside.is_empty() {
            return Err(ResolveError::OutsideScope(first_occurrences(outside)));
        }
        Ok(found)
    }

    /// The union of what was found, each host once, by the first way that reached it.
    fn expand(&self, found: Found<'_>) -> Vec<ResolvedHost> {
        let hosts = &self.hosts.hosts;
        let mut taken = vec![0u64; hosts.len().div_ceil(64)];
        let mut resolved = Vec::with_capacity(found.hosts.len());
        let mut add = |i: u32, via: &dyn Fn() -> Via, ip: Option<IpAddr>| {
            let (word, bit) = (i as usize / 64, 1u64 << (i % 64));
            if taken[word] & bit == 0 {
                taken[word] |= bit;
                let host = &hosts[i as usize];
                resolved.push(ResolvedHost {
                    bk_host_id: host.bk_host_id,
                    bk_cloud_id: host.bk_cloud_id,
                    ip: ip
                        .or_else(|| host.primary_ip())
                        .expect("hosts have an address"),
                    via: via(),
                });
            }
        };
        for (i, via, ip) in found.hosts {
            add(i, &|| via.clone(), ip);
        }
        for (target, obj, inst) in found.nodes {
            let below = match target {
                NodeTarget::Business(id) => self.business_hosts(id),
                NodeTarget::Node(n) => self.hosts_below(n),
            };
            let obj: Arc<str> = Arc::from(obj);
            let via = || Via::TopoNode(Arc::clone(&obj), inst);
            for &i in below.iter() {
                add(i, &via, None);
            }
        }
        for group in found.groups {
            let id: Arc<str> = Arc::from(group.id.as_str());
            let via = || Via::DynamicGroup(Arc::clone(&id));
            for i in self.group_hosts(group) {
                add(i, &via, None);
            }
        }
        resolved
    }

    fn business_hosts(&self, bk_biz_id: i64) -> Cow<'_, [u32]> {
        Cow::Borrowed(
            self.hosts
                .of_business
                .get(&bk_biz_id)
                .map_or(&[], Vec::as_slice),
        )
    }

    /// The hosts in the modules at or below a node, sorted.
    fn hosts_below(&self, node: u32) -> Cow<'_, [u32]> {
        match self.topology.modules_below[node as usize].as_slice() {
            [module] => Cow::Borrowed(&self.hosts.in_module[*module as usize]),
            modules => Cow::Owned(self.hosts_in(modules.iter().copied())),
        }
    }

    /// The hosts of several modules, sorted, each once.
    fn hosts_in(&self, modules: impl Iterator<Item = u32>) -> Vec<u32> {
        let mut hosts: Vec<u32> = modules
            .flat_map(|m| self.hosts.in_module[m as usize].iter().copied())
            .collect();
        hosts.sort_unstable();
        hosts.dedup();
        hosts
    }

    /// The hosts a dynamic group selects now, sorted.
    fn group_hosts(&self, group: &DynamicGroup) -> Vec<u32> {
        let (host_conditions, node_conditions): (Vec<_>, Vec<_>) = group
            .conditions
            .iter()
            .partition(|c| c.object == ObjectKind::Host);
        let candidates = if node_conditions.is_empty() {
            self.business_hosts(group.bk_biz_id)
        } else {
            let nodes = &self.topology.nodes;
            let modules = self
                .topology
                .modules_of
                .get(&group.bk_biz_id)
                .map_or(&[][..], Vec::as_slice)
                .iter()
                .copied()
                .filter(|&m| {
                    let set = self.topology.set_of[m as usize].map(|s| &nodes[s as usize]);
                    node_conditions.iter().all(|c| match c.object {
                        ObjectKind::Module => c.holds_for_node(&nodes[m as usize]),
                        _ => set.is_some_and(|set| c.holds_for_node(set)),
                    })
                });
            Cow::Owned(self.hosts_in(modules))
        };
        let hosts = &self.hosts.hosts;
        let tests: Vec<HostTest<'_>> = host_conditions.into_iter().map(HostTest::new).collect();
        candidates
            .iter()
            .copied()
            .filter(|&i| tests.iter().all(|t| t.holds(&hosts[i as usize])))
            .collect()
    }
}

/// `items` without repeats, each where it first occurred.
fn first_occurrences<T: Clone + Eq + std::hash::Hash>(items: Vec<T>) -> Vec<T> {
    let mut seen = HashSet::new();
    items
        .into_iter()
        .filter(|item| seen.insert(item.clone()))
        .collect()
}
