//! What apps and accounts may do is only what the configuration says: no scopes is an error for
//! an app and "nowhere" for an account, and administration is a grant of its own, not implied
//! by being allowed every scope. With the real controller binary and real HTTP.

use std::{
    process::Command,
    time::{Duration, Instant},
};

use anyhow::Result;
use fleetrun_tests::{ApiClient, TestCluster, reply_message, start_cluster};
use serde_json::json;

/// Runs the real controller binary with `config` until it exits (killed after 20 s: a controller
/// that starts is a failure here); its exit code and output.
fn run_controller_with(cluster: &TestCluster, name: &str, config: String) -> (Option<i32>, String) {
    let path = cluster.dir().join(name);
    std::fs::write(&path, config).unwrap();
    let log = cluster.dir().join(format!("{name}.log"));
    let mut child = Command::new(cluster.bin_dir.join("fleetrun-controller"))
        .arg("--config")
        .arg(&path)
        .env("FLEETRUN_LOG", "info")
        .stdout(std::fs::File::create(&log).unwrap())
        .stderr(std::fs::File::options().append(true).open(&log).unwrap())
        .spawn()
        .unwrap();
    let deadline = Instant::now() + Duration::from_secs(20);
    let status = loop {
        if let Some(status) = child.try_wait().unwrap() {
            break status;
        }
        if Instant::now() > deadline {
            child.kill().unwrap();
            break child.wait().unwrap();
        }
        std::thread::sleep(Duration::from_millis(20));
    };
    (status.code(), std::fs::read_to_string(&log).unwrap())
}

#[tokio::test(flavor = "multi_thread")]
async fn an_app_or_account_without_scopes_keeps_the_controller_from_starting() -> Result<()> {
    let cluster = start_cluster(0).await?;
    let config = std::fs::read_to_string(&cluster.controller_config)?;

    let (code, output) = run_controller_with(
        &cluster,
        "unscoped-app.toml",
        format!("{config}\n[[apps]]\nbk_app_code = \"forgotten\"\nbk_app_secret = \"s\"\n"),
    );
    assert_eq!(code, Some(78), "{output}");
    assert!(
        output.contains("\"forgotten\" has no scopes"),
        "the app is not named: {output}"
    );

    // The flat configuration's accounts, without an inventory file.
    let flat: String = config
        .lines()
        .filter(|line| !line.starts_with("inventory ="))
        .map(|line| format!("{line}\n"))
        .collect();
    let (code, output) = run_controller_with(
        &cluster,
        "unscoped-account.toml",
        format!(
            "{flat}\n[[businesses]]\nbk_biz_id = 2\nname = \"demo\"\n\n\
             [[accounts]]\nid = 1\nalias = \"root\"\naccount = \"root\"\n"
        ),
    );
    assert_eq!(code, Some(78), "{output}");
    assert!(
        output.contains("\"root\" has no scopes"),
        "the account is not named: {output}"
    );
    Ok(())
}

#[tokio::test(flavor = "multi_thread")]
async fn an_app_allowed_every_scope_does_not_administer_without_the_grant() -> Result<()> {
    let mut cluster = start_cluster(1).await?;
    let config = std::fs::read_to_string(&cluster.controller_config)?;
    std::fs::write(
        &cluster.controller_config,
        format!(
            "{config}\n[[apps]]\nbk_app_code = \"wide\"\nbk_app_secret = \"wide-secret\"\nscopes = [\"*\"]\n"
        ),
    )?;
    cluster.kill_controller()?;
    cluster.start_controller().await?;
    cluster
        .wait_online(&["agent-1".to_owned()], Duration::from_secs(30))
        .await?;
    let wide = ApiClient::new(&cluster.info.api_url, "wide", "wide-secret", "mallory");
    let host = cluster.host_id("agent-1");

    // It acts in every scope...
    let (_, _, status) = cluster
        .run_job({
            let mut request = cluster.script_request("echo", &[host], json!({}));
            request["bk_app_code"] = json!("wide");
            request["bk_app_secret"] = json!("wide-secret");
            request
        })
        .await?;
    assert_eq!(status["job_instance"]["status"], 3, "{status}");

    // ...but administers nothing.
    let before = cluster.client().call("get_inventory", json!({})).await?["revision"].clone();
    for (api, body) in [
        (
            "change_inventory",
            json!({"changes": [{"op": "create_business", "bk_biz_id": 8, "name": "mine"}]}),
        ),
        ("replace_inventory", json!({"text": ""})),
        ("reload_inventory", json!({"force": true})),
        ("get_inventory", json!({})),
        ("get_inventory_history", json!({})),
    ] {
        let refused = wide.call_raw(api, body).await?;
        assert_eq!(refused["code"], 1_238_001, "{api}: {refused}");
        assert!(
            reply_message(&refused).contains("not granted admin"),
            "{api}: {refused}"
        );
    }
    let after = cluster.client().call("get_inventory", json!({})).await?["revision"].clone();
    assert_eq!(before, after, "the inventory changed");
    Ok(())
}

#[tokio::test(flavor = "multi_thread")]
async fn an_account_listing_no_scope_runs_nothing() -> Result<()> {
    let cluster = start_cluster(1).await?;
    let client = cluster.client();
    let host = cluster.host_id("agent-1");
    client
        .call(
            "change_inventory",
            json!({"changes": [{"op": "create_account", "id": 8, "alias": "loose", "account": "root"}]}),
        )
        .await?;
    let refused = client
        .call_raw(
            "fast_execute_script",
            cluster.script_request("echo", &[host], json!({"account_alias": "loose"})),
        )
        .await?;
    assert_eq!(refused["code"], 1_244_004, "{refused}");
    let mut query = cluster.info.scope();
    query["length"] = json!(1000);
    let listed = client.call("get_account_list", query).await?;
    assert!(
        !listed["data"]
            .as_array()
            .into_iter()
            .flatten()
            .any(|a| a["alias"] == "loose"),
        "{listed}"
    );
    Ok(())
}
