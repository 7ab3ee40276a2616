//! `check-config`: each daemon judges a configuration file without starting, names what is wrong
//! and, where a key is at fault, its line; exits 78 then, 0 with a summary when the file is fine.
//! With the real binaries, on files a cluster runs with and broken copies of them.

use std::{
    path::{Path, PathBuf},
    process::Command,
};

use anyhow::Result;
use fleetrun_tests::start_cluster;

struct Outcome {
    code: Option<i32>,
    stdout: String,
    stderr: String,
}

fn check(bin: &Path, config: &Path) -> Result<Outcome> {
    let output = Command::new(bin)
        .arg("check-config")
        .arg("--config")
        .arg(config)
        .env_remove("FLEETRUN_LOG_FORMAT")
        .output()?;
    Ok(Outcome {
        code: output.status.code(),
        stdout: String::from_utf8_lossy(&output.stdout).into_owned(),
        stderr: String::from_utf8_lossy(&output.stderr).into_owned(),
    })
}

/// `text` with its first line starting with `prefix` replaced by `new` (several lines allowed).
/// The configuration with `[security] param_key_file` set to `file` (a cluster on PostgreSQL has
/// the section already).
fn with_param_key_file(config: &str, file: &Path) -> String {
    let setting = format!("param_key_file = {file:?}");
    if config.contains("\n[security]\n") {
        replace_line(config, "param_key_file = ", &setting)
    } else {
        format!("{config}\n[security]\n{setting}\n")
    }
}

fn replace_line(text: &str, prefix: &str, new: &str) -> String {
    let mut done = false;
    let lines: Vec<String> = text
        .lines()
        .map(|line| {
            if !done && line.starts_with(prefix) {
                done = true;
                new.to_owned()
            } else {
                line.to_owned()
            }
        })
        .collect();
    assert!(done, "no line starts with {prefix:?}");
    lines.join("\n") + "\n"
}

/// The 1-based number of the `nth` (from 0) line starting with `prefix`.
fn line_of(text: &str, prefix: &str, nth: usize) -> usize {
    text.lines()
        .enumerate()
        .filter(|(_, line)| line.starts_with(prefix))
        .nth(nth)
        .unwrap_or_else(|| panic!("no line {nth} starting with {prefix:?}"))
        .0
        + 1
}

/// A broken variant: its text, what the report must say, and the line it must point at.
struct Broken {
    name: &'static str,
    text: String,
    says: &'static str,
    line: Option<usize>,
}

fn assert_refused(bin: &Path, dir: &Path, broken: &Broken) -> Result<()> {
    let path: PathBuf = dir.join(format!("{}.toml", broken.name));
    std::fs::write(&path, &broken.text)?;
    let outcome = check(bin, &path)?;
    let name = broken.name;
    assert_eq!(
        outcome.code,
        Some(78),
        "{name}: stdout {:?} stderr {:?}",
        outcome.stdout,
        outcome.stderr
    );
    assert!(
        outcome.stderr.contains(broken.says),
        "{name}: {:?} does not say {:?}",
        outcome.stderr,
        broken.says
    );
    if let Some(line) = broken.line {
        let at = format!("{}:{line}:", path.display());
        assert!(
            outcome.stderr.contains(&at),
            "{name}: {:?} does not point at {at:?}",
            outcome.stderr
        );
    }
    Ok(())
}

#[tokio::test(flavor = "multi_thread")]
async fn the_controller_check_names_each_problem_and_its_line() -> Result<()> {
    let cluster = start_cluster(0).await?;
    let bin = cluster.bin_dir.join("fleetrun-controller");
    let good = std::fs::read_to_string(&cluster.controller_config)?;
    let ok = check(&bin, &cluster.controller_config)?;
    assert_eq!(ok.code, Some(0), "{}", ok.stderr);
    assert!(
        ok.stdout.contains(": ok: HTTP API on 127.0.0.1:"),
        "{}",
        ok.stdout
    );
    assert_eq!(ok.stdout.lines().count(), 1, "{}", ok.stdout);

    let dir = cluster.dir().join("broken");
    std::fs::create_dir_all(&dir)?;
    let mut cases = Vec::new();

    let text = good.clone() + "[broken\n";
    let line = text.lines().count();
    cases.push(Broken {
        name: "syntax",
        text,
        says: "",
        line: Some(line),
    });

    let text = replace_line(
        &good,
        "http_listen",
        &format!("{}\nhttp_lisen = 1", good.lines().next().unwrap()),
    );
    cases.push(Broken {
        name: "unknown-key",
        text,
        says: "unknown field `http_lisen`",
        line: Some(2),
    });

    let text = replace_line(&good, "admin = ", "admin = \"yes\"");
    let line = line_of(&text, "admin = ", 0);
    cases.push(Broken {
        name: "wrong-type",
        text,
        says: "invalid type: string \"yes\", expected a boolean",
        line: Some(line),
    });

    let text = replace_line(&good, "scopes = ", "");
    let line = line_of(&text, "[[apps]]", 0);
    cases.push(Broken {
        name: "no-scopes",
        text,
        says: "has no scopes",
        line: Some(line),
    });

    let text = replace_line(&good, "bk_app_secret = ", "bk_app_secret = \"\"");
    let line = line_of(&text, "bk_app_secret = ", 0);
    cases.push(Broken {
        name: "empty-secret",
        text,
        says: "bk_app_secret of \"",
        line: Some(line),
    });

    let text = replace_line(&good, "http_listen = ", "http_listen = \"127.0.0.1:http\"");
    cases.push(Broken {
        name: "bad-listen",
        text,
        says: "invalid socket address",
        line: Some(1),
    });

    let text = replace_line(&good, "cert = ", "cert = \"/nonexistent/controller.pem\"");
    let line = line_of(&text, "cert = ", 0);
    cases.push(Broken {
        name: "missing-tls",
        text,
        says: "/nonexistent/controller.pem",
        line: Some(line),
    });

    let code = good
        .lines()
        .find(|l| l.starts_with("bk_app_code = "))
        .unwrap();
    let text = good.clone()
        + &format!("\n[[apps]]\n{code}\nbk_app_secret = \"another\"\nscopes = [\"biz:2\"]\n");
    let line = line_of(&text, "bk_app_code = ", 1);
    cases.push(Broken {
        name: "duplicate-app",
        text,
        says: "appears twice",
        line: Some(line),
    });

    let text = replace_line(
        &good,
        "allow_networks = ",
        "allow_networks = [\"10.0.0.0/33\"]",
    );
    let line = line_of(&text, "allow_networks = ", 0);
    cases.push(Broken {
        name: "bad-cidr",
        text,
        says: "callbacks.allow_networks",
        line: Some(line),
    });

    let text = replace_line(
        &good,
        "inventory = ",
        "inventory = \"/nonexistent/inventory.toml\"",
    );
    let line = line_of(&text, "inventory = ", 0);
    cases.push(Broken {
        name: "missing-inventory",
        text,
        says: "cannot read /nonexistent/inventory.toml",
        line: Some(line),
    });

    let text = good.clone() + "\n[limits]\nheartbeat_secs = 0\n";
    let line = line_of(&text, "heartbeat_secs = ", 0);
    cases.push(Broken {
        name: "zero-heartbeat",
        text,
        says: "limits.heartbeat_secs must be between 1 and",
        line: Some(line),
    });

    // The daemon refuses a key file for sensitive parameters it cannot use; a missing one it
    // creates.
    let bad_key = dir.join("param.key");
    std::fs::write(&bad_key, "not a key\n")?;
    let text = with_param_key_file(&good, &bad_key);
    let line = line_of(&text, "param_key_file = ", 0);
    cases.push(Broken {
        name: "bad-param-key",
        text,
        says: "not base64",
        line: Some(line),
    });

    let text = replace_line(&good, "database = ", "");
    cases.push(Broken {
        name: "no-database",
        text,
        says: "missing field `database`",
        line: None,
    });

    for broken in &cases {
        assert_refused(&bin, &dir, broken)?;
    }

    let missing_key = with_param_key_file(&good, &dir.join("created-at-start.key"));
    let path = dir.join("missing-param-key.toml");
    std::fs::write(&path, missing_key)?;
    let outcome = check(&bin, &path)?;
    assert_eq!(outcome.code, Some(0), "{}", outcome.stderr);
    assert!(!dir.join("created-at-start.key").exists());

    // The daemon refuses the same files at start, with the same location.
    let path = dir.join("empty-secret.toml");
    let started = Command::new(&bin).arg("--config").arg(&path).output()?;
    assert_eq!(started.status.code(), Some(78));
    let log = String::from_utf8_lossy(&started.stdout).into_owned()
        + &String::from_utf8_lossy(&started.stderr);
    let line = line_of(&std::fs::read_to_string(&path)?, "bk_app_secret = ", 0);
    assert!(
        log.contains(&format!("{}:{line}:", path.display())),
        "{log}"
    );
    Ok(())
}

#[tokio::test(flavor = "multi_thread")]
async fn the_agent_check_names_each_problem_and_its_line() -> Result<()> {
    let cluster = start_cluster(1).await?;
    let bin = cluster.bin_dir.join("fleetrun-agent");
    let config = &cluster.agents[0].config;
    let good = std::fs::read_to_string(config)?;
    let ok = check(&bin, config)?;
    assert_eq!(ok.code, Some(0), "{}", ok.stderr);
    assert!(ok.stdout.contains(": ok: controller "), "{}", ok.stdout);

    let dir = cluster.dir().join("broken-agent");
    std::fs::create_dir_all(&dir)?;
    let cases = [
        Broken {
            name: "controller-name",
            text: replace_line(
                &good,
                "controller = ",
                "controller = \"controller.example\"",
            ),
            says: "has no port: write host:port",
            line: Some(1),
        },
        Broken {
            name: "controller-unspecified",
            text: replace_line(&good, "controller = ", "controller = \"0.0.0.0:4433\""),
            says: "not an address an agent can connect to",
            line: Some(1),
        },
        Broken {
            name: "unknown-key",
            text: replace_line(&good, "bk_cloud_id = ", "bk_cloud_id = 0\nbk_cloud = 1"),
            says: "unknown field `bk_cloud`",
            line: Some(line_of(&good, "bk_cloud_id = ", 0) + 1),
        },
        Broken {
            name: "missing-key-file",
            text: replace_line(&good, "key = ", "key = \"/nonexistent/agent.key\""),
            says: "/nonexistent/agent.key",
            line: Some(line_of(&good, "key = ", 0)),
        },
        Broken {
            name: "no-tasks",
            text: good.replace("[tls]", "max_concurrent_tasks = 0\n\n[tls]"),
            says: "max_concurrent_tasks must be at least 1",
            line: Some(line_of(&good, "[tls]", 0)),
        },
        Broken {
            name: "relative-work-dir",
            text: replace_line(&good, "work_dir = ", "work_dir = \"work\""),
            says: "work_dir must be an absolute path",
            line: Some(line_of(&good, "work_dir = ", 0)),
        },
    ];
    for broken in &cases {
        assert_refused(&bin, &dir, broken)?;
    }
    Ok(())
}
