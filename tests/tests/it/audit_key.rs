//! The audit chain is keyed: someone who can write the controller's database but not read its
//! audit key edits an entry and recomputes every hash after it the only way open to them (the
//! plain SHA-256 the chain used before it had a key), with the controller stopped so that its
//! remembered head does not help; verification still names every rewritten entry. The key file
//! is made at first start, owner-only. Refused authentications are recorded, within a budget a
//! flood of bad credentials cannot exceed.

use std::time::Duration;

use anyhow::Result;
use fleetrun_tests::{TestCluster, start_cluster};
use ring::digest::{SHA256, digest};
use serde_json::{Value, json};
use sqlx::{Connection as _, Row as _, sqlite::SqliteConnectOptions};

/// The plain hash of the chain's unkeyed format: SHA-256 over length-prefixed fields.
fn plain_hash(fields: &[&str]) -> String {
    let mut bytes = Vec::new();
    for field in std::iter::once(&"fleetrun-audit-v1").chain(fields) {
        bytes.extend_from_slice(&(field.len() as u64).to_be_bytes());
        bytes.extend_from_slice(field.as_bytes());
    }
    hex::encode(digest(&SHA256, &bytes))
}

/// Rewrites the whole chain with `operator` of entry 2 changed, every hash recomputed and
/// relinked.
async fn forge(cluster: &TestCluster) -> Result<()> {
    let options = SqliteConnectOptions::new()
        .filename(cluster.dir().join("controller.db"))
        .busy_timeout(Duration::from_secs(10));
    let mut db = sqlx::SqliteConnection::connect_with(&options).await?;
    let rows = sqlx::query("SELECT * FROM audit_log ORDER BY seq")
        .fetch_all(&mut db)
        .await?;
    let mut prev = String::new();
    for row in rows {
        let seq: i64 = row.get("seq");
        let mut operator: String = row.get("operator");
        if seq == 2 {
            operator = "mallory".into();
        }
        let text = |name: &str| -> String { row.get(name) };
        let number = |name: &str| -> String { row.get::<i64, _>(name).to_string() };
        let hash = plain_hash(&[
            &seq.to_string(),
            &number("at"),
            &text("app_code"),
            &operator,
            &text("source"),
            &text("request_id"),
            &text("api"),
            &text("change"),
            &number("outcome_code"),
            &text("outcome"),
            &prev,
        ]);
        sqlx::query("UPDATE audit_log SET operator = $1, prev_hash = $2, hash = $3 WHERE seq = $4")
            .bind(&operator)
            .bind(&prev)
            .bind(&hash)
            .bind(seq)
            .execute(&mut db)
            .await?;
        prev = hash;
    }
    db.close().await?;
    Ok(())
}

#[tokio::test(flavor = "multi_thread")]
async fn a_chain_rewritten_without_the_key_is_detected_after_a_restart() -> Result<()> {
    if !fleetrun_tests::sqlite_only("a_chain_rewritten_without_the_key_is_detected_after_a_restart")
    {
        return Ok(());
    }
    let mut cluster = start_cluster(0).await?;
    let client = cluster.client();
    for agent in ["agent-7", "agent-8", "agent-9"] {
        client
            .call("revoke_agent", json!({"agent_id": agent, "reason": "lost"}))
            .await?;
    }
    let report = client.call("verify_audit_log", json!({})).await?;
    assert_eq!(
        (
            &report["intact"],
            &report["entries"],
            &report["unkeyed_entries"]
        ),
        (&json!(true), &json!(3), &json!(0)),
        "{report}"
    );
    let key = cluster.dir().join("audit.key");
    use std::os::unix::fs::PermissionsExt as _;
    assert_eq!(std::fs::metadata(&key)?.permissions().mode() & 0o777, 0o600);
    assert!(std::fs::read_to_string(&key)?.contains("unkeyed_until = 0"));

    cluster.kill_controller()?;
    forge(&cluster).await?;
    cluster.start_controller().await?;
    let report: Value = cluster.client().call("verify_audit_log", json!({})).await?;
    assert_eq!(report["intact"], false, "{report}");
    let problems = report["problems"].as_array().unwrap();
    assert_eq!(
        problems[..3],
        [
            "entry 1: its content does not match its hash (edited)",
            "entry 2: its content does not match its hash (edited)",
            "entry 3: its content does not match its hash (edited)",
        ],
        "{report}"
    );
    // The head anchor beside the key saw the rewritten end too, at start.
    assert_eq!(problems.len(), 4, "{report}");
    assert!(
        problems[3]
            .as_str()
            .unwrap()
            .starts_with("entry 4: entry 3 is not the entry the head anchor"),
        "{report}"
    );
    Ok(())
}

#[tokio::test(flavor = "multi_thread")]
async fn refused_authentications_are_recorded_but_cannot_flood_the_trail() -> Result<()> {
    let cluster = start_cluster(0).await?;
    let intruder = fleetrun_tests::ApiClient::new(
        &cluster.info.api_url,
        &cluster.info.bk_app_code,
        "a-wrong-secret",
        "mallory",
    );
    // Far more than the budget, as fast as they come.
    let attempts = 200;
    for _ in 0..attempts {
        // GET: the claimed app and user travel in the query string.
        let refused = intruder
            .get_raw("revoke_agent", json!({"agent_id": "agent-1"}))
            .await?;
        assert_eq!(refused["code"], 1_640_001, "{refused}");
    }
    let data = cluster
        .client()
        .call(
            "get_audit_log",
            json!({"outcome": "refused", "limit": 1000}),
        )
        .await?;
    let entries = data["entries"].as_array().unwrap();
    let refusals: Vec<&Value> = entries.iter().filter(|e| e["code"] == 1_640_001).collect();
    assert_eq!(refusals.len(), 60, "recorded one by one up to the budget");
    let first = refusals[0];
    assert_eq!(
        (&first["api"], &first["bk_app_code"], &first["operator"]),
        (
            &json!("revoke_agent"),
            &json!(cluster.info.bk_app_code),
            &json!("mallory")
        ),
        "{first}"
    );
    assert!(first["source"].as_str().unwrap().starts_with("127.0.0.1:"));
    // The chain holds them like any entry.
    let report = cluster.client().call("verify_audit_log", json!({})).await?;
    assert_eq!(report["intact"], true, "{report}");
    Ok(())
}

/// A refused authentication whose claimed app and user carry a NUL (JSON-escaped in the
/// `X-Bkapi-Authorization` header), which PostgreSQL refuses in text, holds back neither the job
/// engine's writes nor the trail: it is recorded with the NUL replaced, a job submitted after it
/// completes, and the chain verifies.
#[tokio::test(flavor = "multi_thread")]
async fn a_nul_in_a_refused_authentication_holds_nothing_back() -> Result<()> {
    let cluster = start_cluster(1).await?;
    let host = cluster.host_id("agent-1");
    let intruder = fleetrun_tests::ApiClient::new(
        &cluster.info.api_url,
        "a\u{0}",
        "a-wrong-secret",
        "mallory\u{0}",
    );
    // In the query string the NUL is refused before authentication, naming the field.
    let refused = intruder
        .get_raw("revoke_agent", json!({"agent_id": "agent-1"}))
        .await?;
    assert_eq!(refused["code"], 1_240_003, "{refused}");
    assert!(
        refused["message"].as_str().unwrap().contains("bk_app_code"),
        "{refused}"
    );
    // In the header it reaches authentication, which refuses it and records who it claims.
    let refused: Value = reqwest::Client::new()
        .post(format!(
            "{}/api/v3/fast_execute_script/",
            cluster.info.api_url
        ))
        .header(
            "X-Bkapi-Authorization",
            r#"{"bk_app_code":"b\u0000","bk_app_secret":"wrong","bk_username":"eve\u0000"}"#,
        )
        .json(&cluster.script_request("echo never", &[host], json!({})))
        .send()
        .await?
        .json()
        .await?;
    assert_eq!(refused["code"], 1_640_001, "{refused}");

    let client = cluster.client();
    let accepted = client
        .call(
            "fast_execute_script",
            cluster.script_request("echo after", &[host], json!({})),
        )
        .await?;
    let job = accepted["job_instance_id"].as_i64().unwrap();
    let status = client
        .wait_job(&cluster.info.scope(), job, Duration::from_secs(60))
        .await?;
    assert_eq!(status["job_instance"]["status"], 3, "{status}");

    let data = client
        .call(
            "get_audit_log",
            json!({"outcome": "refused", "limit": 1000}),
        )
        .await?;
    let claimed: Vec<(&str, &str)> = data["entries"]
        .as_array()
        .unwrap()
        .iter()
        .filter(|e| e["code"] == 1_640_001)
        .map(|e| {
            (
                e["bk_app_code"].as_str().unwrap(),
                e["operator"].as_str().unwrap(),
            )
        })
        .collect();
    assert_eq!(claimed, [("b\u{FFFD}", "eve\u{FFFD}")], "{data}");
    let data = client
        .call("get_audit_log", json!({"api": "fast_execute_script"}))
        .await?;
    assert!(
        data["entries"]
            .as_array()
            .unwrap()
            .iter()
            .any(|e| e["code"] == 0),
        "{data}"
    );
    let report = client.call("verify_audit_log", json!({})).await?;
    assert_eq!(report["intact"], true, "{report}");
    Ok(())
}
