//! Publishing: single, batch and topic routes, validation, partitioning, idempotency,
//! backpressure, and the message records written behind the hot path.

mod common;

use std::time::Duration;

use common::{assert_error, eventually, queue_id, read, stream_entries, TestApp};
use deadpool_redis::redis::{self, AsyncCommands};
use mq::broker::keys::KeyLayout;
use mq::domain::message::choose_partition;
use reqwest::Method;
use serde_json::{json, Value};
use uuid::Uuid;

async fn publish(app: &TestApp, body: Value) -> (u16, Value) {
    app.call(Method::POST, "/api/v1/mq/publish", Some(body.clone()))
        .await
}

async fn publish_batch(app: &TestApp, body: Value) -> (u16, Value) {
    app.call(Method::POST, "/api/v1/mq/publish/batch", Some(body.clone()))
        .await
}

async fn stored_count(app: &TestApp, queue: &Value) -> usize {
    let mut total = 0;
    for partition in 0..queue["partitionCount"].as_u64().unwrap() as u16 {
        total += stream_entries(app, queue, partition).await.len();
    }
    total
}

#[tokio::test]
async fn publish_stores_the_envelope_and_answers_the_result() {
    let app = TestApp::spawn().await;
    let queue = app.create_queue(json!({"name": "orders"})).await;
    let response = app
        .request(Method::POST, "/api/v1/mq/publish")
        .header(
            "traceparent",
            "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01",
        )
        .json(&json!({
            "queue": "orders", "payload": {"total": 42}, "headers": {"eventType": "order.created"},
            "key": "customer-42", "correlationId": "corr-1", "ttlMs": 60000, "ignored": true
        }))
        .send()
        .await
        .unwrap();
    let (status, result) = read(response).await;
    assert_eq!(status, 201, "{result}");
    assert_eq!(result["queue"], "orders");
    assert_eq!(result["partition"], 0);
    assert_eq!(result["duplicate"], false);
    let message_id = Uuid::parse_str(result["messageId"].as_str().unwrap()).unwrap();
    assert_eq!(message_id.get_version_num(), 7, "generated ids are UUIDv7");

    let entries = stream_entries(&app, &queue, 0).await;
    assert_eq!(entries.len(), 1);
    let (offset, envelope) = &entries[0];
    assert_eq!(result["offset"], offset.as_str());
    assert_eq!(envelope["messageId"], result["messageId"]);
    assert_eq!(envelope["tenantId"], app.tenant.to_string());
    assert_eq!(envelope["payload"], json!({"total": 42}));
    assert_eq!(envelope["headers"], json!({"eventType": "order.created"}));
    assert_eq!(envelope["key"], "customer-42");
    assert_eq!(envelope["correlationId"], "corr-1");
    assert_eq!(envelope["contentType"], "application/json");
    assert_eq!(envelope["traceId"], "4bf92f3577b34da6a3ce929d0e0e4736");
    let published_at = envelope["publishedAt"].as_i64().unwrap();
    assert_eq!(
        envelope["expiresAt"].as_i64().unwrap(),
        published_at + 60_000
    );
    let answered =
        chrono::DateTime::parse_from_rfc3339(result["publishedAt"].as_str().unwrap()).unwrap();
    assert_eq!(answered.timestamp_millis(), published_at);

    let (_, fetched) = app
        .call(Method::GET, "/api/v1/mq/queues/orders", None)
        .await;
    assert_eq!(fetched["stats"]["messageCount"], 1);
    assert_eq!(
        fetched["stats"]["lag"], 0,
        "the recorder group is not a consumer"
    );
}

#[tokio::test]
async fn default_ttl_applies_without_ttl_ms() {
    let app = TestApp::spawn_with(|env| {
        env.insert("DEFAULT_TTL".into(), "30".into());
    })
    .await;
    let queue = app.create_queue(json!({"name": "q"})).await;
    let (status, _) = publish(&app, json!({"queue": "q", "payload": 1})).await;
    assert_eq!(status, 201);
    let (_, envelope) = &stream_entries(&app, &queue, 0).await[0];
    assert_eq!(
        envelope["expiresAt"].as_i64().unwrap() - envelope["publishedAt"].as_i64().unwrap(),
        30_000
    );
}

#[tokio::test]
async fn topic_route_publishes_by_path_name() {
    let app = TestApp::spawn().await;
    let queue = app.create_queue(json!({"name": "events.v1"})).await;
    let (status, result) = app
        .call(
            Method::POST,
            "/api/v1/mq/topics/events.v1/publish",
            Some(json!({"payload": "hello", "messageId": "evt-1"})),
        )
        .await;
    assert_eq!(status, 201, "{result}");
    assert_eq!(result["messageId"], "evt-1");
    assert_eq!(stored_count(&app, &queue).await, 1);
    let (status, error) = app
        .call(
            Method::POST,
            "/api/v1/mq/topics/nope/publish",
            Some(json!({"payload": 1})),
        )
        .await;
    assert_error(status, &error, 404, "MQ_QUEUE_NOT_FOUND");
}

#[tokio::test]
async fn invalid_messages_are_refused_with_the_field() {
    let app = TestApp::spawn().await;
    let queue = app.create_queue(json!({"name": "q"})).await;
    let cases = [
        (json!({"payload": 1}), json!(["queue"])),
        (json!({"queue": "q"}), json!(["payload"])),
        (json!({"queue": "q", "payload": null}), json!(["payload"])),
        (
            json!({"queue": "q", "payload": 1, "headers": {"n": 5}}),
            json!(["headers.n"]),
        ),
        (
            json!({"queue": "q", "payload": 1, "headers": ["x"]}),
            json!(["headers"]),
        ),
        (
            json!({"queue": "q", "payload": 1, "ttlMs": 0}),
            json!(["ttlMs"]),
        ),
        (
            json!({"queue": "q", "payload": 1, "ttlMs": "soon"}),
            json!(["ttlMs"]),
        ),
        (
            json!({"queue": "q", "payload": 1, "messageId": "m".repeat(201)}),
            json!(["messageId"]),
        ),
        (
            json!({"queue": "q", "payload": 1, "messageId": ""}),
            json!(["messageId"]),
        ),
        (
            json!({"queue": "q", "payload": 1, "key": 7}),
            json!(["key"]),
        ),
    ];
    for (body, fields) in cases {
        let (status, error) = publish(&app, body.clone()).await;
        assert_error(status, &error, 400, "MQ_VALIDATION_ERROR");
        assert_eq!(error["details"]["fields"], fields, "{body}: {error}");
    }
    assert_eq!(stored_count(&app, &queue).await, 0);

    let (status, error) = publish(&app, json!({"queue": "missing", "payload": 1})).await;
    assert_error(status, &error, 404, "MQ_QUEUE_NOT_FOUND");
    let (status, error) = read(
        app.request_as(Uuid::new_v4(), "x", Method::POST, "/api/v1/mq/publish")
            .json(&json!({"queue": "q", "payload": 1}))
            .send()
            .await
            .unwrap(),
    )
    .await;
    assert_error(status, &error, 404, "MQ_QUEUE_NOT_FOUND");
}

#[tokio::test]
async fn size_schema_format_archive_and_acl_rules() {
    let app = TestApp::spawn_with(|env| {
        env.insert("MAX_MESSAGE_SIZE".into(), "100".into());
    })
    .await;
    let typed = app
        .create_queue(json!({"name": "typed", "schemaDefinition": {
            "type": "object", "required": ["total"], "properties": {"total": {"type": "number"}}
        }}))
        .await;
    let (status, error) = publish(
        &app,
        json!({"queue": "typed", "payload": {"x": "y".repeat(200)}}),
    )
    .await;
    assert_error(status, &error, 413, "MQ_MESSAGE_TOO_LARGE");
    let (status, error) = publish(
        &app,
        json!({"queue": "typed", "payload": {"total": "many"}}),
    )
    .await;
    assert_error(status, &error, 422, "MQ_SCHEMA_VIOLATION");
    assert!(
        error["details"]["errors"][0]
            .as_str()
            .unwrap()
            .contains("total"),
        "{error}"
    );
    let (status, _) = publish(&app, json!({"queue": "typed", "payload": {"total": 3}})).await;
    assert_eq!(status, 201);
    assert_eq!(stored_count(&app, &typed).await, 1);

    app.create_queue(json!({"name": "texts", "messageFormat": "text"}))
        .await;
    let (status, error) =
        publish(&app, json!({"queue": "texts", "payload": {"not": "text"}})).await;
    assert_error(status, &error, 400, "MQ_VALIDATION_ERROR");

    app.create_queue(json!({"name": "old", "status": "archived"}))
        .await;
    let (status, error) = publish(&app, json!({"queue": "old", "payload": 1})).await;
    assert_error(status, &error, 409, "MQ_QUEUE_ARCHIVED");
    let paused = app
        .create_queue(json!({"name": "resting", "status": "paused"}))
        .await;
    let (status, _) = publish(&app, json!({"queue": "resting", "payload": 1})).await;
    assert_eq!(status, 201, "a paused queue still accepts");
    assert_eq!(stored_count(&app, &paused).await, 1);

    app.create_queue(json!({"name": "guarded", "allowedProducers": ["billing"]}))
        .await;
    let (status, error) = publish(&app, json!({"queue": "guarded", "payload": 1})).await;
    assert_error(status, &error, 403, "MQ_FORBIDDEN");
    let (status, _) = read(
        app.request_as(app.tenant, "billing", Method::POST, "/api/v1/mq/publish")
            .json(&json!({"queue": "guarded", "payload": 1}))
            .send()
            .await
            .unwrap(),
    )
    .await;
    assert_eq!(status, 201);
}

#[tokio::test]
async fn schema_changes_apply_to_the_next_publish() {
    let app = TestApp::spawn().await;
    app.create_queue(json!({"name": "q"})).await;
    assert_eq!(
        publish(&app, json!({"queue": "q", "payload": "text"}))
            .await
            .0,
        201
    );
    let (status, updated) = app
        .call(
            Method::PUT,
            "/api/v1/mq/queues/q",
            Some(json!({"schemaDefinition": {"type": "object"}})),
        )
        .await;
    assert_eq!(status, 200, "{updated}");
    assert_eq!(
        updated["schemaDefinition"],
        json!({"type": "object"}),
        "{updated}"
    );
    let (status, error) = publish(&app, json!({"queue": "q", "payload": "text"})).await;
    assert_error(status, &error, 422, "MQ_SCHEMA_VIOLATION");
}

#[tokio::test]
async fn batch_publishes_in_order_and_validates_all_or_nothing() {
    let app = TestApp::spawn_with(|env| {
        env.insert("MAX_BATCH_SIZE".into(), "5".into());
        env.insert("MAX_MESSAGE_SIZE".into(), "50".into());
    })
    .await;
    let queue = app
        .create_queue(json!({"name": "q", "schemaDefinition": {"type": "integer"}}))
        .await;
    let (status, body) = publish_batch(
        &app,
        json!({"queue": "q", "messages": [{"payload": 1}, {"payload": 2, "messageId": "two"}, {"payload": 3}]}),
    )
    .await;
    assert_eq!(status, 201, "{body}");
    assert_eq!(body["queue"], "q");
    assert_eq!(body["count"], 3);
    let results = body["results"].as_array().unwrap();
    assert_eq!(results[1]["messageId"], "two");
    let entries = stream_entries(&app, &queue, 0).await;
    let stored: Vec<Value> = entries.iter().map(|(_, e)| e["payload"].clone()).collect();
    assert_eq!(stored, [json!(1), json!(2), json!(3)]);
    for (result, (offset, _)) in results.iter().zip(&entries) {
        assert_eq!(result["offset"], offset.as_str());
    }

    let refusals = [
        (
            json!({"queue": "q", "messages": [{"payload": 1}, {"payload": 2}, {}]}),
            400,
            "MQ_VALIDATION_ERROR",
            2,
            json!(["messages[2].payload"]),
        ),
        (
            json!({"queue": "q", "messages": [{"payload": 1}, {"payload": 2, "ttlMs": "x"}]}),
            400,
            "MQ_VALIDATION_ERROR",
            1,
            json!(["messages[1].ttlMs"]),
        ),
        (
            json!({"queue": "q", "messages": [{"payload": 1}, {"payload": "too big ".repeat(10)}]}),
            413,
            "MQ_MESSAGE_TOO_LARGE",
            1,
            json!(["messages[1].payload"]),
        ),
        (
            json!({"queue": "q", "messages": [{"payload": "not an integer"}]}),
            422,
            "MQ_SCHEMA_VIOLATION",
            0,
            Value::Null,
        ),
    ];
    for (body, status_expected, code, index, fields) in refusals {
        let (status, error) = publish_batch(&app, body.clone()).await;
        assert_error(status, &error, status_expected, code);
        assert_eq!(error["details"]["index"], index, "{body}: {error}");
        assert_eq!(error["details"]["fields"], fields, "{body}: {error}");
    }
    for body in [
        json!({"queue": "q", "messages": []}),
        json!({"queue": "q", "messages": [{"payload": 1}, {"payload": 1}, {"payload": 1}, {"payload": 1}, {"payload": 1}, {"payload": 1}]}),
        json!({"queue": "q"}),
        json!({"messages": [{"payload": 1}]}),
    ] {
        let (status, error) = publish_batch(&app, body).await;
        assert_error(status, &error, 400, "MQ_VALIDATION_ERROR");
    }
    assert_eq!(
        stored_count(&app, &queue).await,
        3,
        "refused batches stored nothing"
    );
}

#[tokio::test]
async fn keys_map_to_stable_partitions_and_keyless_messages_spread() {
    let app = TestApp::spawn().await;
    let queue = app
        .create_queue(json!({"name": "q", "partitionCount": 8}))
        .await;
    let expected = choose_partition("customer-42", 8);
    for n in 0..20 {
        let (status, result) = publish(
            &app,
            json!({"queue": "q", "payload": n, "key": "customer-42"}),
        )
        .await;
        assert_eq!(status, 201);
        assert_eq!(result["partition"], expected);
    }
    let in_order: Vec<Value> = stream_entries(&app, &queue, expected)
        .await
        .into_iter()
        .map(|(_, envelope)| envelope["payload"].clone())
        .collect();
    assert_eq!(
        in_order,
        (0..20).map(|n| json!(n)).collect::<Vec<_>>(),
        "one key keeps its order"
    );

    let messages: Vec<Value> = (0..200).map(|n| json!({"payload": n})).collect();
    let (status, body) = publish_batch(&app, json!({"queue": "q", "messages": messages})).await;
    assert_eq!(status, 201);
    let mut used = std::collections::BTreeSet::new();
    for result in body["results"].as_array().unwrap() {
        used.insert(result["partition"].as_u64().unwrap());
    }
    assert_eq!(
        used.len(),
        8,
        "200 keyless messages reach every partition: {used:?}"
    );
    assert_eq!(stored_count(&app, &queue).await, 220);
}

#[tokio::test]
async fn a_repeated_message_id_is_stored_once() {
    let app = TestApp::spawn().await;
    let queue = app
        .create_queue(json!({"name": "q", "partitionCount": 4}))
        .await;
    let (status, first) = publish(
        &app,
        json!({"queue": "q", "payload": 1, "messageId": "order-1"}),
    )
    .await;
    assert_eq!(status, 201);
    tokio::time::sleep(Duration::from_millis(5)).await;
    let (status, again) = publish(
        &app,
        json!({"queue": "q", "payload": 2, "messageId": "order-1"}),
    )
    .await;
    assert_eq!(status, 200);
    assert_eq!(again["duplicate"], true);
    for field in ["messageId", "queue", "partition", "offset", "publishedAt"] {
        assert_eq!(again[field], first[field], "{field}");
    }
    let (status, batch) = publish_batch(
        &app,
        json!({"queue": "q", "messages": [
            {"payload": 3, "messageId": "order-1"}, {"payload": 4, "messageId": "order-2"},
            {"payload": 5, "messageId": "order-2"}
        ]}),
    )
    .await;
    assert_eq!(status, 201);
    let duplicates: Vec<bool> = batch["results"]
        .as_array()
        .unwrap()
        .iter()
        .map(|r| r["duplicate"].as_bool().unwrap())
        .collect();
    assert_eq!(duplicates, [true, false, true]);
    assert_eq!(stored_count(&app, &queue).await, 2);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn concurrent_duplicates_store_exactly_one() {
    let app = TestApp::spawn().await;
    let queue = app.create_queue(json!({"name": "q"})).await;
    let mut tasks = Vec::new();
    for n in 0..32 {
        let request = app
            .request(Method::POST, "/api/v1/mq/publish")
            .json(&json!({"queue": "q", "payload": n, "messageId": "same"}));
        tasks.push(tokio::spawn(async move {
            request.send().await.unwrap().status().as_u16()
        }));
    }
    let mut statuses = Vec::new();
    for task in tasks {
        statuses.push(task.await.unwrap());
    }
    assert_eq!(
        statuses.iter().filter(|&&s| s == 201).count(),
        1,
        "{statuses:?}"
    );
    assert_eq!(
        statuses.iter().filter(|&&s| s == 200).count(),
        31,
        "{statuses:?}"
    );
    assert_eq!(stored_count(&app, &queue).await, 1);
}

#[tokio::test]
async fn a_full_queue_refuses_until_messages_are_consumed() {
    let app = TestApp::spawn().await;
    let queue = app.create_queue(json!({"name": "q", "maxLength": 3})).await;
    for n in 0..3 {
        assert_eq!(
            publish(&app, json!({"queue": "q", "payload": n})).await.0,
            201
        );
    }
    let response = app
        .request(Method::POST, "/api/v1/mq/publish")
        .json(&json!({"queue": "q", "payload": "one too many"}))
        .send()
        .await
        .unwrap();
    assert!(response.headers().contains_key("retry-after"));
    let (status, error) = read(response).await;
    assert_error(status, &error, 429, "MQ_QUEUE_FULL");
    assert!(error["retryAfter"].as_u64().unwrap() >= 1);
    let (status, error) =
        publish_batch(&app, json!({"queue": "q", "messages": [{"payload": 1}]})).await;
    assert_error(status, &error, 429, "MQ_QUEUE_FULL");
    let entries = stream_entries(&app, &queue, 0).await;
    let payloads: Vec<Value> = entries.iter().map(|(_, e)| e["payload"].clone()).collect();
    assert_eq!(
        payloads,
        [json!(0), json!(1), json!(2)],
        "nothing stored was dropped"
    );

    // A consumer group reads and acks two messages: room for two more.
    let keys = KeyLayout::new(&app.redis.prefix).partition(queue_id(&queue), 0);
    let mut redis = app.redis.connection().await;
    let () = redis::cmd("XGROUP")
        .arg("CREATE")
        .arg(&keys.stream)
        .arg("workers")
        .arg("0")
        .query_async(&mut redis)
        .await
        .unwrap();
    let _: redis::Value = redis::cmd("XREADGROUP")
        .arg("GROUP")
        .arg("workers")
        .arg("w1")
        .arg("COUNT")
        .arg(2)
        .arg("STREAMS")
        .arg(&keys.stream)
        .arg(">")
        .query_async(&mut redis)
        .await
        .unwrap();
    let acked: i64 = redis
        .xack(&keys.stream, "workers", &[&entries[0].0, &entries[1].0])
        .await
        .unwrap();
    assert_eq!(acked, 2);
    assert_eq!(
        publish(&app, json!({"queue": "q", "payload": 3})).await.0,
        201
    );
    assert_eq!(
        publish(&app, json!({"queue": "q", "payload": 4})).await.0,
        201
    );
    let (status, _) = publish(&app, json!({"queue": "q", "payload": 5})).await;
    assert_eq!(status, 429);
}

#[tokio::test]
async fn a_batch_is_stored_entirely_or_not_at_all() {
    let app = TestApp::spawn().await;
    let queue = app
        .create_queue(json!({"name": "q", "partitionCount": 2, "maxLength": 2}))
        .await;
    let key_for = |partition: u16| {
        (0..)
            .map(|n| format!("k{n}"))
            .find(|k| choose_partition(k, 2) == partition)
            .unwrap()
    };
    let (full_key, open_key) = (key_for(0), key_for(1));
    assert_eq!(
        publish(&app, json!({"queue": "q", "payload": 0, "key": full_key}))
            .await
            .0,
        201
    );
    // Partition 0 is at its bound (ceil(2 / 2) = 1): partition 1's message is not stored either.
    let batch = json!({"queue": "q", "messages": [
        {"payload": 1, "key": open_key, "messageId": "b-1"},
        {"payload": 2, "key": full_key, "messageId": "b-2"}
    ]});
    let (status, error) = publish_batch(&app, batch.clone()).await;
    assert_error(status, &error, 429, "MQ_QUEUE_FULL");
    assert!(error["details"].get("results").is_none(), "{error}");
    assert_eq!(stream_entries(&app, &queue, 1).await.len(), 0);
    assert_eq!(stream_entries(&app, &queue, 0).await.len(), 1);
    // Room made in partition 0: the whole batch is stored, and only once.
    app.call(Method::POST, "/api/v1/mq/queues/q/purge", None)
        .await;
    let (status, stored) = publish_batch(&app, batch.clone()).await;
    assert_eq!(status, 201, "{stored}");
    let (status, again) = publish_batch(&app, batch).await;
    assert_eq!(status, 201);
    assert!(again["results"]
        .as_array()
        .unwrap()
        .iter()
        .all(|r| r["duplicate"] == true));
    assert_eq!(stream_entries(&app, &queue, 0).await.len(), 1);
    assert_eq!(stream_entries(&app, &queue, 1).await.len(), 1);
}

#[tokio::test]
async fn a_message_id_is_one_per_queue_whatever_its_key() {
    let app = TestApp::spawn().await;
    let queue = app
        .create_queue(json!({"name": "q", "partitionCount": 8}))
        .await;
    let (status, first) = publish(
        &app,
        json!({"queue": "q", "payload": 1, "messageId": "order-7", "key": "customer-1"}),
    )
    .await;
    assert_eq!(status, 201);
    let other_key = (0..)
        .map(|n| format!("customer-{n}"))
        .find(|k| choose_partition(k, 8) != first["partition"].as_u64().unwrap() as u16)
        .unwrap();
    let (status, again) = publish(
        &app,
        json!({"queue": "q", "payload": 2, "messageId": "order-7", "key": other_key}),
    )
    .await;
    assert_eq!(status, 200, "{again}");
    assert_eq!(again["duplicate"], true);
    assert_eq!(
        again["partition"], first["partition"],
        "the original's partition"
    );
    assert_eq!(again["offset"], first["offset"]);
    assert_eq!(stored_count(&app, &queue).await, 1);
}

/// Records of the queue named "q" (the audit trail's queue has records too).
async fn count_records(db: &mut sqlx::PgConnection) -> i64 {
    sqlx::query_scalar(
        "SELECT count(*) FROM message_records r JOIN message_topics t ON t.id = r.topic_id \
         WHERE t.name = 'q'",
    )
    .fetch_one(db)
    .await
    .unwrap()
}

async fn record_count(app: &TestApp) -> i64 {
    count_records(&mut app.database.connect().await).await
}

#[tokio::test]
async fn records_appear_in_postgres() {
    let app = TestApp::spawn().await;
    let queue = app
        .create_queue(json!({"name": "q", "partitionCount": 2}))
        .await;
    let (_, result) = publish(
        &app,
        json!({"queue": "q", "payload": {"a": 1}, "headers": {"h": "v"}, "key": "k", "messageId": "m-1", "correlationId": "c"}),
    )
    .await;
    let messages: Vec<Value> = (0..9).map(|n| json!({"payload": n})).collect();
    publish_batch(&app, json!({"queue": "q", "messages": messages})).await;
    assert!(
        eventually(Duration::from_secs(15), || async {
            record_count(&app).await == 10
        })
        .await
    );
    let mut db = app.database.connect().await;
    let row: (Uuid, i32, String, Option<String>, Option<String>, Value, Value, String) = sqlx::query_as(
        "SELECT topic_id, partition_id, offset_value, message_key, correlation_id, headers, payload, status \
         FROM message_records WHERE message_id = 'm-1'",
    )
    .fetch_one(&mut db)
    .await
    .unwrap();
    assert_eq!(row.0, queue_id(&queue));
    assert_eq!(i64::from(row.1), result["partition"].as_i64().unwrap());
    assert_eq!(row.2, result["offset"].as_str().unwrap());
    assert_eq!((row.3.as_deref(), row.4.as_deref()), (Some("k"), Some("c")));
    assert_eq!(row.5, json!({"h": "v"}));
    assert_eq!(row.6, json!({"a": 1}));
    assert_eq!(row.7, "published");
    // The seed design's columns.
    let seed: (
        Option<String>,
        Option<String>,
        i32,
        Option<chrono::DateTime<chrono::Utc>>,
    ) = sqlx::query_as(
        "SELECT content_type, producer_id, payload_size, consumed_at \
             FROM message_records WHERE message_id = 'm-1'",
    )
    .fetch_one(&mut db)
    .await
    .unwrap();
    assert_eq!(seed.0.as_deref(), Some("application/json"));
    assert_eq!(
        seed.1.as_deref(),
        Some("tester"),
        "the JWT sub of the producer"
    );
    assert_eq!(seed.2, 7, "the size of {{\"a\":1}}");
    assert_eq!(seed.3, None, "not consumed yet");
}

#[tokio::test]
async fn publishing_continues_while_postgres_is_cut_and_records_catch_up() {
    let (app, proxy) = TestApp::spawn_behind_postgres_proxy().await;
    app.create_queue(json!({"name": "q"})).await;
    assert_eq!(
        publish(&app, json!({"queue": "q", "payload": "before"}))
            .await
            .0,
        201
    );
    let mut db = app.database.connect().await;
    let deadline = tokio::time::Instant::now() + Duration::from_secs(15);
    while count_records(&mut db).await < 1 && tokio::time::Instant::now() < deadline {
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    assert_eq!(count_records(&mut db).await, 1);

    proxy.cut();
    for n in 0..5 {
        let (status, body) = publish(&app, json!({"queue": "q", "payload": n})).await;
        assert_eq!(status, 201, "publish must not depend on PostgreSQL: {body}");
    }
    let (status, body) = publish_batch(
        &app,
        json!({"queue": "q", "messages": [{"payload": "b1"}, {"payload": "b2"}]}),
    )
    .await;
    assert_eq!(status, 201, "{body}");
    tokio::time::sleep(Duration::from_secs(2)).await;
    assert_eq!(
        count_records(&mut db).await,
        1,
        "nothing can be recorded while cut"
    );
    let (_, status_body) = app.get_anonymous("/api/v1/mq/status").await;
    assert_eq!(
        status_body["recordWriter"]["status"], "retrying",
        "{status_body}"
    );

    proxy.restore();
    let deadline = tokio::time::Instant::now() + Duration::from_secs(30);
    while count_records(&mut db).await < 8 && tokio::time::Instant::now() < deadline {
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    assert_eq!(
        count_records(&mut db).await,
        8,
        "records caught up after the outage"
    );
    let (_, status_body) = app.get_anonymous("/api/v1/mq/status").await;
    assert_eq!(status_body["recordWriter"]["status"], "ok");
}

/// A backlog several recorder turns long (here: what piled up while PostgreSQL was cut) is
/// written in batches of several turns, and every message is recorded where it was stored.
#[tokio::test]
async fn a_backlog_of_many_turns_is_written_in_larger_batches_and_recorded_whole() {
    let (app, proxy) = TestApp::spawn_behind_postgres_proxy().await;
    app.create_queue(json!({"name": "q", "partitionCount": 4}))
        .await;
    let mut stored = std::collections::BTreeMap::new();
    for batch in 0..25 {
        if batch == 1 {
            // After the first publish, which looked the queue up in PostgreSQL.
            proxy.cut();
        }
        let messages: Vec<Value> = (0..100)
            .map(|n| json!({"payload": batch * 100 + n}))
            .collect();
        let (status, body) = publish_batch(&app, json!({"queue": "q", "messages": messages})).await;
        assert_eq!(status, 201, "{body}");
        for result in body["results"].as_array().unwrap() {
            stored.insert(
                result["messageId"].as_str().unwrap().to_owned(),
                (
                    result["partition"].as_i64().unwrap(),
                    result["offset"].as_str().unwrap().to_owned(),
                ),
            );
        }
    }
    proxy.restore();

    let mut db = app.database.connect().await;
    let deadline = tokio::time::Instant::now() + Duration::from_secs(60);
    while count_records(&mut db).await < 2500 && tokio::time::Instant::now() < deadline {
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    let rows: Vec<(String, i32, String)> = sqlx::query_as(
        "SELECT r.message_id, r.partition_id, r.offset_value FROM message_records r \
         JOIN message_topics t ON t.id = r.topic_id WHERE t.name = 'q'",
    )
    .fetch_all(&mut db)
    .await
    .unwrap();
    assert_eq!(rows.len(), 2500, "every message recorded");
    let recorded: std::collections::BTreeMap<String, (i64, String)> = rows
        .into_iter()
        .map(|(id, partition, offset)| (id, (i64::from(partition), offset)))
        .collect();
    assert_eq!(recorded, stored, "each record where its message was stored");
    assert!(
        app.state.recorder.largest_batch() > 500,
        "one write took more than a turn's 500 entries: {}",
        app.state.recorder.largest_batch()
    );
}

#[tokio::test]
async fn redis_down_is_publish_failed_with_retry_after() {
    let app = TestApp::spawn_with(|env| {
        common::unreachable_redis(env);
    })
    .await;
    app.create_queue(json!({"name": "q"})).await;
    for (path, body) in [
        ("/api/v1/mq/publish", json!({"queue": "q", "payload": 1})),
        (
            "/api/v1/mq/publish/batch",
            json!({"queue": "q", "messages": [{"payload": 1}]}),
        ),
        ("/api/v1/mq/topics/q/publish", json!({"payload": 1})),
    ] {
        let response = app
            .request(Method::POST, path)
            .json(&body)
            .send()
            .await
            .unwrap();
        assert!(response.headers().contains_key("retry-after"));
        let (status, error) = read(response).await;
        assert_error(status, &error, 503, "MQ_PUBLISH_FAILED");
        assert!(error["retryAfter"].as_u64().unwrap() >= 1);
    }
}

#[tokio::test]
async fn avro_and_protobuf_records_travel_as_base64_with_their_content_type() {
    let app = TestApp::spawn().await;
    for (format, content_type) in [
        ("avro", "application/avro"),
        ("protobuf", "application/x-protobuf"),
    ] {
        let queue = app
            .create_queue(json!({"name": format, "messageFormat": format}))
            .await;
        assert_eq!(queue["messageFormat"], format);
        let record = "AAECAwQF/w==";
        let (status, result) = publish(&app, json!({"queue": format, "payload": record})).await;
        assert_eq!(status, 201, "{result}");
        let (_, envelope) = stream_entries(&app, &queue, 0).await.remove(0);
        assert_eq!(envelope["payload"], record);
        assert_eq!(envelope["contentType"], content_type);
        let (status, named) = publish(
            &app,
            json!({"queue": format, "payload": record, "contentType": "application/vnd.x+avro"}),
        )
        .await;
        assert_eq!(status, 201, "{named}");
        for bad in [json!("not base64!"), json!({"a": 1}), json!(""), json!(7)] {
            let (status, error) = publish(&app, json!({"queue": format, "payload": bad})).await;
            assert_error(status, &error, 400, "MQ_VALIDATION_ERROR");
            assert_eq!(error["details"]["fields"], json!(["payload"]));
        }
    }
}
