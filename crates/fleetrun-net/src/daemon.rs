//! What the agent and the controller daemons share about running as a process: how they log and
//! which signals stop them.

/// Logs to stderr, filtered by `FLEETRUN_LOG` (default `info`); one JSON object per line when
/// `FLEETRUN_LOG_FORMAT=json` (for log collectors), else text.
pub fn init_logging() {
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

/// Resolves at the first SIGINT or SIGTERM.
pub async fn shutdown_signal() {
    use tokio::signal::unix::{SignalKind, signal};
    let mut term = signal(SignalKind::terminate()).expect("installing SIGTERM handler");
    tokio::select! {
        _ = tokio::signal::ctrl_c() => {}
        _ = term.recv() => {}
    }
}
