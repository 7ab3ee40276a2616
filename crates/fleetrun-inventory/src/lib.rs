//! The fleetrun inventory: what bk-job asks CMDB about, carried by fleetrun itself.
//!
//! An [`Inventory`] holds businesses and business sets, each business's topology (custom levels,
//! sets, modules), the hosts in it, dynamic groups (saved host queries) and execution accounts.
//! Scripts live in the controller's store: a file that declares some is refused. It is built once
//! from [`InventoryParts`] or from the declarative file ([`Inventory::from_toml`], format shown in
//! `examples/inventory.toml`), checked as a whole, and indexed so that the questions a job asks
//! are cheap:
//! - [`Inventory::resolve`]: which hosts a `target_server` stands for in a scope;
//! - [`Inventory::account_for`]: which account the job runs as.
//!
//! Errors carry bk-job's error code in a `code()` method for the HTTP layer to report.
//!
//! # Hosts from agents
//! The controller merges its registered agents with [`Inventory::with_agents`] (or asks about one
//! with [`Inventory::place_agent`]). The rule:
//! - the agent reports its host's identity: cloud area, addresses, hostname, OS (the controller
//!   checks the address against what the agent cannot forge); the controller gives the host its
//!   id when the agent registers;
//! - the file is the authority on placement: a `[[host]]` entry keyed by `agent_id` gives the
//!   business, modules and attributes; it may pin the agent's address (`ips`, with
//!   `bk_cloud_id`), which then wins over the agent's report, but gives no other identity field;
//! - an agent the file does not list lands where `[unlisted_agents]` says, by default in the
//!   unassigned pool (visible, never a target);
//! - a `[[host]]` entry with a `bk_host_id` is a host of the file (e.g. one whose agent is not
//!   installed yet): it names no agent, and an agent whose controller-given id collides with it
//!   is refused ([`AgentRefusal::HostIdTaken`]).
//!
//! **Architecture Invariant:** this crate does no I/O beyond parsing text it is given, reads no
//! clock and knows nothing of tokio or SQL.

#![forbid(unsafe_code)]

mod account;
mod agents;
mod file;
mod group;
mod hosts;
mod inventory;
mod model;
mod problem;
mod resolve;
mod topology;
mod validate;

pub use account::AccountError;
pub use agents::{
    AgentHost, AgentPlacement, AgentRefusal, Merged, PinnedAddress, PlacedHost, Placement,
    RefusedAgent,
};
pub use file::{
    AgentHosts, AttributeChanges, Change, ChangeError, ConditionSpec, ConditionValue,
    InventoryDocument, InventoryFileError, Scalar,
};
pub use group::{Condition, DynamicGroup, ObjectKind, Op, builtin_fields};
pub use hosts::AddressConflict;
pub use inventory::{Inventory, InventoryParts};
pub use model::{
    Account, AccountCategory, AccountRecord, BIZ, Business, BusinessSet, Host, MODULE, Parent, SET,
    Scope, ScopeSyntaxError, TopoNode, Value,
};
pub use problem::{Field, InventoryError, Item, Location, Problem};
pub use resolve::{MAX_TARGET_HOSTS, ResolveError, Resolved, ResolvedHost, Targets, Via};
