//! `fast_transfer_file` and the local uploads it can send: `generate_local_file_upload_url`
//! hands out one upload URL per file name, the caller PUTs the bytes there with the same app's
//! credentials ([`upload_local_file`]), and names the upload's `path` in a `file_source_list`
//! entry of `file_type` 2. Files on source hosts are `file_type` 1; third-party file sources
//! (`file_type` 3) are refused.

use std::sync::Arc;

use axum::{
    body::Body,
    extract::{Path, RawQuery, State},
    http::{HeaderMap, Method},
    response::Response,
};
use fleetrun_proto::source_path::{SourcePathError, parse_source_path};
use http_body_util::BodyExt as _;
use serde::{Deserialize, Serialize};
use serde_json::Value;

use super::{
    ApiError,
    auth::Caller,
    error::code,
    execute::{TargetServer, refuse_while_unwritable},
    files::{file_target, stored_targets, target_dir},
    params::{Params, lenient},
    reply,
    request::ApiRequest,
    scope,
};
use crate::{
    Shared,
    content::{self, StoredFile, Upload},
    engine::{FileStep, LocalFile, SourceSpec, TransferSpec, Work},
    now_ms,
};

const MAX_SOURCES: usize = 100;
const MAX_PATHS: usize = 500;
const MAX_UPLOAD_NAMES: usize = 100;
/// The speed limits' largest value, in MB/s.
const MAX_SPEED_MB: i64 = 100_000;

/// bk-job's `file_type`s.
mod file_type {
    pub const SERVER: i64 = 1;
    pub const LOCAL: i64 = 2;
    pub const THIRD_PARTY: i64 = 3;
}

#[derive(Debug, Deserialize)]
struct Request {
    task_name: Option<String>,
    account_alias: Option<String>,
    #[serde(default, deserialize_with = "lenient::opt_int")]
    account_id: Option<i64>,
    file_target_path: Option<String>,
    file_target_name: Option<String>,
    file_source_list: Option<Vec<FileSource>>,
    target_server: Option<TargetServer>,
    #[serde(default, deserialize_with = "lenient::opt_int")]
    timeout: Option<i64>,
    #[serde(default, deserialize_with = "lenient::opt_int")]
    download_speed_limit: Option<i64>,
    #[serde(default, deserialize_with = "lenient::opt_int")]
    upload_speed_limit: Option<i64>,
    #[serde(default, deserialize_with = "lenient::opt_int")]
    transfer_mode: Option<i64>,
    callback_url: Option<String>,
    #[serde(default, deserialize_with = "lenient::opt_bool")]
    start_task: Option<bool>,
    rolling_config: Option<Value>,
}

/// A transfer step as the store keeps it (the step's payload, shown by `get_step_instance_detail`):
/// what a job created with `start_task=false` is started from. Sources keep their host ids and
/// account ids, local files the id of the record that holds them for the job
/// ([`super::held`]); speed limits are in MB/s as submitted.
#[derive(Debug, Serialize, Deserialize)]
struct StoredTransfer {
    file_target_path: String,
    file_target_name: Option<String>,
    transfer_mode: i64,
    #[serde(default)]
    download_speed_limit: i64,
    #[serde(default)]
    upload_speed_limit: i64,
    file_source_list: Vec<StoredSource>,
}

#[derive(Debug, Serialize, Deserialize)]
struct StoredSource {
    file_type: i64,
    file_list: Vec<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    account: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    account_id: Option<i64>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    hosts: Option<Vec<i64>>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    size: Option<u64>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    held: Option<String>,
}

#[derive(Debug, Deserialize)]
struct FileSource {
    file_list: Option<Vec<String>>,
    account: Option<SourceAccount>,
    server: Option<TargetServer>,
    #[serde(default, deserialize_with = "lenient::opt_int")]
    file_type: Option<i64>,
    #[serde(default, deserialize_with = "lenient::opt_int")]
    file_source_id: Option<i64>,
    file_source_code: Option<String>,
}

#[derive(Debug, Deserialize)]
struct SourceAccount {
    #[serde(default, deserialize_with = "lenient::opt_int")]
    id: Option<i64>,
    alias: Option<String>,
}

fn speed_limit(field: &str, value: Option<i64>) -> Result<u64, ApiError> {
    match value {
        None | Some(0) => Ok(0),
        Some(mb) if (1..=MAX_SPEED_MB).contains(&mb) => Ok(mb as u64 * 1024 * 1024),
        Some(other) => Err(ApiError::invalid(
            field,
            format!("{other} is not a speed in MB/s within [1, {MAX_SPEED_MB}]"),
        )),
    }
}

/// Checks a source path as bk-job writes it, by the parser the source agent reads it with
/// (`fleetrun_proto::source_path`): absolute, no `.`/`..`, at most 64 directories deep,
/// wildcards or `REGEX:` only in the last component, a regular expression that compiles.
fn source_path(field: &str, path: &str) -> Result<String, ApiError> {
    let path = path.trim();
    match parse_source_path(path) {
        Ok(_) => Ok(path.to_owned()),
        Err(SourcePathError::Unprintable(_)) => Err(ApiError::invalid(
            field,
            "contains a control character or is longer than 4096 bytes",
        )),
        Err(SourcePathError::BadRegex { why, .. }) => Err(ApiError::invalid(
            field,
            format!("the regular expression does not compile: {why}"),
        )),
        Err(other) => Err(ApiError::invalid(field, other.to_string())),
    }
}

/// Checks `file_target_path` with its variables: absolute, and absolute with no `.`/`..` once
/// they are replaced (by a sample address and time; the real ones are checked when known).
fn target_path(path: Option<&str>) -> Result<String, ApiError> {
    let field = "file_target_path";
    let path = target_dir(field, path)?;
    let sample = crate::engine::target_path::resolve(&path, "10.0.0.1", now_ms());
    target_dir(field, Some(&sample)).map_err(|e| {
        ApiError::invalid(
            field,
            format!("once its variables are replaced: {}", e.message),
        )
    })?;
    Ok(path)
}

fn file_name_field(field: &str, name: &str) -> Result<String, ApiError> {
    if name.is_empty()
        || name == "."
        || name == ".."
        || name.contains('/')
        || name.len() > 255
        || name.chars().any(|c| c < ' ' || c == '\u{7f}')
    {
        return Err(ApiError::invalid(
            field,
            format!("{name:?} is not a plain file name"),
        ));
    }
    Ok(name.to_owned())
}

pub async fn fast_transfer_file(
    shared: &Shared,
    caller: &Caller,
    params: &Params,
) -> Result<Value, ApiError> {
    let req: Request = params.parse()?;
    let scope = scope::resolve(shared, caller, params)?;
    refuse_while_unwritable(shared)?;

    let template = target_path(req.file_target_path.as_deref())?;
    let target_name = match req.file_target_name.as_deref().filter(|n| !n.is_empty()) {
        None => None,
        Some(name) => Some(file_name_field("file_target_name", name)?),
    };
    let list = req
        .file_source_list
        .filter(|l| !l.is_empty())
        .ok_or_else(|| ApiError::missing("file_source_list"))?;
    if list.len() > MAX_SOURCES {
        return Err(ApiError::invalid(
            "file_source_list",
            format!("{} sources, at most {MAX_SOURCES}", list.len()),
        ));
    }
    let strict = super::files::strict_mode(req.transfer_mode)?;
    let timeout = super::submit::step_timeout(req.timeout)?;
    let download = speed_limit("download_speed_limit", req.download_speed_limit)?;
    let upload = speed_limit("upload_speed_limit", req.upload_speed_limit)?;
    super::submit::check_task_name(req.task_name.as_deref())?;
    super::steps::check(req.rolling_config.as_ref())?;
    let start = req.start_task.unwrap_or(true);
    // A job created to start later, or rolling (a run after a pause starts from the store),
    // keeps its local files past their uploads.
    let keep_files = !start || req.rolling_config.as_ref().is_some_and(|v| !v.is_null());
    let callback_url = super::submit::callback_url(shared, req.callback_url.as_deref())?;
    let create_time = now_ms();

    let inventory = shared.inventory.current().await?;
    let account_of = |field: &str, id: Option<i64>, alias: Option<&str>| {
        super::submit::requested_account(
            &inventory,
            &scope.inventory,
            id,
            alias,
            super::submit::AccountFields::Named(field),
        )
    };
    let account = account_of(
        "account_id or account_alias",
        req.account_id,
        req.account_alias.as_deref(),
    )?;

    // The sources, each checked and resolved.
    let mut sources = Vec::new();
    let mut locals = Vec::new();
    let mut described = Vec::new();
    // Where in `described` each of `locals` is.
    let mut local_sources = Vec::new();
    let mut paths = 0usize;
    for (i, source) in list.into_iter().enumerate() {
        let field = |name: &str| format!("file_source_list[{i}].{name}");
        let files = source
            .file_list
            .filter(|l| !l.is_empty())
            .ok_or_else(|| ApiError::missing(&field("file_list")))?;
        paths += files.len();
        if paths > MAX_PATHS {
            return Err(ApiError::invalid(
                &field("file_list"),
                format!("more than {MAX_PATHS} paths in all"),
            ));
        }
        match source.file_type.unwrap_or(file_type::SERVER) {
            file_type::SERVER => {
                let mut checked = Vec::with_capacity(files.len());
                for (j, path) in files.iter().enumerate() {
                    checked.push(source_path(&field(&format!("file_list[{j}]")), path)?);
                }
                let wanted = super::execute::wanted_targets(source.server).map_err(|e| {
                    ApiError::new(e.code, format!("{}: {}", field("server"), e.message))
                })?;
                scope::refuse_unseen_hosts(caller, &inventory, &wanted)?;
                let hosts = inventory
                    .resolve(&scope.inventory, &wanted)
                    .map_err(|e| {
                        ApiError::new(i64::from(e.code()), format!("{}: {e}", field("server")))
                    })?
                    .hosts;
                let source_account = source
                    .account
                    .ok_or_else(|| ApiError::missing(&field("account")))?;
                let source_account = account_of(
                    &field("account"),
                    source_account.id,
                    source_account.alias.as_deref(),
                )?;
                described.push(StoredSource {
                    file_type: file_type::SERVER,
                    file_list: checked.clone(),
                    account: Some(source_account.account.clone()),
                    account_id: Some(source_account.id),
                    hosts: Some(hosts.iter().map(|h| h.bk_host_id).collect()),
                    size: None,
                    held: None,
                });
                for h in &hosts {
                    sources.push(SourceSpec {
                        host: file_target(h),
                        account: source_account.account.clone(),
                        paths: checked.clone(),
                    });
                }
            }
            file_type::LOCAL => {
                let content = shared.content.clone();
                for (j, path) in files.iter().enumerate() {
                    let field = field(&format!("file_list[{j}]"));
                    let local = local_file(&content, caller, &scope, &field, path).await?;
                    // Kept (`held`) once every check passed, just before the job is created.
                    local_sources.push(described.len());
                    described.push(StoredSource {
                        file_type: file_type::LOCAL,
                        file_list: vec![path.clone()],
                        account: None,
                        account_id: None,
                        hosts: None,
                        size: Some(local.size),
                        held: None,
                    });
                    locals.push(local);
                }
            }
            file_type::THIRD_PARTY => {
                let named = source
                    .file_source_id
                    .map(|id| id.to_string())
                    .or(source.file_source_code)
                    .unwrap_or_default();
                return Err(ApiError::new(
                    code::NOT_SUPPORTED,
                    format!(
                        "{}: third-party file sources (file_type 3{}) are not supported by fleetrun; \
                         send files from hosts (file_type 1) or upload them (file_type 2)",
                        field("file_type"),
                        if named.is_empty() {
                            String::new()
                        } else {
                            format!(", source {named}")
                        }
                    ),
                ));
            }
            other => {
                return Err(ApiError::invalid(
                    &field("file_type"),
                    format!("{other} is not 1 (server file), 2 (local file) or 3 (third-party)"),
                ));
            }
        }
    }

    let wanted = super::execute::wanted_targets(req.target_server)?;
    let chosen = super::execute::resolve_wanted(caller, &inventory, &scope, &wanted)?;
    let host_ids: Vec<i64> = chosen.iter().map(|h| h.bk_host_id).collect();
    let plan = super::steps::plan(req.rolling_config.as_ref(), &host_ids)?;

    let name = req
        .task_name
        .filter(|n| !n.is_empty())
        .unwrap_or_else(|| format!("API_FAST_TRANSFER_FILE_{create_time}"));
    // Every check passed: the local files are kept as they are now, past their uploads, for a
    // later run to send; if the job is not created after all, the records are removed.
    let held = if keep_files {
        super::held::keep_all(
            shared,
            &caller.username,
            &caller.app_code,
            &scope,
            locals
                .iter()
                .map(|l| (l.name.clone(), l.stored()))
                .collect(),
            create_time,
        )
        .await?
    } else {
        Vec::new()
    };
    for (&at, id) in local_sources.iter().zip(&held) {
        described[at].held = Some(id.clone());
    }
    let described = serde_json::to_string(&StoredTransfer {
        file_target_path: template.clone(),
        file_target_name: target_name.clone(),
        transfer_mode: if strict { 1 } else { 2 },
        download_speed_limit: req.download_speed_limit.unwrap_or(0),
        upload_speed_limit: req.upload_speed_limit.unwrap_or(0),
        file_source_list: described,
    })
    .map_err(|e| ApiError::internal("transfer step", e));
    // The same call as push_config_file's (`api/files.rs`): one function creates both file
    // APIs' jobs, and each names here, field by field, what its own checks produced.
    let created = super::held::create_file_job(
        shared,
        super::held::FileJob {
            name: &name,
            caller,
            scope: &scope,
            start,
            callback_url,
            create_time,
            timeout,
            account,
            hosts: &chosen,
            plan: plan.as_ref(),
        },
        described,
        held,
    )
    .await?;
    let spec = TransferSpec {
        job_instance_id: created.job_instance_id,
        step_instance_id: created.step_instance_id,
        sources,
        locals,
        targets: chosen.iter().map(file_target).collect(),
        account: account.account.clone(),
        target_path: template,
        target_name,
        strict,
        timeout_secs: timeout as u32,
        upload_bytes_per_sec: upload,
        download_bytes_per_sec: download,
        create_time,
        content: shared.content.clone(),
    };
    tracing::info!(
        job = created.job_instance_id,
        sources = spec.sources.len(),
        locals = spec.locals.len(),
        hosts = chosen.len(),
        operator = %caller.username,
        started = start,
        "transfer job accepted"
    );
    super::steps::save_and_start(shared, plan, Work::Files(FileStep::Transfer(spec)), start)
        .await?;
    reply::data(Submitted {
        job_instance_id: created.job_instance_id,
        job_instance_name: name,
        step_instance_id: created.step_instance_id,
    })
}

/// A transfer job created with `start_task=false`, ready to start from what the store keeps, as
/// it would be submitted now: every source host still in the job's scope and visible to the
/// caller, every account still running as the user it ran as, every local file still kept.
pub(super) async fn created_transfer(
    shared: &Shared,
    caller: &Caller,
    job: &fleetrun_store::JobRecord,
    step: &fleetrun_store::StepRecord,
    payload: &[u8],
    targets: &[fleetrun_store::HostResultRecord],
) -> Result<TransferSpec, ApiError> {
    let stored: StoredTransfer = serde_json::from_slice(payload)
        .map_err(|e| ApiError::internal("stored transfer step", e))?;
    let scope = super::steps::stored_scope(job)?;
    let inventory = shared.inventory.current().await?;
    let account = super::steps::stored_account(&inventory, job, step.account_id, &step.account)?;
    let mut sources = Vec::new();
    let mut locals = Vec::new();
    for (i, source) in stored.file_source_list.into_iter().enumerate() {
        let field = |name: &str| format!("file_source_list[{i}].{name}");
        if source.file_type == file_type::LOCAL {
            let (path, held) = source
                .file_list
                .first()
                .zip(source.held.as_deref())
                .ok_or_else(|| {
                    ApiError::internal("stored transfer step", "a local file kept by nothing")
                })?;
            let (record, file) =
                super::held::kept(shared, job, &field("file_list[0]"), held).await?;
            locals.push(stored_local(record.file_name, path, &file)?);
            continue;
        }
        let (Some(account_id), Some(user), Some(host_ids)) =
            (source.account_id, source.account.as_deref(), source.hosts)
        else {
            return Err(ApiError::internal(
                "stored transfer step",
                "a server source without its account or hosts",
            ));
        };
        let source_account = super::steps::stored_account(&inventory, job, account_id, user)
            .map_err(|e| ApiError::new(e.code, format!("{}: {}", field("account"), e.message)))?;
        let wanted = fleetrun_inventory::Targets {
            host_ids: Some(host_ids),
            ..Default::default()
        };
        scope::refuse_unseen_hosts(caller, &inventory, &wanted)?;
        let hosts = inventory
            .resolve(&scope, &wanted)
            .map_err(|e| ApiError::new(i64::from(e.code()), format!("{}: {e}", field("server"))))?
            .hosts;
        for h in &hosts {
            sources.push(SourceSpec {
                host: file_target(h),
                account: source_account.account.clone(),
                paths: source.file_list.clone(),
            });
        }
    }
    Ok(TransferSpec {
        job_instance_id: job.job_instance_id,
        step_instance_id: step.step_instance_id,
        sources,
        locals,
        targets: stored_targets(targets),
        account: account.account.clone(),
        target_path: stored.file_target_path,
        target_name: stored.file_target_name,
        strict: stored.transfer_mode == 1,
        timeout_secs: u32::try_from(step.timeout).unwrap_or(u32::MAX),
        upload_bytes_per_sec: speed_limit("upload_speed_limit", Some(stored.upload_speed_limit))?,
        download_bytes_per_sec: speed_limit(
            "download_speed_limit",
            Some(stored.download_speed_limit),
        )?,
        create_time: job.create_time,
        content: shared.content.clone(),
    })
}

#[derive(Debug, Serialize)]
struct Submitted {
    job_instance_id: i64,
    job_instance_name: String,
    step_instance_id: i64,
}

/// A `file_type` 2 path: an upload of this app, in this scope, whose bytes arrived.
async fn local_file(
    content: &Arc<content::ContentStore>,
    caller: &Caller,
    scope: &scope::Scope,
    field: &str,
    path: &str,
) -> Result<LocalFile, ApiError> {
    let not_found = || {
        ApiError::invalid(
            field,
            format!(
                "{path:?} is not an upload of this app in this scope (or it expired): \
                 use the path generate_local_file_upload_url returned"
            ),
        )
    };
    let id = path.split('/').nth(1).ok_or_else(not_found)?.to_owned();
    let store = content.clone();
    let upload = tokio::task::spawn_blocking(move || store.upload(&id))
        .await
        .map_err(|e| ApiError::internal("content store", e))?
        .ok_or_else(not_found)?;
    if upload.kept
        || upload.app_code != caller.app_code
        || !scope.owns(&upload.scope_type, &upload.scope_id)
        || upload.path() != path
    {
        return Err(not_found());
    }
    let file = upload.file.as_ref().ok_or_else(|| {
        ApiError::invalid(
            field,
            format!(
                "{path:?}: nothing was uploaded there yet; PUT the file to its upload_url first"
            ),
        )
    })?;
    stored_local(upload.file_name.clone(), path, file)
}

/// A local file as a content store record names it: `name`, sent from `path`.
fn stored_local(name: String, path: &str, file: &StoredFile) -> Result<LocalFile, ApiError> {
    let parse = |hex: &str| {
        content::parse_hex(hex).ok_or_else(|| ApiError::internal("upload record", "bad hash"))
    };
    Ok(LocalFile {
        name,
        path: path.to_owned(),
        size: file.size,
        sha256: parse(&file.sha256)?,
        chunks: file
            .chunks
            .iter()
            .map(|c| parse(c))
            .collect::<Result<_, _>>()?,
    })
}

#[derive(Debug, Deserialize)]
struct UploadUrlRequest {
    file_name_list: Option<Vec<String>>,
}

#[derive(Debug, Serialize)]
struct UploadUrl {
    upload_url: String,
    path: String,
}

#[derive(Debug, Serialize)]
struct UploadUrls {
    url_map: std::collections::BTreeMap<String, UploadUrl>,
}

/// `generate_local_file_upload_url`: one upload per file name, bound to the app and scope.
pub async fn generate_local_file_upload_url(
    shared: &Shared,
    caller: &Caller,
    params: &Params,
) -> Result<Value, ApiError> {
    let req: UploadUrlRequest = params.parse()?;
    let scope = scope::resolve(shared, caller, params)?;
    // An upload lands in the content store of the controller it is PUT to, and a transfer
    // reads it from the store of the controller it is submitted to: among several controllers
    // the two need not be the same one.
    if shared.config.cluster.is_some() {
        return Err(ApiError::new(
            code::NOT_SUPPORTED,
            "generate_local_file_upload_url: local files are not served by controllers in a \
             [cluster] (each keeps its uploads on its own disk); send files from a source host \
             (file_type 1)",
        ));
    }
    let names = req
        .file_name_list
        .filter(|l| !l.is_empty())
        .ok_or_else(|| ApiError::missing("file_name_list"))?;
    if names.len() > MAX_UPLOAD_NAMES {
        return Err(ApiError::invalid(
            "file_name_list",
            format!("{} names, at most {MAX_UPLOAD_NAMES}", names.len()),
        ));
    }
    let mut checked = Vec::with_capacity(names.len());
    for (i, name) in names.iter().enumerate() {
        checked.push(file_name_field(&format!("file_name_list[{i}]"), name)?);
    }
    let base = match &shared.config.files.public_url {
        Some(url) => url.trim_end_matches('/').to_owned(),
        None => format!(
            "{}://{}",
            if shared.config.api.tls.is_some() {
                "https"
            } else {
                "http"
            },
            shared.config.http_listen
        ),
    };
    let created_ms = now_ms();
    let ttl_ms =
        i64::try_from(shared.config.files.upload_ttl_secs.saturating_mul(1000)).unwrap_or(i64::MAX);
    let mut url_map = std::collections::BTreeMap::new();
    for name in checked {
        let upload = Upload {
            id: uuid::Uuid::new_v4().to_string(),
            app_code: caller.app_code.clone(),
            scope_type: scope.scope_type.clone(),
            scope_id: scope.scope_id.clone(),
            username: caller.username.clone(),
            file_name: name.clone(),
            created_ms,
            expires_ms: created_ms.saturating_add(ttl_ms),
            file: None,
            kept: false,
        };
        let store = shared.content.clone();
        let saved = upload.clone();
        tokio::task::spawn_blocking(move || store.save_upload(&saved))
            .await
            .map_err(|e| ApiError::internal("content store", e))?
            .map_err(|e| ApiError::internal("content store", e))?;
        url_map.insert(
            name,
            UploadUrl {
                upload_url: format!("{base}/fleetrun/v1/local_file_upload/{}", upload.id),
                path: upload.path(),
            },
        );
    }
    reply::data(UploadUrls { url_map })
}

/// `PUT /fleetrun/v1/local_file_upload/{id}`: the bytes of an upload, with the credentials of
/// the app it was handed to (in the header or the query string; the body is the file). The
/// file is cut into chunks as it arrives, each stored once by its SHA-256; the body is never
/// held whole. A second PUT replaces the first.
pub async fn upload_local_file(
    State(shared): State<Arc<Shared>>,
    axum::Extension(gate): axum::Extension<Arc<super::intake::Gate>>,
    Path(id): Path<String>,
    method: Method,
    headers: HeaderMap,
    RawQuery(query): RawQuery,
    body: Body,
) -> Response {
    let api_request = ApiRequest::begin("local_file_upload");
    let result = api_request
        .run(receive_upload(
            &shared,
            &gate,
            &id,
            &method,
            &headers,
            query.as_deref(),
            body,
        ))
        .await;
    api_request.answer(result)
}

async fn receive_upload(
    shared: &Arc<Shared>,
    gate: &super::intake::Gate,
    id: &str,
    method: &Method,
    headers: &HeaderMap,
    query: Option<&str>,
    body: Body,
) -> Result<Value, ApiError> {
    if method != Method::PUT && method != Method::POST {
        return Err(ApiError::invalid("method", "PUT the file's bytes"));
    }
    let params = Params::from_request(&Method::GET, query, &[])?;
    let caller = super::auth::authenticate(&shared.apps.current(), headers, &params)?;
    refuse_while_unwritable(shared)?;
    // An upload is a request served like any other: it waits for one of the
    // `http_max_requests` turns, and a body that stops arriving is dropped.
    let _turn = gate.take_turn().await;
    let idle = gate.body_timeout();
    let not_found = || {
        ApiError::invalid(
            "upload_url",
            "no such upload for this app (or it expired): ask generate_local_file_upload_url for one",
        )
    };
    let store = shared.content.clone();
    let wanted = id.to_owned();
    let mut upload = tokio::task::spawn_blocking(move || store.upload(&wanted))
        .await
        .map_err(|e| ApiError::internal("content store", e))?
        .ok_or_else(not_found)?;
    // Bound to the app it was handed to: another app's credentials find nothing. A file a job
    // keeps is no upload: nothing replaces it.
    if upload.kept || upload.app_code != caller.app_code {
        return Err(not_found());
    }
    let max = shared.config.files.max_upload_bytes;
    let mut body = body;
    let mut buffer: Vec<u8> = Vec::with_capacity(fleetrun_proto::FILE_CHUNK);
    let mut whole = ring::digest::Context::new(&ring::digest::SHA256);
    let mut chunks = Vec::new();
    let mut size = 0u64;
    loop {
        let Ok(frame) = tokio::time::timeout(idle, body.frame()).await else {
            return Err(ApiError::invalid(
                "body",
                format!(
                    "no bytes of the upload arrived for {} s (limits.http_body_timeout_secs)",
                    idle.as_secs()
                ),
            ));
        };
        let data = match frame {
            None => None,
            Some(Ok(frame)) => match frame.into_data() {
                Ok(data) => Some(data),
                Err(_) => continue,
            },
            Some(Err(e)) => {
                return Err(ApiError::invalid(
                    "body",
                    format!("the upload broke off: {e}"),
                ));
            }
        };
        let last = data.is_none();
        if let Some(data) = data {
            size = size.saturating_add(data.len() as u64);
            if size > max {
                return Err(ApiError::invalid(
                    "body",
                    format!("the file is larger than {max} bytes ([files] max_upload_bytes)"),
                ));
            }
            whole.update(&data);
            let mut rest = &data[..];
            while !rest.is_empty() {
                let room = fleetrun_proto::FILE_CHUNK - buffer.len();
                let (now, later) = rest.split_at(room.min(rest.len()));
                buffer.extend_from_slice(now);
                rest = later;
                if buffer.len() == fleetrun_proto::FILE_CHUNK {
                    chunks.push(store_chunk(shared, std::mem::take(&mut buffer)).await?);
                }
            }
        }
        if last {
            break;
        }
    }
    if !buffer.is_empty() {
        chunks.push(store_chunk(shared, buffer).await?);
    }
    let mut sha256 = [0u8; 32];
    sha256.copy_from_slice(whole.finish().as_ref());
    upload.file = Some(StoredFile {
        size,
        sha256: content::hex(&sha256),
        chunks: chunks.iter().map(content::hex).collect(),
    });
    let store = shared.content.clone();
    let saved = upload.clone();
    tokio::task::spawn_blocking(move || store.save_upload(&saved))
        .await
        .map_err(|e| ApiError::internal("content store", e))?
        .map_err(|e| ApiError::internal("content store", e))?;
    tracing::info!(app = %caller.app_code, upload = %upload.id, size, "local file uploaded");
    Ok(serde_json::json!({
        "path": upload.path(),
        "size": size,
        "sha256": content::hex(&sha256),
    }))
}

async fn store_chunk(shared: &Arc<Shared>, data: Vec<u8>) -> Result<content::Hash, ApiError> {
    let hash = content::sha256(&data);
    let store = shared.content.clone();
    tokio::task::spawn_blocking(move || store.put_chunk(&hash, &data))
        .await
        .map_err(|e| ApiError::internal("content store", e))?
        .map_err(super::held::content_error)?;
    Ok(hash)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn source_paths_are_checked_as_bk_job_defines_them() {
        for good in [
            "/tmp/a.txt",
            "/data/logs/",
            "/tmp/*.log",
            "/tmp/REGEX:[a-z]+\\.txt",
        ] {
            assert!(source_path("f", good).is_ok(), "{good}");
        }
        for bad in [
            "tmp/a",
            "/tmp/../etc/passwd",
            "/",
            "/tmp/*/a",
            "/tmp/REGEX:(",
            "/tmp/a\0",
            "/tmp/..",
        ] {
            assert!(source_path("f", bad).is_err(), "{bad:?}");
        }
        // The agent reads no path deeper than 64 directories: neither does the API accept one.
        // The root is one of the 64 directories.
        let deep = format!("{}/a.txt", "/d".repeat(64));
        let refused = source_path("f", &deep).unwrap_err();
        assert!(
            refused.message.contains("64 directories"),
            "{}",
            refused.message
        );
        assert!(source_path("f", &format!("{}/a.txt", "/d".repeat(63))).is_ok());
        let regex = source_path("f", "/tmp/REGEX:(").unwrap_err();
        assert!(
            regex
                .message
                .starts_with("f: the regular expression does not compile"),
            "{}",
            regex.message
        );
        assert!(speed_limit("s", Some(-1)).is_err());
        assert_eq!(speed_limit("s", Some(2)).unwrap(), 2 << 20);
        assert!(target_path(Some("/data/[DATE:..]/x")).is_err());
        assert!(target_path(Some("relative")).is_err());
    }
}
