//! `fleetrun completions SHELL` and `fleetrun man`: shell completion scripts (clap_complete) and
//! manual pages (clap_mangen), generated from the command line's own definition so they never
//! drift from it. Packages install them; `fleetrun man --dir DIR` writes one page per command.

use std::{io::Write as _, path::Path, process::ExitCode};

use clap::CommandFactory;

use crate::{args::Cli, error::exit};

pub fn completions(shell: clap_complete::Shell) -> ExitCode {
    let mut command = Cli::command();
    // Generated in memory: clap_complete panics on a failed write (`| head` closing the pipe).
    let mut script = Vec::new();
    clap_complete::generate(shell, &mut command, "fleetrun", &mut script);
    let mut out = std::io::stdout().lock();
    finish(out.write_all(&script).and_then(|()| out.flush()))
}

pub fn man(dir: Option<&Path>) -> ExitCode {
    let command = Cli::command();
    let written = match dir {
        Some(dir) => {
            std::fs::create_dir_all(dir).and_then(|()| clap_mangen::generate_to(command, dir))
        }
        None => {
            let mut out = std::io::stdout().lock();
            clap_mangen::Man::new(command)
                .render(&mut out)
                .and_then(|()| out.flush())
        }
    };
    finish(written)
}

fn finish(result: std::io::Result<()>) -> ExitCode {
    match result {
        Ok(()) => ExitCode::from(exit::OK),
        Err(e) if e.kind() == std::io::ErrorKind::BrokenPipe => ExitCode::from(exit::OUTPUT_CLOSED),
        Err(e) => {
            eprintln!("fleetrun: {e}");
            ExitCode::from(exit::USAGE)
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_shell_gets_a_script_naming_the_commands() {
        for shell in [
            clap_complete::Shell::Bash,
            clap_complete::Shell::Zsh,
            clap_complete::Shell::Fish,
        ] {
            let mut out = Vec::new();
            clap_complete::generate(shell, &mut Cli::command(), "fleetrun", &mut out);
            let text = String::from_utf8(out).unwrap();
            for word in ["fleetrun", "audit", "inventory", "completions"] {
                assert!(text.contains(word), "{shell:?} lacks {word}");
            }
        }
    }

    #[test]
    fn man_pages_are_written_for_each_command() {
        let dir = tempfile::tempdir().unwrap();
        clap_mangen::generate_to(Cli::command(), dir.path()).unwrap();
        for page in [
            "fleetrun.1",
            "fleetrun-run.1",
            "fleetrun-audit.1",
            "fleetrun-audit-verify.1",
        ] {
            let text = std::fs::read_to_string(dir.path().join(page)).unwrap();
            assert!(text.starts_with(".ie") || text.contains(".TH"), "{page}");
        }
    }
}
