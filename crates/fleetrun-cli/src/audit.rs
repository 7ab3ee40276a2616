//! `fleetrun audit`: the controller's audit trail read with filters (`get_audit_log`), and
//! `fleetrun audit verify`: its hash chain checked (`verify_audit_log`), exiting 1 when broken.

use clap::{Args, Subcommand};
use serde_json::{Value, json};

use crate::{
    args::Output,
    commands::{Ctx, now_ms, print, print_json},
    display,
    error::{CliError, exit},
    library::text_of,
};

/// `fleetrun audit`.
#[derive(Debug, Args)]
#[command(after_help = "\
Examples:
  fleetrun audit                               the latest 100 changes
  fleetrun audit --api fast_execute_script --operator alice
  fleetrun audit --refused --since 1d          refused changes of the last day
  fleetrun audit --after 500 -o json           entries after number 500, as JSON
  fleetrun audit verify                        check the hash chain (exit 1 if broken)

Needs an app granted admin.")]
pub struct AuditArgs {
    #[command(subcommand)]
    pub command: Option<AuditCommand>,
    /// Only this app's calls
    #[arg(long, value_name = "CODE")]
    pub app: Option<String>,
    /// Only this operator's calls
    #[arg(long, value_name = "NAME")]
    pub operator: Option<String>,
    /// Only calls of this API
    #[arg(long, value_name = "NAME")]
    pub api: Option<String>,
    /// Only refused calls
    #[arg(long, conflicts_with = "ok")]
    pub refused: bool,
    /// Only successful calls
    #[arg(long)]
    pub ok: bool,
    /// Only entries numbered after this
    #[arg(long, value_name = "SEQ")]
    pub after: Option<i64>,
    /// Only entries this recent: 30m, 12h, 7d, 1h30m; a bare number is hours
    #[arg(long, value_name = "AGE")]
    pub since: Option<String>,
    /// At most this many entries (1 to 1000)
    #[arg(long, default_value_t = 100)]
    pub limit: i64,
}

#[derive(Debug, Subcommand)]
pub enum AuditCommand {
    /// Check the hash chain: every entry unedited, none missing
    Verify,
}

pub async fn run(ctx: &Ctx, args: &AuditArgs) -> Result<u8, CliError> {
    if let Some(AuditCommand::Verify) = args.command {
        return verify(ctx).await;
    }
    let mut body = json!({ "limit": args.limit });
    for (key, value) in [
        ("app_code", &args.app),
        ("operator", &args.operator),
        ("api", &args.api),
    ] {
        if let Some(value) = value {
            body[key] = json!(value);
        }
    }
    if args.refused {
        body["outcome"] = json!("refused");
    } else if args.ok {
        body["outcome"] = json!("ok");
    }
    if let Some(after) = args.after {
        body["after_seq"] = json!(after);
    }
    if let Some(since) = &args.since {
        body["start_time"] = json!(now_ms() - crate::age::age_ms("--since", since)?);
    }
    let data = ctx.client.call("get_audit_log", body).await?;
    if ctx.output != Output::Text {
        print_json(&data)?;
        return Ok(exit::OK);
    }
    let entries = data["entries"].as_array().cloned().unwrap_or_default();
    if entries.is_empty() {
        if !ctx.quiet {
            print("no audit entries match\n")?;
        }
        return Ok(exit::OK);
    }
    let now = now_ms();
    let mut rows = vec![
        ["SEQ", "WHEN", "APP", "OPERATOR", "SOURCE", "API", "OUTCOME"]
            .map(String::from)
            .to_vec(),
    ];
    for e in &entries {
        let outcome = match e["code"].as_i64() {
            Some(0) => "ok".to_owned(),
            Some(code) => format!("{code} {}", text_of(e, "outcome")),
            None => "?".to_owned(),
        };
        rows.push(vec![
            e["seq"].to_string(),
            display::age(e["time"].as_i64().unwrap_or(now), now),
            text_of(e, "bk_app_code").to_owned(),
            text_of(e, "operator").to_owned(),
            text_of(e, "source").to_owned(),
            text_of(e, "api").to_owned(),
            outcome,
        ]);
    }
    print(&display::table(&rows))?;
    Ok(exit::OK)
}

async fn verify(ctx: &Ctx) -> Result<u8, CliError> {
    let report = ctx.client.call("verify_audit_log", json!({})).await?;
    let intact = report["intact"] == Value::Bool(true);
    if ctx.output != Output::Text {
        print_json(&report)?;
    } else if intact {
        print(&format!(
            "audit log intact: {} entries, last {} (sha256 {})\n",
            report["entries"],
            report["last_seq"],
            text_of(&report, "last_hash")
        ))?;
    } else {
        let mut text = format!("audit log BROKEN ({} entries read):\n", report["entries"]);
        for problem in report["problems"].as_array().into_iter().flatten() {
            text.push_str(&format!("  {}\n", problem.as_str().unwrap_or("?")));
        }
        print(&text)?;
    }
    Ok(if intact { exit::OK } else { exit::HOSTS_FAILED })
}
