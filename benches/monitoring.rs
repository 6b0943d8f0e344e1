//! Cost of the monitoring views for a tenant with many queues, against a running service.
//!
//! Start the service (`scripts/run.sh`), then:
//!
//! ```sh
//! cargo bench --bench monitoring
//! ```
//!
//! Settings (environment): `BENCH_URL`, `JWT_SECRET`, `BENCH_QUEUES` (1000), `BENCH_CALLS` (30).
//! Creates the queues under a fresh tenant (one message and one subscription each), times each
//! view, then deletes the queues.

use std::time::{Duration, Instant};

use serde_json::json;

#[path = "support/mod.rs"]
mod support;

use support::{percentile, setting};

#[tokio::main]
async fn main() {
    let http = reqwest::Client::new();
    let (url, token) = (support::service_url(), support::tenant_token());
    let queues = setting("BENCH_QUEUES", 1000);
    let calls = setting("BENCH_CALLS", 30);
    let post = |path: String, body: serde_json::Value| {
        let request = http
            .post(format!("{url}{path}"))
            .bearer_auth(&token)
            .json(&body);
        async move {
            let response = request.send().await.expect("is the service running?");
            assert!(
                response.status().is_success(),
                "{path}: {}",
                response.status()
            );
        }
    };
    for n in 0..queues {
        let name = format!("bench-mon-{n}");
        post("/api/v1/mq/queues".into(), json!({"name": name})).await;
        post(
            "/api/v1/mq/subscriptions".into(),
            json!({"queue": name, "consumerGroup": "g", "consumerName": "c", "subscriptionType": "redis_consumer"}),
        )
        .await;
        post(
            "/api/v1/mq/publish".into(),
            json!({"queue": name, "payload": n}),
        )
        .await;
    }
    println!("monitoring views of a tenant with {queues} queues, {queues} subscriptions, {calls} calls each:");
    for path in [
        "/api/v1/mq/metrics",
        "/api/v1/mq/metrics/topics",
        "/api/v1/mq/metrics/consumers",
    ] {
        let mut took: Vec<Duration> = Vec::new();
        for _ in 0..calls {
            let started = Instant::now();
            let response = http
                .get(format!("{url}{path}"))
                .bearer_auth(&token)
                .send()
                .await
                .expect("view");
            assert!(response.status().is_success());
            let _ = response.bytes().await;
            took.push(started.elapsed());
        }
        took.sort();
        let ms = |d: Duration| d.as_secs_f64() * 1000.0;
        println!(
            "  {path}: p50 {:.1} ms, p99 {:.1} ms, max {:.1} ms",
            ms(percentile(&took, 0.5)),
            ms(percentile(&took, 0.99)),
            ms(percentile(&took, 1.0))
        );
    }
    for n in 0..queues {
        let _ = http
            .delete(format!("{url}/api/v1/mq/queues/bench-mon-{n}"))
            .bearer_auth(&token)
            .send()
            .await;
    }
}
