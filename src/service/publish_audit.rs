//! The `message_published` audit trail, as the seed design's publisher logs it: an event for
//! every stored message (id, queue, partition, offset, size, tenant, producer), written off the
//! hot path by the recorder once it has recorded the message — batched per tenant into the
//! tenant's `audit-logs` queue and, when `AUDIT_SERVICE_URL` is set, posted in batches to the
//! audit service by `workers::audit_forwarder`. `AUDIT_PUBLISHES=false` turns it off.
//!
//! Best effort, like every audit event: a failure is logged and counted, never holds up the
//! recorder or a publish. Each event's id is derived from its message, so a batch the
//! recorder writes again stores its events once.
//!
//! A tenant whose `audit-logs` queue is full (nobody consumes it, the usual case) would have
//! every recorded batch built, published and refused again: for one second after a refusal
//! its events are dropped (and counted) without trying. That keeps an unread audit queue
//! from costing each publish of the tenant a second, refused publish.

use std::collections::{BTreeMap, HashMap};
use std::sync::Mutex;
use std::time::{Duration, Instant};

use chrono::{DateTime, Utc};
use serde_json::{json, Value};
use uuid::Uuid;

use crate::domain::message::{MessageInput, PublishContext, SERVICE_PRODUCER};
use crate::error::ErrorCode;
use crate::service::publish;
use crate::service::system_queues::AUDIT_LOGS;
use crate::state::AppState;

/// A message just recorded as stored.
#[derive(Debug, Clone)]
pub struct Published {
    pub tenant_id: Uuid,
    pub queue_id: Uuid,
    pub message_id: String,
    pub partition: i32,
    pub offset: Option<String>,
    pub size: i32,
    pub producer_id: Option<String>,
    pub published_at: DateTime<Utc>,
}

/// How long a tenant's events are dropped after its `audit-logs` queue refused them as full.
const FULL_BACKOFF: Duration = Duration::from_secs(1);

/// The tenants whose `audit-logs` queue was full lately, until when they are left alone. It
/// holds at most one entry per tenant, removed once its time passed.
#[derive(Default)]
pub struct FullAuditQueues(Mutex<HashMap<Uuid, Instant>>);

impl FullAuditQueues {
    fn backing_off(&self, tenant_id: Uuid, now: Instant) -> bool {
        let full = self
            .0
            .lock()
            .unwrap_or_else(|poisoned| poisoned.into_inner());
        full.get(&tenant_id).is_some_and(|until| *until > now)
    }

    fn refused(&self, tenant_id: Uuid, now: Instant) {
        let mut full = self
            .0
            .lock()
            .unwrap_or_else(|poisoned| poisoned.into_inner());
        full.retain(|_, until| *until > now);
        full.insert(tenant_id, now + FULL_BACKOFF);
    }
}

/// Emits `message_published` for `messages` (never for the audit queues' own messages).
pub async fn emit(state: &AppState, mut messages: Vec<Published>) {
    if !state.config.audit_publishes || messages.is_empty() {
        return;
    }
    let now = Instant::now();
    if state.audit_forwarder.is_none() {
        let before = messages.len();
        messages.retain(|m| !state.full_audit_queues.backing_off(m.tenant_id, now));
        let dropped = before - messages.len();
        state.metrics.audit_events_dropped.inc_by(dropped as u64);
        if messages.is_empty() {
            return;
        }
    }
    let ids: Vec<Uuid> = messages.iter().map(|m| m.queue_id).collect();
    let names: HashMap<Uuid, String> = match state.store.queue_names(&ids).await {
        Ok(names) => names.into_iter().collect(),
        Err(error) => {
            tracing::warn!(error = %error, "message_published events not emitted");
            return;
        }
    };
    let mut by_tenant: BTreeMap<Uuid, Vec<Value>> = BTreeMap::new();
    for message in messages {
        let Some(queue) = names.get(&message.queue_id) else {
            continue;
        };
        if queue == AUDIT_LOGS {
            continue;
        }
        by_tenant.entry(message.tenant_id).or_default().push(json!({
            "action": "message_published",
            "messageId": message.message_id,
            "queue": queue,
            "queueId": message.queue_id,
            "partition": message.partition,
            "offset": message.offset,
            "size": message.size,
            "tenantId": message.tenant_id,
            "producerId": message.producer_id,
            "at": message.published_at,
            "source": SERVICE_PRODUCER,
        }));
    }
    for (tenant_id, events) in by_tenant {
        let count = events.len();
        if let Some(forwarder) = &state.audit_forwarder {
            forwarder.send(events.clone());
        }
        let inputs = events
            .into_iter()
            .map(|event| MessageInput {
                message_id: Some(event_id(&event)),
                headers: Some([("eventType".to_owned(), "message_published".to_owned())].into()),
                payload: Some(event),
                ..MessageInput::default()
            })
            .collect();
        let context = PublishContext {
            now_ms: Utc::now().timestamp_millis(),
            trace_id: None,
            producer_id: Some(SERVICE_PRODUCER.to_owned()),
        };
        if state.full_audit_queues.backing_off(tenant_id, now) {
            state.metrics.audit_events_dropped.inc_by(count as u64);
            continue;
        }
        let stored = async {
            crate::service::queues::ensure_exists(state, tenant_id, AUDIT_LOGS, None).await?;
            publish::publish_batch_as_service(state, tenant_id, AUDIT_LOGS, inputs, &context).await
        };
        if let Err(error) = stored.await {
            state.metrics.audit_events_dropped.inc_by(count as u64);
            // A full audit queue (nobody consumes it) is expected: it is not worth a warning
            // per batch.
            if error.code == ErrorCode::QueueFull {
                state.full_audit_queues.refused(tenant_id, Instant::now());
                tracing::debug!(tenant = %tenant_id, "audit-logs full: message_published events dropped");
            } else {
                tracing::warn!(error = %error, tenant = %tenant_id, "message_published events not recorded");
            }
        }
    }
}

/// The audit event's own id, derived from its message: the same message always gives the
/// same id (so a repeated batch is a duplicate), within the 200 characters of a `messageId`.
fn event_id(event: &Value) -> String {
    use sha2::{Digest, Sha256};
    let digest = Sha256::new()
        .chain_update(event["queueId"].as_str().unwrap_or_default())
        .chain_update(b"|")
        .chain_update(event["messageId"].as_str().unwrap_or_default())
        .finalize();
    format!("published-{}", hex::encode(&digest[..16]))
}
