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

/// A later status of a message (expired, cancelled, consumed, failed, dead_letter).
#[derive(Debug, Clone)]
pub struct RecordStatusChange {
    pub topic_id: Uuid,
    pub tenant_id: Uuid,
    pub partition: i32,
    pub message_id: String,
    pub status: &'static str,
    /// Retries scheduled so far.
    pub retries: i32,
}

/// One delivery attempt's outcome.
#[derive(Debug, Clone)]
pub struct NewConsumptionRecord {
    pub tenant_id: Uuid,
    pub topic_id: Uuid,
    pub subscription_id: Uuid,
    pub message_id: String,
    pub attempt: i32,
    pub status: &'static str,
    pub processing_ms: Option<i32>,
    pub error: Option<String>,
    pub created_at: DateTime<Utc>,
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
    /// already present keeps its status, except that `scheduled` becomes `published` when the
    /// message is released; a placeholder written by an earlier status change (see
    /// `change_record_statuses`) gets the message's data. Records of a queue deleted meanwhile
    /// are skipped.
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
             ON CONFLICT (topic_id, message_id) DO UPDATE SET \
               stream_offset = COALESCE(EXCLUDED.stream_offset, message_records.stream_offset), \
               payload = COALESCE(message_records.payload, EXCLUDED.payload), \
               headers = CASE WHEN message_records.payload IS NULL THEN EXCLUDED.headers \
                              ELSE message_records.headers END, \
               message_key = COALESCE(message_records.message_key, EXCLUDED.message_key), \
               correlation_id = COALESCE(message_records.correlation_id, EXCLUDED.correlation_id), \
               payload_bytes = GREATEST(message_records.payload_bytes, EXCLUDED.payload_bytes), \
               trace_id = COALESCE(message_records.trace_id, EXCLUDED.trace_id), \
               published_at = CASE WHEN message_records.payload IS NULL THEN EXCLUDED.published_at \
                                   ELSE message_records.published_at END, \
               scheduled_at = COALESCE(message_records.scheduled_at, EXCLUDED.scheduled_at), \
               expires_at = COALESCE(message_records.expires_at, EXCLUDED.expires_at), \
               status = CASE WHEN message_records.status = 'scheduled' THEN EXCLUDED.status \
                             ELSE message_records.status END, \
               updated_at = now()",
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

    /// Moves records to a later status (each message at most once per call), by rank:
    /// scheduled < published < failed < dead_letter < consumed; `expired` and `cancelled` only
    /// apply to a message not yet delivered. A message without a record yet (its record is
    /// still on its way) gets a placeholder holding the status, which the record fills in.
    pub async fn change_record_statuses(&self, changes: &[RecordStatusChange]) -> ApiResult<u64> {
        if changes.is_empty() {
            return Ok(0);
        }
        const RANK: &str = "CASE {} WHEN 'scheduled' THEN 0 WHEN 'published' THEN 1 \
            WHEN 'failed' THEN 2 WHEN 'dead_letter' THEN 3 WHEN 'consumed' THEN 4 ELSE 5 END";
        let rank = |column: &str| RANK.replace("{}", column);
        let sql = format!(
            "INSERT INTO message_records (topic_id, tenant_id, message_id, partition, status, \
                 retry_count, published_at) \
             SELECT c.topic_id, c.tenant_id, c.message_id, c.partition, c.status, c.retries, now() \
             FROM UNNEST($1::uuid[], $2::uuid[], $3::text[], $4::int4[], $5::text[], $6::int4[]) \
               AS c(topic_id, tenant_id, message_id, partition, status, retries) \
             WHERE EXISTS (SELECT 1 FROM message_topics t WHERE t.id = c.topic_id) \
             ON CONFLICT (topic_id, message_id) DO UPDATE SET \
               status = CASE WHEN {new} > {old} AND (EXCLUDED.status NOT IN ('expired', 'cancelled') \
                                 OR message_records.status IN ('scheduled', 'published')) \
                             THEN EXCLUDED.status ELSE message_records.status END, \
               retry_count = GREATEST(message_records.retry_count, EXCLUDED.retry_count), \
               updated_at = now()",
            new = rank("EXCLUDED.status"),
            old = rank("message_records.status"),
        );
        let result = sqlx::query(&sql)
            .bind(changes.iter().map(|c| c.topic_id).collect::<Vec<_>>())
            .bind(changes.iter().map(|c| c.tenant_id).collect::<Vec<_>>())
            .bind(
                changes
                    .iter()
                    .map(|c| c.message_id.clone())
                    .collect::<Vec<_>>(),
            )
            .bind(changes.iter().map(|c| c.partition).collect::<Vec<_>>())
            .bind(changes.iter().map(|c| c.status).collect::<Vec<_>>())
            .bind(changes.iter().map(|c| c.retries).collect::<Vec<_>>())
            .execute(&self.pool)
            .await?;
        Ok(result.rows_affected())
    }

    /// Records delivery attempts; attempts of a subscription deleted meanwhile are skipped.
    pub async fn insert_consumption_records(
        &self,
        records: &[NewConsumptionRecord],
    ) -> ApiResult<()> {
        if records.is_empty() {
            return Ok(());
        }
        sqlx::query(
            "INSERT INTO consumption_records (tenant_id, topic_id, subscription_id, message_id, \
                 attempt, status, processing_ms, error, created_at) \
             SELECT r.tenant_id, r.topic_id, r.subscription_id, r.message_id, r.attempt, r.status, \
                 r.processing_ms, r.error, r.created_at \
             FROM UNNEST($1::uuid[], $2::uuid[], $3::uuid[], $4::text[], $5::int4[], $6::text[], \
                 $7::int4[], $8::text[], $9::timestamptz[]) WITH ORDINALITY \
               AS r(tenant_id, topic_id, subscription_id, message_id, attempt, status, \
                 processing_ms, error, created_at, position) \
             WHERE EXISTS (SELECT 1 FROM message_subscriptions s WHERE s.id = r.subscription_id) \
             ORDER BY r.position",
        )
        .bind(records.iter().map(|r| r.tenant_id).collect::<Vec<_>>())
        .bind(records.iter().map(|r| r.topic_id).collect::<Vec<_>>())
        .bind(
            records
                .iter()
                .map(|r| r.subscription_id)
                .collect::<Vec<_>>(),
        )
        .bind(
            records
                .iter()
                .map(|r| r.message_id.clone())
                .collect::<Vec<_>>(),
        )
        .bind(records.iter().map(|r| r.attempt).collect::<Vec<_>>())
        .bind(records.iter().map(|r| r.status).collect::<Vec<_>>())
        .bind(records.iter().map(|r| r.processing_ms).collect::<Vec<_>>())
        .bind(records.iter().map(|r| r.error.clone()).collect::<Vec<_>>())
        .bind(records.iter().map(|r| r.created_at).collect::<Vec<_>>())
        .execute(&self.pool)
        .await?;
        // A subscription's last consumption is its latest acked attempt.
        sqlx::query(
            "UPDATE message_subscriptions s SET last_consumed_at = GREATEST(s.last_consumed_at, r.at) \
             FROM (SELECT subscription_id, max(created_at) AS at \
                   FROM UNNEST($1::uuid[], $2::text[], $3::timestamptz[]) AS u(subscription_id, status, created_at) \
                   WHERE status = 'acked' GROUP BY subscription_id) r \
             WHERE s.id = r.subscription_id",
        )
        .bind(records.iter().map(|r| r.subscription_id).collect::<Vec<_>>())
        .bind(records.iter().map(|r| r.status).collect::<Vec<_>>())
        .bind(records.iter().map(|r| r.created_at).collect::<Vec<_>>())
        .execute(&self.pool)
        .await?;
        Ok(())
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
             FROM consumption_records WHERE topic_id = $1 AND message_id = $2 \
             ORDER BY created_at, attempt, id",
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
