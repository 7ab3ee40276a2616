//! Renewal of an enrolled agent's certificate over its authenticated connection (protocol
//! version 3): the same identity, the same key, a new end.
//!
//! Refused: a revoked agent; an agent that asked less than [`MIN_INTERVAL`] ago (on any of its
//! connections: signing costs, and an agent asks once per certificate); a request that asks for
//! more than the controller gives ([`super::csr`]); a request over another key than the one the
//! connection's certificate carries, or than the one the agent enrolled with; an agent that did
//! not enroll. An agent of protocol version 2 or older sends no renewal at all: its certificate
//! runs out and it enrolls again with a new token, which the controller says in its log the first time
//! (in the process) such an enrolled agent connects.

use std::{
    collections::{HashMap, HashSet},
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
    /// The agents of protocol version 2 or older looked at already: each is warned about (and
    /// its enrollment looked up) once per process, not on every connection. Only agents that
    /// authenticated are added, so the fleet bounds it.
    looked_at: Arc<Mutex<HashSet<String>>>,
}

impl Renewal {
    pub fn new(ca: Arc<ControllerCa>, lifetime: Duration) -> Self {
        Self {
            ca,
            lifetime,
            asked: Arc::default(),
            looked_at: Arc::default(),
        }
    }

    /// Counts a request of `agent_id` now; whether it comes soon after its last one.
    fn too_soon(&self, agent_id: &str) -> Option<Duration> {
        self.too_soon_at(agent_id, Instant::now())
    }

    /// [`Self::too_soon`] at `now`.
    fn too_soon_at(&self, agent_id: &str, now: Instant) -> Option<Duration> {
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

    /// Whether this is the first look at `agent_id` (counting it as looked at).
    fn first_look(&self, agent_id: &str) -> bool {
        self.looked_at.lock().unwrap().insert(agent_id.to_owned())
    }

    /// Says in the log, once per process, for an enrolled agent that connected with protocol `version` (below 3,
    /// which has no renewal), that its certificate will run out and what to do.
    pub async fn warn_cannot_renew(
        &self,
        store: &Store,
        agent_id: &str,
        version: u32,
        connection: &quinn::Connection,
    ) {
        if self.looked_at.lock().unwrap().contains(agent_id) {
            return;
        }
        match store.enrollment_of_agent(agent_id).await {
            Ok(Some(_)) => {}
            Ok(None) => {
                self.first_look(agent_id);
                return;
            }
            // Looked at again on its next connection.
            Err(_) => return,
        }
        if !self.first_look(agent_id) {
            return;
        }
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

#[cfg(test)]
mod tests {
    use super::*;

    fn renewal() -> (Renewal, tempfile::TempDir) {
        let dir = tempfile::tempdir().unwrap();
        let files = super::super::CaFiles {
            cert: dir.path().join("ca.pem"),
            key: dir.path().join("ca.key.pem"),
        };
        let tls = fleetrun_net::TlsFiles {
            ca: dir.path().join("tls-ca.pem"),
            cert: dir.path().join("controller.pem"),
            key: dir.path().join("controller.key.pem"),
        };
        ca::init(&files, &ca::CaSource::New, &tls, &[]).unwrap();
        let ca = ControllerCa::load(&files).unwrap();
        (Renewal::new(Arc::new(ca), Duration::from_secs(3600)), dir)
    }

    #[test]
    fn an_agent_renews_at_most_every_min_interval_counted_from_its_first_request() {
        let (renewal, _dir) = renewal();
        let start = Instant::now();
        let at = |secs: f64| start + Duration::from_secs_f64(secs);
        assert_eq!(renewal.too_soon_at("a", at(0.0)), None);
        assert_eq!(
            renewal.too_soon_at("a", at(1.0)),
            Some(Duration::from_secs(1))
        );
        // Asking again and again does not move the start: 4.9 s after the first is too soon,
        // 5 s after it is not.
        assert_eq!(
            renewal.too_soon_at("a", at(4.9)),
            Some(Duration::from_secs_f64(4.9))
        );
        // Another agent counts on its own.
        assert_eq!(renewal.too_soon_at("b", at(4.9)), None);
        assert_eq!(renewal.too_soon_at("a", at(5.0)), None);
        assert!(renewal.too_soon_at("a", at(9.9)).is_some());
        assert_eq!(renewal.too_soon_at("a", at(10.0)), None);
    }

    #[test]
    fn beyond_remembered_agents_only_the_stale_entries_go() {
        let (renewal, _dir) = renewal();
        let start = Instant::now();
        // Half the agents asked long ago, half just now.
        for n in 0..REMEMBERED / 2 {
            assert_eq!(renewal.too_soon_at(&format!("old-{n}"), start), None);
        }
        let recent = start + MIN_INTERVAL * 2;
        for n in 0..REMEMBERED / 2 {
            assert_eq!(renewal.too_soon_at(&format!("new-{n}"), recent), None);
        }
        assert_eq!(renewal.asked.lock().unwrap().len(), REMEMBERED);
        // The next request evicts the stale half; the recent ones are still counted.
        let next = recent + Duration::from_secs(1);
        assert_eq!(renewal.too_soon_at("another", next), None);
        assert_eq!(renewal.asked.lock().unwrap().len(), REMEMBERED / 2 + 1);
        assert_eq!(
            renewal.too_soon_at("new-0", next),
            Some(Duration::from_secs(1))
        );
        assert_eq!(renewal.too_soon_at("old-0", next), None);
    }

    #[test]
    fn an_agent_is_looked_at_once_per_process() {
        let (renewal, _dir) = renewal();
        assert!(renewal.first_look("host-a"));
        assert!(!renewal.first_look("host-a"));
        assert!(renewal.first_look("host-b"));
        assert!(renewal.looked_at.lock().unwrap().contains("host-a"));
    }
}
