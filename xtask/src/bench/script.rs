//! The controller's memory while it sends one large script to many hosts: a controller and 1,000
//! `fleetrun-swarm` agents (EMULATED executor), one job with a 16 MiB script. The request is
//! encoded once and shared by every host's stream, so the controller's peak should grow by a
//! few copies of the script, not by one per host.

use std::time::{Duration, Instant};

use anyhow::{Context, Result, ensure};
use fleetrun_testkit::cluster::{Cluster, ClusterOptions};
use serde_json::json;

use super::{
    Ctx,
    jobs::Api,
    report::Figure,
    swarm::{PREFIX, SwarmProcess},
    sys,
};

const HOSTS: usize = 1_000;
/// The largest script the API accepts.
const SCRIPT_BYTES: usize = 16 * 1024 * 1024;

/// A shell script of `len` bytes: comment lines, then `echo ok`.
fn big_script(len: usize) -> String {
    let tail = "echo ok\n";
    let line = format!("#{}\n", "x".repeat(99));
    let mut script = String::with_capacity(len);
    while script.len() + line.len() + tail.len() <= len {
        script.push_str(&line);
    }
    script.push_str(&"#".repeat(len - script.len() - tail.len() - 1));
    script.push('\n');
    script.push_str(tail);
    script
}

pub async fn run(ctx: &Ctx, figures: &mut Vec<Figure>) -> Result<()> {
    let dir = ctx.work.join("script");
    let _ = std::fs::remove_dir_all(&dir);
    let mut cluster = Cluster::start(&ClusterOptions {
        agents: 0,
        dir: dir.clone(),
        release: true,
        // The swarm's virtual agents report made-up addresses from one loopback source.
        trust_reported_ip_in: vec![0],
        ..Default::default()
    })
    .await?;
    let result = measure(ctx, &cluster, figures).await;
    cluster.stop();
    result
}

async fn measure(ctx: &Ctx, cluster: &Cluster, figures: &mut Vec<Figure>) -> Result<()> {
    let api = Api::new(&cluster.info);
    let controller = sys::pid_with_arg(&cluster.controller_config.to_string_lossy())
        .context("the controller's process")?;
    // The swarm reads a few requests at a time with small windows, so the swarm's own memory
    // stays bounded; the controller still has every host's stream open at once.
    let mut swarm = SwarmProcess::start(
        ctx,
        cluster,
        1,
        HOSTS,
        ctx.work.join("script/swarm.log"),
        &["--reading-requests", "8", "--stream-window", "262144"],
    )
    .await?;
    let measured = async {
        swarm.wait_welcomed(Duration::from_secs(180)).await?;
        tokio::time::sleep(Duration::from_secs(3)).await;
        let hosts: Vec<i64> = api
            .online_hosts(PREFIX)
            .await?
            .into_iter()
            .map(|(_, id)| id)
            .collect();
        ensure!(
            hosts.len() == HOSTS,
            "only {} of {HOSTS} swarm hosts online",
            hosts.len()
        );
        let script = big_script(SCRIPT_BYTES);
        let idle = sys::status_kib(controller, "VmRSS")?;
        let reset = sys::reset_peak_rss(controller);
        let started = Instant::now();
        let (job, _) = api.submit(&hosts, &script, "bench 16 MiB script").await?;
        drop(script);
        api.wait_final(job, Duration::from_millis(200), Duration::from_secs(1_200))
            .await?;
        let took = started.elapsed();
        let hwm = sys::status_kib(controller, "VmHWM")?;
        let status = api.status(job, true).await?;
        let ok = status["step_instance_list"][0]["step_ip_result_list"]
            .as_array()
            .map(|r| r.iter().filter(|h| h["status"] == json!(9)).count())
            .unwrap_or(0);
        Ok((idle, hwm, reset, took, ok))
    }
    .await;
    swarm.stop().await;
    let (idle, peak, reset, took, ok) = measured?;
    figures.push(
        Figure::new(
            "script",
            "script.controller_peak_rss.16mib_1000",
            "controller peak RSS above idle, one 16 MiB script to 1,000 hosts (EMULATED executor)",
        )
        .value((peak.saturating_sub(idle)) as f64 / 1024.0, "MiB")
        .at_most(200.0)
        .note(format!(
            "VmRSS {idle} KiB idle with 1,000 agents connected, peak {peak} KiB ({}); job took {:.1} s; \
             {ok} of {HOSTS} hosts succeeded",
            if reset { "VmHWM after clear_refs" } else { "VmHWM since start: an upper bound" },
            took.as_secs_f64()
        )),
    );
    Ok(())
}
