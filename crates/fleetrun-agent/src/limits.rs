//! Local limits: what the host's owner lets any controller make this agent do, whatever the
//! controller asks. A task outside them is refused before anything is staged or started, and
//! ends with a result that names the limit, so the controller shows why.

use fleetrun_proto::TaskRequest;
use serde::Deserialize;

/// `[limits]` in the agent's configuration. Without the section, the agent runs what the
/// controller sends as any account in any language.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct LocalLimits {
    /// Whether tasks may run as an account whose uid is 0 (`root`, or any other name for uid 0).
    #[serde(default = "allowed")]
    pub allow_root: bool,
    /// The only accounts tasks may run as; any account when absent.
    pub accounts: Option<Vec<String>>,
    /// The only script languages tasks may use; any language when absent.
    pub languages: Option<Vec<LanguageName>>,
}

impl Default for LocalLimits {
    fn default() -> Self {
        Self {
            allow_root: true,
            accounts: None,
            languages: None,
        }
    }
}

fn allowed() -> bool {
    true
}

/// A script language as the host's owner writes it in `limits.languages`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum LanguageName {
    Shell,
    Bat,
    Perl,
    Python,
    Powershell,
}

impl LanguageName {
    const ALL: [LanguageName; 5] = [
        Self::Shell,
        Self::Bat,
        Self::Perl,
        Self::Python,
        Self::Powershell,
    ];

    /// bk-job's `script_language` number.
    fn code(self) -> i32 {
        match self {
            Self::Shell => 1,
            Self::Bat => 2,
            Self::Perl => 3,
            Self::Python => 4,
            Self::Powershell => 5,
        }
    }

    fn name(self) -> &'static str {
        match self {
            Self::Shell => "shell",
            Self::Bat => "bat",
            Self::Perl => "perl",
            Self::Python => "python",
            Self::Powershell => "powershell",
        }
    }

    fn of_code(code: i32) -> Option<Self> {
        Self::ALL.into_iter().find(|l| l.code() == code)
    }
}

/// How an account name resolves to a uid; the passwd database in the agent, a table in tests.
pub(crate) trait Accounts {
    /// The account's uid, `None` when there is no such account.
    fn uid(&self, account: &str) -> Option<u32>;
}

/// The host's passwd database (and whatever NSS adds to it).
#[derive(Debug)]
pub(crate) struct Passwd;

impl Accounts for Passwd {
    fn uid(&self, account: &str) -> Option<u32> {
        nix::unistd::User::from_name(account)
            .ok()
            .flatten()
            .map(|user| user.uid.as_raw())
    }
}

impl LocalLimits {
    /// What a configuration cannot mean: an empty list would refuse every task.
    pub(crate) fn validate(&self) -> Result<(), (&'static str, String)> {
        if self.accounts.as_ref().is_some_and(Vec::is_empty) {
            return Err((
                "accounts",
                "limits.accounts is empty, which refuses every task: list the accounts tasks \
                 may run as, or remove the key to allow any"
                    .into(),
            ));
        }
        if self.languages.as_ref().is_some_and(Vec::is_empty) {
            return Err((
                "languages",
                "limits.languages is empty, which refuses every task: list the languages tasks \
                 may use, or remove the key to allow any"
                    .into(),
            ));
        }
        if !self.allow_root
            && let Some(accounts) = &self.accounts
            && accounts.iter().any(|a| a == "root")
        {
            return Err((
                "accounts",
                "limits.accounts lists root while limits.allow_root is false: remove one of them"
                    .into(),
            ));
        }
        Ok(())
    }

    /// Whether this host runs `request`: `Err` says which limit refuses it, for the host's log on
    /// the controller.
    pub(crate) fn check(
        &self,
        request: &TaskRequest,
        accounts: &impl Accounts,
    ) -> Result<(), String> {
        if let Some(languages) = &self.languages {
            let asked = LanguageName::of_code(request.script_language);
            if !asked.is_some_and(|l| languages.contains(&l)) {
                let asked = asked.map_or_else(
                    || format!("script_language {}", request.script_language),
                    |l| format!("{} (script_language {})", l.name(), l.code()),
                );
                return Err(format!(
                    "refused by this host's local limits: {asked} is not allowed here; the \
                     agent runs only {} (limits.languages)",
                    languages
                        .iter()
                        .map(|l| l.name())
                        .collect::<Vec<_>>()
                        .join(", ")
                ));
            }
        }
        if let Some(allowed) = &self.accounts
            && !allowed.iter().any(|a| *a == request.account)
        {
            return Err(format!(
                "refused by this host's local limits: account {:?} is not allowed here; the \
                 agent runs tasks only as {} (limits.accounts)",
                request.account,
                allowed.join(", ")
            ));
        }
        // By uid, not by name: another name for uid 0 is root all the same. An account that does
        // not exist is left to the executor, which reports it as such.
        if !self.allow_root && accounts.uid(&request.account) == Some(0) {
            return Err(format!(
                "refused by this host's local limits: account {:?} is root (uid 0), and this \
                 agent does not run tasks as root (limits.allow_root = false)",
                request.account
            ));
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    struct Table;

    impl Accounts for Table {
        fn uid(&self, account: &str) -> Option<u32> {
            match account {
                "root" | "toor" => Some(0),
                "deploy" => Some(1000),
                "app" => Some(1001),
                _ => None,
            }
        }
    }

    fn request(account: &str, language: i32) -> TaskRequest {
        TaskRequest {
            task_id: uuid::Uuid::nil(),
            job_instance_id: 1,
            step_instance_id: 1,
            script_language: language,
            script: b"true".to_vec(),
            script_param: String::new(),
            is_param_sensitive: false,
            account: account.into(),
            timeout_secs: 10,
            output_limit: 1024,
            windows_interpreter: None,
        }
    }

    fn limits(text: &str) -> LocalLimits {
        toml::from_str(text).unwrap()
    }

    #[test]
    fn without_limits_everything_runs() {
        let none = LocalLimits::default();
        for (account, language) in [("root", 1), ("toor", 4), ("deploy", 3), ("nobody-here", 9)] {
            assert_eq!(none.check(&request(account, language), &Table), Ok(()));
        }
    }

    #[test]
    fn root_is_refused_by_uid_under_any_name() {
        let no_root = limits("allow_root = false");
        for account in ["root", "toor"] {
            let err = no_root.check(&request(account, 1), &Table).unwrap_err();
            assert!(
                err.contains("uid 0") && err.contains("limits.allow_root"),
                "{err}"
            );
            assert!(err.contains(&format!("{account:?}")), "{err}");
        }
        assert_eq!(no_root.check(&request("deploy", 1), &Table), Ok(()));
        // The executor says "does not exist" better than a limit would.
        assert_eq!(no_root.check(&request("ghost", 1), &Table), Ok(()));
    }

    #[test]
    fn only_listed_accounts_and_languages_run() {
        let strict = limits("accounts = [\"deploy\"]\nlanguages = [\"shell\", \"python\"]");
        assert_eq!(strict.check(&request("deploy", 1), &Table), Ok(()));
        assert_eq!(strict.check(&request("deploy", 4), &Table), Ok(()));
        let err = strict.check(&request("app", 1), &Table).unwrap_err();
        assert!(
            err.contains("\"app\"")
                && err.contains("only as deploy")
                && err.contains("limits.accounts"),
            "{err}"
        );
        let err = strict.check(&request("deploy", 3), &Table).unwrap_err();
        assert!(
            err.contains("perl (script_language 3)") && err.contains("only shell, python"),
            "{err}"
        );
        let err = strict.check(&request("deploy", 77), &Table).unwrap_err();
        assert!(err.contains("script_language 77"), "{err}");
    }

    #[test]
    fn limits_that_refuse_everything_or_contradict_are_configuration_errors() {
        for (text, key) in [
            ("accounts = []", "accounts"),
            ("languages = []", "languages"),
            ("allow_root = false\naccounts = [\"root\"]", "accounts"),
        ] {
            let (at, message) = limits(text).validate().unwrap_err();
            assert_eq!(at, key, "{text}");
            assert!(message.contains("limits."), "{message}");
        }
        assert!(toml::from_str::<LocalLimits>("languages = [\"cobol\"]").is_err());
        assert!(toml::from_str::<LocalLimits>("allow_roots = false").is_err());
    }
}
