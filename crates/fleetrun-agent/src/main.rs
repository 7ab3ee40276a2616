//! `fleetrun-agent --config FILE`: runs on every host.

use std::{path::PathBuf, process::ExitCode};

use clap::Parser;
use fleetrun_agent::Config;
use fleetrun_exec::SetupError;
use tokio_util::sync::CancellationToken;

/// The fleetrun agent: connects to the controller and runs the scripts it is sent.
#[derive(Debug, Parser)]
#[command(version)]
struct Args {
    /// The configuration file (TOML).
    #[arg(long, short, env = "FLEETRUN_AGENT_CONFIG")]
    config: PathBuf,
}

/// sysexits' EX_CONFIG: the configuration is unusable.
const EXIT_CONFIG: u8 = 78;

fn main() -> ExitCode {
    let args = Args::parse();
    tracing_subscriber::fmt()
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_env("FLEETRUN_LOG")
                .unwrap_or_else(|_| "info".into()),
        )
        .with_ansi(std::io::IsTerminal::is_terminal(&std::io::stderr()))
        .init();
    let config = match Config::load(&args.config) {
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

async fn shutdown_signal() {
    use tokio::signal::unix::{SignalKind, signal};
    let mut term = signal(SignalKind::terminate()).expect("installing SIGTERM handler");
    tokio::select! {
        _ = tokio::signal::ctrl_c() => {}
        _ = term.recv() => {}
    }
}
