//! The queue resource and its rules: what a create may contain, what an update may change.

use chrono::{DateTime, Utc};
use serde::{Deserialize, Serialize};
use serde_json::Value;
use utoipa::{IntoParams, ToSchema};
use uuid::Uuid;

use super::validation::{holds_nul, is_free_text, is_valid_name, nullable, string_enum, Problems};
use crate::error::ApiError;

pub const MAX_PARTITIONS: i64 = 64;
const MAX_DISPLAY_NAME_CHARS: usize = 200;
const MAX_DESCRIPTION_CHARS: usize = 2000;
const MIN_RETENTION_MS: i64 = 1000;
const MAX_RETENTION_MS: i64 = 365 * 24 * 3600 * 1000;
const MAX_MAX_LENGTH: i64 = 100_000_000;
const MAX_REPLICATION_FACTOR: i64 = 10;
const MAX_PRINCIPALS: usize = 100;
const MAX_PRINCIPAL_CHARS: usize = 200;
const DEFAULT_RETENTION_MS: i64 = 7 * 24 * 3600 * 1000;

string_enum!(TopicType { RedisStream => "redis_stream" });
string_enum!(MessageFormat {
    Json => "json",
    Avro => "avro",
    Protobuf => "protobuf",
    Text => "text",
    Binary => "binary",
});

impl MessageFormat {
    /// The `contentType` of a message that names none.
    pub fn default_content_type(self) -> &'static str {
        match self {
            MessageFormat::Json => "application/json",
            MessageFormat::Avro => "application/avro",
            MessageFormat::Protobuf => "application/x-protobuf",
            MessageFormat::Text => "text/plain",
            MessageFormat::Binary => "application/octet-stream",
        }
    }

    /// Whether payloads travel as base64 text of their encoded bytes (they are not JSON).
    pub fn is_encoded(self) -> bool {
        matches!(self, MessageFormat::Avro | MessageFormat::Protobuf)
    }
}
string_enum!(Compression { None => "none", Gzip => "gzip", Zstd => "zstd" });
string_enum!(QueueStatus { Active => "active", Paused => "paused", Archived => "archived" });

#[derive(Debug, Clone, Serialize, PartialEq, ToSchema)]
#[serde(rename_all = "camelCase")]
pub struct Queue {
    pub id: Uuid,
    pub name: String,
    pub display_name: Option<String>,
    pub description: Option<String>,
    pub topic_type: TopicType,
    pub partition_count: u16,
    pub replication_factor: u16,
    pub retention_ms: u64,
    pub max_length: u64,
    pub message_format: MessageFormat,
    pub schema_definition: Option<Value>,
    pub compression_type: Compression,
    pub encrypted: bool,
    pub tenant_id: Uuid,
    pub is_public: bool,
    pub allowed_producers: Vec<String>,
    pub allowed_consumers: Vec<String>,
    pub status: QueueStatus,
    pub created_at: DateTime<Utc>,
    pub updated_at: DateTime<Utc>,
    /// One of the tenant's system queues (see `is_system_queue`).
    pub system: bool,
}

/// The queues platform services write to through the internal API. Only the service writes
/// them: a tenant may read and subscribe, never publish, purge, change or delete.
pub const SYSTEM_QUEUES: [&str; 4] = [
    "user-events",
    "user-notifications",
    "audit-logs",
    "notifications",
];

pub fn is_system_queue(name: &str) -> bool {
    SYSTEM_QUEUES.contains(&name)
}

/// What the configuration contributes to queue validation.
#[derive(Debug, Clone, Copy)]
pub struct QueueDefaults {
    pub max_length: u64,
    pub encryption_available: bool,
}

#[derive(Debug, Default, Deserialize, ToSchema)]
#[serde(rename_all = "camelCase")]
pub struct CreateQueueRequest {
    #[schema(
        required = true,
        pattern = r"^[A-Za-z0-9][A-Za-z0-9._-]{0,199}$",
        example = "orders"
    )]
    pub name: Option<String>,
    #[schema(max_length = 200)]
    pub display_name: Option<String>,
    #[schema(max_length = 2000)]
    pub description: Option<String>,
    #[schema(value_type = Option<TopicType>)]
    pub topic_type: Option<String>,
    #[schema(minimum = 1, maximum = 64, example = 4)]
    pub partition_count: Option<i64>,
    #[schema(minimum = 1, maximum = 10)]
    pub replication_factor: Option<i64>,
    #[schema(minimum = 1000, maximum = 31_536_000_000_i64)]
    pub retention_ms: Option<i64>,
    #[schema(minimum = 1, maximum = 100_000_000)]
    pub max_length: Option<i64>,
    #[schema(value_type = Option<MessageFormat>)]
    pub message_format: Option<String>,
    /// A JSON Schema every payload must satisfy.
    pub schema_definition: Option<Value>,
    #[schema(value_type = Option<Compression>)]
    pub compression_type: Option<String>,
    pub encrypted: Option<bool>,
    pub is_public: Option<bool>,
    pub allowed_producers: Option<Vec<String>>,
    pub allowed_consumers: Option<Vec<String>>,
    #[schema(value_type = Option<QueueStatus>)]
    pub status: Option<String>,
}

#[derive(Debug, Default, Deserialize, ToSchema)]
#[serde(rename_all = "camelCase")]
pub struct UpdateQueueRequest {
    #[serde(default, deserialize_with = "nullable")]
    pub display_name: Option<Option<String>>,
    #[serde(default, deserialize_with = "nullable")]
    pub description: Option<Option<String>>,
    pub retention_ms: Option<i64>,
    pub max_length: Option<i64>,
    #[serde(default, deserialize_with = "nullable")]
    pub schema_definition: Option<Option<Value>>,
    pub compression_type: Option<String>,
    pub is_public: Option<bool>,
    pub allowed_producers: Option<Vec<String>>,
    pub allowed_consumers: Option<Vec<String>>,
    pub status: Option<String>,
    // Immutable after create: accepted only when equal to the stored value.
    pub name: Option<String>,
    pub topic_type: Option<String>,
    pub partition_count: Option<i64>,
    pub encrypted: Option<bool>,
}

impl Queue {
    /// Validates a create request into a new queue owned by `tenant_id`.
    pub fn create(
        tenant_id: Uuid,
        request: CreateQueueRequest,
        defaults: QueueDefaults,
        now: DateTime<Utc>,
    ) -> Result<Queue, ApiError> {
        let mut problems = Problems::default();
        let name = request.name.unwrap_or_default();
        let name_ok = is_valid_name(&name);
        problems.check(name_ok, "name", || {
            "must be 1-200 characters of [A-Za-z0-9._-] starting with a letter or digit".into()
        });
        let topic_type = match request.topic_type.as_deref() {
            None => TopicType::RedisStream,
            Some("kafka") => {
                problems.add("topicType", "'kafka' is not supported in this edition");
                TopicType::RedisStream
            }
            Some(other) => problems
                .choice("topicType", other, TopicType::parse, TopicType::ALL)
                .unwrap_or(TopicType::RedisStream),
        };
        let partition_count = problems.in_range(
            "partitionCount",
            request.partition_count.unwrap_or(1),
            1,
            MAX_PARTITIONS,
        );
        let replication_factor = problems.in_range(
            "replicationFactor",
            request.replication_factor.unwrap_or(1),
            1,
            MAX_REPLICATION_FACTOR,
        );
        let message_format = request
            .message_format
            .as_deref()
            .map_or(Some(MessageFormat::Json), |text| {
                problems.choice(
                    "messageFormat",
                    text,
                    MessageFormat::parse,
                    MessageFormat::ALL,
                )
            })
            .unwrap_or(MessageFormat::Json);
        let encrypted = request.encrypted.unwrap_or(false);
        problems.check(
            !encrypted || defaults.encryption_available,
            "encrypted",
            || "needs MQ_ENCRYPTION_KEY to be configured on the service".into(),
        );

        let mut queue = Queue {
            id: Uuid::now_v7(),
            display_name: request
                .display_name
                .or_else(|| name_ok.then(|| name.clone())),
            name,
            description: request.description,
            topic_type,
            partition_count: partition_count as u16,
            replication_factor: replication_factor as u16,
            retention_ms: DEFAULT_RETENTION_MS as u64,
            max_length: defaults.max_length,
            message_format,
            schema_definition: None,
            compression_type: Compression::None,
            encrypted,
            tenant_id,
            is_public: false,
            allowed_producers: Vec::new(),
            allowed_consumers: Vec::new(),
            status: QueueStatus::Active,
            created_at: now,
            updated_at: now,
            system: false,
        };
        queue.apply_mutable(
            &mut problems,
            MutableFields {
                display_name: None,
                description: None,
                retention_ms: request.retention_ms,
                max_length: request.max_length,
                schema_definition: request.schema_definition.map(Some),
                compression_type: request.compression_type,
                is_public: request.is_public,
                allowed_producers: request.allowed_producers,
                allowed_consumers: request.allowed_consumers,
                status: request.status,
            },
        );
        queue.check_texts(&mut problems);
        queue.system = is_system_queue(&queue.name);
        problems.into_result(queue)
    }

    /// Applies a partial update, refusing changes to immutable fields.
    pub fn updated(
        &self,
        request: UpdateQueueRequest,
        now: DateTime<Utc>,
    ) -> Result<Queue, ApiError> {
        let mut problems = Problems::default();
        let immutable = [
            ("name", request.name.is_some_and(|v| v != self.name)),
            (
                "topicType",
                request
                    .topic_type
                    .is_some_and(|v| v != self.topic_type.as_str()),
            ),
            (
                "partitionCount",
                request
                    .partition_count
                    .is_some_and(|v| v != i64::from(self.partition_count)),
            ),
            (
                "encrypted",
                request.encrypted.is_some_and(|v| v != self.encrypted),
            ),
        ];
        for (field, changed) in immutable {
            problems.check(!changed, field, || "cannot be changed after create".into());
        }
        let mut queue = self.clone();
        queue.apply_mutable(
            &mut problems,
            MutableFields {
                display_name: request.display_name,
                description: request.description,
                retention_ms: request.retention_ms,
                max_length: request.max_length,
                schema_definition: request.schema_definition,
                compression_type: request.compression_type,
                is_public: request.is_public,
                allowed_producers: request.allowed_producers,
                allowed_consumers: request.allowed_consumers,
                status: request.status,
            },
        );
        queue.check_texts(&mut problems);
        queue.updated_at = now;
        problems.into_result(queue)
    }

    fn apply_mutable(&mut self, problems: &mut Problems, fields: MutableFields) {
        if let Some(display_name) = fields.display_name {
            self.display_name = display_name;
        }
        if let Some(description) = fields.description {
            self.description = description;
        }
        if let Some(retention) = fields.retention_ms {
            let value =
                problems.in_range("retentionMs", retention, MIN_RETENTION_MS, MAX_RETENTION_MS);
            self.retention_ms = value as u64;
        }
        if let Some(max_length) = fields.max_length {
            self.max_length = problems.in_range("maxLength", max_length, 1, MAX_MAX_LENGTH) as u64;
        }
        if let Some(schema) = fields.schema_definition {
            let schema = schema.filter(|value| !value.is_null());
            if let Some(schema) = &schema {
                if holds_nul(schema) {
                    problems.add("schemaDefinition", "must not hold the NUL character");
                } else if let Err(reason) = super::schema::precheck(schema) {
                    problems.add(
                        "schemaDefinition",
                        format!("is not a valid JSON Schema: {reason}"),
                    );
                }
            }
            self.schema_definition = schema;
        }
        if let Some(text) = fields.compression_type {
            if let Some(value) = problems.choice(
                "compressionType",
                &text,
                Compression::parse,
                Compression::ALL,
            ) {
                self.compression_type = value;
            }
        }
        if let Some(is_public) = fields.is_public {
            self.is_public = is_public;
        }
        if let Some(list) = fields.allowed_producers {
            check_principals(problems, "allowedProducers", &list);
            self.allowed_producers = list;
        }
        if let Some(list) = fields.allowed_consumers {
            check_principals(problems, "allowedConsumers", &list);
            self.allowed_consumers = list;
        }
        if let Some(text) = fields.status {
            if let Some(value) =
                problems.choice("status", &text, QueueStatus::parse, QueueStatus::ALL)
            {
                self.status = value;
            }
        }
    }

    fn check_texts(&self, problems: &mut Problems) {
        let too_long = |text: &Option<String>, max: usize| {
            text.as_ref().is_some_and(|t| t.chars().count() > max)
        };
        problems.check(
            !too_long(&self.display_name, MAX_DISPLAY_NAME_CHARS),
            "displayName",
            || format!("must be at most {MAX_DISPLAY_NAME_CHARS} characters"),
        );
        problems.check(
            !too_long(&self.description, MAX_DESCRIPTION_CHARS),
            "description",
            || format!("must be at most {MAX_DESCRIPTION_CHARS} characters"),
        );
        for (field, text) in [
            ("displayName", &self.display_name),
            ("description", &self.description),
        ] {
            problems.check(text.as_deref().is_none_or(is_free_text), field, || {
                "must not contain control characters other than tab, line feed and carriage return"
                    .into()
            });
        }
    }
}

/// The fields both create and update may set.
struct MutableFields {
    display_name: Option<Option<String>>,
    description: Option<Option<String>>,
    retention_ms: Option<i64>,
    max_length: Option<i64>,
    schema_definition: Option<Option<Value>>,
    compression_type: Option<String>,
    is_public: Option<bool>,
    allowed_producers: Option<Vec<String>>,
    allowed_consumers: Option<Vec<String>>,
    status: Option<String>,
}

fn check_principals(problems: &mut Problems, field: &str, list: &[String]) {
    if list.len() > MAX_PRINCIPALS {
        problems.add(
            field,
            format!("must list at most {MAX_PRINCIPALS} principals"),
        );
    }
    for (index, principal) in list.iter().enumerate() {
        if principal.is_empty()
            || principal.chars().count() > MAX_PRINCIPAL_CHARS
            || principal.chars().any(char::is_control)
        {
            problems.add(
                format!("{field}[{index}]"),
                format!(
                    "must be 1-{MAX_PRINCIPAL_CHARS} characters, none of them control characters"
                ),
            );
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    const DEFAULTS: QueueDefaults = QueueDefaults {
        max_length: 10_000,
        encryption_available: false,
    };

    fn request(body: Value) -> CreateQueueRequest {
        serde_json::from_value(body).unwrap()
    }

    fn failing_fields(result: Result<Queue, ApiError>) -> Value {
        result.unwrap_err().details["fields"].clone()
    }

    #[test]
    fn create_applies_defaults() {
        let queue = Queue::create(
            Uuid::nil(),
            request(json!({"name": "orders"})),
            DEFAULTS,
            Utc::now(),
        )
        .unwrap();
        assert_eq!(queue.partition_count, 1);
        assert_eq!(queue.max_length, 10_000);
        assert_eq!(queue.retention_ms, 604_800_000);
        assert_eq!(queue.display_name.as_deref(), Some("orders"));
        assert_eq!(queue.status, QueueStatus::Active);
        assert_eq!(queue.compression_type, Compression::None);
    }

    #[test]
    fn create_reports_every_bad_field() {
        let fields = failing_fields(Queue::create(
            Uuid::nil(),
            request(json!({
                "name": "-bad", "partitionCount": 65, "topicType": "kafka",
                "compressionType": "lz4", "maxLength": 0, "retentionMs": 5,
                "encrypted": true, "allowedProducers": [""], "status": "gone",
                "messageFormat": "xml"
            })),
            DEFAULTS,
            Utc::now(),
        ));
        assert_eq!(
            fields,
            json!([
                "name",
                "topicType",
                "partitionCount",
                "messageFormat",
                "encrypted",
                "retentionMs",
                "maxLength",
                "compressionType",
                "allowedProducers[0]",
                "status"
            ])
        );
    }

    #[test]
    fn invalid_schema_is_rejected() {
        let fields = failing_fields(Queue::create(
            Uuid::nil(),
            request(json!({"name": "q", "schemaDefinition": "not a schema"})),
            DEFAULTS,
            Utc::now(),
        ));
        assert_eq!(fields, json!(["schemaDefinition"]));
    }

    #[test]
    fn update_changes_only_given_fields_and_guards_immutables() {
        let queue = Queue::create(
            Uuid::nil(),
            request(json!({"name": "q", "description": "d", "partitionCount": 4})),
            DEFAULTS,
            Utc::now(),
        )
        .unwrap();
        let update: UpdateQueueRequest = serde_json::from_value(
            json!({"description": null, "maxLength": 5, "partitionCount": 4}),
        )
        .unwrap();
        let updated = queue.updated(update, Utc::now()).unwrap();
        assert_eq!(updated.description, None);
        assert_eq!(updated.max_length, 5);
        assert_eq!(updated.display_name, queue.display_name);

        let update: UpdateQueueRequest =
            serde_json::from_value(json!({"partitionCount": 2, "encrypted": true, "name": "x"}))
                .unwrap();
        assert_eq!(
            failing_fields(queue.updated(update, Utc::now())),
            json!(["name", "partitionCount", "encrypted"])
        );
    }
}

/// Filters and paging of the queue list, validated.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct QueueListFilter {
    pub status: Option<QueueStatus>,
    pub name_prefix: Option<String>,
    pub limit: i64,
    pub offset: i64,
}

/// `GET /queues` query parameters as sent; empty values mean "not given".
#[derive(Debug, Default, Deserialize, IntoParams)]
#[into_params(parameter_in = Query)]
pub struct QueueListQuery {
    pub limit: Option<String>,
    pub offset: Option<String>,
    pub status: Option<String>,
    pub search: Option<String>,
}

pub const MAX_PAGE_SIZE: i64 = 500;
pub const DEFAULT_PAGE_SIZE: i64 = 50;

impl QueueListQuery {
    pub fn validate(self) -> Result<QueueListFilter, ApiError> {
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
        let status = non_empty(self.status).and_then(|text| {
            problems.choice("status", &text, QueueStatus::parse, QueueStatus::ALL)
        });
        let name_prefix = non_empty(self.search);
        problems.check(
            name_prefix
                .as_deref()
                .is_none_or(|prefix| !prefix.chars().any(char::is_control)),
            "search",
            || "must not contain control characters".into(),
        );
        let filter = QueueListFilter {
            status,
            name_prefix,
            limit,
            offset,
        };
        problems.into_result(filter)
    }
}

fn non_empty(value: Option<String>) -> Option<String> {
    value.filter(|text| !text.is_empty())
}

/// A paging parameter: its default when absent, else a whole number in `min..=max`.
pub fn page_number(
    problems: &mut Problems,
    field: &str,
    raw: Option<String>,
    default: i64,
    min: i64,
    max: i64,
) -> i64 {
    let Some(text) = non_empty(raw) else {
        return default;
    };
    match text.parse::<i64>() {
        Ok(value) if (min..=max).contains(&value) => value,
        _ => {
            let bound = if max == i64::MAX {
                format!("a whole number of at least {min}")
            } else {
                format!("a whole number from {min} to {max}")
            };
            problems.add(field, format!("must be {bound} (got '{text}')"));
            default
        }
    }
}

#[cfg(test)]
mod list_tests {
    use super::*;

    #[test]
    fn list_query_defaults_and_bounds() {
        let filter = QueueListQuery::default().validate().unwrap();
        assert_eq!((filter.limit, filter.offset, filter.status), (50, 0, None));
        let empty = QueueListQuery {
            status: Some(String::new()),
            search: Some(String::new()),
            ..Default::default()
        };
        assert_eq!(empty.validate().unwrap().name_prefix, None);
        let bad = QueueListQuery {
            limit: Some("501".into()),
            offset: Some("-1".into()),
            status: Some("x".into()),
            search: None,
        };
        let error = bad.validate().unwrap_err();
        assert_eq!(
            error.details["fields"],
            serde_json::json!(["limit", "offset", "status"])
        );
    }
}
