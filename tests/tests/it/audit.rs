//! The audit trail: state-changing calls recorded with who, from where and what (secrets
//! masked), reads left out, and the hash chain catching an edited row, a deleted row and rows cut
//! from the end of the log, as someone with write access to the database would make them.

use std::time::Duration;

use anyhow::{Context, Result};
use fleetrun_tests::{TestCluster, b64, fleetrun_bin, start_cluster};
use serde_json::{Value, json};
use sqlx::{Connection as _, sqlite::SqliteConnectOptions};

async fn audit_log(cluster: &TestCluster, filter: Value) -> Result<Vec<Value>> {
    let data = cluster.client().call("get_audit_log", filter).await?;
    Ok(data["entries"].as_array().context("entries")?.clone())
}

async fn verify(cluster: &TestCluster) -> Result<Value> {
    cluster.client().call("verify_audit_log", json!({})).await
}

async fn tamper(cluster: &TestCluster, sql: &str) -> Result<()> {
    let options = SqliteConnectOptions::new()
        .filename(cluster.dir().join("controller.db"))
        .busy_timeout(Duration::from_secs(10));
    let mut db = sqlx::SqliteConnection::connect_with(&options).await?;
    sqlx::query(sql).execute(&mut db).await?;
    db.close().await?;
    Ok(())
}

fn problems(report: &Value) -> Vec<String> {
    report["problems"]
        .as_array()
        .unwrap()
        .iter()
        .map(|p| p.as_str().unwrap().to_owned())
        .collect()
}

#[tokio::test(flavor = "multi_thread")]
async fn changes_are_recorded_masked_and_tampering_is_detected() -> Result<()> {
    let cluster = start_cluster(1).await?;
    let client = cluster.client();
    let host = cluster.host_id("agent-1");

    // A job with a sensitive parameter: recorded, the parameter masked.
    let accepted = client
        .call_raw(
            "fast_execute_script",
            cluster.script_request(
                "echo audited",
                &[host],
                json!({"script_param": b64("--password hunter2"), "is_param_sensitive": 1}),
            ),
        )
        .await?;
    assert_eq!(accepted["code"], 0, "{accepted}");
    let job = accepted["data"]["job_instance_id"].as_i64().unwrap();
    client
        .wait_job(&cluster.info.scope(), job, Duration::from_secs(60))
        .await?;
    // A script library change, an agent revocation and its undoing.
    let mut script = cluster.info.scope();
    for (k, v) in [
        ("name", json!("audited-script")),
        ("script_language", json!(1)),
        ("content", json!(b64("echo v1"))),
        ("version", json!("1.0")),
    ] {
        script[k] = v;
    }
    client.call("create_script", script).await?;
    client
        .call(
            "revoke_agent",
            json!({"agent_id": "agent-9", "reason": "lost"}),
        )
        .await?;
    client
        .call("unrevoke_agent", json!({"agent_id": "agent-9"}))
        .await?;
    // A refused change is recorded with its code.
    let refused = client
        .call_raw(
            "operate_job_instance",
            json!({"bk_scope_type": "biz", "bk_scope_id": "2", "job_instance_id": 999_999, "operation_code": 1}),
        )
        .await?;
    assert_ne!(refused["code"], 0, "{refused}");

    let entries = audit_log(&cluster, json!({})).await?;
    let apis: Vec<&str> = entries.iter().map(|e| e["api"].as_str().unwrap()).collect();
    assert_eq!(
        apis,
        [
            "fast_execute_script",
            "create_script",
            "revoke_agent",
            "unrevoke_agent",
            "operate_job_instance"
        ],
        "reads (status, logs, lists) are not audited: {entries:#?}"
    );
    let submit = &entries[0];
    assert_eq!(submit["seq"], 1);
    assert_eq!(submit["prev_hash"], "");
    assert_eq!(submit["bk_app_code"], cluster.info.bk_app_code);
    assert_eq!(submit["operator"], cluster.info.bk_username);
    assert!(
        submit["source"].as_str().unwrap().starts_with("127.0.0.1:"),
        "{submit}"
    );
    assert_eq!(submit["request_id"], accepted["request_id"]);
    assert_eq!(submit["code"], 0);
    assert_eq!(submit["outcome"], "ok");
    assert_eq!(submit["change"]["script_param"], "***");
    assert_eq!(submit["change"]["bk_app_secret"], "***");
    let text = serde_json::to_string(&entries)?;
    assert!(!text.contains(&b64("--password hunter2")), "{text}");
    assert!(!text.contains(&cluster.info.bk_app_secret));
    assert_eq!(entries[4]["code"], refused["code"]);
    assert_eq!(entries[4]["outcome"], refused["message"]);
    for pair in entries.windows(2) {
        assert_eq!(pair[1]["prev_hash"], pair[0]["hash"]);
    }

    // Filters.
    let only = audit_log(&cluster, json!({"api": "revoke_agent"})).await?;
    assert_eq!(only.len(), 1);
    let refusals = audit_log(&cluster, json!({"outcome": "refused"})).await?;
    assert_eq!(refusals.len(), 1);
    let page = audit_log(&cluster, json!({"after_seq": 3, "limit": 1})).await?;
    assert_eq!(page[0]["seq"], 4);
    let bad = client
        .call_raw("get_audit_log", json!({"limit": 0}))
        .await?;
    assert_eq!(bad["code"], 1_240_003, "{bad}");
    assert!(bad["message"].as_str().unwrap().contains("limit"), "{bad}");

    let report = verify(&cluster).await?;
    assert_eq!(report["intact"], true, "{report}");
    assert_eq!(report["entries"], 5);
    assert_eq!(report["last_hash"], entries[4]["hash"]);
    let cli = std::process::Command::new(fleetrun_bin())
        .args(["--url", &cluster.info.api_url])
        .args(["--app-code", &cluster.info.bk_app_code])
        .args(["--username", &cluster.info.bk_username])
        .env("FLEETRUN_APP_SECRET", &cluster.info.bk_app_secret)
        .args(["audit", "verify"])
        .output()?;
    assert!(
        cli.status.success(),
        "{}",
        String::from_utf8_lossy(&cli.stderr)
    );

    // The tampering below edits the controller's SQLite file as someone with write access to it.
    if !fleetrun_tests::sqlite_only("changes_are_recorded_masked_and_tampering_is_detected") {
        return Ok(());
    }
    // An edited row: its hash no longer matches.
    tamper(
        &cluster,
        "UPDATE audit_log SET operator = 'mallory' WHERE seq = 2",
    )
    .await?;
    let report = verify(&cluster).await?;
    assert_eq!(report["intact"], false, "{report}");
    assert_eq!(
        problems(&report),
        ["entry 2: its content does not match its hash (edited)"]
    );
    let cli = std::process::Command::new(fleetrun_bin())
        .args(["--url", &cluster.info.api_url])
        .args(["--app-code", &cluster.info.bk_app_code])
        .args(["--username", &cluster.info.bk_username])
        .env("FLEETRUN_APP_SECRET", &cluster.info.bk_app_secret)
        .args(["audit", "verify"])
        .output()?;
    assert!(!cli.status.success());
    assert!(
        String::from_utf8_lossy(&cli.stdout).contains("entry 2: its content"),
        "{}",
        String::from_utf8_lossy(&cli.stdout)
    );
    tamper(
        &cluster,
        "UPDATE audit_log SET operator = 'admin' WHERE seq = 2",
    )
    .await?;
    assert_eq!(verify(&cluster).await?["intact"], true);

    // A deleted row in the middle: the numbering and the link break.
    tamper(&cluster, "DELETE FROM audit_log WHERE seq = 3").await?;
    let report = verify(&cluster).await?;
    assert_eq!(
        problems(&report),
        [
            "entries 3 to 3 are missing (next found: 4)",
            "entry 4: does not link to the entry before it"
        ],
        "{report}"
    );

    // Rows cut from the end leave an intact-looking chain: the controller's own head notices.
    tamper(&cluster, "DELETE FROM audit_log WHERE seq >= 3").await?;
    let report = verify(&cluster).await?;
    assert_eq!(
        problems(&report),
        ["entries 3 to 5 are missing from the end"],
        "{report}"
    );
    Ok(())
}
