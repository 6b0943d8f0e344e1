//! Stream trimming: retention, and entries every consumer group acked.

mod common;

use std::time::Duration;

use common::{eventually, stream_entries, TestApp};
use reqwest::Method;
use serde_json::{json, Value};

const WAIT: Duration = Duration::from_secs(15);

async fn stored(app: &TestApp, queue: &str) -> u64 {
    app.call(Method::GET, &format!("/api/v1/mq/queues/{queue}"), None)
        .await
        .1["stats"]["messageCount"]
        .as_u64()
        .unwrap_or(u64::MAX)
}

fn fast_retention(env: &mut std::collections::HashMap<String, String>) {
    env.insert("RETENTION_INTERVAL_MS".into(), "200".into());
}

#[tokio::test]
async fn entries_past_retention_are_removed_even_unconsumed() {
    let app = TestApp::spawn_with(fast_retention).await;
    app.create_queue(json!({"name": "short", "retentionMs": 1000}))
        .await;
    app.create_queue(json!({"name": "long"})).await;
    for queue in ["short", "long"] {
        app.call(
            Method::POST,
            "/api/v1/mq/publish",
            Some(json!({"queue": queue, "payload": 1})),
        )
        .await;
    }
    assert_eq!(stored(&app, "short").await, 1);
    assert!(eventually(WAIT, || async { stored(&app, "short").await == 0 }).await);
    assert_eq!(
        stored(&app, "long").await,
        1,
        "within retention and without consumers: kept"
    );
}

#[tokio::test]
async fn entries_every_group_acked_are_removed_and_pending_ones_kept() {
    let app = TestApp::spawn_with(fast_retention).await;
    let queue = app.create_queue(json!({"name": "q"})).await;
    let mut subscriptions = Vec::new();
    for group in ["a", "b"] {
        let (_, sub) = app
            .call(
                Method::POST,
                "/api/v1/mq/subscriptions",
                Some(json!({"queue": "q", "consumerGroup": group, "consumerName": "c", "subscriptionType": "redis_consumer"})),
            )
            .await;
        subscriptions.push(sub["id"].as_str().unwrap().to_owned());
    }
    for n in 0..4 {
        app.call(
            Method::POST,
            "/api/v1/mq/publish",
            Some(json!({"queue": "q", "payload": n})),
        )
        .await;
    }
    let consume = |subscription: String, count: usize, ack: bool| {
        let app = &app;
        async move {
            let (_, body) = app
                .call(
                    Method::POST,
                    &format!("/api/v1/mq/subscriptions/{subscription}/pull"),
                    Some(json!({"maxMessages": count, "waitMs": 1000})),
                )
                .await;
            let ids: Vec<Value> = body["messages"]
                .as_array()
                .unwrap()
                .iter()
                .map(|m| m["ackId"].clone())
                .collect();
            if ack {
                app.call(
                    Method::POST,
                    &format!("/api/v1/mq/subscriptions/{subscription}/ack"),
                    Some(json!({"ackIds": ids})),
                )
                .await;
            }
        }
    };
    // Group a acks everything; group b acks two and keeps the third pending.
    consume(subscriptions[0].clone(), 4, true).await;
    consume(subscriptions[1].clone(), 2, true).await;
    consume(subscriptions[1].clone(), 1, false).await;
    assert!(
        eventually(WAIT, || async { stored(&app, "q").await == 2 }).await,
        "the two entries acked by both groups go"
    );
    tokio::time::sleep(Duration::from_millis(600)).await;
    let left: Vec<Value> = stream_entries(&app, &queue, 0)
        .await
        .into_iter()
        .map(|(_, e)| e["payload"].clone())
        .collect();
    assert_eq!(
        left,
        [json!(2), json!(3)],
        "pending and undelivered entries stay"
    );
    let (_, status) = app.get_anonymous("/api/v1/mq/status").await;
    assert_eq!(status["workers"]["retention"], "running");
}

#[tokio::test]
async fn records_past_their_queues_retention_are_removed() {
    let app = TestApp::spawn_with(|env| {
        env.insert("RECORD_RETENTION_INTERVAL_MS".into(), "200".into());
    })
    .await;
    let short = app
        .create_queue(json!({"name": "short", "retentionMs": 60000}))
        .await;
    let long = app.create_queue(json!({"name": "long"})).await;
    let subscription = app.subscribe_pull("short", "g").await;
    let mut db = app.database.connect().await;
    // Two minutes old and fresh rows in both queues: only the short queue's old ones go.
    for (queue, age_s, id) in [
        (&short, 120, "old-1"),
        (&short, 120, "old-2"),
        (&short, 0, "new-1"),
        (&long, 120, "kept-1"),
    ] {
        sqlx::query(
            "INSERT INTO message_records (topic_id, message_id, tenant_id, partition_id, status, \
                 published_at) \
             VALUES ($1, $2, $3, 0, 'consumed', now() - $4 * interval '1 second')",
        )
        .bind(common::queue_id(queue))
        .bind(id)
        .bind(app.tenant)
        .bind(f64::from(age_s))
        .execute(&mut db)
        .await
        .unwrap();
    }
    for (age_s, id) in [(120, "old-1"), (0, "new-1")] {
        sqlx::query(
            "INSERT INTO consumption_records (tenant_id, topic_id, subscription_id, message_id, \
                 attempt, status, created_at) \
             VALUES ($1, $2, $3, $4, 1, 'acked', now() - $5 * interval '1 second')",
        )
        .bind(app.tenant)
        .bind(common::queue_id(&short))
        .bind(subscription.parse::<uuid::Uuid>().unwrap())
        .bind(id)
        .bind(f64::from(age_s))
        .execute(&mut db)
        .await
        .unwrap();
    }
    let app = &app;
    let ids = |table: &'static str| async move {
        let mut db = app.database.connect().await;
        let mut ids: Vec<String> = sqlx::query_scalar(&format!(
            "SELECT message_id FROM {table} WHERE message_id NOT LIKE '%-%-%'"
        ))
        .fetch_all(&mut db)
        .await
        .unwrap();
        ids.sort();
        ids
    };
    assert!(
        eventually(WAIT, || async {
            ids("message_records").await == ["kept-1", "new-1"]
                && ids("consumption_records").await == ["new-1"]
        })
        .await,
        "records: {:?}, consumption: {:?}",
        ids("message_records").await,
        ids("consumption_records").await
    );
}

/// A queue nobody reads is left alone until its oldest entry ages out; what would let
/// entries go sooner (a group that acks them, a shorter retention) ends that wait at once.
#[tokio::test]
async fn an_unread_queue_left_to_age_is_trimmed_once_a_group_acks_or_retention_shrinks() {
    let app = TestApp::spawn_with(fast_retention).await;
    for queue in ["read-later", "shortened"] {
        app.create_queue(json!({"name": queue, "retentionMs": 3_600_000}))
            .await;
        for n in 0..2 {
            app.call(
                Method::POST,
                "/api/v1/mq/publish",
                Some(json!({"queue": queue, "payload": n})),
            )
            .await;
        }
    }
    // Several sweeps find nothing to remove and leave both queues waiting for an hour.
    tokio::time::sleep(Duration::from_millis(1000)).await;
    assert_eq!(stored(&app, "read-later").await, 2);
    assert_eq!(stored(&app, "shortened").await, 2);

    let subscription = app.subscribe_pull("read-later", "g").await;
    let pulled = common::pull_until(&app, &subscription, 2, WAIT).await;
    let ack_ids: Vec<&str> = pulled
        .iter()
        .map(|m| m["ackId"].as_str().unwrap())
        .collect();
    assert_eq!(app.ack(&subscription, &ack_ids).await, 2);
    assert!(
        eventually(WAIT, || async { stored(&app, "read-later").await == 0 }).await,
        "acked entries go once a group reads the queue"
    );

    let (status, body) = app
        .call(
            Method::PUT,
            "/api/v1/mq/queues/shortened",
            Some(json!({"retentionMs": 1000})),
        )
        .await;
    assert_eq!(status, 200, "{body}");
    assert!(
        eventually(WAIT, || async { stored(&app, "shortened").await == 0 }).await,
        "entries past the new retention go"
    );
}
