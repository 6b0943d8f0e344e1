//! An in-process cache of queue configuration for the publish path, so a publish costs no
//! PostgreSQL round trip. Entries are fresh for `FRESH_FOR` (several instances converge
//! within it), dropped on local changes, and served stale while PostgreSQL is unreachable:
//! publishing to a known queue keeps working through a database outage.

use std::collections::HashMap;
use std::sync::{Arc, RwLock};
use std::time::{Duration, Instant};

use uuid::Uuid;

use crate::domain::queue::Queue;

const FRESH_FOR: Duration = Duration::from_secs(2);
/// Past this many entries, entries unused for `EVICT_AFTER` are dropped.
const SOFT_CAPACITY: usize = 10_000;
const EVICT_AFTER: Duration = Duration::from_secs(600);

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
