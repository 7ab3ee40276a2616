//! `fleetrun inventory`: the inventory as a document kept in numbered revisions — show it, list
//! its history, replace it, change it from a list of changes, reload the controller's file — and
//! [`commit`], which every command that changes one entry ends in.

use std::path::Path;

use serde_json::{Value, json};

use crate::{
    admin,
    args::{InventoryCommand, Output},
    commands::{Ctx, now_ms, print, read_script},
    display,
    error::{CliError, exit},
    library::{items, print_doc, text_of},
};

pub async fn run(ctx: &Ctx, command: &InventoryCommand) -> Result<u8, CliError> {
    match command {
        InventoryCommand::Show { revision, out } => show(ctx, *revision, out.as_deref()).await,
        InventoryCommand::Apply { file, expect } => apply(ctx, file, expect.expect_revision).await,
        InventoryCommand::History { limit } => history(ctx, *limit).await,
        InventoryCommand::Change { file, expect } => {
            let content = read_script(file)
                .map_err(|e| CliError::usage(format!("cannot read {}: {e}", file.display())))?;
            let (changes, expected) = parse_changes(&content, file)?;
            commit(ctx, changes, expect.expect_revision.or(expected)).await
        }
        InventoryCommand::Reload { force } => reload(ctx, *force).await,
        InventoryCommand::UnlistedAgents { .. } => {
            let (change, expect) = admin::unlisted_agents_change(command)?;
            commit(ctx, vec![change], expect.expect_revision).await
        }
    }
}

/// Sends `changes` as one `change_inventory` and prints the revision they made.
pub async fn commit(ctx: &Ctx, changes: Vec<Value>, expect: Option<i64>) -> Result<u8, CliError> {
    let mut body = json!({ "changes": changes });
    if let Some(revision) = expect {
        body["expected_revision"] = json!(revision);
    }
    let data = ctx.client.call("change_inventory", body).await?;
    match ctx.output {
        Output::Text if ctx.quiet => print(&format!("{}\n", data["revision"]))?,
        Output::Text => print(&format!(
            "revision {}: {}\n",
            data["revision"],
            text_of(&data, "summary")
        ))?,
        _ => print_doc(ctx, &data)?,
    }
    Ok(exit::OK)
}

/// A change file: a JSON list of changes, or `{"changes": [...], "expected_revision": N}`.
fn parse_changes(content: &[u8], file: &Path) -> Result<(Vec<Value>, Option<i64>), CliError> {
    let name = file.display();
    let doc: Value = serde_json::from_slice(content)
        .map_err(|e| CliError::usage(format!("{name} is not JSON: {e}")))?;
    let (changes, expected) = match doc {
        Value::Array(changes) => (changes, None),
        Value::Object(mut request) => {
            let changes = match request.remove("changes") {
                Some(Value::Array(changes)) => changes,
                _ => {
                    return Err(CliError::usage(format!(
                        "{name}: \"changes\" must be a list of changes"
                    )));
                }
            };
            let expected = match request.remove("expected_revision") {
                None | Some(Value::Null) => None,
                Some(revision) => Some(revision.as_i64().ok_or_else(|| {
                    CliError::usage(format!("{name}: \"expected_revision\" must be a number"))
                })?),
            };
            if let Some(key) = request.keys().next() {
                return Err(CliError::usage(format!(
                    "{name}: unknown key {key:?}: the file holds \"changes\" and \
                     \"expected_revision\", or just the list of changes"
                )));
            }
            (changes, expected)
        }
        _ => {
            return Err(CliError::usage(format!(
                "{name}: expected a list of changes or {{\"changes\": [...]}}"
            )));
        }
    };
    if changes.is_empty() {
        return Err(CliError::usage(format!(
            "{name}: the list of changes is empty"
        )));
    }
    for (i, change) in changes.iter().enumerate() {
        if !change["op"].is_string() {
            return Err(CliError::usage(format!(
                "{name}: changes[{i}] is not an object with an \"op\" (create_node, move_hosts, ...)"
            )));
        }
    }
    Ok((changes, expected))
}

/// "revision 8 (api, by alice, 3m ago): create_node set:12".
fn about(revision: &Value, now: i64) -> String {
    let mut origin = vec![text_of(revision, "source").to_owned()];
    let operator = text_of(revision, "operator");
    if !operator.is_empty() {
        origin.push(format!("by {operator}"));
    }
    if let Some(ms) = revision["created_at"].as_i64() {
        origin.push(display::age(ms, now));
    }
    origin.retain(|s| !s.is_empty());
    let summary = text_of(revision, "summary");
    let summary = if summary.is_empty() {
        String::new()
    } else {
        format!(": {summary}")
    };
    format!(
        "revision {} ({}){summary}",
        revision["revision"],
        origin.join(", ")
    )
}

async fn show(ctx: &Ctx, revision: Option<i64>, out: Option<&Path>) -> Result<u8, CliError> {
    let mut body = json!({});
    if let Some(revision) = revision {
        body["revision"] = json!(revision);
    }
    let data = ctx.client.call("get_inventory", body).await?;
    let text = text_of(&data, "text");
    if let Some(path) = out {
        std::fs::write(path, text)
            .map_err(|e| CliError::usage(format!("cannot write {}: {e}", path.display())))?;
    }
    if ctx.output != Output::Text {
        print_doc(ctx, &data)?;
        return Ok(exit::OK);
    }
    if !ctx.quiet {
        eprintln!("{}", about(&data, now_ms()));
    }
    match out {
        Some(path) if !ctx.quiet => print(&format!(
            "revision {} written to {}\n",
            data["revision"],
            path.display()
        ))?,
        Some(_) => {}
        None => print(text)?,
    }
    Ok(exit::OK)
}

async fn apply(ctx: &Ctx, file: &Path, expect: Option<i64>) -> Result<u8, CliError> {
    let content = read_script(file)
        .map_err(|e| CliError::usage(format!("cannot read {}: {e}", file.display())))?;
    let text = String::from_utf8(content)
        .map_err(|_| CliError::usage(format!("{} is not UTF-8 text", file.display())))?;
    let mut body = json!({ "text": text });
    if let Some(revision) = expect {
        body["expected_revision"] = json!(revision);
    }
    let data = ctx.client.call("replace_inventory", body).await?;
    match ctx.output {
        Output::Text if ctx.quiet => print(&format!("{}\n", data["revision"]))?,
        Output::Text => print(&format!(
            "revision {} (was {})\n",
            data["revision"], data["previous_revision"]
        ))?,
        _ => print_doc(ctx, &data)?,
    }
    Ok(exit::OK)
}

async fn history(ctx: &Ctx, limit: i64) -> Result<u8, CliError> {
    let data = ctx
        .client
        .call("get_inventory_history", json!({ "limit": limit }))
        .await?;
    match ctx.output {
        Output::Json => print_doc(ctx, &data)?,
        Output::Jsonl => {
            for revision in items(&data) {
                print(&format!("{revision}\n"))?;
            }
        }
        Output::Text => {
            let now = now_ms();
            let mut rows = vec![
                ["REVISION", "TIME", "SOURCE", "OPERATOR", "SUMMARY"]
                    .map(String::from)
                    .to_vec(),
            ];
            for revision in items(&data) {
                let operator = text_of(revision, "operator");
                rows.push(vec![
                    revision["revision"].to_string(),
                    revision["created_at"]
                        .as_i64()
                        .map_or_else(|| "-".to_owned(), |ms| display::age(ms, now)),
                    text_of(revision, "source").to_owned(),
                    if operator.is_empty() { "-" } else { operator }.to_owned(),
                    text_of(revision, "summary").to_owned(),
                ]);
            }
            print(&display::table(&rows))?;
        }
    }
    Ok(exit::OK)
}

async fn reload(ctx: &Ctx, force: bool) -> Result<u8, CliError> {
    let data = ctx
        .client
        .call("reload_inventory", json!({"force": force}))
        .await?;
    match ctx.output {
        Output::Text => match (data["revision"].as_i64(), data["imported"].as_bool()) {
            (Some(revision), Some(false)) => print(&format!(
                "inventory file unchanged since it was imported: revision {revision} stays \
                 (--force imports it anyway)\n"
            ))?,
            (Some(revision), _) => print(&format!("inventory reloaded: revision {revision}\n"))?,
            (None, _) => print("inventory reloaded\n")?,
        },
        _ => print_doc(ctx, &data)?,
    }
    Ok(exit::OK)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn parse(text: &str) -> Result<(Vec<Value>, Option<i64>), String> {
        parse_changes(text.as_bytes(), Path::new("c.json")).map_err(|e| e.to_string())
    }

    #[test]
    fn a_change_file_is_a_list_or_a_request() {
        let one = r#"{"op": "delete_business", "bk_biz_id": 5}"#;
        let (changes, expected) = parse(&format!("[{one}]")).unwrap();
        assert_eq!((changes.len(), expected), (1, None));
        let (changes, expected) = parse(&format!(
            r#"{{"changes": [{one}, {one}], "expected_revision": 7}}"#
        ))
        .unwrap();
        assert_eq!((changes.len(), expected), (2, Some(7)));
        assert!(parse("[").unwrap_err().contains("is not JSON"));
        assert!(parse("[]").unwrap_err().contains("empty"));
        assert!(
            parse(r#"[{"bk_biz_id": 5}]"#)
                .unwrap_err()
                .contains("changes[0]")
        );
        assert!(
            parse(r#"{"change": []}"#)
                .unwrap_err()
                .contains("\"changes\"")
        );
        assert!(
            parse(&format!(r#"{{"changes": [{one}], "dry_run": true}}"#))
                .unwrap_err()
                .contains("unknown key \"dry_run\"")
        );
        assert!(parse("7").is_err());
    }

    #[test]
    fn a_revision_says_where_it_came_from() {
        let revision = json!({"revision": 8, "source": "api", "operator": "alice",
            "created_at": 1_000, "summary": "create_node set:12"});
        assert_eq!(
            about(&revision, 181_000),
            "revision 8 (api, by alice, 3m ago): create_node set:12"
        );
        let revision = json!({"revision": 1, "source": "file", "operator": null, "summary": ""});
        assert_eq!(about(&revision, 0), "revision 1 (file)");
    }
}
