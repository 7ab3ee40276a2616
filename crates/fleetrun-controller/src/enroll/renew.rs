//! Renewal of an enrolled agent's certificate over its authenticated connection (protocol
//! version 3): the same identity, the same key, a new end.

use std::{sync::Arc, time::Duration};

use fleetrun_proto::ControlDown;
use fleetrun_store::Store;

use super::{ControllerCa, ca};

/// What the gateway needs to renew certificates.
#[derive(Debug, Clone)]
pub struct Renewal {
    pub ca: Arc<ControllerCa>,
    pub lifetime: Duration,
}

impl Renewal {
    /// Answers an agent's [`fleetrun_proto::ControlUp::Renew`]: a new certificate over the key
    /// it enrolled, or why not. `revoked` is whether the agent is revoked now.
    pub async fn renew(
        &self,
        store: &Store,
        revoked: bool,
        agent_id: &str,
        csr: &[u8],
    ) -> ControlDown {
        let refuse = |reason: String| ControlDown::RenewRefused { reason };
        if revoked {
            return refuse(format!("agent {agent_id} is revoked by an operator"));
        }
        let key = match ca::requested_key(csr) {
            Ok(key) => key,
            Err(reason) => return refuse(reason),
        };
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
}
