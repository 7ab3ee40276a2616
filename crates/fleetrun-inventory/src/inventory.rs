//! The inventory: every part, checked once and indexed once, then cheap to query.

use std::{collections::HashMap, net::IpAddr, sync::Arc};

use crate::{
    agents::{AgentPlacement, PinnedAddress, Placement},
    group::DynamicGroup,
    hosts::{AddressConflict, HostTable},
    model::{Account, Business, BusinessSet, Host, Scope, TopoNode},
    problem::InventoryError,
    topology::Topology,
    validate::validate,
};

/// Everything an inventory is made of, before it is checked and indexed.
#[derive(Debug, Clone, Default)]
pub struct InventoryParts {
    pub businesses: Vec<Business>,
    pub business_sets: Vec<BusinessSet>,
    /// Sets, modules and custom-level nodes of every business.
    pub topology: Vec<TopoNode>,
    /// Hosts known without an agent registration (they may still name an agent).
    pub hosts: Vec<Host>,
    /// Where the hosts of these agents go once they register.
    pub agent_placements: Vec<AgentPlacement>,
    /// Where the hosts of other agents go; by default, unassigned.
    pub unlisted_agents: Placement,
    pub dynamic_groups: Vec<DynamicGroup>,
    pub accounts: Vec<Account>,
}

/// A checked, indexed inventory. Build it with [`Inventory::build`] or
/// [`Inventory::from_toml`]; merge registered agents with [`Inventory::with_agents`].
#[derive(Debug, Clone)]
pub struct Inventory {
    businesses: Vec<Business>,
    business_index: HashMap<i64, usize>,
    business_sets: Vec<BusinessSet>,
    business_set_index: HashMap<i64, usize>,
    pub(crate) topology: Arc<Topology>,
    pub(crate) hosts: HostTable,
    /// The hosts of the parts, which every merge of agents starts from.
    pub(crate) declared_hosts: Arc<Vec<Host>>,
    pub(crate) placements: Arc<HashMap<String, Placement>>,
    pub(crate) pinned: Arc<HashMap<String, PinnedAddress>>,
    pub(crate) unlisted_agents: Arc<Placement>,
    groups: Vec<DynamicGroup>,
    group_index: HashMap<String, usize>,
    pub(crate) accounts: Vec<Account>,
}

impl Inventory {
    /// Checks the parts as a whole and builds the indexes.
    pub fn build(parts: InventoryParts) -> Result<Self, InventoryError> {
        validate(&parts)?;
        let topology = Topology::build(parts.topology);
        let hosts = HostTable::build(parts.hosts.clone(), &topology, &Default::default());
        Ok(Self {
            business_index: index(&parts.businesses, |b| b.bk_biz_id),
            businesses: parts.businesses,
            business_set_index: index(&parts.business_sets, |s| s.bk_biz_set_id),
            business_sets: parts.business_sets,
            topology: Arc::new(topology),
            hosts,
            declared_hosts: Arc::new(parts.hosts),
            pinned: Arc::new(
                parts
                    .agent_placements
                    .iter()
                    .filter_map(|p| Some((p.agent_id.clone(), p.address.clone()?)))
                    .collect(),
            ),
            placements: Arc::new(
                parts
                    .agent_placements
                    .into_iter()
                    .map(|p| (p.agent_id, p.placement))
                    .collect(),
            ),
            unlisted_agents: Arc::new(parts.unlisted_agents),
            group_index: index(&parts.dynamic_groups, |g| g.id.clone()),
            groups: parts.dynamic_groups,
            accounts: parts.accounts,
        })
    }

    /// A copy with `hosts` in place of the current host table (used by agent merges).
    pub(crate) fn with_host_table(&self, hosts: HostTable) -> Self {
        Self {
            businesses: self.businesses.clone(),
            business_index: self.business_index.clone(),
            business_sets: self.business_sets.clone(),
            business_set_index: self.business_set_index.clone(),
            topology: Arc::clone(&self.topology),
            hosts,
            declared_hosts: Arc::clone(&self.declared_hosts),
            placements: Arc::clone(&self.placements),
            pinned: Arc::clone(&self.pinned),
            unlisted_agents: Arc::clone(&self.unlisted_agents),
            groups: self.groups.clone(),
            group_index: self.group_index.clone(),
            accounts: self.accounts.clone(),
        }
    }

    pub fn businesses(&self) -> &[Business] {
        &self.businesses
    }

    pub fn business(&self, bk_biz_id: i64) -> Option<&Business> {
        self.business_index
            .get(&bk_biz_id)
            .map(|&i| &self.businesses[i])
    }

    pub fn business_sets(&self) -> &[BusinessSet] {
        &self.business_sets
    }

    pub fn business_set(&self, bk_biz_set_id: i64) -> Option<&BusinessSet> {
        self.business_set_index
            .get(&bk_biz_set_id)
            .map(|&i| &self.business_sets[i])
    }

    /// Whether the scope names a business or business set of the inventory.
    pub fn has_scope(&self, scope: &Scope) -> bool {
        self.businesses_in(scope).is_some()
    }

    /// The businesses a scope covers, or `None` for a scope that does not exist.
    pub fn businesses_in(&self, scope: &Scope) -> Option<&[i64]> {
        match scope {
            Scope::Biz(id) => self
                .business_index
                .get(id)
                .map(|&i| std::slice::from_ref(&self.businesses[i].bk_biz_id)),
            Scope::BizSet(id) => self.business_set(*id).map(|s| s.members.as_slice()),
        }
    }

    /// Sets, modules and custom-level nodes, in the order they were given.
    pub fn topology(&self) -> &[TopoNode] {
        &self.topology.nodes
    }

    pub fn topo_node(&self, bk_obj_id: &str, bk_inst_id: i64) -> Option<&TopoNode> {
        self.topology
            .find(bk_obj_id, bk_inst_id)
            .map(|i| &self.topology.nodes[i as usize])
    }

    /// The business a topology node belongs to.
    pub fn business_of_node(&self, bk_obj_id: &str, bk_inst_id: i64) -> Option<i64> {
        self.topology
            .find(bk_obj_id, bk_inst_id)
            .map(|i| self.topology.business[i as usize])
    }

    /// Every host, unassigned ones included, sorted by id.
    pub fn hosts(&self) -> &[Host] {
        &self.hosts.hosts
    }

    pub fn host(&self, bk_host_id: i64) -> Option<&Host> {
        self.hosts
            .position(bk_host_id)
            .map(|i| &self.hosts.hosts[i as usize])
    }

    pub fn host_by_agent(&self, agent_id: &str) -> Option<&Host> {
        self.hosts.by_agent(agent_id)
    }

    /// The targetable host an address reaches: not conflicting claimants, not unassigned hosts.
    pub fn host_by_address(&self, bk_cloud_id: i64, ip: IpAddr) -> Option<&Host> {
        self.hosts
            .holder(bk_cloud_id, ip.to_canonical())
            .map(|i| &self.hosts.hosts[i as usize])
    }

    /// Addresses claimed by more than one targetable host, ordered by cloud area and address.
    pub fn conflicts(&self) -> &[AddressConflict] {
        &self.hosts.conflicts
    }

    pub fn dynamic_groups(&self) -> &[DynamicGroup] {
        &self.groups
    }

    pub fn dynamic_group(&self, id: &str) -> Option<&DynamicGroup> {
        self.group_index.get(id).map(|&i| &self.groups[i])
    }

    pub fn accounts(&self) -> &[Account] {
        &self.accounts
    }
}

fn index<T, K: std::hash::Hash + Eq>(items: &[T], key: impl Fn(&T) -> K) -> HashMap<K, usize> {
    items.iter().enumerate().map(|(i, t)| (key(t), i)).collect()
}
