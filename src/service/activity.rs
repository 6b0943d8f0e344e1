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
use std::sync::Mutex;

use uuid::Uuid;

use super::changes::Changes;

#[derive(Default)]
pub struct ActiveQueues {
    queues: Mutex<HashSet<Uuid>>,
    grew: Changes,
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
            self.grew.bump();
        }
    }

    /// Every one of `queues` counts as active until looked at.
    pub fn mark_all(&self, queues: impl IntoIterator<Item = Uuid>) {
        self.queues
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .extend(queues);
        self.grew.bump();
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
        self.grew.count()
    }

    /// Resolves when a queue joins the set after `generation` was read.
    pub async fn grown_since(&self, generation: u64) {
        self.grew.since(generation).await
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
            .expect("the waiting task ends without panicking");
        // Growth before the call is not waited for.
        active.grown_since(generation).await;
    }
}
