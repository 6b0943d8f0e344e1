//! The one error type of the service and its rendering as the contract's error body
//! `{code, message, details, retryAfter}`.
//!
//! Storage layers return it too, so an outage of Redis or PostgreSQL becomes a 503 with
//! `retryAfter` wherever it happens; the handler of a publish or consume route relabels that
//! 503 with the code the contract pins for its route family.

use axum::http::{header, HeaderValue, StatusCode};
use axum::response::{IntoResponse, Response};
use serde_json::{json, Map, Value};

pub type ApiResult<T> = Result<T, ApiError>;

/// Seconds a client is asked to wait after a dependency outage.
const OUTAGE_RETRY_AFTER_SECS: u64 = 2;

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ErrorCode {
    Validation,
    Unauthorized,
    Forbidden,
    QueueNotFound,
    SubscriptionNotFound,
    MessageNotFound,
    NotFound,
    QueueExists,
    SubscriptionExists,
    QueueArchived,
    MessageNotCancellable,
    /// A redrive of a message that is not a dead letter, or was redriven already.
    MessageNotRedrivable,
    SubscriptionPaused,
    MessageTooLarge,
    SchemaViolation,
    /// A per-tenant quota (queues, subscriptions) is used up. Not in API.md's table;
    /// documented in docs/API-NOTES.md.
    QuotaExceeded,
    QueueFull,
    RateLimited,
    PublishFailed,
    ConsumerError,
    /// Storage unavailable on a route that is neither publishing nor consuming (queue
    /// management, lookups). Not in API.md's table; documented in docs/API-NOTES.md.
    ServiceUnavailable,
    Internal,
}

impl ErrorCode {
    pub fn as_str(self) -> &'static str {
        match self {
            ErrorCode::Validation => "MQ_VALIDATION_ERROR",
            ErrorCode::Unauthorized => "MQ_UNAUTHORIZED",
            ErrorCode::Forbidden => "MQ_FORBIDDEN",
            ErrorCode::QueueNotFound => "MQ_QUEUE_NOT_FOUND",
            ErrorCode::SubscriptionNotFound => "MQ_SUBSCRIPTION_NOT_FOUND",
            ErrorCode::MessageNotFound => "MQ_MESSAGE_NOT_FOUND",
            ErrorCode::NotFound => "MQ_NOT_FOUND",
            ErrorCode::QueueExists => "MQ_QUEUE_EXISTS",
            ErrorCode::SubscriptionExists => "MQ_SUBSCRIPTION_EXISTS",
            ErrorCode::QueueArchived => "MQ_QUEUE_ARCHIVED",
            ErrorCode::MessageNotCancellable => "MQ_MESSAGE_NOT_CANCELLABLE",
            ErrorCode::MessageNotRedrivable => "MQ_MESSAGE_NOT_REDRIVABLE",
            ErrorCode::SubscriptionPaused => "MQ_SUBSCRIPTION_PAUSED",
            ErrorCode::MessageTooLarge => "MQ_MESSAGE_TOO_LARGE",
            ErrorCode::SchemaViolation => "MQ_SCHEMA_VIOLATION",
            ErrorCode::QuotaExceeded => "MQ_QUOTA_EXCEEDED",
            ErrorCode::QueueFull => "MQ_QUEUE_FULL",
            ErrorCode::RateLimited => "MQ_RATE_LIMITED",
            ErrorCode::PublishFailed => "MQ_PUBLISH_FAILED",
            ErrorCode::ConsumerError => "MQ_CONSUMER_ERROR",
            ErrorCode::ServiceUnavailable => "MQ_SERVICE_UNAVAILABLE",
            ErrorCode::Internal => "MQ_INTERNAL_ERROR",
        }
    }

    pub fn status(self) -> StatusCode {
        match self {
            ErrorCode::Validation => StatusCode::BAD_REQUEST,
            ErrorCode::Unauthorized => StatusCode::UNAUTHORIZED,
            ErrorCode::Forbidden | ErrorCode::QuotaExceeded => StatusCode::FORBIDDEN,
            ErrorCode::QueueNotFound
            | ErrorCode::SubscriptionNotFound
            | ErrorCode::MessageNotFound
            | ErrorCode::NotFound => StatusCode::NOT_FOUND,
            ErrorCode::QueueExists
            | ErrorCode::SubscriptionExists
            | ErrorCode::QueueArchived
            | ErrorCode::MessageNotCancellable
            | ErrorCode::MessageNotRedrivable
            | ErrorCode::SubscriptionPaused => StatusCode::CONFLICT,
            ErrorCode::MessageTooLarge => StatusCode::PAYLOAD_TOO_LARGE,
            ErrorCode::SchemaViolation => StatusCode::UNPROCESSABLE_ENTITY,
            ErrorCode::QueueFull | ErrorCode::RateLimited => StatusCode::TOO_MANY_REQUESTS,
            ErrorCode::PublishFailed | ErrorCode::ConsumerError | ErrorCode::ServiceUnavailable => {
                StatusCode::SERVICE_UNAVAILABLE
            }
            ErrorCode::Internal => StatusCode::INTERNAL_SERVER_ERROR,
        }
    }
}

#[derive(Debug, Clone)]
pub struct ApiError {
    pub code: ErrorCode,
    pub message: String,
    pub details: Map<String, Value>,
    pub retry_after_secs: Option<u64>,
}

impl std::fmt::Display for ApiError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{}: {}", self.code.as_str(), self.message)
    }
}

impl std::error::Error for ApiError {}

impl ApiError {
    pub fn new(code: ErrorCode, message: impl Into<String>) -> Self {
        ApiError {
            code,
            message: message.into(),
            details: Map::new(),
            retry_after_secs: None,
        }
    }

    /// A 400 naming the offending fields in `details.fields`.
    pub fn validation(message: impl Into<String>, fields: Vec<String>) -> Self {
        ApiError::new(ErrorCode::Validation, message).with_detail("fields", json!(fields))
    }

    pub fn unauthorized(message: impl Into<String>) -> Self {
        ApiError::new(ErrorCode::Unauthorized, message)
    }

    /// A 403 naming the quota (its configuration variable) and its limit.
    pub fn quota_exceeded(quota: &'static str, limit: u64, what: &str) -> Self {
        ApiError::new(
            ErrorCode::QuotaExceeded,
            format!("{what}: the limit is {limit} ({quota})"),
        )
        .with_detail("quota", json!(quota))
        .with_detail("limit", json!(limit))
    }

    pub fn queue_not_found(name: &str) -> Self {
        ApiError::new(
            ErrorCode::QueueNotFound,
            format!("queue '{name}' not found"),
        )
    }

    pub fn route_not_found(method: &str, path: &str) -> Self {
        ApiError::new(ErrorCode::NotFound, format!("no route for {method} {path}"))
    }

    /// A dependency could not be reached; the caller may retry shortly.
    pub fn unavailable(dependency: &str) -> Self {
        ApiError::new(
            ErrorCode::ServiceUnavailable,
            format!("{dependency} is unavailable, try again shortly"),
        )
        .with_retry_after(OUTAGE_RETRY_AFTER_SECS)
    }

    /// Logs the cause and answers a bare 500 that leaks nothing.
    pub fn internal(cause: impl std::fmt::Display) -> Self {
        tracing::error!(error = %cause, "internal error");
        ApiError::new(ErrorCode::Internal, "internal error")
    }

    pub fn with_detail(mut self, key: &str, value: Value) -> Self {
        self.details.insert(key.to_owned(), value);
        self
    }

    pub fn with_retry_after(mut self, seconds: u64) -> Self {
        self.retry_after_secs = Some(seconds.max(1));
        self
    }

    /// On a publish route a storage outage is `MQ_PUBLISH_FAILED`.
    pub fn during_publish(mut self) -> Self {
        if self.code == ErrorCode::ServiceUnavailable {
            self.code = ErrorCode::PublishFailed;
        }
        self
    }

    /// On a consuming route a storage outage is `MQ_CONSUMER_ERROR`.
    pub fn during_consume(mut self) -> Self {
        if self.code == ErrorCode::ServiceUnavailable {
            self.code = ErrorCode::ConsumerError;
        }
        self
    }
}

impl IntoResponse for ApiError {
    fn into_response(self) -> Response {
        let mut body = json!({
            "code": self.code.as_str(),
            "message": self.message,
            "details": Value::Object(self.details),
        });
        if let Some(seconds) = self.retry_after_secs {
            body["retryAfter"] = json!(seconds);
        }
        let mut response = (self.code.status(), axum::Json(body)).into_response();
        if let Some(seconds) = self.retry_after_secs {
            response
                .headers_mut()
                .insert(header::RETRY_AFTER, HeaderValue::from(seconds));
        }
        response
    }
}

impl From<sqlx::Error> for ApiError {
    fn from(error: sqlx::Error) -> Self {
        match &error {
            sqlx::Error::PoolTimedOut
            | sqlx::Error::PoolClosed
            | sqlx::Error::Io(_)
            | sqlx::Error::Tls(_)
            | sqlx::Error::WorkerCrashed => {
                tracing::warn!(error = %error, "postgres unavailable");
                ApiError::unavailable("PostgreSQL")
            }
            // Only ever a race with a deletion (a batch naming a queue or subscription that
            // was just deleted); callers retry, and the retry skips the deleted rows.
            sqlx::Error::Database(db) if db.is_foreign_key_violation() => {
                tracing::warn!(error = %error, "write raced a deletion");
                ApiError::new(ErrorCode::Internal, "internal error")
            }
            _ => ApiError::internal(format!("postgres: {error}")),
        }
    }
}

impl From<deadpool_redis::redis::RedisError> for ApiError {
    fn from(error: deadpool_redis::redis::RedisError) -> Self {
        use deadpool_redis::redis::ErrorKind;
        if error.is_io_error()
            || error.is_connection_dropped()
            || error.is_connection_refusal()
            || error.is_timeout()
            || matches!(
                error.kind(),
                // A cluster between a master's loss and its replica's promotion, a write
                // that reached a replica which was a master a moment ago, or slots still
                // moving when the retries ran out.
                ErrorKind::BusyLoadingError
                    | ErrorKind::Moved
                    | ErrorKind::Ask
                    | ErrorKind::TryAgain
                    | ErrorKind::ClusterDown
                    | ErrorKind::MasterDown
                    | ErrorKind::ReadOnly
                    | ErrorKind::ClusterConnectionNotFound
            )
        {
            tracing::warn!(error = %error, "redis unavailable");
            ApiError::unavailable("Redis")
        } else {
            ApiError::internal(format!("redis: {error}"))
        }
    }
}

impl From<deadpool_redis::PoolError> for ApiError {
    fn from(error: deadpool_redis::PoolError) -> Self {
        tracing::warn!(error = %error, "redis pool unavailable");
        ApiError::unavailable("Redis")
    }
}
