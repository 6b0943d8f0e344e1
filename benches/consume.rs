//! End-to-end consumption against a running service: publish → pull latency at a fixed rate,
//! and the highest sustained publish + pull + ack throughput.
//!
//! Start the service (`scripts/run.sh`), then:
//!
//! ```sh
//! cargo bench --bench consume
//! ```
//!
//! Settings (environment): `BENCH_URL` (http://127.0.0.1:3010), `JWT_SECRET` (the development
//! secret of .env.example), `BENCH_RATE` (1000 msg/s), `BENCH_SECONDS` (10),
//! `BENCH_CONSUMERS` (4), `BENCH_THROUGHPUT_MESSAGES` (100000), `BENCH_CONSUMER_URL` (default
//! `BENCH_URL`: another instance of the same deployment, to measure consumers woken by
//! publishes on another instance).

use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use serde_json::{json, Value};

#[path = "support/mod.rs"]
mod support;

use support::{micros_now, percentile, setting};

#[derive(Clone)]
struct Client {
    http: reqwest::Client,
    url: String,
    token: String,
}

impl Client {
    fn new() -> Client {
        Client {
            http: reqwest::Client::builder()
                .pool_max_idle_per_host(64)
                .build()
                .expect("client"),
            url: support::service_url(),
            token: support::tenant_token(),
        }
    }

    /// The same tenant, talking to the instance at `BENCH_CONSUMER_URL` when it is set.
    fn for_consumers(&self) -> Client {
        let mut client = self.clone();
        if let Ok(url) = std::env::var("BENCH_CONSUMER_URL") {
            client.url = url;
        }
        client
    }

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

    async fn delete(&self, path: &str) {
        let _ = self
            .http
            .delete(format!("{}{path}", self.url))
            .bearer_auth(&self.token)
            .send()
            .await;
    }

    /// A queue and one pull subscription on it.
    async fn setup(&self, name: &str) -> String {
        self.post(
            "/api/v1/mq/queues",
            &json!({"name": name, "partitionCount": 4, "maxLength": 100_000_000}),
        )
        .await;
        let subscription = self
            .post(
                "/api/v1/mq/subscriptions",
                &json!({"queue": name, "consumerGroup": "bench", "consumerName": "bench-1",
                        "subscriptionType": "redis_consumer", "maxPollRecords": 500}),
            )
            .await;
        subscription["id"].as_str().unwrap().to_owned()
    }
}

/// Pulls and acks until `stop`; reports each message's payload to `seen`.
async fn consume(
    client: Client,
    subscription: String,
    stop: Arc<AtomicBool>,
    seen: impl Fn(&Value) + Send,
) {
    let pull = format!("/api/v1/mq/subscriptions/{subscription}/pull");
    let ack = format!("/api/v1/mq/subscriptions/{subscription}/ack");
    while !stop.load(Ordering::Relaxed) {
        let reply = client
            .post(&pull, &json!({"maxMessages": 200, "waitMs": 500}))
            .await;
        let messages = reply["messages"].as_array().cloned().unwrap_or_default();
        if messages.is_empty() {
            continue;
        }
        for message in &messages {
            seen(&message["payload"]);
        }
        let ack_ids: Vec<&Value> = messages.iter().map(|m| &m["ackId"]).collect();
        client.post(&ack, &json!({"ackIds": ack_ids})).await;
    }
}

async fn latency_at_fixed_rate(client: &Client, rate: u64, seconds: u64, consumers: u64) {
    let name = format!(
        "bench-e2e-{}",
        &uuid::Uuid::new_v4().simple().to_string()[..8]
    );
    let subscription = client.setup(&name).await;
    let latencies = Arc::new(Mutex::new(Vec::new()));
    let stop = Arc::new(AtomicBool::new(false));
    let mut workers = Vec::new();
    for _ in 0..consumers {
        let latencies = latencies.clone();
        workers.push(tokio::spawn(consume(
            client.for_consumers(),
            subscription.clone(),
            stop.clone(),
            move |payload| {
                if let Some(sent) = payload["sentAt"].as_i64() {
                    latencies
                        .lock()
                        .unwrap()
                        .push((micros_now() - sent) as f64 / 1000.0);
                }
            },
        )));
    }
    // Publish `rate` messages a second, in ticks of 10 ms.
    let total = support::publish_at_rate(
        &client.http,
        &client.url,
        &client.token,
        &name,
        rate,
        seconds,
    )
    .await;
    let deadline = Instant::now() + Duration::from_secs(30);
    while latencies.lock().unwrap().len() < total as usize && Instant::now() < deadline {
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    stop.store(true, Ordering::Relaxed);
    for worker in workers {
        let _ = worker.await;
    }
    let mut latencies = latencies.lock().unwrap().clone();
    latencies.sort_by(f64::total_cmp);
    println!(
        "publish -> pull at {rate} msg/s for {seconds} s, {consumers} consumers{}: {} of {total} received; latency ms p50 {:.2} p99 {:.2} max {:.2}",
        if client.for_consumers().url == client.url { "" } else { " on another instance" },
        latencies.len(),
        percentile(&latencies, 0.5),
        percentile(&latencies, 0.99),
        percentile(&latencies, 1.0),
    );
    client.delete(&format!("/api/v1/mq/queues/{name}")).await;
}

async fn sustained_throughput(client: &Client, messages: u64, consumers: u64) {
    let name = format!(
        "bench-tput-{}",
        &uuid::Uuid::new_v4().simple().to_string()[..8]
    );
    let subscription = client.setup(&name).await;
    let received = Arc::new(AtomicUsize::new(0));
    let stop = Arc::new(AtomicBool::new(false));
    let started = Instant::now();
    let mut workers = Vec::new();
    for _ in 0..consumers {
        let received = received.clone();
        workers.push(tokio::spawn(consume(
            client.for_consumers(),
            subscription.clone(),
            stop.clone(),
            move |_| {
                received.fetch_add(1, Ordering::Relaxed);
            },
        )));
    }
    let batches = messages / 100;
    let next = Arc::new(AtomicUsize::new(0));
    let mut publishers = Vec::new();
    for _ in 0..4 {
        let (client, name, next) = (client.clone(), name.clone(), next.clone());
        publishers.push(tokio::spawn(async move {
            let batch: Vec<Value> = (0..100).map(|n| json!({"payload": {"n": n}})).collect();
            while (next.fetch_add(1, Ordering::Relaxed) as u64) < batches {
                client
                    .post(
                        "/api/v1/mq/publish/batch",
                        &json!({"queue": name, "messages": batch}),
                    )
                    .await;
            }
        }));
    }
    for publisher in publishers {
        publisher.await.expect("publisher");
    }
    let published_in = started.elapsed();
    let deadline = Instant::now() + Duration::from_secs(120);
    while (received.load(Ordering::Relaxed) as u64) < batches * 100 && Instant::now() < deadline {
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    let elapsed = started.elapsed();
    stop.store(true, Ordering::Relaxed);
    for worker in workers {
        let _ = worker.await;
    }
    let count = received.load(Ordering::Relaxed);
    println!(
        "sustained publish + pull + ack, {consumers} consumers: {count} messages published in {:.2} s and all pulled and acked in {:.2} s = {:.0} msg/s end to end",
        published_in.as_secs_f64(),
        elapsed.as_secs_f64(),
        count as f64 / elapsed.as_secs_f64()
    );
    client.delete(&format!("/api/v1/mq/queues/{name}")).await;
}

#[tokio::main]
async fn main() {
    let client = Client::new();
    let consumers = setting("BENCH_CONSUMERS", 4);
    latency_at_fixed_rate(
        &client,
        setting("BENCH_RATE", 1000),
        setting("BENCH_SECONDS", 10),
        consumers,
    )
    .await;
    sustained_throughput(
        &client,
        setting("BENCH_THROUGHPUT_MESSAGES", 100_000),
        consumers,
    )
    .await;
}
