//! What SIGHUP changes besides the inventory: the apps (secrets, scopes, admin grant) are swapped
//! in for the next request, and every other difference between the file and the configuration in
//! force is named in the log as waiting for a restart.

use std::sync::{Arc, RwLock};

use crate::{Config, config::AppConfig};

/// The apps allowed to call the API, replaced whole on reload.
#[derive(Debug)]
pub struct Apps(RwLock<Arc<Vec<AppConfig>>>);

impl Apps {
    pub fn new(apps: Vec<AppConfig>) -> Self {
        Self(RwLock::new(Arc::new(apps)))
    }

    /// The apps in force now.
    pub fn current(&self) -> Arc<Vec<AppConfig>> {
        self.0.read().unwrap().clone()
    }

    fn replace(&self, apps: Vec<AppConfig>) {
        *self.0.write().unwrap() = Arc::new(apps);
    }
}

/// How two lists of apps differ, by app code (secrets are compared, never shown).
fn app_changes(old: &[AppConfig], new: &[AppConfig]) -> Vec<String> {
    let mut changes = Vec::new();
    for app in new {
        match old.iter().find(|a| a.bk_app_code == app.bk_app_code) {
            None => changes.push(format!("app {:?} added", app.bk_app_code)),
            Some(before) => {
                let mut what = Vec::new();
                if before.bk_app_secret != app.bk_app_secret {
                    what.push("secret");
                }
                if before.scopes != app.scopes {
                    what.push("scopes");
                }
                if before.admin != app.admin {
                    what.push("admin");
                }
                if before.callback_secret != app.callback_secret {
                    what.push("callback_secret (takes a restart)");
                }
                if !what.is_empty() {
                    changes.push(format!(
                        "app {:?}: {} changed",
                        app.bk_app_code,
                        what.join(", ")
                    ));
                }
            }
        }
    }
    for app in old {
        if !new.iter().any(|a| a.bk_app_code == app.bk_app_code) {
            changes.push(format!("app {:?} removed", app.bk_app_code));
        }
    }
    changes
}

/// Sections whose change the running controller does not take: named so the operator knows a
/// restart is due. Compared through their `Debug` text, which holds no secret.
fn restart_only(old: &Config, new: &Config) -> Vec<&'static str> {
    let mut keys = Vec::new();
    let mut check = |key, a: String, b: String| {
        if a != b {
            keys.push(key);
        }
    };
    check(
        "http_listen",
        format!("{:?}", old.http_listen),
        format!("{:?}", new.http_listen),
    );
    check(
        "agent_listen",
        format!("{:?}", old.agent_listen),
        format!("{:?}", new.agent_listen),
    );
    check(
        "database",
        format!("{:?}", old.database),
        format!("{:?}", new.database),
    );
    check("tls", format!("{:?}", old.tls), format!("{:?}", new.tls));
    check(
        "limits",
        format!("{:?}", old.limits),
        format!("{:?}", new.limits),
    );
    check(
        "security",
        format!("{:?}", old.security),
        format!("{:?}", new.security),
    );
    check(
        "callbacks",
        format!("{:?}", old.callbacks),
        format!("{:?}", new.callbacks),
    );
    check(
        "agents",
        format!("{:?}", old.agents),
        format!("{:?}", new.agents),
    );
    check(
        "retention",
        format!("{:?}", old.retention),
        format!("{:?}", new.retention),
    );
    check("api", format!("{:?}", old.api), format!("{:?}", new.api));
    check(
        "metrics",
        format!("{:?}", old.metrics.as_ref().map(|m| m.bearer_token.len())),
        format!("{:?}", new.metrics.as_ref().map(|m| m.bearer_token.len())),
    );
    keys
}

/// Applies what can be applied of `new` and logs every difference from `old`; returns the
/// changes applied.
pub fn apply(apps: &Apps, old: &Config, new: &Config) -> Vec<String> {
    let changes = app_changes(&apps.current(), &new.apps);
    if !changes.is_empty() {
        apps.replace(new.apps.clone());
        for change in &changes {
            tracing::info!("configuration reloaded: {change}");
        }
    }
    let waiting = restart_only(old, new);
    if !waiting.is_empty() {
        tracing::warn!(
            sections = ?waiting,
            "the configuration file changed where a reload cannot apply it: restart the controller for these"
        );
    }
    changes
}

#[cfg(test)]
mod tests {
    use super::*;

    fn app(code: &str, secret: &str, scopes: &[&str]) -> AppConfig {
        let text =
            format!("bk_app_code = {code:?}\nbk_app_secret = {secret:?}\nscopes = {scopes:?}\n");
        toml::from_str(&text).unwrap()
    }

    #[test]
    fn changes_name_apps_and_what_changed_without_secrets() {
        let old = vec![app("a", "s1", &["*"]), app("b", "s", &["biz:2"])];
        let new = vec![app("a", "s2", &["*"]), app("c", "s", &["biz:3"])];
        let changes = app_changes(&old, &new);
        assert_eq!(
            changes,
            [
                "app \"a\": secret changed",
                "app \"c\" added",
                "app \"b\" removed"
            ]
        );
        assert!(!changes.join(" ").contains("s2"));
        let apps = Apps::new(old.clone());
        assert!(app_changes(&apps.current(), &old).is_empty());
    }
}
