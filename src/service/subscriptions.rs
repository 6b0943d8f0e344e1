//! Subscription management: configuration in PostgreSQL, the consumer group in Redis.

use chrono::Utc;
use serde::{Deserialize, Serialize};
use uuid::Uuid;

use crate::auth::Tenant;
use crate::domain::queue::{page_number, Queue, DEFAULT_PAGE_SIZE, MAX_PAGE_SIZE};
use crate::domain::subscription::{
    CreateSubscriptionRequest, OffsetReset, QueueRef, Subscription, SubscriptionDefaults,
    SubscriptionStatus, UpdateSubscriptionRequest,
};
use crate::domain::validation::Problems;
use crate::error::{ApiError, ApiResult, ErrorCode};
use crate::service::audit::{self, Resource};
use crate::service::queues::{self, Page};
use crate::state::AppState;
use crate::store::subscriptions::SubscriptionListFilter;

#[derive(Debug, Serialize)]
#[serde(rename_all = "camelCase")]
pub struct SubscriptionStats {
    pub lag: u64,
    pub pending: u64,
    pub delivered: i64,
    pub acked: i64,
    pub failed: i64,
    pub dead_lettered: i64,
    pub filtered: i64,
    pub expired: i64,
}

#[derive(Debug, Serialize)]
pub struct SubscriptionWithStats {
    #[serde(flatten)]
    pub subscription: Subscription,
    pub stats: SubscriptionStats,
}

/// `GET /subscriptions` query parameters as sent.
#[derive(Debug, Default, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct SubscriptionListQuery {
    pub queue: Option<String>,
    pub consumer_group: Option<String>,
    pub status: Option<String>,
    pub limit: Option<String>,
    pub offset: Option<String>,
}

impl SubscriptionListQuery {
    pub fn validate(self) -> ApiResult<SubscriptionListFilter> {
        let mut problems = Problems::default();
        let limit = page_number(
            &mut problems,
            "limit",
            self.limit,
            DEFAULT_PAGE_SIZE,
            1,
            MAX_PAGE_SIZE,
        );
        let offset = page_number(&mut problems, "offset", self.offset, 0, 0, i64::MAX);
        let status = self.status.filter(|s| !s.is_empty()).and_then(|text| {
            problems.choice(
                "status",
                &text,
                SubscriptionStatus::parse,
                SubscriptionStatus::ALL,
            )
        });
        let filter = SubscriptionListFilter {
            queue: self.queue.filter(|q| !q.is_empty()),
            consumer_group: self.consumer_group.filter(|g| !g.is_empty()),
            status,
            limit,
            offset,
        };
        problems.into_result(filter)
    }
}

fn not_found(id: &str) -> ApiError {
    ApiError::new(
        ErrorCode::SubscriptionNotFound,
        format!("subscription '{id}' not found"),
    )
}

/// The tenant's subscription; any other id (another tenant's, or not a UUID) is not found.
pub async fn require(state: &AppState, tenant_id: Uuid, id: &str) -> ApiResult<Subscription> {
    let uuid = Uuid::parse_str(id).map_err(|_| not_found(id))?;
    state
        .store
        .find_subscription(tenant_id, uuid)
        .await?
        .ok_or_else(|| not_found(id))
}

/// 403 unless the caller may consume from `queue`: a principal listed in
/// `allowedConsumers` (or any, when empty) of the queue's own tenant, or of another tenant
/// while the queue is public.
pub fn authorize_consumer(queue: &Queue, tenant: &Tenant) -> ApiResult<()> {
    if queue.tenant_id != tenant.tenant_id && !queue.is_public {
        return Err(ApiError::new(
            ErrorCode::Forbidden,
            format!("queue '{}' of another tenant is not public", queue.name),
        ));
    }
    let principal = tenant.principal.as_str();
    if queue.allowed_consumers.is_empty() || queue.allowed_consumers.iter().any(|p| p == principal)
    {
        Ok(())
    } else {
        Err(ApiError::new(
            ErrorCode::Forbidden,
            format!(
                "principal '{principal}' may not consume from queue '{}'",
                queue.name
            ),
        ))
    }
}

pub async fn create(
    state: &AppState,
    tenant: &Tenant,
    request: CreateSubscriptionRequest,
) -> ApiResult<Subscription> {
    let queue_name = request.queue.clone().unwrap_or_default();
    if queue_name.is_empty() {
        return Err(ApiError::validation(
            "queue is required",
            vec!["queue".into()],
        ));
    }
    // Another tenant's queue only when it is public; otherwise it is not found, as if absent.
    let owner = request.queue_tenant_id.unwrap_or(tenant.tenant_id);
    let queue = queues::require(state, owner, &queue_name).await?;
    if owner != tenant.tenant_id && !queue.is_public {
        return Err(ApiError::queue_not_found(&queue_name));
    }
    authorize_consumer(&queue, tenant)?;
    let defaults = SubscriptionDefaults {
        session_timeout_ms: state.config.consumer_timeout_ms,
    };
    let queue_ref = QueueRef {
        id: queue.id,
        tenant_id: queue.tenant_id,
        name: &queue.name,
    };
    let subscription =
        Subscription::create(tenant.tenant_id, queue_ref, request, defaults, Utc::now())?;
    state.store.insert_subscription(&subscription).await?;
    // The group's first subscription fixes its start; later members join where it is.
    let from_earliest = subscription.offset_reset_policy == OffsetReset::Earliest;
    if let Err(error) = state
        .broker
        .ensure_consumer_group(
            queue.id,
            queue.partition_count,
            &subscription.consumer_group,
            from_earliest,
        )
        .await
    {
        // Without its group the subscription would receive nothing: undo it.
        let _ = state.store.delete_subscription(&subscription).await;
        return Err(error);
    }
    state.subscription_changed();
    audit::record(
        state,
        tenant,
        "created",
        Resource::Subscription,
        subscription.id,
        &subscription.consumer_name,
    )
    .await;
    Ok(subscription)
}

pub async fn list(
    state: &AppState,
    tenant: &Tenant,
    filter: SubscriptionListFilter,
) -> ApiResult<Page<Subscription>> {
    let (items, total) = state
        .store
        .list_subscriptions(tenant.tenant_id, &filter)
        .await?;
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
    id: &str,
) -> ApiResult<SubscriptionWithStats> {
    let subscription = require(state, tenant.tenant_id, id).await?;
    let queue = queues::require(state, subscription.queue_tenant_id, &subscription.queue).await?;
    let consumer = subscription.id.to_string();
    let (group, counts) = tokio::try_join!(
        state.broker.group_stats(
            queue.id,
            queue.partition_count,
            &subscription.consumer_group,
            &consumer,
        ),
        state.store.outcome_counts(subscription.id),
    )?;
    Ok(SubscriptionWithStats {
        stats: SubscriptionStats {
            lag: group.lag,
            pending: group.consumer_pending,
            delivered: counts.acked
                + counts.failed
                + counts.dead_lettered
                + group.consumer_pending as i64,
            acked: counts.acked,
            failed: counts.failed,
            dead_lettered: counts.dead_lettered,
            filtered: counts.filtered,
            expired: counts.expired,
        },
        subscription,
    })
}

pub async fn update(
    state: &AppState,
    tenant: &Tenant,
    id: &str,
    request: UpdateSubscriptionRequest,
) -> ApiResult<Subscription> {
    change(state, tenant, id, "updated", |s| {
        s.updated(request, Utc::now())
    })
    .await
}

pub async fn set_status(
    state: &AppState,
    tenant: &Tenant,
    id: &str,
    status: SubscriptionStatus,
) -> ApiResult<Subscription> {
    let action = if status == SubscriptionStatus::Paused {
        "paused"
    } else {
        "resumed"
    };
    change(state, tenant, id, action, |s| {
        let mut next = s.clone();
        next.status = status;
        next.updated_at = Utc::now();
        Ok(next)
    })
    .await
}

/// Applies `next` to the tenant's subscription under a row lock, then tells the workers and
/// the audit trail.
async fn change(
    state: &AppState,
    tenant: &Tenant,
    id: &str,
    action: &str,
    next: impl FnOnce(&Subscription) -> ApiResult<Subscription>,
) -> ApiResult<Subscription> {
    let current = require(state, tenant.tenant_id, id).await?;
    let updated = state
        .store
        .update_subscription(tenant.tenant_id, current.id, next)
        .await?
        .ok_or_else(|| not_found(id))?;
    state.subscription_changed();
    audit::record(
        state,
        tenant,
        action,
        Resource::Subscription,
        updated.id,
        &updated.consumer_name,
    )
    .await;
    Ok(updated)
}

/// Deletes the subscription; the last member of a group takes the group (and its delivery
/// state) with it, so an abandoned group never holds publishing back.
pub async fn delete(state: &AppState, tenant: &Tenant, id: &str) -> ApiResult<()> {
    let subscription = require(state, tenant.tenant_id, id).await?;
    let remaining = state.store.delete_subscription(&subscription).await?;
    if remaining == 0 {
        let queue =
            queues::require(state, subscription.queue_tenant_id, &subscription.queue).await?;
        state
            .broker
            .destroy_consumer_group(
                queue.id,
                queue.partition_count,
                &subscription.consumer_group,
            )
            .await?;
    }
    state.subscription_changed();
    audit::record(
        state,
        tenant,
        "deleted",
        Resource::Subscription,
        subscription.id,
        &subscription.consumer_name,
    )
    .await;
    Ok(())
}
