//! The content store: file chunks on the controller's disk, beside the database, by SHA-256.
//!
//! A file transfer reads each source file once into chunks here ([`ContentStore::put_chunk`])
//! and every target pulls them from here, so a source's bytes cross its link once however many
//! targets there are. Local files uploaded through `generate_local_file_upload_url` land here
//! too, as chunks, with a record of the upload (`uploads/<id>.json`: the app and scope it is
//! bound to, its name, its chunks, when it expires).
//!
//! Each chunk is written to a fresh temporary name (`O_EXCL`, 0600), synced and linked into
//! place under its hash, after the hash was checked, so a chunk under its name is always whole
//! and right, and two stores of one chunk at once count its bytes once; directories are 0700.
//! A chunk stored again is made young (its modification time now) under the lock the sweeper
//! decides by, so a sweep does not remove a chunk a transfer has just found there. The store is bounded ([`ContentStore::new`]'s `max_bytes`):
//! a chunk that would pass the bound is refused. Chunks used by running transfers are pinned;
//! [`ContentStore::sweep`] removes expired uploads and every chunk neither pinned nor used by a
//! live upload.

use std::collections::{HashMap, HashSet};
use std::fs::{self, File, OpenOptions};
use std::io::{self, Read as _, Write as _};
use std::os::unix::fs::{DirBuilderExt as _, OpenOptionsExt as _, PermissionsExt as _};
use std::path::{Path, PathBuf};
use std::sync::Mutex;
use std::sync::atomic::{AtomicU64, Ordering};

use fleetrun_proto::FILE_CHUNK;
use serde::{Deserialize, Serialize};

/// A SHA-256.
pub type Hash = [u8; 32];

/// Why the store refused or failed.
#[derive(Debug, thiserror::Error)]
pub enum ContentError {
    /// The bytes do not hash to the name they were given.
    #[error("the chunk does not hash to its SHA-256")]
    HashMismatch,
    /// Storing it would pass the store's bound.
    #[error("the controller's content store is full ({max} bytes)")]
    Full { max: u64 },
    /// A chunk larger than a chunk may be.
    #[error("a chunk of {0} bytes is larger than {FILE_CHUNK}")]
    TooLarge(usize),
    #[error("no such chunk in the content store")]
    Missing,
    #[error("content store: {0}")]
    Io(#[from] io::Error),
}

/// Lower-case hexadecimal.
pub fn hex(hash: &Hash) -> String {
    hex::encode(hash)
}

/// Reads 64 hexadecimal digits.
pub fn parse_hex(text: &str) -> Option<Hash> {
    if text.len() != 64 {
        return None;
    }
    let mut hash = [0u8; 32];
    hex::decode_to_slice(text, &mut hash).ok()?;
    Some(hash)
}

pub fn sha256(data: &[u8]) -> Hash {
    let mut hash = [0u8; 32];
    hash.copy_from_slice(ring::digest::digest(&ring::digest::SHA256, data).as_ref());
    hash
}

/// A local file's upload, as recorded.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct Upload {
    pub id: String,
    pub app_code: String,
    pub scope_type: String,
    pub scope_id: String,
    pub username: String,
    pub file_name: String,
    pub created_ms: i64,
    pub expires_ms: i64,
    /// Set once the bytes arrived.
    pub file: Option<StoredFile>,
    /// A file a job keeps for a later run, not an upload: no upload URL writes it, and no
    /// request names it as a local file.
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub kept: bool,
}

impl Upload {
    /// The `path` bk-job's clients give in `file_source_list` to use the upload.
    pub fn path(&self) -> String {
        format!(
            "{}/{}/{}/{}",
            self.scope_id, self.id, self.username, self.file_name
        )
    }
}

/// A whole file in the store.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct StoredFile {
    pub size: u64,
    /// Hexadecimal SHA-256 of the file.
    pub sha256: String,
    /// Hexadecimal SHA-256 of each chunk, in order.
    pub chunks: Vec<String>,
}

#[derive(Debug)]
pub struct ContentStore {
    root: PathBuf,
    max_bytes: u64,
    used: AtomicU64,
    /// Chunks running transfers use, with how many use each.
    pins: Mutex<HashMap<Hash, usize>>,
}

fn private_dir(path: &Path) -> io::Result<()> {
    fs::DirBuilder::new()
        .recursive(true)
        .mode(0o700)
        .create(path)?;
    fs::set_permissions(path, fs::Permissions::from_mode(0o700))
}

fn now_ms() -> i64 {
    crate::now_ms()
}

impl ContentStore {
    /// Opens (creating) the store at `root`, at most `max_bytes` of chunks. Leftover temporary
    /// files of a crash are removed; the chunks there are counted.
    pub fn open(root: &Path, max_bytes: u64) -> io::Result<Self> {
        private_dir(root)?;
        for sub in ["objects", "tmp", "uploads"] {
            private_dir(&root.join(sub))?;
        }
        for entry in fs::read_dir(root.join("tmp"))? {
            let _ = fs::remove_file(entry?.path());
        }
        let mut used = 0u64;
        for shard in fs::read_dir(root.join("objects"))? {
            let shard = shard?;
            if shard.file_type()?.is_dir() {
                for object in fs::read_dir(shard.path())? {
                    used += object?.metadata()?.len();
                }
            }
        }
        Ok(Self {
            root: root.to_owned(),
            max_bytes,
            used: AtomicU64::new(used),
            pins: Mutex::new(HashMap::new()),
        })
    }

    /// Bytes of chunks held.
    pub fn used(&self) -> u64 {
        self.used.load(Ordering::Relaxed)
    }

    fn object(&self, hash: &Hash) -> PathBuf {
        let name = hex(hash);
        self.root.join("objects").join(&name[..2]).join(name)
    }

    /// Writes `data` to a temporary file, synced; returns its path.
    fn write_temp(&self, data: &[u8]) -> io::Result<PathBuf> {
        let temp = self
            .root
            .join("tmp")
            .join(uuid::Uuid::new_v4().simple().to_string());
        let mut file = OpenOptions::new()
            .write(true)
            .create_new(true)
            .mode(0o600)
            .custom_flags(libc::O_NOFOLLOW)
            .open(&temp)?;
        let written = file.write_all(data).and_then(|()| file.sync_all());
        if let Err(e) = written {
            let _ = fs::remove_file(&temp);
            return Err(e);
        }
        Ok(temp)
    }

    /// Stores one chunk under its hash (checked), once: a chunk already there is not written
    /// again. Blocking: call from a blocking thread.
    pub fn put_chunk(&self, hash: &Hash, data: &[u8]) -> Result<(), ContentError> {
        if data.len() > FILE_CHUNK {
            return Err(ContentError::TooLarge(data.len()));
        }
        if sha256(data) != *hash {
            return Err(ContentError::HashMismatch);
        }
        let object = self.object(hash);
        {
            // Under the lock the sweeper removes by: a chunk found here is made young again, so
            // the sweep that may be deciding on it right now keeps it.
            let _pins = self.pins.lock().unwrap();
            if touch(&object).is_ok() {
                return Ok(());
            }
        }
        let len = data.len() as u64;
        let reserved = self
            .used
            .fetch_update(Ordering::SeqCst, Ordering::SeqCst, |used| {
                used.checked_add(len).filter(|n| *n <= self.max_bytes)
            });
        if reserved.is_err() {
            return Err(ContentError::Full {
                max: self.max_bytes,
            });
        }
        let stored = (|| {
            let temp = self.write_temp(data)?;
            if let Some(shard) = object.parent() {
                private_dir(shard)?;
            }
            // A link, not a rename: of two stores of the same chunk at once only one puts it
            // in place, and the other gives its bytes back to the bound.
            let linked = fs::hard_link(&temp, &object);
            let _ = fs::remove_file(&temp);
            match linked {
                Ok(()) => {}
                Err(e) if e.kind() == io::ErrorKind::AlreadyExists => return Ok(false),
                Err(e) => return Err(e),
            }
            if let Some(shard) = object.parent() {
                File::open(shard)?.sync_all()?;
            }
            Ok::<bool, io::Error>(true)
        })();
        match stored {
            Ok(true) => Ok(()),
            Ok(false) => {
                self.used.fetch_sub(len, Ordering::SeqCst);
                let _pins = self.pins.lock().unwrap();
                touch(&object)?;
                Ok(())
            }
            Err(e) => {
                self.used.fetch_sub(len, Ordering::SeqCst);
                Err(e.into())
            }
        }
    }

    /// Reads one chunk, checked against its hash. Blocking.
    pub fn read_chunk(&self, hash: &Hash) -> Result<Vec<u8>, ContentError> {
        let file = match File::open(self.object(hash)) {
            Ok(file) => file,
            Err(e) if e.kind() == io::ErrorKind::NotFound => return Err(ContentError::Missing),
            Err(e) => return Err(e.into()),
        };
        let mut data = Vec::with_capacity(FILE_CHUNK);
        file.take(FILE_CHUNK as u64 + 1).read_to_end(&mut data)?;
        if data.len() > FILE_CHUNK {
            return Err(ContentError::TooLarge(data.len()));
        }
        if sha256(&data) != *hash {
            return Err(ContentError::HashMismatch);
        }
        Ok(data)
    }

    /// Keeps `hashes` from [`ContentStore::sweep`] until unpinned.
    pub fn pin<'a>(&self, hashes: impl IntoIterator<Item = &'a Hash>) {
        let mut pins = self.pins.lock().unwrap();
        for hash in hashes {
            *pins.entry(*hash).or_default() += 1;
        }
    }

    pub fn unpin<'a>(&self, hashes: impl IntoIterator<Item = &'a Hash>) {
        let mut pins = self.pins.lock().unwrap();
        for hash in hashes {
            if let Some(count) = pins.get_mut(hash) {
                *count -= 1;
                if *count == 0 {
                    pins.remove(hash);
                }
            }
        }
    }

    fn upload_path(&self, id: &str) -> Option<PathBuf> {
        // Ids are the store's own UUIDs; anything else names no upload.
        uuid::Uuid::parse_str(id).ok().map(|u| {
            self.root
                .join("uploads")
                .join(format!("{}.json", u.simple()))
        })
    }

    /// Records an upload (its bytes to come). Blocking.
    pub fn save_upload(&self, upload: &Upload) -> Result<(), ContentError> {
        let path = self.upload_path(&upload.id).ok_or(ContentError::Missing)?;
        let text = serde_json::to_vec(upload).map_err(io::Error::other)?;
        let temp = self.write_temp(&text)?;
        fs::rename(&temp, &path).inspect_err(|_| {
            let _ = fs::remove_file(&temp);
        })?;
        Ok(())
    }

    /// Removes the record `id` (one kept for a job that was then not created); its chunks go
    /// with the next sweep unless something else uses them. Blocking.
    pub fn remove_upload(&self, id: &str) -> Result<(), ContentError> {
        let path = self.upload_path(id).ok_or(ContentError::Missing)?;
        match fs::remove_file(path) {
            Ok(()) => Ok(()),
            Err(e) if e.kind() == io::ErrorKind::NotFound => Ok(()),
            Err(e) => Err(e.into()),
        }
    }

    /// The first of `hashes` the store does not hold, if any. Blocking. Asked after pinning
    /// them, the answer holds: a pinned chunk is not swept.
    pub fn first_missing<'a>(&self, hashes: impl IntoIterator<Item = &'a Hash>) -> Option<Hash> {
        hashes.into_iter().copied().find(|hash| {
            !fs::symlink_metadata(self.object(hash)).is_ok_and(|m| m.file_type().is_file())
        })
    }

    /// The upload `id`, if it is recorded and not expired. Blocking.
    pub fn upload(&self, id: &str) -> Option<Upload> {
        let path = self.upload_path(id)?;
        let text = fs::read(path).ok()?;
        let upload: Upload = serde_json::from_slice(&text).ok()?;
        (upload.expires_ms > now_ms()).then_some(upload)
    }

    /// Stores a whole file held in memory as chunks (each checked and stored once) and says
    /// what it is made of. Blocking. For files small enough to be held whole anyway (a
    /// `push_config_file` file kept for a job created to start later).
    pub fn put_file(&self, data: &[u8]) -> Result<StoredFile, ContentError> {
        let mut chunks = Vec::with_capacity(data.len().div_ceil(FILE_CHUNK));
        for chunk in data.chunks(FILE_CHUNK) {
            let hash = sha256(chunk);
            self.put_chunk(&hash, chunk)?;
            chunks.push(hex(&hash));
        }
        Ok(StoredFile {
            size: data.len() as u64,
            sha256: hex(&sha256(data)),
            chunks,
        })
    }

    /// Reads back a whole file [`ContentStore::put_file`] stored, each chunk and the whole
    /// checked against their SHA-256s, at most `max` bytes. Blocking.
    pub fn read_file(&self, file: &StoredFile, max: u64) -> Result<Vec<u8>, ContentError> {
        if file.size > max {
            return Err(ContentError::TooLarge(
                usize::try_from(file.size).unwrap_or(usize::MAX),
            ));
        }
        let mut data = Vec::with_capacity(usize::try_from(file.size).unwrap_or(0));
        for chunk in &file.chunks {
            let hash = parse_hex(chunk).ok_or(ContentError::HashMismatch)?;
            data.extend_from_slice(&self.read_chunk(&hash)?);
            if data.len() as u64 > file.size {
                return Err(ContentError::HashMismatch);
            }
        }
        if data.len() as u64 != file.size || hex(&sha256(&data)) != file.sha256 {
            return Err(ContentError::HashMismatch);
        }
        Ok(data)
    }

    /// Removes expired uploads, then every chunk not pinned and not used by an upload left, if
    /// it is older than `grace_ms` (a chunk being stored by a transfer that has not pinned it
    /// yet). Blocking. Returns the chunks removed.
    pub fn sweep(&self, grace_ms: i64) -> io::Result<usize> {
        let now = now_ms();
        let mut live: HashSet<Hash> = self.pins.lock().unwrap().keys().copied().collect();
        for entry in fs::read_dir(self.root.join("uploads"))? {
            let path = entry?.path();
            let upload = fs::read(&path)
                .ok()
                .and_then(|text| serde_json::from_slice::<Upload>(&text).ok());
            match upload {
                Some(upload) if upload.expires_ms > now => {
                    if let Some(file) = &upload.file {
                        live.extend(file.chunks.iter().filter_map(|c| parse_hex(c)));
                    }
                }
                _ => {
                    let _ = fs::remove_file(&path);
                }
            }
        }
        let pinned_now: HashSet<Hash> = self.pins.lock().unwrap().keys().copied().collect();
        live.extend(pinned_now);
        let mut removed = 0;
        let cutoff = std::time::SystemTime::now()
            .checked_sub(std::time::Duration::from_millis(grace_ms.max(0) as u64))
            .unwrap_or(std::time::UNIX_EPOCH);
        for shard in fs::read_dir(self.root.join("objects"))? {
            let shard = shard?;
            if !shard.file_type()?.is_dir() {
                continue;
            }
            for object in fs::read_dir(shard.path())? {
                let object = object?;
                let name = object.file_name();
                let Some(hash) = name.to_str().and_then(parse_hex) else {
                    continue;
                };
                let meta = object.metadata()?;
                if live.contains(&hash) || meta.modified().is_ok_and(|m| m > cutoff) {
                    continue;
                }
                // Decided again under the lock a store of the same chunk takes: pinned or
                // stored again meanwhile, it is kept.
                let pins = self.pins.lock().unwrap();
                let young = fs::symlink_metadata(object.path())
                    .and_then(|m| m.modified())
                    .is_ok_and(|m| m > cutoff);
                if pins.contains_key(&hash) || young {
                    continue;
                }
                if fs::remove_file(object.path()).is_ok() {
                    self.used.fetch_sub(meta.len(), Ordering::SeqCst);
                    removed += 1;
                }
                drop(pins);
            }
        }
        Ok(removed)
    }
}

/// Makes an existing chunk young (its modification time now), without following a link.
fn touch(object: &Path) -> io::Result<()> {
    OpenOptions::new()
        .write(true)
        .custom_flags(libc::O_NOFOLLOW)
        .open(object)?
        .set_modified(std::time::SystemTime::now())
}

/// Sweeps the store every ten minutes until `shutdown`; chunks younger than an hour stay.
pub async fn sweep_periodically(
    store: std::sync::Arc<ContentStore>,
    shutdown: tokio_util::sync::CancellationToken,
) {
    loop {
        tokio::select! {
            () = shutdown.cancelled() => return,
            () = tokio::time::sleep(std::time::Duration::from_secs(600)) => {}
        }
        let swept = store.clone();
        match tokio::task::spawn_blocking(move || swept.sweep(3_600_000)).await {
            Ok(Ok(0)) => {}
            Ok(Ok(removed)) => tracing::info!(removed, "content store swept"),
            Ok(Err(e)) => tracing::warn!("cannot sweep the content store: {e}"),
            Err(e) => tracing::warn!("content store sweep failed: {e}"),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// An upload record of app `app` in business 1, living a minute, holding `file`.
    fn upload(id: &str, file: StoredFile, kept: bool) -> Upload {
        Upload {
            id: id.to_owned(),
            app_code: "app".into(),
            scope_type: "biz".into(),
            scope_id: "1".into(),
            username: "admin".into(),
            file_name: "f".into(),
            created_ms: now_ms(),
            expires_ms: now_ms() + 60_000,
            file: Some(file),
            kept,
        }
    }

    #[test]
    fn chunks_are_stored_once_checked_and_bounded() {
        let dir = tempfile::tempdir().unwrap();
        let store = ContentStore::open(&dir.path().join("content"), 10).unwrap();
        let mode = fs::metadata(dir.path().join("content"))
            .unwrap()
            .permissions()
            .mode();
        assert_eq!(mode & 0o777, 0o700);
        let data = b"hello";
        let hash = sha256(data);
        store.put_chunk(&hash, data).unwrap();
        store.put_chunk(&hash, data).unwrap();
        assert_eq!(store.used(), 5);
        let object = store.object(&hash);
        assert_eq!(
            fs::metadata(&object).unwrap().permissions().mode() & 0o777,
            0o600
        );
        assert_eq!(store.read_chunk(&hash).unwrap(), data);
        // A lie about the hash is refused.
        assert!(matches!(
            store.put_chunk(&sha256(b"other"), b"forged"),
            Err(ContentError::HashMismatch)
        ));
        // The bound holds.
        assert!(matches!(
            store.put_chunk(&sha256(b"123456"), b"123456"),
            Err(ContentError::Full { .. })
        ));
        // A chunk changed on disk is not served.
        fs::write(&object, b"jello").unwrap();
        assert!(matches!(
            store.read_chunk(&hash),
            Err(ContentError::HashMismatch)
        ));
    }

    #[test]
    fn sweep_keeps_pinned_and_uploaded_chunks() {
        let dir = tempfile::tempdir().unwrap();
        let store = ContentStore::open(dir.path(), 1 << 20).unwrap();
        let (a, b, c) = (sha256(b"a"), sha256(b"b"), sha256(b"c"));
        for (hash, data) in [(a, b"a"), (b, b"b"), (c, b"c")] {
            store.put_chunk(&hash, data).unwrap();
        }
        store.pin([&a]);
        let id = uuid::Uuid::new_v4().to_string();
        store
            .save_upload(&upload(
                &id,
                StoredFile {
                    size: 1,
                    sha256: hex(&b),
                    chunks: vec![hex(&b)],
                },
                false,
            ))
            .unwrap();
        assert_eq!(store.sweep(0).unwrap(), 1);
        assert!(store.read_chunk(&a).is_ok());
        assert!(store.read_chunk(&b).is_ok());
        assert!(matches!(store.read_chunk(&c), Err(ContentError::Missing)));
        assert!(store.upload(&id).is_some());
        assert!(store.upload("../../etc/passwd").is_none());
        store.unpin([&a]);
        assert_eq!(store.sweep(0).unwrap(), 1);
        assert_eq!(store.used(), 1);
    }

    #[test]
    fn a_whole_file_put_is_read_back_checked_and_kept_by_its_record() {
        let dir = tempfile::tempdir().unwrap();
        let store = ContentStore::open(dir.path(), 8 << 20).unwrap();
        let data: Vec<u8> = (0..FILE_CHUNK * 2 + 5).map(|i| (i % 251) as u8).collect();
        let file = store.put_file(&data).unwrap();
        assert_eq!(file.chunks.len(), 3);
        assert_eq!(store.read_file(&file, 8 << 20).unwrap(), data);
        assert!(matches!(
            store.read_file(&file, 10),
            Err(ContentError::TooLarge(_))
        ));
        let mut lying = file.clone();
        lying.sha256 = hex(&sha256(b"other"));
        assert!(matches!(
            store.read_file(&lying, 8 << 20),
            Err(ContentError::HashMismatch)
        ));
        // Kept by an upload record, the chunks outlive a sweep; without one they go.
        store
            .save_upload(&upload(
                &uuid::Uuid::new_v4().to_string(),
                file.clone(),
                true,
            ))
            .unwrap();
        store.put_file(b"loose").unwrap();
        assert_eq!(store.sweep(0).unwrap(), 1);
        assert_eq!(store.read_file(&file, 8 << 20).unwrap(), data);
    }

    #[test]
    fn a_chunk_stored_again_is_young_again_for_the_sweeper() {
        let dir = tempfile::tempdir().unwrap();
        let store = ContentStore::open(dir.path(), 1 << 20).unwrap();
        let hash = sha256(b"old");
        store.put_chunk(&hash, b"old").unwrap();
        let two_hours_ago = std::time::SystemTime::now() - std::time::Duration::from_secs(7200);
        File::options()
            .write(true)
            .open(store.object(&hash))
            .unwrap()
            .set_modified(two_hours_ago)
            .unwrap();
        // A transfer reads the same bytes again, before it pins them.
        store.put_chunk(&hash, b"old").unwrap();
        assert_eq!(store.sweep(3_600_000).unwrap(), 0);
        assert!(store.read_chunk(&hash).is_ok());
    }

    #[test]
    fn the_same_chunk_stored_at_once_is_counted_once() {
        let dir = tempfile::tempdir().unwrap();
        let store = std::sync::Arc::new(ContentStore::open(dir.path(), 1 << 30).unwrap());
        let data = vec![7u8; 64 * 1024];
        let hash = sha256(&data);
        let threads: Vec<_> = (0..8)
            .map(|_| {
                let (store, data) = (store.clone(), data.clone());
                std::thread::spawn(move || store.put_chunk(&hash, &data).unwrap())
            })
            .collect();
        for thread in threads {
            thread.join().unwrap();
        }
        assert_eq!(store.used(), data.len() as u64);
        assert_eq!(store.read_chunk(&hash).unwrap(), data);
        assert_eq!(fs::read_dir(dir.path().join("tmp")).unwrap().count(), 0);
    }

    #[test]
    fn a_pinned_chunk_outlives_its_record_and_a_swept_one_is_reported_missing() {
        let dir = tempfile::tempdir().unwrap();
        let store = ContentStore::open(dir.path(), 1 << 20).unwrap();
        let kept = store.put_file(b"kept").unwrap();
        let swept = store.put_file(b"swept").unwrap();
        let (kept_hash, swept_hash) = (sha256(b"kept"), sha256(b"swept"));
        let id = uuid::Uuid::new_v4().to_string();
        store.save_upload(&upload(&id, kept, true)).unwrap();
        assert!(store.upload(&id).is_some());
        assert_eq!(store.first_missing([&kept_hash, &swept_hash]), None);
        // A run pins what it sends; the record removed, a sweep takes only what is not pinned.
        store.pin([&kept_hash]);
        store.remove_upload(&id).unwrap();
        assert!(store.upload(&id).is_none());
        store.remove_upload(&id).unwrap();
        assert_eq!(store.sweep(0).unwrap(), 1);
        assert_eq!(store.first_missing([&kept_hash]), None);
        assert_eq!(
            store.first_missing([&kept_hash, &swept_hash]),
            Some(swept_hash)
        );
        assert!(matches!(
            store.read_file(&swept, 1 << 20),
            Err(ContentError::Missing)
        ));
        store.unpin([&kept_hash]);
        assert_eq!(store.sweep(0).unwrap(), 1);
        assert_eq!(store.first_missing([&kept_hash]), Some(kept_hash));
    }

    #[test]
    fn hex_round_trips() {
        let hash = sha256(b"x");
        assert_eq!(parse_hex(&hex(&hash)), Some(hash));
        assert_eq!(parse_hex("zz"), None);
    }
}
