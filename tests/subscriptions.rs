//! Subscriptions, consumer groups, pull/ack/nack, retries, dead-lettering, filters.

mod common;

use std::collections::{BTreeSet, HashSet};
use std::time::{Duration, Instant};

use common::{assert_error, eventually, subscription_stats as stats, TestApp};
use reqwest::Method;
use serde_json::{json, Value};
use uuid::Uuid;

const WAIT: Duration = Duration::from_secs(15);

async fn subscribe(app: &TestApp, body: Value) -> Value {
    let (status, subscription) = app
        .call(Method::POST, "/api/v1/mq/subscriptions", Some(body))
        .await;
    assert_eq!(status, 201, "{subscription}");
    subscription
}

async fn consumer(app: &TestApp, queue: &str, group: &str, name: &str, extra: Value) -> String {
    let mut body = json!({"queue": queue, "consumerGroup": group, "consumerName": name,
                          "subscriptionType": "redis_consumer"});
    body.as_object_mut()
        .unwrap()
        .extend(extra.as_object().cloned().unwrap_or_default());
    subscribe(app, body).await["id"]
        .as_str()
        .unwrap()
        .to_owned()
}

async fn publish(app: &TestApp, queue: &str, payload: Value, headers: Value) -> String {
    let (status, result) = app
        .call(
            Method::POST,
            "/api/v1/mq/publish",
            Some(json!({"queue": queue, "payload": payload, "headers": headers})),
        )
        .await;
    assert_eq!(status, 201, "{result}");
    result["messageId"].as_str().unwrap().to_owned()
}

async fn pull(app: &TestApp, subscription: &str, max: u32, wait_ms: u32) -> Vec<Value> {
    let (status, body) = app
        .call(
            Method::POST,
            &format!("/api/v1/mq/subscriptions/{subscription}/pull"),
            Some(json!({"maxMessages": max, "waitMs": wait_ms})),
        )
        .await;
    assert_eq!(status, 200, "{body}");
    body["messages"].as_array().unwrap().clone()
}

async fn settle(
    app: &TestApp,
    subscription: &str,
    verb: &str,
    ack_ids: Vec<String>,
    extra: Value,
) -> u64 {
    let mut body = json!({"ackIds": ack_ids});
    body.as_object_mut()
        .unwrap()
        .extend(extra.as_object().cloned().unwrap_or_default());
    let (status, reply) = app
        .call(
            Method::POST,
            &format!("/api/v1/mq/subscriptions/{subscription}/{verb}"),
            Some(body),
        )
        .await;
    assert_eq!(status, 200, "{reply}");
    reply[if verb == "ack" { "acked" } else { "nacked" }]
        .as_u64()
        .unwrap()
}

fn ack_ids(messages: &[Value]) -> Vec<String> {
    messages
        .iter()
        .map(|m| m["ackId"].as_str().unwrap().to_owned())
        .collect()
}

fn ids(messages: &[Value]) -> BTreeSet<String> {
    messages
        .iter()
        .map(|m| m["messageId"].as_str().unwrap().to_owned())
        .collect()
}

/// Pulls until `count` messages arrived (or the wait runs out).
async fn pull_all(app: &TestApp, subscription: &str, count: usize) -> Vec<Value> {
    let mut all = Vec::new();
    let deadline = Instant::now() + WAIT;
    while all.len() < count && Instant::now() < deadline {
        all.extend(pull(app, subscription, 100, 500).await);
    }
    all
}

#[tokio::test]
async fn subscription_crud_validation_and_isolation() {
    let app = TestApp::spawn().await;
    app.create_queue(json!({"name": "orders"})).await;
    let created = subscribe(
        &app,
        json!({"queue": "orders", "consumerGroup": "billing", "consumerName": "billing-1",
               "subscriptionType": "webhook",
               "handlerConfig": {"url": "http://127.0.0.1:9/hook", "secret": "top-secret-value"}}),
    )
    .await;
    assert_eq!(created["queue"], "orders");
    assert_eq!(created["deadLetterQueue"], "orders.dlq");
    assert_eq!(created["maxRetryAttempts"], 3);
    assert_eq!(created["retryDelayMs"], 1000);
    assert_eq!(created["sessionTimeoutMs"], 30000);
    assert_eq!(created["maxPollRecords"], 500);
    assert_eq!(created["offsetResetPolicy"], "latest");
    assert_eq!(created["status"], "active");
    assert_eq!(created["tenantId"], app.tenant.to_string());
    assert_eq!(created["lastConsumedAt"], Value::Null);
    assert!(
        !created.to_string().contains("top-secret-value"),
        "the secret is write-only"
    );
    let id = created["id"].as_str().unwrap();
    let path = format!("/api/v1/mq/subscriptions/{id}");

    let (status, error) = app
        .call(
            Method::POST,
            "/api/v1/mq/subscriptions",
            Some(json!({"queue": "orders", "consumerGroup": "billing",
            "consumerName": "billing-1", "subscriptionType": "redis_consumer"})),
        )
        .await;
    assert_error(status, &error, 409, "MQ_SUBSCRIPTION_EXISTS");
    for (body, field) in [
        (
            json!({"queue": "orders", "consumerGroup": "g", "consumerName": "c", "subscriptionType": "kafka_consumer"}),
            "subscriptionType",
        ),
        (
            json!({"queue": "orders", "consumerGroup": "g", "consumerName": "c"}),
            "subscriptionType",
        ),
        (
            json!({"queue": "orders", "consumerName": "c", "subscriptionType": "redis_consumer"}),
            "consumerGroup",
        ),
        (
            json!({"queue": "orders", "consumerGroup": "g", "consumerName": "c", "subscriptionType": "webhook"}),
            "handlerConfig.url",
        ),
        (
            json!({"queue": "orders", "consumerGroup": "g", "consumerName": "c", "subscriptionType": "redis_consumer", "messageFilter": {"bogus": 1}}),
            "messageFilter",
        ),
        (
            json!({"queue": "orders", "consumerGroup": "g", "consumerName": "c", "subscriptionType": "redis_consumer", "offsetResetPolicy": "middle"}),
            "offsetResetPolicy",
        ),
        (
            json!({"consumerGroup": "g", "consumerName": "c", "subscriptionType": "redis_consumer"}),
            "queue",
        ),
    ] {
        let (status, error) = app
            .call(Method::POST, "/api/v1/mq/subscriptions", Some(body.clone()))
            .await;
        assert_error(status, &error, 400, "MQ_VALIDATION_ERROR");
        assert_eq!(
            error["details"]["fields"],
            json!([field]),
            "{body}: {error}"
        );
    }
    let (status, error) = app
        .call(
            Method::POST,
            "/api/v1/mq/subscriptions",
            Some(json!({"queue": "nope", "consumerGroup": "g",
            "consumerName": "c", "subscriptionType": "redis_consumer"})),
        )
        .await;
    assert_error(status, &error, 404, "MQ_QUEUE_NOT_FOUND");

    let (status, fetched) = app.call(Method::GET, &path, None).await;
    assert_eq!(status, 200);
    for field in [
        "lag",
        "pending",
        "delivered",
        "acked",
        "failed",
        "deadLettered",
        "filtered",
    ] {
        assert_eq!(fetched["stats"][field], 0, "{field}");
    }
    let (status, updated) = app
        .call(
            Method::PUT,
            &path,
            Some(json!({"maxRetryAttempts": 5, "messageFilter": {"key": "k"}})),
        )
        .await;
    assert_eq!(status, 200, "{updated}");
    assert_eq!(updated["maxRetryAttempts"], 5);
    assert_eq!(updated["messageFilter"], json!({"key": "k"}));
    let (status, error) = app
        .call(Method::PUT, &path, Some(json!({"consumerGroup": "other"})))
        .await;
    assert_error(status, &error, 400, "MQ_VALIDATION_ERROR");
    let (_, paused) = app.call(Method::POST, &format!("{path}/pause"), None).await;
    assert_eq!(paused["status"], "paused");
    let (_, listed) = app
        .call(
            Method::GET,
            "/api/v1/mq/subscriptions?status=paused&queue=orders",
            None,
        )
        .await;
    assert_eq!(listed["total"], 1);
    let (_, resumed) = app
        .call(Method::POST, &format!("{path}/resume"), None)
        .await;
    assert_eq!(resumed["status"], "active");
    let (_, listed) = app
        .call(
            Method::GET,
            "/api/v1/mq/subscriptions?consumerGroup=other",
            None,
        )
        .await;
    assert_eq!(listed["total"], 0);
    let (status, error) = app
        .call(Method::GET, "/api/v1/mq/subscriptions?limit=0", None)
        .await;
    assert_error(status, &error, 400, "MQ_VALIDATION_ERROR");

    let stranger = Uuid::new_v4();
    for (method, suffix) in [
        (Method::GET, ""),
        (Method::PUT, ""),
        (Method::DELETE, ""),
        (Method::POST, "/pause"),
        (Method::POST, "/resume"),
        (Method::POST, "/pull"),
        (Method::POST, "/ack"),
        (Method::POST, "/nack"),
    ] {
        let response = app
            .request_as(stranger, "x", method.clone(), &format!("{path}{suffix}"))
            .json(&json!({"ackIds": []}))
            .send()
            .await
            .unwrap();
        let (status, error) = common::read(response).await;
        assert_error(status, &error, 404, "MQ_SUBSCRIPTION_NOT_FOUND");
    }
    let (_, listed) = app
        .call(Method::GET, "/api/v1/mq/subscriptions", None)
        .await;
    assert_eq!(listed["total"], 1);
    let (status, error) = app
        .call(Method::GET, "/api/v1/mq/subscriptions/not-a-uuid", None)
        .await;
    assert_error(status, &error, 404, "MQ_SUBSCRIPTION_NOT_FOUND");

    let response = app.request(Method::DELETE, &path).send().await.unwrap();
    assert_eq!(response.status(), 204);
    let (status, error) = app.call(Method::GET, &path, None).await;
    assert_error(status, &error, 404, "MQ_SUBSCRIPTION_NOT_FOUND");
}

#[tokio::test]
async fn groups_fan_out_and_members_share() {
    let app = TestApp::spawn().await;
    app.create_queue(json!({"name": "q", "partitionCount": 3}))
        .await;
    let a1 = consumer(&app, "q", "a", "a1", json!({})).await;
    let a2 = consumer(&app, "q", "a", "a2", json!({})).await;
    let b1 = consumer(&app, "q", "b", "b1", json!({})).await;
    let mut published = BTreeSet::new();
    for n in 0..30 {
        published.insert(publish(&app, "q", json!(n), json!({})).await);
    }
    let (first, second) = tokio::join!(pull_all(&app, &a1, 15), pull_all(&app, &a2, 15));
    let (first, second) = (ids(&first), ids(&second));
    assert!(
        first.is_disjoint(&second),
        "no message goes to two members of one group"
    );
    assert_eq!(
        first.union(&second).cloned().collect::<BTreeSet<_>>(),
        published,
        "none missing"
    );
    assert_eq!(
        ids(&pull_all(&app, &b1, 30).await),
        published,
        "another group gets every message"
    );
}

#[tokio::test]
async fn ack_nack_and_retry_spacing() {
    let app = TestApp::spawn().await;
    app.create_queue(json!({"name": "q"})).await;
    let sub = consumer(&app, "q", "g", "c", json!({"retryDelayMs": 800})).await;
    let id = publish(&app, "q", json!({"n": 1}), json!({"eventType": "x"})).await;
    let first = pull(&app, &sub, 10, 2000).await;
    assert_eq!(first.len(), 1);
    let message = &first[0];
    assert_eq!(message["messageId"], id);
    assert_eq!(message["deliveryAttempt"], 1);
    assert_eq!(message["payload"], json!({"n": 1}));
    assert_eq!(message["headers"], json!({"eventType": "x"}));
    assert_eq!(message["queue"], "q");
    assert!(message["offset"].is_string() && message["publishedAt"].is_string());

    let nacked_at = Instant::now();
    assert_eq!(
        settle(&app, &sub, "nack", ack_ids(&first), json!({})).await,
        1
    );
    assert_eq!(
        settle(&app, &sub, "nack", ack_ids(&first), json!({})).await,
        0,
        "a second nack of one delivery does nothing"
    );
    assert!(
        pull(&app, &sub, 10, 0).await.is_empty(),
        "not redelivered before its retry time"
    );
    let second = pull_all(&app, &sub, 1).await;
    assert!(
        nacked_at.elapsed() >= Duration::from_millis(720),
        "retry waited retryDelayMs (±10 %)"
    );
    assert_eq!(second[0]["deliveryAttempt"], 2);
    let nacked_at = Instant::now();
    settle(&app, &sub, "nack", ack_ids(&second), json!({})).await;
    let third = pull_all(&app, &sub, 1).await;
    assert!(
        nacked_at.elapsed() >= Duration::from_millis(1440),
        "the second retry waits twice as long"
    );
    assert_eq!(third[0]["deliveryAttempt"], 3);

    assert_eq!(
        settle(&app, &sub, "ack", ack_ids(&third), json!({})).await,
        1
    );
    assert_eq!(
        settle(&app, &sub, "ack", ack_ids(&third), json!({})).await,
        0,
        "already acked"
    );
    assert!(pull(&app, &sub, 10, 300).await.is_empty());
    assert!(eventually(WAIT, || async { stats(&app, &sub).await["acked"] == 1 }).await);
    let stats = stats(&app, &sub).await;
    assert_eq!(stats["failed"], 2);
    assert_eq!(stats["pending"], 0);
    let (_, record) = app
        .call(
            Method::GET,
            &format!("/api/v1/mq/messages/{id}?queue=q"),
            None,
        )
        .await;
    assert_eq!(record["status"], "consumed");
    assert_eq!(record["deliveries"].as_array().unwrap().len(), 3);
    let (_, subscription) = app
        .call(
            Method::GET,
            &format!("/api/v1/mq/subscriptions/{sub}"),
            None,
        )
        .await;
    assert!(subscription["lastConsumedAt"].is_string());
}

/// One ack request settles its ids over every partition in batched script calls (100 a
/// call): each delivery once, an id repeated in the request or already acked settles
/// nothing, and the records and stats follow.
#[tokio::test]
async fn one_ack_settles_many_deliveries_across_partitions_once() {
    let app = TestApp::spawn().await;
    app.create_queue(json!({"name": "wide", "partitionCount": 4}))
        .await;
    let sub = consumer(&app, "wide", "g", "c", json!({})).await;
    let messages: Vec<Value> = (0..250)
        .map(|n| json!({"payload": {"n": n}, "key": format!("k{n}")}))
        .collect();
    let (status, reply) = app
        .call(
            Method::POST,
            "/api/v1/mq/publish/batch",
            Some(json!({"queue": "wide", "messages": messages})),
        )
        .await;
    assert_eq!(status, 201, "{reply}");
    let pulled = pull_all(&app, &sub, 250).await;
    assert_eq!(pulled.len(), 250);
    let partitions: BTreeSet<i64> = pulled
        .iter()
        .map(|m| m["partition"].as_i64().unwrap())
        .collect();
    assert!(
        partitions.len() > 1,
        "spread over partitions: {partitions:?}"
    );

    let mut ids = ack_ids(&pulled[..200]);
    // The same delivery twice in one request, across the 100-settlement chunks.
    ids.push(ids[0].clone());
    ids.push(ids[150].clone());
    assert_eq!(settle(&app, &sub, "ack", ids, json!({})).await, 200);
    let mut rest = ack_ids(&pulled[200..]);
    rest.extend(ack_ids(&pulled[..10]));
    assert_eq!(
        settle(&app, &sub, "ack", rest, json!({})).await,
        50,
        "the ten already acked settle nothing"
    );
    assert!(pull(&app, &sub, 100, 300).await.is_empty());
    assert!(eventually(WAIT, || async { stats(&app, &sub).await["acked"] == 250 }).await);
    assert_eq!(stats(&app, &sub).await["pending"], 0);
    let id = pulled[120]["messageId"].as_str().unwrap().to_owned();
    assert!(
        eventually(WAIT, || async {
            let (_, record) = app
                .call(
                    Method::GET,
                    &format!("/api/v1/mq/messages/{id}?queue=wide"),
                    None,
                )
                .await;
            record["status"] == "consumed"
                && record["deliveries"].as_array().map(Vec::len) == Some(1)
        })
        .await
    );
}

#[tokio::test]
async fn nack_delay_overrides_the_schedule() {
    let app = TestApp::spawn().await;
    app.create_queue(json!({"name": "q"})).await;
    let sub = consumer(&app, "q", "g", "c", json!({"retryDelayMs": 600000})).await;
    publish(&app, "q", json!(1), json!({})).await;
    let first = pull(&app, &sub, 1, 2000).await;
    settle(&app, &sub, "nack", ack_ids(&first), json!({"delayMs": 0})).await;
    let again = pull_all(&app, &sub, 1).await;
    assert_eq!(again[0]["deliveryAttempt"], 2);
}

#[tokio::test]
async fn unacked_deliveries_come_back_after_the_deadline() {
    let app = TestApp::spawn().await;
    app.create_queue(json!({"name": "q"})).await;
    let sub = consumer(
        &app,
        "q",
        "g",
        "c",
        json!({"sessionTimeoutMs": 1000, "retryDelayMs": 50}),
    )
    .await;
    let id = publish(&app, "q", json!(1), json!({})).await;
    let first = pull(&app, &sub, 1, 2000).await;
    let pulled_at = Instant::now();
    assert_eq!(first[0]["deliveryAttempt"], 1);
    let again = pull_all(&app, &sub, 1).await;
    assert!(
        pulled_at.elapsed() >= Duration::from_millis(1000),
        "not before the ack deadline"
    );
    assert_eq!(again[0]["messageId"], id);
    assert_eq!(again[0]["deliveryAttempt"], 2);
    assert_eq!(
        settle(&app, &sub, "ack", ack_ids(&again), json!({})).await,
        1
    );
}

#[tokio::test]
async fn exhausted_retries_go_to_the_dead_letter_queue() {
    let app = TestApp::spawn().await;
    app.create_queue(json!({"name": "orders"})).await;
    let sub = consumer(
        &app,
        "orders",
        "g",
        "c",
        json!({"maxRetryAttempts": 1, "retryDelayMs": 50}),
    )
    .await;
    let id = publish(
        &app,
        "orders",
        json!({"total": 9}),
        json!({"eventType": "order.created"}),
    )
    .await;
    let first = pull_all(&app, &sub, 1).await;
    settle(&app, &sub, "nack", ack_ids(&first), json!({})).await;
    let second = pull_all(&app, &sub, 1).await;
    assert_eq!(second[0]["deliveryAttempt"], 2);
    assert_eq!(
        settle(&app, &sub, "nack", ack_ids(&second), json!({})).await,
        1
    );
    assert!(
        pull(&app, &sub, 10, 500).await.is_empty(),
        "no third delivery"
    );

    let (status, dlq) = app
        .call(Method::GET, "/api/v1/mq/queues/orders.dlq", None)
        .await;
    assert_eq!(
        status, 200,
        "the dead-letter queue is created on first use: {dlq}"
    );
    assert_eq!(dlq["stats"]["messageCount"], 1);
    let replay = consumer(
        &app,
        "orders.dlq",
        "replay",
        "r",
        json!({"offsetResetPolicy": "earliest"}),
    )
    .await;
    let dead = pull_all(&app, &replay, 1).await;
    assert_eq!(dead.len(), 1);
    let dead = &dead[0];
    assert_eq!(dead["messageId"], id);
    assert_eq!(dead["payload"], json!({"total": 9}));
    assert_eq!(dead["headers"]["eventType"], "order.created");
    assert_eq!(
        dead["headers"]["x-dead-letter-reason"],
        "max-retries-exceeded"
    );
    assert_eq!(dead["headers"]["x-original-queue"], "orders");
    assert_eq!(dead["headers"]["x-delivery-attempts"], "2");
    assert_eq!(dead["headers"]["x-last-error"], "nacked by the consumer");
    assert!(
        eventually(WAIT, || async {
            app.call(
                Method::GET,
                &format!("/api/v1/mq/messages/{id}?queue=orders"),
                None,
            )
            .await
            .1["status"]
                == "dead_letter"
        })
        .await
    );
    assert!(
        eventually(WAIT, || async {
            stats(&app, &sub).await["deadLettered"] == 1
        })
        .await
    );
}

#[tokio::test]
async fn filters_skip_and_count_non_matching_messages() {
    let app = TestApp::spawn().await;
    app.create_queue(json!({"name": "q"})).await;
    let sub = consumer(
        &app,
        "q",
        "g",
        "c",
        json!({"messageFilter": {"headers.eventType": "order.created", "payload.total": {"gte": 10}}}),
    )
    .await;
    let wanted = publish(
        &app,
        "q",
        json!({"total": 50}),
        json!({"eventType": "order.created"}),
    )
    .await;
    publish(
        &app,
        "q",
        json!({"total": 5}),
        json!({"eventType": "order.created"}),
    )
    .await;
    publish(
        &app,
        "q",
        json!({"total": 50}),
        json!({"eventType": "order.paid"}),
    )
    .await;
    let delivered = pull_all(&app, &sub, 1).await;
    assert!(pull(&app, &sub, 10, 300).await.is_empty());
    assert_eq!(ids(&delivered), BTreeSet::from([wanted]));
    assert!(eventually(WAIT, || async { stats(&app, &sub).await["filtered"] == 2 }).await);
}

#[tokio::test]
async fn pause_and_resume_lose_nothing() {
    let app = TestApp::spawn().await;
    app.create_queue(json!({"name": "q"})).await;
    let sub = consumer(&app, "q", "g", "c", json!({})).await;
    app.call(
        Method::POST,
        &format!("/api/v1/mq/subscriptions/{sub}/pause"),
        None,
    )
    .await;
    let mut published = BTreeSet::new();
    for n in 0..5 {
        published.insert(publish(&app, "q", json!(n), json!({})).await);
    }
    let (status, error) = app
        .call(
            Method::POST,
            &format!("/api/v1/mq/subscriptions/{sub}/pull"),
            Some(json!({"maxMessages": 10})),
        )
        .await;
    assert_error(status, &error, 409, "MQ_SUBSCRIPTION_PAUSED");
    app.call(
        Method::POST,
        &format!("/api/v1/mq/subscriptions/{sub}/resume"),
        None,
    )
    .await;
    assert_eq!(ids(&pull_all(&app, &sub, 5).await), published);
}

#[tokio::test]
async fn a_paused_queue_delivers_nothing_until_active() {
    let app = TestApp::spawn().await;
    app.create_queue(json!({"name": "q"})).await;
    let sub = consumer(&app, "q", "g", "c", json!({})).await;
    publish(&app, "q", json!(1), json!({})).await;
    app.call(
        Method::PUT,
        "/api/v1/mq/queues/q",
        Some(json!({"status": "paused"})),
    )
    .await;
    assert!(pull(&app, &sub, 10, 300).await.is_empty());
    app.call(
        Method::PUT,
        "/api/v1/mq/queues/q",
        Some(json!({"status": "active"})),
    )
    .await;
    assert_eq!(pull_all(&app, &sub, 1).await.len(), 1);
}

#[tokio::test]
async fn a_long_poll_wakes_up_on_publish() {
    let app = TestApp::spawn().await;
    app.create_queue(json!({"name": "q"})).await;
    let sub = consumer(&app, "q", "g", "c", json!({})).await;
    let started = Instant::now();
    assert!(pull(&app, &sub, 1, 400).await.is_empty());
    assert!(
        started.elapsed() >= Duration::from_millis(400),
        "an empty pull waits waitMs"
    );
    let waiting = {
        let request = app
            .request(
                Method::POST,
                &format!("/api/v1/mq/subscriptions/{sub}/pull"),
            )
            .json(&json!({"maxMessages": 1, "waitMs": 20000}));
        tokio::spawn(async move { common::read(request.send().await.unwrap()).await })
    };
    tokio::time::sleep(Duration::from_millis(300)).await;
    let started = Instant::now();
    let id = publish(&app, "q", json!(1), json!({})).await;
    let (status, body) = waiting.await.unwrap();
    assert_eq!(status, 200);
    assert_eq!(body["messages"][0]["messageId"], id);
    assert!(
        started.elapsed() < Duration::from_secs(10),
        "woken by the publish, not by the 20 s limit"
    );
}

#[tokio::test]
async fn earliest_and_latest_groups_start_where_they_say() {
    let app = TestApp::spawn().await;
    app.create_queue(json!({"name": "q"})).await;
    let before = publish(&app, "q", json!("before"), json!({})).await;
    let latest = consumer(&app, "q", "late", "c", json!({})).await;
    let earliest = consumer(
        &app,
        "q",
        "early",
        "c",
        json!({"offsetResetPolicy": "earliest"}),
    )
    .await;
    let after = publish(&app, "q", json!("after"), json!({})).await;
    assert_eq!(
        ids(&pull_all(&app, &latest, 1).await),
        BTreeSet::from([after.clone()])
    );
    assert_eq!(
        ids(&pull_all(&app, &earliest, 2).await),
        BTreeSet::from([before, after])
    );
    // A later member joins where its group is.
    let joining = consumer(
        &app,
        "q",
        "early",
        "c2",
        json!({"offsetResetPolicy": "earliest"}),
    )
    .await;
    assert!(pull(&app, &joining, 10, 300).await.is_empty());
}

#[tokio::test]
async fn forged_and_foreign_ack_ids_touch_nothing() {
    let app = TestApp::spawn().await;
    app.create_queue(json!({"name": "q"})).await;
    let mine = consumer(&app, "q", "g", "mine", json!({"sessionTimeoutMs": 60000})).await;
    let other = consumer(&app, "q", "other", "o", json!({})).await;
    publish(&app, "q", json!(1), json!({})).await;
    let pulled = pull_all(&app, &mine, 1).await;
    let real = ack_ids(&pulled)[0].clone();
    let (body, tag) = real.split_once('.').unwrap();
    let tampered = format!("{}x.{tag}", &body[..body.len() - 1]);
    for forged in [
        "garbage".to_owned(),
        tampered,
        format!("{body}.AAAAAAAAAAAAAAAAAAAAAA"),
    ] {
        assert_eq!(
            settle(&app, &mine, "ack", vec![forged.clone()], json!({})).await,
            0,
            "{forged}"
        );
    }
    assert_eq!(
        settle(&app, &other, "ack", vec![real.clone()], json!({})).await,
        0,
        "another subscription's id"
    );
    assert_eq!(stats(&app, &mine).await["pending"], 1, "still pending");
    assert_eq!(settle(&app, &mine, "ack", vec![real], json!({})).await, 1);
}

#[tokio::test]
async fn pull_validation() {
    let app = TestApp::spawn().await;
    app.create_queue(json!({"name": "q"})).await;
    let sub = consumer(&app, "q", "g", "c", json!({"maxPollRecords": 5})).await;
    let path = format!("/api/v1/mq/subscriptions/{sub}/pull");
    for (body, field) in [
        (json!({"maxMessages": 0}), "maxMessages"),
        (json!({"maxMessages": 6}), "maxMessages"),
        (json!({"waitMs": 20001}), "waitMs"),
        (json!({"waitMs": -1}), "waitMs"),
        (json!({"maxMessages": "ten"}), "maxMessages"),
    ] {
        let (status, error) = app.call(Method::POST, &path, Some(body.clone())).await;
        assert_error(status, &error, 400, "MQ_VALIDATION_ERROR");
        assert_eq!(error["details"]["fields"], json!([field]), "{body}");
    }
    let (status, error) = app
        .call(
            Method::POST,
            &format!("/api/v1/mq/subscriptions/{sub}/ack"),
            Some(json!({})),
        )
        .await;
    assert_error(status, &error, 400, "MQ_VALIDATION_ERROR");
    let hook = subscribe(
        &app,
        json!({"queue": "q", "consumerGroup": "h", "consumerName": "h",
        "subscriptionType": "webhook", "handlerConfig": {"url": "http://127.0.0.1:9/"}}),
    )
    .await;
    let (status, error) = app
        .call(
            Method::POST,
            &format!(
                "/api/v1/mq/subscriptions/{}/pull",
                hook["id"].as_str().unwrap()
            ),
            Some(json!({})),
        )
        .await;
    assert_error(status, &error, 400, "MQ_VALIDATION_ERROR");
}

#[tokio::test]
async fn backpressure_follows_the_slowest_group() {
    let app = TestApp::spawn().await;
    app.create_queue(json!({"name": "q", "maxLength": 3})).await;
    let fast = consumer(&app, "q", "fast", "f", json!({})).await;
    consumer(&app, "q", "slow", "s", json!({})).await;
    for n in 0..3 {
        publish(&app, "q", json!(n), json!({})).await;
    }
    let pulled = pull_all(&app, &fast, 3).await;
    settle(&app, &fast, "ack", ack_ids(&pulled), json!({})).await;
    let (status, error) = app
        .call(
            Method::POST,
            "/api/v1/mq/publish",
            Some(json!({"queue": "q", "payload": 4})),
        )
        .await;
    assert_error(status, &error, 429, "MQ_QUEUE_FULL");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_consumer_that_crashes_loses_nothing() {
    let app = TestApp::spawn().await;
    app.create_queue(json!({"name": "q", "partitionCount": 2}))
        .await;
    let crashing = consumer(
        &app,
        "q",
        "g",
        "crashing",
        json!({"sessionTimeoutMs": 1000, "retryDelayMs": 50}),
    )
    .await;
    let healthy = consumer(
        &app,
        "q",
        "g",
        "healthy",
        json!({"sessionTimeoutMs": 1000, "retryDelayMs": 50}),
    )
    .await;
    let mut published = HashSet::new();
    for n in 0..20 {
        published.insert(publish(&app, "q", json!(n), json!({})).await);
    }
    let lost = pull(&app, &crashing, 10, 1000).await;
    assert!(!lost.is_empty());
    // The crashing consumer never acks; the healthy one acks all it gets until done.
    let mut acked = HashSet::new();
    let deadline = Instant::now() + WAIT;
    while acked != published && Instant::now() < deadline {
        let messages = pull(&app, &healthy, 20, 500).await;
        if settle(&app, &healthy, "ack", ack_ids(&messages), json!({})).await > 0 {
            acked.extend(ids(&messages));
        }
    }
    assert_eq!(acked, published, "every message was acked by someone");
}

#[tokio::test]
async fn consumption_records_carry_the_seed_designs_columns() {
    let app = TestApp::spawn().await;
    app.create_queue(json!({"name": "q"})).await;
    let subscription = consumer(&app, "q", "g", "worker-1", json!({"retryDelayMs": 1})).await;
    let id = publish(&app, "q", json!(1), json!({})).await;
    let first = pull(&app, &subscription, 1, 1000).await.remove(0);
    let (status, _) = app
        .call(
            Method::POST,
            &format!("/api/v1/mq/subscriptions/{subscription}/nack"),
            Some(json!({"ackIds": [first["ackId"]], "delayMs": 50})),
        )
        .await;
    assert_eq!(status, 200);
    let second = common::pull_until(&app, &subscription, 1, WAIT)
        .await
        .remove(0);
    assert_eq!(
        app.ack(&subscription, &[second["ackId"].as_str().unwrap()])
            .await,
        1
    );
    assert!(
        eventually(WAIT, || async {
            stats(&app, &subscription).await["acked"] == 1
        })
        .await
    );

    type Row = (
        String,
        i32,
        Option<String>,
        Option<i32>,
        Option<String>,
        Option<chrono::DateTime<chrono::Utc>>,
        Option<chrono::DateTime<chrono::Utc>>,
        i32,
        Option<i32>,
        Option<String>,
    );
    let mut db = app.database.connect().await;
    let rows: Vec<Row> = sqlx::query_as(
        "SELECT status, attempt, consumer_instance, partition_id, offset_value, consumed_at, \
             next_retry_at, retry_count, processing_time_ms, error_message \
         FROM consumption_records WHERE message_id = $1 ORDER BY attempt",
    )
    .bind(&id)
    .fetch_all(&mut db)
    .await
    .unwrap();
    assert_eq!(rows.len(), 2, "{rows:?}");
    let (failed, acked) = (&rows[0], &rows[1]);
    assert_eq!((failed.0.as_str(), failed.1, failed.7), ("failed", 1, 0));
    assert_eq!((acked.0.as_str(), acked.1, acked.7), ("acked", 2, 1));
    for row in &rows {
        assert!(
            row.2.as_deref().unwrap().starts_with("worker-1@"),
            "{row:?}"
        );
        assert_eq!(row.3, Some(0));
        assert_eq!(row.4.as_deref(), first["offset"].as_str());
        assert!(row.5.is_some());
    }
    assert!(
        failed.6.unwrap() > failed.5.unwrap(),
        "a retry is planned after the failure"
    );
    assert_eq!(acked.6, None);
    assert_eq!(failed.9.as_deref(), Some("nacked by the consumer"));
    assert_eq!(acked.9, None);
    assert!(
        acked.8.is_some_and(|ms| ms >= 0),
        "processing time kept: {acked:?}"
    );
    let consumed: (Option<chrono::DateTime<chrono::Utc>>, String) =
        sqlx::query_as("SELECT consumed_at, status FROM message_records WHERE message_id = $1")
            .bind(&id)
            .fetch_one(&mut db)
            .await
            .unwrap();
    assert_eq!(consumed.1, "consumed");
    assert_eq!(consumed.0, acked.5, "consumed when acked");
}
