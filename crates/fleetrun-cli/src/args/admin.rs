//! The inventory's administration commands, as clap reads them: `inventory`, `biz`, `bizset`,
//! `node`, the subcommands of `hosts`, `groups` and `accounts`; and `agents` (revocation).
//!
//! The objects' subcommands (`add`, `update`, `rm`, ...) look alike from one enum to the next,
//! and stay spelled out: each variant's doc comments are the help `--help` prints for that
//! command, in that object's own words (a business's `bk_biz_id`, a set's `bk_biz_set_id`), and
//! what differs between them is exactly those words.

use std::path::PathBuf;

use clap::{ArgGroup, Args, Subcommand, ValueEnum};
use serde_json::Value;

use crate::syntax::{self, Condition, NodeRef};

pub const INVENTORY_EXAMPLES: &str = "\
Examples:
  fleetrun inventory show > inventory.toml          the current document (TOML)
  fleetrun inventory show --revision 7 -O old.toml  an older revision, into a file
  fleetrun inventory history                        who changed what, newest first
  fleetrun inventory apply inventory.toml --expect-revision 8
                                                    replace the document, unless someone
                                                    changed it since revision 8
  fleetrun inventory change changes.json            several changes in one revision
  fleetrun inventory reload                         read the controller's file again
  fleetrun inventory unlisted-agents --biz 2 --module 101
                                                    where agents listed nowhere go

Every change is checked as a whole and becomes the next revision, or changes nothing (exit 3
with the controller's message). The store keeps the latest 100 revisions. Only an app granted
admin may use these commands; so do `biz`, `bizset`, `node`, `groups add|update|rm`,
`accounts add|update|rm` and `hosts add|update|move|rm`, which each make one revision and
print it: \"revision 9: create_node set:12\".";

const CHANGE_HELP: &str = "\
Examples:
  fleetrun inventory change changes.json --expect-revision 7
  echo '[{\"op\": \"delete_node\", \"bk_obj_id\": \"module\", \"bk_inst_id\": 120}]' \\
    | fleetrun inventory change -

The file is JSON: a list of changes, or {\"changes\": [...]} (with \"expected_revision\" if you
like; --expect-revision wins). Each change is an object whose \"op\" names it: create_business,
update_node, move_hosts, create_dynamic_group, ... (docs/api.md lists every op and field).
They are applied in order and committed together, or not at all:
  {\"changes\": [
    {\"op\": \"create_node\", \"bk_obj_id\": \"set\", \"bk_inst_id\": 12, \"name\": \"cache\", \"parent\": \"biz:2\"},
    {\"op\": \"create_node\", \"bk_obj_id\": \"module\", \"bk_inst_id\": 120, \"name\": \"redis\", \"parent\": \"set:12\"},
    {\"op\": \"move_hosts\", \"bk_host_ids\": [3, 4], \"bk_biz_id\": 2, \"modules\": [120]}
  ]}";

const NODE_HELP: &str = "\
Examples:
  fleetrun node add set:12 --name cache --parent biz:2
  fleetrun node add module:120 --name redis --parent set:12 --attr tier=1
  fleetrun node update module:120 --parent set:13           move it (and its hosts)
  fleetrun node update set:12 --attr env=prod --unset-attr owner
  fleetrun node rm module:120                               refused while hosts sit in it

Nodes are TYPE:ID: set:ID, module:ID, or a custom level's TYPE:ID (region:1). Custom levels sit
between a business and its sets, sets under a business or a level, modules under a set.
Attribute values are integers, numbers, true/false or text, as they parse; dynamic groups
match on them. `fleetrun topology` shows the tree.";

const HOSTS_HELP: &str = "\
Examples:
  fleetrun hosts                                  every host (the listing flags above)
  fleetrun hosts move 3,4 --biz 2 --module 120    put agents' hosts in a module
  fleetrun hosts move --agent web-7 --biz 2 --module 100
                                                  place an agent before it registers
  fleetrun hosts move 5 --unassign                back to the unassigned pool
  fleetrun hosts add 1001 --ip 10.0.0.5 --hostname db-9 --biz 2 --module 110 --attr cpu=32
                                                  a host without an agent
  fleetrun hosts update 1001 --attr rack=b2 --unset-attr cpu
  fleetrun hosts rm 1001";

const GROUPS_HELP: &str = "\
Examples:
  fleetrun groups                                 each group with its conditions and hosts
  fleetrun groups add big-web --biz 2 --name 'big web servers' \\
    --where 'module.bk_module_name in nginx,php' --where 'host.cpu range 8..'
  fleetrun run --group big-web -c uptime          every host the group matches now
  fleetrun groups update big-web --where 'set.env = prod'     replaces every condition
  fleetrun groups rm big-web

A condition is OBJECT.FIELD OP VALUE. OBJECT is host, set or module. OP is = (equal),
!= (not equal), ~ (contains), in and not-in (VALUE a comma-separated list), range (VALUE
MIN..MAX, MIN.. or ..MAX). Fields: bk_host_id, bk_cloud_id, bk_host_innerip, bk_host_name,
bk_os_type of a host; bk_set_name, bk_module_name, bk_inst_id of a set or module; any other
field is an attribute. Values are integers, numbers, true/false or text, as they parse.
Conditions are ANDed.";

const ACCOUNTS_HELP: &str = "\
Examples:
  fleetrun accounts                               the accounts usable in the scope (--scope)
  fleetrun accounts add 3 --alias deploy --account deploy --usable-in biz:2,biz_set:9
  fleetrun run --host 1 --as deploy -c whoami
  fleetrun accounts update 3 --usable-in biz:2,biz:3
  fleetrun accounts rm 3";

pub const AGENTS_HELP: &str = "\
Examples:
  fleetrun agents revoke web-7 --reason 'host stolen'
                                  its connection closes now; it is refused until unrevoked,
                                  whatever certificate it presents for that id
  fleetrun hosts rm 7             then forget its host (refused while it is connected)
  fleetrun agents list-revoked    who was revoked, when, by whom and why
  fleetrun agents unrevoke web-7  let it connect again

Revoking and unrevoking are noted in the inventory history (fleetrun inventory history).
Only an app granted admin may use these commands.";

/// Revoking agents.
#[derive(Debug, Subcommand)]
pub enum AgentsCommand {
    /// Revoke an agent: its connections close now and it is refused until unrevoked
    Revoke {
        /// The agent id (its certificate's spiffe://fleetrun/agent/<id>)
        agent_id: String,
        /// Why, for the record
        #[arg(long, value_name = "TEXT")]
        reason: Option<String>,
    },
    /// Let a revoked agent connect again
    Unrevoke {
        /// The agent id
        agent_id: String,
    },
    /// List the revoked agents, oldest revocation first
    ListRevoked,
}

/// `--expect-revision`, on every command that changes the inventory.
#[derive(Debug, Clone, Copy, Default, Args)]
pub struct Expect {
    /// Change nothing unless the inventory is still at revision N (exit 3 otherwise)
    #[arg(long, value_name = "N")]
    pub expect_revision: Option<i64>,
}

/// `--attr` and `--unset-attr`.
#[derive(Debug, Clone, Default, Args)]
pub struct AttrArgs {
    /// Set an attribute (repeatable): an integer, number, true/false or text, as it parses
    #[arg(long = "attr", value_name = "KEY=VALUE", value_parser = syntax::attribute)]
    pub set: Vec<(String, Value)>,
    /// Remove an attribute (repeatable)
    #[arg(long = "unset-attr", value_name = "KEY", value_parser = syntax::attribute_key)]
    pub unset: Vec<String>,
}

#[derive(Debug, Subcommand)]
pub enum InventoryCommand {
    /// Print the inventory document (TOML): the current revision, or an older one
    #[command(
        visible_alias = "export",
        after_help = "\
Examples:
  fleetrun inventory show                         the current document on standard output
  fleetrun inventory show --revision 7 -O inventory-7.toml
  fleetrun inventory show -o json                 revision, source, operator, time and text

The revision, who made it and when go to standard error (not with -q)."
    )]
    Show {
        /// This revision instead of the current one (`inventory history` lists them)
        #[arg(long, value_name = "N")]
        revision: Option<i64>,
        /// Write the document to FILE instead of standard output
        #[arg(long = "out", short = 'O', value_name = "FILE")]
        out: Option<PathBuf>,
    },
    /// Replace the whole inventory with a document (TOML), as a new revision
    #[command(after_help = "\
Examples:
  fleetrun inventory show > inventory.toml && $EDITOR inventory.toml
  fleetrun inventory apply inventory.toml --expect-revision 8
  fleetrun inventory apply - < inventory.toml

Prints \"revision 9 (was 8)\". An invalid document changes nothing: exit 3 with the
controller's message, which names the line. Scripts do not belong in the document.")]
    Apply {
        /// The document (`-` for standard input)
        file: PathBuf,
        #[command(flatten)]
        expect: Expect,
    },
    /// The inventory's revisions, newest first: when, from where, by whom, what
    #[command(after_help = "\
Examples:
  fleetrun inventory history --limit 5
  fleetrun inventory show --revision 7            what the inventory was then")]
    History {
        /// At most this many revisions (1-100)
        #[arg(long, value_name = "N", default_value_t = 20,
              value_parser = clap::value_parser!(i64).range(1..=100))]
        limit: i64,
    },
    /// Apply a list of changes (JSON) together, as one revision
    #[command(after_help = CHANGE_HELP)]
    Change {
        /// The changes (`-` for standard input)
        file: PathBuf,
        #[command(flatten)]
        expect: Expect,
    },
    /// Read the controller's inventory file again (as SIGHUP does): imported when it changed since
    /// it was last imported, or always with --force; an invalid file changes nothing
    #[command(after_help = "\
Examples:
  fleetrun inventory reload          imports the file if it was edited; prints the revision;
                                     exit 3 with the controller's message (naming the line)
                                     when the file is invalid
  fleetrun inventory reload --force  makes the file the truth again, dropping the changes
                                     made since with the API (they stay in the history)")]
    Reload {
        /// Import the file even if it did not change since it was last imported
        #[arg(long)]
        force: bool,
    },
    /// Where agents listed nowhere go: a business and modules, or the unassigned pool
    #[command(
        group(ArgGroup::new("place").required(true).args(["biz", "unassign"])),
        after_help = "\
Examples:
  fleetrun inventory unlisted-agents --biz 2 --module 101
  fleetrun inventory unlisted-agents --unassign    they wait unassigned, never targeted"
    )]
    UnlistedAgents {
        /// The business they join
        #[arg(long, value_name = "ID")]
        biz: Option<i64>,
        /// The modules they join, of that business
        #[arg(
            long = "module",
            value_name = "ID,...",
            value_delimiter = ',',
            requires = "biz"
        )]
        modules: Vec<i64>,
        /// Leave them unassigned
        #[arg(long)]
        unassign: bool,
        /// Attributes they get
        #[arg(long = "attr", value_name = "KEY=VALUE", value_parser = syntax::attribute)]
        attrs: Vec<(String, Value)>,
        #[command(flatten)]
        expect: Expect,
    },
}

#[derive(Debug, Subcommand)]
#[command(after_help = "\
Examples:
  fleetrun biz add 5 --name payments
  fleetrun biz rename 5 'payments (eu)'
  fleetrun biz rm 5               refused while nodes, hosts, groups or sets refer to it")]
pub enum BizCommand {
    /// Create a business
    Add {
        /// Its bk_biz_id
        id: i64,
        /// Its name
        #[arg(long, value_name = "NAME")]
        name: String,
        #[command(flatten)]
        expect: Expect,
    },
    /// Rename a business
    Rename {
        /// Its bk_biz_id
        id: i64,
        /// The new name
        name: String,
        #[command(flatten)]
        expect: Expect,
    },
    /// Remove a business; refused while anything refers to it
    #[command(visible_alias = "remove")]
    Rm {
        /// Its bk_biz_id
        id: i64,
        #[command(flatten)]
        expect: Expect,
    },
}

#[derive(Debug, Subcommand)]
#[command(after_help = "\
Examples:
  fleetrun bizset add 9 --name 'all shops' --members 2,3
  fleetrun bizset update 9 --members 2,3,5        replaces the members
  fleetrun run --scope biz_set:9 --topo set:10 -c uptime
  fleetrun bizset rm 9")]
pub enum BizsetCommand {
    /// Create a business set: a scope covering its member businesses' hosts
    Add {
        /// Its bk_biz_set_id
        id: i64,
        /// Its name
        #[arg(long, value_name = "NAME")]
        name: String,
        /// Its member businesses
        #[arg(long, value_name = "ID,...", value_delimiter = ',')]
        members: Vec<i64>,
        #[command(flatten)]
        expect: Expect,
    },
    /// Rename a business set or replace its members
    #[command(group(ArgGroup::new("what").required(true).multiple(true).args(["name", "members"])))]
    Update {
        /// Its bk_biz_set_id
        id: i64,
        /// The new name
        #[arg(long, value_name = "NAME")]
        name: Option<String>,
        /// The new members (replacing the old ones)
        #[arg(long, value_name = "ID,...", value_delimiter = ',')]
        members: Option<Vec<i64>>,
        #[command(flatten)]
        expect: Expect,
    },
    /// Remove a business set
    #[command(visible_alias = "remove")]
    Rm {
        /// Its bk_biz_set_id
        id: i64,
        #[command(flatten)]
        expect: Expect,
    },
}

#[derive(Debug, Subcommand)]
#[command(after_help = NODE_HELP)]
pub enum NodeCommand {
    /// Create a set, a module or a custom level's node
    Add {
        /// TYPE:ID, e.g. set:12 or module:120
        #[arg(value_name = "TYPE:ID", value_parser = syntax::node)]
        node: NodeRef,
        /// Its name
        #[arg(long, value_name = "NAME")]
        name: String,
        /// Where it sits: biz:ID or TYPE:ID
        #[arg(long, value_name = "TYPE:ID", value_parser = syntax::parent)]
        parent: String,
        /// Set an attribute (repeatable): an integer, number, true/false or text, as it parses
        #[arg(long = "attr", value_name = "KEY=VALUE", value_parser = syntax::attribute)]
        attrs: Vec<(String, Value)>,
        #[command(flatten)]
        expect: Expect,
    },
    /// Rename a node, move it (with what is under it) or change its attributes
    #[command(group(ArgGroup::new("what").required(true).multiple(true)
        .args(["name", "parent", "set", "unset"])))]
    Update {
        /// TYPE:ID, e.g. set:12 or module:120
        #[arg(value_name = "TYPE:ID", value_parser = syntax::node)]
        node: NodeRef,
        /// The new name
        #[arg(long, value_name = "NAME")]
        name: Option<String>,
        /// The new parent: biz:ID or TYPE:ID
        #[arg(long, value_name = "TYPE:ID", value_parser = syntax::parent)]
        parent: Option<String>,
        #[command(flatten)]
        attrs: AttrArgs,
        #[command(flatten)]
        expect: Expect,
    },
    /// Remove a node; refused while nodes or hosts sit under it
    #[command(visible_alias = "remove")]
    Rm {
        /// TYPE:ID, e.g. set:12 or module:120
        #[arg(value_name = "TYPE:ID", value_parser = syntax::node)]
        node: NodeRef,
        #[command(flatten)]
        expect: Expect,
    },
}

/// `fleetrun hosts`: the listing, unless a subcommand is given.
#[derive(Debug, Args)]
#[command(args_conflicts_with_subcommands = true, after_help = HOSTS_HELP)]
pub struct HostsArgs {
    #[command(subcommand)]
    pub command: Option<HostsCommand>,
    /// Only hosts whose agent is connected
    #[arg(long, conflicts_with = "offline")]
    pub online: bool,
    /// Only hosts whose agent is not connected
    #[arg(long)]
    pub offline: bool,
    /// Only hosts of this business
    #[arg(long, value_name = "ID")]
    pub biz: Option<i64>,
}

/// What the inventory says of a host without an agent (an agent reports its own).
#[derive(Debug, Clone, Default, Args)]
pub struct HostIdentity {
    /// Its cloud area (bk_cloud_id)
    #[arg(long, value_name = "ID")]
    pub cloud: Option<i64>,
    /// Its hostname
    #[arg(long, value_name = "NAME")]
    pub hostname: Option<String>,
    /// Its OS: linux, windows, ...
    #[arg(long, value_name = "OS")]
    pub os: Option<String>,
}

#[derive(Debug, Subcommand)]
pub enum HostsCommand {
    /// Add a host without an agent (listed and targetable; no agent runs its jobs)
    Add {
        /// Its bk_host_id
        id: i64,
        /// Its addresses, the primary one first
        #[arg(long = "ip", value_name = "IP,...", value_delimiter = ',', required = true,
              value_parser = syntax::ip)]
        ips: Vec<String>,
        #[command(flatten)]
        identity: HostIdentity,
        /// The business it belongs to (none: the unassigned pool)
        #[arg(long, value_name = "ID")]
        biz: Option<i64>,
        /// Its modules, of that business
        #[arg(
            long = "module",
            value_name = "ID,...",
            value_delimiter = ',',
            requires = "biz"
        )]
        modules: Vec<i64>,
        /// Set an attribute (repeatable): an integer, number, true/false or text, as it parses
        #[arg(long = "attr", value_name = "KEY=VALUE", value_parser = syntax::attribute)]
        attrs: Vec<(String, Value)>,
        #[command(flatten)]
        expect: Expect,
    },
    /// Change a host's attributes, or the identity of a host without an agent
    #[command(group(ArgGroup::new("what").required(true).multiple(true)
        .args(["ips", "cloud", "hostname", "os", "set", "unset"])))]
    Update {
        /// Its bk_host_id
        id: i64,
        /// Its addresses, the primary one first
        #[arg(long = "ip", value_name = "IP,...", value_delimiter = ',', value_parser = syntax::ip)]
        ips: Option<Vec<String>>,
        #[command(flatten)]
        identity: HostIdentity,
        #[command(flatten)]
        attrs: AttrArgs,
        #[command(flatten)]
        expect: Expect,
    },
    /// Put hosts in a business and modules, or back in the unassigned pool
    #[command(
        group(ArgGroup::new("which").required(true).multiple(true).args(["hosts", "agents"])),
        group(ArgGroup::new("place").required(true).args(["biz", "unassign"]))
    )]
    Move {
        /// The hosts, by bk_host_id
        #[arg(value_name = "ID,...", value_delimiter = ',')]
        hosts: Vec<i64>,
        /// Agents by id, registered or not yet
        #[arg(long = "agent", value_name = "NAME,...", value_delimiter = ',')]
        agents: Vec<String>,
        /// The business they go to
        #[arg(long, value_name = "ID")]
        biz: Option<i64>,
        /// Their modules, of that business
        #[arg(
            long = "module",
            value_name = "ID,...",
            value_delimiter = ',',
            requires = "biz"
        )]
        modules: Vec<i64>,
        /// Take them out of their business: unassigned hosts are never targets
        #[arg(long)]
        unassign: bool,
        #[command(flatten)]
        expect: Expect,
    },
    /// Remove a host; an agent's host is forgotten (refused while its agent is connected)
    #[command(visible_alias = "remove")]
    Rm {
        /// Its bk_host_id
        id: i64,
        #[command(flatten)]
        expect: Expect,
    },
}

/// What a dynamic group returns.
#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
pub enum GroupObject {
    Host,
    Set,
    Module,
}

impl GroupObject {
    pub fn name(self) -> &'static str {
        match self {
            Self::Host => "host",
            Self::Set => "set",
            Self::Module => "module",
        }
    }
}

/// `fleetrun groups`: the list, unless a subcommand is given.
#[derive(Debug, Args)]
#[command(args_conflicts_with_subcommands = true, after_help = GROUPS_HELP)]
pub struct GroupsArgs {
    #[command(subcommand)]
    pub command: Option<GroupsCommand>,
    /// Only groups of this business
    #[arg(long, value_name = "ID")]
    pub biz: Option<i64>,
}

#[derive(Debug, Subcommand)]
pub enum GroupsCommand {
    /// Save a host query as a dynamic group of a business
    #[command(after_help = GROUPS_HELP)]
    Add {
        /// The group's id, e.g. big-web
        id: String,
        /// The business whose hosts it matches
        #[arg(long, value_name = "ID")]
        biz: i64,
        /// Its name
        #[arg(long, value_name = "NAME")]
        name: String,
        /// A condition (repeatable; all must hold): OBJECT.FIELD OP VALUE
        #[arg(long = "where", value_name = "COND", value_parser = syntax::condition)]
        conditions: Vec<Condition>,
        /// What it returns (default host)
        #[arg(long, value_enum, value_name = "OBJECT")]
        object: Option<GroupObject>,
        #[command(flatten)]
        expect: Expect,
    },
    /// Rename a group, move it to another business, or replace its conditions
    #[command(
        group(ArgGroup::new("what").required(true).multiple(true)
            .args(["biz", "name", "conditions", "object"])),
        after_help = GROUPS_HELP
    )]
    Update {
        /// The group's id
        id: String,
        /// The business whose hosts it matches
        #[arg(long, value_name = "ID")]
        biz: Option<i64>,
        /// Its name
        #[arg(long, value_name = "NAME")]
        name: Option<String>,
        /// The conditions (repeatable), replacing every old one: OBJECT.FIELD OP VALUE
        #[arg(long = "where", value_name = "COND", value_parser = syntax::condition)]
        conditions: Vec<Condition>,
        /// What it returns
        #[arg(long, value_enum, value_name = "OBJECT")]
        object: Option<GroupObject>,
        #[command(flatten)]
        expect: Expect,
    },
    /// Remove a dynamic group
    #[command(visible_alias = "remove")]
    Rm {
        /// The group's id
        id: String,
        #[command(flatten)]
        expect: Expect,
    },
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
pub enum Category {
    System,
    Database,
}

impl Category {
    pub fn name(self) -> &'static str {
        match self {
            Self::System => "system",
            Self::Database => "database",
        }
    }
}

/// `fleetrun accounts`: the list, unless a subcommand is given.
#[derive(Debug, Args)]
#[command(args_conflicts_with_subcommands = true, after_help = ACCOUNTS_HELP)]
pub struct AccountsArgs {
    #[command(subcommand)]
    pub command: Option<AccountsCommand>,
}

#[derive(Debug, Subcommand)]
pub enum AccountsCommand {
    /// Add an OS account scripts may run as (`run --as ALIAS`)
    Add {
        /// Its id (account_id)
        id: i64,
        /// The alias jobs name it by
        #[arg(long, value_name = "ALIAS")]
        alias: String,
        /// The OS user
        #[arg(long, value_name = "USER")]
        account: String,
        /// linux (the default), windows, ...
        #[arg(long, value_name = "OS")]
        os: Option<String>,
        /// system (the default) or database
        #[arg(long, value_enum, value_name = "CATEGORY")]
        category: Option<Category>,
        /// The scopes whose jobs may run as it (an account listing none is usable nowhere)
        #[arg(long, value_name = "TYPE:ID,...", value_delimiter = ',', value_parser = syntax::scope,
              required = true)]
        usable_in: Vec<String>,
        #[command(flatten)]
        expect: Expect,
    },
    /// Change an account
    #[command(group(ArgGroup::new("what").required(true).multiple(true)
        .args(["alias", "account", "os", "category", "usable_in"])))]
    Update {
        /// Its id (account_id)
        id: i64,
        /// The alias jobs name it by
        #[arg(long, value_name = "ALIAS")]
        alias: Option<String>,
        /// The OS user
        #[arg(long, value_name = "USER")]
        account: Option<String>,
        /// linux, windows, ...
        #[arg(long, value_name = "OS")]
        os: Option<String>,
        /// system or database
        #[arg(long, value_enum, value_name = "CATEGORY")]
        category: Option<Category>,
        /// The scopes whose jobs may run as it (replacing the old list)
        #[arg(long, value_name = "TYPE:ID,...", value_delimiter = ',', value_parser = syntax::scope)]
        usable_in: Option<Vec<String>>,
        #[command(flatten)]
        expect: Expect,
    },
    /// Remove an account
    #[command(visible_alias = "remove")]
    Rm {
        /// Its id (account_id)
        id: i64,
        #[command(flatten)]
        expect: Expect,
    },
}
