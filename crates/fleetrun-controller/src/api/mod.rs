//! The bk-job-compatible HTTP API.
//!
//! Every API is reachable through bk-job's path styles (API gateway `/api/v3/<name>/`, ESB
//! `/api/c/compapi/v2/jobv3/<name>/` and `/api/c/compapi/jobv3/<name>/`, each with or without the
//! trailing slash), by GET with query parameters or POST with a JSON body. Every reply is bk-job's
//! envelope with HTTP 200, except a path that names no API (HTTP 404, code 1239003); errors carry
//! bk-job's codes. `/healthz` and `/readyz` answer probes, without credentials.
//!
//! **Architecture invariant:** bk-job codes and messages are made here and nowhere else.

mod admin;
mod audit_log;
mod auth;
mod error;
mod execute;
mod health;
mod intake;
#[doc(hidden)]
pub mod params;
mod query;
mod scope;
mod scripts;
mod serve;
mod stream;

use std::sync::Arc;

use axum::{
    Extension, Router,
    body::Body,
    extract::{Path, RawQuery, State},
    http::{HeaderMap, HeaderValue, Method, StatusCode},
    response::{IntoResponse, Response},
    routing::any,
};
use serde_json::{Value, json};
use tracing::Instrument;

pub use error::ApiError;
pub use params::MAX_BODY;
pub use serve::{PeerAddr, serve};

use crate::Shared;

/// Builds the router for all bk-job path styles.
pub fn router(shared: Arc<Shared>) -> Router {
    let gate = Arc::new(intake::Gate::new(&shared.config.limits));
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
    router
        .route("/healthz", axum::routing::get(health::healthz))
        .route("/readyz", axum::routing::get(health::readyz))
        .route(
            "/metrics",
            axum::routing::get(crate::metrics::serve_metrics),
        )
        .fallback(not_found)
        .layer(Extension(gate))
        .with_state(shared)
}

/// The APIs [`dispatch`] serves; any other name is answered 404 before its body is read.
const APIS: &[&str] = &[
    "fast_execute_script",
    "get_job_instance_status",
    "get_job_instance_ip_log",
    "batch_get_job_instance_ip_log",
    "operate_job_instance",
    "get_job_instance_list",
    "get_account_list",
    "create_script",
    "create_script_version",
    "publish_script_version",
    "disable_script_version",
    "get_script_list",
    "get_script_version_list",
    "get_script_version_detail",
    "list_hosts",
    "get_topology",
    "reload_inventory",
    "get_inventory",
    "get_inventory_history",
    "change_inventory",
    "replace_inventory",
    "revoke_agent",
    "unrevoke_agent",
    "list_revoked_agents",
    "get_callback_status",
    "get_audit_log",
    "verify_audit_log",
];

/// A path that names no API: HTTP 404 (a client or proxy retrying on 5xx, or treating 200 as
/// served, must not mistake it for a reply), in bk-job's envelope so bk-job clients read the
/// code.
fn unknown_api(message: String) -> ApiError {
    ApiError::new(error::code::API_UNSUPPORTED, message).with_http_status(StatusCode::NOT_FOUND)
}

async fn not_found() -> Response {
    let request_id = new_request_id();
    envelope(&request_id, Err(unknown_api("no such API path".to_owned())))
}

// An axum handler receives each part of the request it uses as an extractor.
#[allow(clippy::too_many_arguments)]
async fn dispatch(
    State(shared): State<Arc<Shared>>,
    Extension(gate): Extension<Arc<intake::Gate>>,
    Path(api): Path<String>,
    method: Method,
    headers: HeaderMap,
    RawQuery(query): RawQuery,
    peer: Option<Extension<PeerAddr>>,
    body: Body,
) -> Response {
    let request_id = new_request_id();
    let started = std::time::Instant::now();
    // The path is the client's text, logged before it is authenticated: `?` escapes it, so a
    // newline in it cannot start a forged log line.
    let span = tracing::info_span!(
        "api",
        request_id = %request_id,
        api = ?api,
        app = tracing::field::Empty,
        operator = tracing::field::Empty,
    );
    let Some(api_name) = APIS.iter().copied().find(|name| *name == api) else {
        let result = Err(unknown_api(format!(
            "unsupported API: {}",
            api.escape_debug()
        )));
        span.in_scope(|| log_result(&result));
        crate::metrics::api_request("unknown", error::code::API_UNSUPPORTED, started.elapsed());
        return envelope(&request_id, result);
    };
    // Who asked for a change, and what: filled once the caller is authenticated.
    let mut audited = None;
    let result = async {
        // The turn is held until the reply is made.
        let intake::Admitted {
            params,
            caller,
            turn: _turn,
        } = intake::read(&shared, &gate, &method, &headers, query.as_deref(), body).await?;
        tracing::debug!("request");
        if crate::audit::is_state_changing(api_name) {
            audited = Some((
                caller.app_code.clone(),
                caller.username.clone(),
                crate::audit::summarize(&params.0),
            ));
        }
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
            "revoke_agent" => admin::revoke_agent(&shared, &caller, &params).await,
            "unrevoke_agent" => admin::unrevoke_agent(&shared, &caller, &params).await,
            "list_revoked_agents" => admin::list_revoked_agents(&shared, &caller).await,
            "get_callback_status" => query::get_callback_status(&shared, &caller, &params).await,
            "get_audit_log" => audit_log::get_audit_log(&shared, &caller, &params).await,
            "verify_audit_log" => audit_log::verify_audit_log(&shared, &caller).await,
            _ => Err(unknown_api(format!(
                "unsupported API: {}",
                api.escape_debug()
            ))),
        }
    }
    .instrument(span.clone())
    .await;
    span.in_scope(|| log_result(&result));
    let code = result.as_ref().map_or_else(|e| e.code, |_| 0);
    if let Some((app_code, operator, change)) = audited {
        let entry = fleetrun_store::NewAuditEntry {
            at: crate::now_ms(),
            app_code,
            operator,
            source: peer.map_or_else(String::new, |Extension(PeerAddr(a))| a.to_string()),
            request_id: request_id.clone(),
            api: api_name.to_owned(),
            change,
            outcome_code: code,
            outcome: result
                .as_ref()
                .map_or_else(|e| e.message.clone(), |_| "ok".to_owned()),
        };
        shared.audit.append(entry).await;
    }
    crate::metrics::api_request(api_name, code, started.elapsed());
    envelope(&request_id, result)
}

/// Logs how a request ended. Messages quote what clients sent, so they are escaped: a line in
/// the log is one line the controller wrote.
fn log_result<T>(result: &Result<T, ApiError>) {
    match result {
        Ok(_) => tracing::info!("ok"),
        Err(e) if e.code == error::code::INTERNAL && e.http_status.is_success() => {
            tracing::error!(code = e.code, "{}", e.message.escape_debug())
        }
        Err(e) => tracing::info!(code = e.code, "refused: {}", e.message.escape_debug()),
    }
}

fn new_request_id() -> String {
    uuid::Uuid::new_v4().simple().to_string()
}

fn envelope(request_id: &str, result: Result<Value, ApiError>) -> Response {
    let (status, body) = match result {
        Ok(data) => (
            StatusCode::OK,
            json!({
                "result": true,
                "code": 0,
                "message": "success",
                "data": data,
                "permission": null,
                "request_id": request_id,
            }),
        ),
        Err(e) => (
            e.http_status,
            json!({
                "result": false,
                "code": e.code,
                "message": e.message,
                "data": null,
                "permission": e.permission,
                "request_id": request_id,
            }),
        ),
    };
    let mut response = (status, axum::Json(body)).into_response();
    if let Ok(value) = HeaderValue::from_str(request_id) {
        response.headers_mut().insert("x-request-id", value);
    }
    response
}
