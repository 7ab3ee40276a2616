//! `fleetrun push` and `fleetrun cp`: `fast_transfer_file` from the command line. `push`
//! uploads local files first (`generate_local_file_upload_url`, then a PUT each); `cp` names
//! files on hosts. Both watch the job as `run` does: a progress line of hosts, then each host's
//! files with their size and speed.

use std::path::PathBuf;

use clap::Args;
use serde_json::{Value, json};

use crate::{
    args::Output,
    commands::{Ctx, STARTED_JOB, host_ids_of, print, watch},
    error::{CliError, exit},
    request::{self, IpTarget},
    view::JobView,
};

pub const PUSH_EXAMPLES: &str = "\
Examples:
  fleetrun push app.tar.gz --to /opt/app/ --host 1,2,3           as root
  fleetrun push *.conf --to /etc/app/ --topo module:12 --as deploy --limit 50MB
  fleetrun push big.iso --to '/data/[DATE:yyyy-MM-dd]/' --group web --strict

Each file is uploaded to the controller once, then every target pulls it. --limit caps each
target's download (MB/s). Uploaded files land with mode 0644, owned by the --as account.";

pub const CP_EXAMPLES: &str = "\
Examples:
  fleetrun cp 7:/var/log/app.log --to /tmp/logs/[FILESRCIP]/ --host 1
  fleetrun cp 10.0.0.5:/etc/app/ --to /etc/app-copy/ --topo set:3     a directory, whole
  fleetrun cp '1:10.0.0.5:/data/REGEX:part-[0-9]+' --to /data/ --host 2,3 --from-as deploy

A source is HOST:PATH, HOST a host id, an IP or CLOUD:IP. PATH as bk-job reads it: a file, a
directory ending in /, * and ? wildcards or REGEX:<pattern> in the last component. Each source
file is read once, however many targets.";

/// Where the files go, and how.
#[derive(Debug, Args)]
pub struct Destination {
    /// The target directory (bk-job's variables: [FILESRCIP], [DATE:yyyy-MM-dd], ...)
    #[arg(long = "to", value_name = "DIR")]
    pub to: String,
    /// Target hosts by bk_host_id
    #[arg(long = "host", value_name = "ID,...", value_delimiter = ',')]
    pub hosts: Vec<i64>,
    /// Target hosts by IP, in cloud area CLOUD (default 0)
    #[arg(long = "ip", value_name = "[CLOUD:]IP,...", value_delimiter = ',')]
    pub ips: Vec<String>,
    /// Every host below an inventory node, e.g. module:12 (repeatable)
    #[arg(long = "topo", value_name = "TYPE:ID")]
    pub topo: Vec<String>,
    /// Every host of a dynamic group (repeatable)
    #[arg(long = "group", value_name = "ID")]
    pub groups: Vec<String>,
    /// Write the files as this account: an alias, or a number for an account id
    #[arg(long = "as", value_name = "ACCOUNT", default_value = "root")]
    pub account: String,
    /// Each target's download speed limit, e.g. 50MB (MB/s)
    #[arg(long, value_name = "SPEED")]
    pub limit: Option<String>,
    /// Seconds for the whole transfer (controller default 7200)
    #[arg(long, value_name = "SECS")]
    pub timeout: Option<u32>,
    /// Strict mode: a source file that cannot be sent sends nothing
    #[arg(long)]
    pub strict: bool,
    /// Print the job id and return at once instead of watching the job
    #[arg(long, short)]
    pub detach: bool,
}

#[derive(Debug, Args)]
pub struct PushArgs {
    /// Local files to send
    #[arg(required = true, value_name = "LOCAL")]
    pub files: Vec<PathBuf>,
    #[command(flatten)]
    pub destination: Destination,
}

#[derive(Debug, Args)]
pub struct CpArgs {
    /// Files on hosts: HOST:PATH
    #[arg(required = true, value_name = "HOST:PATH")]
    pub sources: Vec<String>,
    #[command(flatten)]
    pub destination: Destination,
    /// Read the sources as this account
    #[arg(long = "from-as", value_name = "ACCOUNT", default_value = "root")]
    pub from_account: String,
    /// Each source's upload speed limit, e.g. 20MB (MB/s)
    #[arg(long, value_name = "SPEED")]
    pub source_limit: Option<String>,
}

/// `50MB`, `50M`, `50`: megabytes a second.
pub fn parse_speed(text: &str) -> Result<u64, CliError> {
    let digits = text
        .trim()
        .trim_end_matches(['B', 'b'])
        .trim_end_matches(['M', 'm']);
    digits
        .trim()
        .parse::<u64>()
        .ok()
        .filter(|n| *n > 0)
        .ok_or_else(|| {
            CliError::usage(format!(
                "--limit {text:?} is not a speed in MB/s, e.g. 50MB"
            ))
        })
}

/// `HOST:PATH` as (host, path).
pub fn parse_source(text: &str) -> Result<(SourceHost, String), CliError> {
    let bad = || {
        CliError::usage(format!(
            "{text:?} is not HOST:PATH (HOST an id, IP or CLOUD:IP; PATH absolute)"
        ))
    };
    let at = text.find(":/").ok_or_else(bad)?;
    let (host, path) = (&text[..at], &text[at + 1..]);
    let host = match host.parse::<i64>() {
        Ok(id) => SourceHost::Id(id),
        Err(_) => SourceHost::Ip(request::parse_ip(host).map_err(|_| bad())?),
    };
    Ok((host, path.to_owned()))
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub enum SourceHost {
    Id(i64),
    Ip(IpTarget),
}

fn account_field(account: &str) -> Value {
    match account.parse::<i64>() {
        Ok(id) => json!({"id": id}),
        Err(_) => json!({"alias": account}),
    }
}

/// The request's common part: target, account, limits.
async fn base_request(ctx: &Ctx, dest: &Destination) -> Result<Value, CliError> {
    let ips = dest
        .ips
        .iter()
        .map(|ip| request::parse_ip(ip))
        .collect::<Result<Vec<_>, _>>()?;
    let mut host_ids = dest.hosts.clone();
    let mut ip_list = ips.as_slice();
    if !host_ids.is_empty() && !ips.is_empty() {
        host_ids.extend(host_ids_of(&ctx.client, &ips).await?);
        ip_list = &[];
    }
    if host_ids.is_empty() && ip_list.is_empty() && dest.topo.is_empty() && dest.groups.is_empty() {
        return Err(CliError::usage(
            "name the target hosts: --host, --ip, --topo or --group",
        ));
    }
    let mut target = json!({});
    if !host_ids.is_empty() {
        target["host_id_list"] = json!(host_ids);
    } else if !ip_list.is_empty() {
        target["ip_list"] = ip_list
            .iter()
            .map(|t| json!({"bk_cloud_id": t.bk_cloud_id, "ip": t.ip}))
            .collect();
    }
    if !dest.topo.is_empty() {
        target["topo_node_list"] = dest
            .topo
            .iter()
            .map(|t| request::parse_topo(t))
            .collect::<Result<Vec<_>, _>>()?
            .into();
    }
    if !dest.groups.is_empty() {
        target["dynamic_group_list"] = dest.groups.iter().map(|g| json!({"id": g})).collect();
    }
    let mut request = json!({
        "file_target_path": dest.to,
        "target_server": target,
        "transfer_mode": if dest.strict { 1 } else { 2 },
    });
    match dest.account.parse::<i64>() {
        Ok(id) => request["account_id"] = json!(id),
        Err(_) => request["account_alias"] = json!(dest.account),
    }
    if let Some(limit) = &dest.limit {
        request["download_speed_limit"] = json!(parse_speed(limit)?);
    }
    if let Some(timeout) = dest.timeout {
        request["timeout"] = json!(timeout);
    }
    ctx.client.scoped(request)
}

pub async fn push(ctx: &Ctx, args: &PushArgs) -> Result<u8, CliError> {
    let mut names = Vec::with_capacity(args.files.len());
    for file in &args.files {
        let meta = std::fs::metadata(file)
            .map_err(|e| CliError::usage(format!("cannot read {}: {e}", file.display())))?;
        if !meta.is_file() {
            return Err(CliError::usage(format!(
                "{} is not a regular file",
                file.display()
            )));
        }
        let name = file
            .file_name()
            .and_then(|n| n.to_str())
            .ok_or_else(|| CliError::usage(format!("{} has no usable name", file.display())))?;
        if names.contains(&name) {
            return Err(CliError::usage(format!("two files are named {name}")));
        }
        names.push(name);
    }
    let mut request = base_request(ctx, &args.destination).await?;
    let urls = ctx
        .client
        .call(
            "generate_local_file_upload_url",
            ctx.client.scoped(json!({ "file_name_list": names }))?,
        )
        .await?;
    let mut paths = Vec::with_capacity(names.len());
    for (file, name) in args.files.iter().zip(&names) {
        let entry = &urls["url_map"][*name];
        let url = entry["upload_url"].as_str().unwrap_or_default();
        // The upload's own path on the controller this command talks to.
        let id = url.rsplit('/').next().unwrap_or_default();
        let content = tokio::fs::File::open(file)
            .await
            .map_err(|e| CliError::usage(format!("cannot read {}: {e}", file.display())))?;
        let body = reqwest::Body::wrap_stream(tokio_util::io::ReaderStream::new(content));
        let uploaded = ctx
            .client
            .put(&format!("/fleetrun/v1/local_file_upload/{id}"), body)
            .await?;
        if !ctx.quiet && ctx.output == Output::Text {
            eprintln!(
                "uploaded {} ({} bytes)",
                file.display(),
                uploaded["size"].as_u64().unwrap_or_default()
            );
        }
        paths.push(entry["path"].clone());
    }
    request["file_source_list"] = json!([{ "file_type": 2, "file_list": paths }]);
    submit(ctx, request, args.destination.detach).await
}

pub async fn cp(ctx: &Ctx, args: &CpArgs) -> Result<u8, CliError> {
    let mut request = base_request(ctx, &args.destination).await?;
    // One source entry per host, with its paths, in the order given.
    let mut by_host: Vec<(SourceHost, Vec<String>)> = Vec::new();
    for text in &args.sources {
        let (host, path) = parse_source(text)?;
        match by_host.iter_mut().find(|(h, _)| *h == host) {
            Some((_, paths)) => paths.push(path),
            None => by_host.push((host, vec![path])),
        }
    }
    let sources: Vec<Value> = by_host
        .into_iter()
        .map(|(host, paths)| {
            let server = match host {
                SourceHost::Id(id) => json!({"host_id_list": [id]}),
                SourceHost::Ip(ip) => {
                    json!({"ip_list": [{"bk_cloud_id": ip.bk_cloud_id, "ip": ip.ip}]})
                }
            };
            json!({
                "file_type": 1,
                "file_list": paths,
                "account": account_field(&args.from_account),
                "server": server,
            })
        })
        .collect();
    request["file_source_list"] = json!(sources);
    if let Some(limit) = &args.source_limit {
        request["upload_speed_limit"] = json!(parse_speed(limit)?);
    }
    submit(ctx, request, args.destination.detach).await
}

async fn submit(ctx: &Ctx, request: Value, detach: bool) -> Result<u8, CliError> {
    let accepted = ctx.client.call("fast_transfer_file", request).await?;
    let job = accepted["job_instance_id"].as_i64().unwrap_or_default();
    STARTED_JOB.store(job, std::sync::atomic::Ordering::Relaxed);
    if detach {
        return match ctx.output {
            Output::Text => print(&format!("{job}\n")),
            _ => print(&format!("{accepted}\n")),
        }
        .map(|()| exit::OK);
    }
    let mut view = JobView::new(job, ctx.output == Output::Json);
    view.step_instance_id = accepted["step_instance_id"].as_i64();
    view.name = accepted["job_instance_name"].as_str().map(str::to_owned);
    let code = watch(ctx, &mut view, &[], true).await?;
    if ctx.output == Output::Text && !ctx.quiet {
        print_files(ctx, job, view.step_instance_id.unwrap_or_default()).await?;
    }
    Ok(code)
}

/// Each host's files: where they landed, size, speed, or why not.
async fn print_files(ctx: &Ctx, job: i64, step: i64) -> Result<(), CliError> {
    let status = ctx
        .client
        .call(
            "get_job_instance_status",
            ctx.client
                .scoped(json!({"job_instance_id": job, "return_ip_result": true}))?,
        )
        .await?;
    let hosts: Vec<i64> = status["step_instance_list"][0]["step_ip_result_list"]
        .as_array()
        .into_iter()
        .flatten()
        .filter_map(|r| r["bk_host_id"].as_i64())
        .collect();
    if hosts.is_empty() {
        return Ok(());
    }
    let logs = ctx
        .client
        .call(
            "batch_get_job_instance_ip_log",
            ctx.client.scoped(json!({
                "job_instance_id": job,
                "step_instance_id": step,
                "host_id_list": hosts,
            }))?,
        )
        .await?;
    let mut text = String::new();
    for task in logs["file_task_logs"].as_array().into_iter().flatten() {
        for log in task["file_logs"].as_array().into_iter().flatten() {
            if log["mode"] != 1 {
                continue;
            }
            let ok = log["status"] == 4;
            let detail = log["log_content"]
                .as_str()
                .and_then(|l| l.split(" Detail: ").nth(1))
                .unwrap_or_default();
            text.push_str(&format!(
                "{} {} {} {} {}{}\n",
                task["ip"].as_str().unwrap_or_default(),
                if ok { "ok" } else { "FAILED" },
                log["dest_path"]
                    .as_str()
                    .filter(|p| !p.is_empty())
                    .unwrap_or(log["src_path"].as_str().unwrap_or_default()),
                log["size"].as_str().unwrap_or_default(),
                log["speed"].as_str().unwrap_or_default(),
                if ok {
                    String::new()
                } else {
                    format!(": {detail}")
                },
            ));
        }
    }
    print(&text)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn sources_and_speeds() {
        assert_eq!(
            parse_source("7:/var/log/a").unwrap(),
            (SourceHost::Id(7), "/var/log/a".into())
        );
        assert_eq!(
            parse_source("10.0.0.5:/etc/").unwrap(),
            (
                SourceHost::Ip(IpTarget {
                    bk_cloud_id: 0,
                    ip: "10.0.0.5".into()
                }),
                "/etc/".into()
            )
        );
        assert_eq!(
            parse_source("2:10.0.0.5:/x").unwrap().0,
            SourceHost::Ip(IpTarget {
                bk_cloud_id: 2,
                ip: "10.0.0.5".into()
            })
        );
        assert!(parse_source("nohost").is_err());
        assert!(parse_source("bad:/x").is_err());
        assert_eq!(parse_speed("50MB").unwrap(), 50);
        assert_eq!(parse_speed("7").unwrap(), 7);
        assert!(parse_speed("0").is_err());
        assert!(parse_speed("fast").is_err());
    }
}
