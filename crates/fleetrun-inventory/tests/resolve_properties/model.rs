//! The model resolution is checked against: it scans every host and node for every request and
//! evaluates conditions from scratch, sharing no code with the indexes it checks.

use std::net::IpAddr;

use fleetrun_inventory::{
    Condition, Host, InventoryParts, MAX_TARGET_HOSTS, ObjectKind, Op, Parent, ResolveError, Scope,
    Targets, TopoNode, Value, Via,
};

/// What the model resolves to: (host id, cloud, address, way) per host.
pub type Expected = Result<Vec<(i64, i64, IpAddr, Via)>, ResolveError>;

/// Resolution by scanning everything.
pub fn resolve(parts: &InventoryParts, scope: &Scope, targets: &Targets) -> Expected {
    let businesses: Vec<i64> = match *scope {
        Scope::Biz(b) if parts.businesses.iter().any(|x| x.bk_biz_id == b) => vec![b],
        Scope::BizSet(s) => match parts.business_sets.iter().find(|x| x.bk_biz_set_id == s) {
            Some(set) => set.members.clone(),
            None => return Err(ResolveError::UnknownScope(*scope)),
        },
        _ => return Err(ResolveError::UnknownScope(*scope)),
    };
    let in_scope = |h: &Host| h.bk_biz_id.is_some_and(|b| businesses.contains(&b));
    let host_ids = targets.host_ids.clone().unwrap_or_default();
    let ips = if host_ids.is_empty() {
        targets.ips.clone().unwrap_or_default()
    } else {
        Vec::new()
    };
    if host_ids.is_empty()
        && ips.is_empty()
        && targets.topo_nodes.is_empty()
        && targets.dynamic_groups.is_empty()
    {
        return Err(ResolveError::Empty);
    }
    let mut sorted: Vec<&Host> = parts.hosts.iter().collect();
    sorted.sort_by_key(|h| h.bk_host_id);

    let mut named: Vec<(&Host, Via, Option<IpAddr>)> = Vec::new();
    let mut unknown = Vec::new();
    let mut outside = Vec::new();
    for id in &host_ids {
        match sorted.iter().find(|h| h.bk_host_id == *id) {
            None => unknown.push(id.to_string()),
            Some(h) if in_scope(h) => named.push((h, Via::HostId, None)),
            Some(_) => outside.push(*id),
        }
    }
    for (cloud, text) in &ips {
        let Ok(ip) = text.parse::<IpAddr>() else {
            unknown.push(format!("{cloud}:{text}"));
            continue;
        };
        let ip = ip.to_canonical();
        let claims = |h: &&&Host| h.bk_cloud_id == *cloud && h.ips.contains(&ip);
        let holder = sorted.iter().filter(|h| h.bk_biz_id.is_some()).find(claims);
        match holder {
            Some(h) if in_scope(h) => named.push((h, Via::Ip, Some(ip))),
            Some(h) => outside.push(h.bk_host_id),
            None => {
                let idle: Vec<i64> = sorted
                    .iter()
                    .filter(|h| h.bk_biz_id.is_none())
                    .filter(claims)
                    .map(|h| h.bk_host_id)
                    .collect();
                if idle.is_empty() {
                    unknown.push(format!("{cloud}:{ip}"));
                }
                outside.extend(idle);
            }
        }
    }
    let node = |obj: &str, inst: i64| find_node(parts, obj, inst);
    let business_of = |n: &TopoNode| business_of(parts, n);
    let mut unknown_nodes = Vec::new();
    for (obj, inst) in &targets.topo_nodes {
        let found = if obj == "biz" {
            businesses.contains(inst)
        } else {
            node(obj, *inst).is_some_and(|n| businesses.contains(&business_of(n)))
        };
        if !found {
            unknown_nodes.push((obj.clone(), *inst));
        }
    }
    let group = |id: &str| {
        parts
            .dynamic_groups
            .iter()
            .find(|g| g.id == id && businesses.contains(&g.bk_biz_id))
    };
    let unknown_groups: Vec<String> = targets
        .dynamic_groups
        .iter()
        .filter(|g| group(g).is_none())
        .cloned()
        .collect();
    if !unknown.is_empty() {
        return Err(ResolveError::UnknownHosts(dedup(unknown)));
    }
    if !unknown_nodes.is_empty() {
        return Err(ResolveError::UnknownTopoNodes(dedup(unknown_nodes)));
    }
    if !unknown_groups.is_empty() {
        return Err(ResolveError::UnknownDynamicGroups(dedup(unknown_groups)));
    }
    if !outside.is_empty() {
        return Err(ResolveError::OutsideScope(dedup(outside)));
    }

    let under = |n: &TopoNode, obj: &str, inst: i64| under(parts, n, obj, inst);
    let mut out: Vec<(i64, i64, IpAddr, Via)> = Vec::new();
    let mut add = |h: &Host, via: Via, ip: Option<IpAddr>| {
        if !out.iter().any(|(id, ..)| *id == h.bk_host_id) {
            out.push((h.bk_host_id, h.bk_cloud_id, ip.unwrap_or(h.ips[0]), via));
        }
    };
    for (h, via, ip) in named {
        add(h, via, ip);
    }
    for (obj, inst) in &targets.topo_nodes {
        for h in &sorted {
            let hit = if obj == "biz" {
                h.bk_biz_id == Some(*inst)
            } else {
                h.bk_biz_id.is_some()
                    && h.modules
                        .iter()
                        .any(|m| under(node("module", *m).unwrap(), obj, *inst))
            };
            if hit {
                add(h, Via::TopoNode(obj.as_str().into(), *inst), None);
            }
        }
    }
    for id in &targets.dynamic_groups {
        let g = group(id).unwrap();
        for h in &sorted {
            if h.bk_biz_id != Some(g.bk_biz_id) {
                continue;
            }
            let host_ok = g
                .conditions
                .iter()
                .filter(|c| c.object == ObjectKind::Host)
                .all(|c| host_holds(h, c));
            let node_conditions: Vec<&Condition> = g
                .conditions
                .iter()
                .filter(|c| c.object != ObjectKind::Host)
                .collect();
            let nodes_ok = node_conditions.is_empty()
                || h.modules.iter().any(|m| {
                    let module = node("module", *m).unwrap();
                    let Parent::Node {
                        bk_inst_id: set, ..
                    } = &module.parent
                    else {
                        unreachable!()
                    };
                    let set = node("set", *set).unwrap();
                    node_conditions.iter().all(|c| {
                        let n = if c.object == ObjectKind::Set {
                            set
                        } else {
                            module
                        };
                        node_holds(n, c)
                    })
                });
            if host_ok && nodes_ok {
                add(h, Via::DynamicGroup(id.as_str().into()), None);
            }
        }
    }
    if out.is_empty() {
        return Err(ResolveError::NoHosts);
    }
    if out.len() > MAX_TARGET_HOSTS {
        return Err(ResolveError::TooMany(out.len()));
    }
    Ok(out)
}

fn find_node<'p>(parts: &'p InventoryParts, obj: &str, inst: i64) -> Option<&'p TopoNode> {
    parts
        .topology
        .iter()
        .find(|n| n.bk_obj_id == obj && n.bk_inst_id == inst)
}

pub fn business_of<'p>(parts: &'p InventoryParts, mut n: &'p TopoNode) -> i64 {
    loop {
        match &n.parent {
            Parent::Business(b) => return *b,
            Parent::Node {
                bk_obj_id,
                bk_inst_id,
            } => {
                n = find_node(parts, bk_obj_id, *bk_inst_id).unwrap();
            }
        }
    }
}

/// Whether the node `obj:inst` is `n` or above it.
fn under<'p>(parts: &'p InventoryParts, n: &'p TopoNode, obj: &str, inst: i64) -> bool {
    let mut at = Some(n);
    while let Some(n) = at {
        if n.bk_obj_id == obj && n.bk_inst_id == inst {
            return true;
        }
        at = match &n.parent {
            Parent::Business(_) => None,
            Parent::Node {
                bk_obj_id,
                bk_inst_id,
            } => find_node(parts, bk_obj_id, *bk_inst_id),
        };
    }
    false
}

fn dedup<T: PartialEq>(items: Vec<T>) -> Vec<T> {
    let mut out = Vec::new();
    for item in items {
        if !out.contains(&item) {
            out.push(item);
        }
    }
    out
}

/// A field value as the model sees it.
#[derive(Debug)]
enum Seen {
    Number(f64),
    Text(String),
    Address(IpAddr),
    Bool(bool),
}

fn seen(value: &Value) -> Seen {
    match value {
        Value::Integer(n) => Seen::Number(*n as f64),
        Value::Float(x) => Seen::Number(*x),
        Value::Text(s) => Seen::Text(s.clone()),
        Value::Bool(b) => Seen::Bool(*b),
    }
}

fn same(field: &Seen, wanted: &Value) -> bool {
    match (field, wanted) {
        (Seen::Address(ip), Value::Text(s)) => s.parse::<IpAddr>().ok() == Some(*ip),
        (Seen::Text(a), Value::Text(b)) => a == b,
        (Seen::Bool(a), Value::Bool(b)) => a == b,
        (Seen::Number(a), b) => wanted_number(b) == Some(*a),
        _ => false,
    }
}

fn wanted_number(v: &Value) -> Option<f64> {
    match v {
        Value::Integer(n) => Some(*n as f64),
        Value::Float(x) => Some(*x),
        _ => None,
    }
}

fn holds(values: Vec<Seen>, op: &Op) -> bool {
    values.iter().any(|v| match op {
        Op::Equal(w) => same(v, w),
        Op::NotEqual(w) => !same(v, w),
        Op::In(ws) => ws.iter().any(|w| same(v, w)),
        Op::NotIn(ws) => !ws.iter().any(|w| same(v, w)),
        Op::Contains(part) => match v {
            Seen::Text(s) => s.contains(part.as_str()),
            Seen::Address(ip) => ip.to_string().contains(part.as_str()),
            _ => false,
        },
        Op::Range { min, max } => match v {
            Seen::Number(x) => min.is_none_or(|m| *x >= m) && max.is_none_or(|m| *x <= m),
            _ => false,
        },
    })
}

fn host_holds(h: &Host, c: &Condition) -> bool {
    let values = match c.field.as_str() {
        "bk_host_id" => vec![Seen::Number(h.bk_host_id as f64)],
        "bk_cloud_id" => vec![Seen::Number(h.bk_cloud_id as f64)],
        "bk_host_innerip" => h.ips.iter().map(|ip| Seen::Address(*ip)).collect(),
        "bk_host_name" => vec![Seen::Text(h.hostname.clone())],
        "bk_os_type" => vec![Seen::Text(h.os_type.clone())],
        other => h.attributes.get(other).map(seen).into_iter().collect(),
    };
    holds(values, &c.op)
}

fn node_holds(n: &TopoNode, c: &Condition) -> bool {
    let own = if c.object == ObjectKind::Set {
        "set"
    } else {
        "module"
    };
    let values = match c.field.as_str() {
        "bk_inst_id" => vec![Seen::Number(n.bk_inst_id as f64)],
        "bk_inst_name" => vec![Seen::Text(n.name.clone())],
        f if f == format!("bk_{own}_id") => vec![Seen::Number(n.bk_inst_id as f64)],
        f if f == format!("bk_{own}_name") => vec![Seen::Text(n.name.clone())],
        other => n.attributes.get(other).map(seen).into_iter().collect(),
    };
    holds(values, &c.op)
}
