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

/// When a queue was last marked, in marks made by this instance: a look that read it before
/// running its script can tell whether a mark came in meanwhile.
pub type Stamp = Option<u64>;

#[derive(Default)]
pub struct ActiveQueues {
    queues: Mutex<Marks>,
}

#[derive(Default)]
struct Marks {
    by_queue: HashMap<Uuid, u64>,
    made: u64,
}

impl Marks {
    fn mark(&mut self, queue_id: Uuid) {
        self.made += 1;
        self.by_queue.insert(queue_id, self.made);
    }
}

impl ActiveQueues {
    fn lock(&self) -> std::sync::MutexGuard<'_, Marks> {
        self.queues.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// The queue may hold something now.
    pub fn mark(&self, queue_id: Uuid) {
        self.lock().mark(queue_id);
    }

    /// Every one of `queues` counts as active until looked at.
    pub fn mark_all(&self, queues: impl IntoIterator<Item = Uuid>) {
        let mut marks = self.lock();
        for queue_id in queues {
            marks.mark(queue_id);
        }
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
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn queues_join_and_leave() {
        let active = ActiveQueues::default();
        active.mark(Uuid::from_u128(1));
        active.mark(Uuid::from_u128(1));
        assert_eq!(active.len(), 1);
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
}
