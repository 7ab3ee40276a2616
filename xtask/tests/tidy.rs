//! The architecture invariants that a machine can check, checked on every test run: which crate
//! may depend on which, where `unsafe` may stand, that every module says what it is, that bincode
//! stays behind the one codec module, and that the wire messages cannot change without a new
//! protocol version.

use std::{
    collections::{BTreeMap, BTreeSet},
    fs,
    path::{Path, PathBuf},
};

fn workspace_root() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .parent()
        .unwrap()
        .to_owned()
}

/// Every `.rs` file under `dir`, skipping build output.
fn rust_files(dir: &Path) -> Vec<PathBuf> {
    let mut files = Vec::new();
    let mut stack = vec![dir.to_owned()];
    while let Some(dir) = stack.pop() {
        let Ok(entries) = fs::read_dir(&dir) else {
            continue;
        };
        for entry in entries {
            let path = entry.unwrap().path();
            if path.is_dir() {
                if path.file_name().is_some_and(|n| n == "target") {
                    continue;
                }
                stack.push(path);
            } else if path.extension().is_some_and(|e| e == "rs") {
                files.push(path);
            }
        }
    }
    files.sort();
    files
}

/// The workspace's crates under `crates/`, each with the dependencies its manifest lists
/// (normal, dev and build).
fn crate_dependencies() -> BTreeMap<String, BTreeSet<String>> {
    let mut crates = BTreeMap::new();
    for entry in fs::read_dir(workspace_root().join("crates")).unwrap() {
        let manifest = entry.unwrap().path().join("Cargo.toml");
        let text = fs::read_to_string(&manifest).unwrap();
        let doc: toml::Table = text.parse().unwrap();
        let name = doc["package"]["name"].as_str().unwrap().to_owned();
        let mut deps = BTreeSet::new();
        for section in ["dependencies", "dev-dependencies", "build-dependencies"] {
            if let Some(table) = doc.get(section).and_then(|s| s.as_table()) {
                deps.extend(table.keys().cloned());
            }
        }
        crates.insert(name, deps);
    }
    crates
}

/// Which workspace crates each crate may use. A crate missing here is a new crate: it gets its
/// line (and its section in docs/ARCHITECTURE.md) before it lands.
const ALLOWED_INTERNAL: &[(&str, &[&str])] = &[
    ("fleetrun-proto", &[]),
    ("fleetrun-net", &["fleetrun-proto"]),
    ("fleetrun-exec", &[]),
    ("fleetrun-inventory", &[]),
    ("fleetrun-store", &[]),
    (
        "fleetrun-controller",
        &[
            "fleetrun-proto",
            "fleetrun-net",
            "fleetrun-store",
            "fleetrun-inventory",
        ],
    ),
    (
        "fleetrun-agent",
        &["fleetrun-proto", "fleetrun-net", "fleetrun-exec"],
    ),
    ("fleetrun-cli", &[]),
    (
        "fleetrun-swarm",
        &[
            "fleetrun-proto",
            "fleetrun-net",
            "fleetrun-exec",
            "fleetrun-agent",
        ],
    ),
];

/// Outside crates that would break a crate's promise (no I/O in proto and inventory, SQL only
/// in the store, no networking in exec).
const FORBIDDEN_EXTERNAL: &[(&str, &[&str])] = &[
    (
        "fleetrun-proto",
        &["tokio", "quinn", "socket2", "sqlx", "reqwest", "axum"],
    ),
    (
        "fleetrun-inventory",
        &["tokio", "quinn", "sqlx", "reqwest", "axum"],
    ),
    ("fleetrun-exec", &["quinn", "sqlx", "reqwest", "axum"]),
    ("fleetrun-net", &["sqlx", "axum"]),
];

#[test]
fn crates_depend_only_on_what_the_architecture_allows() {
    let crates = crate_dependencies();
    let allowed: BTreeMap<_, _> = ALLOWED_INTERNAL.iter().copied().collect();
    let mut problems = Vec::new();
    for (name, deps) in &crates {
        let Some(may_use) = allowed.get(name.as_str()) else {
            problems.push(format!(
                "{name} is not in ALLOWED_INTERNAL: say what it may depend on"
            ));
            continue;
        };
        for dep in deps.iter().filter(|d| crates.contains_key(*d)) {
            if !may_use.contains(&dep.as_str()) {
                problems.push(format!("{name} must not depend on {dep}"));
            }
        }
    }
    for (name, forbidden) in FORBIDDEN_EXTERNAL {
        for dep in *forbidden {
            if crates[*name].contains(*dep) {
                problems.push(format!("{name} must not depend on {dep}"));
            }
        }
    }
    for (name, deps) in &crates {
        if deps.contains("sqlx") && name != "fleetrun-store" {
            problems.push(format!(
                "only fleetrun-store speaks SQL, but {name} uses sqlx"
            ));
        }
        if deps.contains("bincode") && name != "fleetrun-proto" {
            problems.push(format!(
                "only fleetrun-proto's codec uses bincode, but {name} depends on it"
            ));
        }
    }
    assert!(problems.is_empty(), "{}", problems.join("\n"));
}

/// Code with comments, string literals (raw ones too) and character literals blanked, so
/// that words in them do not count. Line breaks are kept, so line numbers stay true.
fn code_only(source: &str) -> String {
    let chars: Vec<char> = source.chars().collect();
    let mut out = String::with_capacity(source.len());
    let mut i = 0;
    let ident = |c: char| c.is_alphanumeric() || c == '_';
    while i < chars.len() {
        let c = chars[i];
        let next = chars.get(i + 1).copied();
        if c == '/' && next == Some('/') {
            while i < chars.len() && chars[i] != '\n' {
                i += 1;
            }
            continue;
        }
        if c == '/' && next == Some('*') {
            i += 2;
            while i < chars.len() && !(chars[i] == '*' && chars.get(i + 1) == Some(&'/')) {
                if chars[i] == '\n' {
                    out.push('\n');
                }
                i += 1;
            }
            i += 2;
            continue;
        }
        let raw_start =
            c == 'r' && (i == 0 || !ident(chars[i - 1])) && matches!(next, Some('"' | '#'));
        if raw_start {
            let mut j = i + 1;
            let mut hashes = 0;
            while chars.get(j) == Some(&'#') {
                hashes += 1;
                j += 1;
            }
            if chars.get(j) == Some(&'"') {
                j += 1;
                loop {
                    match chars.get(j) {
                        None => break,
                        Some('"') if (1..=hashes).all(|k| chars.get(j + k) == Some(&'#')) => {
                            j += 1 + hashes;
                            break;
                        }
                        Some('\n') => out.push('\n'),
                        _ => {}
                    }
                    j += 1;
                }
                out.push_str("\"\"");
                i = j;
                continue;
            }
        }
        if c == '"' {
            i += 1;
            while i < chars.len() && chars[i] != '"' {
                if chars[i] == '\\' {
                    i += 1;
                }
                if chars.get(i) == Some(&'\n') {
                    out.push('\n');
                }
                i += 1;
            }
            i += 1;
            out.push_str("\"\"");
            continue;
        }
        if c == '\'' {
            // A character literal ('x', '\n', '\'', '\u{..}'); a lifetime has no closing quote.
            let close = if next == Some('\\') {
                (i + 3..chars.len().min(i + 12)).find(|&k| chars[k] == '\'')
            } else if chars.get(i + 2) == Some(&'\'') {
                Some(i + 2)
            } else {
                None
            };
            if let Some(close) = close {
                out.push_str("' '");
                i = close + 1;
                continue;
            }
        }
        out.push(c);
        i += 1;
    }
    out
}

#[test]
fn unsafe_code_only_in_the_exec_sys_module() {
    let root = workspace_root();
    let allowed = root.join("crates/fleetrun-exec/src/sys.rs");
    let mut offenders = Vec::new();
    for dir in ["crates", "xtask", "tests"] {
        for file in rust_files(&root.join(dir)) {
            if file == allowed {
                continue;
            }
            let code = code_only(&fs::read_to_string(&file).unwrap());
            for (n, line) in code.lines().enumerate() {
                let words: Vec<&str> = line
                    .split(|c: char| !(c.is_alphanumeric() || c == '_'))
                    .collect();
                // `unsafe_code` in a lint attribute is a single word and does not match.
                if words.contains(&"unsafe") {
                    offenders.push(format!("{}:{}", file.display(), n + 1));
                }
            }
        }
    }
    assert!(
        offenders.is_empty(),
        "`unsafe` outside crates/fleetrun-exec/src/sys.rs:\n{}",
        offenders.join("\n")
    );
    assert!(
        fs::read_to_string(&allowed).unwrap().contains("// SAFETY:"),
        "sys.rs explains each unsafe block with a `// SAFETY:` comment"
    );
}

#[test]
fn every_module_starts_with_a_doc_comment() {
    let root = workspace_root();
    let mut missing = Vec::new();
    for dir in ["crates", "xtask", "tests"] {
        for file in rust_files(&root.join(dir)) {
            let text = fs::read_to_string(&file).unwrap();
            let first = text
                .lines()
                .find(|l| !l.trim().is_empty())
                .unwrap_or_default();
            if !first.starts_with("//!") {
                missing.push(file.display().to_string());
            }
        }
    }
    assert!(
        missing.is_empty(),
        "these files do not start with a `//!` comment saying what they are:\n{}",
        missing.join("\n")
    );
}

#[test]
fn bincode_only_in_the_codec_module() {
    let root = workspace_root();
    let codec = root.join("crates/fleetrun-proto/src/codec.rs");
    let mut offenders = Vec::new();
    for dir in ["crates", "xtask", "tests"] {
        for file in rust_files(&root.join(dir)) {
            if file == codec {
                continue;
            }
            let code = code_only(&fs::read_to_string(&file).unwrap());
            // A path through the crate (`bincode::`, `use bincode`) is a use; a word is not.
            if code.contains("bincode::") || code.contains("use bincode") {
                offenders.push(file.display().to_string());
            }
        }
    }
    assert!(
        offenders.is_empty(),
        "bincode used outside fleetrun-proto/src/codec.rs:\n{}",
        offenders.join("\n")
    );
}

/// The digest of the wire messages as their code stands: comments and blank lines are left
/// out, so documenting a message needs no new protocol version.
fn wire_digest() -> String {
    let root = workspace_root();
    let text = fs::read_to_string(root.join("crates/fleetrun-proto/src/messages.rs")).unwrap();
    let code = code_only(&text);
    let normalized: Vec<&str> = code
        .lines()
        .map(str::trim)
        .filter(|l| !l.is_empty())
        .collect();
    let digest = ring::digest::digest(&ring::digest::SHA256, normalized.join("\n").as_bytes());
    digest.as_ref().iter().map(|b| format!("{b:02x}")).collect()
}

#[test]
fn wire_messages_change_only_with_a_new_protocol_version() {
    let pinned = fleetrun_proto::WIRE_DIGESTS;
    let current = wire_digest();
    let (latest_version, latest_digest) = *pinned.last().expect("WIRE_DIGESTS is empty");
    assert_eq!(
        latest_version,
        fleetrun_proto::PROTOCOL_VERSION,
        "the last entry of WIRE_DIGESTS is for the current PROTOCOL_VERSION"
    );
    assert_eq!(
        latest_digest,
        current,
        "crates/fleetrun-proto/src/messages.rs changed what goes on the wire: bump \
         PROTOCOL_VERSION (and decide MIN_PROTOCOL_VERSION) and append \
         ({}, \"{current}\") to WIRE_DIGESTS",
        fleetrun_proto::PROTOCOL_VERSION + 1
    );
    let versions: BTreeSet<u32> = pinned.iter().map(|(v, _)| *v).collect();
    let digests: BTreeSet<&str> = pinned.iter().map(|(_, d)| *d).collect();
    assert_eq!(
        versions.len(),
        pinned.len(),
        "one entry per protocol version"
    );
    assert_eq!(
        digests.len(),
        pinned.len(),
        "each version has its own digest"
    );
    assert!(
        pinned.windows(2).all(|w| w[0].0 < w[1].0),
        "WIRE_DIGESTS is in version order"
    );
}

#[test]
fn code_only_blanks_comments_and_strings() {
    let code = code_only(
        "let a = \"unsafe \\\" x\"; // unsafe\nlet q = '\"'; unsafe_code /* unsafe\n */ \
         r#\"unsafe \"quoted\" \"#; 'a: loop {}",
    );
    assert!(!code.contains("unsafe "), "{code}");
    assert!(code.contains("unsafe_code"));
    assert!(code.contains("'a: loop"));
    assert_eq!(code.lines().count(), 3);
}
