//! Quick execute: a script, its language, parameters and account, and targets picked by host id,
//! pasted addresses, topology node or dynamic group; a preview of the hosts they resolve to
//! before anything runs.

use std::{fmt::Write as _, sync::Arc};

use axum::{
    body::Body,
    extract::{Query, State},
    http::HeaderMap,
    response::{IntoResponse, Redirect},
};
use base64::Engine as _;
use fleetrun_inventory::{Inventory, Scope, Targets};
use serde::Deserialize;
use serde_json::{Value, json};

use super::{
    Console, Form, Page, Refusal, Viewer, checked_form, checked_scope,
    html::{self, esc},
    page_scope, require_operator, scope_select,
};

/// Hosts a preview lists before "and N more".
const PREVIEW_HOSTS: usize = 200;

#[derive(Debug, Deserialize, Default)]
pub struct FormQuery {
    scope: Option<String>,
}

pub async fn form(
    State(console): State<Arc<Console>>,
    headers: HeaderMap,
    Query(q): Query<FormQuery>,
) -> Page {
    let (viewer, _) = console.viewer(&headers)?;
    let scope = page_scope(&console.shared, &viewer, q.scope.as_deref())?;
    let inventory = console.shared.inventory.current().await?;
    let body = render_form(&console, &viewer, &inventory, &scope, &Form::default(), "");
    Ok(html::page(&viewer, "Quick execute", &body))
}

pub async fn submit(State(console): State<Arc<Console>>, headers: HeaderMap, body: Body) -> Page {
    let (viewer, form) = checked_form(&console, &headers, body).await?;
    let scope = checked_scope(
        &console.shared,
        &viewer,
        form.text("scope").unwrap_or_default(),
    )?;
    let inventory = console.shared.inventory.current().await?;
    let targets = targets(&form)?;
    // Same question, same answer, whatever the viewer may not see.
    let resolved = refuse_unseen(&viewer, &inventory, &targets).and_then(|()| {
        let inventory_scope: Scope = format!("{}:{}", scope.0, scope.1)
            .parse()
            .map_err(|_| Refusal::BadInput("scope".to_owned()))?;
        inventory
            .resolve(&inventory_scope, &targets)
            .map_err(|e| Refusal::Api(i64::from(e.code()), format!("targets: {e}")))
    });
    if form.get("action") != Some("run") {
        let preview = match resolved {
            Ok(resolved) => {
                let mut out = format!(
                    r#"<section id="preview" aria-live="polite"><h2>{} host{}</h2><ul class="hosts">"#,
                    resolved.hosts.len(),
                    if resolved.hosts.len() == 1 { "" } else { "s" }
                );
                for h in resolved.hosts.iter().take(PREVIEW_HOSTS) {
                    let name = inventory
                        .host(h.bk_host_id)
                        .map(|h| h.hostname.clone())
                        .unwrap_or_default();
                    let _ = write!(
                        out,
                        r#"<li class="preview-host">{} {}:{} <span class="muted">{}</span></li>"#,
                        h.bk_host_id,
                        h.bk_cloud_id,
                        h.ip,
                        esc(&name)
                    );
                }
                if resolved.hosts.len() > PREVIEW_HOSTS {
                    let _ = write!(
                        out,
                        "<li>and {} more</li>",
                        resolved.hosts.len() - PREVIEW_HOSTS
                    );
                }
                out.push_str("</ul></section>");
                out
            }
            Err(refusal) => format!(
                r#"<section id="preview" aria-live="polite"><p class="error" role="alert">{}</p></section>"#,
                esc(&refusal_text(&refusal))
            ),
        };
        let body = render_form(&console, &viewer, &inventory, &scope, &form, &preview);
        return Ok(html::page(&viewer, "Quick execute", &body));
    }
    require_operator(&viewer)?;
    let resolved = resolved?;
    let request = request(&scope, &form, &resolved)?;
    match console.call(&viewer, "fast_execute_script", request).await {
        Ok(reply) => {
            let id = reply["job_instance_id"].as_i64().ok_or_else(|| {
                Refusal::Internal("fast_execute_script: no job_instance_id".to_owned())
            })?;
            Ok(Redirect::to(&format!("/console/jobs/{id}")).into_response())
        }
        Err(refusal @ (Refusal::Api(..) | Refusal::BadInput(_))) => {
            let error = format!(
                r#"<section id="preview"><p class="error" role="alert">{}</p></section>"#,
                esc(&refusal_text(&refusal))
            );
            let body = render_form(&console, &viewer, &inventory, &scope, &form, &error);
            Ok(html::page(&viewer, "Quick execute", &body))
        }
        Err(other) => Err(other),
    }
}

fn refusal_text(refusal: &Refusal) -> String {
    match refusal {
        Refusal::Api(code, m) => format!("{m} (code {code})"),
        Refusal::BadInput(m) | Refusal::Forbidden(m) | Refusal::NotFound(m) => m.clone(),
        other => format!("{other:?}"),
    }
}

/// The form's targets.
fn targets(form: &Form) -> Result<Targets, Refusal> {
    let mut host_ids = Vec::new();
    for word in form
        .get("host_ids")
        .unwrap_or("")
        .split(|c: char| c == ',' || c.is_whitespace())
        .filter(|w| !w.is_empty())
    {
        host_ids.push(
            word.parse::<i64>()
                .map_err(|_| Refusal::BadInput(format!("host_ids: {word:?} is not a host id")))?,
        );
    }
    let mut ips = Vec::new();
    for word in form
        .get("ips")
        .unwrap_or("")
        .split(|c: char| c == ',' || c.is_whitespace())
        .filter(|w| !w.is_empty())
    {
        // `cloud:ip`, or an address of cloud area 0. An IPv6 address has colons of its own: a
        // cloud prefix is digits before the first colon followed by an address that parses.
        let (cloud, ip) = match word.split_once(':') {
            Some((cloud, ip))
                if cloud.bytes().all(|b| b.is_ascii_digit())
                    && ip.parse::<std::net::IpAddr>().is_ok() =>
            {
                (
                    cloud.parse::<i64>().map_err(|_| {
                        Refusal::BadInput(format!("ips: {word:?}: the cloud area is not a number"))
                    })?,
                    ip,
                )
            }
            _ => (0, word),
        };
        if ip.parse::<std::net::IpAddr>().is_err() {
            return Err(Refusal::BadInput(format!(
                "ips: {word:?} is not an address"
            )));
        }
        ips.push((cloud, ip.to_owned()));
    }
    let mut topo_nodes = Vec::new();
    for node in form.all("node") {
        let (kind, id) = node
            .split_once(':')
            .and_then(|(k, id)| Some((k, id.parse::<i64>().ok()?)))
            .ok_or_else(|| Refusal::BadInput(format!("node: {node:?} is not <type>:<id>")))?;
        topo_nodes.push((kind.to_owned(), id));
    }
    Ok(Targets {
        host_ids: (!host_ids.is_empty()).then_some(host_ids),
        ips: (!ips.is_empty()).then_some(ips),
        topo_nodes,
        dynamic_groups: form.all("group").map(str::to_owned).collect(),
    })
}

/// Host ids and addresses the viewer may not see are "not in the inventory", exactly like ones
/// that do not exist: a preview must not tell a user of one business which hosts another has.
fn refuse_unseen(viewer: &Viewer, inventory: &Inventory, targets: &Targets) -> Result<(), Refusal> {
    let seen = |h: Option<&fleetrun_inventory::Host>| {
        h.is_some_and(|h| viewer.may_see_business(inventory, h.bk_biz_id))
    };
    let mut unseen = Vec::new();
    for &id in targets.host_ids.as_deref().unwrap_or_default() {
        if !seen(inventory.host(id)) {
            unseen.push(id.to_string());
        }
    }
    if targets.host_ids.is_none() {
        for (cloud, ip) in targets.ips.as_deref().unwrap_or_default() {
            let host = ip
                .parse()
                .ok()
                .and_then(|ip| inventory.host_by_address(*cloud, ip));
            if !seen(host) {
                unseen.push(format!("{cloud}:{ip}"));
            }
        }
    }
    if unseen.is_empty() {
        return Ok(());
    }
    let error = fleetrun_inventory::ResolveError::UnknownHosts(unseen);
    Err(Refusal::Api(
        i64::from(error.code()),
        format!("targets: {error}"),
    ))
}

/// The `fast_execute_script` request for the form, on the hosts the preview showed.
fn request(
    scope: &(String, String),
    form: &Form,
    resolved: &fleetrun_inventory::Resolved,
) -> Result<Value, Refusal> {
    let b64 = base64::engine::general_purpose::STANDARD;
    let script = form.get("script").unwrap_or("").replace("\r\n", "\n");
    if script.trim().is_empty() {
        return Err(Refusal::BadInput("script: must not be empty".to_owned()));
    }
    let language: i32 = form
        .text("language")
        .unwrap_or("1")
        .parse()
        .ok()
        .filter(|l| (1..=5).contains(l))
        .ok_or_else(|| Refusal::BadInput("language: must be 1 to 5".to_owned()))?;
    let account: i64 = form
        .text("account")
        .and_then(|a| a.parse().ok())
        .ok_or_else(|| Refusal::BadInput("account: pick an account".to_owned()))?;
    let timeout: i64 = form
        .text("timeout")
        .unwrap_or("600")
        .parse()
        .ok()
        .filter(|t| (1..=86400).contains(t))
        .ok_or_else(|| Refusal::BadInput("timeout: seconds from 1 to 86400".to_owned()))?;
    let ids: Vec<i64> = resolved.hosts.iter().map(|h| h.bk_host_id).collect();
    let mut request = json!({
        "bk_scope_type": scope.0,
        "bk_scope_id": scope.1,
        "script_content": b64.encode(script.as_bytes()),
        "script_language": language,
        "account_id": account,
        "timeout": timeout,
        "is_param_sensitive": i32::from(form.get("sensitive") == Some("1")),
        "target_server": {"host_id_list": ids},
    });
    if let Some(name) = form.text("name") {
        request["task_name"] = json!(name);
    }
    if let Some(param) = form.get("params").filter(|p| !p.is_empty()) {
        request["script_param"] = json!(b64.encode(param.as_bytes()));
    }
    Ok(request)
}

fn render_form(
    console: &Console,
    viewer: &Viewer,
    inventory: &Inventory,
    scope: &(String, String),
    form: &Form,
    preview: &str,
) -> String {
    let scope_text = format!("{}:{}", scope.0, scope.1);
    let parsed: Option<Scope> = scope_text.parse().ok();
    let businesses: Vec<i64> = parsed
        .and_then(|s| inventory.businesses_in(&s).map(<[i64]>::to_vec))
        .unwrap_or_default();
    let field = |k: &str| esc(form.get(k).unwrap_or(""));
    let mut languages = String::new();
    let chosen = form.get("language").unwrap_or("1");
    for code in 1..=5 {
        let sel = if chosen == code.to_string() {
            " selected"
        } else {
            ""
        };
        let _ = write!(
            languages,
            r#"<option value="{code}"{sel}>{}</option>"#,
            html::language(code)
        );
    }
    let mut accounts = String::new();
    for a in inventory.accounts() {
        if parsed.is_some_and(|s| a.scopes.contains(&s)) {
            let sel = if form.get("account") == Some(&a.id.to_string()) {
                " selected"
            } else {
                ""
            };
            let _ = write!(
                accounts,
                r#"<option value="{}"{sel}>{} ({})</option>"#,
                a.id,
                esc(&a.alias),
                esc(&a.account)
            );
        }
    }
    let picked: Vec<&str> = form.all("node").collect();
    let mut nodes = String::new();
    for biz in &businesses {
        let value = format!("biz:{biz}");
        let name = inventory
            .business(*biz)
            .map(|b| b.name.clone())
            .unwrap_or_default();
        let sel = if picked.contains(&value.as_str()) {
            " selected"
        } else {
            ""
        };
        let _ = write!(
            nodes,
            r#"<option value="{value}"{sel}>business {}</option>"#,
            esc(&name)
        );
    }
    for node in inventory.topology() {
        if inventory
            .business_of_node(&node.bk_obj_id, node.bk_inst_id)
            .is_some_and(|b| businesses.contains(&b))
        {
            let value = format!("{}:{}", node.bk_obj_id, node.bk_inst_id);
            let sel = if picked.contains(&value.as_str()) {
                " selected"
            } else {
                ""
            };
            let _ = write!(
                nodes,
                r#"<option value="{}"{sel}>{} {}</option>"#,
                esc(&value),
                esc(&node.bk_obj_id),
                esc(&node.name)
            );
        }
    }
    let picked_groups: Vec<&str> = form.all("group").collect();
    let mut groups = String::new();
    for g in inventory.dynamic_groups() {
        if businesses.contains(&g.bk_biz_id) {
            let sel = if picked_groups.contains(&g.id.as_str()) {
                " selected"
            } else {
                ""
            };
            let _ = write!(
                groups,
                r#"<option value="{}"{sel}>{}</option>"#,
                esc(&g.id),
                esc(&g.name)
            );
        }
    }
    let run = if viewer.role == super::Role::Operator {
        r#"<button type="submit" name="action" value="run" id="run">Run</button>"#
    } else {
        r#"<span class="muted">Viewers can preview, not run.</span>"#
    };
    format!(
        r#"<form method="post" action="/console/execute" class="execute" id="execute-form">
<input type="hidden" name="csrf" value="{csrf}">
<div class="grid">
<label>Scope {scopes}</label>
<label>Job name <input name="name" id="job-name" value="{name}" maxlength="512"></label>
<label>Language <select name="language" id="language">{languages}</select></label>
<label>Account <select name="account" id="account">{accounts}</select></label>
<label>Timeout (s) <input name="timeout" id="timeout" type="number" min="1" max="86400" value="{timeout}"></label>
</div>
<label>Script <textarea name="script" id="script" rows="10" spellcheck="false" class="code" required>{script}</textarea></label>
<div class="grid">
<label>Parameters <input name="params" id="params" value="{params}" autocomplete="off"></label>
<label class="check"><input type="checkbox" name="sensitive" value="1"{sensitive}> Sensitive parameters (stored encrypted, never shown)</label>
</div>
<fieldset><legend>Targets</legend><div class="grid">
<label>Host ids <input name="host_ids" id="host-ids" value="{host_ids}" placeholder="1, 2, 3"></label>
<label>Addresses (one per line, cloud:ip or ip) <textarea name="ips" id="ips" rows="3">{ips}</textarea></label>
<label>Topology nodes <select name="node" id="nodes" multiple size="5">{nodes}</select></label>
<label>Dynamic groups <select name="group" id="groups" multiple size="5">{groups}</select></label>
</div></fieldset>
<div class="actions"><button type="submit" name="action" value="preview" id="preview-button">Preview hosts</button> {run}</div>
</form>
{preview}"#,
        csrf = esc(&viewer.csrf),
        scopes = scope_select(&console.shared, viewer, &scope_text),
        name = field("name"),
        timeout = esc(form.get("timeout").unwrap_or("600")),
        script = field("script"),
        params = field("params"),
        sensitive = if form.get("sensitive") == Some("1") {
            " checked"
        } else {
            ""
        },
        host_ids = field("host_ids"),
        ips = field("ips"),
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    fn form(pairs: &[(&str, &str)]) -> Form {
        Form(
            pairs
                .iter()
                .map(|(k, v)| ((*k).to_owned(), (*v).to_owned()))
                .collect(),
        )
    }

    #[test]
    fn targets_read_ids_addresses_nodes_and_groups() {
        let t = targets(&form(&[
            ("host_ids", "1, 2\n3"),
            ("ips", "10.0.0.1\n2:10.0.0.2 ::1"),
            ("node", "set:10"),
            ("group", "web"),
        ]))
        .unwrap();
        assert_eq!(t.host_ids, Some(vec![1, 2, 3]));
        assert_eq!(
            t.ips,
            Some(vec![
                (0, "10.0.0.1".to_owned()),
                (2, "10.0.0.2".to_owned()),
                (0, "::1".to_owned())
            ])
        );
        assert_eq!(t.topo_nodes, vec![("set".to_owned(), 10)]);
        assert_eq!(t.dynamic_groups, vec!["web".to_owned()]);
        for (field, value) in [
            ("host_ids", "1, x"),
            ("ips", "host.example"),
            ("node", "set"),
        ] {
            let Err(Refusal::BadInput(message)) = targets(&form(&[(field, value)])) else {
                panic!("{field}={value} accepted");
            };
            assert!(message.starts_with(field), "{message}");
        }
    }
}
