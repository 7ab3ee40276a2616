//! Hosts and topology: every host the viewer may see with its agent's online state and version,
//! searchable by address, name or agent; and each visible business's sets and modules.

use std::{collections::HashMap, fmt::Write as _, sync::Arc};

use axum::{
    extract::{Query, State},
    http::HeaderMap,
};
use fleetrun_inventory::{Parent, Scope};
use serde::Deserialize;

use super::{
    Console, Page, Refusal,
    html::{self, esc, url},
    page_scope, scope_select,
};

const HOSTS_PER_PAGE: usize = 100;

#[derive(Debug, Deserialize, Default)]
pub struct HostsQuery {
    q: Option<String>,
    /// `online`, `offline` or empty.
    state: Option<String>,
    page: Option<usize>,
}

pub async fn list(
    State(console): State<Arc<Console>>,
    headers: HeaderMap,
    Query(q): Query<HostsQuery>,
) -> Page {
    let (viewer, _) = console.viewer(&headers)?;
    let inventory = console.shared.inventory.current().await?;
    let agents: HashMap<i64, fleetrun_store::HostRecord> = console
        .shared
        .store
        .hosts()
        .await?
        .into_iter()
        .map(|h| (h.bk_host_id, h))
        .collect();
    let needle = q.q.as_deref().map(str::trim).filter(|s| !s.is_empty());
    let state = q.state.as_deref().unwrap_or("");
    if !["", "online", "offline"].contains(&state) {
        return Err(Refusal::BadInput(format!(
            "state: {state:?} is not online or offline"
        )));
    }
    let hosts: Vec<&fleetrun_inventory::Host> = inventory
        .hosts()
        .iter()
        .filter(|h| viewer.may_see_business(&inventory, h.bk_biz_id))
        .filter(|h| {
            let online = agents.get(&h.bk_host_id).is_some_and(|a| a.online);
            match state {
                "online" => online,
                "offline" => !online,
                _ => true,
            }
        })
        .filter(|h| {
            needle.is_none_or(|n| {
                h.hostname.contains(n)
                    || h.ips.iter().any(|ip| ip.to_string().contains(n))
                    || h.agent_id.as_deref().is_some_and(|a| a.contains(n))
                    || h.bk_host_id.to_string() == n
            })
        })
        .collect();
    let page = q.page.unwrap_or(0).min(hosts.len() / HOSTS_PER_PAGE);
    let mut states = String::new();
    for (value, label) in [("", "any"), ("online", "online"), ("offline", "offline")] {
        let sel = if value == state { " selected" } else { "" };
        let _ = write!(states, r#"<option value="{value}"{sel}>{label}</option>"#);
    }
    let mut body = format!(
        r#"<p><a href="/console/topology">Topology</a></p><form method="get" action="/console/hosts" class="filters" role="search"><label>Address, name or agent <input name="q" id="host-search" value="{}"></label><label>Agent <select name="state">{states}</select></label><button type="submit">Search</button></form>
<div class="scroll"><table id="host-list"><thead><tr><th>Id</th><th>Address</th><th>Name</th><th>Business</th><th>Agent</th><th>Version</th><th>Last seen (UTC)</th></tr></thead><tbody>"#,
        esc(needle.unwrap_or(""))
    );
    for h in hosts
        .iter()
        .skip(page * HOSTS_PER_PAGE)
        .take(HOSTS_PER_PAGE)
    {
        let agent = agents.get(&h.bk_host_id);
        let online = agent.is_some_and(|a| a.online);
        let ips: Vec<String> = h
            .ips
            .iter()
            .map(|ip| format!("{}:{ip}", h.bk_cloud_id))
            .collect();
        let business = h
            .bk_biz_id
            .map(|b| {
                inventory
                    .business(b)
                    .map(|biz| format!("{} ({b})", biz.name))
                    .unwrap_or_else(|| b.to_string())
            })
            .unwrap_or_else(|| "unassigned".to_owned());
        let _ = write!(
            body,
            r#"<tr><td>{id}</td><td>{ips}</td><td>{name}</td><td>{business}</td><td><span class="badge {class}">{state}</span></td><td>{version}</td><td>{seen}</td></tr>"#,
            id = h.bk_host_id,
            ips = esc(&ips.join(", ")),
            name = esc(&h.hostname),
            business = esc(&business),
            class = if online { "ok" } else { "bad" },
            state = if online {
                "online"
            } else if agent.is_some() {
                "offline"
            } else {
                "no agent"
            },
            version = esc(agent.map(|a| a.agent_version.as_str()).unwrap_or("")),
            seen = html::time(agent.map(|a| a.last_seen)),
        );
    }
    body.push_str("</tbody></table></div>");
    let base = format!(
        "/console/hosts?q={}&amp;state={}",
        url(needle.unwrap_or("")),
        url(state)
    );
    body.push_str(&html::pager(
        &base,
        page as i64,
        HOSTS_PER_PAGE as i64,
        hosts.len() as i64,
    ));
    Ok(html::page(&viewer, "Hosts", &body))
}

#[derive(Debug, Deserialize, Default)]
pub struct TopologyQuery {
    scope: Option<String>,
}

pub async fn topology(
    State(console): State<Arc<Console>>,
    headers: HeaderMap,
    Query(q): Query<TopologyQuery>,
) -> Page {
    let (viewer, _) = console.viewer(&headers)?;
    let (kind, id) = page_scope(&console.shared, &viewer, q.scope.as_deref())?;
    let scope_text = format!("{kind}:{id}");
    let scope: Scope = scope_text
        .parse()
        .map_err(|_| Refusal::BadInput("scope".to_owned()))?;
    let inventory = console.shared.inventory.current().await?;
    let businesses = inventory.businesses_in(&scope).unwrap_or_default().to_vec();
    let mut counts: HashMap<i64, usize> = HashMap::new();
    for h in inventory.hosts() {
        for m in &h.modules {
            *counts.entry(*m).or_default() += 1;
        }
    }
    let mut body = format!(
        r#"<form method="get" action="/console/topology" class="filters"><label>Scope {}</label><button type="submit">Show</button></form><ul class="tree" id="topology">"#,
        scope_select(&console.shared, &viewer, &scope_text)
    );
    for biz in &businesses {
        let name = inventory
            .business(*biz)
            .map(|b| b.name.clone())
            .unwrap_or_default();
        let _ = write!(body, "<li><strong>business {} ({biz})</strong>", esc(&name));
        render_children(&inventory, &Parent::Business(*biz), &counts, &mut body);
        body.push_str("</li>");
    }
    body.push_str("</ul>");
    Ok(html::page(&viewer, "Topology", &body))
}

fn render_children(
    inventory: &fleetrun_inventory::Inventory,
    parent: &Parent,
    counts: &HashMap<i64, usize>,
    out: &mut String,
) {
    let children: Vec<_> = inventory
        .topology()
        .iter()
        .filter(|n| &n.parent == parent)
        .collect();
    if children.is_empty() {
        return;
    }
    out.push_str("<ul>");
    for node in children {
        let hosts = if node.is_module() {
            format!(
                " — {} host(s)",
                counts.get(&node.bk_inst_id).copied().unwrap_or(0)
            )
        } else {
            String::new()
        };
        let _ = write!(
            out,
            "<li>{} {} ({}){hosts}",
            esc(&node.bk_obj_id),
            esc(&node.name),
            node.bk_inst_id
        );
        render_children(
            inventory,
            &Parent::Node {
                bk_obj_id: node.bk_obj_id.clone(),
                bk_inst_id: node.bk_inst_id,
            },
            counts,
            out,
        );
        out.push_str("</li>");
    }
    out.push_str("</ul>");
}
