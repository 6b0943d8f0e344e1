//! `message_records`: one row per stored message, written in batches by the recorder.

use chrono::{DateTime, Utc};
use uuid::Uuid;

use super::Store;
use crate::error::ApiResult;

#[derive(Debug, Clone)]
pub struct NewMessageRecord {
    pub topic_id: Uuid,
    pub tenant_id: Uuid,
    pub message_id: String,
    pub partition: i32,
    /// `published` (in the stream) or `scheduled` (waiting for its time).
    pub status: &'static str,
    pub stream_offset: Option<String>,
    pub message_key: Option<String>,
    pub correlation_id: Option<String>,
    /// JSON text.
    pub headers: String,
    /// JSON text.
    pub payload: String,
    pub payload_bytes: i32,
    pub trace_id: Option<String>,
    pub published_at: DateTime<Utc>,
    pub scheduled_at: Option<DateTime<Utc>>,
    pub expires_at: DateTime<Utc>,
}

/// A later status of a recorded message (expired, cancelled, ...).
#[derive(Debug, Clone)]
pub struct RecordStatusChange {
    pub topic_id: Uuid,
    pub message_id: String,
    pub status: &'static str,
}

/// A stored message record, for lookups.
#[derive(Debug, Clone, sqlx::FromRow)]
pub struct MessageRecord {
    pub message_id: String,
    pub partition: i32,
    pub stream_offset: Option<String>,
    pub message_key: Option<String>,
    pub correlation_id: Option<String>,
    pub headers: sqlx::types::Json<serde_json::Value>,
    pub payload: Option<sqlx::types::Json<serde_json::Value>>,
    pub status: String,
    pub trace_id: Option<String>,
    pub retry_count: i32,
    pub published_at: DateTime<Utc>,
    pub scheduled_at: Option<DateTime<Utc>>,
    pub expires_at: Option<DateTime<Utc>>,
}

/// One delivery attempt of a message to a subscription.
#[derive(Debug, Clone, sqlx::FromRow)]
pub struct DeliveryRecord {
    pub subscription_id: Uuid,
    pub attempt: i32,
    pub status: String,
    pub processing_ms: Option<i32>,
    pub error: Option<String>,
    pub created_at: DateTime<Utc>,
}

/// A queue's identity and partition count, as the recorder needs them.
#[derive(Debug, Clone, sqlx::FromRow)]
pub struct QueuePartitions {
    pub id: Uuid,
    pub tenant_id: Uuid,
    pub partition_count: i32,
}

impl Store {
    /// Inserts the records in one statement (each message at most once per call). A record
    /// already present is left alone (a re-delivery to the recorder), except that a
    /// `scheduled` one becomes `published` when its message is released; records of a queue
    /// deleted meanwhile are skipped.
    pub async fn insert_message_records(&self, records: &[NewMessageRecord]) -> ApiResult<u64> {
        if records.is_empty() {
            return Ok(0);
        }
        macro_rules! column {
            ($field:ident) => {
                records.iter().map(|r| r.$field.clone()).collect::<Vec<_>>()
            };
        }
        let result = sqlx::query(
            "INSERT INTO message_records (topic_id, tenant_id, message_id, partition, stream_offset, \
                 message_key, correlation_id, headers, payload, payload_bytes, status, trace_id, \
                 published_at, scheduled_at, expires_at) \
             SELECT r.topic_id, r.tenant_id, r.message_id, r.partition, r.stream_offset, \
                 r.message_key, r.correlation_id, r.headers::jsonb, r.payload::jsonb, \
                 r.payload_bytes, r.status, r.trace_id, r.published_at, r.scheduled_at, r.expires_at \
             FROM UNNEST($1::uuid[], $2::uuid[], $3::text[], $4::int4[], $5::text[], $6::text[], \
                 $7::text[], $8::text[], $9::text[], $10::int4[], $11::text[], $12::text[], \
                 $13::timestamptz[], $14::timestamptz[], $15::timestamptz[]) \
               AS r(topic_id, tenant_id, message_id, partition, stream_offset, message_key, \
                 correlation_id, headers, payload, payload_bytes, status, trace_id, published_at, \
                 scheduled_at, expires_at) \
             WHERE EXISTS (SELECT 1 FROM message_topics t WHERE t.id = r.topic_id) \
             ON CONFLICT (topic_id, message_id) DO UPDATE \
               SET status = EXCLUDED.status, stream_offset = EXCLUDED.stream_offset, updated_at = now() \
               WHERE message_records.status = 'scheduled' AND EXCLUDED.status = 'published'",
        )
        .bind(column!(topic_id))
        .bind(column!(tenant_id))
        .bind(column!(message_id))
        .bind(column!(partition))
        .bind(column!(stream_offset))
        .bind(column!(message_key))
        .bind(column!(correlation_id))
        .bind(column!(headers))
        .bind(column!(payload))
        .bind(column!(payload_bytes))
        .bind(records.iter().map(|r| r.status).collect::<Vec<_>>())
        .bind(column!(trace_id))
        .bind(column!(published_at))
        .bind(column!(scheduled_at))
        .bind(column!(expires_at))
        .execute(&self.pool)
        .await?;
        Ok(result.rows_affected())
    }

    /// Moves records to a later status; a record already in a final status keeps it.
    pub async fn change_record_statuses(&self, changes: &[RecordStatusChange]) -> ApiResult<u64> {
        if changes.is_empty() {
            return Ok(0);
        }
        let result = sqlx::query(
            "UPDATE message_records m SET status = c.status, updated_at = now() \
             FROM UNNEST($1::uuid[], $2::text[], $3::text[]) AS c(topic_id, message_id, status) \
             WHERE m.topic_id = c.topic_id AND m.message_id = c.message_id \
               AND m.status IN ('scheduled', 'published')",
        )
        .bind(changes.iter().map(|c| c.topic_id).collect::<Vec<_>>())
        .bind(
            changes
                .iter()
                .map(|c| c.message_id.clone())
                .collect::<Vec<_>>(),
        )
        .bind(changes.iter().map(|c| c.status).collect::<Vec<_>>())
        .execute(&self.pool)
        .await?;
        Ok(result.rows_affected())
    }

    pub async fn find_message_record(
        &self,
        topic_id: Uuid,
        message_id: &str,
    ) -> ApiResult<Option<MessageRecord>> {
        let record = sqlx::query_as(
            "SELECT message_id, partition, stream_offset, message_key, correlation_id, headers, \
                 payload, status, trace_id, retry_count, published_at, scheduled_at, expires_at \
             FROM message_records WHERE topic_id = $1 AND message_id = $2",
        )
        .bind(topic_id)
        .bind(message_id)
        .fetch_optional(&self.pool)
        .await?;
        Ok(record)
    }

    pub async fn list_deliveries(
        &self,
        topic_id: Uuid,
        message_id: &str,
    ) -> ApiResult<Vec<DeliveryRecord>> {
        let deliveries = sqlx::query_as(
            "SELECT subscription_id, attempt, status, processing_ms, error, created_at \
             FROM consumption_records WHERE topic_id = $1 AND message_id = $2 ORDER BY id",
        )
        .bind(topic_id)
        .bind(message_id)
        .fetch_all(&self.pool)
        .await?;
        Ok(deliveries)
    }

    /// Every queue of every tenant, for the recorder's list of streams.
    pub async fn list_all_queue_partitions(&self) -> ApiResult<Vec<QueuePartitions>> {
        let rows = sqlx::query_as("SELECT id, tenant_id, partition_count FROM message_topics")
            .fetch_all(&self.pool)
            .await?;
        Ok(rows)
    }
}
