//! The fleetrun agent: connects out to the controller (so hosts behind NAT work), proves who it
//! is with its certificate, and runs the tasks the controller sends, one QUIC stream each.
//!
//! **Architecture invariant:** the agent never listens on a port for work; every connection that
//! carries tasks is one it made. The only listener is the optional, read-only metrics one
//! (`[metrics] listen`, loopback unless explicitly allowed).

pub mod config;
pub mod enroll;
mod files;
pub mod limits;
mod metrics;
mod renew;
mod runner;
mod session;
mod spool;
mod task;
mod transfer;

use std::{
    net::{IpAddr, SocketAddr},
    sync::Arc,
    time::Duration,
};

use anyhow::Context as _;
use backon::{BackoffBuilder, ExponentialBackoff, ExponentialBuilder};
use fleetrun_exec::{ExecConfig, Executor};
use fleetrun_net::{Timing, TlsFiles};
use tokio::sync::Semaphore;
use tokio_util::sync::CancellationToken;

pub use config::Config;
pub use metrics::MetricsConfig;
pub use runner::Runner;

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

/// Which controller of the configured list to try next, and after how long.
#[derive(Debug)]
struct Failover {
    controllers: usize,
    next: usize,
    backoff: Backoff,
    /// Since when, and in how many attempts in a row, the home controller could not be reached.
    home_unreachable: Option<(std::time::Instant, u32)>,
    /// The home controller the agent stopped waiting for, while it is still the tasks' home.
    given_up: Option<usize>,
    /// By index, whether the controller said, the last time it welcomed the agent, that it is
    /// one of a cluster ([`fleetrun_proto::HelloReply::Joined`]). Only such a home is given up:
    /// a standalone controller's tasks are unknown to every other one, which would kill them.
    clustered: Vec<bool>,
}

impl Failover {
    /// A session that lasted this long had a working controller: the waits start over.
    const HEALTHY: Duration = Duration::from_secs(10);
    /// How long a home controller may stay unreachable, in at least [`Self::HOME_ATTEMPTS`]
    /// attempts, before the agent takes its tasks to another controller of the list: long
    /// enough for a restart, far shorter than the tasks' deadlines, so that a controller
    /// sharing the database takes them over (their output included) while the lease holder
    /// still waits for them, instead of their hosts ending 310.
    const HOME_PATIENCE: Duration = Duration::from_secs(20);
    const HOME_ATTEMPTS: u32 = 3;

    fn new(controllers: usize) -> Self {
        Self {
            controllers: controllers.max(1),
            next: 0,
            backoff: Backoff::new(),
            home_unreachable: None,
            given_up: None,
            clustered: vec![false; controllers.max(1)],
        }
    }

    /// The index of the controller to connect to.
    fn current(&self) -> usize {
        self.next % self.controllers
    }

    /// Decides after a session: the next controller to try (`current`), and the wait first.
    /// `home` is the index of the controller that sent tasks the agent still holds and that
    /// still waits for them ([`task::Tasks::home`]): the agent goes back to it whatever the
    /// session's end (a controller shutting down is usually restarting), as another one may
    /// not know those tasks and have them killed. Without one, a controller shutting down or
    /// refusing sends the agent to the next of the list.
    fn after(&mut self, ended: &session::Ended, home: Option<usize>) -> Duration {
        self.after_at(ended, home, std::time::Instant::now())
    }

    /// [`Self::after`] at `now`. A home that could not be reached for [`Self::HOME_PATIENCE`]
    /// (and [`Self::HOME_ATTEMPTS`] attempts) is given up if it said it is one of a cluster:
    /// the agent goes on as without one, to the next controller, which takes the tasks over
    /// when the agent claims them there. A standalone home is waited for until the tasks'
    /// deadlines (a restart may take longer than the patience; no other controller knows them).
    fn after_at(
        &mut self,
        ended: &session::Ended,
        home: Option<usize>,
        now: std::time::Instant,
    ) -> Duration {
        if let session::Ended::AfterWelcome { clustered, .. } = ended {
            let at = self.current();
            self.clustered[at] = *clustered;
        }
        if home != self.given_up {
            // The tasks were acknowledged, or taken over by another controller: a new home.
            self.given_up = None;
        }
        let home = home.filter(|home| self.given_up != Some(*home));
        if let Some(home) = home {
            let unreachable = matches!(ended, session::Ended::BeforeWelcome(_))
                && (self.next % self.controllers) == home;
            self.home_unreachable = match (unreachable, self.home_unreachable) {
                (false, _) => None,
                (true, None) => Some((now, 1)),
                (true, Some((since, attempts))) => Some((since, attempts + 1)),
            };
            if self.controllers > 1
                && self.clustered[home % self.controllers]
                && let Some((since, attempts)) = self.home_unreachable
                && attempts >= Self::HOME_ATTEMPTS
                && now.duration_since(since) >= Self::HOME_PATIENCE
            {
                tracing::warn!(
                    attempts,
                    "the controller whose tasks this agent holds stays unreachable: taking them \
                     to another controller"
                );
                self.given_up = Some(home);
                self.home_unreachable = None;
                self.next = home.wrapping_add(1);
                return self.backoff.next_delay();
            }

            self.next = home;
            match ended {
                session::Ended::AfterWelcome {
                    shutting_down: true,
                    ..
                } => self.backoff.reset(),
                session::Ended::AfterWelcome { lasted, .. } if *lasted > Self::HEALTHY => {
                    self.backoff.reset();
                }
                _ => {}
            }
            return self.backoff.next_delay();
        }
        self.home_unreachable = None;
        match ended {
            // A controller going away on purpose (an upgrade, a stop) will not take the agent
            // back soon: the next one in the list does, at once; the waits start over, as the
            // agent is not failing, it is being sent elsewhere.
            session::Ended::AfterWelcome {
                shutting_down: true,
                ..
            } => {
                self.next = self.next.wrapping_add(1);
                self.backoff.reset();
            }
            session::Ended::AfterWelcome { lasted, .. } => {
                if *lasted > Self::HEALTHY {
                    self.backoff.reset();
                }
            }
            session::Ended::BeforeWelcome(_) => {
                self.next = self.next.wrapping_add(1);
            }
        }
        self.backoff.next_delay()
    }
}

/// Whether the agent is its host's, or one of the many a process emulates
/// ([`EmulatedAgent`]).
#[derive(Debug)]
pub(crate) enum Presence {
    /// The host's agent: its certificate in files it renews, systemd told how it does, its
    /// address configured or found from the route to the controller.
    Host,
    /// One of many agents in one process: certificate in memory (not renewed), nothing told
    /// to systemd, the address it was given; the gates bound the handshakes in flight and the
    /// task requests being read across all of them.
    Emulated {
        ip: IpAddr,
        connect_gate: Arc<Semaphore>,
        /// Held while a task request is read: a request holds its script in full, and the
        /// process holds many agents.
        reading_gate: Arc<Semaphore>,
    },
}

/// Everything a connection needs; built once at start.
#[derive(Debug)]
pub(crate) struct AgentContext {
    pub agent_id: String,
    pub config: Arc<Config>,
    /// Runs the tasks' scripts: the executor, or an emulation.
    pub runner: Arc<dyn Runner>,
    pub slots: Arc<tokio::sync::Semaphore>,
    pub hostname: String,
    /// What the hello says: the agent's version and the protocol version it speaks.
    pub agent_version: String,
    pub protocol_version: u32,
    pub presence: Presence,
    /// Where tasks keep their output and result; `None` when it cannot be made (then output
    /// reaches the controller only while it is connected, and is counted as lost otherwise).
    pub spool: Option<spool::Spool>,
    /// The tasks this agent holds, whatever the connection.
    pub tasks: task::Tasks,
    /// The host id the controller last welcomed this agent with.
    bk_host_id: std::sync::atomic::AtomicI64,
    /// What connections are made with; replaced when the certificate is renewed.
    pub client_config: std::sync::Mutex<quinn::ClientConfig>,
    /// The controller (`host:port` as configured) of the current or last session.
    controller: std::sync::Mutex<String>,
    /// What `[metrics]` serves.
    pub metrics: metrics::AgentMetrics,
}

impl AgentContext {
    pub(crate) fn bk_host_id(&self) -> i64 {
        self.bk_host_id.load(std::sync::atomic::Ordering::Relaxed)
    }

    pub(crate) fn controller(&self) -> String {
        self.controller.lock().unwrap().clone()
    }

    fn set_controller(&self, controller: &str) {
        controller.clone_into(&mut self.controller.lock().unwrap());
    }

    pub(crate) fn set_bk_host_id(&self, bk_host_id: i64) {
        self.bk_host_id
            .store(bk_host_id, std::sync::atomic::Ordering::Relaxed);
    }

    /// Sets the status line systemd shows for the host's agent; an emulated one has none.
    pub(crate) fn tell_systemd(&self, status: impl FnOnce() -> String) {
        if matches!(self.presence, Presence::Host) {
            tell_systemd(&[sd_notify::NotifyState::Status(&status())]);
        }
    }
}

/// An agent that shares its process with many others, as `fleetrun-swarm` runs them: its
/// certificate in memory (never renewed), no spool (its tasks keep their output in memory), no
/// metrics listener, its scripts run by `runner`. Everything else, from the hello to the
/// delivery of results and the reconnects, is the agent's own session code.
#[derive(Debug)]
pub struct EmulatedAgent {
    pub agent_id: String,
    /// Reported in the hello.
    pub agent_version: String,
    /// The protocol version the hello asks for: [`fleetrun_proto::PROTOCOL_VERSION`], or an
    /// older one to emulate agents not yet upgraded.
    pub protocol_version: u32,
    /// What all the agents share: the controllers, server name, cloud area, task slots, limits.
    pub config: Arc<Config>,
    /// The address the agent reports.
    pub ip: IpAddr,
    pub client_config: quinn::ClientConfig,
    pub runner: Arc<dyn Runner>,
    /// Held from the start of a connection to the controller's answer to the hello.
    pub connect_gate: Arc<Semaphore>,
    /// Held while a task request is read.
    pub reading_gate: Arc<Semaphore>,
}

/// Tells how an [`EmulatedAgent`] does.
#[derive(Debug, Clone)]
pub struct AgentHandle(Arc<AgentContext>);

impl AgentHandle {
    /// Whether a controller welcomed the agent at least once.
    pub fn ever_welcomed(&self) -> bool {
        self.0.metrics.sessions() > 0
    }

    /// Whether the agent is connected and welcomed now.
    pub fn connected(&self) -> bool {
        self.0.metrics.connected()
    }

    /// Tasks that ended with a result.
    pub fn tasks_finished(&self) -> u64 {
        self.0.metrics.tasks_finished()
    }
}

impl EmulatedAgent {
    /// Starts the agent connecting through `endpoint`; it serves until `shutdown` fires.
    pub fn spawn(
        self,
        endpoint: quinn::Endpoint,
        shutdown: CancellationToken,
    ) -> (AgentHandle, tokio::task::JoinHandle<()>) {
        let ctx = Arc::new(AgentContext {
            spool: None,
            tasks: task::Tasks::default(),
            bk_host_id: std::sync::atomic::AtomicI64::new(0),
            client_config: std::sync::Mutex::new(self.client_config),
            controller: std::sync::Mutex::default(),
            metrics: metrics::AgentMetrics::default(),
            slots: Arc::new(Semaphore::new(self.config.max_concurrent_tasks)),
            hostname: self.agent_id.clone(),
            agent_id: self.agent_id,
            config: self.config,
            runner: self.runner,
            agent_version: self.agent_version,
            protocol_version: self.protocol_version,
            presence: Presence::Emulated {
                ip: self.ip,
                connect_gate: self.connect_gate,
                reading_gate: self.reading_gate,
            },
        });
        let serving = ctx.clone();
        let task = tokio::spawn(async move { serve(&serving, &endpoint, &shutdown).await });
        (AgentHandle(ctx), task)
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
    exec_config.staging = config.staging.exec_staging();
    let executor = Executor::new(exec_config).context("preparing to run scripts")?;
    let files = TlsFiles {
        ca: config.tls.ca.clone(),
        cert: config.tls.cert.clone(),
        key: config.tls.key.clone(),
    };
    let endpoint = fleetrun_net::client_endpoint(&files, config.bind, Timing::default())?;
    let client_config = fleetrun_net::quinn_client_config(&files, Timing::default())?;
    let hostname = config.hostname.clone().unwrap_or_else(system_hostname);
    // After the executor killed what a previous run left: a task found in the spool without a
    // result has no process any more.
    let work_dir = config.work_dir.clone();
    let (spool, tasks) = tokio::task::spawn_blocking(move || {
        let tasks = task::Tasks::default();
        let spool = match spool::Spool::open(&work_dir) {
            Ok(spool) => {
                tasks.recover(&spool);
                Some(spool)
            }
            Err(e) => {
                tracing::error!(
                    "cannot use the spool under {}: tasks keep their output in memory, and \
                     lose it if the agent restarts: {e}",
                    work_dir.display()
                );
                None
            }
        };
        (spool, tasks)
    })
    .await
    .context("opening the spool")?;
    let cgroups = executor.uses_cgroup();
    let ctx = Arc::new(AgentContext {
        spool,
        tasks,
        bk_host_id: std::sync::atomic::AtomicI64::new(0),
        client_config: std::sync::Mutex::new(client_config),
        controller: std::sync::Mutex::default(),
        metrics: metrics::AgentMetrics::default(),
        slots: Arc::new(tokio::sync::Semaphore::new(config.max_concurrent_tasks)),
        agent_id,
        config: Arc::new(config),
        runner: Arc::new(executor),
        hostname,
        agent_version: VERSION.to_owned(),
        protocol_version: fleetrun_proto::PROTOCOL_VERSION,
        presence: Presence::Host,
    });
    tracing::info!(
        agent_id = ctx.agent_id,
        controller = %ctx.config.controller,
        cgroups,
        limits = ?ctx.config.limits,
        "agent starting"
    );
    // Ready once it can run tasks: waiting for a controller that is down must not fail the
    // service's start; the status line says whether it is connected.
    tell_systemd(&[
        sd_notify::NotifyState::Ready,
        sd_notify::NotifyState::Status("connecting to the controller"),
    ]);

    if let Some(config) = ctx.config.metrics.clone() {
        let listener = metrics::bind(&config).await?;
        let serving = ctx.clone();
        let stop = shutdown.clone();
        tokio::spawn(async move {
            if let Err(e) = metrics::serve(serving, config, listener, stop).await {
                tracing::error!("metrics not served: {e:#}");
            }
        });
    }

    serve(&ctx, &endpoint, &shutdown).await;
    endpoint.close(
        fleetrun_proto::close_code::SHUTDOWN.into(),
        b"agent shutting down",
    );
    // Let the close reach the controller.
    let _ = tokio::time::timeout(Duration::from_secs(1), endpoint.wait_idle()).await;
    Ok(())
}

/// Connects to the configured controllers, one after the other as [`Failover`] decides, and
/// serves them until `shutdown` fires.
async fn serve(ctx: &Arc<AgentContext>, endpoint: &quinn::Endpoint, shutdown: &CancellationToken) {
    let controllers = ctx.config.controller.entries();
    let mut failover = Failover::new(controllers.len());
    let home = || {
        ctx.tasks
            .home(task::now_ms())
            .and_then(|home| controllers.iter().position(|c| *c == home))
    };
    // Tasks taken up from the spool go back to the controller that sent them.
    if let Some(home) = home() {
        failover.next = home;
    }
    loop {
        let target = &controllers[failover.current()];
        ctx.set_controller(target);
        ctx.metrics.set_connection(metrics::Connection::Connecting);
        let ended = tokio::select! {
            ended = session::connect_and_serve(ctx, endpoint, target) => ended,
            () = shutdown.cancelled() => break,
        };
        match &ended {
            session::Ended::AfterWelcome {
                lasted,
                reason,
                shutting_down,
                ..
            } => {
                tracing::warn!(
                    controller = target,
                    shutting_down,
                    "lost the controller after {lasted:?}: {reason}"
                );
                ctx.tell_systemd(|| {
                    format!("lost the controller {target}: {reason}; reconnecting")
                });
            }
            session::Ended::BeforeWelcome(reason) => {
                tracing::warn!(
                    controller = target,
                    "cannot connect to the controller: {reason}"
                );
                ctx.tell_systemd(|| format!("cannot connect to the controller {target}: {reason}"));
                if matches!(ctx.presence, Presence::Host)
                    && let Ok((_, end)) = enroll::validity(&ctx.config.tls.cert)
                    && end <= renew::now_secs()
                {
                    tracing::error!(
                        ended_secs_ago = renew::now_secs() - end,
                        "this agent's certificate has ended: the controller refuses it; enroll \
                         again with a new token (fleetrun-agent enroll --token ...)"
                    );
                }
            }
        }
        let home = home();
        let delay = failover.after(&ended, home);
        if let Some(home) = home.filter(|home| *home == failover.current()) {
            tracing::info!(
                controller = %controllers[home],
                "going back to the controller whose tasks this agent holds"
            );
        }
        ctx.metrics.set_connection(metrics::Connection::Waiting);
        ctx.metrics.reconnecting();
        tracing::info!(
            controller = %controllers[failover.current()],
            "reconnecting in {delay:?}"
        );
        tokio::select! {
            () = tokio::time::sleep(delay) => {}
            () = shutdown.cancelled() => break,
        }
    }
}

/// Tells systemd how the agent is doing (`Type=notify`); does nothing when systemd did not
/// start the process (no `NOTIFY_SOCKET`).
pub fn tell_systemd(states: &[sd_notify::NotifyState<'_>]) {
    if let Err(e) = sd_notify::notify(states) {
        tracing::warn!("cannot notify systemd: {e}");
    }
}

pub(crate) fn system_hostname() -> String {
    std::fs::read_to_string("/proc/sys/kernel/hostname")
        .map(|h| h.trim().to_owned())
        .unwrap_or_else(|_| "unknown".to_owned())
}

/// The address this host is targeted by: configured (or given, for an emulated agent), else
/// the one it reaches the controller from.
pub(crate) fn host_ip(ctx: &AgentContext, controller: SocketAddr) -> anyhow::Result<IpAddr> {
    let config = &ctx.config;
    if let Presence::Emulated { ip, .. } = ctx.presence {
        return Ok(ip);
    }
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

    fn ended(lasted_secs: u64, shutting_down: bool) -> session::Ended {
        session::Ended::AfterWelcome {
            lasted: Duration::from_secs(lasted_secs),
            reason: "closed".into(),
            shutting_down,
            clustered: false,
        }
    }

    /// A failover among `n` controllers that each said they are one of a cluster.
    fn in_cluster(n: usize) -> Failover {
        let mut failover = Failover::new(n);
        failover.clustered = vec![true; n];
        failover
    }

    #[test]
    fn a_controller_shutting_down_sends_the_agent_to_the_next_one_at_once() {
        let mut failover = Failover::new(3);
        // Some failures first: the waits have grown.
        for _ in 0..6 {
            failover.after(&session::Ended::BeforeWelcome("refused".into()), None);
        }
        assert_eq!(failover.current(), 0);
        let grown = failover.after(&ended(1, false), None);
        assert!(grown > Backoff::FIRST, "{grown:?}");
        assert_eq!(failover.current(), 0, "a lost connection retries the same");
        let delay = failover.after(&ended(1, true), None);
        assert_eq!(
            failover.current(),
            1,
            "shutdown moves to the next controller"
        );
        assert!(delay <= Backoff::FIRST, "{delay:?}");
        // The next one refuses: the one after it, with a growing wait.
        let first = failover.after(&session::Ended::BeforeWelcome("refused".into()), None);
        assert_eq!(failover.current(), 2);
        let mut last = first;
        for _ in 0..5 {
            last = failover.after(&session::Ended::BeforeWelcome("refused".into()), None);
        }
        assert!(last > first, "{first:?} then {last:?}");
        // Around the list.
        assert_eq!(failover.current(), 1);
    }

    #[test]
    fn an_agent_holding_tasks_goes_back_to_their_controller_after_a_shutdown() {
        let mut failover = Failover::new(3);
        failover.after(&session::Ended::BeforeWelcome("refused".into()), None);
        assert_eq!(failover.current(), 1);
        // Controller 1 sent tasks the agent holds, then shuts down: back to it, soon.
        let delay = failover.after(&ended(5, true), Some(1));
        assert_eq!(failover.current(), 1, "the tasks' controller, not the next");
        assert!(delay <= Backoff::FIRST, "{delay:?}");
        // It is still down: the agent keeps trying it, waiting longer each time.
        let mut last = delay;
        for _ in 0..6 {
            last = failover.after(&session::Ended::BeforeWelcome("refused".into()), Some(1));
            assert_eq!(failover.current(), 1);
        }
        assert!(last > Backoff::FIRST, "{last:?}");
        // The tasks' deadlines passed (no home any more): the next controller.
        failover.after(&session::Ended::BeforeWelcome("refused".into()), None);
        assert_eq!(failover.current(), 2);
    }

    #[test]
    fn an_agent_takes_its_tasks_elsewhere_when_their_controller_stays_unreachable() {
        let refused = || session::Ended::BeforeWelcome("refused".into());
        let start = std::time::Instant::now();
        let at = |secs: u64| start + Duration::from_secs(secs);
        let mut failover = in_cluster(3);
        failover.after_at(&ended(30, false), Some(1), at(0));
        assert_eq!(failover.current(), 1);
        // Unreachable, but not for long yet, or not in enough attempts: still home.
        failover.after_at(&refused(), Some(1), at(1));
        failover.after_at(&refused(), Some(1), at(2));
        assert_eq!(failover.current(), 1);
        failover.after_at(&refused(), Some(1), at(30));
        assert_eq!(failover.current(), 2, "home given up: the next controller");
        // That one welcomes the agent and takes the tasks; when it is lost, the agent does
        // not go back to the given-up home although the tasks still name it.
        failover.after_at(&ended(5, false), Some(1), at(35));
        assert_eq!(failover.current(), 2);
        failover.after_at(&refused(), Some(1), at(36));
        assert_eq!(
            failover.current(),
            0,
            "as without a home: the next of the list"
        );
        // A welcome from home in between starts its patience over.
        let mut failover = in_cluster(3);
        failover.after_at(&refused(), Some(1), at(0));
        failover.after_at(&refused(), Some(1), at(1));
        failover.after_at(&ended(1, false), Some(1), at(2));
        failover.after_at(&refused(), Some(1), at(30));
        assert_eq!(failover.current(), 1);
        // A task's new home (the controller that took it over) is followed at once.
        let mut failover = in_cluster(3);
        for secs in [0, 10, 20, 35] {
            failover.after_at(&refused(), Some(1), at(secs));
        }
        assert_eq!(failover.current(), 2);
        failover.after_at(&ended(1, false), Some(2), at(26));
        assert_eq!(failover.current(), 2);
        // With one controller there is nowhere else to go.
        let mut failover = in_cluster(1);
        for secs in [0, 10, 25, 60] {
            failover.after_at(&refused(), Some(0), at(secs));
            assert_eq!(failover.current(), 0);
        }
    }

    /// A standalone controller (no shared database) restarting for longer than the patience
    /// keeps its agents: no other controller knows its tasks, and one would kill them.
    #[test]
    fn a_standalone_home_is_not_given_up_however_long_it_stays_unreachable() {
        let refused = || session::Ended::BeforeWelcome("refused".into());
        let start = std::time::Instant::now();
        let at = |secs: u64| start + Duration::from_secs(secs);
        let mut failover = Failover::new(3);
        failover.next = 1;
        // Controller 1 welcomed the agent as a standalone one and sent it tasks.
        failover.after_at(&ended(30, false), Some(1), at(0));
        for secs in [1, 10, 30, 60, 300] {
            failover.after_at(&refused(), Some(1), at(secs));
            assert_eq!(failover.current(), 1, "still home at {secs} s");
        }
        // The same controller restarted as one of a cluster: given up when it stays away.
        let welcomed = session::Ended::AfterWelcome {
            lasted: Duration::from_secs(30),
            reason: "closed".into(),
            shutting_down: false,
            clustered: true,
        };
        failover.after_at(&welcomed, Some(1), at(400));
        for secs in [401, 410, 430] {
            failover.after_at(&refused(), Some(1), at(secs));
        }
        assert_eq!(failover.current(), 2);
    }

    #[test]
    fn a_single_controller_shutting_down_is_retried_soon() {
        let mut failover = Failover::new(1);
        for _ in 0..8 {
            failover.after(&ended(1, false), None);
        }
        let delay = failover.after(&ended(1, true), None);
        assert_eq!(failover.current(), 0);
        assert!(delay <= Backoff::FIRST, "{delay:?}");
    }

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
