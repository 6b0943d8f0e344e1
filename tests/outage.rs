//! Dependency outages: a down Redis or PostgreSQL answers 503 with `retryAfter`, health says
//! which one is down, and the service recovers by itself when it comes back.

mod common;

use common::{assert_error, read, TestApp};
use reqwest::Method;
use serde_json::json;

fn assert_unavailable(status: u16, body: &serde_json::Value, retry_after_header: Option<&str>) {
    assert_error(status, body, 503, "MQ_SERVICE_UNAVAILABLE");
    assert!(
        body["retryAfter"].as_u64().is_some_and(|s| s >= 1),
        "{body}"
    );
    assert_eq!(
        retry_after_header,
        Some(body["retryAfter"].to_string().as_str())
    );
}

#[tokio::test]
async fn redis_down_is_503_and_reported_by_health() {
    let app = TestApp::spawn_with(|env| {
        // Nothing listens on port 1.
        env.insert("REDIS_URL".into(), "redis://127.0.0.1:1".into());
    })
    .await;
    let (status, body) = app.get_anonymous("/api/v1/mq/health").await;
    assert_eq!(status, 503);
    assert_eq!(body["status"], "down");
    assert_eq!(body["checks"]["redis"]["status"], "down");
    assert_eq!(body["checks"]["postgres"]["status"], "up");

    // Queue configuration lives in PostgreSQL, so it can still be created...
    app.create_queue(json!({"name": "orders"})).await;
    // ...but anything that needs the messages answers 503.
    for (method, path) in [
        (Method::GET, "/api/v1/mq/queues/orders"),
        (Method::POST, "/api/v1/mq/queues/orders/purge"),
        (Method::DELETE, "/api/v1/mq/queues/orders"),
    ] {
        let response = app.request(method, path).send().await.unwrap();
        let header = response
            .headers()
            .get("retry-after")
            .map(|v| v.to_str().unwrap().to_owned());
        let (status, body) = read(response).await;
        assert_unavailable(status, &body, header.as_deref());
    }
    // The failed delete removed nothing (the other queue is the audit trail's).
    let (status, list) = app
        .call(Method::GET, "/api/v1/mq/queues?search=orders", None)
        .await;
    assert_eq!(status, 200);
    assert_eq!(list["total"], 1);
}

#[tokio::test]
async fn postgres_cut_and_restored() {
    let (app, proxy) = TestApp::spawn_behind_postgres_proxy().await;
    app.create_queue(json!({"name": "before"})).await;

    proxy.cut();
    let (status, body) = app.get_anonymous("/api/v1/mq/health").await;
    assert_eq!(status, 503);
    assert_eq!(body["checks"]["postgres"]["status"], "down");
    assert_eq!(body["checks"]["redis"]["status"], "up");
    let response = app
        .request(Method::POST, "/api/v1/mq/queues")
        .json(&json!({"name": "during"}))
        .send()
        .await
        .unwrap();
    let header = response
        .headers()
        .get("retry-after")
        .map(|v| v.to_str().unwrap().to_owned());
    let (status, body) = read(response).await;
    assert_unavailable(status, &body, header.as_deref());

    proxy.restore();
    app.create_queue(json!({"name": "after"})).await;
    let (status, list) = app.call(Method::GET, "/api/v1/mq/queues", None).await;
    assert_eq!(status, 200);
    assert_eq!(
        list["total"], 3,
        "only the queues acknowledged with 201 (and the audit trail's) exist: {list}"
    );
}
