//! Changes to an inventory document, made on its text so that comments and layout survive.
//!
//! A [`Change`] is one step of an administrator's edit (create a set, move hosts, …).
//! [`InventoryDocument::apply`] makes it on the document and refuses what cannot be made on its
//! own terms (an id that exists already, a business that something still refers to); whether the
//! result fits together as a whole is then decided by [`Inventory::from_toml`] on the new text,
//! exactly as for a file an operator wrote.
//!
//! [`Inventory::from_toml`]: crate::Inventory::from_toml

use std::{
    collections::{BTreeMap, HashMap},
    fmt,
    fmt::Write as _,
    net::IpAddr,
};

use serde::Deserialize;
use toml_edit::{ArrayOfTables, DocumentMut, Item, Table, value};

use crate::model::{BIZ, MODULE, SET};

/// A scalar as JSON carries it: the value of an attribute or of a condition.
#[derive(Debug, Clone, PartialEq, Deserialize)]
#[serde(untagged)]
pub enum Scalar {
    Bool(bool),
    Integer(i64),
    Float(f64),
    Text(String),
}

/// A condition's value: one scalar or a list (for `in` and `not_in`).
#[derive(Debug, Clone, PartialEq, Deserialize)]
#[serde(untagged)]
pub enum ConditionValue {
    One(Scalar),
    Many(Vec<Scalar>),
}

/// Attributes to merge into an entry's: `None` (JSON `null`) removes the key.
pub type AttributeChanges = BTreeMap<String, Option<Scalar>>;

/// One condition of a dynamic group, with the names the file uses.
#[derive(Debug, Clone, PartialEq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ConditionSpec {
    pub object: String,
    pub field: String,
    pub op: String,
    #[serde(default)]
    pub value: Option<ConditionValue>,
    #[serde(default)]
    pub min: Option<f64>,
    #[serde(default)]
    pub max: Option<f64>,
}

/// One change to the inventory; the JSON form is an object whose `op` names the variant.
#[derive(Debug, Clone, PartialEq, Deserialize)]
#[serde(tag = "op", rename_all = "snake_case", deny_unknown_fields)]
pub enum Change {
    CreateBusiness {
        bk_biz_id: i64,
        name: String,
    },
    UpdateBusiness {
        bk_biz_id: i64,
        name: String,
    },
    DeleteBusiness {
        bk_biz_id: i64,
    },
    CreateBusinessSet {
        bk_biz_set_id: i64,
        name: String,
        #[serde(default)]
        members: Vec<i64>,
    },
    UpdateBusinessSet {
        bk_biz_set_id: i64,
        #[serde(default)]
        name: Option<String>,
        #[serde(default)]
        members: Option<Vec<i64>>,
    },
    DeleteBusinessSet {
        bk_biz_set_id: i64,
    },
    CreateNode {
        bk_obj_id: String,
        bk_inst_id: i64,
        name: String,
        parent: String,
        #[serde(default)]
        attributes: AttributeChanges,
    },
    UpdateNode {
        bk_obj_id: String,
        bk_inst_id: i64,
        #[serde(default)]
        name: Option<String>,
        #[serde(default)]
        parent: Option<String>,
        #[serde(default)]
        attributes: AttributeChanges,
    },
    DeleteNode {
        bk_obj_id: String,
        bk_inst_id: i64,
    },
    CreateHost {
        bk_host_id: i64,
        ips: Vec<IpAddr>,
        #[serde(default)]
        bk_cloud_id: Option<i64>,
        #[serde(default)]
        hostname: Option<String>,
        #[serde(default)]
        os_type: Option<String>,
        #[serde(default)]
        bk_biz_id: Option<i64>,
        #[serde(default)]
        modules: Vec<i64>,
        #[serde(default)]
        attributes: AttributeChanges,
    },
    UpdateHost {
        bk_host_id: i64,
        #[serde(default)]
        bk_cloud_id: Option<i64>,
        #[serde(default)]
        ips: Option<Vec<IpAddr>>,
        #[serde(default)]
        hostname: Option<String>,
        #[serde(default)]
        os_type: Option<String>,
        #[serde(default)]
        attributes: AttributeChanges,
    },
    MoveHosts {
        #[serde(default)]
        bk_host_ids: Vec<i64>,
        #[serde(default)]
        agent_ids: Vec<String>,
        bk_biz_id: Option<i64>,
        #[serde(default)]
        modules: Vec<i64>,
    },
    DeleteHost {
        bk_host_id: i64,
    },
    /// Absent fields stay as they are; `bk_biz_id: null` is the unassigned pool. A new
    /// business without `modules` means no module.
    SetUnlistedAgents {
        #[serde(default, deserialize_with = "present")]
        bk_biz_id: Option<Option<i64>>,
        #[serde(default)]
        modules: Option<Vec<i64>>,
        #[serde(default)]
        attributes: AttributeChanges,
    },
    CreateDynamicGroup {
        id: String,
        bk_biz_id: i64,
        name: String,
        #[serde(default)]
        object: Option<String>,
        #[serde(default)]
        conditions: Vec<ConditionSpec>,
    },
    UpdateDynamicGroup {
        id: String,
        #[serde(default)]
        bk_biz_id: Option<i64>,
        #[serde(default)]
        name: Option<String>,
        #[serde(default)]
        object: Option<String>,
        #[serde(default)]
        conditions: Option<Vec<ConditionSpec>>,
    },
    DeleteDynamicGroup {
        id: String,
    },
    CreateAccount {
        id: i64,
        alias: String,
        account: String,
        #[serde(default)]
        os_type: Option<String>,
        #[serde(default)]
        category: Option<String>,
        #[serde(default)]
        scopes: Vec<String>,
    },
    UpdateAccount {
        id: i64,
        #[serde(default)]
        alias: Option<String>,
        #[serde(default)]
        account: Option<String>,
        #[serde(default)]
        os_type: Option<String>,
        #[serde(default)]
        category: Option<String>,
        #[serde(default)]
        scopes: Option<Vec<String>>,
    },
    DeleteAccount {
        id: i64,
    },
    /// Sets an account's description and who created and last changed it, as bk-job's account
    /// APIs report them; fields left out stay as they are.
    DescribeAccount {
        id: i64,
        #[serde(default)]
        description: Option<String>,
        #[serde(default)]
        creator: Option<String>,
        #[serde(default)]
        create_time: Option<i64>,
        #[serde(default)]
        last_modify_user: Option<String>,
        #[serde(default)]
        last_modify_time: Option<i64>,
    },
    /// Places an agent's host and pins its address: what an enrollment records. The agent's
    /// entry is made if missing; its placement, cloud area and addresses are replaced.
    PlaceAgent {
        agent_id: String,
        bk_cloud_id: i64,
        ips: Vec<IpAddr>,
        bk_biz_id: i64,
        #[serde(default)]
        modules: Vec<i64>,
    },
}

impl Change {
    /// A short description for the revision history: the operation and what it is about.
    pub fn summary(&self) -> String {
        match self {
            Change::CreateBusiness { bk_biz_id, .. } => format!("create_business {bk_biz_id}"),
            Change::UpdateBusiness { bk_biz_id, .. } => format!("update_business {bk_biz_id}"),
            Change::DeleteBusiness { bk_biz_id } => format!("delete_business {bk_biz_id}"),
            Change::CreateBusinessSet { bk_biz_set_id, .. } => {
                format!("create_business_set {bk_biz_set_id}")
            }
            Change::UpdateBusinessSet { bk_biz_set_id, .. } => {
                format!("update_business_set {bk_biz_set_id}")
            }
            Change::DeleteBusinessSet { bk_biz_set_id } => {
                format!("delete_business_set {bk_biz_set_id}")
            }
            Change::CreateNode {
                bk_obj_id,
                bk_inst_id,
                ..
            } => format!("create_node {bk_obj_id}:{bk_inst_id}"),
            Change::UpdateNode {
                bk_obj_id,
                bk_inst_id,
                ..
            } => format!("update_node {bk_obj_id}:{bk_inst_id}"),
            Change::DeleteNode {
                bk_obj_id,
                bk_inst_id,
            } => format!("delete_node {bk_obj_id}:{bk_inst_id}"),
            Change::CreateHost { bk_host_id, .. } => format!("create_host {bk_host_id}"),
            Change::UpdateHost { bk_host_id, .. } => format!("update_host {bk_host_id}"),
            Change::MoveHosts {
                bk_host_ids,
                agent_ids,
                bk_biz_id,
                modules,
            } => {
                let mut s = String::from("move_hosts ");
                let names: Vec<String> = bk_host_ids
                    .iter()
                    .map(i64::to_string)
                    .chain(agent_ids.iter().map(|a| format!("agent {a}")))
                    .collect();
                if names.len() <= 5 {
                    s.push_str(&names.join(","));
                } else {
                    let _ = write!(s, "{} hosts", names.len());
                }
                match bk_biz_id {
                    Some(biz) => {
                        let _ = write!(s, " to business {biz}");
                        if !modules.is_empty() {
                            let modules: Vec<String> = modules.iter().map(i64::to_string).collect();
                            let _ = write!(s, " modules {}", modules.join(","));
                        }
                    }
                    None => s.push_str(" to the unassigned pool"),
                }
                s
            }
            Change::DeleteHost { bk_host_id } => format!("delete_host {bk_host_id}"),
            Change::PlaceAgent {
                agent_id,
                bk_biz_id,
                modules,
                ..
            } => {
                let mut s = format!("place_agent {agent_id} in business {bk_biz_id}");
                if !modules.is_empty() {
                    let modules: Vec<String> = modules.iter().map(i64::to_string).collect();
                    let _ = write!(s, " modules {}", modules.join(","));
                }
                s
            }
            Change::SetUnlistedAgents { bk_biz_id, .. } => match bk_biz_id {
                Some(Some(biz)) => format!("set_unlisted_agents business {biz}"),
                Some(None) => "set_unlisted_agents unassigned".to_owned(),
                None => "set_unlisted_agents".to_owned(),
            },
            Change::CreateDynamicGroup { id, .. } => format!("create_dynamic_group {id}"),
            Change::UpdateDynamicGroup { id, .. } => format!("update_dynamic_group {id}"),
            Change::DeleteDynamicGroup { id } => format!("delete_dynamic_group {id}"),
            Change::CreateAccount { id, .. } => format!("create_account {id}"),
            Change::UpdateAccount { id, .. } => format!("update_account {id}"),
            Change::DeleteAccount { id } => format!("delete_account {id}"),
            Change::DescribeAccount { id, .. } => format!("describe_account {id}"),
        }
    }
}

/// Why a change cannot be made; the message names the field or the entry in the way.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{0}")]
pub struct ChangeError(pub String);

fn refuse<T>(message: impl Into<String>) -> Result<T, ChangeError> {
    Err(ChangeError(message.into()))
}

/// What the document cannot know about hosts: which host ids belong to registered agents.
pub trait AgentHosts {
    /// The agent whose host has this id, if an agent's.
    fn agent_of(&self, bk_host_id: i64) -> Option<String>;
}

impl<F: Fn(i64) -> Option<String>> AgentHosts for F {
    fn agent_of(&self, bk_host_id: i64) -> Option<String> {
        self(bk_host_id)
    }
}

/// An inventory file's text, open for changes.
#[derive(Debug, Clone)]
pub struct InventoryDocument {
    doc: DocumentMut,
}

/// Hosts one `move_hosts` may name (the most one job may target).
const MAX_MOVED_HOSTS: usize = 50_000;

const CONDITION_OBJECTS: [&str; 3] = ["host", "set", "module"];
const CONDITION_OPS: [&str; 12] = [
    "equal",
    "not_equal",
    "in",
    "not_in",
    "contains",
    "range",
    "$eq",
    "$ne",
    "$in",
    "$nin",
    "$contains",
    "$range",
];

impl InventoryDocument {
    /// Opens a document. Only TOML syntax is checked here; the meaning is checked by
    /// [`Inventory::from_toml`](crate::Inventory::from_toml) once the changes are made.
    pub fn parse(text: &str) -> Result<Self, ChangeError> {
        let doc: DocumentMut = text
            .parse()
            .map_err(|e: toml_edit::TomlError| ChangeError(e.to_string()))?;
        Ok(Self { doc })
    }

    /// The document's text.
    pub fn text(&self) -> String {
        self.doc.to_string()
    }

    /// Makes one change. On error the document may be half-changed: drop it.
    pub fn apply(&mut self, change: &Change, agents: &dyn AgentHosts) -> Result<(), ChangeError> {
        match change {
            Change::CreateBusiness { bk_biz_id, name } => {
                self.fresh(Id::Business(*bk_biz_id))?;
                let mut t = Table::new();
                t["bk_biz_id"] = value(*bk_biz_id);
                t["name"] = value(name.as_str());
                self.push("business", t);
            }
            Change::UpdateBusiness { bk_biz_id, name } => {
                self.existing_entry(Id::Business(*bk_biz_id))?["name"] = value(name.as_str());
            }
            Change::DeleteBusiness { bk_biz_id } => {
                let users = self.business_users(*bk_biz_id);
                if !users.is_empty() {
                    return refuse(format!(
                        "business {bk_biz_id} is still used by {}; move or delete them first",
                        listing(&users)
                    ));
                }
                let i = self.existing(Id::Business(*bk_biz_id))?;
                self.remove("business", i);
            }
            Change::CreateBusinessSet {
                bk_biz_set_id,
                name,
                members,
            } => {
                self.fresh(Id::BusinessSet(*bk_biz_set_id))?;
                let mut t = Table::new();
                t["bk_biz_set_id"] = value(*bk_biz_set_id);
                t["name"] = value(name.as_str());
                t["members"] = value(int_array(members));
                self.push("business_set", t);
            }
            Change::UpdateBusinessSet {
                bk_biz_set_id,
                name,
                members,
            } => {
                let t = self.existing_entry(Id::BusinessSet(*bk_biz_set_id))?;
                put(t, "name", name.as_deref());
                put(t, "members", members.as_deref().map(int_array));
            }
            Change::DeleteBusinessSet { bk_biz_set_id } => {
                let scope = format!("biz_set:{bk_biz_set_id}");
                let users = self.scope_users(&scope);
                if !users.is_empty() {
                    return refuse(format!(
                        "business set {bk_biz_set_id} is still a scope of {}; change them first",
                        listing(&users)
                    ));
                }
                let i = self.existing(Id::BusinessSet(*bk_biz_set_id))?;
                self.remove("business_set", i);
            }
            Change::CreateNode {
                bk_obj_id,
                bk_inst_id,
                name,
                parent,
                attributes,
            } => {
                let (key, is_level) = node_kind(bk_obj_id)?;
                self.fresh(Id::Node(bk_obj_id, *bk_inst_id))?;
                check_parent(parent)?;
                let mut t = Table::new();
                if is_level {
                    t["bk_obj_id"] = value(bk_obj_id.as_str());
                }
                t["bk_inst_id"] = value(*bk_inst_id);
                t["name"] = value(name.as_str());
                t["parent"] = value(parent.as_str());
                merge_attributes(&mut t, attributes);
                self.push(key, t);
            }
            Change::UpdateNode {
                bk_obj_id,
                bk_inst_id,
                name,
                parent,
                attributes,
            } => {
                let (key, _) = node_kind(bk_obj_id)?;
                let i = self.existing(Id::Node(bk_obj_id, *bk_inst_id))?;
                if let Some(parent) = parent {
                    check_parent(parent)?;
                }
                let t = self.entry(key, i);
                put(t, "name", name.as_deref());
                put(t, "parent", parent.as_deref());
                merge_attributes(t, attributes);
            }
            Change::DeleteNode {
                bk_obj_id,
                bk_inst_id,
            } => {
                let (key, _) = node_kind(bk_obj_id)?;
                let i = self.existing(Id::Node(bk_obj_id, *bk_inst_id))?;
                let users = self.node_users(bk_obj_id, *bk_inst_id);
                if !users.is_empty() {
                    return refuse(format!(
                        "{bk_obj_id}:{bk_inst_id} still holds {}; move or delete them first",
                        listing(&users)
                    ));
                }
                self.remove(key, i);
            }
            Change::CreateHost {
                bk_host_id,
                ips,
                bk_cloud_id,
                hostname,
                os_type,
                bk_biz_id,
                modules,
                attributes,
            } => {
                if self.file_host(*bk_host_id).is_some() {
                    return refuse(format!("host {bk_host_id} already exists"));
                }
                if let Some(agent) = agents.agent_of(*bk_host_id) {
                    return refuse(format!(
                        "host id {bk_host_id} belongs to agent {agent:?}'s host"
                    ));
                }
                let mut t = Table::new();
                t["bk_host_id"] = value(*bk_host_id);
                t["bk_cloud_id"] = value(bk_cloud_id.unwrap_or(0));
                t["ips"] = value(ip_array(ips));
                put(&mut t, "hostname", hostname.as_deref());
                put(&mut t, "os_type", os_type.as_deref());
                set_placement(&mut t, *bk_biz_id, modules);
                merge_attributes(&mut t, attributes);
                self.push("host", t);
            }
            Change::UpdateHost {
                bk_host_id,
                bk_cloud_id,
                ips,
                hostname,
                os_type,
                attributes,
            } => {
                if let Some(i) = self.file_host(*bk_host_id) {
                    let t = self.entry("host", i);
                    put(t, "bk_cloud_id", *bk_cloud_id);
                    put(t, "ips", ips.as_deref().map(ip_array));
                    put(t, "hostname", hostname.as_deref());
                    put(t, "os_type", os_type.as_deref());
                    merge_attributes(t, attributes);
                } else if let Some(agent) = agents.agent_of(*bk_host_id) {
                    if bk_cloud_id.is_some()
                        || ips.is_some()
                        || hostname.is_some()
                        || os_type.is_some()
                    {
                        return refuse(format!(
                            "host {bk_host_id} is agent {agent:?}'s: its agent reports the cloud area, addresses, hostname and OS"
                        ));
                    }
                    let i = self.agent_entry(&agent, true);
                    merge_attributes(self.entry("host", i), attributes);
                } else {
                    return refuse(format!("host {bk_host_id} does not exist"));
                }
            }
            Change::MoveHosts {
                bk_host_ids,
                agent_ids,
                bk_biz_id,
                modules,
            } => {
                if bk_host_ids.is_empty() && agent_ids.is_empty() {
                    return refuse("bk_host_ids and agent_ids are both empty: no host to move");
                }
                if bk_host_ids.len() + agent_ids.len() > MAX_MOVED_HOSTS {
                    return refuse(format!(
                        "more than {MAX_MOVED_HOSTS} hosts in one move; split it into several changes"
                    ));
                }
                let (by_id, mut by_agent) = self.host_positions();
                let mut targets = Vec::with_capacity(bk_host_ids.len() + agent_ids.len());
                for id in bk_host_ids {
                    match by_id.get(id) {
                        Some(&i) => targets.push(Ok(i)),
                        None => match agents.agent_of(*id) {
                            Some(agent) => targets.push(Err(agent)),
                            None => return refuse(format!("host {id} does not exist")),
                        },
                    }
                }
                for agent in agent_ids {
                    if agent.is_empty() {
                        return refuse("agent_ids: an agent id must not be empty");
                    }
                    targets.push(Err(agent.clone()));
                }
                let entries = self.entries_mut("host");
                for target in targets {
                    let i = match target {
                        Ok(i) => i,
                        Err(agent) => *by_agent.entry(agent).or_insert_with_key(|agent| {
                            let mut t = Table::new();
                            t["agent_id"] = value(agent.as_str());
                            entries.push(t);
                            entries.len() - 1
                        }),
                    };
                    let t = entries.get_mut(i).expect("position found above");
                    set_placement(t, *bk_biz_id, modules);
                }
            }
            Change::PlaceAgent {
                agent_id,
                bk_cloud_id,
                ips,
                bk_biz_id,
                modules,
            } => {
                if agent_id.is_empty() {
                    return refuse("agent_id must not be empty");
                }
                if ips.is_empty() {
                    return refuse("ips is empty: an agent is pinned to at least one address");
                }
                let i = self.agent_entry(agent_id, false);
                let t = self.entry("host", i);
                set_placement(t, Some(*bk_biz_id), modules);
                t["bk_cloud_id"] = value(*bk_cloud_id);
                t["ips"] = value(ip_array(ips));
            }
            Change::DeleteHost { bk_host_id } => {
                if let Some(i) = self.file_host(*bk_host_id) {
                    self.remove("host", i);
                } else if let Some(agent) = agents.agent_of(*bk_host_id) {
                    if let Some(i) = self.index_of("host", |t| text(t, "agent_id") == Some(&agent))
                    {
                        self.remove("host", i);
                    }
                } else {
                    return refuse(format!("host {bk_host_id} does not exist"));
                }
            }
            Change::SetUnlistedAgents {
                bk_biz_id,
                modules,
                attributes,
            } => {
                let item = self
                    .doc
                    .entry("unlisted_agents")
                    .or_insert_with(|| Item::Table(Table::new()));
                if let Some(inline) = item.as_inline_table() {
                    *item = Item::Table(inline.clone().into_table());
                }
                let Some(t) = item.as_table_mut() else {
                    return refuse("unlisted_agents is not a table in the inventory document");
                };
                match (bk_biz_id, modules) {
                    (Some(biz), modules) => {
                        set_placement(t, *biz, modules.as_deref().unwrap_or_default());
                    }
                    (None, Some(modules)) => {
                        let biz = int(t, "bk_biz_id");
                        set_placement(t, biz, modules);
                    }
                    (None, None) => {}
                }
                merge_attributes(t, attributes);
            }
            Change::CreateDynamicGroup {
                id,
                bk_biz_id,
                name,
                object,
                conditions,
            } => {
                self.fresh(Id::Group(id))?;
                let mut t = Table::new();
                t["id"] = value(id.as_str());
                t["bk_biz_id"] = value(*bk_biz_id);
                t["name"] = value(name.as_str());
                if let Some(object) = object {
                    check_object("object", object)?;
                    t["object"] = value(object.as_str());
                }
                t.insert(
                    "condition",
                    Item::ArrayOfTables(conditions_table(conditions)?),
                );
                self.push("dynamic_group", t);
            }
            Change::UpdateDynamicGroup {
                id,
                bk_biz_id,
                name,
                object,
                conditions,
            } => {
                let t = self.existing_entry(Id::Group(id))?;
                put(t, "bk_biz_id", *bk_biz_id);
                put(t, "name", name.as_deref());
                if let Some(object) = object {
                    check_object("object", object)?;
                    t["object"] = value(object.as_str());
                }
                if let Some(conditions) = conditions {
                    t.insert(
                        "condition",
                        Item::ArrayOfTables(conditions_table(conditions)?),
                    );
                }
            }
            Change::DeleteDynamicGroup { id } => {
                let i = self.existing(Id::Group(id))?;
                self.remove("dynamic_group", i);
            }
            Change::CreateAccount {
                id,
                alias,
                account,
                os_type,
                category,
                scopes,
            } => {
                self.fresh(Id::Account(*id))?;
                let mut t = Table::new();
                t["id"] = value(*id);
                t["alias"] = value(alias.as_str());
                t["account"] = value(account.as_str());
                put(&mut t, "os_type", os_type.as_deref());
                if let Some(category) = category {
                    check_category(category)?;
                    t["category"] = value(category.as_str());
                }
                if !scopes.is_empty() {
                    t["scopes"] = value(str_array(scopes));
                }
                self.push("account", t);
            }
            Change::UpdateAccount {
                id,
                alias,
                account,
                os_type,
                category,
                scopes,
            } => {
                let t = self.existing_entry(Id::Account(*id))?;
                put(t, "alias", alias.as_deref());
                put(t, "account", account.as_deref());
                put(t, "os_type", os_type.as_deref());
                if let Some(category) = category {
                    check_category(category)?;
                    t["category"] = value(category.as_str());
                }
                if let Some(scopes) = scopes {
                    if scopes.is_empty() {
                        t.remove("scopes");
                    } else {
                        t["scopes"] = value(str_array(scopes));
                    }
                }
            }
            Change::DeleteAccount { id } => {
                let i = self.existing(Id::Account(*id))?;
                self.remove("account", i);
            }
            Change::DescribeAccount {
                id,
                description,
                creator,
                create_time,
                last_modify_user,
                last_modify_time,
            } => {
                if create_time.is_some_and(|t| t < 0) || last_modify_time.is_some_and(|t| t < 0) {
                    return refuse(format!(
                        "account {id}: a time is milliseconds since 1970, not negative"
                    ));
                }
                let t = self.existing_entry(Id::Account(*id))?;
                put(t, "description", description.as_deref());
                put(t, "creator", creator.as_deref());
                put(t, "create_time", *create_time);
                put(t, "last_modify_user", last_modify_user.as_deref());
                put(t, "last_modify_time", *last_modify_time);
            }
        }
        Ok(())
    }

    /// The entries under `key` as an array of tables, made one if written as an inline array.
    fn entries_mut(&mut self, key: &str) -> &mut ArrayOfTables {
        let item = self
            .doc
            .entry(key)
            .or_insert_with(|| Item::ArrayOfTables(ArrayOfTables::new()));
        if let Some(array) = item.as_array() {
            let mut tables = ArrayOfTables::new();
            for v in array.iter() {
                if let Some(inline) = v.as_inline_table() {
                    tables.push(inline.clone().into_table());
                }
            }
            *item = Item::ArrayOfTables(tables);
        }
        if !item.is_array_of_tables() {
            *item = Item::ArrayOfTables(ArrayOfTables::new());
        }
        item.as_array_of_tables_mut()
            .expect("made an array of tables above")
    }

    /// Every entry under `key` (tables and inline tables alike), read-only.
    fn entries(&self, key: &str) -> Vec<Table> {
        match self.doc.get(key) {
            Some(Item::ArrayOfTables(a)) => a.iter().cloned().collect(),
            Some(Item::Value(toml_edit::Value::Array(a))) => a
                .iter()
                .filter_map(|v| v.as_inline_table().map(|t| t.clone().into_table()))
                .collect(),
            _ => Vec::new(),
        }
    }

    /// Where an entry is, or why it cannot be changed: it does not exist.
    fn existing(&self, id: Id<'_>) -> Result<usize, ChangeError> {
        match self.index_of(id.key(), |t| id.matches(t)) {
            Some(i) => Ok(i),
            None => refuse(format!("{id} does not exist")),
        }
    }

    /// An entry to change, or why it cannot be changed: it does not exist.
    fn existing_entry(&mut self, id: Id<'_>) -> Result<&mut Table, ChangeError> {
        let i = self.existing(id)?;
        Ok(self.entry(id.key(), i))
    }

    /// Refuses to create an entry that exists already.
    fn fresh(&self, id: Id<'_>) -> Result<(), ChangeError> {
        match self.index_of(id.key(), |t| id.matches(t)) {
            Some(_) => refuse(format!("{id} already exists")),
            None => Ok(()),
        }
    }

    fn index_of(&self, key: &str, pred: impl Fn(&Table) -> bool) -> Option<usize> {
        match self.doc.get(key) {
            Some(Item::ArrayOfTables(a)) => a.iter().position(pred),
            Some(Item::Value(toml_edit::Value::Array(a))) => a
                .iter()
                .filter_map(toml_edit::Value::as_inline_table)
                .position(|t| pred(&t.clone().into_table())),
            _ => None,
        }
    }

    /// Whether the document lists a host of its own (not an agent's) with this id.
    pub fn has_host(&self, bk_host_id: i64) -> bool {
        self.file_host(bk_host_id).is_some()
    }

    /// Where each host entry is, by `bk_host_id` and by `agent_id`: one pass for changes that
    /// touch many hosts.
    fn host_positions(&mut self) -> (HashMap<i64, usize>, HashMap<String, usize>) {
        let mut by_id = HashMap::new();
        let mut by_agent = HashMap::new();
        for (i, t) in self.entries_mut("host").iter().enumerate() {
            if let Some(id) = int(t, "bk_host_id") {
                by_id.insert(id, i);
            } else if let Some(agent) = text(t, "agent_id") {
                by_agent.insert(agent.to_owned(), i);
            }
        }
        (by_id, by_agent)
    }

    fn entry(&mut self, key: &str, i: usize) -> &mut Table {
        self.entries_mut(key)
            .get_mut(i)
            .expect("index found by index_of")
    }

    fn push(&mut self, key: &str, table: Table) {
        self.entries_mut(key).push(table);
    }

    fn remove(&mut self, key: &str, i: usize) {
        let entries = self.entries_mut(key);
        entries.remove(i);
        if entries.is_empty() {
            self.doc.remove(key);
        }
    }

    /// The index of the host entry with this `bk_host_id` (a host of the file).
    fn file_host(&self, bk_host_id: i64) -> Option<usize> {
        self.index_of("host", |t| int(t, "bk_host_id") == Some(bk_host_id))
    }

    /// The index of an agent's placement entry, made if missing: copied from `[unlisted_agents]`
    /// when `keep_placement` (the host stays where it is), otherwise empty.
    fn agent_entry(&mut self, agent: &str, keep_placement: bool) -> usize {
        if let Some(i) = self.index_of("host", |t| text(t, "agent_id") == Some(agent)) {
            return i;
        }
        let mut t = Table::new();
        t["agent_id"] = value(agent);
        if keep_placement && let Some(unlisted) = self.unlisted() {
            for (k, v) in unlisted.iter() {
                t.insert(k, v.clone());
            }
        }
        let entries = self.entries_mut("host");
        entries.push(t);
        entries.len() - 1
    }

    /// Entries that name business `bk_biz_id`.
    fn business_users(&self, bk_biz_id: i64) -> Vec<String> {
        let parent = format!("{BIZ}:{bk_biz_id}");
        let mut users = Vec::new();
        for key in ["level", SET, MODULE] {
            for t in self.entries(key) {
                if text(&t, "parent") == Some(&parent) {
                    users.push(node_name(key, &t));
                }
            }
        }
        for t in self.entries("host") {
            if int(&t, "bk_biz_id") == Some(bk_biz_id) {
                users.push(host_name(&t));
            }
        }
        for t in self.entries("business_set") {
            if ints(&t, "members").contains(&bk_biz_id) {
                users.push(format!(
                    "business set {}",
                    int(&t, "bk_biz_set_id").unwrap_or_default()
                ));
            }
        }
        for t in self.entries("dynamic_group") {
            if int(&t, "bk_biz_id") == Some(bk_biz_id) {
                users.push(format!(
                    "dynamic group {:?}",
                    text(&t, "id").unwrap_or_default()
                ));
            }
        }
        if let Some(unlisted) = self.unlisted()
            && int(&unlisted, "bk_biz_id") == Some(bk_biz_id)
        {
            users.push("unlisted_agents".to_owned());
        }
        users.extend(self.scope_users(&parent));
        users
    }

    /// Accounts allowed in `scope`.
    fn scope_users(&self, scope: &str) -> Vec<String> {
        self.entries("account")
            .iter()
            .filter(|t| strings(t, "scopes").iter().any(|s| s == scope))
            .map(|t| format!("account {}", int(t, "id").unwrap_or_default()))
            .collect()
    }

    /// Nodes under a node, and hosts in it when it is a module.
    fn node_users(&self, bk_obj_id: &str, bk_inst_id: i64) -> Vec<String> {
        let me = format!("{bk_obj_id}:{bk_inst_id}");
        let mut users = Vec::new();
        for key in ["level", SET, MODULE] {
            for t in self.entries(key) {
                if text(&t, "parent") == Some(&me) {
                    users.push(node_name(key, &t));
                }
            }
        }
        if bk_obj_id == MODULE {
            for t in self.entries("host") {
                if ints(&t, "modules").contains(&bk_inst_id) {
                    users.push(host_name(&t));
                }
            }
            if let Some(unlisted) = self.unlisted()
                && ints(&unlisted, "modules").contains(&bk_inst_id)
            {
                users.push("unlisted_agents".to_owned());
            }
        }
        users
    }

    fn unlisted(&self) -> Option<Table> {
        match self.doc.get("unlisted_agents")? {
            Item::Table(t) => Some(t.clone()),
            Item::Value(toml_edit::Value::InlineTable(t)) => Some(t.clone().into_table()),
            _ => None,
        }
    }
}

/// An entry other than a host, by its id.
#[derive(Debug, Clone, Copy)]
enum Id<'a> {
    Business(i64),
    BusinessSet(i64),
    /// `bk_obj_id`, `bk_inst_id`: a set, a module or a node of a custom level.
    Node(&'a str, i64),
    Group(&'a str),
    Account(i64),
}

impl Id<'_> {
    /// The document's key for entries of this kind.
    fn key(&self) -> &'static str {
        match self {
            Id::Business(_) => "business",
            Id::BusinessSet(_) => "business_set",
            Id::Node(obj, _) if *obj == SET => SET,
            Id::Node(obj, _) if *obj == MODULE => MODULE,
            Id::Node(..) => "level",
            Id::Group(_) => "dynamic_group",
            Id::Account(_) => "account",
        }
    }

    fn matches(&self, t: &Table) -> bool {
        match self {
            Id::Business(id) => int(t, "bk_biz_id") == Some(*id),
            Id::BusinessSet(id) => int(t, "bk_biz_set_id") == Some(*id),
            Id::Node(obj, id) => {
                int(t, "bk_inst_id") == Some(*id)
                    && (self.key() != "level" || text(t, "bk_obj_id") == Some(obj))
            }
            Id::Group(id) => text(t, "id") == Some(id),
            Id::Account(id) => int(t, "id") == Some(*id),
        }
    }
}

impl fmt::Display for Id<'_> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Id::Business(id) => write!(f, "business {id}"),
            Id::BusinessSet(id) => write!(f, "business set {id}"),
            Id::Node(obj, id) => write!(f, "{obj}:{id}"),
            Id::Group(id) => write!(f, "dynamic group {id:?}"),
            Id::Account(id) => write!(f, "account {id}"),
        }
    }
}

/// For fields where absent and `null` differ: present (even as `null`) is `Some`.
fn present<'de, D, T>(deserializer: D) -> Result<Option<T>, D::Error>
where
    D: serde::Deserializer<'de>,
    T: Deserialize<'de>,
{
    T::deserialize(deserializer).map(Some)
}

fn node_kind(bk_obj_id: &str) -> Result<(&'static str, bool), ChangeError> {
    match bk_obj_id {
        SET => Ok((SET, false)),
        MODULE => Ok((MODULE, false)),
        BIZ | "host" | "" => refuse(format!(
            "bk_obj_id: {bk_obj_id:?} is not a topology node (set, module or a custom level)"
        )),
        _ => Ok(("level", true)),
    }
}

fn check_parent(parent: &str) -> Result<(), ChangeError> {
    match parent.split_once(':') {
        Some((obj, id)) if !obj.is_empty() && id.parse::<i64>().is_ok() => Ok(()),
        _ => refuse(format!(
            "parent: {parent:?} is not \"biz:<bk_biz_id>\" or \"<bk_obj_id>:<bk_inst_id>\""
        )),
    }
}

fn check_object(field: &str, object: &str) -> Result<(), ChangeError> {
    if CONDITION_OBJECTS.contains(&object) {
        Ok(())
    } else {
        refuse(format!("{field}: {object:?} is not host, set or module"))
    }
}

fn check_category(category: &str) -> Result<(), ChangeError> {
    if matches!(category, "system" | "database") {
        Ok(())
    } else {
        refuse(format!("category: {category:?} is not system or database"))
    }
}

fn conditions_table(conditions: &[ConditionSpec]) -> Result<ArrayOfTables, ChangeError> {
    let mut tables = ArrayOfTables::new();
    for (i, c) in conditions.iter().enumerate() {
        check_object(&format!("conditions[{i}].object"), &c.object)?;
        if !CONDITION_OPS.contains(&c.op.as_str()) {
            return refuse(format!(
                "conditions[{i}].op: {:?} is not equal, not_equal, in, not_in, contains or range",
                c.op
            ));
        }
        if c.field.is_empty() {
            return refuse(format!("conditions[{i}].field must not be empty"));
        }
        let mut t = Table::new();
        t["object"] = value(c.object.as_str());
        t["field"] = value(c.field.as_str());
        t["op"] = value(c.op.as_str());
        match &c.value {
            Some(ConditionValue::One(v)) => t["value"] = value(scalar(v)),
            Some(ConditionValue::Many(vs)) => {
                t["value"] = value(vs.iter().map(scalar).collect::<toml_edit::Array>())
            }
            None => {}
        }
        put(&mut t, "min", c.min);
        put(&mut t, "max", c.max);
        tables.push(t);
    }
    Ok(tables)
}

fn set_placement(t: &mut Table, bk_biz_id: Option<i64>, modules: &[i64]) {
    match bk_biz_id {
        Some(biz) => t["bk_biz_id"] = value(biz),
        None => {
            t.remove("bk_biz_id");
        }
    }
    if modules.is_empty() {
        t.remove("modules");
    } else {
        t["modules"] = value(int_array(modules));
    }
}

/// Sets `key` when a value is given; leaves it as it is otherwise.
fn put(t: &mut Table, key: &str, v: Option<impl Into<toml_edit::Value>>) {
    if let Some(v) = v {
        t[key] = value(v);
    }
}

fn merge_attributes(t: &mut Table, changes: &AttributeChanges) {
    if changes.is_empty() {
        return;
    }
    let mut attributes = toml_edit::InlineTable::new();
    if let Some(existing) = t.get("attributes").and_then(Item::as_table_like) {
        for (k, v) in existing.iter() {
            if let Some(v) = v.as_value() {
                attributes.insert(k, v.clone());
            }
        }
    }
    for (k, v) in changes {
        match v {
            Some(v) => {
                attributes.insert(k, scalar(v));
            }
            None => {
                attributes.remove(k);
            }
        }
    }
    if attributes.is_empty() {
        t.remove("attributes");
    } else {
        t["attributes"] = value(attributes);
    }
}

fn scalar(v: &Scalar) -> toml_edit::Value {
    match v {
        Scalar::Bool(b) => (*b).into(),
        Scalar::Integer(n) => (*n).into(),
        Scalar::Float(x) => (*x).into(),
        Scalar::Text(s) => s.as_str().into(),
    }
}

fn int_array(values: &[i64]) -> toml_edit::Array {
    values.iter().copied().collect()
}

fn str_array(values: &[String]) -> toml_edit::Array {
    values.iter().map(String::as_str).collect()
}

fn ip_array(ips: &[IpAddr]) -> toml_edit::Array {
    ips.iter().map(|ip| ip.to_string()).collect()
}

fn int(t: &Table, key: &str) -> Option<i64> {
    t.get(key)?.as_integer()
}

fn text<'a>(t: &'a Table, key: &str) -> Option<&'a str> {
    t.get(key)?.as_str()
}

fn ints(t: &Table, key: &str) -> Vec<i64> {
    t.get(key)
        .and_then(Item::as_array)
        .map(|a| a.iter().filter_map(toml_edit::Value::as_integer).collect())
        .unwrap_or_default()
}

fn strings(t: &Table, key: &str) -> Vec<String> {
    t.get(key)
        .and_then(Item::as_array)
        .map(|a| {
            a.iter()
                .filter_map(|v| v.as_str().map(str::to_owned))
                .collect()
        })
        .unwrap_or_default()
}

fn node_name(key: &str, t: &Table) -> String {
    let obj = if key == "level" {
        text(t, "bk_obj_id").unwrap_or("level")
    } else {
        key
    };
    format!("{obj}:{}", int(t, "bk_inst_id").unwrap_or_default())
}

fn host_name(t: &Table) -> String {
    match (int(t, "bk_host_id"), text(t, "agent_id")) {
        (Some(id), _) => format!("host {id}"),
        (None, Some(agent)) => format!("agent {agent:?}'s host"),
        (None, None) => "a host".to_owned(),
    }
}

/// "a, b, c and 4 more".
fn listing(names: &[String]) -> String {
    const SHOWN: usize = 5;
    let mut s = names
        .iter()
        .take(SHOWN)
        .cloned()
        .collect::<Vec<_>>()
        .join(", ");
    if names.len() > SHOWN {
        let _ = write!(s, " and {} more", names.len() - SHOWN);
    }
    s
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::{Inventory, Scope, Targets};

    const EXAMPLE: &str = include_str!("../../examples/inventory.toml");

    fn no_agents(_: i64) -> Option<String> {
        None
    }

    fn change(json: &str) -> Change {
        serde_json::from_str(json).unwrap()
    }

    fn apply(text: &str, changes: &[&str]) -> Result<String, ChangeError> {
        let mut doc = InventoryDocument::parse(text)?;
        for c in changes {
            doc.apply(&change(c), &no_agents)?;
        }
        Ok(doc.text())
    }

    #[test]
    fn new_nodes_and_a_moved_host_resolve_and_comments_survive() {
        let text = apply(
            EXAMPLE,
            &[
                r#"{"op":"create_node","bk_obj_id":"set","bk_inst_id":12,"name":"cache","parent":"biz:2","attributes":{"env":"prod"}}"#,
                r#"{"op":"create_node","bk_obj_id":"module","bk_inst_id":120,"name":"redis","parent":"set:12"}"#,
                r#"{"op":"move_hosts","bk_host_ids":[1002],"bk_biz_id":2,"modules":[110,120]}"#,
            ],
        )
        .unwrap();
        assert!(text.contains("# A fleetrun inventory"), "{text}");
        let inventory = Inventory::from_toml(&text).unwrap();
        let targets = Targets {
            topo_nodes: vec![("module".into(), 120)],
            ..Targets::default()
        };
        let resolved = inventory.resolve(&Scope::Biz(2), &targets).unwrap();
        let ids: Vec<i64> = resolved.hosts.iter().map(|h| h.bk_host_id).collect();
        assert_eq!(ids, [1002]);
    }

    #[test]
    fn a_module_holding_hosts_cannot_be_deleted() {
        let err = apply(
            EXAMPLE,
            &[r#"{"op":"delete_node","bk_obj_id":"module","bk_inst_id":100}"#],
        )
        .unwrap_err();
        assert_eq!(
            err.0,
            "module:100 still holds host 1001, agent \"web-2\"'s host; move or delete them first"
        );
    }

    #[test]
    fn a_business_in_use_cannot_be_deleted_until_emptied() {
        let err = apply(EXAMPLE, &[r#"{"op":"delete_business","bk_biz_id":3}"#]).unwrap_err();
        assert!(
            err.0.starts_with("business 3 is still used by set:20"),
            "{err}"
        );
        assert!(err.0.contains("business set 9"), "{err}");
        let text = apply(
            "[[business]]\nbk_biz_id = 4\nname = \"x\"\n\n[[business]]\nbk_biz_id = 5\nname = \"y\"\n",
            &[r#"{"op":"delete_business","bk_biz_id":4}"#],
        )
        .unwrap();
        assert_eq!(
            text.trim_start(),
            "[[business]]\nbk_biz_id = 5\nname = \"y\"\n"
        );
    }

    #[test]
    fn duplicates_and_missing_entries_are_named() {
        let err = apply(
            EXAMPLE,
            &[r#"{"op":"create_business","bk_biz_id":2,"name":"again"}"#],
        )
        .unwrap_err();
        assert_eq!(err.0, "business 2 already exists");
        let err = apply(
            EXAMPLE,
            &[r#"{"op":"update_node","bk_obj_id":"region","bk_inst_id":7,"name":"x"}"#],
        )
        .unwrap_err();
        assert_eq!(err.0, "region:7 does not exist");
        let err = apply(EXAMPLE, &[r#"{"op":"create_node","bk_obj_id":"set","bk_inst_id":30,"name":"x","parent":"nowhere"}"#])
            .unwrap_err();
        assert!(err.0.starts_with("parent: \"nowhere\""), "{err}");
    }

    #[test]
    fn a_built_document_starts_from_nothing() {
        let text = apply(
            "",
            &[
                r#"{"op":"create_business","bk_biz_id":7,"name":"games"}"#,
                r#"{"op":"create_node","bk_obj_id":"zone","bk_inst_id":1,"name":"east","parent":"biz:7"}"#,
                r#"{"op":"create_node","bk_obj_id":"set","bk_inst_id":70,"name":"web","parent":"zone:1"}"#,
                r#"{"op":"create_node","bk_obj_id":"module","bk_inst_id":700,"name":"nginx","parent":"set:70"}"#,
                r#"{"op":"create_host","bk_host_id":9,"ips":["10.1.0.9"],"bk_biz_id":7,"modules":[700],"attributes":{"cpu":4}}"#,
                r#"{"op":"create_dynamic_group","id":"small","bk_biz_id":7,"name":"small hosts","conditions":[{"object":"host","field":"cpu","op":"range","max":8},{"object":"module","field":"bk_module_name","op":"in","value":["nginx","php"]}]}"#,
                r#"{"op":"create_account","id":1,"alias":"root","account":"root","scopes":["biz:7"]}"#,
                r#"{"op":"set_unlisted_agents","bk_biz_id":7,"modules":[700]}"#,
            ],
        )
        .unwrap();
        let inventory = Inventory::from_toml(&text).unwrap_or_else(|e| panic!("{e}\n{text}"));
        let targets = Targets {
            dynamic_groups: vec!["small".into()],
            ..Targets::default()
        };
        let resolved = inventory.resolve(&Scope::Biz(7), &targets).unwrap();
        assert_eq!(resolved.hosts.len(), 1);

        let text = apply(
            &text,
            &[
                r#"{"op":"update_dynamic_group","id":"small","conditions":[{"object":"host","field":"cpu","op":"range","min":8}]}"#,
            ],
        )
        .unwrap();
        let inventory = Inventory::from_toml(&text).unwrap();
        assert!(inventory.resolve(&Scope::Biz(7), &targets).is_err());
    }

    #[test]
    fn an_agents_host_keeps_its_identity_but_takes_attributes() {
        let agents = |id: i64| (id == 5).then(|| "pay-9".to_owned());
        let mut doc = InventoryDocument::parse(EXAMPLE).unwrap();
        let err = doc
            .apply(
                &change(r#"{"op":"update_host","bk_host_id":5,"hostname":"x"}"#),
                &agents,
            )
            .unwrap_err();
        assert!(err.0.contains("its agent reports"), "{err}");
        doc.apply(
            &change(r#"{"op":"update_host","bk_host_id":5,"attributes":{"rack":"c3"}}"#),
            &agents,
        )
        .unwrap();
        let text = doc.text();
        let inventory = Inventory::from_toml(&text).unwrap();
        let placed = inventory.place_agent(&crate::AgentHost {
            agent_id: "pay-9".into(),
            bk_host_id: 5,
            bk_cloud_id: 0,
            ips: vec!["10.9.0.9".parse().unwrap()],
            hostname: "p".into(),
            os_type: "linux".into(),
            address_since: 0,
        });
        // Still where [unlisted_agents] put it, now with the attribute.
        assert_eq!(placed.host.bk_biz_id, Some(3));
        assert_eq!(placed.host.modules, [200]);
        assert_eq!(
            placed.host.attributes.get("rack"),
            Some(&crate::Value::Text("c3".into()))
        );
    }

    #[test]
    fn an_enrolled_agent_is_placed_and_pinned_and_placing_it_again_replaces_both() {
        let place = |ips: &str, modules: &str| {
            format!(
                r#"{{"op":"place_agent","agent_id":"e-1","bk_cloud_id":0,"ips":{ips},"bk_biz_id":2,"modules":{modules}}}"#
            )
        };
        let text = apply(
            EXAMPLE,
            &[
                r#"{"op":"create_node","bk_obj_id":"set","bk_inst_id":12,"name":"cache","parent":"biz:2"}"#,
                r#"{"op":"create_node","bk_obj_id":"module","bk_inst_id":120,"name":"redis","parent":"set:12"}"#,
                &place(r#"["10.0.0.5","192.0.2.7"]"#, "[120]"),
            ],
        )
        .unwrap();
        let inventory = Inventory::from_toml(&text).unwrap();
        assert!(inventory.lists_agent("e-1"));
        let pin = inventory.pinned_address("e-1").unwrap();
        assert_eq!(
            pin.ips,
            [
                "10.0.0.5".parse::<IpAddr>().unwrap(),
                "192.0.2.7".parse().unwrap()
            ]
        );
        let text = apply(&text, &[&place(r#"["10.0.0.6"]"#, "[]")]).unwrap();
        assert_eq!(text.matches("agent_id = \"e-1\"").count(), 1, "{text}");
        let inventory = Inventory::from_toml(&text).unwrap();
        let pin = inventory.pinned_address("e-1").unwrap();
        assert_eq!(pin.ips, ["10.0.0.6".parse::<IpAddr>().unwrap()]);
        let refused = apply(&text, &[&place("[]", "[]")]).unwrap_err();
        assert!(refused.0.contains("ips is empty"), "{refused}");
    }

    #[test]
    fn unlisted_agents_change_only_what_is_named() {
        let text = apply(
            EXAMPLE,
            &[r#"{"op":"set_unlisted_agents","attributes":{"rack":"z9"}}"#],
        )
        .unwrap();
        assert!(
            text.contains("[unlisted_agents]\nbk_biz_id = 3\nmodules = [200]\n"),
            "{text}"
        );
        assert!(text.contains("# Agents listed nowhere go here"), "{text}");
        Inventory::from_toml(&text).unwrap();
        let text = apply(&text, &[r#"{"op":"set_unlisted_agents","bk_biz_id":null}"#]).unwrap();
        assert!(!text.contains("modules = [200]\nattributes"), "{text}");
        let inventory = Inventory::from_toml(&text).unwrap();
        let placed = inventory.place_agent(&crate::AgentHost {
            agent_id: "new".into(),
            bk_host_id: 5,
            bk_cloud_id: 0,
            ips: vec!["10.9.0.9".parse().unwrap()],
            hostname: "n".into(),
            os_type: "linux".into(),
            address_since: 0,
        });
        assert_eq!(placed.host.bk_biz_id, None);
        assert!(placed.host.modules.is_empty());
    }

    #[test]
    fn attributes_merge_and_null_removes() {
        let text = apply(
            EXAMPLE,
            &[r#"{"op":"update_host","bk_host_id":1001,"attributes":{"rack":null,"gpu":true}}"#],
        )
        .unwrap();
        assert!(
            text.contains("attributes = { cpu = 8, gpu = true }"),
            "{text}"
        );
    }

    #[test]
    fn json_names_unknown_ops_and_fields() {
        let err = serde_json::from_str::<Change>(r#"{"op":"explode"}"#).unwrap_err();
        assert!(
            err.to_string().contains("unknown variant `explode`"),
            "{err}"
        );
        let err = serde_json::from_str::<Change>(
            r#"{"op":"delete_business","bk_biz_id":1,"force":true}"#,
        )
        .unwrap_err();
        assert!(err.to_string().contains("unknown field `force`"), "{err}");
    }
}
