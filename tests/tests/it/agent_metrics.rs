//! The agent's own `/metrics` (`[metrics] listen` in its configuration): served on loopback,
//! refused without the bearer token, parsed as Prometheus text by a real parser, moving with a
//! task (running, then finished with its duration) and with the connection (a lost controller
//! is a reconnect, its return a new session).

use std::{collections::HashMap, time::Duration};

use anyhow::{Context, Result};
use fleetrun_tests::{eventually, start_cluster};
use serde_json::json;

use crate::metrics::{check_exposition, samples};

const TOKEN: &str = "agent-metrics-token-0123456789";

async fn scrape(url: &str, token: Option<&str>) -> Result<(u16, String)> {
    let mut request = reqwest::Client::new().get(url);
    if let Some(token) = token {
        request = request.bearer_auth(token);
    }
    let reply = request.send().await?;
    Ok((reply.status().as_u16(), reply.text().await?))
}

async fn read(url: &str) -> Result<HashMap<String, f64>> {
    let (status, text) = scrape(url, Some(TOKEN)).await?;
    anyhow::ensure!(status == 200, "{status}: {text}");
    check_exposition(&text)?;
    samples(&text)
}

/// Polls the agent's metrics until `pred` holds for them.
async fn until(
    url: &str,
    what: &str,
    pred: impl Fn(&HashMap<String, f64>) -> bool,
) -> Result<HashMap<String, f64>> {
    eventually(Duration::from_secs(30), what, || async {
        read(url).await.ok().filter(|m| pred(m))
    })
    .await
}

fn get(m: &HashMap<String, f64>, key: &str) -> f64 {
    m.get(key).copied().unwrap_or(-1.0)
}

#[tokio::test(flavor = "multi_thread")]
async fn an_agent_serves_its_own_metrics_on_loopback_and_they_move_with_tasks() -> Result<()> {
    let mut cluster = start_cluster(1).await?;
    let port = fleetrun_testkit::cluster::free_port()?;
    cluster.kill_agent(0)?;
    let config_path = cluster.agents[0].config.clone();
    let mut config = std::fs::read_to_string(&config_path)?;
    config.push_str(&format!(
        "\n[metrics]\nlisten = \"127.0.0.1:{port}\"\nbearer_token = \"{TOKEN}\"\n"
    ));
    std::fs::write(&config_path, config)?;
    cluster.start_agent(0)?;
    let ids = vec![cluster.agents[0].agent_id.clone()];
    cluster.wait_online(&ids, Duration::from_secs(30)).await?;
    let url = format!("http://127.0.0.1:{port}/metrics");

    // The token is asked for (once the restarted agent listens).
    let status = eventually(Duration::from_secs(30), "the agent listening", || async {
        scrape(&url, None).await.ok().map(|(status, _)| status)
    })
    .await?;
    assert_eq!(status, 401);
    assert_eq!(scrape(&url, Some("wrong-token-0123456789")).await?.0, 401);
    let (status, _) = scrape(&format!("http://127.0.0.1:{port}/other"), Some(TOKEN)).await?;
    assert_eq!(status, 404);
    let posted = reqwest::Client::new()
        .post(&url)
        .bearer_auth(TOKEN)
        .send()
        .await?;
    assert_eq!(posted.status().as_u16(), 405);

    // Sixteen connections that never send their headers (a slow client, or a local user
    // holding the listener) fill it: a seventeenth is answered only once the header deadline
    // has closed them, and it is answered.
    use tokio::io::{AsyncReadExt as _, AsyncWriteExt as _};
    let mut idle = Vec::new();
    for _ in 0..16 {
        let mut stream = tokio::net::TcpStream::connect(("127.0.0.1", port)).await?;
        idle.push(tokio::spawn(async move {
            let mut buf = [0u8; 64];
            let _ = stream.read(&mut buf).await;
            std::time::Instant::now()
        }));
    }
    let mut late = tokio::net::TcpStream::connect(("127.0.0.1", port)).await?;
    late.write_all(
        format!("GET /metrics HTTP/1.1\r\nHost: x\r\nAuthorization: Bearer {TOKEN}\r\nConnection: close\r\n\r\n")
            .as_bytes(),
    )
    .await?;
    let mut answer = Vec::new();
    tokio::time::timeout(Duration::from_secs(60), late.read_to_end(&mut answer))
        .await
        .context("the listener stayed held by connections that sent nothing")??;
    let answered = std::time::Instant::now();
    let answer = String::from_utf8_lossy(&answer);
    assert!(answer.starts_with("HTTP/1.1 200"), "{answer}");
    let mut closed = Vec::new();
    for reader in idle {
        closed.push(reader.await?);
    }
    assert!(
        closed.iter().any(|at| *at <= answered),
        "the seventeenth connection was served while sixteen held the listener"
    );

    let m = until(&url, "the agent connected", |m| {
        get(m, "fleetrun_agent_connection_state{state=connected}") == 1.0
    })
    .await?;
    assert_eq!(get(&m, "fleetrun_agent_tasks_running{}"), 0.0, "{m:?}");
    assert_eq!(get(&m, "fleetrun_agent_sessions_total{}"), 1.0, "{m:?}");
    assert!(get(&m, "fleetrun_agent_spool_bytes{}") >= 0.0, "{m:?}");

    // A task that runs until the test lets it end.
    let release = cluster.dir().join("release-the-task");
    let script = format!(
        "while [ ! -e {} ]; do sleep 0.05; done\necho done\n",
        release.display()
    );
    let client = cluster.client();
    let request = cluster.script_request(&script, &cluster.host_ids(), json!({}));
    let accepted = client.call("fast_execute_script", request).await?;
    let job = accepted["job_instance_id"].as_i64().context("job id")?;
    let m = until(&url, "the task running", |m| {
        get(m, "fleetrun_agent_tasks_running{}") == 1.0
    })
    .await?;
    assert_eq!(get(&m, "fleetrun_agent_tasks_held{}"), 1.0, "{m:?}");
    assert!(get(&m, "fleetrun_agent_spool_bytes{}") > 0.0, "{m:?}");
    std::fs::write(&release, "")?;
    let done = client
        .wait_job(&cluster.info.scope(), job, Duration::from_secs(60))
        .await?;
    assert_eq!(done["job_instance"]["status"], 3, "{done}");
    let m = until(&url, "the task counted as finished", |m| {
        get(m, "fleetrun_agent_task_duration_seconds{}") == 1.0
    })
    .await?;
    assert_eq!(get(&m, "fleetrun_agent_tasks_running{}"), 0.0, "{m:?}");
    assert_eq!(
        get(
            &m,
            "fleetrun_agent_tasks_finished_total{ending=exited_zero}"
        ),
        1.0,
        "{m:?}"
    );

    // The controller goes away and comes back: a reconnect, then a second session.
    cluster.kill_controller()?;
    until(&url, "the connection lost", |m| {
        get(m, "fleetrun_agent_connection_state{state=connected}") == 0.0
            && get(m, "fleetrun_agent_reconnects_total{}") >= 1.0
    })
    .await?;
    cluster.start_controller().await?;
    until(&url, "a second session", |m| {
        get(m, "fleetrun_agent_connection_state{state=connected}") == 1.0
            && get(m, "fleetrun_agent_sessions_total{}") == 2.0
    })
    .await?;
    Ok(())
}
