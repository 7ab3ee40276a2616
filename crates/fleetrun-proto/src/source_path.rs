//! bk-job's source paths (`file_source_list[].file_list`), read once for both sides: the agent
//! that reads a source (`fleetrun-exec`'s `collect`) and the controller that checks the names a
//! source announces can come from the path it asked for. An absolute file; a directory ending
//! in `/`, sent whole; a last component with `*` and `?` wildcards; a last component
//! `REGEX:<pattern>` matched, anchored at both ends, against the names in its directory.
//! Parsing only: no file system is touched here.

use std::path::{Path, PathBuf};

/// The deepest source path accepted, in directories.
pub const MAX_SOURCE_DEPTH: usize = 64;

/// A source path, understood.
#[derive(Debug, Clone)]
pub enum SourcePath {
    /// One file.
    File { dir: PathBuf, name: String },
    /// A directory, sent whole under its own name.
    Dir { parent: PathBuf, name: String },
    /// The files of `dir` whose names match.
    Matching { dir: PathBuf, pattern: NamePattern },
}

/// How a last component picks names.
#[derive(Debug, Clone)]
pub enum NamePattern {
    /// `*` any run of characters, `?` one character.
    Wildcard(String),
    Regex(regex::Regex),
}

impl NamePattern {
    /// Whether `name` (one component) is picked.
    pub fn matches(&self, name: &str) -> bool {
        match self {
            NamePattern::Wildcard(pattern) => wildcard_matches(pattern, name),
            NamePattern::Regex(regex) => regex.is_match(name),
        }
    }
}

/// Why a path is not one a source may be asked for.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum SourcePathError {
    #[error("{0:?} is not an absolute path")]
    NotAbsolute(String),
    #[error("{0:?} contains . or .. components")]
    DotComponents(String),
    #[error("{0:?} contains a control character or is longer than 4096 bytes")]
    Unprintable(String),
    #[error("{0:?}: wildcards and REGEX: are allowed only in the last component")]
    PatternInDirectory(String),
    #[error("{0:?} names no file (the root directory is not sent)")]
    Root(String),
    #[error("{path:?}: the regular expression does not compile: {why}")]
    BadRegex { path: String, why: String },
    #[error("{0:?} is more than 64 directories deep")]
    TooDeep(String),
}

const REGEX_PREFIX: &str = "REGEX:";

/// Reads one path as bk-job writes it.
pub fn parse_source_path(path: &str) -> Result<SourcePath, SourcePathError> {
    let owned = || path.to_owned();
    if !path.starts_with('/') {
        return Err(SourcePathError::NotAbsolute(owned()));
    }
    if path.len() > 4096 || path.chars().any(|c| c < ' ' || c == '\u{7f}') {
        return Err(SourcePathError::Unprintable(owned()));
    }
    let is_dir = path.ends_with('/');
    let trimmed = path.trim_end_matches('/');
    let (dir, last) = trimmed.rsplit_once('/').unwrap_or(("", trimmed));
    if last.is_empty() {
        return Err(SourcePathError::Root(owned()));
    }
    if dir.split('/').any(|c| c == "." || c == "..")
        || (!last.starts_with(REGEX_PREFIX) && (last == "." || last == ".."))
    {
        return Err(SourcePathError::DotComponents(owned()));
    }
    if dir.contains(['*', '?']) || dir.contains(REGEX_PREFIX) {
        return Err(SourcePathError::PatternInDirectory(owned()));
    }
    if Path::new(trimmed).components().count() > MAX_SOURCE_DEPTH + 1 {
        return Err(SourcePathError::TooDeep(owned()));
    }
    let dir = PathBuf::from(if dir.is_empty() { "/" } else { dir });
    if let Some(regex) = last.strip_prefix(REGEX_PREFIX) {
        let regex = regex::RegexBuilder::new(&format!("^(?:{regex})$"))
            .size_limit(1 << 20)
            .nest_limit(64)
            .build()
            .map_err(|e| SourcePathError::BadRegex {
                path: owned(),
                why: e.to_string(),
            })?;
        return Ok(SourcePath::Matching {
            dir,
            pattern: NamePattern::Regex(regex),
        });
    }
    if last.contains(['*', '?']) {
        return Ok(SourcePath::Matching {
            dir,
            pattern: NamePattern::Wildcard(last.to_owned()),
        });
    }
    Ok(if is_dir {
        SourcePath::Dir {
            parent: dir,
            name: last.to_owned(),
        }
    } else {
        SourcePath::File {
            dir,
            name: last.to_owned(),
        }
    })
}

/// `*` matches any run of characters, `?` exactly one; everything else itself.
pub fn wildcard_matches(pattern: &str, name: &str) -> bool {
    let p: Vec<char> = pattern.chars().collect();
    let n: Vec<char> = name.chars().collect();
    // Iterative matching with one backtrack point: linear in practice, no recursion.
    let (mut pi, mut ni) = (0, 0);
    let mut star: Option<(usize, usize)> = None;
    while ni < n.len() {
        if pi < p.len() && (p[pi] == '?' || p[pi] == n[ni]) {
            pi += 1;
            ni += 1;
        } else if pi < p.len() && p[pi] == '*' {
            star = Some((pi, ni));
            pi += 1;
        } else if let Some((sp, sn)) = star {
            pi = sp + 1;
            ni = sn + 1;
            star = Some((sp, sn + 1));
        } else {
            return false;
        }
    }
    p[pi..].iter().all(|c| *c == '*')
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn paths_read_as_bk_job_writes_them() {
        assert!(matches!(
            parse_source_path("/tmp/a.txt"),
            Ok(SourcePath::File { ref dir, ref name }) if dir == Path::new("/tmp") && name == "a.txt"
        ));
        assert!(matches!(
            parse_source_path("/data/logs/"),
            Ok(SourcePath::Dir { ref parent, ref name }) if parent == Path::new("/data") && name == "logs"
        ));
        assert!(matches!(
            parse_source_path("/tmp/*.log"),
            Ok(SourcePath::Matching {
                pattern: NamePattern::Wildcard(_),
                ..
            })
        ));
        let Ok(SourcePath::Matching {
            pattern: NamePattern::Regex(regex),
            ..
        }) = parse_source_path("/tmp/REGEX:[a-z]*.txt")
        else {
            panic!("regex");
        };
        assert!(regex.is_match("abc.txt"));
        assert!(!regex.is_match("abc.txt.bak"), "anchored at both ends");
        assert!(matches!(
            parse_source_path("/a1.txt"),
            Ok(SourcePath::File { ref dir, .. }) if dir == Path::new("/")
        ));
    }

    #[test]
    fn bad_paths_are_refused() {
        for (bad, want) in [
            ("tmp/a", "absolute"),
            ("/tmp/../etc/passwd", ". or .."),
            ("/tmp/./a", ". or .."),
            ("/tmp/..", ". or .."),
            ("/", "root"),
            ("/*/a", "last component"),
            ("/REGEX:x/a", "last component"),
            ("/tmp/REGEX:(", "compile"),
            ("/tmp/a\nb", "control"),
        ] {
            let e = parse_source_path(bad).expect_err(bad).to_string();
            assert!(e.contains(want), "{bad}: {e}");
        }
    }

    #[test]
    fn wildcards() {
        for (p, n, want) in [
            ("*.log", "a.log", true),
            ("*.log", "a.log.1", false),
            ("a?c", "abc", true),
            ("a?c", "ac", false),
            ("*", "", true),
            ("*a*b", "xxaxxb", true),
            ("*a*b", "xxaxxbx", false),
            ("app-*-*.tar", "app-1-2.tar", true),
        ] {
            assert_eq!(wildcard_matches(p, n), want, "{p} {n}");
        }
    }
}
