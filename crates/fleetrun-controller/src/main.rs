//! `fleetrun-controller --config FILE`: the daemon; `fleetrun-controller check-config --config
//! FILE`: the same file checked without starting anything; `fleetrun-controller hash-password`:
//! a console user's password hash, from a password read on standard input; `fleetrun-controller
//! ca init`: the enrollment CA.

use std::{path::PathBuf, process::ExitCode};

use clap::{CommandFactory, Parser, Subcommand};
use fleetrun_controller::{Config, Controller};

/// The fleetrun controller: bk-job-compatible API and the gateway agents connect to.
#[derive(Debug, Parser)]
#[command(version)]
struct Args {
    /// The configuration file (TOML).
    #[arg(long, short, env = "FLEETRUN_CONTROLLER_CONFIG", global = true)]
    config: Option<PathBuf>,
    #[command(subcommand)]
    command: Option<Command>,
}

#[derive(Debug, Subcommand)]
enum Command {
    /// Checks the configuration (and the TLS and inventory files it names) without starting:
    /// exits 0 with a summary when the controller would start with it, 78 with every problem
    /// found otherwise.
    CheckConfig,
    /// Writes a consistent copy of the database (taken while the controller runs), the
    /// parameter key, the configuration, TLS and inventory files into the new directory PATH,
    /// with a manifest of their SHA-256 digests. For PostgreSQL, prints the pg_dump procedure.
    Backup {
        /// A directory that does not exist yet (or is empty)
        path: PathBuf,
    },
    /// Puts the database and parameter key of the backup in PATH in place; the controller must
    /// be stopped. Every file's digest is checked first.
    Restore {
        /// A directory written by `backup`
        path: PathBuf,
    },
    /// Reads a password from standard input (one line) and prints its argon2 hash, for a
    /// console user's `password_hash`.
    HashPassword,
    /// The enrollment CA: `ca init` makes it (or imports an operator's intermediate CA)
    #[command(subcommand)]
    Ca(CaCommand),
    /// The audit trail: `audit rekey` starts a new key after the old one was lost; `audit
    /// reanchor` points the head anchor at the trail's end after a PostgreSQL restore
    #[command(subcommand)]
    Audit(AuditCommand),
}

#[derive(Debug, Subcommand)]
enum AuditCommand {
    /// Starts a new audit key when the old key file is lost (the controller refuses to start
    /// without it): the controller must be stopped and no key file may be in place. The
    /// replacement is recorded in the trail as an entry signed by the new key; the entries
    /// before it can from then on be checked for their links only.
    Rekey,
    /// Points the audit head anchor at the trail's last entry, with the controller stopped:
    /// after restoring a PostgreSQL dump (a SQLite `restore` does it itself), else the next
    /// start records the rewound trail as entries removed.
    Reanchor,
}

#[derive(Debug, Subcommand)]
enum CaCommand {
    /// Makes the CA that signs agents' certificates, 0600 beside the database (or where [enroll]
    /// ca_cert and ca_key say), and prints its pin. When the gateway's [tls] files do not exist
    /// yet, also writes the CA as [tls] ca and issues the gateway's certificate.
    Init {
        /// Import this CA certificate (PEM; an intermediate CA of the operator's) instead of
        /// making one
        #[arg(long, requires = "import_key", value_name = "PEM")]
        import_cert: Option<PathBuf>,
        /// The imported CA's key (PEM)
        #[arg(long, requires = "import_cert", value_name = "PEM")]
        import_key: Option<PathBuf>,
        /// Names agents reach the controller by (DNS names or IP addresses), for the gateway's
        /// certificate when it is issued here; fleetrun-controller is always one
        #[arg(long = "server-name", value_name = "NAME")]
        server_names: Vec<String>,
    },
}

/// sysexits' EX_CONFIG: the configuration is unusable.
const EXIT_CONFIG: u8 = 78;

fn main() -> ExitCode {
    let args = Args::parse();
    if let Some(Command::HashPassword) = args.command {
        let mut password = String::new();
        if let Err(e) = std::io::stdin().read_line(&mut password) {
            eprintln!("reading the password: {e}");
            return ExitCode::FAILURE;
        }
        let password = password.trim_end_matches(['\r', '\n']);
        if password.is_empty() {
            eprintln!("an empty password: type one on standard input");
            return ExitCode::FAILURE;
        }
        println!("{}", fleetrun_controller::console::hash_password(password));
        return ExitCode::SUCCESS;
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
        return match fleetrun_controller::check::check_config(&config_path) {
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
    if let Some(Command::Ca(CaCommand::Init {
        import_cert,
        import_key,
        server_names,
    })) = &args.command
    {
        return ca_init(&config_path, import_cert, import_key, server_names);
    }
    if let Some(Command::Audit(command)) = &args.command {
        return audit_command(&config_path, command);
    }
    if let Some(Command::Backup { path } | Command::Restore { path }) = &args.command {
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
        let done = runtime.block_on(async {
            match &args.command {
                Some(Command::Backup { .. }) => {
                    fleetrun_controller::backup::backup(&config_path, path).await
                }
                _ => fleetrun_controller::backup::restore(&config_path, path).await,
            }
        });
        return match done {
            Ok(summary) => {
                println!("{summary}");
                ExitCode::SUCCESS
            }
            Err(e) => {
                eprintln!("fleetrun-controller: {e:#}");
                ExitCode::FAILURE
            }
        };
    }
    fleetrun_net::daemon::init_logging();
    let config = match Config::load(&config_path) {
        Ok(config) => config,
        Err(e) => {
            tracing::error!("{e}");
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
    let code =
        runtime.block_on(async {
            let controller = match Controller::start(config).await {
                Ok(c) => c,
                Err(e) => {
                    tracing::error!("{e:#}");
                    // An inventory that does not load is a bad configuration like any other.
                    if e.is::<fleetrun_controller::inventory::InventoryLoadError>() {
                        return ExitCode::from(EXIT_CONFIG);
                    }
                    // So is an audit key or head anchor that cannot be read or written: a
                    // restart would fail alike.
                    if e.chain().any(|c| {
                        c.is::<fleetrun_controller::audit::AuditKeyError>()
                            || c.is::<fleetrun_controller::audit::AuditAnchorError>()
                    }) {
                        return ExitCode::from(EXIT_CONFIG);
                    }
                    return ExitCode::FAILURE;
                }
            };
            let mut hangup =
                match tokio::signal::unix::signal(tokio::signal::unix::SignalKind::hangup()) {
                    Ok(s) => s,
                    Err(e) => {
                        tracing::error!("cannot install the SIGHUP handler: {e}");
                        return ExitCode::FAILURE;
                    }
                };
            // Both listeners are bound: systemd may start what depends on the controller.
            tell_systemd(&[sd_notify::NotifyState::Ready]);
            let stop = fleetrun_net::daemon::shutdown_signal();
            tokio::pin!(stop);
            loop {
                tokio::select! {
                    () = &mut stop => break,
                    _ = hangup.recv() => {
                        match controller.reload_config(&config_path) {
                            Ok(changes) if changes.is_empty() => tracing::info!("configuration reloaded: apps unchanged"),
                            Ok(_) => {}
                            Err(e) => tracing::error!("configuration not reloaded, the one in force stays: {e}"),
                        }
                        if let Err(e) = controller.reload_inventory().await {
                            tracing::error!("inventory not reloaded, the previous one stays: {e}");
                        }
                        match controller.reload_agent_tls() {
                            Ok(()) => tracing::info!("gateway certificate reloaded: new agent connections and enrollments take it"),
                            Err(e) => tracing::error!("gateway certificate not reloaded, the one in force stays: {e}"),
                        }
                        match controller.reload_api_tls() {
                            Ok(true) => tracing::info!("API TLS certificate reloaded: a new certificate is in force"),
                            Ok(false) => {}
                            Err(e) => tracing::error!("API TLS not reloaded, the certificate in force stays: {e}"),
                        }
                    }
                }
            }
            tracing::info!("shutting down");
            tell_systemd(&[sd_notify::NotifyState::Stopping]);
            if controller.shutdown().await {
                ExitCode::SUCCESS
            } else {
                ExitCode::FAILURE
            }
        });
    // Work still blocked on a failing disk must not hold the process.
    runtime.shutdown_timeout(std::time::Duration::from_secs(1));
    code
}

/// Tells systemd how the service is doing (`Type=notify`); does nothing when systemd did not
/// start the process (no `NOTIFY_SOCKET`).
fn tell_systemd(states: &[sd_notify::NotifyState<'_>]) {
    if let Err(e) = sd_notify::notify(states) {
        tracing::warn!("cannot notify systemd: {e}");
    }
}

/// `ca init`: makes or imports the enrollment CA where the configuration says.
fn ca_init(
    config_path: &std::path::Path,
    import_cert: &Option<PathBuf>,
    import_key: &Option<PathBuf>,
    server_names: &[String],
) -> ExitCode {
    use fleetrun_controller::enroll::ca;
    let config = match Config::load(config_path) {
        Ok(config) => config,
        Err(e) => {
            eprintln!("{e}");
            return ExitCode::from(EXIT_CONFIG);
        }
    };
    let Some(enroll) = &config.enroll else {
        eprintln!(
            "{}: add an [enroll] section first: the CA is for enrolling hosts",
            config_path.display()
        );
        return ExitCode::from(EXIT_CONFIG);
    };
    let files = match enroll.ca_files(&config.database) {
        Ok(files) => files,
        Err(e) => {
            eprintln!("{e}");
            return ExitCode::from(EXIT_CONFIG);
        }
    };
    let source = match (import_cert, import_key) {
        (Some(cert), Some(key)) => ca::CaSource::Import {
            cert: cert.clone(),
            key: key.clone(),
        },
        _ => ca::CaSource::New,
    };
    match ca::init(&files, &source, &config.tls, server_names) {
        Ok(made) => {
            println!("CA certificate: {}", files.cert.display());
            println!(
                "CA key:         {} (0600: back it up, keep it secret)",
                files.key.display()
            );
            for path in &made.also_written {
                println!("also wrote:     {}", path.display());
            }
            println!("pin:            {}", made.pin);
            println!(
                "[tls] ca ({}) must hold this CA's certificate: the gateway checks agents' \
                 certificates against it",
                config.tls.ca.display()
            );
            ExitCode::SUCCESS
        }
        Err(e) => {
            eprintln!("fleetrun-controller ca init: {e}");
            ExitCode::FAILURE
        }
    }
}

/// `audit rekey` (the operator is the user running it) and `audit reanchor`.
fn audit_command(config_path: &std::path::Path, command: &AuditCommand) -> ExitCode {
    let config = match Config::load(config_path) {
        Ok(config) => config,
        Err(e) => {
            eprintln!("fleetrun-controller: {e:#}");
            return ExitCode::from(EXIT_CONFIG);
        }
    };
    let operator = std::env::var("SUDO_USER")
        .or_else(|_| std::env::var("USER"))
        .unwrap_or_default();
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
    let done = runtime.block_on(async {
        match command {
            AuditCommand::Rekey => fleetrun_controller::audit::rekey(&config, &operator).await,
            AuditCommand::Reanchor => {
                fleetrun_controller::audit::reanchor(&config)
                    .await
                    .map(|seq| match seq {
                        Some(seq) => format!(
                            "the audit head anchor {} names entry {seq}, the trail's last",
                            config.audit_anchor_file().display()
                        ),
                        None => format!(
                            "no audit key file at {}: nothing to anchor",
                            config.audit_key_file().display()
                        ),
                    })
            }
        }
    });
    match done {
        Ok(summary) => {
            println!("{summary}");
            ExitCode::SUCCESS
        }
        Err(e) => {
            eprintln!("fleetrun-controller: {e:#}");
            ExitCode::FAILURE
        }
    }
}
