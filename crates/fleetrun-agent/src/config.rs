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
        let config: Config =
            toml::from_str(&text).map_err(|e| anyhow::anyhow!("{}: {e}", path.display()))?;
        if config.max_concurrent_tasks == 0 {
            anyhow::bail!(
                "{}: max_concurrent_tasks must be at least 1",
                path.display()
            );
        }
        Ok(config)
    }
}
