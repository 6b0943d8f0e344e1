//! Delivery never stalls: each wait is ended by the event that gives it work, and a deleted or
//! revoked consumer stops at once (issue "Delivery never stalls").
//!
//! Each bound below sits far under the slow safety look the waiting side would otherwise
//! take (a webhook task looks on its own every 300 s, a long poll takes again every 5 s, the
//! reclaimer looks every 30 s): meeting it shows the wake-up. The bounds are not speed
//! targets; they leave a loaded machine seconds of slack.

mod common;

use std::time::{Duration, Instant};

use common::proxy::TcpProxy;
use common::receiver::{Receiver, Reply};
use common::{assert_error, eventually, queue_id, redis_url, TestApp};
use deadpool_redis::redis;
use mq::broker::consume::{Outcome, Settlement};
use reqwest::Method;
use serde_json::{json, Value};
use uuid::Uuid;

/// Well under the long poll's 5 s look, with slack for a loaded machine.
const WOKEN_WITHIN: Duration = Duration::from_millis(2500);

/// The consumer groups of one partition stream of `queue`, the recorder's aside.
async fn groups_on(app: &TestApp, queue: &Value, partition: u16) -> Vec<String> {
    let keys =
        mq::broker::keys::KeyLayout::new(&app.redis.prefix).partition(queue_id(queue), partition);
    let mut redis = app.redis.connection().await;
    let groups: redis::RedisResult<Vec<redis::Value>> = redis::cmd("XINFO")
        .arg("GROUPS")
        .arg(&keys.stream)
        .query_async(&mut redis)
        .await;
    let mut names: Vec<String> = groups
        .unwrap_or_default()
        .into_iter()
        .filter_map(|group| {
            let fields: Vec<(String, redis::Value)> =
                redis::FromRedisValue::from_redis_value(&group).ok()?;
            fields
                .into_iter()
                .find(|(name, _)| name == "name")
                .and_then(|(_, value)| redis::FromRedisValue::from_redis_value(&value).ok())
        })
        .filter(|name: &String| !name.starts_with("__"))
        .collect();
    names.sort();
    names
}

async fn pull_request(app: &TestApp, subscription: &str, max: u32, wait_ms: u32) -> (u16, Value) {
    app.call(
        Method::POST,
        &format!("/api/v1/mq/subscriptions/{subscription}/pull"),
        Some(json!({"maxMessages": max, "waitMs": wait_ms})),
    )
    .await
}

#[tokio::test]
async fn a_webhook_whose_take_was_all_filtered_out_looks_again_at_once() {
    let app = TestApp::spawn().await;
    // (concurrency, non-matching messages before the matching one)
    for (round, (concurrency, unwanted)) in [(1, 1), (5, 6)].into_iter().enumerate() {
        let receiver = Receiver::start(Reply::Status(200)).await;
        let queue = format!("q{round}");
        app.create_queue(json!({"name": queue, "partitionCount": 1}))
            .await;
        app.subscribe(json!({"queue": queue, "consumerGroup": "g", "consumerName": "g-1",
                             "subscriptionType": "webhook",
                             "messageFilter": {"headers.kind": "wanted"},
                             "handlerConfig": {"url": receiver.url("/"), "concurrency": concurrency}}))
            .await;
        // Let the serving task start and find the queue empty.
        tokio::time::sleep(Duration::from_millis(500)).await;
        let mut messages: Vec<Value> = (0..unwanted)
            .map(|n| json!({"payload": {"n": n}, "headers": {"kind": "other"}}))
            .collect();
        messages.push(json!({"payload": {"n": "match"}, "headers": {"kind": "wanted"}}));
        let (status, body) = app
            .call(
                Method::POST,
                "/api/v1/mq/publish/batch",
                Some(json!({"queue": queue, "messages": messages})),
            )
            .await;
        assert_eq!(status, 201, "{body}");
        assert!(
            eventually(WOKEN_WITHIN, || async { !receiver.delivered().is_empty() }).await,
            "concurrency {concurrency}: the matching message behind {unwanted} filtered ones was pushed"
        );
        assert_eq!(receiver.delivered()[0].json["payload"]["n"], "match");
    }
}

#[tokio::test]
async fn deleting_a_subscription_under_a_long_poll_ends_the_poll_and_leaves_no_group() {
    let app = TestApp::spawn().await;
    let queue = app
        .create_queue(json!({"name": "q", "partitionCount": 1, "maxLength": 10}))
        .await;
    let doomed = app.subscribe_pull("q", "doomed").await;
    let reader = app.subscribe_pull("q", "reader").await;
    assert_eq!(groups_on(&app, &queue, 0).await, vec!["doomed", "reader"]);

    let poll = async {
        let result = pull_request(&app, &doomed, 10, 15_000).await;
        (result, Instant::now())
    };
    let delete = async {
        tokio::time::sleep(Duration::from_millis(300)).await;
        let (status, body) = app
            .call(
                Method::DELETE,
                &format!("/api/v1/mq/subscriptions/{doomed}"),
                None,
            )
            .await;
        assert_eq!(status, 204, "{body}");
        Instant::now()
    };
    let (((status, body), answered_at), deleted_at) = tokio::join!(poll, delete);
    assert_error(status, &body, 404, "MQ_SUBSCRIPTION_NOT_FOUND");
    assert!(
        answered_at.saturating_duration_since(deleted_at) < WOKEN_WITHIN,
        "the poll ended with the subscription, not at the end of its wait"
    );

    // The other group reads everything as it comes: nothing of the deleted one holds the
    // queue back.
    for n in 0..15 {
        let (status, body) = app.publish(json!({"queue": "q", "payload": n})).await;
        assert_eq!(status, 201, "publish {n} after the delete: {body}");
        let pulled = app.pull(&reader, 1, 5_000).await;
        assert_eq!(pulled.len(), 1);
        let ack_id = pulled[0]["ackId"].as_str().unwrap();
        assert_eq!(app.ack(&reader, &[ack_id]).await, 1);
    }
    assert_eq!(
        groups_on(&app, &queue, 0).await,
        vec!["reader"],
        "no group of the deleted subscription is left, or made again"
    );
}

#[tokio::test]
async fn a_long_poll_begun_on_a_paused_queue_is_served_once_the_queue_resumes() {
    let app = TestApp::spawn().await;
    app.create_queue(json!({"name": "q", "status": "paused"}))
        .await;
    let subscription = app.subscribe_pull("q", "g").await;
    let poll = async {
        let messages = app.pull(&subscription, 1, 15_000).await;
        (messages, Instant::now())
    };
    let resume_and_publish = async {
        tokio::time::sleep(Duration::from_millis(300)).await;
        let (status, body) = app
            .call(
                Method::PUT,
                "/api/v1/mq/queues/q",
                Some(json!({"status": "active"})),
            )
            .await;
        assert_eq!(status, 200, "{body}");
        let (status, _) = app.publish(json!({"queue": "q", "payload": "go"})).await;
        assert_eq!(status, 201);
        Instant::now()
    };
    let ((messages, received_at), published_at) = tokio::join!(poll, resume_and_publish);
    assert_eq!(messages.len(), 1, "the poll got the message");
    assert_eq!(messages[0]["payload"], "go");
    assert!(received_at.saturating_duration_since(published_at) < WOKEN_WITHIN);
}

#[tokio::test]
async fn a_guest_long_poll_on_another_instance_stops_when_the_queue_turns_private() {
    let owner = TestApp::spawn().await;
    let sibling = owner.spawn_sibling().await;
    owner
        .create_queue(json!({"name": "shared", "isPublic": true}))
        .await;
    let guest = Uuid::new_v4();
    let (status, subscription) = sibling
        .call_as(
            guest,
            "g",
            Method::POST,
            "/api/v1/mq/subscriptions",
            Some(json!({"queue": "shared", "queueTenantId": owner.tenant,
                        "consumerGroup": "guests", "consumerName": "c",
                        "subscriptionType": "redis_consumer"})),
        )
        .await;
    assert_eq!(status, 201, "{subscription}");
    let path = format!(
        "/api/v1/mq/subscriptions/{}/pull",
        subscription["id"].as_str().unwrap()
    );

    let poll = async {
        let answer = sibling
            .call_as(
                guest,
                "g",
                Method::POST,
                &path,
                Some(json!({"maxMessages": 10, "waitMs": 15_000})),
            )
            .await;
        (answer, Instant::now())
    };
    let revoke = async {
        tokio::time::sleep(Duration::from_millis(300)).await;
        let (status, body) = owner
            .call(
                Method::PUT,
                "/api/v1/mq/queues/shared",
                Some(json!({"isPublic": false})),
            )
            .await;
        assert_eq!(status, 200, "{body}");
        let revoked_at = Instant::now();
        tokio::time::sleep(Duration::from_secs(3)).await;
        let (status, _) = owner
            .publish(json!({"queue": "shared", "payload": "private now"}))
            .await;
        assert_eq!(status, 201);
        revoked_at
    };
    let (((status, body), answered_at), revoked_at) = tokio::join!(poll, revoke);
    assert_error(status, &body, 403, "MQ_FORBIDDEN");
    assert!(
        answered_at.saturating_duration_since(revoked_at) < WOKEN_WITHIN,
        "the guest's poll ended when the queue turned private"
    );
}

/// Pulls and nacks whatever comes until nothing does for `quiet`; how many deliveries.
async fn nack_everything(app: &TestApp, subscription: &str, quiet: u32) -> usize {
    let mut deliveries = 0;
    loop {
        let pulled = app.pull(subscription, 10, quiet).await;
        if pulled.is_empty() {
            return deliveries;
        }
        deliveries += pulled.len();
        let ack_ids: Vec<&str> = pulled
            .iter()
            .map(|m| m["ackId"].as_str().unwrap())
            .collect();
        let (status, body) = app
            .call(
                Method::POST,
                &format!("/api/v1/mq/subscriptions/{subscription}/nack"),
                Some(json!({ "ackIds": ack_ids })),
            )
            .await;
        assert_eq!(status, 200, "{body}");
        assert!(deliveries < 50, "redelivered without end");
    }
}

#[tokio::test]
async fn a_message_its_dead_letter_queue_refuses_is_set_aside_once() {
    let app = TestApp::spawn().await;
    let many_headers: serde_json::Map<String, Value> =
        (0..64).map(|n| (format!("h{n}"), json!("v"))).collect();
    // The dead-letter queue's schema refuses the message; or the dead-letter headers would
    // take the message past the header limit.
    let cases = [
        (
            "schema",
            json!({"queue": "schema", "payload": "not an integer"}),
        ),
        (
            "headers",
            json!({"queue": "headers", "payload": 1, "headers": many_headers}),
        ),
    ];
    for (name, message) in cases {
        app.create_queue(json!({"name": name})).await;
        app.create_queue(
            json!({"name": format!("{name}-dlq"), "schemaDefinition": {"type": "integer"}}),
        )
        .await;
        let subscription = app
            .subscribe(
                json!({"queue": name, "consumerGroup": "g", "consumerName": "c",
                              "subscriptionType": "redis_consumer",
                              "deadLetterQueue": format!("{name}-dlq"),
                              "maxRetryAttempts": 1, "retryDelayMs": 1}),
            )
            .await;
        let subscription = subscription["id"].as_str().unwrap().to_owned();
        let (status, body) = app.publish(message).await;
        assert_eq!(status, 201, "{name}: {body}");

        let deliveries = nack_everything(&app, &subscription, 2_000).await;
        assert_eq!(
            deliveries, 2,
            "{name}: delivered once and retried once, then set aside"
        );
        assert!(
            eventually(Duration::from_secs(10), || async {
                common::subscription_stats(&app, &subscription).await["setAside"] == 1
            })
            .await,
            "{name}: the refusal shows in the subscription's stats"
        );
        let stats = common::subscription_stats(&app, &subscription).await;
        assert_eq!(stats["deadLettered"], 0, "{name}: {stats}");
        let (_, dlq) = app
            .call(Method::GET, &format!("/api/v1/mq/queues/{name}-dlq"), None)
            .await;
        assert_eq!(
            dlq["stats"]["messageCount"], 0,
            "{name}: nothing reached the dead-letter queue"
        );
    }
    let mut database = app.database.connect().await;
    let set_aside: Vec<(String,)> = sqlx::query_as(
        "SELECT error FROM record_quarantine WHERE source = 'dead_letter' ORDER BY id",
    )
    .fetch_all(&mut database)
    .await
    .expect("quarantine rows");
    assert_eq!(set_aside.len(), 2, "each refused message set aside once");
    assert!(
        set_aside.iter().all(|(error,)| error.contains("refused")),
        "{set_aside:?}"
    );
    let (_, metrics) = app.get_text("/metrics").await;
    assert!(
        metrics
            .lines()
            .any(|line| line.contains("event=\"set_aside\"") && !line.ends_with(" 0")),
        "the refusals are counted in a metric"
    );
}

#[tokio::test]
async fn overdue_deliveries_of_queues_due_together_are_all_reclaimed_at_once() {
    let app = TestApp::spawn().await;
    let mut subscriptions = Vec::new();
    for n in 0..8 {
        let name = format!("q{n}");
        app.create_queue(json!({"name": name})).await;
        let subscription = app
            .subscribe(
                json!({"queue": name, "consumerGroup": "g", "consumerName": "c",
                              "subscriptionType": "redis_consumer", "sessionTimeoutMs": 1000,
                              "retryDelayMs": 1, "offsetResetPolicy": "earliest"}),
            )
            .await;
        let (status, _) = app.publish(json!({"queue": name, "payload": n})).await;
        assert_eq!(status, 201);
        subscriptions.push(subscription["id"].as_str().unwrap().to_owned());
    }
    // Taken together, never acked: their deadlines pass within one reclaimer pass.
    let started = Instant::now();
    let taken = futures_util::future::join_all(
        subscriptions
            .iter()
            .map(|subscription| app.pull(subscription, 1, 2_000)),
    )
    .await;
    assert!(taken.iter().all(|pulled| pulled.len() == 1));
    let again = futures_util::future::join_all(
        subscriptions
            .iter()
            .map(|subscription| app.pull(subscription, 1, 20_000)),
    )
    .await;
    for (n, pulled) in again.iter().enumerate() {
        assert_eq!(pulled.len(), 1, "queue q{n}: redelivered");
        assert_eq!(pulled[0]["deliveryAttempt"], 2, "{}", pulled[0]);
    }
    assert!(
        started.elapsed() < Duration::from_secs(12),
        "every queue was reclaimed after its deadline, none left to the 30 s look ({:?})",
        started.elapsed()
    );
}

#[tokio::test]
async fn a_webhook_waiting_for_its_tenants_permit_is_woken_when_one_is_freed() {
    let app = TestApp::spawn_with(|env| {
        env.insert("WEBHOOK_TENANT_CONCURRENCY".into(), "1".into());
    })
    .await;
    let slow = Receiver::start(Reply::SlowOk(Duration::from_millis(1500))).await;
    let quick = Receiver::start(Reply::Status(200)).await;
    for (queue, receiver) in [("slow", &slow), ("quick", &quick)] {
        app.create_queue(json!({"name": queue})).await;
        app.subscribe(
            json!({"queue": queue, "consumerGroup": "g", "consumerName": "c",
                             "subscriptionType": "webhook",
                             "handlerConfig": {"url": receiver.url("/")}}),
        )
        .await;
    }
    tokio::time::sleep(Duration::from_millis(500)).await;
    let (status, _) = app.publish(json!({"queue": "slow", "payload": 1})).await;
    assert_eq!(status, 201);
    assert!(
        eventually(Duration::from_secs(5), || async {
            !slow.received().is_empty()
        })
        .await,
        "the slow push holds the tenant's one permit"
    );
    let (status, _) = app.publish(json!({"queue": "quick", "payload": 2})).await;
    assert_eq!(status, 201);
    let published_at = Instant::now();
    assert!(
        eventually(Duration::from_millis(1500) + WOKEN_WITHIN, || async {
            !quick.delivered().is_empty()
        })
        .await,
        "the second subscription pushed once the permit was freed ({:?})",
        published_at.elapsed()
    );
}

#[tokio::test]
async fn an_ack_on_one_instance_wakes_an_in_order_webhook_held_back_on_another() {
    let acker = TestApp::spawn().await;
    let server = acker.spawn_sibling().await;
    // Only the sibling pushes.
    acker.stop_workers().await;
    let receiver = Receiver::start(Reply::Status(200)).await;
    let queue = acker
        .create_queue(json!({"name": "q", "partitionCount": 1, "status": "paused"}))
        .await;
    let created = acker
        .subscribe(
            json!({"queue": "q", "consumerGroup": "g", "consumerName": "c",
                          "subscriptionType": "webhook", "offsetResetPolicy": "earliest",
                          "handlerConfig": {"url": receiver.url("/"), "concurrency": 1}}),
        )
        .await;
    for n in 1..=2 {
        let (status, _) = acker.publish(json!({"queue": "q", "payload": n})).await;
        assert_eq!(status, 201);
    }
    let subscription = acker
        .state
        .store
        .find_subscription(
            acker.tenant,
            created["id"].as_str().unwrap().parse().unwrap(),
        )
        .await
        .unwrap()
        .unwrap();
    // A consumer on the first instance holds the first message.
    let now = chrono::Utc::now().timestamp_millis();
    let taken = acker
        .state
        .broker
        .take(
            queue_id(&queue),
            1,
            0,
            &subscription.delivery_group,
            "held",
            mq::broker::consume::TakeLimit {
                count: 1,
                bytes: 1 << 20,
                entry_most: 1 << 20,
            },
            now,
            now + 60_000,
            true,
        )
        .await
        .unwrap();
    assert_eq!(taken.deliveries.len(), 1);
    // The sibling's serving task finds the partition held and waits.
    let (status, _) = acker
        .call(
            Method::PUT,
            "/api/v1/mq/queues/q",
            Some(json!({"status": "active"})),
        )
        .await;
    assert_eq!(status, 200);
    tokio::time::sleep(Duration::from_secs(1)).await;
    assert!(
        receiver.received().is_empty(),
        "held back behind the first message"
    );

    let resolved = mq::service::queues::resolve(&acker.state, acker.tenant, "q")
        .await
        .unwrap();
    let delivery = &taken.deliveries[0];
    let settlement = Settlement {
        group: &subscription.delivery_group,
        partition: 0,
        entry_id: &delivery.entry_id,
        outcome: Outcome::Acked,
        expected_deadline: Some(&delivery.deadline),
        expected_attempt: None,
        message_id: "m1",
        subscription_id: subscription.id,
        processing_ms: Some(1),
        error: None,
        now_ms: chrono::Utc::now().timestamp_millis(),
        published_at_ms: None,
    };
    let applied =
        mq::service::consume::settle(&acker.state, &subscription, &resolved.queue, &[settlement])
            .await
            .unwrap();
    assert_eq!(applied, vec![true]);
    assert!(
        eventually(WOKEN_WITHIN, || async { !receiver.delivered().is_empty() }).await,
        "the sibling pushed the next message once the first was acked elsewhere"
    );
    assert_eq!(receiver.delivered()[0].json["payload"], 2);
    drop(server);
}

#[tokio::test]
async fn deleting_a_queue_clears_its_timers_and_state_on_every_instance() {
    let app = TestApp::spawn().await;
    let sibling = app.spawn_sibling().await;
    let queue = app.create_queue(json!({"name": "q"})).await;
    let id = queue_id(&queue);
    let subscription = app.subscribe_pull("q", "g").await;
    let (status, _) = app
        .publish(json!({"queue": "q", "payload": "later", "delayMs": 600_000}))
        .await;
    assert_eq!(status, 201);
    let (status, _) = app.publish(json!({"queue": "q", "payload": "now"})).await;
    assert_eq!(status, 201);
    let pulled = app.pull(&subscription, 1, 5_000).await;
    let (status, _) = app
        .call(
            Method::POST,
            &format!("/api/v1/mq/subscriptions/{subscription}/nack"),
            Some(json!({"ackIds": [pulled[0]["ackId"]], "delayMs": 600_000})),
        )
        .await;
    assert_eq!(status, 200);
    // The other instance heard of the delayed message and of the retry.
    assert!(
        eventually(Duration::from_secs(5), || async {
            sibling.state.scheduler.timers.len() == 1 && sibling.state.retry_timers.len() == 1
        })
        .await,
        "the sibling armed its timers for the queue"
    );

    let (status, _) = app.call(Method::DELETE, "/api/v1/mq/queues/q", None).await;
    assert_eq!(status, 204);
    for instance in [&app, &sibling] {
        assert!(
            eventually(Duration::from_secs(2), || async {
                let state = &instance.state;
                state.scheduler.timers.is_empty()
                    && state.retry_timers.is_empty()
                    && state.deadline_timers.is_empty()
                    && !state.activity.contains(id)
            })
            .await,
            "no timer or activity entry of the deleted queue is left"
        );
    }
    let left: Vec<String> = app
        .redis
        .keys()
        .await
        .into_iter()
        .filter(|key| key.contains(&id.to_string()) && !key.ends_with(":deleted"))
        .collect();
    assert!(
        left.is_empty(),
        "nothing of the queue is left in Redis: {left:?}"
    );
}

#[tokio::test]
async fn a_silent_wake_connection_is_noticed_and_replaced() {
    let target = common::url_socket_address(&redis_url(), 6379).await;
    let proxy = TcpProxy::start(target).await;
    let proxied = common::with_authority(&redis_url(), &proxy.address.to_string());
    let publisher = TestApp::spawn_with(common::single_redis).await;
    let consumer = publisher
        .spawn_sibling_with(|env| {
            common::single_redis(env);
            env.insert("REDIS_URL".into(), proxied);
        })
        .await;
    publisher.create_queue(json!({"name": "q"})).await;
    let subscription = publisher.subscribe_pull("q", "g").await;
    assert!(consumer.pull(&subscription, 1, 0).await.is_empty());

    // Every connection of the consumer instance goes half-open: nothing crosses, nothing
    // is closed.
    proxy.freeze();
    // It notices (no heartbeat heard, replies overdue) and connects again.
    assert!(
        eventually(Duration::from_secs(20), || async {
            // A request stuck on a half-open connection counts as a failure, not a hang.
            tokio::time::timeout(
                Duration::from_secs(8),
                pull_request(&consumer, &subscription, 1, 0),
            )
            .await
            .is_ok_and(|(status, _)| status == 200)
        })
        .await,
        "the consumer instance reaches Redis again"
    );

    // Its wake-ups work again: within a few rounds, a publish elsewhere wakes its long poll
    // at once (through a frozen wake connection, it would only be found by the poll's 5 s
    // look, or at the start of the next round).
    let started = Instant::now();
    let mut round = 0;
    loop {
        round += 1;
        // What an earlier round's poll missed is out of the way first.
        let _ = tokio::time::timeout(
            Duration::from_secs(10),
            consumer.pull(&subscription, 100, 0),
        )
        .await;
        let poll = async {
            let messages = tokio::time::timeout(
                Duration::from_secs(20),
                consumer.pull(&subscription, 1, 4_000),
            )
            .await
            .expect("the poll answers");
            (messages, Instant::now())
        };
        let publish = async {
            tokio::time::sleep(Duration::from_millis(300)).await;
            let (status, _) = publisher
                .publish(json!({"queue": "q", "payload": round}))
                .await;
            assert_eq!(status, 201);
            Instant::now()
        };
        let ((messages, received_at), published_at) = tokio::join!(poll, publish);
        if messages.first().is_some_and(|m| m["payload"] == round)
            && received_at.saturating_duration_since(published_at) < WOKEN_WITHIN
        {
            break;
        }
        assert!(
            started.elapsed() < Duration::from_secs(40),
            "the consumer instance's wake-ups never came back ({round} rounds)"
        );
    }
}
