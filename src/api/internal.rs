//! `/internal/mq/*`: the service-to-service API (`X-Service-Token`).

use axum::extract::State;
use axum::http::{HeaderMap, StatusCode};
use axum::response::IntoResponse;
use axum::Json;
use serde::{Deserialize, Serialize};
use serde_json::{Map, Value};
use std::collections::BTreeMap;
use utoipa::{IntoParams, ToSchema};
use uuid::Uuid;

use super::extract::{ApiJson, ApiQuery};
use super::monitoring::{status_code, status_word, worker_states};
use crate::auth::ServiceCaller;
use crate::domain::message::{trace_id_from_traceparent, PublishContext};
use crate::error::{ApiError, ApiResult};
use crate::service::health::{self, HealthReport};
use crate::service::monitoring;
use crate::service::system_queues::{
    self, AUDIT_LOGS, NOTIFICATIONS, USER_EVENTS, USER_NOTIFICATIONS,
};
use crate::state::AppState;
use crate::workers::recorder::RecorderReport;
use crate::workers::scheduler::SchedulerReport;

/// The tenant of an internal call: body `tenantId` or header `X-Tenant-Id` (both given and
/// different, or neither: 400). The `tenantId` is removed from the body.
fn take_tenant(headers: &HeaderMap, body: &mut Map<String, Value>) -> ApiResult<Uuid> {
    let from_body = match body.remove("tenantId") {
        None | Some(Value::Null) => None,
        Some(Value::String(text)) => Some(text),
        Some(_) => {
            return Err(ApiError::validation(
                "tenantId must be a UUID string",
                vec!["tenantId".into()],
            ))
        }
    };
    let from_header = headers
        .get("x-tenant-id")
        .map(|value| value.to_str().unwrap_or_default().to_owned());
    let text = match (from_body, from_header) {
        (Some(body), Some(header)) if body != header => {
            return Err(ApiError::validation(
                "tenantId and X-Tenant-Id name different tenants",
                vec!["tenantId".into()],
            ))
        }
        (Some(tenant), _) | (None, Some(tenant)) => tenant,
        (None, None) => {
            return Err(ApiError::validation(
                "the tenant is required: body tenantId or header X-Tenant-Id",
                vec!["tenantId".into()],
            ))
        }
    };
    Uuid::parse_str(&text).map_err(|_| {
        ApiError::validation(
            format!("tenantId '{text}' is not a UUID"),
            vec!["tenantId".into()],
        )
    })
}

async fn publish_to(
    state: &AppState,
    caller: &ServiceCaller,
    headers: &HeaderMap,
    mut body: Map<String, Value>,
    queue: &str,
    event_field: &str,
) -> ApiResult<impl IntoResponse> {
    let tenant_id = take_tenant(headers, &mut body)?;
    let event = match body.get(event_field) {
        None | Some(Value::Null) => None,
        Some(Value::String(event)) => Some(event.clone()),
        Some(_) => {
            return Err(ApiError::validation(
                format!("{event_field} must be a string"),
                vec![event_field.to_owned()],
            ))
        }
    };
    let trace_id = headers
        .get("traceparent")
        .and_then(|v| v.to_str().ok())
        .and_then(trace_id_from_traceparent);
    tracing::debug!(
        service = caller.service_name.as_deref().unwrap_or("unnamed"),
        queue,
        "internal publish"
    );
    let context = PublishContext {
        now_ms: chrono::Utc::now().timestamp_millis(),
        trace_id,
        producer_id: Some(
            caller
                .service_name
                .clone()
                .unwrap_or_else(|| "unnamed-service".to_owned()),
        ),
    };
    let result = system_queues::publish_event(state, tenant_id, queue, body, event, &context)
        .await
        .map_err(ApiError::during_publish)?;
    Ok((StatusCode::CREATED, Json(result)))
}

pub async fn user_events(
    caller: ServiceCaller,
    State(state): State<AppState>,
    headers: HeaderMap,
    ApiJson(body): ApiJson<Map<String, Value>>,
) -> ApiResult<impl IntoResponse> {
    publish_to(&state, &caller, &headers, body, USER_EVENTS, "eventType").await
}

pub async fn user_notifications(
    caller: ServiceCaller,
    State(state): State<AppState>,
    headers: HeaderMap,
    ApiJson(body): ApiJson<Map<String, Value>>,
) -> ApiResult<impl IntoResponse> {
    publish_to(
        &state,
        &caller,
        &headers,
        body,
        USER_NOTIFICATIONS,
        "eventType",
    )
    .await
}

pub async fn audit_logs(
    caller: ServiceCaller,
    State(state): State<AppState>,
    headers: HeaderMap,
    ApiJson(body): ApiJson<Map<String, Value>>,
) -> ApiResult<impl IntoResponse> {
    publish_to(&state, &caller, &headers, body, AUDIT_LOGS, "action").await
}

pub async fn notifications(
    caller: ServiceCaller,
    State(state): State<AppState>,
    headers: HeaderMap,
    ApiJson(body): ApiJson<Map<String, Value>>,
) -> ApiResult<impl IntoResponse> {
    publish_to(&state, &caller, &headers, body, NOTIFICATIONS, "channel").await
}

#[derive(Deserialize, IntoParams)]
#[serde(rename_all = "camelCase")]
#[into_params(parameter_in = Query)]
pub struct TenantQuery {
    /// One tenant's queue; all tenants' when absent.
    tenant_id: Option<String>,
}

impl TenantQuery {
    /// The tenant asked for, or `None` for all tenants.
    fn tenant(self) -> ApiResult<Option<Uuid>> {
        match self.tenant_id.filter(|t| !t.is_empty()) {
            None => Ok(None),
            Some(text) => Uuid::parse_str(&text).map(Some).map_err(|_| {
                ApiError::validation(
                    format!("tenantId '{text}' is not a UUID"),
                    vec!["tenantId".into()],
                )
            }),
        }
    }
}

pub async fn audit_queue_status(
    _caller: ServiceCaller,
    State(state): State<AppState>,
    ApiQuery(query): ApiQuery<TenantQuery>,
) -> ApiResult<impl IntoResponse> {
    Ok(Json(
        system_queues::stats(&state, query.tenant()?, AUDIT_LOGS).await?,
    ))
}

pub async fn notification_queue(
    _caller: ServiceCaller,
    State(state): State<AppState>,
    ApiQuery(query): ApiQuery<TenantQuery>,
) -> ApiResult<impl IntoResponse> {
    Ok(Json(
        system_queues::stats(&state, query.tenant()?, NOTIFICATIONS).await?,
    ))
}

pub async fn metrics(
    _caller: ServiceCaller,
    State(state): State<AppState>,
) -> ApiResult<impl IntoResponse> {
    Ok(Json(monitoring::overview(&state, None).await?))
}

/// `GET /internal/mq/health-detailed`.
#[derive(Serialize, ToSchema)]
#[serde(rename_all = "camelCase")]
pub struct DetailedHealth {
    /// `ok` or `down` (503).
    status: &'static str,
    checks: HealthReport,
    workers: BTreeMap<&'static str, &'static str>,
    pools: Pools,
    record_writer: RecorderReport,
    scheduler: SchedulerReport,
    instance_id: String,
    version: &'static str,
    uptime_seconds: u64,
}

#[derive(Serialize, ToSchema)]
pub struct Pools {
    redis: PoolUsage,
    postgres: PoolUsage,
}

#[derive(Serialize, ToSchema)]
pub struct PoolUsage {
    open: u64,
    idle: u64,
    max: u64,
}

pub async fn health_detailed(
    _caller: ServiceCaller,
    State(state): State<AppState>,
) -> impl IntoResponse {
    let report = health::check(&state).await;
    let status = status_code(&report);
    let (redis_open, redis_idle) = state.broker.pool_usage();
    let (pg_open, pg_idle) = state.store.pool_usage();
    let body = DetailedHealth {
        status: status_word(&report),
        checks: report,
        workers: worker_states(&state),
        pools: Pools {
            redis: PoolUsage {
                open: redis_open as u64,
                idle: redis_idle as u64,
                max: state.config.redis_pool_size as u64,
            },
            postgres: PoolUsage {
                open: u64::from(pg_open),
                idle: pg_idle as u64,
                max: u64::from(state.config.database_max_connections),
            },
        },
        record_writer: state.recorder.report(),
        scheduler: state.scheduler.report(),
        instance_id: state.instance_id.clone(),
        version: env!("CARGO_PKG_VERSION"),
        uptime_seconds: state.started.elapsed().as_secs(),
    };
    (status, Json(body))
}
