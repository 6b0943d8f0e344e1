//! `GET /api/v1/mq/openapi.json`: the OpenAPI 3 description, generated from the same route
//! table the router is built from (`super::routes`), so it names every route served.

use std::sync::OnceLock;

use axum::Json;
use serde_json::{json, Map, Value};

use super::{routes, Access};

pub async fn document() -> Json<Value> {
    static DOCUMENT: OnceLock<Value> = OnceLock::new();
    Json(DOCUMENT.get_or_init(build).clone())
}

fn build() -> Value {
    let mut paths = Map::new();
    for route in routes() {
        let parameters: Vec<Value> = route
            .path
            .split('/')
            .filter_map(|segment| segment.strip_prefix('{')?.strip_suffix('}'))
            .map(|name| json!({"name": name, "in": "path", "required": true, "schema": {"type": "string"}}))
            .collect();
        let mut operation = json!({
            "summary": route.summary,
            "tags": [route.tag],
            "operationId": operation_id(route.method.as_str(), route.path),
            "parameters": parameters,
            "responses": {
                route.success.to_string(): success_response(route.success),
                "default": {
                    "description": "Error (see API.md: code, message, details, retryAfter)",
                    "content": {"application/json": {"schema": {"$ref": "#/components/schemas/Error"}}}
                }
            }
        });
        match route.access {
            Access::Tenant => operation["security"] = json!([{"bearerAuth": []}]),
            Access::Service => operation["security"] = json!([{"serviceToken": []}]),
            Access::Public => operation["security"] = json!([]),
        }
        if matches!(route.method.as_str(), "POST" | "PUT") {
            operation["requestBody"] = json!({
                "required": !route.path.ends_with("/purge")
                    && !route.path.ends_with("/pause")
                    && !route.path.ends_with("/resume"),
                "content": {"application/json": {"schema": {"type": "object"}}}
            });
        }
        let item = paths
            .entry(route.path.to_owned())
            .or_insert_with(|| Value::Object(Map::new()));
        item[route.method.as_str().to_ascii_lowercase()] = operation;
    }
    json!({
        "openapi": "3.0.3",
        "info": {
            "title": "message-queue-service",
            "version": env!("CARGO_PKG_VERSION"),
            "description": "Multi-tenant message middleware on Redis Streams and PostgreSQL. Field-level contract: API.md."
        },
        "paths": paths,
        "components": {
            "securitySchemes": {
                "bearerAuth": {"type": "http", "scheme": "bearer", "bearerFormat": "JWT"},
                "serviceToken": {"type": "apiKey", "in": "header", "name": "X-Service-Token"}
            },
            "schemas": {
                "Error": {
                    "type": "object",
                    "required": ["code", "message"],
                    "properties": {
                        "code": {"type": "string", "example": "MQ_QUEUE_NOT_FOUND"},
                        "message": {"type": "string"},
                        "details": {"type": "object"},
                        "retryAfter": {"type": "integer", "description": "seconds"}
                    }
                }
            }
        }
    })
}

fn success_response(status: u16) -> Value {
    if status == 204 {
        json!({"description": "Done; no body"})
    } else {
        json!({"description": "Success", "content": {"application/json": {"schema": {"type": "object"}}}})
    }
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
