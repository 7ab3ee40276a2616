//! Agents' hosts merged with the file's placements; (cloud area, address) conflicts; the
//! unassigned pool.

use fleetrun_inventory::{
    AddressConflict, AgentHost, AgentRefusal, Inventory, RefusedAgent, ResolveError, Scope,
    Targets, Value, Via,
};

const FILE: &str = r#"
[[business]]
bk_biz_id = 2
name = "shop"

[[set]]
bk_inst_id = 10
name = "web"
parent = "biz:2"

[[module]]
bk_inst_id = 100
name = "nginx"
parent = "set:10"

[[host]]
bk_host_id = 1
ips = ["10.0.0.1"]
bk_biz_id = 2
modules = [100]

# Unassigned hosts hold no address: no conflict with host 1.
[[host]]
bk_host_id = 2
ips = ["10.0.0.1"]

[[host]]
agent_id = "a"
bk_biz_id = 2
modules = [100]
attributes = { rack = "r1" }
"#;

fn agent(agent_id: &str, bk_host_id: i64, ips: &[&str]) -> AgentHost {
    AgentHost {
        agent_id: agent_id.into(),
        bk_host_id,
        bk_cloud_id: 0,
        ips: ips.iter().map(|ip| ip.parse().unwrap()).collect(),
        hostname: format!("{agent_id}.local"),
        os_type: "linux".into(),
        address_since: 0,
    }
}

fn by_ip(ip: &str) -> Targets {
    Targets {
        ips: Some(vec![(0, ip.into())]),
        ..Targets::default()
    }
}

fn by_id(id: i64) -> Targets {
    Targets {
        host_ids: Some(vec![id]),
        ..Targets::default()
    }
}

#[test]
fn unassigned_hosts_hold_no_address() {
    let inventory = Inventory::from_toml(FILE).unwrap();
    assert!(inventory.conflicts().is_empty());
    assert_eq!(
        inventory
            .host_by_address(0, "10.0.0.1".parse().unwrap())
            .unwrap()
            .bk_host_id,
        1
    );
    let resolved = inventory
        .resolve(&Scope::Biz(2), &by_ip("10.0.0.1"))
        .unwrap();
    assert_eq!(resolved.hosts[0].bk_host_id, 1);
    // Visible, never a target.
    assert_eq!(inventory.host(2).unwrap().bk_biz_id, None);
    assert_eq!(
        inventory.resolve(&Scope::Biz(2), &by_id(2)),
        Err(ResolveError::OutsideScope(vec![2]))
    );
}

#[test]
fn agents_merge_with_the_file() {
    let inventory = Inventory::from_toml(FILE).unwrap();
    let merged = inventory.with_agents(&[
        agent("a", 10, &["10.0.0.1", "10.0.0.10"]),
        agent("b", 11, &["10.0.0.11"]),
        agent("a", 12, &["10.0.0.12"]),
        agent("c", 1, &["10.0.0.13"]),
        agent("d", 14, &[]),
    ]);
    assert_eq!(
        merged.refused,
        [
            RefusedAgent {
                agent_id: "a".into(),
                reason: AgentRefusal::DuplicateAgent
            },
            RefusedAgent {
                agent_id: "c".into(),
                reason: AgentRefusal::HostIdTaken(1)
            },
            RefusedAgent {
                agent_id: "d".into(),
                reason: AgentRefusal::NoAddress
            },
        ]
    );
    let inventory = merged.inventory;
    let ids: Vec<i64> = inventory.hosts().iter().map(|h| h.bk_host_id).collect();
    assert_eq!(ids, [1, 2, 10, 11]);

    // Listed: the agent says who it is, the file where it goes.
    let a = inventory.host_by_agent("a").unwrap();
    assert_eq!(a.bk_host_id, 10);
    assert_eq!(a.hostname, "a.local");
    assert_eq!((a.bk_biz_id, a.modules.as_slice()), (Some(2), &[100][..]));
    assert_eq!(a.attributes.get("rack"), Some(&Value::Text("r1".into())));
    // Unlisted: unassigned.
    let b = inventory.host_by_agent("b").unwrap();
    assert_eq!((b.bk_biz_id, b.modules.len()), (None, 0));
    assert_eq!(
        inventory.resolve(&Scope::Biz(2), &by_ip("10.0.0.11")),
        Err(ResolveError::OutsideScope(vec![11]))
    );

    // Agent a claims host 1's address: flagged, and reachable only by id or its own address.
    assert_eq!(
        inventory.conflicts(),
        [AddressConflict {
            bk_cloud_id: 0,
            ip: "10.0.0.1".parse().unwrap(),
            held_by: 1,
            claimed_by: vec![10],
        }]
    );
    let resolved = inventory
        .resolve(&Scope::Biz(2), &by_ip("10.0.0.1"))
        .unwrap();
    assert_eq!(resolved.hosts.len(), 1);
    assert_eq!(resolved.hosts[0].bk_host_id, 1);
    let resolved = inventory.resolve(&Scope::Biz(2), &by_id(10)).unwrap();
    assert_eq!(
        (resolved.hosts[0].bk_host_id, &resolved.hosts[0].via),
        (10, &Via::HostId)
    );
    let resolved = inventory
        .resolve(&Scope::Biz(2), &by_ip("10.0.0.10"))
        .unwrap();
    assert_eq!(resolved.hosts[0].bk_host_id, 10);

    // A later merge replaces the agents of the earlier one.
    let again = inventory.with_agents(&[agent("b", 11, &["10.0.0.11"])]);
    assert!(again.refused.is_empty());
    assert!(again.inventory.host(10).is_none());
    assert!(again.inventory.conflicts().is_empty());
}

#[test]
fn the_lowest_host_id_holds_an_address() {
    let file = format!("{FILE}\n[unlisted_agents]\nbk_biz_id = 2\n");
    let inventory = Inventory::from_toml(&file).unwrap();
    let merged = inventory.with_agents(&[
        agent("a", 30, &["10.0.0.9"]),
        agent("x", 21, &["10.0.0.9", "10.0.0.9"]),
        agent("y", 25, &["10.0.0.9"]),
    ]);
    let inventory = merged.inventory;
    assert_eq!(
        inventory.conflicts(),
        [AddressConflict {
            bk_cloud_id: 0,
            ip: "10.0.0.9".parse().unwrap(),
            held_by: 21,
            claimed_by: vec![25, 30],
        }]
    );
    assert_eq!(
        inventory
            .host_by_address(0, "10.0.0.9".parse().unwrap())
            .unwrap()
            .bk_host_id,
        21
    );
}

#[test]
fn the_earliest_claim_holds_an_address_whatever_the_ids() {
    let file = format!("{FILE}\n[unlisted_agents]\nbk_biz_id = 2\n");
    let inventory = Inventory::from_toml(&file).unwrap();
    let since = |mut agent: AgentHost, at: i64| {
        agent.address_since = at;
        agent
    };
    // Host 21 moved onto 10.0.0.9 after host 30 had it: the newcomer is the one quarantined.
    let merged = inventory.with_agents(&[
        since(agent("a", 30, &["10.0.0.9"]), 100),
        since(agent("x", 21, &["10.0.0.9"]), 200),
        since(agent("y", 25, &["10.0.0.9"]), 150),
        // Nor does an agent take a host of the file's address, however early it came.
        since(agent("z", 40, &["10.0.0.1"]), i64::MIN + 1),
    ]);
    let inventory = merged.inventory;
    assert_eq!(
        inventory.conflicts(),
        [
            AddressConflict {
                bk_cloud_id: 0,
                ip: "10.0.0.1".parse().unwrap(),
                held_by: 1,
                claimed_by: vec![40],
            },
            AddressConflict {
                bk_cloud_id: 0,
                ip: "10.0.0.9".parse().unwrap(),
                held_by: 30,
                claimed_by: vec![21, 25],
            },
        ]
    );
    let resolved = inventory
        .resolve(&Scope::Biz(2), &by_ip("10.0.0.9"))
        .unwrap();
    assert_eq!(resolved.hosts.len(), 1);
    assert_eq!(resolved.hosts[0].bk_host_id, 30);
}

#[test]
fn a_pinned_address_wins_over_the_agents_report_and_its_claim_comes_first() {
    let file = format!(
        "{FILE}\n[unlisted_agents]\nbk_biz_id = 2\n\n[[host]]\nagent_id = \"p\"\nbk_cloud_id = 1\nips = [\"::ffff:10.0.0.7\"]\nbk_biz_id = 2\n"
    );
    let inventory = Inventory::from_toml(&file).unwrap();
    let pin = inventory.pinned_address("p").unwrap();
    assert_eq!(
        (pin.bk_cloud_id, pin.ips[0]),
        (1, "10.0.0.7".parse().unwrap())
    );
    assert!(inventory.pinned_address("a").is_none());
    let early = |mut agent: AgentHost, at: i64| {
        agent.address_since = at;
        agent.bk_cloud_id = 1;
        agent
    };
    let merged = inventory.with_agents(&[
        early(agent("x", 20, &["10.0.0.7"]), 1),
        // p reports something else and registered later: the pin decides both.
        early(agent("p", 30, &["10.0.0.99"]), 500),
    ]);
    let inventory = merged.inventory;
    let p = inventory.host_by_agent("p").unwrap();
    assert_eq!(
        (p.bk_cloud_id, p.ips.clone()),
        (1, vec!["10.0.0.7".parse().unwrap()])
    );
    assert_eq!(inventory.conflicts()[0].held_by, 30);
    assert_eq!(inventory.conflicts()[0].claimed_by, [20]);
}

#[test]
fn unlisted_agents_can_have_a_default_place() {
    let file = format!("{FILE}\n[unlisted_agents]\nbk_biz_id = 2\nmodules = [100]\n");
    let inventory = Inventory::from_toml(&file).unwrap();
    let placed = inventory.place_agent(&agent("z", 40, &["10.0.0.40"]));
    assert!(!placed.listed);
    assert_eq!(
        (placed.host.bk_biz_id, placed.host.modules.as_slice()),
        (Some(2), &[100][..])
    );
    let placed = inventory.place_agent(&agent("a", 41, &["::ffff:10.0.0.41"]));
    assert!(placed.listed);
    assert_eq!(
        placed.host.ips,
        ["10.0.0.41".parse::<std::net::IpAddr>().unwrap()]
    );

    let merged =
        inventory.with_agents(&[agent("a", 50, &["10.0.0.7"]), agent("z", 51, &["10.0.0.7"])]);
    assert_eq!(
        merged.inventory.conflicts(),
        [AddressConflict {
            bk_cloud_id: 0,
            ip: "10.0.0.7".parse().unwrap(),
            held_by: 50,
            claimed_by: vec![51],
        }]
    );
    let targets = Targets {
        topo_nodes: vec![("module".into(), 100)],
        ..Targets::default()
    };
    let ids: Vec<i64> = merged
        .inventory
        .resolve(&Scope::Biz(2), &targets)
        .unwrap()
        .hosts
        .iter()
        .map(|h| h.bk_host_id)
        .collect();
    assert_eq!(ids, [1, 50, 51]);
}
