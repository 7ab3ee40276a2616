//! Starting a job created with `start_task=false`: it starts as a fresh submit would now, not as
//! it was when created, and exactly once however many starts race, even through two controllers
//! sharing the database. With real agents and real HTTP.

use std::time::Duration;

use anyhow::{Context, Result};
use fleetrun_tests::{ApiClient, cluster::free_port, host_results, reply_message, start_cluster};
use serde_json::{Value, json};

fn start(scope: &Value, job: i64) -> Value {
    let mut request = scope.clone();
    request["job_instance_id"] = json!(job);
    request["operation_code"] = json!(2);
    request
}

fn lines_in(path: &std::path::Path) -> usize {
    std::fs::read_to_string(path).map_or(0, |text| text.lines().count())
}

#[tokio::test(flavor = "multi_thread")]
async fn a_pending_job_is_refused_at_start_as_a_fresh_submit_would_be() -> Result<()> {
    let cluster = start_cluster(2).await?;
    let client = cluster.client();
    let scope = cluster.info.scope();
    let (a1, a2) = (cluster.host_id("agent-1"), cluster.host_id("agent-2"));
    let marker = cluster.dir().join("ran");
    let script = format!("echo ran >> {}", marker.display());
    // Both wait in business 2 as root (account 1): one on agent-1's host, one on agent-2's.
    let later = json!({"start_task": false, "account_id": 1});
    let on_a1 = cluster.script_request(&script, &[a1], later.clone());
    let on_a2 = cluster.script_request(&script, &[a2], later);
    let host_moves = client.call("fast_execute_script", on_a1.clone()).await?["job_instance_id"]
        .as_i64()
        .context("job id")?;
    let account_leaves =
        client.call("fast_execute_script", on_a2.clone()).await?["job_instance_id"]
            .as_i64()
            .context("job id")?;

    // First agent-1's host moves to business 3, then the root account stops being business 2's.
    for (job, request, change, what) in [
        (
            host_moves,
            on_a1,
            json!({"op": "move_hosts", "bk_host_ids": [a1], "bk_biz_id": 3, "modules": [200]}),
            "a host that left the scope",
        ),
        (
            account_leaves,
            on_a2,
            json!({"op": "update_account", "id": 1, "scopes": ["biz:3"]}),
            "an account the scope may no longer use",
        ),
    ] {
        client
            .call("change_inventory", json!({"changes": [change]}))
            .await?;
        let refused = client
            .call_raw("operate_job_instance", start(&scope, job))
            .await?;
        let mut fresh = request.clone();
        fresh["start_task"] = json!(true);
        let fresh = client.call_raw("fast_execute_script", fresh).await?;
        assert_ne!(
            fresh["code"], 0,
            "{what}: a fresh submit was accepted: {fresh}"
        );
        assert_eq!(
            (&refused["code"], &refused["message"]),
            (&fresh["code"], &fresh["message"]),
            "{what}: the start was not refused as a fresh submit is"
        );
        let mut query = scope.clone();
        query["job_instance_id"] = json!(job);
        query["return_ip_result"] = json!(true);
        let status = client.call("get_job_instance_status", query).await?;
        assert_eq!(status["job_instance"]["status"], 1, "{what}: {status}");
        assert_eq!(host_results(&status)[0]["status"], 5, "{what}: {status}");
    }
    assert_eq!(lines_in(&marker), 0, "a refused job ran");
    Ok(())
}

#[tokio::test(flavor = "multi_thread")]
async fn a_restricted_app_starting_a_job_learns_nothing_of_where_its_host_went() -> Result<()> {
    // An app `narrow` that may use business 2 only.
    let mut cluster = start_cluster(2).await?;
    cluster.kill_controller()?;
    let mut config = std::fs::read_to_string(&cluster.controller_config)?;
    config.push_str(
        "\n[[apps]]\nbk_app_code = \"narrow\"\nbk_app_secret = \"narrow-secret\"\nscopes = [\"biz:2\"]\n",
    );
    std::fs::write(&cluster.controller_config, config)?;
    cluster.start_controller().await?;
    let ids: Vec<String> = cluster.agents.iter().map(|a| a.agent_id.clone()).collect();
    cluster.wait_online(&ids, Duration::from_secs(30)).await?;
    let narrow = ApiClient::new(&cluster.info.api_url, "narrow", "narrow-secret", "bob");
    let scope = cluster.info.scope();
    let a1 = cluster.host_id("agent-1");
    let marker = cluster.dir().join("ran");
    let script = format!("echo ran >> {}", marker.display());
    let request = cluster.script_request(&script, &[a1], json!({"start_task": false}));
    let job = narrow.call("fast_execute_script", request.clone()).await?["job_instance_id"]
        .as_i64()
        .context("job id")?;

    // The operator moves the host to business 3, which narrow cannot see.
    cluster
        .client()
        .call(
            "change_inventory",
            json!({"changes": [{"op": "move_hosts", "bk_host_ids": [a1], "bk_biz_id": 3, "modules": [200]}]}),
        )
        .await?;
    let refused = narrow
        .call_raw("operate_job_instance", start(&scope, job))
        .await?;
    let mut fresh = request;
    fresh["start_task"] = json!(true);
    let fresh = narrow.call_raw("fast_execute_script", fresh).await?;
    assert_eq!(fresh["code"], 1_244_030, "{fresh}");
    assert_eq!(
        (&refused["code"], &refused["message"]),
        (&fresh["code"], &fresh["message"]),
        "the start told more than a fresh submit: {refused}"
    );
    assert_eq!(lines_in(&marker), 0, "a refused job ran");
    Ok(())
}

/// Kills a process when dropped.
struct Killed(std::process::Child);

impl Drop for Killed {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

#[tokio::test(flavor = "multi_thread")]
async fn concurrent_starts_through_two_controllers_start_a_pending_job_once() -> Result<()> {
    // One controller per PostgreSQL database: a second is refused (the store's controller lock).
    if !fleetrun_tests::sqlite_only(
        "concurrent_starts_through_two_controllers_start_a_pending_job_once",
    ) {
        return Ok(());
    }
    let cluster = start_cluster(1).await?;
    let client = cluster.client();
    let scope = cluster.info.scope();
    let host = cluster.host_id("agent-1");

    // A second controller on the same database: it shares the jobs, not the agents.
    let http_port = free_port()?;
    let config: String = std::fs::read_to_string(&cluster.controller_config)?
        .lines()
        .map(|line| {
            if line.starts_with("http_listen") {
                format!("http_listen = \"127.0.0.1:{http_port}\"\n")
            } else if line.starts_with("agent_listen") {
                "agent_listen = \"127.0.0.1:0\"\n".to_owned()
            } else {
                format!("{line}\n")
            }
        })
        .collect();
    let second_config = cluster.dir().join("controller-2.toml");
    std::fs::write(&second_config, config)?;
    let _second = Killed(cluster.spawn(
        "fleetrun-controller",
        &second_config,
        &cluster.dir().join("controller-2.log"),
    )?);
    let other = ApiClient::new(
        &format!("http://127.0.0.1:{http_port}"),
        &cluster.info.bk_app_code,
        &cluster.info.bk_app_secret,
        &cluster.info.bk_username,
    );
    fleetrun_tests::eventually(
        Duration::from_secs(30),
        "the second controller answers",
        || {
            let other = other.clone();
            async move { other.hosts().await.ok() }
        },
    )
    .await?;

    let marker = cluster.dir().join("ran");
    let request = cluster.script_request(
        &format!("echo ran >> {}", marker.display()),
        &[host],
        json!({"start_task": false}),
    );
    let job = client.call("fast_execute_script", request).await?["job_instance_id"]
        .as_i64()
        .context("job id")?;

    let mut starts = tokio::task::JoinSet::new();
    for i in 0..20 {
        let through = if i % 2 == 0 {
            client.clone()
        } else {
            other.clone()
        };
        let body = start(&scope, job);
        starts.spawn(async move { through.call_raw("operate_job_instance", body).await });
    }
    let mut replies = Vec::new();
    while let Some(reply) = starts.join_next().await {
        replies.push(reply??);
    }
    let started = replies.iter().filter(|r| r["code"] == 0).count();
    assert_eq!(started, 1, "{replies:#?}");
    for refused in replies.iter().filter(|r| r["code"] != 0) {
        assert_eq!(refused["code"], 1_241_015, "{refused}");
        assert!(
            reply_message(refused).contains("was already started"),
            "{refused}"
        );
    }

    let status = client
        .wait_job(&scope, job, Duration::from_secs(60))
        .await?;
    let step = &status["step_instance_list"][0];
    assert_eq!(
        step["execute_count"], 0,
        "started once, never retried: {status}"
    );
    // Started through the controller the agent is connected to, the host ran it once; through
    // the other, it could not be reached (310) and never ran it.
    let expected_runs = usize::from(host_results(&status)[0]["status"] == 9);
    assert_eq!(lines_in(&marker), expected_runs, "{status}");
    Ok(())
}
