//! `fleetrun`: the operator's command line for a fleetrun (bk-job compatible) controller.
//!
//! `fleetrun run` submits a script with `fast_execute_script` and follows the job live through
//! the controller's `stream_job` endpoint; `status`, `logs`, `jobs`, `kill` and `hosts` wrap the
//! companion APIs; `scripts` and `topology` wrap the script library and the inventory's tree;
//! `inventory`, `biz`, `bizset`, `node`, `groups`, `accounts` and the subcommands of `hosts`
//! administer the inventory, one revision per change. Exit statuses are in [`error::exit`] and
//! in `fleetrun --help`.

#![forbid(unsafe_code)]

mod admin;
mod age;
mod args;
mod audit;
mod client;
mod commands;
mod completions;
mod display;
mod error;
mod follow;
mod inventory;
mod library;
mod request;
mod rolling;
mod rules;
mod settings;
mod syntax;
mod tokens;
mod transfer;
mod view;

use std::{process::ExitCode, sync::atomic::Ordering};

use clap::Parser;

use crate::error::exit;

fn main() -> ExitCode {
    // clap exits by itself: 0 for --help and --version, 2 for a usage error.
    let cli = args::Cli::parse();
    // Generated from the command line's own definition: no settings, no controller.
    match &cli.command {
        args::Command::Completions { shell } => return completions::completions(*shell),
        args::Command::Man { dir } => return completions::man(dir.as_deref()),
        _ => {}
    }
    let runtime = match tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
    {
        Ok(runtime) => runtime,
        Err(e) => {
            eprintln!("fleetrun: cannot start: {e}");
            return ExitCode::FAILURE;
        }
    };
    let result = runtime.block_on(async {
        // The command's future is dropped when Ctrl-C wins, before anything is printed: that
        // takes the progress line away.
        tokio::select! {
            result = commands::dispatch(&cli) => Some(result),
            _ = tokio::signal::ctrl_c() => None,
        }
    });
    let code = match result {
        Some(Ok(code)) => code,
        Some(Err(e)) => {
            if e.worth_printing() {
                eprintln!("fleetrun: {e}");
            }
            e.exit_code()
        }
        None => {
            match commands::STARTED_JOB.load(Ordering::Relaxed) {
                0 => eprintln!("fleetrun: interrupted"),
                job => eprintln!(
                    "fleetrun: interrupted; job {job} keeps running \
                     (fleetrun logs {job} --follow, fleetrun kill {job})"
                ),
            }
            exit::INTERRUPTED
        }
    };
    ExitCode::from(code)
}
