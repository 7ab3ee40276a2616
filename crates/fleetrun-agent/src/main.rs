//! `fleetrun-agent --config FILE`: runs on every host; `fleetrun-agent check-config --config
//! FILE`: the same file checked without starting anything.

use std::{path::PathBuf, process::ExitCode};

use clap::{CommandFactory, Parser, Subcommand};
use fleetrun_agent::Config;
use fleetrun_exec::SetupError;
use tokio_util::sync::CancellationToken;

/// The fleetrun agent: connects to the controller and runs the scripts it is sent.
#[derive(Debug, Parser)]
#[command(version)]
struct Args {
    /// The configuration file (TOML).
    #[arg(long, short, env = "FLEETRUN_AGENT_CONFIG", global = true)]
    config: Option<PathBuf>,
    #[command(subcommand)]
    command: Option<Command>,
}

#[derive(Debug, Subcommand)]
enum Command {
    /// Checks the configuration (and the TLS files it names) without connecting: exits 0 with a
    /// summary when the agent would start with it, 78 with every problem found otherwise.
    CheckConfig,
    /// Enrolls this host with a join token: makes its key (0600, it never leaves the host), gets
    /// a certificate from the controller over TLS checked against the pinned CA, and writes the
    /// certificate, the CA and (unless --config names an existing file) the configuration
    Enroll(Box<EnrollArgs>),
}

#[derive(Debug, clap::Args)]
#[command(after_help = "\
Example:
  fleetrun-agent enroll --controller ctl.example:7443 --token frt-... --ca-pin sha256:...
  fleetrun-agent --config /etc/fleetrun-agent/agent.toml

Enrolling again with the same key (same --dir) gives the same agent id back.")]
struct EnrollArgs {
    /// The controller's gateway, HOST:PORT, or several separated by commas (tried in turn)
    #[arg(
        long,
        value_name = "HOST:PORT,...",
        value_delimiter = ',',
        required = true
    )]
    controller: Vec<String>,
    /// The join token `fleetrun tokens create` printed
    #[arg(long, env = "FLEETRUN_JOIN_TOKEN", hide_env_values = true)]
    token: String,
    /// The controller CA's fingerprint, sha256:<64 hex digits>, as `fleetrun tokens create`
    /// printed it
    #[arg(long, value_name = "sha256:HEX")]
    ca_pin: fleetrun_net::CaPin,
    /// Where the key, the certificate and the CA are kept
    #[arg(long, value_name = "DIR", default_value = "/etc/fleetrun-agent")]
    dir: PathBuf,
    /// Where scripts are staged (the configuration's work_dir)
    #[arg(long, value_name = "DIR", default_value = "/var/lib/fleetrun-agent")]
    work_dir: PathBuf,
    /// The name in the controller's certificate
    #[arg(long, default_value = "fleetrun-controller")]
    server_name: String,
    /// The local address to connect from (and the agent's bind address)
    #[arg(long, value_name = "IP")]
    bind: Option<std::net::IpAddr>,
    /// More addresses of this host, besides the one it reaches the controller from
    #[arg(long = "ip", value_name = "IP")]
    ips: Vec<std::net::IpAddr>,
    /// The hostname to report; by default the system's
    #[arg(long)]
    hostname: Option<String>,
}

/// sysexits' EX_CONFIG: the configuration is unusable.
const EXIT_CONFIG: u8 = 78;

fn main() -> ExitCode {
    let args = Args::parse();
    if let Some(Command::Enroll(enroll)) = &args.command {
        return enroll_host(args.config.clone(), enroll);
    }
    let Some(config_path) = args.config else {
        Args::command()
            .error(
                clap::error::ErrorKind::MissingRequiredArgument,
                "--config FILE is required",
            )
            .exit()
    };
    if let Some(Command::CheckConfig) = args.command {
        return match Config::check(&config_path) {
            Ok(summary) => {
                println!("{summary}");
                ExitCode::SUCCESS
            }
            Err(problems) => {
                for problem in problems {
                    eprintln!("{problem}");
                }
                ExitCode::from(EXIT_CONFIG)
            }
        };
    }
    fleetrun_net::daemon::init_logging();
    let config = match Config::load(&config_path) {
        Ok(config) => config,
        Err(e) => {
            tracing::error!("{e:#}");
            return ExitCode::from(EXIT_CONFIG);
        }
    };
    let runtime = match tokio::runtime::Runtime::new() {
        Ok(rt) => rt,
        Err(e) => {
            tracing::error!("cannot start the runtime: {e}");
            return ExitCode::FAILURE;
        }
    };
    runtime.block_on(async {
        let shutdown = CancellationToken::new();
        let mut agent = tokio::spawn(fleetrun_agent::run(config, shutdown.clone()));
        let joined = tokio::select! {
            () = fleetrun_net::daemon::shutdown_signal() => {
                tracing::info!("shutting down");
                fleetrun_agent::tell_systemd(&[sd_notify::NotifyState::Stopping]);
                shutdown.cancel();
                agent.await
            }
            joined = &mut agent => joined,
        };
        match joined {
            Ok(Ok(())) => ExitCode::SUCCESS,
            Ok(Err(e)) => {
                tracing::error!("{e:#}");
                if is_bad_configuration(&e) {
                    ExitCode::from(EXIT_CONFIG)
                } else {
                    ExitCode::FAILURE
                }
            }
            Err(e) => {
                tracing::error!("agent task failed: {e}");
                ExitCode::FAILURE
            }
        }
    })
}

/// Errors an operator fixes in the configuration (or the file system it
/// points at), not by restarting.
fn is_bad_configuration(error: &anyhow::Error) -> bool {
    matches!(
        error.downcast_ref::<SetupError>(),
        Some(SetupError::UntrustedWorkDir { .. })
    )
}

/// `enroll`: prints what was written and how to start the agent.
fn enroll_host(config: Option<PathBuf>, args: &EnrollArgs) -> ExitCode {
    let controllers = match fleetrun_agent::config::Controllers::new(args.controller.clone()) {
        Ok(controllers) => controllers,
        Err(e) => {
            eprintln!("--controller: {e}");
            return ExitCode::from(2);
        }
    };
    let options = fleetrun_agent::enroll::EnrollOptions {
        controllers,
        token: args.token.clone(),
        pin: args.ca_pin.clone(),
        config: config.unwrap_or_else(|| args.dir.join("agent.toml")),
        dir: args.dir.clone(),
        work_dir: args.work_dir.clone(),
        server_name: args.server_name.clone(),
        bind: args.bind,
        ips: args.ips.clone(),
        hostname: args.hostname.clone(),
    };
    let runtime = match tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
    {
        Ok(rt) => rt,
        Err(e) => {
            eprintln!("cannot start the runtime: {e}");
            return ExitCode::FAILURE;
        }
    };
    match runtime.block_on(fleetrun_agent::enroll::enroll(&options)) {
        Ok(outcome) => {
            let e = &outcome.enrolled;
            let module = e
                .bk_module_id
                .map(|m| format!(" module {m}"))
                .unwrap_or_default();
            println!(
                "enrolled as agent {} in business {}{module}, cloud area {}",
                e.agent_id, e.bk_biz_id, e.bk_cloud_id
            );
            println!(
                "key {} ({}), certificate {} (valid {} s more; renewed over the connection)",
                fleetrun_agent::enroll::key_path(&options.dir).display(),
                if outcome.key_made { "new" } else { "kept" },
                fleetrun_agent::enroll::cert_path(&options.dir).display(),
                (e.not_after_ms - now_ms()) / 1000
            );
            if outcome.config_written {
                println!("configuration written to {}", options.config.display());
            } else {
                println!(
                    "configuration {} exists: left as it is",
                    options.config.display()
                );
            }
            println!(
                "start it: fleetrun-agent --config {}",
                options.config.display()
            );
            ExitCode::SUCCESS
        }
        Err(e) => {
            eprintln!("fleetrun-agent enroll: {e:#}");
            ExitCode::FAILURE
        }
    }
}

fn now_ms() -> i64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.as_millis() as i64)
}
