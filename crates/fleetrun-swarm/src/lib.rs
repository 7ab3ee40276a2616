//! A swarm of virtual fleetrun agents in one process, for benchmarks (Salt's minionswarm idea).
//!
//! Every virtual agent has its own QUIC connection and its own certificate identity, and runs the
//! real agent's session code ([`fleetrun_agent::EmulatedAgent`]): hello, heartbeats, one task
//! per stream the controller opens, output kept and delivered, results held until stored,
//! reconnects with the agent's backoff. Only the executor is emulated ([`task`]): **no process
//! is forked**; every "script" exits 0 with `--output-bytes` of output (`ok\n` by default).
//! Figures taken with the swarm measure the controller and the agent's protocol code, not script
//! execution, and must be labelled as emulated.
//!
//! Scaling on a small machine: connections are spread over a few quinn endpoints (one UDP socket
//! each, on distinct loopback addresses `127.2.0.1`, `127.2.0.2`, … when the controller is on
//! loopback); quinn demultiplexes many connections per socket by connection id, so 10,000
//! connections need neither 10,000 sockets nor 10,000 endpoint drivers. Each agent still reports
//! its own address in its hello (`--ip-base` plus its index: `127.1.0.1`, `127.1.0.2`, …).
//! One key pair signs under all the certificates (see [`identity`]); handshakes run a bounded
//! number at a time.
//!
//! Several controllers sharing a database: agent `i` lists them all, starting from controller
//! `i mod N` (as the local cluster's real agents do), so that a swarm's agents spread evenly
//! over them and each fails over to the next.

pub mod identity;
mod task;

use std::{
    net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr},
    path::PathBuf,
    sync::Arc,
    time::{Duration, Instant},
};

use anyhow::{Context, Result, anyhow, ensure};
use fleetrun_agent::{AgentHandle, EmulatedAgent, Runner};
use quinn::crypto::rustls::QuicClientConfig;
use rustls::{RootCertStore, client::Resumption, crypto::CryptoProvider};
use rustls_pki_types::{CertificateDer, pem::PemObject};
use tokio::{sync::Semaphore, task::JoinSet};
use tokio_util::sync::CancellationToken;

use crate::{identity::Identity, task::EmulatedRunner};

/// The agent version the virtual agents report: the swarm's, marked as such.
const VERSION: &str = concat!(env!("CARGO_PKG_VERSION"), "-swarm");

/// Where the virtual agents' certificates come from.
#[derive(Debug, Clone)]
pub enum Identities {
    /// Issue `count` certificates from the CA whose key is `ca_key`, for the agents
    /// `<prefix><first_index>` … `<prefix><first_index + count - 1>`.
    Issue {
        ca_key: PathBuf,
        prefix: String,
        first_index: u32,
        count: usize,
    },
    /// Use the `<name>.pem` / `<name>.key.pem` pairs in `dir`, at most `limit`.
    Dir { dir: PathBuf, limit: usize },
}

#[derive(Debug, Clone)]
pub struct SwarmConfig {
    /// The controllers' QUIC addresses (at least one): agent `i` tries `controllers[i mod N]`
    /// first, then the following ones.
    pub controllers: Vec<SocketAddr>,
    /// The name in the controller's certificate.
    pub server_name: String,
    /// The CA that signed the controller's certificate (and issues the agents').
    pub ca: PathBuf,
    pub identities: Identities,
    /// Bytes of output every emulated script prints.
    pub output_bytes: usize,
    /// How long every emulated script runs.
    pub task_time: Duration,
    /// quinn endpoints (UDP sockets) the connections are spread over.
    pub endpoints: usize,
    /// Address the endpoints bind to; by default distinct loopback addresses for a loopback
    /// controller, else the unspecified address.
    pub bind: Option<IpAddr>,
    /// Agent `i` (counting from the first index) reports `ip_base + i` as its address.
    pub ip_base: Ipv4Addr,
    pub bk_cloud_id: i64,
    /// TLS handshakes (and hellos) in flight at once.
    pub connect_concurrency: usize,
    /// Tasks each virtual agent runs at once, as the real agent's `max_concurrent_tasks`.
    pub max_concurrent_tasks: usize,
    /// SO_RCVBUF / SO_SNDBUF asked for each endpoint's socket.
    pub socket_buffer: usize,
    /// Threads for certificate issuing.
    pub threads: usize,
    /// QUIC keep-alive interval; `None` for the real agent's (`Timing::default()`), zero for
    /// none.
    pub keep_alive: Option<Duration>,
    /// Task streams the controller may open at once on a connection (the real agent:
    /// [`fleetrun_net::TASK_STREAMS_PER_AGENT`]).
    /// quinn allocates state for every one of them when the connection is made.
    pub max_streams: u32,
    /// Task requests the swarm reads at once (each holds its script in full while read).
    pub reading_requests: usize,
    /// Per-stream receive window; `None` for quinn's default (the real agent's).
    pub stream_window: Option<u32>,
    /// The protocol version the virtual agents speak: [`fleetrun_proto::PROTOCOL_VERSION`], or
    /// an older one to check that a controller still serves agents not yet upgraded.
    pub protocol_version: u32,
}

/// A running swarm.
#[derive(Debug)]
pub struct Swarm {
    agents: Arc<Vec<AgentHandle>>,
    endpoints: Vec<quinn::Endpoint>,
    shutdown: CancellationToken,
    tasks: JoinSet<()>,
}

/// The real agent's QUIC transport settings (`fleetrun-net`'s), so the controller sees the same
/// keep-alives and stream limits from a virtual agent as from a real one, unless overridden for
/// an experiment.
fn transport(config: &SwarmConfig) -> Result<Arc<quinn::TransportConfig>> {
    let timing = fleetrun_net::Timing::default();
    let keep_alive = match config.keep_alive {
        None => Some(timing.keep_alive),
        Some(d) if d.is_zero() => None,
        Some(d) => Some(d),
    };
    let mut transport = quinn::TransportConfig::default();
    transport
        .max_idle_timeout(Some(timing.idle_timeout.try_into()?))
        .keep_alive_interval(keep_alive)
        .max_concurrent_bidi_streams(config.max_streams.into())
        .max_concurrent_uni_streams(0u32.into());
    if let Some(window) = config.stream_window {
        transport.stream_receive_window(window.into());
    }
    Ok(Arc::new(transport))
}

fn client_config(
    provider: &Arc<CryptoProvider>,
    roots: &Arc<RootCertStore>,
    transport: &Arc<quinn::TransportConfig>,
    identity: &Identity,
) -> Result<quinn::ClientConfig> {
    let mut tls = rustls::ClientConfig::builder_with_provider(provider.clone())
        .with_protocol_versions(&[&rustls::version::TLS13])?
        .with_root_certificates(roots.clone())
        .with_client_cert_resolver(Arc::new(identity::FixedCert(identity.key.clone())));
    tls.alpn_protocols = vec![fleetrun_proto::ALPN.to_vec()];
    // Each agent keeps its own few tickets: a ticket carries the identity it was issued to.
    tls.resumption = Resumption::in_memory_sessions(4);
    let crypto = QuicClientConfig::try_from(tls).context("QUIC client configuration")?;
    let mut config = quinn::ClientConfig::new(Arc::new(crypto));
    config.transport_config(transport.clone());
    Ok(config)
}

fn endpoint(bind: SocketAddr, buffer: usize) -> Result<quinn::Endpoint> {
    let socket = std::net::UdpSocket::bind(bind).with_context(|| format!("binding {bind}"))?;
    let sock = socket2::SockRef::from(&socket);
    // The kernel caps these at net.core.{r,w}mem_max; a smaller buffer is not an error.
    let _ = sock.set_recv_buffer_size(buffer);
    let _ = sock.set_send_buffer_size(buffer);
    let runtime = quinn::default_runtime().context("no async runtime for quinn")?;
    quinn::Endpoint::new(quinn::EndpointConfig::default(), None, socket, runtime)
        .with_context(|| format!("QUIC endpoint on {bind}"))
}

/// The controllers agent `index` lists, the one it tries first first.
pub fn controllers_of(controllers: &[SocketAddr], index: usize) -> Vec<SocketAddr> {
    let n = controllers.len();
    (0..n).map(|k| controllers[(index + k) % n]).collect()
}

fn bind_address(config: &SwarmConfig, index: usize) -> IpAddr {
    if let Some(ip) = config.bind {
        return ip;
    }
    // Every controller is on one host: the first says which kind of address to bind.
    let Some(controller) = config.controllers.first() else {
        return IpAddr::V4(Ipv4Addr::UNSPECIFIED);
    };
    match controller.ip() {
        IpAddr::V4(ip) if ip.is_loopback() => IpAddr::V4(Ipv4Addr::from(
            u32::from(Ipv4Addr::new(127, 2, 0, 1)) + index as u32,
        )),
        IpAddr::V6(ip) if ip.is_loopback() => IpAddr::V6(Ipv6Addr::LOCALHOST),
        IpAddr::V4(_) => IpAddr::V4(Ipv4Addr::UNSPECIFIED),
        IpAddr::V6(_) => IpAddr::V6(Ipv6Addr::UNSPECIFIED),
    }
}

impl Swarm {
    /// Makes the identities and endpoints and starts every virtual agent connecting.
    pub async fn start(config: SwarmConfig) -> Result<Self> {
        ensure!(config.endpoints >= 1, "at least one endpoint");
        ensure!(!config.controllers.is_empty(), "at least one controller");
        ensure!(
            config.connect_concurrency >= 1,
            "at least one connection at a time"
        );
        ensure!(
            config.max_concurrent_tasks >= 1,
            "at least one task at a time"
        );
        ensure!(
            config.reading_requests >= 1,
            "at least one request read at a time"
        );
        let provider = Arc::new(rustls::crypto::ring::default_provider());
        let issued = Instant::now();
        let (identities, first_index) = match &config.identities {
            Identities::Issue {
                ca_key,
                prefix,
                first_index,
                count,
            } => {
                let ids: Vec<String> = (0..*count)
                    .map(|i| format!("{prefix}{}", *first_index as usize + i))
                    .collect();
                let identities =
                    identity::issue(&provider, &config.ca, ca_key, &ids, config.threads)?;
                (identities, *first_index)
            }
            Identities::Dir { dir, limit } => (identity::load_dir(&provider, dir, *limit)?, 1),
        };
        println!(
            "swarm: {} agent certificates ready in {} ms",
            identities.len(),
            issued.elapsed().as_millis()
        );

        let mut roots = RootCertStore::empty();
        for cert in CertificateDer::pem_file_iter(&config.ca)
            .with_context(|| format!("reading {}", config.ca.display()))?
        {
            roots.add(cert.with_context(|| format!("reading {}", config.ca.display()))?)?;
        }
        let roots = Arc::new(roots);
        let transport = transport(&config)?;
        let endpoints = (0..config.endpoints)
            .map(|i| {
                endpoint(
                    SocketAddr::new(bind_address(&config, i), 0),
                    config.socket_buffer,
                )
            })
            .collect::<Result<Vec<_>>>()?;

        // What all the agents share but the order of their controllers; they use no file of
        // it: their certificates are in memory, they have no spool, and their runner stages
        // nothing.
        let shared = (0..config.controllers.len())
            .map(|first| {
                let controllers = fleetrun_agent::config::Controllers::new(
                    controllers_of(&config.controllers, first)
                        .iter()
                        .map(SocketAddr::to_string)
                        .collect(),
                )
                .map_err(|e| anyhow!("controller address: {e}"))?;
                Ok(Arc::new(fleetrun_agent::Config {
                    controller: controllers,
                    server_name: config.server_name.clone(),
                    bind: SocketAddr::new(bind_address(&config, 0), 0),
                    bk_cloud_id: config.bk_cloud_id,
                    ip: None,
                    hostname: None,
                    work_dir: PathBuf::from("/nonexistent/fleetrun-swarm"),
                    tls: fleetrun_agent::config::TlsConfig {
                        ca: config.ca.clone(),
                        cert: PathBuf::new(),
                        key: PathBuf::new(),
                    },
                    max_concurrent_tasks: config.max_concurrent_tasks,
                    cgroup_name: None,
                    limits: fleetrun_agent::limits::LocalLimits::default(),
                    metrics: None,
                    staging: fleetrun_agent::config::StagingConfig::default(),
                }))
            })
            .collect::<Result<Vec<_>>>()?;
        let runner: Arc<dyn Runner> = Arc::new(EmulatedRunner {
            output: b"ok\n"
                .iter()
                .copied()
                .cycle()
                .take(config.output_bytes)
                .collect::<Vec<u8>>()
                .into(),
            task_time: config.task_time,
        });
        let connect_gate = Arc::new(Semaphore::new(config.connect_concurrency));
        let reading_gate = Arc::new(Semaphore::new(config.reading_requests));
        let shutdown = CancellationToken::new();
        let mut tasks = JoinSet::new();
        let mut agents = Vec::with_capacity(identities.len());
        for (i, identity) in identities.iter().enumerate() {
            let index = first_index + i as u32;
            let agent = EmulatedAgent {
                agent_id: identity.agent_id.clone(),
                agent_version: VERSION.to_owned(),
                protocol_version: config.protocol_version,
                config: shared[index as usize % shared.len()].clone(),
                ip: IpAddr::V4(Ipv4Addr::from(
                    u32::from(config.ip_base).wrapping_add(index),
                )),
                client_config: client_config(&provider, &roots, &transport, identity)?,
                runner: runner.clone(),
                connect_gate: connect_gate.clone(),
                reading_gate: reading_gate.clone(),
            };
            let (handle, task) =
                agent.spawn(endpoints[i % endpoints.len()].clone(), shutdown.clone());
            tasks.spawn(async move {
                let _ = task.await;
            });
            agents.push(handle);
        }
        let agents = Arc::new(agents);
        tasks.spawn(report_welcomed(agents.clone(), Instant::now()));
        Ok(Self {
            agents,
            endpoints,
            shutdown,
            tasks,
        })
    }

    /// Agents in the swarm.
    pub fn len(&self) -> usize {
        self.agents.len()
    }

    pub fn is_empty(&self) -> bool {
        self.agents.is_empty()
    }

    /// Agents welcomed at least once.
    pub fn welcomed(&self) -> usize {
        self.agents.iter().filter(|a| a.ever_welcomed()).count()
    }

    /// Agents with a welcomed connection now.
    pub fn online(&self) -> usize {
        self.agents.iter().filter(|a| a.connected()).count()
    }

    /// Tasks answered with a result.
    pub fn tasks(&self) -> u64 {
        self.agents.iter().map(AgentHandle::tasks_finished).sum()
    }

    /// Closes every connection (as a shutting-down agent does) and waits briefly for the closes
    /// to reach the controller.
    pub async fn shutdown(mut self) {
        self.shutdown.cancel();
        for endpoint in &self.endpoints {
            endpoint.close(
                fleetrun_proto::close_code::SHUTDOWN.into(),
                b"agent shutting down",
            );
        }
        for endpoint in &self.endpoints {
            let _ = tokio::time::timeout(Duration::from_secs(1), endpoint.wait_idle()).await;
        }
        self.tasks.abort_all();
        while self.tasks.join_next().await.is_some() {}
    }
}

/// Says once when every agent has been welcomed, and how long after `since` (benchmarks wait
/// for this line). Agents are welcomed in any order; those before the first not yet welcomed are
/// not looked at again.
async fn report_welcomed(agents: Arc<Vec<AgentHandle>>, since: Instant) {
    let mut next = 0;
    let mut poll = tokio::time::interval(Duration::from_millis(20));
    loop {
        poll.tick().await;
        while agents.get(next).is_some_and(AgentHandle::ever_welcomed) {
            next += 1;
        }
        if next == agents.len() {
            println!(
                "swarm: all {next} virtual agents welcomed in {:.2} s (emulated executor: no process is forked)",
                since.elapsed().as_secs_f64()
            );
            return;
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn agents_start_from_controllers_in_turn_and_list_them_all() {
        let addr = |port| SocketAddr::from(([127, 0, 0, 1], port));
        let both = [addr(1), addr(2)];
        assert_eq!(controllers_of(&both, 0), [addr(1), addr(2)]);
        assert_eq!(controllers_of(&both, 1), [addr(2), addr(1)]);
        assert_eq!(controllers_of(&both, 10_001), [addr(2), addr(1)]);
        let firsts: Vec<SocketAddr> = (1..=10_000).map(|i| controllers_of(&both, i)[0]).collect();
        assert_eq!(firsts.iter().filter(|a| **a == addr(1)).count(), 5_000);
        assert_eq!(controllers_of(&[addr(7)], 3), [addr(7)]);
    }
}
