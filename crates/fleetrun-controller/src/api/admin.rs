//! fleetrun's inventory administration: `get_inventory`, `get_inventory_history`,
//! `change_inventory`, `replace_inventory`, `reload_inventory`, and the agents' revocation:
//! `revoke_agent`, `unrevoke_agent`, `list_revoked_agents`. Only an app granted `admin` may
//! call them.

use fleetrun_inventory::Change;
use fleetrun_store::{RevisionInfo, Revocation};
use serde::Deserialize;
use serde_json::{Value, json};

use super::{
    ApiError,
    auth::Caller,
    error::code,
    params::{Params, lenient},
};
use crate::{
    Shared,
    inventory::{ChangeRefused, InventoryLoadError, Reimport, Revision},
};

/// Revisions `get_inventory_history` returns at most.
const MAX_HISTORY: i64 = 100;
/// Changes one `change_inventory` call may carry.
const MAX_CHANGES: usize = 10_000;

impl From<ChangeRefused> for ApiError {
    fn from(e: ChangeRefused) -> Self {
        match e {
            ChangeRefused::Invalid(message) => ApiError::new(code::BAD_REQUEST, message),
            stale @ ChangeRefused::Stale { .. } => ApiError::invalid("expected_revision", stale),
            ChangeRefused::Store(e) => e.into(),
        }
    }
}

/// Runs a change of the inventory to its end even if the client goes away meanwhile, so that a
/// revision the store has committed is always the one in force.
pub(super) async fn to_the_end<T: Send + 'static>(
    work: impl std::future::Future<Output = T> + Send + 'static,
) -> Result<T, ApiError> {
    tokio::spawn(work)
        .await
        .map_err(|e| ApiError::internal("inventory change", e))
}

pub(super) fn require_admin(caller: &Caller, what: &str) -> Result<(), ApiError> {
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

fn info_json(info: &RevisionInfo) -> Value {
    json!({
        "revision": info.revision,
        "source": info.source,
        "operator": info.operator,
        "created_at": info.created_at,
        "summary": info.summary,
    })
}

fn revision_json(revision: &Revision) -> Value {
    let mut out = info_json(&revision.info);
    out["text"] = json!(revision.text);
    out
}

#[derive(Debug, Deserialize)]
struct GetInventory {
    #[serde(default, deserialize_with = "lenient::opt_int")]
    revision: Option<i64>,
}

pub async fn get_inventory(
    shared: &Shared,
    caller: &Caller,
    params: &Params,
) -> Result<Value, ApiError> {
    require_admin(caller, "read the inventory document")?;
    let req: GetInventory = params.parse()?;
    let current = shared.inventory.revision();
    let revision = match req.revision {
        None => current,
        Some(n) if n == current.info.revision => current,
        Some(n) => shared.inventory.stored(n).await?.ok_or_else(|| {
            ApiError::invalid(
                "revision",
                format!(
                    "revision {n} is not kept (the current one is {})",
                    current.info.revision
                ),
            )
        })?,
    };
    Ok(revision_json(&revision))
}

#[derive(Debug, Deserialize)]
struct GetHistory {
    #[serde(default, deserialize_with = "lenient::opt_int")]
    limit: Option<i64>,
}

pub async fn get_inventory_history(
    shared: &Shared,
    caller: &Caller,
    params: &Params,
) -> Result<Value, ApiError> {
    require_admin(caller, "read the inventory history")?;
    let req: GetHistory = params.parse()?;
    let limit = req.limit.unwrap_or(20);
    if !(1..=MAX_HISTORY).contains(&limit) {
        return Err(ApiError::invalid(
            "limit",
            format!("{limit} is not between 1 and {MAX_HISTORY}"),
        ));
    }
    let history = shared.inventory.history(limit).await?;
    Ok(Value::Array(history.iter().map(info_json).collect()))
}

#[derive(Debug, Deserialize)]
struct ChangeInventory {
    changes: Option<Vec<Change>>,
    #[serde(default, deserialize_with = "lenient::opt_int")]
    expected_revision: Option<i64>,
}

pub async fn change_inventory(
    shared: &Shared,
    caller: &Caller,
    params: &Params,
) -> Result<Value, ApiError> {
    require_admin(caller, "change the inventory")?;
    let req: ChangeInventory = params.parse()?;
    let changes = req.changes.ok_or_else(|| ApiError::missing("changes"))?;
    if changes.is_empty() {
        return Err(ApiError::invalid("changes", "is empty: nothing to change"));
    }
    if changes.len() > MAX_CHANGES {
        return Err(ApiError::invalid(
            "changes",
            format!(
                "{} changes, more than {MAX_CHANGES} in one call",
                changes.len()
            ),
        ));
    }
    let inventory = shared.inventory.clone();
    let agents = shared.agents.clone();
    let operator = caller.username.clone();
    let expected = req.expected_revision;
    let (info, previous) = to_the_end(async move {
        let connected = |bk_host_id| agents.get(bk_host_id).is_some();
        inventory
            .change(changes, expected, &operator, connected)
            .await
    })
    .await??;
    Ok(json!({
        "revision": info.revision,
        "previous_revision": previous,
        "summary": info.summary,
    }))
}

#[derive(Debug, Deserialize)]
struct ReplaceInventory {
    text: Option<String>,
    #[serde(default, deserialize_with = "lenient::opt_int")]
    expected_revision: Option<i64>,
}

pub async fn replace_inventory(
    shared: &Shared,
    caller: &Caller,
    params: &Params,
) -> Result<Value, ApiError> {
    require_admin(caller, "replace the inventory")?;
    let req: ReplaceInventory = params.parse()?;
    let text = req.text.ok_or_else(|| ApiError::missing("text"))?;
    let inventory = shared.inventory.clone();
    let operator = caller.username.clone();
    let expected = req.expected_revision;
    let (info, previous) =
        to_the_end(async move { inventory.replace(text, expected, &operator).await }).await??;
    Ok(json!({
        "revision": info.revision,
        "previous_revision": previous,
        "summary": info.summary,
    }))
}

#[derive(Debug, Deserialize)]
struct ReloadInventory {
    #[serde(default, deserialize_with = "lenient::opt_bool")]
    force: Option<bool>,
}

/// Imports the inventory file again if it changed since it was last imported (always with
/// `force`); an invalid file changes nothing and the error names the line.
pub async fn reload_inventory(
    shared: &Shared,
    caller: &Caller,
    params: &Params,
) -> Result<Value, ApiError> {
    require_admin(caller, "reload the inventory")?;
    let req: ReloadInventory = params.parse()?;
    let inventory = shared.inventory.clone();
    let when = if req.force.unwrap_or(false) {
        Reimport::Always
    } else {
        Reimport::IfChanged
    };
    let reloaded = to_the_end(async move { inventory.reload(when).await })
        .await?
        .map_err(|e| match e {
            InventoryLoadError::Store(e) => ApiError::internal("inventory reload", e),
            InventoryLoadError::Commit(e) => ApiError::internal("inventory reload", e),
            e => ApiError::invalid("inventory", e),
        })?;
    Ok(json!({
        "reloaded": true,
        "imported": reloaded.imported,
        "revision": reloaded.revision.revision,
    }))
}

/// Longest revocation reason kept.
const MAX_REASON: usize = 1_000;

#[derive(Debug, Deserialize)]
struct AgentParam {
    agent_id: Option<String>,
    reason: Option<String>,
}

fn agent_id_param(req: &AgentParam) -> Result<String, ApiError> {
    let agent_id = req
        .agent_id
        .clone()
        .ok_or_else(|| ApiError::missing("agent_id"))?;
    if !fleetrun_proto::is_valid_agent_id(&agent_id) {
        return Err(ApiError::invalid(
            "agent_id",
            format!("{agent_id:?} is not an agent id"),
        ));
    }
    Ok(agent_id)
}

fn revocation_json(r: &Revocation) -> Value {
    json!({
        "agent_id": r.agent_id,
        "reason": r.reason,
        "operator": r.operator,
        "revoked_at": r.revoked_at,
    })
}

/// Revokes an agent: its connections close now, and it is refused at every connection after,
/// whatever certificate it presents, until `unrevoke_agent`. Its host stays (offline) until
/// `delete_host` forgets it. The revocation is noted in the inventory history.
pub async fn revoke_agent(
    shared: &Shared,
    caller: &Caller,
    params: &Params,
) -> Result<Value, ApiError> {
    require_admin(caller, "revoke agents")?;
    let req: AgentParam = params.parse()?;
    let agent_id = agent_id_param(&req)?;
    let reason = req.reason.unwrap_or_default();
    if reason.len() > MAX_REASON {
        return Err(ApiError::invalid(
            "reason",
            format!("{} bytes, more than {MAX_REASON}", reason.len()),
        ));
    }
    let new = Revocation {
        agent_id: agent_id.clone(),
        reason,
        operator: caller.username.clone(),
        revoked_at: crate::now_ms(),
    };
    let store = shared.store.clone();
    let agents = shared.agents.clone();
    let inventory = shared.inventory.clone();
    // Once begun, the revocation is enforced and noted even if the caller goes away. The agent
    // is cut off before the revocation is stored: a database that refuses the write must not
    // leave it connected (only a restart before the write succeeds would let it back).
    let (revocation, made, closed, revision) = to_the_end(async move {
        let closed = agents.revoke(&new.agent_id);
        let revoked = store.revoke_agent(&new).await.map_err(|e| {
            let mut error = ApiError::from(e);
            error.message = format!(
                "{}: agent {} is cut off, and refused until this controller restarts; revoke it \
                 again once the database takes writes",
                error.message, new.agent_id
            );
            error
        })?;
        agents.revocation_stored(&new.agent_id);
        // The other controllers sharing the database cut it off too, at once.
        if let Err(e) = store.announce_cluster_news().await {
            tracing::warn!("cannot tell the other controllers of the revocation: {e}");
        }
        let made = matches!(revoked, fleetrun_store::Revoked::Now(_));
        let revocation = revoked.revocation().clone();
        let revision = if made {
            let summary = match revocation.reason.as_str() {
                "" => format!("revoke_agent {}", revocation.agent_id),
                why => format!("revoke_agent {}: {why}", revocation.agent_id),
            };
            Some(inventory.note(summary, &revocation.operator).await?)
        } else {
            None
        };
        Ok::<_, ApiError>((revocation, made, closed, revision))
    })
    .await??;
    tracing::warn!(agent_id, closed, "agent revoked");
    let mut out = revocation_json(&revocation);
    out["newly_revoked"] = json!(made);
    out["connections_closed"] = json!(closed);
    out["revision"] = json!(revision);
    Ok(out)
}

/// Lifts an agent's revocation: it may connect again (and registers as any agent would).
pub async fn unrevoke_agent(
    shared: &Shared,
    caller: &Caller,
    params: &Params,
) -> Result<Value, ApiError> {
    require_admin(caller, "unrevoke agents")?;
    let req: AgentParam = params.parse()?;
    let agent_id = agent_id_param(&req)?;
    let store = shared.store.clone();
    let agents = shared.agents.clone();
    let inventory = shared.inventory.clone();
    let operator = caller.username.clone();
    let (lifted, revision) = to_the_end(async move {
        let lifted = store.unrevoke_agent(&agent_id).await?;
        agents.unrevoke(&agent_id);
        if let Err(e) = store.announce_cluster_news().await {
            tracing::warn!("cannot tell the other controllers of the lifted revocation: {e}");
        }
        let revision = match &lifted {
            Some(_) => Some(
                inventory
                    .note(format!("unrevoke_agent {agent_id}"), &operator)
                    .await?,
            ),
            None => None,
        };
        Ok::<_, ApiError>((lifted, revision))
    })
    .await??;
    let Some(lifted) = lifted else {
        return Err(ApiError::invalid(
            "agent_id",
            format!("{:?} is not revoked", req.agent_id.unwrap_or_default()),
        ));
    };
    tracing::warn!(agent_id = lifted.agent_id, "agent revocation lifted");
    let mut out = revocation_json(&lifted);
    out["revision"] = json!(revision);
    Ok(out)
}

/// Every revoked agent, oldest revocation first.
pub async fn list_revoked_agents(shared: &Shared, caller: &Caller) -> Result<Value, ApiError> {
    require_admin(caller, "list revoked agents")?;
    let revoked = shared.store.revoked_agents().await?;
    Ok(Value::Array(revoked.iter().map(revocation_json).collect()))
}
