//! A job's sensitive parameter reaches the script intact but never appears on a command line,
//! which every local account can read with `ps`.

use std::{
    path::Path,
    process::Command,
    time::{Duration, SystemTime, UNIX_EPOCH},
};

use anyhow::{Context, Result, ensure};
use fleetrun_tests::{b64, cluster, eventually, host_results, start_cluster};
use serde_json::json;

/// Every process's command line, as root reads them from /proc.
fn all_command_lines() -> String {
    let mut all = String::new();
    for entry in std::fs::read_dir("/proc").unwrap() {
        let path = entry.unwrap().path();
        if let Ok(cmdline) = std::fs::read(path.join("cmdline")) {
            all.push_str(&String::from_utf8_lossy(&cmdline).replace('\0', " "));
            all.push('\n');
        }
    }
    all
}

/// What another local account sees with `ps`.
fn ps_as(user: &str) -> Result<String> {
    let out = Command::new("runuser")
        .args(["-u", user, "--", "ps", "-eo", "args"])
        .output()?;
    ensure!(out.status.success(), "ps failed: {out:?}");
    Ok(String::from_utf8(out.stdout)?)
}

#[tokio::test(flavor = "multi_thread")]
async fn a_sensitive_parameter_is_in_no_command_line() -> Result<()> {
    ensure!(
        cluster::ensure_test_user()?,
        "{} is needed",
        cluster::TEST_USER
    );
    let cluster = start_cluster(1).await?;
    let hosts = cluster.host_ids();
    let nanos = SystemTime::now().duration_since(UNIX_EPOCH)?.as_nanos();
    let secret = format!("s3cret-{}-{nanos}", std::process::id());
    let param = format!("'{secret} one' \"it's\" ''");
    let expected = format!("[{secret} one]\n[it's]\n[]\n");
    // Each script prints its arguments, says it is running, and waits to be let go.
    let ready = cluster.dir().join("ready");
    let ready = ready.display();
    let scripts = [
        (
            1,
            format!(
                "printf '[%s]\\n' \"$@\"\ntouch {ready}\nwhile [ -e {ready} ]; do sleep 0.05; done\n"
            ),
        ),
        (
            3,
            format!(
                "$| = 1; print \"[$_]\\n\" for @ARGV;\nopen(my $f, '>', '{ready}'); close($f);\nselect(undef, undef, undef, 0.05) while -e '{ready}';\n"
            ),
        ),
        (
            4,
            format!(
                "import os, sys, time\nfor a in sys.argv[1:]:\n    print(f\"[{{a}}]\", flush=True)\nopen('{ready}', 'w').close()\nwhile os.path.exists('{ready}'):\n    time.sleep(0.05)\n"
            ),
        ),
    ];
    let client = cluster.client();
    for (language, script) in &scripts {
        let request = cluster.script_request(
            script,
            &hosts,
            json!({"script_language": language, "script_param": b64(&param), "is_param_sensitive": 1}),
        );
        let accepted = client.call("fast_execute_script", request.clone()).await?;
        let job = accepted["job_instance_id"].as_i64().context("job id")?;
        let step = accepted["step_instance_id"].as_i64().context("step id")?;
        let ready_path = cluster.dir().join("ready");
        eventually(Duration::from_secs(30), "the script is running", || async {
            ready_path.exists().then_some(())
        })
        .await?;
        let seen = format!("{}{}", all_command_lines(), ps_as(cluster::TEST_USER)?);
        std::fs::remove_file(&ready_path)?;
        let leaks: Vec<&str> = seen.lines().filter(|l| l.contains(&secret)).collect();
        assert!(
            leaks.is_empty(),
            "language {language}: the parameter is visible to every account:\n{}",
            leaks.join("\n")
        );
        let scope = json!({"bk_scope_type": request["bk_scope_type"], "bk_scope_id": request["bk_scope_id"]});
        let status = client
            .wait_job(&scope, job, Duration::from_secs(60))
            .await?;
        let results = host_results(&status);
        assert_eq!(results[0]["status"], 9, "language {language}: {status}");
        let logs = cluster.logs(job, step).await?;
        assert_eq!(logs[0].1, expected, "language {language}");
    }
    assert!(!Path::new(&ready.to_string()).exists());
    Ok(())
}
