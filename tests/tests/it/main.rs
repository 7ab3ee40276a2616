//! fleetrun's integration tests, linked into one binary: each module starts the real controller and
//! agent binaries through `fleetrun_tests` and attacks or exercises one area.

mod agent_secrets;
mod agent_trust;
mod agent_workdir;
mod api;
mod api_input;
mod audit;
mod backup;
mod callbacks;
mod check_config;
mod cli;
mod cli_admin;
mod console;
mod console_browser;
mod database;
mod execution;
mod grants;
mod health;
mod host_tasks;
mod http_limits;
mod https;
mod inventory;
mod inventory_admin;
mod metrics;
mod observability;
mod parity;
mod pending_jobs;
mod reattach;
mod reattach_faults;
mod reload;
mod retention;
mod scope_leaks;
mod scripts;
mod sealed_params;
mod skeleton;
