//! `fast_execute_script`.

use std::sync::Arc;

use base64::Engine as _;
use fleetrun_api::ScriptLanguage;
use serde::Deserialize;
use serde_json::Value;

use super::{
    ApiError,
    auth::Caller,
    dangerous_rules,
    error::code,
    params::{Params, lenient},
    reply, scope, scripts,
};
use crate::{
    Shared,
    engine::{JobSpec, TaskTemplate, Work},
    now_ms,
    status::{host, job},
};

const MAX_SCRIPT_BYTES: usize = 16 * 1024 * 1024;
const MAX_PARAM_BYTES: usize = 65_535;
const MAX_SENSITIVE_PARAM_BYTES: usize = 48_128;

#[derive(Debug, Deserialize)]
struct Request {
    #[serde(default, deserialize_with = "lenient::opt_int")]
    script_version_id: Option<i64>,
    #[serde(default, deserialize_with = "opt_text")]
    script_id: Option<String>,
    script_content: Option<String>,
    task_name: Option<String>,
    script_param: Option<String>,
    #[serde(default, deserialize_with = "lenient::opt_int")]
    timeout: Option<i64>,
    account_alias: Option<String>,
    #[serde(default, deserialize_with = "lenient::opt_int")]
    account_id: Option<i64>,
    #[serde(default, deserialize_with = "lenient::opt_int")]
    is_param_sensitive: Option<i64>,
    #[serde(default, deserialize_with = "lenient::opt_int")]
    script_language: Option<i64>,
    target_server: Option<TargetServer>,
    callback_url: Option<String>,
    #[serde(default, deserialize_with = "lenient::opt_bool")]
    start_task: Option<bool>,
    windows_interpreter: Option<String>,
    host_password_list: Option<Value>,
    rolling_config: Option<Value>,
}

#[derive(Debug, Deserialize, Default)]
pub(super) struct TargetServer {
    #[serde(default, deserialize_with = "lenient::opt_int_list")]
    pub(super) host_id_list: Option<Vec<i64>>,
    pub(super) ip_list: Option<Vec<IpTarget>>,
    pub(super) dynamic_group_list: Option<Vec<GroupTarget>>,
    pub(super) topo_node_list: Option<Vec<TopoTarget>>,
}

#[derive(Debug, Deserialize)]
pub(super) struct GroupTarget {
    #[serde(deserialize_with = "lenient::text")]
    pub(super) id: String,
}

#[derive(Debug, Deserialize)]
pub(super) struct TopoTarget {
    #[serde(deserialize_with = "lenient::int")]
    pub(super) id: i64,
    pub(super) node_type: String,
}

#[derive(Debug, Deserialize)]
pub(super) struct IpTarget {
    #[serde(deserialize_with = "lenient::int")]
    pub(super) bk_cloud_id: i64,
    pub(super) ip: String,
}

fn opt_text<'de, D: serde::Deserializer<'de>>(d: D) -> Result<Option<String>, D::Error> {
    Option::<Value>::deserialize(d)?
        .filter(|v| !v.is_null())
        .map(|v| lenient::text(v).map_err(serde::de::Error::custom))
        .transpose()
}

fn decode_base64(field: &str, text: &str) -> Result<Vec<u8>, ApiError> {
    base64::engine::general_purpose::STANDARD
        .decode(text.trim())
        .map_err(|e| ApiError::invalid(field, format!("not valid base64: {e}")))
}

/// Refuses new work while the database refuses writes: a job accepted then could not be kept.
pub(super) fn refuse_while_unwritable(shared: &Shared) -> Result<(), ApiError> {
    match shared.store.health().write_error {
        None => Ok(()),
        Some(error) => Err(ApiError::new(
            code::DATABASE_UNWRITABLE,
            format!(
                "the controller cannot write to its database: {error}; no job is accepted until it can"
            ),
        )),
    }
}

pub async fn fast_execute_script(
    shared: &Shared,
    caller: &Caller,
    params: &Params,
) -> Result<Value, ApiError> {
    let req: Request = params.parse()?;

    let scope = scope::resolve(shared, caller, params)?;
    refuse_while_unwritable(shared)?;

    // Script: script_version_id > script_id (its online version) > script_content.
    let (script, language) = match scripts::runnable_version(
        shared,
        &scope,
        req.script_version_id,
        req.script_id.as_deref(),
    )
    .await?
    {
        Some(version) => (version.content, i64::from(version.script_language)),
        None => {
            let content = req
                .script_content
                .as_deref()
                .ok_or_else(|| ApiError::missing("script_content"))?;
            let script = decode_base64("script_content", content)?;
            if script.is_empty() {
                return Err(ApiError::invalid(
                    "script_content",
                    "decodes to an empty script",
                ));
            }
            if script.len() > MAX_SCRIPT_BYTES {
                return Err(ApiError::invalid(
                    "script_content",
                    format!("larger than {MAX_SCRIPT_BYTES} bytes decoded"),
                ));
            }
            let language = req
                .script_language
                .ok_or_else(|| ApiError::missing("script_language"))?;
            let runs = i32::try_from(language)
                .is_ok_and(|code| ScriptLanguage::from_code(code).runs_on_hosts());
            if !runs {
                return Err(ApiError::new(
                    code::BAD_SCRIPT_LANGUAGE,
                    format!(
                        "script_language: {language} is not one of 1 (shell), 2 (bat), 3 (Perl), 4 (Python), 5 (PowerShell)"
                    ),
                ));
            }
            (script, language)
        }
    };

    // Parameters and limits.
    let sensitive = match req.is_param_sensitive.unwrap_or(0) {
        0 => false,
        1 => true,
        other => {
            return Err(ApiError::invalid(
                "is_param_sensitive",
                format!("{other} is not 0 or 1"),
            ));
        }
    };
    let param = match req.script_param.as_deref().filter(|p| !p.is_empty()) {
        None => String::new(),
        Some(encoded) => {
            let bytes = decode_base64("script_param", encoded)?;
            let limit = if sensitive {
                MAX_SENSITIVE_PARAM_BYTES
            } else {
                MAX_PARAM_BYTES
            };
            if bytes.len() > limit {
                return Err(ApiError::invalid(
                    "script_param",
                    format!("longer than {limit} bytes decoded"),
                ));
            }
            String::from_utf8(bytes)
                .map_err(|_| ApiError::invalid("script_param", "decodes to invalid UTF-8"))?
        }
    };
    let timeout = super::submit::step_timeout(req.timeout)?;
    super::submit::check_task_name(req.task_name.as_deref())?;
    super::steps::check(req.rolling_config.as_ref())?;
    // Fields fleetrun cannot honour are refused, never accepted and dropped: a client that
    // sends them expects them to take effect.
    if req
        .host_password_list
        .as_ref()
        .is_some_and(|v| !v.is_null() && v.as_array().is_none_or(|a| !a.is_empty()))
    {
        return Err(ApiError::new(
            code::NOT_SUPPORTED,
            "host_password_list: fleetrun's agents run scripts as the account without its password; submit without host_password_list",
        ));
    }
    let callback_url = super::submit::callback_url(shared, req.callback_url.as_deref())?;
    if req
        .windows_interpreter
        .as_deref()
        .is_some_and(|i| !i.trim().is_empty())
    {
        return Err(ApiError::new(
            code::NOT_SUPPORTED,
            "windows_interpreter: fleetrun's agents run on Linux and choose the interpreter by script_language; submit without windows_interpreter",
        ));
    }

    // Account: account_id wins over account_alias.
    let inventory = shared.inventory.current().await?;
    let account = super::submit::requested_account(
        &inventory,
        &scope.inventory,
        req.account_id,
        req.account_alias.as_deref(),
        super::submit::AccountFields::IdOrAlias,
    )?;

    let wanted = wanted_targets(req.target_server)?;
    let chosen = resolve_wanted(caller, &inventory, &scope, &wanted)?;

    let host_ids: Vec<i64> = chosen.iter().map(|h| h.bk_host_id).collect();
    let rolling = super::steps::plan(req.rolling_config.as_ref(), &host_ids)?;

    // Dangerous-command rules, last: the check reads the whole script.
    let script = Arc::new(script);
    let step_name = req
        .task_name
        .as_deref()
        .filter(|n| !n.is_empty())
        .unwrap_or("API Quick execution script");
    let scanned =
        dangerous_rules::refuse_intercepted(shared, step_name, language as i32, script.clone())
            .await?;

    let start = req.start_task.unwrap_or(true);
    let create_time = now_ms();
    let name = req
        .task_name
        .filter(|n| !n.is_empty())
        .unwrap_or_else(|| format!("API Quick execution script{create_time}"));
    let new_job = fleetrun_store::NewJob {
        name: name.clone(),
        operator: caller.username.clone(),
        app_code: caller.app_code.clone(),
        bk_scope_type: scope.scope_type.clone(),
        bk_scope_id: scope.scope_id.clone(),
        // A job created to start later stays pending (and survives a controller restart as such);
        // one that starts now is running from the moment it is accepted.
        status: if start { job::RUNNING } else { job::PENDING },
        job_type: 1,
        launch_mode: 2,
        callback_url,
        create_time,
        step: fleetrun_store::NewStep {
            name: name.clone(),
            step_type: 1,
            script_language: language as i32,
            script_content: script.to_vec(),
            // A sensitive parameter is stored sealed for its step (`create_job_sealing`); only
            // the dispatch below sees it in clear.
            script_param: param.clone(),
            is_param_sensitive: sensitive,
            timeout,
            account_id: account.id,
            account: account.account.clone(),
        },
        hosts: chosen
            .iter()
            .map(|h| fleetrun_store::NewHostResult {
                bk_host_id: h.bk_host_id,
                bk_cloud_id: h.bk_cloud_id,
                ip: h.ip.to_canonical().to_string(),
                status: host::WAITING,
            })
            .collect(),
    };
    let created = shared
        .store
        .create_job_sealing(
            &new_job,
            shared.cipher.sealer(),
            rolling
                .as_ref()
                .map(super::steps::Plan::stored)
                .transpose()?
                .as_ref(),
        )
        .await?;
    // Only a job started here ends here; one left to start later may be started elsewhere.
    let without_url = start && new_job.callback_url.is_none();
    if without_url {
        shared
            .engine
            .callbacks()
            .job_without_url(created.job_instance_id);
    }
    let started = super::steps::save_and_start(
        shared,
        rolling,
        Work::Script(JobSpec {
            job_instance_id: created.job_instance_id,
            step_instance_id: created.step_instance_id,
            hosts: host_ids,
            task: TaskTemplate {
                script_language: language as i32,
                script: script.clone(),
                script_param: param,
                is_param_sensitive: sensitive,
                account: account.account.clone(),
                timeout_secs: timeout as u32,
            },
        }),
        start,
    )
    .await;
    if started.is_err() && without_url {
        shared
            .engine
            .callbacks()
            .forget_job_without_url(created.job_instance_id);
    }
    started?;
    tracing::info!(
        job = created.job_instance_id,
        hosts = chosen.len(),
        operator = %caller.username,
        started = start,
        "job accepted"
    );
    reply::data(fleetrun_api::job::FastExecuteScriptReply {
        job_instance_id: created.job_instance_id,
        job_instance_name: name,
        step_instance_id: created.step_instance_id,
        dangerous_script_check: scanned,
    })
}

/// The hosts `wanted` (a request's `target_server`) names in `scope`: refused if it names hosts
/// the caller may not see, or ones `scope` does not hold. Submits, previews and file steps all
/// resolve their targets here.
pub(super) fn resolve_wanted(
    caller: &Caller,
    inventory: &fleetrun_inventory::Inventory,
    scope: &scope::Scope,
    wanted: &fleetrun_inventory::Targets,
) -> Result<Vec<fleetrun_inventory::ResolvedHost>, ApiError> {
    scope::refuse_unseen_hosts(caller, inventory, wanted)?;
    Ok(inventory
        .resolve(&scope.inventory, wanted)
        .map_err(|e| ApiError::new(i64::from(e.code()), format!("target_server: {e}")))?
        .hosts)
}

/// What a request's `target_server` asks for: host ids (or, without them, addresses, each
/// checked to be one), topology nodes and dynamic groups, merged. Submits, previews and file
/// pushes all read it here, so a preview never resolves differently from the submit it previews.
pub(super) fn wanted_targets(
    target_server: Option<TargetServer>,
) -> Result<fleetrun_inventory::Targets, ApiError> {
    let targets = target_server.ok_or_else(|| ApiError::missing("target_server"))?;
    let host_ids = targets.host_id_list.filter(|l| !l.is_empty());
    let ips = match (&host_ids, targets.ip_list.filter(|l| !l.is_empty())) {
        (None, Some(ips)) => {
            for target in &ips {
                if target.ip.parse::<std::net::IpAddr>().is_err() {
                    return Err(ApiError::invalid(
                        "target_server.ip_list",
                        format!("{:?} is not an IP address", target.ip),
                    ));
                }
            }
            Some(ips.into_iter().map(|t| (t.bk_cloud_id, t.ip)).collect())
        }
        _ => None,
    };
    Ok(fleetrun_inventory::Targets {
        host_ids,
        ips,
        topo_nodes: targets
            .topo_node_list
            .unwrap_or_default()
            .into_iter()
            .map(|n| (n.node_type, n.id))
            .collect(),
        dynamic_groups: targets
            .dynamic_group_list
            .unwrap_or_default()
            .into_iter()
            .map(|g| g.id)
            .collect(),
    })
}
