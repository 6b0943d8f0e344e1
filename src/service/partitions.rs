//! Every queue and every subscription, for the workers (recorder, scheduler, reclaimer,
//! retention, dispatcher). A change made here or announced by another instance
//! (`service::wake`) names what it touched, and only that is read again from PostgreSQL and
//! patched into the list; the whole list is read at least every `SAFETY_REFRESH`, and when
//! this instance may have missed changes (a lost announcement connection). While
//! PostgreSQL is unreachable the last list is kept, so the workers go on serving what they
//! know.

use std::collections::{HashMap, HashSet};
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
    /// Ids changed since the value was loaded or patched (with the number of their latest
    /// touch): read again at the next `current`. They stay here until a read that began
    /// after their touch is stored, so nobody takes the value as fresh meanwhile.
    touched: HashMap<Uuid, u64>,
    touches: u64,
}

impl<T> Cached<T> {
    fn fresh(&self, refresh: Duration) -> Option<Arc<T>> {
        (self.touched.is_empty() && self.loaded_at.is_some_and(|at| at.elapsed() < refresh))
            .then(|| self.value.clone())
    }
}

/// How a value takes in what changed: the ids touched, read again (`reload`), then put in
/// place of what the value had under those ids (`patch`).
pub trait Patchable: Sized {
    fn patch(&self, touched: &HashSet<Uuid>, reloaded: Vec<Self::Item>) -> Self;
    type Item;
}

impl<T: Default + Patchable> Snapshot<T> {
    fn new(refresh: Duration) -> Self {
        Snapshot {
            refresh,
            cached: Mutex::new(Cached {
                loaded_at: None,
                value: Arc::new(T::default()),
                generation: 0,
                touched: HashMap::new(),
                touches: 0,
            }),
            loading: tokio::sync::Mutex::new(()),
        }
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, Cached<T>> {
        self.cached.lock().unwrap_or_else(|p| p.into_inner())
    }

    #[cfg(test)]
    pub async fn current<F>(&self, load: F) -> Arc<T>
    where
        F: Future<Output = ApiResult<T>>,
    {
        self.current_patched(load, |_| async { Ok(Vec::new()) })
            .await
    }

    /// The value: as it is while fresh; patched with what `reload` reads of the ids touched
    /// since (when nothing else is stale); else loaded whole.
    pub async fn current_patched<F, R, Fut>(&self, load: F, reload: R) -> Arc<T>
    where
        T: Patchable,
        F: Future<Output = ApiResult<T>>,
        R: FnOnce(Vec<Uuid>) -> Fut,
        Fut: Future<Output = ApiResult<Vec<T::Item>>>,
    {
        if let Some(fresh) = self.lock().fresh(self.refresh) {
            return fresh;
        }
        let _loading = self.loading.lock().await;
        let (generation, touched, whole) = {
            let cached = self.lock();
            if let Some(fresh) = cached.fresh(self.refresh) {
                return fresh;
            }
            // Touches from here on are read again by the next call: this read may precede them.
            let touched: HashSet<Uuid> = cached.touched.keys().copied().collect();
            let whole = cached
                .loaded_at
                .is_none_or(|at| at.elapsed() >= self.refresh);
            (cached.generation, (touched, cached.touches), whole)
        };
        let (touched, touches) = touched;
        let read = if whole {
            load.await
        } else {
            let ids: Vec<Uuid> = touched.iter().copied().collect();
            let value = self.lock().value.clone();
            reload(ids)
                .await
                .map(|reloaded| value.patch(&touched, reloaded))
        };
        match read {
            Ok(read) => {
                let read = Arc::new(read);
                let mut cached = self.lock();
                cached.value = read.clone();
                cached.touched.retain(|_, touch| *touch > touches);
                if whole {
                    // Expired while loading: serve it, but load again next time.
                    cached.loaded_at = (cached.generation == generation).then(Instant::now);
                } else if cached.generation != generation {
                    cached.loaded_at = None;
                }
                read
            }
            Err(error) => {
                tracing::debug!(error = %error, "list not refreshed; keeping the last one");
                self.lock().value.clone()
            }
        }
    }

    /// The value as last read, reading nothing (for when PostgreSQL is down).
    pub fn last(&self) -> Arc<T> {
        self.lock().value.clone()
    }

    /// Only `id` changed: the next `current_patched` reads it again (and only it).
    pub fn touch(&self, id: Uuid) {
        let mut cached = self.lock();
        cached.touches += 1;
        let touch = cached.touches;
        cached.touched.insert(id, touch);
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

impl From<crate::store::records::QueuePartitions> for QueueRef {
    fn from(queue: crate::store::records::QueuePartitions) -> Self {
        QueueRef {
            id: queue.id,
            tenant_id: queue.tenant_id,
            partition_count: u16::try_from(queue.partition_count.max(1)).unwrap_or(1),
            retention_ms: queue.retention_ms.max(0) as u64,
        }
    }
}

impl Patchable for HashMap<Uuid, QueueRef> {
    type Item = QueueRef;

    fn patch(&self, touched: &HashSet<Uuid>, reloaded: Vec<QueueRef>) -> Self {
        let mut patched = self.clone();
        for id in touched {
            patched.remove(id);
        }
        patched.extend(reloaded.into_iter().map(|queue| (queue.id, queue)));
        patched
    }
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
            .current_patched(
                async {
                    let queues = store.list_all_queue_partitions().await?;
                    Ok(queues
                        .into_iter()
                        .map(|queue| (queue.id, QueueRef::from(queue)))
                        .collect())
                },
                async |ids: Vec<Uuid>| {
                    let queues = store.queue_partitions_by_ids(&ids).await?;
                    Ok(queues.into_iter().map(QueueRef::from).collect())
                },
            )
            .await
    }

    /// Only this queue changed (created, changed, deleted): read it alone again.
    pub fn touch(&self, queue_id: Uuid) {
        self.snapshot.touch(queue_id);
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
    /// Oldest first (created, then id).
    list: Vec<Arc<Subscription>>,
    by_id: HashMap<Uuid, usize>,
    by_queue: HashMap<Uuid, Vec<usize>>,
}

impl Subscriptions {
    fn new(mut list: Vec<Arc<Subscription>>) -> Self {
        list.sort_by_key(|s| (s.created_at, s.id));
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
        self.by_id.get(&id).map(|&n| &*self.list[n])
    }

    /// The subscriptions of one queue, oldest first.
    pub fn of_queue(&self, queue_id: Uuid) -> impl Iterator<Item = &Subscription> {
        self.by_queue
            .get(&queue_id)
            .into_iter()
            .flatten()
            .map(|&n| &*self.list[n])
    }
}

impl Patchable for Subscriptions {
    type Item = Subscription;

    fn patch(&self, touched: &HashSet<Uuid>, reloaded: Vec<Subscription>) -> Self {
        let kept = self
            .list
            .iter()
            .filter(|s| !touched.contains(&s.id))
            .cloned();
        Subscriptions::new(kept.chain(reloaded.into_iter().map(Arc::new)).collect())
    }
}

impl std::ops::Deref for Subscriptions {
    type Target = [Arc<Subscription>];

    fn deref(&self) -> &[Arc<Subscription>] {
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
            .current_patched(
                async {
                    let all = store.list_all_subscriptions().await?;
                    Ok(Subscriptions::new(all.into_iter().map(Arc::new).collect()))
                },
                async |ids: Vec<Uuid>| store.subscriptions_by_ids(&ids).await,
            )
            .await
    }

    /// One subscription as the list has it (reloaded once per change, whoever asks): a long
    /// poll woken by a change reads it here, not from PostgreSQL, so changes of any tenant
    /// cost one load per instance, not one query per waiting poll.
    pub async fn find(&self, store: &Store, id: Uuid) -> Option<Subscription> {
        self.current(store).await.get(id).cloned()
    }

    /// One subscription as the list last had it, reading nothing: for when PostgreSQL is
    /// unreachable (a reload would only wait for it to fail).
    pub fn last_known(&self, id: Uuid) -> Option<Subscription> {
        self.snapshot.last().get(id).cloned()
    }

    /// Any subscription may have changed (this instance missed announcements): reload the
    /// whole list now and wake who waits.
    pub fn expire(&self) {
        self.snapshot.expire();
        self.changes.bump();
    }

    /// One subscription was created, changed or deleted (here or elsewhere): read it alone
    /// again and wake who waits.
    pub fn changed(&self, subscription_id: Uuid) {
        self.snapshot.touch(subscription_id);
        self.changes.bump();
    }

    /// A queue was deleted, and its subscriptions with it: some may be in a read in flight
    /// and not yet in the list, so the whole list is read again (queue deletions are rare
    /// and rate limited).
    pub fn queue_gone(&self) {
        self.expire();
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

    impl Patchable for u32 {
        type Item = u32;

        fn patch(&self, _: &HashSet<Uuid>, reloaded: Vec<u32>) -> Self {
            reloaded.into_iter().sum::<u32>() + self
        }
    }

    #[tokio::test]
    async fn while_a_touched_id_is_read_again_nobody_takes_the_old_value_as_fresh() {
        let snapshot: Snapshot<u32> = Snapshot::new(Duration::from_secs(60));
        let nothing = |_: Vec<Uuid>| async { Ok(Vec::new()) };
        assert_eq!(*snapshot.current_patched(async { Ok(1) }, nothing).await, 1);
        snapshot.touch(Uuid::from_u128(1));
        let (started_tx, started_rx) = tokio::sync::oneshot::channel::<()>();
        let (finish_tx, finish_rx) = tokio::sync::oneshot::channel::<()>();
        let slow_patch = snapshot.current_patched(async { Ok(0) }, |ids: Vec<Uuid>| async move {
            assert_eq!(ids, [Uuid::from_u128(1)], "only the touched id is read");
            started_tx.send(()).expect("the other side waits for this");
            finish_rx.await.expect("the other side finishes the read");
            Ok(vec![10])
        });
        let meanwhile = async {
            started_rx.await.expect("the patch starts");
            let reader = snapshot.current_patched(async { Ok(0) }, |_| async { Ok(vec![100]) });
            tokio::pin!(reader);
            assert!(
                futures_poll_once(&mut reader).await.is_none(),
                "a reader waits for the patch in flight instead of taking the old value"
            );
            finish_tx.send(()).expect("the patch waits for this");
            reader.await
        };
        let (patched, read) = tokio::join!(slow_patch, meanwhile);
        assert_eq!(*patched, 11);
        assert_eq!(*read, 11, "the reader gets the patched value, fresh");
    }

    /// Polls `future` once: its output if it was ready.
    async fn futures_poll_once<F: Future + Unpin>(future: &mut F) -> Option<F::Output> {
        std::future::poll_fn(|context| {
            std::task::Poll::Ready(match std::pin::Pin::new(&mut *future).poll(context) {
                std::task::Poll::Ready(output) => Some(output),
                std::task::Poll::Pending => None,
            })
        })
        .await
    }

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
