//! Tasks that outlive their connection, at the edges: an agent that comes back without a task
//! it was sent, a controller stopped right after a dispatch, and a job's callback across a
//! controller restart; with real binaries, and a raw QUIC peer where a real agent would not
//! lose a task on purpose.

use std::{
    sync::{Arc, Mutex},
    time::Duration,
};

use anyhow::{Context as _, Result};
use fleetrun_net::{FramedRecv, send_frame};
use fleetrun_proto::{ControlUp, Hello, HelloReply, OsType, TaskDown};
use fleetrun_tests::{TestCluster, eventually, host_results, pki, start_cluster};
use serde_json::{Value, json};

fn numbered(n: u32) -> String {
    format!("for i in $(seq 1 {n}); do echo \"line $i\"; sleep 0.1; done")
}

fn expected_lines(n: u32) -> String {
    (1..=n).map(|i| format!("line {i}\n")).collect()
}

async fn submit(
    cluster: &TestCluster,
    script: &str,
    hosts: &[i64],
    extra: Value,
) -> Result<(i64, i64)> {
    let accepted = cluster
        .client()
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

/// A raw agent of protocol version 2 with its own certificate, connected from `ip`, welcomed,
/// having reported that it holds nothing, and sending heartbeats until the connection ends.
async fn raw_agent(
    cluster: &TestCluster,
    agent_id: &str,
    ip: &str,
) -> Result<(quinn::Endpoint, quinn::Connection, i64)> {
    let ca = pki::Ca::open_or_create(&cluster.dir().join("certs"), "unused")?;
    let cert = ca.issue_agent(agent_id)?;
    let endpoint = fleetrun_net::client_endpoint(
        &fleetrun_net::TlsFiles {
            ca: ca.cert_path(),
            cert: cert.cert.clone(),
            key: cert.key.clone(),
        },
        format!("{ip}:0").parse()?,
        fleetrun_net::Timing::default(),
    )?;
    let connection = endpoint
        .connect(cluster.info.agent_addr.parse()?, "fleetrun-controller")?
        .await?;
    let (mut control, recv) = connection.open_bi().await?;
    let hello = Hello {
        protocol_version: 2,
        agent_id: agent_id.into(),
        agent_version: "0.1.0".into(),
        hostname: agent_id.into(),
        os_type: OsType::Linux,
        bk_cloud_id: 0,
        ips: vec![ip.parse()?],
    };
    send_frame(&mut control, &hello).await?;
    let mut control_recv = FramedRecv::new(recv);
    let bk_host_id = match control_recv.recv::<HelloReply>().await? {
        Some(HelloReply::Negotiated { bk_host_id, .. }) => bk_host_id,
        other => anyhow::bail!("expected the version 2 welcome, got {other:?}"),
    };
    send_frame(&mut control, &ControlUp::Holding { tasks: Vec::new() }).await?;
    tokio::spawn(async move {
        let _recv = control_recv;
        loop {
            let beat = ControlUp::Heartbeat { running_tasks: 0 };
            if send_frame(&mut control, &beat).await.is_err() {
                return;
            }
            tokio::time::sleep(Duration::from_millis(500)).await;
        }
    });
    Ok((endpoint, connection, bk_host_id))
}

#[tokio::test(flavor = "multi_thread")]
async fn a_task_the_agent_comes_back_without_ends_at_once_with_the_reason() -> Result<()> {
    let cluster = start_cluster(0).await?;
    let (ip, agent_id) = ("127.0.0.95", "forgetful");
    let (endpoint, connection, bk_host_id) = raw_agent(&cluster, agent_id, ip).await?;
    // Ten minutes to run: the deadline is far away.
    let (job, _) = submit(
        &cluster,
        "sleep 600",
        &[bk_host_id],
        json!({"timeout": 600}),
    )
    .await?;
    let (_send, recv) = tokio::time::timeout(Duration::from_secs(10), connection.accept_bi())
        .await
        .context("the task")??;
    let Some(TaskDown::Run(_)) = FramedRecv::new(recv).recv::<TaskDown>().await? else {
        anyhow::bail!("expected a task");
    };
    // The connection is lost as the task arrives, and the agent comes back without it.
    connection.close(0u32.into(), b"lost");
    endpoint.wait_idle().await;
    let (_endpoint, _connection, again) = raw_agent(&cluster, agent_id, ip).await?;
    assert_eq!(again, bk_host_id);
    let back = std::time::Instant::now();
    let status = cluster
        .client()
        .wait_job(&cluster.info.scope(), job, Duration::from_secs(30))
        .await?;
    let result = &host_results(&status)[0];
    assert_eq!(result["status"], 310, "{status}");
    assert!(
        result["tag"]
            .as_str()
            .is_some_and(|t| t.contains("came back without the task")),
        "{result}"
    );
    println!("ended {:?} after the agent came back", back.elapsed());
    Ok(())
}

#[tokio::test(flavor = "multi_thread")]
async fn a_controller_killed_right_after_a_dispatch_takes_the_task_up() -> Result<()> {
    let mut cluster = start_cluster(1).await?;
    let hosts = cluster.host_ids();
    let agent_log = cluster.agents[0].log.clone();
    let (job, step) = submit(&cluster, &numbered(40), &hosts, json!({})).await?;
    // Killed as soon as the agent has the task: well within the second between saves of where
    // tasks stand.
    eventually(Duration::from_secs(10), "the agent has the task", || {
        let text = std::fs::read_to_string(&agent_log).unwrap_or_default();
        async move { text.contains("task received").then_some(()) }
    })
    .await?;
    cluster.kill_controller()?;
    cluster.start_controller().await?;
    let status = cluster
        .client()
        .wait_job(&cluster.info.scope(), job, Duration::from_secs(60))
        .await?;
    assert_eq!(host_results(&status)[0]["status"], 9, "{status}");
    let logs = cluster.logs(job, step).await?;
    assert_eq!(logs[0].1, expected_lines(40), "every line once, in order");
    Ok(())
}

#[tokio::test(flavor = "multi_thread")]
async fn the_callback_fires_once_for_a_job_that_outlived_its_controller() -> Result<()> {
    let mut cluster = start_cluster(1).await?;
    let hosts = cluster.host_ids();
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
    let server = tokio::spawn(async move { axum::serve(listener, app).await });
    let (job, _) = submit(
        &cluster,
        &numbered(50),
        &hosts,
        json!({"callback_url": url}),
    )
    .await?;
    let agent_log = cluster.agents[0].log.clone();
    eventually(Duration::from_secs(10), "the script runs", || {
        let text = std::fs::read_to_string(&agent_log).unwrap_or_default();
        async move { text.contains("task received").then_some(()) }
    })
    .await?;
    tokio::time::sleep(Duration::from_secs(2)).await;
    cluster.kill_controller()?;
    cluster.start_controller().await?;
    let status = cluster
        .client()
        .wait_job(&cluster.info.scope(), job, Duration::from_secs(60))
        .await?;
    assert_eq!(status["job_instance"]["status"], 3, "{status}");
    let mut query = cluster.info.scope();
    query["job_instance_id"] = json!(job);
    let callback = eventually(
        Duration::from_secs(20),
        "the callback delivered",
        || async {
            let status = cluster
                .client()
                .call("get_callback_status", query.clone())
                .await
                .ok()?;
            (status["status"] == "delivered").then_some(status)
        },
    )
    .await?;
    let attempts = callback["attempts"].as_array().context("attempts")?;
    assert_eq!(attempts.len(), 1, "{callback}");
    // A second delivery would be a second job end: the restarted controller's own, or the
    // dead one's queued again. Either would come within the retry delay.
    tokio::time::sleep(Duration::from_secs(3)).await;
    let posts = received.lock().unwrap().clone();
    server.abort();
    assert_eq!(posts.len(), 1, "{posts:?}");
    assert_eq!(posts[0]["job_instance_id"], json!(job));
    assert_eq!(posts[0]["status"], json!(3));
    Ok(())
}
