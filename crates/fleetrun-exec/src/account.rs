//! The OS account a script runs as, resolved before anything is forked.

use std::ffi::CString;
use std::path::PathBuf;

use nix::unistd::{Gid, Uid, User, getgrouplist};

/// Everything the child needs to become the account, collected up front
/// because only async-signal-safe calls are allowed between fork and exec.
#[derive(Debug, Clone)]
pub(crate) struct Account {
    pub name: String,
    pub uid: Uid,
    pub gid: Gid,
    /// Supplementary groups plus the primary one, as `setgroups` wants them.
    pub groups: Vec<Gid>,
    pub home: PathBuf,
    pub shell: PathBuf,
    /// False when the agent already is this account and cannot (nor needs
    /// to) change credentials.
    pub switch: bool,
}

/// Who the agent itself runs as.
#[derive(Debug, Clone)]
pub(crate) struct AgentIdentity {
    uid: Uid,
    name: String,
}

impl AgentIdentity {
    pub(crate) fn current() -> Self {
        let uid = Uid::effective();
        let name = match User::from_uid(uid) {
            Ok(Some(user)) => user.name,
            _ => uid.to_string(),
        };
        Self { uid, name }
    }
}

/// Why a task's account cannot be used.
#[derive(Debug, thiserror::Error)]
pub(crate) enum AccountError {
    /// No such user in the passwd database.
    #[error("the account {0} does not exist on this host")]
    NotFound(String),
    /// The passwd lookup itself failed (NSS down, ...).
    #[error("cannot look up the account {account}: {source}")]
    Lookup {
        /// The account asked for.
        account: String,
        /// Why.
        source: nix::Error,
    },
    /// The user's groups could not be listed.
    #[error("cannot list the groups of {account}: {source}")]
    Groups {
        /// The account asked for.
        account: String,
        /// Why.
        source: nix::Error,
    },
    /// An unprivileged agent was asked to run as someone else.
    #[error("the agent runs as {agent} and cannot switch to {account}")]
    CannotSwitch {
        /// The agent's own user.
        agent: String,
        /// The account asked for.
        account: String,
    },
}

/// Looks the account up in passwd and its groups with `getgrouplist`. This
/// blocks on NSS: call it from a blocking thread.
pub(crate) fn resolve(name: &str, agent: &AgentIdentity) -> Result<Account, AccountError> {
    let user = match User::from_name(name) {
        Ok(Some(user)) => user,
        Ok(None) => return Err(AccountError::NotFound(name.to_owned())),
        Err(source) => {
            return Err(AccountError::Lookup {
                account: name.to_owned(),
                source,
            });
        }
    };
    let switch = must_switch(agent, user.uid, name)?;
    let groups = if switch {
        // User::from_name has already refused names with a NUL byte.
        let c_name = CString::new(name).map_err(|_| AccountError::NotFound(name.to_owned()))?;
        let mut groups =
            getgrouplist(&c_name, user.gid).map_err(|source| AccountError::Groups {
                account: name.to_owned(),
                source,
            })?;
        if !groups.contains(&user.gid) {
            groups.push(user.gid);
        }
        groups
    } else {
        Vec::new()
    };
    let shell = if user.shell.as_os_str().is_empty() {
        PathBuf::from("/bin/sh")
    } else {
        user.shell
    };
    Ok(Account {
        name: user.name,
        uid: user.uid,
        gid: user.gid,
        groups,
        home: user.dir,
        shell,
        switch,
    })
}

/// Whether the child must change credentials: root always does (even to
/// root, to drop the agent's own supplementary groups); anyone else can only
/// run scripts as itself.
fn must_switch(agent: &AgentIdentity, target: Uid, account: &str) -> Result<bool, AccountError> {
    if agent.uid.is_root() {
        Ok(true)
    } else if agent.uid == target {
        Ok(false)
    } else {
        Err(AccountError::CannotSwitch {
            agent: agent.name.clone(),
            account: account.to_owned(),
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn agent(uid: u32, name: &str) -> AgentIdentity {
        AgentIdentity {
            uid: Uid::from_raw(uid),
            name: name.to_owned(),
        }
    }

    #[test]
    fn root_switches_to_anyone() {
        assert!(must_switch(&agent(0, "root"), Uid::from_raw(1000), "alice").unwrap());
        assert!(must_switch(&agent(0, "root"), Uid::from_raw(0), "root").unwrap());
    }

    #[test]
    fn unprivileged_agent_runs_only_as_itself() {
        assert!(!must_switch(&agent(1000, "svc"), Uid::from_raw(1000), "svc").unwrap());
        let err = must_switch(&agent(1000, "svc"), Uid::from_raw(0), "root").unwrap_err();
        assert_eq!(
            err.to_string(),
            "the agent runs as svc and cannot switch to root"
        );
    }

    #[test]
    fn resolves_root_with_its_groups() {
        let account = resolve("root", &agent(0, "root")).unwrap();
        assert_eq!(account.uid, Uid::from_raw(0));
        assert!(account.groups.contains(&Gid::from_raw(0)));
        assert_eq!(account.home, PathBuf::from("/root"));
        assert!(account.switch);
    }

    #[test]
    fn unknown_and_malformed_names_are_not_found() {
        for name in ["fleetrun-no-such-user", "", "a\0b"] {
            match resolve(name, &agent(0, "root")) {
                Err(AccountError::NotFound(n)) => assert_eq!(n, name),
                other => panic!("{name:?}: {other:?}"),
            }
        }
    }
}
