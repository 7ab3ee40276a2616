//! A swarm of virtual fleetrun agents in one process, for benchmarks (Salt's minionswarm idea).
//!
//! Every virtual agent has its own QUIC connection and its own certificate identity, and speaks
//! the real agent's protocol: `Hello` on a control stream, heartbeats every
//! `heartbeat_interval_ms`, one task per stream the controller opens, `Started`, `Output`,
//! `Finished`. Only the executor is emulated: **no process is forked**; every "script" exits 0
//! with `--output-bytes` of output (`ok\n` by default). Figures taken with the swarm measure the
//! controller and the protocol, not script execution, and must be labelled as emulated.
//!
//! Scaling on a small machine: connections are spread over a few quinn endpoints (one UDP socket
//! each, on distinct loopback addresses `127.2.0.1`, `127.2.0.2`, … when the controller is on
//! loopback); quinn demultiplexes many connections per socket by connection id, so 10,000
//! connections need neither 10,000 sockets nor 10,000 endpoint drivers. Each agent still reports
//! its own address in its hello (`--ip-base` plus its index: `127.1.0.1`, `127.1.0.2`, …).
//! One key pair signs under all the certificates (see [`identity`]); handshakes run a bounded
//! number at a time.

mod agent;
pub mod identity;
mod task;

use std::{
    net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr},
    path::PathBuf,
    sync::{
        Arc,
        atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering},
    },
    time::{Duration, Instant},
};

use anyhow::{Context, Result, ensure};
use quinn::crypto::rustls::QuicClientConfig;
use rustls::{RootCertStore, client::Resumption, crypto::CryptoProvider};
use rustls_pki_types::{CertificateDer, pem::PemObject};
use tokio::{sync::Semaphore, task::JoinSet};

use crate::{agent::VirtualAgent, identity::Identity};

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
    /// The controller's QUIC address.
    pub controller: SocketAddr,
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
    /// QUIC keep-alive interval; `None` for the real agent's (1 s), zero for none.
    pub keep_alive: Option<Duration>,
    /// Task streams the controller may open at once on a connection (the real agent: 1024).
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

/// Counters the swarm reports.
#[derive(Debug, Default)]
pub struct Stats {
    /// Agents welcomed at least once.
    pub welcomed: AtomicUsize,
    /// Agents with a welcomed connection now.
    pub online: AtomicUsize,
    /// Tasks answered with a result.
    pub tasks: AtomicU64,
}

/// What every virtual agent shares.
#[derive(Debug)]
pub(crate) struct Shared {
    controller: SocketAddr,
    server_name: String,
    bk_cloud_id: i64,
    protocol_version: u32,
    max_tasks: usize,
    task_time: Duration,
    output: Vec<u8>,
    connect_slots: Semaphore,
    /// Held while a task request is read.
    reading_slots: Semaphore,
    stopping: AtomicBool,
    stats: Stats,
    expected: usize,
    started: Instant,
}

impl Shared {
    /// An agent was welcomed for the first time.
    fn welcomed(&self) {
        let n = self.stats.welcomed.fetch_add(1, Ordering::Relaxed) + 1;
        if n == self.expected {
            println!(
                "swarm: all {n} virtual agents welcomed in {:.2} s (emulated executor: no process is forked)",
                self.started.elapsed().as_secs_f64()
            );
        }
    }
}

/// A running swarm.
#[derive(Debug)]
pub struct Swarm {
    shared: Arc<Shared>,
    endpoints: Vec<quinn::Endpoint>,
    agents: JoinSet<()>,
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

fn bind_address(config: &SwarmConfig, index: usize) -> IpAddr {
    if let Some(ip) = config.bind {
        return ip;
    }
    match config.controller.ip() {
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

        let shared = Arc::new(Shared {
            controller: config.controller,
            server_name: config.server_name.clone(),
            bk_cloud_id: config.bk_cloud_id,
            protocol_version: config.protocol_version,
            max_tasks: config.max_concurrent_tasks,
            task_time: config.task_time,
            output: b"ok\n"
                .iter()
                .copied()
                .cycle()
                .take(config.output_bytes)
                .collect(),
            connect_slots: Semaphore::new(config.connect_concurrency),
            reading_slots: Semaphore::new(config.reading_requests),
            stopping: AtomicBool::new(false),
            stats: Stats::default(),
            expected: identities.len(),
            started: Instant::now(),
        });
        let mut agents = JoinSet::new();
        for (i, identity) in identities.iter().enumerate() {
            let index = first_index + i as u32;
            let agent = VirtualAgent {
                agent_id: identity.agent_id.clone(),
                ip: IpAddr::V4(Ipv4Addr::from(
                    u32::from(config.ip_base).wrapping_add(index),
                )),
                client_config: client_config(&provider, &roots, &transport, identity)?,
                endpoint: endpoints[i % endpoints.len()].clone(),
            };
            agents.spawn(agent::run(shared.clone(), agent));
        }
        Ok(Self {
            shared,
            endpoints,
            agents,
        })
    }

    /// Agents in the swarm.
    pub fn len(&self) -> usize {
        self.shared.expected
    }

    pub fn is_empty(&self) -> bool {
        self.shared.expected == 0
    }

    pub fn stats(&self) -> &Stats {
        &self.shared.stats
    }

    /// Closes every connection (as a shutting-down agent does) and waits briefly for the closes
    /// to reach the controller.
    pub async fn shutdown(mut self) {
        self.shared.stopping.store(true, Ordering::Relaxed);
        for endpoint in &self.endpoints {
            endpoint.close(
                fleetrun_proto::close_code::SHUTDOWN.into(),
                b"agent shutting down",
            );
        }
        for endpoint in &self.endpoints {
            let _ = tokio::time::timeout(Duration::from_secs(1), endpoint.wait_idle()).await;
        }
        self.agents.abort_all();
        while self.agents.join_next().await.is_some() {}
    }
}
