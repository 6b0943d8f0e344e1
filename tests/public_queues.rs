//! Public queues: a guest tenant reads through consumer groups of its own, never interferes
//! with the owner's deliveries or publishing, obeys the queue's consumer rules on every path
//! and instance, and the owner sees and revokes it.

mod common;

use std::time::Duration;

use common::receiver::{Receiver, Reply};
use common::{assert_error, eventually, pull_until, subscription_stats, TestApp};
use reqwest::Method;
use serde_json::{json, Value};
use uuid::Uuid;

const WAIT: Duration = Duration::from_secs(15);
/// How long a queue change may take to reach every instance (the queue cache's freshness).
const PROPAGATION: Duration = Duration::from_millis(2200);

/// A tenant other than the queue's owner, acting as principal `principal`.
struct Guest<'a> {
    app: &'a TestApp,
    tenant: Uuid,
    principal: &'a str,
}

impl Guest<'_> {
    async fn call(&self, method: Method, path: &str, body: Option<Value>) -> (u16, Value) {
        self.app
            .call_as(self.tenant, self.principal, method, path, body)
            .await
    }

    async fn subscribe(&self, queue: &str, extra: Value) -> (u16, Value) {
        let mut body = json!({"queue": queue, "queueTenantId": self.app.tenant,
                              "consumerGroup": "billing", "consumerName": "c",
                              "subscriptionType": "redis_consumer"});
        for (name, value) in extra.as_object().unwrap() {
            body[name] = value.clone();
        }
        self.call(Method::POST, "/api/v1/mq/subscriptions", Some(body))
            .await
    }

    async fn pull(&self, subscription: &str, max: u32) -> (u16, Value) {
        self.call(
            Method::POST,
            &format!("/api/v1/mq/subscriptions/{subscription}/pull"),
            Some(json!({"maxMessages": max, "waitMs": 500})),
        )
        .await
    }
}

fn guest(app: &TestApp) -> Guest<'_> {
    Guest {
        app,
        tenant: Uuid::new_v4(),
        principal: "g",
    }
}

fn id(subscription: &Value) -> String {
    subscription["id"].as_str().expect("id").to_owned()
}

async fn publish_many(app: &TestApp, queue: &str, count: usize) {
    for n in 0..count {
        let (status, body) = app.publish(json!({"queue": queue, "payload": n})).await;
        assert_eq!(status, 201, "{body}");
    }
}

#[tokio::test]
async fn a_guest_using_the_owners_group_name_takes_nothing_from_the_owner() {
    let app = TestApp::spawn().await;
    app.create_queue(json!({"name": "announcements", "isPublic": true}))
        .await;
    let owner = app
        .subscribe(json!({"queue": "announcements", "consumerGroup": "billing",
                          "consumerName": "c", "subscriptionType": "redis_consumer"}))
        .await;
    let guest = guest(&app);
    // The same group and consumer name as the owner's: the guest's own, not a conflict.
    let (status, subscription) = guest
        .subscribe("announcements", json!({"maxRetryAttempts": 0}))
        .await;
    assert_eq!(status, 201, "{subscription}");
    publish_many(&app, "announcements", 10).await;

    // The guest takes every message and fails them all: dead-lettered on its side.
    let (status, pulled) = guest.pull(&id(&subscription), 10).await;
    assert_eq!(status, 200);
    let ack_ids: Vec<Value> = pulled["messages"]
        .as_array()
        .unwrap()
        .iter()
        .map(|m| m["ackId"].clone())
        .collect();
    assert_eq!(ack_ids.len(), 10, "the guest reads every message: {pulled}");
    let (status, nacked) = guest
        .call(
            Method::POST,
            &format!("/api/v1/mq/subscriptions/{}/nack", id(&subscription)),
            Some(json!({ "ackIds": ack_ids })),
        )
        .await;
    assert_eq!((status, nacked["nacked"].clone()), (200, json!(10)));

    // The owner still gets all ten, once, and nothing of theirs was dead-lettered.
    let owner_id = id(&owner);
    let delivered = pull_until(&app, &owner_id, 10, WAIT).await;
    assert_eq!(delivered.len(), 10);
    assert!(delivered.iter().all(|m| m["deliveryAttempt"] == 1));
    let ack_ids: Vec<&str> = delivered
        .iter()
        .map(|m| m["ackId"].as_str().unwrap())
        .collect();
    assert_eq!(app.ack(&owner_id, &ack_ids).await, 10);
    assert!(
        eventually(WAIT, || async {
            subscription_stats(&app, &owner_id).await["acked"] == 10
        })
        .await
    );
    assert_eq!(subscription_stats(&app, &owner_id).await["deadLettered"], 0);
    let (status, _) = app
        .call(Method::GET, "/api/v1/mq/queues/announcements.dlq", None)
        .await;
    assert_eq!(status, 404, "the owner has no dead letters");
    let (status, dlq) = guest
        .call(Method::GET, "/api/v1/mq/queues/announcements.dlq", None)
        .await;
    assert_eq!(
        status, 200,
        "the guest's dead letters are the guest's: {dlq}"
    );
}

#[tokio::test]
async fn a_lagging_guest_never_blocks_the_owners_publishing() {
    let app = TestApp::spawn().await;
    app.create_queue(json!({"name": "feed", "isPublic": true, "maxLength": 5}))
        .await;
    let owner = app.subscribe_pull("feed", "own").await;
    let guest = guest(&app);
    let (status, subscription) = guest.subscribe("feed", json!({})).await;
    assert_eq!(status, 201, "{subscription}");
    let (status, _) = guest
        .call(
            Method::POST,
            &format!("/api/v1/mq/subscriptions/{}/pause", id(&subscription)),
            None,
        )
        .await;
    assert_eq!(status, 200);
    for n in 0..12 {
        let (status, body) = app.publish(json!({"queue": "feed", "payload": n})).await;
        assert_eq!(status, 201, "message {n}: {body}");
        let pulled = pull_until(&app, &owner, 1, WAIT).await;
        assert_eq!(
            app.ack(&owner, &[pulled[0]["ackId"].as_str().unwrap()])
                .await,
            1
        );
    }
    let (_, guest_view) = guest
        .call(
            Method::GET,
            &format!("/api/v1/mq/subscriptions/{}", id(&subscription)),
            None,
        )
        .await;
    assert_eq!(guest_view["stats"]["lag"], 12, "{guest_view}");
    // The owner's own backlog still bounds publishing.
    publish_many(&app, "feed", 5).await;
    let (status, error) = app
        .publish(json!({"queue": "feed", "payload": "sixth"}))
        .await;
    assert_error(status, &error, 429, "MQ_QUEUE_FULL");
}

#[tokio::test]
async fn what_a_group_did_not_read_before_retention_counts_as_expired() {
    let app = TestApp::spawn_with(|env| {
        env.insert("RETENTION_INTERVAL_MS".into(), "200".into());
    })
    .await;
    app.create_queue(json!({"name": "feed", "isPublic": true, "retentionMs": 1000}))
        .await;
    let owner = app.subscribe_pull("feed", "own").await;
    let guest = guest(&app);
    let (status, subscription) = guest.subscribe("feed", json!({})).await;
    assert_eq!(status, 201);
    publish_many(&app, "feed", 6).await;
    let delivered = pull_until(&app, &owner, 6, WAIT).await;
    let ack_ids: Vec<&str> = delivered
        .iter()
        .map(|m| m["ackId"].as_str().unwrap())
        .collect();
    assert_eq!(app.ack(&owner, &ack_ids).await, 6);

    let guest_path = format!("/api/v1/mq/subscriptions/{}", id(&subscription));
    assert!(
        eventually(WAIT, || async {
            guest.call(Method::GET, &guest_path, None).await.1["stats"]["expired"] == 6
        })
        .await,
        "the guest's unread messages were removed by retention and count as expired"
    );
    let stats = guest.call(Method::GET, &guest_path, None).await.1["stats"].clone();
    assert_eq!(stats["lag"], 0, "{stats}");
    let (status, pulled) = guest.pull(&id(&subscription), 10).await;
    assert_eq!(
        (status, pulled["messages"].as_array().unwrap().len()),
        (200, 0)
    );
    let owner_stats = subscription_stats(&app, &owner).await;
    assert_eq!(owner_stats["expired"], 0, "{owner_stats}");
}

#[tokio::test]
async fn making_the_queue_private_stops_a_guests_pushes_and_pulls_on_every_instance() {
    let app = TestApp::spawn().await;
    let sibling = app.spawn_sibling().await;
    let receiver = Receiver::start(Reply::Status(200)).await;
    app.create_queue(json!({"name": "news", "isPublic": true}))
        .await;
    let guest = guest(&app);
    let (status, pusher) = guest
        .subscribe(
            "news",
            json!({"subscriptionType": "webhook", "consumerGroup": "push",
                   "handlerConfig": {"url": receiver.url("/hook")}}),
        )
        .await;
    assert_eq!(status, 201, "{pusher}");
    let (status, puller) = guest.subscribe("news", json!({})).await;
    assert_eq!(status, 201);
    publish_many(&app, "news", 1).await;
    assert!(eventually(WAIT, || async { receiver.delivered().len() == 1 }).await);

    let make = |change: Value| {
        let app = &app;
        async move {
            let (status, body) = app
                .call(Method::PUT, "/api/v1/mq/queues/news", Some(change))
                .await;
            assert_eq!(status, 200, "{body}");
            tokio::time::sleep(PROPAGATION).await;
        }
    };
    let sibling_guest = Guest {
        app: &sibling,
        tenant: guest.tenant,
        principal: guest.principal,
    };
    make(json!({"isPublic": false})).await;
    publish_many(&app, "news", 3).await;
    tokio::time::sleep(Duration::from_secs(2)).await;
    assert_eq!(
        receiver.delivered().len(),
        1,
        "no push after the queue went private"
    );
    for instance in [&guest, &sibling_guest] {
        let (status, error) = instance.pull(&id(&puller), 10).await;
        assert_error(status, &error, 403, "MQ_FORBIDDEN");
    }

    // Public again, but only for the owner's principal "g": the guest's "g" is not it.
    make(json!({"isPublic": true, "allowedConsumers": ["g"]})).await;
    tokio::time::sleep(Duration::from_secs(1)).await;
    assert_eq!(receiver.delivered().len(), 1);
    let (status, error) = sibling_guest.pull(&id(&puller), 10).await;
    assert_error(status, &error, 403, "MQ_FORBIDDEN");

    // Listed by tenant: the guest reads again, from where it stopped.
    make(json!({"allowedConsumers": [format!("{}:g", guest.tenant)]})).await;
    assert!(eventually(WAIT, || async { receiver.delivered().len() == 4 }).await);
    let (status, pulled) = sibling_guest.pull(&id(&puller), 10).await;
    assert_eq!(status, 200);
    assert_eq!(pulled["messages"].as_array().unwrap().len(), 4);
}

#[tokio::test]
async fn guests_are_admitted_by_tenant_qualified_consumer_entries() {
    let app = TestApp::spawn().await;
    let guest = guest(&app);
    for (name, allowed, expected) in [
        ("plain", json!(["g"]), 403),
        ("exact", json!([format!("{}:g", guest.tenant)]), 201),
        ("any", json!([format!("{}:*", guest.tenant)]), 201),
        ("other", json!([format!("{}:g", Uuid::new_v4())]), 403),
    ] {
        app.create_queue(json!({"name": name, "isPublic": true, "allowedConsumers": allowed}))
            .await;
        let (status, body) = guest.subscribe(name, json!({})).await;
        assert_eq!(status, expected, "{name}: {body}");
    }
}

#[tokio::test]
async fn the_owner_sees_and_revokes_its_guests() {
    let app = TestApp::spawn().await;
    app.create_queue(json!({"name": "news", "isPublic": true}))
        .await;
    let owner = app.subscribe_pull("news", "own").await;
    let guest = guest(&app);
    let (_, subscription) = guest.subscribe("news", json!({})).await;
    publish_many(&app, "news", 3).await;

    let (status, listed) = app
        .call(Method::GET, "/api/v1/mq/queues/news/subscribers", None)
        .await;
    assert_eq!(status, 200, "{listed}");
    assert_eq!(listed["total"], 2);
    let items = listed["items"].as_array().unwrap();
    let guest_item = items
        .iter()
        .find(|item| item["subscriptionId"] == subscription["id"])
        .expect("the guest is listed");
    assert_eq!(guest_item["guest"], true);
    assert_eq!(guest_item["tenantId"], guest.tenant.to_string());
    assert_eq!(guest_item["consumerGroup"], "billing");
    assert_eq!(guest_item["lag"], 3);
    let own_item = items
        .iter()
        .find(|item| item["subscriptionId"] == owner.as_str())
        .expect("the owner's own subscription is listed");
    assert_eq!(own_item["guest"], false);

    // Nobody else sees or revokes them.
    let (status, error) = guest
        .call(Method::GET, "/api/v1/mq/queues/news/subscribers", None)
        .await;
    assert_error(status, &error, 404, "MQ_QUEUE_NOT_FOUND");
    let revoke = format!("/api/v1/mq/queues/news/subscribers/{}", id(&subscription));
    let (status, error) = guest.call(Method::DELETE, &revoke, None).await;
    assert_error(status, &error, 404, "MQ_QUEUE_NOT_FOUND");

    let (status, _) = app.call(Method::DELETE, &revoke, None).await;
    assert_eq!(status, 204);
    let (status, error) = guest
        .call(
            Method::GET,
            &format!("/api/v1/mq/subscriptions/{}", id(&subscription)),
            None,
        )
        .await;
    assert_error(status, &error, 404, "MQ_SUBSCRIPTION_NOT_FOUND");
    let (status, error) = app.call(Method::DELETE, &revoke, None).await;
    assert_error(status, &error, 404, "MQ_SUBSCRIPTION_NOT_FOUND");
    let (_, listed) = app
        .call(Method::GET, "/api/v1/mq/queues/news/subscribers", None)
        .await;
    assert_eq!(listed["total"], 1);
    // The guest's consumer group went with it.
    let queue = app
        .call(Method::GET, "/api/v1/mq/queues/news", None)
        .await
        .1;
    let keys =
        mq::broker::keys::KeyLayout::new(&app.redis.prefix).partition(common::queue_id(&queue), 0);
    let mut redis = app.redis.connection().await;
    let groups: Vec<Vec<deadpool_redis::redis::Value>> = deadpool_redis::redis::cmd("XINFO")
        .arg("GROUPS")
        .arg(&keys.stream)
        .query_async(&mut redis)
        .await
        .unwrap();
    assert_eq!(
        groups.len(),
        2,
        "the owner's group and the recorder's remain"
    );
}

#[tokio::test]
async fn a_guests_outcomes_are_its_own_and_never_touch_the_owners_records_or_figures() {
    let app = TestApp::spawn().await;
    app.create_queue(json!({"name": "shared", "isPublic": true}))
        .await;
    let own = app.subscribe_pull("shared", "owners").await;
    let guest = guest(&app);
    let (status, subscription) = guest
        .subscribe("shared", json!({"offsetResetPolicy": "earliest"}))
        .await;
    assert_eq!(status, 201, "{subscription}");
    let guest_subscription = subscription["id"].as_str().unwrap().to_owned();
    let (status, published) = app.publish(json!({"queue": "shared", "payload": 1})).await;
    assert_eq!(status, 201);
    let message_id = published["messageId"].as_str().unwrap().to_owned();

    // The guest fails the message once; the owner acks it.
    let (status, pulled) = guest.pull(&guest_subscription, 1).await;
    assert_eq!(status, 200, "{pulled}");
    let (status, body) = guest
        .call(
            Method::POST,
            &format!("/api/v1/mq/subscriptions/{guest_subscription}/nack"),
            Some(json!({"ackIds": [pulled["messages"][0]["ackId"]], "delayMs": 600000})),
        )
        .await;
    assert_eq!((status, body["nacked"].clone()), (200, json!(1)), "{body}");
    let mine = app.pull(&own, 1, 5_000).await;
    assert_eq!(
        app.ack(&own, &[mine[0]["ackId"].as_str().unwrap()]).await,
        1
    );

    // The guest's subscription counts its failure.
    let (_, guest_view) = guest
        .call(
            Method::GET,
            &format!("/api/v1/mq/subscriptions/{guest_subscription}"),
            None,
        )
        .await;
    assert!(
        eventually(WAIT, || async {
            guest
                .call(
                    Method::GET,
                    &format!("/api/v1/mq/subscriptions/{guest_subscription}"),
                    None,
                )
                .await
                .1["stats"]["failed"]
                == 1
        })
        .await,
        "the guest sees its failure: {guest_view}"
    );
    // The owner's record shows its own delivery only: consumed, no retry, no guest.
    assert!(
        eventually(WAIT, || async {
            app.lookup("shared", &message_id).await.1["status"] == "consumed"
        })
        .await
    );
    let (status, record) = app.lookup("shared", &message_id).await;
    assert_eq!(status, 200);
    assert_eq!(record["retryCount"], 0, "{record}");
    let deliveries = record["deliveries"].as_array().unwrap();
    assert_eq!(deliveries.len(), 1, "only the owner's delivery: {record}");
    assert_eq!(deliveries[0]["subscriptionId"], own.as_str());
    // Nor do the owner's figures count it.
    let (_, metrics) = app.call(Method::GET, "/api/v1/mq/metrics", None).await;
    assert_eq!(metrics["consumers"]["errorRate"], 0.0, "{metrics}");
    let (_, text) = app.get_text("/metrics").await;
    let owner_failed = text.lines().any(|line| {
        line.starts_with("mq_messages_total")
            && line.contains(&format!("tenant=\"{}\"", app.tenant))
            && line.contains("queue=\"shared\"")
            && line.contains("event=\"failed\"")
    });
    assert!(!owner_failed, "the owner's series count no guest failure");
    let guest_failed = text.lines().any(|line| {
        line.starts_with("mq_messages_total")
            && line.contains(&format!("tenant=\"{}\"", guest.tenant))
            && line.contains(&format!("queue=\"{}/shared\"", app.tenant))
            && line.contains("event=\"failed\"")
    });
    assert!(guest_failed, "the guest's own series count it");
}
