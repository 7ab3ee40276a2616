//! The controller's database: readable by the controller alone, and a database that stops
//! taking writes is said so, refuses new jobs instead of losing them, keeps what it accepted, and
//! does not keep the controller from stopping. With real agents, real HTTP and the real binary;
//! as root, the database is made unwritable with `chattr +i` (which stops root too).

use std::{
    os::unix::fs::PermissionsExt,
    path::{Path, PathBuf},
    process::Command,
    time::{Duration, Instant},
};

use anyhow::{Context, Result, ensure};
use fleetrun_tests::{TestCluster, eventually, reply_message, sqlite_only, start_cluster};
use serde_json::{Value, json};

fn files(cluster: &TestCluster) -> [PathBuf; 3] {
    let db = cluster.dir().join("controller.db");
    let with = |suffix: &str| {
        let mut name = db.as_os_str().to_owned();
        name.push(suffix);
        PathBuf::from(name)
    };
    [with(""), with("-wal"), with("-shm")]
}

fn mode(path: &Path) -> u32 {
    std::fs::metadata(path).unwrap().permissions().mode() & 0o777
}

#[tokio::test(flavor = "multi_thread")]
async fn the_database_files_are_readable_by_the_controller_only() -> Result<()> {
    if !sqlite_only("the_database_files_are_readable_by_the_controller_only") {
        return Ok(());
    }
    let cluster = start_cluster(1).await?;
    let host = cluster.host_id("agent-1");
    cluster
        .run_job(cluster.script_request("echo secret output", &[host], json!({})))
        .await?;
    for file in files(&cluster) {
        assert_eq!(mode(&file), 0o600, "{}", file.display());
    }
    Ok(())
}

/// The database and its log made immutable until dropped.
struct Frozen(Vec<PathBuf>);

impl Frozen {
    fn freeze(cluster: &TestCluster) -> Result<Self> {
        let [db, wal, _] = files(cluster);
        let frozen = Self(vec![db, wal]);
        for file in &frozen.0 {
            let status = Command::new("chattr").arg("+i").arg(file).status()?;
            ensure!(status.success(), "chattr +i {}", file.display());
        }
        Ok(frozen)
    }
}

impl Drop for Frozen {
    fn drop(&mut self) {
        for file in &self.0 {
            let _ = Command::new("chattr").arg("-i").arg(file).status();
        }
    }
}

async fn submit(cluster: &TestCluster, script: &str) -> Result<Value> {
    let host = cluster.host_id("agent-1");
    cluster
        .client()
        .call_raw(
            "fast_execute_script",
            cluster.script_request(script, &[host], json!({})),
        )
        .await
}

/// Submits a job printing a line every 100 ms and waits until the host runs it.
async fn start_talkative_job(cluster: &TestCluster, lines: u32) -> Result<i64> {
    let accepted = submit(
        cluster,
        &format!("for i in $(seq 1 {lines}); do echo line $i; sleep 0.1; done"),
    )
    .await?;
    let job = accepted["data"]["job_instance_id"]
        .as_i64()
        .with_context(|| format!("not accepted: {accepted}"))?;
    let client = cluster.client();
    let mut query = cluster.info.scope();
    query["job_instance_id"] = json!(job);
    query["return_ip_result"] = json!(true);
    eventually(Duration::from_secs(30), "the host runs the job", || {
        let (client, query) = (client.clone(), query.clone());
        async move {
            let status = client.call("get_job_instance_status", query).await.ok()?;
            (status["step_instance_list"][0]["step_ip_result_list"][0]["status"] == 7).then_some(())
        }
    })
    .await?;
    Ok(job)
}

fn assert_refused_for_the_database(reply: &Value) {
    assert_eq!(reply["code"], 1_252_001, "{reply}");
    assert!(
        reply_message(reply).starts_with("the controller cannot write to its database: "),
        "{reply}"
    );
}

#[tokio::test(flavor = "multi_thread")]
async fn an_unwritable_database_refuses_new_jobs_keeps_accepted_output_and_does_not_hold_a_stop()
-> Result<()> {
    if !sqlite_only(
        "an_unwritable_database_refuses_new_jobs_keeps_accepted_output_and_does_not_hold_a_stop",
    ) {
        return Ok(());
    }
    let mut cluster = start_cluster(1).await?;
    let host = cluster.host_id("agent-1");

    // A job is running when the database stops taking writes.
    let job = start_talkative_job(&cluster, 30).await?;
    let frozen = Frozen::freeze(&cluster)?;
    assert_refused_for_the_database(&submit(&cluster, "echo late").await?);
    // Once the database takes writes again, so does the controller, and nothing of the running
    // job's output was lost meanwhile.
    tokio::time::sleep(Duration::from_secs(1)).await;
    drop(frozen);
    let accepted = eventually(Duration::from_secs(30), "a job accepted again", || async {
        let reply = submit(&cluster, "echo back").await.ok()?;
        (reply["code"] == 0).then_some(reply)
    })
    .await?;
    let scope = cluster.info.scope();
    let back = accepted["data"]["job_instance_id"].as_i64().unwrap();
    let client = cluster.client();
    for job in [back, job] {
        let status = client
            .wait_job(&scope, job, Duration::from_secs(60))
            .await?;
        assert_eq!(status["job_instance"]["status"], 3, "{status}");
    }
    let step = client.wait_job(&scope, job, Duration::from_secs(1)).await?["step_instance_list"][0]
        ["step_instance_id"]
        .as_i64()
        .unwrap();
    let log = &cluster.logs(job, step).await?[0];
    let expected: String = (1..=30).map(|i| format!("line {i}\n")).collect();
    assert_eq!((log.0, log.1.as_str()), (host, expected.as_str()));

    // Unwritable again with a job running: a stop is not held up by what cannot be written, and
    // says what was left.
    start_talkative_job(&cluster, 600).await?;
    let _frozen = Frozen::freeze(&cluster)?;
    assert_refused_for_the_database(&submit(&cluster, "echo late").await?);
    tokio::time::sleep(Duration::from_millis(500)).await;
    let asked = Instant::now();
    let exited = cluster.stop_controller(Duration::from_secs(20))?;
    let took = asked.elapsed();
    assert!(
        exited.is_some(),
        "the controller did not stop within 20 s of SIGTERM"
    );
    assert!(took < Duration::from_secs(15), "the stop took {took:?}");
    let log = std::fs::read_to_string(&cluster.controller_log)?;
    assert!(
        log.contains("the database refuses writes"),
        "the failure was not logged"
    );
    assert_eq!(
        log.matches("the database refuses writes").count(),
        2,
        "the failure is logged once per outage, not per retry"
    );
    assert!(
        log.contains("stopping with results the database did not take"),
        "the stop did not say what was left unwritten"
    );
    Ok(())
}

#[tokio::test(flavor = "multi_thread")]
async fn an_agent_revoked_while_the_database_refuses_writes_is_cut_off_all_the_same() -> Result<()>
{
    if !sqlite_only("an_agent_revoked_while_the_database_refuses_writes_is_cut_off_all_the_same") {
        return Ok(());
    }
    let cluster = start_cluster(1).await?;
    let client = cluster.client();
    let host = cluster.host_id("agent-1");
    let frozen = Frozen::freeze(&cluster)?;
    let reply = client
        .call_raw(
            "revoke_agent",
            json!({"agent_id": "agent-1", "reason": "machine stolen"}),
        )
        .await?;
    // The revocation could not be stored, and says so; the agent is cut off all the same.
    assert_eq!(reply["code"], 1_252_001, "{reply}");
    let message = reply["message"].as_str().unwrap_or_default();
    assert!(message.contains("agent-1 is cut off"), "{reply}");
    eventually(Duration::from_secs(10), "agent-1 offline", || {
        let client = client.clone();
        async move {
            let hosts = client.hosts().await.ok()?;
            let agent = hosts.iter().find(|h| h["bk_host_id"] == host)?;
            (agent["online"] == false).then_some(())
        }
    })
    .await?;
    // Its reconnections are refused, not let back in.
    let log = cluster.controller_log.clone();
    eventually(Duration::from_secs(20), "a refused reconnection", || {
        let text = std::fs::read_to_string(&log).unwrap_or_default();
        async move { text.contains("refusing a revoked agent").then_some(()) }
    })
    .await?;
    drop(frozen);
    Ok(())
}
