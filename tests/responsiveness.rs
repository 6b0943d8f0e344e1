//! The async threads stay free for every request while one tenant publishes large payloads
//! that are schema-checked, compressed and encrypted: that work runs on the blocking pool.
//! Alone in its binary, so no other test shares the machine's two cores with it.

mod common;

use common::TestApp;
use reqwest::Method;
use serde_json::json;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn health_answers_promptly_while_large_payloads_are_sealed() {
    let app = TestApp::spawn_with(|env| {
        env.insert(
            "MQ_ENCRYPTION_KEY".into(),
            "MDEyMzQ1Njc4OTAxMjM0NTY3ODkwMTIzNDU2Nzg5MDE=".into(),
        );
        // The production pool sizes: what is measured is the threads, not the pools.
        env.insert("REDIS_POOL_SIZE".into(), "64".into());
        env.insert("DATABASE_MAX_CONNECTIONS".into(), "20".into());
    })
    .await;
    app.create_queue(json!({
        "name": "bulk", "compressionType": "zstd", "encrypted": true,
        "schemaDefinition": {"type": "object", "required": ["data"],
            "properties": {"data": {"type": "string", "pattern": "^[a-z0-9]+$"}}}
    }))
    .await;
    // 1 MB of incompressible text per message, serialized once.
    let mut seed = 0x2545_f491_4f6c_dd1du64;
    let data: String = (0..1_000_000)
        .map(|_| {
            seed ^= seed << 13;
            seed ^= seed >> 7;
            seed ^= seed << 17;
            char::from(b"abcdefghijklmnopqrstuvwxyz0123456789"[(seed % 36) as usize])
        })
        .collect();
    let body =
        axum::body::Bytes::from(json!({"queue": "bulk", "payload": {"data": data}}).to_string());
    let stop = tokio_util::sync::CancellationToken::new();
    let mut publishers = tokio::task::JoinSet::new();
    for _ in 0..8 {
        let request = app
            .request(Method::POST, "/api/v1/mq/publish")
            .header("content-type", "application/json");
        let (body, stop) = (body.clone(), stop.clone());
        publishers.spawn(async move {
            let mut published = 0u32;
            while !stop.is_cancelled() {
                let response = request
                    .try_clone()
                    .unwrap()
                    .body(body.clone())
                    .send()
                    .await
                    .unwrap();
                assert_eq!(response.status(), 201, "{}", response.text().await.unwrap());
                published += 1;
            }
            published
        });
    }
    let mut slowest = std::time::Duration::ZERO;
    let probes = 40;
    for _ in 0..probes {
        tokio::time::sleep(std::time::Duration::from_millis(50)).await;
        let started = std::time::Instant::now();
        let (status, _) = app.get_anonymous("/api/v1/mq/health").await;
        slowest = slowest.max(started.elapsed());
        assert_eq!(status, 200);
    }
    stop.cancel();
    let mut published = 0;
    while let Some(count) = publishers.join_next().await {
        published += count.unwrap();
    }
    assert!(
        published >= 8,
        "the publishers kept publishing: {published}"
    );
    assert!(
        slowest < std::time::Duration::from_millis(100),
        "health took {slowest:?} at worst while {published} 1 MB messages were published"
    );
}
