//! One connection to the controller: hello, heartbeats, and a task per incoming stream.

use std::{sync::Arc, time::Duration};

use fleetrun_net::{FramedRecv, describe_connection_error, send_frame};
use fleetrun_proto::{ControlUp, Hello, HelloReply, OsType};
use task::Ownership;
use tokio::time::Instant;
use tokio_util::sync::CancellationToken;

use crate::{AgentContext, Presence, host_ip, task};

/// How a session ended.
#[derive(Debug)]
pub(crate) enum Ended {
    /// The controller never welcomed the agent.
    BeforeWelcome(String),
    /// The connection was lost after a welcome.
    AfterWelcome {
        lasted: Duration,
        reason: String,
        /// The controller closed the connection saying it shuts down
        /// ([`fleetrun_proto::close_code::SHUTDOWN`]): another controller should take over.
        shutting_down: bool,
        /// The controller said it is one of a cluster ([`HelloReply::Joined`]): another
        /// controller sharing its database can take its tasks over.
        clustered: bool,
    },
}

/// Connects to the controller at `target` (`host:port` from the configuration, looked up now)
/// and serves it until the connection ends.
pub(crate) async fn connect_and_serve(
    ctx: &Arc<AgentContext>,
    endpoint: &quinn::Endpoint,
    target: &str,
) -> Ended {
    let config = &ctx.config;
    let controller = match tokio::net::lookup_host(target).await {
        Ok(mut addresses) => match addresses.next() {
            Some(address) => address,
            None => return Ended::BeforeWelcome(format!("{target} has no address")),
        },
        Err(e) => return Ended::BeforeWelcome(format!("cannot look up {target}: {e}")),
    };
    // Emulated agents take their turn: handshakes are where a swarm's CPU goes while it comes
    // up, and a bounded number at once keeps each inside the controller's hello deadline.
    let gate = match &ctx.presence {
        Presence::Emulated { connect_gate, .. } => Some(connect_gate.acquire().await),
        Presence::Host => None,
    };
    // The configuration in force: a renewed certificate is presented from the next connection.
    let client_config = ctx.client_config.lock().unwrap().clone();
    let connecting = match endpoint.connect_with(client_config, controller, &config.server_name) {
        Ok(c) => c,
        Err(e) => return Ended::BeforeWelcome(format!("cannot start a connection: {e}")),
    };
    let connection = match connecting.await {
        Ok(c) => c,
        Err(e) => return Ended::BeforeWelcome(describe_connection_error(&e)),
    };
    let ip = match host_ip(ctx, controller) {
        Ok(ip) => ip,
        Err(e) => return Ended::BeforeWelcome(format!("cannot tell this host's address: {e}")),
    };
    let hello = Hello {
        protocol_version: ctx.protocol_version,
        agent_id: ctx.agent_id.clone(),
        agent_version: ctx.agent_version.clone(),
        hostname: ctx.hostname.clone(),
        os_type: OsType::Linux,
        bk_cloud_id: config.bk_cloud_id,
        ips: vec![ip],
    };
    // With TLS 1.3 a controller that rejects our certificate does so after `connect()` has
    // succeeded here: the failure surfaces on this first stream, and is reported as what it is.
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
    drop(gate);
    let (heartbeat, ownership, renews, protocol, clustered) = match reply {
        HelloReply::Refused { reason } => {
            return Ended::BeforeWelcome(format!("controller refused this agent: {reason}"));
        }
        HelloReply::Welcome {
            bk_host_id,
            heartbeat_interval_ms,
        } => {
            // An agent asking for version 1 (an emulated one, not yet upgraded) expects this.
            if ctx.protocol_version > 1 {
                tracing::warn!(
                    bk_host_id,
                    %ip,
                    "connected to a controller of protocol version 1: its tasks end with the \
                     connection; upgrade the controller"
                );
            }
            ctx.set_bk_host_id(bk_host_id);
            let every = Duration::from_millis(heartbeat_interval_ms.max(100));
            (every, Ownership::Connection, false, 1, false)
        }
        HelloReply::Negotiated {
            protocol_version,
            bk_host_id,
            heartbeat_interval_ms,
        }
        | HelloReply::Joined {
            protocol_version,
            bk_host_id,
            heartbeat_interval_ms,
            ..
        } => {
            ctx.set_bk_host_id(bk_host_id);
            let every = Duration::from_millis(heartbeat_interval_ms.max(100));
            let holding = ctx.tasks.reports();
            tracing::info!(
                bk_host_id,
                %ip,
                protocol_version,
                held_tasks = holding.len(),
                "connected to the controller"
            );
            if let Err(e) = send_frame(&mut send, &ControlUp::Holding { tasks: holding }).await {
                return Ended::BeforeWelcome(format!("cannot report the tasks held: {e}"));
            }
            let renews = protocol_version >= 3 && matches!(ctx.presence, Presence::Host);
            let clustered = matches!(
                reply,
                HelloReply::Joined {
                    clustered: true,
                    ..
                }
            );
            (every, Ownership::Agent, renews, protocol_version, clustered)
        }
    };
    ctx.metrics.welcomed();
    ctx.tell_systemd(|| format!("connected to the controller {target}"));
    let since = Instant::now();
    // Under protocol version 1 the tasks of this connection die with it.
    let session = CancellationToken::new();
    let _cancel_on_exit = session.clone().drop_guard();
    // From version 3 the certificate renews over this connection (`renew`).
    let (due_at, due) =
        tokio::sync::watch::channel(if renews { crate::renew::due(ctx) } else { None });
    let reason = tokio::select! {
        reason = heartbeats(ctx, &mut send, heartbeat, due) => reason,
        reason = crate::renew::answers(ctx, &mut recv, &due_at), if renews => reason,
        reason = accept_tasks(ctx, &connection, ownership, protocol, &session) => reason,
    };
    let shutting_down = matches!(
        connection.close_reason(),
        Some(quinn::ConnectionError::ApplicationClosed(close))
            if close.error_code == quinn::VarInt::from_u32(fleetrun_proto::close_code::SHUTDOWN)
    );
    Ended::AfterWelcome {
        lasted: since.elapsed(),
        reason,
        shutting_down,
        clustered,
    }
}

/// Sends heartbeats, and a renewal request when `due` says the certificate is due (again after
/// [`crate::renew::RETRY`] while unanswered).
async fn heartbeats(
    ctx: &AgentContext,
    send: &mut quinn::SendStream,
    every: Duration,
    mut due: tokio::sync::watch::Receiver<Option<Instant>>,
) -> String {
    let mut tick = tokio::time::interval(every);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    let mut asked_at: Option<Instant> = None;
    let mut due_open = true;
    loop {
        let renew_at = (*due.borrow()).map(|at| match asked_at {
            Some(asked) => at.max(asked + crate::renew::RETRY),
            None => at,
        });
        tokio::select! {
            _ = tick.tick() => {}
            () = sleep_until(renew_at) => {
                asked_at = Some(Instant::now());
                match crate::renew::request(ctx) {
                    Ok(csr) => {
                        tracing::info!("asking the controller to renew the certificate");
                        if let Err(e) = send_frame(send, &ControlUp::Renew { csr }).await {
                            return e.to_string();
                        }
                    }
                    Err(e) => tracing::error!("cannot ask for a renewal: {e:#}"),
                }
                continue;
            }
            changed = due.changed(), if due_open => {
                // A new deadline after an answer; a closed channel means no more renewals.
                due_open = changed.is_ok();
                asked_at = None;
                continue;
            }
        }
        let running = (ctx.config.max_concurrent_tasks - ctx.slots.available_permits()) as u32;
        if let Err(e) = send_frame(
            send,
            &ControlUp::Heartbeat {
                running_tasks: running,
            },
        )
        .await
        {
            return match e.connection_error() {
                Some(conn) => describe_connection_error(conn),
                None => e.to_string(),
            };
        }
    }
}

/// Sleeps until `at`, or forever without one.
async fn sleep_until(at: Option<Instant>) {
    match at {
        Some(at) => tokio::time::sleep_until(at).await,
        None => std::future::pending().await,
    }
}

async fn accept_tasks(
    ctx: &Arc<AgentContext>,
    connection: &quinn::Connection,
    ownership: Ownership,
    protocol_version: u32,
    session: &CancellationToken,
) -> String {
    loop {
        match connection.accept_bi().await {
            Ok((send, recv)) => {
                let ctx = ctx.clone();
                let session = session.clone();
                tokio::spawn(async move {
                    task::serve(ctx, send, recv, ownership, protocol_version, session).await
                });
            }
            Err(e) => return describe_connection_error(&e),
        }
    }
}
