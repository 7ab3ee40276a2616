//! What a change says, as its JSON is read: the [`Change`] variants and the values they carry.

use std::{collections::BTreeMap, net::IpAddr};

use serde::Deserialize;

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

/// For fields where absent and `null` differ: present (even as `null`) is `Some`.
fn present<'de, D, T>(deserializer: D) -> Result<Option<T>, D::Error>
where
    D: serde::Deserializer<'de>,
    T: Deserialize<'de>,
{
    T::deserialize(deserializer).map(Some)
}
