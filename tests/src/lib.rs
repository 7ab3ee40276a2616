//! Shared pieces of the end-to-end tests: a cluster per test in its own directory, whose logs
//! are printed when the test fails.
//!
//! The controller's database is a SQLite file in the cluster's directory, or, when
//! `FLEETRUN_TEST_DATABASE` names a PostgreSQL server (`postgres://postgres@127.0.0.1:5432`), a
//! database of the cluster's own on it, dropped with the cluster.

use std::{
    ops::{Deref, DerefMut},
    path::Path,
    time::Duration,
};

use anyhow::{Context, Result};
use base64::Engine as _;
use fleetrun_store::scratch::{ScratchDatabase, test_postgres_server};
use fleetrun_testkit::cluster::{Cluster, ClusterOptions, workspace_root};
use serde_json::{Value, json};

pub use fleetrun_testkit::{client::ApiClient, cluster, pki};

pub mod browser;

/// A cluster for one test.
#[derive(Debug)]
pub struct TestCluster {
    // Dropped in this order: the processes stop before their database goes.
    cluster: Cluster,
    dir: tempfile::TempDir,
    database: Option<ScratchDatabase>,
}

impl Deref for TestCluster {
    type Target = Cluster;
    fn deref(&self) -> &Cluster {
        &self.cluster
    }
}

impl DerefMut for TestCluster {
    fn deref_mut(&mut self) -> &mut Cluster {
        &mut self.cluster
    }
}

/// Starts a controller and `agents` agents for one test.
pub async fn start_cluster(agents: usize) -> Result<TestCluster> {
    let parent = workspace_root().join("target/test-clusters");
    std::fs::create_dir_all(&parent)?;
    let dir = tempfile::Builder::new()
        .prefix("cluster-")
        .tempdir_in(&parent)?;
    let database = match test_postgres_server() {
        Some(server) => Some(
            ScratchDatabase::create(&server, "fleetrun_it")
                .await
                .with_context(|| format!("creating a database on {server}"))?,
        ),
        None => None,
    };
    let cluster = Cluster::start(&ClusterOptions {
        agents,
        dir: dir.path().to_owned(),
        release: false,
        database: database.as_ref().map(|db| db.url().to_owned()),
        ..Default::default()
    })
    .await?;
    Ok(TestCluster {
        cluster,
        dir,
        database,
    })
}

/// Starts `controllers` controllers sharing the test's PostgreSQL database, with `agents`
/// agents, `options` adding to the cluster's options; `None` (saying that `test` is skipped)
/// when the tests run on SQLite, where one controller holds the file.
pub async fn start_shared_cluster(
    test: &str,
    agents: usize,
    controllers: usize,
    options: ClusterOptions,
) -> Result<Option<TestCluster>> {
    let Some(server) = test_postgres_server() else {
        println!("{test}: skipped on SQLite: controllers share only a PostgreSQL database");
        return Ok(None);
    };
    let parent = workspace_root().join("target/test-clusters");
    std::fs::create_dir_all(&parent)?;
    let dir = tempfile::Builder::new()
        .prefix("cluster-")
        .tempdir_in(&parent)?;
    let database = ScratchDatabase::create(&server, "fleetrun_it")
        .await
        .with_context(|| format!("creating a database on {server}"))?;
    let cluster = Cluster::start(&ClusterOptions {
        agents,
        controllers,
        dir: dir.path().to_owned(),
        database: Some(database.url().to_owned()),
        ..options
    })
    .await?;
    Ok(Some(TestCluster {
        cluster,
        dir,
        database: Some(database),
    }))
}

/// Whether the tests' controllers keep their database in a SQLite file; when not, says that
/// `test` is skipped, for tests of what only such a file has (its modes, an immutable file).
pub fn sqlite_only(test: &str) -> bool {
    if test_postgres_server().is_some() {
        println!("{test}: skipped on PostgreSQL: it tests the controller's SQLite file");
        return false;
    }
    true
}

impl TestCluster {
    pub fn dir(&self) -> &Path {
        self.dir.path()
    }

    /// The cluster's PostgreSQL database, when the tests run on PostgreSQL.
    pub fn database(&self) -> Option<&ScratchDatabase> {
        self.database.as_ref()
    }

    pub fn client(&self) -> ApiClient {
        self.info.client()
    }

    /// The host id the controller gave an agent's host.
    pub fn host_id(&self, agent_id: &str) -> i64 {
        self.info
            .hosts
            .iter()
            .find(|h| h.agent_id == agent_id)
            .unwrap_or_else(|| panic!("no agent {agent_id} in the cluster"))
            .bk_host_id
    }

    pub fn host_ids(&self) -> Vec<i64> {
        self.info.hosts.iter().map(|h| h.bk_host_id).collect()
    }

    /// A fast_execute_script request for a shell script on `hosts` as root; `extra` fields
    /// override the defaults.
    pub fn script_request(&self, script: &str, hosts: &[i64], extra: Value) -> Value {
        let mut request = self.info.scope();
        request["script_language"] = json!(1);
        request["script_content"] = json!(b64(script));
        request["account_alias"] = json!("root");
        request["timeout"] = json!(60);
        request["target_server"] = json!({ "host_id_list": hosts });
        if let Value::Object(extra) = extra {
            for (k, v) in extra {
                request[k] = v;
            }
        }
        request
    }

    /// Submits a job and waits for it; returns (job id, step id, final status data).
    pub async fn run_job(&self, request: Value) -> Result<(i64, i64, Value)> {
        let client = self.client();
        let accepted = client.call("fast_execute_script", request.clone()).await?;
        let job = accepted["job_instance_id"]
            .as_i64()
            .context("job_instance_id")?;
        let step = accepted["step_instance_id"]
            .as_i64()
            .context("step_instance_id")?;
        // The job is queried in the scope it was submitted in.
        let scope = json!({"bk_scope_type": request["bk_scope_type"], "bk_scope_id": request["bk_scope_id"]});
        let status = client
            .wait_job(&scope, job, Duration::from_secs(60))
            .await?;
        Ok((job, step, status))
    }

    /// Each host's log of a step, by host id.
    pub async fn logs(&self, job: i64, step: i64) -> Result<Vec<(i64, String)>> {
        self.client()
            .logs(&self.info.scope(), job, step, &self.host_ids())
            .await
    }

    /// `get_job_instance_status` of `job`, its hosts' results included; as it stood at the end
    /// of `execute_count` (bk-job's count of a step's runs) when given.
    pub async fn job_status_at(&self, job: i64, execute_count: Option<i64>) -> Result<Value> {
        let mut query = self.info.scope();
        query["job_instance_id"] = json!(job);
        query["return_ip_result"] = json!(true);
        if let Some(n) = execute_count {
            query["execute_count"] = json!(n);
        }
        self.client().call("get_job_instance_status", query).await
    }

    /// Waits up to `limit` until `job` is in `job_status`; returns that status, as
    /// [`Self::job_status_at`] reads it.
    pub async fn wait_for_status(
        &self,
        job: i64,
        job_status: i64,
        limit: Duration,
    ) -> Result<Value> {
        eventually(
            limit,
            &format!("job {job} in status {job_status}"),
            || async move {
                let status = self.job_status_at(job, None).await.ok()?;
                (status["job_instance"]["status"] == job_status).then_some(status)
            },
        )
        .await
    }

    /// Submits `request` to `api`, an API that creates a job (`push_config_file`,
    /// `fast_transfer_file`, ...): (job id, step id).
    pub async fn submit_to(&self, api: &str, request: Value) -> Result<(i64, i64)> {
        let accepted = self.client().call(api, request).await?;
        Ok((
            accepted["job_instance_id"].as_i64().context("job id")?,
            accepted["step_instance_id"].as_i64().context("step id")?,
        ))
    }

    /// Submits `request` to `api` as [`Self::submit_to`] does and waits up to `limit` for the
    /// job's end: (job id, step id, final status data).
    pub async fn run_to_end(
        &self,
        api: &str,
        request: Value,
        limit: Duration,
    ) -> Result<(i64, i64, Value)> {
        let (job, step) = self.submit_to(api, request).await?;
        let status = self
            .client()
            .wait_job(&self.info.scope(), job, limit)
            .await?;
        Ok((job, step, status))
    }

    /// The refusal of `request` by `api`: (code, message); panics if it was accepted.
    pub async fn refused(&self, api: &str, request: Value) -> Result<(i64, String)> {
        let reply = self.client().call_raw(api, request).await?;
        assert_eq!(reply["result"], false, "must be refused: {reply}");
        Ok((
            reply["code"].as_i64().unwrap_or_default(),
            reply["message"].as_str().unwrap_or_default().to_owned(),
        ))
    }

    /// One host's file logs of a file step, as `get_job_instance_ip_log` lists them (its
    /// `file_logs`); asserts that the log is a file step's (`log_type` 2).
    pub async fn file_logs(&self, job: i64, step: i64, host: i64) -> Result<Value> {
        let mut body = self.info.scope();
        body["job_instance_id"] = json!(job);
        body["step_instance_id"] = json!(step);
        body["bk_host_id"] = json!(host);
        let data = self.client().call("get_job_instance_ip_log", body).await?;
        assert_eq!(data["log_type"], 2, "{data}");
        Ok(data["file_logs"].clone())
    }
}

/// Asserts that `reply` (a whole reply, as `call_raw` returns it) is a refusal with `code` whose
/// message contains `says`.
pub fn assert_refused(reply: &Value, code: i64, says: &str) {
    assert_eq!(reply["result"], false, "{reply}");
    assert_eq!(reply["code"], code, "{reply}");
    assert!(reply_message(reply).contains(says), "{reply}");
}

/// A reply's message; empty if it has none.
pub fn reply_message(reply: &Value) -> &str {
    reply["message"].as_str().unwrap_or_default()
}

/// The ids of the hosts a job reached (its per-host results), sorted.
pub fn reached(status: &Value) -> Vec<i64> {
    let mut ids: Vec<i64> = host_results(status)
        .iter()
        .filter_map(|r| r["bk_host_id"].as_i64())
        .collect();
    ids.sort_unstable();
    ids
}

/// Builds the `fleetrun` binary once per test binary; returns its path.
pub fn fleetrun_bin() -> &'static Path {
    static BIN: std::sync::OnceLock<std::path::PathBuf> = std::sync::OnceLock::new();
    BIN.get_or_init(|| {
        let mut cmd = fleetrun_testkit::cluster::cargo_command();
        cmd.args(["build", "--locked", "--quiet", "-p", "fleetrun-cli"]);
        let status = cmd.status().expect("running cargo build -p fleetrun-cli");
        assert!(status.success(), "cargo build -p fleetrun-cli failed");
        let target = std::env::var_os("CARGO_TARGET_DIR")
            .map(std::path::PathBuf::from)
            .unwrap_or_else(|| workspace_root().join("target"));
        target.join("debug/fleetrun")
    })
}

/// The per-host results in a `get_job_instance_status` reply.
pub fn host_results(status: &Value) -> Vec<Value> {
    status["step_instance_list"][0]["step_ip_result_list"]
        .as_array()
        .cloned()
        .unwrap_or_default()
}

pub fn b64(text: &str) -> String {
    base64::engine::general_purpose::STANDARD.encode(text)
}

/// Polls `check` every 50 ms until it yields a value or `limit` passes.
pub async fn eventually<T, F, Fut>(limit: Duration, what: &str, mut check: F) -> Result<T>
where
    F: FnMut() -> Fut,
    Fut: std::future::Future<Output = Option<T>>,
{
    let deadline = tokio::time::Instant::now() + limit;
    loop {
        if let Some(value) = check().await {
            return Ok(value);
        }
        anyhow::ensure!(
            tokio::time::Instant::now() < deadline,
            "{what}: not within {limit:?}"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

fn tail(path: &Path, lines: usize) -> String {
    let text = std::fs::read_to_string(path).unwrap_or_default();
    let all: Vec<&str> = text.lines().collect();
    all[all.len().saturating_sub(lines)..].join("\n")
}

impl Drop for TestCluster {
    fn drop(&mut self) {
        self.cluster.stop();
        if std::thread::panicking() {
            eprintln!(
                "--- controller log ({})\n{}",
                self.controller_log.display(),
                tail(&self.controller_log, 60)
            );
            for agent in &self.agents {
                eprintln!("--- {} log\n{}", agent.agent_id, tail(&agent.log, 30));
            }
        }
    }
}
