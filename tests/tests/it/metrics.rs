//! `/metrics`: refused without the bearer token, parsed as Prometheus text by a real parser, and
//! its counters move when a job runs.

use std::{collections::HashMap, time::Duration};

use anyhow::{Context, Result, ensure};
use fleetrun_tests::{TestCluster, start_cluster};
use serde_json::json;

const TOKEN: &str = "metrics-token-0123456789";

/// Restarts the cluster's controller with `extra` appended to its configuration.
pub(crate) async fn restart_with(cluster: &mut TestCluster, extra: &str) -> Result<()> {
    cluster.stop_controller(Duration::from_secs(10))?;
    let mut config = std::fs::read_to_string(&cluster.controller_config)?;
    config.push_str(extra);
    std::fs::write(&cluster.controller_config, config)?;
    cluster.start_controller().await?;
    let ids: Vec<String> = cluster.agents.iter().map(|a| a.agent_id.clone()).collect();
    cluster.wait_online(&ids, Duration::from_secs(30)).await?;
    Ok(())
}

async fn scrape(cluster: &TestCluster, token: Option<&str>) -> Result<(u16, String)> {
    let mut request = reqwest::Client::new().get(format!("{}/metrics", cluster.info.api_url));
    if let Some(token) = token {
        request = request.bearer_auth(token);
    }
    let reply = request.send().await?;
    Ok((reply.status().as_u16(), reply.text().await?))
}

/// Every sample by name and sorted labels; the text must parse whole.
pub(crate) fn samples(text: &str) -> Result<HashMap<String, f64>> {
    let lines = text.lines().map(|l| Ok(l.to_owned()));
    let scrape = prometheus_parse::Scrape::parse(lines).context("parsing /metrics")?;
    let mut out = HashMap::new();
    for sample in scrape.samples {
        let mut labels: Vec<String> = sample
            .labels
            .iter()
            .map(|(k, v)| format!("{k}={v}"))
            .collect();
        labels.sort();
        let value = match sample.value {
            prometheus_parse::Value::Counter(v)
            | prometheus_parse::Value::Gauge(v)
            | prometheus_parse::Value::Untyped(v) => v,
            prometheus_parse::Value::Histogram(buckets) => {
                // The +Inf bucket: how many were observed.
                buckets.iter().map(|b| b.count).fold(0.0, f64::max)
            }
            prometheus_parse::Value::Summary(_) => continue,
        };
        out.insert(format!("{}{{{}}}", sample.metric, labels.join(",")), value);
    }
    Ok(out)
}

/// Checks the text strictly where the parser is lenient: every sample line is `name{labels}
/// value`, every series has its TYPE line before its samples.
pub(crate) fn check_exposition(text: &str) -> Result<()> {
    let mut typed = std::collections::HashSet::new();
    for line in text.lines() {
        if line.is_empty() {
            continue;
        }
        if let Some(rest) = line.strip_prefix("# TYPE ") {
            let mut parts = rest.split(' ');
            let name = parts.next().unwrap();
            let kind = parts.next().context("TYPE without a kind")?;
            ensure!(
                ["counter", "gauge", "histogram", "summary", "untyped"].contains(&kind),
                "{line}"
            );
            typed.insert(name.to_owned());
            continue;
        }
        if line.starts_with('#') {
            ensure!(line.starts_with("# HELP "), "stray comment: {line}");
            continue;
        }
        let (series, value) = line.rsplit_once(' ').context("sample without a value")?;
        value
            .parse::<f64>()
            .with_context(|| format!("value of {line}"))?;
        let name = series.split('{').next().unwrap();
        let base = ["_bucket", "_sum", "_count"]
            .iter()
            .find_map(|s| name.strip_suffix(s))
            .filter(|b| typed.contains(*b))
            .unwrap_or(name);
        ensure!(typed.contains(base), "no TYPE before {line}");
        ensure!(
            name.chars()
                .all(|c| c.is_ascii_alphanumeric() || c == '_' || c == ':'),
            "{line}"
        );
    }
    Ok(())
}

fn value(samples: &HashMap<String, f64>, key: &str) -> f64 {
    samples.get(key).copied().unwrap_or(0.0)
}

#[tokio::test(flavor = "multi_thread")]
async fn metrics_parse_and_move_with_a_job_and_need_the_token() -> Result<()> {
    let mut cluster = start_cluster(1).await?;
    // Not configured: not served.
    assert_eq!(scrape(&cluster, Some(TOKEN)).await?.0, 404);
    restart_with(
        &mut cluster,
        &format!("\n[metrics]\nbearer_token = \"{TOKEN}\"\n"),
    )
    .await?;
    assert_eq!(scrape(&cluster, None).await?.0, 401);
    assert_eq!(
        scrape(&cluster, Some("wrong-token-0123456789")).await?.0,
        401
    );

    let (status, before_text) = scrape(&cluster, Some(TOKEN)).await?;
    assert_eq!(status, 200, "{before_text}");
    check_exposition(&before_text)?;
    let before = samples(&before_text)?;
    assert_eq!(
        value(&before, "fleetrun_agent_links{}"),
        1.0,
        "{before_text}"
    );
    assert_eq!(value(&before, "fleetrun_store_writable{}"), 1.0);

    let host = cluster.host_id("agent-1");
    let (_, _, status) = cluster
        .run_job(cluster.script_request("echo hello-metrics", &[host], json!({})))
        .await?;
    assert_eq!(status["finished"], true, "{status}");

    let (_, after_text) = scrape(&cluster, Some(TOKEN)).await?;
    check_exposition(&after_text)?;
    let after = samples(&after_text)?;
    let moved = |key: &str| value(&after, key) - value(&before, key);
    assert_eq!(
        moved("fleetrun_jobs_finished_total{status=success}"),
        1.0,
        "{after_text}"
    );
    assert_eq!(moved("fleetrun_host_results_total{status=success}"), 1.0);
    assert_eq!(moved("fleetrun_dispatch_seconds{}"), 1.0);
    assert_eq!(moved("fleetrun_job_duration_seconds{status=success}"), 1.0);
    assert!(moved("fleetrun_output_bytes_total{}") >= "hello-metrics\n".len() as f64);
    assert!(moved("fleetrun_store_commit_seconds{}") >= 1.0);
    assert_eq!(
        moved("fleetrun_http_requests_total{api=fast_execute_script,code=0}"),
        1.0
    );
    assert!(moved("fleetrun_http_requests_total{api=get_job_instance_status,code=0}") >= 1.0);
    assert!(value(&after, "fleetrun_jobs{status=success}") >= 1.0);
    assert_eq!(
        value(
            &after,
            &format!(
                "fleetrun_agents{{state=connected,version={}}}",
                env!("CARGO_PKG_VERSION")
            )
        ),
        1.0,
        "{after_text}"
    );

    // A refused request counts under its code, and a path naming no API under `unknown`,
    // never under the client's text.
    let refused = cluster
        .client()
        .call_raw("get_job_instance_status", json!({"job_instance_id": 1}))
        .await?;
    let code = refused["code"].as_i64().context("code")?;
    ensure!(code != 0, "{refused}");
    reqwest::get(format!("{}/api/v3/no_such_api_xyz/", cluster.info.api_url)).await?;
    let (_, last_text) = scrape(&cluster, Some(TOKEN)).await?;
    let last = samples(&last_text)?;
    assert!(
        value(
            &last,
            &format!("fleetrun_http_requests_total{{api=get_job_instance_status,code={code}}}")
        ) >= 1.0,
        "{last_text}"
    );
    assert!(
        value(
            &last,
            "fleetrun_http_requests_total{api=unknown,code=1640401}"
        ) >= 1.0
    );
    assert!(!last_text.contains("no_such_api_xyz"));
    Ok(())
}

/// Every series `/metrics` shows is documented in docs/metrics.md.
#[test]
fn every_series_is_documented() -> Result<()> {
    let docs =
        std::fs::read_to_string(fleetrun_tests::cluster::workspace_root().join("docs/metrics.md"))?;
    let source = std::fs::read_to_string(
        fleetrun_tests::cluster::workspace_root().join("crates/fleetrun-controller/src/metrics.rs"),
    )?;
    let mut names: Vec<&str> = source
        .split('"')
        .filter(|s| s.starts_with("fleetrun_"))
        .map(|s| {
            let end = s
                .find(|c: char| !(c.is_ascii_lowercase() || c == '_'))
                .unwrap_or(s.len());
            &s[..end]
        })
        .collect();
    names.sort_unstable();
    names.dedup();
    ensure!(names.len() >= 15, "{names:?}");
    for name in names {
        ensure!(
            docs.contains(&format!("`{name}`")),
            "{name} is not in docs/metrics.md"
        );
    }
    Ok(())
}

/// Runs `JOBS` single-host jobs, `CONCURRENCY` at a time; jobs per second.
async fn jobs_per_second(cluster: &TestCluster) -> Result<f64> {
    const CONCURRENCY: usize = 8;
    let host = cluster.host_id("agent-1");
    let request = cluster.script_request("true", &[host], json!({}));
    let started = std::time::Instant::now();
    let mut workers = tokio::task::JoinSet::new();
    for _ in 0..CONCURRENCY {
        let client = cluster.client();
        let request = request.clone();
        let scope = cluster.info.scope();
        workers.spawn(async move {
            for _ in 0..BENCH_JOBS / CONCURRENCY {
                let job = client.call("fast_execute_script", request.clone()).await?;
                let id = job["job_instance_id"].as_i64().context("id")?;
                client.wait_job(&scope, id, Duration::from_secs(60)).await?;
            }
            anyhow::Ok(())
        });
    }
    while let Some(done) = workers.join_next().await {
        done??;
    }
    Ok(BENCH_JOBS as f64 / started.elapsed().as_secs_f64())
}

const BENCH_JOBS: usize = 200;

/// Single-host throughput with metrics and the audit trail on, and the time of the group
/// commits that carried audit entries (job writes included; off the requests' path). With `FLEETRUN_BENCH_CONTROLLER` naming another
/// controller binary (one built without them), the same run against it, for comparison. On
/// demand: `cargo test -p fleetrun-tests --test it -- metrics::audit_cost --ignored --nocapture`.
#[tokio::test(flavor = "multi_thread")]
#[ignore]
async fn audit_cost_on_single_host_throughput() -> Result<()> {
    let mut cluster = start_cluster(1).await?;
    let plain_config = std::fs::read_to_string(&cluster.controller_config)?;
    restart_with(
        &mut cluster,
        &format!("\n[metrics]\nbearer_token = \"{TOKEN}\"\n"),
    )
    .await?;
    // A first round warms up the connection and the database.
    jobs_per_second(&cluster).await?;
    let (_, before) = scrape(&cluster, Some(TOKEN)).await?;
    let rate = jobs_per_second(&cluster).await?;
    let (_, after) = scrape(&cluster, Some(TOKEN)).await?;
    let value_of = |text: &str, name: &str| -> f64 {
        text.lines()
            .find(|l| l.starts_with(name))
            .and_then(|l| l.rsplit(' ').next())
            .and_then(|v| v.parse().ok())
            .unwrap_or(0.0)
    };
    let moved = |name: &str| value_of(&after, name) - value_of(&before, name);
    let audit = moved("fleetrun_audit_append_seconds_sum");
    let batches = moved("fleetrun_audit_append_seconds_count");
    let submit = moved("fleetrun_http_request_duration_seconds_sum{api=\"fast_execute_script\"}");
    println!(
        "with metrics and audit: {BENCH_JOBS} single-host jobs, 8 at a time: {rate:.1} jobs/s; \
         submissions {:.2} ms each on average; {batches} group commits carried audit entries, \
         {audit:.3} s in all, job writes included ({:.2} ms per job, off the request path)",
        1000.0 * submit / BENCH_JOBS as f64,
        1000.0 * audit / BENCH_JOBS as f64
    );
    if let Ok(other) = std::env::var("FLEETRUN_BENCH_CONTROLLER") {
        cluster.stop_controller(Duration::from_secs(10))?;
        let config = cluster.dir().join("controller-plain.toml");
        std::fs::write(&config, plain_config)?;
        let log = cluster.dir().join("controller-other.log");
        let mut child = std::process::Command::new(&other)
            .arg("--config")
            .arg(&config)
            .stderr(std::fs::File::create(&log)?)
            .spawn()?;
        let measured = async {
            cluster
                .wait_online(&["agent-1".to_owned()], Duration::from_secs(30))
                .await?;
            jobs_per_second(&cluster).await?;
            jobs_per_second(&cluster).await
        }
        .await;
        let _ = child.kill();
        let _ = child.wait();
        let base = measured?;
        println!(
            "{other}: {base:.1} jobs/s; with metrics and audit {:+.1}%",
            100.0 * (rate - base) / base
        );
    }
    Ok(())
}
