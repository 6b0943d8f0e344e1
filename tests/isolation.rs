//! One tenant cannot harm another through the shared record writer: odd inputs are stored
//! faithfully or refused with 400, an entry PostgreSQL refuses is quarantined while every
//! other entry is written, and a batch written twice adds nothing. The storage envelope is
//! out of band, and an ackId settles only its own delivery.

mod common;

use std::time::{Duration, Instant};

use common::{assert_error, eventually, queue_id, stream_entries, TestApp};
use deadpool_redis::redis;
use reqwest::Method;
use serde_json::{json, Value};
use uuid::Uuid;

const WAIT: Duration = Duration::from_secs(15);
/// How soon another tenant's path must complete, however odd the inputs before it.
const PROMPT: Duration = Duration::from_secs(2);
const ENCRYPTION_KEY: &str = "MDEyMzQ1Njc4OTAxMjM0NTY3ODkwMTIzNDU2Nzg5MDE=";

/// Sends a raw JSON text (so it can hold escapes serde would never write) to the publish route.
async fn publish_raw(app: &TestApp, tenant: Uuid, body: &str) -> (u16, Value) {
    let response = app
        .request_as(tenant, "tester", Method::POST, "/api/v1/mq/publish")
        .header("content-type", "application/json")
        .body(body.to_owned())
        .send()
        .await
        .expect("request");
    common::read(response).await
}

/// Appends an entry with `fields` to a partition's stream or journal, as someone with write
/// access to Redis (or an older release) could; returns its id.
async fn xadd(app: &TestApp, key: &str, fields: &[(&str, String)]) -> String {
    let mut command = redis::cmd("XADD");
    command.arg(key).arg("*");
    for (name, value) in fields {
        command.arg(*name).arg(value);
    }
    let mut connection = app.redis.connection().await;
    command.query_async(&mut connection).await.expect("XADD")
}

async fn quarantine_rows(app: &TestApp) -> Vec<(String, Option<String>, String)> {
    let mut db = app.database.connect().await;
    sqlx::query_as("SELECT source, message_id, error FROM record_quarantine ORDER BY id")
        .fetch_all(&mut db)
        .await
        .expect("quarantine")
}

async fn recorded(app: &TestApp, queue: &str, message_id: &str) -> bool {
    app.lookup(queue, message_id).await.0 == 200
}

fn nested(depth: usize) -> String {
    format!("{}1{}", "[".repeat(depth), "]".repeat(depth))
}

#[tokio::test]
async fn one_tenants_odd_inputs_never_stop_another_tenant() {
    let app = TestApp::spawn().await;
    let tenant_a = app.tenant;
    let tenant_b = Uuid::new_v4();
    app.create_queue(json!({"name": "odd"})).await;
    let (status, _) = app
        .call_as(
            tenant_b,
            "b",
            Method::POST,
            "/api/v1/mq/queues",
            Some(json!({"name": "orders"})),
        )
        .await;
    assert_eq!(status, 201);
    let (status, subscription) = app
        .call_as(
            tenant_b,
            "b",
            Method::POST,
            "/api/v1/mq/subscriptions",
            Some(
                json!({"queue": "orders", "consumerGroup": "g", "consumerName": "c",
                        "subscriptionType": "redis_consumer"}),
            ),
        )
        .await;
    assert_eq!(status, 201, "{subscription}");
    let b_subscription = subscription["id"].as_str().unwrap().to_owned();
    // B's stream and journal exist and are known to the recorder before A starts: one full
    // publish, record, delivery and ack.
    let (status, _) = app
        .call_as(
            tenant_b,
            "b",
            Method::POST,
            "/api/v1/mq/publish",
            Some(json!({"queue": "orders", "payload": "warm-up", "messageId": "warm-up"})),
        )
        .await;
    assert_eq!(status, 201);
    let lookup_b = |id: &'static str| {
        let path = format!("/api/v1/mq/messages/{id}?queue=orders");
        let app = &app;
        async move { app.call_as(tenant_b, "b", Method::GET, &path, None).await }
    };
    let pull_and_ack_b = |id: &'static str| {
        let app = &app;
        let subscription = b_subscription.clone();
        async move {
            let (status, pulled) = app
                .call_as(
                    tenant_b,
                    "b",
                    Method::POST,
                    &format!("/api/v1/mq/subscriptions/{subscription}/pull"),
                    Some(json!({"maxMessages": 10, "waitMs": 1000})),
                )
                .await;
            assert_eq!(status, 200);
            let message = pulled["messages"]
                .as_array()
                .unwrap()
                .iter()
                .find(|m| m["messageId"] == id)
                .cloned()
                .unwrap_or_else(|| panic!("B's message {id} is delivered: {pulled}"));
            let (status, _) = app
                .call_as(
                    tenant_b,
                    "b",
                    Method::POST,
                    &format!("/api/v1/mq/subscriptions/{subscription}/ack"),
                    Some(json!({"ackIds": [message["ackId"]]})),
                )
                .await;
            assert_eq!(status, 200);
        }
    };
    let acked_b = |count: u64| {
        let app = &app;
        let path = format!("/api/v1/mq/subscriptions/{b_subscription}");
        async move {
            app.call_as(tenant_b, "b", Method::GET, &path, None).await.1["stats"]["acked"] == count
        }
    };
    pull_and_ack_b("warm-up").await;
    assert!(eventually(WAIT, || acked_b(1)).await);
    assert!(eventually(WAIT, || async { lookup_b("warm-up").await.0 == 200 }).await);
    // A's queue too, so what is measured below is the effect of A's odd inputs alone.
    app.publish(json!({"queue": "odd", "payload": "warm-up", "messageId": "warm-up"}))
        .await;
    assert!(eventually(WAIT, || recorded(&app, "odd", "warm-up")).await);

    let huge_headers: serde_json::Map<String, Value> = (0..64)
        .map(|i| (format!("h{i}"), json!("v".repeat(8192))))
        .collect();
    let too_many_headers: serde_json::Map<String, Value> =
        (0..65).map(|i| (format!("h{i}"), json!("v"))).collect();
    // (request body, expected status, the field a 400 names)
    let corpus: Vec<(String, u16, Option<&str>)> = vec![
        (r#"{"queue":"odd","payload":"\u0000"}"#.into(), 201, None),
        (
            r#"{"queue":"odd","payload":{"k\u0000":"v\u0000\u0001\u001f\u007f"},"messageId":"nul-payload"}"#
                .into(),
            201,
            None,
        ),
        (
            r#"{"queue":"odd","payload":1,"headers":{"h":"a\u0000"}}"#.into(),
            400,
            Some("headers.h"),
        ),
        (
            r#"{"queue":"odd","payload":1,"headers":{"\u0000":"a"}}"#.into(),
            400,
            Some("headers.\\0"),
        ),
        (r#"{"queue":"odd","payload":1,"key":"k\u0000"}"#.into(), 400, Some("key")),
        (
            r#"{"queue":"odd","payload":1,"messageId":"m\u0000"}"#.into(),
            400,
            Some("messageId"),
        ),
        (
            r#"{"queue":"odd","payload":1,"correlationId":"\u0001"}"#.into(),
            400,
            Some("correlationId"),
        ),
        (
            r#"{"queue":"odd","payload":1,"contentType":"text/\u0000"}"#.into(),
            400,
            Some("contentType"),
        ),
        (r#"{"queue":"odd","payload":"\ud800"}"#.into(), 400, None),
        (r#"{"queue":"odd","payload":"x\udc00y"}"#.into(), 400, None),
        (r#"{"queue":"odd","payload":1,"key":"\ud83d"}"#.into(), 400, None),
        (
            format!(r#"{{"queue":"odd","payload":{}}}"#, nested(100)),
            201,
            None,
        ),
        (
            format!(r#"{{"queue":"odd","payload":{}}}"#, nested(5000)),
            400,
            None,
        ),
        (
            format!(r#"{{"queue":"odd","payload":1,"key":"{}"}}"#, "k".repeat(1024)),
            201,
            None,
        ),
        (
            format!(r#"{{"queue":"odd","payload":1,"key":"{}"}}"#, "k".repeat(100_000)),
            400,
            Some("key"),
        ),
        (
            r#"{"queue":"odd","payload":[1.7976931348623157e308,-1.7976931348623157e308,5e-324,-0.0,9223372036854775807,-9223372036854775808,18446744073709551615,1e-400]}"#
                .into(),
            201,
            None,
        ),
        (r#"{"queue":"odd","payload":1e400}"#.into(), 400, None),
        (r#"{"queue":"odd","payload":1,"headers":{}}"#.into(), 201, None),
        (
            json!({"queue": "odd", "payload": 1, "headers": huge_headers}).to_string(),
            201,
            None,
        ),
        (
            json!({"queue": "odd", "payload": 1, "headers": too_many_headers}).to_string(),
            400,
            Some("headers"),
        ),
        (
            r#"{"queue":"odd","payload":"emoji \ud83d\ude00","messageId":"\ud83d\ude00"}"#.into(),
            201,
            None,
        ),
    ];
    for (body, expected, field) in &corpus {
        let (status, answer) = publish_raw(&app, tenant_a, body).await;
        let shown: String = body.chars().take(120).collect();
        assert_eq!(status, *expected, "{shown}: {answer}");
        if status == 400 {
            assert_error(status, &answer, 400, "MQ_VALIDATION_ERROR");
        }
        if let Some(field) = field {
            assert!(
                answer["details"]["fields"]
                    .as_array()
                    .unwrap()
                    .contains(&json!(field)),
                "{shown}: {answer}"
            );
        }
    }

    // B's whole path completes promptly: publish, record, lookup, delivery, stats.
    let started = Instant::now();
    let (status, _) = app
        .call_as(
            tenant_b,
            "b",
            Method::POST,
            "/api/v1/mq/publish",
            Some(json!({"queue": "orders", "payload": {"n": 1}, "messageId": "after"})),
        )
        .await;
    assert_eq!(status, 201);
    assert!(
        eventually(PROMPT, || async { lookup_b("after").await.0 == 200 }).await,
        "B's record is written within {PROMPT:?}"
    );
    pull_and_ack_b("after").await;
    assert!(
        eventually(PROMPT.saturating_sub(started.elapsed()), || acked_b(2)).await,
        "B's stats count the ack within {PROMPT:?} of its publish"
    );

    // A's ordinary messages are recorded as promptly, and the odd ones faithfully.
    let (status, _) = app
        .publish(json!({"queue": "odd", "payload": "plain", "messageId": "plain"}))
        .await;
    assert_eq!(status, 201);
    assert!(eventually(PROMPT, || recorded(&app, "odd", "plain")).await);
    let (status, record) = app.lookup("odd", "nul-payload").await;
    assert_eq!(status, 200, "{record}");
    assert_eq!(
        record["payload"],
        json!({"k\u{0}": "v\u{0}\u{1}\u{1f}\u{7f}"}),
        "a payload with NUL comes back exactly as published"
    );
    let (status, record) = app.lookup("odd", "\u{1F600}").await;
    assert_eq!(status, 200, "{record}");
    assert_eq!(record["payload"], "emoji \u{1F600}");
    let odd_reader = app.subscribe_pull("odd", "reader").await;
    let delivered = app.pull(&odd_reader, 100, 1000).await;
    assert!(delivered.iter().any(|m| m["payload"] == "\u{0}"));
    assert!(delivered
        .iter()
        .any(|m| m["payload"] == json!({"k\u{0}": "v\u{0}\u{1}\u{1f}\u{7f}"})));
    assert!(quarantine_rows(&app).await.is_empty());
    assert_eq!(app.state.recorder.report().status, "ok");
}

#[tokio::test]
async fn an_entry_postgres_refuses_is_quarantined_and_every_other_is_written() {
    let app = TestApp::spawn().await;
    let queue = app.create_queue(json!({"name": "q"})).await;
    let (status, _) = app
        .publish(json!({"queue": "q", "payload": "first", "messageId": "good-0"}))
        .await;
    assert_eq!(status, 201);
    let (_, template) = stream_entries(&app, &queue, 0).await.remove(0);
    let envelope = |id: &str| {
        let mut envelope = template.clone();
        envelope["messageId"] = json!(id);
        envelope.to_string()
    };
    let mut poisoned = template.clone();
    poisoned["messageId"] = json!("evil");
    poisoned["key"] = json!("k\u{0}");
    poisoned["headers"] = json!({"h": "\u{0}"});
    let subscription = app.subscribe_pull("q", "g").await;
    let keys = mq::broker::keys::KeyLayout::new(&app.redis.prefix).partition(queue_id(&queue), 0);

    // Good and hostile entries in one go, so they share the recorder's batches.
    let mut pipeline = redis::pipe();
    for id in ["good-1", "good-2"] {
        pipeline
            .cmd("XADD")
            .arg(&keys.stream)
            .arg("*")
            .arg("e")
            .arg(envelope(id));
    }
    pipeline
        .cmd("XADD")
        .arg(&keys.stream)
        .arg("*")
        .arg("e")
        .arg(poisoned.to_string());
    pipeline
        .cmd("XADD")
        .arg(&keys.stream)
        .arg("*")
        .arg("e")
        .arg("{not an envelope");
    pipeline.cmd("XADD").arg(&keys.journal).arg("*").arg(&[
        ("k", "delivery".to_owned()),
        ("o", "failed".to_owned()),
        ("id", "good-1".to_owned()),
        ("sub", subscription.clone()),
        ("n", "1".to_owned()),
        ("err", "broken\u{0}error".to_owned()),
        ("t", chrono::Utc::now().timestamp_millis().to_string()),
    ]);
    for id in ["good-3", "good-4"] {
        pipeline
            .cmd("XADD")
            .arg(&keys.stream)
            .arg("*")
            .arg("e")
            .arg(envelope(id));
    }
    let mut connection = app.redis.connection().await;
    let _: Vec<String> = pipeline.query_async(&mut connection).await.unwrap();
    let (status, _) = app
        .publish(json!({"queue": "q", "payload": "last", "messageId": "good-5"}))
        .await;
    assert_eq!(status, 201);

    for id in ["good-0", "good-1", "good-2", "good-3", "good-4", "good-5"] {
        assert!(
            eventually(WAIT, || recorded(&app, "q", id)).await,
            "{id} is recorded despite the hostile entries"
        );
    }
    assert!(eventually(WAIT, || async { quarantine_rows(&app).await.len() == 3 }).await);
    let rows = quarantine_rows(&app).await;
    let sources: Vec<&str> = rows.iter().map(|(source, _, _)| source.as_str()).collect();
    assert_eq!(
        sources.iter().filter(|s| **s == "stream").count(),
        2,
        "{rows:?}"
    );
    assert!(sources.contains(&"journal"), "{rows:?}");
    assert!(
        rows.iter().any(|(_, id, _)| id.as_deref() == Some("evil")),
        "{rows:?}"
    );
    assert!(rows.iter().any(|(_, _, error)| error.contains("envelope")));
    assert_eq!(app.lookup("q", "evil").await.0, 404);
    let report = app.state.recorder.report();
    assert_eq!((report.status, report.quarantined), ("ok", 3));

    let (_, metrics) = app.get_text("/metrics").await;
    assert!(
        metrics.contains(r#"mq_records_quarantined_total{source="stream"} 2"#),
        "{metrics}"
    );
    assert!(metrics.contains(r#"mq_records_quarantined_total{source="journal"} 1"#));
    // The writer goes on: a later message is recorded as usual.
    app.publish(json!({"queue": "q", "payload": 1, "messageId": "later"}))
        .await;
    assert!(eventually(WAIT, || recorded(&app, "q", "later")).await);
}

async fn consumption_rows(app: &TestApp) -> Vec<(String, String, i32)> {
    let mut db = app.database.connect().await;
    sqlx::query_as(
        "SELECT message_id, status, attempt FROM consumption_records ORDER BY message_id",
    )
    .fetch_all(&mut db)
    .await
    .unwrap()
}

#[tokio::test]
async fn a_batch_written_again_after_a_failed_ack_adds_nothing() {
    let app = TestApp::spawn().await;
    app.create_queue(json!({"name": "q"})).await;
    let subscription = app.subscribe_pull("q", "g").await;
    for n in 0..5 {
        app.publish(json!({"queue": "q", "payload": n, "messageId": format!("m-{n}")}))
            .await;
    }
    for n in 0..5 {
        let id = format!("m-{n}");
        assert!(eventually(WAIT, || recorded(&app, "q", &id)).await);
    }
    // Every batch from now on is written, then fails before its ack, twice over.
    app.state.faults.fail_recorder_acks(2);
    let pulled = app.pull(&subscription, 10, 1000).await;
    assert_eq!(pulled.len(), 5);
    let ack_ids: Vec<&str> = pulled
        .iter()
        .map(|m| m["ackId"].as_str().unwrap())
        .collect();
    assert_eq!(app.ack(&subscription, &ack_ids).await, 5);

    assert!(
        eventually(WAIT, || async {
            common::subscription_stats(&app, &subscription).await["acked"] == 5
                && app.state.recorder.report().status == "ok"
        })
        .await
    );
    let report = app.state.recorder.report();
    assert!(
        report
            .last_error
            .as_deref()
            .is_some_and(|e| e.contains("injected")),
        "the injected failures happened: {:?}",
        report.last_error
    );
    let rows = consumption_rows(&app).await;
    assert_eq!(rows.len(), 5, "one row per attempt: {rows:?}");
    assert!(rows
        .iter()
        .all(|(_, status, attempt)| status == "acked" && *attempt == 1));
    let stats = common::subscription_stats(&app, &subscription).await;
    assert_eq!(
        (stats["acked"].clone(), stats["delivered"].clone()),
        (json!(5), json!(5))
    );
    let (_, record) = app.lookup("q", "m-3").await;
    assert_eq!(record["status"], "consumed");
    assert_eq!(record["deliveries"].as_array().unwrap().len(), 1);
}

#[tokio::test]
async fn a_payload_shaped_like_the_storage_envelope_round_trips() {
    let app = TestApp::spawn().await;
    app.create_queue(json!({"name": "plain"})).await;
    let subscription = app.subscribe_pull("plain", "g").await;
    // A zstd bomb: 64 MiB of zeros in a few kilobytes, claiming to be 5 bytes.
    let bomb = zstd::bulk::compress(&vec![0u8; 64 * 1024 * 1024], 19).unwrap();
    let lookalike = json!({"$sealed": {
        "codec": "zstd", "data": base64_encode(&bomb), "originalBytes": 5
    }});
    let (status, _) = app
        .publish(json!({"queue": "plain", "payload": lookalike, "messageId": "lookalike"}))
        .await;
    assert_eq!(status, 201);
    let garbage = json!({"$sealed": "not even an object"});
    app.publish(json!({"queue": "plain", "payload": garbage, "messageId": "garbage"}))
        .await;

    for (id, payload) in [("lookalike", &lookalike), ("garbage", &garbage)] {
        assert!(eventually(WAIT, || recorded(&app, "plain", id)).await);
        let (status, record) = app.lookup("plain", id).await;
        assert_eq!(status, 200, "{record}");
        assert_eq!(&record["payload"], payload, "stored and shown as published");
        assert!(record.get("payloadError").is_none());
    }
    let delivered = app.pull(&subscription, 10, 1000).await;
    assert_eq!(delivered.len(), 2);
    assert_eq!(delivered[0]["payload"], lookalike);
    assert_eq!(delivered[1]["payload"], garbage);
}

#[tokio::test]
async fn an_encrypted_queue_never_delivers_plaintext_written_into_redis() {
    let app = TestApp::spawn_with(|env| {
        env.insert("MQ_ENCRYPTION_KEY".into(), ENCRYPTION_KEY.into());
    })
    .await;
    let queue = app
        .create_queue(json!({"name": "vault", "encrypted": true}))
        .await;
    let subscription = app.subscribe_pull("vault", "g").await;
    app.publish(json!({"queue": "vault", "payload": "genuine", "messageId": "genuine"}))
        .await;
    let (_, genuine) = stream_entries(&app, &queue, 0).await.remove(0);
    let mut forged = genuine.clone();
    forged["messageId"] = json!("forged");
    forged["payload"] = json!("pay the attacker");
    forged.as_object_mut().unwrap().remove("sealed");
    let mut unkeyed = genuine.clone();
    unkeyed["messageId"] = json!("unkeyed");
    let keys = mq::broker::keys::KeyLayout::new(&app.redis.prefix).partition(queue_id(&queue), 0);
    xadd(&app, &keys.stream, &[("e", forged.to_string())]).await;
    let sealed = unkeyed["sealed"].as_object_mut().unwrap();
    sealed.remove("keyId");
    sealed.remove("nonce");
    xadd(&app, &keys.stream, &[("e", unkeyed.to_string())]).await;

    let delivered = app.pull(&subscription, 10, 1000).await;
    let ids: Vec<&Value> = delivered.iter().map(|m| &m["messageId"]).collect();
    assert_eq!(
        ids,
        [&json!("genuine")],
        "only what the queue sealed is delivered"
    );
    assert!(app.pull(&subscription, 10, 500).await.is_empty());

    let replay = app.subscribe_pull("vault.dlq", "r").await;
    let dead = common::pull_until(&app, &replay, 2, WAIT).await;
    assert_eq!(dead.len(), 2, "both forged entries are dead-lettered");
    for message in &dead {
        assert_eq!(
            message["headers"]["x-dead-letter-reason"],
            "decryption-failed"
        );
        assert!(message["headers"]["x-last-error"]
            .as_str()
            .unwrap()
            .contains("not sealed"));
    }
    assert!(eventually(WAIT, || recorded(&app, "vault", "forged")).await);
    let (_, record) = app.lookup("vault", "forged").await;
    assert_eq!(record["payload"], Value::Null, "{record}");
    assert!(record["payloadError"]
        .as_str()
        .unwrap()
        .contains("not sealed"));
}

#[tokio::test]
async fn an_earlier_attempts_ack_id_settles_nothing() {
    let app = TestApp::spawn().await;
    app.create_queue(json!({"name": "q"})).await;
    let subscription = app
        .subscribe(
            json!({"queue": "q", "consumerGroup": "g", "consumerName": "c",
                          "subscriptionType": "redis_consumer", "sessionTimeoutMs": 1000,
                          "retryDelayMs": 1}),
        )
        .await["id"]
        .as_str()
        .unwrap()
        .to_owned();
    app.publish(json!({"queue": "q", "payload": 1})).await;
    let first = app.pull(&subscription, 1, 1000).await.remove(0);
    assert_eq!(first["deliveryAttempt"], 1);
    // The ack deadline passes; the message is delivered again.
    let second = common::pull_until(&app, &subscription, 1, WAIT)
        .await
        .pop()
        .expect("redelivered");
    assert_eq!(second["deliveryAttempt"], 2);
    assert_eq!(
        app.ack(&subscription, &[first["ackId"].as_str().unwrap()])
            .await,
        0,
        "the first attempt's ackId does not settle the redelivery"
    );
    assert_eq!(
        app.ack(&subscription, &[second["ackId"].as_str().unwrap()])
            .await,
        1,
        "the redelivery's own ackId still does"
    );
}

fn base64_encode(bytes: &[u8]) -> String {
    use base64::Engine;
    base64::engine::general_purpose::STANDARD.encode(bytes)
}

#[tokio::test]
async fn nul_in_any_field_of_any_route_is_a_client_error() {
    let app = TestApp::spawn().await;
    app.create_queue(json!({"name": "q"})).await;
    let nul = "a\u{0}b";
    let requests: Vec<(Method, String, Option<Value>)> = vec![
        (
            Method::POST,
            "/api/v1/mq/publish".into(),
            Some(json!({"queue": nul, "payload": 1})),
        ),
        (
            Method::POST,
            "/api/v1/mq/queues".into(),
            Some(json!({"name": nul})),
        ),
        (
            Method::POST,
            "/api/v1/mq/queues".into(),
            Some(json!({"name": "d", "description": nul})),
        ),
        (
            Method::POST,
            "/api/v1/mq/queues".into(),
            Some(json!({"name": "n", "displayName": nul})),
        ),
        (
            Method::POST,
            "/api/v1/mq/queues".into(),
            Some(json!({"name": "s", "schemaDefinition": {"const": nul}})),
        ),
        (
            Method::POST,
            "/api/v1/mq/queues".into(),
            Some(json!({"name": "p", "allowedProducers": [nul]})),
        ),
        (
            Method::PUT,
            "/api/v1/mq/queues/q".into(),
            Some(json!({"description": nul})),
        ),
        (
            Method::GET,
            format!("/api/v1/mq/queues/{}", common::urlencode(nul)),
            None,
        ),
        (
            Method::GET,
            format!("/api/v1/mq/queues?search={}", common::urlencode(nul)),
            None,
        ),
        (
            Method::GET,
            format!("/api/v1/mq/subscriptions?queue={}", common::urlencode(nul)),
            None,
        ),
        (
            Method::GET,
            format!(
                "/api/v1/mq/subscriptions?consumerGroup={}",
                common::urlencode(nul)
            ),
            None,
        ),
        (
            Method::GET,
            format!("/api/v1/mq/messages/{}?queue=q", common::urlencode(nul)),
            None,
        ),
        (
            Method::DELETE,
            format!("/api/v1/mq/messages/{}?queue=q", common::urlencode(nul)),
            None,
        ),
        (
            Method::POST,
            "/api/v1/mq/subscriptions".into(),
            Some(
                json!({"queue": "q", "consumerGroup": "g", "consumerName": "c",
                        "subscriptionType": "redis_consumer", "messageFilter": {"key": nul}}),
            ),
        ),
        (
            Method::POST,
            "/api/v1/mq/subscriptions".into(),
            Some(
                json!({"queue": "q", "consumerGroup": "g", "consumerName": "c",
                        "subscriptionType": "webhook",
                        "handlerConfig": {"url": format!("http://127.0.0.1/{nul}")}}),
            ),
        ),
        (
            Method::POST,
            "/api/v1/mq/subscriptions".into(),
            Some(
                json!({"queue": "q", "consumerGroup": "g", "consumerName": "c",
                        "subscriptionType": "webhook",
                        "handlerConfig": {"url": "http://127.0.0.1/", "secret": nul}}),
            ),
        ),
    ];
    for (method, path, body) in requests {
        let label = format!("{method} {path}");
        let (status, answer) = app.call(method, &path, body).await;
        assert!((400..500).contains(&status), "{label}: {status} {answer}");
        assert!(answer["code"].is_string(), "{label}: {answer}");
    }
    let token = common::sign(json!({"tenant_id": app.tenant, "sub": nul,
                                    "exp": chrono::Utc::now().timestamp() + 60}));
    let response = app
        .client
        .get(app.url("/api/v1/mq/queues"))
        .bearer_auth(token)
        .send()
        .await
        .unwrap();
    let (status, answer) = common::read(response).await;
    assert_error(status, &answer, 401, "MQ_UNAUTHORIZED");
}
