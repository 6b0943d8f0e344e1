//! Webhook push delivery against a real local HTTP receiver.

mod common;

use std::collections::BTreeSet;
use std::time::{Duration, Instant};

use common::receiver::{Receiver, Reply};
use common::{eventually, TestApp};
use hmac::{Hmac, Mac};
use reqwest::Method;
use serde_json::{json, Value};
use sha2::Sha256;

const WAIT: Duration = Duration::from_secs(15);

async fn webhook(app: &TestApp, queue: &str, group: &str, handler: Value, extra: Value) -> String {
    let mut body = json!({"queue": queue, "consumerGroup": group, "consumerName": format!("{group}-1"),
                          "subscriptionType": "webhook", "handlerConfig": handler});
    body.as_object_mut()
        .unwrap()
        .extend(extra.as_object().cloned().unwrap_or_default());
    let (status, subscription) = app
        .call(Method::POST, "/api/v1/mq/subscriptions", Some(body))
        .await;
    assert_eq!(status, 201, "{subscription}");
    subscription["id"].as_str().unwrap().to_owned()
}

async fn publish(app: &TestApp, queue: &str, body: Value) -> String {
    let mut message = json!({"queue": queue});
    message
        .as_object_mut()
        .unwrap()
        .extend(body.as_object().cloned().unwrap_or_default());
    let (status, result) = app
        .call(Method::POST, "/api/v1/mq/publish", Some(message))
        .await;
    assert_eq!(status, 201, "{result}");
    result["messageId"].as_str().unwrap().to_owned()
}

fn message_ids(received: &[common::receiver::Received]) -> BTreeSet<String> {
    received
        .iter()
        .map(|r| r.json["messageId"].as_str().unwrap().to_owned())
        .collect()
}

async fn delivered_count(receiver: &Receiver, count: usize) -> bool {
    eventually(WAIT, || async { receiver.delivered().len() >= count }).await
}

#[tokio::test]
async fn a_push_carries_the_body_headers_and_a_verifiable_signature() {
    let app = TestApp::spawn().await;
    let receiver = Receiver::start(Reply::Status(200)).await;
    app.create_queue(json!({"name": "orders"})).await;
    let sub = webhook(
        &app,
        "orders",
        "billing",
        json!({"url": receiver.url("/hooks/orders"), "secret": "whsec-123", "headers": {"x-team": "billing"}}),
        json!({}),
    )
    .await;
    let response = app
        .request(Method::POST, "/api/v1/mq/publish")
        .header("traceparent", "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01")
        .json(&json!({"queue": "orders", "payload": {"total": 42}, "headers": {"eventType": "order.created"},
                      "key": "customer-42", "correlationId": "corr-9"}))
        .send()
        .await
        .unwrap();
    let published: Value = response.json().await.unwrap();
    assert!(
        delivered_count(&receiver, 1).await,
        "the message was pushed"
    );
    let request = &receiver.delivered()[0];
    let body = &request.json;
    assert_eq!(body["messageId"], published["messageId"]);
    assert_eq!(body["queue"], "orders");
    assert_eq!(body["subscriptionId"], sub);
    assert_eq!(body["payload"], json!({"total": 42}));
    assert_eq!(body["headers"], json!({"eventType": "order.created"}));
    assert_eq!(body["key"], "customer-42");
    assert_eq!(body["correlationId"], "corr-9");
    assert_eq!(body["traceId"], "4bf92f3577b34da6a3ce929d0e0e4736");
    assert_eq!(body["deliveryAttempt"], 1);
    assert!(body["publishedAt"].is_string());
    let header = |name: &str| {
        request
            .headers
            .get(name)
            .map(|v| v.to_str().unwrap().to_owned())
    };
    assert_eq!(
        header("x-mq-message-id").as_deref(),
        published["messageId"].as_str()
    );
    assert_eq!(header("x-mq-delivery-attempt").as_deref(), Some("1"));
    assert_eq!(header("x-team").as_deref(), Some("billing"));
    assert!(header("traceparent")
        .unwrap()
        .starts_with("00-4bf92f3577b34da6a3ce929d0e0e4736-"));
    let signature = header("x-mq-signature").expect("signed");
    let (t, v1) = signature.split_once(",v1=").unwrap();
    let t = t.strip_prefix("t=").unwrap();
    let mut mac = Hmac::<Sha256>::new_from_slice(b"whsec-123").unwrap();
    mac.update(format!("{t}.").as_bytes());
    mac.update(&request.body);
    mac.verify_slice(&hex::decode(v1).unwrap())
        .expect("signature verifies");
    assert!((chrono::Utc::now().timestamp() - t.parse::<i64>().unwrap()).abs() < 60);

    let (_, subscription) = app
        .call(
            Method::GET,
            &format!("/api/v1/mq/subscriptions/{sub}"),
            None,
        )
        .await;
    assert!(
        !subscription.to_string().contains("whsec-123"),
        "the secret is never returned"
    );
    assert!(
        eventually(WAIT, || async {
            common::subscription_stats(&app, &sub).await["acked"] == 1
        })
        .await
    );
}

#[tokio::test]
async fn failures_are_retried_with_growing_spacing() {
    let app = TestApp::spawn().await;
    let receiver = Receiver::start(Reply::Status(200)).await;
    receiver.script(vec![Reply::Status(500), Reply::Status(503)]);
    app.create_queue(json!({"name": "q"})).await;
    webhook(
        &app,
        "q",
        "g",
        json!({"url": receiver.url("/")}),
        json!({"retryDelayMs": 400}),
    )
    .await;
    let id = publish(&app, "q", json!({"payload": 1})).await;
    assert!(delivered_count(&receiver, 1).await);
    let requests = receiver.received();
    assert_eq!(requests.len(), 3, "500, 503, then 200");
    let attempts: Vec<&Value> = requests
        .iter()
        .map(|r| &r.json["deliveryAttempt"])
        .collect();
    assert_eq!(attempts, [&json!(1), &json!(2), &json!(3)]);
    let first_gap = requests[1].at - requests[0].at;
    let second_gap = requests[2].at - requests[1].at;
    assert!(
        first_gap >= Duration::from_millis(360),
        "first retry after retryDelayMs: {first_gap:?}"
    );
    assert!(
        second_gap >= Duration::from_millis(720),
        "second retry after twice that: {second_gap:?}"
    );
    assert!(
        eventually(WAIT, || async {
            app.call(
                Method::GET,
                &format!("/api/v1/mq/messages/{id}?queue=q"),
                None,
            )
            .await
            .1["status"]
                == "consumed"
        })
        .await
    );
    let (_, record) = app
        .call(
            Method::GET,
            &format!("/api/v1/mq/messages/{id}?queue=q"),
            None,
        )
        .await;
    let errors: Vec<&Value> = record["deliveries"]
        .as_array()
        .unwrap()
        .iter()
        .map(|d| &d["error"])
        .collect();
    assert_eq!(
        errors,
        [&json!("HTTP 500"), &json!("HTTP 503"), &Value::Null]
    );
}

#[tokio::test]
async fn an_endpoint_that_always_fails_ends_in_the_dead_letter_queue() {
    let app = TestApp::spawn().await;
    let receiver = Receiver::start(Reply::Status(500)).await;
    app.create_queue(json!({"name": "q"})).await;
    let sub = webhook(
        &app,
        "q",
        "g",
        json!({"url": receiver.url("/")}),
        json!({"maxRetryAttempts": 2, "retryDelayMs": 50}),
    )
    .await;
    let id = publish(
        &app,
        "q",
        json!({"payload": {"a": 1}, "headers": {"eventType": "e"}}),
    )
    .await;
    assert!(
        eventually(WAIT, || async {
            app.call(Method::GET, "/api/v1/mq/queues/q.dlq", None)
                .await
                .1["stats"]["messageCount"]
                == 1
        })
        .await
    );
    assert_eq!(
        receiver.received().len(),
        3,
        "maxRetryAttempts + 1 deliveries"
    );
    let replay = common::stream_entries(
        &app,
        &app.call(Method::GET, "/api/v1/mq/queues/q.dlq", None)
            .await
            .1,
        0,
    )
    .await;
    let dead = &replay[0].1;
    assert_eq!(dead["messageId"], id);
    assert_eq!(dead["payload"], json!({"a": 1}));
    assert_eq!(dead["headers"]["eventType"], "e");
    assert_eq!(
        dead["headers"]["x-dead-letter-reason"],
        "max-retries-exceeded"
    );
    assert_eq!(dead["headers"]["x-original-queue"], "q");
    assert_eq!(dead["headers"]["x-delivery-attempts"], "3");
    assert_eq!(dead["headers"]["x-last-error"], "HTTP 500");
    assert!(
        eventually(WAIT, || async {
            common::subscription_stats(&app, &sub).await["deadLettered"] == 1
        })
        .await
    );
}

#[tokio::test]
async fn a_hanging_receiver_times_out_and_the_message_is_retried() {
    let app = TestApp::spawn().await;
    let receiver = Receiver::start(Reply::Status(200)).await;
    receiver.script(vec![Reply::Hang]);
    app.create_queue(json!({"name": "q"})).await;
    webhook(
        &app,
        "q",
        "g",
        json!({"url": receiver.url("/"), "timeoutMs": 300}),
        json!({"retryDelayMs": 50}),
    )
    .await;
    let id = publish(&app, "q", json!({"payload": 1})).await;
    assert!(
        delivered_count(&receiver, 1).await,
        "delivered after the timeout"
    );
    assert_eq!(receiver.delivered()[0].json["deliveryAttempt"], 2);
    assert!(
        eventually(WAIT, || async {
            let (_, record) = app
                .call(
                    Method::GET,
                    &format!("/api/v1/mq/messages/{id}?queue=q"),
                    None,
                )
                .await;
            record["deliveries"][0]["error"]
                .as_str()
                .is_some_and(|e| e.contains("timed out"))
        })
        .await
    );
}

#[tokio::test]
async fn retry_after_is_honoured() {
    let app = TestApp::spawn().await;
    let receiver = Receiver::start(Reply::Status(200)).await;
    receiver.script(vec![Reply::RetryAfter(429, 1)]);
    app.create_queue(json!({"name": "q"})).await;
    webhook(
        &app,
        "q",
        "g",
        json!({"url": receiver.url("/")}),
        json!({"retryDelayMs": 10}),
    )
    .await;
    publish(&app, "q", json!({"payload": 1})).await;
    assert!(delivered_count(&receiver, 1).await);
    let requests = receiver.received();
    assert!(
        requests[1].at - requests[0].at >= Duration::from_millis(950),
        "waited the asked second"
    );
}

#[tokio::test]
async fn redirects_are_not_followed() {
    let app = TestApp::spawn().await;
    let receiver = Receiver::start(Reply::Status(200)).await;
    receiver.script(vec![Reply::Redirect]);
    app.create_queue(json!({"name": "q"})).await;
    webhook(
        &app,
        "q",
        "g",
        json!({"url": receiver.url("/")}),
        json!({"retryDelayMs": 10}),
    )
    .await;
    publish(&app, "q", json!({"payload": 1})).await;
    assert!(delivered_count(&receiver, 1).await);
    let paths: Vec<u16> = receiver.received().iter().map(|r| r.status).collect();
    assert_eq!(
        paths,
        [302, 200],
        "the 302 counted as a failure and was retried, not followed"
    );
}

#[tokio::test]
async fn pause_and_resume_lose_nothing() {
    let app = TestApp::spawn().await;
    let receiver = Receiver::start(Reply::Status(200)).await;
    app.create_queue(json!({"name": "q"})).await;
    let sub = webhook(&app, "q", "g", json!({"url": receiver.url("/")}), json!({})).await;
    app.call(
        Method::POST,
        &format!("/api/v1/mq/subscriptions/{sub}/pause"),
        None,
    )
    .await;
    // Serving stops within a second of the pause.
    tokio::time::sleep(Duration::from_millis(1000)).await;
    let mut published = BTreeSet::new();
    for n in 0..5 {
        published.insert(publish(&app, "q", json!({"payload": n})).await);
    }
    tokio::time::sleep(Duration::from_millis(1500)).await;
    assert!(
        receiver.received().is_empty(),
        "nothing is pushed while paused"
    );
    app.call(
        Method::POST,
        &format!("/api/v1/mq/subscriptions/{sub}/resume"),
        None,
    )
    .await;
    assert!(delivered_count(&receiver, 5).await);
    assert_eq!(message_ids(&receiver.delivered()), published);
}

#[tokio::test]
async fn filters_apply_to_pushes() {
    let app = TestApp::spawn().await;
    let receiver = Receiver::start(Reply::Status(200)).await;
    app.create_queue(json!({"name": "q"})).await;
    webhook(
        &app,
        "q",
        "g",
        json!({"url": receiver.url("/")}),
        json!({"messageFilter": {"headers.kind": ["a", "b"]}}),
    )
    .await;
    let wanted = publish(&app, "q", json!({"payload": 1, "headers": {"kind": "a"}})).await;
    publish(&app, "q", json!({"payload": 2, "headers": {"kind": "c"}})).await;
    publish(&app, "q", json!({"payload": 3})).await;
    assert!(delivered_count(&receiver, 1).await);
    tokio::time::sleep(Duration::from_millis(800)).await;
    assert_eq!(message_ids(&receiver.received()), BTreeSet::from([wanted]));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn concurrency_is_bounded_per_subscription() {
    let app = TestApp::spawn().await;
    let receiver = Receiver::start(Reply::SlowOk(Duration::from_millis(150))).await;
    app.create_queue(json!({"name": "q", "partitionCount": 4}))
        .await;
    webhook(
        &app,
        "q",
        "g",
        json!({"url": receiver.url("/"), "concurrency": 3}),
        json!({}),
    )
    .await;
    let messages: Vec<Value> = (0..24).map(|n| json!({"payload": n})).collect();
    app.call(
        Method::POST,
        "/api/v1/mq/publish/batch",
        Some(json!({"queue": "q", "messages": messages})),
    )
    .await;
    assert!(delivered_count(&receiver, 24).await);
    assert!(
        receiver.max_in_flight() <= 3,
        "at most 3 in flight, saw {}",
        receiver.max_in_flight()
    );
    assert!(
        receiver.max_in_flight() >= 2,
        "deliveries do run in parallel"
    );
}

#[tokio::test]
async fn concurrency_one_delivers_a_partition_in_order() {
    let app = TestApp::spawn().await;
    let receiver = Receiver::start(Reply::Status(200)).await;
    receiver.script(vec![
        Reply::Status(200),
        Reply::Status(200),
        Reply::Status(500),
    ]);
    app.create_queue(json!({"name": "q"})).await;
    webhook(
        &app,
        "q",
        "g",
        json!({"url": receiver.url("/"), "concurrency": 1}),
        json!({"retryDelayMs": 100}),
    )
    .await;
    for n in 0..10 {
        publish(&app, "q", json!({"payload": n})).await;
    }
    assert!(delivered_count(&receiver, 10).await);
    let order: Vec<i64> = receiver
        .delivered()
        .iter()
        .map(|r| r.json["payload"].as_i64().unwrap())
        .collect();
    assert_eq!(
        order,
        (0..10).collect::<Vec<_>>(),
        "the failed third message held back the rest"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn two_dispatchers_deliver_each_message_once() {
    let first = TestApp::spawn().await;
    let second = first.spawn_sibling().await;
    let receiver = Receiver::start(Reply::Status(200)).await;
    let queue = first
        .create_queue(json!({"name": "q", "partitionCount": 4}))
        .await;
    webhook(
        &first,
        "q",
        "g",
        json!({"url": receiver.url("/"), "concurrency": 8}),
        json!({}),
    )
    .await;
    let messages: Vec<Value> = (0..200).map(|n| json!({"payload": n})).collect();
    second
        .call(
            Method::POST,
            "/api/v1/mq/publish/batch",
            Some(json!({"queue": "q", "messages": messages})),
        )
        .await;
    assert!(delivered_count(&receiver, 200).await);
    tokio::time::sleep(Duration::from_millis(500)).await;
    let delivered = receiver.delivered();
    assert_eq!(delivered.len(), 200, "no message pushed twice");
    assert_eq!(message_ids(&delivered).len(), 200);
    drop(queue);
}

#[tokio::test]
async fn denied_networks_are_refused_at_delivery_time() {
    let app = TestApp::spawn_with(|env| {
        env.insert(
            "WEBHOOK_DENIED_NETWORKS".into(),
            "127.0.0.0/8, ::1/128".into(),
        );
    })
    .await;
    let receiver = Receiver::start(Reply::Status(200)).await;
    app.create_queue(json!({"name": "q"})).await;
    let started = Instant::now();
    webhook(
        &app,
        "q",
        "g",
        json!({"url": format!("http://localhost:{}/", receiver.address.port())}),
        json!({"retryDelayMs": 60000}),
    )
    .await;
    webhook(
        &app,
        "q",
        "h",
        json!({"url": receiver.url("/")}),
        json!({"retryDelayMs": 60000}),
    )
    .await;
    let id = publish(&app, "q", json!({"payload": 1})).await;
    assert!(
        eventually(WAIT, || async {
            let (_, record) = app
                .call(
                    Method::GET,
                    &format!("/api/v1/mq/messages/{id}?queue=q"),
                    None,
                )
                .await;
            record["deliveries"]
                .as_array()
                .is_some_and(|d| d.len() == 2)
        })
        .await
    );
    let (_, record) = app
        .call(
            Method::GET,
            &format!("/api/v1/mq/messages/{id}?queue=q"),
            None,
        )
        .await;
    for delivery in record["deliveries"].as_array().unwrap() {
        assert_eq!(delivery["status"], "failed");
        assert!(
            delivery["error"]
                .as_str()
                .unwrap()
                .contains("WEBHOOK_DENIED_NETWORKS"),
            "{delivery}"
        );
    }
    assert!(
        receiver.received().is_empty(),
        "nothing reached the denied address"
    );
    assert!(started.elapsed() < WAIT);
}
