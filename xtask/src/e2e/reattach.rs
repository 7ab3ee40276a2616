//! Scenarios and helpers for tasks that outlive their connection: an agent of the previous
//! protocol version (a `fleetrun-swarm` agent speaking version 1), and a callback receiver that
//! counts what it gets.

use std::{
    process::Stdio,
    sync::{Arc, Mutex},
    time::Duration,
};

use anyhow::{Context, Result, ensure};
use fleetrun_testkit::cluster::cargo_command;
use serde_json::{Value, json};

use super::Ctx;

/// A callback receiver on 127.0.0.1 that keeps every POST it gets.
pub(super) struct CallbackInbox {
    pub url: String,
    received: Arc<Mutex<Vec<Value>>>,
    server: tokio::task::JoinHandle<()>,
}

impl CallbackInbox {
    pub(super) async fn start() -> Result<Self> {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await?;
        let url = format!("http://{}/hook", listener.local_addr()?);
        let received: Arc<Mutex<Vec<Value>>> = Arc::default();
        let inbox = received.clone();
        let app = axum::Router::new().route(
            "/hook",
            axum::routing::post(move |body: axum::body::Bytes| {
                let inbox = inbox.clone();
                async move {
                    if let Ok(value) = serde_json::from_slice::<Value>(&body) {
                        inbox.lock().unwrap().push(value);
                    }
                    "ok"
                }
            }),
        );
        let server = tokio::spawn(async move {
            let _ = axum::serve(listener, app).await;
        });
        Ok(Self {
            url,
            received,
            server,
        })
    }

    /// The POSTs for `job` once the first arrived (within `limit`) and `settle` passed without
    /// another, so that a repeat would be counted.
    pub(super) async fn for_job(
        &self,
        job: i64,
        limit: Duration,
        settle: Duration,
    ) -> Result<Vec<Value>> {
        let of_job = || -> Vec<Value> {
            self.received
                .lock()
                .unwrap()
                .iter()
                .filter(|b| b["job_instance_id"] == json!(job))
                .cloned()
                .collect()
        };
        let deadline = tokio::time::Instant::now() + limit;
        while of_job().is_empty() {
            ensure!(
                tokio::time::Instant::now() < deadline,
                "no callback for job {job} within {limit:?}"
            );
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
        tokio::time::sleep(settle).await;
        Ok(of_job())
    }
}

impl Drop for CallbackInbox {
    fn drop(&mut self) {
        self.server.abort();
    }
}

/// An agent one protocol version behind (version 1: no reattach), emulated by `fleetrun-swarm`,
/// runs a job against this controller, which tells the operator to upgrade it.
pub(super) async fn old_agent(ctx: &mut Ctx) -> Result<()> {
    let release = ctx.cluster.bin_dir.ends_with("release");
    let mut build = cargo_command();
    build.args(["build", "--locked", "--quiet", "-p", "fleetrun-swarm"]);
    if release {
        build.arg("--release");
    }
    ensure!(
        build.status().context("building fleetrun-swarm")?.success(),
        "cargo build -p fleetrun-swarm failed"
    );
    // The swarm runs beside the controller, from the bridge's address, and reports that
    // address (ip_base + its index, 1) as the one it connects from.
    let gateway = ctx.network.gateway;
    let ip_base = std::net::Ipv4Addr::from(u32::from(gateway) - 1);
    let certs = ctx.cluster.dir.join("certs");
    let log_path = ctx.cluster.dir.join("swarm-v1.log");
    let log = std::fs::File::create(&log_path)?;
    let mut swarm = tokio::process::Command::new(ctx.cluster.bin_dir.join("fleetrun-swarm"))
        .arg("--controller")
        .arg(&ctx.cluster.info.agent_addr)
        .arg("--ca")
        .arg(certs.join("ca.pem"))
        .arg("--ca-key")
        .arg(certs.join("ca.key.pem"))
        .args([
            "--agents",
            "1",
            "--id-prefix",
            "legacy-",
            "--first-index",
            "1",
        ])
        .args(["--protocol-version", "1", "--output-bytes", "9"])
        .args(["--bind", &gateway.to_string()])
        .args(["--ip-base", &ip_base.to_string()])
        .stdin(Stdio::null())
        .stdout(log.try_clone()?)
        .stderr(log)
        .kill_on_drop(true)
        .spawn()
        .context("starting fleetrun-swarm")?;
    let log_before = std::fs::metadata(&ctx.cluster.controller_log).map_or(0, |m| m.len() as usize);
    let result = async {
        let hosts = ctx
            .cluster
            .wait_online(&["legacy-1".to_owned()], Duration::from_secs(30))
            .await
            .with_context(|| format!("see {}", log_path.display()))?;
        let host = hosts
            .iter()
            .find(|h| h["agent_id"] == json!("legacy-1"))
            .and_then(|h| h["bk_host_id"].as_i64())
            .context("the old agent's host id")?;
        let mut request = ctx.request("echo emulated", json!({}));
        request["target_server"] = json!({ "host_id_list": [host] });
        let (job, step, status) = ctx.run(request).await?;
        Ctx::expect(&status, 3, |_| 9)?;
        let logs = ctx
            .cluster
            .info
            .client()
            .logs(&ctx.cluster.info.scope(), job, step, &[host])
            .await?;
        ensure!(
            logs.first().is_some_and(|(_, l)| l == "ok\nok\nok\n"),
            "the old agent's output: {logs:?}"
        );
        let text = std::fs::read(&ctx.cluster.controller_log).unwrap_or_default();
        let new = String::from_utf8_lossy(text.get(log_before..).unwrap_or_default());
        ensure!(
            new.contains("agent speaks protocol version 1") && new.contains("upgrade it"),
            "the controller did not tell the operator to upgrade the old agent"
        );
        println!(
            "    an agent of protocol version 1 ran a job; the controller asked for its upgrade"
        );
        Ok(())
    }
    .await;
    let _ = swarm.start_kill();
    let _ = swarm.wait().await;
    result
}
