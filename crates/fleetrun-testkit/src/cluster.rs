//! A local fleetrun cluster: one controller and N agents on this machine, each agent with its
//! own identity and its own loopback address (127.0.0.10, 127.0.0.11, …).
//!
//! Used by `cargo xtask cluster`, `cargo xtask demo`, the integration tests and the benchmarks.
//! Every process it starts is killed when the [`Cluster`] is dropped.

use std::{
    fs,
    net::Ipv4Addr,
    path::{Path, PathBuf},
    process::{Child, Command, Stdio},
    time::Duration,
};

use anyhow::{Context, Result, bail, ensure};
use serde::{Deserialize, Serialize};
use serde_json::{Value, json};

use crate::{client::ApiClient, pki};

/// The non-root OS user the cluster's second account runs as.
pub const TEST_USER: &str = "fleetrun-user";
pub const APP_CODE: &str = "fleetrun-demo";
pub const BIZ_ID: i64 = 2;

/// The topology a cluster's agents land in unless `--inventory` names another file:
///
/// ```text
/// business 2 "demo"                     business 3 "other"
///   set 10 "web"                          set 20 "misc"
///     module 100 "nginx"  <- agent-1        module 200 "tools"
///     module 101 "app"    <- agent-2 and every agent not named here
///   set 11 "db"
///     module 110 "mysql"  <- agent-3
/// business set 9 "all demo" = {2, 3}
/// dynamic group "web-servers" (business 2): hosts in the set named "web"
/// ```
pub const DEFAULT_INVENTORY: &str = r#"# The local cluster's inventory (see crates/fleetrun-testkit/src/cluster.rs).
[[business]]
bk_biz_id = 2
name = "demo"

[[business]]
bk_biz_id = 3
name = "other"

[[business_set]]
bk_biz_set_id = 9
name = "all demo"
members = [2, 3]

[[set]]
bk_inst_id = 10
name = "web"
parent = "biz:2"

[[set]]
bk_inst_id = 11
name = "db"
parent = "biz:2"

[[set]]
bk_inst_id = 20
name = "misc"
parent = "biz:3"

[[module]]
bk_inst_id = 100
name = "nginx"
parent = "set:10"

[[module]]
bk_inst_id = 101
name = "app"
parent = "set:10"

[[module]]
bk_inst_id = 110
name = "mysql"
parent = "set:11"

[[module]]
bk_inst_id = 200
name = "tools"
parent = "set:20"

[[host]]
agent_id = "agent-1"
bk_biz_id = 2
modules = [100]

[[host]]
agent_id = "agent-3"
bk_biz_id = 2
modules = [110]

[unlisted_agents]
bk_biz_id = 2
modules = [101]

[[dynamic_group]]
id = "web-servers"
bk_biz_id = 2
name = "hosts of the web set"

[[dynamic_group.condition]]
object = "set"
field = "bk_set_name"
op = "equal"
value = "web"
"#;

/// What `cluster.json` holds: everything a client needs to use the cluster.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct ClusterInfo {
    pub api_url: String,
    pub agent_addr: String,
    /// Every controller's API URL, the first being `api_url` (several controllers share a
    /// PostgreSQL database).
    #[serde(default)]
    pub api_urls: Vec<String>,
    pub bk_app_code: String,
    pub bk_app_secret: String,
    pub bk_username: String,
    /// The key that signs the app's job callbacks (`X-Fleetrun-Signature`).
    #[serde(default)]
    pub callback_secret: String,
    pub bk_scope_type: String,
    pub bk_scope_id: String,
    pub hosts: Vec<HostInfo>,
    pub accounts: Vec<AccountInfo>,
    /// Businesses with their sets and modules (ids and host ids), and business sets.
    #[serde(default)]
    pub topology: Value,
    /// Each dynamic group's `id`, `name` and the host ids it matches now.
    #[serde(default)]
    pub dynamic_groups: Value,
}

#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct HostInfo {
    pub bk_host_id: i64,
    pub bk_cloud_id: i64,
    pub ip: String,
    pub agent_id: String,
}

#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct AccountInfo {
    pub id: i64,
    pub alias: String,
    pub account: String,
}

impl ClusterInfo {
    pub fn client(&self) -> ApiClient {
        ApiClient::new(
            &self.api_url,
            &self.bk_app_code,
            &self.bk_app_secret,
            &self.bk_username,
        )
    }

    /// The scope fields every request carries.
    pub fn scope(&self) -> Value {
        json!({"bk_scope_type": self.bk_scope_type, "bk_scope_id": self.bk_scope_id})
    }
}

#[derive(Debug, Clone, Default)]
pub struct ClusterOptions {
    pub agents: usize,
    pub dir: PathBuf,
    pub release: bool,
    /// Run agent `i` inside host `i` of this network (which needs at least `agents` hosts),
    /// with the controller listening for agents on the network's bridge. `None`: loopback
    /// addresses 127.0.0.10, 127.0.0.11, … on this machine.
    pub network: Option<std::sync::Arc<crate::netns::Network>>,
    /// The port the controller listens on for agents; any free one when `None`.
    pub agent_port: Option<u16>,
    /// Where agents connect, when not straight to the controller (a relay in between).
    pub agents_connect_to: Option<std::net::SocketAddr>,
    /// The inventory file; by default [`DEFAULT_INVENTORY`] with the cluster's accounts.
    pub inventory: Option<PathBuf>,
    /// The controller's `[callbacks] allow_networks`; by default loopback, where test and demo
    /// receivers listen.
    pub callback_allow_networks: Option<Vec<String>>,
    /// Cloud areas whose agents' reported addresses the controller believes without proof
    /// (`[agents] trust_reported_ip_in`): a swarm's virtual agents report made-up ones.
    pub trust_reported_ip_in: Vec<i64>,
    /// The controller's database: a `postgres://` URL of an existing database, or `None` for a
    /// SQLite file in the cluster's directory.
    pub database: Option<String>,
    /// Controllers sharing `database` (which must then be PostgreSQL), named c1, c2, …; 0 is
    /// one, as is 1. Agent `i` tries controller `i mod N` first, then the others in turn.
    pub controllers: usize,
    /// Appended to every controller's configuration (a `[limits]` section, say).
    pub controller_extra: Option<String>,
    /// `[cluster] lease_secs` of several controllers; the controller's default when `None`.
    pub lease_secs: Option<u64>,
}

/// A controller of the cluster beyond the first.
#[derive(Debug)]
pub struct ControllerProcess {
    pub config: PathBuf,
    pub log: PathBuf,
    pub api_url: String,
    /// Where its agents connect (`host:port`).
    pub agent_addr: String,
    child: Option<Child>,
}

/// One agent process and the files it runs from.
#[derive(Debug)]
pub struct AgentProcess {
    pub agent_id: String,
    pub ip: Ipv4Addr,
    pub config: PathBuf,
    pub log: PathBuf,
    /// The network namespace the agent runs in, if any.
    pub namespace: Option<String>,
    child: Option<Child>,
}

impl AgentProcess {
    /// The agent's process id while it runs.
    pub fn pid(&self) -> Option<u32> {
        self.child.as_ref().map(Child::id)
    }
}

/// A running cluster.
#[derive(Debug)]
pub struct Cluster {
    pub dir: PathBuf,
    pub info: ClusterInfo,
    pub agents: Vec<AgentProcess>,
    pub controller_config: PathBuf,
    pub controller_log: PathBuf,
    pub bin_dir: PathBuf,
    /// `FLEETRUN_LOG_FORMAT` for the processes started from now on; by default this process's.
    pub log_format: Option<String>,
    /// A program and its arguments that the controllers started from now on run under (a
    /// profiler, say): `valgrind --tool=callgrind …` runs `valgrind … fleetrun-controller
    /// --config …`. Empty: the controller runs directly.
    pub controller_wrapper: Vec<std::ffi::OsString>,
    controller: Option<Child>,
    /// Controllers 2, 3, … when several share the database.
    pub others: Vec<ControllerProcess>,
}

/// The workspace's root directory.
pub fn workspace_root() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .ancestors()
        .nth(2)
        .expect("the test kit lives in the workspace's crates/")
        .to_owned()
}

/// A `cargo` command run from the workspace root, without the variables cargo set for the
/// current process (xtask, or a test binary): build scripts such as ring's would take them for a
/// changed environment and force a rebuild.
pub fn cargo_command() -> Command {
    let cargo = std::env::var("CARGO").unwrap_or_else(|_| "cargo".to_owned());
    let mut cmd = Command::new(cargo);
    cmd.current_dir(workspace_root());
    for (key, _) in std::env::vars_os() {
        let key = key.to_string_lossy();
        if [
            "CARGO_MANIFEST_",
            "CARGO_PKG_",
            "CARGO_CRATE_",
            "CARGO_BIN_",
            "CARGO_PRIMARY_PACKAGE",
            "CARGO_TARGET_TMPDIR",
        ]
        .iter()
        .any(|prefix| key.starts_with(prefix))
        {
            cmd.env_remove(key.as_ref());
        }
    }
    cmd
}

/// Builds the controller and agent binaries; returns the directory holding them.
pub fn build_binaries(release: bool) -> Result<PathBuf> {
    let mut cmd = cargo_command();
    cmd.args([
        "build",
        "--locked",
        "--quiet",
        "-p",
        "fleetrun-controller",
        "-p",
        "fleetrun-agent",
    ]);
    if release {
        cmd.arg("--release");
    }
    let status = cmd.status().context("running cargo build")?;
    ensure!(status.success(), "cargo build failed");
    let target = std::env::var_os("CARGO_TARGET_DIR")
        .map(PathBuf::from)
        .unwrap_or_else(|| workspace_root().join("target"));
    Ok(target.join(if release { "release" } else { "debug" }))
}

/// A port free right now on 127.0.0.1 for both TCP and UDP, picked below the kernel's
/// ephemeral range (32768 and up by default): a port the kernel hands out (`bind` to port 0)
/// is also what it gives the next outgoing connection, so a controller about to listen on it
/// could find it taken by another test's client in the meantime.
pub fn free_port() -> Result<u16> {
    use rand::Rng as _;
    let mut rng = rand::rng();
    for _ in 0..200 {
        let port = rng.random_range(20_000..32_000);
        if std::net::TcpListener::bind(("127.0.0.1", port)).is_ok()
            && std::net::UdpSocket::bind(("127.0.0.1", port)).is_ok()
        {
            return Ok(port);
        }
    }
    for _ in 0..50 {
        let tcp = std::net::TcpListener::bind("127.0.0.1:0")?;
        let port = tcp.local_addr()?.port();
        if std::net::UdpSocket::bind(("127.0.0.1", port)).is_ok() {
            return Ok(port);
        }
    }
    bail!("no free port found")
}

/// Makes sure the non-root test user exists (as root); false when it cannot.
pub fn ensure_test_user() -> Result<bool> {
    if Command::new("id")
        .arg(TEST_USER)
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .status()?
        .success()
    {
        return Ok(true);
    }
    if !nix::unistd::geteuid().is_root() {
        return Ok(false);
    }
    let status = Command::new("useradd")
        .args(["-m", "-s", "/bin/bash", TEST_USER])
        .status()
        .context("running useradd")?;
    ensure!(status.success(), "useradd {TEST_USER} failed");
    Ok(true)
}

fn agent_ip(index: usize) -> Result<Ipv4Addr> {
    ensure!(index < 240, "at most 240 local agents");
    Ok(Ipv4Addr::new(127, 0, 0, 10 + index as u8))
}

fn random_secret() -> String {
    base64::Engine::encode(
        &base64::engine::general_purpose::URL_SAFE_NO_PAD,
        rand::random::<[u8; 24]>(),
    )
}

impl Cluster {
    /// Builds the binaries, writes certificates and configurations under `opts.dir`, starts the
    /// controller and the agents, and waits until every agent is online.
    pub async fn start(opts: &ClusterOptions) -> Result<Self> {
        let bin_dir = build_binaries(opts.release)?;
        fs::create_dir_all(&opts.dir)?;
        let dir = opts.dir.canonicalize()?;
        // Scripts run as non-root accounts must reach their staging directories below it.
        fs::set_permissions(&dir, std::os::unix::fs::PermissionsExt::from_mode(0o755))?;
        let certs = dir.join("certs");
        let ca = pki::Ca::open_or_create(&certs, "fleetrun local cluster CA")?;
        let controller_cert = ca.issue_controller()?;

        let mut accounts = vec![AccountInfo {
            id: 1,
            alias: "root".into(),
            account: "root".into(),
        }];
        if nix::unistd::geteuid().is_root() {
            if ensure_test_user()? {
                accounts.push(AccountInfo {
                    id: 2,
                    alias: "user".into(),
                    account: TEST_USER.into(),
                });
            }
        } else {
            let me = nix::unistd::User::from_uid(nix::unistd::geteuid())?
                .context("who am I")?
                .name;
            accounts = vec![AccountInfo {
                id: 1,
                alias: me.clone(),
                account: me,
            }];
        }

        let http_port = free_port()?;
        let agent_port = match opts.agent_port {
            Some(port) => port,
            None => free_port()?,
        };
        let controllers = opts.controllers.max(1);
        ensure!(
            controllers == 1 || opts.database.is_some(),
            "several controllers share a PostgreSQL database: give one"
        );
        let mut ports = vec![(http_port, agent_port)];
        for _ in 1..controllers {
            ports.push((free_port()?, free_port()?));
        }
        let agent_host = match &opts.network {
            Some(network) => {
                ensure!(
                    network.hosts.len() >= opts.agents,
                    "the network has fewer hosts than agents"
                );
                network.gateway
            }
            None => Ipv4Addr::LOCALHOST,
        };
        let secret = random_secret();
        let callback_secret = random_secret();
        let inventory_path = dir.join("inventory.toml");
        match &opts.inventory {
            Some(file) => {
                fs::copy(file, &inventory_path)
                    .with_context(|| format!("copying {}", file.display()))?;
            }
            None => {
                let mut text = DEFAULT_INVENTORY.to_owned();
                for a in &accounts {
                    text.push_str(&format!(
                        "\n[[account]]\nid = {}\nalias = \"{}\"\naccount = \"{}\"\nscopes = [\"biz:2\", \"biz:3\", \"biz_set:9\"]\n",
                        a.id, a.alias, a.account
                    ));
                }
                fs::write(&inventory_path, text)?;
            }
        }
        let controller_config = dir.join("controller.toml");
        let controller_toml = |i: usize, (http_port, agent_port): (u16, u16)| {
            let mut toml = format!(
                r#"http_listen = "127.0.0.1:{http_port}"
agent_listen = "{agent_host}:{agent_port}"
database = "{db}"
inventory = "{inventory}"
{security}
[tls]
ca = "{ca}"
cert = "{cert}"
key = "{key}"

# Agents the inventory does not name (agent-2, agent-4, ...) register and land where its
# [unlisted_agents] says; each agent's certificate names its address.
[agents]
unlisted = "register"
trust_reported_ip_in = {trusted:?}

[[apps]]
bk_app_code = "{APP_CODE}"
bk_app_secret = "{secret}"
callback_secret = "{callback_secret}"
scopes = ["*"]
admin = true

[callbacks]
allow_networks = {allow_networks:?}
"#,
                trusted = opts.trust_reported_ip_in,
                inventory = inventory_path.display(),
                allow_networks = opts
                    .callback_allow_networks
                    .clone()
                    .unwrap_or_else(|| vec!["127.0.0.0/8".to_owned()]),
                db = opts
                    .database
                    .clone()
                    .unwrap_or_else(|| dir.join("controller.db").display().to_string()),
                // Beside a SQLite database by default; a PostgreSQL one has no directory to share.
                security = if opts.database.is_some() {
                    format!(
                        "\n[security]\nparam_key_file = \"{}\"\n",
                        dir.join("param.key").display()
                    )
                } else {
                    String::new()
                },
                ca = ca.cert_path().display(),
                cert = controller_cert.cert.display(),
                key = controller_cert.key.display(),
            );
            if controllers > 1 {
                toml.push_str(&format!("\n[cluster]\nname = \"c{}\"\n", i + 1));
                if let Some(lease) = opts.lease_secs {
                    toml.push_str(&format!("lease_secs = {lease}\n"));
                }
            }
            if let Some(extra) = &opts.controller_extra {
                toml.push('\n');
                toml.push_str(extra);
            }
            toml
        };
        fs::write(&controller_config, controller_toml(0, ports[0]))?;
        let mut others = Vec::new();
        for (i, &(http_port, agent_port)) in ports.iter().enumerate().skip(1) {
            let config = dir.join(format!("controller-c{}.toml", i + 1));
            fs::write(&config, controller_toml(i, (http_port, agent_port)))?;
            others.push(ControllerProcess {
                config,
                log: dir.join(format!("controller-c{}.log", i + 1)),
                api_url: format!("http://127.0.0.1:{http_port}"),
                agent_addr: format!("{agent_host}:{agent_port}"),
                child: None,
            });
        }

        let mut agents = Vec::new();
        for i in 0..opts.agents {
            let agent_id = format!("agent-{}", i + 1);
            let (ip, namespace) = match &opts.network {
                Some(network) => (
                    network.hosts[i].ip,
                    Some(network.hosts[i].namespace.clone()),
                ),
                None => (agent_ip(i)?, None),
            };
            // Named in the certificate, the address holds wherever the agent connects from
            // (through a relay, say).
            let cert = ca.issue_agent_at(&agent_id, &[ip.into()])?;
            let agent_dir = dir.join("agents").join(&agent_id);
            fs::create_dir_all(&agent_dir)?;
            let config = agent_dir.join("agent.toml");
            fs::write(
                &config,
                format!(
                    r#"controller = {connect_to}
bind = "{ip}:0"
bk_cloud_id = 0
hostname = "{agent_id}"
work_dir = "{work}"
cgroup_name = "fleetrun-{http_port}-{agent_id}"

[tls]
ca = "{ca}"
cert = "{cert}"
key = "{key}"
"#,
                    work = agent_dir.join("work").display(),
                    connect_to = match opts.agents_connect_to {
                        Some(address) => format!("{:?}", address.to_string()),
                        // Agent i tries controller i mod N first, then the next ones.
                        None if controllers > 1 => format!(
                            "{:?}",
                            (0..controllers)
                                .map(|k| format!("{agent_host}:{}", ports[(i + k) % controllers].1))
                                .collect::<Vec<_>>()
                        ),
                        None => format!("{:?}", format!("{agent_host}:{agent_port}")),
                    },
                    ca = ca.cert_path().display(),
                    cert = cert.cert.display(),
                    key = cert.key.display(),
                ),
            )?;
            agents.push(AgentProcess {
                agent_id,
                ip,
                config,
                log: agent_dir.join("agent.log"),
                namespace,
                child: None,
            });
        }

        let mut cluster = Self {
            info: ClusterInfo {
                api_url: format!("http://127.0.0.1:{http_port}"),
                agent_addr: format!("{agent_host}:{agent_port}"),
                api_urls: std::iter::once(format!("http://127.0.0.1:{http_port}"))
                    .chain(others.iter().map(|c| c.api_url.clone()))
                    .collect(),
                bk_app_code: APP_CODE.into(),
                bk_app_secret: secret,
                bk_username: "admin".into(),
                callback_secret,
                bk_scope_type: "biz".into(),
                bk_scope_id: BIZ_ID.to_string(),
                hosts: Vec::new(),
                accounts,
                topology: Value::Null,
                dynamic_groups: Value::Null,
            },
            controller_log: dir.join("controller.log"),
            dir,
            agents,
            controller_config,
            bin_dir,
            log_format: std::env::var("FLEETRUN_LOG_FORMAT").ok(),
            controller_wrapper: Vec::new(),
            controller: None,
            others,
        };
        cluster.start_controller().await?;
        for i in 1..controllers {
            cluster.start_controller_at(i).await?;
        }
        for i in 0..cluster.agents.len() {
            cluster.start_agent(i)?;
        }
        let ids: Vec<String> = cluster.agents.iter().map(|a| a.agent_id.clone()).collect();
        let hosts = cluster.wait_online(&ids, Duration::from_secs(60)).await?;
        cluster.info.hosts = ids
            .iter()
            .map(|id| {
                let h = hosts
                    .iter()
                    .find(|h| h["agent_id"] == json!(id))
                    .expect("online host listed");
                HostInfo {
                    bk_host_id: h["bk_host_id"].as_i64().unwrap_or_default(),
                    bk_cloud_id: h["bk_cloud_id"].as_i64().unwrap_or_default(),
                    ip: h["ip"].as_str().unwrap_or_default().to_owned(),
                    agent_id: id.clone(),
                }
            })
            .collect();
        let client = cluster.info.client();
        let topology = client.fleetrun("get_topology").await?;
        cluster.info.dynamic_groups = topology["dynamic_groups"].clone();
        cluster.info.topology = json!({
            "businesses": topology["businesses"],
            "business_sets": topology["business_sets"],
        });
        if opts.inventory.is_some() {
            // A custom inventory brings its own accounts and businesses.
            if let Some(first) = topology["businesses"][0]["bk_biz_id"].as_i64() {
                cluster.info.bk_scope_id = first.to_string();
            }
            let accounts = client
                .call("get_account_list", json!({"bk_scope_type": "biz", "bk_scope_id": cluster.info.bk_scope_id, "length": 1000}))
                .await?;
            cluster.info.accounts = accounts["data"]
                .as_array()
                .into_iter()
                .flatten()
                .map(|a| AccountInfo {
                    id: a["id"].as_i64().unwrap_or_default(),
                    alias: a["alias"].as_str().unwrap_or_default().to_owned(),
                    account: a["account"].as_str().unwrap_or_default().to_owned(),
                })
                .collect();
        }
        fs::write(
            cluster.dir.join("cluster.json"),
            serde_json::to_string_pretty(&cluster.info)?,
        )?;
        Ok(cluster)
    }

    /// Starts one of the cluster's binaries with `config`, its output appended to `log`.
    pub fn spawn(&self, binary: &str, config: &Path, log: &Path) -> Result<Child> {
        self.spawn_in(None, binary, config, log)
    }

    /// Like [`Self::spawn`], inside a network namespace when one is given. `ip netns exec`
    /// execs the binary, so the child's pid is the binary's.
    fn spawn_in(
        &self,
        namespace: Option<&str>,
        binary: &str,
        config: &Path,
        log: &Path,
    ) -> Result<Child> {
        let log_file = fs::OpenOptions::new().create(true).append(true).open(log)?;
        let program = self.bin_dir.join(binary);
        let mut command = match namespace {
            Some(namespace) => {
                let mut c = Command::new("ip");
                c.args(["netns", "exec", namespace]).arg(&program);
                c
            }
            None => match self.controller_wrapper.split_first() {
                Some((wrapper, args)) if binary == "fleetrun-controller" => {
                    let mut c = Command::new(wrapper);
                    c.args(args).arg(&program);
                    c
                }
                _ => Command::new(&program),
            },
        };
        command
            .arg("--config")
            .arg(config)
            .env(
                "FLEETRUN_LOG",
                std::env::var("FLEETRUN_LOG").unwrap_or_else(|_| "info".into()),
            )
            .envs(
                self.log_format
                    .iter()
                    .map(|format| ("FLEETRUN_LOG_FORMAT", format)),
            )
            .stdin(Stdio::null())
            .stdout(log_file.try_clone()?)
            .stderr(log_file)
            .spawn()
            .with_context(|| format!("starting {binary}"))
    }

    /// Starts (or restarts) controller `index` (0 the first, as [`Self::start_controller`])
    /// and waits until its API answers.
    pub async fn start_controller_at(&mut self, index: usize) -> Result<()> {
        if index == 0 {
            return self.start_controller().await;
        }
        let other = &self.others[index - 1];
        ensure!(
            other.child.is_none(),
            "controller c{} is running",
            index + 1
        );
        let child = self.spawn("fleetrun-controller", &other.config, &other.log)?;
        self.others[index - 1].child = Some(child);
        let mut info = self.info.clone();
        info.api_url = self.others[index - 1].api_url.clone();
        let client = info.client();
        let deadline = tokio::time::Instant::now() + Duration::from_secs(30);
        loop {
            if client.hosts().await.is_ok() {
                return Ok(());
            }
            let other = &mut self.others[index - 1];
            if let Some(child) = other.child.as_mut()
                && let Some(status) = child.try_wait()?
            {
                other.child = None;
                bail!(
                    "controller c{} exited with {status}; see {}",
                    index + 1,
                    other.log.display()
                );
            }
            ensure!(
                tokio::time::Instant::now() < deadline,
                "controller c{} did not answer within 30 s",
                index + 1
            );
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }

    /// Kills controller `index` with SIGKILL (as a crash would).
    pub fn kill_controller_at(&mut self, index: usize) -> Result<()> {
        if index == 0 {
            return self.kill_controller();
        }
        if let Some(mut child) = self.others[index - 1].child.take() {
            child.kill()?;
            child.wait()?;
        }
        Ok(())
    }

    /// The log of controller `index` (0 the first).
    pub fn controller_log_at(&self, index: usize) -> PathBuf {
        match index {
            0 => self.controller_log.clone(),
            i => self.others[i - 1].log.clone(),
        }
    }

    /// A client of controller `index`'s API.
    pub fn client_at(&self, index: usize) -> crate::client::ApiClient {
        let mut info = self.info.clone();
        if let Some(url) = self.info.api_urls.get(index) {
            info.api_url = url.clone();
        }
        info.client()
    }

    /// Starts (or restarts) the controller and waits until its API answers.
    pub async fn start_controller(&mut self) -> Result<()> {
        ensure!(
            self.controller.is_none(),
            "the controller is already running"
        );
        let child = self.spawn(
            "fleetrun-controller",
            &self.controller_config,
            &self.controller_log,
        )?;
        self.controller = Some(child);
        let client = self.info.client();
        let deadline = tokio::time::Instant::now() + Duration::from_secs(30);
        loop {
            if client.hosts().await.is_ok() {
                return Ok(());
            }
            if let Some(child) = self.controller.as_mut()
                && let Some(status) = child.try_wait()?
            {
                self.controller = None;
                bail!(
                    "the controller exited with {status}; see {}",
                    self.controller_log.display()
                );
            }
            ensure!(
                tokio::time::Instant::now() < deadline,
                "the controller did not answer within 30 s"
            );
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }

    /// The first controller's process id while it runs (the wrapper's, when there is one).
    pub fn controller_pid(&self) -> Option<u32> {
        self.controller.as_ref().map(Child::id)
    }

    /// Kills the controller with SIGKILL (as a crash would).
    pub fn kill_controller(&mut self) -> Result<()> {
        if let Some(mut child) = self.controller.take() {
            child.kill()?;
            child.wait()?;
        }
        Ok(())
    }

    /// Asks the controller to stop (SIGTERM) and waits up to `limit`: how it exited, or `None`
    /// when it was still running then (it is killed).
    pub fn stop_controller(&mut self, limit: Duration) -> Result<Option<std::process::ExitStatus>> {
        let Some(mut child) = self.controller.take() else {
            bail!("the controller is not running");
        };
        nix::sys::signal::kill(
            nix::unistd::Pid::from_raw(child.id() as i32),
            nix::sys::signal::Signal::SIGTERM,
        )?;
        let deadline = std::time::Instant::now() + limit;
        loop {
            if let Some(status) = child.try_wait()? {
                return Ok(Some(status));
            }
            if std::time::Instant::now() > deadline {
                child.kill()?;
                child.wait()?;
                return Ok(None);
            }
            std::thread::sleep(Duration::from_millis(20));
        }
    }

    /// Starts (or restarts) agent `index`.
    pub fn start_agent(&mut self, index: usize) -> Result<()> {
        let agent = &self.agents[index];
        ensure!(
            agent.child.is_none(),
            "{} is already running",
            agent.agent_id
        );
        let child = match &agent.namespace {
            Some(namespace) => {
                self.spawn_in(Some(namespace), "fleetrun-agent", &agent.config, &agent.log)?
            }
            None => self.spawn("fleetrun-agent", &agent.config, &agent.log)?,
        };
        self.agents[index].child = Some(child);
        Ok(())
    }

    /// Kills agent `index` with SIGKILL (as a crash would).
    pub fn kill_agent(&mut self, index: usize) -> Result<()> {
        if let Some(mut child) = self.agents[index].child.take() {
            child.kill()?;
            child.wait()?;
        }
        Ok(())
    }

    /// Waits until every named agent is online; returns the controller's host list.
    pub async fn wait_online(&self, agent_ids: &[String], limit: Duration) -> Result<Vec<Value>> {
        self.wait_hosts(limit, |hosts| {
            agent_ids.iter().all(|id| {
                hosts
                    .iter()
                    .any(|h| h["agent_id"] == json!(id) && h["online"] == json!(true))
            })
        })
        .await
        .with_context(|| {
            format!(
                "agents {agent_ids:?} not all online; logs under {}",
                self.dir.display()
            )
        })
    }

    /// Waits until the named agent is offline.
    pub async fn wait_offline(&self, agent_id: &str, limit: Duration) -> Result<Vec<Value>> {
        self.wait_hosts(limit, |hosts| {
            hosts
                .iter()
                .any(|h| h["agent_id"] == json!(agent_id) && h["online"] == json!(false))
        })
        .await
        .with_context(|| format!("{agent_id} still online"))
    }

    async fn wait_hosts(
        &self,
        limit: Duration,
        done: impl Fn(&[Value]) -> bool,
    ) -> Result<Vec<Value>> {
        let client = self.info.client();
        let deadline = tokio::time::Instant::now() + limit;
        loop {
            if let Ok(hosts) = client.hosts().await
                && done(&hosts)
            {
                return Ok(hosts);
            }
            ensure!(
                tokio::time::Instant::now() < deadline,
                "not reached within {limit:?}"
            );
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }

    /// Stops every process politely (SIGTERM), then forcibly after a grace period.
    pub fn stop(&mut self) {
        let mut children: Vec<Child> = self
            .agents
            .iter_mut()
            .filter_map(|a| a.child.take())
            .collect();
        children.extend(self.controller.take());
        children.extend(self.others.iter_mut().filter_map(|c| c.child.take()));
        for child in &children {
            let _ = nix::sys::signal::kill(
                nix::unistd::Pid::from_raw(child.id() as i32),
                nix::sys::signal::Signal::SIGTERM,
            );
        }
        let deadline = std::time::Instant::now() + Duration::from_secs(5);
        for mut child in children {
            loop {
                match child.try_wait() {
                    Ok(Some(_)) | Err(_) => break,
                    Ok(None) if std::time::Instant::now() > deadline => {
                        let _ = child.kill();
                        let _ = child.wait();
                        break;
                    }
                    Ok(None) => std::thread::sleep(Duration::from_millis(20)),
                }
            }
        }
    }
}

impl Drop for Cluster {
    fn drop(&mut self) {
        self.stop();
    }
}
