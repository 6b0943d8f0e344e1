//! `message_topics`: queue configuration.

use chrono::{DateTime, Utc};
use serde_json::Value;
use sqlx::types::Json;
use uuid::Uuid;

use super::records::{delete_in_batches, lock_record_writers};
use super::Store;
use crate::domain::queue::{
    is_system_queue, Compression, MessageFormat, Queue, QueueListFilter, QueueStatus, TopicType,
};
use crate::error::{ApiError, ApiResult, ErrorCode};

#[derive(sqlx::FromRow)]
struct QueueRow {
    id: Uuid,
    tenant_id: Uuid,
    name: String,
    display_name: Option<String>,
    description: Option<String>,
    topic_type: String,
    partition_count: i32,
    replication_factor: i32,
    retention_ms: i64,
    max_length: i64,
    message_format: String,
    schema_definition: Option<Json<Value>>,
    compression_type: String,
    encrypted: bool,
    is_public: bool,
    allowed_producers: Vec<String>,
    allowed_consumers: Vec<String>,
    status: String,
    created_at: DateTime<Utc>,
    updated_at: DateTime<Utc>,
}

impl TryFrom<QueueRow> for Queue {
    type Error = ApiError;

    fn try_from(row: QueueRow) -> Result<Self, Self::Error> {
        let corrupt = |column: &str, value: &str| {
            ApiError::internal(format!(
                "message_topics.{column} holds unknown value '{value}'"
            ))
        };
        Ok(Queue {
            topic_type: TopicType::parse(&row.topic_type)
                .ok_or_else(|| corrupt("topic_type", &row.topic_type))?,
            message_format: MessageFormat::parse(&row.message_format)
                .ok_or_else(|| corrupt("message_format", &row.message_format))?,
            compression_type: Compression::parse(&row.compression_type)
                .ok_or_else(|| corrupt("compression_type", &row.compression_type))?,
            status: QueueStatus::parse(&row.status)
                .ok_or_else(|| corrupt("status", &row.status))?,
            system: is_system_queue(&row.name),
            id: row.id,
            tenant_id: row.tenant_id,
            name: row.name,
            display_name: row.display_name,
            description: row.description,
            partition_count: row.partition_count as u16,
            replication_factor: row.replication_factor as u16,
            retention_ms: row.retention_ms as u64,
            max_length: row.max_length as u64,
            schema_definition: row.schema_definition.map(|json| json.0),
            encrypted: row.encrypted,
            is_public: row.is_public,
            allowed_producers: row.allowed_producers,
            allowed_consumers: row.allowed_consumers,
            created_at: row.created_at,
            updated_at: row.updated_at,
        })
    }
}

const COLUMNS: &str = "id, tenant_id, name, display_name, description, topic_type, \
    partition_count, replication_factor, retention_ms, max_length, message_format, \
    schema_definition, compression_type, encrypted, is_public, allowed_producers, \
    allowed_consumers, status, created_at, updated_at";

/// Serializes the quota checks of one tenant (count, then insert) within a transaction.
pub(super) async fn lock_tenant(
    connection: &mut sqlx::PgConnection,
    tenant_id: Uuid,
) -> Result<(), sqlx::Error> {
    sqlx::query("SELECT pg_advisory_xact_lock(hashtextextended($1::text, 0))")
        .bind(tenant_id)
        .execute(connection)
        .await?;
    Ok(())
}

impl Store {
    /// Inserts the queue; with `max_queues`, only while the tenant has fewer queues (checked
    /// under a per-tenant lock, so concurrent creates cannot pass it together).
    pub async fn insert_queue(&self, queue: &Queue, max_queues: Option<u64>) -> ApiResult<Queue> {
        let mut tx = self.pool.begin().await?;
        if let Some(max) = max_queues {
            lock_tenant(&mut tx, queue.tenant_id).await?;
            let count: i64 =
                sqlx::query_scalar("SELECT count(*) FROM message_topics WHERE tenant_id = $1")
                    .bind(queue.tenant_id)
                    .fetch_one(&mut *tx)
                    .await?;
            if count as u64 >= max {
                return Err(ApiError::quota_exceeded(
                    "TENANT_MAX_QUEUES",
                    max,
                    "the tenant has as many queues as it may",
                ));
            }
        }
        let sql = format!(
            "INSERT INTO message_topics ({COLUMNS}) VALUES \
             ($1, $2, $3, $4, $5, $6, $7, $8, $9, $10, $11, $12, $13, $14, $15, $16, $17, $18, $19, $20) \
             RETURNING {COLUMNS}"
        );
        let row: QueueRow = sqlx::query_as(&sql)
            .bind(queue.id)
            .bind(queue.tenant_id)
            .bind(&queue.name)
            .bind(&queue.display_name)
            .bind(&queue.description)
            .bind(queue.topic_type.as_str())
            .bind(i32::from(queue.partition_count))
            .bind(i32::from(queue.replication_factor))
            .bind(queue.retention_ms as i64)
            .bind(queue.max_length as i64)
            .bind(queue.message_format.as_str())
            .bind(queue.schema_definition.as_ref().map(Json))
            .bind(queue.compression_type.as_str())
            .bind(queue.encrypted)
            .bind(queue.is_public)
            .bind(&queue.allowed_producers)
            .bind(&queue.allowed_consumers)
            .bind(queue.status.as_str())
            .bind(queue.created_at)
            .bind(queue.updated_at)
            .fetch_one(&mut *tx)
            .await
            .map_err(|error| {
                if is_unique_violation(&error, "message_topics_tenant_name_key") {
                    ApiError::new(
                        ErrorCode::QueueExists,
                        format!("queue '{}' already exists", queue.name),
                    )
                } else {
                    error.into()
                }
            })?;
        tx.commit().await?;
        row.try_into()
    }

    pub async fn find_queue(&self, tenant_id: Uuid, name: &str) -> ApiResult<Option<Queue>> {
        let sql =
            format!("SELECT {COLUMNS} FROM message_topics WHERE tenant_id = $1 AND name = $2");
        let row: Option<QueueRow> = sqlx::query_as(&sql)
            .bind(tenant_id)
            .bind(name)
            .fetch_optional(&self.pool)
            .await?;
        row.map(Queue::try_from).transpose()
    }

    /// One page of the tenant's queues, by name, and the total that match.
    pub async fn list_queues(
        &self,
        tenant_id: Uuid,
        filter: &QueueListFilter,
    ) -> ApiResult<(Vec<Queue>, i64)> {
        let prefix_pattern = filter.name_prefix.as_deref().map(like_prefix);
        let status = filter.status.map(QueueStatus::as_str);
        let condition = "tenant_id = $1 AND ($2::text IS NULL OR status = $2) \
                         AND ($3::text IS NULL OR name LIKE $3)";
        let sql = format!(
            "SELECT {COLUMNS} FROM message_topics WHERE {condition} ORDER BY name LIMIT $4 OFFSET $5"
        );
        let rows: Vec<QueueRow> = sqlx::query_as(&sql)
            .bind(tenant_id)
            .bind(status)
            .bind(&prefix_pattern)
            .bind(filter.limit)
            .bind(filter.offset)
            .fetch_all(&self.pool)
            .await?;
        let total: i64 = sqlx::query_scalar(&format!(
            "SELECT count(*) FROM message_topics WHERE {condition}"
        ))
        .bind(tenant_id)
        .bind(status)
        .bind(&prefix_pattern)
        .fetch_one(&self.pool)
        .await?;
        let queues = rows
            .into_iter()
            .map(Queue::try_from)
            .collect::<ApiResult<_>>()?;
        Ok((queues, total))
    }

    /// Read-modify-write of one queue under a row lock, so concurrent partial updates do not
    /// overwrite each other's fields. `change` decides the new state (and may refuse it).
    pub async fn update_queue(
        &self,
        tenant_id: Uuid,
        name: &str,
        change: impl FnOnce(&Queue) -> ApiResult<Queue>,
    ) -> ApiResult<Option<Queue>> {
        let mut tx = self.pool.begin().await?;
        let sql = format!(
            "SELECT {COLUMNS} FROM message_topics WHERE tenant_id = $1 AND name = $2 FOR UPDATE"
        );
        let row: Option<QueueRow> = sqlx::query_as(&sql)
            .bind(tenant_id)
            .bind(name)
            .fetch_optional(&mut *tx)
            .await?;
        let Some(current) = row.map(Queue::try_from).transpose()? else {
            return Ok(None);
        };
        let next = change(&current)?;
        let sql = format!(
            "UPDATE message_topics SET display_name = $2, description = $3, retention_ms = $4, \
             max_length = $5, schema_definition = $6, compression_type = $7, is_public = $8, \
             allowed_producers = $9, allowed_consumers = $10, status = $11, updated_at = $12 \
             WHERE id = $1 RETURNING {COLUMNS}"
        );
        let row: QueueRow = sqlx::query_as(&sql)
            .bind(current.id)
            .bind(&next.display_name)
            .bind(&next.description)
            .bind(next.retention_ms as i64)
            .bind(next.max_length as i64)
            .bind(next.schema_definition.as_ref().map(Json))
            .bind(next.compression_type.as_str())
            .bind(next.is_public)
            .bind(&next.allowed_producers)
            .bind(&next.allowed_consumers)
            .bind(next.status.as_str())
            .bind(next.updated_at)
            .fetch_one(&mut *tx)
            .await?;
        tx.commit().await?;
        row.try_into().map(Some)
    }

    /// Deletes the queue; its subscriptions and records go with it. The records go first, a
    /// bounded batch per transaction under the record writers' lock (a cascade of a large
    /// queue would hold it, and every recorder, for as long as it takes); the cascade then
    /// removes the rest.
    pub async fn delete_queue(&self, queue_id: Uuid) -> ApiResult<bool> {
        for table in [
            "consumption_records",
            "record_quarantine",
            "message_records",
        ] {
            delete_in_batches(&self.pool, table, "topic_id", queue_id).await?;
        }
        let mut tx = self.pool.begin().await?;
        lock_record_writers(&mut tx).await?;
        let result = sqlx::query("DELETE FROM message_topics WHERE id = $1")
            .bind(queue_id)
            .execute(&mut *tx)
            .await?;
        tx.commit().await?;
        Ok(result.rows_affected() > 0)
    }

    /// Every queue of one tenant, or of all tenants (`None`), by tenant and name.
    pub async fn all_queues(&self, tenant_id: Option<Uuid>) -> ApiResult<Vec<Queue>> {
        let sql = format!(
            "SELECT {COLUMNS} FROM message_topics WHERE ($1::uuid IS NULL OR tenant_id = $1) \
             ORDER BY tenant_id, name"
        );
        let rows: Vec<QueueRow> = sqlx::query_as(&sql)
            .bind(tenant_id)
            .fetch_all(&self.pool)
            .await?;
        rows.into_iter().map(Queue::try_from).collect()
    }

    /// The ids of one tenant's own queues (its system queues aside).
    pub async fn own_queue_ids(&self, tenant_id: Uuid) -> ApiResult<Vec<Uuid>> {
        Ok(sqlx::query_scalar(
            "SELECT id FROM message_topics WHERE tenant_id = $1 AND name <> ALL($2)",
        )
        .bind(tenant_id)
        .bind(&crate::domain::queue::SYSTEM_QUEUES[..])
        .fetch_all(&self.pool)
        .await?)
    }

    /// Queues named `name` of one tenant or of all (the system queues of the internal API).
    pub async fn queues_named(&self, tenant_id: Option<Uuid>, name: &str) -> ApiResult<Vec<Queue>> {
        let sql = format!(
            "SELECT {COLUMNS} FROM message_topics WHERE ($1::uuid IS NULL OR tenant_id = $1) \
             AND name = $2"
        );
        let rows: Vec<QueueRow> = sqlx::query_as(&sql)
            .bind(tenant_id)
            .bind(name)
            .fetch_all(&self.pool)
            .await?;
        rows.into_iter().map(Queue::try_from).collect()
    }

    /// The names of the queues `ids` (those that still exist).
    pub async fn queue_names(&self, ids: &[Uuid]) -> ApiResult<Vec<(Uuid, String)>> {
        let names = sqlx::query_as("SELECT id, name FROM message_topics WHERE id = ANY($1)")
            .bind(ids)
            .fetch_all(&self.pool)
            .await?;
        Ok(names)
    }

    pub async fn count_subscriptions(&self, queue_id: Uuid) -> ApiResult<i64> {
        let count =
            sqlx::query_scalar("SELECT count(*) FROM message_subscriptions WHERE topic_id = $1")
                .bind(queue_id)
                .fetch_one(&self.pool)
                .await?;
        Ok(count)
    }
}

/// A LIKE pattern matching names that start with `prefix` literally.
fn like_prefix(prefix: &str) -> String {
    let mut pattern = String::with_capacity(prefix.len() + 1);
    for c in prefix.chars() {
        if matches!(c, '%' | '_' | '\\') {
            pattern.push('\\');
        }
        pattern.push(c);
    }
    pattern.push('%');
    pattern
}

fn is_unique_violation(error: &sqlx::Error, constraint: &str) -> bool {
    matches!(error, sqlx::Error::Database(db) if db.is_unique_violation() && db.constraint() == Some(constraint))
}

#[cfg(test)]
mod tests {
    #[test]
    fn like_prefix_escapes_wildcards() {
        assert_eq!(super::like_prefix("a_b%"), "a\\_b\\%%");
    }
}
