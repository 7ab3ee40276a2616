//! What the store's bulk paths cost on the backend the tests run against
//! (`FLEETRUN_TEST_DATABASE`): a job on 10,000 hosts, the group commit of their "running" rows,
//! final rows and output, and one-statement reads. On demand:
//! `cargo test -p fleetrun-store --release --test throughput -- --ignored --nocapture`.

use std::time::{Duration, Instant};

use fleetrun_store::{HostOutcome, NewJob, Store, Write, scratch::TestDatabase};

mod common;

const HOSTS: i64 = 10_000;

fn job() -> NewJob {
    common::job_on_hosts("throughput", 2, b"echo hello", HOSTS)
}

fn per_second(n: i64, took: Duration) -> f64 {
    n as f64 / took.as_secs_f64()
}

#[tokio::test(flavor = "multi_thread")]
#[ignore = "a measurement: run on demand with --ignored --nocapture"]
async fn bulk_paths() {
    let db = TestDatabase::create("throughput").await.unwrap();
    let store = Store::open_database(db.database()).await.unwrap();
    let backend = if db.is_postgres() {
        "postgres"
    } else {
        "sqlite"
    };

    let started = Instant::now();
    let created = store.create_job(&job()).await.unwrap();
    let create = started.elapsed();
    let step = created.step_instance_id;

    // Every host starts, prints a line and ends, each as its own write, as the engine sends
    // them; the writer commits whatever has queued.
    let started = Instant::now();
    for id in 1..=HOSTS {
        store
            .record(Write::HostStatus {
                epoch: fleetrun_store::FIRST_EPOCH,
                step_instance_id: step,
                bk_host_id: id,
                status: 7,
                start_time: Some(1),
            })
            .await
            .unwrap();
    }
    store.flush().await.unwrap();
    let running = started.elapsed();
    let started = Instant::now();
    for id in 1..=HOSTS {
        store
            .record(Write::HostLog {
                epoch: fleetrun_store::FIRST_EPOCH,
                step_instance_id: step,
                bk_host_id: id,
                offset: 0,
                data: b"hello from a host\n".to_vec(),
            })
            .await
            .unwrap();
        store
            .record(Write::HostFinished {
                stored: None,
                epoch: fleetrun_store::FIRST_EPOCH,
                step_instance_id: step,
                bk_host_id: id,
                outcome: HostOutcome {
                    status: 9,
                    end_time: 2,
                    exit_code: Some(0),
                    output_bytes: 18,
                    ..HostOutcome::default()
                },
            })
            .await
            .unwrap();
    }
    store.flush().await.unwrap();
    let finished = started.elapsed();

    let started = Instant::now();
    let reads = 1_000;
    for _ in 0..reads {
        store.job_status(created.job_instance_id).await.unwrap();
    }
    let read = started.elapsed();
    let results = store.host_results(step).await.unwrap();
    assert!(
        results
            .iter()
            .all(|r| r.status == 9 && r.output_bytes == 18)
    );

    println!(
        "{backend}: create_job on {HOSTS} hosts {:.1} ms; {HOSTS} running rows committed in \
         {:.1} ms ({:.0}/s); {HOSTS} log chunks + {HOSTS} final rows in {:.1} ms ({:.0} writes/s); \
         job_status {:.0} µs each",
        create.as_secs_f64() * 1e3,
        running.as_secs_f64() * 1e3,
        per_second(HOSTS, running),
        finished.as_secs_f64() * 1e3,
        per_second(2 * HOSTS, finished),
        read.as_secs_f64() * 1e6 / reads as f64,
    );
}
