//! The `[console]` section: who may sign in to the web console, what each may see and do, and
//! through which app of `[[apps]]` the console submits what its users ask for.

use serde::Deserialize;

use crate::config::{AppConfig, Invalid, Key, Scopes, ScopesError};

/// `[console]`. Without users (and without a trusted proxy header) the console is not served.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ConsoleConfig {
    /// The `bk_app_code` of the app the console's actions are submitted as (jobs, terminations,
    /// script publications); the console user is their operator.
    #[serde(default)]
    pub app: Option<String>,
    /// How long a session lasts from sign-in, in seconds.
    #[serde(default = "default_session_secs")]
    pub session_secs: u64,
    /// A session unused this long ends, in seconds.
    #[serde(default = "default_idle_secs")]
    pub idle_secs: u64,
    /// Whether cookies carry `Secure` (browsers then send them only over HTTPS, and to
    /// `localhost`). Turn off only behind a proxy on the same host that terminates TLS.
    #[serde(default = "default_true")]
    pub secure_cookies: bool,
    /// For single sign-on behind a reverse proxy: the header that names the signed-in user
    /// (who must be one of `users`), trusted only together with `trusted_proxy_secret`.
    #[serde(default)]
    pub trusted_proxy_header: Option<String>,
    /// The value the proxy sends in `X-Fleetrun-Proxy-Secret`; a request without it is not
    /// trusted for `trusted_proxy_header`, so a client that reaches the controller directly
    /// cannot name itself.
    #[serde(default)]
    pub trusted_proxy_secret: Option<String>,
    #[serde(default)]
    pub users: Vec<ConsoleUser>,
}

impl Default for ConsoleConfig {
    fn default() -> Self {
        Self {
            app: None,
            session_secs: default_session_secs(),
            idle_secs: default_idle_secs(),
            secure_cookies: true,
            trusted_proxy_header: None,
            trusted_proxy_secret: None,
            users: Vec::new(),
        }
    }
}

fn default_session_secs() -> u64 {
    8 * 3600
}

fn default_idle_secs() -> u64 {
    3600
}

fn default_true() -> bool {
    true
}

/// A console user.
#[derive(Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ConsoleUser {
    /// The name shown, and recorded as the operator of what the user does.
    pub name: String,
    /// An argon2 PHC string (`fleetrun-controller hash-password` makes one). A user without one
    /// can only come through the trusted proxy.
    #[serde(default)]
    pub password_hash: Option<String>,
    /// Scopes the user may see and act on, as `biz:<id>` or `biz_set:<id>`; `*` for every scope.
    #[serde(rename = "scopes")]
    scope_list: Vec<String>,
    /// `scopes`, parsed when the configuration loads.
    #[serde(skip)]
    pub scopes: Scopes,
    #[serde(default)]
    pub role: Role,
}

impl std::fmt::Debug for ConsoleUser {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ConsoleUser")
            .field("name", &self.name)
            .field("scopes", &self.scopes)
            .field("role", &self.role)
            .finish_non_exhaustive()
    }
}

/// What a console user may do within its scopes.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Role {
    /// Sees jobs, logs, scripts and hosts.
    #[default]
    Viewer,
    /// Also runs scripts, terminates and retries jobs, publishes and disables script versions.
    Operator,
}

impl ConsoleConfig {
    /// Whether anyone can sign in.
    pub fn enabled(&self) -> bool {
        !self.users.is_empty()
    }

    /// Checks the section and parses its users' `scopes`.
    pub(crate) fn validate(&mut self, apps: &[AppConfig]) -> Result<(), Invalid> {
        use Key::{Index, Name};
        let invalid = |at: Vec<Key>, message: String| Invalid { at, message };
        if !self.enabled() {
            return Ok(());
        }
        let Some(app) = &self.app else {
            return Err(invalid(
                vec![Name("console"), Name("app")],
                "console.app is required with console users: the app the console submits as"
                    .to_owned(),
            ));
        };
        if !apps.iter().any(|a| &a.bk_app_code == app) {
            return Err(invalid(
                vec![Name("console"), Name("app")],
                format!("console.app: no app {app:?} in [[apps]]"),
            ));
        }
        if !(60..=30 * 86400).contains(&self.session_secs) {
            return Err(invalid(
                vec![Name("console"), Name("session_secs")],
                format!(
                    "console.session_secs must be between 60 and 2592000, not {}",
                    self.session_secs
                ),
            ));
        }
        if !(60..=self.session_secs).contains(&self.idle_secs) {
            return Err(invalid(
                vec![Name("console"), Name("idle_secs")],
                format!(
                    "console.idle_secs must be between 60 and session_secs, not {}",
                    self.idle_secs
                ),
            ));
        }
        match (&self.trusted_proxy_header, &self.trusted_proxy_secret) {
            (Some(header), Some(secret)) => {
                if axum::http::HeaderName::from_bytes(header.as_bytes()).is_err() {
                    return Err(invalid(
                        vec![Name("console"), Name("trusted_proxy_header")],
                        format!("console.trusted_proxy_header: {header:?} is not a header name"),
                    ));
                }
                if secret.len() < 16 {
                    return Err(invalid(
                        vec![Name("console"), Name("trusted_proxy_secret")],
                        "console.trusted_proxy_secret must be at least 16 characters".to_owned(),
                    ));
                }
            }
            (None, None) => {}
            _ => {
                return Err(invalid(
                    vec![Name("console"), Name("trusted_proxy_secret")],
                    "console.trusted_proxy_header and trusted_proxy_secret go together".to_owned(),
                ));
            }
        }
        let mut names = std::collections::HashSet::new();
        for (i, user) in self.users.iter_mut().enumerate() {
            let at = |key| vec![Name("console"), Name("users"), Index(i), Name(key)];
            if user.name.is_empty() || user.name.chars().any(char::is_control) {
                return Err(invalid(
                    at("name"),
                    "console.users: name must be non-empty, without control characters".to_owned(),
                ));
            }
            if !names.insert(user.name.clone()) {
                return Err(invalid(
                    at("name"),
                    format!("console.users: {:?} is named twice", user.name),
                ));
            }
            if let Some(hash) = &user.password_hash
                && argon2::PasswordHash::new(hash).is_err()
            {
                return Err(invalid(
                    at("password_hash"),
                    format!(
                        "console.users: password_hash of {:?} is not an argon2 PHC string",
                        user.name
                    ),
                ));
            }
            user.scopes = Scopes::parse(&user.scope_list, true).map_err(|e| match e {
                ScopesError::Empty => invalid(
                    at("scopes"),
                    format!(
                        "console.users: {:?} needs scopes (\"biz:<id>\", \"biz_set:<id>\" or \"*\")",
                        user.name
                    ),
                ),
                ScopesError::Invalid(scope) => invalid(
                    at("scopes"),
                    format!(
                        "console.users: scope {scope:?} of {:?} is not \"biz:<id>\", \"biz_set:<id>\" or \"*\"",
                        user.name
                    ),
                ),
            })?;
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn apps() -> Vec<AppConfig> {
        toml::from_str::<std::collections::BTreeMap<String, Vec<AppConfig>>>(
            "apps = [{ bk_app_code = \"ops\", bk_app_secret = \"s\", scopes = [\"*\"] }]",
        )
        .unwrap()
        .remove("apps")
        .unwrap()
    }

    fn check(text: &str) -> Result<(), String> {
        let mut config: ConsoleConfig = toml::from_str(text).map_err(|e| e.to_string())?;
        config.validate(&apps()).map_err(|e| e.message)
    }

    const HASH: &str = "$argon2id$v=19$m=19456,t=2,p=1$c2FsdHNhbHRzYWx0$2nP5a3D7K1bQ0m7ZzvA1GQ5C5Gk1m0L3pYk8q9rT2sE";

    #[test]
    fn a_console_without_users_needs_nothing_else() {
        assert_eq!(check(""), Ok(()));
        assert!(!ConsoleConfig::default().enabled());
    }

    #[test]
    fn bad_console_settings_are_refused_by_name() {
        let user = |extra: &str| {
            format!(
                "app = \"ops\"\n{extra}\n[[users]]\nname = \"alice\"\npassword_hash = \"{HASH}\"\nscopes = [\"biz:2\"]\n"
            )
        };
        assert_eq!(check(&user("")), Ok(()));
        for (text, field) in [
            (
                user("").replace("app = \"ops\"\n", ""),
                "console.app is required",
            ),
            (
                user("").replace("\"ops\"", "\"nobody\""),
                "console.app: no app",
            ),
            (user("session_secs = 10"), "console.session_secs"),
            (user("idle_secs = 99999999"), "console.idle_secs"),
            (user("trusted_proxy_header = \"X-User\""), "go together"),
            (
                user("trusted_proxy_header = \"X-User\"\ntrusted_proxy_secret = \"short\""),
                "at least 16",
            ),
            (
                user(
                    "trusted_proxy_header = \"bad header\"\ntrusted_proxy_secret = \"0123456789abcdef\"",
                ),
                "not a header name",
            ),
            (
                user("").replace(HASH, "plain-text-password"),
                "not an argon2 PHC string",
            ),
            (user("").replace("[\"biz:2\"]", "[]"), "needs scopes"),
            (
                user("").replace("biz:2", "business 2"),
                "is not \"biz:<id>\"",
            ),
            (user("").replace("alice", ""), "name must be non-empty"),
            (
                format!(
                    "{}[[users]]\nname = \"alice\"\nscopes = [\"*\"]\n",
                    user("")
                ),
                "named twice",
            ),
        ] {
            let refused = check(&text).expect_err(&text);
            assert!(refused.contains(field), "{refused:?} should name {field:?}");
        }
        let role: Result<ConsoleConfig, _> =
            toml::from_str(&format!("{}role = \"admin\"\n", user("")));
        assert!(role.is_err(), "an unknown role");
    }
}
