//! Fencing the writers of a host's run (migration 0020). Each (step, host) has an `epoch` in
//! `host_result`, advanced by every statement that gives the host to another writer: a
//! handover and a hand-over again, a take-over (an agent's claim elsewhere, the lease holder
//! ending it at its deadline), a job's take-up by another controller, a retry, an interrupted
//! end. The writer of a host carries the epoch it took the host at in every write of its
//! output, status and checkpoint ([`crate::Write`], [`crate::HostCheckpoint`]), and the group
//! commit applies each only while the row still has that epoch, in the bulk statement itself.
//! A controller that stalled (a database partition, a long pause) and comes back with a backlog
//! therefore cannot write over what the controller that took its hosts recorded: its writes are
//! refused, and the store tells it which hosts it lost ([`crate::Store::fenced_hosts`]) so that
//! it stops them.

use std::{
    collections::{BTreeMap, HashMap},
    sync::{Arc, Mutex},
};

use sqlx::Row;
use tokio::sync::Notify;

/// The epoch of a host nobody took over: every host of a new job starts there.
pub const FIRST_EPOCH: i64 = 0;

/// The condition of a fenced insert whose values are `v` with the step in `column1`, the host
/// in `column2` and the epoch in `epoch_column`: no row of that host stands at another epoch.
pub(crate) fn not_fenced_out(epoch_column: &str) -> String {
    format!(
        "NOT EXISTS (SELECT 1 FROM host_result r
             WHERE r.step_instance_id = v.column1 AND r.bk_host_id = v.column2
               AND r.epoch <> v.{epoch_column})"
    )
}

/// On PostgreSQL, takes a share lock on the host rows of `hosts` (step, host), in one
/// statement per step and in host order, before the fenced inserts of their log and checkpoints:
/// their `NOT EXISTS` reads a snapshot and locks nothing, so without it an epoch raise that
/// commits meanwhile would not be waited for. With it, a raise waits for this transaction, or
/// this one for the raise (and then reads the raised epoch). SQLite runs one writer at a time.
pub(crate) async fn lock_hosts(
    tx: &mut sqlx::AnyConnection,
    dialect: crate::backend::Dialect,
    hosts: impl IntoIterator<Item = (i64, i64)>,
) -> Result<(), sqlx::Error> {
    if dialect != crate::backend::Dialect::Postgres {
        return Ok(());
    }
    // By step, in order: the host ids as one array per statement, joined. PostgreSQL turns a
    // list of row constructors (`(step, host) IN ((…), …)`) into a chain of ORs nested one level
    // per item, which past a few thousand items exceeds its stack depth limit and refuses the
    // statement. One bound array keeps the text prepared; it is joined rather than compared with
    // `= ANY($2)`, which in the plan PostgreSQL keeps for a prepared statement searches the
    // whole array for every row of the step (seconds for 10,000 hosts, measured).
    let mut by_step: BTreeMap<i64, std::collections::BTreeSet<i64>> = BTreeMap::new();
    for (step, host) in hosts {
        by_step.entry(step).or_default().insert(host);
    }
    for (step, hosts) in by_step {
        let hosts: Vec<i64> = hosts.into_iter().collect();
        sqlx::query(
            "SELECT 1 FROM host_result r JOIN unnest($2::int8[]) AS h (id) ON r.bk_host_id = h.id
             WHERE r.step_instance_id = $1 ORDER BY r.bk_host_id FOR SHARE OF r",
        )
        .bind(step)
        .bind(crate::backend::array_literal(&hosts))
        .fetch_all(&mut *tx)
        .await?;
    }
    Ok(())
}

/// Hosts whose writes were refused, for the engine that wrote them to stop them: (step, host,
/// the epoch the host's row is at).
#[derive(Debug, Default)]
pub(crate) struct Fenced {
    hosts: Mutex<Vec<(i64, i64, i64)>>,
    news: Notify,
}

impl Fenced {
    pub(crate) fn push(&self, refused: Vec<(i64, i64, i64)>) {
        self.hosts.lock().unwrap().extend(refused);
        self.news.notify_one();
    }

    /// Waits until some host's writes were refused, and returns every such (step, host, row
    /// epoch) since the last call, one per host (its highest epoch), in order.
    pub(crate) async fn next(self: &Arc<Self>) -> Vec<(i64, i64, i64)> {
        loop {
            let taken = std::mem::take(&mut *self.hosts.lock().unwrap());
            if !taken.is_empty() {
                let mut highest: BTreeMap<(i64, i64), i64> = BTreeMap::new();
                for (step, host, epoch) in taken {
                    let at = highest.entry((step, host)).or_insert(epoch);
                    *at = (*at).max(epoch);
                }
                return highest
                    .into_iter()
                    .map(|((step, host), epoch)| (step, host, epoch))
                    .collect();
            }
            self.news.notified().await;
        }
    }
}

/// The hosts whose writes one group commit refused, each with the epoch its row is at: a write
/// of such a host at another epoch was not applied.
#[derive(Debug, Default)]
pub(crate) struct Refused(HashMap<(i64, i64), i64>);

impl Refused {
    pub(crate) fn is_empty(&self) -> bool {
        self.0.is_empty()
    }

    /// Whether a write of the host at `epoch` was refused.
    pub(crate) fn refuses(&self, step_instance_id: i64, bk_host_id: i64, epoch: i64) -> bool {
        self.0
            .get(&(step_instance_id, bk_host_id))
            .is_some_and(|at| *at != epoch)
    }

    /// (step, host, row epoch) of every refused host, in order.
    pub(crate) fn hosts(&self) -> Vec<(i64, i64, i64)> {
        let mut hosts: Vec<(i64, i64, i64)> =
            self.0.iter().map(|((s, h), e)| (*s, *h, *e)).collect();
        hosts.sort_unstable();
        hosts
    }
}

/// What the fenced statements of one group commit carried and applied.
#[derive(Debug, Default)]
pub(crate) struct Check {
    /// The (step, host, epoch) of every statement that applied fewer rows than it carried, and
    /// of every write left out for a later epoch's write of its host in the same batch.
    suspects: Vec<(i64, i64, i64)>,
}

impl Check {
    /// Notes a fenced statement's rows and how many it applied.
    pub(crate) fn carried(
        &mut self,
        rows: impl ExactSizeIterator<Item = (i64, i64, i64)>,
        applied: u64,
    ) {
        if (rows.len() as u64) > applied {
            self.suspects.extend(rows);
        }
    }

    /// Notes a write left out of the batch's statements because a write of its host at a
    /// later epoch is in the batch: it is refused as the statement would have refused it.
    pub(crate) fn passed_over(&mut self, step_instance_id: i64, bk_host_id: i64, epoch: i64) {
        self.suspects.push((step_instance_id, bk_host_id, epoch));
    }

    /// The hosts among the suspects whose row has another epoch than a write carried: refused.
    /// One query per step, and none unless some statement fell short.
    pub(crate) async fn refused(
        self,
        tx: &mut sqlx::AnyConnection,
        dialect: crate::backend::Dialect,
    ) -> Result<Refused, sqlx::Error> {
        // By step, each host with the epochs its writes carried.
        let mut by_step: BTreeMap<i64, HashMap<i64, Vec<i64>>> = BTreeMap::new();
        for (step, host, epoch) in self.suspects {
            by_step
                .entry(step)
                .or_default()
                .entry(host)
                .or_default()
                .push(epoch);
        }
        let mut refused = HashMap::new();
        for (step, carried) in by_step {
            let ids: Vec<i64> = carried.keys().copied().collect();
            for (host, epoch) in row_epochs(&mut *tx, dialect, step, &ids).await? {
                if carried
                    .get(&host)
                    .is_some_and(|carried| carried.iter().any(|e| *e != epoch))
                {
                    refused.insert((step, host), epoch);
                }
            }
        }
        let refused = Refused(refused);
        if let Some(first) = refused.hosts().first() {
            tracing::warn!(
                hosts = refused.0.len(),
                first = ?first,
                "writes of hosts another controller took over were refused"
            );
        }
        Ok(refused)
    }
}

/// The epoch of each of the step's `hosts` that has a row, read in `connection`.
pub(crate) async fn row_epochs(
    connection: &mut sqlx::AnyConnection,
    dialect: crate::backend::Dialect,
    step_instance_id: i64,
    hosts: &[i64],
) -> Result<HashMap<i64, i64>, sqlx::Error> {
    let mut epochs = HashMap::with_capacity(hosts.len());
    for chunk in hosts.chunks(10_000) {
        let ids = crate::Ids::new(dialect, "bk_host_id", 2, chunk);
        let query = format!(
            "SELECT bk_host_id, epoch FROM host_result WHERE step_instance_id = $1 AND {}",
            ids.sql()
        );
        let rows = ids
            .bind(sqlx::query(&query).bind(step_instance_id))
            .fetch_all(&mut *connection)
            .await?;
        epochs.extend(
            rows.iter()
                .map(|r| (r.get::<i64, _>(0), r.get::<i64, _>(1))),
        );
    }
    Ok(epochs)
}

/// `UPDATE host_result SET epoch = epoch + 1` for the step's `hosts`, in `tx`: they pass to
/// another writer. Returns each host's new epoch.
pub(crate) async fn advance(
    tx: &mut sqlx::AnyConnection,
    step_instance_id: i64,
    hosts: &[i64],
) -> Result<HashMap<i64, i64>, sqlx::Error> {
    let mut epochs = HashMap::with_capacity(hosts.len());
    // The ids as a literal list: PostgreSQL then walks the key's index in host order and
    // locks the rows in that order, as `lock_hosts` does, where a join with an array could
    // take them in any order and two writers could deadlock.
    for chunk in hosts.chunks(10_000) {
        let rows = sqlx::query(&format!(
            "UPDATE host_result SET epoch = epoch + 1
             WHERE step_instance_id = $1 AND bk_host_id IN ({})
             RETURNING bk_host_id, epoch",
            crate::join_ids(chunk)
        ))
        .persistent(false)
        .bind(step_instance_id)
        .fetch_all(&mut *tx)
        .await?;
        epochs.extend(
            rows.iter()
                .map(|r| (r.get::<i64, _>(0), r.get::<i64, _>(1))),
        );
    }
    Ok(epochs)
}

impl crate::Store {
    /// Waits until writes of hosts this controller ran were refused because another
    /// controller took those hosts over, and returns them as (step, host, the epoch the host is
    /// at now): its runs here below that epoch must stop, recording nothing more.
    pub async fn fenced_hosts(&self) -> Vec<(i64, i64, i64)> {
        self.watchers.fenced_news().next().await
    }

    /// The epochs of the step's hosts that are past [`FIRST_EPOCH`] (taken over at least
    /// once); every other host of the step is at the first. One query on the step's rows.
    pub async fn host_epochs(
        &self,
        step_instance_id: i64,
    ) -> Result<HashMap<i64, i64>, crate::StoreError> {
        let rows = sqlx::query(
            "SELECT bk_host_id, epoch FROM host_result
             WHERE step_instance_id = $1 AND epoch <> $2",
        )
        .bind(step_instance_id)
        .bind(FIRST_EPOCH)
        .fetch_all(&self.pool)
        .await?;
        Ok(rows
            .iter()
            .map(|r| (r.get::<i64, _>(0), r.get::<i64, _>(1)))
            .collect())
    }
}

#[cfg(test)]
mod tests {
    use crate::{FIRST_EPOCH, HostCheckpoint, HostOutcome, Store, Write};

    const UNFINISHED: [i32; 3] = [0, 5, 7];

    /// A checkpoint write of a fan-out to 12,000 hosts commits on PostgreSQL too: the share
    /// lock taken on their rows before the fenced upsert used to list (step, host) pairs, a list
    /// PostgreSQL nests one level per pair and refused past its stack depth limit, and the
    /// whole write was given up (its tasks were never sent).
    #[tokio::test]
    async fn a_checkpoint_write_of_twelve_thousand_hosts_commits() {
        let (_db, store) = crate::test_store().await;
        let hosts = 1..=12_000;
        let created = store
            .create_job(&crate::test_job(hosts.clone(), 7))
            .await
            .unwrap();
        let step = created.step_instance_id;
        let (saved, answer) = tokio::sync::oneshot::channel();
        store
            .record(Write::Checkpoints {
                checkpoints: hosts
                    .clone()
                    .map(|host| checkpoint(step, host, &format!("task-{host}"), 0, FIRST_EPOCH))
                    .collect(),
                saved: Some(saved),
            })
            .await
            .unwrap();
        store.flush().await.unwrap();
        assert_eq!(answer.await.unwrap(), Vec::<(i64, i64)>::new());
        for host in [1, 6_000, 12_000] {
            let task = store.stored_task(step, host).await.unwrap();
            assert_eq!(
                task.map(|t| t.checkpoint.task_id),
                Some(format!("task-{host}")),
                "host {host}"
            );
        }
        assert_eq!(store.health().lost, 0);
    }

    /// A job running on hosts 1 and 2 (status 7, at the first epoch); its (job, step).
    async fn running_job(store: &Store) -> (i64, i64) {
        let created = store.create_job(&crate::test_job([1, 2], 7)).await.unwrap();
        (created.job_instance_id, created.step_instance_id)
    }

    fn checkpoint(step: i64, host: i64, task: &str, stored: i64, epoch: i64) -> HostCheckpoint {
        HostCheckpoint {
            step_instance_id: step,
            bk_host_id: host,
            task_id: task.into(),
            agent_id: format!("agent-{host}"),
            received: stored,
            stored,
            dropped_bytes: 0,
            dropped_lines: 0,
            truncated: false,
            started_at: Some(1),
            deadline: Some(10_000),
            epoch,
        }
    }

    /// Everything a holder writes of a host, at `epoch`: its running row, a log chunk at
    /// `offset`, a checkpoint past it and its end with `status`.
    fn holder_writes(step: i64, host: i64, offset: i64, status: i32, epoch: i64) -> Vec<Write> {
        let data = format!("{status}@{epoch} ").into_bytes();
        let stored = offset + data.len() as i64;
        vec![
            Write::HostStatus {
                step_instance_id: step,
                bk_host_id: host,
                status: 7,
                start_time: Some(100 + epoch),
                epoch,
            },
            Write::HostLog {
                step_instance_id: step,
                bk_host_id: host,
                offset,
                data,
                epoch,
            },
            Write::Checkpoints {
                checkpoints: vec![checkpoint(
                    step,
                    host,
                    &format!("task@{epoch}"),
                    stored,
                    epoch,
                )],
                saved: None,
            },
            Write::HostFinished {
                stored: None,
                step_instance_id: step,
                bk_host_id: host,
                outcome: HostOutcome {
                    status,
                    tag: format!("ended at epoch {epoch}"),
                    exit_code: Some(0),
                    end_time: 5_000 + epoch,
                    ..HostOutcome::default()
                },
                epoch,
            },
        ]
    }

    async fn record_all(store: &Store, writes: Vec<Write>) {
        for write in writes {
            store.record(write).await.unwrap();
        }
        store.flush().await.unwrap();
    }

    /// The attack: controller A holds host 1 and stalls with its writes queued; B takes the
    /// host over (its agent claimed the task at B, or B ended it 310 at its deadline) and
    /// records its end; then A's backlog commits. A's running row, log, checkpoint and end
    /// of host 1 are all refused in the same bulk statements that apply its writes of host 2,
    /// which it still holds; B's result stands, and A is told which host it lost.
    #[tokio::test]
    async fn a_stalled_holders_late_writes_do_not_overwrite_the_takers_result() {
        let (_db, store) = crate::test_store().await;
        let (job, step) = running_job(&store).await;
        // A runs both hosts at the first epoch; its first chunk of each lands.
        record_all(
            &store,
            vec![
                Write::HostLog {
                    step_instance_id: step,
                    bk_host_id: 1,
                    offset: 0,
                    data: b"a ".to_vec(),
                    epoch: FIRST_EPOCH,
                },
                Write::HostLog {
                    step_instance_id: step,
                    bk_host_id: 2,
                    offset: 0,
                    data: b"a ".to_vec(),
                    epoch: FIRST_EPOCH,
                },
            ],
        )
        .await;
        // B takes host 1 over and writes its result: at the next epoch.
        let taken = store
            .take_over_handover(job, step, 1, "b", None, &UNFINISHED)
            .await
            .unwrap()
            .expect("B takes host 1 over");
        assert_eq!(taken, FIRST_EPOCH + 1);
        record_all(&store, holder_writes(step, 1, 2, 310, taken)).await;
        assert!(
            tokio::time::timeout(std::time::Duration::from_millis(50), store.fenced_hosts())
                .await
                .is_err(),
            "B's own writes were taken for refused ones"
        );
        // A comes back: its backlog for both hosts commits in one group commit.
        let mut late = holder_writes(step, 1, 2, 9, FIRST_EPOCH);
        late.extend(holder_writes(step, 2, 2, 9, FIRST_EPOCH));
        late.push(Write::HostLog {
            step_instance_id: step,
            bk_host_id: 1,
            offset: 0,
            data: b"A!".to_vec(),
            epoch: FIRST_EPOCH,
        });
        record_all(&store, late).await;

        let results = store.host_results(step).await.unwrap();
        let one = results.iter().find(|r| r.bk_host_id == 1).unwrap();
        assert_eq!(
            (one.status, one.tag.as_str(), one.start_time, one.end_time),
            (310, "ended at epoch 1", Some(101), Some(5_001)),
            "B's result of host 1 stands"
        );
        assert_eq!(store.host_log(step, 1).await.unwrap(), b"a 310@1 ");
        let stored = store.stored_task(step, 1).await.unwrap().unwrap();
        assert_eq!(
            (stored.checkpoint.task_id.as_str(), stored.checkpoint.epoch),
            ("task@1", 1)
        );
        // Host 2 is still A's: its writes in the same statements are applied.
        let two = results.iter().find(|r| r.bk_host_id == 2).unwrap();
        assert_eq!((two.status, two.start_time), (9, Some(100)));
        assert_eq!(store.host_log(step, 2).await.unwrap(), b"a 9@0 ");
        assert_eq!(
            store
                .stored_task(step, 2)
                .await
                .unwrap()
                .unwrap()
                .checkpoint
                .task_id,
            "task@0"
        );
        // A learns which host it lost, so that it stops it.
        let fenced = tokio::time::timeout(std::time::Duration::from_secs(5), store.fenced_hosts())
            .await
            .expect("A is told of its refused writes");
        assert_eq!(fenced, [(step, 1, 1)]);
        assert_eq!(
            store.host_epochs(step).await.unwrap(),
            std::collections::HashMap::from([(1, 1)])
        );
    }

    /// A controller that takes a job up (the lease holder stopped renewing: it died, or only
    /// stalled) takes its hosts' writes with it; hosts handed to a third controller stay that
    /// one's. The stalled holder's late end is refused; the handed host's receiver writes on.
    #[tokio::test]
    async fn a_take_up_fences_out_the_holder_it_took_the_job_from() {
        let (_db, store) = crate::test_store().await;
        let (job, step) = running_job(&store).await;
        store
            .hand_over(job, step, &[(2, "c".into())])
            .await
            .unwrap();
        let handed = store.take_handovers("c").await.unwrap();
        assert_eq!(handed.len(), 1);
        assert_eq!(
            handed[0].epoch,
            FIRST_EPOCH + 1,
            "a handover advances the epoch"
        );
        let jobs = store
            .resumable_jobs_among(Some(&[job]), &[2], &UNFINISHED, 9)
            .await
            .unwrap();
        let hosts = &jobs[0].hosts;
        assert_eq!(
            hosts
                .iter()
                .map(|h| (h.bk_host_id, h.epoch, h.handed_to.is_some()))
                .collect::<Vec<_>>(),
            [(1, FIRST_EPOCH + 1, false), (2, FIRST_EPOCH + 1, true)]
        );
        // The stalled holder's end of host 1, the receiver's of host 2, the taker's of host 1.
        let mut writes = holder_writes(step, 1, 0, 9, FIRST_EPOCH);
        writes.extend(holder_writes(step, 2, 0, 9, handed[0].epoch));
        record_all(&store, writes).await;
        let statuses = store.host_statuses(step, &[1, 2]).await.unwrap();
        assert_eq!(statuses, std::collections::HashMap::from([(1, 7), (2, 9)]));
        record_all(&store, holder_writes(step, 1, 0, 310, hosts[0].epoch)).await;
        let statuses = store.host_statuses(step, &[1, 2]).await.unwrap();
        assert_eq!(
            statuses,
            std::collections::HashMap::from([(1, 310), (2, 9)])
        );
        assert_eq!(
            tokio::time::timeout(std::time::Duration::from_secs(5), store.fenced_hosts())
                .await
                .unwrap(),
            [(step, 1, hosts[0].epoch)]
        );
    }

    /// The end and the checkpoint a stalled holder sends after a take-over are not answered as
    /// stored (the agent would forget the task, the script would go out): the end's `stored`
    /// drops, the checkpoint batch names the refused host. A stale end queued behind the
    /// taker's in the same batch does not win, and the holder is told the epoch the host is at.
    #[tokio::test]
    async fn refused_ends_and_checkpoints_are_not_answered_as_stored() {
        let (_db, store) = crate::test_store().await;
        let (job, step) = running_job(&store).await;
        let taken = store
            .take_over_handover(job, step, 1, "b", None, &UNFINISHED)
            .await
            .unwrap()
            .expect("B takes host 1 over");
        // In one batch: B's end of host 1, then A's stale end of it and A's end of host 2,
        // A's checkpoints of both hosts in one write.
        let ending = |host: i64, status: i32, epoch: i64| {
            let (tx, rx) = tokio::sync::oneshot::channel();
            let write = Write::HostFinished {
                stored: Some(tx),
                step_instance_id: step,
                bk_host_id: host,
                outcome: HostOutcome {
                    status,
                    tag: format!("ended at epoch {epoch}"),
                    end_time: 5_000 + epoch,
                    ..HostOutcome::default()
                },
                epoch,
            };
            (write, rx)
        };
        let (b_one, b_one_stored) = ending(1, 310, taken);
        let (a_one, a_one_stored) = ending(1, 9, FIRST_EPOCH);
        let (a_two, a_two_stored) = ending(2, 9, FIRST_EPOCH);
        let (saved_tx, saved) = tokio::sync::oneshot::channel();
        let checkpoints = Write::Checkpoints {
            checkpoints: vec![
                checkpoint(step, 1, "task@0", 0, FIRST_EPOCH),
                checkpoint(step, 2, "task@0", 0, FIRST_EPOCH),
            ],
            saved: Some(saved_tx),
        };
        record_all(&store, vec![checkpoints, b_one, a_one, a_two]).await;
        assert_eq!(
            saved.await.expect("the batch is answered"),
            [(step, 1)],
            "host 1's checkpoint is refused, host 2's saved"
        );
        assert!(b_one_stored.await.is_ok(), "the taker's end is stored");
        assert!(a_one_stored.await.is_err(), "the stale end is not answered");
        assert!(
            a_two_stored.await.is_ok(),
            "A's end of its own host is stored"
        );
        let statuses = store.host_statuses(step, &[1, 2]).await.unwrap();
        assert_eq!(
            statuses,
            std::collections::HashMap::from([(1, 310), (2, 9)])
        );
        assert_eq!(
            tokio::time::timeout(std::time::Duration::from_secs(5), store.fenced_hosts())
                .await
                .unwrap(),
            [(step, 1, taken)]
        );
    }

    /// On PostgreSQL a log chunk's fence reads a snapshot: an epoch raise that commits while
    /// the chunk's transaction runs must still refuse it. The raise holds the host's row; the
    /// group commit waits for it, then sees the raised epoch and refuses the stale chunk.
    #[tokio::test]
    async fn a_log_chunk_waits_for_an_epoch_raise_under_way_and_is_refused() {
        let (_db, store) = crate::test_store().await;
        if store.dialect != crate::backend::Dialect::Postgres {
            // SQLite runs one writer at a time: the two cannot interleave.
            return;
        }
        let (_, step) = running_job(&store).await;
        let mut raising = store.pool.begin().await.unwrap();
        sqlx::query(
            "UPDATE host_result SET epoch = epoch + 1 WHERE step_instance_id = $1 AND bk_host_id = 1",
        )
        .bind(step)
        .execute(&mut *raising)
        .await
        .unwrap();
        let writer = store.clone();
        let writing = tokio::spawn(async move {
            record_all(
                &writer,
                vec![Write::HostLog {
                    step_instance_id: step,
                    bk_host_id: 1,
                    offset: 0,
                    data: b"stale".to_vec(),
                    epoch: FIRST_EPOCH,
                }],
            )
            .await;
        });
        crate::until_a_lock_is_waited_for(&store, "the group commit waits for the raise").await;
        raising.commit().await.unwrap();
        writing.await.unwrap();
        assert_eq!(store.host_log(step, 1).await.unwrap(), b"");
        assert_eq!(
            tokio::time::timeout(std::time::Duration::from_secs(5), store.fenced_hosts())
                .await
                .unwrap(),
            [(step, 1, FIRST_EPOCH + 1)]
        );
    }
}
