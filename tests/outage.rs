//! Dependency outages: a down Redis or PostgreSQL answers 503 with `retryAfter`, health says
//! which one is down, and the service recovers by itself when it comes back.

mod common;

use common::{assert_error, read, TestApp};
use reqwest::Method;
use serde_json::{json, Value};

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
        common::unreachable_redis(env);
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

/// A private redis-server with an append-only file fsynced on every write.
struct PrivateRedis {
    port: u16,
    dir: std::path::PathBuf,
    child: Option<std::process::Child>,
}

impl PrivateRedis {
    fn start() -> PrivateRedis {
        let port = common::free_port();
        let dir =
            std::env::temp_dir().join(format!("mqtest-redis-{}", uuid::Uuid::new_v4().simple()));
        std::fs::create_dir_all(&dir).unwrap();
        let mut redis = PrivateRedis {
            port,
            dir,
            child: None,
        };
        redis.launch();
        redis
    }

    fn launch(&mut self) {
        let child = std::process::Command::new("redis-server")
            .args([
                "--port",
                &self.port.to_string(),
                "--bind",
                "127.0.0.1",
                "--save",
                "",
            ])
            .args(["--appendonly", "yes", "--appendfsync", "always"])
            .arg("--dir")
            .arg(&self.dir)
            .stdout(std::process::Stdio::null())
            .spawn()
            .expect("redis-server on PATH (scripts/test.sh installs it)");
        self.child = Some(child);
        let deadline = std::time::Instant::now() + std::time::Duration::from_secs(10);
        while std::net::TcpStream::connect(("127.0.0.1", self.port)).is_err() {
            assert!(
                std::time::Instant::now() < deadline,
                "private redis did not start"
            );
            std::thread::sleep(std::time::Duration::from_millis(50));
        }
    }

    /// Kills the server outright (no shutdown save) and starts it again on the same files.
    fn crash_and_restart(&mut self) {
        if let Some(mut child) = self.child.take() {
            let _ = child.kill();
            let _ = child.wait();
        }
        self.launch();
    }

    fn url(&self) -> String {
        format!("redis://127.0.0.1:{}", self.port)
    }
}

impl Drop for PrivateRedis {
    fn drop(&mut self) {
        if let Some(mut child) = self.child.take() {
            let _ = child.kill();
            let _ = child.wait();
        }
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn acknowledged_messages_survive_a_redis_crash() {
    let mut redis = PrivateRedis::start();
    let url = redis.url();
    let app = TestApp::spawn_with(|env| {
        env.insert("REDIS_URL".into(), url.clone());
    })
    .await;
    app.create_queue(json!({"name": "q", "partitionCount": 2}))
        .await;
    let (status, subscription) = app
        .call(
            Method::POST,
            "/api/v1/mq/subscriptions",
            Some(
                json!({"queue": "q", "consumerGroup": "g", "consumerName": "c",
                        "subscriptionType": "redis_consumer", "offsetResetPolicy": "earliest"}),
            ),
        )
        .await;
    assert_eq!(status, 201, "{subscription}");
    let id = subscription["id"].as_str().unwrap().to_owned();
    let mut acknowledged = std::collections::BTreeSet::new();
    for n in 0..40 {
        let (status, result) = app
            .call(
                Method::POST,
                "/api/v1/mq/publish",
                Some(json!({"queue": "q", "payload": n})),
            )
            .await;
        assert_eq!(status, 201);
        acknowledged.insert(result["messageId"].as_str().unwrap().to_owned());
    }
    for n in 0..5 {
        let (status, result) = app
            .call(
                Method::POST,
                "/api/v1/mq/publish/delayed",
                Some(json!({"queue": "q", "payload": n, "delayMs": 1500})),
            )
            .await;
        assert_eq!(status, 201);
        acknowledged.insert(result["messageId"].as_str().unwrap().to_owned());
    }

    redis.crash_and_restart();

    // After the restart (connections re-made, Lua scripts loaded again) every acknowledged
    // message is delivered.
    let mut received = std::collections::BTreeSet::new();
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(30);
    while received != acknowledged && std::time::Instant::now() < deadline {
        let (status, body) = app
            .call(
                Method::POST,
                &format!("/api/v1/mq/subscriptions/{id}/pull"),
                Some(json!({"maxMessages": 100, "waitMs": 500})),
            )
            .await;
        if status != 200 {
            tokio::time::sleep(std::time::Duration::from_millis(200)).await;
            continue;
        }
        let messages = body["messages"].as_array().unwrap().clone();
        let ack_ids: Vec<Value> = messages.iter().map(|m| m["ackId"].clone()).collect();
        for message in &messages {
            received.insert(message["messageId"].as_str().unwrap().to_owned());
        }
        app.call(
            Method::POST,
            &format!("/api/v1/mq/subscriptions/{id}/ack"),
            Some(json!({"ackIds": ack_ids})),
        )
        .await;
    }
    assert_eq!(received, acknowledged, "nothing acknowledged was lost");
}
