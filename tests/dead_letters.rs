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
                        "headers": {"eventType": "order.created"},
                        "contentType": "application/vnd.orders+json"}),
        )
        .await;
    assert_eq!(status, 201);
    nack_next(app, app.tenant, subscription).await;
}

/// Pulls one message of `tenant`'s subscription and nacks it.
async fn nack_next(app: &TestApp, tenant: Uuid, subscription: &str) {
    let pull = format!("/api/v1/mq/subscriptions/{subscription}/pull");
    let (_, pulled) = app
        .call_as(
            tenant,
            "tester",
            Method::POST,
            &pull,
            Some(json!({"maxMessages": 1, "waitMs": 5000})),
        )
        .await;
    let pulled = pulled["messages"].as_array().cloned().unwrap_or_default();
    assert_eq!(pulled.len(), 1, "nothing to nack");
    let (status, body) = app
        .call_as(
            tenant,
            "tester",
            Method::POST,
            &format!("/api/v1/mq/subscriptions/{subscription}/nack"),
            Some(json!({"ackIds": [pulled[0]["ackId"]]})),
        )
        .await;
    assert_eq!((status, &body["nacked"]), (200, &json!(1)), "{body}");
}

/// A pull subscription to `queue` that dead-letters at the first nack.
async fn failing_consumer(app: &TestApp, queue: &str) -> String {
    app.subscribe(
        json!({"queue": queue, "consumerGroup": "g", "consumerName": "c",
                         "subscriptionType": "redis_consumer", "maxRetryAttempts": 0}),
    )
    .await["id"]
        .as_str()
        .unwrap()
        .to_owned()
}

async fn listed(app: &TestApp, queue: &str, count: usize) {
    assert!(
        eventually(WAIT, || async { statuses(app, queue).await.len() == count }).await,
        "{queue} never listed {count} messages"
    );
}

fn failure_codes(result: &Value) -> Vec<(String, String)> {
    result["failed"]
        .as_array()
        .unwrap()
        .iter()
        .map(|f| {
            (
                f["messageId"].as_str().unwrap().to_owned(),
                f["code"].as_str().unwrap().to_owned(),
            )
        })
        .collect()
}

#[tokio::test]
async fn redriven_dead_letters_are_delivered_again_and_never_twice() {
    let app = TestApp::spawn().await;
    app.create_queue(json!({"name": "orders"})).await;
    let subscription = failing_consumer(&app, "orders").await;
    dead_letter(&app, &subscription, "m-1").await;
    listed(&app, "orders.dlq", 1).await;
    assert_eq!(
        statuses(&app, "orders.dlq").await,
        [("m-1".to_owned(), "published".to_owned())]
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
    let (status, redriven) = app
        .call(
            Method::GET,
            "/api/v1/mq/messages/m-1.redriven?queue=orders",
            None,
        )
        .await;
    assert_eq!(status, 200, "{redriven}");
    assert_eq!(
        redriven["contentType"], "application/vnd.orders+json",
        "the producer's content type survives the dead letter and the redrive"
    );
    assert_eq!(
        statuses(&app, "orders.dlq").await,
        [("m-1".to_owned(), "redriven".to_owned())]
    );

    // A second redrive, a message that is no dead letter, and an unknown id all fail alone.
    app.publish(
        json!({"queue": "orders.dlq", "payload": 1, "messageId": "plain",
                       "headers": {"x-original-queue": "orders"}}),
    )
    .await;
    listed(&app, "orders.dlq", 2).await;
    let (status, result) = redrive(&app, "orders.dlq", json!(["m-1", "plain", "unknown"])).await;
    assert_eq!(status, 200, "{result}");
    assert_eq!(result["redriven"], json!([]));
    let expected = [
        ("m-1", "MQ_MESSAGE_NOT_REDRIVABLE"),
        ("plain", "MQ_MESSAGE_NOT_REDRIVABLE"),
        ("unknown", "MQ_MESSAGE_NOT_FOUND"),
    ]
    .map(|(id, code)| (id.to_owned(), code.to_owned()));
    assert_eq!(failure_codes(&result), expected);
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
async fn concurrent_redrives_of_one_message_publish_it_once() {
    let app = TestApp::spawn().await;
    app.create_queue(json!({"name": "orders"})).await;
    let subscription = failing_consumer(&app, "orders").await;
    dead_letter(&app, &subscription, "m-1").await;
    listed(&app, "orders.dlq", 1).await;
    let results =
        futures_util::future::join_all((0..4).map(|_| redrive(&app, "orders.dlq", json!(["m-1"]))))
            .await;
    let won = results
        .iter()
        .filter(|(status, result)| {
            *status == 200 && result["redriven"].as_array().unwrap().len() == 1
        })
        .count();
    assert_eq!(won, 1, "{results:?}");
    assert_eq!(
        pull_until(&app, &subscription, 2, Duration::from_secs(2))
            .await
            .len(),
        1
    );
}

#[tokio::test]
async fn a_refused_publish_gives_the_dead_letter_back() {
    let app = TestApp::spawn().await;
    app.create_queue(json!({"name": "orders", "allowedProducers": ["tester"]}))
        .await;
    let subscription = failing_consumer(&app, "orders").await;
    dead_letter(&app, &subscription, "m-1").await;
    dead_letter(&app, &subscription, "m-2").await;
    listed(&app, "orders.dlq", 2).await;
    // Not a producer of orders: refused there, and the dead letter stays as it was.
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
    assert_eq!(
        failure_codes(&result),
        [("m-1".to_owned(), "MQ_FORBIDDEN".to_owned())]
    );
    // A message already holding the id the redrive would use: nothing is sent twice.
    app.publish(json!({"queue": "orders", "payload": "ahead", "messageId": "m-2.redriven"}))
        .await;
    let (_, result) = redrive(&app, "orders.dlq", json!(["m-2"])).await;
    assert_eq!(
        failure_codes(&result),
        [("m-2".to_owned(), "MQ_MESSAGE_NOT_REDRIVABLE".to_owned())]
    );
    let mut statuses = statuses(&app, "orders.dlq").await;
    statuses.sort();
    assert_eq!(
        statuses,
        [
            ("m-1".to_owned(), "published".to_owned()),
            ("m-2".to_owned(), "published".to_owned())
        ],
        "a refused redrive leaves the dead letter as it was"
    );
    // Then, by a producer, it goes.
    let (_, result) = redrive(&app, "orders.dlq", json!(["m-1"])).await;
    assert_eq!(result["redriven"][0]["messageId"], "m-1", "{result}");
}

#[tokio::test]
async fn a_guests_dead_letter_is_not_sent_to_a_queue_of_the_guest() {
    let app = TestApp::spawn().await;
    app.create_queue(json!({"name": "news", "isPublic": true}))
        .await;
    let guest = Uuid::new_v4();
    // The guest has a queue of the same name: the dead letter must not land there.
    let (status, _) = app
        .call_as(
            guest,
            "tester",
            Method::POST,
            "/api/v1/mq/queues",
            Some(json!({"name": "news"})),
        )
        .await;
    assert_eq!(status, 201);
    let (status, subscription) = app
        .call_as(
            guest,
            "tester",
            Method::POST,
            "/api/v1/mq/subscriptions",
            Some(
                json!({"queue": "news", "queueTenantId": app.tenant, "consumerGroup": "g",
                             "consumerName": "c", "subscriptionType": "redis_consumer",
                             "maxRetryAttempts": 0}),
            ),
        )
        .await;
    assert_eq!(status, 201, "{subscription}");
    app.publish(json!({"queue": "news", "payload": 1, "messageId": "n-1"}))
        .await;
    nack_next(&app, guest, subscription["id"].as_str().unwrap()).await;
    let redrive_path = "/api/v1/mq/queues/news.dlq/redrive";
    let listed_for_guest = eventually(WAIT, || async {
        let (status, page) = app
            .call_as(
                guest,
                "tester",
                Method::GET,
                "/api/v1/mq/queues/news.dlq/messages",
                None,
            )
            .await;
        status == 200
            && page["items"]
                .as_array()
                .is_some_and(|items| items.len() == 1)
    })
    .await;
    assert!(listed_for_guest);
    let (status, result) = app
        .call_as(
            guest,
            "tester",
            Method::POST,
            redrive_path,
            Some(json!({"messageIds": ["n-1"]})),
        )
        .await;
    assert_eq!(status, 200, "{result}");
    assert_eq!(
        failure_codes(&result),
        [("n-1".to_owned(), "MQ_MESSAGE_NOT_REDRIVABLE".to_owned())]
    );
    assert!(
        result["failed"][0]["message"]
            .as_str()
            .unwrap()
            .contains("another tenant"),
        "{result}"
    );
}

#[tokio::test]
async fn a_dead_letter_of_an_encrypted_queue_goes_back_in_plaintext() {
    const KEY: &str = "MDEyMzQ1Njc4OTAxMjM0NTY3ODkwMTIzNDU2Nzg5MDE=";
    let app = TestApp::spawn_with(|env| {
        env.insert("MQ_ENCRYPTION_KEY".into(), KEY.into());
    })
    .await;
    app.create_queue(json!({"name": "orders", "encrypted": true}))
        .await;
    // An unencrypted dead-letter queue keeps the sealed form, never the plaintext.
    app.create_queue(json!({"name": "orders.dlq"})).await;
    let subscription = failing_consumer(&app, "orders").await;
    dead_letter(&app, &subscription, "m-1").await;
    listed(&app, "orders.dlq", 1).await;
    let (_, stored) = app.lookup("orders.dlq", "m-1").await;
    assert!(
        stored["payload"].get("data").is_some(),
        "the dead letter holds the sealed form: {stored}"
    );
    let (_, result) = redrive(&app, "orders.dlq", json!(["m-1"])).await;
    assert_eq!(result["redriven"][0]["messageId"], "m-1", "{result}");
    let again = pull_until(&app, &subscription, 1, WAIT).await;
    assert_eq!(again[0]["payload"], json!({"id": "m-1"}));
}
