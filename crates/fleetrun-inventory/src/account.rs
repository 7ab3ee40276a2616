//! Which execution account a job runs as.

use crate::{
    inventory::Inventory,
    model::{Account, AccountCategory, Scope},
};

/// A job's account could not be used.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum AccountError {
    /// Neither an account id nor an alias was given.
    #[error("no account_id or account_alias")]
    Missing,
    /// No system account has this id or alias.
    #[error("account {0} does not exist")]
    Unknown(String),
    /// The account exists but the scope may not use it.
    #[error("account {account} is not allowed in {scope}")]
    NotAllowed { account: String, scope: Scope },
}

impl AccountError {
    /// The bk-job error code.
    pub fn code(&self) -> i32 {
        match self {
            AccountError::Missing => 1241004,
            AccountError::Unknown(_) => 1244003,
            AccountError::NotAllowed { .. } => 1244004,
        }
    }
}

impl Inventory {
    /// The system account a job in `scope` runs as. `account_id` wins over `alias`, as in bk-job.
    /// Database accounts never run scripts, so they are unknown here.
    pub fn account_for(
        &self,
        scope: &Scope,
        account_id: Option<i64>,
        alias: Option<&str>,
    ) -> Result<&Account, AccountError> {
        let system = self
            .accounts
            .iter()
            .filter(|a| a.category == AccountCategory::System);
        let (name, mut candidates): (String, Vec<&Account>) = match (account_id, alias) {
            (Some(id), _) => (id.to_string(), system.filter(|a| a.id == id).collect()),
            (None, Some(alias)) => (
                format!("{alias:?}"),
                system.filter(|a| a.alias == alias).collect(),
            ),
            (None, None) => return Err(AccountError::Missing),
        };
        if candidates.is_empty() {
            return Err(AccountError::Unknown(name));
        }
        // Validation keeps one alias to one account per scope, so at most one remains.
        candidates.retain(|a| a.allowed_in(scope));
        candidates.first().copied().ok_or(AccountError::NotAllowed {
            account: name,
            scope: *scope,
        })
    }
}
