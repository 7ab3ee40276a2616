//! The web console's page of a 10,000-host job: a controller with the console, a swarm of
//! 10,000 virtual agents (emulated executor), one job to all of them, and the time to serve
//! `/console/jobs/<id>` (the whole page) and `/console/jobs/<id>?fragment=1` (its live part: the
//! status, the counts, the groups by status and output, the first page of hosts, what the page
//! fetches again on every change) — while the results arrive and once the job has ended.
//!
//! Target: the page served in at most 500 ms (p50). Issue #18 asks for the page to load in
//! under 1 s in a browser; the server's answer is the part of that budget that grows with the
//! job, and half of it leaves the other half for the browser to parse and paint a page whose
//! size does not grow with the hosts (they are grouped and paged on the server). The page's
//! size is reported beside it.

use std::time::{Duration, Instant};

use anyhow::{Result, ensure};
use fleetrun_testkit::cluster::{Cluster, ClusterOptions};
use serde_json::json;

use super::{
    Ctx,
    jobs::{Api, median, quantile},
    report::Figure,
    swarm::{PREFIX, SwarmProcess},
};

const HOSTS: usize = 10_000;
const PROXY_SECRET: &str = "bench-proxy-secret-0123456789";
const USER: &str = "bench-viewer";

pub async fn run(ctx: &Ctx, figures: &mut Vec<Figure>) -> Result<()> {
    let dir = ctx.work.join("console");
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

/// One console request as the trusted proxy sends it; its time, status and size.
async fn load(http: &reqwest::Client, url: &str) -> Result<(Duration, usize)> {
    let started = Instant::now();
    let response = http
        .get(url)
        .header("X-Forwarded-User", USER)
        .header("X-Fleetrun-Proxy-Secret", PROXY_SECRET)
        .send()
        .await?;
    let status = response.status();
    let body = response.bytes().await?;
    let took = started.elapsed();
    ensure!(status.is_success(), "GET {url}: HTTP {status}");
    Ok((took, body.len()))
}

fn ms(d: &[Duration]) -> Vec<f64> {
    d.iter().map(|d| d.as_secs_f64() * 1e3).collect()
}

async fn measure(ctx: &Ctx, cluster: &mut Cluster, figures: &mut Vec<Figure>) -> Result<()> {
    cluster.kill_controller()?;
    let mut config = std::fs::read_to_string(&cluster.controller_config)?;
    config.push_str(&format!(
        "\n[console]\napp = \"fleetrun-demo\"\ntrusted_proxy_header = \"X-Forwarded-User\"\n\
         trusted_proxy_secret = \"{PROXY_SECRET}\"\nsecure_cookies = false\n\n\
         [[console.users]]\nname = \"{USER}\"\nscopes = [\"*\"]\nrole = \"viewer\"\n"
    ));
    std::fs::write(&cluster.controller_config, config)?;
    cluster.start_controller().await?;

    // Each emulated task runs 2 s and prints a few lines, so the page is measured while
    // results arrive, and the output groups have something to group.
    let mut swarm = SwarmProcess::start(
        ctx,
        cluster,
        1,
        HOSTS,
        cluster.dir.join("swarm.log"),
        &["--task-ms", "2000", "--output-bytes", "64"],
    )
    .await?;
    swarm.wait_welcomed(Duration::from_secs(600)).await?;
    let api = Api::new(&cluster.info);
    let hosts: Vec<i64> = api
        .online_hosts(PREFIX)
        .await?
        .into_iter()
        .map(|(_, id)| id)
        .take(HOSTS)
        .collect();
    ensure!(
        hosts.len() == HOSTS,
        "only {} of {HOSTS} swarm hosts online",
        hosts.len()
    );

    let http = reqwest::Client::new();
    let base = cluster.info.api_url.trim_end_matches('/').to_owned();
    let (job, _) = api.submit(&hosts, "echo ok\n", "console bench").await?;
    let page = format!("{base}/console/jobs/{job}");
    let fragment = format!("{page}?fragment=1");

    // While the results arrive: the live part, as the page fetches it on each change.
    let mut running = Vec::new();
    let deadline = Instant::now() + Duration::from_secs(300);
    loop {
        let status = api.status(job, false).await?;
        if status["finished"] == json!(true) {
            break;
        }
        ensure!(Instant::now() < deadline, "job {job} did not end in 300 s");
        running.push(load(&http, &fragment).await?.0);
    }
    // Ended: the whole page and its live part, each loaded a number of times.
    let runs = if ctx.quick { 5 } else { 15 };
    let (mut pages, mut fragments) = (Vec::new(), Vec::new());
    let (mut page_bytes, mut fragment_bytes) = (0, 0);
    load(&http, &page).await?;
    for _ in 0..runs {
        let (took, bytes) = load(&http, &page).await?;
        pages.push(took);
        page_bytes = bytes;
        let (took, bytes) = load(&http, &fragment).await?;
        fragments.push(took);
        fragment_bytes = bytes;
    }
    swarm.stop().await;

    let pages = ms(&pages);
    let fragments = ms(&fragments);
    figures.push(
        Figure::new(
            "console",
            "console.job_page.10000.p50",
            "console: a 10,000-host job's page served (ended job), p50 (swarm, emulated)",
        )
        .value(median(&pages), "ms")
        .at_most(500.0)
        .baseline("target: 500 ms, half of issue #18's 1 s page load; the rest is the browser's")
        .note(format!(
            "p99 {:.0} ms over {runs} loads; {page_bytes} bytes (hosts grouped and paged on the server)",
            quantile(&pages, 0.99)
        )),
    );
    figures.push(
        Figure::new(
            "console",
            "console.job_data.10000.p50",
            "console: its live part (?fragment=1: counts, groups, first page of hosts), p50",
        )
        .value(median(&fragments), "ms")
        .at_most(500.0)
        .note(format!(
            "p99 {:.0} ms over {runs} loads; {fragment_bytes} bytes",
            quantile(&fragments, 0.99)
        )),
    );
    if running.is_empty() {
        figures.push(
            Figure::new(
                "console",
                "console.job_data.10000.running.p50",
                "console: live part while results arrive, p50",
            )
            .note("the job ended before the first load"),
        );
    } else {
        let running = ms(&running);
        figures.push(
            Figure::new(
                "console",
                "console.job_data.10000.running.p50",
                "console: live part while 10,000 results arrive, p50",
            )
            .value(median(&running), "ms")
            .at_most(500.0)
            .note(format!(
                "p99 {:.0} ms over {} loads made back to back while the job ran",
                quantile(&running, 0.99),
                running.len()
            )),
        );
    }
    Ok(())
}
