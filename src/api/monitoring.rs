//! Health, status and the Prometheus scrape endpoint (no credentials).

use axum::extract::State;
use axum::http::{header, StatusCode};
use axum::response::IntoResponse;
use axum::Json;
use serde_json::{json, Value};

use crate::auth::Tenant;
use crate::error::ApiError;
use crate::service::{health, monitoring};
use crate::state::AppState;

const VERSION: &str = env!("CARGO_PKG_VERSION");

pub async fn health(State(state): State<AppState>) -> impl IntoResponse {
    if state.stopping.is_cancelled() {
        // At once, without probing the dependencies: a load balancer should look elsewhere.
        let body = json!({"status": "stopping", "version": VERSION});
        return (StatusCode::SERVICE_UNAVAILABLE, Json(body));
    }
    let report = health::check(&state).await;
    let status = if report.all_up() {
        StatusCode::OK
    } else {
        StatusCode::SERVICE_UNAVAILABLE
    };
    let body = json!({
        "status": if report.all_up() { "ok" } else { "down" },
        "checks": report,
        "recordWriter": state.recorder.report(),
        "version": VERSION,
        "uptimeSeconds": state.started.elapsed().as_secs(),
    });
    (status, Json(body))
}

pub async fn status(State(state): State<AppState>) -> Json<Value> {
    let config = &state.config;
    let workers: serde_json::Map<String, Value> = state
        .workers
        .states()
        .into_iter()
        .map(|(name, worker)| (name.to_owned(), json!(worker.as_str())))
        .collect();
    Json(json!({
        "service": "message-queue-service",
        "version": VERSION,
        "startedAt": state.started_at,
        "uptimeSeconds": state.started.elapsed().as_secs(),
        "workers": workers,
        "recordWriter": state.recorder.report(),
        "scheduler": state.scheduler.report(),
        "limits": {
            "maxMessageSize": config.max_message_size,
            "maxRequestBytes": config.max_request_bytes,
            "maxBatchSize": config.max_batch_size,
            "maxQueueLength": config.max_queue_length,
            "maxDelayMs": config.max_delay_ms,
            "dedupWindowMs": config.dedup_window_ms,
            "defaultTtlSeconds": config.default_ttl_secs,
            "consumerTimeoutMs": config.consumer_timeout_ms,
            "messageBatchSize": config.message_batch_size,
            "maxConcurrentConsumers": config.max_concurrent_consumers,
            "processingTimeoutMs": config.processing_timeout_ms,
            "encryptionEnabled": config.encryption.is_some(),
            "metricsEnabled": config.metrics_enabled,
            "tenantRateLimitRps": config.tenant_publish_rps,
            "tenantRateLimitBytesPerSec": config.tenant_publish_bytes_per_sec,
            "webhookTenantConcurrency": config.webhook_tenant_concurrency,
            "retentionIntervalMs": config.retention_interval_ms,
            "recordRetentionIntervalMs": config.record_retention_interval_ms,
            "tenantMaxQueues": config.tenant_max_queues,
            "tenantMaxBytes": config.tenant_max_bytes,
            "tenantMaxSubscriptions": config.tenant_max_subscriptions,
            "queueMaxSubscriptions": config.queue_max_subscriptions,
            "metricsGaugeIntervalMs": config.metrics_gauge_interval_ms,
            "webhookProxy": config.webhook_proxy_url.is_some(),
            "auditPublishes": config.audit_publishes,
            "devMode": config.dev_mode,
        },
    }))
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
    Ok(Json(
        json!({ "topics": monitoring::topics(&state, tenant.tenant_id).await? }),
    ))
}

pub async fn consumer_metrics(
    tenant: Tenant,
    State(state): State<AppState>,
) -> Result<impl IntoResponse, ApiError> {
    Ok(Json(
        json!({ "consumers": monitoring::consumers(&state, tenant.tenant_id).await? }),
    ))
}
