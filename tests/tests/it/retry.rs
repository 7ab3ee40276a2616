//! Retries on real agents (`operate_step_instance` 2 and 8): only the failed hosts run again,
//! under execute_count 1, with the first run's results and logs still readable by execute_count;
//! retry-all runs every host again; a running job refuses a retry; a rolling step retries the
//! batch it stopped at and rolls on; the job's end reaches its callback again.
//! `get_step_instance_detail` is here too: the step as submitted, and nothing of another scope.

use std::time::Duration;

use anyhow::{Context, Result};
use fleetrun_tests::{ApiClient, TestCluster, b64, eventually, host_results, start_cluster};
use serde_json::{Value, json};

use super::callbacks::Receiver;

/// Submits a job on every host; returns (job, step).
async fn submit(cluster: &TestCluster, script: &str, extra: Value) -> Result<(i64, i64)> {
    let request = cluster.script_request(script, &cluster.host_ids(), extra);
    cluster.submit_to("fast_execute_script", request).await
}

async fn status_at(cluster: &TestCluster, job: i64, execute_count: Option<i64>) -> Result<Value> {
    cluster.job_status_at(job, execute_count).await
}

async fn wait_for(cluster: &TestCluster, job: i64, job_status: i64) -> Result<Value> {
    cluster
        .wait_for_status(job, job_status, Duration::from_secs(60))
        .await
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

/// One host's log at `execute_count` (None: the latest), through `get_job_instance_ip_log`.
async fn log_at(
    cluster: &TestCluster,
    job: i64,
    step: i64,
    host: i64,
    execute_count: Option<i64>,
) -> Result<String> {
    let mut query = cluster.info.scope();
    query["job_instance_id"] = json!(job);
    query["step_instance_id"] = json!(step);
    query["bk_host_id"] = json!(host);
    if let Some(n) = execute_count {
        query["execute_count"] = json!(n);
    }
    let data = cluster
        .client()
        .call("get_job_instance_ip_log", query)
        .await?;
    Ok(data["log_content"].as_str().unwrap_or_default().to_owned())
}

/// (host id, status) of every host in a status reply, by host id.
fn statuses(status: &Value) -> Vec<(i64, i64)> {
    let mut hosts: Vec<(i64, i64)> = host_results(status)
        .iter()
        .map(|h| {
            (
                h["bk_host_id"].as_i64().unwrap_or(-1),
                h["status"].as_i64().unwrap_or(-1),
            )
        })
        .collect();
    hosts.sort_unstable();
    hosts
}

/// A script that fails once, on whichever host runs it first, and counts its runs in `runs`.
fn fail_first(cluster: &TestCluster) -> String {
    let flag = cluster.dir().join("fail-once");
    std::fs::write(&flag, "").unwrap();
    let runs = cluster.dir().join("runs");
    format!(
        "echo run >> {runs}; if rm {flag} 2>/dev/null; then echo failing; exit 3; fi; echo fine",
        runs = runs.display(),
        flag = flag.display()
    )
}

fn runs(cluster: &TestCluster) -> usize {
    std::fs::read_to_string(cluster.dir().join("runs"))
        .unwrap_or_default()
        .lines()
        .count()
}

#[tokio::test(flavor = "multi_thread")]
async fn retry_failed_runs_only_the_failed_host_again_and_keeps_the_first_runs_logs() -> Result<()>
{
    let cluster = start_cluster(3).await?;
    let receiver = Receiver::start(0, 0).await?;
    let script = fail_first(&cluster);
    let (job, step) = submit(&cluster, &script, json!({"callback_url": receiver.url})).await?;
    let failed = wait_for(&cluster, job, 4).await?;
    let first = statuses(&failed);
    let failed_host = first
        .iter()
        .find(|(_, s)| *s == 104)
        .map(|(h, _)| *h)
        .context("a failed host")?;
    let other_host = first
        .iter()
        .find(|(h, _)| *h != failed_host)
        .map(|(h, _)| *h)
        .context("another host")?;
    assert_eq!(runs(&cluster), 3);
    eventually(Duration::from_secs(20), "the first callback", || async {
        (receiver.received().len() == 1).then_some(())
    })
    .await?;

    let retried = operate(&cluster, job, step, 2).await?;
    assert_eq!(retried["code"], 0, "{retried}");
    assert_eq!(retried["data"]["step_instance_id"], step, "{retried}");
    let done = wait_for(&cluster, job, 3).await?;
    // Only the failed host ran again, under execute_count 1.
    assert_eq!(runs(&cluster), 4);
    assert_eq!(done["step_instance_list"][0]["execute_count"], 1, "{done}");
    assert!(statuses(&done).iter().all(|(_, s)| *s == 9), "{done}");
    // The end is reported again, with the retried run's status.
    eventually(Duration::from_secs(20), "the second callback", || async {
        (receiver.received().len() == 2).then_some(())
    })
    .await?;
    let second: Value = serde_json::from_slice(&receiver.received()[1].body)?;
    assert_eq!(second["job_instance_id"], job, "{second}");
    assert_eq!(second["status"], 3, "{second}");

    // execute_count 0 is still there: the host that failed, and its log.
    let before = status_at(&cluster, job, Some(0)).await?;
    assert_eq!(statuses(&before), first, "{before}");
    assert_eq!(before["step_instance_list"][0]["execute_count"], 0);
    let old = log_at(&cluster, job, step, failed_host, Some(0)).await?;
    assert!(old.contains("failing"), "{old}");
    let new = log_at(&cluster, job, step, failed_host, None).await?;
    assert!(new.contains("fine") && !new.contains("failing"), "{new}");
    // A host left out of the retry shows the log of the run it ran in at either count.
    for n in [Some(0), Some(1), None] {
        let log = log_at(&cluster, job, step, other_host, n).await?;
        assert!(log.contains("fine"), "{n:?}: {log}");
    }
    // The batch log API and the step status take execute_count too.
    let mut body = cluster.info.scope();
    body["job_instance_id"] = json!(job);
    body["step_instance_id"] = json!(step);
    body["host_id_list"] = json!([failed_host]);
    body["execute_count"] = json!(0);
    let batch = cluster
        .client()
        .call("batch_get_job_instance_ip_log", body.clone())
        .await?;
    let text = batch["script_task_logs"][0]["log_content"]
        .as_str()
        .unwrap_or_default();
    assert!(text.contains("failing"), "{batch}");
    let step_status = cluster
        .client()
        .call("get_step_instance_status", body.clone())
        .await?;
    assert_eq!(step_status["execute_count"], 0, "{step_status}");
    let latest = cluster
        .client()
        .call(
            "get_step_instance_status",
            json!({"bk_scope_type": body["bk_scope_type"], "bk_scope_id": body["bk_scope_id"],
                "job_instance_id": job, "step_instance_id": step}),
        )
        .await?;
    assert_eq!(latest["execute_count"], 1, "{latest}");
    // A count that is no count, or one the step never had, is refused by every API that
    // takes it, naming the field.
    for bad in [json!(-1), json!(i64::MAX), json!("1.5"), json!("x")] {
        for api in [
            "get_job_instance_status",
            "get_job_instance_ip_log",
            "batch_get_job_instance_ip_log",
            "get_step_instance_status",
        ] {
            let mut query = body.clone();
            query["bk_host_id"] = json!(failed_host);
            query["return_ip_result"] = json!(true);
            query["execute_count"] = bad.clone();
            let refused = cluster.client().call_raw(api, query).await?;
            assert_eq!(refused["code"], 1_240_003, "{api} {bad}: {refused}");
            assert!(
                refused["message"]
                    .as_str()
                    .unwrap_or_default()
                    .contains("execute_count"),
                "{api} {bad}: {refused}"
            );
        }
    }
    // A count the step never had is refused, naming the field.
    body["execute_count"] = json!(2);
    let refused = cluster
        .client()
        .call_raw("batch_get_job_instance_ip_log", body)
        .await?;
    assert_eq!(refused["code"], 1_240_003, "{refused}");
    assert!(
        refused["message"]
            .as_str()
            .unwrap_or_default()
            .contains("execute_count"),
        "{refused}"
    );
    // A job that succeeded has nothing to retry.
    let again = operate(&cluster, job, step, 2).await?;
    assert_eq!(again["code"], 1_241_003, "{again}");
    Ok(())
}

#[tokio::test(flavor = "multi_thread")]
async fn a_running_job_refuses_a_retry_and_a_terminated_one_retries_all() -> Result<()> {
    let cluster = start_cluster(2).await?;
    let hold = cluster.dir().join("hold");
    std::fs::write(&hold, "")?;
    let runs = cluster.dir().join("runs");
    let script = format!(
        "echo run >> {runs}; while [ -f {hold} ]; do sleep 0.1; done; echo released",
        runs = runs.display(),
        hold = hold.display()
    );
    let (job, step) = submit(&cluster, &script, json!({})).await?;
    eventually(Duration::from_secs(30), "both hosts running", || async {
        (std::fs::read_to_string(&runs).ok()?.lines().count() == 2).then_some(())
    })
    .await?;
    for code in [2, 8] {
        let refused = operate(&cluster, job, step, code).await?;
        assert_eq!(refused["code"], 1_241_003, "{refused}");
    }
    let mut body = cluster.info.scope();
    body["job_instance_id"] = json!(job);
    body["operation_code"] = json!(1);
    cluster.client().call("operate_job_instance", body).await?;
    wait_for(&cluster, job, 11).await?;
    std::fs::remove_file(&hold)?;
    let retried = operate(&cluster, job, step, 8).await?;
    assert_eq!(retried["code"], 0, "{retried}");
    let done = wait_for(&cluster, job, 3).await?;
    assert_eq!(done["step_instance_list"][0]["execute_count"], 1, "{done}");
    assert_eq!(std::fs::read_to_string(&runs)?.lines().count(), 4);
    // The terminated run is kept as execute_count 0.
    let before = status_at(&cluster, job, Some(0)).await?;
    assert!(statuses(&before).iter().all(|(_, s)| *s == 403), "{before}");
    Ok(())
}

#[tokio::test(flavor = "multi_thread")]
async fn a_rolling_step_retries_the_batch_it_stopped_at_and_rolls_on() -> Result<()> {
    let cluster = start_cluster(3).await?;
    let script = fail_first(&cluster);
    let (job, step) = submit(
        &cluster,
        &script,
        json!({"rolling_config": {"expression": "1", "mode": 1}}),
    )
    .await?;
    let paused = wait_for(&cluster, job, 4).await?;
    let mut seen: Vec<i64> = statuses(&paused).iter().map(|(_, s)| *s).collect();
    seen.sort_unstable();
    assert_eq!(seen, [5, 5, 104], "{paused}");
    let retried = operate(&cluster, job, step, 2).await?;
    assert_eq!(retried["code"], 0, "{retried}");
    // Batch 1's host runs again and succeeds; batches 2 and 3 follow.
    let done = wait_for(&cluster, job, 3).await?;
    assert!(statuses(&done).iter().all(|(_, s)| *s == 9), "{done}");
    assert_eq!(done["step_instance_list"][0]["execute_count"], 1, "{done}");
    assert_eq!(runs(&cluster), 4);
    let before = status_at(&cluster, job, Some(0)).await?;
    let mut seen: Vec<i64> = statuses(&before).iter().map(|(_, s)| *s).collect();
    seen.sort_unstable();
    assert_eq!(seen, [5, 5, 104], "{before}");
    Ok(())
}

#[tokio::test(flavor = "multi_thread")]
async fn step_detail_shows_the_step_as_submitted_with_a_sensitive_parameter_masked() -> Result<()> {
    let cluster = start_cluster(2).await?;
    let (job, step) = submit(
        &cluster,
        "echo detail",
        json!({"script_param": b64("hunter2"), "is_param_sensitive": 1,
            "rolling_config": {"expression": "1", "mode": 3}}),
    )
    .await?;
    wait_for(&cluster, job, 7).await?;
    let mut query = cluster.info.scope();
    query["step_instance_id"] = json!(step);
    let detail = cluster
        .client()
        .call("get_step_instance_detail", query.clone())
        .await?;
    assert_eq!(detail["id"], step, "{detail}");
    assert_eq!(detail["type"], 1, "{detail}");
    assert_eq!(detail["job_instance_id"], job, "{detail}");
    let info = &detail["script_step_info"];
    assert_eq!(info["content"], b64("echo detail"), "{detail}");
    assert_eq!(info["script_language"], 1, "{detail}");
    assert_eq!(info["script_param"], "******", "{detail}");
    assert_eq!(info["secure_param"], 1, "{detail}");
    assert_eq!(info["timeout"], 60, "{detail}");
    assert_eq!(info["account_name"], "root", "{detail}");
    assert!(!detail.to_string().contains("hunter2"), "{detail}");
    assert_eq!(detail["rolling_config"]["expression"], "1", "{detail}");
    assert_eq!(detail["rolling_config"]["mode"], 3, "{detail}");
    assert_eq!(detail["rolling_config"]["total_batch"], 2, "{detail}");
    let mut ids = cluster.host_ids();
    ids.sort_unstable();
    assert_eq!(
        detail["target_server"]["host_id_list"],
        json!(ids),
        "{detail}"
    );

    // GET under the ESB path style answers the same.
    let reply = cluster
        .client()
        .get_raw("get_step_instance_detail", query.clone())
        .await?;
    assert_eq!(reply["data"]["id"], step, "{reply}");

    // A step that does not exist, and this step asked for in another scope: not found alike.
    let mut missing = query.clone();
    missing["step_instance_id"] = json!(step + 1000);
    let missing = cluster
        .client()
        .call_raw("get_step_instance_detail", missing)
        .await?;
    assert_eq!(missing["code"], 1_244_006, "{missing}");
    let mut elsewhere = query.clone();
    elsewhere["bk_scope_id"] = json!("3");
    let elsewhere = cluster
        .client()
        .call_raw("get_step_instance_detail", elsewhere)
        .await?;
    assert_eq!(elsewhere["code"], 1_244_006, "{elsewhere}");
    assert_eq!(
        elsewhere["message"],
        format!("step_instance_id: no step {step}"),
        "{elsewhere}"
    );
    assert_eq!(
        missing["message"],
        format!("step_instance_id: no step {}", step + 1000),
        "{missing}"
    );
    Ok(())
}

#[tokio::test(flavor = "multi_thread")]
async fn an_app_of_another_business_cannot_read_a_step_detail() -> Result<()> {
    let mut cluster = start_cluster(1).await?;
    cluster.kill_controller()?;
    let mut config = std::fs::read_to_string(&cluster.controller_config)?;
    config.push_str(
        "\n[[apps]]\nbk_app_code = \"narrow\"\nbk_app_secret = \"narrow-secret\"\nscopes = [\"biz:3\"]\n",
    );
    std::fs::write(&cluster.controller_config, config)?;
    cluster.start_controller().await?;
    let ids: Vec<String> = cluster.agents.iter().map(|a| a.agent_id.clone()).collect();
    cluster.wait_online(&ids, Duration::from_secs(30)).await?;
    let (_, step, _) = cluster
        .run_job(cluster.script_request("echo mine", &cluster.host_ids(), json!({})))
        .await?;
    let narrow = ApiClient::new(&cluster.info.api_url, "narrow", "narrow-secret", "bob");
    // In its own business: the step is not there.
    let own = narrow
        .call_raw(
            "get_step_instance_detail",
            json!({"bk_scope_type": "biz", "bk_scope_id": "3", "step_instance_id": step}),
        )
        .await?;
    assert_eq!(own["code"], 1_244_006, "{own}");
    // Naming the step's business: refused, and nothing of the step shows.
    let theirs = narrow
        .call_raw(
            "get_step_instance_detail",
            json!({"bk_scope_type": "biz", "bk_scope_id": cluster.info.scope()["bk_scope_id"], "step_instance_id": step}),
        )
        .await?;
    assert_eq!(theirs["code"], 1_238_001, "{theirs}");
    assert!(!theirs.to_string().contains("echo mine"), "{theirs}");
    assert!(theirs["data"].is_null(), "{theirs}");
    Ok(())
}

/// A failed host moved to another business after the run is not given the script again: the
/// retry is refused as a fresh submit to it would be, and nothing runs.
#[tokio::test(flavor = "multi_thread")]
async fn a_retry_refuses_a_host_moved_out_of_the_business() -> Result<()> {
    let cluster = start_cluster(2).await?;
    let script = fail_first(&cluster);
    let (job, step) = submit(&cluster, &script, json!({})).await?;
    let failed = wait_for(&cluster, job, 4).await?;
    let failed_host = statuses(&failed)
        .iter()
        .find(|(_, s)| *s == 104)
        .map(|(h, _)| *h)
        .context("a failed host")?;
    assert_eq!(runs(&cluster), 2);
    cluster
        .client()
        .call(
            "change_inventory",
            json!({"changes": [{"op": "move_hosts", "bk_host_ids": [failed_host], "bk_biz_id": 3, "modules": [200]}]}),
        )
        .await?;
    let refused = operate(&cluster, job, step, 2).await?;
    assert_eq!(refused["code"], 1_244_002, "{refused}");
    assert!(
        refused["message"]
            .as_str()
            .unwrap_or_default()
            .contains("target_server"),
        "{refused}"
    );
    // Nothing changed: the job is still failed under execute_count 0, and nothing ran.
    let after = status_at(&cluster, job, None).await?;
    assert_eq!(after["job_instance"]["status"], 4, "{after}");
    assert_eq!(
        after["step_instance_list"][0]["execute_count"], 0,
        "{after}"
    );
    assert_eq!(runs(&cluster), 2);
    Ok(())
}

/// A dangerous-command rule enabled after the job ran refuses its retry, as it refuses a fresh
/// submit: nothing changes and nothing runs.
#[tokio::test(flavor = "multi_thread")]
async fn a_retry_is_refused_by_a_dangerous_rule_enabled_after_the_submit() -> Result<()> {
    let cluster = start_cluster(2).await?;
    let client = cluster.client();
    let script = format!("{}\necho retried-word\n", fail_first(&cluster));
    let (job, step) = submit(&cluster, &script, json!({})).await?;
    wait_for(&cluster, job, 4).await?;
    assert_eq!(runs(&cluster), 2);
    let rule = client
        .call(
            "create_dangerous_rule",
            json!({"expression": r"retried-\w+", "script_language_list": [1], "description": "no retried words", "action": 2}),
        )
        .await?;
    let rule = rule["id"].as_i64().context("rule id")?;
    client
        .call("enable_dangerous_rule", json!({"id": rule}))
        .await?;
    let refused = operate(&cluster, job, step, 2).await?;
    assert_eq!(refused["code"], 1_244_019, "{refused}");
    let after = status_at(&cluster, job, None).await?;
    assert_eq!(after["job_instance"]["status"], 4, "{after}");
    assert_eq!(
        after["step_instance_list"][0]["execute_count"], 0,
        "{after}"
    );
    assert_eq!(runs(&cluster), 2);
    Ok(())
}

/// Ignoring the error of a failed step that is not rolling ends it "ignore error" (6) and the
/// job successful (3), as bk-job does for a job whose last step's error is ignored; nothing runs.
#[tokio::test(flavor = "multi_thread")]
async fn ignoring_a_failed_steps_error_ends_the_job_successful() -> Result<()> {
    let cluster = start_cluster(2).await?;
    let script = fail_first(&cluster);
    let (job, step) = submit(&cluster, &script, json!({})).await?;
    wait_for(&cluster, job, 4).await?;
    let ignored = operate(&cluster, job, step, 3).await?;
    assert_eq!(ignored["code"], 0, "{ignored}");
    let done = status_at(&cluster, job, None).await?;
    assert_eq!(done["job_instance"]["status"], 3, "{done}");
    assert_eq!(done["step_instance_list"][0]["status"], 6, "{done}");
    assert_eq!(runs(&cluster), 2);
    // Once is all: the job is no longer failed.
    let again = operate(&cluster, job, step, 3).await?;
    assert_eq!(again["code"], 1_241_003, "{again}");
    Ok(())
}
