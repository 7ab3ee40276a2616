//! `cargo xtask e2e --controllers N --database postgres`: several controllers sharing a
//! PostgreSQL database, agents on network-namespace hosts each listing every controller (agent
//! `i` tries controller `i mod N` first). Jobs are submitted round-robin to every API and reach
//! every host; a controller holding agents is SIGKILLed while a job runs on them, and every host
//! still ends 9 with all its lines exactly once, the callback fired once; a controller restarted
//! while idle rejoins and takes agents again.

use std::{
    sync::Arc,
    time::{Duration, Instant},
};

use anyhow::{Context, Result, ensure};
use serde_json::{Value, json};

use fleetrun_testkit::{
    cluster::{Cluster, ClusterOptions, workspace_root},
    netns::Network,
};

use super::{counted, counter, reattach::CallbackInbox};

/// The PostgreSQL server `--database` names: a URL, or `postgres` for `FLEETRUN_TEST_DATABASE`
/// (the tests' server) or else the local one.
pub fn server(database: &str) -> String {
    if database.starts_with("postgres://") || database.starts_with("postgresql://") {
        return database.to_owned();
    }
    std::env::var(fleetrun_store::scratch::TEST_DATABASE_VARIABLE)
        .ok()
        .filter(|v| v.starts_with("postgres"))
        .unwrap_or_else(|| "postgres://postgres@127.0.0.1:5432".to_owned())
}

/// The controllers' `[cluster] lease_secs`: a killed controller is taken for dead after it.
const LEASE_SECS: u64 = 3;

struct ClusterCtx {
    cluster: Cluster,
    controllers: usize,
}

impl ClusterCtx {
    fn hosts(&self) -> Vec<i64> {
        super::host_ids(&self.cluster)
    }

    fn request(&self, script: &str, extra: Value) -> Value {
        super::script_request(&self.cluster, script, extra)
    }

    async fn submit_to(&self, index: usize, request: Value) -> Result<(i64, i64)> {
        let accepted = self
            .cluster
            .client_at(index)
            .call("fast_execute_script", request)
            .await?;
        Ok((
            accepted["job_instance_id"].as_i64().context("job id")?,
            accepted["step_instance_id"].as_i64().context("step id")?,
        ))
    }

    /// Waits for the job through controller `index`; checks it and every host succeeded with
    /// `expected` as output.
    async fn expect_success(
        &self,
        index: usize,
        job: i64,
        step: i64,
        expected: &str,
        limit: Duration,
    ) -> Result<()> {
        let client = self.cluster.client_at(index);
        let scope = self.cluster.info.scope();
        let status = client.wait_job(&scope, job, limit).await?;
        ensure!(
            status["job_instance"]["status"] == json!(3),
            "job {job}: {status}"
        );
        let results = status["step_instance_list"][0]["step_ip_result_list"]
            .as_array()
            .cloned()
            .unwrap_or_default();
        ensure!(results.len() == self.hosts().len(), "job {job}: {status}");
        for result in &results {
            ensure!(result["status"] == json!(9), "job {job}: {result}");
        }
        for (host, log) in client.logs(&scope, job, step, &self.hosts()).await? {
            ensure!(
                log == expected,
                "job {job}, host {host}: output not complete exactly once: {log:?}"
            );
        }
        Ok(())
    }

    /// How many times controller `index`'s log says an agent came online.
    fn agents_taken(&self, index: usize) -> usize {
        std::fs::read_to_string(self.cluster.controller_log_at(index))
            .unwrap_or_default()
            .matches("agent online")
            .count()
    }

    /// Waits until every agent is online, after a controller's connections have had time to
    /// count for nothing (a killed controller's count until its lease runs out).
    async fn all_online(&self) -> Result<()> {
        tokio::time::sleep(Duration::from_secs(LEASE_SECS + 1)).await;
        let ids: Vec<String> = self
            .cluster
            .agents
            .iter()
            .map(|a| a.agent_id.clone())
            .collect();
        self.cluster
            .wait_online(&ids, Duration::from_secs(120))
            .await?;
        Ok(())
    }
}

/// Jobs submitted round-robin to every controller's API all succeed on every host.
async fn round_robin(ctx: &mut ClusterCtx) -> Result<()> {
    let mut jobs = Vec::new();
    for i in 0..ctx.controllers * 2 {
        let index = i % ctx.controllers;
        let (job, step) = ctx
            .submit_to(index, ctx.request(&counter(20, "0.05"), json!({})))
            .await?;
        jobs.push((index, job, step));
    }
    for (index, job, step) in jobs {
        // Followed through the next controller: any of them reads the shared store.
        let through = (index + 1) % ctx.controllers;
        ctx.expect_success(through, job, step, &counted(20), Duration::from_secs(120))
            .await?;
    }
    Ok(())
}

/// A 20 s numbered-line job submitted to c1; c2, holding agents that run it, is SIGKILLed
/// midway. Its agents go back to it until it has been unreachable for a while, then to another
/// controller, which takes their tasks over with their output: every host ends 9 with every
/// line once, and c1 fires the callback once.
async fn controller_killed(ctx: &mut ClusterCtx) -> Result<()> {
    killed_midway(ctx, 1, 0, "the killed controller's hosts ended").await
}

/// A 20 s numbered-line job submitted to c1, which holds its lease and some of its agents, and
/// c1 is SIGKILLed midway. Another controller takes the job up once c1's lease runs out; c1's
/// agents give c1 up and bring their tasks to another controller, which takes them over with
/// their output: every host ends 9 (none 310) with every line once, and the callback fires once,
/// from the controller that took the job up.
async fn lease_holder_killed(ctx: &mut ClusterCtx) -> Result<()> {
    killed_midway(ctx, 0, 1, "the lease holder's job ended").await
}

/// Submits a 20 s numbered-line job with a callback to c1, SIGKILLs controller `killed` 5 s in,
/// follows the job through controller `through` to success on every host with every line once,
/// starts `killed` again, and expects one callback with the job's success. `ended` begins the
/// line that says how long after the kill the job ended.
async fn killed_midway(
    ctx: &mut ClusterCtx,
    killed: usize,
    through: usize,
    ended: &str,
) -> Result<()> {
    let inbox = CallbackInbox::start().await?;
    let (job, step) = ctx
        .submit_to(
            0,
            ctx.request(
                &counter(200, "0.1"),
                json!({"callback_url": inbox.url, "timeout": 30}),
            ),
        )
        .await?;
    tokio::time::sleep(Duration::from_secs(5)).await;
    ctx.cluster.kill_controller_at(killed)?;
    let waited = Instant::now();
    let outcome = ctx
        .expect_success(through, job, step, &counted(200), Duration::from_secs(300))
        .await;
    println!("  {ended} {:.1?} after the kill", waited.elapsed());
    ctx.cluster.start_controller_at(killed).await?;
    outcome?;
    let callbacks = inbox
        .for_job(job, Duration::from_secs(30), Duration::from_secs(3))
        .await?;
    ensure!(
        callbacks.len() == 1 && callbacks[0]["status"] == json!(3),
        "the job's callback, once: {callbacks:?}"
    );
    ctx.all_online().await
}

/// The last controller, killed while idle and started again, rejoins: a job through it reaches
/// every host, and once the others go, it takes every agent again.
async fn restarted_idle(ctx: &mut ClusterCtx) -> Result<()> {
    let last = ctx.controllers - 1;
    ctx.cluster.kill_controller_at(last)?;
    ctx.all_online().await?;
    tokio::time::sleep(Duration::from_secs(2)).await;
    ctx.cluster.start_controller_at(last).await?;
    let (job, step) = ctx
        .submit_to(last, ctx.request(&counter(5, "0.05"), json!({})))
        .await?;
    ctx.expect_success(last, job, step, &counted(5), Duration::from_secs(120))
        .await?;
    // Its agents found other controllers meanwhile; when those go, every agent comes to it.
    let before = ctx.agents_taken(last);
    for other in 0..last {
        ctx.cluster.kill_controller_at(other)?;
    }
    let deadline = Instant::now() + Duration::from_secs(120);
    while ctx.agents_taken(last) < before + ctx.hosts().len() {
        ensure!(
            Instant::now() < deadline,
            "the restarted controller did not take every agent within 120 s"
        );
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    let (job, step) = ctx
        .submit_to(last, ctx.request(&counter(5, "0.05"), json!({})))
        .await?;
    let alone = ctx
        .expect_success(last, job, step, &counted(5), Duration::from_secs(120))
        .await;
    for other in 0..last {
        ctx.cluster.start_controller_at(other).await?;
    }
    alone?;
    ctx.all_online().await?;
    let (job, step) = ctx
        .submit_to(0, ctx.request(&counter(5, "0.05"), json!({})))
        .await?;
    ctx.expect_success(0, job, step, &counted(5), Duration::from_secs(120))
        .await
}

const SCENARIOS: &[&str] = &[
    "round-robin",
    "controller-killed",
    "lease-holder-killed",
    "restarted-idle",
];

pub async fn run(opts: &super::E2eOptions, controllers: usize, database: &str) -> Result<()> {
    ensure!(
        controllers >= 2,
        "a cluster e2e needs two controllers or more"
    );
    let server = server(database);
    let network = Arc::new(Network::create(opts.hosts)?);
    let dir = workspace_root().join("target/e2e-cluster");
    let _ = std::fs::remove_dir_all(&dir);
    println!(
        "{} hosts in network namespaces on bridge {} ({}), {controllers} controllers on {server}",
        opts.hosts, network.bridge, network.gateway
    );
    // Dropped after the cluster: the processes stop before their database goes.
    let scratch = fleetrun_store::scratch::ScratchDatabase::create(&server, "fleetrun_e2e")
        .await
        .map_err(|e| anyhow::anyhow!("creating the e2e database on {server}: {e}"))?;
    let cluster = Cluster::start(&ClusterOptions {
        agents: opts.hosts,
        dir: dir.clone(),
        release: opts.release,
        network: Some(network.clone()),
        controllers,
        database: Some(scratch.url().to_owned()),
        lease_secs: Some(LEASE_SECS),
        ..Default::default()
    })
    .await?;
    let mut ctx = ClusterCtx {
        cluster,
        controllers,
    };
    let (mut passed, mut failed) = (0, 0);
    for name in SCENARIOS
        .iter()
        .filter(|n| opts.only.as_deref().is_none_or(|o| n.contains(o)))
    {
        let started = Instant::now();
        let outcome = match *name {
            "round-robin" => round_robin(&mut ctx).await,
            "controller-killed" => controller_killed(&mut ctx).await,
            "lease-holder-killed" => lease_holder_killed(&mut ctx).await,
            _ => restarted_idle(&mut ctx).await,
        };
        match outcome {
            Ok(()) => {
                passed += 1;
                println!("PASS {name} ({:.1?})", started.elapsed());
            }
            Err(e) => {
                failed += 1;
                println!("FAIL {name} ({:.1?}): {e:#}", started.elapsed());
            }
        }
    }
    ctx.cluster.stop();
    drop(ctx);
    drop(scratch);
    println!("logs in {}", dir.display());
    println!("e2e: {passed} passed, {failed} failed");
    ensure!(failed == 0, "{failed} e2e scenarios failed");
    Ok(())
}
