//! [`InventoryDocument::apply`]: each change made on the document, refused when it cannot be made
//! on its own terms, and the checks of the fields a change names.

use toml_edit::{ArrayOfTables, Item, Table, value};

use super::{
    AgentHosts, Change, ChangeError, ConditionSpec, ConditionValue, InventoryDocument,
    references::{Id, listing},
    refuse,
    tables::{
        int, int_array, ip_array, merge_attributes, put, scalar, set_placement, str_array, text,
    },
};
use crate::model::{BIZ, MODULE, SET};

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
}

pub(super) fn node_kind(bk_obj_id: &str) -> Result<(&'static str, bool), ChangeError> {
    match bk_obj_id {
        SET => Ok((SET, false)),
        MODULE => Ok((MODULE, false)),
        BIZ | "host" | "" => refuse(format!(
            "bk_obj_id: {bk_obj_id:?} is not a topology node (set, module or a custom level)"
        )),
        _ => Ok(("level", true)),
    }
}

pub(super) fn check_parent(parent: &str) -> Result<(), ChangeError> {
    match parent.split_once(':') {
        Some((obj, id)) if !obj.is_empty() && id.parse::<i64>().is_ok() => Ok(()),
        _ => refuse(format!(
            "parent: {parent:?} is not \"biz:<bk_biz_id>\" or \"<bk_obj_id>:<bk_inst_id>\""
        )),
    }
}

pub(super) fn check_object(field: &str, object: &str) -> Result<(), ChangeError> {
    if CONDITION_OBJECTS.contains(&object) {
        Ok(())
    } else {
        refuse(format!("{field}: {object:?} is not host, set or module"))
    }
}

pub(super) fn check_category(category: &str) -> Result<(), ChangeError> {
    if matches!(category, "system" | "database") {
        Ok(())
    } else {
        refuse(format!("category: {category:?} is not system or database"))
    }
}

pub(super) fn conditions_table(conditions: &[ConditionSpec]) -> Result<ArrayOfTables, ChangeError> {
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
