//! `cargo xtask <command>`: development certificates, a local cluster, the demo.

use std::{path::PathBuf, time::Duration};

use anyhow::{Context, Result};
use base64::Engine as _;
use clap::{Parser, Subcommand};
use fleetrun_testkit::cluster::{Cluster, ClusterOptions, workspace_root};
use serde_json::json;

#[derive(Debug, Parser)]
#[command(about = "fleetrun's developer and integration commands")]
struct Args {
    #[command(subcommand)]
    command: Cmd,
}

#[derive(Debug, Subcommand)]
enum Cmd {
    /// Write a development PKI: a CA, the controller's certificate, one per agent.
    Certs {
        /// Where to write them.
        #[arg(long, default_value = "certs")]
        dir: PathBuf,
        /// Agent certificates to issue (agent-1 … agent-N).
        #[arg(long, default_value_t = 3)]
        agents: usize,
    },
    /// Start a controller and N agents on this machine, write DIR/cluster.json, and run until
    /// interrupted (SIGINT or SIGTERM), then stop everything.
    Cluster {
        #[arg(long, default_value_t = 3)]
        agents: usize,
        #[arg(long, default_value = "target/cluster")]
        dir: PathBuf,
        /// Use release builds.
        #[arg(long)]
        release: bool,
        /// The inventory file; by default a small example topology (see crates/fleetrun-testkit/src/cluster.rs).
        #[arg(long)]
        inventory: Option<PathBuf>,
        /// Controllers sharing the database (named c1, c2, …); more than one needs
        /// `--database postgres://…`.
        #[arg(long, default_value_t = 1)]
        controllers: usize,
        /// A PostgreSQL server (`postgres://user@host:port`): the cluster gets a database of its
        /// own there, dropped at teardown. By default a SQLite file in DIR.
        #[arg(long)]
        database: Option<String>,
    },
    /// Run the end-to-end scenarios on hosts in network namespaces (needs root).
    E2e {
        /// Namespace hosts, one agent each.
        #[arg(long, default_value_t = 3)]
        hosts: usize,
        /// Use release builds.
        #[arg(long)]
        release: bool,
        /// Run only the scenarios whose name contains this.
        #[arg(long)]
        only: Option<String>,
        /// Several controllers sharing a PostgreSQL database, with their own scenarios (jobs
        /// round-robin, a controller killed mid-job, one restarted while idle).
        #[arg(long, default_value_t = 1)]
        controllers: usize,
        /// With `--controllers`: `postgres` (FLEETRUN_TEST_DATABASE's server, else
        /// 127.0.0.1:5432) or a server URL; the run gets a database of its own there.
        #[arg(long)]
        database: Option<String>,
    },
    /// Run the benchmark suite (release builds): prints a table, writes target/bench/*.json.
    Bench {
        /// About two minutes: fewer runs, shorter windows.
        #[arg(long)]
        quick: bool,
        /// Only these groups (comma-separated): fanout, footprint, real, throughput, latency,
        /// output, script, inventory, overhead, console, files, agents50k, postgres.
        #[arg(long, value_delimiter = ',')]
        only: Vec<String>,
    },
    /// Build the Debian packages of the controller, the agent and the CLI into target/dist
    /// (needs cargo-deb).
    Dist {
        /// The cargo profile to build with; `dev` reuses a debug build.
        #[arg(long, default_value = "release")]
        profile: String,
        /// Lighter compression: quicker, larger packages.
        #[arg(long)]
        fast: bool,
    },
    /// Run a script on a 3-agent local cluster through the bk-job API, print each host's result.
    Demo {
        #[arg(long, default_value_t = 3)]
        agents: usize,
    },
}

fn main() -> Result<()> {
    let args = Args::parse();
    let runtime = tokio::runtime::Runtime::new()?;
    match args.command {
        Cmd::Certs { dir, agents } => {
            let dir = workspace_root().join(dir);
            fleetrun_testkit::pki::generate(&dir, agents)?;
            println!(
                "wrote a development PKI with {agents} agent certificates to {}",
                dir.display()
            );
            Ok(())
        }
        Cmd::Cluster {
            agents,
            dir,
            release,
            inventory,
            controllers,
            database,
        } => runtime.block_on(cluster(
            agents,
            workspace_root().join(dir),
            release,
            inventory,
            controllers,
            database,
        )),
        Cmd::Demo { agents } => runtime.block_on(demo(agents)),
        Cmd::Dist { profile, fast } => {
            xtask::dist::build(&xtask::dist::DistOptions { profile, fast }).map(|_| ())
        }
        Cmd::Bench { quick, only } => {
            runtime.block_on(xtask::bench::run(xtask::bench::BenchOptions {
                quick,
                only,
            }))
        }
        Cmd::E2e {
            hosts,
            release,
            only,
            controllers,
            database,
        } => {
            anyhow::ensure!(
                controllers <= 1 || database.is_some(),
                "several controllers share a PostgreSQL database: give --database postgres"
            );
            // The single-controller scenarios run on SQLite: a database given would be ignored.
            anyhow::ensure!(
                controllers > 1 || database.is_none(),
                "--database is for several controllers: give --controllers 2 or more, or no \
                 --database (one controller runs on SQLite)"
            );
            runtime.block_on(xtask::e2e::run(&xtask::e2e::E2eOptions {
                hosts,
                release,
                only,
                controllers: (controllers > 1).then(|| (controllers, database.unwrap_or_default())),
            }))
        }
    }
}

async fn cluster(
    agents: usize,
    dir: PathBuf,
    release: bool,
    inventory: Option<PathBuf>,
    controllers: usize,
    database: Option<String>,
) -> Result<()> {
    let _ = std::fs::remove_dir_all(&dir);
    anyhow::ensure!(
        controllers <= 1 || database.is_some(),
        "several controllers share a PostgreSQL database: give --database postgres://…"
    );
    // Dropped after the cluster: the processes stop before their database goes.
    let scratch = match &database {
        Some(server) => Some(
            fleetrun_store::scratch::ScratchDatabase::create(server, "fleetrun_cluster")
                .await
                .map_err(|e| anyhow::anyhow!("creating the cluster's database on {server}: {e}"))?,
        ),
        None => None,
    };
    let cluster = Cluster::start(&ClusterOptions {
        agents,
        dir: dir.clone(),
        release,
        inventory: inventory.map(|f| workspace_root().join(f)),
        database: scratch.as_ref().map(|db| db.url().to_owned()),
        controllers,
        ..Default::default()
    })
    .await?;
    println!(
        "cluster up: {} agents, API {}",
        cluster.agents.len(),
        cluster.info.api_urls.join(", ")
    );
    println!("details in {}", dir.join("cluster.json").display());
    println!("logs in {}; Ctrl-C stops everything", dir.display());
    let mut term = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate())?;
    tokio::select! {
        _ = tokio::signal::ctrl_c() => {}
        _ = term.recv() => {}
    }
    println!("stopping");
    drop(cluster);
    drop(scratch);
    Ok(())
}

const DEMO_SCRIPT: &str = r#"#!/bin/bash
echo "hello from $(hostname), running as $(whoami) in $PWD"
echo "arguments: $# -> $*"
echo "kernel: $(uname -sr)"
"#;

async fn demo(agents: usize) -> Result<()> {
    let started = std::time::Instant::now();
    let dir = workspace_root().join("target/demo");
    let _ = std::fs::remove_dir_all(&dir);
    println!(
        "starting a controller and {agents} agents (logs in {})",
        dir.display()
    );
    let cluster = Cluster::start(&ClusterOptions {
        agents,
        dir,
        release: false,
        ..Default::default()
    })
    .await?;
    let info = &cluster.info;
    let client = info.client();
    let hosts: Vec<i64> = info.hosts.iter().map(|h| h.bk_host_id).collect();
    let account = info.accounts.last().context("no account")?;
    let mut request = info.scope();
    request["task_name"] = json!("fleetrun demo");
    request["script_language"] = json!(1);
    request["script_content"] =
        json!(base64::engine::general_purpose::STANDARD.encode(DEMO_SCRIPT));
    request["script_param"] =
        json!(base64::engine::general_purpose::STANDARD.encode("'first arg' second"));
    request["account_alias"] = json!(account.alias);
    request["timeout"] = json!(60);
    request["target_server"] = json!({"host_id_list": hosts});
    println!(
        "POST {}/api/v3/fast_execute_script/ as account {:?} on hosts {hosts:?}",
        info.api_url, account.account
    );
    let submitted = std::time::Instant::now();
    let accepted = client.submit(request).await?;
    let (job, step) = (accepted.job_instance_id, accepted.step_instance_id);
    client
        .wait_job(&info.scope(), job, Duration::from_secs(60))
        .await?;
    let took = submitted.elapsed();
    let status = client.job_status(&info.scope(), job, true).await?;
    let logs = client.logs(&info.scope(), job, step, &hosts).await?;
    println!(
        "\njob {job} finished with status {} in {took:.2?}",
        status.job_instance.status.code()
    );
    let results = status
        .step_instance_list
        .first()
        .and_then(|step| step.step_ip_result_list.clone())
        .unwrap_or_default();
    for result in &results {
        let id = result.bk_host_id;
        let exit = result
            .exit_code
            .map_or_else(|| "null".to_owned(), |c| c.to_string());
        println!(
            "\n== host {id} ({}) status {} exit {exit}",
            result.ip,
            result.status.code(),
        );
        if let Some((_, log)) = logs.iter().find(|(h, _)| *h == id) {
            for line in log.lines() {
                println!("   {line}");
            }
        }
    }
    drop(cluster);
    println!(
        "\ncluster stopped; demo took {:.1?} in all",
        started.elapsed()
    );
    anyhow::ensure!(
        status.job_instance.status == fleetrun_api::JobStatus::Success,
        "the demo job did not succeed"
    );
    Ok(())
}
