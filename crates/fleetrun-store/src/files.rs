//! File tasks' per-file logs (`file_log`, migration 0013): one row per (step, host, direction,
//! file), written once the host's file task has reported it and read by the log APIs.

use sqlx::{Row, any::AnyRow};

use crate::{Store, StoreError};

/// What became of one file on one host.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct FileLog {
    pub step_instance_id: i64,
    pub bk_host_id: i64,
    /// bk-job's: 0 upload (source side), 1 download (target side).
    pub mode: i32,
    /// The file's place in the task.
    pub seq: i32,
    pub src_host_id: i64,
    pub src_cloud_id: i64,
    pub src_ip: String,
    pub src_path: String,
    pub dest_path: String,
    /// bk-job's file status: 1 waiting, 2 uploading, 3 downloading, 4 success, 5 failure.
    pub status: i32,
    /// Bytes.
    pub size: i64,
    /// Bytes a second.
    pub speed: i64,
    /// Percent.
    pub progress: i32,
    pub log_content: String,
    pub start_time: Option<i64>,
    pub end_time: Option<i64>,
}

fn file_log(row: &AnyRow) -> FileLog {
    FileLog {
        step_instance_id: row.get("step_instance_id"),
        bk_host_id: row.get("bk_host_id"),
        mode: row.get::<i32, _>("mode"),
        seq: row.get::<i32, _>("seq"),
        src_host_id: row.get("src_host_id"),
        src_cloud_id: row.get("src_cloud_id"),
        src_ip: row.get("src_ip"),
        src_path: row.get("src_path"),
        dest_path: row.get("dest_path"),
        status: row.get::<i32, _>("status"),
        size: row.get("size"),
        speed: row.get("speed"),
        progress: row.get::<i32, _>("progress"),
        log_content: row.get("log_content"),
        start_time: row.get("start_time"),
        end_time: row.get("end_time"),
    }
}

impl Store {
    /// Stores `logs` in one transaction, each replacing an earlier row of the same (step, host,
    /// mode, file).
    pub async fn record_file_logs(&self, logs: &[FileLog]) -> Result<(), StoreError> {
        if logs.is_empty() {
            return Ok(());
        }
        let mut tx = self.noting_write_failure(self.pool.begin().await)?;
        for log in logs {
            let done = sqlx::query(
                "INSERT INTO file_log (step_instance_id, bk_host_id, mode, seq, src_host_id,
                     src_cloud_id, src_ip, src_path, dest_path, status, size, speed, progress,
                     log_content, start_time, end_time)
                 VALUES ($1, $2, $3, $4, $5, $6, $7, $8, $9, $10, $11, $12, $13, $14, $15, $16)
                 ON CONFLICT (step_instance_id, bk_host_id, mode, seq) DO UPDATE SET
                     src_host_id = excluded.src_host_id, src_cloud_id = excluded.src_cloud_id,
                     src_ip = excluded.src_ip, src_path = excluded.src_path,
                     dest_path = excluded.dest_path, status = excluded.status,
                     size = excluded.size, speed = excluded.speed, progress = excluded.progress,
                     log_content = excluded.log_content, start_time = excluded.start_time,
                     end_time = excluded.end_time",
            )
            .bind(log.step_instance_id)
            .bind(log.bk_host_id)
            .bind(log.mode)
            .bind(log.seq)
            .bind(log.src_host_id)
            .bind(log.src_cloud_id)
            .bind(&log.src_ip)
            .bind(&log.src_path)
            .bind(&log.dest_path)
            .bind(log.status)
            .bind(log.size)
            .bind(log.speed)
            .bind(log.progress)
            .bind(&log.log_content)
            .bind(log.start_time)
            .bind(log.end_time)
            .execute(&mut *tx)
            .await;
            self.noting_write_failure(done)?;
        }
        self.noting_write_failure(tx.commit().await)?;
        Ok(())
    }

    /// The file logs of `bk_host_id` in a step, uploads first, each direction in file order.
    pub async fn file_logs(
        &self,
        step_instance_id: i64,
        bk_host_id: i64,
    ) -> Result<Vec<FileLog>, StoreError> {
        let rows = sqlx::query(
            "SELECT * FROM file_log WHERE step_instance_id = $1 AND bk_host_id = $2
             ORDER BY mode, seq",
        )
        .bind(step_instance_id)
        .bind(bk_host_id)
        .fetch_all(&self.pool)
        .await?;
        Ok(rows.iter().map(file_log).collect())
    }

    /// A step's upload logs (mode 0, the source side), of every source host.
    pub async fn upload_logs(&self, step_instance_id: i64) -> Result<Vec<FileLog>, StoreError> {
        let rows = sqlx::query(
            "SELECT * FROM file_log WHERE step_instance_id = $1 AND mode = 0
             ORDER BY bk_host_id, seq",
        )
        .bind(step_instance_id)
        .fetch_all(&self.pool)
        .await?;
        Ok(rows.iter().map(file_log).collect())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn log(seq: i32, status: i32) -> FileLog {
        FileLog {
            step_instance_id: 7,
            bk_host_id: 3,
            mode: 1,
            seq,
            src_host_id: 0,
            src_cloud_id: 0,
            src_ip: String::new(),
            src_path: format!("f{seq}"),
            dest_path: format!("/tmp/f{seq}"),
            status,
            size: 1 << 40,
            speed: 12,
            progress: 100,
            log_content: "written".into(),
            start_time: Some(1),
            end_time: None,
        }
    }

    #[tokio::test]
    async fn file_logs_round_trip_and_replace() {
        let (_db, store) = crate::test_store().await;
        store
            .record_file_logs(&[log(1, 5), log(0, 4)])
            .await
            .unwrap();
        store.record_file_logs(&[log(1, 4)]).await.unwrap();
        let logs = store.file_logs(7, 3).await.unwrap();
        assert_eq!(logs, vec![log(0, 4), log(1, 4)]);
        assert!(store.file_logs(7, 4).await.unwrap().is_empty());
    }
}
