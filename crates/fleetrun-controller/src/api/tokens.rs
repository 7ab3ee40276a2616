//! Join tokens for enrollment: `create_join_token`, `list_join_tokens`, `revoke_join_token`.
//! Only an app granted `admin` may call them. A token is in the reply of its creation and
//! nowhere else: the store keeps its SHA-256.

use fleetrun_store::JoinToken;
use serde::Deserialize;
use serde_json::{Value, json};

use super::{
    ApiError,
    admin::require_admin,
    auth::Caller,
    error::code,
    params::{Params, lenient},
};
use crate::{Shared, enroll::EnrollSettings};

/// Default and longest life of a token.
const DEFAULT_TTL_SECS: i64 = 3600;
const MAX_TTL_SECS: i64 = 30 * 24 * 3600;
/// Most uses one token may allow.
const MAX_USES: i64 = 100_000;
/// Longest description kept.
const MAX_DESCRIPTION: usize = 200;

fn settings(shared: &Shared) -> Result<&EnrollSettings, ApiError> {
    shared.enroll.as_ref().ok_or_else(|| {
        ApiError::new(
            code::UNSUPPORTED_OPERATION,
            "enrollment is not configured on this controller: add an [enroll] section and run \
             `fleetrun-controller ca init`",
        )
    })
}

/// A token's state at `now`, in words.
fn state(token: &JoinToken, now: i64) -> &'static str {
    if token.revoked_at.is_some() {
        "revoked"
    } else if token.expires_at <= now {
        "expired"
    } else if token.uses >= token.max_uses {
        "used_up"
    } else {
        "active"
    }
}

fn token_json(token: &JoinToken, now: i64) -> Value {
    json!({
        "token_id": token.token_id,
        "bk_biz_id": token.bk_biz_id,
        "bk_module_id": token.bk_module_id,
        "bk_cloud_id": token.bk_cloud_id,
        "max_uses": token.max_uses,
        "uses": token.uses,
        "created_at": token.created_at,
        "expires_at": token.expires_at,
        "created_by": token.created_by,
        "description": token.description,
        "revoked_at": token.revoked_at,
        "revoked_by": token.revoked_by,
        "state": state(token, now),
    })
}

#[derive(Debug, Deserialize)]
struct CreateToken {
    #[serde(default, deserialize_with = "lenient::opt_int")]
    bk_biz_id: Option<i64>,
    #[serde(default, deserialize_with = "lenient::opt_int")]
    bk_module_id: Option<i64>,
    #[serde(default, deserialize_with = "lenient::opt_int")]
    bk_cloud_id: Option<i64>,
    #[serde(default, deserialize_with = "lenient::opt_int")]
    ttl_secs: Option<i64>,
    #[serde(default, deserialize_with = "lenient::opt_int")]
    max_uses: Option<i64>,
    #[serde(default)]
    description: Option<String>,
}

/// Makes a join token placing hosts in a business (and module, and cloud area); the reply
/// carries the token, once, with the CA's pin and the install command.
pub async fn create_join_token(
    shared: &Shared,
    caller: &Caller,
    params: &Params,
) -> Result<Value, ApiError> {
    require_admin(caller, "create join tokens")?;
    let settings = settings(shared)?;
    let req: CreateToken = params.parse()?;
    let bk_biz_id = req
        .bk_biz_id
        .ok_or_else(|| ApiError::missing("bk_biz_id"))?;
    let inventory = shared.inventory.base();
    if inventory.business(bk_biz_id).is_none() {
        return Err(ApiError::invalid(
            "bk_biz_id",
            format!("business {bk_biz_id} is not in the inventory"),
        ));
    }
    if let Some(module) = req.bk_module_id {
        match inventory.business_of_node("module", module) {
            Some(biz) if biz == bk_biz_id => {}
            Some(biz) => {
                return Err(ApiError::invalid(
                    "bk_module_id",
                    format!("module {module} is in business {biz}, not {bk_biz_id}"),
                ));
            }
            None => {
                return Err(ApiError::invalid(
                    "bk_module_id",
                    format!("module {module} is not in the inventory"),
                ));
            }
        }
    }
    let bk_cloud_id = req.bk_cloud_id.unwrap_or(0);
    if bk_cloud_id < 0 {
        return Err(ApiError::invalid("bk_cloud_id", "must not be negative"));
    }
    let ttl = req.ttl_secs.unwrap_or(DEFAULT_TTL_SECS);
    if !(1..=MAX_TTL_SECS).contains(&ttl) {
        return Err(ApiError::invalid(
            "ttl_secs",
            format!("{ttl} is not between 1 and {MAX_TTL_SECS}"),
        ));
    }
    let max_uses = req.max_uses.unwrap_or(1);
    if !(1..=MAX_USES).contains(&max_uses) {
        return Err(ApiError::invalid(
            "max_uses",
            format!("{max_uses} is not between 1 and {MAX_USES}"),
        ));
    }
    let description = req.description.unwrap_or_default();
    if description.len() > MAX_DESCRIPTION {
        return Err(ApiError::invalid(
            "description",
            format!("{} bytes, more than {MAX_DESCRIPTION}", description.len()),
        ));
    }
    let made = crate::enroll::token::generate()
        .map_err(|_| ApiError::internal("join token", "the system's random source failed"))?;
    let now = crate::now_ms();
    let token = JoinToken {
        token_id: made.token_id.clone(),
        token_sha256: made.sha256.clone(),
        bk_biz_id,
        bk_module_id: req.bk_module_id,
        bk_cloud_id,
        max_uses,
        uses: 0,
        created_at: now,
        expires_at: now.saturating_add(ttl.saturating_mul(1000)),
        created_by: caller.username.clone(),
        description,
        revoked_at: None,
        revoked_by: None,
    };
    shared.store.create_join_token(&token).await?;
    tracing::info!(token_id = token.token_id, bk_biz_id, "join token created");
    let mut out = token_json(&token, now);
    out["token"] = json!(made.text);
    out["ca_pin"] = json!(settings.pin);
    out["agent_address"] = json!(settings.agent_address);
    out["enroll_command"] = json!(crate::enroll::enroll_command(
        &settings.agent_address,
        &made.text,
        &settings.pin
    ));
    out["install_command"] = json!(crate::enroll::install_command(
        &settings.api_url,
        &settings.agent_address,
        &made.text,
        &settings.pin
    ));
    Ok(out)
}

/// Every join token, newest first, with its state.
pub async fn list_join_tokens(shared: &Shared, caller: &Caller) -> Result<Value, ApiError> {
    require_admin(caller, "list join tokens")?;
    let now = crate::now_ms();
    let tokens = shared.store.join_tokens().await?;
    Ok(Value::Array(
        tokens.iter().map(|t| token_json(t, now)).collect(),
    ))
}

#[derive(Debug, Deserialize)]
struct RevokeToken {
    #[serde(default)]
    token_id: Option<String>,
}

/// Revokes a token: enrollments with it are refused from now on. Agents that enrolled with it
/// keep their certificates (revoke them with `revoke_agent`).
pub async fn revoke_join_token(
    shared: &Shared,
    caller: &Caller,
    params: &Params,
) -> Result<Value, ApiError> {
    require_admin(caller, "revoke join tokens")?;
    let req: RevokeToken = params.parse()?;
    let given = req.token_id.ok_or_else(|| ApiError::missing("token_id"))?;
    // A whole token names its id too.
    let token_id = match crate::enroll::token::parse(given.trim()) {
        Ok((id, _)) => id,
        Err(_) => given.trim().to_ascii_lowercase(),
    };
    let now = crate::now_ms();
    let token = shared
        .store
        .revoke_join_token(&token_id, &caller.username, now)
        .await?
        .ok_or_else(|| ApiError::invalid("token_id", format!("{given:?} is not a join token")))?;
    tracing::warn!(token_id, "join token revoked");
    Ok(token_json(&token, now))
}
