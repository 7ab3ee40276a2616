//! Job callbacks: the queue of deliveries and the record of every attempt.
//!
//! A delivery is queued once per job, after the job's end is committed, and keeps the exact body
//! that is sent. Because the queue lives here, a restarted controller resumes whatever was still
//! pending; and because queueing reads the committed job, a job whose end was committed but whose
//! delivery was not (a crash in between) is found again by [`Store::unqueued_callbacks`].

use sqlx::{Row, any::AnyRow};

use crate::{JobRecord, Store, StoreError};

/// Where a delivery stands.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum CallbackStatus {
    /// Not delivered yet; another attempt is due at `next_attempt_at`.
    Pending,
    /// An attempt got a 2xx answer.
    Delivered,
    /// Every allowed attempt failed.
    Failed,
}

impl CallbackStatus {
    pub fn as_str(self) -> &'static str {
        match self {
            Self::Pending => "pending",
            Self::Delivered => "delivered",
            Self::Failed => "failed",
        }
    }

    fn parse(text: &str) -> Self {
        match text {
            "delivered" => Self::Delivered,
            "failed" => Self::Failed,
            _ => Self::Pending,
        }
    }
}

/// A delivery to queue for an ended job.
#[derive(Debug, Clone)]
pub struct NewCallbackDelivery {
    pub job_instance_id: i64,
    pub url: String,
    /// The JSON body, sent byte for byte on every attempt.
    pub body: String,
    /// When it is queued; the first attempt is due at once.
    pub now: i64,
    /// The job's end time and status the body describes: queued only while the job still
    /// shows them (a retry committed since the job was read makes the body stale, and the
    /// retried run's end is queued instead).
    pub end_time: i64,
    pub status: i32,
}

/// A queued delivery, with the app that submitted its job (whose secret signs it).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct CallbackDelivery {
    pub id: i64,
    pub job_instance_id: i64,
    pub app_code: String,
    pub url: String,
    pub body: String,
    pub status: CallbackStatus,
    /// Attempts made so far.
    pub attempts: i64,
    pub next_attempt_at: i64,
    pub last_error: Option<String>,
    pub created_at: i64,
    pub updated_at: i64,
}

impl CallbackDelivery {
    fn from_row(row: &AnyRow) -> Self {
        Self {
            id: row.get("id"),
            job_instance_id: row.get("job_instance_id"),
            app_code: row.get("app_code"),
            url: row.get("url"),
            body: row.get("body"),
            status: CallbackStatus::parse(row.get("status")),
            attempts: row.get("attempts"),
            next_attempt_at: row.get("next_attempt_at"),
            last_error: row.get("last_error"),
            created_at: row.get("created_at"),
            updated_at: row.get("updated_at"),
        }
    }
}

/// One attempt at a delivery: the HTTP status it got, or the error that left it without one.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct CallbackAttempt {
    pub delivery_id: i64,
    /// 1 for the first attempt.
    pub attempt: i64,
    /// When it started, Unix ms.
    pub at: i64,
    pub http_status: Option<i32>,
    pub error: Option<String>,
    pub duration_ms: i64,
}

impl CallbackAttempt {
    fn from_row(row: &AnyRow) -> Self {
        Self {
            delivery_id: row.get("delivery_id"),
            attempt: row.get("attempt"),
            at: row.get("at"),
            http_status: row.get("http_status"),
            error: row.get("error"),
            duration_ms: row.get("duration_ms"),
        }
    }
}

/// What follows an attempt.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum CallbackNext {
    Delivered,
    /// Try again at this time (Unix ms).
    RetryAt(i64),
    /// No attempts left.
    Failed,
}

/// Deliveries joined with their job's app.
const DELIVERY_SELECT: &str = "SELECT d.*, j.app_code FROM callback_delivery d
     JOIN job_instance j ON j.job_instance_id = d.job_instance_id";

/// Most ids in one `IN (…)` list, well under SQLite's limits.
const IDS_PER_QUERY: usize = 500;

impl Store {
    /// Ended jobs that asked for a callback but have no delivery queued: among `job_ids`, or
    /// among all jobs when `None` (at start, to recover from a crash between a job's end and its
    /// delivery being queued).
    pub async fn unqueued_callbacks(
        &self,
        job_ids: Option<&[i64]>,
    ) -> Result<Vec<JobRecord>, StoreError> {
        const UNQUEUED: &str = "SELECT job_instance_id FROM job_instance j
             WHERE callback_url IS NOT NULL AND end_time IS NOT NULL
               AND NOT EXISTS (SELECT 1 FROM callback_delivery d WHERE d.job_instance_id = j.job_instance_id)";
        let mut ids: Vec<i64> = Vec::new();
        match job_ids {
            None => {
                let rows = sqlx::query(&format!("{UNQUEUED} ORDER BY job_instance_id"))
                    .fetch_all(&self.pool)
                    .await?;
                ids.extend(rows.iter().map(|r| r.get::<i64, _>(0)));
            }
            Some(job_ids) => {
                for chunk in job_ids.chunks(IDS_PER_QUERY) {
                    let rows = sqlx::query(&format!(
                        "{UNQUEUED} AND job_instance_id IN ({}) ORDER BY job_instance_id",
                        crate::join_ids(chunk)
                    ))
                    .persistent(false)
                    .fetch_all(&self.pool)
                    .await?;
                    ids.extend(rows.iter().map(|r| r.get::<i64, _>(0)));
                }
            }
        }
        let mut jobs = Vec::with_capacity(ids.len());
        for id in ids {
            if let Some(job) = self.job(id).await? {
                jobs.push(job);
            }
        }
        Ok(jobs)
    }

    /// Queues deliveries in one transaction; a job that already has one keeps it, and one whose
    /// job no longer shows the end it describes is left out. Returns how many were queued.
    pub async fn queue_callbacks(
        &self,
        deliveries: &[NewCallbackDelivery],
    ) -> Result<u64, StoreError> {
        let mut tx = self.pool.begin().await?;
        let mut queued = 0;
        for d in deliveries {
            queued += sqlx::query(
                "INSERT INTO callback_delivery (job_instance_id, url, body, status, attempts, next_attempt_at, created_at, updated_at)
                 SELECT $1, $2, $3, 'pending', 0, $4, $5, $6 WHERE EXISTS
                     (SELECT 1 FROM job_instance WHERE job_instance_id = $7 AND end_time = $8 AND status = $9)
                 ON CONFLICT (job_instance_id) DO NOTHING",
            )
            .bind(d.job_instance_id)
            .bind(&d.url)
            .bind(&d.body)
            .bind(d.now)
            .bind(d.now)
            .bind(d.now)
            .bind(d.job_instance_id)
            .bind(d.end_time)
            .bind(i64::from(d.status))
            .execute(&mut *tx)
            .await?
            .rows_affected();
        }
        tx.commit().await?;
        Ok(queued)
    }

    /// Up to `limit` pending deliveries, soonest due first (including ones not due yet, so the
    /// caller knows when to look again).
    pub async fn pending_callbacks(
        &self,
        limit: usize,
    ) -> Result<Vec<CallbackDelivery>, StoreError> {
        let rows = sqlx::query(&format!(
            "{DELIVERY_SELECT} WHERE d.status = 'pending' ORDER BY d.next_attempt_at, d.id LIMIT $1"
        ))
        .bind(i64::try_from(limit).unwrap_or(i64::MAX))
        .fetch_all(&self.pool)
        .await?;
        Ok(rows.iter().map(CallbackDelivery::from_row).collect())
    }

    /// Records an attempt and what follows it, in one transaction. `last_error` is what the
    /// delivery shows as its latest failure (kept when the attempt succeeded).
    pub async fn record_callback_attempt(
        &self,
        attempt: &CallbackAttempt,
        next: CallbackNext,
        last_error: Option<&str>,
        now: i64,
    ) -> Result<(), StoreError> {
        self.record_claimed_callback_attempt(attempt, next, last_error, now, None)
            .await
            .map(drop)
    }

    /// [`Store::record_callback_attempt`] fenced by a claim
    /// ([`Store::claim_callback_attempt`]): with `claimed_until`, recorded only if the delivery's
    /// next attempt is still the claim's time, so an attempt whose claim ran out and was made
    /// again by another controller does not overwrite that one's record. False if not recorded.
    pub async fn record_claimed_callback_attempt(
        &self,
        attempt: &CallbackAttempt,
        next: CallbackNext,
        last_error: Option<&str>,
        now: i64,
        claimed_until: Option<i64>,
    ) -> Result<bool, StoreError> {
        let (status, next_attempt_at) = match next {
            CallbackNext::Delivered => (CallbackStatus::Delivered, None),
            CallbackNext::RetryAt(at) => (CallbackStatus::Pending, Some(at)),
            CallbackNext::Failed => (CallbackStatus::Failed, None),
        };
        let mut tx = self.pool.begin().await?;
        let fence = if claimed_until.is_some() {
            " AND status = 'pending' AND next_attempt_at = $7"
        } else {
            ""
        };
        let statement = format!(
            "UPDATE callback_delivery SET status = $1, attempts = $2,
                 next_attempt_at = COALESCE($3, next_attempt_at),
                 last_error = COALESCE($4, last_error), updated_at = $5
             WHERE id = $6{fence}"
        );
        let updated = sqlx::query(&statement)
            .bind(status.as_str())
            .bind(attempt.attempt)
            .bind(next_attempt_at)
            .bind(last_error)
            .bind(now)
            .bind(attempt.delivery_id);
        let updated = match claimed_until {
            Some(until) => updated.bind(until),
            None => updated,
        }
        .execute(&mut *tx)
        .await?;
        if updated.rows_affected() == 0 {
            tx.rollback().await?;
            return Ok(false);
        }
        sqlx::query(
            "INSERT INTO callback_attempt (delivery_id, attempt, at, http_status, error, duration_ms)
             VALUES ($1, $2, $3, $4, $5, $6)
             ON CONFLICT (delivery_id, attempt) DO UPDATE SET
                 at = excluded.at, http_status = excluded.http_status, error = excluded.error,
                 duration_ms = excluded.duration_ms",
        )
        .bind(attempt.delivery_id)
        .bind(attempt.attempt)
        .bind(attempt.at)
        .bind(attempt.http_status)
        .bind(&attempt.error)
        .bind(attempt.duration_ms)
        .execute(&mut *tx)
        .await?;
        tx.commit().await?;
        Ok(true)
    }

    /// A job's delivery and its attempts in order, or `None` while none is queued.
    pub async fn callback_delivery(
        &self,
        job_instance_id: i64,
    ) -> Result<Option<(CallbackDelivery, Vec<CallbackAttempt>)>, StoreError> {
        // Both reads in one snapshot: an attempt recorded between them would otherwise show a
        // delivery and attempts that disagree (PostgreSQL's default isolation takes a snapshot
        // per statement; a SQLite read transaction keeps one).
        let mut tx = self.pool.begin().await?;
        if self.dialect == crate::backend::Dialect::Postgres {
            sqlx::query("SET TRANSACTION ISOLATION LEVEL REPEATABLE READ, READ ONLY")
                .execute(&mut *tx)
                .await?;
        }
        let Some(row) = sqlx::query(&format!("{DELIVERY_SELECT} WHERE d.job_instance_id = $1"))
            .bind(job_instance_id)
            .fetch_optional(&mut *tx)
            .await?
        else {
            return Ok(None);
        };
        let delivery = CallbackDelivery::from_row(&row);
        let attempts =
            sqlx::query("SELECT * FROM callback_attempt WHERE delivery_id = $1 ORDER BY attempt")
                .bind(delivery.id)
                .fetch_all(&mut *tx)
                .await?
                .iter()
                .map(CallbackAttempt::from_row)
                .collect();
        tx.commit().await?;
        Ok(Some((delivery, attempts)))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::{NewJob, Write};

    /// A job not started yet, on host 1, calling `callback_url` back when it ends.
    fn new_job(callback_url: Option<&str>) -> NewJob {
        NewJob {
            status: 1,
            callback_url: callback_url.map(str::to_owned),
            ..crate::test_job([1], 5)
        }
    }

    async fn finish(store: &Store, job_instance_id: i64) {
        store
            .record(Write::JobFinished {
                job_instance_id,
                status: 3,
                at: 10,
            })
            .await
            .unwrap();
        store.flush().await.unwrap();
    }

    /// A job with a callback URL, ended, with its delivery queued (due at 50).
    async fn ended_job_with_delivery(store: &Store, body: &str) -> crate::CreatedJob {
        let job = store
            .create_job(&new_job(Some("http://x/hook")))
            .await
            .unwrap();
        finish(store, job.job_instance_id).await;
        store
            .queue_callbacks(&[NewCallbackDelivery {
                job_instance_id: job.job_instance_id,
                url: "http://x/hook".into(),
                body: body.into(),
                now: 50,
                end_time: 10,
                status: 3,
            }])
            .await
            .unwrap();
        job
    }

    fn attempt(delivery_id: i64, attempt: i64, http_status: Option<i32>) -> CallbackAttempt {
        CallbackAttempt {
            delivery_id,
            attempt,
            at: 100 + attempt,
            http_status,
            error: http_status
                .is_none()
                .then(|| "connection refused".to_owned()),
            duration_ms: 5,
        }
    }

    #[tokio::test]
    async fn only_ended_jobs_with_a_callback_are_queued_and_only_once() {
        let (_db, store) = crate::test_store().await;
        let with = store
            .create_job(&new_job(Some("http://x/hook")))
            .await
            .unwrap();
        let without = store.create_job(&new_job(None)).await.unwrap();
        let running = store
            .create_job(&new_job(Some("http://x/other")))
            .await
            .unwrap();
        finish(&store, with.job_instance_id).await;
        finish(&store, without.job_instance_id).await;

        let all = [
            with.job_instance_id,
            without.job_instance_id,
            running.job_instance_id,
        ];
        let found = store.unqueued_callbacks(Some(&all)).await.unwrap();
        let ids: Vec<i64> = found.iter().map(|j| j.job_instance_id).collect();
        assert_eq!(ids, [with.job_instance_id]);
        assert_eq!(found[0].steps.len(), 1);
        let recovered = store.unqueued_callbacks(None).await.unwrap();
        assert_eq!(recovered.len(), 1);

        let delivery = NewCallbackDelivery {
            job_instance_id: with.job_instance_id,
            url: "http://x/hook".into(),
            body: "{}".into(),
            now: 50,
            end_time: 10,
            status: 3,
        };
        assert_eq!(
            store
                .queue_callbacks(std::slice::from_ref(&delivery))
                .await
                .unwrap(),
            1
        );
        assert_eq!(store.queue_callbacks(&[delivery]).await.unwrap(), 0);
        assert!(store.unqueued_callbacks(None).await.unwrap().is_empty());
    }

    /// The callback queue read a job's first end, then a retry committed: that stale end is
    /// not queued (it would block the retried end's delivery), and an attempt of a delivery the
    /// retry forgot is dropped, not failed.
    #[tokio::test]
    async fn a_retry_between_read_and_queue_leaves_no_stale_delivery() {
        let (_db, store) = crate::test_store().await;
        let job = store
            .create_job(&new_job(Some("http://x/hook")))
            .await
            .unwrap();
        finish(&store, job.job_instance_id).await;
        let stale = NewCallbackDelivery {
            job_instance_id: job.job_instance_id,
            url: "http://x/hook".into(),
            body: "{\"status\":3}".into(),
            now: 50,
            end_time: 10,
            status: 3,
        };
        store
            .queue_callbacks(std::slice::from_ref(&stale))
            .await
            .unwrap();
        let id = store.pending_callbacks(1).await.unwrap()[0].id;
        let retried = store
            .retry_step(
                job.job_instance_id,
                job.step_instance_id,
                3,
                2,
                &crate::RetryScope::default(),
            )
            .await
            .unwrap()
            .unwrap();
        assert!(!retried.hosts.is_empty());
        // The attempt that was in flight when the retry forgot its delivery.
        store
            .record_callback_attempt(
                &attempt(id, 1, Some(200)),
                CallbackNext::Delivered,
                None,
                101,
            )
            .await
            .unwrap();
        assert!(
            store
                .callback_delivery(job.job_instance_id)
                .await
                .unwrap()
                .is_none()
        );
        // The end read before the retry is not queued.
        assert_eq!(store.queue_callbacks(&[stale]).await.unwrap(), 0);
        store
            .record(Write::JobFinished {
                job_instance_id: job.job_instance_id,
                status: 3,
                at: 20,
            })
            .await
            .unwrap();
        store.flush().await.unwrap();
        let again = NewCallbackDelivery {
            job_instance_id: job.job_instance_id,
            url: "http://x/hook".into(),
            body: "{\"again\":1}".into(),
            now: 60,
            end_time: 20,
            status: 3,
        };
        assert_eq!(store.queue_callbacks(&[again]).await.unwrap(), 1);
        let (delivery, attempts) = store
            .callback_delivery(job.job_instance_id)
            .await
            .unwrap()
            .unwrap();
        assert_eq!(delivery.body, "{\"again\":1}");
        assert!(attempts.is_empty());
    }

    #[tokio::test]
    async fn attempts_are_recorded_and_survive_a_reopen() {
        let (db, store) = crate::test_store().await;
        let job = ended_job_with_delivery(&store, "{\"a\":1}").await;
        let pending = store.pending_callbacks(10).await.unwrap();
        assert_eq!(pending.len(), 1);
        let id = pending[0].id;
        assert_eq!(pending[0].app_code, "app");
        assert_eq!(pending[0].next_attempt_at, 50);
        store
            .record_callback_attempt(
                &attempt(id, 1, None),
                CallbackNext::RetryAt(2_000),
                Some("connection refused"),
                101,
            )
            .await
            .unwrap();
        drop(store);

        let store = Store::open_database(db.database()).await.unwrap();
        let pending = store.pending_callbacks(10).await.unwrap();
        assert_eq!(pending.len(), 1);
        assert_eq!(pending[0].attempts, 1);
        assert_eq!(pending[0].next_attempt_at, 2_000);
        store
            .record_callback_attempt(
                &attempt(id, 2, Some(200)),
                CallbackNext::Delivered,
                None,
                2_001,
            )
            .await
            .unwrap();
        assert!(store.pending_callbacks(10).await.unwrap().is_empty());
        let (delivery, attempts) = store
            .callback_delivery(job.job_instance_id)
            .await
            .unwrap()
            .unwrap();
        assert_eq!(delivery.status, CallbackStatus::Delivered);
        assert_eq!(delivery.attempts, 2);
        assert_eq!(delivery.body, "{\"a\":1}");
        assert_eq!(delivery.last_error.as_deref(), Some("connection refused"));
        assert_eq!(attempts.len(), 2);
        assert_eq!(attempts[0].http_status, None);
        assert_eq!(attempts[1].http_status, Some(200));
        assert!(store.callback_delivery(999).await.unwrap().is_none());
    }

    #[tokio::test]
    async fn one_of_concurrent_claimers_makes_an_attempt_and_a_stale_claim_records_nothing() {
        let (_db, store) = crate::test_store().await;
        let job = ended_job_with_delivery(&store, "{}").await;
        let due = store.pending_callbacks(1).await.unwrap()[0].clone();
        let claimers = (0..8).map(|i| {
            let store = store.clone();
            let due_at = due.next_attempt_at;
            tokio::spawn(async move {
                store
                    .claim_callback_attempt(due.id, due_at, 1_000 + i)
                    .await
                    .unwrap()
                    .then_some(1_000 + i)
            })
        });
        let mut won = Vec::new();
        for claimer in claimers {
            won.extend(claimer.await.unwrap());
        }
        assert_eq!(won.len(), 1, "claimed by {won:?}");
        let first_claim = won[0];
        // The first claimer stalls past its claim; another claims the attempt again and makes
        // it, then the first one's late record must not count.
        assert!(
            store
                .claim_callback_attempt(due.id, first_claim, 5_000)
                .await
                .unwrap()
        );
        let recorded = store
            .record_claimed_callback_attempt(
                &attempt(due.id, 1, Some(200)),
                CallbackNext::Delivered,
                None,
                5_001,
                Some(5_000),
            )
            .await
            .unwrap();
        assert!(recorded);
        let stale = store
            .record_claimed_callback_attempt(
                &attempt(due.id, 1, None),
                CallbackNext::RetryAt(9_000),
                Some("connection refused"),
                5_002,
                Some(first_claim),
            )
            .await
            .unwrap();
        assert!(!stale, "a stale claim recorded its attempt");
        let (delivery, attempts) = store
            .callback_delivery(job.job_instance_id)
            .await
            .unwrap()
            .unwrap();
        assert_eq!(delivery.status, CallbackStatus::Delivered);
        assert_eq!(delivery.attempts, 1);
        assert_eq!(attempts.len(), 1);
        assert_eq!(attempts[0].http_status, Some(200));
    }

    #[tokio::test]
    async fn the_last_failed_attempt_ends_the_delivery() {
        let (_db, store) = crate::test_store().await;
        let job = ended_job_with_delivery(&store, "{}").await;
        let id = store.pending_callbacks(1).await.unwrap()[0].id;
        store
            .record_callback_attempt(
                &attempt(id, 1, Some(500)),
                CallbackNext::Failed,
                Some("HTTP 500"),
                60,
            )
            .await
            .unwrap();
        let (delivery, _) = store
            .callback_delivery(job.job_instance_id)
            .await
            .unwrap()
            .unwrap();
        assert_eq!(delivery.status, CallbackStatus::Failed);
        assert_eq!(delivery.last_error.as_deref(), Some("HTTP 500"));
        assert!(store.pending_callbacks(10).await.unwrap().is_empty());
    }
}
