//! Finding entries in the document, and what still refers to an entry that a change would take
//! away.

use std::{collections::HashMap, fmt, fmt::Write as _};

use toml_edit::{ArrayOfTables, Item, Table, value};

use super::{
    ChangeError, InventoryDocument, refuse,
    tables::{host_name, int, ints, node_name, strings, text},
};
use crate::model::{BIZ, MODULE, SET};

impl InventoryDocument {
    /// The entries under `key` as an array of tables, made one if written as an inline array.
    pub(super) fn entries_mut(&mut self, key: &str) -> &mut ArrayOfTables {
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
    pub(super) fn entries(&self, key: &str) -> Vec<Table> {
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
    pub(super) fn existing(&self, id: Id<'_>) -> Result<usize, ChangeError> {
        match self.index_of(id.key(), |t| id.matches(t)) {
            Some(i) => Ok(i),
            None => refuse(format!("{id} does not exist")),
        }
    }

    /// An entry to change, or why it cannot be changed: it does not exist.
    pub(super) fn existing_entry(&mut self, id: Id<'_>) -> Result<&mut Table, ChangeError> {
        let i = self.existing(id)?;
        Ok(self.entry(id.key(), i))
    }

    /// Refuses to create an entry that exists already.
    pub(super) fn fresh(&self, id: Id<'_>) -> Result<(), ChangeError> {
        match self.index_of(id.key(), |t| id.matches(t)) {
            Some(_) => refuse(format!("{id} already exists")),
            None => Ok(()),
        }
    }

    pub(super) fn index_of(&self, key: &str, pred: impl Fn(&Table) -> bool) -> Option<usize> {
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
    pub(super) fn host_positions(&mut self) -> (HashMap<i64, usize>, HashMap<String, usize>) {
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

    pub(super) fn entry(&mut self, key: &str, i: usize) -> &mut Table {
        self.entries_mut(key)
            .get_mut(i)
            .expect("index found by index_of")
    }

    pub(super) fn push(&mut self, key: &str, table: Table) {
        self.entries_mut(key).push(table);
    }

    pub(super) fn remove(&mut self, key: &str, i: usize) {
        let entries = self.entries_mut(key);
        entries.remove(i);
        if entries.is_empty() {
            self.doc.remove(key);
        }
    }

    /// The index of the host entry with this `bk_host_id` (a host of the file).
    pub(super) fn file_host(&self, bk_host_id: i64) -> Option<usize> {
        self.index_of("host", |t| int(t, "bk_host_id") == Some(bk_host_id))
    }

    /// The index of an agent's placement entry, made if missing: copied from `[unlisted_agents]`
    /// when `keep_placement` (the host stays where it is), otherwise empty.
    pub(super) fn agent_entry(&mut self, agent: &str, keep_placement: bool) -> usize {
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
    pub(super) fn business_users(&self, bk_biz_id: i64) -> Vec<String> {
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
    pub(super) fn scope_users(&self, scope: &str) -> Vec<String> {
        self.entries("account")
            .iter()
            .filter(|t| strings(t, "scopes").iter().any(|s| s == scope))
            .map(|t| format!("account {}", int(t, "id").unwrap_or_default()))
            .collect()
    }

    /// Nodes under a node, and hosts in it when it is a module.
    pub(super) fn node_users(&self, bk_obj_id: &str, bk_inst_id: i64) -> Vec<String> {
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

    pub(super) fn unlisted(&self) -> Option<Table> {
        match self.doc.get("unlisted_agents")? {
            Item::Table(t) => Some(t.clone()),
            Item::Value(toml_edit::Value::InlineTable(t)) => Some(t.clone().into_table()),
            _ => None,
        }
    }
}

/// An entry other than a host, by its id.
#[derive(Debug, Clone, Copy)]
pub(super) enum Id<'a> {
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

/// "a, b, c and 4 more".
pub(super) fn listing(names: &[String]) -> String {
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
