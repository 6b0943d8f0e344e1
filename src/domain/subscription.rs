//! The subscription resource: one consumer (`consumerName`) in a consumer group of a queue.

use std::collections::BTreeMap;

use chrono::{DateTime, Utc};
use serde::{Deserialize, Serialize};
use serde_json::Value;
use utoipa::ToSchema;
use uuid::Uuid;

use axum::http::{HeaderName, HeaderValue};

use super::filter::Filter;
use super::retry::MAX_RETRY_DELAY_MS;
use super::validation::{holds_nul, is_valid_name, nullable, string_enum, Problems};
use crate::error::ApiError;

const MAX_POLL_RECORDS: i64 = 1000;
const MIN_SESSION_TIMEOUT_MS: i64 = 1000;
const MAX_SESSION_TIMEOUT_MS: i64 = 12 * 3600 * 1000;
const MAX_RETRY_ATTEMPTS: i64 = 100;
const MAX_HANDLER_TIMEOUT_MS: i64 = 10 * 60 * 1000;
const MAX_CONCURRENCY: i64 = 1000;
const MAX_HANDLER_HEADERS: usize = 32;
const MAX_HANDLER_HEADER_VALUE_CHARS: usize = 4096;
const MAX_HANDLER_HEADERS_BYTES: usize = 16 * 1024;
/// Headers a push sets itself: a subscription cannot replace or forge them.
const RESERVED_HANDLER_HEADERS: &[&str] = &[
    "host",
    "content-length",
    "content-type",
    "transfer-encoding",
    "connection",
    "te",
    "upgrade",
    "traceparent",
];

string_enum!(SubscriptionType { Webhook => "webhook", RedisConsumer => "redis_consumer" });
string_enum!(OffsetReset { Latest => "latest", Earliest => "earliest" });
string_enum!(SubscriptionStatus { Active => "active", Paused => "paused" });

/// How the service pushes to a webhook. The secret is write-only: never serialized.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize, ToSchema)]
#[serde(rename_all = "camelCase")]
pub struct HandlerConfig {
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub url: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub timeout_ms: Option<u64>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub concurrency: Option<u32>,
    #[serde(default)]
    pub headers: BTreeMap<String, String>,
    #[serde(default, skip_serializing)]
    pub secret: Option<String>,
}

impl HandlerConfig {
    /// The stored form keeps the secret (the store is the service's own).
    pub fn to_stored(&self) -> Value {
        let mut value = serde_json::to_value(self).unwrap_or(Value::Null);
        if let (Some(secret), Value::Object(map)) = (&self.secret, &mut value) {
            map.insert("secret".into(), Value::String(secret.clone()));
        }
        value
    }
}

#[derive(Debug, Clone, Serialize, ToSchema)]
#[serde(rename_all = "camelCase")]
pub struct Subscription {
    pub id: Uuid,
    pub queue: String,
    #[serde(skip)]
    pub queue_id: Uuid,
    /// The tenant owning the queue: another tenant's only for a public queue (API-NOTES).
    pub queue_tenant_id: Uuid,
    pub consumer_group: String,
    /// The Redis consumer group this subscription reads through (see `delivery_group`).
    #[serde(skip)]
    pub delivery_group: String,
    /// The principal (JWT `sub`) that created the subscription: pushes to its webhook obey
    /// the queue's `allowedConsumers` for it, as its pulls do. `None` for subscriptions
    /// created before principals were kept, which no non-empty list admits.
    #[serde(skip)]
    pub principal: Option<String>,
    pub consumer_name: String,
    pub subscription_type: SubscriptionType,
    pub offset_reset_policy: OffsetReset,
    pub max_poll_records: u32,
    pub session_timeout_ms: u64,
    pub heartbeat_interval_ms: u64,
    pub handler_config: HandlerConfig,
    pub dead_letter_queue: String,
    pub max_retry_attempts: u32,
    pub retry_delay_ms: u64,
    pub message_filter: Option<Value>,
    pub status: SubscriptionStatus,
    pub tenant_id: Uuid,
    pub created_at: DateTime<Utc>,
    pub updated_at: DateTime<Utc>,
    pub last_consumed_at: Option<DateTime<Utc>>,
}

/// The queue a subscription is created on.
#[derive(Debug, Clone, Copy)]
pub struct QueueRef<'a> {
    pub id: Uuid,
    pub tenant_id: Uuid,
    pub name: &'a str,
}

/// Configuration defaults for new subscriptions.
#[derive(Debug, Clone, Copy)]
pub struct SubscriptionDefaults {
    pub session_timeout_ms: u64,
}

#[derive(Debug, Default, Deserialize, ToSchema)]
#[serde(rename_all = "camelCase")]
pub struct CreateSubscriptionRequest {
    #[schema(
        required = true,
        pattern = r"^[A-Za-z0-9][A-Za-z0-9._-]{0,199}$",
        example = "orders"
    )]
    pub queue: Option<String>,
    /// The tenant owning `queue`, to subscribe to another tenant's public queue.
    pub queue_tenant_id: Option<Uuid>,
    #[schema(
        required = true,
        pattern = r"^[A-Za-z0-9][A-Za-z0-9._-]{0,199}$",
        example = "billing"
    )]
    pub consumer_group: Option<String>,
    #[schema(
        required = true,
        pattern = r"^[A-Za-z0-9][A-Za-z0-9._-]{0,199}$",
        example = "worker-1"
    )]
    pub consumer_name: Option<String>,
    #[schema(required = true, value_type = SubscriptionType)]
    pub subscription_type: Option<String>,
    #[schema(value_type = Option<OffsetReset>)]
    pub offset_reset_policy: Option<String>,
    #[schema(minimum = 1, maximum = 1000)]
    pub max_poll_records: Option<i64>,
    pub session_timeout_ms: Option<i64>,
    pub heartbeat_interval_ms: Option<i64>,
    pub handler_config: Option<HandlerConfigInput>,
    pub dead_letter_queue: Option<String>,
    pub max_retry_attempts: Option<i64>,
    pub retry_delay_ms: Option<i64>,
    pub message_filter: Option<Value>,
}

#[derive(Debug, Default, Deserialize, ToSchema)]
#[serde(rename_all = "camelCase")]
pub struct UpdateSubscriptionRequest {
    pub max_poll_records: Option<i64>,
    pub session_timeout_ms: Option<i64>,
    pub heartbeat_interval_ms: Option<i64>,
    pub handler_config: Option<HandlerConfigInput>,
    #[serde(default, deserialize_with = "nullable")]
    pub dead_letter_queue: Option<Option<String>>,
    pub max_retry_attempts: Option<i64>,
    pub retry_delay_ms: Option<i64>,
    #[serde(default, deserialize_with = "nullable")]
    pub message_filter: Option<Option<Value>>,
    // Immutable after create: accepted only when equal to the stored value.
    pub queue: Option<String>,
    pub consumer_group: Option<String>,
    pub consumer_name: Option<String>,
    pub subscription_type: Option<String>,
    pub offset_reset_policy: Option<String>,
}

#[derive(Debug, Default, Deserialize, ToSchema)]
#[serde(rename_all = "camelCase")]
pub struct HandlerConfigInput {
    pub url: Option<String>,
    pub timeout_ms: Option<i64>,
    pub concurrency: Option<i64>,
    pub headers: Option<BTreeMap<String, String>>,
    pub secret: Option<String>,
}

/// The Redis consumer group of a subscription of `subscriber`'s to a queue of `owner`'s: the
/// group's own name for the queue's tenant, `<subscriber id>:<group>` for another tenant
/// (a public queue's guest). A group name cannot contain `:`, so a guest's group never
/// meets the owner's or another guest's: nothing a guest does moves, acks, retries or
/// dead-letters anyone else's deliveries.
pub fn delivery_group(subscriber: Uuid, owner: Uuid, group: &str) -> String {
    if subscriber == owner {
        group.to_owned()
    } else {
        format!("{subscriber}:{group}")
    }
}

/// Whether a Redis consumer group belongs to a guest of the queue (see `delivery_group`).
pub fn is_guest_group(delivery_group: &str) -> bool {
    delivery_group.contains(':')
}

/// The dead-letter queue of `queue` when the subscription names none.
pub fn default_dead_letter_queue(queue: &str) -> String {
    format!("{queue}.dlq")
}

impl Subscription {
    /// Validates a create request of `principal` of `tenant_id` for `queue`.
    pub fn create(
        tenant_id: Uuid,
        principal: &str,
        queue: QueueRef<'_>,
        request: CreateSubscriptionRequest,
        defaults: SubscriptionDefaults,
        now: DateTime<Utc>,
    ) -> Result<Subscription, ApiError> {
        let mut problems = Problems::default();
        let group = request.consumer_group.unwrap_or_default();
        problems.check(is_valid_name(&group), "consumerGroup", || {
            "is required: 1-200 characters of [A-Za-z0-9._-] starting with a letter or digit".into()
        });
        let consumer = request.consumer_name.unwrap_or_default();
        problems.check(is_valid_name(&consumer), "consumerName", || {
            "is required: 1-200 characters of [A-Za-z0-9._-] starting with a letter or digit".into()
        });
        let subscription_type = match request.subscription_type.as_deref() {
            Some("kafka_consumer") => {
                problems.add(
                    "subscriptionType",
                    "'kafka_consumer' is not supported in this edition",
                );
                None
            }
            Some(text) => problems.choice(
                "subscriptionType",
                text,
                SubscriptionType::parse,
                SubscriptionType::ALL,
            ),
            None => {
                problems.add(
                    "subscriptionType",
                    "is required (webhook or redis_consumer)",
                );
                None
            }
        };
        let offset_reset_policy = match request.offset_reset_policy.as_deref() {
            None => OffsetReset::Latest,
            Some(text) => problems
                .choice(
                    "offsetResetPolicy",
                    text,
                    OffsetReset::parse,
                    OffsetReset::ALL,
                )
                .unwrap_or(OffsetReset::Latest),
        };
        let queue_name = queue.name;
        let mut subscription = Subscription {
            id: Uuid::now_v7(),
            queue: queue_name.to_owned(),
            queue_id: queue.id,
            queue_tenant_id: queue.tenant_id,
            delivery_group: delivery_group(tenant_id, queue.tenant_id, &group),
            principal: Some(principal.to_owned()),
            consumer_group: group,
            consumer_name: consumer,
            subscription_type: subscription_type.unwrap_or(SubscriptionType::RedisConsumer),
            offset_reset_policy,
            max_poll_records: 500,
            session_timeout_ms: defaults.session_timeout_ms,
            heartbeat_interval_ms: 3000,
            handler_config: HandlerConfig::default(),
            dead_letter_queue: default_dead_letter_queue(queue_name),
            max_retry_attempts: 3,
            retry_delay_ms: 1000,
            message_filter: None,
            status: SubscriptionStatus::Active,
            tenant_id,
            created_at: now,
            updated_at: now,
            last_consumed_at: None,
        };
        subscription.apply(
            &mut problems,
            Changes {
                max_poll_records: request.max_poll_records,
                session_timeout_ms: request.session_timeout_ms,
                heartbeat_interval_ms: request.heartbeat_interval_ms,
                handler_config: request.handler_config,
                dead_letter_queue: request.dead_letter_queue.map(Some),
                max_retry_attempts: request.max_retry_attempts,
                retry_delay_ms: request.retry_delay_ms,
                message_filter: request.message_filter.map(Some),
            },
        );
        if subscription_type == Some(SubscriptionType::Webhook) {
            problems.check(
                subscription.handler_config.url.is_some(),
                "handlerConfig.url",
                || "is required for a webhook subscription".into(),
            );
        }
        problems.into_result(subscription)
    }

    /// Applies a partial update, refusing changes to immutable fields.
    pub fn updated(
        &self,
        request: UpdateSubscriptionRequest,
        now: DateTime<Utc>,
    ) -> Result<Subscription, ApiError> {
        let mut problems = Problems::default();
        let immutable = [
            ("queue", request.queue.is_some_and(|v| v != self.queue)),
            (
                "consumerGroup",
                request
                    .consumer_group
                    .is_some_and(|v| v != self.consumer_group),
            ),
            (
                "consumerName",
                request
                    .consumer_name
                    .is_some_and(|v| v != self.consumer_name),
            ),
            (
                "subscriptionType",
                request
                    .subscription_type
                    .is_some_and(|v| v != self.subscription_type.as_str()),
            ),
            (
                "offsetResetPolicy",
                request
                    .offset_reset_policy
                    .is_some_and(|v| v != self.offset_reset_policy.as_str()),
            ),
        ];
        for (field, changed) in immutable {
            problems.check(!changed, field, || "cannot be changed after create".into());
        }
        let mut next = self.clone();
        next.apply(
            &mut problems,
            Changes {
                max_poll_records: request.max_poll_records,
                session_timeout_ms: request.session_timeout_ms,
                heartbeat_interval_ms: request.heartbeat_interval_ms,
                handler_config: request.handler_config,
                dead_letter_queue: request.dead_letter_queue,
                max_retry_attempts: request.max_retry_attempts,
                retry_delay_ms: request.retry_delay_ms,
                message_filter: request.message_filter,
            },
        );
        if next.subscription_type == SubscriptionType::Webhook {
            problems.check(
                next.handler_config.url.is_some(),
                "handlerConfig.url",
                || "is required for a webhook subscription".into(),
            );
        }
        next.updated_at = now;
        problems.into_result(next)
    }

    /// The parsed message filter (it was validated when set).
    pub fn filter(&self) -> Option<Filter> {
        self.message_filter
            .as_ref()
            .and_then(|f| Filter::parse(f).ok())
    }

    fn apply(&mut self, problems: &mut Problems, changes: Changes) {
        if let Some(value) = changes.max_poll_records {
            self.max_poll_records =
                problems.in_range("maxPollRecords", value, 1, MAX_POLL_RECORDS) as u32;
        }
        if let Some(value) = changes.session_timeout_ms {
            self.session_timeout_ms = problems.in_range(
                "sessionTimeoutMs",
                value,
                MIN_SESSION_TIMEOUT_MS,
                MAX_SESSION_TIMEOUT_MS,
            ) as u64;
        }
        if let Some(value) = changes.heartbeat_interval_ms {
            self.heartbeat_interval_ms =
                problems.in_range("heartbeatIntervalMs", value, 100, MAX_SESSION_TIMEOUT_MS) as u64;
        }
        if let Some(value) = changes.max_retry_attempts {
            self.max_retry_attempts =
                problems.in_range("maxRetryAttempts", value, 0, MAX_RETRY_ATTEMPTS) as u32;
        }
        if let Some(value) = changes.retry_delay_ms {
            self.retry_delay_ms =
                problems.in_range("retryDelayMs", value, 1, MAX_RETRY_DELAY_MS as i64) as u64;
        }
        if let Some(value) = changes.dead_letter_queue {
            let name = value.unwrap_or_else(|| default_dead_letter_queue(&self.queue));
            problems.check(is_valid_name(&name), "deadLetterQueue", || {
                "must be a valid queue name (1-200 characters of [A-Za-z0-9._-])".into()
            });
            problems.check(name != self.queue, "deadLetterQueue", || {
                "cannot be the subscribed queue itself".into()
            });
            self.dead_letter_queue = name;
        }
        if let Some(value) = changes.message_filter {
            let filter = value.filter(|v| !v.is_null());
            if let Some(filter) = &filter {
                if holds_nul(filter) {
                    problems.add("messageFilter", "must not hold the NUL character");
                } else if let Err(problem) = Filter::parse(filter) {
                    problems.add("messageFilter", problem);
                }
            }
            self.message_filter = filter;
        }
        if let Some(input) = changes.handler_config {
            self.handler_config = handler_config(problems, input, &self.handler_config);
        }
    }
}

struct Changes {
    max_poll_records: Option<i64>,
    session_timeout_ms: Option<i64>,
    heartbeat_interval_ms: Option<i64>,
    handler_config: Option<HandlerConfigInput>,
    dead_letter_queue: Option<Option<String>>,
    max_retry_attempts: Option<i64>,
    retry_delay_ms: Option<i64>,
    message_filter: Option<Option<Value>>,
}

/// A handler config replaces the previous one, except that an absent `secret` keeps the
/// stored secret (it is never shown, so a client cannot send it back).
fn handler_config(
    problems: &mut Problems,
    input: HandlerConfigInput,
    previous: &HandlerConfig,
) -> HandlerConfig {
    if let Some(url) = &input.url {
        let scheme_ok = url
            .split_once("://")
            .is_some_and(|(scheme, rest)| matches!(scheme, "http" | "https") && !rest.is_empty());
        let parses = reqwest::Url::parse(url).is_ok() && !url.chars().any(char::is_control);
        problems.check(
            scheme_ok && parses && url.len() <= 2048,
            "handlerConfig.url",
            || "must be an http:// or https:// URL of at most 2048 characters".into(),
        );
    }
    let timeout_ms = input.timeout_ms.map(|value| {
        problems.in_range(
            "handlerConfig.timeoutMs",
            value,
            100,
            MAX_HANDLER_TIMEOUT_MS,
        ) as u64
    });
    let concurrency = input.concurrency.map(|value| {
        problems.in_range("handlerConfig.concurrency", value, 1, MAX_CONCURRENCY) as u32
    });
    let headers = input.headers.unwrap_or_default();
    problems.check(
        headers.len() <= MAX_HANDLER_HEADERS,
        "handlerConfig.headers",
        || format!("must have at most {MAX_HANDLER_HEADERS} entries"),
    );
    let total: usize = headers.iter().map(|(n, v)| n.len() + v.len()).sum();
    problems.check(
        total <= MAX_HANDLER_HEADERS_BYTES,
        "handlerConfig.headers",
        || format!("must hold at most {MAX_HANDLER_HEADERS_BYTES} bytes of names and values"),
    );
    for (name, value) in &headers {
        let field = format!("handlerConfig.headers.{}", name.escape_debug());
        let lower = name.to_ascii_lowercase();
        let valid_name = name.len() <= 256 && HeaderName::from_bytes(name.as_bytes()).is_ok();
        problems.check(valid_name, &field, || {
            "must be an HTTP header name (1-256 token characters)".into()
        });
        problems.check(
            !RESERVED_HANDLER_HEADERS.contains(&lower.as_str()) && !lower.starts_with("x-mq-"),
            &field,
            || "is set by the service itself".into(),
        );
        problems.check(
            value.chars().count() <= MAX_HANDLER_HEADER_VALUE_CHARS
                && HeaderValue::from_str(value).is_ok(),
            &field,
            || {
                format!(
                    "must be at most {MAX_HANDLER_HEADER_VALUE_CHARS} visible ASCII characters, spaces or tabs"
                )
            },
        );
    }
    if let Some(secret) = &input.secret {
        problems.check(
            (1..=512).contains(&secret.len()) && !secret.chars().any(char::is_control),
            "handlerConfig.secret",
            || "must be 1-512 characters, none of them control characters".into(),
        );
    }
    HandlerConfig {
        url: input.url,
        timeout_ms,
        concurrency,
        headers,
        secret: input.secret.or_else(|| previous.secret.clone()),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    const DEFAULTS: SubscriptionDefaults = SubscriptionDefaults {
        session_timeout_ms: 30_000,
    };

    fn create(body: Value) -> Result<Subscription, ApiError> {
        Subscription::create(
            Uuid::nil(),
            "tester",
            QueueRef {
                id: Uuid::nil(),
                tenant_id: Uuid::nil(),
                name: "orders",
            },
            serde_json::from_value(body).unwrap(),
            DEFAULTS,
            Utc::now(),
        )
    }

    fn fields(result: Result<Subscription, ApiError>) -> Value {
        result.unwrap_err().details["fields"].clone()
    }

    #[test]
    fn guests_read_through_groups_of_their_own() {
        let (owner, guest) = (Uuid::from_u128(1), Uuid::from_u128(2));
        assert_eq!(delivery_group(owner, owner, "billing"), "billing");
        let guests = delivery_group(guest, owner, "billing");
        assert_ne!(guests, "billing");
        assert!(is_guest_group(&guests));
        assert!(!is_guest_group("billing"));
        assert_ne!(guests, delivery_group(Uuid::from_u128(3), owner, "billing"));
    }

    #[test]
    fn defaults() {
        let s = create(json!({"consumerGroup": "billing", "consumerName": "b1", "subscriptionType": "redis_consumer"})).unwrap();
        assert_eq!(s.dead_letter_queue, "orders.dlq");
        assert_eq!(
            (
                s.max_poll_records,
                s.session_timeout_ms,
                s.max_retry_attempts,
                s.retry_delay_ms
            ),
            (500, 30_000, 3, 1000)
        );
        assert_eq!(s.offset_reset_policy, OffsetReset::Latest);
    }

    #[test]
    fn validation() {
        assert_eq!(
            fields(create(json!({}))),
            json!(["consumerGroup", "consumerName", "subscriptionType"])
        );
        assert_eq!(
            fields(create(
                json!({"consumerGroup": "g", "consumerName": "c", "subscriptionType": "kafka_consumer"})
            )),
            json!(["subscriptionType"])
        );
        assert_eq!(
            fields(create(
                json!({"consumerGroup": "g", "consumerName": "c", "subscriptionType": "webhook"})
            )),
            json!(["handlerConfig.url"])
        );
        assert_eq!(
            fields(create(
                json!({"consumerGroup": "g", "consumerName": "c", "subscriptionType": "webhook",
                "handlerConfig": {"url": "ftp://x"}, "messageFilter": {"nope": 1}, "maxRetryAttempts": -1})
            )),
            json!(["maxRetryAttempts", "messageFilter", "handlerConfig.url"])
        );
    }

    #[test]
    fn handler_headers_are_valid_and_never_the_services_own() {
        let with_headers = |headers: Value| {
            create(
                json!({"consumerGroup": "g", "consumerName": "c", "subscriptionType": "webhook",
                          "handlerConfig": {"url": "http://x/hook", "headers": headers}}),
            )
        };
        assert!(with_headers(json!({"Authorization": "Bearer x", "x-team": "a b\tc"})).is_ok());
        for bad in [
            json!({"bad name": "v"}),
            json!({"x-ok": "line\nbreak"}),
            json!({"Content-Type": "text/plain"}),
            json!({"X-MQ-Signature": "forged"}),
            json!({"x-big": "v".repeat(4097)}),
        ] {
            let fields = fields(with_headers(bad.clone()));
            assert!(
                fields[0]
                    .as_str()
                    .unwrap()
                    .starts_with("handlerConfig.headers."),
                "{bad}: {fields}"
            );
        }
    }

    #[test]
    fn the_secret_is_never_serialized_and_survives_updates() {
        let s = create(
            json!({"consumerGroup": "g", "consumerName": "c", "subscriptionType": "webhook",
            "handlerConfig": {"url": "http://x/hook", "secret": "s3cr3t"}}),
        )
        .unwrap();
        assert!(!serde_json::to_string(&s).unwrap().contains("s3cr3t"));
        assert_eq!(s.handler_config.to_stored()["secret"], "s3cr3t");
        let update: UpdateSubscriptionRequest =
            serde_json::from_value(json!({"handlerConfig": {"url": "http://y/hook"}})).unwrap();
        let updated = s.updated(update, Utc::now()).unwrap();
        assert_eq!(updated.handler_config.secret.as_deref(), Some("s3cr3t"));
        let update: UpdateSubscriptionRequest =
            serde_json::from_value(json!({"consumerGroup": "other"})).unwrap();
        assert_eq!(
            fields(s.updated(update, Utc::now())),
            json!(["consumerGroup"])
        );
    }
}
