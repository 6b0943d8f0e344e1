//! Publishing: resolve the queue, authorize the producer, validate every message, store them
//! in one round trip to Redis. PostgreSQL is not on this path (the recorder writes records
//! behind it, and queue configuration comes from the cache).

use chrono::{DateTime, Utc};
use serde::Serialize;
use serde_json::json;
use uuid::Uuid;

use crate::auth::Tenant;
use crate::broker::publish::{queue_full, PublishOutcome, Stored};
use std::sync::Arc;

use crate::crypto::{Binding, Sealer};
use crate::domain::message::{self, MessageInput, MessageLimits, PublishContext, ValidMessage};
use crate::domain::queue::{Compression, Queue, QueueStatus};
use crate::error::{ApiError, ApiResult, ErrorCode};
use crate::service::queue_cache::ResolvedQueue;
use crate::service::{byte_quota, queues};
use crate::state::AppState;

#[derive(Debug, Clone, Serialize, utoipa::ToSchema)]
#[serde(rename_all = "camelCase")]
pub struct PublishResult {
    pub message_id: String,
    pub queue: String,
    pub partition: u16,
    pub offset: Option<String>,
    pub published_at: DateTime<Utc>,
    pub duplicate: bool,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub scheduled_at: Option<DateTime<Utc>>,
}

/// Publishes one message; `duplicate` in the result says whether it was stored before.
pub async fn publish_one(
    state: &AppState,
    tenant: &Tenant,
    queue_name: &str,
    input: MessageInput,
    context: &PublishContext,
) -> ApiResult<PublishResult> {
    let producer = Producer::Principal(tenant);
    let mut results = publish(state, producer, queue_name, vec![input], context, false).await?;
    results
        .pop()
        .ok_or_else(|| ApiError::internal("publish returned no result"))
}

/// Publishes one message on the service's own behalf (dead letters, platform events): the
/// queue's producer ACL does not apply.
pub async fn publish_as_service(
    state: &AppState,
    tenant_id: Uuid,
    queue_name: &str,
    input: MessageInput,
    context: &PublishContext,
) -> ApiResult<PublishResult> {
    let producer = Producer::Service { tenant_id };
    let mut results = publish(state, producer, queue_name, vec![input], context, false).await?;
    results
        .pop()
        .ok_or_else(|| ApiError::internal("publish returned no result"))
}

/// Publishes several messages on the service's own behalf, all or none (audit events).
pub async fn publish_batch_as_service(
    state: &AppState,
    tenant_id: Uuid,
    queue_name: &str,
    inputs: Vec<MessageInput>,
    context: &PublishContext,
) -> ApiResult<Vec<PublishResult>> {
    let producer = Producer::Service { tenant_id };
    publish(state, producer, queue_name, inputs, context, true).await
}

/// Who publishes: a tenant's principal (subject to `allowedProducers`) or the service.
#[derive(Clone, Copy)]
enum Producer<'a> {
    Principal(&'a Tenant),
    Service { tenant_id: Uuid },
}

impl Producer<'_> {
    fn tenant_id(self) -> Uuid {
        match self {
            Producer::Principal(tenant) => tenant.tenant_id,
            Producer::Service { tenant_id } => tenant_id,
        }
    }
}

/// Publishes a batch: every message is validated before any is stored.
pub async fn publish_batch(
    state: &AppState,
    tenant: &Tenant,
    queue_name: &str,
    inputs: Vec<MessageInput>,
    context: &PublishContext,
) -> ApiResult<Vec<PublishResult>> {
    let max = state.config.max_batch_size;
    if inputs.is_empty() || inputs.len() > max {
        return Err(ApiError::validation(
            format!(
                "messages must hold 1 to {max} messages (got {})",
                inputs.len()
            ),
            vec!["messages".into()],
        ));
    }
    publish(
        state,
        Producer::Principal(tenant),
        queue_name,
        inputs,
        context,
        true,
    )
    .await
}

async fn publish(
    state: &AppState,
    producer: Producer<'_>,
    queue_name: &str,
    inputs: Vec<MessageInput>,
    context: &PublishContext,
    batch: bool,
) -> ApiResult<Vec<PublishResult>> {
    let resolved = queues::resolve(state, producer.tenant_id(), queue_name)
        .await
        .map_err(ApiError::during_publish)?;
    authorize_producer(&resolved, producer)?;
    let messages = validate_all(state, &resolved, inputs, context, batch).await?;
    let stored_bytes: u64 = messages.iter().map(|m| m.stored_bytes as u64).sum();
    if let Producer::Principal(tenant) = producer {
        let bytes = messages.iter().map(|m| m.original_bytes as u64).sum();
        admit(state, tenant.tenant_id, bytes).await?;
        byte_quota::admit(state, tenant.tenant_id, stored_bytes)
            .await
            .map_err(ApiError::during_publish)?;
    }
    let queue = &resolved.queue;
    let written = state
        .unrecorded
        .marking(queue, messages.iter().map(|m| m.partition));
    let outcome = state
        .broker
        .publish(
            queue,
            &messages,
            state.config.dedup_window_ms,
            context.now_ms,
        )
        .await;
    drop(written);
    let outcome = outcome.map_err(ApiError::during_publish)?;
    let stored = match outcome {
        PublishOutcome::Stored(stored) => stored,
        PublishOutcome::Full { backlog } => return Err(queue_full(queue, backlog)),
        PublishOutcome::QueueDeleted => {
            state.queue_cache.invalidate(queue.tenant_id, &queue.name);
            return Err(ApiError::queue_not_found(&queue.name));
        }
    };
    // Consumers and workers here act at once; the script announced it to the others.
    state.activity.mark(queue.id);
    if !queue.system {
        state.byte_quotas.added(queue.tenant_id, stored_bytes);
    }
    if messages.iter().any(|m| m.hold_until.is_none()) {
        state.signals.notify(queue.id);
    }
    // Short-lived messages are marked expired on time (see `broker::publish`).
    let expiry_watched = messages
        .iter()
        .filter(|m| {
            m.hold_until.is_none()
                && m.envelope.expires_at
                    < m.envelope
                        .published_at
                        .saturating_add(queue.retention_ms as i64)
        })
        .map(|m| m.envelope.expires_at);
    if let Some(earliest) = messages
        .iter()
        .filter_map(|m| m.hold_until)
        .chain(expiry_watched)
        .min()
    {
        state.scheduler.timers.arm(queue.id, earliest);
    }
    let stored_new = stored.iter().filter(|s| !s.duplicate).count() as u64;
    state
        .metrics
        .count_messages(queue.tenant_id, &queue.name, "published", stored_new);
    state.stats.published(queue.tenant_id, queue.id, stored_new);
    Ok(messages
        .iter()
        .zip(stored)
        .map(|(message, stored)| result(&queue.name, message, stored))
        .collect())
}

/// Counts the request against the tenant's publish limits; 429 when over them.
async fn admit(state: &AppState, tenant_id: Uuid, bytes: u64) -> ApiResult<()> {
    let config = &state.config;
    if config.tenant_publish_rps == 0 && config.tenant_publish_bytes_per_sec == 0 {
        return Ok(());
    }
    let admitted = state
        .broker
        .admit_publish(
            tenant_id,
            chrono::Utc::now().timestamp(),
            bytes,
            config.tenant_publish_rps,
            config.tenant_publish_bytes_per_sec,
        )
        .await
        .map_err(ApiError::during_publish)?;
    if admitted {
        Ok(())
    } else {
        Err(ApiError::new(
            ErrorCode::RateLimited,
            format!(
                "tenant is over its publish limit ({} requests, {} bytes per second)",
                config.tenant_publish_rps, config.tenant_publish_bytes_per_sec
            ),
        )
        .with_retry_after(1))
    }
}

fn authorize_producer(resolved: &ResolvedQueue, producer: Producer<'_>) -> ApiResult<()> {
    let queue = &resolved.queue;
    if queue.status == QueueStatus::Archived {
        return Err(ApiError::new(
            ErrorCode::QueueArchived,
            format!("queue '{}' is archived and accepts no messages", queue.name),
        ));
    }
    let Producer::Principal(tenant) = producer else {
        return Ok(());
    };
    queues::refuse_system_queue(&queue.name, "publish to")?;
    authorize_principal(queue, &tenant.principal)
}

/// 403 unless `principal` may publish to `queue` (`allowedProducers` empty or listing it).
pub fn authorize_principal(queue: &Queue, principal: &str) -> ApiResult<()> {
    if queue.allowed_producers.is_empty() || queue.allowed_producers.iter().any(|p| p == principal)
    {
        return Ok(());
    }
    Err(ApiError::new(
        ErrorCode::Forbidden,
        format!(
            "principal '{principal}' may not publish to queue '{}'",
            queue.name
        ),
    ))
}

/// Above this much payload, validation runs on the blocking pool.
const INLINE_VALIDATION_BYTES: usize = 64 * 1024;

/// Validates (and seals) every message. Schema checks, compression, encryption and large
/// payloads run on the blocking pool, so one tenant's 1 MiB schema-checked, encrypted
/// publishes never hold up the async threads every other request (health included) needs.
async fn validate_all(
    state: &AppState,
    resolved: &ResolvedQueue,
    inputs: Vec<MessageInput>,
    context: &PublishContext,
    batch: bool,
) -> ApiResult<Vec<ValidMessage>> {
    let schema = match &resolved.schema {
        Some(Ok(schema)) => Some(schema.clone()),
        Some(Err(reason)) => {
            return Err(ApiError::new(
                ErrorCode::SchemaViolation,
                format!(
                    "queue '{}' has a schemaDefinition that can no longer be used ({reason}); \
                     update it to publish",
                    resolved.queue.name
                ),
            ))
        }
        None => None,
    };
    let queue = &resolved.queue;
    let costly = schema.is_some()
        || queue.encrypted
        || queue.compression_type != Compression::None
        || message::payloads_exceed(&inputs, INLINE_VALIDATION_BYTES);
    let work = Validation {
        limits: MessageLimits {
            max_message_size: state.config.max_message_size,
            default_ttl_ms: i64::try_from(state.config.default_ttl_secs.saturating_mul(1000))
                .unwrap_or(i64::MAX),
            max_delay_ms: i64::try_from(state.config.max_delay_ms).unwrap_or(i64::MAX),
        },
        sealer: state.sealer.clone(),
        queue: queue.clone(),
        schema,
        context: context.clone(),
        batch,
    };
    if costly {
        tokio::task::spawn_blocking(move || work.run(inputs))
            .await
            .map_err(|error| ApiError::internal(format!("validation task failed: {error}")))?
    } else {
        work.run(inputs)
    }
}

/// Everything validating a request's messages needs, owned, so it can run on any thread.
struct Validation {
    limits: MessageLimits,
    sealer: Arc<Sealer>,
    queue: Arc<Queue>,
    schema: Option<Arc<jsonschema::Validator>>,
    context: PublishContext,
    batch: bool,
}

impl Validation {
    fn run(self, inputs: Vec<MessageInput>) -> ApiResult<Vec<ValidMessage>> {
        inputs
            .into_iter()
            .enumerate()
            .map(|(index, input)| {
                message::validate(
                    &self.queue,
                    self.schema.as_deref(),
                    input,
                    self.limits,
                    &self.context,
                    uuid::Uuid::now_v7().to_string(),
                )
                .and_then(|message| seal(&self.sealer, &self.queue, message))
                .map_err(|error| {
                    if self.batch {
                        at_batch_index(error, index)
                    } else {
                        error
                    }
                })
            })
            .collect()
    }
}

/// Stores the payload of a compressed or encrypted queue sealed (see `crypto`): the
/// envelope then carries no plaintext payload.
fn seal(sealer: &Sealer, queue: &Queue, mut message: ValidMessage) -> ApiResult<ValidMessage> {
    if queue.compression_type == Compression::None && !queue.encrypted {
        return Ok(message);
    }
    let binding = Binding {
        tenant_id: queue.tenant_id,
        queue_id: queue.id,
        message_id: &message.envelope.message_id,
    };
    let sealed = sealer
        .seal(
            &message.envelope.payload,
            queue.compression_type,
            queue.encrypted,
            binding,
        )
        .map_err(|error| ApiError::internal(format!("sealing a payload: {error}")))?;
    message.stored_bytes = sealed.data.len();
    message.envelope.payload = serde_json::Value::Null;
    message.envelope.sealed = Some(sealed);
    message.encoded = message::encode(&message.envelope)?;
    Ok(message)
}

/// Re-addresses an error about one message to its place in the batch.
pub fn at_batch_index(mut error: ApiError, index: usize) -> ApiError {
    if let Some(fields) = error
        .details
        .get_mut("fields")
        .and_then(|f| f.as_array_mut())
    {
        for field in fields.iter_mut() {
            if let Some(name) = field.as_str() {
                *field = json!(format!("messages[{index}].{name}"));
            }
        }
    }
    error.message = format!("messages[{index}]: {}", error.message);
    error.with_detail("index", json!(index))
}

fn result(queue: &str, message: &ValidMessage, stored: Stored) -> PublishResult {
    let published_at_ms = stored
        .original_published_at
        .unwrap_or(message.envelope.published_at);
    let scheduled_at_ms = if stored.duplicate {
        stored.original_scheduled_at
    } else {
        message.envelope.scheduled_at
    };
    PublishResult {
        message_id: message.envelope.message_id.clone(),
        queue: queue.to_owned(),
        partition: stored.partition,
        offset: stored.offset,
        published_at: DateTime::from_timestamp_millis(published_at_ms).unwrap_or_default(),
        duplicate: stored.duplicate,
        scheduled_at: scheduled_at_ms.and_then(DateTime::from_timestamp_millis),
    }
}
