//! Scripts outlive their connection: a cut link, an agent restarted mid-task, an agent of the
//! previous protocol version, and claims to tasks an agent was never sent, each with real
//! binaries (and raw QUIC peers where a real agent would not misbehave).

use std::{path::Path, time::Duration};

use anyhow::{Context as _, Result};
use fleetrun_net::{FramedRecv, send_frame};
use fleetrun_proto::{
    ControlUp, Ending, HeldTask, Hello, HelloReply, OsType, TaskDown, TaskResult, TaskUp,
};
use fleetrun_tests::{TestCluster, eventually, host_results, pki, start_cluster};
use serde_json::json;

fn read(path: &Path) -> String {
    std::fs::read_to_string(path).unwrap_or_default()
}

/// A script printing `n` numbered lines, one every 100 ms.
fn numbered(n: u32) -> String {
    format!("for i in $(seq 1 {n}); do echo \"line $i\"; sleep 0.1; done")
}

fn expected_lines(n: u32) -> String {
    (1..=n).map(|i| format!("line {i}\n")).collect()
}

async fn submit(cluster: &TestCluster, script: &str, hosts: &[i64]) -> Result<(i64, i64)> {
    let accepted = cluster
        .client()
        .call(
            "fast_execute_script",
            cluster.script_request(script, hosts, json!({})),
        )
        .await?;
    Ok((
        accepted["job_instance_id"].as_i64().context("job id")?,
        accepted["step_instance_id"].as_i64().context("step id")?,
    ))
}

async fn wait_for_log(cluster: &TestCluster, job: i64, step: i64, text: &str) -> Result<()> {
    eventually(Duration::from_secs(10), text, || async {
        let logs = cluster.logs(job, step).await.ok()?;
        logs.first()?.1.contains(text).then_some(())
    })
    .await
}

#[tokio::test(flavor = "multi_thread")]
async fn a_script_outlives_a_cut_connection_and_every_line_is_stored_once() -> Result<()> {
    let cluster = start_cluster(1).await?;
    let hosts = cluster.host_ids();
    let client = cluster.client();
    let (job, step) = submit(&cluster, &numbered(50), &hosts).await?;
    wait_for_log(&cluster, job, step, "line 3\n").await?;
    // Revoking closes the agent's connection at once; the script goes on on the host.
    let revoked = client
        .call("revoke_agent", json!({"agent_id": "agent-1"}))
        .await?;
    assert_eq!(revoked["connections_closed"], 1, "{revoked}");
    let agent_log = cluster.agents[0].log.clone();
    eventually(Duration::from_secs(5), "the agent refused", || {
        let text = read(&agent_log);
        async move { text.contains("revoked by an operator").then_some(()) }
    })
    .await?;
    client
        .call("unrevoke_agent", json!({"agent_id": "agent-1"}))
        .await?;
    let status = client
        .wait_job(&cluster.info.scope(), job, Duration::from_secs(60))
        .await?;
    let results = host_results(&status);
    assert_eq!(results[0]["status"], 9, "{status}");
    let logs = cluster.logs(job, step).await?;
    assert_eq!(logs[0].1, expected_lines(50), "every line once, in order");
    let controller_log = read(&cluster.controller_log);
    assert!(
        controller_log.contains("task reattached"),
        "{controller_log}"
    );
    Ok(())
}

#[tokio::test(flavor = "multi_thread")]
async fn an_agent_killed_mid_task_reports_the_task_ended_with_the_reason() -> Result<()> {
    let mut cluster = start_cluster(1).await?;
    let hosts = cluster.host_ids();
    let (job, step) = submit(&cluster, &numbered(300), &hosts).await?;
    wait_for_log(&cluster, job, step, "line 3\n").await?;
    cluster.kill_agent(0)?;
    cluster.start_agent(0)?;
    let status = cluster
        .client()
        .wait_job(&cluster.info.scope(), job, Duration::from_secs(30))
        .await?;
    let result = &host_results(&status)[0];
    assert_eq!(result["status"], 399, "{status}");
    let logs = cluster.logs(job, step).await?;
    let log = &logs[0].1;
    assert!(log.starts_with("line 1\nline 2\nline 3\n"), "{log}");
    assert!(
        log.contains("the agent restarted while the task ran"),
        "{log}"
    );
    // The lines before the kill are there once each.
    for i in 1..=3 {
        assert_eq!(log.matches(&format!("line {i}\n")).count(), 1, "{log}");
    }
    Ok(())
}

/// A raw agent with its own certificate, connected from `ip`.
async fn raw_peer(
    cluster: &TestCluster,
    agent_id: &str,
    ip: &str,
) -> Result<(quinn::Endpoint, quinn::Connection)> {
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
    Ok((endpoint, connection))
}

fn hello(agent_id: &str, ip: &str, protocol_version: u32) -> Result<Hello> {
    Ok(Hello {
        protocol_version,
        agent_id: agent_id.into(),
        agent_version: "0.1.0".into(),
        hostname: agent_id.into(),
        os_type: OsType::Linux,
        bk_cloud_id: 0,
        ips: vec![ip.parse()?],
    })
}

#[tokio::test(flavor = "multi_thread")]
async fn an_agent_of_protocol_version_1_still_runs_jobs_and_is_told_to_upgrade() -> Result<()> {
    let cluster = start_cluster(1).await?;
    let (ip, agent_id) = ("127.0.0.97", "legacy");
    let (_endpoint, connection) = raw_peer(&cluster, agent_id, ip).await?;
    let (mut control, recv) = connection.open_bi().await?;
    send_frame(&mut control, &hello(agent_id, ip, 1)?).await?;
    let mut control_recv = FramedRecv::new(recv);
    let bk_host_id = match control_recv.recv::<HelloReply>().await? {
        Some(HelloReply::Welcome { bk_host_id, .. }) => bk_host_id,
        other => panic!("a version 1 agent gets the version 1 welcome, got {other:?}"),
    };
    let beat = tokio::spawn(async move {
        loop {
            let beat = ControlUp::Heartbeat { running_tasks: 0 };
            if send_frame(&mut control, &beat).await.is_err() {
                return;
            }
            tokio::time::sleep(Duration::from_millis(500)).await;
        }
    });
    let (job, step) = submit(&cluster, "echo hi", &[bk_host_id]).await?;
    let (mut send, recv) = connection.accept_bi().await?;
    let mut recv = FramedRecv::new(recv);
    let Some(TaskDown::Run(request)) = recv.recv::<TaskDown>().await? else {
        panic!("expected a task");
    };
    assert_eq!(request.job_instance_id, job);
    send_frame(&mut send, &TaskUp::Started { started_at_ms: 1 }).await?;
    let data = b"hi from v1\n".to_vec();
    send_frame(&mut send, &TaskUp::Output { offset: 0, data }).await?;
    let now = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)?
        .as_millis() as i64;
    let result = TaskResult {
        ending: Ending::Exited { code: 0 },
        started_at_ms: now,
        finished_at_ms: now,
        output_bytes: 11,
        survivors: 0,
        message: None,
    };
    send_frame(&mut send, &TaskUp::Finished(result)).await?;
    send.finish()?;
    let status = cluster
        .client()
        .wait_job(&cluster.info.scope(), job, Duration::from_secs(20))
        .await?;
    assert_eq!(host_results(&status)[0]["status"], 9, "{status}");
    let logs = cluster
        .client()
        .logs(&cluster.info.scope(), job, step, &[bk_host_id])
        .await?;
    assert_eq!(logs[0].1, "hi from v1\n");
    // Nothing of version 2 came down: no acknowledgement on the finished stream.
    let after = tokio::time::timeout(Duration::from_secs(1), recv.recv::<TaskDown>()).await;
    assert!(
        !matches!(after, Ok(Ok(Some(_)))),
        "a version 1 agent gets no version 2 message: {after:?}"
    );
    let log = read(&cluster.controller_log);
    assert!(
        log.contains("agent speaks protocol version 1") && log.contains("upgrade it"),
        "{log}"
    );
    beat.abort();
    Ok(())
}

#[tokio::test(flavor = "multi_thread")]
async fn claims_to_tasks_never_sent_to_the_agent_are_refused_and_discarded() -> Result<()> {
    let cluster = start_cluster(1).await?;
    let victim = cluster.host_ids()[0];
    // A real job runs on agent-1; the rogue claims its task by job, step and host.
    let (job, step) = submit(&cluster, &numbered(30), &[victim]).await?;
    wait_for_log(&cluster, job, step, "line 2\n").await?;
    let (ip, agent_id) = ("127.0.0.96", "rogue");
    let (_endpoint, connection) = raw_peer(&cluster, agent_id, ip).await?;
    let (mut control, recv) = connection.open_bi().await?;
    send_frame(&mut control, &hello(agent_id, ip, 2)?).await?;
    let mut control_recv = FramedRecv::new(recv);
    match control_recv.recv::<HelloReply>().await? {
        Some(HelloReply::Negotiated {
            protocol_version, ..
        }) => assert_eq!(protocol_version, 2),
        other => panic!("expected the version 2 welcome, got {other:?}"),
    }
    let claim = HeldTask {
        task_id: uuid::Uuid::new_v4(),
        job_instance_id: job,
        step_instance_id: step,
        bk_host_id: victim,
        execute_count: 0,
        acked_offset: 0,
        produced: 1 << 40,
        started_at_ms: Some(1),
        finished: true,
    };
    let claims = vec![
        claim.clone(),
        HeldTask {
            task_id: uuid::Uuid::new_v4(),
            ..claim.clone()
        },
    ];
    let claimed: Vec<uuid::Uuid> = claims.iter().map(|c| c.task_id).collect();
    send_frame(&mut control, &ControlUp::Holding { tasks: claims }).await?;
    // Each claim is answered with a discard on a stream of its own.
    let mut discarded = Vec::new();
    for _ in 0..2 {
        let (_send, recv) = tokio::time::timeout(Duration::from_secs(5), connection.accept_bi())
            .await
            .context("a discard")??;
        match FramedRecv::new(recv).recv::<TaskDown>().await? {
            Some(TaskDown::Discard { task_id }) => discarded.push(task_id),
            other => panic!("expected a discard, got {other:?}"),
        }
    }
    discarded.sort();
    let mut claimed = claimed;
    claimed.sort();
    assert_eq!(discarded, claimed);
    // The real task is untouched: every line once, status 9.
    let status = cluster
        .client()
        .wait_job(&cluster.info.scope(), job, Duration::from_secs(30))
        .await?;
    assert_eq!(host_results(&status)[0]["status"], 9, "{status}");
    let logs = cluster.logs(job, step).await?;
    assert_eq!(logs[0].1, expected_lines(30));
    let log = read(&cluster.controller_log);
    assert!(log.contains("refused the agent's claim to a task"), "{log}");

    // A report that names one task twice (which would resume it twice) is refused whole.
    let (ip, agent_id) = ("127.0.0.97", "rogue-2");
    let (_endpoint, connection) = raw_peer(&cluster, agent_id, ip).await?;
    let (mut control, recv) = connection.open_bi().await?;
    send_frame(&mut control, &hello(agent_id, ip, 2)?).await?;
    let mut control_recv = FramedRecv::new(recv);
    assert!(matches!(
        control_recv.recv::<HelloReply>().await?,
        Some(HelloReply::Negotiated { .. })
    ));
    send_frame(
        &mut control,
        &ControlUp::Holding {
            tasks: vec![claim.clone(), claim],
        },
    )
    .await?;
    let closed = tokio::time::timeout(Duration::from_secs(5), connection.closed())
        .await
        .context("the connection is closed")?;
    match closed {
        quinn::ConnectionError::ApplicationClosed(close) => {
            assert_eq!(&close.reason[..], b"a task reported twice")
        }
        other => panic!("expected the controller to close the connection, got {other}"),
    }
    Ok(())
}

#[tokio::test(flavor = "multi_thread")]
async fn a_job_outlives_a_killed_controller_and_every_line_is_stored_once() -> Result<()> {
    let mut cluster = start_cluster(2).await?;
    let hosts = cluster.host_ids();
    let (job, step) = submit(&cluster, &numbered(60), &hosts).await?;
    eventually(Duration::from_secs(10), "line 15 on every host", || async {
        let logs = cluster.logs(job, step).await.ok()?;
        (logs.len() == 2 && logs.iter().all(|(_, l)| l.contains("line 15\n"))).then_some(())
    })
    .await?;
    cluster.kill_controller()?;
    tokio::time::sleep(Duration::from_secs(2)).await;
    cluster.start_controller().await?;
    let status = cluster
        .client()
        .wait_job(&cluster.info.scope(), job, Duration::from_secs(60))
        .await?;
    assert_eq!(status["job_instance"]["status"], 3, "{status}");
    for result in host_results(&status) {
        assert_eq!(result["status"], 9, "{result}");
    }
    for (host, log) in cluster.logs(job, step).await? {
        assert_eq!(
            log,
            expected_lines(60),
            "host {host}: every line once, in order"
        );
    }
    let log = read(&cluster.controller_log);
    assert!(
        log.contains("taking up a job that ran when the controller stopped"),
        "{log}"
    );
    Ok(())
}

#[tokio::test(flavor = "multi_thread")]
async fn a_job_taken_up_after_a_restart_can_be_terminated() -> Result<()> {
    let mut cluster = start_cluster(1).await?;
    let hosts = cluster.host_ids();
    let (job, step) = submit(&cluster, &numbered(600), &hosts).await?;
    wait_for_log(&cluster, job, step, "line 12\n").await?;
    cluster.kill_controller()?;
    cluster.start_controller().await?;
    let agent_log = cluster.agents[0].log.clone();
    eventually(Duration::from_secs(20), "the task resumed", || {
        let text = read(&agent_log);
        async move {
            text.contains("resuming the task for the controller")
                .then_some(())
        }
    })
    .await?;
    let mut body = cluster.info.scope();
    body["job_instance_id"] = json!(job);
    body["operation_code"] = json!(1);
    let at = tokio::time::Instant::now();
    cluster.client().call("operate_job_instance", body).await?;
    let status = cluster
        .client()
        .wait_job(&cluster.info.scope(), job, Duration::from_secs(10))
        .await?;
    assert!(at.elapsed() < Duration::from_secs(3), "{:?}", at.elapsed());
    assert_eq!(host_results(&status)[0]["status"], 403, "{status}");
    let log = &cluster.logs(job, step).await?[0].1;
    assert!(!log.contains("line 100\n"), "the script was stopped: {log}");
    Ok(())
}
