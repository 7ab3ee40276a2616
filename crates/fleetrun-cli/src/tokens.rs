//! `fleetrun tokens create|list|revoke`: join tokens that let hosts enroll
//! (`create_join_token`, `list_join_tokens`, `revoke_join_token`).

use clap::Subcommand;
use serde_json::{Value, json};

use crate::{
    age,
    args::Output,
    commands::{Ctx, now_ms, print, print_json},
    display,
    error::{CliError, exit},
    library::text_of,
};

/// `fleetrun tokens`.
#[derive(Debug, Subcommand)]
pub enum TokensCommand {
    /// Make a token that places the hosts enrolling with it; prints it once, with the
    /// one-line install command
    Create {
        /// The business the hosts land in
        #[arg(long, value_name = "ID")]
        biz: i64,
        /// The module the hosts land in (one of the business's)
        #[arg(long, value_name = "ID")]
        module: Option<i64>,
        /// How long the token may be used: 90s, 30m, 1h, 7d, 1w, 1h30m; a bare number is hours
        #[arg(long, value_name = "AGE", default_value = "1h")]
        ttl: String,
        /// How many hosts may enroll with it
        #[arg(long, value_name = "N", default_value_t = 1)]
        uses: i64,
        /// The cloud area the hosts are in
        #[arg(long, value_name = "ID", default_value_t = 0)]
        cloud: i64,
        /// What the token is for, for the list
        #[arg(long, value_name = "TEXT")]
        description: Option<String>,
    },
    /// List the tokens, newest first, with their state (active, expired, used_up, revoked)
    List,
    /// Refuse every enrollment with a token from now on
    Revoke {
        /// The token's id (the 12 hex digits after frt-), or the whole token
        token_id: String,
    },
}

pub async fn run(ctx: &Ctx, command: &TokensCommand) -> Result<u8, CliError> {
    match command {
        TokensCommand::Create {
            biz,
            module,
            ttl,
            uses,
            cloud,
            description,
        } => {
            let mut body = json!({
                "bk_biz_id": biz,
                "bk_cloud_id": cloud,
                "ttl_secs": age::age_secs("--ttl", ttl)?,
                "max_uses": uses,
            });
            if let Some(module) = module {
                body["bk_module_id"] = json!(module);
            }
            if let Some(description) = description {
                body["description"] = json!(description);
            }
            let made = ctx.client.call("create_join_token", body).await?;
            if ctx.output != Output::Text {
                print_json(&made)?;
                return Ok(exit::OK);
            }
            let indent = |command: &str| command.replace('\n', "\n  ");
            let install = match made["install_command"].as_str() {
                Some(command) => format!("Install and enroll on a host:\n  {}", indent(command)),
                None => "No install command: the API is not served over HTTPS (set [enroll] \
                         api_url to its https:// URL)"
                    .to_owned(),
            };
            print(&format!(
                "token {} (shown once: it is kept only as a digest)\n  {}\n\n\
                 {} use(s), expires {}; hosts land in business {}{}, cloud area {}\n\
                 CA pin: {}\n\n{}\n\n\
                 Where fleetrun-agent is installed:\n  {}\n",
                text_of(&made, "token_id"),
                text_of(&made, "token"),
                made["max_uses"],
                expires_in(made["expires_at"].as_i64().unwrap_or(0), now_ms()),
                made["bk_biz_id"],
                made["bk_module_id"]
                    .as_i64()
                    .map(|m| format!(" module {m}"))
                    .unwrap_or_default(),
                made["bk_cloud_id"],
                text_of(&made, "ca_pin"),
                install,
                indent(text_of(&made, "enroll_command")),
            ))?;
            Ok(exit::OK)
        }
        TokensCommand::List => {
            let tokens = ctx.client.call("list_join_tokens", json!({})).await?;
            if ctx.output != Output::Text {
                print_json(&tokens)?;
                return Ok(exit::OK);
            }
            let now = now_ms();
            let mut text = String::new();
            for t in tokens.as_array().into_iter().flatten() {
                text.push_str(&line(t, now));
                text.push('\n');
            }
            if text.is_empty() {
                text.push_str("no join tokens\n");
            }
            print(&text)?;
            Ok(exit::OK)
        }
        TokensCommand::Revoke { token_id } => {
            let token = ctx
                .client
                .call("revoke_join_token", json!({ "token_id": token_id }))
                .await?;
            if ctx.output != Output::Text {
                print_json(&token)?;
                return Ok(exit::OK);
            }
            print(&format!("revoked: {}\n", line(&token, now_ms())))?;
            Ok(exit::OK)
        }
    }
}

/// When a time ahead comes, in words.
fn expires_in(ms: i64, now: i64) -> String {
    let s = ((ms - now).max(0) / 1000) as u64;
    match s {
        0..60 => format!("in {s}s"),
        60..3600 => format!("in {}m", s / 60),
        3600..86400 => format!("in {}h", s / 3600),
        _ => format!("in {}d", s / 86400),
    }
}

/// One token on one line.
fn line(t: &Value, now: i64) -> String {
    let placement = match t["bk_module_id"].as_i64() {
        Some(m) => format!("biz {} module {m}", t["bk_biz_id"]),
        None => format!("biz {}", t["bk_biz_id"]),
    };
    let mut line = format!(
        "{}  {:<8} {}  cloud {}  {}/{} used  by {} {}",
        text_of(t, "token_id"),
        text_of(t, "state"),
        placement,
        t["bk_cloud_id"],
        t["uses"],
        t["max_uses"],
        text_of(t, "created_by"),
        display::age(t["created_at"].as_i64().unwrap_or(now), now),
    );
    if let Some(description) = t["description"].as_str().filter(|d| !d.is_empty()) {
        line.push_str(&format!("  {description}"));
    }
    line
}
