//! Security: encryption at rest, key rotation, tamper detection, compression, rate limits
//! across instances, fair webhook capacity, tenant isolation, secrets kept out of answers
//! and logs.

mod common;

use std::time::Duration;

use common::receiver::{Receiver, Reply};
use common::{assert_error, eventually, read, stream_entries, TestApp};
use deadpool_redis::redis;
use reqwest::Method;
use serde_json::{json, Value};
use uuid::Uuid;

const WAIT: Duration = Duration::from_secs(15);
const KEY_ONE: &str = "MDEyMzQ1Njc4OTAxMjM0NTY3ODkwMTIzNDU2Nzg5MDE=";
const KEY_TWO: &str = "YWJjZGVmZ2hpamtsbW5vcHFyc3R1dnd4eXoxMjM0NTY=";

async fn subscribe_pull(app: &TestApp, queue: &str, group: &str) -> String {
    let (status, body) = app
        .call(
            Method::POST,
            "/api/v1/mq/subscriptions",
            Some(
                json!({"queue": queue, "consumerGroup": group, "consumerName": "c",
                        "subscriptionType": "redis_consumer", "offsetResetPolicy": "earliest"}),
            ),
        )
        .await;
    assert_eq!(status, 201, "{body}");
    body["id"].as_str().unwrap().to_owned()
}

async fn pull_one(app: &TestApp, subscription: &str) -> Option<Value> {
    for _ in 0..20 {
        let (status, body) = app
            .call(
                Method::POST,
                &format!("/api/v1/mq/subscriptions/{subscription}/pull"),
                Some(json!({"maxMessages": 1, "waitMs": 500})),
            )
            .await;
        assert_eq!(status, 200, "{body}");
        if let Some(message) = body["messages"].get(0) {
            return Some(message.clone());
        }
    }
    None
}

/// Every value stored under the test's Redis prefix, as text.
async fn redis_dump(app: &TestApp) -> String {
    let mut connection = app.redis.connection().await;
    let mut dump = String::new();
    for key in app.redis.keys().await {
        let kind: String = redis::cmd("TYPE")
            .arg(&key)
            .query_async(&mut connection)
            .await
            .unwrap();
        let value: redis::Value = match kind.as_str() {
            "stream" => redis::cmd("XRANGE")
                .arg(&key)
                .arg("-")
                .arg("+")
                .query_async(&mut connection)
                .await
                .unwrap(),
            "hash" => redis::cmd("HGETALL")
                .arg(&key)
                .query_async(&mut connection)
                .await
                .unwrap(),
            "zset" => redis::cmd("ZRANGE")
                .arg(&key)
                .arg(0)
                .arg(-1)
                .query_async(&mut connection)
                .await
                .unwrap(),
            "string" => redis::cmd("GET")
                .arg(&key)
                .query_async(&mut connection)
                .await
                .unwrap(),
            _ => redis::Value::Nil,
        };
        dump.push_str(&format!("{key} {value:?}\n"));
    }
    dump
}

#[tokio::test]
async fn encrypted_payloads_are_stored_without_plaintext_and_delivered_intact() {
    let app = TestApp::spawn_with(|env| {
        env.insert("MQ_ENCRYPTION_KEY".into(), KEY_ONE.into());
    })
    .await;
    app.create_queue(json!({"name": "vault", "encrypted": true, "compressionType": "zstd"}))
        .await;
    let sub = subscribe_pull(&app, "vault", "g").await;
    let marker = format!("marker-{}", Uuid::new_v4().simple());
    let payload = json!({"card": marker, "amount": 12});
    let (status, result) = app
        .call(
            Method::POST,
            "/api/v1/mq/publish",
            Some(json!({"queue": "vault", "payload": payload, "messageId": "m-1"})),
        )
        .await;
    assert_eq!(status, 201, "{result}");
    app.call(
        Method::POST,
        "/api/v1/mq/publish/delayed",
        Some(json!({"queue": "vault", "payload": {"later": marker}, "delayMs": 60000})),
    )
    .await;

    let delivered = pull_one(&app, &sub).await.expect("delivered");
    assert_eq!(
        delivered["payload"], payload,
        "consumers receive the plaintext"
    );
    let (_, record) = app
        .call(Method::GET, "/api/v1/mq/messages/m-1?queue=vault", None)
        .await;
    assert!(
        eventually(WAIT, || async {
            app.call(Method::GET, "/api/v1/mq/messages/m-1?queue=vault", None)
                .await
                .1["payload"]
                == payload
        })
        .await,
        "lookups open it: {record}"
    );

    assert!(
        !redis_dump(&app).await.contains(&marker),
        "no plaintext in Redis"
    );
    let mut db = app.database.connect().await;
    let records = || async {
        let mut db = app.database.connect().await;
        let stored: Vec<(String,)> = sqlx::query_as(
            "SELECT coalesce(payload::text, '') FROM message_records WHERE message_id = 'm-1'",
        )
        .fetch_all(&mut db)
        .await
        .unwrap();
        stored
    };
    assert!(
        eventually(WAIT, || async { !records().await.is_empty() }).await,
        "the record is written"
    );
    let stored: Vec<(String,)> =
        sqlx::query_as("SELECT coalesce(payload::text, '') FROM message_records")
            .fetch_all(&mut db)
            .await
            .unwrap();
    assert!(
        stored.iter().all(|(text,)| !text.contains(&marker)),
        "no plaintext in PostgreSQL"
    );
}

#[tokio::test]
async fn a_rotated_key_still_opens_older_messages() {
    let first = TestApp::spawn_with(|env| {
        env.insert("MQ_ENCRYPTION_KEYS".into(), format!("k1:{KEY_ONE}"));
    })
    .await;
    first
        .create_queue(json!({"name": "vault", "encrypted": true}))
        .await;
    let sub = subscribe_pull(&first, "vault", "g").await;
    first
        .call(
            Method::POST,
            "/api/v1/mq/publish",
            Some(json!({"queue": "vault", "payload": {"v": "under k1"}})),
        )
        .await;
    // The same data, served by an instance configured with key 2 active and key 1 retained.
    let rotated = first
        .spawn_sibling_with(|env| {
            env.insert(
                "MQ_ENCRYPTION_KEYS".into(),
                format!("k1:{KEY_ONE},k2:{KEY_TWO}"),
            );
            env.insert("MQ_ENCRYPTION_ACTIVE_KEY".into(), "k2".into());
        })
        .await;
    let message = pull_one(&rotated, &sub).await.expect("delivered");
    assert_eq!(message["payload"], json!({"v": "under k1"}));
    rotated
        .call(
            Method::POST,
            "/api/v1/mq/publish",
            Some(json!({"queue": "vault", "payload": {"v": "under k2"}})),
        )
        .await;
    let (_, queue) = rotated
        .call(Method::GET, "/api/v1/mq/queues/vault", None)
        .await;
    let entries = stream_entries(&rotated, &queue, 0).await;
    let key_ids: Vec<&Value> = entries.iter().map(|(_, e)| &e["sealed"]["keyId"]).collect();
    assert_eq!(key_ids, [&json!("k1"), &json!("k2")]);
    assert_eq!(
        pull_one(&rotated, &sub).await.unwrap()["payload"],
        json!({"v": "under k2"})
    );
}

#[tokio::test]
async fn a_tampered_ciphertext_is_dead_lettered_not_delivered() {
    let app = TestApp::spawn_with(|env| {
        env.insert("MQ_ENCRYPTION_KEY".into(), KEY_ONE.into());
    })
    .await;
    let queue = app
        .create_queue(json!({"name": "vault", "encrypted": true}))
        .await;
    app.call(
        Method::POST,
        "/api/v1/mq/publish",
        Some(json!({"queue": "vault", "payload": "genuine", "messageId": "good"})),
    )
    .await;
    // Forge a second entry from the first: same ciphertext, one bit flipped, another id.
    let (_, original) = stream_entries(&app, &queue, 0).await.remove(0);
    let mut forged = original.clone();
    forged["messageId"] = json!("forged");
    let data = forged["sealed"]["data"].as_str().unwrap().to_owned();
    let mut bytes = base64_decode(&data);
    bytes[0] ^= 0x01;
    forged["sealed"]["data"] = json!(base64_encode(&bytes));
    let keys =
        mq::broker::keys::KeyLayout::new(&app.redis.prefix).partition(common::queue_id(&queue), 0);
    let mut connection = app.redis.connection().await;
    let _: String = redis::cmd("XADD")
        .arg(&keys.stream)
        .arg("*")
        .arg("e")
        .arg(forged.to_string())
        .query_async(&mut connection)
        .await
        .unwrap();

    let sub = subscribe_pull(&app, "vault", "g").await;
    let first = pull_one(&app, &sub).await.unwrap();
    assert_eq!(first["payload"], "genuine");
    assert!(
        pull_one(&app, &sub).await.is_none(),
        "the tampered message is never delivered"
    );
    let (status, dlq) = app
        .call(Method::GET, "/api/v1/mq/queues/vault.dlq", None)
        .await;
    assert_eq!(status, 200, "{dlq}");
    assert_eq!(
        dlq["encrypted"], true,
        "the dead-letter queue of an encrypted queue is encrypted"
    );
    let replay = subscribe_pull(&app, "vault.dlq", "r").await;
    let dead = pull_one(&app, &replay).await.unwrap();
    assert_eq!(dead["messageId"], "forged");
    assert_eq!(dead["headers"]["x-dead-letter-reason"], "decryption-failed");
    assert!(dead["headers"]["x-last-error"]
        .as_str()
        .unwrap()
        .contains("authentication"));
}

fn base64_decode(text: &str) -> Vec<u8> {
    use base64::Engine;
    base64::engine::general_purpose::STANDARD
        .decode(text)
        .unwrap()
}

fn base64_encode(bytes: &[u8]) -> String {
    use base64::Engine;
    base64::engine::general_purpose::STANDARD.encode(bytes)
}

#[tokio::test]
async fn compression_round_trips_and_stats_show_the_saving() {
    let app = TestApp::spawn().await;
    for codec in ["gzip", "zstd"] {
        app.create_queue(json!({"name": codec, "compressionType": codec}))
            .await;
        let sub = subscribe_pull(&app, codec, "g").await;
        let payload = json!({"text": "the same words again and again ".repeat(200)});
        app.call(
            Method::POST,
            "/api/v1/mq/publish",
            Some(json!({"queue": codec, "payload": payload})),
        )
        .await;
        let delivered = pull_one(&app, &sub).await.unwrap();
        assert_eq!(delivered["payload"], payload, "{codec}");
        let (_, queue) = app
            .call(Method::GET, &format!("/api/v1/mq/queues/{codec}"), None)
            .await;
        let (original, stored) = (
            queue["stats"]["originalBytes"].as_u64().unwrap(),
            queue["stats"]["storedBytes"].as_u64().unwrap(),
        );
        assert_eq!(original as usize, payload.to_string().len());
        assert!(
            stored * 5 < original,
            "{codec}: {stored} stored for {original}"
        );
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn the_publish_rate_limit_holds_across_instances() {
    let first = TestApp::spawn_with(|env| {
        env.insert("TENANT_RATE_LIMIT_RPS".into(), "5".into());
    })
    .await;
    let second = first
        .spawn_sibling_with(|env| {
            env.insert("TENANT_RATE_LIMIT_RPS".into(), "5".into());
        })
        .await;
    first.create_queue(json!({"name": "q"})).await;
    // Start at the beginning of a second so that the burst falls in one window.
    let now = chrono::Utc::now();
    tokio::time::sleep(Duration::from_millis(
        1000 - u64::from(now.timestamp_subsec_millis()) + 20,
    ))
    .await;
    let mut requests = Vec::new();
    for n in 0..12 {
        let instance = if n % 2 == 0 { &first } else { &second };
        requests.push(
            instance
                .request(Method::POST, "/api/v1/mq/publish")
                .json(&json!({"queue": "q", "payload": n}))
                .send(),
        );
    }
    let mut admitted = 0;
    let mut limited = Vec::new();
    for response in futures_join(requests).await {
        let (status, body) = read(response.unwrap()).await;
        if status == 201 {
            admitted += 1;
        } else {
            limited.push((status, body));
        }
    }
    assert_eq!(
        admitted, 5,
        "one budget for the tenant, whichever instance it calls"
    );
    for (status, body) in &limited {
        assert_error(*status, body, 429, "MQ_RATE_LIMITED");
        assert_eq!(body["retryAfter"], 1);
    }
    // Another tenant has its own budget.
    let (status, _) = read(
        first
            .request_as(Uuid::new_v4(), "x", Method::POST, "/api/v1/mq/queues")
            .json(&json!({"name": "q"}))
            .send()
            .await
            .unwrap(),
    )
    .await;
    assert_eq!(status, 201);
}

async fn futures_join<F: std::future::Future>(futures: Vec<F>) -> Vec<F::Output> {
    let mut outputs = Vec::new();
    let handles: Vec<_> = futures.into_iter().map(|f| Box::pin(f)).collect();
    for handle in handles {
        outputs.push(handle.await);
    }
    outputs
}

#[tokio::test]
async fn one_tenants_hanging_endpoints_hold_only_its_own_capacity() {
    let app = TestApp::spawn_with(|env| {
        env.insert("WEBHOOK_TENANT_CONCURRENCY".into(), "2".into());
    })
    .await;
    let hanging = Receiver::start(Reply::Hang).await;
    let healthy = Receiver::start(Reply::Status(200)).await;
    app.create_queue(json!({"name": "q"})).await;
    for group in ["a", "b"] {
        app.call(
            Method::POST,
            "/api/v1/mq/subscriptions",
            Some(json!({"queue": "q", "consumerGroup": group, "consumerName": "c", "subscriptionType": "webhook",
                        "handlerConfig": {"url": hanging.url("/"), "concurrency": 10, "timeoutMs": 60000}})),
        )
        .await;
    }
    let other = Uuid::new_v4();
    let create = |body: Value, path: &str| {
        app.request_as(other, "o", Method::POST, path)
            .json(&body)
            .send()
    };
    create(json!({"name": "q"}), "/api/v1/mq/queues")
        .await
        .unwrap();
    create(
        json!({"queue": "q", "consumerGroup": "g", "consumerName": "c", "subscriptionType": "webhook",
               "handlerConfig": {"url": healthy.url("/")}}),
        "/api/v1/mq/subscriptions",
    )
    .await
    .unwrap();
    for n in 0..10 {
        app.call(
            Method::POST,
            "/api/v1/mq/publish",
            Some(json!({"queue": "q", "payload": n})),
        )
        .await;
        create(json!({"queue": "q", "payload": n}), "/api/v1/mq/publish")
            .await
            .unwrap();
    }
    assert!(
        eventually(WAIT, || async { healthy.delivered().len() == 10 }).await,
        "the other tenant is served"
    );
    tokio::time::sleep(Duration::from_millis(500)).await;
    assert_eq!(
        hanging.received().len(),
        2,
        "the hanging tenant holds at most its 2 permits"
    );
}

#[tokio::test]
async fn another_tenant_cannot_touch_anything_by_identifier() {
    let app = TestApp::spawn().await;
    app.create_queue(json!({"name": "orders"})).await;
    let sub = subscribe_pull(&app, "orders", "g").await;
    app.call(
        Method::POST,
        "/api/v1/mq/publish",
        Some(json!({"queue": "orders", "payload": 1, "messageId": "m-1"})),
    )
    .await;
    app.call(
        Method::POST,
        "/api/v1/mq/publish/delayed",
        Some(json!({"queue": "orders", "payload": 1, "messageId": "m-2", "delayMs": 60000})),
    )
    .await;
    let pulled = pull_one(&app, &sub).await.unwrap();
    let ack_id = pulled["ackId"].clone();
    let stranger = Uuid::new_v4();
    // The stranger has a queue and subscription of its own with the same names.
    app.request_as(stranger, "s", Method::POST, "/api/v1/mq/queues")
        .json(&json!({"name": "orders"}))
        .send()
        .await
        .unwrap();
    let (_, own) = read(
        app.request_as(stranger, "s", Method::POST, "/api/v1/mq/subscriptions")
            .json(&json!({"queue": "orders", "consumerGroup": "g", "consumerName": "c", "subscriptionType": "redis_consumer"}))
            .send()
            .await
            .unwrap(),
    )
    .await;
    let own = own["id"].as_str().unwrap().to_owned();
    let cases: Vec<(Method, String, Value, u16, &str)> = vec![
        (
            Method::GET,
            "/api/v1/mq/messages/m-1?queue=orders".into(),
            json!({}),
            404,
            "MQ_MESSAGE_NOT_FOUND",
        ),
        (
            Method::DELETE,
            "/api/v1/mq/messages/m-2?queue=orders".into(),
            json!({}),
            404,
            "MQ_MESSAGE_NOT_FOUND",
        ),
        (
            Method::GET,
            "/api/v1/mq/queues/orders.dlq".into(),
            json!({}),
            404,
            "MQ_QUEUE_NOT_FOUND",
        ),
        (
            Method::GET,
            format!("/api/v1/mq/subscriptions/{sub}"),
            json!({}),
            404,
            "MQ_SUBSCRIPTION_NOT_FOUND",
        ),
        (
            Method::POST,
            format!("/api/v1/mq/subscriptions/{sub}/pull"),
            json!({}),
            404,
            "MQ_SUBSCRIPTION_NOT_FOUND",
        ),
        (
            Method::POST,
            format!("/api/v1/mq/subscriptions/{sub}/ack"),
            json!({"ackIds": [ack_id]}),
            404,
            "MQ_SUBSCRIPTION_NOT_FOUND",
        ),
    ];
    for (method, path, body, status_expected, code) in cases {
        let (status, error) = read(
            app.request_as(stranger, "s", method.clone(), &path)
                .json(&body)
                .send()
                .await
                .unwrap(),
        )
        .await;
        assert_error(status, &error, status_expected, code);
    }
    // The victim's ackId used on the stranger's own subscription acks nothing.
    let (_, acked) = read(
        app.request_as(
            stranger,
            "s",
            Method::POST,
            &format!("/api/v1/mq/subscriptions/{own}/ack"),
        )
        .json(&json!({"ackIds": [ack_id]}))
        .send()
        .await
        .unwrap(),
    )
    .await;
    assert_eq!(acked["acked"], 0);
    // The delayed message is still there for its owner.
    let (_, waiting) = app
        .call(Method::GET, "/api/v1/mq/messages/m-2?queue=orders", None)
        .await;
    assert_eq!(waiting["status"], "scheduled");
    // Internal stats for the stranger's tenant do not include the owner's queues.
    let (_, stats) = read(
        app.anonymous(
            Method::GET,
            &format!("/internal/mq/audit-queue-status?tenantId={stranger}"),
        )
        .header("x-service-token", common::SERVICE_TOKEN)
        .send()
        .await
        .unwrap(),
    )
    .await;
    let (_, mine) = read(
        app.anonymous(
            Method::GET,
            &format!("/internal/mq/audit-queue-status?tenantId={}", app.tenant),
        )
        .header("x-service-token", common::SERVICE_TOKEN)
        .send()
        .await
        .unwrap(),
    )
    .await;
    assert_ne!(stats["messageCount"], Value::Null);
    assert!(mine["messageCount"].as_u64().unwrap() > 0);
}

#[tokio::test]
async fn secrets_never_appear_in_answers() {
    let app = TestApp::spawn_with(|env| {
        env.insert("MQ_ENCRYPTION_KEY".into(), KEY_ONE.into());
    })
    .await;
    app.create_queue(json!({"name": "q", "encrypted": true}))
        .await;
    let (_, created) = app
        .call(Method::POST, "/api/v1/mq/subscriptions", Some(json!({"queue": "q", "consumerGroup": "g", "consumerName": "c",
            "subscriptionType": "webhook", "handlerConfig": {"url": "http://127.0.0.1:9/", "secret": "whsec-never-shown"}})))
        .await;
    let id = created["id"].as_str().unwrap();
    let mut answers = created.to_string();
    for path in [
        format!("/api/v1/mq/subscriptions/{id}"),
        "/api/v1/mq/subscriptions".into(),
        "/api/v1/mq/metrics/consumers".into(),
    ] {
        answers.push_str(&app.call(Method::GET, &path, None).await.1.to_string());
    }
    for path in [
        "/api/v1/mq/status",
        "/api/v1/mq/health",
        "/api/v1/mq/openapi.json",
        "/metrics",
    ] {
        answers.push_str(
            &app.anonymous(Method::GET, path)
                .send()
                .await
                .unwrap()
                .text()
                .await
                .unwrap(),
        );
    }
    answers.push_str(
        &app.anonymous(Method::GET, "/internal/mq/health-detailed")
            .header("x-service-token", common::SERVICE_TOKEN)
            .send()
            .await
            .unwrap()
            .text()
            .await
            .unwrap(),
    );
    for secret in [
        "whsec-never-shown",
        common::JWT_SECRET,
        common::SERVICE_TOKEN,
        KEY_ONE,
    ] {
        assert!(!answers.contains(secret), "a secret leaked into an answer");
    }
}

#[tokio::test]
async fn other_tenants_may_subscribe_to_public_queues_only() {
    let app = TestApp::spawn().await;
    app.create_queue(json!({"name": "announcements", "isPublic": true}))
        .await;
    app.create_queue(json!({"name": "private"})).await;
    let reader = Uuid::new_v4();
    let subscribe = |queue: &str| {
        app.request_as(reader, "reader", Method::POST, "/api/v1/mq/subscriptions")
            .json(&json!({"queue": queue, "queueTenantId": app.tenant, "consumerGroup": "r", "consumerName": "r1",
                          "subscriptionType": "redis_consumer", "offsetResetPolicy": "earliest"}))
            .send()
    };
    let (status, error) = read(subscribe("private").await.unwrap()).await;
    assert_error(status, &error, 404, "MQ_QUEUE_NOT_FOUND");
    let (status, subscription) = read(subscribe("announcements").await.unwrap()).await;
    assert_eq!(status, 201, "{subscription}");
    assert_eq!(subscription["tenantId"], reader.to_string());
    assert_eq!(subscription["queueTenantId"], app.tenant.to_string());
    let id = subscription["id"].as_str().unwrap().to_owned();
    app.call(
        Method::POST,
        "/api/v1/mq/publish",
        Some(json!({"queue": "announcements", "payload": "hello all"})),
    )
    .await;
    let pull = || {
        app.request_as(
            reader,
            "reader",
            Method::POST,
            &format!("/api/v1/mq/subscriptions/{id}/pull"),
        )
        .json(&json!({"maxMessages": 1, "waitMs": 2000}))
        .send()
    };
    let (status, body) = read(pull().await.unwrap()).await;
    assert_eq!(status, 200);
    assert_eq!(body["messages"][0]["payload"], "hello all");
    // The owner's subscription list does not show the reader's subscription.
    let (_, owners) = app
        .call(Method::GET, "/api/v1/mq/subscriptions", None)
        .await;
    assert_eq!(owners["total"], 0);
    // Made private again, the queue refuses the other tenant.
    app.call(
        Method::PUT,
        "/api/v1/mq/queues/announcements",
        Some(json!({"isPublic": false})),
    )
    .await;
    let (status, error) = read(pull().await.unwrap()).await;
    assert_error(status, &error, 403, "MQ_FORBIDDEN");
}

#[tokio::test]
async fn consumer_acls_apply_to_create_pull_ack_and_nack() {
    let app = TestApp::spawn().await;
    app.create_queue(json!({"name": "q", "allowedConsumers": ["billing"]}))
        .await;
    let create = |principal: &str| {
        app.request_as(app.tenant, principal, Method::POST, "/api/v1/mq/subscriptions")
            .json(&json!({"queue": "q", "consumerGroup": "g", "consumerName": principal, "subscriptionType": "redis_consumer"}))
            .send()
    };
    let (status, error) = read(create("intruder").await.unwrap()).await;
    assert_error(status, &error, 403, "MQ_FORBIDDEN");
    let (status, subscription) = read(create("billing").await.unwrap()).await;
    assert_eq!(status, 201);
    let id = subscription["id"].as_str().unwrap();
    for verb in ["pull", "ack", "nack"] {
        let (status, error) = read(
            app.request_as(
                app.tenant,
                "intruder",
                Method::POST,
                &format!("/api/v1/mq/subscriptions/{id}/{verb}"),
            )
            .json(&json!({"ackIds": []}))
            .send()
            .await
            .unwrap(),
        )
        .await;
        assert_error(status, &error, 403, "MQ_FORBIDDEN");
        let (status, _) = read(
            app.request_as(
                app.tenant,
                "billing",
                Method::POST,
                &format!("/api/v1/mq/subscriptions/{id}/{verb}"),
            )
            .json(&json!({"ackIds": []}))
            .send()
            .await
            .unwrap(),
        )
        .await;
        assert_eq!(status, 200, "{verb}");
    }
}
