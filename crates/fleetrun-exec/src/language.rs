//! Script languages and the interpreters that run them.

use std::ffi::OsString;
use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};

/// The PATH scripts run with, and the one interpreters are looked up on: the
/// agent's own PATH (pyenv shims, cargo, ...) must not decide what runs.
pub(crate) const SANE_PATH: &str = "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin";

/// A script language, numbered like bk-job's `script_language`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Language {
    /// 1: run with `bash`.
    Shell,
    /// 2: run with `cmd.exe`, which Linux hosts do not have.
    Bat,
    /// 3: run with `perl`.
    Perl,
    /// 4: run with `python3`.
    Python,
    /// 5: run with `pwsh -NoProfile -NonInteractive -File`.
    PowerShell,
}

impl Language {
    /// The language for a bk-job `script_language` code.
    pub fn from_code(code: i32) -> Option<Self> {
        match code {
            1 => Some(Self::Shell),
            2 => Some(Self::Bat),
            3 => Some(Self::Perl),
            4 => Some(Self::Python),
            5 => Some(Self::PowerShell),
            _ => None,
        }
    }

    /// The bk-job `script_language` code.
    pub fn code(self) -> i32 {
        match self {
            Self::Shell => 1,
            Self::Bat => 2,
            Self::Perl => 3,
            Self::Python => 4,
            Self::PowerShell => 5,
        }
    }

    /// The interpreter's name, as looked up on [`SANE_PATH`].
    pub fn interpreter(self) -> &'static str {
        match self {
            Self::Shell => "bash",
            Self::Bat => "cmd.exe",
            Self::Perl => "perl",
            Self::Python => "python3",
            Self::PowerShell => "pwsh",
        }
    }

    /// Arguments between the interpreter and the script path.
    fn interpreter_flags(self) -> &'static [&'static str] {
        match self {
            Self::PowerShell => &["-NoProfile", "-NonInteractive", "-File"],
            Self::Bat => &["/c"],
            Self::Shell | Self::Perl | Self::Python => &[],
        }
    }

    /// The staged script's file name; pwsh and cmd.exe insist on the
    /// extension.
    pub(crate) fn script_file_name(self) -> &'static str {
        match self {
            Self::Shell => "script.sh",
            Self::Bat => "script.bat",
            Self::Perl => "script.pl",
            Self::Python => "script.py",
            Self::PowerShell => "script.ps1",
        }
    }
}

/// The program to execute and its arguments.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct CommandLine {
    pub program: PathBuf,
    pub args: Vec<OsString>,
}

/// Builds `interpreter [flags] script args...`, or names the interpreter that
/// is not installed.
pub(crate) fn command_line(
    language: Language,
    script: &Path,
    args: &[String],
) -> Result<CommandLine, &'static str> {
    let name = language.interpreter();
    let program = find_on_path(name, SANE_PATH).ok_or(name)?;
    let mut argv: Vec<OsString> = language
        .interpreter_flags()
        .iter()
        .map(OsString::from)
        .collect();
    argv.push(script.into());
    argv.extend(args.iter().map(OsString::from));
    Ok(CommandLine {
        program,
        args: argv,
    })
}

/// The first executable regular file called `name` in the directories of
/// `path`.
fn find_on_path(name: &str, path: &str) -> Option<PathBuf> {
    path.split(':')
        .filter(|dir| !dir.is_empty())
        .map(|dir| Path::new(dir).join(name))
        .find(|candidate| {
            candidate
                .metadata()
                .is_ok_and(|meta| meta.is_file() && meta.permissions().mode() & 0o111 != 0)
        })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn codes_round_trip() {
        for code in 1..=5 {
            assert_eq!(Language::from_code(code).unwrap().code(), code);
        }
        assert_eq!(Language::from_code(0), None);
        assert_eq!(Language::from_code(6), None);
        assert_eq!(Language::from_code(4), Some(Language::Python));
    }

    #[test]
    fn shell_runs_with_bash_from_the_sane_path() {
        let line = command_line(Language::Shell, Path::new("/s/script.sh"), &["a".into()]).unwrap();
        assert!(line.program.starts_with("/usr/bin") || line.program.starts_with("/bin"));
        assert!(line.program.ends_with("bash"));
        assert_eq!(line.args, vec![OsString::from("/s/script.sh"), "a".into()]);
    }

    #[test]
    fn python_is_never_a_pyenv_shim() {
        let line = command_line(Language::Python, Path::new("/s/script.py"), &[]).unwrap();
        assert!(!line.program.to_string_lossy().contains("pyenv"));
    }

    #[test]
    fn bat_needs_cmd_exe() {
        assert_eq!(
            command_line(Language::Bat, Path::new("/s/script.bat"), &[]),
            Err("cmd.exe")
        );
    }

    #[test]
    fn lookup_skips_directories_and_non_executables() {
        let dir = tempfile::tempdir().unwrap();
        std::fs::create_dir(dir.path().join("tool")).unwrap();
        let other = tempfile::tempdir().unwrap();
        std::fs::write(other.path().join("tool"), "").unwrap();
        let path = format!("{}:{}", dir.path().display(), other.path().display());
        assert_eq!(find_on_path("tool", &path), None);
        let third = tempfile::tempdir().unwrap();
        let tool = third.path().join("tool");
        std::fs::write(&tool, "").unwrap();
        std::fs::set_permissions(&tool, std::fs::Permissions::from_mode(0o755)).unwrap();
        let path = format!("{path}::{}", third.path().display());
        assert_eq!(find_on_path("tool", &path), Some(tool));
    }
}
