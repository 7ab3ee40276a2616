//! The bk-job-compatible HTTP API.
//!
//! Every API is reachable through bk-job's path styles (API gateway `/api/v3/<name>/`, ESB
//! `/api/c/compapi/v2/jobv3/<name>/` and `/api/c/compapi/jobv3/<name>/`, each with or without the
//! trailing slash), by GET with query parameters or POST with a JSON body. Every reply is bk-job's
//! envelope with HTTP 200; errors carry bk-job's codes.
//!
//! **Architecture invariant:** bk-job codes and messages are made here and nowhere else.

mod admin;
mod auth;
mod error;
mod execute;
#[doc(hidden)]
pub mod params;
mod query;
mod scope;
mod scripts;
mod stream;

use std::sync::Arc;

use axum::{
    Router,
    body::Bytes,
    extract::{Path, RawQuery, State},
    http::{HeaderMap, HeaderValue, Method},
    response::{IntoResponse, Response},
    routing::any,
};
use serde_json::{Value, json};
use tracing::Instrument;

pub use error::ApiError;
pub use params::MAX_BODY;

use crate::Shared;

/// Builds the router for all bk-job path styles.
pub fn router(shared: Arc<Shared>) -> Router {
    let mut router = Router::new();
    // `/fleetrun/v1` carries fleetrun's own APIs, with the same envelope and credentials.
    for prefix in [
        "/api/v3",
        "/api/c/compapi/v2/jobv3",
        "/api/c/compapi/jobv3",
        "/fleetrun/v1",
    ] {
        router = router
            .route(&format!("{prefix}/{{api}}"), any(dispatch))
            .route(&format!("{prefix}/{{api}}/"), any(dispatch))
            .route(&format!("{prefix}/stream_job"), any(stream::stream_job))
            .route(&format!("{prefix}/stream_job/"), any(stream::stream_job));
    }
    router.fallback(not_found).with_state(shared)
}

async fn not_found() -> Response {
    let request_id = new_request_id();
    envelope(
        &request_id,
        Err(ApiError::new(
            error::code::API_UNSUPPORTED,
            "no such API path",
        )),
    )
}

async fn dispatch(
    State(shared): State<Arc<Shared>>,
    Path(api): Path<String>,
    method: Method,
    headers: HeaderMap,
    RawQuery(query): RawQuery,
    body: Bytes,
) -> Response {
    let request_id = new_request_id();
    let span = tracing::info_span!("api", request_id = %request_id, api = %api);
    let result = async {
        let params = params::Params::from_request(&method, query.as_deref(), &body)?;
        let caller = auth::authenticate(&shared.apps, &headers, &params)?;
        tracing::debug!(app = %caller.app_code, operator = %caller.username, "request");
        match api.as_str() {
            "fast_execute_script" => execute::fast_execute_script(&shared, &caller, &params).await,
            "get_job_instance_status" => {
                query::get_job_instance_status(&shared, &caller, &params).await
            }
            "get_job_instance_ip_log" => {
                query::get_job_instance_ip_log(&shared, &caller, &params).await
            }
            "batch_get_job_instance_ip_log" => {
                query::batch_get_job_instance_ip_log(&shared, &caller, &params).await
            }
            "operate_job_instance" => query::operate_job_instance(&shared, &caller, &params).await,
            "get_job_instance_list" => {
                query::get_job_instance_list(&shared, &caller, &params).await
            }
            "get_account_list" => query::get_account_list(&shared, &caller, &params).await,
            "create_script" => scripts::create_script(&shared, &caller, &params).await,
            "create_script_version" => {
                scripts::create_script_version(&shared, &caller, &params).await
            }
            "publish_script_version" => {
                scripts::publish_script_version(&shared, &caller, &params).await
            }
            "disable_script_version" => {
                scripts::disable_script_version(&shared, &caller, &params).await
            }
            "get_script_list" => scripts::get_script_list(&shared, &caller, &params).await,
            "get_script_version_list" => {
                scripts::get_script_version_list(&shared, &caller, &params).await
            }
            "get_script_version_detail" => {
                scripts::get_script_version_detail(&shared, &caller, &params).await
            }
            "list_hosts" => query::list_hosts(&shared, &caller).await,
            "get_topology" => query::get_topology(&shared, &caller).await,
            "reload_inventory" => admin::reload_inventory(&shared, &caller, &params).await,
            "get_inventory" => admin::get_inventory(&shared, &caller, &params).await,
            "get_inventory_history" => {
                admin::get_inventory_history(&shared, &caller, &params).await
            }
            "change_inventory" => admin::change_inventory(&shared, &caller, &params).await,
            "replace_inventory" => admin::replace_inventory(&shared, &caller, &params).await,
            "get_callback_status" => query::get_callback_status(&shared, &caller, &params).await,
            _ => Err(ApiError::new(
                error::code::API_UNSUPPORTED,
                format!("unsupported API: {api}"),
            )),
        }
    }
    .instrument(span.clone())
    .await;
    let _entered = span.enter();
    match &result {
        Ok(_) => tracing::info!("ok"),
        Err(e) if e.code == error::code::INTERNAL => {
            tracing::error!(code = e.code, "{}", e.message)
        }
        Err(e) => tracing::info!(code = e.code, "refused: {}", e.message),
    }
    envelope(&request_id, result)
}

fn new_request_id() -> String {
    uuid::Uuid::new_v4().simple().to_string()
}

fn envelope(request_id: &str, result: Result<Value, ApiError>) -> Response {
    let body = match result {
        Ok(data) => json!({
            "result": true,
            "code": 0,
            "message": "success",
            "data": data,
            "permission": null,
            "request_id": request_id,
        }),
        Err(e) => json!({
            "result": false,
            "code": e.code,
            "message": e.message,
            "data": null,
            "permission": e.permission,
            "request_id": request_id,
        }),
    };
    let mut response = axum::Json(body).into_response();
    if let Ok(value) = HeaderValue::from_str(request_id) {
        response.headers_mut().insert("x-request-id", value);
    }
    response
}
