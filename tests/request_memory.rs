//! No single request can exhaust the service: a 16 MiB body of any shape raises the
//! service's peak resident memory (VmHWM) by at most 64 MB. The service runs as a process of
//! its own here (the binary `cargo test` builds), so the peak read is its alone, not this
//! test's client's.
//!
//! `cargo test --test request_memory -- --nocapture` prints the rise per shape.

mod common;

use std::process::{Child, Stdio};
use std::time::Duration;

use common::{base_env, eventually, free_port, spawn_service, token_for, TestDatabase, TestRedis};
use serde_json::json;
use uuid::Uuid;

const MAX_RISE_KB: u64 = 64 * 1024;
const BODY_BYTES: usize = 16 * 1024 * 1024 - 4096;

struct Service(Child);

impl Drop for Service {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

fn peak_kb(pid: u32) -> u64 {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).expect("proc status");
    status
        .lines()
        .find_map(|line| line.strip_prefix("VmHWM:"))
        .and_then(|rest| rest.split_whitespace().next())
        .and_then(|kb| kb.parse().ok())
        .expect("VmHWM")
}

/// `prefix` + `item` repeated (comma separated) + `suffix`, about `BODY_BYTES` long.
fn repeated(prefix: &str, item: &str, suffix: &str) -> String {
    let count = (BODY_BYTES - prefix.len() - suffix.len()) / (item.len() + 1);
    let mut body = String::with_capacity(BODY_BYTES);
    body.push_str(prefix);
    for n in 0..count {
        if n > 0 {
            body.push(',');
        }
        body.push_str(item);
    }
    body.push_str(suffix);
    body
}

#[tokio::test]
async fn a_sixteen_mebibyte_request_of_any_shape_raises_peak_memory_by_at_most_64_mb() {
    let database = TestDatabase::create().await;
    let redis = TestRedis::new();
    let port = free_port();
    let mut env = base_env(&database.url, &redis.prefix);
    env.insert("PORT".into(), port.to_string());
    env.insert("RUST_LOG".into(), "error".into());
    env.insert("TENANT_RATE_LIMIT_RPS".into(), "0".into());
    env.insert("TENANT_RATE_LIMIT_BYTES_PER_SEC".into(), "0".into());
    let service = Service(spawn_service(&env, Stdio::null()));
    let pid = service.0.id();
    let client = reqwest::Client::builder().no_proxy().build().unwrap();
    let url = |path: &str| format!("http://127.0.0.1:{port}{path}");
    assert!(
        eventually(Duration::from_secs(30), || async {
            client.get(url("/api/v1/mq/health")).send().await.is_ok()
        })
        .await,
        "the service started"
    );
    let token = token_for(Uuid::new_v4(), "tester");
    let call = |path: &'static str, body: String| {
        let (client, token, url) = (&client, &token, url(path));
        async move {
            let response = client
                .post(url)
                .bearer_auth(token)
                .header("content-type", "application/json")
                .body(body)
                .send()
                .await
                .expect("request");
            let status = response.status().as_u16();
            (status, response.text().await.unwrap_or_default())
        }
    };
    let (status, body) = call("/api/v1/mq/queues", json!({"name": "q"}).to_string()).await;
    assert_eq!(status, 201, "{body}");
    let (status, body) = call(
        "/api/v1/mq/subscriptions",
        json!({"queue": "q", "consumerGroup": "g", "consumerName": "c",
               "subscriptionType": "redis_consumer"})
        .to_string(),
    )
    .await;
    assert_eq!(status, 201, "{body}");
    let subscription: serde_json::Value = serde_json::from_str(&body).unwrap();
    let ack_path: &'static str = Box::leak(
        format!(
            "/api/v1/mq/subscriptions/{}/ack",
            subscription["id"].as_str().unwrap()
        )
        .into_boxed_str(),
    );
    // Warm up: a publish of every kind, so what the service keeps anyway is in the baseline.
    let (status, _) = call(
        "/api/v1/mq/publish",
        json!({"queue": "q", "payload": 1}).to_string(),
    )
    .await;
    assert_eq!(status, 201);
    let (status, _) = call(
        "/api/v1/mq/publish/batch",
        json!({"queue": "q", "messages": [{"payload": 1}]}).to_string(),
    )
    .await;
    assert_eq!(status, 201);
    tokio::time::sleep(Duration::from_secs(1)).await;
    let baseline = peak_kb(pid);

    let shapes: Vec<(&str, &'static str, String)> = vec![
        (
            "a batch of millions of empty messages",
            "/api/v1/mq/publish/batch",
            repeated(r#"{"queue":"q","messages":["#, "{}", "]}"),
        ),
        (
            "a payload of millions of empty objects",
            "/api/v1/mq/publish",
            repeated(r#"{"queue":"q","payload":["#, "{}", "]}"),
        ),
        (
            "a payload of millions of numbers",
            "/api/v1/mq/publish",
            repeated(r#"{"queue":"q","payload":["#, "1", "]}"),
        ),
        (
            "a payload of millions of keys",
            "/api/v1/mq/publish",
            repeated(r#"{"queue":"q","payload":{"#, r#""k":0"#, "}}"),
        ),
        (
            "millions of headers",
            "/api/v1/mq/publish",
            repeated(
                r#"{"queue":"q","payload":1,"headers":{"#,
                r#""h":"v""#,
                "}}",
            ),
        ),
        (
            "millions of ackIds",
            ack_path,
            repeated(r#"{"ackIds":["#, r#""a""#, "]}"),
        ),
        (
            "a payload of one-key objects",
            "/api/v1/mq/publish",
            repeated(r#"{"queue":"q","payload":["#, r#"{"a":0}"#, "]}"),
        ),
        (
            "one 16 MiB string",
            "/api/v1/mq/publish",
            format!(
                r#"{{"queue":"q","payload":"{}"}}"#,
                "x".repeat(BODY_BYTES - 40)
            ),
        ),
        (
            "deep nesting",
            "/api/v1/mq/publish",
            format!(
                r#"{{"queue":"q","payload":{}{}}}"#,
                "[".repeat(BODY_BYTES / 2 - 40),
                "]".repeat(BODY_BYTES / 2 - 40)
            ),
        ),
    ];
    for (shape, path, body) in shapes {
        let (status, answer) = call(path, body).await;
        let rise = peak_kb(pid).saturating_sub(baseline);
        eprintln!("{shape}: {status}, peak rose by {} MB", rise / 1024);
        assert!(
            (400..500).contains(&status),
            "{shape}: refused with a client error, not {status}: {}",
            &answer[..answer.len().min(300)]
        );
        assert!(
            rise <= MAX_RISE_KB,
            "{shape}: the service's peak memory rose by {} MB",
            rise / 1024
        );
    }
    // Just within what decoding may take: accepted, and within the bound all the same.
    let within = format!(
        r#"{{"queue":"q","payload":[{}]}}"#,
        vec![r#"{"a":0}"#; 36_000].join(",")
    );
    let (status, answer) = call("/api/v1/mq/publish", within).await;
    // Its record is written behind the publish: the recorder's decoding counts too.
    tokio::time::sleep(Duration::from_secs(2)).await;
    let rise = peak_kb(pid).saturating_sub(baseline);
    eprintln!(
        "36 000 one-key objects (accepted): {status}, peak rose by {} MB",
        rise / 1024
    );
    assert_eq!(status, 201, "{answer}");
    assert!(
        rise <= MAX_RISE_KB,
        "the service's peak memory rose by {} MB",
        rise / 1024
    );
    drop(service);
}
