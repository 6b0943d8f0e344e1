//! Every queue and every subscription, for the workers (recorder, scheduler, reclaimer,
//! retention, dispatcher). Read from PostgreSQL when a change is heard of (made here, or
//! announced by another instance: `service::wake`) and at least every `SAFETY_REFRESH`;
//! while PostgreSQL is unreachable the last list is kept, so the workers go on serving what
//! they know.

use std::collections::HashMap;
use std::future::Future;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use uuid::Uuid;

use super::changes::Changes;
use crate::domain::subscription::Subscription;
use crate::error::ApiResult;
use crate::store::Store;

/// Changes are announced; this only bounds what a lost announcement can leave stale.
const SAFETY_REFRESH: Duration = Duration::from_secs(30);
/// A lookup of a queue the list lacks reloads it, at most this often.
const MISSING_RELOAD: Duration = Duration::from_secs(1);

/// A value loaded from PostgreSQL and reused until it is `refresh` old or expired.
///
/// Loads run one at a time (callers that find the value stale while another loads wait for
/// that load), and a load that began before an `expire` never stores its value as fresh: it
/// may have read the state from before the change.
pub struct Snapshot<T> {
    refresh: Duration,
    cached: Mutex<Cached<T>>,
    loading: tokio::sync::Mutex<()>,
}

struct Cached<T> {
    loaded_at: Option<Instant>,
    value: Arc<T>,
    /// Moves on every `expire`.
    generation: u64,
}

impl<T> Cached<T> {
    fn fresh(&self, refresh: Duration) -> Option<Arc<T>> {
        self.loaded_at
            .is_some_and(|at| at.elapsed() < refresh)
            .then(|| self.value.clone())
    }
}

impl<T: Default> Snapshot<T> {
    fn new(refresh: Duration) -> Self {
        Snapshot {
            refresh,
            cached: Mutex::new(Cached {
                loaded_at: None,
                value: Arc::new(T::default()),
                generation: 0,
            }),
            loading: tokio::sync::Mutex::new(()),
        }
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, Cached<T>> {
        self.cached.lock().unwrap_or_else(|p| p.into_inner())
    }

    pub async fn current<F>(&self, load: F) -> Arc<T>
    where
        F: Future<Output = ApiResult<T>>,
    {
        if let Some(fresh) = self.lock().fresh(self.refresh) {
            return fresh;
        }
        let _loading = self.loading.lock().await;
        let generation = {
            let cached = self.lock();
            if let Some(fresh) = cached.fresh(self.refresh) {
                return fresh;
            }
            cached.generation
        };
        match load.await {
            Ok(loaded) => {
                let loaded = Arc::new(loaded);
                let mut cached = self.lock();
                cached.value = loaded.clone();
                // Expired while loading: serve it, but load again next time.
                cached.loaded_at = (cached.generation == generation).then(Instant::now);
                loaded
            }
            Err(error) => {
                tracing::debug!(error = %error, "list not refreshed; keeping the last one");
                self.lock().value.clone()
            }
        }
    }

    /// Makes the next `current` load again.
    pub fn expire(&self) {
        let mut cached = self.lock();
        cached.loaded_at = None;
        cached.generation += 1;
    }

    /// How long ago the value was loaded.
    fn age(&self) -> Option<Duration> {
        self.lock().loaded_at.map(|at| at.elapsed())
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub struct PartitionRef {
    pub queue_id: Uuid,
    pub tenant_id: Uuid,
    pub partition: u16,
}

/// What the workers need of a queue.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub struct QueueRef {
    pub id: Uuid,
    pub tenant_id: Uuid,
    pub partition_count: u16,
    pub retention_ms: u64,
}

impl QueueRef {
    pub fn partitions(&self) -> impl Iterator<Item = PartitionRef> + '_ {
        (0..self.partition_count).map(|partition| PartitionRef {
            queue_id: self.id,
            tenant_id: self.tenant_id,
            partition,
        })
    }
}

/// Every queue, by id.
pub struct QueueDirectory {
    snapshot: Snapshot<HashMap<Uuid, QueueRef>>,
}

impl Default for QueueDirectory {
    fn default() -> Self {
        QueueDirectory {
            snapshot: Snapshot::new(SAFETY_REFRESH),
        }
    }
}

impl QueueDirectory {
    pub async fn all(&self, store: &Store) -> Arc<HashMap<Uuid, QueueRef>> {
        self.snapshot
            .current(async {
                let queues = store.list_all_queue_partitions().await?;
                Ok(queues
                    .into_iter()
                    .map(|queue| {
                        let reference = QueueRef {
                            id: queue.id,
                            tenant_id: queue.tenant_id,
                            partition_count: u16::try_from(queue.partition_count.max(1))
                                .unwrap_or(1),
                            retention_ms: queue.retention_ms.max(0) as u64,
                        };
                        (queue.id, reference)
                    })
                    .collect())
            })
            .await
    }

    /// The queues of `ids` that exist, and the ids of those that do not. A queue the list
    /// lacks may be newer than the list: the list is read again first (at most every
    /// `MISSING_RELOAD`).
    pub async fn lookup(&self, store: &Store, ids: &[Uuid]) -> (Vec<QueueRef>, Vec<Uuid>) {
        let mut all = self.all(store).await;
        if ids.iter().any(|id| !all.contains_key(id))
            && self.snapshot.age().is_none_or(|age| age >= MISSING_RELOAD)
        {
            self.snapshot.expire();
            all = self.all(store).await;
        }
        let mut found = Vec::with_capacity(ids.len());
        let mut missing = Vec::new();
        for id in ids {
            match all.get(id) {
                Some(queue) => found.push(*queue),
                None => missing.push(*id),
            }
        }
        (found, missing)
    }

    pub fn expire(&self) {
        self.snapshot.expire();
    }
}

/// Every subscription of every tenant, and where each is in the list.
#[derive(Default)]
pub struct Subscriptions {
    list: Vec<Subscription>,
    by_id: HashMap<Uuid, usize>,
    by_queue: HashMap<Uuid, Vec<usize>>,
}

impl Subscriptions {
    fn new(list: Vec<Subscription>) -> Self {
        let by_id = list.iter().enumerate().map(|(n, s)| (s.id, n)).collect();
        let mut by_queue: HashMap<Uuid, Vec<usize>> = HashMap::new();
        for (n, subscription) in list.iter().enumerate() {
            by_queue.entry(subscription.queue_id).or_default().push(n);
        }
        Subscriptions {
            list,
            by_id,
            by_queue,
        }
    }

    pub fn get(&self, id: Uuid) -> Option<&Subscription> {
        self.by_id.get(&id).map(|&n| &self.list[n])
    }

    /// The subscriptions of one queue, oldest first.
    pub fn of_queue(&self, queue_id: Uuid) -> impl Iterator<Item = &Subscription> {
        self.by_queue
            .get(&queue_id)
            .into_iter()
            .flatten()
            .map(|&n| &self.list[n])
    }
}

impl std::ops::Deref for Subscriptions {
    type Target = [Subscription];

    fn deref(&self) -> &[Subscription] {
        &self.list
    }
}

/// Every subscription of every tenant.
pub struct SubscriptionDirectory {
    snapshot: Snapshot<Subscriptions>,
    changes: Changes,
}

impl Default for SubscriptionDirectory {
    fn default() -> Self {
        SubscriptionDirectory {
            snapshot: Snapshot::new(SAFETY_REFRESH),
            changes: Changes::default(),
        }
    }
}

impl SubscriptionDirectory {
    pub async fn current(&self, store: &Store) -> Arc<Subscriptions> {
        self.snapshot
            .current(async { store.list_all_subscriptions().await.map(Subscriptions::new) })
            .await
    }

    /// One subscription as the list has it (reloaded once per change, whoever asks): a long
    /// poll woken by a change reads it here, not from PostgreSQL, so changes of any tenant
    /// cost one load per instance, not one query per waiting poll.
    pub async fn find(&self, store: &Store, id: Uuid) -> Option<Subscription> {
        self.current(store).await.get(id).cloned()
    }

    /// A subscription changed (here or elsewhere): reload now and wake who waits.
    pub fn expire(&self) {
        self.snapshot.expire();
        self.changes.bump();
    }

    /// Counts changes, for `changed_since`.
    pub fn changes(&self) -> u64 {
        self.changes.count()
    }

    /// Resolves at the first change after `changes` was read (at once if one happened).
    pub async fn changed_since(&self, changes: u64) {
        self.changes.since(changes).await
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn a_load_that_began_before_a_change_is_not_kept_as_fresh() {
        let snapshot: Snapshot<u32> = Snapshot::new(Duration::from_secs(60));
        let (started_tx, started_rx) = tokio::sync::oneshot::channel::<()>();
        let (finish_tx, finish_rx) = tokio::sync::oneshot::channel::<()>();
        let slow_load = async {
            started_tx.send(()).expect("the change side waits for this");
            finish_rx.await.expect("the change side finishes the load");
            Ok(1)
        };
        let change = async {
            started_rx.await.expect("the load side starts");
            // The change lands while the old state is being read.
            snapshot.expire();
            finish_tx.send(()).expect("the load side waits for this");
        };
        let (loaded, ()) = tokio::join!(snapshot.current(slow_load), change);
        assert_eq!(*loaded, 1, "the load's value is served to its caller");
        let reloaded = snapshot.current(async { Ok(2) }).await;
        assert_eq!(
            *reloaded, 2,
            "the next caller loads again instead of trusting it"
        );
        let cached = snapshot.current(async { Ok(3) }).await;
        assert_eq!(*cached, 2, "a load after the change is fresh");
    }
}
