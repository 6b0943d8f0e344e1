//! Looking up one message, browsing a queue's messages, and cancelling a scheduled one.
//!
//! The record in PostgreSQL is the message's history (written by the recorder within about a
//! second of each change); what the recorder has not written yet is read from Redis — a
//! stored message through the queue's index of unrecorded messages, a delayed one where it
//! waits — so a message's state is readable the moment its publish answered. Cancellation
//! acts on Redis, atomically with release.

use chrono::{DateTime, Utc};
use serde::{Deserialize, Serialize};
use serde_json::Value;
use utoipa::{IntoParams, ToSchema};
use uuid::Uuid;

use crate::auth::Tenant;
use crate::broker::scheduler::Cancellation;
use crate::crypto::{Binding, SealedPayload, Sealer};
use crate::domain::message::Envelope;
use crate::domain::queue::{page_number, Queue};
use crate::domain::validation::Problems;
use crate::error::{ApiError, ApiResult, ErrorCode};
use crate::service::{publish, queues, subscriptions};
use crate::state::AppState;
use crate::store::records::{DeliveryRecord, MessageRecord, MessageSummaryRecord, PayloadEncoding};

const DEFAULT_BROWSE_PAGE: i64 = 25;
const MAX_BROWSE_PAGE: i64 = 100;

#[derive(Debug, Serialize, utoipa::ToSchema)]
#[serde(rename_all = "camelCase")]
pub struct MessageView {
    pub message_id: String,
    pub queue: String,
    pub status: String,
    pub partition: i32,
    pub offset: Option<String>,
    pub key: Option<String>,
    pub correlation_id: Option<String>,
    pub headers: Value,
    pub payload: Value,
    /// Why `payload` is null although the message had one: its stored form cannot be opened
    /// (a key no longer configured, tampering, or an encrypted queue's entry that was never
    /// sealed by this service).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub payload_error: Option<String>,
    pub published_at: DateTime<Utc>,
    pub scheduled_at: Option<DateTime<Utc>>,
    pub expires_at: Option<DateTime<Utc>>,
    pub trace_id: Option<String>,
    pub retry_count: i32,
    /// As the producer gave it, or the queue format's default; null when not known (a
    /// record older than the field).
    pub content_type: Option<String>,
    pub deliveries: Vec<DeliveryView>,
}

#[derive(Debug, Serialize, utoipa::ToSchema)]
#[serde(rename_all = "camelCase")]
pub struct DeliveryView {
    pub subscription_id: Uuid,
    pub attempt: i32,
    pub status: String,
    pub processing_ms: Option<i32>,
    pub error: Option<String>,
    pub at: DateTime<Utc>,
}

/// `GET /queues/{name}/messages` query parameters as sent.
#[derive(Debug, Default, Deserialize, IntoParams)]
#[into_params(parameter_in = Query)]
pub struct BrowseQuery {
    /// Messages per page, 1-100 (25).
    limit: Option<String>,
    /// The `next` of the previous page.
    before: Option<String>,
}

/// A message as a queue's browser lists it: its record without the payload.
#[derive(Debug, Serialize, ToSchema)]
#[serde(rename_all = "camelCase")]
pub struct MessageSummary {
    pub message_id: String,
    /// `scheduled`, `published`, `consumed`, `failed`, `dead_letter`, `expired`, `cancelled`
    /// or `redriven`.
    pub status: String,
    pub partition: i32,
    pub offset: Option<String>,
    pub key: Option<String>,
    pub correlation_id: Option<String>,
    /// Empty when they are larger than a list carries (`headersOmitted`): open the message.
    pub headers: Value,
    pub headers_omitted: bool,
    pub retry_count: i32,
    pub published_at: DateTime<Utc>,
    /// Size of the payload's JSON text.
    pub payload_size: i32,
}

/// One page of a queue's messages, newest first.
#[derive(Debug, Serialize, ToSchema)]
pub struct MessagePage {
    pub items: Vec<MessageSummary>,
    /// Pass as `before` for the next page; absent on the last.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub next: Option<String>,
}

/// The queue's recorded messages, newest first, without consuming them. A message shows here
/// once the recorder wrote it (about a second after its publish).
pub async fn browse(
    state: &AppState,
    tenant: &Tenant,
    queue_name: &str,
    query: BrowseQuery,
) -> ApiResult<MessagePage> {
    let mut problems = Problems::default();
    let limit = page_number(
        &mut problems,
        "limit",
        query.limit,
        DEFAULT_BROWSE_PAGE,
        1,
        MAX_BROWSE_PAGE,
    );
    let before = query.before.filter(|b| !b.is_empty()).and_then(|cursor| {
        let parsed = parse_cursor(&cursor);
        problems.check(parsed.is_some(), "before", || {
            "must be the next of an earlier page".into()
        });
        parsed
    });
    problems.into_result(())?;
    let queue = queues::require(state, tenant.tenant_id, queue_name).await?;
    // Headers are part of what a consumer reads: the consumer ACL applies.
    subscriptions::authorize_consumer(&queue, tenant.tenant_id, &tenant.principal)?;
    let records = state
        .store
        .list_message_summaries(queue.tenant_id, queue.id, before, limit)
        .await?;
    let next = (records.len() as i64 == limit)
        .then(|| records.last().map(cursor))
        .flatten();
    Ok(MessagePage {
        items: records.into_iter().map(summary).collect(),
        next,
    })
}

/// `<microseconds since the epoch>~<message id>` of the last message of a page.
fn cursor(record: &MessageSummaryRecord) -> String {
    format!(
        "{}~{}",
        record.published_at.timestamp_micros(),
        record.message_id
    )
}

fn parse_cursor(cursor: &str) -> Option<(DateTime<Utc>, String)> {
    let (micros, message_id) = cursor.split_once('~')?;
    let at = DateTime::from_timestamp_micros(micros.parse().ok()?)?;
    can_exist(message_id).then(|| (at, message_id.to_owned()))
}

fn summary(record: MessageSummaryRecord) -> MessageSummary {
    MessageSummary {
        message_id: record.message_id,
        status: record.status,
        partition: record.partition,
        offset: record.stream_offset,
        key: record.message_key,
        correlation_id: record.correlation_id,
        headers: record.headers.0,
        headers_omitted: record.headers_omitted,
        retry_count: record.retry_count,
        published_at: record.published_at,
        payload_size: record.payload_size,
    }
}

/// No message can have an id that is empty, over 200 characters or holding NUL (which
/// PostgreSQL refuses): such a lookup is answered without one.
fn can_exist(message_id: &str) -> bool {
    !message_id.is_empty() && message_id.chars().count() <= 200 && !message_id.contains('\0')
}

fn not_found(message_id: &str) -> ApiError {
    ApiError::new(
        ErrorCode::MessageNotFound,
        format!("message '{message_id}' not found"),
    )
}

/// A message's current state: its record in PostgreSQL (history, deliveries), completed from
/// the hot store for what the recorder has not written yet — so a message is found the moment
/// its publish answered, on any instance.
pub async fn get(
    state: &AppState,
    tenant: &Tenant,
    queue_name: &str,
    message_id: &str,
) -> ApiResult<MessageView> {
    let queue = queues::require(state, tenant.tenant_id, queue_name).await?;
    // Reading a message (its payload included) is consuming it: the consumer ACL applies.
    subscriptions::authorize_consumer(&queue, tenant.tenant_id, &tenant.principal)?;
    if !can_exist(message_id) {
        return Err(not_found(message_id));
    }
    if let Some(view) = recorded(state, &queue, message_id).await? {
        return Ok(view);
    }
    if let Some(found) = state.broker.find_unrecorded(&queue, message_id).await? {
        return from_hot_store(
            state,
            &queue,
            found.partition,
            Some(found.offset),
            &found.envelope,
        )
        .await;
    }
    // The recorder may have written it between the two looks.
    if let Some(view) = recorded(state, &queue, message_id).await? {
        return Ok(view);
    }
    let waiting = state
        .broker
        .find_delayed(queue.id, queue.partition_count, message_id)
        .await?
        .ok_or_else(|| not_found(message_id))?;
    let mut view =
        from_hot_store(state, &queue, waiting.partition, None, &waiting.envelope).await?;
    if waiting.cancelled {
        view.status = "cancelled".to_owned();
    }
    Ok(view)
}

/// The message's record, if the recorder wrote it, brought up to date with what happened
/// since: a release not recorded yet, or the data of a record that so far holds only a
/// status (its message's record was still on its way).
async fn recorded(
    state: &AppState,
    queue: &Queue,
    message_id: &str,
) -> ApiResult<Option<MessageView>> {
    let Some(mut record) = state
        .store
        .find_message_record(queue.id, message_id)
        .await?
    else {
        return Ok(None);
    };
    let deliveries = state
        .store
        .list_deliveries(queue.tenant_id, queue.id, message_id)
        .await?;
    let placeholder = record.payload.is_none();
    let stored = StoredPayload::of_record(&mut record);
    let mut view = from_record(&queue.name, record, deliveries);
    let current = if view.status == "scheduled" || placeholder {
        match state.broker.find_unrecorded(queue, message_id).await? {
            Some(found) => Some(
                from_hot_store(
                    state,
                    queue,
                    found.partition,
                    Some(found.offset),
                    &found.envelope,
                )
                .await?,
            ),
            None => None,
        }
    } else {
        None
    };
    match current {
        Some(current) if placeholder => {
            if view.status == "scheduled" {
                view.status = current.status;
            }
            view.offset = current.offset;
            view.headers = current.headers;
            view.key = current.key;
            view.correlation_id = current.correlation_id;
            view.payload = current.payload;
            view.payload_error = current.payload_error;
            view.published_at = current.published_at;
            view.expires_at = current.expires_at;
            view.trace_id = current.trace_id;
            view.content_type = current.content_type;
        }
        Some(current) => {
            view.status = current.status;
            view.offset = current.offset;
            set_payload(state, queue, &mut view, stored).await;
        }
        None => {
            // Cancelled while its record still said scheduled.
            if view.status == "scheduled" {
                let waiting = state
                    .broker
                    .find_delayed(queue.id, queue.partition_count, message_id)
                    .await?;
                if waiting.is_some_and(|w| w.cancelled) {
                    view.status = "cancelled".to_owned();
                }
            }
            set_payload(state, queue, &mut view, stored).await;
        }
    }
    Ok(Some(view))
}

/// The view of a message known only to the hot store: in a stream (`offset`), or waiting for
/// its time.
async fn from_hot_store(
    state: &AppState,
    queue: &Queue,
    partition: u16,
    offset: Option<String>,
    envelope: &str,
) -> ApiResult<MessageView> {
    let mut envelope: Envelope = serde_json::from_str(envelope)
        .map_err(|error| ApiError::internal(format!("stored envelope unreadable: {error}")))?;
    let stored = match envelope.sealed.take() {
        Some(sealed) => StoredPayload::Sealed(sealed),
        None => StoredPayload::Plain(std::mem::take(&mut envelope.payload)),
    };
    let status = if offset.is_some() {
        "published"
    } else {
        "scheduled"
    };
    let mut view = from_envelope(&queue.name, partition, offset, status, envelope);
    set_payload(state, queue, &mut view, stored).await;
    Ok(view)
}

/// A payload as stored, told apart by where the service put it, never by its shape.
enum StoredPayload {
    Plain(Value),
    Sealed(SealedPayload),
    Unreadable(String),
}

impl StoredPayload {
    fn of_record(record: &mut MessageRecord) -> StoredPayload {
        let payload = record.payload.take().map(|p| p.0).unwrap_or(Value::Null);
        match record.payload_encoding.as_str() {
            encoding if encoding == PayloadEncoding::Sealed.as_str() => {
                match serde_json::from_value(payload) {
                    Ok(sealed) => StoredPayload::Sealed(sealed),
                    Err(error) => {
                        StoredPayload::Unreadable(format!("sealed form unreadable: {error}"))
                    }
                }
            }
            encoding if encoding == PayloadEncoding::JsonText.as_str() => {
                match payload.as_str().map(serde_json::from_str::<Value>) {
                    Some(Ok(value)) => StoredPayload::Plain(value),
                    _ => StoredPayload::Unreadable("stored JSON text unreadable".into()),
                }
            }
            _ => StoredPayload::Plain(payload),
        }
    }
}

/// Puts the plaintext payload in the view, or says why there is none. An encrypted queue
/// shows only what it sealed itself: plaintext found there was not written by the service.
async fn set_payload(
    state: &AppState,
    queue: &Queue,
    view: &mut MessageView,
    stored: StoredPayload,
) {
    let opened = match stored {
        // Null: a placeholder whose record has not arrived yet (a payload is never null).
        StoredPayload::Plain(value) if queue.encrypted && !value.is_null() => {
            Err("the stored payload of this encrypted queue is not sealed".to_owned())
        }
        StoredPayload::Plain(value) => Ok(value),
        // Decryption and decompression run off the async threads.
        StoredPayload::Sealed(sealed) => {
            let (sealer, queue, message_id) =
                (state.sealer.clone(), queue.clone(), view.message_id.clone());
            tokio::task::spawn_blocking(move || open(&sealer, &queue, &sealed, &message_id))
                .await
                .unwrap_or_else(|error| Err(format!("opening failed: {error}")))
        }
        StoredPayload::Unreadable(reason) => Err(reason),
    };
    match opened {
        Ok(payload) => view.payload = payload,
        Err(reason) => {
            tracing::warn!(queue = %queue.id, message_id = view.message_id, reason, "payload of a looked-up message cannot be shown");
            view.payload = Value::Null;
            view.payload_error = Some(reason);
        }
    }
}

fn open(
    sealer: &Sealer,
    queue: &Queue,
    sealed: &SealedPayload,
    message_id: &str,
) -> Result<Value, String> {
    let binding = Binding {
        tenant_id: queue.tenant_id,
        queue_id: queue.id,
        message_id,
    };
    sealer
        .open(sealed, binding)
        .map_err(|error| error.to_string())
}

/// Cancels a message still waiting for its time; 409 once it was released or cancelled.
pub async fn cancel(
    state: &AppState,
    tenant: &Tenant,
    queue_name: &str,
    message_id: &str,
) -> ApiResult<()> {
    let queue = queues::require(state, tenant.tenant_id, queue_name).await?;
    // Cancelling a message undoes its publish: the producer ACL applies.
    publish::authorize_principal(&queue, &tenant.principal)?;
    if !can_exist(message_id) {
        return Err(not_found(message_id));
    }
    let not_cancellable = |status: &str| {
        ApiError::new(
            ErrorCode::MessageNotCancellable,
            format!("message '{message_id}' is no longer scheduled (status '{status}')"),
        )
    };
    let now = Utc::now().timestamp_millis();
    let cancellation = state
        .broker
        .cancel_delayed(queue.id, queue.partition_count, message_id, now)
        .await;
    if !matches!(cancellation, Ok(Cancellation::NotWaiting)) {
        state.unrecorded.mark_in(&queue, 0..queue.partition_count);
    }
    match cancellation? {
        Cancellation::Cancelled => return Ok(()),
        Cancellation::AlreadyCancelled => return Err(not_cancellable("cancelled")),
        Cancellation::NotWaiting => {}
    }
    match state
        .store
        .find_message_record(queue.id, message_id)
        .await?
    {
        // A record still saying "scheduled" was released after it was written.
        Some(record) if record.status == "scheduled" => Err(not_cancellable("published")),
        Some(record) => Err(not_cancellable(&record.status)),
        // Stored a moment ago: its record is on its way.
        None if state
            .broker
            .find_unrecorded(&queue, message_id)
            .await?
            .is_some() =>
        {
            Err(not_cancellable("published"))
        }
        None => Err(not_found(message_id)),
    }
}

fn from_record(queue: &str, record: MessageRecord, deliveries: Vec<DeliveryRecord>) -> MessageView {
    MessageView {
        message_id: record.message_id,
        queue: queue.to_owned(),
        status: record.status,
        partition: record.partition,
        offset: record.stream_offset,
        key: record.message_key,
        correlation_id: record.correlation_id,
        headers: record.headers.0,
        payload: Value::Null,
        payload_error: None,
        published_at: record.published_at,
        scheduled_at: record.scheduled_at,
        expires_at: record.expires_at,
        trace_id: record.trace_id,
        retry_count: record.retry_count,
        content_type: record.content_type,
        deliveries: deliveries
            .into_iter()
            .map(|d| DeliveryView {
                subscription_id: d.subscription_id,
                attempt: d.attempt,
                status: d.status,
                processing_ms: d.processing_ms,
                error: d.error,
                at: d.created_at,
            })
            .collect(),
    }
}

fn from_envelope(
    queue: &str,
    partition: u16,
    offset: Option<String>,
    status: &str,
    envelope: Envelope,
) -> MessageView {
    let time = |ms: i64| DateTime::from_timestamp_millis(ms).unwrap_or_default();
    MessageView {
        message_id: envelope.message_id,
        queue: queue.to_owned(),
        status: status.to_owned(),
        partition: i32::from(partition),
        offset,
        key: envelope.key,
        correlation_id: envelope.correlation_id,
        headers: serde_json::to_value(envelope.headers).unwrap_or(Value::Null),
        payload: Value::Null,
        payload_error: None,
        published_at: time(envelope.published_at),
        scheduled_at: envelope.scheduled_at.map(time),
        expires_at: Some(time(envelope.expires_at)),
        trace_id: envelope.trace_id,
        retry_count: 0,
        content_type: Some(envelope.content_type),
        deliveries: Vec::new(),
    }
}
