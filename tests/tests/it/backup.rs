//! Backup and restore with the real binary: a backup taken while the controller runs, the
//! database and parameter key wiped, the backup restored, and the old job's logs read back
//! identical; a damaged backup and a restore under a running controller are refused.

use std::{path::Path, process::Command, time::Duration};

use anyhow::{Context, Result};
use fleetrun_tests::{TestCluster, b64, start_cluster};
use serde_json::json;

fn controller_command(
    cluster: &TestCluster,
    args: &[&str],
    path: &Path,
) -> Result<std::process::Output> {
    Command::new(cluster.bin_dir.join("fleetrun-controller"))
        .arg("--config")
        .arg(&cluster.controller_config)
        .args(args)
        .arg(path)
        .output()
        .context("running fleetrun-controller")
}

#[tokio::test(flavor = "multi_thread")]
async fn backup_wipe_restore_reads_the_old_logs_back_identical() -> Result<()> {
    // The database is edited (or copied) as a file: PostgreSQL is backed up with its own tools.
    if !fleetrun_tests::sqlite_only("backup_wipe_restore_reads_the_old_logs_back_identical") {
        return Ok(());
    }
    let mut cluster = start_cluster(1).await?;
    let host = cluster.host_id("agent-1");
    let script = "printf 'line one\\n'; printf 'arg=%s\\n' \"$1\"; head -c 3000 /dev/zero | tr '\\0' x; echo";
    let (job, step, status) = cluster
        .run_job(cluster.script_request(
            script,
            &[host],
            json!({"script_param": b64("s3cret-param"), "is_param_sensitive": 1}),
        ))
        .await?;
    assert_eq!(status["finished"], true);
    let before = cluster.logs(job, step).await?;
    assert!(before[0].1.contains("arg=s3cret-param"), "{before:?}");

    // Online: the controller keeps running (and answering) while the copy is taken.
    let backup_dir = cluster.dir().join("backup-1");
    let out = controller_command(&cluster, &["backup"], &backup_dir)?;
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    for name in [
        "controller.db",
        "param.key",
        "controller.toml",
        "MANIFEST.json",
        "tls-key.pem",
    ] {
        let meta = std::fs::metadata(backup_dir.join(name)).with_context(|| name.to_owned())?;
        assert_eq!(
            std::os::unix::fs::PermissionsExt::mode(&meta.permissions()) & 0o077,
            0,
            "{name} is private"
        );
    }
    // Never into a directory that holds something.
    let again = controller_command(&cluster, &["backup"], &backup_dir)?;
    assert!(!again.status.success());

    // Refused while the controller runs.
    let running = controller_command(&cluster, &["restore"], &backup_dir)?;
    assert!(!running.status.success());
    assert!(
        String::from_utf8_lossy(&running.stderr).contains("stop the controller"),
        "{}",
        String::from_utf8_lossy(&running.stderr)
    );

    // A job after the backup: gone after the restore.
    let (later, _, _) = cluster
        .run_job(cluster.script_request("echo later", &[host], json!({})))
        .await?;

    cluster.stop_controller(Duration::from_secs(10))?;
    for name in [
        "controller.db",
        "controller.db-wal",
        "controller.db-shm",
        "param.key",
    ] {
        let _ = std::fs::remove_file(cluster.dir().join(name));
    }

    // A damaged copy is refused before anything is touched.
    let damaged = cluster.dir().join("backup-damaged");
    std::fs::create_dir(&damaged)?;
    for entry in std::fs::read_dir(&backup_dir)? {
        let entry = entry?;
        std::fs::copy(entry.path(), damaged.join(entry.file_name()))?;
    }
    let mut db = std::fs::read(damaged.join("controller.db"))?;
    let last = db.len() - 1;
    db[last] ^= 0xff;
    std::fs::write(damaged.join("controller.db"), db)?;
    let refused = controller_command(&cluster, &["restore"], &damaged)?;
    assert!(!refused.status.success());
    assert!(
        String::from_utf8_lossy(&refused.stderr).contains("damaged"),
        "{}",
        String::from_utf8_lossy(&refused.stderr)
    );
    assert!(!cluster.dir().join("controller.db").exists());

    let restored = controller_command(&cluster, &["restore"], &backup_dir)?;
    assert!(
        restored.status.success(),
        "{}",
        String::from_utf8_lossy(&restored.stderr)
    );

    cluster.start_controller().await?;
    cluster
        .wait_online(&["agent-1".to_owned()], Duration::from_secs(30))
        .await?;
    let after = cluster.logs(job, step).await?;
    assert_eq!(after, before, "the old job's logs read back identical");
    let missing = cluster
        .client()
        .call_raw(
            "get_job_instance_status",
            json!({"bk_scope_type": "biz", "bk_scope_id": "2", "job_instance_id": later}),
        )
        .await?;
    assert_eq!(missing["code"], 1_244_006, "{missing}");
    // The restored controller runs new jobs.
    let (_, _, status) = cluster
        .run_job(cluster.script_request("echo after-restore", &[host], json!({})))
        .await?;
    assert_eq!(status["job_instance"]["status"], 3, "{status}");
    Ok(())
}
