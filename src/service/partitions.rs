//! The list of every queue partition, for the workers that sweep all of them (recorder,
//! scheduler). Read from PostgreSQL at most every `REFRESH` (or sooner after a local queue
//! create or delete); while PostgreSQL is unreachable the last list is kept, so the workers
//! go on serving the queues they know.

use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use uuid::Uuid;

use crate::store::Store;

const REFRESH: Duration = Duration::from_secs(2);

#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub struct PartitionRef {
    pub queue_id: Uuid,
    pub tenant_id: Uuid,
    pub partition: u16,
}

#[derive(Default)]
pub struct PartitionDirectory {
    cached: Mutex<(Option<Instant>, Arc<Vec<PartitionRef>>)>,
}

impl PartitionDirectory {
    /// The current list; refreshed first when it is older than `REFRESH`.
    pub async fn current(&self, store: &Store) -> Arc<Vec<PartitionRef>> {
        let (fresh, list) = {
            let cached = self
                .cached
                .lock()
                .unwrap_or_else(|poisoned| poisoned.into_inner());
            (
                cached.0.is_some_and(|at| at.elapsed() < REFRESH),
                cached.1.clone(),
            )
        };
        if fresh {
            return list;
        }
        match store.list_all_queue_partitions().await {
            Ok(queues) => {
                let partitions: Arc<Vec<PartitionRef>> = Arc::new(
                    queues
                        .into_iter()
                        .flat_map(|queue| {
                            let count = u16::try_from(queue.partition_count.max(1)).unwrap_or(1);
                            (0..count).map(move |partition| PartitionRef {
                                queue_id: queue.id,
                                tenant_id: queue.tenant_id,
                                partition,
                            })
                        })
                        .collect(),
                );
                let mut cached = self
                    .cached
                    .lock()
                    .unwrap_or_else(|poisoned| poisoned.into_inner());
                *cached = (Some(Instant::now()), partitions.clone());
                partitions
            }
            Err(error) => {
                tracing::debug!(error = %error, "partition list not refreshed");
                list
            }
        }
    }

    /// Makes the next `current` read PostgreSQL again (a queue was created or deleted).
    pub fn expire(&self) {
        let mut cached = self
            .cached
            .lock()
            .unwrap_or_else(|poisoned| poisoned.into_inner());
        cached.0 = None;
    }
}
