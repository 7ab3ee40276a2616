//! Where the controller is and who we are: flags, then environment (clap reads both), then one
//! file — an xtask `cluster.json` (`--cluster`), else `--config FILE`, else the user's
//! `$XDG_CONFIG_HOME/fleetrun/config.toml` (`~/.config/fleetrun/config.toml`).
//!
//! The app secret is never printed: not in errors, not in `--verbose` lines, not in `Debug`.
//!
//! The layers are merged here rather than with `figment`: its TOML provider turns a parse error
//! into toml_edit's full rendering, which quotes the offending line (`app_secret = "…` among
//! them), so the promise above could not be kept; and clap already merges flags over the
//! environment, which leaves one `Option::or` per setting for the file.

use std::path::{Path, PathBuf};

use serde::Deserialize;

use crate::{args::Global, error::CliError};

/// Everything needed to call the controller.
#[derive(Clone)]
pub struct Settings {
    pub url: String,
    pub app_code: String,
    pub app_secret: String,
    pub username: String,
    /// `(bk_scope_type, bk_scope_id)`, when configured.
    pub scope: Option<(String, String)>,
}

impl std::fmt::Debug for Settings {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Settings")
            .field("url", &self.url)
            .field("app_code", &self.app_code)
            .field("username", &self.username)
            .field("scope", &self.scope)
            .finish_non_exhaustive()
    }
}

impl Settings {
    /// The scope, or a usage error saying how to give one.
    pub fn scope(&self) -> Result<(String, String), CliError> {
        self.scope.clone().ok_or_else(|| {
            CliError::usage(
                "no scope: pass --scope biz:ID, set FLEETRUN_SCOPE, or put scope = \"biz:ID\" in the config file",
            )
        })
    }
}

/// The file layer: every key optional.
#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
struct FileSettings {
    url: Option<String>,
    app_code: Option<String>,
    app_secret: Option<String>,
    username: Option<String>,
    scope: Option<String>,
}

/// The parts of xtask's `cluster.json` a client needs.
#[derive(Deserialize)]
struct ClusterFile {
    api_url: String,
    bk_app_code: String,
    bk_app_secret: String,
    bk_username: String,
    bk_scope_type: String,
    bk_scope_id: String,
}

/// Resolves the settings; `env` is the process environment (a parameter, for tests).
pub fn resolve(
    global: &Global,
    env: &dyn Fn(&str) -> Option<String>,
) -> Result<Settings, CliError> {
    let (file, source) = if let Some(path) = &global.cluster {
        (read_cluster(path)?, Some(path.clone()))
    } else if let Some(path) = &global.config {
        (read_config(path)?, Some(path.clone()))
    } else {
        match default_config_path(env).filter(|p| p.exists()) {
            Some(path) => (read_config(&path)?, Some(path)),
            None => (FileSettings::default(), None),
        }
    };
    let named = source
        .as_ref()
        .map(|p| format!(", or set it in {}", p.display()))
        .unwrap_or_else(|| ", or put it in ~/.config/fleetrun/config.toml".to_owned());
    let missing = |what: &str, flag: &str, var: &str| {
        CliError::usage(format!(
            "no {what}: pass {flag}, set {var}{named} (or use --cluster cluster.json)"
        ))
    };
    let url = global
        .url
        .clone()
        .or(file.url)
        .ok_or_else(|| missing("controller URL", "--url", "FLEETRUN_URL"))?;
    let app_code = global
        .app_code
        .clone()
        .or(file.app_code)
        .ok_or_else(|| missing("app code", "--app-code", "FLEETRUN_APP_CODE"))?;
    let app_secret = global
        .app_secret
        .clone()
        .or(file.app_secret)
        .ok_or_else(|| missing("app secret", "--app-secret", "FLEETRUN_APP_SECRET"))?;
    let username = global
        .username
        .clone()
        .or(file.username)
        .or_else(|| env("USER"))
        .or_else(|| env("LOGNAME"))
        .filter(|u| !u.is_empty())
        .ok_or_else(|| missing("username", "--username", "FLEETRUN_USERNAME"))?;
    let scope = global
        .scope
        .clone()
        .or(file.scope)
        .map(|s| parse_scope(&s))
        .transpose()?;
    let url = url.trim_end_matches('/').to_owned();
    if !(url.starts_with("http://") || url.starts_with("https://")) {
        return Err(CliError::usage(format!(
            "controller URL {:?} must start with http:// or https://",
            crate::client::redact_url(&url)
        )));
    }
    Ok(Settings {
        url,
        app_code,
        app_secret,
        username,
        scope,
    })
}

/// `biz:2` (or `biz_set:5`); a bare number is a business.
pub fn parse_scope(text: &str) -> Result<(String, String), CliError> {
    let text = text.trim();
    let (kind, id) = text.split_once(':').unwrap_or(("biz", text));
    if kind.is_empty() || id.is_empty() || !id.chars().all(|c| c.is_ascii_alphanumeric()) {
        return Err(CliError::usage(format!(
            "scope {text:?} is not TYPE:ID, e.g. biz:2"
        )));
    }
    Ok((kind.to_owned(), id.to_owned()))
}

fn default_config_path(env: &dyn Fn(&str) -> Option<String>) -> Option<PathBuf> {
    let base = env("XDG_CONFIG_HOME")
        .filter(|d| !d.is_empty())
        .map(PathBuf::from)
        .or_else(|| env("HOME").map(|home| Path::new(&home).join(".config")))?;
    Some(base.join("fleetrun").join("config.toml"))
}

fn read_config(path: &Path) -> Result<FileSettings, CliError> {
    let text = std::fs::read_to_string(path)
        .map_err(|e| CliError::usage(format!("cannot read {}: {e}", path.display())))?;
    toml::from_str(&text).map_err(|e| {
        // The message alone: toml's full rendering quotes the offending line, which may hold
        // the secret.
        let line = e
            .span()
            .map(|span| text[..span.start.min(text.len())].lines().count().max(1));
        let at = line.map(|l| format!(" line {l}")).unwrap_or_default();
        CliError::usage(format!("{}{at}: {}", path.display(), e.message().trim()))
    })
}

fn read_cluster(path: &Path) -> Result<FileSettings, CliError> {
    let text = std::fs::read_to_string(path)
        .map_err(|e| CliError::usage(format!("cannot read {}: {e}", path.display())))?;
    let cluster: ClusterFile = serde_json::from_str(&text).map_err(|e| {
        // serde_json's messages name the field and position, never the value of a string.
        CliError::usage(format!(
            "{} is not an xtask cluster.json: {e}",
            path.display()
        ))
    })?;
    Ok(FileSettings {
        url: Some(cluster.api_url),
        app_code: Some(cluster.bk_app_code),
        app_secret: Some(cluster.bk_app_secret),
        username: Some(cluster.bk_username),
        scope: Some(format!("{}:{}", cluster.bk_scope_type, cluster.bk_scope_id)),
    })
}

#[cfg(test)]
mod tests {
    use std::collections::HashMap;

    use clap::Parser;

    use super::*;
    use crate::args::Cli;

    fn global(args: &[&str]) -> Global {
        let mut all = vec!["fleetrun"];
        all.extend_from_slice(args);
        all.push("hosts");
        Cli::try_parse_from(all).unwrap().global
    }

    fn env_of(vars: &[(&str, &str)]) -> impl Fn(&str) -> Option<String> + use<> {
        let vars: HashMap<String, String> = vars
            .iter()
            .map(|(k, v)| (k.to_string(), v.to_string()))
            .collect();
        move |key| vars.get(key).cloned()
    }

    #[test]
    fn flags_win_over_the_file_and_user_is_the_default_username() {
        let dir = tempfile::tempdir().unwrap();
        let file = dir.path().join("fleetrun/config.toml");
        std::fs::create_dir_all(file.parent().unwrap()).unwrap();
        std::fs::write(
            &file,
            "url = \"http://file:1/\"\napp_code = \"file-app\"\napp_secret = \"s3cret\"\nscope = \"biz:3\"\n",
        )
        .unwrap();
        let env = env_of(&[
            ("XDG_CONFIG_HOME", dir.path().to_str().unwrap()),
            ("USER", "alice"),
        ]);
        let s = resolve(&global(&["--url", "http://flag:2", "--scope", "7"]), &env).unwrap();
        assert_eq!(s.url, "http://flag:2");
        assert_eq!(s.app_code, "file-app");
        assert_eq!(s.app_secret, "s3cret");
        assert_eq!(s.username, "alice");
        assert_eq!(s.scope, Some(("biz".into(), "7".into())));
        let s = resolve(&global(&[]), &env).unwrap();
        assert_eq!(s.url, "http://file:1");
        assert_eq!(s.scope, Some(("biz".into(), "3".into())));
        assert!(!format!("{s:?}").contains("s3cret"));
    }

    #[test]
    fn a_cluster_file_gives_everything() {
        let dir = tempfile::tempdir().unwrap();
        let file = dir.path().join("cluster.json");
        std::fs::write(
            &file,
            r#"{"api_url": "http://127.0.0.1:9", "agent_addr": "x", "bk_app_code": "demo",
                "bk_app_secret": "s3cret", "bk_username": "admin", "bk_scope_type": "biz",
                "bk_scope_id": "2", "hosts": [], "accounts": []}"#,
        )
        .unwrap();
        let s = resolve(
            &global(&["--cluster", file.to_str().unwrap()]),
            &env_of(&[]),
        )
        .unwrap();
        assert_eq!(
            (s.url.as_str(), s.app_code.as_str(), s.username.as_str()),
            ("http://127.0.0.1:9", "demo", "admin")
        );
        assert_eq!(s.scope, Some(("biz".into(), "2".into())));
    }

    #[test]
    fn missing_settings_and_broken_files_say_what_to_do_without_the_secret() {
        let e = resolve(&global(&[]), &env_of(&[])).unwrap_err();
        assert!(e.to_string().contains("--url"), "{e}");
        assert_eq!(e.exit_code(), crate::error::exit::USAGE);
        let dir = tempfile::tempdir().unwrap();
        let file = dir.path().join("bad.toml");
        std::fs::write(&file, "url = \"http://x\"\napp_secret = \"s3cret\n").unwrap();
        let e = resolve(&global(&["--config", file.to_str().unwrap()]), &env_of(&[]))
            .unwrap_err()
            .to_string();
        assert!(e.contains("line 2"), "{e}");
        assert!(!e.contains("s3cret"), "{e}");
    }

    #[test]
    fn scopes_are_type_and_id() {
        assert_eq!(parse_scope("biz:2").unwrap(), ("biz".into(), "2".into()));
        assert_eq!(parse_scope("biz_set:9").unwrap().0, "biz_set");
        assert_eq!(parse_scope("5").unwrap(), ("biz".into(), "5".into()));
        assert!(parse_scope("biz:").is_err());
        assert!(parse_scope("biz:a b").is_err());
    }
}
