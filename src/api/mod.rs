//! HTTP routes. Handlers parse, authorize and call one service function; no Redis command or
//! SQL appears below this module.

mod body_limits;
pub mod extract;
mod internal;
mod messages;
mod monitoring;
mod openapi;
mod publish;
mod queues;
mod subscriptions;

use std::any::Any;

use axum::extract::{DefaultBodyLimit, Request};
use axum::http::Method;
use axum::http::StatusCode;
use axum::middleware;
use axum::response::{IntoResponse, Response};
use axum::routing::{delete, get, post, put, MethodRouter};
use axum::Router;
use tower::ServiceBuilder;
use tower_http::catch_panic::CatchPanicLayer;
use tower_http::request_id::{MakeRequestUuid, PropagateRequestIdLayer, SetRequestIdLayer};
use tower_http::trace::{DefaultOnResponse, TraceLayer};
use tracing::Level;

use crate::error::{ApiError, ErrorCode};
use crate::metrics::track_http;
use crate::state::AppState;

/// Who may call a route.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Access {
    /// `Authorization: Bearer <JWT>` (through the gateway).
    Tenant,
    /// `X-Service-Token` (platform services).
    Service,
    Public,
}

/// One route: what serves it and what the OpenAPI description says of it. The router and
/// `openapi.json` are both built from `routes()`, so the description covers every route.
pub struct Route {
    pub method: Method,
    pub path: &'static str,
    pub summary: &'static str,
    pub tag: &'static str,
    pub access: Access,
    /// The status of a successful answer.
    pub success: u16,
    handler: MethodRouter<AppState>,
}

fn route(
    method: Method,
    path: &'static str,
    tag: &'static str,
    access: Access,
    success: u16,
    summary: &'static str,
    handler: MethodRouter<AppState>,
) -> Route {
    Route {
        method,
        path,
        summary,
        tag,
        access,
        success,
        handler,
    }
}

/// Every route the service serves.
pub fn routes() -> Vec<Route> {
    use Access::{Public, Service, Tenant};
    use Method as M;
    vec![
        route(
            M::POST,
            "/api/v1/mq/queues",
            "queues",
            Tenant,
            201,
            "Create a queue",
            post(queues::create),
        ),
        route(
            M::GET,
            "/api/v1/mq/queues",
            "queues",
            Tenant,
            200,
            "List queues",
            get(queues::list),
        ),
        route(
            M::GET,
            "/api/v1/mq/queues/{name}",
            "queues",
            Tenant,
            200,
            "Get a queue with its stats",
            get(queues::get),
        ),
        route(
            M::PUT,
            "/api/v1/mq/queues/{name}",
            "queues",
            Tenant,
            200,
            "Update a queue",
            put(queues::update),
        ),
        route(
            M::DELETE,
            "/api/v1/mq/queues/{name}",
            "queues",
            Tenant,
            204,
            "Delete a queue and its data",
            delete(queues::delete),
        ),
        route(
            M::POST,
            "/api/v1/mq/queues/{name}/purge",
            "queues",
            Tenant,
            200,
            "Remove all stored and delayed messages",
            post(queues::purge),
        ),
        route(
            M::GET,
            "/api/v1/mq/queues/{name}/subscribers",
            "queues",
            Tenant,
            200,
            "Every subscription to the queue, its guests' included, with lag",
            get(queues::subscribers),
        ),
        route(
            M::DELETE,
            "/api/v1/mq/queues/{name}/subscribers/{id}",
            "queues",
            Tenant,
            204,
            "Revoke a subscription to the queue (a guest's included)",
            delete(queues::revoke_subscriber),
        ),
        route(
            M::POST,
            "/api/v1/mq/publish",
            "publishing",
            Tenant,
            201,
            "Publish a message",
            post(publish::publish),
        ),
        route(
            M::POST,
            "/api/v1/mq/publish/batch",
            "publishing",
            Tenant,
            201,
            "Publish a batch of messages",
            post(publish::publish_batch),
        ),
        route(
            M::POST,
            "/api/v1/mq/publish/delayed",
            "publishing",
            Tenant,
            201,
            "Publish a message after a delay",
            post(publish::publish_delayed),
        ),
        route(
            M::POST,
            "/api/v1/mq/publish/scheduled",
            "publishing",
            Tenant,
            201,
            "Publish a message at a time",
            post(publish::publish_scheduled),
        ),
        route(
            M::POST,
            "/api/v1/mq/topics/{name}/publish",
            "publishing",
            Tenant,
            201,
            "Publish to a queue named in the path",
            post(publish::publish_to_topic),
        ),
        route(
            M::GET,
            "/api/v1/mq/messages/{messageId}",
            "messages",
            Tenant,
            200,
            "Look up a message",
            get(messages::get),
        ),
        route(
            M::DELETE,
            "/api/v1/mq/messages/{messageId}",
            "messages",
            Tenant,
            204,
            "Cancel a scheduled message",
            delete(messages::cancel),
        ),
        route(
            M::POST,
            "/api/v1/mq/subscriptions",
            "subscriptions",
            Tenant,
            201,
            "Create a subscription",
            post(subscriptions::create),
        ),
        route(
            M::GET,
            "/api/v1/mq/subscriptions",
            "subscriptions",
            Tenant,
            200,
            "List subscriptions",
            get(subscriptions::list),
        ),
        route(
            M::GET,
            "/api/v1/mq/subscriptions/{id}",
            "subscriptions",
            Tenant,
            200,
            "Get a subscription with its stats",
            get(subscriptions::get),
        ),
        route(
            M::PUT,
            "/api/v1/mq/subscriptions/{id}",
            "subscriptions",
            Tenant,
            200,
            "Update a subscription",
            put(subscriptions::update),
        ),
        route(
            M::DELETE,
            "/api/v1/mq/subscriptions/{id}",
            "subscriptions",
            Tenant,
            204,
            "Delete a subscription",
            delete(subscriptions::delete),
        ),
        route(
            M::POST,
            "/api/v1/mq/subscriptions/{id}/pause",
            "subscriptions",
            Tenant,
            200,
            "Pause delivery",
            post(subscriptions::pause),
        ),
        route(
            M::POST,
            "/api/v1/mq/subscriptions/{id}/resume",
            "subscriptions",
            Tenant,
            200,
            "Resume delivery",
            post(subscriptions::resume),
        ),
        route(
            M::POST,
            "/api/v1/mq/subscriptions/{id}/pull",
            "consuming",
            Tenant,
            200,
            "Pull messages (long-poll with waitMs)",
            post(subscriptions::pull),
        ),
        route(
            M::POST,
            "/api/v1/mq/subscriptions/{id}/ack",
            "consuming",
            Tenant,
            200,
            "Acknowledge pulled messages",
            post(subscriptions::ack),
        ),
        route(
            M::POST,
            "/api/v1/mq/subscriptions/{id}/nack",
            "consuming",
            Tenant,
            200,
            "Reject pulled messages for retry",
            post(subscriptions::nack),
        ),
        route(
            M::GET,
            "/api/v1/mq/metrics",
            "monitoring",
            Tenant,
            200,
            "The tenant's streams, consumers and performance",
            get(monitoring::tenant_metrics),
        ),
        route(
            M::GET,
            "/api/v1/mq/metrics/topics",
            "monitoring",
            Tenant,
            200,
            "Per-queue depth, lag and rates",
            get(monitoring::topic_metrics),
        ),
        route(
            M::GET,
            "/api/v1/mq/metrics/consumers",
            "monitoring",
            Tenant,
            200,
            "Per-subscription lag and rates",
            get(monitoring::consumer_metrics),
        ),
        route(
            M::GET,
            "/api/v1/mq/health",
            "monitoring",
            Public,
            200,
            "Dependency health (503 when one is down)",
            get(monitoring::health),
        ),
        route(
            M::GET,
            "/api/v1/mq/status",
            "monitoring",
            Public,
            200,
            "Version, workers and limits",
            get(monitoring::status),
        ),
        route(
            M::GET,
            "/api/v1/mq/openapi.json",
            "monitoring",
            Public,
            200,
            "This OpenAPI description",
            get(openapi::document),
        ),
        route(
            M::GET,
            "/metrics",
            "monitoring",
            Public,
            200,
            "Prometheus metrics",
            get(monitoring::prometheus),
        ),
        route(
            M::POST,
            "/internal/mq/user-events",
            "internal",
            Service,
            201,
            "Publish a user event",
            post(internal::user_events),
        ),
        route(
            M::POST,
            "/internal/mq/user-notifications",
            "internal",
            Service,
            201,
            "Publish a user notification",
            post(internal::user_notifications),
        ),
        route(
            M::POST,
            "/internal/mq/audit-logs",
            "internal",
            Service,
            201,
            "Publish an audit log entry",
            post(internal::audit_logs),
        ),
        route(
            M::POST,
            "/internal/mq/notifications",
            "internal",
            Service,
            201,
            "Publish a notification",
            post(internal::notifications),
        ),
        route(
            M::GET,
            "/internal/mq/audit-queue-status",
            "internal",
            Service,
            200,
            "Stats of audit-logs queues",
            get(internal::audit_queue_status),
        ),
        route(
            M::GET,
            "/internal/mq/notification-queue",
            "internal",
            Service,
            200,
            "Stats of notifications queues",
            get(internal::notification_queue),
        ),
        route(
            M::GET,
            "/internal/mq/metrics",
            "internal",
            Service,
            200,
            "Metrics across all tenants",
            get(internal::metrics),
        ),
        route(
            M::GET,
            "/internal/mq/health-detailed",
            "internal",
            Service,
            200,
            "Health, workers, pools, latencies",
            get(internal::health_detailed),
        ),
    ]
}

pub fn router(state: AppState) -> Router {
    let max_request_bytes = state.config.max_request_bytes;
    let mut router = Router::new();
    for route in routes() {
        router = router.route(route.path, route.handler);
    }
    router
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
