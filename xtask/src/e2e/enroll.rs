//! The `enroll` scenario: a namespace host with nothing but the agent binary enrolls with a join
//! token, appears in the token's business and module and runs a job; a used-up token and an
//! expired one are refused; its certificate renews during a running task, which goes on
//! untouched; revoked, it is disconnected within a second and cannot come back, not even by
//! enrolling again.

use std::{
    path::{Path, PathBuf},
    process::{Child, Command, Output, Stdio},
    time::{Duration, Instant},
};

use anyhow::{Context, Result, bail, ensure};
use serde_json::{Value, json};

use super::{Ctx, b64};

/// The certificate lifetime the scenario configures: renewed 20 s after issue.
const LIFETIME_SECS: u64 = 30;
const BIZ: i64 = 2;
const MODULE: i64 = 100;

/// The bare host's agent, killed when the scenario ends however it ends.
struct Bare(Option<Child>);

impl Drop for Bare {
    fn drop(&mut self) {
        if let Some(child) = &mut self.0 {
            let _ = child.kill();
            let _ = child.wait();
        }
    }
}

/// Turns enrollment on in the cluster's controller (the cluster's CA imported by `ca init`) and
/// restarts it; returns the CA's pin.
async fn enable(ctx: &mut Ctx) -> Result<String> {
    let dir = ctx.cluster.dir.clone();
    let (ca_cert, ca_key) = (dir.join("enroll-ca.pem"), dir.join("enroll-ca.key.pem"));
    let mut config = std::fs::read_to_string(&ctx.cluster.controller_config)?;
    if !config.contains("[enroll]") {
        config.push_str(&format!(
            "\n[enroll]\nca_cert = {:?}\nca_key = {:?}\ncert_lifetime_secs = {LIFETIME_SECS}\n",
            ca_cert.display().to_string(),
            ca_key.display().to_string()
        ));
        std::fs::write(&ctx.cluster.controller_config, config)?;
        let certs = dir.join("certs");
        let init = Command::new(ctx.cluster.bin_dir.join("fleetrun-controller"))
            .arg("--config")
            .arg(&ctx.cluster.controller_config)
            .args(["ca", "init", "--import-cert"])
            .arg(certs.join("ca.pem"))
            .arg("--import-key")
            .arg(certs.join("ca.key.pem"))
            .output()?;
        ensure!(init.status.success(), "ca init: {}", text(&init));
        ctx.cluster.stop_controller(Duration::from_secs(10))?;
        ctx.cluster.start_controller().await?;
        ctx.heal().await?;
    }
    let made = ctx
        .cluster
        .info
        .client()
        .call("create_join_token", json!({"bk_biz_id": BIZ}))
        .await?;
    made["ca_pin"]
        .as_str()
        .map(str::to_owned)
        .context("no ca_pin")
}

fn text(output: &Output) -> String {
    format!(
        "{}{}",
        String::from_utf8_lossy(&output.stdout),
        String::from_utf8_lossy(&output.stderr)
    )
}

/// Runs `fleetrun-agent enroll` inside the bare host, its files under `dir`.
fn enroll(ctx: &Ctx, host: usize, dir: &Path, token: &str, pin: &str) -> Result<Output> {
    let controller = format!(
        "{}:{}",
        ctx.network.gateway,
        ctx.cluster
            .info
            .agent_addr
            .rsplit(':')
            .next()
            .context("agent port")?
    );
    let mut command = Command::new("ip");
    command
        .args(["netns", "exec", &ctx.network.hosts[host].namespace])
        .arg(ctx.cluster.bin_dir.join("fleetrun-agent"))
        .args(["enroll", "--controller", &controller, "--token", token])
        .args(["--ca-pin", pin, "--hostname", "bare"])
        .arg("--dir")
        .arg(dir.join("etc"))
        .arg("--work-dir")
        .arg(dir.join("work"));
    Ok(command.output()?)
}

fn refused(output: &Output, what: &str) -> Result<()> {
    let out = text(output);
    ensure!(!output.status.success(), "not refused: {out}");
    ensure!(out.contains(what), "expected {what:?} in: {out}");
    Ok(())
}

async fn token(ctx: &Ctx, extra: Value) -> Result<(String, Value)> {
    let mut body = json!({"bk_biz_id": BIZ, "bk_module_id": MODULE});
    for (k, v) in extra.as_object().into_iter().flatten() {
        body[k] = v.clone();
    }
    let made = ctx
        .cluster
        .info
        .client()
        .call("create_join_token", body)
        .await?;
    Ok((made["token"].as_str().context("token")?.to_owned(), made))
}

/// Polls `check` every 100 ms until it answers or `limit` passes.
async fn until<T>(
    limit: Duration,
    what: &str,
    mut check: impl AsyncFnMut() -> Option<T>,
) -> Result<T> {
    let deadline = Instant::now() + limit;
    loop {
        if let Some(found) = check().await {
            return Ok(found);
        }
        ensure!(Instant::now() < deadline, "{what}: not within {limit:?}");
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

pub(super) async fn scenario(ctx: &mut Ctx) -> Result<()> {
    let pin = enable(ctx).await?;
    // The network's last host runs no cluster agent: nothing on it but what enrollment writes.
    let host = ctx.network.hosts.len() - 1;
    ensure!(
        host >= ctx.cluster.agents.len(),
        "no bare host in the network"
    );
    let base: PathBuf = ctx.cluster.dir.join("bare");
    let _ = std::fs::remove_dir_all(&base);
    std::fs::create_dir_all(&base)?;
    let client = ctx.cluster.info.client();

    // Refused: a used-up token, an expired one.
    let (once, _) = token(ctx, json!({})).await?;
    let spare = base.join("spare");
    let out = enroll(ctx, host, &spare, &once, &pin)?;
    ensure!(out.status.success(), "{}", text(&out));
    refused(
        &enroll(ctx, host, &base.join("other"), &once, &pin)?,
        "used up",
    )?;
    let (short, made) = token(ctx, json!({"ttl_secs": 1})).await?;
    let short_id = made["token_id"].clone();
    until(
        Duration::from_secs(10),
        "the short token expired",
        async || {
            let listed = client.call("list_join_tokens", json!({})).await.ok()?;
            listed
                .as_array()?
                .iter()
                .any(|t| t["token_id"] == short_id && t["state"] == "expired")
                .then_some(())
        },
    )
    .await?;
    refused(
        &enroll(ctx, host, &base.join("other"), &short, &pin)?,
        "expired",
    )?;

    // Enrolled, placed, and running a job.
    let (secret, _) = token(ctx, json!({"max_uses": 3})).await?;
    let out = enroll(ctx, host, &base, &secret, &pin)?;
    ensure!(out.status.success(), "{}", text(&out));
    let agent_id = text(&out)
        .split_whitespace()
        .skip_while(|w| *w != "agent")
        .nth(1)
        .context("no agent id printed")?
        .to_owned();
    let log = std::fs::File::create(base.join("agent.log"))?;
    let child = Command::new("ip")
        .args(["netns", "exec", &ctx.network.hosts[host].namespace])
        .arg(ctx.cluster.bin_dir.join("fleetrun-agent"))
        .arg("--config")
        .arg(base.join("etc/agent.toml"))
        .stdin(Stdio::null())
        .stdout(log.try_clone()?)
        .stderr(log)
        .spawn()?;
    let mut bare = Bare(Some(child));
    let hosts = ctx
        .cluster
        .wait_online(std::slice::from_ref(&agent_id), Duration::from_secs(30))
        .await?;
    let placed = hosts
        .iter()
        .find(|h| h["agent_id"] == json!(agent_id))
        .context("enrolled host")?;
    let ip = ctx.network.hosts[host].ip.to_string();
    ensure!(
        placed["bk_biz_id"] == json!(BIZ)
            && placed["modules"] == json!([MODULE])
            && placed["ip"] == json!(ip),
        "placed as {placed}"
    );
    let bk_host_id = placed["bk_host_id"].as_i64().context("bk_host_id")?;
    let request = |script: &str| {
        let mut request = ctx.cluster.info.scope();
        request["script_language"] = json!(1);
        request["script_content"] = json!(b64(script));
        request["account_alias"] = json!("root");
        request["timeout"] = json!(120);
        request["target_server"] = json!({"host_id_list": [bk_host_id]});
        request
    };
    let script = "ip -4 -o addr show eth0 | awk '{print $4}' | cut -d/ -f1";
    let (job, step, status) = ctx.run(request(script)).await?;
    Ctx::expect(&status, 3, |_| 9)?;
    let logs = client
        .logs(&ctx.cluster.info.scope(), job, step, &[bk_host_id])
        .await?;
    ensure!(logs[0].1 == format!("{ip}\n"), "{logs:?}");

    // A renewal during a running task leaves it untouched.
    let (job, step) = ctx
        .submit(request("echo before; sleep 25; echo after"))
        .await?;
    let agent_log = base.join("agent.log");
    until(
        Duration::from_secs(LIFETIME_SECS),
        "the certificate renewed",
        async || {
            std::fs::read_to_string(&agent_log)
                .ok()?
                .contains("certificate renewed")
                .then_some(())
        },
    )
    .await?;
    let status = ctx.wait(job, Duration::from_secs(60)).await?;
    Ctx::expect(&status, 3, |_| 9)?;
    let logs = client
        .logs(&ctx.cluster.info.scope(), job, step, &[bk_host_id])
        .await?;
    ensure!(logs[0].1 == "before\nafter\n", "{logs:?}");
    println!("    renewed during a running task, which ended untouched");

    // Revoked: cut off within a second, and it cannot come back.
    let asked = Instant::now();
    let revoked = client
        .call(
            "revoke_agent",
            json!({"agent_id": agent_id, "reason": "e2e"}),
        )
        .await?;
    ensure!(revoked["connections_closed"] == json!(1), "{revoked}");
    let took = asked.elapsed();
    ensure!(took <= Duration::from_secs(1), "revocation took {took:?}");
    until(
        Duration::from_secs(5),
        "the agent told it is revoked",
        async || {
            std::fs::read_to_string(&agent_log)
                .ok()?
                .contains("revoked by an operator")
                .then_some(())
        },
    )
    .await?;
    println!("    revoked and disconnected in {took:.0?}");
    refused(
        &enroll(ctx, host, &base, &secret, &pin)?,
        "which an operator revoked",
    )?;
    let controller_log = ctx.cluster.controller_log.clone();
    until(
        Duration::from_secs(20),
        "a reconnection refused",
        async || {
            std::fs::read_to_string(&controller_log)
                .ok()?
                .contains("refusing a revoked agent")
                .then_some(())
        },
    )
    .await?;
    let hosts = client.hosts().await?;
    if hosts
        .iter()
        .any(|h| h["agent_id"] == json!(agent_id) && h["online"] == json!(true))
    {
        bail!("the revoked agent is online: {hosts:?}");
    }
    if let Some(mut child) = bare.0.take() {
        let _ = child.kill();
        let _ = child.wait();
    }
    Ok(())
}
