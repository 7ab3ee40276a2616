//! Pulled files resumed after a cut: what an interrupted try wrote is kept under its partial
//! name, and the next try of the same placement continues from the chunks there that hash right.
//! The attacks: bytes changed in the partial file, and the partial name planted as a symbolic
//! link, a hard link or someone else's file.

mod common;

use std::os::unix::fs::{MetadataExt as _, PermissionsExt as _};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};

use common::TEST_USER;
use fleetrun_exec::collect::sha256;
use fleetrun_exec::place::{
    Content, FileToPlace, PlaceEnding, PlacedFile, Placement, Pull, place_pulling, remove_partials,
};

const CHUNK: usize = 1024 * 1024;

/// Each want a pull was given: (file, first chunk).
type Wanted = Arc<Mutex<Vec<(usize, usize)>>>;

/// A file's bytes, served chunk by chunk; the link is "cut" after `cut_after` chunks.
struct VecPull {
    content: Vec<u8>,
    current: Option<usize>,
    cut_after: Option<usize>,
    served: usize,
    cut: bool,
    wanted: Wanted,
}

impl VecPull {
    fn new(content: &[u8], cut_after: Option<usize>) -> (Self, Wanted) {
        let wanted = Arc::new(Mutex::new(Vec::new()));
        let pull = Self {
            content: content.to_vec(),
            current: None,
            cut_after,
            served: 0,
            cut: false,
            wanted: wanted.clone(),
        };
        (pull, wanted)
    }
}

impl Pull for VecPull {
    fn want(&mut self, index: usize, from: usize) -> Result<(), String> {
        self.wanted.lock().unwrap().push((index, from));
        self.current = Some(from);
        Ok(())
    }

    fn next_chunk(&mut self) -> Result<Option<Vec<u8>>, String> {
        let chunk = self.current.ok_or("nothing wanted")?;
        if self.cut_after == Some(self.served) {
            self.cut = true;
            return Err("the connection to the controller was lost".into());
        }
        let start = chunk * CHUNK;
        if start >= self.content.len() {
            return Ok(None);
        }
        let end = (start + CHUNK).min(self.content.len());
        self.current = Some(chunk + 1);
        self.served += 1;
        Ok(Some(self.content[start..end].to_vec()))
    }

    fn chunk_hash(&self, _index: usize, chunk: usize) -> Option<[u8; 32]> {
        let start = chunk * CHUNK;
        (start < self.content.len())
            .then(|| sha256(&self.content[start..(start + CHUNK).min(self.content.len())]))
    }

    fn interrupted(&self) -> bool {
        self.cut
    }
}

fn content(len: usize) -> Vec<u8> {
    let mut state = 0x2545_f491_4f6c_dd1du64;
    (0..len)
        .map(|_| {
            state ^= state << 13;
            state ^= state >> 7;
            state ^= state << 17;
            state as u8
        })
        .collect()
}

fn scratch() -> tempfile::TempDir {
    common::test_user();
    let dir = tempfile::Builder::new()
        .prefix("fleetrun-resume-")
        .tempdir_in("/tmp")
        .unwrap();
    std::fs::set_permissions(dir.path(), std::fs::Permissions::from_mode(0o777)).unwrap();
    dir
}

static TRIES: AtomicUsize = AtomicUsize::new(0);

/// One try of placing `data` as `f.bin` in `dir`, resumable under the tag `7-9`.
fn place_once(dir: &Path, data: &[u8], pull: VecPull) -> PlacedFile {
    place_once_as(TEST_USER, dir, data, pull)
}

/// The placement of `data` as `f.bin` in `dir` as `account`, resumable under the tag `7-9`.
fn placement_of(account: &str, dir: &Path, data: &[u8]) -> Placement {
    Placement {
        task_tag: format!("try{}", TRIES.fetch_add(1, Ordering::Relaxed)),
        resume_tag: Some("7-9".into()),
        account: account.into(),
        target_dir: dir.to_path_buf(),
        strict: false,
        files: vec![FileToPlace {
            name: "f.bin".into(),
            dir: None,
            mode: 0o644,
            sha256: sha256(data),
            content: Content::Pulled {
                size: data.len() as u64,
            },
        }],
        refuse_root: None,
    }
}

/// As [`place_once`], writing as `account`.
fn place_once_as(account: &str, dir: &Path, data: &[u8], pull: VecPull) -> PlacedFile {
    let placement = placement_of(account, dir, data);
    let reports = Arc::new(Mutex::new(Vec::new()));
    let sink = reports.clone();
    place_pulling(
        placement,
        Some(Box::new(pull)),
        Arc::new(AtomicBool::new(false)),
        move |file| sink.lock().unwrap().push(file),
    )
    .unwrap();
    let mut reports = reports.lock().unwrap();
    assert_eq!(reports.len(), 1);
    reports.remove(0)
}

fn partials(dir: &Path) -> Vec<PathBuf> {
    std::fs::read_dir(dir)
        .unwrap()
        .flatten()
        .map(|e| e.path())
        .filter(|p| {
            let name = p.file_name().unwrap().to_string_lossy().into_owned();
            name.starts_with(".fleetrun-7-9-") && name.ends_with(".part")
        })
        .collect()
}

/// A first try cut after three chunks; returns the partial file it left.
fn cut_try(dir: &Path, data: &[u8]) -> PathBuf {
    cut_try_as(TEST_USER, dir, data)
}

/// As [`cut_try`], writing as `account`.
fn cut_try_as(account: &str, dir: &Path, data: &[u8]) -> PathBuf {
    let (pull, _) = VecPull::new(data, Some(3));
    let report = place_once_as(account, dir, data, pull);
    assert_eq!(report.ending, PlaceEnding::Failed, "{}", report.message);
    assert!(!dir.join("f.bin").exists(), "nothing under the final name");
    let found = partials(dir);
    assert_eq!(found.len(), 1, "{found:?}");
    found[0].clone()
}

#[test]
fn a_cut_file_is_kept_and_the_next_try_wants_only_what_is_missing() {
    let dir = scratch();
    let data = content(5 * CHUNK + CHUNK / 2);
    let partial = cut_try(dir.path(), &data);
    let meta = std::fs::metadata(&partial).unwrap();
    assert_eq!(meta.len(), 3 * CHUNK as u64);
    assert_eq!(meta.mode() & 0o777, 0o600, "private while partial");
    assert_ne!(meta.uid(), 0, "written as the account");

    let (pull, wanted) = VecPull::new(&data, None);
    let report = place_once(dir.path(), &data, pull);
    assert_eq!(report.ending, PlaceEnding::Placed, "{}", report.message);
    assert_eq!(*wanted.lock().unwrap(), vec![(0, 3)]);
    assert!(std::fs::read(dir.path().join("f.bin")).unwrap() == data);
    assert!(partials(dir.path()).is_empty());
}

#[test]
fn a_partial_with_changed_bytes_is_cut_back_to_its_chunks_that_hash_right() {
    let dir = scratch();
    let data = content(4 * CHUNK);
    let partial = cut_try(dir.path(), &data);
    // One byte of the second chunk changed on disk.
    let mut bytes = std::fs::read(&partial).unwrap();
    bytes[CHUNK + 17] ^= 0xff;
    std::fs::write(&partial, &bytes).unwrap();

    let (pull, wanted) = VecPull::new(&data, None);
    let report = place_once(dir.path(), &data, pull);
    assert_eq!(report.ending, PlaceEnding::Placed, "{}", report.message);
    assert_eq!(
        *wanted.lock().unwrap(),
        vec![(0, 1)],
        "only the first chunk kept"
    );
    assert!(std::fs::read(dir.path().join("f.bin")).unwrap() == data);
}

#[test]
fn a_partial_name_planted_as_a_link_or_someone_elses_file_is_neither_followed_nor_continued() {
    let data = content(3 * CHUNK);
    for plant in ["symlink", "hardlink", "root's file"] {
        let dir = scratch();
        let partial = cut_try(dir.path(), &data);
        let victim = dir.path().join("victim");
        // The victim holds the right bytes: only where it is and who owns it make it refused.
        std::fs::write(&victim, &data[..CHUNK]).unwrap();
        std::fs::remove_file(&partial).unwrap();
        match plant {
            "symlink" => std::os::unix::fs::symlink(&victim, &partial).unwrap(),
            "hardlink" => {
                let account = nix::unistd::User::from_name(TEST_USER).unwrap().unwrap();
                std::os::unix::fs::chown(&victim, Some(account.uid.as_raw()), None).unwrap();
                std::fs::hard_link(&victim, &partial).unwrap();
            }
            _ => std::fs::write(&partial, &data[..CHUNK]).unwrap(),
        }
        let (pull, wanted) = VecPull::new(&data, None);
        let report = place_once(dir.path(), &data, pull);
        assert_eq!(
            report.ending,
            PlaceEnding::Placed,
            "{plant}: {}",
            report.message
        );
        assert_eq!(
            *wanted.lock().unwrap(),
            vec![(0, 0)],
            "{plant}: from the start"
        );
        assert!(std::fs::read(dir.path().join("f.bin")).unwrap() == data);
        assert_eq!(
            std::fs::read(&victim).unwrap(),
            &data[..CHUNK],
            "{plant}: the victim is untouched"
        );
        // What was planted is left where it was.
        assert!(std::fs::symlink_metadata(&partial).is_ok(), "{plant}");
    }
}

#[test]
fn a_partial_of_roots_placement_handed_to_another_account_is_not_continued() {
    // The partial name root's placement would continue, owned by another account that may
    // have written into it.
    let data = content(4 * CHUNK);
    let dir = scratch();
    let partial = cut_try_as("root", dir.path(), &data);
    let other = nix::unistd::User::from_name(TEST_USER).unwrap().unwrap();
    std::os::unix::fs::chown(&partial, Some(other.uid.as_raw()), None).unwrap();
    let (pull, wanted) = VecPull::new(&data, None);
    let report = place_once_as("root", dir.path(), &data, pull);
    assert_eq!(report.ending, PlaceEnding::Placed, "{}", report.message);
    assert_eq!(*wanted.lock().unwrap(), vec![(0, 0)], "from the start");
    assert!(std::fs::read(dir.path().join("f.bin")).unwrap() == data);
    let meta = std::fs::symlink_metadata(&partial).unwrap();
    assert_eq!(
        meta.uid(),
        other.uid.as_raw(),
        "the other account's file is left"
    );
    assert_eq!(meta.len(), 3 * CHUNK as u64, "and not written");
}

#[test]
fn a_kept_partial_is_removed_as_the_account_and_anything_else_under_its_name_is_left() {
    let data = content(4 * CHUNK);
    let dir = scratch();
    let partial = cut_try(dir.path(), &data);
    assert_eq!(
        remove_partials(placement_of(TEST_USER, dir.path(), &data)).unwrap(),
        1
    );
    assert!(partials(dir.path()).is_empty(), "the kept partial is gone");
    // Planted under the partial name: a link to a file of the account, and root's file.
    let victim = dir.path().join("victim");
    std::fs::write(&victim, b"kept").unwrap();
    let account = nix::unistd::User::from_name(TEST_USER).unwrap().unwrap();
    std::os::unix::fs::chown(&victim, Some(account.uid.as_raw()), None).unwrap();
    std::os::unix::fs::symlink(&victim, &partial).unwrap();
    assert_eq!(
        remove_partials(placement_of(TEST_USER, dir.path(), &data)).unwrap(),
        0
    );
    assert!(std::fs::symlink_metadata(&partial).unwrap().is_symlink());
    assert_eq!(std::fs::read(&victim).unwrap(), b"kept");
    std::fs::remove_file(&partial).unwrap();
    std::fs::write(&partial, b"root's").unwrap();
    assert_eq!(
        remove_partials(placement_of(TEST_USER, dir.path(), &data)).unwrap(),
        0
    );
    assert_eq!(std::fs::read(&partial).unwrap(), b"root's");
}
