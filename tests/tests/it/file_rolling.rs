//! File steps (`fast_transfer_file`, `push_config_file`) created to start later
//! (`start_task=false`) and rolled out in batches (`rolling_config`), on real agents.
//!
//! All agents of a test cluster share this machine's file system: each target writes under a
//! directory named after its address (`[FILESRCIP]` is the source's; a target's own directory
//! comes from running one step per target in the rolling tests), so who got what is seen on
//! disk.

use std::{os::unix::fs::PermissionsExt as _, path::Path, time::Duration};

use anyhow::{Context, Result};
use base64::Engine as _;
use fleetrun_tests::{TestCluster, host_results, start_cluster};
use serde_json::{Value, json};

/// A fresh directory (0777 so any account writes there), removed at the end.
fn scratch(name: &str) -> tempfile::TempDir {
    let dir = tempfile::Builder::new()
        .prefix(&format!("fleetrun-file-rolling-{name}-"))
        .tempdir_in("/tmp")
        .unwrap();
    std::fs::set_permissions(dir.path(), std::fs::Permissions::from_mode(0o777)).unwrap();
    dir
}

fn b64(bytes: &[u8]) -> String {
    base64::engine::general_purpose::STANDARD.encode(bytes)
}

fn sha256(bytes: &[u8]) -> Vec<u8> {
    ring::digest::digest(&ring::digest::SHA256, bytes)
        .as_ref()
        .to_vec()
}

/// `operate_job_instance` 2 (start) for `job`.
fn start(cluster: &TestCluster, job: i64) -> Value {
    let mut request = cluster.info.scope();
    request["job_instance_id"] = json!(job);
    request["operation_code"] = json!(2);
    request
}

/// The job's status data, host results included.
async fn status_of(cluster: &TestCluster, job: i64) -> Result<Value> {
    let mut query = cluster.info.scope();
    query["job_instance_id"] = json!(job);
    query["return_ip_result"] = json!(true);
    cluster
        .client()
        .call("get_job_instance_status", query)
        .await
}

/// Host results' statuses by host id, sorted by id.
fn statuses(status: &Value) -> Vec<(i64, i64)> {
    let mut all: Vec<(i64, i64)> = host_results(status)
        .iter()
        .map(|r| {
            (
                r["bk_host_id"].as_i64().unwrap_or_default(),
                r["status"].as_i64().unwrap_or_default(),
            )
        })
        .collect();
    all.sort_unstable();
    all
}

/// Submits `api` with `request`; (job, step).
async fn submit(cluster: &TestCluster, api: &str, request: Value) -> Result<(i64, i64)> {
    let accepted = cluster.client().call(api, request).await?;
    Ok((
        accepted["job_instance_id"].as_i64().context("job id")?,
        accepted["step_instance_id"].as_i64().context("step id")?,
    ))
}

/// The refusal of `api` with `request`: (code, message).
async fn refused(cluster: &TestCluster, api: &str, request: Value) -> Result<(i64, String)> {
    let reply = cluster.client().call_raw(api, request).await?;
    assert_eq!(reply["result"], false, "must be refused: {reply}");
    Ok((
        reply["code"].as_i64().unwrap_or_default(),
        reply["message"].as_str().unwrap_or_default().to_owned(),
    ))
}

fn push_request(cluster: &TestCluster, dir: &Path, files: Value, hosts: &[i64]) -> Value {
    let mut request = cluster.info.scope();
    request["account_alias"] = json!("root");
    request["file_target_path"] = json!(dir.to_str().unwrap());
    request["file_list"] = files;
    request["timeout"] = json!(60);
    request["target_server"] = json!({ "host_id_list": hosts });
    request
}

fn transfer_request(cluster: &TestCluster, dir: &str, sources: Value, hosts: &[i64]) -> Value {
    let mut request = cluster.info.scope();
    request["account_alias"] = json!("root");
    request["file_target_path"] = json!(dir);
    request["file_source_list"] = sources;
    request["timeout"] = json!(120);
    request["target_server"] = json!({ "host_id_list": hosts });
    request
}

/// Asks for an upload URL for `name` and PUTs `content` there: (path, url).
async fn upload(cluster: &TestCluster, name: &str, content: &[u8]) -> Result<(String, String)> {
    let mut body = cluster.info.scope();
    body["file_name_list"] = json!([name]);
    let data = cluster
        .client()
        .call("generate_local_file_upload_url", body)
        .await?;
    let entry = &data["url_map"][name];
    let url = entry["upload_url"].as_str().context("url")?.to_owned();
    let path = entry["path"].as_str().context("path")?.to_owned();
    put(cluster, &url, content).await?;
    Ok((path, url))
}

async fn put(cluster: &TestCluster, url: &str, content: &[u8]) -> Result<()> {
    let auth = json!({
        "bk_app_code": cluster.info.bk_app_code,
        "bk_app_secret": cluster.info.bk_app_secret,
        "bk_username": "admin",
    });
    let reply: Value = reqwest::Client::new()
        .put(url)
        .header("X-Bkapi-Authorization", auth.to_string())
        .body(content.to_vec())
        .send()
        .await?
        .json()
        .await?;
    anyhow::ensure!(reply["result"] == true, "upload refused: {reply}");
    Ok(())
}

#[tokio::test(flavor = "multi_thread")]
async fn a_created_transfer_waits_then_sends_the_files_as_they_were_when_it_was_accepted()
-> Result<()> {
    let cluster = start_cluster(2).await?;
    let client = cluster.client();
    let (a1, a2) = (cluster.host_id("agent-1"), cluster.host_id("agent-2"));
    let src = scratch("src");
    let out = scratch("out");
    let on_host = b"read from the source host when the job starts".to_vec();
    std::fs::write(src.path().join("host.txt"), &on_host)?;
    let original: Vec<u8> = (0..(1 << 20) + 3).map(|i| (i % 241) as u8).collect();
    let (path, url) = upload(&cluster, "pkg.bin", &original).await?;
    let sources = json!([
        {"file_type": 2, "file_list": [path]},
        {
            "file_type": 1,
            "file_list": [src.path().join("host.txt").to_str().unwrap()],
            "account": {"alias": "root"},
            "server": {"host_id_list": [a1]},
        },
    ]);
    let mut request = transfer_request(&cluster, out.path().to_str().unwrap(), sources, &[a2]);
    request["start_task"] = json!(false);
    request["download_speed_limit"] = json!(50);
    let (job, _) = submit(&cluster, "fast_transfer_file", request).await?;

    // Created, not started: pending (1), its host waiting (5), nothing written.
    let status = status_of(&cluster, job).await?;
    assert_eq!(status["job_instance"]["status"], 1, "{status}");
    assert_eq!(statuses(&status), vec![(a2, 5)], "{status}");
    assert!(!out.path().join("pkg.bin").exists());

    // The upload is replaced meanwhile: the job sends what it was accepted with.
    put(&cluster, &url, b"replaced after the job was accepted").await?;
    client
        .call("operate_job_instance", start(&cluster, job))
        .await?;
    let status = client
        .wait_job(&cluster.info.scope(), job, Duration::from_secs(120))
        .await?;
    assert_eq!(status["job_instance"]["status"], 3, "{status}");
    assert_eq!(statuses(&status), vec![(a2, 9)], "{status}");
    assert_eq!(
        sha256(&std::fs::read(out.path().join("pkg.bin"))?),
        sha256(&original)
    );
    assert_eq!(std::fs::read(out.path().join("host.txt"))?, on_host);

    // Started once only.
    let again = client
        .call_raw("operate_job_instance", start(&cluster, job))
        .await?;
    assert_eq!(again["result"], false, "{again}");
    assert_eq!(again["code"], 1_241_015, "{again}");
    Ok(())
}

#[tokio::test(flavor = "multi_thread")]
async fn a_created_config_push_writes_nothing_until_started() -> Result<()> {
    let cluster = start_cluster(2).await?;
    let client = cluster.client();
    let hosts = cluster.host_ids();
    let out = scratch("push");
    let files = json!([
        {"file_name": "app.conf", "content": b64(b"port = 8080\n"), "mode": "0640"},
        {"file_name": "empty.conf", "content": ""},
    ]);
    let mut request = push_request(&cluster, out.path(), files, &hosts);
    request["start_task"] = json!(false);
    let (job, _) = submit(&cluster, "push_config_file", request).await?;
    let status = status_of(&cluster, job).await?;
    assert_eq!(status["job_instance"]["status"], 1, "{status}");
    assert!(statuses(&status).iter().all(|(_, s)| *s == 5), "{status}");
    assert!(!out.path().join("app.conf").exists());

    client
        .call("operate_job_instance", start(&cluster, job))
        .await?;
    let status = client
        .wait_job(&cluster.info.scope(), job, Duration::from_secs(60))
        .await?;
    assert_eq!(status["job_instance"]["status"], 3, "{status}");
    assert!(statuses(&status).iter().all(|(_, s)| *s == 9), "{status}");
    assert_eq!(
        std::fs::read_to_string(out.path().join("app.conf"))?,
        "port = 8080\n"
    );
    let mode = std::fs::metadata(out.path().join("app.conf"))?
        .permissions()
        .mode();
    assert_eq!(mode & 0o777, 0o640);
    assert_eq!(std::fs::read(out.path().join("empty.conf"))?, b"");
    Ok(())
}

#[tokio::test(flavor = "multi_thread")]
async fn created_file_jobs_are_still_checked_at_submit_and_refused_once_their_files_expire()
-> Result<()> {
    let mut cluster = start_cluster(1).await?;
    cluster.kill_controller()?;
    let mut config = std::fs::read_to_string(&cluster.controller_config)?;
    config.push_str("\n[files]\nupload_ttl_secs = 4\n");
    std::fs::write(&cluster.controller_config, config)?;
    cluster.start_controller().await?;
    let ids: Vec<String> = cluster.agents.iter().map(|a| a.agent_id.clone()).collect();
    cluster.wait_online(&ids, Duration::from_secs(30)).await?;
    let hosts = cluster.host_ids();
    let out = scratch("expire");

    // A bad field is refused at submit, whether the job starts now or later.
    let files = json!([{"file_name": "a.conf", "content": b64(b"a")}]);
    let mut bad = push_request(&cluster, out.path(), files.clone(), &hosts);
    bad["start_task"] = json!(false);
    bad["transfer_mode"] = json!(3);
    let (code, message) = refused(&cluster, "push_config_file", bad).await?;
    assert_eq!(code, 1_240_003, "{message}");
    assert!(message.starts_with("transfer_mode"), "{message}");
    let (path, _) = upload(&cluster, "x.bin", b"uploaded").await?;
    let sources = json!([{"file_type": 2, "file_list": [path]}]);
    let mut bad = transfer_request(&cluster, "relative/dir", sources.clone(), &hosts);
    bad["start_task"] = json!(false);
    let (code, message) = refused(&cluster, "fast_transfer_file", bad).await?;
    assert_eq!(code, 1_240_003, "{message}");
    assert!(message.starts_with("file_target_path"), "{message}");

    // Jobs created to start later keep their files upload_ttl_secs from their creation.
    let mut later = transfer_request(&cluster, out.path().to_str().unwrap(), sources, &hosts);
    later["start_task"] = json!(false);
    let (transfer, _) = submit(&cluster, "fast_transfer_file", later).await?;
    let mut push = push_request(&cluster, out.path(), files, &hosts);
    push["start_task"] = json!(false);
    let (pushed, _) = submit(&cluster, "push_config_file", push).await?;
    tokio::time::sleep(Duration::from_secs(5)).await;
    let client = cluster.client();
    for (job, field) in [
        (transfer, "file_source_list[0].file_list[0]"),
        (pushed, "file_list[0].content"),
    ] {
        let reply = client
            .call_raw("operate_job_instance", start(&cluster, job))
            .await?;
        assert_eq!(reply["result"], false, "{reply}");
        assert_eq!(reply["code"], 1_240_003, "{reply}");
        let message = reply["message"].as_str().unwrap_or_default();
        assert!(message.starts_with(field), "{message}");
        assert!(message.contains("upload_ttl_secs"), "{message}");
        // Refused, the job is still pending, startable by nobody until submitted again.
        let status = status_of(&cluster, job).await?;
        assert_eq!(status["job_instance"]["status"], 1, "{status}");
    }
    assert!(!out.path().join("x.bin").exists());
    assert!(!out.path().join("a.conf").exists());
    Ok(())
}
