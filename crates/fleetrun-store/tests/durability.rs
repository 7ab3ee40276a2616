//! The store against a database that stops accepting writes, against concurrent starts from
//! two handles on one database (two controllers sharing it), and the modes of its files.
//! Run as root: a SQLite database is made unwritable with `chattr +i`, which stops root too; a
//! PostgreSQL one (with `FLEETRUN_TEST_DATABASE`) is made read-only by the server.

use std::{
    os::unix::fs::PermissionsExt,
    path::{Path, PathBuf},
    process::Command,
    time::Duration,
};

use fleetrun_store::{
    Database, HostOutcome, NewJob, Store, StoreError, Write, scratch::TestDatabase,
};

mod common;

const PENDING: i32 = 1;
const RUNNING: i32 = 2;

fn new_job(status: i32) -> NewJob {
    common::job_on_hosts("t", status, b"true", 1)
}

fn sibling(path: &Path, suffix: &str) -> PathBuf {
    let mut name = path.as_os_str().to_owned();
    name.push(suffix);
    name.into()
}

/// Makes files immutable (`chattr +i`, which refuses writes even to root and through descriptors
/// already open) until dropped.
struct Immutable(Vec<PathBuf>);

impl Immutable {
    fn set(files: Vec<PathBuf>) -> Self {
        for file in &files {
            let status = Command::new("chattr").arg("+i").arg(file).status().unwrap();
            assert!(status.success(), "chattr +i {}", file.display());
        }
        Self(files)
    }
}

impl Drop for Immutable {
    fn drop(&mut self) {
        for file in &self.0 {
            let _ = Command::new("chattr").arg("-i").arg(file).status();
        }
    }
}

/// The SQLite file of a test database, or `None` (with the reason printed) when the tests run
/// against PostgreSQL, for tests of what only a file has.
fn sqlite_only(db: &TestDatabase, test: &str) -> Option<PathBuf> {
    match db.database() {
        Database::Sqlite(path) => Some(path.clone()),
        Database::Postgres(_) => {
            println!(
                "{test}: skipped on PostgreSQL: it tests a SQLite file's modes and attributes"
            );
            None
        }
    }
}

async fn until(limit: Duration, what: &str, mut check: impl FnMut() -> bool) {
    let deadline = tokio::time::Instant::now() + limit;
    while !check() {
        assert!(
            tokio::time::Instant::now() < deadline,
            "{what}: not within {limit:?}"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

#[tokio::test(flavor = "multi_thread")]
async fn an_unwritable_database_is_reported_and_what_was_accepted_is_written_once_it_recovers() {
    let _ = tracing_subscriber::fmt()
        .with_env_filter("fleetrun_store=info")
        .with_test_writer()
        .try_init();
    let db = TestDatabase::create("unwritable").await.unwrap();
    let Some(path) = sqlite_only(&db, "an_unwritable_database_is_reported") else {
        return;
    };
    let store = Store::open(&path).await.unwrap();
    let job = store.create_job(&new_job(RUNNING)).await.unwrap();
    let step = job.step_instance_id;
    store.flush().await.unwrap();
    assert!(store.health().is_writable());

    let frozen = Immutable::set(vec![path.clone(), sibling(&path, "-wal")]);
    // More writes than the queue holds: the engine must not be kept waiting on a broken disk.
    let chunk = vec![b'x'; 100];
    tokio::time::timeout(Duration::from_secs(10), async {
        for offset in 0..20_000 {
            store
                .record(Write::HostLog {
                    epoch: fleetrun_store::FIRST_EPOCH,
                    step_instance_id: step,
                    bk_host_id: 1,
                    offset: offset * 100,
                    data: chunk.clone(),
                })
                .await
                .unwrap();
        }
    })
    .await
    .expect("recording blocked while the database refused writes");
    until(Duration::from_secs(10), "the failure reported", || {
        !store.health().is_writable()
    })
    .await;
    let health = store.health();
    assert!(health.pending > 0, "{health:?}");
    assert_eq!(health.lost, 0, "{health:?}");
    // A flush waits for writes that cannot be made; it must not answer as if they were.
    assert!(
        tokio::time::timeout(Duration::from_millis(500), store.flush())
            .await
            .is_err()
    );
    let refused = store.create_job(&new_job(RUNNING)).await.unwrap_err();
    assert!(refused.is_write_failure(), "{refused}");

    drop(frozen);
    if tokio::time::timeout(Duration::from_secs(30), store.flush())
        .await
        .is_err()
    {
        panic!(
            "not flushed once the database accepts writes: {:?}",
            store.health()
        );
    }
    let health = store.health();
    assert!(health.is_writable(), "{health:?}");
    assert_eq!((health.pending, health.lost), (0, 0), "{health:?}");
    assert_eq!(store.host_log(step, 1).await.unwrap().len(), 20_000 * 100);
}

#[tokio::test(flavor = "multi_thread")]
async fn a_failure_found_while_creating_a_job_clears_once_the_database_recovers() {
    let db = TestDatabase::create("failure_found").await.unwrap();
    let Some(path) = sqlite_only(&db, "a_failure_found_while_creating_a_job") else {
        return;
    };
    let store = Store::open(&path).await.unwrap();
    store.create_job(&new_job(RUNNING)).await.unwrap();
    let frozen = Immutable::set(vec![path.clone(), sibling(&path, "-wal")]);
    let refused = store.create_job(&new_job(RUNNING)).await.unwrap_err();
    assert!(refused.is_write_failure(), "{refused}");
    // The writer had nothing to write; it probes until writes succeed again.
    assert!(!store.health().is_writable(), "{:?}", store.health());
    drop(frozen);
    until(Duration::from_secs(15), "the recovery noticed", || {
        store.health().is_writable()
    })
    .await;
    store.create_job(&new_job(RUNNING)).await.unwrap();
}

#[tokio::test(flavor = "multi_thread")]
async fn a_pending_job_is_claimed_once_by_concurrent_starts_from_two_handles() {
    let db = TestDatabase::create("claimed_once").await.unwrap();
    let one = Store::open_database(db.database()).await.unwrap();
    // A second controller's handle on SQLite; PostgreSQL refuses a second one (one controller
    // per database), so there the claims race through one pool's connections.
    let two = if db.is_postgres() {
        one.clone()
    } else {
        Store::open_database(db.database()).await.unwrap()
    };
    let job = one.create_job(&new_job(PENDING)).await.unwrap();
    let mut claims = tokio::task::JoinSet::new();
    for i in 0..20 {
        let store = if i % 2 == 0 { one.clone() } else { two.clone() };
        claims.spawn(async move {
            store
                .claim_pending_job(job.job_instance_id, PENDING, RUNNING, 1_000 + i)
                .await
                .unwrap()
        });
    }
    let won = claims
        .join_all()
        .await
        .into_iter()
        .filter(|claimed| *claimed)
        .count();
    assert_eq!(won, 1);
    let record = two.job(job.job_instance_id).await.unwrap().unwrap();
    assert_eq!(record.status, RUNNING);
    assert_eq!(record.steps[0].status, RUNNING);
    // A job that is not pending is never claimed.
    let running = one.create_job(&new_job(RUNNING)).await.unwrap();
    assert!(
        !one.claim_pending_job(running.job_instance_id, PENDING, RUNNING, 5)
            .await
            .unwrap()
    );
}

fn mode(path: &Path) -> u32 {
    std::fs::metadata(path).unwrap().permissions().mode() & 0o777
}

#[tokio::test]
async fn the_database_and_its_directory_are_readable_by_their_owner_only() {
    let db = TestDatabase::create("modes").await.unwrap();
    if sqlite_only(
        &db,
        "the_database_and_its_directory_are_readable_by_their_owner_only",
    )
    .is_none()
    {
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("state/db.sqlite");
    let store = Store::open(&path).await.unwrap();
    store
        .record(Write::HostFinished {
            stored: None,
            epoch: fleetrun_store::FIRST_EPOCH,
            step_instance_id: 1,
            bk_host_id: 1,
            outcome: HostOutcome::default(),
        })
        .await
        .unwrap();
    store.flush().await.unwrap();
    assert_eq!(mode(path.parent().unwrap()), 0o700);
    for file in [path.clone(), sibling(&path, "-wal"), sibling(&path, "-shm")] {
        assert_eq!(mode(&file), 0o600, "{}", file.display());
    }
    drop(store);

    // A database an older version left readable by everyone is closed to them at open.
    let old = dir.path().join("old.sqlite");
    std::fs::write(&old, b"").unwrap();
    std::fs::set_permissions(&old, std::fs::Permissions::from_mode(0o644)).unwrap();
    let _store = Store::open(&old).await.unwrap();
    assert_eq!(mode(&old), 0o600);
}

#[tokio::test(flavor = "multi_thread")]
async fn a_postgres_database_that_refuses_writes_is_reported_while_idle_and_recovers() {
    let db = TestDatabase::create("read_only").await.unwrap();
    let TestDatabase::Postgres(scratch) = &db else {
        println!(
            "a_postgres_database_that_refuses_writes: skipped on SQLite: \
             an_unwritable_database_is_reported covers the file"
        );
        return;
    };
    let store = Store::open_database(db.database()).await.unwrap();
    let job = store.create_job(&new_job(RUNNING)).await.unwrap();
    let step = job.step_instance_id;
    store.flush().await.unwrap();

    scratch.set_read_only(true).await.unwrap();
    // Nothing is written meanwhile: the writer's idle probe must find it.
    until(Duration::from_secs(20), "the failure reported", || {
        !store.health().is_writable()
    })
    .await;
    let refused = store.create_job(&new_job(RUNNING)).await.unwrap_err();
    assert!(refused.is_write_failure(), "{refused}");
    for offset in 0..100 {
        store
            .record(Write::HostLog {
                epoch: fleetrun_store::FIRST_EPOCH,
                step_instance_id: step,
                bk_host_id: 1,
                offset: offset * 10,
                data: vec![b'y'; 10],
            })
            .await
            .unwrap();
    }
    assert!(
        tokio::time::timeout(Duration::from_millis(500), store.flush())
            .await
            .is_err(),
        "a flush answered while the database refused writes"
    );

    scratch.set_read_only(false).await.unwrap();
    tokio::time::timeout(Duration::from_secs(30), store.flush())
        .await
        .unwrap_or_else(|_| panic!("not flushed after recovery: {:?}", store.health()))
        .unwrap();
    let health = store.health();
    assert!(health.is_writable(), "{health:?}");
    assert_eq!((health.pending, health.lost), (0, 0), "{health:?}");
    assert_eq!(store.host_log(step, 1).await.unwrap(), vec![b'y'; 1_000]);
}

/// Two controllers on one PostgreSQL database would end each other's running jobs at start: the
/// second store is refused while the first holds the database, and opens once it is gone.
#[tokio::test(flavor = "multi_thread")]
async fn a_second_store_on_one_postgres_database_is_refused_while_the_first_lives() {
    let db = TestDatabase::create("sole_use").await.unwrap();
    if !db.is_postgres() {
        println!(
            "a_second_store_on_one_postgres_database: skipped on SQLite (one file, one controller)"
        );
        return;
    }
    let first = Store::open_database(db.database()).await.unwrap();
    let refused = Store::open_database(db.database()).await.unwrap_err();
    assert!(matches!(refused, StoreError::InUse(_)), "{refused}");
    assert!(
        refused.to_string().contains("another controller"),
        "{refused}"
    );
    drop(first);
    // The first store's session ends when its socket closes, which the server notices at once.
    let mut opened = None;
    for _ in 0..50 {
        match Store::open_database(db.database()).await {
            Ok(store) => {
                opened = Some(store);
                break;
            }
            Err(StoreError::InUse(_)) => tokio::time::sleep(Duration::from_millis(100)).await,
            Err(e) => panic!("{e}"),
        }
    }
    assert!(
        opened.is_some(),
        "the database stayed locked after the first store was dropped"
    );
}
