//! The controller's configuration file (TOML).

use std::{collections::BTreeMap, net::SocketAddr, path::PathBuf};

use serde::Deserialize;

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Config {
    /// Where bk-job clients reach the HTTP API.
    pub http_listen: SocketAddr,
    /// Where agents reach the QUIC gateway.
    pub agent_listen: SocketAddr,
    /// The database: a SQLite file (`sqlite:///var/lib/fleetrun/db.sqlite`, or a bare path) or
    /// a PostgreSQL database (`postgres://user:password@host:5432/name`).
    #[serde(deserialize_with = "database")]
    pub database: fleetrun_store::Database,
    /// The gateway's CA, certificate and key (PEM).
    pub tls: fleetrun_net::TlsFiles,
    /// Applications allowed to call the API.
    #[serde(default)]
    pub apps: Vec<AppConfig>,
    /// Execution accounts jobs may name.
    #[serde(default)]
    pub accounts: Vec<AccountConfig>,
    /// The inventory file (TOML): businesses, business sets, topology, host placement,
    /// dynamic groups and accounts. Without it, the simple `businesses`, `accounts` and
    /// `placement` sections below describe a flat inventory; with it, they must be absent.
    pub inventory: Option<PathBuf>,
    /// Businesses jobs may be scoped to.
    #[serde(default)]
    pub businesses: Vec<BusinessConfig>,
    #[serde(default)]
    pub placement: PlacementConfig,
    #[serde(default)]
    pub limits: LimitsConfig,
    #[serde(default)]
    pub security: SecurityConfig,
    /// Where job callbacks may go beyond public addresses.
    #[serde(default)]
    pub callbacks: crate::callback::CallbacksConfig,
    #[serde(default)]
    pub agents: AgentsConfig,
    /// `/metrics`; not served without this section.
    #[serde(default)]
    pub metrics: Option<MetricsConfig>,
    /// How long finished jobs are kept.
    #[serde(default)]
    pub retention: crate::retention::RetentionConfig,
    /// The HTTP API's own settings.
    #[serde(default)]
    pub api: ApiConfig,
    /// The web console: its users, their scopes and roles.
    #[serde(default)]
    pub console: crate::console::ConsoleConfig,
    /// The audit trail.
    #[serde(default)]
    pub audit: AuditConfig,
    /// The agent package and install script served to new hosts.
    pub dist: Option<crate::dist::DistConfig>,
    /// Enrollment of new hosts with join tokens; not served without this section.
    #[serde(default)]
    pub enroll: Option<crate::enroll::EnrollConfig>,
    /// This controller among others sharing its PostgreSQL database. Without this section the
    /// controller is alone on its database (as ever): it holds it exclusively and takes no leases.
    #[serde(default)]
    pub cluster: Option<crate::cluster::ClusterConfig>,
    /// File transfers: the content store and local uploads.
    #[serde(default)]
    pub files: FilesConfig,
}

/// `[files]`.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct FilesConfig {
    /// The content store's directory: `content` in the state directory (beside a SQLite
    /// database; beside the parameter key file with PostgreSQL) unless set.
    pub content_dir: Option<PathBuf>,
    /// Most bytes the content store holds.
    pub max_bytes: u64,
    /// Most bytes of one local file upload.
    pub max_upload_bytes: u64,
    /// Seconds an upload URL and the upload stay usable.
    pub upload_ttl_secs: u64,
    /// The base URL upload URLs are made of (`https://job.example.com`); without it, the API's
    /// own listening address.
    pub public_url: Option<String>,
}

impl Default for FilesConfig {
    fn default() -> Self {
        Self {
            content_dir: None,
            max_bytes: 16 << 30,
            max_upload_bytes: 4 << 30,
            upload_ttl_secs: 24 * 3600,
            public_url: None,
        }
    }
}

/// `[audit]`.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct AuditConfig {
    /// Whether state-changing API calls are recorded (default true). Turning it off is for
    /// measuring what the trail costs; a production controller keeps it on.
    #[serde(default = "enabled")]
    pub enabled: bool,
}

impl Default for AuditConfig {
    fn default() -> Self {
        Self { enabled: true }
    }
}

fn enabled() -> bool {
    true
}

/// `[api]`.
#[derive(Debug, Clone, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ApiConfig {
    /// HTTPS for the API; plain HTTP without it.
    pub tls: Option<ApiTlsConfig>,
    /// Plain HTTP on an address other than loopback: refused at start unless this is true
    /// (behind a TLS-terminating proxy on a private network, say). Credentials and scripts
    /// would otherwise cross the network in clear by mistake.
    #[serde(default)]
    pub allow_plain_http: bool,
}

/// The API's certificate chain and key (PEM), read again on SIGHUP.
#[derive(Debug, Clone, PartialEq, Eq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ApiTlsConfig {
    pub cert: PathBuf,
    pub key: PathBuf,
}

/// Who may scrape `/metrics`.
#[derive(Clone, Deserialize)]
#[serde(try_from = "MetricsConfigFile")]
pub struct MetricsConfig {
    /// The token scrapers send as `Authorization: Bearer <token>`.
    pub bearer_token: String,
}

impl std::fmt::Debug for MetricsConfig {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("MetricsConfig").finish_non_exhaustive()
    }
}

/// `[metrics]` as written: the token as text, or where to find it.
#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct MetricsConfigFile {
    bearer_token: Option<String>,
    bearer_token_env: Option<String>,
    bearer_token_file: Option<PathBuf>,
}

impl TryFrom<MetricsConfigFile> for MetricsConfig {
    type Error = String;
    fn try_from(file: MetricsConfigFile) -> Result<Self, String> {
        let token = crate::secret_source::SecretSource {
            key: "bearer_token",
            text: file.bearer_token.as_deref(),
            env: file.bearer_token_env.as_deref(),
            file: file.bearer_token_file.as_deref(),
        }
        .resolve()?
        .ok_or("bearer_token (or bearer_token_env, bearer_token_file) is required")?;
        if token.len() < 16 {
            return Err("bearer_token must be at least 16 characters".to_owned());
        }
        Ok(Self {
            bearer_token: token,
        })
    }
}

/// Which agents may register, and what their claims about themselves are worth.
#[derive(Debug, Clone, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct AgentsConfig {
    /// What becomes of an agent the inventory does not list and that has no host yet.
    #[serde(default)]
    pub unlisted: UnlistedAgents,
    /// Cloud areas whose agents' reported address is believed although their certificate names
    /// no address and they connect from another one (behind NAT). Elsewhere such an agent is
    /// refused.
    #[serde(default)]
    pub trust_reported_ip_in: Vec<i64>,
}

/// What becomes of an agent the inventory does not list and that has no host yet.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum UnlistedAgents {
    /// Refused until an operator lists it (`move_hosts` with its `agent_id`).
    #[default]
    Refuse,
    /// Registered, and placed where the inventory's `[unlisted_agents]` says (by default the
    /// unassigned pool).
    Register,
}

#[derive(Debug, Clone, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct SecurityConfig {
    /// File holding the key (32 bytes, base64) that encrypts sensitive script parameters at rest.
    /// Created with a random key at first start when missing; by default `param.key` beside a
    /// SQLite database. Required with PostgreSQL (controllers sharing a database share this key).
    pub param_key_file: Option<PathBuf>,
    /// File holding the key (32 bytes, base64) the audit trail's hash chain is made with
    /// (HMAC-SHA256). Created with a random key at first start when missing; by default
    /// `audit.key` beside the parameter key file. Keep it where the database's writers cannot
    /// read it.
    pub audit_key_file: Option<PathBuf>,
    /// File naming the audit trail's last entry (its head anchor), rewritten after each commit:
    /// it must be in a directory the controller can write. By default `audit.head` beside a
    /// SQLite database, or beside the parameter key file with PostgreSQL.
    pub audit_anchor_file: Option<PathBuf>,
}

#[derive(Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct AppConfig {
    pub bk_app_code: String,
    /// The secret as text; or `bk_app_secret_env` / `bk_app_secret_file` (read at load).
    #[serde(default)]
    pub bk_app_secret: String,
    /// The environment variable holding `bk_app_secret`.
    #[serde(default)]
    pub bk_app_secret_env: Option<String>,
    /// The file (owner-only) holding `bk_app_secret`.
    #[serde(default)]
    pub bk_app_secret_file: Option<PathBuf>,
    /// The environment variable holding `callback_secret`.
    #[serde(default)]
    pub callback_secret_env: Option<String>,
    /// The file (owner-only) holding `callback_secret`.
    #[serde(default)]
    pub callback_secret_file: Option<PathBuf>,
    /// Key for the HMAC-SHA256 signature (`X-Fleetrun-Signature`) on this app's job callbacks;
    /// without one its callbacks are sent unsigned.
    #[serde(default)]
    pub callback_secret: Option<String>,
    /// Scopes the app may act on, as `biz:<id>` or `biz_set:<id>`; `*` for every scope.
    /// Required: an app without it is a configuration error, never an app allowed everywhere.
    #[serde(default, rename = "scopes")]
    scope_list: Vec<String>,
    /// `scopes`, parsed when the configuration loads.
    #[serde(skip)]
    pub scopes: Scopes,
    /// Whether the app may administer the controller (change, replace, reload and read the
    /// inventory). A grant of its own: `scopes = ["*"]` does not imply it.
    #[serde(default)]
    pub admin: bool,
    /// Whether the app may change the public scripts (the `*_public_script_*` APIs that
    /// write). Every app may read and run them.
    #[serde(default)]
    pub public_scripts: bool,
}

/// The scopes an app, account or console user is granted: `*` (every scope), or a list of
/// businesses and business sets. Parsed once, when the configuration loads.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Scopes {
    /// `*` was listed.
    every: bool,
    listed: Vec<fleetrun_inventory::Scope>,
}

/// Why a `scopes` list is not one.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) enum ScopesError {
    /// Nothing listed.
    Empty,
    /// This entry is not `biz:<id>`, `biz_set:<id>` (or `*`, where it is allowed).
    Invalid(String),
}

impl Scopes {
    /// Parses a `scopes` list; `*` is refused unless `every_allowed`.
    pub(crate) fn parse(list: &[String], every_allowed: bool) -> Result<Self, ScopesError> {
        if list.is_empty() {
            return Err(ScopesError::Empty);
        }
        let mut scopes = Self::default();
        for text in list {
            if every_allowed && text == "*" {
                scopes.every = true;
                continue;
            }
            let scope = text
                .parse()
                .map_err(|_| ScopesError::Invalid(text.clone()))?;
            scopes.listed.push(scope);
        }
        Ok(scopes)
    }

    /// Whether this grant covers `scope`.
    pub fn allows(&self, scope: fleetrun_inventory::Scope) -> bool {
        self.every || self.listed.contains(&scope)
    }

    /// Whether this grant covers the scope of a stored job or a request (`biz`, `2`); text that
    /// names no scope is covered by nothing.
    pub fn allows_text(&self, scope_type: &str, scope_id: &str) -> bool {
        let Ok(id) = scope_id.parse() else {
            return false;
        };
        match scope_type {
            "biz" => self.allows(fleetrun_inventory::Scope::Biz(id)),
            "biz_set" => self.allows(fleetrun_inventory::Scope::BizSet(id)),
            _ => false,
        }
    }

    /// Whether `*` was granted: every scope, and the hosts in none.
    pub fn is_unrestricted(&self) -> bool {
        self.every
    }

    /// The businesses and business sets listed (without `*`).
    pub fn listed(&self) -> &[fleetrun_inventory::Scope] {
        &self.listed
    }
}

impl std::fmt::Debug for AppConfig {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("AppConfig")
            .field("bk_app_code", &self.bk_app_code)
            .finish_non_exhaustive()
    }
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct AccountConfig {
    pub id: i64,
    pub alias: String,
    /// The OS user name on the hosts.
    pub account: String,
    /// Scopes whose jobs may run as it, as `biz:<id>` or `biz_set:<id>`. Required: as in bk-job,
    /// an account belongs to the businesses that use it, and one listing none is usable nowhere.
    #[serde(default, rename = "scopes")]
    scope_list: Vec<String>,
    /// `scopes`, parsed when the configuration loads.
    #[serde(skip)]
    pub scopes: Scopes,
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct BusinessConfig {
    pub bk_biz_id: i64,
    pub name: String,
}

/// Which business a newly registered host lands in.
#[derive(Debug, Clone, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct PlacementConfig {
    /// Business for agents not named in `agents`; none leaves them unassigned (not targetable).
    pub default_bk_biz_id: Option<i64>,
    /// Business per agent id.
    #[serde(default)]
    pub agents: BTreeMap<String, i64>,
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct LimitsConfig {
    /// Output kept per host per task, in bytes.
    pub output_limit: u64,
    /// Seconds between agent heartbeats.
    pub heartbeat_secs: u64,
    /// Seconds after a task's own timeout before the controller gives up on the agent (16).
    pub agent_grace_secs: u64,
    /// Attempts at delivering a job's callback before it is given up as failed.
    pub callback_max_attempts: u32,
    /// Seconds a client has to send a request's head (and, when its credentials are not in the
    /// head, the first `http_unauthenticated_body_bytes` of its body); also how long an idle
    /// connection stays open.
    pub http_header_timeout_secs: u64,
    /// Seconds an authenticated client has to send the whole body, from when its request is served
    /// (waiting for a turn among `http_max_requests` does not count).
    pub http_body_timeout_secs: u64,
    /// Open HTTP connections; more wait in the listen backlog.
    pub http_max_connections: usize,
    /// Requests handled at once; more wait for their turn.
    pub http_max_requests: usize,
    /// Bytes of body read from a client that has not yet shown its credentials: they must be
    /// within this much of the body's start.
    pub http_unauthenticated_body_bytes: usize,
    /// Bytes held for all unauthenticated requests together.
    pub http_unauthenticated_total_bytes: usize,
}

impl Default for LimitsConfig {
    fn default() -> Self {
        Self {
            output_limit: 5 * 1024 * 1024,
            heartbeat_secs: 5,
            agent_grace_secs: 60,
            callback_max_attempts: 10,
            http_header_timeout_secs: 10,
            http_body_timeout_secs: 60,
            http_max_connections: 512,
            http_max_requests: 128,
            http_unauthenticated_body_bytes: 64 * 1024,
            http_unauthenticated_total_bytes: 8 * 1024 * 1024,
        }
    }
}

/// The longest an HTTP timeout may be: a day.
const MAX_HTTP_TIMEOUT_SECS: u64 = 24 * 60 * 60;
/// The most HTTP connections, or requests served at once.
const MAX_HTTP_CONNECTIONS: u64 = 1_000_000;
/// The most bytes unauthenticated requests may hold together.
const MAX_UNAUTHENTICATED_TOTAL_BYTES: u64 = 16 << 30;

/// The configuration file could not be used.
#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    #[error("cannot read {path}: {source}")]
    Read {
        path: PathBuf,
        source: std::io::Error,
    },
    /// Not TOML, or not the configuration's shape (unknown key, wrong type, missing key).
    #[error("{path}{at}: {message}")]
    Parse {
        path: PathBuf,
        at: Location,
        message: String,
    },
    /// Well-formed, but not a configuration the controller can run with.
    #[error("{path}{at}: {message}")]
    Invalid {
        path: PathBuf,
        at: Location,
        message: String,
    },
}

/// Where in the file a problem is, when that is known: `:line:column`, both from 1.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Location(pub Option<(usize, usize)>);

impl Location {
    /// The line and column of byte `offset` of `text`.
    pub fn of_offset(text: &str, offset: usize) -> Self {
        let before = &text[..text.floor_char_boundary(offset.min(text.len()))];
        let line = before.matches('\n').count() + 1;
        let column = before.rsplit('\n').next().map_or(0, |l| l.chars().count()) + 1;
        Self(Some((line, column)))
    }

    /// Where the value at `keys` is written in `text` (the key's table when the key is absent).
    pub fn of_keys(text: &str, keys: &[Key]) -> Self {
        let Ok(root) = toml::de::DeTable::parse(text) else {
            return Self::default();
        };
        let mut span = root.span();
        let mut value: Option<&toml::de::DeValue<'_>> = None;
        let mut table = Some(root.get_ref());
        for key in keys {
            let found = match (key, table, value) {
                (Key::Name(name), Some(t), _) => t
                    .iter()
                    .find(|(k, _)| k.get_ref().as_ref() == *name)
                    .map(|(_, v)| v),
                (Key::Index(i), _, Some(toml::de::DeValue::Array(items))) => items.get(*i),
                _ => None,
            };
            let Some(found) = found else { break };
            span = found.span();
            value = Some(found.get_ref());
            table = match found.get_ref() {
                toml::de::DeValue::Table(t) => Some(t),
                _ => None,
            };
        }
        Self::of_offset(text, span.start)
    }
}

impl std::fmt::Display for Location {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self.0 {
            Some((line, column)) => write!(f, ":{line}:{column}"),
            None => Ok(()),
        }
    }
}

/// One step down into the file: a key of a table, or an element of an array.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Key {
    Name(&'static str),
    Index(usize),
}

/// A configuration that parses but cannot be run with: what is wrong, and at which key.
#[derive(Debug)]
pub struct Invalid {
    pub at: Vec<Key>,
    pub message: String,
}

impl Invalid {
    fn new(at: &[Key], message: impl Into<String>) -> Self {
        Self {
            at: at.to_vec(),
            message: message.into(),
        }
    }
}

use Key::{Index, Name};

/// Deserializes `text`; an error comes with where it is and a message that names the key at
/// fault (toml's own names only the value's line).
/// Reads the `database` setting, naming what is wrong with it.
fn database<'de, D: serde::Deserializer<'de>>(
    deserializer: D,
) -> Result<fleetrun_store::Database, D::Error> {
    let text = String::deserialize(deserializer)?;
    text.parse()
        .map_err(|e| serde::de::Error::custom(format!("database: {e}")))
}

pub fn from_toml<T: serde::de::DeserializeOwned>(
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

impl Config {
    /// Whether the HTTP API listens on a loopback address only (`::ffff:127.0.0.1` included):
    /// the one test of whether plain HTTP may be served without `[api] allow_plain_http`.
    pub fn http_listen_is_loopback(&self) -> bool {
        self.http_listen.ip().to_canonical().is_loopback()
    }

    pub fn load(path: &std::path::Path) -> Result<Self, ConfigError> {
        let text = std::fs::read_to_string(path).map_err(|source| ConfigError::Read {
            path: path.to_owned(),
            source,
        })?;
        Self::parse(path, &text)
    }

    /// Parses and validates the text of the file at `path` (named in errors).
    pub fn parse(path: &std::path::Path, text: &str) -> Result<Self, ConfigError> {
        let mut config: Config = from_toml(text).map_err(|(span, message)| ConfigError::Parse {
            path: path.to_owned(),
            at: span.map_or_else(Location::default, |span| {
                Location::of_offset(text, span.start)
            }),
            message,
        })?;
        config
            .resolve_secrets()
            .and_then(|()| config.validate())
            .map_err(|e| ConfigError::Invalid {
                path: path.to_owned(),
                at: Location::of_keys(text, &e.at),
                message: e.message,
            })?;
        Ok(config)
    }

    /// The key file for sensitive parameters: `security.param_key_file`, else `param.key` beside
    /// the database.
    pub fn param_key_file(&self) -> std::path::PathBuf {
        self.security.param_key_file.clone().unwrap_or_else(|| {
            match &self.database {
                fleetrun_store::Database::Sqlite(path) => path.parent(),
                // Refused by `validate`: there is no directory to put it in.
                fleetrun_store::Database::Postgres(_) => None,
            }
            .unwrap_or(std::path::Path::new("."))
            .join("param.key")
        })
    }

    /// The audit trail's key file: `security.audit_key_file`, else `audit.key` beside the
    /// parameter key file.
    pub fn audit_key_file(&self) -> std::path::PathBuf {
        self.security.audit_key_file.clone().unwrap_or_else(|| {
            self.param_key_file()
                .parent()
                .unwrap_or(std::path::Path::new("."))
                .join("audit.key")
        })
    }

    /// The audit trail's head anchor: `security.audit_anchor_file`, else `audit.head` in the
    /// state directory (beside a SQLite database; beside the parameter key file with
    /// PostgreSQL).
    pub fn audit_anchor_file(&self) -> std::path::PathBuf {
        self.security
            .audit_anchor_file
            .clone()
            .unwrap_or_else(|| self.state_dir().join("audit.head"))
    }

    /// The content store's directory: `files.content_dir`, else `content` in the state directory.
    pub fn content_dir(&self) -> std::path::PathBuf {
        self.files
            .content_dir
            .clone()
            .unwrap_or_else(|| self.state_dir().join("content"))
    }

    /// Where the controller keeps what it writes beside its database: the SQLite database's
    /// directory, or the parameter key file's with PostgreSQL.
    fn state_dir(&self) -> std::path::PathBuf {
        match &self.database {
            fleetrun_store::Database::Sqlite(path) => path.parent().map(ToOwned::to_owned),
            fleetrun_store::Database::Postgres(_) => {
                self.param_key_file().parent().map(ToOwned::to_owned)
            }
        }
        .unwrap_or_else(|| std::path::PathBuf::from("."))
    }

    /// Reads the secrets given as `*_env` or `*_file` into their keys.
    fn resolve_secrets(&mut self) -> Result<(), Invalid> {
        use crate::secret_source::SecretSource;
        for (i, app) in self.apps.iter_mut().enumerate() {
            for key in ["bk_app_secret", "callback_secret"] {
                let (text, env, file) = match key {
                    "bk_app_secret" => (
                        Some(app.bk_app_secret.as_str()).filter(|s| !s.is_empty()),
                        app.bk_app_secret_env.as_deref(),
                        app.bk_app_secret_file.as_deref(),
                    ),
                    _ => (
                        app.callback_secret.as_deref(),
                        app.callback_secret_env.as_deref(),
                        app.callback_secret_file.as_deref(),
                    ),
                };
                let at_key = match (env, file) {
                    (Some(_), _) if key == "bk_app_secret" => "bk_app_secret_env",
                    (Some(_), _) => "callback_secret_env",
                    (None, Some(_)) if key == "bk_app_secret" => "bk_app_secret_file",
                    (None, Some(_)) => "callback_secret_file",
                    (None, None) => key,
                };
                let resolved = SecretSource {
                    key,
                    text,
                    env,
                    file,
                }
                .resolve()
                .map_err(|message| {
                    Invalid::new(
                        &[Name("apps"), Index(i), Name(at_key)],
                        format!("apps: {:?}: {message}", app.bk_app_code),
                    )
                })?;
                match (key, resolved) {
                    ("bk_app_secret", Some(secret)) => app.bk_app_secret = secret,
                    (_, Some(secret)) => app.callback_secret = Some(secret),
                    (_, None) => {}
                }
            }
        }
        Ok(())
    }

    /// Checks what serde cannot, and parses the `scopes` lists.
    fn validate(&mut self) -> Result<(), Invalid> {
        if let Some(cluster) = &self.cluster {
            if let Err(e) = cluster.validate() {
                return Err(Invalid::new(&[Name("cluster")], format!("cluster: {e}")));
            }
            if !matches!(self.database, fleetrun_store::Database::Postgres(_)) {
                return Err(Invalid::new(
                    &[Name("cluster")],
                    "cluster: controllers share only a PostgreSQL database; a SQLite file has \
                     one controller (remove [cluster])"
                        .to_owned(),
                ));
            }
        }
        if matches!(self.database, fleetrun_store::Database::Postgres(_))
            && self.security.param_key_file.is_none()
        {
            return Err(Invalid::new(
                &[Name("database")],
                "database: with PostgreSQL, set [security] param_key_file (the key that seals \
                 sensitive parameters, which lives outside the database)",
            ));
        }
        if self.api.tls.is_none() && !self.api.allow_plain_http && !self.http_listen_is_loopback() {
            return Err(Invalid::new(
                &[Name("http_listen")],
                format!(
                    "http_listen: {} is not a loopback address and [api] tls is not set: \
                     credentials and scripts would cross the network in clear; set [api] tls, or \
                     [api] allow_plain_http = true behind a proxy that terminates TLS",
                    self.http_listen
                ),
            ));
        }
        if let Some(enroll) = &self.enroll {
            enroll
                .validate()
                .and_then(|()| enroll.ca_files(&self.database).map(drop))
                .map_err(|e| Invalid::new(&[Name("enroll")], e))?;
        }
        let mut seen = std::collections::HashSet::new();
        for (i, app) in self.apps.iter_mut().enumerate() {
            let at = |key| [Name("apps"), Index(i), Name(key)];
            if app.bk_app_code.is_empty() {
                return Err(Invalid::new(
                    &at("bk_app_code"),
                    "apps: bk_app_code must not be empty",
                ));
            }
            if app.bk_app_secret.is_empty() {
                return Err(Invalid::new(
                    &at("bk_app_secret"),
                    format!(
                        "apps: bk_app_secret of {:?} must not be empty",
                        app.bk_app_code
                    ),
                ));
            }
            if app.callback_secret.as_deref() == Some("") {
                return Err(Invalid::new(
                    &at("callback_secret"),
                    format!(
                        "apps: callback_secret of {:?} is empty (leave it out to send unsigned callbacks)",
                        app.bk_app_code
                    ),
                ));
            }
            app.scopes = Scopes::parse(&app.scope_list, true).map_err(|e| match e {
                ScopesError::Empty => Invalid::new(
                    &[Name("apps"), Index(i)],
                    format!(
                        "apps: {:?} has no scopes: list those it may act on (\"biz:<id>\", \"biz_set:<id>\", or \"*\" for every scope)",
                        app.bk_app_code
                    ),
                ),
                ScopesError::Invalid(scope) => Invalid::new(
                    &at("scopes"),
                    format!(
                        "apps: scope {scope:?} of {:?} is not \"*\", \"biz:<id>\" or \"biz_set:<id>\"",
                        app.bk_app_code
                    ),
                ),
            })?;
            if !seen.insert(app.bk_app_code.clone()) {
                return Err(Invalid::new(
                    &at("bk_app_code"),
                    format!("apps: bk_app_code {:?} appears twice", app.bk_app_code),
                ));
            }
        }
        let mut ids = std::collections::HashSet::new();
        let mut aliases = std::collections::HashSet::new();
        for (i, account) in self.accounts.iter_mut().enumerate() {
            let at = |key| [Name("accounts"), Index(i), Name(key)];
            if !ids.insert(account.id) {
                return Err(Invalid::new(
                    &at("id"),
                    format!("accounts: id {} appears twice", account.id),
                ));
            }
            if !aliases.insert(account.alias.clone()) {
                return Err(Invalid::new(
                    &at("alias"),
                    format!("accounts: alias {:?} appears twice", account.alias),
                ));
            }
            account.scopes = Scopes::parse(&account.scope_list, false).map_err(|e| match e {
                ScopesError::Empty => Invalid::new(
                    &[Name("accounts"), Index(i)],
                    format!(
                        "accounts: {:?} has no scopes: list the \"biz:<id>\" and \"biz_set:<id>\" whose jobs may run as it",
                        account.alias
                    ),
                ),
                ScopesError::Invalid(scope) => Invalid::new(
                    &at("scopes"),
                    format!(
                        "accounts: scope {scope:?} of {:?} is not \"biz:<id>\" or \"biz_set:<id>\"",
                        account.alias
                    ),
                ),
            })?;
        }
        if self.inventory.is_some()
            && (!self.businesses.is_empty()
                || !self.accounts.is_empty()
                || self.placement.default_bk_biz_id.is_some()
                || !self.placement.agents.is_empty())
        {
            return Err(Invalid::new(
                &[Name("inventory")],
                "inventory: with an inventory file, businesses, accounts and placement belong in it, not here",
            ));
        }
        if self.limits.output_limit < 1024 {
            return Err(Invalid::new(
                &[Name("limits"), Name("output_limit")],
                "limits.output_limit must be at least 1024 bytes",
            ));
        }
        // Three missed heartbeats end a connection: the product must stay a `Duration`.
        if !(1..=MAX_HTTP_TIMEOUT_SECS).contains(&self.limits.heartbeat_secs) {
            return Err(Invalid::new(
                &[Name("limits"), Name("heartbeat_secs")],
                format!(
                    "limits.heartbeat_secs must be between 1 and {MAX_HTTP_TIMEOUT_SECS}, not {}",
                    self.limits.heartbeat_secs
                ),
            ));
        }
        if !(1..=100).contains(&self.limits.callback_max_attempts) {
            return Err(Invalid::new(
                &[Name("limits"), Name("callback_max_attempts")],
                "limits.callback_max_attempts must be between 1 and 100",
            ));
        }
        let l = &self.limits;
        // Upper bounds keep `Instant + Duration` and the semaphores from overflowing on every
        // request; no sane deployment comes near them.
        let bounded: [(&str, u64, u64, u64); 4] = [
            (
                "http_header_timeout_secs",
                l.http_header_timeout_secs,
                1,
                MAX_HTTP_TIMEOUT_SECS,
            ),
            (
                "http_body_timeout_secs",
                l.http_body_timeout_secs,
                1,
                MAX_HTTP_TIMEOUT_SECS,
            ),
            (
                "http_max_connections",
                l.http_max_connections as u64,
                1,
                MAX_HTTP_CONNECTIONS,
            ),
            (
                "http_max_requests",
                l.http_max_requests as u64,
                1,
                MAX_HTTP_CONNECTIONS,
            ),
        ];
        for (key, value, min, max) in bounded {
            if !(min..=max).contains(&value) {
                return Err(Invalid::new(
                    &[Name("limits"), Name(key)],
                    format!("limits.{key} must be between {min} and {max}, not {value}"),
                ));
            }
        }
        if !(1024..=crate::api::MAX_BODY).contains(&l.http_unauthenticated_body_bytes) {
            return Err(Invalid::new(
                &[Name("limits"), Name("http_unauthenticated_body_bytes")],
                format!(
                    "limits.http_unauthenticated_body_bytes must be between 1 KiB and 24 MiB, not {}",
                    l.http_unauthenticated_body_bytes
                ),
            ));
        }
        if !(l.http_unauthenticated_body_bytes as u64..=MAX_UNAUTHENTICATED_TOTAL_BYTES)
            .contains(&(l.http_unauthenticated_total_bytes as u64))
        {
            return Err(Invalid::new(
                &[Name("limits"), Name("http_unauthenticated_total_bytes")],
                format!(
                    "limits.http_unauthenticated_total_bytes must be between \
                     http_unauthenticated_body_bytes ({}) and 16 GiB, not {}",
                    l.http_unauthenticated_body_bytes, l.http_unauthenticated_total_bytes
                ),
            ));
        }
        if let Some((key, message)) = self.retention.problem() {
            return Err(Invalid::new(&[Name("retention"), Name(key)], message));
        }
        self.console.validate(&self.apps)?;
        if let Some((key, message)) = self.dist.as_ref().and_then(|d| d.problem()) {
            return Err(Invalid::new(&[Name("dist"), Name(key)], message));
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn load(limits: &str) -> Result<Config, ConfigError> {
        // One test loads these, one at a time.
        let path =
            std::env::temp_dir().join(format!("fleetrun-config-{}.toml", std::process::id()));
        std::fs::write(
            &path,
            format!(
                "http_listen = \"127.0.0.1:0\"\nagent_listen = \"127.0.0.1:0\"\n\
                 database = \"db.sqlite\"\n\
                 [tls]\nca = \"ca.pem\"\ncert = \"c.pem\"\nkey = \"k.pem\"\n\
                 [limits]\n{limits}\n"
            ),
        )
        .unwrap();
        let loaded = Config::load(&path);
        let _ = std::fs::remove_file(&path);
        loaded
    }

    #[test]
    fn plain_http_off_loopback_needs_to_be_allowed() {
        let config = |listen: &str, api: &str| {
            Config::parse(
                std::path::Path::new("controller.toml"),
                &format!(
                    "http_listen = \"{listen}\"\nagent_listen = \"127.0.0.1:0\"\n\
                     database = \"/tmp/x/db\"\n[tls]\nca = \"a\"\ncert = \"b\"\nkey = \"c\"\n{api}"
                ),
            )
        };
        assert!(config("127.0.0.1:8080", "").is_ok());
        assert!(config("[::1]:8080", "").is_ok());
        // The start-up check and this one agree on a v4-mapped loopback address.
        let mapped = config("[::ffff:127.0.0.1]:8080", "").unwrap();
        assert!(mapped.http_listen_is_loopback());
        assert!(config("[::ffff:10.0.0.5]:8080", "").is_err());
        match config("0.0.0.0:8080", "") {
            Err(ConfigError::Invalid { message, at, .. }) => {
                assert!(message.starts_with("http_listen: "), "{message}");
                assert!(message.contains("allow_plain_http"), "{message}");
                assert_eq!(at.0.map(|(line, _)| line), Some(1));
            }
            other => panic!("plain HTTP on every address was accepted: {other:?}"),
        }
        assert!(config("10.0.0.5:8080", "[api]\nallow_plain_http = true\n").is_ok());
        assert!(
            config(
                "10.0.0.5:8080",
                "[api]\ntls = { cert = \"c.pem\", key = \"k.pem\" }\n"
            )
            .is_ok()
        );
    }

    #[test]
    fn http_limits_out_of_range_are_refused_by_name() {
        load("").unwrap();
        load("http_header_timeout_secs = 86400\nhttp_max_connections = 1000000").unwrap();
        for (line, key) in [
            (
                "http_header_timeout_secs = 86401",
                "http_header_timeout_secs",
            ),
            ("http_header_timeout_secs = 0", "http_header_timeout_secs"),
            (
                "http_body_timeout_secs = 18446744073709551615",
                "http_body_timeout_secs",
            ),
            ("http_max_connections = 1000001", "http_max_connections"),
            ("heartbeat_secs = 18446744073709551615", "heartbeat_secs"),
            ("http_max_requests = 0", "http_max_requests"),
            (
                "http_max_requests = 9223372036854775807",
                "http_max_requests",
            ),
            (
                "http_unauthenticated_body_bytes = 100000000",
                "http_unauthenticated_body_bytes",
            ),
            (
                "http_unauthenticated_total_bytes = 9223372036854775807",
                "http_unauthenticated_total_bytes",
            ),
        ] {
            match load(line) {
                Err(ConfigError::Invalid { message, .. }) => {
                    assert!(message.starts_with(&format!("limits.{key} ")), "{message}")
                }
                other => panic!("{line}: {other:?}"),
            }
        }
    }

    fn parse_database(database: &str, security: &str) -> Result<Config, ConfigError> {
        Config::parse(
            std::path::Path::new("controller.toml"),
            &format!(
                "http_listen = \"127.0.0.1:0\"\nagent_listen = \"127.0.0.1:0\"\n\
                 database = \"{database}\"\n\
                 [tls]\nca = \"ca.pem\"\ncert = \"c.pem\"\nkey = \"k.pem\"\n{security}\n"
            ),
        )
    }

    #[test]
    fn the_database_is_a_sqlite_file_or_a_postgres_url() {
        let config = parse_database("/var/lib/fleetrun/db.sqlite", "").unwrap();
        assert_eq!(
            config.database,
            fleetrun_store::Database::Sqlite("/var/lib/fleetrun/db.sqlite".into())
        );
        assert_eq!(
            config.param_key_file(),
            std::path::Path::new("/var/lib/fleetrun/param.key")
        );
        let config = parse_database("sqlite:///srv/f/db", "").unwrap();
        assert_eq!(
            config.database,
            fleetrun_store::Database::Sqlite("/srv/f/db".into())
        );
        let config = parse_database(
            "postgres://fleet:pw@db:5432/fleet",
            "[security]\nparam_key_file = \"/etc/fleetrun/param.key\"",
        )
        .unwrap();
        assert!(matches!(
            config.database,
            fleetrun_store::Database::Postgres(_)
        ));
        for (database, security, wanted) in [
            ("mysql://db/fleet", "", "unknown database kind"),
            ("postgres://fleet@db:notaport/fleet", "", "PostgreSQL"),
            ("postgres://fleet@db/fleet", "", "param_key_file"),
        ] {
            match parse_database(database, security) {
                Err(ConfigError::Parse { message, at, .. }) => {
                    assert!(message.contains(wanted), "{database}: {message}");
                    assert_eq!(at.0.map(|(line, _)| line), Some(3), "{database}");
                }
                Err(ConfigError::Invalid { message, at, .. }) => {
                    assert!(message.starts_with("database: "), "{message}");
                    assert!(message.contains(wanted), "{database}: {message}");
                    assert_eq!(at.0.map(|(line, _)| line), Some(3), "{database}");
                }
                other => panic!("{database}: {other:?}"),
            }
        }
    }
}

#[cfg(test)]
mod secret_tests {
    use std::os::unix::fs::PermissionsExt;

    use super::*;

    const BASE: &str = "http_listen = \"127.0.0.1:0\"\nagent_listen = \"127.0.0.1:0\"\n\
        database = \"db.sqlite\"\n[tls]\nca = \"ca.pem\"\ncert = \"c.pem\"\nkey = \"k.pem\"\n";

    fn parse(extra: &str) -> Result<Config, ConfigError> {
        Config::parse(std::path::Path::new("c.toml"), &format!("{BASE}{extra}"))
    }

    fn secret_file(mode: u32, text: &str) -> tempfile::NamedTempFile {
        let file = tempfile::NamedTempFile::new().unwrap();
        std::fs::write(file.path(), text).unwrap();
        std::fs::set_permissions(file.path(), std::fs::Permissions::from_mode(mode)).unwrap();
        file
    }

    #[test]
    fn app_secrets_come_from_owner_only_files() {
        let secret = secret_file(0o600, "from-file\n");
        let callback = secret_file(0o400, "callback-key");
        let config = parse(&format!(
            "[[apps]]\nbk_app_code = \"a\"\nbk_app_secret_file = \"{}\"\n\
             callback_secret_file = \"{}\"\nscopes = [\"*\"]\n",
            secret.path().display(),
            callback.path().display()
        ))
        .unwrap();
        assert_eq!(config.apps[0].bk_app_secret, "from-file");
        assert_eq!(
            config.apps[0].callback_secret.as_deref(),
            Some("callback-key")
        );
    }

    #[test]
    fn a_secret_file_others_can_read_is_refused_with_its_line() {
        let secret = secret_file(0o644, "from-file\n");
        let error = parse(&format!(
            "[[apps]]\nbk_app_code = \"a\"\nscopes = [\"*\"]\nbk_app_secret_file = \"{}\"\n",
            secret.path().display()
        ))
        .unwrap_err();
        let text = error.to_string();
        assert!(text.starts_with("c.toml:11:"), "{text}");
        assert!(text.contains("bk_app_secret_file"), "{text}");
        assert!(text.contains("mode 644"), "{text}");
    }

    #[test]
    fn an_unset_variable_and_doubled_sources_are_refused() {
        let error = parse(
            "[[apps]]\nbk_app_code = \"a\"\nbk_app_secret_env = \"FLEETRUN_TEST_NO_SUCH_VAR\"\nscopes = [\"*\"]\n",
        )
        .unwrap_err()
        .to_string();
        assert!(
            error.contains("FLEETRUN_TEST_NO_SUCH_VAR is not set"),
            "{error}"
        );
        let error = parse(
            "[[apps]]\nbk_app_code = \"a\"\nbk_app_secret = \"x\"\nbk_app_secret_env = \"HOME\"\nscopes = [\"*\"]\n",
        )
        .unwrap_err()
        .to_string();
        assert!(error.contains("not several"), "{error}");
        // Neither given: the secret is missing, as before.
        let error = parse("[[apps]]\nbk_app_code = \"a\"\nscopes = [\"*\"]\n")
            .unwrap_err()
            .to_string();
        assert!(error.contains("bk_app_secret"), "{error}");
    }

    #[test]
    fn metrics_need_a_long_enough_token() {
        let config = parse("[metrics]\nbearer_token = \"0123456789abcdef\"\n").unwrap();
        assert_eq!(config.metrics.unwrap().bearer_token, "0123456789abcdef");
        let error = parse("[metrics]\nbearer_token = \"short\"\n")
            .unwrap_err()
            .to_string();
        assert!(error.starts_with("c.toml:8:"), "{error}");
        assert!(error.contains("at least 16"), "{error}");
        assert!(parse("[metrics]\n").is_err());
    }

    #[test]
    fn scopes_are_parsed_at_load_and_a_bad_one_is_named_with_its_line() {
        use fleetrun_inventory::Scope::{Biz, BizSet};
        let config = parse(
            "[[apps]]\nbk_app_code = \"a\"\nbk_app_secret = \"s\"\nscopes = [\"biz:2\", \"biz_set:5\"]\n\
             [[apps]]\nbk_app_code = \"b\"\nbk_app_secret = \"s\"\nscopes = [\"*\"]\n",
        )
        .unwrap();
        let (a, b) = (&config.apps[0].scopes, &config.apps[1].scopes);
        assert_eq!(a.listed(), [Biz(2), BizSet(5)]);
        assert!(a.allows(Biz(2)) && a.allows(BizSet(5)));
        assert!(!a.allows(Biz(5)) && !a.allows(BizSet(2)));
        assert!(!a.is_unrestricted());
        assert!(a.allows_text("biz", "2") && !a.allows_text("biz", "x"));
        assert!(!a.allows_text("host", "2"));
        assert!(b.is_unrestricted() && b.allows(Biz(99)));
        let error = parse(
            "[[apps]]\nbk_app_code = \"a\"\nbk_app_secret = \"s\"\nscopes = [\"biz:2\", \"biz:two\"]\n",
        )
        .unwrap_err()
        .to_string();
        assert!(error.starts_with("c.toml:11:"), "{error}");
        assert!(error.contains("scope \"biz:two\" of \"a\""), "{error}");
        // An account is never granted every scope.
        let error = parse(
            "[[businesses]]\nbk_biz_id = 2\nname = \"d\"\n\
             [[accounts]]\nid = 1\nalias = \"root\"\naccount = \"root\"\nscopes = [\"*\"]\n",
        )
        .unwrap_err()
        .to_string();
        assert!(error.contains("scope \"*\" of \"root\""), "{error}");
        assert!(error.starts_with("c.toml:15:"), "{error}");
    }

    #[test]
    fn retention_settings_are_checked_by_name() {
        assert_eq!(parse("").unwrap().retention.finished_jobs_days, 30);
        let error = parse("[retention]\nbatch_jobs = 0\n")
            .unwrap_err()
            .to_string();
        assert!(error.contains("retention.batch_jobs"), "{error}");
        assert!(error.starts_with("c.toml:9:"), "{error}");
    }
}
