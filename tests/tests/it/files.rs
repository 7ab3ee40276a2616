//! File steps on real agents: `push_config_file` writes files as the account, with their modes,
//! through a verified temporary file and a rename, and reports each file as bk-job's file logs.
//! The attacks: names that climb out of the target, symbolic links planted at the target and in
//! its path, oversized contents, an account writing where it may not, a full disk, an account
//! missing on the host.

use std::{
    os::unix::fs::{MetadataExt as _, PermissionsExt as _},
    path::{Path, PathBuf},
    process::Command,
    sync::OnceLock,
    time::Duration,
};

use anyhow::{Context, Result};
use fleetrun_tests::{TestCluster, b64, host_results, start_cluster};
use serde_json::{Value, json};

const TEST_USER: &str = "fleetrun-user";

fn ensure_test_user() {
    static DONE: OnceLock<()> = OnceLock::new();
    DONE.get_or_init(|| {
        let known = Command::new("getent")
            .args(["passwd", TEST_USER])
            .output()
            .is_ok_and(|o| o.status.success());
        if !known {
            let status = Command::new("useradd")
                .args(["-m", "-s", "/bin/bash", TEST_USER])
                .status()
                .unwrap();
            assert!(status.success(), "useradd {TEST_USER}");
        }
    });
}

fn user_uid() -> u32 {
    ensure_test_user();
    let out = Command::new("id").args(["-u", TEST_USER]).output().unwrap();
    String::from_utf8_lossy(&out.stdout).trim().parse().unwrap()
}

/// A fresh directory for one test's targets (0755, root's), removed at the end.
fn scratch(name: &str) -> tempfile::TempDir {
    let dir = tempfile::Builder::new()
        .prefix(&format!("fleetrun-files-{name}-"))
        .tempdir_in("/tmp")
        .unwrap();
    std::fs::set_permissions(dir.path(), std::fs::Permissions::from_mode(0o755)).unwrap();
    dir
}

fn push_request(cluster: &TestCluster, dir: &str, files: Value, account: &str) -> Value {
    let mut request = cluster.info.scope();
    request["account_alias"] = json!(account);
    request["file_target_path"] = json!(dir);
    request["file_list"] = files;
    request["timeout"] = json!(60);
    request["target_server"] = json!({ "host_id_list": cluster.host_ids() });
    request
}

/// Submits a push_config_file and waits for its end; returns (job, step, status data).
async fn push(cluster: &TestCluster, request: Value) -> Result<(i64, i64, Value)> {
    let client = cluster.client();
    let accepted = client.call("push_config_file", request).await?;
    let job = accepted["job_instance_id"].as_i64().context("job id")?;
    let step = accepted["step_instance_id"].as_i64().context("step id")?;
    let status = client
        .wait_job(&cluster.info.scope(), job, Duration::from_secs(60))
        .await?;
    Ok((job, step, status))
}

/// The refusal of a request: (code, message).
async fn refused(cluster: &TestCluster, request: Value) -> Result<(i64, String)> {
    let reply = cluster
        .client()
        .call_raw("push_config_file", request)
        .await?;
    assert_eq!(reply["result"], false, "must be refused: {reply}");
    Ok((
        reply["code"].as_i64().unwrap_or_default(),
        reply["message"].as_str().unwrap_or_default().to_owned(),
    ))
}

/// One host's file logs, from get_job_instance_ip_log.
async fn file_logs(cluster: &TestCluster, job: i64, step: i64, host: i64) -> Result<Value> {
    let mut body = cluster.info.scope();
    body["job_instance_id"] = json!(job);
    body["step_instance_id"] = json!(step);
    body["bk_host_id"] = json!(host);
    let data = cluster
        .client()
        .call("get_job_instance_ip_log", body)
        .await?;
    assert_eq!(data["log_type"], 2, "{data}");
    Ok(data["file_logs"].clone())
}

fn leftovers(dir: &Path) -> Vec<String> {
    std::fs::read_dir(dir)
        .map(|entries| {
            entries
                .filter_map(|e| e.ok())
                .map(|e| e.file_name().to_string_lossy().into_owned())
                .filter(|n| n.starts_with(".fleetrun-"))
                .collect()
        })
        .unwrap_or_default()
}

#[tokio::test(flavor = "multi_thread")]
async fn push_config_file_writes_as_the_account_with_modes_and_bk_job_file_logs() -> Result<()> {
    let uid = user_uid();
    let cluster = start_cluster(2).await?;
    let base_dir = scratch("push");
    let base = base_dir.path().to_owned();
    std::fs::set_permissions(&base, std::fs::Permissions::from_mode(0o777))?;
    // A directory that does not exist yet: the account creates it.
    let target = base.join("conf.d");
    let request = push_request(
        &cluster,
        &format!("{}/", target.display()),
        json!([
            {"file_name": "app.conf", "content": b64("listen = 8080\n")},
            {"file_name": "secret.key", "content": b64("k3y"), "mode": "0600"},
        ]),
        "user",
    );
    let (job, step, status) = push(&cluster, request).await?;
    assert_eq!(status["job_instance"]["status"], 3, "{status}");
    for result in host_results(&status) {
        assert_eq!(result["status"], 9, "{result}");
    }
    let conf = target.join("app.conf");
    assert_eq!(std::fs::read_to_string(&conf)?, "listen = 8080\n");
    let meta = std::fs::symlink_metadata(&conf)?;
    assert!(meta.file_type().is_file());
    assert_eq!(meta.uid(), uid, "owned by the account");
    assert_eq!(meta.mode() & 0o7777, 0o644);
    let key = std::fs::symlink_metadata(target.join("secret.key"))?;
    assert_eq!(key.uid(), uid);
    assert_eq!(key.mode() & 0o7777, 0o600);
    assert_eq!(std::fs::metadata(&target)?.uid(), uid, "the directory too");
    assert!(leftovers(&target).is_empty(), "{:?}", leftovers(&target));

    // bk-job's file logs, one download entry per file and host.
    let host = cluster.host_ids()[0];
    let logs = file_logs(&cluster, job, step, host).await?;
    let logs = logs.as_array().context("file_logs")?;
    assert_eq!(logs.len(), 2, "{logs:?}");
    assert_eq!(logs[0]["mode"], 1);
    assert_eq!(logs[0]["status"], 4);
    assert_eq!(logs[0]["src_path"], "app.conf");
    assert_eq!(
        logs[0]["dest_path"],
        format!("{}/app.conf", target.display())
    );
    assert_eq!(logs[0]["dest_ip"]["bk_host_id"], host);
    assert_eq!(logs[0]["size"], "14.0 Bytes");
    assert_eq!(logs[0]["process"], "100%");
    assert!(
        logs[0]["log_content"]
            .as_str()
            .unwrap()
            .contains("FileName: "),
        "{}",
        logs[0]
    );
    let mut body = cluster.info.scope();
    body["job_instance_id"] = json!(job);
    body["step_instance_id"] = json!(step);
    body["host_id_list"] = json!(cluster.host_ids());
    let batch = cluster
        .client()
        .call("batch_get_job_instance_ip_log", body)
        .await?;
    assert_eq!(batch["log_type"], 2);
    let tasks = batch["file_task_logs"]
        .as_array()
        .context("file_task_logs")?;
    assert_eq!(tasks.len(), 2, "{batch}");
    for task in tasks {
        assert_eq!(
            task["file_logs"].as_array().map(Vec::len),
            Some(2),
            "{task}"
        );
    }
    Ok(())
}

#[tokio::test(flavor = "multi_thread")]
async fn names_and_paths_that_climb_out_and_oversized_contents_are_refused_naming_the_field()
-> Result<()> {
    let cluster = start_cluster(1).await?;
    for name in ["../escape", "a/b", "..", ".", ""] {
        let request = push_request(
            &cluster,
            "/tmp",
            json!([{"file_name": name, "content": b64("x")}]),
            "root",
        );
        let (code, message) = refused(&cluster, request).await?;
        assert_eq!(code, 1_240_003, "{name:?}: {message}");
        assert!(message.contains("file_list[0].file_name"), "{message}");
    }
    for dir in ["tmp/x", "/tmp/../etc", "/tmp/./x", ""] {
        let request = push_request(
            &cluster,
            dir,
            json!([{"file_name": "a", "content": b64("x")}]),
            "root",
        );
        let (code, message) = refused(&cluster, request).await?;
        assert!(code == 1_240_003 || code == 1_241_004, "{dir:?}: {code}");
        assert!(message.contains("file_target_path"), "{message}");
    }
    let big = base64::Engine::encode(
        &base64::engine::general_purpose::STANDARD,
        vec![b'x'; 9 * 1024 * 1024],
    );
    let request = push_request(
        &cluster,
        "/tmp",
        json!([{"file_name": "big", "content": big}]),
        "root",
    );
    let (code, message) = refused(&cluster, request).await?;
    assert_eq!(code, 1_240_003);
    assert!(message.contains("file_list[0].content"), "{message}");
    let request = push_request(
        &cluster,
        "/tmp",
        json!([{"file_name": "a", "content": b64("x"), "mode": "4755"}]),
        "root",
    );
    let (_, message) = refused(&cluster, request).await?;
    assert!(message.contains("file_list[0].mode"), "{message}");
    Ok(())
}

#[tokio::test(flavor = "multi_thread")]
async fn a_symlink_planted_at_the_target_is_replaced_never_written_through() -> Result<()> {
    let uid = user_uid();
    let cluster = start_cluster(1).await?;
    let dir_dir = scratch("plant");
    let dir = dir_dir.path().to_owned();
    std::os::unix::fs::chown(&dir, Some(uid), None)?;
    // What a local user wants overwritten: a root file outside the target.
    let victim_dir = scratch("victim");
    let victim = victim_dir.path().join("shadow");
    std::fs::write(&victim, "root's\n")?;
    std::os::unix::fs::symlink(&victim, dir.join("app.conf"))?;
    let request = push_request(
        &cluster,
        dir.to_str().unwrap(),
        json!([{"file_name": "app.conf", "content": b64("pushed\n")}]),
        "user",
    );
    let (_, _, status) = push(&cluster, request).await?;
    assert_eq!(host_results(&status)[0]["status"], 9, "{status}");
    assert_eq!(
        std::fs::read_to_string(&victim)?,
        "root's\n",
        "written through the link"
    );
    let placed = std::fs::symlink_metadata(dir.join("app.conf"))?;
    assert!(
        placed.file_type().is_file(),
        "the link is replaced by the file"
    );
    assert_eq!(std::fs::read_to_string(dir.join("app.conf"))?, "pushed\n");

    // A link in the path is refused, not followed.
    let elsewhere_dir = scratch("elsewhere");
    let elsewhere = elsewhere_dir.path().to_owned();
    std::fs::set_permissions(&elsewhere, std::fs::Permissions::from_mode(0o777))?;
    std::os::unix::fs::symlink(&elsewhere, dir.join("link"))?;
    let request = push_request(
        &cluster,
        &format!("{}/link/sub", dir.display()),
        json!([{"file_name": "x", "content": b64("x")}]),
        "user",
    );
    let (job, step, status) = push(&cluster, request).await?;
    let result = &host_results(&status)[0];
    assert_eq!(result["status"], 329, "{result}");
    assert_eq!(
        std::fs::read_dir(&elsewhere)?.count(),
        0,
        "followed the link"
    );
    let logs = file_logs(&cluster, job, step, cluster.host_ids()[0]).await?;
    assert_eq!(logs[0]["status"], 5);
    assert!(
        logs[0]["log_content"]
            .as_str()
            .unwrap()
            .contains("symbolic link"),
        "{logs}"
    );
    Ok(())
}

#[tokio::test(flavor = "multi_thread")]
async fn an_account_writing_where_it_may_not_fails_329_and_leaves_nothing() -> Result<()> {
    ensure_test_user();
    let cluster = start_cluster(1).await?;
    let dir_dir = scratch("rootonly");
    let dir = dir_dir.path().to_owned();
    std::fs::set_permissions(&dir, std::fs::Permissions::from_mode(0o755))?;
    let request = push_request(
        &cluster,
        dir.to_str().unwrap(),
        json!([{"file_name": "x.conf", "content": b64("x")}]),
        "user",
    );
    let (job, step, status) = push(&cluster, request).await?;
    let result = &host_results(&status)[0];
    assert_eq!(result["status"], 329, "{result}");
    assert_eq!(status["job_instance"]["status"], 4);
    assert_eq!(std::fs::read_dir(&dir)?.count(), 0);
    let logs = file_logs(&cluster, job, step, cluster.host_ids()[0]).await?;
    assert_eq!(logs[0]["status"], 5);
    assert!(
        logs[0]["log_content"]
            .as_str()
            .unwrap()
            .contains("permission denied"),
        "{logs}"
    );
    Ok(())
}

#[tokio::test(flavor = "multi_thread")]
async fn strict_mode_stops_at_the_first_failure_force_mode_goes_on() -> Result<()> {
    let cluster = start_cluster(1).await?;
    for (mode, second_written) in [(1, false), (2, true)] {
        let dir_dir = scratch("modes");
        let dir = dir_dir.path().to_owned();
        // The first file's name is taken by a directory: it cannot be placed.
        std::fs::create_dir(dir.join("first"))?;
        let mut request = push_request(
            &cluster,
            dir.to_str().unwrap(),
            json!([
                {"file_name": "first", "content": b64("1")},
                {"file_name": "second", "content": b64("2")},
            ]),
            "root",
        );
        request["transfer_mode"] = json!(mode);
        let (job, step, status) = push(&cluster, request).await?;
        assert_eq!(host_results(&status)[0]["status"], 329, "{status}");
        assert_eq!(dir.join("second").exists(), second_written, "mode {mode}");
        assert!(dir.join("first").is_dir());
        assert!(leftovers(&dir).is_empty());
        let logs = file_logs(&cluster, job, step, cluster.host_ids()[0]).await?;
        assert_eq!(logs[0]["status"], 5, "{logs}");
        assert_eq!(
            logs[1]["status"],
            if second_written { 4 } else { 5 },
            "{logs}"
        );
    }
    Ok(())
}

#[tokio::test(flavor = "multi_thread")]
async fn a_full_disk_fails_the_file_and_leaves_no_partial_file() -> Result<()> {
    let cluster = start_cluster(1).await?;
    let dir_dir = scratch("full");
    let dir = dir_dir.path().to_owned();
    let mounted = Command::new("mount")
        .args(["-t", "tmpfs", "-o", "size=64k", "fleetrun-full"])
        .arg(&dir)
        .status()
        .is_ok_and(|s| s.success());
    if !mounted {
        println!(
            "a_full_disk_fails_the_file_and_leaves_no_partial_file: skipped, cannot mount a tmpfs here"
        );
        return Ok(());
    }
    struct Unmount(PathBuf);
    impl Drop for Unmount {
        fn drop(&mut self) {
            let _ = Command::new("umount").arg(&self.0).status();
        }
    }
    let _unmount = Unmount(dir.clone());
    let big = base64::Engine::encode(
        &base64::engine::general_purpose::STANDARD,
        vec![b'z'; 1024 * 1024],
    );
    let request = push_request(
        &cluster,
        dir.to_str().unwrap(),
        json!([{"file_name": "big.bin", "content": big}]),
        "root",
    );
    let (job, step, status) = push(&cluster, request).await?;
    assert_eq!(host_results(&status)[0]["status"], 329, "{status}");
    assert_eq!(std::fs::read_dir(&dir)?.count(), 0, "nothing half-written");
    let logs = file_logs(&cluster, job, step, cluster.host_ids()[0]).await?;
    assert!(
        logs[0]["log_content"]
            .as_str()
            .unwrap()
            .contains("no space"),
        "{logs}"
    );
    Ok(())
}

#[tokio::test(flavor = "multi_thread")]
async fn an_account_missing_on_the_host_ends_311() -> Result<()> {
    let cluster = start_cluster(1).await?;
    let inventory = cluster.dir().join("inventory.toml");
    let mut text = std::fs::read_to_string(&inventory)?;
    text.push_str(
        "\n[[account]]\nid = 9\nalias = \"ghost\"\naccount = \"fleetrun-no-such-user\"\nscopes = [\"biz:2\"]\n",
    );
    std::fs::write(&inventory, text)?;
    cluster.client().fleetrun("reload_inventory").await?;
    let dir_dir = scratch("ghost");
    let dir = dir_dir.path().to_owned();
    let request = push_request(
        &cluster,
        dir.to_str().unwrap(),
        json!([{"file_name": "x", "content": b64("x")}]),
        "ghost",
    );
    let (_, _, status) = push(&cluster, request).await?;
    let result = &host_results(&status)[0];
    assert_eq!(result["status"], 311, "{result}");
    assert_eq!(std::fs::read_dir(&dir)?.count(), 0);
    Ok(())
}
