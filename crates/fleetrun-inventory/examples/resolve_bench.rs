//! Times target resolution on a large inventory: 100,000 hosts in 2,000 modules, requests that
//! expand to 50,000 hosts. Run with
//! `cargo run --release -p fleetrun-inventory --example resolve_bench`.

use std::{
    collections::BTreeMap,
    net::{IpAddr, Ipv4Addr},
    time::{Duration, Instant},
};

use fleetrun_inventory::{
    AgentHost, Business, Condition, DynamicGroup, Host, Inventory, InventoryParts, ObjectKind, Op,
    Parent, Scope, Targets, TopoNode, Value,
};

const REGIONS: i64 = 2;
const SETS_PER_REGION: i64 = 10;
const MODULES_PER_SET: i64 = 100;
const HOSTS_PER_MODULE: i64 = 50;
const RUNS: usize = 21;

fn node(obj: &str, id: i64, parent: Parent, attributes: BTreeMap<String, Value>) -> TopoNode {
    TopoNode {
        bk_obj_id: obj.into(),
        bk_inst_id: id,
        name: format!("{obj}-{id}"),
        parent,
        attributes,
    }
}

fn address(host: i64) -> IpAddr {
    IpAddr::V4(Ipv4Addr::from(0x0a00_0000 + host as u32))
}

/// Business 1: region -> set -> module; every host in one module, one in ten in a second module
/// of the same set. Region 1's sets are "prod", region 2's "test".
fn inventory() -> InventoryParts {
    let mut parts = InventoryParts {
        businesses: vec![Business {
            bk_biz_id: 1,
            name: "big".into(),
        }],
        ..InventoryParts::default()
    };
    let mut host_id = 0;
    for region in 1..=REGIONS {
        parts
            .topology
            .push(node("region", region, Parent::Business(1), BTreeMap::new()));
        for s in 0..SETS_PER_REGION {
            let set = (region - 1) * SETS_PER_REGION + s + 1;
            let env = if region == 1 { "prod" } else { "test" };
            let attributes = BTreeMap::from([("env".to_owned(), Value::from(env))]);
            let parent = Parent::Node {
                bk_obj_id: "region".into(),
                bk_inst_id: region,
            };
            parts.topology.push(node("set", set, parent, attributes));
            for m in 0..MODULES_PER_SET {
                let module = (set - 1) * MODULES_PER_SET + m + 1;
                let parent = Parent::Node {
                    bk_obj_id: "set".into(),
                    bk_inst_id: set,
                };
                parts
                    .topology
                    .push(node("module", module, parent, BTreeMap::new()));
                for _ in 0..HOSTS_PER_MODULE {
                    host_id += 1;
                    let mut modules = vec![module];
                    if host_id % 10 == 0 {
                        modules.push((set - 1) * MODULES_PER_SET + (m + 1) % MODULES_PER_SET + 1);
                    }
                    parts.hosts.push(Host {
                        bk_host_id: host_id,
                        bk_cloud_id: 0,
                        ips: vec![address(host_id)],
                        hostname: format!("host-{host_id}"),
                        os_type: "linux".into(),
                        agent_id: None,
                        bk_biz_id: Some(1),
                        modules,
                        attributes: BTreeMap::from([
                            ("cpu".to_owned(), Value::Integer(8 << (host_id % 3))),
                            ("rack".to_owned(), Value::Text(format!("r{}", host_id % 40))),
                        ]),
                    });
                }
            }
        }
    }
    parts.dynamic_groups.push(DynamicGroup {
        id: "prod".into(),
        bk_biz_id: 1,
        name: "every prod host".into(),
        object: ObjectKind::Host,
        conditions: vec![
            Condition {
                object: ObjectKind::Set,
                field: "env".into(),
                op: Op::Equal(Value::from("prod")),
            },
            Condition {
                object: ObjectKind::Host,
                field: "cpu".into(),
                op: Op::Range {
                    min: Some(8.0),
                    max: None,
                },
            },
        ],
    });
    parts.dynamic_groups.push(DynamicGroup {
        id: "big-prod".into(),
        bk_biz_id: 1,
        name: "prod hosts with 32 cores".into(),
        object: ObjectKind::Host,
        conditions: vec![
            Condition {
                object: ObjectKind::Set,
                field: "env".into(),
                op: Op::Equal(Value::from("prod")),
            },
            Condition {
                object: ObjectKind::Host,
                field: "cpu".into(),
                op: Op::Equal(Value::Integer(32)),
            },
        ],
    });
    parts
}

fn median(mut runs: Vec<Duration>) -> Duration {
    runs.sort();
    runs[runs.len() / 2]
}

fn time<T>(runs: usize, mut f: impl FnMut() -> T) -> (Duration, T) {
    let mut times = Vec::with_capacity(runs);
    let mut last = None;
    for _ in 0..runs {
        let start = Instant::now();
        let out = f();
        times.push(start.elapsed());
        last = Some(out);
    }
    (median(times), last.unwrap())
}

fn main() {
    let parts = inventory();
    let hosts_in_region_1 = SETS_PER_REGION * MODULES_PER_SET * HOSTS_PER_MODULE;
    let modules = parts.topology.iter().filter(|n| n.is_module()).count();
    println!(
        "inventory: {} hosts, {modules} modules; every request below resolves to {hosts_in_region_1} hosts",
        parts.hosts.len()
    );

    let (build, inventory) = time(5, || Inventory::build(parts.clone()).unwrap());
    let first_module_of_region_2 = SETS_PER_REGION * MODULES_PER_SET + 1;
    let requests = [
        (
            "one custom-level node (region:1)",
            Targets {
                topo_nodes: vec![("region".into(), 1)],
                ..Targets::default()
            },
        ),
        (
            "1,000 module nodes",
            Targets {
                topo_nodes: (1..first_module_of_region_2)
                    .map(|m| ("module".into(), m))
                    .collect(),
                ..Targets::default()
            },
        ),
        (
            "50,000 host ids",
            Targets {
                host_ids: Some((1..=hosts_in_region_1).collect()),
                ..Targets::default()
            },
        ),
        (
            "50,000 addresses",
            Targets {
                ips: Some(
                    (1..=hosts_in_region_1)
                        .map(|h| (0, address(h).to_string()))
                        .collect(),
                ),
                ..Targets::default()
            },
        ),
        (
            "a dynamic group (set env + host cpu)",
            Targets {
                dynamic_groups: vec!["prod".into()],
                ..Targets::default()
            },
        ),
        (
            "mixed: 2,000 ids, 2,000 addresses, 10 sets, 2 groups",
            Targets {
                host_ids: None,
                ips: Some(
                    (20_001..=22_000)
                        .map(|h| (0, address(h).to_string()))
                        .collect(),
                ),
                topo_nodes: (1..=SETS_PER_REGION).map(|s| ("set".into(), s)).collect(),
                dynamic_groups: vec!["big-prod".into(), "prod".into()],
            },
        ),
    ];
    println!("build (validate + index): {build:.1?} (median of 5)");
    for (name, targets) in &requests {
        let (took, resolved) = time(RUNS, || inventory.resolve(&Scope::Biz(1), targets).unwrap());
        assert_eq!(resolved.hosts.len() as i64, hosts_in_region_1, "{name}");
        println!("resolve {name}: {took:.2?} (median of {RUNS})");
    }

    let agents: Vec<AgentHost> = (0..10_000)
        .map(|i| AgentHost {
            agent_id: format!("agent-{i}"),
            bk_host_id: 200_000 + i,
            bk_cloud_id: 0,
            ips: vec![IpAddr::V4(Ipv4Addr::from(0x0b00_0000 + i as u32))],
            hostname: format!("agent-{i}"),
            os_type: "linux".into(),
            address_since: 0,
        })
        .collect();
    let (merge, merged) = time(5, || inventory.with_agents(&agents));
    assert_eq!(merged.inventory.hosts().len(), 110_000);
    println!("with_agents (10,000 agents onto 100,000 hosts): {merge:.1?} (median of 5)");
}
