//! `get_audit_log` and `verify_audit_log`: the audit trail read and checked, by admin apps only.

use serde::Deserialize;
use serde_json::{Value, json};

use super::{
    ApiError,
    auth::Caller,
    error::code,
    params::{Params, lenient},
};
use crate::Shared;

/// Most entries one call returns.
const MAX_LIMIT: i64 = 1000;

fn require_admin(caller: &Caller, what: &str) -> Result<(), ApiError> {
    if caller.is_admin() {
        return Ok(());
    }
    Err(ApiError::new(
        code::NO_PERMISSION,
        format!(
            "app {:?} may not {what}: it is not granted admin",
            caller.app_code
        ),
    ))
}

#[derive(Debug, Deserialize)]
struct GetAuditLog {
    #[serde(default, deserialize_with = "lenient::opt_int")]
    after_seq: Option<i64>,
    #[serde(default, deserialize_with = "lenient::opt_int")]
    start_time: Option<i64>,
    #[serde(default, deserialize_with = "lenient::opt_int")]
    end_time: Option<i64>,
    app_code: Option<String>,
    operator: Option<String>,
    api: Option<String>,
    /// "ok" or "refused".
    outcome: Option<String>,
    #[serde(default, deserialize_with = "lenient::opt_int")]
    limit: Option<i64>,
}

pub async fn get_audit_log(
    shared: &Shared,
    caller: &Caller,
    params: &Params,
) -> Result<Value, ApiError> {
    require_admin(caller, "read the audit log")?;
    let req: GetAuditLog = params.parse()?;
    let limit = req.limit.unwrap_or(100);
    if !(1..=MAX_LIMIT).contains(&limit) {
        return Err(ApiError::invalid(
            "limit",
            format!("{limit} is not between 1 and {MAX_LIMIT}"),
        ));
    }
    if let Some(after) = req.after_seq
        && after < 0
    {
        return Err(ApiError::invalid("after_seq", "must not be negative"));
    }
    if let (Some(start), Some(end)) = (req.start_time, req.end_time)
        && start > end
    {
        return Err(ApiError::invalid("end_time", "is before start_time"));
    }
    let succeeded = match req.outcome.as_deref() {
        None => None,
        Some("ok") => Some(true),
        Some("refused") => Some(false),
        Some(other) => {
            return Err(ApiError::invalid(
                "outcome",
                format!(
                    "{:?} is neither \"ok\" nor \"refused\"",
                    other.escape_debug()
                ),
            ));
        }
    };
    // Read your writes: what was queued before this call is in the database first.
    shared.audit.flush().await;
    let entries = shared
        .store
        .audit_entries(&fleetrun_store::AuditFilter {
            after_seq: req.after_seq,
            since: req.start_time,
            until: req.end_time,
            app_code: req.app_code,
            operator: req.operator,
            api: req.api,
            succeeded,
            limit,
        })
        .await
        .map_err(|e| ApiError::internal("reading the audit log", e))?;
    let next = entries.last().map(|e| e.seq);
    let list: Vec<Value> = entries
        .into_iter()
        .map(|e| {
            // The change was recorded as JSON; shown as such, or as text if it is not.
            let change = serde_json::from_str::<Value>(&e.entry.change)
                .unwrap_or(Value::String(e.entry.change));
            json!({
                "seq": e.seq,
                "time": e.entry.at,
                "bk_app_code": e.entry.app_code,
                "operator": e.entry.operator,
                "source": e.entry.source,
                "request_id": e.entry.request_id,
                "api": e.entry.api,
                "change": change,
                "code": e.entry.outcome_code,
                "outcome": e.entry.outcome,
                "prev_hash": e.prev_hash,
                "hash": e.hash,
            })
        })
        .collect();
    Ok(json!({ "entries": list, "next_after_seq": next }))
}

pub async fn verify_audit_log(shared: &Shared, caller: &Caller) -> Result<Value, ApiError> {
    require_admin(caller, "verify the audit log")?;
    shared.audit.flush().await;
    let report = crate::audit::verify(&shared.store, shared.audit.key(), shared.audit.head())
        .await
        .map_err(|e| ApiError::internal("reading the audit log", e))?;
    Ok(json!({
        "intact": report.is_intact(),
        "entries": report.entries,
        "last_seq": report.last_seq,
        "last_hash": report.last_hash,
        "problems": report.problems,
        "unkeyed_entries": report.unkeyed,
        "unverifiable_entries": report.unverifiable,
    }))
}
