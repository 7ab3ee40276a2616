//! `files`: one large file from one real agent to the others through `fast_transfer_file`: wall
//! time, the source's bytes read and the controller's bytes relayed (from the controller's own
//! count), each agent's and the controller's peak RSS, and the aggregate delivered rate beside
//! one QUIC stream on loopback measured in the same run (fleetrun's own endpoints, mutual TLS).

use std::time::{Duration, Instant};

use anyhow::{Context, Result, ensure};
use fleetrun_testkit::cluster::{Cluster, ClusterOptions};
use serde_json::json;

use super::{Ctx, report::Figure, sys};

const AGENTS: usize = 11;

pub async fn run(ctx: &Ctx, figures: &mut Vec<Figure>) -> Result<()> {
    let size: usize = if ctx.quick { 64 << 20 } else { 256 << 20 };
    let dir = ctx.work.join("files");
    let _ = std::fs::remove_dir_all(&dir);
    let mut cluster = Cluster::start(&ClusterOptions {
        agents: AGENTS,
        dir: dir.clone(),
        release: true,
        ..Default::default()
    })
    .await?;
    let result = measure(ctx, &cluster, &dir, size, figures).await;
    cluster.stop();
    result?;
    let ceiling = quic_ceiling(&dir, size.min(256 << 20)).await?;
    figures.push(
        Figure::new(
            "files",
            "files.quic_stream_loopback",
            "one QUIC stream on loopback (mutual TLS, fleetrun's endpoints), this run",
        )
        .value(ceiling, "MiB/s"),
    );
    if let Some(aggregate) = figures
        .iter()
        .find(|f| f.name == "files.aggregate_rate")
        .and_then(|f| f.value)
    {
        figures.push(
            Figure::new(
                "files",
                "files.aggregate_vs_ceiling",
                "aggregate delivered rate / one QUIC stream's",
            )
            .value(aggregate / ceiling * 100.0, "%")
            .at_least(70.0)
            .note("the issue's target; relayed through the controller, no peer-to-peer"),
        );
    }
    Ok(())
}

async fn measure(
    ctx: &Ctx,
    cluster: &Cluster,
    dir: &std::path::Path,
    size: usize,
    figures: &mut Vec<Figure>,
) -> Result<()> {
    let _ = ctx;
    let src_dir = dir.join("src");
    let out_dir = dir.join("out");
    std::fs::create_dir_all(&src_dir)?;
    std::fs::create_dir_all(&out_dir)?;
    let src = src_dir.join("big.bin");
    // Bytes that do not repeat chunk to chunk: each chunk is its own.
    let mut state = 0x9E37_79B9_7F4A_7C15u64;
    let data: Vec<u8> = (0..size)
        .map(|_| {
            state ^= state << 13;
            state ^= state >> 7;
            state ^= state << 17;
            state as u8
        })
        .collect();
    std::fs::write(&src, &data)?;
    drop(data);
    let hosts: Vec<i64> = cluster.info.hosts.iter().map(|h| h.bk_host_id).collect();
    let (source, targets) = (hosts[0], &hosts[1..]);
    let client = cluster.info.client();
    let mut body = cluster.info.scope();
    body["account_alias"] = json!("root");
    body["file_target_path"] = json!(format!("{}/[FILESRCIP]/", out_dir.display()));
    body["file_source_list"] = json!([{
        "file_type": 1,
        "file_list": [src.to_str().context("path")?],
        "account": {"alias": "root"},
        "server": {"host_id_list": [source]},
    }]);
    body["target_server"] = json!({ "host_id_list": targets });
    body["timeout"] = json!(3600);
    let started = Instant::now();
    let accepted = client.call("fast_transfer_file", body).await?;
    let job = accepted["job_instance_id"].as_i64().context("job")?;
    let status = client
        .wait_job(&cluster.info.scope(), job, Duration::from_secs(3600))
        .await?;
    let wall = started.elapsed().as_secs_f64();
    ensure!(
        status["job_instance"]["status"] == 3,
        "the transfer did not succeed: {status}"
    );
    let log = std::fs::read_to_string(&cluster.controller_log)?;
    let line = log
        .lines()
        .find(|l| l.contains("transfer ended") && l.contains(&format!("job={job}")))
        .context("the transfer's end in the controller's log")?;
    let field = |name: &str| -> Option<f64> {
        line.split_whitespace()
            .find_map(|w| w.strip_prefix(&format!("{name}=")))
            .and_then(|v| v.parse().ok())
    };
    let mib = |bytes: f64| bytes / (1024.0 * 1024.0);
    let n = targets.len();
    figures.push(
        Figure::new(
            "files",
            "files.wall",
            format!(
                "{} MiB from 1 real agent to {n}, submit -> all final",
                size >> 20
            ),
        )
        .value(wall, "s"),
    );
    figures.push(
        Figure::new("files", "files.source_read", "bytes the source sent (once)")
            .value(mib(field("source_bytes_read").unwrap_or(-1.0)), "MiB")
            .at_most(mib(size as f64) * 1.01),
    );
    figures.push(
        Figure::new(
            "files",
            "files.relayed",
            "bytes the controller relayed to targets",
        )
        .value(
            mib(field("controller_bytes_relayed").unwrap_or(-1.0)),
            "MiB",
        ),
    );
    figures.push(
        Figure::new(
            "files",
            "files.aggregate_rate",
            format!("aggregate delivered rate, {n} targets"),
        )
        .value(mib((size * n) as f64) / wall, "MiB/s"),
    );
    if let Some(pid) = sys::pid_with_arg(&cluster.controller_config.to_string_lossy()) {
        figures.push(
            Figure::new("files", "files.controller_peak_rss", "controller peak RSS")
                .value(sys::status_kib(pid, "VmHWM")? as f64 / 1024.0, "MiB"),
        );
    }
    let agent_peaks: Vec<f64> = cluster
        .agents
        .iter()
        .filter_map(|a| sys::pid_with_arg(&a.config.to_string_lossy()))
        .filter_map(|pid| sys::status_kib(pid, "VmHWM").ok())
        .map(|kib| kib as f64 / 1024.0)
        .collect();
    if let Some(max) = agent_peaks.iter().copied().reduce(f64::max) {
        figures.push(
            Figure::new("files", "files.agent_peak_rss", "largest agent peak RSS")
                .value(max, "MiB"),
        );
    }
    let _ = std::fs::remove_dir_all(&out_dir);
    let _ = std::fs::remove_file(&src);
    Ok(())
}

/// MiB/s of `bytes` through one QUIC stream between two endpoints on loopback, with the
/// cluster's CA and fleetrun's endpoint settings.
async fn quic_ceiling(dir: &std::path::Path, bytes: usize) -> Result<f64> {
    let ca = fleetrun_testkit::pki::Ca::open_or_create(&dir.join("ceiling-certs"), "ceiling")?;
    let server = ca.issue_controller()?;
    let client = ca.issue_agent("ceiling")?;
    let server_endpoint = fleetrun_net::server_endpoint(
        &fleetrun_net::TlsFiles {
            ca: ca.cert_path(),
            cert: server.cert.clone(),
            key: server.key.clone(),
        },
        "127.0.0.1:0".parse()?,
        fleetrun_net::Timing::default(),
    )?;
    let addr = server_endpoint.local_addr()?;
    let client_endpoint = fleetrun_net::client_endpoint(
        &fleetrun_net::TlsFiles {
            ca: ca.cert_path(),
            cert: client.cert.clone(),
            key: client.key.clone(),
        },
        "127.0.0.1:0".parse()?,
        fleetrun_net::Timing::default(),
    )?;
    let receiver = tokio::spawn(async move {
        let connection = server_endpoint
            .accept()
            .await
            .context("no connection")?
            .await?;
        let (_, mut recv) = connection.accept_bi().await?;
        let mut total = 0usize;
        while let Some(chunk) = recv.read_chunk(1 << 20, true).await? {
            total += chunk.bytes.len();
        }
        anyhow::Ok(total)
    });
    let connection = client_endpoint
        .connect(addr, "fleetrun-controller")?
        .await?;
    let (mut send, _) = connection.open_bi().await?;
    let block = bytes::Bytes::from(vec![0x5au8; 1 << 20]);
    let started = Instant::now();
    for _ in 0..bytes / block.len() {
        send.write_chunk(block.clone()).await?;
    }
    send.finish()?;
    let received = receiver.await??;
    let took = started.elapsed().as_secs_f64();
    ensure!(received == bytes / block.len() * block.len(), "short read");
    Ok(received as f64 / (1024.0 * 1024.0) / took)
}
