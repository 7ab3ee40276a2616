//! `/healthz` and `/readyz`: for load balancers and supervisors.
//!
//! Neither asks for credentials nor waits for a turn among the authenticated requests: they say
//! nothing an unauthenticated client could use (the store's error names no path or data), cost a
//! few memory reads, and must answer precisely when the controller is busiest.

use std::sync::{Arc, atomic::Ordering};

use axum::{
    extract::State,
    http::StatusCode,
    response::{IntoResponse, Response},
};
use serde_json::json;

use crate::Shared;

/// Alive: the process serves HTTP.
pub async fn healthz() -> Response {
    (StatusCode::OK, axum::Json(json!({"status": "ok"}))).into_response()
}

/// Ready: the store takes writes, agents can connect, and an inventory is in force. 503 with the
/// reasons otherwise.
pub async fn readyz(State(shared): State<Arc<Shared>>) -> Response {
    let mut problems = Vec::new();
    let store = shared.store.health();
    if let Some(error) = &store.write_error {
        problems.push(format!("store: the database refuses writes: {error}"));
    }
    if !shared.agent_listener_up.load(Ordering::Relaxed) {
        problems.push("agent_listener: the QUIC listener for agents is not running".to_owned());
    }
    let revision = shared.inventory.revision().info.revision;
    if revision <= 0 {
        problems.push("inventory: no inventory revision is loaded".to_owned());
    }
    if problems.is_empty() {
        (
            StatusCode::OK,
            axum::Json(json!({
                "status": "ready",
                "inventory_revision": revision,
                "pending_writes": store.pending,
            })),
        )
            .into_response()
    } else {
        (
            StatusCode::SERVICE_UNAVAILABLE,
            axum::Json(json!({"status": "not_ready", "problems": problems})),
        )
            .into_response()
    }
}
