//! `message_subscriptions`: one consumer in a consumer group of a queue.

use chrono::{DateTime, Utc};
use serde_json::Value;
use sqlx::types::Json;
use uuid::Uuid;

use super::records::{delete_in_batches, lock_record_writers};
use super::Store;
use crate::domain::subscription::{
    delivery_group, HandlerConfig, OffsetReset, Subscription, SubscriptionStatus, SubscriptionType,
};
use crate::error::{ApiError, ApiResult, ErrorCode};

#[derive(sqlx::FromRow)]
struct SubscriptionRow {
    id: Uuid,
    tenant_id: Uuid,
    topic_id: Uuid,
    queue_tenant_id: Uuid,
    queue: String,
    consumer_group: String,
    consumer_name: String,
    subscription_type: String,
    offset_reset_policy: String,
    max_poll_records: i32,
    session_timeout_ms: i64,
    heartbeat_interval_ms: i64,
    handler_config: Json<Value>,
    dead_letter_queue: Option<String>,
    max_retry_attempts: i32,
    retry_delay_ms: i64,
    message_filter: Option<Json<Value>>,
    status: String,
    created_at: DateTime<Utc>,
    updated_at: DateTime<Utc>,
    last_consumed_at: Option<DateTime<Utc>>,
    principal: Option<String>,
}

impl TryFrom<SubscriptionRow> for Subscription {
    type Error = ApiError;

    fn try_from(row: SubscriptionRow) -> Result<Self, Self::Error> {
        let corrupt = |column: &str, value: &str| {
            ApiError::internal(format!(
                "message_subscriptions.{column} holds unknown value '{value}'"
            ))
        };
        Ok(Subscription {
            subscription_type: SubscriptionType::parse(&row.subscription_type)
                .ok_or_else(|| corrupt("subscription_type", &row.subscription_type))?,
            offset_reset_policy: OffsetReset::parse(&row.offset_reset_policy)
                .ok_or_else(|| corrupt("offset_reset_policy", &row.offset_reset_policy))?,
            status: SubscriptionStatus::parse(&row.status)
                .ok_or_else(|| corrupt("status", &row.status))?,
            handler_config: serde_json::from_value::<HandlerConfig>(row.handler_config.0)
                .map_err(|error| ApiError::internal(format!("handler_config: {error}")))?,
            dead_letter_queue: row.dead_letter_queue.unwrap_or_else(|| {
                crate::domain::subscription::default_dead_letter_queue(&row.queue)
            }),
            id: row.id,
            tenant_id: row.tenant_id,
            queue_id: row.topic_id,
            queue_tenant_id: row.queue_tenant_id,
            queue: row.queue,
            delivery_group: delivery_group(row.tenant_id, row.queue_tenant_id, &row.consumer_group),
            principal: row.principal,
            consumer_group: row.consumer_group,
            consumer_name: row.consumer_name,
            max_poll_records: row.max_poll_records.max(1) as u32,
            session_timeout_ms: row.session_timeout_ms.max(1) as u64,
            heartbeat_interval_ms: row.heartbeat_interval_ms.max(1) as u64,
            max_retry_attempts: row.max_retry_attempts.max(0) as u32,
            retry_delay_ms: row.retry_delay_ms.max(1) as u64,
            message_filter: row.message_filter.map(|json| json.0),
            created_at: row.created_at,
            updated_at: row.updated_at,
            last_consumed_at: row.last_consumed_at,
        })
    }
}

const SELECT: &str = "SELECT s.id, s.tenant_id, s.topic_id, t.tenant_id AS queue_tenant_id, t.name AS queue, s.consumer_group, \
    s.consumer_name, s.subscription_type, s.offset_reset_policy, s.max_poll_records, \
    s.session_timeout_ms, s.heartbeat_interval_ms, s.handler_config, s.dead_letter_queue, \
    s.max_retry_attempts, s.retry_delay_ms, s.message_filter, s.status, s.created_at, \
    s.updated_at, s.last_consumed_at, s.principal \
    FROM message_subscriptions s JOIN message_topics t ON t.id = s.topic_id";

/// Filters and paging of the subscription list.
#[derive(Debug, Clone, Default)]
pub struct SubscriptionListFilter {
    pub queue: Option<String>,
    pub consumer_group: Option<String>,
    pub status: Option<SubscriptionStatus>,
    pub limit: i64,
    pub offset: i64,
}

/// How many attempts of each outcome a subscription has had.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct OutcomeCounts {
    pub acked: i64,
    pub failed: i64,
    pub dead_lettered: i64,
    pub filtered: i64,
    pub expired: i64,
    /// Refused by the dead-letter queue and set aside in the record quarantine.
    pub set_aside: i64,
}

/// How many subscriptions a tenant may have, in all and to one queue.
#[derive(Debug, Clone, Copy)]
pub struct SubscriptionQuotas {
    pub per_tenant: u64,
    pub per_queue: u64,
}

impl Store {
    /// Inserts the subscription while its tenant is within `quotas` (checked under a
    /// per-tenant lock). A guest's subscriptions count against the guest's quotas only.
    pub async fn insert_subscription(
        &self,
        subscription: &Subscription,
        quotas: SubscriptionQuotas,
    ) -> ApiResult<()> {
        let mut tx = self.pool.begin().await?;
        super::queues::lock_tenant(&mut tx, subscription.tenant_id).await?;
        let (in_all, to_queue): (i64, i64) = sqlx::query_as(
            "SELECT count(*), count(*) FILTER (WHERE topic_id = $2) \
             FROM message_subscriptions WHERE tenant_id = $1",
        )
        .bind(subscription.tenant_id)
        .bind(subscription.queue_id)
        .fetch_one(&mut *tx)
        .await?;
        if in_all as u64 >= quotas.per_tenant {
            return Err(ApiError::quota_exceeded(
                "TENANT_MAX_SUBSCRIPTIONS",
                quotas.per_tenant,
                "the tenant has as many subscriptions as it may",
            ));
        }
        if to_queue as u64 >= quotas.per_queue {
            return Err(ApiError::quota_exceeded(
                "QUEUE_MAX_SUBSCRIPTIONS",
                quotas.per_queue,
                &format!(
                    "the tenant has as many subscriptions to queue '{}' as it may",
                    subscription.queue
                ),
            ));
        }
        sqlx::query(
            "INSERT INTO message_subscriptions (id, tenant_id, topic_id, consumer_group, consumer_name, \
                 subscription_type, offset_reset_policy, max_poll_records, session_timeout_ms, \
                 heartbeat_interval_ms, handler_config, dead_letter_queue, max_retry_attempts, \
                 retry_delay_ms, message_filter, status, created_at, updated_at, principal) \
             VALUES ($1, $2, $3, $4, $5, $6, $7, $8, $9, $10, $11, $12, $13, $14, $15, $16, $17, \
                 $18, $19)",
        )
        .bind(subscription.id)
        .bind(subscription.tenant_id)
        .bind(subscription.queue_id)
        .bind(&subscription.consumer_group)
        .bind(&subscription.consumer_name)
        .bind(subscription.subscription_type.as_str())
        .bind(subscription.offset_reset_policy.as_str())
        .bind(subscription.max_poll_records as i32)
        .bind(subscription.session_timeout_ms as i64)
        .bind(subscription.heartbeat_interval_ms as i64)
        .bind(Json(subscription.handler_config.to_stored()))
        .bind(&subscription.dead_letter_queue)
        .bind(subscription.max_retry_attempts as i32)
        .bind(subscription.retry_delay_ms as i64)
        .bind(subscription.message_filter.as_ref().map(Json))
        .bind(subscription.status.as_str())
        .bind(subscription.created_at)
        .bind(subscription.updated_at)
        .bind(&subscription.principal)
        .execute(&mut *tx)
        .await
        .map_err(|error| match &error {
            sqlx::Error::Database(db)
                if db.is_unique_violation()
                    && db.constraint() == Some("message_subscriptions_member_key") =>
            {
                ApiError::new(
                    ErrorCode::SubscriptionExists,
                    format!(
                        "consumer '{}' of group '{}' already subscribes to queue '{}'",
                        subscription.consumer_name, subscription.consumer_group, subscription.queue
                    ),
                )
            }
            _ => error.into(),
        })?;
        tx.commit().await?;
        Ok(())
    }

    pub async fn find_subscription(
        &self,
        tenant_id: Uuid,
        id: Uuid,
    ) -> ApiResult<Option<Subscription>> {
        let row: Option<SubscriptionRow> =
            sqlx::query_as(&format!("{SELECT} WHERE s.tenant_id = $1 AND s.id = $2"))
                .bind(tenant_id)
                .bind(id)
                .fetch_optional(&self.pool)
                .await?;
        row.map(Subscription::try_from).transpose()
    }

    /// The subscriptions of `ids` that exist (of any tenant).
    pub async fn subscriptions_by_ids(&self, ids: &[Uuid]) -> ApiResult<Vec<Subscription>> {
        let rows: Vec<SubscriptionRow> = sqlx::query_as(&format!("{SELECT} WHERE s.id = ANY($1)"))
            .bind(ids)
            .fetch_all(&self.pool)
            .await?;
        rows.into_iter().map(Subscription::try_from).collect()
    }

    pub async fn list_subscriptions(
        &self,
        tenant_id: Uuid,
        filter: &SubscriptionListFilter,
    ) -> ApiResult<(Vec<Subscription>, i64)> {
        let condition = "s.tenant_id = $1 AND ($2::text IS NULL OR t.name = $2) \
                         AND ($3::text IS NULL OR s.consumer_group = $3) \
                         AND ($4::text IS NULL OR s.status = $4)";
        let status = filter.status.map(SubscriptionStatus::as_str);
        let rows: Vec<SubscriptionRow> = sqlx::query_as(&format!(
            "{SELECT} WHERE {condition} ORDER BY s.created_at, s.id LIMIT $5 OFFSET $6"
        ))
        .bind(tenant_id)
        .bind(&filter.queue)
        .bind(&filter.consumer_group)
        .bind(status)
        .bind(filter.limit)
        .bind(filter.offset)
        .fetch_all(&self.pool)
        .await?;
        let total: i64 = sqlx::query_scalar(&format!(
            "SELECT count(*) FROM message_subscriptions s JOIN message_topics t ON t.id = s.topic_id \
             WHERE {condition}"
        ))
        .bind(tenant_id)
        .bind(&filter.queue)
        .bind(&filter.consumer_group)
        .bind(status)
        .fetch_one(&self.pool)
        .await?;
        let items = rows
            .into_iter()
            .map(Subscription::try_from)
            .collect::<ApiResult<_>>()?;
        Ok((items, total))
    }

    /// Read-modify-write under a row lock; `change` decides the new state.
    pub async fn update_subscription(
        &self,
        tenant_id: Uuid,
        id: Uuid,
        change: impl FnOnce(&Subscription) -> ApiResult<Subscription>,
    ) -> ApiResult<Option<Subscription>> {
        let mut tx = self.pool.begin().await?;
        let row: Option<SubscriptionRow> = sqlx::query_as(&format!(
            "{SELECT} WHERE s.tenant_id = $1 AND s.id = $2 FOR UPDATE OF s"
        ))
        .bind(tenant_id)
        .bind(id)
        .fetch_optional(&mut *tx)
        .await?;
        let Some(current) = row.map(Subscription::try_from).transpose()? else {
            return Ok(None);
        };
        let next = change(&current)?;
        sqlx::query(
            "UPDATE message_subscriptions SET max_poll_records = $2, session_timeout_ms = $3, \
                 heartbeat_interval_ms = $4, handler_config = $5, dead_letter_queue = $6, \
                 max_retry_attempts = $7, retry_delay_ms = $8, message_filter = $9, status = $10, \
                 updated_at = $11 WHERE id = $1",
        )
        .bind(id)
        .bind(next.max_poll_records as i32)
        .bind(next.session_timeout_ms as i64)
        .bind(next.heartbeat_interval_ms as i64)
        .bind(Json(next.handler_config.to_stored()))
        .bind(&next.dead_letter_queue)
        .bind(next.max_retry_attempts as i32)
        .bind(next.retry_delay_ms as i64)
        .bind(next.message_filter.as_ref().map(Json))
        .bind(next.status.as_str())
        .bind(next.updated_at)
        .execute(&mut *tx)
        .await?;
        tx.commit().await?;
        Ok(Some(next))
    }

    /// Deletes the subscription, holding its group's rows locked so that no other member is
    /// deleted meanwhile: `before_delete(last)` runs first, told whether it is the last
    /// member of its group, and its error keeps the row (the delete can be retried). False
    /// when the subscription was deleted meanwhile.
    pub async fn delete_subscription(
        &self,
        subscription: &Subscription,
        before_delete: impl AsyncFnOnce(bool) -> ApiResult<()>,
    ) -> ApiResult<bool> {
        // Its delivery attempts first, in bounded batches, and the rest under the record
        // writers' lock: the cascade reaches rows the recorders write (`records`).
        delete_in_batches(
            &self.pool,
            "consumption_records",
            "subscription_id",
            subscription.id,
        )
        .await?;
        let mut tx = self.pool.begin().await?;
        lock_record_writers(&mut tx).await?;
        let members: Vec<Uuid> = sqlx::query_scalar(
            "SELECT id FROM message_subscriptions \
             WHERE topic_id = $1 AND tenant_id = $2 AND consumer_group = $3 FOR UPDATE",
        )
        .bind(subscription.queue_id)
        .bind(subscription.tenant_id)
        .bind(&subscription.consumer_group)
        .fetch_all(&mut *tx)
        .await?;
        if !members.contains(&subscription.id) {
            return Ok(false);
        }
        before_delete(members.len() == 1).await?;
        sqlx::query("DELETE FROM message_subscriptions WHERE id = $1")
            .bind(subscription.id)
            .execute(&mut *tx)
            .await?;
        tx.commit().await?;
        Ok(true)
    }

    /// Runs `locked` while holding the subscription's row lock, if the row exists (a
    /// deletion in progress is waited for); whether it existed.
    pub async fn while_subscription_exists(
        &self,
        id: Uuid,
        locked: impl AsyncFnOnce() -> ApiResult<()>,
    ) -> ApiResult<bool> {
        let mut tx = self.pool.begin().await?;
        let exists: Option<Uuid> =
            sqlx::query_scalar("SELECT id FROM message_subscriptions WHERE id = $1 FOR UPDATE")
                .bind(id)
                .fetch_optional(&mut *tx)
                .await?;
        if exists.is_none() {
            return Ok(false);
        }
        locked().await?;
        tx.commit().await?;
        Ok(true)
    }

    /// Every subscription to a queue, of any tenant (the owner's and its guests').
    pub async fn subscriptions_to(&self, queue_id: Uuid) -> ApiResult<Vec<Subscription>> {
        let rows: Vec<SubscriptionRow> = sqlx::query_as(&format!(
            "{SELECT} WHERE s.topic_id = $1 ORDER BY s.created_at, s.id"
        ))
        .bind(queue_id)
        .fetch_all(&self.pool)
        .await?;
        rows.into_iter().map(Subscription::try_from).collect()
    }

    /// Every subscription of one tenant, or of all (`None`).
    pub async fn subscriptions_of(&self, tenant_id: Option<Uuid>) -> ApiResult<Vec<Subscription>> {
        let rows: Vec<SubscriptionRow> = sqlx::query_as(&format!(
            "{SELECT} WHERE ($1::uuid IS NULL OR s.tenant_id = $1) ORDER BY s.created_at, s.id"
        ))
        .bind(tenant_id)
        .fetch_all(&self.pool)
        .await?;
        rows.into_iter().map(Subscription::try_from).collect()
    }

    /// Every subscription of every tenant, for the workers that serve them.
    pub async fn list_all_subscriptions(&self) -> ApiResult<Vec<Subscription>> {
        let rows: Vec<SubscriptionRow> =
            sqlx::query_as(&format!("{SELECT} ORDER BY s.created_at, s.id"))
                .fetch_all(&self.pool)
                .await?;
        rows.into_iter().map(Subscription::try_from).collect()
    }

    pub async fn outcome_counts(&self, subscription_id: Uuid) -> ApiResult<OutcomeCounts> {
        let rows: Vec<(String, i64)> = sqlx::query_as(
            "SELECT status, count(*) FROM consumption_records WHERE subscription_id = $1 GROUP BY status",
        )
        .bind(subscription_id)
        .fetch_all(&self.pool)
        .await?;
        let mut counts = OutcomeCounts::default();
        for (status, count) in rows {
            match status.as_str() {
                "acked" => counts.acked = count,
                "failed" => counts.failed = count,
                "dead_letter" => counts.dead_lettered = count,
                "filtered" => counts.filtered = count,
                "expired" => counts.expired = count,
                "set_aside" => counts.set_aside = count,
                _ => {}
            }
        }
        Ok(counts)
    }
}
