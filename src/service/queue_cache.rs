//! An in-process cache of queue configuration for the publish path, so a publish costs no
//! PostgreSQL round trip. Entries are fresh for `FRESH_FOR` (several instances converge
//! within it), dropped on local changes, and served stale while PostgreSQL is unreachable:
//! publishing to a queue in use keeps working through a database outage. Past
//! `SOFT_CAPACITY` entries, those not loaded for `EVICT_AFTER` go (and the older half, if
//! that is not enough), so the cache follows the queues in use rather than every queue ever
//! looked up.

use std::collections::HashMap;
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

    pub fn put(&self, entry: ResolvedQueue) {
        if let Ok(mut entries) = self.entries.write() {
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
            entries.remove(&(tenant_id, name.to_owned()));
        }
    }
}
