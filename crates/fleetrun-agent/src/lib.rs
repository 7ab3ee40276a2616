//! The fleetrun agent: connects out to the controller (so hosts behind NAT work), proves who it
//! is with its certificate, and runs the tasks the controller sends, one QUIC stream each.
//!
//! **Architecture invariant:** the agent never listens on a port; every connection is one it made.

pub mod config;
pub mod limits;
mod session;
mod spool;
mod task;

use std::{
    net::{IpAddr, SocketAddr},
    sync::Arc,
    time::Duration,
};

use anyhow::Context as _;
use backon::{BackoffBuilder, ExponentialBackoff, ExponentialBuilder};
use fleetrun_exec::{ExecConfig, Executor};
use fleetrun_net::{Timing, TlsFiles};
use tokio_util::sync::CancellationToken;

pub use config::Config;

/// The agent's version, reported in its hello.
pub const VERSION: &str = env!("CARGO_PKG_VERSION");

/// Waits between connection attempts: exponential from `FIRST` to `MAX`, with jitter so a
/// fleet that lost its controller does not come back in lockstep.
#[derive(Debug)]
struct Backoff {
    delays: ExponentialBackoff,
}

impl Backoff {
    const FIRST: Duration = Duration::from_millis(200);
    const MAX: Duration = Duration::from_secs(30);

    fn new() -> Self {
        // backon's jitter adds up to one more step: steps from half of `FIRST` to half of `MAX`
        // give waits between half and all of a step that doubles from `FIRST` to `MAX`.
        let delays = ExponentialBuilder::default()
            .with_min_delay(Self::FIRST / 2)
            .with_max_delay(Self::MAX / 2)
            .with_factor(2.0)
            .with_jitter()
            .without_max_times()
            .build();
        Self { delays }
    }

    fn reset(&mut self) {
        *self = Self::new();
    }

    /// The next wait: between half and all of the current step.
    fn next_delay(&mut self) -> Duration {
        self.delays.next().unwrap_or(Self::MAX)
    }
}

/// Everything a connection needs; built once at start.
#[derive(Debug)]
pub(crate) struct AgentContext {
    pub agent_id: String,
    pub config: Config,
    pub executor: Executor,
    pub slots: Arc<tokio::sync::Semaphore>,
    pub hostname: String,
    /// Where tasks keep their output and result; `None` when it cannot be made (then output
    /// reaches the controller only while it is connected, and is counted as lost otherwise).
    pub spool: Option<spool::Spool>,
    /// The tasks this agent holds, whatever the connection.
    pub tasks: task::Tasks,
    /// The host id the controller last welcomed this agent with.
    bk_host_id: std::sync::atomic::AtomicI64,
}

impl AgentContext {
    pub(crate) fn bk_host_id(&self) -> i64 {
        self.bk_host_id.load(std::sync::atomic::Ordering::Relaxed)
    }

    pub(crate) fn set_bk_host_id(&self, bk_host_id: i64) {
        self.bk_host_id
            .store(bk_host_id, std::sync::atomic::Ordering::Relaxed);
    }
}

/// Runs the agent until `shutdown` fires.
pub async fn run(config: Config, shutdown: CancellationToken) -> anyhow::Result<()> {
    let agent_id = fleetrun_net::agent_id_of_cert_file(&config.tls.cert).with_context(|| {
        format!(
            "reading this agent's identity from {}",
            config.tls.cert.display()
        )
    })?;
    let mut exec_config = ExecConfig::new(&config.work_dir);
    exec_config.cgroup_name = config
        .cgroup_name
        .clone()
        .unwrap_or_else(|| format!("fleetrun-{agent_id}"));
    exec_config.refuse_root = config.limits.root_refusal();
    let executor = Executor::new(exec_config).context("preparing to run scripts")?;
    let endpoint = fleetrun_net::client_endpoint(
        &TlsFiles {
            ca: config.tls.ca.clone(),
            cert: config.tls.cert.clone(),
            key: config.tls.key.clone(),
        },
        config.bind,
        Timing::default(),
    )?;
    let hostname = config.hostname.clone().unwrap_or_else(system_hostname);
    // After the executor killed what a previous run left: a task found in the spool without a
    // result has no process any more.
    let tasks = task::Tasks::default();
    let spool = match spool::Spool::open(&config.work_dir) {
        Ok(spool) => {
            tasks.recover(&spool);
            Some(spool)
        }
        Err(e) => {
            tracing::error!(
                "cannot use the spool under {}: output of tasks that outlive their connection \
                 is lost: {e}",
                config.work_dir.display()
            );
            None
        }
    };
    let ctx = Arc::new(AgentContext {
        spool,
        tasks,
        bk_host_id: std::sync::atomic::AtomicI64::new(0),
        slots: Arc::new(tokio::sync::Semaphore::new(config.max_concurrent_tasks)),
        agent_id,
        config,
        executor,
        hostname,
    });
    tracing::info!(
        agent_id = ctx.agent_id,
        controller = %ctx.config.controller,
        cgroups = ctx.executor.uses_cgroup(),
        limits = ?ctx.config.limits,
        "agent starting"
    );
    // Ready once it can run tasks: waiting for a controller that is down must not fail the
    // service's start; the status line says whether it is connected.
    tell_systemd(&[
        sd_notify::NotifyState::Ready,
        sd_notify::NotifyState::Status("connecting to the controller"),
    ]);

    let mut backoff = Backoff::new();
    let controllers = ctx.config.controller.entries();
    let mut next = 0;
    loop {
        let target = &controllers[next % controllers.len()];
        let ended = tokio::select! {
            ended = session::connect_and_serve(&ctx, &endpoint, target) => ended,
            () = shutdown.cancelled() => break,
        };
        match ended {
            session::Ended::AfterWelcome { lasted, reason } => {
                tracing::warn!("lost the controller after {lasted:?}: {reason}");
                tell_systemd(&[sd_notify::NotifyState::Status(&format!(
                    "lost the controller {target}: {reason}; reconnecting"
                ))]);
                if lasted > Duration::from_secs(10) {
                    backoff.reset();
                }
            }
            session::Ended::BeforeWelcome(reason) => {
                tracing::warn!(
                    controller = target,
                    "cannot connect to the controller: {reason}"
                );
                tell_systemd(&[sd_notify::NotifyState::Status(&format!(
                    "cannot connect to the controller {target}: {reason}"
                ))]);
                // The next one in the list, if there are several.
                next = next.wrapping_add(1);
            }
        }
        let delay = backoff.next_delay();
        tracing::info!("reconnecting in {delay:?}");
        tokio::select! {
            () = tokio::time::sleep(delay) => {}
            () = shutdown.cancelled() => break,
        }
    }
    endpoint.close(
        fleetrun_proto::close_code::SHUTDOWN.into(),
        b"agent shutting down",
    );
    // Let the close reach the controller.
    let _ = tokio::time::timeout(Duration::from_secs(1), endpoint.wait_idle()).await;
    Ok(())
}

/// Tells systemd how the agent is doing (`Type=notify`); does nothing when systemd did not
/// start the process (no `NOTIFY_SOCKET`).
pub fn tell_systemd(states: &[sd_notify::NotifyState<'_>]) {
    if let Err(e) = sd_notify::notify(states) {
        tracing::warn!("cannot notify systemd: {e}");
    }
}

fn system_hostname() -> String {
    std::fs::read_to_string("/proc/sys/kernel/hostname")
        .map(|h| h.trim().to_owned())
        .unwrap_or_else(|_| "unknown".to_owned())
}

/// The address this host is targeted by: configured, else the one it reaches the controller from.
pub(crate) fn host_ip(config: &Config, controller: SocketAddr) -> anyhow::Result<IpAddr> {
    if let Some(ip) = config.ip {
        return Ok(ip);
    }
    if !config.bind.ip().is_unspecified() {
        return Ok(config.bind.ip());
    }
    let any = if controller.is_ipv4() {
        "0.0.0.0:0"
    } else {
        "[::]:0"
    };
    let probe = std::net::UdpSocket::bind(any)?;
    probe.connect(controller)?;
    Ok(probe.local_addr()?.ip())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn backoff_grows_to_the_cap_with_jitter() {
        let mut backoff = Backoff::new();
        let delays: Vec<Duration> = (0..12).map(|_| backoff.next_delay()).collect();
        assert!(delays[0] >= Backoff::FIRST / 2 && delays[0] <= Backoff::FIRST);
        assert!(delays.iter().all(|d| *d <= Backoff::MAX));
        assert!(delays[11] >= Backoff::MAX / 2);
        backoff.reset();
        assert!(backoff.next_delay() <= Backoff::FIRST);
    }
}
