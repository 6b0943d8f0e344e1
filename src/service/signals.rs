//! Wakes this instance's waiting consumers of a queue (long-polls and webhook serving tasks)
//! when messages arrive in it: stored here, announced by another instance
//! (`service::wake`), released by the scheduler, or a retry falling due.

use std::collections::HashMap;
use std::sync::{Arc, Mutex};

use tokio::sync::Notify;
use uuid::Uuid;

/// Past this many signals, those nobody waits on are dropped (then past twice as many as
/// remain), so the map follows the queues being waited on, not every queue ever seen.
const PRUNE_FROM: usize = 1024;

#[derive(Default)]
pub struct QueueSignals {
    queues: Mutex<Signals>,
}

#[derive(Default)]
struct Signals {
    by_queue: HashMap<Uuid, Arc<Notify>>,
    prune_at: usize,
}

impl QueueSignals {
    /// The signal of `queue_id`, for a consumer about to wait.
    pub fn subscribe(&self, queue_id: Uuid) -> Arc<Notify> {
        let mut signals = self.queues.lock().unwrap_or_else(|p| p.into_inner());
        if signals.by_queue.len() >= signals.prune_at.max(PRUNE_FROM) {
            // Held only by the map: no consumer waits on it.
            signals
                .by_queue
                .retain(|_, signal| Arc::strong_count(signal) > 1);
            signals.prune_at = signals.by_queue.len() * 2;
        }
        signals.by_queue.entry(queue_id).or_default().clone()
    }

    /// A deleted queue's signal goes with it.
    pub fn forget(&self, queue_id: Uuid) {
        let mut signals = self.queues.lock().unwrap_or_else(|p| p.into_inner());
        signals.by_queue.remove(&queue_id);
    }

    /// How many signals are kept (for tests of the pruning).
    pub fn len(&self) -> usize {
        let signals = self.queues.lock().unwrap_or_else(|p| p.into_inner());
        signals.by_queue.len()
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// Wakes every waiting consumer of every queue (after a lost wake-up connection).
    pub fn notify_all(&self) {
        let signals = self.queues.lock().unwrap_or_else(|p| p.into_inner());
        for signal in signals.by_queue.values() {
            signal.notify_waiters();
        }
    }

    /// Wakes every consumer waiting on `queue_id`.
    pub fn notify(&self, queue_id: Uuid) {
        let signals = self.queues.lock().unwrap_or_else(|p| p.into_inner());
        if let Some(signal) = signals.by_queue.get(&queue_id) {
            signal.notify_waiters();
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn signals_nobody_waits_on_are_pruned() {
        let signals = QueueSignals::default();
        let held = signals.subscribe(Uuid::from_u128(0));
        for n in 1..=PRUNE_FROM as u128 {
            drop(signals.subscribe(Uuid::from_u128(n)));
        }
        assert!(
            signals.len() <= 2,
            "only the waited-on signal (and the newest) remain"
        );
        assert!(Arc::ptr_eq(&held, &signals.subscribe(Uuid::from_u128(0))));
        signals.forget(Uuid::from_u128(0));
        assert!(!Arc::ptr_eq(&held, &signals.subscribe(Uuid::from_u128(0))));
    }
}
