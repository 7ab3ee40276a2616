//! Controllers dispatching each other's jobs: agents split between two controllers sharing a
//! PostgreSQL database; a job submitted through one reaches every host, whichever controller
//! holds its agent; it is terminated and followed through the other; a revocation made through
//! one cuts the agent off the other. Skipped on SQLite, where one controller holds the file.

use std::time::Duration;

use anyhow::{Context as _, Result};
use fleetrun_tests::{
    TestCluster, cluster::ClusterOptions, eventually, host_results, start_shared_cluster,
};
use serde_json::{Value, json};

fn numbered(n: u32, pause: &str) -> String {
    format!("for i in $(seq 1 {n}); do echo \"line $i\"; sleep {pause}; done")
}

fn expected_lines(n: u32) -> String {
    (1..=n).map(|i| format!("line {i}\n")).collect()
}

/// Submits through controller `index`'s API; (job, step).
async fn submit_to(
    cluster: &TestCluster,
    index: usize,
    script: &str,
    hosts: &[i64],
    extra: Value,
) -> Result<(i64, i64)> {
    let accepted = cluster
        .client_at(index)
        .call(
            "fast_execute_script",
            cluster.script_request(script, hosts, extra),
        )
        .await?;
    Ok((
        accepted["job_instance_id"].as_i64().context("job id")?,
        accepted["step_instance_id"].as_i64().context("step id")?,
    ))
}

/// Two controllers, two agents: agent 0 on c1, agent 1 on c2 (each tries its own first).
async fn split_cluster(test: &str) -> Result<Option<TestCluster>> {
    start_shared_cluster(
        test,
        2,
        2,
        ClusterOptions {
            lease_secs: Some(3),
            ..Default::default()
        },
    )
    .await
}

/// Waits until each agent is connected to the controller it tries first (its log says so),
/// and every controller places every host in its inventory: a host registered through one
/// controller reaches the others' inventories by its news.
async fn agents_split(cluster: &TestCluster) -> Result<()> {
    for (i, agent) in cluster.agents.iter().enumerate() {
        let log = cluster.controller_log_at(i);
        let agent_id = agent.agent_id.clone();
        eventually(
            Duration::from_secs(30),
            "the agent on its controller",
            || {
                let text = std::fs::read_to_string(&log).unwrap_or_default();
                let online = text
                    .lines()
                    .any(|l| l.contains("agent online") && l.contains(&agent_id));
                async move { online.then_some(()) }
            },
        )
        .await?;
    }
    let hosts = cluster.host_ids();
    for index in 0..cluster.info.api_urls.len() {
        let client = cluster.client_at(index);
        eventually(
            Duration::from_secs(10),
            "every host placed in each controller's inventory",
            || {
                let client = client.clone();
                let hosts = hosts.clone();
                async move {
                    let listed = client.hosts().await.ok()?;
                    hosts
                        .iter()
                        .all(|id| {
                            listed
                                .iter()
                                .any(|h| h["bk_host_id"] == *id && !h["bk_biz_id"].is_null())
                        })
                        .then_some(())
                }
            },
        )
        .await?;
    }
    Ok(())
}

#[tokio::test(flavor = "multi_thread")]
async fn a_job_through_one_controller_reaches_hosts_connected_to_another() -> Result<()> {
    let Some(cluster) =
        split_cluster("a_job_through_one_controller_reaches_hosts_connected_to_another").await?
    else {
        return Ok(());
    };
    agents_split(&cluster).await?;
    let hosts = cluster.host_ids();
    for through in [0, 1] {
        let (job, step) =
            submit_to(&cluster, through, &numbered(20, "0.05"), &hosts, json!({})).await?;
        // Followed through the other controller: the store is shared.
        let other = cluster.client_at(1 - through);
        let status = other
            .wait_job(&cluster.info.scope(), job, Duration::from_secs(60))
            .await?;
        assert_eq!(status["job_instance"]["status"], 3, "{status}");
        for host in host_results(&status) {
            assert_eq!(host["status"], 9, "{status}");
        }
        let logs = other.logs(&cluster.info.scope(), job, step, &hosts).await?;
        assert_eq!(logs.len(), 2);
        for (_, log) in &logs {
            assert_eq!(log, &expected_lines(20), "every line once, in order");
        }
    }
    // The host connected to c2 ran c1's job on c2.
    let c2_log = std::fs::read_to_string(cluster.controller_log_at(1))?;
    assert!(
        c2_log.contains("running hosts handed over by the controller holding the job"),
        "c2 ran no handed host"
    );
    Ok(())
}

#[tokio::test(flavor = "multi_thread")]
async fn a_job_is_terminated_and_streamed_through_the_other_controller() -> Result<()> {
    let Some(cluster) =
        split_cluster("a_job_is_terminated_and_streamed_through_the_other_controller").await?
    else {
        return Ok(());
    };
    agents_split(&cluster).await?;
    let hosts = cluster.host_ids();
    // Streamed through c2, run by c1 (and by c2 for its host).
    let (job, _) = submit_to(&cluster, 0, &numbered(10, "0.1"), &hosts, json!({})).await?;
    let mut body = cluster.info.scope();
    body["job_instance_id"] = json!(job);
    let last = cluster.client_at(1).follow_job(body).await?;
    assert_eq!(last["status"], 3, "{last}");

    // Terminated through c2 while both hosts run.
    let (job, _) = submit_to(&cluster, 0, &numbered(600, "0.1"), &hosts, json!({})).await?;
    let c1 = cluster.client_at(0);
    let mut query = cluster.info.scope();
    query["job_instance_id"] = json!(job);
    query["return_ip_result"] = json!(true);
    eventually(Duration::from_secs(30), "both hosts running", || {
        let (c1, query) = (c1.clone(), query.clone());
        async move {
            let status = c1.call("get_job_instance_status", query).await.ok()?;
            host_results(&status)
                .iter()
                .all(|h| h["status"] == 7)
                .then_some(())
        }
    })
    .await?;
    let mut operate = cluster.info.scope();
    operate["job_instance_id"] = json!(job);
    operate["operation_code"] = json!(1);
    cluster
        .client_at(1)
        .call("operate_job_instance", operate)
        .await?;
    let status = c1
        .wait_job(&cluster.info.scope(), job, Duration::from_secs(30))
        .await?;
    assert_eq!(status["job_instance"]["status"], 11, "{status}");
    for host in host_results(&status) {
        assert_eq!(host["status"], 403, "{status}");
    }
    Ok(())
}

#[tokio::test(flavor = "multi_thread")]
async fn a_revocation_through_one_controller_cuts_the_agent_off_the_other() -> Result<()> {
    let Some(cluster) =
        split_cluster("a_revocation_through_one_controller_cuts_the_agent_off_the_other").await?
    else {
        return Ok(());
    };
    agents_split(&cluster).await?;
    // Agent 1 is on c2; revoked through c1.
    let agent_id = cluster.agents[1].agent_id.clone();
    let mut body = json!({"agent_id": agent_id});
    body["reason"] = json!("lost laptop");
    cluster.client_at(0).call("revoke_agent", body).await?;
    let log = cluster.controller_log_at(1);
    eventually(Duration::from_secs(10), "c2 cuts the agent off", || {
        let text = std::fs::read_to_string(&log).unwrap_or_default();
        async move {
            text.contains("agent revoked through another controller")
                .then_some(())
        }
    })
    .await?;
    // It was told why, and each controller it goes back to (it lists both) refuses it: neither
    // gives it its place back, and it is online through neither.
    let agent_log = cluster.agents[1].log.clone();
    eventually(Duration::from_secs(10), "the agent told why", || {
        let text = std::fs::read_to_string(&agent_log).unwrap_or_default();
        async move { text.contains("revoked by an operator").then_some(()) }
    })
    .await?;
    let logs = [cluster.controller_log_at(0), log];
    eventually(Duration::from_secs(20), "its reconnections refused", || {
        let refused: usize = logs
            .iter()
            .map(|log| {
                std::fs::read_to_string(log)
                    .unwrap_or_default()
                    .lines()
                    .filter(|l| l.contains("refusing a revoked agent") && l.contains(&agent_id))
                    .count()
            })
            .sum();
        async move { (refused >= 2).then_some(()) }
    })
    .await?;
    for index in 0..2 {
        let hosts = cluster.client_at(index).hosts().await?;
        let host = hosts
            .iter()
            .find(|h| h["agent_id"] == agent_id.as_str())
            .context("the revoked agent's host")?;
        assert_eq!(host["online"], false, "{host}");
    }
    Ok(())
}
