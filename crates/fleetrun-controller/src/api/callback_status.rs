//! `get_callback_status`: where a job's callback stands.

use serde::Deserialize;
use serde_json::{Value, json};

use super::{
    ApiError,
    auth::Caller,
    params::{Params, lenient},
    query::load_job,
};
use crate::Shared;

#[derive(Debug, Deserialize)]
struct CallbackStatusRequest {
    #[serde(deserialize_with = "lenient::int")]
    job_instance_id: i64,
}

/// `get_callback_status`: where a job's callback stands.
pub async fn get_callback_status(
    shared: &Shared,
    caller: &Caller,
    params: &Params,
) -> Result<Value, ApiError> {
    let req: CallbackStatusRequest = params.parse()?;
    let id = req.job_instance_id;
    let job = load_job(shared, caller, params, id).await?;
    let Some(url) = job.callback_url.as_deref() else {
        return Ok(json!({
            "job_instance_id": id,
            "url": null,
            "status": "none",
            "message": format!("job {id} was submitted without a callback_url: no callback is sent"),
            "attempts": [],
        }));
    };
    let Some((delivery, attempts)) = shared.store.callback_delivery(id).await? else {
        return Ok(json!({
            "job_instance_id": id,
            "url": crate::callback::redact(url),
            "status": "waiting",
            "message": "the callback is sent when the job ends",
            "attempts": [],
        }));
    };
    let pending = delivery.status == fleetrun_store::CallbackStatus::Pending;
    Ok(json!({
        "job_instance_id": id,
        "url": crate::callback::redact(&delivery.url),
        "status": delivery.status.as_str(),
        "delivery_id": delivery.id,
        "last_error": delivery.last_error,
        "next_attempt_time": pending.then_some(delivery.next_attempt_at),
        "attempts": attempts
            .iter()
            .map(|a| json!({
                "attempt": a.attempt,
                "time": a.at,
                "http_status": a.http_status,
                "error": a.error,
                "duration_ms": a.duration_ms,
            }))
            .collect::<Vec<_>>(),
    }))
}
