//! `fleetrun-swarm`: N virtual agents in one process, each with its own QUIC connection and
//! certificate, running the agent's session code with an emulated executor (no fork). For
//! benchmarks only.

use std::{
    net::{IpAddr, Ipv4Addr, SocketAddr},
    path::PathBuf,
    process::ExitCode,
    time::Duration,
};

use clap::{ArgGroup, Parser};
use fleetrun_swarm::{Identities, Swarm, SwarmConfig};

/// Hosts N virtual fleetrun agents in one process. Their executor is EMULATED: tasks are
/// answered with exit code 0 and canned output; no script runs.
#[derive(Debug, Parser)]
#[command(version, group(ArgGroup::new("certs").required(true).args(["ca_key", "certs_dir"])))]
struct Args {
    /// The controller's QUIC address; repeated for several controllers sharing a database:
    /// agent i tries the (i mod N)-th first, then the following ones.
    #[arg(long, required = true)]
    controller: Vec<SocketAddr>,
    /// The name in the controller's certificate.
    #[arg(long, default_value = "fleetrun-controller")]
    server_name: String,
    /// The deployment's CA certificate (PEM).
    #[arg(long)]
    ca: PathBuf,
    /// The CA's key (PEM): issue one certificate per virtual agent.
    #[arg(long)]
    ca_key: Option<PathBuf>,
    /// Or: a directory of pre-issued `<name>.pem` / `<name>.key.pem` pairs.
    #[arg(long)]
    certs_dir: Option<PathBuf>,
    /// Virtual agents to run (with --certs-dir: at most this many; 0 for all).
    #[arg(long, default_value_t = 100)]
    agents: usize,
    /// Agent ids are <PREFIX><INDEX>.
    #[arg(long, default_value = "swarm-")]
    id_prefix: String,
    /// Index of the first agent, so that several swarms can add up to one fleet.
    #[arg(long, default_value_t = 1)]
    first_index: u32,
    /// Bytes of output every emulated script prints (`ok\n` repeated).
    #[arg(long, default_value_t = 3)]
    output_bytes: usize,
    /// Milliseconds every emulated script runs.
    #[arg(long, default_value_t = 0)]
    task_ms: u64,
    /// UDP sockets (quinn endpoints) the connections are spread over.
    #[arg(long, default_value_t = 8)]
    endpoints: usize,
    /// Local address to bind every endpoint to (default: 127.2.0.1, 127.2.0.2, … for a
    /// loopback controller, else any).
    #[arg(long)]
    bind: Option<IpAddr>,
    /// Agent i reports IP-BASE + i as its address.
    #[arg(long, default_value = "127.1.0.0")]
    ip_base: Ipv4Addr,
    /// Protocol version the agents speak (1 emulates agents not yet upgraded).
    #[arg(long, default_value_t = fleetrun_proto::PROTOCOL_VERSION)]
    protocol_version: u32,
    /// Cloud area every agent reports.
    #[arg(long, default_value_t = 0)]
    bk_cloud_id: i64,
    /// Handshakes in flight at once.
    #[arg(long, default_value_t = 64)]
    connect_concurrency: usize,
    /// Tasks each virtual agent runs at once.
    #[arg(long, default_value_t = 64)]
    max_concurrent_tasks: usize,
    /// Socket buffer size asked for each endpoint (capped by net.core.rmem_max / wmem_max).
    #[arg(long, default_value_t = 8 << 20)]
    socket_buffer: usize,
    /// QUIC keep-alive interval in ms (default: the real agent's, `Timing::default()`); 0 for
    /// none. For experiments only: anything but the default is not what a real agent does.
    #[arg(long, default_value_t = default_keep_alive_ms())]
    keep_alive_ms: u64,
    /// Concurrent task streams the controller may open per connection (default: the real
    /// agent's, `fleetrun_net::TASK_STREAMS_PER_AGENT`). quinn keeps an entry for each from the
    /// connection's start, so this is most of a virtual agent's memory. For experiments only.
    #[arg(long, default_value_t = fleetrun_net::TASK_STREAMS_PER_AGENT)]
    max_streams: u32,
    /// Task requests the whole swarm reads at once; the others wait in QUIC flow control. A
    /// large script is held in full while read, so this bounds the swarm's memory.
    #[arg(long, default_value_t = 256)]
    reading_requests: usize,
    /// Per-stream QUIC receive window in bytes (default: quinn's, as the real agent). For
    /// experiments only.
    #[arg(long)]
    stream_window: Option<u32>,
    /// Runtime worker threads (default: one per core).
    #[arg(long)]
    threads: Option<usize>,
}

/// The real agent's keep-alive interval, in ms.
fn default_keep_alive_ms() -> u64 {
    u64::try_from(fleetrun_net::Timing::default().keep_alive.as_millis()).unwrap_or(u64::MAX)
}

fn main() -> ExitCode {
    let args = Args::parse();
    tracing_subscriber::fmt()
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_env("FLEETRUN_LOG")
                .unwrap_or_else(|_| "warn".into()),
        )
        .with_ansi(std::io::IsTerminal::is_terminal(&std::io::stderr()))
        .with_writer(std::io::stderr)
        .init();
    let threads = args.threads.unwrap_or_else(|| {
        std::thread::available_parallelism()
            .map(|n| n.get())
            .unwrap_or(1)
    });
    let identities = match (&args.ca_key, &args.certs_dir) {
        (Some(ca_key), _) => Identities::Issue {
            ca_key: ca_key.clone(),
            prefix: args.id_prefix.clone(),
            first_index: args.first_index,
            count: args.agents,
        },
        (None, Some(dir)) => Identities::Dir {
            dir: dir.clone(),
            limit: if args.agents == 0 {
                usize::MAX
            } else {
                args.agents
            },
        },
        (None, None) => unreachable!("clap requires one of them"),
    };
    let config = SwarmConfig {
        controllers: args.controller.clone(),
        server_name: args.server_name,
        ca: args.ca,
        identities,
        output_bytes: args.output_bytes,
        task_time: Duration::from_millis(args.task_ms),
        endpoints: args.endpoints,
        bind: args.bind,
        ip_base: args.ip_base,
        bk_cloud_id: args.bk_cloud_id,
        connect_concurrency: args.connect_concurrency,
        max_concurrent_tasks: args.max_concurrent_tasks,
        socket_buffer: args.socket_buffer,
        threads,
        keep_alive: Some(Duration::from_millis(args.keep_alive_ms)),
        max_streams: args.max_streams,
        reading_requests: args.reading_requests,
        stream_window: args.stream_window,
        protocol_version: args.protocol_version,
    };
    let runtime = match tokio::runtime::Builder::new_multi_thread()
        .worker_threads(threads)
        .enable_all()
        .build()
    {
        Ok(rt) => rt,
        Err(e) => {
            eprintln!("cannot start the runtime: {e}");
            return ExitCode::FAILURE;
        }
    };
    runtime.block_on(async {
        let swarm = match Swarm::start(config).await {
            Ok(swarm) => swarm,
            Err(e) => {
                eprintln!("fleetrun-swarm: {e:#}");
                return ExitCode::FAILURE;
            }
        };
        println!(
            "swarm: {} virtual agents connecting to {} (emulated executor)",
            swarm.len(),
            args.controller
                .iter()
                .map(SocketAddr::to_string)
                .collect::<Vec<_>>()
                .join(", ")
        );
        let mut progress = tokio::time::interval(Duration::from_secs(5));
        progress.tick().await;
        let signal = shutdown_signal();
        tokio::pin!(signal);
        loop {
            tokio::select! {
                () = &mut signal => break,
                _ = progress.tick() => {
                    let welcomed = swarm.welcomed();
                    let online = swarm.online();
                    if welcomed < swarm.len() || online < swarm.len() {
                        println!("swarm: {welcomed} of {} welcomed, {online} online", swarm.len());
                    }
                }
            }
        }
        let tasks = swarm.tasks();
        swarm.shutdown().await;
        println!("swarm: stopped; {tasks} tasks answered by the emulated executor");
        ExitCode::SUCCESS
    })
}

async fn shutdown_signal() {
    use tokio::signal::unix::{SignalKind, signal};
    let mut term = signal(SignalKind::terminate()).expect("installing SIGTERM handler");
    tokio::select! {
        _ = tokio::signal::ctrl_c() => {}
        _ = term.recv() => {}
    }
}
