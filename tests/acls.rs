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

#[tokio::test]
async fn changing_a_subscription_needs_the_consumer_acl_and_updating_it_its_creator() {
    let app = TestApp::spawn().await;
    app.create_queue(json!({"name": "payments", "allowedConsumers": ["alice", "bob"]}))
        .await;
    let (status, created) = subscribe_as(
        &app,
        "alice",
        json!({"queue": "payments", "consumerGroup": "g", "consumerName": "c",
               "subscriptionType": "webhook",
               "handlerConfig": {"url": "http://127.0.0.1:9/alice", "secret": "alice-secret"}}),
    )
    .await;
    assert_eq!(status, 201, "{created}");
    let path = format!(
        "/api/v1/mq/subscriptions/{}",
        created["id"].as_str().unwrap()
    );
    let redirect = json!({"handlerConfig": {"url": "http://127.0.0.1:9/mallory"}});
    let as_principal =
        |principal: &'static str, method: Method, path: String, body: Option<Value>| {
            let app = &app;
            async move {
                app.call_as(app.tenant, principal, method, &path, body)
                    .await
            }
        };

    // Mallory is not a consumer of the queue: no update, pause or delete.
    let (status, body) =
        as_principal("mallory", Method::PUT, path.clone(), Some(redirect.clone())).await;
    assert_error(status, &body, 403, "MQ_FORBIDDEN");
    for action in ["pause", "resume"] {
        let (status, body) =
            as_principal("mallory", Method::POST, format!("{path}/{action}"), None).await;
        assert_error(status, &body, 403, "MQ_FORBIDDEN");
    }
    let (status, body) = as_principal("mallory", Method::DELETE, path.clone(), None).await;
    assert_error(status, &body, 403, "MQ_FORBIDDEN");

    // Bob may consume, so he may pause it, but not point alice's pushes elsewhere.
    let (status, body) =
        as_principal("bob", Method::PUT, path.clone(), Some(redirect.clone())).await;
    assert_error(status, &body, 403, "MQ_FORBIDDEN");
    let (status, _) = as_principal("bob", Method::POST, format!("{path}/pause"), None).await;
    assert_eq!(status, 200);

    let (status, unchanged) = app.call(Method::GET, &path, None).await;
    assert_eq!(status, 200);
    assert_eq!(
        unchanged["handlerConfig"]["url"],
        "http://127.0.0.1:9/alice"
    );

    // Alice may; once taken off the queue's consumers she may still clean up.
    let (status, body) = as_principal(
        "alice",
        Method::PUT,
        path.clone(),
        Some(json!({"handlerConfig": {"url": "http://127.0.0.1:9/alice-2"}})),
    )
    .await;
    assert_eq!(status, 200, "{body}");
    let (status, _) = app
        .call(
            Method::PUT,
            "/api/v1/mq/queues/payments",
            Some(json!({"allowedConsumers": ["bob"]})),
        )
        .await;
    assert_eq!(status, 200);
    let (status, body) = as_principal("alice", Method::DELETE, path.clone(), None).await;
    assert_eq!(status, 204, "{body}");
}

#[tokio::test]
async fn reading_a_message_needs_the_consumer_acl_and_cancelling_it_the_producer_acl() {
    let app = TestApp::spawn().await;
    app.create_queue(json!({"name": "payments", "allowedProducers": ["billing"],
                            "allowedConsumers": ["ledger"]}))
        .await;
    let (status, published) = app
        .call_as(
            app.tenant,
            "billing",
            Method::POST,
            "/api/v1/mq/publish",
            Some(json!({"queue": "payments", "payload": {"card": "secret"}, "delayMs": 600000})),
        )
        .await;
    assert_eq!(status, 201, "{published}");
    let path = format!(
        "/api/v1/mq/messages/{}?queue=payments",
        published["messageId"].as_str().unwrap()
    );
    let call = |principal: &'static str, method: Method| {
        let (app, path) = (&app, path.clone());
        async move {
            app.call_as(app.tenant, principal, method, &path, None)
                .await
        }
    };

    for outsider in ["mallory", "billing"] {
        let (status, body) = call(outsider, Method::GET).await;
        assert_error(status, &body, 403, "MQ_FORBIDDEN");
        assert!(body.get("payload").is_none(), "no payload leaks: {body}");
    }
    let (status, body) = call("ledger", Method::GET).await;
    assert_eq!(status, 200, "{body}");
    assert_eq!(body["payload"]["card"], "secret");

    for outsider in ["mallory", "ledger"] {
        let (status, body) = call(outsider, Method::DELETE).await;
        assert_error(status, &body, 403, "MQ_FORBIDDEN");
    }
    let (status, body) = call("billing", Method::DELETE).await;
    assert_eq!(status, 204, "{body}");
}
