//! Cost of removing records past their queue's retention, at a million rows.
//!
//! Creates a scratch database (on the server of `DATABASE_URL`), fills `message_records` and
//! `consumption_records` with `BENCH_ROWS` rows each (default 1 000 000) spread over
//! `BENCH_QUEUES` queues (default 100), half of them older than their queue's retention,
//! then runs the record-retention worker's statement until nothing is left to remove and
//! reports the time per statement and in all, and the cost of a pass that finds nothing
//! (what every later interval costs). Drops the database at the end.
//!
//! ```sh
//! DATABASE_URL=postgres://postgres@127.0.0.1:5432/postgres cargo bench --bench record_retention
//! ```

#[path = "support/mod.rs"]
mod support;

use std::time::Instant;

use sqlx::Connection;
use support::setting;

/// Rows per table and statement, as the worker does.
const BATCH: i64 = 5000;

#[tokio::main]
async fn main() {
    let rows = setting("BENCH_ROWS", 1_000_000) as i64;
    let queues = setting("BENCH_QUEUES", 100) as i64;
    let server = std::env::var("DATABASE_URL")
        .unwrap_or_else(|_| "postgres://postgres@127.0.0.1:5432/postgres".to_owned());
    let base = server
        .rsplit_once('/')
        .map_or(server.as_str(), |(b, _)| b)
        .to_owned();
    let name = format!(
        "bench_retention_{}",
        &uuid::Uuid::new_v4().simple().to_string()[..8]
    );
    let mut admin = sqlx::PgConnection::connect(&server)
        .await
        .expect("PostgreSQL");
    sqlx::query(&format!("CREATE DATABASE \"{name}\""))
        .execute(&mut admin)
        .await
        .unwrap();
    let url = format!("{base}/{name}");
    let outcome = run(&url, rows, queues).await;
    sqlx::query(&format!("DROP DATABASE \"{name}\" WITH (FORCE)"))
        .execute(&mut admin)
        .await
        .unwrap();
    outcome
}

async fn run(url: &str, rows: i64, queues: i64) {
    let store = mq::store::Store::connect(url, 4).await.expect("migrations");
    let mut db = sqlx::PgConnection::connect(url).await.unwrap();
    println!("record retention benchmark: {rows} message records and {rows} consumption records over {queues} queues, half past retention");
    let started = Instant::now();
    for statement in [
        "INSERT INTO message_topics (id, tenant_id, name, retention_ms, max_length) \
         SELECT gen_random_uuid(), gen_random_uuid(), 'q' || n, 86400000, 10000 \
         FROM generate_series(1, $1) n",
        "INSERT INTO message_subscriptions (id, tenant_id, topic_id, consumer_group, consumer_name, \
             subscription_type) \
         SELECT gen_random_uuid(), tenant_id, id, 'g', 'c', 'redis_consumer' FROM message_topics",
    ] {
        sqlx::query(statement).bind(queues).execute(&mut db).await.unwrap();
    }
    // Row n: queue n % queues, n seconds apart going back, so half are older than a day.
    sqlx::query(
        "WITH t AS (SELECT id, tenant_id, row_number() OVER () - 1 AS k FROM message_topics) \
         INSERT INTO message_records (topic_id, message_id, tenant_id, partition_id, status, \
             payload, published_at) \
         SELECT t.id, 'm' || n, t.tenant_id, 0, 'consumed', '{\"n\": 1}', \
             now() - (n * 172800.0 / $1) * interval '1 second' \
         FROM generate_series(1, $1) n JOIN t ON t.k = n % $2",
    )
    .bind(rows)
    .bind(queues)
    .execute(&mut db)
    .await
    .unwrap();
    sqlx::query(
        "WITH s AS (SELECT id, topic_id, tenant_id, row_number() OVER () - 1 AS k \
                    FROM message_subscriptions) \
         INSERT INTO consumption_records (tenant_id, topic_id, subscription_id, message_id, \
             attempt, status, created_at) \
         SELECT s.tenant_id, s.topic_id, s.id, 'm' || n, 1, 'acked', \
             now() - (n * 172800.0 / $1) * interval '1 second' \
         FROM generate_series(1, $1) n JOIN s ON s.k = n % $2",
    )
    .bind(rows)
    .bind(queues)
    .execute(&mut db)
    .await
    .unwrap();
    sqlx::query("VACUUM ANALYZE")
        .execute(&mut db)
        .await
        .unwrap();
    println!("filled in {:.1} s", started.elapsed().as_secs_f64());

    let mut timings = Vec::new();
    let mut removed = 0;
    let started = Instant::now();
    loop {
        let one = Instant::now();
        let count = store.delete_expired_records(BATCH).await.unwrap();
        timings.push(one.elapsed().as_secs_f64() * 1000.0);
        removed += count;
        if count == 0 {
            break;
        }
    }
    let total = started.elapsed().as_secs_f64();
    timings.sort_by(f64::total_cmp);
    println!(
        "removed {removed} rows in {total:.2} s = {:.0} rows/s; {} passes, ms per pass p50 {:.1} p95 {:.1} max {:.1}",
        removed as f64 / total,
        timings.len(),
        support::percentile(&timings, 0.5),
        support::percentile(&timings, 0.95),
        timings.last().copied().unwrap_or_default()
    );
    let mut idle = Vec::new();
    for _ in 0..20 {
        let one = Instant::now();
        // Rows keep ageing past the cut-off: a pass may find the odd one.
        store.delete_expired_records(BATCH).await.unwrap();
        idle.push(one.elapsed().as_secs_f64() * 1000.0);
    }
    idle.sort_by(f64::total_cmp);
    println!(
        "a pass with nothing to remove ({} rows left): ms p50 {:.1} max {:.1}",
        rows,
        support::percentile(&idle, 0.5),
        idle.last().copied().unwrap_or_default()
    );
}
