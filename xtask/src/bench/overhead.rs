//! What metrics and the audit trail cost: single-host job throughput with both off, then with
//! both on, on the same controller and swarm, alternating (off, on, off, on, …) so that drift
//! of the machine's load falls on both sides alike. The target is at most 5% fewer jobs per
//! second with them on.
//!
//! Emulated executor (`fleetrun-swarm`, no fork): a job's cost is then the controller's own
//! (accept, store, dispatch, results, the reply stream), which is where metrics and the audit
//! trail add theirs, so the ratio is the worst case; with real shells the fork dominates and the
//! share is smaller. "Off" is a controller without `[metrics]` (nothing records) and with
//! `[audit] enabled = false`; "on" has `[metrics]` (scraped every 5 s, as a Prometheus would) and
//! the audit trail, every submit appended to its chain.

use std::time::{Duration, Instant};

use anyhow::{Context, Result, ensure};
use fleetrun_testkit::cluster::{Cluster, ClusterOptions};

use super::{
    Ctx,
    jobs::{Api, median},
    report::Figure,
    swarm::{PREFIX, SwarmProcess},
};

/// Virtual hosts the jobs go to, one each.
const HOSTS: usize = 4;
/// Jobs in flight at once.
const IN_FLIGHT: usize = 16;
const METRICS_TOKEN: &str = "bench-metrics-token";

pub async fn run(ctx: &Ctx, figures: &mut Vec<Figure>) -> Result<()> {
    let dir = ctx.work.join("overhead");
    let _ = std::fs::remove_dir_all(&dir);
    let mut cluster = Cluster::start(&ClusterOptions {
        agents: 0,
        dir: dir.clone(),
        release: true,
        trust_reported_ip_in: vec![0],
        ..Default::default()
    })
    .await?;
    let result = measure(ctx, &mut cluster, figures).await;
    cluster.stop();
    result
}

/// The controller's configuration with metrics and audit on or off.
fn variant(base: &str, on: bool) -> String {
    if on {
        format!("{base}\n[metrics]\nbearer_token = \"{METRICS_TOKEN}\"\n")
    } else {
        format!("{base}\n[audit]\nenabled = false\n")
    }
}

async fn measure(ctx: &Ctx, cluster: &mut Cluster, figures: &mut Vec<Figure>) -> Result<()> {
    let base = std::fs::read_to_string(&cluster.controller_config)?;
    let mut swarm =
        SwarmProcess::start(ctx, cluster, 1, HOSTS, cluster.dir.join("swarm.log"), &[]).await?;
    swarm.wait_welcomed(Duration::from_secs(60)).await?;
    let rounds = if ctx.quick { 2 } else { 3 };
    let window = Duration::from_secs(if ctx.quick { 5 } else { 10 });
    let (mut off, mut on) = (Vec::new(), Vec::new());
    let mut entries = 0;
    for _ in 0..rounds {
        for enabled in [false, true] {
            cluster.kill_controller()?;
            std::fs::write(&cluster.controller_config, variant(&base, enabled))?;
            cluster.start_controller().await?;
            let api = Api::new(&cluster.info);
            let hosts = api
                .wait_online(PREFIX, HOSTS, Duration::from_secs(60))
                .await?;
            let rate = throughput(
                &api,
                &hosts,
                window,
                enabled.then(|| cluster.info.api_url.clone()),
            )
            .await?;
            if enabled {
                on.push(rate);
                entries = api
                    .client
                    .call("verify_audit_log", serde_json::json!({}))
                    .await?["entries"]
                    .as_i64()
                    .unwrap_or(0);
            } else {
                off.push(rate);
            }
        }
    }
    swarm.stop().await;
    std::fs::write(&cluster.controller_config, base)?;
    let (off_rate, on_rate) = (median(&off), median(&on));
    let cost = (off_rate - on_rate) / off_rate * 100.0;
    let list = |rates: &[f64]| {
        rates
            .iter()
            .map(|r| format!("{r:.0}"))
            .collect::<Vec<_>>()
            .join(", ")
    };
    figures.push(
        Figure::new(
            "overhead",
            "overhead.jobs.off",
            format!(
                "single-host jobs/s, metrics and audit off ({IN_FLIGHT} in flight, {HOSTS} swarm hosts, emulated)"
            ),
        )
        .value(off_rate, "jobs/s")
        .note(format!("median of {rounds} windows of {window:?}: {}", list(&off))),
    );
    figures.push(
        Figure::new(
            "overhead",
            "overhead.jobs.on",
            "single-host jobs/s, metrics (scraped every 5 s) and audit on (emulated)",
        )
        .value(on_rate, "jobs/s")
        .note(format!(
            "median of {rounds} windows: {}; {entries} audit entries in the chain after the last",
            list(&on)
        )),
    );
    figures.push(
        Figure::new(
            "overhead",
            "overhead.cost",
            "throughput lost to metrics + audit (off - on) / off",
        )
        .value(cost, "%")
        .at_most(5.0)
        .baseline("target (issue #17): at most 5%")
        .note(
            "emulated executor, so the controller's own work is the whole job and this is the \
             worst case; windows alternate off/on; a negative value is noise",
        ),
    );
    Ok(())
}

/// Jobs per second over `window`, `IN_FLIGHT` clients each submitting a job to one host and
/// following it to its end; `/metrics` at `scrape` is read every 5 s meanwhile.
async fn throughput(
    api: &Api,
    hosts: &[i64],
    window: Duration,
    scrape: Option<String>,
) -> Result<f64> {
    let deadline = Instant::now() + window;
    let scraper = scrape.map(|url| {
        tokio::spawn(async move {
            let http = reqwest::Client::new();
            let mut scraped = 0u64;
            while Instant::now() < deadline {
                let text = http
                    .get(format!("{url}/metrics"))
                    .bearer_auth(METRICS_TOKEN)
                    .send()
                    .await?
                    .text()
                    .await?;
                ensure!(
                    text.contains("fleetrun_http_requests_total"),
                    "/metrics has no request counter"
                );
                scraped += 1;
                tokio::time::sleep(Duration::from_secs(5)).await;
            }
            anyhow::Ok(scraped)
        })
    });
    let rate = api.single_host_rate(hosts, IN_FLIGHT, window).await?;
    if let Some(scraper) = scraper {
        scraper.await?.context("scraping /metrics")?;
    }
    Ok(rate)
}
