//! Subscription management: configuration in PostgreSQL, the consumer group in Redis.

use chrono::{DateTime, Utc};
use serde::{Deserialize, Serialize};
use uuid::Uuid;

use crate::auth::Tenant;
use crate::broker::consume::GroupStats;
use crate::domain::queue::{page_number, Queue, DEFAULT_PAGE_SIZE, MAX_PAGE_SIZE};
use crate::domain::subscription::{
    default_dead_letter_queue, CreateSubscriptionRequest, OffsetReset, QueueRef, Subscription,
    SubscriptionDefaults, SubscriptionStatus, SubscriptionType, UpdateSubscriptionRequest,
};
use crate::domain::validation::{is_valid_name, Problems};
use crate::error::{ApiError, ApiResult, ErrorCode};
use crate::service::audit::{self, Resource};
use crate::service::publish;
use crate::service::queues::{self, Page};
use crate::service::tenant_limits::{self, Budget};
use crate::state::AppState;
use crate::store::subscriptions::{SubscriptionListFilter, SubscriptionQuotas};

#[derive(Debug, Serialize, utoipa::ToSchema)]
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
    /// Exhausted messages the dead-letter queue refused (schema, limits, ACL), set aside in
    /// the record quarantine instead of being retried forever.
    pub set_aside: i64,
}

#[derive(Debug, Serialize, utoipa::ToSchema)]
pub struct SubscriptionWithStats {
    #[serde(flatten)]
    pub subscription: Subscription,
    pub stats: SubscriptionStats,
}

/// `GET /subscriptions` query parameters as sent.
#[derive(Debug, Default, Deserialize, utoipa::IntoParams)]
#[serde(rename_all = "camelCase")]
#[into_params(parameter_in = Query)]
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
        let queue = self.queue.filter(|q| !q.is_empty());
        let consumer_group = self.consumer_group.filter(|g| !g.is_empty());
        for (field, name) in [("queue", &queue), ("consumerGroup", &consumer_group)] {
            problems.check(name.as_deref().is_none_or(is_valid_name), field, || {
                "must be a name of 1-200 characters of [A-Za-z0-9._-]".into()
            });
        }
        let filter = SubscriptionListFilter {
            queue,
            consumer_group,
            status,
            limit,
            offset,
        };
        problems.into_result(filter)
    }
}

pub fn not_found(id: &str) -> ApiError {
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

/// `require` for pulling and settling: while PostgreSQL is unavailable, the subscription as
/// the directory last had it, so consumers go on through an outage as producers do (the
/// queue cache). Only these paths take the copy: a change made just before the outage may
/// not be in it, which a consumer can live with for the outage, a change of settings not.
pub async fn require_for_consuming(
    state: &AppState,
    tenant_id: Uuid,
    id: &str,
) -> ApiResult<Subscription> {
    match require(state, tenant_id, id).await {
        Err(error) if error.code == ErrorCode::ServiceUnavailable => {
            let uuid = Uuid::parse_str(id).map_err(|_| not_found(id))?;
            state
                .subscriptions
                .last_known(uuid)
                .filter(|subscription| subscription.tenant_id == tenant_id)
                .ok_or(error)
        }
        other => other,
    }
}

/// 403 unless `principal` of `tenant_id` may consume from `queue`: the queue's own tenant's
/// principals when `allowedConsumers` is empty or lists them; another tenant's only while the
/// queue is public, and when `allowedConsumers` is empty or lists `<tenant id>:<principal>`
/// or `<tenant id>:*` (a plain entry names one of the owner's principals, so a guest can
/// never pass for it by choosing the same `sub`).
pub fn authorize_consumer(queue: &Queue, tenant_id: Uuid, principal: &str) -> ApiResult<()> {
    let guest = queue.tenant_id != tenant_id;
    if guest && !queue.is_public {
        return Err(ApiError::new(
            ErrorCode::Forbidden,
            format!("queue '{}' of another tenant is not public", queue.name),
        ));
    }
    let allowed = queue.allowed_consumers.is_empty()
        || queue.allowed_consumers.iter().any(|entry| {
            if guest {
                entry
                    .strip_prefix(&format!("{tenant_id}:"))
                    .is_some_and(|rest| rest == principal || rest == "*")
            } else {
                entry == principal
            }
        });
    if allowed {
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

/// 403 unless `principal` may publish to the dead-letter queue `name` of `tenant_id`:
/// otherwise failing its own messages would be a way into a queue it may not write. A system
/// queue never takes dead letters; a queue that does not exist yet is created on first use
/// without producer rules. Checked when a subscription is written and again when a message is
/// dead-lettered.
pub async fn authorize_dead_letter_queue(
    state: &AppState,
    tenant_id: Uuid,
    name: &str,
    principal: &str,
) -> ApiResult<()> {
    let forbidden = |error: ApiError| {
        let message = format!("deadLetterQueue: {}", error.message);
        ApiError::new(ErrorCode::Forbidden, message)
            .with_detail("fields", serde_json::json!(["deadLetterQueue"]))
    };
    queues::refuse_system_queue(name, "write").map_err(forbidden)?;
    if let Some(queue) = state.store.find_queue(tenant_id, name).await? {
        publish::authorize_principal(&queue, principal).map_err(forbidden)?;
    }
    Ok(())
}

/// Whether the subscription's own principal may still consume from `queue` (for pushes,
/// which have no caller).
pub fn subscription_may_consume(queue: &Queue, subscription: &Subscription) -> ApiResult<()> {
    let principal = subscription.principal.as_deref().unwrap_or_default();
    authorize_consumer(queue, subscription.tenant_id, principal)
}

pub async fn create(
    state: &AppState,
    tenant: &Tenant,
    request: CreateSubscriptionRequest,
) -> ApiResult<Subscription> {
    tenant_limits::admit(state, tenant.tenant_id, Budget::Changes).await?;
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
    authorize_consumer(&queue, tenant.tenant_id, &tenant.principal)?;
    let defaults = SubscriptionDefaults {
        session_timeout_ms: state.config.consumer_timeout_ms,
    };
    let queue_ref = QueueRef {
        id: queue.id,
        tenant_id: queue.tenant_id,
        name: &queue.name,
    };
    let subscription = Subscription::create(
        tenant.tenant_id,
        &tenant.principal,
        queue_ref,
        request,
        defaults,
        Utc::now(),
    )?;
    authorize_dead_letter_queue(
        state,
        tenant.tenant_id,
        &subscription.dead_letter_queue,
        &tenant.principal,
    )
    .await?;
    let quotas = SubscriptionQuotas {
        per_tenant: state.config.tenant_max_subscriptions,
        per_queue: state.config.queue_max_subscriptions,
    };
    state
        .store
        .insert_subscription(&subscription, quotas)
        .await?;
    // The group's first subscription fixes its start; later members join where it is.
    let from_earliest = subscription.offset_reset_policy == OffsetReset::Earliest;
    if let Err(error) = state
        .broker
        .ensure_consumer_group(
            queue.id,
            queue.partition_count,
            &subscription.delivery_group,
            from_earliest,
        )
        .await
    {
        // Without its group the subscription would receive nothing: undo it.
        let _ = state
            .store
            .delete_subscription(&subscription, async |_| Ok(()))
            .await;
        // A read of the list meanwhile may have seen it.
        state.subscription_deleted(subscription.id).await;
        return Err(error);
    }
    state.subscription_changed(subscription.id).await;
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
            &subscription.delivery_group,
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
                + counts.set_aside
                + group.consumer_pending as i64,
            acked: counts.acked,
            failed: counts.failed,
            dead_lettered: counts.dead_lettered,
            filtered: counts.filtered,
            // Expired before delivery, and removed by retention before the group read them.
            expired: counts.expired + group.trimmed as i64,
            set_aside: counts.set_aside,
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
    if let Some(dead_letter_queue) = &request.dead_letter_queue {
        let current = require(state, tenant.tenant_id, id).await?;
        let name = dead_letter_queue
            .clone()
            .unwrap_or_else(|| default_dead_letter_queue(&current.queue));
        for principal in [
            Some(tenant.principal.as_str()),
            current.principal.as_deref(),
        ]
        .into_iter()
        .flatten()
        {
            authorize_dead_letter_queue(state, tenant.tenant_id, &name, principal).await?;
        }
    }
    change(state, tenant, id, "updated", Access::Creator, |s| {
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
    change(state, tenant, id, action, Access::CreatorOrConsumer, |s| {
        let mut next = s.clone();
        next.status = status;
        next.updated_at = Utc::now();
        Ok(next)
    })
    .await
}

/// Who may act on a subscription of their tenant.
#[derive(Clone, Copy, PartialEq, Eq)]
enum Access {
    /// Its creator, or a principal the queue admits as a consumer (pause, resume, delete):
    /// a creator taken off `allowedConsumers` can still clean up.
    CreatorOrConsumer,
    /// Its creator, while the queue admits it as a consumer (an update can change where
    /// pushes go, signed with the subscription's secret).
    Creator,
}

/// 403 unless the caller may act on the subscription as `access` says. Subscriptions made
/// before principals were kept have no creator: any principal counts as it.
async fn authorize_change(
    state: &AppState,
    tenant: &Tenant,
    subscription: &Subscription,
    access: Access,
) -> ApiResult<()> {
    let is_creator = subscription
        .principal
        .as_deref()
        .is_none_or(|creator| creator == tenant.principal);
    if access == Access::CreatorOrConsumer && is_creator {
        return Ok(());
    }
    let queue = queues::require(state, subscription.queue_tenant_id, &subscription.queue).await?;
    authorize_consumer(&queue, tenant.tenant_id, &tenant.principal)?;
    if access == Access::Creator && !is_creator {
        return Err(ApiError::new(
            ErrorCode::Forbidden,
            format!(
                "subscription '{}' was created by another principal; only it may change it",
                subscription.id
            ),
        ));
    }
    Ok(())
}

/// Applies `next` to the tenant's subscription under a row lock, then tells the workers and
/// the audit trail.
async fn change(
    state: &AppState,
    tenant: &Tenant,
    id: &str,
    action: &str,
    access: Access,
    next: impl FnOnce(&Subscription) -> ApiResult<Subscription>,
) -> ApiResult<Subscription> {
    tenant_limits::admit(state, tenant.tenant_id, Budget::Changes).await?;
    let current = require(state, tenant.tenant_id, id).await?;
    authorize_change(state, tenant, &current, access).await?;
    let updated = state
        .store
        .update_subscription(tenant.tenant_id, current.id, next)
        .await?
        .ok_or_else(|| not_found(id))?;
    state.subscription_changed(updated.id).await;
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

/// Deletes the subscription. The last member of a group takes the group (and its delivery
/// state) with it, destroyed in Redis before the row is deleted: if Redis cannot be reached
/// the answer is 503 and the subscription stays, so the delete can be retried and no
/// orphaned group ever holds publishing back.
pub async fn delete(state: &AppState, tenant: &Tenant, id: &str) -> ApiResult<()> {
    tenant_limits::admit(state, tenant.tenant_id, Budget::Changes).await?;
    let subscription = require(state, tenant.tenant_id, id).await?;
    authorize_change(state, tenant, &subscription, Access::CreatorOrConsumer).await?;
    remove(state, &subscription).await?;
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

async fn remove(state: &AppState, subscription: &Subscription) -> ApiResult<()> {
    let queue = queues::require(state, subscription.queue_tenant_id, &subscription.queue).await?;
    let deleted = state
        .store
        .delete_subscription(subscription, async |last_member| {
            if last_member {
                state
                    .broker
                    .destroy_consumer_group(
                        queue.id,
                        queue.partition_count,
                        &subscription.delivery_group,
                    )
                    .await?;
            }
            Ok(())
        })
        .await?;
    if !deleted {
        return Err(not_found(&subscription.id.to_string()));
    }
    state.subscription_deleted(subscription.id).await;
    Ok(())
}

/// A take found the subscription's consumer group missing. Deleting the subscription's last
/// group member destroys it (under the row lock), so: if the row is gone, or goes while this
/// waits for its lock, the subscription was deleted and the caller stops (false). If the row
/// is still there once locked, Redis lost the group with its data: it is made again over
/// what the stream holds now (true), the one place besides creation that makes a group.
pub async fn restore_lost_group(
    state: &AppState,
    subscription: &Subscription,
    queue: &Queue,
) -> ApiResult<bool> {
    state
        .store
        .while_subscription_exists(subscription.id, async || {
            tracing::warn!(subscription = %subscription.id, group = subscription.delivery_group, "consumer group missing in Redis; making it again");
            state
                .broker
                .ensure_consumer_group(
                    queue.id,
                    queue.partition_count,
                    &subscription.delivery_group,
                    true,
                )
                .await
        })
        .await
}

/// Where each subscription stands in its group (lag, its pending deliveries, what retention
/// removed unread), read in one sweep; `partition_count` gives each one's queue's partitions.
pub async fn positions(
    state: &AppState,
    subscriptions: &[Subscription],
    partition_count: impl Fn(&Subscription) -> u16,
) -> ApiResult<Vec<GroupStats>> {
    let consumers: Vec<String> = subscriptions.iter().map(|s| s.id.to_string()).collect();
    let wanted: Vec<(Uuid, u16, &str, &str)> = subscriptions
        .iter()
        .zip(&consumers)
        .map(|(s, consumer)| {
            (
                s.queue_id,
                partition_count(s),
                s.delivery_group.as_str(),
                consumer.as_str(),
            )
        })
        .collect();
    state.broker.groups_stats(&wanted).await
}

/// One subscriber of a queue, as its owner sees it.
#[derive(Debug, Serialize, utoipa::ToSchema)]
#[serde(rename_all = "camelCase")]
pub struct Subscriber {
    pub subscription_id: Uuid,
    pub tenant_id: Uuid,
    /// Another tenant's subscription to this public queue.
    pub guest: bool,
    pub consumer_group: String,
    pub consumer_name: String,
    pub subscription_type: SubscriptionType,
    pub status: SubscriptionStatus,
    pub lag: u64,
    pub pending: u64,
    pub created_at: DateTime<Utc>,
}

/// Every subscription to the tenant's queue, its own and its guests'.
pub async fn subscribers(
    state: &AppState,
    tenant: &Tenant,
    queue_name: &str,
) -> ApiResult<Vec<Subscriber>> {
    let queue = queues::require(state, tenant.tenant_id, queue_name).await?;
    let subscriptions = state.store.subscriptions_to(queue.id).await?;
    let groups = positions(state, &subscriptions, |_| queue.partition_count).await?;
    Ok(subscriptions
        .into_iter()
        .zip(groups)
        .map(|(s, group)| Subscriber {
            subscription_id: s.id,
            tenant_id: s.tenant_id,
            guest: s.tenant_id != queue.tenant_id,
            consumer_group: s.consumer_group,
            consumer_name: s.consumer_name,
            subscription_type: s.subscription_type,
            status: s.status,
            lag: group.lag,
            pending: group.consumer_pending,
            created_at: s.created_at,
        })
        .collect())
}

/// The queue's owner deletes a subscription to it, a guest's included. To keep a tenant out
/// for good, make the queue private or leave it out of `allowedConsumers`.
pub async fn revoke(
    state: &AppState,
    tenant: &Tenant,
    queue_name: &str,
    id: &str,
) -> ApiResult<()> {
    tenant_limits::admit(state, tenant.tenant_id, Budget::Changes).await?;
    let queue = queues::require(state, tenant.tenant_id, queue_name).await?;
    let uuid = Uuid::parse_str(id).map_err(|_| not_found(id))?;
    let subscription = state
        .store
        .subscriptions_to(queue.id)
        .await?
        .into_iter()
        .find(|s| s.id == uuid)
        .ok_or_else(|| not_found(id))?;
    // Revoking a guest is managing the queue (open to the tenant's principals); removing one
    // of the tenant's own subscriptions this way is deleting it.
    if subscription.tenant_id == tenant.tenant_id {
        authorize_change(state, tenant, &subscription, Access::CreatorOrConsumer).await?;
    }
    remove(state, &subscription).await?;
    audit::record(
        state,
        tenant,
        "revoked",
        Resource::Subscription,
        subscription.id,
        &subscription.consumer_name,
    )
    .await;
    Ok(())
}
