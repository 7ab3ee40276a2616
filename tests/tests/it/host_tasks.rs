//! What the controller makes of what agents report about their tasks: a rogue agent with a valid
//! certificate cannot make it store more than the output limit, overflow a number or break a
//! status read; and a task queued on a busy agent is not timed out for its wait.

use std::{
    net::{IpAddr, Ipv4Addr, SocketAddr},
    time::Duration,
};

use anyhow::{Context, Result, bail, ensure};
use fleetrun_net::{FramedRecv, TlsFiles, send_frame};
use fleetrun_proto::{
    ControlUp, Ending, Hello, HelloReply, MAX_OUTPUT_CHUNK, OsType, PROTOCOL_VERSION, TaskDown,
    TaskRequest, TaskResult, TaskUp,
};
use fleetrun_tests::{TestCluster, host_results, pki, start_cluster};
use serde_json::{Value, json};

/// An agent with a certificate from the deployment's CA that says whatever its test wants.
struct RogueAgent {
    connection: quinn::Connection,
    _endpoint: quinn::Endpoint,
    heartbeats: tokio::task::JoinHandle<()>,
}

impl RogueAgent {
    /// Registers as `agent_id`, then keeps the connection alive with heartbeats.
    async fn connect(cluster: &TestCluster, agent_id: &str, ip: Ipv4Addr) -> Result<Self> {
        let ca =
            pki::Ca::open_or_create(&cluster.dir().join("certs"), "fleetrun local cluster CA")?;
        let cert = ca.issue_agent(agent_id)?;
        let files = TlsFiles {
            ca: ca.cert_path(),
            cert: cert.cert,
            key: cert.key,
        };
        let endpoint = fleetrun_net::client_endpoint(
            &files,
            SocketAddr::new(IpAddr::V4(ip), 0),
            fleetrun_net::Timing::default(),
        )?;
        let controller: SocketAddr = cluster.info.agent_addr.parse()?;
        let connection = endpoint
            .connect(controller, "fleetrun-controller")?
            .await
            .context("connecting to the controller")?;
        let (mut send, recv) = connection.open_bi().await?;
        let mut recv = FramedRecv::new(recv);
        send_frame(
            &mut send,
            &Hello {
                protocol_version: PROTOCOL_VERSION,
                agent_id: agent_id.to_owned(),
                agent_version: "rogue".into(),
                hostname: agent_id.to_owned(),
                os_type: OsType::Linux,
                bk_cloud_id: 0,
                ips: vec![IpAddr::V4(ip)],
            },
        )
        .await?;
        let Some(
            HelloReply::Negotiated {
                heartbeat_interval_ms,
                ..
            }
            | HelloReply::Joined {
                heartbeat_interval_ms,
                ..
            },
        ) = recv.recv::<HelloReply>().await?
        else {
            bail!("the controller did not welcome the agent");
        };
        send_frame(&mut send, &ControlUp::Holding { tasks: Vec::new() }).await?;
        let heartbeats = tokio::spawn(async move {
            let _recv = recv;
            let mut tick = tokio::time::interval(Duration::from_millis(heartbeat_interval_ms));
            loop {
                tick.tick().await;
                let beat = ControlUp::Heartbeat { running_tasks: 1 };
                if send_frame(&mut send, &beat).await.is_err() {
                    return;
                }
            }
        });
        Ok(Self {
            connection,
            _endpoint: endpoint,
            heartbeats,
        })
    }

    /// The next task the controller sends.
    async fn next_task(&self) -> Result<(TaskRequest, quinn::SendStream)> {
        let (send, recv) = self.connection.accept_bi().await?;
        let mut recv = FramedRecv::new(recv);
        match recv.recv::<TaskDown>().await? {
            Some(TaskDown::Run(request)) => {
                // Whatever else the controller sends on the stream is not read.
                tokio::spawn(
                    async move { while let Ok(Some(_)) = recv.recv::<TaskDown>().await {} },
                );
                Ok((request, send))
            }
            other => bail!("expected a task, got {other:?}"),
        }
    }
}

impl Drop for RogueAgent {
    fn drop(&mut self) {
        self.heartbeats.abort();
    }
}

async fn host_id_of(cluster: &TestCluster, agent_id: &str) -> Result<i64> {
    let hosts = cluster
        .wait_online(&[agent_id.to_owned()], Duration::from_secs(20))
        .await?;
    hosts
        .iter()
        .find(|h| h["agent_id"] == json!(agent_id))
        .and_then(|h| h["bk_host_id"].as_i64())
        .context("the rogue agent's host id")
}

/// Submits a script to `host` with `timeout`; returns (job, step).
async fn submit(
    cluster: &TestCluster,
    script: &str,
    host: i64,
    timeout: u32,
) -> Result<(i64, i64)> {
    let request = cluster.script_request(script, &[host], json!({ "timeout": timeout }));
    let accepted = cluster
        .client()
        .call("fast_execute_script", request)
        .await?;
    Ok((
        accepted["job_instance_id"].as_i64().context("job")?,
        accepted["step_instance_id"].as_i64().context("step")?,
    ))
}

async fn log_of(cluster: &TestCluster, job: i64, step: i64, host: i64) -> Result<String> {
    let logs = cluster
        .client()
        .logs(&cluster.info.scope(), job, step, &[host])
        .await?;
    logs.into_iter()
        .find(|(id, _)| *id == host)
        .map(|(_, log)| log)
        .context("no log for the host")
}

#[tokio::test(flavor = "multi_thread")]
async fn a_rogue_agent_cannot_flood_the_log_or_overflow_what_it_reports() -> Result<()> {
    let cluster = start_cluster(0).await?;
    let agent = RogueAgent::connect(&cluster, "rogue-1", Ipv4Addr::new(127, 0, 0, 91)).await?;
    let host = host_id_of(&cluster, "rogue-1").await?;
    let (job, step) = submit(&cluster, "echo hello", host, 60).await?;
    let (request, mut send) = agent.next_task().await?;
    let limit = request.output_limit;

    send_frame(
        &mut send,
        &TaskUp::Started {
            started_at_ms: i64::MIN,
        },
    )
    .await?;
    // 40 MiB of output, eight times the limit, at honest offsets.
    let chunk = vec![b'x'; MAX_OUTPUT_CHUNK];
    let mut offset = 0u64;
    while offset < 40 << 20 {
        let data = chunk.clone();
        send_frame(&mut send, &TaskUp::Output { offset, data }).await?;
        offset += chunk.len() as u64;
    }
    for (offset, data) in [(u64::MAX - 1, b"abc"), (u64::MAX - 3, b"end")] {
        let data = data.to_vec();
        send_frame(&mut send, &TaskUp::Output { offset, data }).await?;
    }
    let truncated = TaskUp::Truncated {
        dropped_bytes: u64::MAX,
        dropped_lines: u64::MAX,
    };
    send_frame(&mut send, &truncated).await?;
    send_frame(&mut send, &truncated).await?;
    let lies = TaskResult {
        ending: Ending::Signaled { signal: i32::MAX },
        started_at_ms: i64::MIN,
        finished_at_ms: i64::MAX,
        output_bytes: 3,
        survivors: u32::MAX,
        message: Some("m".repeat(1 << 20)),
    };
    send_frame(&mut send, &TaskUp::Finished(lies)).await?;
    send.finish()?;

    let status = cluster
        .client()
        .wait_job(&cluster.info.scope(), job, Duration::from_secs(60))
        .await?;
    let results = host_results(&status);
    ensure!(results.len() == 1, "{status}");
    let result = &results[0];
    ensure!(result["status"] == json!(101), "{result}");
    let now = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)?
        .as_millis() as i64;
    for field in ["start_time", "end_time"] {
        let t = result[field]
            .as_i64()
            .with_context(|| format!("{field}: {result}"))?;
        ensure!(
            (now - 600_000..=now + 600_000).contains(&t),
            "{field} {t}: {result}"
        );
    }
    ensure!(result["total_time"].as_i64().unwrap_or(-1) >= 0, "{result}");
    // Every other read of the job works too.
    let mut query = cluster.info.scope();
    query["create_time_start"] = json!(now - 3_600_000);
    query["create_time_end"] = json!(now + 60_000);
    cluster
        .client()
        .call("get_job_instance_list", query)
        .await?;

    let log = log_of(&cluster, job, step, host).await?;
    ensure!(
        log.len() as u64 <= limit + 16 * 1024,
        "the log holds {} bytes, past the limit of {limit}",
        log.len()
    );
    ensure!(
        log.contains("beyond the output limit"),
        "the log says output was dropped"
    );
    Ok(())
}

#[tokio::test(flavor = "multi_thread")]
async fn a_task_queued_on_a_busy_agent_gets_its_whole_timeout_once_started() -> Result<()> {
    let mut cluster = start_cluster(1).await?;
    // One task at a time on the agent, and a grace period far shorter than the queue wait.
    cluster.kill_agent(0)?;
    cluster.kill_controller()?;
    let controller_config = cluster.controller_config.clone();
    let mut text = std::fs::read_to_string(&controller_config)?;
    text.push_str("\n[limits]\nagent_grace_secs = 1\n");
    std::fs::write(&controller_config, text)?;
    let agent_config = cluster.agents[0].config.clone();
    let text = std::fs::read_to_string(&agent_config)?;
    std::fs::write(&agent_config, format!("max_concurrent_tasks = 1\n{text}"))?;
    cluster.start_controller().await?;
    cluster.start_agent(0)?;
    cluster
        .wait_online(&["agent-1".to_owned()], Duration::from_secs(30))
        .await?;
    let host = cluster.host_id("agent-1");

    let (first, _) = submit(&cluster, "sleep 4; echo first", host, 10).await?;
    // The second job is sent only once the first holds the agent's one slot.
    let mut query = cluster.info.scope();
    query["job_instance_id"] = json!(first);
    query["return_ip_result"] = json!(true);
    let deadline = tokio::time::Instant::now() + Duration::from_secs(20);
    loop {
        let status = cluster
            .client()
            .call("get_job_instance_status", query.clone())
            .await?;
        if host_results(&status).first().map(|r| r["status"].clone()) == Some(json!(7)) {
            break;
        }
        ensure!(
            tokio::time::Instant::now() < deadline,
            "the first job never ran: {status}"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    let (second, second_step) = submit(&cluster, "echo second", host, 1).await?;

    let scope = cluster.info.scope();
    for job in [first, second] {
        let status: Value = cluster
            .client()
            .wait_job(&scope, job, Duration::from_secs(60))
            .await?;
        let results = host_results(&status);
        ensure!(
            results.len() == 1 && results[0]["status"] == json!(9),
            "job {job} did not succeed: {status}"
        );
    }
    let log = log_of(&cluster, second, second_step, host).await?;
    ensure!(log.contains("second"), "{log}");
    Ok(())
}

/// An agent that takes none of its task stream cannot hold a terminated job open: neither the
/// request's write nor the termination waits on the agent's flow control past the grace period.
#[tokio::test(flavor = "multi_thread")]
async fn a_terminated_task_ends_when_its_agent_reads_nothing() -> Result<()> {
    let mut cluster = start_cluster(0).await?;
    cluster.kill_controller()?;
    let controller_config = cluster.controller_config.clone();
    let mut text = std::fs::read_to_string(&controller_config)?;
    text.push_str("\n[limits]\nagent_grace_secs = 1\n");
    std::fs::write(&controller_config, text)?;
    cluster.start_controller().await?;
    // Registers and beats, but never accepts a task stream: no credit for more than a window.
    let _agent = RogueAgent::connect(&cluster, "rogue-3", Ipv4Addr::new(127, 0, 0, 93)).await?;
    let host = host_id_of(&cluster, "rogue-3").await?;
    // Several times a stream's flow-control window.
    let script = format!("#{}\necho never\n", "x".repeat(4 << 20));
    let (job, _) = submit(&cluster, &script, host, 60).await?;
    tokio::time::sleep(Duration::from_secs(1)).await;

    let mut operate = cluster.info.scope();
    operate["job_instance_id"] = json!(job);
    operate["operation_code"] = json!(1);
    cluster
        .client()
        .call("operate_job_instance", operate)
        .await?;
    let status = cluster
        .client()
        .wait_job(&cluster.info.scope(), job, Duration::from_secs(20))
        .await
        .context("the terminated job never finished")?;
    let results = host_results(&status);
    ensure!(
        results.len() == 1 && results[0]["status"] == json!(16),
        "the host did not end as an agent timeout: {status}"
    );
    Ok(())
}
