//! Secrets never reach the logs, at any level, even when things fail.

mod common;

use std::io::Write;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use common::receiver::{Receiver, Reply};
use common::{eventually, TestApp, JWT_SECRET, SERVICE_TOKEN};
use reqwest::Method;
use serde_json::json;

#[derive(Clone, Default)]
struct Captured(Arc<Mutex<Vec<u8>>>);

impl Write for Captured {
    fn write(&mut self, bytes: &[u8]) -> std::io::Result<usize> {
        self.0.lock().unwrap().extend_from_slice(bytes);
        Ok(bytes.len())
    }

    fn flush(&mut self) -> std::io::Result<()> {
        Ok(())
    }
}

const ENCRYPTION_KEY: &str = "MDEyMzQ1Njc4OTAxMjM0NTY3ODkwMTIzNDU2Nzg5MDE=";
const WEBHOOK_SECRET: &str = "whsec-must-not-be-logged-4242";

#[tokio::test]
async fn secrets_are_absent_from_debug_logs() {
    let captured = Captured::default();
    let writer = captured.clone();
    tracing_subscriber::fmt()
        .with_env_filter("debug")
        .with_writer(move || writer.clone())
        .json()
        .init();

    let app = TestApp::spawn_with(|env| {
        env.insert("MQ_ENCRYPTION_KEY".into(), ENCRYPTION_KEY.into());
    })
    .await;
    let failing = Receiver::start(Reply::Status(500)).await;
    app.create_queue(json!({"name": "q", "encrypted": true}))
        .await;
    app.call(
        Method::POST,
        "/api/v1/mq/subscriptions",
        Some(json!({"queue": "q", "consumerGroup": "g", "consumerName": "c", "subscriptionType": "webhook",
                    "handlerConfig": {"url": failing.url("/"), "secret": WEBHOOK_SECRET},
                    "retryDelayMs": 10, "maxRetryAttempts": 1})),
    )
    .await;
    app.call(
        Method::POST,
        "/api/v1/mq/publish",
        Some(json!({"queue": "q", "payload": "p"})),
    )
    .await;
    assert!(
        eventually(Duration::from_secs(15), || async {
            failing.received().len() >= 2
        })
        .await
    );
    // Failed authentication of both kinds.
    app.anonymous(Method::GET, "/api/v1/mq/queues")
        .bearer_auth("forged.token.value")
        .send()
        .await
        .unwrap();
    app.anonymous(Method::GET, "/internal/mq/metrics")
        .header("x-service-token", "wrong")
        .send()
        .await
        .unwrap();
    let config = mq::config::Config::from_lookup(|name| match name {
        "DATABASE_URL" => Some("postgres://localhost/db".into()),
        "REDIS_URL" => Some("redis://localhost".into()),
        "JWT_SECRET" => Some(JWT_SECRET.into()),
        "INTERNAL_SERVICE_TOKEN" => Some(SERVICE_TOKEN.into()),
        "MQ_ENCRYPTION_KEY" => Some(ENCRYPTION_KEY.into()),
        _ => None,
    })
    .unwrap();
    tracing::info!(config = ?config, "configuration");
    tokio::time::sleep(Duration::from_millis(300)).await;

    let logs = String::from_utf8(captured.0.lock().unwrap().clone()).unwrap();
    assert!(logs.contains("configuration"), "logs were captured");
    for secret in [WEBHOOK_SECRET, JWT_SECRET, SERVICE_TOKEN, ENCRYPTION_KEY] {
        assert!(!logs.contains(secret), "a secret was logged");
    }
}
