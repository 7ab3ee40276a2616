//! What the submit APIs (`fast_execute_script`, `fast_transfer_file`, `push_config_file`) check
//! the same way: a step's `timeout` and `task_name`, the `callback_url`, the account a step runs
//! as.

use super::ApiError;
use crate::Shared;

/// Longest `task_name` a submit API takes, in characters.
const MAX_TASK_NAME_CHARS: usize = 512;
/// A step's `timeout` when the request gives none, in seconds.
const DEFAULT_TIMEOUT: i64 = 7200;
/// Longest `timeout` a step may have, in seconds (a day).
const MAX_TIMEOUT: i64 = 86_400;

/// A submitted step's `timeout`, as every submit API reads it: 1 to 86,400 seconds, 7200 when
/// absent.
pub(super) fn step_timeout(timeout: Option<i64>) -> Result<i64, ApiError> {
    let timeout = timeout.unwrap_or(DEFAULT_TIMEOUT);
    if !(1..=MAX_TIMEOUT).contains(&timeout) {
        return Err(ApiError::invalid(
            "timeout",
            format!("{timeout} is outside [1, {MAX_TIMEOUT}]"),
        ));
    }
    Ok(timeout)
}

/// Refuses a submitted step's `task_name` longer than 512 characters.
pub(super) fn check_task_name(task_name: Option<&str>) -> Result<(), ApiError> {
    if let Some(name) = task_name
        && name.chars().count() > MAX_TASK_NAME_CHARS
    {
        return Err(ApiError::invalid(
            "task_name",
            format!("longer than {MAX_TASK_NAME_CHARS} characters"),
        ));
    }
    Ok(())
}

/// A submitted job's `callback_url` (empty is none), refused unless callbacks may reach it.
pub(super) fn callback_url(
    shared: &Shared,
    callback_url: Option<&str>,
) -> Result<Option<String>, ApiError> {
    match callback_url.filter(|u| !u.is_empty()) {
        None => Ok(None),
        Some(url) => Ok(Some(
            crate::callback::check_url(url, shared.config.http_listen, &shared.config.callbacks)
                .map_err(|e| ApiError::invalid("callback_url", e))?
                .to_string(),
        )),
    }
}

/// Which request fields name an account, for the errors of [`requested_account`].
#[derive(Debug, Clone, Copy)]
pub(super) enum AccountFields<'a> {
    /// The request's `account_id` and `account_alias`: a missing account names both, any other
    /// error the one given (`account_id` wins when both are).
    IdOrAlias,
    /// One field every error names (a file source's `account`, or both fields at once).
    Named(&'a str),
}

/// The account a step asks for by id or alias, among those `scope` may use: `account_id` wins
/// over `account_alias`.
pub(super) fn requested_account<'i>(
    inventory: &'i fleetrun_inventory::Inventory,
    scope: &fleetrun_inventory::Scope,
    account_id: Option<i64>,
    account_alias: Option<&str>,
    fields: AccountFields<'_>,
) -> Result<&'i fleetrun_inventory::Account, ApiError> {
    inventory
        .account_for(scope, account_id, account_alias)
        .map_err(|e| {
            let (missing, named) = match fields {
                AccountFields::IdOrAlias if account_id.is_some() => {
                    ("account_id or account_alias", "account_id")
                }
                AccountFields::IdOrAlias => ("account_id or account_alias", "account_alias"),
                AccountFields::Named(field) => (field, field),
            };
            match e {
                fleetrun_inventory::AccountError::Missing => ApiError::missing(missing),
                other => ApiError::new(i64::from(other.code()), format!("{named}: {other}")),
            }
        })
}
