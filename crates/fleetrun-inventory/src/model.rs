//! The things an inventory holds, as CMDB and bk-job name them. None of these derive serde: the
//! file types in [`crate::file`] are the only serialized form.

use std::{collections::BTreeMap, fmt, net::IpAddr, str::FromStr};

/// A business (CMDB `bk_biz_id`): the usual scope of a job.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Business {
    pub bk_biz_id: i64,
    pub name: String,
}

/// A business set: a scope covering the hosts of all its member businesses.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct BusinessSet {
    pub bk_biz_set_id: i64,
    pub name: String,
    /// Member business ids.
    pub members: Vec<i64>,
}

/// Where a request acts (`bk_scope_type` + `bk_scope_id`). Written `biz:<id>` or `biz_set:<id>`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum Scope {
    Biz(i64),
    BizSet(i64),
}

impl fmt::Display for Scope {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Scope::Biz(id) => write!(f, "biz:{id}"),
            Scope::BizSet(id) => write!(f, "biz_set:{id}"),
        }
    }
}

/// Text that is not `biz:<id>` or `biz_set:<id>`.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("expected \"biz:<id>\" or \"biz_set:<id>\"")]
pub struct ScopeSyntaxError;

impl FromStr for Scope {
    type Err = ScopeSyntaxError;

    fn from_str(text: &str) -> Result<Self, Self::Err> {
        let (kind, id) = text.split_once(':').ok_or(ScopeSyntaxError)?;
        let id = id.parse().map_err(|_| ScopeSyntaxError)?;
        match kind {
            "biz" => Ok(Scope::Biz(id)),
            "biz_set" => Ok(Scope::BizSet(id)),
            _ => Err(ScopeSyntaxError),
        }
    }
}

/// The object id of the business in a topology path (`biz:<id>`).
pub const BIZ: &str = "biz";
/// The object id of sets.
pub const SET: &str = "set";
/// The object id of modules: the leaves hosts sit in.
pub const MODULE: &str = "module";

/// One instance in a business's topology: a set, a module, or a node of a custom level that sits
/// between the business and its sets.
#[derive(Debug, Clone, PartialEq)]
pub struct TopoNode {
    /// `"set"`, `"module"`, or the custom level's object id (e.g. `"region"`).
    pub bk_obj_id: String,
    /// Unique among the nodes with the same `bk_obj_id`.
    pub bk_inst_id: i64,
    pub name: String,
    pub parent: Parent,
    /// Extra fields that dynamic group conditions may test.
    pub attributes: BTreeMap<String, Value>,
}

impl TopoNode {
    pub fn is_module(&self) -> bool {
        self.bk_obj_id == MODULE
    }

    pub fn is_set(&self) -> bool {
        self.bk_obj_id == SET
    }
}

/// What a topology node sits under.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub enum Parent {
    /// Directly under the business.
    Business(i64),
    /// Under another node (a custom level or, for modules, a set).
    Node { bk_obj_id: String, bk_inst_id: i64 },
}

impl fmt::Display for Parent {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Parent::Business(id) => write!(f, "{BIZ}:{id}"),
            Parent::Node {
                bk_obj_id,
                bk_inst_id,
            } => write!(f, "{bk_obj_id}:{bk_inst_id}"),
        }
    }
}

/// A machine jobs run on.
#[derive(Debug, Clone, PartialEq)]
pub struct Host {
    pub bk_host_id: i64,
    /// Cloud area: addresses are unique within one.
    pub bk_cloud_id: i64,
    /// Inner addresses; the first is the primary one, reported in job results.
    pub ips: Vec<IpAddr>,
    pub hostname: String,
    /// `"linux"`, `"windows"`, ... as the agent reports it.
    pub os_type: String,
    /// The agent serving this host, when it came from an agent registration.
    pub agent_id: Option<String>,
    /// `None`: the unassigned pool. Such a host is visible but never a job target.
    pub bk_biz_id: Option<i64>,
    /// The modules (`bk_inst_id`s) the host sits in, all in its business.
    pub modules: Vec<i64>,
    /// Extra fields that dynamic group conditions may test.
    pub attributes: BTreeMap<String, Value>,
}

impl Host {
    /// The address the host is reported by.
    pub fn primary_ip(&self) -> Option<IpAddr> {
        self.ips.first().copied()
    }
}

/// The value of an extra field, or what a condition compares it with.
#[derive(Debug, Clone, PartialEq)]
pub enum Value {
    Text(String),
    Integer(i64),
    Float(f64),
    Bool(bool),
}

impl Value {
    /// The value as a number, for numeric comparison and ranges.
    pub fn as_number(&self) -> Option<f64> {
        match self {
            Value::Integer(n) => Some(*n as f64),
            Value::Float(x) => Some(*x),
            Value::Text(_) | Value::Bool(_) => None,
        }
    }
}

impl fmt::Display for Value {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Value::Text(s) => write!(f, "{s:?}"),
            Value::Integer(n) => write!(f, "{n}"),
            Value::Float(x) => write!(f, "{x}"),
            Value::Bool(b) => write!(f, "{b}"),
        }
    }
}

impl From<&str> for Value {
    fn from(s: &str) -> Self {
        Value::Text(s.to_owned())
    }
}

impl From<i64> for Value {
    fn from(n: i64) -> Self {
        Value::Integer(n)
    }
}

/// bk-job account categories.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum AccountCategory {
    /// An OS user scripts run as (bk-job category 1).
    System,
    /// A database account (bk-job category 2); never used to run scripts.
    Database,
}

/// An execution account: the OS user a job's script runs as, under an alias jobs name.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Account {
    pub id: i64,
    pub alias: String,
    /// The OS user name on the hosts.
    pub account: String,
    /// `"linux"` or `"windows"`.
    pub os_type: String,
    pub category: AccountCategory,
    /// Scopes that may use the account; none means no scope may (an account belongs to the
    /// businesses that use it, as in bk-job).
    pub scopes: Vec<Scope>,
    pub description: String,
    /// Who created and last changed the account, when the document records it (accounts made
    /// through bk-job's account APIs do).
    pub record: AccountRecord,
}

/// Who created and last changed an account, and when (Unix milliseconds).
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct AccountRecord {
    pub creator: Option<String>,
    pub create_time: Option<i64>,
    pub last_modify_user: Option<String>,
    pub last_modify_time: Option<i64>,
}

impl Account {
    /// Whether a job in `scope` may run as this account. Scopes match exactly: an account allowed
    /// in a business set is not thereby allowed in its member businesses.
    pub fn allowed_in(&self, scope: &Scope) -> bool {
        self.scopes.contains(scope)
    }
}
