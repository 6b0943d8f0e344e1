//! `GET /api/v1/mq/openapi.json`: the OpenAPI 3.1 description, generated from the same route
//! table the router is built from (`super::routes`), with each body's schema derived
//! (utoipa) from the type its handler reads or answers.

use std::sync::OnceLock;

use axum::Json;
use serde_json::{json, Map, Value};
use utoipa::openapi::path::{Parameter, ParameterIn};
use utoipa::openapi::{RefOr, Schema};
use utoipa::{IntoParams, ToSchema};

use super::{routes, Access};
use crate::domain::message::MessageInput;

/// The component schemas a description refers to, by name.
pub type Components = Vec<(String, RefOr<Schema>)>;
/// A body's JSON Schema, registering the components it refers to.
pub type Describe = fn(&mut Components) -> Value;
/// A route's query parameters.
pub type Parameters = fn() -> Vec<Parameter>;

pub fn schema<T: ToSchema>(components: &mut Components) -> Value {
    T::schemas(components);
    serde_json::to_value(T::schema()).unwrap_or_default()
}

pub fn params<T: IntoParams>() -> Vec<Parameter> {
    T::into_params(|| Some(ParameterIn::Query))
}

pub fn any_object(_: &mut Components) -> Value {
    json!({"type": "object"})
}

/// `POST /publish` reads `queue`, then the rest of the body as one message.
pub fn publish_body(components: &mut Components) -> Value {
    with_queue(components, None)
}

pub fn delayed_publish_body(components: &mut Components) -> Value {
    with_queue(components, Some(("delayMs", json!(60_000))))
}

pub fn scheduled_publish_body(components: &mut Components) -> Value {
    with_queue(
        components,
        Some(("scheduledAt", json!("2030-01-01T09:00:00Z"))),
    )
}

/// The message's schema with `queue` (and the route's time field, when it has one) required.
fn with_queue(components: &mut Components, timing: Option<(&str, Value)>) -> Value {
    let message = schema::<MessageInput>(components);
    let mut required = vec!["queue", "payload"];
    let mut example = json!({"queue": "orders", "payload": {"orderId": 42}, "key": "customer-7"});
    if let Some((field, value)) = timing {
        required.push(field);
        example[field] = value;
    }
    json!({
        "allOf": [
            message,
            {
                "type": "object",
                "required": required,
                "properties": {"queue": {"type": "string", "example": "orders"}}
            }
        ],
        "example": example
    })
}

/// The internal routes publish their whole body (without `tenantId`) as the payload; the
/// named field, when present, also becomes the `eventType` header.
fn internal_body(fields: &[&str], example: Value) -> Value {
    let mut properties = Map::new();
    properties.insert(
        "tenantId".into(),
        json!({"type": "string", "format": "uuid", "description": "Or the X-Tenant-Id header"}),
    );
    for field in fields {
        properties.insert((*field).into(), json!({}));
    }
    properties.insert(fields[0].into(), json!({"type": ["string", "null"]}));
    json!({"type": "object", "properties": properties, "additionalProperties": true, "example": example})
}

pub fn internal_event_body(_: &mut Components) -> Value {
    internal_body(
        &["eventType", "userId", "data"],
        json!({"tenantId": "7b0c8f8e-3f57-4d7a-9a53-5d2b4c1e9f10", "eventType": "user.created", "userId": "u-1", "data": {}}),
    )
}

pub fn internal_audit_body(_: &mut Components) -> Value {
    internal_body(
        &["action", "actor", "resource", "details"],
        json!({"tenantId": "7b0c8f8e-3f57-4d7a-9a53-5d2b4c1e9f10", "action": "login", "actor": "u-1"}),
    )
}

pub fn internal_notification_body(_: &mut Components) -> Value {
    internal_body(
        &["channel", "recipient", "template", "data"],
        json!({"tenantId": "7b0c8f8e-3f57-4d7a-9a53-5d2b4c1e9f10", "channel": "email", "recipient": "a@example.com"}),
    )
}

pub async fn document() -> Json<Value> {
    Json(description().clone())
}

/// The description `openapi.json` serves (built once).
pub fn description() -> &'static Value {
    static DOCUMENT: OnceLock<Value> = OnceLock::new();
    DOCUMENT.get_or_init(build)
}

fn json_content(schema: Value) -> Value {
    json!({"application/json": {"schema": schema}})
}

fn error_response(description: &str) -> Value {
    json!({
        "description": description,
        "content": json_content(json!({"$ref": "#/components/schemas/Error"}))
    })
}

fn build() -> Value {
    let mut components = Components::new();
    let mut paths = Map::new();
    for route in routes() {
        let mut parameters: Vec<Value> = route
            .path
            .split('/')
            .filter_map(|segment| segment.strip_prefix('{')?.strip_suffix('}'))
            .map(|name| {
                let mut parameter = json!({"name": name, "in": "path", "required": true, "schema": {"type": "string"}});
                if name == "name" {
                    parameter["example"] = json!("orders");
                }
                parameter
            })
            .collect();
        if let Some(query) = route.query {
            parameters.extend(query().iter().filter_map(|p| serde_json::to_value(p).ok()));
        }
        let mut responses = Map::new();
        let success = match route.response {
            Some(describe) => json!({
                "description": "Success",
                "content": json_content(describe(&mut components))
            }),
            None if route.path == "/metrics" => json!({
                "description": "Prometheus text exposition",
                "content": {"text/plain": {"schema": {"type": "string"}}}
            }),
            None => json!({"description": "Done; no body"}),
        };
        for status in route.other_answers {
            let mut other = success.clone();
            other["description"] = json!(match status {
                200 => "A duplicate of an earlier message (same messageId): nothing stored",
                503 => "A dependency is down, or the service is stopping",
                _ => "Success",
            });
            responses.insert(status.to_string(), other);
        }
        responses.insert(route.success.to_string(), success);
        if route.request.is_some() || route.query.is_some() || route.path.contains('{') {
            responses.insert(
                "400".into(),
                error_response("Invalid request (MQ_VALIDATION_ERROR), with details.fields"),
            );
        }
        match route.access {
            Access::Tenant | Access::Service => {
                responses.insert(
                    "401".into(),
                    error_response("Missing or invalid credentials"),
                );
                responses.insert(
                    "403".into(),
                    error_response("Not allowed (ACL, tenant scope)"),
                );
            }
            Access::Public => {}
        }
        responses.insert("default".into(), error_response(
            "Error: 404 not found, 409 conflict, 413 too large, 429 rate limited (retryAfter), 503 dependency unavailable (retryAfter)",
        ));
        let mut operation = json!({
            "summary": route.summary,
            "tags": [route.tag],
            "operationId": operation_id(route.method.as_str(), route.path),
            "parameters": parameters,
            "responses": responses,
        });
        operation["security"] = match route.access {
            Access::Tenant => json!([{"bearerAuth": []}]),
            Access::Service => json!([{"serviceToken": []}]),
            Access::Public => json!([]),
        };
        if let Some(describe) = route.request {
            operation["requestBody"] = json!({
                "required": true,
                "content": json_content(describe(&mut components))
            });
        }
        let item = paths
            .entry(route.path.to_owned())
            .or_insert_with(|| Value::Object(Map::new()));
        item[route.method.as_str().to_ascii_lowercase()] = operation;
    }
    let mut schemas: Map<String, Value> = components
        .into_iter()
        .filter_map(|(name, schema)| Some((name, serde_json::to_value(schema).ok()?)))
        .collect();
    schemas.insert("Error".into(), error_schema());
    json!({
        "openapi": "3.1.0",
        "info": {
            "title": "message-queue-service",
            "version": env!("CARGO_PKG_VERSION"),
            "description": "Multi-tenant message middleware on Redis Streams and PostgreSQL. The reference with every rule: docs/API.md."
        },
        "paths": paths,
        "components": {
            "securitySchemes": {
                "bearerAuth": {"type": "http", "scheme": "bearer", "bearerFormat": "JWT"},
                "serviceToken": {"type": "apiKey", "in": "header", "name": "X-Service-Token"}
            },
            "schemas": schemas
        }
    })
}

fn error_schema() -> Value {
    json!({
        "type": "object",
        "required": ["code", "message", "details"],
        "properties": {
            "code": {"type": "string", "example": "MQ_QUEUE_NOT_FOUND"},
            "message": {"type": "string", "example": "queue 'orders' not found"},
            "details": {"type": "object", "example": {"fields": ["queue"]}},
            "retryAfter": {"type": "integer", "description": "Seconds to wait (429, 503)"}
        },
        "example": {"code": "MQ_VALIDATION_ERROR", "message": "payload is required", "details": {"fields": ["payload"]}}
    })
}

/// `post /api/v1/mq/queues/{name}/purge` → `postApiV1MqQueuesNamePurge` (unique per route).
fn operation_id(method: &str, path: &str) -> String {
    let mut id = method.to_ascii_lowercase();
    for word in path
        .split(['/', '-', '.', '{', '}'])
        .filter(|w| !w.is_empty())
    {
        let mut chars = word.chars();
        if let Some(first) = chars.next() {
            id.push(first.to_ascii_uppercase());
            id.extend(chars);
        }
    }
    id
}
