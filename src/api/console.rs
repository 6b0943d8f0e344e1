//! `/console`: the operator console, a page and its script and style compiled into the
//! binary (no build step, no CDN: the service often runs without internet). The console
//! calls only the public API with the signed-in token, so tenant isolation and ACLs apply to
//! everything it shows and does.

use std::time::{Duration, SystemTime, UNIX_EPOCH};

use axum::extract::State;
use axum::http::{header, HeaderName, HeaderValue, StatusCode};
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use axum::{Json, Router};
use serde::{Deserialize, Serialize};
use uuid::Uuid;

use super::extract::ApiJson;
use crate::dev_token::{self, TokenRequest};
use crate::error::{ApiError, ApiResult};
use crate::state::AppState;

const INDEX: &str = include_str!("../../console/index.html");
const SCRIPT: &str = include_str!("../../console/app.js");
const STYLE: &str = include_str!("../../console/app.css");
/// Only the console's own files run; nothing is framed, nothing leaves for another origin.
const POLICY: &str = "default-src 'none'; script-src 'self'; style-src 'self'; \
    connect-src 'self'; img-src 'self' data:; frame-ancestors 'none'; base-uri 'none'; \
    form-action 'none'";
const DEV_TOKEN_TTL: Duration = Duration::from_secs(8 * 3600);
const MAX_SUB_CHARS: usize = 200;

pub fn router() -> Router<AppState> {
    Router::new()
        .route(
            "/console",
            get(|| async { asset(INDEX, "text/html; charset=utf-8") }),
        )
        .route(
            "/console/",
            get(|| async { asset(INDEX, "text/html; charset=utf-8") }),
        )
        .route(
            "/console/app.js",
            get(|| async { asset(SCRIPT, "text/javascript; charset=utf-8") }),
        )
        .route(
            "/console/app.css",
            get(|| async { asset(STYLE, "text/css; charset=utf-8") }),
        )
        .route("/console/dev-token", post(dev_token))
}

fn asset(body: &'static str, content_type: &'static str) -> Response {
    let headers = [
        (header::CONTENT_TYPE, HeaderValue::from_static(content_type)),
        (
            header::CONTENT_SECURITY_POLICY,
            HeaderValue::from_static(POLICY),
        ),
        (
            header::X_CONTENT_TYPE_OPTIONS,
            HeaderValue::from_static("nosniff"),
        ),
        (
            HeaderName::from_static("referrer-policy"),
            HeaderValue::from_static("no-referrer"),
        ),
        (header::CACHE_CONTROL, HeaderValue::from_static("no-cache")),
    ];
    (StatusCode::OK, headers, body).into_response()
}

#[derive(Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct DevTokenRequest {
    tenant_id: Option<String>,
    sub: Option<String>,
}

#[derive(Serialize)]
#[serde(rename_all = "camelCase")]
pub struct DevToken {
    token: String,
    tenant_id: Uuid,
    sub: String,
    expires_at: chrono::DateTime<chrono::Utc>,
}

/// `POST /console/dev-token` (only with `MQ_DEV_MODE`): a development token for the console's
/// sign-in button, as `message-queue-service token` prints one. Without dev mode the route
/// does not exist.
async fn dev_token(
    State(state): State<AppState>,
    ApiJson(request): ApiJson<DevTokenRequest>,
) -> ApiResult<impl IntoResponse> {
    if !state.config.dev_mode {
        return Err(ApiError::route_not_found("POST", "/console/dev-token"));
    }
    let tenant = match request.tenant_id.filter(|t| !t.is_empty()) {
        None => Uuid::new_v4(),
        Some(text) => Uuid::parse_str(&text).map_err(|_| {
            ApiError::validation(
                format!("tenantId '{text}' is not a UUID"),
                vec!["tenantId".into()],
            )
        })?,
    };
    let sub = request
        .sub
        .filter(|s| !s.trim().is_empty())
        .unwrap_or_else(|| "console".to_owned());
    if sub.chars().count() > MAX_SUB_CHARS {
        return Err(ApiError::validation(
            format!("sub must be at most {MAX_SUB_CHARS} characters"),
            vec!["sub".into()],
        ));
    }
    let now = SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|since| since.as_secs())
        .unwrap_or_default();
    let request = TokenRequest {
        tenant,
        sub,
        ttl: DEV_TOKEN_TTL,
    };
    let token = dev_token::mint(&state.config.jwt_secret, &request, now);
    Ok(Json(DevToken {
        token,
        tenant_id: request.tenant,
        sub: request.sub,
        expires_at: chrono::Utc::now() + DEV_TOKEN_TTL,
    }))
}
