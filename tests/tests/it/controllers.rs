//! Several controllers sharing one PostgreSQL database: each job's bookkeeping is leased to one
//! controller; a controller starting does not touch the jobs another one runs; a dead
//! controller's jobs are taken up by another once their leases expire, and end once, their
//! callback fired once. Skipped on SQLite, where one controller holds the file.

use std::{
    sync::{Arc, Mutex},
    time::Duration,
};

use anyhow::{Context as _, Result};
use fleetrun_tests::{
    TestCluster, cluster::ClusterOptions, eventually, host_results, start_shared_cluster,
};
use serde_json::{Value, json};

fn numbered(n: u32) -> String {
    format!("for i in $(seq 1 {n}); do echo \"line $i\"; sleep 0.1; done")
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

async fn task_received(cluster: &TestCluster) -> Result<()> {
    let agent_log = cluster.agents[0].log.clone();
    eventually(Duration::from_secs(20), "the agent has the task", || {
        let text = std::fs::read_to_string(&agent_log).unwrap_or_default();
        async move { text.contains("task received").then_some(()) }
    })
    .await
}

/// A loopback receiver of callbacks; what it received.
async fn callback_receiver() -> Result<(String, Arc<Mutex<Vec<Value>>>, tokio::task::JoinHandle<()>)>
{
    let received: Arc<Mutex<Vec<Value>>> = Arc::default();
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await?;
    let url = format!("http://{}/hook", listener.local_addr()?);
    let inbox = received.clone();
    let app = axum::Router::new().route(
        "/hook",
        axum::routing::post(move |body: axum::body::Bytes| {
            let inbox = inbox.clone();
            async move {
                if let Ok(value) = serde_json::from_slice::<Value>(&body) {
                    inbox.lock().unwrap().push(value);
                }
                "ok"
            }
        }),
    );
    let server = tokio::spawn(async move {
        let _ = axum::serve(listener, app).await;
    });
    Ok((url, received, server))
}

#[tokio::test(flavor = "multi_thread")]
async fn a_controller_starting_leaves_the_jobs_another_one_runs_alone() -> Result<()> {
    let Some(mut cluster) = start_shared_cluster(
        "a_controller_starting_leaves_the_jobs_another_one_runs_alone",
        1,
        2,
        ClusterOptions::default(),
    )
    .await?
    else {
        return Ok(());
    };
    let hosts = cluster.host_ids();
    // The agent is on c1 (its first controller); c1 runs the job.
    let (job, step) = submit_to(&cluster, 0, &numbered(40), &hosts, json!({})).await?;
    task_received(&cluster).await?;
    // c2 dies and starts again meanwhile: at start it takes up only the jobs whose lease it
    // can take; c1 holds this one's. Before leases, it ended every unfinished job (310).
    cluster.kill_controller_at(1)?;
    cluster.start_controller_at(1).await?;
    // Read through c2: the store is shared.
    let status = cluster
        .client_at(1)
        .wait_job(&cluster.info.scope(), job, Duration::from_secs(60))
        .await?;
    assert_eq!(status["job_instance"]["status"], 3, "{status}");
    assert_eq!(host_results(&status)[0]["status"], 9, "{status}");
    let logs = cluster
        .client_at(1)
        .logs(&cluster.info.scope(), job, step, &hosts)
        .await?;
    assert_eq!(logs[0].1, expected_lines(40), "every line once, in order");
    Ok(())
}

#[tokio::test(flavor = "multi_thread")]
async fn a_dead_controllers_job_is_taken_up_by_another_and_ends_once() -> Result<()> {
    let Some(mut cluster) = start_shared_cluster(
        "a_dead_controllers_job_is_taken_up_by_another_and_ends_once",
        1,
        2,
        ClusterOptions {
            lease_secs: Some(3),
            // The task's deadline: its timeout plus 3 s, so that the agent, which goes on trying
            // the dead controller that sent it the task, is not waited for long.
            controller_extra: Some("[limits]\nagent_grace_secs = 3\n".into()),
            ..Default::default()
        },
    )
    .await?
    else {
        return Ok(());
    };
    let hosts = cluster.host_ids();
    let (url, received, server) = callback_receiver().await?;
    let (job, _) = submit_to(
        &cluster,
        0,
        "sleep 3; echo done",
        &hosts,
        json!({"timeout": 5, "callback_url": url}),
    )
    .await?;
    task_received(&cluster).await?;
    // Let c1 save where the task stands, then kill it: its lease runs out unrenewed.
    tokio::time::sleep(Duration::from_millis(1_500)).await;
    cluster.kill_controller_at(0)?;
    let c2 = cluster.client_at(1);
    let status = c2
        .wait_job(&cluster.info.scope(), job, Duration::from_secs(60))
        .await?;
    // Taken up, not ended at once as interrupted: the host waited for its agent until the
    // task's deadline.
    let c2_log = std::fs::read_to_string(&cluster.others[0].log)?;
    assert!(
        c2_log.contains("taking up jobs whose controller stopped renewing"),
        "c2 did not take the job up"
    );
    assert_eq!(status["job_instance"]["status"], 4, "{status}");
    assert_eq!(host_results(&status)[0]["status"], 310, "{status}");
    // It waited: the host ended no earlier than the task's deadline (sent after the job
    // started, its timeout 5 s plus the 3 s grace), not when c2 took the job up.
    let job_start = status["job_instance"]["start_time"]
        .as_i64()
        .context("job start_time")?;
    let host_end = host_results(&status)[0]["end_time"]
        .as_i64()
        .context("host end_time")?;
    assert!(
        host_end >= job_start + 8_000,
        "the host ended {} ms after the job started, before the task's deadline: {status}",
        host_end - job_start
    );
    let mut query = cluster.info.scope();
    query["job_instance_id"] = json!(job);
    let callback = eventually(
        Duration::from_secs(30),
        "the callback delivered",
        || async {
            let status = c2.call("get_callback_status", query.clone()).await.ok()?;
            (status["status"] == "delivered").then_some(status)
        },
    )
    .await?;
    assert_eq!(
        callback["attempts"].as_array().context("attempts")?.len(),
        1,
        "{callback}"
    );
    // A second end would queue or post again within the retry delay.
    tokio::time::sleep(Duration::from_secs(3)).await;
    let posts = received.lock().unwrap().clone();
    server.abort();
    assert_eq!(posts.len(), 1, "{posts:?}");
    assert_eq!(posts[0]["job_instance_id"], json!(job));
    Ok(())
}
