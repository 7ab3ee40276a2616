//! The agent's configuration file (TOML).

use std::{net::SocketAddr, path::PathBuf};

use serde::Deserialize;

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Config {
    /// The controller's QUIC address.
    pub controller: SocketAddr,
    /// The name in the controller's certificate.
    #[serde(default = "default_server_name")]
    pub server_name: String,
    /// Local address to connect from; the port is usually 0. Chooses the host's address when
    /// several share a machine.
    #[serde(default = "default_bind")]
    pub bind: SocketAddr,
    /// Cloud area (`bk_cloud_id`) this host is in.
    #[serde(default)]
    pub bk_cloud_id: i64,
    /// The address operators target this host by; by default the address the agent reaches the
    /// controller from.
    pub ip: Option<std::net::IpAddr>,
    /// Reported hostname; by default the system's.
    pub hostname: Option<String>,
    /// Where scripts are staged while they run. It and every directory above it must be owned by
    /// root or the agent's account and writable by no one else (a sticky directory such as `/tmp`
    /// may be above it): the agent refuses to start otherwise.
    pub work_dir: PathBuf,
    pub tls: TlsConfig,
    /// Tasks run at once; more wait their turn.
    #[serde(default = "default_max_tasks")]
    pub max_concurrent_tasks: usize,
    /// Name of this agent's cgroup under the cgroup v2 mount; by default `fleetrun-<agent id>`.
    pub cgroup_name: Option<String>,
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct TlsConfig {
    pub ca: PathBuf,
    pub cert: PathBuf,
    pub key: PathBuf,
}

fn default_server_name() -> String {
    "fleetrun-controller".to_owned()
}

fn default_bind() -> SocketAddr {
    "0.0.0.0:0".parse().unwrap()
}

fn default_max_tasks() -> usize {
    64
}

impl Config {
    pub fn load(path: &std::path::Path) -> anyhow::Result<Self> {
        let text = std::fs::read_to_string(path)
            .map_err(|e| anyhow::anyhow!("cannot read {}: {e}", path.display()))?;
        Self::parse(path, &text)
    }

    /// Parses and validates the text of the file at `path`; errors name the file, and the line
    /// and column of the key at fault.
    pub fn parse(path: &std::path::Path, text: &str) -> anyhow::Result<Self> {
        let config: Config = from_toml(text).map_err(|(span, message)| {
            let at = span
                .map(|span| line_column(text, span.start))
                .unwrap_or_default();
            anyhow::anyhow!("{}{at}: {message}", path.display())
        })?;
        if config.max_concurrent_tasks == 0 {
            anyhow::bail!(
                "{}{}: max_concurrent_tasks must be at least 1",
                path.display(),
                locate(text, &["max_concurrent_tasks"])
            );
        }
        Ok(config)
    }

    /// What the agent would refuse at start, found without starting it: every problem, or a
    /// one-line summary.
    pub fn check(path: &std::path::Path) -> Result<String, Vec<String>> {
        let text = std::fs::read_to_string(path)
            .map_err(|e| vec![format!("cannot read {}: {e}", path.display())])?;
        let config = Self::parse(path, &text).map_err(|e| vec![format!("{e:#}")])?;
        let mut problems = Vec::new();
        let files = fleetrun_net::TlsFiles {
            ca: config.tls.ca.clone(),
            cert: config.tls.cert.clone(),
            key: config.tls.key.clone(),
        };
        if let Err(e) = fleetrun_net::client_tls(&files) {
            let key = match &e {
                fleetrun_net::TlsError::File { path, .. } if *path == config.tls.ca => "ca",
                fleetrun_net::TlsError::File { path, .. } if *path == config.tls.cert => "cert",
                fleetrun_net::TlsError::File { path, .. } if *path == config.tls.key => "key",
                _ => "",
            };
            let at = if key.is_empty() {
                locate(&text, &["tls"])
            } else {
                locate(&text, &["tls", key])
            };
            problems.push(format!("{}{at}: tls: {e}", path.display()));
        }
        // The work directory's ownership is checked when the agent starts (it may not exist
        // yet): here only what no start could accept.
        if !config.work_dir.is_absolute() {
            problems.push(format!(
                "{}{}: work_dir must be an absolute path",
                path.display(),
                locate(&text, &["work_dir"])
            ));
        } else if config.work_dir.exists() && !config.work_dir.is_dir() {
            problems.push(format!(
                "{}{}: work_dir {} is not a directory",
                path.display(),
                locate(&text, &["work_dir"]),
                config.work_dir.display()
            ));
        }
        if config.controller.port() == 0 || config.controller.ip().is_unspecified() {
            problems.push(format!(
                "{}{}: controller {} is not an address an agent can connect to",
                path.display(),
                locate(&text, &["controller"]),
                config.controller
            ));
        }
        if !problems.is_empty() {
            return Err(problems);
        }
        Ok(format!(
            "{}: ok: controller {} ({}), work_dir {}, up to {} task(s) at once",
            path.display(),
            config.controller,
            config.server_name,
            config.work_dir.display(),
            config.max_concurrent_tasks
        ))
    }
}

/// Deserializes `text`; an error comes with where it is and a message that names the key at
/// fault (toml's own names only the value's line).
fn from_toml<T: serde::de::DeserializeOwned>(
    text: &str,
) -> Result<T, (Option<std::ops::Range<usize>>, String)> {
    let deserializer = toml::Deserializer::parse(text)
        .map_err(|e| (e.span(), e.message().trim_end().to_owned()))?;
    serde_path_to_error::deserialize(deserializer).map_err(|e| {
        let key = e.path().to_string();
        let inner = e.into_inner();
        let message = inner.message().trim_end();
        let message = if key == "." {
            message.to_owned()
        } else {
            format!("{key}: {message}")
        };
        (inner.span(), message)
    })
}

/// `:line:column` (from 1) of byte `offset` of `text`.
fn line_column(text: &str, offset: usize) -> String {
    let before = &text[..text.floor_char_boundary(offset.min(text.len()))];
    let line = before.matches('\n').count() + 1;
    let column = before.rsplit('\n').next().map_or(0, |l| l.chars().count()) + 1;
    format!(":{line}:{column}")
}

/// `:line:column` of the value at `keys` (of the deepest table found on the way), or nothing.
fn locate(text: &str, keys: &[&str]) -> String {
    let Ok(root) = toml::de::DeTable::parse(text) else {
        return String::new();
    };
    let mut span = root.span();
    let mut table = Some(root.get_ref());
    for key in keys {
        let Some((_, value)) = table.and_then(|t| t.iter().find(|(k, _)| k.get_ref() == key))
        else {
            break;
        };
        span = value.span();
        table = match value.get_ref() {
            toml::de::DeValue::Table(t) => Some(t),
            _ => None,
        };
    }
    line_column(text, span.start)
}
