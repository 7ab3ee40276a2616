//! `/healthz` and `/readyz`: answered without credentials, and `/readyz` says the controller is
//! not ready, naming the store, while its database refuses writes. With the real binaries; as
//! root, a SQLite database is made unwritable with `chattr +i` (which stops root too), a
//! PostgreSQL one read-only.

use std::{path::PathBuf, process::Command, time::Duration};

use anyhow::{Result, ensure};
use fleetrun_store::scratch::ScratchDatabase;
use fleetrun_tests::{TestCluster, eventually, start_cluster};
use serde_json::{Value, json};

async fn probe(cluster: &TestCluster, path: &str) -> Result<(u16, Value)> {
    // No credentials, as a load balancer's probe sends none.
    let reply = reqwest::get(format!("{}{path}", cluster.info.api_url)).await?;
    let status = reply.status().as_u16();
    Ok((status, reply.json().await?))
}

#[tokio::test(flavor = "multi_thread")]
async fn health_and_readiness_answer_without_credentials() -> Result<()> {
    let cluster = start_cluster(1).await?;
    let (status, body) = probe(&cluster, "/healthz").await?;
    assert_eq!((status, body), (200, json!({"status": "ok"})));
    let (status, body) = probe(&cluster, "/readyz").await?;
    assert_eq!(status, 200, "{body}");
    assert_eq!(body["status"], "ready", "{body}");
    assert!(body["inventory_revision"].as_i64().unwrap() >= 1, "{body}");
    Ok(())
}

/// The database made to refuse writes until dropped: a SQLite file and its log made immutable,
/// or a PostgreSQL database made read-only.
struct Frozen<'a>(Vec<PathBuf>, Option<&'a ScratchDatabase>);

impl<'a> Frozen<'a> {
    async fn freeze(cluster: &'a TestCluster) -> Result<Self> {
        if let Some(database) = cluster.database() {
            database.set_read_only(true).await?;
            return Ok(Self(Vec::new(), Some(database)));
        }
        let db = cluster.dir().join("controller.db");
        let wal = cluster.dir().join("controller.db-wal");
        let frozen = Self(vec![db, wal], None);
        for file in &frozen.0 {
            let status = Command::new("chattr").arg("+i").arg(file).status()?;
            ensure!(status.success(), "chattr +i {}", file.display());
        }
        Ok(frozen)
    }
}

impl Drop for Frozen<'_> {
    fn drop(&mut self) {
        if let Some(database) = self.1 {
            // Drop runs inside the test's runtime: the server is asked from a thread of its own.
            std::thread::scope(|scope| {
                scope.spawn(|| {
                    tokio::runtime::Builder::new_current_thread()
                        .enable_all()
                        .build()
                        .map(|runtime| runtime.block_on(database.set_read_only(false)))
                });
            });
        }
        for file in &self.0 {
            let _ = Command::new("chattr").arg("-i").arg(file).status();
        }
    }
}

#[tokio::test(flavor = "multi_thread")]
async fn readiness_fails_naming_the_store_while_the_database_refuses_writes() -> Result<()> {
    let cluster = start_cluster(1).await?;
    let host = cluster.host_id("agent-1");
    let frozen = Frozen::freeze(&cluster).await?;
    // A write the database refuses: the store learns it is unwritable.
    let refused = cluster
        .client()
        .call_raw(
            "fast_execute_script",
            cluster.script_request("echo refused", &[host], json!({})),
        )
        .await?;
    assert_eq!(refused["code"], 1_252_001, "{refused}");
    let (status, body) = probe(&cluster, "/readyz").await?;
    assert_eq!(status, 503, "{body}");
    assert_eq!(body["status"], "not_ready", "{body}");
    let problems = body["problems"].as_array().unwrap();
    assert!(
        problems
            .iter()
            .any(|p| p.as_str().unwrap().starts_with("store: ")),
        "{body}"
    );
    // Alive all the same: restarting it would not help.
    assert_eq!(probe(&cluster, "/healthz").await?.0, 200);

    drop(frozen);
    eventually(Duration::from_secs(30), "ready again", || async {
        let (status, _) = probe(&cluster, "/readyz").await.ok()?;
        (status == 200).then_some(())
    })
    .await?;
    Ok(())
}

#[tokio::test(flavor = "multi_thread")]
async fn readiness_follows_a_database_that_stops_taking_writes_while_nothing_is_written()
-> Result<()> {
    let cluster = start_cluster(1).await?;
    let frozen = Frozen::freeze(&cluster).await?;
    // No job, no write: the store's idle probe finds it.
    eventually(Duration::from_secs(30), "not ready", || async {
        let (status, body) = probe(&cluster, "/readyz").await.ok()?;
        (status == 503).then_some(body)
    })
    .await?;
    drop(frozen);
    eventually(Duration::from_secs(30), "ready again", || async {
        let (status, _) = probe(&cluster, "/readyz").await.ok()?;
        (status == 200).then_some(())
    })
    .await?;
    Ok(())
}

/// While the database refuses writes, a read of the audit trail answers (with what is committed)
/// instead of waiting for the outage to end; the entry of a call made meanwhile stays queued with
/// the job engine's writes and is in the trail once the database takes writes again.
#[tokio::test(flavor = "multi_thread")]
async fn the_audit_trail_answers_during_an_outage_and_keeps_its_entries() -> Result<()> {
    let cluster = start_cluster(1).await?;
    let host = cluster.host_id("agent-1");
    let client = cluster.client();
    let entries = |data: Value| data["entries"].as_array().cloned().unwrap_or_default();
    let before = entries(client.call("get_audit_log", json!({})).await?).len();
    let frozen = Frozen::freeze(&cluster).await?;
    let refused = client
        .call_raw(
            "fast_execute_script",
            cluster.script_request("echo refused", &[host], json!({})),
        )
        .await?;
    assert_eq!(refused["code"], 1_252_001, "{refused}");
    // Several readers at once: each waits for one bounded settle of the queue, not for one
    // per reader before it (6 readers would wait 30 s so).
    let asked = std::time::Instant::now();
    let mut readers = tokio::task::JoinSet::new();
    for _ in 0..6 {
        let client = client.clone();
        readers.spawn(async move { client.call_raw("get_audit_log", json!({})).await });
    }
    let reads = readers.join_all().await;
    assert!(
        asked.elapsed() < Duration::from_secs(20),
        "answered after {:?}",
        asked.elapsed()
    );
    for read in reads {
        let read = read?;
        assert_eq!(read["code"], 0, "{read}");
        assert_eq!(entries(read["data"].clone()).len(), before, "{read}");
    }
    drop(frozen);
    let recorded = eventually(
        Duration::from_secs(30),
        "the refused call recorded",
        || async {
            let list = entries(client.call("get_audit_log", json!({})).await.ok()?);
            list.into_iter()
                .find(|e| e["api"] == "fast_execute_script" && e["code"] == 1_252_001)
        },
    )
    .await?;
    assert_eq!(
        recorded["bk_app_code"], cluster.info.bk_app_code,
        "{recorded}"
    );
    let verified = client.call("verify_audit_log", json!({})).await?;
    assert_eq!(verified["intact"], true, "{verified}");
    Ok(())
}
