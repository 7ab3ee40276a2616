//! Every dynamic group operator on host, set and module fields.

use std::collections::BTreeMap;

use fleetrun_inventory::{
    Business, Condition, DynamicGroup, Host, Inventory, InventoryParts, ObjectKind, Op, Parent,
    ResolveError, Scope, Targets, TopoNode, Value,
};

fn attributes(pairs: &[(&str, Value)]) -> BTreeMap<String, Value> {
    pairs
        .iter()
        .map(|(k, v)| (k.to_string(), v.clone()))
        .collect()
}

fn node(obj: &str, id: i64, name: &str, parent: Parent, attrs: &[(&str, Value)]) -> TopoNode {
    TopoNode {
        bk_obj_id: obj.into(),
        bk_inst_id: id,
        name: name.into(),
        parent,
        attributes: attributes(attrs),
    }
}

fn set_parent(id: i64) -> Parent {
    Parent::Node {
        bk_obj_id: "set".into(),
        bk_inst_id: id,
    }
}

fn host(
    id: i64,
    ips: &[&str],
    name: &str,
    os: &str,
    modules: &[i64],
    attrs: &[(&str, Value)],
) -> Host {
    Host {
        bk_host_id: id,
        bk_cloud_id: if id == 4 { 1 } else { 0 },
        ips: ips.iter().map(|ip| ip.parse().unwrap()).collect(),
        hostname: name.into(),
        os_type: os.into(),
        agent_id: None,
        bk_biz_id: Some(1),
        modules: modules.to_vec(),
        attributes: attributes(attrs),
    }
}

fn base() -> InventoryParts {
    use Value::*;
    InventoryParts {
        businesses: vec![Business {
            bk_biz_id: 1,
            name: "shop".into(),
        }],
        topology: vec![
            node(
                "set",
                10,
                "web",
                Parent::Business(1),
                &[("env", "prod".into())],
            ),
            node(
                "set",
                11,
                "db",
                Parent::Business(1),
                &[("env", "test".into())],
            ),
            node(
                "module",
                100,
                "nginx",
                set_parent(10),
                &[("port", Integer(80))],
            ),
            node("module", 101, "php", set_parent(10), &[]),
            node("module", 110, "mysql", set_parent(11), &[]),
        ],
        hosts: vec![
            host(
                1,
                &["10.0.0.1"],
                "web-1",
                "linux",
                &[100],
                &[
                    ("cpu", Integer(8)),
                    ("rack", "a1".into()),
                    ("ssd", Bool(true)),
                ],
            ),
            host(
                2,
                &["10.0.0.2", "10.0.0.12"],
                "web-2",
                "linux",
                &[100, 110],
                &[
                    ("cpu", Integer(16)),
                    ("load", Float(0.5)),
                    ("rack", "b1".into()),
                ],
            ),
            host(
                3,
                &["10.0.0.3"],
                "db-1",
                "windows",
                &[110],
                &[("cpu", Float(8.0)), ("rack", "a2".into())],
            ),
            host(4, &["fd00::4"], "idle", "linux", &[], &[]),
        ],
        ..InventoryParts::default()
    }
}

fn c(object: ObjectKind, field: &str, op: Op) -> Condition {
    Condition {
        object,
        field: field.into(),
        op,
    }
}

fn text(s: &str) -> Value {
    Value::Text(s.into())
}

#[test]
fn operators() {
    use ObjectKind::{Host as H, Module as M, Set as S};
    use Op::*;
    use Value::{Bool, Float, Integer};
    let range = |min, max| Range { min, max };
    #[rustfmt::skip]
    let cases: Vec<(&str, Vec<Condition>, &[i64])> = vec![
        ("no conditions: the whole business", vec![], &[1, 2, 3, 4]),
        ("host id", vec![c(H, "bk_host_id", Equal(Integer(2)))], &[2]),
        ("host id in a list", vec![c(H, "bk_host_id", In(vec![Integer(1), Integer(3), Integer(9)]))], &[1, 3]),
        ("cloud area", vec![c(H, "bk_cloud_id", Equal(Integer(1)))], &[4]),
        ("any of the addresses", vec![c(H, "bk_host_innerip", Equal(text("10.0.0.12")))], &[2]),
        ("addresses compare as addresses", vec![c(H, "bk_host_innerip", Equal(text("fd00:0::4")))], &[4]),
        ("not_equal holds when another address differs", vec![c(H, "bk_host_innerip", NotEqual(text("10.0.0.2")))], &[1, 2, 3, 4]),
        ("not_in on addresses", vec![c(H, "bk_host_innerip", NotIn(vec![text("10.0.0.1"), text("10.0.0.3")]))], &[2, 4]),
        ("contains on addresses", vec![c(H, "bk_host_innerip", Contains("10.0.0.1".into()))], &[1, 2]),
        ("hostname contains", vec![c(H, "bk_host_name", Contains("web".into()))], &[1, 2]),
        ("os type", vec![c(H, "bk_os_type", Equal(text("windows")))], &[3]),
        ("integers equal floats", vec![c(H, "cpu", Equal(Integer(8)))], &[1, 3]),
        ("floats equal integers", vec![c(H, "cpu", Equal(Float(8.0)))], &[1, 3]),
        ("a missing attribute satisfies not_equal neither", vec![c(H, "cpu", NotEqual(Integer(8)))], &[2]),
        ("range with a min", vec![c(H, "cpu", range(Some(10.0), None))], &[2]),
        ("range with a max", vec![c(H, "cpu", range(None, Some(8.0)))], &[1, 3]),
        ("range on floats, bounds included", vec![c(H, "load", range(Some(0.5), Some(1.0)))], &[2]),
        ("range on text", vec![c(H, "rack", range(Some(0.0), None))], &[]),
        ("text in a list", vec![c(H, "rack", In(vec![text("a1"), text("a2")]))], &[1, 3]),
        ("text not in a list", vec![c(H, "rack", NotIn(vec![text("a1")]))], &[2, 3]),
        ("text never equals a number", vec![c(H, "rack", Equal(Integer(1)))], &[]),
        ("booleans", vec![c(H, "ssd", Equal(Bool(true)))], &[1]),
        ("attribute contains", vec![c(H, "rack", Contains("a".into()))], &[1, 3]),
        ("module name", vec![c(M, "bk_module_name", Equal(text("nginx")))], &[1, 2]),
        ("module instance name", vec![c(M, "bk_inst_name", Equal(text("mysql")))], &[2, 3]),
        ("module id", vec![c(M, "bk_module_id", In(vec![Integer(110)]))], &[2, 3]),
        ("module instance id", vec![c(M, "bk_inst_id", Equal(Integer(100)))], &[1, 2]),
        ("not_equal on modules: any other module", vec![c(M, "bk_module_name", NotEqual(text("nginx")))], &[2, 3]),
        ("module attribute", vec![c(M, "port", Equal(Integer(80)))], &[1, 2]),
        ("a set field on a module is an attribute it lacks", vec![c(M, "bk_set_name", Equal(text("web")))], &[]),
        ("set name", vec![c(S, "bk_set_name", Equal(text("web")))], &[1, 2]),
        ("set id", vec![c(S, "bk_set_id", Equal(Integer(11)))], &[2, 3]),
        ("set attribute", vec![c(S, "env", Equal(text("test")))], &[2, 3]),
        ("set and module conditions hold for one module",
            vec![c(S, "env", Equal(text("prod"))), c(M, "bk_module_name", Equal(text("mysql")))], &[]),
        ("set and module conditions, matched",
            vec![c(S, "env", Equal(text("test"))), c(M, "bk_module_name", Equal(text("mysql")))], &[2, 3]),
        ("set and host conditions",
            vec![c(S, "env", Equal(text("test"))), c(H, "cpu", Equal(Integer(16)))], &[2]),
        ("conditions are ANDed",
            vec![c(H, "cpu", Equal(Integer(8))), c(H, "bk_os_type", Equal(text("linux")))], &[1]),
    ];
    let mut parts = base();
    for (i, (name, conditions, _)) in cases.iter().enumerate() {
        parts.dynamic_groups.push(DynamicGroup {
            id: format!("g{i}"),
            bk_biz_id: 1,
            name: name.to_string(),
            object: ObjectKind::Host,
            conditions: conditions.clone(),
        });
    }
    let inventory = Inventory::build(parts).unwrap();
    let mut failures = Vec::new();
    for (i, (name, _, expected)) in cases.iter().enumerate() {
        let targets = Targets {
            dynamic_groups: vec![format!("g{i}")],
            ..Targets::default()
        };
        let got: Vec<i64> = match inventory.resolve(&Scope::Biz(1), &targets) {
            Ok(resolved) => resolved.hosts.iter().map(|h| h.bk_host_id).collect(),
            Err(ResolveError::NoHosts) => Vec::new(),
            Err(e) => panic!("{name}: {e}"),
        };
        if got != *expected {
            failures.push(format!("{name}: expected {expected:?}, got {got:?}"));
        }
    }
    assert!(failures.is_empty(), "{}", failures.join("\n"));
}

#[test]
fn groups_are_evaluated_when_resolved() {
    let mut parts = base();
    parts.dynamic_groups.push(DynamicGroup {
        id: "big".into(),
        bk_biz_id: 1,
        name: "big".into(),
        object: ObjectKind::Host,
        conditions: vec![c(
            ObjectKind::Host,
            "cpu",
            Op::Range {
                min: Some(16.0),
                max: None,
            },
        )],
    });
    let targets = Targets {
        dynamic_groups: vec!["big".into()],
        ..Targets::default()
    };
    let before = Inventory::build(parts.clone()).unwrap();
    assert_eq!(
        before
            .resolve(&Scope::Biz(1), &targets)
            .unwrap()
            .hosts
            .len(),
        1
    );
    parts.hosts[0]
        .attributes
        .insert("cpu".into(), Value::Integer(64));
    let after = Inventory::build(parts).unwrap();
    let ids: Vec<i64> = after
        .resolve(&Scope::Biz(1), &targets)
        .unwrap()
        .hosts
        .iter()
        .map(|h| h.bk_host_id)
        .collect();
    assert_eq!(ids, [1, 2]);
}
