//! The documented example file loads, and means what its comments say.

use fleetrun_inventory::{AgentHost, Inventory, Scope, Targets, Via};

const EXAMPLE: &str = include_str!("../examples/inventory.toml");

fn agent(agent_id: &str, bk_host_id: i64, ip: &str) -> AgentHost {
    AgentHost {
        agent_id: agent_id.to_owned(),
        bk_host_id,
        bk_cloud_id: 0,
        ips: vec![ip.parse().unwrap()],
        hostname: agent_id.to_owned(),
        os_type: "linux".to_owned(),
        address_since: 0,
    }
}

#[test]
fn example_loads() {
    let inventory = Inventory::from_toml(EXAMPLE).unwrap();
    assert_eq!(inventory.businesses().len(), 2);
    assert_eq!(inventory.business_set(9).unwrap().members, [2, 3]);
    assert_eq!(inventory.topology().len(), 8);
    assert_eq!(inventory.business_of_node("module", 100), Some(2));
    assert_eq!(inventory.hosts().len(), 3);
    assert_eq!(inventory.host(1003).unwrap().bk_biz_id, None);
    assert!(inventory.conflicts().is_empty());
    assert_eq!(inventory.accounts().len(), 2);
}

#[test]
fn example_with_agents() {
    let inventory = Inventory::from_toml(EXAMPLE).unwrap();
    let merged = inventory.with_agents(&[
        agent("web-2", 5001, "10.0.0.4"),
        agent("pay-1", 5002, "10.0.1.1"),
        agent("stray", 5003, "10.0.9.9"),
    ]);
    assert!(merged.refused.is_empty());
    let inventory = merged.inventory;
    assert_eq!(inventory.hosts().len(), 6);
    let web2 = inventory.host_by_agent("web-2").unwrap();
    assert_eq!(
        (web2.bk_biz_id, web2.modules.as_slice()),
        (Some(2), &[100][..])
    );
    let stray = inventory.host(5003).unwrap();
    assert_eq!(
        (stray.bk_biz_id, stray.modules.as_slice()),
        (Some(3), &[200][..])
    );

    // The dynamic group: prod sets, nginx or php modules, 8 cores or more.
    let targets = Targets {
        dynamic_groups: vec!["big-prod-web".into()],
        ..Targets::default()
    };
    let resolved = inventory.resolve(&Scope::Biz(2), &targets).unwrap();
    let ids: Vec<i64> = resolved.hosts.iter().map(|h| h.bk_host_id).collect();
    assert_eq!(ids, [1001, 5001]);
    assert!(
        resolved
            .hosts
            .iter()
            .all(|h| h.via == Via::DynamicGroup("big-prod-web".into()))
    );

    // The business set covers both businesses.
    let targets = Targets {
        topo_nodes: vec![("biz".into(), 2), ("biz".into(), 3)],
        ..Targets::default()
    };
    let resolved = inventory.resolve(&Scope::BizSet(9), &targets).unwrap();
    let ids: Vec<i64> = resolved.hosts.iter().map(|h| h.bk_host_id).collect();
    assert_eq!(ids, [1001, 1002, 5001, 5002, 5003]);

    let account = inventory
        .account_for(&Scope::BizSet(9), None, Some("deploy"))
        .unwrap();
    assert_eq!(account.id, 2);
    assert_eq!(
        inventory
            .account_for(&Scope::Biz(3), None, Some("deploy"))
            .unwrap_err()
            .code(),
        1244004
    );
}
