//! The QUIC gateway: accepts agents, checks who they are, and keeps the live connections.
//!
//! **Architecture invariant:** an agent's identity comes only from its certificate. What it says
//! in its hello is compared with the certificate and a mismatch is refused.
//!
//! **Architecture invariant:** an agent's address is one it cannot make up. It is the address
//! it reports only when the inventory pins the agent to it (`ips`, `bk_cloud_id` on its `[[host]]`
//! entry); else, without a pin, when its certificate names it (an IP SAN); else when it is the
//! address the agent connects from; else when the operator trusts reported addresses in the
//! agent's cloud area (`[agents] trust_reported_ip_in`, for agents behind NAT). Anything else is
//! refused. An address already claimed by another host stays with the earlier claim: the newcomer
//! is registered but quarantined (flagged, logged, not a target by that address).

use std::{
    collections::{HashMap, HashSet},
    net::IpAddr,
    sync::{Arc, RwLock},
    time::Duration,
};

use fleetrun_inventory::PinnedAddress;
use fleetrun_net::{
    AgentCertificate, FramedRecv, describe_connection_error, peer_agent, send_frame,
};
use fleetrun_proto::{
    ControlDown, ControlUp, HeldTask, Hello, HelloReply, MIN_PROTOCOL_VERSION, OsType,
    PROTOCOL_VERSION, close_code,
};
use fleetrun_store::{AgentRegistration, HostRecord, Store};
use tokio_util::sync::CancellationToken;

use crate::{
    config::{AgentsConfig, UnlistedAgents},
    now_ms,
};

/// Most tasks an agent may report holding when it connects (far above any agent's
/// `max_concurrent_tasks` plus the results it keeps).
const MAX_HELD_TASKS: usize = 100_000;

/// The shortest time between two renewals on one connection.
const MIN_RENEWAL_INTERVAL: Duration = Duration::from_secs(5);

/// The close reason a revoked agent's connections get.
const REVOKED_REASON: &[u8] = b"this agent is revoked by an operator";

/// A connected agent.
#[derive(Debug, Clone)]
pub struct AgentLink {
    pub agent_id: String,
    pub connection: quinn::Connection,
    /// The protocol version spoken on the connection.
    pub protocol_version: u32,
}

impl AgentLink {
    /// Whether the agent keeps its tasks when the connection is lost and reattaches to them.
    pub fn owns_tasks(&self) -> bool {
        self.protocol_version >= 2
    }
}

/// The agents connected now, by host id, and the agents that may not connect.
#[derive(Debug, Clone, Default)]
pub struct Agents {
    links: Arc<RwLock<Links>>,
}

#[derive(Debug, Default)]
struct Links {
    by_host: HashMap<i64, AgentLink>,
    /// Kept under the same lock as the links, so that an agent revoked while it registers
    /// either never gets a link or has it closed by the revocation.
    revoked: HashSet<String>,
    /// Counts revocations changed here, so that a copy of the store's read meanwhile does not
    /// undo them ([`Agents::merge_revoked`]).
    generation: u64,
    /// The agents whose revocation changed here: at which generation it was stored
    /// ([`PENDING`] until then, and for good if the store refused it).
    changed: HashMap<String, u64>,
}

/// A revocation changed here and not yet stored: no copy of the store's undoes it.
const PENDING: u64 = u64::MAX;

/// The agent is revoked.
#[derive(Debug)]
struct Revoked;

impl Links {
    /// Refuses the agent and closes its connections; returns how many it closed.
    fn revoke(&mut self, agent_id: &str) -> usize {
        self.revoked.insert(agent_id.to_owned());
        let mut closed = 0;
        for link in self.by_host.values().filter(|l| l.agent_id == agent_id) {
            link.connection
                .close(close_code::REVOKED.into(), REVOKED_REASON);
            closed += 1;
        }
        closed
    }

    fn note_change(&mut self, agent_id: &str) {
        self.generation += 1;
        self.changed.insert(agent_id.to_owned(), self.generation);
    }
}

impl Agents {
    pub fn get(&self, bk_host_id: i64) -> Option<AgentLink> {
        self.links.read().unwrap().by_host.get(&bk_host_id).cloned()
    }

    pub fn count(&self) -> usize {
        self.links.read().unwrap().by_host.len()
    }

    pub fn is_revoked(&self, agent_id: &str) -> bool {
        self.links.read().unwrap().revoked.contains(agent_id)
    }

    /// Takes the stored revocations at start.
    pub fn set_revoked(&self, agent_ids: impl IntoIterator<Item = String>) {
        self.links.write().unwrap().revoked = agent_ids.into_iter().collect();
    }

    /// Refuses the agent from now on and closes its connections; returns how many it closed.
    /// Until [`Agents::revocation_stored`], no copy of the store's revocations lifts it.
    pub fn revoke(&self, agent_id: &str) -> usize {
        let mut links = self.links.write().unwrap();
        links.changed.insert(agent_id.to_owned(), PENDING);
        links.revoke(agent_id)
    }

    /// The agent's revocation is stored: a copy of the store's read from now on shows it.
    pub fn revocation_stored(&self, agent_id: &str) {
        self.links.write().unwrap().note_change(agent_id);
    }

    /// Lets the agent connect again (its revocation lifted in the store already).
    pub fn unrevoke(&self, agent_id: &str) {
        let mut links = self.links.write().unwrap();
        links.revoked.remove(agent_id);
        links.note_change(agent_id);
    }

    /// Where revocations changed here stand: given to [`Agents::merge_revoked`] with a copy of
    /// the store's revocations read after this.
    pub fn revocations_seen(&self) -> u64 {
        self.links.read().unwrap().generation
    }

    /// Makes the revocations here the store's `stored` (read after `seen`, from
    /// [`Agents::revocations_seen`]), except for the agents whose revocation changed here
    /// since, or is not stored yet: the copy may predate them. Closes the connections of the
    /// agents newly revoked; returns them, with how many connections each had.
    pub fn merge_revoked(&self, stored: &HashSet<String>, seen: u64) -> Vec<(String, usize)> {
        let mut links = self.links.write().unwrap();
        let kept: HashSet<String> = links
            .changed
            .iter()
            .filter(|(_, generation)| **generation > seen)
            .map(|(agent_id, _)| agent_id.clone())
            .collect();
        let lifted: Vec<String> = links
            .revoked
            .iter()
            .filter(|a| !stored.contains(*a) && !kept.contains(*a))
            .cloned()
            .collect();
        for agent_id in &lifted {
            links.revoked.remove(agent_id);
        }
        let mut added = Vec::new();
        for agent_id in stored {
            if !links.revoked.contains(agent_id) && !kept.contains(agent_id) {
                let closed = links.revoke(agent_id);
                added.push((agent_id.clone(), closed));
            }
        }
        // Changes the store showed when the copy was read need no keeping any more.
        links.changed.retain(|_, generation| *generation > seen);
        added
    }

    /// Makes `link` the host's live connection, unless its agent is revoked; returns the link it
    /// replaced.
    fn insert(&self, bk_host_id: i64, link: AgentLink) -> Result<Option<AgentLink>, Revoked> {
        let mut links = self.links.write().unwrap();
        if links.revoked.contains(&link.agent_id) {
            return Err(Revoked);
        }
        Ok(links.by_host.insert(bk_host_id, link))
    }

    /// Whether the host's live link is this connection.
    fn is_current(&self, bk_host_id: i64, connection: &quinn::Connection) -> bool {
        self.links
            .read()
            .unwrap()
            .by_host
            .get(&bk_host_id)
            .is_some_and(|link| link.connection.stable_id() == connection.stable_id())
    }

    /// Removes the link only if it is still this connection (a newer one may have replaced it).
    fn remove(&self, bk_host_id: i64, connection: &quinn::Connection) -> bool {
        let mut links = self.links.write().unwrap();
        match links.by_host.get(&bk_host_id) {
            Some(link) if link.connection.stable_id() == connection.stable_id() => {
                links.by_host.remove(&bk_host_id);
                true
            }
            _ => false,
        }
    }
}

/// A name for one connection of this controller, unique across its restarts: a record of it
/// is removed only by the end of that very connection.
fn connection_key(controller: &str, connection: &quinn::Connection) -> String {
    static RUN: std::sync::LazyLock<uuid::Uuid> = std::sync::LazyLock::new(uuid::Uuid::new_v4);
    format!("{controller}/{}/{}", *RUN, connection.stable_id())
}

/// Where an agent's address came from, most trusted first.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum AddressSource {
    /// The operator's inventory pins the agent to it.
    Inventory,
    /// The certificate names it.
    Certificate,
    /// The agent connects from it.
    Observed,
    /// The agent says so, in a cloud area where the operator trusts that.
    TrustedReport,
}

/// The address an agent is registered with: the one it reports, when something it cannot forge
/// backs it (see the module documentation).
pub(crate) fn agent_address(
    reported: Option<IpAddr>,
    pinned: Option<&PinnedAddress>,
    certificate: &[IpAddr],
    observed: IpAddr,
    bk_cloud_id: i64,
    trusted_clouds: &[i64],
) -> Result<(IpAddr, AddressSource), String> {
    let ip = reported
        .ok_or("agent reported no IP address")?
        .to_canonical();
    if ip.is_unspecified() {
        return Err(format!("agent reported the unspecified address {ip}"));
    }
    if let Some(pin) = pinned {
        if pin.bk_cloud_id == bk_cloud_id && pin.ips.contains(&ip) {
            return Ok((ip, AddressSource::Inventory));
        }
        let pinned: Vec<String> = pin.ips.iter().map(IpAddr::to_string).collect();
        return Err(format!(
            "agent reports address {ip} in cloud area {bk_cloud_id}, but the inventory pins it to {} in cloud area {}",
            pinned.join(", "),
            pin.bk_cloud_id
        ));
    }
    // Nothing an unpinned agent holds names its cloud area: the certificate and the connection back
    // an address, not the area it sits in. Believing the area would let an agent take its own address
    // in another area (and the jobs sent there by ip_list), so only the default area, or one the
    // operator trusts reports from, is accepted.
    if bk_cloud_id != 0 && !trusted_clouds.contains(&bk_cloud_id) {
        return Err(format!(
            "agent reports cloud area {bk_cloud_id}, which nothing backs for an agent the inventory \
             does not pin: pin it in the inventory (bk_cloud_id and ips on its [[host]] agent_id \
             entry), or trust reports from cloud area {bk_cloud_id} ([agents] trust_reported_ip_in)"
        ));
    }
    let observed = observed.to_canonical();
    if !certificate.is_empty() {
        if certificate.contains(&ip) {
            return Ok((ip, AddressSource::Certificate));
        }
        let named: Vec<String> = certificate.iter().map(IpAddr::to_string).collect();
        return Err(format!(
            "agent reports address {ip}, which its certificate does not name (it names {})",
            named.join(", ")
        ));
    }
    if ip == observed {
        return Ok((ip, AddressSource::Observed));
    }
    if trusted_clouds.contains(&bk_cloud_id) {
        return Ok((ip, AddressSource::TrustedReport));
    }
    Err(format!(
        "agent reports address {ip} but connects from {observed}, and its certificate names no \
         address: put the address in the agent's certificate (an IP SAN), or trust reported \
         addresses in cloud area {bk_cloud_id} ([agents] trust_reported_ip_in)"
    ))
}

#[derive(Debug, Clone)]
pub(crate) struct Gateway {
    pub agents: Agents,
    pub store: Store,
    pub heartbeat: Duration,
    pub inventory: Arc<crate::inventory::InventoryState>,
    pub policy: AgentsConfig,
    /// Takes the claims of reconnecting agents to the tasks they hold.
    pub engine: crate::engine::Engine,
    /// Renews enrolled agents' certificates (protocol version 3), when `[enroll]` is set.
    pub renewal: Option<crate::enroll::Renewal>,
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
        let certificate = match peer_agent(&connection) {
            Ok(certificate) => certificate,
            Err(e) => {
                tracing::warn!(%remote, "refusing agent: {e}");
                connection.close(close_code::REFUSED.into(), e.to_string().as_bytes());
                return;
            }
        };
        let agent_id = certificate.agent_id.clone();
        if self.agents.is_revoked(&agent_id) {
            tracing::warn!(%remote, agent_id, "refusing a revoked agent");
            connection.close(close_code::REVOKED.into(), REVOKED_REASON);
            return;
        }
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
        let registration = match self.check_hello(&certificate, remote.ip(), &hello).await {
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
        // The host may be new, or report new addresses: the merged inventory is stale, here and
        // on the other controllers sharing the database.
        self.inventory.invalidate();
        if let Err(e) = self.store.announce_host_news().await {
            tracing::warn!(
                agent_id,
                "cannot tell the other controllers of the host's registration: {e}"
            );
        }
        self.report_contested_address(&host).await;
        let protocol_version = hello.protocol_version.min(PROTOCOL_VERSION);
        let heartbeat_interval_ms = self.heartbeat.as_millis() as u64;
        let welcome = if protocol_version >= 6 {
            HelloReply::Joined {
                protocol_version,
                bk_host_id: host.bk_host_id,
                heartbeat_interval_ms,
                clustered: self.engine.membership().is_some(),
            }
        } else if protocol_version >= 2 {
            HelloReply::Negotiated {
                protocol_version,
                bk_host_id: host.bk_host_id,
                heartbeat_interval_ms,
            }
        } else {
            tracing::warn!(
                agent_id,
                agent_version = hello.agent_version,
                "agent speaks protocol version {}: its tasks end with their connection; upgrade \
                 it to protocol version {PROTOCOL_VERSION}",
                hello.protocol_version
            );
            HelloReply::Welcome {
                bk_host_id: host.bk_host_id,
                heartbeat_interval_ms,
            }
        };
        if let Err(e) = send_frame(&mut send, &welcome).await {
            tracing::warn!(agent_id, "agent left during hello: {e}");
            return;
        }
        if protocol_version < 3
            && let Some(renewal) = &self.renewal
        {
            renewal
                .warn_cannot_renew(&self.store, &agent_id, protocol_version, &connection)
                .await;
        }
        let held = if protocol_version >= 2 {
            match self.read_holding(&mut recv, &connection).await {
                Ok(held) => held,
                Err(reason) => {
                    tracing::warn!(%remote, agent_id, "{reason}");
                    return;
                }
            }
        } else {
            Vec::new()
        };
        if protocol_version >= 2 {
            // Before the link is in use: only tasks sent on an earlier connection can be missing.
            self.engine.not_held(host.bk_host_id, &agent_id, &held);
        }
        let link = AgentLink {
            agent_id: agent_id.clone(),
            connection: connection.clone(),
            protocol_version,
        };
        match self.agents.insert(host.bk_host_id, link) {
            Ok(Some(old)) => old.connection.close(
                close_code::REPLACED.into(),
                b"replaced by a newer connection",
            ),
            Ok(None) => {}
            Err(Revoked) => {
                tracing::warn!(agent_id, %remote, "agent revoked while it registered");
                connection.close(close_code::REVOKED.into(), REVOKED_REASON);
                let _ = self
                    .store
                    .set_offline(host.bk_host_id, registration.now, now_ms())
                    .await;
                return;
            }
        }
        // With controllers sharing the database: which one holds this agent, for the others
        // to hand it their jobs' tasks.
        let recorded = match self.engine.membership() {
            Some(membership) => {
                let key = connection_key(membership.name(), &connection);
                match self
                    .store
                    .record_agent_connection(host.bk_host_id, &agent_id, membership.name(), &key)
                    .await
                {
                    Ok(()) => Some(key),
                    Err(e) => {
                        tracing::error!(agent_id, "cannot record the agent's connection: {e}");
                        None
                    }
                }
            }
            None => None,
        };
        tracing::info!(agent_id, bk_host_id = host.bk_host_id, %remote, ip = host.ip, protocol_version, held_tasks = held.len(), "agent online");
        for task in &held {
            self.engine
                .claim(host.bk_host_id, &agent_id, &connection, task);
        }

        let reason = self
            .watch(
                &mut recv,
                &mut send,
                &connection,
                &agent_id,
                protocol_version,
            )
            .await;

        // The store hears first: until the link is gone from memory the host still counts as
        // connected, so an operator's change that forgets the host waits for both to agree
        // instead of finding it offline in memory and online in the store.
        if self.agents.is_current(host.bk_host_id, &connection)
            && let Err(e) = self
                .store
                .set_offline(host.bk_host_id, registration.now, now_ms())
                .await
        {
            tracing::error!(agent_id, "cannot mark host offline: {e}");
        }
        if let Some(key) = recorded
            && let Err(e) = self
                .store
                .forget_agent_connection(host.bk_host_id, &key)
                .await
        {
            tracing::warn!(agent_id, "cannot forget the agent's connection: {e}");
        }
        if self.agents.remove(host.bk_host_id, &connection) {
            tracing::info!(
                agent_id,
                bk_host_id = host.bk_host_id,
                "agent offline: {reason}"
            );
        }
    }

    /// Reads the tasks a version 2 agent holds, its first control message after the welcome.
    async fn read_holding(
        &self,
        recv: &mut FramedRecv,
        connection: &quinn::Connection,
    ) -> Result<Vec<HeldTask>, String> {
        match tokio::time::timeout(Duration::from_secs(10), recv.recv::<ControlUp>()).await {
            Ok(Ok(Some(ControlUp::Holding { tasks }))) if tasks.len() <= MAX_HELD_TASKS => {
                // A task held twice would be resumed twice: a report that repeats one is not an
                // agent's own.
                let mut seen = std::collections::HashSet::with_capacity(tasks.len());
                if let Some(repeated) = tasks.iter().find(|t| !seen.insert(t.task_id)) {
                    connection.close(close_code::PROTOCOL.into(), b"a task reported twice");
                    return Err(format!(
                        "refusing agent: it reports task {} held twice",
                        repeated.task_id
                    ));
                }
                Ok(tasks)
            }
            Ok(Ok(Some(ControlUp::Holding { tasks }))) => {
                connection.close(close_code::PROTOCOL.into(), b"too many tasks reported");
                Err(format!(
                    "refusing agent: it reports {} tasks held, more than {MAX_HELD_TASKS}",
                    tasks.len()
                ))
            }
            Ok(Ok(Some(ControlUp::Heartbeat { .. }))) => {
                connection.close(close_code::PROTOCOL.into(), b"expected the tasks held");
                Err("refusing agent: it sent a heartbeat before the tasks it holds".into())
            }
            Ok(Ok(Some(ControlUp::Renew { .. }))) => {
                connection.close(close_code::PROTOCOL.into(), b"expected the tasks held");
                Err(
                    "refusing agent: it asked for a renewal before reporting the tasks it holds"
                        .into(),
                )
            }
            Ok(Ok(None)) => Err("agent left before reporting the tasks it holds".into()),
            Ok(Err(e)) => {
                connection.close(close_code::PROTOCOL.into(), b"bad report of tasks held");
                Err(format!("bad report of the tasks held: {e}"))
            }
            Err(_) => {
                connection.close(
                    close_code::PROTOCOL.into(),
                    b"no report of tasks held within 10 s",
                );
                Err("no report of the tasks held within 10 s".into())
            }
        }
    }

    /// Reads heartbeats (and, from version 3, renewal requests) until the connection ends;
    /// returns why it ended.
    async fn watch(
        &self,
        recv: &mut FramedRecv,
        send: &mut quinn::SendStream,
        connection: &quinn::Connection,
        agent_id: &str,
        protocol_version: u32,
    ) -> String {
        // Heartbeats arrive every `heartbeat`; three missed mean the agent is stuck even if
        // QUIC still answers pings.
        let patience = self.heartbeat * 3;
        let mut last_renewal: Option<tokio::time::Instant> = None;
        loop {
            match tokio::time::timeout(patience, recv.recv::<ControlUp>()).await {
                Ok(Ok(Some(ControlUp::Heartbeat { .. }))) => {}
                Ok(Ok(Some(ControlUp::Renew { .. }))) if protocol_version < 3 => {
                    connection.close(close_code::PROTOCOL.into(), b"renewal needs version 3");
                    return "the agent asked for a renewal without protocol version 3".into();
                }
                Ok(Ok(Some(ControlUp::Renew { csr }))) => {
                    // Signing costs: an agent asks once per certificate, not in a loop.
                    let answer = if last_renewal
                        .is_some_and(|at| at.elapsed() < MIN_RENEWAL_INTERVAL)
                    {
                        ControlDown::RenewRefused {
                            reason: format!("renewals come at most every {MIN_RENEWAL_INTERVAL:?}"),
                        }
                    } else {
                        last_renewal = Some(tokio::time::Instant::now());
                        match &self.renewal {
                            Some(renewal) => {
                                renewal
                                    .renew(
                                        &self.store,
                                        self.agents.is_revoked(agent_id),
                                        agent_id,
                                        &csr,
                                        connection,
                                    )
                                    .await
                            }
                            None => ControlDown::RenewRefused {
                                reason: "this controller issues no certificates (it has no \
                                         [enroll] section): renew the certificate where it \
                                         was issued"
                                    .into(),
                            },
                        }
                    };
                    if let ControlDown::RenewRefused { reason } = &answer {
                        tracing::warn!(agent_id, "renewal refused: {reason}");
                    }
                    if let Err(e) = send_frame(send, &answer).await {
                        return format!("cannot answer the renewal: {e}");
                    }
                }
                Ok(Ok(Some(ControlUp::Holding { .. }))) => {
                    connection.close(close_code::PROTOCOL.into(), b"tasks reported twice");
                    return "the agent reported its tasks a second time".into();
                }
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

    /// Logs a registration whose address another host claimed first: the newcomer is the one
    /// quarantined (`address_conflict` in `list_hosts`, not a target by that address).
    async fn report_contested_address(&self, host: &HostRecord) {
        let Ok(ip) = host.ip.parse::<IpAddr>() else {
            return;
        };
        // Most registrations have the address to themselves: look for any other claimant before
        // merging the inventory to learn which claim holds.
        let every_claim = HostRecord {
            address_since: i64::MAX,
            ..host.clone()
        };
        let others = match self.store.earlier_claims(&every_claim).await {
            Ok(others) => others,
            Err(e) => {
                tracing::error!(
                    agent_id = host.agent_id,
                    "cannot look up address claims: {e}"
                );
                return;
            }
        };
        let declared = self
            .inventory
            .base()
            .host_by_address(host.bk_cloud_id, ip)
            .is_some();
        if others.is_empty() && !declared {
            return;
        }
        // The merged inventory's host table ranks the claims (hosts of the inventory file, then
        // pinned agents, then the oldest claim, then the lowest id): ask it, so that the log
        // names the host that jobs by this address actually reach.
        let merged = match self.inventory.current().await {
            Ok(merged) => merged,
            Err(e) => {
                tracing::error!(agent_id = host.agent_id, "cannot merge the inventory: {e}");
                return;
            }
        };
        let Some(holder) = merged.host_by_address(host.bk_cloud_id, ip) else {
            return;
        };
        if holder.bk_host_id == host.bk_host_id {
            return;
        }
        let held_by = match others.iter().find(|c| c.bk_host_id == holder.bk_host_id) {
            Some(claim) => format!("host {} (agent {:?})", claim.bk_host_id, claim.agent_id),
            None => format!("host {} of the inventory", holder.bk_host_id),
        };
        tracing::warn!(
            agent_id = host.agent_id,
            bk_host_id = host.bk_host_id,
            bk_cloud_id = host.bk_cloud_id,
            ip = host.ip,
            "address conflict: the address is held by {held_by}; this host is quarantined (not a \
             target by that address) until an operator resolves it"
        );
    }

    async fn check_hello(
        &self,
        certificate: &AgentCertificate,
        observed: IpAddr,
        hello: &Hello,
    ) -> Result<AgentRegistration, String> {
        let agent_id = certificate.agent_id.as_str();
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
        let pinned = self.inventory.base().pinned_address(agent_id).cloned();
        let (ip, source) = agent_address(
            hello.ips.first().copied(),
            pinned.as_ref(),
            &certificate.ips,
            observed,
            hello.bk_cloud_id,
            &self.policy.trust_reported_ip_in,
        )?;
        if source == AddressSource::TrustedReport {
            tracing::info!(
                agent_id,
                %ip,
                %observed,
                bk_cloud_id = hello.bk_cloud_id,
                "believing the agent's reported address: its cloud area is trusted"
            );
        }
        self.check_admission(agent_id).await?;
        Ok(AgentRegistration {
            agent_id: agent_id.to_owned(),
            bk_cloud_id: hello.bk_cloud_id,
            ip: ip.to_string(),
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

impl Gateway {
    /// Whether the agent may register: the inventory lists it, it has a host already (an
    /// operator forgets it with `delete_host`), or the operator lets unlisted agents register.
    async fn check_admission(&self, agent_id: &str) -> Result<(), String> {
        if self.policy.unlisted == UnlistedAgents::Register
            || self.inventory.base().lists_agent(agent_id)
        {
            return Ok(());
        }
        match self.store.host_of_agent(agent_id).await {
            Ok(Some(_)) => Ok(()),
            Ok(None) => Err(format!(
                "agent {agent_id:?} is not in the inventory: an operator lists it first \
                 (fleetrun hosts move --agent {agent_id} ...), or lets unlisted agents register \
                 ([agents] unlisted = \"register\")"
            )),
            Err(e) => {
                tracing::error!(agent_id, "cannot look up the agent's host: {e}");
                Err("controller could not check the agent".into())
            }
        }
    }
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

#[cfg(test)]
mod tests {
    use super::*;

    fn revoked(agents: &Agents, ids: &[&str]) -> bool {
        ids.iter().all(|a| agents.is_revoked(a))
    }

    #[test]
    fn a_copy_of_the_stores_revocations_read_before_a_change_here_does_not_undo_it() {
        let agents = Agents::default();
        let set = |ids: &[&str]| -> HashSet<String> { ids.iter().map(|a| a.to_string()).collect() };
        agents.set_revoked(set(&["old", "lifted-elsewhere"]));
        // A copy read before "new" was revoked here (not stored yet, then stored) and "old"
        // lifted here: neither change is undone, the others' changes are taken.
        let seen = agents.revocations_seen();
        agents.revoke("new");
        let stale = set(&["old", "elsewhere"]);
        agents.unrevoke("old");
        let added = agents.merge_revoked(&stale, seen);
        assert_eq!(added, [("elsewhere".to_owned(), 0)]);
        assert!(revoked(&agents, &["new", "elsewhere"]));
        assert!(!agents.is_revoked("old") && !agents.is_revoked("lifted-elsewhere"));
        // Still not stored: a copy read later does not lift it either.
        let seen = agents.revocations_seen();
        agents.merge_revoked(&set(&["elsewhere"]), seen);
        assert!(agents.is_revoked("new"));
        // Stored: a copy read before that still keeps it; one read after rules.
        let seen = agents.revocations_seen();
        agents.revocation_stored("new");
        agents.merge_revoked(&set(&["elsewhere"]), seen);
        assert!(agents.is_revoked("new"));
        let seen = agents.revocations_seen();
        agents.merge_revoked(&set(&["elsewhere", "new"]), seen);
        assert!(revoked(&agents, &["new", "elsewhere"]));
        // Lifted through another controller later: the next copy lifts it here.
        let seen = agents.revocations_seen();
        agents.merge_revoked(&set(&["elsewhere"]), seen);
        assert!(!agents.is_revoked("new"));
        assert!(agents.links.read().unwrap().changed.is_empty());
    }

    fn ip(text: &str) -> IpAddr {
        text.parse().unwrap()
    }

    #[test]
    fn an_agents_address_is_one_it_cannot_make_up() {
        let address =
            |reported: &str, cert: &[&str], observed: &str, cloud: i64, trusted: &[i64]| {
                let cert: Vec<IpAddr> = cert.iter().map(|a| ip(a)).collect();
                agent_address(
                    Some(ip(reported)),
                    None,
                    &cert,
                    ip(observed),
                    cloud,
                    trusted,
                )
            };
        let ok = |source| Ok((ip("10.0.0.5"), source));
        // Named by the certificate: wherever the agent connects from (a relay, NAT).
        assert_eq!(
            address("10.0.0.5", &["10.0.0.4", "10.0.0.5"], "192.0.2.1", 0, &[]),
            ok(AddressSource::Certificate)
        );
        // A certificate with addresses binds the agent to them, even in a trusted cloud area.
        let refused = address("10.0.0.5", &["10.0.0.4"], "10.0.0.5", 1, &[1]).unwrap_err();
        assert!(
            refused.contains("does not name (it names 10.0.0.4)"),
            "{refused}"
        );
        // No address in the certificate: where it connects from.
        assert_eq!(
            address("10.0.0.5", &[], "::ffff:10.0.0.5", 0, &[]),
            ok(AddressSource::Observed)
        );
        let refused = address("10.0.0.5", &[], "10.0.0.6", 0, &[]).unwrap_err();
        assert!(refused.contains("connects from 10.0.0.6"), "{refused}");
        // Or what it says, where the operator trusts that.
        assert_eq!(
            address("10.0.0.5", &[], "10.0.0.6", 1, &[1]),
            ok(AddressSource::TrustedReport)
        );
        assert!(address("10.0.0.5", &[], "10.0.0.6", 1, &[2]).is_err());
        assert!(agent_address(None, None, &[], ip("10.0.0.6"), 0, &[]).is_err());
        // The cloud area is the agent's word alone: outside the default area, an unpinned agent
        // is believed only where the operator trusts reports, however well its address is backed.
        for (cert, observed) in [(&["10.0.0.5"][..], "192.0.2.1"), (&[][..], "10.0.0.5")] {
            let refused = address("10.0.0.5", cert, observed, 3, &[1]).unwrap_err();
            assert!(
                refused.contains("reports cloud area 3") && refused.contains("pin it"),
                "{refused}"
            );
        }
        assert_eq!(
            address("10.0.0.5", &["10.0.0.5"], "192.0.2.1", 3, &[3]),
            ok(AddressSource::Certificate)
        );
        // The operator's pin comes first: it admits an address nothing else backs, and refuses
        // any other, even one the certificate names.
        let pin = PinnedAddress {
            bk_cloud_id: 1,
            ips: vec![ip("10.0.0.5")],
        };
        let pinned = |reported: &str, cloud: i64, cert: &[IpAddr]| {
            agent_address(
                Some(ip(reported)),
                Some(&pin),
                cert,
                ip("192.0.2.1"),
                cloud,
                &[],
            )
        };
        assert_eq!(pinned("10.0.0.5", 1, &[]), ok(AddressSource::Inventory));
        let refused = pinned("10.0.0.6", 1, &[ip("10.0.0.6")]).unwrap_err();
        assert!(
            refused.contains("pins it to 10.0.0.5 in cloud area 1"),
            "{refused}"
        );
        assert!(pinned("10.0.0.5", 2, &[]).is_err());
        assert!(address("0.0.0.0", &[], "0.0.0.0", 1, &[1]).is_err());
    }
}
