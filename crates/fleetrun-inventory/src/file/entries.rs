//! The inventory file as serde reads it. Ids and references are `Spanned` so that a problem
//! found later, when the parts are checked as a whole, can still name its line.

use std::{collections::BTreeMap, fmt, net::IpAddr};

use serde::{
    Deserialize, Deserializer,
    de::{self, SeqAccess, Visitor},
};
use toml::Spanned;

use crate::model::Value;

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub(super) struct InventoryFile {
    #[serde(default)]
    pub business: Vec<BusinessEntry>,
    #[serde(default)]
    pub business_set: Vec<BusinessSetEntry>,
    #[serde(default)]
    pub level: Vec<LevelEntry>,
    #[serde(default)]
    pub set: Vec<NodeEntry>,
    #[serde(default)]
    pub module: Vec<NodeEntry>,
    #[serde(default)]
    pub host: Vec<Spanned<HostEntry>>,
    pub unlisted_agents: Option<Spanned<PlacementEntry>>,
    #[serde(default)]
    pub dynamic_group: Vec<GroupEntry>,
    #[serde(default)]
    pub account: Vec<AccountEntry>,
    /// Only read to refuse it: scripts live in the controller's store, not in this file.
    #[serde(default)]
    pub script: Vec<Spanned<de::IgnoredAny>>,
}

pub(super) type Attributes = BTreeMap<Spanned<String>, ScalarValue>;

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub(super) struct BusinessEntry {
    pub bk_biz_id: Spanned<i64>,
    pub name: String,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub(super) struct BusinessSetEntry {
    pub bk_biz_set_id: Spanned<i64>,
    pub name: String,
    #[serde(default)]
    pub members: Vec<Spanned<i64>>,
}

/// A node of a custom level.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub(super) struct LevelEntry {
    pub bk_obj_id: Spanned<String>,
    pub bk_inst_id: Spanned<i64>,
    pub name: String,
    /// `"biz:<id>"` or `"<object>:<id>"`.
    pub parent: Spanned<String>,
    #[serde(default)]
    pub attributes: Attributes,
}

/// A set or a module.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub(super) struct NodeEntry {
    pub bk_inst_id: Spanned<i64>,
    pub name: String,
    /// `"biz:<id>"` or `"<object>:<id>"`.
    pub parent: Spanned<String>,
    #[serde(default)]
    pub attributes: Attributes,
}

/// A host of the file (`bk_host_id`) or the placement of an agent's host (`agent_id`).
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub(super) struct HostEntry {
    pub bk_host_id: Option<Spanned<i64>>,
    pub agent_id: Option<Spanned<String>>,
    pub bk_cloud_id: Option<Spanned<i64>>,
    pub ips: Option<Spanned<Vec<IpAddr>>>,
    pub hostname: Option<Spanned<String>>,
    pub os_type: Option<Spanned<String>>,
    pub bk_biz_id: Option<Spanned<i64>>,
    #[serde(default)]
    pub modules: Vec<Spanned<i64>>,
    #[serde(default)]
    pub attributes: Attributes,
}

/// Where unlisted agents' hosts go.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub(super) struct PlacementEntry {
    pub bk_biz_id: Option<Spanned<i64>>,
    #[serde(default)]
    pub modules: Vec<Spanned<i64>>,
    #[serde(default)]
    pub attributes: Attributes,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub(super) struct GroupEntry {
    pub id: Spanned<String>,
    pub bk_biz_id: Spanned<i64>,
    pub name: String,
    #[serde(default = "host_object")]
    pub object: ObjectName,
    #[serde(default)]
    pub condition: Vec<ConditionEntry>,
}

fn host_object() -> ObjectName {
    ObjectName::Host
}

#[derive(Debug, Clone, Copy, Deserialize)]
#[serde(rename_all = "snake_case")]
pub(super) enum ObjectName {
    Host,
    Set,
    Module,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub(super) struct ConditionEntry {
    pub object: ObjectName,
    pub field: Spanned<String>,
    pub op: Spanned<OpName>,
    pub value: Option<Spanned<ConditionValue>>,
    pub min: Option<f64>,
    pub max: Option<f64>,
}

/// Operators by name, or by CMDB's query operators.
#[derive(Debug, Clone, Copy, Deserialize)]
#[serde(rename_all = "snake_case")]
pub(super) enum OpName {
    #[serde(alias = "$eq")]
    Equal,
    #[serde(alias = "$ne")]
    NotEqual,
    #[serde(alias = "$in")]
    In,
    #[serde(alias = "$nin")]
    NotIn,
    Contains,
    Range,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub(super) struct AccountEntry {
    pub id: Spanned<i64>,
    pub alias: Spanned<String>,
    pub account: String,
    #[serde(default = "linux")]
    pub os_type: String,
    #[serde(default)]
    pub category: CategoryName,
    #[serde(default)]
    pub scopes: Vec<Spanned<String>>,
    #[serde(default)]
    pub description: String,
    #[serde(default)]
    pub creator: Option<String>,
    #[serde(default)]
    pub create_time: Option<i64>,
    #[serde(default)]
    pub last_modify_user: Option<String>,
    #[serde(default)]
    pub last_modify_time: Option<i64>,
}

fn linux() -> String {
    "linux".to_owned()
}

#[derive(Debug, Clone, Copy, Default, Deserialize)]
#[serde(rename_all = "snake_case")]
pub(super) enum CategoryName {
    #[default]
    System,
    Database,
}

/// A string, number or boolean.
#[derive(Debug)]
pub(super) struct ScalarValue(pub Value);

/// A condition's value: one scalar, or a list of them.
#[derive(Debug)]
pub(super) enum ConditionValue {
    One(Value),
    Many(Vec<Value>),
}

struct ValueVisitor;

impl<'de> Visitor<'de> for ValueVisitor {
    type Value = ConditionValue;

    fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("a string, number or boolean")
    }

    fn visit_bool<E: de::Error>(self, v: bool) -> Result<Self::Value, E> {
        Ok(ConditionValue::One(Value::Bool(v)))
    }

    fn visit_i64<E: de::Error>(self, v: i64) -> Result<Self::Value, E> {
        Ok(ConditionValue::One(Value::Integer(v)))
    }

    fn visit_u64<E: de::Error>(self, v: u64) -> Result<Self::Value, E> {
        i64::try_from(v)
            .map(|v| ConditionValue::One(Value::Integer(v)))
            .map_err(|_| E::custom("integer out of range"))
    }

    fn visit_f64<E: de::Error>(self, v: f64) -> Result<Self::Value, E> {
        Ok(ConditionValue::One(Value::Float(v)))
    }

    fn visit_str<E: de::Error>(self, v: &str) -> Result<Self::Value, E> {
        Ok(ConditionValue::One(Value::Text(v.to_owned())))
    }

    fn visit_seq<A: SeqAccess<'de>>(self, mut seq: A) -> Result<Self::Value, A::Error> {
        let mut values = Vec::new();
        while let Some(ScalarValue(value)) = seq.next_element()? {
            values.push(value);
        }
        Ok(ConditionValue::Many(values))
    }
}

impl<'de> Deserialize<'de> for ConditionValue {
    fn deserialize<D: Deserializer<'de>>(deserializer: D) -> Result<Self, D::Error> {
        deserializer.deserialize_any(ValueVisitor)
    }
}

impl<'de> Deserialize<'de> for ScalarValue {
    fn deserialize<D: Deserializer<'de>>(deserializer: D) -> Result<Self, D::Error> {
        match deserializer.deserialize_any(ValueVisitor)? {
            ConditionValue::One(value) => Ok(ScalarValue(value)),
            ConditionValue::Many(_) => Err(de::Error::custom(
                "expected a string, number or boolean, not a list",
            )),
        }
    }
}
