//! `/api/v1/mq/queues`: queue management.

use axum::extract::{Path, State};
use axum::http::StatusCode;
use axum::response::IntoResponse;
use axum::Json;
use serde::Serialize;
use utoipa::ToSchema;

use super::extract::{ApiJson, ApiQuery};
use crate::auth::Tenant;
use crate::domain::queue::{CreateQueueRequest, QueueListQuery, UpdateQueueRequest};
use crate::error::ApiResult;
use crate::service::dead_letters::{self, RedriveRequest};
use crate::service::messages::{self, BrowseQuery};
use crate::service::subscriptions::Subscriber;
use crate::service::{queues, subscriptions};
use crate::state::AppState;

pub async fn create(
    tenant: Tenant,
    State(state): State<AppState>,
    ApiJson(request): ApiJson<CreateQueueRequest>,
) -> ApiResult<impl IntoResponse> {
    let queue = queues::create(&state, &tenant, request).await?;
    Ok((StatusCode::CREATED, Json(queue)))
}

pub async fn list(
    tenant: Tenant,
    State(state): State<AppState>,
    ApiQuery(query): ApiQuery<QueueListQuery>,
) -> ApiResult<impl IntoResponse> {
    let page = queues::list(&state, &tenant, query.validate()?).await?;
    Ok(Json(page))
}

pub async fn get(
    tenant: Tenant,
    State(state): State<AppState>,
    Path(name): Path<String>,
) -> ApiResult<impl IntoResponse> {
    Ok(Json(queues::get_with_stats(&state, &tenant, &name).await?))
}

pub async fn update(
    tenant: Tenant,
    State(state): State<AppState>,
    Path(name): Path<String>,
    ApiJson(request): ApiJson<UpdateQueueRequest>,
) -> ApiResult<impl IntoResponse> {
    Ok(Json(queues::update(&state, &tenant, &name, request).await?))
}

pub async fn delete(
    tenant: Tenant,
    State(state): State<AppState>,
    Path(name): Path<String>,
) -> ApiResult<StatusCode> {
    queues::delete(&state, &tenant, &name).await?;
    Ok(StatusCode::NO_CONTENT)
}

pub async fn purge(
    tenant: Tenant,
    State(state): State<AppState>,
    Path(name): Path<String>,
) -> ApiResult<impl IntoResponse> {
    let purged = queues::purge(&state, &tenant, &name).await?;
    Ok(Json(Purged { purged }))
}

pub async fn subscribers(
    tenant: Tenant,
    State(state): State<AppState>,
    Path(name): Path<String>,
) -> ApiResult<impl IntoResponse> {
    let items = subscriptions::subscribers(&state, &tenant, &name).await?;
    Ok(Json(Subscribers {
        total: items.len(),
        items,
    }))
}

pub async fn revoke_subscriber(
    tenant: Tenant,
    State(state): State<AppState>,
    Path((name, id)): Path<(String, String)>,
) -> ApiResult<StatusCode> {
    subscriptions::revoke(&state, &tenant, &name, &id).await?;
    Ok(StatusCode::NO_CONTENT)
}

pub async fn browse(
    tenant: Tenant,
    State(state): State<AppState>,
    Path(name): Path<String>,
    ApiQuery(query): ApiQuery<BrowseQuery>,
) -> ApiResult<impl IntoResponse> {
    Ok(Json(messages::browse(&state, &tenant, &name, query).await?))
}

pub async fn redrive(
    tenant: Tenant,
    State(state): State<AppState>,
    Path(name): Path<String>,
    ApiJson(request): ApiJson<RedriveRequest>,
) -> ApiResult<impl IntoResponse> {
    Ok(Json(
        dead_letters::redrive(&state, &tenant, &name, request).await?,
    ))
}

#[derive(Serialize, ToSchema)]
pub struct Purged {
    /// Stored and delayed messages removed.
    purged: u64,
}

#[derive(Serialize, ToSchema)]
pub struct Subscribers {
    total: usize,
    items: Vec<Subscriber>,
}
