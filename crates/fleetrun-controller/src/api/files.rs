//! `push_config_file`: files given inline (base64) written as the account into
//! `file_target_path` on every target host, by the engine's file task.

use std::sync::Arc;

use base64::Engine as _;
use serde::Deserialize;
use serde_json::Value;

use super::{
    ApiError,
    auth::Caller,
    execute::{TargetServer, refuse_while_unwritable},
    params::{Params, lenient},
    reply, scope,
};
use crate::{
    Shared,
    engine::{FileJobSpec, FileStep, FileTarget, StepFile, Work},
    now_ms,
};

/// Most files in one request.
const MAX_FILES: usize = 100;
/// Most bytes of all files of one request, decoded: they travel in one frame to each host.
pub const MAX_CONFIG_BYTES: usize = 8 * 1024 * 1024;
/// The mode a configuration file gets unless the request says otherwise.
const DEFAULT_MODE: u32 = 0o644;

#[derive(Debug, Deserialize)]
struct Request {
    task_name: Option<String>,
    account_alias: Option<String>,
    #[serde(default, deserialize_with = "lenient::opt_int")]
    account_id: Option<i64>,
    file_target_path: Option<String>,
    file_list: Option<Vec<ConfigFile>>,
    target_server: Option<TargetServer>,
    #[serde(default, deserialize_with = "lenient::opt_int")]
    timeout: Option<i64>,
    #[serde(default, deserialize_with = "lenient::opt_int")]
    transfer_mode: Option<i64>,
    callback_url: Option<String>,
    #[serde(default, deserialize_with = "lenient::opt_bool")]
    start_task: Option<bool>,
    rolling_config: Option<Value>,
}

#[derive(Debug, Deserialize)]
struct ConfigFile {
    file_name: Option<String>,
    content: Option<String>,
    /// fleetrun's: the permission bits, as an octal string (`"0600"`) or a number.
    mode: Option<Value>,
}

/// Reads `mode` as octal text or a number, at most `0o777`.
fn file_mode(field: &str, value: Option<&Value>) -> Result<u32, ApiError> {
    let mode = match value {
        None | Some(Value::Null) => return Ok(DEFAULT_MODE),
        Some(Value::String(text)) => u32::from_str_radix(text.trim(), 8)
            .map_err(|_| ApiError::invalid(field, format!("{text:?} is not an octal mode")))?,
        Some(Value::Number(n)) => n
            .as_u64()
            .and_then(|n| u32::try_from(n).ok())
            .ok_or_else(|| ApiError::invalid(field, format!("{n} is not a mode")))?,
        Some(other) => {
            return Err(ApiError::invalid(field, format!("{other} is not a mode")));
        }
    };
    if mode > 0o777 {
        return Err(ApiError::invalid(
            field,
            format!("{mode:o} has bits above 0777 (setuid, setgid and sticky are not set)"),
        ));
    }
    Ok(mode)
}

/// Checks a target directory as the agent will: absolute, no `.`/`..`, no control character.
pub(super) fn target_dir(field: &str, path: Option<&str>) -> Result<String, ApiError> {
    let path = path
        .map(str::trim)
        .filter(|p| !p.is_empty())
        .ok_or_else(|| ApiError::missing(field))?;
    if !path.starts_with('/') {
        return Err(ApiError::invalid(
            field,
            format!("{path:?} is not an absolute path"),
        ));
    }
    if path.chars().any(is_control) || path.len() > 4096 {
        return Err(ApiError::invalid(
            field,
            "contains a control character (NUL, newline, ...) or is longer than 4096 bytes",
        ));
    }
    if path.split('/').any(|part| part == "." || part == "..") {
        return Err(ApiError::invalid(
            field,
            format!("{path:?} contains . or .. components"),
        ));
    }
    if path.split('/').filter(|p| !p.is_empty()).count() > 64 {
        return Err(ApiError::invalid(field, "more than 64 directories deep"));
    }
    Ok(path.to_owned())
}

/// C0 controls and DEL: in a file name or a directory they would forge lines in the file logs.
fn is_control(c: char) -> bool {
    c < ' ' || c == '\u{7f}'
}

/// Whether `name` is a plain file name, as the agent requires.
fn file_name(field: &str, name: Option<&str>) -> Result<String, ApiError> {
    let name = name.ok_or_else(|| ApiError::missing(field))?;
    if name.is_empty()
        || name == "."
        || name == ".."
        || name.contains('/')
        || name.chars().any(is_control)
        || name.len() > 255
    {
        return Err(ApiError::invalid(
            field,
            format!(
                "{name:?} is not a plain file name (one path component, no /, no control character, not . or .., at most 255 bytes)"
            ),
        ));
    }
    Ok(name.to_owned())
}

pub async fn push_config_file(
    shared: &Shared,
    caller: &Caller,
    params: &Params,
) -> Result<Value, ApiError> {
    let req: Request = params.parse()?;
    let scope = scope::resolve(shared, caller, params)?;
    refuse_while_unwritable(shared)?;

    let dir = target_dir("file_target_path", req.file_target_path.as_deref())?;
    let list = req
        .file_list
        .filter(|l| !l.is_empty())
        .ok_or_else(|| ApiError::missing("file_list"))?;
    if list.len() > MAX_FILES {
        return Err(ApiError::invalid(
            "file_list",
            format!("{} files, at most {MAX_FILES}", list.len()),
        ));
    }
    let mut files = Vec::with_capacity(list.len());
    let mut total = 0usize;
    for (i, file) in list.into_iter().enumerate() {
        let name = file_name(
            &format!("file_list[{i}].file_name"),
            file.file_name.as_deref(),
        )?;
        if files.iter().any(|f: &StepFile| f.name == name) {
            return Err(ApiError::invalid(
                &format!("file_list[{i}].file_name"),
                format!("{name:?} appears twice"),
            ));
        }
        let field = format!("file_list[{i}].content");
        let content = file.content.ok_or_else(|| ApiError::missing(&field))?;
        // Refused before decoding: base64 is 4/3 of the bytes it carries.
        // The running total counts: each file alone under the limit could still decode to many
        // times it together.
        if total.saturating_add(content.len() / 4 * 3) > MAX_CONFIG_BYTES + 3 {
            return Err(ApiError::invalid(
                &field,
                format!("the files are larger than {MAX_CONFIG_BYTES} bytes decoded in all"),
            ));
        }
        let bytes = base64::engine::general_purpose::STANDARD
            .decode(content.trim())
            .map_err(|e| ApiError::invalid(&field, format!("not valid base64: {e}")))?;
        total = total.saturating_add(bytes.len());
        if total > MAX_CONFIG_BYTES {
            return Err(ApiError::invalid(
                &field,
                format!("the files are larger than {MAX_CONFIG_BYTES} bytes decoded in all"),
            ));
        }
        let mode = file_mode(&format!("file_list[{i}].mode"), file.mode.as_ref())?;
        let digest = ring::digest::digest(&ring::digest::SHA256, &bytes);
        let mut sha256 = [0u8; 32];
        sha256.copy_from_slice(digest.as_ref());
        files.push(StepFile {
            src_path: name.clone(),
            name,
            mode,
            sha256,
            content: Arc::new(bytes),
        });
    }
    let strict = strict_mode(req.transfer_mode)?;
    let timeout = super::submit::step_timeout(req.timeout)?;
    super::submit::check_task_name(req.task_name.as_deref())?;
    super::steps::check(req.rolling_config.as_ref())?;
    let start = req.start_task.unwrap_or(true);
    // A job created to start later, or rolling (a run after a pause starts from the store),
    // keeps its files' contents for that run.
    let rolls = req.rolling_config.as_ref().is_some_and(|v| !v.is_null());
    if rolls {
        super::held::refuse_in_cluster(shared, "rolling_config")?;
    }
    if !start {
        super::held::refuse_in_cluster(shared, "start_task")?;
    }
    let keep_files = !start || rolls;
    let callback_url = super::submit::callback_url(shared, req.callback_url.as_deref())?;

    let inventory = shared.inventory.current().await?;
    let account = super::submit::requested_account(
        &inventory,
        &scope.inventory,
        req.account_id,
        req.account_alias.as_deref(),
        super::submit::AccountFields::IdOrAlias,
    )?;

    let wanted = super::execute::wanted_targets(req.target_server)?;
    let chosen = super::execute::resolve_wanted(caller, &inventory, &scope, &wanted)?;
    let host_ids: Vec<i64> = chosen.iter().map(|h| h.bk_host_id).collect();
    let plan = super::steps::plan(req.rolling_config.as_ref(), &host_ids)?;

    let create_time = now_ms();
    let name = req
        .task_name
        .filter(|n| !n.is_empty())
        .unwrap_or_else(|| format!("API_PUSH_CONFIG_FILE_{create_time}"));
    // The step keeps the list of files (names and sizes), never their contents: a job that
    // starts later or rolls keeps those in the content store, and the step names where. Every
    // check passed: kept now, just before the job is created, and removed if it is not.
    let mut to_keep = Vec::new();
    if keep_files {
        for file in &files {
            let store = shared.content.clone();
            let content = file.content.clone();
            let kept = tokio::task::spawn_blocking(move || store.put_file(&content))
                .await
                .map_err(|e| ApiError::internal("content store", e))?
                .map_err(super::held::content_error)?;
            to_keep.push((file.name.clone(), kept));
        }
    }
    let held = super::held::keep_all(
        shared,
        &caller.username,
        &caller.app_code,
        &scope,
        to_keep,
        create_time,
    )
    .await?;
    let mut held_ids = held.iter().cloned().map(Some);
    let stored_files: Vec<StoredPushFile> = files
        .iter()
        .map(|file| StoredPushFile {
            file_name: file.name.clone(),
            size: file.content.len(),
            mode: format!("{:04o}", file.mode),
            held: held_ids.next().flatten(),
        })
        .collect();
    let described = serde_json::to_string(&StoredPush {
        file_target_path: dir.clone(),
        transfer_mode: if strict { 1 } else { 2 },
        files: stored_files,
    })
    .map_err(|e| ApiError::internal("file step", e));
    // The same call as fast_transfer_file's (`api/transfer.rs`): one function creates both file
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
    let spec = FileJobSpec {
        job_instance_id: created.job_instance_id,
        step_instance_id: created.step_instance_id,
        hosts: chosen.iter().map(file_target).collect(),
        account: account.account.clone(),
        target_dir: dir,
        strict,
        timeout_secs: timeout as u32,
        files,
    };
    super::steps::save_and_start(shared, plan, Work::Files(FileStep::Push(spec)), start).await?;
    tracing::info!(
        job = created.job_instance_id,
        hosts = chosen.len(),
        operator = %caller.username,
        started = start,
        "file job accepted"
    );
    reply::data(Submitted {
        job_instance_id: created.job_instance_id,
        job_instance_name: name,
        step_instance_id: created.step_instance_id,
    })
}

/// A `push_config_file` step as the store keeps it (the step's payload): names, sizes and modes,
/// and for a job created with `start_task=false` the id of the record that keeps each file's
/// contents for it ([`super::held`]).
#[derive(Debug, serde::Serialize, Deserialize)]
struct StoredPush {
    file_target_path: String,
    #[serde(default = "force_mode")]
    transfer_mode: i64,
    files: Vec<StoredPushFile>,
}

fn force_mode() -> i64 {
    2
}

#[derive(Debug, serde::Serialize, Deserialize)]
struct StoredPushFile {
    file_name: String,
    size: usize,
    mode: String,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    held: Option<String>,
}

/// Whether a file step's stored payload is a `push_config_file` one (not a transfer).
pub(super) fn is_push(payload: &[u8]) -> bool {
    serde_json::from_slice::<StoredPush>(payload).is_ok()
}

/// A `push_config_file` job created with `start_task=false`, ready to start from what the store
/// keeps: its account still running as the user it ran as, every file still kept, each read
/// back checked against the SHA-256 it was kept under.
pub(super) async fn created_push(
    shared: &Shared,
    job: &fleetrun_store::JobRecord,
    step: &fleetrun_store::StepRecord,
    payload: &[u8],
    targets: &[fleetrun_store::HostResultRecord],
) -> Result<FileJobSpec, ApiError> {
    let stored: StoredPush =
        serde_json::from_slice(payload).map_err(|e| ApiError::internal("stored file step", e))?;
    let inventory = shared.inventory.current().await?;
    let account = super::steps::stored_account(&inventory, job, step.account_id, &step.account)?;
    let mut files = Vec::with_capacity(stored.files.len());
    for (i, file) in stored.files.into_iter().enumerate() {
        let field = format!("file_list[{i}].content");
        let held = file
            .held
            .as_deref()
            .ok_or_else(|| ApiError::internal("stored file step", "a file kept by nothing"))?;
        let (_, kept) = super::held::kept(shared, job, &field, held).await?;
        let store = shared.content.clone();
        let content =
            tokio::task::spawn_blocking(move || store.read_file(&kept, MAX_CONFIG_BYTES as u64))
                .await
                .map_err(|e| ApiError::internal("content store", e))?
                .map_err(|e| ApiError::internal("kept file", e))?;
        files.push(StepFile {
            src_path: file.file_name.clone(),
            name: file.file_name,
            mode: u32::from_str_radix(&file.mode, 8)
                .map_err(|e| ApiError::internal("stored file step", e))?,
            sha256: crate::content::sha256(&content),
            content: Arc::new(content),
        });
    }
    Ok(FileJobSpec {
        job_instance_id: job.job_instance_id,
        step_instance_id: step.step_instance_id,
        hosts: stored_targets(targets),
        account: account.account.clone(),
        target_dir: stored.file_target_path,
        strict: stored.transfer_mode == 1,
        timeout_secs: u32::try_from(step.timeout).unwrap_or(u32::MAX),
        files,
    })
}

/// Whether a file step's `transfer_mode` asks for bk-job's strict mode (1) rather than force
/// (2, the default).
pub(super) fn strict_mode(transfer_mode: Option<i64>) -> Result<bool, ApiError> {
    match transfer_mode.unwrap_or(2) {
        1 => Ok(true),
        2 => Ok(false),
        other => Err(ApiError::invalid(
            "transfer_mode",
            format!("{other} is not 1 (strict) or 2 (force)"),
        )),
    }
}

/// A host a file step targets (or reads from), as the inventory resolved it.
pub(super) fn file_target(host: &fleetrun_inventory::ResolvedHost) -> FileTarget {
    FileTarget {
        bk_host_id: host.bk_host_id,
        bk_cloud_id: host.bk_cloud_id,
        ip: host.ip.to_canonical().to_string(),
    }
}

/// A stored file step's targets, as its host results name them.
pub(super) fn stored_targets(results: &[fleetrun_store::HostResultRecord]) -> Vec<FileTarget> {
    results
        .iter()
        .map(|h| FileTarget {
            bk_host_id: h.bk_host_id,
            bk_cloud_id: h.bk_cloud_id,
            ip: h.ip.clone(),
        })
        .collect()
}

/// bk-job's step type of a file step.
pub const STEP_TYPE_FILE: i32 = 2;

/// `push_config_file`'s `data`.
#[derive(Debug, serde::Serialize)]
struct Submitted {
    job_instance_id: i64,
    job_instance_name: String,
    step_instance_id: i64,
}

/// Whether the step is a file step (its logs are file logs, `log_type` 2).
pub(super) async fn is_file_step(
    shared: &Shared,
    job_instance_id: i64,
    step_instance_id: i64,
) -> Result<bool, ApiError> {
    Ok(shared.store.job(job_instance_id).await?.is_some_and(|job| {
        job.steps
            .iter()
            .any(|s| s.step_instance_id == step_instance_id && s.step_type == STEP_TYPE_FILE)
    }))
}

/// A host's file logs in a step, as bk-job returns them.
pub(super) async fn file_logs(
    shared: &Shared,
    step_instance_id: i64,
    result: &fleetrun_store::HostResultRecord,
) -> Result<Vec<reply::FileLog>, ApiError> {
    // The sources' upload logs come first, as bk-job lists them beside each target's downloads.
    let mut logs = shared.store.upload_logs(step_instance_id).await?;
    logs.extend(
        shared
            .store
            .file_logs(step_instance_id, result.bk_host_id)
            .await?
            .into_iter()
            .filter(|log| log.mode != crate::engine::MODE_UPLOAD),
    );
    Ok(logs
        .into_iter()
        .map(|log| reply::FileLog {
            mode: log.mode,
            src_ip: reply::FileLogHost {
                bk_host_id: log.src_host_id,
                bk_cloud_id: log.src_cloud_id,
                ip: log.src_ip,
            },
            src_path: log.src_path,
            dest_ip: (log.mode == crate::engine::MODE_DOWNLOAD).then(|| reply::FileLogHost {
                bk_host_id: result.bk_host_id,
                bk_cloud_id: result.bk_cloud_id,
                ip: result.ip.clone(),
            }),
            dest_path: (log.mode == crate::engine::MODE_DOWNLOAD).then_some(log.dest_path),
            status: log.status,
            log_content: log.log_content,
            size: crate::engine::human_size(log.size),
            speed: crate::engine::human_speed(log.speed),
            process: format!("{}%", log.progress),
        })
        .collect())
}
