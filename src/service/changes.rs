//! A count of changes that tasks can wait on: read the count, do the work, then wait for a
//! change after that count. A change between the read and the wait is not missed.

use std::sync::atomic::{AtomicU64, Ordering};

use tokio::sync::Notify;

#[derive(Default)]
pub struct Changes {
    count: AtomicU64,
    changed: Notify,
}

impl Changes {
    /// Records a change and wakes every waiter.
    pub fn bump(&self) {
        self.count.fetch_add(1, Ordering::Relaxed);
        self.changed.notify_waiters();
    }

    /// Changes so far, for `since`.
    pub fn count(&self) -> u64 {
        self.count.load(Ordering::Relaxed)
    }

    /// Resolves at the first change after `count` was read (at once if one happened).
    pub async fn since(&self, count: u64) {
        let changed = self.changed.notified();
        tokio::pin!(changed);
        changed.as_mut().enable();
        if self.count() == count {
            changed.await;
        }
    }
}

#[cfg(test)]
mod tests {
    use std::sync::Arc;
    use std::time::Duration;

    use super::*;

    #[tokio::test]
    async fn a_change_after_the_count_wakes_and_one_before_it_does_not_wait() {
        let changes = Arc::new(Changes::default());
        let count = changes.count();
        let waiter = tokio::spawn({
            let changes = changes.clone();
            async move { changes.since(count).await }
        });
        tokio::task::yield_now().await;
        changes.bump();
        tokio::time::timeout(Duration::from_secs(5), waiter)
            .await
            .expect("woken by the change")
            .expect("the waiting task ends without panicking");
        // The change happened after `count`: no wait.
        changes.since(count).await;
    }
}
