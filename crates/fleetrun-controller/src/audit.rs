//! The audit trail: every state-changing API call, appended to a hash chain in the store.
//!
//! An entry says when, which app and operator, from which address, under which request id,
//! which API, what was asked (the request's parameters with secrets masked and long values
//! replaced by their size and SHA-256), and how it ended. Its hash covers all of that and the
//! previous entry's hash, so an edited row no longer matches its hash, and a deleted or inserted
//! one breaks the link or the numbering. [`verify`] walks the chain; the controller also keeps
//! the head it last wrote, so removing entries from the end is noticed while it runs.
//!
//! The hash is an HMAC-SHA256 under the audit key ([`AuditKey`], a file outside the database:
//! `[security] audit_key_file`), so someone who can write the database but not read the key
//! cannot recompute the chain after an edit. Entries written before the key existed (plain
//! SHA-256, `fleetrun-audit-v1`) are accepted only up to the number the key file recorded when it
//! was made (`unkeyed_until`), and counted apart ([`Verification::unkeyed`]): a chain rewritten
//! with plain hashes does not pass for an old one.
//!
//! Appends go through one task that commits whatever has queued in one transaction, so the
//! trail costs a request a channel send, not a commit of its own: concurrent calls share one.
//! Reading the trail (`get_audit_log`, `verify_audit_log`) first waits for what is queued.

use std::sync::{Arc, Mutex};

use base64::Engine as _;

use fleetrun_store::{AuditFilter, AuditRecord, NewAuditEntry, Store};
use ring::{
    digest::{SHA256, digest},
    hmac,
    rand::{SecureRandom, SystemRandom},
};
use serde_json::{Map, Value, json};
use tokio::sync::{mpsc, oneshot};

/// Most entries committed in one transaction.
const BATCH: usize = 256;
/// A string longer than this is recorded as its length and digest.
const MAX_SHOWN_STRING: usize = 256;
/// An array longer than this is cut, saying how many items were left out.
const MAX_SHOWN_ITEMS: usize = 50;
/// A summary longer than this is recorded as its length and digest only.
const MAX_CHANGE_BYTES: usize = 16 * 1024;

/// Whether an API changes state (and so is audited). Besides the APIs served today, names
/// with the prefixes of bk-job's changing APIs count, so an API added later is audited
/// unless it reads only.
pub fn is_state_changing(api: &str) -> bool {
    const PREFIXES: &[&str] = &[
        "fast_execute_",
        "execute_",
        "fast_transfer_",
        "push_",
        "operate_",
        "create_",
        "update_",
        "delete_",
        "publish_",
        "disable_",
        "enable_",
        "change_",
        "replace_",
        "reload_",
        "revoke_",
        "unrevoke_",
        "save_",
        "set_",
        "add_",
        "remove_",
    ];
    PREFIXES.iter().any(|p| api.starts_with(p))
}

/// Whether a parameter's value is a secret by its name.
fn is_secret_key(key: &str) -> bool {
    let key = key.to_ascii_lowercase();
    ["secret", "password", "passwd", "token", "credential"]
        .iter()
        .any(|s| key.contains(s))
        || key.ends_with("_key")
        || key == "key"
}

fn truthy(value: Option<&Value>) -> bool {
    match value {
        Some(Value::Bool(b)) => *b,
        Some(Value::Number(n)) => n.as_i64().is_some_and(|n| n != 0),
        Some(Value::String(s)) => matches!(s.trim(), "1" | "true"),
        _ => false,
    }
}

fn hex(bytes: &[u8]) -> String {
    bytes.iter().map(|b| format!("{b:02x}")).collect()
}

fn described(bytes: &[u8]) -> Value {
    Value::String(format!(
        "<{} bytes, sha256:{}>",
        bytes.len(),
        hex(digest(&SHA256, bytes).as_ref())
    ))
}

fn shown(value: &Value, depth: usize) -> Value {
    match value {
        Value::String(s) if s.len() > MAX_SHOWN_STRING => described(s.as_bytes()),
        Value::Array(items) if depth > 8 => json!(format!("<{} items>", items.len())),
        Value::Object(map) if depth > 8 => json!(format!("<{} fields>", map.len())),
        Value::Array(items) => {
            let mut out: Vec<Value> = items
                .iter()
                .take(MAX_SHOWN_ITEMS)
                .map(|v| shown(v, depth + 1))
                .collect();
            if items.len() > MAX_SHOWN_ITEMS {
                out.push(json!(format!("<{} more>", items.len() - MAX_SHOWN_ITEMS)));
            }
            Value::Array(out)
        }
        Value::Object(map) => Value::Object(masked(map, depth + 1)),
        other => other.clone(),
    }
}

fn masked(map: &Map<String, Value>, depth: usize) -> Map<String, Value> {
    let sensitive_param = truthy(map.get("is_param_sensitive"));
    map.iter()
        .map(|(key, value)| {
            let value = if is_secret_key(key) || (key == "script_param" && sensitive_param) {
                json!("***")
            } else if key == "callback_url" {
                value.as_str().map_or_else(
                    || shown(value, depth),
                    |u| json!(crate::callback::redact(u)),
                )
            } else {
                shown(value, depth)
            };
            (key.clone(), value)
        })
        .collect()
}

/// What a call asked for, as recorded: its parameters with secrets masked (credentials,
/// sensitive script parameters, callback URLs' queries) and long values replaced by their size
/// and SHA-256.
pub fn summarize(params: &Map<String, Value>) -> String {
    let text = Value::Object(masked(params, 0)).to_string();
    if text.len() > MAX_CHANGE_BYTES {
        return json!({ "summary": described(text.as_bytes()) }).to_string();
    }
    text
}

/// The key the chain's hashes are made with: 32 random bytes, base64 in a file of its own, and
/// the last entry written before it existed.
#[derive(Clone)]
pub struct AuditKey {
    key: hmac::Key,
    /// Entries up to this number may carry the plain hash of entries written before the key.
    unkeyed_until: i64,
}

impl std::fmt::Debug for AuditKey {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("AuditKey")
    }
}

/// The audit key file cannot be used.
#[derive(Debug, thiserror::Error)]
#[error("audit key file {path}: {reason}")]
pub struct AuditKeyError {
    pub path: std::path::PathBuf,
    pub reason: String,
}

impl AuditKey {
    /// Loads the key from `path`, creating the file (0600, owner only) with a random key if it
    /// is missing; `head` is then the last entry already in the trail, the last one that may
    /// keep its plain hash.
    pub fn load_or_create(path: &std::path::Path, head: i64) -> Result<Self, AuditKeyError> {
        use std::{io::Write as _, os::unix::fs::OpenOptionsExt as _};
        let fail = |reason: String| AuditKeyError {
            path: path.to_owned(),
            reason,
        };
        let encoded = match std::fs::read_to_string(path) {
            Ok(text) => text,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
                let mut key = [0u8; 32];
                SystemRandom::new()
                    .fill(&mut key)
                    .map_err(|_| fail("no randomness".into()))?;
                let encoded = format!(
                    "{}\nunkeyed_until = {head}\n",
                    base64::engine::general_purpose::STANDARD.encode(key)
                );
                let mut file = std::fs::OpenOptions::new()
                    .write(true)
                    .create_new(true)
                    .mode(0o600)
                    .open(path)
                    .map_err(|e| fail(e.to_string()))?;
                file.write_all(encoded.as_bytes())
                    .map_err(|e| fail(e.to_string()))?;
                tracing::info!(path = %path.display(), "created a new key for the audit trail");
                encoded
            }
            Err(e) => return Err(fail(e.to_string())),
        };
        Self::decode(&encoded).map_err(|reason| fail(reason.to_owned()))
    }

    /// What [`Self::load_or_create`] would refuse in the file at `path`, without creating it.
    pub fn check(path: &std::path::Path) -> Result<(), AuditKeyError> {
        match std::fs::read_to_string(path) {
            Ok(encoded) => Self::decode(&encoded)
                .map(drop)
                .map_err(|reason| AuditKeyError {
                    path: path.to_owned(),
                    reason: reason.to_owned(),
                }),
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(()),
            Err(e) => Err(AuditKeyError {
                path: path.to_owned(),
                reason: e.to_string(),
            }),
        }
    }

    fn decode(text: &str) -> Result<Self, &'static str> {
        let mut lines = text.lines().map(str::trim).filter(|l| !l.is_empty());
        let key = base64::engine::general_purpose::STANDARD
            .decode(lines.next().unwrap_or_default())
            .map_err(|_| "not base64")?;
        if key.len() != 32 {
            return Err("not a 32-byte key");
        }
        let unkeyed_until = match lines.next() {
            None => 0,
            Some(line) => line
                .strip_prefix("unkeyed_until")
                .and_then(|rest| rest.trim_start().strip_prefix('='))
                .and_then(|n| n.trim().parse().ok())
                .filter(|n: &i64| *n >= 0)
                .ok_or("the second line is not `unkeyed_until = N`")?,
        };
        if lines.next().is_some() {
            return Err("more than a key and `unkeyed_until = N`");
        }
        Ok(Self::from_bytes(&key).with_unkeyed_until(unkeyed_until))
    }

    /// A key from its bytes, for a trail that has no entry written before it.
    pub fn from_bytes(key: &[u8]) -> Self {
        Self {
            key: hmac::Key::new(hmac::HMAC_SHA256, key),
            unkeyed_until: 0,
        }
    }

    /// The same key, accepting plain hashes on entries up to `seq`.
    pub fn with_unkeyed_until(mut self, seq: i64) -> Self {
        self.unkeyed_until = seq;
        self
    }
}

/// The entry's hash: HMAC-SHA256 under `key` over a version tag, its number, every field and
/// the previous hash, each length-prefixed so that no two entries encode alike.
pub fn entry_hash(key: &AuditKey, seq: i64, entry: &NewAuditEntry, prev_hash: &str) -> String {
    hex(hmac::sign(&key.key, &entry_bytes(KEYED, seq, entry, prev_hash)).as_ref())
}

/// The hash of an entry written before the audit key existed: plain SHA-256.
fn unkeyed_hash(seq: i64, entry: &NewAuditEntry, prev_hash: &str) -> String {
    hex(digest(&SHA256, &entry_bytes(UNKEYED, seq, entry, prev_hash)).as_ref())
}

const KEYED: &str = "fleetrun-audit-v2";
const UNKEYED: &str = "fleetrun-audit-v1";

fn entry_bytes(tag: &str, seq: i64, entry: &NewAuditEntry, prev_hash: &str) -> Vec<u8> {
    let mut bytes = Vec::with_capacity(256 + entry.change.len());
    let seq = seq.to_string();
    let at = entry.at.to_string();
    let code = entry.outcome_code.to_string();
    for field in [
        tag,
        &seq,
        &at,
        &entry.app_code,
        &entry.operator,
        &entry.source,
        &entry.request_id,
        &entry.api,
        &entry.change,
        &code,
        &entry.outcome,
        prev_hash,
    ] {
        bytes.extend_from_slice(&(field.len() as u64).to_be_bytes());
        bytes.extend_from_slice(field.as_bytes());
    }
    bytes
}

enum Queued {
    Entry(NewAuditEntry),
    /// Answered once every entry queued before it is committed (or given up).
    Flush(oneshot::Sender<()>),
}

/// Appends entries; cheap to clone.
#[derive(Clone)]
pub struct AuditLog {
    queue: mpsc::Sender<Queued>,
    /// The last entry this controller wrote (or found at start): number and hash.
    head: Arc<Mutex<Option<(i64, String)>>>,
    key: AuditKey,
    refusals: Arc<Mutex<RefusalBudget>>,
}

/// Refused authentications recorded one by one per minute at most: a client hammering the API
/// with bad credentials must not flood the trail (or the disk); past the budget they are
/// counted, and the next one recorded after the minute is preceded by an entry saying how many
/// went unrecorded.
pub const REFUSED_AUTH_PER_MINUTE: u32 = 60;

#[derive(Debug)]
struct RefusalBudget {
    window_start: std::time::Instant,
    recorded: u32,
    unrecorded: u64,
}

impl std::fmt::Debug for AuditLog {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("AuditLog").finish_non_exhaustive()
    }
}

/// Entries waiting for the appender; a request waits for room only past this many.
const QUEUE: usize = 64 * 1024;
/// Attempts at committing a batch before its entries are given up (and logged in full).
const ATTEMPTS: u32 = 5;

impl AuditLog {
    /// Starts the appending task in `tasks`; it commits what is queued and ends once every
    /// handle is dropped (the API server stopped).
    pub async fn start(
        store: Store,
        key: AuditKey,
        tasks: &mut tokio::task::JoinSet<()>,
    ) -> Result<Self, fleetrun_store::StoreError> {
        let head = Arc::new(Mutex::new(store.audit_head().await?));
        let (queue, mut incoming) = mpsc::channel::<Queued>(QUEUE);
        let task_head = head.clone();
        let task_key = key.clone();
        tasks.spawn(async move {
            let mut received = Vec::with_capacity(BATCH);
            while incoming.recv_many(&mut received, BATCH).await > 0 {
                let mut entries = Vec::with_capacity(received.len());
                let mut flushes = Vec::new();
                for queued in received.drain(..) {
                    match queued {
                        Queued::Entry(entry) => entries.push(entry),
                        Queued::Flush(done) => flushes.push(done),
                    }
                }
                if !entries.is_empty() {
                    commit(&store, &task_key, &entries, &task_head).await;
                }
                for done in flushes {
                    let _ = done.send(());
                }
            }
        });
        Ok(Self {
            queue,
            head,
            key,
            refusals: Arc::new(Mutex::new(RefusalBudget {
                window_start: std::time::Instant::now(),
                recorded: 0,
                unrecorded: 0,
            })),
        })
    }

    /// Queues `entry` for the next commit; waits only while the queue is full. The request's
    /// reply does not wait for the database: an entry reaches it within one commit (a few
    /// milliseconds), and a controller that stops commits what is queued first.
    pub async fn append(&self, entry: NewAuditEntry) {
        if self.queue.send(Queued::Entry(entry)).await.is_err() {
            tracing::error!("the audit log is closed: an entry was not recorded");
        }
    }

    /// Records a refused authentication within the budget ([`REFUSED_AUTH_PER_MINUTE`]).
    pub async fn append_refused_auth(&self, entry: NewAuditEntry) {
        let (record, unrecorded) = {
            let mut budget = self.refusals.lock().unwrap_or_else(|e| e.into_inner());
            if budget.window_start.elapsed() >= std::time::Duration::from_secs(60) {
                let unrecorded = budget.unrecorded;
                *budget = RefusalBudget {
                    window_start: std::time::Instant::now(),
                    recorded: 1,
                    unrecorded: 0,
                };
                (true, unrecorded)
            } else if budget.recorded < REFUSED_AUTH_PER_MINUTE {
                budget.recorded += 1;
                (true, 0)
            } else {
                budget.unrecorded += 1;
                (false, 0)
            }
        };
        if unrecorded > 0 {
            self.append(NewAuditEntry {
                at: entry.at,
                app_code: String::new(),
                operator: String::new(),
                source: String::new(),
                request_id: String::new(),
                api: "refused_authentication".to_owned(),
                change: json!({ "unrecorded_refusals": unrecorded }).to_string(),
                outcome_code: entry.outcome_code,
                outcome: format!(
                    "{unrecorded} more refused authentications in the minute before, past \
                     {REFUSED_AUTH_PER_MINUTE} a minute, were not recorded one by one"
                ),
            })
            .await;
        }
        if record {
            self.append(entry).await;
        } else {
            metrics::counter!("fleetrun_audit_unrecorded_refusals_total").increment(1);
        }
    }

    /// Returns once every entry queued before this call is committed or given up.
    pub async fn flush(&self) {
        let (done, flushed) = oneshot::channel();
        if self.queue.send(Queued::Flush(done)).await.is_ok() {
            let _ = flushed.await;
        }
    }

    /// The key the chain is made with.
    pub fn key(&self) -> &AuditKey {
        &self.key
    }

    /// The last entry this controller knows was written.
    pub fn head(&self) -> Option<(i64, String)> {
        self.head.lock().unwrap().clone()
    }
}

/// Commits one batch, retrying a refusing database a few times; entries it cannot store are
/// written to the log in full, so the record survives there.
async fn commit(
    store: &Store,
    key: &AuditKey,
    entries: &[NewAuditEntry],
    head: &Mutex<Option<(i64, String)>>,
) {
    // The store takes a `'static` hasher: it holds its own handle on the key.
    let key = key.clone();
    let hasher =
        move |seq: i64, entry: &NewAuditEntry, prev: &str| entry_hash(&key, seq, entry, prev);
    let started = std::time::Instant::now();
    let mut attempt = 0;
    loop {
        attempt += 1;
        match store.append_audit(entries, &hasher).await {
            Ok(new_head) => {
                *head.lock().unwrap() = Some(new_head);
                metrics::histogram!("fleetrun_audit_append_seconds").record(started.elapsed());
                for entry in entries {
                    let outcome = if entry.outcome_code == 0 {
                        "ok"
                    } else {
                        "refused"
                    };
                    metrics::counter!("fleetrun_audit_entries_total", "outcome" => outcome)
                        .increment(1);
                }
                return;
            }
            Err(e) if attempt < ATTEMPTS => {
                tracing::warn!(attempt, "audit entries not committed yet, retrying: {e}");
                tokio::time::sleep(std::time::Duration::from_millis(200 * u64::from(attempt)))
                    .await;
            }
            Err(e) => {
                for entry in entries {
                    tracing::error!(
                        request_id = %entry.request_id,
                        app = %entry.app_code,
                        operator = %entry.operator,
                        source = %entry.source,
                        api = %entry.api,
                        change = %entry.change.escape_debug(),
                        outcome_code = entry.outcome_code,
                        at = entry.at,
                        "audit entry not stored: {e}"
                    );
                }
                return;
            }
        }
    }
}

/// What a walk of the chain found.
#[derive(Debug, Clone, Default, PartialEq, Eq, serde::Serialize)]
pub struct Verification {
    /// Entries read.
    pub entries: i64,
    pub last_seq: i64,
    pub last_hash: String,
    /// Every break found (at most [`MAX_PROBLEMS`]), each naming the entry.
    pub problems: Vec<String>,
    /// Entries at the start of the chain written before the audit key existed (plain SHA-256).
    pub unkeyed: i64,
}

impl Verification {
    pub fn is_intact(&self) -> bool {
        self.problems.is_empty()
    }
}

/// Most problems a verification lists.
pub const MAX_PROBLEMS: usize = 100;

/// Walks the whole chain from entry 1; `known_head` (number and hash of an entry known to have
/// been written) is checked to still be there.
pub async fn verify(
    store: &Store,
    key: &AuditKey,
    known_head: Option<(i64, String)>,
) -> Result<Verification, fleetrun_store::StoreError> {
    let mut report = Verification::default();
    fn problem(report: &mut Verification, text: String) {
        if report.problems.len() < MAX_PROBLEMS {
            report.problems.push(text);
        }
    }
    let mut expected_seq = 1;
    let mut prev_hash = String::new();
    let mut known_seen = false;
    let mut keyed_seen = false;
    loop {
        let page = store
            .audit_entries(&AuditFilter {
                after_seq: Some(report.last_seq),
                limit: 1000,
                ..AuditFilter::default()
            })
            .await?;
        let Some(last) = page.last() else { break };
        let last_seq = last.seq;
        for AuditRecord {
            seq,
            entry,
            prev_hash: stored_prev,
            hash,
        } in page
        {
            if seq != expected_seq {
                problem(
                    &mut report,
                    format!(
                        "entries {expected_seq} to {} are missing (next found: {seq})",
                        seq - 1
                    ),
                );
            }
            if stored_prev != prev_hash {
                problem(
                    &mut report,
                    format!("entry {seq}: does not link to the entry before it"),
                );
            }
            if entry_hash(key, seq, &entry, &stored_prev) == hash {
                keyed_seen = true;
            } else if !keyed_seen
                && seq <= key.unkeyed_until
                && unkeyed_hash(seq, &entry, &stored_prev) == hash
            {
                // Written before the key existed.
                report.unkeyed += 1;
            } else {
                problem(
                    &mut report,
                    format!("entry {seq}: its content does not match its hash (edited)"),
                );
            }
            if let Some((known_seq, known_hash)) = &known_head
                && *known_seq == seq
            {
                known_seen = true;
                if *known_hash != hash {
                    problem(
                        &mut report,
                        format!("entry {seq}: not the entry this controller wrote"),
                    );
                }
            }
            report.entries += 1;
            expected_seq = seq + 1;
            prev_hash = hash;
        }
        report.last_seq = last_seq;
    }
    report.last_hash = prev_hash;
    if let Some((known_seq, _)) = known_head
        && !known_seen
        && known_seq > report.last_seq
    {
        let from = report.last_seq + 1;
        problem(
            &mut report,
            format!("entries {from} to {known_seq} are missing from the end"),
        );
    }
    Ok(report)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn secrets_are_masked_and_long_values_digested() {
        let params = json!({
            "bk_app_secret": "s3cret",
            "bk_app_code": "app",
            "script_param": "--password hunter2",
            "is_param_sensitive": 1,
            "callback_url": "https://example.com/hook?token=abc",
            "script_content": "x".repeat(1000),
            "target_server": {"host_id_list": (0..60).collect::<Vec<i64>>()},
            "nested": {"api_token": "t", "private_key": "k"},
        });
        let summary = summarize(params.as_object().unwrap());
        for secret in ["s3cret", "hunter2", "abc", "xxxxxxxx"] {
            assert!(!summary.contains(secret), "{secret} in {summary}");
        }
        let parsed: Value = serde_json::from_str(&summary).unwrap();
        assert_eq!(parsed["bk_app_code"], "app");
        assert_eq!(parsed["nested"]["api_token"], "***");
        assert_eq!(parsed["nested"]["private_key"], "***");
        assert!(
            parsed["script_content"]
                .as_str()
                .unwrap()
                .starts_with("<1000 bytes, sha256:")
        );
        let hosts = parsed["target_server"]["host_id_list"].as_array().unwrap();
        assert_eq!(hosts.len(), MAX_SHOWN_ITEMS + 1);
        assert_eq!(hosts.last().unwrap(), "<10 more>");
    }

    #[test]
    fn a_parameter_not_marked_sensitive_is_kept() {
        let params = json!({"script_param": "-v", "is_param_sensitive": "0"});
        let parsed: Value = serde_json::from_str(&summarize(params.as_object().unwrap())).unwrap();
        assert_eq!(parsed["script_param"], "-v");
    }

    #[test]
    fn a_huge_summary_is_recorded_as_its_digest() {
        let items: Map<String, Value> = (0..2000)
            .map(|i| (format!("field_{i}"), json!("value-value-value")))
            .collect();
        let summary = summarize(&items);
        assert!(summary.len() < 200, "{summary}");
    }

    #[test]
    fn the_hash_covers_every_field_and_the_link() {
        let entry = NewAuditEntry {
            at: 1,
            app_code: "a".into(),
            operator: "o".into(),
            source: "127.0.0.1:1".into(),
            request_id: "r".into(),
            api: "fast_execute_script".into(),
            change: "{}".into(),
            outcome_code: 0,
            outcome: "ok".into(),
        };
        let key = AuditKey::from_bytes(&[7; 32]);
        let base = entry_hash(&key, 1, &entry, "");
        assert_eq!(base.len(), 64);
        assert_ne!(entry_hash(&key, 2, &entry, ""), base);
        assert_ne!(entry_hash(&key, 1, &entry, "00"), base);
        let mut edited = entry.clone();
        edited.operator = "someone-else".into();
        assert_ne!(entry_hash(&key, 1, &edited, ""), base);
        // Moving text between fields changes the hash too.
        let mut shifted = entry.clone();
        shifted.app_code = "ao".into();
        shifted.operator = String::new();
        assert_ne!(entry_hash(&key, 1, &shifted, ""), base);
        // Without the key, the hash cannot be made: neither another key's nor the plain digest
        // matches.
        assert_ne!(
            entry_hash(&AuditKey::from_bytes(&[8; 32]), 1, &entry, ""),
            base
        );
        assert_ne!(unkeyed_hash(1, &entry, ""), base);
    }

    #[test]
    fn the_key_file_reads_back_and_bad_ones_are_refused() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("audit.key");
        let made = AuditKey::load_or_create(&path, 12).unwrap();
        assert_eq!(made.unkeyed_until, 12);
        let text = std::fs::read_to_string(&path).unwrap();
        assert!(text.ends_with("\nunkeyed_until = 12\n"), "{text}");
        use std::os::unix::fs::PermissionsExt as _;
        assert_eq!(
            std::fs::metadata(&path).unwrap().permissions().mode() & 0o777,
            0o600
        );
        // Loaded again, whatever the trail's head is now.
        let again = AuditKey::load_or_create(&path, 99).unwrap();
        assert_eq!(again.unkeyed_until, 12);
        let entry = NewAuditEntry {
            at: 1,
            app_code: "a".into(),
            operator: "o".into(),
            source: String::new(),
            request_id: "r".into(),
            api: "x".into(),
            change: "{}".into(),
            outcome_code: 0,
            outcome: "ok".into(),
        };
        assert_eq!(
            entry_hash(&made, 1, &entry, ""),
            entry_hash(&again, 1, &entry, "")
        );
        for (bad, why) in [
            ("no!pe", "not base64"),
            ("AAAA", "not a 32-byte key"),
            (
                "AAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAA=\nunkeyed = 3",
                "the second line",
            ),
        ] {
            std::fs::write(&path, bad).unwrap();
            let e = AuditKey::check(&path).unwrap_err();
            assert!(e.reason.starts_with(why), "{bad}: {e}");
        }
    }

    #[test]
    fn changing_apis_are_audited_and_reads_are_not() {
        for api in [
            "fast_execute_script",
            "operate_job_instance",
            "create_script",
            "publish_script_version",
            "change_inventory",
            "revoke_agent",
            "unrevoke_agent",
            "reload_inventory",
            "create_dangerous_rule",
            "enable_dangerous_rule",
            "disable_dangerous_rule",
            "delete_dangerous_rule",
        ] {
            assert!(is_state_changing(api), "{api}");
        }
        for api in [
            "get_job_instance_status",
            "list_hosts",
            "get_audit_log",
            "check_script",
            "get_dangerous_rule_list",
        ] {
            assert!(!is_state_changing(api), "{api}");
        }
    }
}
