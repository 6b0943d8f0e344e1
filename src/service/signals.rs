//! Wakes long-polling consumers of a queue when this instance stores messages in it, so a
//! pull with `waitMs` returns as soon as something arrives instead of polling Redis. Messages
//! stored by other instances are seen at the pull's next periodic look (every 500 ms).

use std::collections::HashMap;
use std::sync::{Arc, Mutex};

use tokio::sync::Notify;
use uuid::Uuid;

#[derive(Default)]
pub struct QueueSignals {
    queues: Mutex<HashMap<Uuid, Arc<Notify>>>,
}

impl QueueSignals {
    /// The signal of `queue_id`, for a consumer about to wait.
    pub fn subscribe(&self, queue_id: Uuid) -> Arc<Notify> {
        let mut queues = self.queues.lock().unwrap_or_else(|p| p.into_inner());
        queues.entry(queue_id).or_default().clone()
    }

    /// Wakes every consumer waiting on `queue_id`.
    pub fn notify(&self, queue_id: Uuid) {
        let queues = self.queues.lock().unwrap_or_else(|p| p.into_inner());
        if let Some(signal) = queues.get(&queue_id) {
            signal.notify_waiters();
        }
    }
}
