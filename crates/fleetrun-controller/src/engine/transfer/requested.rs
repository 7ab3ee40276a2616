//! What a source path asked for, as the controller checks what a source agent announces.
//!
//! A source agent names each file it sends by a relative name, and that name is where the file
//! lands on every target. The controller does not take the name on trust: it reads the path it
//! asked for itself (bk-job's forms, as the agent reads them: a file, a directory ending in `/`,
//! a last component with `*`/`?` or `REGEX:`) and accepts only names that path can give. The
//! path a log shows is made from the request and the accepted name, never from what the agent
//! says. (The agent's own parser lives in `fleetrun-exec`, which the controller does not link;
//! the two follow the same rules and the API has already refused paths outside them.)

/// A path a source was asked for.
#[derive(Debug, Clone)]
pub(super) enum Requested {
    /// One file, landing as `name`.
    File { dir: String, name: String },
    /// A directory sent whole: names start with `name/`.
    Dir { parent: String, name: String },
    /// Files of `dir` whose single-component names match.
    Matching { dir: String, pattern: Pattern },
    /// A path the controller cannot read: nothing from it is accepted.
    Unreadable,
}

/// How a last component picks names.
#[derive(Debug, Clone)]
pub(super) enum Pattern {
    Wildcard(String),
    Regex(regex::Regex),
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
    pub(super) fn parse(path: &str) -> Self {
        let path = path.trim();
        if !path.starts_with('/') || path.len() > 4096 {
            return Requested::Unreadable;
        }
        let is_dir = path.ends_with('/');
        let trimmed = path.trim_end_matches('/');
        let Some((dir, last)) = trimmed.rsplit_once('/') else {
            return Requested::Unreadable;
        };
        if last.is_empty() || last == "." || last == ".." {
            return Requested::Unreadable;
        }
        let dir = if dir.is_empty() { "/" } else { dir }.to_owned();
        if let Some(regex) = last.strip_prefix("REGEX:") {
            return match regex::RegexBuilder::new(&format!("^(?:{regex})$"))
                .size_limit(1 << 20)
                .nest_limit(64)
                .build()
            {
                Ok(regex) => Requested::Matching {
                    dir,
                    pattern: Pattern::Regex(regex),
                },
                Err(_) => Requested::Unreadable,
            };
        }
        if last.contains(['*', '?']) {
            return Requested::Matching {
                dir,
                pattern: Pattern::Wildcard(last.to_owned()),
            };
        }
        let name = last.to_owned();
        if is_dir {
            Requested::Dir { parent: dir, name }
        } else {
            Requested::File { dir, name }
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

impl Pattern {
    fn matches(&self, name: &str) -> bool {
        match self {
            Pattern::Wildcard(pattern) => wildcard_matches(pattern, name),
            Pattern::Regex(regex) => regex.is_match(name),
        }
    }
}

/// `*` matches any run of characters, `?` exactly one; everything else itself.
fn wildcard_matches(pattern: &str, name: &str) -> bool {
    let p: Vec<char> = pattern.chars().collect();
    let n: Vec<char> = name.chars().collect();
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
    p[pi..].iter().all(|&c| c == '*')
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
