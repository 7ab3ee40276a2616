//! The single writer: group-commits the job engine's writes.

use std::{collections::VecDeque, sync::Arc, time::Duration};

use sqlx::AnyPool;
use tokio::sync::{mpsc, oneshot};

use crate::{
    Dialect, HostCheckpoint, HostOutcome, Statement, health::HealthState, watch::Watchers,
};

/// Queue depth before [`crate::Store::record`] makes the engine wait (while the database accepts
/// writes; while it refuses them, the writer keeps taking writes into a bounded backlog). A log write holds at most
/// one 64 KiB chunk, so this bounds the queue's memory to about 512 MiB in the worst case, and
/// the wait carries backpressure through QUIC flow control to the agents.
const QUEUE: usize = 8_192;
/// Most writes committed in one transaction; bounds a transaction's time.
const BATCH: usize = 4_096;

/// One change from the job engine.
#[derive(Debug)]
pub enum Write {
    /// The job and its step began dispatching.
    JobStarted {
        job_instance_id: i64,
        step_instance_id: i64,
        status: i32,
        at: i64,
    },
    /// The job's status changed while it runs (e.g. terminating); steps follow the job.
    JobStatus { job_instance_id: i64, status: i32 },
    /// A host's status changed while its task is under way. Applied only while the host is
    /// still at `epoch` (see [`crate::fence`]), as are its log and its end.
    HostStatus {
        step_instance_id: i64,
        bk_host_id: i64,
        status: i32,
        start_time: Option<i64>,
        epoch: i64,
    },
    /// A piece of a host's log, at `offset` in the stored log.
    HostLog {
        step_instance_id: i64,
        bk_host_id: i64,
        offset: i64,
        data: Vec<u8>,
        epoch: i64,
    },
    /// A host's task ended. `stored` is answered once the end is committed, and dropped
    /// unanswered if it was refused (the host passed to another writer, see [`crate::fence`])
    /// or lost: only an answered end may be acknowledged to the agent that ran the task.
    HostFinished {
        step_instance_id: i64,
        bk_host_id: i64,
        outcome: HostOutcome,
        epoch: i64,
        stored: Option<oneshot::Sender<()>>,
    },
    /// The step reached a final status.
    StepFinished {
        step_instance_id: i64,
        status: i32,
        at: i64,
    },
    /// The job reached a final status.
    JobFinished {
        job_instance_id: i64,
        status: i32,
        at: i64,
    },
    /// Answered once everything queued before it is committed.
    Flush(oneshot::Sender<()>),
    /// Where tasks out on agents that own them stand (`reattach`), upserted in the same group
    /// commit as the log they describe, which was queued before them. `saved` is answered once
    /// they are committed, with the (step, host) pairs whose checkpoints the fence refused
    /// (another writer holds the host now: those were not saved), and dropped unanswered if they
    /// are lost (see [`crate::Health::lost`]), so nobody takes a lost or refused checkpoint for
    /// a saved one.
    Checkpoints {
        checkpoints: Vec<HostCheckpoint>,
        saved: Option<oneshot::Sender<Vec<(i64, i64)>>>,
    },
}

pub(crate) fn spawn(
    pool: AnyPool,
    dialect: Dialect,
    watchers: Watchers,
    health: Arc<HealthState>,
    announce: Option<String>,
) -> mpsc::Sender<Write> {
    let (tx, rx) = mpsc::channel(QUEUE);
    tokio::spawn(
        Writer {
            pool,
            dialect,
            watchers,
            health,
            announce,
            rx,
            pending: VecDeque::new(),
            pending_bytes: 0,
            accepted: 0,
            flushes: VecDeque::new(),
            dropping: false,
            holed: std::collections::HashSet::new(),
        }
        .run(),
    );
    tx
}

/// Writes kept in memory while the database refuses them, at most. Bounds the memory a long
/// outage takes; past it, writes are given up and counted (see [`crate::Health::lost`]).
const MAX_PENDING: usize = 200_000;
/// Bytes of host output kept in memory while the database refuses writes, at most.
const MAX_PENDING_OUTPUT: usize = 256 * 1024 * 1024;
/// How long the writer stays idle before it writes the probe row to learn whether the database
/// still takes writes.
pub(crate) const IDLE_PROBE: Duration = Duration::from_secs(5);
/// Longest wait between two attempts at a failing database.
const MAX_RETRY_DELAY: Duration = Duration::from_secs(5);

struct Writer {
    pool: AnyPool,
    dialect: Dialect,
    watchers: Watchers,
    health: Arc<HealthState>,
    /// With controllers sharing the database, this store's id: each commit is announced to the
    /// others' followers under it.
    announce: Option<String>,
    rx: mpsc::Receiver<Write>,
    /// Accepted writes not committed yet, in order.
    pending: VecDeque<Write>,
    /// Bytes of host output in `pending`.
    pending_bytes: usize,
    /// Writes accepted since the start (flushes and lost writes excluded).
    accepted: u64,
    /// Flush requests, each with the number of writes that must be committed first.
    flushes: VecDeque<(u64, oneshot::Sender<()>)>,
    /// Whether writes are being given up (logged once per run of failures).
    dropping: bool,
    /// Hosts (step, host) one of whose log writes was lost: their stored log has a hole, so
    /// no later checkpoint of theirs is accepted (it would say the log holds what it lacks). A
    /// host leaves the set when its final row is accepted.
    holed: std::collections::HashSet<(i64, i64)>,
}

impl Writer {
    async fn run(mut self) {
        let mut incoming = Vec::with_capacity(BATCH);
        let mut attempt = 0u32;
        let mut open = true;
        while open || !self.pending.is_empty() {
            let failing = !self.health.get().is_writable();
            let mut probe_due = false;
            if !failing && self.pending.is_empty() {
                // Healthy and idle: wait for writes, for news that another path failed, or for
                // the time to check that the database still takes writes (a server that went
                // away shows in readiness without waiting for a job).
                tokio::select! {
                    n = self.rx.recv_many(&mut incoming, BATCH) => open = n > 0,
                    () = self.health.failed_elsewhere.notified() => {}
                    () = tokio::time::sleep(IDLE_PROBE) => probe_due = true,
                }
                self.take(&mut incoming);
            } else if failing {
                // Keep taking writes in while waiting to retry, so that the engine (and through
                // it the agents) does not stall on a broken disk; the backlog is bounded.
                let delay =
                    Duration::from_millis(100 * u64::from(attempt.min(50))).min(MAX_RETRY_DELAY);
                let retry = tokio::time::sleep(delay);
                tokio::pin!(retry);
                while open {
                    tokio::select! {
                        n = self.rx.recv_many(&mut incoming, BATCH) => open = n > 0,
                        () = &mut retry => break,
                    }
                    self.take(&mut incoming);
                }
                if !open && !self.pending.is_empty() {
                    // Nobody can wait for these any more; say what is lost rather than spin.
                    self.give_up_pending();
                    break;
                }
            } else if self.pending.len() < BATCH {
                // Healthy with a backlog: top it up without waiting, then commit.
                while let Ok(write) = self.rx.try_recv() {
                    self.accept(write);
                    if self.pending.len() >= BATCH {
                        break;
                    }
                }
            }
            // Only a write that was made says whether the database takes writes.
            let result = if !self.pending.is_empty() {
                self.commit_front().await
            } else if probe_due || !self.health.get().is_writable() {
                self.probe().await
            } else {
                self.answer_flushes();
                continue;
            };
            match result {
                Ok(()) => {
                    attempt = 0;
                    self.health.succeeded();
                    self.dropping = false;
                }
                Err(error) => {
                    attempt = attempt.saturating_add(1);
                    self.health.failed(&error);
                }
            }
            self.answer_flushes();
        }
    }

    fn take(&mut self, incoming: &mut Vec<Write>) {
        for write in incoming.drain(..) {
            self.accept(write);
        }
    }

    fn accept(&mut self, write: Write) {
        match write {
            Write::Flush(done) => self.flushes.push_back((self.accepted, done)),
            mut write => {
                match &mut write {
                    Write::Checkpoints { checkpoints, .. } if !self.holed.is_empty() => {
                        checkpoints
                            .retain(|c| !self.holed.contains(&(c.step_instance_id, c.bk_host_id)));
                    }
                    Write::HostFinished {
                        step_instance_id,
                        bk_host_id,
                        ..
                    } => {
                        self.holed.remove(&(*step_instance_id, *bk_host_id));
                    }
                    _ => {}
                }
                let bytes = output_bytes(&write);
                if self.pending.len() >= MAX_PENDING
                    || (bytes > 0 && self.pending_bytes + bytes > MAX_PENDING_OUTPUT)
                {
                    if let Write::HostLog {
                        step_instance_id,
                        bk_host_id,
                        ..
                    } = write
                    {
                        self.holed.insert((step_instance_id, bk_host_id));
                    }
                    self.lose(1);
                    return;
                }
                self.pending_bytes += bytes;
                self.pending.push_back(write);
                self.accepted += 1;
                self.publish();
            }
        }
    }

    fn lose(&mut self, writes: u64) {
        if !self.dropping {
            self.dropping = true;
            tracing::error!(
                pending = self.pending.len(),
                pending_output_bytes = self.pending_bytes,
                "the database has refused writes for so long that the results kept in memory \
                 reached their bound: further results are LOST until it accepts writes again"
            );
        }
        self.health.lost(writes);
    }

    fn give_up_pending(&mut self) {
        tracing::error!(
            writes = self.pending.len(),
            output_bytes = self.pending_bytes,
            "the store closed while the database refused writes: these results are LOST"
        );
        self.lose(self.pending.len() as u64);
        self.pending.clear();
        self.pending_bytes = 0;
        self.publish();
    }

    fn publish(&self) {
        self.health
            .set_pending(self.pending.len(), self.pending_bytes);
    }

    /// Commits up to [`BATCH`] writes from the front of the backlog, in one transaction.
    async fn commit_front(&mut self) -> Result<(), sqlx::Error> {
        let n = self.pending.len().min(BATCH);
        let batch = &self.pending.make_contiguous()[..n];
        let mut connection = self.pool.acquire().await?;
        let started = std::time::Instant::now();
        let announcement = self
            .announce
            .as_deref()
            .and_then(|store| Some((store, crate::watch::announcement(batch)?)));
        let committed = commit(
            &mut connection,
            batch,
            self.dialect,
            announcement
                .as_ref()
                .map(|(store, text)| (*store, text.as_str())),
        )
        .await;
        metrics::histogram!("fleetrun_store_commit_seconds").record(started.elapsed());
        crate::health::discard_if_broken(&mut connection, &committed);
        let refused = committed?;
        self.watchers.committed(batch);
        if !refused.is_empty() {
            self.watchers.fenced(refused.hosts());
        }
        for write in self.pending.drain(..n) {
            self.pending_bytes -= output_bytes(&write);
            match write {
                Write::Checkpoints {
                    checkpoints,
                    saved: Some(saved),
                } => {
                    let lost: Vec<(i64, i64)> = checkpoints
                        .iter()
                        .filter(|c| refused.refuses(c.step_instance_id, c.bk_host_id, c.epoch))
                        .map(|c| (c.step_instance_id, c.bk_host_id))
                        .collect();
                    let _ = saved.send(lost);
                }
                Write::HostFinished {
                    step_instance_id,
                    bk_host_id,
                    epoch,
                    stored: Some(stored),
                    ..
                } if !refused.refuses(step_instance_id, bk_host_id, epoch) => {
                    let _ = stored.send(());
                }
                _ => {}
            }
        }
        self.publish();
        Ok(())
    }

    /// Writes the probe row: whether the database accepts writes again.
    async fn probe(&self) -> Result<(), sqlx::Error> {
        let at = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map_or(0, |d| d.as_millis() as i64);
        let mut connection = self.pool.acquire().await?;
        let probed = sqlx::query(
            "INSERT INTO write_probe (id, at) VALUES (1, $1)
             ON CONFLICT (id) DO UPDATE SET at = excluded.at",
        )
        .bind(at)
        .execute(&mut *connection)
        .await
        .map(drop);
        crate::health::discard_if_broken(&mut connection, &probed);
        probed
    }

    /// Answers the flushes whose writes are committed. A lost write counts as done: nothing
    /// will ever commit it.
    fn answer_flushes(&mut self) {
        let done = self.accepted - self.pending.len() as u64;
        while let Some((needed, _)) = self.flushes.front() {
            if *needed > done {
                break;
            }
            if let Some((_, reply)) = self.flushes.pop_front() {
                let _ = reply.send(());
            }
        }
    }
}

/// The memory a pending write holds that counts against [`MAX_PENDING_OUTPUT`]: host output,
/// and checkpoints (a batch can hold one per busy host).
fn output_bytes(write: &Write) -> usize {
    match write {
        Write::HostLog { data, .. } => data.len(),
        Write::Checkpoints { checkpoints, .. } => checkpoints
            .iter()
            .map(|c| std::mem::size_of::<HostCheckpoint>() + c.task_id.len() + c.agent_id.len())
            .sum(),
        _ => 0,
    }
}

/// Commits `batch` in one transaction; returns the hosts whose writes were refused because
/// another writer took the host over since (their epoch is past).
async fn commit(
    connection: &mut sqlx::AnyConnection,
    batch: &[Write],
    dialect: Dialect,
    announcement: Option<(&str, &str)>,
) -> Result<crate::fence::Refused, sqlx::Error> {
    // A host whose task also ended in this batch, at the same epoch or a later one, needs no
    // "running" update: its final row says all. Log chunks go in multi-row inserts. Both matter
    // when thousands of hosts report at once.
    let mut finished: std::collections::HashMap<(i64, i64), i64> = std::collections::HashMap::new();
    for write in batch {
        if let Write::HostFinished {
            step_instance_id,
            bk_host_id,
            epoch,
            ..
        } = write
        {
            let at = finished
                .entry((*step_instance_id, *bk_host_id))
                .or_insert(*epoch);
            *at = (*at).max(*epoch);
        }
    }
    let mut skipped_starts = std::collections::HashMap::new();
    let mut logs = Vec::new();
    let mut running = Vec::new();
    let mut results = Vec::new();
    let mut checkpoints = Vec::new();
    let mut fence = crate::fence::Check::default();
    let mut tx = sqlx::Connection::begin(connection).await?;
    for write in batch {
        match write {
            Write::HostStatus {
                step_instance_id,
                bk_host_id,
                start_time,
                epoch,
                ..
            } if finished
                .get(&(*step_instance_id, *bk_host_id))
                .is_some_and(|ended| ended >= epoch) =>
            {
                if finished[&(*step_instance_id, *bk_host_id)] == *epoch {
                    // Its start time still counts, should the final row not carry one.
                    skipped_starts.insert((*step_instance_id, *bk_host_id), *start_time);
                } else {
                    // Written before the host passed on: refused, as its statement would.
                    fence.passed_over(*step_instance_id, *bk_host_id, *epoch);
                }
            }
            Write::HostLog {
                step_instance_id,
                bk_host_id,
                offset,
                data,
                epoch,
            } => logs.push((
                *step_instance_id,
                *bk_host_id,
                *offset,
                data.as_slice(),
                *epoch,
            )),
            Write::JobStarted {
                job_instance_id,
                step_instance_id,
                status,
                at,
            } => {
                sqlx::query(
                    "UPDATE job_instance SET status = $1, start_time = $2 WHERE job_instance_id = $3",
                )
                .bind(status)
                .bind(at)
                .bind(job_instance_id)
                .execute(&mut *tx)
                .await?;
                sqlx::query(
                    "UPDATE step_instance SET status = $1, start_time = $2, execute_count = execute_count + 1
                     WHERE step_instance_id = $3",
                )
                .bind(status)
                .bind(at)
                .bind(step_instance_id)
                .execute(&mut *tx)
                .await?;
            }
            Write::JobStatus {
                job_instance_id,
                status,
            } => {
                sqlx::query("UPDATE job_instance SET status = $1 WHERE job_instance_id = $2 AND end_time IS NULL")
                    .bind(status)
                    .bind(job_instance_id)
                    .execute(&mut *tx)
                    .await?;
                sqlx::query("UPDATE step_instance SET status = $1 WHERE job_instance_id = $2 AND end_time IS NULL")
                    .bind(status)
                    .bind(job_instance_id)
                    .execute(&mut *tx)
                    .await?;
            }
            Write::HostStatus {
                step_instance_id,
                bk_host_id,
                status,
                start_time,
                epoch,
            } => running.push((*step_instance_id, *bk_host_id, *status, *start_time, *epoch)),
            Write::HostFinished {
                step_instance_id,
                bk_host_id,
                outcome,
                epoch,
                ..
            } => results.push((*step_instance_id, *bk_host_id, outcome, *epoch)),
            Write::StepFinished {
                step_instance_id,
                status,
                at,
            } => {
                sqlx::query(
                    "UPDATE step_instance SET status = $1, end_time = $2 WHERE step_instance_id = $3",
                )
                .bind(status)
                .bind(at)
                .bind(step_instance_id)
                .execute(&mut *tx)
                .await?;
            }
            Write::JobFinished {
                job_instance_id,
                status,
                at,
            } => {
                sqlx::query(
                    "UPDATE job_instance SET status = $1, end_time = $2 WHERE job_instance_id = $3",
                )
                .bind(status)
                .bind(at)
                .bind(job_instance_id)
                .execute(&mut *tx)
                .await?;
            }
            Write::Checkpoints {
                checkpoints: batch, ..
            } => checkpoints.extend(batch.iter()),
            Write::Flush(_) => {}
        }
    }
    // "Running" host rows, then final ones, many per statement. Applying them after the loop
    // changes nothing: nothing else in a batch writes these rows, and a host's "running" update
    // was skipped above when its final one is in the same batch. A host that appears twice
    // appears once, as its writes in order would have left it: a statement that changes one
    // row twice is refused by PostgreSQL and undefined in SQLite. Each statement applies a row
    // only while its host is at the epoch the write carries (the fence is part of the bulk
    // statement); a statement that applied fewer rows than it carried has the refused ones
    // looked up once, at the end. Of a host's writes at several epochs (a stale one queued
    // behind the take-over's), those at the highest stand; the others are refused.
    let running = last_per_host(
        running,
        |(step, host, ..)| (*step, *host),
        |w| w.4,
        |earlier, later| {
            later.3 = later.3.or(earlier.3);
        },
        |(step, host, .., epoch)| fence.passed_over(*step, *host, *epoch),
    );
    let results = last_per_host(
        results,
        |(step, host, ..)| (*step, *host),
        |w| w.3,
        |_, _| {},
        |(step, host, _, epoch)| fence.passed_over(*step, *host, *epoch),
    );
    let logs = last_per_host(
        logs,
        |(step, host, offset, ..)| (*step, *host, *offset),
        |w| w.4,
        |_, _| {},
        |(step, host, .., epoch)| fence.passed_over(*step, *host, *epoch),
    );
    for chunk in running.chunks(dialect.max_parameters() / 5) {
        let mut update = Statement::new(
            dialect,
            "UPDATE host_result SET status = v.column3,
                 start_time = COALESCE(v.column4, host_result.start_time)
             FROM (",
        );
        update.push_values(chunk, |row, (step, host, status, start_time, epoch)| {
            row.push_bind(*step)
                .push_bind(*host)
                .push_bind(*status)
                .push_bind(*start_time)
                .push_bind(*epoch);
        });
        update.push(
            ") AS v WHERE host_result.step_instance_id = v.column1 AND host_result.bk_host_id = v.column2
                 AND host_result.epoch = v.column5",
        );
        let applied = update.build().execute(&mut *tx).await?.rows_affected();
        fence.carried(chunk.iter().map(|w| (w.0, w.1, w.4)), applied);
    }
    for chunk in results.chunks(dialect.max_parameters() / 13) {
        let mut update = Statement::new(
            dialect,
            "UPDATE host_result SET status = v.column3, tag = v.column4, exit_code = v.column5,
                 error_code = v.column6, start_time = COALESCE(v.column7, host_result.start_time),
                 end_time = v.column8, output_bytes = v.column9, dropped_bytes = v.column10,
                 dropped_lines = v.column11, survivors = v.column12
             FROM (",
        );
        update.push_values(chunk, |row, (step, host, o, epoch)| {
            row.push_bind(*step)
                .push_bind(*host)
                .push_bind(o.status)
                .push_bind(o.tag.as_str())
                .push_bind(o.exit_code)
                .push_bind(o.error_code)
                .push_bind(
                    o.start_time
                        .or_else(|| skipped_starts.get(&(*step, *host)).copied().flatten()),
                )
                .push_bind(o.end_time)
                .push_bind(o.output_bytes)
                .push_bind(o.dropped_bytes)
                .push_bind(o.dropped_lines)
                .push_bind(o.survivors)
                .push_bind(*epoch);
        });
        update.push(
            ") AS v WHERE host_result.step_instance_id = v.column1 AND host_result.bk_host_id = v.column2
                 AND host_result.epoch = v.column13",
        );
        let applied = update.build().execute(&mut *tx).await?.rows_affected();
        fence.carried(chunk.iter().map(|w| (w.0, w.1, w.3)), applied);
    }
    let checkpoints = last_per_host(
        checkpoints,
        |c| (c.step_instance_id, c.bk_host_id),
        |c| c.epoch,
        |_, _| {},
        |c| fence.passed_over(c.step_instance_id, c.bk_host_id, c.epoch),
    );
    // A host whose "running" or final row this batch updated is locked already (or its new
    // epoch is committed, and the inserts read it): only the others need the share lock.
    let updated: std::collections::HashSet<(i64, i64)> = running
        .iter()
        .map(|w| (w.0, w.1))
        .chain(results.iter().map(|w| (w.0, w.1)))
        .collect();
    crate::fence::lock_hosts(
        &mut tx,
        dialect,
        logs.iter()
            .map(|(step, host, ..)| (*step, *host))
            .chain(
                checkpoints
                    .iter()
                    .map(|c| (c.step_instance_id, c.bk_host_id)),
            )
            .filter(|pair| !updated.contains(pair)),
    )
    .await?;
    for chunk in logs.chunks(dialect.max_parameters() / 5) {
        // A chunk is refused when its host's row has another epoch; a chunk of a host without
        // a row (no job holds it) is not fenced.
        let mut insert = Statement::new(
            dialect,
            "INSERT INTO host_log (step_instance_id, bk_host_id, \"offset\", data)
             SELECT v.column1, v.column2, v.column3, v.column4 FROM (",
        );
        insert.push_values(chunk, |row, (step, host, offset, data, epoch)| {
            row.push_bind(*step)
                .push_bind(*host)
                .push_bind(*offset)
                .push_bind(*data)
                .push_bind(*epoch);
        });
        insert.push(") AS v WHERE ");
        insert.push(&crate::fence::not_fenced_out("column5"));
        insert.push(
            " ON CONFLICT (step_instance_id, bk_host_id, \"offset\") DO UPDATE SET data = excluded.data",
        );
        let applied = insert.build().execute(&mut *tx).await?.rows_affected();
        fence.carried(chunk.iter().map(|w| (w.0, w.1, w.4)), applied);
    }
    for chunk in checkpoints.chunks(dialect.max_parameters() / 12) {
        let applied = crate::reattach::upsert_checkpoints(&mut tx, dialect, chunk).await?;
        fence.carried(
            chunk
                .iter()
                .map(|c| (c.step_instance_id, c.bk_host_id, c.epoch)),
            applied,
        );
    }
    let refused = fence.refused(&mut tx).await?;
    if let Some((store, text)) = announcement {
        crate::watch::announce(&mut tx, store, text).await?;
    }
    tx.commit().await?;
    Ok(refused)
}

/// `items` with one item per key, where the last one at the highest epoch stands and
/// `merge(earlier, later)` carries into it what an earlier one at that epoch said that it does
/// not; in the order the keys first appeared. Items at a lower epoch than another of their key
/// go to `passed_over`: the fence refuses them.
fn last_per_host<T, K: std::hash::Hash + Eq>(
    items: Vec<T>,
    key: impl Fn(&T) -> K,
    epoch: impl Fn(&T) -> i64,
    merge: impl Fn(&T, &mut T),
    mut passed_over: impl FnMut(&T),
) -> Vec<T> {
    let mut at: std::collections::HashMap<K, usize> = std::collections::HashMap::new();
    let mut kept: Vec<T> = Vec::with_capacity(items.len());
    for mut item in items {
        match at.entry(key(&item)) {
            std::collections::hash_map::Entry::Occupied(slot) => {
                let earlier = &mut kept[*slot.get()];
                match epoch(earlier).cmp(&epoch(&item)) {
                    std::cmp::Ordering::Greater => passed_over(&item),
                    std::cmp::Ordering::Less => {
                        passed_over(earlier);
                        *earlier = item;
                    }
                    std::cmp::Ordering::Equal => {
                        merge(earlier, &mut item);
                        *earlier = item;
                    }
                }
            }
            std::collections::hash_map::Entry::Vacant(slot) => {
                slot.insert(kept.len());
                kept.push(item);
            }
        }
    }
    kept
}

#[cfg(test)]
mod tests {
    use crate::{HostCheckpoint, HostOutcome, NewHostResult, NewJob, NewStep, Write};

    fn checkpoint(bk_host_id: i64, received: i64) -> HostCheckpoint {
        HostCheckpoint {
            epoch: crate::FIRST_EPOCH,
            step_instance_id: 7,
            bk_host_id,
            task_id: "t".into(),
            agent_id: "a".into(),
            received,
            stored: received,
            dropped_bytes: 0,
            dropped_lines: 0,
            truncated: false,
            started_at: None,
            deadline: None,
        }
    }

    /// A log write lost at the bound leaves a hole in the host's stored log: a later checkpoint
    /// of that host, which says the log holds what it lacks, is lost with it, not committed
    /// past the hole; other hosts' checkpoints are kept, and checkpoints count against the
    /// bound on what the backlog holds.
    #[tokio::test]
    async fn a_checkpoint_after_a_lost_log_write_of_its_host_is_not_kept() {
        let (_db, store) = crate::test_store().await;
        let mut writer = super::Writer {
            pool: store.pool.clone(),
            dialect: store.dialect,
            watchers: store.watchers.clone(),
            health: super::HealthState::new(),
            rx: tokio::sync::mpsc::channel(1).1,
            pending: std::collections::VecDeque::new(),
            pending_bytes: super::MAX_PENDING_OUTPUT - 10,
            accepted: 0,
            flushes: std::collections::VecDeque::new(),
            dropping: false,
            holed: std::collections::HashSet::new(),
            announce: None,
        };
        writer.accept(Write::HostLog {
            epoch: crate::FIRST_EPOCH,
            step_instance_id: 7,
            bk_host_id: 1,
            offset: 0,
            data: vec![b'x'; 64],
        });
        assert_eq!(writer.health.get().lost, 1);
        // Room again (the backlog drained), as when the database came back.
        writer.pending_bytes = 0;
        writer.accept(Write::Checkpoints {
            checkpoints: vec![checkpoint(1, 64), checkpoint(2, 10)],
            saved: None,
        });
        let kept = match writer.pending.back() {
            Some(Write::Checkpoints { checkpoints, .. }) => checkpoints.clone(),
            other => panic!("{other:?}"),
        };
        assert_eq!(kept, vec![checkpoint(2, 10)]);
        assert!(
            writer.pending_bytes > 0,
            "checkpoints count against the bound"
        );
        // Its task ended: the host's final row stands, and its hole no longer matters.
        writer.accept(Write::HostFinished {
            stored: None,
            epoch: crate::FIRST_EPOCH,
            step_instance_id: 7,
            bk_host_id: 1,
            outcome: HostOutcome::default(),
        });
        assert!(writer.holed.is_empty());
    }

    #[tokio::test]
    async fn running_and_final_rows_land_whatever_the_batches() {
        let (_db, store) = crate::test_store().await;
        let hosts: Vec<NewHostResult> = (1..=2_500)
            .map(|id| NewHostResult {
                bk_host_id: id,
                bk_cloud_id: 0,
                ip: format!("10.0.{}.{}", id / 256, id % 256),
                status: 5,
            })
            .collect();
        let job = store
            .create_job(&NewJob {
                name: "t".into(),
                operator: "o".into(),
                app_code: "a".into(),
                bk_scope_type: "biz".into(),
                bk_scope_id: "2".into(),
                status: 1,
                job_type: 1,
                launch_mode: 1,
                callback_url: None,
                create_time: 0,
                step: NewStep {
                    name: "s".into(),
                    step_type: 1,
                    script_language: 1,
                    script_content: b"true".to_vec(),
                    script_param: String::new(),
                    is_param_sensitive: false,
                    timeout: 60,
                    account_id: 1,
                    account: "root".into(),
                },
                hosts,
            })
            .await
            .unwrap();
        let step = job.step_instance_id;
        // Every host but the last starts; even ones also finish, some in the same batch as
        // their start, some in a later one.
        for id in 1..2_500 {
            store
                .record(Write::HostStatus {
                    epoch: crate::FIRST_EPOCH,
                    step_instance_id: step,
                    bk_host_id: id,
                    status: 7,
                    start_time: Some(100 + id),
                })
                .await
                .unwrap();
            if id % 2 == 0 {
                if id % 4 == 0 {
                    store.flush().await.unwrap();
                }
                store
                    .record(Write::HostFinished {
                        stored: None,
                        epoch: crate::FIRST_EPOCH,
                        step_instance_id: step,
                        bk_host_id: id,
                        outcome: HostOutcome {
                            status: 9,
                            end_time: 5_000,
                            exit_code: Some(0),
                            ..HostOutcome::default()
                        },
                    })
                    .await
                    .unwrap();
            }
        }
        store.flush().await.unwrap();
        let results = store.host_results(step).await.unwrap();
        assert_eq!(results.len(), 2_500);
        for r in results {
            let (status, start) = match r.bk_host_id {
                2_500 => (5, None),
                id if id % 2 == 0 => (9, Some(100 + id)),
                id => (7, Some(100 + id)),
            };
            assert_eq!(
                (r.status, r.start_time),
                (status, start),
                "host {}",
                r.bk_host_id
            );
        }
    }
}
