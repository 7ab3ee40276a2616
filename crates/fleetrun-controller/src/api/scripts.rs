//! The script library APIs: a scope's scripts (`create_script`, `create_script_version`,
//! `update_script_basic`, `update_script_version`, `publish_script_version`,
//! `disable_script_version`, `delete_script`, `delete_script_version`, `get_script_list`,
//! `get_script_version_list`, `get_script_version_detail`), the same for public scripts
//! (`*_public_script_*`, shared by every scope, changed only by apps granted `public_scripts`),
//! and picking the version a job runs.

use base64::Engine as _;
use fleetrun_api::{ScriptLanguage, VersionStatus};
use fleetrun_store::{
    NewScript, ScriptBasics, ScriptFilter, ScriptRecord, ScriptVersionRecord, ScriptsError,
};
use serde::{Deserialize, Serialize};
use serde_json::Value;

use super::{
    ApiError,
    auth::Caller,
    error::code,
    params::{Params, lenient, paging},
    reply::{self, Page},
    scope::{self, Scope},
};
use crate::{Shared, now_ms};

const MAX_SCRIPT_BYTES: usize = 16 * 1024 * 1024;
const MAX_NAME_CHARS: usize = 60;
const MAX_VERSION_CHARS: usize = 60;

/// The scope key public scripts are kept under: no business or business set has it.
const PUBLIC: (&str, &str) = ("public", "0");

/// Whose scripts a request reads or changes.
#[derive(Debug, Clone)]
pub enum Library {
    /// A business's or business set's own.
    Scope(Scope),
    /// The public scripts, shared by every scope.
    Public,
}

impl Library {
    fn key(&self) -> (&str, &str) {
        match self {
            Library::Scope(scope) => (&scope.scope_type, &scope.scope_id),
            Library::Public => PUBLIC,
        }
    }

    /// Reading: a scope's scripts need its permission; public ones are open to every app.
    fn read(
        shared: &Shared,
        caller: &Caller,
        params: &Params,
        public: bool,
    ) -> Result<Self, ApiError> {
        if public {
            Ok(Library::Public)
        } else {
            Ok(Library::Scope(scope::resolve(shared, caller, params)?))
        }
    }

    /// Changing: public scripts need the app's `public_scripts` grant.
    fn write(
        shared: &Shared,
        caller: &Caller,
        params: &Params,
        public: bool,
    ) -> Result<Self, ApiError> {
        if public && !caller.may_manage_public_scripts() {
            return Err(ApiError::new(
                code::NO_PERMISSION,
                format!(
                    "app {:?} is not granted public_scripts: it may run and read public scripts, not change them",
                    caller.app_code
                ),
            ));
        }
        Self::read(shared, caller, params, public)
    }
}

impl From<ScriptsError> for ApiError {
    fn from(e: ScriptsError) -> Self {
        match e {
            ScriptsError::NotFound => ApiError::new(
                code::SCRIPT_NOT_FOUND,
                "script_id: no such script or version in this scope",
            ),
            ScriptsError::DuplicateVersion(v) => ApiError::new(
                code::SCRIPT_VERSION_EXISTS,
                format!("version: {v:?} exists already for this script"),
            ),
            ScriptsError::WrongStatus(s) => ApiError::new(
                code::UNSUPPORTED_OPERATION,
                format!("script_version_id: the version is {s}, which does not allow this"),
            ),
            ScriptsError::DeleteOnline => ApiError::new(
                code::DELETE_ONLINE_SCRIPT,
                "script_version_id: the version is online; disable it (or publish another) before deleting it",
            ),
            ScriptsError::Store(e) => e.into(),
        }
    }
}

/// A script version as bk-job returns it; `content` is the script's text.
#[derive(Debug, Serialize)]
struct VersionReply {
    id: i64,
    script_id: String,
    name: String,
    version: String,
    status: i32,
    version_desc: String,
    script_language: i32,
    #[serde(skip_serializing_if = "Option::is_none")]
    bk_scope_type: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    bk_scope_id: Option<String>,
    creator: String,
    create_time: i64,
    last_modify_user: String,
    last_modify_time: i64,
    description: String,
    #[serde(skip_serializing_if = "Option::is_none")]
    content: Option<String>,
}

fn is_public(scope_type: &str, scope_id: &str) -> bool {
    (scope_type, scope_id) == PUBLIC
}

fn version_reply(v: &ScriptVersionRecord, with_content: bool) -> VersionReply {
    let public = is_public(&v.bk_scope_type, &v.bk_scope_id);
    VersionReply {
        id: v.id,
        script_id: v.script_id.clone(),
        name: v.name.clone(),
        version: v.version.clone(),
        status: v.status,
        version_desc: v.version_desc.clone(),
        script_language: v.script_language,
        bk_scope_type: (!public).then(|| v.bk_scope_type.clone()),
        bk_scope_id: (!public).then(|| v.bk_scope_id.clone()),
        creator: v.creator.clone(),
        create_time: v.create_time,
        last_modify_user: v.last_modify_user.clone(),
        last_modify_time: v.last_modify_time,
        description: v.description.clone(),
        content: with_content.then(|| String::from_utf8_lossy(&v.content).into_owned()),
    }
}

/// A script (its basics) as bk-job lists it.
///
/// Its scope, creator and modification fields repeat [`VersionReply`]'s on purpose: each reply
/// struct is one of bk-job's replies as its documentation lists it, field by field in its order,
/// and is read against that list.
#[derive(Debug, Serialize)]
struct ScriptReply {
    id: String,
    name: String,
    description: String,
    script_language: i32,
    online_script_version_id: Option<i64>,
    #[serde(skip_serializing_if = "Option::is_none")]
    bk_scope_type: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    bk_scope_id: Option<String>,
    creator: String,
    create_time: i64,
    last_modify_user: String,
    last_modify_time: i64,
}

fn script_reply(s: &ScriptRecord) -> ScriptReply {
    let public = is_public(&s.bk_scope_type, &s.bk_scope_id);
    ScriptReply {
        id: s.script_id.clone(),
        name: s.name.clone(),
        description: s.description.clone(),
        script_language: s.script_language,
        online_script_version_id: s.online_script_version_id,
        bk_scope_type: (!public).then(|| s.bk_scope_type.clone()),
        bk_scope_id: (!public).then(|| s.bk_scope_id.clone()),
        creator: s.creator.clone(),
        create_time: s.create_time,
        last_modify_user: s.last_modify_user.clone(),
        last_modify_time: s.last_modify_time,
    }
}

/// What the delete APIs return: bk-job's `data` is empty.
fn deleted() -> Result<Value, ApiError> {
    Ok(Value::Null)
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
    // The library hands content back as text, as bk-job does: bytes that are not UTF-8 would
    // come back altered, and a client saving what it read would change the script.
    if std::str::from_utf8(&bytes).is_err() {
        return Err(ApiError::invalid(
            field,
            "decodes to text that is not UTF-8; the script library keeps UTF-8 text",
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

/// A library script's language: 1–5 as for `fast_execute_script`, or 6 (SQL).
fn library_language(value: Option<i64>) -> Result<i32, ApiError> {
    let language = value.ok_or_else(|| ApiError::missing("script_language"))?;
    let known =
        i32::try_from(language).is_ok_and(|code| ScriptLanguage::from_code(code).is_named());
    if !known {
        return Err(ApiError::new(
            code::BAD_SCRIPT_LANGUAGE,
            format!(
                "script_language: {language} is not one of 1 (shell), 2 (bat), 3 (Perl), 4 (Python), 5 (PowerShell), 6 (SQL)"
            ),
        ));
    }
    Ok(language as i32)
}

fn new_version(
    at: (&str, &str),
    caller: &Caller,
    req: CreateScript,
) -> Result<NewScript, ApiError> {
    Ok(NewScript {
        bk_scope_type: at.0.to_owned(),
        bk_scope_id: at.1.to_owned(),
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

/// A version the dangerous-command rules would refuse to run is refused before it is kept: it
/// could never run. (Rules made later still stop a kept one at its run.)
async fn refuse_dangerous(
    shared: &Shared,
    name: &str,
    language: i32,
    content: &[u8],
) -> Result<(), ApiError> {
    super::dangerous_rules::refuse_intercepted(
        shared,
        name,
        language,
        std::sync::Arc::new(content.to_vec()),
    )
    .await
    .map(drop)
}

/// The script APIs, business and public: `name` is the business API's name.
pub async fn call(
    name: &str,
    public: bool,
    shared: &Shared,
    caller: &Caller,
    params: &Params,
) -> Result<Value, ApiError> {
    match name {
        "create_script" => create_script(shared, caller, params, public).await,
        "create_script_version" => create_script_version(shared, caller, params, public).await,
        "update_script_basic" => update_script_basic(shared, caller, params, public).await,
        "update_script_version" => update_script_version(shared, caller, params, public).await,
        "publish_script_version" => operate_version(shared, caller, params, public, true).await,
        "disable_script_version" => operate_version(shared, caller, params, public, false).await,
        "delete_script" => delete_script(shared, caller, params, public).await,
        "delete_script_version" => delete_script_version(shared, caller, params, public).await,
        "get_script_list" => get_script_list(shared, caller, params, public).await,
        "get_script_version_list" => get_script_version_list(shared, caller, params, public).await,
        "get_script_version_detail" => {
            get_script_version_detail(shared, caller, params, public).await
        }
        other => Err(ApiError::internal(
            "script API",
            format!("{other} is not one"),
        )),
    }
}

/// The business script APIs; each also exists for public scripts with `public_script` in place
/// of `script` in its name.
pub const APIS: &[&str] = &[
    "create_script",
    "create_script_version",
    "update_script_basic",
    "update_script_version",
    "publish_script_version",
    "disable_script_version",
    "delete_script",
    "delete_script_version",
    "get_script_list",
    "get_script_version_list",
    "get_script_version_detail",
];

/// The business API a public-script API name stands for.
pub fn business_name(api: &str) -> Option<String> {
    let name = api.replacen("public_script", "script", 1);
    (api.contains("public_script") && APIS.contains(&name.as_str())).then_some(name)
}

async fn create_script(
    shared: &Shared,
    caller: &Caller,
    params: &Params,
    public: bool,
) -> Result<Value, ApiError> {
    let library = Library::write(shared, caller, params, public)?;
    let req: CreateScript = params.parse()?;
    let name = label("name", req.name.as_deref(), MAX_NAME_CHARS)?;
    let script_language = library_language(req.script_language)?;
    let new = NewScript {
        name,
        script_language,
        ..new_version(library.key(), caller, req)?
    };
    refuse_dangerous(shared, &new.name, script_language, &new.content).await?;
    let script_id = uuid::Uuid::new_v4().simple().to_string();
    let version = shared.store.create_script(&new, &script_id).await?;
    reply::data(version_reply(&version, true))
}

#[derive(Debug, Deserialize)]
struct CreateVersion {
    #[serde(default, deserialize_with = "opt_text")]
    script_id: Option<String>,
    #[serde(flatten)]
    rest: CreateScript,
}

fn opt_text<'de, D: serde::Deserializer<'de>>(d: D) -> Result<Option<String>, D::Error> {
    Option::<Value>::deserialize(d)?
        .filter(|v| !v.is_null())
        .map(|v| lenient::text(v).map_err(serde::de::Error::custom))
        .transpose()
}

async fn create_script_version(
    shared: &Shared,
    caller: &Caller,
    params: &Params,
    public: bool,
) -> Result<Value, ApiError> {
    let library = Library::write(shared, caller, params, public)?;
    let req: CreateVersion = params.parse()?;
    let script_id = required_script_id(req.script_id.clone())?;
    let new = new_version(library.key(), caller, req.rest)?;
    let script = shared
        .store
        .script(library.key().0, library.key().1, &script_id)
        .await?;
    refuse_dangerous(shared, &script.name, script.script_language, &new.content).await?;
    let version = shared
        .store
        .create_script_version(library.key(), &script_id, &new)
        .await?;
    reply::data(version_reply(&version, true))
}

/// The `script_id` every call on one script names.
fn required_script_id(script_id: Option<String>) -> Result<String, ApiError> {
    script_id.ok_or_else(|| ApiError::missing("script_id"))
}

#[derive(Debug, Deserialize)]
struct UpdateBasic {
    #[serde(default, deserialize_with = "opt_text")]
    script_id: Option<String>,
    name: Option<String>,
    description: Option<String>,
}

async fn update_script_basic(
    shared: &Shared,
    caller: &Caller,
    params: &Params,
    public: bool,
) -> Result<Value, ApiError> {
    let library = Library::write(shared, caller, params, public)?;
    let req: UpdateBasic = params.parse()?;
    let script_id = required_script_id(req.script_id)?;
    let name = label("name", req.name.as_deref(), MAX_NAME_CHARS)?;
    let script = shared
        .store
        .update_script_basic(
            library.key(),
            &script_id,
            &ScriptBasics {
                name,
                description: req.description,
                operator: caller.username.clone(),
                now: now_ms(),
            },
        )
        .await?;
    reply::data(script_reply(&script))
}

#[derive(Debug, Deserialize)]
struct VersionOperation {
    #[serde(default, deserialize_with = "opt_text")]
    script_id: Option<String>,
    #[serde(default, deserialize_with = "lenient::opt_int")]
    script_version_id: Option<i64>,
    content: Option<String>,
    version_desc: Option<String>,
}

impl VersionOperation {
    fn ids(&self) -> Result<(String, i64), ApiError> {
        let script_id = required_script_id(self.script_id.clone())?;
        let id = self
            .script_version_id
            .ok_or_else(|| ApiError::missing("script_version_id"))?;
        Ok((script_id, id))
    }
}

async fn update_script_version(
    shared: &Shared,
    caller: &Caller,
    params: &Params,
    public: bool,
) -> Result<Value, ApiError> {
    let library = Library::write(shared, caller, params, public)?;
    let req: VersionOperation = params.parse()?;
    let (script_id, id) = req.ids()?;
    let text = content("content", req.content.as_deref())?;
    let script = shared
        .store
        .script(library.key().0, library.key().1, &script_id)
        .await?;
    refuse_dangerous(shared, &script.name, script.script_language, &text).await?;
    let version = shared
        .store
        .update_script_version(
            library.key(),
            &script_id,
            id,
            &text,
            req.version_desc.as_deref(),
            &caller.username,
            now_ms(),
        )
        .await?;
    reply::data(version_reply(&version, true))
}

/// What publishing or disabling returns.
#[derive(Debug, Serialize)]
struct StatusReply {
    id: i64,
    script_id: String,
    status: i32,
}

async fn operate_version(
    shared: &Shared,
    caller: &Caller,
    params: &Params,
    public: bool,
    publish: bool,
) -> Result<Value, ApiError> {
    let library = Library::write(shared, caller, params, public)?;
    let req: VersionOperation = params.parse()?;
    let (script_id, id) = req.ids()?;
    let at = library.key();
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
    reply::data(StatusReply {
        id: version.id,
        script_id: version.script_id,
        status: version.status,
    })
}

async fn delete_script(
    shared: &Shared,
    caller: &Caller,
    params: &Params,
    public: bool,
) -> Result<Value, ApiError> {
    let library = Library::write(shared, caller, params, public)?;
    let req: VersionOperation = params.parse()?;
    let script_id = required_script_id(req.script_id)?;
    shared
        .store
        .delete_script(library.key(), &script_id)
        .await?;
    deleted()
}

async fn delete_script_version(
    shared: &Shared,
    caller: &Caller,
    params: &Params,
    public: bool,
) -> Result<Value, ApiError> {
    let library = Library::write(shared, caller, params, public)?;
    let req: VersionOperation = params.parse()?;
    let (script_id, id) = req.ids()?;
    shared
        .store
        .delete_script_version(library.key(), &script_id, id)
        .await?;
    deleted()
}

#[derive(Debug, Deserialize)]
struct ListRequest {
    name: Option<String>,
    #[serde(default, deserialize_with = "lenient::opt_int")]
    script_language: Option<i64>,
    #[serde(default, deserialize_with = "opt_text")]
    script_id: Option<String>,
    #[serde(default, deserialize_with = "lenient::opt_bool")]
    return_script_content: Option<bool>,
    #[serde(default, deserialize_with = "lenient::opt_int")]
    start: Option<i64>,
    #[serde(default, deserialize_with = "lenient::opt_int")]
    length: Option<i64>,
}

async fn get_script_list(
    shared: &Shared,
    caller: &Caller,
    params: &Params,
    public: bool,
) -> Result<Value, ApiError> {
    let library = Library::read(shared, caller, params, public)?;
    let req: ListRequest = params.parse()?;
    let language = match req.script_language {
        None | Some(0) => None,
        Some(l) => Some(library_language(Some(l))?),
    };
    let (start, length) = paging(req.start, req.length)?;
    let (scope_type, scope_id) = library.key();
    let filter = ScriptFilter {
        bk_scope_type: scope_type.to_owned(),
        bk_scope_id: scope_id.to_owned(),
        name: req.name.filter(|n| !n.is_empty()),
        script_language: language,
        start,
        length,
    };
    let (total, scripts) = shared.store.list_scripts(&filter).await?;
    reply::data(Page {
        start,
        length,
        total,
        data: scripts.iter().map(script_reply).collect(),
    })
}

async fn get_script_version_list(
    shared: &Shared,
    caller: &Caller,
    params: &Params,
    public: bool,
) -> Result<Value, ApiError> {
    let library = Library::read(shared, caller, params, public)?;
    let req: ListRequest = params.parse()?;
    let script_id = required_script_id(req.script_id)?;
    let (start, length) = paging(req.start, req.length)?;
    let (total, versions) = shared
        .store
        .list_script_versions(library.key(), &script_id, start, length)
        .await?;
    let with_content = req.return_script_content.unwrap_or(false);
    reply::data(Page {
        start,
        length,
        total,
        data: versions
            .iter()
            .map(|v| version_reply(v, with_content))
            .collect(),
    })
}

#[derive(Debug, Deserialize)]
struct DetailRequest {
    #[serde(default, deserialize_with = "lenient::opt_int")]
    id: Option<i64>,
    #[serde(default, deserialize_with = "opt_text")]
    script_id: Option<String>,
    version: Option<String>,
}

async fn get_script_version_detail(
    shared: &Shared,
    caller: &Caller,
    params: &Params,
    public: bool,
) -> Result<Value, ApiError> {
    let library = Library::read(shared, caller, params, public)?;
    let req: DetailRequest = params.parse()?;
    let at = library.key();
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
    reply::data(version_reply(&version, true))
}

/// The script version a job runs: `script_version_id` wins over `script_id` (its online
/// version); either names a script of the scope or a public script. Only online and offline
/// versions run, and not SQL, which needs `fast_execute_sql`.
pub async fn runnable_version(
    shared: &Shared,
    scope: &Scope,
    script_version_id: Option<i64>,
    script_id: Option<&str>,
) -> Result<Option<ScriptVersionRecord>, ApiError> {
    let own = (scope.scope_type.as_str(), scope.scope_id.as_str());
    let version = match (script_version_id, script_id) {
        (Some(id), _) => {
            let found = match shared.store.script_version(own.0, own.1, id).await {
                Err(ScriptsError::NotFound) => {
                    shared.store.script_version(PUBLIC.0, PUBLIC.1, id).await
                }
                other => other,
            };
            found.map_err(|e| match e {
                ScriptsError::NotFound => ApiError::new(
                    code::SCRIPT_NOT_FOUND,
                    format!(
                        "script_version_id: no version {id} in this scope or the public scripts"
                    ),
                ),
                other => other.into(),
            })?
        }
        (None, Some(script_id)) => {
            let found = match shared.store.online_script_version(own, script_id).await {
                Err(ScriptsError::NotFound) => {
                    shared.store.online_script_version(PUBLIC, script_id).await
                }
                other => other,
            };
            found
                .map_err(|e| match e {
                    ScriptsError::NotFound => ApiError::new(
                        code::SCRIPT_NOT_FOUND,
                        format!(
                            "script_id: no script {script_id:?} in this scope or the public scripts"
                        ),
                    ),
                    other => other.into(),
                })?
                .ok_or_else(|| {
                    ApiError::new(
                        code::SCRIPT_NOT_RUNNABLE,
                        format!("script_id: script {script_id:?} has no online version"),
                    )
                })?
        }
        (None, None) => return Ok(None),
    };
    let status = VersionStatus::from_code(version.status);
    if !status.is_runnable() {
        return Err(ApiError::new(
            code::SCRIPT_NOT_RUNNABLE,
            format!(
                "script_version_id: version {} is {}; only online and offline versions run",
                version.id,
                status.name().unwrap_or("unknown")
            ),
        ));
    }
    if ScriptLanguage::from_code(version.script_language) == ScriptLanguage::Sql {
        return Err(ApiError::new(
            code::BAD_SCRIPT_LANGUAGE,
            format!(
                "script_version_id: version {} is a SQL script, which runs with fast_execute_sql; fleetrun does not serve it",
                version.id
            ),
        ));
    }
    Ok(Some(version))
}
