//! The audit trail: every state-changing API call, appended to a hash chain in the store.
//!
//! An entry says when, which app and operator, from which address, under which request id,
//! which API, what was asked (the request's parameters with secrets masked and long values
//! replaced by their size and SHA-256), and how it ended. Its hash covers all of that and the
//! previous entry's hash, so an edited row no longer matches its hash, and a deleted or inserted
//! one breaks the link or the numbering. [`verify`] walks the chain; the controller also keeps
//! the head it last wrote, so removing entries from the end is noticed while it runs.
//!
//! The hash is BLAKE3 in its keyed mode under the audit key ([`AuditKey`], a file outside the
//! database: `[security] audit_key_file`; `fleetrun-audit-v3`), so someone who can write the
//! database but not read the key cannot recompute the chain after an edit. Entries written by
//! earlier releases carry an HMAC-SHA256 under the same key (`fleetrun-audit-v2`), which
//! [`verify`] accepts as well: both need the key, and BLAKE3 takes a quarter of the instructions
//! per entry on a CPU without SHA extensions. Entries written before the key existed (plain
//! SHA-256, `fleetrun-audit-v1`) are accepted only up to the number the key file recorded when it
//! was made (`unkeyed_until`), and counted apart ([`Verification::unkeyed`]): a chain rewritten
//! with plain hashes does not pass for an old one.
//!
//! Entries are appended by the store's writer, numbered and chained in the group commit that
//! carries the job engine's writes ([`fleetrun_store::Write::Audit`]), so the trail costs a
//! request a channel send, not a transaction of its own competing with the job engine's for the
//! database's write lock. Reading the trail (`get_audit_log`, `verify_audit_log`) first waits
//! for what is queued.

use std::sync::{
    Arc, Mutex,
    atomic::{AtomicBool, Ordering},
};

use base64::Engine as _;

use fleetrun_store::{AuditFilter, AuditRecord, NewAuditEntry, SharedAuditHasher, Store};
use ring::{
    digest::{SHA256, digest},
    hmac,
    rand::{SecureRandom, SystemRandom},
};
use serde::{
    Serialize, Serializer,
    ser::{SerializeMap as _, SerializeSeq as _},
};
use serde_json::{Map, Value, json};
use tokio::sync::{mpsc, oneshot, watch};

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

/// Whether a parameter's value is a secret by its name (compared without regard to case).
fn is_secret_key(key: &str) -> bool {
    if COMMON_KEYS.contains(&key) {
        return false;
    }
    is_secret_name(key)
}

/// Parameter names of bk-job's changing APIs that name no secret, answered without the
/// automaton: most of every request is made of them.
const COMMON_KEYS: [&str; 16] = [
    "account_alias",
    "account_id",
    "bk_app_code",
    "bk_biz_id",
    "bk_scope_id",
    "bk_scope_type",
    "bk_username",
    "host_id_list",
    "ip_list",
    "script_content",
    "script_language",
    "script_param",
    "target_server",
    "task_name",
    "timeout",
    "is_param_sensitive",
];

fn is_secret_name(key: &str) -> bool {
    static WORDS: std::sync::LazyLock<aho_corasick::AhoCorasick> = std::sync::LazyLock::new(|| {
        aho_corasick::AhoCorasick::builder()
            .ascii_case_insensitive(true)
            .build(["secret", "password", "passwd", "token", "credential"])
            .expect("five short literal words build an automaton")
    });
    let bytes = key.as_bytes();
    WORDS.is_match(key)
        || bytes.len() >= 4 && bytes[bytes.len() - 4..].eq_ignore_ascii_case(b"_key")
        || bytes.eq_ignore_ascii_case(b"key")
}

fn truthy(value: Option<&Value>) -> bool {
    match value {
        Some(Value::Bool(b)) => *b,
        Some(Value::Number(n)) => n.as_i64().is_some_and(|n| n != 0),
        Some(Value::String(s)) => matches!(s.trim(), "1" | "true"),
        _ => false,
    }
}

fn described(bytes: &[u8]) -> String {
    format!(
        "<{} bytes, sha256:{}>",
        bytes.len(),
        hex::encode(digest(&SHA256, bytes))
    )
}

/// A value as recorded: long strings as their size and digest, long arrays cut, objects
/// masked ([`Masked`]), nothing deeper than 8 levels. Written straight to the summary's text,
/// without a masked copy of the request (every audited call makes one).
struct Shown<'a> {
    value: &'a Value,
    depth: usize,
}

impl Serialize for Shown<'_> {
    fn serialize<S: Serializer>(&self, serializer: S) -> Result<S::Ok, S::Error> {
        let depth = self.depth;
        match self.value {
            Value::String(s) if s.len() > MAX_SHOWN_STRING => {
                serializer.serialize_str(&described(s.as_bytes()))
            }
            Value::Array(items) if depth > 8 => {
                serializer.collect_str(&format_args!("<{} items>", items.len()))
            }
            Value::Object(map) if depth > 8 => {
                serializer.collect_str(&format_args!("<{} fields>", map.len()))
            }
            Value::Array(items) => {
                let more = items.len().saturating_sub(MAX_SHOWN_ITEMS);
                let shown = items.len() - more;
                let mut seq = serializer.serialize_seq(Some(shown + usize::from(more > 0)))?;
                for value in &items[..shown] {
                    seq.serialize_element(&Shown {
                        value,
                        depth: depth + 1,
                    })?;
                }
                if more > 0 {
                    seq.serialize_element(&format!("<{more} more>"))?;
                }
                seq.end()
            }
            Value::Object(map) => Masked {
                map,
                depth: depth + 1,
            }
            .serialize(serializer),
            other => other.serialize(serializer),
        }
    }
}

/// An object as recorded: secrets by name, sensitive script parameters and callback URLs'
/// queries masked, every other value [`Shown`].
struct Masked<'a> {
    map: &'a Map<String, Value>,
    depth: usize,
}

impl Serialize for Masked<'_> {
    fn serialize<S: Serializer>(&self, serializer: S) -> Result<S::Ok, S::Error> {
        let sensitive_param = truthy(self.map.get("is_param_sensitive"));
        let mut out = serializer.serialize_map(Some(self.map.len()))?;
        for (key, value) in self.map {
            if is_secret_key(key) || (key == "script_param" && sensitive_param) {
                out.serialize_entry(key, "***")?;
            } else if let ("callback_url", Some(url)) = (key.as_str(), value.as_str()) {
                out.serialize_entry(key, &crate::callback::redact(url))?;
            } else {
                out.serialize_entry(
                    key,
                    &Shown {
                        value,
                        depth: self.depth,
                    },
                )?;
            }
        }
        out.end()
    }
}

/// What a call asked for, as recorded: its parameters with secrets masked (credentials,
/// sensitive script parameters, callback URLs' queries) and long values replaced by their size
/// and SHA-256.
pub fn summarize(params: &Map<String, Value>) -> String {
    let mut text = Vec::with_capacity(512);
    serde_json::to_writer(
        &mut text,
        &Masked {
            map: params,
            depth: 0,
        },
    )
    .expect("a JSON value serializes");
    let text = String::from_utf8(text).expect("serde_json writes UTF-8");
    if text.len() > MAX_CHANGE_BYTES {
        return json!({ "summary": described(text.as_bytes()) }).to_string();
    }
    text
}

/// The key the chain's hashes are made with: 32 random bytes, base64 in a file of its own, and
/// the last entry written before it existed.
#[derive(Clone)]
pub struct AuditKey {
    /// For BLAKE3's keyed mode (entries since `fleetrun-audit-v3`).
    bytes: [u8; 32],
    /// The same key for HMAC-SHA256: earlier entries, and the head anchor.
    key: hmac::Key,
    /// Names the key without revealing it; recorded in the store.
    fingerprint: String,
    /// Entries up to this number may carry the plain hash of entries written before the key.
    unkeyed_until: i64,
    /// Entries up to this number were made under a key that was lost and replaced
    /// (`fleetrun-controller audit rekey`): only their links can be checked.
    lost_until: i64,
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

/// The audit head anchor file cannot be used (`[security] audit_anchor_file`).
#[derive(Debug, thiserror::Error)]
#[error("audit head anchor {path}: {reason}")]
pub struct AuditAnchorError {
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
        let key: [u8; 32] = key.try_into().map_err(|_| "not a 32-byte key")?;
        let number = |line: &str, name: &str| {
            line.strip_prefix(name)
                .and_then(|rest| rest.trim_start().strip_prefix('='))
                .and_then(|n| n.trim().parse().ok())
                .filter(|n: &i64| *n >= 0)
        };
        let unkeyed_until = match lines.next() {
            None => 0,
            Some(line) => {
                number(line, "unkeyed_until").ok_or("the second line is not `unkeyed_until = N`")?
            }
        };
        let lost_until = match lines.next() {
            None => 0,
            Some(line) => {
                number(line, "lost_until").ok_or("the third line is not `lost_until = N`")?
            }
        };
        if lines.next().is_some() {
            return Err("more than a key, `unkeyed_until = N` and `lost_until = N`");
        }
        let mut made = Self::from_bytes(&key).with_unkeyed_until(unkeyed_until);
        made.lost_until = lost_until;
        Ok(made)
    }

    /// A key from its bytes, for a trail that has no entry written before it.
    pub fn from_bytes(key: &[u8; 32]) -> Self {
        let mut tagged = b"fleetrun-audit-key-fingerprint-v1".to_vec();
        tagged.extend_from_slice(key);
        Self {
            bytes: *key,
            key: hmac::Key::new(hmac::HMAC_SHA256, key),
            fingerprint: format!("sha256:{}", &hex::encode(digest(&SHA256, &tagged))[..32]),
            unkeyed_until: 0,
            lost_until: 0,
        }
    }

    /// What names this key in the store and in messages: a digest of it, which does not reveal
    /// it.
    pub fn fingerprint(&self) -> &str {
        &self.fingerprint
    }

    /// Writes a new random key to `path` (which must not exist), 0600; entries up to
    /// `lost_until` were made under a key that is gone.
    fn create(path: &std::path::Path, lost_until: i64) -> Result<Self, AuditKeyError> {
        use std::{io::Write as _, os::unix::fs::OpenOptionsExt as _};
        let fail = |reason: String| AuditKeyError {
            path: path.to_owned(),
            reason,
        };
        let mut key = [0u8; 32];
        SystemRandom::new()
            .fill(&mut key)
            .map_err(|_| fail("no randomness".into()))?;
        let encoded = format!(
            "{}\nunkeyed_until = 0\nlost_until = {lost_until}\n",
            base64::engine::general_purpose::STANDARD.encode(key)
        );
        let mut file = std::fs::OpenOptions::new()
            .write(true)
            .create_new(true)
            .mode(0o600)
            .open(path)
            .map_err(|e| fail(e.to_string()))?;
        file.write_all(encoded.as_bytes())
            .and_then(|()| file.sync_all())
            .map_err(|e| fail(e.to_string()))?;
        Self::decode(&encoded).map_err(|reason| fail(reason.to_owned()))
    }

    /// Whether this key made `record`'s hash, as this release writes it (BLAKE3) or as earlier
    /// ones did (HMAC-SHA256).
    fn signs(&self, record: &AuditRecord) -> bool {
        self.signs_parts(record.seq, &record.entry, &record.prev_hash, &record.hash)
    }

    fn signs_parts(&self, seq: i64, entry: &NewAuditEntry, prev_hash: &str, hash: &str) -> bool {
        entry_hash(self, seq, entry, prev_hash) == hash
            || hmac_entry_hash(self, seq, entry, prev_hash) == hash
    }

    /// The same key, accepting plain hashes on entries up to `seq`.
    pub fn with_unkeyed_until(mut self, seq: i64) -> Self {
        self.unkeyed_until = seq;
        self
    }
}

/// The entry's hash: BLAKE3 keyed with `key` over a version tag, its number, every field and
/// the previous hash, each length-prefixed so that no two entries encode alike.
pub fn entry_hash(key: &AuditKey, seq: i64, entry: &NewAuditEntry, prev_hash: &str) -> String {
    // Gathered first: BLAKE3 costs more per `update` than per byte of an entry.
    let mut encoded = Vec::with_capacity(1024);
    entry_fields(KEYED, seq, entry, prev_hash, |bytes| {
        encoded.extend_from_slice(bytes)
    });
    blake3::keyed_hash(&key.bytes, &encoded)
        .to_hex()
        .to_string()
}

/// The hash entries carried before `fleetrun-audit-v3`: HMAC-SHA256 under `key` over the same
/// encoding, tagged `fleetrun-audit-v2`.
fn hmac_entry_hash(key: &AuditKey, seq: i64, entry: &NewAuditEntry, prev_hash: &str) -> String {
    let mut mac = hmac::Context::with_key(&key.key);
    entry_fields(HMAC_KEYED, seq, entry, prev_hash, |bytes| mac.update(bytes));
    hex::encode(mac.sign())
}

/// The hash of an entry written before the audit key existed: plain SHA-256.
fn unkeyed_hash(seq: i64, entry: &NewAuditEntry, prev_hash: &str) -> String {
    let mut hash = ring::digest::Context::new(&SHA256);
    entry_fields(UNKEYED, seq, entry, prev_hash, |bytes| hash.update(bytes));
    hex::encode(hash.finish())
}

const KEYED: &str = "fleetrun-audit-v3";
const HMAC_KEYED: &str = "fleetrun-audit-v2";
const UNKEYED: &str = "fleetrun-audit-v1";

/// Feeds what an entry's hash covers to `feed`, field by field, each after its length as 8
/// big-endian bytes: the hashes read the entry where it is instead of a copy of it.
fn entry_fields(
    tag: &str,
    seq: i64,
    entry: &NewAuditEntry,
    prev_hash: &str,
    mut feed: impl FnMut(&[u8]),
) {
    let (seq, at, code) = (
        seq.to_string(),
        entry.at.to_string(),
        entry.outcome_code.to_string(),
    );
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
        feed(&(field.len() as u64).to_be_bytes());
        feed(field.as_bytes());
    }
}

/// What the anchoring task is asked to do.
enum Control {
    /// Answered once every entry appended before it is committed (or given up) and the anchor
    /// names the head.
    Flush(oneshot::Sender<()>),
    /// Commits what is queued and the count of unrecorded refusals, anchors the head, answers,
    /// and ends the task.
    Close(oneshot::Sender<()>),
}

/// Appends entries; cheap to clone.
#[derive(Clone)]
pub struct AuditLog {
    store: Store,
    /// Hashes entries with the key, in the writer's group commit.
    hasher: SharedAuditHasher,
    control: mpsc::Sender<Control>,
    /// The trail's head when the controller started.
    start_head: Option<(i64, String)>,
    /// The last entry this controller's writer committed.
    committed: watch::Receiver<Option<(i64, String)>>,
    /// Set once [`AuditLog::close`] began: later entries are not recorded (and logged as such).
    closed: Arc<AtomicBool>,
    key: AuditKey,
    refusals: Arc<Mutex<RefusalBudget>>,
}

/// Refused authentications recorded one by one per minute at most: a client hammering the API
/// with bad credentials must not flood the trail (or the disk); past the budget they are
/// counted, and once the minute is over (at the next refusal, on the anchoring task's timer, or
/// when the controller stops) an entry says how many went unrecorded.
pub const REFUSED_AUTH_PER_MINUTE: u32 = 60;
/// bk-job's code for refused credentials, which refused authentications are recorded with.
const REFUSED_CODE: i64 = 1_640_001;
/// The budget's window.
const REFUSAL_WINDOW: std::time::Duration = std::time::Duration::from_secs(60);
/// How often the anchoring task looks for a count of unrecorded refusals to write.
const REFUSAL_TICK: std::time::Duration = std::time::Duration::from_secs(5);
/// Least time between two anchor writes (each a file sync and a directory sync) while entries
/// keep coming; the anchor is also written at once when the trail is flushed (read, verified)
/// and when the trail closes, so after a clean stop it names the last entry, and after a crash
/// it lags the chain by at most this long.
const ANCHOR_EVERY: std::time::Duration = std::time::Duration::from_secs(1);

#[derive(Debug)]
struct RefusalBudget {
    window_start: tokio::time::Instant,
    recorded: u32,
    unrecorded: u64,
}

impl RefusalBudget {
    fn new() -> Self {
        Self {
            window_start: tokio::time::Instant::now(),
            recorded: 0,
            unrecorded: 0,
        }
    }

    /// The count of unrecorded refusals to write now: when the window is over (or `closing`),
    /// the count is taken and the window starts again.
    fn take_due(&mut self, closing: bool) -> u64 {
        if self.unrecorded > 0 && (closing || self.window_start.elapsed() >= REFUSAL_WINDOW) {
            let unrecorded = self.unrecorded;
            *self = Self::new();
            return unrecorded;
        }
        0
    }
}

/// The entry saying how many refused authentications went unrecorded one by one.
fn unrecorded_refusals(unrecorded: u64, at: i64) -> NewAuditEntry {
    NewAuditEntry {
        at,
        app_code: String::new(),
        operator: String::new(),
        source: String::new(),
        request_id: String::new(),
        api: "refused_authentication".to_owned(),
        change: json!({ "unrecorded_refusals": unrecorded }).to_string(),
        outcome_code: REFUSED_CODE,
        outcome: format!(
            "{unrecorded} more refused authentications in the minute before, past \
             {REFUSED_AUTH_PER_MINUTE} a minute, were not recorded one by one"
        ),
    }
}

impl std::fmt::Debug for AuditLog {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("AuditLog").finish_non_exhaustive()
    }
}

/// Longest a read of the trail (or the close) waits for the entries queued before it: while
/// the database refuses writes, they stay queued and the read answers with what is committed.
const SETTLE_WAIT: std::time::Duration = std::time::Duration::from_secs(5);
/// Requests to the anchoring task waiting for it; a caller waits for room only past this many.
const CONTROL_QUEUE: usize = 64;

impl AuditLog {
    /// Starts the anchoring task in `tasks`: it writes the head anchor after the writer commits
    /// entries (at most once every [`ANCHOR_EVERY`], at once on a flush and at close) and the
    /// count of unrecorded refusals once their minute is over; it ends at [`AuditLog::close`]
    /// or once every handle is dropped. Without `anchor`, the head is kept in memory only.
    pub async fn start(
        store: Store,
        key: AuditKey,
        anchor: Option<Anchor>,
        tasks: &mut tokio::task::JoinSet<()>,
    ) -> Result<Self, fleetrun_store::StoreError> {
        let start_head = store.audit_head().await?;
        let hasher_key = key.clone();
        let hasher = SharedAuditHasher(Arc::new(
            move |seq: i64, entry: &NewAuditEntry, prev: &str| {
                entry_hash(&hasher_key, seq, entry, prev)
            },
        ));
        let (control, requests) = mpsc::channel(CONTROL_QUEUE);
        let log = Self {
            committed: store.committed_audit_head(),
            store,
            hasher,
            control,
            start_head,
            closed: Arc::new(AtomicBool::new(false)),
            key,
            refusals: Arc::new(Mutex::new(RefusalBudget::new())),
        };
        // The task holds no sender of its own, so it sees every handle dropped.
        let sink = Sink {
            store: log.store.clone(),
            hasher: log.hasher.clone(),
            anchor,
            committed: log.committed.clone(),
            closed: log.closed.clone(),
        };
        tasks.spawn(anchor_loop(sink, requests, log.refusals.clone()));
        Ok(log)
    }

    /// Queues `entry` for the store writer's next group commit, which numbers and chains it;
    /// waits only while the writer's queue is full. The request's reply does not wait for the
    /// database: an entry reaches it within one commit (a few milliseconds), and a controller
    /// that stops commits what is queued first.
    /// Every text field's NUL characters become U+FFFD first: a client chooses much of what an
    /// entry says (its claimed app code and user, its request), PostgreSQL refuses NUL in text,
    /// and the entry is hashed as stored.
    pub async fn append(&self, mut entry: NewAuditEntry) {
        without_nul(&mut entry);
        if self.closed.load(Ordering::Acquire) {
            log_unstored(&entry, "the audit log is closed");
            return;
        }
        let write = fleetrun_store::Write::Audit {
            entry,
            hasher: self.hasher.clone(),
        };
        if let Err(e) = self.store.record(write).await {
            tracing::error!("an audit entry was not recorded: {e}");
        }
    }

    /// Records a refused authentication within the budget ([`REFUSED_AUTH_PER_MINUTE`]).
    pub async fn append_refused_auth(&self, entry: NewAuditEntry) {
        let (record, unrecorded) = {
            let mut budget = self.refusals.lock().unwrap_or_else(|e| e.into_inner());
            let unrecorded = budget.take_due(false);
            if budget.window_start.elapsed() >= REFUSAL_WINDOW {
                *budget = RefusalBudget::new();
            }
            if budget.recorded < REFUSED_AUTH_PER_MINUTE {
                budget.recorded += 1;
                (true, unrecorded)
            } else {
                budget.unrecorded += 1;
                (false, unrecorded)
            }
        };
        if unrecorded > 0 {
            self.append(unrecorded_refusals(unrecorded, entry.at)).await;
        }
        if record {
            self.append(entry).await;
        } else {
            metrics::counter!("fleetrun_audit_unrecorded_refusals_total").increment(1);
        }
    }

    /// Returns once every entry appended before this call is committed or given up, and the
    /// head anchor names the head.
    pub async fn flush(&self) {
        let (done, flushed) = oneshot::channel();
        if self.control.send(Control::Flush(done)).await.is_ok() {
            let _ = flushed.await;
        }
    }

    /// Commits what is queued and the count of refusals not yet recorded, then ends the
    /// anchoring task: the controller's last word in the trail when it stops. Entries appended
    /// after it are not recorded (and logged as such).
    pub async fn close(&self) {
        let (done, closed) = oneshot::channel();
        if self.control.send(Control::Close(done)).await.is_ok() {
            let _ = closed.await;
        }
    }

    /// The key the chain is made with.
    pub fn key(&self) -> &AuditKey {
        &self.key
    }

    /// The last entry this controller knows was written: the last its writer committed, else
    /// the head found at start.
    pub fn head(&self) -> Option<(i64, String)> {
        self.committed
            .borrow()
            .clone()
            .or_else(|| self.start_head.clone())
    }
}

/// Replaces the NUL characters of `entry`'s text fields with U+FFFD.
fn without_nul(entry: &mut NewAuditEntry) {
    let NewAuditEntry {
        at: _,
        app_code,
        operator,
        source,
        request_id,
        api,
        change,
        outcome_code: _,
        outcome,
    } = entry;
    for text in [app_code, operator, source, request_id, api, change, outcome] {
        if text.contains('\0') {
            *text = text.replace('\0', "\u{FFFD}");
        }
    }
}

/// Writes an entry that will never be stored to the log in full, so the record survives there.
fn log_unstored(entry: &NewAuditEntry, why: &str) {
    tracing::error!(
        request_id = %entry.request_id,
        app = %entry.app_code,
        operator = %entry.operator,
        source = %entry.source,
        api = %entry.api,
        change = %entry.change.escape_debug(),
        outcome_code = entry.outcome_code,
        at = entry.at,
        "audit entry not stored: {why}"
    );
}

/// What the anchoring task works with: the store, and the head anchor file.
struct Sink {
    store: Store,
    hasher: SharedAuditHasher,
    anchor: Option<Anchor>,
    committed: watch::Receiver<Option<(i64, String)>>,
    closed: Arc<AtomicBool>,
}

impl Sink {
    async fn append(&self, entry: NewAuditEntry) {
        let write = fleetrun_store::Write::Audit {
            entry,
            hasher: self.hasher.clone(),
        };
        if let Err(e) = self.store.record(write).await {
            tracing::error!("an audit entry was not recorded: {e}");
        }
    }

    /// Waits until what was appended is committed (or given up), at most [`SETTLE_WAIT`],
    /// then anchors the head.
    async fn settle(&mut self, anchoring: &mut Anchoring) {
        match tokio::time::timeout(SETTLE_WAIT, self.store.flush()).await {
            Ok(Ok(())) => {}
            Ok(Err(e)) => tracing::error!("the audit trail's entries were not committed: {e}"),
            Err(_) => tracing::warn!(
                "the audit trail's last entries are not committed yet (the store's writer has \
                 not taken them): they stay queued with the job engine's writes"
            ),
        }
        if self.committed.has_changed().unwrap_or(false) {
            anchoring.committed(self.committed.borrow_and_update().clone());
        }
        anchoring.write(self).await;
    }
}

/// The anchoring task: follows the heads the writer commits and writes them to the anchor
/// file, writes the count of unrecorded refusals once their minute is over, and, at close or
/// when every handle is gone, commits what is left, that count included.
async fn anchor_loop(
    mut sink: Sink,
    mut requests: mpsc::Receiver<Control>,
    refusals: Arc<Mutex<RefusalBudget>>,
) {
    let mut anchoring = Anchoring::default();
    let mut tick = tokio::time::interval(REFUSAL_TICK);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    let due = |closing: bool| {
        let unrecorded = refusals
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .take_due(closing);
        (unrecorded > 0).then(|| unrecorded_refusals(unrecorded, crate::now_ms()))
    };
    let mut following = true;
    let mut closes = Vec::new();
    loop {
        let mut committed = sink.committed.clone();
        tokio::select! {
            request = requests.recv() => match request {
                Some(Control::Flush(done)) => {
                    // Every flush queued meanwhile is answered by the same settle: k readers
                    // during an outage wait one `SETTLE_WAIT`, not k of them.
                    let mut waiting = vec![done];
                    let mut close = None;
                    while let Ok(request) = requests.try_recv() {
                        match request {
                            Control::Flush(done) => waiting.push(done),
                            Control::Close(done) => {
                                close = Some(done);
                                break;
                            }
                        }
                    }
                    sink.settle(&mut anchoring).await;
                    for done in waiting {
                        let _ = done.send(());
                    }
                    if let Some(done) = close {
                        closes.push(done);
                        break;
                    }
                }
                Some(Control::Close(done)) => {
                    closes.push(done);
                    break;
                }
                None => break,
            },
            _ = tick.tick() => {
                if let Some(entry) = due(false) {
                    sink.append(entry).await;
                }
            }
            // While a head waits for its turn, later commits are not followed one by one: the
            // head is read again when the anchor is due.
            changed = committed.changed(), if following && anchoring.pending.is_none() => {
                if changed.is_err() {
                    // The writer is gone: nothing more will be committed.
                    following = false;
                    continue;
                }
                anchoring.committed(sink.committed.borrow_and_update().clone());
                if anchoring.is_due() {
                    anchoring.write(&sink).await;
                }
            }
            () = anchoring.due_at(), if anchoring.pending.is_some() => {
                anchoring.committed(sink.committed.borrow_and_update().clone());
                anchoring.write(&sink).await;
            }
        }
    }
    sink.closed.store(true, Ordering::Release);
    if let Some(entry) = due(true) {
        sink.append(entry).await;
    }
    sink.settle(&mut anchoring).await;
    for done in closes {
        let _ = done.send(());
    }
}

/// The head the anchor file has yet to name, and when it was last written.
#[derive(Debug, Default)]
struct Anchoring {
    pending: Option<(i64, String)>,
    last_written: Option<tokio::time::Instant>,
}

impl Anchoring {
    fn committed(&mut self, head: Option<(i64, String)>) {
        if head.is_some() {
            self.pending = head;
        }
    }

    fn is_due(&self) -> bool {
        self.pending.is_some()
            && self
                .last_written
                .is_none_or(|at| at.elapsed() >= ANCHOR_EVERY)
    }

    async fn due_at(&self) {
        if let Some(at) = self.last_written {
            tokio::time::sleep_until(at + ANCHOR_EVERY).await;
        }
    }

    /// Writes the pending head to the anchor file, if there is one to write.
    async fn write(&mut self, sink: &Sink) {
        let Some((seq, hash)) = self.pending.take() else {
            return;
        };
        self.last_written = Some(tokio::time::Instant::now());
        let Some(anchor) = sink.anchor.clone() else {
            return;
        };
        match tokio::task::spawn_blocking(move || anchor.write(seq, &hash)).await {
            Ok(Ok(())) => {}
            Ok(Err(e)) => tracing::error!("{e}"),
            Err(e) => tracing::error!("the audit head anchor was not written: {e}"),
        }
    }
}

/// The head anchor: the chain's last entry (number and hash), kept outside the database in a
/// file of the state directory (`[security] audit_anchor_file`, 0600), HMAC'd with the key,
/// rewritten after commits (at most once a second, and at once on a flush and at close). Rows
/// cut from the end of the chain while the controller is stopped leave a valid shorter chain; the anchor
/// still names the entry that was last, so the cut is found at the next start.
#[derive(Debug, Clone)]
pub struct Anchor {
    path: std::path::PathBuf,
    key: AuditKey,
}

const ANCHOR_TAG: &str = "fleetrun-audit-head-v1";

impl Anchor {
    /// The anchor at `path` (`[security] audit_anchor_file`), signed with `key`; refused when it
    /// is the key file itself (writing it would destroy the key).
    pub fn at(
        path: &std::path::Path,
        key_path: &std::path::Path,
        key: AuditKey,
    ) -> Result<Self, AuditAnchorError> {
        let anchor = Self {
            path: path.to_owned(),
            key,
        };
        let same = |a: &std::path::Path, b: &std::path::Path| {
            a == b
                || matches!(
                    (std::fs::canonicalize(a), std::fs::canonicalize(b)),
                    (Ok(a), Ok(b)) if a == b
                )
        };
        if same(path, key_path) || same(&anchor.staged_path(), key_path) {
            return Err(AuditAnchorError {
                path: path.to_owned(),
                reason: format!(
                    "is the audit key file {} (or its staging name): writing it would destroy \
                     the key; set [security] audit_anchor_file to another file",
                    key_path.display()
                ),
            });
        }
        Ok(anchor)
    }

    pub fn path(&self) -> &std::path::Path {
        &self.path
    }

    fn mac(&self, seq: i64, hash: &str) -> String {
        let mut bytes = Vec::with_capacity(128);
        for field in [ANCHOR_TAG, &seq.to_string(), hash] {
            bytes.extend_from_slice(&(field.len() as u64).to_be_bytes());
            bytes.extend_from_slice(field.as_bytes());
        }
        hex::encode(hmac::sign(&self.key.key, &bytes))
    }

    /// Replaces the file: a new file (made afresh, 0600, never through a link planted in its
    /// place) is written, synced and renamed over it, and the directory synced, so a reader never
    /// sees half of one and a commit the anchor names is not lost with the power.
    pub fn write(&self, seq: i64, hash: &str) -> Result<(), AuditAnchorError> {
        use std::{io::Write as _, os::unix::fs::OpenOptionsExt as _};
        let fail = |e: std::io::Error| AuditAnchorError {
            path: self.path.clone(),
            reason: format!("cannot be written: {e}"),
        };
        // An empty hash (an empty trail) is written as `-`: the line keeps its three fields.
        let shown = if hash.is_empty() { "-" } else { hash };
        let text = format!("{seq} {shown} {}\n", self.mac(seq, hash));
        let staged = self.staged_path();
        match std::fs::remove_file(&staged) {
            Ok(()) => {}
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
            Err(e) => return Err(fail(e)),
        }
        let mut file = std::fs::OpenOptions::new()
            .write(true)
            .create_new(true)
            .custom_flags(libc::O_NOFOLLOW)
            .mode(0o600)
            .open(&staged)
            .map_err(fail)?;
        file.write_all(text.as_bytes())
            .and_then(|()| file.sync_all())
            .map_err(fail)?;
        drop(file);
        std::fs::rename(&staged, &self.path).map_err(fail)?;
        let dir = match self.path.parent() {
            Some(dir) if !dir.as_os_str().is_empty() => dir,
            _ => std::path::Path::new("."),
        };
        std::fs::File::open(dir)
            .and_then(|d| d.sync_all())
            .map_err(fail)
    }

    /// Whether a new anchor can be written where this one goes (the directory exists and is
    /// writable), without touching the anchor.
    pub fn probe(&self) -> Result<(), AuditAnchorError> {
        use std::os::unix::fs::OpenOptionsExt as _;
        let staged = self.staged_path();
        let fail = |e: std::io::Error| AuditAnchorError {
            path: self.path.clone(),
            reason: format!("cannot be written (set [security] audit_anchor_file): {e}"),
        };
        match std::fs::remove_file(&staged) {
            Ok(()) => {}
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
            Err(e) => return Err(fail(e)),
        }
        std::fs::OpenOptions::new()
            .write(true)
            .create_new(true)
            .custom_flags(libc::O_NOFOLLOW)
            .mode(0o600)
            .open(&staged)
            .map_err(fail)?;
        std::fs::remove_file(&staged).map_err(fail)
    }

    /// Where a new anchor is written before it is renamed into place.
    fn staged_path(&self) -> std::path::PathBuf {
        let mut name = self.path.as_os_str().to_owned();
        name.push(".new");
        std::path::PathBuf::from(name)
    }

    /// The entry the file names; `Ok(None)` without a file, `Err` with the reason when it does
    /// not verify.
    pub fn read(&self) -> Result<Option<(i64, String)>, String> {
        let text = match std::fs::read_to_string(&self.path) {
            Ok(text) => text,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(None),
            Err(e) => return Err(e.to_string()),
        };
        let mut fields = text.split_ascii_whitespace();
        let (Some(seq), Some(hash), Some(mac), None) =
            (fields.next(), fields.next(), fields.next(), fields.next())
        else {
            return Err("not `SEQ HASH MAC`".to_owned());
        };
        let hash = if hash == "-" { "" } else { hash };
        let seq: i64 = seq
            .parse()
            .ok()
            .filter(|n| *n >= 0)
            .ok_or("its number is not a number")?;
        let expected = self.mac(seq, hash);
        if !bool::from(subtle::ConstantTimeEq::ct_eq(
            expected.as_bytes(),
            mac.as_bytes(),
        )) {
            return Err("its MAC does not match the audit key".to_owned());
        }
        Ok(Some((seq, hash.to_owned())))
    }
}

/// The API name of an entry recording a break in the chain the controller found at start.
pub const BREAK_API: &str = "audit_chain_break";
/// The API name of the entry recording a replaced key.
pub const REKEY_API: &str = "audit_rekey";

/// Opens the audit trail at start: loads the key (made on first start, when the store has
/// recorded none), refuses a missing or different key when the store says the chain is keyed,
/// checks the head anchor at `anchor_path` against the chain and records what it finds broken as
/// an entry, then starts the trail's task in `tasks` (which ends at [`AuditLog::close`]).
pub async fn open(
    store: Store,
    key_path: &std::path::Path,
    anchor_path: &std::path::Path,
    tasks: &mut tokio::task::JoinSet<()>,
) -> anyhow::Result<AuditLog> {
    let fail = |reason: String| AuditKeyError {
        path: key_path.to_owned(),
        reason,
    };
    let marker = store.audit_key_marker().await?;
    let head = store.audit_head().await?;
    let head_seq = head.as_ref().map_or(0, |(seq, _)| *seq);
    let key = match (&marker, key_path.exists()) {
        (Some(marker), false) => {
            return Err(fail(format!(
                "missing, but the audit trail in the database is keyed with key {} (from entry \
                 {}): put the key file back (it is in every backup), or run `fleetrun-controller \
                 audit rekey` to start a new key, recorded in the trail as a break",
                marker.key_fingerprint, marker.since_seq
            ))
            .into());
        }
        _ => AuditKey::load_or_create(key_path, head_seq)?,
    };
    let anchor = Anchor::at(anchor_path, key_path, key.clone())?;
    anchor.probe()?;
    let mut breaks = Vec::new();
    match &marker {
        Some(marker) if marker.key_fingerprint != key.fingerprint() => {
            // The key signs the chain's last entry: it is the chain's key, and the marker is
            // what was changed. A rekey would cut the chain's proof for nothing.
            let signs_head = match store.audit_entry(head_seq).await? {
                Some(record) if head_seq > key.unkeyed_until.max(key.lost_until) => {
                    key.signs(&record)
                }
                _ => false,
            };
            if !signs_head {
                return Err(fail(format!(
                    "holds key {}, but the audit trail in the database is keyed with key {} \
                     (from entry {}): put the right key file back, or move this one aside and \
                     run `fleetrun-controller audit rekey`",
                    key.fingerprint(),
                    marker.key_fingerprint,
                    marker.since_seq
                ))
                .into());
            }
            breaks.push(format!(
                "the database's record of the audit key was changed to {} while the trail's last \
                 entry {head_seq} is signed with key {} (the key file {}): the record was \
                 tampered with, and is put back",
                marker.key_fingerprint,
                key.fingerprint(),
                key_path.display()
            ));
            store
                .record_audit_key(key.fingerprint(), marker.since_seq, crate::now_ms())
                .await?;
        }
        Some(_) => {}
        None => {
            store
                .record_audit_key(key.fingerprint(), key.unkeyed_until + 1, crate::now_ms())
                .await?;
        }
    }
    let cause = "(a power loss can also lose the last commits before the anchor's)";
    match anchor.read() {
        Ok(None) if marker.as_ref().is_some_and(|m| m.anchored) => breaks.push(format!(
            "the head anchor {} was missing at start: entries removed from the end of the trail \
             while the controller was stopped cannot be ruled out",
            anchor.path().display()
        )),
        Ok(None) => {}
        Ok(Some((seq, _))) if seq > head_seq => breaks.push(format!(
            "entries {} to {seq} were removed from the end of the trail while the controller \
             was stopped (the head anchor {} names entry {seq}; the database ends at {head_seq}) \
             {cause}",
            head_seq + 1,
            anchor.path().display()
        )),
        Ok(Some((seq, hash))) if seq > 0 => {
            if store.audit_entry(seq).await?.is_none_or(|r| r.hash != hash) {
                breaks.push(format!(
                    "entry {seq} is not the entry the head anchor {} names: the end of the \
                     trail was replaced while the controller was stopped {cause}",
                    anchor.path().display()
                ));
            }
        }
        Ok(Some(_)) => {}
        Err(reason) => breaks.push(format!(
            "the head anchor {} does not verify ({reason}): entries removed from the end of the \
             trail while the controller was stopped cannot be ruled out",
            anchor.path().display()
        )),
    }
    let log = AuditLog::start(store.clone(), key, Some(anchor.clone()), tasks).await?;
    for problem in &breaks {
        tracing::error!("audit trail: {problem}");
        log.append(NewAuditEntry {
            at: crate::now_ms(),
            app_code: String::new(),
            operator: String::new(),
            source: String::new(),
            request_id: String::new(),
            api: BREAK_API.to_owned(),
            change: json!({ "problem": problem }).to_string(),
            outcome_code: 0,
            outcome: problem.clone(),
        })
        .await;
    }
    // However long the commit takes: `flush` alone stops waiting after `SETTLE_WAIT`, and a
    // slow commit must not make the controller refuse to start.
    log.store.flush().await?;
    log.flush().await;
    let (seq, hash) = log.head().unwrap_or_default();
    // Moving the anchor on past a break that is not in the trail would hide it.
    if seq < head_seq + breaks.len() as i64 {
        anyhow::bail!(
            "the audit trail's breaks found at start could not be recorded in the database: \
             not starting (the head anchor {} is left as it was)",
            anchor.path().display()
        );
    }
    anchor.write(seq, &hash)?;
    if !marker.is_some_and(|m| m.anchored) {
        store.mark_audit_anchored().await?;
    }
    Ok(log)
}

/// Refuses to go on while a controller runs on this configuration: it holds its HTTP address.
fn ensure_stopped(config: &crate::Config, what: &str) -> anyhow::Result<()> {
    if let Err(e) = std::net::TcpListener::bind(config.http_listen)
        && e.kind() == std::io::ErrorKind::AddrInUse
    {
        anyhow::bail!(
            "{} is in use: stop the controller before {what}",
            config.http_listen
        );
    }
    Ok(())
}

/// `fleetrun-controller audit rekey`: starts a new audit key after the old one was lost. The
/// chain goes on (numbers and links unbroken) with an entry, signed by the new key, recording
/// the replacement, the old key's fingerprint and the hash of the last entry it signed; the
/// entries before it can from then on be checked for their links only (`lost_until` in the new
/// key file). A key file in place is never overwritten. The new key is written under
/// `<key file>.new` and renamed into place once the database has recorded it, so a crash in
/// between leaves no key file that the database does not know (a rerun finishes the rename).
pub async fn rekey(config: &crate::Config, operator: &str) -> anyhow::Result<String> {
    let key_path = config.audit_key_file();
    ensure_stopped(config, "replacing the audit key")?;
    let store = Store::open_database(&config.database).await?;
    let Some(marker) = store.audit_key_marker().await? else {
        anyhow::bail!(
            "the audit trail has no key recorded yet: start the controller, which makes one"
        );
    };
    let read_key = |path: &std::path::Path| {
        std::fs::read_to_string(path)
            .map_err(|e| e.to_string())
            .and_then(|text| AuditKey::decode(&text).map_err(str::to_owned))
    };
    if key_path.exists() {
        let reason = match read_key(&key_path) {
            Ok(key) if key.fingerprint() == marker.key_fingerprint => {
                "holds the key the trail is made with: nothing to replace".to_owned()
            }
            _ => "exists: move it aside first (it is never overwritten)".to_owned(),
        };
        return Err(AuditKeyError {
            path: key_path,
            reason,
        }
        .into());
    }
    let mut staged = key_path.as_os_str().to_owned();
    staged.push(".new");
    let staged = std::path::PathBuf::from(staged);
    let anchor_path = config.audit_anchor_file();
    if staged.exists() {
        match read_key(&staged) {
            // A rekey that stopped after its commit: its key is the chain's, put it in place.
            Ok(key) if key.fingerprint() == marker.key_fingerprint => {
                std::fs::rename(&staged, &key_path).map_err(|e| AuditKeyError {
                    path: staged.clone(),
                    reason: format!("cannot be renamed to {}: {e}", key_path.display()),
                })?;
                let (seq, hash) = store.audit_head().await?.unwrap_or_default();
                Anchor::at(&anchor_path, &key_path, key)?.write(seq, &hash)?;
                return Ok(format!(
                    "the key an earlier rekey recorded ({}) was left at {}: moved to {}",
                    marker.key_fingerprint,
                    staged.display(),
                    key_path.display()
                ));
            }
            // Never recorded: nothing was signed with it.
            _ => std::fs::remove_file(&staged).map_err(|e| AuditKeyError {
                path: staged.clone(),
                reason: format!("left by an unfinished rekey, cannot be removed: {e}"),
            })?,
        }
    }
    let (head_seq, head_hash) = store.audit_head().await?.unwrap_or_default();
    let key = AuditKey::create(&staged, head_seq)?;
    let anchor = Anchor::at(&anchor_path, &key_path, key.clone())?;
    let change = json!({
        "previous_key": marker.key_fingerprint,
        "new_key": key.fingerprint(),
        "entries_under_previous_key": head_seq,
        "previous_head_hash": head_hash,
    });
    let outcome = format!(
        "the audit key {} was replaced by {}: entries 1 to {head_seq} can from now on be checked \
         for their links only",
        marker.key_fingerprint,
        key.fingerprint()
    );
    let entry = NewAuditEntry {
        at: crate::now_ms(),
        app_code: String::new(),
        operator: operator.to_owned(),
        source: "fleetrun-controller audit rekey".to_owned(),
        request_id: String::new(),
        api: REKEY_API.to_owned(),
        change: change.to_string(),
        outcome_code: 0,
        outcome: outcome.clone(),
    };
    let hasher_key = key.clone();
    let hasher = move |seq: i64, entry: &NewAuditEntry, prev: &str| {
        entry_hash(&hasher_key, seq, entry, prev)
    };
    let recorded = store
        .rekey_audit(&entry, &hasher, key.fingerprint(), crate::now_ms())
        .await;
    let (seq, hash) = match recorded {
        Ok(head) => head,
        Err(e) => {
            let _ = std::fs::remove_file(&staged);
            return Err(e.into());
        }
    };
    std::fs::rename(&staged, &key_path).map_err(|e| AuditKeyError {
        path: staged.clone(),
        reason: format!(
            "holds the new key the database now records, but cannot be renamed to {}: {e}; \
             rename it by hand",
            key_path.display()
        ),
    })?;
    anchor.write(seq, &hash)?;
    Ok(format!(
        "{outcome}; recorded as entry {seq}; new key file {}",
        key_path.display()
    ))
}

/// After a restore (`fleetrun-controller audit reanchor`, run by `restore` itself on SQLite):
/// points the head anchor at the restored chain's last entry (when the key file is there to sign
/// it); returns the entry it names.
pub async fn reanchor(config: &crate::Config) -> anyhow::Result<Option<i64>> {
    let key_path = config.audit_key_file();
    let text = match std::fs::read_to_string(&key_path) {
        Ok(text) => text,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(None),
        Err(e) => anyhow::bail!("{}: {e}", key_path.display()),
    };
    let key = AuditKey::decode(&text).map_err(|reason| AuditKeyError {
        path: key_path.clone(),
        reason: reason.to_owned(),
    })?;
    let anchor = Anchor::at(&config.audit_anchor_file(), &key_path, key)?;
    ensure_stopped(config, "anchoring the audit trail")?;
    let store = Store::open_database(&config.database).await?;
    let (seq, hash) = store.audit_head().await?.unwrap_or_default();
    anchor.write(seq, &hash)?;
    Ok(Some(seq))
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
    /// Entries made under a key that was lost and replaced: their links are checked, their
    /// content cannot be.
    pub unverifiable: i64,
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
            if seq <= key.lost_until {
                // Made under the lost key: the entry recording its replacement pins the last
                // one's hash, and the links pin the rest.
                report.unverifiable += 1;
            } else if key.signs_parts(seq, &entry, &stored_prev, &hash) {
                keyed_seen = true;
                if entry.api == BREAK_API {
                    problem(&mut report, format!("entry {seq}: {}", entry.outcome));
                }
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
    fn a_summary_is_the_requests_json_with_secrets_masked_whatever_their_case() {
        let params = json!({
            "task_name": "t",
            "API_Token": "t0k",
            "Ssh_Key": "k",
            "KEY": "k2",
            "keyboard": "kept",
            "timeout": 60,
            "callback_url": 7,
            "deep": {"a": [1, {"Password": "p"}]},
        });
        assert_eq!(
            summarize(params.as_object().unwrap()),
            r#"{"API_Token":"***","KEY":"***","Ssh_Key":"***","callback_url":7,"deep":{"a":[1,{"Password":"***"}]},"keyboard":"kept","task_name":"t","timeout":60}"#
        );
    }

    #[test]
    fn the_common_names_answered_at_once_are_none_the_automaton_calls_secret() {
        for key in COMMON_KEYS {
            assert!(!is_secret_name(key), "{key}");
        }
        for key in ["bk_app_secret", "Password", "api_token", "ssh_key", "KEY"] {
            assert!(is_secret_key(key), "{key}");
        }
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
        // Pinned: trails verify only while the encoding (tag, then every field after its length
        // as 8 big-endian bytes) stays the same. The values are computed apart from this code
        // (Python's blake3, hmac and hashlib over that encoding): BLAKE3 keyed as written now,
        // HMAC-SHA256 as earlier releases wrote, plain SHA-256 from before the key.
        assert_eq!(
            base,
            "66b236e103f14b45ae80d0462df9bfae36b95b0dcba465a5cd1acfdd59bfcc77"
        );
        assert_eq!(
            hmac_entry_hash(&key, 1, &entry, ""),
            "42c4c3244cf772385e9a3478c5266bf334540074bf7e74c30ff73cf6b08de5e9"
        );
        assert_eq!(
            unkeyed_hash(1, &entry, ""),
            "f2a51b86a876db2d8579c7a2a8bb9e5952eb9e1633d6f9dde8065879d8b0e61c"
        );
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

    /// A trail begun by an earlier release (HMAC-SHA256 entries) and continued by this one
    /// (BLAKE3) verifies whole under the key, and under no other; an entry of either kind whose
    /// hash was made over other content is named.
    #[tokio::test]
    async fn a_trail_of_hmac_then_blake3_entries_verifies_and_mismatches_of_either_show() {
        let dir = tempfile::tempdir().unwrap();
        let store = Store::open(&dir.path().join("controller.db"))
            .await
            .unwrap();
        let key = AuditKey::from_bytes(&[7; 32]);
        // Each entry's hasher: the earlier release's or this one's, over the entry as stored or
        // over an edited copy of it.
        let hasher = |hmac: bool, edited: bool| -> Arc<fleetrun_store::AuditHasher> {
            let key = key.clone();
            Arc::new(move |seq, entry: &NewAuditEntry, prev| {
                let mut hashed = entry.clone();
                if edited {
                    hashed.operator = "someone-else".into();
                }
                if hmac {
                    hmac_entry_hash(&key, seq, &hashed, prev)
                } else {
                    entry_hash(&key, seq, &hashed, prev)
                }
            })
        };
        let append = |hasher: Arc<fleetrun_store::AuditHasher>| {
            let store = store.clone();
            async move {
                let entry = NewAuditEntry {
                    api: "create_script".into(),
                    change: "{}".into(),
                    outcome: "ok".into(),
                    ..NewAuditEntry::default()
                };
                let write = fleetrun_store::Write::Audit {
                    entry,
                    hasher: SharedAuditHasher(hasher),
                };
                store.record(write).await.unwrap();
                store.flush().await.unwrap();
            }
        };
        for hmac in [true, true, false, false] {
            append(hasher(hmac, false)).await;
        }
        let report = verify(&store, &key, None).await.unwrap();
        assert!(report.is_intact(), "{:?}", report.problems);
        assert_eq!((report.entries, report.unkeyed), (4, 0));
        let other = verify(&store, &AuditKey::from_bytes(&[8; 32]), None)
            .await
            .unwrap();
        assert_eq!(other.problems.len(), 4, "{:?}", other.problems);
        append(hasher(true, true)).await;
        append(hasher(false, true)).await;
        let report = verify(&store, &key, None).await.unwrap();
        assert_eq!(
            report.problems,
            [
                "entry 5: its content does not match its hash (edited)",
                "entry 6: its content does not match its hash (edited)",
            ]
        );
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
    fn the_anchor_never_follows_a_planted_link_nor_takes_the_key_files_place() {
        use std::os::unix::fs::PermissionsExt as _;
        let dir = tempfile::tempdir().unwrap();
        let key_path = dir.path().join("audit.key");
        let key = AuditKey::load_or_create(&key_path, 0).unwrap();
        let key_text = std::fs::read(&key_path).unwrap();
        // An anchor named like the key (or whose staging name is the key) is refused.
        assert!(Anchor::at(&key_path, &key_path, key.clone()).is_err());
        let odd_key = dir.path().join("x.head");
        std::fs::copy(&key_path, &odd_key).unwrap();
        assert!(Anchor::at(&dir.path().join("x"), &odd_key, key.clone()).is_ok());
        assert!(Anchor::at(&dir.path().join("x.head"), &odd_key, key.clone()).is_err());

        // Someone plants the staging name as a link to a file of the controller's.
        let anchor_path = dir.path().join("audit.head");
        let victim = dir.path().join("victim");
        std::fs::write(&victim, "precious").unwrap();
        std::fs::set_permissions(&victim, std::fs::Permissions::from_mode(0o644)).unwrap();
        std::os::unix::fs::symlink(&victim, dir.path().join("audit.head.new")).unwrap();
        let anchor = Anchor::at(&anchor_path, &key_path, key.clone()).unwrap();
        anchor.write(0, "").unwrap();
        assert_eq!(std::fs::read_to_string(&victim).unwrap(), "precious");
        assert!(
            !std::fs::symlink_metadata(&anchor_path)
                .unwrap()
                .is_symlink()
        );
        assert_eq!(
            std::fs::metadata(&anchor_path)
                .unwrap()
                .permissions()
                .mode()
                & 0o777,
            0o600
        );
        // The empty trail's anchor reads back.
        assert_eq!(anchor.read().unwrap(), Some((0, String::new())));
        anchor.write(7, "abc").unwrap();
        assert_eq!(anchor.read().unwrap(), Some((7, "abc".to_owned())));
        assert_eq!(std::fs::read(&key_path).unwrap(), key_text);
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
