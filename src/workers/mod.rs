//! Background tasks. Each worker has one owner module with a `run(…, shutdown)` entry; this
//! module supervises them: restarts one that panicked, records its state for `/status`, and
//! waits for all of them at shutdown.

pub mod audit_forwarder;
pub mod dispatcher;
pub mod health_monitor;
pub mod reclaimer;
pub mod record_retention;
pub mod recorder;
pub mod retention;
pub mod scheduler;
pub mod waker;

use std::collections::BTreeMap;
use std::future::Future;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use tokio::task::AbortHandle;
use tokio_util::sync::CancellationToken;
use tokio_util::task::{AbortOnDropHandle, TaskTracker};

const RESTART_DELAY: Duration = Duration::from_secs(1);

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum WorkerState {
    Running,
    Stopped,
}

impl WorkerState {
    pub fn as_str(self) -> &'static str {
        match self {
            WorkerState::Running => "running",
            WorkerState::Stopped => "stopped",
        }
    }
}

#[derive(Clone, Default)]
pub struct Workers {
    states: Arc<Mutex<BTreeMap<&'static str, WorkerState>>>,
    tracker: TaskTracker,
    aborts: Arc<Mutex<Vec<AbortHandle>>>,
}

impl Workers {
    /// Runs `worker` until it returns or `shutdown` fires; a panic restarts it after a pause.
    pub fn spawn<F, Fut>(&self, name: &'static str, shutdown: CancellationToken, worker: F)
    where
        F: Fn(CancellationToken) -> Fut + Send + 'static,
        Fut: Future<Output = ()> + Send + 'static,
    {
        self.set(name, WorkerState::Running);
        let workers = self.clone();
        let supervisor = self.tracker.spawn(async move {
            loop {
                // Aborting the supervisor aborts the worker with it.
                match AbortOnDropHandle::new(tokio::spawn(worker(shutdown.clone()))).await {
                    Err(error) if error.is_panic() && !shutdown.is_cancelled() => {
                        tracing::error!(worker = name, "worker panicked; restarting");
                        tokio::select! {
                            () = tokio::time::sleep(RESTART_DELAY) => {}
                            () = shutdown.cancelled() => break,
                        }
                    }
                    _ => break,
                }
            }
            workers.set(name, WorkerState::Stopped);
            tracing::info!(worker = name, "worker stopped");
        });
        if let Ok(mut aborts) = self.aborts.lock() {
            aborts.push(supervisor.abort_handle());
        }
    }

    /// Stops every worker at once, wherever it is, as a crash would. For fault tests; a
    /// normal shutdown cancels the workers' token and waits (`wait`).
    pub fn abort_all(&self) {
        if let Ok(aborts) = self.aborts.lock() {
            aborts.iter().for_each(AbortHandle::abort);
        }
    }

    fn set(&self, name: &'static str, state: WorkerState) {
        if let Ok(mut states) = self.states.lock() {
            states.insert(name, state);
        }
    }

    pub fn states(&self) -> BTreeMap<&'static str, WorkerState> {
        self.states.lock().map(|s| s.clone()).unwrap_or_default()
    }

    /// Waits for every worker to finish (after their shutdown token fired).
    pub async fn wait(&self) {
        self.tracker.close();
        self.tracker.wait().await;
    }
}
