//! Local limits: a host's owner restricts what any controller can make its agent do. The real
//! agent, with `[limits]` in its configuration, refuses a task as root and a language it does
//! not allow; the script never runs, and the host ends with status 399 and a log line that names
//! the limit. The same job runs on an agent without limits.

use std::time::Duration;

use anyhow::{Context, Result, ensure};
use fleetrun_tests::{cluster, host_results, start_cluster};
use serde_json::{Value, json};

/// bk-job's "agent task error": the agent did not run the task.
const AGENT_TASK_ERROR: i64 = 399;
const SUCCESS: i64 = 9;

fn status_of(status: &Value, host: i64) -> Option<i64> {
    host_results(status)
        .iter()
        .find(|r| r["bk_host_id"] == json!(host))
        .and_then(|r| r["status"].as_i64())
}

#[tokio::test(flavor = "multi_thread")]
async fn an_agent_with_local_limits_refuses_root_and_other_languages_with_the_reason() -> Result<()>
{
    ensure!(
        cluster::ensure_test_user()?,
        "{} is needed",
        cluster::TEST_USER
    );
    let mut cluster = start_cluster(2).await?;
    let limited = cluster.agents[0].agent_id.clone();
    let free = cluster.agents[1].agent_id.clone();
    // The host's owner sets limits and restarts the agent.
    cluster.kill_agent(0)?;
    cluster
        .wait_offline(&limited, Duration::from_secs(20))
        .await?;
    let config = cluster.agents[0].config.clone();
    let mut text = std::fs::read_to_string(&config)?;
    text.push_str("\n[limits]\nallow_root = false\nlanguages = [\"shell\", \"perl\"]\n");
    std::fs::write(&config, text)?;
    cluster.start_agent(0)?;
    cluster
        .wait_online(&[limited.clone(), free.clone()], Duration::from_secs(30))
        .await?;
    let (limited_host, free_host) = (cluster.host_id(&limited), cluster.host_id(&free));

    // As root: refused on the limited host before anything runs, run on the other.
    let marker = cluster.dir().join("ran-as-root");
    let script = format!(
        "echo ran as $(id -un); echo \"$(hostname)\" >> {}",
        marker.display()
    );
    let request = cluster.script_request(&script, &[limited_host, free_host], json!({}));
    let (job, step, status) = cluster.run_job(request).await?;
    assert_eq!(
        status_of(&status, limited_host),
        Some(AGENT_TASK_ERROR),
        "{status:#}"
    );
    assert_eq!(status_of(&status, free_host), Some(SUCCESS), "{status:#}");
    let logs = cluster.logs(job, step).await?;
    let log_of = |logs: &[(i64, String)], host: i64| -> Result<String> {
        logs.iter()
            .find(|(h, _)| *h == host)
            .map(|(_, log)| log.clone())
            .context("no log for the host")
    };
    let refused = log_of(&logs, limited_host)?;
    assert!(
        refused.contains("refused by this host's local limits")
            && refused.contains("\"root\" is root (uid 0)")
            && refused.contains("limits.allow_root = false"),
        "{refused}"
    );
    assert!(!refused.contains("ran as"), "the script ran: {refused}");
    assert!(log_of(&logs, free_host)?.contains("ran as root"));
    // Only the agent without limits wrote its line.
    let ran = std::fs::read_to_string(&marker)?;
    assert_eq!(ran.lines().count(), 1, "{ran}");

    // As the non-root account the limited host runs shell, not Python.
    let as_user = |language: i64, script: &str| {
        cluster.script_request(
            script,
            &[limited_host],
            json!({"account_alias": "user", "script_language": language}),
        )
    };
    let (_, _, status) = cluster.run_job(as_user(1, "id -un")).await?;
    assert_eq!(
        status_of(&status, limited_host),
        Some(SUCCESS),
        "{status:#}"
    );
    let (job, step, status) = cluster.run_job(as_user(4, "print('ran python')")).await?;
    assert_eq!(
        status_of(&status, limited_host),
        Some(AGENT_TASK_ERROR),
        "{status:#}"
    );
    let refused = log_of(&cluster.logs(job, step).await?, limited_host)?;
    assert!(
        refused.contains("python (script_language 4) is not allowed here")
            && refused.contains("only shell, perl (limits.languages)"),
        "{refused}"
    );
    assert!(!refused.contains("ran python"), "{refused}");
    Ok(())
}

/// A configuration whose limits refuse everything, or contradict each other, is refused at
/// start with exit 78 and the key's line, like any bad configuration.
#[test]
fn limits_that_refuse_everything_are_a_configuration_error() -> Result<()> {
    let bin = cluster::build_binaries(false)?.join("fleetrun-agent");
    let dir = tempfile::tempdir()?;
    for (limits, says) in [
        ("accounts = []", "limits.accounts is empty"),
        ("languages = []", "limits.languages is empty"),
        ("allow_root = false\naccounts = [\"root\"]", "lists root"),
        ("languages = [\"cobol\"]", "unknown variant"),
    ] {
        let config = dir.path().join("agent.toml");
        std::fs::write(
            &config,
            format!(
                "controller = \"127.0.0.1:9\"\nwork_dir = \"/var/lib/fleetrun-agent\"\n\
                 [tls]\nca = \"ca.pem\"\ncert = \"a.pem\"\nkey = \"a.key\"\n[limits]\n{limits}\n"
            ),
        )?;
        let out = std::process::Command::new(&bin)
            .arg("--config")
            .arg(&config)
            .arg("check-config")
            .output()?;
        let stderr = String::from_utf8_lossy(&out.stderr);
        assert_eq!(out.status.code(), Some(78), "{limits}: {stderr}");
        assert!(
            stderr.contains(says) && stderr.contains("agent.toml:"),
            "{limits}: {stderr}"
        );
    }
    Ok(())
}
