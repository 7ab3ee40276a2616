//! Reads the web console makes that the API does not: the beginning of every host's log of a
//! step at once, to group hosts by identical output and to search the logs.

use sqlx::Row;

use crate::{Store, StoreError};

/// The beginning of one host's log.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct LogHead {
    pub bk_host_id: i64,
    /// The log's bytes before the limit the read was given (whole chunks: a little more).
    pub data: Vec<u8>,
}

/// The most chunks one [`Store::log_from`] reads; a tail asks again for the rest.
const TAIL_CHUNKS: i64 = 256;

impl Store {
    /// Every host's log of a step, as far as the chunks that begin before `head_bytes`, ordered
    /// by host. One query for the whole step: a page on a step of 10,000 hosts costs one round
    /// trip. Hosts that wrote nothing are absent.
    pub async fn log_heads(
        &self,
        step_instance_id: i64,
        head_bytes: i64,
    ) -> Result<Vec<LogHead>, StoreError> {
        let rows = sqlx::query(
            "SELECT bk_host_id, data FROM host_log
             WHERE step_instance_id = $1 AND \"offset\" < $2
             ORDER BY bk_host_id, \"offset\"",
        )
        .bind(step_instance_id)
        .bind(head_bytes)
        .fetch_all(&self.pool)
        .await?;
        let mut heads: Vec<LogHead> = Vec::new();
        for row in rows {
            let host: i64 = row.get(0);
            let data: &[u8] = row.get(1);
            match heads.last_mut() {
                Some(head) if head.bk_host_id == host => head.data.extend_from_slice(data),
                _ => heads.push(LogHead {
                    bk_host_id: host,
                    data: data.to_vec(),
                }),
            }
        }
        Ok(heads)
    }

    /// A host's stored log of a step from byte `from` on, at most `limit` bytes, and the
    /// position after what is returned: a live tail asks again from there.
    pub async fn log_from(
        &self,
        step_instance_id: i64,
        bk_host_id: i64,
        from: i64,
        limit: i64,
    ) -> Result<(Vec<u8>, i64), StoreError> {
        let chunks = self
            .log_chunks_from(step_instance_id, &[(bk_host_id, from)], TAIL_CHUNKS)
            .await?;
        let mut data = Vec::new();
        let mut end = from;
        for chunk in chunks {
            let skip = usize::try_from(end - chunk.offset).unwrap_or(0);
            if chunk.offset > end || skip > chunk.data.len() {
                // A gap cannot occur (offsets are contiguous); stop rather than guess.
                break;
            }
            let rest = &chunk.data[skip..];
            let room = usize::try_from(limit)
                .unwrap_or(0)
                .saturating_sub(data.len());
            let take = rest.len().min(room);
            data.extend_from_slice(&rest[..take]);
            end += take as i64;
            if take < rest.len() {
                break;
            }
        }
        Ok((data, end))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::Write;

    #[tokio::test]
    async fn heads_join_each_hosts_chunks_and_tails_resume_where_they_stopped() {
        let dir = tempfile::tempdir().unwrap();
        let store = Store::open(&dir.path().join("db.sqlite")).await.unwrap();
        for (host, offset, data) in [
            (1, 0, "hello "),
            (1, 6, "world\n"),
            (2, 0, "abc"),
            (2, 3, "def"),
        ] {
            store
                .record(Write::HostLog {
                    epoch: crate::FIRST_EPOCH,
                    step_instance_id: 7,
                    bk_host_id: host,
                    offset,
                    data: data.as_bytes().to_vec(),
                })
                .await
                .unwrap();
        }
        store.flush().await.unwrap();
        let heads = store.log_heads(7, 1 << 20).await.unwrap();
        assert_eq!(
            heads,
            vec![
                LogHead {
                    bk_host_id: 1,
                    data: b"hello world\n".to_vec()
                },
                LogHead {
                    bk_host_id: 2,
                    data: b"abcdef".to_vec()
                },
            ]
        );
        // Only chunks that begin before the limit.
        let heads = store.log_heads(7, 3).await.unwrap();
        assert_eq!(heads[0].data, b"hello ".to_vec());
        assert_eq!(heads[1].data, b"abc".to_vec());
        assert!(store.log_heads(8, 100).await.unwrap().is_empty());

        let (data, end) = store.log_from(7, 1, 3, 5).await.unwrap();
        assert_eq!((data.as_slice(), end), (&b"lo wo"[..], 8));
        let (data, end) = store.log_from(7, 1, end, 100).await.unwrap();
        assert_eq!((data.as_slice(), end), (&b"rld\n"[..], 12));
        let (data, end) = store.log_from(7, 1, end, 100).await.unwrap();
        assert_eq!((data.as_slice(), end), (&b""[..], 12));
    }
}
