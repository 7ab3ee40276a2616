//! What can be wrong with the parts of an inventory, and where: the entry and field a problem
//! is about, so that the inventory file can point at its line.

use std::fmt;

use crate::model::Parent;

/// The parts of an inventory do not fit together.
#[derive(Debug, Clone, PartialEq, thiserror::Error)]
#[error("{at}: {problem}")]
pub struct InventoryError {
    /// The entry the problem is about.
    pub at: Location,
    pub problem: Problem,
}

/// What is wrong with an entry.
#[derive(Debug, Clone, PartialEq, thiserror::Error)]
pub enum Problem {
    /// Two businesses share an id.
    #[error("business {0} is defined twice")]
    DuplicateBusiness(i64),
    /// Two business sets share an id.
    #[error("business set {0} is defined twice")]
    DuplicateBusinessSet(i64),
    /// A reference to a business that is not defined.
    #[error("business {0} does not exist")]
    UnknownBusiness(i64),
    /// A reference to a business set that is not defined.
    #[error("business set {0} does not exist")]
    UnknownBusinessSet(i64),
    /// A business set lists a member twice.
    #[error("business {0} is listed twice")]
    RepeatedMember(i64),
    /// Two topology nodes share an object and instance id.
    #[error("{0} is defined twice")]
    DuplicateNode(String),
    /// A custom level's object id is empty, reserved (`biz`, `host`) or not `[a-z0-9_]`.
    #[error("{0:?} cannot name a topology level")]
    BadObjectId(String),
    /// A node's parent is not defined.
    #[error("parent {0} does not exist")]
    UnknownParent(Parent),
    /// A node sits where CMDB does not allow it (modules only under sets, sets and custom levels
    /// only under the business or a custom level, nothing under a module).
    #[error("a {child} cannot sit under {parent}")]
    Misplaced { child: String, parent: String },
    /// Custom levels that are each other's ancestors.
    #[error("{0} sits under itself")]
    Cycle(String),
    /// Two hosts share an id.
    #[error("host {0} is defined twice")]
    DuplicateHost(i64),
    /// Two hosts or placements name the same agent.
    #[error("agent {0:?} is placed twice")]
    DuplicateAgent(String),
    /// A host without any inner address.
    #[error("host has no address")]
    NoAddress,
    /// A reference to a module that is not defined.
    #[error("module {0} does not exist")]
    UnknownModule(i64),
    /// A host placed in a module of another business.
    #[error("module {module} belongs to business {owner}, not {bk_biz_id}")]
    ForeignModule {
        module: i64,
        owner: i64,
        bk_biz_id: i64,
    },
    /// Unassigned hosts sit in no module.
    #[error("a host without a business cannot sit in modules")]
    ModulesWithoutBusiness,
    /// A host lists a module twice.
    #[error("module {0} is listed twice")]
    RepeatedModule(i64),
    /// An attribute named like a built-in field, which conditions could not reach.
    #[error("attribute {0:?} would hide the built-in field of that name")]
    ReservedAttribute(String),
    /// An empty id where one is required.
    #[error("id must not be empty")]
    EmptyId,
    /// Two dynamic groups share an id.
    #[error("dynamic group {0:?} is defined twice")]
    DuplicateGroup(String),
    /// A range condition without bounds.
    #[error("a range needs a min, a max or both")]
    EmptyRange,
    /// A range condition whose min is above its max.
    #[error("range min {min} is above max {max}")]
    InvertedRange { min: f64, max: f64 },
    /// Two accounts share an id.
    #[error("account {0} is defined twice")]
    DuplicateAccount(i64),
    /// Two accounts of one category share an alias in a scope both are allowed in.
    #[error("alias {alias:?} is already used by account {other} in an overlapping scope")]
    DuplicateAlias { alias: String, other: i64 },
}

/// An entry of [`InventoryParts`](crate::InventoryParts) and the field of it a problem is about.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub struct Location {
    pub item: Item,
    /// Position in the part's list (0 for `unlisted_agents`).
    pub index: usize,
    pub field: Field,
}

/// The lists of [`InventoryParts`](crate::InventoryParts).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Item {
    Business,
    BusinessSet,
    TopoNode,
    Host,
    AgentPlacement,
    UnlistedAgents,
    DynamicGroup,
    Account,
}

/// The field of an entry; list fields carry the position in the list.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub enum Field {
    Id,
    ObjectId,
    Parent,
    Business,
    Member(usize),
    Module(usize),
    Address,
    Agent,
    Attribute(String),
    Condition(usize),
    Alias,
    Scope(usize),
}

impl fmt::Display for Location {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let item = match self.item {
            Item::Business => "business",
            Item::BusinessSet => "business set",
            Item::TopoNode => "topology node",
            Item::Host => "host",
            Item::AgentPlacement => "agent placement",
            Item::UnlistedAgents => return f.write_str("unlisted agents"),
            Item::DynamicGroup => "dynamic group",
            Item::Account => "account",
        };
        write!(f, "{item} #{}", self.index + 1)
    }
}
