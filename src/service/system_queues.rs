//! The tenants' system queues that platform services write to through the internal API
//! (`user-events`, `user-notifications`, `audit-logs`, `notifications`), created on first use.

use chrono::Utc;
use serde_json::{Map, Value};
use uuid::Uuid;

use crate::domain::message::{MessageInput, PublishContext};
use crate::error::ApiResult;
use crate::service::publish::{self, PublishResult};
use crate::service::queues::{self, QueueStats};
use crate::state::AppState;

use crate::domain::queue::SYSTEM_QUEUES;

pub const USER_EVENTS: &str = SYSTEM_QUEUES[0];
pub const USER_NOTIFICATIONS: &str = SYSTEM_QUEUES[1];
pub const AUDIT_LOGS: &str = SYSTEM_QUEUES[2];
pub const NOTIFICATIONS: &str = SYSTEM_QUEUES[3];

/// Publishes `body` to the tenant's system queue `queue`; `event` (when a string) is also set
/// as the `eventType` header.
pub async fn publish_event(
    state: &AppState,
    tenant_id: Uuid,
    queue: &str,
    body: Map<String, Value>,
    event: Option<String>,
    context: &PublishContext,
) -> ApiResult<PublishResult> {
    queues::ensure_exists(state, tenant_id, queue, None).await?;
    let input = MessageInput {
        payload: Some(Value::Object(body)),
        headers: Some(
            event
                .into_iter()
                .map(|e| ("eventType".to_owned(), e))
                .collect(),
        ),
        ..MessageInput::default()
    };
    publish::publish_as_service(state, tenant_id, queue, input, context).await
}

/// The stats of one tenant's system queue `queue`, or the sum over all tenants (`None`).
/// A tenant that has not used the queue yet has all zeros.
pub async fn stats(
    state: &AppState,
    tenant_id: Option<Uuid>,
    queue: &str,
) -> ApiResult<QueueStats> {
    let found = state.store.queues_named(tenant_id, queue).await?;
    let streams = state.broker.queues_stats(&found).await?;
    let mut total = QueueStats::default();
    let now_ms = Utc::now().timestamp_millis().max(0) as u64;
    for (queue, stream) in found.iter().zip(streams) {
        total.message_count += stream.message_count;
        total.pending_count += stream.pending_count;
        total.delayed_count += stream.delayed_count;
        total.lag += stream.lag;
        total.original_bytes += stream.original_bytes;
        total.stored_bytes += stream.stored_bytes;
        total.subscription_count += state.store.count_subscriptions(queue.id).await?;
        if let Some(oldest) = stream.oldest_pending_ms {
            let age = now_ms.saturating_sub(oldest);
            total.oldest_unacked_age_ms =
                Some(total.oldest_unacked_age_ms.map_or(age, |a| a.max(age)));
        }
    }
    Ok(total)
}
