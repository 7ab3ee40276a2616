//! 50,000 emulated agents on one controller (issue #21): how long they take to connect, the
//! controller's CPU and memory while they idle, and one job to all of them. Swarms of 10,000
//! join one after the other; when one cannot, the figures say how many were connected and what
//! broke.

use std::time::{Duration, Instant};

use anyhow::{Context, Result};
use fleetrun_testkit::cluster::{Cluster, ClusterOptions};

use super::{
    Ctx,
    jobs::{Api, quantile},
    report::Figure,
    swarm::{PREFIX, SwarmProcess},
    sys,
};

const AGENTS: usize = 50_000;
const PER_SWARM: usize = 10_000;

pub async fn run(ctx: &Ctx, figures: &mut Vec<Figure>) -> Result<()> {
    let dir = ctx.work.join("agents50k");
    let _ = std::fs::remove_dir_all(&dir);
    let mut cluster = Cluster::start(&ClusterOptions {
        agents: 0,
        dir: dir.clone(),
        release: true,
        // Virtual agents report made-up addresses, all connecting from this machine.
        trust_reported_ip_in: vec![0],
        ..Default::default()
    })
    .await?;
    let mut swarms = Vec::new();
    let result = measure(ctx, &cluster, &dir, &mut swarms, figures).await;
    for swarm in swarms {
        swarm.stop().await;
    }
    cluster.stop();
    result
}

async fn measure(
    ctx: &Ctx,
    cluster: &Cluster,
    dir: &std::path::Path,
    swarms: &mut Vec<SwarmProcess>,
    figures: &mut Vec<Figure>,
) -> Result<()> {
    let api = Api::new(&cluster.info);
    let controller = sys::pid_with_arg(&cluster.controller_config.to_string_lossy())
        .context("the controller's process")?;
    tokio::time::sleep(Duration::from_secs(1)).await;
    let rss_empty = sys::status_kib(controller, "VmRSS")?;

    let started = Instant::now();
    let mut connected = 0;
    let mut welcomed_secs = Vec::new();
    while connected < AGENTS {
        let count = PER_SWARM.min(AGENTS - connected);
        let joined = async {
            let mut swarm = SwarmProcess::start(
                ctx,
                cluster,
                connected + 1,
                count,
                dir.join(format!("swarm-{}.log", swarms.len() + 1)),
                &[],
            )
            .await?;
            let secs = swarm.wait_welcomed(Duration::from_secs(600)).await;
            swarms.push(swarm);
            secs
        };
        match joined.await {
            Ok(secs) => welcomed_secs.push(secs),
            Err(e) => {
                figures.push(
                    Figure::new(
                        "agents50k",
                        "agents50k.connected",
                        "agents connected before the next 10,000 could not be",
                    )
                    .value(connected as f64, "agents")
                    .at_least(AGENTS as f64)
                    .note(format!(
                        "{e:#}; VmRSS {} KiB",
                        sys::status_kib(controller, "VmRSS")?
                    )),
                );
                return Err(e);
            }
        }
        connected += count;
    }
    figures.push(
        Figure::new(
            "agents50k",
            "agents50k.connect",
            "50,000 agents handshaken and welcomed, swarms of 10,000 one after the other (emulated)",
        )
        .value(started.elapsed().as_secs_f64(), "s")
        .note(format!(
            "each swarm's own time, s: {}",
            welcomed_secs
                .iter()
                .map(|s| format!("{s:.1}"))
                .collect::<Vec<_>>()
                .join(", ")
        )),
    );
    // Every agent's first heartbeats, and the registrations' writes, settle first.
    tokio::time::sleep(Duration::from_secs(5)).await;

    let window = if ctx.quick { 5.0 } else { 10.0 };
    let c0 = sys::cpu_secs(controller)?;
    let idle_from = Instant::now();
    tokio::time::sleep(Duration::from_secs_f64(window)).await;
    let used = sys::cpu_secs(controller)? - c0;
    let rss = sys::status_kib(controller, "VmRSS")?;
    figures.push(
        Figure::new(
            "agents50k",
            "agents50k.controller_idle_cpu",
            "controller CPU with 50,000 idle agents connected",
        )
        .value(
            100.0 * used / idle_from.elapsed().as_secs_f64(),
            "% of a core",
        )
        .at_most(50.0)
        .baseline("Choria: 50,000 nodes on one broker")
        .note("one QUIC keep-alive per 2 s per connection + heartbeats every 5 s"),
    );
    figures.push(
        Figure::new(
            "agents50k",
            "agents50k.controller_rss_per_agent",
            "controller RSS per connected idle agent (50,000 swarm agents)",
        )
        .value((rss as f64 - rss_empty as f64) / AGENTS as f64, "KiB")
        .at_most(48.0)
        .note(format!(
            "VmRSS {rss_empty} KiB with no agent, {rss} KiB with 50,000"
        )),
    );

    let hosts: Vec<i64> = api
        .online_hosts(PREFIX)
        .await?
        .into_iter()
        .map(|(_, id)| id)
        .collect();
    anyhow::ensure!(
        hosts.len() == AGENTS,
        "only {} of {AGENTS} swarm hosts online",
        hosts.len()
    );
    let limit = Duration::from_secs(300);
    let poll = Duration::from_millis(10);
    // One run to warm caches and allocators; not counted.
    api.run_timed(&hosts, "echo ok\n", poll, limit).await?;
    let runs = if ctx.quick { 2 } else { 3 };
    let mut to_final = Vec::new();
    let mut failed = 0;
    for _ in 0..runs {
        let timed = api.run_timed(&hosts, "echo ok\n", poll, limit).await?;
        failed += api.stages(&timed).await?.failed_hosts;
        to_final.push(timed.to_final.as_secs_f64());
    }
    figures.push(
        Figure::new(
            "agents50k",
            "agents50k.fanout.p50",
            "fan-out to 50,000 hosts, accept -> all final, p50 (EMULATED executor)",
        )
        .value(quantile(&to_final, 0.5), "s")
        .at_most(3.0)
        .note(format!(
            "{runs} runs after 1 warm-up; max {:.2} s; hosts not successful {failed}",
            quantile(&to_final, 1.0)
        ))
        // A fan-out that lost hosts measured less than the whole of it.
        .invalid_if((failed > 0).then(|| format!("{failed} host results were not success"))),
    );
    Ok(())
}
