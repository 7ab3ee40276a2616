//! Retention: a finished job backdated 31 days in the database is removed with its steps,
//! results and logs, a fresh one is kept, and jobs submitted meanwhile are accepted and run; the
//! audit log keeps its entries.

use std::time::Duration;

use anyhow::{Context, Result, ensure};
use fleetrun_tests::{TestCluster, eventually, start_cluster};
use serde_json::json;
use sqlx::{Connection as _, Row, sqlite::SqliteConnectOptions};

use crate::metrics::restart_with;

async fn db(cluster: &TestCluster) -> Result<sqlx::SqliteConnection> {
    let options = SqliteConnectOptions::new()
        .filename(cluster.dir().join("controller.db"))
        .busy_timeout(Duration::from_secs(10));
    Ok(sqlx::SqliteConnection::connect_with(&options).await?)
}

/// Rows the job still has: job, steps, host results and log chunks.
async fn rows_of(cluster: &TestCluster, job: i64) -> Result<i64> {
    let mut db = db(cluster).await?;
    let row = sqlx::query(
        "SELECT (SELECT COUNT(*) FROM job_instance WHERE job_instance_id = $1) + \
         (SELECT COUNT(*) FROM step_instance WHERE job_instance_id = $1) + \
         (SELECT COUNT(*) FROM host_result WHERE step_instance_id IN \
            (SELECT step_instance_id FROM step_instance WHERE job_instance_id = $1)) + \
         (SELECT COUNT(*) FROM host_log WHERE step_instance_id IN \
            (SELECT step_instance_id FROM step_instance WHERE job_instance_id = $1))",
    )
    .bind(job)
    .fetch_one(&mut db)
    .await?;
    db.close().await?;
    Ok(row.get(0))
}

fn now_ms() -> i64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .as_millis() as i64
}

#[tokio::test(flavor = "multi_thread")]
async fn an_old_finished_job_is_pruned_and_a_fresh_one_kept_while_jobs_are_written() -> Result<()> {
    // The old job is backdated in the controller's SQLite file directly.
    if !fleetrun_tests::sqlite_only(
        "an_old_finished_job_is_pruned_and_a_fresh_one_kept_while_jobs_are_written",
    ) {
        return Ok(());
    }
    let mut cluster = start_cluster(1).await?;
    restart_with(
        &mut cluster,
        "\n[retention]\nfinished_jobs_days = 30\ninterval_secs = 1\nbatch_jobs = 1\n",
    )
    .await?;
    let host = cluster.host_id("agent-1");
    let (old, _, _) = cluster
        .run_job(cluster.script_request("echo old", &[host], json!({})))
        .await?;
    let (fresh, fresh_step, _) = cluster
        .run_job(cluster.script_request("echo fresh", &[host], json!({})))
        .await?;
    ensure!(
        rows_of(&cluster, old).await? >= 4,
        "the old job has its rows"
    );

    // Jobs keep being submitted and run while pruning goes on.
    let writer = {
        let client = cluster.client();
        let request = cluster.script_request("echo meanwhile", &[host], json!({}));
        let scope = cluster.info.scope();
        tokio::spawn(async move {
            let mut ids = Vec::new();
            for _ in 0..15 {
                let accepted = client.call("fast_execute_script", request.clone()).await?;
                let job = accepted["job_instance_id"].as_i64().context("job id")?;
                let status = client
                    .wait_job(&scope, job, Duration::from_secs(60))
                    .await?;
                ensure!(
                    status["job_instance"]["status"] == 3,
                    "a job written during pruning did not succeed: {status}"
                );
                ids.push(job);
            }
            anyhow::Ok(ids)
        })
    };

    let month_ago = now_ms() - 31 * 86_400_000;
    let mut conn = db(&cluster).await?;
    sqlx::query(
        "UPDATE job_instance SET create_time = $1, start_time = $1, end_time = $1 \
         WHERE job_instance_id = $2",
    )
    .bind(month_ago)
    .bind(old)
    .execute(&mut conn)
    .await?;
    conn.close().await?;

    eventually(Duration::from_secs(30), "the old job pruned", || async {
        (rows_of(&cluster, old).await.ok()? == 0).then_some(())
    })
    .await?;
    let gone = cluster
        .client()
        .call_raw(
            "get_job_instance_status",
            json!({"bk_scope_type": "biz", "bk_scope_id": "2", "job_instance_id": old}),
        )
        .await?;
    assert_eq!(gone["code"], 1_244_006, "{gone}");

    let written = writer.await??;
    assert_eq!(written.len(), 15);
    for job in written.iter().chain([&fresh]) {
        ensure!(rows_of(&cluster, *job).await? >= 4, "job {job} was pruned");
    }
    let logs = cluster.logs(fresh, fresh_step).await?;
    assert_eq!(logs[0].1, "fresh\n");

    // The audit log is not pruned with the jobs.
    let audit = cluster
        .client()
        .call(
            "get_audit_log",
            json!({"api": "fast_execute_script", "limit": 2}),
        )
        .await?;
    assert_eq!(audit["entries"][0]["seq"], 1, "{audit}");
    Ok(())
}
