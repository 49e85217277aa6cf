//! Background tasks, owned: every task sluice spawns is held by an
//! [`OwnedTask`], which aborts it when dropped, so no task outlives what
//! started it.
//!
//! A task that serves one object is a field of it (a Redis node's batch
//! queue and connection attempt, the Redis store's supervisor, a Cluster's
//! topology refresh) and ends when the object is dropped. The tasks that run
//! as long as the service (rule and certificate reloads, the PostgreSQL
//! listener, usage writes, counter expiry, metrics upkeep) are in the
//! [`TaskSet`] that `app::build` fills and `app::serve` ends on shutdown.

use std::future::Future;
use std::sync::{Arc, Mutex};

use tokio::task::JoinHandle;

/// A spawned task, aborted when this is dropped.
#[derive(Debug)]
pub struct OwnedTask(JoinHandle<()>);

impl OwnedTask {
    /// Spawns `task` on the current Tokio runtime.
    pub fn spawn(task: impl Future<Output = ()> + Send + 'static) -> OwnedTask {
        OwnedTask(tokio::spawn(task))
    }

    pub fn is_finished(&self) -> bool {
        self.0.is_finished()
    }

    /// Aborts the task and waits until it has stopped: its future, and
    /// everything it held, is dropped when this returns.
    pub async fn end(mut self) {
        self.0.abort();
        // Cancelled, or it had finished (or panicked, already reported).
        let _ = (&mut self.0).await;
    }
}

impl Drop for OwnedTask {
    fn drop(&mut self) {
        self.0.abort();
    }
}

/// Tasks with one owner, ended together. Clones share the set.
#[derive(Clone, Debug, Default)]
pub struct TaskSet(Arc<Mutex<Vec<OwnedTask>>>);

impl TaskSet {
    /// Spawns `task` into the set, forgetting the tasks that have finished.
    pub fn spawn(&self, task: impl Future<Output = ()> + Send + 'static) {
        let mut tasks = self.0.lock().unwrap_or_else(|p| p.into_inner());
        tasks.retain(|t| !t.is_finished());
        tasks.push(OwnedTask::spawn(task));
    }

    /// Ends every task in the set and waits until they have stopped. The
    /// set stays usable.
    pub async fn end(&self) {
        let tasks = std::mem::take(&mut *self.0.lock().unwrap_or_else(|p| p.into_inner()));
        for task in tasks {
            task.end().await;
        }
    }
}

#[cfg(test)]
mod tests {
    use std::sync::atomic::{AtomicBool, Ordering};

    use super::*;

    /// Sets its flag when the task holding it is dropped.
    struct Dropped(Arc<AtomicBool>);

    impl Drop for Dropped {
        fn drop(&mut self) {
            self.0.store(true, Ordering::SeqCst);
        }
    }

    fn forever() -> (impl Future<Output = ()> + Send + 'static, Arc<AtomicBool>) {
        let flag = Arc::new(AtomicBool::new(false));
        let guard = Dropped(flag.clone());
        let task = async move {
            let _guard = guard;
            std::future::pending::<()>().await;
        };
        (task, flag)
    }

    #[tokio::test]
    async fn a_task_ends_when_its_owner_drops_it_or_ends_it() {
        let (task, dropped) = forever();
        let owned = OwnedTask::spawn(task);
        tokio::task::yield_now().await;
        assert!(!dropped.load(Ordering::SeqCst));
        drop(owned);
        tokio::task::yield_now().await;
        assert!(dropped.load(Ordering::SeqCst), "aborted on drop");

        let (task, dropped) = forever();
        OwnedTask::spawn(task).end().await;
        assert!(dropped.load(Ordering::SeqCst), "stopped when end returns");
    }

    #[tokio::test]
    async fn a_set_ends_all_its_tasks_and_forgets_finished_ones() {
        let set = TaskSet::default();
        let (a, a_dropped) = forever();
        let (b, b_dropped) = forever();
        set.spawn(a);
        set.spawn(async {});
        tokio::task::yield_now().await;
        set.spawn(b);
        assert_eq!(set.0.lock().unwrap().len(), 2, "the finished one is gone");
        set.clone().end().await;
        assert!(a_dropped.load(Ordering::SeqCst) && b_dropped.load(Ordering::SeqCst));
        assert!(set.0.lock().unwrap().is_empty());
    }
}
