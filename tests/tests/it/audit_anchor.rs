//! The audit trail outside the database: the store records which key the chain is made with, so
//! a controller whose key file was deleted (or swapped) refuses to start instead of making a new
//! key that would pass the old entries off as never keyed; only `fleetrun-controller audit
//! rekey` goes on, recording the break in the chain. The chain's head is anchored in a file
//! beside the key, so rows cut from the end while the controller is stopped are found at the
//! next start and reported by `verify_audit_log` from then on. A count of refused
//! authentications past the budget is written when the controller stops, not only at a later
//! refusal.

use std::{process::Command, time::Duration};

use anyhow::{Context, Result, ensure};
use fleetrun_tests::{TestCluster, start_cluster};
use serde_json::{Value, json};
use sqlx::Connection as _;

/// Changes recorded in the trail: `n` revocations.
async fn record(cluster: &TestCluster, n: usize) -> Result<()> {
    for i in 0..n {
        cluster
            .client()
            .call(
                "revoke_agent",
                json!({"agent_id": format!("agent-{i}"), "reason": "lost"}),
            )
            .await?;
    }
    Ok(())
}

async fn verify(cluster: &TestCluster) -> Result<Value> {
    cluster.client().call("verify_audit_log", json!({})).await
}

/// Runs `fleetrun-controller audit rekey` on the cluster's configuration: exit status, stdout
/// and stderr.
fn rekey(cluster: &TestCluster) -> Result<(bool, String)> {
    let out = Command::new(cluster.bin_dir.join("fleetrun-controller"))
        .arg("--config")
        .arg(&cluster.controller_config)
        .args(["audit", "rekey"])
        .output()
        .context("running fleetrun-controller audit rekey")?;
    Ok((
        out.status.success(),
        format!(
            "{}{}",
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        ),
    ))
}

/// Deletes the chain's last `n` rows, as someone with write access to the database would.
async fn cut_tail(cluster: &TestCluster, n: i64) -> Result<()> {
    sqlx::any::install_default_drivers();
    let url = match cluster.database() {
        Some(database) => database.url().to_owned(),
        None => format!("sqlite://{}", cluster.dir().join("controller.db").display()),
    };
    let mut db = sqlx::AnyConnection::connect(&url).await?;
    let deleted =
        sqlx::query("DELETE FROM audit_log WHERE seq > (SELECT MAX(seq) FROM audit_log) - $1")
            .bind(n)
            .execute(&mut db)
            .await?;
    ensure!(deleted.rows_affected() == n as u64, "deleted {deleted:?}");
    db.close().await?;
    Ok(())
}

/// Adds an [enroll] section to the (stopped) controller's configuration, with the cluster's CA
/// imported by `ca init`.
fn enable_enrollment(cluster: &TestCluster) -> Result<()> {
    let mut config = std::fs::read_to_string(&cluster.controller_config)?;
    config.push_str(&format!(
        "\n[enroll]\nca_cert = {:?}\nca_key = {:?}\n",
        cluster.dir().join("enroll-ca.pem"),
        cluster.dir().join("enroll-ca.key.pem"),
    ));
    std::fs::write(&cluster.controller_config, config)?;
    let certs = cluster.dir().join("certs");
    let init = Command::new(cluster.bin_dir.join("fleetrun-controller"))
        .arg("--config")
        .arg(&cluster.controller_config)
        .args(["ca", "init", "--import-cert"])
        .arg(certs.join("ca.pem"))
        .arg("--import-key")
        .arg(certs.join("ca.key.pem"))
        .output()?;
    ensure!(
        init.status.success(),
        "ca init: {}",
        String::from_utf8_lossy(&init.stderr)
    );
    Ok(())
}

/// The (stopped) controller's configuration with `settings` added to its [security] section (a
/// cluster on PostgreSQL has one already).
fn add_security(cluster: &TestCluster, settings: &str) -> Result<()> {
    let config = std::fs::read_to_string(&cluster.controller_config)?;
    let config = if config.contains("\n[security]\n") {
        config.replacen("\n[security]\n", &format!("\n[security]\n{settings}\n"), 1)
    } else {
        format!("{config}\n[security]\n{settings}\n")
    };
    std::fs::write(&cluster.controller_config, config)?;
    Ok(())
}

async fn restart(cluster: &mut TestCluster) -> Result<()> {
    cluster
        .stop_controller(Duration::from_secs(30))?
        .context("the controller did not stop")?;
    cluster.start_controller().await
}

#[tokio::test(flavor = "multi_thread")]
async fn an_empty_trail_restarted_stays_intact() -> Result<()> {
    let mut cluster = start_cluster(0).await?;
    // The first start anchored the empty trail; the next ones read that anchor back.
    restart(&mut cluster).await?;
    restart(&mut cluster).await?;
    let report = verify(&cluster).await?;
    assert_eq!(
        (&report["intact"], &report["entries"]),
        (&json!(true), &json!(0)),
        "{report}"
    );
    Ok(())
}

#[tokio::test(flavor = "multi_thread")]
async fn a_deleted_anchor_is_a_break_and_an_anchor_behind_is_not() -> Result<()> {
    let mut cluster = start_cluster(0).await?;
    record(&cluster, 2).await?;
    assert_eq!(verify(&cluster).await?["entries"], 2);
    let anchor = cluster.dir().join("audit.head");
    // An older anchor (a copy put back, a power loss after the commit): the trail goes on
    // past the entry it names, which is still there. No break.
    let older = std::fs::read(&anchor)?;
    record(&cluster, 2).await?;
    assert_eq!(verify(&cluster).await?["entries"], 4);
    cluster
        .stop_controller(Duration::from_secs(30))?
        .context("the controller did not stop")?;
    std::fs::write(&anchor, older)?;
    cluster.start_controller().await?;
    let report = verify(&cluster).await?;
    assert_eq!(
        (&report["intact"], &report["entries"]),
        (&json!(true), &json!(4)),
        "{report}"
    );

    cluster
        .stop_controller(Duration::from_secs(30))?
        .context("the controller did not stop")?;
    std::fs::remove_file(&anchor)?;
    cluster.start_controller().await?;
    let report = verify(&cluster).await?;
    assert_eq!(report["intact"], false, "{report}");
    assert!(
        report["problems"][0]
            .as_str()
            .unwrap()
            .contains("was missing at start"),
        "{report}"
    );
    Ok(())
}

#[tokio::test(flavor = "multi_thread")]
async fn the_anchor_lives_in_the_state_directory_and_an_unusable_one_is_a_configuration_error()
-> Result<()> {
    let mut cluster = start_cluster(0).await?;
    cluster.kill_controller()?;
    // The key elsewhere (a directory the service may not write, in production): the anchor
    // stays in the state directory.
    let keys = cluster.dir().join("keys");
    std::fs::create_dir(&keys)?;
    let key = keys.join("audit.key");
    std::fs::rename(cluster.dir().join("audit.key"), &key)?;
    let config = std::fs::read_to_string(&cluster.controller_config)?;
    add_security(&cluster, &format!("audit_key_file = {key:?}"))?;
    cluster.start_controller().await?;
    record(&cluster, 1).await?;
    assert_eq!(verify(&cluster).await?["intact"], true);
    assert!(!keys.join("audit.head").exists());
    assert!(cluster.dir().join("audit.head").exists());

    // An anchor that is the key file itself is refused before anything is written, as a
    // configuration error (78: systemd does not restart it in a loop).
    cluster.kill_controller()?;
    let key_text = std::fs::read(&key)?;
    std::fs::write(&cluster.controller_config, &config)?;
    add_security(
        &cluster,
        &format!("audit_key_file = {key:?}\naudit_anchor_file = {key:?}"),
    )?;
    let refused = cluster.start_controller().await.unwrap_err().to_string();
    assert!(refused.contains("78"), "{refused}");
    let log = std::fs::read_to_string(&cluster.controller_log)?;
    assert!(log.contains("is the audit key file"), "{log}");
    assert_eq!(std::fs::read(&key)?, key_text, "the key was overwritten");

    // So is an anchor that cannot be written.
    std::fs::write(&cluster.controller_config, &config)?;
    let nowhere = cluster.dir().join("no-such-directory").join("audit.head");
    add_security(
        &cluster,
        &format!("audit_key_file = {key:?}\naudit_anchor_file = {nowhere:?}"),
    )?;
    let refused = cluster.start_controller().await.unwrap_err().to_string();
    assert!(refused.contains("78"), "{refused}");
    Ok(())
}

#[tokio::test(flavor = "multi_thread")]
async fn a_deleted_audit_key_stops_the_controller_until_an_operator_rekeys() -> Result<()> {
    let mut cluster = start_cluster(0).await?;
    record(&cluster, 3).await?;
    // Reading the trail waits for what is queued: all three are in the database.
    assert_eq!(verify(&cluster).await?["entries"], 3);
    let key = cluster.dir().join("audit.key");
    cluster.kill_controller()?;
    std::fs::remove_file(&key)?;

    // No new key is made in silence: the controller refuses, naming the file and the way on.
    let refused = cluster.start_controller().await;
    ensure!(refused.is_err(), "the controller started without its key");
    let log = std::fs::read_to_string(&cluster.controller_log)?;
    assert!(
        log.contains(&format!("audit key file {}: missing", key.display()))
            && log.contains("audit rekey"),
        "{log}"
    );
    assert!(!key.exists(), "a key was made");

    // The operator starts a new key; the break is an entry of the chain, signed by it.
    let (ok, said) = rekey(&cluster)?;
    assert!(ok, "{said}");
    assert!(said.contains("entries 1 to 3"), "{said}");
    // Once in place, it is never overwritten.
    let (ok, said) = rekey(&cluster)?;
    assert!(!ok && said.contains("nothing to replace"), "{said}");

    cluster.start_controller().await?;
    record(&cluster, 1).await?;
    let report = verify(&cluster).await?;
    assert_eq!(
        (
            &report["intact"],
            &report["entries"],
            &report["unverifiable_entries"]
        ),
        (&json!(true), &json!(5), &json!(3)),
        "{report}"
    );
    let entries = cluster
        .client()
        .call("get_audit_log", json!({"limit": 10}))
        .await?;
    let rekeyed = &entries["entries"][3];
    assert_eq!(rekeyed["api"], "audit_rekey", "{entries}");
    assert_eq!(
        rekeyed["change"]["entries_under_previous_key"], 3,
        "{rekeyed}"
    );
    assert_eq!(
        rekeyed["change"]["previous_head_hash"], entries["entries"][2]["hash"],
        "the replacement pins the last entry the lost key signed: {entries}"
    );

    // Another key put in its place is refused too.
    cluster.kill_controller()?;
    std::fs::remove_file(&key)?;
    std::fs::write(&key, "AAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAA=\n")?;
    use std::os::unix::fs::PermissionsExt as _;
    std::fs::set_permissions(&key, std::fs::Permissions::from_mode(0o600))?;
    ensure!(
        cluster.start_controller().await.is_err(),
        "the controller started with another key"
    );
    let log = std::fs::read_to_string(&cluster.controller_log)?;
    assert!(
        log.contains(&format!(
            "audit key file {}: holds key sha256:",
            key.display()
        )),
        "{log}"
    );
    Ok(())
}

#[tokio::test(flavor = "multi_thread")]
async fn rows_cut_from_the_end_while_stopped_are_found_at_start_and_by_verify() -> Result<()> {
    let mut cluster = start_cluster(0).await?;
    record(&cluster, 5).await?;
    let report = verify(&cluster).await?;
    assert_eq!(
        (&report["intact"], &report["entries"]),
        (&json!(true), &json!(5)),
        "{report}"
    );
    cluster.kill_controller()?;
    // Entries 4 and 5 go: what is left is a valid, shorter chain.
    cut_tail(&cluster, 2).await?;
    cluster.start_controller().await?;
    let problem = "entries 4 to 5 were removed from the end of the trail while the controller \
                   was stopped";
    let log = std::fs::read_to_string(&cluster.controller_log)?;
    assert!(log.contains(problem), "{log}");
    let report = verify(&cluster).await?;
    assert_eq!(report["intact"], false, "{report}");
    let problems = report["problems"].as_array().unwrap();
    assert!(
        problems.len() == 1
            && problems[0]
                .as_str()
                .unwrap()
                .starts_with(&format!("entry 4: {problem}")),
        "{report}"
    );
    // The finding is an entry of the chain: it outlives the restart that moves the anchor on.
    cluster
        .stop_controller(Duration::from_secs(30))?
        .context("the controller did not stop")?;
    cluster.start_controller().await?;
    let report = verify(&cluster).await?;
    assert_eq!(report["intact"], false, "{report}");
    assert_eq!(report["problems"].as_array().unwrap().len(), 1, "{report}");
    // The anchor is owner-only.
    use std::os::unix::fs::PermissionsExt as _;
    let anchor = cluster.dir().join("audit.head");
    assert_eq!(
        std::fs::metadata(&anchor)?.permissions().mode() & 0o777,
        0o600
    );

    // An anchor edited to hide a cut does not verify against the key.
    cluster.kill_controller()?;
    let text = std::fs::read_to_string(&anchor)?;
    let (_, rest) = text.split_once(' ').unwrap();
    std::fs::write(&anchor, format!("1 {rest}"))?;
    cluster.start_controller().await?;
    let report = verify(&cluster).await?;
    let problems = report["problems"].as_array().unwrap();
    assert!(
        problems
            .iter()
            .any(|p| p.as_str().unwrap().contains("does not verify")),
        "{report}"
    );
    Ok(())
}

#[tokio::test(flavor = "multi_thread")]
async fn refusals_past_the_budget_are_counted_in_the_trail_when_the_controller_stops() -> Result<()>
{
    let mut cluster = start_cluster(0).await?;
    // With [enroll], the enroller holds a handle on the trail for as long as the controller
    // runs: the stop must not wait for that handle to go to write the count.
    cluster.kill_controller()?;
    enable_enrollment(&cluster)?;
    cluster.start_controller().await?;
    let intruder = fleetrun_tests::ApiClient::new(
        &cluster.info.api_url,
        &cluster.info.bk_app_code,
        "a-wrong-secret",
        "mallory",
    );
    let attempts = 100;
    for _ in 0..attempts {
        let refused = intruder
            .get_raw("revoke_agent", json!({"agent_id": "agent-1"}))
            .await?;
        assert_eq!(refused["code"], 1_640_001, "{refused}");
    }
    // No later refusal comes: the count is written on the way down.
    let stopped = cluster
        .stop_controller(Duration::from_secs(30))?
        .context("the controller did not stop")?;
    assert!(stopped.success(), "{stopped}");
    let log = std::fs::read_to_string(&cluster.controller_log)?;
    assert!(!log.contains("did not stop within"), "{log}");
    cluster.start_controller().await?;
    let data = cluster
        .client()
        .call(
            "get_audit_log",
            json!({"outcome": "refused", "limit": 1000}),
        )
        .await?;
    let entries = data["entries"].as_array().unwrap();
    let counted: Vec<&Value> = entries
        .iter()
        .filter(|e| e["change"]["unrecorded_refusals"].is_number())
        .collect();
    assert_eq!(counted.len(), 1, "{data}");
    assert_eq!(counted[0]["change"]["unrecorded_refusals"], attempts - 60);
    let one_by_one = entries
        .iter()
        .filter(|e| e["operator"] == "mallory")
        .count();
    assert_eq!(one_by_one, 60);
    Ok(())
}
