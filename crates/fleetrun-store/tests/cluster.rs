//! Controllers sharing one PostgreSQL database: one live store per controller name, any number
//! of names.

use std::time::Duration;

use fleetrun_store::{Store, StoreError, scratch::TestDatabase};

mod common;

#[tokio::test(flavor = "multi_thread")]
async fn controllers_of_other_names_share_a_database_one_of_each_name_lives() {
    let db = TestDatabase::create("cluster_names").await.unwrap();
    if !db.is_postgres() {
        println!(
            "controllers_of_other_names_share_a_database: skipped on SQLite (one file, one controller)"
        );
        return;
    }
    // A controller alone on the database (no [cluster]) keeps it to itself: no member starts
    // beside it, and it does not start beside members.
    let alone = Store::open_database(db.database()).await.unwrap();
    let refused = Store::open_as(db.database(), "a").await.unwrap_err();
    assert!(matches!(refused, StoreError::InUse(_)), "{refused}");
    assert!(
        refused.to_string().contains("without a [cluster]"),
        "{refused}"
    );
    drop(alone);
    let mut a = None;
    for _ in 0..50 {
        match Store::open_as(db.database(), "a").await {
            Ok(store) => {
                a = Some(store);
                break;
            }
            Err(StoreError::InUse(_)) => tokio::time::sleep(Duration::from_millis(100)).await,
            Err(e) => panic!("{e}"),
        }
    }
    let a = a.expect("the database stayed locked after the lone store was dropped");
    let b = Store::open_as(db.database(), "b").await.unwrap();
    // The default name is a name like the others.
    let default = Store::open_as(db.database(), "default").await.unwrap();
    let refused = Store::open_database(db.database()).await.unwrap_err();
    assert!(matches!(refused, StoreError::InUse(_)), "{refused}");
    let refused = tokio::time::timeout(Duration::from_secs(30), Store::open_as(db.database(), "a"))
        .await
        .expect("refused within the wait")
        .unwrap_err();
    assert!(matches!(refused, StoreError::InUse(_)), "{refused}");
    assert!(refused.to_string().contains("\"a\""), "{refused}");
    // Both see one database: a lease taken through one is refused through the other.
    assert!(a.take_job_lease(1, "a", 0, 1_000).await.unwrap());
    assert!(!b.take_job_lease(1, "b", 10, 1_010).await.unwrap());
    assert_eq!(
        default.job_lease(1).await.unwrap(),
        Some(("a".into(), 1_000))
    );
    drop(a);
    let mut reopened = None;
    for _ in 0..50 {
        match Store::open_as(db.database(), "a").await {
            Ok(store) => {
                reopened = Some(store);
                break;
            }
            Err(StoreError::InUse(_)) => tokio::time::sleep(Duration::from_millis(100)).await,
            Err(e) => panic!("{e}"),
        }
    }
    assert!(
        reopened.is_some(),
        "the name stayed locked after its store was dropped"
    );
}

#[tokio::test(flavor = "multi_thread")]
async fn a_commit_through_one_store_wakes_the_followers_of_another() {
    let db = TestDatabase::create("cluster_watch").await.unwrap();
    if !db.is_postgres() {
        println!(
            "a_commit_through_one_store_wakes_the_followers_of_another: skipped on SQLite (one file, one controller)"
        );
        return;
    }
    let a = Store::open_as(db.database(), "a").await.unwrap();
    let b = Store::open_as(db.database(), "b").await.unwrap();
    let mine = b.watch_job(1, 10);
    let other = b.watch_job(2, 20);
    // The listener may still be connecting: commit until the follower wakes.
    let woken = tokio::time::timeout(Duration::from_secs(20), async {
        let mut offset = 0;
        loop {
            a.record(fleetrun_store::Write::HostLog {
                epoch: fleetrun_store::FIRST_EPOCH,
                step_instance_id: 10,
                bk_host_id: 1,
                offset,
                data: b"x".to_vec(),
            })
            .await
            .unwrap();
            a.flush().await.unwrap();
            offset += 1;
            if tokio::time::timeout(Duration::from_millis(500), mine.changed())
                .await
                .is_ok()
            {
                return;
            }
        }
    })
    .await;
    assert!(woken.is_ok(), "b's follower never heard of a's commit");
    assert!(
        tokio::time::timeout(Duration::from_millis(300), other.changed())
            .await
            .is_err(),
        "a follower of another step was woken"
    );
}

/// Rows and bytes one host-run leaves in PostgreSQL (docs/scale.md): a 10,000-host job, each
/// host with its running row, a 100-byte log, its final row and a task checkpoint. On demand:
/// `FLEETRUN_TEST_DATABASE=postgres://… cargo test -p fleetrun-store --test cluster -- --ignored --nocapture`.
#[tokio::test(flavor = "multi_thread")]
#[ignore = "a measurement: run on demand with --ignored --nocapture"]
async fn rows_and_bytes_per_host_run() {
    use fleetrun_store::{HostCheckpoint, HostOutcome, Write};
    use sqlx::Row as _;
    const HOSTS: i64 = 10_000;
    let db = TestDatabase::create("cluster_footprint").await.unwrap();
    let fleetrun_store::Database::Postgres(url) = db.database().clone() else {
        println!("rows_and_bytes_per_host_run: PostgreSQL only");
        return;
    };
    let store = Store::open_database(db.database()).await.unwrap();
    let mut admin = <sqlx::PgConnection as sqlx::Connection>::connect(&url)
        .await
        .unwrap();
    const TABLES: [&str; 5] = [
        "job_instance",
        "step_instance",
        "host_result",
        "host_log",
        "host_task",
    ];
    async fn sizes(admin: &mut sqlx::PgConnection) -> Vec<i64> {
        let mut out = Vec::new();
        for table in TABLES {
            sqlx::raw_sql(&format!("VACUUM ANALYZE {table}"))
                .execute(&mut *admin)
                .await
                .unwrap();
            let row = sqlx::query(&format!("SELECT pg_total_relation_size('{table}')"))
                .fetch_one(&mut *admin)
                .await
                .unwrap();
            out.push(row.get::<i64, _>(0));
        }
        out
    }
    let before = sizes(&mut admin).await;
    let created = store
        .create_job(&common::job_on_hosts("footprint", 2, b"echo hello", HOSTS))
        .await
        .unwrap();
    let step = created.step_instance_id;
    let log = vec![b'x'; 100];
    let mut checkpoints = Vec::new();
    for host in 1..=HOSTS {
        store
            .record(Write::HostStatus {
                epoch: fleetrun_store::FIRST_EPOCH,
                step_instance_id: step,
                bk_host_id: host,
                status: 7,
                start_time: Some(1),
            })
            .await
            .unwrap();
        store
            .record(Write::HostLog {
                epoch: fleetrun_store::FIRST_EPOCH,
                step_instance_id: step,
                bk_host_id: host,
                offset: 0,
                data: log.clone(),
            })
            .await
            .unwrap();
        store
            .record(Write::HostFinished {
                stored: None,
                epoch: fleetrun_store::FIRST_EPOCH,
                step_instance_id: step,
                bk_host_id: host,
                outcome: HostOutcome {
                    status: 9,
                    tag: String::new(),
                    exit_code: Some(0),
                    start_time: Some(1),
                    end_time: 2,
                    output_bytes: 100,
                    ..HostOutcome::default()
                },
            })
            .await
            .unwrap();
        checkpoints.push(HostCheckpoint {
            epoch: fleetrun_store::FIRST_EPOCH,
            step_instance_id: step,
            bk_host_id: host,
            task_id: uuid_like(host),
            agent_id: format!("agent-{host}"),
            received: 100,
            stored: 100,
            dropped_bytes: 0,
            dropped_lines: 0,
            truncated: false,
            started_at: Some(1),
            deadline: Some(100),
        });
    }
    store
        .record(fleetrun_store::Write::Checkpoints {
            checkpoints,
            saved: None,
        })
        .await
        .unwrap();
    store.flush().await.unwrap();
    let after = sizes(&mut admin).await;
    println!("| table | bytes per host-run |");
    println!("|---|---|");
    let mut total = 0;
    for ((table, b), a) in TABLES.iter().zip(&before).zip(&after) {
        let per = (a - b) as f64 / HOSTS as f64;
        total += a - b;
        println!("| {table} | {per:.0} |");
    }
    println!(
        "| all (100-byte log, one checkpoint) | {:.0} |",
        total as f64 / HOSTS as f64
    );
    assert!(after[2] > before[2]);
}

fn uuid_like(n: i64) -> String {
    format!("00000000-0000-4000-8000-{n:012}")
}
