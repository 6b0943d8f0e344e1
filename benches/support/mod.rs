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

/// Publishes `rate` single messages a second for `seconds` (ticks of 10 ms) to `queue`,
/// each payload carrying its send time (`sentAt`, µs); returns how many were sent.
pub async fn publish_at_rate(
    http: &reqwest::Client,
    url: &str,
    token: &str,
    queue: &str,
    rate: u64,
    seconds: u64,
) -> u64 {
    let total = rate * seconds;
    let per_tick = (rate / 100).max(1);
    let mut ticker = tokio::time::interval(std::time::Duration::from_millis(10));
    let mut publishes = Vec::new();
    let mut sent = 0;
    while sent < total {
        ticker.tick().await;
        for _ in 0..per_tick.min(total - sent) {
            let request = http
                .post(format!("{url}/api/v1/mq/publish"))
                .bearer_auth(token)
                .json(&serde_json::json!({"queue": queue, "payload": {"sentAt": micros_now()}}));
            publishes.push(tokio::spawn(async move {
                let response = request.send().await.expect("publish");
                assert!(
                    response.status().is_success(),
                    "publish: {}",
                    response.status()
                );
            }));
            sent += 1;
        }
    }
    for publish in publishes {
        publish.await.expect("publish");
    }
    total
}
