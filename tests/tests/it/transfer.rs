//! `fast_transfer_file` on real agents: files read on source hosts as their account, relayed
//! through the controller's content store, written on target hosts as the target account, with
//! bk-job's upload and download logs and statuses; local files uploaded first; speed limits.
//! The attacks: source paths climbing out with `..` or through symbolic links, another app's
//! upload, a third-party source, a source host offline, sources missing or unreadable.
//!
//! All agents of a test cluster share this machine's file system: sources and targets are
//! directories of the test's own, and `[FILESRCIP]` keeps sources' files apart.

use std::{
    os::unix::fs::{MetadataExt as _, PermissionsExt as _},
    path::{Path, PathBuf},
    process::Command,
    time::{Duration, Instant},
};

use anyhow::{Context, Result};
use fleetrun_tests::{TestCluster, assert_refused, host_results, start_cluster};
use serde_json::{Value, json};

const TEST_USER: &str = "fleetrun-user";

fn user_uid() -> u32 {
    let _ = fleetrun_testkit::cluster::ensure_test_user();
    let out = Command::new("id").args(["-u", TEST_USER]).output().unwrap();
    String::from_utf8_lossy(&out.stdout).trim().parse().unwrap()
}

/// A fresh directory (0777 so the account writes there), removed at the end.
fn scratch(name: &str) -> tempfile::TempDir {
    let dir = tempfile::Builder::new()
        .prefix(&format!("fleetrun-transfer-{name}-"))
        .tempdir_in("/tmp")
        .unwrap();
    std::fs::set_permissions(dir.path(), std::fs::Permissions::from_mode(0o777)).unwrap();
    dir
}

/// Bytes that do not repeat in chunk-sized runs.
fn pattern(len: usize, seed: u8) -> Vec<u8> {
    let mut state = u64::from(seed).wrapping_mul(0x9E37_79B9_7F4A_7C15) | 1;
    (0..len)
        .map(|_| {
            state ^= state << 13;
            state ^= state >> 7;
            state ^= state << 17;
            state as u8
        })
        .collect()
}

fn write_file(path: &Path, content: &[u8], mode: u32, uid: Option<u32>) {
    std::fs::write(path, content).unwrap();
    std::fs::set_permissions(path, std::fs::Permissions::from_mode(mode)).unwrap();
    if let Some(uid) = uid {
        std::os::unix::fs::chown(path, Some(uid), None).unwrap();
    }
}

fn ip_of(cluster: &TestCluster, bk_host_id: i64) -> String {
    cluster
        .info
        .hosts
        .iter()
        .find(|h| h.bk_host_id == bk_host_id)
        .map(|h| h.ip.clone())
        .unwrap()
}

fn request(
    cluster: &TestCluster,
    target: &str,
    sources: Value,
    targets: &[i64],
    account: &str,
) -> Value {
    let mut request = cluster.info.scope();
    request["account_alias"] = json!(account);
    request["file_target_path"] = json!(target);
    request["file_source_list"] = sources;
    request["timeout"] = json!(120);
    request["target_server"] = json!({ "host_id_list": targets });
    request
}

fn server_source(files: &[&str], hosts: &[i64], account: &str) -> Value {
    json!({
        "file_type": 1,
        "file_list": files,
        "account": {"alias": account},
        "server": {"host_id_list": hosts},
    })
}

/// Submits a transfer and waits for its end: (job, step, status data).
async fn transfer(cluster: &TestCluster, request: Value) -> Result<(i64, i64, Value)> {
    cluster
        .run_to_end("fast_transfer_file", request, Duration::from_secs(120))
        .await
}

async fn refused(cluster: &TestCluster, request: Value) -> Result<(i64, String)> {
    cluster.refused("fast_transfer_file", request).await
}

async fn file_logs(cluster: &TestCluster, job: i64, step: i64, host: i64) -> Result<Vec<Value>> {
    let logs = cluster.file_logs(job, step, host).await?;
    Ok(logs.as_array().cloned().unwrap_or_default())
}

fn statuses(status: &Value) -> Vec<i64> {
    host_results(status)
        .iter()
        .map(|r| r["status"].as_i64().unwrap_or_default())
        .collect()
}

fn leftovers(dir: &Path) -> Vec<PathBuf> {
    let mut found = Vec::new();
    let Ok(entries) = std::fs::read_dir(dir) else {
        return found;
    };
    for entry in entries.flatten() {
        let path = entry.path();
        if entry
            .file_name()
            .to_string_lossy()
            .starts_with(".fleetrun-")
        {
            found.push(path.clone());
        }
        if path.is_dir() {
            found.extend(leftovers(&path));
        }
    }
    found
}

// The tests below open alike (a cluster of the agents each needs, its hosts, scratch directories
// named for the test) and end alike (what landed where): each stays whole, so that it reads alone.

#[tokio::test(flavor = "multi_thread")]
async fn one_source_to_three_targets_as_the_accounts_with_modes_and_bk_job_logs() -> Result<()> {
    let uid = user_uid();
    let cluster = start_cluster(4).await?;
    let hosts = cluster.host_ids();
    let (source, targets) = (hosts[0], &hosts[1..]);
    let src_dir = scratch("src");
    let content = pattern(3 * 1024 * 1024 + 123, 1);
    let src = src_dir.path().join("app.tar");
    write_file(&src, &content, 0o640, Some(uid));
    // A directory sent whole, with a subdirectory.
    let tree = src_dir.path().join("conf");
    std::fs::create_dir_all(tree.join("sub"))?;
    write_file(&tree.join("a.conf"), b"a\n", 0o600, Some(uid));
    write_file(&tree.join("sub/b.conf"), b"b\n", 0o644, Some(uid));
    std::os::unix::fs::chown(&tree, Some(uid), None)?;
    std::os::unix::fs::chown(tree.join("sub"), Some(uid), None)?;

    let out_dir = scratch("out");
    let target = format!("{}/[FILESRCIP]/", out_dir.path().display());
    let sources = json!([server_source(
        &[src.to_str().unwrap(), &format!("{}/", tree.display())],
        &[source],
        "user"
    )]);
    let (job, step, status) = transfer(
        &cluster,
        request(&cluster, &target, sources, targets, "user"),
    )
    .await?;
    assert_eq!(status["job_instance"]["status"], 3, "{status}");
    assert_eq!(statuses(&status), vec![9, 9, 9], "{status}");
    let landed = out_dir.path().join(ip_of(&cluster, source));
    let placed = landed.join("app.tar");
    assert!(std::fs::read(&placed)? == content, "content differs");
    let meta = std::fs::symlink_metadata(&placed)?;
    assert_eq!(meta.uid(), uid, "owned by the target account");
    assert_eq!(meta.mode() & 0o7777, 0o640, "mode preserved");
    assert_eq!(std::fs::read(landed.join("conf/a.conf"))?, b"a\n");
    assert_eq!(std::fs::read(landed.join("conf/sub/b.conf"))?, b"b\n");
    assert_eq!(
        std::fs::metadata(landed.join("conf/a.conf"))?.mode() & 0o777,
        0o600
    );
    assert!(
        leftovers(out_dir.path()).is_empty(),
        "{:?}",
        leftovers(out_dir.path())
    );

    // bk-job's logs: the source's uploads, then the target's downloads.
    let logs = file_logs(&cluster, job, step, targets[0]).await?;
    let uploads: Vec<&Value> = logs.iter().filter(|l| l["mode"] == 0).collect();
    let downloads: Vec<&Value> = logs.iter().filter(|l| l["mode"] == 1).collect();
    assert_eq!(uploads.len(), 3, "{logs:?}");
    assert_eq!(downloads.len(), 3, "{logs:?}");
    let tar_up = uploads
        .iter()
        .find(|l| l["src_path"] == src.to_str().unwrap())
        .context("upload of app.tar")?;
    assert_eq!(tar_up["status"], 4, "{tar_up}");
    assert_eq!(tar_up["src_ip"]["bk_host_id"], source);
    assert_eq!(tar_up["size"], "3.0 MB");
    assert_eq!(tar_up["process"], "100%");
    assert!(tar_up["dest_ip"].is_null());
    let tar_down = downloads
        .iter()
        .find(|l| l["dest_path"] == placed.to_str().unwrap())
        .context("download of app.tar")?;
    assert_eq!(tar_down["status"], 4, "{tar_down}");
    assert_eq!(tar_down["src_ip"]["ip"], ip_of(&cluster, source));
    assert_eq!(tar_down["dest_ip"]["bk_host_id"], targets[0]);
    assert!(
        tar_down["log_content"]
            .as_str()
            .unwrap_or_default()
            .contains("FileName: "),
        "{tar_down}"
    );
    let mut body = cluster.info.scope();
    body["job_instance_id"] = json!(job);
    body["step_instance_id"] = json!(step);
    body["host_id_list"] = json!(targets);
    let batch = cluster
        .client()
        .call("batch_get_job_instance_ip_log", body)
        .await?;
    assert_eq!(batch["log_type"], 2, "{batch}");
    assert_eq!(batch["file_task_logs"].as_array().map(Vec::len), Some(3));

    // The source was read once: the controller says so when the step ends.
    let log = std::fs::read_to_string(&cluster.controller_log)?;
    let line = log
        .lines()
        .find(|l| l.contains("transfer ended") && l.contains(&format!("job={job}")))
        .context("the transfer's end in the controller's log")?;
    let total = content.len() + 4;
    assert!(
        line.contains(&format!("source_bytes_read={total}")),
        "{line}"
    );
    assert!(
        line.contains(&format!("controller_bytes_relayed={}", total * 3)),
        "{line}"
    );
    Ok(())
}

#[tokio::test(flavor = "multi_thread")]
async fn two_sources_with_a_regex_land_apart_by_source_address() -> Result<()> {
    let cluster = start_cluster(3).await?;
    let hosts = cluster.host_ids();
    let src_dir = scratch("regex");
    for (name, text) in [
        ("app-1.log", "one"),
        ("app-22.log", "two"),
        ("other.txt", "no"),
    ] {
        write_file(&src_dir.path().join(name), text.as_bytes(), 0o644, None);
    }
    let out_dir = scratch("regex-out");
    let target = format!("{}/[FILESRCIP]", out_dir.path().display());
    let regex = format!("{}/REGEX:app-[0-9]+\\.log", src_dir.path().display());
    let sources = json!([server_source(&[&regex], &hosts[..2], "root")]);
    let (_, _, status) = transfer(
        &cluster,
        request(&cluster, &target, sources, &hosts[2..], "root"),
    )
    .await?;
    assert_eq!(statuses(&status), vec![9], "{status}");
    for source in &hosts[..2] {
        let landed = out_dir.path().join(ip_of(&cluster, *source));
        assert_eq!(std::fs::read_to_string(landed.join("app-1.log"))?, "one");
        assert_eq!(std::fs::read_to_string(landed.join("app-22.log"))?, "two");
        assert!(!landed.join("other.txt").exists());
    }
    // A wildcard picks the same way; file_target_name renames the one file.
    let wildcard = format!("{}/other.*", src_dir.path().display());
    let mut req = request(
        &cluster,
        out_dir.path().join("w").to_str().unwrap(),
        json!([server_source(&[&wildcard], &hosts[..1], "root")]),
        &hosts[2..],
        "root",
    );
    req["file_target_name"] = json!("renamed.txt");
    let (_, _, status) = transfer(&cluster, req).await?;
    assert_eq!(statuses(&status), vec![9], "{status}");
    assert_eq!(
        std::fs::read_to_string(out_dir.path().join("w/renamed.txt"))?,
        "no"
    );
    Ok(())
}

/// Uploads `content` as `file_name` for `client`'s app; returns the upload's path and URL.
async fn upload(
    cluster: &TestCluster,
    app: (&str, &str),
    file_name: &str,
    content: Vec<u8>,
) -> Result<(String, String, Value)> {
    let client = fleetrun_tests::ApiClient::new(&cluster.info.api_url, app.0, app.1, "alice");
    let mut body = cluster.info.scope();
    body["file_name_list"] = json!([file_name]);
    let data = client.call("generate_local_file_upload_url", body).await?;
    let entry = &data["url_map"][file_name];
    let url = entry["upload_url"]
        .as_str()
        .context("upload_url")?
        .to_owned();
    let path = entry["path"].as_str().context("path")?.to_owned();
    let put = put_upload(&url, app, content).await?;
    Ok((path, url, put))
}

async fn put_upload(url: &str, app: (&str, &str), content: Vec<u8>) -> Result<Value> {
    let auth = json!({"bk_app_code": app.0, "bk_app_secret": app.1, "bk_username": "alice"});
    Ok(reqwest::Client::new()
        .put(url)
        .header("X-Bkapi-Authorization", auth.to_string())
        .body(content)
        .send()
        .await?
        .json()
        .await?)
}

#[tokio::test(flavor = "multi_thread")]
async fn a_local_upload_reaches_every_target_and_is_the_uploading_apps_alone() -> Result<()> {
    let uid = user_uid();
    let mut cluster = start_cluster(2).await?;
    cluster.kill_controller()?;
    let mut config = std::fs::read_to_string(&cluster.controller_config)?;
    config.push_str(
        "\n[[apps]]\nbk_app_code = \"other\"\nbk_app_secret = \"other-secret\"\nscopes = [\"*\"]\n",
    );
    std::fs::write(&cluster.controller_config, config)?;
    cluster.start_controller().await?;
    let ids: Vec<String> = cluster.agents.iter().map(|a| a.agent_id.clone()).collect();
    cluster.wait_online(&ids, Duration::from_secs(30)).await?;
    let app = (
        cluster.info.bk_app_code.clone(),
        cluster.info.bk_app_secret.clone(),
    );
    let app = (app.0.as_str(), app.1.as_str());
    let content = pattern(2 * 1024 * 1024 + 7, 3);
    let (path, url, put) = upload(&cluster, app, "pkg.bin", content.clone()).await?;
    assert_eq!(put["result"], true, "{put}");
    assert_eq!(put["data"]["size"], content.len());

    // Another app can neither write that upload nor send it.
    let other = ("other", "other-secret");
    let put = put_upload(&url, other, b"forged".to_vec()).await?;
    assert_eq!(put["result"], false, "{put}");
    let out_dir = scratch("local");
    let sources = json!([{"file_type": 2, "file_list": [path]}]);
    let mut req = request(
        &cluster,
        out_dir.path().to_str().unwrap(),
        sources.clone(),
        &cluster.host_ids(),
        "user",
    );
    let other_client =
        fleetrun_tests::ApiClient::new(&cluster.info.api_url, other.0, other.1, "mallory");
    let reply = other_client
        .call_raw("fast_transfer_file", req.clone())
        .await?;
    assert_eq!(reply["result"], false, "{reply}");
    assert_eq!(reply["code"], 1_240_003, "{reply}");
    assert!(
        reply["message"]
            .as_str()
            .unwrap_or_default()
            .contains("file_source_list[0].file_list[0]"),
        "{reply}"
    );
    // Missing credentials get nothing.
    let bare = reqwest::Client::new()
        .put(&url)
        .body("x")
        .send()
        .await?
        .json::<Value>()
        .await?;
    assert_eq!(bare["result"], false, "{bare}");

    let (_, _, status) = transfer(&cluster, req.clone()).await?;
    assert_eq!(statuses(&status), vec![9, 9], "{status}");
    let placed = out_dir.path().join("pkg.bin");
    assert!(std::fs::read(&placed)? == content);
    assert_eq!(std::fs::metadata(&placed)?.uid(), uid);

    // A third-party source is refused with bk-job's code and says what to use instead.
    req["file_source_list"] =
        json!([{"file_type": 3, "file_list": ["bucket/x"], "file_source_code": "cos"}]);
    let (code, message) = refused(&cluster, req).await?;
    assert_eq!(code, 1_241_011, "{message}");
    assert!(
        message.contains("file_source_list[0].file_type"),
        "{message}"
    );
    assert!(message.contains("third-party"), "{message}");
    Ok(())
}

#[tokio::test(flavor = "multi_thread")]
async fn strict_mode_sends_nothing_on_a_name_clash_force_sends_the_rest() -> Result<()> {
    let cluster = start_cluster(2).await?;
    let hosts = cluster.host_ids();
    let a = scratch("clash-a");
    let b = scratch("clash-b");
    write_file(&a.path().join("same.txt"), b"from a", 0o644, None);
    write_file(&b.path().join("same.txt"), b"from b", 0o644, None);
    write_file(&b.path().join("extra.txt"), b"extra", 0o644, None);
    let files = [
        a.path().join("same.txt"),
        b.path().join("same.txt"),
        b.path().join("extra.txt"),
    ];
    let files: Vec<&str> = files.iter().map(|p| p.to_str().unwrap()).collect();
    for (mode, out_name) in [(1, "strict"), (2, "force")] {
        let out = scratch(out_name);
        let mut req = request(
            &cluster,
            out.path().to_str().unwrap(),
            json!([server_source(&files, &hosts[..1], "root")]),
            &hosts[1..],
            "root",
        );
        req["transfer_mode"] = json!(mode);
        let (job, step, status) = transfer(&cluster, req).await?;
        assert_eq!(status["job_instance"]["status"], 4, "{status}");
        assert_eq!(statuses(&status), vec![202], "{status}");
        let logs = file_logs(&cluster, job, step, hosts[1]).await?;
        let clash = logs
            .iter()
            .find(|l| l["mode"] == 1 && l["status"] == 5)
            .context("the clash's log")?;
        assert!(
            clash["log_content"]
                .as_str()
                .unwrap_or_default()
                .contains("lands at"),
            "{clash}"
        );
        if mode == 1 {
            assert_eq!(
                std::fs::read_dir(out.path())?.count(),
                0,
                "strict sent something"
            );
        } else {
            assert_eq!(
                std::fs::read_to_string(out.path().join("same.txt"))?,
                "from a"
            );
            assert_eq!(
                std::fs::read_to_string(out.path().join("extra.txt"))?,
                "extra"
            );
        }
    }
    Ok(())
}

#[tokio::test(flavor = "multi_thread")]
async fn download_and_upload_speed_limits_are_honoured() -> Result<()> {
    let cluster = start_cluster(2).await?;
    let hosts = cluster.host_ids();
    let src_dir = scratch("speed");
    let size = 4 * 1024 * 1024;
    write_file(&src_dir.path().join("big"), &pattern(size, 9), 0o644, None);
    let src = src_dir.path().join("big");
    for limit_field in ["download_speed_limit", "upload_speed_limit"] {
        let out = scratch("speed-out");
        let mut req = request(
            &cluster,
            out.path().to_str().unwrap(),
            json!([server_source(&[src.to_str().unwrap()], &hosts[..1], "root")]),
            &hosts[1..],
            "root",
        );
        req[limit_field] = json!(1);
        let started = Instant::now();
        let (job, step, status) = transfer(&cluster, req).await?;
        let elapsed = started.elapsed().as_secs_f64();
        assert_eq!(statuses(&status), vec![9], "{status}");
        // 4 MiB at 1 MiB/s: 4 s of pacing. The limit bounds the time from below; from above
        // only a loose bound, as a loaded machine may add seconds around the job.
        let expected = (size as f64) / (1024.0 * 1024.0);
        assert!(
            elapsed >= expected * 0.8 && elapsed <= expected * 3.0 + 20.0,
            "{limit_field}: {elapsed:.2} s for {expected} s of pacing"
        );
        let logs = file_logs(&cluster, job, step, hosts[1]).await?;
        let mode = if limit_field == "download_speed_limit" {
            1
        } else {
            0
        };
        let row = logs
            .iter()
            .find(|l| l["mode"] == mode)
            .context("the paced side's log")?;
        let speed: f64 = row["speed"]
            .as_str()
            .and_then(|s| s.trim_end_matches(" KB/s").parse().ok())
            .context("speed")?;
        assert!(
            (1024.0 * 0.8..=1024.0 * 1.2).contains(&speed),
            "{limit_field}: measured {speed} KB/s against 1024"
        );
    }
    Ok(())
}

#[tokio::test(flavor = "multi_thread")]
async fn bad_sources_end_their_targets_with_bk_job_statuses_and_reasons() -> Result<()> {
    let uid = user_uid();
    let mut cluster = start_cluster(3).await?;
    let hosts = cluster.host_ids();
    let src_dir = scratch("bad");
    // Readable by root only: the account may not read it.
    write_file(&src_dir.path().join("secret"), b"root's", 0o600, None);
    write_file(&src_dir.path().join("fine"), b"fine", 0o644, Some(uid));
    // A link out of the directory, to a file the account could read.
    let outside = scratch("outside");
    write_file(&outside.path().join("target"), b"outside", 0o644, Some(uid));
    std::os::unix::fs::symlink(outside.path().join("target"), src_dir.path().join("link"))?;
    let dir = |name: &str| src_dir.path().join(name).to_str().unwrap().to_owned();

    // Refused before anything runs: `..`, relative paths, patterns in directories.
    for bad in [
        format!("{}/../etc/passwd", src_dir.path().display()),
        "relative/path".to_owned(),
        "/tmp/*/x".to_owned(),
    ] {
        let req = request(
            &cluster,
            "/tmp/x",
            json!([server_source(&[&bad], &hosts[..1], "user")]),
            &hosts[1..2],
            "user",
        );
        let (code, message) = refused(&cluster, req).await?;
        assert_eq!(code, 1_240_003, "{bad}: {message}");
        assert!(
            message.contains("file_source_list[0].file_list[0]"),
            "{message}"
        );
    }
    let req = request(
        &cluster,
        "relative",
        json!([server_source(&[&dir("fine")], &hosts[..1], "user")]),
        &hosts[1..2],
        "user",
    );
    let (_, message) = refused(&cluster, req).await?;
    assert!(message.contains("file_target_path"), "{message}");

    // Missing: 203. Unreadable, or a link: 202, the reason in the logs; nothing followed.
    for (path, want, reason) in [
        (dir("missing"), 203, "no such file"),
        (dir("secret"), 202, "permission denied"),
        (dir("link"), 202, "symbolic link"),
    ] {
        let out = scratch("bad-out");
        let req = request(
            &cluster,
            out.path().to_str().unwrap(),
            json!([server_source(&[&path, &dir("fine")], &hosts[..1], "user")]),
            &hosts[1..2],
            "user",
        );
        let (job, step, status) = transfer(&cluster, req).await?;
        assert_eq!(statuses(&status), vec![want], "{path}: {status}");
        // Force mode: the readable file still lands.
        assert_eq!(std::fs::read_to_string(out.path().join("fine"))?, "fine");
        assert!(!out.path().join("secret").exists() && !out.path().join("link").exists());
        let logs = file_logs(&cluster, job, step, hosts[1]).await?;
        let upload = logs
            .iter()
            .find(|l| l["mode"] == 0 && l["status"] == 5)
            .context("the failed upload")?;
        assert!(
            upload["log_content"]
                .as_str()
                .unwrap_or_default()
                .contains(reason),
            "{path}: {upload}"
        );
    }

    // A target path that is a file: the target fails 329, nothing written under it.
    let out = scratch("file-target");
    write_file(&out.path().join("plain"), b"x", 0o644, None);
    let req = request(
        &cluster,
        out.path().join("plain").to_str().unwrap(),
        json!([server_source(&[&dir("fine")], &hosts[..1], "root")]),
        &hosts[1..2],
        "root",
    );
    let (_, _, status) = transfer(&cluster, req).await?;
    assert_eq!(statuses(&status), vec![329], "{status}");

    // A source host offline: its targets end 202, the upload log says why.
    cluster.kill_agent(2)?;
    cluster
        .wait_offline(&cluster.agents[2].agent_id.clone(), Duration::from_secs(30))
        .await?;
    let out = scratch("offline");
    let req = request(
        &cluster,
        out.path().to_str().unwrap(),
        json!([server_source(&[&dir("fine")], &hosts[2..3], "root")]),
        &hosts[1..2],
        "root",
    );
    let (job, step, status) = transfer(&cluster, req).await?;
    assert_eq!(statuses(&status), vec![202], "{status}");
    let logs = file_logs(&cluster, job, step, hosts[1]).await?;
    assert!(
        logs.iter().any(|l| l["mode"] == 0
            && l["log_content"]
                .as_str()
                .unwrap_or_default()
                .contains("offline")),
        "{logs:?}"
    );
    Ok(())
}

/// `fleetrun ARGS` against the cluster, nothing from the caller's environment.
async fn fleetrun(cluster: &TestCluster, args: &[&str]) -> Result<(i32, String, String)> {
    let mut cmd = tokio::process::Command::new(fleetrun_tests::fleetrun_bin());
    for (key, _) in std::env::vars_os() {
        if key.to_string_lossy().starts_with("FLEETRUN_") {
            cmd.env_remove(&key);
        }
    }
    cmd.env("FLEETRUN_CLUSTER", cluster.dir().join("cluster.json"))
        .env("XDG_CONFIG_HOME", cluster.dir())
        .args(args)
        .stdin(std::process::Stdio::null())
        .kill_on_drop(true);
    let output = tokio::time::timeout(Duration::from_secs(120), cmd.output())
        .await
        .context("fleetrun did not finish")??;
    Ok((
        output.status.code().unwrap_or(-1),
        String::from_utf8_lossy(&output.stdout).into_owned(),
        String::from_utf8_lossy(&output.stderr).into_owned(),
    ))
}

#[tokio::test(flavor = "multi_thread")]
async fn the_command_line_pushes_local_files_and_copies_between_hosts() -> Result<()> {
    let cluster = start_cluster(2).await?;
    let hosts = cluster.host_ids();
    let local = scratch("cli-local");
    let file = local.path().join("pkg.bin");
    let content = pattern(1024 * 1024 + 5, 5);
    write_file(&file, &content, 0o644, None);
    let out = scratch("cli-out");
    let ids = format!("{},{}", hosts[0], hosts[1]);
    let (code, stdout, stderr) = fleetrun(
        &cluster,
        &[
            "push",
            file.to_str().unwrap(),
            "--to",
            out.path().to_str().unwrap(),
            "--host",
            &ids,
            "--limit",
            "50MB",
        ],
    )
    .await?;
    assert_eq!(code, 0, "{stdout}{stderr}");
    assert!(std::fs::read(out.path().join("pkg.bin"))? == content);
    assert!(stdout.contains("ok"), "per-host lines: {stdout}");

    // Host to host: a missing file fails with exit status 1 and says why per host.
    let copied = scratch("cli-cp");
    let source = format!("{}:{}", hosts[0], file.display());
    let missing = format!("{}:{}/nothing", hosts[0], local.path().display());
    let to = copied.path().to_str().unwrap();
    let host = hosts[1].to_string();
    let cp = |from: &str| {
        let args = ["cp", from, "--to", to, "--host", &host].map(str::to_owned);
        let cluster = &cluster;
        async move {
            let args: Vec<&str> = args.iter().map(String::as_str).collect();
            fleetrun(cluster, &args).await
        }
    };
    let (code, stdout, stderr) = cp(&source).await?;
    assert_eq!(code, 0, "{stdout}{stderr}");
    assert!(std::fs::read(copied.path().join("pkg.bin"))? == content);
    let (code, stdout, stderr) = cp(&missing).await?;
    assert_eq!(code, 1, "{stdout}{stderr}");
    assert!(stdout.contains("FAILED"), "{stdout}");
    Ok(())
}

/// An agent of protocol version 4 is neither sent a transfer nor asked to read one: as a
/// target it ends 399, as a source its paths fail 202, both saying to upgrade it; push_config_file
/// still reaches it (tested in `files`).
#[tokio::test(flavor = "multi_thread")]
async fn an_agent_of_protocol_version_4_is_sent_no_transfer_and_told_to_upgrade() -> Result<()> {
    let cluster = start_cluster(1).await?;
    let real = cluster.host_ids()[0];
    let (_endpoint, connection, old, beat) =
        crate::files::raw_agent(&cluster, "legacy-v4", "127.0.0.95", 4).await?;
    let src_dir = scratch("v4");
    write_file(&src_dir.path().join("f"), b"f", 0o644, None);
    let path = src_dir.path().join("f");
    let out = scratch("v4-out");
    let req = request(
        &cluster,
        out.path().to_str().unwrap(),
        json!([server_source(&[path.to_str().unwrap()], &[real], "root")]),
        &[old],
        "root",
    );
    let (_, _, status) = transfer(&cluster, req).await?;
    let result = &host_results(&status)[0];
    assert_eq!(result["status"], 399, "{result}");
    let opened = tokio::time::timeout(Duration::from_secs(1), connection.accept_bi()).await;
    assert!(opened.is_err(), "a version 4 agent is sent no stream");
    let req = request(
        &cluster,
        out.path().to_str().unwrap(),
        json!([server_source(&[path.to_str().unwrap()], &[old], "root")]),
        &[real],
        "root",
    );
    let (job, step, status) = transfer(&cluster, req).await?;
    assert_eq!(statuses(&status), vec![202], "{status}");
    let logs = file_logs(&cluster, job, step, real).await?;
    assert!(
        logs.iter().any(|l| l["mode"] == 0
            && l["log_content"]
                .as_str()
                .unwrap_or_default()
                .contains("upgrade")),
        "{logs:?}"
    );
    beat.abort();
    Ok(())
}

/// The attack: a source agent lies. It announces a file of 4 bytes and sends more, sends a chunk
/// whose SHA-256 is not its bytes', claims a whole-file SHA-256 that is not what it sent, and
/// names a file `../escape`. None of it lands on the target; each fails 202 with its reason.
#[tokio::test(flavor = "multi_thread")]
async fn a_lying_source_lands_nothing_forged() -> Result<()> {
    use fleetrun_net::{FramedRecv, send_frame};
    use fleetrun_proto::{
        Ending, SourceEnd, SourceEnding, SourceFile, TaskDown, TaskResult, TaskUp,
    };
    let cluster = start_cluster(1).await?;
    let target = cluster.host_ids()[0];
    let (_endpoint, connection, liar, beat) =
        crate::files::raw_agent(&cluster, "liar-source", "127.0.0.96", 5).await?;
    let out = scratch("lies");
    let req = request(
        &cluster,
        out.path().to_str().unwrap(),
        json!([server_source(
            &[
                "/srv/a",
                "/srv/b",
                "/srv/c",
                "/srv/d",
                "/srv/app.conf",
                "/srv/f",
                "/srv/g"
            ],
            &[liar],
            "root"
        )]),
        &[target],
        "root",
    );
    let accepted = cluster.client().call("fast_transfer_file", req).await?;
    let job = accepted["job_instance_id"].as_i64().context("job")?;
    let step = accepted["step_instance_id"].as_i64().context("step")?;
    let (mut send, recv) = tokio::time::timeout(Duration::from_secs(30), connection.accept_bi())
        .await
        .context("no source task within 30 s")??;
    let mut recv = FramedRecv::new(recv);
    let Some(TaskDown::Collect(request)) = recv.recv::<TaskDown>().await? else {
        panic!("expected a source task");
    };
    assert_eq!(request.paths.len(), 7);
    let sha = |data: &[u8]| {
        let mut hash = [0u8; 32];
        hash.copy_from_slice(ring::digest::digest(&ring::digest::SHA256, data).as_ref());
        hash
    };
    let file = |index: u32, relative: &str, size: u64| {
        TaskUp::SourceFile(SourceFile {
            index,
            path_index: index,
            path: format!("/srv/{index}"),
            relative: relative.into(),
            size,
            mode: 0o644,
        })
    };
    let end = |index: u32, sha256: [u8; 32], bytes: u64| {
        TaskUp::SourceFileEnd(SourceEnd {
            index: Some(index),
            path_index: index,
            ending: SourceEnding::Read,
            sha256,
            bytes,
            started_at_ms: 0,
            finished_at_ms: 0,
            message: "read".into(),
        })
    };
    let chunk = |data: &[u8], sha256: [u8; 32]| TaskUp::SourceChunk {
        sha256,
        data: data.to_vec(),
    };
    let long_name = "f".repeat(5000);
    // Each lie: the name the source reports, the size it announces (and then claims to have
    // read), a chunk's bytes, the bytes whose hash it names that chunk by, and the bytes whose
    // hash it gives for the whole file.
    type Lie<'a> = (&'a str, u64, &'a [u8], &'a [u8], &'a [u8]);
    let lies: [Lie; 6] = [
        // More than announced.
        ("a", 4, b"12345678", b"12345678", b"12345678"),
        // A chunk named by another chunk's hash.
        ("b", 4, b"evil", b"good", b"good"),
        // A whole-file hash that is not the bytes'.
        ("c", 4, b"abcd", b"abcd", b"wxyz"),
        // A name that climbs out.
        ("../escape", 1, b"x", b"x", b"x"),
        // Asked for /srv/app.conf, it names a file that would land elsewhere under the target.
        ("cron.d/evil", 4, b"evil", b"evil", b"evil"),
        // A name far past any path's length, for the controller to hold.
        (&long_name, 1, b"f", b"f", b"f"),
    ];
    let mut frames = vec![TaskUp::Started { started_at_ms: 0 }];
    for (index, (name, size, data, named, whole)) in (0u32..).zip(lies) {
        frames.push(file(index, name, size));
        frames.push(chunk(data, sha(named)));
        frames.push(end(index, sha(whole), size));
    }
    // Nothing at all for /srv/g.
    frames.push(TaskUp::Finished(TaskResult {
        ending: Ending::Exited { code: 0 },
        started_at_ms: 0,
        finished_at_ms: 0,
        output_bytes: 0,
        survivors: 0,
        message: None,
    }));
    for frame in frames {
        send_frame(&mut send, &frame).await?;
    }
    let status = cluster
        .client()
        .wait_job(&cluster.info.scope(), job, Duration::from_secs(60))
        .await?;
    assert_eq!(statuses(&status), vec![202], "{status}");
    assert_eq!(
        std::fs::read_dir(out.path())?.count(),
        0,
        "something landed"
    );
    assert!(!out.path().parent().unwrap().join("escape").exists());
    let logs = file_logs(&cluster, job, step, target).await?;
    let uploads: Vec<String> = logs
        .iter()
        .filter(|l| l["mode"] == 0)
        .map(|l| l["log_content"].as_str().unwrap_or_default().to_owned())
        .collect();
    assert_eq!(uploads.len(), 7, "{uploads:?}");
    for reason in [
        "more than the file's size",
        "does not hash",
        "SHA-256 the source reported",
        "not a plain relative name",
        "\"cron.d/evil\", which /srv/app.conf does not name",
        "a name of 5000 bytes",
        "reported nothing for this path",
    ] {
        assert!(
            uploads.iter().any(|l| l.contains(reason)),
            "{reason}: {uploads:?}"
        );
    }
    // The paths logged are the ones asked for, never the ones the source claimed.
    assert!(
        !uploads
            .iter()
            .any(|l| l.contains("/srv/4") || l.contains("fffff")),
        "{uploads:?}"
    );
    beat.abort();
    Ok(())
}

#[tokio::test(flavor = "multi_thread")]
async fn a_source_account_missing_on_its_host_fails_the_targets() -> Result<()> {
    let cluster = start_cluster(2).await?;
    let hosts = cluster.host_ids();
    let inventory = cluster.dir().join("inventory.toml");
    let mut text = std::fs::read_to_string(&inventory)?;
    text.push_str(
        "\n[[account]]\nid = 9\nalias = \"ghost\"\naccount = \"fleetrun-no-such-user\"\nscopes = [\"biz:2\"]\n",
    );
    std::fs::write(&inventory, text)?;
    cluster.client().fleetrun("reload_inventory").await?;
    let src = scratch("ghost-src");
    let out = scratch("ghost-out");
    let good = src.path().join("good.txt");
    write_file(&good, b"good", 0o644, None);
    let unread = src.path().join("unread.txt");
    write_file(&unread, b"unread", 0o644, None);
    let req = request(
        &cluster,
        out.path().to_str().unwrap(),
        json!([
            server_source(&[good.to_str().unwrap()], &[hosts[0]], "root"),
            server_source(&[unread.to_str().unwrap()], &[hosts[0]], "ghost"),
        ]),
        &[hosts[1]],
        "root",
    );
    let (job, step, status) = transfer(&cluster, req).await?;
    assert_eq!(statuses(&status), vec![202], "{status}");
    let logs = file_logs(&cluster, job, step, hosts[1]).await?;
    let failed: Vec<String> = logs
        .iter()
        .filter(|l| l["mode"] == 0 && l["status"] != 4)
        .map(|l| l["log_content"].as_str().unwrap_or_default().to_owned())
        .collect();
    assert!(
        failed
            .iter()
            .any(|l| l.contains("unread.txt") && l.contains("does not exist")),
        "{logs:?}"
    );
    // A file step is not retried as if it were a script.
    for operation in [2, 8] {
        let mut body = cluster.info.scope();
        body["job_instance_id"] = json!(job);
        body["step_instance_id"] = json!(step);
        body["operation_code"] = json!(operation);
        let reply = cluster
            .client()
            .call_raw("operate_step_instance", body)
            .await?;
        assert_refused(&reply, 1_241_011, "file step");
    }
    Ok(())
}

/// Every chunk file under the cluster's content store.
fn stored_chunks(dir: &Path) -> Vec<PathBuf> {
    let mut found = Vec::new();
    let Ok(entries) = std::fs::read_dir(dir) else {
        return found;
    };
    for entry in entries.flatten() {
        let path = entry.path();
        if path.is_dir() {
            found.extend(stored_chunks(&path));
        } else if path
            .parent()
            .and_then(Path::parent)
            .is_some_and(|p| p.ends_with("content/objects"))
        {
            found.push(path);
        }
    }
    found
}

#[tokio::test(flavor = "multi_thread")]
async fn a_chunk_the_controller_cannot_read_ends_the_target_as_a_task_error() -> Result<()> {
    let cluster = start_cluster(2).await?;
    let hosts = cluster.host_ids();
    let src_dir = scratch("rotten");
    let out = scratch("rotten-out");
    let size = 4 * 1024 * 1024;
    let src = src_dir.path().join("big");
    write_file(&src, &pattern(size, 21), 0o644, None);
    let mut req = request(
        &cluster,
        out.path().to_str().unwrap(),
        json!([server_source(&[src.to_str().unwrap()], &hosts[..1], "root")]),
        &hosts[1..],
        "root",
    );
    req["download_speed_limit"] = json!(1);
    let client = cluster.client();
    let accepted = client.call("fast_transfer_file", req).await?;
    let job = accepted["job_instance_id"].as_i64().context("job id")?;
    // Once the source is in the store, its chunks rot: the paced sender meets them.
    let deadline = Instant::now() + Duration::from_secs(60);
    loop {
        let chunks = stored_chunks(cluster.dir());
        if chunks.len() >= 4 {
            for chunk in chunks {
                std::fs::write(&chunk, b"rotten")?;
            }
            break;
        }
        assert!(
            Instant::now() < deadline,
            "the source never reached the store"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    let status = client
        .wait_job(&cluster.info.scope(), job, Duration::from_secs(120))
        .await?;
    assert_eq!(statuses(&status), vec![399], "{status}");
    let tag = host_results(&status)[0]["tag"].to_string();
    assert!(tag.contains("content store"), "{status}");
    assert!(!out.path().join("big").exists());
    Ok(())
}

#[tokio::test(flavor = "multi_thread")]
async fn controllers_in_a_cluster_refuse_local_uploads() -> Result<()> {
    let Some(cluster) = fleetrun_tests::start_shared_cluster(
        "controllers_in_a_cluster_refuse_local_uploads",
        1,
        2,
        fleetrun_testkit::cluster::ClusterOptions::default(),
    )
    .await?
    else {
        return Ok(());
    };
    for at in 0..2 {
        let mut body = cluster.info.scope();
        body["file_name_list"] = json!(["a.txt"]);
        let reply = cluster
            .client_at(at)
            .call_raw("generate_local_file_upload_url", body)
            .await?;
        assert_refused(&reply, 1_241_011, "[cluster]");
    }
    Ok(())
}

#[tokio::test(flavor = "multi_thread")]
async fn an_upload_whose_bytes_stop_arriving_is_dropped() -> Result<()> {
    use tokio::io::{AsyncReadExt as _, AsyncWriteExt as _};
    let mut cluster = start_cluster(1).await?;
    cluster.kill_controller()?;
    let mut config = std::fs::read_to_string(&cluster.controller_config)?;
    config.push_str("\n[limits]\nhttp_body_timeout_secs = 2\n");
    std::fs::write(&cluster.controller_config, config)?;
    cluster.start_controller().await?;
    let mut body = cluster.info.scope();
    body["file_name_list"] = json!(["stalled.bin"]);
    let data = cluster
        .client()
        .call("generate_local_file_upload_url", body)
        .await?;
    let url = data["url_map"]["stalled.bin"]["upload_url"]
        .as_str()
        .context("upload_url")?
        .to_owned();
    let rest = url.trim_start_matches("http://");
    let (addr, path) = rest.split_at(rest.find('/').context("path")?);
    let info = &cluster.info;
    let auth = json!({"bk_app_code": info.bk_app_code, "bk_app_secret": info.bk_app_secret, "bk_username": "alice"});
    let mut stream = tokio::net::TcpStream::connect(addr).await?;
    stream
        .write_all(
            format!(
                "PUT {path} HTTP/1.1\r\nHost: fleetrun\r\nConnection: close\r\n\
                 Content-Length: 1000000\r\nX-Bkapi-Authorization: {auth}\r\n\r\n"
            )
            .as_bytes(),
        )
        .await?;
    stream.write_all(&[7u8; 1000]).await?;
    // Nothing more is sent: the controller gives up on the body, not on its own time.
    let started = Instant::now();
    let mut reply = Vec::new();
    tokio::time::timeout(Duration::from_secs(30), stream.read_to_end(&mut reply))
        .await
        .context("the stalled upload was held past 30 s")??;
    let reply = String::from_utf8_lossy(&reply);
    assert!(reply.contains("no bytes of the upload arrived"), "{reply}");
    assert!(started.elapsed() < Duration::from_secs(20), "{reply}");
    Ok(())
}

/// The size of the partial file a fetch is writing in `dir`, if there is one.
fn partial_size(dir: &Path) -> Option<u64> {
    std::fs::read_dir(dir).ok()?.flatten().find_map(|entry| {
        let name = entry.file_name().to_string_lossy().into_owned();
        (name.starts_with(".fleetrun-") && name.ends_with(".part"))
            .then(|| entry.metadata().map(|m| m.len()).unwrap_or(0))
    })
}

/// A fetch of one 16 MiB file (`pattern(_, seed)`) from agent-1 to agent-2 as `account`, at
/// `mib_per_sec` MiB/s with a step timeout of `timeout` seconds: the source and target
/// directories (named after `name`), the file's content, and the request. The source is always
/// written 0640, whatever `account`: it is read as root, so its mode never limits the fetch.
fn throttled_fetch(
    cluster: &TestCluster,
    name: &str,
    seed: u8,
    account: &str,
    mib_per_sec: i64,
    timeout: i64,
) -> (tempfile::TempDir, tempfile::TempDir, Vec<u8>, Value) {
    let src_dir = scratch(&format!("{name}-src"));
    let out = scratch(&format!("{name}-out"));
    let content = pattern(16 * 1024 * 1024, seed);
    let src = src_dir.path().join("big.bin");
    write_file(&src, &content, 0o640, None);
    let mut req = request(
        cluster,
        out.path().to_str().unwrap(),
        json!([server_source(
            &[src.to_str().unwrap()],
            &[cluster.host_id("agent-1")],
            "root"
        )]),
        &[cluster.host_id("agent-2")],
        account,
    );
    req["download_speed_limit"] = json!(mib_per_sec);
    req["timeout"] = json!(timeout);
    (src_dir, out, content, req)
}

/// Submits the transfer `req` and waits, up to `within`, until `mib` MiB of the file being
/// fetched stand under its partial name in `out`: the job, its step, and the bytes written then.
async fn submit_until_partial(
    client: &fleetrun_tests::ApiClient,
    req: Value,
    out: &Path,
    mib: u64,
    within: Duration,
) -> Result<(i64, i64, u64)> {
    let accepted = client.call("fast_transfer_file", req).await?;
    let job = accepted["job_instance_id"].as_i64().context("job id")?;
    let step = accepted["step_instance_id"].as_i64().context("step id")?;
    let held = fleetrun_tests::eventually(
        within,
        &format!("{mib} MiB of the fetch written on the target"),
        || {
            let held = partial_size(out).filter(|n| *n >= mib * 1024 * 1024);
            async move { held }
        },
    )
    .await?;
    Ok((job, step, held))
}

/// Revokes agent-2, which closes its connection at once, and waits until the agent has been
/// refused on coming back; the agent's log.
async fn cut_agent_2(client: &fleetrun_tests::ApiClient, cluster: &TestCluster) -> Result<PathBuf> {
    let revoked = client
        .call("revoke_agent", json!({"agent_id": "agent-2"}))
        .await?;
    assert_eq!(revoked["connections_closed"], 1, "{revoked}");
    let agent_log = cluster.agents[1].log.clone();
    fleetrun_tests::eventually(Duration::from_secs(10), "the agent refused", || {
        let text = std::fs::read_to_string(&agent_log).unwrap_or_default();
        async move { text.contains("revoked by an operator").then_some(()) }
    })
    .await?;
    Ok(agent_log)
}

#[tokio::test(flavor = "multi_thread")]
async fn a_target_cut_mid_transfer_goes_on_from_the_chunks_it_holds() -> Result<()> {
    let uid = user_uid();
    let cluster = start_cluster(2).await?;
    let target = cluster.host_id("agent-2");
    let client = cluster.client();
    // 2 MiB/s: eight seconds of sending, long enough to cut the link in the middle.
    let (_src_dir, out, content, req) = throttled_fetch(&cluster, "cut", 21, "user", 2, 120);
    let size = content.len();
    // Six chunks written.
    let (job, step, held) =
        submit_until_partial(&client, req, out.path(), 6, Duration::from_secs(60)).await?;
    // The agent is refused until the revocation is lifted, then connects again.
    let agent_log = cut_agent_2(&client, &cluster).await?;
    // What the cut try wrote stays, under its partial name, while the agent is away.
    let kept = partial_size(out.path()).context("the partial file is kept after the cut")?;
    assert!(kept >= held, "{kept} bytes kept of {held} written");
    client
        .call("unrevoke_agent", json!({"agent_id": "agent-2"}))
        .await?;
    let status = client
        .wait_job(&cluster.info.scope(), job, Duration::from_secs(120))
        .await?;
    assert_eq!(statuses(&status), vec![9], "{status}");

    let landed = out.path().join("big.bin");
    let written = std::fs::read(&landed)?;
    assert!(written == content, "the file landed whole and right");
    let meta = std::fs::metadata(&landed)?;
    assert_eq!(meta.uid(), uid, "owned by the target account");
    assert_eq!(meta.mode() & 0o777, 0o640);
    assert!(
        leftovers(out.path()).is_empty(),
        "{:?}",
        leftovers(out.path())
    );
    let logs = file_logs(&cluster, job, step, target).await?;
    let download = logs
        .iter()
        .find(|l| l["mode"] == 1)
        .context("the download row")?;
    assert_eq!(download["status"], 4, "{download}");

    // The agent went on from what it held, checked on disk.
    let agent_text = std::fs::read_to_string(&agent_log)?;
    let resumed = agent_text
        .lines()
        .find(|l| l.contains("resuming a file from the chunks on disk"))
        .context("the agent resumed the file")?;
    let from: u64 = resumed
        .split("from_chunk=")
        .nth(1)
        .and_then(|rest| rest.split(|c: char| !c.is_ascii_digit()).next())
        .and_then(|n| n.parse().ok())
        .context("the chunk it resumed from")?;
    assert!(from >= 6, "resumed from chunk {from}: {resumed}");
    let controller_log = std::fs::read_to_string(&cluster.controller_log)?;
    assert!(
        controller_log.contains("transfer resumed on the agent's new connection"),
        "the controller sent the fetch again"
    );
    // Bytes were not sent twice beyond the chunks in flight at the cut (the agent's four
    // waiting chunks and the one being written): a restart would have sent the six or more
    // already on disk again.
    let line = controller_log
        .lines()
        .find(|l| l.contains("transfer ended") && l.contains(&format!("job={job}")))
        .context("the transfer's end in the controller's log")?;
    let relayed: u64 = line
        .split("controller_bytes_relayed=")
        .nth(1)
        .and_then(|rest| rest.split(|c: char| !c.is_ascii_digit()).next())
        .and_then(|n| n.parse().ok())
        .context("the bytes relayed")?;
    let in_flight = 5 * 1024 * 1024;
    assert!(
        relayed >= size as u64 && relayed <= size as u64 + in_flight,
        "{relayed} bytes relayed for a file of {size}"
    );
    Ok(())
}

#[tokio::test(flavor = "multi_thread")]
async fn a_target_cut_that_never_comes_back_ends_at_the_steps_timeout() -> Result<()> {
    let mut cluster = start_cluster(2).await?;
    // A short grace period, so that the bound is the step's timeout plus 2 s.
    cluster.kill_controller()?;
    let controller_config = cluster.controller_config.clone();
    let mut text = std::fs::read_to_string(&controller_config)?;
    text.push_str("\n[limits]\nagent_grace_secs = 2\n");
    std::fs::write(&controller_config, text)?;
    cluster.start_controller().await?;
    cluster
        .wait_online(
            &["agent-1".to_owned(), "agent-2".to_owned()],
            Duration::from_secs(30),
        )
        .await?;
    let client = cluster.client();
    let (_src_dir, out, _, req) = throttled_fetch(&cluster, "gone", 22, "root", 1, 10);
    let submitted = Instant::now();
    let (job, _, _) =
        submit_until_partial(&client, req, out.path(), 1, Duration::from_secs(30)).await?;
    let revoked = client
        .call("revoke_agent", json!({"agent_id": "agent-2"}))
        .await?;
    assert_eq!(revoked["connections_closed"], 1, "{revoked}");
    let status = client
        .wait_job(&cluster.info.scope(), job, Duration::from_secs(60))
        .await?;
    let elapsed = submitted.elapsed();
    let result = &host_results(&status)[0];
    assert_eq!(result["status"], 310, "{status}");
    let tag = result["tag"].to_string();
    assert!(tag.contains("did not come back"), "{tag}");
    // Not before the step's timeout, and not much after its bound (timeout plus grace).
    assert!(
        elapsed >= Duration::from_secs(10) && elapsed <= Duration::from_secs(35),
        "{elapsed:?}"
    );
    assert!(
        !out.path().join("big.bin").exists(),
        "nothing under the final name"
    );
    Ok(())
}

#[tokio::test(flavor = "multi_thread")]
async fn a_file_failed_before_a_cut_fails_the_host_after_the_resume() -> Result<()> {
    let cluster = start_cluster(2).await?;
    let source = cluster.host_id("agent-1");
    let target = cluster.host_id("agent-2");
    let client = cluster.client();
    let src_dir = scratch("failcut-src");
    let out = scratch("failcut-out");
    let small = src_dir.path().join("a.txt");
    write_file(&small, b"cannot land", 0o644, None);
    let big = src_dir.path().join("big.bin");
    let content = pattern(16 * 1024 * 1024, 23);
    write_file(&big, &content, 0o644, None);
    // The first file's final name is a directory that is not empty: it fails in the first try.
    std::fs::create_dir_all(out.path().join("a.txt").join("held"))?;
    let mut req = request(
        &cluster,
        out.path().to_str().unwrap(),
        json!([server_source(
            &[small.to_str().unwrap(), big.to_str().unwrap()],
            &[source],
            "root"
        )]),
        &[target],
        "root",
    );
    req["transfer_mode"] = json!(2);
    req["download_speed_limit"] = json!(2);
    req["timeout"] = json!(120);
    // Four chunks of the second file written.
    let (job, step, _) =
        submit_until_partial(&client, req, out.path(), 4, Duration::from_secs(60)).await?;
    cut_agent_2(&client, &cluster).await?;
    client
        .call("unrevoke_agent", json!({"agent_id": "agent-2"}))
        .await?;
    let status = client
        .wait_job(&cluster.info.scope(), job, Duration::from_secs(120))
        .await?;
    // The resumed fetch held the second file alone and placed it; the first still failed.
    assert_eq!(statuses(&status), vec![329], "{status}");
    let tag = host_results(&status)[0]["tag"].to_string();
    assert!(tag.contains("1 of 2 files placed"), "{tag}");
    assert!(tag.contains("first failure"), "{tag}");
    assert!(tag.contains("is a directory"), "{tag}");
    assert!(std::fs::read(out.path().join("big.bin"))? == content);
    let controller_log = std::fs::read_to_string(&cluster.controller_log)?;
    assert!(
        controller_log.contains("transfer resumed on the agent's new connection"),
        "the controller sent the fetch again"
    );
    let logs = file_logs(&cluster, job, step, target).await?;
    let downloads: Vec<&Value> = logs.iter().filter(|l| l["mode"] == 1).collect();
    assert_eq!(downloads.len(), 2, "{logs:?}");
    let failed = downloads.iter().filter(|l| l["status"] == 5).count();
    let placed = downloads.iter().filter(|l| l["status"] == 4).count();
    assert_eq!((failed, placed), (1, 1), "{downloads:?}");
    Ok(())
}

#[tokio::test(flavor = "multi_thread")]
async fn a_target_terminated_while_its_agent_is_away_ends_403_without_waiting() -> Result<()> {
    let cluster = start_cluster(2).await?;
    let client = cluster.client();
    let (_src_dir, out, _, req) = throttled_fetch(&cluster, "away", 24, "root", 1, 600);
    let (job, _, _) =
        submit_until_partial(&client, req, out.path(), 1, Duration::from_secs(60)).await?;
    cut_agent_2(&client, &cluster).await?;
    let mut body = cluster.info.scope();
    body["job_instance_id"] = json!(job);
    body["operation_code"] = json!(1);
    let asked = Instant::now();
    let reply = client.call("operate_job_instance", body).await?;
    assert_eq!(reply["job_instance_id"], job, "{reply}");
    // Not the step's 600 s timeout: the wait for the agent ends with the termination.
    let status = client
        .wait_job(&cluster.info.scope(), job, Duration::from_secs(30))
        .await?;
    assert!(
        asked.elapsed() < Duration::from_secs(30),
        "{:?}",
        asked.elapsed()
    );
    let result = &host_results(&status)[0];
    assert_eq!(result["status"], 403, "{status}");
    let tag = result["tag"].to_string();
    assert!(
        tag.contains("terminated before the agent came back"),
        "{tag}"
    );
    assert!(
        !out.path().join("big.bin").exists(),
        "nothing under the final name"
    );
    client
        .call("unrevoke_agent", json!({"agent_id": "agent-2"}))
        .await?;
    Ok(())
}

#[tokio::test(flavor = "multi_thread")]
async fn an_agent_back_from_a_cut_speaking_a_protocol_without_transfers_is_told_to_upgrade()
-> Result<()> {
    use fleetrun_net::FramedRecv;
    use fleetrun_proto::TaskDown;
    let cluster = start_cluster(1).await?;
    let real = cluster.host_ids()[0];
    let (_endpoint, connection, target, beat) =
        crate::files::raw_agent(&cluster, "cut-then-v4", "127.0.0.96", 6).await?;
    let src_dir = scratch("back-v4");
    let path = src_dir.path().join("f");
    write_file(&path, b"f", 0o644, None);
    let out = scratch("back-v4-out");
    let mut req = request(
        &cluster,
        out.path().to_str().unwrap(),
        json!([server_source(&[path.to_str().unwrap()], &[real], "root")]),
        &[target],
        "root",
    );
    req["timeout"] = json!(60);
    let accepted = cluster.client().call("fast_transfer_file", req).await?;
    let job = accepted["job_instance_id"].as_i64().context("job id")?;
    // The target is sent its fetch, and its connection is cut before it answers.
    let (_send, recv) = tokio::time::timeout(Duration::from_secs(30), connection.accept_bi())
        .await
        .context("no fetch sent")??;
    let first = FramedRecv::new(recv).recv::<TaskDown>().await?;
    assert!(matches!(first, Some(TaskDown::Fetch(_))), "{first:?}");
    beat.abort();
    connection.close(0u32.into(), b"cut");
    // It comes back speaking version 4, which has no transfers: no Fetch is sent to it.
    let (_endpoint, again, back, beat) =
        crate::files::raw_agent(&cluster, "cut-then-v4", "127.0.0.96", 4).await?;
    assert_eq!(back, target);
    let status = cluster
        .client()
        .wait_job(&cluster.info.scope(), job, Duration::from_secs(60))
        .await?;
    let result = &host_results(&status)[0];
    assert_eq!(result["status"], 310, "{status}");
    let tag = result["tag"].to_string();
    assert!(
        tag.contains("protocol version 4") && tag.contains("upgrade"),
        "{tag}"
    );
    let opened = tokio::time::timeout(Duration::from_secs(1), again.accept_bi()).await;
    assert!(opened.is_err(), "the version 4 agent is sent no stream");
    beat.abort();
    Ok(())
}
