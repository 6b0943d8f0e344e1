//! HTTP routes. Handlers parse, authorize and call one service function; no Redis command or
//! SQL appears below this module.

mod body_limits;
mod console;
pub mod extract;
mod internal;
mod messages;
mod monitoring;
mod openapi;
mod publish;
mod queues;
mod subscriptions;

pub use openapi::description as openapi_description;

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
    /// What the body must be, and what a successful answer carries (none: no body).
    pub request: Option<openapi::Describe>,
    pub response: Option<openapi::Describe>,
    /// Query parameters.
    pub query: Option<openapi::Parameters>,
    /// Other answers that are not the error body: a duplicate publish (200), an unhealthy
    /// health report (503).
    pub other_answers: &'static [u16],
    handler: MethodRouter<AppState>,
}

impl Route {
    fn accepts(mut self, describe: openapi::Describe) -> Self {
        self.request = Some(describe);
        self
    }

    fn answers(mut self, describe: openapi::Describe) -> Self {
        self.response = Some(describe);
        self
    }

    fn query(mut self, parameters: openapi::Parameters) -> Self {
        self.query = Some(parameters);
        self
    }

    /// The success body is also sent with these statuses.
    fn also(mut self, statuses: &'static [u16]) -> Self {
        self.other_answers = statuses;
        self
    }
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
        request: None,
        response: None,
        query: None,
        other_answers: &[],
        handler,
    }
}

/// Every route the service serves.
pub fn routes() -> Vec<Route> {
    use crate::domain::message::MessageInput;
    use crate::domain::queue::{CreateQueueRequest, Queue, QueueListQuery, UpdateQueueRequest};
    use crate::domain::subscription::{
        CreateSubscriptionRequest, Subscription, UpdateSubscriptionRequest,
    };
    use crate::service::consume::{AckRequest, PullRequest};
    use crate::service::dead_letters::{RedriveRequest, RedriveResult};
    use crate::service::messages::{BrowseQuery, MessagePage, MessageView};
    use crate::service::monitoring::MetricsView;
    use crate::service::publish::PublishResult;
    use crate::service::queues::{Page, QueueStats, QueueWithStats};
    use crate::service::subscriptions::{SubscriptionListQuery, SubscriptionWithStats};
    use openapi::{params, schema};
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
        )
        .accepts(schema::<CreateQueueRequest>)
        .answers(schema::<Queue>),
        route(
            M::GET,
            "/api/v1/mq/queues",
            "queues",
            Tenant,
            200,
            "List queues",
            get(queues::list),
        )
        .query(params::<QueueListQuery>)
        .answers(schema::<Page<Queue>>),
        route(
            M::GET,
            "/api/v1/mq/queues/{name}",
            "queues",
            Tenant,
            200,
            "Get a queue with its stats",
            get(queues::get),
        )
        .answers(schema::<QueueWithStats>),
        route(
            M::PUT,
            "/api/v1/mq/queues/{name}",
            "queues",
            Tenant,
            200,
            "Update a queue",
            put(queues::update),
        )
        .accepts(schema::<UpdateQueueRequest>)
        .answers(schema::<Queue>),
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
        )
        .answers(schema::<queues::Purged>),
        route(
            M::GET,
            "/api/v1/mq/queues/{name}/subscribers",
            "queues",
            Tenant,
            200,
            "Every subscription to the queue, its guests' included, with lag",
            get(queues::subscribers),
        )
        .answers(schema::<queues::Subscribers>),
        route(
            M::GET,
            "/api/v1/mq/queues/{name}/messages",
            "queues",
            Tenant,
            200,
            "Browse the queue's recorded messages, newest first, without consuming them",
            get(queues::browse),
        )
        .query(params::<BrowseQuery>)
        .answers(schema::<MessagePage>),
        route(
            M::POST,
            "/api/v1/mq/queues/{name}/redrive",
            "queues",
            Tenant,
            200,
            "Send dead letters back to the queue they came from",
            post(queues::redrive),
        )
        .accepts(schema::<RedriveRequest>)
        .answers(schema::<RedriveResult>),
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
        )
        .accepts(openapi::publish_body)
        .answers(schema::<PublishResult>)
        .also(&[200]),
        route(
            M::POST,
            "/api/v1/mq/publish/batch",
            "publishing",
            Tenant,
            201,
            "Publish a batch of messages",
            post(publish::publish_batch),
        )
        .accepts(schema::<publish::BatchRequest>)
        .answers(schema::<publish::BatchPublished>),
        route(
            M::POST,
            "/api/v1/mq/publish/delayed",
            "publishing",
            Tenant,
            201,
            "Publish a message after a delay",
            post(publish::publish_delayed),
        )
        .accepts(openapi::delayed_publish_body)
        .answers(schema::<PublishResult>)
        .also(&[200]),
        route(
            M::POST,
            "/api/v1/mq/publish/scheduled",
            "publishing",
            Tenant,
            201,
            "Publish a message at a time",
            post(publish::publish_scheduled),
        )
        .accepts(openapi::scheduled_publish_body)
        .answers(schema::<PublishResult>)
        .also(&[200]),
        route(
            M::POST,
            "/api/v1/mq/topics/{name}/publish",
            "publishing",
            Tenant,
            201,
            "Publish to a queue named in the path",
            post(publish::publish_to_topic),
        )
        .accepts(schema::<MessageInput>)
        .answers(schema::<PublishResult>)
        .also(&[200]),
        route(
            M::GET,
            "/api/v1/mq/messages/{messageId}",
            "messages",
            Tenant,
            200,
            "Look up a message",
            get(messages::get),
        )
        .query(params::<messages::QueueParameter>)
        .answers(schema::<MessageView>),
        route(
            M::DELETE,
            "/api/v1/mq/messages/{messageId}",
            "messages",
            Tenant,
            204,
            "Cancel a scheduled message",
            delete(messages::cancel),
        )
        .query(params::<messages::QueueParameter>),
        route(
            M::POST,
            "/api/v1/mq/subscriptions",
            "subscriptions",
            Tenant,
            201,
            "Create a subscription",
            post(subscriptions::create),
        )
        .accepts(schema::<CreateSubscriptionRequest>)
        .answers(schema::<Subscription>),
        route(
            M::GET,
            "/api/v1/mq/subscriptions",
            "subscriptions",
            Tenant,
            200,
            "List subscriptions",
            get(subscriptions::list),
        )
        .query(params::<SubscriptionListQuery>)
        .answers(schema::<Page<Subscription>>),
        route(
            M::GET,
            "/api/v1/mq/subscriptions/{id}",
            "subscriptions",
            Tenant,
            200,
            "Get a subscription with its stats",
            get(subscriptions::get),
        )
        .answers(schema::<SubscriptionWithStats>),
        route(
            M::PUT,
            "/api/v1/mq/subscriptions/{id}",
            "subscriptions",
            Tenant,
            200,
            "Update a subscription",
            put(subscriptions::update),
        )
        .accepts(schema::<UpdateSubscriptionRequest>)
        .answers(schema::<Subscription>),
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
        )
        .answers(schema::<Subscription>),
        route(
            M::POST,
            "/api/v1/mq/subscriptions/{id}/resume",
            "subscriptions",
            Tenant,
            200,
            "Resume delivery",
            post(subscriptions::resume),
        )
        .answers(schema::<Subscription>),
        route(
            M::POST,
            "/api/v1/mq/subscriptions/{id}/pull",
            "consuming",
            Tenant,
            200,
            "Pull messages (long-poll with waitMs)",
            post(subscriptions::pull),
        )
        .accepts(schema::<PullRequest>)
        .answers(schema::<subscriptions::Pulled>),
        route(
            M::POST,
            "/api/v1/mq/subscriptions/{id}/ack",
            "consuming",
            Tenant,
            200,
            "Acknowledge pulled messages",
            post(subscriptions::ack),
        )
        .accepts(schema::<AckRequest>)
        .answers(schema::<subscriptions::Acked>),
        route(
            M::POST,
            "/api/v1/mq/subscriptions/{id}/nack",
            "consuming",
            Tenant,
            200,
            "Reject pulled messages for retry",
            post(subscriptions::nack),
        )
        .accepts(schema::<AckRequest>)
        .answers(schema::<subscriptions::Nacked>),
        route(
            M::GET,
            "/api/v1/mq/metrics",
            "monitoring",
            Tenant,
            200,
            "The tenant's streams, consumers and performance",
            get(monitoring::tenant_metrics),
        )
        .answers(schema::<MetricsView>),
        route(
            M::GET,
            "/api/v1/mq/metrics/topics",
            "monitoring",
            Tenant,
            200,
            "Per-queue depth, lag and rates",
            get(monitoring::topic_metrics),
        )
        .answers(schema::<monitoring::TopicsBody>),
        route(
            M::GET,
            "/api/v1/mq/metrics/consumers",
            "monitoring",
            Tenant,
            200,
            "Per-subscription lag and rates",
            get(monitoring::consumer_metrics),
        )
        .answers(schema::<monitoring::ConsumersBody>),
        route(
            M::GET,
            "/api/v1/mq/health",
            "monitoring",
            Public,
            200,
            "Dependency health (503 when one is down)",
            get(monitoring::health),
        )
        .answers(schema::<monitoring::HealthBody>)
        .also(&[503]),
        route(
            M::GET,
            "/api/v1/mq/status",
            "monitoring",
            Public,
            200,
            "Version, workers and limits",
            get(monitoring::status),
        )
        .answers(schema::<monitoring::StatusBody>),
        route(
            M::GET,
            "/api/v1/mq/openapi.json",
            "monitoring",
            Public,
            200,
            "This OpenAPI description",
            get(openapi::document),
        )
        .answers(openapi::any_object),
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
        )
        .accepts(openapi::internal_event_body)
        .answers(schema::<PublishResult>),
        route(
            M::POST,
            "/internal/mq/user-notifications",
            "internal",
            Service,
            201,
            "Publish a user notification",
            post(internal::user_notifications),
        )
        .accepts(openapi::internal_event_body)
        .answers(schema::<PublishResult>),
        route(
            M::POST,
            "/internal/mq/audit-logs",
            "internal",
            Service,
            201,
            "Publish an audit log entry",
            post(internal::audit_logs),
        )
        .accepts(openapi::internal_audit_body)
        .answers(schema::<PublishResult>),
        route(
            M::POST,
            "/internal/mq/notifications",
            "internal",
            Service,
            201,
            "Publish a notification",
            post(internal::notifications),
        )
        .accepts(openapi::internal_notification_body)
        .answers(schema::<PublishResult>),
        route(
            M::GET,
            "/internal/mq/audit-queue-status",
            "internal",
            Service,
            200,
            "Stats of audit-logs queues",
            get(internal::audit_queue_status),
        )
        .query(params::<internal::TenantQuery>)
        .answers(schema::<QueueStats>),
        route(
            M::GET,
            "/internal/mq/notification-queue",
            "internal",
            Service,
            200,
            "Stats of notifications queues",
            get(internal::notification_queue),
        )
        .query(params::<internal::TenantQuery>)
        .answers(schema::<QueueStats>),
        route(
            M::GET,
            "/internal/mq/metrics",
            "internal",
            Service,
            200,
            "Metrics across all tenants",
            get(internal::metrics),
        )
        .answers(schema::<MetricsView>),
        route(
            M::GET,
            "/internal/mq/health-detailed",
            "internal",
            Service,
            200,
            "Health, workers, pools, latencies",
            get(internal::health_detailed),
        )
        .answers(schema::<internal::DetailedHealth>)
        .also(&[503]),
    ]
}

pub fn router(state: AppState) -> Router {
    let max_request_bytes = state.config.max_request_bytes;
    let mut router = Router::new();
    for route in routes() {
        router = router.route(route.path, route.handler);
    }
    router
        .merge(console::router())
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
