//! Webhook delivery against a running service, to a fast receiver this benchmark runs itself:
//! publish → webhook latency at a fixed rate, and the highest sustained delivery rate.
//!
//! Start the service (`scripts/run.sh`), then:
//!
//! ```sh
//! cargo bench --bench webhook
//! ```
//!
//! Settings (environment): `BENCH_URL` (http://127.0.0.1:3010), `JWT_SECRET` (the development
//! secret of .env.example), `BENCH_RATE` (1000 msg/s), `BENCH_SECONDS` (10),
//! `BENCH_CONCURRENCY` (handlerConfig.concurrency, 32), `BENCH_THROUGHPUT_MESSAGES` (50000).
//! The service must be allowed to reach 127.0.0.1 (the default `WEBHOOK_DENIED_NETWORKS`).

use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use axum::extract::State;
use axum::Json;
use serde_json::{json, Value};

#[path = "support/mod.rs"]
mod support;

use support::{micros_now, percentile, setting};

#[derive(Default)]
struct Received {
    count: AtomicUsize,
    latencies_ms: Mutex<Vec<f64>>,
}

async fn receive(State(received): State<Arc<Received>>, Json(body): Json<Value>) -> &'static str {
    if let Some(sent) = body["payload"]["sentAt"].as_i64() {
        received
            .latencies_ms
            .lock()
            .unwrap()
            .push((micros_now() - sent) as f64 / 1000.0);
    }
    received.count.fetch_add(1, Ordering::Relaxed);
    "ok"
}

struct Bench {
    http: reqwest::Client,
    url: String,
    token: String,
    receiver: String,
}

impl Bench {
    async fn post(&self, path: &str, body: &Value) -> Value {
        let response = self
            .http
            .post(format!("{}{path}", self.url))
            .bearer_auth(&self.token)
            .json(body)
            .send()
            .await
            .expect("is the service running? start it with scripts/run.sh");
        assert!(
            response.status().is_success(),
            "{path}: {}",
            response.status()
        );
        response.json().await.expect("JSON answer")
    }

    async fn setup(&self, name: &str, concurrency: u64) {
        self.post(
            "/api/v1/mq/queues",
            &json!({"name": name, "partitionCount": 4, "maxLength": 100_000_000}),
        )
        .await;
        self.post(
            "/api/v1/mq/subscriptions",
            &json!({"queue": name, "consumerGroup": "bench", "consumerName": "bench-1",
                    "subscriptionType": "webhook",
                    "handlerConfig": {"url": self.receiver, "concurrency": concurrency}}),
        )
        .await;
        // The dispatcher starts serving within a second.
        tokio::time::sleep(Duration::from_millis(1200)).await;
    }

    async fn delete(&self, name: &str) {
        let _ = self
            .http
            .delete(format!("{}/api/v1/mq/queues/{name}", self.url))
            .bearer_auth(&self.token)
            .send()
            .await;
    }
}

async fn wait_for(received: &Received, count: usize) {
    let deadline = Instant::now() + Duration::from_secs(120);
    while received.count.load(Ordering::Relaxed) < count && Instant::now() < deadline {
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

#[tokio::main]
async fn main() {
    let received = Arc::new(Received::default());
    let app = axum::Router::new()
        .fallback(axum::routing::post(receive))
        .with_state(received.clone());
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0")
        .await
        .expect("bind receiver");
    let receiver = format!("http://{}/hook", listener.local_addr().unwrap());
    tokio::spawn(async move { axum::serve(listener, app).await });

    let bench = Arc::new(Bench {
        http: reqwest::Client::builder()
            .pool_max_idle_per_host(64)
            .build()
            .expect("client"),
        url: support::service_url(),
        token: support::tenant_token(),
        receiver,
    });
    let concurrency = setting("BENCH_CONCURRENCY", 32);

    // Fixed rate: single publishes, each carrying its send time.
    let (rate, seconds) = (setting("BENCH_RATE", 1000), setting("BENCH_SECONDS", 10));
    let name = format!(
        "bench-hook-{}",
        &uuid::Uuid::new_v4().simple().to_string()[..8]
    );
    bench.setup(&name, concurrency).await;
    let total =
        support::publish_at_rate(&bench.http, &bench.url, &bench.token, &name, rate, seconds).await;
    wait_for(&received, total as usize).await;
    let mut latencies = received.latencies_ms.lock().unwrap().clone();
    latencies.sort_by(f64::total_cmp);
    println!(
        "publish -> webhook at {rate} msg/s for {seconds} s, concurrency {concurrency}: {} of {total} delivered; latency ms p50 {:.2} p99 {:.2} max {:.2}",
        latencies.len(),
        percentile(&latencies, 0.5),
        percentile(&latencies, 0.99),
        percentile(&latencies, 1.0)
    );
    bench.delete(&name).await;

    // Sustained: a backlog published in batches, delivered as fast as the service can.
    let messages = setting("BENCH_THROUGHPUT_MESSAGES", 50_000);
    let name = format!(
        "bench-hook-{}",
        &uuid::Uuid::new_v4().simple().to_string()[..8]
    );
    bench.setup(&name, concurrency).await;
    let before = received.count.load(Ordering::Relaxed);
    let started = Instant::now();
    let batch: Vec<Value> = (0..100).map(|n| json!({"payload": {"n": n}})).collect();
    for _ in 0..messages / 100 {
        bench
            .post(
                "/api/v1/mq/publish/batch",
                &json!({"queue": name, "messages": batch}),
            )
            .await;
    }
    let published_in = started.elapsed();
    let expected = before + (messages / 100 * 100) as usize;
    wait_for(&received, expected).await;
    let elapsed = started.elapsed();
    let delivered = received.count.load(Ordering::Relaxed) - before;
    println!(
        "sustained delivery, concurrency {concurrency}: {delivered} messages published in {:.2} s, all delivered in {:.2} s = {:.0} msg/s",
        published_in.as_secs_f64(),
        elapsed.as_secs_f64(),
        delivered as f64 / elapsed.as_secs_f64()
    );
    bench.delete(&name).await;
}
