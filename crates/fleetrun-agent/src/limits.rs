//! Local limits: what the host's owner lets any controller make this agent do, whatever the
//! controller asks. A task outside them is refused before anything is staged or started, and
//! ends with a result that names the limit, so the controller shows why.
//!
//! Accounts and languages are checked here, on the request. `allow_root = false` is enforced by
//! the executor ([`fleetrun_exec::ExecConfig::refuse_root`]) on the uid of the account it has
//! resolved to run the task as: one lookup, so no second lookup (NSS failing, or answering
//! differently a moment later) can let root through.

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

    /// What the executor is told when `allow_root` is false: the end of the reason a task whose
    /// account is uid 0 is refused with.
    pub(crate) fn root_refusal(&self) -> Option<String> {
        (!self.allow_root).then(|| {
            "refused by this host's local limits: this agent does not run tasks as root \
             (limits.allow_root = false)"
                .to_owned()
        })
    }

    /// Whether this host runs `request` as far as the account's name and the language go (root
    /// is the executor's check): `Err` says which limit refuses it, for the host's log on the
    /// controller.
    pub(crate) fn check(&self, request: &TaskRequest) -> Result<(), String> {
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
            && !allowed.contains(&request.account)
        {
            return Err(format!(
                "refused by this host's local limits: account {:?} is not allowed here; the \
                 agent runs tasks only as {} (limits.accounts)",
                request.account,
                allowed.join(", ")
            ));
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

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
            assert_eq!(none.check(&request(account, language)), Ok(()));
        }
    }

    #[test]
    fn root_is_left_to_the_executor_with_the_reason() {
        let no_root = limits("allow_root = false");
        let why = no_root.root_refusal().unwrap();
        assert!(
            why.starts_with("refused by this host's local limits")
                && why.contains("limits.allow_root = false"),
            "{why}"
        );
        assert_eq!(LocalLimits::default().root_refusal(), None);
        assert_eq!(limits("allow_root = true").root_refusal(), None);
    }

    #[test]
    fn only_listed_accounts_and_languages_run() {
        let strict = limits("accounts = [\"deploy\"]\nlanguages = [\"shell\", \"python\"]");
        assert_eq!(strict.check(&request("deploy", 1)), Ok(()));
        assert_eq!(strict.check(&request("deploy", 4)), Ok(()));
        let err = strict.check(&request("app", 1)).unwrap_err();
        assert!(
            err.contains("\"app\"")
                && err.contains("only as deploy")
                && err.contains("limits.accounts"),
            "{err}"
        );
        let err = strict.check(&request("deploy", 3)).unwrap_err();
        assert!(
            err.contains("perl (script_language 3)") && err.contains("only shell, python"),
            "{err}"
        );
        let err = strict.check(&request("deploy", 77)).unwrap_err();
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
