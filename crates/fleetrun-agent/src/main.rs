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
}

/// sysexits' EX_CONFIG: the configuration is unusable.
const EXIT_CONFIG: u8 = 78;

fn main() -> ExitCode {
    let args = Args::parse();
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
    init_logging();
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
            () = shutdown_signal() => {
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

/// Logs filtered by `FLEETRUN_LOG`; one JSON object per line when `FLEETRUN_LOG_FORMAT=json`
/// (for log collectors), else text.
fn init_logging() {
    let filter = tracing_subscriber::EnvFilter::try_from_env("FLEETRUN_LOG")
        .unwrap_or_else(|_| "info".into());
    let format = std::env::var("FLEETRUN_LOG_FORMAT").unwrap_or_default();
    let builder = tracing_subscriber::fmt().with_env_filter(filter);
    match format.as_str() {
        "json" => builder
            .json()
            .with_current_span(true)
            .with_span_list(false)
            .init(),
        "" | "text" => builder
            .with_ansi(std::io::IsTerminal::is_terminal(&std::io::stderr()))
            .init(),
        other => {
            builder.with_ansi(false).init();
            tracing::warn!(
                format = other,
                "FLEETRUN_LOG_FORMAT is neither \"text\" nor \"json\": logging text"
            );
        }
    }
}

async fn shutdown_signal() {
    use tokio::signal::unix::{SignalKind, signal};
    let mut term = signal(SignalKind::terminate()).expect("installing SIGTERM handler");
    tokio::select! {
        _ = tokio::signal::ctrl_c() => {}
        _ = term.recv() => {}
    }
}
