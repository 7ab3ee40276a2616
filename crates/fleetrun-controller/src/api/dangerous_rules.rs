//! bk-job's dangerous-rule APIs (`create_dangerous_rule`, `update_dangerous_rule`,
//! `delete_dangerous_rule`, `enable_dangerous_rule`, `disable_dangerous_rule`,
//! `get_dangerous_rule_list`), `check_script`, and the check every script to be run or kept in
//! the library goes through ([`refuse_intercepted`]).
//!
//! Managing the rules is platform administration in bk-job (its "high-risk detect rule"
//! permission, the platform administrators' by default): here, apps granted `admin`.
//! `check_script` is open to every app, as it only reads.

use std::sync::Arc;

use base64::Engine as _;
use fleetrun_store::{DangerousRule, DangerousRuleError, DangerousRuleFields};
use serde::{Deserialize, Serialize};
use serde_json::Value;

use super::{
    ApiError,
    admin::require_admin,
    auth::Caller,
    error::code,
    params::{Params, lenient},
    reply,
};
use crate::{
    Shared,
    dangerous::{self, Finding, Verdict},
    now_ms,
};

/// Longest description, in characters.
const MAX_DESCRIPTION_CHARS: usize = 512;
/// Scripts `check_script` takes, decoded: the largest `fast_execute_script` runs.
const MAX_CHECKED_BYTES: usize = 16 * 1024 * 1024;
/// bk-job's script languages a rule may name: 1 shell, 2 bat, 3 Perl, 4 Python, 5 PowerShell,
/// 6 SQL.
const LANGUAGES: std::ops::RangeInclusive<i64> = 1..=6;

impl From<DangerousRuleError> for ApiError {
    fn from(e: DangerousRuleError) -> Self {
        match e {
            DangerousRuleError::NotFound(id) => ApiError::new(
                code::DANGEROUS_RULE_NOT_FOUND,
                format!("id: no dangerous rule {id}"),
            ),
            DangerousRuleError::Duplicate(_) => ApiError::new(
                code::DANGEROUS_RULE_EXISTS,
                "expression: a rule with this expression for these script languages exists already",
            ),
            DangerousRuleError::Store(e) => e.into(),
        }
    }
}

/// A rule as bk-job's APIs return it.
#[derive(Debug, Serialize)]
struct RuleReply {
    id: i64,
    expression: String,
    script_language_list: Vec<i32>,
    description: String,
    action: i32,
    status: i32,
    creator: String,
    create_time: i64,
    last_modify_user: String,
    last_modify_time: i64,
}

fn rule_reply(rule: DangerousRule) -> RuleReply {
    RuleReply {
        id: rule.id,
        expression: rule.expression,
        script_language_list: rule.script_languages,
        description: rule.description,
        action: rule.action,
        status: rule.status,
        creator: rule.creator,
        create_time: rule.create_time,
        last_modify_user: rule.last_modify_user,
        last_modify_time: rule.last_modify_time,
    }
}

#[derive(Debug, Deserialize)]
struct RuleRequest {
    #[serde(default, deserialize_with = "lenient::opt_int")]
    id: Option<i64>,
    #[serde(default, deserialize_with = "opt_text")]
    expression: Option<String>,
    #[serde(default, deserialize_with = "lenient::opt_int_list")]
    script_language_list: Option<Vec<i64>>,
    #[serde(default, deserialize_with = "opt_text")]
    description: Option<String>,
    #[serde(default, deserialize_with = "lenient::opt_int")]
    action: Option<i64>,
}

fn opt_text<'de, D: serde::Deserializer<'de>>(d: D) -> Result<Option<String>, D::Error> {
    Option::<Value>::deserialize(d)?
        .filter(|v| !v.is_null())
        .map(|v| lenient::text(v).map_err(serde::de::Error::custom))
        .transpose()
}

fn languages(list: Option<Vec<i64>>) -> Result<Vec<i32>, ApiError> {
    let list = list
        .filter(|l| !l.is_empty())
        .ok_or_else(|| ApiError::missing("script_language_list"))?;
    list.iter()
        .map(|&l| {
            if LANGUAGES.contains(&l) {
                Ok(l as i32)
            } else {
                Err(ApiError::new(
                    code::BAD_SCRIPT_LANGUAGE,
                    format!(
                        "script_language_list: {l} is not one of 1 (shell), 2 (bat), 3 (Perl), 4 (Python), 5 (PowerShell), 6 (SQL)"
                    ),
                ))
            }
        })
        .collect()
}

fn action(value: Option<i64>) -> Result<i32, ApiError> {
    match value {
        None => Err(ApiError::missing("action")),
        Some(a) if a == i64::from(dangerous::SCAN) || a == i64::from(dangerous::INTERCEPT) => {
            Ok(a as i32)
        }
        Some(other) => Err(ApiError::invalid(
            "action",
            format!("{other} is not 1 (scan) or 2 (intercept)"),
        )),
    }
}

fn id(value: Option<i64>) -> Result<i64, ApiError> {
    match value {
        None => Err(ApiError::missing("id")),
        Some(id) if id > 0 => Ok(id),
        Some(other) => Err(ApiError::invalid("id", format!("{other} is not a rule id"))),
    }
}

/// The fields of a created or updated rule, checked: the expression compiles within the
/// limits, the languages and action are bk-job's.
fn fields(req: RuleRequest, description_required: bool) -> Result<DangerousRuleFields, ApiError> {
    let expression = req
        .expression
        .filter(|e| !e.is_empty())
        .ok_or_else(|| ApiError::missing("expression"))?;
    dangerous::compile(&expression).map_err(|why| ApiError::invalid("expression", why))?;
    let description = match req.description {
        Some(d) => d,
        None if description_required => return Err(ApiError::missing("description")),
        None => String::new(),
    };
    if description.chars().count() > MAX_DESCRIPTION_CHARS {
        return Err(ApiError::invalid(
            "description",
            format!("longer than {MAX_DESCRIPTION_CHARS} characters"),
        ));
    }
    Ok(DangerousRuleFields {
        expression,
        script_languages: languages(req.script_language_list)?,
        description,
        action: action(req.action)?,
    })
}

pub async fn create_dangerous_rule(
    shared: &Shared,
    caller: &Caller,
    params: &Params,
) -> Result<Value, ApiError> {
    require_admin(caller, "manage dangerous rules")?;
    let fields = fields(params.parse()?, false)?;
    let rules = &shared.dangerous_rules;
    // Counted under the change lock, so concurrent creates cannot pass the cap together.
    let made = rules
        .change(async {
            let count = rules.store().dangerous_rules().await?.len();
            if count >= dangerous::MAX_RULES {
                return Err(ApiError::new(
                    code::BAD_REQUEST,
                    format!(
                        "expression: there are {count} rules, the most kept; delete one before adding another"
                    ),
                ));
            }
            Ok(rules
                .store()
                .create_dangerous_rule(&fields, &caller.username, now_ms())
                .await?)
        })
        .await?;
    tracing::info!(rule = made.id, "dangerous rule created");
    reply::data(rule_reply(made))
}

pub async fn update_dangerous_rule(
    shared: &Shared,
    caller: &Caller,
    params: &Params,
) -> Result<Value, ApiError> {
    require_admin(caller, "manage dangerous rules")?;
    let req: RuleRequest = params.parse()?;
    let id = id(req.id)?;
    let fields = fields(req, true)?;
    let rules = &shared.dangerous_rules;
    let changed = rules
        .change(
            rules
                .store()
                .update_dangerous_rule(id, &fields, &caller.username, now_ms()),
        )
        .await?;
    reply::data(rule_reply(changed))
}

#[derive(Debug, Deserialize)]
struct RuleId {
    #[serde(default, deserialize_with = "lenient::opt_int")]
    id: Option<i64>,
}

pub async fn delete_dangerous_rule(
    shared: &Shared,
    caller: &Caller,
    params: &Params,
) -> Result<Value, ApiError> {
    require_admin(caller, "manage dangerous rules")?;
    let req: RuleId = params.parse()?;
    let id = id(req.id)?;
    let rules = &shared.dangerous_rules;
    rules
        .change(rules.store().delete_dangerous_rule(id))
        .await?;
    Ok(Value::Null)
}

/// `enable_dangerous_rule` and `disable_dangerous_rule`: `{id, status}`.
pub async fn set_dangerous_rule_status(
    shared: &Shared,
    caller: &Caller,
    params: &Params,
    enable: bool,
) -> Result<Value, ApiError> {
    require_admin(caller, "manage dangerous rules")?;
    let req: RuleId = params.parse()?;
    let id = id(req.id)?;
    let status = if enable {
        dangerous::ENABLED
    } else {
        dangerous::DISABLED
    };
    let rules = &shared.dangerous_rules;
    let rule = rules
        .change(
            rules
                .store()
                .set_dangerous_rule_status(id, status, &caller.username, now_ms()),
        )
        .await?;
    Ok(serde_json::json!({ "id": rule.id, "status": rule.status }))
}

#[derive(Debug, Deserialize)]
struct ListRequest {
    #[serde(default, deserialize_with = "opt_text")]
    expression: Option<String>,
    #[serde(default, deserialize_with = "lenient::opt_int_list")]
    script_language_list: Option<Vec<i64>>,
    #[serde(default, deserialize_with = "opt_text")]
    description: Option<String>,
    #[serde(default, deserialize_with = "lenient::opt_int")]
    action: Option<i64>,
}

/// The rules, filtered as bk-job's list: `expression` and `description` by substring, rules of
/// any of `script_language_list`, `action` exactly.
pub async fn get_dangerous_rule_list(
    shared: &Shared,
    caller: &Caller,
    params: &Params,
) -> Result<Value, ApiError> {
    require_admin(caller, "read dangerous rules")?;
    let req: ListRequest = params.parse()?;
    let languages = match req.script_language_list.filter(|l| !l.is_empty()) {
        None => None,
        some => Some(languages(some)?),
    };
    let action = req.action.map(|a| action(Some(a))).transpose()?;
    let rules: Vec<RuleReply> = shared
        .dangerous_rules
        .store()
        .dangerous_rules()
        .await?
        .into_iter()
        .filter(|r| {
            req.expression
                .as_deref()
                .is_none_or(|e| r.expression.contains(e))
                && req
                    .description
                    .as_deref()
                    .is_none_or(|d| r.description.contains(d))
                && languages
                    .as_ref()
                    .is_none_or(|l| r.script_languages.iter().any(|x| l.contains(x)))
                && action.is_none_or(|a| r.action == a)
        })
        .map(rule_reply)
        .collect();
    reply::data(rules)
}

#[derive(Debug, Deserialize)]
struct CheckRequest {
    #[serde(default, deserialize_with = "lenient::opt_int")]
    script_language: Option<i64>,
    content: Option<String>,
}

/// `check_script`: the findings of the enabled rules on a script (bk-job's check items, with
/// the rule's id and action besides).
pub async fn check_script(
    shared: &Shared,
    _caller: &Caller,
    params: &Params,
) -> Result<Value, ApiError> {
    let req: CheckRequest = params.parse()?;
    let language = req
        .script_language
        .ok_or_else(|| ApiError::missing("script_language"))?;
    if !LANGUAGES.contains(&language) {
        return Err(ApiError::new(
            code::BAD_SCRIPT_LANGUAGE,
            format!(
                "script_language: {language} is not one of 1 (shell), 2 (bat), 3 (Perl), 4 (Python), 5 (PowerShell), 6 (SQL)"
            ),
        ));
    }
    let content = req.content.ok_or_else(|| ApiError::missing("content"))?;
    if content.len() > MAX_CHECKED_BYTES / 3 * 4 + 4 {
        return Err(ApiError::invalid(
            "content",
            format!("larger than {MAX_CHECKED_BYTES} bytes decoded"),
        ));
    }
    let script = base64::engine::general_purpose::STANDARD
        .decode(content.trim())
        .map_err(|e| ApiError::invalid("content", format!("not valid base64: {e}")))?;
    let verdict = shared
        .dangerous_rules
        .check(language as i32, Arc::new(script))
        .await;
    if verdict.unfinished {
        return Err(unfinished());
    }
    reply::data(verdict.findings)
}

/// The refusal of a script whose check reached [`dangerous::CHECK_BUDGET`].
fn unfinished() -> ApiError {
    ApiError::new(
        code::DANGEROUS_SCRIPT,
        format!(
            "Dangerous script, cannot be executed: the dangerous-command check did not finish within {} s; shorten the script or the rules",
            dangerous::CHECK_BUDGET.as_secs()
        ),
    )
}

/// Checks a script against the enabled rules before it is run or kept: refuses it with bk-job's
/// `DANGEROUS_SCRIPT_FORBIDDEN_EXECUTION` if an intercepting rule matches, and returns the scan
/// findings otherwise (empty when nothing matched).
pub async fn refuse_intercepted(
    shared: &Shared,
    step: &str,
    language: i32,
    script: Arc<Vec<u8>>,
) -> Result<Vec<Finding>, ApiError> {
    let verdict: Verdict = shared.dangerous_rules.check(language, script).await;
    // A script the rules could not be checked against in time does not run unchecked.
    if verdict.unfinished {
        tracing::warn!("script refused: the dangerous-command check ran out of time");
        return Err(unfinished());
    }
    if verdict.intercepted() {
        tracing::warn!(
            rules = ?verdict
                .findings
                .iter()
                .filter(|f| f.action == dangerous::INTERCEPT)
                .map(|f| f.rule_id)
                .collect::<Vec<_>>(),
            "script refused by a dangerous rule"
        );
        return Err(ApiError::new(
            code::DANGEROUS_SCRIPT,
            format!(
                "Dangerous script, cannot be executed: {}",
                verdict.summary(step)
            ),
        )
        .recorded_as(verdict.recorded()));
    }
    if !verdict.findings.is_empty() {
        tracing::warn!(
            rules = ?verdict.findings.iter().map(|f| f.rule_id).collect::<Vec<_>>(),
            "script matched scanning dangerous rules; it runs"
        );
    }
    Ok(verdict.findings)
}
