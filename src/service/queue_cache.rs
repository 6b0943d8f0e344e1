//! An in-process cache of queue configuration for the publish path, so a publish costs no
//! PostgreSQL round trip. Entries are fresh for `FRESH_FOR` (several instances converge
//! within it), dropped on local changes, and served stale while PostgreSQL is unreachable:
//! publishing to a queue in use keeps working through a database outage. Past
//! `SOFT_CAPACITY` entries, those not loaded for `EVICT_AFTER` go (and the older half, if
//! that is not enough), so the cache follows the queues in use rather than every queue ever
//! looked up.

use std::collections::HashMap;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, RwLock};
use std::time::{Duration, Instant};

use uuid::Uuid;

use crate::domain::queue::Queue;

const FRESH_FOR: Duration = Duration::from_secs(2);
/// Past this many entries, entries not loaded for `EVICT_AFTER` are dropped.
const SOFT_CAPACITY: usize = 1024;
const EVICT_AFTER: Duration = Duration::from_secs(60);

/// A queue with its compiled payload schema (or why its stored schema cannot be used).
#[derive(Clone)]
pub struct ResolvedQueue {
    pub queue: Arc<Queue>,
    pub schema: Option<Result<Arc<jsonschema::Validator>, String>>,
}

#[derive(Default)]
pub struct QueueCache {
    entries: RwLock<HashMap<(Uuid, String), (Instant, ResolvedQueue)>>,
    /// Moves on every invalidation: a load that began before one may hold the state from
    /// before the change, and is not cached.
    invalidations: AtomicU64,
}

pub enum Lookup {
    Fresh(ResolvedQueue),
    Stale(ResolvedQueue),
    Missing,
}

impl QueueCache {
    pub fn lookup(&self, tenant_id: Uuid, name: &str) -> Lookup {
        let Ok(entries) = self.entries.read() else {
            return Lookup::Missing;
        };
        match entries.get(&(tenant_id, name.to_owned())) {
            Some((loaded, entry)) if loaded.elapsed() < FRESH_FOR => Lookup::Fresh(entry.clone()),
            Some((_, entry)) => Lookup::Stale(entry.clone()),
            None => Lookup::Missing,
        }
    }

    /// Read before loading a queue, for `put`.
    pub fn generation(&self) -> u64 {
        self.invalidations.load(Ordering::SeqCst)
    }

    /// Caches a queue loaded after `generation` was read, unless an invalidation came in
    /// meanwhile.
    pub fn put(&self, entry: ResolvedQueue, generation: u64) {
        if let Ok(mut entries) = self.entries.write() {
            if self.generation() != generation {
                return;
            }
            if entries.len() >= SOFT_CAPACITY {
                entries.retain(|_, (loaded, _)| loaded.elapsed() < EVICT_AFTER);
            }
            if entries.len() >= SOFT_CAPACITY {
                // Still full of recent entries: keep the newer half.
                let mut ages: Vec<Instant> = entries.values().map(|(loaded, _)| *loaded).collect();
                ages.sort_unstable();
                let cutoff = ages[ages.len() / 2];
                entries.retain(|_, (loaded, _)| *loaded >= cutoff);
            }
            let key = (entry.queue.tenant_id, entry.queue.name.clone());
            entries.insert(key, (Instant::now(), entry));
        }
    }

    pub fn invalidate(&self, tenant_id: Uuid, name: &str) {
        if let Ok(mut entries) = self.entries.write() {
            self.invalidations.fetch_add(1, Ordering::SeqCst);
            entries.remove(&(tenant_id, name.to_owned()));
        }
    }
}
