//! Resources stay bounded whoever calls: metric series, scrape work, per-tenant quotas,
//! filter and handler sizes, schema patterns, and the async threads while large payloads
//! are validated, compressed and encrypted.

mod common;

use std::collections::BTreeSet;

use common::{assert_error, TestApp};
use reqwest::Method;
use serde_json::json;

fn samples<'a>(text: &'a str, metric: &str) -> Vec<&'a str> {
    text.lines()
        .filter(|line| {
            line.starts_with(&format!("{metric}{{")) || line.starts_with(&format!("{metric} "))
        })
        .collect()
}

fn label<'a>(line: &'a str, name: &str) -> Option<&'a str> {
    let start = line.find(&format!("{name}=\""))? + name.len() + 2;
    let end = line[start..].find('"')? + start;
    Some(&line[start..end])
}

fn value(line: &str) -> f64 {
    line.rsplit(' ').next().unwrap().parse().unwrap()
}

#[tokio::test]
async fn made_up_methods_share_one_series() {
    let app = TestApp::spawn().await;
    for n in 0..40 {
        let method = Method::from_bytes(format!("INVENTED{n}").as_bytes()).unwrap();
        app.anonymous(method, "/api/v1/mq/health")
            .send()
            .await
            .unwrap();
    }
    let (_, text) = app.get_text("/metrics").await;
    let methods: BTreeSet<&str> = samples(&text, "mq_http_requests_total")
        .into_iter()
        .filter_map(|line| label(line, "method"))
        .collect();
    assert!(methods.contains("other"), "{methods:?}");
    assert!(
        methods.iter().all(|m| ["GET", "other"].contains(m)),
        "{methods:?}"
    );
    let other: f64 = samples(&text, "mq_http_requests_total")
        .into_iter()
        .filter(|line| label(line, "method") == Some("other"))
        .map(value)
        .sum();
    assert_eq!(other, 40.0);
}

#[tokio::test]
async fn a_deleted_queue_frees_its_series() {
    let app = TestApp::spawn_with(|env| {
        env.insert("METRICS_MAX_QUEUE_SERIES".into(), "2".into());
        env.insert("METRICS_GAUGE_INTERVAL_MS".into(), "0".into());
    })
    .await;
    // audit-logs takes one of the two places; "first" the other.
    app.create_queue(json!({"name": "first"})).await;
    app.publish(json!({"queue": "first", "payload": 1})).await;
    let (_, text) = app.get_text("/metrics").await;
    let queues = |text: &str| -> BTreeSet<String> {
        samples(text, "mq_messages_total")
            .into_iter()
            .filter_map(|line| label(line, "queue").map(str::to_owned))
            .collect()
    };
    assert!(queues(&text).contains("first"), "{text}");
    let (status, _) = app
        .call(Method::DELETE, "/api/v1/mq/queues/first", None)
        .await;
    assert_eq!(status, 204);
    app.create_queue(json!({"name": "second"})).await;
    app.publish(json!({"queue": "second", "payload": 1})).await;
    let (_, text) = app.get_text("/metrics").await;
    let names = queues(&text);
    assert!(!names.contains("first"), "{names:?}");
    assert!(
        names.contains("second"),
        "the freed place is reused: {names:?}"
    );
    assert!(!names.contains("_other"), "{names:?}");
}

#[tokio::test]
async fn a_storm_of_scrapes_reads_the_stores_once() {
    let app = TestApp::spawn().await;
    app.create_queue(json!({"name": "q"})).await;
    let mut scrapes = tokio::task::JoinSet::new();
    for _ in 0..50 {
        let (client, url) = (app.client.clone(), app.url("/metrics"));
        scrapes.spawn(async move { client.get(url).send().await.unwrap().status().as_u16() });
    }
    while let Some(status) = scrapes.join_next().await {
        assert_eq!(status.unwrap(), 200);
    }
    let (_, text) = app.get_text("/metrics").await;
    let refreshes = samples(&text, "mq_queue_gauge_refreshes_total")
        .first()
        .map(|line| value(line))
        .unwrap();
    assert_eq!(
        refreshes, 1.0,
        "51 scrapes within the interval, one refresh"
    );
}

#[tokio::test]
async fn tenants_have_quotas_of_queues_and_subscriptions() {
    let app = TestApp::spawn_with(|env| {
        env.insert("TENANT_MAX_QUEUES".into(), "4".into());
        env.insert("TENANT_MAX_SUBSCRIPTIONS".into(), "3".into());
        env.insert("QUEUE_MAX_SUBSCRIPTIONS".into(), "2".into());
    })
    .await;
    // Concurrent creates cannot pass the quota together.
    let mut creates = tokio::task::JoinSet::new();
    for n in 0..10 {
        let request = app
            .request(Method::POST, "/api/v1/mq/queues")
            .json(&json!({ "name": format!("q{n}") }));
        creates.spawn(async move { common::read(request.send().await.unwrap()).await });
    }
    let mut refused = 0;
    while let Some(answer) = creates.join_next().await {
        let (status, body) = answer.unwrap();
        if status == 403 {
            assert_error(status, &body, 403, "MQ_QUOTA_EXCEEDED");
            assert_eq!(body["details"]["quota"], "TENANT_MAX_QUEUES");
            assert_eq!(body["details"]["limit"], 4);
            refused += 1;
        } else {
            assert_eq!(status, 201, "{body}");
        }
    }
    let (_, listed) = app.call(Method::GET, "/api/v1/mq/queues", None).await;
    let names: Vec<&str> = listed["items"]
        .as_array()
        .unwrap()
        .iter()
        .map(|q| q["name"].as_str().unwrap())
        .collect();
    // The service's own audit-logs queue counts, but is never refused.
    assert!(names.contains(&"audit-logs"), "{names:?}");
    assert!(
        (4..=5).contains(&names.len()),
        "no more than the quota (and the service's queue): {names:?}"
    );
    assert!(refused >= 5);
    let (status, body) = app
        .call(
            Method::POST,
            "/api/v1/mq/queues",
            Some(json!({"name": "late"})),
        )
        .await;
    assert_error(status, &body, 403, "MQ_QUOTA_EXCEEDED");
    // Another tenant has a quota of its own.
    let (status, _) = app
        .call_as(
            uuid::Uuid::new_v4(),
            "other",
            Method::POST,
            "/api/v1/mq/queues",
            Some(json!({"name": "q0"})),
        )
        .await;
    assert_eq!(status, 201);

    let ours: Vec<String> = listed["items"]
        .as_array()
        .unwrap()
        .iter()
        .map(|q| q["name"].as_str().unwrap().to_owned())
        .filter(|name| name.starts_with('q'))
        .collect();
    let subscribe = |queue: &str, consumer: &str| {
        app.call(
            Method::POST,
            "/api/v1/mq/subscriptions",
            Some(
                json!({"queue": queue, "consumerGroup": "g", "consumerName": consumer,
                        "subscriptionType": "redis_consumer"}),
            ),
        )
    };
    assert_eq!(subscribe(&ours[0], "a").await.0, 201);
    assert_eq!(subscribe(&ours[0], "b").await.0, 201);
    let (status, body) = subscribe(&ours[0], "c").await;
    assert_error(status, &body, 403, "MQ_QUOTA_EXCEEDED");
    assert_eq!(body["details"]["quota"], "QUEUE_MAX_SUBSCRIPTIONS");
    let (status, third) = subscribe(&ours[1], "c").await;
    assert_eq!(status, 201);
    let (status, body) = subscribe(&ours[1], "d").await;
    assert_error(status, &body, 403, "MQ_QUOTA_EXCEEDED");
    assert_eq!(body["details"]["quota"], "TENANT_MAX_SUBSCRIPTIONS");
    let (status, _) = app
        .call(
            Method::DELETE,
            &format!("/api/v1/mq/subscriptions/{}", third["id"].as_str().unwrap()),
            None,
        )
        .await;
    assert_eq!(status, 204);
    assert_eq!(
        subscribe(&ours[1], "d").await.0,
        201,
        "a freed place is usable"
    );
}

#[tokio::test]
async fn filters_handler_headers_and_schemas_are_bounded() {
    let app = TestApp::spawn().await;
    let (status, body) = app
        .call(
            Method::POST,
            "/api/v1/mq/queues",
            Some(json!({"name": "q", "schemaDefinition": {"pattern": "^(?!admin).*$"}})),
        )
        .await;
    assert_error(status, &body, 400, "MQ_VALIDATION_ERROR");
    assert_eq!(body["details"]["fields"], json!(["schemaDefinition"]));
    assert!(
        body["message"].as_str().unwrap().contains("linear-time"),
        "{body}"
    );
    app.create_queue(json!({"name": "q", "schemaDefinition": {"pattern": "^[a-z]+$"}}))
        .await;
    let (status, body) = app
        .call(
            Method::PUT,
            "/api/v1/mq/queues/q",
            Some(json!({"schemaDefinition": {"pattern": "(a)\\1"}})),
        )
        .await;
    assert_error(status, &body, 400, "MQ_VALIDATION_ERROR");
    // A thousand distinct patterns: refused, naming the schema.
    let patterns: serde_json::Map<String, serde_json::Value> = (0..1000)
        .map(|n| {
            (
                format!("p{n}"),
                json!({"type": "string", "pattern": format!("^x{n}$")}),
            )
        })
        .collect();
    let (status, body) = app
        .call(
            Method::PUT,
            "/api/v1/mq/queues/q",
            Some(json!({"schemaDefinition": {"properties": patterns}})),
        )
        .await;
    assert_error(status, &body, 400, "MQ_VALIDATION_ERROR");
    assert_eq!(body["details"]["fields"], json!(["schemaDefinition"]));
    assert!(
        body["message"]
            .as_str()
            .unwrap()
            .contains("at most 100 patterns"),
        "{body}"
    );

    let subscription = |extra: serde_json::Value| {
        let mut body = json!({"queue": "q", "consumerGroup": "g", "consumerName": "c",
                              "subscriptionType": "webhook",
                              "handlerConfig": {"url": "http://127.0.0.1:9/hook"}});
        for (name, value) in extra.as_object().unwrap() {
            body[name] = value.clone();
        }
        app.call(Method::POST, "/api/v1/mq/subscriptions", Some(body))
    };
    let many: Vec<u32> = (0..101).collect();
    let (status, body) = subscription(json!({"messageFilter": {"key": many}})).await;
    assert_error(status, &body, 400, "MQ_VALIDATION_ERROR");
    assert_eq!(body["details"]["fields"], json!(["messageFilter"]));
    let (status, body) = subscription(json!({"messageFilter": {"key": "k".repeat(20_000)}})).await;
    assert_error(status, &body, 400, "MQ_VALIDATION_ERROR");
    let (status, body) = subscription(json!({"handlerConfig": {
        "url": "http://127.0.0.1:9/hook", "headers": {"X-MQ-Signature": "forged"}}}))
    .await;
    assert_error(status, &body, 400, "MQ_VALIDATION_ERROR");
    assert_eq!(
        body["details"]["fields"],
        json!(["handlerConfig.headers.X-MQ-Signature"])
    );
    let (status, body) = subscription(json!({"handlerConfig": {
        "url": "http://127.0.0.1:9/hook", "headers": {"x-long": "v".repeat(5000)}}}))
    .await;
    assert_error(status, &body, 400, "MQ_VALIDATION_ERROR");
}

#[tokio::test]
async fn a_pull_hands_out_at_most_pull_max_bytes_and_at_least_one_message() {
    let app = TestApp::spawn_with(|env| {
        env.insert("PULL_MAX_BYTES".into(), "100000".into());
    })
    .await;
    app.create_queue(json!({"name": "big", "partitionCount": 1}))
        .await;
    let subscription = app.subscribe_pull("big", "g").await;
    let chunk = "x".repeat(30_000);
    for n in 0..10 {
        let (status, body) = app
            .publish(json!({"queue": "big", "payload": {"n": n, "data": chunk}}))
            .await;
        assert_eq!(status, 201, "{body}");
    }
    // One message larger than the whole budget still comes, alone.
    let (status, body) = app
        .publish(json!({"queue": "big", "payload": {"n": 10, "data": "y".repeat(250_000)}}))
        .await;
    assert_eq!(status, 201, "{body}");

    let mut seen = Vec::new();
    let mut pulls = 0;
    while seen.len() < 11 {
        pulls += 1;
        assert!(pulls <= 20, "every message comes within a few pulls");
        let pulled = app.pull(&subscription, 500, 2_000).await;
        assert!(!pulled.is_empty(), "a pull returns at least one message");
        // Everything but the last message fits the budget: the last may pass it.
        let before_last: usize = pulled[..pulled.len() - 1]
            .iter()
            .map(|m| m["payload"].to_string().len())
            .sum();
        assert!(
            before_last <= 100_000,
            "{} messages, {before_last} bytes before the last: past the budget",
            pulled.len()
        );
        let ack_ids: Vec<&str> = pulled
            .iter()
            .map(|m| m["ackId"].as_str().unwrap())
            .collect();
        assert_eq!(app.ack(&subscription, &ack_ids).await, pulled.len() as u64);
        seen.extend(pulled.iter().map(|m| m["payload"]["n"].as_u64().unwrap()));
    }
    seen.sort_unstable();
    assert_eq!(seen, (0..11).collect::<Vec<u64>>(), "each message once");
    assert!(
        pulls >= 3,
        "the budget split the 10 × 30 KB messages over pulls ({pulls})"
    );
}

#[tokio::test]
async fn a_tenant_with_many_queues_takes_no_more_than_its_share_of_series() {
    let app = TestApp::spawn_with(|env| {
        env.insert("METRICS_MAX_QUEUE_SERIES".into(), "8".into());
        env.insert("METRICS_TENANT_QUEUE_SERIES".into(), "3".into());
    })
    .await;
    let wide = uuid::Uuid::new_v4();
    for n in 0..10 {
        let name = format!("q{n}");
        let (status, body) = app
            .call_as(
                wide,
                "w",
                Method::POST,
                "/api/v1/mq/queues",
                Some(json!({"name": name})),
            )
            .await;
        assert_eq!(status, 201, "{body}");
        let (status, _) = app
            .call_as(
                wide,
                "w",
                Method::POST,
                "/api/v1/mq/publish",
                Some(json!({"queue": name, "payload": n})),
            )
            .await;
        assert_eq!(status, 201);
    }
    // A tenant that comes after still gets series of its own.
    app.create_queue(json!({"name": "mine"})).await;
    let (status, _) = app.publish(json!({"queue": "mine", "payload": 1})).await;
    assert_eq!(status, 201);
    let (_, text) = app.get_text("/metrics").await;
    let queues_of = |tenant: uuid::Uuid| -> BTreeSet<String> {
        samples(&text, "mq_messages_total")
            .into_iter()
            .filter(|line| label(line, "tenant") == Some(tenant.to_string().as_str()))
            .filter_map(|line| label(line, "queue").map(str::to_owned))
            .collect()
    };
    let wide_queues = queues_of(wide);
    assert!(wide_queues.contains("_other"), "{wide_queues:?}");
    assert!(
        wide_queues.len() <= 4,
        "three of its own and its _other: {wide_queues:?}"
    );
    assert!(
        queues_of(app.tenant).contains("mine"),
        "{:?}",
        queues_of(app.tenant)
    );
}

#[tokio::test]
async fn a_tenant_over_its_change_and_monitoring_budgets_gets_429_and_the_others_do_not() {
    let app = TestApp::spawn_with(|env| {
        env.insert("TENANT_CHANGE_RPS".into(), "3".into());
        env.insert("TENANT_MONITORING_RPS".into(), "3".into());
    })
    .await;
    let hostile = uuid::Uuid::new_v4();
    let (status, body) = app
        .call_as(
            hostile,
            "h",
            Method::POST,
            "/api/v1/mq/queues",
            Some(json!({"name": "churn"})),
        )
        .await;
    assert_eq!(status, 201, "{body}");
    let mut refused = 0;
    for n in 0..12 {
        let response = app
            .request_as(hostile, "h", Method::PUT, "/api/v1/mq/queues/churn")
            .json(&json!({"description": format!("change {n}")}))
            .send()
            .await
            .unwrap();
        if response.status().as_u16() == 429 {
            assert_eq!(
                response
                    .headers()
                    .get("retry-after")
                    .and_then(|v| v.to_str().ok()),
                Some("1")
            );
            let (status, body) = common::read(response).await;
            assert_error(status, &body, 429, "MQ_RATE_LIMITED");
            refused += 1;
        } else {
            assert_eq!(response.status().as_u16(), 200);
        }
    }
    assert!(
        refused > 0,
        "a tenant changing its queue in a loop is held back"
    );
    let mut views_refused = 0;
    for _ in 0..12 {
        let (status, _) = app
            .call_as(hostile, "h", Method::GET, "/api/v1/mq/metrics/topics", None)
            .await;
        if status == 429 {
            views_refused += 1;
        }
    }
    assert!(
        views_refused > 0,
        "and so is one reading the views in a loop"
    );
    // Another tenant meanwhile has its whole budget.
    app.create_queue(json!({"name": "mine"})).await;
    let (status, body) = app
        .call(
            Method::PUT,
            "/api/v1/mq/queues/mine",
            Some(json!({"description": "ok"})),
        )
        .await;
    assert_eq!(status, 200, "{body}");
    let (status, _) = app
        .call(Method::GET, "/api/v1/mq/metrics/topics", None)
        .await;
    assert_eq!(status, 200);
}

#[tokio::test]
async fn a_tenants_monitoring_views_are_read_once_per_interval_and_apart_from_others() {
    let app = TestApp::spawn_with(|env| {
        env.insert("MONITORING_CACHE_MS".into(), "60000".into());
    })
    .await;
    app.create_queue(json!({"name": "q"})).await;
    let loads = || {
        app.state
            .monitoring_views
            .loads
            .load(std::sync::atomic::Ordering::Relaxed)
    };
    let before = loads();
    for _ in 0..5 {
        let (status, body) = app
            .call(Method::GET, "/api/v1/mq/metrics/topics", None)
            .await;
        assert_eq!(status, 200);
        assert_eq!(
            body["topics"].as_array().unwrap().len(),
            2,
            "q and audit-logs: {body}"
        );
    }
    assert_eq!(loads() - before, 1, "five reads, one load");
    // Another tenant's view is its own.
    let other = uuid::Uuid::new_v4();
    let (status, body) = app
        .call_as(other, "o", Method::GET, "/api/v1/mq/metrics/topics", None)
        .await;
    assert_eq!(status, 200);
    assert_eq!(
        body["topics"],
        json!([]),
        "nothing of the first tenant: {body}"
    );
    assert_eq!(loads() - before, 2);
}

#[tokio::test]
async fn a_tenant_over_its_byte_quota_is_refused_until_purge_or_retention_frees_room() {
    let app = TestApp::spawn_with(|env| {
        env.insert("TENANT_MAX_BYTES".into(), "4000".into());
        env.insert("RETENTION_INTERVAL_MS".into(), "200".into());
    })
    .await;
    // A 1 000-character string is 1 002 bytes of JSON: three fit in 4 000, a fourth does not.
    let message = |queue: &str| json!({"queue": queue, "payload": "x".repeat(1000)});
    for queue in ["kept", "aging"] {
        let (status, body) = app
            .call(
                Method::POST,
                "/api/v1/mq/queues",
                Some(json!({"name": queue, "retentionMs": if queue == "aging" { 1000 } else { 86_400_000 }})),
            )
            .await;
        assert_eq!(status, 201, "{body}");
    }
    for n in 0..3 {
        let (status, body) = app
            .publish(message(if n == 0 { "aging" } else { "kept" }))
            .await;
        assert_eq!(status, 201, "{body}");
    }
    let (status, body) = app.publish(message("kept")).await;
    assert_error(status, &body, 403, "MQ_QUOTA_EXCEEDED");
    assert_eq!(body["details"]["quota"], "TENANT_MAX_BYTES");
    assert_eq!(body["details"]["limit"], 4000);
    // The tenant's audit log (written by the service) does not count.
    assert_eq!(body["details"]["stored"], 3006);

    // Another tenant's room is its own.
    let other = uuid::Uuid::new_v4();
    let (status, _) = app
        .call_as(
            other,
            "o",
            Method::POST,
            "/api/v1/mq/queues",
            Some(json!({"name": "kept"})),
        )
        .await;
    assert_eq!(status, 201);
    for _ in 0..3 {
        let (status, body) = app
            .call_as(
                other,
                "o",
                Method::POST,
                "/api/v1/mq/publish",
                Some(message("kept")),
            )
            .await;
        assert_eq!(status, 201, "{body}");
    }

    // Retention removes the aging message: its bytes are free again.
    assert!(
        common::eventually(std::time::Duration::from_secs(15), || async {
            app.publish(message("kept")).await.0 == 201
        })
        .await,
        "room after retention removed a message"
    );
    let (status, body) = app.publish(message("kept")).await;
    assert_error(status, &body, 403, "MQ_QUOTA_EXCEEDED");

    // Purging frees the rest.
    let (status, body) = app
        .call(Method::POST, "/api/v1/mq/queues/kept/purge", None)
        .await;
    assert_eq!(status, 200, "{body}");
    assert!(
        common::eventually(std::time::Duration::from_secs(5), || async {
            app.publish(message("kept")).await.0 == 201
        })
        .await,
        "room after the purge"
    );

    // A delayed message counts while it waits; cancelling it frees its bytes.
    let (status, body) = app
        .call(Method::POST, "/api/v1/mq/queues/kept/purge", None)
        .await;
    assert_eq!(status, 200, "{body}");
    for n in 0..3 {
        let mut delayed = message("kept");
        delayed["delayMs"] = json!(60_000);
        delayed["messageId"] = json!(format!("later-{n}"));
        let (status, body) = app.publish(delayed).await;
        assert_eq!(status, 201, "{body}");
    }
    assert!(
        common::eventually(std::time::Duration::from_secs(5), || async {
            app.publish(message("kept")).await.0 == 403
        })
        .await,
        "three waiting messages fill the quota"
    );
    let (status, body) = app
        .call(
            Method::DELETE,
            "/api/v1/mq/messages/later-0?queue=kept",
            None,
        )
        .await;
    assert_eq!(status, 204, "{body}");
    assert!(
        common::eventually(std::time::Duration::from_secs(5), || async {
            app.publish(message("kept")).await.0 == 201
        })
        .await,
        "room after the cancellation"
    );
}
