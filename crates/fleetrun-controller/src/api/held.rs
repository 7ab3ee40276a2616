//! Files a file job keeps for a run after its submit (a job created with `start_task=false`, or
//! one that rolls and goes on after a pause): a local upload (`fast_transfer_file`'s
//! `file_type` 2) or an inline configuration file (`push_config_file`).
//!
//! Each is kept as a record of its own in the content store (an [`Upload`] under a new id, bound
//! to the job's app and scope), naming the chunks the file was made of when the job was
//! accepted: the sweep keeps a live record's chunks, and a new PUT to the upload URL the job
//! named does not change what the job sends. A record lives `[files] upload_ttl_secs` from the
//! job's creation, as long as an upload does; a job started (or a rolling job going on) after
//! that is refused, naming the field that gave the file, and must be submitted again. The step
//! stores the record's id, never the file's bytes.

use crate::{
    Shared,
    content::{StoredFile, Upload},
};

use super::{ApiError, error::code, scope};

/// Refuses `field` (`start_task=false`, `rolling_config`) where files cannot be kept for a
/// later run: the controllers of a `[cluster]` each keep their own content store, and the start
/// (or the batch after a pause) may come to another one.
pub(super) fn refuse_in_cluster(shared: &Shared, field: &str) -> Result<(), ApiError> {
    if shared.config.cluster.is_some() {
        return Err(ApiError::new(
            code::NOT_SUPPORTED,
            format!(
                "{field}: a push_config_file job that starts later or rolls keeps its files in \
                 the content store of the controller that accepted it, and controllers in a \
                 [cluster] each have their own; submit it without {field}"
            ),
        ));
    }
    Ok(())
}

/// The error a request that stores bytes in the content store answers: a full store says so
/// (its bound is the operator's to raise), anything else is internal.
pub(super) fn content_error(e: crate::content::ContentError) -> ApiError {
    match e {
        crate::content::ContentError::Full { .. } => ApiError::new(code::INTERNAL, e.to_string()),
        other => ApiError::internal("content store", other),
    }
}

/// Keeps `file` (already in the content store) for a job being created, as `file_name`;
/// returns the record's id, for the step to name.
async fn keep(
    shared: &Shared,
    username: &str,
    app_code: &str,
    scope: &scope::Scope,
    file_name: &str,
    file: StoredFile,
    created_ms: i64,
) -> Result<String, ApiError> {
    let ttl_ms =
        i64::try_from(shared.config.files.upload_ttl_secs.saturating_mul(1000)).unwrap_or(i64::MAX);
    let record = Upload {
        id: uuid::Uuid::new_v4().to_string(),
        app_code: app_code.to_owned(),
        scope_type: scope.scope_type.clone(),
        scope_id: scope.scope_id.clone(),
        username: username.to_owned(),
        file_name: file_name.to_owned(),
        created_ms,
        expires_ms: created_ms.saturating_add(ttl_ms),
        file: Some(file),
        kept: true,
    };
    let id = record.id.clone();
    let store = shared.content.clone();
    tokio::task::spawn_blocking(move || store.save_upload(&record))
        .await
        .map_err(|e| ApiError::internal("content store", e))?
        .map_err(|e| ApiError::internal("content store", e))?;
    Ok(id)
}

/// Keeps each of `files` (name, file already in the content store) for a job about to be
/// created, in order; returns the records' ids. Called once every check of the request passed,
/// just before the job is created: if one cannot be kept, those kept before it are removed.
pub(super) async fn keep_all(
    shared: &Shared,
    username: &str,
    app_code: &str,
    scope: &scope::Scope,
    files: Vec<(String, StoredFile)>,
    created_ms: i64,
) -> Result<Vec<String>, ApiError> {
    let mut ids = Vec::with_capacity(files.len());
    for (name, file) in files {
        match keep(shared, username, app_code, scope, &name, file, created_ms).await {
            Ok(id) => ids.push(id),
            Err(e) => {
                release(shared, ids).await;
                return Err(e);
            }
        }
    }
    Ok(ids)
}

/// Removes the records kept for a job that was then not created, so a refused submit leaves
/// nothing kept behind it (nor keeps its chunks from the sweep).
pub(super) async fn release(shared: &Shared, ids: Vec<String>) {
    if ids.is_empty() {
        return;
    }
    let store = shared.content.clone();
    let removed = tokio::task::spawn_blocking(move || {
        ids.iter()
            .map(|id| store.remove_upload(id).map_err(|e| format!("{id}: {e}")))
            .filter_map(Result::err)
            .collect::<Vec<_>>()
    })
    .await;
    match removed {
        Ok(failed) if failed.is_empty() => {}
        Ok(failed) => tracing::warn!(
            ?failed,
            "cannot remove kept files of a job not created; they expire with upload_ttl_secs"
        ),
        Err(e) => tracing::warn!("cannot remove kept files of a job not created: {e}"),
    }
}

/// The file a created job kept under `id`, as it was kept; refused, naming `field`, once its
/// record expired (or if it is not the job's).
pub(super) async fn kept(
    shared: &Shared,
    job: &fleetrun_store::JobRecord,
    field: &str,
    id: &str,
) -> Result<(Upload, StoredFile), ApiError> {
    let store = shared.content.clone();
    let wanted = id.to_owned();
    let record = tokio::task::spawn_blocking(move || store.upload(&wanted))
        .await
        .map_err(|e| ApiError::internal("content store", e))?;
    let expired = || {
        let ttl = shared.config.files.upload_ttl_secs;
        ApiError::invalid(
            field,
            format!(
                "job {} kept this file for {ttl} s from its creation ([files] upload_ttl_secs) \
                 and it is no longer kept; submit the job again",
                job.job_instance_id
            ),
        )
    };
    let record = record
        .filter(|r| {
            r.kept
                && r.app_code == job.app_code
                && r.scope_type == job.bk_scope_type
                && r.scope_id == job.bk_scope_id
        })
        .ok_or_else(expired)?;
    let file = record.file.clone().ok_or_else(expired)?;
    // The record alone is not the file: a chunk gone from the store (removed by hand, or a
    // store moved without them) is refused here rather than failing every target's fetch.
    let hashes = file
        .chunks
        .iter()
        .map(|c| crate::content::parse_hex(c))
        .collect::<Option<Vec<_>>>()
        .ok_or_else(|| ApiError::internal("kept file", "a chunk not named by its SHA-256"))?;
    let store = shared.content.clone();
    let missing = tokio::task::spawn_blocking(move || store.first_missing(hashes.iter()))
        .await
        .map_err(|e| ApiError::internal("content store", e))?;
    if let Some(hash) = missing {
        return Err(ApiError::invalid(
            field,
            format!(
                "job {} kept this file, but its chunk {} is no longer in the controller's \
                 content store; submit the job again",
                job.job_instance_id,
                crate::content::hex(&hash)
            ),
        ));
    }
    Ok((record, file))
}

/// A file step's job, every check of its request passed, ready to be stored.
pub(super) struct FileJob<'a> {
    pub name: &'a str,
    pub caller: &'a super::auth::Caller,
    pub scope: &'a scope::Scope,
    /// Started now, or created pending (1) until `operate_job_instance` starts it.
    pub start: bool,
    pub callback_url: Option<String>,
    pub create_time: i64,
    pub timeout: i64,
    pub account: &'a fleetrun_inventory::Account,
    pub hosts: &'a [fleetrun_inventory::ResolvedHost],
    pub plan: Option<&'a super::steps::Plan>,
}

/// Stores `job` with its step described by `described` (the step's JSON, or why it could not
/// be made); the records kept for it (`held`) are removed when it is not created.
pub(super) async fn create_file_job(
    shared: &Shared,
    job: FileJob<'_>,
    described: Result<String, ApiError>,
    held: Vec<String>,
) -> Result<fleetrun_store::CreatedJob, ApiError> {
    let created = async {
        let new_job = fleetrun_store::NewJob {
            name: job.name.to_owned(),
            operator: job.caller.username.clone(),
            app_code: job.caller.app_code.clone(),
            bk_scope_type: job.scope.scope_type.clone(),
            bk_scope_id: job.scope.scope_id.clone(),
            status: if job.start {
                crate::status::job::RUNNING
            } else {
                crate::status::job::PENDING
            },
            job_type: 1,
            launch_mode: 2,
            callback_url: job.callback_url,
            create_time: job.create_time,
            step: fleetrun_store::NewStep {
                name: job.name.to_owned(),
                step_type: super::files::STEP_TYPE_FILE,
                script_language: 0,
                script_content: described?.into_bytes(),
                script_param: String::new(),
                is_param_sensitive: false,
                timeout: job.timeout,
                account_id: job.account.id,
                account: job.account.account.clone(),
            },
            hosts: job
                .hosts
                .iter()
                .map(|h| fleetrun_store::NewHostResult {
                    bk_host_id: h.bk_host_id,
                    bk_cloud_id: h.bk_cloud_id,
                    ip: h.ip.to_canonical().to_string(),
                    status: crate::status::host::WAITING,
                })
                .collect(),
        };
        let rolling = job.plan.map(super::steps::Plan::stored).transpose()?;
        Ok::<_, ApiError>(
            shared
                .store
                .create_job_sealing(&new_job, shared.cipher.sealer(), rolling.as_ref())
                .await?,
        )
    }
    .await;
    if created.is_err() {
        release(shared, held).await;
    }
    created
}
