//! A message as a producer sends it, its validation, and the envelope stored in the stream.

use std::collections::BTreeMap;

use serde::{Deserialize, Serialize};
use serde_json::Value;

use base64::engine::general_purpose::STANDARD as BASE64;
use base64::Engine;

use super::queue::{MessageFormat, Queue};
use super::validation::Problems;
use crate::error::{ApiError, ErrorCode};

const MAX_ID_CHARS: usize = 200;
const MAX_KEY_CHARS: usize = 1024;
const MAX_HEADERS: usize = 64;
const MAX_HEADER_NAME_CHARS: usize = 256;
const MAX_HEADER_VALUE_CHARS: usize = 8192;
const MAX_CONTENT_TYPE_CHARS: usize = 255;

/// One message of a publish request (API.md "Message input").
#[derive(Debug, Clone, Default, Deserialize, utoipa::ToSchema)]
#[serde(rename_all = "camelCase")]
pub struct MessageInput {
    /// `None` for both an absent payload and `null`; both are refused.
    #[schema(required = true, value_type = Value)]
    pub payload: Option<Value>,
    pub headers: Option<BTreeMap<String, String>>,
    pub key: Option<String>,
    pub message_id: Option<String>,
    pub correlation_id: Option<String>,
    pub content_type: Option<String>,
    #[schema(minimum = 1)]
    pub ttl_ms: Option<i64>,
    /// Deliver after this many ms (delayed publish).
    #[schema(minimum = 0)]
    pub delay_ms: Option<i64>,
    /// Deliver at this RFC 3339 time (scheduled publish); in the past means now.
    #[schema(format = DateTime)]
    pub scheduled_at: Option<String>,
}

/// What is stored in the stream for each message. Field names are short-lived wire names of
/// the service itself, so they are stable: changing one strands stored messages.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct Envelope {
    pub message_id: String,
    pub tenant_id: String,
    pub headers: BTreeMap<String, String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub key: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub correlation_id: Option<String>,
    pub content_type: String,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub trace_id: Option<String>,
    /// Milliseconds since the Unix epoch.
    pub published_at: i64,
    pub expires_at: i64,
    /// When the producer asked for delivery (ms), for delayed and scheduled messages.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub scheduled_at: Option<i64>,
    /// Who published: the JWT `sub` of the producer, or the platform service's name.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub producer_id: Option<String>,
    /// The payload; `null` when it is stored sealed (compressed and/or encrypted) instead.
    pub payload: Value,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub sealed: Option<crate::crypto::SealedPayload>,
}

/// The length of `value` serialized as JSON, if it is at most `limit` bytes. Counted as it is
/// written, never built, and stopped past the limit: measuring a 16 MiB payload costs no
/// 16 MiB.
fn encoded_len_within(value: &Value, limit: usize) -> Option<usize> {
    struct Count {
        written: usize,
        limit: usize,
    }
    impl std::io::Write for Count {
        fn write(&mut self, bytes: &[u8]) -> std::io::Result<usize> {
            self.written += bytes.len();
            if self.written > self.limit {
                return Err(std::io::Error::other("over the limit"));
            }
            Ok(bytes.len())
        }

        fn flush(&mut self) -> std::io::Result<()> {
            Ok(())
        }
    }
    let mut count = Count { written: 0, limit };
    serde_json::to_writer(&mut count, value).ok()?;
    Some(count.written)
}

/// A message that passed validation, ready to be stored.
#[derive(Debug, Clone, PartialEq)]
pub struct ValidMessage {
    pub partition: u16,
    /// Whether the producer chose the id (then it is an idempotency key).
    pub idempotent: bool,
    pub envelope: Envelope,
    /// The envelope as stored (JSON text).
    pub encoded: String,
    /// For a message due in the future: when the scheduler must handle it (ms), its due time
    /// or, when that comes first, its expiry (it is then recorded as expired, never delivered).
    pub hold_until: Option<i64>,
    /// Size of the payload's JSON text, and of what is stored for it.
    pub original_bytes: usize,
    pub stored_bytes: usize,
}

/// Request-independent facts a message is validated against.
#[derive(Debug, Clone, Copy)]
pub struct MessageLimits {
    pub max_message_size: usize,
    pub default_ttl_ms: i64,
    pub max_delay_ms: i64,
}

/// Validates `input` for `queue`: field rules (400), payload size (413), schema (422).
/// `generated_id` is used when the producer sent no `messageId`.
pub fn validate(
    queue: &Queue,
    schema: Option<&jsonschema::Validator>,
    input: MessageInput,
    limits: MessageLimits,
    context: &PublishContext,
    generated_id: String,
) -> Result<ValidMessage, ApiError> {
    let mut problems = Problems::default();
    let payload = input.payload.unwrap_or(Value::Null);
    problems.check(!payload.is_null(), "payload", || {
        "is required and must not be null".into()
    });
    match queue.message_format {
        MessageFormat::Json => {}
        MessageFormat::Text | MessageFormat::Binary => {
            problems.check(payload.is_null() || payload.is_string(), "payload", || {
                format!(
                    "must be a string on a '{}' queue",
                    queue.message_format.as_str()
                )
            })
        }
        // Avro and protobuf records are bytes: they travel as base64 text.
        MessageFormat::Avro | MessageFormat::Protobuf => {
            let base64 = payload
                .as_str()
                .is_some_and(|text| !text.is_empty() && BASE64.decode(text.as_bytes()).is_ok());
            problems.check(payload.is_null() || base64, "payload", || {
                format!(
                    "must be the base64 (standard alphabet) of the encoded record on a '{}' queue",
                    queue.message_format.as_str()
                )
            })
        }
    }
    let headers = input.headers.unwrap_or_default();
    problems.check(headers.len() <= MAX_HEADERS, "headers", || {
        format!("must have at most {MAX_HEADERS} entries")
    });
    for (name, value) in &headers {
        // A field path must be readable itself: a name with control characters is escaped.
        let field = format!("headers.{}", name.escape_debug());
        problems.check(
            !name.is_empty() && name.chars().count() <= MAX_HEADER_NAME_CHARS,
            &field,
            || format!("names must be 1-{MAX_HEADER_NAME_CHARS} characters"),
        );
        problems.check(!name.chars().any(char::is_control), &field, || {
            "names must not contain control characters".into()
        });
        problems.check(
            value.chars().count() <= MAX_HEADER_VALUE_CHARS,
            &field,
            || format!("values must be at most {MAX_HEADER_VALUE_CHARS} characters"),
        );
        problems.check(!value.chars().any(is_forbidden_in_value), &field, || {
            "values must not contain control characters other than tab, line feed and carriage return".into()
        });
    }
    check_text(
        &mut problems,
        "messageId",
        input.message_id.as_deref(),
        MAX_ID_CHARS,
    );
    check_text(
        &mut problems,
        "correlationId",
        input.correlation_id.as_deref(),
        MAX_ID_CHARS,
    );
    check_text(&mut problems, "key", input.key.as_deref(), MAX_KEY_CHARS);
    check_text(
        &mut problems,
        "contentType",
        input.content_type.as_deref(),
        MAX_CONTENT_TYPE_CHARS,
    );
    let ttl_ms = match input.ttl_ms {
        Some(ttl) if ttl < 1 => {
            problems.add("ttlMs", format!("must be at least 1 (got {ttl})"));
            limits.default_ttl_ms
        }
        Some(ttl) => ttl,
        None => limits.default_ttl_ms,
    };
    let scheduled_at = due_time(
        &mut problems,
        input.delay_ms,
        input.scheduled_at.as_deref(),
        limits,
        context.now_ms,
    );
    problems.into_result(())?;

    let Some(encoded_payload_len) = encoded_len_within(&payload, limits.max_message_size) else {
        return Err(ApiError::new(
            ErrorCode::MessageTooLarge,
            format!(
                "payload is over {} bytes serialized (MAX_MESSAGE_SIZE)",
                limits.max_message_size
            ),
        )
        .with_detail("fields", serde_json::json!(["payload"])));
    };
    if let Some(schema) = schema {
        let reasons: Vec<String> = schema
            .iter_errors(&payload)
            .map(|error| {
                let path = error.instance_path().to_string();
                if path.is_empty() {
                    error.to_string()
                } else {
                    format!("{path}: {error}")
                }
            })
            .collect();
        if !reasons.is_empty() {
            return Err(ApiError::new(
                ErrorCode::SchemaViolation,
                format!("payload does not match the queue's schema: {}", reasons[0]),
            )
            .with_detail("errors", serde_json::json!(reasons)));
        }
    }

    let idempotent = input.message_id.is_some();
    let message_id = input.message_id.unwrap_or(generated_id);
    let partition = choose_partition(
        input.key.as_deref().unwrap_or(&message_id),
        queue.partition_count,
    );
    let envelope = Envelope {
        message_id,
        tenant_id: queue.tenant_id.to_string(),
        headers,
        key: input.key,
        correlation_id: input.correlation_id,
        content_type: input
            .content_type
            .unwrap_or_else(|| queue.message_format.default_content_type().to_owned()),
        trace_id: context.trace_id.clone(),
        producer_id: context.producer_id.clone(),
        published_at: context.now_ms,
        expires_at: context.now_ms.saturating_add(ttl_ms),
        scheduled_at,
        payload,
        sealed: None,
    };
    let encoded = encode(&envelope)?;
    let hold_until = scheduled_at
        .filter(|due| *due > context.now_ms)
        .map(|due| due.min(envelope.expires_at));
    Ok(ValidMessage {
        partition,
        idempotent,
        envelope,
        encoded,
        hold_until,
        original_bytes: encoded_payload_len,
        stored_bytes: encoded_payload_len,
    })
}

/// Whether the payloads of `inputs` take more than `bytes` (a cheap estimate of their JSON
/// size that stops as soon as it knows).
pub fn payloads_exceed(inputs: &[MessageInput], bytes: usize) -> bool {
    let mut budget = bytes;
    inputs
        .iter()
        .filter_map(|input| input.payload.as_ref())
        .any(|payload| !fits(payload, &mut budget))
}

/// Spends an estimate of `value`'s JSON size from `budget`; false once it runs out.
fn fits(value: &Value, budget: &mut usize) -> bool {
    let own = match value {
        Value::String(text) => text.len() + 2,
        Value::Array(items) => items.len() + 2,
        Value::Object(map) => map.keys().map(|k| k.len() + 4).sum::<usize>() + 2,
        _ => 8,
    };
    let Some(left) = budget.checked_sub(own) else {
        return false;
    };
    *budget = left;
    match value {
        Value::Array(items) => items.iter().all(|item| fits(item, budget)),
        Value::Object(map) => map.values().all(|item| fits(item, budget)),
        _ => true,
    }
}

/// The envelope as stored (JSON text).
pub fn encode(envelope: &Envelope) -> Result<String, ApiError> {
    serde_json::to_string(envelope)
        .map_err(|error| ApiError::internal(format!("encode envelope: {error}")))
}

/// The requested delivery time (ms) of a delayed or scheduled message, checking its bounds.
fn due_time(
    problems: &mut Problems,
    delay_ms: Option<i64>,
    scheduled_at: Option<&str>,
    limits: MessageLimits,
    now_ms: i64,
) -> Option<i64> {
    match (delay_ms, scheduled_at) {
        (None, None) => None,
        (Some(_), Some(_)) => {
            problems.add("scheduledAt", "cannot be combined with delayMs");
            None
        }
        (Some(delay), None) => {
            if (1..=limits.max_delay_ms).contains(&delay) {
                Some(now_ms.saturating_add(delay))
            } else {
                problems.add(
                    "delayMs",
                    format!(
                        "must be between 1 and {} (MAX_DELAY_MS)",
                        limits.max_delay_ms
                    ),
                );
                None
            }
        }
        (None, Some(text)) => match chrono::DateTime::parse_from_rfc3339(text) {
            Ok(time) if time.timestamp_millis() > now_ms.saturating_add(limits.max_delay_ms) => {
                problems.add(
                    "scheduledAt",
                    format!(
                        "is more than {} ms (MAX_DELAY_MS) ahead",
                        limits.max_delay_ms
                    ),
                );
                None
            }
            Ok(time) => Some(time.timestamp_millis()),
            Err(_) => {
                problems.add(
                    "scheduledAt",
                    format!("must be an RFC 3339 time (got '{text}')"),
                );
                None
            }
        },
    }
}

/// Identifiers (`messageId`, `key`, `correlationId`, `contentType`): 1–`max` characters,
/// none of them a control character (they end up in logs, URLs and storage keys).
fn check_text(problems: &mut Problems, field: &str, value: Option<&str>, max: usize) {
    if let Some(text) = value {
        problems.check(
            !text.is_empty() && text.chars().count() <= max,
            field,
            || format!("must be 1-{max} characters"),
        );
        problems.check(!text.chars().any(char::is_control), field, || {
            "must not contain control characters".into()
        });
    }
}

/// Header values follow the character rule of SQS message attributes: any character but
/// the control characters, except tab, line feed and carriage return.
fn is_forbidden_in_value(c: char) -> bool {
    c.is_control() && !matches!(c, '\t' | '\n' | '\r')
}

/// Facts of the publish request shared by all of its messages.
#[derive(Debug, Clone)]
pub struct PublishContext {
    pub now_ms: i64,
    pub trace_id: Option<String>,
    /// Who publishes (recorded as `producer_id`): a JWT `sub` or a service's name.
    pub producer_id: Option<String>,
}

/// The producer name of what the service publishes on its own behalf (dead letters, audit).
pub const SERVICE_PRODUCER: &str = "message-queue-service";

/// The trace id of a W3C `traceparent` header (`00-<32 hex>-<16 hex>-<2 hex>`), if valid.
pub fn trace_id_from_traceparent(header: &str) -> Option<String> {
    let mut parts = header.trim().split('-');
    let version = parts.next()?;
    let trace_id = parts.next()?;
    let parent_id = parts.next()?;
    let flags = parts.next()?;
    let is_hex = |s: &str, len: usize| s.len() == len && s.bytes().all(|b| b.is_ascii_hexdigit());
    let valid = is_hex(version, 2)
        && version != "ff"
        && is_hex(trace_id, 32)
        && trace_id.bytes().any(|b| b != b'0')
        && is_hex(parent_id, 16)
        && is_hex(flags, 2);
    valid.then(|| trace_id.to_ascii_lowercase())
}

/// The partition of a message: a stable hash (64-bit FNV-1a) of its key, or of its id when
/// it has none, so the same key always lands in the same partition (and so in order) and
/// keyless messages spread evenly. The function must never change: stored messages and
/// producers' ordering expectations depend on it.
pub fn choose_partition(routing_key: &str, partition_count: u16) -> u16 {
    const OFFSET_BASIS: u64 = 0xcbf2_9ce4_8422_2325;
    const PRIME: u64 = 0x0000_0100_0000_01b3;
    let hash = routing_key.bytes().fold(OFFSET_BASIS, |hash, byte| {
        (hash ^ u64::from(byte)).wrapping_mul(PRIME)
    });
    (hash % u64::from(partition_count.max(1))) as u16
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn payload_length_is_counted_without_building_it() {
        // `"abc"` is five bytes serialized.
        assert_eq!(encoded_len_within(&serde_json::json!("abc"), 5), Some(5));
        assert_eq!(encoded_len_within(&serde_json::json!("abcd"), 5), None);
        let large = serde_json::json!({"k": "x".repeat(1000)});
        assert_eq!(encoded_len_within(&large, 100), None);
    }

    const LIMITS: MessageLimits = MessageLimits {
        max_message_size: 1000,
        default_ttl_ms: 60_000,
        max_delay_ms: 10_000,
    };

    fn due(input: MessageInput) -> (Option<i64>, Vec<String>) {
        let mut problems = Problems::default();
        let due = due_time(
            &mut problems,
            input.delay_ms,
            input.scheduled_at.as_deref(),
            LIMITS,
            1_000_000,
        );
        let fields = match problems.into_result(()) {
            Ok(()) => vec![],
            Err(error) => serde_json::from_value(error.details["fields"].clone()).unwrap(),
        };
        (due, fields)
    }

    #[test]
    fn delay_and_schedule_bounds() {
        let delayed = |ms| MessageInput {
            delay_ms: Some(ms),
            ..Default::default()
        };
        let scheduled = |at: &str| MessageInput {
            scheduled_at: Some(at.into()),
            ..Default::default()
        };
        assert_eq!(due(delayed(500)), (Some(1_000_500), vec![]));
        assert_eq!(due(delayed(0)).1, ["delayMs"]);
        assert_eq!(due(delayed(10_001)).1, ["delayMs"]);
        // 1970-01-01T00:16:40Z is 1 000 000 ms: now.
        assert_eq!(
            due(scheduled("1970-01-01T00:16:45Z")),
            (Some(1_005_000), vec![])
        );
        assert_eq!(
            due(scheduled("1970-01-01T00:00:00Z")),
            (Some(0), vec![]),
            "past: now"
        );
        assert_eq!(
            due(scheduled("1970-01-01T00:17:00Z")).1,
            ["scheduledAt"],
            "beyond MAX_DELAY_MS"
        );
        assert_eq!(due(scheduled("tomorrow")).1, ["scheduledAt"]);
        let both = MessageInput {
            delay_ms: Some(5),
            scheduled_at: Some("1970-01-01T00:16:45Z".into()),
            ..Default::default()
        };
        assert_eq!(due(both).1, ["scheduledAt"]);
    }

    #[test]
    fn control_characters_are_refused_outside_the_payload() {
        let queue = Queue::create(
            uuid::Uuid::nil(),
            serde_json::from_value(serde_json::json!({"name": "q"})).unwrap(),
            crate::domain::queue::QueueDefaults {
                max_length: 10,
                encryption_available: false,
            },
            chrono::Utc::now(),
        )
        .unwrap();
        let context = PublishContext {
            now_ms: 1,
            trace_id: None,
            producer_id: None,
        };
        let fields = |input: MessageInput| -> Vec<String> {
            match validate(&queue, None, input, LIMITS, &context, "g".into()) {
                Ok(_) => vec![],
                Err(error) => serde_json::from_value(error.details["fields"].clone()).unwrap(),
            }
        };
        let with = |build: fn(&mut MessageInput)| {
            let mut input = MessageInput {
                payload: Some(serde_json::json!({"text": "a\u{0}b"})),
                ..Default::default()
            };
            build(&mut input);
            input
        };
        assert_eq!(
            fields(with(|_| {})),
            Vec::<String>::new(),
            "NUL in a payload is kept"
        );
        assert_eq!(fields(with(|i| i.key = Some("k\u{0}".into()))), ["key"]);
        assert_eq!(
            fields(with(|i| i.message_id = Some("\u{1b}x".into()))),
            ["messageId"]
        );
        assert_eq!(
            fields(with(|i| i.correlation_id = Some("c\n".into()))),
            ["correlationId"]
        );
        assert_eq!(
            fields(with(
                |i| i.headers = Some([("a\u{0}".into(), "v".into())].into())
            )),
            ["headers.a\\0"]
        );
        assert_eq!(
            fields(with(
                |i| i.headers = Some([("a".into(), "v\u{7f}".into())].into())
            )),
            ["headers.a"]
        );
        assert_eq!(
            fields(with(
                |i| i.headers = Some([("a".into(), "line\r\n\tnext".into())].into())
            )),
            Vec::<String>::new()
        );
    }

    #[test]
    fn partition_is_stable_and_spreads() {
        assert_eq!(
            choose_partition("customer-42", 8),
            choose_partition("customer-42", 8)
        );
        // Pinned values: a change here would re-route every keyed producer.
        assert_eq!(
            choose_partition("", 7),
            (0xcbf2_9ce4_8422_2325u64 % 7) as u16
        );
        assert_eq!(choose_partition("a", 1), 0);
        let mut seen = [0u32; 8];
        for i in 0..8000 {
            seen[usize::from(choose_partition(&format!("key-{i}"), 8))] += 1;
        }
        assert!(seen.iter().all(|&n| (800..1200).contains(&n)), "{seen:?}");
    }

    #[test]
    fn traceparent() {
        let header = "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01";
        assert_eq!(
            trace_id_from_traceparent(header).as_deref(),
            Some("4bf92f3577b34da6a3ce929d0e0e4736")
        );
        assert_eq!(
            trace_id_from_traceparent("00-0000-00f067aa0ba902b7-01"),
            None
        );
        assert_eq!(
            trace_id_from_traceparent("00-00000000000000000000000000000000-00f067aa0ba902b7-01"),
            None
        );
        assert_eq!(trace_id_from_traceparent("garbage"), None);
    }
}
