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

/// The program to execute, its arguments, and what it is handed besides.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct CommandLine {
    pub program: PathBuf,
    pub args: Vec<OsString>,
    /// Set on top of the clean environment.
    pub env: Vec<(OsString, OsString)>,
    /// Written to a pipe the interpreter reads as descriptor 3: the
    /// script's arguments, kept off its command line.
    pub hidden_args: Option<Vec<u8>>,
}

/// bash runs the file named by `BASH_ENV` before a non-interactive script,
/// in the same shell: positional parameters set there are the script's
/// `$@`, while `$0`, `BASH_SOURCE`, `return` and the script's own reading
/// stay exactly those of `bash script`. The file is the pipe, which carries
/// `set -- 'word' ...` and then closes itself and forgets `BASH_ENV`, so the
/// script's own children see neither.
const SHELL_ARGS_FILE: &str = "/dev/fd/3";

/// Perl compiles `-M` code before the script, with `@ARGV` already set, so a
/// `BEGIN` block there can replace it. `use 5` does nothing; the script
/// stays the main program (`$0`, `#!` switches, `die` and `__DATA__` as
/// usual).
const PERL_PREAMBLE: &str = r#"-M5; BEGIN { open(my $fleetrun_args, "<&=", 3) or die "cannot read the script's arguments: $!\n"; local $/ = "\0"; @ARGV = <$fleetrun_args>; chomp(@ARGV); close($fleetrun_args); }"#;

/// Python has no such hook: a `-c` program reads the arguments, sets
/// `sys.argv` and `sys.path[0]` as `python3 script` would have, and runs
/// the script as `__main__` with runpy (tracebacks show two more frames).
const PYTHON_WRAPPER: &str = r#"import os, runpy, sys
with open(3, "rb") as args:
    sys.argv[:] = [sys.argv[1]] + [os.fsdecode(w) for w in args.read().split(b"\0")[:-1]]
sys.path[0] = os.path.dirname(os.path.abspath(sys.argv[0]))
runpy.run_path(sys.argv[0], run_name="__main__")
"#;

/// Builds `interpreter [flags] script args...`, or names the interpreter that
/// is not installed. With `hide_args`, shell, Perl and Python get the
/// arguments through [`CommandLine::hidden_args`] instead; the caller has
/// made sure no argument contains a NUL byte, which no program could receive
/// as an argument anyway.
pub(crate) fn command_line(
    language: Language,
    script: &Path,
    args: &[String],
    hide_args: bool,
) -> Result<CommandLine, &'static str> {
    let name = language.interpreter();
    let program = find_on_path(name, SANE_PATH).ok_or(name)?;
    let mut line = CommandLine {
        program,
        args: language
            .interpreter_flags()
            .iter()
            .map(OsString::from)
            .collect(),
        env: Vec::new(),
        hidden_args: None,
    };
    match (hide_args, language) {
        (true, Language::Shell) => {
            let mut code = String::from("set --");
            for arg in args {
                code.push_str(" '");
                code.push_str(&arg.replace('\'', r"'\''"));
                code.push('\'');
            }
            code.push_str("\nexec 3<&-\nunset BASH_ENV\n");
            line.env.push(("BASH_ENV".into(), SHELL_ARGS_FILE.into()));
            line.args.push(script.into());
            line.hidden_args = Some(code.into_bytes());
        }
        (true, Language::Perl | Language::Python) => {
            if language == Language::Perl {
                line.args.push(PERL_PREAMBLE.into());
            } else {
                line.args.extend(["-c".into(), PYTHON_WRAPPER.into()]);
            }
            line.args.push(script.into());
            let mut words = Vec::new();
            for arg in args {
                words.extend_from_slice(arg.as_bytes());
                words.push(0);
            }
            line.hidden_args = Some(words);
        }
        _ => {
            line.args.push(script.into());
            line.args.extend(args.iter().map(OsString::from));
        }
    }
    Ok(line)
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
        let line = command_line(
            Language::Shell,
            Path::new("/s/script.sh"),
            &["a".into()],
            false,
        )
        .unwrap();
        assert!(line.program.starts_with("/usr/bin") || line.program.starts_with("/bin"));
        assert!(line.program.ends_with("bash"));
        assert_eq!(line.args, vec![OsString::from("/s/script.sh"), "a".into()]);
    }

    #[test]
    fn python_is_never_a_pyenv_shim() {
        let line = command_line(Language::Python, Path::new("/s/script.py"), &[], false).unwrap();
        assert!(!line.program.to_string_lossy().contains("pyenv"));
    }

    #[test]
    fn bat_needs_cmd_exe() {
        assert_eq!(
            command_line(Language::Bat, Path::new("/s/script.bat"), &[], true),
            Err("cmd.exe")
        );
    }

    #[test]
    fn hidden_shell_arguments_are_quoted_for_set() {
        let args = [
            "a b".to_owned(),
            "it's".to_owned(),
            String::new(),
            "$(id)\n".to_owned(),
        ];
        let line = command_line(Language::Shell, Path::new("/s/script.sh"), &args, true).unwrap();
        assert_eq!(line.args, vec![OsString::from("/s/script.sh")]);
        assert_eq!(
            line.env,
            vec![(OsString::from("BASH_ENV"), OsString::from("/dev/fd/3"))]
        );
        assert_eq!(
            String::from_utf8(line.hidden_args.unwrap()).unwrap(),
            "set -- 'a b' 'it'\\''s' '' '$(id)\n'\nexec 3<&-\nunset BASH_ENV\n"
        );
    }

    #[test]
    fn hidden_words_are_nul_terminated() {
        let args = ["x".to_owned(), String::new()];
        let line = command_line(Language::Perl, Path::new("/s/script.pl"), &args, true).unwrap();
        assert_eq!(line.args.last().unwrap(), "/s/script.pl");
        assert_eq!(line.hidden_args.unwrap(), b"x\0\0");
        assert!(line.env.is_empty());
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
