//! Telling followers of a job that something of it was committed, so they read the store when
//! there is news instead of polling it.

use std::{
    collections::{HashMap, HashSet},
    sync::{Arc, Mutex},
};

use tokio::sync::Notify;

use crate::Write;

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
            Write::Flush(_) | Write::Checkpoints { .. } => None,
        }
    }
}

/// The followers of each job and step, by subscription id.
#[derive(Debug, Default, Clone)]
pub(crate) struct Watchers(Arc<Mutex<Registry>>);

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
}
