//! Health, status and the Prometheus scrape endpoint (no credentials).

use axum::extract::State;
use axum::http::{header, StatusCode};
use axum::response::IntoResponse;
use axum::Json;
use chrono::{DateTime, Utc};
use serde::Serialize;
use std::collections::BTreeMap;
use utoipa::ToSchema;

use crate::auth::Tenant;
use crate::error::ApiError;
use crate::service::health::{self, HealthReport};
use crate::service::monitoring::{self, ConsumerMetrics, TopicMetrics};
use crate::state::AppState;
use crate::workers::recorder::RecorderReport;
use crate::workers::scheduler::SchedulerReport;

const VERSION: &str = env!("CARGO_PKG_VERSION");

/// `GET /health`. While stopping, only `status` and `version` are present.
#[derive(Serialize, ToSchema)]
#[serde(rename_all = "camelCase")]
pub struct HealthBody {
    /// `ok`, `down` (a dependency is down: 503) or `stopping` (503).
    #[schema(example = "ok")]
    status: &'static str,
    #[serde(skip_serializing_if = "Option::is_none")]
    checks: Option<HealthReport>,
    #[serde(skip_serializing_if = "Option::is_none")]
    record_writer: Option<RecorderReport>,
    version: &'static str,
    #[serde(skip_serializing_if = "Option::is_none")]
    uptime_seconds: Option<u64>,
}

pub fn status_word(report: &HealthReport) -> &'static str {
    if report.all_up() {
        "ok"
    } else {
        "down"
    }
}

pub fn status_code(report: &HealthReport) -> StatusCode {
    if report.all_up() {
        StatusCode::OK
    } else {
        StatusCode::SERVICE_UNAVAILABLE
    }
}

pub async fn health(State(state): State<AppState>) -> impl IntoResponse {
    if state.stopping.is_cancelled() {
        // At once, without probing the dependencies: a load balancer should look elsewhere.
        let body = HealthBody {
            status: "stopping",
            checks: None,
            record_writer: None,
            version: VERSION,
            uptime_seconds: None,
        };
        return (StatusCode::SERVICE_UNAVAILABLE, Json(body));
    }
    let report = health::check(&state).await;
    let status = status_code(&report);
    let body = HealthBody {
        status: status_word(&report),
        checks: Some(report),
        record_writer: Some(state.recorder.report()),
        version: VERSION,
        uptime_seconds: Some(state.started.elapsed().as_secs()),
    };
    (status, Json(body))
}

/// `GET /status`.
#[derive(Serialize, ToSchema)]
#[serde(rename_all = "camelCase")]
pub struct StatusBody {
    #[schema(example = "message-queue-service")]
    service: &'static str,
    version: &'static str,
    started_at: DateTime<Utc>,
    uptime_seconds: u64,
    /// Each background worker's state (`running` or `stopped`).
    workers: BTreeMap<&'static str, &'static str>,
    record_writer: RecorderReport,
    scheduler: SchedulerReport,
    limits: Limits,
}

/// The limits and switches this instance runs with (see docs/API.md, Configuration).
#[derive(Serialize, ToSchema)]
#[serde(rename_all = "camelCase")]
pub struct Limits {
    max_message_size: usize,
    max_request_bytes: usize,
    max_batch_size: usize,
    max_queue_length: u64,
    max_delay_ms: u64,
    dedup_window_ms: u64,
    default_ttl_seconds: u64,
    consumer_timeout_ms: u64,
    message_batch_size: usize,
    max_concurrent_consumers: usize,
    processing_timeout_ms: u64,
    encryption_enabled: bool,
    metrics_enabled: bool,
    tenant_rate_limit_rps: u64,
    tenant_rate_limit_bytes_per_sec: u64,
    webhook_tenant_concurrency: usize,
    retention_interval_ms: u64,
    record_retention_interval_ms: u64,
    tenant_max_queues: u64,
    tenant_max_bytes: u64,
    tenant_max_subscriptions: u64,
    queue_max_subscriptions: u64,
    metrics_gauge_interval_ms: u64,
    webhook_proxy: bool,
    audit_publishes: bool,
    dev_mode: bool,
}

pub fn worker_states(state: &AppState) -> BTreeMap<&'static str, &'static str> {
    state
        .workers
        .states()
        .into_iter()
        .map(|(name, worker)| (name, worker.as_str()))
        .collect()
}

pub async fn status(State(state): State<AppState>) -> Json<StatusBody> {
    let config = &state.config;
    Json(StatusBody {
        service: "message-queue-service",
        version: VERSION,
        started_at: state.started_at,
        uptime_seconds: state.started.elapsed().as_secs(),
        workers: worker_states(&state),
        record_writer: state.recorder.report(),
        scheduler: state.scheduler.report(),
        limits: Limits {
            max_message_size: config.max_message_size,
            max_request_bytes: config.max_request_bytes,
            max_batch_size: config.max_batch_size,
            max_queue_length: config.max_queue_length,
            max_delay_ms: config.max_delay_ms,
            dedup_window_ms: config.dedup_window_ms,
            default_ttl_seconds: config.default_ttl_secs,
            consumer_timeout_ms: config.consumer_timeout_ms,
            message_batch_size: config.message_batch_size,
            max_concurrent_consumers: config.max_concurrent_consumers,
            processing_timeout_ms: config.processing_timeout_ms,
            encryption_enabled: config.encryption.is_some(),
            metrics_enabled: config.metrics_enabled,
            tenant_rate_limit_rps: config.tenant_publish_rps,
            tenant_rate_limit_bytes_per_sec: config.tenant_publish_bytes_per_sec,
            webhook_tenant_concurrency: config.webhook_tenant_concurrency,
            retention_interval_ms: config.retention_interval_ms,
            record_retention_interval_ms: config.record_retention_interval_ms,
            tenant_max_queues: config.tenant_max_queues,
            tenant_max_bytes: config.tenant_max_bytes,
            tenant_max_subscriptions: config.tenant_max_subscriptions,
            queue_max_subscriptions: config.queue_max_subscriptions,
            metrics_gauge_interval_ms: config.metrics_gauge_interval_ms,
            webhook_proxy: config.webhook_proxy_url.is_some(),
            audit_publishes: config.audit_publishes,
            dev_mode: config.dev_mode,
        },
    })
}

pub async fn prometheus(State(state): State<AppState>) -> Result<impl IntoResponse, ApiError> {
    if !state.config.metrics_enabled {
        return Err(ApiError::route_not_found("GET", "/metrics"));
    }
    monitoring::refresh_gauges_when_stale(&state).await;
    Ok((
        [(
            header::CONTENT_TYPE,
            "text/plain; version=0.0.4; charset=utf-8",
        )],
        state.metrics.render(),
    ))
}

pub async fn tenant_metrics(
    tenant: Tenant,
    State(state): State<AppState>,
) -> Result<impl IntoResponse, ApiError> {
    Ok(Json(
        monitoring::overview(&state, Some(tenant.tenant_id)).await?,
    ))
}

pub async fn topic_metrics(
    tenant: Tenant,
    State(state): State<AppState>,
) -> Result<impl IntoResponse, ApiError> {
    Ok(Json(TopicsBody {
        topics: monitoring::topics(&state, tenant.tenant_id).await?,
    }))
}

pub async fn consumer_metrics(
    tenant: Tenant,
    State(state): State<AppState>,
) -> Result<impl IntoResponse, ApiError> {
    Ok(Json(ConsumersBody {
        consumers: monitoring::consumers(&state, tenant.tenant_id).await?,
    }))
}

#[derive(Serialize, ToSchema)]
pub struct TopicsBody {
    topics: Vec<TopicMetrics>,
}

#[derive(Serialize, ToSchema)]
pub struct ConsumersBody {
    consumers: Vec<ConsumerMetrics>,
}
