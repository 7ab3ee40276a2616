//! Enrollment: a host with a join token and the CA's pin gets an agent certificate, and its host
//! is placed where the token says.
//!
//! The listener is TCP with TLS on the QUIC gateway's port number (see `fleetrun_net`'s enroll
//! module for why not the QUIC endpoint itself), ALPN `fleetrun-enroll/1`, one request and one
//! reply per connection. Attempts are counted per source address; beyond the limit an attempt is
//! refused, and far beyond it dropped before the TLS handshake.
//!
//! **Architecture invariant:** the controller chooses everything an issued certificate says:
//! the identity derives from the agent key's fingerprint (so the same key enrolls as the same
//! agent), the only name is its agent URI, and nothing of the request but its public key is used.
//! The address the connection came from (and, in a cloud area whose reports are trusted, those the
//! agent reports) pins the agent in the inventory, with the token's cloud area and placement.

pub mod ca;
mod csr;
mod renew;
pub mod token;

use std::{
    collections::{HashMap, HashSet},
    net::{IpAddr, SocketAddr},
    path::PathBuf,
    sync::{Arc, Mutex, RwLock},
    time::{Duration, Instant},
};

use fleetrun_inventory::Change;
use fleetrun_proto::{
    EnrollReply, EnrollRequest, Enrolled, FrameDecoder, MAX_ENROLL_FRAME, MAX_ENROLL_IPS,
    encode_frame,
};
use fleetrun_store::{Enrollment, JoinToken};
use serde::Deserialize;
use tokio::io::{AsyncReadExt as _, AsyncWriteExt as _};
use tokio_util::sync::CancellationToken;

use crate::{Shared, now_ms};

pub use ca::{CaFiles, ControllerCa};
pub use renew::Renewal;

/// `[enroll]`: present, the controller runs the enrollment listener.
#[derive(Debug, Clone, PartialEq, Eq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct EnrollConfig {
    /// The CA's certificate; by default `ca.pem` beside a SQLite database.
    pub ca_cert: Option<PathBuf>,
    /// The CA's key; by default `ca.key.pem` beside a SQLite database.
    pub ca_key: Option<PathBuf>,
    /// How long an agent's certificate is valid; it renews at two thirds of it.
    #[serde(default = "default_lifetime")]
    pub cert_lifetime_secs: u64,
    /// Enrollment attempts one source address may make per minute.
    #[serde(default = "default_attempts")]
    pub attempts_per_minute: u32,
    /// `host:port` agents reach the gateway at, as the install command and the agent's
    /// configuration name it; by default `agent_listen` when that is not a wildcard.
    pub agent_address: Option<String>,
    /// Where hosts fetch the install script (`<api_url>/install.sh`); by default the API's
    /// listening address.
    pub api_url: Option<String>,
    /// The name in the gateway's certificate agents check.
    #[serde(default = "default_server_name")]
    pub server_name: String,
}

fn default_lifetime() -> u64 {
    7 * 24 * 3600
}

fn default_attempts() -> u32 {
    20
}

fn default_server_name() -> String {
    "fleetrun-controller".to_owned()
}

/// Shortest and longest certificate lifetimes accepted.
pub const LIFETIME_RANGE: std::ops::RangeInclusive<u64> = 10..=366 * 24 * 3600;

impl EnrollConfig {
    /// The CA's files: as configured, else beside a SQLite database.
    pub fn ca_files(&self, database: &fleetrun_store::Database) -> Result<CaFiles, String> {
        let beside = match database {
            fleetrun_store::Database::Sqlite(path) => path.parent().map(|p| p.to_owned()),
            fleetrun_store::Database::Postgres(_) => None,
        };
        let pick = |given: &Option<PathBuf>, name: &str, key: &str| match (given, &beside) {
            (Some(path), _) => Ok(path.clone()),
            (None, Some(dir)) => Ok(dir.join(name)),
            (None, None) => Err(format!(
                "enroll.{key} is required with a PostgreSQL database: there is no database \
                 directory to keep the CA beside"
            )),
        };
        Ok(CaFiles {
            cert: pick(&self.ca_cert, "ca.pem", "ca_cert")?,
            key: pick(&self.ca_key, "ca.key.pem", "ca_key")?,
        })
    }

    /// Checks what the configuration's parse cannot.
    pub fn validate(&self) -> Result<(), String> {
        if !LIFETIME_RANGE.contains(&self.cert_lifetime_secs) {
            return Err(format!(
                "enroll.cert_lifetime_secs: {} is not between {} and {}",
                self.cert_lifetime_secs,
                LIFETIME_RANGE.start(),
                LIFETIME_RANGE.end()
            ));
        }
        if self.attempts_per_minute == 0 {
            return Err("enroll.attempts_per_minute must be at least 1".into());
        }
        Ok(())
    }
}

/// Attempts per source address in the current minute.
#[derive(Debug, Default)]
struct Attempts {
    window: Option<Instant>,
    by_address: HashMap<IpAddr, u32>,
}

/// What to do with an attempt.
#[derive(Debug, PartialEq, Eq)]
enum Admit {
    Serve,
    /// Over the limit: answered with a refusal.
    Refuse,
    /// Far over the limit: closed before any TLS work.
    Drop,
}

/// Most source addresses counted in one minute: beyond them a new address is dropped until the
/// minute ends (the count must not grow with an attacker's addresses).
const MAX_COUNTED_ADDRESSES: usize = 16_384;

/// Most enrollment connections served at once, before any authentication: beyond them a new
/// connection is closed at once.
const MAX_IN_FLIGHT: usize = 256;

/// What attempts are counted under: the address, or for IPv6 its /64 (one host commonly holds a
/// whole /64, and would otherwise get a fresh count per address).
fn counted_as(ip: IpAddr) -> IpAddr {
    match ip.to_canonical() {
        IpAddr::V6(v6) => IpAddr::V6((u128::from(v6) & !u128::from(u64::MAX)).into()),
        v4 => v4,
    }
}

impl Attempts {
    fn admit(&mut self, ip: IpAddr, limit: u32, now: Instant) -> Admit {
        if self
            .window
            .is_none_or(|start| now.duration_since(start) >= Duration::from_secs(60))
        {
            self.window = Some(now);
            self.by_address.clear();
        }
        let key = counted_as(ip);
        if self.by_address.len() >= MAX_COUNTED_ADDRESSES && !self.by_address.contains_key(&key) {
            return Admit::Drop;
        }
        let count = self.by_address.entry(key).or_default();
        *count = count.saturating_add(1);
        match *count {
            n if n <= limit => Admit::Serve,
            n if n <= limit.saturating_mul(2) => Admit::Refuse,
            _ => Admit::Drop,
        }
    }
}

/// A refused enrollment: the message for the agent, and the token it named when it was one of
/// ours (the refusal is then audited).
#[derive(Debug)]
struct Refusal {
    reason: String,
    token_id: Option<String>,
}

impl Refusal {
    fn new(reason: impl Into<String>) -> Self {
        Self {
            reason: reason.into(),
            token_id: None,
        }
    }

    fn of_token(token_id: &str, reason: impl Into<String>) -> Self {
        Self {
            reason: reason.into(),
            token_id: Some(token_id.to_owned()),
        }
    }
}

/// What the API tells about enrollment: the CA's pin and where hosts reach the controller.
#[derive(Debug, Clone)]
pub struct EnrollSettings {
    pub config: EnrollConfig,
    pub pin: String,
    /// `host:port` of the gateway, as agents dial it.
    pub agent_address: String,
    /// The base URL the install script is fetched from.
    pub api_url: String,
}

impl EnrollSettings {
    /// The settings in force with the addresses actually bound. A wildcard listening address
    /// names no host: the operator sets `agent_address` / `api_url`, else the install command
    /// carries a placeholder to replace.
    pub fn new(
        config: &crate::Config,
        enroll: &EnrollConfig,
        pin: String,
        agent_addr: SocketAddr,
        http_addr: SocketAddr,
    ) -> Self {
        let name = |addr: SocketAddr| {
            if addr.ip().is_unspecified() {
                format!("CONTROLLER_HOST:{}", addr.port())
            } else {
                addr.to_string()
            }
        };
        let scheme = if config.api.tls.is_some() {
            "https"
        } else {
            "http"
        };
        Self {
            config: enroll.clone(),
            pin,
            agent_address: enroll
                .agent_address
                .clone()
                .unwrap_or_else(|| name(agent_addr)),
            api_url: enroll
                .api_url
                .clone()
                .map(|url| url.trim_end_matches('/').to_owned())
                .unwrap_or_else(|| format!("{scheme}://{}", name(http_addr))),
        }
    }
}

/// The enrollment service.
pub struct Enroller {
    shared: Arc<Shared>,
    ca: Arc<ControllerCa>,
    config: EnrollConfig,
    tls: RwLock<Arc<rustls::ServerConfig>>,
    attempts: Mutex<Attempts>,
    in_flight: Arc<tokio::sync::Semaphore>,
    /// Keys whose enrollment is under way: one at a time per key, so that the same key
    /// enrolling twice at once cannot spend two uses.
    keys_in_flight: Mutex<HashSet<String>>,
}

/// A key's enrollment under way; dropped, the key may enroll again.
struct KeyInFlight<'a> {
    keys: &'a Mutex<HashSet<String>>,
    key: String,
}

impl<'a> KeyInFlight<'a> {
    fn take(keys: &'a Mutex<HashSet<String>>, key: &str) -> Option<Self> {
        keys.lock().unwrap().insert(key.to_owned()).then(|| Self {
            keys,
            key: key.to_owned(),
        })
    }
}

impl Drop for KeyInFlight<'_> {
    fn drop(&mut self) {
        self.keys.lock().unwrap().remove(&self.key);
    }
}

impl std::fmt::Debug for Enroller {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Enroller")
            .field("ca", &self.ca)
            .finish_non_exhaustive()
    }
}

/// How long a client has for its TLS handshake, and then for its request.
const CLIENT_DEADLINE: Duration = Duration::from_secs(10);

impl Enroller {
    pub fn new(
        shared: Arc<Shared>,
        config: EnrollConfig,
        ca: Arc<ControllerCa>,
    ) -> anyhow::Result<Self> {
        let tls = Self::load_tls(&shared.config)?;
        Ok(Self {
            shared,
            ca,
            config,
            tls: RwLock::new(tls),
            attempts: Mutex::default(),
            in_flight: Arc::new(tokio::sync::Semaphore::new(MAX_IN_FLIGHT)),
            keys_in_flight: Mutex::default(),
        })
    }

    fn load_tls(config: &crate::Config) -> anyhow::Result<Arc<rustls::ServerConfig>> {
        Ok(Arc::new(fleetrun_net::enroll_server_tls(&config.tls)?))
    }

    /// Reads the gateway's certificate again (SIGHUP): enrollments after take it.
    pub fn reload_tls(&self) -> anyhow::Result<()> {
        let tls = Self::load_tls(&self.shared.config)?;
        *self.tls.write().unwrap() = tls;
        Ok(())
    }

    /// Serves enrollments on `listener` until `shutdown`.
    pub async fn serve(
        self: Arc<Self>,
        listener: tokio::net::TcpListener,
        shutdown: CancellationToken,
    ) {
        loop {
            let (stream, peer) = tokio::select! {
                accepted = listener.accept() => match accepted {
                    Ok(accepted) => accepted,
                    Err(e) => {
                        tracing::warn!("enrollment listener: {e}");
                        tokio::time::sleep(Duration::from_millis(100)).await;
                        continue;
                    }
                },
                () = shutdown.cancelled() => break,
            };
            let admit = self.attempts.lock().unwrap().admit(
                peer.ip(),
                self.config.attempts_per_minute,
                Instant::now(),
            );
            if admit == Admit::Drop {
                continue;
            }
            let Ok(permit) = self.in_flight.clone().try_acquire_owned() else {
                tracing::warn!(%peer, "enrollment connection closed: {MAX_IN_FLIGHT} are served already");
                continue;
            };
            let enroller = self.clone();
            tokio::spawn(async move {
                enroller.serve_one(stream, peer, admit).await;
                drop(permit);
            });
        }
    }

    async fn serve_one(&self, stream: tokio::net::TcpStream, peer: SocketAddr, admit: Admit) {
        let acceptor = tokio_rustls::TlsAcceptor::from(self.tls.read().unwrap().clone());
        // One deadline for the handshake and the request together.
        let deadline = tokio::time::Instant::now() + CLIENT_DEADLINE;
        let mut tls = match tokio::time::timeout_at(deadline, acceptor.accept(stream)).await {
            Ok(Ok(tls)) => tls,
            Ok(Err(e)) => {
                tracing::info!(%peer, "enrollment handshake failed: {e}");
                return;
            }
            Err(_) => return,
        };
        let request = tokio::time::timeout_at(deadline, read_request(&mut tls)).await;
        let reply = match (admit, request) {
            (_, Err(_)) => Err(Refusal::new(format!(
                "no enrollment request within {} s of connecting",
                CLIENT_DEADLINE.as_secs()
            ))),
            (Admit::Serve, Ok(Ok(request))) => self.enroll(request, peer.ip()).await,
            (Admit::Serve, Ok(Err(reason))) => Err(Refusal::new(reason)),
            (_, Ok(_)) => Err(Refusal::new(format!(
                "too many enrollment attempts from {}: at most {} a minute; wait a minute and \
                 try again",
                peer.ip(),
                self.config.attempts_per_minute
            ))),
        };
        let reply = match reply {
            Ok(enrolled) => EnrollReply::Enrolled(enrolled),
            Err(refusal) => {
                tracing::warn!(
                    %peer,
                    token_id = refusal.token_id.as_deref(),
                    "enrollment refused: {}",
                    refusal.reason.escape_debug()
                );
                if let Some(token_id) = &refusal.token_id {
                    self.audit(peer.ip(), token_id, "{}".into(), 1, refusal.reason.clone())
                        .await;
                }
                EnrollReply::Refused {
                    reason: refusal.reason,
                }
            }
        };
        if let Ok(frame) = encode_frame(&reply) {
            let _ = tokio::time::timeout(CLIENT_DEADLINE, async {
                tls.write_all(&frame).await?;
                tls.shutdown().await
            })
            .await;
        }
    }

    async fn audit(
        &self,
        peer: IpAddr,
        token_id: &str,
        change: String,
        code: i64,
        outcome: String,
    ) {
        self.shared
            .audit
            .append(fleetrun_store::NewAuditEntry {
                at: now_ms(),
                app_code: "enroll".into(),
                operator: format!("token {token_id}"),
                source: peer.to_string(),
                request_id: uuid::Uuid::new_v4().simple().to_string(),
                api: "enroll_agent".into(),
                change,
                outcome_code: code,
                outcome,
            })
            .await;
    }

    /// Checks the token and the request, places and pins the host, and issues the certificate.
    async fn enroll(&self, request: EnrollRequest, observed: IpAddr) -> Result<Enrolled, Refusal> {
        let (token_id, presented) = token::parse(request.token.trim()).map_err(Refusal::new)?;
        let store = &self.shared.store;
        let internal = |e: fleetrun_store::StoreError| {
            tracing::error!("enrollment: {e}");
            Refusal::new("the controller could not record the enrollment: try again later")
        };
        let unknown = || {
            Refusal::new(
                "the join token is not known to this controller: check that it was copied whole \
                 and that --controller names the controller that made it",
            )
        };
        let token = store
            .join_token(&token_id)
            .await
            .map_err(internal)?
            .ok_or_else(unknown)?;
        if !token::matches(&token.token_sha256, &presented) {
            return Err(unknown());
        }
        let now = now_ms();
        // Used up is decided below: the same key enrolling again with its token spends nothing.
        if let Some(reason) = revoked_or_expired(&token, now) {
            return Err(Refusal::of_token(&token_id, reason));
        }
        let key = ca::requested_key(&request.csr).map_err(|e| Refusal::of_token(&token_id, e))?;
        let agent_id = key.agent_id();
        let _in_flight = KeyInFlight::take(&self.keys_in_flight, &key.sha256).ok_or_else(|| {
            Refusal::of_token(
                &token_id,
                "another enrollment with this host's key is under way: wait for it to finish",
            )
        })?;
        if self.shared.agents.is_revoked(&agent_id) {
            return Err(Refusal::of_token(
                &token_id,
                format!(
                    "this host's key belongs to agent {agent_id}, which an operator revoked: ask \
                     an operator whether to lift the revocation (fleetrun agents unrevoke \
                     {agent_id})"
                ),
            ));
        }
        // A revoked host must not come back under a new key with the token it came in by: while
        // an agent that enrolled with a token is revoked, the token enrolls no new key.
        if let Some(revoked) = store
            .agents_enrolled_with(&token_id)
            .await
            .map_err(internal)?
            .into_iter()
            .find(|id| *id != agent_id && self.shared.agents.is_revoked(id))
        {
            return Err(Refusal::of_token(
                &token_id,
                format!(
                    "the join token {token_id} enrolled agent {revoked}, which an operator \
                     revoked: the token enrolls no host while that revocation stands; ask an \
                     operator for a new token"
                ),
            ));
        }
        let trusted = self
            .shared
            .config
            .agents
            .trust_reported_ip_in
            .contains(&token.bk_cloud_id);
        let ips = addresses(observed, &request.ips, trusted)
            .map_err(|e| Refusal::of_token(&token_id, e))?;
        if request.hostname.len() > 255 {
            return Err(Refusal::of_token(
                &token_id,
                "the hostname is longer than 255 bytes",
            ));
        }
        let earlier = store
            .enrollment_by_key(&key.sha256)
            .await
            .map_err(internal)?;
        // The same key enrolling again with the same token is the same enrollment: it does not
        // spend another use.
        let again = earlier.as_ref().is_some_and(|e| e.token_id == token_id);
        if !again
            && store
                .spend_join_token(&token_id, now)
                .await
                .map_err(internal)?
                .is_none()
        {
            let token = store
                .join_token(&token_id)
                .await
                .map_err(internal)?
                .ok_or_else(unknown)?;
            let reason = dead(&token, now_ms()).unwrap_or_else(|| used_up(&token));
            return Err(Refusal::of_token(&token_id, reason));
        }
        // A use spent is given back if the enrollment fails after it.
        let outcome: Result<Enrolled, Refusal> = async {
            let modules: Vec<i64> = token.bk_module_id.into_iter().collect();
            let place = Change::PlaceAgent {
                agent_id: agent_id.clone(),
                bk_cloud_id: token.bk_cloud_id,
                ips: ips.clone(),
                bk_biz_id: token.bk_biz_id,
                modules: modules.clone(),
            };
            let inventory = self.shared.inventory.clone();
            let agents = self.shared.agents.clone();
            let operator = format!("enroll token {token_id}");
            // Run to the end whatever happens to the connection: what the store committed is what
            // is in force.
            let placed = tokio::spawn(async move {
                inventory
                    .change(vec![place], None, &operator, |id| agents.get(id).is_some())
                    .await
            })
            .await
            .map_err(|e| {
                tracing::error!("enrollment placement: {e}");
                Refusal::of_token(
                    &token_id,
                    "the controller could not place the host: try again",
                )
            })?;
            if let Err(e) = placed {
                return Err(Refusal::of_token(
                    &token_id,
                    format!(
                        "the token places hosts in business {}{}, which the inventory refuses now \
                         ({e}): ask an operator for a token with a placement that exists",
                        token.bk_biz_id,
                        token
                            .bk_module_id
                            .map(|m| format!(" module {m}"))
                            .unwrap_or_default()
                    ),
                ));
            }
            let lifetime = Duration::from_secs(self.config.cert_lifetime_secs);
            let issued = self
                .ca
                .issue_agent(&key, &agent_id, lifetime)
                .map_err(|e| {
                    tracing::error!("enrollment: issuing a certificate: {e}");
                    Refusal::of_token(&token_id, "the controller could not sign the certificate")
                })?;
            let enrollment = Enrollment {
                key_sha256: key.sha256.clone(),
                agent_id: agent_id.clone(),
                token_id: token_id.clone(),
                bk_cloud_id: token.bk_cloud_id,
                ips: ips.iter().map(IpAddr::to_string).collect(),
                enrolled_at: earlier.as_ref().map_or(now, |e| e.enrolled_at),
                cert_not_after: issued.not_after_ms,
                renewed_at: None,
            };
            store
                .record_enrollment(&enrollment)
                .await
                .map_err(internal)?;
            let ca_pem = std::fs::read_to_string(&self.shared.config.tls.ca).map_err(|e| {
                tracing::error!(
                    "enrollment: reading {}: {e}",
                    self.shared.config.tls.ca.display()
                );
                Refusal::of_token(&token_id, "the controller could not read its CA bundle")
            })?;
            tracing::info!(
                agent_id,
                token_id,
                %observed,
                ips = ?enrollment.ips,
                again,
                "agent enrolled"
            );
            let change = serde_json::json!({
                "agent_id": agent_id,
                "token_id": token_id,
                "ips": enrollment.ips,
                "bk_cloud_id": token.bk_cloud_id,
                "bk_biz_id": token.bk_biz_id,
                "bk_module_id": token.bk_module_id,
                "hostname": request.hostname,
                "again": again,
            });
            self.audit(observed, &token_id, change.to_string(), 0, "ok".into())
                .await;
            Ok(Enrolled {
                agent_id,
                certificate_pem: issued.chain_pem,
                ca_pem,
                bk_cloud_id: token.bk_cloud_id,
                bk_biz_id: token.bk_biz_id,
                bk_module_id: token.bk_module_id,
                not_after_ms: issued.not_after_ms,
                server_name: self.config.server_name.clone(),
            })
        }
        .await;
        if outcome.is_err()
            && !again
            && let Err(e) = store.refund_join_token(&token_id).await
        {
            tracing::error!(
                token_id,
                "enrollment failed, and its use could not be given back: {e}"
            );
        }
        outcome
    }
}

/// Why a token can no longer be used at `now`.
fn dead(token: &JoinToken, now: i64) -> Option<String> {
    if let Some(reason) = revoked_or_expired(token, now) {
        return Some(reason);
    }
    (token.uses >= token.max_uses).then(|| used_up(token))
}

/// Why a token can no longer be used at `now`, used up or not.
fn revoked_or_expired(token: &JoinToken, now: i64) -> Option<String> {
    if let Some(at) = token.revoked_at {
        return Some(format!(
            "the join token {} was revoked by {} at {}: ask an operator for a new one (fleetrun \
             tokens create)",
            token.token_id,
            token.revoked_by.as_deref().unwrap_or("an operator"),
            rfc3339(at)
        ));
    }
    if token.expires_at <= now {
        return Some(format!(
            "the join token {} expired at {}: ask an operator for a new one (fleetrun tokens \
             create --ttl ...)",
            token.token_id,
            rfc3339(token.expires_at)
        ));
    }
    None
}

fn used_up(token: &JoinToken) -> String {
    format!(
        "the join token {} is used up ({} of {} uses): ask an operator for a new one (fleetrun \
         tokens create --uses N)",
        token.token_id, token.uses, token.max_uses
    )
}

/// Unix milliseconds as RFC 3339, for messages.
pub fn rfc3339(ms: i64) -> String {
    match time::OffsetDateTime::from_unix_timestamp_nanos(i128::from(ms) * 1_000_000) {
        Ok(t) => format!(
            "{:04}-{:02}-{:02}T{:02}:{:02}:{:02}Z",
            t.year(),
            u8::from(t.month()),
            t.day(),
            t.hour(),
            t.minute(),
            t.second()
        ),
        Err(_) => ms.to_string(),
    }
}

/// The addresses the enrollment pins the host to: the one the controller saw, then, only in a
/// cloud area whose reports the operator trusts (`[agents] trust_reported_ip_in`), the ones the
/// agent reports. A pin outranks every other claim on an address, so pinning a reported address
/// elsewhere would let a token holder take over another host's address.
fn addresses(observed: IpAddr, reported: &[IpAddr], trusted: bool) -> Result<Vec<IpAddr>, String> {
    if reported.len() > MAX_ENROLL_IPS {
        return Err(format!(
            "the agent reports {} addresses, more than {MAX_ENROLL_IPS}",
            reported.len()
        ));
    }
    let mut ips = vec![observed.to_canonical()];
    for ip in reported.iter().map(IpAddr::to_canonical) {
        if ip.is_unspecified() || ip.is_multicast() {
            return Err(format!(
                "the agent reports {ip}, which is no host's address"
            ));
        }
        if trusted && !ips.contains(&ip) {
            ips.push(ip);
        }
    }
    Ok(ips)
}

/// Reads one length-prefixed request, refusing a length beyond [`MAX_ENROLL_FRAME`] before
/// reading its body.
async fn read_request(
    stream: &mut (impl tokio::io::AsyncRead + Unpin),
) -> Result<EnrollRequest, String> {
    let mut header = [0u8; 4];
    stream
        .read_exact(&mut header)
        .await
        .map_err(|e| format!("the enrollment request could not be read: {e}"))?;
    let len = u32::from_be_bytes(header) as usize;
    if len > MAX_ENROLL_FRAME {
        return Err(format!(
            "the enrollment request is {len} bytes, more than {MAX_ENROLL_FRAME}"
        ));
    }
    // Grown as bytes arrive: a header alone reserves nothing.
    let mut body = Vec::new();
    stream
        .take(len as u64)
        .read_to_end(&mut body)
        .await
        .map_err(|e| format!("the enrollment request could not be read: {e}"))?;
    if body.len() != len {
        return Err("the enrollment request ended early".into());
    }
    let mut decoder = FrameDecoder::new();
    decoder.extend(&header);
    decoder.extend(&body);
    match decoder.decode::<EnrollRequest>() {
        Ok(Some(request)) => Ok(request),
        Ok(None) => Err("the enrollment request is incomplete".into()),
        Err(e) => Err(format!(
            "the enrollment request is malformed ({e}): use a fleetrun-agent of this release"
        )),
    }
}

/// The install command `tokens create` prints: fetches the controller's install script over
/// HTTPS and enrolls with the token. The token never goes on a command line (where any local
/// user reads it in `/proc`): `export` is a shell builtin, and the script hands the token to
/// `fleetrun-agent enroll` in `FLEETRUN_JOIN_TOKEN` too. `None` when the API is not HTTPS: a
/// script piped to `sudo sh` is fetched over nothing else.
pub fn install_command(
    api_url: &str,
    agent_address: &str,
    token: &str,
    pin: &str,
) -> Option<String> {
    api_url.starts_with("https://").then(|| {
        format!(
            "export FLEETRUN_JOIN_TOKEN='{token}'\ncurl --proto '=https' --tlsv1.2 -fsSL \
             {api_url}/install.sh | sudo --preserve-env=FLEETRUN_JOIN_TOKEN sh -s -- \
             --controller {agent_address} --ca-pin {pin}"
        )
    })
}

/// The enroll command `tokens create` prints, for a host that has `fleetrun-agent`: the token
/// goes in the environment, not on the command line.
pub fn enroll_command(agent_address: &str, token: &str, pin: &str) -> String {
    format!(
        "export FLEETRUN_JOIN_TOKEN='{token}'\nsudo --preserve-env=FLEETRUN_JOIN_TOKEN \
         fleetrun-agent enroll --controller {agent_address} --ca-pin {pin}"
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn attempts_are_limited_per_address_and_a_flood_is_dropped() {
        let mut attempts = Attempts::default();
        let start = Instant::now();
        let a: IpAddr = "10.0.0.1".parse().unwrap();
        let b: IpAddr = "10.0.0.2".parse().unwrap();
        let verdicts: Vec<Admit> = (0..7).map(|_| attempts.admit(a, 3, start)).collect();
        assert_eq!(
            verdicts,
            [
                Admit::Serve,
                Admit::Serve,
                Admit::Serve,
                Admit::Refuse,
                Admit::Refuse,
                Admit::Refuse,
                Admit::Drop
            ]
        );
        assert_eq!(attempts.admit(b, 3, start), Admit::Serve);
        // The v4-mapped form is the same address.
        let mapped: IpAddr = "::ffff:10.0.0.1".parse().unwrap();
        assert_eq!(attempts.admit(mapped, 3, start), Admit::Drop);
        assert_eq!(
            attempts.admit(a, 3, start + Duration::from_secs(60)),
            Admit::Serve
        );
    }

    #[test]
    fn an_ipv6_slash_64_counts_as_one_address_and_the_count_is_bounded() {
        let mut attempts = Attempts::default();
        let start = Instant::now();
        let v6 = |s: &str| s.parse::<IpAddr>().unwrap();
        assert_eq!(attempts.admit(v6("2001:db8::1"), 1, start), Admit::Serve);
        assert_eq!(attempts.admit(v6("2001:db8::2"), 1, start), Admit::Refuse);
        assert_eq!(
            attempts.admit(v6("2001:db8:0:1::1"), 1, start),
            Admit::Serve
        );
        let mut attempts = Attempts::default();
        for n in 0..MAX_COUNTED_ADDRESSES as u32 {
            let ip = IpAddr::V4(n.into());
            assert_eq!(attempts.admit(ip, 5, start), Admit::Serve);
        }
        let newcomer = IpAddr::V4(u32::MAX.into());
        assert_eq!(attempts.admit(newcomer, 5, start), Admit::Drop);
        assert_eq!(attempts.admit(IpAddr::V4(7.into()), 5, start), Admit::Serve);
        assert_eq!(
            attempts.admit(newcomer, 5, start + Duration::from_secs(60)),
            Admit::Serve
        );
    }

    #[test]
    fn the_observed_address_comes_first_and_nonsense_is_refused() {
        let ip = |s: &str| s.parse::<IpAddr>().unwrap();
        assert_eq!(
            addresses(ip("192.0.2.1"), &[ip("10.0.0.5"), ip("192.0.2.1")], true).unwrap(),
            [ip("192.0.2.1"), ip("10.0.0.5")]
        );
        assert!(addresses(ip("192.0.2.1"), &[ip("0.0.0.0")], true).is_err());
        assert!(addresses(ip("192.0.2.1"), &[ip("224.0.0.1")], false).is_err());
        let many = vec![ip("10.0.0.1"); MAX_ENROLL_IPS + 1];
        assert!(
            addresses(ip("192.0.2.1"), &many, false)
                .unwrap_err()
                .contains("more than")
        );
    }

    #[test]
    fn printed_commands_keep_the_token_off_every_command_line() {
        let token = "frt-0123456789ab-0123456789abcdef0123456789abcdef";
        let pin = "sha256:00";
        let install = install_command("https://c.example:8443", "c.example:7443", token, pin)
            .expect("https API");
        let enroll = enroll_command("c.example:7443", token, pin);
        for command in [&install, &enroll] {
            let (export, rest) = command.split_once('\n').expect("two lines");
            assert_eq!(export, format!("export FLEETRUN_JOIN_TOKEN='{token}'"));
            assert!(!rest.contains(token), "{rest}");
            assert!(
                rest.contains("--preserve-env=FLEETRUN_JOIN_TOKEN"),
                "{rest}"
            );
            assert!(
                rest.contains("--controller c.example:7443 --ca-pin sha256:00"),
                "{rest}"
            );
        }
        assert!(install.contains(
            "curl --proto '=https' --tlsv1.2 -fsSL https://c.example:8443/install.sh | sudo"
        ));
        assert_eq!(
            install_command("http://c.example:8080", "c:1", token, pin),
            None
        );
    }

    #[test]
    fn reported_addresses_are_pinned_only_where_reports_are_trusted() {
        let ip = |s: &str| s.parse::<IpAddr>().unwrap();
        assert_eq!(
            addresses(ip("192.0.2.1"), &[ip("10.0.0.5"), ip("10.0.0.6")], false).unwrap(),
            [ip("192.0.2.1")]
        );
    }
}
