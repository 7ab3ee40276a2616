//! `fleetrun scripts` (the scope's script library) and `fleetrun topology`.

use std::{collections::HashSet, io::Write, path::Path};

use base64::Engine as _;
use fleetrun_api::VersionStatus;
use serde_json::{Value, json};

use crate::{
    args::{Lang, Output, ScriptsCommand},
    commands::{Ctx, now_ms, print, print_json, read_script},
    display,
    error::{CliError, exit},
    request::language_of,
};

/// Host ids listed per dynamic group in the tree before "and N more".
const LISTED_HOST_IDS: usize = 20;

/// A script version's status, by bk-job's number.
pub fn version_status_name(status: i64) -> &'static str {
    i32::try_from(status)
        .ok()
        .and_then(|code| VersionStatus::from_code(code).name())
        .unwrap_or("unknown")
}

fn b64(bytes: &[u8]) -> String {
    base64::engine::general_purpose::STANDARD.encode(bytes)
}

pub(crate) fn plural(n: usize, one: &str) -> String {
    if n == 1 {
        format!("1 {one}")
    } else {
        format!("{n} {one}s")
    }
}

pub(crate) fn text_of<'a>(value: &'a Value, key: &str) -> &'a str {
    value[key].as_str().unwrap_or("")
}

pub(crate) fn items(value: &Value) -> &[Value] {
    value.as_array().map_or(&[], Vec::as_slice)
}

/// One document: pretty for `--output json`, one line for `jsonl`.
pub(crate) fn print_doc(ctx: &Ctx, value: &Value) -> Result<(), CliError> {
    match ctx.output {
        Output::Jsonl => print(&format!("{value}\n")),
        _ => print_json(value),
    }
}

pub async fn scripts(ctx: &Ctx, command: &ScriptsCommand) -> Result<u8, CliError> {
    match command {
        ScriptsCommand::List { name, lang } => list(ctx, name.as_deref(), *lang).await,
        ScriptsCommand::Versions { script_id } => versions(ctx, script_id).await,
        ScriptsCommand::Show { version_id } => show(ctx, *version_id).await,
        ScriptsCommand::Create {
            name,
            version,
            file,
            lang,
            description,
        } => {
            let (content, lang) = script_file(file, *lang)?;
            let mut body = json!({
                "name": name,
                "version": version,
                "script_language": lang.code(),
                "content": b64(&content),
            });
            if let Some(description) = description {
                body["description"] = json!(description);
            }
            let data = ctx
                .client
                .call("create_script", ctx.client.scoped(body)?)
                .await?;
            let (script, id) = (text_of(&data, "script_id"), &data["id"]);
            match ctx.output {
                Output::Text if ctx.quiet => print(&format!("{script} {id}\n"))?,
                Output::Text => print(&format!(
                    "script {script} ({name}) created with version {id} ({version}, draft)\n\
                     publish it: fleetrun scripts publish {script} {id}\n"
                ))?,
                _ => print_doc(ctx, &data)?,
            }
            Ok(exit::OK)
        }
        ScriptsCommand::AddVersion {
            script_id,
            version,
            file,
        } => {
            // The controller keeps the script's language; reading it here only checks the file.
            let content = read_script(file)
                .map_err(|e| CliError::usage(format!("cannot read {}: {e}", file.display())))?;
            let body =
                json!({"script_id": script_id, "version": version, "content": b64(&content)});
            let data = ctx
                .client
                .call("create_script_version", ctx.client.scoped(body)?)
                .await?;
            let id = &data["id"];
            match ctx.output {
                Output::Text if ctx.quiet => print(&format!("{id}\n"))?,
                Output::Text => print(&format!(
                    "version {id} ({version}, draft) added to script {script_id}\n\
                     publish it: fleetrun scripts publish {script_id} {id}\n"
                ))?,
                _ => print_doc(ctx, &data)?,
            }
            Ok(exit::OK)
        }
        ScriptsCommand::Publish {
            script_id,
            version_id,
        } => operate(ctx, "publish_script_version", script_id, *version_id).await,
        ScriptsCommand::Disable {
            script_id,
            version_id,
        } => operate(ctx, "disable_script_version", script_id, *version_id).await,
    }
}

/// A script file's content and language: `--lang`, else the extension or `#!` line.
fn script_file(path: &Path, lang: Option<Lang>) -> Result<(Vec<u8>, Lang), CliError> {
    let content = read_script(path)
        .map_err(|e| CliError::usage(format!("cannot read {}: {e}", path.display())))?;
    let lang = lang
        .or_else(|| language_of(path, &content))
        .ok_or_else(|| {
            CliError::usage(format!(
                "cannot tell the language of {} from its name or #! line: pass --lang",
                path.display()
            ))
        })?;
    Ok((content, lang))
}

/// Every page of a list API; `{total, data}` as one document.
pub(crate) async fn all_pages(ctx: &Ctx, api: &str, query: Value) -> Result<Value, CliError> {
    const PAGE: i64 = 1000;
    let mut all: Vec<Value> = Vec::new();
    loop {
        let mut page = query.clone();
        page["start"] = json!(all.len());
        page["length"] = json!(PAGE);
        let data = ctx.client.call(api, ctx.client.scoped(page)?).await?;
        let got = items(&data["data"]).to_vec();
        let total = data["total"].as_i64().unwrap_or(0);
        let done = got.is_empty() || (all.len() + got.len()) as i64 >= total;
        all.extend(got);
        if done {
            return Ok(json!({"total": total, "data": all}));
        }
    }
}

/// Prints the list for `--output json` (the whole document) or `jsonl` (an item a line);
/// false for text, which the caller prints.
pub(crate) fn print_list(ctx: &Ctx, doc: &Value) -> Result<bool, CliError> {
    match ctx.output {
        Output::Json => print_json(doc)?,
        Output::Jsonl => {
            for item in items(&doc["data"]) {
                print(&format!("{item}\n"))?;
            }
        }
        Output::Text => return Ok(false),
    }
    Ok(true)
}

async fn list(ctx: &Ctx, name: Option<&str>, lang: Option<Lang>) -> Result<u8, CliError> {
    let mut query = json!({});
    if let Some(name) = name {
        query["name"] = json!(name);
    }
    if let Some(lang) = lang {
        query["script_language"] = json!(lang.code());
    }
    let doc = all_pages(ctx, "get_script_list", query).await?;
    if !print_list(ctx, &doc)? {
        let mut rows = vec![
            ["ID", "NAME", "LANGUAGE", "ONLINE VERSION"]
                .map(String::from)
                .to_vec(),
        ];
        for script in items(&doc["data"]) {
            rows.push(vec![
                text_of(script, "id").to_owned(),
                text_of(script, "name").to_owned(),
                Lang::name_of(script["script_language"].as_i64().unwrap_or(0)).to_owned(),
                script["online_script_version_id"]
                    .as_i64()
                    .map_or_else(|| "-".to_owned(), |v| v.to_string()),
            ]);
        }
        print(&display::table(&rows))?;
    }
    Ok(exit::OK)
}

async fn versions(ctx: &Ctx, script_id: &str) -> Result<u8, CliError> {
    let doc = all_pages(
        ctx,
        "get_script_version_list",
        json!({"script_id": script_id}),
    )
    .await?;
    if !print_list(ctx, &doc)? {
        let now = now_ms();
        let mut rows = vec![
            ["ID", "VERSION", "STATUS", "CREATOR", "CREATED"]
                .map(String::from)
                .to_vec(),
        ];
        for version in items(&doc["data"]) {
            let status = version_status_name(version["status"].as_i64().unwrap_or(-1));
            rows.push(vec![
                version["id"].to_string(),
                text_of(version, "version").to_owned(),
                ctx.style.paint(
                    match status {
                        "online" => "32",
                        "disabled" => "31",
                        _ => "0",
                    },
                    status,
                ),
                text_of(version, "creator").to_owned(),
                display::age(version["create_time"].as_i64().unwrap_or(now), now),
            ]);
        }
        print(&display::table(&rows))?;
    }
    Ok(exit::OK)
}

async fn show(ctx: &Ctx, version_id: i64) -> Result<u8, CliError> {
    let mut data = ctx
        .client
        .call(
            "get_script_version_detail",
            ctx.client.scoped(json!({"id": version_id}))?,
        )
        .await?;
    // bk-job returns a version's content as its text.
    let content = text_of(&data, "content").to_owned();
    if ctx.output != Output::Text {
        data["content_text"] = json!(content);
        print_doc(ctx, &data)?;
        return Ok(exit::OK);
    }
    if !ctx.quiet {
        let now = now_ms();
        eprintln!(
            "script {} ({}) version {} (id {}): {}, {}, by {}, {}",
            text_of(&data, "script_id"),
            text_of(&data, "name"),
            text_of(&data, "version"),
            data["id"],
            version_status_name(data["status"].as_i64().unwrap_or(-1)),
            Lang::name_of(data["script_language"].as_i64().unwrap_or(0)),
            text_of(&data, "creator"),
            display::age(data["create_time"].as_i64().unwrap_or(now), now),
        );
    }
    let mut out = std::io::stdout().lock();
    out.write_all(content.as_bytes())
        .and_then(|()| out.flush())
        .map_err(CliError::output)?;
    Ok(exit::OK)
}

async fn operate(ctx: &Ctx, api: &str, script_id: &str, version_id: i64) -> Result<u8, CliError> {
    let body = json!({"script_id": script_id, "script_version_id": version_id});
    let data = ctx.client.call(api, ctx.client.scoped(body)?).await?;
    match ctx.output {
        Output::Text => print(&format!(
            "script {script_id}: version {version_id} is {}\n",
            version_status_name(data["status"].as_i64().unwrap_or(-1))
        ))?,
        _ => print_doc(ctx, &data)?,
    }
    Ok(exit::OK)
}

pub async fn topology(ctx: &Ctx) -> Result<u8, CliError> {
    let data = ctx.client.call("get_topology", json!({})).await?;
    match ctx.output {
        Output::Text => print(&tree(&data))?,
        _ => print_doc(ctx, &data)?,
    }
    Ok(exit::OK)
}

/// `get_topology` as a tree: each business with its nodes below their parents and the hosts
/// below each, then business sets and dynamic groups.
pub fn tree(data: &Value) -> String {
    let mut out = String::new();
    for business in items(&data["businesses"]) {
        let id = business["bk_biz_id"].as_i64().unwrap_or_default();
        out.push_str(&format!(
            "business {id} {:?}: {}\n",
            text_of(business, "name"),
            plural(items(&business["host_ids"]).len(), "host")
        ));
        let nodes = items(&business["nodes"]);
        let mut seen = HashSet::new();
        children(&mut out, nodes, ("biz", id), 1, &mut seen);
        // Nodes whose parent is not in the business (the controller should not send these).
        for node in nodes {
            let key = (text_of(node, "bk_obj_id"), node["bk_inst_id"].as_i64());
            if !seen.contains(&key) {
                out.push_str(&format!(
                    "  {} (parent {}:{})\n",
                    node_line(node),
                    text_of(&node["parent"], "bk_obj_id"),
                    node["parent"]["bk_inst_id"]
                ));
            }
        }
    }
    for set in items(&data["business_sets"]) {
        let members: Vec<String> = items(&set["members"])
            .iter()
            .map(Value::to_string)
            .collect();
        out.push_str(&format!(
            "business set {} {:?}: businesses {}\n",
            set["bk_biz_set_id"],
            text_of(set, "name"),
            members.join(", ")
        ));
    }
    for group in items(&data["dynamic_groups"]) {
        let hosts = items(&group["host_ids"]);
        let mut ids: Vec<String> = hosts
            .iter()
            .take(LISTED_HOST_IDS)
            .map(Value::to_string)
            .collect();
        if hosts.len() > LISTED_HOST_IDS {
            ids.push(format!("and {} more", hosts.len() - LISTED_HOST_IDS));
        }
        let ids = if ids.is_empty() {
            String::new()
        } else {
            format!(": {}", ids.join(", "))
        };
        out.push_str(&format!(
            "dynamic group {} {:?} in business {}: {}{ids}\n",
            text_of(group, "id"),
            text_of(group, "name"),
            group["bk_biz_id"],
            plural(hosts.len(), "host"),
        ));
    }
    out
}

fn node_line(node: &Value) -> String {
    format!(
        "{} {} {:?}: {}",
        text_of(node, "bk_obj_id"),
        node["bk_inst_id"],
        text_of(node, "name"),
        plural(items(&node["host_ids"]).len(), "host")
    )
}

/// The nodes below `parent`, indented by depth; `seen` guards against a cycle.
fn children<'a>(
    out: &mut String,
    nodes: &'a [Value],
    parent: (&str, i64),
    depth: usize,
    seen: &mut HashSet<(&'a str, Option<i64>)>,
) {
    for node in nodes {
        let of = &node["parent"];
        if text_of(of, "bk_obj_id") != parent.0 || of["bk_inst_id"].as_i64() != Some(parent.1) {
            continue;
        }
        let (kind, id) = (text_of(node, "bk_obj_id"), node["bk_inst_id"].as_i64());
        if !seen.insert((kind, id)) {
            continue;
        }
        out.push_str(&"  ".repeat(depth));
        out.push_str(&node_line(node));
        out.push('\n');
        if let Some(id) = id {
            children(out, nodes, (kind, id), depth + 1, seen);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_topology_is_a_tree_with_host_counts() {
        let data = json!({
            "businesses": [{"bk_biz_id": 2, "name": "demo", "host_ids": [1, 2, 3], "nodes": [
                {"bk_obj_id": "module", "bk_inst_id": 110, "name": "mysql",
                 "parent": {"bk_obj_id": "set", "bk_inst_id": 11}, "host_ids": [3]},
                {"bk_obj_id": "set", "bk_inst_id": 10, "name": "web",
                 "parent": {"bk_obj_id": "biz", "bk_inst_id": 2}, "host_ids": [1, 2]},
                {"bk_obj_id": "set", "bk_inst_id": 11, "name": "db",
                 "parent": {"bk_obj_id": "biz", "bk_inst_id": 2}, "host_ids": [3]},
                {"bk_obj_id": "module", "bk_inst_id": 100, "name": "nginx",
                 "parent": {"bk_obj_id": "set", "bk_inst_id": 10}, "host_ids": []},
            ]}],
            "business_sets": [{"bk_biz_set_id": 9, "name": "all demo", "members": [2, 3]}],
            "dynamic_groups": [{"id": "web-servers", "name": "web", "bk_biz_id": 2, "host_ids": [1, 2]}],
        });
        assert_eq!(
            tree(&data),
            "business 2 \"demo\": 3 hosts
  set 10 \"web\": 2 hosts
    module 100 \"nginx\": 0 hosts
  set 11 \"db\": 1 host
    module 110 \"mysql\": 1 host
business set 9 \"all demo\": businesses 2, 3
dynamic group web-servers \"web\" in business 2: 2 hosts: 1, 2
"
        );
    }
}
