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

use std::collections::HashMap;
use std::sync::Mutex;

use uuid::Uuid;

use super::changes::Changes;

/// When a queue was last marked, in marks made by this instance: a look that read it before
/// running its script can tell whether a mark came in meanwhile.
pub type Stamp = Option<u64>;

#[derive(Default)]
pub struct ActiveQueues {
    queues: Mutex<Marks>,
    grew: Changes,
}

#[derive(Default)]
struct Marks {
    by_queue: HashMap<Uuid, u64>,
    made: u64,
}

impl Marks {
    fn mark(&mut self, queue_id: Uuid) -> bool {
        self.made += 1;
        self.by_queue.insert(queue_id, self.made).is_none()
    }
}

impl ActiveQueues {
    fn lock(&self) -> std::sync::MutexGuard<'_, Marks> {
        self.queues.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// The queue may hold something now.
    pub fn mark(&self, queue_id: Uuid) {
        if self.lock().mark(queue_id) {
            self.grew.bump();
        }
    }

    /// Every one of `queues` counts as active until looked at.
    pub fn mark_all(&self, queues: impl IntoIterator<Item = Uuid>) {
        {
            let mut marks = self.lock();
            for queue_id in queues {
                marks.mark(queue_id);
            }
        }
        self.grew.bump();
    }

    /// The queue's last mark, to read before looking at it (`forget_unless_marked_since`).
    pub fn stamp(&self, queue_id: Uuid) -> Stamp {
        self.lock().by_queue.get(&queue_id).copied()
    }

    /// The queue was found empty by a look that read `stamp` first: it leaves the set, unless
    /// it was marked since (a publish racing the look must not be forgotten).
    pub fn forget_unless_marked_since(&self, queue_id: Uuid, stamp: Stamp) {
        let mut marks = self.lock();
        if marks.by_queue.get(&queue_id).copied() == stamp {
            marks.by_queue.remove(&queue_id);
        }
    }

    /// The queue was deleted.
    pub fn forget(&self, queue_id: Uuid) {
        self.lock().by_queue.remove(&queue_id);
    }

    pub fn contains(&self, queue_id: Uuid) -> bool {
        self.lock().by_queue.contains_key(&queue_id)
    }

    pub fn snapshot(&self) -> Vec<Uuid> {
        self.lock().by_queue.keys().copied().collect()
    }

    pub fn len(&self) -> usize {
        self.lock().by_queue.len()
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

    #[test]
    fn a_mark_during_a_look_keeps_the_queue() {
        let active = ActiveQueues::default();
        let queue = Uuid::from_u128(1);
        active.mark(queue);
        let seen = active.stamp(queue);
        // A publish lands after the look read the stamp and before it found the queue empty.
        active.mark(queue);
        active.forget_unless_marked_since(queue, seen);
        assert!(active.contains(queue), "the later mark stands");
        let seen = active.stamp(queue);
        active.forget_unless_marked_since(queue, seen);
        assert!(
            !active.contains(queue),
            "with no mark since, the empty queue leaves"
        );
        // Not in the set when looked at, marked meanwhile: kept.
        active.mark(queue);
        active.forget_unless_marked_since(queue, None);
        assert!(active.contains(queue));
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
