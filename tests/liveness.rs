//! A randomized liveness test over two instances: a seeded driver interleaves publishes
//! (single, batch, delayed), pulls, acks, nacks, pauses and resumes (of subscriptions and of
//! the queue), filter changes, subscription deletes and creates, and private/public flips;
//! after each quiet period it checks that
//!
//! - every active subscription (and a webhook) receives a message due to it within 2 s,
//! - nothing acked is delivered again to the same group,
//! - the queue's streams hold exactly the live groups (a deleted subscription leaves none,
//!   so backpressure counts only live groups).
//!
//! The seed is printed; `LIVENESS_SEED=<seed>` replays a run, `LIVENESS_STEPS` lengthens it.

mod common;

use std::collections::{BTreeSet, HashMap, HashSet};
use std::time::{Duration, Instant};

use common::receiver::{Receiver, Reply};
use common::{queue_id, TestApp};
use deadpool_redis::redis;
use reqwest::Method;
use serde_json::{json, Value};

const DUE_WITHIN: Duration = Duration::from_secs(2);
const QUIET_EVERY: usize = 12;
const PARTITIONS: u16 = 2;
const FILTER_VALUES: [&str; 2] = ["x", "y"];

struct Subscription {
    id: String,
    group: String,
    paused: bool,
    filter: Option<&'static str>,
}

struct Driver<'a> {
    instances: [&'a TestApp; 2],
    rng: fastrand::Rng,
    seed: u64,
    step: usize,
    subscriptions: Vec<Subscription>,
    groups_made: usize,
    acked: HashMap<String, HashSet<String>>,
    queue_paused: bool,
    public: bool,
    published: usize,
}

impl<'a> Driver<'a> {
    fn fail(&self, what: String) -> ! {
        panic!(
            "liveness seed {} step {}: {what} (replay with LIVENESS_SEED={})",
            self.seed, self.step, self.seed
        )
    }

    fn instance(&mut self) -> &'a TestApp {
        self.instances[self.rng.usize(..2)]
    }

    async fn call(&mut self, method: Method, path: &str, body: Option<Value>) -> (u16, Value) {
        let instance = self.instance();
        let (status, body) = instance.call(method.clone(), path, body).await;
        if status >= 500 {
            self.fail(format!("{method} {path} answered {status}: {body}"));
        }
        (status, body)
    }

    fn message(&mut self) -> Value {
        self.published += 1;
        let kind = FILTER_VALUES[self.rng.usize(..FILTER_VALUES.len())];
        json!({"payload": {"n": self.published}, "headers": {"k": kind},
               "key": format!("k{}", self.rng.u8(..8))})
    }

    async fn expect(&mut self, what: &str, (status, body): (u16, Value), wanted: u16) -> Value {
        if status != wanted {
            self.fail(format!("{what}: {status} {body}"));
        }
        body
    }

    async fn create_subscription(&mut self) {
        self.groups_made += 1;
        let group = format!("g{}", self.groups_made);
        let answer = self
            .call(
                Method::POST,
                "/api/v1/mq/subscriptions",
                Some(
                    json!({"queue": "q", "consumerGroup": group, "consumerName": "c",
                            "subscriptionType": "redis_consumer", "retryDelayMs": 50}),
                ),
            )
            .await;
        let created = self.expect("create subscription", answer, 201).await;
        self.subscriptions.push(Subscription {
            id: created["id"].as_str().unwrap().to_owned(),
            group,
            paused: false,
            filter: None,
        });
    }

    /// One random operation.
    async fn act(&mut self) {
        match self.rng.usize(..10) {
            0 | 1 => {
                let mut message = self.message();
                message["queue"] = json!("q");
                let answer = self
                    .call(Method::POST, "/api/v1/mq/publish", Some(message))
                    .await;
                self.expect("publish", answer, 201).await;
            }
            2 => {
                let messages: Vec<Value> =
                    (0..self.rng.usize(2..6)).map(|_| self.message()).collect();
                self.publish_batch(messages, "publish batch").await;
            }
            3 => {
                let mut message = self.message();
                message["queue"] = json!("q");
                message["delayMs"] = json!(self.rng.u64(100..800));
                let answer = self
                    .call(Method::POST, "/api/v1/mq/publish", Some(message))
                    .await;
                self.expect("publish delayed", answer, 201).await;
            }
            4 | 5 => self.pull_and_settle().await,
            6 => {
                let Some(n) = self.pick_subscription() else {
                    return;
                };
                let paused = !self.subscriptions[n].paused;
                let action = if paused { "pause" } else { "resume" };
                let path = format!(
                    "/api/v1/mq/subscriptions/{}/{action}",
                    self.subscriptions[n].id
                );
                let answer = self.call(Method::POST, &path, None).await;
                self.expect(action, answer, 200).await;
                self.subscriptions[n].paused = paused;
            }
            7 => {
                let Some(n) = self.pick_subscription() else {
                    return;
                };
                let filter = match self.rng.usize(..3) {
                    0 => None,
                    v => Some(FILTER_VALUES[v - 1]),
                };
                let body = match filter {
                    Some(value) => json!({"messageFilter": {"headers.k": value}}),
                    None => json!({"messageFilter": null}),
                };
                let path = format!("/api/v1/mq/subscriptions/{}", self.subscriptions[n].id);
                let answer = self.call(Method::PUT, &path, Some(body)).await;
                self.expect("change filter", answer, 200).await;
                self.subscriptions[n].filter = filter;
            }
            8 => {
                if let Some(n) = self.pick_subscription() {
                    let gone = self.subscriptions.remove(n);
                    if self.rng.bool() {
                        self.delete_under_a_long_poll(&gone).await;
                    } else {
                        let path = format!("/api/v1/mq/subscriptions/{}", gone.id);
                        let answer = self.call(Method::DELETE, &path, None).await;
                        self.expect("delete subscription", answer, 204).await;
                    }
                }
                self.create_subscription().await;
            }
            _ => {
                let body = if self.rng.bool() {
                    self.public = !self.public;
                    json!({"isPublic": self.public})
                } else {
                    self.queue_paused = !self.queue_paused;
                    json!({"status": if self.queue_paused { "paused" } else { "active" }})
                };
                let answer = self
                    .call(Method::PUT, "/api/v1/mq/queues/q", Some(body))
                    .await;
                self.expect("change queue", answer, 200).await;
            }
        }
    }

    /// Deletes a subscription while a long poll on it waits and a publish lands: the poll
    /// answers (what it had, or 404) and nothing brings the group back.
    async fn delete_under_a_long_poll(&mut self, gone: &Subscription) {
        let id = &gone.id;
        let (poller, deleter, publisher) = (self.instance(), self.instance(), self.instance());
        let mut message = self.message();
        message["queue"] = json!("q");
        let pull_path = format!("/api/v1/mq/subscriptions/{id}/pull");
        let poll = poller.call(
            Method::POST,
            &pull_path,
            Some(json!({"maxMessages": 10, "waitMs": 2000})),
        );
        let delete = async {
            tokio::time::sleep(Duration::from_millis(50)).await;
            let path = format!("/api/v1/mq/subscriptions/{id}");
            deleter.call(Method::DELETE, &path, None).await
        };
        let publish = async {
            tokio::time::sleep(Duration::from_millis(100)).await;
            publisher.publish(message).await
        };
        let ((polled, body), (deleted, _), (published, _)) = tokio::join!(poll, delete, publish);
        let poll_ended = match polled {
            200 | 404 => true,
            409 => gone.paused,
            _ => false,
        };
        if !poll_ended || deleted != 204 || published != 201 {
            self.fail(format!(
                "delete under a long poll: poll {polled} {body}, delete {deleted}, publish {published}"
            ));
        }
    }

    async fn publish_batch(&mut self, messages: Vec<Value>, what: &str) {
        let answer = self
            .call(
                Method::POST,
                "/api/v1/mq/publish/batch",
                Some(json!({"queue": "q", "messages": messages})),
            )
            .await;
        self.expect(what, answer, 201).await;
    }

    fn pick_subscription(&mut self) -> Option<usize> {
        (!self.subscriptions.is_empty()).then(|| self.rng.usize(..self.subscriptions.len()))
    }

    async fn pull_and_settle(&mut self) {
        let Some(n) = self.pick_subscription() else {
            return;
        };
        if self.subscriptions[n].paused {
            return;
        }
        let id = self.subscriptions[n].id.clone();
        let max = self.rng.u32(1..10);
        let answer = self
            .call(
                Method::POST,
                &format!("/api/v1/mq/subscriptions/{id}/pull"),
                Some(json!({"maxMessages": max, "waitMs": 0})),
            )
            .await;
        let pulled = self.expect("pull", answer, 200).await;
        let ack = self.rng.u8(..10) < 7;
        let delay = self.rng.u64(0..300);
        self.settle(n, &pulled, ack, delay).await;
    }

    /// Acks (or nacks) what a pull of subscription `n` returned, after checking that no
    /// message acked in its group comes again; the payloads pulled.
    async fn settle(&mut self, n: usize, pulled: &Value, ack: bool, delay_ms: u64) -> Vec<Value> {
        let messages = pulled["messages"].as_array().cloned().unwrap_or_default();
        if messages.is_empty() {
            return Vec::new();
        }
        let group = self.subscriptions[n].group.clone();
        for message in &messages {
            let message_id = message["messageId"].as_str().unwrap_or_default();
            if self
                .acked
                .get(&group)
                .is_some_and(|acked| acked.contains(message_id))
            {
                self.fail(format!(
                    "group {group} got {message_id} again after acking it"
                ));
            }
        }
        let ack_ids: Vec<&str> = messages
            .iter()
            .map(|m| m["ackId"].as_str().unwrap())
            .collect();
        let id = self.subscriptions[n].id.clone();
        let (path, body) = if ack {
            (
                format!("/api/v1/mq/subscriptions/{id}/ack"),
                json!({"ackIds": ack_ids}),
            )
        } else {
            (
                format!("/api/v1/mq/subscriptions/{id}/nack"),
                json!({"ackIds": ack_ids, "delayMs": delay_ms}),
            )
        };
        let answer = self.call(Method::POST, &path, Some(body)).await;
        self.expect("settle", answer, 200).await;
        if ack {
            let acked = self.acked.entry(group).or_default();
            for message in &messages {
                acked.insert(message["messageId"].as_str().unwrap_or_default().to_owned());
            }
        }
        messages.iter().map(|m| m["payload"].clone()).collect()
    }

    /// The invariants, after a quiet period.
    async fn check(&mut self, queue: &Value, webhook: &Receiver) {
        if self.queue_paused {
            self.queue_paused = false;
            let answer = self
                .call(
                    Method::PUT,
                    "/api/v1/mq/queues/q",
                    Some(json!({"status": "active"})),
                )
                .await;
            self.expect("resume queue", answer, 200).await;
        }
        tokio::time::sleep(Duration::from_millis(300)).await;

        let live: BTreeSet<String> = self
            .subscriptions
            .iter()
            .map(|s| s.group.clone())
            .chain(["hook".to_owned()])
            .collect();
        for partition in 0..PARTITIONS {
            let groups = groups_on(self.instances[0], queue, partition).await;
            if groups != live {
                self.fail(format!(
                    "partition {partition} holds groups {groups:?}, the live ones are {live:?}"
                ));
            }
        }

        // A probe for each active subscription (and the webhook), published at once.
        let mut probes: Vec<(usize, String)> = Vec::new();
        let mut messages = Vec::new();
        for (n, subscription) in self.subscriptions.iter().enumerate() {
            if subscription.paused {
                continue;
            }
            let tag = format!("probe-{}-{n}", self.step);
            let kind = subscription.filter.unwrap_or("x");
            messages.push(json!({"payload": {"probe": tag}, "headers": {"k": kind}}));
            probes.push((n, tag));
        }
        let webhook_tag = format!("probe-{}-hook", self.step);
        messages.push(json!({"payload": {"probe": webhook_tag}, "headers": {"k": "y"}}));
        self.publish_batch(messages, "publish probes").await;
        let published_at = Instant::now();

        for (n, tag) in probes {
            let mut found = false;
            while !found && published_at.elapsed() < DUE_WITHIN {
                let id = self.subscriptions[n].id.clone();
                let answer = self
                    .call(
                        Method::POST,
                        &format!("/api/v1/mq/subscriptions/{id}/pull"),
                        Some(json!({"maxMessages": 100, "waitMs": 300})),
                    )
                    .await;
                let pulled = self.expect("drain", answer, 200).await;
                let payloads = self.settle(n, &pulled, true, 0).await;
                found = payloads.iter().any(|p| p["probe"] == tag.as_str());
            }
            if !found {
                let subscription = &self.subscriptions[n];
                self.fail(format!(
                    "subscription {} (group {}, filter {:?}) did not get its probe within {DUE_WITHIN:?}",
                    subscription.id, subscription.group, subscription.filter
                ));
            }
        }
        let deadline = published_at + DUE_WITHIN;
        while !webhook
            .delivered()
            .iter()
            .any(|r| r.json["payload"]["probe"] == webhook_tag.as_str())
        {
            if Instant::now() >= deadline {
                self.fail("the webhook did not get its probe within 2 s".into());
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
        let mut pushed = HashSet::new();
        for received in webhook.delivered() {
            let message_id = received.json["messageId"]
                .as_str()
                .unwrap_or_default()
                .to_owned();
            if !pushed.insert(message_id.clone()) {
                self.fail(format!("the webhook got {message_id} twice"));
            }
        }
    }
}

/// The consumer groups of one partition stream of `queue`, the recorder's aside.
async fn groups_on(app: &TestApp, queue: &Value, partition: u16) -> BTreeSet<String> {
    let keys =
        mq::broker::keys::KeyLayout::new(&app.redis.prefix).partition(queue_id(queue), partition);
    let mut redis = app.redis.connection().await;
    let groups: Vec<Vec<redis::Value>> = redis::cmd("XINFO")
        .arg("GROUPS")
        .arg(&keys.stream)
        .query_async(&mut redis)
        .await
        .unwrap_or_default();
    groups
        .into_iter()
        .filter_map(|fields| {
            let name = fields.get(1)?;
            redis::FromRedisValue::from_redis_value(name).ok()
        })
        .filter(|name: &String| !name.starts_with("__"))
        .collect()
}

#[tokio::test]
async fn random_interleavings_over_two_instances_never_stall_delivery() {
    let seed = std::env::var("LIVENESS_SEED")
        .ok()
        .and_then(|s| s.parse().ok())
        .unwrap_or_else(|| fastrand::u64(..));
    let steps: usize = std::env::var("LIVENESS_STEPS")
        .ok()
        .and_then(|s| s.parse().ok())
        .unwrap_or(48);
    eprintln!("liveness seed {seed} ({steps} steps)");

    let first = TestApp::spawn().await;
    let second = first.spawn_sibling().await;
    let queue = first
        .create_queue(json!({"name": "q", "partitionCount": PARTITIONS}))
        .await;
    let webhook = Receiver::start(Reply::Status(200)).await;
    first
        .subscribe(
            json!({"queue": "q", "consumerGroup": "hook", "consumerName": "h",
                          "subscriptionType": "webhook",
                          "messageFilter": {"headers.k": "y"},
                          "handlerConfig": {"url": webhook.url("/"), "concurrency": 2}}),
        )
        .await;
    let mut driver = Driver {
        instances: [&first, &second],
        rng: fastrand::Rng::with_seed(seed),
        seed,
        step: 0,
        subscriptions: Vec::new(),
        groups_made: 0,
        acked: HashMap::new(),
        queue_paused: false,
        public: false,
        published: 0,
    };
    for _ in 0..3 {
        driver.create_subscription().await;
    }
    // Both instances serve the new subscriptions before the first check.
    tokio::time::sleep(Duration::from_millis(500)).await;
    driver.check(&queue, &webhook).await;
    for step in 1..=steps {
        driver.step = step;
        driver.act().await;
        if step % QUIET_EVERY == 0 || step == steps {
            driver.check(&queue, &webhook).await;
        }
    }
}
