//! Sensitive parameters at rest with the real binaries: a sealed value belongs to its step.
//! Someone who can write the controller's database but not read its key file cannot make another
//! job run with a job's secret by copying the sealed value into that job's row; values sealed in
//! the older format, before they were bound to their step, still run.

use anyhow::{Context, Result};
use base64::{Engine as _, engine::general_purpose::STANDARD};
use fleetrun_tests::{TestCluster, b64, start_cluster};
use serde_json::{Value, json};
use sqlx::Connection as _;
use std::time::Duration;

/// Creates a job (not started) whose sensitive parameter is `param`; returns its job and step
/// ids.
async fn create_pending(cluster: &TestCluster, param: &str) -> Result<(i64, i64)> {
    let request = cluster.script_request(
        "echo \"param=$1\"",
        &cluster.host_ids(),
        json!({"start_task": false, "is_param_sensitive": 1, "script_param": b64(param)}),
    );
    let accepted = cluster
        .client()
        .call("fast_execute_script", request)
        .await?;
    Ok((
        accepted["job_instance_id"].as_i64().context("job")?,
        accepted["step_instance_id"].as_i64().context("step")?,
    ))
}

/// Asks the controller to start a created job; returns the reply envelope.
async fn start(cluster: &TestCluster, job: i64) -> Result<Value> {
    let mut operate = cluster.info.scope();
    operate["job_instance_id"] = json!(job);
    operate["operation_code"] = json!(2);
    cluster
        .client()
        .call_raw("operate_job_instance", operate)
        .await
}

/// What the job printed on its one host, once it has ended.
async fn output(cluster: &TestCluster, job: i64, step: i64) -> Result<String> {
    let done = cluster
        .client()
        .wait_job(&cluster.info.scope(), job, Duration::from_secs(30))
        .await?;
    assert_eq!(done["job_instance"]["status"], 3, "{done}");
    Ok(cluster.logs(job, step).await?.remove(0).1)
}

/// Sets a step's stored parameter, as someone with write access to the database would.
async fn overwrite_param(cluster: &TestCluster, step: i64, value: SqlValue<'_>) -> Result<()> {
    sqlx::any::install_default_drivers();
    let url = match cluster.database() {
        Some(database) => database.url().to_owned(),
        None => format!("sqlite://{}", cluster.dir().join("controller.db").display()),
    };
    let mut db = sqlx::AnyConnection::connect(&url).await?;
    let changed = match value {
        SqlValue::ParamOf(source) => {
            sqlx::query(
                "UPDATE step_instance SET script_param =
                     (SELECT script_param FROM step_instance WHERE step_instance_id = $1)
                 WHERE step_instance_id = $2",
            )
            .bind(source)
            .bind(step)
            .execute(&mut db)
            .await?
        }
        SqlValue::Text(text) => {
            sqlx::query("UPDATE step_instance SET script_param = $1 WHERE step_instance_id = $2")
                .bind(text)
                .bind(step)
                .execute(&mut db)
                .await?
        }
    };
    anyhow::ensure!(changed.rows_affected() == 1, "step {step} not found");
    db.close().await?;
    Ok(())
}

enum SqlValue<'a> {
    /// The stored parameter of this other step.
    ParamOf(i64),
    Text(&'a str),
}

#[tokio::test(flavor = "multi_thread")]
async fn a_sealed_parameter_copied_into_another_jobs_row_does_not_run_there() -> Result<()> {
    let cluster = start_cluster(1).await?;
    let secret = format!("secret-of-a-{}", std::process::id());
    let (job_a, step_a) = create_pending(&cluster, &secret).await?;
    let (job_b, step_b) = create_pending(&cluster, "harmless").await?;

    overwrite_param(&cluster, step_b, SqlValue::ParamOf(step_a)).await?;
    let refused = start(&cluster, job_b).await?;
    assert_eq!(refused["result"], false, "job B started: {refused}");
    assert!(!refused.to_string().contains(&secret), "{refused}");
    let mut query = cluster.info.scope();
    query["job_instance_id"] = json!(job_b);
    let b = cluster
        .client()
        .call("get_job_instance_status", query)
        .await?;
    assert_eq!(b["job_instance"]["status"], 1, "job B is not pending: {b}");

    // A itself still runs with its secret.
    let started = start(&cluster, job_a).await?;
    assert_eq!(started["result"], true, "{started}");
    assert_eq!(
        output(&cluster, job_a, step_a).await?,
        format!("param={secret}\n")
    );
    Ok(())
}

#[tokio::test(flavor = "multi_thread")]
async fn a_parameter_sealed_in_the_older_format_still_runs() -> Result<()> {
    let cluster = start_cluster(1).await?;
    let (job, step) = create_pending(&cluster, "to be replaced").await?;
    // What the previous format stored: `enc:v1:` and base64 of nonce and AES-256-GCM ciphertext
    // with the associated data "fleetrun script_param", under the controller's key.
    let key = std::fs::read_to_string(cluster.dir().join("param.key"))?;
    let key = STANDARD.decode(key.trim())?;
    let key = ring::aead::LessSafeKey::new(
        ring::aead::UnboundKey::new(&ring::aead::AES_256_GCM, &key).expect("a 32-byte key"),
    );
    let nonce = [7u8; ring::aead::NONCE_LEN];
    let mut data = b"sealed-long-ago".to_vec();
    key.seal_in_place_append_tag(
        ring::aead::Nonce::assume_unique_for_key(nonce),
        ring::aead::Aad::from(b"fleetrun script_param"),
        &mut data,
    )
    .expect("sealing in memory");
    let old = format!("enc:v1:{}", STANDARD.encode([&nonce[..], &data].concat()));

    overwrite_param(&cluster, step, SqlValue::Text(&old)).await?;
    let started = start(&cluster, job).await?;
    assert_eq!(started["result"], true, "{started}");
    assert_eq!(
        output(&cluster, job, step).await?,
        "param=sealed-long-ago\n"
    );
    Ok(())
}
