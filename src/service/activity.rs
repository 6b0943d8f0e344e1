//! Which queues may hold anything (messages, delayed messages, deliveries in flight, journal
//! entries), as this instance knows it. The sweeping workers (scheduler, reclaimer,
//! retention, recorder) visit only these, so idle queues and their subscriptions cost
//! nothing however many there are.
//!
//! A queue becomes active when this instance stores into it or hears that another did
//! (`service::wake`); it leaves the set when the scheduler finds it empty, in the same
//! script that clears its `announced` key, so the next publish anywhere announces it again.
//! At start, after a lost Pub/Sub connection and every `FULL_LOOK`, every queue counts as
//! active until looked at: nothing announced while this instance was not listening is
//! missed.

use std::collections::HashSet;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Mutex;

use tokio::sync::Notify;
use uuid::Uuid;

#[derive(Default)]
pub struct ActiveQueues {
    queues: Mutex<HashSet<Uuid>>,
    generation: AtomicU64,
    grew: Notify,
}

impl ActiveQueues {
    /// The queue may hold something now.
    pub fn mark(&self, queue_id: Uuid) {
        let added = self
            .queues
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .insert(queue_id);
        if added {
            self.grown();
        }
    }

    /// Every one of `queues` counts as active until looked at.
    pub fn mark_all(&self, queues: impl IntoIterator<Item = Uuid>) {
        self.queues
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .extend(queues);
        self.grown();
    }

    /// The queue was found empty, or deleted.
    pub fn forget(&self, queue_id: Uuid) {
        self.queues
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .remove(&queue_id);
    }

    pub fn contains(&self, queue_id: Uuid) -> bool {
        self.queues
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .contains(&queue_id)
    }

    pub fn snapshot(&self) -> Vec<Uuid> {
        let queues = self.queues.lock().unwrap_or_else(|p| p.into_inner());
        queues.iter().copied().collect()
    }

    pub fn len(&self) -> usize {
        self.queues.lock().unwrap_or_else(|p| p.into_inner()).len()
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// Changes whenever a queue joins the set.
    pub fn generation(&self) -> u64 {
        self.generation.load(Ordering::Relaxed)
    }

    /// Resolves when a queue joins the set after this call.
    pub async fn grown_since(&self, generation: u64) {
        let grew = self.grew.notified();
        tokio::pin!(grew);
        grew.as_mut().enable();
        if self.generation() == generation {
            grew.await;
        }
    }

    fn grown(&self) {
        self.generation.fetch_add(1, Ordering::Relaxed);
        self.grew.notify_waiters();
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn queues_join_and_leave() {
        let active = ActiveQueues::default();
        let before = active.generation();
        active.mark(Uuid::from_u128(1));
        active.mark(Uuid::from_u128(1));
        assert_eq!(active.generation(), before + 1);
        active.mark_all([Uuid::from_u128(2), Uuid::from_u128(3)]);
        assert_eq!(active.len(), 3);
        active.forget(Uuid::from_u128(2));
        assert!(!active.contains(Uuid::from_u128(2)));
        assert!(active.contains(Uuid::from_u128(3)));
    }

    #[tokio::test]
    async fn waiters_hear_growth() {
        let active = std::sync::Arc::new(ActiveQueues::default());
        let generation = active.generation();
        let waiter = tokio::spawn({
            let active = active.clone();
            async move { active.grown_since(generation).await }
        });
        tokio::task::yield_now().await;
        active.mark(Uuid::from_u128(1));
        tokio::time::timeout(std::time::Duration::from_secs(5), waiter)
            .await
            .expect("woken")
            .unwrap();
        // Growth before the call is not waited for.
        active.grown_since(generation).await;
    }
}
