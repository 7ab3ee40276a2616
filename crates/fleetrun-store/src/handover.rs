//! Controllers dispatching each other's jobs (migration 0018): which controller holds each
//! agent's connection (`agent_connection`), the (step, host) tasks the holder of a job's lease
//! hands to the controller its host's agent is connected to (`task_handover`), and terminations
//! asked through any controller (`job_cancel`). Each change other controllers must act on is
//! announced in its transaction (`pg_notify`, the word `c` on the commit channel), so they look
//! at once instead of at their next poll.
//!
//! Liveness is the controller's heartbeat (`controller.heartbeat_at`) against the database's
//! clock ([`Store::database_now_ms`]): a connection or a handover held by a controller that
//! stopped renewing counts for nothing.

use std::collections::HashMap;

use sqlx::Row;

use crate::{Store, StoreError, backend::Dialect};

/// A (step, host) handed to a controller.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Handover {
    pub job_instance_id: i64,
    pub step_instance_id: i64,
    pub bk_host_id: i64,
    /// The controller that dispatches it (or took it up).
    pub controller: String,
    /// Whether that controller dispatched it or took it up.
    pub taken: bool,
    /// When it was handed (the database's clock).
    pub handed_at: i64,
    /// Whether that controller renewed its heartbeat since the `alive_since` asked about.
    pub alive: bool,
    /// The host's epoch ([`crate::fence`]): the one its writer holds it at.
    pub epoch: i64,
}

impl Dialect {
    /// The database's clock in milliseconds since the epoch, as an SQL expression.
    fn now_ms(self) -> &'static str {
        match self {
            Self::Sqlite => "CAST((julianday('now') - 2440587.5) * 86400000.0 AS INTEGER)",
            Self::Postgres => "CAST(EXTRACT(EPOCH FROM clock_timestamp()) * 1000 AS BIGINT)",
        }
    }
}

impl Store {
    /// The database's clock, in milliseconds since the epoch: the one clock every controller
    /// sharing the database reads the same, for heartbeats, leases and handovers.
    pub async fn database_now_ms(&self) -> Result<i64, StoreError> {
        let row = sqlx::query(&format!("SELECT {} AS now", self.dialect.now_ms()))
            .fetch_one(&self.pool)
            .await?;
        Ok(row.get(0))
    }

    /// Announces a change other controllers act on (a handover, a termination, a revocation,
    /// a rule change), and wakes this store's own listener of such news.
    async fn announce_news(&self, tx: &mut sqlx::AnyConnection) -> Result<(), sqlx::Error> {
        if let Some(own) = &self.member_id {
            crate::watch::announce(tx, own, crate::watch::NEWS).await?;
        }
        Ok(())
    }

    /// Announces a revocation or a change of the dangerous-command rules to the other
    /// controllers (committed already: they read it again when told).
    pub async fn announce_cluster_news(&self) -> Result<(), StoreError> {
        let Some(own) = &self.member_id else {
            return Ok(());
        };
        let mut connection = self.pool.acquire().await?;
        crate::watch::announce(&mut connection, own, crate::watch::TRUST_NEWS).await?;
        Ok(())
    }

    /// Announces to the other controllers that an agent's host was registered here (new, or at
    /// new addresses): their inventories, which place the registered hosts, are stale.
    pub async fn announce_host_news(&self) -> Result<(), StoreError> {
        let Some(own) = &self.member_id else {
            return Ok(());
        };
        let mut connection = self.pool.acquire().await?;
        crate::watch::announce(&mut connection, own, crate::watch::HOST_NEWS).await?;
        Ok(())
    }

    /// Returns at news from another controller of a host registered there; a news that comes
    /// while nobody waits is kept for the next wait.
    pub async fn host_news(&self) {
        self.watchers.host_news().notified().await;
    }

    /// Returns at news from another controller of a handover or a termination; a news that
    /// comes while nobody waits is kept for the next wait.
    pub async fn cluster_news(&self) {
        self.watchers.news().notified().await;
    }

    /// Returns at news from another controller of a revocation or a rule change
    /// ([`Store::announce_cluster_news`]); kept for the next wait as [`Store::cluster_news`].
    pub async fn trust_news(&self) {
        self.watchers.trust_news().notified().await;
    }

    /// Records that `controller` holds the agent `agent_id`'s connection of `bk_host_id`, named
    /// `connection` (unique to that connection), replacing any earlier record.
    pub async fn record_agent_connection(
        &self,
        bk_host_id: i64,
        agent_id: &str,
        controller: &str,
        connection: &str,
    ) -> Result<(), StoreError> {
        let result = sqlx::query(&crate::upsert_row(
            "agent_connection",
            &[
                ("bk_host_id", "$1"),
                ("agent_id", "$2"),
                ("controller", "$3"),
                ("connection", "$4"),
                ("connected_at", self.dialect.now_ms()),
            ],
        ))
        .bind(bk_host_id)
        .bind(agent_id)
        .bind(controller)
        .bind(connection)
        .execute(&self.pool)
        .await;
        self.noting_write_failure(result)?;
        Ok(())
    }

    /// Forgets the connection `connection` of `bk_host_id`, if it is still the one recorded (a
    /// newer one, here or on another controller, stays).
    pub async fn forget_agent_connection(
        &self,
        bk_host_id: i64,
        connection: &str,
    ) -> Result<(), StoreError> {
        let result =
            sqlx::query("DELETE FROM agent_connection WHERE bk_host_id = $1 AND connection = $2")
                .bind(bk_host_id)
                .bind(connection)
                .execute(&self.pool)
                .await;
        self.noting_write_failure(result)?;
        Ok(())
    }

    /// Forgets every connection `controller` recorded (at its start: none of them lives).
    pub async fn forget_agent_connections_of(&self, controller: &str) -> Result<(), StoreError> {
        let result = sqlx::query("DELETE FROM agent_connection WHERE controller = $1")
            .bind(controller)
            .execute(&self.pool)
            .await;
        self.noting_write_failure(result)?;
        Ok(())
    }

    /// Of `hosts`, those whose agent is connected to a controller other than `except` that
    /// renewed its heartbeat at or after `alive_since`, with that controller.
    pub async fn connected_elsewhere(
        &self,
        hosts: &[i64],
        except: &str,
        alive_since: i64,
    ) -> Result<HashMap<i64, String>, StoreError> {
        let mut found = HashMap::new();
        for chunk in hosts.chunks(10_000) {
            let ids = crate::Ids::new(self.dialect, "a.bk_host_id", 3, chunk);
            let query = format!(
                "SELECT a.bk_host_id, a.controller FROM agent_connection a
                 JOIN controller c ON c.name = a.controller
                 WHERE a.controller <> $1 AND c.heartbeat_at >= $2 AND {}",
                ids.sql()
            );
            let rows = ids
                .bind(sqlx::query(&query).bind(except).bind(alive_since))
                .fetch_all(&self.pool)
                .await?;
            found.extend(
                rows.iter()
                    .map(|r| (r.get::<i64, _>(0), r.get::<String, _>(1))),
            );
        }
        Ok(found)
    }

    /// The live controller (heartbeat at or after `alive_since`) holding the host's agent's
    /// connection, if any.
    pub async fn connection_holder(
        &self,
        bk_host_id: i64,
        alive_since: i64,
    ) -> Result<Option<String>, StoreError> {
        Ok(sqlx::query(
            "SELECT a.controller FROM agent_connection a
             JOIN controller c ON c.name = a.controller
             WHERE a.bk_host_id = $1 AND c.heartbeat_at >= $2",
        )
        .bind(bk_host_id)
        .bind(alive_since)
        .fetch_optional(&self.pool)
        .await?
        .map(|r| r.get(0)))
    }

    /// Hands the step's `hosts` (each with the controller its agent is connected to) over, to
    /// be dispatched there; a host handed before (an earlier run, a retry) is handed again. One
    /// transaction, announced. Each host's epoch advances (its receiver writes it now); returns
    /// the new epochs.
    pub async fn hand_over(
        &self,
        job_instance_id: i64,
        step_instance_id: i64,
        hosts: &[(i64, String)],
    ) -> Result<HashMap<i64, i64>, StoreError> {
        if hosts.is_empty() {
            return Ok(HashMap::new());
        }
        let handed = async {
            let mut tx = self.pool.begin().await?;
            // Four values a row.
            for chunk in hosts.chunks(self.dialect.max_parameters() / 4) {
                let mut insert = crate::backend::Statement::new(
                    self.dialect,
                    "INSERT INTO task_handover (step_instance_id, bk_host_id, job_instance_id,
                         controller, taken, handed_at)",
                );
                let now = self.dialect.now_ms();
                insert.push_values(chunk.iter(), |row, (bk_host_id, controller)| {
                    row.push_bind(step_instance_id)
                        .push_bind(*bk_host_id)
                        .push_bind(job_instance_id)
                        .push_bind(controller.as_str())
                        .push_sql("0")
                        .push_sql(now);
                });
                insert.push(
                    " ON CONFLICT (step_instance_id, bk_host_id) DO UPDATE SET
                         job_instance_id = excluded.job_instance_id,
                         controller = excluded.controller, taken = 0,
                         handed_at = excluded.handed_at",
                );
                insert.build().execute(&mut *tx).await?;
            }
            // The hosts pass to their receivers, whoever wrote them before (an earlier run).
            let ids: Vec<i64> = hosts.iter().map(|(h, _)| *h).collect();
            let epochs = crate::fence::advance(&mut tx, step_instance_id, &ids).await?;
            self.announce_news(&mut tx).await?;
            tx.commit().await?;
            Ok::<_, sqlx::Error>(epochs)
        }
        .await;
        let epochs = self.noting_write_failure(handed)?;
        self.watchers.news().notify_one();
        Ok(epochs)
    }

    /// Takes the tasks handed to `controller` and not taken yet: one statement, so each is
    /// taken once; each with its host's epoch, read in the same transaction.
    pub async fn take_handovers(&self, controller: &str) -> Result<Vec<Handover>, StoreError> {
        let taken = async {
            let mut tx = self.pool.begin().await?;
            let rows = sqlx::query(
                "UPDATE task_handover SET taken = 1 WHERE controller = $1 AND taken = 0
                 RETURNING job_instance_id, step_instance_id, bk_host_id, handed_at",
            )
            .bind(controller)
            .fetch_all(&mut *tx)
            .await?;
            let mut taken: Vec<Handover> = rows
                .iter()
                .map(|r| Handover {
                    job_instance_id: r.get(0),
                    step_instance_id: r.get(1),
                    bk_host_id: r.get(2),
                    controller: controller.to_owned(),
                    taken: true,
                    handed_at: r.get(3),
                    alive: true,
                    epoch: crate::FIRST_EPOCH,
                })
                .collect();
            let mut by_step: HashMap<i64, Vec<i64>> = HashMap::new();
            for handover in &taken {
                by_step
                    .entry(handover.step_instance_id)
                    .or_default()
                    .push(handover.bk_host_id);
            }
            let mut epochs = HashMap::new();
            for (step, hosts) in by_step {
                epochs.extend(
                    crate::fence::row_epochs(&mut tx, self.dialect, step, &hosts)
                        .await?
                        .into_iter()
                        .map(|(host, epoch)| ((step, host), epoch)),
                );
            }
            for handover in &mut taken {
                if let Some(epoch) = epochs.get(&(handover.step_instance_id, handover.bk_host_id)) {
                    handover.epoch = *epoch;
                }
            }
            tx.commit().await?;
            Ok::<_, sqlx::Error>(taken)
        }
        .await;
        let mut taken = self.noting_write_failure(taken)?;
        taken.sort_by_key(|h| (h.job_instance_id, h.bk_host_id));
        Ok(taken)
    }

    /// The handover of (step, host), if the host was handed over; `alive` against
    /// `alive_since`.
    pub async fn handover(
        &self,
        step_instance_id: i64,
        bk_host_id: i64,
        alive_since: i64,
    ) -> Result<Option<Handover>, StoreError> {
        let row = sqlx::query(
            "SELECT h.job_instance_id, h.controller, h.taken, h.handed_at,
                    COALESCE(c.heartbeat_at, 0), COALESCE(r.epoch, 0)
             FROM task_handover h LEFT JOIN controller c ON c.name = h.controller
             LEFT JOIN host_result r
                 ON r.step_instance_id = h.step_instance_id AND r.bk_host_id = h.bk_host_id
             WHERE h.step_instance_id = $1 AND h.bk_host_id = $2",
        )
        .bind(step_instance_id)
        .bind(bk_host_id)
        .fetch_optional(&self.pool)
        .await?;
        Ok(row.map(|r| Handover {
            job_instance_id: r.get(0),
            step_instance_id,
            bk_host_id,
            controller: r.get(1),
            taken: r.get::<i64, _>(2) != 0,
            handed_at: r.get(3),
            alive: r.get::<i64, _>(4) >= alive_since,
            epoch: r.get(5),
        }))
    }

    /// Makes (step, host) `controller`'s, taken: its agent claimed the task there, or its job's
    /// lease holder redelivers or ends it. Only while the host's status is one of
    /// `unfinished_host_statuses` and the handover is still `from`'s (`None`: the host was
    /// never handed, its lease holder runs it): one conditional statement, so of several
    /// controllers doing so one wins, and none takes a host that ended. The host's epoch
    /// advances with it, so whoever wrote it before is fenced out. Announced; the epoch
    /// `controller` now holds the host at, `None` if not taken.
    pub async fn take_over_handover(
        &self,
        job_instance_id: i64,
        step_instance_id: i64,
        bk_host_id: i64,
        controller: &str,
        from: Option<&str>,
        unfinished_host_statuses: &[i32],
    ) -> Result<Option<i64>, StoreError> {
        if unfinished_host_statuses.is_empty() {
            return Ok(None);
        }
        let now = self.dialect.now_ms();
        let unfinished = format!(
            "EXISTS (SELECT 1 FROM host_result r WHERE r.step_instance_id = $2
                 AND r.bk_host_id = $3 AND r.status IN ({}))",
            crate::join_ints(unfinished_host_statuses)
        );
        let statement = match from {
            Some(_) => format!(
                "UPDATE task_handover SET controller = $1, taken = 1, handed_at = {now}
                 WHERE step_instance_id = $2 AND bk_host_id = $3 AND controller = $4
                   AND {unfinished}"
            ),
            None => format!(
                "INSERT INTO task_handover (controller, step_instance_id, bk_host_id,
                     job_instance_id, taken, handed_at)
                 SELECT $1, $2, $3, $4, 1, {now} WHERE {unfinished}
                 ON CONFLICT (step_instance_id, bk_host_id) DO NOTHING"
            ),
        };
        let moved = async {
            let mut tx = self.pool.begin().await?;
            let query = sqlx::query(&statement)
                .bind(controller)
                .bind(step_instance_id)
                .bind(bk_host_id);
            let moved = match from {
                Some(from) => query.bind(from),
                None => query.bind(job_instance_id),
            }
            .execute(&mut *tx)
            .await?
            .rows_affected()
                == 1;
            if !moved {
                return Ok(None);
            }
            // The epoch rises only while the host is still unfinished, in this statement: on
            // PostgreSQL the check above read a snapshot, and a final status committed since
            // (its writer at the current epoch) must not be fenced out after the fact; the
            // row lock this takes serialises the two. Nothing moved: the transaction rolls back.
            let raised = sqlx::query(&format!(
                "UPDATE host_result SET epoch = epoch + 1
                 WHERE step_instance_id = $1 AND bk_host_id = $2 AND status IN ({})
                 RETURNING epoch",
                crate::join_ints(unfinished_host_statuses)
            ))
            .bind(step_instance_id)
            .bind(bk_host_id)
            .fetch_optional(&mut *tx)
            .await?;
            let Some(raised) = raised else {
                return Ok(None);
            };
            self.announce_news(&mut tx).await?;
            tx.commit().await?;
            Ok::<_, sqlx::Error>(Some(raised.get::<i64, _>(0)))
        }
        .await;
        let epoch = self.noting_write_failure(moved)?;
        if epoch.is_some() {
            self.watchers.news().notify_one();
        }
        Ok(epoch)
    }

    /// Undoes a [`Store::take_over_handover`] by `controller` (which took the host at
    /// `taken_epoch`) whose take-up then failed: the (step, host) goes back to `previous` as it
    /// was (or to no handover), and to the epoch before, if `controller` still holds it.
    /// Nothing was written at `taken_epoch`, so the host's previous writer goes on. Announced.
    pub async fn give_back_handover(
        &self,
        step_instance_id: i64,
        bk_host_id: i64,
        controller: &str,
        previous: Option<&Handover>,
        taken_epoch: i64,
    ) -> Result<(), StoreError> {
        let given = async {
            let mut tx = self.pool.begin().await?;
            sqlx::query(
                "UPDATE host_result SET epoch = $1
                 WHERE step_instance_id = $2 AND bk_host_id = $3 AND epoch = $4
                   AND EXISTS (SELECT 1 FROM task_handover h
                       WHERE h.step_instance_id = $2 AND h.bk_host_id = $3
                         AND h.controller = $5)",
            )
            .bind(taken_epoch - 1)
            .bind(step_instance_id)
            .bind(bk_host_id)
            .bind(taken_epoch)
            .bind(controller)
            .execute(&mut *tx)
            .await?;
            match previous {
                Some(previous) => {
                    sqlx::query(&format!(
                        "UPDATE task_handover SET controller = $1, taken = {taken},
                             handed_at = $2
                         WHERE step_instance_id = $3 AND bk_host_id = $4 AND controller = $5",
                        taken = u8::from(previous.taken)
                    ))
                    .bind(previous.controller.as_str())
                    .bind(previous.handed_at)
                    .bind(step_instance_id)
                    .bind(bk_host_id)
                    .bind(controller)
                    .execute(&mut *tx)
                    .await?;
                }
                None => {
                    sqlx::query(
                        "DELETE FROM task_handover
                         WHERE step_instance_id = $1 AND bk_host_id = $2 AND controller = $3",
                    )
                    .bind(step_instance_id)
                    .bind(bk_host_id)
                    .bind(controller)
                    .execute(&mut *tx)
                    .await?;
                }
            }
            self.announce_news(&mut tx).await?;
            tx.commit().await
        }
        .await;
        self.noting_write_failure(given)?;
        self.watchers.news().notify_one();
        Ok(())
    }

    /// Gives a handed-over (step, host) back to `to`, not taken, if `from` still holds it: its
    /// task was never delivered and `from` stopped renewing. The host's epoch advances, so
    /// `from`, should it only have stalled, is fenced out. Announced.
    pub async fn hand_over_again(
        &self,
        step_instance_id: i64,
        bk_host_id: i64,
        from: &str,
        to: &str,
    ) -> Result<bool, StoreError> {
        let now = self.dialect.now_ms();
        let moved = async {
            let mut tx = self.pool.begin().await?;
            let moved = sqlx::query(&format!(
                "UPDATE task_handover SET controller = $1, taken = 0, handed_at = {now}
                 WHERE step_instance_id = $2 AND bk_host_id = $3 AND controller = $4"
            ))
            .bind(to)
            .bind(step_instance_id)
            .bind(bk_host_id)
            .bind(from)
            .execute(&mut *tx)
            .await?
            .rows_affected()
                == 1;
            if moved {
                crate::fence::advance(&mut tx, step_instance_id, &[bk_host_id]).await?;
                self.announce_news(&mut tx).await?;
            }
            tx.commit().await?;
            Ok::<_, sqlx::Error>(moved)
        }
        .await;
        let moved = self.noting_write_failure(moved)?;
        if moved {
            self.watchers.news().notify_one();
        }
        Ok(moved)
    }

    /// The task ids out on agents (their checkpoints) whose (step, host) is handed to a
    /// controller other than `except` and taken there, among `hosts`: a run following one of
    /// them here has lost it to that controller.
    pub async fn tasks_taken_elsewhere(
        &self,
        hosts: &[i64],
        except: &str,
    ) -> Result<Vec<String>, StoreError> {
        if hosts.is_empty() {
            return Ok(Vec::new());
        }
        let mut found = Vec::new();
        for chunk in hosts.chunks(10_000) {
            let ids = crate::Ids::new(self.dialect, "h.bk_host_id", 2, chunk);
            let query = format!(
                "SELECT t.task_id FROM task_handover h JOIN host_task t
                     ON t.step_instance_id = h.step_instance_id AND t.bk_host_id = h.bk_host_id
                 WHERE h.controller <> $1 AND h.taken = 1 AND {}",
                ids.sql()
            );
            let rows = ids
                .bind(sqlx::query(&query).bind(except))
                .fetch_all(&self.pool)
                .await?;
            found.extend(rows.iter().map(|r| r.get::<String, _>(0)));
        }
        Ok(found)
    }

    /// The statuses of `hosts` in the step.
    pub async fn host_statuses(
        &self,
        step_instance_id: i64,
        hosts: &[i64],
    ) -> Result<HashMap<i64, i32>, StoreError> {
        self.statuses_among(step_instance_id, hosts, "").await
    }

    /// The statuses of those of `hosts` in the step whose status is none of `unfinished`: what
    /// a follower of hosts run elsewhere waits for, without reading again, every time it looks,
    /// the thousands still running.
    pub async fn final_host_statuses(
        &self,
        step_instance_id: i64,
        hosts: &[i64],
        unfinished: &[i32],
    ) -> Result<HashMap<i64, i32>, StoreError> {
        if unfinished.is_empty() {
            return self.host_statuses(step_instance_id, hosts).await;
        }
        let filter = format!(" AND status NOT IN ({})", crate::join_ints(unfinished));
        self.statuses_among(step_instance_id, hosts, &filter).await
    }

    async fn statuses_among(
        &self,
        step_instance_id: i64,
        hosts: &[i64],
        filter: &str,
    ) -> Result<HashMap<i64, i32>, StoreError> {
        let mut found = HashMap::with_capacity(hosts.len());
        for chunk in hosts.chunks(10_000) {
            let ids = crate::Ids::new(self.dialect, "bk_host_id", 2, chunk);
            let query = format!(
                "SELECT bk_host_id, status FROM host_result
                 WHERE step_instance_id = $1 AND {}{filter}",
                ids.sql()
            );
            let rows = ids
                .bind(sqlx::query(&query).bind(step_instance_id))
                .fetch_all(&self.pool)
                .await?;
            found.extend(
                rows.iter()
                    .map(|r| (r.get::<i64, _>(0), r.get::<i32, _>(1))),
            );
        }
        Ok(found)
    }

    /// Every handover of the step, by host; `alive` against `alive_since`.
    pub async fn handovers_of_step(
        &self,
        step_instance_id: i64,
        alive_since: i64,
    ) -> Result<HashMap<i64, Handover>, StoreError> {
        let rows = sqlx::query(
            "SELECT h.job_instance_id, h.bk_host_id, h.controller, h.taken, h.handed_at,
                    COALESCE(c.heartbeat_at, 0), COALESCE(r.epoch, 0)
             FROM task_handover h LEFT JOIN controller c ON c.name = h.controller
             LEFT JOIN host_result r
                 ON r.step_instance_id = h.step_instance_id AND r.bk_host_id = h.bk_host_id
             WHERE h.step_instance_id = $1",
        )
        .bind(step_instance_id)
        .fetch_all(&self.pool)
        .await?;
        Ok(rows
            .iter()
            .map(|r| {
                let bk_host_id: i64 = r.get(1);
                let handover = Handover {
                    job_instance_id: r.get(0),
                    step_instance_id,
                    bk_host_id,
                    controller: r.get(2),
                    taken: r.get::<i64, _>(3) != 0,
                    handed_at: r.get(4),
                    alive: r.get::<i64, _>(5) >= alive_since,
                    epoch: r.get(6),
                };
                (bk_host_id, handover)
            })
            .collect())
    }

    /// Takes up one host's task out on an agent, for a controller its agent claimed it at: its
    /// checkpoint, with the log past it removed (the agent sends it again). `None` unless the
    /// host is in `unfinished_host_statuses` with a task out.
    pub async fn take_up_host(
        &self,
        step_instance_id: i64,
        bk_host_id: i64,
        unfinished_host_statuses: &[i32],
    ) -> Result<Option<crate::HostCheckpoint>, StoreError> {
        let Some(stored) = self.stored_task(step_instance_id, bk_host_id).await? else {
            return Ok(None);
        };
        if !unfinished_host_statuses.contains(&stored.host_status) {
            return Ok(None);
        }
        let result = sqlx::query(
            "DELETE FROM host_log
             WHERE step_instance_id = $1 AND bk_host_id = $2 AND \"offset\" >= $3",
        )
        .bind(step_instance_id)
        .bind(bk_host_id)
        .bind(stored.checkpoint.stored)
        .execute(&self.pool)
        .await;
        self.noting_write_failure(result)?;
        Ok(Some(stored.checkpoint))
    }

    /// Asks every controller running a part of the job to terminate it. Announced.
    pub async fn request_cancel(&self, job_instance_id: i64) -> Result<(), StoreError> {
        let asked = async {
            let mut tx = self.pool.begin().await?;
            sqlx::query(&format!(
                "INSERT INTO job_cancel (job_instance_id, requested_at) VALUES ($1, {})
                 ON CONFLICT (job_instance_id) DO NOTHING",
                self.dialect.now_ms()
            ))
            .bind(job_instance_id)
            .execute(&mut *tx)
            .await?;
            self.announce_news(&mut tx).await?;
            tx.commit().await
        }
        .await;
        self.noting_write_failure(asked)?;
        self.watchers.news().notify_one();
        Ok(())
    }

    /// The jobs whose termination was asked and that have not ended since.
    pub async fn cancel_requests(&self) -> Result<Vec<i64>, StoreError> {
        let rows = sqlx::query("SELECT job_instance_id FROM job_cancel ORDER BY job_instance_id")
            .fetch_all(&self.pool)
            .await?;
        Ok(rows.iter().map(|r| r.get(0)).collect())
    }

    /// Forgets the job's handovers and termination request: its end is committed (or a new run
    /// of it, a retry, starts afresh).
    pub async fn forget_handovers(&self, job_instance_id: i64) -> Result<(), StoreError> {
        let forgotten = async {
            let mut tx = self.pool.begin().await?;
            for table in ["task_handover", "job_cancel"] {
                sqlx::query(&format!("DELETE FROM {table} WHERE job_instance_id = $1"))
                    .bind(job_instance_id)
                    .execute(&mut *tx)
                    .await?;
            }
            tx.commit().await
        }
        .await;
        self.noting_write_failure(forgotten)?;
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    async fn alive(store: &Store, name: &str) -> i64 {
        let now = store.database_now_ms().await.unwrap();
        store
            .register_controller(name, "http://x", "x:1", now)
            .await
            .unwrap();
        now
    }

    #[tokio::test]
    async fn the_database_clock_is_the_epoch_in_milliseconds() {
        let (_db, store) = crate::test_store().await;
        let db = store.database_now_ms().await.unwrap();
        let local = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .unwrap()
            .as_millis() as i64;
        assert!((db - local).abs() < 5_000, "{db} vs {local}");
    }

    #[tokio::test]
    async fn connections_count_only_while_their_controller_lives_and_until_replaced() {
        let (_db, store) = crate::test_store().await;
        let now = alive(&store, "a").await;
        alive(&store, "b").await;
        store
            .register_controller("dead", "http://d", "d:1", now - 60_000)
            .await
            .unwrap();
        store
            .record_agent_connection(1, "ag1", "a", "a-1")
            .await
            .unwrap();
        store
            .record_agent_connection(2, "ag2", "dead", "d-1")
            .await
            .unwrap();
        let since = now - 1_000;
        let found = store
            .connected_elsewhere(&[1, 2, 3], "b", since)
            .await
            .unwrap();
        assert_eq!(found, HashMap::from([(1, "a".to_owned())]));
        assert!(
            store
                .connected_elsewhere(&[1, 2], "a", since)
                .await
                .unwrap()
                .is_empty()
        );
        assert_eq!(
            store.connection_holder(1, since).await.unwrap().as_deref(),
            Some("a")
        );
        assert_eq!(store.connection_holder(2, since).await.unwrap(), None);
        // The agent moves to b: a's late disconnect leaves b's record alone.
        store
            .record_agent_connection(1, "ag1", "b", "b-1")
            .await
            .unwrap();
        store.forget_agent_connection(1, "a-1").await.unwrap();
        assert_eq!(
            store.connection_holder(1, 0).await.unwrap().as_deref(),
            Some("b")
        );
        store.forget_agent_connection(1, "b-1").await.unwrap();
        assert_eq!(store.connection_holder(1, 0).await.unwrap(), None);
        store.forget_agent_connections_of("dead").await.unwrap();
        assert_eq!(store.connection_holder(2, 0).await.unwrap(), None);
    }

    #[tokio::test]
    async fn a_handover_is_taken_once_and_moves_only_from_its_holder() {
        let (_db, store) = crate::test_store().await;
        let now = alive(&store, "b").await;
        alive(&store, "c").await;
        store
            .hand_over(7, 70, &[(1, "b".into()), (2, "b".into()), (3, "c".into())])
            .await
            .unwrap();
        let taken = store.take_handovers("b").await.unwrap();
        assert_eq!(
            taken.iter().map(|h| h.bk_host_id).collect::<Vec<_>>(),
            [1, 2]
        );
        assert!(store.take_handovers("b").await.unwrap().is_empty());
        let one = store.handover(70, 1, now - 1_000).await.unwrap().unwrap();
        assert_eq!(
            (one.controller.as_str(), one.taken, one.alive),
            ("b", true, true)
        );
        assert!(
            !store
                .handover(70, 1, now + 60_000)
                .await
                .unwrap()
                .unwrap()
                .alive
        );
        // Redelivered from b to c: only while b holds it.
        assert!(store.hand_over_again(70, 2, "b", "c").await.unwrap());
        assert!(!store.hand_over_again(70, 2, "b", "c").await.unwrap());
        assert_eq!(
            store
                .take_handovers("c")
                .await
                .unwrap()
                .iter()
                .map(|h| h.bk_host_id)
                .collect::<Vec<_>>(),
            [2, 3]
        );
        // Handed again (a retry): not taken until its controller takes it.
        store.hand_over(7, 70, &[(1, "b".into())]).await.unwrap();
        assert!(!store.handover(70, 1, 0).await.unwrap().unwrap().taken);
        store.request_cancel(7).await.unwrap();
        store.request_cancel(7).await.unwrap();
        assert_eq!(store.cancel_requests().await.unwrap(), [7]);
        store.forget_handovers(7).await.unwrap();
        assert!(store.cancel_requests().await.unwrap().is_empty());
        assert_eq!(store.handover(70, 1, 0).await.unwrap(), None);
    }

    /// A job running on hosts 1 and 2, each with two 3-byte chunks of log and a checkpoint
    /// after the first.
    async fn running_job(store: &Store) -> (i64, i64) {
        use crate::{HostCheckpoint, Write};
        let created = store.create_job(&crate::test_job([1, 2], 7)).await.unwrap();
        let step = created.step_instance_id;
        for bk_host_id in [1, 2] {
            for (offset, data) in [(0, b"abc"), (3, b"def")] {
                store
                    .record(Write::HostLog {
                        step_instance_id: step,
                        bk_host_id,
                        offset,
                        data: data.to_vec(),
                        epoch: crate::FIRST_EPOCH,
                    })
                    .await
                    .unwrap();
            }
        }
        let checkpoints = [1, 2]
            .map(|bk_host_id| HostCheckpoint {
                step_instance_id: step,
                bk_host_id,
                task_id: format!("task-{bk_host_id}"),
                agent_id: format!("agent-{bk_host_id}"),
                received: 3,
                stored: 3,
                dropped_bytes: 0,
                dropped_lines: 0,
                truncated: false,
                started_at: Some(0),
                deadline: Some(10_000),
                epoch: crate::FIRST_EPOCH,
            })
            .to_vec();
        store
            .record(Write::Checkpoints {
                checkpoints,
                saved: None,
            })
            .await
            .unwrap();
        store.flush().await.unwrap();
        (created.job_instance_id, step)
    }

    #[tokio::test]
    async fn a_handed_host_is_left_to_its_controller_by_a_take_up_and_taken_over_alone() {
        let (_db, store) = crate::test_store().await;
        alive(&store, "a").await;
        alive(&store, "b").await;
        let (job, step) = running_job(&store).await;
        // Host 2's agent claimed its task at b.
        assert!(
            store
                .take_over_handover(job, step, 2, "b", None, &[0, 5, 7])
                .await
                .unwrap()
                .is_some()
        );
        assert_eq!(
            store.tasks_taken_elsewhere(&[1, 2], "a").await.unwrap(),
            ["task-2"]
        );
        assert!(
            store
                .tasks_taken_elsewhere(&[1, 2], "b")
                .await
                .unwrap()
                .is_empty()
        );
        // A controller taking the job up cuts back and follows host 1 only; host 2's log is
        // b's to write.
        let jobs = store
            .resumable_jobs_among(Some(&[job]), &[2], &[0, 5, 7], 9)
            .await
            .unwrap();
        let hosts = &jobs[0].hosts;
        assert_eq!(hosts.len(), 2);
        assert!(hosts[0].checkpoint.is_some() && hosts[0].handed_to.is_none());
        assert!(hosts[1].checkpoint.is_none());
        assert_eq!(hosts[1].handed_to.as_deref(), Some("b"));
        assert_eq!(store.host_log(step, 1).await.unwrap(), b"abc");
        assert_eq!(store.host_log(step, 2).await.unwrap(), b"abcdef");
        // b takes host 2 up: its log is cut back to its checkpoint, the others' left alone.
        let checkpoint = store
            .take_up_host(step, 2, &[0, 5, 7])
            .await
            .unwrap()
            .unwrap();
        assert_eq!(
            (checkpoint.task_id.as_str(), checkpoint.stored),
            ("task-2", 3)
        );
        assert_eq!(store.host_log(step, 2).await.unwrap(), b"abc");
        // A finished host is not taken up.
        assert!(
            store
                .take_up_host(step, 2, &[0, 5])
                .await
                .unwrap()
                .is_none()
        );
        assert_eq!(
            store.host_statuses(step, &[1, 2, 3]).await.unwrap(),
            HashMap::from([(1, 7), (2, 7)])
        );
        let of_step = store.handovers_of_step(step, 0).await.unwrap();
        assert_eq!(of_step.len(), 1);
        assert_eq!(of_step[&2].controller, "b");
    }

    #[tokio::test]
    async fn a_host_is_taken_over_only_from_its_expected_holder_and_only_while_unfinished() {
        let (_db, store) = crate::test_store().await;
        alive(&store, "a").await;
        alive(&store, "b").await;
        alive(&store, "c").await;
        let (job, step) = running_job(&store).await;
        let unfinished = [0, 5, 7];
        // Never handed: taken over once, by whichever claim comes first.
        assert!(
            store
                .take_over_handover(job, step, 2, "b", None, &unfinished)
                .await
                .unwrap()
                .is_some()
        );
        assert!(
            store
                .take_over_handover(job, step, 2, "c", None, &unfinished)
                .await
                .unwrap()
                .is_none()
        );
        // From a holder it no longer has: nothing.
        assert!(
            store
                .take_over_handover(job, step, 2, "c", Some("a"), &unfinished)
                .await
                .unwrap()
                .is_none()
        );
        let before = store.handover(step, 2, 0).await.unwrap().unwrap();
        // Each take-over advances the host's epoch: b took it at 1, c at 2.
        assert_eq!(before.epoch, 1);
        let taken_at = store
            .take_over_handover(job, step, 2, "c", Some("b"), &unfinished)
            .await
            .unwrap()
            .expect("c takes the host over from b");
        assert_eq!(taken_at, 2);
        // c's take-up failed: the host goes back to b as it was, and only from c.
        store
            .give_back_handover(step, 2, "a", Some(&before), taken_at)
            .await
            .unwrap();
        assert_eq!(
            store
                .handover(step, 2, 0)
                .await
                .unwrap()
                .unwrap()
                .controller,
            "c"
        );
        store
            .give_back_handover(step, 2, "c", Some(&before), taken_at)
            .await
            .unwrap();
        let after = store.handover(step, 2, 0).await.unwrap().unwrap();
        assert_eq!(
            (
                after.controller.as_str(),
                after.taken,
                after.handed_at,
                after.epoch
            ),
            ("b", before.taken, before.handed_at, before.epoch)
        );
        // A take-over of a host never handed is undone by forgetting it.
        let taken_at = store
            .take_over_handover(job, step, 1, "c", None, &unfinished)
            .await
            .unwrap()
            .expect("c takes host 1 over");
        store
            .give_back_handover(step, 1, "c", None, taken_at)
            .await
            .unwrap();
        assert_eq!(store.handover(step, 1, 0).await.unwrap(), None);
        // A host that ended is taken over by nobody, whoever holds it.
        assert!(
            store
                .take_over_handover(job, step, 2, "c", Some("b"), &[0, 5])
                .await
                .unwrap()
                .is_none()
        );
        assert!(
            store
                .take_over_handover(job, step, 1, "c", None, &[0, 5])
                .await
                .unwrap()
                .is_none()
        );
        assert_eq!(store.handover(step, 1, 0).await.unwrap(), None);
    }

    /// A follower reads the statuses of the hosts it asks about that are final, and no
    /// other: not the running ones, not those of another step, not one it did not ask about.
    #[tokio::test]
    async fn a_follower_reads_only_final_statuses_of_the_hosts_it_asks_about() {
        let (_db, store) = crate::test_store().await;
        let hosts: Vec<i64> = (1..=3_000).collect();
        let job = store
            .create_job(&crate::test_job(hosts.clone(), 7))
            .await
            .unwrap();
        // Another job on the same hosts, every one of them final.
        store
            .create_job(&crate::test_job(hosts.clone(), 9))
            .await
            .unwrap();
        let step = job.step_instance_id;
        // Every third host final (9 or 11), the others running (7).
        sqlx::query(
            "UPDATE host_result SET status = CASE WHEN bk_host_id % 6 = 0 THEN 11 ELSE 9 END
             WHERE step_instance_id = $1 AND bk_host_id % 3 = 0",
        )
        .bind(step)
        .execute(&store.pool)
        .await
        .unwrap();
        let asked: Vec<i64> = hosts.iter().copied().filter(|h| *h != 3).collect();
        let found = store
            .final_host_statuses(step, &asked, &[5, 7])
            .await
            .unwrap();
        let wanted: HashMap<i64, i32> = asked
            .iter()
            .filter(|h| *h % 3 == 0)
            .map(|h| (*h, if h % 6 == 0 { 11 } else { 9 }))
            .collect();
        assert_eq!(found, wanted);
        assert_eq!(
            store.host_statuses(step, &[1, 3]).await.unwrap(),
            HashMap::from([(1, 7), (3, 9)])
        );
    }

    /// On PostgreSQL a take-over's "still unfinished" check reads a snapshot: a final status
    /// committed while it waits for the host's row must not be fenced out after the fact. The
    /// end holds the row; the take-over, having seen the host running, waits for it; once the
    /// end commits, the take-over moves nothing and leaves no handover behind.
    #[tokio::test]
    async fn a_take_over_does_not_fence_out_an_end_that_landed_while_it_waited() {
        let (_db, store) = crate::test_store().await;
        if store.dialect != crate::backend::Dialect::Postgres {
            // SQLite runs one writer at a time: the two cannot interleave.
            return;
        }
        alive(&store, "b").await;
        let (job, step) = running_job(&store).await;
        let mut ending = store.pool.begin().await.unwrap();
        sqlx::query(
            "UPDATE host_result SET status = 9 WHERE step_instance_id = $1 AND bk_host_id = 1",
        )
        .bind(step)
        .execute(&mut *ending)
        .await
        .unwrap();
        let taker = store.clone();
        let taking = tokio::spawn(async move {
            taker
                .take_over_handover(job, step, 1, "b", None, &[0, 5, 7])
                .await
        });
        // Until the take-over waits for the row the end holds.
        crate::until_a_lock_is_waited_for(&store, "the take-over waits for the host's row").await;
        ending.commit().await.unwrap();
        let taken = taking.await.unwrap().unwrap();
        assert_eq!(taken, None, "the host ended: nothing to take over");
        assert!(store.handover(step, 1, 0).await.unwrap().is_none());
        let statuses = store.host_statuses(step, &[1]).await.unwrap();
        assert_eq!(statuses, HashMap::from([(1, 9)]));
        assert!(store.host_epochs(step).await.unwrap().is_empty());
    }
}
