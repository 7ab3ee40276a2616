//! Changes made on the example inventory and on small documents, and the refusals.

use std::net::IpAddr;

use super::*;
use crate::{Inventory, Scope, Targets};

const EXAMPLE: &str = include_str!("../../../examples/inventory.toml");

fn no_agents(_: i64) -> Option<String> {
    None
}

fn change(json: &str) -> Change {
    serde_json::from_str(json).unwrap()
}

fn apply(text: &str, changes: &[&str]) -> Result<String, ChangeError> {
    let mut doc = InventoryDocument::parse(text)?;
    for c in changes {
        doc.apply(&change(c), &no_agents)?;
    }
    Ok(doc.text())
}

#[test]
fn new_nodes_and_a_moved_host_resolve_and_comments_survive() {
    let text = apply(
        EXAMPLE,
        &[
            r#"{"op":"create_node","bk_obj_id":"set","bk_inst_id":12,"name":"cache","parent":"biz:2","attributes":{"env":"prod"}}"#,
            r#"{"op":"create_node","bk_obj_id":"module","bk_inst_id":120,"name":"redis","parent":"set:12"}"#,
            r#"{"op":"move_hosts","bk_host_ids":[1002],"bk_biz_id":2,"modules":[110,120]}"#,
        ],
    )
    .unwrap();
    assert!(text.contains("# A fleetrun inventory"), "{text}");
    let inventory = Inventory::from_toml(&text).unwrap();
    let targets = Targets {
        topo_nodes: vec![("module".into(), 120)],
        ..Targets::default()
    };
    let resolved = inventory.resolve(&Scope::Biz(2), &targets).unwrap();
    let ids: Vec<i64> = resolved.hosts.iter().map(|h| h.bk_host_id).collect();
    assert_eq!(ids, [1002]);
}

#[test]
fn a_module_holding_hosts_cannot_be_deleted() {
    let err = apply(
        EXAMPLE,
        &[r#"{"op":"delete_node","bk_obj_id":"module","bk_inst_id":100}"#],
    )
    .unwrap_err();
    assert_eq!(
        err.0,
        "module:100 still holds host 1001, agent \"web-2\"'s host; move or delete them first"
    );
}

#[test]
fn a_business_in_use_cannot_be_deleted_until_emptied() {
    let err = apply(EXAMPLE, &[r#"{"op":"delete_business","bk_biz_id":3}"#]).unwrap_err();
    assert!(
        err.0.starts_with("business 3 is still used by set:20"),
        "{err}"
    );
    assert!(err.0.contains("business set 9"), "{err}");
    let text = apply(
        "[[business]]\nbk_biz_id = 4\nname = \"x\"\n\n[[business]]\nbk_biz_id = 5\nname = \"y\"\n",
        &[r#"{"op":"delete_business","bk_biz_id":4}"#],
    )
    .unwrap();
    assert_eq!(
        text.trim_start(),
        "[[business]]\nbk_biz_id = 5\nname = \"y\"\n"
    );
}

#[test]
fn duplicates_and_missing_entries_are_named() {
    let err = apply(
        EXAMPLE,
        &[r#"{"op":"create_business","bk_biz_id":2,"name":"again"}"#],
    )
    .unwrap_err();
    assert_eq!(err.0, "business 2 already exists");
    let err = apply(
        EXAMPLE,
        &[r#"{"op":"update_node","bk_obj_id":"region","bk_inst_id":7,"name":"x"}"#],
    )
    .unwrap_err();
    assert_eq!(err.0, "region:7 does not exist");
    let err = apply(EXAMPLE, &[r#"{"op":"create_node","bk_obj_id":"set","bk_inst_id":30,"name":"x","parent":"nowhere"}"#])
        .unwrap_err();
    assert!(err.0.starts_with("parent: \"nowhere\""), "{err}");
}

#[test]
fn a_built_document_starts_from_nothing() {
    let text = apply(
        "",
        &[
            r#"{"op":"create_business","bk_biz_id":7,"name":"games"}"#,
            r#"{"op":"create_node","bk_obj_id":"zone","bk_inst_id":1,"name":"east","parent":"biz:7"}"#,
            r#"{"op":"create_node","bk_obj_id":"set","bk_inst_id":70,"name":"web","parent":"zone:1"}"#,
            r#"{"op":"create_node","bk_obj_id":"module","bk_inst_id":700,"name":"nginx","parent":"set:70"}"#,
            r#"{"op":"create_host","bk_host_id":9,"ips":["10.1.0.9"],"bk_biz_id":7,"modules":[700],"attributes":{"cpu":4}}"#,
            r#"{"op":"create_dynamic_group","id":"small","bk_biz_id":7,"name":"small hosts","conditions":[{"object":"host","field":"cpu","op":"range","max":8},{"object":"module","field":"bk_module_name","op":"in","value":["nginx","php"]}]}"#,
            r#"{"op":"create_account","id":1,"alias":"root","account":"root","scopes":["biz:7"]}"#,
            r#"{"op":"set_unlisted_agents","bk_biz_id":7,"modules":[700]}"#,
        ],
    )
    .unwrap();
    let inventory = Inventory::from_toml(&text).unwrap_or_else(|e| panic!("{e}\n{text}"));
    let targets = Targets {
        dynamic_groups: vec!["small".into()],
        ..Targets::default()
    };
    let resolved = inventory.resolve(&Scope::Biz(7), &targets).unwrap();
    assert_eq!(resolved.hosts.len(), 1);

    let text = apply(
        &text,
        &[
            r#"{"op":"update_dynamic_group","id":"small","conditions":[{"object":"host","field":"cpu","op":"range","min":8}]}"#,
        ],
    )
    .unwrap();
    let inventory = Inventory::from_toml(&text).unwrap();
    assert!(inventory.resolve(&Scope::Biz(7), &targets).is_err());
}

#[test]
fn an_agents_host_keeps_its_identity_but_takes_attributes() {
    let agents = |id: i64| (id == 5).then(|| "pay-9".to_owned());
    let mut doc = InventoryDocument::parse(EXAMPLE).unwrap();
    let err = doc
        .apply(
            &change(r#"{"op":"update_host","bk_host_id":5,"hostname":"x"}"#),
            &agents,
        )
        .unwrap_err();
    assert!(err.0.contains("its agent reports"), "{err}");
    doc.apply(
        &change(r#"{"op":"update_host","bk_host_id":5,"attributes":{"rack":"c3"}}"#),
        &agents,
    )
    .unwrap();
    let text = doc.text();
    let inventory = Inventory::from_toml(&text).unwrap();
    let placed = inventory.place_agent(&crate::AgentHost {
        agent_id: "pay-9".into(),
        bk_host_id: 5,
        bk_cloud_id: 0,
        ips: vec!["10.9.0.9".parse().unwrap()],
        hostname: "p".into(),
        os_type: "linux".into(),
        address_since: 0,
    });
    // Still where [unlisted_agents] put it, now with the attribute.
    assert_eq!(placed.host.bk_biz_id, Some(3));
    assert_eq!(placed.host.modules, [200]);
    assert_eq!(
        placed.host.attributes.get("rack"),
        Some(&crate::Value::Text("c3".into()))
    );
}

#[test]
fn an_enrolled_agent_is_placed_and_pinned_and_placing_it_again_replaces_both() {
    let place = |ips: &str, modules: &str| {
        format!(
            r#"{{"op":"place_agent","agent_id":"e-1","bk_cloud_id":0,"ips":{ips},"bk_biz_id":2,"modules":{modules}}}"#
        )
    };
    let text = apply(
        EXAMPLE,
        &[
            r#"{"op":"create_node","bk_obj_id":"set","bk_inst_id":12,"name":"cache","parent":"biz:2"}"#,
            r#"{"op":"create_node","bk_obj_id":"module","bk_inst_id":120,"name":"redis","parent":"set:12"}"#,
            &place(r#"["10.0.0.5","192.0.2.7"]"#, "[120]"),
        ],
    )
    .unwrap();
    let inventory = Inventory::from_toml(&text).unwrap();
    assert!(inventory.lists_agent("e-1"));
    let pin = inventory.pinned_address("e-1").unwrap();
    assert_eq!(
        pin.ips,
        [
            "10.0.0.5".parse::<IpAddr>().unwrap(),
            "192.0.2.7".parse().unwrap()
        ]
    );
    let text = apply(&text, &[&place(r#"["10.0.0.6"]"#, "[]")]).unwrap();
    assert_eq!(text.matches("agent_id = \"e-1\"").count(), 1, "{text}");
    let inventory = Inventory::from_toml(&text).unwrap();
    let pin = inventory.pinned_address("e-1").unwrap();
    assert_eq!(pin.ips, ["10.0.0.6".parse::<IpAddr>().unwrap()]);
    let refused = apply(&text, &[&place("[]", "[]")]).unwrap_err();
    assert!(refused.0.contains("ips is empty"), "{refused}");
}

#[test]
fn unlisted_agents_change_only_what_is_named() {
    let text = apply(
        EXAMPLE,
        &[r#"{"op":"set_unlisted_agents","attributes":{"rack":"z9"}}"#],
    )
    .unwrap();
    assert!(
        text.contains("[unlisted_agents]\nbk_biz_id = 3\nmodules = [200]\n"),
        "{text}"
    );
    assert!(text.contains("# Agents listed nowhere go here"), "{text}");
    Inventory::from_toml(&text).unwrap();
    let text = apply(&text, &[r#"{"op":"set_unlisted_agents","bk_biz_id":null}"#]).unwrap();
    assert!(!text.contains("modules = [200]\nattributes"), "{text}");
    let inventory = Inventory::from_toml(&text).unwrap();
    let placed = inventory.place_agent(&crate::AgentHost {
        agent_id: "new".into(),
        bk_host_id: 5,
        bk_cloud_id: 0,
        ips: vec!["10.9.0.9".parse().unwrap()],
        hostname: "n".into(),
        os_type: "linux".into(),
        address_since: 0,
    });
    assert_eq!(placed.host.bk_biz_id, None);
    assert!(placed.host.modules.is_empty());
}

#[test]
fn attributes_merge_and_null_removes() {
    let text = apply(
        EXAMPLE,
        &[r#"{"op":"update_host","bk_host_id":1001,"attributes":{"rack":null,"gpu":true}}"#],
    )
    .unwrap();
    assert!(
        text.contains("attributes = { cpu = 8, gpu = true }"),
        "{text}"
    );
}

#[test]
fn json_names_unknown_ops_and_fields() {
    let err = serde_json::from_str::<Change>(r#"{"op":"explode"}"#).unwrap_err();
    assert!(
        err.to_string().contains("unknown variant `explode`"),
        "{err}"
    );
    let err =
        serde_json::from_str::<Change>(r#"{"op":"delete_business","bk_biz_id":1,"force":true}"#)
            .unwrap_err();
    assert!(err.to_string().contains("unknown field `force`"), "{err}");
}
