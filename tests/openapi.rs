//! The OpenAPI description against the running service: every route is exercised through
//! its successful answer (and common errors), and every answer validates against the schema
//! the description gives for its route, method and status (`common::contract`).

mod common;

use std::collections::BTreeSet;

use common::{contract, eventually, read, TestApp, SERVICE_TOKEN};
use reqwest::Method;
use serde_json::{json, Value};

/// The answers seen, as (method, path template, status).
#[derive(Default)]
struct Seen(BTreeSet<(String, String, u16)>);

impl Seen {
    async fn call(
        &mut self,
        app: &TestApp,
        method: Method,
        path: &str,
        body: Option<Value>,
    ) -> Value {
        let (status, answer) = app.call(method.clone(), path, body).await;
        self.note(&method, path, status);
        answer
    }

    async fn call_service(
        &mut self,
        app: &TestApp,
        method: Method,
        path: &str,
        body: Option<Value>,
    ) -> Value {
        let mut request = app
            .anonymous(method.clone(), path)
            .header("x-service-token", SERVICE_TOKEN);
        if let Some(body) = body {
            request = request.json(&body);
        }
        let (status, answer) = read(request.send().await.unwrap()).await;
        contract::check(method.as_str(), path, status, &answer);
        self.note(&method, path, status);
        answer
    }

    fn note(&mut self, method: &Method, path: &str, status: u16) {
        let template = contract::template_of(path).unwrap_or_else(|| panic!("{path} is no route"));
        self.0
            .insert((method.as_str().to_owned(), template, status));
    }
}

#[tokio::test]
async fn every_route_answers_what_its_schema_describes() {
    let app = TestApp::spawn().await;
    let mut seen = Seen::default();
    let queues = "/api/v1/mq/queues";
    seen.call(
        &app,
        Method::POST,
        queues,
        Some(json!({"name": "orders", "description": "described"})),
    )
    .await;
    seen.call(
        &app,
        Method::GET,
        &format!("{queues}?limit=10&offset=0"),
        None,
    )
    .await;
    let queue = seen
        .call(&app, Method::GET, &format!("{queues}/orders"), None)
        .await;
    // A complete answer (a flattened allOf) with one field too many is refused.
    let mut padded = queue.clone();
    padded["surprise"] = json!(1);
    let refused = std::panic::catch_unwind(|| {
        contract::check("GET", "/api/v1/mq/queues/orders", 200, &padded)
    });
    assert!(refused.is_err(), "an undescribed field passed the check");
    seen.call(
        &app,
        Method::PUT,
        &format!("{queues}/orders"),
        Some(json!({"displayName": "Orders"})),
    )
    .await;

    let subscription = seen
        .call(
            &app,
            Method::POST,
            "/api/v1/mq/subscriptions",
            Some(json!({
                "queue": "orders", "consumerGroup": "g", "consumerName": "c",
                "subscriptionType": "redis_consumer", "offsetResetPolicy": "earliest"
            })),
        )
        .await;
    let id = subscription["id"].as_str().unwrap().to_owned();
    let subscriptions = "/api/v1/mq/subscriptions";
    seen.call(
        &app,
        Method::GET,
        &format!("{subscriptions}?queue=orders"),
        None,
    )
    .await;
    seen.call(&app, Method::GET, &format!("{subscriptions}/{id}"), None)
        .await;
    seen.call(
        &app,
        Method::PUT,
        &format!("{subscriptions}/{id}"),
        Some(json!({"maxPollRecords": 50})),
    )
    .await;

    let message =
        json!({"queue": "orders", "payload": {"n": 1}, "messageId": "m-1", "headers": {"h": "v"}});
    let published = seen
        .call(
            &app,
            Method::POST,
            "/api/v1/mq/publish",
            Some(message.clone()),
        )
        .await;
    let duplicate = seen
        .call(&app, Method::POST, "/api/v1/mq/publish", Some(message))
        .await;
    assert_eq!(duplicate["messageId"], published["messageId"]);
    seen.call(
        &app,
        Method::POST,
        "/api/v1/mq/publish/batch",
        Some(json!({
            "queue": "orders", "messages": [{"payload": 2}, {"payload": "three", "key": "k"}]
        })),
    )
    .await;
    // Each publish route twice with the same messageId: 201, then 200 for the duplicate.
    let in_an_hour = (chrono::Utc::now() + chrono::Duration::hours(1)).to_rfc3339();
    let mut scheduled = Value::Null;
    for (route, body) in [
        (
            "/api/v1/mq/publish/delayed",
            json!({"queue": "orders", "payload": 4, "delayMs": 60000, "messageId": "d-1"}),
        ),
        (
            "/api/v1/mq/publish/scheduled",
            json!({"queue": "orders", "payload": 5, "scheduledAt": in_an_hour, "messageId": "s-1"}),
        ),
        (
            "/api/v1/mq/topics/orders/publish",
            json!({"payload": [6], "messageId": "t-1"}),
        ),
    ] {
        let first = seen
            .call(&app, Method::POST, route, Some(body.clone()))
            .await;
        seen.call(&app, Method::POST, route, Some(body)).await;
        if route.ends_with("scheduled") {
            scheduled = first;
        }
    }
    let pulled = seen
        .call(
            &app,
            Method::POST,
            &format!("{subscriptions}/{id}/pull"),
            Some(json!({"maxMessages": 10, "waitMs": 1000})),
        )
        .await;
    let ack_ids: Vec<Value> = pulled["messages"]
        .as_array()
        .unwrap()
        .iter()
        .map(|m| m["ackId"].clone())
        .collect();
    assert!(ack_ids.len() >= 2, "pulled: {pulled}");
    seen.call(
        &app,
        Method::POST,
        &format!("{subscriptions}/{id}/ack"),
        Some(json!({"ackIds": [ack_ids[0]]})),
    )
    .await;
    seen.call(
        &app,
        Method::POST,
        &format!("{subscriptions}/{id}/nack"),
        Some(json!({"ackIds": [ack_ids[1]], "delayMs": 0})),
    )
    .await;

    let lookup = "/api/v1/mq/messages/m-1?queue=orders";
    let recorded = eventually(std::time::Duration::from_secs(10), || async {
        app.call(Method::GET, lookup, None).await.0 == 200
    })
    .await;
    assert!(recorded, "m-1 was never recorded");
    let view = seen.call(&app, Method::GET, lookup, None).await;
    assert_eq!(view["messageId"], "m-1");
    let scheduled_id = scheduled["messageId"].as_str().unwrap();
    seen.call(
        &app,
        Method::DELETE,
        &format!("/api/v1/mq/messages/{scheduled_id}?queue=orders"),
        None,
    )
    .await;

    seen.call(
        &app,
        Method::POST,
        &format!("{subscriptions}/{id}/pause"),
        None,
    )
    .await;
    seen.call(
        &app,
        Method::POST,
        &format!("{subscriptions}/{id}/resume"),
        None,
    )
    .await;
    seen.call(&app, Method::GET, "/api/v1/mq/metrics", None)
        .await;
    seen.call(&app, Method::GET, "/api/v1/mq/metrics/topics", None)
        .await;
    seen.call(&app, Method::GET, "/api/v1/mq/metrics/consumers", None)
        .await;

    seen.call(
        &app,
        Method::GET,
        &format!("{queues}/orders/messages?limit=5"),
        None,
    )
    .await;
    seen.call(
        &app,
        Method::POST,
        &format!("{queues}/orders/redrive"),
        Some(json!({"messageIds": ["m-1"]})),
    )
    .await;

    let second = app.subscribe_pull("orders", "second").await;
    seen.call(
        &app,
        Method::GET,
        &format!("{queues}/orders/subscribers"),
        None,
    )
    .await;
    seen.call(
        &app,
        Method::DELETE,
        &format!("{queues}/orders/subscribers/{second}"),
        None,
    )
    .await;
    seen.call(&app, Method::POST, &format!("{queues}/orders/purge"), None)
        .await;
    seen.call(&app, Method::DELETE, &format!("{subscriptions}/{id}"), None)
        .await;
    seen.call(&app, Method::DELETE, &format!("{queues}/orders"), None)
        .await;

    // Errors answer the error schema.
    seen.call(&app, Method::GET, &format!("{queues}/missing"), None)
        .await;
    seen.call(
        &app,
        Method::POST,
        "/api/v1/mq/publish",
        Some(json!({"queue": "orders"})),
    )
    .await;

    for path in [
        "/api/v1/mq/health",
        "/api/v1/mq/status",
        "/api/v1/mq/openapi.json",
    ] {
        let (status, _) = app.get_anonymous(path).await;
        seen.note(&Method::GET, path, status);
    }
    let (status, text) = app.get_text("/metrics").await;
    assert!(text.contains("# TYPE"), "not Prometheus text: {text}");
    seen.note(&Method::GET, "/metrics", status);

    let tenant = app.tenant.to_string();
    for (path, field) in [
        ("/internal/mq/user-events", "eventType"),
        ("/internal/mq/user-notifications", "eventType"),
        ("/internal/mq/audit-logs", "action"),
        ("/internal/mq/notifications", "channel"),
    ] {
        seen.call_service(
            &app,
            Method::POST,
            path,
            Some(json!({"tenantId": tenant, field: "e", "data": {}})),
        )
        .await;
    }
    for path in [
        "/internal/mq/audit-queue-status",
        "/internal/mq/notification-queue",
    ] {
        seen.call_service(
            &app,
            Method::GET,
            &format!("{path}?tenantId={tenant}"),
            None,
        )
        .await;
    }
    seen.call_service(&app, Method::GET, "/internal/mq/metrics", None)
        .await;
    seen.call_service(&app, Method::GET, "/internal/mq/health-detailed", None)
        .await;

    // Every route's success was exercised, and every answer had a schema'd status.
    let description = mq::api::openapi_description();
    let mut missing = Vec::new();
    for (template, item) in description["paths"].as_object().unwrap() {
        for (method, operation) in item.as_object().unwrap() {
            let method = method.to_ascii_uppercase();
            let success: Vec<u16> = operation["responses"]
                .as_object()
                .unwrap()
                .keys()
                .filter_map(|status| status.parse().ok())
                .filter(|status: &u16| *status < 300)
                .collect();
            for status in success {
                if !seen.0.contains(&(method.clone(), template.clone(), status)) {
                    missing.push(format!("{method} {template} {status}"));
                }
            }
        }
    }
    assert!(missing.is_empty(), "never answered: {missing:?}");
}

#[tokio::test]
async fn bodies_are_described_field_by_field() {
    let description = mq::api::openapi_description();
    let schemas = &description["components"]["schemas"];
    let paths = &description["paths"];
    // A create's request names its fields, with their types.
    let create =
        &paths["/api/v1/mq/queues"]["post"]["requestBody"]["content"]["application/json"]["schema"];
    assert_eq!(
        create["properties"]["partitionCount"]["type"],
        json!(["integer", "null"]),
        "{create}"
    );
    // The answer refers to the Queue component, whose fields are typed and required.
    let queue = &schemas["Queue"];
    assert_eq!(
        queue["properties"]["isPublic"]["type"], "boolean",
        "{queue}"
    );
    assert_eq!(queue["properties"]["id"]["format"], "uuid");
    assert!(queue["required"]
        .as_array()
        .unwrap()
        .contains(&json!("name")));
    assert_eq!(
        schemas["QueueStatus"]["enum"],
        json!(["active", "paused", "archived"])
    );
    // Errors are described, with an example.
    let missing = &paths["/api/v1/mq/queues/{name}"]["get"]["responses"]["default"];
    assert_eq!(
        missing["content"]["application/json"]["schema"]["$ref"],
        "#/components/schemas/Error"
    );
    assert!(schemas["Error"]["example"]["code"].is_string());
    // No body is the generic object any more, but the description itself.
    for (template, item) in paths.as_object().unwrap() {
        for (method, operation) in item.as_object().unwrap() {
            for response in operation["responses"].as_object().unwrap().values() {
                let schema = &response["content"]["application/json"]["schema"];
                let generic = schema == &json!({"type": "object"});
                assert!(
                    !generic || template.ends_with("openapi.json"),
                    "{method} {template}: {schema}"
                );
            }
        }
    }
}

#[test]
fn the_check_refuses_an_answer_that_breaks_its_schema() {
    let good =
        json!({"code": "MQ_QUEUE_NOT_FOUND", "message": "queue 'x' not found", "details": {}});
    contract::check("GET", "/api/v1/mq/queues/x", 404, &good);
    let refused = |body: Value| {
        std::panic::catch_unwind(|| contract::check("GET", "/api/v1/mq/queues/x", 200, &body))
            .is_err()
    };
    // A queue without its stats, with a field too many, or with a wrong type.
    assert!(refused(json!({"name": "x"})));
    assert!(refused(
        json!({"code": "X", "message": "m", "details": {}, "extra": 1})
    ));
    let purged = |body: Value| {
        std::panic::catch_unwind(|| {
            contract::check("POST", "/api/v1/mq/queues/x/purge", 200, &body)
        })
        .is_err()
    };
    assert!(!purged(json!({"purged": 3})));
    assert!(purged(json!({"purged": "3"})));
    assert!(purged(json!({"purged": 3, "other": true})));
}
