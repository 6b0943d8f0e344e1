//! The HTTP floor: the least any service answering the same publish request does on this
//! machine, to measure the service against (scripts/bench.sh runs it beside the service).
//!
//! One axum handler, built with the service's own crates and versions: verify the HS256
//! bearer token, parse the JSON body, run one `EVALSHA` (an `XADD` into one of 4 partition
//! streams) on one shared multiplexed redis-rs connection, serialize a 201 answer; mimalloc
//! as in the service. Nothing else: no queue lookup, limits, idempotency, records or
//! metrics.
//!
//! ```sh
//! FLOOR_PORT=3012 cargo bench --bench floor    # serves until stopped
//! ```
//!
//! Settings (environment): `FLOOR_PORT` (3012), `REDIS_URL` (redis://127.0.0.1:6379),
//! `JWT_SECRET` (the development secret of .env.example), `FLOOR_PREFIX` (`floor:`: its
//! streams, removed when it stops).

use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;

use axum::extract::State;
use axum::http::{HeaderMap, StatusCode};
use axum::response::IntoResponse;
use axum::routing::post;
use axum::{Json, Router};
use jsonwebtoken::{DecodingKey, Validation};
use serde::{Deserialize, Serialize};
use serde_json::Value;

#[global_allocator]
static GLOBAL: mimalloc::MiMalloc = mimalloc::MiMalloc;

const PARTITIONS: usize = 4;
const DEVELOPMENT_SECRET: &str = "dev-only-jwt-secret-change-me-0123456789abcdef";

struct Floor {
    redis: redis::aio::MultiplexedConnection,
    script: redis::Script,
    key: DecodingKey,
    validation: Validation,
    streams: Vec<String>,
    next: AtomicUsize,
}

#[derive(Deserialize)]
struct Claims {
    #[allow(dead_code)]
    tenant_id: String,
}

#[derive(Deserialize)]
struct Publish {
    queue: String,
    payload: Value,
}

#[derive(Serialize)]
#[serde(rename_all = "camelCase")]
struct Published {
    message_id: uuid::Uuid,
    queue: String,
    partition: usize,
    offset: String,
}

async fn publish(
    State(floor): State<Arc<Floor>>,
    headers: HeaderMap,
    Json(request): Json<Publish>,
) -> impl IntoResponse {
    let token = headers
        .get("authorization")
        .and_then(|value| value.to_str().ok())
        .and_then(|value| value.strip_prefix("Bearer "));
    let verified = token.is_some_and(|token| {
        jsonwebtoken::decode::<Claims>(token, &floor.key, &floor.validation).is_ok()
    });
    if !verified {
        return (StatusCode::UNAUTHORIZED, "unauthorized").into_response();
    }
    let partition = floor.next.fetch_add(1, Ordering::Relaxed) % PARTITIONS;
    let payload = serde_json::to_string(&request.payload).unwrap_or_default();
    let mut connection = floor.redis.clone();
    let offset: Result<String, _> = floor
        .script
        .key(&floor.streams[partition])
        .arg(payload)
        .invoke_async(&mut connection)
        .await;
    match offset {
        Ok(offset) => (
            StatusCode::CREATED,
            Json(Published {
                message_id: uuid::Uuid::now_v7(),
                queue: request.queue,
                partition,
                offset,
            }),
        )
            .into_response(),
        Err(error) => (StatusCode::SERVICE_UNAVAILABLE, error.to_string()).into_response(),
    }
}

#[tokio::main]
async fn main() {
    let port: u16 = std::env::var("FLOOR_PORT")
        .ok()
        .and_then(|port| port.parse().ok())
        .unwrap_or(3012);
    let redis_url =
        std::env::var("REDIS_URL").unwrap_or_else(|_| "redis://127.0.0.1:6379".to_owned());
    let secret = std::env::var("JWT_SECRET").unwrap_or_else(|_| DEVELOPMENT_SECRET.to_owned());
    let prefix = std::env::var("FLOOR_PREFIX").unwrap_or_else(|_| "floor:".to_owned());
    let client = redis::Client::open(redis_url).expect("REDIS_URL");
    let redis = client
        .get_multiplexed_async_connection()
        .await
        .expect("Redis answers at REDIS_URL");
    let streams: Vec<String> = (0..PARTITIONS).map(|p| format!("{prefix}{p}")).collect();
    let floor = Arc::new(Floor {
        redis: redis.clone(),
        script: redis::Script::new(
            "return redis.call('XADD', KEYS[1], 'MAXLEN', '~', 100000, '*', 'payload', ARGV[1])",
        ),
        key: DecodingKey::from_secret(secret.as_bytes()),
        validation: Validation::new(jsonwebtoken::Algorithm::HS256),
        streams: streams.clone(),
        next: AtomicUsize::new(0),
    });
    let app = Router::new()
        .route("/api/v1/mq/publish", post(publish))
        .with_state(floor);
    let listener = tokio::net::TcpListener::bind(("127.0.0.1", port))
        .await
        .expect("FLOOR_PORT is free");
    println!("floor listening on 127.0.0.1:{port}");
    axum::serve(listener, app)
        .with_graceful_shutdown(async {
            let _ = tokio::signal::ctrl_c().await;
        })
        .await
        .expect("serve");
    let mut connection = redis;
    let _: Result<(), _> = redis::cmd("DEL")
        .arg(&streams)
        .query_async(&mut connection)
        .await;
}
