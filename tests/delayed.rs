//! Delayed and scheduled delivery, message lookup, cancellation and expiry.

mod common;

use std::collections::HashSet;
use std::time::Duration;

use common::{assert_error, eventually, stream_entries, TestApp};
use reqwest::Method;
use serde_json::{json, Value};
use uuid::Uuid;

const WAIT: Duration = Duration::from_secs(10);

fn millis(time: &Value) -> i64 {
    chrono::DateTime::parse_from_rfc3339(time.as_str().expect("a time"))
        .expect("RFC 3339")
        .timestamp_millis()
}

/// Stream entry id → the ms at which Redis appended it.
fn entry_ms(entry_id: &str) -> i64 {
    entry_id.split('-').next().unwrap().parse().unwrap()
}

async fn message(app: &TestApp, queue: &str, id: &str) -> (u16, Value) {
    app.call(
        Method::GET,
        &format!("/api/v1/mq/messages/{id}?queue={queue}"),
        None,
    )
    .await
}

async fn status_of(app: &TestApp, queue: &str, id: &str) -> String {
    message(app, queue, id).await.1["status"]
        .as_str()
        .unwrap_or_default()
        .to_owned()
}

#[tokio::test]
async fn a_delayed_message_appears_at_its_time_not_before() {
    let app = TestApp::spawn().await;
    let queue = app.create_queue(json!({"name": "q"})).await;
    let (status, result) = app
        .call(
            Method::POST,
            "/api/v1/mq/publish/delayed",
            Some(json!({"queue": "q", "payload": {"n": 1}, "delayMs": 1500})),
        )
        .await;
    assert_eq!(status, 201, "{result}");
    assert_eq!(result["offset"], Value::Null);
    let due = millis(&result["scheduledAt"]);
    assert_eq!(due, millis(&result["publishedAt"]) + 1500);
    assert!(
        stream_entries(&app, &queue, 0).await.is_empty(),
        "not visible before its time"
    );
    let (_, fetched) = app.call(Method::GET, "/api/v1/mq/queues/q", None).await;
    assert_eq!(fetched["stats"]["delayedCount"], 1);
    assert_eq!(fetched["stats"]["messageCount"], 0);

    let id = result["messageId"].as_str().unwrap();
    let (status, waiting) = message(&app, "q", id).await;
    assert_eq!(status, 200, "{waiting}");
    assert_eq!(waiting["status"], "scheduled");
    assert_eq!(waiting["payload"], json!({"n": 1}));
    assert_eq!(millis(&waiting["scheduledAt"]), due);

    assert!(
        eventually(WAIT, || async {
            !stream_entries(&app, &queue, 0).await.is_empty()
        })
        .await
    );
    let entries = stream_entries(&app, &queue, 0).await;
    assert_eq!(entries.len(), 1);
    assert!(
        entry_ms(&entries[0].0) >= due,
        "released before its due time"
    );
    assert_eq!(entries[0].1["messageId"], id);
    let (_, fetched) = app.call(Method::GET, "/api/v1/mq/queues/q", None).await;
    assert_eq!(fetched["stats"]["delayedCount"], 0);

    assert!(
        eventually(WAIT, || async {
            status_of(&app, "q", id).await == "published"
        })
        .await
    );
    let (_, record) = message(&app, "q", id).await;
    assert_eq!(record["offset"], entries[0].0.as_str());
    assert_eq!(millis(&record["scheduledAt"]), due);
    assert_eq!(record["deliveries"], json!([]));
}

#[tokio::test]
async fn scheduled_messages_in_the_future_wait_and_in_the_past_go_now() {
    let app = TestApp::spawn().await;
    let queue = app.create_queue(json!({"name": "q"})).await;
    let at = chrono::Utc::now() + chrono::Duration::milliseconds(1200);
    let at_text = at.to_rfc3339_opts(chrono::SecondsFormat::Millis, true);
    let (status, result) = app
        .call(
            Method::POST,
            "/api/v1/mq/publish/scheduled",
            Some(json!({"queue": "q", "payload": "later", "scheduledAt": at_text})),
        )
        .await;
    assert_eq!(status, 201, "{result}");
    assert_eq!(millis(&result["scheduledAt"]), at.timestamp_millis());
    assert_eq!(result["offset"], Value::Null);

    let (status, past) = app
        .call(
            Method::POST,
            "/api/v1/mq/publish/scheduled",
            Some(json!({"queue": "q", "payload": "now", "scheduledAt": "2020-01-01T00:00:00Z"})),
        )
        .await;
    assert_eq!(status, 201);
    assert!(
        past["offset"].is_string(),
        "a past time is delivered now: {past}"
    );
    let entries = stream_entries(&app, &queue, 0).await;
    assert_eq!(entries.len(), 1);
    assert_eq!(entries[0].1["payload"], "now");

    assert!(
        eventually(WAIT, || async {
            stream_entries(&app, &queue, 0).await.len() == 2
        })
        .await
    );
    let entries = stream_entries(&app, &queue, 0).await;
    assert_eq!(entries[1].1["payload"], "later");
    assert!(entry_ms(&entries[1].0) >= at.timestamp_millis());
}

#[tokio::test]
async fn the_topic_route_and_batches_take_delays_too() {
    let app = TestApp::spawn().await;
    let queue = app
        .create_queue(json!({"name": "q", "partitionCount": 2}))
        .await;
    let (status, result) = app
        .call(
            Method::POST,
            "/api/v1/mq/topics/q/publish",
            Some(json!({"payload": 1, "delayMs": 300})),
        )
        .await;
    assert_eq!(status, 201);
    assert!(result["scheduledAt"].is_string());
    let (status, batch) = app
        .call(
            Method::POST,
            "/api/v1/mq/publish/batch",
            Some(json!({"queue": "q", "messages": [
                {"payload": 2, "delayMs": 300}, {"payload": 3}
            ]})),
        )
        .await;
    assert_eq!(status, 201, "{batch}");
    assert_eq!(batch["results"][0]["offset"], Value::Null);
    assert!(batch["results"][1]["offset"].is_string());
    let total = || async {
        stream_entries(&app, &queue, 0).await.len() + stream_entries(&app, &queue, 1).await.len()
    };
    assert!(eventually(WAIT, || async { total().await == 3 }).await);
}

#[tokio::test]
async fn delay_bounds_are_validated() {
    let app = TestApp::spawn_with(|env| {
        env.insert("MAX_DELAY_MS".into(), "60000".into());
    })
    .await;
    let queue = app.create_queue(json!({"name": "q"})).await;
    let beyond = (chrono::Utc::now() + chrono::Duration::minutes(5)).to_rfc3339();
    let cases = [
        (
            "/api/v1/mq/publish/delayed",
            json!({"queue": "q", "payload": 1, "delayMs": 0}),
            "delayMs",
        ),
        (
            "/api/v1/mq/publish/delayed",
            json!({"queue": "q", "payload": 1, "delayMs": 60001}),
            "delayMs",
        ),
        (
            "/api/v1/mq/publish/delayed",
            json!({"queue": "q", "payload": 1}),
            "delayMs",
        ),
        (
            "/api/v1/mq/publish/delayed",
            json!({"queue": "q", "payload": 1, "delayMs": "soon"}),
            "delayMs",
        ),
        (
            "/api/v1/mq/publish/scheduled",
            json!({"queue": "q", "payload": 1, "scheduledAt": beyond}),
            "scheduledAt",
        ),
        (
            "/api/v1/mq/publish/scheduled",
            json!({"queue": "q", "payload": 1, "scheduledAt": "tomorrow"}),
            "scheduledAt",
        ),
        (
            "/api/v1/mq/publish/scheduled",
            json!({"queue": "q", "payload": 1}),
            "scheduledAt",
        ),
        (
            "/api/v1/mq/topics/q/publish",
            json!({"payload": 1, "delayMs": 10, "scheduledAt": beyond}),
            "scheduledAt",
        ),
    ];
    for (path, body, field) in cases {
        let (status, error) = app.call(Method::POST, path, Some(body.clone())).await;
        assert_error(status, &error, 400, "MQ_VALIDATION_ERROR");
        assert_eq!(
            error["details"]["fields"],
            json!([field]),
            "{path} {body}: {error}"
        );
    }
    let (_, fetched) = app.call(Method::GET, "/api/v1/mq/queues/q", None).await;
    assert_eq!(fetched["stats"]["delayedCount"], 0);
    assert!(stream_entries(&app, &queue, 0).await.is_empty());
}

#[tokio::test]
async fn delayed_messages_obey_idempotency_acl_schema_and_backpressure() {
    let app = TestApp::spawn().await;
    app.create_queue(json!({"name": "q", "maxLength": 2, "schemaDefinition": {"type": "integer"}}))
        .await;
    let delayed = |payload: Value, id: &str| json!({"queue": "q", "payload": payload, "delayMs": 60000, "messageId": id});
    let (status, first) = app
        .call(
            Method::POST,
            "/api/v1/mq/publish/delayed",
            Some(delayed(json!(1), "a")),
        )
        .await;
    assert_eq!(status, 201);
    let (status, again) = app
        .call(
            Method::POST,
            "/api/v1/mq/publish/delayed",
            Some(delayed(json!(1), "a")),
        )
        .await;
    assert_eq!(status, 200);
    assert_eq!(again["duplicate"], true);
    assert_eq!(again["scheduledAt"], first["scheduledAt"]);
    assert_eq!(again["offset"], Value::Null);
    let (status, error) = app
        .call(
            Method::POST,
            "/api/v1/mq/publish/delayed",
            Some(delayed(json!("x"), "b")),
        )
        .await;
    assert_error(status, &error, 422, "MQ_SCHEMA_VIOLATION");
    assert_eq!(
        app.call(
            Method::POST,
            "/api/v1/mq/publish/delayed",
            Some(delayed(json!(2), "b"))
        )
        .await
        .0,
        201
    );
    let (status, error) = app
        .call(
            Method::POST,
            "/api/v1/mq/publish/delayed",
            Some(delayed(json!(3), "c")),
        )
        .await;
    assert_error(status, &error, 429, "MQ_QUEUE_FULL");
    let (_, fetched) = app.call(Method::GET, "/api/v1/mq/queues/q", None).await;
    assert_eq!(fetched["stats"]["delayedCount"], 2);

    app.create_queue(json!({"name": "guarded", "allowedProducers": ["svc"]}))
        .await;
    let (status, error) = app
        .call(
            Method::POST,
            "/api/v1/mq/publish/delayed",
            Some(json!({"queue": "guarded", "payload": 1, "delayMs": 10})),
        )
        .await;
    assert_error(status, &error, 403, "MQ_FORBIDDEN");
}

#[tokio::test]
async fn cancel_before_release_prevents_delivery_and_after_release_is_409() {
    let app = TestApp::spawn().await;
    let queue = app
        .create_queue(json!({"name": "q", "partitionCount": 3}))
        .await;
    let (_, waiting) = app
        .call(
            Method::POST,
            "/api/v1/mq/publish/delayed",
            Some(json!({"queue": "q", "payload": "x", "delayMs": 800, "messageId": "cancel-me"})),
        )
        .await;
    assert!(waiting["scheduledAt"].is_string());
    let (_, soon) = app
        .call(
            Method::POST,
            "/api/v1/mq/publish/delayed",
            Some(json!({"queue": "q", "payload": "y", "delayMs": 300, "messageId": "keep-me"})),
        )
        .await;
    assert!(soon["scheduledAt"].is_string());

    let response = app
        .request(Method::DELETE, "/api/v1/mq/messages/cancel-me?queue=q")
        .send()
        .await
        .unwrap();
    assert_eq!(response.status(), 204);
    let (status, error) = app
        .call(
            Method::DELETE,
            "/api/v1/mq/messages/cancel-me?queue=q",
            None,
        )
        .await;
    assert_error(status, &error, 409, "MQ_MESSAGE_NOT_CANCELLABLE");

    assert!(
        eventually(WAIT, || async {
            status_of(&app, "q", "keep-me").await == "published"
        })
        .await
    );
    let (status, error) = app
        .call(Method::DELETE, "/api/v1/mq/messages/keep-me?queue=q", None)
        .await;
    assert_error(status, &error, 409, "MQ_MESSAGE_NOT_CANCELLABLE");
    assert!(
        eventually(WAIT, || async {
            status_of(&app, "q", "cancel-me").await == "cancelled"
        })
        .await
    );

    tokio::time::sleep(Duration::from_millis(1200)).await;
    let mut delivered = Vec::new();
    for partition in 0..3 {
        for (_, envelope) in stream_entries(&app, &queue, partition).await {
            delivered.push(envelope["messageId"].as_str().unwrap().to_owned());
        }
    }
    assert_eq!(
        delivered,
        ["keep-me"],
        "the cancelled message is never delivered"
    );
}

#[tokio::test]
async fn lookup_and_cancel_errors() {
    let app = TestApp::spawn().await;
    app.create_queue(json!({"name": "q"})).await;
    let (status, error) = message(&app, "q", "nothing").await;
    assert_error(status, &error, 404, "MQ_MESSAGE_NOT_FOUND");
    let (status, error) = app
        .call(Method::DELETE, "/api/v1/mq/messages/nothing?queue=q", None)
        .await;
    assert_error(status, &error, 404, "MQ_MESSAGE_NOT_FOUND");
    let (status, error) = app.call(Method::GET, "/api/v1/mq/messages/x", None).await;
    assert_error(status, &error, 400, "MQ_VALIDATION_ERROR");
    assert_eq!(error["details"]["fields"], json!(["queue"]));
    let (status, error) = message(&app, "missing", "x").await;
    assert_error(status, &error, 404, "MQ_QUEUE_NOT_FOUND");

    let (_, result) = app
        .call(
            Method::POST,
            "/api/v1/mq/publish/delayed",
            Some(json!({"queue": "q", "payload": 1, "delayMs": 60000})),
        )
        .await;
    let path = format!(
        "/api/v1/mq/messages/{}?queue=q",
        result["messageId"].as_str().unwrap()
    );
    for method in [Method::GET, Method::DELETE] {
        let response = app
            .request_as(Uuid::new_v4(), "x", method, &path)
            .send()
            .await
            .unwrap();
        let (status, error) = common::read(response).await;
        assert_error(status, &error, 404, "MQ_QUEUE_NOT_FOUND");
    }
    assert_eq!(
        message(&app, "q", result["messageId"].as_str().unwrap())
            .await
            .1["status"],
        "scheduled"
    );
}

#[tokio::test]
async fn a_message_that_expires_before_its_time_is_never_delivered() {
    let app = TestApp::spawn().await;
    let queue = app.create_queue(json!({"name": "q"})).await;
    let (status, _) = app
        .call(Method::POST, "/api/v1/mq/publish/delayed", Some(json!({"queue": "q", "payload": 1, "delayMs": 3000, "ttlMs": 300, "messageId": "short-lived"})))
        .await;
    assert_eq!(status, 201);
    assert!(
        eventually(WAIT, || async {
            status_of(&app, "q", "short-lived").await == "expired"
        })
        .await
    );
    let (_, fetched) = app.call(Method::GET, "/api/v1/mq/queues/q", None).await;
    assert_eq!(
        fetched["stats"]["delayedCount"], 0,
        "expired well before its due time"
    );
    tokio::time::sleep(Duration::from_millis(3200)).await;
    assert!(stream_entries(&app, &queue, 0).await.is_empty());
    let (_, status_body) = app.get_anonymous("/api/v1/mq/status").await;
    assert_eq!(status_body["scheduler"]["expired"], 1);
    assert_eq!(status_body["workers"]["scheduler"], "running");
}

/// Every message id in the queue's streams, with how often it occurs.
async fn delivered_ids(app: &TestApp, queue: &Value) -> Vec<String> {
    let mut ids = Vec::new();
    for partition in 0..queue["partitionCount"].as_u64().unwrap() as u16 {
        for (_, envelope) in stream_entries(app, queue, partition).await {
            ids.push(envelope["messageId"].as_str().unwrap().to_owned());
        }
    }
    ids
}

async fn publish_due_soon(app: &TestApp, count: usize, delay_ms: i64) -> HashSet<String> {
    let mut published = HashSet::new();
    for chunk in 0..count / 500 {
        let messages: Vec<Value> = (0..500)
            .map(|n| json!({"payload": n, "delayMs": delay_ms, "messageId": format!("m-{chunk}-{n}")}))
            .collect();
        let (status, body) = app
            .call(
                Method::POST,
                "/api/v1/mq/publish/batch",
                Some(json!({"queue": "q", "messages": messages})),
            )
            .await;
        assert_eq!(status, 201, "{body}");
        for result in body["results"].as_array().unwrap() {
            published.insert(result["messageId"].as_str().unwrap().to_owned());
        }
    }
    published
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn two_schedulers_release_every_message_exactly_once() {
    let first = TestApp::spawn().await;
    let queue = first
        .create_queue(json!({"name": "q", "partitionCount": 4, "maxLength": 100000}))
        .await;
    let second = first.spawn_sibling().await;
    let published = publish_due_soon(&first, 3000, 700).await;
    assert!(
        eventually(Duration::from_secs(20), || async {
            delivered_ids(&first, &queue).await.len() >= 3000
        })
        .await
    );
    tokio::time::sleep(Duration::from_millis(500)).await;
    let delivered = delivered_ids(&first, &queue).await;
    assert_eq!(delivered.len(), 3000, "no message released twice");
    assert_eq!(delivered.into_iter().collect::<HashSet<_>>(), published);
    let released = |body: Value| body["scheduler"]["released"].as_u64().unwrap();
    let total = released(first.get_anonymous("/api/v1/mq/status").await.1)
        + released(second.get_anonymous("/api/v1/mq/status").await.1);
    assert_eq!(
        total, 3000,
        "the two schedulers' counts add up to the messages"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_scheduler_killed_mid_run_loses_nothing() {
    let mut first = TestApp::spawn().await;
    let queue = first
        .create_queue(json!({"name": "q", "partitionCount": 8, "maxLength": 100000}))
        .await;
    let published = publish_due_soon(&first, 5000, 400).await;
    let successor = first.spawn_sibling().await;
    // Let the first scheduler start releasing, then kill it wherever it is.
    tokio::time::sleep(Duration::from_millis(420)).await;
    first.kill();
    assert!(
        eventually(Duration::from_secs(20), || async {
            delivered_ids(&successor, &queue).await.len() >= 5000
        })
        .await
    );
    tokio::time::sleep(Duration::from_millis(500)).await;
    let delivered = delivered_ids(&successor, &queue).await;
    assert_eq!(delivered.len(), 5000, "nothing released twice");
    assert_eq!(
        delivered.into_iter().collect::<HashSet<_>>(),
        published,
        "nothing lost"
    );
}

#[tokio::test]
async fn an_unconsumed_stream_message_is_marked_expired_soon_after_its_ttl() {
    let app = TestApp::spawn().await;
    app.create_queue(json!({"name": "q"})).await;
    app.create_queue(json!({"name": "watched"})).await;
    let (status, subscription) = app
        .call(
            Method::POST,
            "/api/v1/mq/subscriptions",
            Some(json!({"queue": "watched", "consumerGroup": "g", "consumerName": "c", "subscriptionType": "redis_consumer"})),
        )
        .await;
    assert_eq!(status, 201);
    for queue in ["q", "watched"] {
        app.call(
            Method::POST,
            "/api/v1/mq/publish",
            Some(json!({"queue": queue, "payload": 1, "ttlMs": 500, "messageId": "brief"})),
        )
        .await;
    }
    // Delivered in time: not expired.
    let (_, pulled) = app
        .call(
            Method::POST,
            &format!(
                "/api/v1/mq/subscriptions/{}/pull",
                subscription["id"].as_str().unwrap()
            ),
            Some(json!({"maxMessages": 1})),
        )
        .await;
    assert_eq!(pulled["messages"].as_array().unwrap().len(), 1);
    assert!(
        eventually(WAIT, || async {
            status_of(&app, "q", "brief").await == "expired"
        })
        .await
    );
    tokio::time::sleep(Duration::from_millis(1500)).await;
    assert_eq!(
        status_of(&app, "watched", "brief").await,
        "published",
        "taken before its expiry"
    );
}

/// Publishes on `producer` and looks up at once on `reader`, `count` times; every answer must
/// be the message as published.
async fn publish_then_look_up(producer: &TestApp, reader: &TestApp, round: &str, count: usize) {
    for n in 0..count {
        // Keyless (generated ids) and producer ids, spread over the partitions.
        let mut body = json!({"queue": "q", "payload": {"n": n}, "headers": {"h": "v"}});
        if n % 2 == 0 {
            body["messageId"] = json!(format!("{round}-{n}"));
        }
        let (status, published) = producer.publish(body).await;
        assert_eq!(status, 201, "{published}");
        let id = published["messageId"].as_str().unwrap();
        let (status, found) = message(reader, "q", id).await;
        assert_eq!(status, 200, "lookup {n} right after its publish: {found}");
        assert_eq!(found["status"], "published");
        assert_eq!(found["partition"], published["partition"]);
        assert_eq!(found["offset"], published["offset"]);
        assert_eq!(found["payload"], json!({"n": n}));
        assert_eq!(found["headers"], json!({"h": "v"}));
        assert!(found["expiresAt"].is_string());
    }
}

#[tokio::test]
async fn a_message_is_readable_the_moment_its_publish_answered() {
    let app = TestApp::spawn().await;
    app.create_queue(json!({"name": "q", "partitionCount": 4}))
        .await;
    publish_then_look_up(&app, &app, "same", 200).await;
    // Publish on one instance, look up on another.
    let sibling = app.spawn_sibling().await;
    publish_then_look_up(&app, &sibling, "there", 40).await;
    publish_then_look_up(&sibling, &app, "back", 40).await;

    // Cancelling at once: a stored message is not cancellable (409, not 404)...
    let (_, stored) = app.publish(json!({"queue": "q", "payload": 1})).await;
    let id = stored["messageId"].as_str().unwrap();
    let (status, error) = sibling
        .call(
            Method::DELETE,
            &format!("/api/v1/mq/messages/{id}?queue=q"),
            None,
        )
        .await;
    assert_error(status, &error, 409, "MQ_MESSAGE_NOT_CANCELLABLE");
    // ...and a delayed one is cancelled, and never delivered.
    let subscription = app.subscribe_pull("q", "g").await;
    let (_, delayed) = app
        .call(
            Method::POST,
            "/api/v1/mq/publish/delayed",
            Some(json!({"queue": "q", "payload": "never", "delayMs": 300})),
        )
        .await;
    let id = delayed["messageId"].as_str().unwrap();
    let (status, _) = sibling
        .call(
            Method::DELETE,
            &format!("/api/v1/mq/messages/{id}?queue=q"),
            None,
        )
        .await;
    assert_eq!(status, 204);
    assert_eq!(status_of(&app, "q", id).await, "cancelled");
    tokio::time::sleep(Duration::from_millis(600)).await;
    let delivered = app.pull(&subscription, 500, 500).await;
    assert!(
        delivered.iter().all(|m| m["messageId"] != id),
        "a cancelled message is never delivered"
    );
}
