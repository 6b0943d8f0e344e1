//! Per-queue timers: when each queue next needs a worker's attention (a delayed message
//! falls due, a retry falls due, an ack deadline passes). A worker sleeps until the earliest
//! one instead of sweeping every queue, and is woken at once when an earlier time is armed.
//!
//! Each queue keeps only its earliest time, so the timers are bounded by the number of
//! queues whatever a tenant publishes; whoever handles a queue's due time arms its next one
//! (the scripts return it).

use std::collections::{BTreeSet, HashMap};
use std::sync::Mutex;
use std::time::Duration;

use chrono::Utc;
use tokio::sync::Notify;
use uuid::Uuid;

#[derive(Default)]
pub struct DueQueues {
    timers: Mutex<Timers>,
    sooner: Notify,
}

#[derive(Default)]
struct Timers {
    by_queue: HashMap<Uuid, i64>,
    order: BTreeSet<(i64, Uuid)>,
}

impl DueQueues {
    /// `queue_id` needs attention at `at_ms` (or at its earlier time, if it has one).
    pub fn arm(&self, queue_id: Uuid, at_ms: i64) {
        let mut timers = self.timers.lock().unwrap_or_else(|p| p.into_inner());
        match timers.by_queue.get(&queue_id) {
            Some(&armed) if armed <= at_ms => return,
            Some(&armed) => {
                timers.order.remove(&(armed, queue_id));
            }
            None => {}
        }
        timers.by_queue.insert(queue_id, at_ms);
        timers.order.insert((at_ms, queue_id));
        if timers.order.first() == Some(&(at_ms, queue_id)) {
            self.sooner.notify_one();
        }
    }

    /// Removes and returns the queues due by `now_ms`.
    pub fn take_due(&self, now_ms: i64) -> Vec<Uuid> {
        let mut timers = self.timers.lock().unwrap_or_else(|p| p.into_inner());
        let mut due = Vec::new();
        while let Some(&(at, queue_id)) = timers.order.first() {
            if at > now_ms {
                break;
            }
            timers.order.pop_first();
            timers.by_queue.remove(&queue_id);
            due.push(queue_id);
        }
        due
    }

    /// A deleted queue's timer goes with it.
    pub fn forget(&self, queue_id: Uuid) {
        let mut timers = self.timers.lock().unwrap_or_else(|p| p.into_inner());
        if let Some(armed) = timers.by_queue.remove(&queue_id) {
            timers.order.remove(&(armed, queue_id));
        }
    }

    /// The earliest armed time.
    pub fn next(&self) -> Option<i64> {
        let timers = self.timers.lock().unwrap_or_else(|p| p.into_inner());
        timers.order.first().map(|(at, _)| *at)
    }

    pub fn len(&self) -> usize {
        self.timers
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .by_queue
            .len()
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// Ends the current (or next) `wait` at once.
    pub fn nudge(&self) {
        self.sooner.notify_one();
    }

    /// Waits until the earliest armed time, an earlier arming, or `at_most`.
    pub async fn wait(&self, at_most: Duration) {
        let sleep = self.next().map_or(at_most, |at| {
            let ms = (at - Utc::now().timestamp_millis()).max(0) as u64;
            Duration::from_millis(ms).min(at_most)
        });
        tokio::select! {
            () = tokio::time::sleep(sleep) => {}
            () = self.sooner.notified() => {}
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn each_queue_keeps_its_earliest_time() {
        let due = DueQueues::default();
        let (a, b) = (Uuid::from_u128(1), Uuid::from_u128(2));
        due.arm(a, 300);
        due.arm(a, 500);
        due.arm(b, 200);
        due.arm(a, 100);
        assert_eq!(due.len(), 2);
        assert_eq!(due.next(), Some(100));
        assert_eq!(due.take_due(150), vec![a]);
        assert_eq!(due.take_due(150), Vec::<Uuid>::new());
        due.forget(b);
        assert!(due.is_empty());
    }

    #[tokio::test]
    async fn an_earlier_time_wakes_the_waiter() {
        let due = std::sync::Arc::new(DueQueues::default());
        let waiter = tokio::spawn({
            let due = due.clone();
            async move { due.wait(Duration::from_secs(30)).await }
        });
        tokio::task::yield_now().await;
        due.arm(Uuid::from_u128(1), 0);
        tokio::time::timeout(Duration::from_secs(5), waiter)
            .await
            .expect("woken by the earlier time")
            .expect("the waiting task ends without panicking");
    }
}
