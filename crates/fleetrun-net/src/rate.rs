//! A token bucket that paces bytes sent on a stream: bk-job's `upload_speed_limit` and
//! `download_speed_limit`.
//!
//! The bucket holds at most one second of tokens (but never less than one chunk), so a pause
//! does not buy a burst beyond that; a send of `n` bytes waits until `n` tokens are there.
//! [`TokenBucket::take`] is pure (fed the time), [`TokenBucket::pace`] sleeps.

use std::time::Duration;

use tokio::time::Instant;

/// Bytes a second, refilled continuously.
#[derive(Debug)]
pub struct TokenBucket {
    rate: u64,
    capacity: f64,
    tokens: f64,
    last: Instant,
}

impl TokenBucket {
    /// A bucket of `rate` bytes a second that lets `burst` bytes through at once; `None` for no
    /// limit (a rate of 0).
    pub fn new(rate: u64, burst: u64, now: Instant) -> Option<Self> {
        (rate > 0).then(|| {
            let capacity = rate.max(burst) as f64;
            Self {
                rate,
                capacity,
                // Starts empty: the first second is paced like the others.
                tokens: 0.0,
                last: now,
            }
        })
    }

    /// Takes `n` tokens at `now`; returns how long to wait before sending them.
    pub fn take(&mut self, n: u64, now: Instant) -> Duration {
        let elapsed = now.saturating_duration_since(self.last).as_secs_f64();
        self.last = now;
        self.tokens = (self.tokens + elapsed * self.rate as f64).min(self.capacity);
        self.tokens -= n as f64;
        if self.tokens >= 0.0 {
            Duration::ZERO
        } else {
            Duration::from_secs_f64(-self.tokens / self.rate as f64)
        }
    }

    /// Waits until `n` bytes may be sent.
    pub async fn pace(&mut self, n: u64) {
        let wait = self.take(n, Instant::now());
        if !wait.is_zero() {
            tokio::time::sleep(wait).await;
        }
    }
}

/// Paces with `bucket` if there is one.
pub async fn pace(bucket: &mut Option<TokenBucket>, n: u64) {
    if let Some(bucket) = bucket {
        bucket.pace(n).await;
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn no_rate_no_bucket() {
        assert!(TokenBucket::new(0, 1, Instant::now()).is_none());
    }

    #[test]
    fn waits_add_up_to_the_rate() {
        let start = Instant::now();
        let mut bucket = TokenBucket::new(1000, 100, start).unwrap();
        // 10 sends of 100 bytes at once: the last may go after 1 s.
        let mut waits = Duration::ZERO;
        for _ in 0..10 {
            waits = bucket.take(100, start);
        }
        assert_eq!(waits, Duration::from_secs(1));
        // Time passing refills.
        let later = start + Duration::from_secs(3);
        assert_eq!(bucket.take(100, later), Duration::ZERO);
    }

    #[test]
    fn idle_time_buys_at_most_the_capacity() {
        let start = Instant::now();
        let mut bucket = TokenBucket::new(1000, 10, start).unwrap();
        let later = start + Duration::from_secs(100);
        assert_eq!(bucket.take(1000, later), Duration::ZERO);
        assert_eq!(bucket.take(1000, later), Duration::from_secs(1));
    }
}
