//! The Debian packages, installed and removed on this machine: `cargo xtask dist` builds them
//! (from the debug build, quickly compressed), `dpkg -i` installs them, the files, the units
//! (`systemd-analyze verify`), the conffile and the controller's system user are checked, the
//! installed controller runs as that user on its shipped configuration and serves the agent
//! package it carries through `/install.sh`, then `dpkg -r` and `dpkg --purge` leave nothing.
//!
//! It changes this machine (packages, a system user), so it runs only when asked:
//! `cargo test -p fleetrun-tests --test it -- dist:: --ignored` (`.ci/run` does).

use std::{
    os::unix::{
        fs::{MetadataExt, PermissionsExt},
        process::CommandExt,
    },
    path::{Path, PathBuf},
    process::{Command, Output, Stdio},
    time::{Duration, Instant},
};

use anyhow::{Context, Result, bail, ensure};
use fleetrun_testkit::cluster::cargo_command;
use fleetrun_tests::{cluster, pki};

const PACKAGES: [&str; 3] = ["fleetrun-controller", "fleetrun-agent", "fleetrun"];

fn run(program: &str, args: &[&str]) -> Result<Output> {
    Command::new(program)
        .args(args)
        .stdin(Stdio::null())
        .output()
        .with_context(|| format!("running {program}"))
}

fn succeed(program: &str, args: &[&str]) -> Result<String> {
    let out = run(program, args)?;
    ensure!(
        out.status.success(),
        "{program} {args:?} failed ({}):\n{}{}",
        out.status,
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    Ok(String::from_utf8_lossy(&out.stdout).into_owned())
}

fn installed(package: &str) -> bool {
    run("dpkg-query", &["-W", "-f=${db:Status-Status}", package])
        .is_ok_and(|o| o.status.success() && !o.stdout.is_empty() && o.stdout != b"not-installed")
}

fn user_exists(name: &str) -> bool {
    run("getent", &["passwd", name]).is_ok_and(|o| o.status.success())
}

/// Purges the packages when the test ends, passed or not.
struct Purge;

impl Drop for Purge {
    fn drop(&mut self) {
        let _ = run("dpkg", &["--purge", PACKAGES[0], PACKAGES[1], PACKAGES[2]]);
    }
}

fn sha256_hex(path: &Path) -> Result<String> {
    let bytes = std::fs::read(path)?;
    Ok(hex::encode(ring::digest::digest(
        &ring::digest::SHA256,
        &bytes,
    )))
}

/// The tests that install packages take turns: dpkg has one lock, and each checks what is
/// installed.
static INSTALLING: std::sync::Mutex<()> = std::sync::Mutex::new(());

/// `cargo xtask dist` from the debug build; the controller's, the agent's and the CLI's
/// packages.
fn build_packages() -> Result<[PathBuf; 3]> {
    let started = Instant::now();
    let out = cargo_command()
        .args(["xtask", "dist", "--profile", "dev", "--fast"])
        .output()
        .context("running cargo xtask dist")?;
    ensure!(
        out.status.success(),
        "cargo xtask dist failed:\n{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    println!(
        "cargo xtask dist --profile dev --fast: {:.1?}\n{}",
        started.elapsed(),
        String::from_utf8_lossy(&out.stdout)
    );
    let dist = xtask::dist::dist_dir();
    let find = |prefix: &str| -> Result<PathBuf> {
        let mut found = Vec::new();
        for entry in std::fs::read_dir(&dist)? {
            let name = entry?.file_name().to_string_lossy().into_owned();
            if name.starts_with(prefix) && name.ends_with(".deb") {
                found.push(dist.join(name));
            }
        }
        ensure!(
            found.len() == 1,
            "{prefix}*.deb in {}: {found:?}",
            dist.display()
        );
        Ok(found.remove(0))
    };
    Ok([
        find("fleetrun-controller_")?,
        find("fleetrun-agent_")?,
        find("fleetrun_")?,
    ])
}

#[test]
#[ignore = "installs packages and a system user on this machine: run with --ignored (.ci/run does)"]
fn packages_install_run_and_remove_cleanly() -> Result<()> {
    let _turn = INSTALLING.lock().unwrap_or_else(|e| e.into_inner());
    for package in PACKAGES {
        ensure!(
            !installed(package),
            "{package} is installed on this machine; the test installs and purges its own: \
             dpkg --purge {package} first"
        );
    }
    ensure!(
        !user_exists("fleetrun"),
        "a user named fleetrun exists; the test checks that the package makes it"
    );

    let [controller_deb, agent_deb, cli_deb] = build_packages()?;

    let _purge = Purge;
    let started = Instant::now();
    succeed(
        "dpkg",
        &[
            "-i",
            controller_deb.to_str().unwrap(),
            agent_deb.to_str().unwrap(),
            cli_deb.to_str().unwrap(),
        ],
    )?;
    println!("dpkg -i of the three packages: {:.1?}", started.elapsed());

    // The files.
    let agent_name = agent_deb.file_name().unwrap().to_str().unwrap().to_owned();
    let carried = PathBuf::from("/usr/share/fleetrun/dist").join(&agent_name);
    for path in [
        "/usr/bin/fleetrun-controller",
        "/usr/bin/fleetrun-agent",
        "/usr/bin/fleetrun",
        "/usr/lib/systemd/system/fleetrun-controller.service",
        "/usr/lib/systemd/system/fleetrun-agent.service",
        "/usr/lib/sysctl.d/60-fleetrun-controller.conf",
        "/usr/share/doc/fleetrun-agent/agent.toml.example",
        "/usr/share/bash-completion/completions/fleetrun",
        carried.to_str().unwrap(),
    ] {
        ensure!(Path::new(path).is_file(), "{path} is not installed");
    }
    // cargo-deb compresses man pages (newer versions), or ships them as they are.
    ensure!(
        [
            "/usr/share/man/man1/fleetrun.1.gz",
            "/usr/share/man/man1/fleetrun.1"
        ]
        .iter()
        .any(|p| Path::new(p).is_file()),
        "the fleetrun man page is not installed"
    );
    ensure!(
        sha256_hex(&carried)? == sha256_hex(&agent_deb)?,
        "the controller carries another agent package than the one built"
    );
    for (binary, says) in [
        ("/usr/bin/fleetrun-controller", "fleetrun-controller"),
        ("/usr/bin/fleetrun-agent", "fleetrun-agent"),
        ("/usr/bin/fleetrun", "fleetrun"),
    ] {
        let version = succeed(binary, &["--version"])?;
        ensure!(version.starts_with(says), "{binary} --version: {version}");
    }

    // The system user, and the configuration only it (and root) may read.
    let passwd = succeed("getent", &["passwd", "fleetrun"])?;
    let fields: Vec<&str> = passwd.trim().split(':').collect();
    let uid: u32 = fields[2].parse()?;
    ensure!(uid < 1000, "fleetrun is not a system user: {passwd}");
    ensure!(fields[5] == "/var/lib/fleetrun", "home: {passwd}");
    ensure!(
        fields[6].ends_with("nologin") || fields[6] == "/bin/false",
        "shell: {passwd}"
    );
    let conf = std::fs::metadata("/etc/fleetrun/controller.toml")?;
    ensure!(
        conf.permissions().mode() & 0o777 == 0o640,
        "mode {:o}",
        conf.permissions().mode()
    );
    ensure!(conf.uid() == 0, "owner {}", conf.uid());
    let group = succeed("getent", &["group", "fleetrun"])?;
    let gid: u32 = group.split(':').nth(2).context("gid")?.parse()?;
    ensure!(
        conf.gid() == gid,
        "the configuration's group is not fleetrun"
    );
    let conffiles = succeed(
        "dpkg-query",
        &["-W", "-f=${Conffiles}", "fleetrun-controller"],
    )?;
    ensure!(
        conffiles.contains("/etc/fleetrun/controller.toml"),
        "conffiles: {conffiles}"
    );
    let agent_conffiles = succeed("dpkg-query", &["-W", "-f=${Conffiles}", "fleetrun-agent"])?;
    ensure!(
        agent_conffiles.trim().is_empty(),
        "enrollment writes the agent's: {agent_conffiles}"
    );

    // The units, as systemd reads them: no error, no warning.
    let verify = run(
        "systemd-analyze",
        &[
            "verify",
            "/usr/lib/systemd/system/fleetrun-controller.service",
            "/usr/lib/systemd/system/fleetrun-agent.service",
        ],
    )?;
    let warnings = String::from_utf8_lossy(&verify.stderr);
    ensure!(
        verify.status.success() && warnings.trim().is_empty(),
        "systemd-analyze verify ({}): {warnings}",
        verify.status
    );
    let unit = std::fs::read_to_string("/usr/lib/systemd/system/fleetrun-controller.service")?;
    for line in [
        "Type=notify",
        "User=fleetrun",
        "ProtectSystem=strict",
        "NoNewPrivileges=yes",
    ] {
        ensure!(
            unit.lines().any(|l| l == line),
            "the controller's unit lacks {line}"
        );
    }
    let unit = std::fs::read_to_string("/usr/lib/systemd/system/fleetrun-agent.service")?;
    ensure!(
        unit.lines().any(|l| l == "Type=notify"),
        "the agent's unit is not Type=notify"
    );
    ensure!(
        !unit.lines().any(|l| l.starts_with("User=")),
        "the agent runs as root"
    );
    // A task running as another account reaches its staged script through work_dir.
    ensure!(
        unit.lines().any(|l| l == "StateDirectoryMode=0711"),
        "the agent's work directory does not let task accounts through"
    );

    installed_controller_serves_the_agent_package(&carried)?;

    // What the running services and enrollment leave: kept by dpkg -r, gone after --purge.
    let state = [
        "/var/lib/fleetrun/controller.db",
        "/etc/fleetrun/tls/ca.pem",
        "/var/lib/fleetrun-agent/tasks/.kept",
        "/etc/fleetrun/agent.toml",
        "/etc/fleetrun/agent/agent.key.pem",
    ];
    for path in state {
        std::fs::create_dir_all(Path::new(path).parent().unwrap())?;
        std::fs::write(path, b"state")?;
    }

    // Removal: the programs and units go, the configuration, the state and the user stay.
    succeed("dpkg", &["-r", PACKAGES[0], PACKAGES[1], PACKAGES[2]])?;
    for path in state {
        ensure!(Path::new(path).is_file(), "dpkg -r removed {path}");
    }
    for path in [
        "/usr/bin/fleetrun-controller",
        "/usr/bin/fleetrun-agent",
        "/usr/bin/fleetrun",
        "/usr/lib/systemd/system/fleetrun-controller.service",
        "/usr/lib/systemd/system/fleetrun-agent.service",
        "/usr/share/fleetrun",
    ] {
        ensure!(!Path::new(path).exists(), "{path} is left after dpkg -r");
    }
    ensure!(
        Path::new("/etc/fleetrun/controller.toml").exists(),
        "dpkg -r removed the conffile"
    );
    ensure!(user_exists("fleetrun"), "dpkg -r removed the user");

    // Purge: nothing is left.
    succeed("dpkg", &["--purge", PACKAGES[0], PACKAGES[1], PACKAGES[2]])?;
    for path in [
        "/etc/fleetrun",
        "/var/lib/fleetrun",
        "/var/lib/fleetrun-agent",
    ] {
        ensure!(
            !Path::new(path).exists(),
            "{path} is left after dpkg --purge"
        );
    }
    ensure!(
        !user_exists("fleetrun"),
        "the fleetrun user is left after dpkg --purge"
    );
    ensure!(
        !run("getent", &["group", "fleetrun"])?.status.success(),
        "the fleetrun group is left after dpkg --purge"
    );
    for package in PACKAGES {
        ensure!(!installed(package), "{package} is still known to dpkg");
    }
    Ok(())
}

/// Runs the installed controller as its user, on the shipped configuration with ports, database
/// and TLS files of the test's own, and checks `/install.sh` and the package it names.
fn installed_controller_serves_the_agent_package(carried: &Path) -> Result<()> {
    let dir = tempfile::Builder::new()
        .prefix("fleetrun-dist-")
        .tempdir()?;
    let ca = pki::Ca::open_or_create(&dir.path().join("certs"), "dist test CA")?;
    let cert = ca.issue_controller()?;
    let http_port = cluster::free_port()?;
    let agent_port = cluster::free_port()?;
    let mut config = std::fs::read_to_string("/etc/fleetrun/controller.toml")?;
    for (from, to) in [
        (
            "127.0.0.1:8080".to_owned(),
            format!("127.0.0.1:{http_port}"),
        ),
        ("0.0.0.0:7000".to_owned(), format!("127.0.0.1:{agent_port}")),
        (
            "sqlite:///var/lib/fleetrun/controller.db".to_owned(),
            format!("sqlite://{}/state/controller.db", dir.path().display()),
        ),
        (
            "/etc/fleetrun/tls/ca.pem".to_owned(),
            ca.cert_path().display().to_string(),
        ),
        (
            "/etc/fleetrun/tls/controller.pem".to_owned(),
            cert.cert.display().to_string(),
        ),
        (
            "/etc/fleetrun/tls/controller.key".to_owned(),
            cert.key.display().to_string(),
        ),
        (
            "# url = \"https://controller.example:8443\"".to_owned(),
            "url = \"https://ctl.example:8443\"".to_owned(),
        ),
        (
            "# agent_controllers = [\"controller.example:7000\"]".to_owned(),
            "agent_controllers = [\"ctl.example:7000\"]".to_owned(),
        ),
    ] {
        ensure!(
            config.contains(&from),
            "the shipped configuration has no {from}"
        );
        config = config.replace(&from, &to);
    }
    let config_path = dir.path().join("controller.toml");
    std::fs::write(&config_path, config)?;
    std::fs::create_dir(dir.path().join("state"))?;
    succeed(
        "chown",
        &["-R", "fleetrun:fleetrun", dir.path().to_str().unwrap()],
    )?;
    std::fs::set_permissions(dir.path(), std::fs::Permissions::from_mode(0o700))?;

    let log_path = dir.path().join("controller.log");
    let log = std::fs::File::create(&log_path)?;
    let passwd = succeed("getent", &["passwd", "fleetrun"])?;
    let ids: Vec<u32> = passwd
        .split(':')
        .skip(2)
        .take(2)
        .map(str::parse)
        .collect::<Result<_, _>>()?;
    let mut controller = Command::new("/usr/bin/fleetrun-controller")
        .arg("--config")
        .arg(&config_path)
        .uid(ids[0])
        .gid(ids[1])
        .stdin(Stdio::null())
        .stdout(log.try_clone()?)
        .stderr(log)
        .spawn()?;
    let served = (|| -> Result<()> {
        let runtime = tokio::runtime::Runtime::new()?;
        runtime.block_on(async {
            let base = format!("http://127.0.0.1:{http_port}");
            let http = reqwest::Client::new();
            let deadline = Instant::now() + Duration::from_secs(30);
            let script = loop {
                if let Ok(reply) = http.get(format!("{base}/install.sh")).send().await
                    && reply.status().is_success()
                {
                    break reply.text().await?;
                }
                if let Some(status) = controller.try_wait()? {
                    bail!("the installed controller exited ({status})");
                }
                ensure!(
                    Instant::now() < deadline,
                    "the installed controller never answered"
                );
                tokio::time::sleep(Duration::from_millis(100)).await;
            };
            ensure!(script.starts_with("#!/bin/sh\n"), "{script}");
            ensure!(
                script.contains("url='https://ctl.example:8443'"),
                "{script}"
            );
            ensure!(
                script.contains("controllers='ctl.example:7000'"),
                "{script}"
            );
            let arch = succeed("dpkg", &["--print-architecture"])?;
            let name = carried.file_name().unwrap().to_str().unwrap();
            let want = sha256_hex(carried)?;
            let line = format!("    '{}') pkg='{name}'; sum='{want}' ;;", arch.trim());
            ensure!(
                script.lines().any(|l| l == line),
                "no line {line:?} in\n{script}"
            );
            let deb = http.get(format!("{base}/dist/{name}")).send().await?;
            ensure!(
                deb.status().is_success(),
                "GET /dist/{name}: {}",
                deb.status()
            );
            let body = deb.bytes().await?;
            ensure!(
                hex::encode(ring::digest::digest(&ring::digest::SHA256, &body)) == want,
                "the package served differs from the one installed"
            );
            let script_file =
                std::env::temp_dir().join(format!("fleetrun-install-{}.sh", std::process::id()));
            std::fs::write(&script_file, &script)?;
            let syntax = run("sh", &["-n", script_file.to_str().unwrap()]);
            let _ = std::fs::remove_file(&script_file);
            ensure!(syntax?.status.success(), "the script is not valid sh");
            Ok(())
        })
    })();
    let _ = controller.kill();
    let _ = controller.wait();
    served.with_context(|| {
        format!(
            "controller log:\n{}",
            std::fs::read_to_string(&log_path).unwrap_or_default()
        )
    })
}

/// `/install.sh` and `/dist/` on a real controller: 404 without `[dist]`; with it, the newest
/// package of each architecture with its digest, the package's bytes, and nothing else of the
/// directory, whatever the name asked for; a `Host` that would break out of the script is
/// refused; the script refuses bad arguments before it does anything.
#[tokio::test(flavor = "multi_thread")]
async fn install_script_and_packages_are_served_and_nothing_else() -> Result<()> {
    let mut cluster = fleetrun_tests::start_cluster(0).await?;
    let base = cluster.info.api_url.trim_end_matches('/').to_owned();
    let http = reqwest::Client::new();
    let reply = http.get(format!("{base}/install.sh")).send().await?;
    assert_eq!(reply.status(), 404);
    assert!(reply.text().await?.contains("set [dist] dir"));

    let packages = cluster.dir().join("packages");
    std::fs::create_dir(&packages)?;
    let old = packages.join("fleetrun-agent_0.0.9-1_amd64.deb");
    std::fs::write(&old, b"an older agent package")?;
    // Modification times a second apart, whatever the file system's resolution.
    let old_file = std::fs::File::options().write(true).open(&old)?;
    old_file.set_modified(std::time::SystemTime::now() - Duration::from_secs(60))?;
    let new = packages.join("fleetrun-agent_0.1.0-1_amd64.deb");
    std::fs::write(&new, b"the newer agent package")?;
    let arm = packages.join("fleetrun-agent_0.1.0-1_arm64.deb");
    std::fs::write(&arm, b"an arm64 agent package")?;
    std::fs::write(packages.join("secret.txt"), b"not a package")?;
    // A link in the directory is neither listed nor served, whatever it points to.
    std::os::unix::fs::symlink(
        cluster.dir().join("fleetrun-agent_0.1.0-1_amd64.deb"),
        packages.join("fleetrun-agent_0.1.0-1_riscv64.deb"),
    )?;
    std::fs::write(
        cluster.dir().join("fleetrun-agent_0.1.0-1_amd64.deb"),
        b"outside the directory",
    )?;
    cluster.stop_controller(Duration::from_secs(10))?;
    let mut config = std::fs::read_to_string(&cluster.controller_config)?;
    config.push_str(&format!(
        "\n[dist]\ndir = \"{}\"\nagent_controllers = [\"ctl.example:7000\", \"10.0.0.2:7000\"]\n",
        packages.display()
    ));
    std::fs::write(&cluster.controller_config, config)?;
    cluster.start_controller().await?;

    // The API is plain http and [dist] names no https address: the script would come over
    // plain http and run as root, so it is refused, as a script that fails saying why.
    let reply = http.get(format!("{base}/install.sh")).send().await?;
    assert_eq!(reply.status(), 403);
    let refusal = reply.text().await?;
    let file = cluster.dir().join("refusal.sh");
    std::fs::write(&file, &refusal)?;
    let out = Command::new("sh").arg(&file).output()?;
    assert_eq!(out.status.code(), Some(1), "{refusal}");
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(stderr.contains("plain http"), "{stderr}");
    assert!(stderr.contains("[dist] url"), "{stderr}");
    let reply = http
        .get(format!("{base}/install.sh"))
        .header("host", "ctl.example'$(reboot)'")
        .send()
        .await?;
    assert_eq!(reply.status(), 400);
    assert!(reply.text().await?.contains("set [dist] url"));

    // With the https address hosts reach the API at (a TLS-terminating proxy in front).
    cluster.stop_controller(Duration::from_secs(10))?;
    let mut config = std::fs::read_to_string(&cluster.controller_config)?;
    config.push_str("url = \"https://ctl.example:8443\"\n");
    std::fs::write(&cluster.controller_config, config)?;
    cluster.start_controller().await?;
    let public = "https://ctl.example:8443";

    let script = http.get(format!("{base}/install.sh")).send().await?;
    assert_eq!(script.status(), 200);
    assert_eq!(
        script.headers()["content-type"],
        "text/x-shellscript; charset=utf-8"
    );
    let script = script.text().await?;
    assert!(script.contains(&format!("url='{public}'")), "{script}");
    assert!(
        script.contains("controllers='ctl.example:7000,10.0.0.2:7000'"),
        "{script}"
    );
    for (path, arch) in [(&new, "amd64"), (&arm, "arm64")] {
        let name = path.file_name().unwrap().to_str().unwrap();
        let line = format!("    '{arch}') pkg='{name}'; sum='{}' ;;", sha256_hex(path)?);
        assert!(
            script.lines().any(|l| l == line),
            "no {line:?} in\n{script}"
        );
    }
    assert!(!script.contains("0.0.9"), "{script}");
    assert!(!script.contains("riscv64"), "{script}");

    let deb = http
        .get(format!("{base}/dist/fleetrun-agent_0.1.0-1_amd64.deb"))
        .send()
        .await?;
    assert_eq!(deb.status(), 200);
    assert_eq!(
        deb.headers()["content-type"],
        "application/vnd.debian.binary-package"
    );
    assert_eq!(&deb.bytes().await?[..], b"the newer agent package");
    for attack in [
        "secret.txt",
        "..%2Ffleetrun-agent_0.1.0-1_amd64.deb",
        "..%2F..%2Fcontroller.toml",
        "fleetrun-agent_0.2.0-1_amd64.deb",
        "fleetrun-agent_0.1.0-1_amd64.deb%00.txt",
        "fleetrun-agent_0.1.0-1_riscv64.deb",
    ] {
        let reply = http.get(format!("{base}/dist/{attack}")).send().await?;
        assert_eq!(reply.status(), 404, "{attack}");
        let body = reply.text().await?;
        assert!(
            !body.contains("outside the directory") && !body.contains("not a package"),
            "{attack}: {body}"
        );
    }
    // The script refuses what it cannot use before touching anything.
    let file = cluster.dir().join("install.sh");
    std::fs::write(&file, &script)?;
    let pin = format!("sha256:{}", "ab".repeat(32));
    // The token comes from the environment only; on the command line any user could read it.
    for (token, args, says) in [
        (
            None,
            vec!["--ca-pin", pin.as_str()],
            "FLEETRUN_JOIN_TOKEN is not set",
        ),
        (
            None,
            vec!["--token", "t0k3n", "--ca-pin", pin.as_str()],
            "not taken on the command line",
        ),
        (
            Some("t0k3n"),
            vec!["--token=t0k3n", "--ca-pin", pin.as_str()],
            "not taken on the command line",
        ),
        (Some("t0k3n"), vec![], "--ca-pin sha256:HEX is required"),
        (
            Some("t0k3n"),
            vec!["--ca-pin", "sha256:abc"],
            "64 hexadecimal digits",
        ),
        (
            Some("t0k'$(id)"),
            vec!["--ca-pin", pin.as_str()],
            "not a join token",
        ),
        (
            Some("t0k3n"),
            vec!["--ca-pin", pin.as_str(), "--controller", "c;reboot"],
            "must be HOST:PORT",
        ),
        (Some("t0k3n"), vec!["--bogus"], "unknown argument"),
    ] {
        let mut cmd = Command::new("sh");
        cmd.arg(&file).args(&args).env_remove("FLEETRUN_JOIN_TOKEN");
        if let Some(token) = token {
            cmd.env("FLEETRUN_JOIN_TOKEN", token);
        }
        let out = cmd.output()?;
        let stderr = String::from_utf8_lossy(&out.stderr);
        assert_eq!(out.status.code(), Some(1), "{args:?}: {stderr}");
        assert!(stderr.contains(says), "{args:?}: {stderr}");
        assert!(out.stdout.is_empty(), "{args:?} did something");
    }

    // A download cut short, piped into sh as `curl | sh` does, runs nothing of it.
    for eighth in 1..8 {
        let cut = &script.as_bytes()[..script.len() * eighth / 8];
        let mut child = Command::new("sh")
            .args(["-s", "--", "--ca-pin", pin.as_str()])
            .env("FLEETRUN_JOIN_TOKEN", "t0k3n")
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()?;
        {
            use std::io::Write as _;
            let mut stdin = child.stdin.take().context("stdin")?;
            stdin.write_all(cut)?;
        }
        let out = child.wait_with_output()?;
        assert!(
            out.stdout.is_empty()
                && !String::from_utf8_lossy(&out.stderr).contains("fleetrun install"),
            "the first {eighth}/8 of the script ran: {}{}",
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        );
    }
    Ok(())
}

/// The served script run for real, as root, over https from a controller with `[api] tls`: it
/// gets past its checks and downloads the package, and when the package is not the one whose
/// digest the script carries (changed on the controller, or on the way), it stops before
/// installing anything.
#[tokio::test(flavor = "multi_thread")]
async fn served_script_installs_nothing_from_a_tampered_package() -> Result<()> {
    if !nix_is_root() {
        println!("skipped: the install script runs only as root");
        return Ok(());
    }
    let agent_was_installed = installed("fleetrun-agent");
    let mut cluster = fleetrun_tests::start_cluster(0).await?;
    let arch = succeed("dpkg", &["--print-architecture"])?;
    let packages = cluster.dir().join("packages");
    std::fs::create_dir(&packages)?;
    let name = format!("fleetrun-agent_0.1.0-1_{}.deb", arch.trim());
    let deb = packages.join(&name);
    std::fs::write(&deb, b"the agent package as built")?;

    let certs = cluster.dir().join("certs");
    let ca = pki::Ca::open_or_create(&certs, "fleetrun local cluster CA")?;
    let api_cert = ca.issue_controller()?;
    cluster.stop_controller(Duration::from_secs(10))?;
    let mut config = std::fs::read_to_string(&cluster.controller_config)?;
    config.push_str(&format!(
        "\n[api]\ntls = {{ cert = \"{}\", key = \"{}\" }}\n\n[dist]\ndir = \"{}\"\n",
        api_cert.cert.display(),
        api_cert.key.display(),
        packages.display()
    ));
    let config_path = cluster.dir().join("controller-dist-https.toml");
    std::fs::write(&config_path, config)?;
    let log = cluster.dir().join("controller-dist-https.log");
    let mut child = cluster.spawn("fleetrun-controller", &config_path, &log)?;
    let https = cluster.info.api_url.replacen("http://", "https://", 1);
    let https = https.trim_end_matches('/').to_owned();
    let ca_pem = ca.cert_path();

    let result = async {
        let client = reqwest::Client::builder()
            .use_rustls_tls()
            .tls_built_in_root_certs(false)
            .add_root_certificate(reqwest::Certificate::from_pem(&std::fs::read(&ca_pem)?)?)
            .timeout(Duration::from_secs(10))
            .build()?;
        let script = fleetrun_tests::eventually(Duration::from_secs(30), "HTTPS up", || async {
            let reply = client
                .get(format!("{https}/install.sh"))
                .send()
                .await
                .ok()?;
            if !reply.status().is_success() {
                return None;
            }
            reply.text().await.ok()
        })
        .await?;
        ensure!(script.contains(&format!("url='{https}'")), "{script}");
        ensure!(
            script.contains(&sha256_hex(&deb)?),
            "the script lacks the package's digest:\n{script}"
        );

        // The package changes after the script was served.
        std::fs::write(&deb, b"a package with something else in it")?;
        let file = cluster.dir().join("install.sh");
        std::fs::write(&file, &script)?;
        let pin = format!("sha256:{}", "ab".repeat(32));
        let out = Command::new("sh")
            .arg(&file)
            .args(["--ca-pin", pin.as_str(), "--controller", "127.0.0.1:7000"])
            .arg("--cacert")
            .arg(&ca_pem)
            .env("FLEETRUN_JOIN_TOKEN", "t0k3n")
            .stdin(Stdio::null())
            .output()?;
        let stdout = String::from_utf8_lossy(&out.stdout);
        let stderr = String::from_utf8_lossy(&out.stderr);
        ensure!(
            out.status.code() == Some(1),
            "the script ({}): {stdout}{stderr}",
            out.status
        );
        ensure!(
            stdout.contains(&format!("downloading {name}")),
            "the script stopped before downloading: {stdout}{stderr}"
        );
        ensure!(
            stderr.contains("not installed") && !stdout.contains("installing"),
            "{stdout}{stderr}"
        );
        if !agent_was_installed {
            ensure!(
                !installed("fleetrun-agent"),
                "the tampered package was installed"
            );
        }
        Ok(())
    }
    .await;
    let _ = child.kill();
    let _ = child.wait();
    result.with_context(|| {
        format!(
            "controller log:\n{}",
            std::fs::read_to_string(&log).unwrap_or_default()
        )
    })
}

fn nix_is_root() -> bool {
    run("id", &["-u"]).is_ok_and(|o| o.stdout.trim_ascii() == b"0")
}

/// The install command's success path, as an operator runs it on a new host: the controller
/// (`[api] tls` with a test CA, `[enroll]`, `[dist]` with the agent package `cargo xtask dist`
/// built) serves `/install.sh` over https; the script, given the join token in the environment,
/// downloads and checks the package, installs it with dpkg, enrolls, and, with no systemd
/// running here, says how to start the agent; the agent started by its unit's `ExecStart` line
/// comes online in the token's business and module and runs a job. The package is purged after.
#[test]
#[ignore = "installs the agent package on this machine: run with --ignored (.ci/run does)"]
fn served_script_installs_enrolls_and_the_agent_runs_a_job() -> Result<()> {
    let _turn = INSTALLING.lock().unwrap_or_else(|e| e.into_inner());
    ensure!(nix_is_root(), "the install script runs only as root");
    ensure!(
        !installed("fleetrun-agent"),
        "fleetrun-agent is installed on this machine; the test installs and purges its own: \
         dpkg --purge fleetrun-agent first"
    );
    ensure!(
        !Path::new("/etc/fleetrun/agent.toml").exists(),
        "/etc/fleetrun/agent.toml exists: the test enrolls this machine as a new host"
    );
    let [_, agent_deb, _] = build_packages()?;
    let _purge = PurgeAgent;
    tokio::runtime::Runtime::new()?.block_on(install_and_run(&agent_deb))
}

/// Stops the agent the test started and purges its package, passed or not.
struct PurgeAgent;

impl Drop for PurgeAgent {
    fn drop(&mut self) {
        let _ = run("dpkg", &["--purge", "fleetrun-agent"]);
        // What enrollment wrote beside the package's files.
        let _ = std::fs::remove_file("/etc/fleetrun/agent.toml");
        let _ = std::fs::remove_dir_all("/etc/fleetrun/agent");
        let _ = std::fs::remove_dir("/etc/fleetrun");
    }
}

/// A child process killed when dropped.
struct Running(std::process::Child);

impl Drop for Running {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

async fn install_and_run(agent_deb: &Path) -> Result<()> {
    let (mut cluster, pin) = crate::enrollment::enrolling_cluster("").await?;
    let made = crate::enrollment::token(&cluster, serde_json::json!({})).await?;
    let secret = made["token"].as_str().context("token")?.to_owned();

    // The same controller with its API on https and the agent package to serve.
    let packages = cluster.dir().join("packages");
    std::fs::create_dir(&packages)?;
    let served = packages.join(agent_deb.file_name().context("package name")?);
    std::fs::copy(agent_deb, &served)?;
    let certs = cluster.dir().join("certs");
    let ca = pki::Ca::open_or_create(&certs, "fleetrun local cluster CA")?;
    let api_cert = ca.issue_controller()?;
    cluster.stop_controller(Duration::from_secs(10))?;
    let mut config = std::fs::read_to_string(&cluster.controller_config)?;
    config.push_str(&format!(
        "\n[api]\ntls = {{ cert = \"{}\", key = \"{}\" }}\n\n[dist]\ndir = \"{}\"\n",
        api_cert.cert.display(),
        api_cert.key.display(),
        packages.display()
    ));
    let config_path = cluster.dir().join("controller-install.toml");
    std::fs::write(&config_path, config)?;
    let log = cluster.dir().join("controller-install.log");
    let _controller = Running(cluster.spawn("fleetrun-controller", &config_path, &log)?);
    let https = cluster
        .info
        .api_url
        .replacen("http://", "https://", 1)
        .trim_end_matches('/')
        .to_owned();
    let ca_pem = ca.cert_path();
    let agent_log = cluster.dir().join("installed-agent.log");

    let outcome = async {
        let http = reqwest::Client::builder()
            .use_rustls_tls()
            .tls_built_in_root_certs(false)
            .add_root_certificate(reqwest::Certificate::from_pem(&std::fs::read(&ca_pem)?)?)
            .timeout(Duration::from_secs(30))
            .build()?;
        let plain = cluster.client();
        let client = fleetrun_testkit::client::ApiClient::new(
            &https,
            &plain.app_code,
            &plain.app_secret,
            &plain.username,
        )
        .with_http(http.clone());
        let script = fleetrun_tests::eventually(Duration::from_secs(30), "HTTPS up", || async {
            let reply = http.get(format!("{https}/install.sh")).send().await.ok()?;
            if !reply.status().is_success() {
                return None;
            }
            reply.text().await.ok()
        })
        .await?;
        let file = cluster.dir().join("install.sh");
        std::fs::write(&file, &script)?;

        // As the printed install command runs it: token in the environment, pin and controller
        // as arguments; --cacert because the test CA is not the system's.
        let out = Command::new("sh")
            .arg(&file)
            .args(["--ca-pin", pin.as_str(), "--controller"])
            .arg(&cluster.info.agent_addr)
            .arg("--cacert")
            .arg(&ca_pem)
            .env("FLEETRUN_JOIN_TOKEN", &secret)
            .stdin(Stdio::null())
            .output()?;
        let said = format!(
            "{}{}",
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        );
        ensure!(
            out.status.success(),
            "the install script ({}): {said}",
            out.status
        );
        ensure!(installed("fleetrun-agent"), "not installed: {said}");
        ensure!(
            !said.contains(&secret),
            "the script printed the join token: {said}"
        );
        // systemd runs the agent where it is the init (sd_booted(3)); elsewhere the script says
        // so and how to start the agent, and started nothing.
        let systemd = std::path::Path::new("/run/systemd/system").is_dir();
        let unit = std::fs::read_to_string("/usr/lib/systemd/system/fleetrun-agent.service")?;
        let exec_start = unit
            .lines()
            .find_map(|l| l.strip_prefix("ExecStart="))
            .context("the unit has no ExecStart")?;
        if systemd {
            ensure!(said.contains("the agent runs"), "{said}");
            let active = Command::new("systemctl")
                .args(["is-active", "fleetrun-agent"])
                .output()?;
            ensure!(
                active.status.success(),
                "systemctl is-active fleetrun-agent: {}",
                String::from_utf8_lossy(&active.stdout)
            );
        } else {
            ensure!(
                said.contains("systemd is not running") && said.contains("not started"),
                "{said}"
            );
            ensure!(said.contains(exec_start), "{said}");
        }
        let agent_id = said
            .split_whitespace()
            .skip_while(|w| *w != "agent")
            .nth(1)
            .context("no agent id in what the script printed")?
            .to_owned();

        // Without systemd, started as systemd would start it.
        let _agent = if systemd {
            None
        } else {
            let mut words = exec_start.split_whitespace();
            let program = words.next().context("empty ExecStart")?;
            let agent_out = std::fs::File::create(&agent_log)?;
            Some(Running(
                Command::new(program)
                    .args(words)
                    .stdin(Stdio::null())
                    .stdout(agent_out.try_clone()?)
                    .stderr(agent_out)
                    .spawn()?,
            ))
        };
        let host = fleetrun_tests::eventually(Duration::from_secs(60), "the agent online", || {
            let client = client.clone();
            let agent_id = agent_id.clone();
            async move {
                client
                    .hosts()
                    .await
                    .ok()?
                    .into_iter()
                    .find(|h| h["agent_id"] == agent_id.as_str() && h["online"] == true)
            }
        })
        .await?;
        ensure!(
            host["bk_biz_id"] == crate::enrollment::BIZ,
            "placed in another business: {host}"
        );
        let bk_host_id = host["bk_host_id"].as_i64().context("bk_host_id")?;
        let accepted = client
            .call(
                "fast_execute_script",
                cluster.script_request(
                    "echo installed-and-running",
                    &[bk_host_id],
                    serde_json::json!({}),
                ),
            )
            .await?;
        let job = accepted["job_instance_id"].as_i64().context("job")?;
        let step = accepted["step_instance_id"].as_i64().context("step")?;
        let status = client
            .wait_job(&cluster.info.scope(), job, Duration::from_secs(60))
            .await?;
        ensure!(
            fleetrun_tests::host_results(&status)[0]["status"] == 9,
            "{status}"
        );
        let logs = client
            .logs(&cluster.info.scope(), job, step, &[bk_host_id])
            .await?;
        ensure!(logs[0].1 == "installed-and-running\n", "{logs:?}");
        Ok(())
    }
    .await;
    outcome.with_context(|| {
        format!(
            "controller log:\n{}\nagent log:\n{}",
            std::fs::read_to_string(&log).unwrap_or_default(),
            std::fs::read_to_string(&agent_log).unwrap_or_default()
        )
    })
}
