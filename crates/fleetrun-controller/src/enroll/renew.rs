//! Renewal of an enrolled agent's certificate over its authenticated connection (protocol
//! version 3): the same identity, the same key, a new end.
//!
//! Refused: a revoked agent; an agent that asked less than [`MIN_INTERVAL`] ago (on any of its
//! connections: signing costs, and an agent asks once per certificate); a request that asks for
//! more than the controller gives ([`super::csr`]); a request over another key than the one the
//! connection's certificate carries, or than the one the agent enrolled with; an agent that did
//! not enroll. An agent of protocol version 2 or older sends no renewal at all: its certificate
//! runs out and it enrolls again with a new token, which the controller says in its log when such
//! an enrolled agent connects.

use std::{
    collections::HashMap,
    sync::{Arc, Mutex},
    time::Duration,
};

use fleetrun_proto::ControlDown;
use fleetrun_store::Store;
use rustls_pki_types::CertificateDer;
use tokio::time::Instant;

use super::{ControllerCa, ca};

/// The shortest time between two renewals of one agent.
pub const MIN_INTERVAL: Duration = Duration::from_secs(5);

/// Agents remembered for the rate: beyond it, the entries older than [`MIN_INTERVAL`] go.
const REMEMBERED: usize = 4096;

/// What the gateway needs to renew certificates.
#[derive(Debug, Clone)]
pub struct Renewal {
    pub ca: Arc<ControllerCa>,
    pub lifetime: Duration,
    /// When each agent last asked.
    asked: Arc<Mutex<HashMap<String, Instant>>>,
}

impl Renewal {
    pub fn new(ca: Arc<ControllerCa>, lifetime: Duration) -> Self {
        Self {
            ca,
            lifetime,
            asked: Arc::default(),
        }
    }

    /// Counts a request of `agent_id` now; whether it comes soon after its last one.
    fn too_soon(&self, agent_id: &str) -> Option<Duration> {
        let now = Instant::now();
        let mut asked = self.asked.lock().unwrap();
        if asked.len() >= REMEMBERED {
            asked.retain(|_, at| now.duration_since(*at) < MIN_INTERVAL);
        }
        match asked.insert(agent_id.to_owned(), now) {
            Some(last) if now.duration_since(last) < MIN_INTERVAL => {
                // The earlier request stays the one counted from: asking faster gains nothing.
                asked.insert(agent_id.to_owned(), last);
                Some(now.duration_since(last))
            }
            _ => None,
        }
    }

    /// Answers an agent's [`fleetrun_proto::ControlUp::Renew`]: a new certificate over the key
    /// it enrolled, or why not. `revoked` is whether the agent is revoked now; `connection` is
    /// the one the request came on, whose certificate's key the request must be over.
    pub async fn renew(
        &self,
        store: &Store,
        revoked: bool,
        agent_id: &str,
        csr: &[u8],
        connection: &quinn::Connection,
    ) -> ControlDown {
        let refuse = |reason: String| ControlDown::RenewRefused { reason };
        if revoked {
            return refuse(format!("agent {agent_id} is revoked by an operator"));
        }
        if let Some(since) = self.too_soon(agent_id) {
            return refuse(format!(
                "agent {agent_id} asked for a renewal {:.1} s ago: renewals come at most every \
                 {} s",
                since.as_secs_f64(),
                MIN_INTERVAL.as_secs()
            ));
        }
        let key = match ca::requested_key(csr) {
            Ok(key) => key,
            Err(reason) => return refuse(reason),
        };
        match presented_key_sha256(connection) {
            Some(presented) if presented == key.sha256 => {}
            Some(_) => {
                return refuse(format!(
                    "the renewal is over another key than the certificate agent {agent_id} \
                     connected with: a certificate renews over its own key; a new key enrolls \
                     with a new token"
                ));
            }
            None => return refuse("the connection's certificate could not be read".into()),
        }
        let enrollment = match store.enrollment_of_agent(agent_id).await {
            Ok(Some(enrollment)) => enrollment,
            Ok(None) => {
                return refuse(format!(
                    "agent {agent_id} did not enroll with a token: its certificate comes from \
                     another CA; renew it there, or enroll with `fleetrun-agent enroll`"
                ));
            }
            Err(e) => {
                tracing::error!(agent_id, "renewal: {e}");
                return refuse(
                    "the controller could not look up the enrollment; it retries".into(),
                );
            }
        };
        if enrollment.key_sha256 != key.sha256 {
            return refuse(format!(
                "the renewal is over a key agent {agent_id} did not enroll with: a new key \
                 enrolls with a new token"
            ));
        }
        let issued = match self.ca.issue_agent(&key, agent_id, self.lifetime) {
            Ok(issued) => issued,
            Err(e) => {
                tracing::error!(agent_id, "renewal: {e}");
                return refuse("the controller could not sign the certificate".into());
            }
        };
        if let Err(e) = store
            .record_renewal(agent_id, crate::now_ms(), issued.not_after_ms)
            .await
        {
            tracing::error!(agent_id, "renewal not recorded: {e}");
        }
        tracing::info!(
            agent_id,
            not_after = super::rfc3339(issued.not_after_ms),
            "agent certificate renewed"
        );
        ControlDown::Renewed {
            certificate_pem: issued.chain_pem,
            not_after_ms: issued.not_after_ms,
        }
    }

    /// Says in the log, for an enrolled agent that connected with protocol `version` (below 3,
    /// which has no renewal), that its certificate will run out and what to do.
    pub async fn warn_cannot_renew(
        &self,
        store: &Store,
        agent_id: &str,
        version: u32,
        connection: &quinn::Connection,
    ) {
        let Ok(Some(_)) = store.enrollment_of_agent(agent_id).await else {
            return;
        };
        let ends = presented_leaf(connection)
            .and_then(|leaf| {
                use x509_parser::prelude::FromDer as _;
                x509_parser::certificate::X509Certificate::from_der(&leaf)
                    .ok()
                    .map(|(_, cert)| cert.validity().not_after.timestamp())
            })
            .map_or_else(
                || "unknown".to_owned(),
                |secs| super::rfc3339(secs.saturating_mul(1000)),
            );
        tracing::warn!(
            agent_id,
            "enrolled agent speaks protocol version {version}, which cannot renew its \
             certificate: it ends at {ends}, after which the agent is refused until it enrolls \
             again with a new token; upgrade fleetrun-agent on the host before then"
        );
    }
}

/// The certificate the peer authenticated with.
fn presented_leaf(connection: &quinn::Connection) -> Option<CertificateDer<'static>> {
    connection
        .peer_identity()
        .and_then(|any| any.downcast::<Vec<CertificateDer<'static>>>().ok())
        .and_then(|certs| (*certs).into_iter().next())
}

/// The fingerprint (hex SHA-256 of the SubjectPublicKeyInfo) of the key the peer's certificate
/// is over.
fn presented_key_sha256(connection: &quinn::Connection) -> Option<String> {
    use x509_parser::prelude::FromDer as _;
    let leaf = presented_leaf(connection)?;
    let (_, cert) = x509_parser::certificate::X509Certificate::from_der(&leaf).ok()?;
    Some(ca::spki_sha256(cert.public_key().raw))
}
