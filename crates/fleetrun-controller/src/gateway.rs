//! The QUIC gateway: accepts agents, checks who they are, and keeps the live connections.
//!
//! **Architecture invariant:** an agent's identity comes only from its certificate. What it says
//! in its hello is compared with the certificate and a mismatch is refused.

use std::{
    collections::HashMap,
    net::IpAddr,
    sync::{Arc, RwLock},
    time::Duration,
};

use fleetrun_net::{FramedRecv, describe_connection_error, peer_agent_id, send_frame};
use fleetrun_proto::{
    ControlUp, Hello, HelloReply, MIN_PROTOCOL_VERSION, OsType, PROTOCOL_VERSION, close_code,
};
use fleetrun_store::{AgentRegistration, Store};
use tokio_util::sync::CancellationToken;

use crate::now_ms;

/// A connected agent.
#[derive(Debug, Clone)]
pub struct AgentLink {
    pub agent_id: String,
    pub connection: quinn::Connection,
}

/// The agents connected now, by host id.
#[derive(Debug, Clone, Default)]
pub struct Agents {
    links: Arc<RwLock<HashMap<i64, AgentLink>>>,
}

impl Agents {
    pub fn get(&self, bk_host_id: i64) -> Option<AgentLink> {
        self.links.read().unwrap().get(&bk_host_id).cloned()
    }

    pub fn count(&self) -> usize {
        self.links.read().unwrap().len()
    }

    fn insert(&self, bk_host_id: i64, link: AgentLink) -> Option<AgentLink> {
        self.links.write().unwrap().insert(bk_host_id, link)
    }

    /// Removes the link only if it is still this connection (a newer one may have replaced it).
    fn remove(&self, bk_host_id: i64, connection: &quinn::Connection) -> bool {
        let mut links = self.links.write().unwrap();
        match links.get(&bk_host_id) {
            Some(link) if link.connection.stable_id() == connection.stable_id() => {
                links.remove(&bk_host_id);
                true
            }
            _ => false,
        }
    }
}

#[derive(Debug, Clone)]
pub(crate) struct Gateway {
    pub agents: Agents,
    pub store: Store,
    pub heartbeat: Duration,
    pub inventory: Arc<crate::inventory::InventoryState>,
}

impl Gateway {
    pub(crate) async fn serve(self, endpoint: quinn::Endpoint, shutdown: CancellationToken) {
        loop {
            let incoming = tokio::select! {
                incoming = endpoint.accept() => incoming,
                () = shutdown.cancelled() => break,
            };
            let Some(incoming) = incoming else { break };
            let gateway = self.clone();
            tokio::spawn(async move {
                let remote = incoming.remote_address();
                match incoming.await {
                    Ok(connection) => gateway.serve_agent(connection).await,
                    // A bad certificate ends here: rustls has already sent the alert.
                    Err(e) => {
                        tracing::warn!(%remote, "agent handshake failed: {}", describe_connection_error(&e))
                    }
                }
            });
        }
        endpoint.close(close_code::SHUTDOWN.into(), b"controller shutting down");
    }

    async fn serve_agent(self, connection: quinn::Connection) {
        let remote = connection.remote_address();
        let agent_id = match peer_agent_id(&connection) {
            Ok(id) => id,
            Err(e) => {
                tracing::warn!(%remote, "refusing agent: {e}");
                connection.close(close_code::REFUSED.into(), e.to_string().as_bytes());
                return;
            }
        };
        let (mut send, recv) = match tokio::time::timeout(
            Duration::from_secs(10),
            connection.accept_bi(),
        )
        .await
        {
            Ok(Ok(streams)) => streams,
            Ok(Err(e)) => {
                tracing::warn!(%remote, agent_id, "agent left before its hello: {}", describe_connection_error(&e));
                return;
            }
            Err(_) => {
                connection.close(close_code::PROTOCOL.into(), b"no hello within 10 s");
                return;
            }
        };
        let mut recv = FramedRecv::new(recv);
        let hello: Hello = match tokio::time::timeout(Duration::from_secs(10), recv.recv()).await {
            Ok(Ok(Some(hello))) => hello,
            Ok(Ok(None)) => return,
            Ok(Err(e)) => {
                tracing::warn!(%remote, agent_id, "bad hello: {e}");
                connection.close(close_code::PROTOCOL.into(), b"bad hello");
                return;
            }
            Err(_) => {
                connection.close(close_code::PROTOCOL.into(), b"no hello within 10 s");
                return;
            }
        };
        let registration = match self.check_hello(&agent_id, &hello) {
            Ok(reg) => reg,
            Err(reason) => {
                tracing::warn!(%remote, agent_id, "refusing agent: {reason}");
                refuse(&mut send, &connection, reason).await;
                return;
            }
        };
        let host = match self.store.register_agent(&registration).await {
            Ok(host) => host,
            Err(e) => {
                tracing::error!(agent_id, "cannot register agent: {e}");
                refuse(
                    &mut send,
                    &connection,
                    "controller could not register the agent".into(),
                )
                .await;
                return;
            }
        };
        // The host may be new, or report new addresses: the merged inventory is stale.
        self.inventory.invalidate();
        let welcome = HelloReply::Welcome {
            bk_host_id: host.bk_host_id,
            heartbeat_interval_ms: self.heartbeat.as_millis() as u64,
        };
        if let Err(e) = send_frame(&mut send, &welcome).await {
            tracing::warn!(agent_id, "agent left during hello: {e}");
            return;
        }
        let link = AgentLink {
            agent_id: agent_id.clone(),
            connection: connection.clone(),
        };
        if let Some(old) = self.agents.insert(host.bk_host_id, link) {
            old.connection.close(
                close_code::REPLACED.into(),
                b"replaced by a newer connection",
            );
        }
        tracing::info!(agent_id, bk_host_id = host.bk_host_id, %remote, ip = host.ip, "agent online");

        let reason = self.watch(&mut recv, &connection).await;

        if self.agents.remove(host.bk_host_id, &connection) {
            if let Err(e) = self
                .store
                .set_offline(host.bk_host_id, registration.now, now_ms())
                .await
            {
                tracing::error!(agent_id, "cannot mark host offline: {e}");
            }
            tracing::info!(
                agent_id,
                bk_host_id = host.bk_host_id,
                "agent offline: {reason}"
            );
        }
    }

    /// Reads heartbeats until the connection ends; returns why it ended.
    async fn watch(&self, recv: &mut FramedRecv, connection: &quinn::Connection) -> String {
        // Heartbeats arrive every `heartbeat`; three missed mean the agent is stuck even if
        // QUIC still answers pings.
        let patience = self.heartbeat * 3;
        loop {
            match tokio::time::timeout(patience, recv.recv::<ControlUp>()).await {
                Ok(Ok(Some(ControlUp::Heartbeat { .. }))) => {}
                Ok(Ok(None)) => {
                    return "control stream finished".into();
                }
                Ok(Err(e)) => {
                    let reason = match e.connection_error() {
                        Some(conn) => describe_connection_error(conn),
                        None => e.to_string(),
                    };
                    connection.close(close_code::PROTOCOL.into(), b"control stream failed");
                    return reason;
                }
                Err(_) => {
                    connection.close(close_code::PROTOCOL.into(), b"missed heartbeats");
                    return format!("no heartbeat for {patience:?}");
                }
            }
        }
    }

    fn check_hello(&self, agent_id: &str, hello: &Hello) -> Result<AgentRegistration, String> {
        if hello.protocol_version < MIN_PROTOCOL_VERSION {
            return Err(format!(
                "agent speaks protocol version {}, this controller needs {MIN_PROTOCOL_VERSION} to {PROTOCOL_VERSION}; upgrade the agent",
                hello.protocol_version
            ));
        }
        if hello.agent_id != agent_id {
            return Err(format!(
                "agent says it is {:?} but its certificate is for {agent_id:?}",
                hello.agent_id
            ));
        }
        let ip = hello.ips.first().ok_or("agent reported no IP address")?;
        if ip.is_unspecified() {
            return Err(format!("agent reported the unspecified address {ip}"));
        }
        Ok(AgentRegistration {
            agent_id: agent_id.to_owned(),
            bk_cloud_id: hello.bk_cloud_id,
            ip: canonical_ip(*ip),
            hostname: hello.hostname.clone(),
            os_type: match hello.os_type {
                OsType::Linux => "linux",
                OsType::Windows => "windows",
                OsType::Other => "other",
            }
            .to_owned(),
            agent_version: hello.agent_version.clone(),
            now: now_ms(),
        })
    }
}

fn canonical_ip(ip: IpAddr) -> String {
    ip.to_canonical().to_string()
}

async fn refuse(send: &mut quinn::SendStream, connection: &quinn::Connection, reason: String) {
    let _ = send_frame(
        send,
        &HelloReply::Refused {
            reason: reason.clone(),
        },
    )
    .await;
    let _ = send.finish();
    // Give the refusal a moment to arrive before the close overtakes it.
    let _ = tokio::time::timeout(Duration::from_secs(2), send.stopped()).await;
    connection.close(close_code::REFUSED.into(), reason.as_bytes());
}
