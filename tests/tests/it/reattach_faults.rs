//! Tasks that outlive their connection, at the edges: an agent that comes back without a task
//! it was sent, a controller stopped right after a dispatch, a job's callback across a
//! controller restart, a terminate while a resume stalls, a task that cannot be recorded, and a
//! claim to a task only the store knows; with real binaries, and a raw QUIC peer where a real
//! agent would not misbehave on purpose.

use std::{
    sync::{Arc, Mutex},
    time::Duration,
};

use anyhow::{Context as _, Result};
use fleetrun_net::{FramedRecv, send_frame};
use fleetrun_proto::{
    ControlUp, Ending, HeldTask, Hello, HelloReply, OsType, TaskDown, TaskResult, TaskUp,
};
use fleetrun_tests::{TestCluster, eventually, host_results, pki, sqlite_only, start_cluster};
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

/// Submits a job of ten minutes (its deadline far away) to a raw agent's host and takes the task
/// the controller sends on `connection`: (job, the task stream's send side, to be held open, the
/// task).
async fn long_task(
    cluster: &TestCluster,
    connection: &quinn::Connection,
    bk_host_id: i64,
) -> Result<(i64, quinn::SendStream, fleetrun_proto::TaskRequest)> {
    let (job, _) = submit(cluster, "sleep 600", &[bk_host_id], json!({"timeout": 600})).await?;
    let (send, recv) = tokio::time::timeout(Duration::from_secs(10), connection.accept_bi())
        .await
        .context("the task")??;
    let Some(TaskDown::Run(run)) = FramedRecv::new(recv).recv::<TaskDown>().await? else {
        anyhow::bail!("expected a task");
    };
    Ok((job, send, run))
}

/// A raw agent of protocol version 2 with its own certificate, connected from `ip`, welcomed,
/// having reported that it holds nothing, and sending heartbeats until the connection ends.
async fn raw_agent(
    cluster: &TestCluster,
    agent_id: &str,
    ip: &str,
) -> Result<(quinn::Endpoint, quinn::Connection, i64)> {
    raw_agent_holding(cluster, agent_id, ip, Vec::new(), None).await
}

/// [`raw_agent`] reporting that it holds `tasks`; with `task_streams`, allowing the controller
/// that many task streams at once (0: it can open none).
async fn raw_agent_holding(
    cluster: &TestCluster,
    agent_id: &str,
    ip: &str,
    tasks: Vec<HeldTask>,
    task_streams: Option<u32>,
) -> Result<(quinn::Endpoint, quinn::Connection, i64)> {
    let ca = pki::Ca::open_or_create(&cluster.dir().join("certs"), "unused")?;
    let cert = ca.issue_agent(agent_id)?;
    let files = fleetrun_net::TlsFiles {
        ca: ca.cert_path(),
        cert: cert.cert.clone(),
        key: cert.key.clone(),
    };
    let timing = fleetrun_net::Timing::default();
    let endpoint = fleetrun_net::client_endpoint(&files, format!("{ip}:0").parse()?, timing)?;
    let mut config = fleetrun_net::quinn_client_config(&files, timing)?;
    if let Some(streams) = task_streams {
        let mut transport = quinn::TransportConfig::default();
        transport
            .max_idle_timeout(Some(timing.idle_timeout.try_into()?))
            .keep_alive_interval(Some(timing.keep_alive))
            .max_concurrent_bidi_streams(streams.into())
            .max_concurrent_uni_streams(0u32.into());
        config.transport_config(Arc::new(transport));
    }
    let connection = endpoint
        .connect_with(
            config,
            cluster.info.agent_addr.parse()?,
            "fleetrun-controller",
        )?
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
    send_frame(&mut control, &ControlUp::Holding { tasks }).await?;
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
    let (job, _send, _) = long_task(&cluster, &connection, bk_host_id).await?;
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

/// The task a raw agent was sent: its request's identity, as the agent reports it held.
fn held_of(run: &fleetrun_proto::TaskRequest, bk_host_id: i64) -> HeldTask {
    HeldTask {
        task_id: run.task_id,
        job_instance_id: run.job_instance_id,
        step_instance_id: run.step_instance_id,
        bk_host_id,
        execute_count: 0,
        acked_offset: 0,
        produced: 0,
        started_at_ms: None,
        finished: false,
    }
}

/// Restarts the cluster's controller with `[limits] agent_grace_secs = 1`.
async fn with_short_grace(cluster: &mut TestCluster) -> Result<()> {
    cluster.kill_controller()?;
    let controller_config = cluster.controller_config.clone();
    let mut text = std::fs::read_to_string(&controller_config)?;
    text.push_str("\n[limits]\nagent_grace_secs = 1\n");
    std::fs::write(&controller_config, text)?;
    cluster.start_controller().await
}

async fn terminate(cluster: &TestCluster, job: i64) -> Result<()> {
    let mut operate = cluster.info.scope();
    operate["job_instance_id"] = json!(job);
    operate["operation_code"] = json!(1);
    cluster
        .client()
        .call("operate_job_instance", operate)
        .await?;
    Ok(())
}

#[tokio::test(flavor = "multi_thread")]
async fn a_terminate_while_the_agent_takes_no_resume_stream_ends_the_job_within_the_grace()
-> Result<()> {
    let mut cluster = start_cluster(0).await?;
    with_short_grace(&mut cluster).await?;
    let (ip, agent_id) = ("127.0.0.97", "stalling");
    let (endpoint, connection, bk_host_id) = raw_agent(&cluster, agent_id, ip).await?;
    let (job, _send, run) = long_task(&cluster, &connection, bk_host_id).await?;
    // The connection is lost; the agent comes back holding the task, but lets the controller
    // open no stream to resume it on.
    connection.close(0u32.into(), b"lost");
    endpoint.wait_idle().await;
    let held = held_of(&run, bk_host_id);
    let (_endpoint, _connection, again) =
        raw_agent_holding(&cluster, agent_id, ip, vec![held], Some(0)).await?;
    assert_eq!(again, bk_host_id);
    eventually(Duration::from_secs(10), "the claim reaches the run", || {
        let log = std::fs::read_to_string(&cluster.controller_log).unwrap_or_default();
        async move { log.contains("task detached").then_some(()) }
    })
    .await?;
    // The resume now waits for a stream the agent never grants (up to 30 s); the terminate is
    // heard all the same, and the agent has the grace period (1 s) to confirm.
    tokio::time::sleep(Duration::from_millis(500)).await;
    terminate(&cluster, job).await?;
    let status = cluster
        .client()
        .wait_job(&cluster.info.scope(), job, Duration::from_secs(15))
        .await
        .context("the job did not end within 15 s of the terminate")?;
    assert_eq!(status["job_instance"]["status"], 11, "{status}");
    let result = &host_results(&status)[0];
    assert_eq!(result["status"], 16, "{status}");
    assert!(
        result["tag"]
            .as_str()
            .is_some_and(|t| t.contains("did not confirm the termination")),
        "{result}"
    );
    Ok(())
}

/// The database and its log made immutable until dropped (as root: `chattr +i`).
struct Frozen(Vec<std::path::PathBuf>);

impl Frozen {
    fn freeze(cluster: &TestCluster) -> Result<Self> {
        let db = cluster.dir().join("controller.db");
        let frozen = Self(vec![db.clone(), db.with_extension("db-wal")]);
        for file in &frozen.0 {
            let status = std::process::Command::new("chattr")
                .arg("+i")
                .arg(file)
                .status()?;
            anyhow::ensure!(status.success(), "chattr +i {}", file.display());
        }
        Ok(frozen)
    }
}

impl Drop for Frozen {
    fn drop(&mut self) {
        for file in &self.0 {
            let _ = std::process::Command::new("chattr")
                .arg("-i")
                .arg(file)
                .status();
        }
    }
}

#[tokio::test(flavor = "multi_thread")]
async fn a_task_the_controller_cannot_record_is_not_sent() -> Result<()> {
    if !sqlite_only("a_task_the_controller_cannot_record_is_not_sent") {
        return Ok(());
    }
    let cluster = start_cluster(2).await?;
    let (first, second) = (cluster.host_id("agent-1"), cluster.host_id("agent-2"));
    // Two batches, the second dispatched 4 s after the first: by then the database refuses
    // writes, and the second host's task cannot be recorded before it would be sent.
    let (job, step) = submit(
        &cluster,
        "sleep 1; echo ran",
        &[first, second],
        json!({"rolling_config": {
            "expression": "1", "execution_mode": 2,
            "batch_start_wait_fixed_ms": 4000,
            "batch_start_wait_random_min_ms": 0,
            "batch_start_wait_random_max_ms": 0,
        }}),
    )
    .await?;
    let first_log = cluster.agents[0].log.clone();
    eventually(Duration::from_secs(10), "the first batch runs", || {
        let text = std::fs::read_to_string(&first_log).unwrap_or_default();
        async move { text.contains("task received").then_some(()) }
    })
    .await?;
    let frozen = Frozen::freeze(&cluster)?;
    let controller_log = cluster.controller_log.clone();
    eventually(Duration::from_secs(30), "the dispatch given up", || {
        let text = std::fs::read_to_string(&controller_log).unwrap_or_default();
        async move { text.contains("the task was not sent").then_some(()) }
    })
    .await?;
    drop(frozen);
    let status = cluster
        .client()
        .wait_job(&cluster.info.scope(), job, Duration::from_secs(60))
        .await?;
    let results = host_results(&status);
    let of = |host: i64| {
        results
            .iter()
            .find(|r| r["host_id"] == json!(host) || r["bk_host_id"] == json!(host))
            .cloned()
            .unwrap_or_default()
    };
    assert_eq!(of(first)["status"], 9, "{status}");
    let unsent = of(second);
    assert_eq!(unsent["status"], 399, "{status}");
    assert!(
        unsent["tag"]
            .as_str()
            .is_some_and(|t| t.contains("the task was not sent")
                && t.contains("the database refuses writes")),
        "{unsent}"
    );
    // The agent never had it.
    let second_log = std::fs::read_to_string(&cluster.agents[1].log)?;
    assert!(!second_log.contains("task received"), "{second_log}");
    let logs = cluster.logs(job, step).await?;
    assert!(
        logs.iter().any(|(h, l)| *h == first && l == "ran\n"),
        "{logs:?}"
    );
    Ok(())
}

/// Runs `statements` on the cluster's database, as an operator with write access would.
async fn edit_database(cluster: &TestCluster, statements: &[String]) -> Result<()> {
    use sqlx::Connection as _;
    match cluster.database() {
        Some(db) => {
            let mut connection = sqlx::PgConnection::connect(db.url()).await?;
            for statement in statements {
                sqlx::raw_sql(statement).execute(&mut connection).await?;
            }
        }
        None => {
            let options = sqlx::sqlite::SqliteConnectOptions::new()
                .filename(cluster.dir().join("controller.db"))
                .busy_timeout(Duration::from_secs(10));
            let mut connection = sqlx::SqliteConnection::connect_with(&options).await?;
            for statement in statements {
                sqlx::raw_sql(statement).execute(&mut connection).await?;
            }
        }
    }
    Ok(())
}

#[tokio::test(flavor = "multi_thread")]
async fn a_claim_to_a_task_only_the_store_knows_is_taken_up_and_others_discarded() -> Result<()> {
    let cluster = start_cluster(0).await?;
    let (ip, agent_id) = ("127.0.0.98", "adopted");
    let (endpoint, connection, bk_host_id) = raw_agent(&cluster, agent_id, ip).await?;
    // A job this controller never dispatched, running in its store with a task out on the
    // agent: as a controller restored from elsewhere, or one that took over, finds it.
    let (job, step) = submit(
        &cluster,
        "echo adopted",
        &[bk_host_id],
        json!({"start_task": false}),
    )
    .await?;
    let task_id = uuid::Uuid::new_v4();
    edit_database(
        &cluster,
        &[
            format!("UPDATE job_instance SET status = 2, start_time = 1 WHERE job_instance_id = {job}"),
            format!("UPDATE step_instance SET status = 2, start_time = 1 WHERE step_instance_id = {step}"),
            format!(
                "INSERT INTO host_task (step_instance_id, bk_host_id, task_id, agent_id, received,
                     stored, dropped_bytes, dropped_lines, truncated, started_at, deadline)
                 VALUES ({step}, {bk_host_id}, '{task_id}', '{agent_id}', 0, 0, 0, 0, 0, NULL, NULL)"
            ),
        ],
    )
    .await?;
    connection.close(0u32.into(), b"lost");
    endpoint.wait_idle().await;
    let held = HeldTask {
        task_id,
        job_instance_id: job,
        step_instance_id: step,
        bk_host_id,
        execute_count: 0,
        acked_offset: 0,
        produced: 0,
        started_at_ms: None,
        finished: false,
    };
    // Beside it, a claim the store does not want: another task id on the same (step, host).
    let stranger = HeldTask {
        task_id: uuid::Uuid::new_v4(),
        ..held.clone()
    };
    let (_endpoint, connection, _) =
        raw_agent_holding(&cluster, agent_id, ip, vec![stranger.clone(), held], None).await?;
    let (mut resumed, mut discarded) = (false, false);
    while !(resumed && discarded) {
        let (mut send, recv) =
            tokio::time::timeout(Duration::from_secs(20), connection.accept_bi())
                .await
                .context("the controller's answers to the claims")??;
        let mut recv = FramedRecv::new(recv);
        match recv.recv::<TaskDown>().await? {
            Some(TaskDown::Discard { task_id: id }) => {
                assert_eq!(id, stranger.task_id, "only the stranger is discarded");
                discarded = true;
            }
            Some(TaskDown::Resume {
                task_id: id,
                from_offset,
            }) => {
                assert_eq!((id, from_offset), (task_id, 0));
                let now = i64::try_from(
                    std::time::SystemTime::now()
                        .duration_since(std::time::UNIX_EPOCH)?
                        .as_millis(),
                )?;
                for up in [
                    TaskUp::Started { started_at_ms: now },
                    TaskUp::Output {
                        offset: 0,
                        data: b"adopted\n".to_vec(),
                    },
                    TaskUp::Finished(TaskResult {
                        ending: Ending::Exited { code: 0 },
                        started_at_ms: now,
                        finished_at_ms: now,
                        output_bytes: 8,
                        survivors: 0,
                        message: None,
                    }),
                ] {
                    send_frame(&mut send, &up).await?;
                }
                let stored = tokio::time::timeout(Duration::from_secs(10), recv.recv::<TaskDown>())
                    .await
                    .context("the acknowledgement")??;
                assert!(matches!(stored, Some(TaskDown::ResultStored)), "{stored:?}");
                resumed = true;
            }
            other => anyhow::bail!("unexpected {other:?}"),
        }
    }
    let status = cluster
        .client()
        .wait_job(&cluster.info.scope(), job, Duration::from_secs(30))
        .await?;
    assert_eq!(status["job_instance"]["status"], 3, "{status}");
    assert_eq!(host_results(&status)[0]["status"], 9, "{status}");
    let logs = cluster
        .client()
        .logs(&cluster.info.scope(), job, step, &[bk_host_id])
        .await?;
    assert_eq!(logs, vec![(bk_host_id, "adopted\n".to_owned())]);
    Ok(())
}

/// Claims to tasks the store holds but does not want taken up are discarded, and none of their
/// jobs is taken up: the right task claimed by another agent, a task of a host that finished, a
/// task of a paused rolling job (7, waiting for an operator's confirmation).
#[tokio::test(flavor = "multi_thread")]
async fn claims_the_store_does_not_want_take_nothing_up() -> Result<()> {
    let cluster = start_cluster(0).await?;
    let (ip, agent_id) = ("127.0.0.99", "claimant");
    let (endpoint, connection, bk_host_id) = raw_agent(&cluster, agent_id, ip).await?;
    let mut held = Vec::new();
    let mut statements = Vec::new();
    // (job status, host status, agent the store sent the task to)
    let cases = [(2, 7, "someone-else"), (2, 9, agent_id), (7, 7, agent_id)];
    let mut jobs = Vec::new();
    for (job_status, host_status, sent_to) in cases {
        let (job, step) = submit(
            &cluster,
            "echo unwanted",
            &[bk_host_id],
            json!({"start_task": false}),
        )
        .await?;
        jobs.push(job);
        let task_id = uuid::Uuid::new_v4();
        statements.extend([
            format!("UPDATE job_instance SET status = {job_status}, start_time = 1 WHERE job_instance_id = {job}"),
            format!("UPDATE step_instance SET status = {job_status}, start_time = 1 WHERE step_instance_id = {step}"),
            format!("UPDATE host_result SET status = {host_status} WHERE step_instance_id = {step}"),
            format!(
                "INSERT INTO host_task (step_instance_id, bk_host_id, task_id, agent_id, received,
                     stored, dropped_bytes, dropped_lines, truncated, started_at, deadline)
                 VALUES ({step}, {bk_host_id}, '{task_id}', '{sent_to}', 0, 0, 0, 0, 0, NULL, NULL)"
            ),
        ]);
        held.push(HeldTask {
            task_id,
            job_instance_id: job,
            step_instance_id: step,
            bk_host_id,
            execute_count: 0,
            acked_offset: 0,
            produced: 0,
            started_at_ms: None,
            finished: false,
        });
    }
    edit_database(&cluster, &statements).await?;
    connection.close(0u32.into(), b"lost");
    endpoint.wait_idle().await;
    let (_endpoint, connection, _) =
        raw_agent_holding(&cluster, agent_id, ip, held.clone(), None).await?;
    let mut discarded = std::collections::HashSet::new();
    while discarded.len() < held.len() {
        let (_send, recv) = tokio::time::timeout(Duration::from_secs(20), connection.accept_bi())
            .await
            .context("the controller's answers to the claims")??;
        match FramedRecv::new(recv).recv::<TaskDown>().await? {
            Some(TaskDown::Discard { task_id }) => {
                assert!(held.iter().any(|h| h.task_id == task_id), "{task_id}");
                discarded.insert(task_id);
            }
            other => anyhow::bail!("only discards are expected, got {other:?}"),
        }
    }
    for (job, (job_status, ..)) in jobs.into_iter().zip(cases) {
        let mut query = cluster.info.scope();
        query["job_instance_id"] = json!(job);
        let status = cluster
            .client()
            .call("get_job_instance_status", query)
            .await?;
        assert_eq!(status["job_instance"]["status"], job_status, "{status}");
    }
    Ok(())
}
