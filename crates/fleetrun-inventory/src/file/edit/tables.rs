//! Reading and writing the TOML values of entries.

use std::net::IpAddr;

use toml_edit::{Item, Table, value};

use super::{AttributeChanges, Scalar};

pub(super) fn set_placement(t: &mut Table, bk_biz_id: Option<i64>, modules: &[i64]) {
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
pub(super) fn put(t: &mut Table, key: &str, v: Option<impl Into<toml_edit::Value>>) {
    if let Some(v) = v {
        t[key] = value(v);
    }
}

pub(super) fn merge_attributes(t: &mut Table, changes: &AttributeChanges) {
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

pub(super) fn scalar(v: &Scalar) -> toml_edit::Value {
    match v {
        Scalar::Bool(b) => (*b).into(),
        Scalar::Integer(n) => (*n).into(),
        Scalar::Float(x) => (*x).into(),
        Scalar::Text(s) => s.as_str().into(),
    }
}

pub(super) fn int_array(values: &[i64]) -> toml_edit::Array {
    values.iter().copied().collect()
}

pub(super) fn str_array(values: &[String]) -> toml_edit::Array {
    values.iter().map(String::as_str).collect()
}

pub(super) fn ip_array(ips: &[IpAddr]) -> toml_edit::Array {
    ips.iter().map(|ip| ip.to_string()).collect()
}

pub(super) fn int(t: &Table, key: &str) -> Option<i64> {
    t.get(key)?.as_integer()
}

pub(super) fn text<'a>(t: &'a Table, key: &str) -> Option<&'a str> {
    t.get(key)?.as_str()
}

pub(super) fn ints(t: &Table, key: &str) -> Vec<i64> {
    t.get(key)
        .and_then(Item::as_array)
        .map(|a| a.iter().filter_map(toml_edit::Value::as_integer).collect())
        .unwrap_or_default()
}

pub(super) fn strings(t: &Table, key: &str) -> Vec<String> {
    t.get(key)
        .and_then(Item::as_array)
        .map(|a| {
            a.iter()
                .filter_map(|v| v.as_str().map(str::to_owned))
                .collect()
        })
        .unwrap_or_default()
}

pub(super) fn node_name(key: &str, t: &Table) -> String {
    let obj = if key == "level" {
        text(t, "bk_obj_id").unwrap_or("level")
    } else {
        key
    };
    format!("{obj}:{}", int(t, "bk_inst_id").unwrap_or_default())
}

pub(super) fn host_name(t: &Table) -> String {
    match (int(t, "bk_host_id"), text(t, "agent_id")) {
        (Some(id), _) => format!("host {id}"),
        (None, Some(agent)) => format!("agent {agent:?}'s host"),
        (None, None) => "a host".to_owned(),
    }
}
