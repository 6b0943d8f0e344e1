//! `/api/v1/mq/subscriptions`: subscription management and HTTP pull consumption.

use axum::extract::{Path, State};
use axum::http::StatusCode;
use axum::response::IntoResponse;
use axum::Json;
use serde::Serialize;
use utoipa::ToSchema;

use super::extract::{ApiJson, ApiQuery};
use crate::auth::Tenant;
use crate::domain::subscription::{
    CreateSubscriptionRequest, SubscriptionStatus, UpdateSubscriptionRequest,
};
use crate::error::ApiResult;
use crate::service::consume::{self, AckRequest, PullRequest, PulledMessage};
use crate::service::subscriptions::{self, SubscriptionListQuery};
use crate::state::AppState;

pub async fn create(
    tenant: Tenant,
    State(state): State<AppState>,
    ApiJson(request): ApiJson<CreateSubscriptionRequest>,
) -> ApiResult<impl IntoResponse> {
    let subscription = subscriptions::create(&state, &tenant, request).await?;
    Ok((StatusCode::CREATED, Json(subscription)))
}

pub async fn list(
    tenant: Tenant,
    State(state): State<AppState>,
    ApiQuery(query): ApiQuery<SubscriptionListQuery>,
) -> ApiResult<impl IntoResponse> {
    Ok(Json(
        subscriptions::list(&state, &tenant, query.validate()?).await?,
    ))
}

pub async fn get(
    tenant: Tenant,
    State(state): State<AppState>,
    Path(id): Path<String>,
) -> ApiResult<impl IntoResponse> {
    Ok(Json(
        subscriptions::get_with_stats(&state, &tenant, &id).await?,
    ))
}

pub async fn update(
    tenant: Tenant,
    State(state): State<AppState>,
    Path(id): Path<String>,
    ApiJson(request): ApiJson<UpdateSubscriptionRequest>,
) -> ApiResult<impl IntoResponse> {
    Ok(Json(
        subscriptions::update(&state, &tenant, &id, request).await?,
    ))
}

pub async fn delete(
    tenant: Tenant,
    State(state): State<AppState>,
    Path(id): Path<String>,
) -> ApiResult<StatusCode> {
    subscriptions::delete(&state, &tenant, &id).await?;
    Ok(StatusCode::NO_CONTENT)
}

pub async fn pause(
    tenant: Tenant,
    State(state): State<AppState>,
    Path(id): Path<String>,
) -> ApiResult<impl IntoResponse> {
    Ok(Json(
        subscriptions::set_status(&state, &tenant, &id, SubscriptionStatus::Paused).await?,
    ))
}

pub async fn resume(
    tenant: Tenant,
    State(state): State<AppState>,
    Path(id): Path<String>,
) -> ApiResult<impl IntoResponse> {
    Ok(Json(
        subscriptions::set_status(&state, &tenant, &id, SubscriptionStatus::Active).await?,
    ))
}

pub async fn pull(
    tenant: Tenant,
    State(state): State<AppState>,
    Path(id): Path<String>,
    ApiJson(request): ApiJson<PullRequest>,
) -> ApiResult<impl IntoResponse> {
    let messages = consume::pull(&state, &tenant, &id, request).await?;
    Ok(Json(Pulled { messages }))
}

pub async fn ack(
    tenant: Tenant,
    State(state): State<AppState>,
    Path(id): Path<String>,
    ApiJson(request): ApiJson<AckRequest>,
) -> ApiResult<impl IntoResponse> {
    let acked = consume::ack(&state, &tenant, &id, request).await?;
    Ok(Json(Acked { acked }))
}

pub async fn nack(
    tenant: Tenant,
    State(state): State<AppState>,
    Path(id): Path<String>,
    ApiJson(request): ApiJson<AckRequest>,
) -> ApiResult<impl IntoResponse> {
    let nacked = consume::nack(&state, &tenant, &id, request).await?;
    Ok(Json(Nacked { nacked }))
}

#[derive(Serialize, ToSchema)]
pub struct Pulled {
    messages: Vec<PulledMessage>,
}

#[derive(Serialize, ToSchema)]
pub struct Acked {
    /// Deliveries acknowledged (an unknown or already acknowledged id counts none).
    acked: usize,
}

#[derive(Serialize, ToSchema)]
pub struct Nacked {
    nacked: usize,
}
