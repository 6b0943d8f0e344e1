//! The partitions this instance wrote entries into (messages, delivery outcomes, releases,
//! cancellations) that its recorder has not read since. The recorder reads only these,
//! at once, so its work follows what is written, not how many queues exist. What another
//! instance wrote, it records itself; what an instance that died left unread is found by
//! every recorder's sweep of the active queues (`workers::recorder`).

use std::collections::HashSet;
use std::sync::Mutex;

use super::changes::Changes;
use super::partitions::PartitionRef;
use crate::domain::queue::Queue;

#[derive(Default)]
pub struct UnrecordedWrites {
    partitions: Mutex<HashSet<PartitionRef>>,
    marked: Changes,
}

impl UnrecordedWrites {
    /// Call after the write answered (or failed in flight): a read after this mark sees it.
    pub fn mark(&self, partitions: impl IntoIterator<Item = PartitionRef>) {
        let grew = {
            let mut marked = self.partitions.lock().unwrap_or_else(|p| p.into_inner());
            let before = marked.len();
            marked.extend(partitions);
            marked.len() > before
        };
        if grew {
            self.marked.bump();
        }
    }

    /// `partitions` of `queue` were written.
    pub fn mark_in(&self, queue: &Queue, partitions: impl IntoIterator<Item = u16>) {
        drop(self.marking(queue, partitions));
    }

    /// Marks `partitions` of `queue` when dropped: hold it across a write, so that the mark
    /// is made after Redis answered, or when the request is dropped while it waited (the
    /// script may have run).
    pub fn marking<'a>(
        &'a self,
        queue: &Queue,
        partitions: impl IntoIterator<Item = u16>,
    ) -> Marking<'a> {
        Marking {
            writes: self,
            partitions: partitions
                .into_iter()
                .map(|partition| PartitionRef {
                    queue_id: queue.id,
                    tenant_id: queue.tenant_id,
                    partition,
                })
                .collect(),
        }
    }

    /// Everything marked so far; marks made afterwards are taken by the next call.
    pub fn take(&self) -> Vec<PartitionRef> {
        let mut marked = self.partitions.lock().unwrap_or_else(|p| p.into_inner());
        let taken = marked.drain().collect();
        if marked.capacity() > 1024 {
            marked.shrink_to_fit();
        }
        taken
    }

    /// Marks so far, for `marked_since`.
    pub fn count(&self) -> u64 {
        self.marked.count()
    }

    /// Resolves when a partition was marked after `count` was read.
    pub async fn marked_since(&self, count: u64) {
        self.marked.since(count).await
    }
}

pub struct Marking<'a> {
    writes: &'a UnrecordedWrites,
    partitions: Vec<PartitionRef>,
}

impl Drop for Marking<'_> {
    fn drop(&mut self) {
        self.writes.mark(self.partitions.drain(..));
    }
}

#[cfg(test)]
mod tests {
    use uuid::Uuid;

    use super::*;

    fn partition(n: u16) -> PartitionRef {
        PartitionRef {
            queue_id: Uuid::from_u128(1),
            tenant_id: Uuid::from_u128(2),
            partition: n,
        }
    }

    #[tokio::test]
    async fn a_mark_after_the_count_wakes_the_reader_and_is_taken_once() {
        let writes = UnrecordedWrites::default();
        let count = writes.count();
        writes.mark([partition(0), partition(1), partition(0)]);
        writes.marked_since(count).await;
        let mut taken = writes.take();
        taken.sort_by_key(|p| p.partition);
        assert_eq!(taken, [partition(0), partition(1)]);
        assert!(writes.take().is_empty());
        let count = writes.count();
        writes.mark([partition(1)]);
        assert_ne!(
            writes.count(),
            count,
            "a partition marked again after its take"
        );
    }
}
