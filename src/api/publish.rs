//! Publish routes: single, batch, and by topic name.

use axum::extract::{Path, State};
use axum::http::{HeaderMap, StatusCode};
use axum::response::{IntoResponse, Response};
use axum::Json;
use serde::{Deserialize, Serialize};
use serde_json::{json, Map, Value};
use utoipa::ToSchema;

use super::extract::{decode_value, ApiJson};
use crate::auth::Tenant;
use crate::domain::message::{trace_id_from_traceparent, MessageInput, PublishContext};
use crate::error::{ApiError, ApiResult};
use crate::service::publish::{self, PublishResult};
use crate::state::AppState;

fn context(headers: &HeaderMap, tenant: &Tenant) -> PublishContext {
    PublishContext {
        now_ms: chrono::Utc::now().timestamp_millis(),
        trace_id: headers
            .get("traceparent")
            .and_then(|value| value.to_str().ok())
            .and_then(trace_id_from_traceparent),
        producer_id: Some(tenant.principal.clone()).filter(|p| !p.is_empty()),
    }
}

/// 201 for a new message, 200 for a duplicate of an earlier one.
fn respond(result: PublishResult) -> Response {
    let status = if result.duplicate {
        StatusCode::OK
    } else {
        StatusCode::CREATED
    };
    (status, Json(result)).into_response()
}

fn required_queue(body: &mut Map<String, Value>) -> ApiResult<String> {
    match body.remove("queue") {
        Some(Value::String(name)) if !name.is_empty() => Ok(name),
        _ => Err(ApiError::validation(
            "queue is required and must be a queue name",
            vec!["queue".into()],
        )),
    }
}

/// Which time field a route requires.
#[derive(Clone, Copy)]
enum Timing {
    Any,
    Delayed,
    Scheduled,
}

async fn publish_with_queue_in_body(
    tenant: Tenant,
    state: AppState,
    headers: HeaderMap,
    mut body: Map<String, Value>,
    timing: Timing,
) -> ApiResult<Response> {
    let queue = required_queue(&mut body)?;
    let input: MessageInput = decode_value(Value::Object(body))?;
    match timing {
        Timing::Delayed if input.delay_ms.is_none() => {
            return Err(ApiError::validation(
                "delayMs is required",
                vec!["delayMs".into()],
            ));
        }
        Timing::Scheduled if input.scheduled_at.is_none() => {
            return Err(ApiError::validation(
                "scheduledAt is required",
                vec!["scheduledAt".into()],
            ));
        }
        _ => {}
    }
    let context = context(&headers, &tenant);
    let result = publish::publish_one(&state, &tenant, &queue, input, &context).await?;
    Ok(respond(result))
}

pub async fn publish(
    tenant: Tenant,
    State(state): State<AppState>,
    headers: HeaderMap,
    ApiJson(body): ApiJson<Map<String, Value>>,
) -> ApiResult<Response> {
    publish_with_queue_in_body(tenant, state, headers, body, Timing::Any).await
}

pub async fn publish_delayed(
    tenant: Tenant,
    State(state): State<AppState>,
    headers: HeaderMap,
    ApiJson(body): ApiJson<Map<String, Value>>,
) -> ApiResult<Response> {
    publish_with_queue_in_body(tenant, state, headers, body, Timing::Delayed).await
}

pub async fn publish_scheduled(
    tenant: Tenant,
    State(state): State<AppState>,
    headers: HeaderMap,
    ApiJson(body): ApiJson<Map<String, Value>>,
) -> ApiResult<Response> {
    publish_with_queue_in_body(tenant, state, headers, body, Timing::Scheduled).await
}

pub async fn publish_to_topic(
    tenant: Tenant,
    State(state): State<AppState>,
    Path(name): Path<String>,
    headers: HeaderMap,
    ApiJson(input): ApiJson<MessageInput>,
) -> ApiResult<Response> {
    let context = context(&headers, &tenant);
    let result = publish::publish_one(&state, &tenant, &name, input, &context).await?;
    Ok(respond(result))
}

#[derive(Deserialize, ToSchema)]
pub struct BatchRequest {
    #[schema(example = "orders")]
    queue: Option<String>,
    messages: Option<Vec<MessageInput>>,
}

pub async fn publish_batch(
    tenant: Tenant,
    State(state): State<AppState>,
    headers: HeaderMap,
    body: Result<ApiJson<BatchRequest>, ApiError>,
) -> ApiResult<impl IntoResponse> {
    let ApiJson(request) = body.map_err(with_batch_index)?;
    let queue = request
        .queue
        .filter(|name| !name.is_empty())
        .ok_or_else(|| ApiError::validation("queue is required", vec!["queue".into()]))?;
    let messages = request
        .messages
        .ok_or_else(|| ApiError::validation("messages is required", vec!["messages".into()]))?;
    let results = publish::publish_batch(
        &state,
        &tenant,
        &queue,
        messages,
        &context(&headers, &tenant),
    )
    .await?;
    Ok((
        StatusCode::CREATED,
        Json(BatchPublished {
            queue,
            count: results.len(),
            results,
        }),
    ))
}

/// A decoding error inside `messages[i]` also carries `details.index`.
fn with_batch_index(error: ApiError) -> ApiError {
    let index = error
        .details
        .get("fields")
        .and_then(|fields| fields.get(0))
        .and_then(Value::as_str)
        .and_then(|field| field.strip_prefix("messages["))
        .and_then(|rest| rest.split(']').next())
        .and_then(|index| index.parse::<usize>().ok());
    match index {
        Some(index) => error.with_detail("index", json!(index)),
        None => error,
    }
}

#[derive(Serialize, ToSchema)]
pub struct BatchPublished {
    queue: String,
    count: usize,
    /// One result per message, in the order sent.
    results: Vec<PublishResult>,
}
