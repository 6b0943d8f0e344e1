//! Queue ACLs hold on every path: a dead-letter queue must admit the subscription's principal
//! as a producer, and system queues are written only by the service.

mod common;

use std::time::Duration;

use common::{assert_error, eventually, TestApp};
use reqwest::Method;
use serde_json::{json, Value};

const WAIT: Duration = Duration::from_secs(15);

async fn subscribe_as(app: &TestApp, principal: &str, body: Value) -> (u16, Value) {
    app.call_as(
        app.tenant,
        principal,
        Method::POST,
        "/api/v1/mq/subscriptions",
        Some(body),
    )
    .await
}

fn failing_fields(body: &Value) -> &Value {
    &body["details"]["fields"]
}

#[tokio::test]
async fn a_dead_letter_queue_must_admit_the_subscriptions_principal() {
    let app = TestApp::spawn().await;
    app.create_queue(json!({"name": "payments", "allowedProducers": ["billing"]}))
        .await;
    app.create_queue(json!({"name": "mine"})).await;
    let body = |dead_letter_queue: &str| {
        json!({"queue": "mine", "consumerGroup": "g", "consumerName": "c",
               "subscriptionType": "redis_consumer", "deadLetterQueue": dead_letter_queue,
               "maxRetryAttempts": 0})
    };
    let (status, error) = subscribe_as(&app, "mallory", body("payments")).await;
    assert_error(status, &error, 403, "MQ_FORBIDDEN");
    assert_eq!(failing_fields(&error), &json!(["deadLetterQueue"]));
    let (status, error) = subscribe_as(&app, "mallory", body("audit-logs")).await;
    assert_error(status, &error, 403, "MQ_FORBIDDEN");

    // Set later by update: refused the same way.
    let (status, own) = subscribe_as(&app, "mallory", body("mine.dlq")).await;
    assert_eq!(status, 201, "{own}");
    let path = format!("/api/v1/mq/subscriptions/{}", own["id"].as_str().unwrap());
    let (status, error) = app
        .call_as(
            app.tenant,
            "mallory",
            Method::PUT,
            &path,
            Some(json!({"deadLetterQueue": "payments"})),
        )
        .await;
    assert_error(status, &error, 403, "MQ_FORBIDDEN");
    // Another principal cannot point mallory's subscription there either.
    let (status, error) = app
        .call_as(
            app.tenant,
            "billing",
            Method::PUT,
            &path,
            Some(json!({"deadLetterQueue": "payments"})),
        )
        .await;
    assert_error(status, &error, 403, "MQ_FORBIDDEN");

    // A principal that may publish there may dead-letter there, until it may not.
    let (status, allowed) = subscribe_as(
        &app,
        "billing",
        json!({"queue": "mine", "consumerGroup": "b", "consumerName": "c",
               "subscriptionType": "redis_consumer", "deadLetterQueue": "payments",
               "maxRetryAttempts": 0, "offsetResetPolicy": "earliest"}),
    )
    .await;
    assert_eq!(status, 201, "{allowed}");
    let (status, _) = app
        .call(
            Method::PUT,
            "/api/v1/mq/queues/payments",
            Some(json!({"allowedProducers": ["someone-else"]})),
        )
        .await;
    assert_eq!(status, 200);
    app.publish(json!({"queue": "mine", "payload": "fails"}))
        .await;
    let subscription = allowed["id"].as_str().unwrap();
    let pulled = app
        .call_as(
            app.tenant,
            "billing",
            Method::POST,
            &format!("/api/v1/mq/subscriptions/{subscription}/pull"),
            Some(json!({"maxMessages": 1, "waitMs": 2000})),
        )
        .await
        .1;
    let ack_id = pulled["messages"][0]["ackId"].clone();
    let (status, nacked) = app
        .call_as(
            app.tenant,
            "billing",
            Method::POST,
            &format!("/api/v1/mq/subscriptions/{subscription}/nack"),
            Some(json!({"ackIds": [ack_id]})),
        )
        .await;
    assert_eq!((status, nacked["nacked"].clone()), (200, json!(1)));
    // The dead-letter queue refuses it for good: set aside once, never copied there.
    assert!(
        eventually(WAIT, || async {
            common::subscription_stats(&app, subscription).await["setAside"] == 1
        })
        .await,
        "the refused message is set aside, not dead-lettered"
    );
    let stats = common::subscription_stats(&app, subscription).await;
    assert_eq!(stats["deadLettered"], 0, "{stats}");
    let (_, payments) = app
        .call(Method::GET, "/api/v1/mq/queues/payments", None)
        .await;
    assert_eq!(
        payments["stats"]["messageCount"], 0,
        "nothing reached payments"
    );
}

fn internal(app: &TestApp, path: &str) -> reqwest::RequestBuilder {
    app.anonymous(Method::POST, path)
        .header("x-service-token", common::SERVICE_TOKEN)
}

#[tokio::test]
async fn system_queues_are_read_by_tenants_and_written_by_the_service_only() {
    let app = TestApp::spawn().await;
    let (status, created) = common::read(
        internal(&app, "/internal/mq/user-events")
            .json(&json!({"tenantId": app.tenant, "eventType": "user.created", "userId": "u1"}))
            .send()
            .await
            .unwrap(),
    )
    .await;
    assert_eq!(status, 201, "{created}");

    let (status, queue) = app
        .call(Method::GET, "/api/v1/mq/queues/user-events", None)
        .await;
    assert_eq!((status, queue["system"].clone()), (200, json!(true)));
    let (_, listed) = app.call(Method::GET, "/api/v1/mq/queues", None).await;
    for item in listed["items"].as_array().unwrap() {
        let system = ["user-events", "audit-logs"].contains(&item["name"].as_str().unwrap());
        assert_eq!(item["system"], system, "{item}");
    }
    let reader = app.subscribe_pull("user-events", "reader").await;
    let events = common::pull_until(&app, &reader, 1, WAIT).await;
    assert_eq!(events[0]["payload"]["userId"], "u1");

    for (method, path, body) in [
        (
            Method::POST,
            "/api/v1/mq/publish",
            Some(json!({"queue": "user-events", "payload": "forged"})),
        ),
        (
            Method::POST,
            "/api/v1/mq/publish/batch",
            Some(json!({"queue": "user-events", "messages": [{"payload": "forged"}]})),
        ),
        (
            Method::POST,
            "/api/v1/mq/publish/delayed",
            Some(json!({"queue": "user-events", "payload": "forged", "delayMs": 10})),
        ),
        (
            Method::POST,
            "/api/v1/mq/topics/user-events/publish",
            Some(json!({"payload": "forged"})),
        ),
        (Method::POST, "/api/v1/mq/queues/user-events/purge", None),
        (
            Method::PUT,
            "/api/v1/mq/queues/user-events",
            Some(json!({"isPublic": true})),
        ),
        (Method::DELETE, "/api/v1/mq/queues/user-events", None),
        (
            Method::POST,
            "/api/v1/mq/queues",
            Some(json!({"name": "notifications"})),
        ),
    ] {
        let label = format!("{method} {path}");
        let (status, error) = app.call(method, path, body).await;
        assert_error(status, &error, 403, "MQ_FORBIDDEN");
        assert!(
            error["message"].as_str().unwrap().contains("system queue"),
            "{label}: {error}"
        );
    }
    let (_, queue) = app
        .call(Method::GET, "/api/v1/mq/queues/user-events", None)
        .await;
    assert_eq!(
        queue["stats"]["messageCount"], 1,
        "only the service's event is stored"
    );
    assert_eq!(queue["isPublic"], false);
}
