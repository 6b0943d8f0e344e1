//! Browsing a queue's messages without consuming them, and redriving dead letters back to
//! the queue they came from.

mod common;

use std::time::Duration;

use common::{assert_error, eventually, pull_until, TestApp};
use reqwest::Method;
use serde_json::{json, Value};
use uuid::Uuid;

const WAIT: Duration = Duration::from_secs(10);

async fn browse(app: &TestApp, queue: &str, query: &str) -> (u16, Value) {
    app.call(
        Method::GET,
        &format!("/api/v1/mq/queues/{queue}/messages{query}"),
        None,
    )
    .await
}

/// Statuses of the queue's browsed messages, by id.
async fn statuses(app: &TestApp, queue: &str) -> Vec<(String, String)> {
    let (status, page) = browse(app, queue, "?limit=100").await;
    assert_eq!(status, 200, "{page}");
    page["items"]
        .as_array()
        .unwrap()
        .iter()
        .map(|m| {
            let text = |field: &str| m[field].as_str().unwrap().to_owned();
            (text("messageId"), text("status"))
        })
        .collect()
}

#[tokio::test]
async fn browsing_pages_through_recorded_messages_without_consuming_them() {
    let app = TestApp::spawn().await;
    app.create_queue(json!({"name": "orders"})).await;
    let subscription = app.subscribe_pull("orders", "g").await;
    for n in 0..5 {
        let (status, _) = app
            .publish(
                json!({"queue": "orders", "payload": {"n": n}, "messageId": format!("m-{n}"),
                            "headers": {"eventType": "order.created"}}),
            )
            .await;
        assert_eq!(status, 201);
    }
    assert!(
        eventually(WAIT, || async { statuses(&app, "orders").await.len() == 5 }).await,
        "the five messages were never listed"
    );
    let (_, first) = browse(&app, "orders", "?limit=2").await;
    let ids = |page: &Value| -> Vec<String> {
        page["items"]
            .as_array()
            .unwrap()
            .iter()
            .map(|m| m["messageId"].as_str().unwrap().to_owned())
            .collect()
    };
    assert_eq!(ids(&first), ["m-4", "m-3"], "newest first: {first}");
    assert_eq!(first["items"][0]["headers"]["eventType"], "order.created");
    assert!(
        first["items"][0].get("payload").is_none(),
        "no payloads in a list"
    );
    let next = first["next"].as_str().unwrap();
    let (_, second) = browse(
        &app,
        "orders",
        &format!("?limit=2&before={}", common::urlencode(next)),
    )
    .await;
    assert_eq!(ids(&second), ["m-2", "m-1"]);
    let next = second["next"].as_str().unwrap();
    let (_, last) = browse(
        &app,
        "orders",
        &format!("?limit=2&before={}", common::urlencode(next)),
    )
    .await;
    assert_eq!(ids(&last), ["m-0"]);
    assert!(
        last.get("next").is_none(),
        "the last page has no next: {last}"
    );

    // Nothing was consumed: the subscription still gets all five.
    assert_eq!(pull_until(&app, &subscription, 5, WAIT).await.len(), 5);

    let (status, body) = browse(&app, "orders", "?limit=0").await;
    assert_error(status, &body, 400, "MQ_VALIDATION_ERROR");
    let (status, body) = browse(&app, "orders", "?before=nonsense").await;
    assert_error(status, &body, 400, "MQ_VALIDATION_ERROR");
    // Another tenant sees no such queue.
    let (status, body) = app
        .call_as(
            Uuid::new_v4(),
            "intruder",
            Method::GET,
            "/api/v1/mq/queues/orders/messages",
            None,
        )
        .await;
    assert_error(status, &body, 404, "MQ_QUEUE_NOT_FOUND");
}

async fn redrive(app: &TestApp, queue: &str, ids: Value) -> (u16, Value) {
    app.call(
        Method::POST,
        &format!("/api/v1/mq/queues/{queue}/redrive"),
        Some(json!({"messageIds": ids})),
    )
    .await
}

/// Publishes `id` to orders and nacks it once: with no retries allowed it is dead-lettered.
async fn dead_letter(app: &TestApp, subscription: &str, id: &str) {
    let (status, _) = app
        .publish(
            json!({"queue": "orders", "payload": {"id": id}, "messageId": id, "key": "k",
                        "headers": {"eventType": "order.created"}}),
        )
        .await;
    assert_eq!(status, 201);
    let pulled = pull_until(app, subscription, 1, WAIT).await;
    assert_eq!(pulled.len(), 1);
    let (status, body) = app
        .call(
            Method::POST,
            &format!("/api/v1/mq/subscriptions/{subscription}/nack"),
            Some(json!({"ackIds": [pulled[0]["ackId"]]})),
        )
        .await;
    assert_eq!((status, &body["nacked"]), (200, &json!(1)), "{body}");
}

#[tokio::test]
async fn redriven_dead_letters_are_delivered_again_and_never_twice() {
    let app = TestApp::spawn().await;
    app.create_queue(json!({"name": "orders"})).await;
    let subscription = app
        .subscribe(
            json!({"queue": "orders", "consumerGroup": "g", "consumerName": "c",
                          "subscriptionType": "redis_consumer", "maxRetryAttempts": 0}),
        )
        .await["id"]
        .as_str()
        .unwrap()
        .to_owned();
    dead_letter(&app, &subscription, "m-1").await;
    assert!(
        eventually(WAIT, || async {
            statuses(&app, "orders.dlq").await == [("m-1".to_owned(), "published".to_owned())]
        })
        .await,
        "the dead letter was never listed in orders.dlq"
    );

    let (status, result) = redrive(&app, "orders.dlq", json!(["m-1"])).await;
    assert_eq!(status, 200, "{result}");
    assert_eq!(
        result["redriven"],
        json!([{"messageId": "m-1", "queue": "orders", "newMessageId": "m-1.redriven"}])
    );
    assert_eq!(result["failed"], json!([]));
    // Delivered again, as a fresh message without the dead-letter headers.
    let again = pull_until(&app, &subscription, 1, WAIT).await;
    assert_eq!(again.len(), 1);
    assert_eq!(again[0]["messageId"], "m-1.redriven");
    assert_eq!(again[0]["payload"], json!({"id": "m-1"}));
    assert_eq!(again[0]["key"], "k");
    assert_eq!(again[0]["headers"]["eventType"], "order.created");
    assert!(
        again[0]["headers"].get("x-dead-letter-reason").is_none(),
        "{}",
        again[0]
    );
    assert_eq!(again[0]["deliveryAttempt"], 1);
    assert_eq!(
        statuses(&app, "orders.dlq").await,
        [("m-1".to_owned(), "redriven".to_owned())]
    );

    // A second redrive, a message that is no dead letter, and an unknown id all fail alone.
    app.publish(json!({"queue": "orders.dlq", "payload": 1, "messageId": "plain"}))
        .await;
    assert!(
        eventually(WAIT, || async {
            statuses(&app, "orders.dlq").await.len() == 2
        })
        .await
    );
    let (status, result) = redrive(&app, "orders.dlq", json!(["m-1", "plain", "unknown"])).await;
    assert_eq!(status, 200, "{result}");
    assert_eq!(result["redriven"], json!([]));
    let codes: Vec<(&str, &str)> = result["failed"]
        .as_array()
        .unwrap()
        .iter()
        .map(|f| {
            (
                f["messageId"].as_str().unwrap(),
                f["code"].as_str().unwrap(),
            )
        })
        .collect();
    assert_eq!(
        codes,
        [
            ("m-1", "MQ_MESSAGE_NOT_REDRIVABLE"),
            ("plain", "MQ_MESSAGE_NOT_REDRIVABLE"),
            ("unknown", "MQ_MESSAGE_NOT_FOUND"),
        ]
    );
    assert!(
        pull_until(&app, &subscription, 1, Duration::from_millis(500))
            .await
            .is_empty()
    );

    let (status, body) = redrive(&app, "orders.dlq", json!([])).await;
    assert_error(status, &body, 400, "MQ_VALIDATION_ERROR");
    let too_many: Vec<String> = (0..101).map(|n| n.to_string()).collect();
    let (status, body) = redrive(&app, "orders.dlq", json!(too_many)).await;
    assert_error(status, &body, 400, "MQ_VALIDATION_ERROR");
    // Another tenant cannot redrive this tenant's dead letters.
    let (status, body) = app
        .call_as(
            Uuid::new_v4(),
            "intruder",
            Method::POST,
            "/api/v1/mq/queues/orders.dlq/redrive",
            Some(json!({"messageIds": ["m-1"]})),
        )
        .await;
    assert_error(status, &body, 404, "MQ_QUEUE_NOT_FOUND");
}

#[tokio::test]
async fn a_redrive_needs_the_right_to_publish_to_the_original_queue() {
    let app = TestApp::spawn().await;
    app.create_queue(json!({"name": "orders", "allowedProducers": ["tester"]}))
        .await;
    let subscription = app
        .subscribe(
            json!({"queue": "orders", "consumerGroup": "g", "consumerName": "c",
                          "subscriptionType": "redis_consumer", "maxRetryAttempts": 0}),
        )
        .await["id"]
        .as_str()
        .unwrap()
        .to_owned();
    dead_letter(&app, &subscription, "m-1").await;
    assert!(
        eventually(WAIT, || async {
            statuses(&app, "orders.dlq").await.len() == 1
        })
        .await
    );
    let (status, result) = app
        .call_as(
            app.tenant,
            "operator",
            Method::POST,
            "/api/v1/mq/queues/orders.dlq/redrive",
            Some(json!({"messageIds": ["m-1"]})),
        )
        .await;
    assert_eq!(status, 200, "{result}");
    assert_eq!(result["failed"][0]["code"], "MQ_FORBIDDEN", "{result}");
    assert_eq!(
        statuses(&app, "orders.dlq").await,
        [("m-1".to_owned(), "published".to_owned())],
        "a refused redrive leaves the dead letter as it was"
    );
}
