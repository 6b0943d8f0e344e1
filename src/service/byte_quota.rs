//! The byte quota (`TENANT_MAX_BYTES`): payload bytes a tenant stores, over all its queues.
//! Each queue keeps its own total in Redis (`stored`, kept by the publish, trim and purge
//! scripts); an instance reads a tenant's sum at most every `FRESH_FOR` and adds what it
//! published since, so a tenant passes its quota by at most what other instances took in
//! within that time. Reading the sum costs the tenant's own queues, nobody else's.
//!
//! The system queues (`audit-logs` and the others platform services write through the
//! internal API) do not count: the tenant does not write them, and their `maxLength` bounds
//! them.

use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use uuid::Uuid;

use crate::error::{ApiError, ApiResult};
use crate::state::AppState;

const FRESH_FOR: Duration = Duration::from_secs(1);
/// A tenant's list of queues is read again at most this often: another instance's new queue
/// counts after it.
const QUEUES_FRESH_FOR: Duration = Duration::from_secs(10);
/// Tenants not heard from for this long are forgotten (read afresh when they come back).
const FORGET_AFTER: Duration = Duration::from_secs(60);

#[derive(Default)]
pub struct ByteQuotas {
    usage: Mutex<Usage>,
}

#[derive(Default)]
struct Usage {
    by_tenant: HashMap<Uuid, TenantUsage>,
    pruned: Option<Instant>,
}

struct TenantUsage {
    bytes: Option<(u64, Instant)>,
    queues: Option<(Arc<[Uuid]>, Instant)>,
    /// A request is reading the tenant's total: the others use the last one meanwhile.
    refreshing: bool,
}

/// What a request knows of the tenant's total before checking it.
enum Known {
    Fresh(u64),
    /// Another request is reading it; this is the last total (if any).
    Refreshing(Option<u64>),
    /// This request reads it (the list of queues too, when none is fresh).
    Read {
        last: Option<u64>,
        queues: Option<Arc<[Uuid]>>,
        queues_fresh: bool,
    },
}

impl ByteQuotas {
    fn lock(&self) -> std::sync::MutexGuard<'_, Usage> {
        self.usage.lock().unwrap_or_else(|p| p.into_inner())
    }

    fn begin(&self, tenant_id: Uuid) -> Known {
        let mut usage = self.lock();
        let tenant = usage.by_tenant.entry(tenant_id).or_insert(TenantUsage {
            bytes: None,
            queues: None,
            refreshing: false,
        });
        let last = tenant.bytes.map(|(bytes, _)| bytes);
        match tenant.bytes {
            Some((bytes, read_at)) if read_at.elapsed() < FRESH_FOR => Known::Fresh(bytes),
            _ if tenant.refreshing => Known::Refreshing(last),
            _ => {
                tenant.refreshing = true;
                Known::Read {
                    last,
                    queues: tenant.queues.as_ref().map(|(queues, _)| queues.clone()),
                    queues_fresh: tenant
                        .queues
                        .as_ref()
                        .is_some_and(|(_, read_at)| read_at.elapsed() < QUEUES_FRESH_FOR),
                }
            }
        }
    }

    fn remember_queues(&self, tenant_id: Uuid, queues: Arc<[Uuid]>) {
        if let Some(tenant) = self.lock().by_tenant.get_mut(&tenant_id) {
            tenant.queues = Some((queues, Instant::now()));
        }
    }

    /// Ends a read begun by `begin` (with its total, when it got one).
    fn finish(&self, tenant_id: Uuid, bytes: Option<u64>) {
        let mut usage = self.lock();
        if usage.pruned.is_none_or(|at| at.elapsed() >= FORGET_AFTER) {
            usage.pruned = Some(Instant::now());
            usage.by_tenant.retain(|_, tenant| {
                tenant.refreshing
                    || tenant
                        .bytes
                        .is_some_and(|(_, read_at)| read_at.elapsed() < FORGET_AFTER)
            });
            usage.by_tenant.shrink_to_fit();
        }
        if let Some(tenant) = usage.by_tenant.get_mut(&tenant_id) {
            tenant.refreshing = false;
            if let Some(bytes) = bytes {
                tenant.bytes = Some((bytes, Instant::now()));
            }
        }
    }

    /// The tenant's bytes went down (purge, deletion) or its queues changed: read them
    /// afresh at its next publish.
    pub fn forget(&self, tenant_id: Uuid) {
        self.lock().by_tenant.remove(&tenant_id);
    }

    /// This instance stored `bytes` more for the tenant.
    pub fn added(&self, tenant_id: Uuid, bytes: u64) {
        if let Some(tenant) = self.lock().by_tenant.get_mut(&tenant_id) {
            if let Some((stored, _)) = tenant.bytes.as_mut() {
                *stored = stored.saturating_add(bytes);
            }
        }
    }
}

/// Ends the read even when the request is dropped halfway.
struct Reading<'a> {
    quotas: &'a ByteQuotas,
    tenant_id: Uuid,
    bytes: Option<u64>,
}

impl Drop for Reading<'_> {
    fn drop(&mut self) {
        self.quotas.finish(self.tenant_id, self.bytes);
    }
}

/// Whether the tenant may store `bytes` more; 403 `MQ_QUOTA_EXCEEDED` when that would pass
/// `TENANT_MAX_BYTES`. When the total cannot be read (a store is down), the last one known
/// is used, or none: the quota never stops a publish the stores could take.
pub async fn admit(state: &AppState, tenant_id: Uuid, bytes: u64) -> ApiResult<()> {
    let limit = state.config.tenant_max_bytes;
    if limit == 0 {
        return Ok(());
    }
    let stored = match state.byte_quotas.begin(tenant_id) {
        Known::Fresh(stored) => Some(stored),
        Known::Refreshing(last) => last,
        Known::Read {
            last,
            queues,
            queues_fresh,
        } => {
            let mut reading = Reading {
                quotas: &state.byte_quotas,
                tenant_id,
                bytes: None,
            };
            let queues = match queues {
                Some(queues) if queues_fresh => Some(queues),
                stale => match state.store.own_queue_ids(tenant_id).await {
                    Ok(ids) => {
                        let ids: Arc<[Uuid]> = ids.into();
                        state.byte_quotas.remember_queues(tenant_id, ids.clone());
                        Some(ids)
                    }
                    Err(error) => {
                        tracing::debug!(error = %error, "tenant's queues not listed; last list used");
                        stale
                    }
                },
            };
            reading.bytes = match queues {
                Some(queues) => state.broker.stored_bytes(&queues).await.ok(),
                None => None,
            };
            reading.bytes.or(last)
        }
    };
    let Some(stored) = stored else {
        return Ok(());
    };
    if stored.saturating_add(bytes) > limit {
        return Err(ApiError::quota_exceeded(
            "TENANT_MAX_BYTES",
            limit,
            &format!(
                "the tenant stores {stored} payload bytes and this request adds {bytes}; \
                 consume, purge or delete messages first"
            ),
        )
        .with_detail("stored", serde_json::json!(stored)));
    }
    Ok(())
}
