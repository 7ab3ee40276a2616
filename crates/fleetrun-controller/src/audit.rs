//! The audit trail: every state-changing API call, appended to a hash chain in the store.
//!
//! An entry says when, which app and operator, from which address, under which request id,
//! which API, what was asked (the request's parameters with secrets masked and long values
//! replaced by their size and SHA-256), and how it ended. Its hash covers all of that and the
//! previous entry's hash, so an edited row no longer matches its hash, and a deleted or inserted
//! one breaks the link or the numbering. [`verify`] walks the chain; the controller also keeps
//! the head it last wrote, so removing entries from the end is noticed while it runs.
//!
//! Appends go through one task that commits whatever has queued in one transaction, so the
//! trail costs a request a channel send, not a commit of its own: concurrent calls share one.
//! Reading the trail (`get_audit_log`, `verify_audit_log`) first waits for what is queued.

use std::sync::{Arc, Mutex};

use fleetrun_store::{AuditFilter, AuditRecord, NewAuditEntry, Store};
use ring::digest::{SHA256, digest};
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

/// The entry's hash: SHA-256 over a version tag, its number, every field and the previous
/// hash, each length-prefixed so that no two entries encode alike.
pub fn entry_hash(seq: i64, entry: &NewAuditEntry, prev_hash: &str) -> String {
    let mut bytes = Vec::with_capacity(256 + entry.change.len());
    let seq = seq.to_string();
    let at = entry.at.to_string();
    let code = entry.outcome_code.to_string();
    for field in [
        "fleetrun-audit-v1",
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
    hex(digest(&SHA256, &bytes).as_ref())
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
        tasks: &mut tokio::task::JoinSet<()>,
    ) -> Result<Self, fleetrun_store::StoreError> {
        let head = Arc::new(Mutex::new(store.audit_head().await?));
        let (queue, mut incoming) = mpsc::channel::<Queued>(QUEUE);
        let task_head = head.clone();
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
                    commit(&store, &entries, &task_head).await;
                }
                for done in flushes {
                    let _ = done.send(());
                }
            }
        });
        Ok(Self { queue, head })
    }

    /// Queues `entry` for the next commit; waits only while the queue is full. The request's
    /// reply does not wait for the database: an entry reaches it within one commit (a few
    /// milliseconds), and a controller that stops commits what is queued first.
    pub async fn append(&self, entry: NewAuditEntry) {
        if self.queue.send(Queued::Entry(entry)).await.is_err() {
            tracing::error!("the audit log is closed: an entry was not recorded");
        }
    }

    /// Returns once every entry queued before this call is committed or given up.
    pub async fn flush(&self) {
        let (done, flushed) = oneshot::channel();
        if self.queue.send(Queued::Flush(done)).await.is_ok() {
            let _ = flushed.await;
        }
    }

    /// The last entry this controller knows was written.
    pub fn head(&self) -> Option<(i64, String)> {
        self.head.lock().unwrap().clone()
    }
}

/// Commits one batch, retrying a refusing database a few times; entries it cannot store are
/// written to the log in full, so the record survives there.
async fn commit(store: &Store, entries: &[NewAuditEntry], head: &Mutex<Option<(i64, String)>>) {
    let started = std::time::Instant::now();
    let mut attempt = 0;
    loop {
        attempt += 1;
        match store.append_audit(entries, &entry_hash).await {
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
            if entry_hash(seq, &entry, &stored_prev) != hash {
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
        let base = entry_hash(1, &entry, "");
        assert_eq!(base.len(), 64);
        assert_ne!(entry_hash(2, &entry, ""), base);
        assert_ne!(entry_hash(1, &entry, "00"), base);
        let mut edited = entry.clone();
        edited.operator = "someone-else".into();
        assert_ne!(entry_hash(1, &edited, ""), base);
        // Moving text between fields changes the hash too.
        let mut shifted = entry.clone();
        shifted.app_code = "ao".into();
        shifted.operator = String::new();
        assert_ne!(entry_hash(1, &shifted, ""), base);
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
        ] {
            assert!(is_state_changing(api), "{api}");
        }
        for api in ["get_job_instance_status", "list_hosts", "get_audit_log"] {
            assert!(!is_state_changing(api), "{api}");
        }
    }
}
