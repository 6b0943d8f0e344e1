//! Publish throughput and latency against a running service.
//!
//! Start the service (`scripts/run.sh`), then:
//!
//! ```sh
//! cargo bench --bench publish
//! ```
//!
//! Settings (environment): `BENCH_URL` (http://127.0.0.1:3010), `JWT_SECRET` (the
//! development secret of .env.example), `BENCH_MESSAGES` (20000), `BENCH_CONCURRENCY` (32),
//! `BENCH_BATCH_SIZE` (100), `BENCH_PAYLOAD_BYTES` (256), `BENCH_PARTITIONS` (4).
//! It creates a queue of its own, prints throughput and latency percentiles, then deletes it.

use std::sync::Arc;
use std::time::{Duration, Instant};

use serde_json::{json, Value};

#[path = "support/mod.rs"]
mod support;

use support::{setting, tenant_token};

struct Settings {
    url: String,
    token: String,
    messages: usize,
    concurrency: usize,
    batch_size: usize,
    payload_bytes: usize,
    partitions: usize,
}

fn settings() -> Settings {
    Settings {
        url: support::service_url(),
        token: tenant_token(),
        messages: setting("BENCH_MESSAGES", 20_000) as usize,
        concurrency: setting("BENCH_CONCURRENCY", 32) as usize,
        batch_size: setting("BENCH_BATCH_SIZE", 100) as usize,
        payload_bytes: setting("BENCH_PAYLOAD_BYTES", 256) as usize,
        partitions: setting("BENCH_PARTITIONS", 4) as usize,
    }
}

/// Runs `requests` requests built by `body(i)` against `path` with `concurrency` workers;
/// returns each request's latency and the wall time.
async fn run(
    client: &reqwest::Client,
    settings: &Settings,
    path: &str,
    requests: usize,
    body: Arc<dyn Fn(usize) -> Value + Send + Sync>,
) -> (Vec<Duration>, Duration) {
    let next = Arc::new(std::sync::atomic::AtomicUsize::new(0));
    let started = Instant::now();
    let mut workers = Vec::new();
    for _ in 0..settings.concurrency {
        let (client, next, body) = (client.clone(), next.clone(), body.clone());
        let url = format!("{}{}", settings.url, path);
        let token = settings.token.clone();
        workers.push(tokio::spawn(async move {
            let mut latencies = Vec::new();
            loop {
                let i = next.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
                if i >= requests {
                    return latencies;
                }
                let sent = Instant::now();
                let response = client
                    .post(&url)
                    .bearer_auth(&token)
                    .json(&body(i))
                    .send()
                    .await
                    .expect("request");
                let status = response.status();
                let _ = response.bytes().await;
                assert!(status.is_success(), "publish failed with {status}");
                latencies.push(sent.elapsed());
            }
        }));
    }
    let mut latencies = Vec::with_capacity(requests);
    for worker in workers {
        latencies.extend(worker.await.expect("worker"));
    }
    (latencies, started.elapsed())
}

fn percentile(sorted: &[Duration], p: f64) -> f64 {
    support::percentile(sorted, p).as_secs_f64() * 1000.0
}

fn report(label: &str, mut latencies: Vec<Duration>, wall: Duration, messages_per_request: usize) {
    latencies.sort();
    let requests = latencies.len();
    println!(
        "{label}: {requests} requests, {} messages in {:.2} s = {:.0} msg/s; latency ms p50 {:.2} p95 {:.2} p99 {:.2} max {:.2}",
        requests * messages_per_request,
        wall.as_secs_f64(),
        (requests * messages_per_request) as f64 / wall.as_secs_f64(),
        percentile(&latencies, 0.50),
        percentile(&latencies, 0.95),
        percentile(&latencies, 0.99),
        percentile(&latencies, 1.0),
    );
}

#[tokio::main]
async fn main() {
    let settings = settings();
    let client = reqwest::Client::builder()
        .pool_max_idle_per_host(settings.concurrency)
        .build()
        .expect("client");
    let queue = format!("bench-{}", &uuid::Uuid::new_v4().simple().to_string()[..8]);
    let created = client
        .post(format!("{}/api/v1/mq/queues", settings.url))
        .bearer_auth(&settings.token)
        .json(&json!({"name": queue, "partitionCount": settings.partitions, "maxLength": 100_000_000}))
        .send()
        .await
        .expect("is the service running? start it with scripts/run.sh");
    assert!(
        created.status().is_success(),
        "create queue: {}",
        created.status()
    );
    println!(
        "publish benchmark: {} messages of {} payload bytes, {} concurrent clients, {} partitions, against {}",
        settings.messages, settings.payload_bytes, settings.concurrency, settings.partitions, settings.url
    );

    let recorded_before = recorded(&client, &settings).await;
    let payload = json!({"data": "x".repeat(settings.payload_bytes.saturating_sub(11))});
    let single_queue = queue.clone();
    let single_payload = payload.clone();
    let (latencies, wall) = run(
        &client,
        &settings,
        "/api/v1/mq/publish",
        settings.messages,
        Arc::new(move |i| json!({"queue": single_queue, "payload": single_payload, "key": format!("k{}", i % 64)})),
    )
    .await;
    report("single", latencies, wall, 1);

    let batch_queue = queue.clone();
    let batch_size = settings.batch_size;
    let batch: Vec<Value> = (0..batch_size)
        .map(|_| json!({"payload": payload}))
        .collect();
    let (latencies, wall) = run(
        &client,
        &settings,
        "/api/v1/mq/publish/batch",
        settings.messages / batch_size.max(1),
        Arc::new(move |_| json!({"queue": batch_queue, "messages": batch})),
    )
    .await;
    report(
        &format!("batch of {batch_size}"),
        latencies,
        wall,
        batch_size,
    );

    // The recorder writes message_records behind publishing: time until it has caught up.
    let published = settings.messages + (settings.messages / batch_size.max(1)) * batch_size;
    let waiting_since = Instant::now();
    let deadline = waiting_since + Duration::from_secs(300);
    while recorded(&client, &settings).await < recorded_before + published as u64
        && Instant::now() < deadline
    {
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    let recorded_now = recorded(&client, &settings).await - recorded_before;
    println!(
        "records: {recorded_now} of {published} in message_records {:.2} s after the last publish",
        waiting_since.elapsed().as_secs_f64()
    );

    let _ = client
        .delete(format!("{}/api/v1/mq/queues/{queue}", settings.url))
        .bearer_auth(&settings.token)
        .send()
        .await;
}

/// Messages this service instance has recorded in PostgreSQL so far (from `/status`).
async fn recorded(client: &reqwest::Client, settings: &Settings) -> u64 {
    let status: Value = client
        .get(format!("{}/api/v1/mq/status", settings.url))
        .send()
        .await
        .expect("status")
        .json()
        .await
        .expect("status body");
    status["recordWriter"]["recorded"].as_u64().unwrap_or(0)
}
