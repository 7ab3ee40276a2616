//! What SIGHUP changes besides the inventory: the apps (secrets, scopes, admin and
//! public_scripts grants) are swapped in for the next request, and every other difference between the file and the configuration in
//! force is named in the log as waiting for a restart.

use std::sync::{Arc, RwLock};

use crate::{Config, config::AppConfig};

/// The apps allowed to call the API: those of the configuration loaded last, swapped whole on
/// reload.
#[derive(Debug)]
pub struct Apps(RwLock<Arc<Config>>);

/// The apps in force when a request came, as a list.
#[derive(Debug, Clone)]
pub struct CurrentApps(Arc<Config>);

impl std::ops::Deref for CurrentApps {
    type Target = [AppConfig];
    fn deref(&self) -> &[AppConfig] {
        &self.0.apps
    }
}

impl Apps {
    /// The apps of `config`, the configuration the controller starts with.
    pub fn new(config: Arc<Config>) -> Self {
        Self(RwLock::new(config))
    }

    /// The apps in force now.
    pub fn current(&self) -> CurrentApps {
        CurrentApps(self.0.read().unwrap().clone())
    }

    fn replace(&self, config: Arc<Config>) {
        *self.0.write().unwrap() = config;
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
                if before.public_scripts != app.public_scripts {
                    what.push("public_scripts");
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
pub fn apply(apps: &Apps, old: &Config, new: Arc<Config>) -> Vec<String> {
    let changes = app_changes(&apps.current(), &new.apps);
    let waiting = restart_only(old, &new);
    if !changes.is_empty() {
        apps.replace(new);
        for change in &changes {
            tracing::info!("configuration reloaded: {change}");
        }
    }
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

    /// A configuration with these apps: `(code, secret, scopes)`.
    fn config(apps: &[(&str, &str, &[&str])]) -> Arc<Config> {
        let mut text = "http_listen = \"127.0.0.1:0\"\nagent_listen = \"127.0.0.1:0\"\n\
                        database = \"/tmp/x/db\"\n[tls]\nca = \"a\"\ncert = \"b\"\nkey = \"c\"\n"
            .to_owned();
        for (code, secret, scopes) in apps {
            text += &format!(
                "[[apps]]\nbk_app_code = {code:?}\nbk_app_secret = {secret:?}\nscopes = {scopes:?}\n"
            );
        }
        Arc::new(Config::parse(std::path::Path::new("c.toml"), &text).unwrap())
    }

    #[test]
    fn changes_name_apps_and_what_changed_without_secrets() {
        let old = config(&[("a", "s1", &["*"]), ("b", "s", &["biz:2"])]);
        let new = config(&[("a", "s2", &["*"]), ("c", "s", &["biz:3"])]);
        let changes = app_changes(&old.apps, &new.apps);
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
        assert!(app_changes(&apps.current(), &old.apps).is_empty());
    }

    #[test]
    fn a_reload_swaps_in_the_new_apps_and_sees_changed_scopes() {
        let old = config(&[("a", "s", &["biz:2"])]);
        let apps = Apps::new(old.clone());
        // The same grant written otherwise is no change.
        let same = config(&[("a", "s", &["biz:02"])]);
        assert!(apply(&apps, &old, same).is_empty());
        let new = config(&[("a", "s", &["biz:3"])]);
        assert_eq!(apply(&apps, &old, new), ["app \"a\": scopes changed"]);
        let current = apps.current();
        assert!(current[0].scopes.allows(fleetrun_inventory::Scope::Biz(3)));
        assert!(!current[0].scopes.allows(fleetrun_inventory::Scope::Biz(2)));
    }

    #[test]
    fn a_reload_that_only_revokes_public_scripts_is_seen_and_applied() {
        let mut granted = (*config(&[("a", "s", &["biz:2"])])).clone();
        granted.apps[0].public_scripts = true;
        let granted = Arc::new(granted);
        let apps = Apps::new(granted.clone());
        let mut revoked = (*granted).clone();
        revoked.apps[0].public_scripts = false;
        assert_eq!(
            apply(&apps, &granted, Arc::new(revoked)),
            ["app \"a\": public_scripts changed"]
        );
        assert!(!apps.current()[0].public_scripts);
    }
}
