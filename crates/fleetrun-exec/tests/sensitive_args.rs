//! Sensitive parameters stay off the command line, which every local
//! account can read with `ps`, while the script still gets exactly the
//! words it would have got as arguments.

mod common;

use std::process::Command;
use std::time::Duration;

use common::{Fixture, PLACES, Place, TEST_USER, installed, task, task_id, test_user};
use fleetrun_exec::{Ending, Language, OutputEvent};
use tokio_util::sync::CancellationToken;

/// Prints `$0`, the number of arguments, each argument in brackets, whether
/// descriptor 3 is still the arguments pipe (for the shell: open at all; a
/// command substitution would use it), then waits.
fn script(language: Language) -> &'static str {
    match language {
        Language::Shell => {
            r#"printf '%s\n' "$0" "$#"
for a in "$@"; do printf '[%s]\n' "$a"; done
if { true <&3; } 2>/dev/null; then echo fd3-pipe; else echo no-fd3-pipe; fi
echo "BASH_ENV=${BASH_ENV-unset}"
echo ready
sleep 30
"#
        }
        Language::Perl => {
            r#"$| = 1;
print "$0\n", scalar(@ARGV), "\n";
print "[$_]\n" for @ARGV;
print((readlink("/proc/self/fd/3") // "") =~ /^pipe:/ ? "fd3-pipe\n" : "no-fd3-pipe\n");
print "ready\n";
sleep 30;
"#
        }
        Language::Python => {
            r#"import os, sys, time
print(sys.argv[0])
print(len(sys.argv) - 1)
for a in sys.argv[1:]:
    print(f"[{a}]")
try:
    fd3 = os.readlink("/proc/self/fd/3")
except OSError:
    fd3 = ""
print("fd3-pipe" if fd3.startswith("pipe:") else "no-fd3-pipe")
print("ready", flush=True)
time.sleep(30)
"#
        }
        _ => unreachable!(),
    }
}

/// Every process's command line, as root reads them from /proc.
fn all_command_lines() -> String {
    let mut all = String::new();
    for entry in std::fs::read_dir("/proc").unwrap() {
        let path = entry.unwrap().path();
        if let Ok(cmdline) = std::fs::read(path.join("cmdline")) {
            all.push_str(&String::from_utf8_lossy(&cmdline).replace('\0', " "));
            all.push('\n');
        }
    }
    all
}

/// What another local account sees with `ps`.
fn ps_as_another_account() -> String {
    let out = Command::new("runuser")
        .args(["-u", "nobody", "--", "ps", "-eo", "args"])
        .output()
        .unwrap();
    assert!(out.status.success(), "{out:?}");
    String::from_utf8(out.stdout).unwrap()
}

/// Starts the script with a secret among its arguments, waits until it is
/// running, and returns what `ps` showed then and the script's output; `None` when the host
/// has no memory file system for `place`.
async fn run_with_secret(
    language: Language,
    sensitive: bool,
    place: Place,
) -> Option<(String, String, String)> {
    test_user();
    let fixture = Fixture::staging_in(true, place)?;
    let secret = format!("s3cret-{}", task_id());
    let mut t = task(language, script(language), TEST_USER);
    t.args = vec![
        format!("{secret} with spaces"),
        "it's".into(),
        String::new(),
        "--x".into(),
    ];
    t.sensitive_args = sensitive;
    let staged = fixture
        .tasks_dir()
        .join(&t.id)
        .join(match language {
            Language::Shell => "script.sh",
            Language::Perl => "script.pl",
            _ => "script.py",
        })
        .display()
        .to_string();
    let cancel = CancellationToken::new();
    let mut running = fixture.executor.start(t, cancel.clone());
    let mut output = String::new();
    while !output.ends_with("ready\n") {
        match tokio::time::timeout(Duration::from_secs(10), running.output.next()).await {
            Ok(Some(OutputEvent::Data(data))) => output.push_str(&String::from_utf8_lossy(&data)),
            other => panic!("{other:?} after {output:?}"),
        }
    }
    let seen = format!("{}{}", all_command_lines(), ps_as_another_account());
    cancel.cancel();
    let rest = common::collect(running).await;
    assert_eq!(rest.outcome.ending, Ending::Cancelled);
    fixture.assert_no_staging();
    let mut expected =
        format!("{staged}\n4\n[{secret} with spaces]\n[it's]\n[]\n[--x]\nno-fd3-pipe\n");
    if language == Language::Shell {
        expected.push_str("BASH_ENV=unset\n");
    }
    expected.push_str("ready\n");
    assert_eq!(output, expected, "{place:?}");
    Some((secret, seen, output))
}

async fn check(language: Language) {
    let interpreter = match language {
        Language::Shell => "bash",
        Language::Perl => "perl",
        _ => "python3",
    };
    if installed(interpreter).is_none() {
        eprintln!("{interpreter} is not installed: skipped");
        return;
    }
    for place in PLACES {
        let Some((secret, seen, _)) = run_with_secret(language, true, place).await else {
            continue;
        };
        assert!(
            !seen.contains(&secret),
            "{place:?}: the secret is visible to other accounts:\n{}",
            seen.lines()
                .filter(|l| l.contains(&secret))
                .collect::<Vec<_>>()
                .join("\n")
        );
    }
}

#[tokio::test(flavor = "multi_thread")]
async fn shell_parameters_stay_out_of_ps() {
    check(Language::Shell).await;
}

#[tokio::test(flavor = "multi_thread")]
async fn perl_parameters_stay_out_of_ps() {
    check(Language::Perl).await;
}

#[tokio::test(flavor = "multi_thread")]
async fn python_parameters_stay_out_of_ps() {
    check(Language::Python).await;
}

/// The same reading of `ps` does find parameters that are not sensitive: the
/// checks above would see a leak.
#[tokio::test(flavor = "multi_thread")]
async fn ordinary_parameters_are_still_arguments() {
    let (secret, seen, _) = run_with_secret(Language::Shell, false, Place::WorkDir)
        .await
        .unwrap();
    assert!(
        seen.contains(&format!("{secret} with spaces it's")),
        "{seen}"
    );
}

#[tokio::test]
async fn a_sensitive_word_with_a_nul_byte_is_refused() {
    let fixture = Fixture::new(true);
    let mut t = task(Language::Shell, "echo never", "root");
    t.args = vec!["nul\0byte".into()];
    t.sensitive_args = true;
    let run = fixture.run(t).await;
    match &run.outcome.ending {
        Ending::Failed(reason) => assert!(reason.contains("nul byte"), "{reason}"),
        other => panic!("{other:?}"),
    }
    assert!(run.output.is_empty());
}
