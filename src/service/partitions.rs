//! Lists of every queue partition and every subscription, for the workers that sweep all of
//! them (recorder, scheduler, reclaimer). Read from PostgreSQL at most every `REFRESH` (or
//! sooner after a local change); while PostgreSQL is unreachable the last list is kept, so
//! the workers go on serving what they know.

use std::future::Future;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use tokio::sync::Notify;
use uuid::Uuid;

use crate::domain::subscription::Subscription;
use crate::error::ApiResult;
use crate::store::Store;

/// A list loaded from PostgreSQL and reused until it is `refresh` old or expired.
pub struct Snapshot<T> {
    refresh: Duration,
    cached: Mutex<(Option<Instant>, Arc<Vec<T>>)>,
}

impl<T> Snapshot<T> {
    fn new(refresh: Duration) -> Self {
        Snapshot {
            refresh,
            cached: Mutex::new((None, Arc::new(Vec::new()))),
        }
    }

    pub async fn current<F>(&self, load: F) -> Arc<Vec<T>>
    where
        F: Future<Output = ApiResult<Vec<T>>>,
    {
        let (fresh, list) = {
            let cached = self.cached.lock().unwrap_or_else(|p| p.into_inner());
            (
                cached.0.is_some_and(|at| at.elapsed() < self.refresh),
                cached.1.clone(),
            )
        };
        if fresh {
            return list;
        }
        match load.await {
            Ok(items) => {
                let items = Arc::new(items);
                *self.cached.lock().unwrap_or_else(|p| p.into_inner()) =
                    (Some(Instant::now()), items.clone());
                items
            }
            Err(error) => {
                tracing::debug!(error = %error, "list not refreshed; keeping the last one");
                list
            }
        }
    }

    /// Makes the next `current` load again.
    pub fn expire(&self) {
        self.cached.lock().unwrap_or_else(|p| p.into_inner()).0 = None;
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub struct PartitionRef {
    pub queue_id: Uuid,
    pub tenant_id: Uuid,
    pub partition: u16,
}

/// Every partition of every queue.
pub struct PartitionDirectory {
    snapshot: Snapshot<PartitionRef>,
}

impl Default for PartitionDirectory {
    fn default() -> Self {
        PartitionDirectory {
            snapshot: Snapshot::new(Duration::from_secs(2)),
        }
    }
}

impl PartitionDirectory {
    pub async fn current(&self, store: &Store) -> Arc<Vec<PartitionRef>> {
        self.snapshot
            .current(async {
                let queues = store.list_all_queue_partitions().await?;
                Ok(queues
                    .into_iter()
                    .flat_map(|queue| {
                        let count = u16::try_from(queue.partition_count.max(1)).unwrap_or(1);
                        (0..count).map(move |partition| PartitionRef {
                            queue_id: queue.id,
                            tenant_id: queue.tenant_id,
                            partition,
                        })
                    })
                    .collect())
            })
            .await
    }

    pub fn expire(&self) {
        self.snapshot.expire();
    }
}

/// Every subscription of every tenant. Refreshed often: the dispatcher must start and stop
/// serving a subscription changed on another instance within a second.
pub struct SubscriptionDirectory {
    snapshot: Snapshot<Subscription>,
    changed: Notify,
}

impl Default for SubscriptionDirectory {
    fn default() -> Self {
        SubscriptionDirectory {
            snapshot: Snapshot::new(Duration::from_millis(400)),
            changed: Notify::new(),
        }
    }
}

impl SubscriptionDirectory {
    pub async fn current(&self, store: &Store) -> Arc<Vec<Subscription>> {
        self.snapshot.current(store.list_all_subscriptions()).await
    }

    /// A subscription changed on this instance: reload now and wake who waits.
    pub fn expire(&self) {
        self.snapshot.expire();
        self.changed.notify_waiters();
    }

    /// Resolves at the next local change.
    pub async fn changed(&self) {
        self.changed.notified().await;
    }
}
