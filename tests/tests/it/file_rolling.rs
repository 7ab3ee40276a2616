//! File steps (`fast_transfer_file`, `push_config_file`) created to start later
//! (`start_task=false`) and rolled out in batches (`rolling_config`), on real agents.
//!
//! All agents of a test cluster share this machine's file system, so every target writes the
//! same path: who got what, and when, is read from the step's host records (batch, status, start
//! and end) and each host's file logs; the file on disk is checked against its hash.

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
    cluster.job_status_at(job, None).await
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

/// `(host, status)` pairs sorted by host, as [`statuses`] gives them.
fn by_host(mut pairs: Vec<(i64, i64)>) -> Vec<(i64, i64)> {
    pairs.sort_unstable();
    pairs
}

/// Submits `api` with `request`; (job, step).
async fn submit(cluster: &TestCluster, api: &str, request: Value) -> Result<(i64, i64)> {
    cluster.submit_to(api, request).await
}

/// The refusal of `api` with `request`: (code, message).
async fn refused(cluster: &TestCluster, api: &str, request: Value) -> Result<(i64, String)> {
    cluster.refused(api, request).await
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
    let reply = put_reply(cluster, url, content).await?;
    anyhow::ensure!(reply["result"] == true, "upload refused: {reply}");
    Ok(())
}

/// The reply to a PUT of `content` to `url`, refused or not.
async fn put_reply(cluster: &TestCluster, url: &str, content: &[u8]) -> Result<Value> {
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
    Ok(reply)
}

/// The records (uploads and kept files) in the controller's content store.
fn records(cluster: &TestCluster) -> Result<usize> {
    Ok(
        std::fs::read_dir(cluster.dir().join("content").join("uploads"))?
            .filter(|e| {
                e.as_ref()
                    .is_ok_and(|e| e.path().extension().is_some_and(|x| x == "json"))
            })
            .count(),
    )
}

/// Removes the chunk of a file of one chunk from the controller's content store.
fn remove_chunk(cluster: &TestCluster, content: &[u8]) -> Result<()> {
    let name = hex::encode(sha256(content));
    let object = cluster
        .dir()
        .join("content")
        .join("objects")
        .join(&name[..2])
        .join(&name);
    std::fs::remove_file(&object).with_context(|| format!("{}", object.display()))
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
        {"file_type": 2, "file_list": [path.clone()]},
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
    let (job, step) = submit(&cluster, "fast_transfer_file", request).await?;

    // Created, not started: pending (1), its host waiting (5), nothing written.
    let status = status_of(&cluster, job).await?;
    assert_eq!(status["job_instance"]["status"], 1, "{status}");
    assert_eq!(statuses(&status), vec![(a2, 5)], "{status}");
    assert!(!out.path().join("pkg.bin").exists());

    // The upload is replaced meanwhile: the job sends what it was accepted with.
    put(&cluster, &url, b"replaced after the job was accepted").await?;
    // What the job keeps is no upload: the step names it, and nothing writes it or sends it.
    let mut query = cluster.info.scope();
    query["step_instance_id"] = json!(step);
    let detail = client.call("get_step_instance_detail", query).await?;
    let described: Value = serde_json::from_slice(
        &base64::engine::general_purpose::STANDARD.decode(
            detail["script_step_info"]["content"]
                .as_str()
                .context("content")?,
        )?,
    )?;
    let held = described["file_source_list"][0]["held"]
        .as_str()
        .context("the kept file's record")?
        .to_owned();
    let kept_url = url.replace(url.rsplit('/').next().context("upload id")?, &held);
    let forged = put_reply(&cluster, &kept_url, b"forged").await?;
    assert_eq!(forged["result"], false, "{forged}");
    assert_eq!(forged["code"], 1_240_003, "{forged}");
    let message = forged["message"].as_str().unwrap_or_default();
    assert!(message.starts_with("upload_url"), "{message}");
    assert!(message.contains("no such upload"), "{message}");
    let as_local = json!([{"file_type": 2, "file_list": [path.replace(
        path.split('/').nth(1).context("upload id")?,
        &held,
    )]}]);
    let (code, message) = refused(
        &cluster,
        "fast_transfer_file",
        transfer_request(&cluster, out.path().to_str().unwrap(), as_local, &[a2]),
    )
    .await?;
    assert_eq!(code, 1_240_003, "{message}");
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
    assert_eq!(statuses(&status).len(), hosts.len(), "{status}");
    assert!(statuses(&status).iter().all(|(_, s)| *s == 5), "{status}");
    assert!(!out.path().join("app.conf").exists());

    client
        .call("operate_job_instance", start(&cluster, job))
        .await?;
    let status = client
        .wait_job(&cluster.info.scope(), job, Duration::from_secs(60))
        .await?;
    assert_eq!(status["job_instance"]["status"], 3, "{status}");
    assert_eq!(statuses(&status).len(), hosts.len(), "{status}");
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
    for (job, field) in [
        (transfer, "file_source_list[0].file_list[0]"),
        (pushed, "file_list[0].content"),
    ] {
        let (code, message) =
            refused(&cluster, "operate_job_instance", start(&cluster, job)).await?;
        assert_eq!(code, 1_240_003, "{message}");
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

#[tokio::test(flavor = "multi_thread")]
async fn a_refused_file_submit_keeps_nothing_and_a_start_missing_a_kept_chunk_is_refused()
-> Result<()> {
    let cluster = start_cluster(1).await?;
    let hosts = cluster.host_ids();
    let out = scratch("refused");
    let dir = out.path().to_str().unwrap();
    let uploaded = b"uploaded, then named by refused submits".to_vec();
    let (path, _) = upload(&cluster, "x.bin", &uploaded).await?;
    let local = json!({"file_type": 2, "file_list": [path]});
    assert_eq!(records(&cluster)?, 1);

    // Refused after the local file was checked: a bad target host, a later source refused.
    // Neither keeps anything.
    let mut bad_host = transfer_request(&cluster, dir, json!([local.clone()]), &[987_654_321]);
    bad_host["start_task"] = json!(false);
    let mut third_party = transfer_request(
        &cluster,
        dir,
        json!([local.clone(), {"file_type": 3, "file_list": ["a"], "file_source_id": 1}]),
        &hosts,
    );
    third_party["start_task"] = json!(false);
    for (request, wanted) in [
        (bad_host, "target_server"),
        (third_party, "file_source_list[1].file_type"),
    ] {
        let (code, message) = refused(&cluster, "fast_transfer_file", request).await?;
        assert_ne!(code, 0, "{message}");
        assert!(message.starts_with(wanted), "{message}");
        assert_eq!(records(&cluster)?, 1, "kept after {message}");
    }
    let files = json!([{"file_name": "a.conf", "content": b64(b"a = 1\n")}]);
    let mut push = push_request(&cluster, out.path(), files.clone(), &[987_654_321]);
    push["start_task"] = json!(false);
    let (_, message) = refused(&cluster, "push_config_file", push).await?;
    assert!(message.starts_with("target_server"), "{message}");
    assert_eq!(records(&cluster)?, 1, "kept after {message}");

    // Accepted, each job keeps its file once; a start whose kept chunk is gone is refused,
    // naming the field and the chunk, and the job stays pending.
    let mut later = transfer_request(&cluster, dir, json!([local]), &hosts);
    later["start_task"] = json!(false);
    let (transfer, _) = submit(&cluster, "fast_transfer_file", later).await?;
    assert_eq!(records(&cluster)?, 2);
    let mut push = push_request(&cluster, out.path(), files, &hosts);
    push["start_task"] = json!(false);
    let (pushed, _) = submit(&cluster, "push_config_file", push).await?;
    assert_eq!(records(&cluster)?, 3);
    remove_chunk(&cluster, &uploaded)?;
    remove_chunk(&cluster, b"a = 1\n")?;
    for (job, field) in [
        (transfer, "file_source_list[0].file_list[0]"),
        (pushed, "file_list[0].content"),
    ] {
        let (code, message) =
            refused(&cluster, "operate_job_instance", start(&cluster, job)).await?;
        assert_eq!(code, 1_240_003, "{message}");
        assert!(message.starts_with(field), "{message}");
        assert!(
            message.contains("no longer in the controller's content store"),
            "{message}"
        );
        let status = status_of(&cluster, job).await?;
        assert_eq!(status["job_instance"]["status"], 1, "{status}");
    }
    assert!(!out.path().join("x.bin").exists());
    assert!(!out.path().join("a.conf").exists());
    Ok(())
}

#[tokio::test(flavor = "multi_thread")]
async fn an_uploaded_file_whose_chunk_is_gone_fails_that_file_and_the_rest_is_sent() -> Result<()> {
    let cluster = start_cluster(1).await?;
    let client = cluster.client();
    let host = cluster.host_ids()[0];
    let src = scratch("gone-src");
    let out = scratch("gone-out");
    let on_host = b"read from the source host".to_vec();
    std::fs::write(src.path().join("host.txt"), &on_host)?;
    let uploaded = b"an upload whose chunk is removed from the store".to_vec();
    let (path, _) = upload(&cluster, "gone.bin", &uploaded).await?;
    remove_chunk(&cluster, &uploaded)?;
    let sources = json!([
        {"file_type": 2, "file_list": [path]},
        {
            "file_type": 1,
            "file_list": [src.path().join("host.txt").to_str().unwrap()],
            "account": {"alias": "root"},
            "server": {"host_id_list": [host]},
        },
    ]);
    let request = transfer_request(&cluster, out.path().to_str().unwrap(), sources, &[host]);
    let (job, step) = submit(&cluster, "fast_transfer_file", request).await?;
    let status = client
        .wait_job(&cluster.info.scope(), job, Duration::from_secs(120))
        .await?;
    // The run found the chunk gone when it pinned it: that file fails, named, the other lands.
    assert_eq!(statuses(&status), vec![(host, 203)], "{status}");
    assert_eq!(std::fs::read(out.path().join("host.txt"))?, on_host);
    assert!(!out.path().join("gone.bin").exists());
    let logs = downloads(&cluster, job, step, host).await?;
    assert!(
        logs.iter().any(|log| log["log_content"]
            .as_str()
            .is_some_and(|l| l.contains("no longer in the controller's content store"))),
        "{logs:?}"
    );
    Ok(())
}

/// Waits until the job shows `job_status`; returns the status reply.
async fn wait_for(cluster: &TestCluster, job: i64, job_status: i64) -> Result<Value> {
    cluster
        .wait_for_status(job, job_status, Duration::from_secs(120))
        .await
}

async fn operate_step(cluster: &TestCluster, job: i64, step: i64, code: i64) -> Result<Value> {
    let mut body = cluster.info.scope();
    body["job_instance_id"] = json!(job);
    body["step_instance_id"] = json!(step);
    body["operation_code"] = json!(code);
    cluster
        .client()
        .call_raw("operate_step_instance", body)
        .await
}

/// Each host's (batch, status, start_time, end_time) from get_step_instance_status, by host id.
async fn batches(
    cluster: &TestCluster,
    job: i64,
    step: i64,
) -> Result<std::collections::BTreeMap<i64, (i64, i64, i64, i64)>> {
    let mut body = cluster.info.scope();
    body["job_instance_id"] = json!(job);
    body["step_instance_id"] = json!(step);
    let data = cluster
        .client()
        .call("get_step_instance_status", body)
        .await?;
    let mut hosts = std::collections::BTreeMap::new();
    for group in data["step_result_group_list"]
        .as_array()
        .context("groups")?
    {
        for host in group["host_result_list"].as_array().context("hosts")? {
            hosts.insert(
                host["bk_host_id"].as_i64().context("host id")?,
                (
                    host["batch"].as_i64().unwrap_or_default(),
                    host["status"].as_i64().unwrap_or_default(),
                    host["start_time"].as_i64().unwrap_or_default(),
                    host["end_time"].as_i64().unwrap_or_default(),
                ),
            );
        }
    }
    Ok(hosts)
}

/// The download logs (mode 1) one host's file logs hold: (status, size).
async fn downloads(cluster: &TestCluster, job: i64, step: i64, host: i64) -> Result<Vec<Value>> {
    Ok(cluster
        .file_logs(job, step, host)
        .await?
        .as_array()
        .cloned()
        .unwrap_or_default()
        .into_iter()
        .filter(|log| log["mode"] == 1)
        .collect())
}

#[tokio::test(flavor = "multi_thread")]
async fn a_transfer_rolls_out_two_hosts_a_batch_one_batch_after_the_other() -> Result<()> {
    let cluster = start_cluster(4).await?;
    let hosts = cluster.host_ids();
    let src = scratch("roll-src");
    let out = scratch("roll-out");
    let content: Vec<u8> = (0..3 * (1 << 20) + 11)
        .map(|i| (i * 7 % 251) as u8)
        .collect();
    std::fs::write(src.path().join("pkg.bin"), &content)?;
    let sources = json!([{
        "file_type": 1,
        "file_list": [src.path().join("pkg.bin").to_str().unwrap()],
        "account": {"alias": "root"},
        "server": {"host_id_list": [hosts[0]]},
    }]);
    let mut request = transfer_request(&cluster, out.path().to_str().unwrap(), sources, &hosts);
    request["rolling_config"] = json!({"expression": "2", "mode": 1});
    let (job, step) = submit(&cluster, "fast_transfer_file", request).await?;
    let done = wait_for(&cluster, job, 3).await?;
    assert_eq!(done["step_instance_list"][0]["status"], 3, "{done}");

    let hosts_of = batches(&cluster, job, step).await?;
    assert_eq!(hosts_of.len(), 4, "{hosts_of:?}");
    let batch_of = |batch: i64| -> Vec<&(i64, i64, i64, i64)> {
        hosts_of.values().filter(|h| h.0 == batch).collect()
    };
    assert_eq!(batch_of(1).len(), 2, "{hosts_of:?}");
    assert_eq!(batch_of(2).len(), 2, "{hosts_of:?}");
    assert!(hosts_of.values().all(|h| h.1 == 9), "{hosts_of:?}");
    // Batch 2 went out once every host of batch 1 had ended.
    let first_ended = batch_of(1).iter().map(|h| h.3).max().unwrap_or_default();
    let second_started = batch_of(2).iter().map(|h| h.2).min().unwrap_or_default();
    assert!(first_ended > 0, "{hosts_of:?}");
    assert!(
        second_started >= first_ended,
        "batch 2 started at {second_started}, before batch 1 ended at {first_ended}: {hosts_of:?}"
    );
    // Every host placed the file (checked against its SHA-256 before its rename).
    for host in &hosts {
        let logs = downloads(&cluster, job, step, *host).await?;
        assert_eq!(logs.len(), 1, "{logs:?}");
        assert_eq!(logs[0]["status"], 4, "{logs:?}");
    }
    assert_eq!(
        sha256(&std::fs::read(out.path().join("pkg.bin"))?),
        sha256(&content)
    );
    Ok(())
}

#[tokio::test(flavor = "multi_thread")]
async fn a_failed_batch_pauses_or_stops_the_transfer_as_the_mode_says() -> Result<()> {
    let cluster = start_cluster(2).await?;
    let hosts = cluster.host_ids();
    // A directory only root may write: the account "user" fails there (329).
    let out = tempfile::Builder::new()
        .prefix("fleetrun-file-rolling-closed-")
        .tempdir_in("/tmp")?;
    std::fs::set_permissions(out.path(), std::fs::Permissions::from_mode(0o755))?;
    let original = b"the bytes the job was accepted with".to_vec();
    let (path, url) = upload(&cluster, "conf.tar", &original).await?;
    let sources = json!([{"file_type": 2, "file_list": [path]}]);
    let request = |rolling: Value| {
        let mut request = transfer_request(
            &cluster,
            out.path().to_str().unwrap(),
            sources.clone(),
            &hosts,
        );
        request["account_alias"] = json!("user");
        request["rolling_config"] = rolling;
        request
    };

    // Mode 2 with a failure limit of 1: the failed batch stops the rolling, for good.
    let (stopped, stopped_step) = submit(
        &cluster,
        "fast_transfer_file",
        request(json!({"expression": "1", "mode": 2, "max_failures": 1})),
    )
    .await?;
    let ended = wait_for(&cluster, stopped, 4).await?;
    assert_eq!(
        statuses(&ended),
        by_host(vec![(hosts[0], 329), (hosts[1], 5)]),
        "{ended}"
    );
    let refused = operate_step(&cluster, stopped, stopped_step, 3).await?;
    assert_eq!(refused["code"], 1_241_003, "{refused}");

    // Mode 1: the failed batch pauses the job (failed, 4), the next batch waits.
    let (job, step) = submit(
        &cluster,
        "fast_transfer_file",
        request(json!({"expression": "1", "mode": 1})),
    )
    .await?;
    let paused = wait_for(&cluster, job, 4).await?;
    assert_eq!(paused["step_instance_list"][0]["status"], 4, "{paused}");
    assert_eq!(
        statuses(&paused),
        by_host(vec![(hosts[0], 329), (hosts[1], 5)]),
        "{paused}"
    );
    // What the job sends was kept when it was accepted: a new upload changes nothing.
    put(&cluster, &url, b"replaced during the pause").await?;
    std::fs::set_permissions(out.path(), std::fs::Permissions::from_mode(0o777))?;
    let ignored = operate_step(&cluster, job, step, 3).await?;
    assert_eq!(ignored["code"], 0, "{ignored}");
    let done = wait_for(&cluster, job, 3).await?;
    assert_eq!(
        statuses(&done),
        by_host(vec![(hosts[0], 329), (hosts[1], 9)]),
        "{done}"
    );
    let hosts_of = batches(&cluster, job, step).await?;
    assert_eq!(hosts_of[&hosts[1]].0, 2, "{hosts_of:?}");
    assert_eq!(std::fs::read(out.path().join("conf.tar"))?, original);
    Ok(())
}

#[tokio::test(flavor = "multi_thread")]
async fn a_config_push_waits_for_a_confirmation_before_each_batch() -> Result<()> {
    let cluster = start_cluster(2).await?;
    let hosts = cluster.host_ids();
    let out = scratch("roll-push");
    let files = json!([{"file_name": "app.conf", "content": b64(b"workers = 4\n")}]);

    // The rolling_config is checked as fast_execute_script checks it, with bk-job's codes.
    let mut bad = push_request(&cluster, out.path(), files.clone(), &hosts);
    bad["rolling_config"] = json!({"expression": "ten", "mode": 1});
    let (code, message) = refused(&cluster, "push_config_file", bad).await?;
    assert_eq!(code, 1_244_026, "{message}");
    assert!(message.contains("rolling_config.expression"), "{message}");

    let mut request = push_request(&cluster, out.path(), files, &hosts);
    request["rolling_config"] = json!({"expression": "1", "mode": 3});
    let (job, step) = submit(&cluster, "push_config_file", request).await?;
    let waiting = wait_for(&cluster, job, 7).await?;
    assert_eq!(
        statuses(&waiting),
        by_host(vec![(hosts[0], 9), (hosts[1], 5)]),
        "{waiting}"
    );
    let confirmed = operate_step(&cluster, job, step, 13).await?;
    assert_eq!(confirmed["code"], 0, "{confirmed}");
    let done = wait_for(&cluster, job, 3).await?;
    assert_eq!(
        statuses(&done),
        by_host(vec![(hosts[0], 9), (hosts[1], 9)]),
        "{done}"
    );
    assert_eq!(
        std::fs::read_to_string(out.path().join("app.conf"))?,
        "workers = 4\n"
    );
    let hosts_of = batches(&cluster, job, step).await?;
    assert_eq!(
        (hosts_of[&hosts[0]].0, hosts_of[&hosts[1]].0),
        (1, 2),
        "{hosts_of:?}"
    );
    Ok(())
}

#[tokio::test(flavor = "multi_thread")]
async fn a_paused_config_push_goes_on_after_a_controller_restart_with_the_files_it_kept()
-> Result<()> {
    let mut cluster = start_cluster(2).await?;
    let hosts = cluster.host_ids();
    let out = scratch("roll-restart");
    let files = json!([{"file_name": "kept.conf", "content": b64(b"kept = yes\n")}]);
    let mut request = push_request(&cluster, out.path(), files, &hosts);
    request["rolling_config"] = json!({"expression": "1", "mode": 3});
    let (job, step) = submit(&cluster, "push_config_file", request).await?;
    wait_for(&cluster, job, 7).await?;
    // The first batch's file is removed: only the next batch can bring it back.
    std::fs::remove_file(out.path().join("kept.conf"))?;
    cluster.kill_controller()?;
    cluster.start_controller().await?;
    let ids: Vec<String> = cluster.agents.iter().map(|a| a.agent_id.clone()).collect();
    cluster.wait_online(&ids, Duration::from_secs(30)).await?;
    let kept = status_of(&cluster, job).await?;
    assert_eq!(kept["job_instance"]["status"], 7, "{kept}");
    assert_eq!(operate_step(&cluster, job, step, 13).await?["code"], 0);
    let done = wait_for(&cluster, job, 3).await?;
    assert_eq!(
        statuses(&done),
        by_host(vec![(hosts[0], 9), (hosts[1], 9)]),
        "{done}"
    );
    assert_eq!(
        std::fs::read_to_string(out.path().join("kept.conf"))?,
        "kept = yes\n"
    );
    Ok(())
}

#[tokio::test(flavor = "multi_thread")]
async fn controllers_in_a_cluster_refuse_config_pushes_that_keep_their_files() -> Result<()> {
    let Some(cluster) = fleetrun_tests::start_shared_cluster(
        "controllers_in_a_cluster_refuse_config_pushes_that_keep_their_files",
        1,
        2,
        fleetrun_testkit::cluster::ClusterOptions::default(),
    )
    .await?
    else {
        return Ok(());
    };
    let out = scratch("cluster-push");
    let files = json!([{"file_name": "a.conf", "content": b64(b"a")}]);
    for (field, value) in [
        ("start_task", json!(false)),
        ("rolling_config", json!({"expression": "1", "mode": 3})),
    ] {
        let mut request = push_request(&cluster, out.path(), files.clone(), &cluster.host_ids());
        request[field] = value;
        let (code, message) = refused(&cluster, "push_config_file", request).await?;
        assert_eq!(code, 1_241_011, "{message}");
        assert!(message.starts_with(field), "{message}");
        assert!(message.contains("[cluster]"), "{message}");
    }
    // Without either, the push is taken as ever.
    let request = push_request(&cluster, out.path(), files, &cluster.host_ids());
    let (job, _) = submit(&cluster, "push_config_file", request).await?;
    let done = cluster
        .client()
        .wait_job(&cluster.info.scope(), job, Duration::from_secs(60))
        .await?;
    assert_eq!(done["job_instance"]["status"], 3, "{done}");
    Ok(())
}

#[tokio::test(flavor = "multi_thread")]
async fn staggered_config_push_batches_start_with_the_requested_spacing() -> Result<()> {
    let cluster = start_cluster(2).await?;
    let hosts = cluster.host_ids();
    let out = scratch("roll-staggered");
    let files = json!([{"file_name": "s.conf", "content": b64(b"staggered\n")}]);
    let mut request = push_request(&cluster, out.path(), files, &hosts);
    request["rolling_config"] = json!({
        "expression": "1",
        "execution_mode": 2,
        "batch_start_wait_fixed_ms": 1500,
        "batch_start_wait_random_min_ms": 0,
        "batch_start_wait_random_max_ms": 0,
    });
    let (job, step) = submit(&cluster, "push_config_file", request).await?;
    let done = wait_for(&cluster, job, 3).await?;
    assert_eq!(
        statuses(&done),
        by_host(vec![(hosts[0], 9), (hosts[1], 9)]),
        "{done}"
    );
    let hosts_of = batches(&cluster, job, step).await?;
    let (first, second) = (hosts_of[&hosts[0]], hosts_of[&hosts[1]]);
    assert_eq!((first.0, second.0), (1, 2), "{hosts_of:?}");
    assert!(
        second.2 - first.2 >= 1000,
        "batch 2 started {} ms after batch 1: {hosts_of:?}",
        second.2 - first.2
    );
    Ok(())
}
