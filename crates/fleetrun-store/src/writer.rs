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
    /// An entry of the audit trail, numbered and chained to the trail's head (hashed with
    /// `hasher`) in the group commit that stores it, under the trail's lock: the trail has no
    /// transactions of its own competing with the job engine's for the database's write lock.
    /// The new head is published once committed ([`crate::Store::committed_audit_head`]).
    Audit {
        entry: crate::NewAuditEntry,
        hasher: crate::SharedAuditHasher,
    },
}

/// The last audit entry this store's writer committed (number and hash); `None` before its
/// first.
pub(crate) type AuditHead = Option<(i64, String)>;

pub(crate) fn spawn(
    pool: AnyPool,
    dialect: Dialect,
    watchers: Watchers,
    health: Arc<HealthState>,
    announce: Option<String>,
    audit_head: tokio::sync::watch::Sender<AuditHead>,
) -> mpsc::Sender<Write> {
    let (tx, rx) = mpsc::channel(QUEUE);
    tokio::spawn(Writer::new(pool, dialect, watchers, health, announce, audit_head, rx).run());
    tx
}

/// Longest time audit entries alone wait for other writes to share their commit
/// ([`Writer::run`]). An entry is in the trail this much later at most, and no later than a
/// flush ([`crate::Store::flush`]) or the writer's close.
const AUDIT_LINGER: Duration = Duration::from_millis(20);
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
/// Commits in a row in which the database refused the front audit entries (other than by a
/// lock wait that timed out) before each is tried alone, and one refused alone is given up.
const AUDIT_TRIES: u32 = 3;
/// Longest wait for the audit trail's lock in a group commit on PostgreSQL, while the
/// transaction holds the rows its job writes changed.
pub(crate) const AUDIT_LOCK_TIMEOUT: &str = "1s";

pub(crate) struct Writer {
    pool: AnyPool,
    /// On SQLite, the connection the group commits go through, kept from one commit to the
    /// next while they succeed. SQLite clears a connection's page cache whenever it starts a
    /// transaction after another connection's commit: commits through whichever pool
    /// connection was free each cleared a cache, where a connection of the writer's own finds its
    /// pages (the tables' last leaves, the indexes) still valid after its own commits.
    /// PostgreSQL has no such cache to keep, and its pool checks a connection before lending it. (In a
    /// mutex only so that `&Writer` is `Send`: the writer alone reaches it, through `&mut`.)
    connection: std::sync::Mutex<Option<sqlx::pool::PoolConnection<sqlx::Any>>>,
    dialect: Dialect,
    watchers: Watchers,
    health: Arc<HealthState>,
    /// Where the audit trail's head is published after a commit that appended to it.
    audit_head: tokio::sync::watch::Sender<AuditHead>,
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
    /// Audit entries at the front of `pending` whose append the database refused in the last
    /// commit while it committed the writes around them.
    deferred_audit: usize,
    /// Commits in a row that refused the front audit entries (lock timeouts excluded).
    audit_tries: u32,
    /// While a batch the database refused as a statement (not as a failing database) is
    /// bisected: the most writes per commit, and how many writes from the front are under it.
    cap: Option<(usize, usize)>,
    /// After a commit that appended to the audit trail failed at `COMMIT` itself (the answer
    /// lost with the connection: it may have been made): how many writes from the front it
    /// held, and the trail's head it would have left.
    uncertain: Option<(usize, (i64, String))>,
    /// On SQLite, the audit trail's head as this writer's last commit left it, so that the next
    /// append need not read it: nothing else appends while the controller runs (`audit rekey`
    /// wants it stopped), and should something have, the append notices
    /// ([`crate::audit::append_in`]). Forgotten after any commit that did not end as planned.
    audit_known: Option<(i64, String)>,
}

/// What a group commit did besides committing its job writes.
#[derive(Debug, Default)]
pub(crate) struct Committed {
    /// The audit trail's new head, when the batch appended to it.
    pub(crate) audit_head: Option<(i64, String)>,
    /// Why the batch's audit entries were not appended (rolled back to their savepoint) while
    /// the rest of the batch was committed.
    pub(crate) audit_refused: Option<sqlx::Error>,
    /// The hosts whose writes the fence refused (another writer took the host over since);
    /// `None` when not known (a commit whose answer was lost, found made afterwards): then no
    /// end or checkpoint of the batch is answered as stored.
    pub(crate) fenced: Option<crate::fence::Refused>,
}

/// Whether the database refused a statement for the data it carries (a NUL in text on
/// PostgreSQL, a violated constraint, a value too large), so that retrying the same statement
/// gets the same answer. Only these named classes count: any other error — a file made
/// unwritable, a server going away, one this list does not know — is retried with every write
/// kept, because giving a write up is only right when the write itself is what is refused.
fn is_refused_statement(error: &sqlx::Error) -> bool {
    crate::health::is_refused_data(error)
}

/// What a write is, for the log when it is given up (never the output it carries).
fn describe(write: &Write) -> String {
    match write {
        Write::HostLog {
            step_instance_id,
            bk_host_id,
            offset,
            data,
            epoch,
        } => format!(
            "HostLog {{ step_instance_id: {step_instance_id}, bk_host_id: {bk_host_id}, \
             offset: {offset}, epoch: {epoch}, bytes: {} }}",
            data.len()
        ),
        Write::Checkpoints { checkpoints, .. } => {
            format!("Checkpoints {{ hosts: {} }}", checkpoints.len())
        }
        other => format!("{other:?}"),
    }
}

impl Writer {
    fn new(
        pool: AnyPool,
        dialect: Dialect,
        watchers: Watchers,
        health: Arc<HealthState>,
        announce: Option<String>,
        audit_head: tokio::sync::watch::Sender<AuditHead>,
        rx: mpsc::Receiver<Write>,
    ) -> Self {
        Self {
            pool,
            connection: std::sync::Mutex::new(None),
            dialect,
            watchers,
            health,
            announce,
            audit_head,
            rx,
            pending: VecDeque::new(),
            pending_bytes: 0,
            accepted: 0,
            flushes: VecDeque::new(),
            dropping: false,
            holed: std::collections::HashSet::new(),
            deferred_audit: 0,
            audit_tries: 0,
            cap: None,
            uncertain: None,
            audit_known: None,
        }
    }

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
                if open && self.only_audit_pending() {
                    // The call an entry records has usually just started a job, whose writes
                    // follow within milliseconds: the entry waits for them a little and shares
                    // their commit, instead of taking one of its own and splitting theirs.
                    tokio::select! {
                        n = self.rx.recv_many(&mut incoming, BATCH) => open = n > 0,
                        () = tokio::time::sleep(AUDIT_LINGER) => {}
                    }
                    self.take(&mut incoming);
                }
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

    /// Whether the backlog holds audit entries and nothing else, and nobody waits for them.
    fn only_audit_pending(&self) -> bool {
        self.flushes.is_empty()
            && !self.pending.is_empty()
            && self
                .pending
                .iter()
                .all(|w| matches!(w, Write::Audit { .. }))
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
                    log_lost_audit(
                        std::slice::from_ref(&write),
                        "the database refused writes for too long",
                    );
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
        log_lost_audit(
            self.pending.make_contiguous(),
            "the database refused writes for too long",
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

    /// Commits up to [`BATCH`] writes from the front of the backlog (and the audit entries
    /// deferred before them), in one transaction. A batch the database refuses as a statement is
    /// bisected until the one write it refuses is found, logged and given up; audit entries it
    /// refuses are kept at the front while the rest commits, and given up one by one after
    /// [`AUDIT_TRIES`].
    async fn commit_front(&mut self) -> Result<(), sqlx::Error> {
        if let Some((n, head)) = self.uncertain.take() {
            match self.in_trail(&head).await {
                Err(error) => {
                    self.uncertain = Some((n, head));
                    return Err(error);
                }
                Ok(true) => {
                    tracing::warn!(
                        seq = head.0,
                        "the commit whose answer was lost had been made: its writes are not made \
                         again (its audit entries would be appended twice)"
                    );
                    let n = n.min(self.pending.len());
                    let committed = Committed {
                        audit_head: Some(head),
                        audit_refused: None,
                        fenced: None,
                    };
                    self.committed(n, committed, None);
                    return Ok(());
                }
                Ok(false) => {}
            }
        }
        let isolating = self.deferred_audit > 0 && self.audit_tries >= AUDIT_TRIES;
        let n = match self.cap {
            Some((cap, _)) => cap,
            None if isolating => 1,
            None => BATCH + self.deferred_audit,
        }
        .min(self.pending.len());
        let batch = &self.pending.make_contiguous()[..n];
        let kept = self.connection.get_mut().unwrap_or_else(|e| e.into_inner());
        let mut connection = match kept.take() {
            Some(connection) => connection,
            None => self.pool.acquire().await?,
        };
        let started = std::time::Instant::now();
        let announcement = self
            .announce
            .as_deref()
            .and_then(|store| Some((store, crate::watch::announcement(batch)?)));
        let mut appending = None;
        let known_head = self.audit_known.take();
        let committed = commit(
            &mut connection,
            batch,
            self.dialect,
            announcement
                .as_ref()
                .map(|(store, text)| (*store, text.as_str())),
            known_head.as_ref(),
            &mut appending,
        )
        .await;
        let took = started.elapsed();
        metrics::histogram!("fleetrun_store_commit_seconds").record(took);
        crate::health::discard_if_broken(&mut connection, &committed);
        // Kept after a commit, or after a statement the database refused (SQLite's worker has
        // rolled the transaction back before it runs anything else). After any other failure
        // the connection goes back to the pool, which rolls back what is open and closes it
        // if it no longer answers, and the next commit takes a fresh one.
        let keep = self.dialect == Dialect::Sqlite
            && match &committed {
                Ok(_) => true,
                Err(error) => is_refused_statement(error),
            };
        if keep {
            *self.connection.get_mut().unwrap_or_else(|e| e.into_inner()) = Some(connection);
        }
        let committed = match committed {
            Ok(committed) => committed,
            Err(error) if is_refused_statement(&error) => {
                self.bisect(n, &error);
                return Ok(());
            }
            Err(error) => {
                self.uncertain = appending.map(|head| (n, head));
                return Err(error);
            }
        };
        if self.dialect == Dialect::Sqlite {
            self.audit_known = match (&committed.audit_head, &committed.audit_refused) {
                (Some(head), _) => Some(head.clone()),
                (None, None) => known_head,
                (None, Some(_)) => None,
            };
        }
        self.committed(n, committed, Some(took));
        Ok(())
    }

    /// Whether the audit trail holds the entry numbered and hashed as `head`.
    async fn in_trail(&self, head: &(i64, String)) -> Result<bool, sqlx::Error> {
        let hash: Option<String> = sqlx::query_scalar("SELECT hash FROM audit_log WHERE seq = $1")
            .bind(head.0)
            .fetch_optional(&self.pool)
            .await?;
        Ok(hash.as_deref() == Some(head.1.as_str()))
    }

    /// Takes the `n` writes at the front as committed (their audit entries as `committed`
    /// says), in `took` when timed.
    fn committed(&mut self, n: usize, committed: Committed, took: Option<Duration>) {
        // The batch was the front entry alone, tried so after `AUDIT_TRIES` refusals.
        let isolating = self.deferred_audit > 0 && self.audit_tries >= AUDIT_TRIES;
        let batch = &self.pending.make_contiguous()[..n];
        if let Some(head) = committed.audit_head {
            if let Some(took) = took {
                metrics::histogram!("fleetrun_audit_append_seconds").record(took);
            }
            for write in batch {
                if let Write::Audit { entry, .. } = write {
                    let outcome = if entry.outcome_code == 0 {
                        "ok"
                    } else {
                        "refused"
                    };
                    metrics::counter!("fleetrun_audit_entries_total", "outcome" => outcome)
                        .increment(1);
                }
            }
            self.audit_head.send_replace(Some(head));
        }
        self.watchers.committed(batch);
        if let Some(fenced) = committed.fenced.as_ref().filter(|f| !f.is_empty()) {
            self.watchers.fenced(fenced.hosts());
        }
        if let Some((cap, left)) = self.cap {
            self.cap = (left > n).then_some((cap, left - n));
        }
        let mut refused_audit = Vec::new();
        for write in self.pending.drain(..n) {
            match write {
                write @ Write::Audit { .. } if committed.audit_refused.is_some() => {
                    refused_audit.push(write);
                }
                write => {
                    self.pending_bytes -= output_bytes(&write);
                    // Not known what the fence refused (the commit's answer was lost): nothing
                    // is answered as stored or saved.
                    let Some(fenced) = &committed.fenced else {
                        continue;
                    };
                    match write {
                        Write::Checkpoints {
                            checkpoints,
                            saved: Some(saved),
                        } => {
                            let lost: Vec<(i64, i64)> = checkpoints
                                .iter()
                                .filter(|c| {
                                    fenced.refuses(c.step_instance_id, c.bk_host_id, c.epoch)
                                })
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
                        } if !fenced.refuses(step_instance_id, bk_host_id, epoch) => {
                            let _ = stored.send(());
                        }
                        _ => {}
                    }
                }
            }
        }
        match committed.audit_refused {
            None => {
                // The deferred entries are the front ones; those the batch held are appended.
                self.deferred_audit = self.deferred_audit.saturating_sub(n);
                if self.deferred_audit == 0 {
                    self.audit_tries = 0;
                }
            }
            Some(error) if crate::health::is_transient(&error) => {
                tracing::warn!(
                    %error,
                    entries = refused_audit.len(),
                    "the audit trail's lock was not granted within {AUDIT_LOCK_TIMEOUT} (another \
                     transaction holds it): the job writes were committed, the audit entries \
                     stay first in line"
                );
                self.defer_audit(refused_audit, n);
            }
            Some(error) if isolating => {
                self.pending_bytes -= refused_audit.iter().map(output_bytes).sum::<usize>();
                log_lost_audit(&refused_audit, &format!("the database refuses it: {error}"));
                self.health.lost(refused_audit.len() as u64);
                self.deferred_audit = self.deferred_audit.saturating_sub(1);
                if self.deferred_audit == 0 {
                    self.audit_tries = 0;
                }
            }
            Some(error) => {
                self.audit_tries += 1;
                tracing::warn!(
                    %error,
                    entries = refused_audit.len(),
                    tries = self.audit_tries,
                    "the database refused the audit entries of a group commit: the job writes \
                     were committed, the audit entries are retried"
                );
                self.defer_audit(refused_audit, n);
            }
        }
        self.publish();
    }

    /// Puts back the audit entries of a batch of `n` writes the database refused, at the front
    /// of the backlog, before the deferred entries the batch did not hold (a bisected batch).
    fn defer_audit(&mut self, entries: Vec<Write>, n: usize) {
        self.deferred_audit = entries.len() + self.deferred_audit.saturating_sub(n);
        for write in entries.into_iter().rev() {
            self.pending.push_front(write);
        }
    }

    /// The database refused the `n` writes at the front as a statement: halve the batch until
    /// the write it refuses is alone, then log it and give it up, so that one bad write cannot
    /// hold back every result behind it.
    fn bisect(&mut self, n: usize, error: &sqlx::Error) {
        let left = self.cap.map_or(n, |(_, left)| left.max(n));
        if n > 1 {
            tracing::warn!(
                %error,
                writes = n,
                "the database refused a group commit's statement: looking for the write it refuses"
            );
            self.cap = Some((n / 2, left));
            return;
        }
        let Some(write) = self.pending.pop_front() else {
            return;
        };
        tracing::error!(
            %error,
            write = %describe(&write),
            "the database refuses this write: it is given up"
        );
        log_lost_audit(
            std::slice::from_ref(&write),
            &format!("the database refuses it: {error}"),
        );
        self.health.lost(1);
        self.pending_bytes -= output_bytes(&write);
        if matches!(write, Write::Audit { .. }) {
            self.deferred_audit = self.deferred_audit.saturating_sub(1);
        }
        if let Write::HostLog {
            step_instance_id,
            bk_host_id,
            ..
        } = write
        {
            self.holed.insert((step_instance_id, bk_host_id));
        }
        // The write it refused is found: what follows goes in whole batches again (a second
        // bad write among it is looked for the same way).
        self.cap = None;
        self.publish();
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
    /// will ever commit it. So do audit entries deferred while the writes around them were
    /// committed (they are older than every other pending write): whoever waits for the job
    /// engine's writes does not wait for the trail's lock, held by another transaction.
    fn answer_flushes(&mut self) {
        let done = self.accepted - (self.pending.len() - self.deferred_audit) as u64;
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

/// Writes the audit entries among `writes`, which will never be committed, to the log in full:
/// the record survives there.
fn log_lost_audit(writes: &[Write], why: &str) {
    for write in writes {
        if let Write::Audit { entry, .. } = write {
            tracing::error!(
                request_id = %entry.request_id.escape_debug(),
                app = %entry.app_code.escape_debug(),
                operator = %entry.operator.escape_debug(),
                source = %entry.source.escape_debug(),
                api = %entry.api.escape_debug(),
                change = %entry.change.escape_debug(),
                outcome = %entry.outcome.escape_debug(),
                outcome_code = entry.outcome_code,
                at = entry.at,
                "audit entry not stored: {why}"
            );
        }
    }
}

/// The memory a pending write holds that counts against [`MAX_PENDING_OUTPUT`]: host output,
/// checkpoints (a batch can hold one per busy host) and audit entries (up to tens of KiB each).
fn output_bytes(write: &Write) -> usize {
    match write {
        Write::Audit { entry, .. } => {
            std::mem::size_of::<crate::NewAuditEntry>()
                + entry.app_code.len()
                + entry.operator.len()
                + entry.source.len()
                + entry.request_id.len()
                + entry.api.len()
                + entry.change.len()
                + entry.outcome.len()
        }
        Write::HostLog { data, .. } => data.len(),
        Write::Checkpoints { checkpoints, .. } => checkpoints
            .iter()
            .map(|c| std::mem::size_of::<HostCheckpoint>() + c.task_id.len() + c.agent_id.len())
            .sum(),
        _ => 0,
    }
}

/// Commits `batch` in one transaction; says whether its audit entries were appended (and the
/// trail's new head) or refused by the database while the rest was committed, and which hosts'
/// writes the fence refused because another writer took the host over since (their epoch is
/// past).
async fn commit(
    connection: &mut sqlx::AnyConnection,
    batch: &[Write],
    dialect: Dialect,
    announcement: Option<(&str, &str)>,
    known_head: Option<&(i64, String)>,
    appending: &mut Option<(i64, String)>,
) -> Result<Committed, sqlx::Error> {
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
    let mut audit = Vec::new();
    let mut step_ends = Vec::new();
    let mut job_ends = Vec::new();
    let mut fence = crate::fence::Check::default();
    let audited = batch.iter().any(|w| matches!(w, Write::Audit { .. }));
    // The audit trail's head is read in this transaction: on SQLite it takes the database's
    // write lock before it reads anything, so the head cannot move before the commit.
    let mut tx = if audited && dialect == Dialect::Sqlite {
        sqlx::Connection::begin_with(connection, "BEGIN IMMEDIATE").await?
    } else {
        sqlx::Connection::begin(connection).await?
    };
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
            } => step_ends.push((*step_instance_id, *status, *at)),
            Write::JobFinished {
                job_instance_id,
                status,
                at,
            } => job_ends.push((*job_instance_id, *status, *at)),
            Write::Checkpoints {
                checkpoints: batch, ..
            } => checkpoints.extend(batch.iter()),
            Write::Audit { entry, hasher } => audit.push((entry, &*hasher.0)),
            Write::Flush(_) => {}
        }
    }
    // Steps' and jobs' ends, many per statement: a group commit carries the ends of every job
    // that finished meanwhile. Applying them after the loop changes nothing: a status change in
    // the same batch (`JobStatus`) only touches rows without an end, and the end overrides it;
    // a job's start comes before its first run's end.
    for (table, id_column, ends) in [
        ("step_instance", "step_instance_id", step_ends),
        ("job_instance", "job_instance_id", job_ends),
    ] {
        write_ends(&mut tx, dialect, table, id_column, ends).await?;
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
    for chunk in bounded_chunks(&logs, dialect.max_parameters() / 5, |w| w.3.len()) {
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
    let refused = fence.refused(&mut tx, dialect).await?;
    if let Some((store, text)) = announcement {
        crate::watch::announce(&mut tx, store, text).await?;
    }
    // Last: on PostgreSQL the trail's lock is then held only for the inserts and the commit.
    // Under a savepoint, with a bounded wait for the lock: entries the database refuses (a
    // lock held elsewhere, bad data) are rolled back alone and the job writes still commit.
    let mut committed = Committed {
        fenced: Some(refused),
        ..Committed::default()
    };
    if !audit.is_empty() {
        // On SQLite one entry needs no savepoint: a one-row statement that is refused has
        // written nothing, and the transaction goes on. (A statement of several rows may keep
        // those before the refused one, under a trigger's `RAISE(FAIL)`.)
        let savepoint = dialect == Dialect::Postgres || audit.len() > 1;
        if savepoint {
            sqlx::query("SAVEPOINT audit").execute(&mut *tx).await?;
        }
        match append_audit(dialect, &mut tx, &audit, known_head).await {
            Ok(head) => committed.audit_head = Some(head),
            Err(error) if is_refused_statement(&error) || crate::health::is_transient(&error) => {
                if savepoint {
                    sqlx::query("ROLLBACK TO SAVEPOINT audit")
                        .execute(&mut *tx)
                        .await?;
                }
                committed.audit_refused = Some(error);
            }
            Err(error) => return Err(error),
        }
    }
    // Should `COMMIT` fail with its answer lost, the writer looks for this head before trying
    // the batch again.
    appending.clone_from(&committed.audit_head);
    tx.commit().await?;
    Ok(committed)
}

/// Data bytes of log chunks per statement. On PostgreSQL they travel as one hex-encoded text
/// array, twice their size, held whole by the server while it reads it: a group commit of 4,096
/// chunks of 64 KiB would be a gigabyte in one value.
const LOG_BYTES_PER_STATEMENT: usize = 16 << 20;

/// `items` cut into runs of at most `rows` items and, past the first item of each, at most
/// [`LOG_BYTES_PER_STATEMENT`] of `size`.
fn bounded_chunks<T>(
    items: &[T],
    rows: usize,
    size: impl Fn(&T) -> usize,
) -> impl Iterator<Item = &[T]> {
    let mut rest = items;
    std::iter::from_fn(move || {
        if rest.is_empty() {
            return None;
        }
        let mut bytes = 0;
        let mut end = 0;
        while end < rest.len() && end < rows {
            bytes += size(&rest[end]);
            if end > 0 && bytes > LOG_BYTES_PER_STATEMENT {
                break;
            }
            end += 1;
        }
        let (chunk, after) = rest.split_at(end);
        rest = after;
        Some(chunk)
    })
}

/// Writes `ends` (id, status, end time) to `table`'s rows by `id_column`: steps' or jobs', many
/// per statement. An id that ends twice in a batch is written once, as its last end left it.
async fn write_ends(
    tx: &mut sqlx::Transaction<'_, sqlx::Any>,
    dialect: Dialect,
    table: &str,
    id_column: &str,
    ends: Vec<(i64, i32, i64)>,
) -> Result<(), sqlx::Error> {
    let ends = last_per_host(
        ends,
        |(id, ..)| *id,
        |_| crate::FIRST_EPOCH,
        |_, _| {},
        |_| {},
    );
    for chunk in ends.chunks(dialect.max_parameters() / 3) {
        let mut update = Statement::new(
            dialect,
            format!("UPDATE {table} SET status = v.column2, end_time = v.column3 FROM ("),
        );
        update.push_values(chunk, |row, (id, status, at)| {
            row.push_bind(*id).push_bind(*status).push_bind(*at);
        });
        update.push(&format!(") AS v WHERE {table}.{id_column} = v.column1"));
        update.build().execute(&mut **tx).await?;
    }
    Ok(())
}

/// Takes the audit trail's lock (waiting at most [`AUDIT_LOCK_TIMEOUT`] on PostgreSQL; the
/// setting ends with the savepoint or the transaction) and appends `audit`.
async fn append_audit(
    dialect: Dialect,
    tx: &mut sqlx::Transaction<'_, sqlx::Any>,
    audit: &[(&crate::NewAuditEntry, &crate::AuditHasher)],
    known_head: Option<&(i64, String)>,
) -> Result<(i64, String), sqlx::Error> {
    if dialect == Dialect::Postgres {
        sqlx::query(&format!("SET LOCAL lock_timeout = '{AUDIT_LOCK_TIMEOUT}'"))
            .execute(&mut **tx)
            .await?;
    }
    crate::audit::lock_audit(dialect, tx).await?;
    crate::audit::append_in(dialect, tx, audit, known_head).await
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
pub(crate) mod tests {
    use crate::{HostCheckpoint, HostOutcome, NewJob, Write};

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

    /// A writer on `store`'s database driven by the test itself: writes are taken with
    /// `accept` and committed with `commit_front`, so what goes in one batch is known.
    #[test]
    fn log_statements_are_bounded_by_rows_and_by_bytes() {
        let mb = 1 << 20;
        let cut = |sizes: &[usize], rows| -> Vec<Vec<usize>> {
            super::bounded_chunks(sizes, rows, |s| *s)
                .map(<[usize]>::to_vec)
                .collect()
        };
        assert!(cut(&[], 3).is_empty());
        assert_eq!(cut(&[1, 2, 3, 4, 5], 2), [vec![1, 2], vec![3, 4], vec![5]]);
        // 16 MiB fit; the next byte starts another statement; one larger item goes alone.
        assert_eq!(
            cut(&[8 * mb, 8 * mb, 1, 20 * mb, 2], 100),
            [vec![8 * mb, 8 * mb], vec![1], vec![20 * mb], vec![2]]
        );
    }

    pub(crate) fn harness(store: &crate::Store) -> super::Writer {
        super::Writer::new(
            store.pool.clone(),
            store.dialect,
            store.watchers.clone(),
            super::HealthState::new(),
            None,
            tokio::sync::watch::Sender::new(None),
            tokio::sync::mpsc::channel(1).1,
        )
    }

    /// Takes `writes` and commits them (and what was taken before), asserting that the
    /// database refused none of the audit entries as a statement (and on SQLite, whose
    /// writers take the database's lock before reading the trail's head, that none waited).
    pub(crate) async fn commit_unrefused(writer: &mut super::Writer, writes: Vec<Write>) {
        for write in writes {
            writer.accept(write);
        }
        while !writer.pending.is_empty() {
            writer.commit_front().await.unwrap();
            assert_eq!(writer.audit_tries, 0, "the database refused audit entries");
            if writer.dialect == crate::Dialect::Sqlite {
                assert_eq!(writer.deferred_audit, 0, "audit entries were deferred");
            }
        }
    }

    /// The audit trail's head `writer` last committed.
    pub(crate) fn committed_head(writer: &super::Writer) -> super::AuditHead {
        writer.audit_head.borrow().clone()
    }

    /// Commits until the backlog is empty; returns how many commits that took.
    async fn drain(writer: &mut super::Writer) -> usize {
        let mut commits = 0;
        while !writer.pending.is_empty() {
            writer.commit_front().await.unwrap();
            commits += 1;
            assert!(commits < 1_000, "the backlog does not drain");
        }
        commits
    }

    /// A log write lost at the bound leaves a hole in the host's stored log: a later checkpoint
    /// of that host, which says the log holds what it lacks, is lost with it, not committed
    /// past the hole; other hosts' checkpoints are kept, and checkpoints count against the
    /// bound on what the backlog holds.
    #[tokio::test]
    async fn a_checkpoint_after_a_lost_log_write_of_its_host_is_not_kept() {
        let (_db, store) = crate::test_store().await;
        let mut writer = harness(&store);
        writer.pending_bytes = super::MAX_PENDING_OUTPUT - 10;
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

    /// A job not started yet, on hosts `1..=hosts`.
    fn new_job(hosts: i64) -> NewJob {
        NewJob {
            status: 1,
            ..crate::test_job(1..=hosts, 5)
        }
    }

    /// Many jobs' starts, status changes and ends in one group commit (ends many per
    /// statement) leave each job and step as its writes in order would: a status change
    /// queued after a job's end does not reopen it, one queued before is overridden by the end,
    /// and of two ends of the same job or step the last stands.
    #[tokio::test]
    async fn jobs_ending_in_one_commit_end_as_their_writes_say() {
        let (_db, store) = crate::test_store().await;
        let mut jobs = Vec::new();
        for _ in 0..300 {
            jobs.push(store.create_job(&new_job(0)).await.unwrap());
        }
        let mut writer = harness(&store);
        for (i, job) in jobs.iter().enumerate() {
            let (job_instance_id, step_instance_id) = (job.job_instance_id, job.step_instance_id);
            let writes = [
                Write::JobStarted {
                    job_instance_id,
                    step_instance_id,
                    status: 2,
                    at: 10,
                },
                Write::JobStatus {
                    job_instance_id,
                    status: 7,
                },
                Write::StepFinished {
                    step_instance_id,
                    status: 4,
                    at: 15,
                },
                Write::JobFinished {
                    job_instance_id,
                    status: 4,
                    at: 15,
                },
                Write::StepFinished {
                    step_instance_id,
                    status: 3,
                    at: 20 + i as i64,
                },
                Write::JobFinished {
                    job_instance_id,
                    status: 3,
                    at: 20 + i as i64,
                },
                Write::JobStatus {
                    job_instance_id,
                    status: 7,
                },
            ];
            for write in writes {
                writer.accept(write);
            }
        }
        assert!(writer.pending.len() <= super::BATCH);
        assert_eq!(drain(&mut writer).await, 1, "one group commit");
        for (i, job) in jobs.iter().enumerate() {
            let record = store.job(job.job_instance_id).await.unwrap().unwrap();
            assert_eq!(
                (record.status, record.end_time),
                (3, Some(20 + i as i64)),
                "job {i}"
            );
            let step = &record.steps[0];
            assert_eq!((step.status, step.end_time), (3, Some(20 + i as i64)));
        }
    }

    fn audit(request_id: &str, change: String) -> Write {
        Write::Audit {
            entry: crate::NewAuditEntry {
                at: 1,
                app_code: "a".into(),
                api: "fast_execute_script".into(),
                request_id: request_id.into(),
                change,
                outcome: "ok".into(),
                ..crate::NewAuditEntry::default()
            },
            hasher: crate::SharedAuditHasher(std::sync::Arc::new(
                |seq: i64, entry: &crate::NewAuditEntry, prev: &str| {
                    format!("{seq}|{}|{prev}", entry.request_id)
                },
            )),
        }
    }

    /// The request ids of the trail's entries in order, once checked to be numbered from 1
    /// without a gap, each chained to the one before it with [`audit`]'s hash.
    async fn chained_ids(store: &crate::Store) -> Vec<String> {
        let records = store
            .audit_entries(&crate::AuditFilter {
                limit: 100,
                ..crate::AuditFilter::default()
            })
            .await
            .unwrap();
        let mut prev = String::new();
        for (i, record) in records.iter().enumerate() {
            assert_eq!(record.seq, i as i64 + 1);
            assert_eq!(record.prev_hash, prev, "entry {}", record.seq);
            assert_eq!(
                record.hash,
                format!("{}|{}|{prev}", record.seq, record.entry.request_id)
            );
            prev = record.hash.clone();
        }
        records.into_iter().map(|r| r.entry.request_id).collect()
    }

    fn finished(job: &crate::CreatedJob, status: i32) -> [Write; 2] {
        [
            Write::StepFinished {
                step_instance_id: job.step_instance_id,
                status,
                at: 20,
            },
            Write::JobFinished {
                job_instance_id: job.job_instance_id,
                status,
                at: 20,
            },
        ]
    }

    /// An audit entry the database refuses (a NUL in its text: PostgreSQL refuses it, SQLite
    /// stores it) does not hold back the job writes of its commit nor the entries after it:
    /// the job ends, the other entries are chained, and on PostgreSQL the refused entry is
    /// tried a few times, then alone, then given up and counted lost.
    #[tokio::test]
    async fn an_audit_entry_the_database_refuses_does_not_stop_job_writes() {
        let (_db, store) = crate::test_store().await;
        let job = store.create_job(&new_job(0)).await.unwrap();
        let mut writer = harness(&store);
        writer.accept(audit("before", "{}".into()));
        writer.accept(audit("nul", "{\"bk_app_code\":\"a\u{0}\"}".into()));
        for write in finished(&job, 3) {
            writer.accept(write);
        }
        writer.accept(audit("after", "{}".into()));
        writer.commit_front().await.unwrap();
        let record = store.job(job.job_instance_id).await.unwrap().unwrap();
        assert_eq!(
            (record.status, record.end_time),
            (3, Some(20)),
            "the job's end is committed by the first commit"
        );
        drain(&mut writer).await;
        let ids = chained_ids(&store).await;
        match store.dialect {
            crate::Dialect::Postgres => {
                assert_eq!(ids, ["before", "after"]);
                assert_eq!(writer.health.get().lost, 1);
            }
            crate::Dialect::Sqlite => {
                assert_eq!(ids, ["before", "nul", "after"]);
                assert_eq!(writer.health.get().lost, 0);
            }
        }
        assert!(writer.health.get().is_writable());
        assert_eq!((writer.deferred_audit, writer.audit_tries), (0, 0));
        assert_eq!(writer.pending_bytes, 0);
    }

    /// On SQLite, a commit's one audit entry goes in without a savepoint, several under one (in
    /// statements of up to 4): either way, an entry the database refuses (here a trigger
    /// refuses it) takes none of the others and none of the job writes with it. The job ends
    /// with the first commit, the entries around the refused one are chained, and the refused
    /// one is given up alone after its tries.
    #[tokio::test]
    async fn sqlite_rolls_back_refused_audit_entries_alone_with_or_without_a_savepoint() {
        for around in [0, 1, 3] {
            let (_db, store) = crate::test_store().await;
            if store.dialect != crate::Dialect::Sqlite {
                return;
            }
            sqlx::query(
                "CREATE TRIGGER refuse_entry BEFORE INSERT ON audit_log \
                 WHEN NEW.request_id = 'refused' BEGIN SELECT RAISE(ABORT, 'refused'); END",
            )
            .execute(&store.pool)
            .await
            .unwrap();
            let job = store.create_job(&new_job(0)).await.unwrap();
            let mut writer = harness(&store);
            let mut expected = Vec::new();
            for i in 0..around {
                expected.push(format!("before {i}"));
                writer.accept(audit(&format!("before {i}"), "{}".into()));
            }
            writer.accept(audit("refused", "{}".into()));
            for write in finished(&job, 3) {
                writer.accept(write);
            }
            for i in 0..around {
                expected.push(format!("after {i}"));
                writer.accept(audit(&format!("after {i}"), "{}".into()));
            }
            writer.commit_front().await.unwrap();
            let record = store.job(job.job_instance_id).await.unwrap().unwrap();
            assert_eq!(
                (record.status, record.end_time),
                (3, Some(20)),
                "{around}: the job's end is committed by the first commit"
            );
            drain(&mut writer).await;
            assert_eq!(
                chained_ids(&store).await,
                expected,
                "{around} entries around the refused one"
            );
            assert_eq!(writer.health.get().lost, 1);
            assert!(writer.health.get().is_writable());
            assert_eq!((writer.deferred_audit, writer.audit_tries), (0, 0));
        }
    }

    /// On SQLite the writer numbers its entries after the head its last commit left, without
    /// reading it; an entry appended meanwhile by someone else (another process on the file, a
    /// key change) is noticed by the taken number, and the writer's entries, one or several
    /// statements' worth, are chained after it instead, none refused.
    #[tokio::test]
    async fn entries_after_an_append_by_someone_else_are_chained_after_it() {
        let (_db, store) = crate::test_store().await;
        let mut writer = harness(&store);
        commit_unrefused(&mut writer, vec![audit("mine 0", "{}".into())]).await;
        let mut expected = vec!["mine 0".to_owned()];
        for (round, count) in [1, 6].into_iter().enumerate() {
            if store.dialect == crate::Dialect::Sqlite {
                assert!(
                    writer.audit_known.is_some(),
                    "the writer numbers after the head it committed"
                );
            }
            let outside = format!("outside {round}");
            let hasher = |seq: i64, entry: &crate::NewAuditEntry, prev: &str| {
                format!("{seq}|{}|{prev}", entry.request_id)
            };
            let entry = crate::NewAuditEntry {
                request_id: outside.clone(),
                ..crate::NewAuditEntry::default()
            };
            store.rekey_audit(&entry, &hasher, "fp", 1).await.unwrap();
            expected.push(outside);
            let mut writes = Vec::new();
            for i in 0..count {
                let id = format!("mine {round}.{i}");
                writes.push(audit(&id, "{}".into()));
                expected.push(id);
            }
            commit_unrefused(&mut writer, writes).await;
        }
        assert_eq!(chained_ids(&store).await, expected);
        let last = store.audit_head().await.unwrap();
        assert_eq!(committed_head(&writer), last);
    }

    /// A job write the database refuses as a statement (PostgreSQL refuses a NUL in a host's
    /// tag) is found by halving the batch and given up alone: the writes around it commit, and
    /// the writer does not retry the same batch forever. SQLite stores it.
    #[tokio::test]
    async fn a_job_write_the_database_refuses_is_isolated() {
        let (_db, store) = crate::test_store().await;
        let job = store.create_job(&new_job(200)).await.unwrap();
        let step = job.step_instance_id;
        let mut writer = harness(&store);
        for id in 1..=200 {
            writer.accept(Write::HostFinished {
                stored: None,
                epoch: crate::FIRST_EPOCH,
                step_instance_id: step,
                bk_host_id: id,
                outcome: HostOutcome {
                    status: 9,
                    tag: if id == 77 {
                        "bad\u{0}".into()
                    } else {
                        "ok".into()
                    },
                    end_time: 10,
                    ..HostOutcome::default()
                },
            });
        }
        for write in finished(&job, 3) {
            writer.accept(write);
        }
        let commits = drain(&mut writer).await;
        assert!(commits <= 20, "{commits} commits");
        let results = store.host_results(step).await.unwrap();
        let postgres = store.dialect == crate::Dialect::Postgres;
        for r in &results {
            let expected = if r.bk_host_id == 77 && postgres { 5 } else { 9 };
            assert_eq!(r.status, expected, "host {}", r.bk_host_id);
        }
        assert_eq!(writer.health.get().lost, u64::from(postgres));
        let record = store.job(job.job_instance_id).await.unwrap().unwrap();
        assert_eq!(record.status, 3);
        assert_eq!(writer.cap, None);
        assert!(writer.health.get().is_writable());
    }

    /// While another transaction holds the audit trail's lock (PostgreSQL: an administrator's
    /// `LOCK TABLE`, a maintenance command), a group commit waits for it at most
    /// `AUDIT_LOCK_TIMEOUT`, commits its job writes, and keeps its audit entries first in line
    /// until the lock is free. An audit entry counts against the backlog's memory bound.
    #[tokio::test]
    async fn a_held_audit_lock_does_not_hold_back_job_writes() {
        let (_db, store) = crate::test_store().await;
        let job = store.create_job(&new_job(0)).await.unwrap();
        let mut writer = harness(&store);
        writer.accept(audit("big", "x".repeat(17 * 1024)));
        assert!(writer.pending_bytes > 17 * 1024, "{}", writer.pending_bytes);
        if store.dialect != crate::Dialect::Postgres {
            return;
        }
        let mut holder = store.pool.begin().await.unwrap();
        sqlx::query("LOCK TABLE audit_log IN EXCLUSIVE MODE")
            .execute(&mut *holder)
            .await
            .unwrap();
        for write in finished(&job, 3) {
            writer.accept(write);
        }
        let started = std::time::Instant::now();
        writer.commit_front().await.unwrap();
        assert!(
            started.elapsed() < std::time::Duration::from_secs(30),
            "{:?}",
            started.elapsed()
        );
        let record = store.job(job.job_instance_id).await.unwrap().unwrap();
        assert_eq!((record.status, record.end_time), (3, Some(20)));
        assert_eq!(writer.pending.len(), 1);
        assert!(matches!(writer.pending.front(), Some(Write::Audit { .. })));
        assert_eq!((writer.deferred_audit, writer.audit_tries), (1, 0));
        assert!(writer.pending_bytes > 17 * 1024);
        // Whoever waits for the job's end is answered meanwhile.
        let (done, flushed) = tokio::sync::oneshot::channel();
        writer.accept(Write::Flush(done));
        writer.answer_flushes();
        flushed.await.unwrap();
        holder.commit().await.unwrap();
        writer.commit_front().await.unwrap();
        assert!(writer.pending.is_empty());
        assert_eq!(writer.pending_bytes, 0);
        assert_eq!(store.audit_head().await.unwrap().map(|h| h.0), Some(1));
    }

    /// A commit whose answer was lost (the connection broke during `COMMIT`) may have been
    /// made: the writer looks for the head it would have left before trying the batch again,
    /// and takes the batch as committed when the trail holds it, rather than append its
    /// entries a second time; when it does not, the batch is committed as usual.
    #[tokio::test]
    async fn a_commit_whose_answer_was_lost_is_not_appended_twice() {
        let (_db, store) = crate::test_store().await;
        let job = store.create_job(&new_job(0)).await.unwrap();
        let mut writer = harness(&store);
        writer.accept(audit("one", "{}".into()));
        writer.accept(audit("two", "{}".into()));
        for write in finished(&job, 3) {
            writer.accept(write);
        }
        // The commit is made, but the writer never hears so.
        let mut appending = None;
        let mut connection = store.pool.acquire().await.unwrap();
        let batch = &writer.pending.make_contiguous()[..4];
        super::commit(
            &mut connection,
            batch,
            store.dialect,
            None,
            None,
            &mut appending,
        )
        .await
        .unwrap();
        drop(connection);
        let head = appending.unwrap();
        assert_eq!(head.0, 2);
        writer.uncertain = Some((4, head.clone()));
        writer.commit_front().await.unwrap();
        assert!(writer.pending.is_empty());
        assert_eq!(writer.uncertain, None);
        assert_eq!(store.audit_head().await.unwrap(), Some(head.clone()));
        assert_eq!(writer.audit_head.borrow().clone(), Some(head));
        // A head the trail does not hold: the batch was not committed, and is now.
        writer.accept(audit("three", "{}".into()));
        writer.uncertain = Some((1, (3, "not committed".into())));
        writer.commit_front().await.unwrap();
        assert!(writer.pending.is_empty());
        let ids: Vec<String> = store
            .audit_entries(&crate::AuditFilter {
                limit: 100,
                ..crate::AuditFilter::default()
            })
            .await
            .unwrap()
            .into_iter()
            .map(|r| r.entry.request_id)
            .collect();
        assert_eq!(ids, ["one", "two", "three"]);
    }

    #[tokio::test]
    async fn running_and_final_rows_land_whatever_the_batches() {
        let (_db, store) = crate::test_store().await;
        let job = store.create_job(&new_job(2_500)).await.unwrap();
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
