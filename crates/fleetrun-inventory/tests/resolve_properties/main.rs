//! Resolution against a brute-force model: random small inventories (topology, hosts in random
//! modules with clashing addresses, dynamic groups with random conditions) and random requests
//! in random scopes must give the same hosts, in the same order, reached the same way, or the
//! same error. The model (`model.rs`) scans everything and shares no code with the indexes it
//! checks.

mod model;

use std::{collections::BTreeMap, net::IpAddr};

use fleetrun_inventory::{
    Business, BusinessSet, Condition, DynamicGroup, Host, Inventory, InventoryParts, ObjectKind,
    Op, Parent, Scope, Targets, TopoNode, Value,
};
use proptest::{collection::vec, option, prelude::*};

type NodeSeed = (u8, u8, u8);
type HostSeed = (u8, Vec<u8>, Vec<u8>, u8, Option<u8>, Option<u8>, bool);
type ConditionSeed = (u8, u8, u8, u8, u8);
type GroupSeed = (u8, Vec<ConditionSeed>);
type RequestSeed = (
    u8,
    Option<Vec<u8>>,
    Option<Vec<(u8, u8)>>,
    Vec<(u8, u8)>,
    Vec<u8>,
);

fn inventory_seed() -> impl Strategy<
    Value = (
        usize,
        Vec<bool>,
        Vec<NodeSeed>,
        Vec<HostSeed>,
        Vec<GroupSeed>,
        usize,
    ),
> {
    let host = (
        0..4u8,
        vec(0..8u8, 0..3),
        vec(0..6u8, 1..3),
        0..2u8,
        option::of(0..4u8),
        option::of(0..3u8),
        any::<bool>(),
    );
    let group = (0..3u8, vec((0..3u8, 0..8u8, 0..6u8, 0..6u8, 0..6u8), 0..3));
    (
        1..=3usize,
        vec(any::<bool>(), 3),
        vec((0..3u8, 0..8u8, 0..3u8), 2..14),
        vec(host, 0..14),
        vec(group, 1..5),
        0..20usize,
    )
}

fn request_seed() -> impl Strategy<Value = RequestSeed> {
    (
        0..12u8,
        option::of(vec(0..20u8, 0..3)),
        option::of(vec((0..2u8, 0..20u8), 0..3)),
        vec((0..20u8, 0..6u8), 0..3),
        vec(0..10u8, 0..3),
    )
}

const SET_MEMBERS_ID: i64 = 100;

fn build_parts(
    (n_biz, members, node_seeds, host_seeds, group_seeds, rotate): (
        usize,
        Vec<bool>,
        Vec<NodeSeed>,
        Vec<HostSeed>,
        Vec<GroupSeed>,
        usize,
    ),
) -> InventoryParts {
    let mut parts = InventoryParts::default();
    for b in 1..=n_biz as i64 {
        parts.businesses.push(Business {
            bk_biz_id: b,
            name: format!("biz{b}"),
        });
    }
    parts.business_sets.push(BusinessSet {
        bk_biz_set_id: SET_MEMBERS_ID,
        name: "set".into(),
        members: (1..=n_biz as i64)
            .filter(|b| members[*b as usize - 1])
            .collect(),
    });

    let mut next_id: BTreeMap<&str, i64> = BTreeMap::new();
    // (obj, inst, biz) of the nodes made so far.
    let mut made: Vec<(&str, i64, i64)> = Vec::new();
    for (kind, choice, biz) in node_seeds {
        let biz = 1 + biz as i64 % n_biz as i64;
        let levels: Vec<_> = made
            .iter()
            .filter(|(o, _, b)| (*o == "lvl" || *o == "zone") && *b == biz)
            .collect();
        let sets: Vec<_> = made
            .iter()
            .filter(|(o, _, b)| *o == "set" && *b == biz)
            .collect();
        let (obj, parent) = match kind {
            0 | 1 => {
                let obj = match (kind, choice / 4) {
                    (1, _) => "set",
                    (_, 0) => "lvl",
                    _ => "zone",
                };
                let pick = choice as usize % (levels.len() + 1);
                let parent = match levels.get(pick) {
                    Some((o, i, _)) => Parent::Node {
                        bk_obj_id: o.to_string(),
                        bk_inst_id: *i,
                    },
                    None => Parent::Business(biz),
                };
                (obj, parent)
            }
            _ => {
                let Some((_, set, _)) = sets.get(choice as usize % sets.len().max(1)) else {
                    continue;
                };
                (
                    "module",
                    Parent::Node {
                        bk_obj_id: "set".into(),
                        bk_inst_id: *set,
                    },
                )
            }
        };
        let id = next_id.entry(obj).or_insert(1);
        let inst = *id;
        *id += 1;
        let mut attributes = BTreeMap::new();
        if choice % 3 != 0 {
            let env = if (choice as i64 + inst) % 2 == 0 {
                "prod"
            } else {
                "test"
            };
            attributes.insert("env".to_owned(), Value::from(env));
        }
        parts.topology.push(TopoNode {
            bk_obj_id: obj.to_owned(),
            bk_inst_id: inst,
            name: format!("{obj}{}", inst % 2),
            parent,
            attributes,
        });
        made.push((obj, inst, biz));
    }

    for (i, (biz, modules, ips, cloud, cpu, rack, windows)) in host_seeds.into_iter().enumerate() {
        let bk_host_id = 1 + 2 * i as i64;
        let biz = (biz < 3).then(|| 1 + biz as i64 % n_biz as i64);
        let candidates: Vec<i64> = made
            .iter()
            .filter(|(o, _, b)| *o == "module" && Some(*b) == biz)
            .map(|(_, i, _)| *i)
            .collect();
        let mut host_modules = Vec::new();
        if !candidates.is_empty() {
            for m in modules {
                let m = candidates[m as usize % candidates.len()];
                if !host_modules.contains(&m) {
                    host_modules.push(m);
                }
            }
        }
        let mut attributes = BTreeMap::new();
        if let Some(cpu) = cpu {
            let value = if cpu == 3 {
                Value::Float(1.0)
            } else {
                Value::Integer(cpu as i64)
            };
            attributes.insert("cpu".to_owned(), value);
        }
        if let Some(rack) = rack {
            attributes.insert("rack".to_owned(), Value::Text(format!("r{rack}")));
        }
        parts.hosts.push(Host {
            bk_host_id,
            bk_cloud_id: cloud as i64,
            ips: ips.iter().map(|c| ip(*c)).collect(),
            hostname: format!("h{}", i % 3),
            os_type: if windows { "windows" } else { "linux" }.to_owned(),
            agent_id: None,
            bk_biz_id: biz,
            modules: host_modules,
            attributes,
        });
    }
    let len = parts.hosts.len().max(1);
    parts.hosts.rotate_left(rotate % len);

    for (g, (biz, conditions)) in group_seeds.into_iter().enumerate() {
        parts.dynamic_groups.push(DynamicGroup {
            id: format!("g{g}"),
            bk_biz_id: 1 + biz as i64 % n_biz as i64,
            name: String::new(),
            object: ObjectKind::Host,
            conditions: conditions.into_iter().map(condition).collect(),
        });
    }
    parts
}

fn ip(c: u8) -> IpAddr {
    format!("10.0.0.{c}").parse().unwrap()
}

fn condition((object, field, op, v, w): ConditionSeed) -> Condition {
    let (object, field) = match object {
        0 => (
            ObjectKind::Host,
            [
                "bk_host_id",
                "bk_cloud_id",
                "bk_host_innerip",
                "bk_host_name",
                "bk_os_type",
                "cpu",
                "rack",
                "missing",
            ][field as usize],
        ),
        1 => (
            ObjectKind::Set,
            [
                "bk_inst_id",
                "bk_set_id",
                "bk_inst_name",
                "bk_set_name",
                "env",
                "missing",
                "bk_module_name",
                "bk_set_id",
            ][field as usize],
        ),
        _ => (
            ObjectKind::Module,
            [
                "bk_inst_id",
                "bk_module_id",
                "bk_inst_name",
                "bk_module_name",
                "env",
                "missing",
                "bk_set_name",
                "bk_module_id",
            ][field as usize],
        ),
    };
    let value = |v: u8| match field {
        "bk_host_innerip" => Value::Text(format!("10.0.0.{v}")),
        "bk_host_name" => Value::Text(format!("h{}", v % 3)),
        "bk_os_type" => Value::from(if v.is_multiple_of(2) {
            "linux"
        } else {
            "windows"
        }),
        "rack" => Value::Text(format!("r{}", v % 3)),
        "env" => Value::from(if v.is_multiple_of(2) { "prod" } else { "test" }),
        "bk_inst_name" | "bk_set_name" | "bk_module_name" => {
            let obj = if object == ObjectKind::Set {
                "set"
            } else {
                "module"
            };
            Value::Text(format!("{obj}{}", v % 2))
        }
        _ if v == 5 => Value::Float(1.0),
        _ => Value::Integer(v as i64 % 4),
    };
    let op = match op {
        0 => Op::Equal(value(v)),
        1 => Op::NotEqual(value(v)),
        2 => Op::In(vec![value(v), value(w)]),
        3 => Op::NotIn(vec![value(v), value(w)]),
        4 => Op::Contains(match value(v) {
            Value::Text(s) => s[s.len() - 1..].to_owned(),
            _ => "1".to_owned(),
        }),
        _ => Op::Range {
            min: Some((v % 3) as f64),
            max: (w % 2 == 0).then_some((v % 3 + w % 3) as f64),
        },
    };
    Condition {
        object,
        field: field.to_owned(),
        op,
    }
}

/// A request that mostly names things of its scope, so that every outcome is common.
fn build_request(
    parts: &InventoryParts,
    (scope, host_ids, ips, nodes, groups): RequestSeed,
) -> (Scope, Targets) {
    let n_biz = parts.businesses.len() as i64;
    let scope = match scope {
        0..=5 => Scope::Biz(1 + scope as i64 % n_biz),
        6..=10 => Scope::BizSet(SET_MEMBERS_ID),
        _ => Scope::Biz(99),
    };
    let covered: Vec<i64> = match scope {
        Scope::Biz(b) if b <= n_biz => vec![b],
        Scope::BizSet(_) => parts.business_sets[0].members.clone(),
        _ => Vec::new(),
    };
    let in_scope = |biz: Option<i64>| biz.is_some_and(|b| covered.contains(&b));
    // Item `c` of the list, of the in-scope part of it while `c < near`.
    fn pick<'a, T>(all: &'a [T], near: &[&'a T], c: u8, limit: u8) -> Option<&'a T> {
        if c < limit && !near.is_empty() {
            Some(near[c as usize % near.len()])
        } else if !all.is_empty() {
            Some(&all[c as usize % all.len()])
        } else {
            None
        }
    }
    let hosts = &parts.hosts;
    let near_hosts: Vec<&Host> = hosts.iter().filter(|h| in_scope(h.bk_biz_id)).collect();
    let host_id = |c: u8| match pick(hosts, &near_hosts, c, 14) {
        Some(h) if c < 18 => h.bk_host_id,
        _ => 1000 + c as i64,
    };
    let address = |(cloud, c): (u8, u8)| match pick(hosts, &near_hosts, c, 12) {
        Some(h) if c < 16 => (h.bk_cloud_id, h.ips[c as usize % h.ips.len()].to_string()),
        _ => match c {
            16 => (cloud as i64, "::ffff:10.0.0.1".to_owned()),
            17 => (cloud as i64, "bogus".to_owned()),
            _ => (cloud as i64, format!("10.0.0.{}", c % 6)),
        },
    };
    let nodes_in_scope: Vec<&TopoNode> = parts
        .topology
        .iter()
        .filter(|n| in_scope(Some(model::business_of(parts, n))))
        .collect();
    let node = |(c, inst): (u8, u8)| match pick(&parts.topology, &nodes_in_scope, c, 15) {
        Some(n) if c < 17 => (n.bk_obj_id.clone(), n.bk_inst_id),
        _ if c < 19 && inst < 4 && !covered.is_empty() => {
            ("biz".to_owned(), covered[inst as usize % covered.len()])
        }
        _ if c < 19 => ("biz".to_owned(), 1 + inst as i64 % (n_biz + 1)),
        _ => (
            ["nope", "set", "module", "lvl", "zone", "biz"][inst as usize].to_owned(),
            1,
        ),
    };
    let groups_in_scope: Vec<&DynamicGroup> = parts
        .dynamic_groups
        .iter()
        .filter(|g| in_scope(Some(g.bk_biz_id)))
        .collect();
    let group = |c: u8| match pick(&parts.dynamic_groups, &groups_in_scope, c, 8) {
        Some(g) if c < 9 => g.id.clone(),
        _ => "missing".to_owned(),
    };
    let targets = Targets {
        host_ids: host_ids.map(|ids| ids.into_iter().map(host_id).collect()),
        ips: ips.map(|ips| ips.into_iter().map(address).collect()),
        topo_nodes: nodes.into_iter().map(node).collect(),
        dynamic_groups: groups.into_iter().map(group).collect(),
    };
    (scope, targets)
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 1000, ..ProptestConfig::default() })]

    #[test]
    fn resolution_matches_the_model(seed in inventory_seed(), requests in vec(request_seed(), 1..6)) {
        let parts = build_parts(seed);
        let inventory = Inventory::build(parts.clone()).expect("generated parts are valid");
        for request in requests {
            let (scope, targets) = build_request(&parts, request);
            let got: model::Expected = inventory.resolve(&scope, &targets).map(|r| {
                r.hosts.into_iter().map(|h| (h.bk_host_id, h.bk_cloud_id, h.ip, h.via)).collect()
            });
            let expected = model::resolve(&parts, &scope, &targets);
            prop_assert_eq!(got, expected, "scope {} targets {:?}", scope, targets);
        }
    }
}
