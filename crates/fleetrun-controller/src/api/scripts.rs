//! The script library APIs: `create_script`, `create_script_version`, `publish_script_version`,
//! `disable_script_version`, `get_script_list`, `get_script_version_list`,
//! `get_script_version_detail`; and picking the version a job runs.

use base64::Engine as _;
use fleetrun_store::{NewScript, ScriptFilter, ScriptVersionRecord, ScriptsError};
use serde::Deserialize;
use serde_json::{Value, json};

use super::{
    ApiError,
    auth::Caller,
    error::code,
    params::{Params, lenient},
    query::paging,
    scope::{self, Scope},
};
use crate::{Shared, now_ms};

const MAX_SCRIPT_BYTES: usize = 16 * 1024 * 1024;
const MAX_NAME_CHARS: usize = 60;
const MAX_VERSION_CHARS: usize = 60;

impl From<ScriptsError> for ApiError {
    fn from(e: ScriptsError) -> Self {
        match e {
            ScriptsError::NotFound => ApiError::new(
                code::SCRIPT_NOT_FOUND,
                "script_id: no such script or version in this scope",
            ),
            ScriptsError::DuplicateVersion(v) => {
                ApiError::invalid("version", format!("{v:?} exists already for this script"))
            }
            ScriptsError::WrongStatus(s) => ApiError::new(
                code::SCRIPT_NOT_RUNNABLE,
                format!("script_version_id: the version is {s}"),
            ),
            ScriptsError::Store(e) => e.into(),
        }
    }
}

fn version_json(v: &ScriptVersionRecord, with_content: bool) -> Value {
    let mut out = json!({
        "id": v.id,
        "script_id": v.script_id,
        "name": v.name,
        "version": v.version,
        "status": v.status,
        "version_desc": v.version_desc,
        "script_language": v.script_language,
        "bk_scope_type": v.bk_scope_type,
        "bk_scope_id": v.bk_scope_id,
        "creator": v.creator,
        "create_time": v.create_time,
        "last_modify_user": v.last_modify_user,
        "last_modify_time": v.last_modify_time,
    });
    if with_content {
        out["content"] = json!(base64::engine::general_purpose::STANDARD.encode(&v.content));
    }
    out
}

fn content(field: &str, text: Option<&str>) -> Result<Vec<u8>, ApiError> {
    let text = text.ok_or_else(|| ApiError::missing(field))?;
    let bytes = base64::engine::general_purpose::STANDARD
        .decode(text.trim())
        .map_err(|e| ApiError::invalid(field, format!("not valid base64: {e}")))?;
    if bytes.is_empty() {
        return Err(ApiError::invalid(field, "decodes to an empty script"));
    }
    if bytes.len() > MAX_SCRIPT_BYTES {
        return Err(ApiError::invalid(
            field,
            format!("larger than {MAX_SCRIPT_BYTES} bytes decoded"),
        ));
    }
    Ok(bytes)
}

fn label(field: &str, value: Option<&str>, max: usize) -> Result<String, ApiError> {
    let value = value
        .filter(|v| !v.trim().is_empty())
        .ok_or_else(|| ApiError::missing(field))?;
    if value.chars().count() > max {
        return Err(ApiError::invalid(
            field,
            format!("longer than {max} characters"),
        ));
    }
    Ok(value.to_owned())
}

#[derive(Debug, Deserialize)]
struct CreateScript {
    name: Option<String>,
    #[serde(default)]
    description: String,
    #[serde(default, deserialize_with = "lenient::opt_int")]
    script_language: Option<i64>,
    content: Option<String>,
    version: Option<String>,
    #[serde(default)]
    version_desc: String,
}

fn language(value: Option<i64>) -> Result<i32, ApiError> {
    let language = value.ok_or_else(|| ApiError::missing("script_language"))?;
    if !(1..=5).contains(&language) {
        return Err(ApiError::new(
            code::BAD_SCRIPT_LANGUAGE,
            format!(
                "script_language: {language} is not one of 1 (shell), 2 (bat), 3 (Perl), 4 (Python), 5 (PowerShell)"
            ),
        ));
    }
    Ok(language as i32)
}

fn new_script(scope: &Scope, caller: &Caller, req: CreateScript) -> Result<NewScript, ApiError> {
    Ok(NewScript {
        bk_scope_type: scope.scope_type.clone(),
        bk_scope_id: scope.scope_id.clone(),
        name: req.name.unwrap_or_default(),
        description: req.description,
        script_language: 0,
        content: content("content", req.content.as_deref())?,
        version: label("version", req.version.as_deref(), MAX_VERSION_CHARS)?,
        version_desc: req.version_desc,
        operator: caller.username.clone(),
        now: now_ms(),
    })
}

pub async fn create_script(
    shared: &Shared,
    caller: &Caller,
    params: &Params,
) -> Result<Value, ApiError> {
    let scope = scope::resolve(shared, caller, params)?;
    let req: CreateScript = params.parse()?;
    let name = label("name", req.name.as_deref(), MAX_NAME_CHARS)?;
    let script_language = language(req.script_language)?;
    let new = NewScript {
        name,
        script_language,
        ..new_script(&scope, caller, req)?
    };
    let script_id = uuid::Uuid::new_v4().simple().to_string();
    let version = shared.store.create_script(&new, &script_id).await?;
    Ok(version_json(&version, true))
}

#[derive(Debug, Deserialize)]
struct CreateVersion {
    script_id: Option<String>,
    #[serde(flatten)]
    rest: CreateScript,
}

pub async fn create_script_version(
    shared: &Shared,
    caller: &Caller,
    params: &Params,
) -> Result<Value, ApiError> {
    let scope = scope::resolve(shared, caller, params)?;
    let req: CreateVersion = params.parse()?;
    let script_id = req
        .script_id
        .clone()
        .ok_or_else(|| ApiError::missing("script_id"))?;
    let new = new_script(&scope, caller, req.rest)?;
    let version = shared
        .store
        .create_script_version((&scope.scope_type, &scope.scope_id), &script_id, &new)
        .await?;
    Ok(version_json(&version, true))
}

#[derive(Debug, Deserialize)]
struct VersionOperation {
    script_id: Option<String>,
    #[serde(default, deserialize_with = "lenient::opt_int")]
    script_version_id: Option<i64>,
}

async fn operate_version(
    shared: &Shared,
    caller: &Caller,
    params: &Params,
    publish: bool,
) -> Result<Value, ApiError> {
    let scope = scope::resolve(shared, caller, params)?;
    let req: VersionOperation = params.parse()?;
    let script_id = req
        .script_id
        .ok_or_else(|| ApiError::missing("script_id"))?;
    let id = req
        .script_version_id
        .ok_or_else(|| ApiError::missing("script_version_id"))?;
    let at = (scope.scope_type.as_str(), scope.scope_id.as_str());
    let version = if publish {
        shared
            .store
            .publish_script_version(at, &script_id, id, &caller.username, now_ms())
            .await?
    } else {
        shared
            .store
            .disable_script_version(at, &script_id, id, &caller.username, now_ms())
            .await?
    };
    Ok(json!({ "id": version.id, "script_id": version.script_id, "status": version.status }))
}

pub async fn publish_script_version(
    shared: &Shared,
    caller: &Caller,
    params: &Params,
) -> Result<Value, ApiError> {
    operate_version(shared, caller, params, true).await
}

pub async fn disable_script_version(
    shared: &Shared,
    caller: &Caller,
    params: &Params,
) -> Result<Value, ApiError> {
    operate_version(shared, caller, params, false).await
}

#[derive(Debug, Deserialize)]
struct ListRequest {
    name: Option<String>,
    #[serde(default, deserialize_with = "lenient::opt_int")]
    script_language: Option<i64>,
    script_id: Option<String>,
    #[serde(default, deserialize_with = "lenient::opt_bool")]
    return_script_content: Option<bool>,
    #[serde(default, deserialize_with = "lenient::opt_int")]
    start: Option<i64>,
    #[serde(default, deserialize_with = "lenient::opt_int")]
    length: Option<i64>,
}

pub async fn get_script_list(
    shared: &Shared,
    caller: &Caller,
    params: &Params,
) -> Result<Value, ApiError> {
    let scope = scope::resolve(shared, caller, params)?;
    let req: ListRequest = params.parse()?;
    let language = match req.script_language {
        None | Some(0) => None,
        Some(l) => Some(language(Some(l))?),
    };
    let (start, length) = paging(req.start, req.length)?;
    let filter = ScriptFilter {
        bk_scope_type: scope.scope_type.clone(),
        bk_scope_id: scope.scope_id.clone(),
        name: req.name.filter(|n| !n.is_empty()),
        script_language: language,
        start,
        length,
    };
    let (total, scripts) = shared.store.list_scripts(&filter).await?;
    let data: Vec<Value> = scripts
        .iter()
        .map(|s| {
            json!({
                "id": s.script_id,
                "name": s.name,
                "description": s.description,
                "script_language": s.script_language,
                "online_script_version_id": s.online_script_version_id,
                "bk_scope_type": s.bk_scope_type,
                "bk_scope_id": s.bk_scope_id,
                "creator": s.creator,
                "create_time": s.create_time,
                "last_modify_user": s.last_modify_user,
                "last_modify_time": s.last_modify_time,
            })
        })
        .collect();
    Ok(json!({ "start": start, "length": length, "total": total, "data": data }))
}

pub async fn get_script_version_list(
    shared: &Shared,
    caller: &Caller,
    params: &Params,
) -> Result<Value, ApiError> {
    let scope = scope::resolve(shared, caller, params)?;
    let req: ListRequest = params.parse()?;
    let script_id = req
        .script_id
        .ok_or_else(|| ApiError::missing("script_id"))?;
    let (start, length) = paging(req.start, req.length)?;
    let (total, versions) = shared
        .store
        .list_script_versions(
            (&scope.scope_type, &scope.scope_id),
            &script_id,
            start,
            length,
        )
        .await?;
    let with_content = req.return_script_content.unwrap_or(false);
    let data: Vec<Value> = versions
        .iter()
        .map(|v| version_json(v, with_content))
        .collect();
    Ok(json!({ "start": start, "length": length, "total": total, "data": data }))
}

#[derive(Debug, Deserialize)]
struct DetailRequest {
    #[serde(default, deserialize_with = "lenient::opt_int")]
    id: Option<i64>,
    script_id: Option<String>,
    version: Option<String>,
}

pub async fn get_script_version_detail(
    shared: &Shared,
    caller: &Caller,
    params: &Params,
) -> Result<Value, ApiError> {
    let scope = scope::resolve(shared, caller, params)?;
    let req: DetailRequest = params.parse()?;
    let at = (scope.scope_type.as_str(), scope.scope_id.as_str());
    let version = match (req.id, req.script_id.as_deref(), req.version.as_deref()) {
        (Some(id), _, _) => shared.store.script_version(at.0, at.1, id).await?,
        (None, Some(script_id), Some(version)) => {
            shared
                .store
                .script_version_by_label(at, script_id, version)
                .await?
        }
        _ => return Err(ApiError::missing("id (or script_id and version)")),
    };
    Ok(version_json(&version, true))
}

/// The script version a job runs: `script_version_id` wins over `script_id` (its online
/// version). Only online and offline versions run.
pub async fn runnable_version(
    shared: &Shared,
    scope: &Scope,
    script_version_id: Option<i64>,
    script_id: Option<&str>,
) -> Result<Option<ScriptVersionRecord>, ApiError> {
    let at = (scope.scope_type.as_str(), scope.scope_id.as_str());
    let version = match (script_version_id, script_id) {
        (Some(id), _) => {
            shared
                .store
                .script_version(at.0, at.1, id)
                .await
                .map_err(|e| match e {
                    ScriptsError::NotFound => ApiError::new(
                        code::SCRIPT_NOT_FOUND,
                        format!("script_version_id: no version {id} in this scope"),
                    ),
                    other => other.into(),
                })?
        }
        (None, Some(script_id)) => shared
            .store
            .online_script_version(at, script_id)
            .await
            .map_err(|e| match e {
                ScriptsError::NotFound => ApiError::new(
                    code::SCRIPT_NOT_FOUND,
                    format!("script_id: no script {script_id:?} in this scope"),
                ),
                other => other.into(),
            })?
            .ok_or_else(|| {
                ApiError::new(
                    code::SCRIPT_NOT_RUNNABLE,
                    format!("script_id: script {script_id:?} has no online version"),
                )
            })?,
        (None, None) => return Ok(None),
    };
    if !matches!(version.status, 1 | 2) {
        return Err(ApiError::new(
            code::SCRIPT_NOT_RUNNABLE,
            format!(
                "script_version_id: version {} is {}; only online and offline versions run",
                version.id,
                fleetrun_store::script_status_name(version.status)
            ),
        ));
    }
    Ok(Some(version))
}
