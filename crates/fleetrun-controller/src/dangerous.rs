//! Dangerous-command rules: which scripts are refused (intercept) or reported (scan) before they
//! run, as bk-job's "high-risk statement" rules.
//!
//! A rule is a regular expression for some script languages. A script is checked line by line:
//! blank lines and the language's comment lines are skipped, and each enabled rule of the
//! script's language that finds a match in a line makes a [`Finding`] (bk-job's check item, level
//! 3 "fatal"). The API refuses a script with any finding of an intercepting rule
//! (`DANGEROUS_SCRIPT_FORBIDDEN_EXECUTION`) and lets one with scan findings only run, reporting
//! them.
//!
//! Expressions come from administrators over the network, so compiling one is bounded
//! ([`compile`]: length, nesting, compiled size); the `regex` crate matches in time linear in the
//! text, and scripts are bounded by the API. The rules of a language are matched together
//! through one `RegexSet`, so a line costs one pass whatever the number of rules.
//!
//! [`DangerousRules`] keeps the enabled rules compiled; every change through the API reloads
//! them from the store (one controller per database, so the store and the copy agree).

use std::{
    collections::BTreeMap,
    sync::{Arc, RwLock},
    time::{Duration, Instant},
};

use fleetrun_store::{DangerousRule, Store, StoreError};
use regex::{Regex, RegexBuilder, RegexSet, RegexSetBuilder};

/// `action`: report the finding and let the script run.
pub const SCAN: i32 = 1;
/// `action`: refuse the script.
pub const INTERCEPT: i32 = 2;
/// `status` of a rule that is checked.
pub const ENABLED: i32 = 1;
/// `status` of a rule that is kept but not checked.
pub const DISABLED: i32 = 0;
/// bk-job's check item level of a rule's finding ("fatal").
pub const LEVEL_FATAL: i32 = 3;

/// Longest expression accepted, in characters.
pub const MAX_EXPRESSION_CHARS: usize = 1024;
/// Longest expression accepted, in bytes: PostgreSQL's unique index on (expression, languages)
/// takes at most ~2,700 bytes an entry, which 1,024 CJK characters (3 bytes each) pass.
pub const MAX_EXPRESSION_BYTES: usize = 2000;
/// Most rules kept: each is compiled and matched on every script of its languages.
pub const MAX_RULES: usize = 500;
/// The compiled program of one expression, in bytes: `(a{1000}){1000}` is refused here rather
/// than built. 500 rules of this size stay within [`SET_SIZE_LIMIT`]'s order of magnitude.
const REGEX_SIZE_LIMIT: usize = 64 << 10;
/// The lazy DFA's cache per expression; past it matching falls back to a slower engine that is
/// still linear in the text.
const DFA_SIZE_LIMIT: usize = 256 << 10;
/// The compiled program of all the rules of one language together; past it each rule is
/// matched on its own (still bounded by [`REGEX_SIZE_LIMIT`] each).
const SET_SIZE_LIMIT: usize = 8 << 20;
/// The lazy DFA's cache of the rules of one language together.
const SET_DFA_SIZE_LIMIT: usize = 2 << 20;
/// Deepest nesting of groups and repetitions.
const NEST_LIMIT: u32 = 64;
/// Findings reported for one script at most: a rule matching every line of a large script
/// must not make a reply of its size again.
const MAX_FINDINGS: usize = 200;
/// Intercepting findings named in the refusal's message at most.
const SUMMARY_FINDINGS: usize = 5;
/// The refusal's summary of findings is cut to this many bytes.
const SUMMARY_BYTES: usize = 2048;
/// A finding's line and match are cut to this many characters.
const MAX_SHOWN_CHARS: usize = 512;

/// Compiles an expression within the limits, or says why not (for the field's error message).
pub fn compile(expression: &str) -> Result<Regex, String> {
    if expression.trim().is_empty() {
        return Err("is empty".to_owned());
    }
    let chars = expression.chars().count();
    if chars > MAX_EXPRESSION_CHARS {
        return Err(format!(
            "{chars} characters, more than {MAX_EXPRESSION_CHARS}"
        ));
    }
    if expression.len() > MAX_EXPRESSION_BYTES {
        return Err(format!(
            "{} bytes in UTF-8, more than {MAX_EXPRESSION_BYTES}",
            expression.len()
        ));
    }
    RegexBuilder::new(expression)
        .size_limit(REGEX_SIZE_LIMIT)
        .dfa_size_limit(DFA_SIZE_LIMIT)
        .nest_limit(NEST_LIMIT)
        .build()
        .map_err(|e| match e {
            regex::Error::CompiledTooBig(limit) => format!(
                "compiles to more than {limit} bytes; write a smaller expression (fewer or smaller counted repetitions)"
            ),
            other => format!("not a valid regular expression: {other}"),
        })
}

/// One match of a rule in a script: bk-job's check item, with the rule it came from. Its
/// `level` is always [`LEVEL_FATAL`], its `action` the rule's ([`SCAN`] or [`INTERCEPT`]).
pub type Finding = fleetrun_api::ScriptCheckItem;

/// How long one check of a script may take. The check looks at the clock before each line and
/// stops once it is past: the script is then refused, never run unchecked. The regex crate
/// matches in time linear in the line, so a line cannot run long by itself; the bound is for many
/// large rules on a large script. Measured (`worst_rule_check`: 500 rules shaped to defeat the
/// lazy DFA, a debug build on a loaded 2-core machine): a 1 MiB line 0.32 s (a 16 MiB one, by
/// extrapolation, about 5 s), 16 MiB in 80-byte lines 7.3 s.
pub const CHECK_BUDGET: Duration = Duration::from_secs(10);

/// What checking a script found.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Verdict {
    pub findings: Vec<Finding>,
    /// More findings than [`MAX_FINDINGS`] were made; the rest are left out.
    pub truncated: bool,
    /// The check reached its time budget before the script's end: the rest was not checked.
    pub unfinished: bool,
}

impl Verdict {
    /// Whether an intercepting rule matched.
    pub fn intercepted(&self) -> bool {
        self.findings.iter().any(|f| f.action == INTERCEPT)
    }

    /// bk-job's summary of why a script was refused, for the caller: the first
    /// [`SUMMARY_FINDINGS`] intercepting findings as
    /// `[step:NAME][line:N][content:LINE] - DESCRIPTION`, joined by `||`, cut to
    /// [`SUMMARY_BYTES`].
    pub fn summary(&self, step: &str) -> String {
        let intercepting: Vec<&Finding> = self
            .findings
            .iter()
            .filter(|f| f.action == INTERCEPT)
            .collect();
        let mut summary = intercepting
            .iter()
            .take(SUMMARY_FINDINGS)
            .map(|f| {
                format!(
                    "[step:{step}][line:{}][content:{}] - {}",
                    f.line, f.line_content, f.description
                )
            })
            .collect::<Vec<_>>()
            .join("||");
        if summary.len() > SUMMARY_BYTES {
            let mut at = SUMMARY_BYTES;
            while !summary.is_char_boundary(at) {
                at -= 1;
            }
            summary.truncate(at);
            summary.push('…');
        }
        if intercepting.len() > SUMMARY_FINDINGS || self.truncated {
            summary.push_str(" (and more)");
        }
        summary
    }

    /// What the log and the audit trail keep of a refusal: the rules and line numbers only,
    /// never the script's lines (they may hold secrets).
    pub fn recorded(&self) -> String {
        let items = self
            .findings
            .iter()
            .filter(|f| f.action == INTERCEPT)
            .take(SUMMARY_FINDINGS)
            .map(|f| format!("rule {} line {}", f.rule_id, f.line))
            .collect::<Vec<_>>()
            .join(", ");
        format!("dangerous script refused: {items}")
    }
}

/// The enabled rules of one language.
#[derive(Debug)]
struct LanguageRules {
    /// `None` when the rules would not compile together within the limits; then each is tried
    /// on its own.
    set: Option<RegexSet>,
    rules: Vec<(Regex, Arc<DangerousRule>)>,
}

/// The enabled rules, compiled, by script language.
#[derive(Debug, Default)]
pub struct CompiledRules {
    by_language: BTreeMap<i32, LanguageRules>,
}

impl CompiledRules {
    /// Compiles the enabled rules. A stored expression that does not compile (one written by a
    /// release with other limits) is left out with a warning rather than stop the controller.
    pub fn build(rules: &[DangerousRule]) -> Self {
        let mut by_language: BTreeMap<i32, Vec<(Regex, Arc<DangerousRule>)>> = BTreeMap::new();
        for rule in rules.iter().filter(|r| r.status == ENABLED) {
            let regex = match compile(&rule.expression) {
                Ok(regex) => regex,
                Err(why) => {
                    tracing::warn!(rule = rule.id, "dangerous rule left out: expression {why}");
                    continue;
                }
            };
            let rule = Arc::new(rule.clone());
            for language in &rule.script_languages {
                by_language
                    .entry(*language)
                    .or_default()
                    .push((regex.clone(), rule.clone()));
            }
        }
        let by_language = by_language
            .into_iter()
            .map(|(language, rules)| {
                let set = RegexSetBuilder::new(rules.iter().map(|(r, _)| r.as_str()))
                    .size_limit(
                        REGEX_SIZE_LIMIT
                            .saturating_mul(rules.len())
                            .min(SET_SIZE_LIMIT),
                    )
                    .dfa_size_limit(SET_DFA_SIZE_LIMIT)
                    .nest_limit(NEST_LIMIT)
                    .build()
                    .ok();
                (language, LanguageRules { set, rules })
            })
            .collect();
        Self { by_language }
    }

    /// Checks a script of `language` line by line, within [`CHECK_BUDGET`].
    pub fn check(&self, language: i32, script: &[u8]) -> Verdict {
        self.check_within(language, script, CHECK_BUDGET)
    }

    /// Checks a script of `language` line by line; past `budget`, stops with the verdict
    /// `unfinished`.
    pub fn check_within(&self, language: i32, script: &[u8], budget: Duration) -> Verdict {
        let mut verdict = Verdict::default();
        let Some(rules) = self.by_language.get(&language) else {
            return verdict;
        };
        let deadline = Instant::now() + budget;
        let text = String::from_utf8_lossy(script);
        for (index, line) in lines(&text).enumerate() {
            if line.trim().is_empty() || is_comment(language, line) {
                continue;
            }
            if Instant::now() >= deadline {
                verdict.unfinished = true;
                break;
            }
            let matching: Vec<usize> = match &rules.set {
                Some(set) => set.matches(line).into_iter().collect(),
                None => (0..rules.rules.len())
                    .filter(|&i| rules.rules[i].0.is_match(line))
                    .collect(),
            };
            for i in matching {
                let (regex, rule) = &rules.rules[i];
                let Some(found) = regex.find(line) else {
                    continue;
                };
                if verdict.findings.len() == MAX_FINDINGS {
                    verdict.truncated = true;
                    // An intercepting finding must not be lost to the cap: it decides.
                    if rule.action == INTERCEPT && !verdict.intercepted() {
                        verdict.findings.pop();
                    } else {
                        continue;
                    }
                }
                verdict.findings.push(Finding {
                    line: index + 1,
                    line_content: cut(line),
                    match_content: cut(found.as_str()),
                    level: LEVEL_FATAL,
                    description: rule.description.clone(),
                    rule_id: rule.id,
                    action: rule.action,
                });
            }
        }
        verdict
    }
}

fn cut(text: &str) -> String {
    match text.char_indices().nth(MAX_SHOWN_CHARS) {
        Some((at, _)) => format!("{}…", &text[..at]),
        None => text.to_owned(),
    }
}

/// The lines of a script, ended by `\r\n`, `\n` or a lone `\r`: Python and PowerShell end a
/// line at a lone `\r`, so a line a shell would keep whole is checked in parts (more strictly).
fn lines(text: &str) -> impl Iterator<Item = &str> {
    let mut rest = Some(text);
    std::iter::from_fn(move || {
        let text = rest?;
        match text.find(['\r', '\n']) {
            Some(at) => {
                let end = if text[at..].starts_with("\r\n") {
                    at + 2
                } else {
                    at + 1
                };
                rest = Some(&text[end..]);
                Some(&text[..at])
            }
            None => {
                rest = None;
                Some(text)
            }
        }
    })
}

/// Whether a line is a comment in the language (bk-job skips them). Only spaces and tabs may
/// come before the comment mark: a shell runs `\x0b#x; rm -rf /` (the vertical tab is part of
/// the first word), so other white space does not make a comment.
fn is_comment(language: i32, line: &str) -> bool {
    let line = line.trim_start_matches([' ', '\t']);
    match language {
        // bat: `REM ...` or `:: ...`.
        2 => {
            let lower = line.get(..4).map(str::to_ascii_lowercase);
            line.starts_with("::")
                || lower.as_deref() == Some("rem ")
                || line.eq_ignore_ascii_case("rem")
        }
        // SQL.
        6 => line.starts_with("--"),
        // shell, Perl, Python, PowerShell.
        _ => line.starts_with('#'),
    }
}

/// Compiles rules on a blocking thread: 500 expressions take a while, and an async worker must
/// not stall on them.
async fn build(rules: Vec<DangerousRule>) -> CompiledRules {
    match tokio::task::spawn_blocking(move || CompiledRules::build(&rules)).await {
        Ok(compiled) => compiled,
        Err(e) => std::panic::resume_unwind(e.into_panic()),
    }
}

/// The rules in force, compiled, reloaded from the store after every change.
#[derive(Debug)]
pub struct DangerousRules {
    store: Store,
    current: RwLock<Arc<CompiledRules>>,
    /// Changes one at a time, so the copy reloaded last reflects the last change.
    changing: tokio::sync::Mutex<()>,
}

impl DangerousRules {
    /// Loads and compiles the stored rules.
    pub async fn load(store: Store) -> Result<Self, StoreError> {
        let compiled = build(store.dangerous_rules().await?).await;
        Ok(Self {
            store,
            current: RwLock::new(Arc::new(compiled)),
            changing: tokio::sync::Mutex::new(()),
        })
    }

    /// The store, for the API's changes.
    pub fn store(&self) -> &Store {
        &self.store
    }

    /// Makes a change of the rules and puts the result in force before returning.
    pub async fn change<T, E: From<StoreError>>(
        &self,
        work: impl std::future::Future<Output = Result<T, E>>,
    ) -> Result<T, E> {
        let _one_at_a_time = self.changing.lock().await;
        let result = work.await;
        // The other controllers sharing the database reload the rules too, at once.
        if let Err(e) = self.store.announce_cluster_news().await {
            tracing::warn!("cannot tell the other controllers of the rule change: {e}");
        }
        // Reloaded whatever the outcome: a failed change may still have been committed. A
        // committed change is reported as made even when the reload fails (retried first): the
        // caller would otherwise repeat a change that is already in the store.
        let mut attempt = 0;
        loop {
            match self.store.dangerous_rules().await {
                Ok(rules) => {
                    let compiled = Arc::new(build(rules).await);
                    *self.current.write().unwrap_or_else(|e| e.into_inner()) = compiled;
                    break;
                }
                Err(e) if attempt < 3 => {
                    attempt += 1;
                    tracing::warn!("reloading the dangerous rules after a change: {e}; retrying");
                    tokio::time::sleep(std::time::Duration::from_millis(200 * attempt)).await;
                }
                Err(e) => {
                    tracing::error!(
                        "reloading the dangerous rules after a change failed: {e}; the rules in force are those before it until the next change or restart"
                    );
                    break;
                }
            }
        }
        result
    }

    /// Reads the stored rules again (a change made through another controller); the rules in
    /// force stay if the store cannot give them.
    pub async fn reload(&self) {
        let _one_at_a_time = self.changing.lock().await;
        match self.store.dangerous_rules().await {
            Ok(rules) => {
                let compiled = Arc::new(build(rules).await);
                *self.current.write().unwrap_or_else(|e| e.into_inner()) = compiled;
            }
            Err(e) => tracing::warn!("cannot read the dangerous rules again: {e}"),
        }
    }

    /// The rules in force.
    pub fn current(&self) -> Arc<CompiledRules> {
        self.current
            .read()
            .unwrap_or_else(|e| e.into_inner())
            .clone()
    }

    /// Checks a script on a blocking thread (a large script takes a while).
    pub async fn check(&self, language: i32, script: Arc<Vec<u8>>) -> Verdict {
        let rules = self.current();
        match tokio::task::spawn_blocking(move || rules.check(language, &script)).await {
            Ok(verdict) => verdict,
            Err(e) => std::panic::resume_unwind(e.into_panic()),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The default rules as migration 0011 stores them.
    const DEFAULTS: &[&str] = &[
        r#"\brm\s+(?:[^\s;&|]+\s+)*?(?:(?:-[a-zA-Z]*[rR][a-zA-Z]*|--recursive)\s+(?:[^\s;&|]+\s+)*?["']?/["']?\*?["']?(?:[\s;&|)`]|$)|["']?/["']?\*?["']?\s+(?:[^\s;&|]+\s+)*?(?:-[a-zA-Z]*[rR][a-zA-Z]*|--recursive)(?:[\s;&|)`"']|$))"#,
        r"\b(?:mkfs(?:\.\w+)?|mke2fs)\b[^;&|]*\s/dev/(?:sd|hd|vd|xvd|nvme|mmcblk|md|dm-|mapper/|disk/)",
        r":\s*\(\s*\)\s*\{\s*:\s*\|\s*:\s*&\s*\}",
        r"\bdd\b[^;&|]*\bof=/dev/(?:sd|hd|vd|xvd|nvme|mmcblk|md|dm-|mapper/|disk/)",
    ];

    fn rule(id: i64, expression: &str, languages: &[i32], action: i32) -> DangerousRule {
        DangerousRule {
            id,
            expression: expression.into(),
            script_languages: languages.to_vec(),
            description: format!("rule {id}"),
            action,
            status: ENABLED,
            creator: "t".into(),
            create_time: 0,
            last_modify_user: "t".into(),
            last_modify_time: 0,
        }
    }

    fn defaults() -> CompiledRules {
        let rules: Vec<DangerousRule> = DEFAULTS
            .iter()
            .enumerate()
            .map(|(i, e)| rule(i as i64 + 1, e, &[1, 3, 4], INTERCEPT))
            .collect();
        CompiledRules::build(&rules)
    }

    #[test]
    fn the_default_rules_catch_what_destroys_a_host_and_let_the_rest_through() {
        let rules = defaults();
        for (script, rule) in [
            ("rm -rf /", 1),
            ("sudo rm -rf /*", 1),
            ("rm -fr / ", 1),
            ("rm -r -f /", 1),
            ("rm -rf --no-preserve-root /", 1),
            ("cd /tmp && rm --recursive --force /; echo", 1),
            ("mkfs.ext4 /dev/sdb1", 2),
            ("mkfs -t xfs -f /dev/nvme0n1", 2),
            ("mke2fs /dev/vda", 2),
            (":(){ :|:& };:", 3),
            (": () { : | : & } ; :", 3),
            ("dd if=/dev/zero of=/dev/sda bs=1M", 4),
            ("dd if=image.iso of=/dev/disk/by-id/usb-x", 4),
            ("python -c 'import os; os.system(\"rm -rf /\")'", 1),
            ("rm -rf /tmp /*", 1),
            ("rm -rf \"/\"*", 1),
            ("rm -rf '/*'", 1),
            ("rm -r -f -- \"/\"", 1),
            ("rm / -rf", 1),
            ("rm -v --one-file-system -R /", 1),
        ] {
            let verdict = rules.check(1, script.as_bytes());
            assert!(verdict.intercepted(), "{script:?} passed");
            assert_eq!(verdict.findings[0].rule_id, rule, "{script:?}");
        }
        for script in [
            "rm -rf /tmp/work",
            "rm -rf ./build /var/tmp/x",
            "rm /etc/motd",
            "rm -f /",
            "# rm -rf /",
            "   # mkfs.ext4 /dev/sda",
            "dd if=/dev/sda of=/tmp/mbr bs=512 count=1",
            "dd if=/dev/zero of=/dev/null",
            "mkfs.ext4 /tmp/disk.img",
            "echo done > /dev/null",
            "f() { g | h; }",
            "ls /dev/sda",
            "rm -rf /tmp/a /var/b",
            "rm -rf \"/tmp\"",
        ] {
            let verdict = rules.check(1, script.as_bytes());
            assert!(!verdict.intercepted(), "{script:?} refused: {verdict:?}");
        }
        // Languages the rule does not list are not checked.
        assert!(rules.check(5, b"rm -rf /").findings.is_empty());
    }

    #[test]
    fn a_finding_names_its_line_match_and_rule() {
        let rules = CompiledRules::build(&[
            rule(7, r"shutdown\s+-h", &[1], SCAN),
            rule(8, "reboot", &[1, 4], INTERCEPT),
        ]);
        let verdict = rules.check(
            1,
            b"#!/bin/bash\n\necho hi\r\nsudo shutdown -h now\n# reboot\nreboot\n",
        );
        assert_eq!(
            verdict.findings,
            vec![
                Finding {
                    line: 4,
                    line_content: "sudo shutdown -h now".into(),
                    match_content: "shutdown -h".into(),
                    level: LEVEL_FATAL,
                    description: "rule 7".into(),
                    rule_id: 7,
                    action: SCAN,
                },
                Finding {
                    line: 6,
                    line_content: "reboot".into(),
                    match_content: "reboot".into(),
                    level: LEVEL_FATAL,
                    description: "rule 8".into(),
                    rule_id: 8,
                    action: INTERCEPT,
                },
            ]
        );
        assert!(verdict.intercepted());
        assert_eq!(
            verdict.summary("deploy"),
            "[step:deploy][line:6][content:reboot] - rule 8"
        );
        let scan_only = rules.check(1, b"shutdown -h now");
        assert!(!scan_only.intercepted());
        assert_eq!(scan_only.findings.len(), 1);
    }

    #[test]
    fn disabled_rules_are_not_checked() {
        let mut off = rule(1, "reboot", &[1], INTERCEPT);
        off.status = DISABLED;
        assert!(
            CompiledRules::build(&[off])
                .check(1, b"reboot")
                .findings
                .is_empty()
        );
    }

    #[test]
    fn hostile_expressions_are_refused_with_the_reason() {
        let too_big = compile("(a{1000}){1000}").unwrap_err();
        assert!(too_big.contains("compiles to more than"), "{too_big}");
        // Well under the regex crate's own limits, but 500 of them would take hundreds of MiB.
        let large = compile("a{10000}").unwrap_err();
        assert!(large.contains("compiles to more than"), "{large}");
        compile("a{100}").unwrap();
        let deep = format!("{}a{}", "(".repeat(200), ")".repeat(200));
        assert!(
            compile(&deep).unwrap_err().contains("not a valid"),
            "nesting"
        );
        let long = "a".repeat(MAX_EXPRESSION_CHARS + 1);
        assert!(compile(&long).unwrap_err().contains("more than 1024"));
        let wide = "字".repeat(MAX_EXPRESSION_CHARS);
        assert!(compile(&wide).unwrap_err().contains("more than 2000"));
        assert!(compile("(unclosed").unwrap_err().contains("not a valid"));
        assert!(compile(r"(a)\1").unwrap_err().contains("not a valid"));
        assert_eq!(compile("  ").unwrap_err(), "is empty");
    }

    #[test]
    fn a_large_script_is_checked_in_linear_time_and_findings_are_capped() {
        // A pattern that backtracking engines take exponential time on.
        let rules = CompiledRules::build(&[
            rule(1, "(a+)+$", &[1], SCAN),
            rule(2, "needle", &[1], INTERCEPT),
        ]);
        let mut script = "a".repeat(100_000).into_bytes();
        script.push(b'!');
        script.extend(b"\na\n".repeat(1000));
        script.extend(b"needle\n");
        let verdict = rules.check(1, &script);
        assert!(!verdict.unfinished, "checked within the budget");
        assert!(verdict.truncated);
        assert_eq!(verdict.findings.len(), MAX_FINDINGS);
        assert!(verdict.intercepted(), "the intercepting finding is kept");
    }

    #[test]
    fn a_check_past_its_budget_stops_unfinished() {
        let rules = CompiledRules::build(&[rule(1, "needle", &[1], INTERCEPT)]);
        let script = b"echo hay\nneedle\n".repeat(1000);
        let verdict = rules.check_within(1, &script, Duration::ZERO);
        assert!(verdict.unfinished);
        assert!(!verdict.intercepted(), "nothing was checked");
        let verdict = rules.check_within(1, &script, Duration::from_secs(3600));
        assert!(!verdict.unfinished);
        assert!(verdict.intercepted());
    }

    /// The figure behind [`CHECK_BUDGET`]: the largest allowed rule set (500 rules of the
    /// largest allowed shape that defeats the lazy DFA) on the largest allowed script.
    /// `cargo test -p fleetrun-controller --lib worst_rule_check -- --ignored --nocapture`
    #[test]
    #[ignore = "a measurement, printed"]
    fn worst_rule_check() {
        let rules: Vec<DangerousRule> = (0..MAX_RULES as i64)
            .map(|i| rule(i, &format!("[ab]*a[ab]{{{}}}c{i}", 20), &[1], SCAN))
            .collect();
        let compiled = CompiledRules::build(&rules);
        for (what, script) in [
            ("one 64 KiB line", b"ab".repeat(32 << 10)),
            ("one 1 MiB line", b"ab".repeat(512 << 10)),
            ("16 MiB in 80-byte lines", {
                let mut line = b"ab".repeat(40);
                line.push(b'\n');
                line.repeat((16 << 20) / 81)
            }),
        ] {
            let started = Instant::now();
            let verdict = compiled.check(1, &script);
            eprintln!(
                "{what}: {:?}, {} findings, unfinished {}",
                started.elapsed(),
                verdict.findings.len(),
                verdict.unfinished
            );
        }
    }

    #[test]
    fn comments_are_skipped_per_language() {
        assert!(is_comment(1, "  # x"));
        assert!(is_comment(2, "REM x"));
        assert!(is_comment(2, ":: x"));
        assert!(!is_comment(2, "remove x"));
        assert!(is_comment(6, "-- x"));
        assert!(!is_comment(6, "# x"));
        assert!(is_comment(1, "\t # x"));
    }

    #[test]
    fn only_spaces_and_tabs_before_a_comment_mark_make_a_comment() {
        let rules = CompiledRules::build(&[rule(1, r"rm\s+-rf\s+/", &[1, 4, 5], INTERCEPT)]);
        // A shell runs the vertical tab, form feed or no-break space as part of the first word.
        for script in ["\x0b#x; rm -rf /", "\x0c#x; rm -rf /", "\u{a0}#x; rm -rf /"] {
            assert!(
                rules.check(1, script.as_bytes()).intercepted(),
                "{script:?} passed as a comment"
            );
        }
    }

    #[test]
    fn a_lone_carriage_return_ends_a_line() {
        let rules = CompiledRules::build(&[rule(1, r"os\.system", &[4, 5], INTERCEPT)]);
        // Python and PowerShell end the comment at the `\r` and run the rest.
        let verdict = rules.check(4, b"#\rimport os; os.system('x')\n");
        assert!(verdict.intercepted());
        assert_eq!(verdict.findings[0].line, 2);
        assert!(rules.check(5, b"# c\ros.system('x')").intercepted());
        // `\r\n` is one line end.
        assert_eq!(
            rules.check(4, b"a\r\nb\r\nos.system(1)").findings[0].line,
            3
        );
    }

    #[test]
    fn a_refusal_names_few_findings_and_records_no_script_text() {
        let rules = CompiledRules::build(&[rule(9, "secret", &[1], INTERCEPT)]);
        let line = format!("echo secret={}", "x".repeat(400));
        let script = format!("{line}\n").repeat(50);
        let verdict = rules.check(1, script.as_bytes());
        let summary = verdict.summary("s");
        assert!(summary.len() <= SUMMARY_BYTES + 32, "{}", summary.len());
        assert!(summary.ends_with("(and more)"), "{summary}");
        let recorded = verdict.recorded();
        assert!(!recorded.contains("secret="), "{recorded}");
        assert_eq!(
            recorded,
            "dangerous script refused: rule 9 line 1, rule 9 line 2, rule 9 line 3, rule 9 line 4, rule 9 line 5"
        );
    }
}
