//! `cargo xtask bench`: fleetrun's benchmark suite.
//!
//! Every figure is measured in one run beside what it is compared with: published figures
//! (GSE, bk-job users, Salt) are printed next to it, and the machine's own floor (the rate it
//! forks and reaps shells) is measured in the same run. Release builds only.
//!
//! Groups (`--only` takes a comma-separated list):
//! - `fanout`: controller + `fleetrun-swarm` (virtual agents, EMULATED executor: no fork), one
//!   job to 100, 1,000 and 10,000 hosts; HTTP accept and accept -> every host final, p50/p99;
//!   the controller's own timestamps say where the time went.
//! - `real`: controller + 100 real agents, `echo ok` on 10 and 100 hosts, beside Salt.
//! - `throughput`: single-host jobs, 16 in flight on 4 real agents, beside the raw fork rate.
//! - `latency`: submit -> first output line readable through the log API.
//! - `output`: 50 MiB from one host, MiB/s and peak RSS of agent and controller.
//! - `footprint`: controller RSS per connected agent (swarm), a real agent's idle RSS and CPU.
//! - `script`: controller peak RSS while one 16 MiB script goes to 1,000 swarm hosts.
//! - `inventory`: `fleetrun-inventory`'s `resolve_bench` example, when it exists.
//! - `overhead`: what metrics and the audit trail cost against the 5% target, off then on:
//!   single-host job throughput (swarm, emulated), the controller's instructions per job under
//!   callgrind (when valgrind is installed; also with each feature alone), and CPU time per job
//!   with 4 real agents (the controller's added share is the figure with a verdict).
//! - `console`: the web console's page of a 10,000-host job (swarm) and its data, served.
//! - `files`: 256 MiB (64 quick) from one real agent to 10 through `fast_transfer_file`: wall
//!   time, source bytes read, controller bytes relayed, peak RSS, and the aggregate rate beside
//!   one QUIC stream on loopback measured in the same run.
//! - `agents50k`: 50,000 swarm agents on one controller: connect, idle CPU, KiB per agent,
//!   one job to all.
//! - `postgres`: PostgreSQL beside SQLite (swarm, emulated): a 10,000-host fan-out on one
//!   controller with each, and on two controllers sharing PostgreSQL with the agents spread
//!   over both; single-host job throughput on each; the database rows and bytes per host-run,
//!   per table. The server is `FLEETRUN_BENCH_POSTGRES` (default the local one); its databases
//!   are made for the run and dropped.
//!
//! Writes `target/bench/<timestamp>.json` and `target/bench/latest.json`.

mod agents50k;
mod console;
mod files;
mod inventory;
mod jobs;
mod overhead;
mod postgres;
mod real;
mod report;
mod script;
mod swarm;
mod sys;

use std::{
    path::PathBuf,
    time::{Duration, Instant},
};

use anyhow::{Context, Result, bail, ensure};
use fleetrun_testkit::cluster::workspace_root;
use serde_json::json;

pub use report::Figure;

/// Every group, in the order they run.
pub const GROUPS: &[&str] = &[
    "fanout",
    "footprint",
    "real",
    "throughput",
    "latency",
    "output",
    "script",
    "inventory",
    "overhead",
    "console",
    "files",
    "agents50k",
    "postgres",
];

#[derive(Debug, Clone, Default)]
pub struct BenchOptions {
    /// Fewer runs and shorter windows: about two minutes.
    pub quick: bool,
    /// Groups to run; empty for all.
    pub only: Vec<String>,
}

/// What the scenarios share.
#[derive(Debug)]
pub(crate) struct Ctx {
    pub root: PathBuf,
    /// Scratch directory for the clusters (logs stay there after the run).
    pub work: PathBuf,
    pub bin_dir: PathBuf,
    pub quick: bool,
    only: Vec<String>,
}

impl Ctx {
    pub fn wants(&self, group: &str) -> bool {
        self.only.is_empty() || self.only.iter().any(|g| g == group)
    }
}

/// Builds the controller, the agent and the swarm in release mode; returns their directory.
fn build() -> Result<PathBuf> {
    let mut cmd = fleetrun_testkit::cluster::cargo_command();
    cmd.args([
        "build",
        "--release",
        "--locked",
        "--quiet",
        "-p",
        "fleetrun-controller",
        "-p",
        "fleetrun-agent",
        "-p",
        "fleetrun-swarm",
    ]);
    ensure!(
        cmd.status().context("running cargo build")?.success(),
        "cargo build failed"
    );
    let target = std::env::var_os("CARGO_TARGET_DIR")
        .map(PathBuf::from)
        .unwrap_or_else(|| workspace_root().join("target"));
    Ok(target.join("release"))
}

pub async fn run(opts: BenchOptions) -> Result<()> {
    for group in &opts.only {
        ensure!(
            GROUPS.contains(&group.as_str()),
            "unknown group {group:?}; groups: {}",
            GROUPS.join(", ")
        );
    }
    let root = workspace_root();
    let out_dir = root.join("target/bench");
    let building = Instant::now();
    println!("building release binaries (controller, agent, swarm)");
    let bin_dir = build()?;
    println!("built in {:.0?}", building.elapsed());
    let ctx = Ctx {
        work: out_dir.join("work"),
        root: root.clone(),
        bin_dir,
        quick: opts.quick,
        only: opts.only.clone(),
    };
    std::fs::create_dir_all(&ctx.work)?;

    let started = Instant::now();
    let stamp = sys::timestamp();
    let mut figures: Vec<Figure> = Vec::new();
    let mut errors: Vec<String> = Vec::new();
    let mut scenario = async |name: &str, wanted: bool, figures: &mut Vec<Figure>| {
        if !wanted {
            return;
        }
        println!("[{:>5.1} s] {name} …", started.elapsed().as_secs_f64());
        let result = match name {
            "swarm" => swarm::run(&ctx, figures).await,
            "real" => real::run(&ctx, figures).await,
            "script" => script::run(&ctx, figures).await,
            "overhead" => overhead::run(&ctx, figures).await,
            "console" => console::run(&ctx, figures).await,
            "files" => files::run(&ctx, figures).await,
            "agents50k" => agents50k::run(&ctx, figures).await,
            "postgres" => postgres::run(&ctx, figures).await,
            _ => inventory::run(&ctx, figures).await,
        };
        if let Err(e) = result {
            eprintln!("{name} scenario failed: {e:#}");
            errors.push(format!("{name}: {e:#}"));
        }
    };
    scenario(
        "swarm",
        ctx.wants("fanout") || ctx.wants("footprint"),
        &mut figures,
    )
    .await;
    scenario(
        "real",
        ["real", "throughput", "latency", "output", "footprint"]
            .iter()
            .any(|g| ctx.wants(g)),
        &mut figures,
    )
    .await;
    scenario("script", ctx.wants("script"), &mut figures).await;
    scenario("inventory", ctx.wants("inventory"), &mut figures).await;
    scenario("overhead", ctx.wants("overhead"), &mut figures).await;
    scenario("console", ctx.wants("console"), &mut figures).await;
    scenario("files", ctx.wants("files"), &mut figures).await;
    scenario("postgres", ctx.wants("postgres"), &mut figures).await;
    // Only when asked for: it takes minutes and most of the machine.
    scenario(
        "agents50k",
        ctx.only.iter().any(|g| g == "agents50k"),
        &mut figures,
    )
    .await;
    let took = started.elapsed();

    figures.retain(|f| ctx.wants(f.group));
    let previous = report::previous_values(&out_dir);
    for figure in &mut figures {
        figure.previous = previous.get(&figure.name).copied();
    }
    // Group the table as GROUPS orders it, keeping each group's own order.
    figures.sort_by_key(|f| GROUPS.iter().position(|g| *g == f.group));
    let table = report::table(&figures);
    println!(
        "\nfleetrun bench ({}), {:.0?}\n",
        if ctx.quick { "quick" } else { "full" },
        took
    );
    print!("{table}");

    let report = json!({
        "timestamp": stamp,
        "quick": ctx.quick,
        "only": ctx.only,
        "duration_secs": took.as_secs_f64(),
        "machine": sys::machine(),
        "git": sys::git(&root),
        "figures": figures.iter().map(Figure::to_json).collect::<Vec<_>>(),
        "errors": errors,
    });
    let text = serde_json::to_string_pretty(&report)?;
    let path = out_dir.join(format!("{stamp}.json"));
    std::fs::write(&path, &text)?;
    std::fs::write(out_dir.join("latest.json"), &text)?;
    println!("\nwrote {} (and latest.json)", path.display());
    if took > Duration::from_secs(600) {
        eprintln!("warning: the run took over 10 minutes");
    }
    if !errors.is_empty() {
        bail!("{} scenario(s) failed: {}", errors.len(), errors.join("; "));
    }
    Ok(())
}
