//! What a source path asked for, as the controller checks what a source agent announces.
//!
//! A source agent names each file it sends by a relative name, and that name is where the file
//! lands on every target. The controller does not take the name on trust: it reads the path it
//! asked for itself (bk-job's forms, as the agent reads them: a file, a directory ending in `/`,
//! a last component with `*`/`?` or `REGEX:`) and accepts only names that path can give. The
//! path a log shows is made from the request and the accepted name, never from what the agent
//! says. The path is read by the parser the agent reads it with
//! (`fleetrun_proto::source_path`), and names are matched by the same matcher, so the two
//! sides cannot drift apart.

use fleetrun_proto::source_path::{NamePattern, SourcePath, parse_source_path};

/// A path a source was asked for.
#[derive(Debug, Clone)]
pub(super) enum Requested {
    /// One file, landing as `name`.
    File { dir: String, name: String },
    /// A directory sent whole: names start with `name/`.
    Dir { parent: String, name: String },
    /// Files of `dir` whose single-component names match.
    Matching { dir: String, pattern: NamePattern },
    /// A path the controller cannot read: nothing from it is accepted.
    Unreadable,
}

/// Whether a name announced for a path fits it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(super) enum Fit {
    /// A file the path can give.
    File,
    /// The directory itself: only a failure to read it may be reported under this name.
    DirItself,
    /// Not something the path can give.
    No,
}

impl Requested {
    /// Reads `path` as the source agent does; a path the agent would refuse gives nothing.
    pub(super) fn parse(path: &str) -> Self {
        let shown = |dir: &std::path::Path| dir.to_string_lossy().into_owned();
        match parse_source_path(path.trim()) {
            Ok(SourcePath::File { dir, name }) => Requested::File {
                dir: shown(&dir),
                name,
            },
            Ok(SourcePath::Dir { parent, name }) => Requested::Dir {
                parent: shown(&parent),
                name,
            },
            Ok(SourcePath::Matching { dir, pattern }) => Requested::Matching {
                dir: shown(&dir),
                pattern,
            },
            Err(_) => Requested::Unreadable,
        }
    }

    /// Whether `relative` (already a plain relative name) is one this path can give.
    pub(super) fn fit(&self, relative: &str) -> Fit {
        match self {
            Requested::File { name, .. } if relative == name => Fit::File,
            Requested::Dir { name, .. } if relative == name => Fit::DirItself,
            Requested::Dir { name, .. }
                if relative
                    .strip_prefix(name.as_str())
                    .is_some_and(|rest| rest.starts_with('/')) =>
            {
                Fit::File
            }
            Requested::Matching { pattern, .. }
                if !relative.contains('/') && pattern.matches(relative) =>
            {
                Fit::File
            }
            _ => Fit::No,
        }
    }

    /// The source path a log shows for `relative`, made from the request.
    pub(super) fn shown(&self, relative: &str) -> Option<String> {
        let dir = match self {
            Requested::File { dir, .. } | Requested::Matching { dir, .. } => dir,
            Requested::Dir { parent, .. } => parent,
            Requested::Unreadable => return None,
        };
        Some(super::join(dir, relative))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_path_accepts_only_the_names_it_can_give() {
        let table: &[(&str, &str, Fit)] = &[
            ("/tmp/app.conf", "app.conf", Fit::File),
            ("/tmp/app.conf", "cron.d/evil", Fit::No),
            ("/tmp/app.conf", "other.conf", Fit::No),
            ("/data/logs/", "logs/a.log", Fit::File),
            ("/data/logs/", "logs/sub/b.log", Fit::File),
            ("/data/logs/", "logs", Fit::DirItself),
            ("/data/logs/", "logsx/a", Fit::No),
            ("/data/logs/", "cron.d/evil", Fit::No),
            ("/tmp/*.log", "a.log", Fit::File),
            ("/tmp/*.log", "a.txt", Fit::No),
            ("/tmp/*.log", "sub/a.log", Fit::No),
            ("/tmp/a?.txt", "a1.txt", Fit::File),
            ("/tmp/REGEX:[a-z]+\\.txt", "abc.txt", Fit::File),
            ("/tmp/REGEX:[a-z]+\\.txt", "abc.txt.evil", Fit::No),
            ("/tmp/REGEX:.*", "cron.d/evil", Fit::No),
            ("relative", "relative", Fit::No),
            ("/tmp/REGEX:(", "(", Fit::No),
        ];
        for (path, relative, fit) in table {
            assert_eq!(
                Requested::parse(path).fit(relative),
                *fit,
                "{path} {relative}"
            );
        }
    }

    #[test]
    fn a_path_the_agent_refuses_is_unreadable() {
        let deep = format!("{}/a.txt", "/d".repeat(65));
        for path in [
            "/tmp/../x",
            "/tmp/./x",
            "/tmp/*/x",
            "/tmp/REGEX:(",
            deep.as_str(),
        ] {
            assert!(
                matches!(Requested::parse(path), Requested::Unreadable),
                "{path}"
            );
            assert_eq!(Requested::parse(path).fit("x"), Fit::No, "{path}");
        }
    }

    #[test]
    fn the_shown_path_comes_from_the_request() {
        let shown = |path: &str, relative: &str| Requested::parse(path).shown(relative);
        assert_eq!(
            shown("/tmp/app.conf", "app.conf").as_deref(),
            Some("/tmp/app.conf")
        );
        assert_eq!(
            shown("/data/logs/", "logs/a").as_deref(),
            Some("/data/logs/a")
        );
        assert_eq!(shown("/*.log", "a.log").as_deref(), Some("/a.log"));
        assert_eq!(shown("x", "x"), None);
    }
}
