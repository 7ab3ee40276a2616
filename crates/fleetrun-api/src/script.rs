//! Scripts in bk-job's terms: the languages a script is written in, the statuses of a library
//! script's versions, and what a dangerous-rule check reports of a script.

use serde::{Deserialize, Serialize};

use crate::codes::codes;

codes! {
    /// `script_language`.
    pub enum ScriptLanguage {
        Shell = 1 => "shell",
        Bat = 2 => "bat",
        Perl = 3 => "perl",
        Python = 4 => "python",
        PowerShell = 5 => "powershell",
        /// Kept in the library; it runs with `fast_execute_sql`, which fleetrun does not serve.
        Sql = 6 => "sql",
    }
}

impl ScriptLanguage {
    /// Whether an agent can run it (every language but SQL).
    pub const fn runs_on_hosts(self) -> bool {
        matches!(
            self,
            Self::Shell | Self::Bat | Self::Perl | Self::Python | Self::PowerShell
        )
    }
}

codes! {
    /// A library script version's `status`.
    pub enum VersionStatus {
        /// A draft: the only status whose content may change.
        Draft = 0 => "draft",
        /// The version jobs run by the script's id; at most one per script.
        Online = 1 => "online",
        /// Was online; still runs by its version id.
        Offline = 2 => "offline",
        /// Never runs again.
        Disabled = 3 => "disabled",
    }
}

impl VersionStatus {
    /// Whether a job may run it: online and offline versions.
    pub const fn is_runnable(self) -> bool {
        matches!(self, Self::Online | Self::Offline)
    }
}

/// One match of a dangerous rule in a script, as `check_script` and `fast_execute_script`'s
/// `dangerous_script_check` report it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ScriptCheckItem {
    /// 1-based line number.
    pub line: usize,
    pub line_content: String,
    pub match_content: String,
    /// bk-job's level; fatal (3) for every rule match.
    pub level: i32,
    /// The rule's description.
    pub description: String,
    pub rule_id: i64,
    /// The rule's action: 1 scan (run it anyway), 2 intercept (refuse it).
    pub action: i32,
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn language_numbers_are_bk_jobs() {
        let pinned = [
            (ScriptLanguage::Shell, 1),
            (ScriptLanguage::Bat, 2),
            (ScriptLanguage::Perl, 3),
            (ScriptLanguage::Python, 4),
            (ScriptLanguage::PowerShell, 5),
            (ScriptLanguage::Sql, 6),
        ];
        assert_eq!(pinned.len(), ScriptLanguage::NAMED.len());
        for (language, code) in pinned {
            assert_eq!(language.code(), code);
            assert_eq!(ScriptLanguage::from_code(code), language);
            assert_eq!(serde_json::to_string(&language).unwrap(), code.to_string());
            assert_eq!(language.runs_on_hosts(), code != 6);
        }
        assert!(!ScriptLanguage::from_code(0).runs_on_hosts());
    }

    #[test]
    fn version_status_numbers_are_bk_jobs() {
        let pinned = [
            (VersionStatus::Draft, 0, "draft"),
            (VersionStatus::Online, 1, "online"),
            (VersionStatus::Offline, 2, "offline"),
            (VersionStatus::Disabled, 3, "disabled"),
        ];
        assert_eq!(pinned.len(), VersionStatus::NAMED.len());
        for (status, code, name) in pinned {
            assert_eq!(status.code(), code);
            assert_eq!(status.name(), Some(name));
            assert_eq!(VersionStatus::from_code(code), status);
            assert_eq!(serde_json::to_string(&status).unwrap(), code.to_string());
            assert_eq!(status.is_runnable(), matches!(code, 1 | 2));
        }
        assert_eq!(VersionStatus::from_code(4).name(), None);
    }
}
