//! `/api/v1/mq/messages/{messageId}?queue=`: lookup and cancellation.

use axum::extract::{Path, State};
use axum::http::StatusCode;
use axum::Json;
use serde::Deserialize;
use utoipa::IntoParams;

use super::extract::ApiQuery;
use crate::auth::Tenant;
use crate::error::{ApiError, ApiResult};
use crate::service::messages::{self, MessageView};
use crate::state::AppState;

#[derive(Deserialize, IntoParams)]
#[into_params(parameter_in = Query)]
pub struct QueueParameter {
    /// The queue the message was published to (required).
    queue: Option<String>,
}

impl QueueParameter {
    fn required(self) -> ApiResult<String> {
        self.queue.filter(|q| !q.is_empty()).ok_or_else(|| {
            ApiError::validation(
                "the query parameter queue is required",
                vec!["queue".into()],
            )
        })
    }
}

pub async fn get(
    tenant: Tenant,
    State(state): State<AppState>,
    Path(message_id): Path<String>,
    ApiQuery(query): ApiQuery<QueueParameter>,
) -> ApiResult<Json<MessageView>> {
    let queue = query.required()?;
    Ok(Json(
        messages::get(&state, &tenant, &queue, &message_id).await?,
    ))
}

pub async fn cancel(
    tenant: Tenant,
    State(state): State<AppState>,
    Path(message_id): Path<String>,
    ApiQuery(query): ApiQuery<QueueParameter>,
) -> ApiResult<StatusCode> {
    let queue = query.required()?;
    messages::cancel(&state, &tenant, &queue, &message_id).await?;
    Ok(StatusCode::NO_CONTENT)
}
