//! The record writers of several instances, and the other writers of the same rows
//! (subscription and queue deletion, record retention), never deadlock in PostgreSQL: two
//! instances record the same queues under load while consumers come and go and queues are
//! deleted, and the database counts no deadlock.

mod common;

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::Duration;

use common::{read, token_for, TestApp};
use reqwest::Method;
use serde_json::{json, Value};
use sqlx::Connection;
use uuid::Uuid;

const QUEUES: usize = 4;
const LOAD: Duration = Duration::from_secs(8);

async fn deadlocks(app: &TestApp) -> i64 {
    let mut connection = app.database.connect().await;
    // Statistics reach the view once a backend reports them (at most about a second later).
    sqlx::query("SELECT pg_stat_clear_snapshot()")
        .execute(&mut connection)
        .await
        .unwrap();
    let count = sqlx::query_scalar(
        "SELECT deadlocks FROM pg_stat_database WHERE datname = current_database()",
    )
    .fetch_one(&mut connection)
    .await
    .unwrap();
    connection.close().await.unwrap();
    count
}

/// An instance's address and the test tenant's token, for tasks of their own.
#[derive(Clone)]
struct Handle {
    client: reqwest::Client,
    base: String,
    tenant: Uuid,
}

impl Handle {
    fn of(app: &TestApp) -> Handle {
        Handle {
            client: app.client.clone(),
            base: app.url(""),
            tenant: app.tenant,
        }
    }

    async fn call(&self, method: Method, path: &str, body: Option<Value>) -> (u16, Value) {
        let mut request = self
            .client
            .request(method, format!("{}{path}", self.base))
            .bearer_auth(token_for(self.tenant, "tester"));
        if let Some(body) = body {
            request = request.json(&body);
        }
        match request.send().await {
            Ok(response) => read(response).await,
            Err(_) => (0, Value::Null),
        }
    }
}

async fn subscribe(app: &Handle, queue: &str, consumer: &str) -> Option<String> {
    let (status, body) = app
        .call(
            Method::POST,
            "/api/v1/mq/subscriptions",
            Some(
                json!({"queue": queue, "consumerGroup": "g", "consumerName": consumer,
                        "subscriptionType": "redis_consumer", "offsetResetPolicy": "earliest",
                        "maxRetryAttempts": 1, "retryDelayMs": 1}),
            ),
        )
        .await;
    (status == 201).then(|| body["id"].as_str().unwrap().to_owned())
}

/// Pulls and settles on `app` until `stop`: acks most, nacks some (retries and dead letters
/// make journal events and attempts), so records, attempts, status changes and the
/// subscriptions' `last_consumed_at` are all written.
async fn consume(app: Handle, subscription: String, stop: Arc<AtomicBool>) {
    let mut round = 0u64;
    while !stop.load(Ordering::Relaxed) {
        let pull = format!("/api/v1/mq/subscriptions/{subscription}/pull");
        let (status, pulled) = app
            .call(
                Method::POST,
                &pull,
                Some(json!({"maxMessages": 50, "waitMs": 200})),
            )
            .await;
        if status != 200 {
            return;
        }
        let ids: Vec<_> = pulled["messages"]
            .as_array()
            .unwrap()
            .iter()
            .map(|m| m["ackId"].clone())
            .collect();
        if ids.is_empty() {
            continue;
        }
        round += 1;
        let verb = if round % 4 == 0 { "nack" } else { "ack" };
        app.call(
            Method::POST,
            &format!("/api/v1/mq/subscriptions/{subscription}/{verb}"),
            Some(json!({"ackIds": ids})),
        )
        .await;
    }
}

/// One pull of `subscription`, acked.
async fn settle_once(app: &Handle, subscription: &str) {
    let (_, pulled) = app
        .call(
            Method::POST,
            &format!("/api/v1/mq/subscriptions/{subscription}/pull"),
            Some(json!({"maxMessages": 20, "waitMs": 100})),
        )
        .await;
    let ids: Vec<Value> = pulled["messages"]
        .as_array()
        .map(|messages| messages.iter().map(|m| m["ackId"].clone()).collect())
        .unwrap_or_default();
    if !ids.is_empty() {
        app.call(
            Method::POST,
            &format!("/api/v1/mq/subscriptions/{subscription}/ack"),
            Some(json!({"ackIds": ids})),
        )
        .await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn two_recording_instances_and_deletions_never_deadlock() {
    let first = TestApp::spawn_with(|env| {
        // Record retention runs often, over records already past a short retention.
        env.insert("RECORD_RETENTION_INTERVAL_MS".into(), "200".into());
    })
    .await;
    let second = first
        .spawn_sibling_with(|env| {
            env.insert("RECORD_RETENTION_INTERVAL_MS".into(), "200".into());
        })
        .await;
    let before = deadlocks(&first).await;
    let stop = Arc::new(AtomicBool::new(false));
    let mut tasks = Vec::new();
    let names: Vec<String> = (0..QUEUES).map(|n| format!("q{n}")).collect();
    for name in &names {
        first
            .create_queue(json!({"name": name, "partitionCount": 2, "retentionMs": 1000}))
            .await;
        for (app, consumer) in [(Handle::of(&first), "a"), (Handle::of(&second), "b")] {
            let subscription = subscribe(&app, name, consumer).await.unwrap();
            tasks.push(tokio::spawn(consume(app, subscription, stop.clone())));
        }
    }
    // Producers on both instances, the same messages' records written by whichever
    // recorder reads them first.
    for (index, app) in [Handle::of(&first), Handle::of(&second)]
        .into_iter()
        .enumerate()
    {
        let (stop, names) = (stop.clone(), names.clone());
        tasks.push(tokio::spawn(async move {
            let mut n = 0;
            while !stop.load(Ordering::Relaxed) {
                let queue = &names[n % names.len()];
                let messages: Vec<_> = (0..50)
                    .map(|i| json!({"payload": {"i": i, "p": index}}))
                    .collect();
                app.call(
                    Method::POST,
                    "/api/v1/mq/publish/batch",
                    Some(json!({"queue": queue, "messages": messages})),
                )
                .await;
                n += 1;
            }
        }));
    }
    // Consumers joining and leaving the groups, and queues created, filled and deleted.
    {
        let (app, stop, names) = (Handle::of(&first), stop.clone(), names.clone());
        tasks.push(tokio::spawn(async move {
            let mut n = 0;
            while !stop.load(Ordering::Relaxed) {
                let queue = &names[n % names.len()];
                // A consumer of the same group that takes and settles a share, so the
                // recorders write its attempts while it is deleted.
                if let Some(id) = subscribe(&app, queue, &format!("churn{n}")).await {
                    settle_once(&app, &id).await;
                    app.call(
                        Method::DELETE,
                        &format!("/api/v1/mq/subscriptions/{id}"),
                        None,
                    )
                    .await;
                }
                let scratch = format!("scratch{n}");
                app.call(
                    Method::POST,
                    "/api/v1/mq/queues",
                    Some(json!({"name": scratch})),
                )
                .await;
                let messages: Vec<_> = (0..20).map(|i| json!({"payload": i})).collect();
                app.call(
                    Method::POST,
                    "/api/v1/mq/publish/batch",
                    Some(json!({"queue": scratch, "messages": messages})),
                )
                .await;
                // Deleted with a subscription and delivery attempts of its own.
                if let Some(id) = subscribe(&app, &scratch, "c").await {
                    settle_once(&app, &id).await;
                }
                tokio::time::sleep(Duration::from_millis(100)).await;
                app.call(
                    Method::DELETE,
                    &format!("/api/v1/mq/queues/{scratch}"),
                    None,
                )
                .await;
                n += 1;
            }
        }));
    }
    tokio::time::sleep(LOAD).await;
    stop.store(true, Ordering::Relaxed);
    for task in tasks {
        task.await.unwrap();
    }
    // Let the recorders finish what the load left, then read the count.
    tokio::time::sleep(Duration::from_secs(2)).await;
    let after = deadlocks(&first).await;
    let recorded = first.state.recorder.report().recorded + second.state.recorder.report().recorded;
    assert!(recorded > 1000, "the load recorded only {recorded} entries");
    assert_eq!(
        after - before,
        0,
        "PostgreSQL detected {} deadlocks",
        after - before
    );
}
