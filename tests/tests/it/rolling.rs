//! Rolling execution on real agents: batches one after another, the pause on a failed batch,
//! confirmation before each batch, staggered batches, the failure limit, and a controller
//! restart while a job waits for a confirmation.

use std::time::Duration;

use anyhow::{Context, Result};
use fleetrun_tests::{TestCluster, eventually, host_results, start_cluster};
use serde_json::{Value, json};

/// Submits a rolling job; returns (job, step).
async fn submit(cluster: &TestCluster, script: &str, rolling: Value) -> Result<(i64, i64)> {
    let request = cluster.script_request(
        script,
        &cluster.host_ids(),
        json!({ "rolling_config": rolling }),
    );
    cluster.submit_to("fast_execute_script", request).await
}

async fn status(cluster: &TestCluster, job: i64) -> Result<Value> {
    cluster.job_status_at(job, None).await
}

/// Waits until the job shows `job_status`; returns the status reply.
async fn wait_for(cluster: &TestCluster, job: i64, job_status: i64) -> Result<Value> {
    cluster
        .wait_for_status(job, job_status, Duration::from_secs(60))
        .await
}

/// Host statuses, sorted, so batches can be counted: how many hosts are in each status.
fn host_statuses(status: &Value) -> Vec<i64> {
    let mut statuses: Vec<i64> = host_results(status)
        .iter()
        .map(|h| h["status"].as_i64().unwrap_or(-1))
        .collect();
    statuses.sort_unstable();
    statuses
}

async fn operate(cluster: &TestCluster, job: i64, step: i64, code: i64) -> Result<Value> {
    let mut body = cluster.info.scope();
    body["job_instance_id"] = json!(job);
    body["step_instance_id"] = json!(step);
    body["operation_code"] = json!(code);
    cluster
        .client()
        .call_raw("operate_step_instance", body)
        .await
}

/// A script that fails once, on whichever host runs it first (batches run one at a time).
fn fail_first(cluster: &TestCluster) -> String {
    let flag = cluster.dir().join("fail-once");
    std::fs::write(&flag, "").unwrap();
    format!(
        "if rm {} 2>/dev/null; then echo failing; exit 3; fi; echo fine",
        flag.display()
    )
}

#[tokio::test(flavor = "multi_thread")]
async fn mode_1_pauses_after_a_failing_batch_and_goes_on_when_the_error_is_ignored() -> Result<()> {
    let cluster = start_cluster(3).await?;
    let script = fail_first(&cluster);
    let (job, step) = submit(&cluster, &script, json!({"expression": "1", "mode": 1})).await?;
    // Batch 1 failed: the job shows failed, as bk-job reports it, and no other host ran.
    let paused = wait_for(&cluster, job, 4).await?;
    assert_eq!(paused["finished"], true, "{paused}");
    assert_eq!(paused["step_instance_list"][0]["status"], 4, "{paused}");
    assert_eq!(host_statuses(&paused), [5, 5, 104], "{paused}");
    tokio::time::sleep(Duration::from_millis(500)).await;
    assert_eq!(host_statuses(&status(&cluster, job).await?), [5, 5, 104]);

    // Confirming is for a job waiting for a confirmation, not a failed one.
    let refused = operate(&cluster, job, step, 13).await?;
    assert_eq!(refused["code"], 1_241_003, "{refused}");
    let missing = operate(&cluster, job, step + 1000, 3).await?;
    assert_eq!(missing["code"], 1_244_006, "{missing}");

    let ignored = operate(&cluster, job, step, 3).await?;
    assert_eq!(ignored["code"], 0, "{ignored}");
    assert_eq!(ignored["data"]["step_instance_id"], step, "{ignored}");
    // The failure is ignored: the remaining batches run and the job succeeds.
    let done = wait_for(&cluster, job, 3).await?;
    assert_eq!(host_statuses(&done), [9, 9, 104], "{done}");
    // Ignoring again is refused: nothing is paused.
    let again = operate(&cluster, job, step, 3).await?;
    assert_eq!(again["code"], 1_241_003, "{again}");
    Ok(())
}

#[tokio::test(flavor = "multi_thread")]
async fn mode_2_runs_every_batch_one_after_another() -> Result<()> {
    let cluster = start_cluster(3).await?;
    let script = fail_first(&cluster);
    let (job, _step) = submit(&cluster, &script, json!({"expression": "1 +1", "mode": 2})).await?;
    // bk-job: the failures are ignored and the job succeeds; the step follows its last batch,
    // which succeeded.
    let done = wait_for(&cluster, job, 3).await?;
    assert_eq!(done["step_instance_list"][0]["status"], 3, "{done}");
    assert_eq!(host_statuses(&done), [9, 9, 104], "{done}");
    // Batch 1 (one host) ended before batch 2 (two hosts) started.
    let mut hosts = host_results(&done);
    hosts.sort_by_key(|h| h["start_time"].as_i64());
    let first_end = hosts[0]["end_time"].as_i64().context("end")?;
    for later in &hosts[1..] {
        assert!(
            later["start_time"].as_i64().context("start")? >= first_end,
            "a batch started before the one before it ended: {done}"
        );
    }
    // A last batch that failed leaves the step "ignore error" (6); the job still succeeds.
    let (job, _step) = submit(&cluster, "exit 1", json!({"expression": "2 +1", "mode": 2})).await?;
    let done = wait_for(&cluster, job, 3).await?;
    assert_eq!(done["step_instance_list"][0]["status"], 6, "{done}");
    assert_eq!(host_statuses(&done), [104, 104, 104], "{done}");
    Ok(())
}

#[tokio::test(flavor = "multi_thread")]
async fn mode_3_waits_for_a_confirmation_before_each_batch() -> Result<()> {
    let cluster = start_cluster(3).await?;
    let (job, step) = submit(&cluster, "echo ok", json!({"expression": "1", "mode": 3})).await?;
    let first = wait_for(&cluster, job, 7).await?;
    assert_eq!(first["finished"], false, "{first}");
    assert_eq!(first["step_instance_list"][0]["status"], 7, "{first}");
    assert_eq!(host_statuses(&first), [5, 5, 9], "{first}");
    tokio::time::sleep(Duration::from_millis(500)).await;
    assert_eq!(host_statuses(&status(&cluster, job).await?), [5, 5, 9]);

    assert_eq!(operate(&cluster, job, step, 13).await?["code"], 0);
    let second = eventually(Duration::from_secs(60), "batch 2", || async {
        let s = status(&cluster, job).await.ok()?;
        (s["job_instance"]["status"] == 7 && host_statuses(&s) == [5, 9, 9]).then_some(s)
    })
    .await?;
    assert_eq!(second["step_instance_list"][0]["status"], 7);
    // 6, bk-job's confirm continue, does the same.
    assert_eq!(operate(&cluster, job, step, 6).await?["code"], 0);
    let done = wait_for(&cluster, job, 3).await?;
    assert_eq!(host_statuses(&done), [9, 9, 9], "{done}");
    Ok(())
}

#[tokio::test(flavor = "multi_thread")]
async fn a_job_waiting_for_a_confirmation_can_be_ended() -> Result<()> {
    let cluster = start_cluster(2).await?;
    let (job, step) = submit(&cluster, "echo ok", json!({"expression": "1", "mode": 3})).await?;
    wait_for(&cluster, job, 7).await?;
    assert_eq!(operate(&cluster, job, step, 9).await?["code"], 0);
    let ended = wait_for(&cluster, job, 13).await?;
    assert_eq!(ended["finished"], true, "{ended}");
    assert_eq!(host_statuses(&ended), [5, 9], "{ended}");
    // A job whose termination was confirmed is not retried (bk-job retries failed, abnormal
    // and terminated steps only).
    let retry = operate(&cluster, job, step, 2).await?;
    assert_eq!(retry["code"], 1_241_003, "{retry}");
    Ok(())
}

#[tokio::test(flavor = "multi_thread")]
async fn staggered_batches_start_with_the_requested_spacing() -> Result<()> {
    let cluster = start_cluster(3).await?;
    let (job, _step) = submit(
        &cluster,
        "sleep 2; echo ok",
        json!({
            "expression": "1", "execution_mode": 2,
            "batch_start_wait_fixed_ms": 700,
            "batch_start_wait_random_min_ms": 0,
            "batch_start_wait_random_max_ms": 200,
        }),
    )
    .await?;
    let done = wait_for(&cluster, job, 3).await?;
    let mut starts: Vec<i64> = host_results(&done)
        .iter()
        .map(|h| h["start_time"].as_i64().unwrap_or_default())
        .collect();
    starts.sort_unstable();
    let ends: Vec<i64> = host_results(&done)
        .iter()
        .map(|h| h["end_time"].as_i64().unwrap_or_default())
        .collect();
    for pair in starts.windows(2) {
        let gap = pair[1] - pair[0];
        // At least the fixed wait (less the timer's and the dispatch's jitter), well under
        // a batch's run time: the batches overlap.
        assert!((600..1800).contains(&gap), "batches {gap} ms apart: {done}");
    }
    assert!(
        starts[1] < *ends.iter().min().unwrap(),
        "batch 2 waited for batch 1: {done}"
    );
    Ok(())
}

#[tokio::test(flavor = "multi_thread")]
async fn the_failure_limit_stops_the_rolling() -> Result<()> {
    let cluster = start_cluster(3).await?;
    let (job, _step) = submit(
        &cluster,
        "exit 1",
        json!({"expression": "1", "mode": 2, "max_failures": 2}),
    )
    .await?;
    let done = wait_for(&cluster, job, 4).await?;
    assert_eq!(done["finished"], true, "{done}");
    assert_eq!(host_statuses(&done), [5, 104, 104], "{done}");
    Ok(())
}

#[tokio::test(flavor = "multi_thread")]
async fn a_bad_rolling_config_is_refused_with_bk_jobs_code() -> Result<()> {
    let cluster = start_cluster(1).await?;
    for (rolling, code) in [
        (json!({"expression": "0"}), 1_244_026),
        (json!({"expression": "1  2"}), 1_244_026),
        (json!({"expression": "1", "mode": 5}), 1_240_003),
        (json!({"expression": "   "}), 1_240_003),
        (
            json!({"expression": "1", "max_failure_percent": 0}),
            1_240_003,
        ),
        (
            json!({"expression": "1", "execution_mode": 2, "batch_start_wait_fixed_ms": 0,
                   "batch_start_wait_random_min_ms": 5, "batch_start_wait_random_max_ms": 4}),
            1_241_012,
        ),
    ] {
        let request = cluster.script_request(
            "echo ok",
            &cluster.host_ids(),
            json!({ "rolling_config": rolling }),
        );
        let refused = cluster
            .client()
            .call_raw("fast_execute_script", request)
            .await?;
        assert_eq!(refused["code"], code, "{rolling}: {refused}");
        assert!(
            refused["message"]
                .as_str()
                .unwrap_or_default()
                .starts_with("rolling_config"),
            "{refused}"
        );
    }
    Ok(())
}

#[tokio::test(flavor = "multi_thread")]
async fn a_restart_keeps_a_job_waiting_for_a_confirmation_and_it_goes_on() -> Result<()> {
    let mut cluster = start_cluster(2).await?;
    let (job, step) = submit(&cluster, "echo ok", json!({"expression": "1", "mode": 3})).await?;
    wait_for(&cluster, job, 7).await?;
    cluster.kill_controller()?;
    cluster.start_controller().await?;
    let ids: Vec<String> = cluster.agents.iter().map(|a| a.agent_id.clone()).collect();
    cluster.wait_online(&ids, Duration::from_secs(30)).await?;
    let kept = status(&cluster, job).await?;
    assert_eq!(kept["job_instance"]["status"], 7, "{kept}");
    assert_eq!(host_statuses(&kept), [5, 9], "{kept}");
    assert_eq!(operate(&cluster, job, step, 13).await?["code"], 0);
    let done = wait_for(&cluster, job, 3).await?;
    assert_eq!(host_statuses(&done), [9, 9], "{done}");
    Ok(())
}

async fn operate_job(cluster: &TestCluster, job: i64, code: i64) -> Result<Value> {
    let mut body = cluster.info.scope();
    body["job_instance_id"] = json!(job);
    body["operation_code"] = json!(code);
    cluster
        .client()
        .call_raw("operate_job_instance", body)
        .await
}

#[tokio::test(flavor = "multi_thread")]
async fn a_paused_job_is_terminated_as_bk_job_terminates_it() -> Result<()> {
    let cluster = start_cluster(3).await?;
    // Waiting for a confirmation (7): terminating ends it 11, the later hosts never run.
    let (job, _step) = submit(&cluster, "echo ok", json!({"expression": "1", "mode": 3})).await?;
    wait_for(&cluster, job, 7).await?;
    let stopped = operate_job(&cluster, job, 1).await?;
    assert_eq!(stopped["code"], 0, "{stopped}");
    let ended = wait_for(&cluster, job, 11).await?;
    assert_eq!(ended["finished"], true, "{ended}");
    assert_eq!(host_statuses(&ended), [5, 5, 9], "{ended}");
    let again = operate_job(&cluster, job, 1).await?;
    assert_eq!(again["code"], 1_241_003, "{again}");

    // Paused on a failed batch (4): the same.
    let script = fail_first(&cluster);
    let (job, _step) = submit(&cluster, &script, json!({"expression": "1", "mode": 1})).await?;
    wait_for(&cluster, job, 4).await?;
    let stopped = operate_job(&cluster, job, 1).await?;
    assert_eq!(stopped["code"], 0, "{stopped}");
    let ended = wait_for(&cluster, job, 11).await?;
    assert_eq!(host_statuses(&ended), [5, 5, 104], "{ended}");

    // A job the failure limit ended is over: neither terminated nor revived by ignoring.
    let (job, step) = submit(
        &cluster,
        "exit 1",
        json!({"expression": "1", "mode": 1, "max_failures": 1}),
    )
    .await?;
    wait_for(&cluster, job, 4).await?;
    let refused = operate_job(&cluster, job, 1).await?;
    assert_eq!(refused["code"], 1_241_003, "{refused}");
    let refused = operate(&cluster, job, step, 3).await?;
    assert_eq!(refused["code"], 1_241_003, "{refused}");
    assert_eq!(status(&cluster, job).await?["job_instance"]["status"], 4);
    Ok(())
}

#[tokio::test(flavor = "multi_thread")]
async fn a_confirmation_sent_the_moment_the_pause_shows_is_carried_out() -> Result<()> {
    let cluster = start_cluster(4).await?;
    let (job, step) = submit(&cluster, "true", json!({"expression": "1", "mode": 3})).await?;
    for batch in 1..4 {
        // Poll as fast as the API answers, and confirm at once.
        loop {
            if status(&cluster, job).await?["job_instance"]["status"] == 7 {
                break;
            }
        }
        let confirmed = operate(&cluster, job, step, 13).await?;
        assert_eq!(confirmed["code"], 0, "batch {batch}: {confirmed}");
    }
    let done = wait_for(&cluster, job, 3).await?;
    assert_eq!(host_statuses(&done), [9, 9, 9, 9], "{done}");
    Ok(())
}

#[tokio::test(flavor = "multi_thread")]
async fn a_restart_between_batches_keeps_the_later_batches_waiting() -> Result<()> {
    let mut cluster = start_cluster(3).await?;
    // Batch 1 ends at once; batch 2 would start a minute later: the controller stops between
    // them, with nothing out on any agent.
    let (job, step) = submit(
        &cluster,
        "echo ok",
        json!({"expression": "1", "execution_mode": 2, "batch_start_wait_fixed_ms": 60_000,
            "batch_start_wait_random_min_ms": 0, "batch_start_wait_random_max_ms": 0}),
    )
    .await?;
    eventually(Duration::from_secs(60), "batch 1 done", || async {
        let s = status(&cluster, job).await.ok()?;
        (host_statuses(&s) == [5, 5, 9]).then_some(())
    })
    .await?;
    cluster.kill_controller()?;
    cluster.start_controller().await?;
    let ids: Vec<String> = cluster.agents.iter().map(|a| a.agent_id.clone()).collect();
    cluster.wait_online(&ids, Duration::from_secs(30)).await?;
    // Not ended with its never-run hosts unknown (310): it waits for an operator.
    let kept = wait_for(&cluster, job, 7).await?;
    assert_eq!(host_statuses(&kept), [5, 5, 9], "{kept}");
    assert_eq!(operate(&cluster, job, step, 13).await?["code"], 0);
    // Staggered again from batch 2: the minute's wait precedes batch 3 only.
    eventually(Duration::from_secs(60), "batch 2", || async {
        let s = status(&cluster, job).await.ok()?;
        (host_statuses(&s) == [5, 9, 9]).then_some(())
    })
    .await?;
    Ok(())
}

#[tokio::test(flavor = "multi_thread")]
async fn step_status_and_preview_are_served_by_get_and_post_under_other_path_styles() -> Result<()>
{
    let cluster = start_cluster(2).await?;
    let (job, step) = submit(&cluster, "echo ok", json!({"expression": "1", "mode": 3})).await?;
    wait_for(&cluster, job, 7).await?;
    let info = &cluster.info;
    let scope = info.scope();
    let http = reqwest::Client::new();
    // GET, bk-job's API gateway style, batch 1 only.
    let reply: Value = http
        .get(format!(
            "{}/api/c/compapi/v2/jobv3/get_step_instance_status/?bk_app_code={}&bk_app_secret={}&bk_username=admin&bk_scope_type={}&bk_scope_id={}&job_instance_id={job}&step_instance_id={step}&batch=1",
            info.api_url,
            info.bk_app_code,
            info.bk_app_secret,
            scope["bk_scope_type"].as_str().context("scope type")?,
            scope["bk_scope_id"].as_str().context("scope id")?,
        ))
        .send()
        .await?
        .json()
        .await?;
    assert_eq!(reply["code"], 0, "{reply}");
    assert_eq!(reply["data"]["status"], 7, "{reply}");
    let groups = reply["data"]["step_result_group_list"]
        .as_array()
        .context("groups")?;
    let hosts: Vec<&Value> = groups
        .iter()
        .flat_map(|g| g["host_result_list"].as_array().into_iter().flatten())
        .collect();
    assert_eq!(hosts.len(), 1, "{reply}");
    assert_eq!(hosts[0]["batch"], 1, "{reply}");
    assert_eq!(hosts[0]["status"], 9, "{reply}");

    // POST, fleetrun's own style.
    let mut body = scope.clone();
    body["bk_app_code"] = json!(info.bk_app_code);
    body["bk_app_secret"] = json!(info.bk_app_secret);
    body["bk_username"] = json!("admin");
    body["target_server"] = json!({ "host_id_list": cluster.host_ids() });
    body["rolling_config"] = json!({"expression": "1"});
    let reply: Value = http
        .post(format!("{}/fleetrun/v1/preview_rolling", info.api_url))
        .json(&body)
        .send()
        .await?
        .json()
        .await?;
    assert_eq!(reply["code"], 0, "{reply}");
    assert_eq!(reply["data"]["total_batch"], 2, "{reply}");
    assert_eq!(reply["data"]["total_host_size"], 2, "{reply}");
    assert_eq!(reply["data"]["batch_list"][0]["host_size"], 1, "{reply}");
    Ok(())
}

#[tokio::test(flavor = "multi_thread")]
async fn ignoring_the_error_of_a_failed_last_batch_ends_the_job_as_bk_job_does() -> Result<()> {
    let cluster = start_cluster(2).await?;
    // The second host to run fails: batch 2 of 2, the last one.
    let runs = cluster.dir().join("runs");
    let script = format!(
        "echo run >> {runs}; if [ $(wc -l < {runs}) -ge 2 ]; then echo failing; exit 3; fi; echo fine",
        runs = runs.display()
    );
    let (job, step) = submit(&cluster, &script, json!({"expression": "1", "mode": 1})).await?;
    let failed = wait_for(&cluster, job, 4).await?;
    assert_eq!(host_statuses(&failed), [9, 104], "{failed}");
    let ignored = operate(&cluster, job, step, 3).await?;
    assert_eq!(ignored["code"], 0, "{ignored}");
    // Nothing is left to dispatch: the step shows "ignore error" and the job succeeded.
    let done = wait_for(&cluster, job, 3).await?;
    assert_eq!(done["step_instance_list"][0]["status"], 6, "{done}");
    assert_eq!(host_statuses(&done), [9, 104], "{done}");
    assert!(
        done["job_instance"]["end_time"].as_i64().is_some(),
        "{done}"
    );
    // Once is all: the job is no longer failed.
    let again = operate(&cluster, job, step, 3).await?;
    assert_eq!(again["code"], 1_241_003, "{again}");
    Ok(())
}

#[tokio::test(flavor = "multi_thread")]
async fn a_restart_in_the_middle_of_a_batch_finishes_it_then_waits_for_a_confirmation() -> Result<()>
{
    let mut cluster = start_cluster(2).await?;
    let hold = cluster.dir().join("hold");
    std::fs::write(&hold, "")?;
    let script = format!(
        "while [ -f {hold} ]; do sleep 0.1; done; echo released",
        hold = hold.display()
    );
    // Mode 2 would roll on by itself; batch 1 is out when the controller stops.
    let (job, step) = submit(&cluster, &script, json!({"expression": "1", "mode": 2})).await?;
    eventually(Duration::from_secs(60), "batch 1 running", || async {
        let s = status(&cluster, job).await.ok()?;
        (host_statuses(&s) == [5, 7]).then_some(())
    })
    .await?;
    cluster.kill_controller()?;
    cluster.start_controller().await?;
    let ids: Vec<String> = cluster.agents.iter().map(|a| a.agent_id.clone()).collect();
    cluster.wait_online(&ids, Duration::from_secs(30)).await?;
    std::fs::remove_file(&hold)?;
    // The agent kept running batch 1's task; the restarted controller takes it up, waits for
    // it, and then stops for an operator rather than send batch 2 on its own.
    let kept = wait_for(&cluster, job, 7).await?;
    assert_eq!(host_statuses(&kept), [5, 9], "{kept}");
    assert_eq!(operate(&cluster, job, step, 13).await?["code"], 0);
    let done = wait_for(&cluster, job, 3).await?;
    assert_eq!(host_statuses(&done), [9, 9], "{done}");
    Ok(())
}
