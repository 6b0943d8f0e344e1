//! `message_records`: one row per stored message, and `consumption_records`: one row per
//! delivery attempt, both written in batches by the recorder; `record_quarantine`: what
//! PostgreSQL refused of them.
//!
//! Every write here is idempotent (records by message, consumption rows by the journal event
//! they come from, status changes by rank), so the recorder may write a batch again after a
//! failure between writing it and acknowledging it in Redis.

use chrono::{DateTime, Utc};
use sqlx::PgConnection;
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
    /// JSON text, in the form `payload_encoding` names.
    pub payload: String,
    pub payload_encoding: PayloadEncoding,
    pub payload_bytes: i32,
    pub content_type: String,
    pub producer_id: Option<String>,
    pub trace_id: Option<String>,
    pub published_at: DateTime<Utc>,
    pub scheduled_at: Option<DateTime<Utc>>,
    pub expires_at: DateTime<Utc>,
}

/// How a record holds its payload (the `payload_encoding` column). The service sets it, so
/// no payload a producer sends can pass for another form.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum PayloadEncoding {
    /// `payload` is the message's JSON value.
    Json,
    /// `payload` is a JSON string holding the value's JSON text: for values jsonb cannot hold
    /// (it refuses the NUL character).
    JsonText,
    /// `payload` is the sealed form (`crypto::SealedPayload`).
    Sealed,
}

impl PayloadEncoding {
    pub fn as_str(self) -> &'static str {
        match self {
            PayloadEncoding::Json => "json",
            PayloadEncoding::JsonText => "json_text",
            PayloadEncoding::Sealed => "sealed",
        }
    }
}

/// Everything one recorder batch writes, in one transaction.
#[derive(Debug, Clone, Default)]
pub struct RecordBatch {
    pub records: Vec<NewMessageRecord>,
    pub attempts: Vec<NewConsumptionRecord>,
    pub changes: Vec<RecordStatusChange>,
}

impl RecordBatch {
    pub fn is_empty(&self) -> bool {
        self.records.is_empty() && self.attempts.is_empty() && self.changes.is_empty()
    }
}

/// An entry the recorder could not write, set aside for the operator.
#[derive(Debug, Clone)]
pub struct QuarantinedEntry {
    pub tenant_id: Uuid,
    pub topic_id: Uuid,
    pub partition: i32,
    /// `stream` (a message) or `journal` (an event about one).
    pub source: &'static str,
    pub entry_id: String,
    pub message_id: Option<String>,
    /// The entry's fields as JSON text.
    pub entry: String,
    pub error: String,
}

/// Why a write failed: worth retrying as it is, or refused for what it holds.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum RecordWriteError {
    /// PostgreSQL is unreachable or overloaded: the same write may succeed later.
    #[error("PostgreSQL unavailable: {0}")]
    Unavailable(String),
    /// PostgreSQL refused the data (a value it cannot store, a constraint): retrying the same
    /// write would fail again.
    #[error("PostgreSQL refused the write: {0}")]
    Rejected(String),
}

impl From<sqlx::Error> for RecordWriteError {
    fn from(error: sqlx::Error) -> Self {
        let text = error.to_string();
        match &error {
            sqlx::Error::Database(db) => {
                let code = db.code().unwrap_or_default();
                // Connection (08), transaction rollback (40: serialization, deadlock),
                // resources (53), operator intervention (57P), system (58): passing troubles.
                // So is a column or table this release does not know (42703, 42P01): the
                // schema moved on under an older instance during a rolling upgrade, and the
                // batch waits for the instance's replacement instead of being set aside.
                let passing = ["08", "40", "53", "57P", "58", "42703", "42P01"]
                    .iter()
                    .any(|class| code.starts_with(class));
                if passing {
                    RecordWriteError::Unavailable(text)
                } else {
                    RecordWriteError::Rejected(text)
                }
            }
            sqlx::Error::Encode(_)
            | sqlx::Error::Decode(_)
            | sqlx::Error::ColumnDecode { .. }
            | sqlx::Error::TypeNotFound { .. } => RecordWriteError::Rejected(text),
            _ => RecordWriteError::Unavailable(text),
        }
    }
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
    /// When the change happened (for `consumed`: the message's `consumed_at`).
    pub at: DateTime<Utc>,
}

/// One delivery attempt's outcome.
#[derive(Debug, Clone)]
pub struct NewConsumptionRecord {
    pub tenant_id: Uuid,
    pub topic_id: Uuid,
    pub partition: i32,
    /// The id of the journal entry this attempt was recorded from: its idempotency key.
    pub journal_id: String,
    pub subscription_id: Uuid,
    pub message_id: String,
    pub attempt: i32,
    pub status: &'static str,
    pub processing_ms: Option<i32>,
    pub error: Option<String>,
    pub created_at: DateTime<Utc>,
    /// The consumer and the service instance that delivered (`<consumerName>@<instance>`).
    pub consumer_instance: Option<String>,
    /// The stream entry id of the delivered message.
    pub offset_value: Option<String>,
    /// For a failed attempt to be retried: when.
    pub next_retry_at: Option<DateTime<Utc>>,
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
    pub payload_encoding: String,
    pub status: String,
    pub trace_id: Option<String>,
    pub retry_count: i32,
    pub published_at: DateTime<Utc>,
    pub scheduled_at: Option<DateTime<Utc>>,
    pub expires_at: Option<DateTime<Utc>>,
    /// `None` for records written before the column existed, and for a placeholder (a
    /// status change that arrived before its message's record).
    pub content_type: Option<String>,
}

/// A message's record without its payload, for browsing a queue.
#[derive(Debug, Clone, sqlx::FromRow)]
pub struct MessageSummaryRecord {
    pub message_id: String,
    pub partition: i32,
    pub stream_offset: Option<String>,
    pub message_key: Option<String>,
    pub correlation_id: Option<String>,
    pub headers: sqlx::types::Json<serde_json::Value>,
    /// The headers were larger than a summary carries (see `list_message_summaries`).
    pub headers_omitted: bool,
    pub status: String,
    pub retry_count: i32,
    pub published_at: DateTime<Utc>,
    pub payload_size: i32,
}

/// Headers of a browsed message larger than this (as JSON text) are left out of its summary,
/// so a page of 100 stays small whatever the producers sent.
const MAX_SUMMARY_HEADER_BYTES: i32 = 4096;

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
    pub retention_ms: i64,
}

/// The advisory lock every multi-row writer of the record tables takes ("mqrecord"): the
/// recorders' batches, record retention and queue deletion. Advisory locks are per database,
/// so deployments on other databases do not share it.
const RECORD_WRITER_LOCK: i64 = 0x6d71_7265_636f_7264;

/// Rows a deletion removes per transaction, so the lock is held briefly each time.
const DELETE_BATCH: i64 = 5000;

/// Takes the record writers' lock for the rest of `connection`'s transaction.
///
/// Several writers change the same rows in orders of their own (a batch's order and its
/// foreign-key checks, a table scan's, a cascade's): the recorders, record retention, and
/// the deletion of a queue or a subscription (whose cascades reach the records and the
/// subscriptions the recorders update). PostgreSQL found deadlocks between them under load.
/// One at a time cannot deadlock; each holds the lock for one bounded batch.
pub(super) async fn lock_record_writers(connection: &mut PgConnection) -> Result<(), sqlx::Error> {
    sqlx::query("SELECT pg_advisory_xact_lock($1)")
        .bind(RECORD_WRITER_LOCK)
        .execute(connection)
        .await?;
    Ok(())
}

/// Deletes the rows of `table` whose `column` is `id`, a bounded batch per transaction under
/// the record writers' lock, until none is left (a deletion's cascade then has little to do
/// while it holds the lock). `table` and `column` are the callers' constants.
pub(super) async fn delete_in_batches(
    pool: &sqlx::PgPool,
    table: &str,
    column: &str,
    id: Uuid,
) -> Result<(), sqlx::Error> {
    let sql = format!(
        "DELETE FROM {table} WHERE ctid IN \
           (SELECT ctid FROM {table} WHERE {column} = $1 LIMIT $2)"
    );
    loop {
        let mut tx = pool.begin().await?;
        lock_record_writers(&mut tx).await?;
        let removed = sqlx::query(&sql)
            .bind(id)
            .bind(DELETE_BATCH)
            .execute(&mut *tx)
            .await?
            .rows_affected();
        tx.commit().await?;
        if removed == 0 {
            return Ok(());
        }
    }
}

impl Store {
    /// Writes one recorder batch in one transaction: new records, delivery attempts (and the
    /// subscriptions' `last_consumed_at`), then status changes. Nothing is written when any
    /// part fails.
    pub async fn write_records(&self, batch: &RecordBatch) -> Result<(), RecordWriteError> {
        if batch.is_empty() {
            return Ok(());
        }
        let mut tx = self.pool.begin().await?;
        // Recorders of several instances touch the same records and subscriptions in batch
        // order; one writer at a time, as within an instance, costs nothing measurable.
        lock_record_writers(&mut tx).await?;
        insert_message_records(&mut tx, &batch.records).await?;
        insert_consumption_records(&mut tx, &batch.attempts).await?;
        change_record_statuses(&mut tx, &batch.changes).await?;
        tx.commit().await?;
        Ok(())
    }

    /// Sets an entry aside; a second quarantine of the same entry changes nothing. Entries of
    /// a queue deleted meanwhile are dropped.
    pub async fn quarantine(&self, entry: &QuarantinedEntry) -> Result<(), RecordWriteError> {
        sqlx::query(
            "INSERT INTO record_quarantine (tenant_id, topic_id, partition_id, source, entry_id, \
                 message_id, entry, error) \
             SELECT $1, $2, $3, $4, $5, $6, $7, $8 \
             WHERE EXISTS (SELECT 1 FROM message_topics t WHERE t.id = $2) \
             ON CONFLICT ON CONSTRAINT record_quarantine_entry_key DO NOTHING",
        )
        .bind(entry.tenant_id)
        .bind(entry.topic_id)
        .bind(entry.partition)
        .bind(entry.source)
        .bind(&entry.entry_id)
        .bind(&entry.message_id)
        .bind(&entry.entry)
        .bind(&entry.error)
        .execute(&self.pool)
        .await?;
        Ok(())
    }

    /// Removes up to `batch` rows of each table (message records, consumption records,
    /// quarantined entries) older than their queue's `retentionMs`; how many went. Each queue
    /// is visited through its (queue, time) index, so a call costs in proportion to what it
    /// removes plus one index probe per queue.
    pub async fn delete_expired_records(&self, batch: i64) -> ApiResult<u64> {
        let mut removed = 0;
        for (table, time) in [
            ("message_records", "published_at"),
            ("consumption_records", "created_at"),
            ("record_quarantine", "created_at"),
        ] {
            let sql = format!(
                "WITH doomed AS ( \
                   SELECT r.ctid AS row_id FROM message_topics t \
                   CROSS JOIN LATERAL ( \
                     SELECT ctid FROM {table} \
                     WHERE topic_id = t.id \
                       AND {time} < now() - t.retention_ms * interval '1 millisecond' \
                     ORDER BY {time} LIMIT $1) r \
                   LIMIT $1) \
                 DELETE FROM {table} WHERE ctid IN (SELECT row_id FROM doomed)"
            );
            let mut tx = self.pool.begin().await?;
            lock_record_writers(&mut tx).await?;
            let result = sqlx::query(&sql).bind(batch).execute(&mut *tx).await?;
            tx.commit().await?;
            removed += result.rows_affected();
        }
        Ok(removed)
    }

    pub async fn find_message_record(
        &self,
        topic_id: Uuid,
        message_id: &str,
    ) -> ApiResult<Option<MessageRecord>> {
        let record = sqlx::query_as(
            "SELECT message_id, partition_id AS partition, offset_value AS stream_offset, \
                 message_key, correlation_id, headers, payload, payload_encoding, status, \
                 trace_id, retry_count, published_at, scheduled_at, expires_at, content_type \
             FROM message_records WHERE topic_id = $1 AND message_id = $2",
        )
        .bind(topic_id)
        .bind(message_id)
        .fetch_optional(&self.pool)
        .await?;
        Ok(record)
    }

    /// A page of the queue's records, newest first, without their payloads (and without
    /// headers over `MAX_SUMMARY_HEADER_BYTES`): those published before `before` (time, then
    /// message id, for ties).
    pub async fn list_message_summaries(
        &self,
        tenant_id: Uuid,
        topic_id: Uuid,
        before: Option<(DateTime<Utc>, String)>,
        limit: i64,
    ) -> ApiResult<Vec<MessageSummaryRecord>> {
        let (before_at, before_id) = before.unzip();
        let records = sqlx::query_as(
            "SELECT message_id, partition_id AS partition, offset_value AS stream_offset, \
                 message_key, correlation_id, status, retry_count, published_at, payload_size, \
                 CASE WHEN octet_length(headers::text) <= $6 THEN headers \
                      ELSE '{}'::jsonb END AS headers, \
                 octet_length(headers::text) > $6 AS headers_omitted \
             FROM message_records WHERE topic_id = $1 AND tenant_id = $2 \
                 AND ($3::timestamptz IS NULL OR (published_at, message_id) < ($3, $4)) \
             ORDER BY published_at DESC, message_id DESC LIMIT $5",
        )
        .bind(topic_id)
        .bind(tenant_id)
        .bind(before_at)
        .bind(before_id)
        .bind(limit)
        .bind(MAX_SUMMARY_HEADER_BYTES)
        .fetch_all(&self.pool)
        .await?;
        Ok(records)
    }

    /// Claims a recorded dead letter for a redrive: marks it `redriven` unless it was already,
    /// and answers its status before, or `None` when another redrive has it (or there is no
    /// record yet). Concurrent claims of one message: one wins, the others wait for it and
    /// then see `redriven`.
    pub async fn claim_redrive(
        &self,
        tenant_id: Uuid,
        topic_id: Uuid,
        message_id: &str,
    ) -> ApiResult<Option<String>> {
        let before = sqlx::query_scalar(
            "WITH before AS ( \
                 SELECT status FROM message_records \
                 WHERE topic_id = $1 AND message_id = $2 AND tenant_id = $3 \
                     AND status <> 'redriven' AND payload IS NOT NULL \
                 FOR UPDATE) \
             UPDATE message_records r SET status = 'redriven', updated_at = now() \
             FROM before WHERE r.topic_id = $1 AND r.message_id = $2 \
             RETURNING before.status",
        )
        .bind(topic_id)
        .bind(message_id)
        .bind(tenant_id)
        .fetch_optional(&self.pool)
        .await?;
        Ok(before)
    }

    /// Gives a claim back after the redrive's publish failed.
    pub async fn release_redrive(
        &self,
        topic_id: Uuid,
        message_id: &str,
        before: &str,
    ) -> ApiResult<()> {
        sqlx::query(
            "UPDATE message_records SET status = $3, updated_at = now() \
             WHERE topic_id = $1 AND message_id = $2 AND status = 'redriven'",
        )
        .bind(topic_id)
        .bind(message_id)
        .bind(before)
        .execute(&self.pool)
        .await?;
        Ok(())
    }

    /// The delivery attempts of a message by subscriptions of `tenant_id` (the queue's
    /// owner: its guests' attempts are theirs alone).
    pub async fn list_deliveries(
        &self,
        tenant_id: Uuid,
        topic_id: Uuid,
        message_id: &str,
    ) -> ApiResult<Vec<DeliveryRecord>> {
        let deliveries = sqlx::query_as(
            "SELECT subscription_id, attempt, status, processing_time_ms AS processing_ms, \
                 error_message AS error, created_at \
             FROM consumption_records WHERE topic_id = $1 AND message_id = $2 \
                 AND tenant_id = $3 \
             ORDER BY created_at, attempt, id",
        )
        .bind(topic_id)
        .bind(message_id)
        .bind(tenant_id)
        .fetch_all(&self.pool)
        .await?;
        Ok(deliveries)
    }

    /// Every queue of every tenant, for the recorder's list of streams.
    pub async fn list_all_queue_partitions(&self) -> ApiResult<Vec<QueuePartitions>> {
        let rows = sqlx::query_as(
            "SELECT id, tenant_id, partition_count, retention_ms FROM message_topics",
        )
        .fetch_all(&self.pool)
        .await?;
        Ok(rows)
    }

    /// The queues of `ids` that exist.
    pub async fn queue_partitions_by_ids(&self, ids: &[Uuid]) -> ApiResult<Vec<QueuePartitions>> {
        let rows = sqlx::query_as(
            "SELECT id, tenant_id, partition_count, retention_ms FROM message_topics \
             WHERE id = ANY($1)",
        )
        .bind(ids)
        .fetch_all(&self.pool)
        .await?;
        Ok(rows)
    }
}

/// Inserts the records (each message at most once per call). A record already present keeps
/// its status, except that `scheduled` becomes `published` when the message is released; a
/// placeholder written by an earlier status change (see `change_record_statuses`) gets the
/// message's data. Records of a queue deleted meanwhile are skipped.
async fn insert_message_records(
    connection: &mut PgConnection,
    records: &[NewMessageRecord],
) -> Result<(), sqlx::Error> {
    if records.is_empty() {
        return Ok(());
    }
    macro_rules! column {
        ($field:ident) => {
            records.iter().map(|r| r.$field.clone()).collect::<Vec<_>>()
        };
    }
    sqlx::query(
        "INSERT INTO message_records (topic_id, tenant_id, message_id, partition_id, offset_value, \
             message_key, correlation_id, headers, payload, payload_encoding, payload_size, status, \
             trace_id, published_at, scheduled_at, expires_at, content_type, producer_id) \
         SELECT r.topic_id, r.tenant_id, r.message_id, r.partition_id, r.offset_value, \
             r.message_key, r.correlation_id, r.headers::jsonb, r.payload::jsonb, \
             r.payload_encoding, r.payload_size, r.status, r.trace_id, r.published_at, \
             r.scheduled_at, r.expires_at, r.content_type, r.producer_id \
         FROM UNNEST($1::uuid[], $2::uuid[], $3::text[], $4::int4[], $5::text[], $6::text[], \
             $7::text[], $8::text[], $9::text[], $10::text[], $11::int4[], $12::text[], $13::text[], \
             $14::timestamptz[], $15::timestamptz[], $16::timestamptz[], $17::text[], $18::text[]) \
           AS r(topic_id, tenant_id, message_id, partition_id, offset_value, message_key, \
             correlation_id, headers, payload, payload_encoding, payload_size, status, trace_id, \
             published_at, scheduled_at, expires_at, content_type, producer_id) \
         WHERE EXISTS (SELECT 1 FROM message_topics t WHERE t.id = r.topic_id) \
         ON CONFLICT (topic_id, message_id) DO UPDATE SET \
           offset_value = COALESCE(EXCLUDED.offset_value, message_records.offset_value), \
           content_type = COALESCE(message_records.content_type, EXCLUDED.content_type), \
           producer_id = COALESCE(message_records.producer_id, EXCLUDED.producer_id), \
           payload_encoding = CASE WHEN message_records.payload IS NULL \
                                   THEN EXCLUDED.payload_encoding \
                                   ELSE message_records.payload_encoding END, \
           payload = COALESCE(message_records.payload, EXCLUDED.payload), \
           headers = CASE WHEN message_records.payload IS NULL THEN EXCLUDED.headers \
                          ELSE message_records.headers END, \
           message_key = COALESCE(message_records.message_key, EXCLUDED.message_key), \
           correlation_id = COALESCE(message_records.correlation_id, EXCLUDED.correlation_id), \
           payload_size = GREATEST(message_records.payload_size, EXCLUDED.payload_size), \
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
    .bind(
        records
            .iter()
            .map(|r| r.payload_encoding.as_str())
            .collect::<Vec<_>>(),
    )
    .bind(column!(payload_bytes))
    .bind(records.iter().map(|r| r.status).collect::<Vec<_>>())
    .bind(column!(trace_id))
    .bind(column!(published_at))
    .bind(column!(scheduled_at))
    .bind(column!(expires_at))
    .bind(column!(content_type))
    .bind(column!(producer_id))
    .execute(connection)
    .await?;
    Ok(())
}

/// Moves records to a later status (each message at most once per call), by rank:
/// scheduled < published < failed < dead_letter < consumed < the final ones (`expired`,
/// `cancelled`, and `redriven`, which only a redrive sets); `expired` and `cancelled` only
/// apply to a message not yet delivered. A message without a record yet (its record is still
/// on its way) gets a placeholder holding the status, which the record fills in.
async fn change_record_statuses(
    connection: &mut PgConnection,
    changes: &[RecordStatusChange],
) -> Result<(), sqlx::Error> {
    if changes.is_empty() {
        return Ok(());
    }
    const RANK: &str = "CASE {} WHEN 'scheduled' THEN 0 WHEN 'published' THEN 1 \
        WHEN 'failed' THEN 2 WHEN 'dead_letter' THEN 3 WHEN 'consumed' THEN 4 ELSE 5 END";
    let rank = |column: &str| RANK.replace("{}", column);
    let sql = format!(
        "INSERT INTO message_records (topic_id, tenant_id, message_id, partition_id, status, \
             retry_count, published_at, consumed_at) \
         SELECT c.topic_id, c.tenant_id, c.message_id, c.partition_id, c.status, c.retries, now(), \
             CASE WHEN c.status = 'consumed' THEN c.at END \
         FROM UNNEST($1::uuid[], $2::uuid[], $3::text[], $4::int4[], $5::text[], $6::int4[], \
             $7::timestamptz[]) \
           AS c(topic_id, tenant_id, message_id, partition_id, status, retries, at) \
         WHERE EXISTS (SELECT 1 FROM message_topics t WHERE t.id = c.topic_id) \
         ON CONFLICT (topic_id, message_id) DO UPDATE SET \
           status = CASE WHEN {new} > {old} AND (EXCLUDED.status NOT IN ('expired', 'cancelled') \
                             OR message_records.status IN ('scheduled', 'published')) \
                         THEN EXCLUDED.status ELSE message_records.status END, \
           retry_count = GREATEST(message_records.retry_count, EXCLUDED.retry_count), \
           consumed_at = COALESCE(message_records.consumed_at, EXCLUDED.consumed_at), \
           updated_at = now()",
        new = rank("EXCLUDED.status"),
        old = rank("message_records.status"),
    );
    sqlx::query(&sql)
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
        .bind(changes.iter().map(|c| c.at).collect::<Vec<_>>())
        .execute(connection)
        .await?;
    Ok(())
}

/// Records delivery attempts, one row per journal event (a repeated event adds nothing);
/// attempts of a subscription deleted meanwhile are skipped.
async fn insert_consumption_records(
    connection: &mut PgConnection,
    records: &[NewConsumptionRecord],
) -> Result<(), sqlx::Error> {
    if records.is_empty() {
        return Ok(());
    }
    sqlx::query(
        "INSERT INTO consumption_records (tenant_id, topic_id, partition_id, journal_id, \
             subscription_id, message_id, attempt, status, processing_time_ms, error_message, \
             created_at, consumer_instance, offset_value, consumed_at, next_retry_at, \
             retry_count) \
         SELECT r.tenant_id, r.topic_id, r.partition_id, r.journal_id, r.subscription_id, \
             r.message_id, r.attempt, r.status, r.processing_ms, r.error, r.created_at, \
             r.consumer_instance, r.offset_value, r.created_at, r.next_retry_at, \
             GREATEST(r.attempt - 1, 0) \
         FROM UNNEST($1::uuid[], $2::uuid[], $3::int4[], $4::text[], $5::uuid[], $6::text[], \
             $7::int4[], $8::text[], $9::int4[], $10::text[], $11::timestamptz[], $12::text[], \
             $13::text[], $14::timestamptz[]) WITH ORDINALITY \
           AS r(tenant_id, topic_id, partition_id, journal_id, subscription_id, message_id, \
             attempt, status, processing_ms, error, created_at, consumer_instance, offset_value, \
             next_retry_at, position) \
         WHERE EXISTS (SELECT 1 FROM message_subscriptions s WHERE s.id = r.subscription_id) \
         ORDER BY r.position \
         ON CONFLICT (topic_id, partition_id, journal_id) DO NOTHING",
    )
    .bind(records.iter().map(|r| r.tenant_id).collect::<Vec<_>>())
    .bind(records.iter().map(|r| r.topic_id).collect::<Vec<_>>())
    .bind(records.iter().map(|r| r.partition).collect::<Vec<_>>())
    .bind(
        records
            .iter()
            .map(|r| r.journal_id.clone())
            .collect::<Vec<_>>(),
    )
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
    .bind(
        records
            .iter()
            .map(|r| r.consumer_instance.clone())
            .collect::<Vec<_>>(),
    )
    .bind(
        records
            .iter()
            .map(|r| r.offset_value.clone())
            .collect::<Vec<_>>(),
    )
    .bind(records.iter().map(|r| r.next_retry_at).collect::<Vec<_>>())
    .execute(&mut *connection)
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
    .execute(connection)
    .await?;
    Ok(())
}
