//! One cancellation tree and one task tracker for every task of the
//! application, and the rule that keeps a broken bridge from answering "0":
//! a critical task that ends before shutdown (a panic, an error, a return)
//! fails the application at once. Readiness turns 503, shutdown starts, and the
//! process exits non-zero so that systemd or Kubernetes restarts it.

use std::future::Future;
use std::sync::{Arc, Mutex, PoisonError};

use tokio::task::JoinHandle;
use tokio_util::sync::{CancellationToken, WaitForCancellationFutureOwned};
use tokio_util::task::TaskTracker;
use tracing::error;

/// Why the application failed: the first critical task that ended on its own.
#[derive(Debug, Clone, thiserror::Error)]
#[error("{task} stopped unexpectedly: {reason}")]
pub struct Failure {
    pub task: &'static str,
    pub reason: String,
}

/// Owns the root cancellation token and the tracker of every task.
#[derive(Clone)]
pub struct Supervisor {
    root: CancellationToken,
    tracker: TaskTracker,
    failed: CancellationToken,
    /// Cancelled when shutdown begins (a signal or a failure), before any stage stops.
    stopping: CancellationToken,
    failure: Arc<Mutex<Option<Failure>>>,
}

impl Default for Supervisor {
    fn default() -> Self {
        Self::new()
    }
}

impl Supervisor {
    /// A new tree with nothing running.
    pub(crate) fn new() -> Self {
        Supervisor {
            root: CancellationToken::new(),
            tracker: TaskTracker::new(),
            failed: CancellationToken::new(),
            stopping: CancellationToken::new(),
            failure: Arc::new(Mutex::new(None)),
        }
    }

    /// A token cancelled with the root (or on its own): give one to each stage.
    pub(crate) fn child_token(&self) -> CancellationToken {
        self.root.child_token()
    }

    /// Spawns `task`, which must run until `stop` is cancelled; ending earlier fails
    /// the application.
    pub(crate) fn spawn_critical<F>(&self, name: &'static str, stop: CancellationToken, task: F)
    where
        F: Future<Output = ()> + Send + 'static,
    {
        self.watch(name, stop, tokio::spawn(task));
    }

    /// Watches an already spawned critical task, as [`Supervisor::spawn_critical`].
    pub(crate) fn watch(&self, name: &'static str, stop: CancellationToken, task: JoinHandle<()>) {
        let this = self.clone();
        self.tracker.spawn(async move {
            let reason = match task.await {
                Ok(()) => "ended".to_string(),
                Err(e) if e.is_panic() => format!("panicked: {}", panic_message(e.into_panic())),
                Err(e) => e.to_string(),
            };
            if !stop.is_cancelled() {
                this.fail(name, reason);
            }
        });
    }

    /// Fails the application once the future `ended` resolves before `stop` is
    /// cancelled (for work that is not a tokio task, e.g. a thread).
    pub(crate) fn watch_until<F>(&self, name: &'static str, stop: CancellationToken, ended: F)
    where
        F: Future<Output = ()> + Send + 'static,
    {
        let this = self.clone();
        self.tracker.spawn(async move {
            tokio::select! {
                () = ended => {
                    if !stop.is_cancelled() {
                        this.fail(name, "ended".into());
                    }
                }
                () = stop.cancelled() => {}
            }
        });
    }

    /// Records the first failure and signals it.
    pub(crate) fn fail(&self, task: &'static str, reason: String) {
        let mut slot = self.failure.lock().unwrap_or_else(PoisonError::into_inner);
        if slot.is_none() {
            error!(task, %reason, "a background task stopped; the bridge stops accepting and exits non-zero");
            *slot = Some(Failure { task, reason });
        }
        drop(slot);
        self.failed.cancel();
    }

    /// The failure, if any.
    pub(crate) fn failure(&self) -> Option<Failure> {
        self.failure
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .clone()
    }

    /// Whether a critical task failed; cheap, for readiness and every request.
    pub(crate) fn has_failed(&self) -> bool {
        self.failed.is_cancelled()
    }

    /// Resolves when a critical task fails.
    pub(crate) fn failed(&self) -> WaitForCancellationFutureOwned {
        self.failed.clone().cancelled_owned()
    }

    /// Marks the start of shutdown, so readiness turns 503 and load balancers stop
    /// sending while the stages still finish their work.
    pub(crate) fn begin_shutdown(&self) {
        self.stopping.cancel();
    }

    /// Whether shutdown has begun.
    pub(crate) fn is_stopping(&self) -> bool {
        self.stopping.is_cancelled()
    }

    /// Cancels every token of the tree.
    pub(crate) fn cancel_all(&self) {
        self.root.cancel();
    }

    /// Waits for every tracked task to end.
    pub(crate) async fn wait(&self) {
        self.tracker.close();
        self.tracker.wait().await;
    }
}

fn panic_message(payload: Box<dyn std::any::Any + Send>) -> String {
    if let Some(s) = payload.downcast_ref::<&str>() {
        (*s).to_string()
    } else if let Some(s) = payload.downcast_ref::<String>() {
        s.clone()
    } else {
        "(no message)".into()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::time::Duration;

    #[tokio::test]
    async fn a_task_ending_before_its_stop_fails_the_application() {
        let supervisor = Supervisor::new();
        let stop = supervisor.child_token();
        supervisor.spawn_critical("worker", stop, async {});
        tokio::time::timeout(Duration::from_secs(5), supervisor.failed())
            .await
            .expect("failure signalled");
        assert_eq!(supervisor.failure().map(|f| f.task), Some("worker"));
    }

    #[tokio::test]
    async fn a_panic_is_a_failure_with_its_message() {
        let supervisor = Supervisor::new();
        let stop = supervisor.child_token();
        supervisor.spawn_critical("worker", stop, async { panic!("boom") });
        tokio::time::timeout(Duration::from_secs(5), supervisor.failed())
            .await
            .expect("failure signalled");
        let failure = supervisor.failure().expect("failure");
        assert!(failure.reason.contains("boom"), "{failure}");
    }

    #[tokio::test]
    async fn a_task_stopped_by_its_token_is_no_failure() {
        let supervisor = Supervisor::new();
        let stop = supervisor.child_token();
        let token = stop.clone();
        supervisor.spawn_critical("worker", stop, async move { token.cancelled().await });
        supervisor.cancel_all();
        tokio::time::timeout(Duration::from_secs(5), supervisor.wait())
            .await
            .expect("tasks end");
        assert!(!supervisor.has_failed());
    }
}
