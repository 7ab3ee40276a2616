//! Targeting through the inventory: topology nodes, dynamic groups, business sets, accounts
//! with scopes, reloads; with real agents.

use anyhow::Result;
use fleetrun_tests::{reached, start_cluster};
use serde_json::{Value, json};

fn sorted(mut ids: Vec<i64>) -> Vec<i64> {
    ids.sort_unstable();
    ids
}

#[tokio::test(flavor = "multi_thread")]
async fn targets_resolve_through_topology_groups_and_business_sets() -> Result<()> {
    let cluster = start_cluster(3).await?;
    let client = cluster.client();
    let id = |agent: &str| cluster.host_id(agent);
    let (a1, a2, a3) = (id("agent-1"), id("agent-2"), id("agent-3"));

    // cluster.json describes the topology and the groups as they are now.
    let written: Value = serde_json::from_str(&std::fs::read_to_string(
        cluster.dir().join("cluster.json"),
    )?)?;
    assert_eq!(written["dynamic_groups"][0]["id"], "web-servers");
    let mut members: Vec<i64> =
        serde_json::from_value(written["dynamic_groups"][0]["host_ids"].clone())?;
    members.sort_unstable();
    assert_eq!(members, sorted(vec![a1, a2]));
    let demo = &written["topology"]["businesses"][0];
    assert_eq!(demo["bk_biz_id"], 2);
    assert!(
        demo["nodes"]
            .as_array()
            .unwrap()
            .iter()
            .any(|n| n["bk_obj_id"] == "module"
                && n["bk_inst_id"] == 110
                && n["host_ids"] == json!([a3]))
    );

    for (target, expected) in [
        (
            json!({"topo_node_list": [{"id": 110, "node_type": "module"}]}),
            vec![a3],
        ),
        (
            json!({"topo_node_list": [{"id": 10, "node_type": "set"}]}),
            vec![a1, a2],
        ),
        (
            json!({"topo_node_list": [{"id": 2, "node_type": "biz"}]}),
            vec![a1, a2, a3],
        ),
        (
            json!({"dynamic_group_list": [{"id": "web-servers"}]}),
            vec![a1, a2],
        ),
        // Sources merge and de-duplicate.
        (
            json!({"host_id_list": [a3], "dynamic_group_list": [{"id": "web-servers"}], "topo_node_list": [{"id": 100, "node_type": "module"}]}),
            vec![a1, a2, a3],
        ),
    ] {
        let (_, _, status) = cluster
            .run_job(cluster.script_request("echo ok", &[], json!({"target_server": target})))
            .await?;
        assert_eq!(status["job_instance"]["status"], 3, "{target}: {status}");
        assert_eq!(reached(&status), sorted(expected), "{target}");
    }

    // A business set covers its members' hosts.
    let mut in_set = cluster.script_request("echo ok", &[a1, a3], json!({}));
    in_set["bk_scope_type"] = json!("biz_set");
    in_set["bk_scope_id"] = json!("9");
    let (_, _, status) = cluster.run_job(in_set).await?;
    assert_eq!(status["job_instance"]["status"], 3, "{status}");
    assert_eq!(status["job_instance"]["bk_scope_type"], "biz_set");

    // Codes.
    for (target, code) in [
        (
            json!({"dynamic_group_list": [{"id": "no-such-group"}]}),
            1_211_003,
        ),
        (
            json!({"topo_node_list": [{"id": 999, "node_type": "module"}]}),
            1_244_030,
        ),
        (
            json!({"topo_node_list": [{"id": 20, "node_type": "set"}]}),
            1_244_030,
        ),
        (
            json!({"topo_node_list": [{"id": 200, "node_type": "module"}]}),
            1_244_030,
        ),
        (
            json!({"host_id_list": [], "ip_list": [], "topo_node_list": [], "dynamic_group_list": []}),
            1_244_001,
        ),
    ] {
        let envelope = client
            .call_raw(
                "fast_execute_script",
                cluster.script_request("echo", &[], json!({"target_server": target})),
            )
            .await?;
        assert_eq!(envelope["code"], code, "{target}: {envelope}");
    }
    Ok(())
}

#[tokio::test(flavor = "multi_thread")]
async fn reloads_move_hosts_change_groups_and_refuse_bad_files() -> Result<()> {
    let cluster = start_cluster(3).await?;
    let client = cluster.client();
    let id = |agent: &str| cluster.host_id(agent);
    let (a1, a2, a3) = (id("agent-1"), id("agent-2"), id("agent-3"));
    let group = json!({"target_server": {"dynamic_group_list": [{"id": "web-servers"}]}});
    let (_, _, before) = cluster
        .run_job(cluster.script_request("echo", &[], group.clone()))
        .await?;
    assert_eq!(reached(&before), sorted(vec![a1, a2]));

    // Move agent-2 to business 3 and add an account only business 3 may use.
    let path = cluster.dir().join("inventory.toml");
    let original = std::fs::read_to_string(&path)?;
    let moved = format!(
        "{original}\n[[host]]\nagent_id = \"agent-2\"\nbk_biz_id = 3\nmodules = [200]\n\n[[account]]\nid = 7\nalias = \"other-only\"\naccount = \"root\"\nscopes = [\"biz:3\"]\n"
    );
    std::fs::write(&path, &moved)?;
    client.fleetrun("reload_inventory").await?;

    let (_, _, after) = cluster
        .run_job(cluster.script_request("echo", &[], group.clone()))
        .await?;
    assert_eq!(
        reached(&after),
        vec![a1],
        "group membership follows the move"
    );
    let outside = client
        .call_raw(
            "fast_execute_script",
            cluster.script_request("echo", &[a2, a3], json!({})),
        )
        .await?;
    assert_eq!(outside["code"], 1_244_002, "{outside}");
    assert!(
        outside["message"]
            .as_str()
            .unwrap()
            .contains(&a2.to_string())
    );
    let not_here = client
        .call_raw(
            "fast_execute_script",
            cluster.script_request("echo", &[a3], json!({"account_alias": "other-only"})),
        )
        .await?;
    assert_eq!(not_here["code"], 1_244_004, "{not_here}");
    let mut there = cluster.script_request("echo", &[a2], json!({"account_alias": "other-only"}));
    there["bk_scope_id"] = json!("3");
    let (_, _, status) = cluster.run_job(there).await?;
    assert_eq!(status["job_instance"]["status"], 3, "{status}");

    // An invalid file changes nothing, and the error names the line.
    std::fs::write(
        &path,
        format!("{moved}\n[[module]]\nbk_inst_id = 300\nname = \"x\"\nparent = \"set:4242\"\n"),
    )?;
    let refused = client
        .fleetrun("reload_inventory")
        .await
        .unwrap_err()
        .to_string();
    assert!(refused.contains("line"), "{refused}");
    let (_, _, still) = cluster
        .run_job(cluster.script_request("echo", &[], group))
        .await?;
    assert_eq!(reached(&still), vec![a1]);

    // Unassigned hosts are listed but never targets.
    std::fs::write(
        &path,
        original.replace("[unlisted_agents]\nbk_biz_id = 2\nmodules = [101]\n", ""),
    )?;
    client.fleetrun("reload_inventory").await?;
    let hosts = client.hosts().await?;
    let listed = hosts.iter().find(|h| h["bk_host_id"] == a2).unwrap();
    assert_eq!(listed["bk_biz_id"], Value::Null, "{listed}");
    let unassigned = client
        .call_raw(
            "fast_execute_script",
            cluster.script_request("echo", &[a2], json!({})),
        )
        .await?;
    assert_eq!(unassigned["code"], 1_244_002, "{unassigned}");
    Ok(())
}
