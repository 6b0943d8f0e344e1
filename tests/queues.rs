//! Queue management routes against real PostgreSQL and Redis.

mod common;

use common::{assert_error, queue_id, read, TestApp};
use deadpool_redis::redis::{self, AsyncCommands};
use mq::broker::keys::KeyLayout;
use reqwest::Method;
use serde_json::{json, Value};
use uuid::Uuid;

async fn get_queue(app: &TestApp, name: &str) -> (u16, Value) {
    app.call(Method::GET, &format!("/api/v1/mq/queues/{name}"), None)
        .await
}

#[tokio::test]
async fn create_returns_the_queue_with_defaults() {
    let app = TestApp::spawn().await;
    let queue = app
        .create_queue(json!({"name": "orders", "displayName": "Orders", "partitionCount": 4, "unknownField": 1}))
        .await;
    assert_eq!(queue["name"], "orders");
    assert_eq!(queue["displayName"], "Orders");
    assert_eq!(queue["description"], Value::Null);
    assert_eq!(queue["topicType"], "redis_stream");
    assert_eq!(queue["partitionCount"], 4);
    assert_eq!(queue["replicationFactor"], 1);
    assert_eq!(queue["retentionMs"], 604_800_000);
    assert_eq!(queue["maxLength"], 10_000);
    assert_eq!(queue["messageFormat"], "json");
    assert_eq!(queue["schemaDefinition"], Value::Null);
    assert_eq!(queue["compressionType"], "none");
    assert_eq!(queue["encrypted"], false);
    assert_eq!(queue["tenantId"], app.tenant.to_string());
    assert_eq!(queue["isPublic"], false);
    assert_eq!(queue["allowedProducers"], json!([]));
    assert_eq!(queue["allowedConsumers"], json!([]));
    assert_eq!(queue["status"], "active");
    assert!(queue["createdAt"].as_str().unwrap().ends_with('Z'));
    Uuid::parse_str(queue["id"].as_str().unwrap()).expect("id is a UUID");

    let (status, fetched) = get_queue(&app, "orders").await;
    assert_eq!(status, 200);
    assert_eq!(fetched["id"], queue["id"]);
    assert_eq!(
        fetched["stats"],
        json!({"messageCount": 0, "pendingCount": 0, "delayedCount": 0, "lag": 0,
               "subscriptionCount": 0, "oldestUnackedAgeMs": null,
               "originalBytes": 0, "storedBytes": 0})
    );
}

#[tokio::test]
async fn max_length_defaults_to_the_configured_limit() {
    let app = TestApp::spawn_with(|env| {
        env.insert("MAX_QUEUE_LENGTH".into(), "123".into());
    })
    .await;
    let queue = app.create_queue(json!({"name": "q"})).await;
    assert_eq!(queue["maxLength"], 123);
}

#[tokio::test]
async fn duplicate_name_is_409_but_other_tenants_may_reuse_it() {
    let app = TestApp::spawn().await;
    app.create_queue(json!({"name": "orders"})).await;
    let (status, body) = app
        .call(
            Method::POST,
            "/api/v1/mq/queues",
            Some(json!({"name": "orders"})),
        )
        .await;
    assert_error(status, &body, 409, "MQ_QUEUE_EXISTS");

    let other = Uuid::new_v4();
    let (status, body) = read(
        app.request_as(other, "someone", Method::POST, "/api/v1/mq/queues")
            .json(&json!({"name": "orders"}))
            .send()
            .await
            .unwrap(),
    )
    .await;
    assert_eq!(status, 201, "{body}");
    assert_eq!(body["tenantId"], other.to_string());
}

#[tokio::test]
async fn create_validation_names_the_fields() {
    let app = TestApp::spawn().await;
    let cases = [
        (json!({}), json!(["name"])),
        (json!({"name": "bad name"}), json!(["name"])),
        (json!({"name": "a".repeat(201)}), json!(["name"])),
        (
            json!({"name": "q", "partitionCount": 0}),
            json!(["partitionCount"]),
        ),
        (
            json!({"name": "q", "partitionCount": 65}),
            json!(["partitionCount"]),
        ),
        (
            json!({"name": "q", "topicType": "kafka"}),
            json!(["topicType"]),
        ),
        (
            json!({"name": "q", "compressionType": "lz4"}),
            json!(["compressionType"]),
        ),
        (
            json!({"name": "q", "encrypted": true}),
            json!(["encrypted"]),
        ),
        (json!({"name": "q", "maxLength": -1}), json!(["maxLength"])),
        (
            json!({"name": "q", "schemaDefinition": {"type": 12}}),
            json!(["schemaDefinition"]),
        ),
        (
            json!({"name": "q", "partitionCount": "4"}),
            json!(["partitionCount"]),
        ),
        (
            json!({"name": "q", "allowedProducers": "alice"}),
            json!(["allowedProducers"]),
        ),
        (
            json!({"name": "q", "allowedProducers": ["alice", 7]}),
            json!(["allowedProducers[1]"]),
        ),
        (json!({"name": 5}), json!(["name"])),
    ];
    for (body, fields) in cases {
        let (status, error) = app
            .call(Method::POST, "/api/v1/mq/queues", Some(body.clone()))
            .await;
        assert_error(status, &error, 400, "MQ_VALIDATION_ERROR");
        assert_eq!(error["details"]["fields"], fields, "for {body}: {error}");
    }
    let (status, list) = app.call(Method::GET, "/api/v1/mq/queues", None).await;
    assert_eq!(status, 200);
    assert_eq!(list["total"], 0, "nothing was created by invalid requests");
}

#[tokio::test]
async fn encrypted_queue_is_accepted_when_a_key_is_configured() {
    let app = TestApp::spawn_with(|env| {
        env.insert(
            "MQ_ENCRYPTION_KEY".into(),
            "MDEyMzQ1Njc4OTAxMjM0NTY3ODkwMTIzNDU2Nzg5MDE=".into(),
        );
    })
    .await;
    let queue = app
        .create_queue(json!({"name": "secrets", "encrypted": true}))
        .await;
    assert_eq!(queue["encrypted"], true);
}

#[tokio::test]
async fn list_pages_filters_and_searches_by_prefix() {
    let app = TestApp::spawn().await;
    for name in ["a_1", "ab", "b.1", "b.2", "c"] {
        app.create_queue(json!({"name": name})).await;
    }
    app.request(Method::PUT, "/api/v1/mq/queues/c")
        .json(&json!({"status": "paused"}))
        .send()
        .await
        .unwrap();
    let list = |query: &str| {
        let request = app.request(Method::GET, &format!("/api/v1/mq/queues{query}"));
        async move { read(request.send().await.unwrap()).await }
    };
    let names = |body: &Value| -> Vec<String> {
        body["items"]
            .as_array()
            .unwrap()
            .iter()
            .map(|q| q["name"].as_str().unwrap().to_owned())
            .collect()
    };

    // The first change also created the tenant's audit trail queue, "audit-logs".
    let (status, page) = list("").await;
    assert_eq!(status, 200);
    assert_eq!(
        (
            page["total"].clone(),
            page["limit"].clone(),
            page["offset"].clone()
        ),
        (json!(6), json!(50), json!(0))
    );
    assert_eq!(names(&page), ["a_1", "ab", "audit-logs", "b.1", "b.2", "c"]);

    let (_, page) = list("?limit=2&offset=2").await;
    assert_eq!(names(&page), ["audit-logs", "b.1"]);
    assert_eq!(page["total"], 6);

    let (_, page) = list("?search=b.").await;
    assert_eq!(names(&page), ["b.1", "b.2"]);
    // "_" is a literal character, not a LIKE wildcard.
    let (_, page) = list("?search=a_").await;
    assert_eq!(names(&page), ["a_1"]);

    let (_, page) = list("?status=paused").await;
    assert_eq!(names(&page), ["c"]);
    let (_, page) = list("?status=&search=").await;
    assert_eq!(page["total"], 6);

    for query in [
        "?limit=0",
        "?limit=501",
        "?limit=ten",
        "?offset=-3",
        "?status=deleted",
    ] {
        let (status, error) = list(query).await;
        assert_error(status, &error, 400, "MQ_VALIDATION_ERROR");
        assert_eq!(
            error["details"]["fields"].as_array().unwrap().len(),
            1,
            "{query}: {error}"
        );
    }

    let (_, page) = read(
        app.request_as(Uuid::new_v4(), "x", Method::GET, "/api/v1/mq/queues")
            .send()
            .await
            .unwrap(),
    )
    .await;
    assert_eq!(page["total"], 0, "another tenant sees none of these queues");
}

#[tokio::test]
async fn another_tenants_queue_is_not_found_on_every_route() {
    let app = TestApp::spawn().await;
    app.create_queue(json!({"name": "orders"})).await;
    let stranger = Uuid::new_v4();
    let attempts = [
        (Method::GET, "/api/v1/mq/queues/orders", None),
        (
            Method::PUT,
            "/api/v1/mq/queues/orders",
            Some(json!({"description": "mine now"})),
        ),
        (Method::DELETE, "/api/v1/mq/queues/orders", None),
        (Method::POST, "/api/v1/mq/queues/orders/purge", None),
    ];
    for (method, path, body) in attempts {
        let mut request = app.request_as(stranger, "intruder", method.clone(), path);
        if let Some(body) = body {
            request = request.json(&body);
        }
        let (status, error) = read(request.send().await.unwrap()).await;
        assert_error(status, &error, 404, "MQ_QUEUE_NOT_FOUND");
        assert_eq!(
            error["message"], "queue 'orders' not found",
            "{method} {path}"
        );
    }
    let (status, queue) = get_queue(&app, "orders").await;
    assert_eq!(status, 200);
    assert_eq!(
        queue["description"],
        Value::Null,
        "the owner's queue is untouched"
    );
}

#[tokio::test]
async fn update_is_partial_and_guards_immutable_fields() {
    let app = TestApp::spawn().await;
    let created = app
        .create_queue(json!({"name": "orders", "description": "first", "partitionCount": 2}))
        .await;
    let update = |body: Value| {
        let request = app
            .request(Method::PUT, "/api/v1/mq/queues/orders")
            .json(&body);
        async move { read(request.send().await.unwrap()).await }
    };

    let (status, queue) = update(json!({
        "maxLength": 50, "isPublic": true, "allowedProducers": ["svc-a"],
        "schemaDefinition": {"type": "object"}, "compressionType": "zstd",
        "partitionCount": 2, "name": "orders"
    }))
    .await;
    assert_eq!(status, 200, "{queue}");
    assert_eq!(queue["maxLength"], 50);
    assert_eq!(queue["isPublic"], true);
    assert_eq!(queue["allowedProducers"], json!(["svc-a"]));
    assert_eq!(queue["schemaDefinition"], json!({"type": "object"}));
    assert_eq!(queue["compressionType"], "zstd");
    assert_eq!(
        queue["description"], "first",
        "absent fields keep their value"
    );
    assert_eq!(queue["createdAt"], created["createdAt"]);
    assert_ne!(queue["updatedAt"], created["updatedAt"]);

    let (_, queue) = update(json!({"description": null, "schemaDefinition": null})).await;
    assert_eq!(queue["description"], Value::Null);
    assert_eq!(queue["schemaDefinition"], Value::Null);

    for (body, field) in [
        (json!({"partitionCount": 3}), "partitionCount"),
        (json!({"name": "renamed"}), "name"),
        (json!({"encrypted": true}), "encrypted"),
        (json!({"topicType": "kafka"}), "topicType"),
        (json!({"status": "deleted"}), "status"),
        (json!({"maxLength": 0}), "maxLength"),
        (json!({"retentionMs": "long"}), "retentionMs"),
    ] {
        let (status, error) = update(body.clone()).await;
        assert_error(status, &error, 400, "MQ_VALIDATION_ERROR");
        assert_eq!(error["details"]["fields"], json!([field]), "{body}");
    }
    let (_, queue) = get_queue(&app, "orders").await;
    assert_eq!(queue["maxLength"], 50, "rejected updates changed nothing");
    assert_eq!(queue["partitionCount"], 2);

    let (status, queue) = update(json!({"status": "archived"})).await;
    assert_eq!(status, 200);
    assert_eq!(queue["status"], "archived");

    let (status, error) = app
        .call(Method::PUT, "/api/v1/mq/queues/missing", Some(json!({})))
        .await;
    assert_error(status, &error, 404, "MQ_QUEUE_NOT_FOUND");
}

/// A due time the scheduler will not reach during a test.
const FAR_FUTURE_MS: i64 = 4_000_000_000_000;

/// Seeds `count` entries into a partition stream, as a publish would.
async fn seed_stream(app: &TestApp, queue: &Value, partition: u16, count: usize) {
    let keys = KeyLayout::new(&app.redis.prefix).partition(queue_id(queue), partition);
    let mut redis = app.redis.connection().await;
    for i in 0..count {
        let _: String = redis
            .xadd(&keys.stream, "*", &[("envelope", format!("{{\"n\":{i}}}"))])
            .await
            .unwrap();
    }
}

#[tokio::test]
async fn stats_reflect_streams_groups_and_delayed_messages() {
    let app = TestApp::spawn().await;
    let queue = app
        .create_queue(json!({"name": "orders", "partitionCount": 2}))
        .await;
    seed_stream(&app, &queue, 0, 3).await;
    seed_stream(&app, &queue, 1, 2).await;
    let layout = KeyLayout::new(&app.redis.prefix);
    let mut redis = app.redis.connection().await;
    for partition in 0..2 {
        let keys = layout.partition(queue_id(&queue), partition);
        let _: () = redis::cmd("XGROUP")
            .arg("CREATE")
            .arg(&keys.stream)
            .arg("billing")
            .arg("0")
            .query_async(&mut redis)
            .await
            .unwrap();
    }
    // Two deliveries on partition 0 stay unacked.
    let p0 = layout.partition(queue_id(&queue), 0);
    let _: redis::Value = redis::cmd("XREADGROUP")
        .arg("GROUP")
        .arg("billing")
        .arg("c1")
        .arg("COUNT")
        .arg(2)
        .arg("STREAMS")
        .arg(&p0.stream)
        .arg(">")
        .query_async(&mut redis)
        .await
        .unwrap();
    let _: () = redis.zadd(&p0.delayed, "m-1", FAR_FUTURE_MS).await.unwrap();
    let mut db = app.database.connect().await;
    sqlx::query(
        "INSERT INTO message_subscriptions (id, tenant_id, topic_id, consumer_group, consumer_name, subscription_type) \
         VALUES ($1, $2, $3, 'billing', 'billing-1', 'redis_consumer')",
    )
    .bind(Uuid::new_v4()).bind(app.tenant).bind(queue_id(&queue))
    .execute(&mut db).await.unwrap();

    let (status, body) = get_queue(&app, "orders").await;
    assert_eq!(status, 200);
    let stats = &body["stats"];
    assert_eq!(stats["messageCount"], 5);
    assert_eq!(stats["pendingCount"], 2);
    assert_eq!(
        stats["lag"], 3,
        "one undelivered on partition 0, two on partition 1"
    );
    assert_eq!(stats["delayedCount"], 1);
    assert_eq!(stats["subscriptionCount"], 1);
    assert!(stats["oldestUnackedAgeMs"].as_u64().is_some(), "{stats}");
}

#[tokio::test]
async fn purge_empties_the_queue_but_keeps_groups_and_config() {
    let app = TestApp::spawn().await;
    let queue = app
        .create_queue(json!({"name": "orders", "partitionCount": 3}))
        .await;
    seed_stream(&app, &queue, 0, 4).await;
    seed_stream(&app, &queue, 2, 1).await;
    let keys = KeyLayout::new(&app.redis.prefix).partition(queue_id(&queue), 0);
    let mut redis = app.redis.connection().await;
    let _: () = redis
        .zadd(&keys.delayed, "later", FAR_FUTURE_MS)
        .await
        .unwrap();
    let _: () = redis::cmd("XGROUP")
        .arg("CREATE")
        .arg(&keys.stream)
        .arg("billing")
        .arg("$")
        .query_async(&mut redis)
        .await
        .unwrap();

    let (status, body) = app
        .call(Method::POST, "/api/v1/mq/queues/orders/purge", None)
        .await;
    assert_eq!(status, 200);
    assert_eq!(body, json!({"purged": 6}));

    let (_, queue) = get_queue(&app, "orders").await;
    assert_eq!(queue["stats"]["messageCount"], 0);
    assert_eq!(queue["stats"]["delayedCount"], 0);
    assert_eq!(queue["partitionCount"], 3);
    let groups: redis::streams::StreamInfoGroupsReply = redis::cmd("XINFO")
        .arg("GROUPS")
        .arg(&keys.stream)
        .query_async(&mut redis)
        .await
        .unwrap();
    assert!(
        groups.groups.iter().any(|group| group.name == "billing"),
        "consumer group kept"
    );

    let (_, body) = app
        .call(Method::POST, "/api/v1/mq/queues/orders/purge", None)
        .await;
    assert_eq!(body, json!({"purged": 0}));
}

#[tokio::test]
async fn delete_removes_data_subscriptions_and_records() {
    let app = TestApp::spawn().await;
    let queue = app
        .create_queue(json!({"name": "orders", "partitionCount": 2}))
        .await;
    let keep = app.create_queue(json!({"name": "keep"})).await;
    seed_stream(&app, &queue, 0, 2).await;
    seed_stream(&app, &queue, 1, 2).await;
    seed_stream(&app, &keep, 0, 1).await;
    let mut db = app.database.connect().await;
    sqlx::query(
        "INSERT INTO message_subscriptions (id, tenant_id, topic_id, consumer_group, consumer_name, subscription_type) \
         VALUES ($1, $2, $3, 'g', 'c', 'redis_consumer')",
    )
    .bind(Uuid::new_v4()).bind(app.tenant).bind(queue_id(&queue))
    .execute(&mut db).await.unwrap();
    sqlx::query(
        "INSERT INTO message_records (topic_id, message_id, tenant_id, partition_id, status, published_at) \
         VALUES ($1, 'm1', $2, 0, 'published', now())",
    )
    .bind(queue_id(&queue)).bind(app.tenant)
    .execute(&mut db).await.unwrap();

    let response = app
        .request(Method::DELETE, "/api/v1/mq/queues/orders")
        .send()
        .await
        .unwrap();
    assert_eq!(response.status(), 204);
    assert!(response.text().await.unwrap().is_empty());

    let (status, error) = get_queue(&app, "orders").await;
    assert_error(status, &error, 404, "MQ_QUEUE_NOT_FOUND");
    let id = queue_id(&queue).to_string();
    let leftover: Vec<String> = app
        .redis
        .keys()
        .await
        .into_iter()
        .filter(|k| k.contains(&id) && !k.ends_with(":deleted"))
        .collect();
    assert!(
        leftover.is_empty(),
        "redis keys left beside the tombstones: {leftover:?}"
    );
    let counts: (i64, i64) = sqlx::query_as(
        "SELECT (SELECT count(*) FROM message_subscriptions WHERE topic_id = $1), \
                (SELECT count(*) FROM message_records WHERE topic_id = $1)",
    )
    .bind(queue_id(&queue))
    .fetch_one(&mut db)
    .await
    .unwrap();
    assert_eq!(counts, (0, 0));
    let (_, kept) = get_queue(&app, "keep").await;
    assert_eq!(
        kept["stats"]["messageCount"], 1,
        "other queues are untouched"
    );

    let response = app
        .request(Method::DELETE, "/api/v1/mq/queues/orders")
        .send()
        .await
        .unwrap();
    let (status, error) = read(response).await;
    assert_error(status, &error, 404, "MQ_QUEUE_NOT_FOUND");
}

#[tokio::test]
async fn redis_data_of_the_earlier_key_layout_is_moved_at_start() {
    // The earlier layout could only run on a single Redis (it renames across hash slots).
    let app = TestApp::spawn_with(common::single_redis).await;
    let queue = app
        .create_queue(json!({"name": "old", "partitionCount": 2}))
        .await;
    let subscription = app.subscribe_pull("old", "g").await;
    // What an earlier release wrote: one hash tag per partition.
    let id = queue_id(&queue);
    let old_stream = format!("{}{{{id}.1}}:stream", app.redis.prefix);
    let envelope = json!({"messageId": "before-upgrade", "tenantId": app.tenant.to_string(),
        "headers": {}, "contentType": "application/json", "publishedAt": 1,
        "expiresAt": 4_102_444_800_000i64, "payload": "kept"});
    let new_stream = mq::broker::keys::KeyLayout::new(&app.redis.prefix)
        .partition(id, 1)
        .stream;
    let mut redis = app.redis.connection().await;
    // As if this release had never run: partition 1's data is all in the old layout.
    let _: () = deadpool_redis::redis::cmd("DEL")
        .arg(&new_stream)
        .query_async(&mut redis)
        .await
        .unwrap();
    let _: String = deadpool_redis::redis::cmd("XGROUP")
        .arg("CREATE")
        .arg(&old_stream)
        .arg("g")
        .arg("0")
        .arg("MKSTREAM")
        .query_async(&mut redis)
        .await
        .unwrap();
    let _: String = deadpool_redis::redis::cmd("XADD")
        .arg(&old_stream)
        .arg("*")
        .arg("e")
        .arg(envelope.to_string())
        .query_async(&mut redis)
        .await
        .unwrap();
    let _: () = deadpool_redis::redis::cmd("DEL")
        .arg(format!("{}layout", app.redis.prefix))
        .query_async(&mut redis)
        .await
        .unwrap();

    // The next instance to start moves it.
    let upgraded = app.spawn_sibling().await;
    let pulled = common::pull_until(
        &upgraded,
        &subscription,
        1,
        std::time::Duration::from_secs(10),
    )
    .await;
    assert_eq!(
        pulled.len(),
        1,
        "the message stored before the upgrade is delivered"
    );
    assert_eq!(pulled[0]["payload"], "kept");
    assert_eq!(pulled[0]["partition"], 1);
    let exists: i64 = deadpool_redis::redis::cmd("EXISTS")
        .arg(&old_stream)
        .query_async(&mut redis)
        .await
        .unwrap();
    assert_eq!(exists, 0, "the old key is gone");
}
