//! Changing the inventory through the admin API: every change checked as a whole, stored as a
//! revision, kept across restarts; the file taking over again when it changes; address conflicts
//! resolved by forgetting the stale host. With real agents.

use std::time::Duration;

use anyhow::Result;
use fleetrun_tests::{eventually, host_results, pki, reached, start_cluster};
use serde_json::{Value, json};

fn topo(obj: &str, id: i64) -> Value {
    json!({"target_server": {"topo_node_list": [{"id": id, "node_type": obj}]}})
}

#[tokio::test(flavor = "multi_thread")]
async fn changes_are_checked_whole_stored_as_revisions_and_survive_restarts() -> Result<()> {
    let mut cluster = start_cluster(3).await?;
    let client = cluster.client();
    let a3 = cluster.host_id("agent-3");

    let first = client.call("get_inventory", json!({})).await?;
    assert_eq!(first["source"], "file", "{first}");
    let r0 = first["revision"].as_i64().unwrap();
    assert!(first["text"].as_str().unwrap().contains("web-servers"));

    // A set, a module, agent-3's host moved into it and a group over it, in one revision.
    let changed = client
        .call(
            "change_inventory",
            json!({"expected_revision": r0, "changes": [
                {"op": "create_node", "bk_obj_id": "set", "bk_inst_id": 12, "name": "cache", "parent": "biz:2"},
                {"op": "create_node", "bk_obj_id": "module", "bk_inst_id": 120, "name": "redis", "parent": "set:12"},
                {"op": "move_hosts", "bk_host_ids": [a3], "bk_biz_id": 2, "modules": [120]},
                {"op": "create_dynamic_group", "id": "cache-hosts", "bk_biz_id": 2, "name": "cache",
                 "conditions": [{"object": "module", "field": "bk_module_name", "op": "equal", "value": "redis"}]},
            ]}),
        )
        .await?;
    let r1 = changed["revision"].as_i64().unwrap();
    assert_eq!(
        (changed["previous_revision"].as_i64(), r1),
        (Some(r0), r0 + 1)
    );
    assert!(
        changed["summary"]
            .as_str()
            .unwrap()
            .contains("create_node set:12"),
        "{changed}"
    );
    for target in [
        topo("module", 120),
        json!({"target_server": {"dynamic_group_list": [{"id": "cache-hosts"}]}}),
    ] {
        let (_, _, status) = cluster
            .run_job(cluster.script_request("echo", &[], target.clone()))
            .await?;
        assert_eq!(status["job_instance"]["status"], 3, "{target}: {status}");
        assert_eq!(reached(&status), vec![a3], "{target}");
    }

    // Refused changes name the change and the reason, and change nothing.
    for (changes, expected, message) in [
        (
            json!([{"op": "delete_node", "bk_obj_id": "module", "bk_inst_id": 120}]),
            None,
            "changes[0] (delete_node module:120): module:120 still holds agent \"agent-3\"'s host",
        ),
        (
            json!([{"op": "move_hosts", "bk_host_ids": [a3], "bk_biz_id": 3, "modules": [110]}]),
            None,
            "module 110 belongs to business 2, not 3",
        ),
        (
            json!([{"op": "create_business", "bk_biz_id": 8, "name": "x"}]),
            Some(r0),
            &format!("the inventory is at revision {r1}, not {r0}") as &str,
        ),
        (
            json!([{"op": "create_business", "bk_biz_id": 8, "name": "x"},
                   {"op": "delete_host", "bk_host_id": a3}]),
            None,
            "changes[1] (delete_host",
        ),
        (
            json!([{"op": "launch_rockets"}]),
            None,
            "unknown variant `launch_rockets`",
        ),
    ] {
        let mut request = json!({"changes": changes});
        if let Some(expected) = expected {
            request["expected_revision"] = json!(expected);
        }
        let refused = client.call_raw("change_inventory", request).await?;
        assert_eq!(refused["code"], 1_240_003, "{refused}");
        let text = refused["message"].as_str().unwrap();
        assert!(text.contains(message), "{message:?} not in {text:?}");
    }
    assert_eq!(
        client.call("get_inventory", json!({})).await?["revision"],
        json!(r1)
    );

    // Kept in the store: a restart with the same file keeps the changes.
    cluster.kill_controller()?;
    cluster.start_controller().await?;
    cluster
        .wait_online(&["agent-3".to_owned()], Duration::from_secs(30))
        .await?;
    let after_restart = client.call("get_inventory", json!({})).await?;
    assert_eq!(after_restart["revision"], json!(r1));
    assert_eq!(after_restart["source"], "api");
    let (_, _, status) = cluster
        .run_job(cluster.script_request("echo", &[], topo("module", 120)))
        .await?;
    assert_eq!(reached(&status), vec![a3]);

    // An edited file takes over again at the next start; the API's revision stays readable.
    let path = cluster.dir().join("inventory.toml");
    let file = std::fs::read_to_string(&path)?;
    std::fs::write(
        &path,
        format!("{file}\n[[business]]\nbk_biz_id = 4\nname = \"added in the file\"\n"),
    )?;
    cluster.kill_controller()?;
    cluster.start_controller().await?;
    let imported = client.call("get_inventory", json!({})).await?;
    assert_eq!(imported["source"], "file", "{imported}");
    let r2 = imported["revision"].as_i64().unwrap();
    assert_eq!(r2, r1 + 1);
    let gone = client
        .call_raw(
            "fast_execute_script",
            cluster.script_request("echo", &[], topo("module", 120)),
        )
        .await?;
    assert_eq!(gone["code"], 1_244_030, "{gone}");
    let history = client
        .call("get_inventory_history", json!({"limit": 3}))
        .await?;
    let sources: Vec<&str> = history
        .as_array()
        .unwrap()
        .iter()
        .map(|r| r["source"].as_str().unwrap())
        .collect();
    assert_eq!(sources, ["file", "api", "file"], "{history}");

    // Rolling back is replacing the document with an older revision's.
    let old = client
        .call("get_inventory", json!({"revision": r1}))
        .await?;
    let replaced = client
        .call(
            "replace_inventory",
            json!({"text": old["text"], "expected_revision": r2}),
        )
        .await?;
    assert_eq!(replaced["revision"], json!(r2 + 1));
    let (_, _, status) = cluster
        .run_job(cluster.script_request("echo", &[], topo("module", 120)))
        .await?;
    assert_eq!(reached(&status), vec![a3]);
    let bad = client
        .call_raw(
            "replace_inventory",
            json!({"text": "[[business]]\nbk_biz_id = \"two\"\n"}),
        )
        .await?;
    assert_eq!(bad["code"], 1_240_003, "{bad}");
    assert!(bad["message"].as_str().unwrap().contains("line 2"), "{bad}");
    Ok(())
}

#[tokio::test(flavor = "multi_thread")]
async fn an_address_claimed_twice_is_flagged_until_the_stale_host_is_forgotten() -> Result<()> {
    let mut cluster = start_cluster(3).await?;
    let client = cluster.client();
    let id = |agent: &str| cluster.host_id(agent);
    let (a1, a2, a3) = (id("agent-1"), id("agent-2"), id("agent-3"));
    let ip1 = cluster.agents[0].ip.to_string();
    let by_ip = json!({"target_server": {"ip_list": [{"bk_cloud_id": 0, "ip": ip1}]}});

    // agent-1's machine is gone; a new machine with its address runs agent-3.
    cluster.kill_agent(0)?;
    cluster
        .wait_offline("agent-1", Duration::from_secs(30))
        .await?;
    cluster.kill_agent(2)?;
    cluster
        .wait_offline("agent-3", Duration::from_secs(30))
        .await?;
    // The new machine connects from the address, with a certificate naming it.
    let ca = pki::Ca::open_or_create(&cluster.dir().join("certs"), "unused")?;
    ca.issue_agent_at("agent-3", &[ip1.parse()?])?;
    let config = std::fs::read_to_string(&cluster.agents[2].config)?;
    let ip3 = cluster.agents[2].ip;
    std::fs::write(
        &cluster.agents[2].config,
        config.replace(
            &format!("bind = \"{ip3}:0\""),
            &format!("bind = \"{ip1}:0\""),
        ),
    )?;
    cluster.start_agent(2)?;
    // Online with its new address (a list read while it registers may show the old one).
    let hosts = eventually(
        Duration::from_secs(30),
        "agent-3 back with the address",
        || {
            let client = client.clone();
            let ip1 = ip1.clone();
            async move {
                let hosts = client.hosts().await.ok()?;
                hosts
                    .iter()
                    .any(|h| h["agent_id"] == "agent-3" && h["online"] == true && h["ip"] == ip1)
                    .then_some(hosts)
            }
        },
    )
    .await?;
    let flagged = |hosts: &[Value], id: i64| {
        hosts.iter().find(|h| h["bk_host_id"] == id).unwrap()["address_conflict"] == true
    };
    // The earlier claim holds the address, whatever the ids: the newcomer is flagged and not
    // reached by it.
    assert!(flagged(&hosts, a3), "{hosts:?}");
    assert!(!flagged(&hosts, a1), "{hosts:?}");
    let (_, _, status) = cluster
        .run_job(cluster.script_request("echo", &[], by_ip.clone()))
        .await?;
    assert_eq!(reached(&status), vec![a1]);
    assert_eq!(host_results(&status)[0]["status"], 310, "{status}");

    // A connected agent's host cannot be forgotten; the stale one can.
    let refused = client
        .call_raw(
            "change_inventory",
            json!({"changes": [{"op": "delete_host", "bk_host_id": a2}]}),
        )
        .await?;
    assert_eq!(refused["code"], 1_240_003, "{refused}");
    assert!(
        refused["message"]
            .as_str()
            .unwrap()
            .contains("is connected"),
        "{refused}"
    );
    client
        .call(
            "change_inventory",
            json!({"changes": [{"op": "delete_host", "bk_host_id": a1}]}),
        )
        .await?;
    let hosts = client.hosts().await?;
    assert!(hosts.iter().all(|h| h["bk_host_id"] != a1), "{hosts:?}");
    assert!(!flagged(&hosts, a3), "{hosts:?}");
    let (_, _, status) = cluster
        .run_job(cluster.script_request("echo", &[], by_ip))
        .await?;
    assert_eq!(status["job_instance"]["status"], 3, "{status}");
    assert_eq!(reached(&status), vec![a3]);
    Ok(())
}
