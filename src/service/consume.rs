//! Consuming: pull, ack and nack of `redis_consumer` subscriptions, and the failure policy
//! (retry schedule, dead-lettering) that every kind of delivery shares.

use std::collections::BTreeMap;
use std::time::{Duration, Instant};

use chrono::{DateTime, Utc};
use serde::{Deserialize, Serialize};
use serde_json::Value;
use uuid::Uuid;

use crate::auth::Tenant;
use crate::broker::consume::{Delivery, Outcome, Settlement, TakeLimit, Taken};
use crate::crypto::{Binding, SealError, Sealer};
use crate::domain::ack_token::AckToken;
use crate::domain::filter::{Filter, MessageView};
use crate::domain::message::{Envelope, MessageInput, PublishContext, SERVICE_PRODUCER};
use crate::domain::queue::{Compression, Queue, QueueStatus};
use crate::domain::retry::{may_retry, retry_delay_ms};
use crate::domain::subscription::{Subscription, SubscriptionStatus, SubscriptionType};
use crate::error::{ApiError, ApiResult, ErrorCode};
use crate::service::{publish, queues, subscriptions};
use crate::state::AppState;

/// The longest a pull may wait (API.md).
pub const MAX_WAIT_MS: i64 = 20_000;
/// A waiting pull is woken when messages arrive (on any instance: `service::wake`), one of
/// its group's retries falls due, or its queue or a subscription changes; it also takes again
/// this often, in case a wake-up was lost.
const REPOLL: Duration = Duration::from_secs(5);
/// A waiting pull looks at its queue (status, `isPublic`, ACLs) at least this often.
const RECHECK: Duration = Duration::from_secs(1);
const MAX_ACK_IDS: usize = 1000;

#[derive(Debug, Default, Deserialize, utoipa::ToSchema)]
#[serde(rename_all = "camelCase")]
pub struct PullRequest {
    /// At most the subscription's `maxPollRecords`.
    #[schema(minimum = 1, maximum = 1000, example = 10)]
    pub max_messages: Option<i64>,
    /// Long poll: how long to wait for a first message.
    #[schema(minimum = 0, maximum = 20000, example = 5000)]
    pub wait_ms: Option<i64>,
}

#[derive(Debug, Default, Deserialize, utoipa::ToSchema)]
#[serde(rename_all = "camelCase")]
pub struct AckRequest {
    pub ack_ids: Option<Vec<String>>,
    pub delay_ms: Option<i64>,
}

#[derive(Debug, Serialize, utoipa::ToSchema)]
#[serde(rename_all = "camelCase")]
pub struct PulledMessage {
    pub ack_id: String,
    pub message_id: String,
    pub queue: String,
    pub partition: u16,
    pub offset: String,
    pub payload: Value,
    pub headers: BTreeMap<String, String>,
    pub key: Option<String>,
    pub correlation_id: Option<String>,
    pub published_at: DateTime<Utc>,
    pub delivery_attempt: u32,
}

/// The subscription and queue a consuming request acts on, checked.
struct Consumer {
    subscription: Subscription,
    queue: std::sync::Arc<Queue>,
}

async fn consumer(state: &AppState, tenant: &Tenant, id: &str) -> ApiResult<Consumer> {
    let subscription = subscriptions::require_for_consuming(state, tenant.tenant_id, id).await?;
    if subscription.subscription_type != SubscriptionType::RedisConsumer {
        return Err(ApiError::validation(
            format!(
                "subscription '{id}' is a {} subscription: its messages are pushed, not pulled",
                subscription.subscription_type.as_str()
            ),
            vec![],
        ));
    }
    let queue = queues::resolve(state, subscription.queue_tenant_id, &subscription.queue)
        .await?
        .queue;
    subscriptions::authorize_consumer(&queue, tenant.tenant_id, &tenant.principal)?;
    Ok(Consumer {
        subscription,
        queue,
    })
}

fn now_ms() -> i64 {
    Utc::now().timestamp_millis()
}

pub async fn pull(
    state: &AppState,
    tenant: &Tenant,
    id: &str,
    request: PullRequest,
) -> ApiResult<Vec<PulledMessage>> {
    // Read before the subscription is: a change from here on is noticed.
    let mut seen_changes = state.subscriptions.changes();
    let Consumer {
        mut subscription,
        mut queue,
    } = consumer(state, tenant, id).await?;
    let max = i64::from(subscription.max_poll_records);
    let max_messages = request.max_messages.unwrap_or(10.min(max));
    let wait_ms = request.wait_ms.unwrap_or(0);
    let mut problems = crate::domain::validation::Problems::default();
    problems.check((1..=max).contains(&max_messages), "maxMessages", || {
        format!("must be between 1 and {max} (the subscription's maxPollRecords)")
    });
    problems.check((0..=MAX_WAIT_MS).contains(&wait_ms), "waitMs", || {
        format!("must be between 0 and {MAX_WAIT_MS}")
    });
    problems.into_result(())?;
    refuse_paused(&subscription, id)?;

    let give_up = tokio::time::Instant::now() + Duration::from_millis(wait_ms as u64);
    let signal = state.signals.subscribe(queue.id);
    // Rotating the first partition spreads consumers over partitions.
    let mut first_partition = fastrand::u16(..queue.partition_count.max(1));
    let mut looked = false;
    let mut take_now = true;
    let mut last_take = Instant::now();
    let mut restored = false;
    loop {
        // Listening before looking: whatever arrives or changes from here on ends the wait.
        let arrived = signal.notified();
        tokio::pin!(arrived);
        arrived.as_mut().enable();
        let changes = state.subscriptions.changes();
        if looked {
            // What the poll began with may have changed: the subscription (deleted, paused,
            // filter) after any change announced; the queue (paused, resumed, private, ACLs)
            // at every look, from the cache every change empties.
            if changes != seen_changes {
                seen_changes = changes;
                let current = reread_subscription(state, tenant.tenant_id, id).await?;
                take_now |= current.updated_at != subscription.updated_at;
                subscription = current;
            }
            queue = queues::resolve(state, subscription.queue_tenant_id, &subscription.queue)
                .await?
                .queue;
            subscriptions::authorize_consumer(&queue, tenant.tenant_id, &tenant.principal)?;
        }
        looked = true;
        if take_now && queue.status != QueueStatus::Paused {
            last_take = Instant::now();
            let now = now_ms();
            let deadline = now + subscription.session_timeout_ms as i64;
            let taken = state
                .broker
                .take(
                    queue.id,
                    queue.partition_count,
                    first_partition,
                    &subscription.delivery_group,
                    &subscription.id.to_string(),
                    take_limit(state, max_messages as usize),
                    now,
                    deadline,
                    false,
                )
                .await
                .map_err(ApiError::during_consume)?;
            if taken.gone {
                // Made again at most once per pull: a group that cannot be made is not
                // retried in a loop.
                if !restored
                    && subscriptions::restore_lost_group(state, &subscription, &queue).await?
                {
                    restored = true;
                    continue;
                }
                return Err(subscriptions::not_found(id));
            }
            watch_times(state, queue.id, &taken, deadline);
            let filter = subscription.filter();
            let messages = hand_out(
                state,
                &subscription,
                &queue,
                filter.as_ref(),
                taken.deliveries,
                now,
            )
            .await
            .map_err(ApiError::during_consume)?;
            if !messages.is_empty() {
                return Ok(messages);
            }
            first_partition = first_partition.wrapping_add(1) % queue.partition_count.max(1);
        }
        let now = tokio::time::Instant::now();
        if now >= give_up || state.stopping.is_cancelled() {
            // The service is stopping: the poll answers now, and the client polls another
            // instance.
            return Ok(Vec::new());
        }
        // Messages (or a change of the queue) call for a take; a subscription change only
        // for a look at the subscription, which takes if it changed.
        take_now = tokio::select! {
            () = arrived => true,
            () = state.subscriptions.changed_since(changes) => false,
            () = tokio::time::sleep(RECHECK.min(give_up - now)) => false,
            () = state.stopping.cancelled() => false,
        } || last_take.elapsed() >= REPOLL;
    }
}

/// The subscription as it is now, for a waiting pull: from the subscription list (loaded
/// once per change), or from PostgreSQL when the list lacks it (newer than the list, or
/// deleted: then 404).
async fn reread_subscription(
    state: &AppState,
    tenant_id: uuid::Uuid,
    id: &str,
) -> ApiResult<Subscription> {
    let listed = match uuid::Uuid::parse_str(id) {
        Ok(uuid) => state.subscriptions.find(&state.store, uuid).await,
        Err(_) => None,
    };
    let subscription = match listed.filter(|s| s.tenant_id == tenant_id) {
        Some(subscription) => subscription,
        None => subscriptions::require(state, tenant_id, id).await?,
    };
    refuse_paused(&subscription, id)?;
    Ok(subscription)
}

fn refuse_paused(subscription: &Subscription, id: &str) -> ApiResult<()> {
    if subscription.status == SubscriptionStatus::Paused {
        return Err(ApiError::new(
            ErrorCode::SubscriptionPaused,
            format!("subscription '{id}' is paused"),
        ));
    }
    Ok(())
}

/// What a stored entry may hold beyond its payload (envelope fields, headers), to size reads.
const ENTRY_OVERHEAD_BYTES: usize = 128 * 1024;

/// What one take may hand out: `count` deliveries, and about `PULL_MAX_BYTES` of them (at
/// least one), so a pull of large messages answers fewer rather than a reply of hundreds of
/// megabytes held in Redis and here.
pub fn take_limit(state: &AppState, count: usize) -> TakeLimit {
    TakeLimit {
        count,
        bytes: state.config.pull_max_bytes,
        // A stored payload is at most about 4/3 of its size (base64 of binary or sealed).
        entry_most: state.config.max_message_size.saturating_mul(4) / 3 + ENTRY_OVERHEAD_BYTES,
    }
}

/// Arms the timers a take calls for: the reclaimer's at the deadline of what was taken, and
/// the consumers' at the group's next retry.
pub fn watch_times(state: &AppState, queue_id: uuid::Uuid, taken: &Taken, deadline_ms: i64) {
    if !taken.deliveries.is_empty() {
        state.deadline_timers.arm(queue_id, deadline_ms);
    }
    if let Some(next_retry) = taken.next_retry_ms {
        state.retry_timers.arm(queue_id, next_retry);
    }
}

/// Turns deliveries into messages for the client, with their `ackId`s.
async fn hand_out(
    state: &AppState,
    subscription: &Subscription,
    queue: &Queue,
    filter: Option<&Filter>,
    deliveries: Vec<Delivery>,
    now: i64,
) -> ApiResult<Vec<PulledMessage>> {
    let deliverable = screen(state, subscription, queue, filter, deliveries, now).await?;
    let books = Books::of(subscription, queue);
    state.metrics.count_messages(
        books.tenant_id,
        &books.metric_queue,
        "delivered",
        deliverable.len() as u64,
    );
    Ok(deliverable
        .into_iter()
        .map(|(delivery, envelope)| {
            let token = AckToken {
                subscription_id: subscription.id,
                partition: delivery.partition,
                entry_id: delivery.entry_id.clone(),
                message_id: envelope.message_id.clone(),
                attempt: delivery.attempt,
                delivered_at_ms: now,
                published_at_ms: envelope.published_at,
            };
            PulledMessage {
                ack_id: state.ack_signer.issue(&token),
                message_id: envelope.message_id,
                queue: queue.name.clone(),
                partition: delivery.partition,
                offset: delivery.entry_id,
                payload: envelope.payload,
                headers: envelope.headers,
                key: envelope.key,
                correlation_id: envelope.correlation_id,
                published_at: DateTime::from_timestamp_millis(envelope.published_at)
                    .unwrap_or_default(),
                delivery_attempt: delivery.attempt,
            }
        })
        .collect())
}

/// The deliveries worth handing to the consumer, with their envelopes. Expired messages
/// (`ttlMs` passed), messages the subscription's filter rejects and unreadable entries are
/// settled here and never delivered.
pub async fn screen(
    state: &AppState,
    subscription: &Subscription,
    queue: &Queue,
    filter: Option<&Filter>,
    deliveries: Vec<Delivery>,
    now: i64,
) -> ApiResult<Vec<(Delivery, Envelope)>> {
    let mut deliverable = Vec::with_capacity(deliveries.len());
    let mut skipped: Vec<(Delivery, Option<Envelope>, Outcome)> = Vec::new();
    for (delivery, opened) in open_deliveries(state, queue, deliveries).await? {
        let envelope = match opened {
            Opened::Unreadable => {
                skipped.push((delivery, None, Outcome::Filtered));
                continue;
            }
            Opened::Sealed(envelope, error) => {
                // Tampered or unreadable: never delivered, dead-lettered with the reason.
                tracing::warn!(error = %error, message_id = envelope.message_id, "stored payload cannot be opened");
                let reason = error.to_string();
                match dead_letter(
                    state,
                    subscription,
                    queue,
                    envelope.clone(),
                    delivery.attempt,
                    "decryption-failed",
                    &reason,
                )
                .await
                {
                    Ok(()) => skipped.push((delivery, Some(envelope), Outcome::DeadLetter)),
                    // Left in flight: retried, and dead-lettered then.
                    Err(error) => {
                        tracing::warn!(error = %error, "dead-lettering an unreadable message failed")
                    }
                }
                continue;
            }
            Opened::Plain(envelope) => envelope,
        };
        if envelope.expires_at <= now {
            skipped.push((delivery, Some(envelope), Outcome::Expired));
            continue;
        }
        let wanted = filter.is_none_or(|f| {
            f.matches(&MessageView {
                headers: &envelope.headers,
                payload: &envelope.payload,
                key: envelope.key.as_deref(),
            })
        });
        if wanted {
            deliverable.push((delivery, envelope));
        } else {
            skipped.push((delivery, Some(envelope), Outcome::Filtered));
        }
    }
    if !skipped.is_empty() {
        let group = subscription.delivery_group.as_str();
        let settlements: Vec<Settlement<'_>> = skipped
            .iter()
            .map(|(delivery, envelope, outcome)| Settlement {
                group,
                partition: delivery.partition,
                entry_id: &delivery.entry_id,
                outcome: *outcome,
                expected_deadline: Some(&delivery.deadline),
                expected_attempt: None,
                message_id: envelope.as_ref().map_or("", |e| e.message_id.as_str()),
                subscription_id: subscription.id,
                processing_ms: None,
                error: None,
                now_ms: now,
                published_at_ms: None,
            })
            .collect();
        settle(state, subscription, queue, &settlements).await?;
    }
    Ok(deliverable)
}

/// A taken entry's envelope, decoded and opened.
enum Opened {
    /// No envelope, or not one the service wrote.
    Unreadable,
    /// Its payload cannot be opened (tampered, unknown key, not sealed on an encrypted queue).
    Sealed(Envelope, SealError),
    Plain(Envelope),
}

/// Above this much envelope text, decoding and opening run on the blocking pool.
const INLINE_OPEN_BYTES: usize = 64 * 1024;

/// Decodes and opens the envelopes of `deliveries`. Decryption, decompression and large
/// envelopes run on the blocking pool, off the async threads.
async fn open_deliveries(
    state: &AppState,
    queue: &Queue,
    deliveries: Vec<Delivery>,
) -> ApiResult<Vec<(Delivery, Opened)>> {
    let text_bytes: usize = deliveries
        .iter()
        .map(|d| d.envelope.as_ref().map_or(0, String::len))
        .sum();
    let seals = queue.encrypted || queue.compression_type != Compression::None;
    let sealer = state.sealer.clone();
    let open = move |queue: &Queue| {
        deliveries
            .into_iter()
            .map(|delivery| {
                let opened = match delivery
                    .envelope
                    .as_deref()
                    .and_then(|text| serde_json::from_str::<Envelope>(text).ok())
                {
                    None => Opened::Unreadable,
                    Some(mut envelope) => match open_envelope(&sealer, queue, &mut envelope) {
                        Ok(()) => Opened::Plain(envelope),
                        Err(error) => Opened::Sealed(envelope, error),
                    },
                };
                (delivery, opened)
            })
            .collect()
    };
    if !seals && text_bytes <= INLINE_OPEN_BYTES {
        return Ok(open(queue));
    }
    let queue = queue.clone();
    tokio::task::spawn_blocking(move || open(&queue))
        .await
        .map_err(|error| ApiError::internal(format!("opening task failed: {error}")))
}

/// The tokens of `ack_ids` issued for this subscription; others (forged, foreign) are dropped.
fn own_tokens(
    state: &AppState,
    subscription: &Subscription,
    ack_ids: Option<Vec<String>>,
) -> ApiResult<Vec<AckToken>> {
    let ack_ids =
        ack_ids.ok_or_else(|| ApiError::validation("ackIds is required", vec!["ackIds".into()]))?;
    if ack_ids.len() > MAX_ACK_IDS {
        return Err(ApiError::validation(
            format!("ackIds holds at most {MAX_ACK_IDS} ids"),
            vec!["ackIds".into()],
        ));
    }
    Ok(ack_ids
        .iter()
        .filter_map(|id| state.ack_signer.verify(id))
        .filter(|token| token.subscription_id == subscription.id)
        .collect())
}

pub async fn ack(
    state: &AppState,
    tenant: &Tenant,
    id: &str,
    request: AckRequest,
) -> ApiResult<usize> {
    let Consumer {
        subscription,
        queue,
    } = consumer(state, tenant, id).await?;
    let tokens = own_tokens(state, &subscription, request.ack_ids)?;
    let now = now_ms();
    let settlements: Vec<Settlement<'_>> = tokens
        .iter()
        .map(|token| Settlement {
            group: &subscription.delivery_group,
            partition: token.partition,
            entry_id: &token.entry_id,
            outcome: Outcome::Acked,
            expected_deadline: None,
            // Only the delivery this ackId was issued for: an earlier attempt's ackId never
            // settles a redelivery in flight to someone else.
            expected_attempt: Some(token.attempt),
            message_id: &token.message_id,
            subscription_id: subscription.id,
            processing_ms: Some((now - token.delivered_at_ms).max(0)),
            error: None,
            now_ms: now,
            published_at_ms: Some(token.published_at_ms),
        })
        .collect();
    let applied = settle(state, &subscription, &queue, &settlements)
        .await
        .map_err(ApiError::during_consume)?;
    Ok(applied.into_iter().filter(|a| *a).count())
}

pub async fn nack(
    state: &AppState,
    tenant: &Tenant,
    id: &str,
    request: AckRequest,
) -> ApiResult<usize> {
    let Consumer {
        subscription,
        queue,
    } = consumer(state, tenant, id).await?;
    if let Some(delay) = request.delay_ms {
        if !(0..=crate::domain::retry::MAX_RETRY_DELAY_MS as i64).contains(&delay) {
            return Err(ApiError::validation(
                format!(
                    "delayMs must be between 0 and {}",
                    crate::domain::retry::MAX_RETRY_DELAY_MS
                ),
                vec!["delayMs".into()],
            ));
        }
    }
    let tokens = own_tokens(state, &subscription, request.ack_ids)?;
    let mut nacked = 0;
    for token in tokens {
        let failure = Failure {
            partition: token.partition,
            entry_id: &token.entry_id,
            message_id: &token.message_id,
            attempt: token.attempt,
            expected_deadline: None,
            expected_attempt: Some(token.attempt),
            error: "nacked by the consumer",
            delay_override_ms: request.delay_ms,
            processing_ms: Some((now_ms() - token.delivered_at_ms).max(0)),
        };
        if record_failure(state, &subscription, &queue, failure, None)
            .await
            .map_err(ApiError::during_consume)?
        {
            nacked += 1;
        }
    }
    Ok(nacked)
}

/// A failed delivery attempt (nack, ack deadline passed, webhook error).
pub struct Failure<'a> {
    pub partition: u16,
    pub entry_id: &'a str,
    pub message_id: &'a str,
    /// Deliveries made, this one included.
    pub attempt: u32,
    pub expected_deadline: Option<&'a str>,
    pub expected_attempt: Option<u32>,
    pub error: &'a str,
    pub delay_override_ms: Option<i64>,
    pub processing_ms: Option<i64>,
}

/// Applies the retry policy of `subscription` to a failed delivery: schedule the next
/// attempt, or when attempts are exhausted move the message to the dead-letter queue.
/// `envelope` is the message when the caller has it (else it is read when needed).
/// Returns whether the failure was recorded (false when the delivery was settled meanwhile).
pub async fn record_failure(
    state: &AppState,
    subscription: &Subscription,
    queue: &Queue,
    failure: Failure<'_>,
    envelope: Option<Envelope>,
) -> ApiResult<bool> {
    let now = now_ms();
    let retry = may_retry(failure.attempt, subscription.max_retry_attempts);
    let mut outcome = if retry {
        let delay = failure.delay_override_ms.unwrap_or_else(|| {
            let jitter = fastrand::f64() * 2.0 - 1.0;
            retry_delay_ms(subscription.retry_delay_ms, failure.attempt, jitter) as i64
        });
        Outcome::Failed {
            retry_at_ms: now + delay,
        }
    } else {
        Outcome::DeadLetter
    };
    if outcome == Outcome::DeadLetter {
        let envelope = match envelope {
            Some(envelope) => Some(envelope),
            None => state
                .broker
                .read_envelope(queue.id, failure.partition, failure.entry_id)
                .await?
                .and_then(|text| serde_json::from_str::<Envelope>(&text).ok()),
        };
        if let Some(envelope) = envelope {
            outcome = dead_letter_or_set_aside(
                state,
                subscription,
                queue,
                &failure,
                envelope,
                "max-retries-exceeded",
            )
            .await;
        }
    }
    let settlement = Settlement {
        group: &subscription.delivery_group,
        partition: failure.partition,
        entry_id: failure.entry_id,
        outcome,
        expected_deadline: failure.expected_deadline,
        expected_attempt: failure.expected_attempt,
        message_id: failure.message_id,
        subscription_id: subscription.id,
        processing_ms: failure.processing_ms,
        error: Some(failure.error),
        now_ms: now,
        published_at_ms: None,
    };
    let applied = settle(state, subscription, queue, &[settlement]).await?;
    Ok(applied.first().copied().unwrap_or(false))
}

/// A dead-letter queue that cannot take a message now (full, rate limited, unreachable) is
/// tried again no sooner than this, whatever the subscription's retry delay.
const DEAD_LETTER_RETRY_MS: i64 = 1000;

/// Whether a dead-letter queue's refusal holds for this message whatever the retries: it
/// fails the queue's schema or limits, or the subscriber may not write there.
fn refused_for_good(error: &ApiError) -> bool {
    matches!(
        error.code,
        ErrorCode::Validation
            | ErrorCode::SchemaViolation
            | ErrorCode::MessageTooLarge
            | ErrorCode::Forbidden
            | ErrorCode::QueueArchived
            | ErrorCode::QuotaExceeded
    )
}

/// Moves an exhausted message to the dead-letter queue; the outcome to settle it with. A
/// message the dead-letter queue refuses for good is set aside once (the record quarantine,
/// with the reason), so the subscription moves on instead of redelivering it forever; one it
/// cannot take now is retried after `DEAD_LETTER_RETRY_MS` at the soonest.
async fn dead_letter_or_set_aside(
    state: &AppState,
    subscription: &Subscription,
    queue: &Queue,
    failure: &Failure<'_>,
    envelope: Envelope,
    reason: &str,
) -> Outcome {
    let retry_later = Outcome::Failed {
        retry_at_ms: now_ms() + (subscription.retry_delay_ms as i64).max(DEAD_LETTER_RETRY_MS),
    };
    let error = match dead_letter(
        state,
        subscription,
        queue,
        envelope.clone(),
        failure.attempt,
        reason,
        failure.error,
    )
    .await
    {
        Ok(()) => return Outcome::DeadLetter,
        Err(error) => error,
    };
    if !refused_for_good(&error) {
        tracing::warn!(error = %error, subscription = %subscription.id, "dead-lettering failed; retrying later");
        return retry_later;
    }
    let why = format!(
        "dead-letter queue '{}' refused the message: {}",
        subscription.dead_letter_queue, error.message
    );
    match set_aside(state, subscription, queue, failure, envelope, &why).await {
        Ok(()) => {
            tracing::warn!(subscription = %subscription.id, message_id = failure.message_id, reason = why, "message set aside");
            Outcome::SetAside
        }
        Err(error) => {
            tracing::warn!(error = %error, subscription = %subscription.id, "setting a refused message aside failed; retrying later");
            retry_later
        }
    }
}

/// Writes the message to the record quarantine with the reason. A payload of an encrypted
/// queue is kept sealed, never in plaintext.
async fn set_aside(
    state: &AppState,
    subscription: &Subscription,
    queue: &Queue,
    failure: &Failure<'_>,
    mut envelope: Envelope,
    why: &str,
) -> ApiResult<()> {
    if queue.encrypted || envelope.sealed.is_some() {
        envelope.payload = Value::Null;
    }
    // The subscriber's row (a guest's never lands among the owner's), one per subscription
    // that refused it.
    let entry = crate::store::records::QuarantinedEntry {
        tenant_id: subscription.tenant_id,
        topic_id: queue.id,
        partition: i32::from(failure.partition),
        source: "dead_letter",
        entry_id: format!("{}@{}", failure.entry_id, subscription.id),
        message_id: Some(crate::workers::recorder::escape_control(failure.message_id)),
        entry: serde_json::to_string(&envelope).unwrap_or_default(),
        error: crate::workers::recorder::escape_control(&format!(
            "{why} (subscription {})",
            subscription.id
        )),
    };
    state.store.quarantine(&entry).await.map_err(|error| {
        tracing::warn!(error = %error, "writing to the record quarantine failed");
        ApiError::unavailable("PostgreSQL")
    })
}

/// Whose accounting a subscription's deliveries go to. A guest's (another tenant's
/// subscription to a public queue) go to the guest: its tenant's rates, error rate and
/// latency, its own metric series (queue label `<owner tenant>/<queue>`, which no queue name
/// can be), its consumption records; the owner's figures, message records and lookups never
/// see them.
pub struct Books {
    pub tenant_id: uuid::Uuid,
    pub metric_queue: String,
    /// The queue whose rates count the deliveries: none for a guest.
    pub queue_id: Option<uuid::Uuid>,
    /// The guest's tenant, journaled with each settlement.
    pub guest_tenant: Option<uuid::Uuid>,
}

impl Books {
    pub fn of(subscription: &Subscription, queue: &Queue) -> Books {
        if subscription.tenant_id == queue.tenant_id {
            Books {
                tenant_id: queue.tenant_id,
                metric_queue: queue.name.clone(),
                queue_id: Some(queue.id),
                guest_tenant: None,
            }
        } else {
            Books {
                tenant_id: subscription.tenant_id,
                metric_queue: format!("{}/{}", queue.tenant_id, queue.name),
                queue_id: None,
                guest_tenant: Some(subscription.tenant_id),
            }
        }
    }
}

/// Applies settlements and counts those that took effect in the metrics and statistics.
/// Every settlement of a delivery goes through here.
pub async fn settle(
    state: &AppState,
    subscription: &Subscription,
    queue: &Queue,
    settlements: &[Settlement<'_>],
) -> ApiResult<Vec<bool>> {
    // Recorded as the consumption's `consumer_instance`: which consumer, through which
    // instance of the service.
    let consumer = format!("{}@{}", subscription.consumer_name, state.instance_id);
    let books = Books::of(subscription, queue);
    let written = state
        .unrecorded
        .marking(queue, settlements.iter().map(|s| s.partition));
    let settled = state
        .broker
        .settle(queue.id, &consumer, books.guest_tenant, settlements)
        .await;
    drop(written);
    let settled = settled?;
    if settled.announced_ready {
        // The other instances heard it; this one's waiting consumers take the next too.
        state.signals.notify(queue.id);
    }
    let applied = settled.applied;
    for (settlement, _) in settlements
        .iter()
        .zip(&applied)
        .filter(|(_, applied)| **applied)
    {
        state.metrics.count_messages(
            books.tenant_id,
            &books.metric_queue,
            settlement.outcome.as_str(),
            1,
        );
        match settlement.outcome {
            Outcome::Acked => {
                let latency_ms = settlement.published_at_ms.map(|at| settlement.now_ms - at);
                if let Some(latency) = latency_ms {
                    state
                        .metrics
                        .observe_delivery_latency(latency as f64 / 1000.0);
                }
                state.stats.acked(
                    books.tenant_id,
                    books.queue_id,
                    settlement.subscription_id,
                    settlement.processing_ms,
                    latency_ms,
                );
            }
            Outcome::Failed { retry_at_ms } => {
                // Consumers here wake for it then (the script tells the other instances).
                state.retry_timers.arm(queue.id, retry_at_ms);
                state
                    .stats
                    .failed(books.tenant_id, settlement.subscription_id);
            }
            Outcome::DeadLetter | Outcome::SetAside => {
                state
                    .stats
                    .failed(books.tenant_id, settlement.subscription_id);
            }
            Outcome::Filtered | Outcome::Expired => {}
        }
    }
    Ok(applied)
}

/// Publishes a copy of the message to the subscription's dead-letter queue (created on first
/// use, encrypted and compressed like the queue), with headers saying why. The copy keeps the
/// message id, so repeating this after a crash stores it once. A payload of an encrypted queue
/// never lands in plaintext in an unencrypted dead-letter queue: it is copied sealed instead.
#[allow(clippy::too_many_arguments)]
async fn dead_letter(
    state: &AppState,
    subscription: &Subscription,
    queue: &Queue,
    envelope: Envelope,
    deliveries: u32,
    reason: &str,
    last_error: &str,
) -> ApiResult<()> {
    // The dead-letter queue is the subscriber's (for a public queue, not the owner's), and
    // must still admit the subscription's principal as a producer.
    let tenant_id: Uuid = subscription.tenant_id;
    let dlq_name = &subscription.dead_letter_queue;
    subscriptions::authorize_dead_letter_queue(
        state,
        tenant_id,
        dlq_name,
        subscription.principal.as_deref().unwrap_or_default(),
    )
    .await?;
    queues::ensure_exists(state, tenant_id, dlq_name, Some(queue)).await?;
    let dlq_encrypted = queues::resolve(state, tenant_id, dlq_name)
        .await?
        .queue
        .encrypted;
    let plaintext = if !envelope.payload.is_null() || envelope.sealed.is_none() {
        Some(envelope.payload.clone())
    } else {
        envelope
            .sealed
            .as_ref()
            .and_then(|sealed| state.sealer.open(sealed, binding(queue, &envelope)).ok())
    };
    let payload = match plaintext {
        Some(plain) if !queue.encrypted || dlq_encrypted => plain,
        _ => serde_json::to_value(&envelope.sealed).unwrap_or(Value::Null),
    };
    let mut headers = envelope.headers;
    headers.insert("x-dead-letter-reason".into(), reason.to_owned());
    headers.insert("x-original-queue".into(), queue.name.clone());
    headers.insert("x-delivery-attempts".into(), deliveries.to_string());
    headers.insert(
        "x-last-error".into(),
        last_error.chars().take(1000).collect(),
    );
    headers.insert("x-subscription-id".into(), subscription.id.to_string());
    headers.insert(
        "x-consumer-group".into(),
        subscription.consumer_group.clone(),
    );
    let input = MessageInput {
        payload: Some(payload),
        headers: Some(headers),
        key: envelope.key,
        message_id: Some(envelope.message_id),
        correlation_id: envelope.correlation_id,
        content_type: Some(envelope.content_type),
        ..MessageInput::default()
    };
    let context = PublishContext {
        now_ms: now_ms(),
        trace_id: envelope.trace_id,
        producer_id: Some(SERVICE_PRODUCER.to_owned()),
    };
    publish::publish_as_service(state, tenant_id, dlq_name, input, &context).await?;
    Ok(())
}

/// What a sealed payload is bound to.
fn binding<'a>(queue: &Queue, envelope: &'a Envelope) -> Binding<'a> {
    Binding {
        tenant_id: queue.tenant_id,
        queue_id: queue.id,
        message_id: &envelope.message_id,
    }
}

/// Opens a sealed payload in place (a plain one is left as it is). An encrypted queue only
/// delivers what it encrypted itself: an entry without a key id was not written by the
/// service (plaintext someone put into Redis) and is refused like a failed decryption.
fn open_envelope(sealer: &Sealer, queue: &Queue, envelope: &mut Envelope) -> Result<(), SealError> {
    match &envelope.sealed {
        Some(sealed) if queue.encrypted && sealed.key_id.is_none() => Err(SealError::NotSealed),
        Some(sealed) => {
            envelope.payload = sealer.open(sealed, binding(queue, envelope))?;
            Ok(())
        }
        None if queue.encrypted => Err(SealError::NotSealed),
        None => Ok(()),
    }
}
