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
    pub stream_offset: String,
    pub message_key: Option<String>,
    pub correlation_id: Option<String>,
    /// JSON text.
    pub headers: String,
    /// JSON text.
    pub payload: String,
    pub payload_bytes: i32,
    pub trace_id: Option<String>,
    pub published_at: DateTime<Utc>,
    pub expires_at: DateTime<Utc>,
}

/// A queue's identity and partition count, as the recorder needs them.
#[derive(Debug, Clone, sqlx::FromRow)]
pub struct QueuePartitions {
    pub id: Uuid,
    pub tenant_id: Uuid,
    pub partition_count: i32,
}

impl Store {
    /// Inserts the records in one statement. A record already present (a re-delivery to the
    /// recorder) is left alone, and records of a queue deleted meanwhile are skipped.
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
                 published_at, expires_at) \
             SELECT r.topic_id, r.tenant_id, r.message_id, r.partition, r.stream_offset, \
                 r.message_key, r.correlation_id, r.headers::jsonb, r.payload::jsonb, \
                 r.payload_bytes, 'published', r.trace_id, r.published_at, r.expires_at \
             FROM UNNEST($1::uuid[], $2::uuid[], $3::text[], $4::int4[], $5::text[], $6::text[], \
                 $7::text[], $8::text[], $9::text[], $10::int4[], $11::text[], $12::timestamptz[], \
                 $13::timestamptz[]) \
               AS r(topic_id, tenant_id, message_id, partition, stream_offset, message_key, \
                 correlation_id, headers, payload, payload_bytes, trace_id, published_at, expires_at) \
             WHERE EXISTS (SELECT 1 FROM message_topics t WHERE t.id = r.topic_id) \
             ON CONFLICT (topic_id, message_id) DO NOTHING",
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
        .bind(column!(trace_id))
        .bind(column!(published_at))
        .bind(column!(expires_at))
        .execute(&self.pool)
        .await?;
        Ok(result.rows_affected())
    }

    /// Every queue of every tenant, for the recorder's list of streams.
    pub async fn list_all_queue_partitions(&self) -> ApiResult<Vec<QueuePartitions>> {
        let rows = sqlx::query_as("SELECT id, tenant_id, partition_count FROM message_topics")
            .fetch_all(&self.pool)
            .await?;
        Ok(rows)
    }
}
