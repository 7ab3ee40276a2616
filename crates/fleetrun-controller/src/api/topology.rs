//! fleetrun's host list and topology view: what the inventory holds, as the caller may see it.

use serde_json::{Value, json};

use super::{ApiError, auth::Caller};
use crate::Shared;

/// fleetrun's host list: the hosts of the businesses the app may use (every host, unassigned
/// ones included, for an unrestricted app).
pub async fn list_hosts(shared: &Shared, caller: &Caller) -> Result<Value, ApiError> {
    let registered = shared.store.hosts().await?;
    let inventory = shared.inventory.current().await?;
    let conflicted: std::collections::HashSet<i64> = inventory
        .conflicts()
        .iter()
        .flat_map(|c| c.claimed_by.iter().copied())
        .collect();
    let by_agent: std::collections::HashMap<&str, &fleetrun_store::HostRecord> = registered
        .iter()
        .map(|r| (r.agent_id.as_str(), r))
        .collect();
    // With controllers sharing the database, a host connected to any live one is online.
    let elsewhere = match shared.engine.membership() {
        Some(membership) => {
            let ids: Vec<i64> = registered.iter().map(|r| r.bk_host_id).collect();
            let alive_since = membership.alive_since().await?;
            shared
                .store
                .connected_elsewhere(&ids, membership.name(), alive_since)
                .await?
        }
        None => Default::default(),
    };
    let online = |bk_host_id: i64| {
        shared.agents.get(bk_host_id).is_some() || elsewhere.contains_key(&bk_host_id)
    };
    let mut hosts: Vec<Value> = inventory
        .hosts()
        .iter()
        .filter(|h| caller.may_see_business(&inventory, h.bk_biz_id))
        .map(|h| {
            let agent = h
                .agent_id
                .as_deref()
                .and_then(|id| by_agent.get(id).copied());
            json!({
                "bk_host_id": h.bk_host_id,
                "agent_id": h.agent_id,
                "bk_cloud_id": h.bk_cloud_id,
                "ip": h.ips.first().map(|ip| ip.to_string()),
                "ips": h.ips.iter().map(|ip| ip.to_string()).collect::<Vec<_>>(),
                "hostname": h.hostname,
                "os_type": h.os_type,
                "agent_version": agent.map(|a| a.agent_version.clone()),
                "bk_biz_id": h.bk_biz_id,
                "modules": h.modules,
                "address_conflict": conflicted.contains(&h.bk_host_id),
                "online": online(h.bk_host_id),
                "last_seen": agent.map(|a| a.last_seen),
            })
        })
        .collect();
    // Agents the inventory refused (an id collision) are still listed, unplaced.
    for r in registered.iter().filter(|_| caller.is_unrestricted()) {
        if inventory.host(r.bk_host_id).is_none() {
            hosts.push(json!({
                "bk_host_id": r.bk_host_id,
                "agent_id": r.agent_id,
                "bk_cloud_id": r.bk_cloud_id,
                "ip": r.ip,
                "ips": [r.ip],
                "hostname": r.hostname,
                "os_type": r.os_type,
                "agent_version": r.agent_version,
                "bk_biz_id": null,
                "modules": [],
                "address_conflict": false,
                "online": online(r.bk_host_id),
                "last_seen": r.last_seen,
            }));
        }
    }
    Ok(Value::Array(hosts))
}

/// fleetrun's topology view: every business with its nodes and the hosts below each, and the
/// dynamic groups with the hosts they match now.
pub async fn get_topology(shared: &Shared, caller: &Caller) -> Result<Value, ApiError> {
    let inventory = shared.inventory.current().await?;
    let hosts_below = |scope: fleetrun_inventory::Scope, node: (&str, i64)| -> Vec<i64> {
        let targets = fleetrun_inventory::Targets {
            topo_nodes: vec![(node.0.to_owned(), node.1)],
            ..Default::default()
        };
        inventory
            .resolve(&scope, &targets)
            .map(|r| r.hosts.iter().map(|h| h.bk_host_id).collect())
            .unwrap_or_default()
    };
    let businesses: Vec<Value> = inventory
        .businesses()
        .iter()
        .filter(|b| caller.may_see_business(&inventory, Some(b.bk_biz_id)))
        .map(|b| {
            let scope = fleetrun_inventory::Scope::Biz(b.bk_biz_id);
            let nodes: Vec<Value> = inventory
                .topology()
                .iter()
                .filter(|n| inventory.business_of_node(&n.bk_obj_id, n.bk_inst_id) == Some(b.bk_biz_id))
                .map(|n| {
                    json!({
                        "bk_obj_id": n.bk_obj_id,
                        "bk_inst_id": n.bk_inst_id,
                        "name": n.name,
                        "parent": match &n.parent {
                            fleetrun_inventory::Parent::Business(id) => json!({"bk_obj_id": "biz", "bk_inst_id": id}),
                            fleetrun_inventory::Parent::Node { bk_obj_id, bk_inst_id } => json!({"bk_obj_id": bk_obj_id, "bk_inst_id": bk_inst_id}),
                        },
                        "host_ids": hosts_below(scope, (&n.bk_obj_id, n.bk_inst_id)),
                    })
                })
                .collect();
            json!({
                "bk_biz_id": b.bk_biz_id,
                "name": b.name,
                "host_ids": hosts_below(scope, ("biz", b.bk_biz_id)),
                "nodes": nodes,
            })
        })
        .collect();
    // A business set names its members: it is shown only to an app that may use the set itself
    // (and so every member), or not otherwise learn of them.
    let business_sets: Vec<Value> = inventory
        .business_sets()
        .iter()
        .filter(|s| caller.may_use(fleetrun_inventory::Scope::BizSet(s.bk_biz_set_id)))
        .map(|s| json!({"bk_biz_set_id": s.bk_biz_set_id, "name": s.name, "members": s.members}))
        .collect();
    let groups: Vec<Value> = inventory
        .dynamic_groups()
        .iter()
        .filter(|g| caller.may_see_business(&inventory, Some(g.bk_biz_id)))
        .map(|g| {
            let targets = fleetrun_inventory::Targets {
                dynamic_groups: vec![g.id.clone()],
                ..Default::default()
            };
            let host_ids: Vec<i64> = inventory
                .resolve(&fleetrun_inventory::Scope::Biz(g.bk_biz_id), &targets)
                .map(|r| r.hosts.iter().map(|h| h.bk_host_id).collect())
                .unwrap_or_default();
            json!({"id": g.id, "name": g.name, "bk_biz_id": g.bk_biz_id, "host_ids": host_ids})
        })
        .collect();
    Ok(
        json!({ "businesses": businesses, "business_sets": business_sets, "dynamic_groups": groups }),
    )
}
