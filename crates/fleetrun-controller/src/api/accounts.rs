//! bk-job's account APIs: `get_account_list`, and `create_account`, `update_account`,
//! `delete_account`, which change the inventory's accounts as one revision each (so they need
//! the app's `admin` grant, as every inventory change does).

use fleetrun_inventory::{Account, AccountCategory, Change};
use serde::{Deserialize, Serialize};
use serde_json::Value;

use super::{
    ApiError,
    admin::{require_admin, to_the_end},
    auth::Caller,
    error::code,
    params::{Params, lenient, paging},
    reply::{self, Page},
    scope::{self, Scope},
};
use crate::{Shared, now_ms};

/// bk-job's account category numbers.
mod category {
    pub const SYSTEM: i64 = 1;
    pub const DATABASE: i64 = 2;
}

/// bk-job's account type numbers of system accounts.
mod account_type {
    pub const LINUX: i64 = 1;
    pub const WINDOWS: i64 = 2;
}

const MAX_ACCOUNT_CHARS: usize = 32;
const MAX_ALIAS_CHARS: usize = 32;
const MAX_DESCRIPTION_CHARS: usize = 1024;

/// An account as bk-job's account APIs return it.
#[derive(Debug, Serialize)]
struct AccountReply {
    id: i64,
    account: String,
    alias: String,
    category: i64,
    #[serde(rename = "type")]
    account_type: i64,
    os: Option<&'static str>,
    bk_scope_type: String,
    bk_scope_id: String,
    description: String,
    /// bk-job's OS account behind a database account; fleetrun keeps no database accounts'
    /// credentials, so there is none.
    db_system_account_id: Option<i64>,
    creator: String,
    create_time: i64,
    last_modify_user: String,
    last_modify_time: i64,
}

fn category_of(a: &Account) -> i64 {
    match a.category {
        AccountCategory::System => category::SYSTEM,
        AccountCategory::Database => category::DATABASE,
    }
}

/// An account for the reply. Accounts written in the inventory document without a record of
/// who made them (the file, the configuration) are attributed to the current revision.
fn account_reply(shared: &Shared, scope: &Scope, a: &Account) -> AccountReply {
    let revision = shared.inventory.revision().info;
    let windows = a.os_type == "windows";
    AccountReply {
        id: a.id,
        account: a.account.clone(),
        alias: a.alias.clone(),
        category: category_of(a),
        account_type: if windows {
            account_type::WINDOWS
        } else {
            account_type::LINUX
        },
        os: (a.category == AccountCategory::System).then_some(if windows {
            "Windows"
        } else {
            "Linux"
        }),
        bk_scope_type: scope.scope_type.clone(),
        bk_scope_id: scope.scope_id.clone(),
        description: a.description.clone(),
        db_system_account_id: None,
        creator: a
            .record
            .creator
            .clone()
            .unwrap_or_else(|| revision.operator.clone()),
        create_time: a.record.create_time.unwrap_or(revision.created_at),
        last_modify_user: a
            .record
            .last_modify_user
            .clone()
            .unwrap_or_else(|| revision.operator.clone()),
        last_modify_time: a.record.last_modify_time.unwrap_or(revision.created_at),
    }
}

#[derive(Debug, Deserialize)]
struct ListRequest {
    #[serde(default, deserialize_with = "lenient::opt_int")]
    category: Option<i64>,
    account: Option<String>,
    alias: Option<String>,
    #[serde(default, deserialize_with = "lenient::opt_int")]
    start: Option<i64>,
    #[serde(default, deserialize_with = "lenient::opt_int")]
    length: Option<i64>,
}

/// `get_account_list`: the accounts usable in the scope.
pub async fn get_account_list(
    shared: &Shared,
    caller: &Caller,
    params: &Params,
) -> Result<Value, ApiError> {
    let scope = scope::resolve(shared, caller, params)?;
    let req: ListRequest = params.parse()?;
    if let Some(c) = req.category
        && ![category::SYSTEM, category::DATABASE].contains(&c)
    {
        return Err(ApiError::invalid(
            "category",
            format!("{c} is not 1 (system) or 2 (database)"),
        ));
    }
    let (start, length) = paging(req.start, req.length)?;
    let inventory = shared.inventory.base();
    let matching: Vec<&Account> = inventory
        .accounts()
        .iter()
        .filter(|a| a.allowed_in(&scope.inventory))
        .filter(|a| req.category.is_none_or(|c| c == category_of(a)))
        .filter(|a| {
            req.account
                .as_deref()
                .is_none_or(|x| x.is_empty() || a.account.contains(x))
        })
        .filter(|a| {
            req.alias
                .as_deref()
                .is_none_or(|x| x.is_empty() || a.alias.contains(x))
        })
        .collect();
    reply::data(Page {
        start,
        length,
        total: matching.len() as i64,
        data: matching
            .iter()
            .skip(start as usize)
            .take(length as usize)
            .map(|a| account_reply(shared, &scope, a))
            .collect(),
    })
}

/// Text of at most `max` characters, without control characters (it lands in the inventory
/// document and in logs).
fn text_field(field: &str, value: &str, max: usize) -> Result<(), ApiError> {
    if value.chars().count() > max {
        return Err(ApiError::invalid(
            field,
            format!("longer than {max} characters"),
        ));
    }
    if value.chars().any(char::is_control) {
        return Err(ApiError::invalid(field, "contains a control character"));
    }
    Ok(())
}

/// An OS user name as `useradd` takes it: letters, digits, `_`, `-`, `.`, not starting with
/// `-`.
fn check_account_name(name: &str) -> Result<(), ApiError> {
    text_field("account", name, MAX_ACCOUNT_CHARS)?;
    let valid = !name.is_empty()
        && !name.starts_with('-')
        && name
            .chars()
            .all(|c| c.is_ascii_alphanumeric() || matches!(c, '_' | '-' | '.'));
    if !valid {
        return Err(ApiError::invalid(
            "account",
            format!("{name:?} is not an OS user name (letters, digits, _ - .)"),
        ));
    }
    Ok(())
}

/// bk-job keeps a Windows account's password; fleetrun's agents switch users without one.
fn refuse_password(password: Option<&str>) -> Result<(), ApiError> {
    if password.is_some_and(|p| !p.is_empty()) {
        return Err(ApiError::new(
            code::NOT_SUPPORTED,
            "password: fleetrun keeps no account passwords (its agents switch users without one); send none",
        ));
    }
    Ok(())
}

/// Refuses an alias another system account usable in the scope has (bk-job's
/// ACCOUNT_ALIAS_EXIST).
fn refuse_taken_alias(
    shared: &Shared,
    scope: &Scope,
    alias: &str,
    except: Option<i64>,
) -> Result<(), ApiError> {
    let inventory = shared.inventory.base();
    let taken = inventory.accounts().iter().any(|a| {
        Some(a.id) != except
            && a.alias == alias
            && a.category == AccountCategory::System
            && a.allowed_in(&scope.inventory)
    });
    if taken {
        return Err(ApiError::new(
            code::ACCOUNT_ALIAS_EXISTS,
            format!(
                "alias: {alias:?} is already an account's alias in {} {}",
                scope.scope_type, scope.scope_id
            ),
        ));
    }
    Ok(())
}

/// Applies `changes` as one inventory revision, run to its end even if the client goes away.
async fn commit(shared: &Shared, caller: &Caller, changes: Vec<Change>) -> Result<(), ApiError> {
    let inventory = shared.inventory.clone();
    let agents = shared.agents.clone();
    let operator = caller.username.clone();
    to_the_end(async move {
        let connected = |bk_host_id| agents.get(bk_host_id).is_some();
        inventory.change(changes, None, &operator, connected).await
    })
    .await??;
    Ok(())
}

/// The account `id`, if the scope may use it.
fn account_in(shared: &Shared, scope: &Scope, id: i64) -> Result<Account, ApiError> {
    shared
        .inventory
        .base()
        .accounts()
        .iter()
        .find(|a| a.id == id && a.allowed_in(&scope.inventory))
        .cloned()
        .ok_or_else(|| {
            ApiError::new(
                code::ACCOUNT_NOT_FOUND,
                format!(
                    "id: no account {id} in {} {}",
                    scope.scope_type, scope.scope_id
                ),
            )
        })
}

#[derive(Debug, Deserialize)]
struct CreateRequest {
    account: Option<String>,
    #[serde(default, deserialize_with = "lenient::opt_int", rename = "type")]
    account_type: Option<i64>,
    #[serde(default, deserialize_with = "lenient::opt_int")]
    category: Option<i64>,
    password: Option<String>,
    alias: Option<String>,
    description: Option<String>,
}

/// `create_account`: a system account usable in the request's scope.
pub async fn create_account(
    shared: &Shared,
    caller: &Caller,
    params: &Params,
) -> Result<Value, ApiError> {
    let scope = scope::resolve(shared, caller, params)?;
    require_admin(caller, "create accounts")?;
    let req: CreateRequest = params.parse()?;
    let account = req
        .account
        .filter(|a| !a.is_empty())
        .ok_or_else(|| ApiError::missing("account"))?;
    check_account_name(&account)?;
    match req.account_type {
        None => return Err(ApiError::missing("type")),
        Some(account_type::LINUX) => {}
        Some(account_type::WINDOWS) => {
            return Err(ApiError::new(
                code::NOT_SUPPORTED,
                "type: fleetrun's agents run on Linux; Windows accounts cannot run anything",
            ));
        }
        Some(other) => {
            return Err(ApiError::invalid(
                "type",
                format!("{other} is not 1 (Linux) or 2 (Windows)"),
            ));
        }
    }
    match req.category {
        None => return Err(ApiError::missing("category")),
        Some(category::SYSTEM) => {}
        Some(other) => {
            return Err(ApiError::invalid(
                "category",
                format!("{other} is not 1 (system): only system accounts are created here"),
            ));
        }
    }
    refuse_password(req.password.as_deref())?;
    let alias = req
        .alias
        .filter(|a| !a.is_empty())
        .unwrap_or_else(|| account.clone());
    text_field("alias", &alias, MAX_ALIAS_CHARS)?;
    let description = req.description.unwrap_or_default();
    text_field("description", &description, MAX_DESCRIPTION_CHARS)?;
    refuse_taken_alias(shared, &scope, &alias, None)?;

    let id = shared
        .inventory
        .base()
        .accounts()
        .iter()
        .map(|a| a.id)
        .max()
        .unwrap_or(0)
        .checked_add(1)
        .ok_or_else(|| ApiError::internal("create account", "account ids exhausted"))?;
    let now = now_ms();
    commit(
        shared,
        caller,
        vec![
            Change::CreateAccount {
                id,
                alias,
                account,
                os_type: Some("linux".to_owned()),
                category: Some("system".to_owned()),
                scopes: vec![format!("{}:{}", scope.scope_type, scope.scope_id)],
            },
            Change::DescribeAccount {
                id,
                description: Some(description),
                creator: Some(caller.username.clone()),
                create_time: Some(now),
                last_modify_user: Some(caller.username.clone()),
                last_modify_time: Some(now),
            },
        ],
    )
    .await?;
    let created = account_in(shared, &scope, id)?;
    reply::data(account_reply(shared, &scope, &created))
}

#[derive(Debug, Deserialize)]
struct UpdateRequest {
    #[serde(default, deserialize_with = "lenient::opt_int")]
    id: Option<i64>,
    password: Option<String>,
    alias: Option<String>,
    description: Option<String>,
}

/// `update_account`: an account's alias or description.
pub async fn update_account(
    shared: &Shared,
    caller: &Caller,
    params: &Params,
) -> Result<Value, ApiError> {
    let scope = scope::resolve(shared, caller, params)?;
    require_admin(caller, "change accounts")?;
    let req: UpdateRequest = params.parse()?;
    let id = req.id.ok_or_else(|| ApiError::missing("id"))?;
    refuse_password(req.password.as_deref())?;
    account_in(shared, &scope, id)?;
    let alias = req.alias.filter(|a| !a.is_empty());
    if let Some(alias) = &alias {
        text_field("alias", alias, MAX_ALIAS_CHARS)?;
        refuse_taken_alias(shared, &scope, alias, Some(id))?;
    }
    if let Some(description) = &req.description {
        text_field("description", description, MAX_DESCRIPTION_CHARS)?;
    }
    commit(
        shared,
        caller,
        vec![
            Change::UpdateAccount {
                id,
                alias,
                account: None,
                os_type: None,
                category: None,
                scopes: None,
            },
            Change::DescribeAccount {
                id,
                description: req.description,
                creator: None,
                create_time: None,
                last_modify_user: Some(caller.username.clone()),
                last_modify_time: Some(now_ms()),
            },
        ],
    )
    .await?;
    let updated = account_in(shared, &scope, id)?;
    reply::data(account_reply(shared, &scope, &updated))
}

#[derive(Debug, Deserialize)]
struct DeleteRequest {
    #[serde(default, deserialize_with = "lenient::opt_int")]
    id: Option<i64>,
}

/// `delete_account`: removes the account from the inventory; returns it as it was.
pub async fn delete_account(
    shared: &Shared,
    caller: &Caller,
    params: &Params,
) -> Result<Value, ApiError> {
    let scope = scope::resolve(shared, caller, params)?;
    require_admin(caller, "delete accounts")?;
    let req: DeleteRequest = params.parse()?;
    let id = req.id.ok_or_else(|| ApiError::missing("id"))?;
    let account = account_in(shared, &scope, id)?;
    let reply = account_reply(shared, &scope, &account);
    commit(shared, caller, vec![Change::DeleteAccount { id }]).await?;
    reply::data(reply)
}
