//! HTTP routes. Handlers parse, authorize and call one service function; no Redis command or
//! SQL appears below this module.

pub mod extract;
mod internal;
mod messages;
mod monitoring;
mod publish;
mod queues;
mod subscriptions;

use std::any::Any;

use axum::extract::{DefaultBodyLimit, Request};
use axum::http::StatusCode;
use axum::middleware;
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use axum::Router;
use tower::ServiceBuilder;
use tower_http::catch_panic::CatchPanicLayer;
use tower_http::request_id::{MakeRequestUuid, PropagateRequestIdLayer, SetRequestIdLayer};
use tower_http::trace::{DefaultOnResponse, TraceLayer};
use tracing::Level;

use crate::error::{ApiError, ErrorCode};
use crate::metrics::track_http;
use crate::state::AppState;

pub fn router(state: AppState) -> Router {
    let max_request_bytes = state.config.max_request_bytes;
    Router::new()
        .route("/api/v1/mq/queues", get(queues::list).post(queues::create))
        .route(
            "/api/v1/mq/queues/{name}",
            get(queues::get).put(queues::update).delete(queues::delete),
        )
        .route("/api/v1/mq/queues/{name}/purge", post(queues::purge))
        .route("/api/v1/mq/publish", post(publish::publish))
        .route("/api/v1/mq/publish/batch", post(publish::publish_batch))
        .route("/api/v1/mq/publish/delayed", post(publish::publish_delayed))
        .route(
            "/api/v1/mq/publish/scheduled",
            post(publish::publish_scheduled),
        )
        .route(
            "/api/v1/mq/topics/{name}/publish",
            post(publish::publish_to_topic),
        )
        .route(
            "/api/v1/mq/messages/{message_id}",
            get(messages::get).delete(messages::cancel),
        )
        .route(
            "/api/v1/mq/subscriptions",
            get(subscriptions::list).post(subscriptions::create),
        )
        .route(
            "/api/v1/mq/subscriptions/{id}",
            get(subscriptions::get)
                .put(subscriptions::update)
                .delete(subscriptions::delete),
        )
        .route(
            "/api/v1/mq/subscriptions/{id}/pause",
            post(subscriptions::pause),
        )
        .route(
            "/api/v1/mq/subscriptions/{id}/resume",
            post(subscriptions::resume),
        )
        .route(
            "/api/v1/mq/subscriptions/{id}/pull",
            post(subscriptions::pull),
        )
        .route(
            "/api/v1/mq/subscriptions/{id}/ack",
            post(subscriptions::ack),
        )
        .route(
            "/api/v1/mq/subscriptions/{id}/nack",
            post(subscriptions::nack),
        )
        .route("/api/v1/mq/metrics", get(monitoring::tenant_metrics))
        .route("/api/v1/mq/metrics/topics", get(monitoring::topic_metrics))
        .route(
            "/api/v1/mq/metrics/consumers",
            get(monitoring::consumer_metrics),
        )
        .route("/internal/mq/user-events", post(internal::user_events))
        .route(
            "/internal/mq/user-notifications",
            post(internal::user_notifications),
        )
        .route("/internal/mq/audit-logs", post(internal::audit_logs))
        .route("/internal/mq/notifications", post(internal::notifications))
        .route(
            "/internal/mq/audit-queue-status",
            get(internal::audit_queue_status),
        )
        .route(
            "/internal/mq/notification-queue",
            get(internal::notification_queue),
        )
        .route("/internal/mq/metrics", get(internal::metrics))
        .route(
            "/internal/mq/health-detailed",
            get(internal::health_detailed),
        )
        .route("/api/v1/mq/health", get(monitoring::health))
        .route("/api/v1/mq/status", get(monitoring::status))
        .route("/metrics", get(monitoring::prometheus))
        .fallback(route_not_found)
        .method_not_allowed_fallback(route_not_found)
        .layer(DefaultBodyLimit::max(max_request_bytes))
        .layer(middleware::from_fn_with_state(
            state.metrics.clone(),
            track_http,
        ))
        .layer(
            ServiceBuilder::new()
                .layer(SetRequestIdLayer::x_request_id(MakeRequestUuid))
                .layer(PropagateRequestIdLayer::x_request_id())
                .layer(
                    TraceLayer::new_for_http()
                        .make_span_with(|request: &Request| {
                            let request_id = request
                                .headers()
                                .get("x-request-id")
                                .and_then(|v| v.to_str().ok())
                                .unwrap_or_default();
                            tracing::info_span!(
                                "request",
                                method = %request.method(),
                                path = %request.uri().path(),
                                request_id,
                            )
                        })
                        .on_response(DefaultOnResponse::new().level(Level::INFO)),
                )
                .layer(CatchPanicLayer::custom(panic_response)),
        )
        .with_state(state)
}

/// Unknown route, or a known path with a method it does not serve: both are "no such route".
async fn route_not_found(request: Request) -> ApiError {
    ApiError::route_not_found(request.method().as_str(), request.uri().path())
}

fn panic_response(panic: Box<dyn Any + Send + 'static>) -> Response {
    let detail = panic
        .downcast_ref::<String>()
        .map(String::as_str)
        .or_else(|| panic.downcast_ref::<&str>().copied())
        .unwrap_or("unknown panic");
    tracing::error!(panic = detail, "handler panicked");
    let mut response = ApiError::new(ErrorCode::Internal, "internal error").into_response();
    *response.status_mut() = StatusCode::INTERNAL_SERVER_ERROR;
    response
}
