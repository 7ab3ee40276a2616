//! Telling followers of a job that something of it was committed, so they read the store when
//! there is news instead of polling it.
//!
//! On PostgreSQL the commits of other controllers sharing the database count too: after each
//! commit the writer announces what it touched on the `fleetrun_commit` channel (`pg_notify` in
//! the committing transaction, with the store's id, so that a store skips its own), and
//! every store listens there (`PgListener`, a connection of its own) and wakes its followers of
//! what was announced. A notification lost while the listener reconnects costs its followers
//! no more than their own fallback poll.

use std::{
    collections::{HashMap, HashSet},
    sync::{Arc, Mutex},
};

use tokio::sync::Notify;

use crate::Write;

/// The channel commits are announced on.
const CHANNEL: &str = "fleetrun_commit";
/// The largest announcement (PostgreSQL takes up to 8,000 bytes); a commit touching more is
/// announced as [`EVERYTHING`].
const MAX_ANNOUNCEMENT: usize = 7_000;
/// Wakes every follower.
const EVERYTHING: &str = "*";
/// News for the controllers themselves of a handover or a termination (`handover.rs`), as its
/// own announcement.
pub(crate) const NEWS: &str = "c";
/// News of a revocation or a dangerous-rule change, as its own announcement.
pub(crate) const TRUST_NEWS: &str = "t";
/// News of an agent's host registered (new, or at a new address) through another controller.
pub(crate) const HOST_NEWS: &str = "h";

/// What a commit touched, as announced to other controllers: `j<id>` and `s<id>` separated by
/// spaces, or [`EVERYTHING`]; `None` when it touched no job.
pub(crate) fn announcement(writes: &[Write]) -> Option<String> {
    let keys: HashSet<Key> = writes.iter().filter_map(Key::of).collect();
    if keys.is_empty() {
        return None;
    }
    let mut text = String::new();
    for key in keys {
        if !text.is_empty() {
            text.push(' ');
        }
        match key {
            Key::Job(id) => text.push_str(&format!("j{id}")),
            Key::Step(id) => text.push_str(&format!("s{id}")),
        }
        if text.len() > MAX_ANNOUNCEMENT {
            return Some(EVERYTHING.to_owned());
        }
    }
    Some(text)
}

/// A name for one store among those listening on a database, put before its announcements so
/// that it skips its own (its followers were woken at the commit already).
pub(crate) fn store_id() -> String {
    use std::sync::atomic::{AtomicU64, Ordering};
    static NEXT: AtomicU64 = AtomicU64::new(0);
    let nanos = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.as_nanos() as u64);
    format!(
        "c{:x}{:x}{:x}",
        std::process::id(),
        nanos,
        NEXT.fetch_add(1, Ordering::Relaxed)
    )
}

/// Announces a commit to every store listening on the database, in the committing
/// transaction (`pg_notify` is delivered at its commit, and takes no connection of its own):
/// `store` then what it touched ([`announcement`]).
pub(crate) async fn announce(
    tx: &mut sqlx::AnyConnection,
    store: &str,
    text: &str,
) -> Result<(), sqlx::Error> {
    sqlx::query(&format!("SELECT 1 FROM pg_notify('{CHANNEL}', $1) AS n"))
        .bind(format!("{store} {text}"))
        .execute(tx)
        .await?;
    Ok(())
}

/// Listens for announced commits on the PostgreSQL database at `url` and wakes `watchers`'
/// followers of what they touched, skipping the store `own`'s, until aborted (when the store
/// goes).
pub(crate) fn listen(url: String, watchers: Watchers, own: String) -> tokio::task::JoinHandle<()> {
    tokio::spawn(async move {
        const FIRST_WAIT: std::time::Duration = std::time::Duration::from_millis(200);
        const LAST_WAIT: std::time::Duration = std::time::Duration::from_secs(10);
        let mut wait = FIRST_WAIT;
        loop {
            let mut listener = match sqlx::postgres::PgListener::connect(&url).await {
                Ok(listener) => listener,
                Err(e) => {
                    tracing::warn!("cannot listen for other controllers' commits: {e}");
                    tokio::time::sleep(wait).await;
                    wait = (wait * 2).min(LAST_WAIT);
                    continue;
                }
            };
            if let Err(e) = listener.listen(CHANNEL).await {
                tracing::warn!("cannot listen for other controllers' commits: {e}");
                tokio::time::sleep(wait).await;
                wait = (wait * 2).min(LAST_WAIT);
                continue;
            }
            wait = FIRST_WAIT;
            // `recv` reconnects by itself after a lost connection; what was announced
            // meanwhile is lost, and followers poll.
            loop {
                match listener.recv().await {
                    Ok(notification) => {
                        let (store, text) =
                            notification.payload().split_once(' ').unwrap_or(("", ""));
                        if store != own {
                            watchers.announced(text);
                        }
                    }
                    Err(e) => {
                        tracing::warn!("listening for other controllers' commits: {e}");
                        watchers.announced(EVERYTHING);
                        break;
                    }
                }
            }
        }
    })
}

/// A task aborted when the last store holding it goes.
#[derive(Debug)]
pub(crate) struct Listening(pub(crate) tokio::task::JoinHandle<()>);

impl Drop for Listening {
    fn drop(&mut self) {
        self.0.abort();
    }
}

/// What a write is about.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
enum Key {
    Job(i64),
    Step(i64),
}

impl Key {
    fn of(write: &Write) -> Option<Key> {
        match write {
            Write::JobStarted {
                job_instance_id, ..
            }
            | Write::JobStatus {
                job_instance_id, ..
            }
            | Write::JobFinished {
                job_instance_id, ..
            } => Some(Key::Job(*job_instance_id)),
            Write::HostStatus {
                step_instance_id, ..
            }
            | Write::HostLog {
                step_instance_id, ..
            }
            | Write::HostFinished {
                step_instance_id, ..
            }
            | Write::StepFinished {
                step_instance_id, ..
            } => Some(Key::Step(*step_instance_id)),
            Write::Flush(_) | Write::Checkpoints { .. } | Write::Audit { .. } => None,
        }
    }
}

/// The followers of each job and step, by subscription id, the controller's own listener
/// of [`NEWS`], and the hosts whose writes were fenced out ([`crate::fence`]).
#[derive(Debug, Default, Clone)]
pub(crate) struct Watchers(
    Arc<Mutex<Registry>>,
    Arc<[Notify; 3]>,
    Arc<crate::fence::Fenced>,
);

#[derive(Debug, Default)]
struct Registry {
    next_id: u64,
    by_key: HashMap<Key, HashMap<u64, Arc<Notify>>>,
}

impl Watchers {
    /// Wakes the followers of whatever `writes` touched; called after they are committed.
    pub(crate) fn committed(&self, writes: &[Write]) {
        let registry = self.0.lock().unwrap();
        if registry.by_key.is_empty() {
            return;
        }
        let keys: HashSet<Key> = writes.iter().filter_map(Key::of).collect();
        for key in keys {
            for notify in registry
                .by_key
                .get(&key)
                .into_iter()
                .flat_map(HashMap::values)
            {
                notify.notify_one();
            }
        }
    }

    /// Woken by [`NEWS`] (and by a lost listening connection, which may have lost some).
    pub(crate) fn news(&self) -> &Notify {
        &self.1[0]
    }

    /// Woken by [`TRUST_NEWS`] (and by a lost listening connection).
    pub(crate) fn trust_news(&self) -> &Notify {
        &self.1[1]
    }

    /// Woken by [`HOST_NEWS`] (and by a lost listening connection).
    pub(crate) fn host_news(&self) -> &Notify {
        &self.1[2]
    }

    /// Tells the engine that writes of these hosts (step, host, row epoch) were refused.
    pub(crate) fn fenced(&self, refused: Vec<(i64, i64, i64)>) {
        self.2.push(refused);
    }

    pub(crate) fn fenced_news(&self) -> &Arc<crate::fence::Fenced> {
        &self.2
    }

    /// Wakes the followers of what an announcement (another store's commit) names.
    pub(crate) fn announced(&self, text: &str) {
        if text == NEWS || text == EVERYTHING {
            self.news().notify_one();
        }
        if text == TRUST_NEWS || text == EVERYTHING {
            self.trust_news().notify_one();
        }
        if text == HOST_NEWS || text == EVERYTHING {
            self.host_news().notify_one();
        }
        let registry = self.0.lock().unwrap();
        if text == EVERYTHING {
            for notify in registry.by_key.values().flat_map(HashMap::values) {
                notify.notify_one();
            }
            return;
        }
        for word in text.split(' ') {
            let key = match (word.get(..1), word.get(1..).map(str::parse::<i64>)) {
                (Some("j"), Some(Ok(id))) => Key::Job(id),
                (Some("s"), Some(Ok(id))) => Key::Step(id),
                _ => continue,
            };
            for notify in registry
                .by_key
                .get(&key)
                .into_iter()
                .flat_map(HashMap::values)
            {
                notify.notify_one();
            }
        }
    }

    pub(crate) fn watch(&self, job_instance_id: i64, step_instance_id: i64) -> JobWatch {
        let notify = Arc::new(Notify::new());
        let keys = [Key::Job(job_instance_id), Key::Step(step_instance_id)];
        let mut registry = self.0.lock().unwrap();
        registry.next_id += 1;
        let id = registry.next_id;
        for key in keys {
            registry
                .by_key
                .entry(key)
                .or_default()
                .insert(id, notify.clone());
        }
        JobWatch {
            watchers: self.clone(),
            id,
            keys,
            notify,
        }
    }
}

/// A subscription to one job's (and its step's) commits; ends when dropped.
#[derive(Debug)]
pub struct JobWatch {
    watchers: Watchers,
    id: u64,
    keys: [Key; 2],
    notify: Arc<Notify>,
}

impl JobWatch {
    /// Returns once something of the job was committed since the last call (or since the watch
    /// began): a commit that happens while nobody waits is not lost.
    pub async fn changed(&self) {
        self.notify.notified().await;
    }
}

impl Drop for JobWatch {
    fn drop(&mut self) {
        let mut registry = self.watchers.0.lock().unwrap();
        for key in &self.keys {
            if let Some(followers) = registry.by_key.get_mut(key) {
                followers.remove(&self.id);
                if followers.is_empty() {
                    registry.by_key.remove(key);
                }
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use std::time::Duration;

    use super::*;

    #[tokio::test]
    async fn a_commit_wakes_its_jobs_followers_only() {
        let watchers = Watchers::default();
        let mine = watchers.watch(1, 10);
        let other = watchers.watch(2, 20);
        // Committed before anyone waits: kept for the next wait.
        watchers.committed(&[Write::StepFinished {
            step_instance_id: 10,
            status: 3,
            at: 0,
        }]);
        tokio::time::timeout(Duration::from_secs(1), mine.changed())
            .await
            .expect("woken");
        assert!(
            tokio::time::timeout(Duration::from_millis(50), other.changed())
                .await
                .is_err()
        );
        drop(mine);
        drop(other);
        assert!(watchers.0.lock().unwrap().by_key.is_empty());
    }

    #[tokio::test]
    async fn an_announced_commit_wakes_the_followers_it_names() {
        let watchers = Watchers::default();
        let mine = watchers.watch(1, 10);
        let other = watchers.watch(2, 20);
        let text = announcement(&[Write::StepFinished {
            step_instance_id: 10,
            status: 3,
            at: 0,
        }])
        .unwrap();
        assert_eq!(text, "s10");
        // Garbage is ignored; the named step's follower wakes, the other does not.
        watchers.announced(&format!("x1 j s{} {text}", i64::MAX));
        tokio::time::timeout(Duration::from_secs(1), mine.changed())
            .await
            .expect("woken");
        assert!(
            tokio::time::timeout(Duration::from_millis(50), other.changed())
                .await
                .is_err()
        );
        watchers.announced(EVERYTHING);
        tokio::time::timeout(Duration::from_secs(1), other.changed())
            .await
            .expect("woken by everything");
        assert_eq!(announcement(&[]), None);
        let many: Vec<Write> = (0..2_000)
            .map(|step| Write::StepFinished {
                step_instance_id: step,
                status: 3,
                at: 0,
            })
            .collect();
        assert_eq!(announcement(&many).as_deref(), Some(EVERYTHING));
    }

    #[tokio::test]
    async fn host_news_wakes_its_listener_and_no_other() {
        let watchers = Watchers::default();
        watchers.announced(HOST_NEWS);
        tokio::time::timeout(Duration::from_secs(1), watchers.host_news().notified())
            .await
            .expect("woken by host news");
        for other in [watchers.news(), watchers.trust_news()] {
            assert!(
                tokio::time::timeout(Duration::from_millis(50), other.notified())
                    .await
                    .is_err()
            );
        }
        watchers.announced(TRUST_NEWS);
        assert!(
            tokio::time::timeout(Duration::from_millis(50), watchers.host_news().notified())
                .await
                .is_err()
        );
        // A lost listening connection is announced as everything: host news may be among it.
        watchers.announced(EVERYTHING);
        tokio::time::timeout(Duration::from_secs(1), watchers.host_news().notified())
            .await
            .expect("woken by everything");
    }
}
