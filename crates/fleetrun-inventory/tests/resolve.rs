//! Resolution of `target_server`: each bk-job error code, the order of the result, and how each
//! host was reached.

use fleetrun_inventory::{
    Host, Inventory, InventoryParts, MAX_TARGET_HOSTS, ResolveError, Scope, Targets, Via,
};

const FIXTURE: &str = r#"
[[business]]
bk_biz_id = 2
name = "shop"

[[business]]
bk_biz_id = 3
name = "payments"

[[business_set]]
bk_biz_set_id = 9
name = "online"
members = [2, 3]

[[level]]
bk_obj_id = "region"
bk_inst_id = 1
name = "south"
parent = "biz:2"

[[set]]
bk_inst_id = 10
name = "web"
parent = "region:1"

[[set]]
bk_inst_id = 11
name = "db"
parent = "biz:2"

[[set]]
bk_inst_id = 12
name = "spare"
parent = "biz:2"

[[set]]
bk_inst_id = 20
name = "gateway"
parent = "biz:3"

[[module]]
bk_inst_id = 100
name = "nginx"
parent = "set:10"

[[module]]
bk_inst_id = 101
name = "php"
parent = "set:10"

[[module]]
bk_inst_id = 110
name = "mysql"
parent = "set:11"

[[module]]
bk_inst_id = 120
name = "empty"
parent = "set:12"

[[module]]
bk_inst_id = 200
name = "api"
parent = "set:20"

[[host]]
bk_host_id = 1
ips = ["10.0.0.1"]
bk_biz_id = 2
modules = [100]

[[host]]
bk_host_id = 2
ips = ["10.0.0.2"]
bk_biz_id = 2
modules = [100, 110]

[[host]]
bk_host_id = 3
ips = ["10.0.0.3"]
bk_biz_id = 2
modules = [101]

# In the business, in no module.
[[host]]
bk_host_id = 4
ips = ["10.0.0.4"]
bk_biz_id = 2

[[host]]
bk_host_id = 5
ips = ["10.0.1.5"]
bk_biz_id = 3
modules = [200]

# Unassigned.
[[host]]
bk_host_id = 6
ips = ["10.0.0.6"]

# Claims host 1's address: conflicting.
[[host]]
bk_host_id = 7
ips = ["10.0.0.1", "10.0.0.7"]
bk_biz_id = 2
modules = [110]

# Host 1's address in another cloud area: no conflict.
[[host]]
bk_host_id = 8
bk_cloud_id = 1
ips = ["10.0.0.1"]
bk_biz_id = 3
modules = [200]

[[dynamic_group]]
id = "g-web"
bk_biz_id = 2
name = "nginx hosts"

[[dynamic_group.condition]]
object = "module"
field = "bk_module_name"
op = "equal"
value = "nginx"

[[dynamic_group]]
id = "g-pay"
bk_biz_id = 3
name = "every payments host"

[[dynamic_group]]
id = "g-none"
bk_biz_id = 2
name = "nothing"

[[dynamic_group.condition]]
object = "host"
field = "bk_host_name"
op = "equal"
value = "nope"
"#;

fn fixture() -> Inventory {
    Inventory::from_toml(FIXTURE).unwrap()
}

fn targets(
    host_ids: Option<&[i64]>,
    ips: Option<&[(i64, &str)]>,
    nodes: &[(&str, i64)],
    groups: &[&str],
) -> Targets {
    Targets {
        host_ids: host_ids.map(<[i64]>::to_vec),
        ips: ips.map(|ips| ips.iter().map(|(c, ip)| (*c, ip.to_string())).collect()),
        topo_nodes: nodes.iter().map(|(o, i)| (o.to_string(), *i)).collect(),
        dynamic_groups: groups.iter().map(|g| g.to_string()).collect(),
    }
}

/// `id:way` per host, or `code message`.
fn render(result: Result<fleetrun_inventory::Resolved, ResolveError>) -> String {
    match result {
        Ok(resolved) => {
            let hosts: Vec<String> = resolved
                .hosts
                .iter()
                .map(|h| {
                    let via = match &h.via {
                        Via::HostId => "id".to_owned(),
                        Via::Ip => format!("ip {}", h.ip),
                        Via::TopoNode(obj, inst) => format!("{obj}:{inst}"),
                        Via::DynamicGroup(id) => format!("group {id}"),
                    };
                    format!("{}<{via}>", h.bk_host_id)
                })
                .collect();
            hosts.join(" ")
        }
        Err(e) => format!("{} {e}", e.code()),
    }
}

const BIZ2: Scope = Scope::Biz(2);
const SET9: Scope = Scope::BizSet(9);

#[test]
fn resolution_cases() {
    let inventory = fixture();
    #[rustfmt::skip]
    let cases: &[(&str, Scope, Targets, &str)] = &[
        ("nothing at all", BIZ2, targets(None, None, &[], &[]),
            "1244001 no target hosts given"),
        ("empty lists", BIZ2, targets(Some(&[]), Some(&[]), &[], &[]),
            "1244001 no target hosts given"),
        ("host ids, repeated", BIZ2, targets(Some(&[3, 1, 3]), None, &[], &[]),
            "3<id> 1<id>"),
        ("host ids make addresses ignored", BIZ2, targets(Some(&[1]), Some(&[(0, "10.0.0.2"), (0, "bad")]), &[], &[]),
            "1<id>"),
        ("addresses when host ids are empty", BIZ2, targets(Some(&[]), Some(&[(0, "10.0.0.3"), (0, "10.0.0.2")]), &[], &[]),
            "3<ip 10.0.0.3> 2<ip 10.0.0.2>"),
        ("a second address", BIZ2, targets(None, Some(&[(0, "10.0.0.7")]), &[], &[]),
            "7<ip 10.0.0.7>"),
        ("an address reaches its holder, not a conflicting claimant", BIZ2, targets(None, Some(&[(0, "10.0.0.1")]), &[], &[]),
            "1<ip 10.0.0.1>"),
        ("a conflicting claimant by its id", BIZ2, targets(Some(&[7]), None, &[], &[]),
            "7<id>"),
        ("the same address in another cloud area", Scope::Biz(3), targets(None, Some(&[(1, "10.0.0.1")]), &[], &[]),
            "8<ip 10.0.0.1>"),
        ("IPv4-mapped IPv6 text", BIZ2, targets(None, Some(&[(0, "::ffff:10.0.0.3")]), &[], &[]),
            "3<ip 10.0.0.3>"),
        ("unknown host ids", BIZ2, targets(Some(&[1, 99, 98, 99]), None, &[], &[]),
            "1244030 hosts not in the inventory: 99, 98"),
        ("unknown addresses", BIZ2, targets(None, Some(&[(0, "10.9.9.9"), (2, "10.0.0.1"), (0, "nonsense")]), &[], &[]),
            "1244030 hosts not in the inventory: 0:10.9.9.9, 2:10.0.0.1, 0:nonsense"),
        ("a host of another business", BIZ2, targets(Some(&[1, 5]), None, &[], &[]),
            "1244002 hosts outside the scope: 5"),
        ("an unassigned host by id", BIZ2, targets(Some(&[6]), None, &[], &[]),
            "1244002 hosts outside the scope: 6"),
        ("an unassigned host by address", SET9, targets(None, Some(&[(0, "10.0.0.6")]), &[], &[]),
            "1244002 hosts outside the scope: 6"),
        ("a host of another business by address", BIZ2, targets(None, Some(&[(0, "10.0.1.5")]), &[], &[]),
            "1244002 hosts outside the scope: 5"),
        ("a business set covers its members", SET9, targets(Some(&[5, 1]), None, &[], &[]),
            "5<id> 1<id>"),
        ("a set", BIZ2, targets(None, None, &[("set", 10)], &[]),
            "1<set:10> 2<set:10> 3<set:10>"),
        ("a custom level", BIZ2, targets(None, None, &[("region", 1)], &[]),
            "1<region:1> 2<region:1> 3<region:1>"),
        ("a module", BIZ2, targets(None, None, &[("module", 110)], &[]),
            "2<module:110> 7<module:110>"),
        ("the business, hosts without modules included", BIZ2, targets(None, None, &[("biz", 2)], &[]),
            "1<biz:2> 2<biz:2> 3<biz:2> 4<biz:2> 7<biz:2>"),
        ("an unknown node", BIZ2, targets(None, None, &[("set", 999), ("rack", 1), ("set", 10)], &[]),
            "1244030 topology nodes not found: set:999, rack:1"),
        ("a node of another business", BIZ2, targets(None, None, &[("set", 20)], &[]),
            "1244030 topology nodes not found: set:20"),
        ("another business as a node", BIZ2, targets(None, None, &[("biz", 3)], &[]),
            "1244030 topology nodes not found: biz:3"),
        ("a dynamic group", BIZ2, targets(None, None, &[], &["g-web"]),
            "1<group g-web> 2<group g-web>"),
        ("an unknown dynamic group", BIZ2, targets(None, None, &[], &["g-web", "g-gone"]),
            "1211003 dynamic groups not found: g-gone"),
        ("a dynamic group of another business", BIZ2, targets(None, None, &[], &["g-pay"]),
            "1211003 dynamic groups not found: g-pay"),
        ("a business set reaches its members' groups", SET9, targets(None, None, &[], &["g-pay"]),
            "5<group g-pay> 8<group g-pay>"),
        ("union in order: ids, nodes, groups; each host once, by its first way", SET9,
            targets(Some(&[3]), None, &[("module", 100), ("set", 20), ("module", 101)], &["g-web", "g-pay"]),
            "3<id> 1<module:100> 2<module:100> 5<set:20> 8<set:20>"),
        ("an empty module", BIZ2, targets(None, None, &[("module", 120)], &[]),
            "1244028 targets resolve to no host"),
        ("a group that matches nothing", BIZ2, targets(None, None, &[("set", 12)], &["g-none"]),
            "1244028 targets resolve to no host"),
        ("unknown hosts come first", BIZ2, targets(Some(&[5, 99]), None, &[("set", 999)], &["g-gone"]),
            "1244030 hosts not in the inventory: 99"),
        ("then unknown nodes", BIZ2, targets(Some(&[5]), None, &[("set", 999)], &["g-gone"]),
            "1244030 topology nodes not found: set:999"),
        ("then unknown groups", BIZ2, targets(Some(&[5]), None, &[], &["g-gone"]),
            "1211003 dynamic groups not found: g-gone"),
        ("an unknown scope", Scope::Biz(77), targets(Some(&[1]), None, &[], &[]),
            "1240003 scope biz:77 does not exist"),
        ("an unknown business set", Scope::BizSet(2), targets(Some(&[1]), None, &[], &[]),
            "1240003 scope biz_set:2 does not exist"),
    ];
    let mut failures = Vec::new();
    for (case, scope, targets, expected) in cases {
        let got = render(inventory.resolve(scope, targets));
        if got != *expected {
            failures.push(format!("{case}:\n  expected {expected}\n  got      {got}"));
        }
    }
    assert!(failures.is_empty(), "{}", failures.join("\n"));
}

#[test]
fn resolved_hosts_carry_cloud_and_address() {
    let inventory = fixture();
    let resolved = inventory
        .resolve(&SET9, &targets(None, None, &[("set", 20)], &[]))
        .unwrap();
    let host8 = &resolved.hosts[1];
    assert_eq!(
        (host8.bk_host_id, host8.bk_cloud_id, host8.ip.to_string()),
        (8, 1, "10.0.0.1".to_owned())
    );
}

#[test]
fn more_than_the_limit() {
    let mut parts = InventoryParts::default();
    parts.businesses.push(fleetrun_inventory::Business {
        bk_biz_id: 1,
        name: "big".into(),
    });
    for id in 0..=MAX_TARGET_HOSTS as i64 {
        parts.hosts.push(Host {
            bk_host_id: id + 1,
            bk_cloud_id: 0,
            ips: vec![std::net::IpAddr::from(
                (id as u32 + 0x0a00_0000).to_be_bytes(),
            )],
            hostname: String::new(),
            os_type: "linux".into(),
            agent_id: None,
            bk_biz_id: Some(1),
            modules: Vec::new(),
            attributes: Default::default(),
        });
    }
    let inventory = Inventory::build(parts).unwrap();
    let whole = targets(None, None, &[("biz", 1)], &[]);
    let error = inventory.resolve(&Scope::Biz(1), &whole).unwrap_err();
    assert_eq!(error, ResolveError::TooMany(MAX_TARGET_HOSTS + 1));
    assert_eq!(error.code(), 1244022);
    let ids: Vec<i64> = (1..=MAX_TARGET_HOSTS as i64).collect();
    let resolved = inventory
        .resolve(&Scope::Biz(1), &targets(Some(&ids), None, &[], &[]))
        .unwrap();
    assert_eq!(resolved.hosts.len(), MAX_TARGET_HOSTS);
}
