//! Deletion and failures leave nothing half-done: a deleted queue leaves no Redis key behind
//! and cannot be written back by another instance; a subscription whose group cannot be
//! destroyed is kept for a retry; a webhook serving task that dies is restarted.

mod common;

use std::time::Duration;

use common::receiver::{Receiver, Reply};
use common::{assert_error, eventually, pull_until, queue_id, TestApp};
use deadpool_redis::redis;
use reqwest::Method;
use serde_json::{json, Value};
use uuid::Uuid;

const WAIT: Duration = Duration::from_secs(15);

async fn keys_of(app: &TestApp, queue: &Value) -> Vec<String> {
    let id = queue_id(queue).to_string();
    app.redis
        .keys()
        .await
        .into_iter()
        .filter(|key| key.contains(&id))
        .collect()
}

async fn stream_groups(app: &TestApp, queue: &Value) -> usize {
    let keys = mq::broker::keys::KeyLayout::new(&app.redis.prefix).partition(queue_id(queue), 0);
    let mut connection = app.redis.connection().await;
    let groups: redis::RedisResult<Vec<redis::Value>> = redis::cmd("XINFO")
        .arg("GROUPS")
        .arg(&keys.stream)
        .query_async(&mut connection)
        .await;
    groups.map_or(0, |groups| groups.len())
}

#[tokio::test]
async fn deleting_a_queue_removes_every_key_it_owned() {
    let app = TestApp::spawn_with(|env| {
        env.insert("RETENTION_INTERVAL_MS".into(), "200".into());
    })
    .await;
    let queue = app
        .create_queue(
            json!({"name": "busy", "partitionCount": 2, "isPublic": true,
                             "retentionMs": 1000, "compressionType": "gzip"}),
        )
        .await;
    let subscription = app
        .subscribe(
            json!({"queue": "busy", "consumerGroup": "g", "consumerName": "c",
                          "subscriptionType": "redis_consumer"}),
        )
        .await;
    let guest = Uuid::new_v4();
    let (status, _) = app
        .call_as(
            guest,
            "g",
            Method::POST,
            "/api/v1/mq/subscriptions",
            Some(
                json!({"queue": "busy", "queueTenantId": app.tenant, "consumerGroup": "g",
                        "consumerName": "c", "subscriptionType": "redis_consumer"}),
            ),
        )
        .await;
    assert_eq!(status, 201);
    // Every kind of key: messages with producer ids, a short-lived one, a delayed one and a
    // cancelled one, a retry waiting, and what retention trims from the lagging guest.
    for n in 0..6 {
        let (status, body) = app
            .publish(json!({"queue": "busy", "payload": n, "messageId": format!("m-{n}")}))
            .await;
        assert_eq!(status, 201, "{body}");
    }
    for id in ["later", "cancelled"] {
        app.call(
            Method::POST,
            "/api/v1/mq/publish/delayed",
            Some(json!({"queue": "busy", "payload": 1, "messageId": id, "delayMs": 60000})),
        )
        .await;
    }
    let (status, _) = app
        .call(
            Method::DELETE,
            "/api/v1/mq/messages/cancelled?queue=busy",
            None,
        )
        .await;
    assert_eq!(status, 204);
    // One delivery failed and delivered again (attempts), one waiting for its retry.
    let id = subscription["id"].as_str().unwrap();
    let pulled = pull_until(&app, id, 2, WAIT).await;
    for (message, delay) in pulled.iter().zip([0, 60_000]) {
        let (status, _) = app
            .call(
                Method::POST,
                &format!("/api/v1/mq/subscriptions/{id}/nack"),
                Some(json!({"ackIds": [message["ackId"]], "delayMs": delay})),
            )
            .await;
        assert_eq!(status, 200);
    }
    // Due retries come first on their partition; new messages may come along.
    let again = pull_until(&app, id, 5, WAIT).await;
    assert!(
        again.iter().any(|m| m["deliveryAttempt"] == 2),
        "the failed message was delivered again: {again:?}"
    );
    // `<prefix>{<queue>}:<partition>:<kind>[:<group>]` or `<prefix>{<queue>}:<kind>`.
    let kinds = |keys: Vec<String>| -> std::collections::BTreeSet<String> {
        keys.iter()
            .map(|key| {
                let mut parts = key.rsplit_once("}:").unwrap().1.split(':');
                let first = parts.next().unwrap();
                match first.parse::<u16>() {
                    Ok(_) => parts.next().unwrap().to_owned(),
                    Err(_) => first.to_owned(),
                }
            })
            .collect()
    };
    assert!(
        eventually(WAIT, || async {
            let present = kinds(keys_of(&app, &queue).await);
            [
                "stream",
                "delayed",
                "delayed-envelopes",
                "journal",
                "bytes",
                "ids",
                "cancelled",
                "expiring",
                "inflight",
                "retry",
                "attempts",
                "trimmed",
            ]
            .iter()
            .all(|kind| present.contains(*kind))
        })
        .await,
        "every kind of key exists before the delete: {:?}",
        kinds(keys_of(&app, &queue).await)
    );

    // A message that expires before retention would remove it is watched until it does.
    app.publish(json!({"queue": "busy", "payload": "brief", "ttlMs": 950}))
        .await;
    assert!(kinds(keys_of(&app, &queue).await).contains("expiry"));

    let (status, _) = app
        .call(Method::DELETE, "/api/v1/mq/queues/busy", None)
        .await;
    assert_eq!(status, 204);
    let left = keys_of(&app, &queue).await;
    assert!(
        left.iter().all(|key| key.ends_with(":deleted")),
        "only the tombstone remains: {left:?}"
    );
    assert_eq!(left.len(), 1, "one tombstone for the queue: {left:?}");
}

#[tokio::test]
async fn a_publish_racing_a_deletion_on_another_instance_cannot_bring_the_queue_back() {
    let app = TestApp::spawn().await;
    let sibling = app.spawn_sibling().await;
    let queue = app.create_queue(json!({"name": "gone"})).await;
    // The sibling knows the queue (its cache stays fresh for two seconds).
    let (status, _) = sibling
        .publish(json!({"queue": "gone", "payload": 1}))
        .await;
    assert_eq!(status, 201);
    let (status, _) = app
        .call(Method::DELETE, "/api/v1/mq/queues/gone", None)
        .await;
    assert_eq!(status, 204);
    let (status, error) = sibling
        .publish(json!({"queue": "gone", "payload": 2}))
        .await;
    assert_error(status, &error, 404, "MQ_QUEUE_NOT_FOUND");
    let left = keys_of(&app, &queue).await;
    assert!(
        left.iter().all(|key| key.ends_with(":deleted")),
        "no stream came back: {left:?}"
    );
    // A queue of the same name is a new queue, with keys of its own.
    app.create_queue(json!({"name": "gone"})).await;
    let (status, _) = sibling
        .publish(json!({"queue": "gone", "payload": 3}))
        .await;
    assert_eq!(status, 201);
}

#[tokio::test]
async fn a_subscription_whose_group_cannot_be_destroyed_is_kept_for_a_retry() {
    let (app, redis) = TestApp::spawn_behind_redis_proxy().await;
    let queue = app.create_queue(json!({"name": "q"})).await;
    let id = app.subscribe_pull("q", "g").await;
    app.publish(json!({"queue": "q", "payload": 1})).await;
    assert_eq!(
        stream_groups(&app, &queue).await,
        2,
        "the group and the recorder's"
    );

    redis.cut();
    let path = format!("/api/v1/mq/subscriptions/{id}");
    let response = app.request(Method::DELETE, &path).send().await.unwrap();
    assert!(response.headers().contains_key("retry-after"));
    let (status, error) = common::read(response).await;
    assert_error(status, &error, 503, "MQ_SERVICE_UNAVAILABLE");
    redis.restore();
    let (status, kept) = app.call(Method::GET, &path, None).await;
    assert_eq!(status, 200, "the subscription is kept: {kept}");
    assert_eq!(stream_groups(&app, &queue).await, 2);

    let (status, _) = app.call(Method::DELETE, &path, None).await;
    assert_eq!(status, 204);
    assert_eq!(
        stream_groups(&app, &queue).await,
        1,
        "the group went before the subscription"
    );
    let (status, _) = app.call(Method::GET, &path, None).await;
    assert_eq!(status, 404);
}

#[tokio::test]
async fn a_webhook_serving_task_that_panics_is_restarted() {
    let app = TestApp::spawn().await;
    let receiver = Receiver::start(Reply::Status(200)).await;
    app.create_queue(json!({"name": "q"})).await;
    let subscription = app
        .subscribe(
            json!({"queue": "q", "consumerGroup": "g", "consumerName": "c",
                          "subscriptionType": "webhook",
                          "handlerConfig": {"url": receiver.url("/hook")}}),
        )
        .await;
    app.publish(json!({"queue": "q", "payload": "before"}))
        .await;
    assert!(eventually(WAIT, || async { receiver.delivered().len() == 1 }).await);

    let id: Uuid = subscription["id"].as_str().unwrap().parse().unwrap();
    app.state.faults.panic_serving(id);
    // The armed panic fires at the task's next turn: the publish wakes it.
    app.publish(json!({"queue": "q", "payload": "after"})).await;
    assert!(
        eventually(WAIT, || async { !app.state.faults.serving_panic_armed(id) }).await,
        "the serving task panicked"
    );
    assert!(
        eventually(WAIT, || async { receiver.delivered().len() == 2 }).await,
        "the subscription is served again after its task panicked"
    );
}
