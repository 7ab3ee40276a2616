//! The architecture invariants that a machine can check, checked on every test run: which crate
//! may depend on which, where `unsafe` may stand, that every module says what it is, that no
//! `todo!` or `dbg!` is left in, that bincode stays behind the one codec module, and that the
//! wire messages cannot change without a new protocol version.
//!
//! The wire check digests `fleetrun-proto/src/messages.rs` and compares it with the entry pinned
//! for the current `PROTOCOL_VERSION` in `fleetrun_proto::WIRE_DIGESTS`: the pinned digests live
//! there, next to the version, and nowhere else.

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

/// The kinds of dependency a manifest lists.
const DEPENDENCY_SECTIONS: [&str; 3] = ["dependencies", "dev-dependencies", "build-dependencies"];

/// The workspace's crates under `crates/`, each with its manifest.
fn crate_manifests() -> BTreeMap<String, toml::Table> {
    let mut crates = BTreeMap::new();
    for entry in fs::read_dir(workspace_root().join("crates")).unwrap() {
        let manifest = entry.unwrap().path().join("Cargo.toml");
        let text = fs::read_to_string(&manifest).unwrap();
        let doc: toml::Table = text.parse().unwrap();
        let name = doc["package"]["name"].as_str().unwrap().to_owned();
        crates.insert(name, doc);
    }
    crates
}

/// The dependencies a manifest lists in `section`, also under `[target.'cfg(..)'.<section>]`.
fn section_dependencies(manifest: &toml::Table, section: &str) -> BTreeSet<String> {
    let targets = manifest.get("target").and_then(|t| t.as_table());
    let per_target = targets
        .into_iter()
        .flat_map(|t| t.values())
        .filter_map(|t| t.get(section));
    manifest
        .get(section)
        .into_iter()
        .chain(per_target)
        .filter_map(|table| table.as_table())
        .flat_map(|table| table.keys().cloned())
        .collect()
}

/// The workspace's crates under `crates/`, each with the dependencies its manifest lists
/// (normal, dev and build, merged).
fn crate_dependencies() -> BTreeMap<String, BTreeSet<String>> {
    crate_manifests()
        .into_iter()
        .map(|(name, manifest)| {
            let deps = DEPENDENCY_SECTIONS
                .iter()
                .flat_map(|section| section_dependencies(&manifest, section))
                .collect();
            (name, deps)
        })
        .collect()
}

/// Which workspace crates each crate may use. A crate missing here is a new crate: it gets its
/// line (and its section in docs/ARCHITECTURE.md) before it lands.
const ALLOWED_INTERNAL: &[(&str, &[&str])] = &[
    ("fleetrun-api", &[]),
    ("fleetrun-proto", &[]),
    ("fleetrun-net", &["fleetrun-proto"]),
    // The source-path grammar (`fleetrun_proto::source_path`), which the controller checks
    // a source's names with: one parser for both sides. Proto does no I/O.
    ("fleetrun-exec", &["fleetrun-proto"]),
    ("fleetrun-inventory", &[]),
    ("fleetrun-store", &["fleetrun-api"]),
    (
        "fleetrun-controller",
        &[
            "fleetrun-api",
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
    ("fleetrun-cli", &["fleetrun-api"]),
    (
        "fleetrun-swarm",
        &[
            "fleetrun-proto",
            "fleetrun-net",
            "fleetrun-exec",
            "fleetrun-agent",
        ],
    ),
    // The test kit drives the product from outside and may use any of its libraries (the CLI
    // is a binary only); it is listed under no other crate, so no product crate depends on it.
    (
        "fleetrun-testkit",
        &[
            "fleetrun-api",
            "fleetrun-proto",
            "fleetrun-net",
            "fleetrun-exec",
            "fleetrun-inventory",
            "fleetrun-store",
            "fleetrun-controller",
            "fleetrun-agent",
            "fleetrun-swarm",
        ],
    ),
];

/// The crate that only tests, benchmarks and xtask may use.
const TEST_KIT: &str = "fleetrun-testkit";

/// The workspace members outside `crates/` that drive the product from outside (xtask, which
/// uses the test kit, and the integration tests): no crate under `crates/` may depend on them,
/// or it could reach the test kit through them.
const OUTSIDE_DRIVERS: &[&str] = &["xtask", "fleetrun-tests"];

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

/// What the API's vocabulary crate may use, per manifest section: serde, so that every client
/// can afford it, and serde_json in its tests.
const API_CRATE_DEPENDENCIES: [(&str, &[&str]); 3] = [
    ("dependencies", &["serde"]),
    ("dev-dependencies", &["serde_json"]),
    ("build-dependencies", &[]),
];

/// Which of `crates`' dependencies on one another `allowed` does not list.
fn internal_dependency_problems(
    crates: &BTreeMap<String, BTreeSet<String>>,
    allowed: &[(&str, &[&str])],
) -> Vec<String> {
    let allowed: BTreeMap<_, _> = allowed.iter().copied().collect();
    let mut problems = Vec::new();
    for (name, deps) in crates {
        let Some(may_use) = allowed.get(name.as_str()) else {
            problems.push(format!(
                "{name} is not in ALLOWED_INTERNAL: say what it may depend on"
            ));
            continue;
        };
        for dep in deps {
            let refused = if crates.contains_key(dep) {
                !may_use.contains(&dep.as_str())
            } else {
                OUTSIDE_DRIVERS.contains(&dep.as_str())
            };
            if refused {
                problems.push(format!("{name} must not depend on {dep}"));
            }
        }
    }
    problems
}

#[test]
fn no_product_crate_may_depend_on_the_test_kit() {
    let crates: BTreeMap<String, BTreeSet<String>> = [
        // Directly, or through xtask (which uses the test kit) or the integration tests.
        ("fleetrun-controller", &["fleetrun-testkit", "xtask"][..]),
        ("fleetrun-cli", &["fleetrun-tests"][..]),
        ("fleetrun-testkit", &["fleetrun-controller"][..]),
    ]
    .into_iter()
    .map(|(name, deps)| {
        let deps = deps.iter().map(|d| d.to_string()).collect();
        (name.to_owned(), deps)
    })
    .collect();
    assert_eq!(
        internal_dependency_problems(&crates, ALLOWED_INTERNAL),
        [
            "fleetrun-cli must not depend on fleetrun-tests",
            "fleetrun-controller must not depend on fleetrun-testkit",
            "fleetrun-controller must not depend on xtask",
        ]
    );
    for (name, may_use) in ALLOWED_INTERNAL {
        assert!(
            !may_use.contains(&TEST_KIT),
            "ALLOWED_INTERNAL lets {name} depend on {TEST_KIT}, which is for tests and \
             developer tools only"
        );
    }
}

#[test]
fn crates_depend_only_on_what_the_architecture_allows() {
    let crates = crate_dependencies();
    let mut problems = internal_dependency_problems(&crates, ALLOWED_INTERNAL);
    for (name, forbidden) in FORBIDDEN_EXTERNAL {
        for dep in *forbidden {
            if crates[*name].contains(*dep) {
                problems.push(format!("{name} must not depend on {dep}"));
            }
        }
    }
    problems.extend(api_crate_problems(&crate_manifests()["fleetrun-api"]));
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

/// What fleetrun-api's manifest lists beyond [`API_CRATE_DEPENDENCIES`], section by section:
/// serde_json among its dev-dependencies is fine, among its dependencies it is not.
fn api_crate_problems(manifest: &toml::Table) -> Vec<String> {
    let mut problems = Vec::new();
    for (section, allowed) in API_CRATE_DEPENDENCIES {
        for dep in section_dependencies(manifest, section) {
            if !allowed.contains(&dep.as_str()) {
                problems.push(format!(
                    "fleetrun-api depends on serde alone (serde_json in its tests), \
                     but its [{section}] lists {dep}"
                ));
            }
        }
    }
    problems
}

#[test]
fn the_api_crate_is_checked_section_by_section() {
    let manifest = |text: &str| -> toml::Table { text.parse().unwrap() };
    let clean = manifest("[dependencies]\nserde = 1\n[dev-dependencies]\nserde_json = 1\n");
    assert_eq!(api_crate_problems(&clean), Vec::<String>::new());
    let json_in_normal = manifest("[dependencies]\nserde = 1\nserde_json = 1\n");
    assert_eq!(
        api_crate_problems(&json_in_normal),
        [
            "fleetrun-api depends on serde alone (serde_json in its tests), but its \
          [dependencies] lists serde_json"
        ]
    );
    let json_for_a_target = manifest("[target.'cfg(unix)'.dependencies]\nserde_json = 1\n");
    assert_eq!(api_crate_problems(&json_for_a_target).len(), 1);
    let json_in_build = manifest("[build-dependencies]\nserde_json = 1\n");
    assert_eq!(api_crate_problems(&json_in_build).len(), 1);
    let other_in_dev = manifest("[dev-dependencies]\nserde_json = 1\nproptest = 1\n");
    assert_eq!(api_crate_problems(&other_in_dev).len(), 1);
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

/// Every `.rs` file of the workspace's crates, xtask and the integration tests.
fn workspace_rust_files() -> Vec<PathBuf> {
    let root = workspace_root();
    ["crates", "xtask", "tests"]
        .iter()
        .flat_map(|dir| rust_files(&root.join(dir)))
        .collect()
}

/// The 1-based numbers of the lines of code (comments and strings left out) in `source`
/// holding a word `wanted` picks. A word is letters, digits, `_` and `!`: `unsafe_code` is one
/// word, `todo!` another.
fn code_lines_with_word(source: &str, wanted: impl Fn(&str) -> bool) -> Vec<usize> {
    code_only(source)
        .lines()
        .enumerate()
        .filter(|(_, line)| {
            line.split(|c: char| !(c.is_alphanumeric() || c == '_' || c == '!'))
                .any(&wanted)
        })
        .map(|(n, _)| n + 1)
        .collect()
}

/// `file:line` of each line of code in `files` holding a word `wanted` picks
/// ([`code_lines_with_word`]).
fn lines_with_word(files: &[PathBuf], wanted: impl Fn(&str) -> bool) -> Vec<String> {
    let mut found = Vec::new();
    for file in files {
        let source = fs::read_to_string(file).unwrap();
        for n in code_lines_with_word(&source, &wanted) {
            found.push(format!("{}:{n}", file.display()));
        }
    }
    found
}

#[test]
fn words_are_found_in_code_only() {
    let forbidden = |w: &str| matches!(w, "todo!" | "dbg!" | "unsafe");
    let found = |line: &str| !code_lines_with_word(line, forbidden).is_empty();
    for line in [
        "todo!()",
        "let x = std::dbg!(x);",
        "unsafe {",
        "f(dbg!(x), 1)",
    ] {
        assert!(found(line), "{line:?} holds a forbidden word");
    }
    for line in [
        "let s = \"todo!\";",
        "// dbg!",
        "#![forbid(unsafe_code)]",
        "/* unsafe { */ let a = 1;",
        "r#\"todo!()\"#",
        "let todo = 1;",
        "is_unsafe()",
    ] {
        assert!(!found(line), "{line:?} holds no forbidden word in code");
    }
    assert_eq!(
        code_lines_with_word("let a = 1;\n// todo!\ntodo!();\n", forbidden),
        [3]
    );
}

#[test]
fn unsafe_code_only_in_the_exec_sys_module() {
    let allowed = workspace_root().join("crates/fleetrun-exec/src/sys.rs");
    let mut files = workspace_rust_files();
    files.retain(|f| *f != allowed);
    // `unsafe_code` in a lint attribute is a single word and does not match.
    let offenders = lines_with_word(&files, |w| w == "unsafe");
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
    let mut missing = Vec::new();
    for file in workspace_rust_files() {
        let text = fs::read_to_string(&file).unwrap();
        let first = text
            .lines()
            .find(|l| !l.trim().is_empty())
            .unwrap_or_default();
        if !first.starts_with("//!") {
            missing.push(file.display().to_string());
        }
    }
    assert!(
        missing.is_empty(),
        "these files do not start with a `//!` comment saying what they are:\n{}",
        missing.join("\n")
    );
}

#[test]
fn no_todo_or_dbg_left_in() {
    let offenders = lines_with_word(&workspace_rust_files(), |w| matches!(w, "todo!" | "dbg!"));
    assert!(
        offenders.is_empty(),
        "`todo!` or `dbg!` left in:\n{}",
        offenders.join("\n")
    );
}

#[test]
fn bincode_only_in_the_codec_module() {
    let codec = workspace_root().join("crates/fleetrun-proto/src/codec.rs");
    let mut offenders = Vec::new();
    for file in workspace_rust_files() {
        if file == codec {
            continue;
        }
        let code = code_only(&fs::read_to_string(&file).unwrap());
        // A path through the crate (`bincode::`, `use bincode`) is a use; a word is not.
        if code.contains("bincode::") || code.contains("use bincode") {
            offenders.push(file.display().to_string());
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
    hex::encode(digest)
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
