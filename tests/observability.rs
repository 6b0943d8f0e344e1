//! Monitoring views, Prometheus output, the internal API, the audit trail and the OpenAPI
//! description.

mod common;

use std::time::Duration;

use common::{assert_error, eventually, read, TestApp, SERVICE_TOKEN};
use mq::broker::recorder::RecorderVisit;
use reqwest::Method;
use serde_json::{json, Value};
use uuid::Uuid;

const WAIT: Duration = Duration::from_secs(15);

async fn topic(app: &TestApp, name: &str) -> Value {
    let (status, body) = app
        .call(Method::GET, "/api/v1/mq/metrics/topics", None)
        .await;
    assert_eq!(status, 200, "{body}");
    body["topics"]
        .as_array()
        .unwrap()
        .iter()
        .find(|t| t["name"] == name)
        .cloned()
        .unwrap_or(Value::Null)
}

async fn pull_subscription(app: &TestApp, queue: &str) -> String {
    let (status, body) = app
        .call(
            Method::POST,
            "/api/v1/mq/subscriptions",
            Some(
                json!({"queue": queue, "consumerGroup": "g", "consumerName": "c",
                        "subscriptionType": "redis_consumer", "retryDelayMs": 60000}),
            ),
        )
        .await;
    assert_eq!(status, 201, "{body}");
    body["id"].as_str().unwrap().to_owned()
}

#[tokio::test]
async fn monitoring_views_follow_the_messages() {
    let app = TestApp::spawn().await;
    app.create_queue(json!({"name": "q", "partitionCount": 2}))
        .await;
    let sub = pull_subscription(&app, "q").await;
    let messages: Vec<Value> = (0..5).map(|n| json!({"payload": n})).collect();
    app.call(
        Method::POST,
        "/api/v1/mq/publish/batch",
        Some(json!({"queue": "q", "messages": messages})),
    )
    .await;

    let before = topic(&app, "q").await;
    assert_eq!(before["messageCount"], 5);
    assert_eq!(before["lag"], 5, "lag counts what no consumer took yet");
    assert_eq!(before["pendingCount"], 0);
    assert_eq!(before["subscriptionCount"], 1);
    assert!(before["publishRate"].as_f64().unwrap() > 0.0);

    let (_, pulled) = app
        .call(
            Method::POST,
            &format!("/api/v1/mq/subscriptions/{sub}/pull"),
            Some(json!({"maxMessages": 3})),
        )
        .await;
    let pulled = pulled["messages"].as_array().unwrap().clone();
    assert_eq!(pulled.len(), 3);
    let during = topic(&app, "q").await;
    assert_eq!(
        (during["lag"].clone(), during["pendingCount"].clone()),
        (json!(2), json!(3))
    );

    let ack_ids: Vec<&Value> = pulled.iter().map(|m| &m["ackId"]).collect();
    app.call(
        Method::POST,
        &format!("/api/v1/mq/subscriptions/{sub}/ack"),
        Some(json!({"ackIds": [ack_ids[0], ack_ids[1]]})),
    )
    .await;
    app.call(
        Method::POST,
        &format!("/api/v1/mq/subscriptions/{sub}/nack"),
        Some(json!({"ackIds": [ack_ids[2]]})),
    )
    .await;
    let after = topic(&app, "q").await;
    assert_eq!(after["lag"], 2);
    assert_eq!(
        after["pendingCount"], 1,
        "the nacked message waits for its retry"
    );
    assert!(after["consumeRate"].as_f64().unwrap() > 0.0);

    let (status, metrics) = app.call(Method::GET, "/api/v1/mq/metrics", None).await;
    assert_eq!(status, 200);
    assert!(metrics["redisStreams"]["totalStreams"].as_u64().unwrap() >= 2);
    assert_eq!(metrics["redisStreams"]["totalConsumerGroups"], 1);
    assert!(metrics["redisStreams"]["totalMessages"].as_u64().unwrap() >= 5);
    assert_eq!(metrics["redisStreams"]["pendingMessages"], 1);
    assert_eq!(metrics["consumers"]["activeConsumers"], 1);
    assert!(metrics["consumers"]["totalLag"].as_u64().unwrap() >= 2);
    assert!(metrics["consumers"]["processingRate"].as_f64().unwrap() > 0.0);
    let error_rate = metrics["consumers"]["errorRate"].as_f64().unwrap();
    assert!(
        (error_rate - 1.0 / 3.0).abs() < 0.01,
        "one failure in three attempts: {error_rate}"
    );
    assert!(
        metrics["performance"]["p99Latency"].as_f64().unwrap() > 0.0,
        "{metrics}"
    );
    assert!(metrics["performance"]["p95Latency"].as_f64().unwrap() > 0.0);
    assert!(metrics["performance"]["averageLatency"].as_f64().unwrap() > 0.0);
    assert!(metrics["performance"]["throughput"].as_f64().unwrap() > 0.0);

    let (_, consumers) = app
        .call(Method::GET, "/api/v1/mq/metrics/consumers", None)
        .await;
    let consumer = &consumers["consumers"][0];
    assert_eq!(consumer["subscriptionId"], sub);
    assert_eq!(consumer["queue"], "q");
    assert_eq!(consumer["consumerGroup"], "g");
    assert_eq!(consumer["status"], "active");
    assert_eq!(consumer["lag"], 2);
    assert_eq!(consumer["pending"], 1);
    assert!(consumer["processingRate"].as_f64().unwrap() > 0.0);
    assert!(consumer["errorRate"].as_f64().unwrap() > 0.0);
    assert!(consumer["avgProcessingMs"].as_f64().is_some());
    assert!(
        eventually(WAIT, || async {
            app.call(Method::GET, "/api/v1/mq/metrics/consumers", None)
                .await
                .1["consumers"][0]["lastConsumedAt"]
                .is_string()
        })
        .await
    );

    // Another tenant sees none of it.
    let stranger = Uuid::new_v4();
    for path in [
        "/api/v1/mq/metrics",
        "/api/v1/mq/metrics/topics",
        "/api/v1/mq/metrics/consumers",
    ] {
        let (status, body) = read(
            app.request_as(stranger, "x", Method::GET, path)
                .send()
                .await
                .unwrap(),
        )
        .await;
        assert_eq!(status, 200);
        let text = body.to_string();
        assert!(
            !text.contains("\"q\"") && !text.contains(&sub),
            "{path}: {text}"
        );
    }
    let (_, foreign) = read(
        app.request_as(stranger, "x", Method::GET, "/api/v1/mq/metrics")
            .send()
            .await
            .unwrap(),
    )
    .await;
    assert_eq!(foreign["redisStreams"]["totalMessages"], 0);
    assert_eq!(foreign["performance"]["throughput"], 0.0);
}

fn sample_value(
    samples: &prometheus_parse::Scrape,
    name: &str,
    labels: &[(&str, &str)],
) -> Option<f64> {
    samples
        .samples
        .iter()
        .find(|s| s.metric == name && labels.iter().all(|(k, v)| s.labels.get(k) == Some(*v)))
        .map(|s| match s.value {
            prometheus_parse::Value::Counter(v)
            | prometheus_parse::Value::Gauge(v)
            | prometheus_parse::Value::Untyped(v) => v,
            prometheus_parse::Value::Histogram(ref buckets) => {
                buckets.last().map_or(0.0, |b| b.count)
            }
            _ => f64::NAN,
        })
}

async fn scrape(app: &TestApp) -> prometheus_parse::Scrape {
    let text = app
        .anonymous(Method::GET, "/metrics")
        .send()
        .await
        .unwrap()
        .text()
        .await
        .unwrap();
    let lines = text.lines().map(|l| Ok(l.to_owned()));
    prometheus_parse::Scrape::parse(lines).expect("valid Prometheus text format")
}

#[tokio::test]
async fn prometheus_output_parses_and_counts_per_queue() {
    let app = TestApp::spawn_with(|env| {
        env.insert("METRICS_MAX_QUEUE_SERIES".into(), "3".into());
        env.insert("METRICS_GAUGE_INTERVAL_MS".into(), "0".into());
    })
    .await;
    app.create_queue(json!({"name": "q"})).await;
    let sub = pull_subscription(&app, "q").await;
    for n in 0..4 {
        app.call(
            Method::POST,
            "/api/v1/mq/publish",
            Some(json!({"queue": "q", "payload": n})),
        )
        .await;
    }
    let (_, pulled) = app
        .call(
            Method::POST,
            &format!("/api/v1/mq/subscriptions/{sub}/pull"),
            Some(json!({"maxMessages": 2})),
        )
        .await;
    let ack_ids: Vec<Value> = pulled["messages"]
        .as_array()
        .unwrap()
        .iter()
        .map(|m| m["ackId"].clone())
        .collect();
    app.call(
        Method::POST,
        &format!("/api/v1/mq/subscriptions/{sub}/ack"),
        Some(json!({"ackIds": ack_ids})),
    )
    .await;

    let tenant = app.tenant.to_string();
    let scraped = scrape(&app).await;
    let count = |event: &str| {
        sample_value(
            &scraped,
            "mq_messages_total",
            &[("tenant", &tenant), ("queue", "q"), ("event", event)],
        )
    };
    assert_eq!(count("published"), Some(4.0));
    assert_eq!(count("delivered"), Some(2.0));
    assert_eq!(count("acked"), Some(2.0));
    let state = |state: &str| {
        sample_value(
            &scraped,
            "mq_queue_messages",
            &[("tenant", &tenant), ("queue", "q"), ("state", state)],
        )
    };
    assert_eq!(state("stored"), Some(4.0));
    assert_eq!(state("lag"), Some(2.0));
    assert_eq!(state("pending"), Some(0.0));
    assert_eq!(state("delayed"), Some(0.0));
    assert_eq!(
        sample_value(&scraped, "mq_delivery_latency_seconds_count", &[]),
        Some(2.0)
    );
    assert!(sample_value(&scraped, "mq_record_writer_backlog", &[]).is_some());
    assert!(sample_value(
        &scraped,
        "mq_pool_connections",
        &[("pool", "redis"), ("state", "open")]
    )
    .is_some());
    assert!(sample_value(
        &scraped,
        "mq_http_requests_total",
        &[("route", "/api/v1/mq/publish"), ("status", "201")]
    )
    .is_some());

    // Past METRICS_MAX_QUEUE_SERIES, further queues share the "_other" series.
    for name in ["r1", "r2", "r3"] {
        app.create_queue(json!({"name": name})).await;
        app.call(
            Method::POST,
            "/api/v1/mq/publish",
            Some(json!({"queue": name, "payload": 1})),
        )
        .await;
    }
    let scraped = scrape(&app).await;
    let distinct: std::collections::BTreeSet<String> = scraped
        .samples
        .iter()
        .filter(|s| s.metric == "mq_queue_messages")
        .map(|s| s.labels.get("queue").unwrap_or_default().to_owned())
        .collect();
    assert!(distinct.contains("_other"), "{distinct:?}");
    assert!(
        distinct.len() <= 4,
        "at most the cap plus _other: {distinct:?}"
    );
}

fn internal(app: &TestApp, method: Method, path: &str) -> reqwest::RequestBuilder {
    app.anonymous(method, path)
        .header("x-service-token", SERVICE_TOKEN)
        .header("x-service-name", "tests")
}

#[tokio::test]
async fn internal_routes_publish_to_system_queues_and_report() {
    let app = TestApp::spawn().await;
    let tenant = app.tenant.to_string();
    for (path, body, queue, event) in [
        (
            "/internal/mq/user-events",
            json!({"tenantId": tenant, "eventType": "user.created", "userId": "u1", "data": {"a": 1}}),
            "user-events",
            "user.created",
        ),
        (
            "/internal/mq/user-notifications",
            json!({"tenantId": tenant, "eventType": "welcome", "userId": "u1"}),
            "user-notifications",
            "welcome",
        ),
        (
            "/internal/mq/audit-logs",
            json!({"tenantId": tenant, "action": "login", "actor": "u1", "resource": "session"}),
            "audit-logs",
            "login",
        ),
        (
            "/internal/mq/notifications",
            json!({"tenantId": tenant, "channel": "email", "recipient": "a@b.c", "template": "t"}),
            "notifications",
            "email",
        ),
    ] {
        let (status, result) = read(
            internal(&app, Method::POST, path)
                .json(&body)
                .send()
                .await
                .unwrap(),
        )
        .await;
        assert_eq!(status, 201, "{path}: {result}");
        assert_eq!(result["queue"], queue);
        let (status, stored) = app
            .call(
                Method::GET,
                &format!(
                    "/api/v1/mq/messages/{}?queue={queue}",
                    result["messageId"].as_str().unwrap()
                ),
                None,
            )
            .await;
        if status == 200 {
            assert!(
                stored["payload"].get("tenantId").is_none(),
                "tenantId is not part of the payload"
            );
            assert_eq!(stored["headers"]["eventType"], event);
        }
        let entries = common::stream_entries(
            &app,
            &app.call(Method::GET, &format!("/api/v1/mq/queues/{queue}"), None)
                .await
                .1,
            0,
        )
        .await;
        let (_, envelope) = entries
            .iter()
            .find(|(_, e)| e["messageId"] == result["messageId"])
            .unwrap();
        assert_eq!(envelope["headers"]["eventType"], event);
        assert!(envelope["payload"].get("tenantId").is_none());
        assert_eq!(
            envelope["producerId"], "tests",
            "the calling service's X-Service-Name"
        );
    }
    // Tenant from the header; conflicting or missing tenant is 400.
    let (status, _) = read(
        internal(&app, Method::POST, "/internal/mq/user-events")
            .header("x-tenant-id", &tenant)
            .json(&json!({"eventType": "x"}))
            .send()
            .await
            .unwrap(),
    )
    .await;
    assert_eq!(status, 201);
    for (header, body) in [
        (
            Some(Uuid::new_v4().to_string()),
            json!({"tenantId": tenant}),
        ),
        (None, json!({"eventType": "x"})),
        (None, json!({"tenantId": "not-a-uuid"})),
    ] {
        let mut request = internal(&app, Method::POST, "/internal/mq/user-events").json(&body);
        if let Some(header) = header {
            request = request.header("x-tenant-id", header);
        }
        let (status, error) = read(request.send().await.unwrap()).await;
        assert_error(status, &error, 400, "MQ_VALIDATION_ERROR");
    }

    let (status, audit) = read(
        internal(
            &app,
            Method::GET,
            &format!("/internal/mq/audit-queue-status?tenantId={tenant}"),
        )
        .send()
        .await
        .unwrap(),
    )
    .await;
    assert_eq!(status, 200);
    assert!(audit["messageCount"].as_u64().unwrap() >= 1, "{audit}");
    let (_, all) = read(
        internal(&app, Method::GET, "/internal/mq/audit-queue-status")
            .send()
            .await
            .unwrap(),
    )
    .await;
    assert!(all["messageCount"].as_u64().unwrap() >= audit["messageCount"].as_u64().unwrap());
    let (status, notifications) = read(
        internal(
            &app,
            Method::GET,
            &format!("/internal/mq/notification-queue?tenantId={tenant}"),
        )
        .send()
        .await
        .unwrap(),
    )
    .await;
    assert_eq!(status, 200);
    assert_eq!(notifications["messageCount"], 1);
    let (_, none) = read(
        internal(
            &app,
            Method::GET,
            &format!(
                "/internal/mq/notification-queue?tenantId={}",
                Uuid::new_v4()
            ),
        )
        .send()
        .await
        .unwrap(),
    )
    .await;
    assert_eq!(
        none["messageCount"], 0,
        "a tenant without the queue has zeros"
    );
    let (status, metrics) = read(
        internal(&app, Method::GET, "/internal/mq/metrics")
            .send()
            .await
            .unwrap(),
    )
    .await;
    assert_eq!(status, 200);
    assert!(metrics["redisStreams"]["totalMessages"].as_u64().unwrap() >= 5);
    let (status, detailed) = read(
        internal(&app, Method::GET, "/internal/mq/health-detailed")
            .send()
            .await
            .unwrap(),
    )
    .await;
    assert_eq!(status, 200, "{detailed}");
    assert_eq!(detailed["workers"]["dispatcher"], "running");
    assert!(detailed["pools"]["redis"]["max"].as_u64().is_some());
    assert!(detailed["checks"]["postgres"]["latencyMs"]
        .as_f64()
        .is_some());
}

#[tokio::test]
async fn internal_routes_refuse_bad_tokens() {
    let app = TestApp::spawn().await;
    for (method, path) in [
        (Method::POST, "/internal/mq/user-events"),
        (Method::POST, "/internal/mq/user-notifications"),
        (Method::POST, "/internal/mq/audit-logs"),
        (Method::POST, "/internal/mq/notifications"),
        (Method::GET, "/internal/mq/audit-queue-status"),
        (Method::GET, "/internal/mq/notification-queue"),
        (Method::GET, "/internal/mq/metrics"),
        (Method::GET, "/internal/mq/health-detailed"),
    ] {
        for token in [None, Some("wrong-token"), Some("")] {
            let mut request = app
                .anonymous(method.clone(), path)
                .json(&json!({"tenantId": app.tenant}));
            if let Some(token) = token {
                request = request.header("x-service-token", token);
            }
            let (status, error) = read(request.send().await.unwrap()).await;
            assert_error(status, &error, 401, "MQ_UNAUTHORIZED");
        }
        // A gateway JWT is not a service credential.
        let (status, error) = read(
            app.request(method.clone(), path)
                .json(&json!({}))
                .send()
                .await
                .unwrap(),
        )
        .await;
        assert_error(status, &error, 401, "MQ_UNAUTHORIZED");
    }
}

#[tokio::test]
async fn queue_and_subscription_changes_are_audited() {
    let app = TestApp::spawn().await;
    app.create_queue(json!({"name": "orders"})).await;
    app.call(
        Method::PUT,
        "/api/v1/mq/queues/orders",
        Some(json!({"description": "d"})),
    )
    .await;
    let sub = pull_subscription(&app, "orders").await;
    app.call(
        Method::POST,
        &format!("/api/v1/mq/subscriptions/{sub}/pause"),
        None,
    )
    .await;
    app.call(
        Method::POST,
        &format!("/api/v1/mq/subscriptions/{sub}/resume"),
        None,
    )
    .await;
    app.call(
        Method::DELETE,
        &format!("/api/v1/mq/subscriptions/{sub}"),
        None,
    )
    .await;
    app.call(Method::POST, "/api/v1/mq/queues/orders/purge", None)
        .await;
    app.call(Method::DELETE, "/api/v1/mq/queues/orders", None)
        .await;
    let (_, audit_queue) = app
        .call(Method::GET, "/api/v1/mq/queues/audit-logs", None)
        .await;
    let events = common::stream_entries(&app, &audit_queue, 0).await;
    let actions: Vec<&str> = events
        .iter()
        .map(|(_, e)| e["payload"]["action"].as_str().unwrap())
        .collect();
    assert_eq!(
        actions,
        [
            "queue.created",
            "queue.updated",
            "subscription.created",
            "subscription.paused",
            "subscription.resumed",
            "subscription.deleted",
            "queue.purged",
            "queue.deleted"
        ]
    );
    let first = &events[0].1;
    assert_eq!(first["payload"]["actor"], "tester");
    assert_eq!(first["payload"]["resource"]["type"], "queue");
    assert_eq!(first["payload"]["resource"]["name"], "orders");
    assert!(first["payload"]["at"].is_string());
    assert_eq!(first["headers"]["eventType"], "queue.created");
}

/// The routes of API.md, as (method, path) with `{...}` for parameters.
const CONTRACT: &[(&str, &str)] = &[
    ("POST", "/api/v1/mq/queues"),
    ("GET", "/api/v1/mq/queues"),
    ("GET", "/api/v1/mq/queues/{name}"),
    ("PUT", "/api/v1/mq/queues/{name}"),
    ("DELETE", "/api/v1/mq/queues/{name}"),
    ("POST", "/api/v1/mq/queues/{name}/purge"),
    ("POST", "/api/v1/mq/publish"),
    ("POST", "/api/v1/mq/publish/batch"),
    ("POST", "/api/v1/mq/publish/delayed"),
    ("POST", "/api/v1/mq/publish/scheduled"),
    ("POST", "/api/v1/mq/topics/{name}/publish"),
    ("GET", "/api/v1/mq/messages/{messageId}"),
    ("DELETE", "/api/v1/mq/messages/{messageId}"),
    ("POST", "/api/v1/mq/subscriptions"),
    ("GET", "/api/v1/mq/subscriptions"),
    ("GET", "/api/v1/mq/subscriptions/{id}"),
    ("PUT", "/api/v1/mq/subscriptions/{id}"),
    ("DELETE", "/api/v1/mq/subscriptions/{id}"),
    ("POST", "/api/v1/mq/subscriptions/{id}/pause"),
    ("POST", "/api/v1/mq/subscriptions/{id}/resume"),
    ("POST", "/api/v1/mq/subscriptions/{id}/pull"),
    ("POST", "/api/v1/mq/subscriptions/{id}/ack"),
    ("POST", "/api/v1/mq/subscriptions/{id}/nack"),
    ("GET", "/api/v1/mq/metrics"),
    ("GET", "/api/v1/mq/metrics/topics"),
    ("GET", "/api/v1/mq/metrics/consumers"),
    ("GET", "/api/v1/mq/health"),
    ("GET", "/api/v1/mq/status"),
    ("GET", "/metrics"),
    ("GET", "/api/v1/mq/openapi.json"),
    ("POST", "/internal/mq/user-events"),
    ("POST", "/internal/mq/user-notifications"),
    ("POST", "/internal/mq/audit-logs"),
    ("GET", "/internal/mq/audit-queue-status"),
    ("POST", "/internal/mq/notifications"),
    ("GET", "/internal/mq/notification-queue"),
    ("GET", "/internal/mq/metrics"),
    ("GET", "/internal/mq/health-detailed"),
];

/// Routes the service adds to the contract (docs/API-NOTES.md).
const EXTENSIONS: &[(&str, &str)] = &[
    ("GET", "/api/v1/mq/queues/{name}/subscribers"),
    ("DELETE", "/api/v1/mq/queues/{name}/subscribers/{id}"),
    ("GET", "/api/v1/mq/queues/{name}/messages"),
    ("POST", "/api/v1/mq/queues/{name}/redrive"),
];

#[tokio::test]
async fn openapi_describes_every_route_the_router_serves() {
    let app = TestApp::spawn().await;
    let (status, document) = app.get_anonymous("/api/v1/mq/openapi.json").await;
    assert_eq!(status, 200);
    assert_eq!(document["openapi"], "3.1.0");
    let paths = document["paths"].as_object().unwrap();
    let documented: Vec<(String, String)> = paths
        .iter()
        .flat_map(|(path, item)| {
            item.as_object()
                .unwrap()
                .keys()
                .map(move |method| (method.to_ascii_uppercase(), path.clone()))
        })
        .collect();
    for (method, path) in CONTRACT.iter().chain(EXTENSIONS) {
        assert!(
            documented.contains(&((*method).to_owned(), (*path).to_owned())),
            "{method} {path} is not in openapi.json"
        );
    }
    assert_eq!(
        documented.len(),
        CONTRACT.len() + EXTENSIONS.len(),
        "openapi.json documents exactly the contract's routes and the documented extensions"
    );
    // Every documented route is served: none answers "no route".
    for (method, path) in &documented {
        let concrete = path
            .replace("{name}", "x")
            .replace("{messageId}", "x")
            .replace("{id}", "x");
        let method = Method::from_bytes(method.as_bytes()).unwrap();
        let (status, body) = read(
            app.request(method.clone(), &concrete)
                .json(&json!({}))
                .send()
                .await
                .unwrap(),
        )
        .await;
        let unrouted = status == 404 && body["code"] == "MQ_NOT_FOUND";
        assert!(!unrouted, "{method} {path} is documented but not served");
    }
    let operation = &paths["/api/v1/mq/queues/{name}"]["delete"];
    assert_eq!(operation["security"], json!([{"bearerAuth": []}]));
    assert!(operation["responses"]["204"].is_object());
    assert_eq!(
        paths["/internal/mq/metrics"]["get"]["security"],
        json!([{"serviceToken": []}])
    );
}

/// The `message_published` events of the default tenant's audit-logs queue, read through a
/// subscription from its start.
async fn published_events(
    app: &TestApp,
    subscription: &str,
    count: usize,
    within: Duration,
) -> Vec<Value> {
    let mut events = Vec::new();
    let deadline = tokio::time::Instant::now() + within;
    while events.len() < count && tokio::time::Instant::now() < deadline {
        for message in app.pull(subscription, 100, 200).await {
            if message["payload"]["action"] == "message_published" {
                events.push(message["payload"].clone());
            }
        }
    }
    events
}

#[tokio::test]
async fn every_publish_is_audited_once_off_the_hot_path() {
    let receiver = common::receiver::Receiver::start(common::receiver::Reply::Status(200)).await;
    let app = TestApp::spawn_with(|env| {
        env.insert("AUDIT_SERVICE_URL".into(), receiver.url("/audit/events"));
    })
    .await;
    app.create_queue(json!({"name": "orders", "partitionCount": 2}))
        .await;
    let audit = app.subscribe_pull("audit-logs", "auditor").await;
    // One batch of the recorder is written twice (its ack fails once): events stay single.
    app.state.faults.fail_recorder_acks(1);
    let (_, first) = app
        .publish(json!({"queue": "orders", "payload": {"a": 1}, "messageId": "o-1"}))
        .await;
    app.publish(json!({"queue": "orders", "payload": "xy"}))
        .await;
    app.call(
        Method::POST,
        "/api/v1/mq/publish/delayed",
        Some(json!({"queue": "orders", "payload": 1, "delayMs": 200, "messageId": "later"})),
    )
    .await;

    let events = published_events(&app, &audit, 3, WAIT).await;
    assert_eq!(events.len(), 3, "{events:?}");
    assert!(
        published_events(&app, &audit, 1, Duration::from_millis(1500))
            .await
            .is_empty(),
        "no event twice, none for the release of the delayed message, none for audit-logs itself"
    );
    let event = events.iter().find(|e| e["messageId"] == "o-1").unwrap();
    assert_eq!(event["queue"], "orders");
    assert_eq!(event["partition"], first["partition"]);
    assert_eq!(event["offset"], first["offset"]);
    assert_eq!(event["size"], 7);
    assert_eq!(event["tenantId"], app.tenant.to_string());
    assert_eq!(event["producerId"], "tester");
    let delayed = events.iter().find(|e| e["messageId"] == "later").unwrap();
    assert_eq!(delayed["offset"], Value::Null);

    // The audit service got them too, in batches.
    assert!(
        eventually(WAIT, || async {
            receiver
                .delivered()
                .iter()
                .flat_map(|r| r.json["events"].as_array().cloned().unwrap_or_default())
                .filter(|e| e["action"] == "message_published")
                .count()
                >= 3
        })
        .await
    );
    let posted = receiver.delivered();
    assert!(posted.iter().all(|r| r.json["events"].is_array()));
}

#[tokio::test]
async fn publish_auditing_can_be_turned_off() {
    let app = TestApp::spawn_with(|env| {
        env.insert("AUDIT_PUBLISHES".into(), "false".into());
    })
    .await;
    app.create_queue(json!({"name": "orders"})).await;
    let audit = app.subscribe_pull("audit-logs", "auditor").await;
    app.publish(json!({"queue": "orders", "payload": 1, "messageId": "quiet"}))
        .await;
    // Once the record is written, the recorder has passed the point where it would audit.
    assert!(
        eventually(WAIT, || async {
            let mut db = app.database.connect().await;
            sqlx::query_scalar::<_, i64>(
                "SELECT count(*) FROM message_records WHERE message_id = 'quiet'",
            )
            .fetch_one(&mut db)
            .await
            .unwrap()
                == 1
        })
        .await
    );
    assert!(
        published_events(&app, &audit, 1, Duration::from_millis(1000))
            .await
            .is_empty()
    );
}

#[tokio::test]
async fn a_sweep_claims_what_a_dead_recorder_left_and_a_deleted_queue_reads_as_gone() {
    let app = TestApp::spawn().await;
    // This instance's recorder stays out of it: the test plays both recorders.
    app.stop_workers().await;
    let queue = app
        .create_queue(json!({"name": "q", "partitionCount": 2}))
        .await;
    for n in 0..3 {
        let (status, _) = app
            .publish(json!({"queue": "q", "payload": n, "key": "same-key"}))
            .await;
        assert_eq!(status, 201);
    }
    let layout = mq::broker::keys::KeyLayout::new(&app.redis.prefix);
    let streams: Vec<String> = (0..2)
        .map(|p| layout.partition(common::queue_id(&queue), p).stream)
        .collect();
    // A recorder of an instance that died read everything and acked nothing.
    let mut redis = app.redis.connection().await;
    for stream in &streams {
        // The partition the key does not route to has no stream at all.
        let _: deadpool_redis::redis::RedisResult<deadpool_redis::redis::Value> =
            deadpool_redis::redis::cmd("XREADGROUP")
                .arg("GROUP")
                .arg(mq::broker::RECORDER_GROUP)
                .arg("dead")
                .arg("COUNT")
                .arg(100)
                .arg("STREAMS")
                .arg(stream)
                .arg(">")
                .query_async(&mut redis)
                .await;
    }
    let keys: Vec<_> = (0..2)
        .map(|p| layout.partition(common::queue_id(&queue), p))
        .collect();
    let read = |claim_idle_ms: Option<u64>| {
        let keys = &keys;
        let broker = &app.state.broker;
        async move {
            let visits: Vec<RecorderVisit> = keys
                .iter()
                .map(|keys| RecorderVisit {
                    keys,
                    claim_idle_ms,
                })
                .collect();
            broker
                .read_for_recorder("alive", &visits, 100, 1 << 20)
                .await
                .expect("a read of partitions with and without a stream")
        }
    };
    let fresh = read(None).await;
    assert!(
        fresh
            .iter()
            .all(|read| read.entries.is_empty() && !read.gone),
        "entries another recorder holds are not read as new"
    );
    let claimed: Vec<_> = read(Some(0))
        .await
        .into_iter()
        .flat_map(|read| read.entries)
        .collect();
    assert_eq!(claimed.len(), 3, "every entry the dead recorder left");
    assert!(claimed.iter().all(|entry| streams.contains(&entry.stream)));
    // Claimed by the living recorder now; a second sweep of fresh claims finds nothing idle.
    let again: usize = read(Some(60_000))
        .await
        .iter()
        .map(|read| read.entries.len())
        .sum();
    assert_eq!(again, 0, "{again} claimed again");
    // A deleted queue's partitions answer that nothing more will come.
    let (status, _) = app.call(Method::DELETE, "/api/v1/mq/queues/q", None).await;
    assert_eq!(status, 204);
    assert!(read(Some(0)).await.iter().all(|read| read.gone));
}

#[tokio::test]
async fn a_recorder_read_stops_at_its_byte_budget_and_the_next_reads_take_the_rest() {
    let app = TestApp::spawn().await;
    // This instance's recorder stays out of it: the test reads as the recorder.
    app.stop_workers().await;
    let queue = app.create_queue(json!({"name": "big"})).await;
    let large = "x".repeat(100_000);
    for n in 0..6 {
        let (status, _) = app
            .publish(json!({"queue": "big", "payload": {"n": n, "data": large}}))
            .await;
        assert_eq!(status, 201);
    }
    let keys =
        mq::broker::keys::KeyLayout::new(&app.redis.prefix).partition(common::queue_id(&queue), 0);
    let budget = 250_000;
    let mut reads = Vec::new();
    loop {
        let visit = RecorderVisit {
            keys: &keys,
            claim_idle_ms: None,
        };
        let read = app
            .state
            .broker
            .read_for_recorder("budgeted", &[visit], 100, budget)
            .await
            .expect("a read of a partition of large messages")
            .remove(0);
        let more = read.more;
        reads.push(read.entries.len());
        if !more || reads.len() > 10 {
            break;
        }
    }
    // One entry to learn the size, then what the rest of the budget holds: never all six.
    assert!(
        reads.iter().all(|&count| count <= 3),
        "entries per read: {reads:?}"
    );
    assert_eq!(
        reads.iter().sum::<usize>(),
        6,
        "every entry read once: {reads:?}"
    );
}

#[tokio::test]
async fn a_partition_the_recorder_cannot_read_does_not_hold_up_other_tenants_records() {
    let app = TestApp::spawn().await;
    // A hostile entry among the recorder's work: another tenant's partition whose journal
    // is not a stream (Redis state no request can make, but a shared worker must survive).
    let hostile = Uuid::new_v4();
    let (status, created) = app
        .call_as(
            hostile,
            "h",
            Method::POST,
            "/api/v1/mq/queues",
            Some(json!({"name": "broken", "partitionCount": 1})),
        )
        .await;
    assert_eq!(status, 201, "{created}");
    let layout = mq::broker::keys::KeyLayout::new(&app.redis.prefix);
    let journal = layout.partition(common::queue_id(&created), 0).journal;
    let mut redis = app.redis.connection().await;
    let () = deadpool_redis::redis::cmd("SET")
        .arg(&journal)
        .arg("not a stream")
        .query_async(&mut redis)
        .await
        .expect("the journal key is overwritten");
    let (status, body) = app
        .call_as(
            hostile,
            "h",
            Method::POST,
            "/api/v1/mq/publish",
            Some(json!({"queue": "broken", "payload": 1})),
        )
        .await;
    assert_eq!(status, 201, "the stream itself is fine: {body}");

    // The good tenant's messages are recorded all the same, each turn and after.
    app.create_queue(json!({"name": "good", "partitionCount": 2}))
        .await;
    for n in 0..20 {
        let (status, body) = app
            .publish(json!({"queue": "good", "payload": n, "messageId": format!("good-{n}")}))
            .await;
        assert_eq!(status, 201, "{body}");
    }
    assert!(
        eventually(Duration::from_secs(10), || async {
            let mut db = app.database.connect().await;
            sqlx::query_scalar::<_, i64>(
                "SELECT count(*) FROM message_records WHERE message_id LIKE 'good-%'",
            )
            .fetch_one(&mut db)
            .await
            .unwrap()
                == 20
        })
        .await,
        "every good message recorded"
    );
}
