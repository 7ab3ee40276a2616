//! The script library: scripts of a scope, a script's versions, a diff between two versions,
//! and publishing or disabling a version.

use std::{fmt::Write as _, sync::Arc};

use axum::{
    body::Body,
    extract::{Path, Query, State},
    http::HeaderMap,
    response::{IntoResponse, Redirect},
};
use fleetrun_api::VersionStatus;
use fleetrun_store::{ScriptFilter, ScriptsError};
use serde::Deserialize;
use serde_json::json;

use super::{
    Console, Page, Refusal, checked_form, checked_scope,
    html::{self, esc, url},
    page_scope, require_operator, scope_select,
};

const SCRIPTS_PER_PAGE: i64 = 50;
/// Versions listed on a script's page.
const VERSIONS: i64 = 100;

impl From<ScriptsError> for Refusal {
    fn from(e: ScriptsError) -> Self {
        match e {
            ScriptsError::Store(e) => Refusal::Internal(e.to_string()),
            other => Refusal::NotFound(other.to_string()),
        }
    }
}

#[derive(Debug, Deserialize, Default)]
pub struct ListQuery {
    scope: Option<String>,
    name: Option<String>,
    page: Option<i64>,
}

pub async fn list(
    State(console): State<Arc<Console>>,
    headers: HeaderMap,
    Query(q): Query<ListQuery>,
) -> Page {
    let (viewer, _) = console.viewer(&headers)?;
    let (scope_type, scope_id) = page_scope(&console.shared, &viewer, q.scope.as_deref())?;
    let scope = format!("{scope_type}:{scope_id}");
    let page = q.page.unwrap_or(0).clamp(0, 1_000_000);
    let name = q.name.as_deref().map(str::trim).filter(|n| !n.is_empty());
    let (total, scripts) = console
        .shared
        .store
        .list_scripts(&ScriptFilter {
            bk_scope_type: scope_type,
            bk_scope_id: scope_id,
            name: name.map(str::to_owned),
            script_language: None,
            start: page * SCRIPTS_PER_PAGE,
            length: SCRIPTS_PER_PAGE,
        })
        .await?;
    let mut body = format!(
        r#"<form method="get" action="/console/scripts" class="filters" role="search"><label>Scope {}</label><label>Name <input name="name" value="{}"></label><button type="submit">Filter</button></form>"#,
        scope_select(&console.shared, &viewer, &scope),
        esc(name.unwrap_or(""))
    );
    if scripts.is_empty() {
        body.push_str(r#"<p class="empty">No scripts.</p>"#);
    } else {
        body.push_str(r#"<div class="scroll"><table id="scripts"><thead><tr><th>Name</th><th>Language</th><th>Online version</th><th>Changed by</th><th>Changed (UTC)</th></tr></thead><tbody>"#);
        for s in &scripts {
            let _ = write!(
                body,
                r#"<tr><td><a href="/console/scripts/{id}?scope={scope}">{name}</a></td><td>{lang}</td><td>{online}</td><td>{user}</td><td>{time}</td></tr>"#,
                id = url(&s.script_id),
                scope = url(&scope),
                name = esc(&s.name),
                lang = html::language(s.script_language),
                online = s
                    .online_script_version_id
                    .map(|v| v.to_string())
                    .unwrap_or_else(|| "none".to_owned()),
                user = esc(&s.last_modify_user),
                time = html::time(Some(s.last_modify_time)),
            );
        }
        body.push_str("</tbody></table></div>");
    }
    let base = format!(
        "/console/scripts?scope={}&amp;name={}",
        url(&scope),
        url(name.unwrap_or(""))
    );
    body.push_str(&html::pager(&base, page, SCRIPTS_PER_PAGE, total));
    Ok(html::page(&viewer, "Scripts", &body))
}

#[derive(Debug, Deserialize, Default)]
pub struct ScriptQuery {
    scope: Option<String>,
}

pub async fn script(
    State(console): State<Arc<Console>>,
    headers: HeaderMap,
    Path(script_id): Path<String>,
    Query(q): Query<ScriptQuery>,
) -> Page {
    let (viewer, _) = console.viewer(&headers)?;
    let (scope_type, scope_id) = page_scope(&console.shared, &viewer, q.scope.as_deref())?;
    let scope = format!("{scope_type}:{scope_id}");
    let store = &console.shared.store;
    let script = store.script(&scope_type, &scope_id, &script_id).await?;
    let (_, versions) = store
        .list_script_versions((&scope_type, &scope_id), &script_id, 0, VERSIONS)
        .await?;
    let mut body = format!(
        r#"<p><a href="/console/scripts?scope={scope_url}">← scripts</a></p><p>{desc}</p>
<form method="get" action="/console/scripts/{id}/diff" class="filters"><input type="hidden" name="scope" value="{scope}">
<label>Compare <select name="a" id="diff-a">{options}</select></label><label>with <select name="b" id="diff-b">{options_b}</select></label><button type="submit" id="diff">Diff</button></form>
<div class="scroll"><table id="versions"><thead><tr><th>Id</th><th>Version</th><th>Status</th><th>Description</th><th>By</th><th>Changed (UTC)</th><th></th></tr></thead><tbody>"#,
        scope_url = url(&scope),
        scope = esc(&scope),
        id = url(&script_id),
        desc = esc(&script.description),
        options = version_options(&versions, versions.get(1).map(|v| v.id)),
        options_b = version_options(&versions, versions.first().map(|v| v.id)),
    );
    for v in &versions {
        let status = VersionStatus::from_code(v.status);
        let mut actions = String::new();
        if viewer.role == super::Role::Operator {
            for (action, label, allowed) in [
                (
                    "publish",
                    "Publish",
                    !matches!(status, VersionStatus::Online | VersionStatus::Disabled),
                ),
                // Only a published version (online or offline) can be disabled.
                ("disable", "Disable", status.is_runnable()),
            ] {
                if allowed {
                    let _ = write!(
                        actions,
                        r#"<form method="post" action="/console/scripts/{id}/versions/{vid}/{action}" class="inline"><input type="hidden" name="csrf" value="{csrf}"><input type="hidden" name="scope" value="{scope}"><button type="submit">{label}</button></form>"#,
                        id = url(&script_id),
                        vid = v.id,
                        csrf = esc(&viewer.csrf),
                        scope = esc(&scope),
                    );
                }
            }
        }
        let _ = write!(
            body,
            r#"<tr><td>{id}</td><td>{version}</td><td><span class="badge {class}">{status}</span></td><td>{desc}</td><td>{user}</td><td>{time}</td><td>{actions}</td></tr>"#,
            id = v.id,
            version = esc(&v.version),
            class = if status == VersionStatus::Online {
                "ok"
            } else {
                "wait"
            },
            status = status.name().unwrap_or("unknown"),
            desc = esc(&v.version_desc),
            user = esc(&v.last_modify_user),
            time = html::time(Some(v.last_modify_time)),
        );
    }
    body.push_str("</tbody></table></div>");
    if let Some(latest) = versions.first() {
        let _ = write!(
            body,
            r#"<h2>Version {} ({})</h2><pre class="script">{}</pre>"#,
            esc(&latest.version),
            html::language(script.script_language),
            esc(&String::from_utf8_lossy(&latest.content))
        );
    }
    Ok(html::page(
        &viewer,
        &format!("Script {}", script.name),
        &body,
    ))
}

fn version_options(
    versions: &[fleetrun_store::ScriptVersionRecord],
    selected: Option<i64>,
) -> String {
    let mut out = String::new();
    for v in versions {
        let sel = if Some(v.id) == selected {
            " selected"
        } else {
            ""
        };
        let _ = write!(
            out,
            r#"<option value="{}"{sel}>{} ({})</option>"#,
            v.id,
            esc(&v.version),
            v.id
        );
    }
    out
}

#[derive(Debug, Deserialize, Default)]
pub struct DiffQuery {
    scope: Option<String>,
    a: Option<i64>,
    b: Option<i64>,
}

pub async fn diff(
    State(console): State<Arc<Console>>,
    headers: HeaderMap,
    Path(script_id): Path<String>,
    Query(q): Query<DiffQuery>,
) -> Page {
    let (viewer, _) = console.viewer(&headers)?;
    let (scope_type, scope_id) = page_scope(&console.shared, &viewer, q.scope.as_deref())?;
    let (Some(a), Some(b)) = (q.a, q.b) else {
        return Err(Refusal::BadInput("a, b: name two version ids".to_owned()));
    };
    let store = &console.shared.store;
    let old = store.script_version(&scope_type, &scope_id, a).await?;
    let new = store.script_version(&scope_type, &scope_id, b).await?;
    if old.script_id != script_id || new.script_id != script_id {
        return Err(Refusal::NotFound(format!(
            "script {script_id}: no such versions"
        )));
    }
    let old_text = String::from_utf8_lossy(&old.content);
    let new_text = String::from_utf8_lossy(&new.content);
    let body = format!(
        r#"<p><a href="/console/scripts/{id}?scope={scope}">← versions</a></p><pre class="diff" id="diff-text">{diff}</pre>"#,
        id = url(&script_id),
        scope = url(&format!("{scope_type}:{scope_id}")),
        diff = render_diff(&old_text, &new_text),
    );
    Ok(html::page(
        &viewer,
        &format!("{}: {} → {}", old.name, old.version, new.version),
        &body,
    ))
}

/// A unified line diff as HTML: removed lines `<del>`, added lines `<ins>`.
pub fn render_diff(old: &str, new: &str) -> String {
    let diff = similar::TextDiff::from_lines(old, new);
    let mut out = String::new();
    for change in diff.iter_all_changes() {
        let line = esc(change.value().strip_suffix('\n').unwrap_or(change.value()));
        match change.tag() {
            similar::ChangeTag::Delete => {
                let _ = writeln!(out, "<del>- {line}</del>");
            }
            similar::ChangeTag::Insert => {
                let _ = writeln!(out, "<ins>+ {line}</ins>");
            }
            similar::ChangeTag::Equal => {
                let _ = writeln!(out, "  {line}");
            }
        }
    }
    out
}

pub async fn change_version(
    State(console): State<Arc<Console>>,
    headers: HeaderMap,
    Path((script_id, version, action)): Path<(String, i64, String)>,
    body: Body,
) -> Page {
    let (viewer, form) = checked_form(&console, &headers, body).await?;
    require_operator(&viewer)?;
    let (scope_type, scope_id) = checked_scope(
        &console.shared,
        &viewer,
        form.text("scope").unwrap_or_default(),
    )?;
    let api = match action.as_str() {
        "publish" => "publish_script_version",
        "disable" => "disable_script_version",
        other => return Err(Refusal::NotFound(format!("no action {other:?}"))),
    };
    console
        .call(
            &viewer,
            api,
            json!({
                "bk_scope_type": scope_type,
                "bk_scope_id": scope_id,
                "script_id": script_id,
                "script_version_id": version,
            }),
        )
        .await?;
    Ok(Redirect::to(&format!(
        "/console/scripts/{}?scope={}",
        url(&script_id),
        url(&format!("{scope_type}:{scope_id}"))
    ))
    .into_response())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_diff_marks_removed_and_added_lines_and_escapes_them() {
        let out = render_diff("echo a\necho <b>\n", "echo a\necho c\n");
        assert_eq!(
            out,
            "  echo a\n<del>- echo &lt;b&gt;</del>\n<ins>+ echo c</ins>\n"
        );
    }
}
