//! The subcommands.

use std::{
    io::{Read, Write},
    path::Path,
    sync::atomic::{AtomicI64, Ordering},
    time::{Duration, Instant},
};

use fleetrun_api::HostStatus;
use serde_json::{Value, json};

use crate::{
    admin, age,
    args::{Cli, Command, HostsArgs, JobsArgs, Output, RunArgs},
    client::Client,
    display::{self, Live, Style},
    error::{CliError, exit},
    follow::follow,
    inventory, library,
    request::{self, IpTarget},
    settings,
    view::{
        Change, JobView, Outcome, host_status_name, job_finished, job_status_code, job_status_name,
    },
};

/// The job `run` started, so an interrupted run can say how to reach it again.
pub static STARTED_JOB: AtomicI64 = AtomicI64::new(0);

/// What every command needs.
pub(crate) struct Ctx {
    pub client: Client,
    pub output: Output,
    pub quiet: bool,
    pub style: Style,
}

/// Runs the command line; returns the exit status.
pub async fn dispatch(cli: &Cli) -> Result<u8, CliError> {
    let env = |key: &str| std::env::var(key).ok();
    let settings = settings::resolve(&cli.global, &env)?;
    let ctx = Ctx {
        client: Client::new(settings, cli.global.verbose)?,
        output: cli.global.output,
        quiet: cli.global.quiet,
        style: Style::detect(),
    };
    match &cli.command {
        Command::Run(run) => run_job(&ctx, run).await,
        Command::Push(args) => crate::transfer::push(&ctx, args).await,
        Command::Cp(args) => crate::transfer::cp(&ctx, args).await,
        Command::Status { job } => status(&ctx, *job).await,
        Command::Logs { job, hosts, follow } => logs(&ctx, *job, hosts, *follow).await,
        Command::Jobs(args) => jobs(&ctx, args).await,
        Command::Kill { job, no_wait } => kill(&ctx, *job, *no_wait).await,
        Command::Confirm { job } => {
            crate::rolling::operate(&ctx, *job, crate::rolling::CONFIRM).await
        }
        Command::Ignore { job } => {
            crate::rolling::operate(&ctx, *job, crate::rolling::IGNORE).await
        }
        Command::Retry { job, all } => {
            let code = if *all {
                crate::rolling::RETRY_ALL
            } else {
                crate::rolling::RETRY_FAILED
            };
            crate::rolling::operate(&ctx, *job, code).await
        }
        Command::Hosts(args) => match &args.command {
            None => hosts(&ctx, args).await,
            Some(command) => admin::run(&ctx, admin::host_change(command)).await,
        },
        Command::Scripts(command) => library::scripts(&ctx, command).await,
        Command::Topology => library::topology(&ctx).await,
        Command::Inventory(command) => inventory::run(&ctx, command).await,
        Command::Biz(command) => admin::run(&ctx, Ok(admin::biz_change(command))).await,
        Command::Bizset(command) => admin::run(&ctx, Ok(admin::bizset_change(command))).await,
        Command::Node(command) => admin::run(&ctx, admin::node_change(command)).await,
        Command::Groups(args) => match &args.command {
            None => admin::groups(&ctx, args.biz).await,
            Some(command) => admin::run(&ctx, Ok(admin::group_change(command))).await,
        },
        Command::Accounts(args) => match &args.command {
            None => admin::accounts(&ctx).await,
            Some(command) => admin::run(&ctx, Ok(admin::account_change(command))).await,
        },
        Command::Agents(command) => admin::agents(&ctx, command).await,
        Command::Audit(args) => crate::audit::run(&ctx, args).await,
        Command::Rules(command) => crate::rules::rules(&ctx, command).await,
        Command::CheckScript(args) => crate::rules::check_script(&ctx, args).await,
        Command::Tokens(command) => crate::tokens::run(&ctx, command).await,
        // Answered in main, before any setting is read.
        Command::Completions { .. } | Command::Man { .. } => Ok(exit::OK),
    }
}

pub(crate) fn print(text: &str) -> Result<(), CliError> {
    let mut out = std::io::stdout().lock();
    out.write_all(text.as_bytes())
        .and_then(|()| out.flush())
        .map_err(CliError::output)
}

pub(crate) fn print_json(value: &Value) -> Result<(), CliError> {
    // A `Value` always serializes.
    print(&format!(
        "{}\n",
        serde_json::to_string_pretty(value).unwrap_or_default()
    ))
}

pub(crate) fn read_script(path: &Path) -> std::io::Result<Vec<u8>> {
    if path == Path::new("-") {
        let mut content = Vec::new();
        std::io::stdin().read_to_end(&mut content)?;
        Ok(content)
    } else {
        std::fs::read(path)
    }
}

/// `--ip` targets as host ids, through `list_hosts`: bk-job ignores `ip_list` when
/// `host_id_list` is given, and `run` lets the two mix.
pub(crate) async fn host_ids_of(client: &Client, ips: &[IpTarget]) -> Result<Vec<i64>, CliError> {
    let hosts = client.call("list_hosts", json!({})).await?;
    let same =
        |a: &str, b: &str| match (a.parse::<std::net::IpAddr>(), b.parse::<std::net::IpAddr>()) {
            (Ok(a), Ok(b)) => a.to_canonical() == b.to_canonical(),
            _ => a == b,
        };
    let mut ids = Vec::new();
    let mut unknown = Vec::new();
    for target in ips {
        let found = hosts.as_array().into_iter().flatten().find(|h| {
            h["bk_cloud_id"].as_i64() == Some(target.bk_cloud_id)
                && same(h["ip"].as_str().unwrap_or(""), &target.ip)
        });
        match found.and_then(|h| h["bk_host_id"].as_i64()) {
            Some(id) => ids.push(id),
            None => unknown.push(format!("{}:{}", target.bk_cloud_id, target.ip)),
        }
    }
    if !unknown.is_empty() {
        return Err(CliError::UnknownHosts(unknown.join(", ")));
    }
    Ok(ids)
}

async fn run_job(ctx: &Ctx, run: &RunArgs) -> Result<u8, CliError> {
    let ips = run
        .ips
        .iter()
        .map(|ip| request::parse_ip(ip))
        .collect::<Result<Vec<_>, _>>()?;
    let mut host_ids = run.hosts.clone();
    let mut ip_list = ips.as_slice();
    if !host_ids.is_empty() && !ips.is_empty() {
        host_ids.extend(host_ids_of(&ctx.client, &ips).await?);
        ip_list = &[];
    }
    let request = ctx
        .client
        .scoped(request::build(run, &host_ids, ip_list, &read_script)?)?;
    if run.dry_run {
        return crate::rolling::dry_run(ctx, &request).await;
    }
    let accepted = ctx.client.call("fast_execute_script", request).await?;
    let job = accepted["job_instance_id"].as_i64().unwrap_or_default();
    STARTED_JOB.store(job, Ordering::Relaxed);
    if run.detach {
        return match ctx.output {
            Output::Text => print(&format!("{job}\n")),
            _ => print(&format!("{accepted}\n")),
        }
        .map(|()| exit::OK);
    }
    if ctx.output == Output::Jsonl {
        let mut submitted = accepted.clone();
        submitted["type"] = json!("submitted");
        print(&format!("{submitted}\n"))?;
    }
    let mut view = JobView::new(job, ctx.output == Output::Json);
    view.step_instance_id = accepted["step_instance_id"].as_i64();
    view.name = accepted["job_instance_name"].as_str().map(str::to_owned);
    watch(ctx, &mut view, &[], true).await
}

/// Follows a job to its end, printing as `--output` asks; `run` adds the progress line and
/// the summary.
pub(crate) async fn watch(
    ctx: &Ctx,
    view: &mut JobView,
    hosts: &[i64],
    run: bool,
) -> Result<u8, CliError> {
    let started = Instant::now();
    let mut live = (ctx.output == Output::Text).then(|| {
        Live::new(
            ctx.style,
            !(run && ctx.quiet),
            run && !ctx.quiet,
            view.job_instance_id,
        )
    });
    {
        let output = ctx.output;
        let mut on_event =
            |view: &JobView, event: &Value, change: &Change| match (output, &mut live) {
                (Output::Jsonl, _) => print(&format!("{event}\n")),
                (Output::Text, Some(live)) => live.on_change(view, change),
                _ => Ok(()),
            };
        follow(&ctx.client, view, hosts, &mut on_event).await?;
    }
    if let Some(live) = &mut live {
        live.finish(view)?;
    }
    drop(live);
    if run && ctx.output != Output::Jsonl {
        // The controller's own times and name, for the summary.
        let query = ctx
            .client
            .scoped(json!({"job_instance_id": view.job_instance_id}))?;
        if let Ok(status) = ctx.client.call("get_job_instance_status", query).await {
            view.total_time_ms = status["job_instance"]["total_time"].as_i64();
            view.name = status["job_instance"]["name"].as_str().map(str::to_owned);
        }
    }
    match ctx.output {
        Output::Text if run => print(&display::summary(view, &ctx.style, started.elapsed()))?,
        Output::Json => print_json(&view.to_json())?,
        _ => {}
    }
    Ok(exit_for(view))
}

/// 0 while no host has failed (and, for an ended job, every host succeeded).
fn exit_for(view: &JobView) -> u8 {
    let failed = view
        .hosts
        .iter()
        .any(|h| h.outcome().is_final() && h.outcome() != Outcome::Succeeded);
    let ended_badly = view.status.is_some_and(job_finished) && !view.succeeded();
    if failed || ended_badly {
        exit::HOSTS_FAILED
    } else {
        exit::OK
    }
}

/// A job's status with every host's result, as a view (no output).
async fn load(ctx: &Ctx, job: i64, hosts: &[i64]) -> Result<(JobView, Value), CliError> {
    let query = ctx
        .client
        .scoped(json!({"job_instance_id": job, "return_ip_result": true}))?;
    let status = ctx.client.call("get_job_instance_status", query).await?;
    let mut view = JobView::new(job, true);
    let info = &status["job_instance"];
    view.name = info["name"].as_str().map(str::to_owned);
    view.status = info["status"].as_i64().map(|s| s as i32);
    view.total_time_ms = info["total_time"].as_i64();
    let step = &status["step_instance_list"][0];
    view.step_instance_id = step["step_instance_id"].as_i64();
    for result in step["step_ip_result_list"].as_array().into_iter().flatten() {
        let id = result["bk_host_id"].as_i64().unwrap_or_default();
        if hosts.is_empty() || hosts.contains(&id) {
            let mut result = result.clone();
            // bk-job reports 0 for a host without an exit code; only a 104 has a real one.
            let status = result["status"]
                .as_i64()
                .and_then(|s| i32::try_from(s).ok());
            let has_exit_code = status
                .map(HostStatus::from_code)
                .is_some_and(|s| matches!(s, HostStatus::NonZeroExit | HostStatus::Success));
            if !has_exit_code && result["exit_code"] == 0 {
                result["exit_code"] = Value::Null;
            }
            view.update_host(&result);
        }
    }
    Ok((view, status))
}

async fn status(ctx: &Ctx, job: i64) -> Result<u8, CliError> {
    let (view, data) = load(ctx, job, &[]).await?;
    match ctx.output {
        Output::Json => print_json(&data)?,
        Output::Jsonl => print(&format!("{data}\n"))?,
        Output::Text => {
            let status = view.status.unwrap_or(0);
            let counts = view.counts();
            let time = view
                .total_time_ms
                .map(|ms| {
                    format!(
                        " in {}",
                        display::seconds(Duration::from_millis(ms.max(0) as u64))
                    )
                })
                .unwrap_or_default();
            let mut text = format!(
                "job {job} ({}): {}{time} — {} waiting, {} running, {} succeeded, {} failed\n",
                view.name.as_deref().unwrap_or(""),
                job_status_name(status),
                counts.waiting,
                counts.running,
                counts.succeeded,
                counts.failed,
            );
            let mut rows = vec![
                ["HOST", "IP", "STATUS", "EXIT", "OUTCOME", "TAG"]
                    .map(String::from)
                    .to_vec(),
            ];
            for h in &view.hosts {
                rows.push(vec![
                    h.bk_host_id.to_string(),
                    h.label(),
                    format!("{} {}", h.status, host_status_name(h.status)),
                    h.exit_code
                        .map(|c| c.to_string())
                        .unwrap_or_else(|| "-".into()),
                    h.outcome().label(),
                    h.tag.clone(),
                ]);
            }
            text.push_str(&display::table(&rows));
            print(&text)?;
        }
    }
    Ok(exit_for(&view))
}

async fn logs(ctx: &Ctx, job: i64, hosts: &[i64], follow_it: bool) -> Result<u8, CliError> {
    if follow_it {
        let mut view = JobView::new(job, ctx.output == Output::Json);
        return watch(ctx, &mut view, hosts, false).await;
    }
    let (mut view, _) = load(ctx, job, hosts).await?;
    let step = view.step_instance_id.unwrap_or_default();
    let ids: Vec<i64> = view.hosts.iter().map(|h| h.bk_host_id).collect();
    for batch in ids.chunks(500) {
        let query = ctx.client.scoped(json!({
            "job_instance_id": job, "step_instance_id": step, "host_id_list": batch,
        }))?;
        let data = ctx
            .client
            .call("batch_get_job_instance_ip_log", query)
            .await?;
        for log in data["script_task_logs"].as_array().into_iter().flatten() {
            let text = log["log_content"].as_str().unwrap_or("");
            let id = log["bk_host_id"].as_i64().unwrap_or_default();
            view.add_output(id, 0, text.len() as i64, text);
        }
    }
    view.finished = view.status.is_some_and(job_finished);
    match ctx.output {
        Output::Json => print_json(&view.to_json())?,
        Output::Jsonl => {
            for host in &view.to_json()["hosts"]
                .as_array()
                .cloned()
                .unwrap_or_default()
            {
                print(&format!("{host}\n"))?;
            }
        }
        // One host asked for by id: its output as it is, to redirect into a file.
        Output::Text if hosts.len() == 1 => {
            for host in &view.hosts {
                print(host.output.full.as_deref().unwrap_or(""))?;
            }
        }
        Output::Text => {
            let mut live = Live::new(ctx.style, true, false, job);
            for (i, host) in view.hosts.iter().enumerate() {
                let text = host.output.full.clone().unwrap_or_default();
                live.on_change(&view, &Change::Output(i, text))?;
            }
            live.finish(&view)?;
        }
    }
    Ok(exit_for(&view))
}

pub(crate) fn now_ms() -> i64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.as_millis() as i64)
}

async fn jobs(ctx: &Ctx, args: &JobsArgs) -> Result<u8, CliError> {
    let now = now_ms();
    let mut query = json!({
        "create_time_start": now - age::age_ms("--since", &args.since)?,
        "create_time_end": now,
        "length": args.limit,
    });
    if let Some(status) = &args.status {
        let code = job_status_code(status).ok_or_else(|| {
            CliError::usage(format!(
                "--status {status:?} is not a job status (running, success, failed, terminated, ... or a number)"
            ))
        })?;
        query["status"] = json!(code);
    }
    if let Some(name) = &args.name {
        query["name"] = json!(name);
    }
    if let Some(operator) = &args.operator {
        query["operator"] = json!(operator);
    }
    let data = ctx
        .client
        .call("get_job_instance_list", ctx.client.scoped(query)?)
        .await?;
    let jobs = data["data"].as_array().cloned().unwrap_or_default();
    match ctx.output {
        Output::Json => print_json(&data)?,
        Output::Jsonl => {
            for job in &jobs {
                print(&format!("{job}\n"))?;
            }
        }
        Output::Text => {
            let mut rows = vec![
                ["JOB", "STATUS", "CREATED", "TIME", "OPERATOR", "NAME"]
                    .map(String::from)
                    .to_vec(),
            ];
            for job in &jobs {
                let status = job["status"].as_i64().unwrap_or(0) as i32;
                rows.push(vec![
                    job["job_instance_id"].to_string(),
                    job_status_name(status).to_owned(),
                    display::age(job["create_time"].as_i64().unwrap_or(now), now),
                    job["total_time"]
                        .as_i64()
                        .map(|ms| display::seconds(Duration::from_millis(ms.max(0) as u64)))
                        .unwrap_or_else(|| "-".into()),
                    job["operator"].as_str().unwrap_or("").to_owned(),
                    job["name"].as_str().unwrap_or("").to_owned(),
                ]);
            }
            let mut text = display::table(&rows);
            let total = data["total"].as_i64().unwrap_or(0);
            if total > jobs.len() as i64 && !ctx.quiet {
                text.push_str(&format!(
                    "({} of {total} jobs; --limit shows more)\n",
                    jobs.len()
                ));
            }
            print(&text)?;
        }
    }
    Ok(exit::OK)
}

async fn kill(ctx: &Ctx, job: i64, no_wait: bool) -> Result<u8, CliError> {
    let request = ctx
        .client
        .scoped(json!({"job_instance_id": job, "operation_code": 1}))?;
    ctx.client.call("operate_job_instance", request).await?;
    let mut status = None;
    if !no_wait {
        let deadline = Instant::now() + Duration::from_secs(60);
        while Instant::now() < deadline {
            let query = ctx.client.scoped(json!({"job_instance_id": job}))?;
            let data = ctx.client.call("get_job_instance_status", query).await?;
            let now = data["job_instance"]["status"].as_i64().map(|s| s as i32);
            status = now;
            if now.is_some_and(job_finished) {
                break;
            }
            tokio::time::sleep(Duration::from_millis(200)).await;
        }
    }
    match ctx.output {
        Output::Text => {
            let text = match status {
                None => format!("job {job}: termination requested\n"),
                Some(s) if job_finished(s) => format!("job {job} ended: {}\n", job_status_name(s)),
                Some(s) => format!(
                    "job {job}: termination requested, still {}\n",
                    job_status_name(s)
                ),
            };
            print(&text)?;
        }
        _ => print(&format!(
            "{}\n",
            json!({"job_instance_id": job, "status": status, "status_name": status.map(job_status_name)})
        ))?,
    }
    Ok(exit::OK)
}

async fn hosts(ctx: &Ctx, args: &HostsArgs) -> Result<u8, CliError> {
    let data = ctx.client.call("list_hosts", json!({})).await?;
    let hosts: Vec<Value> = data
        .as_array()
        .into_iter()
        .flatten()
        .filter(|h| !args.online || h["online"] == true)
        .filter(|h| !args.offline || h["online"] == false)
        .filter(|h| args.biz.is_none_or(|b| h["bk_biz_id"].as_i64() == Some(b)))
        .cloned()
        .collect();
    match ctx.output {
        Output::Json => print_json(&Value::Array(hosts))?,
        Output::Jsonl => {
            for host in &hosts {
                print(&format!("{host}\n"))?;
            }
        }
        Output::Text => {
            let now = now_ms();
            let mut rows = vec![
                [
                    "HOST",
                    "IP",
                    "CLOUD",
                    "HOSTNAME",
                    "BIZ",
                    "AGENT",
                    "LAST SEEN",
                    "VERSION",
                ]
                .map(String::from)
                .to_vec(),
            ];
            for h in &hosts {
                let online = h["online"] == true;
                // A host the inventory lists without an agent is never online, and that is fine.
                let has_agent = !h["agent_id"].is_null();
                let agent = match (has_agent, online) {
                    (false, _) => ctx.style.paint("0", "none"),
                    (true, true) => ctx.style.paint("32", "online"),
                    (true, false) => ctx.style.paint("31", "offline"),
                };
                rows.push(vec![
                    h["bk_host_id"].to_string(),
                    h["ip"].as_str().unwrap_or("").to_owned(),
                    h["bk_cloud_id"].to_string(),
                    h["hostname"].as_str().unwrap_or("").to_owned(),
                    h["bk_biz_id"]
                        .as_i64()
                        .map(|b| b.to_string())
                        .unwrap_or_else(|| "-".into()),
                    agent,
                    match h["last_seen"].as_i64() {
                        _ if online => "now".into(),
                        Some(seen) => display::age(seen, now),
                        None => "-".into(),
                    },
                    h["agent_version"].as_str().unwrap_or("").to_owned(),
                ]);
            }
            print(&display::table(&rows))?;
        }
    }
    Ok(exit::OK)
}
