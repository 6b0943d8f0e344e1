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
use std::sync::Mutex;
use std::time::{Duration, Instant};

use uuid::Uuid;

use crate::error::{ApiError, ApiResult};
use crate::state::AppState;

const FRESH_FOR: Duration = Duration::from_secs(1);
/// Tenants not heard from for this long are forgotten (read afresh when they come back).
const FORGET_AFTER: Duration = Duration::from_secs(60);

#[derive(Default)]
pub struct ByteQuotas {
    usage: Mutex<Usage>,
}

#[derive(Default)]
struct Usage {
    by_tenant: HashMap<Uuid, (u64, Instant)>,
    pruned: Option<Instant>,
}

impl ByteQuotas {
    fn lock(&self) -> std::sync::MutexGuard<'_, Usage> {
        self.usage.lock().unwrap_or_else(|p| p.into_inner())
    }

    fn fresh(&self, tenant_id: Uuid) -> Option<u64> {
        self.lock()
            .by_tenant
            .get(&tenant_id)
            .filter(|(_, read_at)| read_at.elapsed() < FRESH_FOR)
            .map(|(bytes, _)| *bytes)
    }

    fn remember(&self, tenant_id: Uuid, bytes: u64) {
        let mut usage = self.lock();
        let now = Instant::now();
        if usage.pruned.is_none_or(|at| at.elapsed() >= FORGET_AFTER) {
            usage.pruned = Some(now);
            usage
                .by_tenant
                .retain(|_, (_, read_at)| read_at.elapsed() < FORGET_AFTER);
            usage.by_tenant.shrink_to_fit();
        }
        usage.by_tenant.insert(tenant_id, (bytes, now));
    }

    /// This instance stored `bytes` more for the tenant.
    pub fn added(&self, tenant_id: Uuid, bytes: u64) {
        if let Some((stored, _)) = self.lock().by_tenant.get_mut(&tenant_id) {
            *stored = stored.saturating_add(bytes);
        }
    }
}

/// Whether the tenant may store `bytes` more; 403 `MQ_QUOTA_EXCEEDED` when that would pass
/// `TENANT_MAX_BYTES`.
pub async fn admit(state: &AppState, tenant_id: Uuid, bytes: u64) -> ApiResult<()> {
    let limit = state.config.tenant_max_bytes;
    if limit == 0 {
        return Ok(());
    }
    let stored = match state.byte_quotas.fresh(tenant_id) {
        Some(stored) => stored,
        None => {
            let queues = state.store.own_queue_ids(tenant_id).await?;
            let stored = state.broker.stored_bytes(&queues).await?;
            state.byte_quotas.remember(tenant_id, stored);
            stored
        }
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
