//! The administration commands that change one entry of the inventory — `biz`, `bizset`,
//! `node`, `hosts add|update|move|rm`, `groups add|update|rm`, `accounts add|update|rm` and
//! `inventory unlisted-agents` — each as one change of `change_inventory` (docs/api.md,
//! "Managing the inventory"); the lists of `fleetrun groups` and `fleetrun accounts`; and
//! `fleetrun agents revoke|unrevoke|list-revoked`.

use std::collections::HashMap;

use serde_json::{Map, Value, json};

use crate::{
    args::{
        AccountsCommand, AgentsCommand, AttrArgs, BizCommand, BizsetCommand, Expect, GroupsCommand,
        HostIdentity, HostsCommand, InventoryCommand, NodeCommand, Output,
    },
    commands::{Ctx, now_ms, print, print_json},
    display,
    error::{CliError, exit},
    inventory::commit,
    library::{all_pages, items, plural, print_list, text_of},
    syntax::{NodeRef, describe_condition},
};

/// One change and the revision it expects.
pub type Change = (Value, Expect);

/// Sends one change; its revision is printed.
pub async fn run(ctx: &Ctx, change: Result<Change, CliError>) -> Result<u8, CliError> {
    let (change, expect) = change?;
    commit(ctx, vec![change], expect.expect_revision).await
}

/// Sets `key` when there is a value: an absent field is one the change leaves alone.
fn put(change: &mut Value, key: &str, value: Option<Value>) {
    if let Some(value) = value {
        change[key] = value;
    }
}

/// `attributes` of a change: set keys with their values, removed keys as `null`.
fn attributes(set: &[(String, Value)], unset: &[String]) -> Result<Option<Value>, CliError> {
    let mut attributes = Map::new();
    for (key, value) in set {
        attributes.insert(key.clone(), value.clone());
    }
    for key in unset {
        if attributes.contains_key(key) {
            return Err(CliError::usage(format!(
                "attribute {key:?} is both set (--attr) and removed (--unset-attr)"
            )));
        }
        attributes.insert(key.clone(), Value::Null);
    }
    Ok((!attributes.is_empty()).then_some(Value::Object(attributes)))
}

fn node_fields(op: &str, node: &NodeRef) -> Value {
    json!({"op": op, "bk_obj_id": node.bk_obj_id, "bk_inst_id": node.bk_inst_id})
}

/// A business id, or `null` for the unassigned pool.
fn business(biz: Option<i64>) -> Value {
    biz.map_or(Value::Null, |id| json!(id))
}

pub fn biz_change(command: &BizCommand) -> Change {
    match command {
        BizCommand::Add { id, name, expect } => (
            json!({"op": "create_business", "bk_biz_id": id, "name": name}),
            *expect,
        ),
        BizCommand::Rename { id, name, expect } => (
            json!({"op": "update_business", "bk_biz_id": id, "name": name}),
            *expect,
        ),
        BizCommand::Rm { id, expect } => {
            (json!({"op": "delete_business", "bk_biz_id": id}), *expect)
        }
    }
}

pub fn bizset_change(command: &BizsetCommand) -> Change {
    match command {
        BizsetCommand::Add {
            id,
            name,
            members,
            expect,
        } => (
            json!({"op": "create_business_set", "bk_biz_set_id": id, "name": name, "members": members}),
            *expect,
        ),
        BizsetCommand::Update {
            id,
            name,
            members,
            expect,
        } => {
            let mut change = json!({"op": "update_business_set", "bk_biz_set_id": id});
            put(&mut change, "name", name.as_ref().map(|n| json!(n)));
            put(&mut change, "members", members.as_ref().map(|m| json!(m)));
            (change, *expect)
        }
        BizsetCommand::Rm { id, expect } => (
            json!({"op": "delete_business_set", "bk_biz_set_id": id}),
            *expect,
        ),
    }
}

pub fn node_change(command: &NodeCommand) -> Result<Change, CliError> {
    Ok(match command {
        NodeCommand::Add {
            node,
            name,
            parent,
            attrs,
            expect,
        } => {
            let mut change = node_fields("create_node", node);
            change["name"] = json!(name);
            change["parent"] = json!(parent);
            put(&mut change, "attributes", attributes(attrs, &[])?);
            (change, *expect)
        }
        NodeCommand::Update {
            node,
            name,
            parent,
            attrs: AttrArgs { set, unset },
            expect,
        } => {
            let mut change = node_fields("update_node", node);
            put(&mut change, "name", name.as_ref().map(|n| json!(n)));
            put(&mut change, "parent", parent.as_ref().map(|p| json!(p)));
            put(&mut change, "attributes", attributes(set, unset)?);
            (change, *expect)
        }
        NodeCommand::Rm { node, expect } => (node_fields("delete_node", node), *expect),
    })
}

fn put_identity(change: &mut Value, identity: &HostIdentity) {
    put(change, "bk_cloud_id", identity.cloud.map(|c| json!(c)));
    put(
        change,
        "hostname",
        identity.hostname.as_ref().map(|h| json!(h)),
    );
    put(change, "os_type", identity.os.as_ref().map(|o| json!(o)));
}

pub fn host_change(command: &HostsCommand) -> Result<Change, CliError> {
    Ok(match command {
        HostsCommand::Add {
            id,
            ips,
            identity,
            biz,
            modules,
            attrs,
            expect,
        } => {
            let mut change = json!({"op": "create_host", "bk_host_id": id, "ips": ips});
            put_identity(&mut change, identity);
            put(&mut change, "bk_biz_id", biz.map(|b| json!(b)));
            put(
                &mut change,
                "modules",
                (!modules.is_empty()).then(|| json!(modules)),
            );
            put(&mut change, "attributes", attributes(attrs, &[])?);
            (change, *expect)
        }
        HostsCommand::Update {
            id,
            ips,
            identity,
            attrs: AttrArgs { set, unset },
            expect,
        } => {
            let mut change = json!({"op": "update_host", "bk_host_id": id});
            put(&mut change, "ips", ips.as_ref().map(|i| json!(i)));
            put_identity(&mut change, identity);
            put(&mut change, "attributes", attributes(set, unset)?);
            (change, *expect)
        }
        HostsCommand::Move {
            hosts,
            agents,
            biz,
            modules,
            unassign: _,
            expect,
        } => {
            // clap has made sure of exactly one of --biz and --unassign.
            let mut change = json!({"op": "move_hosts", "bk_biz_id": business(*biz)});
            put(
                &mut change,
                "bk_host_ids",
                (!hosts.is_empty()).then(|| json!(hosts)),
            );
            put(
                &mut change,
                "agent_ids",
                (!agents.is_empty()).then(|| json!(agents)),
            );
            put(
                &mut change,
                "modules",
                (!modules.is_empty()).then(|| json!(modules)),
            );
            (change, *expect)
        }
        HostsCommand::Rm { id, expect } => {
            (json!({"op": "delete_host", "bk_host_id": id}), *expect)
        }
    })
}

pub fn unlisted_agents_change(command: &InventoryCommand) -> Result<Change, CliError> {
    let InventoryCommand::UnlistedAgents {
        biz,
        modules,
        unassign: _,
        attrs,
        expect,
    } = command
    else {
        return Err(CliError::usage("not inventory unlisted-agents"));
    };
    let mut change = json!({"op": "set_unlisted_agents", "bk_biz_id": business(*biz)});
    put(
        &mut change,
        "modules",
        (!modules.is_empty()).then(|| json!(modules)),
    );
    put(&mut change, "attributes", attributes(attrs, &[])?);
    Ok((change, *expect))
}

pub fn group_change(command: &GroupsCommand) -> Change {
    let conditions =
        |list: &[crate::syntax::Condition]| -> Value { list.iter().map(|c| c.0.clone()).collect() };
    match command {
        GroupsCommand::Add {
            id,
            biz,
            name,
            conditions: list,
            object,
            expect,
        } => {
            let mut change = json!({"op": "create_dynamic_group", "id": id, "bk_biz_id": biz,
                "name": name, "conditions": conditions(list)});
            put(&mut change, "object", object.map(|o| json!(o.name())));
            (change, *expect)
        }
        GroupsCommand::Update {
            id,
            biz,
            name,
            conditions: list,
            object,
            expect,
        } => {
            let mut change = json!({"op": "update_dynamic_group", "id": id});
            put(&mut change, "bk_biz_id", biz.map(|b| json!(b)));
            put(&mut change, "name", name.as_ref().map(|n| json!(n)));
            put(&mut change, "object", object.map(|o| json!(o.name())));
            put(
                &mut change,
                "conditions",
                (!list.is_empty()).then(|| conditions(list)),
            );
            (change, *expect)
        }
        GroupsCommand::Rm { id, expect } => {
            (json!({"op": "delete_dynamic_group", "id": id}), *expect)
        }
    }
}

pub fn account_change(command: &AccountsCommand) -> Change {
    match command {
        AccountsCommand::Add {
            id,
            alias,
            account,
            os,
            category,
            usable_in,
            expect,
        } => {
            let mut change =
                json!({"op": "create_account", "id": id, "alias": alias, "account": account});
            put(&mut change, "os_type", os.as_ref().map(|o| json!(o)));
            put(&mut change, "category", category.map(|c| json!(c.name())));
            put(&mut change, "scopes", Some(json!(usable_in)));
            (change, *expect)
        }
        AccountsCommand::Update {
            id,
            alias,
            account,
            os,
            category,
            usable_in,
            expect,
        } => {
            let mut change = json!({"op": "update_account", "id": id});
            put(&mut change, "alias", alias.as_ref().map(|a| json!(a)));
            put(&mut change, "account", account.as_ref().map(|a| json!(a)));
            put(&mut change, "os_type", os.as_ref().map(|o| json!(o)));
            put(&mut change, "category", category.map(|c| json!(c.name())));
            put(&mut change, "scopes", usable_in.as_ref().map(|s| json!(s)));
            (change, *expect)
        }
        AccountsCommand::Rm { id, expect } => (json!({"op": "delete_account", "id": id}), *expect),
    }
}

/// Each dynamic group's conditions, by id, from the inventory document.
fn group_conditions(document: &str) -> HashMap<String, Value> {
    let Ok(table) = toml::from_str::<toml::Table>(document) else {
        return HashMap::new();
    };
    let groups = table.get("dynamic_group").and_then(toml::Value::as_array);
    groups
        .into_iter()
        .flatten()
        .filter_map(|group| {
            let id = group.get("id")?.as_str()?.to_owned();
            let conditions = group
                .get("condition")
                .and_then(|c| serde_json::to_value(c).ok())
                .unwrap_or_else(|| json!([]));
            Some((id, conditions))
        })
        .collect()
}

/// Prints a list for `--output json` (one array) or `jsonl` (an item a line); false for text.
fn print_items(ctx: &Ctx, list: &[Value]) -> Result<bool, CliError> {
    match ctx.output {
        Output::Json => crate::commands::print_json(&json!(list))?,
        Output::Jsonl => {
            for item in list {
                print(&format!("{item}\n"))?;
            }
        }
        Output::Text => return Ok(false),
    }
    Ok(true)
}

pub async fn groups(ctx: &Ctx, biz: Option<i64>) -> Result<u8, CliError> {
    let topology = ctx.client.call("get_topology", json!({})).await?;
    let mut groups: Vec<Value> = items(&topology["dynamic_groups"])
        .iter()
        .filter(|g| biz.is_none_or(|b| g["bk_biz_id"].as_i64() == Some(b)))
        .cloned()
        .collect();
    // Conditions are in the document only, which only an app granted admin may read.
    let conditions = match ctx.client.call("get_inventory", json!({})).await {
        Ok(document) => Some(group_conditions(text_of(&document, "text"))),
        Err(CliError::Refused { .. }) => None,
        Err(e) => return Err(e),
    };
    if let Some(conditions) = &conditions {
        for group in &mut groups {
            if let Some(list) = conditions.get(text_of(group, "id")) {
                group["conditions"] = list.clone();
            }
        }
    }
    if print_items(ctx, &groups)? {
        return Ok(exit::OK);
    }
    let mut header = vec!["ID", "BIZ", "NAME", "HOSTS"];
    if conditions.is_some() {
        header.push("WHERE");
    }
    let mut rows = vec![header.into_iter().map(String::from).collect::<Vec<_>>()];
    for group in &groups {
        let mut row = vec![
            text_of(group, "id").to_owned(),
            group["bk_biz_id"].to_string(),
            text_of(group, "name").to_owned(),
            items(&group["host_ids"]).len().to_string(),
        ];
        if conditions.is_some() {
            let said: Vec<String> = items(&group["conditions"])
                .iter()
                .map(|c| describe_condition(c).unwrap_or_else(|| c.to_string()))
                .collect();
            row.push(if said.is_empty() {
                "(every host of the business)".to_owned()
            } else {
                said.iter()
                    .map(|c| format!("'{c}'"))
                    .collect::<Vec<_>>()
                    .join(" and ")
            });
        }
        rows.push(row);
    }
    print(&display::table(&rows))?;
    Ok(exit::OK)
}

pub async fn accounts(ctx: &Ctx) -> Result<u8, CliError> {
    let doc = all_pages(ctx, "get_account_list", json!({})).await?;
    if print_list(ctx, &doc)? {
        return Ok(exit::OK);
    }
    let mut rows = vec![
        ["ID", "ALIAS", "ACCOUNT", "CATEGORY", "OS"]
            .map(String::from)
            .to_vec(),
    ];
    let accounts = items(&doc["data"]);
    for account in accounts {
        rows.push(vec![
            account["id"].to_string(),
            text_of(account, "alias").to_owned(),
            text_of(account, "account").to_owned(),
            match account["category"].as_i64() {
                Some(1) => "system".to_owned(),
                Some(2) => "database".to_owned(),
                other => other.map_or_else(|| "-".to_owned(), |c| c.to_string()),
            },
            text_of(account, "os").to_owned(),
        ]);
    }
    let mut text = display::table(&rows);
    if !ctx.quiet {
        let (kind, id) = ctx.client.settings().scope()?;
        text.push_str(&format!(
            "({} usable in {kind}:{id})\n",
            plural(accounts.len(), "account")
        ));
    }
    print(&text)?;
    Ok(exit::OK)
}

/// `fleetrun agents ...`: revocation of agents.
pub async fn agents(ctx: &Ctx, command: &AgentsCommand) -> Result<u8, CliError> {
    let (api, body) = match command {
        AgentsCommand::Revoke { agent_id, reason } => {
            let mut body = json!({ "agent_id": agent_id });
            if let Some(reason) = reason {
                body["reason"] = json!(reason);
            }
            ("revoke_agent", body)
        }
        AgentsCommand::Unrevoke { agent_id } => ("unrevoke_agent", json!({ "agent_id": agent_id })),
        AgentsCommand::ListRevoked => ("list_revoked_agents", json!({})),
    };
    let done = ctx.client.call(api, body).await?;
    if ctx.output != Output::Text {
        print_json(&done)?;
        return Ok(exit::OK);
    }
    let now = now_ms();
    let who = |r: &Value| {
        let mut text = format!(
            "by {} {}",
            text_of(r, "operator"),
            display::age(r["revoked_at"].as_i64().unwrap_or(now), now)
        );
        if let Some(reason) = r["reason"].as_str().filter(|r| !r.is_empty()) {
            text.push_str(&format!(": {reason}"));
        }
        text
    };
    let revision = |r: &Value| {
        r["revision"]
            .as_i64()
            .map_or_else(String::new, |n| format!(" (revision {n})"))
    };
    let text = match command {
        AgentsCommand::Revoke { agent_id, .. } => {
            if done["newly_revoked"] == json!(true) {
                format!(
                    "agent {agent_id} revoked{}; {} closed\n",
                    revision(&done),
                    plural(
                        done["connections_closed"].as_u64().unwrap_or(0) as usize,
                        "connection"
                    )
                )
            } else {
                format!("agent {agent_id} was already revoked, {}\n", who(&done))
            }
        }
        AgentsCommand::Unrevoke { agent_id } => format!(
            "agent {agent_id} may connect again{} (it was revoked {})\n",
            revision(&done),
            who(&done)
        ),
        AgentsCommand::ListRevoked => {
            let revoked = items(&done);
            if revoked.is_empty() {
                if ctx.quiet {
                    String::new()
                } else {
                    "no agent is revoked\n".to_owned()
                }
            } else {
                let mut rows = vec![["AGENT", "REVOKED"].map(String::from).to_vec()];
                for r in revoked {
                    rows.push(vec![text_of(r, "agent_id").to_owned(), who(r)]);
                }
                display::table(&rows)
            }
        }
    };
    print(&text)?;
    Ok(exit::OK)
}

#[cfg(test)]
mod tests {
    use clap::Parser;

    use super::*;
    use crate::args::{Cli, Command};

    fn change_of(args: &[&str]) -> Result<Value, String> {
        let mut argv = vec!["fleetrun"];
        argv.extend_from_slice(args);
        let cli = Cli::try_parse_from(argv).map_err(|e| e.to_string())?;
        let change = match &cli.command {
            Command::Biz(c) => Ok(biz_change(c)),
            Command::Bizset(c) => Ok(bizset_change(c)),
            Command::Node(c) => node_change(c),
            Command::Hosts(h) => host_change(h.command.as_ref().expect("a hosts subcommand")),
            Command::Groups(g) => Ok(group_change(g.command.as_ref().expect("a subcommand"))),
            Command::Accounts(a) => Ok(account_change(a.command.as_ref().expect("a subcommand"))),
            Command::Inventory(c) => unlisted_agents_change(c),
            other => panic!("not an admin command: {other:?}"),
        };
        let (mut change, expect) = change.map_err(|e| e.to_string())?;
        if let Some(revision) = expect.expect_revision {
            change["expected"] = json!(revision);
        }
        Ok(change)
    }

    #[test]
    fn businesses_and_sets_become_their_changes() {
        assert_eq!(
            change_of(&["biz", "add", "5", "--name", "pay", "--expect-revision", "8"]),
            Ok(json!({"op": "create_business", "bk_biz_id": 5, "name": "pay", "expected": 8}))
        );
        assert_eq!(
            change_of(&["biz", "rename", "5", "pay eu"]),
            Ok(json!({"op": "update_business", "bk_biz_id": 5, "name": "pay eu"}))
        );
        assert_eq!(
            change_of(&["biz", "rm", "5"]),
            Ok(json!({"op": "delete_business", "bk_biz_id": 5}))
        );
        assert_eq!(
            change_of(&["bizset", "add", "9", "--name", "all", "--members", "2,3"]),
            Ok(
                json!({"op": "create_business_set", "bk_biz_set_id": 9, "name": "all", "members": [2, 3]})
            )
        );
        assert_eq!(
            change_of(&["bizset", "update", "9", "--members", "2"]),
            Ok(json!({"op": "update_business_set", "bk_biz_set_id": 9, "members": [2]}))
        );
        assert!(change_of(&["bizset", "update", "9"]).is_err());
    }

    #[test]
    fn nodes_become_their_changes_with_typed_attributes() {
        assert_eq!(
            change_of(&[
                "node", "add", "set:12", "--name", "cache", "--parent", "biz:2", "--attr", "cpu=8",
                "--attr", "env=prod",
            ]),
            Ok(
                json!({"op": "create_node", "bk_obj_id": "set", "bk_inst_id": 12, "name": "cache",
                "parent": "biz:2", "attributes": {"cpu": 8, "env": "prod"}})
            )
        );
        assert_eq!(
            change_of(&[
                "node",
                "update",
                "module:120",
                "--parent",
                "set:13",
                "--unset-attr",
                "owner"
            ]),
            Ok(
                json!({"op": "update_node", "bk_obj_id": "module", "bk_inst_id": 120, "parent": "set:13",
                "attributes": {"owner": null}})
            )
        );
        assert!(
            change_of(&[
                "node",
                "update",
                "set:1",
                "--attr",
                "a=1",
                "--unset-attr",
                "a"
            ])
            .unwrap_err()
            .contains("both set")
        );
        assert!(change_of(&["node", "update", "set:1"]).is_err());
        assert!(change_of(&["node", "add", "biz:1", "--name", "x", "--parent", "biz:2"]).is_err());
        assert_eq!(
            change_of(&["node", "rm", "set:12"]),
            Ok(json!({"op": "delete_node", "bk_obj_id": "set", "bk_inst_id": 12}))
        );
    }

    #[test]
    fn hosts_become_their_changes() {
        assert_eq!(
            change_of(&[
                "hosts",
                "add",
                "1001",
                "--ip",
                "10.0.0.5,fd00::5",
                "--hostname",
                "db-9",
                "--biz",
                "2",
                "--module",
                "110",
                "--attr",
                "ssd=true",
            ]),
            Ok(
                json!({"op": "create_host", "bk_host_id": 1001, "ips": ["10.0.0.5", "fd00::5"],
                "hostname": "db-9", "bk_biz_id": 2, "modules": [110], "attributes": {"ssd": true}})
            )
        );
        assert!(change_of(&["hosts", "add", "1", "--ip", "10.0.0"]).is_err());
        assert!(change_of(&["hosts", "add", "1", "--ip", "10.0.0.1", "--module", "3"]).is_err());
        assert_eq!(
            change_of(&[
                "hosts",
                "update",
                "7",
                "--cloud",
                "1",
                "--unset-attr",
                "rack"
            ]),
            Ok(
                json!({"op": "update_host", "bk_host_id": 7, "bk_cloud_id": 1, "attributes": {"rack": null}})
            )
        );
        assert_eq!(
            change_of(&[
                "hosts", "move", "3,4", "--agent", "web-7", "--biz", "2", "--module", "120"
            ]),
            Ok(
                json!({"op": "move_hosts", "bk_host_ids": [3, 4], "agent_ids": ["web-7"],
                "bk_biz_id": 2, "modules": [120]})
            )
        );
        assert_eq!(
            change_of(&["hosts", "move", "5", "--unassign"]),
            Ok(json!({"op": "move_hosts", "bk_host_ids": [5], "bk_biz_id": null}))
        );
        assert!(change_of(&["hosts", "move", "5"]).is_err(), "no place");
        assert!(
            change_of(&["hosts", "move", "--biz", "2"]).is_err(),
            "no hosts"
        );
        assert!(change_of(&["hosts", "move", "5", "--biz", "2", "--unassign"]).is_err());
        assert_eq!(
            change_of(&["hosts", "rm", "5"]),
            Ok(json!({"op": "delete_host", "bk_host_id": 5}))
        );
        assert_eq!(
            change_of(&["inventory", "unlisted-agents", "--unassign"]),
            Ok(json!({"op": "set_unlisted_agents", "bk_biz_id": null}))
        );
        assert_eq!(
            change_of(&[
                "inventory",
                "unlisted-agents",
                "--biz",
                "3",
                "--module",
                "200"
            ]),
            Ok(json!({"op": "set_unlisted_agents", "bk_biz_id": 3, "modules": [200]}))
        );
    }

    #[test]
    fn groups_and_accounts_become_their_changes() {
        assert_eq!(
            change_of(&[
                "groups",
                "add",
                "big",
                "--biz",
                "2",
                "--name",
                "big web",
                "--where",
                "module.bk_module_name in nginx,php",
                "--where",
                "host.cpu range 8..",
            ]),
            Ok(
                json!({"op": "create_dynamic_group", "id": "big", "bk_biz_id": 2, "name": "big web",
                "conditions": [
                    {"object": "module", "field": "bk_module_name", "op": "in", "value": ["nginx", "php"]},
                    {"object": "host", "field": "cpu", "op": "range", "min": 8},
                ]})
            )
        );
        let bad = change_of(&[
            "groups", "add", "g", "--biz", "2", "--name", "g", "--where", "cpu > 8",
        ])
        .unwrap_err();
        assert!(bad.contains("OBJECT.FIELD OP VALUE"), "{bad}");
        assert_eq!(
            change_of(&["groups", "update", "big", "--where", "set.env = prod"]),
            Ok(json!({"op": "update_dynamic_group", "id": "big",
                "conditions": [{"object": "set", "field": "env", "op": "equal", "value": "prod"}]}))
        );
        assert_eq!(
            change_of(&[
                "accounts",
                "add",
                "3",
                "--alias",
                "deploy",
                "--account",
                "deploy",
                "--category",
                "system",
                "--usable-in",
                "biz:2,biz_set:9",
            ]),
            Ok(
                json!({"op": "create_account", "id": 3, "alias": "deploy", "account": "deploy",
                "category": "system", "scopes": ["biz:2", "biz_set:9"]})
            )
        );
        assert_eq!(
            change_of(&["accounts", "update", "3", "--usable-in", "biz:2"]),
            Ok(json!({"op": "update_account", "id": 3, "scopes": ["biz:2"]}))
        );
        // An account listing no scope is usable nowhere: there is no "every scope" to ask for,
        // and an account is not added without the scopes that may use it.
        assert!(change_of(&["accounts", "update", "3", "--usable-everywhere"]).is_err());
        assert!(change_of(&["accounts", "add", "3", "--alias", "a", "--account", "a"]).is_err());
        assert!(
            change_of(&[
                "accounts",
                "add",
                "3",
                "--alias",
                "a",
                "--account",
                "a",
                "--usable-in",
                "app:1"
            ])
            .is_err()
        );
    }

    #[test]
    fn listings_stay_listings() {
        let cli = Cli::try_parse_from(["fleetrun", "hosts", "--online", "--biz", "2"]).unwrap();
        let Command::Hosts(hosts) = cli.command else {
            panic!("not hosts")
        };
        assert!(hosts.command.is_none() && hosts.online && hosts.biz == Some(2));
        let cli = Cli::try_parse_from(["fleetrun", "groups", "--biz", "2"]).unwrap();
        assert!(matches!(cli.command, Command::Groups(g) if g.command.is_none()));
        assert!(Cli::try_parse_from(["fleetrun", "accounts", "-o", "json"]).is_ok());
        assert!(Cli::try_parse_from(["fleetrun", "hosts", "--online", "rm", "3"]).is_err());
    }

    #[test]
    fn group_conditions_come_from_the_document() {
        let document = r#"
[[dynamic_group]]
id = "web"
bk_biz_id = 2
name = "web"

[[dynamic_group.condition]]
object = "set"
field = "bk_set_name"
op = "equal"
value = "web"

[[dynamic_group]]
id = "all"
bk_biz_id = 2
name = "all"
"#;
        let conditions = group_conditions(document);
        assert_eq!(
            conditions["web"],
            json!([{"object": "set", "field": "bk_set_name", "op": "equal", "value": "web"}])
        );
        assert_eq!(conditions["all"], json!([]));
        assert_eq!(
            describe_condition(&conditions["web"][0]).as_deref(),
            Some("set.bk_set_name = web")
        );
    }
}
