//! Queue management: configuration in PostgreSQL, data in Redis.

use std::sync::Arc;

use chrono::Utc;
use serde::Serialize;
use uuid::Uuid;

use crate::auth::Tenant;
use crate::domain::queue::{
    is_system_queue, CreateQueueRequest, Queue, QueueDefaults, QueueListFilter, UpdateQueueRequest,
};
use crate::domain::schema;
use crate::domain::validation::is_valid_name;
use crate::error::{ApiError, ApiResult, ErrorCode};
use crate::service::audit::{self, Resource};
use crate::service::queue_cache::{Lookup, ResolvedQueue};
use crate::service::tenant_limits::{self, Budget};
use crate::state::AppState;

#[derive(Debug, Default, Serialize, utoipa::ToSchema)]
#[serde(rename_all = "camelCase")]
pub struct QueueStats {
    pub message_count: u64,
    pub pending_count: u64,
    pub delayed_count: u64,
    pub lag: u64,
    pub subscription_count: i64,
    pub oldest_unacked_age_ms: Option<u64>,
    /// Payload bytes published since create or purge: as sent, and as stored (after
    /// compression and encryption).
    pub original_bytes: u64,
    pub stored_bytes: u64,
}

#[derive(Debug, Serialize, utoipa::ToSchema)]
pub struct QueueWithStats {
    #[serde(flatten)]
    pub queue: Queue,
    pub stats: QueueStats,
}

#[derive(Debug, Serialize, utoipa::ToSchema)]
pub struct Page<T> {
    pub items: Vec<T>,
    pub total: i64,
    pub limit: i64,
    pub offset: i64,
}

fn defaults(state: &AppState) -> QueueDefaults {
    QueueDefaults {
        max_length: state.config.max_queue_length,
        encryption_available: state.config.encryption.is_some(),
    }
}

/// The tenant's queue by name; another tenant's queue is "not found" exactly like a missing one.
pub async fn require(state: &AppState, tenant_id: Uuid, name: &str) -> ApiResult<Queue> {
    // A name no queue can have is not looked up (nor sent to PostgreSQL, which refuses NUL).
    if !is_valid_name(name) {
        return Err(ApiError::queue_not_found(name));
    }
    state
        .store
        .find_queue(tenant_id, name)
        .await?
        .ok_or_else(|| ApiError::queue_not_found(name))
}

/// The tenant's queue with its compiled schema, from the cache when fresh. While PostgreSQL
/// is unreachable a stale entry is used rather than failing the caller.
pub async fn resolve(state: &AppState, tenant_id: Uuid, name: &str) -> ApiResult<ResolvedQueue> {
    if !is_valid_name(name) {
        return Err(ApiError::queue_not_found(name));
    }
    let stale = match state.queue_cache.lookup(tenant_id, name) {
        Lookup::Fresh(entry) => return Ok(entry),
        Lookup::Stale(entry) => Some(entry),
        Lookup::Missing => None,
    };
    let generation = state.queue_cache.generation();
    match state.store.find_queue(tenant_id, name).await {
        Ok(Some(queue)) => {
            // Compiled once per version of the queue: a refresh that finds the version it
            // had keeps its compiled schema.
            let schema = match stale {
                Some(stale)
                    if stale.queue.id == queue.id && stale.queue.updated_at == queue.updated_at =>
                {
                    stale.schema
                }
                _ => compile_schema(&queue).await,
            };
            let entry = ResolvedQueue {
                queue: Arc::new(queue),
                schema,
            };
            state.queue_cache.put(entry.clone(), generation);
            Ok(entry)
        }
        Ok(None) => {
            state.queue_cache.invalidate(tenant_id, name);
            Err(ApiError::queue_not_found(name))
        }
        Err(error) if error.code == ErrorCode::ServiceUnavailable => stale.ok_or(error),
        Err(error) => Err(error),
    }
}

/// The queue's compiled schema, compiled on the blocking pool (a schema of many patterns
/// takes milliseconds the async threads owe every other request). A schema stored before
/// the current rules (e.g. with look-around) no longer compiles: publishing says so;
/// consuming is unaffected.
async fn compile_schema(queue: &Queue) -> Option<Result<Arc<jsonschema::Validator>, String>> {
    let definition = queue.schema_definition.clone()?;
    let compiled = tokio::task::spawn_blocking(move || schema::compile(&definition).map(Arc::new))
        .await
        .unwrap_or_else(|error| Err(format!("compiling the schema failed: {error}")));
    Some(compiled)
}

/// 400 naming `schemaDefinition` unless `schema` (when given) compiles; compiled on the
/// blocking pool, as every compile of a schema is.
async fn check_schema(schema: Option<serde_json::Value>) -> ApiResult<()> {
    let Some(schema) = schema.filter(|schema| !schema.is_null()) else {
        return Ok(());
    };
    let checked = tokio::task::spawn_blocking(move || schema::check(&schema))
        .await
        .unwrap_or_else(|error| Err(format!("compiling the schema failed: {error}")));
    checked.map_err(|reason| {
        ApiError::validation(
            format!("schemaDefinition is not a valid JSON Schema: {reason}"),
            vec!["schemaDefinition".into()],
        )
    })
}

/// Makes sure the tenant has a queue of this name, creating it with the defaults if not
/// (dead-letter and system queues are created on first use). A queue created for `like`
/// (a dead-letter queue) is encrypted and compressed like it.
pub async fn ensure_exists(
    state: &AppState,
    tenant_id: Uuid,
    name: &str,
    like: Option<&Queue>,
) -> ApiResult<()> {
    if let Lookup::Fresh(_) = state.queue_cache.lookup(tenant_id, name) {
        return Ok(());
    }
    if state.store.find_queue(tenant_id, name).await?.is_some() {
        return Ok(());
    }
    let request = CreateQueueRequest {
        name: Some(name.to_owned()),
        encrypted: like.map(|q| q.encrypted),
        compression_type: like.map(|q| q.compression_type.as_str().to_owned()),
        ..CreateQueueRequest::default()
    };
    let queue = Queue::create(tenant_id, request, defaults(state), Utc::now())?;
    // Created for the tenant by the service: counted, never refused by the quota.
    match state.store.insert_queue(&queue, None).await {
        Ok(created) => {
            state
                .queue_changed(created.id, created.tenant_id, &created.name)
                .await;
            Ok(())
        }
        // Created concurrently by another request: just as good.
        Err(error) if error.code == ErrorCode::QueueExists => Ok(()),
        Err(error) => Err(error),
    }
}

/// 403 for a system queue: a tenant may read and subscribe to it, while only the service
/// creates, writes, changes, purges or deletes it.
pub fn refuse_system_queue(name: &str, action: &str) -> ApiResult<()> {
    if is_system_queue(name) {
        return Err(ApiError::new(
            ErrorCode::Forbidden,
            format!("queue '{name}' is a system queue: only the service may {action} it"),
        ));
    }
    Ok(())
}

pub async fn create(
    state: &AppState,
    tenant: &Tenant,
    request: CreateQueueRequest,
) -> ApiResult<Queue> {
    if let Some(name) = &request.name {
        refuse_system_queue(name, "create")?;
    }
    tenant_limits::admit(state, tenant.tenant_id, Budget::Changes).await?;
    let queue = Queue::create(tenant.tenant_id, request, defaults(state), Utc::now())?;
    check_schema(queue.schema_definition.clone()).await?;
    let created = state
        .store
        .insert_queue(&queue, Some(state.config.tenant_max_queues))
        .await?;
    // Its bytes count from its first publish here (elsewhere within `byte_quota::QUEUES_FRESH_FOR`).
    state.byte_quotas.forget(created.tenant_id);
    state
        .queue_changed(created.id, created.tenant_id, &created.name)
        .await;
    audit::record(
        state,
        tenant,
        "created",
        Resource::Queue,
        created.id,
        &created.name,
    )
    .await;
    Ok(created)
}

pub async fn list(
    state: &AppState,
    tenant: &Tenant,
    filter: QueueListFilter,
) -> ApiResult<Page<Queue>> {
    let (items, total) = state.store.list_queues(tenant.tenant_id, &filter).await?;
    Ok(Page {
        items,
        total,
        limit: filter.limit,
        offset: filter.offset,
    })
}

pub async fn get_with_stats(
    state: &AppState,
    tenant: &Tenant,
    name: &str,
) -> ApiResult<QueueWithStats> {
    let queue = require(state, tenant.tenant_id, name).await?;
    let (streams, subscription_count) = tokio::try_join!(
        state.broker.queue_stats(&queue),
        state.store.count_subscriptions(queue.id),
    )?;
    let now_ms = Utc::now().timestamp_millis().max(0) as u64;
    Ok(QueueWithStats {
        stats: QueueStats {
            message_count: streams.message_count,
            pending_count: streams.pending_count,
            delayed_count: streams.delayed_count,
            lag: streams.lag,
            subscription_count,
            oldest_unacked_age_ms: streams
                .oldest_pending_ms
                .map(|oldest| now_ms.saturating_sub(oldest)),
            original_bytes: streams.original_bytes,
            stored_bytes: streams.stored_bytes,
        },
        queue,
    })
}

pub async fn update(
    state: &AppState,
    tenant: &Tenant,
    name: &str,
    request: UpdateQueueRequest,
) -> ApiResult<Queue> {
    refuse_system_queue(name, "change")?;
    tenant_limits::admit(state, tenant.tenant_id, Budget::Changes).await?;
    if let Some(schema) = &request.schema_definition {
        check_schema(schema.clone()).await?;
    }
    let updated = state
        .store
        .update_queue(tenant.tenant_id, name, |current| {
            current.updated(request, Utc::now())
        })
        .await?
        .ok_or_else(|| ApiError::queue_not_found(name))?;
    state
        .queue_changed(updated.id, updated.tenant_id, &updated.name)
        .await;
    audit::record(
        state,
        tenant,
        "updated",
        Resource::Queue,
        updated.id,
        &updated.name,
    )
    .await;
    Ok(updated)
}

/// Removes the queue's data from Redis first, then its configuration, subscriptions and
/// records: if Redis is down nothing is deleted, and a retry finishes the job.
pub async fn delete(state: &AppState, tenant: &Tenant, name: &str) -> ApiResult<()> {
    refuse_system_queue(name, "delete")?;
    tenant_limits::admit(state, tenant.tenant_id, Budget::Changes).await?;
    let queue = require(state, tenant.tenant_id, name).await?;
    // The owner's groups and every guest's.
    let subscriptions = state.store.subscriptions_to(queue.id).await?;
    let groups: std::collections::BTreeSet<&str> = subscriptions
        .iter()
        .map(|s| s.delivery_group.as_str())
        .collect();
    let groups: Vec<&str> = groups.into_iter().collect();
    state.broker.delete_queue(&queue, &groups).await?;
    state.byte_quotas.forget(queue.tenant_id);
    state.store.delete_queue(queue.id).await?;
    state
        .queue_deleted(queue.id, queue.tenant_id, &queue.name)
        .await;
    for subscription in &subscriptions {
        state.subscription_deleted(subscription.id).await;
    }
    audit::record(
        state,
        tenant,
        "deleted",
        Resource::Queue,
        queue.id,
        &queue.name,
    )
    .await;
    Ok(())
}

pub async fn purge(state: &AppState, tenant: &Tenant, name: &str) -> ApiResult<u64> {
    refuse_system_queue(name, "purge")?;
    tenant_limits::admit(state, tenant.tenant_id, Budget::Changes).await?;
    let queue = require(state, tenant.tenant_id, name).await?;
    let purged = state.broker.purge_queue(&queue).await?;
    state.byte_quotas.forget(queue.tenant_id);
    audit::record(
        state,
        tenant,
        "purged",
        Resource::Queue,
        queue.id,
        &queue.name,
    )
    .await;
    Ok(purged)
}
