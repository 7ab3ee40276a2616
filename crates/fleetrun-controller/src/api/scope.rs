//! The scope a request acts in (`bk_scope_type` + `bk_scope_id`), and whether the caller may.

use serde_json::{Value, json};

use super::{ApiError, auth::Caller, error::code, params::Params};
use crate::Shared;

/// A checked scope: it exists, and the calling app may act on it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Scope {
    pub scope_type: String,
    /// The id as a number writes it (`"02"` is `"2"`), so every row stored under it agrees.
    pub scope_id: String,
    /// The same scope as the inventory names it.
    pub inventory: fleetrun_inventory::Scope,
}

impl Scope {
    /// Whether a stored job belongs to this scope. Ids compare as numbers: rows stored before
    /// ids were written canonically may hold `"02"` for business 2, and stay reachable.
    pub fn owns(&self, scope_type: &str, scope_id: &str) -> bool {
        let id = match self.inventory {
            fleetrun_inventory::Scope::Biz(id) | fleetrun_inventory::Scope::BizSet(id) => id,
        };
        self.scope_type == scope_type && scope_id.parse::<i64>() == Ok(id)
    }
}

fn text(params: &Params, key: &str) -> Option<String> {
    match params.0.get(key)? {
        Value::String(s) if !s.is_empty() => Some(s.clone()),
        Value::Number(n) => Some(n.to_string()),
        _ => None,
    }
}

/// Reads and checks the request's scope. Older clients send only `bk_biz_id`.
pub fn resolve(shared: &Shared, caller: &Caller, params: &Params) -> Result<Scope, ApiError> {
    let scope = requested(params)?;
    let (scope_type, scope_id, inventory) = (&scope.scope_type, &scope.scope_id, scope.inventory);
    // Permission first: an app that may not use a scope learns nothing from asking about it,
    // not even whether it exists.
    if !caller.may_use(inventory) {
        let mut error = ApiError::new(
            code::NO_PERMISSION,
            format!(
                "app {:?} may not act on {scope_type} {scope_id}",
                caller.app_code
            ),
        );
        error.permission = Some(permission(scope_type, scope_id));
        return Err(error);
    }
    if !shared.inventory.base().has_scope(&inventory) {
        let what = if scope_type == "biz" {
            "business"
        } else {
            "business set"
        };
        return Err(ApiError::invalid(
            "bk_scope_id",
            format!("{what} {scope_id} does not exist"),
        ));
    }
    Ok(scope)
}

/// The scope the request names, its id made canonical (`"02"` is business `"2"`), not yet
/// checked against the caller or the inventory.
fn requested(params: &Params) -> Result<Scope, ApiError> {
    let (scope_type, scope_id) = match (
        text(params, "bk_scope_type"),
        text(params, "bk_scope_id"),
        text(params, "bk_biz_id"),
    ) {
        (Some(t), Some(id), _) => (t, id),
        (None, None, Some(biz)) => ("biz".to_owned(), biz),
        (None, _, _) => return Err(ApiError::missing("bk_scope_type")),
        (_, None, _) => return Err(ApiError::missing("bk_scope_id")),
    };
    let id: i64 = scope_id
        .parse()
        .map_err(|_| ApiError::invalid("bk_scope_id", format!("{scope_id:?} is not a number")))?;
    let inventory = match scope_type.as_str() {
        "biz" => fleetrun_inventory::Scope::Biz(id),
        "biz_set" => fleetrun_inventory::Scope::BizSet(id),
        other => {
            return Err(ApiError::invalid(
                "bk_scope_type",
                format!("{other:?} is not \"biz\" or \"biz_set\""),
            ));
        }
    };
    Ok(Scope {
        scope_type,
        scope_id: id.to_string(),
        inventory,
    })
}

/// Refuses hosts named by id or address (`targets`' `host_ids`, else its `ips`) that the caller
/// may not see, exactly as [`fleetrun_inventory::Inventory::resolve`] refuses hosts that do not
/// exist: for an app restricted to some businesses, a host of another business, or one not yet
/// placed, is not there. Without this, "outside the scope" would tell it that the host exists,
/// and for an address, which host holds it.
pub fn refuse_unseen_hosts(
    caller: &Caller,
    inventory: &fleetrun_inventory::Inventory,
    targets: &fleetrun_inventory::Targets,
) -> Result<(), ApiError> {
    if caller.is_unrestricted() {
        return Ok(());
    }
    let seen = |host: Option<&fleetrun_inventory::Host>| {
        host.is_some_and(|h| caller.may_see_business(inventory, h.bk_biz_id))
    };
    let mut unseen = Vec::new();
    match targets.host_ids.as_deref().filter(|ids| !ids.is_empty()) {
        Some(ids) => {
            for &id in ids {
                if !seen(inventory.host(id)) {
                    unseen.push(id.to_string());
                }
            }
        }
        None => {
            for (cloud, text) in targets.ips.as_deref().unwrap_or_default() {
                match text.trim().parse::<std::net::IpAddr>() {
                    Ok(ip) if seen(inventory.host_by_address(*cloud, ip)) => {}
                    Ok(ip) => unseen.push(format!("{cloud}:{}", ip.to_canonical())),
                    Err(_) => unseen.push(format!("{cloud}:{text}")),
                }
            }
        }
    }
    if unseen.is_empty() {
        return Ok(());
    }
    let mut once = std::collections::HashSet::new();
    unseen.retain(|name| once.insert(name.clone()));
    let error = fleetrun_inventory::ResolveError::UnknownHosts(unseen);
    Err(ApiError::new(
        i64::from(error.code()),
        format!("target_server: {error}"),
    ))
}

/// bk-job's description of the permission the caller lacks.
fn permission(scope_type: &str, scope_id: &str) -> Value {
    let resource_type = if scope_type == "biz" {
        "biz"
    } else {
        "business_set"
    };
    json!({
        "system_id": "bk_job",
        "system_name": "fleetrun",
        "actions": [{
            "id": "access_business",
            "name": "access business",
            "related_resource_types": [{
                "system_id": "bk_cmdb",
                "system_name": "inventory",
                "type": resource_type,
                "type_name": scope_type,
                "instances": [[{"type": resource_type, "type_name": scope_type, "id": scope_id, "name": scope_id}]],
            }],
        }],
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn params(value: Value) -> Params {
        Params(value.as_object().unwrap().clone())
    }

    #[test]
    fn a_scope_id_with_leading_zeros_is_stored_canonically() {
        let scope = requested(&params(
            json!({"bk_scope_type": "biz", "bk_scope_id": "02"}),
        ))
        .unwrap();
        assert_eq!(scope.scope_id, "2");
        assert_eq!(scope.inventory, fleetrun_inventory::Scope::Biz(2));
        let legacy = requested(&params(json!({"bk_biz_id": "007"}))).unwrap();
        assert_eq!(
            (legacy.scope_type.as_str(), legacy.scope_id.as_str()),
            ("biz", "7")
        );
        let number = requested(&params(
            json!({"bk_scope_type": "biz_set", "bk_scope_id": 9}),
        ))
        .unwrap();
        assert_eq!(number.scope_id, "9");
    }

    #[test]
    fn owns_compares_ids_as_numbers() {
        let two = requested(&params(json!({"bk_scope_type": "biz", "bk_scope_id": "2"}))).unwrap();
        // A row stored as sent before ids were made canonical stays reachable.
        assert!(two.owns("biz", "02"));
        assert!(two.owns("biz", "2"));
        assert!(!two.owns("biz", "20"));
        assert!(!two.owns("biz_set", "2"));
        assert!(!two.owns("biz", "two"));
    }
}
