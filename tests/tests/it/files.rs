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
use fleetrun_net::{FramedRecv, send_frame};
use fleetrun_proto::{
    ControlUp, Ending, FileEnding, FileReport, Hello, HelloReply, OsType, TaskDown, TaskResult,
    TaskUp,
};
use fleetrun_tests::{TestCluster, b64, host_results, pki, start_cluster};
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
    cluster
        .run_to_end("push_config_file", request, Duration::from_secs(60))
        .await
}

/// The refusal of a request: (code, message).
async fn refused(cluster: &TestCluster, request: Value) -> Result<(i64, String)> {
    cluster.refused("push_config_file", request).await
}

/// One host's file logs, from get_job_instance_ip_log.
async fn file_logs(cluster: &TestCluster, job: i64, step: i64, host: i64) -> Result<Value> {
    cluster.file_logs(job, step, host).await
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
    assert_agents_still_root(&cluster).await
}

#[tokio::test(flavor = "multi_thread")]
async fn names_and_paths_that_climb_out_and_oversized_contents_are_refused_naming_the_field()
-> Result<()> {
    let cluster = start_cluster(1).await?;
    // Control characters would forge lines in the file logs.
    for name in [
        "../escape",
        "a/b",
        "..",
        ".",
        "",
        "a\nb",
        "a\rb",
        "\u{1b}[2J",
        "a\u{7f}",
    ] {
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
    for dir in [
        "tmp/x",
        "/tmp/../etc",
        "/tmp/./x",
        "",
        "/tmp/a\nb",
        "/tmp/\u{7f}",
    ] {
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
    // No silent pass: the tests run as root (they create accounts), which can mount.
    assert!(
        mounted,
        "cannot mount a 64 KiB tmpfs on {}: this test needs root and mount(8)",
        dir.display()
    );
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

/// After pushes as the account, the agent is still root, alive and serving: a root script on
/// every host prints uid 0.
async fn assert_agents_still_root(cluster: &TestCluster) -> Result<()> {
    let request = cluster.script_request("id -u", &cluster.host_ids(), json!({}));
    let (job, step, status) = cluster.run_job(request).await?;
    for result in host_results(&status) {
        assert_eq!(result["status"], 9, "{result}");
    }
    for (host, log) in cluster.logs(job, step).await? {
        assert_eq!(log, "0\n", "host {host}");
    }
    Ok(())
}

/// The attack: while the agent writes files as the account, a process of the account tries to
/// signal every thread of the agent (`kill -0`, the bare permission check; with the right to it,
/// SIGSTOP or SIGKILL would freeze or kill the agent). The thread that writes keeps root's
/// user ids, so every try is refused.
#[tokio::test(flavor = "multi_thread")]
async fn the_account_cannot_signal_the_agent_while_a_push_writes_as_it() -> Result<()> {
    ensure_test_user();
    let cluster = start_cluster(1).await?;
    let base_dir = scratch("signal");
    let base = base_dir.path().to_owned();
    std::fs::set_permissions(&base, std::fs::Permissions::from_mode(0o777))?;
    let stop = base.join("stop");
    let started = base.join("started");
    // The script's parent is the agent.
    let probe = format!(
        "agent=$PPID; cat /proc/$agent/comm; touch {started}; tries=0; \
         while [ ! -e {stop} ]; do \
           for t in /proc/$agent/task/*; do \
             tid=${{t##*/}}; tries=$((tries+1)); \
             if kill -0 \"$tid\" 2>/dev/null; then echo \"signalled thread $tid\"; fi; \
           done; \
         done; echo \"tries $tries\"",
        started = started.display(),
        stop = stop.display()
    );
    let mut request = cluster.script_request(&probe, &cluster.host_ids(), json!({}));
    request["account_alias"] = json!("user");
    let client = cluster.client();
    let accepted = client.call("fast_execute_script", request).await?;
    let probe_job = accepted["job_instance_id"].as_i64().context("job id")?;
    let probe_step = accepted["step_instance_id"].as_i64().context("step id")?;
    fleetrun_tests::eventually(Duration::from_secs(30), "the probe to start", || async {
        started.exists().then_some(())
    })
    .await?;
    let target = base.join("out");
    std::fs::create_dir(&target)?;
    std::fs::set_permissions(&target, std::fs::Permissions::from_mode(0o777))?;
    let content = base64::Engine::encode(
        &base64::engine::general_purpose::STANDARD,
        vec![b'q'; 1024 * 1024],
    );
    for round in 0..3 {
        let files: Vec<Value> = (0..7)
            .map(|i| json!({"file_name": format!("f{round}-{i}"), "content": content}))
            .collect();
        let request = push_request(&cluster, target.to_str().unwrap(), json!(files), "user");
        let (_, _, status) = push(&cluster, request).await?;
        assert_eq!(host_results(&status)[0]["status"], 9, "{status}");
    }
    std::fs::write(&stop, b"")?;
    let status = client
        .wait_job(&cluster.info.scope(), probe_job, Duration::from_secs(60))
        .await?;
    assert_eq!(host_results(&status)[0]["status"], 9, "{status}");
    let log = &cluster.logs(probe_job, probe_step).await?[0].1;
    assert!(
        log.starts_with("fleetrun-agent\n") && log.contains("tries "),
        "{log}"
    );
    assert!(
        !log.contains("signalled"),
        "the account could signal the agent: {log}"
    );
    assert_agents_still_root(&cluster).await
}

/// A raw agent with its own certificate, connected from `ip`, welcomed at `protocol_version`,
/// heartbeating; returns its connection and host id.
pub(crate) async fn raw_agent(
    cluster: &TestCluster,
    agent_id: &str,
    ip: &str,
    protocol_version: u32,
) -> Result<(
    quinn::Endpoint,
    quinn::Connection,
    i64,
    tokio::task::JoinHandle<()>,
)> {
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
    let (mut control, recv) = connection.open_bi().await?;
    let hello = Hello {
        protocol_version,
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
        Some(
            HelloReply::Negotiated {
                protocol_version: negotiated,
                bk_host_id,
                ..
            }
            | HelloReply::Joined {
                protocol_version: negotiated,
                bk_host_id,
                ..
            },
        ) => {
            assert_eq!(negotiated, protocol_version);
            bk_host_id
        }
        other => panic!("expected a negotiated welcome, got {other:?}"),
    };
    // Version 2 on: the held tasks first, none.
    send_frame(&mut control, &ControlUp::Holding { tasks: Vec::new() }).await?;
    let beat = tokio::spawn(async move {
        let _control_recv = control_recv;
        loop {
            let beat = ControlUp::Heartbeat { running_tasks: 0 };
            if send_frame(&mut control, &beat).await.is_err() {
                return;
            }
            tokio::time::sleep(Duration::from_millis(500)).await;
        }
    });
    // The controller takes the agent in after its hello and held tasks: a job sent before
    // that would find the host offline.
    let deadline = tokio::time::Instant::now() + Duration::from_secs(20);
    loop {
        let hosts = cluster
            .client()
            .call("list_hosts", cluster.info.scope())
            .await?;
        let online = hosts.as_array().is_some_and(|hosts| {
            hosts
                .iter()
                .any(|h| h["bk_host_id"] == bk_host_id && h["online"] == true)
        });
        if online {
            break;
        }
        anyhow::ensure!(
            tokio::time::Instant::now() < deadline,
            "agent {agent_id} is not online"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    Ok((endpoint, connection, bk_host_id, beat))
}

async fn push_to(cluster: &TestCluster, host: i64, files: Value) -> Result<(i64, i64)> {
    let mut request = push_request(cluster, "/tmp/fleetrun-raw-agent", files, "root");
    request["target_server"] = json!({ "host_id_list": [host] });
    let accepted = cluster.client().call("push_config_file", request).await?;
    Ok((
        accepted["job_instance_id"].as_i64().context("job id")?,
        accepted["step_instance_id"].as_i64().context("step id")?,
    ))
}

/// An agent of protocol version 3 knows no file task: it is sent nothing and its host ends 399.
#[tokio::test(flavor = "multi_thread")]
async fn an_agent_of_protocol_version_3_is_sent_nothing_and_ends_399() -> Result<()> {
    let cluster = start_cluster(0).await?;
    let (_endpoint, connection, host, beat) =
        raw_agent(&cluster, "legacy-v3", "127.0.0.93", 3).await?;
    let (job, _) = push_to(
        &cluster,
        host,
        json!([{"file_name": "a", "content": b64("x")}]),
    )
    .await?;
    let status = cluster
        .client()
        .wait_job(&cluster.info.scope(), job, Duration::from_secs(30))
        .await?;
    let result = &host_results(&status)[0];
    assert_eq!(result["status"], 399, "{result}");
    let opened = tokio::time::timeout(Duration::from_secs(1), connection.accept_bi()).await;
    assert!(opened.is_err(), "a version 3 agent is sent no stream");
    beat.abort();
    Ok(())
}

/// The attack: an agent reports a file the step does not have, one file twice, times at
/// `i64::MIN` and `i64::MAX`, more bytes than the file holds, and NUL bytes in its messages
/// (which PostgreSQL refuses in text). The controller neither panics nor stalls its store: the
/// host ends, the logs are stored with checked numbers, and the next job is recorded.
#[tokio::test(flavor = "multi_thread")]
async fn a_lying_agent_cannot_break_the_file_logs_or_the_store() -> Result<()> {
    let cluster = start_cluster(1).await?;
    let (_endpoint, connection, host, beat) = raw_agent(&cluster, "liar", "127.0.0.94", 4).await?;
    let (job, step) = push_to(
        &cluster,
        host,
        json!([
            {"file_name": "a", "content": b64("four")},
            {"file_name": "b", "content": b64("xy")},
        ]),
    )
    .await?;
    let (mut send, recv) = tokio::time::timeout(Duration::from_secs(30), connection.accept_bi())
        .await
        .context("no file task within 30 s")??;
    let mut recv = FramedRecv::new(recv);
    let Some(TaskDown::Place(request)) = recv.recv::<TaskDown>().await? else {
        panic!("expected a file task");
    };
    assert_eq!(request.files.len(), 2);
    send_frame(
        &mut send,
        &TaskUp::Started {
            started_at_ms: i64::MIN,
        },
    )
    .await?;
    let report = |index, bytes, started_at_ms, finished_at_ms, message: &str| {
        TaskUp::FilePlaced(FileReport {
            index,
            ending: FileEnding::Placed,
            bytes,
            started_at_ms,
            finished_at_ms,
            message: message.into(),
        })
    };
    for up in [
        report(7, 1, 0, 0, "no such file"),
        report(u32::MAX, 1, 0, 0, "no such file"),
        report(0, u64::MAX, i64::MIN, i64::MAX, "bad\0bytes"),
        report(0, 3, 0, 0, "repeated"),
        report(1, 1 << 62, i64::MAX, i64::MIN, "\0"),
    ] {
        send_frame(&mut send, &up).await?;
    }
    let result = TaskResult {
        ending: Ending::Exited { code: 0 },
        started_at_ms: i64::MIN,
        finished_at_ms: i64::MAX,
        output_bytes: u64::MAX,
        survivors: u32::MAX,
        message: Some("done\0with a NUL".into()),
    };
    send_frame(&mut send, &TaskUp::Finished(result)).await?;
    let status = cluster
        .client()
        .wait_job(&cluster.info.scope(), job, Duration::from_secs(30))
        .await?;
    assert_eq!(host_results(&status)[0]["status"], 9, "{status}");
    let logs = file_logs(&cluster, job, step, host).await?;
    let logs = logs.as_array().context("file_logs")?;
    assert_eq!(logs.len(), 2, "{logs:?}");
    assert_eq!(
        logs[0]["size"], "4.0 Bytes",
        "bounded by the file: {}",
        logs[0]
    );
    assert_eq!(
        logs[1]["size"], "2.0 Bytes",
        "bounded by the file: {}",
        logs[1]
    );
    for log in logs {
        let text = log["log_content"].as_str().unwrap();
        assert!(!text.contains('\0'), "{text:?}");
        assert!(!text.contains("repeated"), "a repeat is dropped: {text:?}");
    }
    assert!(
        logs[0]["log_content"]
            .as_str()
            .unwrap()
            .contains("bad\u{FFFD}bytes")
    );
    beat.abort();
    // The store still takes writes (a NUL in a text column would fail every group commit on
    // PostgreSQL from then on): a script on the real agent is recorded to its end.
    assert_agents_still_root(&cluster).await
}

/// A host's own limits hold for file tasks as for scripts: an account outside `limits.accounts`
/// is refused before anything is written, and a push waits for one of the agent's
/// `max_concurrent_tasks` slots; it times out (303) while a script holds the only one, writing
/// nothing, and runs once the slot is free.
#[tokio::test(flavor = "multi_thread")]
async fn local_limits_and_task_slots_bind_file_tasks() -> Result<()> {
    ensure_test_user();
    let mut cluster = start_cluster(1).await?;
    let agent_id = cluster.agents[0].agent_id.clone();
    cluster.kill_agent(0)?;
    cluster
        .wait_offline(&agent_id, Duration::from_secs(20))
        .await?;
    let config = cluster.agents[0].config.clone();
    let text = std::fs::read_to_string(&config)?;
    std::fs::write(
        &config,
        format!(
            "max_concurrent_tasks = 1\n{text}\n[limits]\nallow_root = false\naccounts = [\"{TEST_USER}\"]\n"
        ),
    )?;
    cluster.start_agent(0)?;
    cluster
        .wait_online(std::slice::from_ref(&agent_id), Duration::from_secs(30))
        .await?;
    let base_dir = scratch("limits");
    let base = base_dir.path().to_owned();
    std::fs::set_permissions(&base, std::fs::Permissions::from_mode(0o777))?;
    let files = json!([{"file_name": "x.conf", "content": b64("x")}]);

    let request = push_request(&cluster, base.to_str().unwrap(), files.clone(), "root");
    let (job, step, status) = push(&cluster, request).await?;
    assert_eq!(host_results(&status)[0]["status"], 399, "{status}");
    assert!(!base.join("x.conf").exists(), "nothing written as root");
    let logs = file_logs(&cluster, job, step, cluster.host_ids()[0]).await?;
    assert!(
        logs[0]["log_content"]
            .as_str()
            .unwrap()
            .contains("limits.accounts"),
        "{logs}"
    );

    // A script as the account holds the one slot until told to stop.
    let started = base.join("started");
    let stop = base.join("stop");
    let script = format!(
        "touch {}; while [ ! -e {} ]; do sleep 0.1; done",
        started.display(),
        stop.display()
    );
    let mut request = cluster.script_request(&script, &cluster.host_ids(), json!({}));
    request["account_alias"] = json!("user");
    let client = cluster.client();
    let accepted = client.call("fast_execute_script", request).await?;
    let holder = accepted["job_instance_id"].as_i64().context("job id")?;
    fleetrun_tests::eventually(Duration::from_secs(30), "the script to start", || async {
        started.exists().then_some(())
    })
    .await?;
    let mut request = push_request(&cluster, base.to_str().unwrap(), files.clone(), "user");
    request["timeout"] = json!(1);
    let (_, _, status) = push(&cluster, request).await?;
    assert_eq!(
        host_results(&status)[0]["status"],
        303,
        "the push waits for the slot and times out: {status}"
    );
    assert!(
        !base.join("x.conf").exists(),
        "nothing written without a slot"
    );
    std::fs::write(&stop, b"")?;
    let status = client
        .wait_job(&cluster.info.scope(), holder, Duration::from_secs(60))
        .await?;
    assert_eq!(host_results(&status)[0]["status"], 9, "{status}");
    let request = push_request(&cluster, base.to_str().unwrap(), files, "user");
    let (_, _, status) = push(&cluster, request).await?;
    assert_eq!(host_results(&status)[0]["status"], 9, "{status}");
    assert_eq!(std::fs::read_to_string(base.join("x.conf"))?, "x");
    Ok(())
}
