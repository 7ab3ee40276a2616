//! The agent's configuration file (TOML).

use std::{net::SocketAddr, path::PathBuf};

use serde::Deserialize;

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Config {
    /// The controller's QUIC address (`host:port`, the host a name or an IP address), or a list
    /// of them tried in turn.
    pub controller: Controllers,
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
    /// What the host's owner lets any controller make this agent do.
    #[serde(default)]
    pub limits: crate::limits::LocalLimits,
    /// The agent's own Prometheus metrics, served on a local address when set.
    #[serde(default)]
    pub metrics: Option<crate::metrics::MetricsConfig>,
    /// Where scripts are written before they run.
    #[serde(default)]
    pub staging: StagingConfig,
}

/// `[staging]`: scripts are written under `work_dir` unless the operator chooses a memory file
/// system, which spares the disk a write per task but holds the host's memory (up to
/// `memory_budget`) while scripts run; tmpfs pages may still be swapped out to a disk.
#[derive(Debug, Clone, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct StagingConfig {
    /// `"work_dir"` (the default) or `"memory"`.
    #[serde(default)]
    pub place: StagingPlace,
    /// With `"memory"`: directories that may be on a tmpfs, in order of preference (by default
    /// `$XDG_RUNTIME_DIR` for an agent that is not root, then `/dev/shm`). A task's directory
    /// there belongs to its account, which may fill that file system: list root's `/run` only
    /// if that is acceptable.
    pub memory_bases: Option<Vec<PathBuf>>,
    /// With `"memory"`: bytes the scripts staged there may take at once (64 MiB by default);
    /// scripts beyond it are staged under `work_dir`.
    pub memory_budget: Option<u64>,
}

/// Where scripts are staged.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum StagingPlace {
    /// `work_dir/tasks`.
    #[default]
    WorkDir,
    /// A memory file system, falling back to `work_dir/tasks`.
    Memory,
}

impl StagingConfig {
    /// The executor's setting.
    pub fn exec_staging(&self) -> fleetrun_exec::Staging {
        match self.place {
            StagingPlace::WorkDir => fleetrun_exec::Staging::WorkDir,
            StagingPlace::Memory => fleetrun_exec::Staging::Memory {
                bases: self
                    .memory_bases
                    .clone()
                    .unwrap_or_else(fleetrun_exec::Staging::memory_bases),
                budget: self
                    .memory_budget
                    .unwrap_or(fleetrun_exec::DEFAULT_MEMORY_STAGING_BUDGET),
            },
        }
    }
}

/// The controllers an agent connects to, tried in turn: each `host:port`, the host a DNS name
/// or an IP address, looked up at every attempt.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Controllers(Vec<String>);

impl<'de> Deserialize<'de> for Controllers {
    fn deserialize<D: serde::Deserializer<'de>>(deserializer: D) -> Result<Self, D::Error> {
        #[derive(Deserialize)]
        #[serde(untagged)]
        enum OneOrMany {
            One(String),
            Many(Vec<String>),
        }
        let list = match OneOrMany::deserialize(deserializer)
            .map_err(|_| serde::de::Error::custom("expected \"host:port\" or a list of them"))?
        {
            OneOrMany::One(one) => vec![one],
            OneOrMany::Many(many) => many,
        };
        Controllers::new(list).map_err(serde::de::Error::custom)
    }
}

impl Controllers {
    /// Checks each entry is `host:port` with a port other than 0 and a host that is not empty
    /// or the unspecified address.
    pub fn new(list: Vec<String>) -> Result<Self, String> {
        if list.is_empty() {
            return Err("the list of controllers is empty".into());
        }
        for entry in &list {
            let Some((host, port)) = entry.rsplit_once(':') else {
                return Err(format!("{entry:?} has no port: write host:port"));
            };
            match port.parse::<u16>() {
                Ok(0) | Err(_) => return Err(format!("{entry:?} has no valid port")),
                Ok(_) => {}
            }
            let host = host.trim_start_matches('[').trim_end_matches(']');
            if host.is_empty() {
                return Err(format!("{entry:?} has no host"));
            }
            if host
                .parse::<std::net::IpAddr>()
                .is_ok_and(|ip| ip.is_unspecified())
            {
                return Err(format!(
                    "{entry:?} is not an address an agent can connect to"
                ));
            }
        }
        Ok(Self(list))
    }

    /// The entries, in the order they are tried.
    pub fn entries(&self) -> &[String] {
        &self.0
    }
}

impl std::fmt::Display for Controllers {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(&self.0.join(", "))
    }
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
        if let Err((key, message)) = config.limits.validate() {
            anyhow::bail!(
                "{}{}: {message}",
                path.display(),
                locate(text, &["limits", key])
            );
        }
        if let Some(Err((key, message))) = config.metrics.as_ref().map(|m| m.validate()) {
            anyhow::bail!(
                "{}{}: metrics.{key}: {message}",
                path.display(),
                locate(text, &["metrics", key])
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
        if let Some(bases) = &config.staging.memory_bases
            && let Some(base) = bases.iter().find(|base| !base.is_absolute())
        {
            problems.push(format!(
                "{}{}: staging.memory_bases: {} is not an absolute path",
                path.display(),
                locate(&text, &["staging", "memory_bases"]),
                base.display()
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

#[cfg(test)]
mod tests {
    use super::*;

    fn parse(controller: &str) -> anyhow::Result<Config> {
        let text = format!(
            "controller = {controller}\nwork_dir = \"/var/lib/fleetrun\"\n\
             [tls]\nca = \"ca.pem\"\ncert = \"a.pem\"\nkey = \"a.key\"\n"
        );
        Config::parse(std::path::Path::new("agent.toml"), &text)
    }

    #[test]
    fn scripts_are_staged_in_memory_only_when_the_operator_says_so() {
        let default = parse("\"10.0.0.1:7000\"").unwrap();
        assert_eq!(
            default.staging.exec_staging(),
            fleetrun_exec::Staging::WorkDir
        );
        let text = "controller = \"10.0.0.1:7000\"\nwork_dir = \"/var/lib/fleetrun\"\n\
                    [tls]\nca = \"ca.pem\"\ncert = \"a.pem\"\nkey = \"a.key\"\n\
                    [staging]\nplace = \"memory\"\nmemory_bases = [\"/run\"]\nmemory_budget = 4096\n";
        let memory = Config::parse(std::path::Path::new("agent.toml"), text).unwrap();
        assert_eq!(
            memory.staging.exec_staging(),
            fleetrun_exec::Staging::Memory {
                bases: vec!["/run".into()],
                budget: 4096
            }
        );
        let bad = text.replace("place = \"memory\"", "place = \"disk\"");
        let err = Config::parse(std::path::Path::new("agent.toml"), &bad)
            .unwrap_err()
            .to_string();
        assert!(err.contains("staging.place"), "{err}");
    }

    #[test]
    fn the_controller_is_one_address_a_name_or_a_list_tried_in_turn() {
        // An older configuration's single address stays valid.
        let one = parse("\"10.0.0.1:7000\"").unwrap();
        assert_eq!(one.controller.entries(), ["10.0.0.1:7000"]);
        let named = parse("\"controller.example:7000\"").unwrap();
        assert_eq!(named.controller.entries(), ["controller.example:7000"]);
        let list =
            parse("[\"c1.example:7000\", \"[2001:db8::1]:7000\", \"10.0.0.2:7000\"]").unwrap();
        assert_eq!(list.controller.entries().len(), 3);
        assert_eq!(
            list.controller.to_string(),
            "c1.example:7000, [2001:db8::1]:7000, 10.0.0.2:7000"
        );
    }

    #[test]
    fn a_controller_entry_without_a_usable_address_is_refused_naming_it() {
        for (bad, says) in [
            ("[]", "empty"),
            ("\"c1.example\"", "has no port"),
            ("\"c1.example:0\"", "no valid port"),
            ("\"c1.example:http\"", "no valid port"),
            ("\":7000\"", "has no host"),
            ("\"0.0.0.0:7000\"", "an agent can connect to"),
            (
                "[\"c1.example:7000\", \"[::]:7000\"]",
                "an agent can connect to",
            ),
            ("7000", "host:port"),
        ] {
            let err = format!("{:#}", parse(bad).unwrap_err());
            assert!(
                err.contains("controller") && err.contains(says),
                "{bad}: {err}"
            );
        }
    }
}
