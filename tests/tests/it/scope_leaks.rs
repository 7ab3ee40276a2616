//! An app restricted to one business probes for the others, through real HTTP, and learns
//! nothing: not their names or members, not whether they exist, not which of their hosts holds
//! an address.

use std::time::Duration;

use anyhow::Result;
use fleetrun_tests::{ApiClient, TestCluster, start_cluster};
use serde_json::{Value, json};

const OWN_BIZ: &str = "3";

/// Two businesses: agent-1 in business 2 ("demo", in business set 9 "all demo" with 3),
/// agent-2 in business 3; and an app `narrow` that may use business 3 only.
async fn cluster() -> Result<(TestCluster, ApiClient)> {
    let mut cluster = start_cluster(2).await?;
    cluster.kill_controller()?;
    let inventory = cluster.dir().join("inventory.toml");
    let text = std::fs::read_to_string(&inventory)?.replace(
        "[unlisted_agents]\nbk_biz_id = 2\nmodules = [101]",
        "[unlisted_agents]\nbk_biz_id = 3\nmodules = [200]",
    );
    std::fs::write(&inventory, text)?;
    let mut config = std::fs::read_to_string(&cluster.controller_config)?;
    config.push_str(&format!(
        "\n[[apps]]\nbk_app_code = \"narrow\"\nbk_app_secret = \"narrow-secret\"\nscopes = [\"biz:{OWN_BIZ}\"]\n"
    ));
    std::fs::write(&cluster.controller_config, config)?;
    cluster.start_controller().await?;
    let ids: Vec<String> = cluster.agents.iter().map(|a| a.agent_id.clone()).collect();
    cluster.wait_online(&ids, Duration::from_secs(30)).await?;
    let narrow = ApiClient::new(&cluster.info.api_url, "narrow", "narrow-secret", "bob");
    Ok((cluster, narrow))
}

/// A fast_execute_script request of the narrow app, in its own business.
fn request(cluster: &TestCluster, target_server: Value) -> Value {
    let mut request = cluster.script_request("echo hi", &[], json!({}));
    request["bk_scope_id"] = json!(OWN_BIZ);
    request["target_server"] = target_server;
    request
}

/// The envelope without what differs between any two replies (the request id).
fn answer(envelope: &Value) -> String {
    json!([
        envelope["code"],
        envelope["message"],
        envelope["permission"]
    ])
    .to_string()
}

#[tokio::test(flavor = "multi_thread")]
async fn a_restricted_app_learns_nothing_of_other_businesses() -> Result<()> {
    let (cluster, narrow) = cluster().await?;
    let other_host = cluster.host_id("agent-1");
    let own_host = cluster.host_id("agent-2");
    let other_ip = cluster.agents[0].ip.to_string();

    // The topology shows its business only: no other business's nodes, groups, or business
    // set with its name and members.
    let topology = narrow.fleetrun("get_topology").await?;
    let businesses: Vec<&Value> = topology["businesses"].as_array().unwrap().iter().collect();
    assert_eq!(businesses.len(), 1, "{topology}");
    assert_eq!(businesses[0]["bk_biz_id"], 3);
    assert_eq!(businesses[0]["host_ids"], json!([own_host]));
    assert_eq!(topology["business_sets"], json!([]), "{topology}");
    assert_eq!(topology["dynamic_groups"], json!([]), "{topology}");
    let text = topology.to_string();
    for secret in ["demo", "web", "\"db\"", "nginx", "mysql"] {
        assert!(!text.contains(secret), "{secret} in {topology}");
    }
    // The unrestricted app still sees everything.
    let full = cluster.client().fleetrun("get_topology").await?;
    assert_eq!(full["business_sets"][0]["members"], json!([2, 3]), "{full}");

    // A forbidden business and one that does not exist get the same answer, through every API
    // that takes a scope.
    for (api, extra) in [
        ("get_account_list", json!({})),
        (
            "get_job_instance_list",
            json!({"create_time_start": 0, "create_time_end": 1000}),
        ),
        ("get_job_instance_status", json!({"job_instance_id": 1})),
        (
            "fast_execute_script",
            request(&cluster, json!({"host_id_list": [own_host]})),
        ),
    ] {
        let ask = |scope_type: &str, id: &str| {
            let mut body = extra.clone();
            body["bk_scope_type"] = json!(scope_type);
            body["bk_scope_id"] = json!(id);
            narrow.call_raw(api, body)
        };
        for (scope_type, existing, missing) in [("biz", "2", "999"), ("biz_set", "9", "99")] {
            let forbidden = ask(scope_type, existing).await?;
            let absent = ask(scope_type, missing).await?;
            assert_eq!(forbidden["code"], 1_238_001, "{api}: {forbidden}");
            assert_eq!(
                answer(&absent).replace(missing, existing),
                answer(&forbidden),
                "{api} {scope_type}: {forbidden} / {absent}"
            );
        }
    }

    // A host of another business, named by id or by address, is as absent as one that does not
    // exist: same code, same message but for the name.
    let cases = [
        (
            json!({"host_id_list": [other_host]}),
            json!({"host_id_list": [987_654]}),
            (other_host.to_string(), "987654".to_owned()),
        ),
        (
            json!({"ip_list": [{"bk_cloud_id": 0, "ip": other_ip}]}),
            json!({"ip_list": [{"bk_cloud_id": 0, "ip": "10.255.255.254"}]}),
            (format!("0:{other_ip}"), "0:10.255.255.254".to_owned()),
        ),
        // Mixed with an unknown host, it is listed with it rather than left out.
        (
            json!({"host_id_list": [987_654, other_host]}),
            json!({"host_id_list": [987_654, 987_655]}),
            (other_host.to_string(), "987655".to_owned()),
        ),
        // Mixed with its own host, or with a topology node of its own business.
        (
            json!({"host_id_list": [own_host, other_host]}),
            json!({"host_id_list": [own_host, 987_654]}),
            (other_host.to_string(), "987654".to_owned()),
        ),
        (
            json!({"host_id_list": [other_host], "topo_node_list": [{"id": 200, "node_type": "module"}]}),
            json!({"host_id_list": [987_654], "topo_node_list": [{"id": 200, "node_type": "module"}]}),
            (other_host.to_string(), "987654".to_owned()),
        ),
    ];
    for (existing, missing, (existing_name, missing_name)) in cases {
        let hidden = narrow
            .call_raw("fast_execute_script", request(&cluster, existing.clone()))
            .await?;
        let absent = narrow
            .call_raw("fast_execute_script", request(&cluster, missing.clone()))
            .await?;
        assert_eq!(hidden["code"], 1_244_030, "{existing}: {hidden}");
        assert_eq!(
            answer(&hidden),
            answer(&absent).replace(&missing_name, &existing_name),
            "{existing}: {hidden} / {absent}"
        );
    }

    // Its own host runs; and the unrestricted app, which may see business 2, is still told that
    // a host is outside the scope it asked for.
    let accepted = narrow
        .call(
            "fast_execute_script",
            request(&cluster, json!({"host_id_list": [own_host]})),
        )
        .await?;
    assert!(accepted["job_instance_id"].as_i64().is_some());
    let outside = cluster
        .client()
        .call_raw(
            "fast_execute_script",
            request(&cluster, json!({"host_id_list": [other_host]})),
        )
        .await?;
    assert_eq!(outside["code"], 1_244_002, "{outside}");
    Ok(())
}
