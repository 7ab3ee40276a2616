//! `cargo xtask dist`: the Debian packages of the controller, the agent and the CLI, made by
//! cargo-deb from each crate's `[package.metadata.deb]`, into `target/dist/`.
//!
//! The three binaries are built by one `cargo build` (one lock, shared dependencies), then
//! packaged without building again: the agent's package first, because the controller's carries
//! it (`/usr/share/fleetrun/dist`, served by `/install.sh`); the CLI's after its man pages and
//! completions are written by the binary just built.

use std::{
    path::{Path, PathBuf},
    process::Command,
    time::Instant,
};

use anyhow::{Context, Result, bail, ensure};
use fleetrun_testkit::cluster::{cargo_command, workspace_root};

/// The cargo-deb release `.ci/run` installs (`cargo install cargo-deb --locked --version ...`);
/// older ones may read `[package.metadata.deb]` differently.
pub const CARGO_DEB_VERSION: &str = "3.8.0";

/// What `cargo xtask dist` is asked for.
#[derive(Debug, Clone)]
pub struct DistOptions {
    /// The cargo profile the binaries are built with: `release` for packages to ship, `dev` to
    /// reuse a debug build (the packaging test does).
    pub profile: String,
    /// Lighter compression: quicker, larger packages.
    pub fast: bool,
}

/// The packages made, by role.
#[derive(Debug, Clone)]
pub struct Packages {
    pub controller: PathBuf,
    pub agent: PathBuf,
    pub cli: PathBuf,
}

/// Where the packages go, whatever `CARGO_TARGET_DIR` says: the controller's package metadata
/// names the agent's package there.
pub fn dist_dir() -> PathBuf {
    workspace_root().join("target/dist")
}

/// The directory cargo puts the binaries of `profile` in.
fn profile_dir(profile: &str) -> PathBuf {
    let target = std::env::var_os("CARGO_TARGET_DIR")
        .map(PathBuf::from)
        .unwrap_or_else(|| workspace_root().join("target"));
    target.join(match profile {
        "dev" | "test" => "debug",
        "bench" => "release",
        other => other,
    })
}

fn run(cmd: &mut Command, what: &str) -> Result<String> {
    let output = cmd.output().with_context(|| format!("cannot run {what}"))?;
    if !output.status.success() {
        bail!(
            "{what} failed ({}):\n{}{}",
            output.status,
            String::from_utf8_lossy(&output.stdout),
            String::from_utf8_lossy(&output.stderr)
        );
    }
    Ok(String::from_utf8_lossy(&output.stdout).into_owned())
}

/// Fails, saying how to install it, unless cargo-deb is there.
fn check_cargo_deb() -> Result<()> {
    let found = cargo_command()
        .args(["deb", "--version"])
        .output()
        .ok()
        .filter(|o| o.status.success())
        .map(|o| String::from_utf8_lossy(&o.stdout).trim().to_owned());
    match found {
        Some(version) => {
            if !version.contains(CARGO_DEB_VERSION) {
                eprintln!(
                    "note: {version} found; the packages are made and tested with cargo-deb \
                     {CARGO_DEB_VERSION}"
                );
            }
            Ok(())
        }
        None => bail!(
            "cargo-deb is not installed: cargo install cargo-deb --locked --version {CARGO_DEB_VERSION}"
        ),
    }
}

/// Builds the three packages; returns their paths.
pub fn build(opts: &DistOptions) -> Result<Packages> {
    check_cargo_deb()?;
    let started = Instant::now();
    let out = dist_dir();
    // Stale packages of another version would be carried by the controller's package.
    if out.exists() {
        std::fs::remove_dir_all(&out).with_context(|| format!("emptying {}", out.display()))?;
    }
    std::fs::create_dir_all(out.join("cli/man"))?;

    run(
        cargo_command().args([
            "build",
            "--locked",
            "--profile",
            &opts.profile,
            "-p",
            "fleetrun-controller",
            "-p",
            "fleetrun-agent",
            "-p",
            "fleetrun-cli",
        ]),
        "cargo build",
    )?;
    let built = started.elapsed();

    let cli = profile_dir(&opts.profile).join("fleetrun");
    run(
        Command::new(&cli)
            .arg("man")
            .arg("--dir")
            .arg(out.join("cli/man")),
        "fleetrun man",
    )?;
    let bash = run(
        Command::new(&cli).args(["completions", "bash"]),
        "fleetrun completions",
    )?;
    std::fs::write(out.join("cli/fleetrun.bash"), bash)?;

    let agent = cargo_deb("fleetrun-agent", opts, &out)?;
    let cli = cargo_deb("fleetrun-cli", opts, &out)?;
    let controller = cargo_deb("fleetrun-controller", opts, &out)?;
    println!(
        "built in {:.1?}, packaged in {:.1?} ({} profile)",
        built,
        started.elapsed() - built,
        opts.profile
    );
    for deb in [&controller, &agent, &cli] {
        let size = std::fs::metadata(deb).map(|m| m.len()).unwrap_or(0);
        println!("{} ({:.1} MiB)", deb.display(), size as f64 / 1048576.0);
    }
    Ok(Packages {
        controller,
        agent,
        cli,
    })
}

/// Runs cargo-deb for `package` without building; returns the package it wrote.
fn cargo_deb(package: &str, opts: &DistOptions, out: &Path) -> Result<PathBuf> {
    let mut cmd = cargo_command();
    cmd.args(["deb", "--no-build", "--locked", "-p", package, "--profile"])
        .arg(&opts.profile)
        .arg("--output")
        .arg(out);
    if opts.fast {
        cmd.arg("--fast");
    }
    let stdout = run(&mut cmd, &format!("cargo deb -p {package}"))?;
    // cargo-deb prints the path of what it wrote as its last line.
    let path = stdout
        .lines()
        .rev()
        .map(str::trim)
        .find(|line| line.ends_with(".deb"))
        // Relative to the workspace root, where cargo_command runs it.
        .map(|line| workspace_root().join(line))
        .with_context(|| format!("cargo deb -p {package} named no package: {stdout}"))?;
    ensure!(
        path.is_file(),
        "cargo deb -p {package}: no {}",
        path.display()
    );
    Ok(path)
}
