//! What every benchmark needs: settings from the environment, a tenant token, the service's
//! address, percentiles.

#![allow(dead_code)]

/// A numeric setting from the environment, or its default.
pub fn setting(name: &str, default: u64) -> u64 {
    std::env::var(name)
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(default)
}

/// The service under test (`BENCH_URL`).
pub fn service_url() -> String {
    std::env::var("BENCH_URL").unwrap_or_else(|_| "http://127.0.0.1:3010".to_owned())
}

/// A gateway JWT for a fresh tenant, signed with `JWT_SECRET` (default: .env.example's).
pub fn tenant_token() -> String {
    let secret = std::env::var("JWT_SECRET")
        .unwrap_or_else(|_| "dev-only-jwt-secret-change-me-0123456789abcdef".to_owned());
    let claims = serde_json::json!({
        "tenant_id": uuid::Uuid::new_v4().to_string(),
        "sub": "bench",
        "exp": chrono::Utc::now().timestamp() + 3600,
    });
    jsonwebtoken::encode(
        &jsonwebtoken::Header::default(),
        &claims,
        &jsonwebtoken::EncodingKey::from_secret(secret.as_bytes()),
    )
    .expect("sign bench token")
}

/// A queue name of this run's own.
pub fn unique_name(prefix: &str) -> String {
    format!(
        "{prefix}-{}",
        &uuid::Uuid::new_v4().simple().to_string()[..8]
    )
}

/// The `p` quantile (0..=1) of sorted values.
pub fn percentile<T: Copy>(sorted: &[T], p: f64) -> T {
    sorted[((sorted.len() as f64 - 1.0) * p).round() as usize]
}

pub fn micros_now() -> i64 {
    chrono::Utc::now().timestamp_micros()
}
