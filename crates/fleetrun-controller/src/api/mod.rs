//! The bk-job-compatible HTTP API.
//!
//! Every API is reachable through bk-job's path styles (API gateway `/api/v3/<name>/`, ESB
//! `/api/c/compapi/v2/jobv3/<name>/` and `/api/c/compapi/jobv3/<name>/`, each with or without the
//! trailing slash), by GET with query parameters or POST with a JSON body. Every reply is bk-job's
//! envelope with HTTP 200, except a path that names no API (HTTP 404, code 1640401); errors carry
//! bk-job's codes. `/healthz` and `/readyz` answer probes, without credentials.
//!
//! **Architecture invariant:** bk-job codes and messages are made here and nowhere else.

mod accounts;
mod admin;
mod audit_log;
mod auth;
mod callback_status;
mod dangerous_rules;
mod error;
mod execute;
pub(crate) mod files;
mod health;
mod held;
mod intake;
mod job_list;
mod operate;
#[doc(hidden)]
pub mod params;
mod preview;
mod query;
mod reply;
mod request;
mod scope;
mod scripts;
mod serve;
mod step_detail;
mod step_status;
mod steps;
mod stream;
mod submit;
mod tokens;
mod topology;
mod transfer;
mod v4;

use std::sync::Arc;

use axum::{
    Extension, Router,
    body::Body,
    extract::{Path, RawQuery, State},
    http::{HeaderMap, Method, StatusCode},
    response::{IntoResponse, Response},
    routing::any,
};
pub use error::ApiError;
pub use params::MAX_BODY;
use serde_json::Value;
pub use serve::{PeerAddr, serve};

use crate::Shared;
use request::ApiRequest;

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
    router = router.route(
        "/fleetrun/v1/local_file_upload/{id}",
        any(transfer::upload_local_file),
    );
    router = router
        .route("/api/v4/{api}", any(v4::dispatch))
        .route("/api/v4/{api}/", any(v4::dispatch));
    router
        .route("/healthz", axum::routing::get(health::healthz))
        .route("/readyz", axum::routing::get(health::readyz))
        .route(
            "/metrics",
            axum::routing::get(crate::metrics::serve_metrics),
        )
        .merge(crate::console::router(shared.clone()))
        .merge(crate::dist::router(&shared.config))
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
    "operate_step_instance",
    "get_step_instance_status",
    "preview_rolling",
    "get_job_instance_list",
    "get_account_list",
    "create_account",
    "update_account",
    "delete_account",
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
    "create_dangerous_rule",
    "update_dangerous_rule",
    "delete_dangerous_rule",
    "enable_dangerous_rule",
    "disable_dangerous_rule",
    "get_dangerous_rule_list",
    "check_script",
    "create_join_token",
    "list_join_tokens",
    "revoke_join_token",
    "get_step_instance_detail",
    "push_config_file",
    "fast_transfer_file",
    "generate_local_file_upload_url",
];

/// bk-job's public-script APIs: the business ones' twins, served by [`scripts::call`] with the
/// public-script permission.
const PUBLIC_SCRIPT_APIS: &[&str] = &[
    "get_public_script_list",
    "get_public_script_version_list",
    "get_public_script_version_detail",
    "create_public_script",
    "create_public_script_version",
    "update_public_script_basic",
    "update_public_script_version",
    "delete_public_script",
    "delete_public_script_version",
    "publish_public_script_version",
    "disable_public_script_version",
];

/// The API [`dispatch`] serves under the name `api`, as the static name metrics and the audit
/// trail label it with; `None` for a name it does not serve.
fn served_name(api: &str) -> Option<&'static str> {
    APIS.iter()
        .chain(scripts::APIS)
        .chain(PUBLIC_SCRIPT_APIS)
        .copied()
        .find(|name| *name == api)
}

/// A path that names no API: HTTP 404 (a client or proxy retrying on 5xx, or treating 200 as
/// served, must not mistake it for a reply), in bk-job's envelope so bk-job clients read the
/// code.
fn unknown_api(message: String) -> ApiError {
    ApiError::new(error::code::GATEWAY_API_NOT_FOUND, message)
        .with_http_status(StatusCode::NOT_FOUND)
}

pub(super) async fn not_found() -> Response {
    let request_id = request::new_request_id();
    request::envelope(&request_id, Err(unknown_api("no such API path".to_owned())))
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
    // The request is served by a task of its own: the server drops this future when the client
    // goes away, and a change that was made must still be recorded in the audit trail, so a
    // client cannot make one unrecorded by closing its connection early.
    let request = Request {
        shared,
        gate,
        api,
        method,
        headers,
        query,
        peer,
        body,
    };
    match tokio::spawn(answer(request)).await {
        Ok(response) => response,
        Err(e) if e.is_panic() => std::panic::resume_unwind(e.into_panic()),
        Err(_) => StatusCode::SERVICE_UNAVAILABLE.into_response(),
    }
}

/// What [`dispatch`] takes from a request.
struct Request {
    shared: Arc<Shared>,
    gate: Arc<intake::Gate>,
    api: String,
    method: Method,
    headers: HeaderMap,
    query: Option<String>,
    peer: Option<Extension<PeerAddr>>,
    body: Body,
}

async fn answer(request: Request) -> Response {
    let Request {
        shared,
        gate,
        api,
        method,
        headers,
        query,
        peer,
        body,
    } = request;
    let started = std::time::Instant::now();
    let api_request = ApiRequest::begin(&api);
    let Some(api_name) = served_name(&api) else {
        let result = Err(unknown_api(format!(
            "unsupported API: {}",
            api.escape_debug()
        )));
        crate::metrics::api_request(
            "unknown",
            error::code::GATEWAY_API_NOT_FOUND,
            started.elapsed(),
        );
        return api_request.answer(result);
    };
    // Who asked for a change, and what: filled once the caller is authenticated.
    let mut audited = None;
    // Who a caller whose credentials were refused said it was.
    let mut refused_auth: Option<(String, String)> = None;
    let result = api_request
        .run(async {
            // The turn is held until the reply is made.
            let intake::Admitted {
                params,
                caller,
                turn: _turn,
            } = match intake::read(&shared, &gate, &method, &headers, query.as_deref(), body).await
            {
                Ok(admitted) => admitted,
                Err(e) => {
                    if e.code == error::code::GATEWAY_INVALID_ARGS {
                        refused_auth = Some(claimed_caller(&headers, query.as_deref()));
                    }
                    return Err(e);
                }
            };
            tracing::debug!("request");
            if shared.config.audit.enabled && crate::audit::is_state_changing(api_name) {
                audited = Some((
                    caller.app_code.clone(),
                    caller.username.clone(),
                    crate::audit::summarize(&params.0),
                ));
            }
            // One arm per API, each naming its handler: the arms look alike because every
            // handler takes the same request, and the list is the index of what is served.
            match api.as_str() {
                "fast_execute_script" => {
                    execute::fast_execute_script(&shared, &caller, &params).await
                }
                "push_config_file" => files::push_config_file(&shared, &caller, &params).await,
                "fast_transfer_file" => {
                    transfer::fast_transfer_file(&shared, &caller, &params).await
                }
                "generate_local_file_upload_url" => {
                    transfer::generate_local_file_upload_url(&shared, &caller, &params).await
                }
                "get_job_instance_status" => {
                    query::get_job_instance_status(&shared, &caller, &params).await
                }
                "get_job_instance_ip_log" => {
                    query::get_job_instance_ip_log(&shared, &caller, &params).await
                }
                "batch_get_job_instance_ip_log" => {
                    query::batch_get_job_instance_ip_log(&shared, &caller, &params).await
                }
                "operate_job_instance" => {
                    operate::operate_job_instance(&shared, &caller, &params).await
                }
                "operate_step_instance" => {
                    steps::operate_step_instance(&shared, &caller, &params).await
                }
                "get_step_instance_status" => {
                    step_status::get_step_instance_status(&shared, &caller, &params).await
                }
                "preview_rolling" => preview::preview_rolling(&shared, &caller, &params).await,
                "get_job_instance_list" => {
                    job_list::get_job_instance_list(&shared, &caller, &params).await
                }
                "get_account_list" => accounts::get_account_list(&shared, &caller, &params).await,
                "create_account" => accounts::create_account(&shared, &caller, &params).await,
                "update_account" => accounts::update_account(&shared, &caller, &params).await,
                "delete_account" => accounts::delete_account(&shared, &caller, &params).await,
                "list_hosts" => topology::list_hosts(&shared, &caller).await,
                "get_topology" => topology::get_topology(&shared, &caller).await,
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
                "get_callback_status" => {
                    callback_status::get_callback_status(&shared, &caller, &params).await
                }
                "get_audit_log" => audit_log::get_audit_log(&shared, &caller, &params).await,
                "verify_audit_log" => audit_log::verify_audit_log(&shared, &caller).await,
                "create_dangerous_rule" => {
                    dangerous_rules::create_dangerous_rule(&shared, &caller, &params).await
                }
                "update_dangerous_rule" => {
                    dangerous_rules::update_dangerous_rule(&shared, &caller, &params).await
                }
                "delete_dangerous_rule" => {
                    dangerous_rules::delete_dangerous_rule(&shared, &caller, &params).await
                }
                "enable_dangerous_rule" => {
                    dangerous_rules::set_dangerous_rule_status(&shared, &caller, &params, true)
                        .await
                }
                "disable_dangerous_rule" => {
                    dangerous_rules::set_dangerous_rule_status(&shared, &caller, &params, false)
                        .await
                }
                "get_dangerous_rule_list" => {
                    dangerous_rules::get_dangerous_rule_list(&shared, &caller, &params).await
                }
                "check_script" => dangerous_rules::check_script(&shared, &caller, &params).await,
                "create_join_token" => tokens::create_join_token(&shared, &caller, &params).await,
                "list_join_tokens" => tokens::list_join_tokens(&shared, &caller).await,
                "revoke_join_token" => tokens::revoke_join_token(&shared, &caller, &params).await,
                "get_step_instance_detail" => {
                    step_detail::get_step_instance_detail(&shared, &caller, &params).await
                }
                name if scripts::APIS.contains(&name) => {
                    scripts::call(name, false, &shared, &caller, &params).await
                }
                name => match scripts::business_name(name) {
                    Some(business) => {
                        scripts::call(&business, true, &shared, &caller, &params).await
                    }
                    None => Err(unknown_api(format!(
                        "unsupported API: {}",
                        api.escape_debug()
                    ))),
                },
            }
        })
        .await;
    api_request.log_outcome(&result);
    let code = result.as_ref().map_or_else(|e| e.code, |_| 0);
    if let Some((app_code, operator, change)) = audited {
        let entry = fleetrun_store::NewAuditEntry {
            at: crate::now_ms(),
            app_code,
            operator,
            source: peer.map_or_else(String::new, |Extension(PeerAddr(a))| address_text(a)),
            request_id: api_request.id().to_owned(),
            api: api_name.to_owned(),
            change,
            outcome_code: code,
            outcome: result
                .as_ref()
                .map_or_else(|e| e.recorded_message().to_owned(), |_| "ok".to_owned()),
        };
        shared.audit.append(entry).await;
    }
    if let Some((app_code, operator)) = refused_auth
        && shared.config.audit.enabled
    {
        let entry = fleetrun_store::NewAuditEntry {
            at: crate::now_ms(),
            app_code,
            operator,
            source: peer.map_or_else(String::new, |Extension(PeerAddr(a))| address_text(a)),
            request_id: api_request.id().to_owned(),
            api: api_name.to_owned(),
            change: "{}".to_owned(),
            outcome_code: code,
            outcome: result
                .as_ref()
                .map_or_else(|e| e.recorded_message().to_owned(), |_| "ok".to_owned()),
        };
        shared.audit.append_refused_auth(entry).await;
    }
    crate::metrics::api_request(api_name, code, started.elapsed());
    request::envelope(api_request.id(), result)
}

/// A client's address as the audit trail records it, `SocketAddr`'s own form; an IPv4 one is
/// written digit by digit, for the formatting machinery cost a thirtieth of what auditing a
/// call adds.
fn address_text(address: std::net::SocketAddr) -> String {
    let std::net::SocketAddr::V4(v4) = address else {
        return address.to_string();
    };
    let mut digits = itoa::Buffer::new();
    let mut text = String::with_capacity(21);
    for (i, octet) in v4.ip().octets().into_iter().enumerate() {
        if i > 0 {
            text.push('.');
        }
        text.push_str(digits.format(octet));
    }
    text.push(':');
    text.push_str(digits.format(v4.port()));
    text
}

/// The app code and user name a refused caller gave (`X-Bkapi-Authorization`, else the query
/// string; a JSON body is not read again), cut to 64 characters each: they are the client's
/// claims, recorded as such.
fn claimed_caller(headers: &HeaderMap, query: Option<&str>) -> (String, String) {
    let cut = |s: &str| s.chars().take(64).collect::<String>();
    let from_header = headers
        .get("x-bkapi-authorization")
        .and_then(|v| v.to_str().ok())
        .and_then(|v| serde_json::from_str::<serde_json::Map<String, Value>>(v).ok());
    let from_query: serde_json::Map<String, Value> = query
        .and_then(|q| serde_urlencoded::from_str::<Vec<(String, String)>>(q).ok())
        .unwrap_or_default()
        .into_iter()
        .map(|(k, v)| (k, Value::String(v)))
        .collect();
    let field = |key: &str| {
        from_header
            .as_ref()
            .and_then(|m| m.get(key))
            .or_else(|| from_query.get(key))
            .and_then(Value::as_str)
            .map(cut)
            .unwrap_or_default()
    };
    (field("bk_app_code"), field("bk_username"))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn an_address_is_recorded_as_it_displays() {
        for text in [
            "127.0.0.1:32962",
            "0.0.0.0:0",
            "255.255.255.255:65535",
            "10.20.3.4:80",
            "[::1]:443",
            "[fe80::1%2]:8080",
        ] {
            let address: std::net::SocketAddr = text.parse().unwrap();
            assert_eq!(address_text(address), address.to_string(), "{text}");
        }
    }

    #[test]
    fn every_business_script_api_has_its_public_twin_served() {
        let mut public: Vec<String> = scripts::APIS
            .iter()
            .map(|api| api.replacen("script", "public_script", 1))
            .collect();
        public.sort();
        let mut listed = PUBLIC_SCRIPT_APIS.to_vec();
        listed.sort();
        assert_eq!(public, listed);
        for api in PUBLIC_SCRIPT_APIS {
            assert!(scripts::business_name(api).is_some(), "{api}");
            assert_eq!(served_name(api), Some(*api));
        }
        assert_eq!(served_name("get_public_script_listx"), None);
    }
}
