//! One virtual agent: its own QUIC connection and certificate, the real agent's session (hello,
//! heartbeats, one task per incoming stream) and its reconnection with backoff.

use std::{net::IpAddr, sync::Arc, sync::atomic::Ordering, time::Duration};

use fleetrun_net::{FramedRecv, describe_connection_error, send_frame};
use fleetrun_proto::{ControlUp, Hello, HelloReply, OsType};
use tokio::sync::Semaphore;

use crate::{Shared, task};

/// The agent version the virtual agents report: the swarm's, marked as such.
const VERSION: &str = concat!(env!("CARGO_PKG_VERSION"), "-swarm");

#[derive(Debug)]
pub(crate) struct VirtualAgent {
    pub agent_id: String,
    pub ip: IpAddr,
    pub client_config: quinn::ClientConfig,
    pub endpoint: quinn::Endpoint,
}

/// Counts the agent online while it lives.
struct Online<'a>(&'a Shared);

impl Drop for Online<'_> {
    fn drop(&mut self) {
        self.0.stats.online.fetch_sub(1, Ordering::Relaxed);
    }
}

/// How a session ended.
enum Ended {
    BeforeWelcome(String),
    AfterWelcome { lasted: Duration, reason: String },
}

/// Waits between connection attempts exactly as `fleetrun-agent` does: from 200 ms doubling to
/// 30 s, each wait between half and all of the step, reset after a session of over 10 s.
struct Backoff {
    next: Duration,
}

impl Backoff {
    const FIRST: Duration = Duration::from_millis(200);
    const MAX: Duration = Duration::from_secs(30);

    fn next_delay(&mut self) -> Duration {
        let step = self.next;
        self.next = (self.next * 2).min(Self::MAX);
        step.mul_f64(rand::random_range(0.5..=1.0))
    }
}

/// Runs the agent until the swarm's endpoints close.
pub(crate) async fn run(shared: Arc<Shared>, agent: VirtualAgent) {
    let slots = Arc::new(Semaphore::new(shared.max_tasks));
    let mut backoff = Backoff {
        next: Backoff::FIRST,
    };
    let mut welcomed_before = false;
    loop {
        match session(&shared, &agent, &slots, &mut welcomed_before).await {
            Ended::AfterWelcome { lasted, reason } => {
                tracing::warn!(
                    agent_id = agent.agent_id,
                    "lost the controller after {lasted:?}: {reason}"
                );
                if lasted > Duration::from_secs(10) {
                    backoff.next = Backoff::FIRST;
                }
            }
            Ended::BeforeWelcome(reason) => {
                tracing::warn!(
                    agent_id = agent.agent_id,
                    "cannot connect to the controller: {reason}"
                );
            }
        }
        if shared.stopping.load(Ordering::Relaxed) {
            return;
        }
        tokio::time::sleep(backoff.next_delay()).await;
    }
}

async fn session(
    shared: &Arc<Shared>,
    agent: &VirtualAgent,
    slots: &Arc<Semaphore>,
    welcomed_before: &mut bool,
) -> Ended {
    // Handshakes are where the CPU goes while a swarm comes up; a bounded number at once keeps
    // every one of them well inside the controller's 10 s hello deadline.
    let permit = shared.connect_slots.acquire().await;
    let connecting = match agent.endpoint.connect_with(
        agent.client_config.clone(),
        shared.controller,
        &shared.server_name,
    ) {
        Ok(c) => c,
        Err(e) => return Ended::BeforeWelcome(format!("cannot start a connection: {e}")),
    };
    let connection = match connecting.await {
        Ok(c) => c,
        Err(e) => return Ended::BeforeWelcome(describe_connection_error(&e)),
    };
    let hello = Hello {
        protocol_version: shared.protocol_version,
        agent_id: agent.agent_id.clone(),
        agent_version: VERSION.to_owned(),
        hostname: agent.agent_id.clone(),
        os_type: OsType::Linux,
        bk_cloud_id: shared.bk_cloud_id,
        ips: vec![agent.ip],
    };
    let (mut send, recv) = match connection.open_bi().await {
        Ok(streams) => streams,
        Err(e) => return Ended::BeforeWelcome(describe_connection_error(&e)),
    };
    let mut recv = FramedRecv::new(recv);
    let reply = async {
        send_frame(&mut send, &hello).await?;
        recv.recv::<HelloReply>().await
    };
    let reply = match tokio::time::timeout(Duration::from_secs(15), reply).await {
        Err(_) => return Ended::BeforeWelcome("no answer to hello within 15 s".into()),
        Ok(Err(e)) => {
            return Ended::BeforeWelcome(match e.connection_error() {
                Some(conn) => describe_connection_error(conn),
                None => e.to_string(),
            });
        }
        Ok(Ok(None)) => return Ended::BeforeWelcome("controller closed the hello stream".into()),
        Ok(Ok(Some(reply))) => reply,
    };
    drop(permit);
    let heartbeat = match reply {
        HelloReply::Refused { reason } => {
            return Ended::BeforeWelcome(format!("controller refused this agent: {reason}"));
        }
        HelloReply::Welcome {
            heartbeat_interval_ms,
            ..
        } => Duration::from_millis(heartbeat_interval_ms.max(100)),
        HelloReply::Negotiated {
            heartbeat_interval_ms,
            ..
        } => {
            // The emulated executor's tasks end with their connection: it holds nothing.
            let holding = ControlUp::Holding { tasks: Vec::new() };
            if let Err(e) = send_frame(&mut send, &holding).await {
                return Ended::BeforeWelcome(format!("cannot report the tasks held: {e}"));
            }
            Duration::from_millis(heartbeat_interval_ms.max(100))
        }
    };
    if !*welcomed_before {
        *welcomed_before = true;
        shared.welcomed();
    }
    shared.stats.online.fetch_add(1, Ordering::Relaxed);
    let _online = Online(shared);
    let since = tokio::time::Instant::now();
    let reason = tokio::select! {
        reason = heartbeats(shared, slots, &mut send, heartbeat) => reason,
        reason = accept_tasks(shared, slots, &connection) => reason,
    };
    Ended::AfterWelcome {
        lasted: since.elapsed(),
        reason,
    }
}

async fn heartbeats(
    shared: &Shared,
    slots: &Semaphore,
    send: &mut quinn::SendStream,
    every: Duration,
) -> String {
    let mut tick = tokio::time::interval(every);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        tick.tick().await;
        let running = (shared.max_tasks - slots.available_permits()) as u32;
        let beat = ControlUp::Heartbeat {
            running_tasks: running,
        };
        if let Err(e) = send_frame(send, &beat).await {
            return match e.connection_error() {
                Some(conn) => describe_connection_error(conn),
                None => e.to_string(),
            };
        }
    }
}

async fn accept_tasks(
    shared: &Arc<Shared>,
    slots: &Arc<Semaphore>,
    connection: &quinn::Connection,
) -> String {
    loop {
        match connection.accept_bi().await {
            Ok((send, recv)) => {
                tokio::spawn(task::serve(shared.clone(), slots.clone(), send, recv));
            }
            Err(e) => return describe_connection_error(&e),
        }
    }
}
