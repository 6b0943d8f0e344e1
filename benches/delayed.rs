//! Release lag of delayed messages (due time → visible in the stream) against a running
//! service.
//!
//! Start the service (`scripts/run.sh`), then:
//!
//! ```sh
//! cargo bench --bench delayed
//! ```
//!
//! Settings (environment): `BENCH_URL` (http://127.0.0.1:3010), `JWT_SECRET` (the
//! development secret of .env.example), `REDIS_URL` (redis://127.0.0.1:6379) and
//! `REDIS_KEY_PREFIX` (mq:) of that service, `BENCH_BURST` (10000), `BENCH_SPREAD` (200).
//!
//! Two scenarios: a burst of messages all due at the same moment, and messages due one by
//! one 20 ms apart. Visibility time is the stream entry id (Redis's clock when the entry was
//! appended); the due time is the service's; both clocks are this machine's.

use std::time::{Duration, Instant};

use deadpool_redis::redis::{self, AsyncCommands};
use mq::broker::keys::KeyLayout;
use serde_json::{json, Value};

#[path = "support/mod.rs"]
mod support;

const PARTITIONS: u16 = 4;

struct Bench {
    client: reqwest::Client,
    url: String,
    token: String,
    redis: redis::aio::MultiplexedConnection,
    keys: KeyLayout,
}

impl Bench {
    async fn new() -> Bench {
        let redis_url =
            std::env::var("REDIS_URL").unwrap_or_else(|_| "redis://127.0.0.1:6379".to_owned());
        let redis = redis::Client::open(redis_url)
            .expect("REDIS_URL")
            .get_multiplexed_async_connection()
            .await
            .expect("connect to the service's Redis");
        Bench {
            client: reqwest::Client::new(),
            url: support::service_url(),
            token: support::tenant_token(),
            redis,
            keys: KeyLayout::new(
                std::env::var("REDIS_KEY_PREFIX").unwrap_or_else(|_| "mq:".into()),
            ),
        }
    }

    async fn post(&self, path: &str, body: Value) -> Value {
        let response = self
            .client
            .post(format!("{}{path}", self.url))
            .bearer_auth(&self.token)
            .json(&body)
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

    async fn create_queue(&self) -> (String, uuid::Uuid) {
        let name = format!(
            "bench-delayed-{}",
            &uuid::Uuid::new_v4().simple().to_string()[..8]
        );
        let queue = self
            .post(
                "/api/v1/mq/queues",
                json!({"name": name, "partitionCount": PARTITIONS, "maxLength": 100_000_000}),
            )
            .await;
        (name, queue["id"].as_str().unwrap().parse().unwrap())
    }

    async fn delete_queue(&self, name: &str) {
        let _ = self
            .client
            .delete(format!("{}/api/v1/mq/queues/{name}", self.url))
            .bearer_auth(&self.token)
            .send()
            .await;
    }

    /// Entry ids (ms part) by message id, once `expected` entries are in the streams.
    async fn wait_visible(&mut self, queue_id: uuid::Uuid, expected: usize) -> Vec<(String, i64)> {
        let deadline = Instant::now() + Duration::from_secs(60);
        loop {
            let mut total = 0;
            for partition in 0..PARTITIONS {
                let length: usize = self
                    .redis
                    .xlen(&self.keys.partition(queue_id, partition).stream)
                    .await
                    .unwrap();
                total += length;
            }
            if total >= expected || Instant::now() > deadline {
                break;
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
        let mut visible = Vec::new();
        for partition in 0..PARTITIONS {
            let entries: Vec<(String, Vec<(String, String)>)> = redis::cmd("XRANGE")
                .arg(&self.keys.partition(queue_id, partition).stream)
                .arg("-")
                .arg("+")
                .query_async(&mut self.redis)
                .await
                .unwrap();
            for (id, fields) in entries {
                let envelope: Value = serde_json::from_str(&fields[0].1).unwrap();
                let at: i64 = id.split('-').next().unwrap().parse().unwrap();
                visible.push((envelope["messageId"].as_str().unwrap().to_owned(), at));
            }
        }
        visible
    }
}

fn report(label: &str, mut lags: Vec<i64>) {
    lags.sort_unstable();
    let at = |p: f64| support::percentile(&lags, p);
    println!(
        "{label}: {} messages; release lag ms p50 {} p99 {} max {} (min {})",
        lags.len(),
        at(0.5),
        at(0.99),
        at(1.0),
        at(0.0)
    );
}

fn rfc3339(ms: i64) -> String {
    chrono::DateTime::from_timestamp_millis(ms)
        .unwrap()
        .to_rfc3339_opts(chrono::SecondsFormat::Millis, true)
}

#[tokio::main]
async fn main() {
    let mut bench = Bench::new().await;
    let burst = support::setting("BENCH_BURST", 10_000) as usize;
    let spread = support::setting("BENCH_SPREAD", 200) as usize;

    // Burst: every message due at the same moment.
    let (name, queue_id) = bench.create_queue().await;
    let due = chrono::Utc::now().timestamp_millis() + 5000;
    for chunk in 0..burst.div_ceil(1000) {
        let messages: Vec<Value> = (0..1000.min(burst - chunk * 1000))
            .map(|n| json!({"payload": n, "scheduledAt": rfc3339(due)}))
            .collect();
        bench
            .post(
                "/api/v1/mq/publish/batch",
                json!({"queue": name, "messages": messages}),
            )
            .await;
    }
    assert!(
        chrono::Utc::now().timestamp_millis() < due,
        "publishing took longer than the lead time"
    );
    let visible = bench.wait_visible(queue_id, burst).await;
    assert_eq!(visible.len(), burst, "every message released exactly once");
    report(
        &format!("burst of {burst} due at once"),
        visible.iter().map(|(_, at)| at - due).collect(),
    );
    bench.delete_queue(&name).await;

    // Spread: messages due one by one, 20 ms apart.
    let (name, queue_id) = bench.create_queue().await;
    let start = chrono::Utc::now().timestamp_millis() + 2000;
    let messages: Vec<Value> = (0..spread)
        .map(|n| json!({"payload": n, "messageId": format!("s-{n}"), "scheduledAt": rfc3339(start + 20 * n as i64)}))
        .collect();
    bench
        .post(
            "/api/v1/mq/publish/batch",
            json!({"queue": name, "messages": messages}),
        )
        .await;
    let visible = bench.wait_visible(queue_id, spread).await;
    let lags = visible
        .iter()
        .map(|(id, at)| {
            let n: i64 = id.trim_start_matches("s-").parse().unwrap();
            at - (start + 20 * n)
        })
        .collect();
    report(&format!("{spread} due 20 ms apart"), lags);
    bench.delete_queue(&name).await;
}
