//! `fleetrun rules`: the controller's dangerous-command rules (bk-job's dangerous-rule APIs),
//! and `fleetrun check-script FILE`: what the enabled rules find in a script (`check_script`),
//! exiting 1 when an intercepting rule matches, so it can gate a commit or a pipeline.

use std::path::PathBuf;

use base64::Engine as _;
use clap::{Args, Subcommand, ValueEnum};
use fleetrun_api::ScriptLanguage;
use serde_json::{Value, json};

use crate::{
    args::{Lang, Output},
    commands::{Ctx, print, print_json, read_script},
    display,
    error::{CliError, exit},
    library::text_of,
    request::language_of,
};

/// `fleetrun rules --help`'s closing text.
pub const RULES_HELP: &str = "\
Examples:
  fleetrun rules list                          every rule, enabled or not
  fleetrun rules create --expression 'shutdown\\s+-h' --lang shell,python --action intercept \\
      --description 'halts the host'
  fleetrun rules enable 5                      new rules start disabled
  fleetrun check-script deploy.sh              what the enabled rules find (exit 1 if refused)

Managing rules needs an app granted admin; check-script any app.";

/// What a rule does when it matches.
#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
pub enum Action {
    /// Report the match; the script runs
    Scan,
    /// Refuse the script
    Intercept,
}

impl Action {
    fn code(self) -> i64 {
        match self {
            Self::Scan => 1,
            Self::Intercept => 2,
        }
    }

    fn name_of(code: i64) -> &'static str {
        match code {
            1 => "scan",
            2 => "intercept",
            _ => "unknown",
        }
    }
}

/// The fields of a rule.
#[derive(Debug, Args)]
pub struct RuleFields {
    /// The regular expression (Rust `regex` syntax), matched against each line
    #[arg(long, value_name = "REGEX", allow_hyphen_values = true)]
    pub expression: String,
    /// The script languages it applies to
    #[arg(
        long = "lang",
        value_enum,
        value_name = "LANG",
        value_delimiter = ',',
        required = true
    )]
    pub languages: Vec<Lang>,
    /// What it does on a match
    #[arg(long, value_enum)]
    pub action: Action,
    /// Why the match is dangerous, shown with it
    #[arg(long, value_name = "TEXT", default_value = "")]
    pub description: String,
}

#[derive(Debug, Subcommand)]
pub enum RulesCommand {
    /// List the rules
    List {
        /// Only rules for this language
        #[arg(long, value_enum, value_name = "LANG")]
        lang: Option<Lang>,
        /// Only rules with this action
        #[arg(long, value_enum)]
        action: Option<Action>,
    },
    /// Add a rule; it starts disabled (`fleetrun rules enable ID`)
    Create(RuleFields),
    /// Replace a rule's expression, languages, action and description; its state stays
    Update {
        /// The rule's id
        id: i64,
        #[command(flatten)]
        fields: RuleFields,
    },
    /// Remove a rule
    Delete {
        /// The rule's id
        id: i64,
    },
    /// Start checking scripts against a rule
    Enable {
        /// The rule's id
        id: i64,
    },
    /// Stop checking scripts against a rule (it is kept)
    Disable {
        /// The rule's id
        id: i64,
    },
}

/// `fleetrun check-script`.
#[derive(Debug, Args)]
pub struct CheckScriptArgs {
    /// The script file, or - for standard input
    pub file: PathBuf,
    /// The script's language, when the file name does not tell
    #[arg(long, value_enum, value_name = "LANG")]
    pub lang: Option<Lang>,
}

fn fields_body(fields: &RuleFields) -> Value {
    json!({
        "expression": fields.expression,
        "script_language_list": fields.languages.iter().map(|l| l.code()).collect::<Vec<_>>(),
        "action": fields.action.code(),
        "description": fields.description,
    })
}

fn languages_text(rule: &Value) -> String {
    rule["script_language_list"]
        .as_array()
        .into_iter()
        .flatten()
        .map(|l| match l.as_i64() {
            Some(code) if code == i64::from(ScriptLanguage::Sql.code()) => "sql",
            Some(code) => Lang::name_of(code),
            None => "?",
        })
        .collect::<Vec<_>>()
        .join(",")
}

fn rule_line(rule: &Value) -> String {
    format!(
        "rule {} ({}, {}, {}): {}\n",
        rule["id"],
        if rule["status"] == json!(1) {
            "enabled"
        } else {
            "disabled"
        },
        Action::name_of(rule["action"].as_i64().unwrap_or(0)),
        languages_text(rule),
        text_of(rule, "expression")
    )
}

pub async fn rules(ctx: &Ctx, command: &RulesCommand) -> Result<u8, CliError> {
    let (api, body) = match command {
        RulesCommand::List { lang, action } => {
            let mut body = json!({});
            if let Some(lang) = lang {
                body["script_language_list"] = json!([lang.code()]);
            }
            if let Some(action) = action {
                body["action"] = json!(action.code());
            }
            return list(ctx, body).await;
        }
        RulesCommand::Create(fields) => ("create_dangerous_rule", fields_body(fields)),
        RulesCommand::Update { id, fields } => {
            let mut body = fields_body(fields);
            body["id"] = json!(id);
            ("update_dangerous_rule", body)
        }
        RulesCommand::Delete { id } => ("delete_dangerous_rule", json!({ "id": id })),
        RulesCommand::Enable { id } => ("enable_dangerous_rule", json!({ "id": id })),
        RulesCommand::Disable { id } => ("disable_dangerous_rule", json!({ "id": id })),
    };
    let data = ctx.client.call(api, body).await?;
    if ctx.output != Output::Text {
        print_json(&data)?;
    } else if !ctx.quiet {
        match command {
            RulesCommand::Delete { id } => print(&format!("rule {id} deleted\n"))?,
            RulesCommand::Enable { id } | RulesCommand::Disable { id } => print(&format!(
                "rule {id} {}\n",
                if data["status"] == json!(1) {
                    "enabled"
                } else {
                    "disabled"
                }
            ))?,
            _ => print(&rule_line(&data))?,
        }
    }
    Ok(exit::OK)
}

async fn list(ctx: &Ctx, body: Value) -> Result<u8, CliError> {
    let data = ctx.client.call("get_dangerous_rule_list", body).await?;
    if ctx.output != Output::Text {
        print_json(&data)?;
        return Ok(exit::OK);
    }
    let rules = data.as_array().cloned().unwrap_or_default();
    if rules.is_empty() {
        if !ctx.quiet {
            print("no dangerous rules match\n")?;
        }
        return Ok(exit::OK);
    }
    let mut rows = vec![
        [
            "ID",
            "STATE",
            "ACTION",
            "LANGUAGES",
            "EXPRESSION",
            "DESCRIPTION",
        ]
        .map(String::from)
        .to_vec(),
    ];
    for rule in &rules {
        rows.push(vec![
            rule["id"].to_string(),
            if rule["status"] == json!(1) {
                "enabled"
            } else {
                "disabled"
            }
            .to_owned(),
            Action::name_of(rule["action"].as_i64().unwrap_or(0)).to_owned(),
            languages_text(rule),
            text_of(rule, "expression").to_owned(),
            text_of(rule, "description").to_owned(),
        ]);
    }
    print(&display::table(&rows))?;
    Ok(exit::OK)
}

/// Checks a script; exit 1 when an intercepting rule matched (the controller would refuse it).
pub async fn check_script(ctx: &Ctx, args: &CheckScriptArgs) -> Result<u8, CliError> {
    let content = read_script(&args.file)
        .map_err(|e| CliError::usage(format!("{}: {e}", args.file.display())))?;
    let lang = args
        .lang
        .or_else(|| language_of(&args.file, &content))
        .ok_or_else(|| {
            CliError::usage(format!(
                "{}: cannot tell the script's language; give --lang",
                args.file.display()
            ))
        })?;
    let findings = ctx
        .client
        .call(
            "check_script",
            json!({
                "script_language": lang.code(),
                "content": base64::engine::general_purpose::STANDARD.encode(&content),
            }),
        )
        .await?;
    let findings = findings.as_array().cloned().unwrap_or_default();
    let intercepted = findings.iter().any(|f| f["action"] == json!(2));
    if ctx.output != Output::Text {
        print_json(&Value::Array(findings))?;
    } else if findings.is_empty() {
        if !ctx.quiet {
            print("no dangerous rule matches\n")?;
        }
    } else {
        let mut text = String::new();
        for f in &findings {
            text.push_str(&format!(
                "{}:{}: {} (rule {}, {}): {}\n    {}\n",
                args.file.display(),
                f["line"],
                if f["action"] == json!(2) {
                    "refused"
                } else {
                    "reported"
                },
                f["rule_id"],
                text_of(f, "description"),
                text_of(f, "match_content"),
                text_of(f, "line_content"),
            ));
        }
        print(&text)?;
    }
    Ok(if intercepted {
        exit::HOSTS_FAILED
    } else {
        exit::OK
    })
}
