//! The agent stages scripts that run as root below its work directory, so it refuses to start
//! when another account could replace that directory or one above it: the real binary, a real
//! second account.

use std::{
    os::unix::fs::PermissionsExt,
    path::{Path, PathBuf},
    process::{Command, Stdio},
    sync::OnceLock,
    time::{Duration, Instant},
};

use anyhow::{Context, Result, ensure};
use fleetrun_tests::{
    cluster::{self, TEST_USER},
    pki,
};

fn agent_binary() -> &'static Path {
    static BINARY: OnceLock<PathBuf> = OnceLock::new();
    BINARY.get_or_init(|| {
        cluster::build_binaries(false)
            .expect("building the binaries")
            .join("fleetrun-agent")
    })
}

/// A directory for one test, with an agent certificate.
struct Setup {
    dir: tempfile::TempDir,
    ca: PathBuf,
    cert: pki::CertPaths,
}

impl Setup {
    fn new() -> Result<Self> {
        ensure!(cluster::ensure_test_user()?, "{TEST_USER} is needed");
        // In the temporary directory (root's, sticky) rather than the workspace, which may belong
        // to someone else than the root running the tests: the agent would rightly refuse it.
        let dir = tempfile::Builder::new()
            .prefix("fleetrun-workdir-")
            .tempdir()?;
        let ca = pki::Ca::open_or_create(&dir.path().join("ca"), "workdir test CA")?;
        let cert = ca.issue_agent("workdir-agent")?;
        Ok(Self {
            ca: ca.cert_path(),
            cert,
            dir,
        })
    }

    fn path(&self, name: &str) -> PathBuf {
        self.dir.path().join(name)
    }

    /// Starts the agent with `work_dir` (and a controller nobody listens for) and waits until it
    /// exits or says it is starting. Returns its exit code (`None`: it started) and its log.
    fn run_agent(&self, work_dir: &Path) -> Result<(Option<i32>, String)> {
        let name = work_dir.file_name().unwrap().to_string_lossy().into_owned();
        let config = self.path(&format!("{name}.toml"));
        std::fs::write(
            &config,
            format!(
                "controller = \"127.0.0.1:9\"\nbind = \"127.0.0.1:0\"\nwork_dir = \"{}\"\ncgroup_name = \"fleetrun-workdir-{}-{name}\"\n[tls]\nca = \"{}\"\ncert = \"{}\"\nkey = \"{}\"\n",
                work_dir.display(),
                std::process::id(),
                self.ca.display(),
                self.cert.cert.display(),
                self.cert.key.display()
            ),
        )?;
        let log = self.path(&format!("{name}.log"));
        let log_file = std::fs::File::create(&log)?;
        let mut child = Command::new(agent_binary())
            .arg("--config")
            .arg(&config)
            .env("FLEETRUN_LOG", "info")
            .stdin(Stdio::null())
            .stdout(log_file.try_clone()?)
            .stderr(log_file)
            .spawn()
            .context("starting fleetrun-agent")?;
        let deadline = Instant::now() + Duration::from_secs(30);
        loop {
            if let Some(status) = child.try_wait()? {
                return Ok((status.code(), std::fs::read_to_string(&log)?));
            }
            let text = std::fs::read_to_string(&log)?;
            if text.contains("agent starting") || Instant::now() > deadline {
                child.kill()?;
                child.wait()?;
                return Ok((None, text));
            }
            std::thread::sleep(Duration::from_millis(20));
        }
    }
}

fn chmod(path: &Path, mode: u32) -> Result<()> {
    Ok(std::fs::set_permissions(
        path,
        std::fs::Permissions::from_mode(mode),
    )?)
}

/// The review's attack: the account owns the work directory, so it can rename the task
/// directories the agent creates and put its own scripts in their place, which root then runs.
#[test]
fn refuses_a_work_dir_owned_by_another_account() -> Result<()> {
    let setup = Setup::new()?;
    chmod(setup.dir.path(), 0o755)?;
    let work = setup.path("user-work");
    std::fs::create_dir(&work)?;
    chmod(&work, 0o755)?;
    let status = Command::new("chown").arg(TEST_USER).arg(&work).status()?;
    ensure!(status.success(), "chown failed");

    let (code, log) = setup.run_agent(&work)?;
    assert_eq!(
        code,
        Some(78),
        "the agent did not refuse {}:\n{log}",
        work.display()
    );
    let expected = format!("{} (owner {TEST_USER} (uid ", work.display());
    assert!(log.contains(&expected), "{log}");
    assert!(
        log.contains("mode 0755) is owned by another account"),
        "{log}"
    );
    assert!(
        !work.join("tasks").exists(),
        "the agent created its staging directory"
    );
    Ok(())
}

/// A directory above the work directory that others may write to (without the sticky bit) lets
/// them rename the work directory itself and put their own in its place.
#[test]
fn refuses_a_work_dir_below_a_directory_others_can_write() -> Result<()> {
    let setup = Setup::new()?;
    for (name, mode, problem) in [
        ("world", 0o777, "is writable by every account"),
        ("world-only", 0o757, "is writable by every account"),
        ("group", 0o775, "is writable by its group"),
    ] {
        let shared = setup.path(name);
        std::fs::create_dir(&shared)?;
        chmod(&shared, mode)?;
        let work = shared.join("work");
        std::fs::create_dir(&work)?;
        let (code, log) = setup.run_agent(&work)?;
        assert_eq!(
            code,
            Some(78),
            "the agent did not refuse {}:\n{log}",
            work.display()
        );
        let expected = format!(
            "{} (owner root (uid 0), mode {mode:04o}) {problem}",
            shared.display()
        );
        assert!(log.contains(&expected), "{expected}\n{log}");
    }
    Ok(())
}

/// Below a sticky directory everyone may write to, like /tmp, a work directory of root's is
/// fine: the others can add their own entries there, but cannot rename or remove root's.
#[test]
fn accepts_a_root_work_dir_below_a_sticky_directory() -> Result<()> {
    let setup = Setup::new()?;
    let tmp = setup.path("tmp");
    std::fs::create_dir(&tmp)?;
    chmod(&tmp, 0o1777)?;
    let work = tmp.join("work");
    let (code, log) = setup.run_agent(&work)?;
    assert_eq!(code, None, "the agent refused {}:\n{log}", work.display());
    assert!(log.contains("agent starting"), "{log}");
    assert!(work.join("tasks").is_dir());
    Ok(())
}
