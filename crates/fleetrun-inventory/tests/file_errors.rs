//! The inventory file's errors name the line and column of what they are about.

use fleetrun_inventory::{
    Business, Field, Host, Inventory, InventoryParts, Item, Location, Problem,
};

/// A small valid base the cases append to (lines 1 to 17).
const BASE: &str = r#"[[business]]
bk_biz_id = 2
name = "shop"

[[business]]
bk_biz_id = 3
name = "payments"

[[set]]
bk_inst_id = 10
name = "web"
parent = "biz:2"

[[module]]
bk_inst_id = 100
name = "nginx"
parent = "set:10"
"#;

#[test]
fn base_is_valid() {
    Inventory::from_toml(BASE).unwrap();
}

#[test]
fn errors_name_their_line() {
    for (case, extra, expected) in CASES {
        let text = format!("{BASE}{extra}");
        let error = Inventory::from_toml(&text)
            .err()
            .unwrap_or_else(|| panic!("{case}: the file should be refused"));
        assert_eq!(error.to_string(), *expected, "{case}");
        assert!(
            expected.starts_with(&format!(
                "line {}, column {}: ",
                error.line(),
                error.column()
            )),
            "{case}"
        );
    }
}

#[test]
fn parts_errors_name_the_entry() {
    let host = |id, modules: Vec<i64>| Host {
        bk_host_id: id,
        bk_cloud_id: 0,
        ips: vec!["10.0.0.1".parse().unwrap()],
        hostname: String::new(),
        os_type: "linux".into(),
        agent_id: None,
        bk_biz_id: Some(1),
        modules,
        attributes: Default::default(),
    };
    let parts = InventoryParts {
        businesses: vec![Business {
            bk_biz_id: 1,
            name: "shop".into(),
        }],
        hosts: vec![host(1, vec![]), host(2, vec![7])],
        ..InventoryParts::default()
    };
    let error = Inventory::build(parts).unwrap_err();
    assert_eq!(
        error.at,
        Location {
            item: Item::Host,
            index: 1,
            field: Field::Module(0),
        }
    );
    assert_eq!(error.problem, Problem::UnknownModule(7));
    assert_eq!(error.to_string(), "host #2: module 7 does not exist");
}

/// (what is wrong, text appended to `BASE` from line 18 on, the error).
///
/// Each case spells out its whole entry, even where cases share their first lines: the line and
/// column in the expected message are the ones an operator reads in the file as written, and a
/// case built from shared fragments would hide which line the error must name.
const CASES: &[(&str, &str, &str)] = &[
    (
        "TOML syntax",
        r#"
[[host]
"#,
        "line 19, column 8: unclosed array table, expected `]`",
    ),
    (
        "unknown field",
        r#"
[[host]]
bk_host_id = 1
ip = ["10.0.0.1"]
"#,
        "line 21, column 1: unknown field `ip`, expected one of `bk_host_id`, `agent_id`, `bk_cloud_id`, `ips`, `hostname`, `os_type`, `bk_biz_id`, `modules`, `attributes`",
    ),
    (
        "mistyped field",
        r#"
[[business]]
bk_biz_id = "4"
name = "x"
"#,
        "line 20, column 13: invalid type: string \"4\", expected i64",
    ),
    (
        "bad address",
        r#"
[[host]]
bk_host_id = 1
ips = ["10.0.0.300"]
"#,
        "line 21, column 8: invalid IP address syntax",
    ),
    (
        "unknown operator",
        r#"
[[dynamic_group]]
id = "g"
bk_biz_id = 2
name = "g"
[[dynamic_group.condition]]
object = "host"
field = "x"
op = "like"
value = "a"
"#,
        "line 26, column 6: unknown variant `like`, expected one of `$eq`, `equal`, `$ne`, `not_equal`, `$in`, `in`, `$nin`, `not_in`, `contains`, `range`",
    ),
    (
        "attribute of an unsupported type",
        r#"
[[host]]
bk_host_id = 1
ips = ["10.0.0.1"]
attributes = { since = 1979-05-27 }
"#,
        "line 22, column 24: invalid type: map, expected a string, number or boolean",
    ),
    (
        "duplicate business",
        r#"
[[business]]
bk_biz_id = 2
name = "again"
"#,
        "line 20, column 13: business 2 is defined twice",
    ),
    (
        "duplicate business set",
        r#"
[[business_set]]
bk_biz_set_id = 9
name = "a"

[[business_set]]
bk_biz_set_id = 9
name = "b"
"#,
        "line 24, column 17: business set 9 is defined twice",
    ),
    (
        "unknown business in a business set",
        r#"
[[business_set]]
bk_biz_set_id = 9
name = "x"
members = [2, 4]
"#,
        "line 22, column 15: business 4 does not exist",
    ),
    (
        "repeated member",
        r#"
[[business_set]]
bk_biz_set_id = 9
name = "x"
members = [2, 3, 2]
"#,
        "line 22, column 18: business 2 is listed twice",
    ),
    (
        "duplicate node",
        r#"
[[module]]
bk_inst_id = 100
name = "again"
parent = "set:10"
"#,
        "line 20, column 14: module:100 is defined twice",
    ),
    (
        "unknown parent",
        r#"
[[set]]
bk_inst_id = 11
name = "db"
parent = "region:1"
"#,
        "line 22, column 10: parent region:1 does not exist",
    ),
    (
        "parent in an unknown business",
        r#"
[[set]]
bk_inst_id = 11
name = "db"
parent = "biz:7"
"#,
        "line 22, column 10: business 7 does not exist",
    ),
    (
        "parent that is not object:id",
        r#"
[[set]]
bk_inst_id = 11
name = "db"
parent = "biz"
"#,
        "line 22, column 10: parent must be \"biz:<id>\" or \"<object>:<id>\", e.g. \"set:10\"",
    ),
    (
        "module under a module",
        r#"
[[module]]
bk_inst_id = 101
name = "php"
parent = "module:100"
"#,
        "line 22, column 10: a module cannot sit under a module",
    ),
    (
        "module under the business",
        r#"
[[module]]
bk_inst_id = 101
name = "php"
parent = "biz:2"
"#,
        "line 22, column 10: a module cannot sit under the business",
    ),
    (
        "set under a set",
        r#"
[[set]]
bk_inst_id = 11
name = "db"
parent = "set:10"
"#,
        "line 22, column 10: a set cannot sit under a set",
    ),
    (
        "custom level under a set",
        r#"
[[level]]
bk_obj_id = "rack"
bk_inst_id = 1
name = "r1"
parent = "set:10"
"#,
        "line 23, column 10: a rack cannot sit under a set",
    ),
    (
        "a set as a custom level",
        r#"
[[level]]
bk_obj_id = "set"
bk_inst_id = 11
name = "s"
parent = "biz:2"
"#,
        "line 20, column 13: sets and modules are [[set]] and [[module]] entries, not custom levels",
    ),
    (
        "reserved level name",
        r#"
[[level]]
bk_obj_id = "biz"
bk_inst_id = 1
name = "r1"
parent = "biz:2"
"#,
        "line 20, column 13: \"biz\" cannot name a topology level",
    ),
    (
        "levels under each other",
        r#"
[[level]]
bk_obj_id = "region"
bk_inst_id = 1
name = "a"
parent = "zone:1"

[[level]]
bk_obj_id = "zone"
bk_inst_id = 1
name = "b"
parent = "region:1"
"#,
        "line 23, column 10: region:1 sits under itself",
    ),
    (
        "host that is neither a host nor a placement",
        r#"
[[host]]
bk_biz_id = 2
"#,
        "line 19, column 1: a host needs bk_host_id, or agent_id to place an agent's host",
    ),
    (
        "host that is both",
        r#"
[[host]]
bk_host_id = 1
agent_id = "a"
ips = ["10.0.0.1"]
"#,
        "line 21, column 12: give bk_host_id for a host of the file or agent_id for an agent's host, not both",
    ),
    (
        "agent entry giving what the agent reports",
        r#"
[[host]]
agent_id = "a"
hostname = "h"
"#,
        "line 21, column 12: hostname is what the agent reports; an agent_id entry places its host and may pin its address (ips, bk_cloud_id)",
    ),
    (
        "agent entry pinning a cloud area without an address",
        r#"
[[host]]
agent_id = "a"
bk_cloud_id = 3
"#,
        "line 21, column 15: bk_cloud_id pins an agent's address together with ips",
    ),
    (
        "agent entry pinning no address",
        r#"
[[host]]
agent_id = "a"
ips = []
"#,
        "line 21, column 7: ips pins no address: it is empty",
    ),
    (
        "duplicate host",
        r#"
[[host]]
bk_host_id = 1
ips = ["10.0.0.1"]

[[host]]
bk_host_id = 1
ips = ["10.0.0.2"]
"#,
        "line 24, column 14: host 1 is defined twice",
    ),
    (
        "host without address",
        r#"
[[host]]
bk_host_id = 1
ips = []
"#,
        "line 21, column 7: host has no address",
    ),
    (
        "host in an unknown business",
        r#"
[[host]]
bk_host_id = 1
ips = ["10.0.0.1"]
bk_biz_id = 4
"#,
        "line 22, column 13: business 4 does not exist",
    ),
    (
        "host in an unknown module",
        r#"
[[host]]
bk_host_id = 1
ips = ["10.0.0.1"]
bk_biz_id = 2
modules = [100, 101]
"#,
        "line 23, column 17: module 101 does not exist",
    ),
    (
        "host in a module of another business",
        r#"
[[host]]
bk_host_id = 1
ips = ["10.0.0.1"]
bk_biz_id = 3
modules = [100]
"#,
        "line 23, column 12: module 100 belongs to business 2, not 3",
    ),
    (
        "unassigned host in a module",
        r#"
[[host]]
bk_host_id = 1
ips = ["10.0.0.1"]
modules = [100]
"#,
        "line 22, column 12: a host without a business cannot sit in modules",
    ),
    (
        "module listed twice",
        r#"
[[host]]
bk_host_id = 1
ips = ["10.0.0.1"]
bk_biz_id = 2
modules = [100, 100]
"#,
        "line 23, column 17: module 100 is listed twice",
    ),
    (
        "attribute hiding a field",
        r#"
[[host]]
bk_host_id = 1
ips = ["10.0.0.1"]
attributes = { rack = 1, bk_host_name = "x" }
"#,
        "line 22, column 26: attribute \"bk_host_name\" would hide the built-in field of that name",
    ),
    (
        "agent placed twice",
        r#"
[[host]]
agent_id = "a"

[[host]]
agent_id = "a"
bk_biz_id = 2
"#,
        "line 23, column 12: agent \"a\" is placed twice",
    ),
    (
        "unlisted agents in a foreign module",
        r#"
[unlisted_agents]
bk_biz_id = 3
modules = [100]
"#,
        "line 21, column 12: module 100 belongs to business 2, not 3",
    ),
    (
        "duplicate dynamic group",
        r#"
[[dynamic_group]]
id = "g"
bk_biz_id = 2
name = "a"

[[dynamic_group]]
id = "g"
bk_biz_id = 3
name = "b"
"#,
        "line 25, column 6: dynamic group \"g\" is defined twice",
    ),
    (
        "dynamic group in an unknown business",
        r#"
[[dynamic_group]]
id = "g"
bk_biz_id = 4
name = "a"
"#,
        "line 21, column 13: business 4 does not exist",
    ),
    (
        "in without a list",
        r#"
[[dynamic_group]]
id = "g"
bk_biz_id = 2
name = "g"

[[dynamic_group.condition]]
object = "host"
field = "x"
op = "in"
value = 3
"#,
        "line 28, column 9: in needs a list of values",
    ),
    (
        "equal with a list",
        r#"
[[dynamic_group]]
id = "g"
bk_biz_id = 2
name = "g"

[[dynamic_group.condition]]
object = "host"
field = "x"
op = "$eq"
value = [3]
"#,
        "line 28, column 9: equal needs one value",
    ),
    (
        "contains a number",
        r#"
[[dynamic_group]]
id = "g"
bk_biz_id = 2
name = "g"

[[dynamic_group.condition]]
object = "host"
field = "x"
op = "contains"
value = 3
"#,
        "line 28, column 9: contains needs a text value",
    ),
    (
        "bounds on equal",
        r#"
[[dynamic_group]]
id = "g"
bk_biz_id = 2
name = "g"

[[dynamic_group.condition]]
object = "host"
field = "x"
op = "equal"
value = 3
min = 1
"#,
        "line 27, column 6: equal takes a value; min and max are for range",
    ),
    (
        "range with a value",
        r#"
[[dynamic_group]]
id = "g"
bk_biz_id = 2
name = "g"

[[dynamic_group.condition]]
object = "host"
field = "x"
op = "range"
value = 3
"#,
        "line 28, column 9: range takes min and max, not value",
    ),
    (
        "range without bounds",
        r#"
[[dynamic_group]]
id = "g"
bk_biz_id = 2
name = "g"

[[dynamic_group.condition]]
object = "host"
field = "x"
op = "range"
"#,
        "line 27, column 6: a range needs a min, a max or both",
    ),
    (
        "inverted range",
        r#"
[[dynamic_group]]
id = "g"
bk_biz_id = 2
name = "g"

[[dynamic_group.condition]]
object = "host"
field = "x"
op = "range"
min = 5
max = 1
"#,
        "line 27, column 6: range min 5 is above max 1",
    ),
    (
        "duplicate account",
        r#"
[[account]]
id = 1
alias = "root"
account = "root"

[[account]]
id = 1
alias = "deploy"
account = "deploy"
"#,
        "line 25, column 6: account 1 is defined twice",
    ),
    (
        "alias twice in one scope",
        r#"
[[account]]
id = 1
alias = "root"
account = "root"
scopes = ["biz:2"]

[[account]]
id = 2
alias = "root"
account = "admin"
scopes = ["biz:3", "biz:2"]
"#,
        "line 27, column 9: alias \"root\" is already used by account 1 in an overlapping scope",
    ),
    (
        "account scope syntax",
        r#"
[[account]]
id = 1
alias = "root"
account = "root"
scopes = ["business:2"]
"#,
        "line 23, column 11: scope: expected \"biz:<id>\" or \"biz_set:<id>\"",
    ),
    (
        "account in an unknown business set",
        r#"
[[account]]
id = 1
alias = "root"
account = "root"
scopes = ["biz:2", "biz_set:9"]
"#,
        "line 23, column 20: business set 9 does not exist",
    ),
    (
        "scripts belong to the store, not to the file",
        r#"
[[script]]
id = "s"
name = "a"
script_language = 1
scope = "biz:2"
"#,
        "line 19, column 1: scripts are managed with create_script and friends, not in the inventory file",
    ),
];
