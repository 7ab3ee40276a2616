//! `cargo xtask e2e`: fleetrun on hosts with their own addresses (network namespaces), through
//! the HTTP API, including faults: agents and controllers killed, links cut, lossy links.
//!
//! Every scenario ends by checking that each (job, host) reached an explicit final state with
//! the exact output; the run ends by checking that no process of any task is left.

use std::{
    sync::Arc,
    time::{Duration, Instant},
};

use anyhow::{Context, Result, bail, ensure};
use base64::Engine as _;
use serde_json::{Value, json};

pub mod cluster;
mod enroll;
mod reattach;

use fleetrun_testkit::{
    cluster::{Cluster, ClusterOptions, workspace_root},
    netns::Network,
};

use crate::relay::Relay;

#[derive(Debug, Clone)]
pub struct E2eOptions {
    /// Namespace hosts, one agent each.
    pub hosts: usize,
    pub release: bool,
    /// Run only scenarios whose name contains this.
    pub only: Option<String>,
    /// Several controllers sharing a PostgreSQL database (`cluster.rs`'s scenarios): their
    /// number and the database (`postgres` or a server URL).
    pub controllers: Option<(usize, String)>,
}

struct Ctx {
    cluster: Cluster,
    network: Arc<Network>,
    /// Every agent reaches the controller through it; it loses and delays packets on demand
    /// (this kernel may have no `netem`).
    relay: Relay,
}

const SCENARIOS: &[&str] = &[
    "languages",
    "accounts",
    "targeting",
    "timeout",
    "termination",
    "callback",
    "agent-killed",
    "link-cut",
    "file-cut",
    "lossy-links",
    "controller-killed",
    "terminate-after-restart",
    "enroll",
    "old-agent",
];

fn b64(text: &str) -> String {
    base64::engine::general_purpose::STANDARD.encode(text)
}

/// Prints the count of a script that prints 1..=n, one line every `step` seconds.
fn counter(n: u32, step: &str) -> String {
    format!("for i in $(seq 1 {n}); do echo $i; sleep {step}; done")
}

fn counted(n: u32) -> String {
    (1..=n).map(|i| format!("{i}\n")).collect()
}

/// The ids of every host of `cluster`.
fn host_ids(cluster: &Cluster) -> Vec<i64> {
    cluster.info.hosts.iter().map(|h| h.bk_host_id).collect()
}

/// A fast_execute_script request for a shell script on every host of `cluster`, as root;
/// `extra` fields override the defaults.
fn script_request(cluster: &Cluster, script: &str, extra: Value) -> Value {
    let mut request = cluster.info.scope();
    request["script_language"] = json!(1);
    request["script_content"] = json!(b64(script));
    request["account_alias"] = json!("root");
    request["timeout"] = json!(120);
    request["target_server"] = json!({ "host_id_list": host_ids(cluster) });
    for (k, v) in extra.as_object().into_iter().flatten() {
        request[k] = v.clone();
    }
    request
}

impl Ctx {
    fn hosts(&self) -> Vec<i64> {
        host_ids(&self.cluster)
    }

    fn request(&self, script: &str, extra: Value) -> Value {
        script_request(&self.cluster, script, extra)
    }

    async fn submit(&self, request: Value) -> Result<(i64, i64)> {
        let accepted = self.cluster.info.client().submit(request).await?;
        Ok((accepted.job_instance_id, accepted.step_instance_id))
    }

    async fn wait(&self, job: i64, limit: Duration) -> Result<Value> {
        self.cluster
            .info
            .client()
            .wait_job(&self.cluster.info.scope(), job, limit)
            .await
    }

    async fn run(&self, request: Value) -> Result<(i64, i64, Value)> {
        let (job, step) = self.submit(request).await?;
        let status = self.wait(job, Duration::from_secs(120)).await?;
        Ok((job, step, status))
    }

    async fn logs(&self, job: i64, step: i64) -> Result<Vec<(i64, String)>> {
        self.cluster
            .info
            .client()
            .logs(&self.cluster.info.scope(), job, step, &self.hosts())
            .await
    }

    fn results(status: &Value) -> Vec<Value> {
        status["step_instance_list"][0]["step_ip_result_list"]
            .as_array()
            .cloned()
            .unwrap_or_default()
    }

    /// Asserts the job's status and every host's status (by index; `None`: use `default`).
    fn expect(status: &Value, job_status: i64, host_status: impl Fn(i64) -> i64) -> Result<()> {
        ensure!(
            status["job_instance"]["status"] == json!(job_status),
            "job status: {status}"
        );
        for result in Self::results(status) {
            let id = result["bk_host_id"].as_i64().unwrap_or_default();
            ensure!(
                result["status"] == json!(host_status(id)),
                "host {id}: {result}"
            );
        }
        Ok(())
    }

    /// Every agent running and online, every link healthy.
    async fn heal(&mut self) -> Result<()> {
        self.network.heal();
        self.relay.heal();
        for i in 0..self.network.hosts.len().min(self.cluster.agents.len()) {
            let _ = self.network.restore(i);
            if self.cluster.agents[i].pid().is_none() {
                self.cluster.start_agent(i)?;
            }
        }
        let ids: Vec<String> = self
            .cluster
            .agents
            .iter()
            .map(|a| a.agent_id.clone())
            .collect();
        self.cluster
            .wait_online(&ids, Duration::from_secs(60))
            .await?;
        Ok(())
    }

    /// Pids of processes inside this cluster's task cgroups: scripts and their descendants.
    fn task_processes(&self) -> Vec<u32> {
        let port = self
            .cluster
            .info
            .api_url
            .rsplit(':')
            .next()
            .unwrap_or_default()
            .to_owned();
        let marker = format!("/fleetrun-{port}-");
        let mut pids = Vec::new();
        for entry in std::fs::read_dir("/proc").into_iter().flatten().flatten() {
            let Some(pid) = entry
                .file_name()
                .to_str()
                .and_then(|p| p.parse::<u32>().ok())
            else {
                continue;
            };
            if std::fs::read_to_string(format!("/proc/{pid}/cgroup"))
                .is_ok_and(|c| c.contains(&marker))
            {
                pids.push(pid);
            }
        }
        pids
    }

    async fn no_task_processes(&self) -> Result<()> {
        let deadline = Instant::now() + Duration::from_secs(10);
        loop {
            let left = self.task_processes();
            if left.is_empty() {
                return Ok(());
            }
            ensure!(
                Instant::now() < deadline,
                "task processes left behind: {left:?}"
            );
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    }
}

async fn languages(ctx: &mut Ctx) -> Result<()> {
    for (language, script, expected) in [
        (1, "echo \"shell $((6*7))\"", "shell 42\n"),
        (3, "print \"perl \", 6*7, \"\\n\";", "perl 42\n"),
        (4, "print('python', 6*7)", "python 42\n"),
    ] {
        let (job, step, status) = ctx
            .run(ctx.request(script, json!({"script_language": language})))
            .await?;
        Ctx::expect(&status, 3, |_| 9)?;
        for (host, log) in ctx.logs(job, step).await? {
            ensure!(
                log == expected,
                "language {language} on host {host}: {log:?}"
            );
        }
    }
    let (_, _, status) = ctx
        .run(ctx.request("echo hi", json!({"script_language": 2})))
        .await?;
    Ctx::expect(&status, 4, |_| 101)
}

async fn accounts(ctx: &mut Ctx) -> Result<()> {
    let Some(user) = ctx
        .cluster
        .info
        .accounts
        .iter()
        .find(|a| a.account != "root")
        .cloned()
    else {
        bail!("the cluster has no non-root account");
    };
    let (job, step, status) = ctx
        .run(ctx.request("whoami; pwd", json!({"account_alias": user.alias})))
        .await?;
    Ctx::expect(&status, 3, |_| 9)?;
    for (host, log) in ctx.logs(job, step).await? {
        ensure!(
            log == format!("{0}\n/home/{0}\n", user.account),
            "host {host}: {log:?}"
        );
    }
    Ok(())
}

async fn targeting(ctx: &mut Ctx) -> Result<()> {
    // Each host reports the address of its own interface: the script ran in the right place.
    let script = "ip -4 -o addr show eth0 | awk '{print $4}' | cut -d/ -f1";
    let hosts = ctx.cluster.info.hosts.clone();
    let ips: Vec<Value> = hosts
        .iter()
        .map(|h| json!({"bk_cloud_id": h.bk_cloud_id, "ip": h.ip}))
        .collect();
    // The cluster's inventory (cluster::DEFAULT_INVENTORY): agent-1 in module 100 of set 10,
    // agent-3 in module 110 of set 11, every other agent in module 101 of set 10; the dynamic
    // group "web-servers" is set 10.
    let agent_of = |id: &str| {
        hosts
            .iter()
            .find(|h| h.agent_id == id)
            .map(|h| h.bk_host_id)
    };
    let web: Vec<i64> = hosts
        .iter()
        .filter(|h| h.agent_id != "agent-3")
        .map(|h| h.bk_host_id)
        .collect();
    let cases = [
        (json!({"host_id_list": ctx.hosts()}), ctx.hosts()),
        (json!({"ip_list": ips}), ctx.hosts()),
        (
            json!({"topo_node_list": [{"id": 110, "node_type": "module"}]}),
            agent_of("agent-3").into_iter().collect(),
        ),
        (
            json!({"topo_node_list": [{"id": 10, "node_type": "set"}]}),
            web.clone(),
        ),
        (json!({"dynamic_group_list": [{"id": "web-servers"}]}), web),
    ];
    for (target, expected) in cases {
        ensure!(!expected.is_empty(), "no host expected for {target}");
        let (job, step, status) = ctx
            .run(ctx.request(script, json!({"target_server": target})))
            .await?;
        Ctx::expect(&status, 3, |_| 9)?;
        let mut reached: Vec<i64> = Ctx::results(&status)
            .iter()
            .filter_map(|r| r["bk_host_id"].as_i64())
            .collect();
        reached.sort_unstable();
        let mut expected = expected;
        expected.sort_unstable();
        ensure!(
            reached == expected,
            "{target} reached {reached:?}, expected {expected:?}"
        );
        for (host, log) in ctx.logs(job, step).await? {
            let Some(info) = hosts.iter().find(|h| h.bk_host_id == host) else {
                continue;
            };
            if reached.contains(&host) {
                ensure!(
                    log == format!("{}\n", info.ip),
                    "host {host} ({}) said {log:?}",
                    info.ip
                );
            }
        }
    }
    Ok(())
}

async fn timeout(ctx: &mut Ctx) -> Result<()> {
    let script = "sleep 300 & setsid sh -c 'sleep 300 & sleep 300' & echo started; sleep 300";
    let (job, step, status) = ctx.run(ctx.request(script, json!({"timeout": 2}))).await?;
    Ctx::expect(&status, 4, |_| 102)?;
    for (host, log) in ctx.logs(job, step).await? {
        ensure!(
            log.starts_with("started\n") && log.contains("timed out"),
            "host {host}: {log:?}"
        );
    }
    ctx.no_task_processes().await
}

async fn termination(ctx: &mut Ctx) -> Result<()> {
    let (job, _) = ctx
        .submit(ctx.request("echo started; sleep 300", json!({})))
        .await?;
    let client = ctx.cluster.info.client();
    let mut query = ctx.cluster.info.scope();
    query["job_instance_id"] = json!(job);
    query["return_ip_result"] = json!(true);
    let deadline = Instant::now() + Duration::from_secs(30);
    loop {
        let status = client
            .call("get_job_instance_status", query.clone())
            .await?;
        if Ctx::results(&status)
            .iter()
            .all(|r| r["status"] == json!(7))
        {
            break;
        }
        ensure!(
            Instant::now() < deadline,
            "hosts never all running: {status}"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    let mut operate = ctx.cluster.info.scope();
    operate["job_instance_id"] = json!(job);
    operate["operation_code"] = json!(1);
    client.call("operate_job_instance", operate).await?;
    let status = ctx.wait(job, Duration::from_secs(30)).await?;
    Ctx::expect(&status, 11, |_| 403)?;
    ctx.no_task_processes().await
}

async fn callback(ctx: &mut Ctx) -> Result<()> {
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await?;
    let url = format!("http://{}/hook", listener.local_addr()?);
    let (sent, mut received) = tokio::sync::mpsc::channel::<Value>(4);
    let app = axum::Router::new().route(
        "/hook",
        axum::routing::post(move |body: axum::body::Bytes| {
            let sent = sent.clone();
            async move {
                if let Ok(value) = serde_json::from_slice::<Value>(&body) {
                    let _ = sent.send(value).await;
                }
                "ok"
            }
        }),
    );
    let server = tokio::spawn(async move { axum::serve(listener, app).await });
    let (job, _, status) = ctx
        .run(ctx.request("echo hi", json!({"callback_url": url})))
        .await?;
    Ctx::expect(&status, 3, |_| 9)?;
    let body = tokio::time::timeout(Duration::from_secs(20), received.recv())
        .await
        .context("no callback within 20 s")?
        .context("listener gone")?;
    server.abort();
    ensure!(
        body["job_instance_id"] == json!(job) && body["status"] == json!(3),
        "callback body {body}"
    );
    ensure!(
        body["step_instances"] == body["step_instance_list"],
        "callback body {body}"
    );
    Ok(())
}

async fn agent_killed(ctx: &mut Ctx) -> Result<()> {
    let (job, step) = ctx
        .submit(ctx.request(&counter(20, "0.5"), json!({})))
        .await?;
    tokio::time::sleep(Duration::from_secs(2)).await;
    let victim = ctx.cluster.info.hosts[0].bk_host_id;
    let killed_at = Instant::now();
    ctx.cluster.kill_agent(0)?;
    // The restarted agent kills what its predecessor left running, finds the task in its spool
    // and reports it ended, with the output spooled before the kill.
    ctx.heal().await?;
    let status = ctx.wait(job, Duration::from_secs(60)).await?;
    let noticed = killed_at.elapsed();
    Ctx::expect(&status, 4, |h| if h == victim { 399 } else { 9 })?;
    for result in Ctx::results(&status) {
        if result["bk_host_id"] == json!(victim) {
            ensure!(
                result["tag"]
                    .as_str()
                    .is_some_and(|t| t.contains("agent restarted")),
                "unexplained: {result}"
            );
        }
    }
    for (host, log) in ctx.logs(job, step).await? {
        if host != victim {
            ensure!(log == counted(20), "host {host}: {log:?}");
        } else {
            ensure!(log.starts_with("1\n2\n"), "host {host}: {log:?}");
        }
    }
    println!("    the killed agent's host ended 399 with the reason, {noticed:.1?} after the kill");
    ctx.no_task_processes().await
}

async fn link_cut(ctx: &mut Ctx) -> Result<()> {
    // A 20 s script printing a numbered line every 100 ms; every link cut for 30 s at 5 s, far
    // longer than the idle timeout: the scripts go on, and their output arrives once, after.
    let (job, step) = ctx
        .submit(ctx.request(&counter(200, "0.1"), json!({})))
        .await?;
    tokio::time::sleep(Duration::from_secs(5)).await;
    let hosts = ctx.network.hosts.len();
    for index in 0..hosts {
        ctx.network.cut(index)?;
    }
    tokio::time::sleep(Duration::from_secs(30)).await;
    for index in 0..hosts {
        ctx.network.restore(index)?;
    }
    let status = ctx.wait(job, Duration::from_secs(90)).await?;
    Ctx::expect(&status, 3, |_| 9)?;
    for (host, log) in ctx.logs(job, step).await? {
        ensure!(
            log == counted(200),
            "host {host}: output not complete exactly once: {log:?}"
        );
    }
    ctx.no_task_processes().await
}

/// A file's SHA-256, by `sha256sum`.
fn sha256_of(path: &std::path::Path) -> Result<String> {
    let out = std::process::Command::new("sha256sum").arg(path).output()?;
    ensure!(out.status.success(), "sha256sum {}", path.display());
    Ok(String::from_utf8_lossy(&out.stdout)
        .split_whitespace()
        .next()
        .unwrap_or_default()
        .to_owned())
}

/// The largest partial file a fetch is writing in `dir`.
fn largest_partial(dir: &std::path::Path) -> u64 {
    std::fs::read_dir(dir)
        .into_iter()
        .flatten()
        .flatten()
        .filter(|e| e.file_name().to_string_lossy().ends_with(".part"))
        .filter_map(|e| e.metadata().ok().map(|m| m.len()))
        .max()
        .unwrap_or(0)
}

async fn file_cut(ctx: &mut Ctx) -> Result<()> {
    // A 256 MiB file from host 0 to every host, paced at 32 MB/s per target; host 1's link cut
    // for 8 s mid-transfer, longer than the idle timeout, so its connection is lost and the
    // fetch goes on over the next one from the chunks on disk. The hosts share this machine's
    // file system: each lands the same file, verified by its own agent before the rename.
    const SIZE: usize = 256 * 1024 * 1024;
    let dir = workspace_root().join("target/e2e-files");
    let _ = std::fs::remove_dir_all(&dir);
    let out = dir.join("out");
    std::fs::create_dir_all(&out)?;
    let src = dir.join("big.bin");
    {
        use std::io::Write as _;
        let mut file = std::io::BufWriter::new(std::fs::File::create(&src)?);
        let mut state = 0x9E37_79B9_7F4A_7C15u64;
        let mut block = vec![0u8; 1 << 20];
        for _ in 0..SIZE / block.len() {
            for word in block.chunks_exact_mut(8) {
                state ^= state << 13;
                state ^= state >> 7;
                state ^= state << 17;
                word.copy_from_slice(&state.to_le_bytes());
            }
            file.write_all(&block)?;
        }
        file.flush()?;
    }
    let expected = sha256_of(&src)?;
    let hosts = ctx.hosts();
    let mut request = ctx.cluster.info.scope();
    request["account_alias"] = json!("root");
    request["file_target_path"] = json!(out.to_string_lossy());
    request["file_source_list"] = json!([{
        "file_type": 1,
        "file_list": [src.to_string_lossy()],
        "account": {"alias": "root"},
        "server": {"host_id_list": [hosts[0]]},
    }]);
    request["target_server"] = json!({ "host_id_list": hosts });
    request["download_speed_limit"] = json!(32);
    request["timeout"] = json!(240);
    let accepted = ctx
        .cluster
        .info
        .client()
        .call("fast_transfer_file", request)
        .await?;
    let job = accepted["job_instance_id"]
        .as_i64()
        .context("the transfer's job id")?;
    let started = Instant::now();
    while largest_partial(&out) < 48 * 1024 * 1024 {
        ensure!(
            started.elapsed() < Duration::from_secs(120),
            "no target got 48 MiB within 120 s"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    let cut = 1.min(ctx.network.hosts.len() - 1);
    ctx.network.cut(cut)?;
    tokio::time::sleep(Duration::from_secs(8)).await;
    ctx.network.restore(cut)?;
    let status = ctx.wait(job, Duration::from_secs(240)).await?;
    Ctx::expect(&status, 3, |_| 9)?;
    let landed = sha256_of(&out.join("big.bin"))?;
    ensure!(landed == expected, "landed {landed}, sent {expected}");
    let log = std::fs::read_to_string(&ctx.cluster.controller_log).unwrap_or_default();
    ensure!(
        log.contains("transfer resumed on the agent's new connection"),
        "the cut target's fetch was not resumed"
    );
    // The cut host went on from the chunks on disk, not from the start.
    let agent_log = std::fs::read_to_string(&ctx.cluster.agents[cut].log).unwrap_or_default();
    let from: u64 = agent_log
        .lines()
        .filter(|l| l.contains("resuming a file from the chunks on disk"))
        .filter_map(|l| l.split("from_chunk=").nth(1))
        .filter_map(|rest| rest.split(|c: char| !c.is_ascii_digit()).next())
        .filter_map(|n| n.parse().ok())
        .max()
        .context("the cut host's agent did not resume the file from disk")?;
    ensure!(from > 0, "the cut host resumed from chunk {from}");
    // Every target's file relayed once, and no more sent twice than was in flight at the cut: a
    // fetch started again would send the cut host's 48 MiB or more a second time.
    let relayed: u64 = log
        .lines()
        .filter(|l| l.contains("transfer ended") && l.contains(&format!("job={job}")))
        .filter_map(|l| l.split("controller_bytes_relayed=").nth(1))
        .filter_map(|rest| rest.split(|c: char| !c.is_ascii_digit()).next())
        .filter_map(|n| n.parse().ok())
        .next()
        .context("the bytes relayed, from the controller's log")?;
    let once = (SIZE * hosts.len()) as u64;
    let in_flight = 16 * 1024 * 1024;
    ensure!(
        relayed >= once && relayed <= once + in_flight,
        "{relayed} bytes relayed for {} targets of {SIZE}",
        hosts.len()
    );
    println!(
        "file-cut: resumed from chunk {from}; {} bytes sent twice of {relayed} relayed",
        relayed - once
    );
    let left: Vec<String> = std::fs::read_dir(&out)?
        .flatten()
        .map(|e| e.file_name().to_string_lossy().into_owned())
        .filter(|name| name.starts_with(".fleetrun-"))
        .collect();
    ensure!(left.is_empty(), "partial or temporary files left: {left:?}");
    let _ = std::fs::remove_dir_all(&dir);
    Ok(())
}

async fn lossy_links(ctx: &mut Ctx) -> Result<()> {
    // netem on every link when the kernel has it; the relay's loss and delay otherwise.
    if ctx.network.impair(10, 100).is_err() {
        ctx.relay.impair(10, 100);
    }
    let result = async {
        let script = "for i in $(seq 1 300); do echo line-$i; done";
        let (job, step, status) = ctx.run(ctx.request(script, json!({}))).await?;
        Ctx::expect(&status, 3, |_| 9)?;
        let expected: String = (1..=300).map(|i| format!("line-{i}\n")).collect();
        for (host, log) in ctx.logs(job, step).await? {
            ensure!(
                log == expected,
                "host {host}: output damaged over a lossy link"
            );
        }
        Ok(())
    }
    .await;
    ctx.network.heal();
    ctx.relay.heal();
    result
}

async fn controller_killed(ctx: &mut Ctx) -> Result<()> {
    let (before, _, _) = ctx.run(ctx.request("echo before", json!({}))).await?;
    // A 20 s script printing a numbered line every 100 ms; the controller SIGKILLed at 5 s and
    // started again at 8 s takes the job up: the agents kept the scripts running and their output.
    let inbox = reattach::CallbackInbox::start().await?;
    let (job, step) = ctx
        .submit(ctx.request(&counter(200, "0.1"), json!({"callback_url": inbox.url})))
        .await?;
    tokio::time::sleep(Duration::from_secs(5)).await;
    ctx.cluster.kill_controller()?;
    tokio::time::sleep(Duration::from_secs(3)).await;
    ctx.cluster.start_controller().await?;
    let status = ctx.wait(job, Duration::from_secs(60)).await?;
    Ctx::expect(&status, 3, |_| 9)?;
    for (host, log) in ctx.logs(job, step).await? {
        ensure!(
            log == counted(200),
            "host {host}: output not complete exactly once: {log:?}"
        );
    }
    let callbacks = inbox
        .for_job(job, Duration::from_secs(20), Duration::from_secs(3))
        .await?;
    ensure!(
        callbacks.len() == 1 && callbacks[0]["status"] == json!(3),
        "the job's callback, once: {callbacks:?}"
    );
    let old = ctx.wait(before, Duration::from_secs(5)).await?;
    Ctx::expect(&old, 3, |_| 9)?;
    let (_, _, after) = ctx.run(ctx.request("echo after", json!({}))).await?;
    Ctx::expect(&after, 3, |_| 9)?;
    ctx.no_task_processes().await
}

/// Pids of processes whose command line holds `token` (a script's parameter): found without
/// cgroups, which a host may lack.
fn processes_with(token: &str) -> Vec<u32> {
    let mut pids = Vec::new();
    for entry in std::fs::read_dir("/proc").into_iter().flatten().flatten() {
        let Some(pid) = entry
            .file_name()
            .to_str()
            .and_then(|p| p.parse::<u32>().ok())
        else {
            continue;
        };
        if std::fs::read(format!("/proc/{pid}/cmdline"))
            .is_ok_and(|c| c.windows(token.len()).any(|w| w == token.as_bytes()))
        {
            pids.push(pid);
        }
    }
    pids
}

async fn terminate_after_restart(ctx: &mut Ctx) -> Result<()> {
    let token = format!("terminate-after-restart-{}", std::process::id());
    let (job, _) = ctx
        .submit(ctx.request(&counter(600, "0.1"), json!({"script_param": b64(&token)})))
        .await?;
    tokio::time::sleep(Duration::from_secs(2)).await;
    ctx.cluster.kill_controller()?;
    // The log is kept across restarts: only what the restarted controller writes counts.
    let log = ctx.cluster.controller_log.clone();
    let before = std::fs::metadata(&log).map_or(0, |m| m.len() as usize);
    tokio::time::sleep(Duration::from_secs(2)).await;
    ctx.cluster.start_controller().await?;
    // Every agent back with its task before the termination is asked for.
    let hosts = ctx.hosts().len();
    let deadline = Instant::now() + Duration::from_secs(60);
    loop {
        let text = std::fs::read(&log).unwrap_or_default();
        let new = String::from_utf8_lossy(text.get(before..).unwrap_or_default());
        if new.matches(&format!("task reattached job={job} ")).count() >= hosts {
            break;
        }
        ensure!(
            Instant::now() < deadline,
            "the agents did not come back with their tasks"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    let running = processes_with(&token);
    ensure!(running.len() >= hosts, "the scripts run on: {running:?}");
    let mut body = ctx.cluster.info.scope();
    body["job_instance_id"] = json!(job);
    body["operation_code"] = json!(1);
    let asked = Instant::now();
    ctx.cluster
        .info
        .client()
        .call("operate_job_instance", body)
        .await?;
    let deadline = asked + Duration::from_secs(1);
    while !processes_with(&token).is_empty() {
        ensure!(
            Instant::now() < deadline,
            "scripts still running 1 s after the termination: {:?}",
            processes_with(&token)
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    println!(
        "    every script gone {:.0?} after the termination",
        asked.elapsed()
    );
    let status = ctx.wait(job, Duration::from_secs(30)).await?;
    Ctx::expect(&status, 11, |_| 403)
}

async fn scenario(name: &str, ctx: &mut Ctx) -> Result<()> {
    match name {
        "languages" => languages(ctx).await,
        "accounts" => accounts(ctx).await,
        "targeting" => targeting(ctx).await,
        "timeout" => timeout(ctx).await,
        "termination" => termination(ctx).await,
        "callback" => callback(ctx).await,
        "agent-killed" => agent_killed(ctx).await,
        "link-cut" => link_cut(ctx).await,
        "file-cut" => file_cut(ctx).await,
        "lossy-links" => lossy_links(ctx).await,
        "controller-killed" => controller_killed(ctx).await,
        "terminate-after-restart" => terminate_after_restart(ctx).await,
        "enroll" => enroll::scenario(ctx).await,
        "old-agent" => reattach::old_agent(ctx).await,
        other => bail!("no scenario {other}"),
    }
}

pub async fn run(opts: &E2eOptions) -> Result<()> {
    if let Some((controllers, database)) = &opts.controllers {
        return cluster::run(opts, *controllers, database).await;
    }
    // One more host than agents: the `enroll` scenario's host, with nothing but what
    // enrollment puts there.
    let network = Arc::new(Network::create(opts.hosts + 1)?);
    let dir = workspace_root().join("target/e2e");
    let _ = std::fs::remove_dir_all(&dir);
    println!(
        "{} hosts in network namespaces on bridge {} ({})",
        opts.hosts, network.bridge, network.gateway
    );
    let agent_port = fleetrun_testkit::cluster::free_port()?;
    let relay = Relay::start(
        std::net::SocketAddr::new(network.gateway.into(), 0),
        std::net::SocketAddr::new(network.gateway.into(), agent_port),
    )
    .await?;
    let cluster = Cluster::start(&ClusterOptions {
        agents: opts.hosts,
        dir: dir.clone(),
        release: opts.release,
        network: Some(network.clone()),
        agent_port: Some(agent_port),
        agents_connect_to: Some(relay.addr),
        ..Default::default()
    })
    .await?;
    let mut ctx = Ctx {
        cluster,
        network,
        relay,
    };
    let (mut passed, mut failed) = (0, 0);
    for name in SCENARIOS
        .iter()
        .filter(|n| opts.only.as_deref().is_none_or(|o| n.contains(o)))
    {
        let started = Instant::now();
        let outcome = scenario(name, &mut ctx).await;
        let healed = ctx.heal().await;
        match outcome.and(healed) {
            Ok(()) => {
                passed += 1;
                println!("PASS {name} ({:.1?})", started.elapsed());
            }
            Err(e) => {
                failed += 1;
                println!("FAIL {name} ({:.1?}): {e:#}", started.elapsed());
            }
        }
    }
    let leftovers = ctx.no_task_processes().await;
    ctx.cluster.stop();
    drop(ctx);
    if let Err(e) = leftovers {
        failed += 1;
        println!("FAIL no processes left behind: {e:#}");
    }
    println!("logs in {}", dir.display());
    println!("e2e: {passed} passed, {failed} failed");
    ensure!(failed == 0, "{failed} e2e scenarios failed");
    Ok(())
}
