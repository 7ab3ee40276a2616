//! `get_job_instance_list` (and its v4 form): jobs by creation time, filters and pages.

use serde::Deserialize;
use serde_json::Value;

use super::{
    ApiError,
    auth::Caller,
    error::code,
    params::{Params, lenient, paging},
    reply, scope,
};
use crate::Shared;

#[derive(Debug, Deserialize)]
struct JobListRequest {
    #[serde(default, deserialize_with = "lenient::opt_int")]
    create_time_start: Option<i64>,
    #[serde(default, deserialize_with = "lenient::opt_int")]
    create_time_end: Option<i64>,
    #[serde(default, deserialize_with = "lenient::opt_int")]
    job_instance_id: Option<i64>,
    operator: Option<String>,
    name: Option<String>,
    #[serde(default, deserialize_with = "lenient::opt_int")]
    launch_mode: Option<i64>,
    #[serde(default, deserialize_with = "lenient::opt_int", rename = "type")]
    job_type: Option<i64>,
    #[serde(default, deserialize_with = "lenient::opt_int")]
    status: Option<i64>,
    ip: Option<String>,
    #[serde(default, deserialize_with = "lenient::opt_int")]
    job_cron_id: Option<i64>,
    /// v4's name for `start`.
    #[serde(default, deserialize_with = "lenient::opt_int")]
    offset: Option<i64>,
    #[serde(default, deserialize_with = "lenient::opt_int")]
    start: Option<i64>,
    #[serde(default, deserialize_with = "lenient::opt_int")]
    length: Option<i64>,
}

const THIRTY_DAYS_MS: i64 = 30 * 24 * 3600 * 1000;

fn small_enum(field: &str, value: Option<i64>, allowed: &[i64]) -> Result<Option<i32>, ApiError> {
    match value {
        None => Ok(None),
        Some(v) if allowed.contains(&v) => Ok(Some(v as i32)),
        Some(v) => Err(ApiError::invalid(
            field,
            format!("{v} is not one of {allowed:?}"),
        )),
    }
}

/// A job's type as `get_job_instance_list` filters it: bk-job refuses an unknown one with
/// ILLEGAL_PARAM.
fn job_type_filter(value: Option<i64>) -> Result<Option<i32>, ApiError> {
    small_enum("type", value, &[0, 1, 2]).map_err(|e| ApiError::new(code::ILLEGAL_PARAM, e.message))
}

/// `get_job_instance_list`: the scope's jobs created in a window of at most 30 days.
pub async fn get_job_instance_list(
    shared: &Shared,
    caller: &Caller,
    params: &Params,
) -> Result<Value, ApiError> {
    let scope = scope::resolve(shared, caller, params)?;
    let req: JobListRequest = params.parse()?;
    let window = job_list_window(req.create_time_start, req.create_time_end)?;
    let (start, length) = paging(req.start, req.length)?;
    let (total, data) = job_list(shared, &scope, &req, window, start, length).await?;
    reply::data(reply::Page {
        start,
        length,
        total,
        data,
    })
}

/// bk-job's checks of the job list's window, in its order and with its codes: each time present
/// and after 1970, the end after the start, the window at most 30 days.
fn job_list_window(start: Option<i64>, end: Option<i64>) -> Result<(i64, i64), ApiError> {
    let time = |field: &str, value: Option<i64>| match value {
        Some(t) if t >= 1 => Ok(t),
        Some(t) => Err(ApiError::new(
            code::MISSING_OR_ILLEGAL_PARAM,
            format!("{field}: {t} is not a time (milliseconds since 1970, at least 1)"),
        )),
        None => Err(ApiError::new(
            code::MISSING_OR_ILLEGAL_PARAM,
            format!("{field} is required"),
        )),
    };
    let begin = time("create_time_start", start)?;
    let end = time("create_time_end", end)?;
    // Both are at least 1, so the difference cannot overflow.
    let period = end - begin;
    if period <= 0 {
        return Err(ApiError::new(
            code::MISSING_OR_ILLEGAL_PARAM,
            "create_time_start|create_time_end: the end must be after the start",
        ));
    }
    if period > THIRTY_DAYS_MS {
        return Err(ApiError::new(
            code::ILLEGAL_PARAM,
            "create_time_start|create_time_end: the time range is longer than 30 days",
        ));
    }
    Ok((begin, end))
}

/// The scope's jobs a list request asks for, newest first, and how many there are.
async fn job_list(
    shared: &Shared,
    scope: &scope::Scope,
    req: &JobListRequest,
    (begin, end): (i64, i64),
    start: i64,
    length: i64,
) -> Result<(i64, Vec<reply::JobListItem>), ApiError> {
    let launch_mode = small_enum("launch_mode", req.launch_mode, &[1, 2, 3])?;
    let job_type = job_type_filter(req.job_type)?;
    let job_status = small_enum(
        "status",
        req.status,
        &[1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11, 13, 14, 15],
    )?;
    // A job instance id names one job: bk-job then ignores every other filter.
    if let Some(id) = req.job_instance_id {
        let found: Vec<reply::JobListItem> = shared
            .store
            .job(id)
            .await?
            .filter(|job| scope.owns(&job.bk_scope_type, &job.bk_scope_id))
            .iter()
            .map(reply::job_list_item)
            .collect();
        let total = found.len() as i64;
        return Ok((total, found.into_iter().skip(start as usize).collect()));
    }
    // Jobs of a cron job: fleetrun has no cron jobs, so none match.
    if req.job_cron_id.is_some() {
        return Ok((0, Vec::new()));
    }
    let filter = fleetrun_store::JobFilter {
        bk_scope_type: scope.scope_type.clone(),
        bk_scope_id: scope.scope_id.clone(),
        create_time_start: begin,
        create_time_end: end,
        job_instance_id: None,
        operator: req.operator.clone().filter(|o| !o.is_empty()),
        name: req.name.clone().filter(|n| !n.is_empty()),
        launch_mode,
        job_type,
        status: job_status,
        ip: req.ip.clone().filter(|ip| !ip.is_empty()),
        start,
        length,
    };
    let (total, jobs) = shared.store.list_jobs(&filter).await?;
    Ok((total, jobs.iter().map(reply::job_list_item).collect()))
}

/// `get_job_instance_list` in v4: `offset` (at most 10,000) and `length` (1–200, default 10)
/// in place of `start`, and the items under `job_instance_list`.
pub(super) async fn job_list_v4(
    shared: &Shared,
    caller: &Caller,
    params: &Params,
) -> Result<Vec<reply::JobListItem>, ApiError> {
    let scope = scope::resolve(shared, caller, params)?;
    let req: JobListRequest = params.parse()?;
    let window = job_list_window(req.create_time_start, req.create_time_end)?;
    let offset = req.offset.unwrap_or(0);
    if !(0..=V4_MAX_OFFSET).contains(&offset) {
        return Err(ApiError::invalid(
            "offset",
            format!("{offset} is outside [0, {V4_MAX_OFFSET}]"),
        ));
    }
    let length = req.length.unwrap_or(V4_DEFAULT_LENGTH);
    if !(1..=V4_MAX_LENGTH).contains(&length) {
        return Err(ApiError::invalid(
            "length",
            format!("{length} is outside [1, {V4_MAX_LENGTH}]"),
        ));
    }
    Ok(job_list(shared, &scope, &req, window, offset, length)
        .await?
        .1)
}

const V4_MAX_OFFSET: i64 = 10_000;
const V4_MAX_LENGTH: i64 = 200;
const V4_DEFAULT_LENGTH: i64 = 10;
