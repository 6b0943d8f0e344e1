//! Several service processes on one PostgreSQL and one Redis, as behind a gateway: each runs
//! the binary `cargo test` builds, with its own port and the same database and key prefix.

mod common;

use std::collections::HashMap;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use common::{base_env, eventually, free_port, spawn_service, token_for, TestDatabase, TestRedis};
use serde_json::{json, Value};
use uuid::Uuid;

struct Instance {
    process: Child,
    port: u16,
}

impl Drop for Instance {
    fn drop(&mut self) {
        let _ = self.process.kill();
        let _ = self.process.wait();
    }
}

struct Cluster {
    instances: Vec<Instance>,
    client: reqwest::Client,
    token: String,
    // Dropped after the instances (fields drop in order): they use them until killed.
    _redis: TestRedis,
    database: TestDatabase,
}

impl Cluster {
    async fn start(count: usize) -> Cluster {
        Self::start_with(count, |_| {}).await
    }

    async fn start_with(count: usize, customize: impl Fn(&mut HashMap<String, String>)) -> Cluster {
        let database = TestDatabase::create().await;
        let redis = TestRedis::new();
        let client = reqwest::Client::builder().no_proxy().build().unwrap();
        let mut instances = Vec::new();
        for n in 0..count {
            instances.push(Self::spawn(&client, &database, &redis, &customize, n).await);
        }
        Cluster {
            instances,
            client,
            token: token_for(Uuid::new_v4(), "tester"),
            _redis: redis,
            database,
        }
    }

    /// Starts one instance and waits for its health; a port taken between choosing it and
    /// the child binding it is chosen again.
    async fn spawn(
        client: &reqwest::Client,
        database: &TestDatabase,
        redis: &TestRedis,
        customize: &impl Fn(&mut HashMap<String, String>),
        n: usize,
    ) -> Instance {
        for _ in 0..3 {
            let port = free_port();
            let mut env = base_env(&database.url, &redis.prefix);
            env.insert("PORT".into(), port.to_string());
            env.insert("RUST_LOG".into(), "error".into());
            customize(&mut env);
            let mut instance = Instance {
                process: spawn_service(&env, Stdio::inherit()),
                port,
            };
            let started = Instant::now();
            while started.elapsed() < Duration::from_secs(30) {
                if instance.process.try_wait().expect("wait").is_some() {
                    break;
                }
                let health = client
                    .get(format!("http://127.0.0.1:{port}/api/v1/mq/health"))
                    .send()
                    .await;
                if health.is_ok_and(|r| r.status() == 200) {
                    return instance;
                }
                tokio::time::sleep(Duration::from_millis(100)).await;
            }
            let _ = instance.process.kill();
        }
        panic!("instance {n} did not start (its stderr is above)");
    }

    /// Creates a queue through instance `n` (asserting 201).
    async fn create_queue(&self, n: usize, queue: Value) {
        let (status, body) = self.call(n, "POST", "/api/v1/mq/queues", Some(queue)).await;
        assert_eq!(status, 201, "{body}");
    }

    /// Creates a pull subscription to `queue` through instance `n` (asserting 201); its id.
    async fn subscribe(&self, n: usize, queue: &str, group: &str, settings: Value) -> String {
        let mut body = json!({"queue": queue, "consumerGroup": group,
                              "consumerName": format!("{group}-1"),
                              "subscriptionType": "redis_consumer"});
        for (name, value) in settings.as_object().into_iter().flatten() {
            body[name] = value.clone();
        }
        let (status, created) = self
            .call(n, "POST", "/api/v1/mq/subscriptions", Some(body))
            .await;
        assert_eq!(status, 201, "{created}");
        created["id"].as_str().expect("an id").to_owned()
    }

    /// A long poll of `subscription` (one message, waiting `wait_ms`) on instance `n`,
    /// running on its own.
    fn waiting_poll(
        &self,
        n: usize,
        subscription: &str,
        wait_ms: u64,
    ) -> tokio::task::JoinHandle<(u16, Value)> {
        let request = self
            .client
            .post(format!(
                "http://127.0.0.1:{}/api/v1/mq/subscriptions/{subscription}/pull",
                self.instances[n].port
            ))
            .bearer_auth(&self.token)
            .json(&json!({"maxMessages": 1, "waitMs": wait_ms}))
            .send();
        tokio::spawn(async move { common::read(request.await.expect("the poll answers")).await })
    }

    async fn call(&self, n: usize, method: &str, path: &str, body: Option<Value>) -> (u16, Value) {
        self.call_with(n, &self.token, method, path, body).await
    }

    /// `call` with another bearer token (another tenant's).
    async fn call_with(
        &self,
        n: usize,
        token: &str,
        method: &str,
        path: &str,
        body: Option<Value>,
    ) -> (u16, Value) {
        let url = format!("http://127.0.0.1:{}{path}", self.instances[n].port);
        let method = reqwest::Method::from_bytes(method.as_bytes()).unwrap();
        let mut request = self.client.request(method, url).bearer_auth(token);
        if let Some(body) = body {
            request = request.json(&body);
        }
        match request.send().await {
            Ok(response) => common::read(response).await,
            Err(_) => (0, Value::Null),
        }
    }
}

/// Pulls and acks from instances in turn until `expected` messages came or `within` passed;
/// how many times each message id came.
async fn drain(
    cluster: &Cluster,
    subscription: &str,
    expected: usize,
    within: Duration,
) -> HashMap<String, u32> {
    let all: Vec<usize> = (0..cluster.instances.len()).collect();
    drain_through(cluster, &all, subscription, expected, within).await
}

/// `drain` through the instances of `through` only.
async fn drain_through(
    cluster: &Cluster,
    through: &[usize],
    subscription: &str,
    expected: usize,
    within: Duration,
) -> HashMap<String, u32> {
    let mut seen: HashMap<String, u32> = HashMap::new();
    let started = Instant::now();
    let mut turn = 0;
    while seen.values().sum::<u32>() < expected as u32 && started.elapsed() < within {
        turn += 1;
        let n = through[turn % through.len()];
        let (status, pulled) = cluster
            .call(
                n,
                "POST",
                &format!("/api/v1/mq/subscriptions/{subscription}/pull"),
                Some(json!({"maxMessages": 7, "waitMs": 300})),
            )
            .await;
        assert_eq!(status, 200, "{pulled}");
        let messages = pulled["messages"].as_array().cloned().unwrap_or_default();
        if messages.is_empty() {
            continue;
        }
        for message in &messages {
            *seen
                .entry(message["messageId"].as_str().unwrap().to_owned())
                .or_default() += 1;
        }
        let ack_ids: Vec<&str> = messages
            .iter()
            .map(|m| m["ackId"].as_str().unwrap())
            .collect();
        // Acked through another instance than the one that delivered, where there is one.
        let (status, body) = cluster
            .call(
                through[(turn + 1) % through.len()],
                "POST",
                &format!("/api/v1/mq/subscriptions/{subscription}/ack"),
                Some(json!({ "ackIds": ack_ids })),
            )
            .await;
        assert_eq!(status, 200, "{body}");
    }
    seen
}

#[tokio::test]
async fn three_instances_deliver_each_message_once_per_group_and_release_delayed_ones_once() {
    let cluster = Cluster::start(3).await;
    cluster
        .create_queue(0, json!({"name": "orders", "partitionCount": 4}))
        .await;
    let mut subscriptions = Vec::new();
    for group in ["billing", "shipping"] {
        subscriptions.push(cluster.subscribe(1, "orders", group, json!({})).await);
    }
    // Published through every instance; a third of them delayed (released by whichever
    // instance's scheduler gets there first).
    let total = 60;
    for n in 0..total {
        let mut message = json!({"queue": "orders", "payload": {"n": n},
                                 "messageId": format!("m-{n}"), "key": format!("k{}", n % 7)});
        if n % 3 == 0 {
            message["delayMs"] = json!(200 + 20 * n);
        }
        let (status, body) = cluster
            .call(n % 3, "POST", "/api/v1/mq/publish", Some(message))
            .await;
        assert_eq!(status, 201, "{body}");
    }
    for subscription in &subscriptions {
        let seen = drain(&cluster, subscription, total, Duration::from_secs(30)).await;
        assert_eq!(seen.len(), total, "every message reached the group");
        let twice: Vec<_> = seen.iter().filter(|(_, count)| **count > 1).collect();
        assert!(twice.is_empty(), "delivered more than once: {twice:?}");
        // Nothing more comes: no delayed message was released twice.
        let extra = drain(&cluster, subscription, 1, Duration::from_secs(2)).await;
        assert!(extra.is_empty(), "came again: {extra:?}");
    }
}

#[tokio::test]
async fn a_pause_or_deletion_made_on_one_instance_ends_long_polls_on_the_others_within_two_seconds()
{
    let cluster = Cluster::start(3).await;
    cluster.create_queue(0, json!({"name": "q"})).await;
    let id = cluster.subscribe(0, "q", "g", json!({})).await;
    // A long poll waiting on instance `n`: it only ends early if that instance hears of the
    // change (a pull answered at once would read PostgreSQL anyway).
    let waiting_poll = |n: usize| cluster.waiting_poll(n, &id, 15_000);
    let ended_within = |poll: tokio::task::JoinHandle<(u16, Value)>| async move {
        tokio::time::timeout(Duration::from_secs(2), poll)
            .await
            .expect("the poll ended within 2 s of the change")
            .expect("the poll task")
    };

    let polls = [waiting_poll(1), waiting_poll(2)];
    tokio::time::sleep(Duration::from_millis(500)).await;
    let (status, body) = cluster
        .call(
            0,
            "POST",
            &format!("/api/v1/mq/subscriptions/{id}/pause"),
            None,
        )
        .await;
    assert_eq!(status, 200, "{body}");
    for poll in polls {
        let (status, body) = ended_within(poll).await;
        assert_eq!(status, 409, "paused: {body}");
    }

    let (status, body) = cluster
        .call(
            0,
            "POST",
            &format!("/api/v1/mq/subscriptions/{id}/resume"),
            None,
        )
        .await;
    assert_eq!(status, 200, "{body}");
    let polls = [waiting_poll(0), waiting_poll(2)];
    tokio::time::sleep(Duration::from_millis(500)).await;
    let (status, body) = cluster
        .call(1, "DELETE", &format!("/api/v1/mq/subscriptions/{id}"), None)
        .await;
    assert_eq!(status, 204, "{body}");
    for poll in polls {
        let (status, body) = ended_within(poll).await;
        assert_eq!(status, 404, "deleted: {body}");
    }
}

#[tokio::test]
async fn sigterm_turns_health_503_answers_long_polls_and_exits_within_the_grace_period() {
    let mut cluster = Cluster::start_with(1, |env| {
        env.insert("SHUTDOWN_DRAIN_MS".into(), "1500".into());
        env.insert("SHUTDOWN_GRACE_MS".into(), "5000".into());
    })
    .await;
    cluster.create_queue(0, json!({"name": "q"})).await;
    let id = cluster.subscribe(0, "q", "g", json!({})).await;
    let poll = cluster.waiting_poll(0, &id, 20_000);
    tokio::time::sleep(Duration::from_millis(300)).await;

    let signalled = Instant::now();
    let pid = cluster.instances[0].process.id().to_string();
    let killed = Command::new("kill")
        .args(["-TERM", &pid])
        .status()
        .expect("kill runs");
    assert!(killed.success());
    // Readiness turns first: new requests are still served, /health says to go elsewhere.
    assert!(
        eventually(Duration::from_secs(1), || async {
            let (status, health) = cluster.call(0, "GET", "/api/v1/mq/health", None).await;
            status == 503 && health["status"] == "stopping"
        })
        .await,
        "/health answers 503 while the instance drains"
    );
    // The long poll answers (with nothing) instead of holding the shutdown for 20 s.
    let (status, pulled) = tokio::time::timeout(Duration::from_secs(5), poll)
        .await
        .expect("the poll answered within the grace period")
        .expect("the poll task");
    assert_eq!(status, 200, "{pulled}");
    assert_eq!(pulled["messages"], json!([]));
    // And the process is gone within the grace period.
    let exited = loop {
        if let Some(exit) = cluster.instances[0].process.try_wait().expect("wait") {
            break exit;
        }
        assert!(
            signalled.elapsed() < Duration::from_secs(7),
            "still running {:?} after SIGTERM",
            signalled.elapsed()
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    };
    assert!(exited.success(), "{exited:?}");
}

#[tokio::test]
async fn an_instance_killed_under_load_loses_nothing_it_acknowledged() {
    let mut cluster = Cluster::start(2).await;
    cluster
        .create_queue(0, json!({"name": "q", "partitionCount": 2}))
        .await;
    let subscription = cluster
        .subscribe(1, "q", "g", json!({"sessionTimeoutMs": 1000}))
        .await;
    // Every publish answered 201 is acknowledged: it must be delivered and recorded.
    let total = 40;
    for n in 0..total {
        let (status, body) = cluster
            .call(
                n % 2,
                "POST",
                "/api/v1/mq/publish",
                Some(json!({"queue": "q", "payload": n, "messageId": format!("m-{n}")})),
            )
            .await;
        assert_eq!(status, 201, "{body}");
    }
    // Deliveries in flight on the instance about to die, never acked.
    let (status, pulled) = cluster
        .call(
            0,
            "POST",
            &format!("/api/v1/mq/subscriptions/{subscription}/pull"),
            Some(json!({"maxMessages": 10})),
        )
        .await;
    assert_eq!(status, 200, "{pulled}");
    assert_eq!(pulled["messages"].as_array().map(Vec::len), Some(10));
    cluster.instances[0].process.kill().expect("kill -9");
    cluster.instances[0].process.wait().expect("reaped");

    // The survivor hands out everything, the dead instance's deliveries after their
    // deadline (at its next look over the active queues).
    let seen = drain_through(
        &cluster,
        &[1],
        &subscription,
        total,
        Duration::from_secs(60),
    )
    .await;
    let missing: Vec<String> = (0..total)
        .map(|n| format!("m-{n}"))
        .filter(|id| !seen.contains_key(id))
        .collect();
    assert!(missing.is_empty(), "never delivered: {missing:?}");
    // And records every message, those the dead instance published and never recorded too
    // (its sweep over the active queues).
    assert!(
        eventually(Duration::from_secs(60), || async {
            let mut db = cluster.database.connect().await;
            sqlx::query_scalar::<_, i64>(
                "SELECT count(DISTINCT message_id) FROM message_records WHERE message_id LIKE 'm-%'",
            )
            .fetch_one(&mut db)
            .await
            .unwrap()
                == total as i64
        })
        .await,
        "every acknowledged message recorded"
    );
}

/// Publishes `count` messages, ids `<prefix>-<n>`, through the instances in turn; the ids
/// answered 201, and every other answer (status, Retry-After present).
async fn publish_through(
    cluster: &Cluster,
    prefix: &str,
    count: usize,
    pause: Duration,
) -> (Vec<String>, Vec<(u16, bool)>) {
    let (mut confirmed, mut refused) = (Vec::new(), Vec::new());
    for n in 0..count {
        let id = format!("{prefix}-{n}");
        let port = cluster.instances[n % cluster.instances.len()].port;
        let response = cluster
            .client
            .post(format!("http://127.0.0.1:{port}/api/v1/mq/publish"))
            .bearer_auth(&cluster.token)
            .json(&json!({"queue": "q", "payload": n, "messageId": id}))
            .send()
            .await
            .expect("the instance answers");
        match response.status().as_u16() {
            201 => confirmed.push(id),
            status => refused.push((status, response.headers().contains_key("retry-after"))),
        }
        tokio::time::sleep(pause).await;
    }
    (confirmed, refused)
}

/// How many of `ids` are in `message_records`.
async fn recorded(cluster: &Cluster, ids: &[String]) -> i64 {
    let mut db = cluster.database.connect().await;
    sqlx::query_scalar::<_, i64>(
        "SELECT count(DISTINCT message_id) FROM message_records WHERE message_id = ANY($1)",
    )
    .bind(ids)
    .fetch_one(&mut db)
    .await
    .unwrap()
}

#[tokio::test]
async fn a_thirty_second_postgres_outage_stops_no_publishing_and_records_catch_up() {
    let target = common::url_socket_address(&common::postgres_server_url(), 5432).await;
    let proxy = common::proxy::TcpProxy::start(target).await;
    let address = proxy.address.to_string();
    let cluster = Cluster::start_with(2, |env| {
        let proxied = common::with_authority(&env["DATABASE_URL"], &address);
        env.insert("DATABASE_URL".into(), proxied);
    })
    .await;
    cluster.create_queue(0, json!({"name": "q"})).await;
    let subscription = cluster.subscribe(1, "q", "g", json!({})).await;
    let (before, _) = publish_through(&cluster, "before", 10, Duration::ZERO).await;
    assert_eq!(before.len(), 10);

    proxy.cut();
    let cut_at = Instant::now();
    // 30 s of publishing through both instances, with PostgreSQL unreachable all along.
    let (during, refused) =
        publish_through(&cluster, "during", 150, Duration::from_millis(200)).await;
    assert!(cut_at.elapsed() >= Duration::from_secs(30));
    assert!(
        refused.is_empty(),
        "publishing needs no PostgreSQL: {refused:?}"
    );
    // Consumers go on too.
    let seen = drain(&cluster, &subscription, 160, Duration::from_secs(30)).await;
    let unseen: Vec<&String> = before
        .iter()
        .chain(&during)
        .filter(|id| !seen.contains_key(*id))
        .collect();
    assert!(
        unseen.is_empty(),
        "not delivered during the outage: {unseen:?}"
    );
    proxy.restore();

    // The records written meanwhile catch up once PostgreSQL is back.
    let all: Vec<String> = before.into_iter().chain(during).collect();
    assert!(
        eventually(Duration::from_secs(60), || async {
            recorded(&cluster, &all).await == all.len() as i64
        })
        .await,
        "every message recorded after the outage: {} of {}",
        recorded(&cluster, &all).await,
        all.len()
    );
}

#[tokio::test]
async fn a_network_cut_to_redis_answers_503_and_heals_without_a_restart() {
    let target = common::url_socket_address(&common::redis_url(), 6379).await;
    let proxy = common::proxy::TcpProxy::start(target).await;
    let address = proxy.address.to_string();
    let cluster = Cluster::start_with(2, |env| {
        // Through the proxy, so the single Redis even on a cluster run.
        common::single_redis(env);
        let proxied = common::with_authority(&common::redis_url(), &address);
        env.insert("REDIS_URL".into(), proxied);
    })
    .await;
    cluster.create_queue(0, json!({"name": "q"})).await;
    let subscription = cluster.subscribe(1, "q", "g", json!({})).await;
    let (before, _) = publish_through(&cluster, "before", 10, Duration::ZERO).await;
    assert_eq!(before.len(), 10);

    proxy.cut();
    let (during, refused) = publish_through(&cluster, "during", 10, Duration::ZERO).await;
    assert!(
        during.is_empty(),
        "nothing is confirmed without Redis: {during:?}"
    );
    assert!(
        refused
            .iter()
            .all(|(status, retry_after)| *status == 503 && *retry_after),
        "503 with Retry-After while Redis is cut off: {refused:?}"
    );
    proxy.restore();

    // Both processes heal on their own: publishing through each succeeds again.
    let healed = Instant::now();
    // Publishes alternate between the instances: an id ending in -0 went through the
    // first, -1 through the second; both must confirm again.
    let mut after: Vec<String> = Vec::new();
    for round in 0.. {
        let through = |instance: &str| after.iter().any(|id| id.ends_with(instance));
        if after.len() >= 10 && through("-0") && through("-1") {
            break;
        }
        assert!(
            healed.elapsed() < Duration::from_secs(15),
            "publishing did not resume within 15 s of the restore"
        );
        let (confirmed, _) = publish_through(
            &cluster,
            &format!("after-{round}"),
            2,
            Duration::from_millis(100),
        )
        .await;
        after.extend(confirmed);
    }
    let expected: Vec<&String> = before.iter().chain(&after).collect();
    let seen = drain(
        &cluster,
        &subscription,
        expected.len(),
        Duration::from_secs(30),
    )
    .await;
    let unseen: Vec<&&String> = expected
        .iter()
        .filter(|id| !seen.contains_key(id.as_str()))
        .collect();
    assert!(
        unseen.is_empty(),
        "confirmed but never delivered: {unseen:?}"
    );
}

#[tokio::test]
async fn a_queue_made_private_on_one_instance_ends_guests_long_polls_on_the_others_within_two_seconds(
) {
    let cluster = Cluster::start(3).await;
    cluster
        .create_queue(0, json!({"name": "shared", "isPublic": true}))
        .await;
    let owner = cluster
        .call(0, "GET", "/api/v1/mq/queues/shared", None)
        .await
        .1;
    let guest = token_for(Uuid::new_v4(), "g");
    let (status, created) = cluster
        .call_with(
            1,
            &guest,
            "POST",
            "/api/v1/mq/subscriptions",
            Some(
                json!({"queue": "shared", "queueTenantId": owner["tenantId"],
                        "consumerGroup": "guests", "consumerName": "g",
                        "subscriptionType": "redis_consumer"}),
            ),
        )
        .await;
    assert_eq!(status, 201, "{created}");
    let path = format!(
        "/api/v1/mq/subscriptions/{}/pull",
        created["id"].as_str().unwrap()
    );
    let polls: Vec<_> = [1, 2]
        .into_iter()
        .map(|n| {
            let request = cluster
                .client
                .post(format!(
                    "http://127.0.0.1:{}{path}",
                    cluster.instances[n].port
                ))
                .bearer_auth(&guest)
                .json(&json!({"maxMessages": 1, "waitMs": 15_000}))
                .send();
            tokio::spawn(async move { common::read(request.await.expect("answers")).await })
        })
        .collect();
    tokio::time::sleep(Duration::from_millis(500)).await;
    assert!(
        polls.iter().all(|poll| !poll.is_finished()),
        "the guest's polls wait before the change"
    );
    let (status, body) = cluster
        .call(
            0,
            "PUT",
            "/api/v1/mq/queues/shared",
            Some(json!({"isPublic": false})),
        )
        .await;
    assert_eq!(status, 200, "{body}");
    for poll in polls {
        let (status, body) = tokio::time::timeout(Duration::from_secs(2), poll)
            .await
            .expect("the guest's poll ended within 2 s of the change")
            .expect("the poll task");
        assert_eq!(status, 403, "private now: {body}");
    }
}

#[tokio::test]
async fn the_retention_lease_is_held_by_one_live_instance_and_passes_on_when_it_dies() {
    let mut cluster = Cluster::start_with(3, |env| {
        // The lease lasts three intervals (1.5 s) and is renewed every interval.
        env.insert("RETENTION_INTERVAL_MS".into(), "500".into());
    })
    .await;
    let mut ids = Vec::new();
    for instance in &cluster.instances {
        let detailed: Value = cluster
            .client
            .get(format!(
                "http://127.0.0.1:{}/internal/mq/health-detailed",
                instance.port
            ))
            .header("x-service-token", common::SERVICE_TOKEN)
            .send()
            .await
            .unwrap()
            .json()
            .await
            .unwrap();
        ids.push(detailed["instanceId"].as_str().unwrap().to_owned());
    }
    let key = mq::broker::keys::KeyLayout::new(&cluster._redis.prefix).lease("retention");
    let redis = cluster._redis.connection().await;
    let holder = || {
        let key = key.clone();
        let mut redis = redis.clone();
        async move {
            let holder: Option<String> = deadpool_redis::redis::cmd("GET")
                .arg(&key)
                .query_async(&mut redis)
                .await
                .unwrap();
            holder
        }
    };
    let started = Instant::now();
    let first = loop {
        if let Some(first) = holder().await {
            break first;
        }
        assert!(
            started.elapsed() < Duration::from_secs(5),
            "nobody took the lease"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    };
    let n = ids
        .iter()
        .position(|id| *id == first)
        .expect("the lease holder is one of the instances");
    // The holder renews it; nobody else takes it meanwhile (three lease periods).
    for _ in 0..9 {
        tokio::time::sleep(Duration::from_millis(500)).await;
        assert_eq!(holder().await.as_deref(), Some(first.as_str()));
    }
    cluster.instances[n].process.kill().expect("kill -9");
    cluster.instances[n].process.wait().expect("reaped");
    let killed = Instant::now();
    let next = loop {
        if let Some(next) = holder().await.filter(|next| *next != first) {
            break next;
        }
        assert!(
            killed.elapsed() < Duration::from_secs(5),
            "no other instance took the lease within 5 s"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    };
    assert!(
        ids.iter().enumerate().any(|(m, id)| m != n && *id == next),
        "a live instance holds it now"
    );
}
